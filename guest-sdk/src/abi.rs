//! The packed batch layout of `weir:plugin@0.1.0` (`wit/README.md`), read and
//! written by both sides: the guest SDK reads batches and writes outcomes,
//! the host writes batches and reads outcomes. One codec, so the two cannot
//! drift apart.

use core::fmt;

/// Length marking an absent key.
pub const NO_KEY: u32 = u32::MAX;
/// Timestamp marking "none" in a batch, or "keep the input's" in an output.
pub const NO_TIMESTAMP: i64 = i64::MIN;
/// Outcome tag: the record produced zero or more outputs.
pub const TAG_EMIT: u8 = 0;
/// Outcome tag: the record failed, with a reason.
pub const TAG_FAIL: u8 = 1;
/// Output kind: a record the plugin wrote.
pub const OUTPUT_NEW: u8 = 0;
/// Output kind: the input record, unchanged.
pub const OUTPUT_FORWARD: u8 = 1;

const RECORD_FIXED: usize = 32;
const OUTPUT_FIXED: usize = 20;

/// A packed buffer that does not follow the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbiError {
    what: &'static str,
    at: usize,
}

impl fmt::Display for AbiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "malformed packed buffer: {} at byte {}",
            self.what, self.at
        )
    }
}

impl std::error::Error for AbiError {}

/// A cursor over a packed buffer that reports where it ran short.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    #[inline]
    fn take(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], AbiError> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|&end| end <= self.buf.len());
        let end = end.ok_or(AbiError { what, at: self.pos })?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    #[inline]
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], AbiError> {
        let bytes = self.take(N, what)?;
        let mut out = [0; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    #[inline]
    fn u8(&mut self, what: &'static str) -> Result<u8, AbiError> {
        Ok(self.array::<1>(what)?[0])
    }

    #[inline]
    fn u32(&mut self, what: &'static str) -> Result<u32, AbiError> {
        self.array(what).map(u32::from_le_bytes)
    }

    #[inline]
    fn str(&mut self, len: usize, what: &'static str) -> Result<&'a str, AbiError> {
        let at = self.pos;
        let bytes = self.take(len, what)?;
        core::str::from_utf8(bytes).map_err(|_| AbiError { what, at })
    }
}

#[inline]
fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
#[inline]
fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
#[inline]
fn le_i64(b: &[u8], at: usize) -> i64 {
    let mut raw = [0; 8];
    raw.copy_from_slice(&b[at..at + 8]);
    i64::from_le_bytes(raw)
}

/// The headers of a record or an output, still packed.
#[derive(Clone, Copy, Debug)]
pub struct Headers<'a> {
    raw: &'a [u8],
    count: u16,
}

impl<'a> Headers<'a> {
    /// How many headers there are.
    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The value of the first header called `name`.
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The headers in order, as `(name, value)`.
    pub fn iter(&self) -> HeaderIter<'a> {
        HeaderIter {
            cursor: Cursor {
                buf: self.raw,
                pos: 0,
            },
            left: self.count,
        }
    }

    /// Validates `count` headers at the cursor and returns them.
    #[inline]
    fn read(cursor: &mut Cursor<'a>, count: u16) -> Result<Self, AbiError> {
        let start = cursor.pos;
        for _ in 0..count {
            let head = cursor.take(6, "header lengths")?;
            let name_len = usize::from(le_u16(head, 0));
            let value_len = le_u32(head, 2) as usize;
            cursor.str(name_len, "header name")?;
            cursor.take(value_len, "header value")?;
        }
        Ok(Headers {
            raw: &cursor.buf[start..cursor.pos],
            count,
        })
    }
}

/// Iterator over packed headers; see [`Headers::iter`].
pub struct HeaderIter<'a> {
    cursor: Cursor<'a>,
    left: u16,
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = (&'a str, &'a [u8]);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        // The bytes were validated when the headers were read.
        self.left = self.left.checked_sub(1)?;
        let head = self.cursor.take(6, "header lengths").ok()?;
        let name_len = usize::from(le_u16(head, 0));
        let value_len = le_u32(head, 2) as usize;
        let name = self.cursor.str(name_len, "header name").ok()?;
        let value = self.cursor.take(value_len, "header value").ok()?;
        Some((name, value))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (usize::from(self.left), Some(usize::from(self.left)))
    }
}

