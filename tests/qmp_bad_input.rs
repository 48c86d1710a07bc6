//! Bad input over QMP: malformed JSON, limits (nesting, tokens, size),
//! stray bytes. Each gets qemu's error class and text as its first reply
//! (compared with qemu-storage-daemon where qsd answers in reasonable
//! time); the connection keeps working, another client never notices, and
//! the daemon lives on.

mod qmp_common;

use std::time::Duration;

use qmp_common::{normalise, Impl, Instance, Qmp};
use serde_json::{json, Value};

/// Sends a command tagged `alive` and reads until its reply: whatever
/// error replies the garbage before it produced are skipped.
fn still_answers(q: &mut Qmp) {
    q.send_raw(b"{\"execute\": \"query-version\", \"id\": \"alive\"}\n");
    loop {
        let r = q.reply();
        if r["id"] == "alive" {
            assert!(r.get("return").is_some(), "after garbage: {r}");
            return;
        }
    }
}

fn inputs() -> Vec<(&'static str, Vec<u8>)> {
    let nested = |n: usize, open: &str, close: &str| {
        [open.repeat(n), close.repeat(n), "\n".into()]
            .concat()
            .into_bytes()
    };
    // `[` + k × `1,` + `1]` is 2k + 3 tokens; qemu allows 2^21.
    let tokens = |k: usize| {
        ["[".into(), "1,".repeat(k), "1]\n".into()]
            .concat()
            .into_bytes()
    };
    vec![
        ("nesting 1024 is allowed", nested(1024, "[", "]")),
        ("nesting 1025 arrays", nested(1025, "[", "]")),
        ("nesting 1025 objects", {
            let mut v = "{\"a\":".repeat(1025).into_bytes();
            v.extend_from_slice(b"1");
            v.extend_from_slice("}".repeat(1025).as_bytes());
            v.push(b'\n');
            v
        }),
        ("2^21 - 1 tokens", tokens(1_048_574)),
        ("2^21 + 1 tokens", tokens(1_048_575)),
        ("control character in a string", b"{\"exec\nute\": 1}\n".to_vec()),
        ("stray byte", b"@\n".to_vec()),
        ("missing colon", b"{\"execute\" \"query-version\"}\n".to_vec()),
        ("trailing comma", b"{\"execute\": \"query-version\",}\n".to_vec()),
        ("stray closer", b"]\n".to_vec()),
        ("wrong type deep inside", br#"{"execute": "transaction", "arguments": {"actions": [{"type": "block-dirty-bitmap-merge", "data": {"node": "f0", "target": "b", "bitmaps": ["x", {"node": "f0", "name": 5}]}}]}}"#.to_vec()),
        ("unknown argument", br#"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "f0", "name": "b", "colour": "red"}}"#.to_vec()),
    ]
}

fn first_replies(kind: Impl) -> Vec<Value> {
    let args: Vec<String> = ["--blockdev", "driver=file,node-name=f0,filename=$DIR/a.img"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut inst = Instance::start_with_monitors(kind, &args, 2, |dir| {
        qmp_common::raw_image(&dir.join("a.img"), 1 << 20);
    });
    let mut bystander = inst.client_on(1);
    let mut q = inst.client_on(0);
    let mut out = Vec::new();
    for (what, bytes) in inputs() {
        q.send_raw(&bytes);
        let r = q.reply();
        out.push(json!({ "input": what, "reply": normalise(&r, inst.dir.path()) }));
        still_answers(&mut q);
    }
    // The other client saw nothing of it and still works.
    assert!(bystander.events.is_empty());
    let r = bystander.exec("query-version", json!({}));
    assert!(r.get("return").is_some(), "bystander: {r}");
    assert!(inst.alive(), "{kind:?} died:\n{}", inst.log());
    out
}

#[test]
fn malformed_input_gets_qemus_errors_and_harms_nobody() {
    let qsd = first_replies(Impl::Qsd);
    let tm = first_replies(Impl::Tidemark);
    for (a, b) in qsd.iter().zip(tm.iter()) {
        assert_eq!(a, b, "\n qsd:      {a}\n tidemark: {b}");
    }
}

/// qsd needs minutes to lex 64 MiB, so only tidemark is run; the text is
/// what qemu-storage-daemon 10.0.2 replied to the same input when measured
/// by hand (279 s).
#[test]
fn huge_message_is_capped_with_qemus_error() {
    let mut inst = Instance::start(Impl::Tidemark, &[], |_| {});
    let mut bystander = Qmp::connect(&inst.qmp_path);
    bystander.cmd(json!({"execute": "qmp_capabilities"}));
    let mut q = inst.client();
    let mut msg = b"{\"execute\": \"query-version\", \"arguments\": {\"x\": \"".to_vec();
    msg.resize(msg.len() + (65 << 20), b'a');
    msg.extend_from_slice(b"\"}}\n");
    // Write from another thread: the daemon answers while we still send.
    let mut w = q.writer();
    let sender = std::thread::spawn(move || {
        use std::io::Write;
        w.write_all(&msg).is_ok()
    });
    let r = q.reply();
    assert_eq!(
        r,
        json!({"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}})
    );
    assert!(sender.join().unwrap_or(false), "send failed");
    still_answers(&mut q);
    let r = bystander.exec("query-version", json!({}));
    assert!(r.get("return").is_some());
    assert!(inst.alive());
}

#[test]
fn quit_answers_then_exits_and_removes_its_socket() {
    let mut inst = Instance::start(Impl::Tidemark, &[], |_| {});
    let mut q = inst.client();
    assert_eq!(q.exec("quit", json!({})), json!({"return": {}}));
    assert!(inst.wait_exit(Duration::from_secs(20)), "did not exit");
    assert!(!inst.qmp_path.exists(), "socket left behind");
}
