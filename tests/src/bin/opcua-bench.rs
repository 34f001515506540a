//! OPC UA subscription bench: the bulk OPC UA simulator -> the `gateway`
//! binary (a separate process, one OPC UA device with one subscription of N
//! monitored items, or `--devices K` devices sharing them, a session and a
//! subscription each) -> real Mosquitto (mTLS) -> a verifying subscriber.
//!
//! The simulator (`twin_testkit::opcua_sim`, `bulk(N)`: Double variables
//! `Bulk.0` .. `Bulk.{N-1}`, every one changed every 100 ms) runs in this
//! process on runtime threads of its own (`opcua-sim`), so that its CPU can
//! be told apart from the verifying subscriber's; the gateway connects with
//! the most secure policy offered (Aes256_Sha256_RsaPss, SignAndEncrypt) and
//! a user name. Each tag `opc.b{i}` monitors `Bulk.{i}` (sampling
//! `--sampling-ms`, publishing interval `--publishing-ms`, `--queue-size`).
//!
//! After every tag is good at the twin and 3 s of warm-up, the bench
//! measures for `--seconds`:
//! - verified points per second at the twin, against the rate the server
//!   produced (N x the simulator's ticks per second);
//! - changes delivered: the bulk values carry the simulator's tick
//!   (`tick + i * 0.001`), so the ticks of every tag at the twin at the start
//!   and the end of the window say how many changes the server made; fewer
//!   points than changes means notifications were lost on the way
//!   (sampling, monitored-item queue overflow, or the gateway);
//! - the gateway's CPU seconds per second and per million points, its RSS
//!   (idle 300 ms after start, at the start and end of the window, peak);
//! - the CPU of the simulator, of this process's subscriber, of Mosquitto
//!   and of everything else on the machine (from /proc/stat), since they all
//!   share the cores; and the batch latency (signed -> verified) and how old
//!   the tags' newest values are at the end.
//!
//! One device holds 10,000 items and more (measured: 10,000 at 100 ms, all
//! changes delivered). Two limits stopped it before: the driver's session
//! event pump waited for the device loop while that loop awaited the
//! CreateMonitoredItems calls, and hung after some 7000 items; and a
//! publish response of 10,000 values is larger than async-opcua's default
//! client message limit (320 KiB), so the server answered every publish with
//! `BadResponseTooLarge`. The driver now asks for at most 5000
//! notifications per publish and accepts messages up to 4 MiB (see
//! `gateway/src/device/opcua.rs`). A server that refuses items (here with
//! `--default-limits`: 1000 items per subscription) leaves those tags bad
//! with the status as the reason, e.g. `opcua:BadTooManyMonitoredItems`.
//!
//! It fails if any message is rejected or any batch is missing, or a tag is
//! not good at the end, and prints a summary of the gateway's log (WARN and
//! above, and the OPC UA driver's INFO lines, logged as JSON to
//! `gateway.log` in the bench's temporary folder).
//!
//! ```sh
//! cargo build --release -p gateway -p twin-testkit --bin gateway --bin opcua-bench
//! target/release/opcua-bench --items 1000 --seconds 10
//! target/release/opcua-bench --items 10000 --seconds 10               # one session
//! target/release/opcua-bench --items 5000 --devices 5 --seconds 10   # 1000 items per session
//! # the simulator with async-opcua's default server limits (1000 items per
//! # subscription): one session leaves 1000 tags bad (BadTooManyMonitoredItems)
//! target/release/opcua-bench --items 2000 --ready-timeout-s 10 --default-limits
//! target/release/opcua-bench --items 2000 --devices 2 --default-limits
//! # the OPC UA requests and their status codes, and the log kept:
//! target/release/opcua-bench --items 10000 --gateway-log 'warn,gateway::device::opcua=debug,opcua=debug' --keep-log /tmp/gw.log
//! ```

use anyhow::{bail, Context as _};
use clap::Parser;
use rumqttc::{Event, Packet};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use twin_model::{Quality, Value};
use twin_testkit::bench::{clock_ticks, created_ms, now_ms, proc_stat, stat_cpu};
use twin_testkit::mosquitto::{BrokerOptions, Mosquitto};
use twin_testkit::opcua_sim::{bulk_node, OpcUaSim, OpcUaSimOptions, SimSecurity, NAMESPACE_URI};
use twin_testkit::pki::TestPki;

