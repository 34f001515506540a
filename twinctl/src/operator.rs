//! Operator commands: signing keys, command and approval tokens, sending a
//! command and waiting for its signed result, following the result topic
//! and the audit topic.
//!
//! Everything here is usable from tests and benchmarks; the `twinctl`
//! binary only parses arguments and prints.
//!
//! - [`generate_key`]: a new operator key pair (private key mode 0600).
//! - [`mint_command_token`], [`approve_token`]: tokens as
//!   `gateway::command_auth` verifies them.
//! - [`send_command`] (or [`send_message`] for arbitrary bytes): publish on
//!   the command topic, wait for the verified result that names the exact
//!   bytes sent.
//! - [`follow_results`], [`follow_audit`] with [`AuditFollower`]: the live
//!   result and audit topics, verified as they arrive.

use crate::client::{connect, ClientOptions};
use anyhow::{anyhow, bail, Context as _};
use gateway::command_auth::{mint_approval, mint_command, Algorithm, OperatorKey};
use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, Packet, QoS, SubscribeReasonCode};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use twin_model::audit::{self as audit, Event, Record, GENESIS};
use twin_model::command::{
    command_binding, ApprovalClaims, Approves, CommandBody, CommandClaims, Envelope, COMMAND_TYP,
};
use twin_model::jws::{b64url, b64url_decode, sha256};
use twin_model::result::{CommandResult, Status, RESULT_TYP};
use twin_model::topics::{valid_level, Topics};
use twin_model::{TrustStore, Value};

/// Largest result message accepted, in bytes (checked before decoding).
pub const MAX_RESULT_BYTES: usize = 1024 * 1024;

/// Exit code of `twinctl command send` when no result arrived in time.
pub const EXIT_NO_RESULT: u8 = 2;

// ---------------------------------------------------------------- keys

/// A key pair written by [`generate_key`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedKey {
    /// RFC 7638 thumbprint of the public key: the `kid` of every token.
    pub kid: String,
    pub alg: Algorithm,
    /// The PKCS#8 PEM private key (mode 0600).
    pub private_path: PathBuf,
    /// The PEM public key, for the gateway's `operator_keys_dir`.
    pub public_path: PathBuf,
}

/// Where [`generate_key`] writes the public key of `private`: the same
/// name with `.pub.pem` appended.
pub fn public_key_path(private: &Path) -> PathBuf {
    let mut name = private.as_os_str().to_owned();
    name.push(".pub.pem");
    PathBuf::from(name)
}

/// Creates `path` (never overwriting) with `mode`, writes and syncs it.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("{}: cannot create", path.display()))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("{}: cannot write", path.display()))
}

/// Generates an operator key: the private key (PKCS#8 PEM) to `out` with
/// mode 0600, the public key (PEM) to [`public_key_path`]`(out)`. Refuses
/// to overwrite either file.
pub fn generate_key(alg: Algorithm, out: &Path) -> anyhow::Result<GeneratedKey> {
    let public_path = public_key_path(out);
    for p in [out, public_path.as_path()] {
        if p.symlink_metadata().is_ok() {
            bail!("{} already exists; refusing to overwrite it", p.display());
        }
    }
    let pem = OperatorKey::generate_pem(alg)?;
    let key = OperatorKey::from_pkcs8_pem(&pem)?;
    write_new(out, pem.as_bytes(), 0o600)?;
    if let Err(e) = write_new(&public_path, key.public_key_pem().as_bytes(), 0o644) {
        // Do not leave a private key whose public half was never written.
        let _ = std::fs::remove_file(out);
        return Err(e);
    }
    Ok(GeneratedKey {
        kid: key.kid().to_owned(),
        alg: key.algorithm(),
        private_path: out.to_owned(),
        public_path,
    })
}

/// Reads an operator private key (PKCS#8 PEM, Ed25519 or P-256), refusing
/// a file readable by group or others.
pub fn read_operator_key(path: &Path) -> anyhow::Result<OperatorKey> {
    let pem = gateway::keyfile::read_private(path)?;
    OperatorKey::from_pkcs8_pem(&pem).with_context(|| format!("{}", path.display()))
}

// --------------------------------------------------------------- values

/// Reads a command value from the command line: a JSON scalar (`42`,
/// `-7`, `42.5`, `1e3`, `true`, `"quoted text"`); anything that is not
/// valid JSON is taken as text (`PUMP-A`). Arrays, objects, `null`, an
/// empty value and numbers JSON cannot hold (`1e400`, `1.2.3`) are refused.
pub fn parse_value(s: &str) -> Result<Value, String> {
    if s.trim().is_empty() {
        return Err("empty value (write '\"\"' for empty text)".into());
    }
    match serde_json::from_str::<serde_json::Value>(s) {
        Ok(serde_json::Value::Bool(b)) => Ok(Value::Bool(b)),
        Ok(serde_json::Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(Value::Int(i))
            } else if let Some(u) = n.as_u64() {
                Ok(Value::UInt(u))
            } else {
                n.as_f64()
                    .filter(|f| f.is_finite())
                    .map(Value::Float)
                    .ok_or_else(|| format!("{s} is not a finite number"))
            }
        }
        Ok(serde_json::Value::String(t)) => Ok(Value::Text(t)),
        Ok(serde_json::Value::Null) => {
            Err("null is not a value: give a number, true/false or text".into())
        }
        Ok(serde_json::Value::Array(_) | serde_json::Value::Object(_)) => Err(format!(
            "{s} is not a scalar: a value is a number, true/false or text"
        )),
        Err(_) if looks_numeric(s) => Err(format!(
            "{s:?} is not a number JSON can hold (quote it, '\"{s}\"', to send it as text)"
        )),
        Err(_) => Ok(Value::Text(s.to_owned())),
    }
}

/// Made of the characters of a JSON number and starting like one.
fn looks_numeric(s: &str) -> bool {
    let t = s.trim();
    t.trim_start_matches('-')
        .starts_with(|c: char| c.is_ascii_digit() || c == '.')
        && t.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E'))
}

// --------------------------------------------------------------- tokens

/// Who signs a token: the claims every command and approval carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `iss`: the issuer the gateway is configured to trust.
    pub issuer: String,
    /// `sub`: the operator.
    pub operator: String,
    /// `aud`: the gateway id.
    pub gateway: String,
    pub roles: Vec<String>,
    /// Authentication methods (RFC 8176), e.g. `pwd`, `otp`.
    pub amr: Vec<String>,
}

/// A new token id: 16 random bytes, base64url.
pub fn new_token_id() -> anyhow::Result<String> {
    use aws_lc_rs::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow!("the system random number generator failed"))?;
    Ok(b64url(&bytes))
}

/// A signed command token and what it says.
#[derive(Debug, Clone, PartialEq)]
pub struct MintedCommand {
    pub token: String,
    pub claims: CommandClaims,
}

impl MintedCommand {
    /// The command id (`jti`).
    pub fn jti(&self) -> &str {
        &self.claims.jti
    }
}

