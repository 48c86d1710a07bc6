//! The transmission phase: request headers, payloads, flags and block
//! status payloads, through the real session over a socket pair (replies
//! go out through the real reply sink). The first input byte picks the
//! negotiated state (header mode, selected contexts, read-only export);
//! the rest is what the client sends after the handshake.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tidemark::nbd::budget::Pool;
use tidemark::nbd::handshake::Negotiated;
use tidemark::nbd::proto::Mode;
use tidemark::nbd::session;
use tidemark::nbd::sink::ReplySink;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

#[path = "../common/nbd.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&state, stream)) = data.split_first() else {
        return;
    };
    let mode = match state & 3 {
        0 => Mode::Simple,
        1 => Mode::Structured,
        _ => Mode::Extended,
    };
    // Context IDs as the handshake hands them out: a subset, in ID order.
    let contexts: Vec<u32> = (0..3).filter(|i| state & (4 << i) != 0).collect();
    let read_only = state & 0x20 != 0;
    let stream = stream.to_vec();
    common::runtime().block_on(async move {
        let export = Arc::new(common::export("", read_only));
        let (server, client) = UnixStream::pair().expect("socketpair");
        let sink = ReplySink::new(&server).expect("reply sink");
        let (mut cr, mut cw) = client.into_split();
        let writer = tokio::spawn(async move {
            let _ = cw.write_all(&stream).await;
            let _ = cw.shutdown().await;
        });
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = cr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
        let neg = Negotiated {
            export,
            mode,
            contexts,
        };
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let pool = Pool::default();
        let _ = session::run(server, sink.clone(), neg, &pool, shutdown).await;
        // Every reply is on the wire once run returns; closing our end of
        // the socket lets a writer blocked on a full socket finish.
        drop(sink);
        let _ = writer.await;
        reader.abort();
    });
});
