//! Assembling and running the gateway: devices -> uplink -> MQTT link, and
//! the ordered shutdown.
//!
//! Shutdown order: stop taking commands (the downlink finishes the command
//! in hand and closes the audit log in order), stop polling (device tasks
//! end and drop their senders),
//! the uplink flushes and signs what it holds and then closes its output,
//! the MQTT link hands everything to the broker, publishes `offline`, waits
//! for the acknowledgements and disconnects. A deadline bounds the whole
//! sequence; tasks still running at the deadline are named in the log.

use crate::config::{Config, DeviceConfig};
use crate::device::{
    modbus::ModbusDriver, opcua::OpcUaDriver, DeviceContext, DeviceEvent, Notices, Writers,
    WRITE_QUEUE,
};
use crate::downlink::{
    current::CurrentTable, limit::Bucket, receive, Downlink, DownlinkParts, DownlinkStats,
};
use crate::mqtt::{self, LinkParams, LinkState, LinkStats, Outgoing, Subscription};
use crate::outbox::{Outbox, OutboxOptions};
use crate::uplink::{
    self,
    batcher::Batcher,
    reported::Reporter,
    signer::Signer,
    writer::{self, WriteJob},
    Uplink, UplinkStats,
};
use crate::{clock, keyfile, tls};
use anyhow::Context as _;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use twin_model::topics::Topics;
use twin_model::SigningKey;

/// Poll cycles that may wait for the uplink. Small on purpose: when the
/// link is the bottleneck, polling slows down instead of memory growing.
const DEVICE_QUEUE: usize = 16;
/// Signed batches that may wait for the outbox writer.
const STORE_QUEUE: usize = 256;
/// How long a shutdown may spend delivering stored batches; what is left
/// stays in the outbox for the next start.
const DRAIN_DEADLINE: Duration = Duration::from_secs(3);

/// How long an orderly shutdown may take before stragglers are abandoned.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);

/// A running gateway.
pub struct GatewayHandle {
    pub link: watch::Receiver<LinkState>,
    pub uplink_stats: Arc<UplinkStats>,
    pub link_stats: Arc<LinkStats>,
    pub downlink_stats: Arc<DownlinkStats>,
    /// `None` when the outbox could not be opened (degraded: no batches).
    pub outbox: Option<Arc<Outbox>>,
    /// Key id of the telemetry signing key.
    pub kid: String,
    /// Where the metrics endpoint listens, when configured.
    pub metrics_addr: Option<std::net::SocketAddr>,
    stop_devices: CancellationToken,
    abort: CancellationToken,
    tasks: Vec<(String, JoinHandle<()>)>,
}

/// Loads the telemetry signing key (after checking its file permissions).
pub fn load_signing_key(path: &std::path::Path) -> anyhow::Result<SigningKey> {
    let pem = keyfile::read_private(path)?;
    SigningKey::from_pkcs8_pem(&pem)
        .with_context(|| format!("{}: not an Ed25519 PKCS#8 private key", path.display()))
}

/// Reads the outbox encryption key (after checking its file permissions).
fn load_outbox_cipher(path: &std::path::Path) -> anyhow::Result<crate::outbox::record::Cipher> {
    let text = keyfile::read_private(path)?;
    crate::outbox::record::Cipher::from_hex(&text)
        .with_context(|| format!("{}: not an outbox key (64 hex characters; create one with `gateway key outbox --out FILE`)", path.display()))
}

