//! Command round-trip bench: an operator publishes a signed command on the
//! real Mosquitto (mTLS), the `gateway` binary (a separate process)
//! authenticates it, decides under the policy, audits it (fsync), writes
//! the simulated PLC and reads it back, and publishes a signed result; the
//! bench verifies the result and times publish -> verified result.
//!
//! Commands alternate between one the policy permits (a coil write with
//! read-back: two audit records, one write and two reads) and one it denies
//! (one audit record). Telemetry load runs meanwhile (`--load-tags` u16
//! registers polled every 20 ms on a bench device). Reported: median, p90,
//! p99 and max per kind.
//!
//! ```sh
//! cargo build --release -p gateway -p twin-testkit --bin gateway --bin command-bench
//! target/release/command-bench --commands 400 --load-tags 2000
//! ```

use anyhow::{bail, Context as _};
use clap::Parser;
use gateway::command_auth::{mint_command, Algorithm, OperatorKey};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use twin_model::command::{CommandBody, CommandClaims};
use twin_model::jws::{b64url, sha256};
use twin_model::result::{CommandResult, Status, RESULT_TYP};
use twin_model::Value;
use twin_testkit::mosquitto::{BrokerOptions, Identity, Mosquitto};
use twin_testkit::pki::TestPki;
use twin_testkit::sim::PlcSim;

#[derive(Parser)]
struct Args {
    /// Commands sent, one at a time (half permitted, half denied).
    #[arg(long, default_value_t = 400)]
    commands: usize,
    /// Telemetry load: u16 registers polled every 20 ms (0 for none).
    #[arg(long, default_value_t = 2000)]
    load_tags: u16,
    /// The gateway binary (default: target/release/gateway).
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
}

const GW: &str = "bench-gw";

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> anyhow::Result<()> {
    gateway::tls::install_default_provider();
    let args = Args::parse();
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bin = twin_testkit::bench::gateway_bin(args.gateway_bin.clone())?;
    let pki = TestPki::new(GW)?;
    let broker = Mosquitto::start(&pki, BrokerOptions::default()).await?;
    let tank = PlcSim::start("127.0.0.1:0".parse()?).await?;
    let root = pki.root().to_path_buf();

    let key = OperatorKey::generate(Algorithm::EdDSA)?;
    std::fs::create_dir_all(root.join("operators"))?;
    std::fs::write(root.join("operators/bench.pem"), key.public_key_pem())?;
    std::fs::create_dir_all(root.join("policies"))?;
    std::fs::write(
        root.join("policies/bench.toml"),
        r#"[policy]
mode = "enforce"
[[roles]]
name = "operator"
subjects = ["alice"]
[[rules]]
id = "pump-stop"
roles = ["operator"]
tags = ["tank1.pump"]
allowed = [false]
"#,
    )?;
    let mut load = String::new();
    let mut sims = vec![tank];
    if args.load_tags > 0 {
        let bulk = PlcSim::start_bulk("127.0.0.1:0".parse()?, args.load_tags).await?;
        load.push_str(&format!(
            "\n[[devices]]\nname = \"load\"\nprotocol = \"modbus-tcp\"\naddress = \"{}\"\npoll_interval_ms = 20\n",
            bulk.addr()
        ));
        for i in 0..args.load_tags {
            load.push_str(&format!(
                "[[devices.tags]]\nname = \"load.r{i}\"\narea = \"holding_register\"\naddress = {i}\ntype = \"u16\"\n"
            ));
        }
        sims.push(bulk);
    }
    let config = format!(
        r#"{head}[commands]
policy_dir = "policies"
operator_keys_dir = "operators"
issuer = "bench-idp"
rate_per_s = 10000
burst = 10000
operator_rate_per_s = 10000
operator_burst = 10000

[[devices]]
name = "tank"
protocol = "modbus-tcp"
address = "{tank}"
poll_interval_ms = 100
[[devices.tags]]
name = "tank1.pump"
area = "coil"
address = 0
type = "bool"
writable = true
[[devices.tags]]
name = "tank1.inlet_valve"
area = "coil"
address = 1
type = "bool"
writable = true
{load}"#,
        head = twin_testkit::gateway_toml(GW, broker.port(), ""),
        tank = sims[0].addr(),
    );
    let cfg_path = root.join("bench.toml");
    std::fs::write(&cfg_path, config)?;

    let mut trust = twin_model::TrustStore::new();
    trust.add_pem(&std::fs::read_to_string(&pki.gateway_signing_pub)?)?;
    let opts = broker.client_options(&pki, "bench-operator", Identity::Operator)?;
    let (client, mut events) = AsyncClient::new(opts, 64);
    events.network_options.set_tcp_nodelay(true);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Vec<u8>)>();
    let sub = client.clone();
    let poller = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = sub
                        .subscribe(format!("twin/{GW}/result"), QoS::AtLeastOnce)
                        .await;
                    let _ = sub
                        .subscribe(format!("twin/{GW}/status"), QoS::AtLeastOnce)
                        .await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });

    let mut child = std::process::Command::new(&bin)
        .args(["run", "-c"])
        .arg(&cfg_path)
        .env("RUST_LOG", "error")
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let outcome = measure(&args, &key, &trust, &client, &mut rx).await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    poller.abort();
    for s in &sims {
        s.stop().await;
    }
    outcome
}

