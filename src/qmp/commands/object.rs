//! object-add and object-del (see crate::object).

use serde_json::{json, Map, Value};

use crate::daemon::Daemon;
use crate::qmp::error::QmpResult;

pub fn object_add(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    d.objects.add(&args)?;
    Ok(json!({}))
}

pub fn object_del(d: &Daemon, args: Map<String, Value>) -> QmpResult<Value> {
    d.objects
        .del(args.get("id").and_then(Value::as_str).unwrap_or_default())?;
    Ok(json!({}))
}
