//! The tidemark command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use tracing::info;

use tidemark::block::open::{probe, Format};
use tidemark::daemon::Daemon;
use tidemark::nbd::server::Address;
use tidemark::qmp::cmdline::{self, Opt};
use tidemark::qmp::commands::{self, block::serve_options};
use tidemark::qmp::error::QmpError;
use tidemark::qmp::server::{serve_until_quit, QmpListener};
use tidemark::store_point::BitmapPolicy;

/// Serve disk images over NBD and track their changes for incremental backup.
#[derive(Parser)]
#[command(name = "tidemark", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve one image over NBD (the short form of `qemu-nbd`).
    Serve(ServeArgs),
    /// Change an image's persistent bitmaps offline, as `qemu-img bitmap`:
    /// (--add | --remove | --clear | --enable | --disable | --merge SRC
    /// [-b SRCFILE [-F FMT]])... [-g GRANULARITY] [-f FMT] IMAGE NAME.
    /// `--sha256` prints the bitmap's hash as qemu's
    /// x-debug-block-dirty-bitmap-sha256 (a tidemark extension).
    Bitmap {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<String>,
    },
    /// Describe an image as `qemu-img info --output=json`.
    Info(InfoArgs),
    /// Create an image, as `qemu-img create`.
    Create(CreateArgs),
    /// Run as qemu-storage-daemon: --blockdev, --nbd-server, --export,
    /// --chardev socket,id=X,path=P,server=on,wait=off --monitor chardev=X,
    /// --pidfile (keyval or JSON values, as qsd); tidemark's
    /// --bitmap-intent-log on|off and --bitmap-store-interval SECS, as for
    /// `serve`.
    Daemon(DaemonArgs),
    /// Send one QMP command to a running tidemark (or qemu) and print the
    /// reply: SOCKET COMMAND [ARGUMENTS-JSON].
    Qmp(QmpArgs),
}

#[derive(clap::Args)]
struct QmpArgs {
    socket: PathBuf,
    command: String,
    /// The command's arguments, a JSON object.
    arguments: Option<String>,
}

#[derive(clap::Args)]
struct InfoArgs {
    image: PathBuf,
    /// Only "json" is supported.
    #[arg(long, default_value = "json")]
    output: String,
    /// Also describe every backing file (a JSON array, top first).
    #[arg(long)]
    backing_chain: bool,
    #[arg(long, short = 'f', value_enum)]
    format: Option<Format>,
    /// Read a qcow2 image another process holds, without its locks (qemu-img -U).
    #[arg(long, short = 'U')]
    force_share: bool,
}

#[derive(clap::Args)]
struct CreateArgs {
    /// Image format.
    #[arg(short = 'f', value_enum, default_value = "raw")]
    format: Format,
    /// Backing file (qcow2 only), recorded as given.
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Backing file format (default: probed).
    #[arg(short = 'F', value_enum)]
    backing_format: Option<Format>,
    /// Options: cluster_size=N, compat=0.10|1.1 (comma-separated).
    #[arg(short = 'o')]
    options: Option<String>,
    file: PathBuf,
    /// Size in bytes, or with a k/M/G/T/P suffix (powers of 1024); a
    /// qcow2 with a backing file takes the backing file's size by default.
    size: Option<String>,
}

#[derive(clap::Args)]
struct DaemonArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<String>,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Image to serve; without it, a demo qcow2 (created if missing in the
    /// current directory, with a recording checkpoint `demo`) is served,
    /// with QMP on ./tidemark-qmp.sock.
    image: Option<PathBuf>,
    /// Unix socket to listen on (default ./tidemark.sock unless --listen is given).
    #[arg(long, short = 'k')]
    socket: Option<PathBuf>,
    /// TCP address to listen on, HOST:PORT.
    #[arg(long)]
    listen: Option<String>,
    /// Export name (default: the empty name, as qemu-nbd).
    #[arg(long, short = 'x', default_value = "")]
    export_name: String,
    /// Human-readable description of the export.
    #[arg(long, short = 'D')]
    description: Option<String>,
    /// Export read-only.
    #[arg(long, short = 'r')]
    read_only: bool,
    /// Image format (default: probe).
    #[arg(long, short = 'f', value_enum)]
    format: Option<Format>,
    /// Maximum number of simultaneous clients (0: no limit); the default
    /// is qemu-nbd's.
    #[arg(long, short = 'e', default_value_t = 1)]
    max_connections: usize,
    /// Also expose the qemu:allocation-depth metadata context.
    #[arg(long, short = 'A')]
    allocation_depth: bool,
    /// Export a dirty bitmap of the image as qemu:dirty-bitmap:NAME (repeatable).
    #[arg(long = "bitmap", short = 'B', value_name = "NAME")]
    bitmaps: Vec<String>,
    /// Also accept QMP clients on this unix socket (repeatable); the image
    /// is node `drive0`.
    #[arg(long = "qmp", value_name = "PATH")]
    qmp: Vec<PathBuf>,
    /// Persistent bitmaps survive a crash through an intent log in the
    /// image (on), or follow qemu exactly: inconsistent after a crash (off).
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = BitmapPolicy::parse_switch)]
    bitmap_intent_log: bool,
    /// Seconds between store points of the persistent bitmaps (0: none).
    #[arg(long, value_name = "SECS", default_value_t = tidemark::store_point::DEFAULT_STORE_INTERVAL)]
    bitmap_store_interval: u64,
    /// Define an object, as qemu-nbd's --object: TLS credentials, secrets,
    /// authorization (repeatable; keyval or JSON).
    #[arg(long = "object", value_name = "TYPE,id=ID,...")]
    objects: Vec<String>,
    /// Require TLS with the credentials object ID (an --object with
    /// endpoint=server).
    #[arg(long, value_name = "ID")]
    tls_creds: Option<String>,
    /// Admit only the TLS clients the authorization object ID allows.
    #[arg(long, value_name = "ID")]
    tls_authz: Option<String>,
    /// Memory for in-flight NBD request and reply data, shared by all
    /// clients (default 192M: RSS stays under 256M).
    #[arg(long, value_name = "SIZE", value_parser = tidemark::qmp::cmdline::parse_nbd_memory)]
    nbd_memory: Option<usize>,
}

