//! The replies to requests every server must refuse (past the end, of
//! length 0, too long, bad flags, unknown commands) and to an empty read
//! are qemu-nbd's, byte for byte: error numbers, chunk types and texts, with
//! structured replies and with extended headers.

mod common;

use common::{run_py, sparse_file, temp_dir, Kind, ServeOpts, Server};

#[test]
fn refusals_are_qemu_nbds_to_the_byte() {
    let dir = temp_dir();
    let img = dir.path().join("disk.raw");
    let size = 1u64 << 20;
    sparse_file(&img, size);
    for mode in ["structured", "extended"] {
        let mut transcripts = Vec::new();
        for kind in [Kind::QemuNbd, Kind::Tidemark] {
            let srv = Server::start(kind, &img, &ServeOpts::read_write());
            let sock = srv.socket().to_str().expect("utf-8").to_owned();
            transcripts.push(run_py("nbd_errors.py", &[&sock, &size.to_string(), mode]));
        }
        assert_eq!(transcripts[0].lines().count(), 12, "{}", transcripts[0]);
        assert_eq!(
            transcripts[1], transcripts[0],
            "{mode}: tidemark's replies, then qemu-nbd's"
        );
    }
}
