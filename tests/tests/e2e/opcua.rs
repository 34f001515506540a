//! OPC UA devices end to end: the gateway's client against the in-repo
//! simulator (async-opcua server) with Basic256Sha256 SignAndEncrypt and a
//! user name login, the values verified at the twin, commands written to
//! nodes under the policy, counted at the server.

use super::*;
use gateway::command_auth::{mint_command, Algorithm, OperatorKey};
use opcua::types::Variant;
use twin_model::jws::{b64url, sha256};
use twin_model::result::{CommandResult, Status, RESULT_TYP};
use twin_testkit::opcua_sim::{OpcUaSim, OpcUaSimOptions, SimSecurity};

const NS: &str = "nsu=urn:twin-gateway:opcua-sim;s=";

/// The tags of the simulator: name, node, type, writable.
fn sim_tags() -> Vec<(&'static str, &'static str, &'static str, bool)> {
    vec![
        ("opc.bool", "Types.Boolean", "bool", false),
        ("opc.sbyte", "Types.SByte", "sbyte", false),
        ("opc.byte", "Types.Byte", "byte", false),
        ("opc.int16", "Types.Int16", "int16", false),
        ("opc.uint16", "Types.UInt16", "uint16", false),
        ("opc.int32", "Types.Int32", "int32", false),
        ("opc.uint32", "Types.UInt32", "uint32", false),
        ("opc.int64", "Types.Int64", "int64", false),
        ("opc.uint64", "Types.UInt64", "uint64", false),
        ("opc.float", "Types.Float", "float", false),
        ("opc.double", "Types.Double", "double", false),
        ("opc.string", "Types.String", "string", false),
        ("opc.level", "Tank1.Level", "double", false),
        ("opc.counter", "Tank1.Counter", "uint32", false),
        ("opc.setpoint", "Tank1.Setpoint", "double", true),
        ("opc.mode", "Tank1.Mode", "uint16", true),
    ]
}

struct OpcSetup {
    pki: TestPki,
    broker: Mosquitto,
    sim: OpcUaSim,
    idp: OperatorKey,
    cfg: Config,
}

/// The gateway's side: its OPC UA client certificate and (empty) trust
/// list, the password file, an operator key and the policy. Returns the
/// application URI and the operator key.
fn gateway_files(root: &Path, password: &str) -> anyhow::Result<(String, OperatorKey)> {
    let uri = gateway::pki::create_opcua_client(
        &gateway::pki::DevPkiFiles::in_dir(&root.join("pki")),
        GW,
        gateway::pki::Validity::days(30),
        twin_testkit::pki::TEST_OU,
    )?;
    gateway::keyfile::write_private(&root.join("opc.password"), password)?;
    let idp = OperatorKey::generate(Algorithm::EdDSA)?;
    std::fs::create_dir_all(root.join("operators"))?;
    std::fs::write(root.join("operators/idp.pem"), idp.public_key_pem())?;
    std::fs::create_dir_all(root.join("policies"))?;
    std::fs::write(
        root.join("policies/opc.toml"),
        r#"[policy]
mode = "enforce"
[[roles]]
name = "operator"
subjects = ["alice"]
[[rules]]
id = "opc-setpoint"
roles = ["operator"]
tags = ["opc.setpoint"]
min = 0.0
max = 10.0
"#,
    )?;
    Ok((uri, idp))
}

