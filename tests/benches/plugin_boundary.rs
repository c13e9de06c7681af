//! What the plugin boundary costs, measured against native Rust in the same
//! process, on one core, with 100-byte JSON records.
//!
//! - identity: the host's real path (pack the records into a batch as a
//!   source does, call the component, take its outputs into the next batch)
//!   against a native identity that moves the same records into a new
//!   batch. Their difference is the boundary cost. Printed under it: the
//!   crossing alone (a packed batch in, the reply out) and the packing alone
//!   (what a source pays whether or not a plugin runs).
//! - json: parse, filter on a number, re-serialise three fields, in the
//!   `json-filter` component against the same logic written natively over
//!   the same records.
//!
//! Run: `cargo bench -p weir-tests --bench plugin_boundary`. Prints a table,
//! then one JSON summary line.
//!
//! Wall time on a shared 2-core machine cannot resolve a few percent. For
//! that, `WEIR_BENCH_FIXED=identity-1|identity-1024|json-1024` runs one case
//! over a fixed input with no clock, to count instructions under callgrind:
//! `valgrind --tool=callgrind --toggle-collect='weir::pipeline::chain::Chain::process*' <bench binary>`
//! (the same count for the same binary whatever else the machine does).

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark that cannot unwrap has failed"
)]

use std::hint::black_box;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use weir::batch::Batch;
use weir::config::PluginConfig;
use weir::engine::{EngineOptions, Limits, PluginEngine};
use weir::pipeline::Chain;
use weir::plugin::PluginSlot;
use weir_guest::abi::RecordParts;

const RECORD_BYTES: usize = 100;
const SAMPLES: usize = 9;
const SAMPLE_TIME: Duration = Duration::from_millis(150);
const JSON_FILTER_CONFIG: &str =
    "field = \"amount\"\nmin = 100.0\nproject = [\"id\", \"user\", \"amount\"]";

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn build_plugins() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace())
        .args([
            "build",
            "--quiet",
            "--release",
            "--target",
            "wasm32-wasip2",
            "-p",
            "identity",
            "-p",
            "json-filter",
        ])
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the benchmark plugins failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace().join("target"), PathBuf::from);
    target.join("wasm32-wasip2/release")
}

/// A record as a source reads it.
#[derive(Clone)]
struct Raw {
    key: Vec<u8>,
    value: Vec<u8>,
}

/// `count` JSON records of exactly `RECORD_BYTES` bytes, amounts spread so
/// that about half pass the filter.
fn records(count: usize) -> Vec<Raw> {
    (0..count)
        .map(|i| {
            let head = format!(
                r#"{{"id":{i},"user":"user-{}","amount":{}.{:02},"pad":""#,
                i % 997,
                i % 200,
                i % 100
            );
            let mut value = head.into_bytes();
            value.resize(RECORD_BYTES - 2, b'x');
            value.extend_from_slice(b"\"}");
            debug_assert!(serde_json::from_slice::<serde_json::Value>(&value).is_ok());
            Raw {
                key: format!("user-{}", i % 997).into_bytes(),
                value,
            }
        })
        .collect()
}

/// `records` packed into a batch, as a source packs what it reads.
fn pack(records: &[Raw]) -> Batch {
    let bytes: usize = records
        .iter()
        .map(|r| r.value.len() + r.key.len() + 40)
        .sum();
    let mut batch = Batch::with_capacity(bytes, records.len());
    for (offset, record) in records.iter().enumerate() {
        let parts = RecordParts {
            key: Some(&record.key),
            value: &record.value,
            timestamp: None,
            topic: "bench",
            partition: 0,
            offset: offset as i64,
        };
        batch.push(parts, std::iter::empty());
    }
    batch
}

/// Median nanoseconds per record of `run` over batches of `batch` records.
fn measure(batch: usize, total: &[Raw], mut run: impl FnMut(&[Raw]) -> usize) -> f64 {
    let batches: Vec<&[Raw]> = total.chunks(batch).collect();
    // Calibrate how many passes over the input fill a sample.
    let started = Instant::now();
    for batch in &batches {
        black_box(run(batch));
    }
    let passes = (SAMPLE_TIME.as_secs_f64() / started.elapsed().as_secs_f64())
        .ceil()
        .max(1.0) as usize;

    let mut per_record = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let started = Instant::now();
        for _ in 0..passes {
            for batch in &batches {
                black_box(run(batch));
            }
        }
        per_record.push(started.elapsed().as_nanos() as f64 / (passes * total.len()) as f64);
    }
    per_record.sort_by(f64::total_cmp);
    per_record[per_record.len() / 2]
}

