//! Runs a real Mosquitto broker for end-to-end tests.
//!
//! The broker listens on a free loopback port with TLS and client
//! certificates required (`require_certificate true`,
//! `use_identity_as_username true`, no anonymous access) and an ACL that
//! limits the gateway (CN = gateway id) to `twin/<gateway id>/#` and lets the
//! operator (CN [`crate::pki::OPERATOR`]) read `twin/#` and write
//! `twin/+/command`. Nothing else is allowed.
//!
//! Mosquitto comes from the Debian package `mosquitto`; the tests never skip
//! when it is missing, they fail and say how to install it. The process is
//! killed when the [`Mosquitto`] is dropped.

use crate::pki::{CertPair, TestPki};
use anyhow::{bail, Context as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::process::{Child, Command};

/// Where the Debian package puts the broker.
pub const MOSQUITTO_BIN: &str = "/usr/sbin/mosquitto";
/// Environment variable overriding [`MOSQUITTO_BIN`].
pub const MOSQUITTO_ENV: &str = "TWIN_MOSQUITTO";
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Which server certificate the broker presents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ServerCert {
    /// Main CA, valid for `localhost` and `127.0.0.1`.
    #[default]
    Normal,
    /// Signed by another CA.
    WrongCa,
    /// Main CA, expired.
    Expired,
    /// Main CA, valid only for `wrong.example`.
    WrongHost,
}

/// Broker settings a test can choose.
#[derive(Debug, Clone, Default)]
pub struct BrokerOptions {
    pub server_cert: ServerCert,
    /// Keep messages and sessions on disk (in the broker's temp dir) across
    /// [`Mosquitto::stop`] / [`Mosquitto::restart`].
    pub persistence: bool,
    /// `message_size_limit` in bytes (`None`: Mosquitto's default).
    pub message_size_limit: Option<u32>,
}

/// A running Mosquitto. Killed on drop.
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    dir: tempfile::TempDir,
}

/// The broker binary, or a loud error saying how to get it.
pub fn mosquitto_bin() -> anyhow::Result<PathBuf> {
    let bin = std::env::var_os(MOSQUITTO_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(MOSQUITTO_BIN));
    if !bin.is_file() {
        bail!(
            "Mosquitto is not installed ({} not found). The end-to-end tests need a real broker: \
             run `scripts/test.sh`, which installs it with apt, \
             or set {MOSQUITTO_ENV} to the broker binary.",
            bin.display()
        );
    }
    Ok(bin)
}

impl Mosquitto {
    /// Starts a broker for `pki` on a free loopback port.
    pub async fn start(pki: &TestPki, opts: BrokerOptions) -> anyhow::Result<Mosquitto> {
        let bin = mosquitto_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("twin-mosquitto-")
            .tempdir()
            .context("creating the broker directory")?;
        let log = dir.path().join("mosquitto.log");
        let acl = dir.path().join("acl");
        std::fs::write(&acl, acl_text(&pki.gateway_id, &pki.operator))
            .with_context(|| format!("writing {}", acl.display()))?;
        let config = dir.path().join("mosquitto.conf");
        let mut broker = Mosquitto {
            child: None,
            port: 0,
            bin,
            config,
            log,
            dir,
        };
        let mut last_error = None;
        for _ in 0..5 {
            broker.port = crate::free_port();
            let text = config_text(
                pki,
                &opts,
                broker.port,
                broker.dir.path(),
                &acl,
                &broker.log,
            );
            std::fs::write(&broker.config, text)
                .with_context(|| format!("writing {}", broker.config.display()))?;
            match broker.spawn().await {
                Ok(()) => return Ok(broker),
                // Most likely another process took the port: try another one.
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("the loop ran at least once"))
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "mosquitto exited ({status}) before accepting connections on port {}; log:\n{}",
                    self.port,
                    self.log()
                );
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                self.kill_now();
                bail!(
                    "mosquitto did not accept connections on port {} within {:?}; log:\n{}",
                    self.port,
                    READY_TIMEOUT,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The TLS listener's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The broker's log so far (for error messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// The broker's working directory (config, ACL, log, persistence).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Stops the broker: SIGTERM (so a persistent broker saves its state),
    /// then SIGKILL after 5 s.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id().and_then(|p| libc::pid_t::try_from(p).ok()) {
            // SAFETY: kill(2) with a pid we spawned and have not reaped yet
            // (tokio reaps only through `child`), so it cannot name another process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }

    /// Kills the broker abruptly (SIGKILL), as in a crash.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
        }
    }

    /// Starts the broker again on the same port with the same configuration.
    /// Retries for a few seconds while the port is still in use.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match self.spawn().await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// MQTT options for `identity` with TLS to this broker (server name
    /// `127.0.0.1`, trust anchor: the main CA).
    pub fn client_options(
        &self,
        pki: &TestPki,
        client_id: &str,
        identity: Identity,
    ) -> anyhow::Result<rumqttc::MqttOptions> {
        let cert = match identity {
            Identity::Gateway => Some(&pki.gateway),
            Identity::Operator => Some(&pki.operator_client),
            Identity::Rogue => Some(&pki.rogue_client),
            Identity::Anonymous => None,
        };
        let tls = tls_client_config(&pki.ca_cert, cert)?;
        let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", self.port);
        opts.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
            tls,
        )));
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(1024 * 1024, 1024 * 1024);
        Ok(opts)
    }
}