const DEMO_IMAGE: &str = "tidemark-demo.qcow2";
const DEMO_SIZE: u64 = 64 << 20;
const DEMO_QMP: &str = "tidemark-qmp.sock";
/// The demo image's checkpoint: an incremental backup from it works at once.
const DEMO_CHECKPOINT: &str = "demo";
const DEFAULT_SOCKET: &str = "tidemark.sock";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve(args) => serve(args),
        Cmd::Bitmap { args } => tidemark::cli::bitmap::parse_args(&args)
            .and_then(|a| tidemark::cli::bitmap::run(&a))
            .map(|out| print!("{out}"))
            .map_err(anyhow::Error::msg),
        Cmd::Info(args) => info(args),
        Cmd::Create(args) => create(args),
        Cmd::Daemon(args) => daemon(args),
        Cmd::Qmp(args) => qmp(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidemark: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn info(args: InfoArgs) -> Result<()> {
    use tidemark::info::{chain_info, image_info_opts, to_qemu_json};
    anyhow::ensure!(args.output == "json", "only --output=json is supported");
    let text = if args.backing_chain {
        to_qemu_json(&chain_info(&args.image, args.format)?)
    } else {
        to_qemu_json(&image_info_opts(
            &args.image,
            args.format,
            args.force_share,
        )?)
    };
    println!("{text}");
    Ok(())
}

/// A size as qemu-img reads it: bytes, or a number with a binary suffix.
fn parse_size(text: &str) -> Result<u64> {
    tidemark::cli::size::parse_size(text)
        .ok_or_else(|| anyhow::anyhow!("Invalid image size specified: '{text}'"))
}

fn create(args: CreateArgs) -> Result<()> {
    use tidemark::block::qcow2::create::{create_qcow2, create_raw, CreateOptions};
    let size = args.size.as_deref().map(parse_size).transpose()?;
    match args.format {
        Format::Raw => {
            anyhow::ensure!(
                args.backing.is_none(),
                "raw images cannot have a backing file"
            );
            let size =
                size.ok_or_else(|| anyhow::anyhow!("Image creation needs a size parameter"))?;
            create_raw(&args.file, size)?;
            println!("Formatting '{}', fmt=raw size={size}", args.file.display());
        }
        Format::Qcow2 => {
            let mut opts = CreateOptions {
                size,
                backing_file: args.backing,
                backing_format: args.backing_format.map(|f| f.name().to_owned()),
                ..CreateOptions::default()
            };
            for kv in args.options.iter().flat_map(|o| o.split(',')) {
                match kv.split_once('=') {
                    Some(("cluster_size", v)) => opts.cluster_size = parse_size(v)?,
                    Some(("compat", "0.10")) => opts.compat_v2 = true,
                    Some(("compat", "1.1" | "v3")) => opts.compat_v2 = false,
                    _ => anyhow::bail!("Invalid option '{kv}' (supported: cluster_size, compat)"),
                }
            }
            create_qcow2(&args.file, &opts)?;
            println!(
                "Formatting '{}', fmt=qcow2 cluster_size={} compat={}",
                args.file.display(),
                opts.cluster_size,
                if opts.compat_v2 { "0.10" } else { "1.1" }
            );
        }
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        // One worker per core: they carry the sockets and the no-wait fast
        // paths, which are CPU work; NBD requests that may wait on the disk
        // run on the fixed I/O threads (nbd/workers.rs).
        .worker_threads(tidemark::nbd::workers::cores())
        .enable_all()
        // Only control-plane work runs here: QMP commands (one at a time,
        // under the command lock), pruning and closing the graph, each
        // awaited before the next; none waits for another blocking task.
        // One thread does it, within the process's budget of 4 threads a
        // core (see nbd/workers.rs).
        .max_blocking_threads(1)
        .build()
        .context("Could not start the runtime")
}

/// Creates the demo image, an empty qcow2, if it does not exist; returns
/// whether it did (its checkpoint is added once it is open).
fn ensure_demo_image(path: &Path) -> Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    let opts = tidemark::block::qcow2::create::CreateOptions {
        size: Some(DEMO_SIZE),
        ..Default::default()
    };
    tidemark::block::qcow2::create::create_qcow2(path, &opts)
        .with_context(|| format!("Could not create demo image '{}'", path.display()))?;
    info!(path = %path.display(), size = DEMO_SIZE, "created demo image");
    Ok(true)
}

/// The demo's first checkpoint: a persistent recording bitmap and its
/// record, as a backup session makes them.
async fn add_demo_checkpoint(d: &std::sync::Arc<Daemon>) -> Result<()> {
    let args = json!({"node": "drive0", "name": DEMO_CHECKPOINT, "persistent": true});
    commands::execute(
        d,
        "block-dirty-bitmap-add",
        args.as_object().cloned().unwrap_or_default(),
    )
    .await
    .map_err(|e| anyhow::anyhow!(e.desc))?;
    let node = d.node("drive0").map_err(|e| anyhow::anyhow!(e.desc))?;
    tokio::task::spawn_blocking(move || tidemark::checkpoint::record(&node, DEMO_CHECKPOINT, None))
        .await
        .context("demo checkpoint")?
        .map_err(|e| anyhow::anyhow!(e.desc))
}

fn serve(mut args: ServeArgs) -> Result<()> {
    let mut new_demo = false;
    let image = match args.image.take() {
        Some(p) => p,
        None => {
            let p = PathBuf::from(DEMO_IMAGE);
            new_demo = ensure_demo_image(&p)?;
            if args.qmp.is_empty() {
                args.qmp.push(PathBuf::from(DEMO_QMP));
            }
            p
        }
    };
    let format = match args.format {
        Some(f) => f,
        None => probe(&image).with_context(|| format!("Could not open '{}'", image.display()))?,
    };
    let objects = args
        .objects
        .iter()
        .map(|o| cmdline::object(o).map_err(|e| anyhow::anyhow!("--object: {e}")))
        .collect::<Result<Vec<Value>>>()?;
    let mut addrs = Vec::new();
    if let Some(l) = args.listen {
        addrs.push(Address::Tcp(l));
    }
    if args.socket.is_some() || addrs.is_empty() {
        addrs.push(Address::Unix(
            args.socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
        ));
    }
    // qemu-nbd's rule; nbd-server-start instead ignores tls-authz alone.
    anyhow::ensure!(
        args.tls_authz.is_none() || args.tls_creds.is_some(),
        "--tls-authz is not permitted without --tls-creds"
    );
    let tls = json!({"tls-creds": args.tls_creds, "tls-authz": args.tls_authz});
    // qemu-nbd offers its -B bitmaps in the reverse order of the options.
    let bitmaps: Vec<Value> = args.bitmaps.iter().rev().map(|b| json!(b)).collect();
    let mut export = json!({
        "type": "nbd", "id": "qemu-nbd-export", "node-name": "drive0",
        "name": args.export_name, "writable": !args.read_only,
        "allocation-depth": args.allocation_depth, "bitmaps": bitmaps,
    });
    if let Some(d) = args.description {
        export["description"] = json!(d);
    }
    let rt = runtime()?;
    rt.block_on(async move {
        // The same state `daemon` builds: a file node, a format node
        // `drive0` over it, the NBD server and one export.
        let d = Daemon::new();
        d.set_bitmap_policy(BitmapPolicy {
            intent_log: args.bitmap_intent_log,
            store_interval: args.bitmap_store_interval,
        });
        if let Some(n) = args.nbd_memory {
            d.set_nbd_memory(n);
        }
        for o in objects {
            let o = o.as_object().cloned().unwrap_or_default();
            commands::execute(&d, "object-add", o)
                .await
                .map_err(|e| anyhow::anyhow!("--object: {}", e.desc))?;
        }
        let add = serve_options(&image, format.name(), args.read_only);
        commands::execute(&d, "blockdev-add", add)
            .await
            .map_err(|e| anyhow::anyhow!(e.desc))
            .with_context(|| format!("Could not open '{}'", image.display()))?;
        if new_demo {
            add_demo_checkpoint(&d).await?;
        }
        // Monitors before the NBD socket: once that is announced, QMP
        // clients can connect too.
        let started = match bind_monitors(&args.qmp) {
            Ok(monitors) => match start_serving(
                &d,
                &addrs,
                (args.max_connections > 0).then_some(args.max_connections),
                &tls,
                &export,
            )
            .await
            {
                Ok(()) => Ok(monitors),
                Err(e) => {
                    for m in &monitors {
                        let _ = std::fs::remove_file(m.path());
                    }
                    Err(anyhow::anyhow!(e.desc))
                }
            },
            Err(e) => Err(e),
        };
        let monitors = match started {
            Ok(m) => m,
            Err(e) => {
                // Closed cleanly, as qemu-nbd does, so nothing stays in use.
                let _ = d.stop_nbd().await;
                let c = d.clone();
                let _ = tokio::task::spawn_blocking(move || c.close_all()).await;
                return Err(e);
            }
        };
        d.accept_nbd().await;
        info!(image = %image.display(), "serving");
        serve_until_quit(d, monitors, wait_for_signal()).await;
        Ok(())
    })
}

/// `serve`'s NBD server (bound, not yet accepting) and its one export.
async fn start_serving(
    d: &std::sync::Arc<Daemon>,
    addrs: &[Address],
    max_connections: Option<usize>,
    tls: &Value,
    export: &Value,
) -> Result<(), QmpError> {
    {
        let _serial = d.command_lock.lock().await;
        let tls = commands::export::tls_server(d, tls.as_object().unwrap_or(&Default::default()))
            .map_err(|e| QmpError::generic(format!("Failed to get TLS creds: {}", e.desc)))?;
        d.start_nbd(addrs, max_connections, false, tls).await?;
    }
    let map = export.as_object().cloned().unwrap_or_default();
    commands::execute(d, "block-export-add", map)
        .await
        .map(|_| ())
}

fn bind_monitors(paths: &[PathBuf]) -> Result<Vec<QmpListener>> {
    paths.iter().map(|p| Ok(QmpListener::bind(p)?)).collect()
}

/// `tidemark qmp`: one command over a QMP socket, the reply's `return`
/// printed as JSON; an error reply is the exit status 1 and its text.
fn qmp(args: QmpArgs) -> Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let arguments: Value = match &args.arguments {
        Some(a) => serde_json::from_str(a).context("ARGUMENTS must be a JSON object")?,
        None => json!({}),
    };
    let stream = std::os::unix::net::UnixStream::connect(&args.socket)
        .with_context(|| format!("Could not connect to '{}'", args.socket.display()))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(600)))?;
    let mut writer = stream.try_clone()?;
    let mut lines = BufReader::new(stream).lines();
    let mut reply = |cmd: Value| -> Result<Value> {
        writeln!(writer, "{cmd}")?;
        loop {
            let line = lines.next().context("the monitor closed")??;
            let v: Value = serde_json::from_str(&line).context("not QMP")?;
            if v.get("return").is_some() || v.get("error").is_some() {
                return Ok(v);
            }
        }
    };
    // The greeting comes first, unasked.
    reply(json!({"execute": "qmp_capabilities"}))?;
    let r = reply(json!({"execute": args.command, "arguments": arguments}))?;
    if let Some(e) = r.get("error") {
        anyhow::bail!("{}", e["desc"].as_str().unwrap_or("error"));
    }
    println!("{}", serde_json::to_string_pretty(&r["return"])?);
    Ok(())
}

