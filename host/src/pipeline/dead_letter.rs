//! Dead letters: records that could not be processed, kept with their
//! original key and value and headers that say why and where from.

use bytes::Bytes;

use crate::record::Record;

/// Header: why the record failed.
pub const REASON: &str = "weir.error.reason";
/// Header: `source`, `plugin`, `route`, `window` or `sink`: where it failed.
pub const STAGE: &str = "weir.error.stage";
/// Header: the plugin that failed it.
pub const PLUGIN: &str = "weir.error.plugin";
/// Header: that plugin's version.
pub const PLUGIN_VERSION: &str = "weir.error.plugin.version";
/// Header: the first hex digits of the SHA-256 of that plugin's `.wasm`.
pub const PLUGIN_HASH: &str = "weir.error.plugin.hash";
/// Header: the pipeline.
pub const PIPELINE: &str = "weir.pipeline";
/// Header: source topic (or file, or generator).
pub const SOURCE_TOPIC: &str = "weir.source.topic";
/// Header: source partition.
pub const SOURCE_PARTITION: &str = "weir.source.partition";
/// Header: source offset (line number, for files).
pub const SOURCE_OFFSET: &str = "weir.source.offset";

/// Where in the pipeline a record failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// The source could not make it a record (malformed input).
    Source,
    /// A plugin failed it.
    Plugin {
        /// The plugin's name.
        name: String,
        /// Its version.
        version: String,
        /// The short hash of its `.wasm`.
        hash: String,
    },
    /// No sink takes the route a plugin sent it to.
    Route,
    /// A sink cannot hold it as it is (a line break in a value written one
    /// record per line).
    Sink,
    /// The window cannot use it (no event time, no key, a field that is
    /// not a number).
    Window,
}

/// A record that goes to the dead-letter sink.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The record as it was when it failed.
    pub record: Record,
    /// Why.
    pub reason: String,
    /// Where.
    pub stage: Stage,
}

impl DeadLetter {
    /// The record to write: the original key and value, its headers, and
    /// the `weir.*` headers above.
    pub fn into_record(self, pipeline: &str) -> Record {
        let mut record = self.record;
        let source = record.source.clone();
        let mut add = |name: &str, value: Bytes| record.headers.push((name.to_owned(), value));
        add(REASON, self.reason.into());
        add(PIPELINE, Bytes::copy_from_slice(pipeline.as_bytes()));
        match self.stage {
            Stage::Source => add(STAGE, "source".into()),
            Stage::Route => add(STAGE, "route".into()),
            Stage::Sink => add(STAGE, "sink".into()),
            Stage::Window => add(STAGE, "window".into()),
            Stage::Plugin {
                name,
                version,
                hash,
            } => {
                add(STAGE, "plugin".into());
                add(PLUGIN, name.into());
                add(PLUGIN_VERSION, version.into());
                add(PLUGIN_HASH, hash.into());
            }
        }
        add(
            SOURCE_TOPIC,
            Bytes::copy_from_slice(source.topic.as_bytes()),
        );
        add(SOURCE_PARTITION, source.partition.to_string().into());
        add(SOURCE_OFFSET, source.offset.to_string().into());
        record
    }
}
