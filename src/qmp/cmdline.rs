//! qemu-storage-daemon's command line: `--blockdev`, `--nbd-server`,
//! `--export`, `--chardev socket,...`, `--monitor`, `--pidfile`. Each option
//! is its QMP command in another syntax: its value (keyval `a.b=c,l.0=x`, or
//! JSON when it starts with `{`) is typed and checked by the same schema,
//! then runs through the same command code, in command-line order.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::commands::{self, export};
use super::error::QmpResult;
use super::schema::schema;
use crate::daemon::Daemon;

/// One option, in command-line order.
#[derive(Debug, Clone, PartialEq)]
pub enum Opt {
    /// blockdev-add arguments.
    Blockdev(Value),
    /// NbdServerOptions (flat socket address).
    NbdServer(Value),
    /// block-export-add arguments.
    Export(Value),
    /// object-add arguments (`--object`).
    Object(Value),
    /// A monitor on a unix socket (`--chardev` plus `--monitor`).
    Monitor(PathBuf),
    Pidfile(PathBuf),
    /// Fork; the parent exits once the daemon is ready.
    Daemonize,
    /// tidemark's: `--bitmap-intent-log on|off`, `--bitmap-store-interval
    /// SECS` (see qcow2/intent.rs).
    Bitmaps(crate::store_point::BitmapPolicy),
    /// tidemark's: `--nbd-memory SIZE`, the NBD server's memory pool for
    /// in-flight requests (see nbd/budget.rs).
    NbdMemory(usize),
}

/// An option and where it came from (`--object secret,id=s0`): qsd starts
/// each of its errors with that.
#[derive(Debug, Clone, PartialEq)]
pub struct Arg {
    pub opt: Opt,
    pub at: String,
}

impl Arg {
    /// An error of this option, as qsd prints it.
    fn error(&self, e: impl std::fmt::Display) -> String {
        if self.at.is_empty() {
            e.to_string()
        } else {
            format!("{}: {e}", self.at)
        }
    }
}

/// Parses the arguments after `tidemark daemon`.
pub fn parse_args(args: &[String]) -> Result<Vec<Arg>, String> {
    let mut opts: Vec<Arg> = Vec::new();
    let mut chardevs: HashMap<String, PathBuf> = HashMap::new();
    let mut policy: Option<crate::store_point::BitmapPolicy> = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        let name = name.trim_start_matches('-');
        if name == "daemonize" {
            opts.push(Arg {
                opt: Opt::Daemonize,
                at: arg.clone(),
            });
            continue;
        }
        if !VALUED.contains(&name) {
            return Err(format!("unrecognized option '{arg}'"));
        }
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .cloned()
                .ok_or_else(|| format!("option '--{name}' requires an argument"))?,
        };
        let at = format!("--{name} {value}");
        let opt =
            option(name, &value, &mut chardevs, &mut policy).map_err(|e| format!("{at}: {e}"))?;
        if let Some(opt) = opt {
            opts.push(Arg { opt, at });
        }
    }
    // First, whatever the order given: it decides how images open.
    if let Some(p) = policy {
        opts.insert(
            0,
            Arg {
                opt: Opt::Bitmaps(p),
                at: String::new(),
            },
        );
    }
    Ok(opts)
}

/// The options that take a value (all but `--daemonize`).
const VALUED: &[&str] = &[
    "blockdev",
    "nbd-server",
    "export",
    "object",
    "chardev",
    "monitor",
    "pidfile",
    "bitmap-intent-log",
    "bitmap-store-interval",
    "nbd-memory",
];