/// `tidemark daemon`: qemu-storage-daemon's command line.
fn daemon(args: DaemonArgs) -> Result<()> {
    let opts = cmdline::parse_args(&args.args).map_err(anyhow::Error::msg)?;
    let ready = if opts.iter().any(|a| a.opt == Opt::Daemonize) {
        tidemark::daemonize::daemonize().context("Could not daemonize")?
    } else {
        tidemark::daemonize::Ready::none()
    };
    let rt = runtime()?;
    rt.block_on(async move {
        let d = Daemon::new();
        cmdline::apply(&d, &opts)
            .await
            .map_err(anyhow::Error::msg)?;
        let mut monitors = Vec::new();
        for a in &opts {
            if let Opt::Monitor(p) = &a.opt {
                monitors.push(QmpListener::bind(p)?);
            }
        }
        // Written last, as qsd does: scripts take the pidfile to mean ready.
        for a in &opts {
            if let Opt::Pidfile(p) = &a.opt {
                std::fs::write(p, format!("{}\n", std::process::id()))
                    .with_context(|| format!("Could not write pidfile '{}'", p.display()))?;
            }
        }
        ready.done();
        serve_until_quit(d, monitors, wait_for_signal()).await;
        for a in &opts {
            if let Opt::Pidfile(p) = &a.opt {
                let _ = std::fs::remove_file(p);
            }
        }
        Ok(())
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // Without signal handlers we can only run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}
