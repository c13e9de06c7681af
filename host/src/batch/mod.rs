//! The batch: the one noun of the data path. A source packs records into
//! it, a plugin call takes its bytes as they are, later plugins and sinks
//! read its records as views, and the pipeline routes and acknowledges it
//! whole.
//!
//! Its bytes are the `weir:plugin` batch layout (`wit/README.md`): one
//! buffer holding a record count, then per record a fixed header, value,
//! key, topic and headers. Beside the bytes, an index keeps per record where
//! it lies, its route and whether it is a tombstone: what only the host
//! knows. Adding a record allocates nothing per record; reading one parses
//! its fixed header in place.

use std::sync::Arc;

use bytes::Bytes;
use weir_guest::abi::{HeaderIter, RecordParts, RecordView, pack_record, record_at};

use crate::record::{DEFAULT_ROUTE, Record, SourcePosition};

/// Most distinct route names one batch can hold.
pub const MAX_ROUTES: usize = u16::MAX as usize;

/// A batch's route table is full: the record that asked for one more cannot
/// be routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("more than {MAX_ROUTES} distinct route names in one batch")]
pub struct TooManyRoutes;

/// Records packed in the plugin layout, with the host's index of them.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The record count, then the records, in the plugin layout.
    wire: Vec<u8>,
    index: Vec<Slot>,
    /// The route names `Slot::route` points into, from 1.
    routes: Vec<Arc<str>>,
    /// Bytes of keys and values.
    payload: usize,
}

