use serde::Deserialize;

use crate::kafka::KafkaConnection;

/// Settings of a `kafka` source.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// librdkafka settings passed through unchanged (TLS, SASL, tuning).
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
    /// Topics to consume; plugins pick theirs with `topics = [...]`.
    pub topics: Vec<String>,
    /// The consumer group; `weir-<pipeline>` by default. Workers running the
    /// same pipeline share it, and with it the partitions.
    pub group: Option<String>,
    /// Where a group with no committed offset starts.
    #[serde(default)]
    pub start: StartFrom,
    /// Exactly-once with a window: the compacted topic its window state is
    /// kept in; `<group>-state` by default (created if missing).
    pub state_topic: Option<String>,
}

/// Where a new consumer group starts reading.
#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    /// The oldest record still kept.
    #[default]
    Earliest,
    /// Only records produced from now on.
    Latest,
}

impl KafkaSourceConfig {
    /// The cluster.
    pub fn connection(&self) -> KafkaConnection {
        KafkaConnection {
            brokers: self.brokers.clone(),
            options: self.options.clone(),
        }
    }

    /// Where an exactly-once `pipeline` with a window keeps its state.
    pub fn changelog(&self, pipeline: &str) -> crate::kafka::Changelog {
        let group = self.group_for(pipeline);
        crate::kafka::Changelog {
            connection: self.connection(),
            topic: (self.state_topic.clone()).unwrap_or_else(|| format!("{group}-state")),
            group,
        }
    }

    /// The consumer group for `pipeline`.
    pub fn group_for(&self, pipeline: &str) -> String {
        self.group
            .clone()
            .unwrap_or_else(|| format!("weir-{pipeline}"))
    }
}
