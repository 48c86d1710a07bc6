//! A scenario runner for conformance suites that compare `tidemark daemon`
//! with qemu-storage-daemon 10.0.2 step by step, with steps for jobs: the
//! events of each job are kept apart and recorded per job, so two jobs that
//! interleave differently from run to run still give the same transcript.
//!
//! A scenario file (tests/qmp_scenarios/NAME.json):
//! ```json
//! {"doc": "what the scenario is about",
//!  "tls": true,   // tests/tls/gen-certs.sh makes $DIR/tls (server, client, rogue, psk, psk-wrong) first
//!  "setup": [["qemu-img", "create", "-q", "-f", "qcow2", "d.qcow2", "4M"]], // run in $DIR first
//!  "args": ["--nbd-server", "addr.type=unix,addr.path=$DIR/nbd.sock"],
//!  "steps": [
//!    {"qmp": {"execute": "blockdev-backup", "arguments": {...}},     // reply recorded
//!     "expect": {"return": {}}},
//!    {"nodes": ["node-name", "drv", "image.virtual-size"],
//!     "capture": {"CBW": {"drv": "copy-before-write"}}},
//!        // every node (flat query-named-block-nodes), only these fields;
//!        // ${CBW} becomes the node-name of the first node with the fields of
//!        // the pattern (auto names are not known in advance). A "qmp" step
//!        // captures the same way from its reply's "return" list.
//!    {"job_events": "j0", "until": "null"},
//!        // waits (with a deadline) for the job's JOB_STATUS_CHANGE to "null", and
//!        // records the job's events not recorded before, up to and including
//!        // that one, without timestamps. "until" is a status or an event name
//!        // ("BLOCK_JOB_ERROR"); "count": N waits for the Nth such event. A job's
//!        // events are those whose data names it ("id" or "device").
//!        // Drains are left out: qsd pauses and resumes every running job
//!        // whenever the graph changes (another job ending, blockdev-add, a
//!        // transaction, even a failing one), so a "paused" directly followed
//!        // by "running" is not recorded, except the pair right after
//!        // "created", "running" that every job started by a transaction has
//!        // (recorded, but "until": "paused" never means its pause; a
//!        // job that no transaction started has no such pair, and a
//!        // "paused" right after its "running" that nothing follows yet
//!        // is a pause, which query-jobs confirms).
//!    {"event": "BLOCK_EXPORT_DELETED"},  // the next such event (not a job's)
//!    {"bitmaps": "drive0"},            // the node's dirty-bitmaps (query-named-block-nodes)
//!    {"run": ["qemu-img", "compare", "a.qcow2", "b.raw"]},
//!        // exit status, stdout and stderr recorded (qemu-io's timing lines
//!        // dropped); "json": true records stdout parsed as JSON, "keep":
//!        // [keys] keeps only those keys of that object, "drop": [keys] removes
//!        // those keys at any depth (host offsets in `qemu-img map`), and
//!        // "coalesce": true merges adjacent extents ({"start", "length", ...})
//!        // that are alike once dropped keys are gone; "stderr": false leaves
//!        // stderr out (a TLS client's account of a refused handshake depends
//!        // on how the server's TLS library ends it)
//!    {"start": ["--object", "secret,id=s0"]},
//!        // another daemon of the kind under test with these arguments (and a
//!        // pidfile, no monitor): records its exit status and stderr (the
//!        // program name that starts a line normalised to "DAEMON: "), or
//!        // {"started": true} once the pidfile appears (then it is killed)
//!  ]}
//! ```
//! After the last step the runner records `query-jobs` and the job events
//! that no step recorded (for a scenario whose jobs all reached "null",
//! none).
//!
//! `expect` is part of what qsd's normalised record must contain (objects:
//! these keys, recursively; arrays: this length, element by element): it
//! pins a scenario to qsd's behaviour, so a scenario that no longer shows
//! what it is about fails on qsd alone.
//!
//! Environment (NAME is the suite's prefix, e.g. `JOB_CONFORMANCE`):
//! `NAME_ONLY=qsd` runs only the qsd side (to check scenarios);
//! `NAME_ONLY=qsd-twice` compares qsd with itself (to check that
//! transcripts are deterministic); `NAME_DUMP=DIR` writes both transcripts
//! to DIR; `QMP_TRACE=1` prints each step.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::qmp_common::{normalise, DirWatch, Impl, Instance, Qmp};

/// Upper bound for one qemu-io / qemu-img run, so a hung export fails the
/// step instead of hanging the test.
const TOOL_TIMEOUT_SECS: &str = "30";

/// How long a `job_events` step waits for its event. Jobs in the scenarios
/// take milliseconds; the deadline only bounds a run that went wrong.
const EVENT_DEADLINE: Duration = Duration::from_secs(10);

