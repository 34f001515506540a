//! End-to-end tests: real Mosquitto (TLS, client certificates, ACL), the
//! simulated tank PLC and independent peers (pymodbus, PyJWT), with the
//! gateway running as in production and the twin verified as the cloud does.

use anyhow::{bail, Context as _};
use gateway::config::{Config, DeviceConfig};
use gateway::mqtt::LinkState;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use twin_model::{Continuity, Quality, TrustStore, Value};
use twin_testkit::mosquitto::{BrokerOptions, Identity, Mosquitto, ServerCert};
use twin_testkit::pki::TestPki;
use twin_testkit::sim::PlcSim;
use twinctl::watch::{WatchEvent, Watcher};

const GW: &str = "plant1-gw1";

fn init() {
    gateway::tls::install_default_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A subscriber that collects every message of a topic filter.
struct Subscriber {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    async fn start(
        broker: &Mosquitto,
        pki: &TestPki,
        id: &str,
        identity: Identity,
        filter: &str,
    ) -> anyhow::Result<Self> {
        Self::start_with(broker, pki, id, identity, filter, false).await
    }

    /// `persistent`: a durable session (clean_session = false), so the broker
    /// keeps messages for it across its own restarts and ours.
    async fn start_with(
        broker: &Mosquitto,
        pki: &TestPki,
        id: &str,
        identity: Identity,
        filter: &str,
        persistent: bool,
    ) -> anyhow::Result<Self> {
        let mut opts = broker.client_options(pki, id, identity)?;
        opts.set_clean_session(!persistent);
        let (client, mut events) = AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, mut ready_rx) = mpsc::channel(1);
        let sub_client = client.clone();
        let filter = filter.to_owned();
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = sub_client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(()).await;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx.recv())
            .await
            .context("subscriber was not subscribed within 10 s")?;
        Ok(Subscriber { client, rx, task })
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The cloud side: a verifying subscriber that keeps every raw batch too.
struct Twin {
    sub: Subscriber,
    watcher: Watcher,
    telemetry: Vec<String>,
    events: Vec<WatchEvent>,
    /// Each inventory received, verified.
    inventories: Vec<twin_model::inventory::Inventory>,
    trust: TrustStore,
}

impl Twin {
    async fn start(broker: &Mosquitto, pki: &TestPki, window: usize) -> anyhow::Result<Self> {
        Self::start_with(broker, pki, window, false).await
    }

    async fn start_with(
        broker: &Mosquitto,
        pki: &TestPki,
        window: usize,
        persistent: bool,
    ) -> anyhow::Result<Self> {
        let mut trust = TrustStore::new();
        let kid = trust.add_pem(&std::fs::read_to_string(&pki.gateway_signing_pub)?)?;
        let mut watcher = Watcher::new("twin", trust.clone()).with_window(window);
        watcher.pin(GW, &kid);
        let sub = Subscriber::start_with(
            broker,
            pki,
            "cloud-twin",
            Identity::Operator,
            "twin/#",
            persistent,
        )
        .await?;
        Ok(Twin {
            sub,
            watcher,
            telemetry: Vec::new(),
            events: Vec::new(),
            inventories: Vec::new(),
            trust,
        })
    }

    /// Applies messages until `done` holds, or fails after `timeout`.
    async fn until(
        &mut self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&Twin) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            match tokio::time::timeout_at(deadline, self.sub.rx.recv()).await {
                Ok(Some((topic, payload))) => {
                    if topic.ends_with("/inventory") {
                        let v = self
                            .trust
                            .verify_compact(&payload, twin_model::inventory::INVENTORY_TYP, 1 << 20)
                            .map_err(|e| anyhow::anyhow!("an inventory does not verify: {e}"))?;
                        self.inventories.push(serde_json::from_slice(&v.payload)?);
                    }
                    let ev = self.watcher.handle(&topic, &payload);
                    if topic.ends_with("/telemetry") && matches!(ev, WatchEvent::Batch { .. }) {
                        self.telemetry.push(String::from_utf8(payload)?);
                    }
                    self.events.push(ev);
                }
                Ok(None) => bail!("subscriber closed while waiting for: {what}"),
                Err(_) => bail!(
                    "timed out after {timeout:?} waiting for: {what}; events so far: {:?}",
                    self.events.iter().rev().take(5).collect::<Vec<_>>()
                ),
            }
        }
        Ok(())
    }

    /// The first device of the latest inventory, once it carries the
    /// identity the device reported (waits up to 15 s).
    async fn identified_device(&mut self) -> anyhow::Result<twin_model::inventory::DeviceEntry> {
        let identified = |t: &Twin| {
            t.inventories
                .last()
                .and_then(|i| i.devices.first())
                .filter(|d| d.identity.is_some())
                .cloned()
        };
        self.until(
            Duration::from_secs(15),
            "a device identity in the inventory",
            |t| identified(t).is_some(),
        )
        .await?;
        identified(self).context("checked above")
    }

    fn view(&self) -> twinctl::watch::GatewayView {
        self.watcher.view(GW).cloned().unwrap_or_default()
    }

    fn tag(&self, name: &str) -> Option<twinctl::watch::TagView> {
        self.view().tags.get(name).cloned()
    }

    fn rejections(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e {
                WatchEvent::Rejected { code, .. } => Some(code.clone()),
                _ => None,
            })
            .collect()
    }
}

