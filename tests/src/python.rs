//! Python peers for interoperability tests.
//!
//! The peers live in `tests/py/` and run in a virtual environment at
//! `<workspace>/.venv` (or the interpreter named by `$TWIN_PYTHON`). The
//! tests never skip when it is missing: they fail and print the command that
//! creates it.
//!
//! [`start_pymodbus`] runs `tests/py/modbus_server.py`, a pymodbus server
//! whose registers hold values encoded by pymodbus itself, and returns the
//! expectations it wrote: an independent check of the gateway's decoding.
//! It also answers Read Device Identification (FC 43 / MEI 14) with the
//! identity in [`PyModbus::identity`].
//!
//! [`AsyncuaServer`] runs `tests/py/opcua_server.py`, an OPC UA server of the
//! asyncua stack offering only Basic256Sha256 / SignAndEncrypt with user name
//! login: an independent peer for the gateway's OPC UA client. Its BuildInfo
//! is [`ASYNCUA_PRODUCT_URI`], [`ASYNCUA_MANUFACTURER`],
//! [`ASYNCUA_PRODUCT_NAME`], [`AsyncuaServer::software_version`],
//! [`ASYNCUA_BUILD_NUMBER`] and [`ASYNCUA_BUILD_DATE`].

use anyhow::{bail, Context as _};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

/// Environment variable naming the Python interpreter to use.
pub const PYTHON_ENV: &str = "TWIN_PYTHON";
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The Python interpreter with the test requirements installed.
pub fn python() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(PYTHON_ENV) {
        return Ok(PathBuf::from(p));
    }
    let root = crate::workspace_root();
    let python = root.join(".venv/bin/python");
    if !python.exists() {
        bail!(
            "{} not found: the interoperability tests need the Python peers. Create the \
             environment with\n  python3 -m venv {root}/.venv && {root}/.venv/bin/pip install -r \
             {root}/tests/py/requirements.txt\nor set {PYTHON_ENV} to an interpreter that has them.",
            python.display(),
            root = root.display()
        );
    }
    Ok(python)
}

/// The path of a script in `tests/py/`.
pub fn script(name: &str) -> PathBuf {
    crate::workspace_root().join("tests/py").join(name)
}

/// One value the pymodbus server holds.
#[derive(Debug, Clone, Deserialize)]
pub struct PyPoint {
    pub name: String,
    /// `holding_register`, `input_register`, `coil` or `discrete_input`.
    pub area: String,
    pub address: u16,
    /// `u16`, `i16`, `u32`, `i32`, `u64`, `i64`, `f32`, `f64`, `string` or `bool`.
    #[serde(rename = "type")]
    pub data_type: String,
    /// `ABCD`, `BADC`, `CDAB` or `DCBA`.
    pub order: String,
    pub length_registers: u16,
    pub expected: serde_json::Value,
    /// The raw registers pymodbus encoded (empty for bits).
    pub registers: Vec<u16>,
}

#[derive(Debug, Deserialize)]
struct PointsFile {
    unit_id: u8,
    points: Vec<PyPoint>,
    identity: BTreeMap<String, String>,
}

/// Names of the Read Device Identification objects 0x00-0x05, in id order,
/// as keys of [`PyModbus::identity`] (pymodbus spells them so).
pub const PYMODBUS_IDENTITY_OBJECTS: [&str; 6] = [
    "VendorName",
    "ProductCode",
    "MajorMinorRevision",
    "VendorUrl",
    "ProductName",
    "ModelName",
];

/// A running pymodbus server. Killed on drop.
pub struct PyModbus {
    child: Child,
    port: u16,
    pub unit_id: u8,
    pub points: Vec<PyPoint>,
    /// What the server answers to Read Device Identification, by object
    /// name ([`PYMODBUS_IDENTITY_OBJECTS`]): VendorName "Pymodbus Peer
    /// Works", ProductCode "PM-PEER", MajorMinorRevision the pymodbus
    /// version, VendorUrl "https://example.invalid/peer", ProductName
    /// "pymodbus peer", ModelName "PEER-1".
    pub identity: BTreeMap<String, String>,
    dir: tempfile::TempDir,
}

