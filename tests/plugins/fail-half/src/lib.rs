//! Test fixture: a version that fails half its records. Records at odd
//! offsets fail with a reason naming the offset; the rest pass unchanged.
//! A canary of it must be rolled back automatically.

use serde::Deserialize;
use weir_guest::{Error, Output, RecordView, Result, Transform, export_transform};

/// No settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailHalf {}

impl Transform for FailHalf {
    fn process(&mut self, record: RecordView<'_>, out: &mut Output) -> Result<()> {
        if record.offset() % 2 == 1 {
            return Err(Error::new(format!("odd offset {}", record.offset())));
        }
        out.forward(&record);
        Ok(())
    }
}

export_transform!(FailHalf);