/// Signs a command: set `tag` to `value` (optionally only if it now holds
/// `expect`), valid from `now_s` for `ttl_s` seconds, with a fresh `jti`.
pub fn mint_command_token(
    key: &OperatorKey,
    who: &Identity,
    tag: &str,
    value: Value,
    expect: Option<Value>,
    ttl_s: u64,
    now_s: u64,
) -> anyhow::Result<MintedCommand> {
    let exp = lifetime(now_s, ttl_s)?;
    let claims = CommandClaims {
        iss: who.issuer.clone(),
        sub: who.operator.clone(),
        aud: who.gateway.clone(),
        iat: now_s,
        nbf: now_s,
        exp,
        jti: new_token_id()?,
        roles: who.roles.clone(),
        amr: who.amr.clone(),
        cmd: CommandBody {
            tag: tag.to_owned(),
            value,
            expect,
        },
    };
    claims.check_bounds()?;
    Ok(MintedCommand {
        token: mint_command(key, &claims),
        claims,
    })
}

fn lifetime(now_s: u64, ttl_s: u64) -> anyhow::Result<u64> {
    if ttl_s == 0 {
        bail!("the lifetime must be at least 1 second");
    }
    now_s
        .checked_add(ttl_s)
        .ok_or_else(|| anyhow!("the lifetime is out of range"))
}

/// The claims of a command token, read WITHOUT verifying its signature
/// (the gateway verifies; an approver reads what they approve). Refuses a
/// token that is not a command token (`typ`) or whose claims are invalid.
pub fn read_command_unverified(token: &str) -> anyhow::Result<CommandClaims> {
    let mut parts = token.trim().split('.');
    let (Some(h64), Some(p64), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        bail!("not a token: expected three dot-separated parts");
    };
    let header = b64url_decode(h64).context("the token header is not base64url")?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).context("the token header is not JSON")?;
    let typ = header.get("typ").and_then(|t| t.as_str()).unwrap_or("");
    if typ != COMMAND_TYP {
        bail!("not a command token: typ is {typ:?}, not {COMMAND_TYP:?}");
    }
    let payload = b64url_decode(p64).context("the token payload is not base64url")?;
    Ok(CommandClaims::from_json(&payload)?)
}

/// A signed approval and the command it approves.
#[derive(Debug, Clone, PartialEq)]
pub struct MintedApproval {
    pub token: String,
    pub claims: ApprovalClaims,
    /// The approved command's claims (read, not verified).
    pub command: CommandClaims,
}

impl MintedApproval {
    /// The approver is the operator who requested the command: the gateway
    /// verifies such an approval, and the policy refuses it
    /// (`duplicate_approver`).
    pub fn by_requester(&self) -> bool {
        self.claims.sub == self.command.sub
    }
}

/// Signs an approval of `command_token`, bound to it by `jti` and
/// [`command_binding`]. The command must be for the approver's gateway.
pub fn approve_token(
    key: &OperatorKey,
    who: &Identity,
    command_token: &str,
    ttl_s: u64,
    now_s: u64,
) -> anyhow::Result<MintedApproval> {
    let command_token = command_token.trim();
    let command = read_command_unverified(command_token)?;
    if command.aud != who.gateway {
        bail!(
            "the command is for gateway {:?}, the approval would be for {:?}",
            command.aud,
            who.gateway
        );
    }
    let sha256 = command_binding(command_token).context("not a token")?;
    let exp = lifetime(now_s, ttl_s)?;
    let claims = ApprovalClaims {
        iss: who.issuer.clone(),
        sub: who.operator.clone(),
        aud: who.gateway.clone(),
        iat: now_s,
        nbf: now_s,
        exp,
        jti: new_token_id()?,
        roles: who.roles.clone(),
        amr: who.amr.clone(),
        approves: Approves {
            jti: command.jti.clone(),
            sha256,
        },
    };
    claims.check_bounds()?;
    Ok(MintedApproval {
        token: mint_approval(key, &claims),
        claims,
        command,
    })
}

/// A command in words: who asks which gateway to set what, and until when.
pub fn describe_command(c: &CommandClaims, now_s: u64) -> String {
    let mut s = format!(
        "command {} by {} (roles {}; amr {}) for gateway {}: set {} to {}",
        c.jti,
        c.sub,
        list(&c.roles),
        list(&c.amr),
        c.aud,
        c.cmd.tag,
        c.cmd.value
    );
    if let Some(e) = &c.cmd.expect {
        s.push_str(&format!(" (expecting it to hold {e} now)"));
    }
    if c.exp > now_s {
        s.push_str(&format!(", valid for {} s more", c.exp - now_s));
    } else {
        s.push_str(&format!(", EXPIRED {} s ago", now_s - c.exp));
    }
    s
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(",")
    }
}

// --------------------------------------------------------------- results

/// Verifies a message of the result topic of `gateway` (signature by a
/// trusted gateway key, `typ` [`RESULT_TYP`], the document, the gateway it
/// names); on failure, the reason code and message.
pub fn verify_result(
    trust: &TrustStore,
    gateway: &str,
    payload: &[u8],
) -> Result<CommandResult, (String, String)> {
    let r: CommandResult = crate::watch::verify_json(trust, payload, RESULT_TYP, MAX_RESULT_BYTES)?;
    if r.gateway_id != gateway {
        return Err((
            "wrong_topic".into(),
            format!(
                "result of gateway {:?} on the topic of {gateway:?}",
                r.gateway_id
            ),
        ));
    }
    Ok(r)
}

/// The exit code of `twinctl command send` for a result.
pub fn exit_code(status: Status) -> u8 {
    match status {
        Status::Applied => 0,
        Status::Denied => 3,
        Status::Failed => 4,
        Status::Refused => 5,
    }
}

/// A result in one line.
pub fn result_line(r: &CommandResult) -> String {
    let mut s = format!("{} {:<7}", utc_time(r.ts_ms), r.status.as_str());
    if let Some(c) = &r.code {
        s.push_str(&format!(" [{c}]"));
    }
    s.push_str(&format!(" cmd={}", r.command_id.as_deref().unwrap_or("-")));
    if let Some(o) = &r.operator {
        s.push_str(&format!(" operator={o}"));
    }
    if let Some(t) = &r.tag {
        let v = r.value.as_ref().map_or("?".into(), |v| v.to_string());
        s.push_str(&format!(" {t}={v}"));
    }
    if let Some(rb) = &r.readback {
        s.push_str(&format!(" readback={rb}"));
    }
    if let Some(rule) = &r.rule_id {
        s.push_str(&format!(" rule={rule}"));
    }
    if let Some(n) = r.audit_n {
        s.push_str(&format!(" audit_n={n}"));
    }
    s.push_str(&format!(": {}", r.reason));
    s
}

/// A result for people, several lines.
pub fn result_text(r: &CommandResult) -> String {
    let opt = |o: Option<&str>| o.unwrap_or("-").to_owned();
    let val = |v: &Option<Value>| v.as_ref().map_or("-".into(), |v| v.to_string());
    let mut s = r.status.as_str().to_uppercase();
    if let Some(c) = &r.code {
        s.push_str(&format!(" ({c})"));
    }
    s.push_str(&format!(": {}\n", r.reason));
    for (k, v) in [
        ("command", opt(r.command_id.as_deref())),
        ("operator", opt(r.operator.as_deref())),
        ("tag", opt(r.tag.as_deref())),
        ("value", val(&r.value)),
        ("read back", val(&r.readback)),
        ("rule", opt(r.rule_id.as_deref())),
        ("audit n", r.audit_n.map_or("-".into(), |n| n.to_string())),
        ("gateway", r.gateway_id.clone()),
        ("decided", format!("{} ({} ms)", utc_time(r.ts_ms), r.ts_ms)),
        ("message", r.message_sha256.clone()),
    ] {
        s.push_str(&format!("  {k:<10} {v}\n"));
    }
    s
}