/// The same, once the run under test has already differed from qsd: the
/// events qsd saw will most likely never come, and a run should fail fast.
const EVENT_DEADLINE_DIVERGED: Duration = Duration::from_secs(1);

/// The same, once an event has not come at all.
const EVENT_DEADLINE_MISSED: Duration = Duration::from_millis(100);

/// The read timeout the QMP client has outside event waits.
const REPLY_DEADLINE: Duration = Duration::from_secs(20);

/// The events that belong to a job, with the field that names it.
const JOB_EVENTS: &[(&str, &str)] = &[
    ("JOB_STATUS_CHANGE", "id"),
    ("BLOCK_JOB_PENDING", "id"),
    ("BLOCK_JOB_COMPLETED", "device"),
    ("BLOCK_JOB_CANCELLED", "device"),
    ("BLOCK_JOB_ERROR", "device"),
    ("BLOCK_JOB_READY", "device"),
];

/// A suite of scenarios (all in tests/qmp_scenarios), known by the prefix
/// of its environment variables.
pub struct Suite {
    pub env: &'static str,
}

impl Suite {
    fn var(&self, what: &str) -> Option<String> {
        std::env::var(format!("{}_{what}", self.env)).ok()
    }

    pub fn qsd_only(&self) -> bool {
        self.var("ONLY").as_deref() == Some("qsd")
    }

    /// The implementation compared with qsd: tidemark, or qsd itself with
    /// `NAME_ONLY=qsd-twice`.
    pub fn under_test(&self) -> Impl {
        match self.var("ONLY").as_deref() {
            Some("qsd-twice") => Impl::Qsd,
            _ => Impl::Tidemark,
        }
    }

    /// With `NAME_DUMP=DIR`, writes a transcript to DIR/SCENARIO.WHO.json.
    fn dump(&self, name: &str, who: &str, records: &[Value]) {
        if let Some(d) = self.var("DUMP") {
            let path = Path::new(&d).join(format!("{name}.{who}.json"));
            let text = serde_json::to_string_pretty(records).expect("json");
            std::fs::write(&path, text).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        }
    }

    /// Runs scenario `name` on qsd, then on the implementation under test,
    /// and fails with the differences.
    pub fn run(&self, name: &str) {
        let sc = load(name);
        let mut steps = sc["steps"].as_array().cloned().unwrap_or_default();
        let mut qsd = Vec::new();
        let done = catch_unwind(AssertUnwindSafe(|| {
            transcript(Impl::Qsd, name, &sc, None, &mut qsd)
        }));
        // Dumped also when the reference run stops half-way, to see why.
        self.dump(name, "qsd", &qsd);
        if let Err(e) = done {
            std::panic::resume_unwind(e);
        }
        assert_eq!(
            qsd.len(),
            steps.len() + 1,
            "{name}: qsd transcript incomplete"
        );
        if self.qsd_only() {
            return;
        }
        let mut tm = Vec::new();
        let kind = self.under_test();
        let done = catch_unwind(AssertUnwindSafe(|| {
            transcript(kind, name, &sc, Some(&qsd), &mut tm)
        }));
        let mut stopped = String::new();
        if let Err(e) = done {
            // The step that failed gets the harness's message as its record.
            let msg = panic_text(e.as_ref());
            stopped = format!("\nthe run stopped at step {}: {msg}", tm.len());
            tm.push(json!({ "harness error": msg }));
        }
        self.dump(name, "tidemark", &tm);
        steps.push(json!("(end: query-jobs and unrecorded job events)"));
        let diff = compare(&steps, &qsd, &tm);
        assert!(
            diff.is_empty(),
            "{name}: tidemark differs from qsd: {diff}{stopped}"
        );
    }
}

/// Declares a conformance suite: `SUITE` (its environment variables start
/// with `env`), one test per scenario, named after its file
/// (tests/qmp_scenarios/NAME.json), and the test `every_file`: each file
/// whose name starts with `files` is one of those scenarios.
///
/// ```ignore
/// scenario::conformance_suite! {
///     env: "LIVE_CONFORMANCE",
///     files: "live_",
///     every_file: every_live_scenario_file_runs,
///     scenarios: [live_snapshot, live_stream],
/// }
/// ```
macro_rules! conformance_suite {
    (
        env: $env:literal,
        files: $prefix:literal,
        every_file: $every:ident,
        scenarios: [$($name:ident),* $(,)?] $(,)?
    ) => {
        const SUITE: $crate::scenario::Suite = $crate::scenario::Suite { env: $env };

        $(
            #[test]
            fn $name() {
                SUITE.run(stringify!($name));
            }
        )*

        #[doc = concat!("Every tests/qmp_scenarios/", $prefix, "*.json is one of the tests above.")]
        #[test]
        fn $every() {
            $crate::scenario::assert_scenario_files($prefix, &[$(stringify!($name)),*]);
        }
    };
}
pub(crate) use conformance_suite;

