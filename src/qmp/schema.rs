//! proto/qmp-schema.json, loaded once: the one home of the interface.
//! Argument checking (with qemu's error texts), the command-line keyval
//! typing, `query-commands` and `query-qmp-schema` all read it.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde_json::{json, Map, Value};

use super::error::{QmpError, QmpResult};

const SCHEMA_TEXT: &str = include_str!("../../proto/qmp-schema.json");

/// A type expression: a name, an inline object (`{"m": "T"}`) or a list
/// (`["T"]`).
type TypeExpr = Value;

pub struct Command {
    pub name: String,
    /// `None`: the command takes no arguments.
    pub data: Option<TypeExpr>,
    pub returns: Option<TypeExpr>,
}

pub struct Schema {
    entries: Vec<Value>,
    types: BTreeMap<String, Value>,
    commands: Vec<Command>,
}

/// The schema; a broken proto/qmp-schema.json is a build defect caught by
/// the unit tests, so loading it cannot fail at run time in a tested build.
pub fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| Schema::parse(SCHEMA_TEXT).unwrap_or_else(|e| panic!("{e}")))
}

const BUILTINS: [(&str, &str); 7] = [
    ("str", "string"),
    ("bool", "boolean"),
    ("int", "int"),
    ("uint32", "int"),
    ("uint64", "int"),
    ("null", "null"),
    ("any", "value"),
];

/// Where a value sits in the arguments, for qemu's error texts; `keyval`
/// when they came from a command line (qemu's keyval visitor names list
/// elements `a.0.b`, not `a[0].b`, and parses scalars from strings).
#[derive(Clone, Default)]
struct Path {
    segs: Vec<Seg>,
    keyval: bool,
}

#[derive(Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

impl Path {
    fn key(&self, k: &str) -> Path {
        let mut p = self.clone();
        p.segs.push(Seg::Key(k.to_owned()));
        p
    }

    fn index(&self, i: usize) -> Path {
        let mut p = self.clone();
        p.segs.push(Seg::Index(i));
        p
    }

    /// `a.b[0].c`, as qemu's full_name().
    fn full(&self) -> String {
        let mut s = String::new();
        for seg in &self.segs {
            match seg {
                Seg::Key(k) => {
                    if !s.is_empty() {
                        s.push('.');
                    }
                    s.push_str(k);
                }
                Seg::Index(i) if self.keyval => s.push_str(&format!(".{i}")),
                Seg::Index(i) => s.push_str(&format!("[{i}]")),
            }
        }
        s
    }

    /// The bare member name, or "null" for a list element: qemu's enum and
    /// alternate visitors report that rather than the full path.
    fn bare(&self) -> String {
        match self.segs.last() {
            Some(Seg::Key(k)) => k.clone(),
            _ => "null".to_owned(),
        }
    }
}

fn invalid_type(path: &Path, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{}', expected: {expected}",
        path.full()
    ))
}

/// A scalar of the wrong type: a keyval string that did not parse says
/// what it should have been, as qemu's keyval visitor does.
fn bad_scalar(path: &Path, v: &Value, expected: &str, keyval_expects: &str) -> QmpError {
    if path.keyval && v.is_string() {
        return QmpError::generic(format!(
            "Parameter '{}' expects {keyval_expects}",
            path.full()
        ));
    }
    invalid_type(path, expected)
}

impl Schema {
    fn parse(text: &str) -> Result<Schema, String> {
        let entries: Vec<Value> =
            serde_json::from_str(text).map_err(|e| format!("proto/qmp-schema.json: {e}"))?;
        let mut types = BTreeMap::new();
        let mut commands = Vec::new();
        for e in &entries {
            for kind in ["struct", "enum", "alternate", "union"] {
                if let Some(name) = e.get(kind).and_then(Value::as_str) {
                    types.insert(name.to_owned(), e.clone());
                }
            }
            if let Some(name) = e.get("command").and_then(Value::as_str) {
                commands.push(Command {
                    name: name.to_owned(),
                    data: e.get("data").cloned(),
                    returns: e.get("returns").cloned(),
                });
            }
        }
        let schema = Schema {
            entries,
            types,
            commands,
        };
        schema.check_references()?;
        Ok(schema)
    }

