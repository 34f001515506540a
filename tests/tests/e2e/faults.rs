//! Faults, end to end: "never lose a value", counted.
//!
//! Each test runs a real Mosquitto, the simulated PLC and a verifying twin,
//! injects one kind of fault and then checks the books: every sequence
//! number the gateway signed either reached the twin (duplicates dropped
//! by (gateway, seq)) or is named by a signed gap record, and the twin
//! refused nothing.
//!
//! - broker outage under load (gateway in this process)
//! - `kill -9` of the gateway process, several times, at random moments
//! - the outbox bound reached during a long outage (`outbox_full`)
//! - a stored batch altered on disk (caught by redb's page checksums when
//!   the outbox opens: the file is set aside, `outbox_lost`; a record that
//!   got past them would be `quarantined`), the outbox file cut in half
//!   (`outbox_lost`)
//! - SIGTERM: a quick exit 0, and a restart continues the chain
//!
//! The process tests run the `gateway` binary of the debug profile
//! (`cargo build -p gateway`); its log goes to `gateway.log` in the test's
//! PKI folder and is printed when a step fails.

use super::{init, tank_config, write_config, Twin, GW};
use anyhow::{bail, ensure, Context as _};
use gateway::mqtt::LinkState;
use rand::Rng as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use twin_model::gap::reason;
use twin_model::Continuity;
use twin_testkit::mosquitto::{BrokerOptions, Mosquitto};
use twin_testkit::pki::TestPki;
use twin_testkit::sim::PlcSim;
use twinctl::watch::WatchEvent;

/// The twin remembers this many batch hashes: every re-sent batch is
/// recognised as a duplicate, never taken for a replay.
const WINDOW: usize = 1 << 20;

fn persistent_broker() -> BrokerOptions {
    BrokerOptions {
        persistence: true,
        ..Default::default()
    }
}

/// The `gateway` binary the process tests run.
fn gateway_bin() -> anyhow::Result<PathBuf> {
    let root = twin_testkit::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| root.join(d))
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("debug/gateway");
    ensure!(
        bin.is_file(),
        "{} not found: the process tests run the real gateway binary; build it with \
         `cargo build -p gateway` (`cargo test --workspace --all-targets` builds it too)",
        bin.display()
    );
    Ok(bin)
}

/// The example configuration (tank PLC) as a file for the gateway process,
/// with a fast poll and quick reconnects.
fn process_config(
    pki: &TestPki,
    broker_port: u16,
    plc: std::net::SocketAddr,
    poll_ms: u64,
) -> anyhow::Result<PathBuf> {
    let mut text = twin_testkit::render_example_config(broker_port, plc)?;
    for (from, to) in [
        (
            "poll_interval_ms = 1000",
            format!("poll_interval_ms = {poll_ms}"),
        ),
        (
            "request_timeout_ms = 1000",
            "request_timeout_ms = 300".into(),
        ),
        (
            "reported_interval_ms = 1000",
            "reported_interval_ms = 100".into(),
        ),
        ("reconnect_min_ms = 500", "reconnect_min_ms = 100".into()),
        ("reconnect_max_ms = 30000", "reconnect_max_ms = 500".into()),
        ("reconnect_min_ms = 200", "reconnect_min_ms = 50".into()),
        ("reconnect_max_ms = 10000", "reconnect_max_ms = 300".into()),
    ] {
        ensure!(
            text.matches(from).count() == 1,
            "the example configuration must contain `{from}` exactly once"
        );
        text = text.replace(from, &to);
    }
    let path = pki.root().join("gateway.toml");
    std::fs::write(&path, text)?;
    gateway::config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(path)
}

/// The data directory of the configurations above.
fn data_dir(pki: &TestPki) -> PathBuf {
    pki.root().join("data")
}

/// The chain position the gateway left in its data directory (written at
/// every orderly stop, so exact after one).
fn last_signed_seq(pki: &TestPki) -> anyhow::Result<u64> {
    Ok(gateway::uplink::state::StateFile::new(&data_dir(pki))
        .load()?
        .seq)
}

/// The gateway as a separate process, as in production. Killed when dropped.
struct GatewayProcess {
    child: tokio::process::Child,
    log: PathBuf,
}