async fn measure(
    args: &Args,
    key: &OperatorKey,
    trust: &twin_model::TrustStore,
    client: &AsyncClient,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) -> anyhow::Result<()> {
    // Online (its subscription is made before it says so).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (topic, payload) = tokio::time::timeout_at(deadline.into(), rx.recv())
            .await
            .context("the gateway did not come online within 20 s")?
            .context("subscriber gone")?;
        if topic.ends_with("/status") && String::from_utf8_lossy(&payload).len() > 10 {
            let v = trust.verify_compact(&payload, twin_model::status::STATUS_TYP, 1 << 20)?;
            if String::from_utf8_lossy(&v.payload).contains("\"online\"") {
                break;
            }
        }
    }
    // Let the first polls and the load settle.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut applied = Vec::new();
    let mut denied = Vec::new();
    for i in 0..args.commands {
        let tag = if i % 2 == 0 {
            "tank1.pump"
        } else {
            "tank1.inlet_valve"
        };
        let now = now_s();
        let token = mint_command(
            key,
            &CommandClaims {
                iss: "bench-idp".into(),
                sub: "alice".into(),
                aud: GW.into(),
                iat: now,
                nbf: now,
                exp: now + 60,
                jti: format!("bench-{now}-{i}"),
                roles: Vec::new(),
                amr: vec!["pwd".into()],
                cmd: CommandBody {
                    tag: tag.into(),
                    value: Value::Bool(false),
                    expect: None,
                },
            },
        );
        let digest = b64url(&sha256(token.as_bytes()));
        let started = Instant::now();
        client
            .publish(
                format!("twin/{GW}/command"),
                QoS::AtLeastOnce,
                false,
                token.into_bytes(),
            )
            .await?;
        let result = loop {
            let (topic, payload) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .with_context(|| format!("no result for command {i} within 10 s"))?
                .context("subscriber gone")?;
            if !topic.ends_with("/result") {
                continue;
            }
            let v = trust.verify_compact(&payload, RESULT_TYP, 1 << 20)?;
            let r: CommandResult = serde_json::from_slice(&v.payload)?;
            if r.message_sha256 == digest {
                break r;
            }
        };
        let took = started.elapsed();
        match result.status {
            Status::Applied => applied.push(took),
            Status::Denied => denied.push(took),
            other => bail!("command {i}: unexpected {other:?}: {result:?}"),
        }
    }
    for (name, mut v) in [("applied", applied), ("denied", denied)] {
        v.sort();
        println!(
            "{name:>8}: n={} median={:.2} ms p90={:.2} ms p99={:.2} ms max={:.2} ms",
            v.len(),
            percentile(&v, 0.5).as_secs_f64() * 1e3,
            percentile(&v, 0.9).as_secs_f64() * 1e3,
            percentile(&v, 0.99).as_secs_f64() * 1e3,
            v.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        );
    }
    Ok(())
}
