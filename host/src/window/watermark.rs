//! Watermarks: per source partition (a Kafka partition, a file), the latest
//! event time seen minus the allowed out-of-orderness; the pipeline's is
//! the lowest over the partitions that are not idle, and never goes back.
//!
//! A source may say which partitions still have records to deliver (a
//! consumer working through a backlog reads some partitions long before
//! others): such a partition is never idle, and one not heard from yet
//! holds the watermark where it is. Until a source that can say has said,
//! the watermark does not move.

use std::time::{Duration, Instant};

/// A partition, numbered by the window operator.
pub type PartitionId = u32;

#[derive(Debug, Clone, Copy, Default)]
struct Partition {
    /// The latest event time, once the partition has had an event.
    latest: Option<i64>,
    last_seen: Option<Instant>,
    /// The source has records of it still to deliver.
    behind: bool,
}

/// The watermarks of one pipeline's window.
#[derive(Debug)]
pub struct Watermarks {
    delay: i64,
    idle: Duration,
    partitions: Vec<Option<Partition>>,
    current: i64,
    /// When idleness was last looked at.
    looked: Option<Instant>,
    /// The source has yet to say which partitions are behind.
    held: bool,
}

impl Watermarks {
    /// No partition seen yet: the watermark is at the start of time.
    pub fn new(delay: i64, idle: Duration) -> Self {
        Watermarks {
            delay,
            idle,
            partitions: Vec::new(),
            current: i64::MIN,
            looked: None,
            held: false,
        }
    }

    /// The source cannot say yet which partitions are behind: the
    /// watermark stays where it is until [`Watermarks::behind`].
    pub fn hold(&mut self) {
        self.held = true;
    }

    /// The source has records still to deliver of exactly the partitions
    /// `behind`, as seen `now`; gives the watermark after it.
    pub fn behind(&mut self, behind: &[PartitionId], now: Instant) -> i64 {
        self.held = false;
        for partition in self.partitions.iter_mut().flatten() {
            partition.behind = false;
        }
        for &id in behind {
            self.entry(id).behind = true;
        }
        self.recompute(now);
        self.current
    }

    fn entry(&mut self, partition: PartitionId) -> &mut Partition {
        let at = partition as usize;
        if at >= self.partitions.len() {
            self.partitions.resize(at + 1, None);
        }
        self.partitions[at].get_or_insert_with(Partition::default)
    }

    /// The latest event time of `partition`, if it had an event, and how
    /// long before `now` it had its last one.
    pub fn latest(&self, partition: PartitionId, now: Instant) -> Option<(i64, Duration)> {
        let entry = self.partitions.get(partition as usize).copied().flatten()?;
        let quiet = entry
            .last_seen
            .map_or(self.idle, |seen| now.saturating_duration_since(seen));
        Some((entry.latest?, quiet))
    }

    /// Back to a checkpoint's: watermark `current`, and of each partition
    /// in `latest` its latest event time and how long it had been quiet
    /// (as of `now`: the time the process was down does not count).
    pub fn restore(&mut self, current: i64, latest: &[(PartitionId, i64, Duration)], now: Instant) {
        self.current = self.current.max(current);
        for &(partition, time, quiet) in latest {
            let entry = self.entry(partition);
            entry.latest = Some(entry.latest.map_or(time, |t| t.max(time)));
            entry.last_seen = now.checked_sub(quiet);
        }
    }

    /// The watermark: every event earlier than it is expected to have come.
    pub fn current(&self) -> i64 {
        self.current
    }

    /// `partition` has an event at `time`, seen `now`; gives the watermark
    /// after it.
    #[inline]
    pub fn observe(&mut self, partition: PartitionId, time: i64, now: Instant) -> i64 {
        let entry = self.entry(partition);
        entry.last_seen = Some(now);
        let raised = entry.latest.is_none_or(|latest| time > latest);
        if raised {
            entry.latest = Some(time);
        }
        // Only a later event, or time making a partition idle, can raise
        // the mark (records of one batch share their `now`).
        if raised || self.looked != Some(now) {
            self.recompute(now);
        }
        self.current
    }

