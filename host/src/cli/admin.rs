//! `weir status|deploy|promote|discard|rollback|pause|resume`: the admin
//! API's client, for a worker that `weir run` started with `[admin]` (or
//! `--admin`).

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use serde::de::DeserializeOwned;

use crate::tenant::usage::TenantUsage;
use crate::pipeline::{CanaryReport, PipelineStatus, ShadowReport, SwapReport};

/// Where the worker's admin API is, and its token.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The worker's admin API, `host:port` or an `http://` URL.
    #[arg(long, env = "WEIR_ADMIN", default_value = crate::config::DEFAULT_ADMIN_ADDRESS)]
    admin: String,
    /// The worker's admin token.
    #[arg(long, env = crate::admin::TOKEN_VAR, hide_env_values = true)]
    token: Option<String>,
}

/// A call to the admin API.
struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    fn new(args: AdminArgs) -> Self {
        let base = match args.admin.strip_prefix("http://") {
            Some(rest) => format!("http://{}", rest.trim_end_matches('/')),
            None => format!("http://{}", args.admin.trim_end_matches('/')),
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(120)))
            .build()
            .into();
        Client {
            base,
            token: args.token,
            agent,
        }
    }

    /// Sends the request; a refusal becomes an error with the API's message.
    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let mut request = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let sent = match body {
            Some(body) => {
                let request = request
                    .header("Content-Type", "application/wasm")
                    .body(body.to_vec())?;
                self.agent.run(request)
            }
            None => self.agent.run(request.body(())?),
        };
        let mut response = sent.with_context(|| {
            format!(
                "cannot reach the worker's admin API at {} (is `weir run` running with `[admin]`?)",
                self.base
            )
        })?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer of {url}"))?;
        if !status.is_success() {
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|body| body["error"].as_str().map(str::to_owned))
                .unwrap_or(text);
            bail!("{} ({status})", message.trim());
        }
        serde_json::from_str(&text).with_context(|| format!("unexpected answer from {url}"))
    }
}

