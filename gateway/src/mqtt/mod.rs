//! The northbound MQTT link (rumqttc over rustls, mutual TLS).
//!
//! Two tasks: the *event loop* task only polls rumqttc's event loop (it
//! never publishes: publishing from it deadlocks under load); the
//! *publisher* task publishes from the durable outbox and takes live
//! messages (reported twin, status) from the uplink.
//!
//! Delivery from the outbox (see [`crate::outbox`]): rumqttc keeps its
//! state in memory only, so the outbox is the source of truth.
//! - The client's request channel has capacity 0: `publish()` returns once
//!   the event loop has taken the request, and each taken QoS 1 publish
//!   yields exactly one `Outgoing::Publish(pkid)` event, in order. The
//!   publisher records what it publishes in a FIFO *before* handing it
//!   over; the event loop task pops the FIFO on each such event, which maps
//!   packet ids to outbox items exactly.
//! - A PUBACK deletes the item from the outbox; nothing else does.
//! - `clean_session = true`: after a reconnect rumqttc forgets what was in
//!   flight, and the publisher re-sends every unacknowledged item from the
//!   outbox, oldest first. Some may arrive twice; the twin drops
//!   duplicates by sequence number.
//! - On every ConnAck a signed `online` status is published; the signed
//!   `offline` status is the last will, and is published on clean shutdown.
//! - Reconnects use capped, jittered backoff; each failure is explained
//!   ([`crate::tls::explain`]) in the log and in [`LinkState`].
//!
//! Commands (when configured): after every ConnAck the publisher
//! subscribes to the command topic (QoS 1). Acks are manual: the event
//! loop task hands each incoming message to the downlink as an
//! [`Inbound`], which acknowledges it once its decision is durably audited
//! ([`Inbound::ack`]). The event loop never waits for the downlink: past
//! [`INBOUND_QUEUE`] messages not yet taken, a message is passed on without
//! its payload, marked `overflow`, only to be counted and acknowledged.
//! Results and audit lines come back as [`Outgoing`] events, published in
//! order (QoS 1) while connected and queued (bounded) while not.

use crate::backoff::Backoff;
use crate::config::MqttConfig;
use crate::outbox::{Item, Outbox};
use crate::tls;
use rumqttc::{
    AsyncClient, Event, LastWill, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
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
    Reported {
        version: u64,
    },
    /// A signed command result.
    Result,
    /// A line of the audit log.
    Audit,
    /// A signed alert.
    Alert,
}

/// Command messages received but not yet taken by the downlink, beyond
/// which messages are passed on without their payload (`overflow`).
pub const INBOUND_QUEUE: usize = 256;
/// Results and audit lines kept while the broker is unreachable; beyond
/// it the oldest are dropped (the audit log on disk keeps every line).
const EVENT_QUEUE: usize = 4096;

/// A message received on a subscribed topic.
pub struct Inbound {
    pub topic: String,
    /// Empty when `overflow`.
    pub payload: Vec<u8>,
    /// Length of the payload as received.
    pub len: usize,
    /// The broker delivered it as a retained message.
    pub retain: bool,
    /// The downlink queue was full: the payload was not kept.
    pub overflow: bool,
    publish: rumqttc::Publish,
    client: AsyncClient,
    queued: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("topic", &self.topic)
            .field("len", &self.len)
            .field("retain", &self.retain)
            .field("overflow", &self.overflow)
            .finish()
    }
}

impl Inbound {
    /// Acknowledges the message to the broker (QoS 1 PUBACK); nothing for
    /// QoS 0. Call it once the message is dealt with (audited).
    pub async fn ack(&self) {
        if self.publish.qos != QoS::AtMostOnce {
            // An error means the link is gone: the session is clean, so the
            // broker forgets the message anyway.
            let _ = self.client.ack(&self.publish).await;
        }
    }
}

