//! The Parquet sink: files a real reader (the `parquet` crate's) reads,
//! exactly the input's rows across SIGKILLs (a file is finished and named
//! with its checkpoint in its footer, or not at all), no temporary file
//! after a clean stop, and records that do not fit dead-lettered.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use parquet::file::reader::FileReader as _;
use parquet::file::serialized_reader::SerializedFileReader;
use parquet::record::Field;

use crate::postgres::{WindowRows, assert_same_rows, events, spawn_worker};
use crate::support::Scratch;

/// Every row of every finished file in `folder`, as column -> value, and
/// the names of the files left in it.
fn read_folder(folder: &Path) -> (Vec<BTreeMap<String, Field>>, Vec<String>) {
    let mut rows = Vec::new();
    let mut names = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    for path in paths {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        names.push(name.clone());
        if !name.ends_with(".parquet") {
            continue;
        }
        let reader = SerializedFileReader::try_from(path.as_path()).unwrap();
        for row in reader.get_row_iter(None).unwrap() {
            let row = row.unwrap();
            rows.push(
                row.get_column_iter()
                    .map(|(name, field)| (name.clone(), field.clone()))
                    .collect(),
            );
        }
    }
    (rows, names)
}

fn windows_of(rows: &[BTreeMap<String, Field>]) -> WindowRows {
    let mut windows = WindowRows::new();
    for row in rows {
        let long = |name: &str| match &row[name] {
            Field::Long(n) => *n,
            other => panic!("{name}: {other:?}"),
        };
        let Field::Str(key) = &row["key"] else {
            panic!("key: {:?}", row["key"])
        };
        let window = (long("window_start"), long("window_end"), key.clone());
        let value = (long("total"), long("n"));
        assert!(
            windows.insert(window.clone(), value).is_none(),
            "{window:?} written twice"
        );
    }
    windows
}

/// File -> window -> Parquet, killed with SIGKILL five times mid-stream:
/// the finished files hold exactly the windows of the whole input, each
/// once (Parquet cannot upsert: a row written twice would stay twice), a
/// real reader reads them, and a clean end leaves no temporary file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_windows_to_parquet_survive_sigkills_exactly_once() {
    const EVENTS: i64 = 40_000;
    let scratch = Scratch::new();
    let (lines, expected) = events(EVENTS);
    std::fs::write(scratch.path("events.jsonl"), lines.join("\n") + "\n").unwrap();
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "lake"
parallelism = 1
commit_interval_ms = 100
source = { type = "file", path = "{dir}/events.jsonl", format = "json" }
batch = { max_records = 100 }

limits = { wasi = ["monotonic-clock"] }

[[pipeline.plugin]]
wasm = "{plugin:misbehave}"
config = { pace_us = 150 }

[pipeline.window]
kind = "tumbling"
size = "1s"
key = "user_id"
time = "ts"
watermark_delay = "1s"
aggregates = [ { fn = "sum", field = "amount", as = "total" }, { fn = "count", as = "n" } ]

[[pipeline.sink]]
type = "parquet"
path = "{dir}/lake"
roll_interval = "300ms"
columns = { window_start = "int64", window_end = "int64", key = "string", total = "int64", n = "int64" }
"#,
    );
    let lake = scratch.path("lake");
    let finished = |lake: &Path| {
        std::fs::read_dir(lake)
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".parquet"))
                })
                .count()
            })
            .unwrap_or(0)
    };
    for kill in 1..=5 {
        let before = finished(&lake);
        let mut worker = spawn_worker(&scratch, &path, "");
        let deadline = Instant::now() + Duration::from_secs(120);
        while finished(&lake) < before + 2 {
            assert!(
                worker.try_wait().unwrap().is_none(),
                "kill {kill}: the worker ended first"
            );
            assert!(Instant::now() < deadline, "kill {kill}: no file in 120 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..300))).await;
        worker.kill().unwrap();
        worker.wait().unwrap();
        eprintln!("kill {kill}: {} files finished", finished(&lake));
    }
    let status = spawn_worker(&scratch, &path, "").wait().unwrap();
    assert!(status.success(), "the last run exited with {status}");

    let (rows, names) = read_folder(&lake);
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("part-") && n.ends_with(".parquet")),
        "only finished files are left: {names:?}"
    );
    assert_same_rows(&windows_of(&rows), &expected);
}

/// Columns taken from the first record; a record whose field does not fit
/// its column is dead-lettered with the column, the others are rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_does_not_fit_the_inferred_columns_is_dead_lettered() {
    let scratch = Scratch::new();
    std::fs::write(
        scratch.path("in.jsonl"),
        "{\"id\":1,\"name\":\"a\",\"score\":1.5,\"ok\":true,\"tags\":[1]}\n\
         {\"id\":\"two\",\"name\":\"b\"}\n\
         {\"id\":3,\"name\":null,\"score\":2,\"extra\":1}\n\
         {\"id\":4,\"ok\":\"yes\"}\n",
    )
    .unwrap();
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "infer"
source = { type = "file", path = "{dir}/in.jsonl", format = "json" }

[[pipeline.sink]]
type = "parquet"
path = "{dir}/lake"

[pipeline.dead_letter]
type = "file"
path = "{dir}/dead.jsonl"
"#,
    );
    let output = crate::support::weir(&["run", path.to_str().unwrap()], &scratch.path("cache"));
    assert!(
        output.status.success(),
        "{}",
        crate::support::stderr(&output)
    );
    let (rows, names) = read_folder(&scratch.path("lake"));
    assert_eq!(names.len(), 1, "{names:?}");
    let ids: Vec<&Field> = rows.iter().map(|r| &r["id"]).collect();
    assert_eq!(ids, [&Field::Long(1), &Field::Long(3)]);
    assert_eq!(rows[0]["score"], Field::Double(1.5));
    assert_eq!(rows[1]["score"], Field::Double(2.0));
    assert_eq!(rows[1]["name"], Field::Null);
    assert_eq!(rows[0]["tags"], Field::Str("[1]".into()));
    assert!(!rows[0].contains_key("extra"));
    scratch.assert_dead_letter_reasons(
        "dead.jsonl",
        &[
            "field `id`: \"two\" is not an integer (column `id` is int64)",
            "field `ok`: \"yes\" is not true or false",
        ],
    );
}
