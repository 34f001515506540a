//! An OPC UA simulator server for tests and the demo, on async-opcua.
//!
//! One namespace, [`NAMESPACE_URI`], with string node ids:
//!
//! - one read-only variable per data type under `Types` ([`TYPE_NODES`]:
//!   `Types.Boolean` ... `Types.DateTime`, initial values in [`initial_value`]);
//! - a small tank under `Tank1`: `Tank1.Level` (Double, read-only, a slow
//!   sine between 1.0 and 4.0), `Tank1.Counter` (UInt32, read-only, +1), both
//!   updated every 100 ms; `Tank1.Setpoint` (Double), `Tank1.Mode` (UInt16) and
//!   `Tank1.Pump` (Boolean), writable (AccessLevel CurrentRead|CurrentWrite);
//! - for load tests, [`OpcUaSimOptions::bulk`] read-only Double variables
//!   `Bulk.0` ... `Bulk.{n-1}` under `Bulk`, all changed every 100 ms to
//!   [`bulk_value`] of a tick counter (not affected by [`OpcUaSim::freeze`]).
//!
//! Writes are checked the way real servers check them: a value whose type
//! is not exactly the variable's DataType gets `BadTypeMismatch` (the
//! library's own check lets any scalar through), a read-only variable gets
//! `BadNotWritable`, an index range on a scalar `BadIndexRangeInvalid`.
//! Every write that reaches one of our variables is counted and logged
//! ([`OpcUaSim::write_count`], [`OpcUaSim::writes`]), refused or not, so a
//! test can prove that a command denied by the gateway produced no write.
//!
//! The server offers the endpoints of [`SimSecurity`], checks user name and
//! password tokens (a wrong password gets `BadIdentityTokenRejected`) and
//! allows anonymous sessions only when asked. Its certificate (RSA 2048,
//! made with rcgen) is kept in `<pki_dir>/own/cert.der` and
//! `<pki_dir>/private/private.pem`, reused across restarts, and carries
//! [`APPLICATION_URI`] as its first subject alternative name, then
//! `localhost`, `127.0.0.1` and any extra host names. A client trusts it by
//! putting the DER file into its trust list: for an async-opcua client that
//! is `<client pki>/trusted/CN=twin-opcua-sim [<sha1 hex>].der`, the exact
//! name of [`OpcUaSim::trust_file_name`] (see [`OpcUaSim::install_trust`]).
//!
//! [`OpcUaSim::stop`] and [`OpcUaSim::restart`] take the server away and
//! bring it back on the same port with the same certificate and the same
//! values (sessions and subscriptions are gone: clients must recreate them).
//!
//! Notes for async-opcua 0.19 clients, found while testing this server:
//! - after the session event loop reports `SessionPollResult::Reconnected`,
//!   call `Session::trigger_publish_now()`: the library recreates (or
//!   transfers) the subscriptions but its new subscription loop sends no
//!   Publish until triggered, so no notification would ever arrive again
//!   (see the test `a_subscription_resumes_after_restart`);
//! - `session_retry_limit` defaults to 10 attempts, after which the event
//!   loop ends for good (`-1` retries forever); `max_failed_keep_alive_count`
//!   defaults to 0, i.e. a server that stops answering without closing the
//!   TCP connection is never detected (keep-alive every 10 s by default);
//! - no endpoint matching the requested policy and mode gives
//!   `BadTcpEndpointUrlInvalid`; an identity type the endpoint does not
//!   offer gives `BadSecurityPolicyRejected` without asking the server.

use anyhow::{bail, Context as _};
use async_trait::async_trait;
use opcua::crypto::{CertificateStore, SecurityPolicy, X509};
use opcua::server::address_space::{
    add_namespaces, AccessLevel, AddressSpace, NodeType, ObjectBuilder, VariableBuilder,
};
use opcua::server::diagnostics::NamespaceMetadata;
use opcua::server::node_manager::memory::{
    InMemoryNodeManager, InMemoryNodeManagerBuilder, InMemoryNodeManagerImpl,
};
use opcua::server::node_manager::{RequestContext, ServerContext, WriteNode};
use opcua::server::{
    Server, ServerBuilder, ServerEndpoint, ServerHandle, ServerUserToken, ANONYMOUS_USER_TOKEN_ID,
};
use opcua::sync::RwLock;
use opcua::types::{
    AttributeId, BuildInfo, DataEncoding, DataValue, DateTime, Identifier, MessageSecurityMode,
    NodeId, NumericRange, ObjectId, ObjectTypeId, QualifiedName, StatusCode, TimestampsToReturn,
    VariableTypeId, Variant,
};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Namespace of every simulator node.
pub const NAMESPACE_URI: &str = "urn:twin-gateway:opcua-sim";
/// The server's application URI (first SAN entry of its certificate).
pub const APPLICATION_URI: &str = "urn:twin-gateway:opcua-sim:server";
/// The server's product URI (also in BuildInfo).
pub const PRODUCT_URI: &str = "urn:twin-gateway:opcua-sim:product";
/// BuildInfo.ProductName, also the application name.
pub const PRODUCT_NAME: &str = "Twin Tank OPC UA Simulator";
/// BuildInfo.ManufacturerName.
pub const MANUFACTURER_NAME: &str = "Twin Gateway Project";
/// BuildInfo.SoftwareVersion: the test kit's version.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");
/// BuildInfo.BuildNumber (fixed).
pub const BUILD_NUMBER: &str = "opcua-sim-1";
/// Common name of the server certificate; the trust file name starts with it.
pub const CERT_COMMON_NAME: &str = "twin-opcua-sim";

/// The per-type variables, read-only, in this order.
pub const TYPE_NODES: [&str; 13] = [
    "Types.Boolean",
    "Types.SByte",
    "Types.Byte",
    "Types.Int16",
    "Types.UInt16",
    "Types.Int32",
    "Types.UInt32",
    "Types.Int64",
    "Types.UInt64",
    "Types.Float",
    "Types.Double",
    "Types.String",
    "Types.DateTime",
];
/// The tank variables, in this order.
pub const TANK_NODES: [&str; 5] = [
    "Tank1.Level",
    "Tank1.Setpoint",
    "Tank1.Mode",
    "Tank1.Pump",
    "Tank1.Counter",
];
/// The writable variables (CurrentRead|CurrentWrite); all others are read-only.
pub const WRITABLE_NODES: [&str; 3] = ["Tank1.Setpoint", "Tank1.Mode", "Tank1.Pump"];

/// Folder (and name prefix before the `.`) of the bulk variables.
pub const BULK_FOLDER: &str = "Bulk";

/// String identifier of bulk variable `i`: `Bulk.{i}`.
pub fn bulk_node(i: u32) -> String {
    format!("{BULK_FOLDER}.{i}")
}

/// The value of bulk variable `i` after `tick` updates (every 100 ms):
/// `tick + i * 0.001`. Every variable changes at every tick, and a reader
/// gets the tick back as `(value - i * 0.001).round()`.
pub fn bulk_value(tick: u64, i: u32) -> f64 {
    tick as f64 + f64::from(i) * 0.001
}

/// The index of a bulk node id (`"Bulk.17"` -> 17), whatever the bulk count.
fn bulk_index(node: &str) -> Option<u32> {
    let i = node.strip_prefix(BULK_FOLDER)?.strip_prefix('.')?;
    // No sign, no leading zeros: exactly what `bulk_node` writes.
    if i.starts_with(['+', '-']) || (i.len() > 1 && i.starts_with('0')) {
        return None;
    }
    i.parse().ok()
}

/// The fixed value of `Types.DateTime`: 2024-05-17T12:30:00Z.
pub fn fixed_date_time() -> DateTime {
    DateTime::ymd_hms(2024, 5, 17, 12, 30, 0)
}