impl ExactSizeIterator for HeaderIter<'_> {}

/// One input record, borrowed from the packed batch: nothing is copied.
#[derive(Clone, Copy, Debug)]
pub struct RecordView<'a> {
    key: Option<&'a [u8]>,
    value: &'a [u8],
    timestamp: Option<i64>,
    topic: &'a [u8],
    partition: i32,
    offset: i64,
    headers: Headers<'a>,
}

impl<'a> RecordView<'a> {
    /// The record's key, if it has one.
    #[inline]
    pub fn key(&self) -> Option<&'a [u8]> {
        self.key
    }
    /// The record's value (payload).
    #[inline]
    pub fn value(&self) -> &'a [u8] {
        self.value
    }
    /// Event time in milliseconds since the Unix epoch, if known.
    #[inline]
    pub fn timestamp(&self) -> Option<i64> {
        self.timestamp
    }
    /// Where the record came from: Kafka topic, file path or generator name.
    pub fn topic(&self) -> &'a str {
        // Checked here rather than per record read: most plugins never ask.
        core::str::from_utf8(self.topic).unwrap_or_default()
    }
    /// [`RecordView::topic`] as its bytes, unchecked: to compare cheaply.
    #[inline]
    pub fn topic_bytes(&self) -> &'a [u8] {
        self.topic
    }
    /// The source partition (0 for files and generators).
    #[inline]
    pub fn partition(&self) -> i32 {
        self.partition
    }
    /// The source offset (Kafka offset; line number for files).
    #[inline]
    pub fn offset(&self) -> i64 {
        self.offset
    }
    /// The record's headers.
    #[inline]
    pub fn headers(&self) -> Headers<'a> {
        self.headers
    }
    /// The value of the first header called `name`.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers.get(name)
    }
}

/// Reads the records of a packed batch, in order.
pub struct BatchReader<'a> {
    cursor: Cursor<'a>,
    left: u32,
}

impl<'a> BatchReader<'a> {
    /// Starts reading `batch`.
    pub fn new(batch: &'a [u8]) -> Result<Self, AbiError> {
        let mut cursor = Cursor { buf: batch, pos: 0 };
        let left = cursor.u32("record count")?;
        Ok(BatchReader { cursor, left })
    }

    /// How many records are left to read.
    pub fn remaining(&self) -> u32 {
        self.left
    }

    #[inline]
    fn read_one(&mut self) -> Result<RecordView<'a>, AbiError> {
        read_record(&mut self.cursor)
    }
}

/// The record that starts at byte `at` of a packed batch, and the byte
/// after it: for a reader that keeps its own index of a batch (the host).
#[inline]
pub fn record_at(batch: &[u8], at: usize) -> Result<(RecordView<'_>, usize), AbiError> {
    let mut cursor = Cursor {
        buf: batch,
        pos: at,
    };
    let record = read_record(&mut cursor)?;
    Ok((record, cursor.pos))
}

#[inline]
fn read_record<'a>(c: &mut Cursor<'a>) -> Result<RecordView<'a>, AbiError> {
    let fixed = c.take(RECORD_FIXED, "record header")?;
    let key_len = le_u32(fixed, 0);
    let value_len = le_u32(fixed, 4) as usize;
    let timestamp = le_i64(fixed, 8);
    let offset = le_i64(fixed, 16);
    let partition = le_u32(fixed, 24) as i32;
    let topic_len = usize::from(le_u16(fixed, 28));
    let header_count = le_u16(fixed, 30);
    let value = c.take(value_len, "record value")?;
    let key = match key_len {
        NO_KEY => None,
        len => Some(c.take(len as usize, "record key")?),
    };
    let topic = c.take(topic_len, "record topic")?;
    let headers = Headers::read(c, header_count)?;
    Ok(RecordView {
        key,
        value,
        timestamp: (timestamp != NO_TIMESTAMP).then_some(timestamp),
        topic,
        partition,
        offset,
        headers,
    })
}

impl<'a> Iterator for BatchReader<'a> {
    type Item = Result<RecordView<'a>, AbiError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        self.left = self.left.checked_sub(1)?;
        let item = self.read_one();
        if item.is_err() {
            self.left = 0;
        }
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left as usize))
    }
}

#[inline]
fn len_u16(len: usize) -> u16 {
    u16::try_from(len).unwrap_or(u16::MAX)
}