/// `weir status [PIPELINE]`.
pub fn status(args: AdminArgs, pipeline: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let client = Client::new(args);
    let pipelines: Vec<PipelineStatus> = match pipeline {
        Some(name) => {
            vec![client.call("GET", &format!("/v1/pipelines/{}", segment(name)), None)?]
        }
        None => client.call("GET", "/v1/status", None)?,
    };
    if json {
        say!(stdout, "{}", serde_json::to_string_pretty(&pipelines)?);
        return Ok(ExitCode::SUCCESS);
    }
    for status in &pipelines {
        say!(stdout, "{}", describe(status));
    }
    if pipeline.is_none() {
        let tenants: Vec<TenantUsage> = client.call("GET", "/v1/tenants", None)?;
        for usage in &tenants {
            say!(stdout, "{}", crate::tenant::usage::describe(usage));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(status: &PipelineStatus) -> String {
    use std::fmt::Write as _;
    let c = &status.counters;
    let mut out = format!(
        "pipeline `{}`{}: {}{}, {} lane(s)\n  {} in, {} out, {} dropped, {} dead-lettered, {} plugin faults, {} batches in {:.1} s\n",
        status.name,
        (status.tenant.as_ref())
            .map(|t| format!(" of tenant `{t}`"))
            .unwrap_or_default(),
        status.state,
        status
            .reason
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default(),
        status.lanes,
        c.records_in,
        c.records_out,
        c.records_dropped,
        c.records_dead_lettered,
        c.plugin_faults,
        c.batches,
        c.elapsed_s,
    );
    for plugin in &status.plugins {
        let _ = writeln!(
            out,
            "  plugin #{} `{}`: {}; lanes serve [{}]; {} swap(s), {} refused",
            plugin.plugin,
            plugin.label,
            plugin.serving,
            plugin.lanes.join(", "),
            plugin.swaps,
            plugin.refused
        );
        if !plugin.topics.is_empty() {
            let _ = writeln!(out, "    topics: {}", plugin.topics.join(", "));
        }
        if !plugin.previous.is_empty() {
            let previous: Vec<String> = plugin.previous.iter().map(ToString::to_string).collect();
            let _ = writeln!(out, "    kept for rollback: {}", previous.join(", "));
        }
        if let Some(file) = &plugin.watching {
            let _ = writeln!(out, "    watching {}", file.display());
        }
        if let Some(refusal) = &plugin.last_refusal {
            let _ = writeln!(out, "    last refused: {refusal}");
        }
        if let Some(shadow) = &plugin.shadow {
            let _ = writeln!(out, "    {}", shadow_lines(shadow).join("\n    "));
        }
        if let Some(canary) = &plugin.canary
            && canary.verdict.is_none()
        {
            let _ = writeln!(out, "    {}", canary_line(canary));
        }
        if let Some(trial) = &plugin.last_trial {
            let _ = writeln!(out, "    last trial: {trial}");
        }
    }
    out.trim_end().to_owned()
}

/// How `weir deploy` serves its file.
pub enum DeployAs {
    /// At once, for good.
    Serving,
    /// As a canary judged on its first `records`.
    Canary {
        /// Records it is judged on.
        records: u64,
        /// The share of them it may fail.
        max_failure_rate: f64,
    },
    /// In the shadow of the serving version.
    Shadow,
}

/// `weir deploy PIPELINE [--plugin N] [--shadow | --canary N] FILE.wasm`.
pub fn deploy(
    args: AdminArgs,
    pipeline: &str,
    plugin: usize,
    wasm: &Path,
    how: DeployAs,
) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(wasm).with_context(|| format!("cannot read `{}`", wasm.display()))?;
    let client = Client::new(args);
    let mut path = format!(
        "/v1/pipelines/{}/plugins/{plugin}/deploy",
        segment(pipeline)
    );
    match how {
        DeployAs::Serving => {}
        DeployAs::Canary {
            records,
            max_failure_rate,
        } => path.push_str(&format!(
            "?canary={records}&max_failure_rate={max_failure_rate}"
        )),
        DeployAs::Shadow => {
            path.push_str("?shadow=true");
            let report: ShadowReport = client.call("POST", &path, Some(&bytes))?;
            say!(
                stdout,
                "pipeline `{pipeline}`, plugin #{plugin}: {} runs in the shadow of the serving version in every lane; `weir status` shows what differs",
                report.candidate
            );
            return Ok(ExitCode::SUCCESS);
        }
    }
    let report: SwapReport = client.call("POST", &path, Some(&bytes))?;
    say!(stdout, "{}", swap_line(&report));
    Ok(ExitCode::SUCCESS)
}

/// `weir promote|discard PIPELINE [--plugin N]`.
pub fn end_shadow(
    args: AdminArgs,
    pipeline: &str,
    plugin: usize,
    promote: bool,
) -> anyhow::Result<ExitCode> {
    let client = Client::new(args);
    let verb = if promote { "promote" } else { "discard" };
    let path = format!(
        "/v1/pipelines/{}/plugins/{plugin}/{verb}",
        segment(pipeline)
    );
    if promote {
        let report: SwapReport = client.call("POST", &path, None)?;
        say!(stdout, "{}", swap_line(&report));
        if let Some(shadow) = &report.shadow {
            say!(stdout, "  {}", shadow_lines(shadow).join("\n  "));
        }
    } else {
        let report: ShadowReport = client.call("POST", &path, None)?;
        say!(
            stdout,
            "pipeline `{pipeline}`, plugin #{plugin}: shadow discarded\n  {}",
            shadow_lines(&report).join("\n  ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A shadow's tally, with its examples, a line each.
fn shadow_lines(shadow: &ShadowReport) -> Vec<String> {
    let mut lines = vec![format!(
        "shadow {}: {} of {} records compared differ; {} not compared; {} candidate fault(s)",
        shadow.candidate,
        shadow.differing,
        shadow.compared,
        shadow.not_compared,
        shadow.candidate_faults
    )];
    if let Some(fault) = &shadow.last_fault {
        lines.push(format!("  last candidate fault: {fault}"));
    }
    for example in &shadow.examples {
        lines.push(format!(
            "  {}/{}@{}: serving {} | candidate {}",
            example.topic, example.partition, example.offset, example.serving, example.candidate
        ));
    }
    lines
}

fn canary_line(canary: &CanaryReport) -> String {
    format!(
        "canary {}: {} of its first {} records seen, {} failed ({} allowed); rolls back to {}",
        canary.candidate,
        canary.records,
        canary.rule.records,
        canary.failed,
        canary.rule.allowed_failures(),
        canary.restores
    )
}

/// `weir rollback PIPELINE [--plugin N] [--to HASH]`.
pub fn rollback(
    args: AdminArgs,
    pipeline: &str,
    plugin: usize,
    to: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let client = Client::new(args);
    let mut path = format!(
        "/v1/pipelines/{}/plugins/{plugin}/rollback",
        segment(pipeline)
    );
    if let Some(hash) = to {
        if !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("`{hash}` is not a hash (hex digits, as `weir status` shows them)");
        }
        path.push_str(&format!("?to={hash}"));
    }
    let report: SwapReport = client.call("POST", &path, None)?;
    say!(stdout, "{}", swap_line(&report));
    Ok(ExitCode::SUCCESS)
}

/// `weir pause|resume PIPELINE`.
pub fn pause(args: AdminArgs, pipeline: &str, pause: bool) -> anyhow::Result<ExitCode> {
    let client = Client::new(args);
    let verb = if pause { "pause" } else { "resume" };
    let status: PipelineStatus = client.call(
        "POST",
        &format!("/v1/pipelines/{}/{verb}", segment(pipeline)),
        None,
    )?;
    say!(stdout, "pipeline `{}`: {}", status.name, status.state);
    Ok(ExitCode::SUCCESS)
}

fn swap_line(report: &SwapReport) -> String {
    if report.unchanged {
        return format!(
            "pipeline `{}`, plugin #{}: {} already serves; nothing changed",
            report.pipeline, report.plugin, report.to
        );
    }
    let mut line = format!(
        "pipeline `{}`, plugin #{}: {} -> {}, served by all {} lane(s) (prepared in {:.1} ms, switched in {:.1} ms)",
        report.pipeline,
        report.plugin,
        report.from,
        report.to,
        report.lanes.len(),
        report.prepare_us as f64 / 1e3,
        report.switch_us as f64 / 1e3,
    );
    if let Some(rule) = &report.canary {
        line.push_str(&format!(
            "; a canary: back to {} if more than {} of its first {} records fail",
            report.from,
            rule.allowed_failures(),
            rule.records
        ));
    }
    line
}

/// `name` as one URL path segment.
fn segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