/// The example configuration pointed at `broker` and `plc`, with a fast poll.
fn tank_config(
    pki: &TestPki,
    broker_port: u16,
    plc: std::net::SocketAddr,
    poll_ms: u64,
) -> anyhow::Result<Config> {
    let text = twin_testkit::render_example_config(broker_port, plc)?;
    write_config(pki.root(), &text, poll_ms)
}

fn write_config(dir: &Path, text: &str, poll_ms: u64) -> anyhow::Result<Config> {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text)?;
    let mut cfg = gateway::config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    for d in &mut cfg.devices {
        let DeviceConfig::Modbus(m) = d else {
            continue;
        };
        m.poll_interval = Duration::from_millis(poll_ms);
        m.request_timeout = Duration::from_millis(300);
        m.reconnect_min = Duration::from_millis(50);
        m.reconnect_max = Duration::from_millis(300);
    }
    cfg.mqtt.reported_interval = Duration::from_millis(100);
    cfg.mqtt.reconnect_min = Duration::from_millis(100);
    cfg.mqtt.reconnect_max = Duration::from_millis(500);
    Ok(cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tank_values_reach_the_twin_signed_in_order_and_the_sequence_survives_a_restart(
) -> anyhow::Result<()> {
    init();
    let pki = TestPki::new(GW)?;
    let broker = Mosquitto::start(&pki, BrokerOptions::default()).await?;
    let plc = PlcSim::start("127.0.0.1:0".parse()?).await?;
    let mut twin = Twin::start(&broker, &pki, 4096).await?;
    let cfg = tank_config(&pki, broker.port(), plc.addr(), 100)?;

    let gw = gateway::run::start(cfg.clone()).await?;
    twin.until(Duration::from_secs(15), "20 verified batches", |t| {
        t.view().batches >= 20
    })
    .await?;
    let v = twin.view();
    assert_eq!(
        v.tags.len(),
        16,
        "every tag of the example config is in the twin"
    );
    assert!(
        v.tags.values().all(|t| t.quality == Quality::Good),
        "{:?}",
        v.tags
    );
    assert!(
        v.gaps.is_empty() && twin.rejections().is_empty(),
        "gaps {:?}, rejected {:?}",
        v.gaps,
        twin.rejections()
    );
    assert!(matches!(
        v.status.as_ref().map(|s| s.state),
        Some(twin_model::status::State::Online)
    ));

    // Freeze the process; the retained reported twin must match the PLC.
    plc.freeze(true);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let snap = plc.snapshot();
    let mismatches = |t: &Twin| -> Vec<String> {
        let Some(r) = t.view().reported else {
            return vec!["no reported twin".into()];
        };
        let val = |n: &str| r.tags.get(n).and_then(|s| s.value.clone());
        let close =
            |n: &str, want: f64| matches!(val(n), Some(Value::Float(x)) if (x - want).abs() < 1e-9);
        let checks = [
            (
                "tank1.level",
                val("tank1.level") == Some(Value::Float(twin_model::sample::widen_f32(snap.level))),
            ),
            (
                "tank1.pressure",
                val("tank1.pressure")
                    == Some(Value::Float(twin_model::sample::widen_f32(snap.pressure))),
            ),
            (
                "tank1.energy",
                val("tank1.energy") == Some(Value::Float(snap.energy)),
            ),
            (
                "tank1.pump_starts",
                val("tank1.pump_starts") == Some(Value::UInt(u64::from(snap.pump_starts))),
            ),
            (
                "tank1.pump_runtime",
                val("tank1.pump_runtime") == Some(Value::UInt(snap.pump_runtime)),
            ),
            (
                "tank1.pump",
                val("tank1.pump") == Some(Value::Bool(snap.pump)),
            ),
            (
                "tank1.high_alarm",
                val("tank1.high_alarm") == Some(Value::Bool(snap.high_alarm)),
            ),
            (
                "tank1.batch_id",
                val("tank1.batch_id") == Some(Value::Text(snap.batch_id.clone())),
            ),
            (
                "tank1.mode",
                val("tank1.mode") == Some(Value::UInt(u64::from(snap.mode))),
            ),
            (
                "tank1.temperature",
                close("tank1.temperature", snap.temperature),
            ),
            (
                "tank1.level_setpoint",
                close("tank1.level_setpoint", snap.level_setpoint),
            ),
            (
                "tank1.heater_power",
                close("tank1.heater_power", snap.heater_power),
            ),
            (
                "unit of tank1.level",
                r.tags.get("tank1.level").and_then(|s| s.unit.as_deref()) == Some("m"),
            ),
        ];
        checks
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(n, _)| format!("{n}: twin {:?}", val(n)))
            .collect()
    };
    let outcome = twin
        .until(
            Duration::from_secs(5),
            "a reported twin equal to the frozen PLC",
            |t| mismatches(t).is_empty(),
        )
        .await;
    assert!(
        outcome.is_ok(),
        "reported twin differs from the PLC {snap:?}: {:?}",
        mismatches(&twin)
    );

    // Orderly stop: offline status, nothing left unacknowledged.
    let last_seq = gw
        .uplink_stats
        .last_seq
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(gw.stop().await.is_empty(), "every task stopped in time");
    twin.until(Duration::from_secs(5), "offline status", |t| {
        matches!(
            t.view().status.as_ref().map(|s| s.state),
            Some(twin_model::status::State::Offline)
        )
    })
    .await?;
    twin.until(
        Duration::from_secs(5),
        "every signed batch delivered",
        |t| t.view().latest_seq == last_seq,
    )
    .await?;

    // A restart continues the chain: the next batch is in order, not a new chain.
    let gw = gateway::run::start(cfg).await?;
    let before = twin.events.len();
    twin.until(Duration::from_secs(10), "batches after the restart", |t| {
        t.view().latest_seq >= last_seq + 3
    })
    .await?;
    let continuities: Vec<_> = twin.events[before..]
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Batch { continuity, .. } => Some(continuity.clone()),
            _ => None,
        })
        .collect();
    assert!(
        continuities.iter().all(|c| *c == Continuity::InOrder),
        "{continuities:?}"
    );
    gw.stop().await;
    let v = twin.view();
    assert!(
        v.gaps.is_empty() && twin.rejections().is_empty(),
        "gaps {:?}, rejected {:?}",
        v.gaps,
        twin.rejections()
    );
    assert_eq!(v.duplicates, 0);

    // The same batches verify with an independent JOSE library (PyJWT),
    // which also recomputes the key id and the hash chain itself.
    let file = pki.root().join("captured.jws");
    std::fs::write(&file, twin.telemetry.join("\n"))?;
    let out = std::process::Command::new(twin_testkit::python::python()?)
        .arg(twin_testkit::python::script("jose_verify.py"))
        .arg(&pki.gateway_signing_pub)
        .arg(&file)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "PyJWT refused a batch:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("OK {} batch(es) verified", twin.telemetry.len())),
        "{stdout}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn golden_vectors_verify_with_pyjwt() -> anyhow::Result<()> {
    let golden = twin_testkit::workspace_root().join("docs/golden");
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("chain.jws");
    std::fs::write(
        &file,
        format!(
            "{}{}",
            std::fs::read_to_string(golden.join("batch-1.jws"))?,
            std::fs::read_to_string(golden.join("batch-2.jws"))?
        ),
    )?;
    let out = std::process::Command::new(twin_testkit::python::python()?)
        .arg(twin_testkit::python::script("jose_verify.py"))
        .arg(golden.join("key.pub.pem"))
        .arg(&file)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK 2 batch(es)"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_type_and_byte_order_from_pymodbus_decodes_exactly() -> anyhow::Result<()> {
    init();
    let py = twin_testkit::python::start_pymodbus().await?;
    let pki = TestPki::new(GW)?;
    let broker = Mosquitto::start(&pki, BrokerOptions::default()).await?;
    let mut twin = Twin::start(&broker, &pki, 4096).await?;

    // The example config, with its device replaced by the pymodbus server.
    let example = twin_testkit::render_example_config(broker.port(), py.addr())?;
    let head = &example[..example
        .find("\n[[devices]]")
        .context("example has a [[devices]] table")?
        + 1];
    let mut text = format!(
        "{head}[[devices]]\nname = \"pymodbus\"\nprotocol = \"modbus-tcp\"\naddress = \"{}\"\nunit_id = {}\n",
        py.addr(),
        py.unit_id
    );
    for p in &py.points {
        text.push_str(&format!(
            "\n[[devices.tags]]\nname = \"{}\"\narea = \"{}\"\naddress = {}\ntype = \"{}\"\n",
            p.name, p.area, p.address, p.data_type
        ));
        if p.data_type != "bool" {
            text.push_str(&format!("order = \"{}\"\n", p.order));
        }
        if p.data_type == "string" {
            text.push_str(&format!("length_registers = {}\n", p.length_registers));
        }
    }
    let cfg = write_config(pki.root(), &text, 200)?;
    let gw = gateway::run::start(cfg).await?;
    let n = py.points.len();
    twin.until(
        Duration::from_secs(15),
        "every pymodbus point in the twin",
        |t| t.view().tags.len() == n,
    )
    .await?;
    // pymodbus's identity (FC 43/14) in the signed inventory.
    let device = twin.identified_device().await?;
    gw.stop().await;
    let fields = &device.identity.context("checked above")?.fields;
    // Objects 0x00-0x05, in order.
    for (ours, theirs) in twin_model::inventory::MODBUS_FIELDS
        .iter()
        .zip(twin_testkit::python::PYMODBUS_IDENTITY_OBJECTS)
    {
        assert_eq!(
            fields.get(*ours),
            py.identity.get(theirs),
            "{ours} ({theirs}) as pymodbus reports it"
        );
    }
    assert_eq!(fields.len(), 6, "{fields:?}");
    let mut wrong = Vec::new();
    for p in &py.points {
        let got = twin.tag(&p.name).context("tag in twin")?;
        let got_json = got
            .value
            .as_ref()
            .map(|v| serde_json::to_value(v).expect("value serializes"));
        if got.quality != Quality::Good || got_json.as_ref() != Some(&p.expected) {
            wrong.push(format!(
                "{} ({} {} @{}): expected {}, got {:?} {:?} {:?}",
                p.name,
                p.data_type,
                p.order,
                p.address,
                p.expected,
                got_json,
                got.quality,
                got.reason
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {n} points differ:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert!(twin.rejections().is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_certificate_from_a_wrong_ca_expired_or_for_another_host_is_refused_with_a_clear_error(
) -> anyhow::Result<()> {
    init();
    for (cert, hint) in [
        (ServerCert::WrongCa, "not signed by the CA"),
        (ServerCert::Expired, "expired"),
        (ServerCert::WrongHost, "not issued for this host name"),
    ] {
        let pki = TestPki::new(GW)?;
        let broker = Mosquitto::start(
            &pki,
            BrokerOptions {
                server_cert: cert,
                ..Default::default()
            },
        )
        .await?;
        let plc = PlcSim::start("127.0.0.1:0".parse()?).await?;
        let cfg = tank_config(&pki, broker.port(), plc.addr(), 100)?;
        let gw = gateway::run::start(cfg).await?;
        let mut link = gw.link.clone();
        let state = tokio::time::timeout(
            Duration::from_secs(10),
            link.wait_for(|s| matches!(s, LinkState::Failed(_) | LinkState::Connected)),
        )
        .await
        .with_context(|| format!("{cert:?}: no connection outcome within 10 s"))??
        .clone();
        // Give it a couple more attempts: it must never connect.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let connects = gw
            .link_stats
            .connects
            .load(std::sync::atomic::Ordering::Relaxed);
        gw.stop().await;
        match state {
            LinkState::Failed(why) => assert!(
                why.contains(hint),
                "{cert:?}: error {why:?} does not say {hint:?}"
            ),
            other => panic!("{cert:?}: expected a refused connection, got {other:?}"),
        }
        assert_eq!(connects, 0, "{cert:?}: the gateway must never connect");
        assert!(
            !broker.log().contains(&format!("as {GW}")),
            "{cert:?}: broker saw a session of the gateway"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_without_a_certificate_from_the_plant_ca_are_refused_by_the_broker(
) -> anyhow::Result<()> {
    init();
    let pki = TestPki::new(GW)?;
    let broker = Mosquitto::start(&pki, BrokerOptions::default()).await?;
    for identity in [Identity::Anonymous, Identity::Rogue] {
        let opts = broker.client_options(&pki, "intruder", identity)?;
        let (_client, mut events) = AsyncClient::new(opts, 8);
        let outcome = tokio::time::timeout(Duration::from_secs(10), events.poll())
            .await
            .context("no outcome in 10 s")?;
        match outcome {
            Ok(Event::Incoming(Packet::ConnAck(_))) => panic!("{identity:?} was accepted"),
            Ok(other) => panic!("{identity:?}: unexpected {other:?}"),
            Err(e) => eprintln!("{identity:?} refused as expected: {e}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tampered_foreign_and_replayed_batches_are_reported_by_the_verifier() -> anyhow::Result<()>
{
    init();
    let pki = TestPki::new(GW)?;
    let broker = Mosquitto::start(&pki, BrokerOptions::default()).await?;
    let plc = PlcSim::start("127.0.0.1:0".parse()?).await?;
    let mut twin = Twin::start(&broker, &pki, 16).await?;
    let cfg = tank_config(&pki, broker.port(), plc.addr(), 50)?;
    let gw = gateway::run::start(cfg).await?;
    twin.until(Duration::from_secs(15), "40 batches", |t| {
        t.view().batches >= 40
    })
    .await?;
    gw.stop().await;
    let first = twin.telemetry.first().context("a batch")?.clone();
    let latest = twin.telemetry.last().context("a batch")?.clone();

    // An attacker on the broker path (here: someone holding the gateway's
    // MQTT identity, but not its signing key) injects messages.
    let attacker = Subscriber::start(
        &broker,
        &pki,
        "attacker",
        Identity::Gateway,
        "twin/plant1-gw1/nothing",
    )
    .await?;
    let topic = "twin/plant1-gw1/telemetry";

    // 1. A real batch with a changed value.
    let parts: Vec<&str> = latest.split('.').collect();
    let payload = twin_model::jws::b64url_decode(parts[1]).context("payload")?;
    let mut doc: serde_json::Value = serde_json::from_slice(&payload)?;
    doc["seq"] = serde_json::json!(doc["seq"].as_u64().context("seq")? + 1);
    doc["samples"][0]["value"] = serde_json::json!(999.0);
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        twin_model::jws::b64url(&serde_json::to_vec(&doc)?),
        parts[2]
    );
    // 2. The same content signed with another key (the operator's).
    let other = twin_model::SigningKey::from_pkcs8_pem(&std::fs::read_to_string(
        &pki.operator_signing_key,
    )?)?;
    let foreign = other.sign_compact(twin_model::BATCH_TYP, &serde_json::to_vec(&doc)?);
    // 3. A replay of the very first batch (older than the verifier's window).
    for msg in [tampered, foreign, first] {
        attacker
            .client
            .publish(topic, QoS::AtLeastOnce, false, msg.into_bytes())
            .await?;
    }
    twin.until(Duration::from_secs(10), "three rejections", |t| {
        t.rejections().len() >= 3
    })
    .await?;
    assert_eq!(
        twin.rejections(),
        vec!["bad_signature", "unknown_key", "replayed"]
    );
    // None of them touched the twin.
    assert!(twin
        .view()
        .tags
        .values()
        .all(|t| t.value != Some(Value::Float(999.0))));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn device_exceptions_and_outages_show_as_bad_quality_and_recover() -> anyhow::Result<()> {
    init();
    let pki = TestPki::new(GW)?;
    let broker = Mosquitto::start(&pki, BrokerOptions::default()).await?;
    let plc = PlcSim::start("127.0.0.1:0".parse()?).await?;
    let mut twin = Twin::start(&broker, &pki, 4096).await?;
    let cfg = tank_config(&pki, broker.port(), plc.addr(), 100)?;
    let gw = gateway::run::start(cfg).await?;
    let quality = |t: &Twin, tag: &str| {
        t.tag(tag)
            .map(|v| (v.quality, v.reason.unwrap_or_default()))
    };
    twin.until(Duration::from_secs(10), "good values", |t| {
        quality(t, "tank1.level") == Some((Quality::Good, String::new()))
    })
    .await?;

    plc.set_exception(Some(tokio_modbus::ExceptionCode::ServerDeviceBusy));
    twin.until(Duration::from_secs(5), "exception as quality", |t| {
        quality(t, "tank1.level")
            == Some((Quality::Bad, "modbus_exception:server_device_busy".into()))
    })
    .await?;
    assert!(
        twin.tag("tank1.level").and_then(|t| t.value).is_none(),
        "a bad sample carries no value"
    );
    plc.set_exception(None);
    twin.until(Duration::from_secs(5), "recovery from the exception", |t| {
        quality(t, "tank1.level").map(|q| q.0) == Some(Quality::Good)
    })
    .await?;

    plc.set_unresponsive(true);
    twin.until(Duration::from_secs(5), "timeout as quality", |t| {
        quality(t, "tank1.level") == Some((Quality::Bad, "timeout".into()))
    })
    .await?;
    plc.set_unresponsive(false);
    twin.until(Duration::from_secs(5), "recovery from the timeout", |t| {
        quality(t, "tank1.level").map(|q| q.0) == Some(Quality::Good)
    })
    .await?;

    plc.stop().await;
    twin.until(Duration::from_secs(5), "device gone as quality", |t| {
        matches!(quality(t, "tank1.pump"), Some((Quality::Bad, r)) if r == "disconnected" || r == "timeout")
    })
    .await?;
    plc.restart().await?;
    twin.until(Duration::from_secs(10), "device back", |t| {
        quality(t, "tank1.pump").map(|q| q.0) == Some(Quality::Good)
    })
    .await?;
    gw.stop().await;
    let v = twin.view();
    assert!(
        v.gaps.is_empty() && twin.rejections().is_empty(),
        "telemetry kept flowing through device faults"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_private_key_readable_by_others_stops_the_gateway_from_starting() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    init();
    let pki = TestPki::new(GW)?;
    let cfg = tank_config(&pki, 1, "127.0.0.1:1".parse()?, 100)?;
    for key in [&pki.gateway_signing_key, &pki.gateway.key] {
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o644))?;
        let err = match gateway::run::start(cfg.clone()).await {
            Ok(h) => {
                h.stop().await;
                bail!("started with {} readable by others", key.display())
            }
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_reconnects_after_a_broker_restart_and_the_chain_continues(
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;
    init();
    let pki = TestPki::new(GW)?;
    let mut broker = Mosquitto::start(
        &pki,
        BrokerOptions {
            persistence: true,
            ..Default::default()
        },
    )
    .await?;
    let plc = PlcSim::start("127.0.0.1:0".parse()?).await?;
    let mut twin = Twin::start_with(&broker, &pki, 4096, true).await?;
    let cfg = tank_config(&pki, broker.port(), plc.addr(), 100)?;
    let gw = gateway::run::start(cfg).await?;
    twin.until(Duration::from_secs(10), "10 batches", |t| {
        t.view().batches >= 10
    })
    .await?;

    broker.stop().await;
    let mut link = gw.link.clone();
    tokio::time::timeout(
        Duration::from_secs(5),
        link.wait_for(|s| matches!(s, LinkState::Failed(_))),
    )
    .await
    .context("the gateway noticed the broker going away")??;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let signed_during_outage = gw.uplink_stats.last_seq.load(Ordering::Relaxed);
    broker.restart().await?;
    tokio::time::timeout(
        Duration::from_secs(10),
        link.wait_for(|s| *s == LinkState::Connected),
    )
    .await
    .context("the gateway reconnected by itself")??;
    twin.until(
        Duration::from_secs(15),
        "batches signed during and after the outage",
        |t| t.view().latest_seq >= signed_during_outage + 5,
    )
    .await?;
    assert!(gw.link_stats.connects.load(Ordering::Relaxed) >= 2);
    gw.stop().await;
    let v = twin.view();
    assert!(
        v.gaps.is_empty(),
        "no batch lost across a short broker restart: {:?}",
        v.gaps
    );
    assert!(twin.rejections().is_empty(), "{:?}", twin.rejections());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unusable_data_directory_degrades_to_the_reported_twin_without_crashing(
) -> anyhow::Result<()> {
    init();
    let pki = TestPki::new(GW)?;
    let broker = Mosquitto::start(&pki, BrokerOptions::default()).await?;
    let plc = PlcSim::start("127.0.0.1:0".parse()?).await?;
    let mut twin = Twin::start(&broker, &pki, 4096).await?;
    let mut cfg = tank_config(&pki, broker.port(), plc.addr(), 100)?;
    // Nothing can be created under /proc, not even by root.
    cfg.gateway.data_dir = "/proc/twin-gateway-data".into();
    let gw = gateway::run::start(cfg).await?;
    assert!(gw.outbox.is_none(), "no outbox in degraded mode");
    twin.until(
        Duration::from_secs(20),
        "a reported twin with live values",
        |t| {
            t.view().reported.is_some_and(|r| {
                r.tags
                    .get("tank1.level")
                    .is_some_and(|s| s.quality == Quality::Good)
            })
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(gw.stop().await.is_empty(), "stops cleanly");
    let v = twin.view();
    assert_eq!(
        v.batches, 0,
        "no batch is published without a durable outbox"
    );
    assert!(twin.rejections().is_empty());
    Ok(())
}

#[path = "e2e/commands.rs"]
mod commands;
#[path = "e2e/container.rs"]
mod container;
#[path = "e2e/faults.rs"]
mod faults;
#[path = "e2e/opcua.rs"]
mod opc_ua;