/// Starts every task of the gateway. Fails before connecting anywhere if a
/// key, certificate or the data directory cannot be used.
pub async fn start(cfg: Config) -> anyhow::Result<GatewayHandle> {
    refuse_dev_pki(&cfg)?;
    let key = Arc::new(load_signing_key(&cfg.signing.key_file)?);
    let tls_config = tls::client_config(&cfg.mqtt.tls).context("MQTT TLS setup")?;
    // Bound before anything starts, so that a port in use stops the start
    // cleanly.
    let metrics_listener = match &cfg.metrics {
        Some(m) => Some(
            tokio::net::TcpListener::bind(m.listen)
                .await
                .with_context(|| format!("[metrics] cannot listen on {}", m.listen))?,
        ),
        None => None,
    };
    let cipher = cfg
        .outbox
        .encryption_key_file
        .as_deref()
        .map(load_outbox_cipher)
        .transpose()?;
    let topics = Topics::new(&cfg.mqtt.topic_prefix, &cfg.gateway.id);
    let opened = create_data_dir(&cfg.gateway.data_dir).and_then(|()| {
        Outbox::open(
            &cfg.gateway.data_dir,
            OutboxOptions {
                config: cfg.outbox.clone(),
                cipher,
                key: key.clone(),
                gateway_id: cfg.gateway.id.clone(),
            },
        )
        .with_context(|| format!("{}: cannot open the outbox", cfg.gateway.data_dir.display()))
    });
    // Without an outbox no batch can be stored, so none is published (a
    // sequence number could otherwise be reused); the reported twin, which
    // carries the present state, keeps flowing. Fix the data directory and
    // restart.
    let (outbox, chain, stored) = match opened {
        Ok((o, report)) => (Some(Arc::new(o)), report.chain, report.records),
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "DEGRADED: the outbox cannot be used; telemetry batches are not published until it can (fix the data directory and restart); the reported twin keeps flowing"
            );
            (None, crate::uplink::state::ChainState::GENESIS, 0)
        }
    };
    let signer = Signer::new(key.clone(), cfg.gateway.id.clone(), chain);
    tracing::info!(
        gateway = %cfg.gateway.id,
        kid = key.kid(),
        next_seq = chain.seq + 1,
        stored_batches = stored,
        devices = cfg.devices.len(),
        "gateway starting"
    );

    let units: HashMap<String, String> = cfg
        .devices
        .iter()
        .flat_map(|d| {
            d.units()
                .into_iter()
                .map(|(t, u)| (t.to_owned(), u.to_owned()))
        })
        .collect();
    let reporter = Reporter::new(
        &cfg.gateway.id,
        chain.twin_version,
        units,
        key.clone(),
        topics.reported(),
        cfg.mqtt.max_message_bytes,
    );
    let batcher = Batcher::new(
        &cfg.gateway.id,
        topics.telemetry().len(),
        cfg.mqtt.max_message_bytes,
    );

    let stop_devices = CancellationToken::new();
    let abort = CancellationToken::new();
    let finish = CancellationToken::new();
    let wake = Arc::new(Notify::new());
    let (dev_tx, dev_rx) = mpsc::channel::<DeviceEvent>(DEVICE_QUEUE);
    let (store_tx, store_rx) = mpsc::channel::<WriteJob>(STORE_QUEUE);
    let (live_tx, live_rx) = mpsc::channel::<Outgoing>(4);
    let (state_tx, state_rx) = watch::channel(LinkState::Connecting);
    let (events_tx, events_rx) = mpsc::channel::<Outgoing>(256);
    let uplink_stats = Arc::new(UplinkStats::default());
    let link_stats = Arc::new(LinkStats::default());
    let mut tasks = Vec::new();

    // The downlink first: at shutdown it stops taking commands before the
    // devices stop.
    let cfg = Arc::new(cfg);
    let current = cfg
        .commands
        .as_ref()
        .map(|_| Arc::new(CurrentTable::default()));
    let (notice_tx, notice_rx) = mpsc::unbounded_channel();
    let notices = Notices::new(notice_tx);
    let mut writers = Writers::default();
    let mut write_queues = Vec::new();
    let mut device_stats = Vec::new();
    for dev in &cfg.devices {
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        writers.add(dev.tag_names(), &tx);
        write_queues.push(rx);
        device_stats.push((
            dev.name().to_owned(),
            Arc::new(crate::metrics::DeviceStats::default()),
        ));
    }
    let (alerts_tx, alerts_rx) = mpsc::unbounded_channel();
    let alerts = crate::watch::alerts::Alerts::new(alerts_tx);
    let (downlink, downlink_stats) = Downlink::start(DownlinkParts {
        config: cfg.clone(),
        key: key.clone(),
        topics: topics.clone(),
        out: events_tx,
        current: current.clone().unwrap_or_default(),
        writers,
        notices: notice_rx,
        alerts_rx,
        alerts: alerts.clone(),
        device_stats: device_stats.clone(),
        link_stats: Some(link_stats.clone()),
        audit_options: crate::audit::AuditOptions {
            checkpoint_every_records: cfg.audit.checkpoint_records,
            checkpoint_interval_ms: cfg.audit.checkpoint_interval.as_millis() as u64,
            ..Default::default()
        },
    })
    .await;
    let subscription = match &cfg.commands {
        Some(cc) => {
            let (in_tx, in_rx) = mpsc::unbounded_channel();
            let (work_tx, work_rx) = mpsc::channel(receive::WORK_QUEUE);
            tasks.push((
                "command admission".into(),
                tokio::spawn(receive::run(
                    in_rx,
                    work_tx,
                    Bucket::new(cc.rate_per_s, cc.burst, clock::now_ms()),
                    stop_devices.clone(),
                )),
            ));
            tasks.push((
                "downlink".into(),
                tokio::spawn(downlink.run(Some(work_rx), stop_devices.clone())),
            ));
            Some(Subscription {
                topic: topics.command(),
                inbound: in_tx,
            })
        }
        None => {
            tasks.push((
                "downlink".into(),
                tokio::spawn(downlink.run(None, stop_devices.clone())),
            ));
            None
        }
    };

    for ((dev, writes), (_, stats)) in cfg.devices.iter().zip(write_queues).zip(&device_stats) {
        let ctx = DeviceContext {
            shutdown: stop_devices.clone(),
            out: dev_tx.clone(),
            writes,
            notices: notices.clone(),
            stats: stats.clone(),
        };
        let name = format!("device {}", dev.name());
        let handle = match dev.clone() {
            DeviceConfig::Modbus(m) => tokio::spawn(ModbusDriver::new(m).run(ctx)),
            DeviceConfig::OpcUa(o) => tokio::spawn(OpcUaDriver::new(o).run(ctx)),
        };
        tasks.push((name, handle));
    }
    drop(dev_tx);

    let uplink = Uplink {
        batcher,
        signer,
        reported: reporter,
        flush_interval: cfg.mqtt.flush_interval,
        reported_interval: cfg.mqtt.reported_interval,
        stats: uplink_stats.clone(),
        current,
        sensors: (!cfg.checks.is_empty()).then(|| {
            // OPC UA subscriptions send changes only: their tags stay
            // current while the session stands.
            let liveness = cfg.devices.iter().zip(&device_stats).flat_map(|(d, (_, stats))| {
                let by_change = matches!(d, DeviceConfig::OpcUa(o) if o.read == crate::config::OpcUaRead::Subscribe);
                d.tag_names()
                    .into_iter()
                    .filter(move |_| by_change)
                    .map(|t| (t.to_owned(), stats.clone()))
                    .collect::<Vec<_>>()
            });
            crate::watch::sensors::SensorWatch::new(&cfg.checks, alerts.clone(), clock::now_ms())
                .with_liveness(liveness)
        }),
    };
    tasks.push((
        "uplink".into(),
        tokio::spawn(uplink::run(uplink, dev_rx, store_tx, live_tx)),
    ));

    // The writer thread ends when the uplink has ended; then the link may
    // drain the outbox and finish.
    let writer_outbox = outbox.clone();
    let writer_wake = wake.clone();
    let writer_finish = finish.clone();
    tasks.push((
        "outbox writer".into(),
        tokio::spawn(async move {
            let _ = tokio::task::spawn_blocking(move || {
                writer::run(writer_outbox, store_rx, writer_wake)
            })
            .await;
            writer_finish.cancel();
        }),
    ));

    let params = LinkParams {
        mqtt: cfg.mqtt.clone(),
        gateway_id: cfg.gateway.id.clone(),
        tls: tls_config,
        key: key.clone(),
        session: clock::now_ms(),
        seq_at_start: chain.seq,
        outbox: outbox.clone(),
        wake,
        finish,
        subscription,
    };
    tasks.push((
        "mqtt".into(),
        tokio::spawn(mqtt::run(
            params,
            live_rx,
            events_rx,
            state_tx,
            link_stats.clone(),
            abort.clone(),
            DRAIN_DEADLINE,
        )),
    ));

    let metrics_addr = match metrics_listener {
        Some(listener) => {
            let addr = listener.local_addr()?;
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "the metrics endpoint listens beyond loopback");
            }
            tracing::info!(%addr, "metrics on http://{addr}/metrics, readiness on /health");
            let sources = crate::metrics::Sources {
                uplink: uplink_stats.clone(),
                link: link_stats.clone(),
                link_state: state_rx.clone(),
                downlink: downlink_stats.clone(),
                outbox: outbox.clone(),
                devices: device_stats,
                commands: cfg.commands.is_some(),
            };
            tasks.push((
                "metrics".into(),
                tokio::spawn(crate::metrics::serve(
                    listener,
                    sources,
                    stop_devices.clone(),
                )),
            ));
            Some(addr)
        }
        None => None,
    };

    Ok(GatewayHandle {
        link: state_rx,
        uplink_stats,
        link_stats,
        downlink_stats,
        outbox,
        kid: key.kid().to_owned(),
        metrics_addr,
        stop_devices,
        abort,
        tasks,
    })
}