/// Where one record lies, and what only the host knows of it.
#[derive(Debug, Clone, Copy)]
struct Slot {
    at: usize,
    end: usize,
    /// 0: the default route; `n`: `routes[n - 1]`.
    route: u16,
    tombstone: bool,
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::with_capacity(0, 0)
    }

    /// An empty batch with room for `bytes` bytes of records and `records`
    /// records before it grows.
    pub fn with_capacity(bytes: usize, records: usize) -> Self {
        let mut wire = Vec::with_capacity(bytes + 4);
        wire.extend_from_slice(&0u32.to_le_bytes());
        Batch {
            wire,
            index: Vec::with_capacity(records),
            routes: Vec::new(),
            payload: 0,
        }
    }

    /// How many records it holds.
    #[inline]
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether it holds none.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes of its keys and values: what batch sizes are measured in.
    #[inline]
    pub fn payload_bytes(&self) -> usize {
        self.payload
    }

    /// Bytes record `index` holds: its packed bytes and its index entry.
    #[inline]
    pub fn held_bytes_of(&self, index: usize) -> usize {
        let slot = &self.index[index];
        slot.end - slot.at + std::mem::size_of::<Slot>()
    }

    /// The packed records, as a plugin's `process` takes them.
    #[inline]
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }

    /// Empties it, keeping its allocations.
    pub fn clear(&mut self) {
        self.wire.truncate(4);
        self.index.clear();
        self.routes.clear();
        self.payload = 0;
        self.write_count();
    }

    #[inline]
    fn pushed(&mut self, at: usize, route: u16, tombstone: bool, payload: usize) {
        self.index.push(Slot {
            at,
            end: self.wire.len(),
            route,
            tombstone,
        });
        self.payload += payload;
        self.write_count();
    }

    /// Writes the record count at the head of the packed bytes.
    #[inline]
    fn write_count(&mut self) {
        let count = u32::try_from(self.index.len()).unwrap_or(u32::MAX);
        self.wire[..4].copy_from_slice(&count.to_le_bytes());
    }

    /// Appends a record on the default route.
    #[inline]
    pub fn push<'h>(
        &mut self,
        record: RecordParts<'_>,
        headers: impl ExactSizeIterator<Item = (&'h str, &'h [u8])>,
    ) {
        let at = self.wire.len();
        let payload = record.value.len() + record.key.map_or(0, <[u8]>::len);
        pack_record(&mut self.wire, record, headers);
        self.pushed(at, 0, false, payload);
    }

    /// Appends a value with no key, headers or timestamp: a line of a file.
    #[inline]
    pub fn push_value(&mut self, value: &[u8], topic: &str, partition: i32, offset: i64) {
        self.push(
            RecordParts {
                key: None,
                value,
                timestamp: None,
                topic,
                partition,
                offset,
            },
            std::iter::empty(),
        );
    }

    /// Appends an owned record, its route and tombstone mark included.
    pub fn push_record(&mut self, record: &Record) -> Result<(), TooManyRoutes> {
        let route = match &record.route {
            Some(route) => self.route_id(route)?,
            None => 0,
        };
        let at = self.wire.len();
        pack_record(
            &mut self.wire,
            RecordParts {
                key: record.key.as_deref(),
                value: &record.value,
                timestamp: record.timestamp,
                topic: &record.source.topic,
                partition: record.source.partition,
                offset: record.source.offset,
            },
            record.headers.iter().map(|(n, v)| (n.as_str(), &v[..])),
        );
        let payload = record.value.len() + record.key.as_ref().map_or(0, Bytes::len);
        self.pushed(at, route, record.tombstone, payload);
        Ok(())
    }

    /// Appends record `index` of `from` as it is: one copy of its bytes.
    #[inline]
    pub fn push_copy(&mut self, from: &Batch, index: usize) -> Result<(), TooManyRoutes> {
        let slot = from.index[index];
        let route = match slot.route {
            0 => 0,
            id => self.route_id(&from.routes[usize::from(id) - 1])?,
        };
        let at = self.wire.len();
        self.wire.extend_from_slice(&from.wire[slot.at..slot.end]);
        let record = from.get(index);
        let payload = record.value().len() + record.key().map_or(0, <[u8]>::len);
        self.pushed(at, route, slot.tombstone, payload);
        Ok(())
    }

    /// Appends the records of `other`, in order.
    pub fn append(&mut self, other: &Batch) -> Result<(), TooManyRoutes> {
        if self.is_empty() && self.routes.is_empty() {
            self.routes.clone_from(&other.routes);
            self.wire.truncate(4);
            self.wire.extend_from_slice(&other.wire[4..]);
            self.index.extend_from_slice(&other.index);
            self.payload = other.payload;
            self.write_count();
            return Ok(());
        }
        for index in 0..other.len() {
            self.push_copy(other, index)?;
        }
        Ok(())
    }

    /// Takes the last record pushed back off.
    pub fn pop(&mut self) {
        if let Some(slot) = self.index.pop() {
            let record = record_at(&self.wire, slot.at).map(|(record, _)| record);
            let payload = record.map_or(0, |r| r.value().len() + r.key().map_or(0, <[u8]>::len));
            self.payload -= payload;
            self.wire.truncate(slot.at);
            self.write_count();
        }
    }

    /// Sends the last record pushed to `route` (`None`: the default).
    #[inline]
    pub fn route_last(&mut self, route: Option<&str>) -> Result<(), TooManyRoutes> {
        let id = match route {
            Some(route) => self.route_id(route)?,
            None => 0,
        };
        if let Some(slot) = self.index.last_mut() {
            slot.route = id;
        }
        Ok(())
    }

    /// Marks the last record pushed a tombstone (a Kafka message with no
    /// value at all), kept while its value stays empty.
    pub fn mark_last_tombstone(&mut self) {
        if let Some(slot) = self.index.last_mut() {
            slot.tombstone = true;
        }
    }

    #[inline]
    fn route_id(&mut self, route: &str) -> Result<u16, TooManyRoutes> {
        if let Some(at) = self.routes.iter().position(|known| &**known == route) {
            return Ok((at + 1) as u16);
        }
        if self.routes.len() >= MAX_ROUTES {
            return Err(TooManyRoutes);
        }
        self.routes.push(route.into());
        Ok(self.routes.len() as u16)
    }

    /// The route names records of this batch are sent to, besides the
    /// default; [`Batch::route_of`] gives a record's as an index into them.
    pub fn routes(&self) -> &[Arc<str>] {
        &self.routes
    }

    /// Record `index`'s route: 0 for the default, `n` for `routes()[n - 1]`.
    #[inline]
    pub fn route_of(&self, index: usize) -> usize {
        usize::from(self.index[index].route)
    }

    /// Record `index`, borrowed.
    #[inline]
    pub fn get(&self, index: usize) -> RecordRef<'_> {
        let slot = self.index[index];
        // The host packed every byte of the batch itself.
        let (view, end) = record_at(&self.wire, slot.at).expect("a batch the host packed parses");
        RecordRef {
            view,
            packed: &self.wire[slot.at..end],
            route: match slot.route {
                0 => None,
                id => Some(&self.routes[usize::from(id) - 1]),
            },
            tombstone: slot.tombstone,
        }
    }

    /// The records, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = RecordRef<'_>> + '_ {
        (0..self.len()).map(|index| self.get(index))
    }

    /// Record `index` as an owned record (for the rare paths: dead letters).
    pub fn to_record(&self, index: usize) -> Record {
        self.get(index).to_record()
    }
}

