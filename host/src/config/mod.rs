//! The pipeline file: TOML with one or more `[[pipeline]]` tables, each a
//! source, a chain of plugins, sinks and a dead-letter destination.
//!
//! Every error names the file and line at fault: syntax errors and unknown
//! keys through `toml`'s spans, and later checks (a missing `.wasm`, two
//! pipelines with one name) through the spans kept on the values.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let file = weir::config::PipelineFile::load("examples/quickstart.toml".as_ref())?;
//! for pipeline in &file.pipelines {
//!     println!("{}: {} plugin(s)", pipeline.name.get_ref(), pipeline.plugins.len());
//! }
//! # Ok(()) }
//! ```

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::engine::{Limits, WasiGrants};
use crate::record::DEFAULT_ROUTE;
use crate::tenant::TenantConfig;

/// A config error, with the place it was found.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ConfigError {
    /// The pipeline file.
    pub file: PathBuf,
    /// 1-based line of the bad key or value.
    pub line: usize,
    /// What is wrong, quoting the bad value.
    pub message: String,
}

/// A parsed and checked pipeline file.
#[derive(Debug, Clone)]
pub struct PipelineFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its pipelines, in file order.
    pub pipelines: Vec<PipelineConfig>,
    /// Where compiled plugins are cached (`cache_dir`), relative paths
    /// resolved against the file's folder.
    pub cache_dir: Option<PathBuf>,
    /// How many threads run plugin batches for all its pipelines
    /// (`plugin_threads`); `None`: `WEIR_PLUGIN_THREADS`, else the cores.
    pub plugin_threads: Option<usize>,
    /// The admin API, if the file turns it on (`[admin]`).
    pub admin: Option<AdminConfig>,
    /// The tenants its pipelines belong to (`[[tenant]]`).
    pub tenants: Vec<TenantConfig>,
    source: String,
}

/// The admin API's settings (`[admin]`).
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Where it listens, `host:port`.
    pub address: Spanned<String>,
    /// The bearer token every request must carry; `WEIR_ADMIN_TOKEN` when
    /// absent. Without either, the API only listens on a loopback address.
    pub token: Option<String>,
    /// Largest component an upload may carry, in MiB.
    #[serde(default = "default_max_upload_mb")]
    pub max_upload_mb: u64,
    /// Where uploaded versions are kept (content-addressed) with the record
    /// of which one each plugin serves, so a restart comes back on them.
    /// Relative to the pipeline file; `.weir-state` beside it by default.
    pub state_dir: Option<PathBuf>,
}

/// The default admin address of `weir run --admin` and the CLI's commands.
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:9870";

fn default_max_upload_mb() -> u64 {
    64
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    cache_dir: Option<PathBuf>,
    plugin_threads: Option<usize>,
    admin: Option<AdminConfig>,
    #[serde(default)]
    tenant: Vec<TenantConfig>,
    #[serde(default)]
    pipeline: Vec<PipelineConfig>,
}

/// One pipeline: source → plugins → sinks, with a dead-letter sink.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Unique name, used in logs, metrics and dead-letter headers.
    pub name: Spanned<String>,
    /// The `[[tenant]]` it belongs to, whose budgets and grants bound it.
    pub tenant: Option<Spanned<String>>,
    /// Where records come from.
    pub source: Spanned<SourceConfig>,
    /// How records are grouped into batches for the plugins.
    #[serde(default)]
    pub batch: BatchConfig,
    /// Lanes: how many batches are processed at once, each lane with its
    /// own plugin instances. Records of one Kafka partition stay in one
    /// lane, in order; a file's batches are spread over the lanes and
    /// written in input order. Default: `WEIR_PARALLELISM` if set, else
    /// the cores available.
    pub parallelism: Option<Spanned<usize>>,
    /// What each plugin instance of this pipeline may use.
    pub limits: Option<Spanned<LimitsConfig>>,
    /// The plugin chain, applied in order; may be empty.
    #[serde(default, rename = "plugin")]
    pub plugins: Vec<PluginConfig>,
    /// Where outputs go; each sink takes the routes it lists.
    #[serde(default, rename = "sink")]
    pub sinks: Vec<Spanned<SinkConfig>>,
    /// Where failed and malformed records go, with the reason in headers.
    /// Without one, they go to stderr as JSON envelopes: never silently lost.
    pub dead_letter: Option<Spanned<SinkConfig>>,
    /// The delivery guarantee.
    #[serde(default)]
    pub delivery: Delivery,
    /// How often sinks are flushed and source positions committed (or, with
    /// exactly-once, transactions committed), in milliseconds. Shorter means
    /// less replayed after a crash and fresher read-committed output; longer
    /// means fewer, larger commits.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// How many earlier versions of each plugin stay compiled and checked
    /// for an instant rollback.
    #[serde(default = "default_keep_versions")]
    pub keep_versions: usize,
    /// An event-time window over the plugins' outputs: its results go to
    /// the sinks instead of the records.
    pub window: Option<Spanned<crate::window::WindowConfig>>,
}

