//! Test fixture: a version that differs from `identity` on every 10th
//! record. Records at offsets divisible by 10 come out with ` (changed)`
//! after their value; the rest pass unchanged. Shadow runs against
//! `identity` must count exactly those records as differing.

use serde::Deserialize;
use weir_guest::{Output, RecordView, Result, Transform, export_transform};

/// No settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EveryTenth {}

impl Transform for EveryTenth {
    fn process(&mut self, record: RecordView<'_>, out: &mut Output) -> Result<()> {
        if record.offset() % 10 == 0 {
            let mut value = record.value().to_vec();
            value.extend_from_slice(b" (changed)");
            drop(out.emit(&value));
        } else {
            out.forward(&record);
        }
        Ok(())
    }
}

export_transform!(EveryTenth);
