//! NBD exports over QMP: nbd-server-start/-stop, block-export-add/-del,
//! query-block-exports, and the older nbd-server-add/-remove that libvirt
//! still sends (the same rules, by another name).

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::bitmap::{self, Source};
use crate::bitmap::set::SharedBitmap;
use crate::block::BlockNode;
use crate::daemon::Daemon;
use crate::nbd::bitmaps::bitmap_contexts;
use crate::nbd::export::{Export, ExportConfig};
use crate::nbd::server::Address;
use crate::nbd::tls::TlsServer;
use crate::qmp::error::{QmpError, QmpResult};

/// qemu's limit on NBD export names (NBD_MAX_STRING_SIZE).
const MAX_EXPORT_NAME: usize = 4096;

fn parse<T: for<'de> Deserialize<'de>>(v: Value) -> QmpResult<T> {
    serde_json::from_value(v).map_err(|e| QmpError::generic(format!("Invalid arguments: {e}")))
}

/// A socket address, legacy (`{"type":"unix","data":{...}}`, QMP) or flat
/// (`{"type":"unix","path":...}`, the command line).
pub fn address(addr: &Value) -> QmpResult<Address> {
    let kind = addr.get("type").and_then(Value::as_str).unwrap_or("");
    let data = addr.get("data").unwrap_or(addr);
    let field = |k: &str| data.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    match kind {
        "unix" => {
            if data.get("abstract").and_then(Value::as_bool) == Some(true) {
                return Err(QmpError::generic(
                    "Abstract unix sockets are not supported by tidemark",
                ));
            }
            Ok(Address::Unix(PathBuf::from(field("path"))))
        }
        "inet" => {
            let host = field("host");
            let host = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]")
            } else {
                host
            };
            Ok(Address::Tcp(format!("{host}:{}", field("port"))))
        }
        other => Err(QmpError::generic(format!(
            "Parameter 'type' does not accept value '{other}'"
        ))),
    }
}

/// qemu's default for nbd-server-start and `--nbd-server` (since 9.1):
/// it bounds what idle clients can hold.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100;

/// `max-connections` of a server's arguments: `None` is no limit (0).
pub fn max_connections(args: &Map<String, Value>) -> Option<usize> {
    match args.get("max-connections").and_then(Value::as_u64) {
        None => Some(DEFAULT_MAX_CONNECTIONS),
        Some(0) => None,
        Some(n) => Some(n as usize),
    }
}

/// Starts the NBD server from nbd-server-start's arguments, or the
/// command line's NbdServerOptions (`serve` builds the same): the address,
/// `max-connections`, and TLS by object id. With `accept` false the server
/// is bound but waits for [`Daemon::accept_nbd`].
pub async fn start_server(d: &Daemon, args: &Map<String, Value>, accept: bool) -> QmpResult<()> {
    let addr = address(args.get("addr").unwrap_or(&Value::Null))?;
    let tls = tls_server(d, args)?;
    d.start_nbd(&[addr], max_connections(args), accept, tls)
        .await
}

/// A server's TLS from its `tls-creds` and `tls-authz` object ids. As in
/// qemu, tls-authz means nothing without tls-creds, and the authorization
/// object is looked up only when a client has come through TLS.
pub fn tls_server(d: &Daemon, args: &Map<String, Value>) -> QmpResult<Option<TlsServer>> {
    let id = |k: &str| args.get(k).and_then(Value::as_str);
    let Some(creds) = id("tls-creds") else {
        return Ok(None);
    };
    Ok(Some(TlsServer {
        creds: d.objects.server_creds(creds)?,
        authz: id("tls-authz").map(|a| d.authorizer(a)),
    }))
}

pub async fn nbd_server_start(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    start_server(d, &args, true).await?;
    Ok(json!({}))
}

