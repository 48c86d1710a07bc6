//! NBD over TLS (issue 12), checked against qemu-nbd: every scenario runs on
//! qemu-nbd (the reference) and on tidemark, with the same command line
//! (`--object tls-creds-*,... --tls-creds tls0 [--tls-authz auth0]`) and the
//! same stock clients (nbdinfo, nbdcopy, qemu-img, qemu-io, python libnbd,
//! raw sockets), and what the clients see must be the same.
//!
//! - x509 over a unix socket and over TCP: reads, maps, a whole copy and a
//!   write, equal to the plaintext export's.
//! - PSK: the right key works; a wrong key and an unknown user are refused.
//! - Refusals: plaintext clients (every option answered with qemu's
//!   TLS_REQD text, byte for byte), a certificate from another CA, no
//!   certificate, and identities that authz-simple / authz-list do not list.
//! - Bad input after STARTTLS: garbage, a truncated ClientHello, a stalled
//!   handshake (closed by the 10 s handshake limit), a TLS 1.2
//!   renegotiation.
//!
//! Every refusal and every bad input is followed by a good client on a
//! server that has no spare connection slot: a slot that leaked would leave
//! it waiting in the backlog (and fail on a bounded timeout).
//!
//! `TIDEMARK_TEST_SERVER=qemu-nbd` runs the reference alone (a check of the
//! tests themselves).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::{
    describe_failure, free_tcp_port, output, rss, run, run_py, sha256, temp_dir,
    wait_with_deadline, Kind, PyScript, ServeOpts, Server, TlsOpts,
};

/// The export every scenario serves.
const EXPORT: &str = "vda";
const SIZE: u64 = 16 << 20;
/// The client certificate's distinguished name as qemu (gnutls) prints it.
const CLIENT_DN: &str = "C=GB,O=Tidemark Tests,CN=client.tidemark.test";
/// A bound for every client run here: the exports are small, so anything
/// slower is a hang (a client stuck in the backlog of a full server).
const CLIENT_TIMEOUT_SECS: u32 = 30;
/// How long a good client's line may take to come.
const LINE_WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Certificates: made once per test binary by tests/tls/gen-certs.sh, removed
// at exit.

static CERTS: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_certs() {
    if let Some(dir) = CERTS.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The directory gen-certs.sh filled: server/, client/, rogue/, psk/,
/// psk-wrong/, plus what this file adds: noclient/ (the CA only) and
/// psk-bob/ (alice's key under another name).
fn certs() -> &'static Path {
    CERTS.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("tidemark-tls-certs-")
            .tempdir()
            .expect("create certs dir")
            .keep();
        // SAFETY: registers a plain extern "C" function with no arguments.
        unsafe { libc::atexit(remove_certs) };
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls/gen-certs.sh");
        run(Command::new("sh").arg(script).arg(&dir));
        let noclient = dir.join("noclient");
        std::fs::create_dir(&noclient).unwrap();
        std::fs::copy(dir.join("client/ca-cert.pem"), noclient.join("ca-cert.pem")).unwrap();
        let alice = std::fs::read_to_string(dir.join("psk/keys.psk")).unwrap();
        let key = alice
            .trim()
            .strip_prefix("alice:")
            .unwrap_or_else(|| panic!("psk/keys.psk is not alice's: {alice:?}"));
        std::fs::create_dir(dir.join("psk-bob")).unwrap();
        std::fs::write(dir.join("psk-bob/keys.psk"), format!("bob:{key}\n")).unwrap();
        dir
    })
}

fn cert(sub: &str) -> PathBuf {
    certs().join(sub)
}

// ---------------------------------------------------------------------------
// Running each scenario on both servers.

/// The servers to run: qemu-nbd always (the reference), tidemark unless
/// `TIDEMARK_TEST_SERVER=qemu-nbd`.
fn kinds() -> Vec<Kind> {
    match Kind::under_test() {
        Kind::QemuNbd => vec![Kind::QemuNbd],
        Kind::Tidemark => vec![Kind::QemuNbd, Kind::Tidemark],
    }
}

/// Runs `scenario` on each server and requires the same transcript.
fn on_each_server(what: &str, scenario: impl Fn(Kind) -> String) {
    let mut seen: Vec<(Kind, String)> = Vec::new();
    for kind in kinds() {
        seen.push((kind, scenario(kind)));
    }
    same_transcripts(what, &seen);
}

fn same_transcripts(what: &str, seen: &[(Kind, String)]) {
    let (ref_kind, reference) = &seen[0];
    for (kind, t) in &seen[1..] {
        assert_eq!(
            comparable(t),
            comparable(reference),
            "{what}: what clients saw from {kind:?} (left) differs from {ref_kind:?} (right)\n--- {kind:?} ---\n{t}\n--- {ref_kind:?} ---\n{reference}"
        );
    }
}

