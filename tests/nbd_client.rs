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