/// One option with its value; `None` for options that only feed others
/// (a chardev, the bitmap policy).
fn option(
    name: &str,
    value: &str,
    chardevs: &mut HashMap<String, PathBuf>,
    policy: &mut Option<crate::store_point::BitmapPolicy>,
) -> Result<Option<Opt>, String> {
    Ok(Some(match name {
        "blockdev" => Opt::Blockdev(typed(value, None, "BlockdevOptions")?),
        "nbd-server" => Opt::NbdServer(typed(value, None, "NbdServerOptions")?),
        "export" => Opt::Export(typed(value, None, "BlockExportOptions")?),
        "object" => Opt::Object(object(value)?),
        "chardev" => {
            let v = keyval(value, Some("backend"))?;
            let get = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
            if get("backend").as_deref() != Some("socket") {
                return Err("only 'socket' chardevs are supported".into());
            }
            let id = get("id").ok_or("Parameter 'id' is missing")?;
            let path = get("path").ok_or("only unix sockets (path=) are supported")?;
            if get("server").is_some_and(|s| !matches!(s.as_str(), "on" | "yes" | "true")) {
                return Err("only server=on is supported".into());
            }
            chardevs.insert(id, PathBuf::from(path));
            return Ok(None);
        }
        "monitor" => {
            let v = keyval(value, Some("chardev"))?;
            let id = v
                .get("chardev")
                .and_then(Value::as_str)
                .ok_or("Parameter 'chardev' is missing")?;
            if v.get("mode")
                .and_then(Value::as_str)
                .is_some_and(|m| m != "control")
            {
                return Err("only mode=control is supported".into());
            }
            let path = chardevs
                .get(id)
                .ok_or_else(|| format!("chardev \"{id}\" not found"))?;
            Opt::Monitor(path.clone())
        }
        "pidfile" => Opt::Pidfile(PathBuf::from(value)),
        "bitmap-intent-log" => {
            let on = crate::store_point::BitmapPolicy::parse_switch(value)?;
            policy.get_or_insert_with(Default::default).intent_log = on;
            return Ok(None);
        }
        "bitmap-store-interval" => {
            let secs = crate::store_point::BitmapPolicy::parse_interval(value)?;
            policy.get_or_insert_with(Default::default).store_interval = secs;
            return Ok(None);
        }
        "nbd-memory" => Opt::NbdMemory(parse_nbd_memory(value)?),
        _ => return Ok(None),
    }))
}

/// `--nbd-memory`: a size with qemu's suffixes, at least the smallest pool.
pub fn parse_nbd_memory(text: &str) -> Result<usize, String> {
    use crate::nbd::budget::MIN_POOL;
    match crate::cli::size::parse_size(text) {
        Some(n) if n >= MIN_POOL as u64 => Ok(n.min(usize::MAX as u64) as usize),
        _ => Err(format!(
            "--nbd-memory: expected a size of at least {}M, not '{text}'",
            MIN_POOL >> 20
        )),
    }
}

/// `--object`'s value (keyval with the type first, or JSON) as object-add
/// takes it: for `daemon` and `serve` alike.
pub fn object(text: &str) -> Result<Value, String> {
    typed(text, Some("qom-type"), "ObjectOptions")
}

/// An option's value as the JSON its QMP command takes.
fn typed(text: &str, implied: Option<&str>, type_name: &str) -> Result<Value, String> {
    // qsd's JSON form may omit nothing the QMP form needs; check both.
    if text.trim_start().starts_with('{') {
        let v = serde_json::from_str(text).map_err(|e| format!("JSON parse error: {e}"))?;
        schema().check_type(&v, type_name).map_err(|e| e.desc)?;
        return Ok(v);
    }
    let mut v = keyval(text, implied)?;
    schema().coerce_keyval(&mut v, type_name);
    schema().check_keyval(&v, type_name).map_err(|e| e.desc)?;
    Ok(v)
}

/// Parses qemu's keyval syntax into nested JSON strings: `a.b=c` nests,
/// numeric keys make lists, `,,` is a literal comma, and a first item
/// without `=` is the value of `implied`.
pub fn keyval(text: &str, implied: Option<&str>) -> Result<Value, String> {
    let mut root = Value::Object(Map::new());
    let mut first = true;
    for item in split_items(text) {
        let (key, val) = match item.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None if first && implied.is_some() => {
                (implied.unwrap_or_default().to_owned(), item.clone())
            }
            None => return Err(format!("Expected '=' after parameter '{item}'")),
        };
        first = false;
        insert(&mut root, &key, Value::String(val))?;
    }
    lists(&mut root);
    Ok(root)
}

fn split_items(text: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        items.push(cur);
    }
    items
}

