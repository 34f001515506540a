//! `opcua-sim`: runs the OPC UA simulator server (typed variables and a
//! tank, see `twin_testkit::opcua_sim`) until Ctrl-C or SIGTERM.
//!
//! ```text
//! opcua-sim --port 4840 --pki ./opcua-sim-pki --user operator:secret
//! opcua-sim --port 4840 --pki ./opcua-sim-pki --allow-none --anonymous
//! opcua-sim --port 4840 --pki ./opcua-sim-pki --user operator:secret --bulk 5000
//! ```
//!
//! `--bulk N` adds N read-only Double variables `Bulk.0` .. `Bulk.{N-1}`
//! (`nsu=urn:twin-gateway:opcua-sim;s=Bulk.17`), all changing every 100 ms,
//! and raises the server's monitored-item limits to fit them (unless
//! `--default-limits`).
//!
//! The server certificate is `<pki>/own/cert.der` (DER); a client trusts it
//! by copying it into its trust list (for an async-opcua client:
//! `<client pki>/trusted/` under the printed file name).

use clap::{Parser, ValueEnum};
use std::net::IpAddr;
use std::path::PathBuf;
use twin_testkit::opcua_sim::{OpcUaSim, OpcUaSimOptions, SimSecurity};

#[derive(Clone, Copy, ValueEnum)]
enum Security {
    /// Basic256Sha256, Aes128_Sha256_RsaOaep, Aes256_Sha256_RsaPss (Sign and SignAndEncrypt).
    Secure,
    /// Only security policy None.
    None,
    /// Only the deprecated Basic128Rsa15.
    Basic128rsa15,
    /// Only the deprecated Basic256.
    Basic256,
}

#[derive(Parser)]
#[command(
    version,
    about = "OPC UA simulator server: typed variables and a small tank (namespace urn:twin-gateway:opcua-sim)"
)]
struct Args {
    /// TCP port; 0 picks a free port.
    #[arg(long, default_value_t = 4840)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Folder for the server certificate and key (own/, private/) and the
    /// trusted/ and rejected/ client certificates; created if missing.
    #[arg(long, value_name = "DIR", default_value = "opcua-sim-pki")]
    pki: PathBuf,
    /// A user accepted by the server (repeatable).
    #[arg(long, value_name = "NAME:PASSWORD", value_parser = parse_user)]
    user: Vec<(String, String)>,
    /// Offer security policy None as well (with --security secure).
    #[arg(long)]
    allow_none: bool,
    /// Accept anonymous sessions.
    #[arg(long)]
    anonymous: bool,
    /// Endpoints offered.
    #[arg(long, value_enum, default_value = "secure")]
    security: Security,
    /// Extra host name for the certificate; the first one is also the host
    /// advertised in the endpoint URL (repeatable).
    #[arg(long, value_name = "NAME")]
    host: Vec<String>,
    /// Use an already-expired server certificate (refusal tests).
    #[arg(long)]
    expired_cert: bool,
    /// Keep Tank1.Level and Tank1.Counter still.
    #[arg(long)]
    freeze: bool,
    /// Add N Double variables Bulk.0 .. Bulk.{N-1}, all changing every 100 ms.
    #[arg(long, value_name = "N", default_value_t = 0)]
    bulk: u32,
    /// Keep async-opcua's default limits (1000 monitored items per call and
    /// per subscription) even with --bulk.
    #[arg(long)]
    default_limits: bool,
}

fn parse_user(s: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((n, p)) if !n.is_empty() => Ok((n.to_string(), p.to_string())),
        _ => Err("expected NAME:PASSWORD".to_string()),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    if args.user.is_empty() && !args.anonymous {
        anyhow::bail!("give at least one --user NAME:PASSWORD or --anonymous");
    }
    let security = match (args.security, args.allow_none) {
        (Security::Secure, false) => SimSecurity::Secure,
        (Security::Secure, true) => SimSecurity::SecureAndNone,
        (Security::None, _) => SimSecurity::NoneOnly,
        (Security::Basic128rsa15, _) => SimSecurity::Basic128Rsa15Only,
        (Security::Basic256, _) => SimSecurity::Basic256Only,
    };
    let mut opts = OpcUaSimOptions::new(&args.pki)
        .security(security)
        .anonymous(args.anonymous);
    opts.bind = args.bind;
    opts.port = args.port;
    opts.users = args.user;
    opts.host_names = args.host;
    opts.expired_cert = args.expired_cert;
    opts.frozen = args.freeze;
    opts.bulk = args.bulk;
    opts.default_limits = args.default_limits;
    let users: Vec<String> = opts.users.iter().map(|(n, _)| n.clone()).collect();
    let sim = OpcUaSim::start(opts).await?;
    println!("opcua-sim listening on {}", sim.endpoint_url());
    for (policy, mode) in security.endpoints() {
        println!("  endpoint {policy} {mode:?}");
    }
    println!(
        "  users: {}{}",
        if users.is_empty() {
            "-".to_string()
        } else {
            users.join(", ")
        },
        if args.anonymous { " (+ anonymous)" } else { "" }
    );
    if args.bulk > 0 {
        println!(
            "  bulk: Bulk.0 .. Bulk.{} (Double, every 100 ms){}",
            args.bulk - 1,
            if args.default_limits {
                ", default server limits"
            } else {
                ""
            }
        );
    }
    println!("  certificate {}", sim.server_cert_path().display());
    println!(
        "  trust it as <client pki>/trusted/{}",
        sim.trust_file_name()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    sim.stop().await;
    println!("opcua-sim stopped");
    Ok(())
}
