use std::collections::BTreeMap;

use serde::Deserialize;

use crate::kafka::KafkaConnection;

/// Settings of a `kafka` sink.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// librdkafka settings passed through unchanged (TLS, SASL, tuning).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// The topic records go to unless their route has one in `route_topics`.
    pub topic: String,
    /// Topic per route name, for plugins that route records (`to("alerts")`).
    #[serde(default)]
    pub route_topics: BTreeMap<String, String>,
    /// The routes this sink takes.
    #[serde(default = "crate::config::default_routes")]
    pub routes: Vec<String>,
}

impl KafkaSinkConfig {
    /// The cluster.
    pub fn connection(&self) -> KafkaConnection {
        KafkaConnection {
            brokers: self.brokers.clone(),
            options: self.options.clone(),
        }
    }
}