fn insert(root: &mut Value, key: &str, val: Value) -> Result<(), String> {
    let mut cur = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        if p.is_empty() {
            return Err(format!("Invalid parameter '{key}'"));
        }
        let Value::Object(m) = cur else {
            return Err(format!("Parameter '{key}' conflicts with a scalar"));
        };
        if i + 1 == parts.len() {
            if m.insert((*p).to_owned(), val).is_some() {
                return Err(format!("Parameter '{key}' given twice"));
            }
            return Ok(());
        }
        cur = m
            .entry((*p).to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    Ok(())
}

/// Objects whose keys are all 0..n become lists, as keyval's `l.0=x`.
fn lists(v: &mut Value) {
    if let Value::Object(m) = v {
        for x in m.values_mut() {
            lists(x);
        }
        let n = m.len();
        if n > 0 && (0..n).all(|i| m.contains_key(&i.to_string())) {
            let items = (0..n).filter_map(|i| m.remove(&i.to_string())).collect();
            *v = Value::Array(items);
        }
    }
}

fn as_map(v: &Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

/// Applies the block and export options in order, as their QMP commands.
/// Monitors and the pidfile are the caller's: they are not state.
pub async fn apply(d: &Arc<Daemon>, opts: &[Arg]) -> Result<(), String> {
    for a in opts {
        apply_one(d, &a.opt)
            .await
            .map_err(|e| a.error(hint(&e.desc)))?;
    }
    Ok(())
}

/// qemu's hint under an error, printed on the command line only.
fn hint(desc: &str) -> String {
    if desc == "Parameter 'id' expects an identifier" {
        return format!(
            "{desc}\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter."
        );
    }
    desc.to_owned()
}

async fn apply_one(d: &Arc<Daemon>, o: &Opt) -> QmpResult<()> {
    {
        match o {
            Opt::Blockdev(v) => {
                commands::execute(d, "blockdev-add", as_map(v)).await?;
            }
            Opt::NbdServer(v) => {
                let _serial = d.command_lock.lock().await;
                export::start_server(d, &as_map(v), true).await?;
            }
            Opt::Object(v) => {
                commands::execute(d, "object-add", as_map(v)).await?;
            }
            Opt::Export(v) => {
                commands::execute(d, "block-export-add", as_map(v)).await?;
            }
            Opt::Bitmaps(p) => d.set_bitmap_policy(*p),
            Opt::NbdMemory(n) => d.set_nbd_memory(*n),
            Opt::Monitor(_) | Opt::Pidfile(_) | Opt::Daemonize => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn keyval_nests_lists_and_escapes() {
        let v = keyval("type=nbd,bitmaps.0=b0,bitmaps.1=b1,addr.path=/a,,b", None).unwrap();
        assert_eq!(
            v,
            json!({"type": "nbd", "bitmaps": ["b0", "b1"], "addr": {"path": "/a,b"}})
        );
        assert_eq!(
            keyval("socket,id=m", Some("backend")).unwrap(),
            json!({"backend": "socket", "id": "m"})
        );
    }

    #[test]
    fn qsd_command_line_parses() {
        let opts = parse_args(&args(&[
            "--blockdev",
            "driver=file,node-name=f0,filename=/x,read-only=on",
            "--blockdev",
            r#"{"driver":"raw","node-name":"r0","file":"f0"}"#,
            "--nbd-server",
            "addr.type=unix,addr.path=/n.sock,max-connections=4",
            "--export",
            "type=nbd,id=e0,node-name=r0,writable=on,bitmaps.0=b0",
            "--chardev",
            "socket,id=m,path=/q.sock,server=on,wait=off",
            "--monitor",
            "chardev=m",
        ]))
        .unwrap();
        let opts: Vec<Opt> = opts.into_iter().map(|a| a.opt).collect();
        assert_eq!(opts.len(), 5);
        assert_eq!(
            opts[0],
            Opt::Blockdev(
                json!({"driver": "file", "node-name": "f0", "filename": "/x",
                                 "read-only": true})
            )
        );
        assert_eq!(
            opts[2],
            Opt::NbdServer(json!({"addr": {"type": "unix", "path": "/n.sock"},
                                  "max-connections": 4}))
        );
        assert_eq!(opts[4], Opt::Monitor(PathBuf::from("/q.sock")));
    }

    #[test]
    fn bad_options_say_why() {
        let e = parse_args(&args(&["--blockdev", "driver=nope"])).unwrap_err();
        assert_eq!(
            e,
            "--blockdev driver=nope: Parameter 'driver' does not accept value 'nope'"
        );
        assert!(parse_args(&args(&["--monitor", "chardev=zz"])).is_err());
    }
}
