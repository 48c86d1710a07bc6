//! QMP framing: turning a byte stream into whole JSON values, and values
//! back into qemu's output form.
//!
//! QMP has no length prefix or delimiter; a value ends where its braces
//! balance. [`Framer`] scans bytes as they arrive (strings and escapes
//! included), buffers only the value in progress, and hands out a value
//! once it is complete, so partial reads and several values per read both
//! work. It enforces qemu's limits with qemu's texts: nesting depth 1024,
//! 2^21 tokens and 64 MiB per value. Bytes that cannot start a JSON token
//! are reported as qemu's lexer does ("JSON parse error, stray '...'"),
//! and scanning resumes after them: a client's garbage costs that client
//! one error reply, nothing more.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// qemu's json-streamer limits.
const MAX_NESTING: usize = 1024;
const MAX_TOKENS: usize = 2 << 20;
const MAX_VALUE_BYTES: usize = 64 << 20;

/// One complete input: a value's text, or an error to report.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Text(Vec<u8>),
    Error(String),
}

#[derive(Default)]
pub struct Framer {
    buf: Vec<u8>,
    depth: usize,
    tokens: usize,
    in_string: bool,
    escape: bool,
    /// Inside a bare token (number, keyword) at the top level.
    in_scalar: bool,
}

impl Framer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; complete frames are appended to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<Frame>) {
        for &b in data {
            self.byte(b, out);
        }
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.depth = 0;
        self.tokens = 0;
    }

    fn emit(&mut self, out: &mut Vec<Frame>) {
        out.push(Frame::Text(std::mem::take(&mut self.buf)));
        self.reset();
    }

    fn append(&mut self, b: u8, out: &mut Vec<Frame>) {
        self.buf.push(b);
        if self.buf.len() > MAX_VALUE_BYTES {
            out.push(Frame::Error("JSON token size limit exceeded".into()));
            // The lexer keeps its place (inside a string, say); only the
            // value collected so far is dropped, as in qemu.
            self.reset();
        }
    }

    fn token(&mut self, out: &mut Vec<Frame>) -> bool {
        self.tokens += 1;
        if self.tokens > MAX_TOKENS {
            out.push(Frame::Error("JSON token count limit exceeded".into()));
            self.reset();
            return false;
        }
        true
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Frame>) {
        if self.in_string {
            if b < 0x20 {
                // A raw control character cannot be in a JSON string: the
                // whole token so far is stray.
                let start = self.buf.iter().rposition(|&c| c == b'"').unwrap_or(0);
                let mut stray = self.buf[start..].to_vec();
                stray.push(b);
                out.push(Frame::Error(format!(
                    "JSON parse error, stray '{}'",
                    String::from_utf8_lossy(&stray)
                )));
                self.in_string = false;
                self.escape = false;
                self.reset();
                return;
            }
            self.append(b, out);
            if self.escape {
                self.escape = false;
            } else if b == b'\\' {
                self.escape = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.depth == 0 && !self.buf.is_empty() {
                    self.emit(out);
                }
            }
            return;
        }
        if self.in_scalar && !is_scalar_byte(b) {
            self.in_scalar = false;
            if self.depth == 0 && !self.buf.is_empty() {
                self.emit(out);
            }
        }
        match b {
            b' ' | b'\t' | b'\r' | b'\n' => {
                if !self.buf.is_empty() {
                    self.append(b, out);
                }
            }
            b'"' => {
                if self.token(out) {
                    self.in_string = true;
                    self.append(b, out);
                }
            }
            b'{' | b'[' => {
                if !self.token(out) {
                    return;
                }
                if self.depth >= MAX_NESTING {
                    out.push(Frame::Error("JSON nesting depth limit exceeded".into()));
                    self.reset();
                    return;
                }
                self.depth += 1;
                self.append(b, out);
            }
            b'}' | b']' => {
                if self.depth == 0 {
                    out.push(Frame::Error("JSON parse error, expecting value".into()));
                    self.reset();
                    return;
                }
                if !self.token(out) {
                    return;
                }
                self.append(b, out);
                self.depth -= 1;
                if self.depth == 0 {
                    self.emit(out);
                }
            }
            b':' | b',' => {
                if self.depth == 0 {
                    out.push(Frame::Error("JSON parse error, expecting value".into()));
                    return;
                }
                if self.token(out) {
                    self.append(b, out);
                }
            }
            _ if is_scalar_byte(b) => {
                if !self.in_scalar {
                    if !self.token(out) {
                        return;
                    }
                    self.in_scalar = true;
                }
                self.append(b, out);
            }
            _ => {
                out.push(Frame::Error(format!(
                    "JSON parse error, stray '{}'",
                    String::from_utf8_lossy(&[b])
                )));
                self.reset();
            }
        }
    }
}

