//! Masks e-mail addresses and card numbers inside the string fields of JSON
//! records: `customer17@example.com` becomes `c***@example.com`, and
//! `4111 1111 1111 1234` becomes `**** **** **** 1234`.
//!
//! ```toml
//! [[pipeline.plugin]]
//! crate = "plugins/pii-redactor"
//! config = { fields = ["email", "card_number", "note"] }   # all string fields when absent
//! ```
//!
//! Counts what it masked in the host counters `emails_masked` and
//! `cards_masked`. A record that is not JSON fails with the reason.

use serde::Deserialize;
use serde_json::Value;
use weir_guest::{Error, Output, RecordView, Result, Transform, counter, export_transform};

/// The plugin's settings.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct PiiRedactor {
    /// Only these top-level fields are scanned; every string (nested too)
    /// when empty.
    #[serde(default)]
    fields: Vec<String>,
    /// Mask e-mail addresses.
    #[serde(default = "yes")]
    emails: bool,
    /// Mask card numbers (13–19 digits, optionally grouped by spaces or dashes).
    #[serde(default = "yes")]
    cards: bool,
}

fn yes() -> bool {
    true
}

#[derive(Default)]
struct Tally {
    emails: u64,
    cards: u64,
}

impl Transform for PiiRedactor {
    fn validate(&mut self) -> Result<()> {
        if !self.emails && !self.cards {
            return Err(Error::new(
                "`emails` and `cards` are both off: nothing to redact",
            ));
        }
        Ok(())
    }

    fn process(&mut self, record: RecordView<'_>, out: &mut Output) -> Result<()> {
        let mut doc: Value = serde_json::from_slice(record.value())
            .map_err(|err| Error::new(format!("not JSON: {err}")))?;
        let mut tally = Tally::default();
        match (&mut doc, self.fields.is_empty()) {
            (_, true) => self.redact_value(&mut doc, &mut tally),
            (Value::Object(map), false) => {
                for field in &self.fields {
                    if let Some(value) = map.get_mut(field) {
                        self.redact_value(value, &mut tally);
                    }
                }
            }
            (_, false) => return Err(Error::new("not a JSON object, so `fields` cannot apply")),
        }
        if tally.emails + tally.cards == 0 {
            out.forward(&record);
            return Ok(());
        }
        if tally.emails > 0 {
            counter("emails_masked", tally.emails);
        }
        if tally.cards > 0 {
            counter("cards_masked", tally.cards);
        }
        let mut emitted = out.emit_json(&doc)?;
        if let Some(key) = record.key() {
            emitted = emitted.key(key);
        }
        for (name, value) in record.headers().iter() {
            emitted = emitted.header(name, value);
        }
        drop(emitted);
        Ok(())
    }
}

impl PiiRedactor {
    fn redact_value(&self, value: &mut Value, tally: &mut Tally) {
        match value {
            Value::String(text) => {
                if let Some(masked) = self.redact_text(text, tally) {
                    *text = masked;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.redact_value(v, tally)),
            Value::Object(map) => map.values_mut().for_each(|v| self.redact_value(v, tally)),
            _ => {}
        }
    }

    /// The masked text, or `None` when nothing needed masking.
    fn redact_text(&self, text: &str, tally: &mut Tally) -> Option<String> {
        let mut text = std::borrow::Cow::Borrowed(text);
        if self.emails
            && let Some((masked, n)) = mask_emails(&text)
        {
            tally.emails += n;
            text = masked.into();
        }
        if self.cards
            && let Some((masked, n)) = mask_cards(&text)
        {
            tally.cards += n;
            text = masked.into();
        }
        match text {
            std::borrow::Cow::Owned(masked) => Some(masked),
            std::borrow::Cow::Borrowed(_) => None,
        }
    }
}

fn is_local_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"._%+-".contains(&c)
}

fn is_domain_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'.' || c == b'-'
}

/// Replaces the local part of each address but its first character.
fn mask_emails(text: &str) -> Option<(String, u64)> {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let (mut copied, mut count) = (0, 0);
    for (at, _) in text.match_indices('@') {
        let start = (0..at)
            .rev()
            .take_while(|&i| is_local_char(bytes[i]))
            .last();
        let end = (at + 1..bytes.len())
            .take_while(|&i| is_domain_char(bytes[i]))
            .last();
        let (Some(start), Some(end)) = (start, end) else {
            continue;
        };
        let domain = &text[at + 1..=end];
        if start < copied || !domain.contains('.') || domain.starts_with('.') {
            continue;
        }
        out.push_str(&text[copied..=start]);
        out.push_str("***");
        copied = at;
        count += 1;
    }
    (count > 0).then(|| {
        out.push_str(&text[copied..]);
        (out, count)
    })
}