/// Development PKI material (OU=`twin-dev-pki`) is refused outside
/// `profile = "dev"`: its keys were made on a developer's machine.
fn refuse_dev_pki(cfg: &Config) -> anyhow::Result<()> {
    if cfg.gateway.dev_profile {
        return Ok(());
    }
    let report = crate::selfcheck::check(cfg, &crate::selfcheck::CheckOptions::at(clock::now_ms()));
    let dev: Vec<String> = report
        .with_code(crate::selfcheck::codes::DEV_PKI_IN_PRODUCTION)
        .map(|f| format!("  - {}", f.message))
        .collect();
    if dev.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "refusing to start with development PKI material outside the dev profile:\n{}\nuse certificates and keys of the plant's PKI; only on a development machine, set profile = \"dev\" in [gateway]",
        dev.join("\n")
    )
}

fn create_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{}: cannot create the data directory", dir.display()))?;
    let meta = std::fs::metadata(dir)?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(
            || {
                format!(
                    "{}: cannot restrict the data directory to mode 0700",
                    dir.display()
                )
            },
        )?;
    }
    Ok(())
}

impl GatewayHandle {
    /// Ordered shutdown (see the module doc). Returns the names of tasks
    /// that did not finish before the deadline.
    pub async fn stop(self) -> Vec<String> {
        self.stop_devices.cancel();
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DEADLINE + Duration::from_secs(2);
        let mut stragglers = Vec::new();
        for (name, mut task) in self.tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
                stragglers.push(name);
            }
        }
        self.abort.cancel();
        if !stragglers.is_empty() {
            tracing::warn!(tasks = ?stragglers, "shutdown deadline passed; these tasks were stopped by force");
        }
        stragglers
    }

    /// Resolves when a task ends by itself (which only happens on a fatal error).
    pub async fn fatal(&self) {
        self.abort.cancelled().await
    }
}