fn is_scalar_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.')
}

/// Parses a frame's text: a JSON value, or qemu's parse-error text.
pub fn parse(text: &[u8]) -> Result<Value, String> {
    // serde_json stops at 128 levels; qemu allows 1024, and the framer
    // has already refused anything deeper, so the stack stays bounded.
    let mut de = serde_json::Deserializer::from_slice(text);
    de.disable_recursion_limit();
    let parsed = Strict::deserialize(&mut de).and_then(|v| de.end().map(|()| v.0));
    parsed.map_err(|e| format!("JSON parse error, {}", qemu_parse_error(&e)))
}

/// qemu's parser texts for the mistakes serde_json finds in a value whose
/// brackets balance (the framer has handled everything else).
fn qemu_parse_error(e: &serde_json::Error) -> &'static str {
    let msg = e.to_string();
    if msg.starts_with(DUPLICATE_KEY) {
        DUPLICATE_KEY
    } else if msg.starts_with("expected `:`") {
        "missing : in object pair"
    } else if msg.starts_with("key must be a string") {
        "key is not a string in object"
    } else if msg.starts_with("expected `,` or `}`") {
        "expected separator in dict"
    } else if msg.starts_with("expected `,` or `]`") {
        "expected separator in list"
    } else if e.classify() == serde_json::error::Category::Eof {
        "premature EOF"
    } else {
        "expecting value"
    }
}

const DUPLICATE_KEY: &str = "duplicate key";

/// A JSON value whose objects have unique keys: qemu refuses a repeated
/// key where serde_json would keep the last one.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut v = Vec::new();
        while let Some(Strict(x)) = seq.next_element()? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut m = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let Strict(v) = map.next_value()?;
            if m.insert(k, v).is_some() {
                return Err(serde::de::Error::custom(DUPLICATE_KEY));
            }
        }
        Ok(Value::Object(m))
    }
}

/// qemu's output spacing: `{"a": 1, "b": [1, 2]}`.
struct QemuFormatter;

impl serde_json::ser::Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// One output line as qemu writes it, CRLF included.
pub fn to_line(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuFormatter);
    // Serialising a Value into a Vec cannot fail.
    if v.serialize(&mut ser).is_err() {
        out.clear();
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(chunks: &[&[u8]]) -> Vec<Frame> {
        let mut f = Framer::new();
        let mut out = Vec::new();
        for c in chunks {
            f.push(c, &mut out);
        }
        out
    }

    #[test]
    fn values_split_across_reads_and_joined_in_one() {
        let out = frames(&[b"{\"execute\": \"a\"", b"}{\"x\":", b"\"}\"}  {}"]);
        assert_eq!(
            out,
            vec![
                Frame::Text(b"{\"execute\": \"a\"}".to_vec()),
                Frame::Text(b"{\"x\":\"}\"}".to_vec()),
                Frame::Text(b"{}".to_vec()),
            ]
        );
    }

    #[test]
    fn nesting_is_capped_like_qemu() {
        let deep = [b"[".repeat(1025), b"]".repeat(1025)].concat();
        let out = frames(&[&deep]);
        assert_eq!(
            out[0],
            Frame::Error("JSON nesting depth limit exceeded".into())
        );
        let ok = [b"[".repeat(1024), b"]".repeat(1024)].concat();
        assert!(matches!(frames(&[&ok])[0], Frame::Text(_)));
    }

    #[test]
    fn control_character_in_string_is_stray() {
        let out = frames(&[b"{\"exec\nute\"}"]);
        assert_eq!(
            out[0],
            Frame::Error("JSON parse error, stray '\"exec\n'".into())
        );
    }

    #[test]
    fn duplicate_keys_are_refused_like_qemu() {
        assert_eq!(
            parse(br#"{"a": {"b": 1, "b": 2}}"#),
            Err("JSON parse error, duplicate key".into())
        );
        assert!(parse(br#"{"a": [{"b": 1}, {"b": 2}]}"#).is_ok());
    }

    #[test]
    fn output_uses_qemu_spacing() {
        let v: Value = serde_json::from_str(r#"{"return": {"a": [1, 2]}}"#).unwrap();
        assert_eq!(to_line(&v), b"{\"return\": {\"a\": [1, 2]}}\r\n".to_vec());
    }
}