/// The value a node starts with (`None` for an unknown node).
#[allow(clippy::approx_constant)] // 3.14159 is the specified value, not PI
pub fn initial_value(node: &str) -> Option<Variant> {
    Some(match node {
        "Types.Boolean" => Variant::Boolean(true),
        "Types.SByte" => Variant::SByte(-5),
        "Types.Byte" => Variant::Byte(200),
        "Types.Int16" => Variant::Int16(-1234),
        "Types.UInt16" => Variant::UInt16(54321),
        "Types.Int32" => Variant::Int32(-123_456),
        "Types.UInt32" => Variant::UInt32(3_000_000_000),
        "Types.Int64" => Variant::Int64(-9_000_000_000),
        "Types.UInt64" => Variant::UInt64(18_000_000_000_000_000_000),
        "Types.Float" => Variant::Float(2.5),
        "Types.Double" => Variant::Double(3.14159),
        "Types.String" => Variant::from("batch-42"),
        "Types.DateTime" => Variant::from(fixed_date_time()),
        "Tank1.Level" => Variant::Double(level_at(0)),
        "Tank1.Setpoint" => Variant::Double(2.5),
        "Tank1.Mode" => Variant::UInt16(0),
        "Tank1.Pump" => Variant::Boolean(false),
        "Tank1.Counter" => Variant::UInt32(0),
        _ => return None,
    })
}

/// `Tank1.Level` as a function of `Tank1.Counter`: 2.5 + 1.5 sin(2 pi n / 200),
/// a 20 s period at one tick per 100 ms, always within 1.0..=4.0.
pub fn level_at(counter: u32) -> f64 {
    let phase = f64::from(counter % 200) / 200.0 * std::f64::consts::TAU;
    2.5 + 1.5 * phase.sin()
}

/// The identifiers of every variable of a simulator with `bulk` bulk variables.
fn all_nodes(bulk: u32) -> impl Iterator<Item = String> {
    TYPE_NODES
        .into_iter()
        .chain(TANK_NODES)
        .map(str::to_string)
        .chain((0..bulk).map(bulk_node))
}

/// The value a node of a simulator with `bulk` bulk variables starts with.
fn start_value(node: &str, bulk: u32) -> Option<Variant> {
    match bulk_index(node) {
        Some(i) if i < bulk => Some(Variant::Double(bulk_value(0, i))),
        _ => initial_value(node),
    }
}

/// Which endpoints the server offers (all on path `/`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SimSecurity {
    /// Basic256Sha256, Aes128_Sha256_RsaOaep and Aes256_Sha256_RsaPss, each
    /// with Sign and SignAndEncrypt.
    #[default]
    Secure,
    /// [`SimSecurity::Secure`] plus security policy None (demo convenience).
    SecureAndNone,
    /// Only security policy None.
    NoneOnly,
    /// Only the deprecated Basic128Rsa15 (Sign and SignAndEncrypt); async-opcua
    /// 0.19 still implements it.
    Basic128Rsa15Only,
    /// Only the deprecated Basic256 (Sign and SignAndEncrypt).
    Basic256Only,
}

impl SimSecurity {
    /// The (policy, mode) pairs offered.
    pub fn endpoints(self) -> Vec<(SecurityPolicy, MessageSecurityMode)> {
        use MessageSecurityMode::{None as ModeNone, Sign, SignAndEncrypt};
        let both = |p: SecurityPolicy| [(p, Sign), (p, SignAndEncrypt)];
        let secure = [
            SecurityPolicy::Basic256Sha256,
            SecurityPolicy::Aes128Sha256RsaOaep,
            SecurityPolicy::Aes256Sha256RsaPss,
        ]
        .into_iter()
        .flat_map(both);
        match self {
            SimSecurity::Secure => secure.collect(),
            SimSecurity::SecureAndNone => {
                secure.chain([(SecurityPolicy::None, ModeNone)]).collect()
            }
            SimSecurity::NoneOnly => vec![(SecurityPolicy::None, ModeNone)],
            SimSecurity::Basic128Rsa15Only => both(SecurityPolicy::Basic128Rsa15).to_vec(),
            SimSecurity::Basic256Only => both(SecurityPolicy::Basic256).to_vec(),
        }
    }
}

/// How to run the simulator.
#[derive(Clone, Debug)]
pub struct OpcUaSimOptions {
    /// Where the server keeps `own/cert.der`, `private/private.pem`,
    /// `trusted/` and `rejected/`. An existing certificate is reused when it
    /// still fits (application URI, host names, expired or not).
    pub pki_dir: PathBuf,
    /// Address to listen on (default 127.0.0.1).
    pub bind: IpAddr,
    /// Port; 0 (default) lets the system pick a free one.
    pub port: u16,
    /// Extra host names or addresses for the certificate (beyond `localhost`
    /// and `127.0.0.1`); the first one is also the host advertised in the
    /// endpoint descriptions (default `127.0.0.1`).
    pub host_names: Vec<String>,
    /// Endpoints offered.
    pub security: SimSecurity,
    /// User name and password pairs accepted.
    pub users: Vec<(String, String)>,
    /// Accept anonymous sessions too.
    pub allow_anonymous: bool,
    /// Make the server certificate already expired (valid from 30 days ago to
    /// yesterday), for a refusal test.
    pub expired_cert: bool,
    /// Start with the tank frozen (`Tank1.Level` and `Tank1.Counter` do not move).
    pub frozen: bool,
    /// Number of bulk variables `Bulk.0` .. `Bulk.{bulk-1}` (default 0), see
    /// [`bulk_value`]. With bulk variables the server's limits are raised so
    /// that one CreateMonitoredItems call and one subscription can hold them
    /// all (async-opcua's defaults are 1000 monitored items per call and per
    /// subscription, arrays of at most 1000 elements in a request, and
    /// messages up to 5 chunks of 64 KiB), unless `default_limits` is set.
    /// The subscriptions are also checked every 1 ms instead of every 100 ms
    /// (see `launch`), so that a 100 ms publishing interval really is (about)
    /// 100 ms.
    /// The client needs room too: an async-opcua client decodes arrays of at
    /// most 1000 elements unless told otherwise (`max_array_length`), so it
    /// cannot read a CreateMonitoredItems response or a notification
    /// message with more items than that.
    pub bulk: u32,
    /// Keep async-opcua's default server limits even with bulk variables
    /// (to see how a client copes with a server that limits).
    pub default_limits: bool,
}

impl OpcUaSimOptions {
    /// Defaults: 127.0.0.1, free port, [`SimSecurity::Secure`], no user,
    /// no anonymous access (add at least one of them), valid certificate.
    pub fn new(pki_dir: impl Into<PathBuf>) -> Self {
        OpcUaSimOptions {
            pki_dir: pki_dir.into(),
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            host_names: Vec::new(),
            security: SimSecurity::Secure,
            users: Vec::new(),
            allow_anonymous: false,
            expired_cert: false,
            frozen: false,
            bulk: 0,
            default_limits: false,
        }
    }
    /// Adds `n` bulk variables `Bulk.0` .. `Bulk.{n-1}` (see [`OpcUaSimOptions::bulk`]).
    pub fn bulk(mut self, n: u32) -> Self {
        self.bulk = n;
        self
    }
    /// Adds a user.
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.users.push((name.into(), password.into()));
        self
    }
    /// Sets the endpoints offered.
    pub fn security(mut self, security: SimSecurity) -> Self {
        self.security = security;
        self
    }
    /// Allows (or not) anonymous sessions.
    pub fn anonymous(mut self, allow: bool) -> Self {
        self.allow_anonymous = allow;
        self
    }
}

/// One Write service operation addressed to the simulator's namespace.
#[derive(Clone, Debug, PartialEq)]
pub struct SimWrite {
    /// String identifier of the node (`Tank1.Setpoint`).
    pub node: String,
    /// The value sent (`Variant::Empty` when none was).
    pub value: Variant,
    /// The result the server answered.
    pub status: StatusCode,
}