/// Median nanoseconds per record of the crossing alone: a packed batch in,
/// the packed reply out, through the guest SDK's loop; no host records
/// are built on either side.
fn crossing(chain: &mut Chain, batch: usize, total: &[Raw]) -> f64 {
    let packed: Vec<Batch> = total.chunks(batch).map(pack).collect();
    let instance = chain.slots_mut()[0].instance();
    let mut per_record = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let (started, mut done) = (Instant::now(), 0);
        while started.elapsed() < SAMPLE_TIME {
            for batch in &packed {
                black_box(instance.process(batch.wire()).expect("identity runs"));
            }
            done += total.len();
        }
        per_record.push(started.elapsed().as_nanos() as f64 / done as f64);
    }
    per_record.sort_by(f64::total_cmp);
    per_record[per_record.len() / 2]
}

fn chain(engine: &PluginEngine, wasm: PathBuf, config: &str) -> Chain {
    let plugin = PluginConfig {
        name: None,
        wasm: None,
        crate_dir: None,
        config: toml::from_str(config).expect("bench config"),
        topics: Vec::new(),
        watch: false,
    };
    let limits = Limits {
        memory_bytes: 256 << 20,
        batch_deadline: Duration::from_secs(30),
        ..Limits::default()
    };
    Chain::new(vec![
        PluginSlot::start(engine, &wasm, &plugin, &limits).expect("plugin starts"),
    ])
}

/// Native identity: every record moves into the next stage's batch.
fn native_identity(records: &[Raw]) -> usize {
    let out: Vec<(&[u8], &[u8])> = records
        .iter()
        .map(|r| black_box((&r.key[..], &r.value[..])))
        .collect();
    out.len()
}

/// Native json filter: the `json-filter` plugin's own code, compiled
/// natively, over the same records; kept and projected values go to a new
/// batch.
fn native_json(filter: &json_filter::JsonFilter, records: &[Raw]) -> usize {
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(records.len());
    let mut buf = Vec::with_capacity(records.len() * 64);
    for record in records {
        let start = buf.len();
        match filter.apply(&record.value, &mut buf) {
            Ok(json_filter::Verdict::Projected) => out.push((start, buf.len())),
            Ok(json_filter::Verdict::Keep) => {
                buf.extend_from_slice(&record.value);
                out.push((start, buf.len()));
            }
            Ok(json_filter::Verdict::Drop) | Err(_) => {}
        }
    }
    black_box(&buf);
    out.len()
}