/// `HH:MM:SS.mmmZ` (UTC) of a time in ms since the Unix epoch.
pub fn utc_time(ms: u64) -> String {
    let day_ms = ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

// --------------------------------------------------------------- MQTT

/// The verified result of a command message, and how long it took.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandReply {
    pub result: CommandResult,
    /// From handing the message to the client to the verified result.
    pub round_trip: Duration,
    /// base64url SHA-256 of the exact bytes sent (the result's `message_sha256`).
    pub message_sha256: String,
}

/// No result for the message arrived in time (the error
/// [`send_message`] returns; find it with `err.downcast_ref::<NoResult>()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoResult {
    pub message_sha256: String,
    pub waited: Duration,
}

impl std::fmt::Display for NoResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no verified result for message {} within {:.1} s (the gateway may be offline or \
             busy, the broker may not have delivered the command (ACL), or the result was \
             signed by a key not trusted here: see the warnings above)",
            self.message_sha256,
            self.waited.as_secs_f64()
        )
    }
}

impl std::error::Error for NoResult {}

fn check_gateway_id(gateway: &str) -> anyhow::Result<()> {
    if !valid_level(gateway) {
        bail!("{gateway:?} is not a gateway id (1 to 64 of A-Z a-z 0-9 _ - .)");
    }
    Ok(())
}

fn refused(s: &rumqttc::SubAck) -> bool {
    s.return_codes
        .iter()
        .any(|c| matches!(c, SubscribeReasonCode::Failure))
}

/// Sends `envelope` (the command and its approvals) to `gateway` and waits
/// up to `wait` for its verified result. See [`send_message`].
pub async fn send_command(
    opts: &ClientOptions,
    prefix: &str,
    gateway: &str,
    envelope: &Envelope,
    trust: &TrustStore,
    wait: Duration,
) -> anyhow::Result<CommandReply> {
    send_message(opts, prefix, gateway, &envelope.to_message(), trust, wait).await
}

/// Subscribes to the result topic of `gateway` (waiting for the broker's
/// SubAck, within `wait`), publishes `message` on its command topic (QoS 1,
/// not retained), then waits up to `wait` for the result whose
/// `message_sha256` names these exact bytes and whose signature verifies
/// with `trust`. Results for other messages, and ones that do not verify,
/// are skipped (logged). Errors: [`NoResult`] when none came in time; any
/// other error when the broker could not be reached or the connection was
/// lost after sending (the outcome is then unknown).
pub async fn send_message(
    opts: &ClientOptions,
    prefix: &str,
    gateway: &str,
    message: &[u8],
    trust: &TrustStore,
    wait: Duration,
) -> anyhow::Result<CommandReply> {
    check_gateway_id(gateway)?;
    let topics = Topics::new(prefix, gateway);
    let result_topic = topics.result();
    let digest = b64url(&sha256(message));
    let (client, mut events) = connect(opts)?;

    // Subscribe first, so the result cannot come before we listen.
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let ev = tokio::time::timeout_at(deadline, events.poll())
            .await
            .map_err(|_| {
                anyhow!(
                    "not connected and subscribed to {result_topic} within {:.1} s; nothing was sent",
                    wait.as_secs_f64()
                )
            })?;
        match ev {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                client
                    .subscribe(result_topic.as_str(), QoS::AtLeastOnce)
                    .await?;
            }
            Ok(MqttEvent::Incoming(Packet::SubAck(s))) => {
                if refused(&s) {
                    bail!("the broker refused the subscription to {result_topic} (check its ACL); nothing was sent");
                }
                break;
            }
            Ok(_) => {}
            Err(e) => bail!(
                "connection to the broker failed: {}; nothing was sent",
                gateway::tls::explain(&e)
            ),
        }
    }

    let sent = Instant::now();
    client
        .publish(topics.command(), QoS::AtLeastOnce, false, message.to_vec())
        .await?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let Ok(ev) = tokio::time::timeout_at(deadline, events.poll()).await else {
            hang_up(&client, &mut events).await;
            return Err(NoResult {
                message_sha256: digest,
                waited: wait,
            }
            .into());
        };
        match ev {
            Ok(MqttEvent::Incoming(Packet::Publish(p))) if p.topic == result_topic => {
                match verify_result(trust, gateway, &p.payload) {
                    Ok(result) if result.message_sha256 == digest => {
                        let round_trip = sent.elapsed();
                        hang_up(&client, &mut events).await;
                        return Ok(CommandReply {
                            result,
                            round_trip,
                            message_sha256: digest,
                        });
                    }
                    Ok(other) => {
                        tracing::debug!(message = %other.message_sha256, "result of another message")
                    }
                    Err((code, why)) => {
                        tracing::warn!(%code, %why, "a message on the result topic did not verify; ignored")
                    }
                }
            }
            Ok(_) => {}
            // No reconnect: a new clean session would have lost the
            // subscription, and the result may have been sent meanwhile.
            Err(e) => bail!(
                "the connection to the broker was lost after the command was handed over ({}); \
                 its outcome is unknown: see `twinctl command results` or `twinctl audit follow` \
                 (message {digest})",
                gateway::tls::explain(&e)
            ),
        }
    }
}

