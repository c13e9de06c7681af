//! `weir check` and `weir plugin build`: everything short of moving records.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{PipelineFile, SourceConfig};
use crate::engine::{EngineOptions, Limits, LoadError, PluginEngine};
use crate::pipeline::{prepare_chain, prepare_window};
use crate::plugin::build_crate;

pub fn check(path: &Path) -> anyhow::Result<ExitCode> {
    let file = PipelineFile::load(path)?;
    let engine = PluginEngine::new(EngineOptions {
        cache_dir: file.cache_dir.clone(),
        plugin_threads: file.plugin_threads,
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
        let aggregates = match prepare_window(&file, pipeline, &engine, &Default::default())? {
            Some((_, plugins)) if !plugins.is_empty() => {
                let labels: Vec<&str> = plugins.iter().map(|p| p.label()).collect();
                format!(", window with aggregate plugin(s): {}", labels.join(", "))
            }
            Some(_) => ", window".to_owned(),
            None => String::new(),
        };
        say!(
            stdout,
            "ok: pipeline `{}`: {} plugin(s){}{}{aggregates}, {} sink(s)",
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
    // A transformer or a window aggregate: either is a plugin to build.
    let (plugin, kind) = match engine.load(&wasm) {
        Err(LoadError::OtherWorld { .. }) => (engine.load_aggregate(&wasm)?, " (window aggregate)"),
        loaded => (loaded?, ""),
    };
    let described = plugin.describe(&Limits::default())?;
    let cached = match engine.cache().dir() {
        Some(dir) => format!("precompiled into {}", dir.display()),
        None => "not precompiled: no cache folder".to_owned(),
    };
    say!(
        stdout,
        "built {} {}{kind}: {} ({cached})",
        described.name(),
        described.version(),
        wasm.display(),
    );
    Ok(ExitCode::SUCCESS)
}
