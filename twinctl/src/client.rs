//! The operator's mutual-TLS MQTT connection (same TLS rules as the gateway).

use gateway::config::{TlsConfig, TlsVersion};
use rumqttc::{AsyncClient, EventLoop, MqttOptions, QoS, TlsConfiguration, Transport};
use std::path::PathBuf;
use std::time::Duration;

/// Where and who the operator tool connects as.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub host: String,
    pub port: u16,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_id: String,
}

/// A client (not yet connected: the event loop connects when polled).
pub fn connect(o: &ClientOptions) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let tls = gateway::tls::client_config(&TlsConfig {
        ca_file: o.ca_file.clone(),
        cert_file: o.cert_file.clone(),
        key_file: o.key_file.clone(),
        min_version: TlsVersion::Tls13,
        server_name: None,
    })?;
    let mut opts = MqttOptions::new(&o.client_id, &o.host, o.port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(twin_model::MAX_MESSAGE_BYTES, 64 * 1024);
    Ok(AsyncClient::new(opts, 64))
}

/// Subscribes to every twin topic under `prefix` (all gateways, or one).
pub async fn subscribe_twin(
    client: &AsyncClient,
    prefix: &str,
    gateway: Option<&str>,
) -> anyhow::Result<()> {
    let gw = gateway.unwrap_or("+");
    for kind in [
        twin_model::topics::TELEMETRY,
        twin_model::topics::REPORTED,
        twin_model::topics::STATUS,
        twin_model::topics::GAPS,
    ] {
        client
            .subscribe(format!("{prefix}/{gw}/{kind}"), QoS::AtLeastOnce)
            .await?;
    }
    Ok(())
}

/// How [`watch_live`] shows what it sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Redraw the twin table twice a second, alarms below it.
    Table,
    /// One JSON line per event.
    JsonLines,
    /// Nothing (for tests and embedding).
    Quiet,
}

/// What a watch session saw.
#[derive(Debug, Clone, Default)]
pub struct WatchSummary {
    pub gateways: std::collections::BTreeMap<String, crate::watch::GatewayView>,
    pub rejected: u64,
}

impl WatchSummary {
    /// Nothing was rejected and no batch is missing.
    pub fn clean(&self) -> bool {
        self.rejected == 0 && self.gateways.values().all(|v| v.unexplained() == 0)
    }
}

/// Connects, verifies every message and shows the live twin until Ctrl-C
/// or until `duration` has passed.
pub async fn watch_live(
    opts: ClientOptions,
    prefix: &str,
    trust: twin_model::TrustStore,
    gateway: Option<&str>,
    output: Output,
    duration: Option<Duration>,
) -> anyhow::Result<WatchSummary> {
    use rumqttc::{Event, Packet};
    let (client, mut events) = connect(&opts)?;
    let mut w = crate::watch::Watcher::new(prefix, trust);
    let mut redraw = tokio::time::interval(Duration::from_millis(500));
    let stop = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
    let mut alarms: Vec<String> = Vec::new();
    let mut last_error = String::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = redraw.tick(), if output == Output::Table => {
                let mut screen = format!("\x1b[2J\x1b[H{}", crate::render::table(&w.gateways, w.rejected, gateway::clock::now_ms(), true));
                for a in alarms.iter().rev().take(8) {
                    screen.push_str(&format!("\x1b[1;31m!! {a}\x1b[0m\n"));
                }
                if !last_error.is_empty() {
                    screen.push_str(&format!("\x1b[1;31mbroker: {last_error}\x1b[0m\n"));
                }
                print!("{screen}");
            }
            ev = events.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    last_error.clear();
                    subscribe_twin(&client, prefix, gateway).await?;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let ev = w.handle(&p.topic, &p.payload);
                    match output {
                        Output::JsonLines => println!("{}", crate::render::json_line(&ev)),
                        Output::Table if ev.is_alarm() => alarms.push(crate::render::json_line(&ev)),
                        _ => {}
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    last_error = gateway::tls::explain(&e);
                    if output != Output::Table {
                        eprintln!("connection to the broker failed: {last_error}");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
    let _ = client.disconnect().await;
    Ok(WatchSummary {
        gateways: w.gateways,
        rejected: w.rejected,
    })
}