/// A configuration with one OPC UA device at `url` with `tags` (name, node
/// id, type, writable).
fn opc_config(
    root: &Path,
    broker_port: u16,
    url: &str,
    uri: &str,
    tags: &[(&str, String, &str, bool)],
    device_extra: &str,
) -> anyhow::Result<Config> {
    let mut tag_text = String::new();
    for (name, node, ty, writable) in tags {
        tag_text.push_str(&format!(
            "[[devices.tags]]\nname = \"{name}\"\nnode_id = \"{node}\"\ntype = \"{ty}\"\nwritable = {writable}\n"
        ));
    }
    let head = twin_testkit::gateway_toml(GW, broker_port, "reported_interval_ms = 100\n");
    let text = format!(
        r#"{head}[commands]
policy_dir = "policies"
operator_keys_dir = "operators"
issuer = "plant-ops"

[[devices]]
name = "opc-sim"
protocol = "opcua"
endpoint_url = "{url}"
certificate_file = "pki/opcua/own/cert.der"
private_key_file = "pki/opcua/private/private.pem"
application_uri = "{uri}"
user = "gateway"
password_file = "opc.password"
sampling_interval_ms = 50
publishing_interval_ms = 100
reconnect_min_ms = 200
reconnect_max_ms = 1000
{device_extra}
{tag_text}"#
    );
    let path = root.join("gateway.toml");
    std::fs::write(&path, text)?;
    gateway::config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The simulator, the broker and a gateway configuration for them.
async fn opc_setup(
    security: SimSecurity,
    trust: bool,
    password: &str,
    device_extra: &str,
) -> anyhow::Result<OpcSetup> {
    opc_setup_with(security, false, trust, password, device_extra).await
}

async fn opc_setup_with(
    security: SimSecurity,
    expired_cert: bool,
    trust: bool,
    password: &str,
    device_extra: &str,
) -> anyhow::Result<OpcSetup> {
    let pki = TestPki::new(GW)?;
    let broker = Mosquitto::start(&pki, BrokerOptions::default()).await?;
    let root = pki.root().to_path_buf();
    let mut opts = OpcUaSimOptions::new(root.join("sim-pki"))
        .user("gateway", "s3cret-pass")
        .security(security);
    opts.expired_cert = expired_cert;
    let sim = OpcUaSim::start(opts).await?;
    let (uri, idp) = gateway_files(&root, password)?;
    if trust {
        sim.install_trust(&root.join("pki/opcua/trusted"))?;
    }
    let tags: Vec<_> = sim_tags()
        .into_iter()
        .map(|(n, node, ty, w)| (n, format!("{NS}{node}"), ty, w))
        .collect();
    let cfg = opc_config(
        &root,
        broker.port(),
        &sim.endpoint_url(),
        &uri,
        &tags,
        device_extra,
    )?;
    Ok(OpcSetup {
        pki,
        broker,
        sim,
        idp,
        cfg,
    })
}

/// Alice's command token (the claims of the command tests).
fn command(key: &OperatorKey, tag: &str, value: Value) -> String {
    mint_command(key, &super::commands::claims("alice", tag, value))
}

/// Publishes a command and returns its verified result.
async fn send(
    s: &OpcSetup,
    client: &AsyncClient,
    results: &mut Subscriber,
    token: String,
) -> anyhow::Result<CommandResult> {
    let digest = b64url(&sha256(token.as_bytes()));
    client
        .publish(format!("twin/{GW}/command"), QoS::AtLeastOnce, false, token)
        .await?;
    let mut trust = TrustStore::new();
    trust.add_pem(&std::fs::read_to_string(&s.pki.gateway_signing_pub)?)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, payload) = tokio::time::timeout_at(deadline, results.rx.recv())
            .await
            .context("no result within 10 s")?
            .context("subscriber gone")?;
        let v = trust
            .verify_compact(&payload, RESULT_TYP, 1 << 20)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let r: CommandResult = serde_json::from_slice(&v.payload)?;
        if r.message_sha256 == digest {
            return Ok(r);
        }
    }
}

