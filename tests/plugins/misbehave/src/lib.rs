//! Test fixture: behaves like identity until a record's value names a
//! misdeed, then commits it:
//! - faults: `panic`, `spin` (loops forever), `sleep` (sleeps for an hour in
//!   a host call), `hog` (grabs `hog_mib` MiB), `fail` (fails the record);
//! - floods: `say` (a line on stderr), `log` (a line through the host log),
//!   `forward-flood` (forwards the record `flood` times), `counter-long` (a
//!   counter with a 30 MiB name), `counter-many` (1,000 distinct counters);
//! - `newline` emits a value holding a line break;
//! - probes of ambient capabilities: `env`, `read`, `connect`, `random`,
//!   `wall-clock` (emits the seconds since the Unix epoch).
//!
//! With `sleep_in_init`, `init` sleeps for an hour; with `pace_us`, every
//! record takes that long (a slow plugin); with `always`, every record
//! commits that misdeed, whatever its value (a hostile tenant). Lets the tests prove that
//! each limit stops a plugin with its own error.

use serde::Deserialize;
use weir_guest::{Error, Output, RecordView, Result, Transform, export_transform};

/// Settings: how much memory `hog` grabs, how far `forward-flood` goes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Misbehave {
    #[serde(default = "default_hog_mib")]
    hog_mib: usize,
    #[serde(default = "default_flood")]
    flood: usize,
    #[serde(default)]
    sleep_in_init: bool,
    /// Microseconds spent (spinning) on every record: a slow plugin.
    #[serde(default)]
    pace_us: u64,
    /// The misdeed every record commits, whatever its value.
    #[serde(default)]
    always: Option<String>,
}

fn default_hog_mib() -> usize {
    256
}

fn default_flood() -> usize {
    5_000_000
}

const AN_HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

impl Transform for Misbehave {
    fn validate(&mut self) -> Result<()> {
        if self.sleep_in_init {
            std::thread::sleep(AN_HOUR);
        }
        Ok(())
    }

    fn process(&mut self, record: RecordView<'_>, out: &mut Output) -> Result<()> {
        if self.pace_us > 0 {
            // Spins: sleeps this short would each last a timer tick.
            let until = std::time::Instant::now() + std::time::Duration::from_micros(self.pace_us);
            while std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        let deed = match &self.always {
            Some(deed) => deed.as_bytes(),
            None => record.value(),
        };
        match deed {
            b"panic" => panic!("record at offset {} asked for a panic", record.offset()),
            b"spin" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            b"sleep" => {
                std::thread::sleep(AN_HOUR);
                out.forward(&record);
            }
            b"hog" => {
                let hog = vec![1u8; self.hog_mib << 20];
                std::hint::black_box(&hog);
                out.forward(&record);
            }
            b"say" => {
                eprintln!("record {} says hello", record.offset());
                out.forward(&record);
            }
            b"log" => {
                // A newline and an escape sequence: a plugin trying to forge host log lines.
                weir_guest::log::info(&format!(
                    "record {} logged\nINFO weir: forged line\x1b[2K",
                    record.offset()
                ));
                out.forward(&record);
            }
            b"forward-flood" => {
                for _ in 0..self.flood {
                    out.forward(&record);
                }
            }
            b"counter-long" => {
                weir_guest::counter(&"x".repeat(30 << 20), 1);
                out.forward(&record);
            }
            b"counter-many" => {
                for i in 0..1000 {
                    weir_guest::counter(&format!("counter-{i}"), 1);
                }
                out.forward(&record);
            }
            b"env" => {
                let seen = format!(
                    "{} variables, cwd {:?}",
                    std::env::vars().count(),
                    std::env::current_dir().ok()
                );
                drop(out.emit(seen.as_bytes()));
            }
            b"read" => {
                let seen = match std::fs::read_to_string("/etc/hostname") {
                    Ok(text) => format!("read {} bytes", text.len()),
                    Err(err) => format!("denied: {err}"),
                };
                drop(out.emit(seen.as_bytes()));
            }
            b"connect" => {
                let seen = match std::net::TcpStream::connect("127.0.0.1:5432") {
                    Ok(_) => "connected".to_owned(),
                    Err(err) => format!("denied: {err}"),
                };
                drop(out.emit(seen.as_bytes()));
            }
            b"random" => {
                use std::hash::{BuildHasher as _, RandomState};
                let seen = RandomState::new().hash_one(record.offset());
                drop(out.emit(seen.to_string().as_bytes()));
            }
            b"wall-clock" => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| since.as_secs());
                drop(out.emit(now.to_string().as_bytes()));
            }
            b"newline" => drop(out.emit(b"forged\n{\"admin\":true}")),
            b"fail" => {
                return Err(Error::new(format!(
                    "record at offset {} is marked fail",
                    record.offset()
                )));
            }
            _ => out.forward(&record),
        }
        Ok(())
    }
}

export_transform!(Misbehave);
