//! OPC UA driver: one client session per device, values by subscription
//! (or by the Read service), writes by permit.
//!
//! The stages, in the order a connection runs them:
//! 1. discovery: the server's endpoints (GetEndpoints), and the choice of
//!    one: the configured policy, or the most secure of Basic256Sha256,
//!    Aes128_Sha256_RsaOaep and Aes256_Sha256_RsaPss, in the configured
//!    mode (SignAndEncrypt by default). Basic128Rsa15 and Basic256 are never
//!    chosen; None only when the device says `allow_security_none = true`.
//! 2. session: the server certificate must be in the device's trust list
//!    (`<pki_dir>/trusted/`, file name `<CN> [<sha1 thumbprint>].der`); an
//!    unknown one is stored in `<pki_dir>/rejected/` for an engineer to
//!    review and the session is refused. Never auto-trusted.
//! 3. values: one subscription with a monitored item per tag (sampling
//!    interval, queue size, absolute deadband), source timestamps kept; or
//!    the Read service every `sampling_interval_ms` (`read = "poll"`).
//!    Status codes become quality: good, uncertain or bad with the code's
//!    name (`opcua:BadNodeIdUnknown`).
//! 4. recovery: the library reconnects and re-creates the subscription; the
//!    gap shows as bad quality (`disconnected`) on every tag, never as
//!    silence, and a publish is triggered after each reconnect.
//! 5. writes: a [`WriteRequest`] (policy permit) is served on the same
//!    session: optional read of the expected value, Write of the value
//!    converted to the tag's type, read-back and comparison.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use opcua::client::{
    Client, ClientBuilder, DataChangeCallback, IdentityToken, MonitoredItem, Session,
    SessionPollResult, SubscriptionActivity,
};
use opcua::crypto::SecurityPolicy;
use opcua::types::{
    AttributeId, DataChangeFilter, DataChangeTrigger, DataValue, DeadbandType, EndpointDescription,
    ExtensionObject, MessageSecurityMode, MonitoredItemCreateRequest, MonitoringMode,
    MonitoringParameters, NamespaceMap, NodeId, NumericRange, ReadValueId, StatusCode,
    TimestampsToReturn, UAString, VariableId, Variant, WriteValue,
};
use tokio::sync::mpsc;
use tracing::{info, warn};
use twin_model::inventory::DeviceIdentity;
use twin_model::sample::reason;
use twin_model::{Quality, Sample, Value};

use super::{write_code, DeviceContext, DeviceEvent, WriteFailure, WriteReport, WriteRequest};
use crate::clock::now_ms;
use crate::config::{
    OpcUaDeviceConfig, OpcUaIdentity, OpcUaMode, OpcUaPolicy, OpcUaRead, OpcUaTag, OpcUaType,
};
use crate::metrics::DeviceStats;
use crate::policy::WritePermit;

/// Monitored items created per CreateMonitoredItems call, at most: fewer
/// when the server's `MaxMonitoredItemsPerCall` operation limit is lower,
/// and halved while the server finds a call too large (see [`ItemCalls`]).
const MONITORED_ITEMS_PER_CALL: usize = 500;

/// Notifications per publish response the subscription asks for. Without a
/// bound a server puts the changes of every item into one response: for
/// 10,000 Double items (about 30 bytes each with both timestamps) that was
/// over the client's message limit, the server answered every publish with
/// `BadResponseTooLarge` and not one value arrived. A server splits larger
/// sets over several responses, which the client fetches back to back (each
/// says when more are waiting). 5000 numeric values take about 170 KB.
const NOTIFICATIONS_PER_PUBLISH: u32 = 5000;

/// The largest message the client accepts, announced to the server (which
/// sizes its responses by it): 4 MiB. A publish response holds at most
/// [`NOTIFICATIONS_PER_PUBLISH`] values (about 170 KB when numeric, which
/// leaves room for string values of some 800 bytes on average), and the
/// Read of every tag (`read = "poll"`) about 26 bytes per numeric tag (some
/// 150,000 tags). A message is assembled in memory before it is decoded,
/// so this also bounds what one session can make the gateway hold at once
/// (the gateway's whole peak RSS budget is 64 MiB). async-opcua's default,
/// 5 chunks (320 KiB), is too small for a publish of 10,000 values.
const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// async-opcua's chunk size (sent and received), for the chunk count that
/// makes [`MAX_MESSAGE_BYTES`].
const CHUNK_BYTES: usize = 65_535;

/// Prefix of the reason of a sample whose OPC UA status is not good.
pub const STATUS_PREFIX: &str = "opcua:";

/// The policies the gateway may choose, most secure last.
const SECURE: &[(OpcUaPolicy, SecurityPolicy)] = &[
    (OpcUaPolicy::Basic256Sha256, SecurityPolicy::Basic256Sha256),
    (
        OpcUaPolicy::Aes128Sha256RsaOaep,
        SecurityPolicy::Aes128Sha256RsaOaep,
    ),
    (
        OpcUaPolicy::Aes256Sha256RsaPss,
        SecurityPolicy::Aes256Sha256RsaPss,
    ),
];

/// Why a connection could not be made, for the log and the tags' reason.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read the server's endpoints at {url}: {status}")]
    Discovery { url: String, status: StatusCode },
    #[error("the server offers no acceptable endpoint ({wanted}); it offers: {offered}")]
    NoAcceptableEndpoint { wanted: String, offered: String },
    #[error("{0}")]
    Setup(String),
}

/// An OPC UA device driver.
#[derive(Debug, Clone)]
pub struct OpcUaDriver {
    cfg: OpcUaDeviceConfig,
}

