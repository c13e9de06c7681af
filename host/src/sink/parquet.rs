//! The `parquet` sink: records (JSON objects) as rows of Parquet files in a
//! folder, one column per field, for a data lake.
//!
//! Rows go into a hidden temporary file (`.part-N.parquet.tmp`); at a
//! commit, once the file is big or old enough (or the input ended), it is
//! finished, `fsync`ed and renamed to `part-N-WORKER.parquet`: a reader
//! listing the folder never sees half a file. The file's footer holds the
//! pipeline's checkpoint (source positions and window state) as of its
//! last row, so the rename commits rows and checkpoint together; a
//! restarted pipeline resumes from the newest file's (see
//! [`last_checkpoint`]) and a temporary file left by a crash is deleted,
//! its rows to be written again: no row is lost or written twice.
//!
//! The schema is the sink's `columns`, or the first record's fields
//! (integers as `int64`, other numbers `double`, `true`/`false`
//! `boolean`, strings `string`, objects and arrays `json`). A record whose
//! field does not fit its column is dead-lettered with the reason; fields
//! that are not columns are left out.

use std::collections::{BTreeMap, HashMap};
use std::io::BufWriter;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parquet::basic::{Compression, LogicalType, Repetition, Type as PhysicalType};
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int32Type, Int64Type};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::FileReader as _;
use parquet::file::serialized_reader::SerializedFileReader;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::Type;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{Sink, SinkError};
use crate::batch::{RecordRef, Records};
use crate::record::SourcePosition;
use crate::state::{PartitionState, Snapshot, worker_id};

/// Settings of a `parquet` sink.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ParquetSinkConfig {
    /// The folder the files go to (relative to the pipeline file).
    pub path: PathBuf,
    /// Column name -> type (`int64`, `int32`, `double`, `boolean`,
    /// `string`, `json`); none: the first record's fields.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// A file is finished at the first commit after it holds this many
    /// bytes of rows (before compression)...
    #[serde(default = "default_roll_bytes")]
    pub roll_bytes: usize,
    /// ...or after it was started this long ago.
    #[serde(default = "default_roll_interval")]
    pub roll_interval: String,
    /// The routes this sink takes.
    #[serde(default = "crate::config::default_routes")]
    pub routes: Vec<String>,
}

fn default_roll_bytes() -> usize {
    128 << 20
}

fn default_roll_interval() -> String {
    "60s".into()
}

impl ParquetSinkConfig {
    /// What is wrong with these settings, found without writing.
    pub fn check(&self) -> Result<(), String> {
        crate::window::parse_duration(&self.roll_interval, "roll_interval")?;
        for (name, kind) in &self.columns {
            Kind::parse(kind).map_err(|err| format!("parquet sink, column `{name}`: {err}"))?;
        }
        Ok(())
    }
}

/// A column's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int64,
    Int32,
    Double,
    Boolean,
    String,
    Json,
}

impl Kind {
    fn parse(name: &str) -> Result<Kind, String> {
        Ok(match name {
            "int64" | "bigint" => Kind::Int64,
            "int32" | "integer" => Kind::Int32,
            "double" | "float64" => Kind::Double,
            "boolean" | "bool" => Kind::Boolean,
            "string" | "text" => Kind::String,
            "json" => Kind::Json,
            other => {
                return Err(format!(
                    "`{other}` is not a column type (int64, int32, double, boolean, string, json)"
                ));
            }
        })
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Int64 => "int64",
            Kind::Int32 => "int32",
            Kind::Double => "double",
            Kind::Boolean => "boolean",
            Kind::String => "string",
            Kind::Json => "json",
        }
    }

    /// The type a first record's value `json` suggests.
    fn of_value(json: &str) -> Kind {
        match json.as_bytes().first() {
            Some(b't' | b'f') => Kind::Boolean,
            Some(b'"') | Some(b'n') | None => Kind::String,
            Some(b'{' | b'[') => Kind::Json,
            Some(_) if json.parse::<i64>().is_ok() => Kind::Int64,
            Some(_) => Kind::Double,
        }
    }
}

/// One column's values waiting for the next row group, and each row's
/// definition level (0: null).
#[derive(Debug)]
struct Column {
    name: String,
    kind: Kind,
    values: Values,
    defined: Vec<i16>,
}

