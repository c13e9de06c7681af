use std::path::Path;

use super::*;

fn parse(text: &str) -> Result<PipelineFile, ConfigError> {
    PipelineFile::parse(Path::new("/etc/weir/p.toml"), text.to_owned())
}

const MINIMAL: &str = r#"
[[pipeline]]
name = "p"
source = { type = "file", path = "in.jsonl" }

[[pipeline.plugin]]
crate = "plugins/f"
config = { field = "amount", min = 1.5, nested = { a = [1, 2] } }

[[pipeline.sink]]
type = "file"
path = "out/x.jsonl"
"#;

#[test]
fn defaults_paths_and_plugin_config_are_filled_in() {
    let file = parse(MINIMAL).unwrap();
    let pipeline = &file.pipelines[0];
    assert_eq!(pipeline.batch.max_records, 1024);
    assert!(pipeline.batch.is_full(10, 4 << 20) && !pipeline.batch.is_full(1023, 100));
    assert_eq!(pipeline.limits().to_limits().memory_bytes, 64 << 20);
    let SourceConfig::File { path, format } = pipeline.source.get_ref() else {
        panic!("file source expected");
    };
    assert_eq!(path, Path::new("/etc/weir/in.jsonl"));
    assert_eq!(*format, LineFormat::Json);
    assert_eq!(
        pipeline.plugins[0].source().0,
        PluginSource::Crate("/etc/weir/plugins/f".into())
    );
    let config: serde_json::Value =
        serde_json::from_str(&pipeline.plugins[0].config_json()).unwrap();
    assert_eq!(
        config,
        serde_json::json!({"field": "amount", "min": 1.5, "nested": {"a": [1, 2]}})
    );
    let sink = pipeline.sinks[0].get_ref();
    assert_eq!(sink.routes(), ["default"]);
    assert_eq!(
        sink.format_or(RecordFormat::Envelope),
        RecordFormat::Envelope
    );
}

#[test]
fn unknown_keys_are_reported_with_file_and_line() {
    let text = MINIMAL.replace("path = \"out/x.jsonl\"", "paht = \"out/x.jsonl\"");
    let err = parse(&text).unwrap_err();
    // The sink's table, whose key is wrong.
    assert_eq!(err.line, 10, "{err}");
    assert!(
        err.to_string().starts_with("/etc/weir/p.toml:10: "),
        "{err}"
    );
    assert!(err.message.contains("unknown field `paht`"), "{err}");
}

#[test]
fn semantic_mistakes_point_at_their_line() {
    let twice = format!("{MINIMAL}\n{MINIMAL}");
    let err = parse(&twice).unwrap_err();
    assert!(err.message.contains("two pipelines are named `p`"), "{err}");
    assert_eq!(err.line, 16, "{err}");

    let both = MINIMAL.replace(
        "crate = \"plugins/f\"",
        "crate = \"plugins/f\"\nwasm = \"f.wasm\"",
    );
    let err = parse(&both).unwrap_err();
    assert!(err.message.contains("`wasm` or `crate`, not both"), "{err}");
    assert_eq!(err.line, 8);

    let no_sink = MINIMAL
        .split("[[pipeline.sink]]")
        .next()
        .unwrap_or_default()
        .to_owned();
    let err = parse(&no_sink).unwrap_err();
    assert!(err.message.contains("has no `[[pipeline.sink]]`"), "{err}");

    let bad_rate = MINIMAL.replace(
        "source = { type = \"file\", path = \"in.jsonl\" }",
        "source = { type = \"generator\", kind = \"payments\", malformed = 2.0 }",
    );
    let err = parse(&bad_rate).unwrap_err();
    assert!(
        err.message
            .contains("`malformed` must be within 0.0..=1.0, not 2"),
        "{err}"
    );

    let no_lanes = MINIMAL.replace(
        "source = { type = \"file\", path = \"in.jsonl\" }",
        "source = { type = \"file\", path = \"in.jsonl\" }\nparallelism = 0",
    );
    let err = parse(&no_lanes).unwrap_err();
    assert!(
        err.message
            .contains("`parallelism` is 0; it takes 1 to 256 lanes"),
        "{err}"
    );
    assert_eq!(err.line, 5, "{err}");

    let err = parse("").unwrap_err();
    assert!(err.message.contains("no `[[pipeline]]`"), "{err}");
}

#[test]
fn unknown_source_types_and_kinds_name_the_choices() {
    let text = MINIMAL.replace("type = \"file\", path", "type = \"s3\", path");
    let err = parse(&text).unwrap_err();
    assert!(err.message.contains("unknown variant `s3`"), "{err}");
    assert_eq!(err.line, 4);
}

