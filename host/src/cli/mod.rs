//! The `weir` command: argument parsing, logging set-up, and the
//! subcommands (`run`, `check`, `plugin build`, `plugin new`), each a thin
//! layer over the library.

mod check;
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
        eprintln!("weir: ignoring --log {:?}: {err}", cli.log);
        EnvFilter::new("info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();

    let result = match cli.command {
        Command::Run { file, no_progress } => run::run(&file, !no_progress && std::io::stderr().is_terminal()),
        Command::Check { file } => check::check(&file),
        Command::Plugin(PluginCommand::Build { dir }) => check::build_plugin(&dir),
        Command::Plugin(PluginCommand::New { name, dir, sdk }) => scaffold::new_plugin(&name, dir, sdk),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("weir: {err:#}");
            ExitCode::FAILURE
        }
    }
}
