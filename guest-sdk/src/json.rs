//! Reads JSON without building it: the top-level fields of an object as
//! borrowed raw text, and a check that a value is well-formed JSON.
//!
//! A filter that looks at two fields of a record need not parse the rest
//! into a tree, or even into typed values: [`fields`] walks the object once,
//! checking every byte against the JSON grammar (RFC 8259) as it goes, and
//! hands out each top-level key and the raw text of its value. Nested
//! values are skipped, not parsed. In a plugin this is several times faster
//! than `serde_json` and allocates nothing.
//!
//! ```
//! use weir_guest::json;
//!
//! let record = br#"{"id": 7, "user": {"name": "ada"}, "amount": 120.5}"#;
//! let mut amount = None;
//! for field in json::fields(record) {
//!     let (key, value) = field?;
//!     if key.is("amount") {
//!         amount = json::number(value);
//!     }
//! }
//! assert_eq!(amount, Some(120.5));
//! # Ok::<(), json::JsonError>(())
//! ```

use std::fmt;

/// Deepest nesting of arrays and objects accepted, as in `serde_json`.
const MAX_DEPTH: u32 = 128;

/// Why some text is not JSON, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonError {
    /// What was wrong.
    pub what: &'static str,
    /// Byte offset of the fault in the text.
    pub at: usize,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.what, self.at)
    }
}

impl std::error::Error for JsonError {}

/// Checks that `text` is one JSON value, surrounded by nothing but
/// whitespace.
pub fn validate(text: &[u8]) -> Result<(), JsonError> {
    let mut scan = Scanner { text, at: 0 };
    scan.value()?;
    scan.end()
}

/// The top-level fields of the JSON object `text`, in order, as (key, raw
/// value text). A key that appears twice is given twice. The iterator
/// checks the whole text, nested values and trailing bytes included: if
/// `text` is not one well-formed object, it ends with an error.
pub fn fields(text: &[u8]) -> Fields<'_> {
    Fields {
        scan: Scanner { text, at: 0 },
        state: State::Start,
    }
}

/// The number that raw value text holds, if it is a JSON number.
pub fn number(raw: &[u8]) -> Option<f64> {
    if !matches!(raw.first(), Some(b'-' | b'0'..=b'9')) {
        return None;
    }
    std::str::from_utf8(raw).ok()?.parse().ok()
}

/// An object key as it is written, without its quotes.
#[derive(Debug, Clone, Copy)]
pub struct Key<'a> {
    raw: &'a [u8],
    escaped: bool,
}

impl<'a> Key<'a> {
    /// The key's text as written in the JSON, escapes undecoded.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// Whether the key, once its escapes are decoded, is `name`.
    #[inline]
    pub fn is(&self, name: &str) -> bool {
        if !self.escaped {
            // Keys are short: compared in line, not by a call to `memcmp`
            // (which a plugin's own code, not the host's, would run).
            let name = name.as_bytes();
            return self.raw.len() == name.len() && self.raw.iter().zip(name).all(|(a, b)| a == b);
        }
        unescape(self.raw) == name
    }

    /// The key with its escapes decoded; a `\u` escape of a lone surrogate
    /// becomes U+FFFD.
    pub fn decoded(&self) -> std::borrow::Cow<'a, str> {
        if self.escaped {
            std::borrow::Cow::Owned(unescape(self.raw))
        } else {
            // The scanner checked that the key is UTF-8.
            String::from_utf8_lossy(self.raw)
        }
    }
}

/// The top-level fields of an object; see [`fields`].
pub struct Fields<'a> {
    scan: Scanner<'a>,
    state: State,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Inside,
    Done,
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(Key<'a>, &'a [u8]), JsonError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let field = match self.state {
            State::Done => return None,
            State::Start => self.first(),
            State::Inside => self.following(),
        };
        match field {
            Ok(Some(field)) => Some(Ok(field)),
            Ok(None) => {
                self.state = State::Done;
                None
            }
            Err(err) => {
                self.state = State::Done;
                Some(Err(err))
            }
        }
    }
}

impl<'a> Fields<'a> {
    #[inline]
    fn first(&mut self) -> Result<Option<(Key<'a>, &'a [u8])>, JsonError> {
        self.scan.whitespace();
        if self.scan.peek() != Some(b'{') {
            return Err(self.scan.fault("expected a JSON object"));
        }
        self.scan.at += 1;
        self.scan.whitespace();
        if self.scan.peek() == Some(b'}') {
            self.scan.at += 1;
            self.scan.end()?;
            return Ok(None);
        }
        self.state = State::Inside;
        self.field().map(Some)
    }

