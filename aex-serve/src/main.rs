//! `aex-serve`: the gateway as a program, for hosts without Python (`aex serve` is the same
//! server, shipped with the Python package).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use aex_core::{Config, Kernel, KernelOptions};
use aex_serve::{Gateway, ServeOptions};
use clap::Parser;

/// An OpenAI-compatible gateway governed by aex: point OPENAI_BASE_URL at http://HOST:PORT/v1 and
/// use an agent's aex token as the API key.
#[derive(Parser)]
#[command(name = "aex-serve", version)]
struct Args {
    /// The database file (created if missing).
    #[arg(long, env = "AEX_DB")]
    db: PathBuf,
    /// The models.yaml to load (and to reload on POST /admin/reload_config).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// The port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 9000)]
    port: u16,
    /// The environment variable holding the admin token (required to listen beyond loopback).
    #[arg(long)]
    admin_token_env: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aex-serve: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> aex_core::Result<()> {
    let admin_token = match &args.admin_token_env {
        Some(var) => Some(std::env::var(var).map_err(|_| aex_core::Error::invalid("admin_token_env", format!("the variable {var} is not set")))?),
        None => None,
    };
    let mut options = KernelOptions::default();
    if let Some(path) = &args.config {
        options.config = Config::load(path)?;
    }
    let kernel = Kernel::open(&args.db, options)?;
    let serve = ServeOptions { addr: SocketAddr::new(args.host, args.port), admin_token, config_path: args.config, ..ServeOptions::default() };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(aex_serve::WORKER_THREADS).enable_all().build().map_err(|e| aex_core::Error::Unavailable(e.to_string()))?;
    runtime.block_on(async {
        let gateway = Gateway::bind(kernel, serve).await?;
        println!("aex-serve listening on http://{}/v1", gateway.local_addr()?);
        gateway.run(shutdown_signal()).await
    })
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}