/// Replaces all but the last four digits of each card-like number.
fn mask_cards(text: &str) -> Option<(String, u64)> {
    let bytes = text.as_bytes();
    let mut out: Vec<u8> = bytes.to_vec();
    let mut count = 0;
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() || (i > 0 && bytes[i - 1].is_ascii_alphanumeric()) {
            i += 1;
            continue;
        }
        // A run of digits with single space or dash separators.
        let (mut end, mut digits) = (i, 0);
        let mut j = i;
        while j < bytes.len() {
            if bytes[j].is_ascii_digit() {
                digits += 1;
                end = j + 1;
                j += 1;
            } else if (bytes[j] == b' ' || bytes[j] == b'-')
                && bytes.get(j + 1).is_some_and(u8::is_ascii_digit)
            {
                j += 1;
            } else {
                break;
            }
        }
        if (13..=19).contains(&digits) {
            let mut left = digits - 4;
            for b in &mut out[i..end] {
                if left > 0 && b.is_ascii_digit() {
                    *b = b'*';
                    left -= 1;
                }
            }
            count += 1;
        }
        i = end.max(i + 1);
    }
    // Only ASCII digits were replaced by ASCII, so the text stays UTF-8.
    (count > 0).then(|| (String::from_utf8(out).unwrap_or_default(), count))
}

export_transform!(PiiRedactor);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_guest::testing::{self, TestRecord, configure, run};

    #[test]
    fn masks_emails_and_cards_everywhere_by_default() {
        let mut plugin: PiiRedactor = configure("{}").unwrap();
        let input = TestRecord::new(
            r#"{"email":"customer17@example.com","card_number":"4111 1111 1111 1234","note":{"msg":"mail bo.b@x.org or 4000-0000-0000-0002"},"amount":12.5}"#,
        )
        .with_key("user-17")
        .with_header("trace", "t1");
        let outcomes = run(&mut plugin, &[input]);
        let out = &outcomes[0].outputs()[0];
        let doc: Value = serde_json::from_slice(&out.value).unwrap();
        assert_eq!(doc["email"], "c***@example.com");
        assert_eq!(doc["card_number"], "**** **** **** 1234");
        assert_eq!(doc["note"]["msg"], "mail b***@x.org or ****-****-****-0002");
        assert_eq!(doc["amount"], 12.5);
        assert_eq!(out.key.as_deref(), Some(&b"user-17"[..]));
        assert_eq!(out.headers, vec![("trace".to_string(), b"t1".to_vec())]);
        assert_eq!(testing::counter("emails_masked"), 2);
        assert_eq!(testing::counter("cards_masked"), 2);
    }

    #[test]
    fn leaves_clean_records_byte_for_byte_and_short_numbers_alone() {
        let mut plugin: PiiRedactor = configure("{}").unwrap();
        let clean = r#"{"order": 123456789012, "at": "user@localhost", "phone": "555 1234"}"#;
        let outcomes = run(&mut plugin, &[TestRecord::new(clean)]);
        assert_eq!(outcomes[0].outputs()[0].value_str(), clean);
    }

    #[test]
    fn scans_only_listed_fields_when_given() {
        let mut plugin: PiiRedactor = configure(r#"{"fields": ["email"]}"#).unwrap();
        let input = TestRecord::new(r#"{"email":"ann@example.com","copy":"ann@example.com"}"#);
        let doc: Value =
            serde_json::from_slice(&run(&mut plugin, &[input])[0].outputs()[0].value).unwrap();
        assert_eq!(doc["email"], "a***@example.com");
        assert_eq!(doc["copy"], "ann@example.com");
    }

    #[test]
    fn fails_records_that_are_not_json() {
        let mut plugin: PiiRedactor = configure("{}").unwrap();
        let outcomes = run(&mut plugin, &[TestRecord::new("name=ann@example.com")]);
        assert!(outcomes[0].failure().unwrap().starts_with("not JSON"));
    }
}
