//! `plc-sim`: runs the simulated tank PLC (or a bulk bench device) until
//! Ctrl-C or SIGTERM.
//!
//! ```text
//! plc-sim --bind 127.0.0.1:5020
//! plc-sim --bind 127.0.0.1:0 --bulk 1000
//! ```

use clap::Parser;
use std::net::SocketAddr;
use twin_testkit::sim::PlcSim;

#[derive(Parser)]
#[command(
    version,
    about = "Simulated Modbus TCP tank PLC (see docs/tank-register-map.md)"
)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:5020")]
    bind: SocketAddr,
    /// Run a bench device with this many holding registers (changing every
    /// 10 ms) instead of the tank.
    #[arg(long, value_name = "REGISTERS")]
    bulk: Option<u16>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let sim = match args.bulk {
        Some(n) => PlcSim::start_bulk(args.bind, n).await?,
        None => PlcSim::start(args.bind).await?,
    };
    let kind = match args.bulk {
        Some(n) => format!("bulk device, {n} holding registers"),
        None => "tank, unit id 1".to_string(),
    };
    println!("plc-sim listening on {} ({kind})", sim.addr());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    sim.stop().await;
    println!("plc-sim stopped");
    Ok(())
}
