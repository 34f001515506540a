//! The local twin: a complete twin on one machine with one command.
//!
//! Starts a simulated tank PLC (Modbus TCP), a simulated OPC UA server
//! (Basic256Sha256 SignAndEncrypt with a user name login, its certificate
//! in the gateway's trust list), an embedded MQTT broker that requires
//! client certificates (mutual TLS), the gateway with the example
//! configuration plus the OPC UA device, and the operator's live twin view. Everything listens on
//! free loopback ports only. Files go to `./local-twin/` (dev PKI, data,
//! the rendered configuration); run it again and the sequence continues.
//!
//! `cargo local-twin [-- --seconds N] [-- --dir DIR]`

use anyhow::{bail, Context as _};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::time::Duration;
use twin_testkit::sim::PlcSim;

#[derive(Parser)]
#[command(
    name = "local-twin",
    about = "Simulated PLC + mTLS broker + gateway + live twin view"
)]
struct Args {
    /// Folder for the dev PKI, the data directory and the rendered configuration.
    #[arg(long, default_value = "local-twin")]
    dir: PathBuf,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
    /// Print one JSON line per verified message instead of the table.
    #[arg(long)]
    json: bool,
}

const GATEWAY_ID: &str = "plant1-gw1";

fn main() -> anyhow::Result<()> {
    gateway::tls::install_default_provider();
    let args = Args::parse();
    // The demo broker's own log is left out: it reports every client that
    // closes without a TLS close_notify, which is noise here.
    gateway::logging::init(
        "warn,rumqttd=off,opcua_server=error,opcua_crypto=error",
        false,
    );
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    let pki = gateway::pki::DevPkiFiles::in_dir(&dir.join("pki"));
    if !pki.ca_cert.exists() || !pki.gateway_signing_key.exists() {
        gateway::pki::create_dev_pki(&gateway::pki::DevPkiOptions {
            out_dir: pki.dir.clone(),
            gateway_id: GATEWAY_ID.into(),
            broker_hosts: vec!["localhost".into(), "127.0.0.1".into()],
            operator: "twin-operator".into(),
            valid_days: 365,
        })?;
        eprintln!("created a development PKI in {}", pki.dir.display());
    }

    let plc = PlcSim::start("127.0.0.1:0".parse()?).await?;
    let opc = start_opcua(&dir, &pki).await?;
    let broker_port = start_demo_broker(&pki)?;

    let config_path = dir.join("gateway.toml");
    let mut text = twin_testkit::render_example_config(broker_port, plc.addr())?.replacen(
        "# profile = \"production\"",
        "profile = \"dev\"",
        1,
    );
    text.push_str(&opcua_device(&opc.endpoint_url()));
    std::fs::write(&config_path, text)?;
    let cfg = gateway::config::load(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let handle = gateway::run::start(cfg).await?;

    eprintln!(
        "PLC simulator at {}, OPC UA simulator at {}, broker (mutual TLS) at 127.0.0.1:{broker_port}, gateway {GATEWAY_ID}; config {}",
        plc.addr(),
        opc.endpoint_url(),
        config_path.display()
    );
    let mut trust = twin_model::TrustStore::new();
    trust.add_pem(&std::fs::read_to_string(&pki.gateway_signing_pub)?)?;
    let opts = twinctl::client::ClientOptions {
        host: "localhost".into(),
        port: broker_port,
        ca_file: pki.ca_cert.clone(),
        cert_file: pki.operator_cert.clone(),
        key_file: pki.operator_key.clone(),
        client_id: "local-twin-viewer".into(),
    };
    let output = if args.json {
        twinctl::client::Output::JsonLines
    } else {
        twinctl::client::Output::Table
    };
    let summary = twinctl::client::watch_live(
        opts,
        "twin",
        trust,
        None,
        output,
        args.seconds.map(Duration::from_secs),
    )
    .await?;
    let stragglers = handle.stop().await;
    let view = summary.gateways.get(GATEWAY_ID);
    eprintln!(
        "stopped: {} verified batch(es), {} point(s), {} missing, {} rejected{}",
        view.map_or(0, |v| v.batches),
        view.map_or(0, |v| v.points),
        view.map_or(0, |v| v.missing()),
        summary.rejected,
        if stragglers.is_empty() {
            String::new()
        } else {
            format!("; tasks stopped by force: {stragglers:?}")
        }
    );
    if !summary.clean() {
        bail!("the twin saw rejected or missing messages");
    }
    Ok(())
}

/// Starts the OPC UA simulator with a fresh password for the gateway, and
/// puts its certificate into the gateway's trust list (the demo's own
/// server: in a plant an engineer checks the thumbprint first).
async fn start_opcua(
    dir: &Path,
    pki: &gateway::pki::DevPkiFiles,
) -> anyhow::Result<twin_testkit::opcua_sim::OpcUaSim> {
    use rand::Rng as _;
    if !pki.opcua_cert.exists() {
        gateway::pki::create_opcua_client(
            pki,
            GATEWAY_ID,
            gateway::pki::Validity::days(365),
            gateway::pki::DEV_OU,
        )?;
    }
    let password: String = (0..24)
        .map(|_| char::from(b"abcdefghijkmnpqrstuvwxyz23456789"[rand::rng().random_range(0..32)]))
        .collect();
    gateway::keyfile::write_private(&dir.join("opcua.password"), &password)?;
    let sim = twin_testkit::opcua_sim::OpcUaSim::start(
        twin_testkit::opcua_sim::OpcUaSimOptions::new(dir.join("opcua-sim"))
            .user("gateway", password),
    )
    .await?;
    sim.install_trust(&pki.opcua_dir.join("trusted"))?;
    Ok(sim)
}

/// The OPC UA device of the local twin, appended to the example configuration.
fn opcua_device(url: &str) -> String {
    let ns = "nsu=urn:twin-gateway:opcua-sim;s=";
    let mut t = format!(
        r#"
[[devices]]
name = "opc-tank"
protocol = "opcua"
endpoint_url = "{url}"
certificate_file = "pki/opcua/own/cert.der"
private_key_file = "pki/opcua/private/private.pem"
application_uri = "urn:twin-gateway:{GATEWAY_ID}"
user = "gateway"
password_file = "opcua.password"
sampling_interval_ms = 100
publishing_interval_ms = 500
"#
    );
    for (name, node, ty, unit, writable) in [
        ("tank2.level", "Tank1.Level", "double", Some("m"), false),
        (
            "tank2.setpoint",
            "Tank1.Setpoint",
            "double",
            Some("m"),
            true,
        ),
        ("tank2.mode", "Tank1.Mode", "uint16", None, true),
        ("tank2.pump", "Tank1.Pump", "bool", None, true),
        ("tank2.counter", "Tank1.Counter", "uint32", None, false),
    ] {
        t.push_str(&format!(
            "\n[[devices.tags]]\nname = \"{name}\"\nnode_id = \"{ns}{node}\"\ntype = \"{ty}\"\nwritable = {writable}\n"
        ));
        if let Some(u) = unit {
            t.push_str(&format!("unit = \"{u}\"\n"));
        }
    }
    t
}

/// Starts the embedded broker (rumqttd, demo only) with TLS that requires a
/// client certificate from the dev CA; returns its port.
fn start_demo_broker(pki: &gateway::pki::DevPkiFiles) -> anyhow::Result<u16> {
    let port = twin_testkit::free_port();
    let s = |p: &Path| p.display().to_string();
    let config = format!(
        r#"
id = 0
[router]
max_connections = 64
max_outgoing_packet_count = 1000
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "local-twin-mtls"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.1.tls]
capath = "{ca}"
certpath = "{cert}"
keypath = "{key}"
[v4.1.connections]
connection_timeout_ms = 10000
max_payload_size = 4194304
max_inflight_count = 500
dynamic_filters = true
"#,
        ca = s(&pki.ca_cert),
        cert = s(&pki.broker_cert),
        key = s(&pki.broker_key),
    );
    let config: rumqttd::Config = toml::from_str(&config).context("demo broker configuration")?;
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("demo-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                eprintln!("demo broker stopped: {e}");
            }
        })?;
    // Wait until it listens.
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the demo broker did not start listening on 127.0.0.1:{port}")
}