struct Shared {
    write_count: AtomicU64,
    writes: Mutex<Vec<SimWrite>>,
    frozen: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The node manager implementation behind our namespace.
struct SimNodes {
    ns: u16,
    shared: Arc<Shared>,
}

type SimNodeManager = InMemoryNodeManager<SimNodes>;

fn string_id(node_id: &NodeId) -> String {
    match &node_id.identifier {
        Identifier::String(s) => s.as_ref().to_string(),
        other => other.to_string(),
    }
}

impl SimNodes {
    fn write_one(&self, space: &mut AddressSpace, context: &RequestContext, write: &mut WriteNode) {
        let wv = write.value();
        let node_id = wv.node_id.clone();
        let value = wv.value.value.clone().unwrap_or_default();
        let status = (|| {
            let Some(NodeType::Variable(var)) = space.find_mut(&node_id) else {
                return if space.find(&node_id).is_some() {
                    StatusCode::BadNotWritable
                } else {
                    StatusCode::BadNodeIdUnknown
                };
            };
            if wv.attribute_id != AttributeId::Value {
                return StatusCode::BadNotWritable;
            }
            if !var.access_level().contains(AccessLevel::CURRENT_WRITE)
                || !var.user_access_level().contains(AccessLevel::CURRENT_WRITE)
            {
                return StatusCode::BadNotWritable;
            }
            if wv.index_range.has_range() {
                return StatusCode::BadIndexRangeInvalid;
            }
            // Exactly the declared type, scalar. (async-opcua's own check,
            // `validate_value_to_write`, accepts any scalar of another type.)
            let same_type = !value.is_array()
                && value
                    .data_type()
                    .is_some_and(|t| t.node_id == var.data_type());
            if !same_type {
                return StatusCode::BadTypeMismatch;
            }
            // Client-supplied status and timestamps are ignored: the value is
            // Good from now on, stamped with the server's clock.
            let now = DateTime::now();
            if let Err(e) = var.set_value_direct(value.clone(), StatusCode::Good, &now, &now) {
                return e;
            }
            let dv = var.value(
                TimestampsToReturn::Both,
                &NumericRange::None,
                &DataEncoding::Binary,
                0.0,
            );
            context
                .subscriptions
                .notify_data_change([(dv, &node_id, AttributeId::Value)].into_iter());
            StatusCode::Good
        })();
        write.set_status(status);
        lock(&self.shared.writes).push(SimWrite {
            node: string_id(&node_id),
            value,
            status,
        });
    }
}

#[async_trait]
impl InMemoryNodeManagerImpl for SimNodes {
    async fn init(&self, _address_space: &mut AddressSpace, _context: ServerContext) {}

    fn name(&self) -> &str {
        "twin-opcua-sim"
    }

    fn namespaces(&self) -> Vec<NamespaceMetadata> {
        vec![NamespaceMetadata {
            namespace_uri: NAMESPACE_URI.to_owned(),
            namespace_index: self.ns,
            is_namespace_subset: Some(false),
            ..Default::default()
        }]
    }

    async fn write(
        &self,
        context: &RequestContext,
        address_space: &RwLock<AddressSpace>,
        nodes_to_write: &mut [&mut WriteNode],
    ) -> Result<(), StatusCode> {
        let mut space = address_space.write();
        for write in nodes_to_write.iter_mut() {
            self.shared.write_count.fetch_add(1, Ordering::SeqCst);
            self.write_one(&mut space, context, write);
        }
        Ok(())
    }
}

/// Builds our nodes into `space`, with `values` (node, data value) as
/// current values.
fn populate(space: &mut AddressSpace, ns: u16, values: &[(String, DataValue)]) {
    let types = NodeId::new(ns, "Types");
    ObjectBuilder::new(&types, QualifiedName::new(ns, "Types"), "Types")
        .is_folder()
        .organized_by(ObjectId::ObjectsFolder)
        .insert(space);
    let tank = NodeId::new(ns, "Tank1");
    ObjectBuilder::new(&tank, QualifiedName::new(ns, "Tank1"), "Tank1")
        .has_type_definition(ObjectTypeId::BaseObjectType)
        .organized_by(ObjectId::ObjectsFolder)
        .insert(space);
    let bulk = NodeId::new(ns, BULK_FOLDER);
    if values.iter().any(|(n, _)| bulk_index(n).is_some()) {
        ObjectBuilder::new(&bulk, QualifiedName::new(ns, BULK_FOLDER), BULK_FOLDER)
            .is_folder()
            .organized_by(ObjectId::ObjectsFolder)
            .insert(space);
    }
    for (node, dv) in values {
        let (parent, name) = node.split_once('.').unwrap_or(("Types", node));
        let data_type = if bulk_index(node).is_some() {
            Some(Variant::Double(0.0))
        } else {
            initial_value(node)
        }
        .and_then(|v| v.data_type())
        .map(|t| t.node_id)
        .unwrap_or_else(NodeId::null);
        let access = if WRITABLE_NODES.contains(&node.as_str()) {
            AccessLevel::CURRENT_READ | AccessLevel::CURRENT_WRITE
        } else {
            AccessLevel::CURRENT_READ
        };
        let id = NodeId::new(ns, node.as_str());
        let builder = VariableBuilder::new(&id, QualifiedName::new(ns, name), name)
            .data_type(data_type)
            .value_rank(-1)
            .access_level(access)
            .user_access_level(access)
            .minimum_sampling_interval(100.0)
            .has_type_definition(VariableTypeId::BaseDataVariableType);
        let builder = if parent == "Tank1" {
            builder.component_of(tank.clone())
        } else if parent == BULK_FOLDER {
            builder.organized_by(bulk.clone())
        } else {
            builder.organized_by(types.clone())
        };
        builder.insert(space);
        if let Some(NodeType::Variable(v)) = space.find_mut(&id) {
            v.set_data_value(dv.clone());
        }
    }
}

struct Running {
    handle: ServerHandle,
    nodes: Arc<SimNodeManager>,
    server: JoinHandle<Result<(), String>>,
    ticker: JoinHandle<()>,
}

struct State {
    running: Option<Running>,
    /// Node values while stopped (and the values to start with).
    saved: Vec<(String, DataValue)>,
}

/// A running OPC UA simulator. Dropping the handle stops it.
pub struct OpcUaSim {
    opts: OpcUaSimOptions,
    addr: SocketAddr,
    cert_der: Vec<u8>,
    cert_path: PathBuf,
    shared: Arc<Shared>,
    state: Mutex<State>,
}

impl OpcUaSim {
    /// Creates (or reuses) the server certificate and starts the server.
    pub async fn start(opts: OpcUaSimOptions) -> anyhow::Result<OpcUaSim> {
        if opts.users.is_empty() && !opts.allow_anonymous {
            bail!("the OPC UA simulator needs at least one user or allow_anonymous");
        }
        if let Some((name, _)) = opts.users.iter().find(|(n, _)| n.is_empty()) {
            bail!("the OPC UA simulator cannot have an empty user name ({name:?})");
        }
        let (cert_der, cert_path) = ensure_certificate(&opts)?;
        let listener = TcpListener::bind((opts.bind, opts.port))
            .await
            .with_context(|| {
                format!(
                    "OPC UA simulator cannot listen on {}:{}",
                    opts.bind, opts.port
                )
            })?;
        let addr = listener.local_addr().context("OPC UA simulator address")?;
        let now = DateTime::now();
        let saved = all_nodes(opts.bulk)
            .map(|n| {
                let v = start_value(&n, opts.bulk).unwrap_or_default();
                (n, DataValue::new_at(v, now))
            })
            .collect();
        let sim = OpcUaSim {
            shared: Arc::new(Shared {
                write_count: AtomicU64::new(0),
                writes: Mutex::new(Vec::new()),
                frozen: AtomicBool::new(opts.frozen),
            }),
            opts,
            addr,
            cert_der,
            cert_path,
            state: Mutex::new(State {
                running: None,
                saved,
            }),
        };
        sim.launch(listener)?;
        Ok(sim)
    }

