//! A window's state as a checkpoint keeps it: every open window's keys and
//! accumulators (plugin aggregates' states as the plugin's bytes), the
//! watermark and each partition's latest event time, as plain data that
//! serialises ([`WindowImage`]) and comes back into an operator that runs
//! on as if it had never stopped.
//!
//! An image names the window it was taken of ([`fingerprint`]): one taken
//! of another window (other aggregates, key, time field or shape) is
//! refused rather than misread.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::aggregate::Accumulator;
use super::config::{AggregateFn, WindowSpec};
use super::fields::ShortKey;
use super::operator::{Accumulators, Group, GroupKey, Held, KeySessions, Pane, Session};
use super::plugin::{SavedState, StateId};
use super::{WindowKind, WindowOperator};

/// What a window holds, at a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowImage {
    /// The window it was taken of ([`fingerprint`]).
    fingerprint: String,
    watermark: i64,
    /// Each partition's latest event time and how long it had been quiet:
    /// (topic, partition, time, milliseconds).
    partitions: Vec<(String, i32, i64, u64)>,
    arrivals: u64,
    panes: Vec<PaneImage>,
    sessions: Vec<SessionImage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PaneImage {
    start: i64,
    emitted: bool,
    held: Vec<HeldImage>,
    groups: Vec<(Vec<u8>, Vec<SavedAccumulator>)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SessionImage {
    key: Vec<u8>,
    start: i64,
    end: i64,
    emitted: bool,
    pending: bool,
    held: Vec<HeldImage>,
    accumulators: Vec<SavedAccumulator>,
}

/// The lowest offset a window holds of a partition: (topic, partition,
/// offset).
type HeldImage = (String, i32, i64);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum SavedAccumulator {
    BuiltIn(Accumulator),
    Plugin(SavedState),
}

/// Why an image cannot come back.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// It was taken of another window.
    #[error(
        "the checkpointed window state is of another window (its aggregates, key, time field or shape changed): {0}"
    )]
    OtherWindow(String),
    /// Its bytes are not an image.
    #[error("the checkpointed window state cannot be read: {0}")]
    Corrupt(String),
}

/// What of `spec` an image depends on: its shape, key and time fields and
/// aggregates (not its watermark delay, lateness or idle timeout, which
/// may change between runs).
pub fn fingerprint(spec: &WindowSpec) -> String {
    let mut hash = Sha256::new();
    let shape = match spec.kind {
        WindowKind::Tumbling { size } => format!("tumbling {size}"),
        WindowKind::Hopping { size, slide } => format!("hopping {size} {slide}"),
        WindowKind::Session { gap } => format!("session {gap}"),
    };
    hash.update(format!("{shape}\n{:?}\n{:?}\n", spec.key, spec.time));
    for aggregate in &spec.aggregates {
        hash.update(format!(
            "{} {:?} {:?}\n",
            aggregate.name, aggregate.function, aggregate.field
        ));
    }
    let digest = hash.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// `value` (an image, plain data) as bytes.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain data: serialising it cannot fail.
    postcard::to_stdvec(value).unwrap_or_default()
}

/// An image from [`encode`]'s bytes.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, RestoreError> {
    postcard::from_bytes(bytes).map_err(|err| RestoreError::Corrupt(err.to_string()))
}

impl WindowOperator {
    /// Everything the window holds, as of `now` (plugin aggregates fold
    /// what waits for them first).
    pub fn snapshot(&mut self, now: Instant) -> WindowImage {
        // Each plugin aggregate's states, in the order the walk below
        // meets them, saved in one go per aggregate.
        let mut ids: Vec<Vec<StateId>> = vec![Vec::new(); self.spec.aggregates.len()];
        let accumulators = (self.panes.values().flat_map(|p| &p.groups))
            .map(|g| &g.accumulators)
            .chain((self.sessions.iter().flat_map(|k| &k.sessions)).map(|s| &s.accumulators));
        for accumulators in accumulators {
            for (at, accumulator) in accumulators.iter().enumerate() {
                if let Accumulator::Plugin(id) = accumulator {
                    ids[at].push(*id);
                }
            }
        }
        let mut saved: Vec<std::vec::IntoIter<SavedState>> = (ids.iter().enumerate())
            .map(|(at, ids)| match self.results.plugins.get(at) {
                Some(Some(plugin)) if !ids.is_empty() => plugin.lock().save(ids).into_iter(),
                _ => Vec::new().into_iter(),
            })
            .collect();
        let mut save = |accumulators: &Accumulators| -> Vec<SavedAccumulator> {
            (accumulators.iter().enumerate())
                .map(|(at, accumulator)| match accumulator {
                    Accumulator::Plugin(_) => SavedAccumulator::Plugin(
                        saved[at]
                            .next()
                            .unwrap_or_else(|| unreachable!("saved above")),
                    ),
                    built_in => SavedAccumulator::BuiltIn(built_in.clone()),
                })
                .collect()
        };
        let names = &self.partition_names;
        let held = |held: &Held| -> Vec<HeldImage> {
            (held.0.iter())
                .map(|&(id, offset)| {
                    let (topic, partition) = &names[id as usize];
                    (topic.to_string(), *partition, offset)
                })
                .collect()
        };
        let panes = (self.panes.iter())
            .map(|(&start, pane)| PaneImage {
                start,
                emitted: pane.emitted,
                held: held(&pane.held),
                groups: (pane.groups.iter())
                    .map(|g| (g.key.get().to_vec(), save(&g.accumulators)))
                    .collect(),
            })
            .collect();
        let sessions = (self.sessions.iter())
            .flat_map(|key| key.sessions.iter().map(move |s| (&key.key, s)))
            .map(|(key, s)| SessionImage {
                key: key.to_vec(),
                start: s.start,
                end: s.end,
                emitted: s.emitted,
                pending: s.pending,
                held: held(&s.held),
                accumulators: save(&s.accumulators),
            })
            .collect();
        let partitions = (names.iter().enumerate())
            .filter_map(|(id, (topic, partition))| {
                let (latest, quiet) = self.watermarks.latest(id as u32, now)?;
                let quiet = u64::try_from(quiet.as_millis()).unwrap_or(u64::MAX);
                Some((topic.to_string(), *partition, latest, quiet))
            })
            .collect();
        WindowImage {
            fingerprint: fingerprint(&self.spec),
            watermark: self.watermarks.current(),
            partitions,
            arrivals: self.arrivals,
            panes,
            sessions,
        }
    }