/// The scenario files whose names start with `prefix` must be `listed`.
pub fn assert_scenario_files(prefix: &str, listed: &[&str]) {
    let mut files: Vec<String> = std::fs::read_dir(scenario_dir())
        .unwrap_or_else(|e| panic!("{:?}: {e}", scenario_dir()))
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| Some(n.strip_suffix(".json")?.to_owned()))
        .filter(|n| n.starts_with(prefix))
        .collect();
    files.sort();
    let mut listed: Vec<String> = listed.iter().map(|s| (*s).to_owned()).collect();
    listed.sort();
    assert_eq!(
        files, listed,
        "scenario files vs the conformance_suite! list"
    );
}

fn scenario_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qmp_scenarios")
}

pub fn load(name: &str) -> Value {
    let path = scenario_dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// Runs `argv` (in `dir`, with a timeout) and returns its record: exit
/// status, stdout and stderr lines, without qemu-io's timing lines.
pub fn run_tool(argv: &[String], dir: &Path, json_out: bool, filter: &Filter) -> Value {
    let out = Command::new("timeout")
        .arg(TOOL_TIMEOUT_SECS)
        .args(argv)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {argv:?}: {e}"));
    let lines = |b: &[u8]| -> Vec<String> {
        String::from_utf8_lossy(b)
            .lines()
            .filter(|l| !l.contains(" ops; "))
            .map(str::to_owned)
            .collect()
    };
    let status = out.status.code().unwrap_or(-1);
    if !filter.stderr {
        // Left out of the record; shown with QMP_TRACE.
        if std::env::var_os("QMP_TRACE").is_some() {
            eprintln!("{argv:?} stderr: {:?}", lines(&out.stderr));
        }
    }
    let stdout = if json_out && out.status.success() {
        match serde_json::from_slice::<Value>(&out.stdout) {
            Ok(v) => filter.apply(v),
            Err(e) => json!({"not JSON": e.to_string(), "text": lines(&out.stdout)}),
        }
    } else {
        json!(lines(&out.stdout))
    };
    let mut record = json!({"run": argv[0], "status": status, "stdout": stdout});
    if filter.stderr {
        record["stderr"] = json!(lines(&out.stderr));
    }
    record
}

/// What a `run` step keeps of a tool's output.
pub struct Filter {
    /// Whether stderr is recorded.
    pub stderr: bool,
    /// Only these keys of the top-level object (all if None).
    pub keep: Option<Vec<String>>,
    /// These keys removed at any depth.
    pub drop: Vec<String>,
    /// Adjacent extents that are alike merged (a top-level array).
    pub coalesce: bool,
}

impl Default for Filter {
    fn default() -> Filter {
        Filter {
            stderr: true,
            keep: None,
            drop: Vec::new(),
            coalesce: false,
        }
    }
}

impl Filter {
    fn from_step(step: &Value) -> Filter {
        let strings = |k: &str| -> Option<Vec<String>> {
            step.get(k).map(|v| {
                serde_json::from_value(v.clone())
                    .unwrap_or_else(|e| panic!("{k}: an array of strings: {e}"))
            })
        };
        Filter {
            stderr: step["stderr"].as_bool().unwrap_or(true),
            keep: strings("keep"),
            drop: strings("drop").unwrap_or_default(),
            coalesce: step["coalesce"].as_bool().unwrap_or(false),
        }
    }

    fn apply(&self, v: Value) -> Value {
        let v = match (v, &self.keep) {
            (Value::Object(m), Some(keep)) => Value::Object(
                m.into_iter()
                    .filter(|(k, _)| keep.iter().any(|x| x == k))
                    .collect(),
            ),
            (v, _) => v,
        };
        let v = self.strip(v);
        match v {
            Value::Array(a) if self.coalesce => Value::Array(coalesce(a)),
            v => v,
        }
    }

    fn strip(&self, v: Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.into_iter()
                    .filter(|(k, _)| !self.drop.iter().any(|x| x == k))
                    .map(|(k, x)| (k, self.strip(x)))
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.into_iter().map(|x| self.strip(x)).collect()),
            v => v,
        }
    }
}

/// Merges extents that continue each other and differ in nothing else
/// (`qemu-img map` splits where host offsets are not contiguous, and host
/// allocation is an implementation's own business).
fn coalesce(extents: Vec<Value>) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for e in extents {
        if let Some(last) = out.last_mut() {
            let end = last["start"].as_u64().zip(last["length"].as_u64());
            let alike = |a: &Value, b: &Value| {
                let rest = |v: &Value| {
                    let mut m = v.as_object().cloned().unwrap_or_default();
                    m.remove("start");
                    m.remove("length");
                    m
                };
                rest(a) == rest(b)
            };
            if let (Some((start, len)), Some(next)) = (end, e["start"].as_u64()) {
                if start + len == next && alike(last, &e) {
                    let grown = len + e["length"].as_u64().unwrap_or(0);
                    last["length"] = json!(grown);
                    continue;
                }
            }
        }
        out.push(e);
    }
    out
}