/// Disconnects cleanly (the DISCONNECT leaves only when the loop is polled).
async fn hang_up(client: &AsyncClient, events: &mut EventLoop) {
    if client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            match events.poll().await {
                Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// What happens on a followed topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// Connected and subscribed (again, after a reconnect). Messages
    /// published while disconnected are not delivered (clean session).
    Subscribed,
    Message {
        topic: String,
        payload: Vec<u8>,
    },
    /// The connection failed; it is retried every second.
    Lost(String),
}

/// Follows `topic` (QoS 1) until Ctrl-C or until `duration` has passed,
/// reconnecting after failures; calls `on` for everything that happens.
/// A subscription the broker refuses is an error.
pub async fn follow_topic(
    opts: &ClientOptions,
    topic: &str,
    duration: Option<Duration>,
    mut on: impl FnMut(Link),
) -> anyhow::Result<()> {
    let (client, mut events) = connect(opts)?;
    let stop = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::signal::ctrl_c() => break,
            ev = events.poll() => match ev {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    client.subscribe(topic, QoS::AtLeastOnce).await?;
                }
                Ok(MqttEvent::Incoming(Packet::SubAck(s))) => {
                    if refused(&s) {
                        bail!("the broker refused the subscription to {topic} (check its ACL)");
                    }
                    on(Link::Subscribed);
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => on(Link::Message {
                    topic: p.topic,
                    payload: p.payload.to_vec(),
                }),
                Ok(_) => {}
                Err(e) => {
                    on(Link::Lost(gateway::tls::explain(&e)));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
    hang_up(&client, &mut events).await;
    Ok(())
}

/// One thing seen on the result topic.
#[derive(Debug, Clone, PartialEq)]
pub enum ResultEvent {
    Verified(Box<CommandResult>),
    /// A message that failed verification.
    Rejected {
        code: String,
        message: String,
    },
    Subscribed,
    Lost(String),
}

/// Follows the result topic of `gateway`, verifying every message.
pub async fn follow_results(
    opts: &ClientOptions,
    prefix: &str,
    gateway: &str,
    trust: &TrustStore,
    duration: Option<Duration>,
    mut on: impl FnMut(ResultEvent),
) -> anyhow::Result<()> {
    check_gateway_id(gateway)?;
    let topic = Topics::new(prefix, gateway).result();
    follow_topic(opts, &topic, duration, |link| match link {
        Link::Subscribed => on(ResultEvent::Subscribed),
        Link::Lost(why) => on(ResultEvent::Lost(why)),
        Link::Message { payload, .. } => on(match verify_result(trust, gateway, &payload) {
            Ok(r) => ResultEvent::Verified(Box::new(r)),
            Err((code, message)) => ResultEvent::Rejected { code, message },
        }),
    })
    .await
}

// --------------------------------------------------------------- audit

/// How a record received on the audit topic relates to the one before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chain {
    /// The first record received. Unless it is record 1 of a log, its
    /// `prev` names a line this follower never saw and is not checked.
    Start,
    /// `n` is one more than the previous record's and `prev` is the hash of
    /// the previous line.
    Linked,
    /// After a reconnect: `missed` records were published while this
    /// follower was disconnected; the chain is followed again from here.
    Resumed { missed: u64 },
    /// A `started` record that continues the log (`previous` closed or
    /// not_closed: the gateway verified its file and resumed its chain),
    /// `missed` records after the last one received: those written while
    /// the gateway had no broker connection (at shutdown: `stopped` and
    /// the final checkpoint) were never published. Their `prev` link
    /// cannot be checked here; `gateway audit verify` checks the file.
    Restarted { missed: u64 },
    /// Record 1 of a new log after records of an earlier one: the gateway
    /// did not continue its log (it did not verify and was set aside, or it
    /// was missing). An alarm.
    NewLog,
    /// The same line again (an MQTT QoS 1 redelivery); ignored.
    Duplicate,
    /// The chain is broken: a record missing, inserted, reordered or edited.
    /// The follower carries on from this record.
    Broken { reason: String },
    /// The line is not a record; the follower starts afresh at the next one.
    BadLine { reason: String },
}

impl Chain {
    /// Whether a person should be alerted.
    pub fn is_alarm(&self) -> bool {
        matches!(
            self,
            Chain::NewLog | Chain::Broken { .. } | Chain::BadLine { .. }
        )
    }
}

/// What a checkpoint record proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointCheck {
    /// Signed by a trusted gateway key for this record and the line before
    /// it: the `covered` records received since the last break (or the last
    /// checkpoint) are signed with it.
    Verified {
        covered: u64,
    },
    Bad {
        reason: String,
    },
}

/// One line of the audit topic, judged.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditLine {
    /// The record, when the line is one.
    pub record: Option<Record>,
    pub chain: Chain,
    /// For a checkpoint record (not for a duplicate).
    pub checkpoint: Option<CheckpointCheck>,
}

impl AuditLine {
    pub fn is_alarm(&self) -> bool {
        self.chain.is_alarm() || matches!(self.checkpoint, Some(CheckpointCheck::Bad { .. }))
    }
}

/// Counts of an audit follow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditStats {
    pub lines: u64,
    pub records: u64,
    pub duplicates: u64,
    pub checkpoints: u64,
    pub bad_checkpoints: u64,
    pub bad_lines: u64,
    pub breaks: u64,
    pub new_logs: u64,
    /// Records known missed: published while this follower was
    /// disconnected, or not published by a restarting gateway.
    pub missed: u64,
    /// Gateway restarts that continued the log.
    pub restarts: u64,
    /// Records received that no verified checkpoint covers (yet).
    pub unsigned: u64,
}

impl AuditStats {
    /// No break, no bad line, no bad checkpoint, no new log.
    pub fn clean(&self) -> bool {
        self.breaks == 0 && self.bad_lines == 0 && self.bad_checkpoints == 0 && self.new_logs == 0
    }
}

/// Checks the audit topic's lines as they arrive: each record's index and
/// `prev` against the line before it, and every checkpoint's signature.
///
/// [`twin_model::audit::Verifier`] checks a whole log from its first line:
/// it starts at `n = 1` and the genesis hash and offers no way to start at
/// a record seen in mid-log, which is where a live follower starts (and
/// restarts after a reconnect, the messages sent meanwhile being lost).
/// So the follower does the same line-by-line checks itself, with the
/// same building blocks ([`audit::parse_line`], [`audit::verify_checkpoint`]):
/// each record's `n` is one more than the previous record's and its `prev`
/// is the SHA-256 of the previous line received; a checkpoint must verify
/// with a trusted key, name its own index, sign its own `prev` and name
/// the followed gateway. The chain starts at the first line received.
/// For a complete verification of the log file, use `gateway audit verify`.
pub struct AuditFollower<'t> {
    trust: &'t TrustStore,
    gateway: String,
    /// Index and hash of the last record received.
    last: Option<(u64, [u8; 32])>,
    interrupted: bool,
    /// Records of the current unbroken stretch since its last checkpoint.
    pending: u64,
    pub stats: AuditStats,
}

impl<'t> AuditFollower<'t> {
    /// Follows the audit log of `gateway`, checkpoints verified with `trust`.
    pub fn new(trust: &'t TrustStore, gateway: &str) -> Self {
        AuditFollower {
            trust,
            gateway: gateway.to_owned(),
            last: None,
            interrupted: false,
            pending: 0,
            stats: AuditStats::default(),
        }
    }

    /// The connection was lost and made again: lines published meanwhile
    /// were not delivered. The next record may skip indexes (reported as
    /// [`Chain::Resumed`], not as a break).
    pub fn interrupted(&mut self) {
        if self.last.is_some() {
            self.interrupted = true;
        }
    }

    /// Starts a new unbroken stretch: what was not covered stays unsigned.
    fn restart(&mut self) {
        self.stats.unsigned += self.pending;
        self.pending = 0;
    }

