//! The `weir` command: argument parsing, logging set-up, and the
//! subcommands (`run`, `check`, `plugin build`, `plugin new`, `produce`, and
//! the admin API's client: `status`, `deploy`, `rollback`, `pause`,
//! `resume`), each a thin layer over the library.

/// `print!`/`println!` to stdout or stderr that never panic: a reader that
/// went away or a full disk must not turn a finished run into a crash
/// (exit 101) or hide its real outcome.
macro_rules! say {
    (stdout, $($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
    (stderr, $($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
    (stderr_partial, $($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stderr = std::io::stderr();
        let _ = write!(stderr, $($arg)*);
        let _ = stderr.flush();
    }};
}

mod admin;
mod check;
mod produce;
mod run;
mod scaffold;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Stream processing with sandboxed WebAssembly plugins.
#[derive(Debug, Parser)]
#[command(name = "weir", version, about)]
pub struct Cli {
    /// Log filter (`error`, `warn`, `info`, `debug`, or tracing directives).
    #[arg(long, global = true, env = "WEIR_LOG", default_value = "info")]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every pipeline of a pipeline file until its sources are drained
    /// (or Ctrl-C), then print a summary.
    Run {
        /// The pipeline file (TOML).
        file: PathBuf,
        /// Do not show the live records/s line on a terminal.
        #[arg(long)]
        no_progress: bool,
        /// Serve the admin API on this `host:port` (overrides `[admin]`'s
        /// address; turns it on if the file has no `[admin]`).
        #[arg(long, value_name = "ADDRESS")]
        admin: Option<String>,
    },
    /// Show a running worker's pipelines: state, lanes, plugin versions
    /// (with hashes) per lane, and counters.
    Status {
        /// Only this pipeline.
        pipeline: Option<String>,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: admin::AdminArgs,
    },
    /// Upload a `.wasm` to a running worker and swap it in, at a batch
    /// boundary in every lane; refused (with the reason) if it does not
    /// load or start, and the current version keeps serving.
    Deploy {
        /// The pipeline.
        pipeline: String,
        /// The component to deploy.
        wasm: PathBuf,
        /// Which plugin of the chain, from 1.
        #[arg(long, default_value_t = 1)]
        plugin: usize,
        /// Run it in the shadow of the serving version instead: on the same
        /// batches, outputs compared and discarded (`weir status` shows how
        /// many differ) until `weir promote` or `weir discard`.
        #[arg(long, conflicts_with = "canary")]
        shadow: bool,
        /// Serve it as a canary judged on its first N records: it is rolled
        /// back automatically if more than `--max-failure-rate` of them fail.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        canary: Option<u64>,
        /// The share of a canary's records that may fail (0 to 1).
        #[arg(long, value_name = "RATE", requires = "canary", default_value_t = crate::pipeline::CanaryRule::DEFAULT_MAX_FAILURE_RATE)]
        max_failure_rate: f64,
        #[command(flatten)]
        admin: admin::AdminArgs,
    },
    /// The shadow's version serves from the next batch on, in every lane.
    Promote {
        /// The pipeline.
        pipeline: String,
        /// Which plugin of the chain, from 1.
        #[arg(long, default_value_t = 1)]
        plugin: usize,
        #[command(flatten)]
        admin: admin::AdminArgs,
    },
    /// Stop the shadow and show what it found.
    Discard {
        /// The pipeline.
        pipeline: String,
        /// Which plugin of the chain, from 1.
        #[arg(long, default_value_t = 1)]
        plugin: usize,
        #[command(flatten)]
        admin: admin::AdminArgs,
    },
    /// Swap a kept earlier version back in: the previous one, or `--to`
    /// the one whose hash starts with HASH. Nothing is compiled.
    Rollback {
        /// The pipeline.
        pipeline: String,
        /// Which plugin of the chain, from 1.
        #[arg(long, default_value_t = 1)]
        plugin: usize,
        /// The start of the version's hash (as `weir status` shows it).
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        admin: admin::AdminArgs,
    },
    /// Stop reading a pipeline's source (what was read is finished and
    /// committed).
    Pause {
        /// The pipeline.
        pipeline: String,
        #[command(flatten)]
        admin: admin::AdminArgs,
    },
    /// Read again after `weir pause`.
    Resume {
        /// The pipeline.
        pipeline: String,
        #[command(flatten)]
        admin: admin::AdminArgs,
    },
    /// Check a pipeline file and start its plugins with their config,
    /// without reading or writing any record.
    Check {
        /// The pipeline file (TOML).
        file: PathBuf,
    },
    /// Build and create plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Produce generated events (click-stream, payments, logs) to a Kafka
    /// topic.
    Produce {
        /// Bootstrap servers, `host:port[,host:port...]`.
        #[arg(long, env = "WEIR_BROKERS", default_value = "127.0.0.1:9092")]
        brokers: String,
        /// The topic to produce to.
        #[arg(long)]
        topic: String,
        /// Which events.
        #[arg(long, value_enum, default_value = "payments")]
        kind: KindArg,
        /// How many events; endless (until Ctrl-C) when absent.
        #[arg(long)]
        count: Option<u64>,
        /// Events per second; as fast as possible when absent.
        #[arg(long)]
        rate: Option<f64>,
        /// Same seed, same events.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// How many distinct users (keys).
        #[arg(long, default_value_t = 1000)]
        users: u32,
        /// Share (0.0–1.0) of events deliberately cut into invalid JSON.
        #[arg(long, default_value_t = 0.0)]
        malformed: f64,
        /// Partitions of the topic, if it has to be created.
        #[arg(long, default_value_t = 6)]
        partitions: i32,
        /// A librdkafka setting, `key=value` (TLS, SASL...); repeatable.
        #[arg(short = 'X', value_parser = parse_option)]
        option: Vec<(String, String)>,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum KindArg {
    Clickstream,
    Payments,
    Logs,
}

fn parse_option(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{text}` is not key=value"))
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Build a plugin crate for wasm32-wasip2, check it is a weir plugin,
    /// and precompile it into the cache.
    Build {
        /// The plugin crate's folder.
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Create a new plugin crate that builds and passes its own tests.
    New {
        /// The crate name (letters, digits, `-` and `_`).
        name: String,
        /// Where to create it; `./NAME` by default.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The weir-guest SDK folder to depend on; this weir's own by default.
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
}

/// Runs the command line; the binary's whole `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|err| {
        say!(stderr, "weir: ignoring --log {:?}: {err}", cli.log);
        EnvFilter::new("info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();

    let result = match cli.command {
        Command::Run {
            file,
            no_progress,
            admin,
        } => run::run(
            &file,
            !no_progress && std::io::stderr().is_terminal(),
            admin,
        ),
        Command::Status {
            pipeline,
            json,
            admin,
        } => admin::status(admin, pipeline.as_deref(), json),
        Command::Deploy {
            pipeline,
            wasm,
            plugin,
            shadow,
            canary,
            max_failure_rate,
            admin,
        } => {
            let how = match (shadow, canary) {
                (true, _) => admin::DeployAs::Shadow,
                (false, Some(records)) => admin::DeployAs::Canary {
                    records,
                    max_failure_rate,
                },
                (false, None) => admin::DeployAs::Serving,
            };
            admin::deploy(admin, &pipeline, plugin, &wasm, how)
        }
        Command::Promote {
            pipeline,
            plugin,
            admin,
        } => admin::end_shadow(admin, &pipeline, plugin, true),
        Command::Discard {
            pipeline,
            plugin,
            admin,
        } => admin::end_shadow(admin, &pipeline, plugin, false),
        Command::Rollback {
            pipeline,
            plugin,
            to,
            admin,
        } => admin::rollback(admin, &pipeline, plugin, to.as_deref()),
        Command::Pause { pipeline, admin } => admin::pause(admin, &pipeline, true),
        Command::Resume { pipeline, admin } => admin::pause(admin, &pipeline, false),
        Command::Check { file } => check::check(&file),
        Command::Plugin(PluginCommand::Build { dir }) => check::build_plugin(&dir),
        Command::Plugin(PluginCommand::New { name, dir, sdk }) => {
            scaffold::new_plugin(&name, dir, sdk)
        }
        Command::Produce {
            brokers,
            topic,
            kind,
            count,
            rate,
            seed,
            users,
            malformed,
            partitions,
            option,
        } => produce::produce(produce::ProduceArgs {
            connection: crate::kafka::KafkaConnection {
                brokers,
                options: option.into_iter().collect(),
            },
            topic,
            generator: crate::source::generator::GeneratorConfig {
                kind: match kind {
                    KindArg::Clickstream => crate::source::generator::EventKind::Clickstream,
                    KindArg::Payments => crate::source::generator::EventKind::Payments,
                    KindArg::Logs => crate::source::generator::EventKind::Logs,
                },
                count,
                rate,
                seed,
                users,
                malformed,
                start_ms: None,
            },
            partitions,
            progress: std::io::stderr().is_terminal(),
        }),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            say!(stderr, "weir: {err:#}");
            ExitCode::FAILURE
        }
    }
}
