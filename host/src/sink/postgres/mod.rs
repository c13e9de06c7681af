//! The `postgres` sink: each record (a JSON object) becomes a row of a
//! table, its fields the columns of the same name; rows are upserted on
//! the configured key columns, so a record written again (a replay after a
//! crash) replaces its row instead of doubling it.
//!
//! Rows wait in memory and go in at a commit, in one transaction, a few
//! thousand rows per statement (`UNNEST` of one text array per column,
//! cast by the server to the columns' types). The sink keeps the
//! pipeline's checkpoint (each source partition's position and window
//! state) in the same transaction, in `weir_offsets`: rows, positions and
//! state commit together or not at all (effectively-once), and a
//! restarting pipeline resumes from them ([`last_checkpoint`]).
//!
//! When the server goes away (a restart, a killed backend, a network
//! failure) the transaction is tried again on a new connection, with
//! backoff, for as long as it takes: the rows are still in memory, and the
//! pipeline waits (backpressure) meanwhile. Any other error (a missing
//! table, a type the server refuses) stops the pipeline naming the table.

mod columns;
mod config;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

use super::{Sink, SinkError};
use crate::batch::{RecordRef, Records};
use crate::record::SourcePosition;
use crate::state::{Claimer, PartitionState, Snapshot, worker_id};
use columns::{Column, Kind, quote};

pub use config::PostgresSinkConfig;

/// The tables a pipeline's checkpoints live in, created when missing.
const CHECKPOINT_TABLES: &str = r#"
CREATE TABLE IF NOT EXISTS weir_offsets (
    pipeline text NOT NULL,
    topic text NOT NULL,
    "partition" integer NOT NULL,
    "offset" bigint NOT NULL,
    window_state bytea,
    finished boolean NOT NULL DEFAULT false,
    commit_token bigint NOT NULL DEFAULT 0,
    owner text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, topic, "partition")
);
-- A table made by an earlier version gains what this one writes.
ALTER TABLE weir_offsets
    ADD COLUMN IF NOT EXISTS window_state bytea,
    ADD COLUMN IF NOT EXISTS finished boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS commit_token bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS owner text;
"#;
/// Writes records as rows of a PostgreSQL table.
pub struct PostgresSink {
    config: PostgresSinkConfig,
    /// `postgres table "NAME"`.
    described: String,
    pipeline: String,
    client: Option<Client>,
    columns: Vec<Column>,
    insert: String,
    /// Rows waiting for the next commit, column by column.
    pending: Vec<Vec<Option<String>>>,
    rows: usize,
    /// With key columns: each waiting row's place, by its key (a later
    /// record of the same key replaces the earlier one: one statement
    /// cannot upsert a row twice).
    by_key: HashMap<Vec<Option<String>>, usize>,
}

impl PostgresSink {
    /// Connects, creates the table if asked to, and reads its columns; a
    /// server that is away is waited for a while (see [`starting`]).
    pub async fn open(config: PostgresSinkConfig, pipeline: &str) -> Result<Self, SinkError> {
        let described = format!("postgres table {:?}", config.table);
        let fail = |message: String| SinkError::Io {
            sink: described.clone(),
            source: std::io::Error::other(message),
        };
        config.check().map_err(&fail)?;
        let (client, columns) = starting(&described, || prepare(&config, pipeline))
            .await
            .map_err(fail)?;
        let insert = insert_statement(&quote(&config.table), &columns);
        Ok(PostgresSink {
            pending: vec![Vec::new(); columns.len()],
            columns,
            insert,
            described,
            pipeline: pipeline.to_owned(),
            client: Some(client),
            config,
            rows: 0,
            by_key: HashMap::new(),
        })
    }

    fn error(&self, message: impl std::fmt::Display) -> SinkError {
        SinkError::Io {
            sink: self.described.clone(),
            source: std::io::Error::other(message.to_string()),
        }
    }

    fn push(&mut self, row: Vec<Option<String>>) {
        if !self.config.key.is_empty() {
            let key: Vec<Option<String>> = (self.columns.iter().zip(&row))
                .filter(|(column, _)| column.key)
                .map(|(_, text)| text.clone())
                .collect();
            if let Some(&at) = self.by_key.get(&key) {
                for (column, text) in self.pending.iter_mut().zip(row) {
                    column[at] = text;
                }
                return;
            }
            self.by_key.insert(key, self.rows);
        }
        for (column, text) in self.pending.iter_mut().zip(row) {
            column.push(text);
        }
        self.rows += 1;
    }