    /// Judges one line (one audit message, without a trailing newline).
    pub fn push(&mut self, line: &[u8]) -> AuditLine {
        self.stats.lines += 1;
        let hash = sha256(line);
        if self.last.is_some_and(|(_, h)| h == hash) {
            self.stats.duplicates += 1;
            return AuditLine {
                record: audit::parse_line(line).ok(),
                chain: Chain::Duplicate,
                checkpoint: None,
            };
        }
        let rec = match audit::parse_line(line) {
            Ok(r) => r,
            Err(e) => {
                self.stats.bad_lines += 1;
                self.restart();
                self.last = None;
                self.interrupted = false;
                return AuditLine {
                    record: None,
                    chain: Chain::BadLine {
                        reason: format!("bad_json: {e}"),
                    },
                    checkpoint: None,
                };
            }
        };
        self.stats.records += 1;
        let chain = match self.last {
            None => Chain::Start,
            Some(_) if rec.n == 1 && rec.prev == GENESIS => Chain::NewLog,
            Some((last_n, _)) if self.interrupted && rec.n > last_n.saturating_add(1) => {
                Chain::Resumed {
                    missed: rec.n - last_n - 1,
                }
            }
            Some((last_n, _)) if continues_log(&rec) && rec.n > last_n.saturating_add(1) => {
                Chain::Restarted {
                    missed: rec.n - last_n - 1,
                }
            }
            Some((last_n, last_hash)) => {
                let expected = last_n.saturating_add(1);
                if rec.n != expected {
                    let what = if rec.n > expected {
                        format!(
                            "{} record(s) missing (deleted or not published)",
                            rec.n - expected
                        )
                    } else {
                        "an index repeats or goes back (a record inserted, replayed or moved)"
                            .into()
                    };
                    Chain::Broken {
                        reason: format!(
                            "bad_index: expected n={expected}, found n={}: {what}",
                            rec.n
                        ),
                    }
                } else if rec.prev != last_hash {
                    Chain::Broken {
                        reason: format!(
                            "bad_prev: prev is not the hash of record n={last_n} as received: \
                             that record or this one was altered"
                        ),
                    }
                } else {
                    Chain::Linked
                }
            }
        };
        self.interrupted = false;
        match &chain {
            Chain::Linked => {}
            Chain::Broken { .. } => {
                self.stats.breaks += 1;
                self.restart();
            }
            Chain::NewLog => {
                self.stats.new_logs += 1;
                self.restart();
            }
            Chain::Resumed { missed } => {
                self.stats.missed += missed;
                self.restart();
            }
            Chain::Restarted { missed } => {
                self.stats.missed += missed;
                self.stats.restarts += 1;
                self.restart();
            }
            _ => self.restart(),
        }
        let checkpoint = match &rec.event {
            Event::Checkpoint(cp) => Some(self.check_checkpoint(&rec, &cp.jws)),
            _ => {
                self.pending += 1;
                None
            }
        };
        self.last = Some((rec.n, hash));
        AuditLine {
            record: Some(rec),
            chain,
            checkpoint,
        }
    }

    fn check_checkpoint(&mut self, rec: &Record, jws: &str) -> CheckpointCheck {
        let bad = |s: &mut Self, reason: String| {
            s.stats.bad_checkpoints += 1;
            CheckpointCheck::Bad { reason }
        };
        let claims = match audit::verify_checkpoint(jws, self.trust) {
            Ok(c) => c,
            Err(e) => return bad(self, format!("signature: {e} ({})", e.code())),
        };
        if claims.n != rec.n {
            return bad(
                self,
                format!(
                    "signed for record n={}, received as n={} (a checkpoint copied from elsewhere)",
                    claims.n, rec.n
                ),
            );
        }
        if claims.head != b64url(&rec.prev) {
            return bad(
                self,
                format!(
                    "signs head {} but the record's prev is {}",
                    claims.head,
                    b64url(&rec.prev)
                ),
            );
        }
        if claims.gateway_id != self.gateway {
            return bad(
                self,
                format!(
                    "signed for gateway {:?}, following {:?}",
                    claims.gateway_id, self.gateway
                ),
            );
        }
        self.stats.checkpoints += 1;
        let covered = std::mem::take(&mut self.pending);
        CheckpointCheck::Verified { covered }
    }

    /// The counts so far, with the records not yet covered by a checkpoint.
    pub fn finish(&self) -> AuditStats {
        let mut s = self.stats.clone();
        s.unsigned += self.pending;
        s
    }
}

/// A `started` record of a gateway that verified its log and continued it.
fn continues_log(rec: &Record) -> bool {
    matches!(
        &rec.event,
        Event::Started(s) if matches!(s.previous, audit::Previous::Closed | audit::Previous::NotClosed)
    )
}

/// The key facts of a record in one line (without `n` and time).
pub fn describe_record(rec: &Record) -> String {
    let kind = rec.event.kind();
    let facts = match &rec.event {
        Event::CommandDecision(d) => {
            let decision = match (&d.decision, &d.reason_code) {
                (audit::Decision::Permit, _) => "permit".to_owned(),
                (audit::Decision::Deny, Some(c)) => format!("deny:{c}"),
                (audit::Decision::Deny, None) => "deny".to_owned(),
            };
            let mut s = format!(
                "cmd={} operator={} {}={} {decision}",
                d.command_id, d.operator, d.tag, d.value
            );
            if let Some(r) = &d.rule_id {
                s.push_str(&format!(" rule={r}"));
            }
            if !d.approval_tokens.is_empty() {
                s.push_str(&format!(" approvals={}", d.approval_tokens.len()));
            }
            s
        }
        Event::CommandOutcome(o) => {
            let mut s = format!("cmd={} {} {}", o.command_id, o.tag, o.status);
            if let Some(c) = &o.code {
                s.push_str(&format!(":{c}"));
            }
            if let Some(v) = &o.readback {
                s.push_str(&format!(" readback={v}"));
            }
            s.push_str(&format!(" decision_n={}", o.decision_n));
            s
        }
        Event::AuthFailure(a) => format!(
            "refused:{} cmd={} subject={} message={} ({} bytes): {}",
            a.code,
            a.command_id.as_deref().unwrap_or("-"),
            a.subject.as_deref().unwrap_or("-"),
            a.message_sha256,
            a.message_len,
            a.detail
        ),
        Event::CommandsDropped(d) => format!("dropped:{} count={}", d.code, d.count),
        Event::DeviceSecurity(d) => format!("device {} {}: {}", d.device, d.code, d.detail),
        Event::Alert(a) => format!(
            "{} {} {} x{}: {}",
            a.severity.as_str(),
            a.code,
            a.subject,
            a.count,
            a.message
        ),
        Event::ShadowDifference(d) => format!(
            "cmd={} {} enforced={} candidate={}",
            d.command_id, d.tag, d.enforced, d.candidate
        ),
        Event::PolicyLoaded(p) => format!(
            "{} mode={} rules={} sha256={}",
            p.source, p.mode, p.rules, p.sha256
        ),
        Event::PolicyRejected(p) => format!("{} errors={}", p.source, p.errors.len()),
        Event::ConfigChanged(c) => format!("{}: {}", c.source, c.summary),
        Event::Checkpoint(_) => "signature over the chain so far".into(),
        Event::Started(s) => {
            let previous = match s.previous {
                audit::Previous::None => "none",
                audit::Previous::Closed => "closed",
                audit::Previous::NotClosed => "not_closed",
                audit::Previous::SetAside => "SET_ASIDE",
            };
            let mut out = format!(
                "gateway={} version={} previous={previous}",
                s.gateway_id, s.version
            );
            if let Some(a) = &s.set_aside {
                out.push_str(&format!(
                    " set_aside={} (line {}: {}: {})",
                    a.file, a.line, a.reason, a.detail
                ));
            }
            out
        }
        Event::Stopped(s) => format!("reason={}", s.reason),
    };
    format!("{kind} {facts}")
}

