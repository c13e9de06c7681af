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
        if let SourceConfig::File { path: input, .. } = pipeline.source.get_ref()
            && !input.is_file()
        {
            let at = pipeline.name.span().start;
            let message = format!(
                "pipeline `{}`: input file `{}` does not exist",
                pipeline.name.get_ref(),
                input.display()
            );
            return Err(file.error_at(at, message).into());
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
