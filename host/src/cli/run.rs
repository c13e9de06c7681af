//! `weir run`: starts every pipeline of a file, shows progress on a
//! terminal, stops cleanly on Ctrl-C, and prints a summary.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;

use crate::admin::{AdminServer, AdminSettings};
use crate::config::PipelineFile;
use crate::engine::{EngineOptions, PluginEngine};
use crate::metrics::{MetricsSnapshot, PipelineMetrics};
use crate::pipeline::Pipeline;

pub fn run(path: &Path, progress: bool, admin: Option<String>) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async {
        // Handlers first: a stop requested while the file loads or plugins
        // build is honoured as soon as the pipelines start, not by dying.
        let shutdown = listen_for_stop().context("cannot listen for Ctrl-C and SIGTERM")?;
        let mut file = PipelineFile::load(path)?;
        if let Some(address) = admin {
            file.enable_admin(address);
        }
        run_file(file, progress, shutdown).await
    });
    // A stdin reader blocked on a terminal or an open pipe would otherwise
    // keep the process alive after every pipeline has ended.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Installs the Ctrl-C and SIGTERM handlers now; the first signal turns the
/// returned flag true, the second exits at once.
fn listen_for_stop() -> std::io::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        let mut requested = async || {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        };
        requested().await;
        tracing::info!("Stopping after the batches in flight (Ctrl-C again aborts).");
        let _ = stop.send(true);
        requested().await;
        std::process::exit(130);
    });
    Ok(shutdown)
}

async fn run_file(
    file: PipelineFile,
    progress: bool,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<ExitCode> {
    let engine = PluginEngine::new(EngineOptions {
        cache_dir: file.cache_dir.clone(),
        plugin_threads: file.plugin_threads,
    })?;
    let mut pipelines = Vec::new();
    for config in &file.pipelines {
        // Building may compile plugins or wait for a cluster: a stop asked
        // meanwhile ends the run now (nothing was read yet).
        let mut stop = shutdown.clone();
        tokio::select! {
            built = Pipeline::build(&file, config, &engine) => pipelines.push(built?),
            _ = stop.wait_for(|stop| *stop) => {
                say!(stderr, "weir: stopped while starting pipeline `{}`; nothing was read", config.name.get_ref());
                return Ok(ExitCode::SUCCESS);
            }
        }
    }

    let admin = match &file.admin {
        Some(config) => {
            let settings = AdminSettings {
                address: config.address.get_ref().clone(),
                token: config
                    .token
                    .clone()
                    .or_else(|| std::env::var(crate::admin::TOKEN_VAR).ok())
                    .filter(|token| !token.is_empty()),
                max_upload: usize::try_from(config.max_upload_mb << 20).unwrap_or(usize::MAX),
            };
            let handles = pipelines.iter().map(Pipeline::handle).collect();
            let tenants = crate::admin::Tenants {
                configs: file.tenants.clone(),
                scheduler: engine.scheduler().clone(),
            };
            let server = AdminServer::bind(settings, handles, tenants)
                .await
                .map_err(|err| file.error_at(config.address.span().start, err.to_string()))?;
            Some(tokio::spawn(server.serve()))
        }
        None => None,
    };
    let metrics: Vec<Arc<PipelineMetrics>> = pipelines.iter().map(Pipeline::metrics).collect();
    let ticker = progress.then(|| tokio::spawn(show_progress(metrics.clone())));
    let runs: Vec<_> = pipelines
        .into_iter()
        .map(|pipeline| tokio::spawn(pipeline.run(shutdown.clone())))
        .collect();

    let mut failed = false;
    let mut summaries = Vec::new();
    for (run, metrics) in runs.into_iter().zip(&metrics) {
        match run.await {
            Ok(Ok(summary)) => summaries.push(summary),
            Ok(Err(err)) => {
                failed = true;
                summaries.push(metrics.snapshot());
                say!(stderr, "weir: {err}");
            }
            Err(panic) => std::panic::resume_unwind(panic.into_panic()),
        }
    }
    if let Some(admin) = admin {
        admin.abort();
    }
    if let Some(ticker) = ticker {
        ticker.abort();
        say!(stderr_partial, "\r\x1b[2K");
    }
    for summary in &summaries {
        say!(stderr, "{}", summary_line(summary));
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Rewrites one status line on stderr every second.
async fn show_progress(metrics: Vec<Arc<PipelineMetrics>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last: Vec<u64> = vec![0; metrics.len()];
    loop {
        tick.tick().await;
        let line: Vec<String> = metrics
            .iter()
            .zip(&mut last)
            .map(|(metrics, last)| {
                let now = metrics.snapshot();
                let rate = now.records_in - *last;
                *last = now.records_in;
                format!(
                    "{}: {} in, {} out, {} dead ({}/s)",
                    now.pipeline,
                    thousands(now.records_in),
                    thousands(now.records_out),
                    thousands(now.records_dead_lettered),
                    thousands(rate)
                )
            })
            .collect();
        say!(stderr_partial, "\r\x1b[2K{}", line.join(" | "));
    }
}

fn summary_line(s: &MetricsSnapshot) -> String {
    format!(
        "pipeline `{}`: {} records in, {} out, {} dropped, {} dead-lettered, {} plugin faults in {:.3} s ({} records/s)",
        s.pipeline,
        thousands(s.records_in),
        thousands(s.records_out),
        thousands(s.records_dropped),
        thousands(s.records_dead_lettered),
        thousands(s.plugin_faults),
        s.elapsed.as_secs_f64(),
        thousands(s.rate_in() as u64),
    )
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_groups_digits() {
        assert_eq!(super::thousands(0), "0");
        assert_eq!(super::thousands(999), "999");
        assert_eq!(super::thousands(1_000), "1,000");
        assert_eq!(super::thousands(1_234_567), "1,234,567");
    }
}
