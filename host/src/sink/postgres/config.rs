use std::collections::BTreeMap;

use serde::Deserialize;

/// Settings of a `postgres` sink.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PostgresSinkConfig {
    /// The server: a `postgres://user@host:port/database` URL or a libpq
    /// `host=... user=... dbname=...` string.
    pub url: String,
    /// The table rows go to (`name` or `schema.name`).
    pub table: String,
    /// The columns that identify a row: a record whose key columns match a
    /// row already there replaces it (an upsert), so a record written
    /// again after a crash never counts twice. They need a unique index
    /// (or primary key) on exactly them. Empty: plain inserts.
    #[serde(default)]
    pub key: Vec<String>,
    /// Column name -> SQL type, for `create_table`; and, when given, the
    /// columns written (the table's otherwise, but those with a default).
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// Create the table from `columns` (primary key: `key`) if it is
    /// missing.
    #[serde(default)]
    pub create_table: bool,
    /// Rows per statement.
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
    /// Rows held for the next commit before the pipeline commits early.
    #[serde(default = "default_max_buffered_rows")]
    pub max_buffered_rows: usize,
    /// The routes this sink takes.
    #[serde(default = "crate::config::default_routes")]
    pub routes: Vec<String>,
    /// Keep the pipeline's checkpoints (positions and window state) with
    /// the rows, in one transaction: exact after a crash. `false`: rows are
    /// only upserted, and the source commits its own positions
    /// (at-least-once; with `key`, a window that fires again replaces its
    /// row).
    #[serde(default = "default_checkpoints")]
    pub checkpoints: bool,
}

fn default_checkpoints() -> bool {
    true
}

fn default_batch_rows() -> usize {
    5_000
}

fn default_max_buffered_rows() -> usize {
    200_000
}

impl PostgresSinkConfig {
    /// What is wrong with these settings, found without connecting.
    pub fn check(&self) -> Result<(), String> {
        self.url
            .parse::<tokio_postgres::Config>()
            .map_err(|err| format!("postgres sink: `url` {:?}: {err}", self.url))?;
        if self.table.trim().is_empty() {
            return Err("postgres sink: `table` is empty".into());
        }
        if self.create_table && self.columns.is_empty() {
            return Err(
                "postgres sink: `create_table = true` needs `columns` (column = \"SQL type\")"
                    .into(),
            );
        }
        if self.batch_rows == 0 || self.max_buffered_rows == 0 {
            return Err(
                "postgres sink: `batch_rows` and `max_buffered_rows` must be above 0".into(),
            );
        }
        if !self.columns.is_empty()
            && let Some(missing) = self.key.iter().find(|k| !self.columns.contains_key(*k))
        {
            return Err(format!(
                "postgres sink: key column `{missing}` is not among `columns`"
            ));
        }
        Ok(())
    }
}
