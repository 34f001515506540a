//! Helpers the benches share: the wall clock, a batch's `created_ms`, and a
//! process's memory and CPU from /proc.

use anyhow::Context as _;

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