/// One record of a batch, borrowed from it.
#[derive(Clone, Copy, Debug)]
pub struct RecordRef<'a> {
    view: RecordView<'a>,
    /// Its bytes in the batch layout.
    packed: &'a [u8],
    route: Option<&'a Arc<str>>,
    tombstone: bool,
}

impl<'a> RecordRef<'a> {
    /// The key, if any.
    #[inline]
    pub fn key(&self) -> Option<&'a [u8]> {
        self.view.key()
    }

    /// The value.
    #[inline]
    pub fn value(&self) -> &'a [u8] {
        self.view.value()
    }

    /// The record in the batch layout (`wit/README.md`), headers included:
    /// what a plugin would be sent for it.
    #[inline]
    pub fn packed(&self) -> &'a [u8] {
        self.packed
    }

    /// Event time, ms since the Unix epoch.
    #[inline]
    pub fn timestamp(&self) -> Option<i64> {
        self.view.timestamp()
    }

    /// Kafka topic, file path or generator name it came from.
    #[inline]
    pub fn topic(&self) -> &'a str {
        self.view.topic()
    }

    /// [`RecordRef::topic`] as its bytes, unchecked: to compare cheaply.
    #[inline]
    pub fn topic_bytes(&self) -> &'a [u8] {
        self.view.topic_bytes()
    }

    /// The partition it came from.
    #[inline]
    pub fn partition(&self) -> i32 {
        self.view.partition()
    }

    /// Its offset there.
    #[inline]
    pub fn offset(&self) -> i64 {
        self.view.offset()
    }

    /// Its headers, in order.
    #[inline]
    pub fn headers(&self) -> HeaderIter<'a> {
        self.view.headers().iter()
    }

    /// How many headers it has.
    #[inline]
    pub fn header_count(&self) -> usize {
        self.view.headers().len()
    }

    /// The named output a plugin routed it to; `None` for the default.
    #[inline]
    pub fn route(&self) -> Option<&'a str> {
        self.route.map(|route| &**route)
    }

    /// The route name as sinks match it: `default` when unset.
    #[inline]
    pub fn route_name(&self) -> &'a str {
        self.route().unwrap_or(DEFAULT_ROUTE)
    }

    /// A Kafka tombstone (no value at all, not an empty one), while its
    /// value stays empty.
    #[inline]
    pub fn is_tombstone(&self) -> bool {
        self.tombstone && self.view.value().is_empty()
    }

    /// Whether it came from a Kafka tombstone, whatever its value is now:
    /// an output a plugin writes for it stays one while its value is empty.
    #[inline]
    pub fn tombstone_mark(&self) -> bool {
        self.tombstone
    }

    /// An owned copy.
    pub fn to_record(&self) -> Record {
        Record {
            key: self.key().map(Bytes::copy_from_slice),
            value: Bytes::copy_from_slice(self.value()),
            headers: self
                .headers()
                .map(|(name, value)| (name.to_owned(), Bytes::copy_from_slice(value)))
                .collect(),
            timestamp: self.timestamp(),
            source: SourcePosition {
                topic: self.topic().into(),
                partition: self.partition(),
                offset: self.offset(),
            },
            route: self.route.cloned(),
            tombstone: self.tombstone,
        }
    }
}

