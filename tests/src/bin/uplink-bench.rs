//! Uplink throughput bench: simulated devices -> the `gateway` binary (a
//! separate process) -> real Mosquitto (mTLS) -> a verifying subscriber.
//!
//! Reports verified points per second at the twin, the gateway's CPU
//! seconds per million points, and its resident memory (idle before the
//! devices answer, and peak under load). Fails if any message is rejected
//! or any batch is missing.
//!
//! With `--outage-s N` it also measures a broker outage: after the live
//! window the broker is stopped for N seconds (Mosquitto with persistence,
//! and a persistent twin session, so the twin's own session survives), then
//! started again. Reported: the live rate before the outage, the drain rate
//! after it (verified points per second from the restart until the twin
//! receives batches signed after the restart with nothing missing), their
//! ratio, the outbox's bytes on disk per stored point (size of
//! `data/outbox.redb` at the end of the outage over the points signed
//! during it; the batches' `created_ms` tell which), and the gateway's
//! fsync-type system calls per second during the outage, counted by running
//! it under `strace -f --seccomp-bpf` (only those calls stop the process;
//! `--no-strace` turns this off). The broker's per-client queue limit
//! (`max_queued_messages`, 1000 by default) is lifted so that the broker
//! does not drop the twin's backlog; the bench measures the gateway.
//!
//! ```sh
//! cargo build --release -p gateway -p twin-testkit --bin gateway --bin uplink-bench
//! target/release/uplink-bench --tags 4000 --devices 4 --poll-ms 20 --seconds 10
//! target/release/uplink-bench --tags 2000 --devices 4 --poll-ms 50 --seconds 10 --outage-s 60
//! ```

use anyhow::{bail, Context as _};
use clap::Parser;
use rumqttc::{Event, Packet};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use twin_testkit::bench::{created_ms, now_ms, proc_stat};
use twin_testkit::mosquitto::{BrokerOptions, Mosquitto};
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
    /// After the measured window, stop the broker for this many seconds and
    /// measure the drain.
    #[arg(long)]
    outage_s: Option<u64>,
    /// Do not run the gateway under strace to count its fsyncs.
    #[arg(long)]
    no_strace: bool,
}

/// System calls that force data to disk.
const SYNC_CALLS: &str = "fsync,fdatasync,sync_file_range,msync,syncfs";

/// The verifying twin: a persistent or clean MQTT session and the watcher.
struct Twin {
    events: rumqttc::EventLoop,
    watcher: twinctl::watch::Watcher,
    gw: String,
    /// seq -> created_ms of every batch received.
    created: std::collections::HashMap<u64, u64>,
    /// created_ms of the batch with the highest seq.
    latest_created: u64,
}

impl Twin {
    /// Handles messages for up to `wait`; a failed connection is retried.
    async fn pump(&mut self, wait: Duration) {
        match tokio::time::timeout(wait, self.events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let ev = self.watcher.handle(&p.topic, &p.payload);
                if let twinctl::watch::WatchEvent::Batch { seq, .. } = ev {
                    if let Some(c) = created_ms(&p.payload) {
                        self.created.insert(seq, c);
                        if Some(seq) == self.watcher.view(&self.gw).map(|v| v.latest_seq) {
                            self.latest_created = c;
                        }
                    }
                }
            }
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }

    fn view(&self) -> twinctl::watch::GatewayView {
        self.watcher.view(&self.gw).cloned().unwrap_or_default()
    }
}