/// One line of `twinctl audit follow`: index, time, the record's facts,
/// and what the chain and checkpoint checks found.
pub fn audit_text(l: &AuditLine) -> String {
    let mut s = match &l.record {
        Some(r) => format!("n={} {} {}", r.n, utc_time(r.ts_ms), describe_record(r)),
        None => "(not a record)".into(),
    };
    match &l.chain {
        Chain::Linked => {}
        Chain::Start => match &l.record {
            Some(r) if r.n == 1 && r.prev == GENESIS => {
                s.push_str("  [chain starts: first record of the log]")
            }
            _ => s.push_str("  [chain starts here: its prev cannot be checked]"),
        },
        Chain::Resumed { missed } => s.push_str(&format!(
            "  [reconnected: {missed} record(s) published meanwhile not seen; chain resumes here]"
        )),
        Chain::Restarted { missed } => s.push_str(&format!(
            "  [gateway restarted: {missed} record(s) written while it was not connected were not \
             published; chain resumes here, `gateway audit verify` checks the file]"
        )),
        Chain::Duplicate => s.push_str("  [duplicate delivery, ignored]"),
        Chain::NewLog => s.push_str(
            "\n!! NEW AUDIT LOG: the gateway did not continue the log it had (set aside or missing)",
        ),
        Chain::Broken { reason } => s.push_str(&format!("\n!! AUDIT CHAIN BROKEN: {reason}")),
        Chain::BadLine { reason } => s.push_str(&format!("\n!! NOT AN AUDIT RECORD: {reason}")),
    }
    match &l.checkpoint {
        Some(CheckpointCheck::Verified { covered }) => s.push_str(&format!(
            "  [checkpoint verified: signs the {covered} record(s) received before it]"
        )),
        Some(CheckpointCheck::Bad { reason }) => {
            s.push_str(&format!("\n!! BAD CHECKPOINT: {reason}"))
        }
        None => {}
    }
    s
}

/// One thing seen on the audit topic.
#[derive(Debug, Clone, PartialEq)]
pub enum AuditEvent {
    Line(Box<AuditLine>),
    Subscribed,
    Lost(String),
}