    fn advertised_host(&self) -> String {
        self.opts
            .host_names
            .first()
            .cloned()
            .unwrap_or_else(|| match self.opts.bind {
                IpAddr::V4(a) if a.is_unspecified() => "127.0.0.1".to_string(),
                IpAddr::V6(a) if a.is_unspecified() => "127.0.0.1".to_string(),
                ip => ip.to_string(),
            })
    }

    fn launch(&self, listener: TcpListener) -> anyhow::Result<()> {
        let mut state = lock(&self.state);
        if state.running.is_some() {
            return Ok(());
        }
        let values = state.saved.clone();
        let shared = self.shared.clone();
        let make_nodes = move |context: ServerContext, space: &mut AddressSpace| {
            let ns = add_namespaces(&context, space, &[NAMESPACE_URI])[0];
            populate(space, ns, &values);
            SimNodes { ns, shared }
        };
        let mut builder = ServerBuilder::new()
            .application_name(PRODUCT_NAME)
            .application_uri(APPLICATION_URI)
            .product_uri(PRODUCT_URI)
            .build_info(BuildInfo {
                product_uri: PRODUCT_URI.into(),
                manufacturer_name: MANUFACTURER_NAME.into(),
                product_name: PRODUCT_NAME.into(),
                software_version: SOFTWARE_VERSION.into(),
                build_number: BUILD_NUMBER.into(),
                build_date: DateTime::ymd(2025, 1, 1),
            })
            .pki_dir(&self.opts.pki_dir)
            .create_sample_keypair(false)
            // TEST SERVER ONLY: every client certificate is trusted (and
            // copied into <pki_dir>/trusted). A real server must never do
            // this; the gateway, as a client, never auto-trusts a server.
            .trust_client_certs(true)
            .host(self.advertised_host())
            .port(self.addr.port())
            .discovery_urls(vec![self.endpoint_url()])
            .with_node_manager(InMemoryNodeManagerBuilder::new(make_nodes));
        let mut token_ids: Vec<String> = Vec::new();
        for (i, (user, pass)) in self.opts.users.iter().enumerate() {
            let id = format!("user{i}");
            builder = builder.add_user_token(&id, ServerUserToken::user_pass(user, pass));
            token_ids.push(id);
        }
        if self.opts.allow_anonymous {
            token_ids.push(ANONYMOUS_USER_TOKEN_ID.to_string());
        }
        for (policy, mode) in self.opts.security.endpoints() {
            let id = format!("{policy}_{mode:?}").to_lowercase();
            builder = builder.add_endpoint(id, ServerEndpoint::new("/", policy, mode, &token_ids));
        }
        if self.opts.bulk > 0 {
            // async-opcua checks whether a subscription's publishing interval
            // has elapsed only on this timer (100 ms by default), measured
            // from when the previous check ran: with a publishing interval
            // of 100 ms, a check that runs a little early waits for the next
            // one, so the subscription publishes every 100 or 200 ms (about
            // a third of the changes of a 100 ms bulk variable are lost with
            // queue size 1). Checked every 1 ms, a publish comes at most a
            // millisecond late; as the next interval counts from there, the
            // period is still a little over 100 ms, and a client with queue
            // size 1 loses about 1 % of the changes (measured with
            // `opcua-bench`; checked every 10 ms: 6 %).
            builder = builder.subscription_poll_interval_ms(1);
        }
        if self.opts.bulk > 0 && !self.opts.default_limits {
            let items = usize::try_from(self.opts.bulk)
                .unwrap_or(usize::MAX)
                .saturating_add(TYPE_NODES.len() + TANK_NODES.len());
            let limits = builder.limits_mut();
            // Arrays in requests (the items of one CreateMonitoredItems).
            limits.max_array_length = limits.max_array_length.max(items);
            limits.subscriptions.max_monitored_items_per_sub = 0; // no limit
            limits.operational.max_monitored_items_per_call = items;
            limits.operational.max_nodes_per_read =
                limits.operational.max_nodes_per_read.max(items);
            limits.max_message_size = 64 << 20;
            limits.max_chunk_count = 0; // no limit but the size
        }
        let (server, handle): (Server, ServerHandle) = builder
            .build()
            .map_err(|e| anyhow::anyhow!("OPC UA simulator configuration: {e}"))?;
        let nodes = handle
            .node_managers()
            .get_of_type::<SimNodeManager>()
            .context("the simulator node manager is registered")?;
        let server = tokio::spawn(server.run_with(listener));
        let ticker = spawn_ticker(
            nodes.clone(),
            handle.clone(),
            self.shared.clone(),
            self.opts.bulk,
        );
        state.running = Some(Running {
            handle,
            nodes,
            server,
            ticker,
        });
        Ok(())
    }

    /// `opc.tcp://HOST:PORT/` with the advertised host (`127.0.0.1` by default).
    pub fn endpoint_url(&self) -> String {
        format!("opc.tcp://{}:{}/", self.advertised_host(), self.addr.port())
    }
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
    /// The application URI ([`APPLICATION_URI`]).
    pub fn application_uri(&self) -> &'static str {
        APPLICATION_URI
    }
    /// The server certificate, DER.
    pub fn server_cert_der(&self) -> Vec<u8> {
        self.cert_der.clone()
    }
    /// `<pki_dir>/own/cert.der` (DER).
    pub fn server_cert_path(&self) -> PathBuf {
        self.cert_path.clone()
    }
    /// The file name under which an async-opcua `CertificateStore` looks the
    /// certificate up in its `trusted/` folder:
    /// `"CN=twin-opcua-sim [<sha1 of the DER, lower-case hex>].der"` (the
    /// library's `cert_file_name`; the `CN=` prefix is really part of it).
    /// Under any other name the certificate is not found, even with the
    /// right content, and the client answers `BadCertificateUntrusted`.
    pub fn trust_file_name(&self) -> String {
        X509::from_der(&self.cert_der)
            .map(|c| CertificateStore::cert_file_name(&c))
            .unwrap_or_else(|_| format!("{CERT_COMMON_NAME}.der"))
    }
    /// Writes the certificate (DER) into `trusted_dir` under
    /// [`OpcUaSim::trust_file_name`] and returns the path. For an async-opcua
    /// client `trusted_dir` is `<client pki_dir>/trusted`.
    pub fn install_trust(&self, trusted_dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(trusted_dir)
            .with_context(|| format!("cannot create {}", trusted_dir.display()))?;
        let path = trusted_dir.join(self.trust_file_name());
        std::fs::write(&path, &self.cert_der)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// Write service operations addressed to a node of our namespace
    /// (accepted or refused: wrong type, read-only, unknown id), counted
    /// server-side since start, restarts included.
    pub fn write_count(&self) -> u64 {
        self.shared.write_count.load(Ordering::SeqCst)
    }
    /// Those operations, oldest first.
    pub fn writes(&self) -> Vec<SimWrite> {
        lock(&self.shared.writes).clone()
    }
    /// Stops (or resumes) `Tank1.Level` and `Tank1.Counter` (the bulk
    /// variables keep moving).
    pub fn freeze(&self, on: bool) {
        self.shared.frozen.store(on, Ordering::SeqCst);
    }
    /// Whether the server is running (not stopped).
    pub fn is_running(&self) -> bool {
        lock(&self.state).running.is_some()
    }

    /// The number of bulk variables.
    pub fn bulk(&self) -> u32 {
        self.opts.bulk
    }
    /// Whether the simulator has a variable with this string identifier.
    pub fn has_node(&self, node: &str) -> bool {
        start_value(node, self.opts.bulk).is_some()
    }

    /// Current value of a node given by its string identifier
    /// (`"Tank1.Level"`); `None` for an unknown node.
    pub fn value(&self, node: &str) -> Option<Variant> {
        self.data_value(node).and_then(|dv| dv.value)
    }
    /// Current value, status and timestamps of a node.
    pub fn data_value(&self, node: &str) -> Option<DataValue> {
        let state = lock(&self.state);
        match &state.running {
            Some(r) => read_node(&r.nodes, node),
            None => state
                .saved
                .iter()
                .find(|(n, _)| n == node)
                .map(|(_, dv)| dv.clone()),
        }
    }
    /// Sets a node's value (status Good, timestamps now) and notifies
    /// subscribers. Any type is accepted here, even one that does not match
    /// the DataType (a test may want exactly that); clients still get
    /// `BadTypeMismatch` for such writes.
    pub fn set_value(&self, node: &str, value: Variant) -> anyhow::Result<()> {
        self.set_data_value(node, DataValue::new_now(value))
    }
    /// Sets a node's status code, keeping its value (bad-quality tests).
    pub fn set_status(&self, node: &str, status: StatusCode) -> anyhow::Result<()> {
        let value = self.value(node).unwrap_or_default();
        self.set_data_value(node, DataValue::new_now_status(value, status))
    }
    /// Sets a node's whole data value and notifies subscribers.
    pub fn set_data_value(&self, node: &str, dv: DataValue) -> anyhow::Result<()> {
        if !self.has_node(node) {
            bail!("the OPC UA simulator has no node {node:?}");
        }
        let mut state = lock(&self.state);
        match &state.running {
            Some(r) => {
                let id = NodeId::new(r.nodes.inner().ns, node);
                r.nodes
                    .set_value(r.handle.subscriptions(), &id, None, dv)
                    .map_err(|e| anyhow::anyhow!("cannot set {node}: {e}"))?;
            }
            None => {
                if let Some(slot) = state.saved.iter_mut().find(|(n, _)| n == node) {
                    slot.1 = dv;
                }
            }
        }
        Ok(())
    }

    /// Stops the server: closes the listener and every connection (sessions
    /// and subscriptions are lost), keeps the values. Idempotent.
    pub async fn stop(&self) {
        let running = {
            let mut state = lock(&self.state);
            let Some(running) = state.running.take() else {
                return;
            };
            running.ticker.abort();
            state.saved = all_nodes(self.opts.bulk)
                .filter_map(|n| read_node(&running.nodes, &n).map(|dv| (n, dv)))
                .collect();
            running
        };
        running.handle.cancel();
        let _ = running.ticker.await;
        let mut server = running.server;
        if tokio::time::timeout(Duration::from_secs(5), &mut server)
            .await
            .is_err()
        {
            server.abort();
            let _ = server.await;
        }
    }

    /// Starts the server again after [`OpcUaSim::stop`] (stopping it first
    /// if needed) on the same port, with the same certificate and the
    /// values it had. Retries for a few seconds while the port is busy.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.stop().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(e).with_context(|| {
                        format!("OPC UA simulator cannot listen again on {}", self.addr)
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        self.launch(listener)
    }
}

