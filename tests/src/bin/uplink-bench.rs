//! Uplink throughput bench: simulated devices -> the `gateway` binary (a
//! separate process) -> real Mosquitto (mTLS) -> a verifying subscriber.
//!
//! Reports verified points per second at the twin, the gateway's CPU
//! seconds per million points, and its resident memory (idle before the
//! devices answer, and peak under load). Fails if any message is rejected
//! or any batch is missing.
//!
//! ```sh
//! cargo build --release -p gateway -p twin-testkit --bin uplink-bench
//! target/release/uplink-bench --tags 4000 --devices 4 --poll-ms 20 --seconds 10
//! ```

use anyhow::{bail, Context as _};
use clap::Parser;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use twin_testkit::mosquitto::{BrokerOptions, Identity, Mosquitto};
use twin_testkit::pki::TestPki;
use twin_testkit::sim::PlcSim;

#[derive(Parser)]
struct Args {
    /// Tags in total (u16 holding registers, spread over the devices).
    #[arg(long, default_value_t = 4000)]
    tags: usize,
    #[arg(long, default_value_t = 4)]
    devices: usize,
    #[arg(long, default_value_t = 20)]
    poll_ms: u64,
    /// Measured seconds (after 2 s of warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The gateway binary (default: target/release/gateway).
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
}

fn proc_stat(pid: u32) -> anyhow::Result<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = stat.rsplit_once(')').context("stat")?.1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((rss_kib, ticks as f64 / hz))
}

fn main() -> anyhow::Result<()> {
    gateway::tls::install_default_provider();
    let args = Args::parse();
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bin = args
        .gateway_bin
        .clone()
        .unwrap_or_else(|| twin_testkit::workspace_root().join("target/release/gateway"));
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p gateway`",
            bin.display()
        );
    }
    let gw_id = "bench-gw";
    let pki = TestPki::new(gw_id)?;
    let broker = Mosquitto::start(&pki, BrokerOptions::default()).await?;
    let per = args.tags.div_ceil(args.devices);
    let mut sims = Vec::new();
    let mut devices = String::new();
    for d in 0..args.devices {
        let sim = PlcSim::start_bulk("127.0.0.1:0".parse()?, u16::try_from(per)?).await?;
        devices.push_str(&format!(
            "\n[[devices]]\nname = \"dev{d}\"\nprotocol = \"modbus-tcp\"\naddress = \"{}\"\npoll_interval_ms = {}\n",
            sim.addr(),
            args.poll_ms
        ));
        for i in 0..per {
            devices.push_str(&format!(
                "[[devices.tags]]\nname = \"dev{d}.r{i}\"\narea = \"holding_register\"\naddress = {i}\ntype = \"u16\"\n"
            ));
        }
        sims.push(sim);
    }
    let config = format!(
        r#"[gateway]
id = "{gw_id}"
data_dir = "data"
[signing]
key_file = "pki/gateway-signing.key.pem"
[mqtt]
host = "127.0.0.1"
port = {port}
max_message_bytes = 131072
[mqtt.tls]
ca_file = "pki/ca.crt.pem"
cert_file = "pki/gateway.crt.pem"
key_file = "pki/gateway.key.pem"
{devices}"#,
        port = broker.port()
    );
    let cfg_path = pki.root().join("bench.toml");
    std::fs::write(&cfg_path, config)?;

    // The verifying subscriber.
    let mut trust = twin_model::TrustStore::new();
    trust.add_pem(&std::fs::read_to_string(&pki.gateway_signing_pub)?)?;
    let mut watcher = twinctl::watch::Watcher::new("twin", trust);
    let mut opts = broker.client_options(&pki, "bench-twin", Identity::Operator)?;
    opts.set_max_packet_size(1 << 20, 1 << 16);
    let (client, mut events) = AsyncClient::new(opts, 64);
    client
        .subscribe(format!("twin/{gw_id}/#"), QoS::AtLeastOnce)
        .await?;
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await? {
            break;
        }
    }

    let mut child = std::process::Command::new(&bin)
        .args(["run", "-c"])
        .arg(&cfg_path)
        .env("RUST_LOG", "warn")
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (idle_rss, _) = proc_stat(pid)?;

    let warmup = Instant::now() + Duration::from_secs(2);
    let end = warmup + Duration::from_secs(args.seconds);
    let mut start_points = 0;
    let mut start_cpu = 0.0;
    let mut peak_rss = idle_rss;
    let mut measuring = false;
    let mut next_sample = Instant::now();
    while Instant::now() < end {
        let ev = tokio::time::timeout(Duration::from_millis(100), events.poll()).await;
        if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) = ev {
            watcher.handle(&p.topic, &p.payload);
        }
        let now = Instant::now();
        if now >= next_sample {
            next_sample = now + Duration::from_millis(250);
            let (rss, cpu) = proc_stat(pid)?;
            peak_rss = peak_rss.max(rss);
            if !measuring && now >= warmup {
                measuring = true;
                start_points = watcher.view(gw_id).map_or(0, |v| v.points);
                start_cpu = cpu;
            }
        }
    }
    let (_, end_cpu) = proc_stat(pid)?;
    let view = watcher.view(gw_id).cloned().unwrap_or_default();
    let points = view.points - start_points;
    let rate = points as f64 / args.seconds as f64;
    let cpu = end_cpu - start_cpu;
    // SAFETY: sending SIGTERM to our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    println!(
        "uplink bench: {} tags on {} devices, poll {} ms, {} s measured",
        args.tags, args.devices, args.poll_ms, args.seconds
    );
    println!(
        "  verified at the twin: {points} points, {rate:.0} points/s, {} batches in total",
        view.batches
    );
    println!(
        "  gateway CPU: {cpu:.2} s ({:.2} CPU-s per million points); RSS idle {:.1} MiB, peak {:.1} MiB",
        if points > 0 { cpu / (points as f64 / 1e6) } else { f64::NAN },
        idle_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    println!(
        "  rejected {}, missing batches {}",
        watcher.rejected,
        view.missing()
    );
    if watcher.rejected > 0 || view.unexplained() > 0 {
        bail!("the twin saw rejected or missing batches");
    }
    Ok(())
}