fn default_keep_versions() -> usize {
    3
}

/// The environment variable that sets how many lanes a pipeline without
/// `parallelism` runs.
pub const PARALLELISM_VAR: &str = "WEIR_PARALLELISM";

/// Most lanes a pipeline may run.
pub const MAX_PARALLELISM: usize = 256;

impl PipelineConfig {
    /// How many lanes it runs: `parallelism`, else `WEIR_PARALLELISM`,
    /// else the cores available.
    pub fn lanes(&self) -> usize {
        let from_env = || std::env::var(PARALLELISM_VAR).ok()?.parse().ok();
        match &self.parallelism {
            Some(lanes) => *lanes.get_ref(),
            None => from_env()
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from)),
        }
        .clamp(1, MAX_PARALLELISM)
    }

    /// Who its batches are run for on the plugin threads: its tenant, or
    /// itself if it has none.
    pub fn party(&self, file: &PipelineFile) -> crate::engine::Party {
        let tenant = (self.tenant.as_ref())
            .and_then(|wanted| file.tenants.iter().find(|t| t.name.get_ref() == wanted.get_ref()));
        match tenant {
            Some(tenant) => tenant.party(),
            None => crate::engine::Party::pipeline(self.name.get_ref()),
        }
    }

    /// Its limits, the defaults where the file sets none.
    pub fn limits(&self) -> LimitsConfig {
        self.limits
            .as_ref()
            .map(|limits| limits.get_ref().clone())
            .unwrap_or_default()
    }
}

fn default_commit_interval_ms() -> u64 {
    1000
}

/// What a pipeline promises about each input record.
#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Every input's outputs are written at least once: positions are
    /// committed only after every sink has acknowledged them.
    #[default]
    AtLeastOnce,
    /// Kafka to Kafka only: outputs, dead letters and the consumed offsets
    /// commit in one transaction; read-committed readers see each output
    /// exactly once.
    ExactlyOnce,
}

/// Where records come from.
#[derive(Debug, Deserialize, Clone)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// A file, read to its end; the run ends when it is drained.
    File {
        /// Path, relative to the pipeline file.
        path: PathBuf,
        /// `json` checks each line is JSON (malformed lines go to the
        /// dead-letter sink with their line number); `lines` passes lines as
        /// they are.
        #[serde(default)]
        format: LineFormat,
    },
    /// Standard input, line by line, until it closes.
    Stdin {
        /// As for `file`.
        #[serde(default)]
        format: LineFormat,
    },
    /// Seeded, realistic events keyed by user.
    Generator(crate::source::generator::GeneratorConfig),
    /// Kafka topics, through one consumer group.
    Kafka(crate::source::kafka::KafkaSourceConfig),
}

/// A tenant's grant list as a message shows it.
fn granted(list: &Option<Spanned<Vec<String>>>) -> String {
    list.as_ref()
        .map_or_else(|| "any".into(), |list| list.get_ref().join(", "))
}

/// How a line-based source checks its lines.
#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LineFormat {
    /// Each line must be a JSON document.
    #[default]
    Json,
    /// Lines are passed through unchecked.
    Lines,
}

/// How records are grouped into batches.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Most records per batch.
    pub max_records: usize,
    /// Most bytes (keys and values) per batch; a batch closes once it
    /// reaches this, so large records make smaller batches.
    pub max_bytes: usize,
    /// Longest a partial batch waits for more records, in milliseconds.
    pub linger_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_records: 1024,
            max_bytes: 4 << 20,
            linger_ms: 50,
        }
    }
}

impl BatchConfig {
    /// Whether a batch of `records` records and `bytes` bytes is full.
    pub fn is_full(&self, records: usize, bytes: usize) -> bool {
        records >= self.max_records || bytes >= self.max_bytes
    }

    /// The linger as a duration.
    pub fn linger(&self) -> Duration {
        Duration::from_millis(self.linger_ms)
    }
}