#[inline]
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX - 1)
}

fn put_header(buf: &mut Vec<u8>, name: &str, value: &[u8]) {
    // Names are capped at 64 KiB and values at 4 GiB by the layout; longer
    // ones are truncated rather than corrupting the buffer.
    let name = &name.as_bytes()[..usize::from(len_u16(name.len()))];
    let value = &value[..len_u32(value.len()) as usize];
    buf.extend_from_slice(&len_u16(name.len()).to_le_bytes());
    buf.extend_from_slice(&len_u32(value.len()).to_le_bytes());
    buf.extend_from_slice(name);
    buf.extend_from_slice(value);
}

/// The parts of one record to pack into a batch.
#[derive(Clone, Copy, Debug, Default)]
pub struct RecordParts<'a> {
    /// The key, if any.
    pub key: Option<&'a [u8]>,
    /// The value.
    pub value: &'a [u8],
    /// Event time in ms since the epoch.
    pub timestamp: Option<i64>,
    /// Source topic, file or generator.
    pub topic: &'a str,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
}

/// Appends one record with its headers to `buf` in the batch layout,
/// leaving the batch's record count to the caller. A field past its length
/// limit (a topic over 64 KiB, a value over 4 GiB) is cut at the limit
/// rather than corrupting the buffer.
#[inline]
pub fn pack_record<'h>(
    buf: &mut Vec<u8>,
    record: RecordParts<'_>,
    headers: impl ExactSizeIterator<Item = (&'h str, &'h [u8])>,
) {
    let topic = &record.topic.as_bytes()[..usize::from(len_u16(record.topic.len()))];
    let value = &record.value[..len_u32(record.value.len()) as usize];
    let key = record.key.map(|k| &k[..len_u32(k.len()) as usize]);
    let mut fixed = [0u8; RECORD_FIXED];
    fixed[0..4].copy_from_slice(&key.map_or(NO_KEY, |k| len_u32(k.len())).to_le_bytes());
    fixed[4..8].copy_from_slice(&len_u32(value.len()).to_le_bytes());
    fixed[8..16].copy_from_slice(&record.timestamp.unwrap_or(NO_TIMESTAMP).to_le_bytes());
    fixed[16..24].copy_from_slice(&record.offset.to_le_bytes());
    fixed[24..28].copy_from_slice(&record.partition.to_le_bytes());
    fixed[28..30].copy_from_slice(&len_u16(topic.len()).to_le_bytes());
    fixed[30..32].copy_from_slice(&len_u16(headers.len()).to_le_bytes());
    buf.reserve(RECORD_FIXED + value.len() + key.map_or(0, <[u8]>::len) + topic.len());
    buf.extend_from_slice(&fixed);
    buf.extend_from_slice(value);
    buf.extend_from_slice(key.unwrap_or_default());
    buf.extend_from_slice(topic);
    for (name, value) in headers.take(usize::from(u16::MAX)) {
        put_header(buf, name, value);
    }
}

/// Packs records into a batch. The buffer is kept between batches.
#[derive(Default)]
pub struct BatchWriter {
    buf: Vec<u8>,
    count: u32,
}

impl BatchWriter {
    /// An empty batch.
    pub fn new() -> Self {
        let mut writer = BatchWriter::default();
        writer.clear();
        writer
    }

    /// Empties the batch, keeping its allocation.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        self.count = 0;
    }

    /// How many records the batch holds.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether the batch holds no record.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends one record with its headers.
    #[inline]
    pub fn push<'h>(
        &mut self,
        record: RecordParts<'_>,
        headers: impl ExactSizeIterator<Item = (&'h str, &'h [u8])>,
    ) {
        pack_record(&mut self.buf, record, headers);
        self.count += 1;
        self.buf[..4].copy_from_slice(&self.count.to_le_bytes());
    }

    /// The packed batch.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// Writes the outcomes of a batch: the guest side of `process`.
///
/// The caller starts each record's outcome with [`OutcomeWriter::begin`],
/// adds outputs, then ends it with [`OutcomeWriter::commit`] or
/// [`OutcomeWriter::fail`], which discards the outputs written so far.
pub struct OutcomeWriter {
    buf: Vec<u8>,
    outcomes: u32,
    current: usize,
    outputs: u32,
    /// Why an output of the current record cannot be written as asked (a
    /// field past its length limit): [`OutcomeWriter::commit`] fails the
    /// record with it instead of sending something else than the plugin
    /// wrote.
    overflow: Option<String>,
}

