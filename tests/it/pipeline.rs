//! Whole pipelines, in process: every input is accounted for as sent,
//! dropped or dead-lettered, with what a user would check in the files.

use std::collections::BTreeSet;

use weir::config::PipelineFile;
use weir::engine::{EngineOptions, PluginEngine};
use weir::metrics::MetricsSnapshot;
use weir::pipeline::Pipeline;
use weir::source::generator::{EventGenerator, EventKind, GeneratorConfig};

use crate::support::Scratch;

/// Runs every pipeline of `path` in process, to its end; their summaries.
pub(crate) async fn run_pipelines(path: &std::path::Path) -> Vec<MetricsSnapshot> {
    let file = PipelineFile::load(path).unwrap();
    let engine = PluginEngine::new(EngineOptions::default()).unwrap();
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let mut summaries = Vec::new();
    for config in &file.pipelines {
        let pipeline = Pipeline::build(&file, config, &engine).await.unwrap();
        summaries.push(pipeline.run(shutdown.clone()).await.unwrap());
    }
    summaries
}

fn header<'a>(letter: &'a serde_json::Value, name: &str) -> &'a str {
    letter["headers"][name].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generator_filter_redactor_delivers_exactly_the_expected_records() {
    let scratch = Scratch::new();
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "payments"
source = { type = "generator", kind = "payments", count = 3000, seed = 11, malformed = 0.03 }
batch = { max_records = 100 }

[[pipeline.plugin]]
wasm = "{plugin:json-filter}"
config = { field = "amount", min = 100.0 }

[[pipeline.plugin]]
wasm = "{plugin:pii-redactor}"

[[pipeline.sink]]
type = "file"
path = "out.jsonl"

[pipeline.dead_letter]
type = "file"
path = "dead.jsonl"
"#,
    );
    let summary = run_pipelines(&path).await.remove(0);

    // What the same seed must give: valid payments of 100 or more pass,
    // malformed ones are dead-lettered, the rest dropped.
    let mut events = EventGenerator::new(GeneratorConfig {
        kind: EventKind::Payments,
        count: Some(3000),
        rate: None,
        seed: 11,
        users: 1000,
        malformed: 0.03,
        start_ms: None,
    });
    let (mut expected_ids, mut malformed_offsets) = (BTreeSet::new(), BTreeSet::new());
    let mut offset = 0;
    while !events.is_done() {
        let event = events.next_event();
        match serde_json::from_str::<serde_json::Value>(&event.value) {
            Ok(doc) if doc["amount"].as_f64().unwrap() >= 100.0 => {
                expected_ids.insert(doc["txn_id"].as_str().unwrap().to_owned());
            }
            Ok(_) => {}
            Err(_) => {
                malformed_offsets.insert(offset);
            }
        }
        offset += 1;
    }
    assert!(!malformed_offsets.is_empty() && expected_ids.len() > 100);

    let out = scratch.json_lines("out.jsonl");
    let got_ids: BTreeSet<String> = out
        .iter()
        .map(|r| r["txn_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got_ids, expected_ids);
    assert_eq!(out.len(), expected_ids.len(), "no duplicates");
    for record in &out {
        assert!(record["amount"].as_f64().unwrap() >= 100.0);
        assert!(
            record["email"]
                .as_str()
                .unwrap()
                .contains("***@example.com"),
            "{record}"
        );
        assert!(
            record["card_number"]
                .as_str()
                .unwrap()
                .starts_with("**** **** **** "),
            "{record}"
        );
    }

    let dead = scratch.json_lines("dead.jsonl");
    let dead_offsets: BTreeSet<i64> = dead.iter().map(|d| d["offset"].as_i64().unwrap()).collect();
    assert_eq!(dead_offsets, malformed_offsets);
    for letter in &dead {
        assert_eq!(header(letter, "weir.error.stage"), "plugin");
        assert_eq!(header(letter, "weir.error.plugin"), "json-filter");
        assert_eq!(header(letter, "weir.error.plugin.version"), "0.1.0");
        assert_eq!(header(letter, "weir.source.topic"), "generator:payments");
        assert_eq!(
            header(letter, "weir.source.offset"),
            letter["offset"].to_string()
        );
        assert!(
            header(letter, "weir.error.reason").starts_with("not a JSON object"),
            "{letter}"
        );
        assert!(
            letter["value"].is_string(),
            "the original, unparseable value is kept: {letter}"
        );
        assert!(letter["key"].as_str().unwrap().starts_with("user-"));
    }

    assert_eq!(summary.records_in, 3000);
    assert_eq!(summary.records_out, out.len() as u64);
    assert_eq!(summary.records_dead_lettered, dead.len() as u64);
    assert_eq!(
        summary.records_out + summary.records_dropped + summary.records_dead_lettered,
        3000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_lines_go_to_the_dead_letter_sink_with_their_line_numbers() {
    let scratch = Scratch::new();
    let input = scratch.write(
        "in.jsonl",
        "{\"n\":1}\n{\"n\":2,\n\n{\"n\":4}\r\nnot json\n{\"n\":6}",
    );
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "lines"
source = { type = "file", path = "in.jsonl" }

[[pipeline.plugin]]
wasm = "{plugin:identity}"

[[pipeline.sink]]
type = "file"
path = "out.jsonl"

[pipeline.dead_letter]
type = "file"
path = "dead.jsonl"
"#,
    );
    let summary = run_pipelines(&path).await.remove(0);

    let out = scratch.json_lines("out.jsonl");
    assert_eq!(
        out,
        [
            serde_json::json!({"n":1}),
            serde_json::json!({"n":4}),
            serde_json::json!({"n":6})
        ]
    );
    let dead = scratch.json_lines("dead.jsonl");
    let lines: Vec<i64> = dead.iter().map(|d| d["offset"].as_i64().unwrap()).collect();
    assert_eq!(lines, [2, 5]);
    let reason = header(&dead[0], "weir.error.reason");
    assert!(
        reason.starts_with(&format!("malformed JSON at {}:2:", input.display())),
        "{reason}"
    );
    assert_eq!(header(&dead[1], "weir.error.stage"), "source");
    assert_eq!(dead[1]["value"], "not json");
    assert_eq!(
        (
            summary.records_in,
            summary.records_out,
            summary.records_dead_lettered
        ),
        (5, 3, 2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_records_reach_their_sinks_and_unclaimed_routes_are_dead_lettered() {
    let scratch = Scratch::new();
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "logs"
source = { type = "generator", kind = "logs", count = 1000, seed = 5 }

[[pipeline.plugin]]
wasm = "{plugin:router}"
config = { field = "level", routes = { ERROR = "alerts", WARN = "warnings" } }

[[pipeline.sink]]
type = "file"
path = "alerts.jsonl"
routes = ["alerts"]

[[pipeline.sink]]
type = "file"
path = "all.jsonl"
routes = ["default", "alerts"]

[pipeline.dead_letter]
type = "file"
path = "dead.jsonl"
"#,
    );
    let summary = run_pipelines(&path).await.remove(0);

    let level_count = |lines: &[serde_json::Value], level: &str| {
        lines.iter().filter(|l| l["level"] == level).count()
    };
    let alerts = scratch.json_lines("alerts.jsonl");
    let all = scratch.json_lines("all.jsonl");
    let dead = scratch.json_lines("dead.jsonl");
    assert!(alerts.iter().all(|l| l["level"] == "ERROR") && !alerts.is_empty());
    assert_eq!(
        level_count(&all, "ERROR"),
        alerts.len(),
        "a record goes to every sink of its route"
    );
    assert_eq!(level_count(&all, "WARN"), 0);
    assert!(level_count(&all, "INFO") > 0 && level_count(&all, "DEBUG") > 0);
    assert!(!dead.is_empty());
    for letter in &dead {
        assert_eq!(letter["value"]["level"], "WARN");
        assert_eq!(
            header(letter, "weir.error.reason"),
            "no sink takes route `warnings`"
        );
        assert_eq!(header(letter, "weir.error.stage"), "route");
    }
    assert_eq!(all.len() + dead.len(), 1000);
    assert_eq!(summary.records_out as usize, all.len());
}