const KAFKA: &str = r#"
[[pipeline]]
name = "k"
delivery = "exactly_once"
source = { type = "kafka", brokers = "b:9092", topics = ["payments", "clicks"] }

[[pipeline.plugin]]
wasm = "f.wasm"
topics = ["payments"]

[[pipeline.sink]]
type = "kafka"
brokers = "b:9092"
topic = "out"
route_topics = { alerts = "alerts-topic" }
options = { "security.protocol" = "ssl" }

[pipeline.dead_letter]
type = "kafka"
brokers = "b:9092"
topic = "dlq"
options = { "security.protocol" = "ssl" }
"#;

#[test]
fn kafka_pipelines_parse_with_their_pass_through_options() {
    let file = parse(KAFKA).unwrap();
    let pipeline = &file.pipelines[0];
    assert_eq!(pipeline.delivery, Delivery::ExactlyOnce);
    let SourceConfig::Kafka(source) = pipeline.source.get_ref() else {
        panic!("kafka source expected");
    };
    assert_eq!(source.group_for("k"), "weir-k");
    let SinkConfig::Kafka(sink) = pipeline.sinks[0].get_ref() else {
        panic!("kafka sink expected");
    };
    assert_eq!(sink.connection().options["security.protocol"], "ssl");
    assert_eq!(sink.route_topics["alerts"], "alerts-topic");
}

#[test]
fn exactly_once_needs_kafka_everywhere_and_plugin_topics_must_be_consumed() {
    let file_sink = KAFKA.replace(
        "type = \"kafka\"\nbrokers = \"b:9092\"\ntopic = \"out\"",
        "type = \"file\"\npath = \"out.jsonl\"",
    );
    let file_sink = file_sink.replace("route_topics = { alerts = \"alerts-topic\" }\noptions = { \"security.protocol\" = \"ssl\" }\n", "");
    let err = parse(&file_sink).unwrap_err();
    assert!(
        err.message
            .contains("needs a kafka source, kafka sinks and a kafka `dead_letter`"),
        "{err}"
    );

    let stray = KAFKA.replace("topics = [\"payments\"]", "topics = [\"payment\"]");
    let err = parse(&stray).unwrap_err();
    assert!(
        err.message
            .contains("`payment`, which pipeline `k` does not consume"),
        "{err}"
    );
    assert_eq!(err.line, 8, "{err}");
}

#[test]
fn exactly_once_sinks_must_share_the_source_cluster_and_one_set_of_options() {
    let elsewhere = KAFKA.replacen(
        "brokers = \"b:9092\"\ntopic = \"dlq\"",
        "brokers = \"other:9092\"\ntopic = \"dlq\"",
        1,
    );
    let err = parse(&elsewhere).unwrap_err();
    assert!(err.message.contains("writes to `other:9092`"), "{err}");
    assert_eq!(err.line, 18, "the dead letter's table: {err}");

    let plain = KAFKA.replace(
        "topic = \"dlq\"\noptions = { \"security.protocol\" = \"ssl\" }",
        "topic = \"dlq\"",
    );
    let err = parse(&plain).unwrap_err();
    assert!(err.message.contains("`options` differ"), "{err}");

    // The same brokers listed in another order are one cluster.
    let reordered = KAFKA
        .replace(
            "brokers = \"b:9092\", topics",
            "brokers = \"b:9092, c:9092\", topics",
        )
        .replace("brokers = \"b:9092\"\n", "brokers = \"c:9092,b:9092\"\n");
    parse(&reordered).unwrap();
}

#[test]
fn cooperative_rebalancing_is_refused_at_the_source() {
    let text = KAFKA.replace(
        "topics = [\"payments\", \"clicks\"] }",
        "topics = [\"payments\", \"clicks\"], options = { \"partition.assignment.strategy\" = \"cooperative-sticky\" } }",
    );
    let err = parse(&text).unwrap_err();
    assert!(err.message.contains("needs eager rebalancing"), "{err}");
    assert_eq!(err.line, 5, "{err}");
}

#[test]
fn a_file_written_twice_or_written_while_read_is_refused_at_its_line() {
    let into_input = MINIMAL.replace("path = \"out/x.jsonl\"", "path = \"in.jsonl\"");
    let err = parse(&into_input).unwrap_err();
    assert!(err.message.contains("would destroy its own input"), "{err}");
    assert_eq!(err.line, 10, "{err}");

    let twice = format!(
        "{MINIMAL}\n[pipeline.dead_letter]\ntype = \"file\"\npath = \"out/../out/x.jsonl\"\n"
    );
    let err = parse(&twice).unwrap_err();
    assert!(
        err.message.contains("the sink at line 10 writes too"),
        "{err}"
    );
}