#[derive(Parser)]
#[command(about = "OPC UA subscription throughput of one gateway (see the module doc)")]
struct Args {
    /// Monitored items (tags), one per bulk variable.
    #[arg(long, default_value_t = 2000)]
    items: u32,
    /// Measured seconds (after the tags are good and 3 s of warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The monitored items' sampling interval.
    #[arg(long, default_value_t = 100)]
    sampling_ms: u64,
    /// The subscription's publishing interval.
    #[arg(long, default_value_t = 100)]
    publishing_ms: u64,
    /// The monitored items' queue size.
    #[arg(long, default_value_t = 1)]
    queue_size: u32,
    /// The gateway binary (default: target/release/gateway).
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
    /// Keep the simulator's default limits (1000 monitored items per call
    /// and per subscription) instead of raising them to fit the items.
    #[arg(long)]
    default_limits: bool,
    /// How long to wait for every tag to be good at the twin.
    #[arg(long, default_value_t = 60)]
    ready_timeout_s: u64,
    /// Spread the items over this many OPC UA devices of the gateway (all on
    /// the same server; one session and one subscription each).
    #[arg(long, default_value_t = 1)]
    devices: u32,
    /// The gateway's log filter (`RUST_LOG`), e.g.
    /// `warn,gateway::device::opcua=debug,opcua=debug` to see the OPC UA
    /// requests and their status codes.
    #[arg(long, default_value = "warn,gateway::device::opcua=info")]
    gateway_log: String,
    /// Copy the gateway's log (JSON lines) here at the end (the bench's
    /// temporary folder is deleted).
    #[arg(long)]
    keep_log: Option<PathBuf>,
}

const GW: &str = "opcua-bench-gw";
const USER: &str = "gateway";
const PASSWORD: &str = "bench-pass";
/// Thread name of the simulator's runtime (at most 15 bytes: /proc comm).
const SIM_THREAD: &str = "opcua-sim";
const WARMUP: Duration = Duration::from_secs(3);

/// CPU seconds of this process's threads named `name`.
fn threads_cpu(name: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter(|s| {
            s.split_once('(')
                .and_then(|(_, r)| r.rsplit_once(')'))
                .is_some_and(|(comm, _)| comm == name)
        })
        .filter_map(|s| stat_cpu(&s))
        .sum()
}

/// The pid of this process's child named `name` (Mosquitto).
fn child_named(name: &str) -> Option<u32> {
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
}

/// Busy and total CPU seconds of the whole machine (all cores), /proc/stat.
fn machine_cpu() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0.0, 0.0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let hz = clock_ticks();
    ((total - idle) as f64 / hz, total as f64 / hz)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The verifying twin.
struct Twin {
    events: rumqttc::EventLoop,
    watcher: twinctl::watch::Watcher,
    /// Batch latency (signed at the gateway -> verified here), ms: count, sum, max.
    latency: (u64, u64, u64),
}

impl Twin {
    /// Handles one event (waiting up to `wait`); a failed connection is retried.
    async fn pump(&mut self, wait: Duration) {
        match tokio::time::timeout(wait, self.events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let ev = self.watcher.handle(&p.topic, &p.payload);
                if let twinctl::watch::WatchEvent::Batch { .. } = ev {
                    if let Some(c) = created_ms(&p.payload) {
                        let l = now_ms().saturating_sub(c);
                        self.latency.0 += 1;
                        self.latency.1 += l;
                        self.latency.2 = self.latency.2.max(l);
                    }
                }
            }
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }

    fn view(&self) -> twinctl::watch::GatewayView {
        self.watcher.view(GW).cloned().unwrap_or_default()
    }

    /// The bench tags that are good now.
    fn good_tags(&self) -> usize {
        self.watcher.view(GW).map_or(0, |v| {
            v.tags
                .iter()
                .filter(|(n, t)| n.starts_with("opc.b") && t.quality == Quality::Good)
                .count()
        })
    }