    /// Every type a command or type mentions must exist.
    fn check_references(&self) -> Result<(), String> {
        fn walk(s: &Schema, t: &Value) -> Result<(), String> {
            match t {
                Value::String(n) => {
                    if BUILTINS.iter().any(|(b, _)| b == n) || s.types.contains_key(n) {
                        Ok(())
                    } else {
                        Err(format!("proto/qmp-schema.json: unknown type {n}"))
                    }
                }
                Value::Array(a) => a.iter().try_for_each(|t| walk(s, t)),
                Value::Object(m) => m.values().try_for_each(|t| walk(s, t)),
                _ => Err(format!("proto/qmp-schema.json: bad type {t}")),
            }
        }
        for c in &self.commands {
            for t in c.data.iter().chain(c.returns.iter()) {
                walk(self, t)?;
            }
        }
        for t in self.types.values() {
            if t.get("enum").is_some() {
                continue;
            }
            for key in ["data", "base"] {
                if let Some(d) = t.get(key) {
                    walk(self, d)?;
                }
            }
        }
        Ok(())
    }

    pub fn command(&self, name: &str) -> Option<&Command> {
        self.commands.iter().find(|c| c.name == name)
    }

    pub fn commands(&self) -> impl Iterator<Item = &Command> {
        self.commands.iter()
    }

    /// Checks a command's arguments as qemu's input visitor does.
    pub fn check_args(&self, cmd: &Command, args: &Map<String, Value>) -> QmpResult<()> {
        match &cmd.data {
            None => match args.keys().next() {
                Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
                None => Ok(()),
            },
            Some(t) => self.check_object(args, t, &Path::default()),
        }
    }

    /// Checks a value against a named type (command-line options).
    pub fn check_type(&self, v: &Value, type_name: &str) -> QmpResult<()> {
        self.check(v, &Value::String(type_name.to_owned()), &Path::default())
    }

    /// [`Schema::check_type`] for a value parsed from keyval (and coerced
    /// with [`Schema::coerce_keyval`]): qemu's keyval texts.
    pub fn check_keyval(&self, v: &Value, type_name: &str) -> QmpResult<()> {
        let path = Path {
            segs: Vec::new(),
            keyval: true,
        };
        self.check(v, &Value::String(type_name.to_owned()), &path)
    }

    fn check(&self, v: &Value, t: &TypeExpr, path: &Path) -> QmpResult<()> {
        match t {
            Value::Array(elem) => {
                let elem = elem.first().unwrap_or(&Value::Null);
                let Value::Array(items) = v else {
                    return Err(invalid_type(path, "array"));
                };
                for (i, item) in items.iter().enumerate() {
                    self.check(item, elem, &path.index(i))?;
                }
                Ok(())
            }
            Value::Object(_) => match v {
                Value::Object(m) => self.check_object(m, t, path),
                _ => Err(invalid_type(path, "object")),
            },
            Value::String(name) => self.check_named(v, name, path),
            _ => Ok(()),
        }
    }

    fn check_named(&self, v: &Value, name: &str, path: &Path) -> QmpResult<()> {
        match name {
            "str" => v
                .is_string()
                .then_some(())
                .ok_or_else(|| invalid_type(path, "string")),
            "bool" => v
                .is_boolean()
                .then_some(())
                .ok_or_else(|| bad_scalar(path, v, "boolean", "'on' or 'off'")),
            "int" => (v.is_i64() || v.is_u64())
                .then_some(())
                .ok_or_else(|| bad_scalar(path, v, "integer", "int64")),
            "uint64" | "uint32" => {
                let n = v.as_u64().or_else(|| v.as_i64().map(|i| i as u64));
                let Some(n) = n else {
                    return Err(QmpError::generic(format!(
                        "Parameter '{}' expects uint64",
                        path.full()
                    )));
                };
                if name == "uint32" && n > u64::from(u32::MAX) {
                    return Err(QmpError::generic(format!(
                        "Parameter '{}' expects uint32_t",
                        path.full()
                    )));
                }
                Ok(())
            }
            "any" => Ok(()),
            "null" => v
                .is_null()
                .then_some(())
                .ok_or_else(|| invalid_type(path, "null")),
            _ => {
                let Some(def) = self.types.get(name) else {
                    return Ok(());
                };
                if let Some(values) = def.get("enum").and(def.get("data")) {
                    let Some(s) = v.as_str() else {
                        return Err(invalid_type(path, "string"));
                    };
                    if values.as_array().is_some_and(|a| a.iter().any(|x| x == s)) {
                        return Ok(());
                    }
                    return Err(QmpError::generic(format!(
                        "Parameter '{}' does not accept value '{s}'",
                        path.bare()
                    )));
                }
                if def.get("alternate").is_some() {
                    return self.check_alternate(v, name, def, path);
                }
                match v {
                    Value::Object(m) => self.check_object(m, &Value::String(name.into()), path),
                    _ => Err(invalid_type(path, "object")),
                }
            }
        }
    }