/// A transcript without its informational "# " lines.
fn comparable(t: &str) -> String {
    t.lines()
        .filter(|l| !l.starts_with("# "))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------
// Images, servers and clients.

/// A qcow2 image with data, a zeroed range and holes, and the same content
/// as a raw file (the reference for compares and checksums).
fn make_image(dir: &Path) -> (PathBuf, PathBuf) {
    let img = dir.join("src.qcow2");
    let raw = dir.join("src.raw");
    run(bounded("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg(SIZE.to_string()));
    run(bounded("qemu-io").args(["-f", "qcow2"]).arg(&img).args([
        "-c",
        "write -P 0x5a 1M 1M",
        "-c",
        "write -P 0xa5 5M 64k",
        "-c",
        "write -z 8M 1M",
        "-c",
        "write -P 0x11 15M 4k",
    ]));
    run(bounded("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&img)
        .arg(&raw));
    (img, raw)
}

/// A private copy of `src` for one server (each writes its own).
fn image_for(kind: Kind, src: &Path, dir: &Path) -> PathBuf {
    let img = dir.join(format!("{kind:?}.qcow2"));
    std::fs::copy(src, &img).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
    img
}

fn serve(kind: Kind, img: &Path, tls: Option<TlsOpts>, max: u32, tcp: bool) -> Server {
    let opts = ServeOpts {
        export_name: EXPORT.into(),
        format: Some("qcow2"),
        max_connections: Some(max),
        tls,
        tcp_port: tcp.then(free_tcp_port),
        ..ServeOpts::default()
    };
    Server::start(kind, img, &opts)
}

/// A command under coreutils `timeout` with this file's short bound.
fn bounded(program: &str) -> Command {
    let mut c = Command::new("timeout");
    c.args(["-k", "5", &CLIENT_TIMEOUT_SECS.to_string(), program]);
    c
}

/// The nbds URI of the export, with x509 client files from `certdir`.
fn x509_uri(srv: &Server, certdir: &Path) -> String {
    match srv.tcp_addr() {
        Some(addr) => format!(
            "nbds://{addr}/{EXPORT}?tls-certificates={}",
            certdir.display()
        ),
        None => format!(
            "nbds+unix:///{EXPORT}?socket={}&tls-certificates={}",
            srv.socket().display(),
            certdir.display()
        ),
    }
}

fn psk_uri(socket: &Path, user: &str, pskdir: &str) -> String {
    format!(
        "nbds+unix://{user}@/{EXPORT}?socket={}&tls-psk-file={}",
        socket.display(),
        cert(pskdir).join("keys.psk").display()
    )
}

/// qemu's client side: the `--object` for credentials `c0` and the
/// `--image-opts` string of the export.
struct QemuClient {
    object: Option<String>,
    image_opts: String,
}

impl QemuClient {
    fn x509(srv: &Server, certdir: &Path) -> QemuClient {
        QemuClient::new(
            srv,
            Some(format!(
                "tls-creds-x509,id=c0,endpoint=client,dir={}",
                certdir.display()
            )),
        )
    }

    /// Without TLS.
    fn plain(srv: &Server) -> QemuClient {
        QemuClient::new(srv, None)
    }

    fn psk(srv: &Server, user: &str, pskdir: &str) -> QemuClient {
        QemuClient::new(
            srv,
            Some(format!(
                "tls-creds-psk,id=c0,endpoint=client,dir={},username={user}",
                cert(pskdir).display()
            )),
        )
    }

    fn new(srv: &Server, object: Option<String>) -> QemuClient {
        let server = match srv.tcp_addr() {
            Some(addr) => format!(
                "server.type=inet,server.host={},server.port={}",
                addr.ip(),
                addr.port()
            ),
            None => format!("path={}", srv.socket().display()),
        };
        let tls = if object.is_some() {
            ",tls-creds=c0,tls-hostname=localhost"
        } else {
            ""
        };
        QemuClient {
            object,
            image_opts: format!("driver=nbd,{server},export={EXPORT}{tls}"),
        }
    }

    /// `qemu-img SUBCOMMAND --object ... [args] --image-opts` (the image
    /// options come last, after `args`).
    fn qemu_img(&self, sub: &str, args: &[&str]) -> Command {
        let mut c = bounded("qemu-img");
        c.arg(sub);
        if let Some(o) = &self.object {
            c.args(["--object", o]);
        }
        c.arg("--image-opts").args(args).arg(&self.image_opts);
        c
    }

    fn qemu_io(&self, cmds: &[&str]) -> Command {
        let mut c = bounded("qemu-io");
        if let Some(o) = &self.object {
            c.args(["--object", o]);
        }
        c.args(["--image-opts", &self.image_opts]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c
    }
}

/// A client that must be served; returns its stdout.
/// `qemu-img compare` of the export (through `qemu`'s TLS client) with the
/// raw source: it must say the images are identical.
fn compare_identical(
    kind: Kind,
    what: &str,
    srv: &mut Server,
    qemu: &QemuClient,
    src_raw: &Path,
) -> String {
    let source = format!("driver=raw,file.filename={}", src_raw.display());
    let cmp = served(what, srv, &mut qemu.qemu_img("compare", &[&source]));
    assert_eq!(cmp.trim(), "Images are identical.", "{kind:?}: {what}");
    cmp.trim().to_owned()
}

fn served(what: &str, srv: &mut Server, cmd: &mut Command) -> String {
    let out = output(cmd);
    if !out.status.success() {
        panic!(
            "{:?}: {what}: the client was not served\n{}\n--- server log ---\n{}",
            srv.kind,
            describe_failure(cmd, &out),
            srv.log()
        );
    }
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// A client that must be refused, by the server and promptly (not by our
/// timeout: that would be a server that never answered). Returns stderr.
fn refused(what: &str, srv: &mut Server, cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        !out.status.success(),
        "{:?}: {what}: the client should have been refused, it was served\n{}",
        srv.kind,
        describe_failure(cmd, &out)
    );
    assert_ne!(
        out.status.code(),
        Some(124),
        "{:?}: {what}: no answer within {CLIENT_TIMEOUT_SECS}s (a connection slot leaked?)\n{}\n--- server log ---\n{}",
        srv.kind,
        describe_failure(cmd, &out),
        srv.log()
    );
    no_panic(srv);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn nbdinfo_size(uri: &str) -> Command {
    let mut c = bounded("nbdinfo");
    c.args(["--size", uri]);
    c
}

/// The server lives, and no connection task panicked (the runtime would
/// catch that: the process lives on, but the log says so).
fn no_panic(srv: &mut Server) {
    srv.assert_alive();
    let log = srv.log();
    assert!(
        !log.contains("panicked"),
        "{:?}: the server log reports a panic\n--- log ---\n{log}",
        srv.kind
    );
}

/// The next good x509 client is served (on servers with no spare slot,
/// this is the check that the slot of whatever came before was freed).
fn next_good_client(srv: &mut Server) {
    let uri = x509_uri(srv, &cert("client"));
    let size = served("the next good client", srv, &mut nbdinfo_size(&uri));
    assert_eq!(
        size.trim(),
        SIZE.to_string(),
        "{:?}: nbdinfo --size",
        srv.kind
    );
    no_panic(srv);
}

// ---------------------------------------------------------------------------
// 1. x509: the data, maps, a copy and a write over TLS.

fn x509_roundtrip(kind: Kind, tcp: bool) -> String {
    let dir = temp_dir();
    let (src, src_raw) = make_image(dir.path());
    let img = image_for(kind, &src, dir.path());

    // The plaintext export's map, the one TLS must not change.
    let plain_map = {
        let mut srv = serve(kind, &img, None, 1, tcp);
        let plain = QemuClient::plain(&srv);
        served(
            "plaintext qemu-img map",
            &mut srv,
            &mut plain.qemu_img("map", &["--output=json"]),
        )
    };

    let mut srv = serve(kind, &img, Some(TlsOpts::x509(&cert("server"))), 2, tcp);
    let client = cert("client");
    let uri = x509_uri(&srv, &client);
    let qemu = QemuClient::x509(&srv, &client);
    let mut t = String::new();

    let info = served("nbdinfo over TLS", &mut srv, bounded("nbdinfo").arg(&uri));
    assert!(
        info.contains("protocol: newstyle-fixed with TLS"),
        "{kind:?}: nbdinfo does not report TLS:\n{info}"
    );
    assert!(
        info.contains(&format!("export-size: {SIZE} ")),
        "{kind:?}: nbdinfo's export size:\n{info}"
    );

    let cmp = compare_identical(kind, "qemu-img compare over TLS", &mut srv, &qemu, &src_raw);
    t += &format!("compare: {cmp}\n");

    let tls_map = served(
        "qemu-img map over TLS",
        &mut srv,
        &mut qemu.qemu_img("map", &["--output=json"]),
    );
    assert_eq!(
        tls_map, plain_map,
        "{kind:?}: qemu-img map over TLS (left) differs from the plaintext export's (right)"
    );
    t += &format!("map:\n{tls_map}");

    let copy = dir.path().join("copy.raw");
    served(
        "nbdcopy over TLS",
        &mut srv,
        bounded("nbdcopy").arg(&uri).arg(&copy),
    );
    let (want, got) = (sha256(&src_raw), sha256(&copy));
    assert_eq!(
        got, want,
        "{kind:?}: sha256 of nbdcopy's copy over TLS (left) and of the image (right)"
    );
    t += &format!("nbdcopy sha256: {got}\n");

    let wrote = served(
        "qemu-io write over TLS",
        &mut srv,
        &mut qemu.qemu_io(&["write -P 0x3c 3M 128k"]),
    );
    assert!(
        wrote.contains("wrote 131072/131072 bytes at offset 3145728"),
        "{kind:?}: qemu-io write over TLS:\n{wrote}"
    );
    // Read back on a new connection, then the whole export against the
    // image with the same write.
    let read = served(
        "qemu-io read over TLS",
        &mut srv,
        &mut qemu.qemu_io(&["read -P 0x3c 3M 128k", "read -P 0x5a 1M 1M"]),
    );
    assert!(
        !read.contains("Pattern verification failed") && read.matches("read ").count() == 2,
        "{kind:?}: reading back over TLS what was written over TLS:\n{read}"
    );
    run(bounded("qemu-io")
        .args(["-f", "raw"])
        .arg(&src_raw)
        .args(["-c", "write -P 0x3c 3M 128k"]));
    let copy2 = dir.path().join("copy2.raw");
    served(
        "nbdcopy after the write",
        &mut srv,
        bounded("nbdcopy").arg(&uri).arg(&copy2),
    );
    let (want, got) = (sha256(&src_raw), sha256(&copy2));
    assert_eq!(
        got, want,
        "{kind:?}: after the write, sha256 of the export (left) and of the expected data (right)"
    );
    t += &format!("after the write, nbdcopy sha256: {got}\n");

    // Bulk writes and reads on two connections at once, many requests in
    // flight on each.
    let random = dir.path().join("random.raw");
    common::random_file(&random, SIZE);
    served(
        "nbdcopy of random data to the export over TLS, 2 connections",
        &mut srv,
        bounded("nbdcopy")
            .args(["--connections=2", "--requests=64"])
            .arg(&random)
            .arg(&uri),
    );
    let back = dir.path().join("back.raw");
    served(
        "nbdcopy of the export over TLS, 2 connections",
        &mut srv,
        bounded("nbdcopy")
            .args(["--connections=2", "--requests=64"])
            .arg(&uri)
            .arg(&back),
    );
    assert!(
        sha256(&back) == sha256(&random),
        "{kind:?}: what nbdcopy wrote over TLS on 2 connections did not read back the same"
    );
    t += "bulk write and read back on 2 connections: same\n";
    no_panic(&mut srv);
    t
}

#[test]
fn x509_over_a_unix_socket_reads_maps_copies_and_writes() {
    on_each_server("x509 over a unix socket", |kind| {
        x509_roundtrip(kind, false)
    });
}

#[test]
fn x509_over_tcp_reads_maps_copies_and_writes() {
    on_each_server("x509 over TCP", |kind| x509_roundtrip(kind, true));
}

// ---------------------------------------------------------------------------
// 2. PSK.

#[test]
fn psk_right_key_is_served_wrong_key_and_unknown_user_are_refused() {
    let dir = temp_dir();
    let (src, src_raw) = make_image(dir.path());
    on_each_server("PSK", |kind| {
        let img = image_for(kind, &src, dir.path());
        let mut srv = serve(kind, &img, Some(TlsOpts::psk(&cert("psk"))), 1, false);
        let alice = psk_uri(srv.socket(), "alice", "psk");
        let alice_wrong = psk_uri(srv.socket(), "alice", "psk-wrong");
        let mut t = String::new();

        let size = served(
            "nbdinfo with alice's key",
            &mut srv,
            &mut nbdinfo_size(&alice),
        );
        assert_eq!(size.trim(), SIZE.to_string(), "{kind:?}: nbdinfo --size");
        t += &format!("alice, nbdinfo: {}\n", size.trim());

        let qemu = QemuClient::psk(&srv, "alice", "psk");
        let what = "qemu-img compare with alice's key";
        let cmp = compare_identical(kind, what, &mut srv, &qemu, &src_raw);
        t += &format!("alice, qemu-img compare: {cmp}\n");

        let err = refused(
            "nbdinfo with a wrong key for alice",
            &mut srv,
            &mut nbdinfo_size(&alice_wrong),
        );
        t += &format!("alice with a wrong key: refused\n# {err}\n");

        let bob = QemuClient::psk(&srv, "bob", "psk-bob");
        let err = refused(
            "qemu-img as bob, whom the server does not know",
            &mut srv,
            &mut bob.qemu_img("info", &[]),
        );
        t += &format!("bob: refused\n# {err}\n");

        let size = served(
            "nbdinfo with alice's key, after the refusals",
            &mut srv,
            &mut nbdinfo_size(&alice),
        );
        assert_eq!(size.trim(), SIZE.to_string(), "{kind:?}: nbdinfo --size");
        t += "alice again: served\n";
        no_panic(&mut srv);
        t
    });
}

// ---------------------------------------------------------------------------
// 3. Refusals.

/// What qemu-nbd answers, before TLS, to every option but STARTTLS.
fn tls_reqd(label: &str, opt: u32) -> String {
    let text = format!("Option {opt:#x} not permitted before TLS");
    format!(
        "{label}: reply opt={opt:#x} type=0x80000005 len={} text='{text}'",
        text.len()
    )
}

#[test]
fn plaintext_clients_get_tls_reqd_on_every_option() {
    let dir = temp_dir();
    let (src, _) = make_image(dir.path());
    on_each_server("plaintext clients", |kind| {
        let img = image_for(kind, &src, dir.path());
        let mut srv = serve(kind, &img, Some(TlsOpts::x509(&cert("server"))), 1, false);
        let sock = srv.socket().display().to_string();
        let plain = common::unix_uri(EXPORT, srv.socket());
        let mut t = String::new();

        let err = refused(
            "plaintext nbdinfo",
            &mut srv,
            bounded("nbdinfo").arg(&plain),
        );
        t += &format!("nbdinfo: {}\n", err.replace(&sock, "SOCK"));
        let err = refused(
            "plaintext qemu-img info",
            &mut srv,
            bounded("qemu-img").args(["info", &plain]),
        );
        t += &format!("qemu-img: {}\n", err.replace(&sock, "SOCK"));

        let raw = run_py(
            "nbd_tls_raw.py",
            &[
                "refusals",
                &srv.address(),
                cert("client").to_str().expect("utf-8 path"),
            ],
        );
        let expected = [
            tls_reqd("LIST", 3),
            tls_reqd("LIST with a payload", 3),
            tls_reqd("INFO", 6),
            tls_reqd("GO", 7),
            tls_reqd("STRUCTURED_REPLY", 8),
            tls_reqd("LIST_META_CONTEXT", 9),
            tls_reqd("SET_META_CONTEXT", 10),
            tls_reqd("EXTENDED_HEADERS", 11),
            tls_reqd("unknown option 99", 99),
            tls_reqd("unknown option 0x7fffffff with a payload", 0x7fff_ffff),
            tls_reqd("ABORT", 2),
            "after ABORT: closed".into(),
            "EXPORT_NAME: closed".into(),
            "STARTTLS with a payload: reply opt=0x5 type=0x80000003 len=39 text=\"option 'starttls' has unexpected length\"".into(),
            "after STARTTLS with a payload: closed".into(),
            tls_reqd("STRUCTURED_REPLY before STARTTLS", 8),
            "STARTTLS: reply opt=0x5 type=0x1 len=0 text=''".into(),
            "TLS handshake: done".into(),
            "STARTTLS again over TLS: reply opt=0x5 type=0x80000003 len=19 text='TLS already enabled'".into(),
            "STRUCTURED_REPLY over TLS: reply opt=0x8 type=0x1 len=0".into(),
            "LIST over TLS: reply opt=0x3 type=0x2 len=7".into(),
            "LIST over TLS: reply opt=0x3 type=0x1 len=0".into(),
            "ABORT over TLS: reply opt=0x2 type=0x1 len=0".into(),
            "STARTTLS: reply opt=0x5 type=0x1 len=0 text=''".into(),
            format!("EXPORT_NAME over TLS: size={SIZE} flags="),
            "read over TLS: magic=0x67446698 error=0 handle=1 data=5a5a5a5a5a5a5a5a...512 bytes"
                .into(),
            "after DISC over TLS: closed".into(),
        ];
        let lines: Vec<&str> = raw
            .lines()
            .filter(|l| !l.starts_with("# "))
            .skip(1)
            .collect();
        assert_eq!(
            lines.len(),
            expected.len(),
            "{kind:?}: raw transcript has {} lines, expected {}:\n{raw}",
            lines.len(),
            expected.len()
        );
        for (line, want) in lines.iter().zip(&expected) {
            assert!(
                line.starts_with(want.as_str()),
                "{kind:?}: raw transcript line\n  {line}\ndoes not start with\n  {want}\n--- transcript ---\n{raw}"
            );
        }
        t += &raw;
        next_good_client(&mut srv);
        t
    });
}

#[test]
fn certificates_from_another_ca_and_no_certificate_are_refused() {
    let dir = temp_dir();
    let (src, _) = make_image(dir.path());
    on_each_server("x509 client verification", |kind| {
        let img = image_for(kind, &src, dir.path());
        let mut srv = serve(kind, &img, Some(TlsOpts::x509(&cert("server"))), 1, false);
        let mut t = String::new();
        for (what, sub) in [
            ("a client certificate another CA signed", "rogue"),
            ("no client certificate", "noclient"),
        ] {
            let uri = x509_uri(&srv, &cert(sub));
            let err = refused(what, &mut srv, &mut nbdinfo_size(&uri));
            t += &format!("nbdinfo, {what}: refused\n# {err}\n");
        }
        let rogue = QemuClient::x509(&srv, &cert("rogue"));
        let err = refused(
            "qemu-img with the other CA's certificate",
            &mut srv,
            &mut rogue.qemu_img("info", &[]),
        );
        t += &format!("qemu-img, another CA: refused\n# {err}\n");
        next_good_client(&mut srv);
        t += "the next good client: served\n";
        t
    });
}

#[test]
fn verify_peer_off_serves_a_client_without_certificate_and_priority_limits_versions() {
    let dir = temp_dir();
    let (src, _) = make_image(dir.path());
    on_each_server("tls-creds-x509 options", |kind| {
        let img = image_for(kind, &src, dir.path());
        let mut t = String::new();
        let tls = TlsOpts::creds(format!(
            "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=off",
            cert("server").display()
        ));
        let mut srv = serve(kind, &img, Some(tls), 1, false);
        let uri = x509_uri(&srv, &cert("noclient"));
        let size = served(
            "verify-peer=off, a client without certificate",
            &mut srv,
            &mut nbdinfo_size(&uri),
        );
        assert_eq!(size.trim(), SIZE.to_string(), "{kind:?}: nbdinfo --size");
        t += "verify-peer=off, no client certificate: served\n";
        drop(srv);

        let tls = TlsOpts::creds(format!(
            "tls-creds-x509,id=tls0,endpoint=server,dir={},priority=NORMAL:-VERS-TLS1.3",
            cert("server").display()
        ));
        let mut srv = serve(kind, &img, Some(tls), 1, false);
        let out = run_py(
            "nbd_tls_raw.py",
            &[
                "version",
                &srv.address(),
                cert("client").to_str().expect("utf-8 path"),
            ],
        );
        assert!(
            out.lines().any(|l| l == "TLS version: TLSv1.2"),
            "{kind:?}: priority=NORMAL:-VERS-TLS1.3 should leave TLS 1.2 only:\n{out}"
        );
        t += &out;
        next_good_client(&mut srv);
        t
    });
}

/// Serves with `authz` and checks that the client certificate is served
/// (`allowed`) or refused; a refused client is refused twice on a server
/// with one slot (the first refusal freed it).
fn authz_case(kind: Kind, src: &Path, authz: &str, allowed: bool) -> String {
    let dir = temp_dir();
    let img = image_for(kind, src, dir.path());
    let tls = TlsOpts::x509(&cert("server")).with_authz(authz);
    let mut srv = serve(kind, &img, Some(tls), 1, false);
    let uri = x509_uri(&srv, &cert("client"));
    if allowed {
        for round in ["first", "second"] {
            let size = served(
                &format!("{authz}: the listed identity, {round} client"),
                &mut srv,
                &mut nbdinfo_size(&uri),
            );
            assert_eq!(size.trim(), SIZE.to_string(), "{kind:?}: nbdinfo --size");
        }
        let qemu = QemuClient::x509(&srv, &cert("client"));
        served(
            &format!("{authz}: qemu-img, the listed identity"),
            &mut srv,
            &mut qemu.qemu_img("info", &[]),
        );
        format!("{authz}: served\n")
    } else {
        let mut t = String::new();
        for round in ["first", "second"] {
            let err = refused(
                &format!("{authz}: an identity not listed ({CLIENT_DN}), {round} client"),
                &mut srv,
                &mut nbdinfo_size(&uri),
            );
            t += &format!("{authz}: refused\n# {err}\n");
        }
        let qemu = QemuClient::x509(&srv, &cert("client"));
        refused(
            &format!("{authz}: qemu-img, an identity not listed"),
            &mut srv,
            &mut qemu.qemu_img("info", &[]),
        );
        no_panic(&mut srv);
        t
    }
}

/// `s` with commas doubled, as QEMU's keyval syntax quotes them.
fn keyval_quote(s: &str) -> String {
    s.replace(',', ",,")
}

#[test]
fn authz_simple_serves_the_identity_it_lists_and_refuses_another() {
    let dir = temp_dir();
    let (src, _) = make_image(dir.path());
    on_each_server("authz-simple", |kind| {
        let listed = format!("authz-simple,id=auth0,identity={}", keyval_quote(CLIENT_DN));
        let other = format!(
            "authz-simple,id=auth0,identity={}",
            keyval_quote("C=GB,O=Tidemark Tests,CN=someone.else")
        );
        authz_case(kind, &src, &listed, true) + &authz_case(kind, &src, &other, false)
    });
}

#[test]
fn authz_list_serves_the_identity_it_allows_and_refuses_others() {
    let dir = temp_dir();
    let (src, _) = make_image(dir.path());
    on_each_server("authz-list", |kind| {
        let rule = |policy: &str, m: &str, format: &str, rule_policy: &str| {
            format!(
                "authz-list,id=auth0,policy={policy},rules.0.match={m},rules.0.policy={rule_policy},rules.0.format={format}"
            )
        };
        let mut t = String::new();
        t += &authz_case(
            kind,
            &src,
            &rule("deny", "*CN=client.tidemark.test", "glob", "allow"),
            true,
        );
        t += &authz_case(
            kind,
            &src,
            &rule("deny", &keyval_quote(CLIENT_DN), "exact", "allow"),
            true,
        );
        t += &authz_case(
            kind,
            &src,
            &rule("deny", "*CN=someone.else", "glob", "allow"),
            false,
        );
        t += &authz_case(
            kind,
            &src,
            &rule("allow", "*CN=client.tidemark.test", "glob", "deny"),
            false,
        );
        t
    });
}

// ---------------------------------------------------------------------------
// 6. Bad input after STARTTLS.

/// A good TLS client, connected (and holding one of the server's two
/// slots) before the bad input, and still working after it.
struct GoodClient {
    script: PyScript,
}

impl GoodClient {
    fn connect(srv: &Server, dir: &Path) -> GoodClient {
        let uri = x509_uri(srv, &cert("client"));
        let script = PyScript::spawn("nbd_tls_client.py", [&uri], dir.join("good-client.err"));
        let mut c = GoodClient { script };
        let line = c.line("connect");
        assert_eq!(line, format!("connected {SIZE}"), "{:?}", srv.kind);
        c
    }

    fn line(&mut self, what: &str) -> String {
        self.script.lines.recv_timeout(LINE_WAIT).unwrap_or_else(|e| {
            panic!(
                "the good client printed nothing for '{what}' within {LINE_WAIT:?} ({e})\n--- its stderr ---\n{}",
                self.script.stderr()
            )
        })
    }

    fn check(&mut self, offset: u64, byte: u8) {
        use std::io::Write;
        let stdin = self.script.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "check {offset} {byte:02x}").expect("write to the good client");
        stdin.flush().unwrap();
        let line = self.line("check");
        assert_eq!(
            line,
            "ok",
            "the good client's write/read back\n--- its stderr ---\n{}",
            self.script.stderr()
        );
    }

    fn finish(mut self) {
        self.script.stdin = None;
        let line = self.line("disconnect");
        assert_eq!(line, "bye", "{}", self.script.stderr());
    }
}

/// One bad input on a server with two slots, a good client holding the
/// other: the bad connection ends, the good client keeps working, and the
/// next good client gets the freed slot. Returns the raw script's lines.
fn bad_input(kind: Kind, mode: &str, check: impl Fn(&str)) -> String {
    let dir = temp_dir();
    let (src, _) = make_image(dir.path());
    let img = image_for(kind, &src, dir.path());
    let mut srv = serve(kind, &img, Some(TlsOpts::x509(&cert("server"))), 2, false);
    let mut good = GoodClient::connect(&srv, dir.path());

    let out = run_py(
        "nbd_tls_raw.py",
        &[
            mode,
            &srv.address(),
            cert("client").to_str().expect("utf-8 path"),
        ],
    );
    no_panic(&mut srv);
    check(&out);

    good.check(2 << 20, 0x77);
    next_good_client(&mut srv);
    good.check(2 << 20, 0x78);
    good.finish();
    no_panic(&mut srv);
    out
}

/// The seconds in the raw script's "# LABEL: after N.Ns" line.
fn seconds_after(out: &str, label: &str) -> f64 {
    let prefix = format!("# {label}: after ");
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no '{prefix}' line in:\n{out}"));
    line.trim_end_matches('s')
        .parse()
        .unwrap_or_else(|e| panic!("'{line}': {e}"))
}

/// Garbage and truncated input must end the connection at once, not at
/// the handshake limit.
fn closed_promptly(kind: Kind, out: &str, label: &str) {
    assert!(
        out.lines().any(|l| l == format!("{label}: closed")),
        "{kind:?}: the server did not close the connection after {label}:\n{out}"
    );
    let secs = seconds_after(out, label);
    assert!(
        secs < 5.0,
        "{kind:?}: the server took {secs}s to close after {label} (the handshake limit, not the error, ended it?):\n{out}"
    );
}

#[test]
fn garbage_after_starttls_closes_that_connection_only() {
    on_each_server("garbage after STARTTLS", |kind| {
        bad_input(kind, "garbage", |out| closed_promptly(kind, out, "garbage"))
    });
}

#[test]
fn a_truncated_client_hello_closes_that_connection_only() {
    on_each_server("a truncated ClientHello", |kind| {
        bad_input(kind, "truncated", |out| {
            closed_promptly(kind, out, "truncated ClientHello")
        })
    });
}

#[test]
fn a_tls12_renegotiation_is_refused_and_harms_nobody() {
    on_each_server("a TLS 1.2 renegotiation", |kind| {
        bad_input(kind, "renegotiate", |out| {
            for want in [
                "TLS handshake: TLSv1.2",
                "STRUCTURED_REPLY over TLS: opt=0x8 type=0x1",
                "renegotiation: failed",
            ] {
                assert!(
                    out.lines().any(|l| l == want),
                    "{kind:?}: no line '{want}' in:\n{out}"
                );
            }
            closed_promptly(kind, out, "after the failed renegotiation");
        })
    });
}

/// Closed at the handshake limit: 10 s after the connection, whatever the
/// client did or did not do by then.
fn closed_at_the_limit(kind: Kind, out: &str, label: &str) {
    assert!(
        out.lines().any(|l| l == format!("{label}: closed")),
        "{kind:?}: {label}: the connection was not closed:\n{out}"
    );
    let secs = seconds_after(out, label);
    assert!(
        (8.0..=15.0).contains(&secs),
        "{kind:?}: {label}: closed {secs}s after the connection; the limit is 10s:\n{out}"
    );
}

#[test]
fn stalled_handshakes_are_closed_at_the_handshake_limit() {
    // Ten seconds for each run: all of them side by side. "stall": STARTTLS
    // and then no ClientHello; "idle": a TLS handshake and then no option.
    let runs: Vec<(Kind, &str, &str)> = kinds()
        .into_iter()
        .flat_map(|k| {
            [
                (k, "stall", "stalled handshake"),
                (k, "idle", "idle after the TLS handshake"),
            ]
        })
        .collect();
    let seen: Vec<(Kind, &str, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = runs
            .iter()
            .map(|&(kind, mode, label)| {
                s.spawn(move || {
                    let out = bad_input(kind, mode, |out| closed_at_the_limit(kind, out, label));
                    (kind, mode, out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    for mode in ["stall", "idle"] {
        let same: Vec<(Kind, String)> = seen
            .iter()
            .filter(|(_, m, _)| *m == mode)
            .map(|(k, _, out)| (*k, out.clone()))
            .collect();
        same_transcripts(mode, &same);
    }
}

// ---------------------------------------------------------------------------
// Configurations qemu-nbd refuses at startup.

#[test]
fn startup_refuses_the_tls_configurations_qemu_nbd_refuses() {
    let dir = temp_dir();
    let (src, _) = make_image(dir.path());
    let server = cert("server");
    let client = cert("client");
    let x509 = |d: &Path, endpoint: &str| {
        format!(
            "tls-creds-x509,id=tls0,endpoint={endpoint},dir={}",
            d.display()
        )
    };
    // (arguments, the message qemu-nbd gives; a server must give it too).
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--tls-creds".into(), "nosuch".into()],
            "No TLS credentials with id 'nosuch'",
        ),
        (
            vec![
                "--object".into(),
                x509(&client, "client"),
                "--tls-creds".into(),
                "tls0".into(),
            ],
            "Expected TLS credentials for a server endpoint",
        ),
        (
            vec![
                "--object".into(),
                "authz-simple,id=tls0,identity=x".into(),
                "--tls-creds".into(),
                "tls0".into(),
            ],
            "Object with id 'tls0' is not TLS credentials",
        ),
        (
            vec![
                "--object".into(),
                x509(Path::new("/nonexistent"), "server"),
                "--tls-creds".into(),
                "tls0".into(),
            ],
            "Unable to access credentials /nonexistent/ca-cert.pem: No such file or directory",
        ),
        (
            vec![
                "--object".into(),
                format!(
                    "tls-creds-x509,id=tls0,endpoint=server,dir={}",
                    client.display()
                ),
                "--tls-creds".into(),
                "tls0".into(),
            ],
            "server-cert.pem: No such file or directory",
        ),
        (
            vec![
                "--object".into(),
                x509(&server, "server"),
                "--object".into(),
                format!("authz-simple,id=auth0,identity={}", keyval_quote(CLIENT_DN)),
                "--tls-authz".into(),
                "auth0".into(),
            ],
            "--tls-authz is not permitted without --tls-creds",
        ),
    ];
    for kind in kinds() {
        let img = image_for(kind, &src, dir.path());
        for (args, message) in &cases {
            let sock = dir.path().join(format!("{kind:?}.sock"));
            // A server that accepts the configuration serves until the
            // timeout (5 s): exit status 124.
            let mut cmd = Command::new("timeout");
            cmd.args(["-k", "2", "5"]);
            match kind {
                Kind::QemuNbd => cmd.arg("qemu-nbd"),
                Kind::Tidemark => cmd.arg(common::TIDEMARK).arg("serve"),
            };
            cmd.args(args)
                .arg("-k")
                .arg(&sock)
                .args(["-f", "qcow2", "-x", EXPORT])
                .arg(&img);
            let out = output(&mut cmd);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{kind:?} should refuse to start with {args:?} ({message}):\n{}",
                describe_failure(&cmd, &out)
            );
            assert!(
                stderr.contains(message),
                "{kind:?}: refusing {args:?}, stderr does not say '{message}':\n{}",
                describe_failure(&cmd, &out)
            );
        }
    }
}

/// TLS connections keep tidemark's memory bound: six clients each ask for
/// 32 whole-export reads (3 GiB of replies in all) and read none, and the
/// server stays small while a good client writes and reads back. Their
/// replies wait in each connection's share (see nbd/budget.rs), not in
/// the writer task's queue.
#[test]
fn tls_clients_that_stop_reading_hold_only_their_share() {
    let dir = temp_dir();
    let (src, _) = make_image(dir.path());
    let img = image_for(Kind::Tidemark, &src, dir.path());
    let srv = serve(
        Kind::Tidemark,
        &img,
        Some(TlsOpts::x509(&cert("server"))),
        8,
        false,
    );
    let address = srv.address();
    let certdir = cert("client");
    let mut stuck: Vec<PyScript> = (0..6)
        .map(|i| {
            PyScript::spawn(
                "nbd_tls_raw.py",
                [
                    "noread",
                    &address,
                    &certdir.display().to_string(),
                    "32",
                    &SIZE.to_string(),
                ],
                dir.path().join(format!("noread-{i}.err")),
            )
        })
        .collect();
    for (i, s) in stuck.iter_mut().enumerate() {
        let sent =
            std::iter::from_fn(|| s.lines.recv_timeout(LINE_WAIT).ok()).find(|l| l == "sent");
        assert!(sent.is_some(), "stuck client {i}:\n{}", s.stderr());
    }
    let mut good = GoodClient::connect(&srv, dir.path());
    good.check(SIZE / 2, 0x5c);
    good.check(4096, 0xa3);
    good.finish();
    let used = rss(srv.pid());
    eprintln!("server RSS with 6 stuck TLS clients: {} MiB", used >> 20);
    assert!(
        used < 320 << 20,
        "server RSS {} MiB with 6 TLS clients that stop reading",
        used >> 20
    );
    for mut s in stuck {
        s.stdin = None;
        let _ = wait_with_deadline(&mut s.child, Duration::from_secs(20));
    }
}