/// The TLS material tests/tls/gen-certs.sh makes, made once and kept in
/// the target directory (RSA key generation takes seconds on a busy
/// machine; each instance gets a copy). Named after the script's text, so
/// a changed script makes new material; made in a private directory and
/// renamed into place, so concurrent test processes do not see half of it.
fn tls_material() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls/gen-certs.sh");
        let text = std::fs::read(&script).unwrap_or_else(|e| panic!("{script:?}: {e}"));
        // FNV-1a: stable from run to run, unlike std's hasher.
        let hash = text.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let done = base.join(format!("tls-material-{hash:016x}"));
        if !done.exists() {
            let work = tempfile::Builder::new()
                .prefix("tls-material-")
                .tempdir_in(base)
                .expect("temp dir");
            let argv = [
                "sh".to_owned(),
                script.display().to_string(),
                "tls".to_owned(),
            ];
            let r = run_tool(&argv, work.path(), false, &Filter::default());
            assert_eq!(r["status"], 0, "{argv:?}: {r}");
            // Another process may have got there first: then its copy stays.
            let _ = std::fs::rename(work.path().join("tls"), &done);
        }
        done
    })
    .clone()
}

/// Runs the setup of a scenario in `dir`: with `"tls": true`, the TLS
/// material (tests/tls/gen-certs.sh's, copied to `dir`/tls), then the setup
/// commands. They must succeed.
fn setup(sc: &Value, dir: &Path) {
    if sc["tls"].as_bool().unwrap_or(false) {
        let argv = [
            "cp".to_owned(),
            "-a".to_owned(),
            tls_material().display().to_string(),
            "tls".to_owned(),
        ];
        let r = run_tool(&argv, dir, false, &Filter::default());
        assert_eq!(r["status"], 0, "{argv:?}: {r}");
    }
    let cmds: Vec<Vec<String>> = serde_json::from_value(sc["setup"].clone()).unwrap_or_default();
    for argv in cmds {
        let r = run_tool(&argv, dir, false, &Filter::default());
        assert_eq!(r["status"], 0, "setup {argv:?}: {r}");
    }
}

/// The node-name of the first element of `reply["return"]` that has all
/// the fields of `pattern`.
fn find_node(reply: &Value, pattern: &Value) -> Option<String> {
    reply["return"]
        .as_array()?
        .iter()
        .find(|n| contains(n, pattern))
        .and_then(|n| n["node-name"].as_str())
        .map(str::to_owned)
}

/// Sets the variables a step's "capture" names from `reply` (a list of
/// nodes under "return") and returns `record`, or says which failed.
fn capture(
    step: &Value,
    reply: &Value,
    vars: &mut BTreeMap<String, String>,
    record: Value,
) -> Value {
    let mut missing = Vec::new();
    if let Some(Value::Object(caps)) = step.get("capture") {
        for (var, pattern) in caps {
            match find_node(reply, pattern) {
                Some(n) => {
                    vars.insert(var.clone(), n);
                }
                None => {
                    vars.insert(var.clone(), format!("<no node for {var}>"));
                    missing.push(var.clone());
                }
            }
        }
    }
    if missing.is_empty() {
        record
    } else {
        json!({"record": record, "capture failed": missing})
    }
}

/// Whether `v` has everything `pattern` has (objects: a subset of keys,
/// recursively; arrays: same length, element by element; else equal).
pub fn contains(v: &Value, pattern: &Value) -> bool {
    match (v, pattern) {
        (Value::Object(a), Value::Object(p)) => p
            .iter()
            .all(|(k, x)| a.get(k).is_some_and(|y| contains(y, x))),
        (Value::Array(a), Value::Array(p)) => {
            a.len() == p.len() && a.iter().zip(p).all(|(y, x)| contains(y, x))
        }
        _ => v == pattern,
    }
}

/// The job an event belongs to, if it is a job event.
fn job_of(ev: &Value) -> Option<&str> {
    let name = ev["event"].as_str()?;
    let (_, field) = JOB_EVENTS.iter().find(|(n, _)| *n == name)?;
    ev["data"][*field].as_str()
}

/// Whether `ev` is what a `job_events` step waits for: a status change to
/// `until`, or an event named `until`.
fn is_until(ev: &Value, until: &str) -> bool {
    ev["event"] == until || (ev["event"] == "JOB_STATUS_CHANGE" && ev["data"]["status"] == until)
}

/// An event as recorded: name and data, no timestamp.
fn bare(ev: &Value) -> Value {
    json!({"event": ev["event"], "data": ev["data"]})
}

fn is_status(ev: &Value, status: &str) -> bool {
    ev["event"] == "JOB_STATUS_CHANGE" && ev["data"]["status"] == status
}

