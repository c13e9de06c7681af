//! Checkpoints: the source positions a pipeline has handled and the window
//! state that reflects exactly them, committed together with the outputs
//! they led to, so that a restarted worker goes on from them as if it had
//! never stopped.
//!
//! Where a checkpoint lives is chosen by the sinks, not by a store of its
//! own: a sink that can commit its writes and a checkpoint in one
//! transaction ([`crate::sink::Sink::keeps_checkpoints`]: PostgreSQL) keeps
//! them. So the outputs, the positions and the state can never disagree
//! after a crash, with no two-phase protocol between two systems, and a
//! worker on another machine finds them where the outputs are.
//!
//! An exactly-once Kafka pipeline (all its sinks Kafka) has no such sink:
//! its transaction, which commits the outputs with the offsets, keeps the
//! checkpoints too, the window state in a changelog topic
//! ([`crate::kafka::changelog`]).

use crate::record::SourcePosition;
use crate::source::Checkpoint;

/// What a checkpoint holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Per source partition: the last position handled and its window.
    pub partitions: Vec<PartitionState>,
    /// The source ended (a file read to its end) and everything from it is
    /// out: a new run of a source that cannot replay starts over.
    pub finished: bool,
}

/// One source partition's part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionState {
    /// The last position handled.
    pub position: SourcePosition,
    /// Its window's state (see [`crate::window::WindowImage`]), as of
    /// exactly that position; `None` without a window.
    pub window: Option<Vec<u8>>,
}

impl Snapshot {
    /// The positions it holds.
    pub fn positions(&self) -> Checkpoint {
        Checkpoint {
            positions: self.partitions.iter().map(|p| p.position.clone()).collect(),
        }
    }

    /// Where a source resumes from: `None` if this checkpoint is of a run
    /// that finished and `replays` is false (a file is read again from
    /// its start by a new run).
    pub fn resume(self, replays: bool) -> Option<Snapshot> {
        (!self.finished || replays).then_some(self)
    }
}

/// This worker process, as the owner of the partitions it claims: another
/// worker (or this one's next run) that claims them fences it off.
pub fn worker_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        format!("{host}/{}/{:08x}", std::process::id(), fastrand::u32(..))
    })
}

/// Claims source partitions where checkpoints are kept: from then on only
/// this worker's checkpoints of them are taken (an earlier owner that
/// still writes is fenced off), and each comes with its last checkpoint.
pub trait Claimer: Send + Sync {
    /// Claims `partitions` (topic, partition); gives the last checkpoint of
    /// each that has one. Blocking.
    fn claim(&self, partitions: &[(String, i32)]) -> Result<Vec<PartitionState>, String>;
}

/// A partition's claim: its generation, and its window state until the
/// window takes it.
type Claim = (u64, Option<Vec<u8>>);

/// The source partitions a worker owns, as its source is assigned them
/// (a Kafka rebalance), with the state each was claimed with, for its
/// window to take up.
pub struct Claims {
    claimer: Box<dyn Claimer>,
    owned: std::sync::Mutex<ClaimsState>,
}

#[derive(Default)]
struct ClaimsState {
    /// Bumped at every claim: a window of an earlier claim is stale.
    generation: u64,
    /// Per partition: the claim's generation and its window state, until
    /// the window takes it.
    partitions: std::collections::HashMap<(String, i32), Claim>,
}

impl Claims {
    /// Claims with `claimer`.
    pub fn new(claimer: Box<dyn Claimer>) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Claims {
            claimer,
            owned: std::sync::Mutex::new(ClaimsState::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClaimsState> {
        self.owned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The source was assigned `partitions`: claims them (trying again,
    /// with a warning, while the store is away: the source waits) and
    /// gives the last offset handled of each that has a checkpoint.
    pub fn assign(
        &self,
        partitions: &[(String, i32)],
    ) -> std::collections::HashMap<(String, i32), i64> {
        let mut backoff = std::time::Duration::from_millis(100);
        let claimed = loop {
            match self.claimer.claim(partitions) {
                Ok(claimed) => break claimed,
                Err(err) => {
                    tracing::warn!(%err, "Cannot claim the assigned partitions' checkpoints yet; trying again.");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                }
            }
        };
        let mut owned = self.lock();
        owned.generation += 1;
        let generation = owned.generation;
        for key in partitions {
            owned.partitions.insert(key.clone(), (generation, None));
        }
        let mut offsets = std::collections::HashMap::new();
        for state in claimed {
            let key = (state.position.topic.to_string(), state.position.partition);
            offsets.insert(key.clone(), state.position.offset);
            owned.partitions.insert(key, (generation, state.window));
        }
        offsets
    }

    /// The source gave `partitions` up.
    pub fn revoke(&self, partitions: &[(String, i32)]) {
        let mut owned = self.lock();
        for key in partitions {
            owned.partitions.remove(key);
        }
    }

    /// The claim of `partition` this worker holds: its generation, and the
    /// window state it came with (taken: given once).
    pub fn take(&self, topic: &str, partition: i32) -> Option<(u64, Option<Vec<u8>>)> {
        let mut owned = self.lock();
        let (generation, state) = owned.partitions.get_mut(&(topic.to_owned(), partition))?;
        Some((*generation, state.take()))
    }

    /// Whether this worker holds `partition`.
    pub fn owns(&self, topic: &str, partition: i32) -> bool {
        self.lock()
            .partitions
            .contains_key(&(topic.to_owned(), partition))
    }
}