/// The endpoint chosen for a server, from what it offers.
pub fn choose_endpoint(
    cfg: &OpcUaDeviceConfig,
    offered: &[EndpointDescription],
) -> Result<EndpointDescription, ConnectError> {
    let mode = match (cfg.security_policy, cfg.security_mode) {
        (Some(OpcUaPolicy::None), _) => MessageSecurityMode::None,
        (_, OpcUaMode::SignAndEncrypt) => MessageSecurityMode::SignAndEncrypt,
        (_, OpcUaMode::Sign) => MessageSecurityMode::Sign,
    };
    let allowed: Vec<SecurityPolicy> = match cfg.security_policy {
        Some(OpcUaPolicy::None) if cfg.allow_security_none => vec![SecurityPolicy::None],
        Some(OpcUaPolicy::None) => Vec::new(),
        Some(p) => SECURE
            .iter()
            .filter(|(c, _)| *c == p)
            .map(|(_, s)| *s)
            .collect(),
        None => SECURE.iter().map(|(_, s)| *s).collect(),
    };
    let best = offered
        .iter()
        .filter(|e| e.security_mode == mode)
        .filter_map(|e| {
            let p = SecurityPolicy::from_uri(e.security_policy_uri.as_ref());
            let rank = allowed.iter().position(|a| *a == p)?;
            Some((rank, e))
        })
        .max_by_key(|(rank, _)| *rank)
        .map(|(_, e)| e.clone());
    best.ok_or_else(|| ConnectError::NoAcceptableEndpoint {
        wanted: format!(
            "{} in mode {mode:?}",
            if allowed.is_empty() {
                "no policy".to_string()
            } else {
                allowed
                    .iter()
                    .map(|p| p.to_str().to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            }
        ),
        offered: offered
            .iter()
            .map(|e| {
                format!(
                    "{}/{:?}",
                    SecurityPolicy::from_uri(e.security_policy_uri.as_ref()).to_str(),
                    e.security_mode
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// A twin value from an OPC UA variant (scalars only).
pub fn value_of(v: &Variant) -> Option<Value> {
    Some(match v {
        Variant::Boolean(b) => Value::Bool(*b),
        Variant::SByte(x) => Value::Int(i64::from(*x)),
        Variant::Int16(x) => Value::Int(i64::from(*x)),
        Variant::Int32(x) => Value::Int(i64::from(*x)),
        Variant::Int64(x) => Value::Int(*x),
        Variant::Byte(x) => Value::UInt(u64::from(*x)),
        Variant::UInt16(x) => Value::UInt(u64::from(*x)),
        Variant::UInt32(x) => Value::UInt(u64::from(*x)),
        Variant::UInt64(x) => Value::UInt(*x),
        Variant::Float(x) if x.is_finite() => Value::Float(twin_model::sample::widen_f32(*x)),
        Variant::Double(x) if x.is_finite() => Value::Float(*x),
        Variant::String(s) => Value::Text(s.as_ref().to_owned()),
        Variant::DateTime(d) => Value::Text(d.as_chrono().to_rfc3339()),
        _ => return None,
    })
}

/// The variant of `tag`'s type holding `v`, if it fits exactly.
pub fn variant_for(tag: &OpcUaTag, v: &Value) -> Result<Variant, String> {
    let int = || -> Result<i128, String> {
        match v {
            Value::Int(i) => Ok(i128::from(*i)),
            Value::UInt(u) => Ok(i128::from(*u)),
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 1e19 => Ok(*f as i128),
            _ => Err(format!("{v} is not a whole number for {:?}", tag.data_type)),
        }
    };
    let range =
        |e: std::num::TryFromIntError| format!("{v} is out of range for {:?}: {e}", tag.data_type);
    Ok(match tag.data_type {
        OpcUaType::Bool => match v {
            Value::Bool(b) => Variant::Boolean(*b),
            Value::Int(0) | Value::UInt(0) => Variant::Boolean(false),
            Value::Int(1) | Value::UInt(1) => Variant::Boolean(true),
            _ => return Err(format!("{v} is not a boolean")),
        },
        OpcUaType::SByte => Variant::SByte(i8::try_from(int()?).map_err(range)?),
        OpcUaType::Byte => Variant::Byte(u8::try_from(int()?).map_err(range)?),
        OpcUaType::Int16 => Variant::Int16(i16::try_from(int()?).map_err(range)?),
        OpcUaType::UInt16 => Variant::UInt16(u16::try_from(int()?).map_err(range)?),
        OpcUaType::Int32 => Variant::Int32(i32::try_from(int()?).map_err(range)?),
        OpcUaType::UInt32 => Variant::UInt32(u32::try_from(int()?).map_err(range)?),
        OpcUaType::Int64 => Variant::Int64(i64::try_from(int()?).map_err(range)?),
        OpcUaType::UInt64 => Variant::UInt64(u64::try_from(int()?).map_err(range)?),
        OpcUaType::Float => match v.as_f64() {
            Some(x) if x.abs() <= f64::from(f32::MAX) => Variant::Float(x as f32),
            _ => return Err(format!("{v} does not fit a Float")),
        },
        OpcUaType::Double => match v.as_f64() {
            Some(x) if x.is_finite() => Variant::Double(x),
            _ => return Err(format!("{v} is not a finite number")),
        },
        OpcUaType::String => match v {
            Value::Text(s) => Variant::String(UAString::from(s.as_str())),
            _ => return Err(format!("{v} is not text")),
        },
    })
}

/// A sample from a data value, with its status as quality.
pub fn sample_of(tag: &str, dv: &DataValue) -> Sample {
    let ms = |t: &opcua::types::DateTime| t.as_chrono().timestamp_millis().max(0) as u64;
    let server_ts_ms = dv.server_timestamp.as_ref().map(ms);
    let ts_ms = dv
        .source_timestamp
        .as_ref()
        .map(ms)
        .or(server_ts_ms)
        .unwrap_or_else(now_ms);
    let with_server = |mut s: Sample| {
        s.server_ts_ms = server_ts_ms;
        s
    };
    let status = dv.status.unwrap_or(StatusCode::Good);
    if status.is_bad() {
        return with_server(Sample::bad(
            tag,
            format!("{STATUS_PREFIX}{}", status.sub_code().name()),
            ts_ms,
        ));
    }
    let Some(value) = dv.value.as_ref().and_then(value_of) else {
        return with_server(Sample::bad(
            tag,
            format!("{STATUS_PREFIX}unsupported_value"),
            ts_ms,
        ));
    };
    let mut s = Sample::good(tag, value, ts_ms);
    if status.is_uncertain() {
        s.quality = Quality::Uncertain;
        s.reason = Some(format!("{STATUS_PREFIX}{}", status.sub_code().name()));
    }
    with_server(s)
}

/// The node of `tag`, with a `nsu=` namespace URI resolved against the
/// server's namespace array.
fn resolve(tag: &OpcUaTag, namespaces: &NamespaceMap) -> Result<NodeId, String> {
    let unparsable = || {
        format!(
            "node id `{}` of tag `{}` cannot be parsed",
            tag.node_id, tag.name
        )
    };
    let text = match tag.node_id.strip_prefix("nsu=") {
        Some(rest) => {
            let (uri, id) = rest.split_once(';').ok_or_else(unparsable)?;
            let index = namespaces.get_index(uri).ok_or_else(|| {
                format!(
                    "node id `{}` of tag `{}`: the server has no namespace `{uri}`",
                    tag.node_id, tag.name
                )
            })?;
            format!("ns={index};{id}")
        }
        None => tag.node_id.clone(),
    };
    text.parse::<NodeId>().map_err(|_| unparsable())
}

/// Each tag's node on the current session (`None` when it cannot be resolved).
type Nodes = Vec<Option<NodeId>>;

fn node<'a>(
    nodes: &'a Nodes,
    tag: &OpcUaTag,
    cfg: &OpcUaDeviceConfig,
) -> Result<&'a NodeId, String> {
    cfg.tags
        .iter()
        .position(|t| t.name == tag.name)
        .and_then(|i| nodes.get(i))
        .and_then(Option::as_ref)
        .ok_or_else(|| format!("tag `{}` has no node on this server", tag.name))
}
/// Status codes after which retrying with the same settings cannot help.
fn is_final(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BadUserAccessDenied
            | StatusCode::BadIdentityTokenRejected
            | StatusCode::BadIdentityTokenInvalid
            | StatusCode::BadCertificateUntrusted
            | StatusCode::BadCertificateTimeInvalid
            | StatusCode::BadSecurityChecksFailed
            | StatusCode::BadCertificateInvalid
    )
}

/// What an engineer should do about a failed connection.
pub fn explain(status: StatusCode, pki_dir: &std::path::Path) -> String {
    let name = status.sub_code().name();
    match status {
        StatusCode::BadCertificateUntrusted | StatusCode::BadSecurityChecksFailed => format!(
            "{name}: the server certificate is not in the trust list; it was stored in {} for review: after checking its thumbprint with the server's owner, move it to {}",
            pki_dir.join("rejected").display(),
            pki_dir.join("trusted").display()
        ),
        StatusCode::BadCertificateTimeInvalid => {
            format!("{name}: the server certificate has expired or is not valid yet: renew it on the server")
        }
        StatusCode::BadUserAccessDenied
        | StatusCode::BadIdentityTokenRejected
        | StatusCode::BadIdentityTokenInvalid => format!(
            "{name}: the server refused the login: check the user name and the password file"
        ),
        _ => name.to_string(),
    }
}

impl OpcUaDriver {
    pub fn new(cfg: OpcUaDeviceConfig) -> Self {
        OpcUaDriver { cfg }
    }

    fn client(&self) -> Result<Client, ConnectError> {
        let c = &self.cfg;
        ClientBuilder::new()
            .application_name("Twin gateway")
            .application_uri(c.application_uri.clone())
            .product_uri("urn:twin-gateway")
            .pki_dir(c.pki_dir.clone())
            .certificate_path(c.certificate_file.clone())
            .private_key_path(c.private_key_file.clone())
            .create_sample_keypair(false)
            .trust_server_certs(false)
            .verify_server_certs(true)
            .session_retry_limit(-1)
            .session_retry_initial(c.reconnect_min)
            .session_retry_max(c.reconnect_max)
            .keep_alive_interval(Duration::from_secs(5))
            // A hung (not closed) connection is noticed after three
            // keep-alives without an answer.
            .max_failed_keep_alive_count(3)
            .request_timeout(c.request_timeout)
            // The library's default (1000) refuses a notification or a
            // reply with more values than that and drops the connection:
            // a device with thousands of tags needs more. The message size
            // below is the real bound.
            .max_array_length(1_000_000)
            .max_message_size(MAX_MESSAGE_BYTES)
            .max_chunk_count(MAX_MESSAGE_BYTES.div_ceil(CHUNK_BYTES))
            .recreate_subscriptions(true)
            .session_timeout(60_000)
            .client()
            .map_err(|e| ConnectError::Setup(format!("OPC UA client setup: {}", e.join("; "))))
    }

    fn identity(&self) -> Result<IdentityToken, ConnectError> {
        match &self.cfg.identity {
            OpcUaIdentity::Anonymous => Ok(IdentityToken::Anonymous),
            OpcUaIdentity::UserName {
                user,
                password_file,
            } => {
                let password = crate::keyfile::read_private(password_file)
                    .map_err(|e| ConnectError::Setup(format!("{e:#}")))?;
                Ok(IdentityToken::new_user_name(
                    user.clone(),
                    password.trim_end_matches(['\n', '\r']).to_owned(),
                ))
            }
            OpcUaIdentity::X509 {
                cert_file,
                key_file,
            } => {
                crate::keyfile::read_private(key_file)
                    .map_err(|e| ConnectError::Setup(format!("{e:#}")))?;
                IdentityToken::new_x509_path(cert_file, key_file)
                    .map_err(|e| ConnectError::Setup(format!("user certificate: {e}")))
            }
        }
    }

    /// Connects, serves values and writes until `shutdown`. Never returns
    /// an error: failures become bad-quality samples and failed writes.
    pub async fn run(self, ctx: DeviceContext) {
        let DeviceContext {
            shutdown,
            out,
            mut writes,
            notices,
            stats,
        } = ctx;
        let mut last_notice: Option<&'static str> = None;
        let mut notice = |code: &'static str, detail: String| {
            if last_notice != Some(code) {
                notices.report(&self.cfg.name, code, detail);
                last_notice = Some(code);
            }
        };
        let cfg = self.cfg.clone();
        if cfg.security_policy == Some(OpcUaPolicy::None) {
            notices.report(
                &cfg.name,
                "opcua_security_none",
                format!(
                    "allow_security_none = true: {} is read without message security",
                    cfg.endpoint_url
                ),
            );
            warn!(device = %cfg.name, "INSECURE: OPC UA security None is allowed for this device (allow_security_none = true): values and passwords travel unprotected");
        }
        let mut delay = cfg.reconnect_min;
        loop {
            let attempt = tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                r = self.connect() => r,
            };
            let (session, events, facts) = match attempt {
                Ok(s) => s,
                Err(e) => {
                    if let ConnectError::NoAcceptableEndpoint { .. } = &e {
                        notice("opcua_no_acceptable_endpoint", e.to_string());
                    }
                    warn!(device = %cfg.name, error = %e, retry_in = ?delay, "OPC UA connection failed");
                    if !self.emit_bad(&out, reason::DISCONNECTED).await {
                        return;
                    }
                    if !self.wait(&shutdown, &mut writes, delay).await {
                        return;
                    }
                    delay = (delay * 2).min(cfg.reconnect_max);
                    continue;
                }
            };
            delay = cfg.reconnect_min;
            let ended = self
                .serve(
                    (session.clone(), events, facts),
                    &shutdown,
                    &out,
                    &mut writes,
                    &stats,
                    &notices,
                )
                .await;
            stats.connected.store(false, Ordering::Relaxed);
            match ended {
                Served::Stop => return,
                Served::Mismatch(why) => {
                    warn!(device = %cfg.name, %why, retry_in = ?cfg.reconnect_max, "NOT READ: the server does not identify itself as expect_identity requires");
                    if !self.emit_bad(&out, reason::IDENTITY_MISMATCH).await {
                        return;
                    }
                    if !self.wait(&shutdown, &mut writes, cfg.reconnect_max).await {
                        return;
                    }
                }
                Served::Failed(why, status) => {
                    if let Some(code) = status.and_then(security_code) {
                        notice(code, why.clone());
                    }
                    warn!(device = %cfg.name, error = %why, retry_in = ?cfg.reconnect_max, "OPC UA session ended; retrying");
                    let why = match status {
                        Some(s) if is_lost_publish(s) => {
                            format!("{STATUS_PREFIX}{}", s.sub_code().name())
                        }
                        _ => reason::DISCONNECTED.to_string(),
                    };
                    if !self.emit_bad(&out, &why).await {
                        return;
                    }
                    if !self.wait(&shutdown, &mut writes, cfg.reconnect_max).await {
                        return;
                    }
                }
            }
        }
    }

    /// Waits `delay`, answering writes as failed meanwhile. False at shutdown.
    async fn wait(
        &self,
        shutdown: &tokio_util::sync::CancellationToken,
        writes: &mut mpsc::Receiver<WriteRequest>,
        delay: Duration,
    ) -> bool {
        let until = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep_until(until) => return true,
                Some(w) = writes.recv() => {
                    let _ = w.reply.send(Err(WriteFailure::new(
                        write_code::DEVICE_UNAVAILABLE,
                        format!("device `{}` is not connected", self.cfg.name),
                        false,
                    )));
                }
            }
        }
    }

    async fn emit_bad(&self, out: &mpsc::Sender<DeviceEvent>, why: &str) -> bool {
        let ts = now_ms();
        let event = DeviceEvent {
            device: self.cfg.name.clone(),
            samples: self
                .cfg
                .tags
                .iter()
                .map(|t| Sample::bad(&t.name, why, ts))
                .collect(),
            cycle_done: true,
            command_id: None,
        };
        out.send(event).await.is_ok()
    }

    /// Discovery, endpoint choice and the session (not yet connected).
    async fn connect(&self) -> Result<(Arc<Session>, SessionEvents, ServerFacts), ConnectError> {
        let mut client = self.client()?;
        let url = self.cfg.endpoint_url.clone();
        let offered = client
            .get_server_endpoints_from_url(url.as_str())
            .await
            .map_err(|e| ConnectError::Discovery {
                url: url.clone(),
                status: e.status(),
            })?;
        let mut endpoint = choose_endpoint(&self.cfg, &offered)?;
        // The server may advertise a host name the gateway cannot reach:
        // keep the configured address.
        endpoint.endpoint_url = url.as_str().into();
        info!(device = %self.cfg.name, policy = SecurityPolicy::from_uri(endpoint.security_policy_uri.as_ref()).to_str(), mode = ?endpoint.security_mode, "OPC UA endpoint chosen");
        let facts = ServerFacts {
            application_uri: endpoint.server.application_uri.as_ref().to_owned(),
            certificate: endpoint.server_certificate.as_ref().to_vec(),
        };
        let identity = self.identity()?;
        let (session, event_loop) = client
            .connect_to_endpoint_directly(endpoint, identity)
            .map_err(|e| ConnectError::Setup(format!("session setup: {e}")))?;
        Ok((session, Box::pin(event_loop.enter()), facts))
    }

    /// Runs one session: waits for it, subscribes (or polls), serves writes.
    async fn serve(
        &self,
        (session, stream, facts): (Arc<Session>, SessionEvents, ServerFacts),
        shutdown: &tokio_util::sync::CancellationToken,
        out: &mpsc::Sender<DeviceEvent>,
        writes: &mut mpsc::Receiver<WriteRequest>,
        stats: &DeviceStats,
        notices: &super::Notices,
    ) -> Served {
        let cfg = &self.cfg;
        // The session's requests only progress while its event loop is
        // polled: poll it in a task of its own, so that this loop may await
        // reads, writes and subscriptions. That task must never wait for
        // this loop: the stream yields an event for every message sent and
        // received (three per request), and while this loop awaits the
        // CreateMonitoredItems calls of a large device (20 for 10,000
        // tags) nobody reads them; with a bounded channel the pump stopped
        // at 64 events, the event loop with it, and the pending request
        // (whose timeout the event loop checks too) hung for ever. So only
        // the events that change the connection are passed on ([`matters`]),
        // at most one per (re)connect attempt, which this loop reads between
        // any two requests: the unbounded channel holds a few at most.
        let (ev_tx, mut events) = mpsc::unbounded_channel();
        let pump = tokio::spawn(async move {
            let mut stream = stream;
            while let Some(ev) = stream.next().await {
                let end = ev.is_err();
                if !matters(&ev) {
                    continue;
                }
                if ev_tx.send(ev).is_err() || end {
                    break;
                }
            }
        });
        let _pump = AbortOnDrop(pump);
        let (tx, mut rx) = mpsc::unbounded_channel::<(u32, DataValue)>();
        let mut subscribed = false;
        // The tags without a monitored item, and why.
        let mut refused: Vec<(usize, StatusCode)> = Vec::new();
        let mut connected = false;
        let mut nodes: Nodes = vec![None; cfg.tags.len()];
        let mut poll = tokio::time::interval(cfg.sampling_interval.max(Duration::from_millis(10)));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // A subscription sends only changes: while the session stands, an
        // unchanged value is still current. `last_seen_ms` says so to the
        // sensor checks (stale, flatline) at every publishing interval.
        let mut alive =
            tokio::time::interval(cfg.publishing_interval.max(Duration::from_millis(100)));
        alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    // Close the session in order while its event loop still runs.
                    let _ = tokio::time::timeout(Duration::from_secs(2), session.disconnect()).await;
                    return Served::Stop;
                }
                ev = events.recv() => match ev {
                    None => return Served::Failed("the session was closed".into(), None),
                    Some(Err(status)) => return Served::Failed(explain(status, &cfg.pki_dir), Some(status)),
                    Some(Ok(SessionPollResult::Reconnected(_))) => {
                        connected = true;
                        stats.connected.store(true, Ordering::Relaxed);
                        stats.connects.fetch_add(1, Ordering::Relaxed);
                        let identity = build_info(&session, &facts).await;
                        let verdict = super::check_identity(cfg.expect_identity.as_ref(), Some(&identity));
                        notices.identity(&cfg.name, Ok(identity));
                        if let Err(why) = verdict {
                            // Not read: the session is closed in order and
                            // the next attempt checks again.
                            let _ = tokio::time::timeout(Duration::from_secs(2), session.disconnect()).await;
                            return Served::Mismatch(why);
                        }
                        match session.read_namespace_array().await {
                            Ok(map) => {
                                nodes = cfg.tags.iter().map(|t| match resolve(t, &map) {
                                    Ok(n) => Some(n),
                                    Err(e) => {
                                        warn!(device = %cfg.name, error = %e, "tag stays bad");
                                        None
                                    }
                                }).collect();
                            }
                            Err(e) => return Served::Failed(format!("cannot read the namespace array: {e}"), None),
                        }
                        if subscribed {
                            // Re-created subscriptions stay silent until a
                            // publish is triggered.
                            session.trigger_publish_now();
                        } else if cfg.read == OpcUaRead::Subscribe {
                            match self.subscribe(&session, &nodes, tx.clone()).await {
                                Ok(r) => {
                                    subscribed = true;
                                    refused = r;
                                }
                                Err(e) => return Served::Failed(format!("cannot subscribe: {e}"), None),
                            }
                        }
                        // Bad with their reason, also again after a
                        // reconnect (which made every tag `disconnected`).
                        if !refused.is_empty() {
                            let event = DeviceEvent { device: cfg.name.clone(), samples: self.refused_samples(&refused), cycle_done: true, command_id: None };
                            if out.send(event).await.is_err() {
                                return Served::Stop;
                            }
                        }
                        info!(device = %cfg.name, "OPC UA session ready");
                    }
                    Some(Ok(SessionPollResult::ConnectionLost(status))) => {
                        connected = false;
                        stats.connected.store(false, Ordering::Relaxed);
                        warn!(device = %cfg.name, status = %status.sub_code().name(), "OPC UA connection lost");
                        if !self.emit_bad(out, reason::DISCONNECTED).await {
                            return Served::Stop;
                        }
                    }
                    Some(Ok(SessionPollResult::ReconnectFailed(status))) => {
                        if !self.emit_bad(out, reason::DISCONNECTED).await {
                            return Served::Stop;
                        }
                        if is_final(status) {
                            return Served::Failed(explain(status, &cfg.pki_dir), Some(status));
                        }
                        warn!(device = %cfg.name, error = %explain(status, &cfg.pki_dir), "OPC UA reconnect failed");
                    }
                    Some(Ok(SessionPollResult::Subscription(SubscriptionActivity::PublishFailed(status)))) => {
                        // The changes in that response are lost, and a
                        // subscription sends only changes: a new session
                        // (and subscription) sends every value afresh.
                        return Served::Failed(
                            format!(
                                "{}: the server could not send a publish response within the gateway's limit of {} KiB per message ({NOTIFICATIONS_PER_PUBLISH} notifications per publish asked for); its changes are lost, restarting the session",
                                status.sub_code().name(),
                                MAX_MESSAGE_BYTES >> 10
                            ),
                            Some(status),
                        );
                    }
                    Some(Ok(_)) => {}
                },
                Some((handle, dv)) = rx.recv() => {
                    let mut samples = Vec::new();
                    let mut push = |h: u32, dv: &DataValue| {
                        if let Some(t) = (h as usize).checked_sub(1).and_then(|i| cfg.tags.get(i)) {
                            samples.push(sample_of(&t.name, dv));
                        }
                    };
                    push(handle, &dv);
                    while let Ok((h, dv)) = rx.try_recv() {
                        push(h, &dv);
                    }
                    stats.read(Duration::ZERO, samples.iter().all(|s| s.quality != Quality::Bad));
                    let event = DeviceEvent { device: cfg.name.clone(), samples, cycle_done: true, command_id: None };
                    if out.send(event).await.is_err() {
                        return Served::Stop;
                    }
                }
                _ = alive.tick(), if connected && subscribed => {
                    stats.last_seen_ms.store(now_ms(), Ordering::Relaxed);
                }
                _ = poll.tick(), if connected && cfg.read == OpcUaRead::Poll => {
                    let started = tokio::time::Instant::now();
                    let samples = self.read_all(&session, &nodes).await;
                    stats.read(started.elapsed(), samples.iter().all(|s| s.quality != Quality::Bad));
                    let event = DeviceEvent { device: cfg.name.clone(), samples, cycle_done: true, command_id: None };
                    if out.send(event).await.is_err() {
                        return Served::Stop;
                    }
                }
                Some(w) = writes.recv() => {
                    let command_id = w.permit.command_id().to_owned();
                    let result = if connected {
                        self.write(&session, &nodes, w.permit, w.expect).await
                    } else {
                        Err(WriteFailure::new(write_code::DEVICE_UNAVAILABLE, format!("device `{}` is not connected", cfg.name), false))
                    };
                    if let Ok((_, sample)) = &result {
                        let event = DeviceEvent { device: cfg.name.clone(), samples: vec![sample.clone()], cycle_done: false, command_id: Some(command_id) };
                        if out.send(event).await.is_err() {
                            return Served::Stop;
                        }
                    }
                    stats.writes.fetch_add(1, Ordering::Relaxed);
                    if result.is_err() {
                        stats.write_failures.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = w.reply.send(result.map(|(r, _)| r));
                }
            }
        }
    }

    /// Creates the subscription and a monitored item per resolved tag.
    /// Returns the tags that got none, with the status why: refused by the
    /// server (the whole call or the item) or not resolved on this server.
    /// Fails only when the session does (a transport error, a timeout).
    async fn subscribe(
        &self,
        session: &Session,
        nodes: &Nodes,
        tx: mpsc::UnboundedSender<(u32, DataValue)>,
    ) -> Result<Vec<(usize, StatusCode)>, String> {
        let cfg = &self.cfg;
        let id = session
            .create_subscription(
                cfg.publishing_interval,
                30,
                10,
                NOTIFICATIONS_PER_PUBLISH,
                0,
                true,
                DataChangeCallback::new(move |dv, item: &MonitoredItem| {
                    let _ = tx.send((item.client_handle(), dv));
                }),
            )
            .await
            .map_err(|e| e.to_string())?;
        let filter = if cfg.deadband > 0.0 {
            ExtensionObject::from_message(DataChangeFilter {
                trigger: DataChangeTrigger::StatusValueTimestamp,
                deadband_type: DeadbandType::Absolute as u32,
                deadband_value: cfg.deadband,
            })
        } else {
            ExtensionObject::null()
        };
        let request = |i: usize, id: &NodeId| {
            MonitoredItemCreateRequest::new(
                id.clone().into(),
                MonitoringMode::Reporting,
                MonitoringParameters {
                    // Handle 0 means "assign one" to the client library.
                    client_handle: i as u32 + 1,
                    sampling_interval: cfg.sampling_interval.as_secs_f64() * 1000.0,
                    filter: filter.clone(),
                    queue_size: cfg.queue_size,
                    discard_oldest: true,
                },
            )
        };
        let resolved = nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.as_ref().map(|_| i))
            .collect();
        let mut calls = ItemCalls::new(resolved, max_items_per_call(session).await);
        loop {
            let call = calls.next().to_vec();
            if call.is_empty() {
                break;
            }
            let items = call
                .iter()
                .filter_map(|&i| nodes[i].as_ref().map(|n| request(i, n)))
                .collect();
            match session
                .create_monitored_items(id, TimestampsToReturn::Both, items)
                .await
            {
                Ok(created) => {
                    let codes: Vec<StatusCode> =
                        created.iter().map(|c| c.result.status_code).collect();
                    calls.answered(&codes);
                }
                Err(e) if is_refusal(e.status()) => {
                    tracing::debug!(device = %cfg.name, items = call.len(), status = %e.status().sub_code().name(), "CreateMonitoredItems refused");
                    calls.refused(e.status());
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        let mut refused = calls.into_refused();
        let mut by_status: Vec<(StatusCode, Vec<&str>)> = Vec::new();
        for &(i, status) in &refused {
            let name = cfg.tags[i].name.as_str();
            match by_status.iter_mut().find(|(s, _)| *s == status) {
                Some((_, names)) => names.push(name),
                None => by_status.push((status, vec![name])),
            }
        }
        for (status, names) in by_status {
            const SHOWN: usize = 5;
            let more = names.len().saturating_sub(SHOWN);
            let mut shown = names[..names.len().min(SHOWN)].join(", ");
            if more > 0 {
                shown.push_str(&format!(" and {more} more"));
            }
            warn!(device = %cfg.name, status = %status.sub_code().name(), count = names.len(), tags = %shown, "the server refused monitored items; these tags stay bad");
        }
        refused.extend(
            nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| n.is_none())
                .map(|(i, _)| (i, StatusCode::BadNodeIdUnknown)),
        );
        refused.sort_unstable_by_key(|(i, _)| *i);
        Ok(refused)
    }

    /// Bad samples for the tags without a monitored item, with the status
    /// as the reason.
    fn refused_samples(&self, refused: &[(usize, StatusCode)]) -> Vec<Sample> {
        let ts = now_ms();
        refused
            .iter()
            .map(|&(i, status)| {
                Sample::bad(
                    &self.cfg.tags[i].name,
                    format!("{STATUS_PREFIX}{}", status.sub_code().name()),
                    ts,
                )
            })
            .collect()
    }

    async fn read_all(&self, session: &Session, nodes: &Nodes) -> Vec<Sample> {
        let ids: Vec<ReadValueId> = nodes
            .iter()
            .map(|n| n.clone().map(ReadValueId::from).unwrap_or_default())
            .collect();
        let ts = now_ms();
        match session.read(&ids, TimestampsToReturn::Both, 0.0).await {
            Ok(values) if values.len() == ids.len() => self
                .cfg
                .tags
                .iter()
                .zip(&values)
                .map(|(t, dv)| sample_of(&t.name, dv))
                .collect(),
            Ok(_) => self
                .cfg
                .tags
                .iter()
                .map(|t| Sample::bad(&t.name, reason::PROTOCOL_ERROR, ts))
                .collect(),
            Err(e) => self
                .cfg
                .tags
                .iter()
                .map(|t| {
                    Sample::bad(
                        &t.name,
                        format!("{STATUS_PREFIX}{}", e.status().sub_code().name()),
                        ts,
                    )
                })
                .collect(),
        }
    }

    async fn read_one(
        &self,
        session: &Session,
        nodes: &Nodes,
        tag: &OpcUaTag,
    ) -> Result<Sample, WriteFailure> {
        let id = node(nodes, tag, &self.cfg)
            .map_err(|e| WriteFailure::new(write_code::ENCODE_ERROR, e, false))?
            .clone();
        let values = session
            .read(&[ReadValueId::from(id)], TimestampsToReturn::Both, 0.0)
            .await
            .map_err(|e| {
                WriteFailure::new(
                    write_code::TRANSPORT_ERROR,
                    e.status().sub_code().name(),
                    false,
                )
            })?;
        let dv = values.first().ok_or_else(|| {
            WriteFailure::new(write_code::PROTOCOL_ERROR, "empty read result", false)
        })?;
        Ok(sample_of(&tag.name, dv))
    }

    async fn write(
        &self,
        session: &Session,
        nodes: &Nodes,
        permit: WritePermit,
        expect: Option<Value>,
    ) -> Result<(WriteReport, Sample), WriteFailure> {
        let tag = super::writable_tag(&self.cfg.name, &self.cfg.tags, &permit, |t| {
            (t.name.as_str(), t.writable)
        })?;
        let variant = variant_for(tag, permit.value())
            .map_err(|e| WriteFailure::new(write_code::ENCODE_ERROR, e, false))?;
        let id = node(nodes, tag, &self.cfg)
            .map_err(|e| WriteFailure::new(write_code::ENCODE_ERROR, e, false))?
            .clone();
        if let Some(expect) = expect {
            let now = self.read_one(session, nodes, tag).await?;
            if now.value.as_ref() != Some(&expect) {
                let shown = now
                    .value
                    .as_ref()
                    .map_or("no value".into(), |v| v.to_string());
                return Err(WriteFailure {
                    readback: now.value.clone(),
                    ..WriteFailure::new(
                        write_code::EXPECT_MISMATCH,
                        format!("tag `{}` holds {shown}, not the expected {expect}; nothing was written", tag.name),
                        false,
                    )
                });
            }
        }
        let results = session
            .write(&[WriteValue {
                node_id: id,
                attribute_id: AttributeId::Value as u32,
                index_range: NumericRange::None,
                value: DataValue::value_only(variant),
            }])
            .await
            .map_err(|e| {
                WriteFailure::new(
                    write_code::TRANSPORT_ERROR,
                    e.status().sub_code().name(),
                    true,
                )
            })?;
        let status = results
            .first()
            .copied()
            .unwrap_or(StatusCode::BadUnexpectedError);
        if !status.is_good() {
            return Err(WriteFailure::new(
                write_code::DEVICE_EXCEPTION,
                format!(
                    "the server refused the write: {STATUS_PREFIX}{}",
                    status.sub_code().name()
                ),
                false,
            ));
        }
        let back = self
            .read_one(session, nodes, tag)
            .await
            .map_err(|f| WriteFailure { written: true, ..f })?;
        let wanted = variant_for(tag, permit.value())
            .ok()
            .and_then(|v| value_of(&v));
        if back.quality != Quality::Good || back.value != wanted {
            let shown = back
                .value
                .as_ref()
                .map_or("no value".into(), |v| v.to_string());
            return Err(WriteFailure {
                readback: back.value.clone(),
                ..WriteFailure::new(
                    write_code::READBACK_MISMATCH,
                    format!(
                        "tag `{}` reads back {shown} after writing {}",
                        tag.name,
                        permit.value()
                    ),
                    true,
                )
            });
        }
        info!(device = %self.cfg.name, tag = %tag.name, command = permit.command_id(), rule = permit.rule(), "command written and confirmed");
        let readback = back.value.clone().unwrap_or(Value::Bool(false));
        Ok((
            WriteReport {
                readback,
                frames: 1,
            },
            back,
        ))
    }
}