pub async fn nbd_server_stop(d: &Daemon, _args: Map<String, Value>) -> QmpResult<Value> {
    d.stop_nbd().await?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct ExportArgs {
    id: String,
    node_name: String,
    writable: Option<bool>,
    iothread: Option<String>,
    name: Option<String>,
    description: Option<String>,
    bitmaps: Option<Vec<Source>>,
    allocation_depth: Option<bool>,
}

pub fn block_export_add(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    add(d, parse(Value::Object(args))?)?;
    Ok(json!({}))
}

/// The rules of qemu's blk_exp_add and nbd_export_create, in their order.
fn add(d: &Daemon, a: ExportArgs) -> QmpResult<()> {
    if d.export_id_taken(&a.id) {
        return Err(QmpError::generic(format!(
            "Block export id '{}' is already in use",
            a.id
        )));
    }
    let node = d.find_node(&a.node_name).ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='' nor node-name='{}'",
            a.node_name
        ))
    })?;
    let writable = a.writable.unwrap_or(false);
    if writable && node.read_only() {
        return Err(QmpError::generic(
            "Cannot export read-only node as writable",
        ));
    }
    if let Some(t) = &a.iothread {
        return Err(QmpError::generic(format!("iothread \"{t}\" not found")));
    }
    let max_connections = d.nbd_max_connections()?;
    let name = a.name.unwrap_or_else(|| a.node_name.clone());
    if name.len() > MAX_EXPORT_NAME {
        return Err(QmpError::generic(format!("export name '{name}' too long")));
    }
    if a.description
        .as_ref()
        .is_some_and(|s| s.len() > MAX_EXPORT_NAME)
    {
        return Err(QmpError::generic(format!(
            "description '{}' too long",
            a.description.unwrap_or_default()
        )));
    }
    if d.nbd_name_taken(&name) {
        return Err(QmpError::generic(format!(
            "NBD server already has export named '{name}'"
        )));
    }
    if let Some(cbw) = d.cbw_above(&node).filter(|_| writable) {
        return Err(QmpError::generic(format!(
            "Permission conflict on node '{n}': permissions 'write' are both required by an unnamed block device (uses node '{n}' as 'root' child) and unshared by node '{cbw}' (uses node '{n}' as 'file' child).",
            n = node.name()
        )));
    }
    // A bitmap found by name must be frozen under a read-only view of a
    // writable node; one named with its node is taken as it is (qemu).
    let frozen = !writable && !node.read_only();
    let bitmaps: Vec<_> = find_bitmaps(d, &node, a.bitmaps.unwrap_or_default())?
        .into_iter()
        .map(|(b, by_name)| (b, by_name && frozen))
        .collect();
    let contexts = bitmap_contexts(&bitmaps)?;
    let root = d.new_root(node, writable);
    let export = Export::new(
        root,
        ExportConfig {
            name,
            description: a.description,
            read_only: !writable,
            multi_conn: max_connections != Some(1),
            allocation_depth: a.allocation_depth.unwrap_or(false),
            bitmap_contexts: contexts,
        },
    );
    d.insert_export(&a.id, export)
}

/// The exported bitmaps: a name is looked up on the node, then down its
/// chain (as qemu's exports do); `{node, name}` names another node's. With
/// each, whether it was found by name.
fn find_bitmaps(
    d: &Daemon,
    node: &Arc<crate::block::node::Node>,
    sources: Vec<Source>,
) -> QmpResult<Vec<(SharedBitmap, bool)>> {
    sources
        .iter()
        .map(|s| match s {
            Source::Local(name) => node
                .find_bitmap(name)
                .map(|b| (b, true))
                .ok_or_else(|| QmpError::generic(format!("Bitmap '{name}' is not found"))),
            Source::External(r) => Ok((bitmap::lookup(d, &r.node, &r.name)?.1, false)),
        })
        .collect()
}

pub fn block_export_del(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let id = args.get("id").and_then(Value::as_str).unwrap_or("");
    let hard = args.get("mode").and_then(Value::as_str) == Some("hard");
    d.delete_export(id, false, hard)?;
    Ok(json!({}))
}

pub fn query_block_exports(d: &Daemon, _args: Map<String, Value>) -> QmpResult<Value> {
    let list: Vec<Value> = d
        .export_list()
        .into_iter()
        .map(|(id, node)| json!({"node-name": node, "shutting-down": false, "type": "nbd", "id": id}))
        .collect();
    Ok(Value::Array(list))
}

/// nbd-server-add: block-export-add with the export name as its id.
pub fn nbd_server_add(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    d.nbd_max_connections()?;
    let device = args
        .get("device")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let name = args
        .get("name")
        .and_then(Value::as_str)
        .map_or_else(|| device.clone(), str::to_owned);
    let str_arg = |k: &str| args.get(k).and_then(Value::as_str).map(str::to_owned);
    // The legacy command looked the device up by either name.
    d.node(&device)?;
    add(
        d,
        ExportArgs {
            id: name.clone(),
            node_name: device,
            writable: args.get("writable").and_then(Value::as_bool),
            iothread: None,
            name: Some(name),
            description: str_arg("description"),
            bitmaps: str_arg("bitmap").map(|b| vec![Source::Local(b)]),
            allocation_depth: None,
        },
    )?;
    Ok(json!({}))
}

pub fn nbd_server_remove(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    let name = args.get("name").and_then(Value::as_str).unwrap_or("");
    let hard = args.get("mode").and_then(Value::as_str) == Some("hard");
    d.delete_export(name, true, hard)?;
    Ok(json!({}))
}