fn good(t: &Twin, tag: &str) -> Option<Value> {
    t.tag(tag)
        .filter(|v| v.quality == Quality::Good)
        .and_then(|v| v.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn opcua_values_arrive_typed_by_subscription_and_only_permitted_writes_reach_the_server(
) -> anyhow::Result<()> {
    init();
    let s = opc_setup(SimSecurity::Secure, true, "s3cret-pass\n", "").await?;
    let mut twin = Twin::start(&s.broker, &s.pki, 64).await?;
    let gw = gateway::run::start(s.cfg.clone()).await?;

    let all_good = twin
        .until(Duration::from_secs(20), "every OPC UA tag good", |t| {
            sim_tags().iter().all(|(name, ..)| good(t, name).is_some())
        })
        .await;
    if let Err(e) = all_good {
        let states: Vec<_> = sim_tags()
            .iter()
            .map(|(name, ..)| (name.to_string(), twin.tag(name)))
            .filter(|(_, v)| v.as_ref().is_none_or(|v| v.quality != Quality::Good))
            .collect();
        bail!("{e}; not good: {states:?}");
    }
    let expected = [
        ("opc.bool", Value::Bool(true)),
        ("opc.sbyte", Value::Int(-5)),
        ("opc.byte", Value::UInt(200)),
        ("opc.int16", Value::Int(-1234)),
        ("opc.uint16", Value::UInt(54321)),
        ("opc.int32", Value::Int(-123456)),
        ("opc.uint32", Value::UInt(3_000_000_000)),
        ("opc.int64", Value::Int(-9_000_000_000)),
        ("opc.uint64", Value::UInt(18_000_000_000_000_000_000)),
        ("opc.float", Value::Float(2.5)),
        ("opc.string", Value::Text("batch-42".into())),
        ("opc.setpoint", Value::Float(2.5)),
    ];
    for (tag, v) in expected {
        assert_eq!(good(&twin, tag), Some(v), "{tag}");
    }
    // The server's identity in the signed inventory: BuildInfo, the
    // application URI and the thumbprints of the certificate it presented.
    let d = twin.identified_device().await?;
    {
        use twin_model::inventory::field;
        use twin_testkit::opcua_sim as sim;
        assert_eq!(
            (d.protocol.as_str(), d.endpoint.as_str()),
            ("opcua", s.sim.endpoint_url().as_str())
        );
        let f = &d.identity.context("checked above")?.fields;
        let der = s.sim.server_cert_der();
        let expect = [
            (field::PRODUCT_URI, sim::PRODUCT_URI.to_string()),
            (field::PRODUCT_NAME, sim::PRODUCT_NAME.to_string()),
            (field::MANUFACTURER_NAME, sim::MANUFACTURER_NAME.to_string()),
            (field::SOFTWARE_VERSION, sim::SOFTWARE_VERSION.to_string()),
            (field::BUILD_NUMBER, sim::BUILD_NUMBER.to_string()),
            (field::APPLICATION_URI, sim::APPLICATION_URI.to_string()),
            (
                field::CERTIFICATE_SHA256,
                gateway::inventory::hex(&twin_model::jws::sha256(&der)),
            ),
        ];
        for (name, value) in expect {
            assert_eq!(f.get(name), Some(&value), "{name}");
        }
        assert_eq!(f.get(field::CERTIFICATE_SHA1).map(String::len), Some(40));
    }

    // Subscriptions deliver changes.
    let first = good(&twin, "opc.counter");
    twin.until(Duration::from_secs(10), "the counter moves", |t| {
        good(t, "opc.counter") != first
    })
    .await?;

    // Commands: permitted reaches the node, denied never does.
    let mut results = Subscriber::start(
        &s.broker,
        &s.pki,
        "opc-results",
        Identity::Operator,
        &format!("twin/{GW}/result"),
    )
    .await?;
    let opts = s
        .broker
        .client_options(&s.pki, "opc-operator", Identity::Operator)?;
    let (client, mut events) = AsyncClient::new(opts, 16);
    let poller = tokio::spawn(async move { while events.poll().await.is_ok() {} });

    let r = send(
        &s,
        &client,
        &mut results,
        command(&s.idp, "opc.setpoint", Value::Float(3.5)),
    )
    .await?;
    assert_eq!(
        (r.status, r.readback.clone()),
        (Status::Applied, Some(Value::Float(3.5))),
        "{r:?}"
    );
    assert_eq!(s.sim.value("Tank1.Setpoint"), Some(Variant::Double(3.5)));
    assert_eq!(s.sim.write_count(), 1);

    for (tag, value, code) in [
        ("opc.setpoint", Value::Float(50.0), "out_of_bounds"),
        ("opc.mode", Value::Int(1), "no_rule"),
        ("opc.level", Value::Float(1.0), "read_only_tag"),
    ] {
        let r = send(&s, &client, &mut results, command(&s.idp, tag, value)).await?;
        assert_eq!(
            (r.status, r.code.as_deref()),
            (Status::Denied, Some(code)),
            "{tag}: {r:?}"
        );
    }
    assert_eq!(
        s.sim.write_count(),
        1,
        "denied commands never reach the server"
    );

    // Recovery: the server goes away and comes back; the gap is quality.
    s.sim.stop().await;
    twin.until(
        Duration::from_secs(20),
        "bad quality while the server is down",
        |t| {
            t.tag("opc.counter")
                .is_some_and(|v| v.quality == Quality::Bad)
        },
    )
    .await?;
    s.sim.restart().await?;
    let before = good(&twin, "opc.counter");
    twin.until(
        Duration::from_secs(30),
        "values again after the restart",
        |t| good(t, "opc.counter").is_some_and(|v| Some(v) != before),
    )
    .await?;
    assert!(twin.rejections().is_empty(), "{:?}", twin.rejections());
    poller.abort();
    gw.stop().await;
    s.sim.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_untrusted_server_certificate_is_refused_and_kept_for_review() -> anyhow::Result<()> {
    init();
    let s = opc_setup(SimSecurity::Secure, false, "s3cret-pass", "").await?;
    let mut twin = Twin::start(&s.broker, &s.pki, 64).await?;
    let gw = gateway::run::start(s.cfg.clone()).await?;
    twin.until(Duration::from_secs(20), "bad quality, not silence", |t| {
        t.tag("opc.int32")
            .is_some_and(|v| v.quality == Quality::Bad)
    })
    .await?;
    let rejected = s.pki.root().join("pki/opcua/rejected");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&rejected)?.next().is_none() {
        if Instant::now() > deadline {
            bail!(
                "the server certificate was not stored in {}",
                rejected.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        good(&twin, "opc.int32").is_none(),
        "no value from an untrusted server"
    );
    wait_for_device_security(&s.cfg.audit.file, "opcua_untrusted_certificate").await?;
    gw.stop().await;
    s.sim.stop().await;
    Ok(())
}

/// Waits (up to 15 s) for a `device_security` record with `code`.
async fn wait_for_device_security(audit: &Path, code: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let codes = device_security_codes(audit)?;
        if codes.iter().any(|c| c == code) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no audit record {code}: {codes:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The codes of the `device_security` records of an audit file.
fn device_security_codes(path: &Path) -> anyhow::Result<Vec<String>> {
    let mut codes = Vec::new();
    for line in std::fs::read_to_string(path)?.lines() {
        let rec =
            twin_model::audit::parse_line(line.as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
        if let twin_model::audit::Event::DeviceSecurity(d) = rec.event {
            codes.push(d.code);
        }
    }
    Ok(codes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weak_security_an_expired_certificate_or_a_refused_login_give_no_values_and_an_audit_record(
) -> anyhow::Result<()> {
    init();
    for (security, expired, password, code) in [
        (
            SimSecurity::NoneOnly,
            false,
            "s3cret-pass",
            "opcua_no_acceptable_endpoint",
        ),
        (
            SimSecurity::Basic128Rsa15Only,
            false,
            "s3cret-pass",
            "opcua_no_acceptable_endpoint",
        ),
        (
            SimSecurity::Basic256Only,
            false,
            "s3cret-pass",
            "opcua_no_acceptable_endpoint",
        ),
        (
            SimSecurity::Secure,
            true,
            "s3cret-pass",
            "opcua_certificate_time_invalid",
        ),
        (
            SimSecurity::Secure,
            false,
            "wrong-password",
            "opcua_login_refused",
        ),
    ] {
        let s = opc_setup_with(security, expired, true, password, "").await?;
        let mut twin = Twin::start(&s.broker, &s.pki, 64).await?;
        let gw = gateway::run::start(s.cfg.clone()).await?;
        twin.until(Duration::from_secs(20), code, |t| {
            t.tag("opc.int32")
                .is_some_and(|v| v.quality == Quality::Bad)
        })
        .await?;
        wait_for_device_security(&s.cfg.audit.file, code).await?;
        assert!(good(&twin, "opc.int32").is_none(), "{code}: no value");
        gw.stop().await;
        s.sim.stop().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_independent_server_python_asyncua_with_basic256sha256_and_a_login_is_read_by_subscription(
) -> anyhow::Result<()> {
    init();
    let pki = TestPki::new(GW)?;
    let broker = Mosquitto::start(&pki, BrokerOptions::default()).await?;
    let root = pki.root().to_path_buf();
    let peer_dir = root.join("asyncua");
    std::fs::create_dir_all(&peer_dir)?;
    let peer =
        twin_testkit::python::AsyncuaServer::start(&peer_dir, "gateway", "peer-pass").await?;
    let (uri, _) = gateway_files(&root, "peer-pass")?;
    let der = std::fs::read(peer.server_cert_der_path())?;
    let cert = opcua::crypto::X509::from_der(&der).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    std::fs::write(
        root.join("pki/opcua/trusted")
            .join(opcua::crypto::CertificateStore::cert_file_name(&cert)),
        &der,
    )?;
    let ns = "nsu=urn:twin-gateway:asyncua-peer;s=";
    let tags = [
        ("peer.double", format!("{ns}Peer.Double"), "double", false),
        ("peer.int32", format!("{ns}Peer.Int32"), "int32", false),
        ("peer.uint16", format!("{ns}Peer.UInt16"), "uint16", false),
        ("peer.bool", format!("{ns}Peer.Bool"), "bool", false),
        ("peer.string", format!("{ns}Peer.String"), "string", false),
    ];
    let cfg = opc_config(
        &root,
        broker.port(),
        peer.endpoint_url(),
        &uri,
        &tags,
        "security_policy = \"Basic256Sha256\"",
    )?;
    let mut twin = Twin::start(&broker, &pki, 64).await?;
    let gw = gateway::run::start(cfg).await?;
    twin.until(Duration::from_secs(30), "the peer's values", |t| {
        tags.iter().all(|(name, ..)| good(t, name).is_some())
    })
    .await?;
    assert_eq!(good(&twin, "peer.int32"), Some(Value::Int(-42)));
    assert_eq!(good(&twin, "peer.uint16"), Some(Value::UInt(7)));
    assert_eq!(good(&twin, "peer.bool"), Some(Value::Bool(true)));
    assert_eq!(good(&twin, "peer.string"), Some(Value::Text("peer".into())));
    let first = good(&twin, "peer.double");
    twin.until(Duration::from_secs(10), "a change by subscription", |t| {
        good(t, "peer.double").is_some_and(|v| Some(v) != first)
    })
    .await?;
    // asyncua's BuildInfo in the signed inventory.
    let d = twin.identified_device().await?;
    {
        use twin_model::inventory::field;
        use twin_testkit::python as py;
        let f = &d.identity.context("checked above")?.fields;
        for (name, value) in [
            (field::PRODUCT_URI, py::ASYNCUA_PRODUCT_URI),
            (field::MANUFACTURER_NAME, py::ASYNCUA_MANUFACTURER),
            (field::PRODUCT_NAME, py::ASYNCUA_PRODUCT_NAME),
            (field::BUILD_NUMBER, py::ASYNCUA_BUILD_NUMBER),
            (field::SOFTWARE_VERSION, peer.software_version.as_str()),
            (
                field::APPLICATION_URI,
                twin_testkit::python::ASYNCUA_APPLICATION_URI,
            ),
        ] {
            assert_eq!(f.get(name).map(String::as_str), Some(value), "{name}");
        }
        assert_eq!(
            f.get(field::CERTIFICATE_SHA256),
            Some(&gateway::inventory::hex(&twin_model::jws::sha256(&der)))
        );
        assert!(
            f.get(field::BUILD_DATE)
                .is_some_and(|d| d.starts_with("2026-01-02T03:04:05")),
            "{f:?}"
        );
    }
    gw.stop().await;

    // The Read service against the same server.
    let cfg = opc_config(
        &root,
        broker.port(),
        peer.endpoint_url(),
        &uri,
        &tags,
        "security_policy = \"Basic256Sha256\"\nread = \"poll\"",
    )?;
    let gw = gateway::run::start(cfg).await?;
    let before = good(&twin, "peer.double");
    twin.until(
        Duration::from_secs(20),
        "polled values from the peer",
        |t| good(t, "peer.double").is_some_and(|v| Some(v) != before),
    )
    .await?;
    assert_eq!(good(&twin, "peer.int32"), Some(Value::Int(-42)));
    assert!(twin.rejections().is_empty(), "{:?}", twin.rejections());
    gw.stop().await;
    drop(peer);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn polling_reads_the_nodes_when_subscriptions_are_not_wanted() -> anyhow::Result<()> {
    init();
    let s = opc_setup(SimSecurity::Secure, true, "s3cret-pass", "read = \"poll\"").await?;
    let mut twin = Twin::start(&s.broker, &s.pki, 64).await?;
    let gw = gateway::run::start(s.cfg.clone()).await?;
    twin.until(Duration::from_secs(20), "polled values", |t| {
        good(t, "opc.int64") == Some(Value::Int(-9_000_000_000)) && good(t, "opc.counter").is_some()
    })
    .await?;
    let first = good(&twin, "opc.counter");
    twin.until(
        Duration::from_secs(10),
        "the counter moves between polls",
        |t| good(t, "opc.counter") != first,
    )
    .await?;
    assert_eq!(s.sim.write_count(), 0);
    gw.stop().await;
    s.sim.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_with_another_certificate_than_expected_is_not_read() -> anyhow::Result<()> {
    init();
    // The right product, but not the certificate the plant pinned.
    let s = opc_setup(
        SimSecurity::Secure,
        true,
        "s3cret-pass\n",
        &format!(
            "expect_identity = {{ product_uri = \"{}\", certificate_sha256 = \"{}\" }}",
            twin_testkit::opcua_sim::PRODUCT_URI,
            "00".repeat(32)
        ),
    )
    .await?;
    let mut twin = Twin::start(&s.broker, &s.pki, 64).await?;
    let gw = gateway::run::start(s.cfg.clone()).await?;
    twin.until(
        Duration::from_secs(20),
        "tags bad with identity_mismatch",
        |t| {
            t.tag("opc.level")
                .is_some_and(|v| v.reason.as_deref() == Some("identity_mismatch"))
        },
    )
    .await?;
    let d = twin.identified_device().await?;
    let reported = d
        .identity
        .context("the inventory still shows what the server reported")?;
    assert_eq!(
        reported.fields.get("product_uri").map(String::as_str),
        Some(twin_testkit::opcua_sim::PRODUCT_URI)
    );
    assert!(
        good(&twin, "opc.level").is_none(),
        "no value from a server that is not the pinned one"
    );
    gw.stop().await;
    let audit = std::fs::read_to_string(&s.cfg.audit.file)?;
    assert!(audit.contains("\"code\":\"device_identity_mismatch\""));
    Ok(())
}
