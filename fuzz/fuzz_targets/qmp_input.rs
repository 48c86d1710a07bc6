//! QMP input: the byte-stream framer, the strict JSON parser, the request
//! envelope and the schema's argument checker, as a QMP connection runs
//! them; JSON strings also go through the command-line keyval parser and
//! its typing (qsd's --blockdev/--export/--nbd-server).
//!
//! Oracle besides "no panic": the framer must cut the same frames whether
//! the bytes arrive at once or in small reads.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use tidemark::qmp::cmdline::keyval;
use tidemark::qmp::json::{parse, to_line, Frame, Framer};
use tidemark::qmp::schema::schema;

const CMDLINE_TYPES: [&str; 3] = ["BlockdevOptions", "BlockExportOptions", "NbdServerOptions"];

/// The request envelope as the server checks it: `execute` (or
/// `exec-oob`) naming a command, optional `arguments` object and `id`.
fn request(v: &Value) -> Option<(&str, Map<String, Value>)> {
    let obj = v.as_object()?;
    let name = obj
        .get("execute")
        .or_else(|| obj.get("exec-oob"))?
        .as_str()?;
    let args = match obj.get("arguments") {
        None => Map::new(),
        Some(a) => a.as_object()?.clone(),
    };
    Some((name, args))
}

fn check(v: &Value) {
    let s = schema();
    if let Some((name, args)) = request(v) {
        if let Some(cmd) = s.command(name) {
            let _ = s.check_args(cmd, &args);
        }
        return;
    }
    if let Value::String(text) = v {
        for t in CMDLINE_TYPES {
            if let Ok(mut kv) = keyval(text, Some("driver")) {
                s.coerce_keyval(&mut kv, t);
                let _ = s.check_type(&kv, t);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let mut whole = Vec::new();
    Framer::new().push(input, &mut whole);

    let mut pieces = Vec::new();
    let mut f = Framer::new();
    for c in input.chunks(usize::from(chunk % 16) + 1) {
        f.push(c, &mut pieces);
    }
    assert_eq!(
        whole, pieces,
        "framing depends on how reads split the input"
    );

    for frame in &whole {
        if let Frame::Text(text) = frame {
            if let Ok(v) = parse(text) {
                check(&v);
                // The reply writer must take whatever the parser made.
                let _ = to_line(&v);
            }
        }
    }
});