    /// Commits the waiting rows, and `snapshot` if given, in one
    /// transaction; tries again on a new connection while the server is
    /// away.
    ///
    /// A connection lost during `COMMIT` leaves it unknown whether the
    /// transaction went through. With a checkpoint the answer is in the
    /// table: each checkpoint marks its partitions' rows with a token of
    /// its own, so the sink looks for it before trying again (otherwise
    /// rows of a table without key columns would go in twice).
    async fn commit_rows(&mut self, snapshot: Option<&Snapshot>) -> Result<(), SinkError> {
        let mut backoff = Duration::from_millis(100);
        let mut failures = 0u32;
        let mut unsure = false;
        let token = fastrand::i64(1..);
        let marked = snapshot.is_some_and(|s| !s.partitions.is_empty());
        loop {
            let Some(client) = &mut self.client else {
                match connect(&self.config.url, &self.pipeline).await {
                    Ok(client) => self.client = Some(client),
                    Err(err) => {
                        self.away(&err, &mut failures, &mut backoff).await?;
                    }
                }
                continue;
            };
            if unsure && marked {
                match committed(client, &self.pipeline, token).await {
                    Ok(true) => break,
                    Ok(_) => {}
                    Err(err) => {
                        self.away(&err, &mut failures, &mut backoff).await?;
                        continue;
                    }
                }
            }
            let rows = (self.insert.as_str(), &self.pending[..], self.rows);
            let checkpoint = snapshot.map(|snapshot| (snapshot, token));
            match transaction(
                client,
                rows,
                self.config.batch_rows,
                &self.pipeline,
                checkpoint,
            )
            .await
            {
                Ok(()) => break,
                Err(Failed { err, at_commit }) => {
                    unsure = at_commit;
                    self.away(&err, &mut failures, &mut backoff).await?;
                }
            }
        }
        if failures > 0 {
            tracing::info!(sink = %self.described, "PostgreSQL is back; the transaction went through.");
        }
        self.pending.iter_mut().for_each(Vec::clear);
        self.by_key.clear();
        self.rows = 0;
        Ok(())
    }

    /// After `err`: waits to try again if the server is away (dropping
    /// the connection), or gives the error that stops the pipeline.
    async fn away(
        &mut self,
        err: &tokio_postgres::Error,
        failures: &mut u32,
        backoff: &mut Duration,
    ) -> Result<(), SinkError> {
        if !is_transient(err) {
            return Err(self.error(explain(err)));
        }
        *failures += 1;
        if *failures == 1 || failures.is_power_of_two() {
            tracing::warn!(sink = %self.described, error = %explain(err), attempt = *failures, "PostgreSQL is away; trying the transaction again (the pipeline waits).");
        }
        self.client = None;
        tokio::time::sleep(*backoff).await;
        *backoff = (*backoff * 2).min(Duration::from_secs(5));
        Ok(())
    }
}

/// Why a start-up step failed: the server is away (worth waiting for) or
/// something is wrong that waiting does not mend.
enum Startup {
    Away(String),
    Wrong(String),
}

impl From<tokio_postgres::Error> for Startup {
    fn from(err: tokio_postgres::Error) -> Self {
        match is_transient(&err) {
            true => Startup::Away(explain(&err)),
            false => Startup::Wrong(explain(&err)),
        }
    }
}

impl From<String> for Startup {
    fn from(message: String) -> Self {
        Startup::Wrong(message)
    }
}

/// How long start-up waits for a server that is away before it gives up.
const STARTUP_PATIENCE: Duration = Duration::from_secs(30);

