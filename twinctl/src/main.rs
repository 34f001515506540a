//! `twinctl`: the operator tool. `twinctl watch` shows the live, verified twin.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use twin_model::TrustStore;
use twinctl::watch::{WatchEvent, Watcher};

#[derive(Parser)]
#[command(
    name = "twinctl",
    version,
    about = "Operator tool for the twin gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Connection {
    /// Broker as host:port.
    #[arg(long, default_value = "localhost:8883")]
    broker: String,
    #[arg(long)]
    ca: PathBuf,
    /// The operator's client certificate.
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    #[arg(long, default_value = "twin")]
    prefix: String,
}

#[derive(Subcommand)]
enum Command {
    /// Verify every message and show the live twin.
    Watch {
        #[command(flatten)]
        conn: Connection,
        /// Public key (PEM) of a gateway's telemetry signing key; repeat for several.
        #[arg(long = "trust", required = true)]
        trust: Vec<PathBuf>,
        /// Watch only this gateway.
        #[arg(long)]
        gateway: Option<String>,
        /// Print one JSON line per event instead of the table.
        #[arg(long)]
        json: bool,
        /// Stop after this many seconds (exit code 1 if anything was rejected or missing).
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Verify captured batches (one compact JWS per line) offline, in order.
    Verify {
        #[arg(long = "trust", required = true)]
        trust: Vec<PathBuf>,
        files: Vec<PathBuf>,
    },
}

fn load_trust(paths: &[PathBuf]) -> anyhow::Result<TrustStore> {
    let mut trust = TrustStore::new();
    for p in paths {
        let pem = std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?;
        let kid = trust
            .add_pem(&pem)
            .with_context(|| format!("{}", p.display()))?;
        eprintln!("trusting key {kid} ({})", p.display());
    }
    Ok(trust)
}

fn main() -> ExitCode {
    gateway::tls::install_default_provider();
    gateway::logging::init("warn", false);
    match real_main(Cli::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Verify { trust, files } => {
            let mut w = Watcher::new("twin", load_trust(&trust)?);
            let mut bad = 0;
            for f in files {
                let text =
                    std::fs::read_to_string(&f).with_context(|| format!("{}", f.display()))?;
                for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
                    let ev = w.handle("twin/_/telemetry", line.trim().as_bytes());
                    let ev = match ev {
                        // Offline files carry no topic: take the gateway from the batch.
                        WatchEvent::Rejected { code, .. } if code == "wrong_topic" => {
                            WatchEvent::Ignored {
                                topic: String::new(),
                            }
                        }
                        e => e,
                    };
                    if ev.is_alarm() {
                        bad += 1;
                    }
                    println!(
                        "{}:{}: {}",
                        f.display(),
                        i + 1,
                        twinctl::render::json_line(&ev)
                    );
                }
            }
            Ok(if bad == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Watch {
            conn,
            trust,
            gateway,
            json,
            seconds,
        } => {
            let (host, port) = conn
                .broker
                .rsplit_once(':')
                .context("--broker must be host:port")?;
            let port: u16 = port.parse().context("--broker port must be a number")?;
            let opts = twinctl::client::ClientOptions {
                host: host.into(),
                port,
                ca_file: conn.ca,
                cert_file: conn.cert,
                key_file: conn.key,
                client_id: format!("twinctl-{}", std::process::id()),
            };
            let trust = load_trust(&trust)?;
            let rt = tokio::runtime::Runtime::new()?;
            let output = if json {
                twinctl::client::Output::JsonLines
            } else {
                twinctl::client::Output::Table
            };
            let summary = rt.block_on(twinctl::client::watch_live(
                opts,
                &conn.prefix,
                trust,
                gateway.as_deref(),
                output,
                seconds.map(Duration::from_secs),
            ))?;
            Ok(if summary.clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