/// The server's `MaxMonitoredItemsPerCall` operation limit, capped at
/// [`MONITORED_ITEMS_PER_CALL`] (also when it cannot be read, or is 0: no
/// limit).
async fn max_items_per_call(session: &Session) -> usize {
    let id = NodeId::new(
        0,
        VariableId::Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall as u32,
    );
    let limit = match session
        .read(&[ReadValueId::from(id)], TimestampsToReturn::Neither, 0.0)
        .await
    {
        Ok(values) => match values.first().and_then(|dv| dv.value.as_ref()) {
            Some(Variant::UInt32(n)) => usize::try_from(*n).unwrap_or(usize::MAX),
            _ => 0,
        },
        Err(_) => 0,
    };
    match limit {
        0 => MONITORED_ITEMS_PER_CALL,
        n => n.min(MONITORED_ITEMS_PER_CALL),
    }
}

/// Service results of CreateMonitoredItems that refuse the call, not the
/// session: the server's limits (items per call, items per subscription,
/// message sizes). Any other failure ends the session.
fn is_refusal(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BadTooManyOperations
            | StatusCode::BadTooManyMonitoredItems
            | StatusCode::BadRequestTooLarge
            | StatusCode::BadResponseTooLarge
            | StatusCode::BadEncodingLimitsExceeded
    )
}

