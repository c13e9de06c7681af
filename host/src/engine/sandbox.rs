//! What a plugin sees of the world through WASI, and the host imports it is
//! lent (log, counters), each bounded so that nothing a plugin does through
//! them can block past its deadline or grow host memory.
//!
//! - Clocks: a real monotonic clock (nanoseconds since the instance started)
//!   and the real wall clock. A sleep or timed poll ends by the current
//!   call's deadline at the latest; the plugin is then stopped.
//! - Randomness: every random source is one deterministic stream seeded from
//!   the plugin's content hash, so a replay gives the same outputs. There is
//!   no real entropy: plugins must not make secrets with it.
//! - stdout and stderr: kept per call (a bounded amount; the rest is counted
//!   and dropped, never an error) and drained into the host log after each
//!   call, line by line, with control characters escaped so a plugin cannot
//!   forge host log lines. The stderr of a failed call goes into its error.
//! - No filesystem, environment, arguments, stdin or network.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{DynPollable, OutputStream, Pollable, StreamResult, subscribe};
use wasmtime_wasi::{HostMonotonicClock, WasiCtx};

use super::limits::WasiGrants;

/// Bytes of stdout (and as much of stderr) kept per call.
const CAPTURE_PER_CALL: usize = 64 * 1024;
/// Bytes of a failed call's stderr quoted in its error.
const STDERR_IN_ERRORS: usize = 2048;

/// Builds the WASI context of one instance: captured stdio, the bounded
/// clock, the seeded randomness (the host's, if `grants` has `random`), and
/// nothing else. Whether the clocks may be read is checked by the engine's
/// shadows of their functions.
pub(super) fn wasi_ctx(
    capture: &Captured,
    clock_start: Instant,
    seed: [u8; 32],
    grants: WasiGrants,
) -> WasiCtx {
    let seed_u64 = |at: usize| {
        let mut word = [0; 8];
        word.copy_from_slice(&seed[at..at + 8]);
        u64::from_le_bytes(word)
    };
    let mut builder = WasiCtx::builder();
    builder
        .stdout(CaptureTarget {
            stream: Stream::Stdout,
            shared: capture.clone(),
        })
        .stderr(CaptureTarget {
            stream: Stream::Stderr,
            shared: capture.clone(),
        })
        .monotonic_clock(PluginClock { start: clock_start })
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    if !grants.random {
        builder
            .secure_random(SeededRandom::new(seed_u64(0)))
            .insecure_random(SeededRandom::new(seed_u64(8)))
            .insecure_random_seed(u128::from(seed_u64(16)) << 64 | u128::from(seed_u64(24)));
    }
    builder.build()
}

/// A monotonic clock that starts at zero with the instance.
struct PluginClock {
    start: Instant,
}

impl HostMonotonicClock for PluginClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        nanos_since(self.start)
    }
}

/// The plugin's monotonic clock reading for an instance started at `start`.
pub(super) fn nanos_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The sleep behind `wasi:clocks/monotonic-clock#subscribe-*`: ready at the
/// requested time or the call's deadline, whichever is first. A sleep that
/// the deadline cut raises `deadline_hit`, which fails the call.
struct BoundedSleep {
    until: tokio::time::Instant,
    cut: bool,
    deadline_hit: Arc<AtomicBool>,
}

#[wasmtime_wasi::async_trait]
impl Pollable for BoundedSleep {
    async fn ready(&mut self) {
        // Sleeping, the plugin gives up its core on the plugin threads.
        let _blocked = super::scheduler::blocking();
        tokio::time::sleep_until(self.until).await;
        if self.cut {
            self.deadline_hit.store(true, Ordering::Relaxed);
        }
    }
}

/// A pollable for a sleep of `duration`, cut at `deadline`; if it is cut,
/// `deadline_hit` is raised when it ends.
pub(super) fn bounded_sleep(
    table: &mut ResourceTable,
    duration: Duration,
    deadline: Option<Instant>,
    deadline_hit: &Arc<AtomicBool>,
) -> wasmtime::Result<Resource<DynPollable>> {
    let now = Instant::now();
    // No deadline is set only between calls, where nothing polls.
    let deadline = deadline.unwrap_or(now);
    let (until, cut) = match now.checked_add(duration) {
        Some(wanted) if wanted <= deadline => (wanted, false),
        _ => (deadline, true),
    };
    let sleep = table.push(BoundedSleep {
        until: tokio::time::Instant::from_std(until),
        cut,
        deadline_hit: deadline_hit.clone(),
    })?;
    subscribe(table, sleep)
}

/// splitmix64: small, fast, and a fine stream for hash seeds and shuffles.
/// Not a cryptographic generator, which is what the module docs promise.
struct SeededRandom {
    state: u64,
}