#[derive(Debug)]
enum Values {
    Int64(Vec<i64>),
    Int32(Vec<i32>),
    Double(Vec<f64>),
    Boolean(Vec<bool>),
    Bytes(Vec<ByteArray>),
}

/// A field's value as its column takes it.
enum Value {
    Null,
    Int64(i64),
    Int32(i32),
    Double(f64),
    Boolean(bool),
    Bytes(Vec<u8>),
}

impl Column {
    fn new(name: String, kind: Kind) -> Self {
        let values = match kind {
            Kind::Int64 => Values::Int64(Vec::new()),
            Kind::Int32 => Values::Int32(Vec::new()),
            Kind::Double => Values::Double(Vec::new()),
            Kind::Boolean => Values::Boolean(Vec::new()),
            Kind::String | Kind::Json => Values::Bytes(Vec::new()),
        };
        Column {
            name,
            kind,
            values,
            defined: Vec::new(),
        }
    }

    fn parquet_type(&self) -> Result<Type, parquet::errors::ParquetError> {
        let (physical, logical) = match self.kind {
            Kind::Int64 => (PhysicalType::INT64, None),
            Kind::Int32 => (PhysicalType::INT32, None),
            Kind::Double => (PhysicalType::DOUBLE, None),
            Kind::Boolean => (PhysicalType::BOOLEAN, None),
            Kind::String => (PhysicalType::BYTE_ARRAY, Some(LogicalType::String)),
            Kind::Json => (PhysicalType::BYTE_ARRAY, Some(LogicalType::Json)),
        };
        Type::primitive_type_builder(&self.name, physical)
            .with_repetition(Repetition::OPTIONAL)
            .with_logical_type(logical)
            .build()
    }

    fn push(&mut self, value: Value) {
        let defined = !matches!(value, Value::Null);
        self.defined.push(i16::from(defined));
        match (&mut self.values, value) {
            (Values::Int64(v), Value::Int64(x)) => v.push(x),
            (Values::Int32(v), Value::Int32(x)) => v.push(x),
            (Values::Double(v), Value::Double(x)) => v.push(x),
            (Values::Boolean(v), Value::Boolean(x)) => v.push(x),
            (Values::Bytes(v), Value::Bytes(x)) => v.push(ByteArray::from(x)),
            _ => {}
        }
    }

    fn clear(&mut self) {
        self.defined.clear();
        match &mut self.values {
            Values::Int64(v) => v.clear(),
            Values::Int32(v) => v.clear(),
            Values::Double(v) => v.clear(),
            Values::Boolean(v) => v.clear(),
            Values::Bytes(v) => v.clear(),
        }
    }
}

/// `raw` (field `name`'s JSON, `None`: absent) as a column of `kind` takes it.
fn value_of(name: &str, kind: Kind, raw: Option<&RawValue>) -> Result<Value, String> {
    let Some(raw) = raw.map(RawValue::get).filter(|json| *json != "null") else {
        return Ok(Value::Null);
    };
    let unfit = |what: &str| {
        format!(
            "field `{}`: {raw} is not {what} (column `{}` is {})",
            name,
            name,
            kind.name()
        )
    };
    Ok(match kind {
        Kind::Int64 => Value::Int64(raw.parse().map_err(|_| unfit("an integer"))?),
        Kind::Int32 => Value::Int32(raw.parse().map_err(|_| unfit("a 32-bit integer"))?),
        Kind::Double => match raw.as_bytes()[0] {
            b'-' | b'0'..=b'9' => Value::Double(raw.parse().map_err(|_| unfit("a number"))?),
            _ => return Err(unfit("a number")),
        },
        Kind::Boolean => match raw {
            "true" => Value::Boolean(true),
            "false" => Value::Boolean(false),
            _ => return Err(unfit("true or false")),
        },
        Kind::String => match serde_json::from_str::<String>(raw) {
            Ok(text) => Value::Bytes(text.into_bytes()),
            Err(_) => Value::Bytes(raw.as_bytes().to_vec()),
        },
        Kind::Json => Value::Bytes(raw.as_bytes().to_vec()),
    })
}

/// Rows per row group.
const ROW_GROUP_ROWS: usize = 64 * 1024;

/// The footer key that holds the checkpoint.
const CHECKPOINT_KEY: &str = "weir.checkpoint";