    /// Takes back what `image` held, into an operator that holds nothing
    /// yet, as of `now`.
    pub fn restore(&mut self, image: WindowImage, now: Instant) -> Result<(), RestoreError> {
        let expected = fingerprint(&self.spec);
        if image.fingerprint != expected {
            return Err(RestoreError::OtherWindow(format!(
                "state of window {}, this window is {expected}",
                image.fingerprint
            )));
        }
        let latest: Vec<_> = (image.partitions.iter())
            .map(|(topic, partition, time, quiet)| {
                let quiet = Duration::from_millis(*quiet);
                (self.partition(topic, *partition), *time, quiet)
            })
            .collect();
        self.watermarks.restore(image.watermark, &latest, now);
        self.arrivals = image.arrivals;
        let count = self.spec.aggregates.len();
        for pane in image.panes {
            let mut restored = Pane {
                emitted: pane.emitted,
                held: self.restore_held(&pane.held),
                ..Pane::default()
            };
            for (key, saved) in pane.groups {
                let hash = self.reader.hash(&key);
                let accumulators = self.accumulators(hash, saved, count)?;
                let at = restored.groups.len() as u32;
                let groups = &restored.groups;
                restored
                    .index
                    .insert_unique(hash, at, |&at| groups[at as usize].hash);
                restored.groups.push(Group {
                    hash,
                    key: GroupKey::new(ShortKey::new(&key), &key),
                    accumulators,
                });
            }
            self.panes.insert(pane.start, restored);
        }
        let lateness = self.spec.allowed_lateness;
        for session in image.sessions {
            let hash = self.reader.hash(&session.key);
            let accumulators = self.accumulators(hash, session.accumulators, count)?;
            let held = self.restore_held(&session.held);
            let deadline = match session.emitted && !session.pending {
                true => session.end.saturating_add(lateness),
                false => session.end,
            };
            let key: Box<[u8]> = session.key.into();
            self.deadlines
                .insert((deadline, key.clone(), session.start));
            let restored = Session {
                start: session.start,
                end: session.end,
                accumulators,
                held,
                emitted: session.emitted,
                pending: session.pending,
            };
            (self.sessions)
                .entry(hash, |s| s.key == key, |s| s.hash)
                .or_insert_with(|| KeySessions {
                    hash,
                    key,
                    sessions: Vec::new(),
                })
                .into_mut()
                .sessions
                .push(restored);
        }
        self.next_due = self.first_due();
        Ok(())
    }

    /// When the first window is due to fire or be forgotten.
    fn first_due(&self) -> i64 {
        match self.spec.kind {
            WindowKind::Tumbling { size } | WindowKind::Hopping { size, .. } => {
                let lateness = self.spec.allowed_lateness;
                (self.panes.iter())
                    .map(|(start, pane)| {
                        let end = start.saturating_add(size);
                        match pane.emitted {
                            true => end.saturating_add(lateness),
                            false => end,
                        }
                    })
                    .min()
                    .unwrap_or(i64::MAX)
            }
            WindowKind::Session { .. } => self.deadlines.first().map_or(i64::MAX, |d| d.0),
        }
    }

    fn restore_held(&mut self, images: &[HeldImage]) -> Held {
        let mut held = Held::default();
        for (topic, partition, offset) in images {
            let id = self.partition(topic, *partition);
            held.note(id, *offset);
        }
        held
    }

    /// A group's accumulators from what was saved of them (`count`
    /// aggregates).
    fn accumulators(
        &mut self,
        hash: u64,
        saved: Vec<SavedAccumulator>,
        count: usize,
    ) -> Result<Accumulators, RestoreError> {
        if saved.len() != count {
            return Err(RestoreError::Corrupt(format!(
                "a group has {} aggregates, the window {count}",
                saved.len()
            )));
        }
        (saved.into_iter().zip(&self.spec.aggregates).enumerate())
            .map(|(at, (saved, spec))| match (saved, spec.function) {
                (SavedAccumulator::Plugin(state), AggregateFn::Plugin) => {
                    match self.results.plugins.get(at) {
                        Some(Some(plugin)) => {
                            Ok(Accumulator::Plugin(plugin.lock().restore(hash, state)))
                        }
                        _ => Err(RestoreError::Corrupt(
                            "a plugin aggregate has no plugin".into(),
                        )),
                    }
                }
                (SavedAccumulator::BuiltIn(accumulator), function)
                    if function != AggregateFn::Plugin =>
                {
                    Ok(accumulator)
                }
                _ => Err(RestoreError::Corrupt(format!(
                    "aggregate `{}` is saved as another kind",
                    spec.name
                ))),
            })
            .collect()
    }
}