/// What the runner knows of each job: how many of its status changes have
/// been recorded since it was created (which tells the creation pair from
/// later pairs); a job id is free again after "null".
#[derive(Default)]
pub struct Jobs {
    statuses: BTreeMap<String, usize>,
}

impl Jobs {
    /// The positions (in the client's buffer) of `job`'s events that
    /// count, in order: a status change to "paused" directly followed, in
    /// the job's own events, by one to "running" is a drain and does not
    /// count, except the first such pair after "created" and "running"
    /// (every job that a transaction starts has that one).
    fn counted(&self, events: &[Value], job: &str) -> Vec<usize> {
        self.counted_marked(events, job)
            .into_iter()
            .map(|(i, _)| i)
            .collect()
    }

    /// As `counted`, each position with whether it is the "paused" of the
    /// creation pair (which a step waiting for "paused" does not mean).
    fn counted_marked(&self, events: &[Value], job: &str) -> Vec<(usize, bool)> {
        let mine: Vec<usize> = (0..events.len())
            .filter(|&i| job_of(&events[i]) == Some(job))
            .collect();
        let mut statuses = self.statuses.get(job).copied().unwrap_or(0);
        let mut out = Vec::new();
        let mut k = 0;
        while k < mine.len() {
            let ev = &events[mine[k]];
            let drain = is_status(ev, "paused")
                && statuses != 2
                && mine
                    .get(k + 1)
                    .is_some_and(|&n| is_status(&events[n], "running"));
            if drain {
                k += 2;
                continue;
            }
            // Only a pause that a "running" follows: a job that no
            // transaction started (block-stream, block-commit, mirror) has
            // no creation pair, and its first pause may be the user's.
            let creation_pause = is_status(ev, "paused")
                && statuses == 2
                && mine
                    .get(k + 1)
                    .is_some_and(|&n| is_status(&events[n], "running"));
            if is_status(ev, "null") {
                // The id is free again: a new job may take it.
                statuses = 0;
            } else if ev["event"] == "JOB_STATUS_CHANGE" {
                statuses += 1;
            }
            out.push((mine[k], creation_pause));
            k += 1;
        }
        out
    }

    /// Takes `job`'s events up to buffer position `end` out of the buffer
    /// and returns the ones that count, as recorded.
    fn take(&mut self, q: &mut Qmp, job: &str, end: usize) -> Vec<Value> {
        let counted = self.counted(&q.events, job);
        let mut taken = Vec::new();
        let mut rest = Vec::new();
        for (i, ev) in q.events.drain(..).enumerate() {
            if i <= end && job_of(&ev) == Some(job) {
                if counted.contains(&i) {
                    if is_status(&ev, "null") {
                        self.statuses.remove(job);
                    } else if ev["event"] == "JOB_STATUS_CHANGE" {
                        *self.statuses.entry(job.to_owned()).or_default() += 1;
                    }
                    taken.push(bare(&ev));
                }
            } else {
                rest.push(ev);
            }
        }
        q.events = rest;
        taken
    }

    /// The job events no step recorded, drains left out.
    fn leftover(&mut self, q: &mut Qmp) -> Vec<Value> {
        let mut jobs: Vec<String> = Vec::new();
        for e in &q.events {
            if let Some(j) = job_of(e) {
                if !jobs.iter().any(|x| x == j) {
                    jobs.push(j.to_owned());
                }
            }
        }
        let mut out = Vec::new();
        for job in jobs {
            let end = q.events.len().saturating_sub(1);
            out.extend(self.take(q, &job, end));
        }
        out
    }
}

/// Waits for the `count`th unrecorded event of `job` that matches `until`
/// and takes the job's events up to it out of the client's buffer, drains
/// left out (see [`Jobs::counted`]). A "paused" that nothing follows yet
/// may be the start of a drain: `query-jobs` tells (no command runs inside
/// a drained section), and its reply is not recorded. If the event does not
/// come in time, the record says so (and the events are left in place).
fn job_events(
    q: &mut Qmp,
    jobs: &mut Jobs,
    job: &str,
    until: &str,
    count: usize,
    limit: Duration,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let counted = jobs.counted_marked(&q.events, job);
        let end = counted
            .iter()
            .filter(|&&(i, creation)| is_until(&q.events[i], until) && !creation)
            .map(|&(i, _)| i)
            .nth(count - 1);
        let mut arrived = false;
        if let Some(end) = end {
            let last_of_job = !q.events[end + 1..].iter().any(|e| job_of(e) == Some(job));
            let confirmed = !(is_status(&q.events[end], "paused") && last_of_job) || {
                let r = q.exec("query-jobs", json!({}));
                // Events that came with the reply may settle it already.
                arrived = q.events[end + 1..].iter().any(|e| job_of(e) == Some(job));
                r["return"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|j| j["id"] == job && j["status"] == "paused")
            };
            if confirmed {
                return Value::Array(jobs.take(q, job, end));
            }
        }
        let now = Instant::now();
        if now >= deadline {
            // Recorded, not fatal: the transcript goes on (with short
            // waits from here on), so that one run shows every difference.
            let got: Vec<Value> = q
                .events
                .iter()
                .filter(|e| job_of(e) == Some(job))
                .map(bare)
                .collect();
            return json!({"no such event in time": until, "count": count, "events so far": got});
        }
        if arrived {
            continue;
        }
        let sock = q.writer();
        sock.set_read_timeout(Some(deadline - now))
            .expect("timeout");
        let v = q.recv();
        sock.set_read_timeout(Some(REPLY_DEADLINE))
            .expect("timeout");
        match v {
            Some(v) if v.get("event").is_some() => q.events.push(v),
            Some(v) => panic!("job {job}: a reply while waiting for events: {v}"),
            // A timeout ends at the deadline; an early None is the end of
            // the connection.
            None if Instant::now() + Duration::from_millis(100) < deadline => {
                panic!("job {job}: the QMP connection closed while waiting for {until:?}")
            }
            None => {}
        }
    }
}

