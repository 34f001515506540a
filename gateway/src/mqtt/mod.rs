//! The northbound MQTT link (rumqttc over rustls, mutual TLS).
//!
//! Two tasks: the *event loop* task only polls rumqttc's event loop (it
//! never publishes: publishing from it deadlocks under load) and reports
//! connection changes and acknowledgements; the *publisher* task takes
//! [`Outgoing`] messages from the uplink and hands them to the client.
//!
//! - QoS 1 for everything; the reported twin and the status are retained.
//! - `clean_session = false`, so the broker keeps the session and rumqttc
//!   re-sends unacknowledged publishes after a reconnect.
//! - On every ConnAck a signed `online` status is published; the signed
//!   `offline` status is the last will, and is published on clean shutdown.
//! - Reconnects use capped, jittered backoff; each failure is explained
//!   ([`crate::tls::explain`]) in the log and in [`LinkState`].

use crate::backoff::Backoff;
use crate::config::MqttConfig;
use crate::tls;
use rumqttc::{
    AsyncClient, Event, LastWill, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use twin_model::status::{State, Status, STATUS_TYP};
use twin_model::topics::Topics;
use twin_model::SigningKey;

/// A message for the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub kind: OutgoingKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutgoingKind {
    Batch { seq: u64, points: usize },
    Reported { version: u64 },
    Status,
}

/// The connection as others may observe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    Connecting,
    Connected,
    /// The last attempt failed; the text says why and what to check.
    Failed(String),
    Closed,
}

/// Counters of the link.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Publishes handed to the client.
    pub sent: AtomicU64,
    /// PUBACKs received.
    pub acked: AtomicU64,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub batches_sent: AtomicU64,
}

/// Everything the link needs.
pub struct LinkParams {
    pub mqtt: MqttConfig,
    pub gateway_id: String,
    pub tls: Arc<rustls::ClientConfig>,
    pub key: Arc<SigningKey>,
    /// ms since the epoch when this run of the gateway began.
    pub session: u64,
    /// Last sequence number signed at start, carried in the status.
    pub seq_at_start: u64,
}

fn status_message(p: &LinkParams, state: State) -> Vec<u8> {
    let s = Status {
        v: twin_model::WIRE_VERSION,
        gateway_id: p.gateway_id.clone(),
        state,
        session: p.session,
        seq: p.seq_at_start,
    };
    p.key
        .sign_compact(
            STATUS_TYP,
            &serde_json::to_vec(&s).expect("status serializes"),
        )
        .into_bytes()
}

/// Runs the link until `input` is closed (orderly shutdown: everything
/// received is handed to the broker, then `offline` is published and the
/// connection closed) or `abort` is cancelled (give up at once).
pub async fn run(
    p: LinkParams,
    mut input: mpsc::Receiver<Outgoing>,
    state_tx: watch::Sender<LinkState>,
    stats: Arc<LinkStats>,
    abort: CancellationToken,
    drain_deadline: Duration,
) {
    let topics = Topics::new(&p.mqtt.topic_prefix, &p.gateway_id);
    let mut opts = MqttOptions::new(&p.mqtt.client_id, &p.mqtt.host, p.mqtt.port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        p.tls.clone(),
    )));
    opts.set_keep_alive(p.mqtt.keep_alive);
    opts.set_clean_session(false);
    // Incoming: the gateway subscribes to nothing large yet; outgoing: our
    // own limit plus the PUBLISH header, so rumqttc never refuses what the
    // batcher made.
    let packet_limit = p.mqtt.max_message_bytes + 1024;
    opts.set_max_packet_size(packet_limit, packet_limit);
    opts.set_last_will(LastWill::new(
        topics.status(),
        status_message(&p, State::Offline),
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    eventloop.network_options.set_connection_timeout(10);

    let (conn_tx, mut conn_rx) = mpsc::unbounded_channel::<()>();
    let loop_stats = stats.clone();
    let loop_abort = abort.clone();
    let mut backoff = Backoff::new(p.mqtt.reconnect_min, p.mqtt.reconnect_max);
    let state_for_loop = state_tx.clone();
    let target = format!("{}:{}", p.mqtt.host, p.mqtt.port);
    let event_task = tokio::spawn(async move {
        let _ = state_for_loop.send(LinkState::Connecting);
        let mut last_error = String::new();
        loop {
            let ev = tokio::select! {
                _ = loop_abort.cancelled() => break,
                ev = eventloop.poll() => ev,
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    loop_stats.connects.fetch_add(1, Ordering::Relaxed);
                    backoff.reset();
                    last_error.clear();
                    tracing::info!(broker = %target, session_present = ack.session_present, "connected to the broker");
                    let _ = state_for_loop.send(LinkState::Connected);
                    let _ = conn_tx.send(());
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    loop_stats.acked.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(e) => {
                    loop_stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    let why = tls::explain(&e);
                    if why != last_error {
                        tracing::warn!(broker = %target, error = %why, "MQTT connection failed; retrying with backoff");
                        last_error = why.clone();
                    }
                    let _ = state_for_loop.send(LinkState::Failed(why));
                    let delay = backoff.next_delay();
                    tokio::select! {
                        _ = loop_abort.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    });

    let publish = |m: Outgoing| {
        let client = client.clone();
        let stats = stats.clone();
        async move {
            let ok = client
                .publish(m.topic, QoS::AtLeastOnce, m.retain, m.payload)
                .await
                .is_ok();
            if ok {
                stats.sent.fetch_add(1, Ordering::Relaxed);
                if matches!(m.kind, OutgoingKind::Batch { .. }) {
                    stats.batches_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            ok
        }
    };
    let online = || Outgoing {
        topic: topics.status(),
        payload: status_message(&p, State::Online),
        retain: true,
        kind: OutgoingKind::Status,
    };

    loop {
        tokio::select! {
            _ = abort.cancelled() => break,
            Some(()) = conn_rx.recv() => {
                if !publish(online()).await { break; }
            }
            m = input.recv() => match m {
                Some(m) => if !publish(m).await { break; },
                None => break,
            }
        }
    }

    // Orderly end: say offline, wait for every acknowledgement (bounded),
    // then disconnect.
    if !abort.is_cancelled() {
        let offline = Outgoing {
            topic: topics.status(),
            payload: status_message(&p, State::Offline),
            retain: true,
            kind: OutgoingKind::Status,
        };
        let _ = tokio::time::timeout(drain_deadline, publish(offline)).await;
        let waited = tokio::time::timeout(drain_deadline, async {
            while stats.acked.load(Ordering::Relaxed) < stats.sent.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        if waited.is_err() {
            tracing::warn!(
                unacknowledged = stats
                    .sent
                    .load(Ordering::Relaxed)
                    .saturating_sub(stats.acked.load(Ordering::Relaxed)),
                "shutdown deadline reached with publishes not acknowledged by the broker"
            );
        }
        let _ = client.disconnect().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), event_task).await;
    abort.cancel();
    let _ = state_tx.send(LinkState::Closed);
}
