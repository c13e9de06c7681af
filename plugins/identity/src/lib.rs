//! Passes every record through unchanged. The benchmark uses it to measure
//! what crossing the plugin boundary costs per record.

use serde::Deserialize;
use weir_guest::{Output, RecordView, Result, Transform, export_transform};

/// Takes no settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {}

impl Transform for Identity {
    fn process(&mut self, record: RecordView<'_>, out: &mut Output) -> Result<()> {
        out.forward(&record);
        Ok(())
    }
}

export_transform!(Identity);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_guest::testing::{TestRecord, configure, run};

    #[test]
    fn forwards_key_value_headers_and_time_unchanged() {
        let mut plugin: Identity = configure("{}").unwrap();
        let input = TestRecord::new("v")
            .with_key("k")
            .with_header("h", "1")
            .with_timestamp(5);
        let outcomes = run(&mut plugin, &[input]);
        let out = &outcomes[0].outputs()[0];
        assert_eq!(out.value, b"v");
        assert_eq!(out.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(out.headers, vec![("h".to_string(), b"1".to_vec())]);
        assert_eq!(out.timestamp, None, "None keeps the input's timestamp");
    }

    #[test]
    fn rejects_unknown_settings() {
        let err = configure::<Identity>(r#"{"threshold": 3}"#).err().unwrap();
        assert!(err.contains("unknown field `threshold`"), "{err}");
    }
}