/// How long a `start` step's daemon gets to exit or write its pidfile.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// A `start` step: `kind` started with `args` and a pidfile
/// (`$DIR/start-STEP.pid`), no monitor. Records the exit status and stderr
/// of a start that fails (the program name that starts a line, qsd's
/// `qemu-storage-daemon: ` or `tidemark: `, becomes `DAEMON: `), or
/// `{"started": true}` once the pidfile appears; that daemon is killed.
fn start_record(kind: Impl, args: &[String], dir: &Path, step: usize) -> Value {
    let pidfile = dir.join(format!("start-{step}.pid"));
    let errfile = dir.join(format!("start-{step}.err"));
    let err = std::fs::File::create(&errfile).expect("stderr file");
    let watch = DirWatch::new(dir);
    let mut child = kind
        .program()
        .args(crate::qmp_common::as_qemu(kind, args))
        .arg("--pidfile")
        .arg(&pidfile)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("spawn daemon");
    let deadline = Instant::now() + START_DEADLINE;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break Some(st);
        }
        if pidfile.exists() {
            break None;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("start {args:?}: neither exited nor ready in time");
        }
        watch.wait(Duration::from_millis(200));
    };
    let record = match status {
        Some(st) => {
            let text = std::fs::read_to_string(&errfile).unwrap_or_default();
            let lines: Vec<String> = text
                .lines()
                .map(|l| {
                    ["qemu-storage-daemon: ", "tidemark: "]
                        .iter()
                        .find_map(|p| l.strip_prefix(p))
                        .map_or_else(|| l.to_owned(), |rest| format!("DAEMON: {rest}"))
                })
                .collect();
            json!({"start": "exited", "status": st.code().unwrap_or(-1), "stderr": lines})
        }
        None => {
            let _ = child.kill();
            let _ = child.wait();
            json!({"started": true})
        }
    };
    let _ = std::fs::remove_file(&pidfile);
    let _ = std::fs::remove_file(&errfile);
    record
}

/// The flat node list of `query-named-block-nodes`.
fn nodes(q: &mut Qmp) -> Vec<Value> {
    let r = q.exec("query-named-block-nodes", json!({"flat": true}));
    r["return"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("query-named-block-nodes: {r}"))
}

