//! The monitor's own commands: versions, introspection, quit.

use serde_json::{json, Map, Value};

use crate::daemon::Daemon;
use crate::qmp::error::QmpResult;
use crate::qmp::schema::schema;

/// The qemu version tidemark's QMP interface matches; clients (libvirt,
/// qemu.qmp) gate features on it.
pub const QEMU_VERSION: (u32, u32, u32) = (10, 0, 2);

/// The version object of the greeting and of query-version.
pub fn version() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({
        "qemu": {"micro": micro, "minor": minor, "major": major},
        "package": format!("tidemark {}", env!("CARGO_PKG_VERSION")),
    })
}

pub fn query_version(_d: &Daemon, _args: Map<String, Value>) -> QmpResult<Value> {
    Ok(version())
}

pub fn query_commands(_d: &Daemon, _args: Map<String, Value>) -> QmpResult<Value> {
    Ok(schema().query_commands())
}

pub fn query_qmp_schema(_d: &Daemon, _args: Map<String, Value>) -> QmpResult<Value> {
    Ok(schema().introspect())
}

/// quit: the monitor connection asks the daemon to exit once this reply is
/// written (see qmp::server), so the client always gets it. Like qsd, no
/// SHUTDOWN event.
pub fn quit(_d: &Daemon, _args: Map<String, Value>) -> QmpResult<Value> {
    Ok(json!({}))
}