    /// An alternate picks its branch by the JSON type of the value.
    fn check_alternate(&self, v: &Value, name: &str, def: &Value, path: &Path) -> QmpResult<()> {
        let branches = def.get("data").and_then(Value::as_object);
        for t in branches.into_iter().flat_map(|b| b.values()) {
            let fits = match t.as_str() {
                Some("str") => v.is_string(),
                Some("bool") => v.is_boolean(),
                Some("int" | "uint32" | "uint64") => v.is_number(),
                Some("null") => v.is_null(),
                Some(_) => v.is_object(),
                None => false,
            };
            if fits {
                return self.check(v, t, path);
            }
        }
        Err(QmpError::generic(format!(
            "Invalid parameter type for '{}', expected: {name}",
            path.bare()
        )))
    }

    /// The members of an object type, flattened: (name, optional, type).
    /// For a union the variant's members are included, chosen by the
    /// discriminator's value in `v`.
    fn members(&self, t: &TypeExpr, v: &Map<String, Value>) -> Vec<(String, bool, TypeExpr)> {
        let mut out = Vec::new();
        let push_dict = |d: &Value, out: &mut Vec<(String, bool, TypeExpr)>| {
            if let Some(m) = d.as_object() {
                for (k, ty) in m {
                    let (name, opt) = match k.strip_prefix('*') {
                        Some(n) => (n.to_owned(), true),
                        None => (k.clone(), false),
                    };
                    out.push((name, opt, ty.clone()));
                }
            }
        };
        match t {
            Value::Object(_) => push_dict(t, &mut out),
            Value::String(name) => {
                let Some(def) = self.types.get(name) else {
                    return out;
                };
                if def.get("union").is_some() {
                    if let Some(base) = def.get("base") {
                        match base {
                            Value::String(_) => out.extend(self.members(base, v)),
                            _ => push_dict(base, &mut out),
                        }
                    }
                    let tag = def.get("discriminator").and_then(Value::as_str);
                    let chosen = tag.and_then(|t| v.get(t)).and_then(Value::as_str);
                    if let Some(variant) = chosen.and_then(|c| def.get("data")?.get(c)) {
                        out.extend(self.members(variant, v));
                    }
                } else if let Some(d) = def.get("data") {
                    match d {
                        Value::String(_) => out.extend(self.members(d, v)),
                        _ => push_dict(d, &mut out),
                    }
                }
            }
            _ => {}
        }
        out
    }

    fn check_object(&self, v: &Map<String, Value>, t: &TypeExpr, path: &Path) -> QmpResult<()> {
        let members = self.members(t, v);
        for (name, optional, ty) in &members {
            match v.get(name) {
                None if !optional => {
                    return Err(QmpError::generic(format!(
                        "Parameter '{}' is missing",
                        path.key(name).full()
                    )))
                }
                None => {}
                Some(x) => self.check(x, ty, &path.key(name))?,
            }
        }
        if let Some(k) = v.keys().find(|k| !members.iter().any(|(n, ..)| n == *k)) {
            return Err(QmpError::generic(format!(
                "Parameter '{}' is unexpected",
                path.key(k).full()
            )));
        }
        Ok(())
    }

    /// Turns the strings of a command-line keyval option into the JSON
    /// types the schema asks for ("on" → true, "4096" → 4096), as qemu's
    /// keyval input visitor does. Anything it cannot convert is left as
    /// is, so the argument check then reports it in qemu's words.
    pub fn coerce_keyval(&self, v: &mut Value, type_name: &str) {
        self.coerce(v, &Value::String(type_name.to_owned()));
    }