/// Runs a scenario on one implementation: one normalised record per step,
/// then the end record. The records are pushed into `out` as they come, so
/// a panic half-way (a daemon that died, an event that never came) leaves
/// what was done. `reference` (qsd's records) shortens the event deadline
/// once this run has differed from it.
fn transcript(
    kind: Impl,
    name: &str,
    sc: &Value,
    reference: Option<&[Value]>,
    out: &mut Vec<Value>,
) {
    let args: Vec<String> = serde_json::from_value(sc["args"].clone()).unwrap_or_default();
    let args = crate::qmp_common::as_qemu(kind, &args);
    let inst = Instance::start(kind, &args, |dir| setup(sc, dir));
    let dir = inst.dir.path().to_owned();
    let dir_text = dir.display().to_string();
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut q = inst.client();
    let mut jobs = Jobs::default();
    let mut diverged = false;
    let mut missed = false;
    let steps = sc["steps"].as_array().cloned().unwrap_or_default();
    for (i, step) in steps.iter().enumerate() {
        let mut text = step.to_string();
        for (k, v) in &vars {
            // A JSON string inside a JSON text: escape it as such.
            let v = serde_json::to_string(v).expect("string");
            text = text.replace(&format!("${{{k}}}"), &v[1..v.len() - 1]);
        }
        let step: Value = serde_json::from_str(&text.replace("$DIR", &dir_text))
            .unwrap_or_else(|e| panic!("{name} step {i}: {e}"));
        if std::env::var_os("QMP_TRACE").is_some() {
            eprintln!("{kind:?} step {i}: {step}");
        }
        // Expectations are normalised as records are ($DIR, captured
        // auto node names).
        let expect = step.get("expect").map(|e| normalise(e, &dir));
        let record = if let Some(argv) = step.get("run") {
            let argv: Vec<String> =
                serde_json::from_value(argv.clone()).expect("run: an array of strings");
            run_tool(
                &argv,
                &dir,
                step["json"].as_bool().unwrap_or(false),
                &Filter::from_step(&step),
            )
        } else if let Some(args) = step.get("start") {
            let args: Vec<String> =
                serde_json::from_value(args.clone()).expect("start: an array of strings");
            start_record(kind, &args, &dir, i)
        } else if let Some(cmd) = step.get("qmp") {
            let reply = q.cmd(cmd.clone());
            capture(&step, &reply, &mut vars, reply.clone())
        } else if let Some(job) = step["job_events"].as_str() {
            let until = step["until"].as_str().unwrap_or("null");
            let count = step["count"].as_u64().unwrap_or(1) as usize;
            let limit = if missed {
                EVENT_DEADLINE_MISSED
            } else if diverged {
                EVENT_DEADLINE_DIVERGED
            } else {
                EVENT_DEADLINE
            };
            let r = job_events(&mut q, &mut jobs, job, until, count, limit);
            missed |= r.get("no such event in time").is_some();
            r
        } else if let Some(ev) = step["event"].as_str() {
            // The next such event (not a job's: those go by `job_events`).
            q.event(ev)
        } else if let Some(node) = step["bitmaps"].as_str() {
            let all = nodes(&mut q);
            match all.iter().find(|n| n["node-name"] == node) {
                Some(n) => json!({"node": node, "dirty-bitmaps": n.get("dirty-bitmaps")}),
                None => json!({"node": node, "missing": true}),
            }
        } else if let Some(fields) = step["nodes"].as_array() {
            let all = nodes(&mut q);
            let picked: Vec<Value> = all
                .iter()
                .map(|n| {
                    let mut m = serde_json::Map::new();
                    for f in fields {
                        let f = f.as_str().expect("nodes: field names");
                        let v = f.split('.').try_fold(n, |v, k| v.get(k));
                        if let Some(v) = v {
                            m.insert(f.to_owned(), v.clone());
                        }
                    }
                    Value::Object(m)
                })
                .collect();
            let listed = json!({ "return": all });
            capture(&step, &listed, &mut vars, Value::Array(picked))
        } else {
            panic!("{name} step {i}: unknown step {step}");
        };
        let record = normalise(&record, &dir);
        if kind == Impl::Qsd {
            if let Some(exp) = &expect {
                assert!(
                    contains(&record, exp),
                    "{name} step {i} {step}: qsd's record does not match the scenario's \
                     expectation\n record: {record}\n expect: {exp}"
                );
            }
        }
        if reference.and_then(|r| r.get(i)) != Some(&record) {
            diverged = true;
        }
        out.push(record);
    }
    // The end: no job left behind, no job event unaccounted for.
    let listed = q.exec("query-jobs", json!({}));
    let leftover = jobs.leftover(&mut q);
    out.push(normalise(
        &json!({"query-jobs": listed, "unrecorded job events": leftover}),
        &dir,
    ));
}

/// Where two records differ, as JSON paths (at most `limit`).
fn json_diff(a: &Value, b: &Value, path: &str, out: &mut Vec<String>, limit: usize) {
    if out.len() >= limit || a == b {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                let p = format!("{path}/{k}");
                match y.get(k) {
                    Some(w) => json_diff(v, w, &p, out, limit),
                    None => out.push(format!("{p}: only qsd has it: {v}")),
                }
            }
            for (k, w) in y {
                if !x.contains_key(k) {
                    out.push(format!("{path}/{k}: only tidemark has it: {w}"));
                }
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            if x.len() != y.len() {
                out.push(format!(
                    "{path}: qsd has {} elements, tidemark {}",
                    x.len(),
                    y.len()
                ));
            }
            for (k, (v, w)) in x.iter().zip(y).enumerate() {
                json_diff(v, w, &format!("{path}/{k}"), out, limit);
            }
        }
        _ => out.push(format!("{path}: qsd {a}, tidemark {b}")),
    }
    out.truncate(limit);
}

fn clip(s: String, n: usize) -> String {
    if s.len() <= n {
        return s;
    }
    let mut k = n;
    while !s.is_char_boundary(k) {
        k -= 1;
    }
    format!("{}... ({} bytes)", &s[..k], s.len())
}