impl PyModbus {
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, self.port))
    }
    /// The point called `name`.
    pub fn point(&self, name: &str) -> anyhow::Result<&PyPoint> {
        self.points
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("the pymodbus server has no point {name}"))
    }
    /// What the server printed on stdout and stderr so far.
    pub fn output(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
        format!("stdout:\n{}\nstderr:\n{}", read("stdout"), read("stderr"))
    }
    /// Stops the server.
    pub async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// Starts `tests/py/modbus_server.py` on a free loopback port and waits
/// until it accepts connections.
pub async fn start_pymodbus() -> anyhow::Result<PyModbus> {
    let python = python()?;
    let mut last_error = None;
    for _ in 0..3 {
        match try_start(&python, crate::free_port()).await {
            Ok(server) => return Ok(server),
            // Most likely the port was taken in between: try another.
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.expect("the loop ran at least once"))
}

async fn try_start(python: &std::path::Path, port: u16) -> anyhow::Result<PyModbus> {
    let dir = tempfile::Builder::new()
        .prefix("twin-pymodbus-")
        .tempdir()
        .context("creating the pymodbus directory")?;
    let points = dir.path().join("points.json");
    let out = |n: &str| -> anyhow::Result<std::fs::File> {
        std::fs::File::create(dir.path().join(n)).with_context(|| format!("creating {n}"))
    };
    let mut child = Command::new(python)
        .arg(script("modbus_server.py"))
        .arg("--port")
        .arg(port.to_string())
        .arg("--points")
        .arg(&points)
        .stdin(Stdio::null())
        .stdout(out("stdout")?)
        .stderr(out("stderr")?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", python.display()))?;
    let output = |dir: &tempfile::TempDir| {
        let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap_or_default();
        format!("stdout:\n{}\nstderr:\n{}", read("stdout"), read("stderr"))
    };
    let ready = format!("READY {port}");
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        let stdout = std::fs::read_to_string(dir.path().join("stdout")).unwrap_or_default();
        if stdout.lines().any(|l| l.trim() == ready) {
            break;
        }
        if let Some(status) = child
            .try_wait()
            .context("waiting for the pymodbus server")?
        {
            bail!(
                "the pymodbus server exited ({status}) before it was ready\n{}",
                output(&dir)
            );
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = child.kill().await;
            bail!(
                "the pymodbus server was not ready within {READY_TIMEOUT:?}\n{}",
                output(&dir)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = std::fs::read_to_string(&points)
        .with_context(|| format!("reading {}", points.display()))?;
    let parsed: PointsFile =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", points.display()))?;
    Ok(PyModbus {
        child,
        port,
        unit_id: parsed.unit_id,
        points: parsed.points,
        identity: parsed.identity,
        dir,
    })
}

/// The application URI in the asyncua peer's certificate, also the URI of
/// the namespace its nodes are in (index 1).
pub const ASYNCUA_APPLICATION_URI: &str = "urn:twin-gateway:asyncua-peer";
/// BuildInfo.ProductUri of the asyncua peer (also the ProductUri of its
/// endpoints' application description).
pub const ASYNCUA_PRODUCT_URI: &str = "urn:twin-gateway:asyncua-peer:product";
/// BuildInfo.ManufacturerName of the asyncua peer.
pub const ASYNCUA_MANUFACTURER: &str = "asyncua peer works";
/// BuildInfo.ProductName of the asyncua peer.
pub const ASYNCUA_PRODUCT_NAME: &str = "asyncua peer";
/// BuildInfo.BuildNumber of the asyncua peer.
pub const ASYNCUA_BUILD_NUMBER: &str = "peer-1";
/// BuildInfo.BuildDate of the asyncua peer (RFC 3339, UTC).
pub const ASYNCUA_BUILD_DATE: &str = "2026-01-02T03:04:05Z";

/// A running asyncua OPC UA server (`tests/py/opcua_server.py`) on
/// `opc.tcp://127.0.0.1:PORT/twin/`. Killed on drop.
///
/// It offers only Basic256Sha256 / SignAndEncrypt, accepts any client
/// certificate, and requires the user name and password it was started
/// with. Nodes, in namespace [`ASYNCUA_APPLICATION_URI`] with string ids:
/// `Peer.Double` (Double 21.5, +0.5 every 200 ms, wrapping after 31.0 to
/// 21.5), `Peer.Int32` (-42), `Peer.UInt16` (7), `Peer.Bool` (true),
/// `Peer.String` ("peer"), and `Peer.Setpoint` (Double 1.0, the only
/// writable one). Its BuildInfo is set explicitly (see the module doc).
pub struct AsyncuaServer {
    child: Child,
    port: u16,
    endpoint_url: String,
    dir: PathBuf,
    /// BuildInfo.SoftwareVersion: the installed asyncua version, as the
    /// script printed it (`VERSION <x>`) before it was ready.
    pub software_version: String,
}

impl AsyncuaServer {
    /// Starts the peer on a free loopback port and waits until it accepts
    /// connections. It writes its key (`server_key.pem`), its self-signed
    /// certificate (`server_cert.der`) and its output (`asyncua.stdout`,
    /// `asyncua.stderr`) into `dir`, which must exist.
    pub async fn start(dir: &Path, user: &str, password: &str) -> anyhow::Result<AsyncuaServer> {
        let python = python()?;
        let mut last_error = None;
        for _ in 0..3 {
            match Self::try_start(&python, crate::free_port(), dir, user, password).await {
                Ok(server) => return Ok(server),
                // Most likely the port was taken in between: try another.
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("the loop ran at least once"))
    }

    async fn try_start(
        python: &Path,
        port: u16,
        dir: &Path,
        user: &str,
        password: &str,
    ) -> anyhow::Result<AsyncuaServer> {
        let out = |n: &str| -> anyhow::Result<std::fs::File> {
            let path = dir.join(n);
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))
        };
        let child = Command::new(python)
            .arg(script("opcua_server.py"))
            .arg("--port")
            .arg(port.to_string())
            .arg("--dir")
            .arg(dir)
            .arg("--user")
            .arg(user)
            .arg("--password")
            .arg(password)
            .stdin(Stdio::null())
            .stdout(out("asyncua.stdout")?)
            .stderr(out("asyncua.stderr")?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", python.display()))?;
        let mut server = AsyncuaServer {
            child,
            port,
            endpoint_url: format!("opc.tcp://127.0.0.1:{port}/twin/"),
            dir: dir.to_owned(),
            software_version: String::new(),
        };
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let stdout = std::fs::read_to_string(dir.join("asyncua.stdout")).unwrap_or_default();
            if let Some(url) = stdout.lines().find_map(|l| l.trim().strip_prefix("READY ")) {
                if url != server.endpoint_url {
                    bail!(
                        "the asyncua server is ready on {url}, expected {}\n{}",
                        server.endpoint_url,
                        server.output()
                    );
                }
                // Printed before READY, so present once READY is.
                let Some(version) = stdout
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("VERSION "))
                else {
                    bail!(
                        "the asyncua server printed no VERSION line before READY\n{}",
                        server.output()
                    );
                };
                server.software_version = version.to_owned();
                return Ok(server);
            }
            if let Some(status) = server
                .child
                .try_wait()
                .context("waiting for the asyncua server")?
            {
                bail!(
                    "the asyncua server exited ({status}) before it was ready\n{}",
                    server.output()
                );
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = server.child.kill().await;
                bail!(
                    "the asyncua server was not ready within {READY_TIMEOUT:?}\n{}",
                    server.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `opc.tcp://127.0.0.1:PORT/twin/`.
    pub fn endpoint_url(&self) -> &str {
        &self.endpoint_url
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, self.port))
    }

    /// The server's certificate (DER), to put into the client's trust list.
    pub fn server_cert_der_path(&self) -> PathBuf {
        self.dir.join("server_cert.der")
    }

    /// What the server printed on stdout and stderr so far.
    pub fn output(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.join(n)).unwrap_or_default();
        format!(
            "stdout:\n{}\nstderr:\n{}",
            read("asyncua.stdout"),
            read("asyncua.stderr")
        )
    }

    /// Stops the server with SIGTERM (SIGKILL after 5 s) and returns how it
    /// exited.
    pub async fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id().and_then(|p| libc::pid_t::try_from(p).ok()) {
            // SAFETY: kill(2) with a pid we spawned and have not reaped yet
            // (tokio reaps only through `child`), so it cannot name another process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            Ok(status) => status.context("waiting for the asyncua server"),
            Err(_) => {
                let _ = self.child.kill().await;
                bail!(
                    "the asyncua server did not exit within 5 s of SIGTERM\n{}",
                    self.output()
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{decode, decode_string, Order};
    use tokio_modbus::client::{tcp, Reader};

    fn order(s: &str) -> Order {
        match s {
            "ABCD" => Order::Abcd,
            "BADC" => Order::Badc,
            "CDAB" => Order::Cdab,
            "DCBA" => Order::Dcba,
            other => panic!("unknown order {other}"),
        }
    }

    #[tokio::test]
    async fn pymodbus_registers_decode_to_the_values_pymodbus_encoded() {
        let server = start_pymodbus().await.unwrap();
        let mut ctx = tcp::connect_slave(server.addr(), tokio_modbus::Slave(server.unit_id))
            .await
            .unwrap();
        let mut checked = 0;
        for p in &server.points {
            let regs = match p.area.as_str() {
                "holding_register" => {
                    ctx.read_holding_registers(p.address, p.length_registers)
                        .await
                }
                "input_register" => {
                    ctx.read_input_registers(p.address, p.length_registers)
                        .await
                }
                _ => continue,
            }
            .unwrap()
            .unwrap();
            assert_eq!(regs, p.registers, "{}\n{}", p.name, server.output());
            let be = decode(&regs, order(&p.order));
            let v = &p.expected;
            let ok = match p.data_type.as_str() {
                "u16" => v.as_u64() == Some(u16::from_be_bytes([be[0], be[1]]).into()),
                "i16" => v.as_i64() == Some(i16::from_be_bytes([be[0], be[1]]).into()),
                "u32" => v.as_u64() == Some(u32::from_be_bytes(be[..4].try_into().unwrap()).into()),
                "i32" => v.as_i64() == Some(i32::from_be_bytes(be[..4].try_into().unwrap()).into()),
                "u64" => v.as_u64() == Some(u64::from_be_bytes(be[..8].try_into().unwrap())),
                "i64" => v.as_i64() == Some(i64::from_be_bytes(be[..8].try_into().unwrap())),
                "f32" => v.as_f64() == Some(f32::from_be_bytes(be[..4].try_into().unwrap()).into()),
                "f64" => v.as_f64() == Some(f64::from_be_bytes(be[..8].try_into().unwrap())),
                "string" => v.as_str() == Some(decode_string(&regs).as_str()),
                other => panic!("unexpected type {other}"),
            };
            assert!(ok, "{}: {v} vs {be:02x?}", p.name);
            checked += 1;
        }
        assert!(checked >= 30, "only {checked} register points");
        let coils = ctx.read_coils(0, 10).await.unwrap().unwrap();
        for p in server.points.iter().filter(|p| p.area == "coil") {
            assert_eq!(
                serde_json::Value::Bool(coils[usize::from(p.address)]),
                p.expected,
                "{}",
                p.name
            );
        }
        let u32_badc = server.point("hr_u32_badc").unwrap();
        assert_eq!(u32_badc.registers, [0x3412, 0x7856]);
    }

    #[tokio::test]
    async fn pymodbus_answers_the_identity_it_wrote_to_device_identification() {
        use tokio_modbus::prelude::ReadCode;
        let server = start_pymodbus().await.unwrap();
        let pymodbus_version = std::process::Command::new(python().unwrap())
            .args(["-c", "import pymodbus; print(pymodbus.__version__)"])
            .output()
            .unwrap();
        let pymodbus_version = String::from_utf8(pymodbus_version.stdout).unwrap();
        let expected: BTreeMap<String, String> = [
            ("VendorName", "Pymodbus Peer Works"),
            ("ProductCode", "PM-PEER"),
            ("MajorMinorRevision", pymodbus_version.trim()),
            ("VendorUrl", "https://example.invalid/peer"),
            ("ProductName", "pymodbus peer"),
            ("ModelName", "PEER-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(server.identity, expected);

        let mut ctx = tcp::connect_slave(server.addr(), tokio_modbus::Slave(server.unit_id))
            .await
            .unwrap();
        let mut read = BTreeMap::new();
        let mut next = 0;
        for _ in 0..10 {
            let r = ctx
                .read_device_identification(ReadCode::Regular, next)
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("{e:?}\n{}", server.output()));
            for o in &r.device_id_objects {
                let name = PYMODBUS_IDENTITY_OBJECTS
                    .get(usize::from(o.id))
                    .unwrap_or_else(|| panic!("unexpected object {:#04x}", o.id));
                let value = o.value_as_str().expect("UTF-8").to_owned();
                read.insert((*name).to_owned(), value);
            }
            if !r.more_follows {
                break;
            }
            next = r.next_object_id;
        }
        assert_eq!(read, expected, "{}", server.output());
    }

    #[tokio::test]
    async fn asyncua_peer_publishes_its_build_info() {
        use opcua::client::{ClientBuilder, IdentityToken};
        use opcua::crypto::SecurityPolicy;
        use opcua::types::{
            AttributeId, DateTime, MessageSecurityMode, ReadValueId, StatusCode,
            TimestampsToReturn, VariableId, Variant,
        };
        let dir = tempfile::tempdir().unwrap();
        let mut server = AsyncuaServer::start(dir.path(), "operator", "peer-secret")
            .await
            .unwrap();
        let asyncua_version = std::process::Command::new(python().unwrap())
            .args(["-c", "import asyncua; print(asyncua.__version__)"])
            .output()
            .unwrap();
        assert_eq!(
            server.software_version,
            String::from_utf8(asyncua_version.stdout).unwrap().trim()
        );

        let pki = dir.path().join("client-pki");
        let client_uri = "urn:twin-gateway:python-test-client";
        let (der, key) = crate::opcua_sim::make_certificate(
            client_uri,
            "python-test-client",
            &["localhost"],
            false,
        )
        .unwrap();
        std::fs::create_dir_all(pki.join("own")).unwrap();
        std::fs::create_dir_all(pki.join("private")).unwrap();
        std::fs::write(pki.join("own/cert.der"), der).unwrap();
        std::fs::write(pki.join("private/private.pem"), key).unwrap();
        let mut client = ClientBuilder::new()
            .application_name("python-test-client")
            .application_uri(client_uri)
            .pki_dir(&pki)
            .create_sample_keypair(false)
            // Fine for the peer's own test; the gateway never does this.
            .trust_server_certs(true)
            .session_retry_limit(0)
            .request_timeout(Duration::from_secs(5))
            .client()
            .unwrap();
        let (session, event_loop) = client
            .connect_to_matching_endpoint(
                (
                    server.endpoint_url(),
                    SecurityPolicy::Basic256Sha256.to_str(),
                    MessageSecurityMode::SignAndEncrypt,
                ),
                IdentityToken::new_user_name("operator", "peer-secret"),
            )
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{}", server.output()));
        let event_loop = event_loop.spawn();
        tokio::time::timeout(Duration::from_secs(20), session.wait_for_connection())
            .await
            .unwrap_or_else(|_| panic!("no session within 20 s\n{}", server.output()));

        let ids = [
            VariableId::Server_ServerStatus_BuildInfo_ProductUri,
            VariableId::Server_ServerStatus_BuildInfo_ManufacturerName,
            VariableId::Server_ServerStatus_BuildInfo_ProductName,
            VariableId::Server_ServerStatus_BuildInfo_SoftwareVersion,
            VariableId::Server_ServerStatus_BuildInfo_BuildNumber,
            VariableId::Server_ServerStatus_BuildInfo_BuildDate,
            VariableId::Server_ServerStatus_BuildInfo,
        ];
        let reads: Vec<ReadValueId> = ids
            .iter()
            .map(|id| ReadValueId {
                node_id: (*id).into(),
                attribute_id: AttributeId::Value as u32,
                ..Default::default()
            })
            .collect();
        let values = session
            .read(&reads, TimestampsToReturn::Neither, 0.0)
            .await
            .unwrap();
        let text = |i: usize| match &values[i].value {
            Some(Variant::String(s)) => s.as_ref().to_owned(),
            other => panic!("{:?}: {other:?}", ids[i]),
        };
        assert_eq!(
            [text(0), text(1), text(2), text(3), text(4)],
            [
                ASYNCUA_PRODUCT_URI,
                ASYNCUA_MANUFACTURER,
                ASYNCUA_PRODUCT_NAME,
                server.software_version.as_str(),
                ASYNCUA_BUILD_NUMBER
            ]
        );
        let build_date: DateTime = ASYNCUA_BUILD_DATE.parse().unwrap();
        assert_eq!(
            values[5].value,
            Some(Variant::DateTime(Box::new(build_date)))
        );
        // The structure holds the same (what a client reading BuildInfo at once gets).
        let Some(Variant::ExtensionObject(o)) = &values[6].value else {
            panic!("BuildInfo: {:?}", values[6]);
        };
        let info = o
            .inner_as::<opcua::types::BuildInfo>()
            .expect("a BuildInfo structure");
        assert_eq!(info.product_uri.as_ref(), ASYNCUA_PRODUCT_URI);
        assert_eq!(info.software_version.as_ref(), server.software_version);
        assert_eq!(info.build_date, build_date);

        let _ = session.disconnect().await;
        assert_eq!(event_loop.await.unwrap(), StatusCode::Good);
        server.stop().await.unwrap();
    }

    /// OPC UA Hello (OPC 10000-6 7.1.2.3) for `url`, little-endian.
    fn opcua_hello(url: &str) -> Vec<u8> {
        let mut body = Vec::new();
        for v in [0u32, 65535, 65535, 0, 0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        body.extend_from_slice(&i32::try_from(url.len()).unwrap().to_le_bytes());
        body.extend_from_slice(url.as_bytes());
        let mut msg = b"HELF".to_vec();
        msg.extend_from_slice(&u32::try_from(8 + body.len()).unwrap().to_le_bytes());
        msg.extend_from_slice(&body);
        msg
    }

    #[tokio::test]
    async fn asyncua_peer_starts_and_answers_an_opcua_hello() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let mut server = AsyncuaServer::start(dir.path(), "operator", "peer-secret")
            .await
            .unwrap();
        assert_eq!(
            server.endpoint_url(),
            format!("opc.tcp://127.0.0.1:{}/twin/", server.port())
        );
        let cert = std::fs::read(server.server_cert_der_path()).unwrap();
        assert_eq!(cert[0], 0x30, "not DER\n{}", server.output());
        let uri = ASYNCUA_APPLICATION_URI.as_bytes();
        assert!(
            cert.windows(uri.len()).any(|w| w == uri),
            "the certificate lacks the application URI"
        );

        let mut tcp = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
        tcp.write_all(&opcua_hello(server.endpoint_url()))
            .await
            .unwrap();
        let mut ack = [0u8; 28];
        tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut ack))
            .await
            .expect("no Acknowledge within 5 s")
            .unwrap_or_else(|e| panic!("reading the Acknowledge: {e}\n{}", server.output()));
        assert_eq!(&ack[..4], b"ACKF", "{ack:02x?}\n{}", server.output());
        drop(tcp);

        let status = server.stop().await.unwrap();
        assert!(
            status.success(),
            "the peer did not exit cleanly on SIGTERM: {status}\n{}",
            server.output()
        );
    }
}