    /// Counts every partition seen so far as heard from `now`.
    pub fn touch(&mut self, now: Instant) {
        for partition in self.partitions.iter_mut().flatten() {
            partition.last_seen = Some(now);
        }
    }

    /// Raises the watermark to `watermark`, if higher; gives it after.
    pub fn raise(&mut self, watermark: i64) -> i64 {
        if !self.held {
            self.current = self.current.max(watermark);
        }
        self.current
    }

    /// Whether no partition is active as of `now`: each is quiet for the
    /// idle timeout and not behind (and the source has said so).
    pub fn is_idle(&self, now: Instant) -> bool {
        !self.held
            && self.partitions.iter().flatten().all(|partition| {
                !partition.behind
                    && (partition.last_seen)
                        .is_none_or(|seen| now.saturating_duration_since(seen) >= self.idle)
            })
    }

    /// Time passed with no records: idle partitions stop holding the
    /// watermark back. Gives the watermark after it.
    pub fn tick(&mut self, now: Instant) -> i64 {
        self.recompute(now);
        self.current
    }

    fn recompute(&mut self, now: Instant) {
        self.looked = Some(now);
        if self.held {
            return;
        }
        let mut lowest_active: Option<i64> = None;
        let mut highest: Option<i64> = None;
        for partition in self.partitions.iter().flatten() {
            let recent = (partition.last_seen)
                .is_some_and(|seen| now.saturating_duration_since(seen) < self.idle);
            let active = partition.behind || recent;
            let Some(latest) = partition.latest else {
                if active {
                    // Records are coming from a partition not heard from.
                    return;
                }
                continue;
            };
            highest = Some(highest.map_or(latest, |h| h.max(latest)));
            if active {
                lowest_active = Some(lowest_active.map_or(latest, |l| l.min(latest)));
            }
        }
        // Every partition idle: the latest event anywhere sets the mark.
        if let Some(latest) = lowest_active.or(highest) {
            self.current = self.current.max(latest.saturating_sub(self.delay));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_active_partition_holds_the_watermark_until_it_idles() {
        let start = Instant::now();
        let idle = Duration::from_secs(5);
        let mut marks = Watermarks::new(100, idle);
        assert_eq!(marks.observe(0, 1_000, start), 900);
        assert_eq!(marks.observe(1, 500, start), 900, "never goes back");
        assert_eq!(
            marks.observe(0, 3_000, start),
            900,
            "partition 1 holds it at 500 - 100, below 900"
        );
        assert_eq!(marks.observe(1, 2_000, start), 1_900);
        // Partition 1 goes quiet: after the idle timeout only 0 counts.
        assert_eq!(marks.tick(start + Duration::from_secs(1)), 1_900);
        assert_eq!(
            marks.observe(0, 4_000, start + idle + Duration::from_secs(1)),
            3_900
        );
        // Both quiet: the latest event anywhere.
        assert_eq!(marks.tick(start + Duration::from_secs(60)), 3_900);
    }

    #[test]
    fn a_partition_the_source_is_behind_on_holds_the_watermark_however_quiet() {
        let start = Instant::now();
        let idle = Duration::from_secs(5);
        let mut marks = Watermarks::new(100, idle);
        marks.hold();
        assert_eq!(
            marks.observe(0, 10_000, start),
            i64::MIN,
            "nothing said yet"
        );
        // The source has records of partition 1, not heard from yet.
        assert_eq!(marks.behind(&[1], start), i64::MIN, "held by partition 1");
        let much_later = start + idle * 10;
        assert_eq!(marks.tick(much_later), i64::MIN, "behind is never idle");
        assert_eq!(marks.observe(1, 2_000, much_later), 1_900, "not late");
        // Caught up, partition 1 goes idle like any other.
        assert_eq!(marks.behind(&[], much_later), 1_900);
        assert_eq!(marks.tick(much_later + idle), 9_900);
    }
}