impl SeededRandom {
    fn new(seed: u64) -> Self {
        SeededRandom { state: seed }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl rand_core::TryRng for SeededRandom {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok((self.next() >> 32) as u32)
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.next())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for chunk in dst.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

/// What an instance wrote to stdout and stderr during the current call.
#[derive(Clone, Default)]
pub(super) struct Captured(Arc<Capture>);

#[derive(Default)]
struct Capture {
    /// Set by a write, cleared by a drain: a call that wrote nothing (the
    /// usual) drains without taking the lock.
    written: AtomicBool,
    state: Mutex<CapturedState>,
}

#[derive(Default)]
struct CapturedState {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    dropped: u64,
}

/// One call's stdout and stderr, taken out of the capture.
#[derive(Default)]
pub(super) struct Drained {
    pub(super) stdout: Vec<u8>,
    pub(super) stderr: Vec<u8>,
    /// Bytes written past the per-call capture and dropped.
    pub(super) dropped: u64,
}

impl Captured {
    fn lock(&self) -> std::sync::MutexGuard<'_, CapturedState> {
        self.0.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, stream: Stream, bytes: &[u8]) {
        let mut state = self.lock();
        let buffer = match stream {
            Stream::Stdout => &mut state.stdout,
            Stream::Stderr => &mut state.stderr,
        };
        let room = CAPTURE_PER_CALL.saturating_sub(buffer.len());
        let kept = bytes.len().min(room);
        buffer.extend_from_slice(&bytes[..kept]);
        state.dropped += (bytes.len() - kept) as u64;
        self.0.written.store(true, Ordering::Release);
    }

    /// Takes what was written since the last drain.
    #[inline]
    pub(super) fn drain(&self) -> Drained {
        if !self.0.written.swap(false, Ordering::Acquire) {
            return Drained::default();
        }
        self.take()
    }

    fn take(&self) -> Drained {
        let mut state = self.lock();
        Drained {
            stdout: std::mem::take(&mut state.stdout),
            stderr: std::mem::take(&mut state.stderr),
            dropped: std::mem::take(&mut state.dropped),
        }
    }
}

impl Drained {
    /// Whether the plugin wrote nothing (and nothing was dropped).
    pub(super) fn is_empty(&self) -> bool {
        self.stdout.is_empty() && self.stderr.is_empty() && self.dropped == 0
    }

    /// The end of stderr, as text fit for an error message: what a panic
    /// prints is last.
    pub(super) fn stderr_tail(&self) -> String {
        let text = String::from_utf8_lossy(&self.stderr);
        let text = text.trim();
        let mut start = text.len().saturating_sub(STDERR_IN_ERRORS);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        let cut = if start > 0 { "…" } else { "" };
        format!("{cut}{}", neutralise(&text[start..]))
    }
}

/// `text` with control characters (newlines, escape sequences) escaped, so
/// that it stays one line of the host's log.
pub(super) fn neutralise(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `text` cut to at most `max` bytes on a character boundary, saying so.
pub(super) fn truncate(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes, cut)", &text[..end], text.len()).into()
}

/// The stdout or stderr a plugin is given.
struct CaptureTarget {
    stream: Stream,
    shared: Captured,
}

impl IsTerminal for CaptureTarget {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CaptureTarget {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(CaptureStream {
            stream: self.stream,
            shared: self.shared.clone(),
        })
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(CaptureStream {
            stream: self.stream,
            shared: self.shared.clone(),
        })
    }
}

/// Always ready, never blocks, never fails: past the per-call capture,
/// bytes are counted and dropped.
struct CaptureStream {
    stream: Stream,
    shared: Captured,
}

#[wasmtime_wasi::async_trait]
impl Pollable for CaptureStream {
    async fn ready(&mut self) {}
}

impl OutputStream for CaptureStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.shared.write(self.stream, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(CAPTURE_PER_CALL)
    }
}

impl tokio::io::AsyncWrite for CaptureStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.shared.write(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Lets through at most `per_second` log lines a second (with a burst of as
/// many), and counts the rest.
#[derive(Debug)]
pub(super) struct LogBudget {
    per_second: u32,
    tokens: f64,
    refilled: Instant,
    /// Lines dropped since the last report.
    pub(super) suppressed: u64,
}

impl LogBudget {
    pub(super) fn new(per_second: u32) -> Self {
        LogBudget {
            per_second,
            tokens: f64::from(per_second),
            refilled: Instant::now(),
            suppressed: 0,
        }
    }

    /// Whether one more line may be logged now.
    pub(super) fn allow(&mut self) -> bool {
        self.allow_at(Instant::now())
    }

    fn allow_at(&mut self, now: Instant) -> bool {
        let rate = f64::from(self.per_second);
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_so_a_line_stays_a_line() {
        assert_eq!(neutralise("plain"), "plain");
        assert_eq!(
            neutralise("a\nINFO forged\x1b[31m"),
            "a\\nINFO forged\\u{1b}[31m"
        );
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        assert_eq!(truncate("short", 10), "short");
        let cut = truncate("ééééé", 3);
        assert!(cut.starts_with("é… (10 bytes, cut)"), "{cut}");
    }

    #[test]
    fn the_capture_keeps_a_bounded_amount_per_call_and_counts_the_rest() {
        let captured = Captured::default();
        captured.write(Stream::Stderr, &vec![b'x'; CAPTURE_PER_CALL + 10]);
        captured.write(Stream::Stdout, b"hello\n");
        let drained = captured.drain();
        assert_eq!(drained.stderr.len(), CAPTURE_PER_CALL);
        assert_eq!(drained.stdout, b"hello\n");
        assert_eq!(drained.dropped, 10);
        assert!(captured.drain().stderr.is_empty(), "a drain empties it");
    }

    #[test]
    fn the_log_budget_allows_its_rate_and_counts_the_rest() {
        let mut budget = LogBudget::new(5);
        let start = budget.refilled;
        let allowed = (0..20).filter(|_| budget.allow_at(start)).count();
        assert_eq!(allowed, 5);
        assert_eq!(budget.suppressed, 15);
        // Half a second later, half the rate is back.
        let later = start + Duration::from_millis(500);
        let allowed = (0..20).filter(|_| budget.allow_at(later)).count();
        assert_eq!(allowed, 2);
    }

    #[test]
    fn seeded_randomness_repeats_for_the_same_seed() {
        use rand_core::TryRng as _;
        let draw = |seed| {
            let mut rng = SeededRandom::new(seed);
            let mut bytes = [0; 13];
            rng.try_fill_bytes(&mut bytes).unwrap();
            bytes
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }
}