    fn coerce(&self, v: &mut Value, t: &TypeExpr) {
        match (t, &mut *v) {
            (Value::Array(elem), Value::Array(items)) => {
                if let Some(elem) = elem.first() {
                    for item in items {
                        self.coerce(item, elem);
                    }
                }
            }
            (Value::String(name), Value::String(s)) => {
                let converted = match name.as_str() {
                    "bool" => match s.as_str() {
                        "on" | "yes" | "true" | "y" => Some(Value::Bool(true)),
                        "off" | "no" | "false" | "n" => Some(Value::Bool(false)),
                        _ => None,
                    },
                    "int" => s.parse::<i64>().ok().map(Value::from),
                    "uint32" | "uint64" => s.parse::<u64>().ok().map(Value::from),
                    _ => None,
                };
                if let Some(c) = converted {
                    *v = c;
                }
            }
            (_, Value::Object(m)) => {
                let snapshot = m.clone();
                let members = match t {
                    Value::String(name) => match self.types.get(name) {
                        Some(def) if def.get("alternate").is_some() => {
                            // An object picks the alternate's object branch.
                            let branch = def
                                .get("data")
                                .and_then(Value::as_object)
                                .and_then(|b| b.values().find(|x| !is_scalar_type(x)).cloned());
                            if let Some(b) = branch {
                                self.coerce(v, &b);
                            }
                            return;
                        }
                        _ => self.members(t, &snapshot),
                    },
                    _ => self.members(t, &snapshot),
                };
                for (name, _, ty) in members {
                    if let Some(x) = m.get_mut(&name) {
                        self.coerce(x, &ty);
                    }
                }
            }
            _ => {}
        }
    }

    /// query-commands: every command, in schema order.
    pub fn query_commands(&self) -> Value {
        Value::Array(
            self.commands
                .iter()
                .map(|c| json!({ "name": c.name }))
                .collect(),
        )
    }

    /// query-qmp-schema: qemu's SchemaInfo list. Type names are the
    /// schema's own (qemu masks them as numbers; clients must not rely on
    /// either); inline objects get qemu-style internal names.
    pub fn introspect(&self) -> Value {
        let mut x = Introspector {
            schema: self,
            out: Vec::new(),
            arrays: BTreeMap::new(),
        };
        for c in &self.commands {
            let arg = match &c.data {
                Some(t) => x.name_of(t, &format!("q_obj_{}-arg", c.name)),
                None => "q_empty".to_owned(),
            };
            let ret = match &c.returns {
                Some(t) => x.name_of(t, &format!("q_obj_{}-ret", c.name)),
                None => "q_empty".to_owned(),
            };
            x.out.push(json!({"name": c.name, "meta-type": "command",
                              "arg-type": arg, "ret-type": ret}));
        }
        for e in &self.entries {
            if let Some(name) = e.get("event").and_then(Value::as_str) {
                let arg = match e.get("data") {
                    Some(t) => x.name_of(t, &format!("q_obj_{name}-arg")),
                    None => "q_empty".to_owned(),
                };
                x.out
                    .push(json!({"name": name, "meta-type": "event", "arg-type": arg}));
            }
        }
        x.out
            .push(json!({"name": "q_empty", "meta-type": "object", "members": []}));
        for (name, json_type) in BUILTINS {
            x.out
                .push(json!({"name": name, "meta-type": "builtin", "json-type": json_type}));
        }
        for (name, def) in &self.types {
            let info = x.type_info(name, def);
            x.out.push(info);
        }
        Value::Array(x.out)
    }
}

/// Builds query-qmp-schema's list, naming inline and list types once.
struct Introspector<'a> {
    schema: &'a Schema,
    out: Vec<Value>,
    arrays: BTreeMap<String, ()>,
}