/// The pid of the first child of `pid` (the gateway under strace).
async fn child_of(pid: u32) -> anyhow::Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(c) = children.split_whitespace().next() {
            return Ok(c.parse()?);
        }
        if Instant::now() >= deadline {
            bail!("strace did not start the gateway within 5 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sync calls in an `strace -ttt` output between two instants (ms since the epoch).
fn sync_calls(trace: &str, from_ms: u64, to_ms: u64) -> u64 {
    trace
        .lines()
        .filter(|l| SYNC_CALLS.split(',').any(|c| l.contains(&format!(" {c}("))))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .filter(|t| (from_ms as f64..to_ms as f64).contains(&(t * 1000.0)))
        .count() as u64
}

fn main() -> anyhow::Result<()> {
    gateway::tls::install_default_provider();
    let args = Args::parse();
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bin = twin_testkit::bench::gateway_bin(args.gateway_bin.clone())?;
    let gw_id = "bench-gw";
    let pki = TestPki::new(gw_id)?;
    let outage = args.outage_s.map(Duration::from_secs);
    let mut broker = Mosquitto::start(
        &pki,
        BrokerOptions {
            persistence: outage.is_some(),
            ..Default::default()
        },
    )
    .await?;
    if outage.is_some() {
        // 0: no limit on the messages queued for one client.
        let conf = broker.dir().join("mosquitto.conf");
        let mut text = std::fs::read_to_string(&conf)?;
        text.push_str("max_queued_messages 0\n");
        std::fs::write(&conf, text)?;
        broker.restart().await?;
    }
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
        "{}{devices}",
        twin_testkit::gateway_toml(gw_id, broker.port(), "max_message_bytes = 131072\n")
    );
    let cfg_path = pki.root().join("bench.toml");
    std::fs::write(&cfg_path, config)?;

    // The verifying subscriber.
    let (_client, events, watcher) =
        twin_testkit::bench::subscribe_twin(&broker, &pki, gw_id, outage.is_none()).await?;
    let mut twin = Twin {
        events,
        watcher,
        gw: gw_id.to_owned(),
        created: Default::default(),
        latest_created: 0,
    };

    let strace = outage.is_some()
        && !args.no_strace
        && std::process::Command::new("strace")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
    let trace_path = pki.root().join("sync.trace");
    let mut cmd = if strace {
        let mut c = std::process::Command::new("strace");
        c.args(["-f", "--seccomp-bpf", "-qq", "-ttt", "-e"])
            .arg(format!("trace={SYNC_CALLS}"))
            .arg("-o")
            .arg(&trace_path)
            .arg(&bin);
        c
    } else {
        std::process::Command::new(&bin)
    };
    let mut child = cmd
        .args(["run", "-c"])
        .arg(&cfg_path)
        .env("RUST_LOG", "warn")
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = if strace {
        child_of(child.id()).await?
    } else {
        child.id()
    };
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
        twin.pump(Duration::from_millis(100)).await;
        let now = Instant::now();
        if now >= next_sample {
            next_sample = now + Duration::from_millis(250);
            let (rss, cpu) = proc_stat(pid)?;
            peak_rss = peak_rss.max(rss);
            if !measuring && now >= warmup {
                measuring = true;
                start_points = twin.view().points;
                start_cpu = cpu;
            }
        }
    }
    let (_, end_cpu) = proc_stat(pid)?;
    let view = twin.view();
    let points = view.points - start_points;
    let rate = points as f64 / args.seconds as f64;
    let cpu = end_cpu - start_cpu;

    let outbox_file = pki.root().join("data").join("outbox.redb");
    let file_size = || std::fs::metadata(&outbox_file).map_or(0, |m| m.len());
    let mut outage_report = None;
    if let Some(outage) = outage {
        let size_before = file_size();
        let stop_ms = now_ms();
        broker.stop().await;
        let back = Instant::now() + outage;
        while Instant::now() < back {
            twin.pump(Duration::from_millis(100)).await;
            let (rss, _) = proc_stat(pid)?;
            peak_rss = peak_rss.max(rss);
        }
        let size_after = file_size();
        let restart_ms = now_ms();
        let restart = Instant::now();
        broker.restart().await?;
        let points_at_restart = twin.view().points;
        let caught_up = |t: &Twin| t.latest_created >= restart_ms && t.view().unexplained() == 0;
        let limit = restart + Duration::from_secs(600).max(outage * 3);
        // The gateway reconnects after its backoff (up to reconnect_max_ms):
        // the drain is timed from the first batch that arrives after that.
        while twin.view().points == points_at_restart {
            if Instant::now() >= limit {
                bail!("the gateway did not reconnect within {:?}", limit - restart);
            }
            twin.pump(Duration::from_millis(20)).await;
        }
        let reconnect = restart.elapsed();
        println!(
            "  reconnected {:.2} s after the broker came back (backoff)",
            reconnect.as_secs_f64()
        );
        let restart = Instant::now();
        while !caught_up(&twin) {
            if Instant::now() >= limit {
                bail!("the twin did not catch up within {:?}", limit - restart);
            }
            twin.pump(Duration::from_millis(100)).await;
            let (rss, _) = proc_stat(pid)?;
            peak_rss = peak_rss.max(rss);
        }
        let drain = restart.elapsed();
        let v = twin.view();
        let drained_points = v.points - points_at_restart;
        let in_outage: Vec<u64> = twin
            .created
            .iter()
            .filter(|(_, c)| (stop_ms..restart_ms).contains(*c))
            .map(|(s, _)| *s)
            .collect();
        let stored_points: u64 = in_outage.iter().filter_map(|s| v.batch_points.get(s)).sum();
        outage_report = Some((
            outage,
            size_before,
            size_after,
            in_outage.len(),
            stored_points,
            drain,
            drained_points,
            stop_ms,
            restart_ms,
        ));
    }

    // SAFETY: sending SIGTERM to our own child (or to strace's child, the
    // gateway, which strace has not reaped while it runs).
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    let view = twin.view();
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
    if let Some((
        outage,
        size_before,
        size_after,
        batches,
        stored,
        drain,
        drained,
        stop_ms,
        restart_ms,
    )) = outage_report
    {
        let drain_rate = drained as f64 / drain.as_secs_f64();
        println!(
            "  broker outage {} s: {batches} batches / {stored} points signed and stored meanwhile",
            outage.as_secs()
        );
        println!(
            "  live rate before {rate:.0} points/s; drain {drained} points in {:.2} s = {drain_rate:.0} points/s; drain/live {:.1}x",
            drain.as_secs_f64(),
            drain_rate / rate
        );
        println!(
            "  outbox file {:.1} MiB -> {:.1} MiB: {:.1} bytes on disk per stored point ({:.1} per point of growth)",
            size_before as f64 / 1048576.0,
            size_after as f64 / 1048576.0,
            size_after as f64 / stored.max(1) as f64,
            size_after.saturating_sub(size_before) as f64 / stored.max(1) as f64
        );
        if strace {
            let trace = std::fs::read_to_string(&trace_path).unwrap_or_default();
            let during = sync_calls(&trace, stop_ms, restart_ms);
            println!(
                "  fsync-type calls during the outage (strace): {during} = {:.1}/s ({:.2} batches per sync)",
                during as f64 / outage.as_secs_f64(),
                batches as f64 / during.max(1) as f64
            );
        } else {
            println!("  fsyncs not counted (no strace)");
        }
    }
    let mut by_reason: std::collections::BTreeMap<&str, (u64, u64, Option<u64>)> =
        Default::default();
    for g in view.gap_records.values() {
        let e = by_reason.entry(&g.reason).or_insert((0, 0, Some(0)));
        e.0 += 1;
        e.1 += g.batches();
        e.2 = e.2.zip(g.points).map(|(a, b)| a + b);
    }
    for (why, (records, batches, points)) in by_reason {
        println!(
            "  gateway dropped {batches} batches, {points:?} points ({why}) in {records} signed gap record(s)"
        );
    }
    println!(
        "  rejected {}, missing batches {}, unexplained {}, duplicates {}",
        twin.watcher.rejected,
        view.missing(),
        view.unexplained(),
        view.duplicates
    );
    if twin.watcher.rejected > 0 || view.unexplained() > 0 {
        bail!("the twin saw rejected or missing batches");
    }
    Ok(())
}
