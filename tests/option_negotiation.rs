//! Handshake options byte by byte, compared with qemu-nbd: the same option
//! sequence sent to both servers gets the same replies (types, export and
//! context names, info items), with only error message texts, context IDs and
//! the CAN_MULTI_CONN bit normalised away. This pins the LIST, INFO, GO,
//! STRUCTURED_REPLY and meta-context behaviour behind checks 1 and 6.

mod common;

use std::path::Path;

use common::wire::*;
use common::{Kind, ServeOpts, Server};

const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

fn rep_name(t: u32) -> String {
    match t {
        REP_ACK => "ACK".into(),
        REP_SERVER => "SERVER".into(),
        REP_INFO => "INFO".into(),
        REP_META_CONTEXT => "META_CONTEXT".into(),
        REP_ERR_UNSUP => "ERR_UNSUP".into(),
        REP_ERR_POLICY => "ERR_POLICY".into(),
        REP_ERR_INVALID => "ERR_INVALID".into(),
        REP_ERR_UNKNOWN => "ERR_UNKNOWN".into(),
        REP_ERR_TOO_BIG => "ERR_TOO_BIG".into(),
        t => format!("{t:#x}"),
    }
}

/// One reply as a comparable line.
fn describe(r: &OptReply) -> String {
    let d = &r.data;
    let body = match r.rep_type {
        REP_SERVER => {
            let n = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
            format!(
                "name={:?} rest={:?}",
                String::from_utf8_lossy(&d[4..4 + n]),
                String::from_utf8_lossy(&d[4 + n..])
            )
        }
        REP_META_CONTEXT => {
            let id = u32::from_be_bytes(d[0..4].try_into().unwrap());
            // IDs are the server's choice; only "zero or not" is comparable.
            format!(
                "id={} name={:?}",
                if id == 0 { "0" } else { "nonzero" },
                String::from_utf8_lossy(&d[4..])
            )
        }
        REP_INFO => {
            let kind = u16::from_be_bytes(d[0..2].try_into().unwrap());
            if kind == INFO_EXPORT {
                let size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                let flags = u16::from_be_bytes(d[10..12].try_into().unwrap());
                format!(
                    "EXPORT size={size} flags={:#x}",
                    flags & !NBD_FLAG_CAN_MULTI_CONN
                )
            } else {
                format!("info{kind} {:02x?}", &d[2..])
            }
        }
        t if t & REP_FLAG_ERROR != 0 => String::new(), // message text differs
        _ => format!("{d:02x?}"),
    };
    format!("opt{} {} {}", r.option, rep_name(r.rep_type), body)
}

/// Send one option and describe every reply up to the final one. INFO
/// replies may come in any order, so they are sorted.
fn exchange(c: &mut Conn, opt: u32, data: &[u8]) -> Vec<String> {
    c.option(opt, data);
    let mut lines = Vec::new();
    loop {
        let r = c.opt_reply();
        let last = r.rep_type == REP_ACK || r.rep_type & REP_FLAG_ERROR != 0;
        lines.push(describe(&r));
        if last {
            break;
        }
    }
    let end = lines.pop().unwrap();
    lines.sort();
    lines.push(end);
    lines
}

fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

