//! tidemark's own NBD client (src/nbd/client.rs) against qemu-nbd, the
//! reference server, and against tidemark: the same session must give the
//! same bytes, the same errors and a well-formed map on both, in structured
//! and in extended-header mode.

mod common;

use std::path::Path;

use common::{sparse_file, temp_dir, Kind, ServeOpts, Server};
use tidemark::nbd::client::{list_exports, ClientError, ConnectOptions, NbdClient};
use tidemark::nbd::proto::{Mode, CMD_FLAG_FUA, CMD_FLAG_REQ_ONE, EINVAL};

const SIZE: u64 = 8 << 20;

/// What one session saw: bytes read back and the base:allocation map.
#[derive(Debug, PartialEq)]
struct Seen {
    /// Whether the first 256 KiB read back as the test's model says.
    data_as_written: bool,
    map_total: u64,
    data_at_write: bool,
    /// The server's errno for read, write, zero, trim and cache past the end.
    past_end: Vec<u32>,
}

fn errno_of<T: std::fmt::Debug>(what: &str, r: Result<T, ClientError>) -> u32 {
    match r {
        Err(ClientError::Server { errno, .. }) => errno,
        other => panic!("{what} past the end: {other:?}"),
    }
}

async fn session(socket: &Path, extended: bool) -> Seen {
    let opts = ConnectOptions {
        export: String::new(),
        extended_headers: extended,
        meta_contexts: vec!["base:allocation".into()],
        tls: None,
    };
    let mut c = NbdClient::connect_unix(socket, &opts)
        .await
        .expect("connect");
    let want = if extended {
        Mode::Extended
    } else {
        Mode::Structured
    };
    assert_eq!(c.mode(), want);
    assert_eq!(c.size(), SIZE);
    assert_eq!(c.contexts(), &[(0, "base:allocation".to_string())]);

    let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + 3) as u8).collect();
    c.write(4096 + 17, &payload, CMD_FLAG_FUA)
        .await
        .expect("write");
    c.write_zeroes(4096 + 1000, 5000, 0).await.expect("zero");
    c.flush().await.expect("flush");
    let data = c.read(0, 256 << 10, 0).await.expect("read");

    let mut expected = vec![0u8; 256 << 10];
    expected[4113..4113 + payload.len()].copy_from_slice(&payload);
    expected[5096..10096].fill(0);
    let data_as_written = data == expected;

    let map = c.block_status(0, SIZE, 0).await.expect("block status");
    assert_eq!(map.len(), 1, "one chunk per selected context");
    let (id, descs) = &map[0];
    assert_eq!(*id, 0);
    assert!(descs.iter().all(|d| d.len > 0), "no empty descriptor");
    let map_total: u64 = descs.iter().map(|d| d.len).sum();
    let data_at_write = descs.first().is_some_and(|d| d.flags & 1 == 0) || descs.len() > 1;

    let one = c
        .block_status(0, SIZE, CMD_FLAG_REQ_ONE)
        .await
        .expect("req_one");
    assert_eq!(one[0].1.len(), 1, "REQ_ONE gives exactly one descriptor");
    assert!(one[0].1[0].len <= SIZE);

    let end = SIZE - 512;
    let past_end = vec![
        errno_of("read", c.read(end, 4096, 0).await),
        errno_of("write", c.write(end, &[1u8; 4096], 0).await),
        errno_of("zero", c.write_zeroes(end, 4096, 0).await),
        errno_of("trim", c.trim(end, 4096, 0).await),
        errno_of("cache", c.cache(end, 4096).await),
    ];
    // The connection survives refused requests.
    assert_eq!(
        c.read(0, 16, 0).await.expect("read after errors"),
        expected[..16]
    );
    c.disconnect().await.expect("disconnect");
    Seen {
        data_as_written,
        map_total,
        data_at_write,
        past_end,
    }
}