#[test]
fn plugin_config_dates_reach_the_plugin_as_rfc3339_text() {
    let text = MINIMAL.replace(
        "config = { field = \"amount\", min = 1.5, nested = { a = [1, 2] } }",
        "config = { since = 1979-05-27T07:32:00Z, day = 2024-02-29, list = [08:00:00] }",
    );
    let file = parse(&text).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&file.pipelines[0].plugins[0].config_json()).unwrap();
    assert_eq!(
        config,
        serde_json::json!({"since": "1979-05-27T07:32:00Z", "day": "2024-02-29", "list": ["08:00:00"]})
    );
}

#[test]
fn absurd_numbers_are_refused_at_their_line_not_panicked_on() {
    let generator = MINIMAL.replace(
        "source = { type = \"file\", path = \"in.jsonl\" }",
        "source = { type = \"generator\", kind = \"payments\", rate = 1e-300 }",
    );
    let err = parse(&generator).unwrap_err();
    assert!(err.message.contains("`rate` is 1e-300"), "{err}");
    assert_eq!(err.line, 4, "{err}");

    let huge = format!("{MINIMAL}\n[pipeline.limits]\nmemory_mb = 17592186044416\n");
    let err = parse(&huge).unwrap_err();
    assert!(
        err.message.contains("`limits.memory_mb` is 17592186044416"),
        "{err}"
    );

    let tiny = format!("{MINIMAL}\n[pipeline.limits]\nmax_record_bytes = 10\n");
    let err = parse(&tiny).unwrap_err();
    assert!(
        err.message.contains("`limits.max_record_bytes` is 10"),
        "{err}"
    );
}

const TENANTS: &str = r#"
[[tenant]]
name = "payments"
limits = { memory_mb = 32, batch_timeout_ms = 200 }
memory_mb_total = 128
topics = ["payments.*", "payments-dlq"]
routes = ["alerts"]

[[tenant]]
name = "clicks"
topics = ["clicks.*"]
"#;

/// A Kafka -> Kafka pipeline of tenant `payments` with `extra` lines in
/// its table and `sink` as its sink's lines.
fn tenant_pipeline(extra: &str, sink: &str) -> String {
    format!(
        r#"{TENANTS}
[[pipeline]]
name = "p"
tenant = "payments"
parallelism = 2
source = {{ type = "kafka", brokers = "k:9092", topics = ["payments"] }}
{extra}

[[pipeline.plugin]]
crate = "plugins/f"

[[pipeline.sink]]
type = "kafka"
brokers = "k:9092"
{sink}
"#
    )
}

