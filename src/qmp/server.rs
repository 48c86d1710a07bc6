//! QMP over unix sockets: the greeting, capabilities negotiation, framing,
//! dispatch and events. Each connection owns its socket and its framer;
//! whatever one client sends, the worst it gets is error replies on its own
//! connection.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, watch};
use tracing::{debug, info, warn};

use super::commands::{self, misc};
use super::error::QmpError;
use super::json::{parse, to_line, Frame, Framer};
use super::schema::schema;
use crate::accept::AcceptBackoff;
use crate::daemon::Daemon;
use crate::event::Event;

const READ_CHUNK: usize = 64 * 1024;

/// A bound QMP socket, not yet accepting.
pub struct QmpListener {
    listener: UnixListener,
    path: PathBuf,
}

impl QmpListener {
    /// Binds `path`, replacing a stale socket left by a dead daemon.
    pub fn bind(path: &Path) -> io::Result<QmpListener> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        let listener = UnixListener::bind(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("Failed to bind socket to {}: {e}", path.display()),
            )
        })?;
        Ok(QmpListener {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts clients until `stop` turns true, then removes the socket.
    pub async fn run(self, daemon: Arc<Daemon>, mut stop: watch::Receiver<bool>) {
        let mut backoff = AcceptBackoff::new("qmp");
        loop {
            let accepted = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => {
                    backoff.accepted();
                    let d = daemon.clone();
                    tokio::spawn(async move {
                        if let Err(e) = Connection::new(stream, d).run().await {
                            debug!(error = %e, "QMP connection ended");
                        }
                    });
                }
                Err(e) => {
                    if let Some(wait) = backoff.failed(&e) {
                        tokio::select! {
                            _ = stop.wait_for(|s| *s) => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

struct Connection {
    stream: UnixStream,
    daemon: Arc<Daemon>,
    framer: Framer,
    /// Set by qmp_capabilities: the client gets events and may run commands.
    events: Option<broadcast::Receiver<Event>>,
    oob: bool,
}

/// What a request asks for, once its envelope is valid.
struct Request {
    id: Option<Value>,
    name: String,
    args: Map<String, Value>,
    oob: bool,
}

impl Connection {
    fn new(stream: UnixStream, daemon: Arc<Daemon>) -> Self {
        Connection {
            stream,
            daemon,
            framer: Framer::new(),
            events: None,
            oob: false,
        }
    }

    async fn run(mut self) -> io::Result<()> {
        let greeting = json!({"QMP": {"version": misc::version(), "capabilities": ["oob"]}});
        self.stream.write_all(&to_line(&greeting)).await?;
        let mut buf = vec![0u8; READ_CHUNK];
        let mut frames = Vec::new();
        loop {
            let n = tokio::select! {
                n = self.stream.read(&mut buf) => n?,
                ev = next_event(&mut self.events) => {
                    if let Some(ev) = ev {
                        self.stream.write_all(&to_line(&ev.to_json())).await?;
                    }
                    continue;
                }
            };
            if n == 0 {
                return Ok(());
            }
            self.framer.push(&buf[..n], &mut frames);
            for frame in std::mem::take(&mut frames) {
                self.handle(frame).await?;
            }
        }
    }

    async fn handle(&mut self, frame: Frame) -> io::Result<()> {
        let req = match frame {
            Frame::Error(desc) => Err((None, QmpError::generic(desc))),
            Frame::Text(text) => match parse(&text) {
                Err(desc) => Err((None, QmpError::generic(desc))),
                Ok(v) => self.envelope(v),
            },
        };
        let (id, result, quit) = match req {
            Err((id, e)) => (id, Err(e), false),
            Ok(r) => {
                let quit = r.name == "quit";
                let result = self.dispatch(&r).await;
                let ok = result.is_ok();
                (r.id, result, quit && ok)
            }
        };
        let mut reply = match result {
            Ok(v) => json!({ "return": v }),
            Err(e) => json!({"error": {"class": e.class, "desc": e.desc}}),
        };
        if let Some(id) = id {
            reply["id"] = id;
        }
        // Events the command itself caused go out before its reply, as
        // qemu emits them synchronously.
        if let Some(rx) = self.events.as_mut() {
            while let Ok(ev) = rx.try_recv() {
                self.stream.write_all(&to_line(&ev.to_json())).await?;
            }
        }
        self.stream.write_all(&to_line(&reply)).await?;
        if quit {
            // Only now: the client has its reply before the daemon goes.
            info!("quit requested over QMP");
            self.daemon.request_quit();
        }
        Ok(())
    }

    /// Checks the request object itself (not the arguments), with qemu's
    /// texts.
    fn envelope(&self, v: Value) -> Result<Request, (Option<Value>, QmpError)> {
        let Value::Object(mut obj) = v else {
            return Err((None, QmpError::generic("QMP input must be a JSON object")));
        };
        let id = obj.remove("id");
        let fail = |id: &Option<Value>, desc: String| Err((id.clone(), QmpError::generic(desc)));
        let mut name = None;
        let mut oob = false;
        let mut args = Map::new();
        for (k, v) in obj {
            match k.as_str() {
                "execute" | "exec-oob" if name.is_none() && (k == "execute" || self.oob) => {
                    let Value::String(s) = v else {
                        return fail(&id, format!("QMP input member '{k}' must be a string"));
                    };
                    oob = k == "exec-oob";
                    name = Some(s);
                }
                "arguments" => {
                    let Value::Object(m) = v else {
                        return fail(&id, "QMP input member 'arguments' must be an object".into());
                    };
                    args = m;
                }
                _ => return fail(&id, format!("QMP input member '{k}' is unexpected")),
            }
        }
        let Some(name) = name else {
            return fail(&id, "QMP input lacks member 'execute'".into());
        };
        Ok(Request {
            id,
            name,
            args,
            oob,
        })
    }

    async fn dispatch(&mut self, r: &Request) -> Result<Value, QmpError> {
        let negotiated = self.events.is_some();
        if r.name == "qmp_capabilities" {
            // qemu checks the arguments before it looks at the state.
            let cmd = schema()
                .command("qmp_capabilities")
                .ok_or_else(|| QmpError::generic("qmp_capabilities is missing from the schema"))?;
            schema().check_args(cmd, &r.args)?;
            if negotiated {
                return Err(QmpError::command_not_found(
                    "Capabilities negotiation is already complete, command ignored",
                ));
            }
            self.oob = r
                .args
                .get("enable")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|c| c == "oob"));
            self.events = Some(self.daemon.subscribe());
            return Ok(json!({}));
        }
        if !negotiated {
            return Err(QmpError::command_not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        let Some(cmd) = schema().command(&r.name) else {
            return Err(QmpError::command_not_found(format!(
                "The command {} has not been found",
                r.name
            )));
        };
        if r.oob {
            return Err(QmpError::generic(format!(
                "The command {} does not support OOB",
                r.name
            )));
        }
        schema().check_args(cmd, &r.args)?;
        commands::execute(&self.daemon, &r.name, r.args.clone()).await
    }
}

/// The next event for a negotiated client; pends forever before
/// negotiation. A client too slow to keep up loses the oldest events
/// rather than stalling the daemon.
async fn next_event(rx: &mut Option<broadcast::Receiver<Event>>) -> Option<Event> {
    let Some(rx) = rx else {
        return std::future::pending().await;
    };
    loop {
        match rx.recv().await {
            Ok(ev) => return Some(ev),
            Err(RecvError::Lagged(n)) => warn!(lost = n, "QMP client lagging; events dropped"),
            Err(RecvError::Closed) => return std::future::pending().await,
        }
    }
}

/// Serves the monitors until `quit` or `signal`, then shuts down as qsd
/// does: exports and the NBD server go, every node stores its persistent
/// bitmaps, and the monitor sockets are removed.
pub async fn serve_until_quit(
    daemon: Arc<Daemon>,
    monitors: Vec<QmpListener>,
    signal: impl std::future::Future<Output = ()>,
) {
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for m in monitors {
        tasks.spawn(m.run(daemon.clone(), stop_rx.clone()));
    }
    let mut quit = daemon.quit_requested();
    tokio::select! {
        _ = signal => info!("shutting down on signal"),
        _ = quit.wait_for(|q| *q) => info!("shutting down on quit"),
    }
    let _ = stop.send(true);
    // Jobs stop first (they take the command lock to end), as qsd cancels
    // them at exit; then no command runs: a command in flight finishes
    // first, and the ones after it find the daemon closing.
    let d = daemon.clone();
    let _ = tokio::task::spawn_blocking(move || crate::job::cancel_all(&d)).await;
    let _serial = daemon.command_lock.lock().await;
    let d = daemon.clone();
    let _ = tokio::task::spawn_blocking(move || {
        for j in d.jobs() {
            // Jobs that had finished but wait for job-finalize abort.
            let _ = j.cancel(&d, true);
        }
    })
    .await;
    // No NBD server running is the normal case here, not an error.
    let _ = daemon.stop_nbd().await;
    let d = daemon.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || d.close_all()).await {
        warn!(error = %e, "closing the nodes failed");
    }
    while tasks.join_next().await.is_some() {}
}
