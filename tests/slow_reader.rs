//! A client that floods requests but stops reading replies must cost the
//! server only that client's own in-flight budget: other clients keep being
//! served at once, and when the slow client reads again it gets every reply.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::sync::mpsc;
use std::time::Duration;

use common::wire::{Conn, CMD_FLAG_DF, CMD_READ, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA};
use common::{pattern, temp_dir, Kind, ServeOpts, Server};

const SIZE: u64 = 64 << 20;
const READ: u32 = 64 << 10;
const REQUESTS: u64 = 200;
const STUCK: usize = 3;

/// Reads `n` whole structured replies in any order; returns their cookies
/// and checks each data chunk against the image.
fn read_replies(conn: &mut Conn, n: u64, image: &[u8]) -> BTreeSet<u64> {
    let mut cookies = BTreeSet::new();
    let mut head = [0u8; 20];
    for _ in 0..n {
        conn.s.read_exact(&mut head).expect("chunk header");
        let flags = u16::from_be_bytes([head[4], head[5]]);
        let kind = u16::from_be_bytes([head[6], head[7]]);
        let cookie = u64::from_be_bytes(head[8..16].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes")) as usize;
        let mut payload = vec![0u8; len];
        conn.s.read_exact(&mut payload).expect("chunk payload");
        assert_eq!(kind, REPLY_TYPE_OFFSET_DATA, "a DF read is one data chunk");
        assert_ne!(flags & REPLY_FLAG_DONE, 0, "a DF read is one final chunk");
        let off = u64::from_be_bytes(payload[..8].try_into().expect("8 bytes")) as usize;
        assert_eq!(
            &payload[8..],
            &image[off..off + READ as usize],
            "data at {off}"
        );
        assert!(cookies.insert(cookie), "cookie {cookie} answered twice");
    }
    cookies
}

#[test]
fn clients_that_stop_reading_replies_do_not_stall_others() {
    let dir = temp_dir();
    let img = dir.path().join("disk.raw");
    let image = pattern(SIZE as usize, 42);
    std::fs::write(&img, &image).expect("write image");
    let opts = ServeOpts {
        max_connections: Some(16),
        ..ServeOpts::read_write()
    };
    let srv = Server::start(Kind::Tidemark, &img, &opts);

    // Flood: far more reply bytes than any socket buffer holds.
    let mut stuck = Vec::new();
    for _ in 0..STUCK {
        let mut c = Conn::new(srv.connect());
        c.open("");
        for i in 0..REQUESTS {
            c.request(CMD_FLAG_DF, CMD_READ, i + 1, (i % 64) << 20, READ);
        }
        stuck.push(c);
    }

    // Another client is served while those replies pile up.
    let mut fresh = Conn::new(srv.connect());
    let (tx, rx) = mpsc::channel();
    let expected = image[4096..4096 + 65536].to_vec();
    let reader = std::thread::spawn(move || {
        fresh.open("");
        let got = fresh.read_ok(4096, 65536);
        let _ = tx.send(got == expected);
    });
    let served = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("a fresh client was not served while others stopped reading");
    assert!(served, "fresh client read wrong data");
    reader.join().expect("reader thread");

    // The slow clients still get every reply, each exactly once.
    let want: BTreeSet<u64> = (1..=REQUESTS).collect();
    for mut c in stuck {
        c.s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("read timeout");
        assert_eq!(read_replies(&mut c, REQUESTS, &image), want);
    }
}