    /// Per bench tag: the simulator's tick its latest value carries (None
    /// when it has no good value), and the value's source timestamp.
    fn ticks(&self, items: u32) -> Vec<(Option<u64>, u64)> {
        let view = self.watcher.view(GW);
        (0..items)
            .map(|i| {
                let t = view.and_then(|v| v.tags.get(&format!("opc.b{i}")));
                let tick = t
                    .filter(|t| t.quality == Quality::Good)
                    .and_then(|t| match t.value {
                        Some(Value::Float(v)) => {
                            let tick = (v - f64::from(i) * 0.001).round();
                            (tick >= 0.0).then_some(tick as u64)
                        }
                        _ => None,
                    });
                (tick, t.map_or(0, |t| t.ts_ms))
            })
            .collect()
    }
}

/// CPU seconds of everything measured, at one instant.
#[derive(Clone, Copy)]
struct Cpu {
    at: Instant,
    gateway: f64,
    sim: f64,
    bench: f64,
    mosquitto: f64,
    machine_busy: f64,
    machine_total: f64,
}

impl Cpu {
    fn now(gateway_pid: u32, mosquitto_pid: Option<u32>) -> anyhow::Result<Cpu> {
        let (machine_busy, machine_total) = machine_cpu();
        let sim = threads_cpu(SIM_THREAD);
        let (_, own) = proc_stat(std::process::id())?;
        Ok(Cpu {
            at: Instant::now(),
            gateway: proc_stat(gateway_pid)?.1,
            sim,
            bench: own - sim,
            mosquitto: mosquitto_pid
                .and_then(|p| proc_stat(p).ok())
                .map_or(0.0, |s| s.1),
            machine_busy,
            machine_total,
        })
    }
}

/// Counts of the gateway's JSON log lines by level and message.
fn log_summary(path: &Path) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let key = match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) => {
                let level = v["level"].as_str().unwrap_or("?").to_string();
                let f = &v["fields"];
                let mut msg = f["message"].as_str().unwrap_or("").to_string();
                if msg.starts_with("security self-check") {
                    // The test PKI is a development PKI, expiring in 30 days.
                    msg = "security self-check (the bench's development PKI)".into();
                }
                for extra in ["status", "error", "tag", "count", "tags"] {
                    let x = match &f[extra] {
                        serde_json::Value::String(x) => Some(x.clone()),
                        serde_json::Value::Number(n) => Some(n.to_string()),
                        _ => None,
                    };
                    if let Some(x) = x {
                        let x: String = x.chars().take(160).collect();
                        msg.push_str(&format!(" {extra}={x}"));
                    }
                }
                format!("{level} {msg}")
            }
            Err(_) => format!("(text) {}", line.chars().take(160).collect::<String>()),
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

fn print_log_summary(path: &Path) {
    let counts = log_summary(path);
    if counts.is_empty() {
        println!("  gateway log: nothing at WARN or above (nor OPC UA INFO)");
    }
    for (msg, n) in counts.iter().take(12) {
        println!("  gateway log: {n} x {msg}");
    }
    if counts.len() > 12 {
        println!("  gateway log: ... {} more kinds", counts.len() - 12);
    }
}