/// Runs `step` until it succeeds, trying again with backoff (and a
/// warning) while the server is away, for [`STARTUP_PATIENCE`] at most.
async fn starting<T, F>(described: &str, mut step: impl FnMut() -> F) -> Result<T, String>
where
    F: std::future::Future<Output = Result<T, Startup>>,
{
    let deadline = tokio::time::Instant::now() + STARTUP_PATIENCE;
    let mut backoff = Duration::from_millis(100);
    loop {
        match step().await {
            Ok(done) => return Ok(done),
            Err(Startup::Wrong(message)) => return Err(message),
            Err(Startup::Away(message)) if tokio::time::Instant::now() >= deadline => {
                return Err(format!(
                    "{message} (still away after {}s)",
                    STARTUP_PATIENCE.as_secs()
                ));
            }
            Err(Startup::Away(message)) => {
                tracing::warn!(sink = %described, error = %message, "PostgreSQL is away; trying again.");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Connects, creates the table (if asked to) and the checkpoint table,
/// and reads the columns to write.
async fn prepare(
    config: &PostgresSinkConfig,
    pipeline: &str,
) -> Result<(Client, Vec<Column>), Startup> {
    let client = connect(&config.url, pipeline).await?;
    let table = quote(&config.table);
    if config.create_table {
        let mut definition: Vec<String> = (config.columns.iter())
            .map(|(name, sql_type)| format!("{} {sql_type}", quote(name)))
            .collect();
        if !config.key.is_empty() {
            let key: Vec<String> = config.key.iter().map(|k| quote(k)).collect();
            definition.push(format!("PRIMARY KEY ({})", key.join(", ")));
        }
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {table} ({})",
            definition.join(", ")
        );
        ignore_races(client.batch_execute(&create).await).map_err(|err| {
            match Startup::from(err) {
                Startup::Wrong(message) => Startup::Wrong(format!("cannot create it: {message}")),
                away => away,
            }
        })?;
    }
    ignore_races(client.batch_execute(CHECKPOINT_TABLES).await)?;
    let columns = read_columns(&client, config).await?;
    Ok((client, columns))
}

/// A transaction that failed, and whether it failed at its `COMMIT` (its
/// outcome unknown).
struct Failed {
    err: tokio_postgres::Error,
    at_commit: bool,
}

impl From<tokio_postgres::Error> for Failed {
    fn from(err: tokio_postgres::Error) -> Self {
        Failed {
            err,
            at_commit: false,
        }
    }
}

/// Whether the checkpoint of `pipeline` marked `token` committed.
async fn committed(
    client: &Client,
    pipeline: &str,
    token: i64,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM weir_offsets WHERE pipeline = $1 AND commit_token = $2)",
            &[&pipeline, &token],
        )
        .await?;
    Ok(row.get(0))
}

/// Runs one commit: the rows `(insert, columns, rows)`, `batch` per
/// statement, then the checkpoint (marked with its token).
async fn transaction(
    client: &mut Client,
    (insert, columns, rows): (&str, &[Vec<Option<String>>], usize),
    batch: usize,
    pipeline: &str,
    checkpoint: Option<(&Snapshot, i64)>,
) -> Result<(), Failed> {
    let transaction = client.transaction().await?;
    if rows > 0 {
        let statement = transaction.prepare(insert).await?;
        let mut from = 0;
        while from < rows {
            let to = (from + batch).min(rows);
            let slices: Vec<&[Option<String>]> = columns.iter().map(|c| &c[from..to]).collect();
            let params: Vec<&(dyn ToSql + Sync)> =
                slices.iter().map(|s| s as &(dyn ToSql + Sync)).collect();
            transaction.execute(&statement, &params).await?;
            from = to;
        }
    }
    if let Some((snapshot, token)) = checkpoint {
        let partitions = &snapshot.partitions;
        let topics: Vec<&str> = partitions.iter().map(|p| &*p.position.topic).collect();
        let numbers: Vec<i32> = partitions.iter().map(|p| p.position.partition).collect();
        let offsets: Vec<i64> = partitions.iter().map(|p| p.position.offset).collect();
        let states: Vec<Option<&[u8]>> = partitions.iter().map(|p| p.window.as_deref()).collect();
        // A partition another worker has claimed since is not written
        // (fenced off): its rows are the other worker's now.
        let written = transaction
            .query(
                r#"INSERT INTO weir_offsets (pipeline, topic, "partition", "offset",
                     window_state, finished, commit_token, owner)
                   SELECT $1, t, p, o, s, $6, $7, $8
                   FROM UNNEST($2::text[], $3::integer[], $4::bigint[], $5::bytea[]) AS c(t, p, o, s)
                   ON CONFLICT (pipeline, topic, "partition") DO UPDATE SET
                     "offset" = EXCLUDED."offset", window_state = EXCLUDED.window_state,
                     finished = EXCLUDED.finished, commit_token = EXCLUDED.commit_token,
                     updated_at = now()
                   WHERE weir_offsets.owner IS NOT DISTINCT FROM EXCLUDED.owner
                   RETURNING topic, "partition""#,
                &[
                    &pipeline,
                    &topics,
                    &numbers,
                    &offsets,
                    &states,
                    &snapshot.finished,
                    &token,
                    &worker_id(),
                ],
            )
            .await?;
        if written.len() < partitions.len() {
            let written: Vec<(String, i32)> =
                written.iter().map(|row| (row.get(0), row.get(1))).collect();
            for p in partitions {
                let key = (p.position.topic.to_string(), p.position.partition);
                if !written.contains(&key) {
                    tracing::warn!(pipeline, topic = %key.0, partition = key.1, "Another worker has claimed this partition: its checkpoint is that worker's to write.");
                }
            }
        }
    }
    transaction.commit().await.map_err(|err| Failed {
        err,
        at_commit: true,
    })
}

