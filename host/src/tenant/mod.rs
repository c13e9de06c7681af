//! Tenants: who owns which pipelines, and what their plugins may use and
//! reach. A `[[tenant]]` sets limits its pipelines' plugin instances take
//! by default and may not pass, a memory budget for all of them together,
//! and the Kafka topics and routes its pipelines may write; a
//! `[[pipeline]]` names its tenant (`tenant = "..."`). All of it is checked
//! when the file loads: a pipeline that asks for more than its tenant
//! grants, or writes where its tenant may not, is refused at its line, so
//! nothing is found out mid-run.
//!
//! A tenant's `weight` is its share of the plugin threads against other busy
//! tenants (the engine's `Scheduler` enforces it at run time).
//!
//! A pipeline with no tenant belongs to none: only its own `limits` bound
//! it, and it has a share of weight 1 of its own.

pub mod usage;

use serde::Deserialize;
use toml::Spanned;

use crate::config::LimitsConfig;
use crate::engine::Party;
use crate::record::DEFAULT_ROUTE;

/// One `[[tenant]]`.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Unique name, which its pipelines give as `tenant`.
    pub name: Spanned<String>,
    /// Limits of each plugin instance of the tenant's pipelines: what a
    /// pipeline's `[pipeline.limits]` leaves unset, and the most it may set.
    pub limits: Option<Spanned<toml::Table>>,
    /// Linear memory of all the tenant's plugin instances together, in
    /// MiB: the sum over its pipelines of lanes x plugins x `memory_mb`
    /// may not pass it.
    pub memory_mb_total: Option<Spanned<u64>>,
    /// Kafka topics its sinks and dead letters may write: names, or
    /// prefixes ending in `*` (`"payments.*"`). Absent: any.
    pub topics: Option<Spanned<Vec<String>>>,
    /// Output routes its sinks may take (`default` always). Absent: any.
    pub routes: Option<Spanned<Vec<String>>>,
    /// Its share of the plugin threads against other busy tenants (1 to
    /// [`MAX_WEIGHT`]; default 1): a tenant of weight 3 gets three times
    /// the thread time of one of weight 1 while both have batches waiting.
    pub weight: Option<Spanned<u32>>,
}

/// The largest tenant weight.
pub const MAX_WEIGHT: u32 = 1000;

impl TenantConfig {
    /// Who its pipelines' batches are run for on the plugin threads.
    pub fn party(&self) -> Party {
        Party::tenant(
            self.name.get_ref(),
            self.weight.as_ref().map_or(1, |w| *w.get_ref()),
        )
    }

    /// Its limits: the defaults overlaid with the keys it sets.
    pub fn limits(&self) -> Result<LimitsConfig, String> {
        let table = self
            .limits
            .as_ref()
            .map(|t| t.get_ref().clone())
            .unwrap_or_default();
        LimitsConfig::deserialize(toml::Value::Table(table)).map_err(|err| err.message().to_owned())
    }

    /// Whether its pipelines may write Kafka topic `topic`.
    pub fn allows_topic(&self, topic: &str) -> bool {
        self.topics.as_ref().is_none_or(|allowed| {
            allowed
                .get_ref()
                .iter()
                .any(|pattern| match pattern.strip_suffix('*') {
                    Some(prefix) => topic.starts_with(prefix),
                    None => topic == pattern,
                })
        })
    }

    /// Whether its pipelines' sinks may take route `route`.
    pub fn allows_route(&self, route: &str) -> bool {
        route == DEFAULT_ROUTE
            || (self.routes.as_ref())
                .is_none_or(|allowed| allowed.get_ref().iter().any(|r| r == route))
    }
}

/// A pipeline's limits under its tenant: the tenant's, overlaid with the
/// keys the pipeline's own `limits` table sets (`own`), each of which may
/// not pass the tenant's. The error names the key.
pub fn limits_under(
    tenant: &TenantConfig,
    own: Option<&toml::Table>,
) -> Result<LimitsConfig, String> {
    let ceiling = tenant.limits()?;
    let mut merged = toml::Table::try_from(&ceiling).map_err(|err| err.to_string())?;
    let ceilings = merged.clone();
    for (key, value) in own.into_iter().flatten() {
        if key == "wasi" {
            let granted = &ceiling.wasi;
            let asked: Vec<String> = (value.as_array().into_iter().flatten())
                .filter_map(|name| name.as_str().map(str::to_owned))
                .collect();
            crate::engine::WasiGrants::parse(&asked)?;
            if let Some(extra) = asked.iter().find(|name| !granted.contains(name)) {
                return Err(format!(
                    "`limits.wasi` asks for `{extra}`, which tenant `{}` does not grant (it grants: [{}])",
                    tenant.name.get_ref(),
                    granted.join(", ")
                ));
            }
        }
        if let (Some(asked), Some(granted)) = (
            value.as_integer(),
            ceilings.get(key).and_then(toml::Value::as_integer),
        ) {
            let looser = match key.as_str() {
                // A longer fault window counts more faults: stricter.
                "fault_window_s" => asked < granted,
                // No CPU budget (0) is the loosest.
                "cpu_ms_per_batch" => granted > 0 && (asked == 0 || asked > granted),
                _ => asked > granted,
            };
            if looser {
                return Err(format!(
                    "`limits.{key} = {asked}` is looser than what tenant `{}` grants ({granted})",
                    tenant.name.get_ref()
                ));
            }
        }
        merged.insert(key.clone(), value.clone());
    }
    LimitsConfig::deserialize(toml::Value::Table(merged)).map_err(|err| err.message().to_owned())
}
