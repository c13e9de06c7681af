//! `weir check` and `weir plugin build`: everything short of moving records.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{PipelineFile, SourceConfig};
use crate::engine::{EngineOptions, Limits, PluginEngine};
use crate::pipeline::prepare_chain;
use crate::plugin::build_crate;

pub fn check(path: &Path) -> anyhow::Result<ExitCode> {
    let file = PipelineFile::load(path)?;
    let engine = PluginEngine::new(EngineOptions {
        cache_dir: file.cache_dir.clone(),
    })?;
    for pipeline in &file.pipelines {
        if let SourceConfig::File { path: input, .. } = pipeline.source.get_ref() {
            // Not opened: a FIFO would block until its writer comes.
            let problem = match std::fs::metadata(input) {
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    Some("does not exist".into())
                }
                Err(err) => Some(format!("cannot be read: {err}")),
                Ok(meta) if meta.is_dir() => Some("is a folder, not a file of records".into()),
                Ok(_) => None,
            };
            if let Some(problem) = problem {
                let message = format!(
                    "pipeline `{}`: input file `{}` {problem}",
                    pipeline.name.get_ref(),
                    input.display()
                );
                return Err(file.error_at(pipeline.source.span().start, message).into());
            }
        }
        let sinks = pipeline.sinks.iter().chain(&pipeline.dead_letter);
        for sink in sinks {
            crate::sink::check(sink.get_ref()).map_err(|problem| {
                let message = format!("pipeline `{}`: {problem}", pipeline.name.get_ref());
                file.error_at(sink.span().start, message)
            })?;
        }
        let mut chain = prepare_chain(&file, pipeline, &engine)?;
        let plugins: Vec<String> = chain
            .slots_mut()
            .iter()
            .map(|slot| {
                format!(
                    "{} {} ({})",
                    slot.name(),
                    slot.version(),
                    slot.path().display()
                )
            })
            .collect();
        say!(
            stdout,
            "ok: pipeline `{}`: {} plugin(s){}{}, {} sink(s)",
            pipeline.name.get_ref(),
            plugins.len(),
            if plugins.is_empty() { "" } else { ": " },
            plugins.join(", "),
            pipeline.sinks.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn build_plugin(dir: &Path) -> anyhow::Result<ExitCode> {
    let wasm = build_crate(dir)?;
    let engine = PluginEngine::new(EngineOptions::default())?;
    let plugin = engine.load(&wasm)?;
    let described = plugin.describe(&Limits::default())?;
    let cached = match engine.cache().dir() {
        Some(dir) => format!("precompiled into {}", dir.display()),
        None => "not precompiled: no cache folder".to_owned(),
    };
    say!(
        stdout,
        "built {} {}: {} ({cached})",
        described.name(),
        described.version(),
        wasm.display(),
    );
    Ok(ExitCode::SUCCESS)
}