#[test]
fn a_tenant_s_limits_are_its_pipelines_defaults_and_ceilings() {
    let file = parse(&tenant_pipeline("", r#"topic = "payments.large""#)).unwrap();
    let limits = file.pipelines[0].limits();
    assert_eq!((limits.memory_mb, limits.batch_timeout_ms), (32, 200));
    // Set by the pipeline, at or under the tenant's: taken; the rest the
    // tenant's.
    let lower = tenant_pipeline("limits = { memory_mb = 16 }", r#"topic = "payments.large""#);
    let limits = parse(&lower).unwrap().pipelines[0].limits();
    assert_eq!((limits.memory_mb, limits.batch_timeout_ms), (16, 200));
    let over = tenant_pipeline(
        "limits = { batch_timeout_ms = 5000 }",
        r#"topic = "payments.large""#,
    );
    // A longer fault window is stricter (more faults count): taken; a
    // shorter one is not.
    let stricter = tenant_pipeline(
        "limits = { fault_window_s = 600 }",
        r#"topic = "payments.large""#,
    );
    assert_eq!(
        parse(&stricter).unwrap().pipelines[0]
            .limits()
            .fault_window_s,
        600
    );
    let looser = tenant_pipeline(
        "limits = { fault_window_s = 5 }",
        r#"topic = "payments.large""#,
    );
    let err = parse(&looser).unwrap_err();
    assert!(
        err.message
            .contains("is looser than what tenant `payments` grants (60)"),
        "{err}"
    );
    // A tenant's CPU budget cannot be turned off (0) by a pipeline.
    let cpu = TENANTS.replace("memory_mb = 32,", "memory_mb = 32, cpu_ms_per_batch = 50,");
    let free = tenant_pipeline(
        "limits = { cpu_ms_per_batch = 0 }",
        r#"topic = "payments.large""#,
    )
    .replace(TENANTS, &cpu);
    let err = parse(&free).unwrap_err();
    assert!(
        err.message.contains(
            "`limits.cpu_ms_per_batch = 0` is looser than what tenant `payments` grants (50)"
        ),
        "{err}"
    );
    let err = parse(&over).unwrap_err();
    assert_eq!(err.line, 18, "{err}");
    assert!(
        err.message.contains(
            "`limits.batch_timeout_ms = 5000` is looser than what tenant `payments` grants (200)"
        ),
        "{err}"
    );
}

#[test]
fn wasi_grants_are_named_and_held_to_the_tenant_s() {
    // None by default; the tenant's grants are its pipelines' defaults.
    let file = parse(&tenant_pipeline("", r#"topic = "payments.large""#)).unwrap();
    assert_eq!(file.pipelines[0].limits().to_limits().wasi, WasiGrants::default());
    let granting = TENANTS.replace(
        "memory_mb = 32,",
        r#"memory_mb = 32, wasi = ["monotonic-clock", "random"],"#,
    );
    let with = |extra: &str| {
        tenant_pipeline(extra, r#"topic = "payments.large""#).replace(TENANTS, &granting)
    };
    let file = parse(&with("")).unwrap();
    let grants = file.pipelines[0].limits().to_limits().wasi;
    assert!(grants.monotonic_clock && grants.random && !grants.wall_clock);
    // A pipeline may take fewer, not others.
    let fewer = parse(&with(r#"limits = { wasi = ["random"] }"#)).unwrap();
    let grants = fewer.pipelines[0].limits().to_limits().wasi;
    assert!(grants.random && !grants.monotonic_clock);
    let err = parse(&with(r#"limits = { wasi = ["wall-clock"] }"#)).unwrap_err();
    assert!(
        err.message.contains(
            "`limits.wasi` asks for `wall-clock`, which tenant `payments` does not grant (it grants: [monotonic-clock, random])"
        ),
        "{err}"
    );
    // An unknown capability, at its line.
    let err = parse(&tenant_pipeline(
        r#"limits = { wasi = ["network"] }"#,
        r#"topic = "payments.large""#,
    ))
    .unwrap_err();
    assert!(
        err.message.contains("`limits.wasi` has `network`; it may hold `monotonic-clock`, `wall-clock`, `random`"),
        "{err}"
    );
}

#[test]
fn a_pipeline_cannot_write_a_topic_or_take_a_route_its_tenant_does_not_grant() {
    // Another tenant's topic, as the sink's topic or a route's.
    for sink in [
        r#"topic = "clicks.raw""#,
        r#"topic = "payments.large"
route_topics = { alerts = "clicks.alerts" }
routes = ["default", "alerts"]"#,
    ] {
        let err = parse(&tenant_pipeline("", sink)).unwrap_err();
        assert_eq!(err.line, 23, "{err}");
        assert!(
            err.message
                .contains("tenant `payments` may not write Kafka topic `clicks."),
            "{err}"
        );
    }
    let err = parse(&tenant_pipeline(
        "",
        r#"topic = "payments.large"
routes = ["audit"]"#,
    ))
    .unwrap_err();
    assert!(
        err.message
            .contains("tenant `payments` may not take route `audit`"),
        "{err}"
    );
    // What it grants passes: a prefix, a route.
    parse(&tenant_pipeline(
        "",
        r#"topic = "payments.large"
route_topics = { alerts = "payments.alerts" }
routes = ["default", "alerts"]"#,
    ))
    .unwrap();
}

#[test]
fn a_tenant_s_memory_budget_bounds_all_its_instances_together() {
    // Each pipeline: 2 lanes x 1 plugin x 32 MiB (the tenant's default) =
    // 64 MiB. One fits the budget of 128 MiB; three make 192.
    parse(&tenant_pipeline("", r#"topic = "payments.a""#)).unwrap();
    let mut text = tenant_pipeline("", r#"topic = "payments.a""#);
    for name in ["q", "r"] {
        text += &format!(
            r#"
[[pipeline]]
name = "{name}"
tenant = "payments"
parallelism = 2
source = {{ type = "kafka", brokers = "k:9092", topics = ["payments"] }}

[[pipeline.plugin]]
crate = "plugins/f"

[[pipeline.sink]]
type = "kafka"
brokers = "k:9092"
topic = "payments.{name}"
"#
        );
    }
    let err = parse(&text).unwrap_err();
    assert_eq!(err.line, 5, "{err}");
    assert!(
        err.message
            .contains("tenant `payments`: its plugins may use up to 192 MiB")
            && err
                .message
                .contains("over its `memory_mb_total` of 128 MiB"),
        "{err}"
    );
}

#[test]
fn a_pipeline_names_a_tenant_that_exists() {
    let text = tenant_pipeline("", r#"topic = "payments.a""#)
        .replace(r#"tenant = "payments""#, r#"tenant = "nobody""#);
    let err = parse(&text).unwrap_err();
    assert_eq!(err.line, 15, "{err}");
    assert!(
        err.message.contains("no `[[tenant]]` is named `nobody`"),
        "{err}"
    );
}
