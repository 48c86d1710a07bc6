//! Check 6: bad input over raw sockets. Malformed handshakes, unknown options,
//! oversize and out-of-range requests, unknown commands and flags, writes to a
//! read-only export, truncated payloads and mid-request disconnects each get
//! the error the NBD spec names (or a clean close), while a bystander
//! connection opened before the abuse keeps working and the server lives on.

mod common;

use std::net::Shutdown;
use std::path::PathBuf;

use common::wire::*;
use common::{run, tool, ServeOpts, Server};
use tempfile::TempDir;

/// 40 MiB: large enough that a 32 MiB + 1 request is in range, so only its
/// size is wrong.
const SIZE: u64 = 40 * 1024 * 1024;

/// A server on a patterned image, plus a bystander connection that is
/// already in transmission phase before the test misbehaves.
struct Fixture {
    server: Server,
    bystander: Conn,
    content: Vec<u8>,
    _dir: TempDir,
    _image: PathBuf,
}

impl Fixture {
    fn new(read_only: bool) -> Fixture {
        let dir = common::temp_dir();
        let image = dir.path().join("disk.img");
        common::sparse_file(&image, SIZE);
        // Data in the first MiB; the rest stays a hole.
        let content = common::pattern(1024 * 1024, 6);
        std::fs::write(&image, &content).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap()
            .set_len(SIZE)
            .unwrap();
        let opts = ServeOpts {
            read_only,
            ..ServeOpts::default()
        };
        let server = Server::start_under_test(&image, &opts);
        let mut bystander = Conn::new(server.connect());
        let (size, _) = bystander.open("");
        assert_eq!(size, SIZE);
        Fixture {
            server,
            bystander,
            content,
            _dir: dir,
            _image: image,
        }
    }

    /// A fresh connection in transmission phase with structured replies.
    fn client(&self) -> Conn {
        let mut c = Conn::new(self.server.connect());
        let (size, _) = c.open("");
        assert_eq!(size, SIZE);
        c
    }

    /// The bystander still reads correct data, a brand-new client (nbdinfo)
    /// still connects, and the server process is alive.
    fn others_unaffected(&mut self) {
        let got = self.bystander.read_ok(4096, 8192);
        assert!(
            got == self.content[4096..4096 + 8192],
            "bystander connection read wrong data after the bad client"
        );
        let json = run(tool("nbdinfo").arg("--json").arg(self.server.uri()));
        assert!(
            json.contains(&format!("\"export-size\": {SIZE}")),
            "nbdinfo after the bad client: {json}"
        );
        self.server.assert_alive();
    }
}

fn assert_closed(c: &mut Conn, what: &str) {
    match c.ending() {
        Ending::Closed(_) => {}
        Ending::StillOpen(got) => {
            panic!("{what}: server kept the connection open (sent {got:02x?})")
        }
    }
}

// ---- handshake phase -------------------------------------------------------

#[test]
fn unknown_client_flags_close_the_connection() {
    let mut f = Fixture::new(false);
    let mut c = Conn::new(f.server.connect());
    c.greeting();
    c.client_flags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES | 0x8000_0000);
    assert_closed(&mut c, "client flags with unknown bit 31");
    f.others_unaffected();
}

#[test]
fn garbage_instead_of_client_flags_closes_the_connection() {
    let mut f = Fixture::new(false);
    let mut c = Conn::new(f.server.connect());
    c.greeting();
    c.send(b"GET / HTTP/1.1\r\nHost: tidemark\r\n\r\n");
    assert_closed(&mut c, "HTTP request instead of client flags");
    f.others_unaffected();
}

#[test]
fn garbage_option_magic_closes_the_connection() {
    let mut f = Fixture::new(false);
    let mut c = Conn::new(f.server.connect());
    c.start();
    let mut b = b"IHAVEOPX".to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    c.send(&b);
    assert_closed(&mut c, "option with magic IHAVEOPX");
    f.others_unaffected();
}