impl GatewayProcess {
    async fn start(config: &Path) -> anyhow::Result<Self> {
        let bin = gateway_bin()?;
        let log = config.with_file_name("gateway.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = tokio::process::Command::new(&bin)
            .args(["run", "-c"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(GatewayProcess { child, log })
    }

    /// Starts the gateway and waits until `done` holds at the twin; the
    /// error carries the gateway's log.
    async fn start_until(
        config: &Path,
        twin: &mut Twin,
        timeout: Duration,
        what: &str,
        done: impl FnMut(&Twin) -> bool,
    ) -> anyhow::Result<Self> {
        let gw = Self::start(config).await?;
        if let Err(e) = twin.until(timeout, what, done).await {
            bail!("{e:#}\ngateway log:\n{}", gw.log());
        }
        Ok(gw)
    }

    /// Takes the broker away, lets batches pile up in the outbox for
    /// `pile_up`, then stops the gateway, which must exit with 0.
    async fn stop_during_outage(
        &mut self,
        broker: &mut Mosquitto,
        pile_up: Duration,
    ) -> anyhow::Result<()> {
        broker.stop().await;
        tokio::time::sleep(pile_up).await;
        let (code, _) = self.terminate().await?;
        ensure!(code == Some(0), "exit code {code:?}; log:\n{}", self.log());
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, as in a crash or an OOM kill.
    async fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// SIGTERM; returns the exit code and how long the process took to exit.
    async fn terminate(&mut self) -> anyhow::Result<(Option<i32>, Duration)> {
        let pid = self
            .child
            .id()
            .context("the gateway process already exited")?;
        let t = Instant::now();
        // SAFETY: kill(2) on our own child, not reaped yet (tokio reaps only
        // through `self.child`), so the pid cannot name another process.
        unsafe { libc::kill(libc::pid_t::try_from(pid)?, libc::SIGTERM) };
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .with_context(|| format!("no exit 15 s after SIGTERM; log:\n{}", self.log()))??;
        Ok((status.code(), t.elapsed()))
    }
}

/// A stopped gateway process with batches stored in its outbox: some were
/// delivered, then the broker (persistent sessions) went away for a while.
struct Stored {
    pki: TestPki,
    broker: Mosquitto,
    plc: PlcSim,
    twin: Twin,
    config: PathBuf,
    gw: GatewayProcess,
}

impl Stored {
    async fn after_batches(delivered: u64, pile_up: Duration) -> anyhow::Result<Stored> {
        let pki = TestPki::new(GW)?;
        let mut broker = Mosquitto::start(&pki, persistent_broker()).await?;
        let plc = PlcSim::start("127.0.0.1:0".parse()?).await?;
        let mut twin = Twin::start_with(&broker, &pki, WINDOW, true).await?;
        let config = process_config(&pki, broker.port(), plc.addr(), 50)?;
        let mut gw = GatewayProcess::start_until(
            &config,
            &mut twin,
            Duration::from_secs(15),
            &format!("{delivered} batches"),
            |t| t.view().batches >= delivered,
        )
        .await?;
        gw.stop_during_outage(&mut broker, pile_up).await?;
        Ok(Stored {
            pki,
            broker,
            plc,
            twin,
            config,
            gw,
        })
    }
}

/// Waits until the gateway process logs `needle` (or fails after `timeout`).
async fn until_logged(
    gw: &mut GatewayProcess,
    needle: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !gw.log().contains(needle) {
        if !gw.is_running() {
            bail!(
                "the gateway exited before logging {needle:?}; log:\n{}",
                gw.log()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "the gateway did not log {needle:?} within {timeout:?}; log:\n{}",
                gw.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Seq and continuity of every batch the twin saw from event `from` on.
fn batch_events(twin: &Twin, from: usize) -> Vec<(u64, Continuity)> {
    twin.events[from..]
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Batch {
                seq, continuity, ..
            } => Some((*seq, continuity.clone())),
            _ => None,
        })
        .collect()
}

fn has_gap_record(twin: &Twin, why: &str) -> bool {
    twin.view().gap_records.values().any(|g| g.reason == why)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_outage_under_load_loses_no_value_and_every_point_signed_arrives(
) -> anyhow::Result<()> {
    init();
    let pki = TestPki::new(GW)?;
    let mut broker = Mosquitto::start(&pki, persistent_broker()).await?;
    let plc = PlcSim::start("127.0.0.1:0".parse()?).await?;
    // Subscribed before the gateway's first batch, with a session the
    // broker keeps across its restart: the twin can count from seq 1.
    let mut twin = Twin::start_with(&broker, &pki, WINDOW, true).await?;
    let cfg = tank_config(&pki, broker.port(), plc.addr(), 20)?;
    let gw = gateway::run::start(cfg).await?;
    let stats = gw.uplink_stats.clone();
    let outbox = gw.outbox.clone().context("the outbox opened")?;
    twin.until(
        Duration::from_secs(15),
        "30 batches before the outage",
        |t| t.view().batches >= 30,
    )
    .await?;

    broker.stop().await;
    let mut link = gw.link.clone();
    tokio::time::timeout(
        Duration::from_secs(5),
        link.wait_for(|s| matches!(s, LinkState::Failed(_))),
    )
    .await
    .context("the gateway noticed the outage")??;
    let seq_at_outage = stats.last_seq.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seq_at_restart = stats.last_seq.load(Ordering::Relaxed);
    let stored = outbox.len();
    broker.restart().await?;
    tokio::time::timeout(
        Duration::from_secs(10),
        link.wait_for(|s| *s == LinkState::Connected),
    )
    .await
    .context("the gateway reconnected")??;
    twin.until(
        Duration::from_secs(15),
        "every batch signed during the outage",
        |t| t.view().latest_seq >= seq_at_restart,
    )
    .await?;
    // Load goes on after the outage, then an orderly stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(gw.stop().await.is_empty(), "every task stopped in time");
    let last_seq = stats.last_seq.load(Ordering::Relaxed);
    let signed_points = stats.points.load(Ordering::Relaxed);
    twin.until(
        Duration::from_secs(10),
        "every signed batch after the stop",
        |t| t.view().latest_seq == last_seq && t.view().batches == last_seq,
    )
    .await?;

    let v = twin.view();
    let batches = batch_events(&twin, 0);
    eprintln!(
        "outage: seq {seq_at_outage}..{seq_at_restart} signed while the broker was down \
         ({stored} batches waiting at the restart); {} batches, {} points signed; \
         twin: {} batches, {} points, {} duplicates",
        last_seq, signed_points, v.batches, v.points, v.duplicates
    );
    assert!(
        seq_at_restart > seq_at_outage + 10,
        "batches were signed under load during the outage"
    );
    // Counting starts at the gateway's first batch: a fresh data directory
    // begins at seq 1 and the twin was subscribed before it was signed.
    assert_eq!(batches.first(), Some(&(1, Continuity::First)));
    assert_eq!(v.unexplained(), 0, "gaps {:?}", v.gaps);
    assert!(v.gaps.is_empty(), "no gap at all: {:?}", v.gaps);
    assert_eq!(
        v.batches, last_seq,
        "every seq 1..={last_seq} received once"
    );
    assert_eq!(v.points, signed_points, "every point signed was received");
    assert!(v.gap_records.is_empty(), "{:?}", v.gap_records);
    assert!(twin.rejections().is_empty(), "{:?}", twin.rejections());
    assert_eq!(outbox.len(), 0, "nothing left in the outbox");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_at_random_moments_loses_no_sequence_number() -> anyhow::Result<()> {
    init();
    let pki = TestPki::new(GW)?;
    let broker = Mosquitto::start(&pki, BrokerOptions::default()).await?;
    let plc = PlcSim::start("127.0.0.1:0".parse()?).await?;
    let mut twin = Twin::start_with(&broker, &pki, WINDOW, false).await?;
    let config = process_config(&pki, broker.port(), plc.addr(), 20)?;
    let mut gw = GatewayProcess::start_until(
        &config,
        &mut twin,
        Duration::from_secs(15),
        "10 batches",
        |t| t.view().batches >= 10,
    )
    .await?;

    let mut rng = rand::rng();
    let kills = rng.random_range(3..=4);
    let mut delays = Vec::new();
    for _ in 0..kills {
        let delay = Duration::from_millis(rng.random_range(500..=2000));
        delays.push(delay);
        tokio::time::sleep(delay).await;
        gw.kill9().await?;
        gw = GatewayProcess::start(&config).await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (code, took) = gw.terminate().await?;
    ensure!(code == Some(0), "exit code {code:?}; log:\n{}", gw.log());
    let last = last_signed_seq(&pki)?;
    if let Err(e) = twin
        .until(Duration::from_secs(20), "every seq up to the last", |t| {
            t.view().latest_seq == last && t.view().batches == last
        })
        .await
    {
        bail!(
            "{e:#}\ntwin latest {} batches {} gaps {:?}\ngateway log:\n{}",
            twin.view().latest_seq,
            twin.view().batches,
            twin.view().gaps,
            gw.log()
        );
    }
    let v = twin.view();
    eprintln!(
        "kill -9 x{kills} after {delays:?}: {last} batches signed, {} received once, \
         {} duplicates dropped; final SIGTERM exit took {took:?}",
        v.batches, v.duplicates
    );
    assert_eq!(v.unexplained(), 0, "gaps {:?}", v.gaps);
    assert!(v.gap_records.is_empty(), "{:?}", v.gap_records);
    // A batch signed but not yet stored when the process died was never
    // published, so reusing its seq after the restart is invisible: the
    // verifier must not see two different batches with one seq.
    let rejections = twin.rejections();
    assert!(
        !rejections.iter().any(|c| c == "conflict"),
        "a seq was published twice with different content: {rejections:?}"
    );
    assert!(rejections.is_empty(), "{rejections:?}");
    Ok(())
}

/// A bulk device of `tags` u16 registers with the given outbox bound.
fn bulk_config(
    pki: &TestPki,
    broker_port: u16,
    plc: std::net::SocketAddr,
    tags: u16,
    poll_ms: u64,
    max_size_mib: u64,
) -> anyhow::Result<gateway::config::Config> {
    let head = twin_testkit::gateway_toml(GW, broker_port, "max_message_bytes = 131072\n");
    let mut text = format!(
        r#"{head}[outbox]
max_size_mib = {max_size_mib}

[[devices]]
name = "bulk"
protocol = "modbus-tcp"
address = "{plc}"
poll_interval_ms = {poll_ms}
"#
    );
    for i in 0..tags {
        text.push_str(&format!(
            "[[devices.tags]]\nname = \"bulk.r{i}\"\narea = \"holding_register\"\naddress = {i}\ntype = \"u16\"\n"
        ));
    }
    write_config(pki.root(), &text, poll_ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_outbox_during_a_long_outage_drops_only_what_its_gap_records_account_for(
) -> anyhow::Result<()> {
    init();
    let pki = TestPki::new(GW)?;
    let mut broker = Mosquitto::start(&pki, persistent_broker()).await?;
    let plc = PlcSim::start_bulk("127.0.0.1:0".parse()?, 300).await?;
    let mut twin = Twin::start_with(&broker, &pki, WINDOW, true).await?;
    let cfg = bulk_config(&pki, broker.port(), plc.addr(), 300, 30, 1)?;
    let max_bytes = cfg.outbox.max_bytes;
    let gw = gateway::run::start(cfg).await?;
    let stats = gw.uplink_stats.clone();
    let outbox = gw.outbox.clone().context("the outbox opened")?;
    twin.until(Duration::from_secs(15), "10 batches", |t| {
        t.view().batches >= 10
    })
    .await?;

    broker.stop().await;
    // 300 points every 30 ms: about 0.8 MB a second to store, so the 1 MiB
    // bound is reached within a few seconds; then go on dropping a while.
    let t = Instant::now();
    while outbox.stats.dropped_batches.load(Ordering::Relaxed) < 30 {
        ensure!(
            t.elapsed() < Duration::from_secs(90),
            "the outbox did not overflow within 90 s ({} bytes stored)",
            outbox.stats.bytes.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let filled_after = t.elapsed();
    let stored_bytes = outbox.stats.bytes.load(Ordering::Relaxed);
    assert!(stored_bytes <= max_bytes, "{stored_bytes} > {max_bytes}");
    let seq_at_restart = stats.last_seq.load(Ordering::Relaxed);
    broker.restart().await?;
    twin.until(
        Duration::from_secs(20),
        "the batches signed up to the restart and an outbox_full gap record",
        |t| t.view().latest_seq >= seq_at_restart && has_gap_record(t, reason::OUTBOX_FULL),
    )
    .await?;
    assert!(gw.stop().await.is_empty(), "every task stopped in time");
    let last_seq = stats.last_seq.load(Ordering::Relaxed);
    let signed_points = stats.points.load(Ordering::Relaxed);
    let dropped_points = outbox.stats.dropped_points.load(Ordering::Relaxed);
    let dropped_batches = outbox.stats.dropped_batches.load(Ordering::Relaxed);
    twin.until(
        Duration::from_secs(15),
        "the gateway's last seq, every gap explained",
        |t| t.view().latest_seq == last_seq && t.view().unexplained() == 0,
    )
    .await?;

    let v = twin.view();
    eprintln!(
        "full outbox: {stored_bytes} bytes stored (bound {max_bytes}), full after {filled_after:?}; \
         signed {last_seq} batches / {signed_points} points; twin {} batches / {} points; \
         gateway dropped {dropped_batches} batches / {dropped_points} points in {} gap record(s); \
         twin lost_points {:?}",
        v.batches,
        v.points,
        v.gap_records.len(),
        v.lost_points()
    );
    assert!(v
        .gap_records
        .values()
        .all(|g| g.reason == reason::OUTBOX_FULL));
    let named: u64 = v.gap_records.values().map(|g| g.batches()).sum();
    assert_eq!(named, dropped_batches, "every dropped batch is named once");
    assert_eq!(
        v.lost_points(),
        Some(signed_points - v.points),
        "the twin's drop count equals the points actually missing"
    );
    assert!(dropped_points >= signed_points - v.points);
    assert_eq!(v.unexplained(), 0, "gaps {:?}", v.gaps);
    assert_eq!(
        v.batches + v.missing(),
        last_seq,
        "every seq received or reported missing"
    );
    assert!(twin.rejections().is_empty(), "{:?}", twin.rejections());
    Ok(())
}

/// Where a stored batch sits in the outbox file: its seq and the byte range
/// of its JWS. Plain records are `"TWOB" | 1 | flags 0 | created | points |
/// body_len | body | check` (see `gateway/src/outbox/record.rs`); a page
/// may hold several old copies of a record (copy-on-write), all are found.
fn stored_batches(file: &[u8]) -> Vec<(u64, std::ops::Range<usize>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(pos) = file[at..].windows(4).position(|w| w == b"TWOB") {
        let start = at + pos;
        at = start + 1;
        let Some(h) = file.get(start..start + 22) else {
            break;
        };
        if h[4] != 1 || h[5] != 0 {
            continue;
        }
        let len = u32::from_be_bytes([h[18], h[19], h[20], h[21]]) as usize;
        let body = start + 22..start + 22 + len;
        let seq = file
            .get(body.clone())
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|jws| jws.split('.').nth(1))
            .and_then(twin_model::jws::b64url_decode)
            .and_then(|p| serde_json::from_slice::<serde_json::Value>(&p).ok())
            .and_then(|doc| doc["seq"].as_u64());
        if let Some(seq) = seq {
            out.push((seq, body));
        }
    }
    out
}

/// The `outbox.redb.corrupt-*` files in the data directory.
fn set_aside_files(pki: &TestPki) -> anyhow::Result<Vec<String>> {
    Ok(std::fs::read_dir(data_dir(pki))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("outbox.redb.corrupt-"))
        .collect())
}

/// One byte of one stored batch is flipped while the gateway is stopped.
/// Two outcomes are correct, and which one happens depends on how the
/// outbox opens its database: with redb's integrity check on open, the
/// page checksum catches the flip and the whole file is set aside
/// (`outbox_lost`); without it, redb reads the page back as it is and the
/// record's own check catches it when it is about to be published
/// (`quarantined`). Either way the altered batch never reaches the twin,
/// and a signed gap record names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_altered_in_the_outbox_file_never_reaches_the_twin_and_a_gap_record_names_it(
) -> anyhow::Result<()> {
    init();
    // 1. A few batches delivered, then the broker goes down and batches
    //    accumulate in the outbox.
    let Stored {
        pki,
        mut broker,
        plc: _plc,
        mut twin,
        config,
        gw,
    } = Stored::after_batches(5, Duration::from_secs(2)).await?;
    let signed = last_signed_seq(&pki)?;
    let delivered = twin.view().latest_seq;
    ensure!(
        signed >= delivered + 10,
        "only {} batches stored; log:\n{}",
        signed - delivered,
        gw.log()
    );

    // 2. Flip one base64url character in the payload of one stored,
    //    undelivered batch, in every copy the file holds.
    let path = data_dir(&pki).join(gateway::outbox::FILE_NAME);
    let mut file = std::fs::read(&path)?;
    let found = stored_batches(&file);
    // What the broker acknowledged was deleted; the twin may not have
    // received all of it yet (its session keeps it on the stopped broker).
    let mut seqs: Vec<u64> = found
        .iter()
        .map(|(s, _)| *s)
        .filter(|s| *s > delivered)
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    let first_stored = seqs.first().copied().unwrap_or(signed + 1);
    ensure!(
        first_stored <= delivered + 3 && seqs == (first_stored..=signed).collect::<Vec<_>>(),
        "expected the undelivered batches up to {signed} in {}, found {seqs:?}",
        path.display()
    );
    let target = seqs[seqs.len() / 2];
    let mut copies = 0;
    for (_, body) in found.iter().filter(|(s, _)| *s == target) {
        let dot = file[body.clone()]
            .iter()
            .position(|b| *b == b'.')
            .context("a JWS")?;
        let i = body.start + dot + 20;
        file[i] = if file[i] == b'A' { b'B' } else { b'A' };
        copies += 1;
    }
    std::fs::write(&path, &file)?;

    // 3. Restart with the broker up; run until the gap record and newer
    //    batches arrived, then stop.
    broker.restart().await?;
    let before = twin.events.len();
    let before_batches = batch_events(&twin, 0).len();
    let mut gw = GatewayProcess::start(&config).await?;
    let outcome = twin
        .until(
            Duration::from_secs(20),
            "batches signed after the restart and a gap record",
            |t| t.view().latest_seq > signed + 5 && !t.view().gap_records.is_empty(),
        )
        .await;
    let aside = set_aside_files(&pki)?;
    let v = twin.view();
    eprintln!(
        "altered seq {target} ({copies} cop(y/ies) in the file); stored {first_stored}..={signed}; \
         outbox set aside: {aside:?}; gap records {:?}; twin gaps {:?}",
        v.gap_records.values().collect::<Vec<_>>(),
        v.gaps
    );
    if let Err(e) = outcome {
        bail!("{e:#}\ngateway log:\n{}", gw.log());
    }
    let (code, _) = gw.terminate().await?;
    ensure!(code == Some(0), "exit code {code:?}; log:\n{}", gw.log());
    let last = last_signed_seq(&pki)?;
    twin.until(Duration::from_secs(10), "the last seq", |t| {
        t.view().latest_seq == last
    })
    .await?;

    let v = twin.view();
    let log = gw.log();
    let rejections = twin.rejections();
    assert!(
        rejections.is_empty(),
        "caught before publishing, so the twin refused nothing (no bad_signature): {rejections:?}"
    );
    assert!(
        !v.batch_points.contains_key(&target),
        "the altered batch reached the twin"
    );
    assert!(
        v.gap_records.values().any(|g| g.contains(target)),
        "no gap record names the altered batch {target}: {:?}",
        v.gap_records
    );
    if aside.is_empty() {
        // The record check caught it: exactly this batch is missing.
        assert!(log.contains("quarantined"), "{log}");
        let quarantined: Vec<_> = v
            .gap_records
            .values()
            .filter(|g| g.reason == reason::QUARANTINED)
            .collect();
        assert_eq!(quarantined.len(), 1, "{quarantined:?}");
        assert_eq!(quarantined[0].seqs, vec![[target, target]]);
        assert_eq!(
            quarantined[0].points, None,
            "an altered record's points are unknown"
        );
        assert_eq!(v.gap_records.len(), 1, "{:?}", v.gap_records);
        assert_eq!(v.batches, last - 1, "every other batch 1..={last} arrived");
        assert_eq!(v.gaps, vec![(target, target)]);
    } else {
        // redb's page checksum caught it: the file is set aside, the chain
        // jumps, and one outbox_lost gap record stands for what it held.
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert!(log.contains("set aside"), "{log}");
        let lost: Vec<_> = v
            .gap_records
            .values()
            .filter(|g| g.reason == reason::OUTBOX_LOST)
            .collect();
        assert_eq!(lost.len(), 1, "{:?}", v.gap_records);
        assert_eq!(v.gap_records.len(), 1, "{:?}", v.gap_records);
        let jump = gateway::outbox::LOST_OUTBOX_SEQ_JUMP;
        let resumed = batch_events(&twin, before)
            .into_iter()
            .find(|(s, _)| *s > signed);
        // The twin's gap starts after the last batch it had; batches stored
        // but already delivered (not yet acknowledged) at the stop may lie
        // before or after `first_stored`, so only its end is exact.
        assert!(
            matches!(resumed, Some((seq, Continuity::Gap { from, to }))
                if seq == signed + jump + 1 && from <= signed + 1 && to == signed + jump),
            "{resumed:?}"
        );
        assert_eq!(v.unexplained(), 0, "the outbox_lost record covers the gap");
        // Nothing of the set-aside file was published after the restart: a
        // batch of that range seen now was seen before (a redelivery by the
        // broker of what it had before the stop).
        let seen_before: std::collections::HashSet<u64> = batch_events(&twin, 0)[..]
            .iter()
            .take(before_batches)
            .map(|(s, _)| *s)
            .collect();
        assert!(
            batch_events(&twin, before)
                .iter()
                .all(|(s, _)| !(first_stored..=signed).contains(s) || seen_before.contains(s)),
            "nothing of the set-aside file was published after the restart"
        );
    }
    assert_eq!(v.unexplained(), 0, "gaps {:?}", v.gaps);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_truncated_outbox_is_set_aside_and_the_chain_continues_past_a_signed_gap(
) -> anyhow::Result<()> {
    init();
    // Some batches delivered, then some stored while the broker is down.
    let Stored {
        pki,
        mut broker,
        plc: _plc,
        mut twin,
        config,
        gw: _,
    } = Stored::after_batches(10, Duration::from_millis(1500)).await?;
    let checkpoint = last_signed_seq(&pki)?;
    let delivered = twin.view().latest_seq;

    let path = data_dir(&pki).join(gateway::outbox::FILE_NAME);
    let len = std::fs::metadata(&path)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)?
        .set_len(len / 2)?;

    broker.restart().await?;
    let before = twin.events.len();
    let mut gw = GatewayProcess::start(&config).await?;
    until_logged(&mut gw, "set aside", Duration::from_secs(10)).await?;
    let jump = gateway::outbox::LOST_OUTBOX_SEQ_JUMP;
    let outcome = twin
        .until(
            Duration::from_secs(20),
            "an outbox_lost gap record and batches after the jump",
            |t| {
                has_gap_record(t, reason::OUTBOX_LOST)
                    && t.view().latest_seq > checkpoint + jump + 5
            },
        )
        .await;
    if let Err(e) = outcome {
        bail!("{e:#}\ngateway log:\n{}", gw.log());
    }
    assert!(gw.is_running(), "the gateway keeps running");
    let (code, _) = gw.terminate().await?;
    ensure!(code == Some(0), "exit code {code:?}; log:\n{}", gw.log());

    // A second start uses the new outbox: nothing is set aside again.
    let after_first = twin.view().latest_seq;
    let mut gw = GatewayProcess::start(&config).await?;
    twin.until(
        Duration::from_secs(15),
        "batches after a second start",
        |t| t.view().latest_seq > after_first + 3,
    )
    .await?;
    let (code, _) = gw.terminate().await?;
    ensure!(code == Some(0), "exit code {code:?}; log:\n{}", gw.log());
    let last = last_signed_seq(&pki)?;
    twin.until(Duration::from_secs(10), "the last seq", |t| {
        t.view().latest_seq == last
    })
    .await?;

    let aside = set_aside_files(&pki)?;
    let v = twin.view();
    let lost: Vec<_> = v
        .gap_records
        .values()
        .filter(|g| g.reason == reason::OUTBOX_LOST)
        .collect();
    let resumed = batch_events(&twin, before)
        .into_iter()
        .find(|(seq, _)| *seq > checkpoint);
    eprintln!(
        "truncated outbox ({len} -> {} bytes): delivered up to {delivered}, checkpoint {checkpoint}; \
         set aside {aside:?}; gap records {lost:?}; first batch after: {resumed:?}",
        len / 2
    );
    assert_eq!(aside.len(), 1, "set aside exactly once: {aside:?}");
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0].points, None, "what the lost outbox held is unknown");
    assert!(lost[0].contains(checkpoint + jump));
    let Some((seq, Continuity::Gap { from, to })) = resumed else {
        bail!("the chain did not continue with a gap: {resumed:?}");
    };
    assert_eq!(seq, checkpoint + jump + 1);
    // A batch the broker took just before it stopped reaches the twin's
    // persistent session only after the restart: count every batch
    // received from the first run, whenever it arrived.
    let delivered = batch_events(&twin, 0)
        .into_iter()
        .map(|(s, _)| s)
        .filter(|s| *s <= checkpoint)
        .max()
        .unwrap_or(delivered);
    assert_eq!((from, to), (delivered + 1, checkpoint + jump));
    // Every missing seq is named by the gap record, including the batches
    // stored (and never delivered) in the lost outbox.
    assert_eq!(v.unexplained(), 0, "gaps {:?}, records {lost:?}", v.gaps);
    let rejections = twin.rejections();
    assert!(
        rejections.is_empty(),
        "no conflict, no replay, nothing refused: {rejections:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_stops_the_gateway_within_5_s_with_exit_0_and_a_restart_continues_in_order(
) -> anyhow::Result<()> {
    init();
    let pki = TestPki::new(GW)?;
    let broker = Mosquitto::start(&pki, BrokerOptions::default()).await?;
    let plc = PlcSim::start("127.0.0.1:0".parse()?).await?;
    let mut twin = Twin::start_with(&broker, &pki, WINDOW, false).await?;
    let config = process_config(&pki, broker.port(), plc.addr(), 20)?;
    let mut gw = GatewayProcess::start_until(
        &config,
        &mut twin,
        Duration::from_secs(15),
        "20 batches",
        |t| t.view().batches >= 20,
    )
    .await?;
    let (code, took) = gw.terminate().await?;
    eprintln!("SIGTERM under load: exit code {code:?} after {took:?}");
    ensure!(code == Some(0), "exit code {code:?}; log:\n{}", gw.log());
    ensure!(
        took < Duration::from_secs(5),
        "took {took:?}; log:\n{}",
        gw.log()
    );
    let last = last_signed_seq(&pki)?;
    twin.until(
        Duration::from_secs(5),
        "every batch and the offline status",
        |t| {
            t.view().latest_seq == last
                && matches!(
                    t.view().status.as_ref().map(|s| s.state),
                    Some(twin_model::status::State::Offline)
                )
        },
    )
    .await?;

    let before = twin.events.len();
    let mut gw = GatewayProcess::start_until(
        &config,
        &mut twin,
        Duration::from_secs(15),
        "batches after the restart",
        |t| t.view().latest_seq >= last + 5,
    )
    .await?;
    let (code, took) = gw.terminate().await?;
    ensure!(
        code == Some(0) && took < Duration::from_secs(5),
        "exit code {code:?} after {took:?}"
    );
    let after = batch_events(&twin, before);
    let new: Vec<_> = after.iter().filter(|(s, _)| *s > last).collect();
    assert_eq!(new.first().map(|(s, _)| *s), Some(last + 1));
    assert!(
        new.iter().all(|(_, c)| *c == Continuity::InOrder),
        "{new:?}"
    );
    let v = twin.view();
    assert!(v.gaps.is_empty(), "{:?}", v.gaps);
    assert_eq!(v.duplicates, 0, "nothing acknowledged was sent again");
    assert!(twin.rejections().is_empty(), "{:?}", twin.rejections());
    Ok(())
}
