//! The NBD handshake and option parser: the input is everything a client
//! sends from the first byte (client flags, then options), fed to the
//! server's real `negotiate` through an in-memory stream. An odd first
//! byte runs it as a server that requires TLS (the rest is the input).

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tidemark::nbd::export::ExportTable;
use tidemark::nbd::handshake::{negotiate, Tls};

#[path = "../common/nbd.rs"]
mod common;

fn exports() -> &'static ExportTable {
    static T: OnceLock<ExportTable> = OnceLock::new();
    T.get_or_init(|| {
        let t = ExportTable::new();
        t.add(common::export("", false)).expect("export");
        t.add(common::export("ro", true)).expect("export");
        t
    })
}

fuzz_target!(|data: &[u8]| {
    let exports = exports();
    common::runtime().block_on(async {
        let (tls, mut r) = match data.split_first() {
            Some((b, rest)) if b & 1 == 1 => (Tls::Required, rest),
            _ => (Tls::Off, data),
        };
        let mut w = Vec::new();
        // Any outcome is fine; a panic, a hang or a huge allocation is not.
        let _ = negotiate(&mut r, &mut w, exports, tls).await;
        // The server never writes more than it was asked for plus replies
        // of bounded size: a sanity bound on amplification.
        assert!(w.len() <= 64 * 1024 + data.len() * 256);
    });
});