/// Follows the audit topic of `gateway`, checking every line with an
/// [`AuditFollower`]; returns its counts.
pub async fn follow_audit(
    opts: &ClientOptions,
    prefix: &str,
    gateway: &str,
    trust: &TrustStore,
    duration: Option<Duration>,
    mut on: impl FnMut(AuditEvent),
) -> anyhow::Result<AuditStats> {
    check_gateway_id(gateway)?;
    let topic = Topics::new(prefix, gateway).audit();
    let mut follower = AuditFollower::new(trust, gateway);
    follow_topic(opts, &topic, duration, |link| match link {
        Link::Subscribed => {
            follower.interrupted();
            on(AuditEvent::Subscribed)
        }
        Link::Lost(why) => on(AuditEvent::Lost(why)),
        Link::Message { payload, .. } => {
            let line = follower.push(&payload);
            on(AuditEvent::Line(Box::new(line)))
        }
    })
    .await?;
    Ok(follower.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway::command_auth::{
        OperatorTrustStore, Refusal, ReplayOptions, ReplayStore, TokenVerifier, VerifierConfig,
        DEFAULT_LEEWAY_MS,
    };
    use std::os::unix::fs::PermissionsExt as _;
    use twin_model::audit::AuditChain;

    const NOW_S: u64 = 1_700_000_000;
    const GW: &str = "gw-plant-1";
    const ISS: &str = "ops-idp";

    fn who(operator: &str) -> Identity {
        Identity {
            issuer: ISS.into(),
            operator: operator.into(),
            gateway: GW.into(),
            roles: vec!["operator".into()],
            amr: vec!["pwd".into(), "otp".into()],
        }
    }

    fn verifier(dir: &Path, keys: &[&OperatorKey]) -> TokenVerifier {
        let mut trust = OperatorTrustStore::new();
        for k in keys {
            // Through the PEM the plant installs, not the in-memory key.
            trust.add_pem(&k.public_key_pem(), "test").unwrap();
        }
        let replay = ReplayStore::open(
            dir,
            ReplayOptions {
                capacity: 100,
                leeway_ms: DEFAULT_LEEWAY_MS,
            },
        )
        .unwrap();
        TokenVerifier::new(trust, VerifierConfig::new(GW, ISS), replay)
    }

    #[test]
    fn values_are_json_scalars_or_text() {
        let ok = |s: &str| parse_value(s).unwrap();
        assert!(matches!(ok("42"), Value::Int(42)));
        assert!(matches!(ok("-7"), Value::Int(-7)));
        assert!(matches!(ok("18446744073709551615"), Value::UInt(u64::MAX)));
        assert!(matches!(ok("42.5"), Value::Float(x) if x == 42.5));
        assert!(matches!(ok("1e3"), Value::Float(x) if x == 1000.0));
        assert!(matches!(ok("true"), Value::Bool(true)));
        assert!(matches!(ok("false"), Value::Bool(false)));
        assert_eq!(ok("\"42\""), Value::Text("42".into()));
        assert_eq!(ok("PUMP-A"), Value::Text("PUMP-A".into()));
        assert_eq!(ok("open valve"), Value::Text("open valve".into()));
        assert_eq!(ok("\"\""), Value::Text(String::new()));
        for bad in [
            "[1,2]",
            "[]",
            "{\"a\":1}",
            "{}",
            "null",
            "",
            "  ",
            "1e400",
            "1.2.3",
        ] {
            let e = parse_value(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad:?}");
        }
        assert!(parse_value("[1]").unwrap_err().contains("not a scalar"));
        // The value travels as the same JSON scalar.
        let j = serde_json::to_string(&ok("42.0")).unwrap();
        assert_eq!(j, "42.0");
    }

    #[test]
    fn minted_commands_verify_at_the_gateway() {
        let dir = tempfile::tempdir().unwrap();
        let ed = OperatorKey::generate(Algorithm::EdDSA).unwrap();
        let ec = OperatorKey::generate(Algorithm::ES256).unwrap();
        let v = verifier(dir.path(), &[&ed, &ec]);
        for key in [&ed, &ec] {
            let m = mint_command_token(
                key,
                &who("alice"),
                "FV-101.setpoint",
                Value::Float(42.5),
                Some(Value::Float(40.0)),
                120,
                NOW_S,
            )
            .unwrap();
            assert_eq!(b64url_decode(m.jti()).unwrap().len(), 16);
            assert_eq!(
                (m.claims.iat, m.claims.nbf, m.claims.exp),
                (NOW_S, NOW_S, NOW_S + 120)
            );
            let c = v.verify(m.token.as_bytes(), NOW_S * 1000 + 500).unwrap();
            assert_eq!(c.jti, m.claims.jti);
            assert_eq!(c.operator, "alice");
            assert_eq!(c.tag, "FV-101.setpoint");
            assert_eq!(c.value, Value::Float(42.5));
            assert_eq!(c.expect, Some(Value::Float(40.0)));
            assert_eq!(c.roles, vec!["operator".to_string()]);
            assert_eq!(c.alg, key.algorithm());
            assert_eq!(Some(c.binding), command_binding(&m.token));
            // Spent: the same token again is a replay.
            assert_eq!(
                v.verify(m.token.as_bytes(), NOW_S * 1000 + 600),
                Err(Refusal::Replayed)
            );
            assert_eq!(read_command_unverified(&m.token).unwrap(), m.claims);
        }
        // Two mints never share an id.
        let a = mint_command_token(&ed, &who("a"), "t", Value::Int(1), None, 60, NOW_S).unwrap();
        let b = mint_command_token(&ed, &who("a"), "t", Value::Int(1), None, 60, NOW_S).unwrap();
        assert_ne!(a.jti(), b.jti());
        assert!(mint_command_token(&ed, &who("a"), "t", Value::Int(1), None, 0, NOW_S).is_err());
        assert!(mint_command_token(&ed, &who("a"), "", Value::Int(1), None, 60, NOW_S).is_err());
    }

    #[test]
    fn approvals_bind_to_their_command() {
        let dir = tempfile::tempdir().unwrap();
        let alice = OperatorKey::generate(Algorithm::EdDSA).unwrap();
        let bob = OperatorKey::generate(Algorithm::ES256).unwrap();
        let v = verifier(dir.path(), &[&alice, &bob]);
        let now_ms = NOW_S * 1000;
        let cmd = mint_command_token(
            &alice,
            &who("alice"),
            "P-101.run",
            Value::Bool(true),
            None,
            120,
            NOW_S,
        )
        .unwrap();
        let other = mint_command_token(
            &alice,
            &who("alice"),
            "P-101.run",
            Value::Bool(false),
            None,
            120,
            NOW_S,
        )
        .unwrap();
        // Read from a file with its newline.
        let approval =
            approve_token(&bob, &who("bob"), &format!("{}\n", cmd.token), 60, NOW_S).unwrap();
        assert!(!approval.by_requester());
        assert_eq!(approval.command.jti, cmd.claims.jti);
        assert_eq!(approval.claims.approves.jti, cmd.claims.jti);
        let verified_cmd = v.verify(cmd.token.as_bytes(), now_ms).unwrap();
        let verified_other = v.verify(other.token.as_bytes(), now_ms).unwrap();
        // Not valid for another command.
        assert_eq!(
            v.verify_approval(approval.token.as_bytes(), &verified_other, now_ms),
            Err(Refusal::WrongCommand)
        );
        let a = v
            .verify_approval(approval.token.as_bytes(), &verified_cmd, now_ms)
            .unwrap();
        assert_eq!(a.approver.subject, "bob");
        assert!(!a.by_requester);
        // A self-approval is made and verified, and marked as such.
        let own = approve_token(&alice, &who("alice"), &cmd.token, 60, NOW_S).unwrap();
        assert!(own.by_requester());
        let own = v
            .verify_approval(own.token.as_bytes(), &verified_cmd, now_ms)
            .unwrap();
        assert!(own.by_requester);
        // Refused: another gateway, not a command token, garbage.
        let mut elsewhere = who("bob");
        elsewhere.gateway = "gw-2".into();
        assert!(approve_token(&bob, &elsewhere, &cmd.token, 60, NOW_S)
            .unwrap_err()
            .to_string()
            .contains("gw-2"));
        assert!(approve_token(&bob, &who("bob"), &approval.token, 60, NOW_S)
            .unwrap_err()
            .to_string()
            .contains("not a command token"));
        assert!(approve_token(&bob, &who("bob"), "nonsense", 60, NOW_S).is_err());
    }

    #[test]
    fn generated_keys_are_private_and_load_into_the_gateway_trust_store() {
        let dir = tempfile::tempdir().unwrap();
        for (alg, name) in [(Algorithm::EdDSA, "ed.pem"), (Algorithm::ES256, "ec.key")] {
            let out = dir.path().join(name);
            let g = generate_key(alg, &out).unwrap();
            assert_eq!(g.alg, alg);
            let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            assert_eq!(g.public_path, dir.path().join(format!("{name}.pub.pem")));
            let key = read_operator_key(&out).unwrap();
            assert_eq!(key.kid(), g.kid);
            let mut trust = OperatorTrustStore::new();
            assert_eq!(trust.add_file(&g.public_path).unwrap(), g.kid);
            let e = generate_key(alg, &out).unwrap_err().to_string();
            assert!(e.contains("refusing to overwrite"), "{e}");
        }
        // The public file alone in the way: nothing is written.
        let out = dir.path().join("x.pem");
        std::fs::write(public_key_path(&out), "x").unwrap();
        assert!(generate_key(Algorithm::EdDSA, &out).is_err());
        assert!(!out.exists());
    }

    fn signed_result(status: Status, digest: &str) -> String {
        let r = CommandResult {
            v: 1,
            gateway_id: GW.into(),
            command_id: Some("c1".into()),
            operator: Some("alice".into()),
            tag: Some("t".into()),
            value: Some(Value::Float(1.5)),
            status,
            code: None,
            rule_id: Some("r".into()),
            reason: "written and read back as 1.5".into(),
            readback: Some(Value::Float(1.5)),
            message_sha256: digest.into(),
            audit_n: Some(7),
            ts_ms: 1,
        };
        twin_model::golden::key().sign_compact(RESULT_TYP, &serde_json::to_vec(&r).unwrap())
    }

    #[test]
    fn results_are_verified_and_mapped_to_exit_codes() {
        let mut trust = TrustStore::new();
        trust.add(twin_model::golden::key().public_key());
        let jws = signed_result(Status::Applied, "d");
        let r = verify_result(&trust, GW, jws.as_bytes()).unwrap();
        assert_eq!(
            (r.status, r.message_sha256.as_str()),
            (Status::Applied, "d")
        );
        assert!(result_line(&r).contains("applied"));
        assert!(result_text(&r).starts_with("APPLIED: written"));
        assert_eq!(
            verify_result(&trust, "other", jws.as_bytes())
                .unwrap_err()
                .0,
            "wrong_topic"
        );
        assert_eq!(
            verify_result(&TrustStore::new(), GW, jws.as_bytes())
                .unwrap_err()
                .0,
            "unknown_key"
        );
        let status = twin_model::golden::key().sign_compact("other+jws", b"{}");
        assert_eq!(
            verify_result(&trust, GW, status.as_bytes()).unwrap_err().0,
            "wrong_type"
        );
        assert_eq!(
            [
                Status::Applied,
                Status::Denied,
                Status::Failed,
                Status::Refused
            ]
            .map(exit_code),
            [0, 3, 4, 5]
        );
        assert_eq!(utc_time(86_400_000 + 3_723_004), "01:02:03.004Z");
    }

    fn decision(id: &str) -> Event {
        Event::CommandDecision(audit::CommandDecision {
            command_id: id.into(),
            operator: "alice".into(),
            tag: "t".into(),
            value: Value::Int(1),
            decision: audit::Decision::Deny,
            reason_code: Some("no_rule".into()),
            reason: "no rule".into(),
            rule_id: None,
            token: "x.y.z".into(),
            approval_tokens: vec![],
        })
    }

    fn started() -> Event {
        Event::Started(audit::Started {
            gateway_id: GW.into(),
            version: "0".into(),
            previous: audit::Previous::None,
            unverified_tail: 0,
            set_aside: None,
        })
    }

    /// started, 3 decisions, checkpoint, 2 decisions, checkpoint.
    fn log() -> Vec<String> {
        let key = twin_model::golden::key();
        let mut c = AuditChain::new();
        let mut lines = vec![c.append(&started(), 1)];
        for i in 0..3 {
            lines.push(c.append(&decision(&format!("c{i}")), 2));
        }
        lines.push(c.append_checkpoint(&key, GW, 3));
        for i in 3..5 {
            lines.push(c.append(&decision(&format!("c{i}")), 4));
        }
        lines.push(c.append_checkpoint(&key, GW, 5));
        lines
    }

    fn trust() -> TrustStore {
        let mut t = TrustStore::new();
        t.add(twin_model::golden::key().public_key());
        t
    }

    fn chains(f: &mut AuditFollower<'_>, lines: &[String]) -> Vec<Chain> {
        lines.iter().map(|l| f.push(l.as_bytes()).chain).collect()
    }

    #[test]
    fn a_follower_starting_mid_log_checks_the_chain_from_there() {
        let trust = trust();
        let lines = log();
        let mut f = AuditFollower::new(&trust, GW);
        // Joins at record 3: its prev cannot be checked; the rest can.
        let got = chains(&mut f, &lines[2..]);
        assert_eq!(got[0], Chain::Start);
        assert!(got[1..].iter().all(|c| *c == Chain::Linked), "{got:?}");
        let cp = f.push(lines[7].as_bytes());
        assert_eq!(cp.chain, Chain::Duplicate);
        let s = f.finish();
        assert!(s.clean(), "{s:?}");
        assert_eq!(
            (s.records, s.checkpoints, s.duplicates, s.unsigned),
            (6, 2, 1, 0)
        );
        // The checkpoints name how many received records they cover.
        let mut f = AuditFollower::new(&trust, GW);
        let judged: Vec<AuditLine> = lines[2..].iter().map(|l| f.push(l.as_bytes())).collect();
        assert_eq!(
            judged[2].checkpoint,
            Some(CheckpointCheck::Verified { covered: 2 })
        );
        assert_eq!(
            judged[5].checkpoint,
            Some(CheckpointCheck::Verified { covered: 2 })
        );
        assert!(audit_text(&judged[0]).contains("prev cannot be checked"));
        assert!(audit_text(&judged[1]).contains("cmd=c2 operator=alice t=1 deny:no_rule"));
    }

    #[test]
    fn a_break_in_the_chain_is_reported_once_and_followed_on() {
        let trust = trust();
        let mut lines = log();
        // A record deleted.
        let mut f = AuditFollower::new(&trust, GW);
        let mut missing = lines.clone();
        missing.remove(2);
        let got = chains(&mut f, &missing);
        assert!(
            matches!(&got[2], Chain::Broken { reason } if reason.starts_with("bad_index")),
            "{got:?}"
        );
        assert!(got[3..].iter().all(|c| *c == Chain::Linked), "{got:?}");
        assert_eq!(f.finish().breaks, 1);
        // A record edited: the next one's prev no longer matches.
        lines[2] = lines[2].replace("c1", "cX");
        let mut f = AuditFollower::new(&trust, GW);
        let judged: Vec<AuditLine> = lines.iter().map(|l| f.push(l.as_bytes())).collect();
        assert!(
            matches!(&judged[3].chain, Chain::Broken { reason } if reason.starts_with("bad_prev"))
        );
        assert!(judged[3].is_alarm());
        assert!(audit_text(&judged[3]).contains("!! AUDIT CHAIN BROKEN"));
        // The checkpoint still verifies (it signs its own prev), but the
        // records before the break are left unsigned.
        assert_eq!(
            judged[4].checkpoint,
            Some(CheckpointCheck::Verified { covered: 1 })
        );
        let s = f.finish();
        assert_eq!((s.breaks, s.unsigned), (1, 3));
        assert!(!s.clean());
    }

    #[test]
    fn reconnects_new_logs_bad_lines_and_forged_checkpoints() {
        let trust = trust();
        let lines = log();
        // Lines missed while disconnected are not a break.
        let mut f = AuditFollower::new(&trust, GW);
        f.push(lines[0].as_bytes());
        f.interrupted();
        assert_eq!(
            f.push(lines[3].as_bytes()).chain,
            Chain::Resumed { missed: 2 }
        );
        assert_eq!(f.push(lines[4].as_bytes()).chain, Chain::Linked);
        let s = f.finish();
        assert!(s.clean() && s.missed == 2, "{s:?}");
        // A restart that continues the log may skip what was written
        // while the gateway was not connected (stopped, checkpoint).
        let mut f = AuditFollower::new(&trust, GW);
        chains(&mut f, &lines[..7]);
        let mut c = AuditChain::resume(8, sha256(lines[7].as_bytes()));
        let mut resumed = audit::Started {
            gateway_id: GW.into(),
            version: "0".into(),
            previous: audit::Previous::Closed,
            unverified_tail: 0,
            set_aside: None,
        };
        let restart = c.append(&Event::Started(resumed.clone()), 6);
        let l = f.push(restart.as_bytes());
        assert_eq!(l.chain, Chain::Restarted { missed: 1 });
        assert!(!l.is_alarm() && audit_text(&l).contains("gateway restarted"));
        assert_eq!(
            f.push(c.append(&decision("c9"), 7).as_bytes()).chain,
            Chain::Linked
        );
        let s = f.finish();
        assert!(s.clean() && s.restarts == 1 && s.missed == 1, "{s:?}");
        // A `started` that does not continue the log is no excuse.
        resumed.previous = audit::Previous::None;
        let mut f = AuditFollower::new(&trust, GW);
        chains(&mut f, &lines[..7]);
        let mut c = AuditChain::resume(8, sha256(lines[7].as_bytes()));
        let fake = c.append(&Event::Started(resumed), 6);
        assert!(f.push(fake.as_bytes()).chain.is_alarm());
        // Without a reconnect the same skip is a break.
        let mut f = AuditFollower::new(&trust, GW);
        f.push(lines[0].as_bytes());
        assert!(f.push(lines[3].as_bytes()).chain.is_alarm());
        // A new log after records of the old one.
        let mut f = AuditFollower::new(&trust, GW);
        chains(&mut f, &lines[..3]);
        let fresh = AuditChain::new().append(&started(), 9);
        assert_eq!(f.push(fresh.as_bytes()).chain, Chain::NewLog);
        assert_eq!(f.finish().new_logs, 1);
        // Not a record.
        let mut f = AuditFollower::new(&trust, GW);
        f.push(lines[0].as_bytes());
        assert!(matches!(f.push(b"{\"n\":2}").chain, Chain::BadLine { .. }));
        assert_eq!(f.push(lines[2].as_bytes()).chain, Chain::Start);
        // A checkpoint of another gateway, or signed by an unknown key.
        let mut f = AuditFollower::new(&trust, "gw-other");
        let judged: Vec<AuditLine> = lines[..5].iter().map(|l| f.push(l.as_bytes())).collect();
        assert!(
            matches!(&judged[4].checkpoint, Some(CheckpointCheck::Bad { reason }) if reason.contains("gw-other"))
        );
        let empty = TrustStore::new();
        let mut f = AuditFollower::new(&empty, GW);
        let judged: Vec<AuditLine> = lines[..5].iter().map(|l| f.push(l.as_bytes())).collect();
        assert!(
            matches!(&judged[4].checkpoint, Some(CheckpointCheck::Bad { reason }) if reason.contains("unknown_key"))
        );
        assert!(audit_text(&judged[4]).contains("!! BAD CHECKPOINT"));
        assert_eq!(f.finish().bad_checkpoints, 1);
    }
}