/// A publish that failed for its size: its changes are lost.
fn is_lost_publish(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BadResponseTooLarge | StatusCode::BadEncodingLimitsExceeded
    )
}

/// The CreateMonitoredItems calls of one subscription, adapted to what the
/// server refuses; no I/O, so that it can be tested alone.
///
/// A call refused as a whole (see [`is_refusal`]) is asked again with half
/// the items, down to one; a single item still refused means the server
/// takes no more (a full subscription: `BadTooManyMonitoredItems`), and
/// every item left is refused with that status without asking. So a refusing
/// server costs at most about log2([`MONITORED_ITEMS_PER_CALL`]) extra calls.
#[derive(Debug)]
struct ItemCalls {
    /// The tags (indexes into the device's tags) to create items for.
    tags: Vec<usize>,
    /// How many of them are answered (created or refused).
    done: usize,
    per_call: usize,
    /// The tags without an item, with the server's status.
    refused: Vec<(usize, StatusCode)>,
}

impl ItemCalls {
    fn new(tags: Vec<usize>, per_call: usize) -> Self {
        ItemCalls {
            tags,
            done: 0,
            per_call: per_call.max(1),
            refused: Vec::new(),
        }
    }

    /// The tags of the next call; empty when every tag is answered.
    fn next(&self) -> &[usize] {
        let end = (self.done + self.per_call).min(self.tags.len());
        &self.tags[self.done..end]
    }