#[async_trait]
impl Sink for PostgresSink {
    fn describe(&self) -> String {
        self.described.clone()
    }

    async fn write(&mut self, records: Records<'_>) -> Result<(), SinkError> {
        for record in records.iter() {
            // `refuses` turned away the records that do not fit.
            if let Ok(row) = columns::row(&self.columns, record.value()) {
                self.push(row);
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        if self.rows == 0 {
            return Ok(());
        }
        self.commit_rows(None).await
    }

    fn refuses(&self, record: &RecordRef<'_>) -> Option<String> {
        (columns::row(&self.columns, record.value()).err())
            .map(|reason| format!("{}: {reason}", self.described))
    }

    fn keeps_checkpoints(&self) -> bool {
        self.config.checkpoints
    }

    async fn commit(&mut self, snapshot: &Snapshot) -> Result<bool, SinkError> {
        self.commit_rows(Some(snapshot)).await?;
        Ok(true)
    }

    fn wants_commit(&self) -> bool {
        self.rows >= self.config.max_buffered_rows
    }
}

/// The last checkpoint of `pipeline` kept by the `postgres` sink `config`
/// describes, if there is one, every partition of it claimed by this
/// worker (for a source with no partitions to be assigned: a file).
pub async fn last_checkpoint(
    config: &PostgresSinkConfig,
    pipeline: &str,
) -> Result<Option<Snapshot>, SinkError> {
    let described = format!("postgres table {:?}", config.table);
    starting(&described, || read_checkpoint(config, pipeline))
        .await
        .map_err(|message| SinkError::Io {
            sink: described.clone(),
            source: std::io::Error::other(format!("cannot read the last checkpoint: {message}")),
        })
}

async fn read_checkpoint(
    config: &PostgresSinkConfig,
    pipeline: &str,
) -> Result<Option<Snapshot>, Startup> {
    let client = connect(&config.url, pipeline).await?;
    let exists = client
        .query_one("SELECT to_regclass('weir_offsets') IS NOT NULL", &[])
        .await?;
    if !exists.get::<_, bool>(0) {
        return Ok(None);
    }
    // Claimed, all of them: a worker still writing them is fenced off.
    let rows = client
        .query(
            r#"UPDATE weir_offsets SET owner = $2 WHERE pipeline = $1
               RETURNING topic, "partition", "offset", window_state, finished"#,
            &[&pipeline, &worker_id()],
        )
        .await?;
    let partitions: Vec<PartitionState> = rows.iter().filter_map(checkpointed).collect();
    if partitions.is_empty() {
        return Ok(None);
    }
    Ok(Some(Snapshot {
        partitions,
        finished: rows.iter().any(|row| row.get::<_, bool>(4)),
    }))
}

/// A partition's checkpoint from a `weir_offsets` row (topic, partition,
/// offset, window state, ...); `None` for a partition claimed but never
/// checkpointed (offset -1).
fn checkpointed(row: &tokio_postgres::Row) -> Option<PartitionState> {
    let offset: i64 = row.get(2);
    (offset >= 0).then(|| PartitionState {
        position: SourcePosition {
            topic: row.get::<_, String>(0).into(),
            partition: row.get(1),
            offset,
        },
        window: row.get(3),
    })
}

async fn connect(url: &str, pipeline: &str) -> Result<Client, tokio_postgres::Error> {
    // `check` parsed it.
    let mut config: tokio_postgres::Config = url.parse()?;
    if config.get_application_name().is_none() {
        config.application_name(format!("weir/{pipeline}"));
    }
    // "relation already exists, skipping" and the like are not news.
    if config.get_options().is_none() {
        config.options("-c client_min_messages=warning");
    }
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(%err, "PostgreSQL connection ended.");
        }
    });
    Ok(client)
}

