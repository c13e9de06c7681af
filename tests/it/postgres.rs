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

    /// The last source position checkpointed for `pipeline`, or 0.
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
                r#"SELECT coalesce(max("offset"), 0) FROM weir_offsets WHERE pipeline = $1"#,
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

pub(crate) fn spawn_worker(scratch: &Scratch, path: &std::path::Path) -> Child {
    Command::new(weir_bin())
        .args(["run", path.to_str().unwrap()])
        .env("WEIR_CACHE_DIR", scratch.path("cache"))
        .env("WEIR_LOG", "warn")
        .env("WEIR_WORKER_ID", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
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
        let mut worker = spawn_worker(scratch, path);
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

[[pipeline.plugin]]
wasm = "{{plugin:misbehave}}"
config = {{ pace_us = 150 }}
{}"#,
        window_to_table(&table)
    ));
    let at_kills = kill_repeatedly(&scratch, &path, &db, &pipeline, (6, 2_000, EVENTS)).await;
    assert!(at_kills.is_sorted(), "{at_kills:?}");
    let status = spawn_worker(&scratch, &path).wait().unwrap();
    assert!(status.success(), "the last run exited with {status}");

    let got = db.windows(&table).await;
    assert_eq!(got.len(), expected.len(), "one row per window and key");
    assert_eq!(got, expected, "every window exactly once, row for row");
    let finished: bool = (db.client)
        .query_one(
            "SELECT finished FROM weir_state WHERE pipeline = $1",
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