/// A file being written.
struct OpenFile {
    writer: SerializedFileWriter<BufWriter<std::fs::File>>,
    temp: PathBuf,
    number: u64,
    started: Instant,
    /// Bytes of rows in it (before compression).
    bytes: usize,
}

/// Writes records as rows of rolled Parquet files.
pub struct ParquetSink {
    folder: PathBuf,
    described: String,
    roll_bytes: usize,
    roll_interval: Duration,
    /// The columns' names and types: the config's, or the first
    /// record's (set by whichever of `refuses` and `write` sees it first).
    schema: std::sync::OnceLock<Vec<(String, Kind)>>,
    /// The columns' waiting values; empty until the schema is known.
    columns: Vec<Column>,
    rows: usize,
    file: Option<OpenFile>,
    /// The number of the next file.
    next: u64,
}

impl ParquetSink {
    /// Opens `config.path` (creating it), deleting what a crash left half
    /// written.
    pub async fn open(config: &ParquetSinkConfig) -> Result<Self, SinkError> {
        let folder = config.path.clone();
        let described = format!("parquet {:?}", folder.display().to_string());
        let fail = |message: String| SinkError::Io {
            sink: described.clone(),
            source: std::io::Error::other(message),
        };
        config.check().map_err(&fail)?;
        std::fs::create_dir_all(&folder).map_err(|e| SinkError::io(&described, e))?;
        let mut next = 0;
        for entry in std::fs::read_dir(&folder).map_err(|e| SinkError::io(&described, e))? {
            let path = entry.map_err(|e| SinkError::io(&described, e))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.starts_with(".part-") && name.ends_with(".tmp") {
                tracing::warn!(sink = %described, file = %path.display(), "Deleting a file a crash left half written; its rows are written again.");
                std::fs::remove_file(&path).map_err(|e| SinkError::io(&described, e))?;
            } else if let Some(number) = part_number(name) {
                next = next.max(number + 1);
            }
        }
        let configured: Vec<(String, Kind)> = (config.columns.iter())
            .map(|(name, kind)| Ok((name.clone(), Kind::parse(kind)?)))
            .collect::<Result<_, String>>()
            .map_err(fail)?;
        let schema = std::sync::OnceLock::new();
        if !configured.is_empty() {
            let _ = schema.set(configured);
        }
        Ok(ParquetSink {
            schema,
            columns: Vec::new(),
            roll_bytes: config.roll_bytes,
            roll_interval: crate::window::parse_duration(&config.roll_interval, "roll_interval")
                .unwrap_or(Duration::from_secs(60)),
            folder,
            described,
            rows: 0,
            file: None,
            next,
        })
    }

    fn fail(&self, err: impl std::fmt::Display) -> SinkError {
        SinkError::Io {
            sink: self.described.clone(),
            source: std::io::Error::other(err.to_string()),
        }
    }

    /// The columns: the config's, or those of `value` (the first record).
    fn schema(&self, value: &[u8]) -> &[(String, Kind)] {
        self.schema.get_or_init(|| {
            let fields: BTreeMap<String, &RawValue> =
                serde_json::from_slice(value).unwrap_or_default();
            let schema: Vec<(String, Kind)> = (fields.into_iter())
                .map(|(name, raw)| (name, Kind::of_value(raw.get())))
                .collect();
            let named: Vec<String> = (schema.iter())
                .map(|(name, kind)| format!("{name} {}", kind.name()))
                .collect();
            tracing::info!(sink = %self.described, schema = %named.join(", "), "Columns taken from the first record.");
            schema
        })
    }

    /// The row `value` makes, or why it does not fit.
    fn row(&self, value: &[u8]) -> Result<Vec<Value>, String> {
        let fields: HashMap<&str, &RawValue> = serde_json::from_slice(value)
            .map_err(|err| format!("the value is not a JSON object: {err}"))?;
        (self.schema(value).iter())
            .map(|(name, kind)| value_of(name, *kind, fields.get(name.as_str()).copied()))
            .collect()
    }