/// What each plugin instance of a pipeline may use, and how many faults the
/// pipeline takes before it is quarantined.
#[derive(Debug, Deserialize, serde::Serialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Memory of a plugin instance, in MiB: all its linear memories and
    /// tables together.
    pub memory_mb: u64,
    /// Wall-clock budget for one plugin call (one batch, or `init`), in
    /// milliseconds; sleeps and other host calls end by it too.
    pub batch_timeout_ms: u64,
    /// CPU time budget for one plugin call, in milliseconds, counted on the
    /// thread that runs it: a plugin descheduled by a busy neighbour, or
    /// waiting in a host call, is not charged for it. 0: none (only
    /// `batch_timeout_ms`).
    pub cpu_ms_per_batch: u64,
    /// Most outputs one input record may have; a record with more is
    /// dead-lettered.
    pub outputs_per_record: u32,
    /// Most output bytes one batch may turn into, in MiB; a record whose
    /// outputs would pass it is dead-lettered.
    pub output_mb_per_batch: u64,
    /// Longest counter name a plugin may use, in bytes.
    pub counter_name_bytes: usize,
    /// Most distinct counters a plugin may create.
    pub counters: usize,
    /// Longest plugin log line kept, in bytes; longer ones are cut.
    pub log_line_bytes: usize,
    /// Plugin log lines (and stdout/stderr lines) per second; the rest are
    /// dropped and counted.
    pub log_lines_per_s: u32,
    /// Plugin faults (traps, limits, deadlines) within `fault_window_s`
    /// that quarantine the pipeline: it stops reading and says why.
    pub faults_before_quarantine: u32,
    /// The window over which faults are counted, in seconds.
    pub fault_window_s: u64,
    /// Longest input record (a line, or a Kafka message's key and value),
    /// in bytes; longer ones are dead-lettered with their first 64 KiB and
    /// their position, never held whole.
    pub max_record_bytes: usize,
    /// WASI capabilities granted beyond the sandbox's: `monotonic-clock`
    /// (and sleeps), `wall-clock`, `random` (the host's entropy rather than
    /// a stream seeded from the plugin). None by default.
    pub wasi: Vec<String>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let limits = Limits::default();
        LimitsConfig {
            memory_mb: limits.memory_bytes >> 20,
            batch_timeout_ms: limits.batch_deadline.as_millis() as u64,
            cpu_ms_per_batch: 0,
            outputs_per_record: limits.outputs_per_record,
            output_mb_per_batch: limits.output_bytes_per_batch >> 20,
            counter_name_bytes: limits.counter_name_bytes,
            counters: limits.counters,
            log_line_bytes: limits.log_line_bytes,
            log_lines_per_s: limits.log_lines_per_s,
            faults_before_quarantine: 10,
            fault_window_s: 60,
            max_record_bytes: 4 << 20,
            wasi: Vec::new(),
        }
    }
}

impl LimitsConfig {
    /// Largest `memory_mb`: 16 GiB.
    const MAX_MEMORY_MB: u64 = 16 << 10;
    /// Longest `batch_timeout_ms`: one hour.
    const MAX_TIMEOUT_MS: u64 = 3_600_000;
    /// Largest `output_mb_per_batch`: 4 GiB.
    const MAX_OUTPUT_MB: u64 = 4 << 10;

    /// What is out of range, naming the key and the bad value.
    fn check(&self) -> Result<(), String> {
        let range = |key: &str, value: u64, min: u64, max: u64| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(format!(
                    "`limits.{key}` is {value}; it must be between {min} and {max}"
                ))
            }
        };
        range("memory_mb", self.memory_mb, 1, Self::MAX_MEMORY_MB)?;
        WasiGrants::parse(&self.wasi)?;
        // The deadline is enforced by a 10 ms tick: shorter budgets would
        // fail healthy batches by chance.
        range(
            "batch_timeout_ms",
            self.batch_timeout_ms,
            10,
            Self::MAX_TIMEOUT_MS,
        )?;
        range(
            "outputs_per_record",
            self.outputs_per_record.into(),
            1,
            u32::MAX.into(),
        )?;
        range(
            "output_mb_per_batch",
            self.output_mb_per_batch,
            1,
            Self::MAX_OUTPUT_MB,
        )?;
        range(
            "counter_name_bytes",
            self.counter_name_bytes as u64,
            1,
            1 << 16,
        )?;
        range("counters", self.counters as u64, 0, 1 << 16)?;
        range("log_line_bytes", self.log_line_bytes as u64, 16, 1 << 20)?;
        range(
            "faults_before_quarantine",
            self.faults_before_quarantine.into(),
            1,
            u32::MAX.into(),
        )?;
        range("fault_window_s", self.fault_window_s, 1, 7 * 24 * 3600)?;
        range(
            "cpu_ms_per_batch",
            self.cpu_ms_per_batch,
            0,
            self.batch_timeout_ms,
        )?;
        range(
            "max_record_bytes",
            self.max_record_bytes as u64,
            1 << 10,
            1 << 30,
        )?;
        Ok(())
    }

    /// As the engine takes them.
    pub fn to_limits(&self) -> Limits {
        Limits {
            memory_bytes: self.memory_mb << 20,
            batch_deadline: Duration::from_millis(self.batch_timeout_ms),
            cpu_per_call: (self.cpu_ms_per_batch > 0)
                .then(|| Duration::from_millis(self.cpu_ms_per_batch)),
            outputs_per_record: self.outputs_per_record,
            output_bytes_per_batch: self.output_mb_per_batch << 20,
            counter_name_bytes: self.counter_name_bytes,
            counters: self.counters,
            log_line_bytes: self.log_line_bytes,
            log_lines_per_s: self.log_lines_per_s,
            meter: Default::default(),
            // Checked when the file loads.
            wasi: WasiGrants::parse(&self.wasi).unwrap_or_default(),
        }
    }

    /// The window over which faults count towards quarantine.
    pub fn fault_window(&self) -> Duration {
        Duration::from_secs(self.fault_window_s)
    }
}