#[test]
fn unknown_option_gets_err_unsup_and_negotiation_continues() {
    let mut f = Fixture::new(false);
    let mut c = Conn::new(f.server.connect());
    c.start();
    for opt in [
        0x0000_1234u32,
        4, /* withdrawn PEEK_EXPORT */
        0xffff_fffe,
    ] {
        c.option(opt, b"some option data");
        let r = c.opt_reply();
        assert_eq!(r.option, opt, "reply names the option");
        assert_eq!(
            r.rep_type, REP_ERR_UNSUP,
            "unknown option {opt:#x} must get NBD_REP_ERR_UNSUP, got {:#x}",
            r.rep_type
        );
    }
    c.structured_replies();
    let (size, _) = c.go("");
    assert_eq!(size, SIZE);
    assert!(c.read_ok(0, 4096) == f.content[..4096]);
    f.others_unaffected();
}

#[test]
fn starttls_without_tls_gets_an_error_reply_and_negotiation_continues() {
    let mut f = Fixture::new(false);
    let mut c = Conn::new(f.server.connect());
    c.start();
    c.option(OPT_STARTTLS, &[]);
    let r = c.opt_reply();
    assert_eq!(r.option, OPT_STARTTLS);
    assert!(
        r.rep_type == REP_ERR_UNSUP || r.rep_type == REP_ERR_POLICY,
        "STARTTLS on a server without TLS: expected ERR_UNSUP or ERR_POLICY, got {:#x}",
        r.rep_type
    );
    c.structured_replies();
    assert_eq!(c.go("").0, SIZE);
    f.others_unaffected();
}

#[test]
fn go_for_unknown_export_gets_err_unknown_then_default_export_works() {
    let mut f = Fixture::new(false);
    let mut c = Conn::new(f.server.connect());
    c.start();
    c.structured_replies();
    let replies = c.go_replies(OPT_GO, "no-such-export");
    let last = replies.last().unwrap();
    assert_eq!(
        last.rep_type, REP_ERR_UNKNOWN,
        "GO for a missing export: expected NBD_REP_ERR_UNKNOWN, got {replies:?}"
    );
    let (size, _) = c.go("");
    assert_eq!(size, SIZE);
    assert!(c.read_ok(512, 512) == f.content[512..1024]);
    f.others_unaffected();
}

#[test]
fn malformed_go_payload_gets_err_invalid_and_negotiation_continues() {
    let mut f = Fixture::new(false);
    let mut c = Conn::new(f.server.connect());
    c.start();
    // Name length 100, but the option holds only 6 bytes in all.
    let mut d = 100u32.to_be_bytes().to_vec();
    d.extend_from_slice(&[0, 0]);
    c.option(OPT_GO, &d);
    let r = c.opt_reply();
    assert_eq!(
        r.rep_type, REP_ERR_INVALID,
        "GO whose name length overruns the option: expected NBD_REP_ERR_INVALID, got {r:?}"
    );
    c.structured_replies();
    assert_eq!(c.go("").0, SIZE);
    f.others_unaffected();
}

#[test]
fn oversized_option_length_gets_an_error_or_a_close() {
    let mut f = Fixture::new(false);
    let mut c = Conn::new(f.server.connect());
    c.start();
    // Claims 1 GiB of option data but sends a normal GO body: the server must
    // not sit waiting for the rest (nor allocate it); it answers with an
    // error reply, or hangs up.
    let mut d = 0u32.to_be_bytes().to_vec();
    d.extend_from_slice(&0u16.to_be_bytes());
    c.option_with_len(OPT_GO, 1 << 30, &d);
    match c.ending() {
        Ending::Closed(_) => {}
        Ending::StillOpen(got) => {
            // Acceptable only if what arrived is an error reply to GO.
            assert!(
                got.len() >= 20
                    && got[0..8] == OPT_REPLY_MAGIC.to_be_bytes()
                    && got[8..12] == OPT_GO.to_be_bytes()
                    && u32::from_be_bytes(got[12..16].try_into().unwrap()) & REP_FLAG_ERROR != 0,
                "GO with a 1 GiB length: expected an error reply or a close, got {got:02x?}"
            );
        }
    }
    f.others_unaffected();
}

