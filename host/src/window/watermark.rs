//! Watermarks: per source partition (a Kafka partition, a file), the latest
//! event time seen minus the allowed out-of-orderness; the pipeline's is
//! the lowest over the partitions that are not idle, and never goes back.

use std::time::{Duration, Instant};

/// A partition, numbered by the window operator.
pub type PartitionId = u32;

#[derive(Debug, Clone, Copy)]
struct Partition {
    latest: i64,
    last_seen: Instant,
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
        let at = partition as usize;
        if at >= self.partitions.len() {
            self.partitions.resize(at + 1, None);
        }
        let entry = self.partitions[at].get_or_insert(Partition {
            latest: time,
            last_seen: now,
        });
        entry.last_seen = now;
        let raised = time > entry.latest;
        if raised {
            entry.latest = time;
        }
        // Only a later event, or time making a partition idle, can raise
        // the mark (records of one batch share their `now`).
        if raised || self.looked != Some(now) {
            self.recompute(now);
        }
        self.current
    }

    /// Time passed with no records: idle partitions stop holding the
    /// watermark back. Gives the watermark after it.
    pub fn tick(&mut self, now: Instant) -> i64 {
        self.recompute(now);
        self.current
    }

    fn recompute(&mut self, now: Instant) {
        self.looked = Some(now);
        let mut lowest_active: Option<i64> = None;
        let mut highest: Option<i64> = None;
        for partition in self.partitions.iter().flatten() {
            highest = Some(highest.map_or(partition.latest, |h| h.max(partition.latest)));
            if now.saturating_duration_since(partition.last_seen) < self.idle {
                lowest_active =
                    Some(lowest_active.map_or(partition.latest, |l| l.min(partition.latest)));
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
}