    /// The per-item results of the call [`Self::next`] returned, in its
    /// order; an item without a result counts as refused.
    fn answered(&mut self, results: &[StatusCode]) {
        let call = self.done..self.done + self.next().len();
        for (k, &tag) in self.tags[call.clone()].iter().enumerate() {
            let status = results
                .get(k)
                .copied()
                .unwrap_or(StatusCode::BadUnexpectedError);
            if status.is_bad() {
                self.refused.push((tag, status));
            }
        }
        self.done = call.end;
    }

    /// The server refused the whole call with `status`.
    fn refused(&mut self, status: StatusCode) {
        let n = self.next().len();
        if n > 1 {
            self.per_call = n / 2;
            return;
        }
        for &tag in &self.tags[self.done..] {
            self.refused.push((tag, status));
        }
        self.done = self.tags.len();
    }

    fn into_refused(self) -> Vec<(usize, StatusCode)> {
        self.refused
    }
}

type SessionEvents = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<SessionPollResult, StatusCode>> + Send>,
>;

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether the owner loop needs a session event: errors, connection
/// changes and a publish lost for its size (which ends the session); not
/// the per-message transport events nor the periodic keep-alive and
/// publish activity.
fn matters(ev: &Result<SessionPollResult, StatusCode>) -> bool {
    match ev {
        Err(_)
        | Ok(
            SessionPollResult::Reconnected(_)
            | SessionPollResult::ConnectionLost(_)
            | SessionPollResult::ReconnectFailed(_),
        ) => true,
        Ok(SessionPollResult::Subscription(SubscriptionActivity::PublishFailed(status))) => {
            is_lost_publish(*status)
        }
        Ok(_) => false,
    }
}