    /// Writes the waiting rows as a row group of the open file (starting
    /// one if none is open).
    fn write_row_group(&mut self) -> Result<(), SinkError> {
        if self.rows == 0 {
            return Ok(());
        }
        if self.file.is_none() {
            self.file = Some(self.start_file()?);
        }
        let Some(file) = &mut self.file else {
            unreachable!("started above")
        };
        let written: Result<(), parquet::errors::ParquetError> = (|| {
            let mut group = file.writer.next_row_group()?;
            for column in &self.columns {
                let Some(mut writer) = group.next_column()? else {
                    break;
                };
                let defined = Some(&column.defined[..]);
                match &column.values {
                    Values::Int64(v) => {
                        writer.typed::<Int64Type>().write_batch(v, defined, None)?;
                    }
                    Values::Int32(v) => {
                        writer.typed::<Int32Type>().write_batch(v, defined, None)?;
                    }
                    Values::Double(v) => {
                        writer.typed::<DoubleType>().write_batch(v, defined, None)?;
                    }
                    Values::Boolean(v) => {
                        writer.typed::<BoolType>().write_batch(v, defined, None)?;
                    }
                    Values::Bytes(v) => {
                        writer
                            .typed::<ByteArrayType>()
                            .write_batch(v, defined, None)?;
                    }
                }
                writer.close()?;
            }
            group.close()?;
            Ok(())
        })();
        written.map_err(|err| self.fail(err))?;
        self.columns.iter_mut().for_each(Column::clear);
        self.rows = 0;
        Ok(())
    }

    fn start_file(&mut self) -> Result<OpenFile, SinkError> {
        let number = self.next;
        self.next += 1;
        let temp = self.folder.join(format!(".part-{number:08}.parquet.tmp"));
        let fields: Vec<Arc<Type>> = (self.columns.iter())
            .map(|c| c.parquet_type().map(Arc::new))
            .collect::<Result<_, _>>()
            .map_err(|err| self.fail(err))?;
        let schema = Type::group_type_builder("weir")
            .with_fields(fields)
            .build()
            .map_err(|err| self.fail(err))?;
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let file = std::fs::File::create(&temp).map_err(|e| SinkError::io(&self.described, e))?;
        let writer =
            SerializedFileWriter::new(BufWriter::new(file), Arc::new(schema), Arc::new(properties))
                .map_err(|err| self.fail(err))?;
        Ok(OpenFile {
            writer,
            temp,
            number,
            started: Instant::now(),
            bytes: 0,
        })
    }

    /// Finishes the open file with `snapshot` in its footer, makes it
    /// durable and gives it its name.
    fn finish_file(&mut self, snapshot: Option<&Snapshot>) -> Result<(), SinkError> {
        self.write_row_group()?;
        let Some(mut file) = self.file.take() else {
            return Ok(());
        };
        if let Some(snapshot) = snapshot {
            let encoded = SavedSnapshot::from(snapshot).encode();
            file.writer
                .append_key_value_metadata(KeyValue::new(CHECKPOINT_KEY.into(), encoded));
        }
        let io = |e| SinkError::io(&self.described, e);
        let buffered = file.writer.into_inner().map_err(|err| self.fail(err))?;
        let inner = buffered.into_inner().map_err(|err| io(err.into_error()))?;
        inner.sync_all().map_err(io)?;
        let name = format!(
            "part-{:08}-{}.parquet",
            file.number,
            worker_id().replace('/', "-")
        );
        std::fs::rename(&file.temp, self.folder.join(name)).map_err(io)?;
        // The rename itself is durable once the folder is.
        std::fs::File::open(&self.folder)
            .and_then(|folder| folder.sync_all())
            .map_err(io)?;
        Ok(())
    }

    /// Whether the open file is big or old enough to finish.
    fn due(&self) -> bool {
        (self.file.as_ref()).is_some_and(|f| {
            f.bytes >= self.roll_bytes || f.started.elapsed() >= self.roll_interval
        })
    }
}

#[async_trait]
impl Sink for ParquetSink {
    fn describe(&self) -> String {
        self.described.clone()
    }

    async fn write(&mut self, records: Records<'_>) -> Result<(), SinkError> {
        for record in records.iter() {
            // `refuses` turned away the records that do not fit.
            let Ok(row) = self.row(record.value()) else {
                continue;
            };
            if self.columns.is_empty() {
                let schema = self.schema(record.value()).to_vec();
                self.columns = (schema.into_iter())
                    .map(|(name, kind)| Column::new(name, kind))
                    .collect();
            }
            for (column, value) in self.columns.iter_mut().zip(row) {
                column.push(value);
            }
            self.rows += 1;
            if self.file.is_none() {
                self.file = Some(self.start_file()?);
            }
            if let Some(file) = &mut self.file {
                file.bytes += record.value().len();
            }
            if self.rows >= ROW_GROUP_ROWS {
                self.write_row_group()?;
            }
        }
        Ok(())
    }

