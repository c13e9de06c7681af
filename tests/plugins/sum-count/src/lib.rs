//! Test fixture: the sum and count of the integer field `field` per key and
//! window, `{"sum": .., "count": ..}`: the built-in `sum` and `count` as a
//! plugin, so that the window benchmark can set one against the other. Its
//! state is 16 bytes of its own encoding rather than the SDK's JSON.

use serde::{Deserialize, Serialize};
use weir_guest::{Aggregate, Error, RecordView, Result, export_aggregate};

/// The settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SumCount {
    field: String,
}

/// The sum and the count so far.
#[derive(Default, Serialize, Deserialize)]
pub struct Totals {
    sum: i64,
    count: u64,
}

impl Aggregate for SumCount {
    type State = Totals;
    type Output = Totals;

    fn accumulate(&mut self, totals: &mut Totals, record: RecordView<'_>) -> Result<()> {
        for field in weir_guest::json::fields(record.value()) {
            let (name, raw) = field.map_err(|e| Error::new(format!("not a JSON object: {e}")))?;
            if name.is(&self.field) {
                let value = std::str::from_utf8(raw)
                    .ok()
                    .and_then(|t| t.parse::<i64>().ok());
                totals.sum += value.ok_or_else(|| Error::new("not an integer"))?;
                break;
            }
        }
        totals.count += 1;
        Ok(())
    }

    fn merge(&mut self, totals: &mut Totals, other: Totals) {
        totals.sum += other.sum;
        totals.count += other.count;
    }

    fn finish(&mut self, totals: &Totals) -> Result<Totals> {
        Ok(Totals { ..*totals })
    }

    fn encode(totals: &Totals, out: &mut Vec<u8>) -> Result<()> {
        out.extend_from_slice(&totals.sum.to_le_bytes());
        out.extend_from_slice(&totals.count.to_le_bytes());
        Ok(())
    }

    fn decode(_version: u32, bytes: &[u8]) -> Result<Totals> {
        let word = |at: usize| -> Result<[u8; 8]> {
            (bytes.get(at..at + 8).and_then(|b| b.try_into().ok()))
                .ok_or_else(|| Error::new("a state of other than 16 bytes"))
        };
        Ok(Totals {
            sum: i64::from_le_bytes(word(0)?),
            count: u64::from_le_bytes(word(8)?),
        })
    }
}

export_aggregate!(SumCount);