fn serve(kind: Kind, dir: &Path, name: &str) -> Server {
    let img = dir.join(name);
    sparse_file(&img, SIZE);
    let opts = ServeOpts {
        max_connections: Some(4),
        ..ServeOpts::read_write()
    };
    Server::start(kind, &img, &opts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_client_sees_the_same_session_on_qemu_nbd_and_tidemark() {
    let dir = temp_dir();
    for extended in [false, true] {
        let qemu = serve(Kind::QemuNbd, dir.path(), &format!("q{extended}.raw"));
        let ours = serve(Kind::Tidemark, dir.path(), &format!("t{extended}.raw"));
        let reference = session(qemu.socket(), extended).await;
        let seen = session(ours.socket(), extended).await;
        assert!(reference.data_as_written, "{reference:?}");
        assert_eq!(reference.past_end, vec![EINVAL; 5], "{reference:?}");
        assert_eq!(reference.map_total, SIZE);
        assert!(reference.data_at_write);
        assert_eq!(seen, reference, "extended headers: {extended}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_client_lists_exports_with_descriptions() {
    let dir = temp_dir();
    let img = dir.path().join("l.raw");
    sparse_file(&img, SIZE);
    let opts = ServeOpts {
        export_name: "disk0".into(),
        description: Some("first disk".into()),
        ..ServeOpts::read_only()
    };
    for kind in [Kind::QemuNbd, Kind::Tidemark] {
        let srv = Server::start(kind, &img, &opts);
        let stream = tokio::net::UnixStream::connect(srv.socket())
            .await
            .expect("connect");
        let list = list_exports(stream).await.expect("list");
        assert_eq!(
            list,
            vec![("disk0".to_string(), "first disk".to_string())],
            "{kind:?}"
        );
    }
}

/// What a TLS session saw: data back, and the map's extent count.
async fn tls_session<S>(c: &mut NbdClient<S>) -> (Vec<u8>, usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let payload: Vec<u8> = (0..70_000u32).map(|i| (i * 13 + 1) as u8).collect();
    c.write(8192, &payload, CMD_FLAG_FUA).await.expect("write");
    let data = c.read(8192, payload.len() as u32, 0).await.expect("read");
    assert_eq!(data, payload, "read back over TLS");
    let map = c.block_status(0, SIZE, 0).await.expect("block status");
    (data, map[0].1.len())
}

/// tidemark's client over TLS: x509 on a unix socket, x509 over TCP with
/// the server's name checked, and PSK, against qemu-nbd and tidemark. A
/// client without TLS gets TLS_REQD, and a server whose certificate is not
/// for the host named is refused, by both servers alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_client_speaks_tls_to_qemu_nbd_and_tidemark() {
    use common::{free_tcp_port, run, TlsOpts};
    use std::sync::Arc;
    use tidemark::nbd::client::ClientTls;
    use tidemark::nbd::proto::REP_ERR_TLS_REQD;
    use tidemark::tls::{Endpoint, PskOptions, TlsCreds, X509Options};

    let dir = temp_dir();
    let certs = dir.path().join("certs");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls/gen-certs.sh");
    run(std::process::Command::new("sh").arg(script).arg(&certs));
    let x509 = Arc::new(
        TlsCreds::x509(&X509Options {
            dir: certs.join("client"),
            endpoint: Endpoint::Client,
            verify_peer: true,
            priority: None,
            sanity_check: true,
            key_password: None,
        })
        .expect("client x509 creds"),
    );
    let psk = Arc::new(
        TlsCreds::psk(&PskOptions {
            dir: certs.join("psk"),
            endpoint: Endpoint::Client,
            username: Some("alice".into()),
            priority: None,
        })
        .expect("client psk creds"),
    );
    let with = |creds: &Arc<TlsCreds>, hostname: Option<&str>| ConnectOptions {
        meta_contexts: vec!["base:allocation".into()],
        tls: Some(ClientTls {
            creds: creds.clone(),
            hostname: hostname.map(str::to_owned),
        }),
        ..Default::default()
    };
    let mut seen = Vec::new();
    for kind in [Kind::QemuNbd, Kind::Tidemark] {
        let mut row = Vec::new();
        // x509 on a unix socket; a client without TLS is refused first.
        let img = dir.path().join(format!("{kind:?}-x.raw"));
        sparse_file(&img, SIZE);
        let opts = ServeOpts {
            max_connections: Some(4),
            tls: Some(TlsOpts::x509(&certs.join("server"))),
            ..ServeOpts::read_write()
        };
        let srv = Server::start(kind, &img, &opts);
        match NbdClient::connect_unix(srv.socket(), &ConnectOptions::default()).await {
            Err(ClientError::Server { errno, .. }) => row.push(format!("plain: {errno:#x}")),
            other => panic!("{kind:?}: plaintext client: {:?}", other.map(|_| ())),
        }
        let mut c = NbdClient::connect_unix(srv.socket(), &with(&x509, None))
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: x509 over unix: {e}"));
        row.push(format!("x509 unix: {:?}", tls_session(&mut c).await.1));
        drop(c);
        drop(srv);

        // x509 over TCP: the certificate is for 127.0.0.1, not wrong.example.
        let img = dir.path().join(format!("{kind:?}-t.raw"));
        sparse_file(&img, SIZE);
        let opts = ServeOpts {
            tcp_port: Some(free_tcp_port()),
            ..opts.clone()
        };
        let srv = Server::start(kind, &img, &opts);
        let addr = srv.tcp_addr().expect("tcp address").to_string();
        let mut c = NbdClient::connect_tcp(&addr, &with(&x509, None))
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: x509 over tcp: {e}"));
        row.push(format!("x509 tcp: {:?}", tls_session(&mut c).await.1));
        drop(c);
        let wrong = NbdClient::connect_tcp(&addr, &with(&x509, Some("wrong.example"))).await;
        row.push(format!("wrong host refused: {}", wrong.is_err()));
        drop(srv);

        // PSK.
        let img = dir.path().join(format!("{kind:?}-p.raw"));
        sparse_file(&img, SIZE);
        let opts = ServeOpts {
            max_connections: Some(4),
            tls: Some(TlsOpts::psk(&certs.join("psk"))),
            ..ServeOpts::read_write()
        };
        let srv = Server::start(kind, &img, &opts);
        let mut c = NbdClient::connect_unix(srv.socket(), &with(&psk, None))
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: psk: {e}"));
        row.push(format!("psk: {:?}", tls_session(&mut c).await.1));
        seen.push(row);
    }
    assert_eq!(
        seen[0][0],
        format!("plain: {REP_ERR_TLS_REQD:#x}"),
        "qemu-nbd: {:?}",
        seen[0]
    );
    assert_eq!(seen[0][3], "wrong host refused: true");
    assert_eq!(
        seen[1], seen[0],
        "tidemark's client sees both servers alike"
    );
}