/// Some records of a batch, in order: all of them, or those picked.
#[derive(Clone, Copy)]
pub struct Records<'a> {
    batch: &'a Batch,
    picked: Option<&'a [u32]>,
}

impl<'a> Records<'a> {
    /// Every record of `batch`.
    pub fn all(batch: &'a Batch) -> Self {
        Records {
            batch,
            picked: None,
        }
    }

    /// The records of `batch` at `picked`, in that order.
    pub fn picked(batch: &'a Batch, picked: &'a [u32]) -> Self {
        Records {
            batch,
            picked: Some(picked),
        }
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.picked.map_or(self.batch.len(), <[u32]>::len)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The records, in order.
    pub fn iter(&self) -> impl Iterator<Item = RecordRef<'a>> + 'a {
        let (batch, picked) = (self.batch, self.picked);
        let count = self.len();
        (0..count).map(move |at| match picked {
            Some(picked) => batch.get(picked[at] as usize),
            None => batch.get(at),
        })
    }
}

impl From<&[Record]> for Batch {
    /// Packs owned records (routes past the batch's limit fall back to the
    /// default: owned records come from tests and dead letters, which
    /// carry their route in a header).
    fn from(records: &[Record]) -> Self {
        let mut batch = Batch::new();
        for record in records {
            if batch.push_record(record).is_err() {
                let mut unrouted = record.clone();
                unrouted.route = None;
                let _ = batch.push_record(&unrouted);
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(value: &str, offset: i64) -> Record {
        Record::new(
            value.to_owned(),
            SourcePosition {
                topic: "in".into(),
                partition: 2,
                offset,
            },
        )
    }

    #[test]
    fn records_round_trip_with_routes_tombstones_and_headers() {
        let mut keyed = record("v1", 1);
        keyed.key = Some(Bytes::from_static(b"k"));
        keyed.headers.push(("h".into(), Bytes::from_static(b"x")));
        keyed.route = Some("audit".into());
        let mut tombstone = record("", 2);
        tombstone.tombstone = true;
        let batch = Batch::from(&[keyed.clone(), tombstone.clone()][..]);
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.to_record(0), keyed);
        assert_eq!(batch.to_record(1), tombstone);
        assert!(batch.get(1).is_tombstone());
        assert_eq!(batch.get(0).route_name(), "audit");
        assert_eq!(batch.get(1).route_name(), DEFAULT_ROUTE);
        assert_eq!(batch.route_of(0), 1);
        assert_eq!(batch.payload_bytes(), 3);

        let mut copied = Batch::new();
        copied.push_copy(&batch, 1).unwrap();
        copied.push_copy(&batch, 0).unwrap();
        assert_eq!(copied.to_record(0), tombstone);
        assert_eq!(copied.to_record(1), keyed);
        let reader = weir_guest::abi::BatchReader::new(copied.wire()).unwrap();
        assert_eq!(reader.remaining(), 2);
    }

    #[test]
    fn append_keeps_order_and_routes() {
        let mut routed = record("b", 2);
        routed.route = Some("x".into());
        let first = Batch::from(&[record("a", 1)][..]);
        let second = Batch::from(&[routed][..]);
        let mut all = Batch::new();
        all.append(&second).unwrap();
        all.append(&first).unwrap();
        let values: Vec<_> = all.iter().map(|r| (r.value(), r.route_name())).collect();
        assert_eq!(values, [(&b"b"[..], "x"), (&b"a"[..], "default")]);
    }
}
