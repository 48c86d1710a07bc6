//! `--daemonize`, as qemu-storage-daemon does it: the parent process waits
//! until the daemon is fully set up (every option applied, every socket
//! listening), then exits 0; if the daemon fails first, the parent exits 1.
//! Scripts rely on this to continue only once the daemon is usable.
//!
//! Must run before any thread exists (before the tokio runtime): fork only
//! copies the calling thread.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};

/// Held by the daemon; [`Ready::done`] releases the waiting parent.
pub struct Ready(Option<File>);

impl Ready {
    /// Tells the parent the daemon is ready, and detaches from the
    /// terminal's stdio (qemu points it at /dev/null).
    pub fn done(mut self) {
        if let Some(mut w) = self.0.take() {
            let _ = w.write_all(b"R");
            detach_stdio();
        }
    }

    /// A no-op handle, for when --daemonize was not given.
    pub fn none() -> Ready {
        Ready(None)
    }
}

fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto the standard descriptors with a valid fd.
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(null.as_raw_fd(), 1);
            libc::dup2(null.as_raw_fd(), 2);
        }
    }
}

/// Forks. In the parent this only returns on error: it waits for the
/// child's word and exits. In the child it returns the [`Ready`] handle.
pub fn daemonize() -> io::Result<Ready> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other thread exists yet (see the module notes).
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            drop(r);
            // SAFETY: plain syscall; a new session leaves the terminal.
            unsafe {
                libc::setsid();
            }
            Ok(Ready(Some(File::from(w))))
        }
        _child => {
            drop(w);
            let mut byte = [0u8; 1];
            let ready = matches!(File::from(r).read(&mut byte), Ok(1));
            std::process::exit(if ready { 0 } else { 1 });
        }
    }
}