/// The differences between two transcripts, readable; empty if equal.
pub fn compare(steps: &[Value], qsd: &[Value], tm: &[Value]) -> String {
    let mut report = String::new();
    let mut shown = 0;
    let mut count = 0;
    for i in 0..qsd.len().max(tm.len()) {
        let (a, b) = (qsd.get(i), tm.get(i));
        if a == b {
            continue;
        }
        count += 1;
        if shown == 6 {
            continue;
        }
        shown += 1;
        let step = steps.get(i).map(Value::to_string).unwrap_or_default();
        report.push_str(&format!("\n--- step {i}: {}\n", clip(step, 400)));
        match (a, b) {
            (Some(a), Some(b)) => {
                let mut paths = Vec::new();
                json_diff(a, b, "", &mut paths, 12);
                for p in paths {
                    report.push_str(&format!("  {}\n", clip(p, 600)));
                }
                report.push_str(&format!(" qsd:      {}\n", clip(a.to_string(), 1500)));
                report.push_str(&format!(" tidemark: {}\n", clip(b.to_string(), 1500)));
            }
            (Some(a), None) => report.push_str(&format!(
                " qsd:      {}\n tidemark: (no record)\n",
                clip(a.to_string(), 1500)
            )),
            (None, Some(b)) => report.push_str(&format!(
                " qsd:      (no record)\n tidemark: {}\n",
                clip(b.to_string(), 1500)
            )),
            (None, None) => {}
        }
    }
    if count > 0 {
        report.insert_str(
            0,
            &format!("{count} of {} steps differ", qsd.len().max(tm.len())),
        );
    }
    report
}

fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panic".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(job: &str, s: &str) -> Value {
        json!({"event": "JOB_STATUS_CHANGE", "data": {"status": s, "id": job}})
    }

    fn statuses(events: &[Value], picked: &[usize]) -> Vec<String> {
        picked
            .iter()
            .map(|&i| {
                let e = &events[i];
                let s = e["data"]["status"].as_str().unwrap_or("");
                format!("{}:{}", job_of(e).unwrap_or("-"), s)
            })
            .collect()
    }

    #[test]
    fn drain_pairs_are_left_out_but_the_creation_pair_is_kept() {
        let events = vec![
            status("a", "created"),
            status("b", "created"),
            status("a", "running"),
            status("a", "paused"),
            status("b", "running"),
            status("a", "running"),
            status("a", "paused"), // a drain: another job's graph change
            json!({"event": "BLOCK_EXPORT_DELETED", "data": {"id": "e"}}),
            status("a", "running"),
            status("a", "waiting"),
            status("a", "paused"), // not followed by running (yet): kept
        ];
        let jobs = Jobs::default();
        assert_eq!(
            statuses(&events, &jobs.counted(&events, "a")),
            [
                "a:created",
                "a:running",
                "a:paused",
                "a:running",
                "a:waiting",
                "a:paused"
            ]
        );
        assert_eq!(
            statuses(&events, &jobs.counted(&events, "b")),
            ["b:created", "b:running"]
        );
        let marked = jobs.counted_marked(&events, "a");
        assert_eq!(
            marked.iter().filter(|(_, c)| *c).count(),
            1,
            "only the creation pair's pause is marked: {marked:?}"
        );
    }

    #[test]
    fn a_first_pause_that_nothing_resumes_is_the_users() {
        // block-stream and the like: no creation pair, job-pause at once.
        let events = vec![
            status("s", "created"),
            status("s", "running"),
            status("s", "paused"),
        ];
        let jobs = Jobs::default();
        let marked = jobs.counted_marked(&events, "s");
        assert_eq!(marked, vec![(0, false), (1, false), (2, false)]);
    }

    #[test]
    fn a_job_id_is_fresh_after_null() {
        let events = vec![
            status("j", "null"),
            status("j", "created"),
            status("j", "running"),
            status("j", "paused"),
            status("j", "running"),
        ];
        let mut jobs = Jobs::default();
        jobs.statuses.insert("j".to_owned(), 6);
        assert_eq!(jobs.counted(&events, "j").len(), 5);
    }

    #[test]
    fn extents_coalesce_only_when_alike_and_adjacent() {
        let e = |start: u64, length: u64, depth: u64| json!({"start": start, "length": length, "depth": depth, "data": true});
        let merged = coalesce(vec![e(0, 10, 0), e(10, 5, 0), e(15, 5, 1), e(30, 1, 1)]);
        assert_eq!(merged, vec![e(0, 15, 0), e(15, 5, 1), e(30, 1, 1)]);
    }

    #[test]
    fn job_events_are_told_by_id_or_device() {
        assert_eq!(job_of(&status("x", "created")), Some("x"));
        let done = json!({"event": "BLOCK_JOB_COMPLETED", "data": {"device": "y", "len": 0}});
        assert_eq!(job_of(&done), Some("y"));
        let other = json!({"event": "BLOCK_EXPORT_DELETED", "data": {"id": "z"}});
        assert_eq!(job_of(&other), None);
    }
}