impl OutcomeWriter {
    /// A reply with room for `bytes` bytes before it grows.
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes);
        buf.extend_from_slice(&0u32.to_le_bytes());
        OutcomeWriter {
            buf,
            outcomes: 0,
            current: 0,
            outputs: 0,
            overflow: None,
        }
    }

    /// Starts the outcome of the next record.
    #[inline]
    pub fn begin(&mut self) {
        self.current = self.buf.len();
        self.outputs = 0;
        self.buf.push(TAG_EMIT);
        self.buf.extend_from_slice(&[0; 8]);
    }

    fn overflow(&mut self, what: &str, len: usize, max: usize) {
        if self.overflow.is_none() {
            self.overflow = Some(format!(
                "output {}: {what} is {len}, over the limit of {max}",
                self.outputs + 1
            ));
        }
    }

    /// Drops the output begun at `start` (by [`OutcomeWriter::begin_output`])
    /// as if it had never been started.
    pub fn abandon_output(&mut self, start: usize) {
        self.buf.truncate(start - 1);
    }

    /// Ends the current outcome as "emitted what was written", or, if an
    /// output could not be written as asked (a field past its length
    /// limit), as failed with why.
    #[inline]
    pub fn commit(&mut self) {
        if let Some(overflow) = self.overflow.take() {
            self.fail(&overflow);
            return;
        }
        let at = self.current + 1;
        let bytes = len_u32(self.buf.len() - at - 8);
        self.buf[at..at + 4].copy_from_slice(&self.outputs.to_le_bytes());
        self.buf[at + 4..at + 8].copy_from_slice(&bytes.to_le_bytes());
        self.outcomes += 1;
    }

    /// Ends the current outcome as failed, discarding its outputs.
    pub fn fail(&mut self, reason: &str) {
        self.overflow = None;
        self.buf.truncate(self.current);
        self.buf.push(TAG_FAIL);
        self.buf
            .extend_from_slice(&len_u32(reason.len()).to_le_bytes());
        self.buf
            .extend_from_slice(&reason.as_bytes()[..len_u32(reason.len()) as usize]);
        self.outcomes += 1;
    }

    /// Starts a new output record of the current outcome and returns the
    /// buffer to write its value into; finish it with
    /// [`OutcomeWriter::end_output`].
    #[inline]
    pub fn begin_output(&mut self) -> (usize, &mut Vec<u8>) {
        self.buf.push(OUTPUT_NEW);
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; OUTPUT_FIXED]);
        (start, &mut self.buf)
    }

    /// Finishes the output begun at `start`, whose value has been written.
    #[inline]
    pub fn end_output<'h>(
        &mut self,
        start: usize,
        key: Option<&[u8]>,
        timestamp: Option<i64>,
        route: Option<&str>,
        headers: impl Iterator<Item = (&'h str, &'h [u8])>,
    ) {
        let value_len = self.buf.len() - start - OUTPUT_FIXED;
        let key = key.map(|k| &k[..len_u32(k.len()) as usize]);
        let route = route.unwrap_or_default();
        if route.len() > usize::from(u16::MAX) {
            self.overflow("the route name's length", route.len(), u16::MAX.into());
        }
        let route = &route.as_bytes()[..usize::from(len_u16(route.len()))];
        self.buf.extend_from_slice(key.unwrap_or_default());
        self.buf.extend_from_slice(route);
        let mut header_count = 0u16;
        for (name, value) in headers {
            if header_count == u16::MAX {
                self.overflow(
                    "the header count",
                    usize::from(u16::MAX) + 1,
                    u16::MAX.into(),
                );
                break;
            }
            if name.len() > usize::from(u16::MAX) {
                self.overflow("a header name's length", name.len(), u16::MAX.into());
            }
            put_header(&mut self.buf, name, value);
            header_count += 1;
        }
        let fixed = &mut self.buf[start..start + OUTPUT_FIXED];
        fixed[0..4].copy_from_slice(&key.map_or(NO_KEY, |k| len_u32(k.len())).to_le_bytes());
        fixed[4..8].copy_from_slice(&len_u32(value_len).to_le_bytes());
        fixed[8..16].copy_from_slice(&timestamp.unwrap_or(NO_TIMESTAMP).to_le_bytes());
        fixed[16..18].copy_from_slice(&len_u16(route.len()).to_le_bytes());
        fixed[18..20].copy_from_slice(&header_count.to_le_bytes());
        self.outputs += 1;
    }

    /// Passes the current input record on unchanged, optionally to another
    /// route. Nothing of the record is copied: the host already has it.
    #[inline]
    pub fn forward(&mut self, route: Option<&str>) {
        let route = route.unwrap_or_default();
        if route.len() > usize::from(u16::MAX) {
            self.overflow("the route name's length", route.len(), u16::MAX.into());
        }
        let route = &route.as_bytes()[..usize::from(len_u16(route.len()))];
        self.buf.push(OUTPUT_FORWARD);
        self.buf
            .extend_from_slice(&len_u16(route.len()).to_le_bytes());
        self.buf.extend_from_slice(route);
        self.outputs += 1;
    }

    /// The finished reply.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf[..4].copy_from_slice(&self.outcomes.to_le_bytes());
        self.buf
    }
}