/// One plugin of the chain.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// A label for logs; the plugin's own name by default.
    pub name: Option<String>,
    /// A built component, relative to the pipeline file.
    pub wasm: Option<Spanned<PathBuf>>,
    /// A plugin crate, built for `wasm32-wasip2` before the run.
    #[serde(rename = "crate")]
    pub crate_dir: Option<Spanned<PathBuf>>,
    /// The plugin's settings, passed to its `init` as JSON.
    #[serde(default)]
    pub config: toml::Table,
    /// The source topics whose records this plugin processes; all when
    /// empty. Records of other topics pass it unchanged.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Whether a new `.wasm` at the plugin's path (a `wasm = ...` file, or
    /// the artifact `weir plugin build` writes for a `crate = ...`) is
    /// swapped in while the pipeline runs. On by default.
    #[serde(default = "default_true")]
    pub watch: bool,
}

fn default_true() -> bool {
    true
}

/// Where a plugin comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginSource {
    /// A `.wasm` file.
    Wasm(PathBuf),
    /// A crate to build.
    Crate(PathBuf),
}

impl PluginConfig {
    /// The plugin's settings as the JSON object `init` receives. TOML dates
    /// and times become their RFC 3339 text (`1979-05-27T07:32:00Z`).
    pub fn config_json(&self) -> String {
        let table = toml::Value::Table(self.config.clone());
        toml_to_json(&table).to_string()
    }
}

/// A sink: where outputs (or dead letters) are written.
#[derive(Debug, Deserialize, Clone)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    /// Standard output.
    Stdout {
        /// The routes this sink takes.
        #[serde(default = "default_routes")]
        routes: Vec<String>,
        /// How records are written: `value` by default, `envelope` for a
        /// dead-letter sink.
        format: Option<RecordFormat>,
    },
    /// Kafka topics, through an idempotent (or, exactly-once, transactional)
    /// producer.
    Kafka(crate::sink::kafka::KafkaSinkConfig),
    /// A PostgreSQL table, upserted; keeps the pipeline's checkpoints.
    Postgres(crate::sink::postgres::PostgresSinkConfig),
    /// Parquet files in a folder, rolled; keeps the pipeline's checkpoints.
    Parquet(crate::sink::parquet::ParquetSinkConfig),
    /// A file, one record per line.
    File {
        /// Path, relative to the pipeline file.
        path: PathBuf,
        /// `append` keeps what is there (the default when the source can
        /// replay, Kafka: a restarted worker must not erase output whose
        /// offsets are committed); `truncate` starts empty (the default for
        /// files, stdin and generators, whose runs start over).
        mode: Option<FileMode>,
        /// The routes this sink takes.
        #[serde(default = "default_routes")]
        routes: Vec<String>,
        /// How records are written: `value` by default, `envelope` for a
        /// dead-letter sink.
        format: Option<RecordFormat>,
    },
}

/// Whether a file sink keeps what the file holds.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileMode {
    /// Write after what is there.
    Append,
    /// Empty the file first.
    Truncate,
}

impl SourceConfig {
    /// Whether records can be read again after a restart (a committed
    /// position to resume from).
    pub fn can_replay(&self) -> bool {
        matches!(self, SourceConfig::Kafka(_))
    }

    /// Whether the source's partitions are assigned to a worker, and move
    /// between workers (Kafka), rather than all read by one.
    pub fn assigns_partitions(&self) -> bool {
        matches!(self, SourceConfig::Kafka(_))
    }
}

/// The routes a sink takes when it names none.
pub fn default_routes() -> Vec<String> {
    vec![DEFAULT_ROUTE.to_owned()]
}

impl SinkConfig {
    /// How records are written, given the default for this use.
    pub fn format_or(&self, default: RecordFormat) -> RecordFormat {
        match self {
            SinkConfig::Stdout { format, .. } | SinkConfig::File { format, .. } => {
                format.unwrap_or(default)
            }
            SinkConfig::Kafka(_) | SinkConfig::Postgres(_) | SinkConfig::Parquet(_) => default,
        }
    }

    /// The routes this sink takes.
    pub fn routes(&self) -> &[String] {
        match self {
            SinkConfig::Stdout { routes, .. } | SinkConfig::File { routes, .. } => routes,
            SinkConfig::Kafka(kafka) => &kafka.routes,
            SinkConfig::Postgres(postgres) => &postgres.routes,
            SinkConfig::Parquet(parquet) => &parquet.routes,
        }
    }
}

/// How a sink writes a record.
#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RecordFormat {
    /// The value alone, one per line.
    #[default]
    Value,
    /// A JSON object with key, value, headers, timestamp and source
    /// position: the dead-letter sink's default.
    Envelope,
}