impl Drop for Inbound {
    fn drop(&mut self) {
        if !self.overflow {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The command side of the link: the topic to subscribe to and where
/// received messages go.
pub struct Subscription {
    pub topic: String,
    pub inbound: mpsc::UnboundedSender<Inbound>,
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
    /// Messages received on the command topic.
    pub received: AtomicU64,
    /// Results and audit lines dropped while the broker was unreachable.
    pub events_dropped: AtomicU64,
    /// Connections that ended by an error after the broker accepted them,
    /// and those of them that had lasted less than [`SHORT_SESSION`]: a
    /// second client with the gateway's identity takes the session over
    /// again and again.
    pub lost: AtomicU64,
    pub lost_short: AtomicU64,
    /// Connect attempts that failed in TLS or were refused by the broker
    /// (certificate, authentication or authorization problems).
    pub auth_failures: AtomicU64,
}

/// A connection lost sooner than this after the broker accepted it counts
/// as short (see [`LinkStats::lost_short`]).
pub const SHORT_SESSION: std::time::Duration = std::time::Duration::from_secs(10);

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
    /// `None` in degraded mode: only live messages are published.
    pub outbox: Option<Arc<Outbox>>,
    /// Notified after every outbox commit.
    pub wake: Arc<Notify>,
    /// Cancelled when nothing more will be written to the outbox: drain it
    /// (bounded by the deadline), say offline, disconnect.
    pub finish: CancellationToken,
    /// The command topic and its consumer, when commands are configured.
    pub subscription: Option<Subscription>,
}

/// Most outbox items published and not yet acknowledged.
const WINDOW: usize = 256;

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

/// Messages from the event loop task to the publisher.
#[derive(Debug)]
enum Ctl {
    Connected,
    Disconnected,
    Acked(Option<Item>),
}

/// Publishes handed to rumqttc whose packet id is not known yet (FIFO),
/// and those in flight by packet id.
#[derive(Default)]
struct Tracker {
    fifo: VecDeque<Option<Item>>,
    inflight: HashMap<u16, Option<Item>>,
}

/// Runs the link until `p.finish` is cancelled and the outbox is drained
/// (or the drain deadline passes), or until `abort` is cancelled.
pub async fn run(
    mut p: LinkParams,
    mut live: mpsc::Receiver<Outgoing>,
    mut events: mpsc::Receiver<Outgoing>,
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
    opts.set_clean_session(true);
    // Commands are acknowledged by the downlink, after their audit record.
    opts.set_manual_acks(true);
    opts.set_inflight(u16::try_from(WINDOW * 2).unwrap_or(u16::MAX));
    // Our own limit plus the PUBLISH header, so rumqttc never refuses what
    // the batcher made.
    // Incoming: the largest command the downlink accepts is checked there,
    // with a reason code; a packet above this limit makes rumqttc drop the
    // connection, so it is set well above (the broker's
    // `message_size_limit` should refuse such messages first).
    let packet_limit = p.mqtt.max_message_bytes + 1024;
    let incoming_limit = packet_limit.max(4 * 1024 * 1024);
    opts.set_max_packet_size(incoming_limit, packet_limit);
    opts.set_last_will(LastWill::new(
        topics.status(),
        status_message(&p, State::Offline),
        QoS::AtLeastOnce,
        true,
    ));
    // Capacity 0: see the module doc.
    let (client, mut eventloop) = AsyncClient::new(opts, 0);
    // A connect (TCP, TLS, CONNECT, CONNACK) that takes longer is abandoned
    // and retried: a stuck attempt must not hold the link for long.
    eventloop.network_options.set_connection_timeout(5);
    // Small messages (commands, results, acknowledgements) must not wait
    // for Nagle's algorithm and the peer's delayed ACK (40 ms each way).
    eventloop.network_options.set_tcp_nodelay(true);

    let tracker = Arc::new(std::sync::Mutex::new(Tracker::default()));
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Ctl>();
    let subscription = p.subscription.take();
    let subscribe_topic = subscription.as_ref().map(|s| s.topic.clone());
    let event_task = {
        let inbound = subscription.map(|s| (s.inbound, Arc::new(AtomicUsize::new(0))));
        let client = client.clone();
        let stats = stats.clone();
        let abort = abort.clone();
        let tracker = tracker.clone();
        let state_tx = state_tx.clone();
        let mut backoff = Backoff::new(p.mqtt.reconnect_min, p.mqtt.reconnect_max);
        let target = format!("{}:{}", p.mqtt.host, p.mqtt.port);
        tokio::spawn(async move {
            let _ = state_tx.send(LinkState::Connecting);
            let mut last_error = String::new();
            // When the broker last accepted the connection, while it lasts.
            let mut up_since: Option<std::time::Instant> = None;
            loop {
                // Only the abort branch can interrupt a poll: after an
                // abort nothing of the connection is used again.
                let ev = tokio::select! {
                    _ = abort.cancelled() => break,
                    ev = eventloop.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        stats.connects.fetch_add(1, Ordering::Relaxed);
                        up_since = Some(std::time::Instant::now());
                        backoff.reset();
                        last_error.clear();
                        tracing::info!(broker = %target, "connected to the broker");
                        tracker.lock().expect("tracker lock").inflight.clear();
                        let _ = state_tx.send(LinkState::Connected);
                        let _ = ctl_tx.send(Ctl::Connected);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                        let mut t = tracker.lock().expect("tracker lock");
                        match t.fifo.pop_front() {
                            Some(item) => {
                                t.inflight.insert(pkid, item);
                            }
                            None => tracing::error!(
                                pkid,
                                "a publish was not tracked; it will be sent again"
                            ),
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        stats.acked.fetch_add(1, Ordering::Relaxed);
                        let item = tracker
                            .lock()
                            .expect("tracker lock")
                            .inflight
                            .remove(&ack.pkid);
                        if let Some(item) = item {
                            let _ = ctl_tx.send(Ctl::Acked(item));
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        stats.received.fetch_add(1, Ordering::Relaxed);
                        match &inbound {
                            Some((tx, queued)) => {
                                let overflow = queued.load(Ordering::Relaxed) >= INBOUND_QUEUE;
                                if !overflow {
                                    queued.fetch_add(1, Ordering::Relaxed);
                                }
                                let len = publish.payload.len();
                                let payload = if overflow {
                                    Vec::new()
                                } else {
                                    publish.payload.to_vec()
                                };
                                let mut header = publish;
                                header.payload = Default::default();
                                let msg = Inbound {
                                    topic: header.topic.clone(),
                                    payload,
                                    len,
                                    retain: header.retain,
                                    overflow,
                                    publish: header,
                                    client: client.clone(),
                                    queued: queued.clone(),
                                };
                                // Unbounded, so the event loop never waits;
                                // see the module doc for the bound.
                                let _ = tx.send(msg);
                            }
                            None => {
                                tracing::warn!(topic = %publish.topic, "message on a topic the gateway did not subscribe to; ignored")
                            }
                        }
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                        let why = tls::explain(&e);
                        match up_since.take() {
                            Some(since) => {
                                stats.lost.fetch_add(1, Ordering::Relaxed);
                                if since.elapsed() < SHORT_SESSION {
                                    stats.lost_short.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            // With TLS 1.3 a refused client certificate
                            // arrives as an alert on the first read.
                            None if matches!(
                                e,
                                rumqttc::ConnectionError::Tls(_)
                                    | rumqttc::ConnectionError::ConnectionRefused(_)
                            ) || why.contains("alert")
                                || why.to_ascii_lowercase().contains("certificate") =>
                            {
                                stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                            }
                            None => {}
                        }
                        let _ = ctl_tx.send(Ctl::Disconnected);
                        if why != last_error {
                            tracing::warn!(broker = %target, error = %why, "MQTT connection failed; retrying with backoff");
                            last_error = why.clone();
                        }
                        let _ = state_tx.send(LinkState::Failed(why));
                        let delay = backoff.next_delay();
                        tokio::select! {
                            _ = abort.cancelled() => break,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        })
    };

    // Hands one message to rumqttc, tracked as `item`.
    let publish = |topic: String, payload: Vec<u8>, retain: bool, item: Option<Item>| {
        let client = client.clone();
        let tracker = tracker.clone();
        let stats = stats.clone();
        async move {
            tracker.lock().expect("tracker lock").fifo.push_back(item);
            if client
                .publish(topic, QoS::AtLeastOnce, retain, payload)
                .await
                .is_err()
            {
                tracker.lock().expect("tracker lock").fifo.pop_back();
                return false;
            }
            stats.sent.fetch_add(1, Ordering::Relaxed);
            if matches!(item, Some(Item::Batch(_))) {
                stats.batches_sent.fetch_add(1, Ordering::Relaxed);
            }
            true
        }
    };

    let outbox = p.outbox.clone();
    let mut connected = false;
    let mut unacked: HashSet<Item> = HashSet::new();
    let mut cursor = 0u64;
    let mut latest_live: Option<Outgoing> = None;
    let mut queued_events: VecDeque<Outgoing> = VecDeque::new();
    let mut events_open = true;
    let mut acks: Vec<Item> = Vec::new();
    let mut pending_ctl: Vec<Ctl> = Vec::new();
    let mut drain_until: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = abort.cancelled() => break,
            ctl = ctl_rx.recv() => match ctl {
                Some(ctl) => pending_ctl.push(ctl),
                None => break,
            },
            m = live.recv(), if drain_until.is_none() => match m {
                Some(m) => latest_live = Some(m),
                None => drain_until = Some(tokio::time::Instant::now() + drain_deadline),
            },
            e = events.recv(), if events_open => match e {
                Some(e) => {
                    if queued_events.len() >= EVENT_QUEUE {
                        queued_events.pop_front();
                        stats.events_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    queued_events.push_back(e);
                }
                None => events_open = false,
            },
            _ = p.wake.notified() => {}
            _ = tick.tick() => {}
            _ = p.finish.cancelled(), if drain_until.is_none() => {
                drain_until = Some(tokio::time::Instant::now() + drain_deadline);
            }
        }
        // Take every message waiting from the event loop, in order (more
        // acknowledgements usually are), then delete acknowledged items in
        // one transaction.
        while let Ok(ctl) = ctl_rx.try_recv() {
            pending_ctl.push(ctl);
        }
        let mut announce_online = false;
        for ctl in pending_ctl.drain(..) {
            match ctl {
                Ctl::Connected => {
                    connected = true;
                    unacked.clear();
                    cursor = 0;
                    announce_online = true;
                }
                Ctl::Disconnected => {
                    connected = false;
                    announce_online = false;
                }
                Ctl::Acked(Some(item)) => {
                    unacked.remove(&item);
                    acks.push(item);
                }
                Ctl::Acked(None) => {}
            }
        }
        if announce_online {
            if let Some(topic) = &subscribe_topic {
                if client
                    .subscribe(topic.clone(), QoS::AtLeastOnce)
                    .await
                    .is_err()
                {
                    break;
                }
            }
            let online = status_message(&p, State::Online);
            if !publish(topics.status(), online, true, None).await {
                break;
            }
        }
        if !acks.is_empty() {
            if let Err(e) = outbox.as_ref().map_or(Ok(()), |o| o.ack(&acks)) {
                tracing::error!(error = %e, "cannot delete acknowledged batches from the outbox; they will be sent again");
            }
            acks.clear();
        }
        if connected {
            if let Some(m) = latest_live.take() {
                if !publish(m.topic, m.payload, m.retain, None).await {
                    break;
                }
            }
            let mut gone = false;
            while let Some(e) = queued_events.pop_front() {
                // rumqttc drops the connection on a packet over its limit:
                // such a line stays in the audit file only.
                if e.payload.len() + e.topic.len() + 16 > p.mqtt.max_message_bytes {
                    tracing::error!(topic = %e.topic, bytes = e.payload.len(), limit = p.mqtt.max_message_bytes, "message larger than mqtt.max_message_bytes not published (the audit file keeps every line)");
                    stats.events_dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if !publish(e.topic, e.payload, e.retain, None).await {
                    gone = true;
                    break;
                }
            }
            if gone {
                break;
            }
            let sent = match &outbox {
                Some(o) => send_from_outbox(o, &topics, &mut unacked, &mut cursor, &publish).await,
                None => true,
            };
            if !sent {
                break;
            }
        }
        if let Some(until) = drain_until {
            // The downlink closes its audit log at shutdown: its last lines
            // (`stopped` and the final checkpoint) go out before the link ends.
            let drained = unacked.is_empty()
                && !events_open
                && queued_events.is_empty()
                && outbox.as_ref().is_none_or(|o| {
                    o.is_empty() && o.gaps(1).map(|g| g.is_empty()).unwrap_or(true)
                });
            if drained || tokio::time::Instant::now() >= until {
                if !drained {
                    let stored = outbox.as_ref().map_or(0, |o| o.len());
                    tracing::warn!(stored, "shutdown: batches not yet acknowledged stay in the outbox for the next start");
                }
                break;
            }
        }
    }

    // Orderly end: say offline (bounded), then disconnect.
    if !abort.is_cancelled() {
        let offline = status_message(&p, State::Offline);
        let sent = stats.sent.load(Ordering::Relaxed);
        if connected {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                publish(topics.status(), offline, true, None),
            )
            .await;
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while stats.acked.load(Ordering::Relaxed) <= sent && connected {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), client.disconnect()).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), event_task).await;
    abort.cancel();
    let _ = state_tx.send(LinkState::Closed);
}

/// Publishes stored gap records and batches not yet in flight, up to the
/// window. Returns false when the client is gone.
async fn send_from_outbox<F, Fut>(
    outbox: &Outbox,
    topics: &Topics,
    unacked: &mut HashSet<Item>,
    cursor: &mut u64,
    publish: &F,
) -> bool
where
    F: Fn(String, Vec<u8>, bool, Option<Item>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    match outbox.gaps(WINDOW) {
        Ok(gaps) => {
            for (id, jws) in gaps {
                if unacked.len() >= WINDOW {
                    return true;
                }
                if unacked.insert(Item::Gap(id))
                    && !publish(topics.gaps(), jws, false, Some(Item::Gap(id))).await
                {
                    return false;
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read gap records from the outbox"),
    }
    while unacked.len() < WINDOW {
        let room = WINDOW - unacked.len();
        let batch = match outbox.pending(*cursor, room) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the outbox");
                return true;
            }
        };
        if batch.is_empty() {
            return true;
        }
        for r in batch {
            *cursor = r.seq + 1;
            if unacked.insert(Item::Batch(r.seq))
                && !publish(topics.telemetry(), r.jws, false, Some(Item::Batch(r.seq))).await
            {
                return false;
            }
        }
    }
    true
}