#[test]
fn oversized_export_name_closes_the_connection() {
    let mut f = Fixture::new(false);
    let mut c = Conn::new(f.server.connect());
    c.start();
    // EXPORT_NAME cannot be answered with an error: the server must close.
    c.option_with_len(OPT_EXPORT_NAME, 1 << 30, b"x");
    assert_closed(&mut c, "EXPORT_NAME with a 1 GiB name");
    f.others_unaffected();
}

#[test]
fn client_hanging_up_mid_handshake_costs_nothing() {
    let mut f = Fixture::new(false);
    for cut in [0usize, 2, 4, 10, 19] {
        let mut c = Conn::new(f.server.connect());
        c.greeting();
        let mut b = (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&OPT_GO.to_be_bytes());
        b.extend_from_slice(&6u32.to_be_bytes());
        b.truncate(cut);
        c.send(&b);
        drop(c);
    }
    f.others_unaffected();
}

// ---- transmission phase ----------------------------------------------------

#[test]
fn read_past_end_gets_einval_and_connection_continues() {
    let mut f = Fixture::new(false);
    let mut c = f.client();
    for (off, len) in [(SIZE - 512, 1024u32), (SIZE, 1), (SIZE + 4096, 4096)] {
        let out = c.call(0, CMD_READ, off, len, &[]);
        assert_eq!(out.error, EINVAL, "read {off}+{len} past the end: {out:?}");
        assert!(
            !out.simple,
            "a read error must be a structured reply once negotiated"
        );
    }
    // offset + length overflows u64.
    let out = c.call(0, CMD_READ, u64::MAX - 511, 4096, &[]);
    assert_eq!(out.error, EINVAL, "read whose end overflows u64: {out:?}");
    assert!(c.read_ok(0, 4096) == f.content[..4096]);
    f.others_unaffected();
}

#[test]
fn writes_trims_and_zeroes_past_the_end_get_qemus_einval() {
    let mut f = Fixture::new(false);
    let mut c = f.client();
    // qemu answers EINVAL to every request past the end (the spec would
    // have ENOSPC for writes); tidemark's replies are qemu's.
    let out = c.call(0, CMD_WRITE, SIZE - 512, 1024, &[0x55; 1024]);
    assert_eq!(out.error, EINVAL, "write past the end: {out:?}");
    let out = c.call(0, CMD_TRIM, SIZE - 4096, 8192, &[]);
    assert_eq!(out.error, EINVAL, "trim past the end: {out:?}");
    let out = c.call(0, CMD_WRITE_ZEROES, u64::MAX - 4095, 8192, &[]);
    assert_eq!(
        out.error, EINVAL,
        "write-zeroes whose end overflows u64: {out:?}"
    );
    assert!(c.read_ok(SIZE - 4096, 4096) == vec![0u8; 4096]);
    f.others_unaffected();
}

#[test]
fn read_over_max_block_size_gets_einval_or_eoverflow() {
    let mut f = Fixture::new(false);
    let mut c = f.client();
    let out = c.call(0, CMD_READ, 0, MAX_BLOCK + 1, &[]);
    assert!(
        out.error == EINVAL || out.error == EOVERFLOW,
        "read of 32 MiB + 1 (max block 32 MiB): expected EINVAL or EOVERFLOW, got {out:?}"
    );
    // The connection continues, and a maximum-size read is fine.
    let data = c.read_ok(0, MAX_BLOCK);
    assert!(data[..f.content.len()] == f.content[..]);
    assert!(data[f.content.len()..].iter().all(|&b| b == 0));
    f.others_unaffected();
}