impl Introspector<'_> {
    fn name_of(&mut self, t: &Value, owner: &str) -> String {
        match t {
            Value::String(n) => n.clone(),
            Value::Array(a) => {
                let elem = match a.first() {
                    Some(e) => self.name_of(e, owner),
                    None => "any".to_owned(),
                };
                let name = format!("[{elem}]");
                if self.arrays.insert(name.clone(), ()).is_none() {
                    self.out
                        .push(json!({"name": name, "meta-type": "array", "element-type": elem}));
                }
                name
            }
            Value::Object(_) => {
                let members = self.members(t, owner);
                self.out
                    .push(json!({"name": owner, "meta-type": "object", "members": members}));
                owner.to_owned()
            }
            _ => "any".to_owned(),
        }
    }

    fn members(&mut self, dict: &Value, owner: &str) -> Vec<Value> {
        let mut v = Vec::new();
        if let Value::String(n) = dict {
            // A base given by name: its members are inlined, as qemu does.
            if let Some(d) = self
                .schema
                .types
                .get(n)
                .and_then(|d| d.get("data"))
                .cloned()
            {
                return self.members(&d, owner);
            }
            return v;
        }
        for (k, t) in dict.as_object().into_iter().flatten() {
            let (name, opt) = match k.strip_prefix('*') {
                Some(n) => (n, true),
                None => (k.as_str(), false),
            };
            let tn = self.name_of(t, &format!("{owner}-{name}"));
            let mut m = json!({"name": name, "type": tn});
            if opt {
                m["default"] = Value::Null;
            }
            v.push(m);
        }
        v
    }

    fn type_info(&mut self, name: &str, def: &Value) -> Value {
        if def.get("enum").is_some() {
            let values = def.get("data").cloned().unwrap_or(json!([]));
            let members: Vec<Value> = values
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| json!({ "name": v }))
                .collect();
            return json!({"name": name, "meta-type": "enum", "members": members, "values": values});
        }
        let data = def.get("data").cloned().unwrap_or(json!({}));
        if def.get("alternate").is_some() {
            let mut members = Vec::new();
            for t in data.as_object().into_iter().flatten().map(|(_, t)| t) {
                members.push(json!({ "type": self.name_of(t, name) }));
            }
            return json!({"name": name, "meta-type": "alternate", "members": members});
        }
        if def.get("union").is_some() {
            let base = def.get("base").cloned().unwrap_or(json!({}));
            let members = self.members(&base, name);
            let mut variants = Vec::new();
            for (case, t) in data.as_object().into_iter().flatten() {
                variants.push(json!({"case": case, "type": self.name_of(t, name)}));
            }
            return json!({"name": name, "meta-type": "object", "members": members,
                          "tag": def.get("discriminator"), "variants": variants});
        }
        let members = self.members(&data, name);
        json!({"name": name, "meta-type": "object", "members": members})
    }
}

fn is_scalar_type(t: &Value) -> bool {
    matches!(
        t.as_str(),
        Some("str" | "bool" | "int" | "uint32" | "uint64")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(cmd: &str, args: Value) -> Result<(), String> {
        let s = schema();
        let c = s.command(cmd).expect("command");
        let Value::Object(m) = args else { panic!() };
        s.check_args(c, &m).map_err(|e| e.desc)
    }

    #[test]
    fn schema_loads_and_lists_commands() {
        assert!(schema().command("block-dirty-bitmap-add").is_some());
        assert!(schema()
            .introspect()
            .as_array()
            .is_some_and(|a| a.len() > 30));
    }

    #[test]
    fn argument_errors_use_qemu_texts() {
        assert_eq!(
            check("block-dirty-bitmap-add", json!({"node": "f0"})),
            Err("Parameter 'name' is missing".into())
        );
        assert_eq!(
            check("block-dirty-bitmap-add", json!({"node": 1, "name": "b"})),
            Err("Invalid parameter type for 'node', expected: string".into())
        );
        assert_eq!(
            check(
                "block-dirty-bitmap-add",
                json!({"node": "a", "name": "b", "granularity": -1})
            ),
            Err("Parameter 'granularity' expects uint32_t".into())
        );
        assert_eq!(
            check(
                "block-dirty-bitmap-merge",
                json!({"node": "a", "target": "b", "bitmaps": [1]})
            ),
            Err("Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr".into())
        );
        assert_eq!(
            check(
                "block-dirty-bitmap-merge",
                json!({"node": "a", "target": "b", "bitmaps": [{"node": "f0"}]})
            ),
            Err("Parameter 'bitmaps[0].name' is missing".into())
        );
        assert_eq!(
            check(
                "transaction",
                json!({"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "f0"}}]})
            ),
            Err("Parameter 'actions[0].data.name' is missing".into())
        );
        assert_eq!(
            check("blockdev-add", json!({"driver": "nope"})),
            Err("Parameter 'driver' does not accept value 'nope'".into())
        );
        assert_eq!(
            check(
                "nbd-server-start",
                json!({"addr": {"type": "unix", "path": "/x"}})
            ),
            Err("Parameter 'addr.data' is missing".into())
        );
    }

    #[test]
    fn keyval_strings_become_typed() {
        let mut v = json!({"driver": "file", "filename": "x", "read-only": "on"});
        schema().coerce_keyval(&mut v, "BlockdevOptions");
        assert_eq!(v["read-only"], json!(true));
        let mut v = json!({"type": "nbd", "id": "e", "node-name": "n", "writable": "on",
                           "bitmaps": ["b0"]});
        schema().coerce_keyval(&mut v, "BlockExportOptions");
        assert_eq!(v["writable"], json!(true));
        assert!(schema().check_type(&v, "BlockExportOptions").is_ok());
    }
}