fn info_payload(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// The whole option script; returns the transcript.
fn script(server: &Server) -> Vec<String> {
    let name = server.export_name().to_string();
    let mut c = Conn::new(server.connect());
    let mut t = Vec::new();
    let flags = c.greeting();
    t.push(format!("handshake flags {flags:#x}"));
    c.client_flags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);

    t.push("-- LIST".into());
    t.extend(exchange(&mut c, OPT_LIST, &[]));
    t.push("-- LIST with data".into());
    t.extend(exchange(&mut c, OPT_LIST, b"junk"));
    t.push("-- meta contexts before structured replies".into());
    t.extend(exchange(
        &mut c,
        OPT_LIST_META_CONTEXT,
        &meta_payload(&name, &[]),
    ));
    t.extend(exchange(
        &mut c,
        OPT_SET_META_CONTEXT,
        &meta_payload(&name, &["base:allocation"]),
    ));
    t.push("-- STRUCTURED_REPLY, twice, then with data".into());
    t.extend(exchange(&mut c, OPT_STRUCTURED_REPLY, &[]));
    t.extend(exchange(&mut c, OPT_STRUCTURED_REPLY, &[]));
    t.extend(exchange(&mut c, OPT_STRUCTURED_REPLY, b"x"));
    t.push("-- LIST_META_CONTEXT".into());
    for queries in [
        &[][..],
        &["base:"][..],
        &["base:allocation"][..],
        &["base:nosuch"][..],
        &["x-nosuch:thing"][..],
        &["base:allocation", "x-nosuch:thing"][..],
    ] {
        t.push(format!("queries {queries:?}"));
        t.extend(exchange(
            &mut c,
            OPT_LIST_META_CONTEXT,
            &meta_payload(&name, queries),
        ));
    }
    t.push("LIST_META_CONTEXT for a missing export".into());
    t.extend(exchange(
        &mut c,
        OPT_LIST_META_CONTEXT,
        &meta_payload("no-such-export", &[]),
    ));
    t.push("LIST_META_CONTEXT with a truncated query".into());
    let mut bad = meta_payload(&name, &["base:allocation"]);
    bad.truncate(bad.len() - 3);
    t.extend(exchange(&mut c, OPT_LIST_META_CONTEXT, &bad));
    t.push("-- SET_META_CONTEXT".into());
    for queries in [
        &["base:allocation"][..],
        &["base:"][..],
        &[][..],
        &["x-nosuch:thing", "base:allocation"][..],
    ] {
        t.push(format!("queries {queries:?}"));
        t.extend(exchange(
            &mut c,
            OPT_SET_META_CONTEXT,
            &meta_payload(&name, queries),
        ));
    }
    t.push("-- INFO".into());
    t.extend(exchange(&mut c, OPT_INFO, &info_payload(&name, &[])));
    t.extend(exchange(
        &mut c,
        OPT_INFO,
        &info_payload(&name, &[INFO_BLOCK_SIZE, 1, 2]),
    ));
    t.extend(exchange(
        &mut c,
        OPT_INFO,
        &info_payload("no-such-export", &[]),
    ));
    t.push("INFO with a truncated payload".into());
    t.extend(exchange(&mut c, OPT_INFO, &[0, 0]));
    t.push("-- GO".into());
    t.extend(exchange(
        &mut c,
        OPT_GO,
        &info_payload(&name, &[INFO_BLOCK_SIZE]),
    ));
    t
}

fn compare(image: &Path, opts: &ServeOpts) {
    let theirs = {
        let s = Server::start(Kind::QemuNbd, image, opts);
        script(&s)
    };
    let ours = {
        let s = Server::start(Kind::under_test(), image, opts);
        script(&s)
    };
    if ours != theirs {
        panic!(
            "option replies differ from qemu-nbd's (- qemu-nbd, + ours):\n{}",
            diff(&theirs, &ours)
        );
    }
}

/// A line diff (longest common subsequence) of two transcripts.
fn diff(a: &[String], b: &[String]) -> String {
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            out.push_str(&format!("  {}\n", a[i]));
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push_str(&format!("+ {}\n", b[j]));
            j += 1;
        } else {
            out.push_str(&format!("- {}\n", a[i]));
            i += 1;
        }
    }
    out
}

fn image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("disk.raw");
    common::sparse_file(&p, 16 * 1024 * 1024);
    p
}

#[test]
fn option_replies_match_qemu_nbd_for_the_default_export() {
    let dir = common::temp_dir();
    compare(&image(dir.path()), &ServeOpts::read_write());
}

#[test]
fn option_replies_match_qemu_nbd_for_a_named_read_only_export_with_description() {
    let dir = common::temp_dir();
    let opts = ServeOpts {
        export_name: "vdb".into(),
        description: Some("scratch disk".into()),
        read_only: true,
        ..ServeOpts::default()
    };
    compare(&image(dir.path()), &opts);
}

#[test]
fn abort_is_acknowledged_and_the_connection_closed() {
    let dir = common::temp_dir();
    let mut server = Server::start_under_test(&image(dir.path()), &ServeOpts::read_write());
    let mut c = Conn::new(server.connect());
    c.start();
    c.option(OPT_ABORT, &[]);
    let r = c.opt_reply();
    assert_eq!((r.option, r.rep_type), (OPT_ABORT, REP_ACK), "{r:?}");
    assert!(
        matches!(c.ending(), Ending::Closed(_)),
        "server must close after ABORT"
    );
    server.assert_alive();
}
