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