/// Who connects in [`Mosquitto::client_options`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    Gateway,
    Operator,
    /// The gateway's CN, signed by another CA.
    Rogue,
    /// No client certificate.
    Anonymous,
}

/// A rustls client configuration trusting `ca` and presenting `client` if given.
#[allow(
    clippy::disallowed_methods,
    reason = "the test kit's own clients of the test broker (operator, twin, intruder), not the gateway's"
)]
pub fn tls_client_config(
    ca: &Path,
    client: Option<&CertPair>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use gateway::tls;
    let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .context("protocol versions")?
        .with_root_certificates(tls::root_store(ca)?);
    let config = match client {
        Some(pair) => builder
            .with_client_auth_cert(tls::read_certs(&pair.cert)?, tls::read_key(&pair.key)?)
            .context("client certificate and key do not match")?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn acl_text(gateway_id: &str, operator: &str) -> String {
    format!(
        "# Gateway: its own subtree only.\n\
         user {gateway_id}\n\
         topic readwrite twin/{gateway_id}/#\n\
         \n\
         # Operator: reads every twin, writes only commands.\n\
         user {operator}\n\
         topic read twin/#\n\
         topic write twin/+/command\n"
    )
}

fn config_text(
    pki: &TestPki,
    opts: &BrokerOptions,
    port: u16,
    dir: &Path,
    acl: &Path,
    log: &Path,
) -> String {
    let server = match opts.server_cert {
        ServerCert::Normal => &pki.broker,
        ServerCert::WrongCa => &pki.broker_wrong_ca,
        ServerCert::Expired => &pki.broker_expired,
        ServerCert::WrongHost => &pki.broker_wrong_host,
    };
    let mut c = String::new();
    let mut line = |s: String| {
        c.push_str(&s);
        c.push('\n');
    };
    // Started as root, Mosquitto drops to user "mosquitto", which cannot read
    // the 0600 keys: stay the user that started it.
    line("user root".into());
    line(format!("log_dest file {}", log.display()));
    line("log_type all".into());
    line("connection_messages true".into());
    // Commands and results are small: no Nagle delay at the broker.
    line("set_tcp_nodelay true".into());
    if opts.persistence {
        let data = dir.join("data");
        let _ = std::fs::create_dir_all(&data);
        line("persistence true".into());
        // Mosquitto needs the trailing slash.
        line(format!("persistence_location {}/", data.display()));
        line("autosave_interval 1".into());
    } else {
        line("persistence false".into());
    }
    if let Some(limit) = opts.message_size_limit {
        line(format!("message_size_limit {limit}"));
    }
    line(format!("listener {port} 127.0.0.1"));
    line(format!("cafile {}", pki.ca_cert.display()));
    line(format!("certfile {}", server.cert.display()));
    line(format!("keyfile {}", server.key.display()));
    line("require_certificate true".into());
    line("use_identity_as_username true".into());
    line("tls_version tlsv1.2".into());
    line("allow_anonymous false".into());
    line(format!("acl_file {}", acl.display()));
    c
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{AsyncClient, Event, EventLoop, Incoming, QoS};

    const GW: &str = "gw-test";

    async fn connect(
        broker: &Mosquitto,
        pki: &TestPki,
        id: &str,
        who: Identity,
    ) -> anyhow::Result<(AsyncClient, EventLoop)> {
        let opts = broker.client_options(pki, id, who)?;
        let (client, mut events) = AsyncClient::new(opts, 16);
        loop {
            match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
                Ok(Ok(Event::Incoming(Incoming::ConnAck(ack)))) => {
                    anyhow::ensure!(
                        ack.code == rumqttc::ConnectReturnCode::Success,
                        "refused: {ack:?}"
                    );
                    return Ok((client, events));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => bail!("connection failed: {e}"),
                Err(_) => bail!("no CONNACK within 5 s"),
            }
        }
    }

    /// The next publish the event loop receives within `wait`.
    async fn next_publish(events: &mut EventLoop, wait: Duration) -> Option<rumqttc::Publish> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, events.poll()).await {
                Ok(Ok(Event::Incoming(Incoming::Publish(p)))) => return Some(p),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("event loop failed: {e}"),
                Err(_) => return None,
            }
        }
    }

    /// Polls until the SUBACK arrives.
    async fn subscribed(events: &mut EventLoop) {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
                Ok(Ok(Event::Incoming(Incoming::SubAck(_)))) => return,
                Ok(Ok(_)) => {}
                other => panic!("no SUBACK: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn gateway_publishes_and_receives_on_its_own_topic_over_mutual_tls() {
        let pki = TestPki::new(GW).unwrap();
        let broker = Mosquitto::start(&pki, BrokerOptions::default())
            .await
            .unwrap();
        let (client, mut events) = connect(&broker, &pki, "gw", Identity::Gateway)
            .await
            .unwrap_or_else(|e| panic!("{e}\nbroker log:\n{}", broker.log()));
        let topic = format!("twin/{GW}/telemetry");
        client.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
        subscribed(&mut events).await;
        client
            .publish(&topic, QoS::AtLeastOnce, false, b"hello".to_vec())
            .await
            .unwrap();
        let p = next_publish(&mut events, Duration::from_secs(5)).await;
        let p = p.unwrap_or_else(|| panic!("no message; broker log:\n{}", broker.log()));
        assert_eq!(&p.payload[..], b"hello");
        assert!(broker.log().contains(GW), "the log names the identity");
    }

    #[tokio::test]
    async fn clients_without_a_certificate_or_from_another_ca_are_refused() {
        let pki = TestPki::new(GW).unwrap();
        let broker = Mosquitto::start(&pki, BrokerOptions::default())
            .await
            .unwrap();
        for (who, alert) in [
            (Identity::Anonymous, "CertificateRequired"),
            (Identity::Rogue, "UnknownCA"),
        ] {
            let r = connect(&broker, &pki, "intruder", who).await;
            let e = r.err().unwrap_or_else(|| panic!("{who:?} was let in"));
            assert!(e.to_string().contains(alert), "{who:?}: {e}");
        }
    }

    #[tokio::test]
    async fn the_acl_drops_a_gateway_publish_to_another_gateways_topic() {
        let pki = TestPki::new(GW).unwrap();
        let broker = Mosquitto::start(&pki, BrokerOptions::default())
            .await
            .unwrap();
        let (op, mut op_events) = connect(&broker, &pki, "op", Identity::Operator)
            .await
            .unwrap();
        op.subscribe("twin/#", QoS::AtLeastOnce).await.unwrap();
        subscribed(&mut op_events).await;
        let (gw, mut gw_events) = connect(&broker, &pki, "gw", Identity::Gateway)
            .await
            .unwrap();
        gw.publish(
            "twin/other-gw/telemetry",
            QoS::AtLeastOnce,
            false,
            b"forged".to_vec(),
        )
        .await
        .unwrap();
        gw.publish(
            format!("twin/{GW}/telemetry"),
            QoS::AtLeastOnce,
            false,
            b"own".to_vec(),
        )
        .await
        .unwrap();
        tokio::spawn(async move { while gw_events.poll().await.is_ok() {} });
        let first = next_publish(&mut op_events, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            first.topic,
            format!("twin/{GW}/telemetry"),
            "the forged message came through"
        );
        assert!(next_publish(&mut op_events, Duration::from_millis(300))
            .await
            .is_none());
        assert!(broker.log().contains("Denied PUBLISH"), "{}", broker.log());
    }

    #[tokio::test]
    async fn clients_refuse_brokers_with_wrong_ca_expired_or_wrong_host_certificates() {
        let pki = TestPki::new(GW).unwrap();
        for (cert, reason) in [
            (ServerCert::WrongCa, "UnknownIssuer"),
            (ServerCert::Expired, "certificate expired"),
            (ServerCert::WrongHost, "not valid for name"),
        ] {
            let opts = BrokerOptions {
                server_cert: cert,
                ..Default::default()
            };
            let broker = Mosquitto::start(&pki, opts).await.unwrap();
            let r = connect(&broker, &pki, "gw", Identity::Gateway).await;
            let e = r
                .err()
                .unwrap_or_else(|| panic!("{cert:?} broker was trusted"));
            assert!(e.to_string().contains(reason), "{cert:?}: {e}");
        }
    }

    #[tokio::test]
    async fn a_restarted_broker_listens_on_the_same_port() {
        let pki = TestPki::new(GW).unwrap();
        let opts = BrokerOptions {
            persistence: true,
            message_size_limit: Some(64 * 1024),
            ..Default::default()
        };
        let mut broker = Mosquitto::start(&pki, opts).await.unwrap();
        let port = broker.port();
        broker.stop().await;
        assert!(!broker.is_running());
        assert!(tokio::net::TcpStream::connect(broker.addr()).await.is_err());
        broker.restart().await.unwrap();
        assert_eq!(broker.port(), port);
        connect(&broker, &pki, "gw", Identity::Gateway)
            .await
            .unwrap();
    }
}