/// A new record a plugin wrote, borrowed from the reply.
#[derive(Clone, Copy, Debug)]
pub struct NewRecordView<'a> {
    /// The key, if any.
    pub key: Option<&'a [u8]>,
    /// The value.
    pub value: &'a [u8],
    /// A new event time, or `None` to keep the input's.
    pub timestamp: Option<i64>,
    /// The named output to route to, or `None` for the input's route.
    pub route: Option<&'a str>,
    /// The output's headers.
    pub headers: Headers<'a>,
}

/// One output of a record, borrowed from the reply.
#[derive(Clone, Copy, Debug)]
pub enum OutputView<'a> {
    /// A record the plugin wrote.
    New(NewRecordView<'a>),
    /// The input record unchanged, to this route (`None`: the input's).
    Forward {
        /// The route.
        route: Option<&'a str>,
    },
}

/// The outcome of one record, borrowed from the reply.
#[derive(Clone, Copy, Debug)]
pub enum OutcomeView<'a> {
    /// Zero or more outputs (zero: dropped).
    Emit(OutputsView<'a>),
    /// The record failed, for this reason.
    Fail(&'a str),
}

/// The outputs of one outcome; iterate them with [`OutputsView::iter`].
#[derive(Clone, Copy, Debug)]
pub struct OutputsView<'a> {
    raw: &'a [u8],
    count: u32,
}

impl<'a> OutputsView<'a> {
    /// How many outputs.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether the record was dropped.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The one output, when there is exactly one (the usual case: parsed
    /// without an iterator); an error if it does not parse or bytes follow
    /// it. `None` when there are none or several: use
    /// [`OutputsView::iter`].
    #[inline]
    pub fn only(&self) -> Option<Result<OutputView<'a>, AbiError>> {
        if self.count != 1 {
            return None;
        }
        let mut cursor = Cursor {
            buf: self.raw,
            pos: 0,
        };
        Some(read_output(&mut cursor).and_then(|out| {
            if cursor.pos == cursor.buf.len() {
                Ok(out)
            } else {
                Err(past_the_outputs(cursor.pos))
            }
        }))
    }

    /// The outputs in order; an output that does not parse is an error.
    pub fn iter(&self) -> impl Iterator<Item = Result<OutputView<'a>, AbiError>> + use<'a> {
        let mut cursor = Cursor {
            buf: self.raw,
            pos: 0,
        };
        let mut left = self.count;
        let mut checked_end = false;
        core::iter::from_fn(move || {
            if left == 0 {
                if checked_end || cursor.pos == cursor.buf.len() {
                    return None;
                }
                checked_end = true;
                return Some(Err(past_the_outputs(cursor.pos)));
            }
            left -= 1;
            let item = read_output(&mut cursor);
            if item.is_err() {
                left = 0;
                checked_end = true;
            }
            Some(item)
        })
    }
}

/// Bytes past the outputs an outcome declares: a reply that says less
/// than it holds is as malformed as one that says more.
fn past_the_outputs(at: usize) -> AbiError {
    AbiError {
        what: "bytes past the outputs the outcome declares",
        at,
    }
}