fn main() -> std::process::ExitCode {
    match bench() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("opcua bench failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn bench() -> anyhow::Result<()> {
    gateway::tls::install_default_provider();
    let args = Args::parse();
    if args.items == 0 || args.devices == 0 || args.devices > args.items {
        bail!("--items and --devices must be at least 1, and --devices at most --items");
    }
    let bin = twin_testkit::bench::gateway_bin(args.gateway_bin.clone())?;
    let pki = TestPki::new(GW)?;
    // The simulator on a runtime of its own, so that its threads (and CPU)
    // are told apart from the subscriber's.
    let sim_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(SIM_THREAD)
        .thread_keep_alive(Duration::from_secs(3600))
        .enable_all()
        .build()?;
    let mut opts = OpcUaSimOptions::new(pki.root().join("sim-pki"))
        .user(USER, PASSWORD)
        .security(SimSecurity::Secure)
        .bulk(args.items);
    opts.default_limits = args.default_limits;
    let sim = sim_rt.block_on(OpcUaSim::start(opts))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-twin")
        .enable_all()
        .build()?;
    let result = rt.block_on(run(&args, &bin, &pki, &sim));
    sim_rt.block_on(sim.stop());
    drop(rt);
    sim_rt.shutdown_timeout(Duration::from_secs(2));
    result
}

/// The gateway's OPC UA client files, the password file, the simulator's
/// certificate in the trust list, and the configuration; returns its path.
fn gateway_files(
    args: &Args,
    pki: &TestPki,
    sim: &OpcUaSim,
    broker_port: u16,
) -> anyhow::Result<PathBuf> {
    let root = pki.root();
    let files = pki.files();
    let uri = gateway::pki::create_opcua_client(
        &files,
        GW,
        gateway::pki::Validity::days(30),
        twin_testkit::pki::TEST_OU,
    )?;
    let opc = files.opcua_dir.clone();
    gateway::keyfile::write_private(&root.join("opc.password"), &format!("{PASSWORD}\n"))?;
    sim.install_trust(&opc.join("trusted"))?;
    let per = args.items.div_ceil(args.devices);
    let mut devices = String::with_capacity(args.items as usize * 100);
    for d in 0..args.devices {
        devices.push_str(&format!(
            r#"
[[devices]]
name = "opc-bulk{d}"
protocol = "opcua"
endpoint_url = "{url}"
certificate_file = "pki/opcua/own/cert.der"
private_key_file = "pki/opcua/private/private.pem"
application_uri = "{uri}"
user = "{USER}"
password_file = "opc.password"
sampling_interval_ms = {sampling}
publishing_interval_ms = {publishing}
queue_size = {queue}
"#,
            url = sim.endpoint_url(),
            sampling = args.sampling_ms,
            publishing = args.publishing_ms,
            queue = args.queue_size,
        ));
        for i in d * per..((d + 1) * per).min(args.items) {
            devices.push_str(&format!(
                "[[devices.tags]]\nname = \"opc.b{i}\"\nnode_id = \"nsu={NAMESPACE_URI};s={}\"\ntype = \"double\"\n",
                bulk_node(i)
            ));
        }
    }
    let config = format!(
        "{}{devices}",
        twin_testkit::gateway_toml(GW, broker_port, "max_message_bytes = 131072\n")
    );
    let path = root.join("bench.toml");
    std::fs::write(&path, config)?;
    gateway::config::load(&path).map_err(|e| anyhow::anyhow!("bench configuration: {e}"))?;
    Ok(path)
}

async fn run(args: &Args, bin: &Path, pki: &TestPki, sim: &OpcUaSim) -> anyhow::Result<()> {
    let broker = Mosquitto::start(pki, BrokerOptions::default()).await?;
    let cfg_path = gateway_files(args, pki, sim, broker.port())?;

    // The verifying subscriber.
    let (_client, events, watcher) =
        twin_testkit::bench::subscribe_twin(&broker, pki, GW, true).await?;
    let mut twin = Twin {
        events,
        watcher,
        latency: (0, 0, 0),
    };

    let log_path = pki.root().join("gateway.log");
    let log = std::fs::File::create(&log_path)?;
    let mut child = std::process::Command::new(bin)
        .args(["--log-format", "json", "run", "-c"])
        .arg(&cfg_path)
        .env("RUST_LOG", &args.gateway_log)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    let result = measure(args, sim, &mut twin, pid, &log_path, &mut child).await;
    // SAFETY: SIGTERM to our own child, not yet reaped.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    drop(broker);
    if let Some(keep) = &args.keep_log {
        if let Err(e) = std::fs::copy(&log_path, keep) {
            eprintln!("cannot copy the gateway log to {}: {e}", keep.display());
        }
    }
    result
}

async fn measure(
    args: &Args,
    sim: &OpcUaSim,
    twin: &mut Twin,
    pid: u32,
    log_path: &Path,
    child: &mut std::process::Child,
) -> anyhow::Result<()> {
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (idle_rss, _) = proc_stat(pid)?;
    let mosquitto = child_named("mosquitto");
    let mut peak_rss = idle_rss;

    // Until every tag is good at the twin.
    let ready_by = started + Duration::from_secs(args.ready_timeout_s);
    let mut next_sample = Instant::now();
    while twin.good_tags() < args.items as usize {
        if let Some(status) = child.try_wait()? {
            print_log_summary(log_path);
            bail!("the gateway exited: {status}");
        }
        if Instant::now() >= ready_by {
            let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
            let view = twin.view();
            for i in 0..args.items {
                let r = match view.tags.get(&format!("opc.b{i}")) {
                    None => "never reported".to_string(),
                    Some(t) if t.quality == Quality::Good => "good".to_string(),
                    Some(t) => format!("{:?} {}", t.quality, t.reason.as_deref().unwrap_or("")),
                };
                *reasons.entry(r).or_default() += 1;
            }
            println!(
                "opcua bench: {} items on {} device(s): not every tag good after {} s",
                args.items, args.devices, args.ready_timeout_s
            );
            for (r, n) in reasons {
                println!("  {n} tags: {r}");
            }
            println!(
                "  gateway RSS idle {:.1} MiB, peak {:.1} MiB",
                idle_rss as f64 / 1024.0,
                peak_rss as f64 / 1024.0
            );
            print_log_summary(log_path);
            bail!("the tags did not all become good");
        }
        twin.pump(Duration::from_millis(100)).await;
        if Instant::now() >= next_sample {
            next_sample = Instant::now() + Duration::from_millis(250);
            peak_rss = peak_rss.max(proc_stat(pid)?.0);
        }
    }
    let ready_after = started.elapsed();

    let warm_until = Instant::now() + WARMUP;
    while Instant::now() < warm_until {
        twin.pump(Duration::from_millis(100)).await;
        if Instant::now() >= next_sample {
            next_sample = Instant::now() + Duration::from_millis(250);
            peak_rss = peak_rss.max(proc_stat(pid)?.0);
        }
    }

    // The window: everything read at the same instant at both ends.
    let load_start = loadavg();
    let sim_tick = |sim: &OpcUaSim| match sim.value(&bulk_node(0)) {
        Some(opcua::types::Variant::Double(v)) => v.round() as u64,
        _ => 0,
    };
    let tick0 = sim_tick(sim);
    let cpu0 = Cpu::now(pid, mosquitto)?;
    let points0 = twin.view().points;
    let ticks0 = twin.ticks(args.items);
    let (rss0, _) = proc_stat(pid)?;
    twin.latency = (0, 0, 0);
    let end = cpu0.at + Duration::from_secs(args.seconds);
    let mut min_rss = rss0;
    while Instant::now() < end {
        twin.pump(Duration::from_millis(50)).await;
        if Instant::now() >= next_sample {
            next_sample = Instant::now() + Duration::from_millis(250);
            let (rss, _) = proc_stat(pid)?;
            peak_rss = peak_rss.max(rss);
            min_rss = min_rss.min(rss);
        }
    }
    let tick1 = sim_tick(sim);
    let cpu1 = Cpu::now(pid, mosquitto)?;
    let view = twin.view();
    let points1 = view.points;
    let ticks1 = twin.ticks(args.items);
    let (rss1, _) = proc_stat(pid)?;
    let load_end = loadavg();
    let at_end_ms = now_ms();
    let latency = twin.latency;

    let secs = (cpu1.at - cpu0.at).as_secs_f64();
    let points = points1 - points0;
    let rate = points as f64 / secs;
    let sim_rate = (tick1 - tick0) as f64 / secs;
    let mut changes = 0u64;
    let mut unknown = 0u32;
    for ((a, _), (b, _)) in ticks0.iter().zip(&ticks1) {
        match (a, b) {
            (Some(a), Some(b)) => changes += b.saturating_sub(*a),
            _ => unknown += 1,
        }
    }
    let good_end = ticks1.iter().filter(|(t, _)| t.is_some()).count();
    let ages: Vec<u64> = ticks1
        .iter()
        .map(|(_, ts)| at_end_ms.saturating_sub(*ts))
        .collect();
    let age_mean = ages.iter().sum::<u64>() as f64 / ages.len().max(1) as f64;
    let age_max = ages.iter().copied().max().unwrap_or(0);
    let per_s = |a: f64, b: f64| (b - a) / secs;
    let gw_cpu = cpu1.gateway - cpu0.gateway;
    let cores = (cpu1.machine_total - cpu0.machine_total) / secs;
    let busy = per_s(cpu0.machine_busy, cpu1.machine_busy);
    let ours = per_s(cpu0.gateway, cpu1.gateway)
        + per_s(cpu0.sim, cpu1.sim)
        + per_s(cpu0.bench, cpu1.bench)
        + per_s(cpu0.mosquitto, cpu1.mosquitto);
    let mib = |k: u64| k as f64 / 1024.0;

    println!(
        "opcua bench: {} monitored items on {} device(s), sampling {} ms, publishing {} ms, queue {}, {secs:.1} s measured{}",
        args.items,
        args.devices,
        args.sampling_ms,
        args.publishing_ms,
        args.queue_size,
        if args.default_limits { ", simulator with default limits" } else { "" }
    );
    println!(
        "  all {} tags good at the twin within {:.1} s of the gateway's start (checked from 0.3 s on)",
        args.items,
        ready_after.as_secs_f64()
    );
    println!(
        "  simulator: {sim_rate:.2} ticks/s (10 expected), i.e. {:.0} changes/s produced for the {} items",
        sim_rate * f64::from(args.items),
        args.items
    );
    println!("  verified at the twin: {points} points = {rate:.0} points/s");
    if unknown == 0 {
        println!(
            "  delivered: {points} points for {changes} changes of the items at the server ({:.2} %; {} lost)",
            100.0 * points as f64 / changes.max(1) as f64,
            changes.saturating_sub(points)
        );
    } else {
        println!(
            "  delivered: unknown, {unknown} tags without a good value at the start or the end of the window"
        );
    }
    println!(
        "  gateway CPU: {:.3} CPU-s per s ({:.1} % of one core), {:.2} CPU-s per million points",
        gw_cpu / secs,
        100.0 * gw_cpu / secs,
        if points > 0 {
            gw_cpu / (points as f64 / 1e6)
        } else {
            f64::NAN
        }
    );
    println!(
        "  gateway RSS: idle {:.1} MiB (300 ms after start), {:.1} MiB at the window's start, {:.1} MiB at its end, min {:.1} / peak {:.1} MiB",
        mib(idle_rss),
        mib(rss0),
        mib(rss1),
        mib(min_rss),
        mib(peak_rss)
    );
    println!(
        "  other CPU (CPU-s per s): simulator {:.3}, verifying subscriber {:.3}, mosquitto {:.3}",
        per_s(cpu0.sim, cpu1.sim),
        per_s(cpu0.bench, cpu1.bench),
        per_s(cpu0.mosquitto, cpu1.mosquitto)
    );
    println!(
        "  machine: {busy:.2} of {cores:.1} cores busy, {ours:.2} by the bench's processes, {:.2} by others; load average {load_start} -> {load_end}",
        (busy - ours).max(0.0)
    );
    println!(
        "  batch latency (signed -> verified): mean {:.0} ms, max {} ms over {} batches; tag age at the end: mean {age_mean:.0} ms, max {age_max} ms; {good_end} of {} tags good",
        latency.1 as f64 / latency.0.max(1) as f64,
        latency.2,
        latency.0,
        args.items
    );
    for g in view.gap_records.values() {
        println!(
            "  gateway dropped {} batches ({:?} points): {}",
            g.batches(),
            g.points,
            g.reason
        );
    }
    println!(
        "  rejected {}, missing batches {}, unexplained {}, duplicates {}, batches in total {}",
        twin.watcher.rejected,
        view.missing(),
        view.unexplained(),
        view.duplicates,
        view.batches
    );
    print_log_summary(log_path);
    if twin.watcher.rejected > 0 || view.missing() > 0 || view.unexplained() > 0 {
        bail!("the twin saw rejected or missing batches");
    }
    if good_end < args.items as usize {
        bail!(
            "{} of {} tags were not good at the end",
            args.items as usize - good_end,
            args.items
        );
    }
    Ok(())
}
