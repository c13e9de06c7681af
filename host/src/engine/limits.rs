//! What one plugin instance may use, and the resource limiter that holds a
//! store to it: one memory budget for the whole instance (every linear memory
//! and table of every core instance inside the component together), and caps
//! on how many of each it may create.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The memory held by every instance started with it (a pipeline's, across
/// its lanes and versions), in bytes: linear memories and tables.
#[derive(Clone, Debug, Default)]
pub struct MemoryMeter(Arc<AtomicU64>);

impl MemoryMeter {
    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Two meters are equal when they are the same meter.
impl PartialEq for MemoryMeter {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for MemoryMeter {}

/// WASI capabilities a plugin may use beyond the sandbox's, each granted
/// explicitly (`limits.wasi`); none by default. Without `monotonic-clock` or
/// `wall-clock`, reading that clock (or sleeping) stops the plugin with
/// its own error; without `random`, randomness is a deterministic stream
/// seeded from the plugin's content hash (so a replay gives the same
/// outputs), with it, the host's entropy. Files and sockets are never
/// granted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WasiGrants {
    /// `monotonic-clock`: the monotonic clock and sleeps.
    pub monotonic_clock: bool,
    /// `wall-clock`: the time of day.
    pub wall_clock: bool,
    /// `random`: the host's entropy.
    pub random: bool,
}

impl WasiGrants {
    /// The names `limits.wasi` takes.
    pub const NAMES: [&str; 3] = ["monotonic-clock", "wall-clock", "random"];

    /// The grants `names` ask for; the error names an unknown one.
    pub fn parse(names: &[String]) -> Result<Self, String> {
        let mut grants = WasiGrants::default();
        for name in names {
            match name.as_str() {
                "monotonic-clock" => grants.monotonic_clock = true,
                "wall-clock" => grants.wall_clock = true,
                "random" => grants.random = true,
                other => {
                    return Err(format!(
                        "`limits.wasi` has `{other}`; it may hold {}",
                        Self::NAMES.map(|n| format!("`{n}`")).join(", ")
                    ));
                }
            }
        }
        Ok(grants)
    }
}

/// Per-instance limits; each pipeline sets its own (`[pipeline.limits]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Memory of the whole instance, in bytes: all its linear memories and
    /// tables together.
    pub memory_bytes: u64,
    /// Wall-clock budget for one call into the plugin (one batch, or its
    /// `init`). Host calls (a sleep, a poll) end by it too.
    pub batch_deadline: Duration,
    /// CPU time budget for one call, counted on the thread that runs it:
    /// time the plugin is descheduled (a busy neighbour) or waits in a
    /// host call does not count. `None`: only the deadline bounds a call.
    pub cpu_per_call: Option<Duration>,
    /// Most outputs one input record may have; a record with more is
    /// dead-lettered.
    pub outputs_per_record: u32,
    /// Most bytes of outputs (keys, values, headers, forwarded records) one
    /// batch may turn into; a record whose outputs would pass it is
    /// dead-lettered.
    pub output_bytes_per_batch: u64,
    /// Longest counter name, in bytes.
    pub counter_name_bytes: usize,
    /// Most distinct counter names.
    pub counters: usize,
    /// Longest log line kept, in bytes; longer lines are cut.
    pub log_line_bytes: usize,
    /// Log lines (including stdout and stderr lines) per second; more are
    /// dropped and counted.
    pub log_lines_per_s: u32,
    /// Where the instance's memory is counted, with its pipeline's others.
    pub meter: MemoryMeter,
    /// The WASI capabilities it is granted.
    pub wasi: WasiGrants,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            batch_deadline: Duration::from_secs(5),
            cpu_per_call: None,
            outputs_per_record: 1000,
            output_bytes_per_batch: 64 << 20,
            counter_name_bytes: 128,
            counters: 256,
            log_line_bytes: 4096,
            log_lines_per_s: 100,
            meter: MemoryMeter::default(),
            wasi: WasiGrants::default(),
        }
    }
}