#[inline]
fn read_output<'a>(c: &mut Cursor<'a>) -> Result<OutputView<'a>, AbiError> {
    match c.u8("output kind")? {
        OUTPUT_FORWARD => {
            let len = usize::from(u16::from_le_bytes(c.array("forward route length")?));
            let route = c.str(len, "forward route")?;
            Ok(OutputView::Forward {
                route: (!route.is_empty()).then_some(route),
            })
        }
        OUTPUT_NEW => {
            let fixed = c.take(OUTPUT_FIXED, "output header")?;
            let key_len = le_u32(fixed, 0);
            let value_len = le_u32(fixed, 4) as usize;
            let timestamp = le_i64(fixed, 8);
            let route_len = usize::from(le_u16(fixed, 16));
            let header_count = le_u16(fixed, 18);
            let value = c.take(value_len, "output value")?;
            let key = match key_len {
                NO_KEY => None,
                len => Some(c.take(len as usize, "output key")?),
            };
            let route = c.str(route_len, "output route")?;
            let headers = Headers::read(c, header_count)?;
            Ok(OutputView::New(NewRecordView {
                key,
                value,
                timestamp: (timestamp != NO_TIMESTAMP).then_some(timestamp),
                route: (!route.is_empty()).then_some(route),
                headers,
            }))
        }
        _ => Err(AbiError {
            what: "unknown output kind",
            at: c.pos - 1,
        }),
    }
}

/// Reads a plugin's reply: one [`OutcomeView`] per input record.
pub struct OutcomeReader<'a> {
    cursor: Cursor<'a>,
    left: u32,
}

impl<'a> OutcomeReader<'a> {
    /// Starts reading `reply`, checking it holds `expected` outcomes.
    pub fn new(reply: &'a [u8], expected: usize) -> Result<Self, AbiError> {
        let mut cursor = Cursor { buf: reply, pos: 0 };
        let left = cursor.u32("outcome count")?;
        if left as usize != expected {
            return Err(AbiError {
                what: "outcome count differs from the batch's record count",
                at: 0,
            });
        }
        Ok(OutcomeReader { cursor, left })
    }

    #[inline]
    fn read_one(&mut self) -> Result<OutcomeView<'a>, AbiError> {
        let c = &mut self.cursor;
        match c.u8("outcome tag")? {
            TAG_EMIT => {
                let count = c.u32("output count")?;
                let len = c.u32("outputs length")? as usize;
                let raw = c.take(len, "outputs")?;
                Ok(OutcomeView::Emit(OutputsView { raw, count }))
            }
            TAG_FAIL => {
                let len = c.u32("failure reason length")? as usize;
                Ok(OutcomeView::Fail(c.str(len, "failure reason")?))
            }
            _ => Err(AbiError {
                what: "unknown outcome tag",
                at: c.pos - 1,
            }),
        }
    }

    /// Checks that nothing follows the last outcome.
    pub fn finish(self) -> Result<(), AbiError> {
        if self.left == 0 && self.cursor.pos == self.cursor.buf.len() {
            Ok(())
        } else {
            Err(AbiError {
                what: "trailing bytes after the last outcome",
                at: self.cursor.pos,
            })
        }
    }
}

impl<'a> Iterator for OutcomeReader<'a> {
    type Item = Result<OutcomeView<'a>, AbiError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        self.left = self.left.checked_sub(1)?;
        let item = self.read_one();
        if item.is_err() {
            self.left = 0;
        }
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_round_trips_every_field() {
        let mut batch = BatchWriter::new();
        batch.push(
            RecordParts {
                key: Some(b"user-1"),
                value: b"{\"a\":1}",
                timestamp: Some(1_700_000_000_000),
                topic: "clicks",
                partition: 3,
                offset: 42,
            },
            [("trace", &b"abc"[..]), ("empty", &b""[..])].into_iter(),
        );
        batch.push(
            RecordParts {
                value: b"second",
                topic: "clicks",
                ..RecordParts::default()
            },
            core::iter::empty(),
        );
        let records: Vec<_> = BatchReader::new(batch.as_bytes())
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(records.len(), 2);
        let first = &records[0];
        assert_eq!(first.key(), Some(&b"user-1"[..]));
        assert_eq!(first.value(), b"{\"a\":1}");
        assert_eq!(first.timestamp(), Some(1_700_000_000_000));
        assert_eq!(
            (first.topic(), first.partition(), first.offset()),
            ("clicks", 3, 42)
        );
        assert_eq!(first.header("trace"), Some(&b"abc"[..]));
        assert_eq!(first.headers().iter().count(), 2);
        assert_eq!(records[1].key(), None);
        assert_eq!(records[1].timestamp(), None);
    }