impl Drop for OpcUaSim {
    fn drop(&mut self) {
        if let Some(r) = lock(&self.state).running.take() {
            r.ticker.abort();
            r.handle.cancel();
        }
    }
}

fn read_node(nodes: &SimNodeManager, node: &str) -> Option<DataValue> {
    let id = NodeId::new(nodes.inner().ns, node);
    let space = nodes.address_space().read();
    match space.find(&id)? {
        NodeType::Variable(v) => Some(v.value(
            TimestampsToReturn::Both,
            &NumericRange::None,
            &DataEncoding::Binary,
            0.0,
        )),
        _ => None,
    }
}

fn spawn_ticker(
    nodes: Arc<SimNodeManager>,
    handle: ServerHandle,
    shared: Arc<Shared>,
    bulk: u32,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let first = tick.tick().await;
        let first_ticks = DateTime::now().ticks();
        let ns = nodes.inner().ns;
        let counter_id = NodeId::new(ns, "Tank1.Counter");
        let level_id = NodeId::new(ns, "Tank1.Level");
        let bulk_ids: Vec<NodeId> = (0..bulk).map(|i| NodeId::new(ns, bulk_node(i))).collect();
        // After a restart the bulk values continue from where they stopped.
        let mut bulk_tick = match read_node(&nodes, &bulk_node(0)).and_then(|dv| dv.value) {
            Some(Variant::Double(v)) if v.is_finite() && v >= 0.0 => v.round() as u64,
            _ => 0,
        };
        loop {
            let at = tick.tick().await;
            if !shared.frozen.load(Ordering::SeqCst) {
                let counter = match read_node(&nodes, "Tank1.Counter").and_then(|dv| dv.value) {
                    Some(Variant::UInt32(c)) => c.wrapping_add(1),
                    _ => 0,
                };
                let now = DateTime::now();
                let _ = nodes.set_values(
                    handle.subscriptions(),
                    [
                        (&counter_id, None, DataValue::new_at(counter, now)),
                        (&level_id, None, DataValue::new_at(level_at(counter), now)),
                    ]
                    .into_iter(),
                );
            }
            if !bulk_ids.is_empty() {
                bulk_tick += 1;
                // Stamped with the scheduled time of the tick, not the time
                // the task ran: ticks are never less than 100 ms apart, so a
                // monitored item sampling every 100 ms lets every change
                // through (the server holds back a value stamped less than a
                // sampling interval after the previous one and delivers it
                // later, shifting its timestamp).
                let offset = i64::try_from(at.duration_since(first).as_nanos() / 100)
                    .unwrap_or(i64::MAX / 2);
                let ts = DateTime::from(first_ticks.saturating_add(offset));
                let _ = nodes.set_values(
                    handle.subscriptions(),
                    bulk_ids
                        .iter()
                        .zip(0u32..)
                        .map(|(id, i)| (id, None, DataValue::new_at(bulk_value(bulk_tick, i), ts))),
                );
            }
        }
    })
}