enum Served {
    Stop,
    /// Why, and the status code when the server or the library gave one.
    Failed(String, Option<StatusCode>),
    /// The server does not identify itself as `expect_identity` requires.
    Mismatch(String),
}

/// The audit code of a security refusal.
fn security_code(status: StatusCode) -> Option<&'static str> {
    Some(match status {
        StatusCode::BadCertificateUntrusted | StatusCode::BadSecurityChecksFailed => {
            "opcua_untrusted_certificate"
        }
        StatusCode::BadCertificateTimeInvalid => "opcua_certificate_time_invalid",
        StatusCode::BadCertificateInvalid => "opcua_invalid_certificate",
        StatusCode::BadUserAccessDenied
        | StatusCode::BadIdentityTokenRejected
        | StatusCode::BadIdentityTokenInvalid => "opcua_login_refused",
        StatusCode::BadSecurityPolicyRejected => "opcua_security_policy_rejected",
        _ => return None,
    })
}

/// What the chosen endpoint says about the server.
struct ServerFacts {
    application_uri: String,
    /// DER.
    certificate: Vec<u8>,
}

/// The server's identity: `ServerStatus.BuildInfo` (whatever of it can be
/// read), its application URI and its certificate's fingerprints.
async fn build_info(session: &Session, facts: &ServerFacts) -> DeviceIdentity {
    use twin_model::inventory::field;
    let mut identity = DeviceIdentity::default();
    let mut put = |name: &str, value: String| {
        if !value.is_empty() {
            identity.fields.insert(name.to_owned(), value);
        }
    };
    put(
        field::APPLICATION_URI,
        super::printable(facts.application_uri.as_bytes()),
    );
    if !facts.certificate.is_empty() {
        let sha1 = aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
            &facts.certificate,
        );
        put(
            field::CERTIFICATE_SHA1,
            crate::inventory::hex(sha1.as_ref()),
        );
        put(
            field::CERTIFICATE_SHA256,
            crate::inventory::hex(&twin_model::jws::sha256(&facts.certificate)),
        );
    }
    // Server_ServerStatus_BuildInfo_* (namespace 0).
    let nodes = [
        (2261u32, field::PRODUCT_NAME),
        (2262, field::PRODUCT_URI),
        (2263, field::MANUFACTURER_NAME),
        (2264, field::SOFTWARE_VERSION),
        (2265, field::BUILD_NUMBER),
        (2266, field::BUILD_DATE),
    ];
    let ids: Vec<ReadValueId> = nodes
        .iter()
        .map(|(i, _)| ReadValueId::from(NodeId::new(0, *i)))
        .collect();
    match session.read(&ids, TimestampsToReturn::Neither, 0.0).await {
        Ok(values) => {
            for ((_, name), dv) in nodes.iter().zip(values) {
                let text = match dv.value {
                    Some(Variant::String(s)) => super::printable(s.as_ref().as_bytes()),
                    Some(Variant::DateTime(d)) => d.to_rfc3339(),
                    _ => continue,
                };
                put(name, text);
            }
        }
        Err(status) => {
            tracing::debug!(status = %status, "BuildInfo not readable");
        }
    }
    identity
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(t: OpcUaType) -> OpcUaTag {
        OpcUaTag {
            name: "t".into(),
            node_id: "ns=2;s=T".into(),
            data_type: t,
            unit: None,
            writable: true,
        }
    }

    #[test]
    fn values_convert_to_the_nodes_type_exactly_or_not_at_all() {
        assert_eq!(
            variant_for(&tag(OpcUaType::UInt16), &Value::Int(7)),
            Ok(Variant::UInt16(7))
        );
        assert!(variant_for(&tag(OpcUaType::UInt16), &Value::Int(-1)).is_err());
        assert!(variant_for(&tag(OpcUaType::Byte), &Value::UInt(256)).is_err());
        assert!(variant_for(&tag(OpcUaType::Int32), &Value::Float(1.5)).is_err());
        assert_eq!(
            variant_for(&tag(OpcUaType::Int32), &Value::Float(2.0)),
            Ok(Variant::Int32(2))
        );
        assert_eq!(
            variant_for(&tag(OpcUaType::Double), &Value::Int(2)),
            Ok(Variant::Double(2.0))
        );
        assert_eq!(
            variant_for(&tag(OpcUaType::Bool), &Value::Bool(true)),
            Ok(Variant::Boolean(true))
        );
        assert!(variant_for(&tag(OpcUaType::String), &Value::Int(1)).is_err());
        for v in [
            Variant::Boolean(true),
            Variant::SByte(-5),
            Variant::Byte(200),
            Variant::Int16(-1234),
            Variant::UInt16(54321),
            Variant::Int32(-123456),
            Variant::UInt32(3_000_000_000),
            Variant::Int64(-9_000_000_000),
            Variant::UInt64(18_000_000_000_000_000_000),
            Variant::Double(3.25),
        ] {
            assert!(value_of(&v).is_some(), "{v:?}");
        }
        assert_eq!(value_of(&Variant::Float(2.38)), Some(Value::Float(2.38)));
        assert_eq!(value_of(&Variant::Double(f64::NAN)), None);
    }

    #[test]
    fn monitored_items_are_created_in_calls_of_at_most_the_limit() {
        let mut calls = ItemCalls::new((0..1200).collect(), 500);
        let mut sizes = Vec::new();
        while !calls.next().is_empty() {
            sizes.push(calls.next().len());
            let ok = vec![StatusCode::Good; calls.next().len()];
            calls.answered(&ok);
        }
        assert_eq!(sizes, [500, 500, 200]);
        assert!(calls.into_refused().is_empty());
    }

    #[test]
    fn items_the_server_refuses_one_by_one_are_reported_with_their_status() {
        let mut calls = ItemCalls::new(vec![3, 5, 8], 500);
        calls.answered(&[
            StatusCode::Good,
            StatusCode::BadNodeIdUnknown,
            StatusCode::BadUserAccessDenied,
        ]);
        assert!(calls.next().is_empty());
        assert_eq!(
            calls.into_refused(),
            [
                (5, StatusCode::BadNodeIdUnknown),
                (8, StatusCode::BadUserAccessDenied)
            ]
        );
        // A result missing from the answer is a refusal too.
        let mut calls = ItemCalls::new(vec![1, 2], 500);
        calls.answered(&[StatusCode::Good]);
        assert_eq!(calls.into_refused(), [(2, StatusCode::BadUnexpectedError)]);
    }

    #[test]
    fn a_full_subscription_halves_the_calls_then_refuses_the_rest_without_asking() {
        // The server takes 1100 items in all (like max_monitored_items_per_sub),
        // and refuses a call that would pass that as a whole.
        let room = 1100;
        let mut calls = ItemCalls::new((0..3000).collect(), 500);
        let (mut created, mut asked) = (0, 0);
        while !calls.next().is_empty() {
            asked += 1;
            let n = calls.next().len();
            if created + n > room {
                calls.refused(StatusCode::BadTooManyMonitoredItems);
            } else {
                created += n;
                calls.answered(&vec![StatusCode::Good; n]);
            }
        }
        assert_eq!(created, room);
        let refused = calls.into_refused();
        assert_eq!(refused.len(), 3000 - room);
        assert!(refused
            .iter()
            .all(|(_, s)| *s == StatusCode::BadTooManyMonitoredItems));
        assert_eq!(refused[0].0, room);
        // 2 x 500, then 50 (after 250, 125 and 62 were refused), then 31,
        // 15, 7, 3, 1 refused each: a few calls, not one per item.
        assert!(asked < 20, "{asked} calls");
    }

    #[test]
    fn only_connection_changes_and_lost_publishes_reach_the_owner_loop() {
        use opcua::client::transport::TransportPollResult;
        use opcua::client::SessionActivity;
        assert!(matters(&Err(StatusCode::BadConnectionClosed)));
        assert!(matters(&Ok(SessionPollResult::ConnectionLost(
            StatusCode::BadConnectionClosed
        ))));
        assert!(matters(&Ok(SessionPollResult::Subscription(
            SubscriptionActivity::PublishFailed(StatusCode::BadResponseTooLarge)
        ))));
        assert!(!matters(&Ok(SessionPollResult::Subscription(
            SubscriptionActivity::PublishFailed(StatusCode::BadTimeout)
        ))));
        assert!(!matters(&Ok(SessionPollResult::Subscription(
            SubscriptionActivity::Publish
        ))));
        assert!(!matters(&Ok(SessionPollResult::Transport(
            TransportPollResult::IncomingMessage
        ))));
        assert!(!matters(&Ok(SessionPollResult::SessionActivity(
            SessionActivity::KeepAliveSucceeded
        ))));
    }

    #[test]
    fn status_codes_become_quality_with_their_name() {
        let mut dv = DataValue::value_only(Variant::Double(1.0));
        dv.status = Some(StatusCode::BadNodeIdUnknown);
        let s = sample_of("t", &dv);
        assert_eq!(
            (s.quality, s.reason.as_deref()),
            (Quality::Bad, Some("opcua:BadNodeIdUnknown"))
        );
        dv.status = Some(StatusCode::UncertainLastUsableValue);
        let s = sample_of("t", &dv);
        assert_eq!(s.quality, Quality::Uncertain);
        assert_eq!(s.value, Some(Value::Float(1.0)));
        dv.status = None;
        assert_eq!(sample_of("t", &dv).quality, Quality::Good);
        // Both timestamps are kept: the source time is the sample's time.
        dv.source_timestamp = Some(opcua::types::DateTime::from(
            1_700_000_000_000i64 * 10_000 + 116_444_736_000_000_000,
        ));
        dv.server_timestamp = Some(opcua::types::DateTime::from(
            1_700_000_000_500i64 * 10_000 + 116_444_736_000_000_000,
        ));
        let s = sample_of("t", &dv);
        assert_eq!(
            (s.ts_ms, s.server_ts_ms),
            (1_700_000_000_000, Some(1_700_000_000_500))
        );
    }
}
