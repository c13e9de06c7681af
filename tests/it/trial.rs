//! Trials of a candidate under live traffic: a shadow that must count
//! exactly the records a version changes (then promoted, or discarded),
//! and canaries that pass or are rolled back automatically with every
//! record accounted for (the ones the failed canary failed are
//! dead-lettered, tagged with its hash).

use std::collections::HashMap;
use std::time::Duration;

use weir::pipeline::{CanaryRule, ControlError, Verdict};

use crate::support::Scratch;
use crate::swap::{bytes_of, eventually, start};

/// Offsets the `every-tenth` fixture changes, in `from..to`.
fn tenths(from: u64, to: u64) -> u64 {
    (from..to)
        .filter(|offset| offset.is_multiple_of(10))
        .count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_counts_exactly_the_records_a_version_changes_then_serves_when_promoted() {
    let scratch = Scratch::new();
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "shadowed"
parallelism = 2
source = { type = "generator", kind = "payments", rate = 20000 }
batch = { max_records = 64, linger_ms = 1 }

[[pipeline.plugin]]
wasm = "{plugin:identity}"
watch = false

[[pipeline.sink]]
type = "file"
path = "{dir}/out.txt"
"#,
    );
    let (handle, stop, run, _engine) = start(&scratch, &path).await;
    eventually("records flow", Duration::from_secs(20), || {
        handle.status().counters.records_in > 500
    })
    .await;
    // Paused, the shadow starts at a known record: every batch read so far
    // went to the lanes before it, every later one is compared.
    handle.pause(true).await.unwrap();
    let started = handle.shadow(1, bytes_of("every-tenth")).await.unwrap();
    let first_compared = handle.status().counters.records_in;
    assert_eq!(
        (started.candidate.name.as_str(), started.compared),
        ("every-tenth", 0)
    );
    handle.pause(false).await.unwrap();

    // A second shadow of the serving version itself is refused.
    match handle.shadow(1, bytes_of("identity")).await {
        Err(ControlError::Refused { reason, .. }) => {
            assert!(reason.contains("is the version serving"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    eventually(
        "the shadow compares records",
        Duration::from_secs(20),
        || {
            handle.status().plugins[0]
                .shadow
                .as_ref()
                .is_some_and(|shadow| shadow.compared >= 3000)
        },
    )
    .await;
    let status = handle.status();
    assert_eq!(
        status.plugins[0].serving.name, "identity",
        "the shadow does not serve"
    );
    let live = status.plugins[0].shadow.clone().unwrap();
    assert!(!live.examples.is_empty() && live.examples.len() <= 5);
    for example in &live.examples {
        assert_eq!(example.offset % 10, 0, "{example:?}");
        assert!(
            example.candidate.contains("(changed)") && !example.serving.contains("(changed)"),
            "{example:?}"
        );
    }

    let promoted = handle.promote(1).await.unwrap();
    assert_eq!(
        (promoted.from.name.as_str(), promoted.to.name.as_str()),
        ("identity", "every-tenth")
    );
    let found = promoted.shadow.unwrap();
    assert!(found.compared >= 3000);
    assert_eq!((found.not_compared, found.candidate_faults), (0, 0));
    // Every batch between the shadow's start and its promotion was
    // compared: exactly offsets first_compared.. first_compared + compared.
    let promoted_at = first_compared + found.compared;
    assert_eq!(
        found.differing,
        tenths(first_compared, promoted_at),
        "differing records among offsets {first_compared}..{promoted_at}"
    );
    assert!(matches!(
        handle.discard(1).await,
        Err(ControlError::NoShadow { .. })
    ));
    let status = handle.status();
    assert!(status.plugins[0].shadow.is_none());
    assert!(
        status.plugins[0]
            .last_trial
            .as_deref()
            .is_some_and(|line| line.contains("promoted")
                && line.contains(&format!("{} of {}", found.differing, found.compared))),
        "{:?}",
        status.plugins[0].last_trial
    );

    // A shadow of the old version, discarded: it reports, and stops.
    handle.shadow(1, bytes_of("identity")).await.unwrap();
    eventually(
        "the second shadow compares",
        Duration::from_secs(20),
        || {
            handle.status().plugins[0]
                .shadow
                .as_ref()
                .is_some_and(|shadow| shadow.compared >= 500)
        },
    )
    .await;
    let discarded = handle.discard(1).await.unwrap();
    assert_eq!(discarded.candidate.name, "identity");
    assert!(discarded.differing > 0 && discarded.differing < discarded.compared);
    assert!(handle.status().plugins[0].shadow.is_none());

    let read = handle.status().counters.records_in;
    eventually(
        "records flow after the trials",
        Duration::from_secs(20),
        || handle.status().counters.records_in > read + 100,
    )
    .await;
    stop.send(true).unwrap();
    let summary = run.await.unwrap().unwrap();

    // Line N is record N's output: identity's before the promotion,
    // every-tenth's from it on, and the shadows' never.
    let text = std::fs::read_to_string(scratch.path("out.txt")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len() as u64, summary.records_in);
    for (offset, line) in lines.iter().enumerate() {
        let offset = offset as u64;
        let changed = line.ends_with(" (changed)");
        let expected = offset >= promoted_at && offset.is_multiple_of(10);
        assert_eq!(
            changed, expected,
            "record {offset} (promoted at {promoted_at}): {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_passes_or_is_rolled_back_and_every_record_is_accounted_for() {
    const RECORDS: u64 = 60_000;
    let scratch = Scratch::new();
    let path = scratch.pipeline(&format!(
        r#"
[[pipeline]]
name = "canaries"
parallelism = 2
source = {{ type = "generator", kind = "payments", rate = 20000, count = {RECORDS} }}
batch = {{ max_records = 50, linger_ms = 1 }}

[[pipeline.plugin]]
wasm = "{{plugin:identity}}"
watch = false

[[pipeline.sink]]
type = "file"
path = "{{dir}}/out.jsonl"
format = "envelope"

[pipeline.dead_letter]
type = "file"
path = "{{dir}}/dead.jsonl"
"#
    ));
    let (handle, stop, run, _engine) = start(&scratch, &path).await;
    eventually("records flow", Duration::from_secs(20), || {
        handle.status().counters.records_in > 1000
    })
    .await;
    let verdict = || {
        handle.status().plugins[0]
            .canary
            .as_ref()
            .and_then(|c| c.verdict)
    };

    // A version that fails nothing passes its 500 records and serves on.
    let rule = CanaryRule::new(500, 0.01).unwrap();
    let report = handle
        .deploy_canary(1, bytes_of("every-tenth"), rule)
        .await
        .unwrap();
    assert_eq!(report.canary, Some(rule));
    eventually("the first canary passes", Duration::from_secs(20), || {
        verdict().is_some()
    })
    .await;
    let status = handle.status();
    assert_eq!(verdict(), Some(Verdict::Passed), "{:?}", status.plugins[0]);
    assert_eq!(status.plugins[0].serving.name, "every-tenth");
    let passed = status.plugins[0].last_trial.clone().unwrap();
    assert!(passed.contains("passed"), "{passed}");

    // A version that fails half its records is rolled back on its own.
    let rule = CanaryRule::new(1000, 0.01).unwrap();
    let report = handle
        .deploy_canary(1, bytes_of("fail-half"), rule)
        .await
        .unwrap();
    let fail_half_hash = report.to.hash[..12].to_owned();
    eventually(
        "the second canary is decided",
        Duration::from_secs(20),
        || verdict().is_some(),
    )
    .await;
    let status = handle.status();
    assert_eq!(verdict(), Some(Verdict::RolledBack));
    let plugin_status = &status.plugins[0];
    assert_eq!(
        plugin_status.serving.name, "every-tenth",
        "the version it replaced serves again"
    );
    assert!(
        plugin_status
            .lanes
            .iter()
            .all(|lane| plugin_status.serving.hash.starts_with(lane))
    );
    assert_eq!(
        plugin_status.previous[0].name, "fail-half",
        "kept, for a roll forward"
    );
    let reason = plugin_status.last_trial.clone().unwrap();
    assert!(
        reason.contains("rolled back to every-tenth")
            && reason.contains("more than the 10 allowed"),
        "{reason}"
    );

    let summary = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the generator's records all come through")
        .unwrap()
        .unwrap();
    drop(stop);
    assert_eq!(summary.records_in, RECORDS);

    // Every record is written once: out, or (failed by the canary)
    // dead-lettered with the canary's hash and its reason.
    let mut seen: HashMap<u64, &str> = HashMap::new();
    let out = scratch.json_lines("out.jsonl");
    let dead = scratch.json_lines("dead.jsonl");
    for line in &out {
        let offset = line["offset"].as_u64().unwrap();
        assert!(
            seen.insert(offset, "out").is_none(),
            "record {offset} twice"
        );
    }
    for line in &dead {
        let offset = line["offset"].as_u64().unwrap();
        let headers = &line["headers"];
        assert_eq!(
            headers["weir.error.plugin.hash"],
            fail_half_hash.as_str(),
            "{line}"
        );
        assert_eq!(
            headers["weir.error.reason"],
            format!("odd offset {offset}"),
            "{line}"
        );
        assert!(
            seen.insert(offset, "dead").is_none(),
            "record {offset} twice"
        );
    }
    assert_eq!(seen.len() as u64, RECORDS, "every record once");
    assert!((0..RECORDS).all(|offset| seen.contains_key(&offset)));
    // The rollback came at the failing lanes' next batch: far fewer than
    // the canary's 1,000 records were exposed to it.
    let failed = dead.len() as u64;
    assert!(
        failed > 10 && failed < 500,
        "{failed} records failed by the canary"
    );
    assert_eq!(summary.records_dead_lettered, failed);
    assert_eq!(summary.records_out + failed, RECORDS);
}
