//! Test kit for the twin gateway: the simulated tank PLC, a real Mosquitto
//! broker, a generated test PKI and the Python interoperability peers.
//!
//! - [`sim`]: Modbus TCP PLC simulator (tank of `docs/tank-register-map.md`, bulk bench device)
//! - [`pki`]: CA, broker/client certificates and signing keys in a temp dir
//! - [`mosquitto`]: Mosquitto with mutual TLS and an ACL, on a free port
//! - [`python`]: pymodbus peer (and the virtual environment it runs in)
//! - [`opcua_sim`]: OPC UA simulator server (typed variables, a tank; async-opcua)
//! - [`rogue`]: Modbus TCP proxy rewriting the responses' unit id (a rogue unit answering)

pub mod bench;
pub mod mosquitto;
pub mod opcua_sim;
pub mod pki;
pub mod python;
pub mod rogue;
pub mod sim;

use std::path::PathBuf;

/// A loopback TCP port that was free a moment ago (bind port 0, read, drop).
/// Whoever uses it must retry with another port if it was taken meanwhile.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the loopback interface can bind an ephemeral port")
}

/// The root of the Cargo workspace.
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The `[gateway]`, `[signing]`, `[mqtt]` and `[mqtt.tls]` tables of
/// gateway `id` with the test PKI's files under `pki/` (see
/// [`pki::TestPki`]) and the broker on loopback `port`; `mqtt_extra`
/// (whole lines) goes into `[mqtt]`. Devices and other tables follow.
pub fn gateway_toml(id: &str, port: u16, mqtt_extra: &str) -> String {
    format!(
        r#"[gateway]
id = "{id}"
data_dir = "data"
[signing]
key_file = "pki/gateway-signing.key.pem"
[mqtt]
host = "127.0.0.1"
port = {port}
{mqtt_extra}[mqtt.tls]
ca_file = "pki/ca.crt.pem"
cert_file = "pki/gateway.crt.pem"
key_file = "pki/gateway.key.pem"
"#
    )
}

/// The commented example configuration the README points OT engineers to.
pub const EXAMPLE_CONFIG: &str = include_str!("../../gateway/gateway.example.toml");

/// The example configuration with a broker port and a PLC address filled
/// in (the example uses broker port 8883 and PLC `127.0.0.1:5020`).
pub fn render_example_config(
    broker_port: u16,
    plc: std::net::SocketAddr,
) -> anyhow::Result<String> {
    let mut text = EXAMPLE_CONFIG.to_owned();
    for (from, to) in [
        ("port = 8883", format!("port = {broker_port}")),
        ("\"127.0.0.1:5020\"", format!("\"{plc}\"")),
    ] {
        if text.matches(from).count() != 1 {
            anyhow::bail!("the example configuration must contain `{from}` exactly once");
        }
        text = text.replace(from, &to);
    }
    Ok(text)
}

#[cfg(test)]
mod example_tests {
    #[test]
    fn the_example_config_renders_with_other_ports() {
        let t = super::render_example_config(40000, "127.0.0.1:41000".parse().unwrap()).unwrap();
        assert!(t.contains("port = 40000") && t.contains("\"127.0.0.1:41000\""));
    }
}