#[test]
fn write_over_max_block_size_gets_an_error_or_a_close() {
    let mut f = Fixture::new(false);
    let mut c = f.client();
    // 32 MiB + 1 with its whole payload. The server may drain the payload
    // and refuse (EINVAL or EOVERFLOW), then carry on; or hang up.
    c.request(0, CMD_WRITE, 99, 0, MAX_BLOCK + 1);
    let mut w = c.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        // Fails with EPIPE/ECONNRESET if the server hangs up: fine.
        let _ = w.write_all(&vec![0x77; MAX_BLOCK as usize + 1]);
    });
    let mut head = [0u8; 4];
    let replied = match std::io::Read::read(&mut c.s, &mut head[..1]) {
        Ok(0) | Err(_) => false,
        Ok(_) => {
            std::io::Read::read_exact(&mut c.s, &mut head[1..]).unwrap();
            true
        }
    };
    writer.join().unwrap();
    if replied {
        // Re-assemble the reply from the magic we already consumed.
        let magic = u32::from_be_bytes(head);
        let out = match magic {
            STRUCTURED_REPLY_MAGIC => {
                let h = c.recv(16);
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
                let p = c.recv(len as usize);
                let typ = u16::from_be_bytes([h[2], h[3]]);
                assert_eq!(u64::from_be_bytes(h[4..12].try_into().unwrap()), 99);
                assert!(
                    typ & 0x8000 != 0,
                    "oversize write got a non-error chunk type {typ:#x}"
                );
                assert!(h[1] & 1 != 0, "single error chunk should be final");
                u32::from_be_bytes(p[0..4].try_into().unwrap())
            }
            SIMPLE_REPLY_MAGIC => {
                let h = c.recv(12);
                u32::from_be_bytes(h[0..4].try_into().unwrap())
            }
            m => panic!("oversize write: bad reply magic {m:#x}"),
        };
        assert!(
            out == EINVAL || out == EOVERFLOW,
            "write of 32 MiB + 1 (max block 32 MiB): expected EINVAL or EOVERFLOW, got {out}"
        );
        // The connection carries on.
        assert!(c.read_ok(0, 4096) == f.content[..4096]);
    }
    // Nothing was written.
    assert!(f.bystander.read_ok(0, 4096) == f.content[..4096]);
    f.others_unaffected();
}

#[test]
fn unknown_command_gets_einval_and_connection_continues() {
    let mut f = Fixture::new(false);
    let mut c = f.client();
    for typ in [42u16, 0x7fff, 0xffff] {
        let out = c.call(0, typ, 0, 4096, &[]);
        assert_eq!(out.error, EINVAL, "command type {typ}: {out:?}");
    }
    assert!(c.read_ok(0, 4096) == f.content[..4096]);
    f.others_unaffected();
}

#[test]
fn unknown_or_misplaced_flags_get_einval_and_connection_continues() {
    let mut f = Fixture::new(false);
    let mut c = f.client();
    // Bit 15 is not a command flag at all.
    let out = c.call(0x8000, CMD_READ, 0, 4096, &[]);
    assert_eq!(out.error, EINVAL, "READ with flag bit 15: {out:?}");
    // REQ_ONE belongs to BLOCK_STATUS, not READ.
    let out = c.call(CMD_FLAG_REQ_ONE, CMD_READ, 0, 4096, &[]);
    assert_eq!(out.error, EINVAL, "READ with REQ_ONE: {out:?}");
    // DF belongs to READ, not FLUSH.
    let out = c.call(CMD_FLAG_DF, CMD_FLUSH, 0, 0, &[]);
    assert_eq!(out.error, EINVAL, "FLUSH with DF: {out:?}");
    assert!(c.read_ok(0, 4096) == f.content[..4096]);
    f.others_unaffected();
}

#[test]
fn block_status_without_a_meta_context_gets_einval() {
    let mut f = Fixture::new(false);
    let mut c = f.client();
    let out = c.call(0, CMD_BLOCK_STATUS, 0, 4096, &[]);
    assert_eq!(
        out.error, EINVAL,
        "BLOCK_STATUS with no context selected: {out:?}"
    );
    assert!(c.read_ok(0, 4096) == f.content[..4096]);
    f.others_unaffected();
}

#[test]
fn writes_on_read_only_export_get_qemus_einval_and_change_nothing() {
    let mut f = Fixture::new(true);
    let mut c = f.client();
    // qemu's EINVAL, "Export is read-only" (the spec would have EPERM).
    for (cmd, payload) in [
        (CMD_WRITE, &[0xab; 4096][..]),
        (CMD_WRITE_ZEROES, &[]),
        (CMD_TRIM, &[]),
    ] {
        let out = c.call(0, cmd, 0, 4096, payload);
        assert_eq!(
            out.error, EINVAL,
            "command {cmd} on a read-only export: {out:?}"
        );
    }
    // The payload of the refused write was consumed: the stream is in sync.
    assert!(c.read_ok(0, 4096) == f.content[..4096]);
    f.others_unaffected();
}