/// Core instances a component may create. A Rust plugin built with
/// `weir-guest` makes a handful (its module, and wit-component's shims).
pub const MAX_INSTANCES: usize = 64;
/// Linear memories per instance.
pub const MAX_MEMORIES: usize = 8;
/// Tables per instance.
pub const MAX_TABLES: usize = 64;
/// Bytes a table element costs the host (a pointer).
const TABLE_ELEMENT_BYTES: usize = std::mem::size_of::<usize>();

/// Holds one store to its memory budget. Growth is counted across every
/// memory and table, so a component cannot multiply the cap by creating
/// many memories each under it.
#[derive(Debug)]
pub(super) struct InstanceBudget {
    cap: u64,
    used: u64,
    meter: MemoryMeter,
    /// Set when a request was refused: what the instance would have had.
    pub(super) exceeded: Option<u64>,
}

impl InstanceBudget {
    pub(super) fn new(cap: u64, meter: MemoryMeter) -> Self {
        InstanceBudget {
            cap,
            used: 0,
            meter,
            exceeded: None,
        }
    }

    /// Bytes the instance holds now.
    #[cfg(test)]
    fn used(&self) -> u64 {
        self.used
    }

    fn grow(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|max| desired > max) {
            // Wasmtime refuses this growth itself; nothing to count.
            return Ok(false);
        }
        let wanted = self
            .used
            .saturating_add(desired.saturating_sub(current) as u64);
        if wanted > self.cap {
            self.exceeded = Some(wanted);
            // Trap rather than fail the grow: a Rust guest would abort with
            // an opaque "memory allocation failed" instead.
            return Err(wasmtime::Error::msg("instance memory cap exceeded"));
        }
        self.meter.0.fetch_add(wanted - self.used, Ordering::Relaxed);
        self.used = wanted;
        Ok(true)
    }
}

impl Drop for InstanceBudget {
    fn drop(&mut self) {
        self.meter.0.fetch_sub(self.used, Ordering::Relaxed);
    }
}

impl wasmtime::ResourceLimiter for InstanceBudget {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grow(current, desired, maximum)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let bytes = |elements: usize| elements.saturating_mul(TABLE_ELEMENT_BYTES);
        self.grow(bytes(current), bytes(desired), maximum.map(bytes))
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

#[cfg(test)]
mod tests {
    use wasmtime::ResourceLimiter as _;

    use super::{InstanceBudget, MemoryMeter};

    #[test]
    fn growth_is_counted_across_memories_and_tables_and_on_the_meter_until_dropped() {
        let meter = MemoryMeter::default();
        let mut budget = InstanceBudget::new(10 << 20, meter.clone());
        // Two memories of 4 MiB each fit; a third does not.
        assert!(budget.memory_growing(0, 4 << 20, None).unwrap());
        assert!(budget.memory_growing(0, 4 << 20, None).unwrap());
        assert!(budget.memory_growing(0, 4 << 20, None).is_err());
        assert_eq!(budget.exceeded, Some(12 << 20));
        // A table of 128 Ki elements is 1 MiB of pointers: still fits.
        assert!(budget.table_growing(0, 128 << 10, None).unwrap());
        assert_eq!(budget.used(), 9 << 20);
        // Growing a memory counts only the growth.
        assert!(budget.memory_growing(4 << 20, 5 << 20, None).unwrap());
        assert!(budget.memory_growing(5 << 20, 6 << 20, None).is_err());
        // The meter holds what the instance holds, with its siblings'.
        let mut sibling = InstanceBudget::new(10 << 20, meter.clone());
        assert!(sibling.memory_growing(0, 1 << 20, None).unwrap());
        assert_eq!(meter.bytes(), 11 << 20);
        drop(budget);
        assert_eq!(meter.bytes(), 1 << 20);
    }

    #[test]
    fn growth_past_a_memory_maximum_is_refused_without_counting() {
        let mut budget = InstanceBudget::new(10 << 20, MemoryMeter::default());
        assert!(!budget.memory_growing(0, 2 << 20, Some(1 << 20)).unwrap());
        assert_eq!(budget.used(), 0);
    }
}
