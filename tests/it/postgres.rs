//! The PostgreSQL sink against the real server on 127.0.0.1:5432 (database
//! `test`): windows upserted row for row across SIGKILLs, checkpoints in
//! the same transaction as the rows, a server that drops every connection
//! mid-run, and clear errors for what is wrong with a table or a record.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use crate::support::{Scratch, weir_bin};

/// The server every machine here runs (trust auth).
pub(crate) const URL: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

/// Window rows: (start, end, key) -> (total, n).
pub(crate) type WindowRows = BTreeMap<(i64, i64, String), (i64, i64)>;

/// A connection for the test, and names unique to it (tests run at once,
/// and again and again under `soak`).
pub(crate) struct Db {
    pub(crate) client: Client,
    suffix: String,
}

impl Db {
    pub(crate) async fn connect() -> Self {
        let (client, connection) = tokio_postgres::connect(URL, NoTls)
            .await
            .expect("PostgreSQL on 127.0.0.1:5432, database `test`");
        tokio::spawn(connection);
        Db {
            client,
            suffix: format!("{}_{}", std::process::id(), fastrand::u32(..)),
        }
    }

    /// `prefix` made unique to this test: a table or pipeline name.
    pub(crate) fn name(&self, prefix: &str) -> String {
        format!("{prefix}_{}", self.suffix)
    }