fn main() {
    let dir = build_plugins();
    let cache = tempfile::tempdir().expect("temp dir");
    let engine = PluginEngine::new(EngineOptions {
        cache_dir: Some(cache.path().to_owned()),
        ..Default::default()
    })
    .expect("engine");

    let total = records(64 * 1024);
    if let Ok(case) = std::env::var("WEIR_BENCH_FIXED") {
        fixed(&engine, &dir, &case, &total);
        return;
    }
    let mut identity = chain(&engine, dir.join("identity.wasm"), "");
    let mut summary = serde_json::Map::new();
    println!("plugin boundary, {RECORD_BYTES}-byte JSON records, one core, median of {SAMPLES}");
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>12}",
        "case", "wasm ns", "native ns", "ratio", "boundary ns"
    );

    let mut identity_json = serde_json::Map::new();
    for batch in [1, 64, 1024] {
        let slice = if batch == 1 {
            &total[..8 * 1024]
        } else {
            &total[..]
        };
        let wasm = measure(batch, slice, |records| {
            let out = identity.process(pack(records)).expect("identity runs");
            out.records.len()
        });
        let native = measure(batch, slice, native_identity);
        let boundary = wasm - native;
        println!(
            "{:<28} {wasm:>10.1} {native:>10.1} {:>9.2}x {boundary:>12.1}",
            format!("identity, batch {batch}"),
            wasm / native
        );
        let crossing = crossing(&mut identity, batch, slice);
        println!(
            "{:<28} {crossing:>10.1}",
            format!("  crossing only, batch {batch}")
        );
        let packing = measure(batch, slice, |records| pack(records).len());
        println!(
            "{:<28} {packing:>10.1}",
            format!("  packing only, batch {batch}")
        );
        identity_json.insert(
            batch.to_string(),
            serde_json::json!({
                "wasm_ns": round(wasm),
                "native_ns": round(native),
                "boundary_ns": round(boundary),
                "crossing_ns": round(crossing),
                "packing_ns": round(packing),
            }),
        );
    }
    summary.insert("identity".into(), identity_json.clone().into());

    let mut filter = chain(&engine, dir.join("json_filter.wasm"), JSON_FILTER_CONFIG);
    let native_filter: json_filter::JsonFilter = weir_guest::configure(
        r#"{"field": "amount", "min": 100.0, "project": ["id", "user", "amount"]}"#,
    )
    .expect("native filter config");
    // Both sides must keep the same records before their speed means anything.
    let sample = &total[..1024];
    let kept = filter
        .process(pack(sample))
        .expect("json filter runs")
        .records;
    assert_eq!(
        kept.len(),
        native_json(&native_filter, sample),
        "wasm and native disagree"
    );
    let wasm = measure(1024, &total, |records| {
        filter
            .process(pack(records))
            .expect("json filter runs")
            .records
            .len()
    });
    let native = measure(1024, &total, |records| native_json(&native_filter, records));
    let ratio = wasm / native;
    println!(
        "{:<28} {wasm:>10.1} {native:>10.1} {ratio:>9.2}x {:>12.1}",
        "json filter+project, 1024",
        wasm - native
    );
    println!(
        "throughput: json filter {:.2} M rec/s in wasm, {:.2} M rec/s native",
        1e3 / wasm,
        1e3 / native
    );
    summary.insert(
        "json_filter".into(),
        serde_json::json!({ "batch": 1024, "wasm_ns": round(wasm), "native_ns": round(native), "ratio": round(ratio) }),
    );

    let boundary_64 = identity_json["64"]["boundary_ns"]
        .as_f64()
        .unwrap_or(f64::MAX);
    let boundary_1024 = identity_json["1024"]["boundary_ns"]
        .as_f64()
        .unwrap_or(f64::MAX);
    let crossing_64 = identity_json["64"]["crossing_ns"]
        .as_f64()
        .unwrap_or(f64::MAX);
    let crossing_1024 = identity_json["1024"]["crossing_ns"]
        .as_f64()
        .unwrap_or(f64::MAX);
    summary.insert(
        "goals".into(),
        serde_json::json!({
            "boundary_ns_at_batch_ge_64_max": 20,
            "boundary_met": boundary_64 <= 20.0 && boundary_1024 <= 20.0,
            "crossing_met": crossing_64 <= 20.0 && crossing_1024 <= 20.0,
            "json_ratio_max": 1.5,
            "json_met": ratio <= 1.5,
        }),
    );
    summary.insert("bench".into(), "plugin_boundary".into());
    summary.insert("record_bytes".into(), RECORD_BYTES.into());
    println!("{}", serde_json::Value::Object(summary));
}

/// The `WEIR_BENCH_FIXED` mode: one case through the chain, no clock.
fn fixed(engine: &PluginEngine, dir: &std::path::Path, case: &str, total: &[Raw]) {
    let (wasm, config, batch) = match case {
        "identity-1" => ("identity.wasm", "", 1),
        "identity-1024" => ("identity.wasm", "", 1024),
        "json-1024" => ("json_filter.wasm", JSON_FILTER_CONFIG, 1024),
        other => {
            panic!("WEIR_BENCH_FIXED={other}: expected identity-1, identity-1024 or json-1024")
        }
    };
    let mut chain = chain(engine, dir.join(wasm), config);
    let input = if batch == 1 {
        &total[..8 * 1024]
    } else {
        total
    };
    let mut out = 0;
    for records in input.chunks(batch) {
        out += chain
            .process(pack(records))
            .expect("plugin runs")
            .records
            .len();
    }
    println!("{case}: {} records in, {out} out", input.len());
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