/// Host names every simulator certificate carries after the application URI.
const BASE_HOST_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// Reuses `<pki>/own/cert.der` + `<pki>/private/private.pem` when they fit
/// the options, otherwise makes new ones. Returns the DER and its path.
fn ensure_certificate(opts: &OpcUaSimOptions) -> anyhow::Result<(Vec<u8>, PathBuf)> {
    let cert_path = opts.pki_dir.join("own").join("cert.der");
    let key_path = opts.pki_dir.join("private").join("private.pem");
    for sub in ["own", "private", "trusted", "rejected"] {
        let dir = opts.pki_dir.join(sub);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let hosts: Vec<&str> = BASE_HOST_NAMES
        .into_iter()
        .chain(opts.host_names.iter().map(String::as_str))
        .collect();
    if key_path.exists() {
        if let Ok(der) = std::fs::read(&cert_path) {
            if let Ok(cert) = X509::from_der(&der) {
                let expired = cert.is_time_valid(&chrono_now()).is_err();
                let fits = expired == opts.expired_cert
                    && cert.is_application_uri_valid(APPLICATION_URI).is_ok()
                    && hosts.iter().all(|h| cert.is_hostname_valid(h).is_ok());
                if fits {
                    return Ok((der, cert_path));
                }
            }
        }
    }
    let (der, key_pem) =
        make_certificate(APPLICATION_URI, CERT_COMMON_NAME, &hosts, opts.expired_cert)?;
    write_private(&key_path, key_pem.as_bytes())?;
    std::fs::write(&cert_path, &der)
        .with_context(|| format!("cannot write {}", cert_path.display()))?;
    Ok((der, cert_path))
}

fn chrono_now() -> opcua::types::DateTimeUtc {
    DateTime::now().as_chrono()
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A self-signed OPC UA application instance certificate (RSA 2048,
/// SHA-256): SAN = [`application_uri`, hosts...] in that order (OPC UA
/// stacks, async-opcua included, take the first SAN entry as the URI),
/// key usages digitalSignature, nonRepudiation, keyEncipherment,
/// dataEncipherment, keyCertSign; extended key usages serverAuth and
/// clientAuth; CA:FALSE. Valid from an hour ago for a year, or from 30
/// days ago to yesterday when `expired`. Returns (DER, PKCS#8 PEM key).
pub fn make_certificate(
    application_uri: &str,
    common_name: &str,
    hosts: &[&str],
    expired: bool,
) -> anyhow::Result<(Vec<u8>, String)> {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType, SerialNumber,
    };
    let key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).context("RSA key generation")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, MANUFACTURER_NAME);
    params.distinguished_name = dn;
    let mut sans = vec![SanType::URI(
        application_uri
            .try_into()
            .context("application URI is not ASCII")?,
    )];
    for h in hosts {
        sans.push(match h.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName((*h).try_into().context("host name is not ASCII")?),
        });
    }
    params.subject_alt_names = sans;
    let now = time::OffsetDateTime::now_utc();
    (params.not_before, params.not_after) = if expired {
        (
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        )
    } else {
        (
            now - time::Duration::hours(1),
            now + time::Duration::days(365),
        )
    };
    params.serial_number = Some(SerialNumber::from(rand::random::<u64>() >> 1));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::ContentCommitment,
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::DataEncipherment,
        KeyUsagePurpose::KeyCertSign,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let cert = params.self_signed(&key).context("self-signing")?;
    Ok((cert.der().to_vec(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use opcua::client::{ClientBuilder, IdentityToken, Session};
    use opcua::types::{ReadValueId, VariableId, WriteValue};

    const USER: &str = "operator";
    const PASSWORD: &str = "tank-secret";

    fn sim_opts(dir: &Path) -> OpcUaSimOptions {
        OpcUaSimOptions::new(dir.join("server-pki")).user(USER, PASSWORD)
    }

    struct TestClient {
        session: Arc<Session>,
        event_loop: JoinHandle<StatusCode>,
    }

    impl TestClient {
        async fn close(self) {
            let _ = self.session.disconnect().await;
            let _ = self.event_loop.await;
        }
    }

    /// Connects with a fresh client (its key made with rcgen: the library's
    /// own generator is pure-Rust RSA and slow in debug builds).
    async fn connect(
        sim: &OpcUaSim,
        dir: &Path,
        policy: SecurityPolicy,
        mode: MessageSecurityMode,
        identity: IdentityToken,
    ) -> Result<TestClient, StatusCode> {
        connect_with_retries(sim, dir, policy, mode, identity, 0).await
    }

    async fn connect_with_retries(
        sim: &OpcUaSim,
        dir: &Path,
        policy: SecurityPolicy,
        mode: MessageSecurityMode,
        identity: IdentityToken,
        retries: i32,
    ) -> Result<TestClient, StatusCode> {
        let pki = dir.join(format!("client-pki-{}", rand::random::<u32>()));
        let client_uri = "urn:twin-gateway:opcua-sim:test-client";
        let (der, key) =
            make_certificate(client_uri, "sim-test-client", &["localhost"], false).unwrap();
        std::fs::create_dir_all(pki.join("own")).unwrap();
        std::fs::create_dir_all(pki.join("private")).unwrap();
        std::fs::write(pki.join("own/cert.der"), der).unwrap();
        std::fs::write(pki.join("private/private.pem"), key).unwrap();
        let mut client = ClientBuilder::new()
            .application_name("sim-test-client")
            .application_uri(client_uri)
            .pki_dir(&pki)
            .create_sample_keypair(false)
            // Fine for the simulator's own tests; the gateway never does this.
            .trust_server_certs(true)
            .session_retry_limit(retries)
            .session_retry_initial(Duration::from_millis(100))
            .session_retry_max(Duration::from_millis(500))
            .request_timeout(Duration::from_secs(5))
            // Room for the bulk test's 1500 monitored items in one response.
            .max_array_length(1 << 16)
            .client()
            .unwrap();
        let url = sim.endpoint_url();
        let (session, event_loop) = client
            .connect_to_matching_endpoint((url.as_str(), policy.to_str(), mode), identity)
            .await
            .map_err(|e| e.status())?;
        // The session event loop, driven by hand: after a reconnect that
        // recreated (or transferred) subscriptions, async-opcua 0.19 sends
        // no Publish until something triggers one (its subscription loop
        // starts idle and the recreation's trigger fired before it
        // existed), so kick it on every `Reconnected`.
        let s2 = session.clone();
        let mut event_loop = tokio::spawn(async move {
            use futures_util::TryStreamExt as _;
            use opcua::client::SessionPollResult;
            let stream = event_loop.enter();
            tokio::pin!(stream);
            loop {
                match stream.try_next().await {
                    Ok(None) => return StatusCode::Good,
                    Err(e) => return e,
                    Ok(Some(SessionPollResult::Reconnected(_))) => s2.trigger_publish_now(),
                    Ok(Some(_)) => {}
                }
            }
        });
        tokio::select! {
            _ = session.wait_for_connection() => Ok(TestClient { session, event_loop }),
            r = &mut event_loop => Err(r.unwrap_or(StatusCode::BadUnexpectedError)),
            _ = tokio::time::sleep(Duration::from_secs(20)) => Err(StatusCode::BadTimeout),
        }
    }

    fn user() -> IdentityToken {
        IdentityToken::new_user_name(USER, PASSWORD)
    }

    fn node(ns: u16, id: &str) -> NodeId {
        NodeId::new(ns, id)
    }

    async fn ns_index(session: &Session) -> u16 {
        let v = read(session, VariableId::Server_NamespaceArray.into()).await;
        let Some(Variant::Array(a)) = v.value else {
            panic!("namespace array: {v:?}")
        };
        a.values
            .iter()
            .position(|u| matches!(u, Variant::String(s) if s.as_ref() == NAMESPACE_URI))
            .expect("our namespace is published") as u16
    }

    async fn read(session: &Session, id: NodeId) -> DataValue {
        let rv = ReadValueId {
            node_id: id,
            attribute_id: AttributeId::Value as u32,
            ..Default::default()
        };
        session
            .read(&[rv], TimestampsToReturn::Both, 0.0)
            .await
            .unwrap()
            .remove(0)
    }

    async fn write(session: &Session, id: NodeId, v: Variant) -> StatusCode {
        let wv = WriteValue {
            node_id: id,
            attribute_id: AttributeId::Value as u32,
            index_range: Default::default(),
            value: DataValue::value_only(v),
        };
        session.write(&[wv]).await.unwrap()[0]
    }

    #[tokio::test]
    async fn secure_session_reads_types_and_writes_the_setpoint() {
        let dir = tempfile::tempdir().unwrap();
        let sim = OpcUaSim::start(sim_opts(dir.path())).await.unwrap();
        assert!(sim.endpoint_url().starts_with("opc.tcp://127.0.0.1:"));
        let c = connect(
            &sim,
            dir.path(),
            SecurityPolicy::Basic256Sha256,
            MessageSecurityMode::SignAndEncrypt,
            user(),
        )
        .await
        .unwrap();
        let ns = ns_index(&c.session).await;

        let int32 = read(&c.session, node(ns, "Types.Int32")).await;
        assert_eq!(int32.value, Some(Variant::Int32(-123_456)));
        for n in TYPE_NODES {
            let dv = read(&c.session, node(ns, n)).await;
            assert_eq!(dv.value, initial_value(n), "{n}");
        }

        let s = write(
            &c.session,
            node(ns, "Tank1.Setpoint"),
            Variant::Double(3.75),
        )
        .await;
        assert_eq!(s, StatusCode::Good);
        assert_eq!(sim.write_count(), 1);
        assert_eq!(sim.value("Tank1.Setpoint"), Some(Variant::Double(3.75)));
        let back = read(&c.session, node(ns, "Tank1.Setpoint")).await;
        assert_eq!(back.value, Some(Variant::Double(3.75)));

        // Wrong type, read-only, unknown: refused, but counted as attempts.
        let s = write(&c.session, node(ns, "Tank1.Setpoint"), Variant::Int32(3)).await;
        assert_eq!(s, StatusCode::BadTypeMismatch);
        let s = write(&c.session, node(ns, "Tank1.Mode"), Variant::UInt32(1)).await;
        assert_eq!(s, StatusCode::BadTypeMismatch);
        let s = write(&c.session, node(ns, "Types.Int32"), Variant::Int32(1)).await;
        assert_eq!(s, StatusCode::BadNotWritable);
        let s = write(&c.session, node(ns, "Tank1.Nope"), Variant::Int32(1)).await;
        assert_eq!(s, StatusCode::BadNodeIdUnknown);
        assert_eq!(sim.value("Tank1.Setpoint"), Some(Variant::Double(3.75)));
        assert_eq!(sim.value("Types.Int32"), Some(Variant::Int32(-123_456)));
        let s = write(&c.session, node(ns, "Tank1.Pump"), Variant::Boolean(true)).await;
        assert_eq!(s, StatusCode::Good);
        assert_eq!(sim.write_count(), 6);
        let log = sim.writes();
        assert_eq!(log[0].node, "Tank1.Setpoint");
        assert_eq!(log[1].status, StatusCode::BadTypeMismatch);
        assert_eq!(log[5].value, Variant::Boolean(true));

        // BuildInfo for the inventory.
        let name = read(
            &c.session,
            VariableId::Server_ServerStatus_BuildInfo_ProductName.into(),
        )
        .await;
        assert_eq!(name.value, Some(Variant::from(PRODUCT_NAME)));
        let maker = read(
            &c.session,
            VariableId::Server_ServerStatus_BuildInfo_ManufacturerName.into(),
        )
        .await;
        assert_eq!(maker.value, Some(Variant::from(MANUFACTURER_NAME)));
        let version = read(
            &c.session,
            VariableId::Server_ServerStatus_BuildInfo_SoftwareVersion.into(),
        )
        .await;
        assert_eq!(version.value, Some(Variant::from(SOFTWARE_VERSION)));

        // The tank moves.
        let c0 = read(&c.session, node(ns, "Tank1.Counter")).await.value;
        tokio::time::sleep(Duration::from_millis(350)).await;
        let c1 = read(&c.session, node(ns, "Tank1.Counter")).await.value;
        match (c0, c1) {
            (Some(Variant::UInt32(a)), Some(Variant::UInt32(b))) => assert!(b >= a + 2, "{a} {b}"),
            other => panic!("counter: {other:?}"),
        }
        let Some(Variant::Double(level)) = sim.value("Tank1.Level") else {
            panic!("level")
        };
        assert!((1.0..=4.0).contains(&level));
        c.close().await;
    }

    #[tokio::test]
    async fn restart_keeps_port_certificate_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let sim = OpcUaSim::start(sim_opts(dir.path())).await.unwrap();
        let url = sim.endpoint_url();
        let cert = sim.server_cert_der();
        sim.set_value("Tank1.Mode", Variant::UInt16(2)).unwrap();
        sim.stop().await;
        assert!(!sim.is_running());
        assert!(std::net::TcpStream::connect(sim.addr()).is_err());
        assert_eq!(sim.value("Tank1.Mode"), Some(Variant::UInt16(2)));
        sim.set_value("Tank1.Setpoint", Variant::Double(1.5))
            .unwrap();
        let Some(Variant::UInt32(counter)) = sim.value("Tank1.Counter") else {
            panic!("counter")
        };

        sim.restart().await.unwrap();
        assert_eq!(sim.endpoint_url(), url);
        assert_eq!(sim.server_cert_der(), cert);
        assert_eq!(std::fs::read(sim.server_cert_path()).unwrap(), cert);
        let c = connect(
            &sim,
            dir.path(),
            SecurityPolicy::Aes256Sha256RsaPss,
            MessageSecurityMode::SignAndEncrypt,
            user(),
        )
        .await
        .unwrap();
        let ns = ns_index(&c.session).await;
        let mode = read(&c.session, node(ns, "Tank1.Mode")).await;
        assert_eq!(mode.value, Some(Variant::UInt16(2)));
        let sp = read(&c.session, node(ns, "Tank1.Setpoint")).await;
        assert_eq!(sp.value, Some(Variant::Double(1.5)));
        match read(&c.session, node(ns, "Tank1.Counter")).await.value {
            Some(Variant::UInt32(c)) => assert!(c >= counter, "{c} < {counter}"),
            other => panic!("counter: {other:?}"),
        }
        c.close().await;

        // A new handle on the same PKI reuses the certificate.
        drop(sim);
        let again = OpcUaSim::start(sim_opts(dir.path())).await.unwrap();
        assert_eq!(again.server_cert_der(), cert);
    }

    #[tokio::test]
    async fn a_subscription_resumes_after_restart() {
        use opcua::client::DataChangeCallback;
        let dir = tempfile::tempdir().unwrap();
        let sim = OpcUaSim::start(sim_opts(dir.path())).await.unwrap();
        let c = connect_with_retries(
            &sim,
            dir.path(),
            SecurityPolicy::Basic256Sha256,
            MessageSecurityMode::Sign,
            user(),
            20,
        )
        .await
        .unwrap();
        let ns = ns_index(&c.session).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sub = c
            .session
            .create_subscription(
                Duration::from_millis(100),
                100,
                10,
                0,
                0,
                true,
                DataChangeCallback::new(move |dv, _| {
                    let _ = tx.send(dv.value);
                }),
            )
            .await
            .unwrap();
        let created = c
            .session
            .create_monitored_items(
                sub,
                TimestampsToReturn::Both,
                vec![node(ns, "Tank1.Counter").into()],
            )
            .await
            .unwrap();
        assert!(created[0].result.status_code.is_good());
        async fn next_counter(
            rx: &mut tokio::sync::mpsc::UnboundedReceiver<Option<Variant>>,
        ) -> u32 {
            match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                Ok(Some(Some(Variant::UInt32(c)))) => c,
                other => panic!("no counter notification: {other:?}"),
            }
        }
        let first = next_counter(&mut rx).await;
        let second = next_counter(&mut rx).await;
        assert!(second > first);

        sim.stop().await;
        let Some(Variant::UInt32(at_stop)) = sim.value("Tank1.Counter") else {
            panic!("counter")
        };
        while rx.try_recv().is_ok() {}
        sim.restart().await.unwrap();
        // The client reconnects, fails to reactivate its session on the new
        // server, creates a new one and recreates the subscription; values
        // above `at_stop` can only come from the restarted server.
        let resumed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let c = next_counter(&mut rx).await;
                if c > at_stop {
                    break c;
                }
            }
        })
        .await
        .expect("notifications resume after the restart");
        assert!(resumed > second);
        c.close().await;
    }

    #[tokio::test]
    async fn bulk_variables_change_every_tick_and_fit_one_subscription() {
        use opcua::client::DataChangeCallback;
        use opcua::types::MonitoredItemCreateRequest;
        // More than async-opcua's default limit of 1000 monitored items per
        // call and per subscription.
        const N: u32 = 1500;
        let dir = tempfile::tempdir().unwrap();
        let sim = OpcUaSim::start(sim_opts(dir.path()).bulk(N)).await.unwrap();
        assert_eq!(sim.bulk(), N);
        assert!(sim.has_node("Bulk.0") && sim.has_node("Bulk.1499"));
        assert!(!sim.has_node("Bulk.1500") && !sim.has_node("Bulk.01"));
        assert!(sim.has_node("Tank1.Level"));
        let c = connect(
            &sim,
            dir.path(),
            SecurityPolicy::Basic256Sha256,
            MessageSecurityMode::SignAndEncrypt,
            user(),
        )
        .await
        .unwrap();
        let ns = ns_index(&c.session).await;
        let tick_of = |i: u32, v: &Option<Variant>| -> u64 {
            let Some(Variant::Double(v)) = v else {
                panic!("Bulk.{i}: {v:?}")
            };
            let tick = (v - f64::from(i) * 0.001).round();
            assert_eq!(bulk_value(tick as u64, i), *v, "Bulk.{i}");
            tick as u64
        };
        let first = tick_of(7, &read(&c.session, node(ns, "Bulk.7")).await.value);
        // Read-only, and the tank is unchanged beside it.
        let s = write(&c.session, node(ns, "Bulk.7"), Variant::Double(1.0)).await;
        assert_eq!(s, StatusCode::BadNotWritable);
        let dv = read(&c.session, node(ns, "Types.Int32")).await;
        assert_eq!(dv.value, Some(Variant::Int32(-123_456)));

        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sub = c
            .session
            .create_subscription(
                Duration::from_millis(100),
                100,
                10,
                0,
                0,
                true,
                DataChangeCallback::new(move |dv, item| {
                    let _ = tx.send((item.client_handle(), dv.value));
                }),
            )
            .await
            .unwrap();
        let items: Vec<MonitoredItemCreateRequest> = (0..N)
            .map(|i| {
                let mut r: MonitoredItemCreateRequest = node(ns, &bulk_node(i)).into();
                r.requested_parameters.client_handle = i + 1;
                r.requested_parameters.sampling_interval = 100.0;
                r.requested_parameters.queue_size = 1;
                r
            })
            .collect();
        let created = c
            .session
            .create_monitored_items(sub, TimestampsToReturn::Both, items)
            .await
            .unwrap();
        assert_eq!(created.len(), N as usize);
        assert!(created.iter().all(|c| c.result.status_code.is_good()));
        // Every item reports, every report is a newer tick.
        let mut last = vec![None::<u64>; N as usize];
        let mut changes = vec![0u32; N as usize];
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Some((handle, value))) = tokio::time::timeout_at(until, rx.recv()).await {
            let i = handle - 1;
            let tick = tick_of(i, &value);
            let slot = &mut last[i as usize];
            if let Some(prev) = *slot {
                assert!(tick > prev, "Bulk.{i}: tick {tick} after {prev}");
                changes[i as usize] += 1;
            }
            *slot = Some(tick);
        }
        for i in 0..N {
            assert!(
                changes[i as usize] >= 3,
                "Bulk.{i} changed {} times",
                changes[i as usize]
            );
        }
        assert!(last[7].unwrap() > first);
        c.close().await;

        // A restart keeps the ticks going from where they were.
        sim.stop().await;
        let at_stop = tick_of(0, &sim.value("Bulk.0"));
        sim.restart().await.unwrap();
        tokio::time::sleep(Duration::from_millis(350)).await;
        let now = tick_of(0, &sim.value("Bulk.0"));
        assert!(now > at_stop, "{now} <= {at_stop}");
        // (A tick may fall between the two reads.)
        assert!(tick_of(N - 1, &sim.value("Bulk.1499")).abs_diff(now) <= 1);
    }

    #[tokio::test]
    async fn wrong_password_and_anonymous_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sim = OpcUaSim::start(sim_opts(dir.path())).await.unwrap();
        let bad = IdentityToken::new_user_name(USER, "wrong");
        let err = connect(
            &sim,
            dir.path(),
            SecurityPolicy::Basic256Sha256,
            MessageSecurityMode::SignAndEncrypt,
            bad,
        )
        .await
        .err()
        .expect("a wrong password is refused");
        assert!(
            [
                StatusCode::BadIdentityTokenRejected,
                StatusCode::BadUserAccessDenied
            ]
            .contains(&err),
            "{err}"
        );
        let err = connect(
            &sim,
            dir.path(),
            SecurityPolicy::Basic256Sha256,
            MessageSecurityMode::Sign,
            IdentityToken::Anonymous,
        )
        .await
        .err()
        .expect("anonymous is refused");
        // The client finds no anonymous token policy on the endpoint and
        // does not even try.
        assert_eq!(err, StatusCode::BadSecurityPolicyRejected);
        assert_eq!(sim.write_count(), 0);
    }

    #[tokio::test]
    async fn none_only_with_anonymous_access() {
        let dir = tempfile::tempdir().unwrap();
        let opts = OpcUaSimOptions::new(dir.path().join("pki"))
            .security(SimSecurity::NoneOnly)
            .anonymous(true);
        let sim = OpcUaSim::start(opts).await.unwrap();
        sim.freeze(true);
        let c = connect(
            &sim,
            dir.path(),
            SecurityPolicy::None,
            MessageSecurityMode::None,
            IdentityToken::Anonymous,
        )
        .await
        .unwrap();
        let ns = ns_index(&c.session).await;
        sim.set_status("Tank1.Level", StatusCode::BadSensorFailure)
            .unwrap();
        let dv = read(&c.session, node(ns, "Tank1.Level")).await;
        assert_eq!(dv.status(), StatusCode::BadSensorFailure);
        let s = write(&c.session, node(ns, "Tank1.Mode"), Variant::UInt16(3)).await;
        assert_eq!(s, StatusCode::Good);
        assert_eq!(sim.value("Tank1.Mode"), Some(Variant::UInt16(3)));
        c.close().await;

        // No secure endpoint is offered.
        let err = connect(
            &sim,
            dir.path(),
            SecurityPolicy::Basic256Sha256,
            MessageSecurityMode::SignAndEncrypt,
            IdentityToken::Anonymous,
        )
        .await
        .err()
        .expect("no secure endpoint");
        // async-opcua's answer when no endpoint matches the policy and mode.
        assert_eq!(err, StatusCode::BadTcpEndpointUrlInvalid);
    }

    #[tokio::test]
    async fn basic128rsa15_only() {
        let dir = tempfile::tempdir().unwrap();
        let sim = OpcUaSim::start(sim_opts(dir.path()).security(SimSecurity::Basic128Rsa15Only))
            .await
            .unwrap();
        let c = connect(
            &sim,
            dir.path(),
            SecurityPolicy::Basic128Rsa15,
            MessageSecurityMode::SignAndEncrypt,
            user(),
        )
        .await
        .unwrap();
        let ns = ns_index(&c.session).await;
        let dv = read(&c.session, node(ns, "Types.String")).await;
        assert_eq!(dv.value, Some(Variant::from("batch-42")));
        c.close().await;
        let err = connect(
            &sim,
            dir.path(),
            SecurityPolicy::Basic256Sha256,
            MessageSecurityMode::SignAndEncrypt,
            user(),
        )
        .await
        .err()
        .expect("Basic256Sha256 is not offered");
        // async-opcua's answer when no endpoint matches the policy and mode.
        assert_eq!(err, StatusCode::BadTcpEndpointUrlInvalid);
    }

    #[tokio::test]
    async fn certificate_names_and_expired_certificate_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sim = OpcUaSim::start(sim_opts(dir.path())).await.unwrap();
        let cert = X509::from_der(&sim.server_cert_der()).unwrap();
        cert.is_application_uri_valid(APPLICATION_URI).unwrap();
        cert.is_hostname_valid("127.0.0.1").unwrap();
        cert.is_hostname_valid("localhost").unwrap();
        cert.is_time_valid(&chrono_now()).unwrap();
        assert_eq!(cert.key_length().unwrap(), 2048);
        let name = sim.trust_file_name();
        let thumb = cert.thumbprint().as_hex_string();
        assert_eq!(name, format!("CN=twin-opcua-sim [{thumb}].der"));
        let trusted = dir.path().join("client/trusted");
        let path = sim.install_trust(&trusted).unwrap();
        assert_eq!(std::fs::read(path).unwrap(), sim.server_cert_der());
        drop(sim);

        let mut opts = OpcUaSimOptions::new(dir.path().join("expired-pki")).user(USER, PASSWORD);
        opts.expired_cert = true;
        let sim = OpcUaSim::start(opts).await.unwrap();
        let cert = X509::from_der(&sim.server_cert_der()).unwrap();
        assert!(cert.is_time_valid(&chrono_now()).is_err());
        let err = connect(
            &sim,
            dir.path(),
            SecurityPolicy::Basic256Sha256,
            MessageSecurityMode::SignAndEncrypt,
            user(),
        )
        .await
        .err()
        .expect("an expired server certificate is refused by a verifying client");
        assert_eq!(err, StatusCode::BadCertificateTimeInvalid);
    }
}