    /// The source positions checkpointed for `pipeline`, summed over its
    /// partitions (a file's: its last line), or 0.
    pub(crate) async fn checkpointed(&self, pipeline: &str) -> i64 {
        let exists: bool = (self.client)
            .query_one("SELECT to_regclass('weir_offsets') IS NOT NULL", &[])
            .await
            .unwrap()
            .get(0);
        if !exists {
            return 0;
        }
        (self.client)
            .query_one(
                r#"SELECT coalesce(sum("offset"), 0)::bigint FROM weir_offsets WHERE pipeline = $1"#,
                &[&pipeline],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Every row of a window table: (start, end, key) -> (total, n).
    pub(crate) async fn windows(&self, table: &str) -> WindowRows {
        let rows = (self.client)
            .query(
                &format!("SELECT window_start, window_end, key, total, n FROM {table}"),
                &[],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| ((r.get(0), r.get(1), r.get(2)), (r.get(3), r.get(4))))
            .collect()
    }

    /// Forgets what tests named like this left behind.
    pub(crate) async fn drop_table(&self, table: &str) {
        (self.client)
            .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
            .await
            .unwrap();
    }
}

/// `count` JSON events, keyed by 40 users, event time 1 ms apart, each up
/// to 300 ms off (so never late with a 1 s watermark delay), and the
/// windows (start, end, key) -> (total, n) a 1 s tumbling window makes of
/// them.
pub(crate) fn events(count: i64) -> (Vec<String>, WindowRows) {
    let mut rng = fastrand::Rng::with_seed(17);
    let mut lines = Vec::new();
    let mut windows = WindowRows::new();
    for i in 0..count {
        let user = format!("u{}", rng.u8(0..40));
        let ts = 1_700_000_000_000 + i + rng.i64(-300..300);
        let amount = rng.i64(1..1000);
        lines.push(format!(
            r#"{{"user_id":"{user}","ts":{ts},"amount":{amount}}}"#
        ));
        let start = ts.div_euclid(1000) * 1000;
        let window = windows.entry((start, start + 1000, user)).or_default();
        window.0 += amount;
        window.1 += 1;
    }
    (lines, windows)
}

/// The table has exactly `expected`'s rows; if not, says which differ.
pub(crate) fn assert_same_rows(got: &WindowRows, expected: &WindowRows) {
    let differ: Vec<String> = (expected.iter())
        .filter(|(key, value)| got.get(*key) != Some(*value))
        .map(|(key, value)| format!("{key:?}: {:?}, expected {value:?}", got.get(key)))
        .chain(
            (got.iter())
                .filter(|(key, _)| !expected.contains_key(*key))
                .map(|(key, value)| format!("{key:?}: {value:?}, expected no row")),
        )
        .collect();
    assert!(
        differ.is_empty(),
        "{} of {} rows differ, the first: {:#?}",
        differ.len(),
        expected.len(),
        &differ[..differ.len().min(10)]
    );
}

/// The window and sink part of a pipeline file: 1 s tumbling windows of
/// the events' amounts into `table`, created, upserted on (start, key).
pub(crate) fn window_to_table(table: &str) -> String {
    format!(
        r#"
[pipeline.window]
kind = "tumbling"
size = "1s"
key = "user_id"
time = "ts"
watermark_delay = "1s"
aggregates = [ {{ fn = "sum", field = "amount", as = "total" }}, {{ fn = "count", as = "n" }} ]

[[pipeline.sink]]
type = "postgres"
url = "{URL}"
table = "{table}"
key = ["window_start", "key"]
create_table = true
columns = {{ window_start = "bigint", window_end = "bigint", key = "text", total = "bigint", n = "bigint" }}
"#
    )
}

/// A `weir run` child, killed if the test ends (or fails) first.
pub(crate) struct Worker(Child);

impl std::ops::Deref for Worker {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Worker {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Worker `id` of `path` (`""`: a worker with no id, a dynamic member of
/// its group).
pub(crate) fn spawn_worker(scratch: &Scratch, path: &std::path::Path, id: &str) -> Worker {
    let mut command = Command::new(weir_bin());
    if !id.is_empty() {
        command.env("WEIR_WORKER_ID", id);
    }
    let child = command
        .args(["run", path.to_str().unwrap()])
        .env("WEIR_CACHE_DIR", scratch.path("cache"))
        .env("WEIR_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Worker(child)
}

/// Kills a worker of `path` with SIGKILL `kills` times, each time once its
/// checkpoint moved `step` positions further plus a random moment more,
/// checking that each kill came before `total` (mid-stream); gives the
/// positions checkpointed at each kill.
pub(crate) async fn kill_repeatedly(
    scratch: &Scratch,
    path: &std::path::Path,
    db: &Db,
    pipeline: &str,
    (kills, step, total): (usize, i64, i64),
) -> Vec<i64> {
    let mut at_kills = Vec::new();
    let mut last = db.checkpointed(pipeline).await;
    for kill in 1..=kills {
        let mut worker = spawn_worker(scratch, path, "1");
        let deadline = Instant::now() + Duration::from_secs(120);
        while db.checkpointed(pipeline).await < last + step {
            if let Ok(Some(status)) = worker.try_wait() {
                panic!("kill {kill}: the worker exited ({status}) before it could be killed");
            }
            assert!(
                Instant::now() < deadline,
                "kill {kill}: no progress in 120 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..200))).await;
        worker.kill().unwrap();
        worker.wait().unwrap();
        last = db.checkpointed(pipeline).await;
        eprintln!("kill {kill}: checkpointed up to {last} of {total}");
        assert!(
            last < total,
            "kill {kill} came after the end: it tested nothing"
        );
        at_kills.push(last);
    }
    at_kills
}

/// File -> window -> PostgreSQL, the worker killed with SIGKILL six times
/// at random moments mid-stream and restarted: the table ends up exactly
/// the windows of the whole input, row for row (no window lost, none
/// counted twice), because the rows, the file position and the open
/// windows commit in one transaction and a restart resumes from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_windows_to_postgres_survive_sigkills_row_for_row() {
    const EVENTS: i64 = 40_000;
    let db = Db::connect().await;
    let (table, pipeline) = (db.name("crash_windows"), db.name("crash"));
    let scratch = Scratch::new();
    let (lines, expected) = events(EVENTS);
    std::fs::write(scratch.path("events.jsonl"), lines.join("\n") + "\n").unwrap();
    // 150 us a record: the 40,000 events take 6 s, so the kills land
    // mid-stream.
    let path = scratch.pipeline(&format!(
        r#"
[[pipeline]]
name = "{pipeline}"
parallelism = 1
commit_interval_ms = 100
source = {{ type = "file", path = "{{dir}}/events.jsonl", format = "json" }}
batch = {{ max_records = 100 }}

limits = {{ wasi = ["monotonic-clock"] }}

[[pipeline.plugin]]
wasm = "{{plugin:misbehave}}"
config = {{ pace_us = 150 }}
{}"#,
        window_to_table(&table)
    ));
    let at_kills = kill_repeatedly(&scratch, &path, &db, &pipeline, (6, 2_000, EVENTS)).await;
    assert!(at_kills.is_sorted(), "{at_kills:?}");
    let status = spawn_worker(&scratch, &path, "1").wait().unwrap();
    assert!(status.success(), "the last run exited with {status}");

    assert_same_rows(&db.windows(&table).await, &expected);
    let finished: bool = (db.client)
        .query_one(
            "SELECT bool_and(finished) FROM weir_offsets WHERE pipeline = $1",
            &[&pipeline],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        finished,
        "the last checkpoint says the file was read to its end"
    );
    db.drop_table(&table).await;
}

/// A file of `count` JSON records with ids 0..count, through a plugin
/// that takes `pace_us` a record, into `table` (no key columns: plain
/// inserts), created.
fn records_to_keyless_table(
    scratch: &Scratch,
    pipeline: &str,
    table: &str,
    count: usize,
) -> std::path::PathBuf {
    let lines: Vec<String> = (0..count)
        .map(|i| {
            format!(
                r#"{{"id":{i},"user_id":"u{}","amount":{}}}"#,
                i % 7,
                i % 1000
            )
        })
        .collect();
    std::fs::write(scratch.path("records.jsonl"), lines.join("\n") + "\n").unwrap();
    scratch.pipeline(&format!(
        r#"
[[pipeline]]
name = "{pipeline}"
parallelism = 1
commit_interval_ms = 50
source = {{ type = "file", path = "{{dir}}/records.jsonl", format = "json" }}
batch = {{ max_records = 100 }}

limits = {{ wasi = ["monotonic-clock"] }}

[[pipeline.plugin]]
wasm = "{{plugin:misbehave}}"
config = {{ pace_us = 100 }}

[[pipeline.sink]]
type = "postgres"
url = "{URL}"
table = "{table}"
create_table = true
columns = {{ id = "bigint", user_id = "text", amount = "integer" }}
"#
    ))
}

/// Every backend of the worker killed (`pg_terminate_backend`) again and
/// again mid-run, into a table with no key (where a row written twice
/// would stay twice): the worker rides it out, and every record is in the
/// table exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_arrives_exactly_once_while_its_backends_are_killed() {
    const RECORDS: usize = 30_000;
    let db = Db::connect().await;
    let (table, pipeline) = (db.name("terminated"), db.name("terminated"));
    let scratch = Scratch::new();
    let path = records_to_keyless_table(&scratch, &pipeline, &table, RECORDS);
    let mut worker = spawn_worker(&scratch, &path, "1");
    let application = format!("weir/{pipeline}");
    let mut terminations = 0;
    let status = loop {
        if let Some(status) = worker.try_wait().unwrap() {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(100..400))).await;
        // In the select list, not the filter: only the worker's backends.
        let killed = (db.client)
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE application_name = $1",
                &[&application],
            )
            .await
            .unwrap();
        if killed.iter().any(|row| row.get::<_, bool>(0)) {
            terminations += 1;
        }
    };
    assert!(status.success(), "the worker exited with {status}");
    assert!(
        terminations >= 5,
        "only {terminations} kills landed: the run ended too soon to test anything"
    );
    let (rows, ids): (i64, i64) = {
        let row = (db.client)
            .query_one(
                &format!("SELECT count(*), count(DISTINCT id) FROM {table}"),
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(
        (rows, ids),
        (RECORDS as i64, RECORDS as i64),
        "after {terminations} kills"
    );
    db.drop_table(&table).await;
}

/// What is wrong with a table or a server is said at open, naming the
/// table and the sink's line; a record that does not fit its column is
/// dead-lettered with the column at fault while the others go in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_or_record_that_does_not_fit_is_named() {
    let db = Db::connect().await;
    let scratch = Scratch::new();
    let (table, pipeline) = (db.name("fit"), db.name("fit"));
    db.client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, amount integer);
             CREATE TABLE {table}_nokey (id bigint, amount integer);"
        ))
        .await
        .unwrap();
    std::fs::write(
        scratch.path("in.jsonl"),
        "{\"id\":1,\"amount\":5}\n{\"id\":2,\"amount\":\"lots\"}\n{\"id\":3,\"amount\":3000000000}\n{\"amount\":7}\n{\"id\":4}\n",
    )
    .unwrap();
    let run = |sink: &str| {
        let path = scratch.pipeline(&format!(
            r#"
[[pipeline]]
name = "{pipeline}"
source = {{ type = "file", path = "{{dir}}/in.jsonl", format = "json" }}

[[pipeline.sink]]
type = "postgres"
{sink}

[pipeline.dead_letter]
type = "file"
path = "{{dir}}/dead.jsonl"
"#
        ));
        let output = crate::support::weir(&["run", path.to_str().unwrap()], &scratch.path("cache"));
        (output.status.success(), crate::support::stderr(&output))
    };

    let (ok, err) = run(&format!("url = \"{URL}\"\ntable = \"{table}_missing\""));
    assert!(!ok);
    assert!(
        err.contains(&format!("postgres table \"{table}_missing\""))
            && err.contains("does not exist")
            && err.contains("pipeline.toml:"),
        "{err}"
    );
    let (ok, err) = run(&format!(
        "url = \"host=127.0.0.1 port=5432 user=no_such_role dbname=test\"\ntable = \"{table}\""
    ));
    assert!(!ok);
    assert!(err.contains("no_such_role"), "{err}");
    let (ok, err) = run(&format!(
        "url = \"{URL}\"\ntable = \"{table}_nokey\"\nkey = [\"id\"]"
    ));
    assert!(!ok);
    assert!(err.contains("no unique index or primary key"), "{err}");

    let (ok, err) = run(&format!(
        "url = \"{URL}\"\ntable = \"{table}\"\nkey = [\"id\"]"
    ));
    assert!(ok, "{err}");
    let rows = (db.client)
        .query(&format!("SELECT id, amount FROM {table} ORDER BY id"), &[])
        .await
        .unwrap();
    let rows: Vec<(i64, Option<i32>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(rows, [(1, Some(5)), (4, None)], "the records that fit");
    scratch.assert_dead_letter_reasons(
        "dead.jsonl",
        &[
            "\"lots\" is not an integer (column `amount` is integer)",
            "out of the column's range",
            "key column `id` has no field",
        ],
    );
    db.drop_table(&table).await;
    db.drop_table(&format!("{table}_nokey")).await;
}

/// Produces [`events`]`(count)` to a new topic `events` of `partitions`
/// partitions, each user's in one partition (as Kafka's partitioner would
/// put them), then in each partition an event an hour later that closes
/// every window before it (its own stays open: it is in no row). Gives
/// the sum of the offsets of the last real events, and the windows.
async fn produce_events(
    broker: &crate::broker::Broker,
    count: i64,
    partitions: i32,
) -> (i64, WindowRows) {
    broker.create_topic("events", partitions).await;
    let (lines, expected) = events(count);
    let mut by_partition: Vec<Vec<(String, String)>> = vec![Vec::new(); partitions as usize];
    for line in &lines {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        let user = event["user_id"].as_str().unwrap().to_owned();
        let partition = user[1..].parse::<usize>().unwrap() % partitions as usize;
        by_partition[partition].push((user, line.clone()));
    }
    for (partition, events) in by_partition.iter_mut().enumerate() {
        let closer = format!(
            r#"{{"user_id":"closer","ts":{},"amount":0}}"#,
            1_700_003_600_000i64
        );
        events.push(("closer".into(), closer));
        broker
            .produce_to_partition("events", partition as i32, events)
            .await;
    }
    let total = by_partition.iter().map(|p| p.len() as i64 - 2).sum();
    (total, expected)
}

/// The pipeline file of a Kafka -> window -> PostgreSQL worker: topic
/// `events` of `broker`, through a plugin that takes `pace_us` a record.
fn kafka_pipeline(
    scratch: &Scratch,
    broker: &crate::broker::Broker,
    pipeline: &str,
    table: &str,
    pace_us: u64,
) -> std::path::PathBuf {
    scratch.pipeline(&format!(
        r#"
[[pipeline]]
name = "{pipeline}"
parallelism = 2
commit_interval_ms = 100
source = {{ type = "kafka", brokers = "{brokers}", topics = ["events"], group = "{pipeline}", start = "earliest" }}
batch = {{ max_records = 100, linger_ms = 5 }}

limits = {{ wasi = ["monotonic-clock"] }}

[[pipeline.plugin]]
wasm = "{{plugin:misbehave}}"
config = {{ pace_us = {pace_us} }}
{}"#,
        window_to_table(table),
        brokers = broker.brokers(),
    ))
}

/// Waits until `pipeline` has checkpointed `total` and `table` has every
/// one of `expected`'s rows, while `worker` runs; then stops it cleanly.
async fn finish(
    db: &Db,
    pipeline: &str,
    table: &str,
    (total, expected): (i64, usize),
    mut worker: Worker,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while db.checkpointed(pipeline).await < total || db.windows(table).await.len() < expected {
        assert!(
            worker.try_wait().unwrap().is_none(),
            "the last worker exited"
        );
        assert!(
            Instant::now() < deadline,
            "the last worker did not finish in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = worker.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = worker.wait().unwrap();
    assert!(status.success(), "the last worker exited with {status}");
    drop(worker);
}

/// Kafka (6 partitions) -> window -> PostgreSQL, the worker killed with
/// SIGKILL six times mid-stream: every partition resumes from the offset
/// its checkpoint in PostgreSQL holds (not the group's commit, which lags
/// it) with its windows as they were, and the table ends up exactly the
/// windows of the whole input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_windows_to_postgres_survive_sigkills_row_for_row() {
    const EVENTS: i64 = 30_000;
    const PARTITIONS: i32 = 6;
    let broker = crate::broker::Broker::start();
    let (total, expected) = produce_events(&broker, EVENTS, PARTITIONS).await;
    let db = Db::connect().await;
    let (table, pipeline) = (db.name("kafka_windows"), db.name("kafka_crash"));
    let scratch = Scratch::new();
    let path = kafka_pipeline(&scratch, &broker, &pipeline, &table, 150);
    let at_kills = kill_repeatedly(&scratch, &path, &db, &pipeline, (6, 2_000, total)).await;
    assert!(at_kills.is_sorted(), "{at_kills:?}");
    let worker = spawn_worker(&scratch, &path, "1");
    finish(&db, &pipeline, &table, (total, expected.len()), worker).await;

    assert_same_rows(&db.windows(&table).await, &expected);
    db.drop_table(&table).await;
}

/// Two workers of one Kafka -> window -> PostgreSQL pipeline share 6
/// partitions. The first stops mid-stream (it leaves the group): its
/// partitions move to the second, which claims them and takes up their
/// windows from their last checkpoints (no shared disk: they are in
/// PostgreSQL). Then the second is killed with SIGKILL and its successor
/// (same worker name, a fresh process) takes everything up from the
/// checkpoints. The table ends up exactly
/// the windows of the whole input.
///
/// (The test broker never expires the session of a member killed with
/// SIGKILL, so a survivor is never given its partitions; Apache Kafka
/// gives them after `session.timeout.ms`, 10 s, and they are claimed
/// just as here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_s_partitions_and_windows_move_to_the_other_and_survive_sigkill() {
    const EVENTS: i64 = 30_000;
    let broker = crate::broker::Broker::start();
    let (total, expected) = produce_events(&broker, EVENTS, 6).await;
    let db = Db::connect().await;
    let (table, pipeline) = (db.name("moved_windows"), db.name("moved"));
    let scratch = Scratch::new();
    let path = kafka_pipeline(&scratch, &broker, &pipeline, &table, 300);
    // The first a dynamic member: it leaves the group when it stops. The
    // second a static one: killed, it is taken up by a worker of its name.
    let mut first = spawn_worker(&scratch, &path, "");
    let mut second = spawn_worker(&scratch, &path, "2");
    let owned_by = |worker: &Worker| format!("%/{}/%", worker.id());
    let progress = |pattern: String| {
        let db = &db;
        let pipeline = pipeline.clone();
        async move {
            // Until a worker has made (or updated) the table, nothing.
            let row = (db.client)
                .query_one(
                    r#"SELECT count(*), coalesce(sum("offset"), 0)::bigint FROM weir_offsets
                       WHERE pipeline = $1 AND owner LIKE $2 AND "offset" >= 0"#,
                    &[&pipeline, &pattern],
                )
                .await;
            row.map_or((0, 0), |row| (row.get::<_, i64>(0), row.get::<_, i64>(1)))
        }
    };
    // Both at work, each some way into its partitions.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (mine, handled) = progress(owned_by(&first)).await;
        let (theirs, done) = progress(owned_by(&second)).await;
        if mine > 0 && theirs > 0 && handled >= 1_000 && done >= 1_000 {
            break;
        }
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first worker exited"
        );
        assert!(
            second.try_wait().unwrap().is_none(),
            "the second worker exited"
        );
        assert!(
            Instant::now() < deadline,
            "the two workers did not share the partitions in 90 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first_owner = owned_by(&first);
    let pid = first.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = first.wait().unwrap();
    assert!(status.success(), "the first worker stopped with {status}");
    drop(first);
    let (moved, handled) = progress(first_owner.clone()).await;
    eprintln!("the first worker left with {moved} partitions, {handled} offsets checkpointed");
    assert!(
        handled < total,
        "the first worker stopped after the end: it tested nothing"
    );

    // The second takes them over (each claimed from the first), goes on,
    // and is killed mid-stream.
    let second_owner = owned_by(&second);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (mine, handled) = progress(second_owner.clone()).await;
        if mine == 6 && handled >= db.checkpointed(&pipeline).await.min(total) && handled > 0 {
            let (left, _) = progress(first_owner.clone()).await;
            assert_eq!(left, 0);
            break;
        }
        assert!(
            second.try_wait().unwrap().is_none(),
            "the second worker exited"
        );
        assert!(
            Instant::now() < deadline,
            "the second worker did not take over in 90 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = db.checkpointed(&pipeline).await;
    while db.checkpointed(&pipeline).await < before + 1_000 {
        assert!(
            second.try_wait().unwrap().is_none(),
            "the second worker exited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    second.kill().unwrap();
    second.wait().unwrap();
    drop(second);
    let killed_at = db.checkpointed(&pipeline).await;
    eprintln!("killed the second worker at {killed_at} of {total}");
    assert!(
        killed_at < total,
        "the kill came after the end: it tested nothing"
    );

    let third = spawn_worker(&scratch, &path, "2");
    finish(&db, &pipeline, &table, (total, expected.len()), third).await;
    assert_same_rows(&db.windows(&table).await, &expected);
    db.drop_table(&table).await;
}