    #[test]
    fn outputs_past_the_declared_count_are_an_error() {
        let mut out = OutcomeWriter::with_capacity(64);
        out.begin();
        out.forward(None);
        out.forward(None);
        out.commit();
        let mut reply = out.finish();
        // Declare one output where two are written.
        reply[5..9].copy_from_slice(&1u32.to_le_bytes());
        let mut reader = OutcomeReader::new(&reply, 1).unwrap();
        let Some(Ok(OutcomeView::Emit(outputs))) = reader.next() else {
            panic!("one emit outcome");
        };
        let items: Vec<_> = outputs.iter().collect();
        assert_eq!(items.len(), 2);
        assert!(items[0].is_ok());
        assert!(
            items[1]
                .as_ref()
                .is_err_and(|e| e.what.contains("past the outputs"))
        );
        assert!(
            outputs
                .only()
                .unwrap()
                .is_err_and(|e| e.what.contains("past the outputs"))
        );
    }

    #[test]
    fn only_reads_a_single_output_and_leaves_several_to_iter() {
        let mut out = OutcomeWriter::with_capacity(64);
        out.begin();
        out.forward(Some("audit"));
        out.commit();
        out.begin();
        out.forward(None);
        out.forward(None);
        out.commit();
        let reply = out.finish();
        let mut reader = OutcomeReader::new(&reply, 2).unwrap();
        let Some(Ok(OutcomeView::Emit(one))) = reader.next() else {
            panic!("an emit outcome");
        };
        assert!(matches!(
            one.only(),
            Some(Ok(OutputView::Forward {
                route: Some("audit")
            }))
        ));
        let Some(Ok(OutcomeView::Emit(two))) = reader.next() else {
            panic!("an emit outcome");
        };
        assert!(two.only().is_none());
        assert_eq!(two.iter().filter(Result::is_ok).count(), 2);
    }

    #[test]
    fn outcomes_round_trip_and_fail_discards_partial_outputs() {
        let mut out = OutcomeWriter::with_capacity(64);
        out.begin();
        out.forward(Some("audit"));
        let (start, buf) = out.begin_output();
        buf.extend_from_slice(b"new");
        out.end_output(
            start,
            Some(b"k"),
            Some(7),
            None,
            [("x", &b"y"[..])].into_iter(),
        );
        out.commit();
        out.begin();
        out.forward(None);
        out.fail("bad amount");
        out.begin();
        out.commit();
        let reply = out.finish();

        let mut reader = OutcomeReader::new(&reply, 3).unwrap();
        let OutcomeView::Emit(outputs) = reader.next().unwrap().unwrap() else {
            panic!("first outcome should emit");
        };
        let outputs: Vec<_> = outputs.iter().collect::<Result<_, _>>().unwrap();
        assert_eq!(outputs.len(), 2);
        assert!(matches!(
            outputs[0],
            OutputView::Forward {
                route: Some("audit")
            }
        ));
        let OutputView::New(new) = outputs[1] else {
            panic!("second output should be new");
        };
        assert_eq!(
            (new.value, new.key, new.timestamp, new.route),
            (&b"new"[..], Some(&b"k"[..]), Some(7), None)
        );
        assert_eq!(new.headers.get("x"), Some(&b"y"[..]));
        assert!(matches!(
            reader.next(),
            Some(Ok(OutcomeView::Fail("bad amount")))
        ));
        assert!(matches!(reader.next(), Some(Ok(OutcomeView::Emit(o))) if o.is_empty()));
        assert!(reader.next().is_none());
        reader.finish().unwrap();
    }