    #[inline]
    fn following(&mut self) -> Result<Option<(Key<'a>, &'a [u8])>, JsonError> {
        self.scan.whitespace();
        match self.scan.peek() {
            Some(b',') => {
                self.scan.at += 1;
                self.scan.whitespace();
                self.field().map(Some)
            }
            Some(b'}') => {
                self.scan.at += 1;
                self.scan.end()?;
                Ok(None)
            }
            _ => Err(self.scan.fault("expected `,` or `}`")),
        }
    }

    #[inline]
    fn field(&mut self) -> Result<(Key<'a>, &'a [u8]), JsonError> {
        let key = self.scan.key()?;
        let start = self.scan.at;
        // Flat records are mostly strings and numbers: skip those without
        // the nesting machinery.
        match self.scan.peek() {
            Some(b'"') => drop(self.scan.string()?),
            Some(b'-' | b'0'..=b'9') => self.scan.number()?,
            _ => self.scan.value()?,
        }
        Ok((key, &self.scan.text[start..self.scan.at]))
    }
}

/// A cursor over JSON text that checks the grammar as it skips.
struct Scanner<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Scanner<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    #[cold]
    fn fault(&self, what: &'static str) -> JsonError {
        JsonError {
            what: if self.at >= self.text.len() {
                "unexpected end of the text"
            } else {
                what
            },
            at: self.at,
        }
    }

    #[inline]
    fn whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.at += 1;
        }
    }

    /// Nothing but whitespace is left.
    fn end(&mut self) -> Result<(), JsonError> {
        self.whitespace();
        if self.at == self.text.len() {
            Ok(())
        } else {
            Err(self.fault("trailing characters after the JSON value"))
        }
    }

    /// `"key"`, whitespace, `:` and whitespace; the key without quotes.
    #[inline]
    fn key(&mut self) -> Result<Key<'a>, JsonError> {
        if self.peek() != Some(b'"') {
            return Err(self.fault("expected a string key"));
        }
        let start = self.at + 1;
        let escaped = self.string()?;
        let key = Key {
            raw: &self.text[start..self.at - 1],
            escaped,
        };
        self.whitespace();
        if self.peek() != Some(b':') {
            return Err(self.fault("expected `:`"));
        }
        self.at += 1;
        self.whitespace();
        Ok(key)
    }

    /// Skips one value (after leading whitespace), checking it; nesting is
    /// followed with a bit stack, not recursion.
    fn value(&mut self) -> Result<(), JsonError> {
        // Bit `d` set: the container at depth `d` is an object.
        let mut objects: u128 = 0;
        let mut depth: u32 = 0;
        loop {
            self.whitespace();
            match self.peek() {
                Some(b'{' | b'[') if depth == MAX_DEPTH => {
                    return Err(self.fault("nested too deep"));
                }
                Some(b'{') => {
                    self.at += 1;
                    self.whitespace();
                    if self.peek() == Some(b'}') {
                        self.at += 1;
                    } else {
                        objects |= 1 << depth;
                        depth += 1;
                        self.key()?;
                        continue;
                    }
                }
                Some(b'[') => {
                    self.at += 1;
                    self.whitespace();
                    if self.peek() == Some(b']') {
                        self.at += 1;
                    } else {
                        objects &= !(1 << depth);
                        depth += 1;
                        continue;
                    }
                }
                Some(b'"') => {
                    self.string()?;
                }
                Some(b'-' | b'0'..=b'9') => self.number()?,
                Some(b't') => self.literal(b"true")?,
                Some(b'f') => self.literal(b"false")?,
                Some(b'n') => self.literal(b"null")?,
                _ => return Err(self.fault("expected a JSON value")),
            }
            // A value ended: close containers until one goes on.
            loop {
                if depth == 0 {
                    return Ok(());
                }
                let in_object = objects & (1 << (depth - 1)) != 0;
                let (close, expected) = match in_object {
                    true => (b'}', "expected `,` or `}`"),
                    false => (b']', "expected `,` or `]`"),
                };
                self.whitespace();
                match self.peek() {
                    Some(b',') => {
                        self.at += 1;
                        if in_object {
                            self.whitespace();
                            self.key()?;
                        }
                        break;
                    }
                    Some(byte) if byte == close => {
                        self.at += 1;
                        depth -= 1;
                    }
                    _ => return Err(self.fault(expected)),
                }
            }
        }
    }

    /// Skips a string from its opening quote past its closing one; whether
    /// it holds escapes.
    #[inline]
    fn string(&mut self) -> Result<bool, JsonError> {
        self.at += 1;
        let start = self.at;
        let (mut escaped, mut high) = (false, 0u64);
        loop {
            // Eight bytes at a time up to the first quote, backslash or
            // control character.
            while let Some(chunk) = self.text.get(self.at..self.at + 8) {
                let word = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
                let special = special_bytes(word);
                if special != 0 {
                    // Bits below the first special byte's.
                    let before = special ^ (special - 1);
                    high |= word & HIGHS & before;
                    self.at += special.trailing_zeros() as usize / 8;
                    break;
                }
                high |= word & HIGHS;
                self.at += 8;
            }
            match self.peek() {
                Some(b'"') => {
                    if high != 0 && std::str::from_utf8(&self.text[start..self.at]).is_err() {
                        return Err(JsonError {
                            what: "a string that is not UTF-8",
                            at: start,
                        });
                    }
                    self.at += 1;
                    return Ok(escaped);
                }
                Some(b'\\') => {
                    escaped = true;
                    self.at += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                            self.at += 1;
                        }
                        Some(b'u') => {
                            let hex = self.text.get(self.at + 1..self.at + 5);
                            if !hex.is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)) {
                                self.at += 1;
                                return Err(self.fault("a `\\u` escape without four hex digits"));
                            }
                            self.at += 5;
                        }
                        _ => return Err(self.fault("an unknown escape")),
                    }
                }
                Some(0..0x20) => return Err(self.fault("a control character in a string")),
                // Fewer than eight bytes are left in the text.
                Some(byte) => {
                    high |= u64::from(byte & 0x80);
                    self.at += 1;
                }
                None => return Err(self.fault("an unterminated string")),
            }
        }
    }

    /// Skips `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    #[inline]
    fn number(&mut self) -> Result<(), JsonError> {
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek() {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.fault("a number without digits")),
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.fault("a number without digits after `.`"));
            }
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.fault("a number without digits in its exponent"));
            }
            self.digits();
        }
        Ok(())
    }

    #[inline]
    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), JsonError> {
        if self.text.get(self.at..self.at + word.len()) == Some(word) {
            self.at += word.len();
            Ok(())
        } else {
            Err(self.fault("expected `true`, `false` or `null`"))
        }
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The high bit of every byte of `word` that is `"`, `\` or below 0x20;
/// exact up to the first such byte (later bits may be spurious).
#[inline]
fn special_bytes(word: u64) -> u64 {
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let quote = zero_byte(word ^ (ONES * u64::from(b'"')));
    let backslash = zero_byte(word ^ (ONES * u64::from(b'\\')));
    // Bytes below 0x20: subtracting 0x20 borrows into the high bit; bytes
    // of 0x80 and above are masked out by `!word`.
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGHS;
    quote | backslash | control
}

/// Decodes the escapes of a checked JSON string's text. What cannot be a
/// character (a `\u` escape of a lone surrogate) becomes U+FFFD.
fn unescape(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut at = 0;
    while let Some(&byte) = raw.get(at) {
        at += 1;
        if byte != b'\\' {
            out.push(byte);
            continue;
        }
        let escape = raw.get(at).copied().unwrap_or(b'\\');
        at += 1;
        let simple = match escape {
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let hex = |at: usize| {
                    let digits = std::str::from_utf8(raw.get(at..at + 4)?).ok()?;
                    u32::from_str_radix(digits, 16).ok()
                };
                let mut code = hex(at);
                at += 4;
                if let Some(high @ 0xD800..0xDC00) = code
                    && raw.get(at..at + 2) == Some(b"\\u")
                    && let Some(low @ 0xDC00..0xE000) = hex(at + 2)
                {
                    code = Some(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00));
                    at += 6;
                }
                let char = code
                    .and_then(char::from_u32)
                    .unwrap_or(char::REPLACEMENT_CHARACTER);
                out.extend_from_slice(char.encode_utf8(&mut [0; 4]).as_bytes());
                continue;
            }
            other => other,
        };
        out.push(simple);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn top(text: &str) -> Result<Vec<(String, String)>, JsonError> {
        fields(text.as_bytes())
            .map(|field| {
                field.map(|(key, raw)| {
                    (
                        key.decoded().into_owned(),
                        String::from_utf8(raw.to_vec()).unwrap(),
                    )
                })
            })
            .collect()
    }

    #[test]
    fn gives_top_level_fields_with_their_raw_values() {
        let got = top(r#" { "a" : 1 , "b":{"c":[1,2,{"d":null}]},"e":"x\"y", "f":[] ,"g":{}} "#);
        let want = [
            ("a", "1"),
            ("b", r#"{"c":[1,2,{"d":null}]}"#),
            ("e", r#""x\"y""#),
            ("f", "[]"),
            ("g", "{}"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(got.unwrap(), want);
        assert_eq!(top("{}").unwrap(), []);
    }

    #[test]
    fn escaped_keys_match_their_decoded_name() {
        let text = br#"{"am\u006fu\nt": 3, "\ud83d\ude00": 4}"#;
        let keys: Vec<Key<'_>> = fields(text).map(|f| f.unwrap().0).collect();
        assert!(keys[0].is("amou\nt"));
        assert!(!keys[0].is("amount"));
        assert!(keys[1].is("😀"));
        let lone = br#"{"a\ud800b": 1}"#;
        let key = fields(lone).next().unwrap().unwrap().0;
        assert_eq!(key.decoded(), "a\u{FFFD}b");
    }

    #[test]
    fn numbers_are_read_only_from_number_text() {
        assert_eq!(number(b"120.5"), Some(120.5));
        assert_eq!(number(b"-1e3"), Some(-1000.0));
        assert_eq!(number(br#""100""#), None);
        assert_eq!(number(b"null"), None);
    }

    /// The scanner accepts exactly what `serde_json` accepts when it skips
    /// a value (UTF-8 checked first, as the host's `format = "json"` does), over texts
    /// made to probe every rule and over random mutations of valid ones.
    #[test]
    fn agrees_with_serde_json() {
        let cases = [
            "{}",
            "[]",
            "{\"a\":1}",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{,}",
            "{\"a\":01}",
            "{\"a\":-0.5e+7}",
            "{\"a\":1.}",
            "{\"a\":.5}",
            "{\"a\":1e}",
            "{\"a\":-}",
            "{\"a\":tru}",
            "{\"a\":true}",
            "{\"a\":nul}",
            "{\"a\":\"\\q\"}",
            "{\"a\":\"\\u12\"}",
            "{\"a\":\"\\u12ab\"}",
            "{\"a\":\"tab\there\"}",
            "{\"a\":[1,2,]}",
            "{\"a\":[1 2]}",
            "{\"a\":[[[]]]}",
            "{\"a\":{\"b\":}}",
            "{\"a\":1} x",
            "{\"a\":1}  \n",
            "{\"a\":1",
            "{\"a\":\"unterminated",
            "{1:2}",
            "  ",
            "",
            "\"just a string\"",
            "{\"a\":\"ünïcödé\"}",
            "{\"a\":\"12345678\\\"12345678\"}",
        ];
        for case in cases {
            let _ = check(case.as_bytes());
        }
        let mut bytes = br#"{"id":12,"user":"user-7","amount":104.25,"tags":["a","b"],"geo":{"lat":-1.5e3,"ok":true,"n":null},"pad":"xxxxxxxxxxxx"}"#.to_vec();
        // A fixed-seed xorshift: the same mutations on every run.
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b"{}[]\":,\\-+.eE0123456789tfnulrsa \t\n\x01\xc3\xa9\xff";
        let original = bytes.clone();
        let mut valid = 0;
        for _ in 0..20_000 {
            bytes.clone_from(&original);
            for _ in 0..=random() % 3 {
                let at = (random() % bytes.len() as u64) as usize;
                let byte = alphabet[(random() % alphabet.len() as u64) as usize];
                match random() % 3 {
                    0 => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    _ => drop(bytes.remove(at)),
                }
            }
            valid += usize::from(check(&bytes));
        }
        assert!(
            (2_000..18_000).contains(&valid),
            "the mutations should make both valid and invalid texts: {valid} valid"
        );
    }

    /// Whether `text` is JSON, after checking that both readers agree.
    fn check(text: &[u8]) -> bool {
        let serde = std::str::from_utf8(text)
            .ok()
            .and_then(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).ok());
        assert_eq!(
            validate(text).is_ok(),
            serde.is_some(),
            "validate disagrees with serde_json on {:?}",
            String::from_utf8_lossy(text)
        );
        let object = serde.is_some() && text.trim_ascii_start().first() == Some(&b'{');
        let scanned: Result<Vec<_>, _> = fields(text).collect();
        assert_eq!(
            scanned.is_ok(),
            object,
            "fields disagrees with serde_json on {:?}",
            String::from_utf8_lossy(text)
        );
        serde.is_some()
    }
}