#[test]
fn read_only_export_over_export_name_refuses_writes_as_qemu() {
    let mut f = Fixture::new(true);
    let mut c = Conn::new(f.server.connect());
    c.greeting();
    c.client_flags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    c.option(OPT_EXPORT_NAME, b"");
    let size = u64::from_be_bytes(c.recv(8).try_into().unwrap());
    let flags = u16::from_be_bytes(c.recv(2).try_into().unwrap());
    assert_eq!(size, SIZE);
    assert_ne!(flags & TFLAG_READ_ONLY, 0, "read-only export must say so");
    let out = c.call(0, CMD_WRITE, 8192, 512, &[1; 512]);
    assert!(
        out.simple,
        "no structured replies negotiated: simple replies only"
    );
    assert_eq!(out.error, EINVAL, "WRITE on a read-only export: {out:?}");
    let data = c.read_ok(8192, 512);
    assert!(data == f.content[8192..8192 + 512]);
    f.others_unaffected();
}

#[test]
fn bad_request_magic_closes_the_connection() {
    let mut f = Fixture::new(false);
    let mut c = f.client();
    let mut b = 0xdead_beefu32.to_be_bytes().to_vec();
    b.extend_from_slice(&[0u8; 24]);
    c.send(&b);
    assert_closed(&mut c, "request with magic 0xdeadbeef");
    f.others_unaffected();
}

#[test]
fn truncated_write_payload_then_close_costs_nothing() {
    let mut f = Fixture::new(false);
    let mut c = f.client();
    c.request(0, CMD_WRITE, 7, 65536, 65536);
    c.send(&[0xcd; 1000]);
    c.s.shutdown(Shutdown::Both).unwrap();
    drop(c);
    f.others_unaffected();
    // A new client can still write and read back.
    let mut c = f.client();
    let out = c.call(0, CMD_WRITE, 131072, 4096, &[0x5a; 4096]);
    assert_eq!(
        out.error, 0,
        "write after another client's truncated write: {out:?}"
    );
    assert!(f.bystander.read_ok(131072, 4096) == vec![0x5a; 4096]);
}

#[test]
fn disconnect_mid_request_costs_nothing() {
    let mut f = Fixture::new(false);
    // Half a request header.
    let mut c = f.client();
    c.send(&REQUEST_MAGIC.to_be_bytes());
    c.send(&[0, 0, 0]);
    drop(c);
    // A big read whose reply is never read: the server's writes fail.
    let mut c = f.client();
    for i in 0..4 {
        c.request(0, CMD_READ, 100 + i, 0, MAX_BLOCK);
    }
    c.s.shutdown(Shutdown::Both).unwrap();
    drop(c);
    // Pipelined writes, then gone before the replies.
    let mut c = f.client();
    for i in 0..16u64 {
        c.request(
            CMD_FLAG_FUA,
            CMD_WRITE,
            200 + i,
            2 * 1024 * 1024 + i * 4096,
            4096,
        );
        c.send(&[i as u8; 4096]);
    }
    drop(c);
    f.others_unaffected();
}

#[test]
fn many_abusive_clients_at_once_do_not_disturb_a_working_one() {
    let mut f = Fixture::new(false);
    let socket = f.server.socket().to_path_buf();
    let uri = f.server.uri();
    std::thread::scope(|s| {
        for i in 0..8u8 {
            let socket = socket.clone();
            s.spawn(move || {
                let mut c = Conn::new(std::os::unix::net::UnixStream::connect(&socket).unwrap());
                let _ =
                    c.s.set_read_timeout(Some(std::time::Duration::from_secs(20)));
                c.greeting();
                c.send(&common::pattern(4096 + usize::from(i) * 97, u64::from(i)));
                let _ = c.ending();
            });
        }
        let copy = s.spawn(move || {
            let out = common::output(tool("nbdinfo").arg("--map").arg(&uri));
            assert!(out.status.success(), "nbdinfo --map during abuse: {out:?}");
        });
        copy.join().unwrap();
    });
    f.others_unaffected();
}
