//! Helpers the benches share: the gateway binary, the verifying twin's
//! subscription, the wall clock, a batch's
//! `created_ms`, and a process's memory and CPU from /proc.

use anyhow::Context as _;

/// The gateway binary a bench runs: `given`, or the release build of this
/// workspace; an error that says how to build it when it is missing.
pub fn gateway_bin(given: Option<std::path::PathBuf>) -> anyhow::Result<std::path::PathBuf> {
    let bin = given.unwrap_or_else(|| crate::workspace_root().join("target/release/gateway"));
    if !bin.exists() {
        anyhow::bail!(
            "{} not found: build it with `cargo build --release -p gateway --bin gateway`",
            bin.display()
        );
    }
    Ok(bin)
}

/// The bench's twin: a verifying watcher (the gateway's signing key
/// trusted, a wide window) and a subscription to every topic of gateway
/// `gw`, made (SUBACK received) before this returns. Keep the client while
/// the event loop is polled.
pub async fn subscribe_twin(
    broker: &crate::mosquitto::Mosquitto,
    pki: &crate::pki::TestPki,
    gw: &str,
    clean_session: bool,
) -> anyhow::Result<(
    rumqttc::AsyncClient,
    rumqttc::EventLoop,
    twinctl::watch::Watcher,
)> {
    use rumqttc::{Event, Packet, QoS};
    let mut trust = twin_model::TrustStore::new();
    trust.add_pem(&std::fs::read_to_string(&pki.gateway_signing_pub)?)?;
    let watcher = twinctl::watch::Watcher::new("twin", trust).with_window(1 << 22);
    let mut opts =
        broker.client_options(pki, "bench-twin", crate::mosquitto::Identity::Operator)?;
    opts.set_max_packet_size(1 << 20, 1 << 16);
    opts.set_clean_session(clean_session);
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 64);
    client
        .subscribe(format!("twin/{gw}/#"), QoS::AtLeastOnce)
        .await?;
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await? {
            break;
        }
    }
    Ok((client, events, watcher))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// `created_ms` of a signed batch, from the start of its payload (the field
/// precedes the samples), without decoding the whole message.
pub fn created_ms(jws: &[u8]) -> Option<u64> {
    let dot = jws.iter().position(|b| *b == b'.')?;
    let rest = &jws[dot + 1..];
    let head = &rest[..rest.len().min(320)];
    let head = &head[..head.iter().position(|b| *b == b'.').unwrap_or(head.len())];
    let head = &head[..head.len() / 4 * 4];
    let json = twin_model::jws::b64url_decode(std::str::from_utf8(head).ok()?)?;
    let key = b"\"created_ms\":";
    let at = json.windows(key.len()).position(|w| w == key)? + key.len();
    let digits: String = json[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .map(|b| *b as char)
        .collect();
    digits.parse().ok()
}

/// Clock ticks per second of /proc's CPU times.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// utime + stime in seconds from a /proc/.../stat line.
pub fn stat_cpu(stat: &str) -> Option<f64> {
    let after_comm = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks())
}

/// RSS (KiB) and CPU seconds of a process.
pub fn proc_stat(pid: u32) -> anyhow::Result<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    Ok((rss_kib, stat_cpu(&stat).context("stat")?))
}
