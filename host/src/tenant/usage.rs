//! What each tenant uses right now, for `weir status` and the admin API:
//! its pipelines' plugin memory (against its `memory_mb_total`), the CPU
//! and plugin-thread time the scheduler charged it, and its pipelines'
//! records and faults, summed.

use serde::{Deserialize, Serialize};

use crate::engine::Scheduler;
use crate::pipeline::{PipelineStatus, RunState};

use super::TenantConfig;

/// A tenant's usage at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TenantUsage {
    /// Its name.
    pub name: String,
    /// Its share of the plugin threads.
    pub weight: u32,
    /// Its pipelines on this worker.
    pub pipelines: Vec<String>,
    /// Those of them quarantined.
    pub quarantined: Vec<String>,
    /// Linear memory and tables its plugin instances hold now, in bytes.
    pub memory_bytes: u64,
    /// Its `memory_mb_total`, in bytes, if it has one.
    pub memory_budget_bytes: Option<u64>,
    /// CPU time its plugins ran, in milliseconds.
    pub cpu_ms: f64,
    /// Time its batches held a plugin thread (what its weight shares), in
    /// milliseconds.
    pub plugin_thread_ms: f64,
    /// Records its pipelines read.
    pub records_in: u64,
    /// Records its pipelines wrote.
    pub records_out: u64,
    /// Records its pipelines dead-lettered.
    pub records_dead_lettered: u64,
    /// Plugin faults (traps, limit hits, deadlines) in its pipelines.
    pub plugin_faults: u64,
}

/// The usage of each of `tenants`, from the statuses of the worker's
/// pipelines and what `scheduler` charged.
pub fn usage(
    tenants: &[TenantConfig],
    pipelines: &[PipelineStatus],
    scheduler: &Scheduler,
) -> Vec<TenantUsage> {
    let charged = scheduler.usage();
    tenants
        .iter()
        .map(|tenant| {
            let name = tenant.name.get_ref();
            let party = tenant.party();
            let mut usage = TenantUsage {
                name: name.clone(),
                weight: party.weight(),
                memory_budget_bytes: (tenant.memory_mb_total.as_ref())
                    .map(|mb| mb.get_ref().saturating_mul(1 << 20)),
                ..TenantUsage::default()
            };
            if let Some(used) = charged.get(name) {
                usage.cpu_ms = used.cpu.as_secs_f64() * 1e3;
                usage.plugin_thread_ms = used.held.as_secs_f64() * 1e3;
            }
            for status in pipelines
                .iter()
                .filter(|status| status.tenant.as_deref() == Some(name))
            {
                usage.pipelines.push(status.name.clone());
                if status.state == RunState::Quarantined {
                    usage.quarantined.push(status.name.clone());
                }
                let counters = &status.counters;
                usage.memory_bytes += status.plugin_memory_bytes;
                usage.records_in += counters.records_in;
                usage.records_out += counters.records_out;
                usage.records_dead_lettered += counters.records_dead_lettered;
                usage.plugin_faults += counters.plugin_faults;
            }
            usage
        })
        .collect()
}

/// One line of `weir status` for `usage`.
pub fn describe(usage: &TenantUsage) -> String {
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    let budget = usage
        .memory_budget_bytes
        .map_or(String::new(), |b| format!(" of {:.0} MiB", mib(b)));
    let quarantined = if usage.quarantined.is_empty() {
        String::new()
    } else {
        format!(", quarantined: {}", usage.quarantined.join(", "))
    };
    format!(
        "tenant `{}` (weight {}): {} pipeline(s){quarantined}; plugin memory {:.1} MiB{budget}; CPU {:.2} s, plugin threads held {:.2} s; {} records in, {} out, {} dead-lettered, {} plugin faults",
        usage.name,
        usage.weight,
        usage.pipelines.len(),
        mib(usage.memory_bytes),
        usage.cpu_ms / 1e3,
        usage.plugin_thread_ms / 1e3,
        usage.records_in,
        usage.records_out,
        usage.records_dead_lettered,
        usage.plugin_faults,
    )
}