impl PipelineFile {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let source = std::fs::read_to_string(path).map_err(|err| ConfigError {
            file: path.to_owned(),
            line: 0,
            message: format!("cannot read the pipeline file: {err}"),
        })?;
        Self::parse(path, source)
    }

    /// Parses `source` as if read from `path`.
    pub fn parse(path: &Path, source: String) -> Result<Self, ConfigError> {
        let raw: RawFile = toml::from_str(&source).map_err(|err| ConfigError {
            file: path.to_owned(),
            line: err.span().map_or(0, |span| line_of(&source, span.start)),
            message: err.message().trim().to_owned(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut file = PipelineFile {
            path: path.to_owned(),
            cache_dir: raw.cache_dir.map(|dir| base.join(dir)),
            plugin_threads: raw.plugin_threads.map(|threads| threads.clamp(1, 1024)),
            admin: raw.admin.map(|mut admin| {
                admin.state_dir = Some(
                    base.join(
                        admin
                            .state_dir
                            .take()
                            .unwrap_or_else(|| PathBuf::from(".weir-state")),
                    ),
                );
                admin
            }),
            pipelines: raw.pipeline,
            tenants: raw.tenant,
            source,
        };
        file.apply_tenants()?;
        file.check()?;
        file.resolve_paths();
        file.check_paths()?;
        Ok(file)
    }

    /// Serves the admin API on `address`: `[admin]`'s settings with this
    /// address, or the defaults if the file has no `[admin]`.
    pub fn enable_admin(&mut self, address: String) {
        let base = self.path.parent().unwrap_or(Path::new(".")).to_owned();
        let admin = self.admin.get_or_insert_with(|| AdminConfig {
            address: Spanned::new(0..0, String::new()),
            token: None,
            max_upload_mb: default_max_upload_mb(),
            state_dir: Some(base.join(".weir-state")),
        });
        admin.address = Spanned::new(0..0, address);
    }

    /// An error at the byte offset `at` of the file.
    pub fn error_at(&self, at: usize, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.path.clone(),
            line: line_of(&self.source, at),
            message: message.into(),
        }
    }

    /// Gives each pipeline of a tenant its limits under the tenant's (see
    /// [`crate::tenant`]) and checks what the tenant grants: its memory
    /// budget, topics and routes.
    fn apply_tenants(&mut self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for tenant in &self.tenants {
            let name = &tenant.name;
            if name.get_ref().is_empty() || !names.insert(name.get_ref().as_str()) {
                return Err(self.error_at(
                    name.span().start,
                    format!(
                        "tenant names must be unique and not empty: `{}`",
                        name.get_ref()
                    ),
                ));
            }
            if let Some(weight) = &tenant.weight
                && !(1..=crate::tenant::MAX_WEIGHT).contains(weight.get_ref())
            {
                return Err(self.error_at(
                    weight.span().start,
                    format!(
                        "tenant `{}`: `weight` must be 1 to {}, not {}",
                        name.get_ref(),
                        crate::tenant::MAX_WEIGHT,
                        weight.get_ref()
                    ),
                ));
            }
            if let Err(message) = tenant.limits() {
                let at = tenant
                    .limits
                    .as_ref()
                    .map_or(name.span().start, |l| l.span().start);
                return Err(self.error_at(at, format!("tenant `{}`: {message}", name.get_ref())));
            }
        }
        // The keys each pipeline's own `[pipeline.limits]` sets (the parsed
        // limits have every key, defaults included).
        let raw: toml::Table = toml::from_str(&self.source).unwrap_or_default();
        let raw_pipelines = raw.get("pipeline").and_then(toml::Value::as_array);
        let mut resolved = Vec::new();
        for (index, pipeline) in self.pipelines.iter().enumerate() {
            let Some(wanted) = &pipeline.tenant else {
                continue;
            };
            let name = pipeline.name.get_ref();
            let Some(tenant) = self
                .tenants
                .iter()
                .find(|t| t.name.get_ref() == wanted.get_ref())
            else {
                return Err(self.error_at(
                    wanted.span().start,
                    format!(
                        "pipeline `{name}`: no `[[tenant]]` is named `{}`",
                        wanted.get_ref()
                    ),
                ));
            };
            let own = (raw_pipelines.and_then(|all| all.get(index)))
                .and_then(|raw| raw.get("limits"))
                .and_then(toml::Value::as_table);
            let at = (pipeline.limits.as_ref()).map_or(wanted.span(), |l| l.span());
            let limits = crate::tenant::limits_under(tenant, own).map_err(|message| {
                self.error_at(at.start, format!("pipeline `{name}`: {message}"))
            })?;
            resolved.push((index, Spanned::new(at, limits)));
            self.check_grants(pipeline, tenant)?;
        }
        for (index, limits) in resolved {
            self.pipelines[index].limits = Some(limits);
        }
        for tenant in &self.tenants {
            let Some(budget) = &tenant.memory_mb_total else {
                continue;
            };
            let mut total = 0u64;
            let mut parts = Vec::new();
            let members = (self.pipelines.iter()).filter(|p| {
                p.tenant
                    .as_ref()
                    .is_some_and(|t| t.get_ref() == tenant.name.get_ref())
            });
            for pipeline in members {
                let lanes = pipeline.lanes() as u64;
                let plugins = pipeline.plugins.len() as u64
                    + (pipeline.window.as_ref()).map_or(0, |w| {
                        let aggregates = &w.get_ref().aggregates;
                        aggregates.iter().filter(|a| a.function.is_none()).count() as u64
                    });
                let memory = pipeline.limits().memory_mb;
                total = total.saturating_add(lanes * plugins * memory);
                parts.push(format!(
                    "`{}`: {lanes} lane(s) x {plugins} plugin(s) x {memory} MiB",
                    pipeline.name.get_ref()
                ));
            }
            if total > *budget.get_ref() {
                return Err(self.error_at(
                    budget.span().start,
                    format!(
                        "tenant `{}`: its plugins may use up to {total} MiB ({}), over its \
                         `memory_mb_total` of {} MiB; lower their `memory_mb` or `parallelism`",
                        tenant.name.get_ref(),
                        parts.join(", "),
                        budget.get_ref()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Refuses a pipeline whose sinks write a topic, or take a route, its
    /// tenant does not grant.
    fn check_grants(
        &self,
        pipeline: &PipelineConfig,
        tenant: &TenantConfig,
    ) -> Result<(), ConfigError> {
        let (name, owner) = (pipeline.name.get_ref(), tenant.name.get_ref());
        for sink in pipeline.sinks.iter().chain(&pipeline.dead_letter) {
            let at = sink.span().start;
            if let Some(route) = (sink.get_ref().routes().iter()).find(|r| !tenant.allows_route(r))
            {
                return Err(self.error_at(
                    at,
                    format!(
                        "pipeline `{name}`: tenant `{owner}` may not take route `{route}` \
                         (its `routes` grant: default, {})",
                        granted(&tenant.routes)
                    ),
                ));
            }
            let SinkConfig::Kafka(kafka) = sink.get_ref() else {
                continue;
            };
            let topics = std::iter::once(&kafka.topic).chain(kafka.route_topics.values());
            if let Some(topic) = topics.into_iter().find(|t| !tenant.allows_topic(t)) {
                return Err(self.error_at(
                    at,
                    format!(
                        "pipeline `{name}`: tenant `{owner}` may not write Kafka topic `{topic}` \
                         (its `topics` grant: {})",
                        granted(&tenant.topics)
                    ),
                ));
            }
        }
        if let (SourceConfig::Kafka(kafka), Some(_), Delivery::ExactlyOnce) = (
            pipeline.source.get_ref(),
            &pipeline.window,
            pipeline.delivery,
        ) {
            let state = kafka.changelog(name).topic;
            if !tenant.allows_topic(&state) {
                return Err(self.error_at(
                    pipeline.source.span().start,
                    format!(
                        "pipeline `{name}`: tenant `{owner}` may not write its window state topic \
                         `{state}` (set `state_topic` to one its `topics` grant)"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.pipelines.is_empty() {
            return Err(self.error_at(0, "no `[[pipeline]]` table: nothing to run"));
        }
        let mut names = HashSet::new();
        for pipeline in &self.pipelines {
            let name = &pipeline.name;
            if !names.insert(name.get_ref().as_str()) {
                return Err(self.error_at(
                    name.span().start,
                    format!("two pipelines are named `{}`", name.get_ref()),
                ));
            }
            if name.get_ref().is_empty() {
                return Err(self.error_at(name.span().start, "a pipeline name cannot be empty"));
            }
            if pipeline.sinks.is_empty() {
                return Err(self.error_at(
                    name.span().start,
                    format!("pipeline `{}` has no `[[pipeline.sink]]`", name.get_ref()),
                ));
            }
            if pipeline.batch.max_records == 0 || pipeline.batch.max_bytes == 0 {
                return Err(self.error_at(
                    name.span().start,
                    "`batch.max_records` and `batch.max_bytes` must be at least 1",
                ));
            }
            if let Some(lanes) = &pipeline.parallelism
                && !(1..=MAX_PARALLELISM).contains(lanes.get_ref())
            {
                return Err(self.error_at(
                    lanes.span().start,
                    format!(
                        "pipeline `{}`: `parallelism` is {}; it takes 1 to {MAX_PARALLELISM} lanes",
                        name.get_ref(),
                        lanes.get_ref()
                    ),
                ));
            }
            if pipeline.commit_interval_ms == 0 {
                return Err(
                    self.error_at(name.span().start, "`commit_interval_ms` must be above 0")
                );
            }
            if let Some(limits) = &pipeline.limits {
                limits.get_ref().check().map_err(|message| {
                    self.error_at(
                        limits.span().start,
                        format!("pipeline `{}`: {message}", name.get_ref()),
                    )
                })?;
            }
            for plugin in &pipeline.plugins {
                match (&plugin.wasm, &plugin.crate_dir) {
                    (Some(_), None) | (None, Some(_)) => {}
                    (Some(wasm), Some(_)) => {
                        return Err(self.error_at(
                            wasm.span().start,
                            "a plugin takes `wasm` or `crate`, not both",
                        ));
                    }
                    (None, None) => {
                        return Err(self.error_at(
                            name.span().start,
                            format!(
                                "a plugin of pipeline `{}` has neither `wasm = \"file.wasm\"` nor `crate = \"dir\"`",
                                name.get_ref()
                            ),
                        ));
                    }
                }
            }
            for sink in &pipeline.sinks {
                if sink.get_ref().routes().is_empty() {
                    return Err(self.error_at(
                        sink.span().start,
                        "a sink with `routes = []` would take nothing",
                    ));
                }
            }
            if let Some(window) = &pipeline.window {
                let blame = |message: String| {
                    let message = format!("pipeline `{}`, window: {message}", name.get_ref());
                    self.error_at(window.span().start, message)
                };
                window.get_ref().spec().map_err(blame)?;
            }
            if let SourceConfig::Generator(generator) = pipeline.source.get_ref() {
                generator
                    .check()
                    .map_err(|message| self.error_at(pipeline.source.span().start, message))?;
            }
            self.check_kafka(pipeline)?;
        }
        Ok(())
    }

    fn check_kafka(&self, pipeline: &PipelineConfig) -> Result<(), ConfigError> {
        let name = pipeline.name.get_ref();
        let source_at = pipeline.source.span().start;
        let source = match pipeline.source.get_ref() {
            SourceConfig::Kafka(kafka) => {
                if kafka.topics.is_empty() {
                    return Err(self.error_at(
                        source_at,
                        format!("pipeline `{name}`: the kafka source lists no `topics`"),
                    ));
                }
                if let Some(strategy) = kafka.options.get("partition.assignment.strategy")
                    && strategy.contains("cooperative")
                {
                    return Err(self.error_at(
                        source_at,
                        format!(
                            "pipeline `{name}`: `partition.assignment.strategy = \"{strategy}\"` is \
                             not supported: weir commits a revoked partition's batches before it \
                             lets go, which needs eager rebalancing; use `range` or `roundrobin`"
                        ),
                    ));
                }
                Some(kafka)
            }
            _ => None,
        };
        for plugin in &pipeline.plugins {
            let unknown = plugin
                .topics
                .iter()
                .find(|topic| source.is_none_or(|known| !known.topics.contains(topic)));
            if let Some(topic) = unknown {
                let at = plugin.source().1;
                return Err(self.error_at(
                    at,
                    format!(
                        "plugin `topics` names `{topic}`, which pipeline `{name}` does not consume"
                    ),
                ));
            }
        }
        if pipeline.delivery != Delivery::ExactlyOnce {
            return Ok(());
        }
        let (Some(source), Some(_)) = (source, &pipeline.dead_letter) else {
            return Err(self.error_at(
                pipeline.name.span().start,
                format!(
                    "pipeline `{name}`: `delivery = \"exactly_once\"` needs a kafka source, kafka sinks and a kafka `dead_letter`"
                ),
            ));
        };
        // One transactional producer writes every output and commits the
        // source's offsets: it must reach the source's cluster, and the
        // sinks must agree on how (TLS, SASL).
        let mut first_options: Option<&std::collections::BTreeMap<String, String>> = None;
        for sink in pipeline.sinks.iter().chain(&pipeline.dead_letter) {
            let at = sink.span().start;
            let SinkConfig::Kafka(kafka) = sink.get_ref() else {
                return Err(self.error_at(
                    at,
                    format!(
                        "pipeline `{name}`: `delivery = \"exactly_once\"` needs a kafka source, kafka sinks and a kafka `dead_letter`"
                    ),
                ));
            };
            if !same_cluster(&kafka.brokers, &source.brokers) {
                return Err(self.error_at(
                    at,
                    format!(
                        "pipeline `{name}`: this exactly-once sink writes to `{}`, but the source \
                         reads from `{}`; a transaction commits outputs and consumed offsets \
                         together, so both must be one cluster with the same `brokers`",
                        kafka.brokers, source.brokers
                    ),
                ));
            }
            match first_options {
                None => first_options = Some(&kafka.options),
                Some(first) if *first != kafka.options => {
                    return Err(self.error_at(
                        at,
                        format!(
                            "pipeline `{name}`: this exactly-once sink's `options` differ from \
                             the first kafka sink's; its outputs go through one transactional \
                             producer, so every kafka sink (and the dead letter) must set the same"
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Refuses a file written by two sinks (their lines would tear each
    /// other) or written while a pipeline reads it (it would be destroyed).
    fn check_paths(&self) -> Result<(), ConfigError> {
        let inputs: Vec<(PathBuf, &PipelineConfig)> = self
            .pipelines
            .iter()
            .filter_map(|pipeline| match pipeline.source.get_ref() {
                SourceConfig::File { path, .. } => Some((file_identity(path), pipeline)),
                _ => None,
            })
            .collect();
        let mut written: std::collections::HashMap<PathBuf, usize> = Default::default();
        for pipeline in &self.pipelines {
            for sink in pipeline.sinks.iter().chain(&pipeline.dead_letter) {
                let SinkConfig::File { path, .. } = sink.get_ref() else {
                    continue;
                };
                let at = sink.span().start;
                let identity = file_identity(path);
                if let Some((_, reader)) = inputs.iter().find(|(input, _)| *input == identity) {
                    return Err(self.error_at(
                        at,
                        format!(
                            "this sink writes `{}`, which pipeline `{}` reads (line {}): it would \
                             destroy its own input",
                            path.display(),
                            reader.name.get_ref(),
                            line_of(&self.source, reader.source.span().start)
                        ),
                    ));
                }
                if let Some(other) = written.insert(identity, at) {
                    return Err(self.error_at(
                        at,
                        format!(
                            "this sink writes `{}`, which the sink at line {} writes too: their \
                             lines would tear each other; give each its own file",
                            path.display(),
                            line_of(&self.source, other)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn resolve_paths(&mut self) {
        let base = self.path.parent().unwrap_or(Path::new(".")).to_owned();
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        };
        for pipeline in &mut self.pipelines {
            if let SourceConfig::File { path, .. } = pipeline.source.get_mut() {
                resolve(path);
            }
            if let Some(window) = &mut pipeline.window {
                for aggregate in &mut window.get_mut().aggregates {
                    aggregate.resolve_paths(&base);
                }
            }
            for plugin in &mut pipeline.plugins {
                if let Some(wasm) = &mut plugin.wasm {
                    resolve(wasm.get_mut());
                }
                if let Some(dir) = &mut plugin.crate_dir {
                    resolve(dir.get_mut());
                }
            }
            let sinks = pipeline.sinks.iter_mut().map(Spanned::get_mut);
            for sink in sinks.chain(pipeline.dead_letter.as_mut().map(Spanned::get_mut)) {
                match sink {
                    SinkConfig::File { path, .. } => resolve(path),
                    SinkConfig::Parquet(parquet) => resolve(&mut parquet.path),
                    _ => {}
                }
            }
        }
    }
}

impl PluginConfig {
    /// Where the plugin comes from, and the byte offset to blame for it.
    pub fn source(&self) -> (PluginSource, usize) {
        match (&self.wasm, &self.crate_dir) {
            (Some(wasm), _) => (
                PluginSource::Wasm(wasm.get_ref().clone()),
                wasm.span().start,
            ),
            (None, Some(dir)) => (PluginSource::Crate(dir.get_ref().clone()), dir.span().start),
            // `check` refuses a plugin with neither.
            (None, None) => (PluginSource::Crate(PathBuf::new()), 0),
        }
    }
}

/// What tells two paths to one file apart from paths to two: the real path
/// of the deepest folder that exists, with the rest appended.
fn file_identity(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let parts: Vec<_> = absolute.components().collect();
    for existing in (1..=parts.len()).rev() {
        let prefix: PathBuf = parts[..existing].iter().collect();
        if let Ok(real) = prefix.canonicalize() {
            // What does not exist yet holds no symlinks: `..` is lexical.
            return parts[existing..].iter().fold(real, |mut path, part| {
                match part {
                    std::path::Component::ParentDir => {
                        path.pop();
                    }
                    std::path::Component::CurDir => {}
                    other => path.push(other),
                }
                path
            });
        }
    }
    absolute
}

/// A TOML value as JSON: the same shape, with dates and times as strings.
pub(crate) fn toml_to_json(value: &toml::Value) -> serde_json::Value {
    use serde_json::Value as Json;
    match value {
        toml::Value::String(text) => Json::String(text.clone()),
        toml::Value::Integer(n) => Json::from(*n),
        // NaN and infinities have no JSON form: null, as serde_json writes them.
        toml::Value::Float(x) => serde_json::Number::from_f64(*x).map_or(Json::Null, Json::Number),
        toml::Value::Boolean(b) => Json::Bool(*b),
        toml::Value::Datetime(at) => Json::String(at.to_string()),
        toml::Value::Array(items) => Json::Array(items.iter().map(toml_to_json).collect()),
        toml::Value::Table(table) => Json::Object(
            table
                .iter()
                .map(|(key, value)| (key.clone(), toml_to_json(value)))
                .collect(),
        ),
    }
}

/// Whether two bootstrap lists name the same brokers, in any order.
fn same_cluster(a: &str, b: &str) -> bool {
    let set = |list: &str| -> std::collections::BTreeSet<String> {
        list.split(',')
            .map(|broker| broker.trim().to_ascii_lowercase())
            .filter(|broker| !broker.is_empty())
            .collect()
    };
    set(a) == set(b)
}

/// The 1-based line holding byte `at` of `source`.
fn line_of(source: &str, at: usize) -> usize {
    let at = at.min(source.len());
    source.as_bytes()[..at]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}