/// Two workers creating the same table at once: one of them loses a race
/// the table's existence settles.
fn ignore_races(result: Result<(), tokio_postgres::Error>) -> Result<(), tokio_postgres::Error> {
    match result {
        Err(err)
            if matches!(
                err.code(),
                Some(&SqlState::UNIQUE_VIOLATION) | Some(&SqlState::DUPLICATE_TABLE)
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// The columns written to the table `config` names, with their types; an
/// error names a missing table, column or unique key.
async fn read_columns(
    client: &Client,
    config: &PostgresSinkConfig,
) -> Result<Vec<Column>, Startup> {
    let table = quote(&config.table);
    let found = client
        .query_one("SELECT to_regclass($1)::oid", &[&table])
        .await?;
    let Some(oid) = found.get::<_, Option<tokio_postgres::types::Oid>>(0) else {
        return Err(Startup::Wrong(
            "the table does not exist (create it, or set `create_table = true` with `columns`)"
                .into(),
        ));
    };
    let rows = client
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod), atthasdef OR attidentity <> ''
             FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped
             ORDER BY attnum",
            &[&oid],
        )
        .await?;
    let table_columns: Vec<(String, String, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let wanted: Vec<&String> = match config.columns.is_empty() {
        true => (table_columns.iter())
            .filter(|(name, _, defaulted)| !defaulted || config.key.contains(name))
            .map(|(name, _, _)| name)
            .collect(),
        false => config.columns.keys().collect(),
    };
    let mut columns = Vec::with_capacity(wanted.len());
    for name in wanted.into_iter().chain(&config.key) {
        if columns.iter().any(|c: &Column| &c.name == name) {
            continue;
        }
        let Some((_, sql_type, _)) = table_columns.iter().find(|(n, _, _)| n == name) else {
            return Err(Startup::Wrong(format!("the table has no column `{name}`")));
        };
        columns.push(Column {
            name: name.clone(),
            kind: Kind::of(sql_type),
            sql_type: sql_type.clone(),
            key: config.key.contains(name),
        });
    }
    if !config.key.is_empty() {
        let unique = client
            .query(
                "SELECT array_agg(a.attname::text ORDER BY a.attname)
                 FROM pg_index i JOIN pg_attribute a
                   ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                 WHERE i.indrelid = $1 AND i.indisunique
                 GROUP BY i.indexrelid",
                &[&oid],
            )
            .await?;
        let mut key = config.key.clone();
        key.sort();
        if !unique.iter().any(|row| row.get::<_, Vec<String>>(0) == key) {
            return Err(Startup::Wrong(format!(
                "no unique index or primary key is on exactly the key columns ({}): an upsert needs one",
                config.key.join(", ")
            )));
        }
    }
    Ok(columns)
}

/// `INSERT ... SELECT ... FROM UNNEST(...)`, upserting on the key columns.
fn insert_statement(table: &str, columns: &[Column]) -> String {
    let names: Vec<String> = columns.iter().map(|c| quote(&c.name)).collect();
    let casts: Vec<String> = (columns.iter().enumerate())
        .map(|(at, c)| format!("CAST(c{at} AS {})", c.sql_type))
        .collect();
    let params: Vec<String> = (1..=columns.len())
        .map(|n| format!("${n}::text[]"))
        .collect();
    let aliases: Vec<String> = (0..columns.len()).map(|at| format!("c{at}")).collect();
    let mut sql = format!(
        "INSERT INTO {table} ({}) SELECT {} FROM UNNEST({}) AS weir_rows({})",
        names.join(", "),
        casts.join(", "),
        params.join(", "),
        aliases.join(", ")
    );
    let key: Vec<&String> = (columns.iter().zip(&names))
        .filter(|(c, _)| c.key)
        .map(|(_, n)| n)
        .collect();
    if !key.is_empty() {
        let keys: Vec<&str> = key.iter().map(|k| k.as_str()).collect();
        let updates: Vec<String> = (columns.iter().zip(&names))
            .filter(|(c, _)| !c.key)
            .map(|(_, n)| format!("{n} = EXCLUDED.{n}"))
            .collect();
        match updates.is_empty() {
            true => sql.push_str(&format!(" ON CONFLICT ({}) DO NOTHING", keys.join(", "))),
            false => sql.push_str(&format!(
                " ON CONFLICT ({}) DO UPDATE SET {}",
                keys.join(", "),
                updates.join(", ")
            )),
        }
    }
    sql
}

/// Whether `err` is the server or the network going away (try again on a
/// new connection) rather than something wrong with what was sent.
fn is_transient(err: &tokio_postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    match err.code() {
        // No server error: the connection failed.
        None => true,
        Some(code) => {
            code.code().starts_with("08")
                || [
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CRASH_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                    SqlState::TOO_MANY_CONNECTIONS,
                    SqlState::T_R_SERIALIZATION_FAILURE,
                    SqlState::T_R_DEADLOCK_DETECTED,
                ]
                .contains(code)
        }
    }
}

/// The server's message with its detail, hint and column, or the
/// client's error with its cause.
fn explain(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        let mut text = db.message().to_owned();
        if let Some(column) = db.column() {
            text.push_str(&format!(" (column `{column}`)"));
        }
        if let Some(detail) = db.detail() {
            text.push_str(&format!("; {detail}"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!("; hint: {hint}"));
        }
        return text;
    }
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Claims partitions in the tables a `postgres` sink keeps checkpoints in
/// (for a source whose partitions are assigned and move: Kafka).
pub struct PostgresClaimer {
    url: String,
    pipeline: String,
}

impl PostgresClaimer {
    /// For `pipeline`'s checkpoints, kept by the sink `config` describes.
    pub fn new(config: &PostgresSinkConfig, pipeline: &str) -> Self {
        PostgresClaimer {
            url: config.url.clone(),
            pipeline: pipeline.to_owned(),
        }
    }

    async fn claim_async(
        &self,
        partitions: &[(String, i32)],
    ) -> Result<Vec<PartitionState>, String> {
        let client = (connect(&self.url, &self.pipeline).await).map_err(|err| explain(&err))?;
        ignore_races(client.batch_execute(CHECKPOINT_TABLES).await).map_err(|err| explain(&err))?;
        let topics: Vec<&str> = partitions.iter().map(|(t, _)| t.as_str()).collect();
        let numbers: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
        // A partition with no checkpoint yet gets a row, offset -1, so
        // that a worker still writing it would be fenced off as well.
        let rows = client
            .query(
                r#"INSERT INTO weir_offsets (pipeline, topic, "partition", "offset", owner)
                   SELECT $1, t, p, -1, $4 FROM UNNEST($2::text[], $3::integer[]) AS c(t, p)
                   ON CONFLICT (pipeline, topic, "partition")
                   DO UPDATE SET owner = EXCLUDED.owner, updated_at = now()
                   RETURNING topic, "partition", "offset", window_state"#,
                &[&self.pipeline, &topics, &numbers, &worker_id()],
            )
            .await
            .map_err(|err| explain(&err))?;
        Ok(rows.iter().filter_map(checkpointed).collect())
    }
}

impl Claimer for PostgresClaimer {
    fn claim(&self, partitions: &[(String, i32)]) -> Result<Vec<PartitionState>, String> {
        // Called from a Kafka rebalance, inside the consumer's poll: on a
        // thread of its own with a runtime of its own, whatever runtime
        // (if any) the caller is on.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|err| err.to_string())?;
                    runtime.block_on(self.claim_async(partitions))
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}