    #[test]
    fn truncated_and_miscounted_buffers_are_errors_not_panics() {
        let mut batch = BatchWriter::new();
        batch.push(
            RecordParts {
                value: b"hello",
                topic: "t",
                ..RecordParts::default()
            },
            core::iter::empty(),
        );
        let bytes = batch.as_bytes();
        for cut in 0..bytes.len() {
            let result: Result<Vec<_>, _> = match BatchReader::new(&bytes[..cut]) {
                Ok(reader) => reader.collect(),
                Err(e) => Err(e),
            };
            assert!(result.is_err(), "a batch cut at {cut} bytes must not parse");
        }
        let reply = OutcomeWriter::with_capacity(8).finish();
        assert!(OutcomeReader::new(&reply, 1).is_err());
        assert!(
            OutcomeReader::new(&[9, 0, 0, 0, 7], 9)
                .unwrap()
                .next()
                .unwrap()
                .is_err()
        );
        // An emit whose outputs length runs past the end, and a bad output kind.
        let overlong = [1, 0, 0, 0, TAG_EMIT, 1, 0, 0, 0, 200, 0, 0, 0];
        assert!(
            OutcomeReader::new(&overlong, 1)
                .unwrap()
                .next()
                .unwrap()
                .is_err()
        );
        let bad_kind = [1, 0, 0, 0, TAG_EMIT, 1, 0, 0, 0, 1, 0, 0, 0, 9];
        let Some(Ok(OutcomeView::Emit(outputs))) = OutcomeReader::new(&bad_kind, 1).unwrap().next()
        else {
            panic!("the outcome frame itself is well formed");
        };
        assert!(outputs.iter().next().unwrap().is_err());
    }
}

/// Entries of the aggregator's calls: a list of states (or of results) in
/// one buffer, each entry a state (version and bytes) or a failure with its
/// reason. Layout in `wit/README.md`:
///
/// ```text
/// u32 count
/// count × entry:
///     u8  tag        0: ok, 1: failed
///     u32 version    the state's encoding (0 for a result or a failure)
///     u32 len
///     len bytes      the state, the result's JSON, or the reason
/// ```
#[derive(Debug, Clone)]
pub struct EntryWriter {
    buf: Vec<u8>,
    count: u32,
}

impl Default for EntryWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl EntryWriter {
    /// An empty list.
    pub fn new() -> Self {
        EntryWriter {
            buf: vec![0; 4],
            count: 0,
        }
    }

    /// Entries written so far.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Adds a state, or a result (`version` 0).
    pub fn push(&mut self, version: u32, bytes: &[u8]) {
        self.entry(TAG_EMIT, version, bytes);
    }

    /// Adds a failure.
    pub fn push_failure(&mut self, reason: &str) {
        self.entry(TAG_FAIL, 0, reason.as_bytes());
    }

    fn entry(&mut self, tag: u8, version: u32, bytes: &[u8]) {
        let bytes = &bytes[..len_u32(bytes.len()) as usize];
        self.buf.push(tag);
        self.buf.extend_from_slice(&version.to_le_bytes());
        self.buf
            .extend_from_slice(&len_u32(bytes.len()).to_le_bytes());
        self.buf.extend_from_slice(bytes);
        self.count += 1;
    }

    /// The buffer, count written.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf[..4].copy_from_slice(&self.count.to_le_bytes());
        self.buf
    }
}

/// One entry of an [`EntryWriter`]'s list, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry<'a> {
    /// A state (or a result: version 0).
    Ok {
        /// The state's encoding.
        version: u32,
        /// The state, or the result's JSON.
        bytes: &'a [u8],
    },
    /// A failure, and why.
    Failed(&'a str),
}

/// Reads a list an [`EntryWriter`] wrote.
pub fn read_entries(buf: &[u8]) -> Result<Vec<Entry<'_>>, AbiError> {
    let mut cursor = Cursor { buf, pos: 0 };
    let count = cursor.u32("entry count")?;
    // Each entry takes at least 9 bytes: a count past that is a lie.
    let mut entries = Vec::with_capacity((count as usize).min(buf.len() / 9));
    for _ in 0..count {
        let tag = cursor.u8("entry tag")?;
        let version = cursor.u32("entry version")?;
        let len = cursor.u32("entry length")? as usize;
        entries.push(match tag {
            TAG_EMIT => Entry::Ok {
                version,
                bytes: cursor.take(len, "entry bytes")?,
            },
            TAG_FAIL => Entry::Failed(cursor.str(len, "failure reason")?),
            _ => {
                return Err(AbiError {
                    what: "entry tag",
                    at: cursor.pos - 9,
                });
            }
        });
    }
    if cursor.pos != buf.len() {
        return Err(AbiError {
            what: "bytes after the last entry",
            at: cursor.pos,
        });
    }
    Ok(entries)
}