    /// Finishes the open file: what was written is in a file of its own.
    async fn flush(&mut self) -> Result<(), SinkError> {
        self.finish_file(None)
    }

    fn refuses(&self, record: &RecordRef<'_>) -> Option<String> {
        (self.row(record.value()).err()).map(|reason| format!("{}: {reason}", self.described))
    }

    fn keeps_checkpoints(&self) -> bool {
        true
    }

    async fn commit(&mut self, snapshot: &Snapshot) -> Result<bool, SinkError> {
        if !(snapshot.finished || self.due()) {
            return Ok(false);
        }
        if self.file.is_none() && self.rows == 0 {
            // Nothing written since the last file: the checkpoint waits
            // for rows (a replay from the last one makes none again).
            return Ok(false);
        }
        self.finish_file(Some(snapshot))?;
        Ok(true)
    }
}

/// The number of a finished file's name, `part-N-WORKER.parquet`.
fn part_number(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("part-")?.strip_suffix(".parquet")?;
    rest.split('-').next()?.parse().ok()
}

/// The checkpoint in the footer of the newest finished file in the folder
/// `config` names, if there is one.
pub fn last_checkpoint(config: &ParquetSinkConfig) -> Result<Option<Snapshot>, SinkError> {
    let described = format!("parquet {:?}", config.path.display().to_string());
    let Ok(entries) = std::fs::read_dir(&config.path) else {
        return Ok(None);
    };
    let newest = (entries.filter_map(Result::ok))
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            Some((part_number(&name)?, entry.path()))
        })
        .max_by_key(|(number, _)| *number);
    let Some((_, path)) = newest else {
        return Ok(None);
    };
    let fail = |message: String| SinkError::Io {
        sink: described.clone(),
        source: std::io::Error::other(format!("{}: {message}", path.display())),
    };
    let reader = SerializedFileReader::try_from(path.as_path()).map_err(|e| fail(e.to_string()))?;
    let metadata = reader.metadata().file_metadata().key_value_metadata();
    let saved = (metadata.into_iter().flatten())
        .find(|kv| kv.key == CHECKPOINT_KEY)
        .and_then(|kv| kv.value.as_deref());
    match saved {
        Some(saved) => SavedSnapshot::decode(saved).map(Some).map_err(fail),
        None => Ok(None),
    }
}

/// A checkpoint as a footer keeps it.
#[derive(Serialize, Deserialize)]
struct SavedSnapshot {
    partitions: Vec<(String, i32, i64, Option<Vec<u8>>)>,
    finished: bool,
}

impl From<&Snapshot> for SavedSnapshot {
    fn from(snapshot: &Snapshot) -> Self {
        SavedSnapshot {
            partitions: (snapshot.partitions.iter())
                .map(|p| {
                    let position = &p.position;
                    let topic = position.topic.to_string();
                    (topic, position.partition, position.offset, p.window.clone())
                })
                .collect(),
            finished: snapshot.finished,
        }
    }
}

impl SavedSnapshot {
    fn encode(&self) -> String {
        use base64::Engine as _;
        // Plain data: serialising it cannot fail.
        let bytes = postcard::to_stdvec(self).unwrap_or_default();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn decode(text: &str) -> Result<Snapshot, String> {
        use base64::Engine as _;
        let bytes = (base64::engine::general_purpose::STANDARD.decode(text))
            .map_err(|err| format!("the checkpoint in its footer: {err}"))?;
        let saved: SavedSnapshot = postcard::from_bytes(&bytes)
            .map_err(|err| format!("the checkpoint in its footer: {err}"))?;
        Ok(Snapshot {
            partitions: (saved.partitions.into_iter())
                .map(|(topic, partition, offset, window)| PartitionState {
                    position: SourcePosition {
                        topic: topic.into(),
                        partition,
                        offset,
                    },
                    window,
                })
                .collect(),
            finished: saved.finished,
        })
    }
}
