//! The connection owner: one task per device, the only holder of the
//! tokio-modbus [`Context`].
//!
//! tokio-modbus has no request timeout and no reconnect, and matches a
//! reply to the request only by what arrives next on the socket. So:
//! - every call (connect and each request) runs under `request_timeout`;
//! - at most one request is outstanding (the cycle awaits each in turn);
//! - after a timeout, a transport error or a protocol error (header or
//!   function code mismatch, wrong length) the context is dropped and a new
//!   connection is made, after a capped exponential backoff with jitter
//!   that resets after a cycle without such a failure. A late reply to the
//!   old request can then never be taken as the reply to a new one.
//! - a Modbus exception is a valid reply: the connection is kept.
//!
//! The run loop is a `select!` over shutdown, the connect attempt, the
//! poll tick and write requests. A write request (carrying a policy
//! permit) is served between cycles on the same context, so writes and
//! polls never have two requests in flight: optionally a read of the tag to
//! check the operator's expected value, then one write (FC 5 for a coil,
//! FC 6 for one register, FC 16 for a multi-register value, never split),
//! then a read-back compared register by register with what was written.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{interval, sleep_until, timeout, Instant, MissedTickBehavior};
use tokio_modbus::client::{Client as _, Context};
use tokio_modbus::{ExceptionCode, Request, Response, Slave};
use tracing::{debug, info, warn};
use twin_model::sample::reason;
use twin_model::{Sample, Value};

use super::codec::{self, Encoded, Raw};
use super::exception_reason;
use super::plan::{self, Limits, Plan, ReadRequest};
use crate::backoff::Backoff;
use crate::clock::now_ms;
use crate::config::{Area, ModbusDeviceConfig, ModbusTag};
use crate::device::{
    write_code, DeviceContext, DeviceEvent, WriteFailure, WriteReport, WriteRequest,
};
use crate::policy::WritePermit;

/// A Modbus TCP device driver: the typed config plus its read plan.
///
/// ```no_run
/// # async fn example(cfg: gateway::config::ModbusDeviceConfig, ctx: gateway::device::DeviceContext) {
/// tokio::spawn(gateway::device::modbus::ModbusDriver::new(cfg).run(ctx));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ModbusDriver {
    cfg: ModbusDeviceConfig,
    plan: Plan,
}

impl ModbusDriver {
    /// Plans the reads of `cfg` (see [`plan`](super::plan)).
    pub fn new(cfg: ModbusDeviceConfig) -> Self {
        let plan = plan::plan(&cfg.tags, Limits::from_config(&cfg));
        ModbusDriver { cfg, plan }
    }

    /// The read requests of one poll cycle.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Polls the device until `ctx.shutdown` is cancelled (or the receiver
    /// of `ctx.out` is gone), sending one [`DeviceEvent`] per poll interval
    /// with one sample per tag, in configuration order. Never returns an
    /// error: device faults become bad-quality samples.
    pub async fn run(self, ctx: DeviceContext) {
        let ModbusDriver { cfg, plan } = self;
        for &(index, why) in &plan.unreadable {
            if let Some(tag) = cfg.tags.get(index) {
                warn!(device = %cfg.name, tag = %tag.name, %why, "tag cannot be read; it stays bad");
            }
        }
        let mut owner = Owner {
            cycle: Cycle::new(&cfg, plan),
            link: None,
            // A zero minimum would retry a refusing device in a tight loop.
            backoff: Backoff::new(
                cfg.reconnect_min.max(MIN_RECONNECT_DELAY),
                cfg.reconnect_max,
            ),
            next_connect: Instant::now(),
            outage_logged: false,
            stats: Default::default(),
            notices: Default::default(),
            identify_gave_up: false,
            mismatch: None,
            cfg,
        };
        owner.run(ctx).await;
    }
}

/// The shortest wait between two connect attempts, whatever the config says.
const MIN_RECONNECT_DELAY: Duration = Duration::from_millis(10);

type ConnectFuture = Pin<Box<dyn Future<Output = Result<Context, ConnectError>> + Send>>;

/// Why a connect attempt failed.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    #[error("`{0}` resolves to no address")]
    NoAddress(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Why a connection was given up during a cycle.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("transport error: {0}")]
    Transport(io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The reply's MBAP header carries another unit id than the request:
    /// something other than the configured device answered.
    #[error("a reply came from unit id {answered}, not from the configured unit ({detail})")]
    ForeignUnit { answered: u8, detail: String },
}

impl LinkError {
    /// The reason code of the tags this failure left unread.
    fn reason(&self) -> &'static str {
        match self {
            LinkError::Timeout(_) => reason::TIMEOUT,
            LinkError::Transport(_) => reason::DISCONNECTED,
            LinkError::Protocol(_) | LinkError::ForeignUnit { .. } => reason::PROTOCOL_ERROR,
        }
    }
}

/// A reply the connection survives.
#[derive(Debug)]
enum Reply {
    Registers(Vec<u16>),
    Bits(Vec<bool>),
    Exception(ExceptionCode),
}

/// The connection owner's state.
struct Owner {
    cfg: ModbusDeviceConfig,
    cycle: Cycle,
    /// The only holder of the connection.
    link: Option<Context>,
    backoff: Backoff,
    /// When the next connect attempt may start.
    next_connect: Instant,
    /// Whether the current outage has been logged at warn already.
    outage_logged: bool,
    stats: std::sync::Arc<crate::metrics::DeviceStats>,
    notices: crate::device::Notices,
    /// Set when the device let an identification request time out: it is
    /// not asked again (the reply might still come and confuse a read).
    identify_gave_up: bool,
    /// Why the device is not read: it does not identify itself as
    /// `expect_identity` requires. Checked again at every connection.
    mismatch: Option<String>,
}

impl Owner {
    async fn run(&mut self, ctx: DeviceContext) {
        let DeviceContext {
            shutdown,
            out,
            mut writes,
            notices,
            stats,
        } = ctx;
        self.stats = stats;
        self.notices = notices;
        let mut writes_open = true;
        info!(device = %self.cfg.name, address = %self.cfg.address, "modbus driver starting");

        // The first attempt completes before the first poll, so a reachable
        // device does not start with a round of disconnected samples.
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            res = connect(self.cfg.address.clone(), self.cfg.unit_id, self.cfg.request_timeout) => {
                self.connected(res);
            }
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            () = self.identify() => {}
        }

        let mut connecting: Option<ConnectFuture> = None;
        let mut ticks = interval(self.cfg.poll_interval.max(Duration::from_millis(1)));
        ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            let down = self.link.is_none();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                res = async {
                    match connecting.as_mut() {
                        Some(attempt) => attempt.await,
                        None => std::future::pending().await,
                    }
                }, if connecting.is_some() => {
                    connecting = None;
                    self.connected(res);
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => break,
                        () = self.identify() => {}
                    }
                }
                () = sleep_until(self.next_connect), if down && connecting.is_none() => {
                    connecting = Some(Box::pin(connect(
                        self.cfg.address.clone(),
                        self.cfg.unit_id,
                        self.cfg.request_timeout,
                    )));
                }
                _ = ticks.tick() => {
                    let started = Instant::now();
                    let samples = match self.link.as_mut() {
                        Some(link) => {
                            // Dropping the cycle mid-request is fine: the
                            // connection is dropped with it.
                            let (samples, failure) = tokio::select! {
                                biased;
                                () = shutdown.cancelled() => break,
                                done = self.cycle.run(link) => done,
                            };
                            let exception = samples.iter().any(|s| {
                                s.reason
                                    .as_deref()
                                    .is_some_and(|r| r.starts_with(reason::MODBUS_EXCEPTION_PREFIX))
                            });
                            self.stats.read(started.elapsed(), failure.is_none() && !exception);
                            if exception {
                                self.stats.exceptions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            if failure.is_none() {
                                // It answered (an exception is an answer too).
                                self.stats.last_seen_ms.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
                            }
                            if matches!(failure, Some(LinkError::Timeout(_))) {
                                self.stats.timeouts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            match failure {
                                None => self.backoff.reset(),
                                Some(e) => self.lost(&e),
                            }
                            samples
                        }
                        None => {
                            self.stats.read(Duration::ZERO, false);
                            let why = match self.mismatch {
                                Some(_) => reason::IDENTITY_MISMATCH,
                                None => reason::DISCONNECTED,
                            };
                            self.cycle.all_bad(why, now_ms())
                        }
                    };
                    let event = DeviceEvent {
                        device: self.cfg.name.clone(),
                        samples,
                        cycle_done: true,
                        command_id: None,
                    };
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => break,
                        sent = out.send(event) => if sent.is_err() {
                            info!(device = %self.cfg.name, "sample receiver gone; modbus driver stopping");
                            break;
                        },
                    }
                }
                request = writes.recv(), if writes_open => {
                    let Some(WriteRequest { permit, expect, reply }) = request else {
                        writes_open = false;
                        continue;
                    };
                    let command_id = permit.command_id().to_owned();
                    let result = tokio::select! {
                        biased;
                        () = shutdown.cancelled() => break,
                        r = self.write(permit, expect) => r,
                    };
                    self.stats.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if result.is_err() {
                        self.stats.write_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    if let Ok((_, sample)) = &result {
                        let event = DeviceEvent {
                            device: self.cfg.name.clone(),
                            samples: vec![sample.clone()],
                            cycle_done: false,
                            command_id: Some(command_id),
                        };
                        // The read-back joins the uplink like any sample
                        // (and names the command in the reported twin).
                        tokio::select! {
                            biased;
                            () = shutdown.cancelled() => break,
                            sent = out.send(event) => if sent.is_err() { break },
                        }
                    }
                    let _ = reply.send(result.map(|(report, _)| report));
                }
            }
        }
        // Dropping the context closes the socket.
        self.link = None;
        info!(device = %self.cfg.name, "modbus driver stopped");
    }

    /// Serves one permitted write: check `expect`, write, read back.
    async fn write(
        &mut self,
        permit: WritePermit,
        expect: Option<Value>,
    ) -> Result<(WriteReport, Sample), WriteFailure> {
        let tag = crate::device::writable_tag(&self.cfg.name, &self.cfg.tags, &permit, |t| {
            (t.name.as_str(), t.writable)
        })?
        .clone();
        let encoded = codec::encode(&tag, permit.value())
            .map_err(|e| WriteFailure::new(write_code::ENCODE_ERROR, e.to_string(), false))?;
        let Some(link) = self.link.as_mut() else {
            return Err(WriteFailure::new(
                write_code::DEVICE_UNAVAILABLE,
                format!("device `{}` is not connected", self.cfg.name),
                false,
            ));
        };
        let limit = self.cfg.request_timeout;
        let read_req = ReadRequest {
            area: tag.area,
            start: tag.address,
            count: tag.data_type.width(),
            slots: Vec::new(),
        };
        if let Some(expect) = expect {
            let now = match read_tag(link, &read_req, &tag, limit).await {
                Ok((value, _)) => value,
                Err(f) => return Err(self.write_failed(f, false)),
            };
            if now != expect {
                return Err(WriteFailure {
                    readback: Some(now.clone()),
                    ..WriteFailure::new(
                        write_code::EXPECT_MISMATCH,
                        format!(
                            "tag `{}` holds {now}, not the expected {expect}; nothing was written",
                            tag.name
                        ),
                        false,
                    )
                });
            }
        }
        let request = match (&encoded, tag.area) {
            (Encoded::Bits(bits), Area::Coil) if bits.len() == 1 => {
                Request::WriteSingleCoil(tag.address, bits.first().copied().unwrap_or(false))
            }
            (Encoded::Bits(bits), Area::Coil) => {
                Request::WriteMultipleCoils(tag.address, bits.clone().into())
            }
            (Encoded::Registers(regs), Area::HoldingRegister) if regs.len() == 1 => {
                Request::WriteSingleRegister(tag.address, regs.first().copied().unwrap_or(0))
            }
            (Encoded::Registers(regs), Area::HoldingRegister) => {
                Request::WriteMultipleRegisters(tag.address, regs.clone().into())
            }
            _ => {
                return Err(WriteFailure::new(
                    write_code::READ_ONLY_TAG,
                    format!(
                        "tag `{}` lives in {:?}, which cannot be written",
                        tag.name, tag.area
                    ),
                    false,
                ))
            }
        };
        let function = request.function_code().value();
        match timeout(limit, link.call(request)).await {
            Err(_) => return Err(self.write_failed(LinkError::Timeout(limit).into(), true)),
            Ok(Err(tokio_modbus::Error::Transport(e))) => {
                return Err(self.write_failed(LinkError::Transport(e).into(), true))
            }
            Ok(Err(tokio_modbus::Error::Protocol(e))) => {
                return Err(self.write_failed(protocol_error(e).into(), true))
            }
            Ok(Ok(Err(code))) => {
                warn!(device = %self.cfg.name, tag = %tag.name, exception = %exception_reason(code), "modbus write answered with an exception");
                return Err(WriteFailure::new(
                    write_code::DEVICE_EXCEPTION,
                    format!(
                        "the device refused the write (FC {function}): {}",
                        exception_reason(code)
                    ),
                    false,
                ));
            }
            Ok(Ok(Ok(response))) if response.function_code().value() != function => {
                let e = LinkError::Protocol(format!(
                    "reply with function code {} to a write with {function}",
                    response.function_code().value()
                ));
                return Err(self.write_failed(e.into(), true));
            }
            Ok(Ok(Ok(_))) => {}
        }
        let link = match self.link.as_mut() {
            Some(link) => link,
            None => {
                return Err(WriteFailure::new(
                    write_code::DEVICE_UNAVAILABLE,
                    "the connection was lost after the write",
                    true,
                ))
            }
        };
        let (readback, raw) = match read_tag(link, &read_req, &tag, limit).await {
            Ok(r) => r,
            Err(f) => return Err(self.write_failed(f, true)),
        };
        let ts_ms = now_ms();
        let same = match (&encoded, &raw) {
            (Encoded::Registers(w), Reply::Registers(r)) => w == r,
            (Encoded::Bits(w), Reply::Bits(r)) => w == r,
            _ => false,
        };
        if !same {
            return Err(WriteFailure {
                readback: Some(readback.clone()),
                ..WriteFailure::new(
                    write_code::READBACK_MISMATCH,
                    format!(
                        "tag `{}` reads back {readback} after writing {}",
                        tag.name,
                        permit.value()
                    ),
                    true,
                )
            });
        }
        info!(device = %self.cfg.name, tag = %tag.name, value = %readback, command = permit.command_id(), rule = permit.rule(), "command written and confirmed");
        Ok((
            WriteReport {
                readback: readback.clone(),
                frames: 1,
            },
            Sample::good(&tag.name, readback, ts_ms),
        ))
    }

    /// Turns a failure during a write into its report; a failure that
    /// ends the connection drops it, as during a poll.
    fn write_failed(&mut self, f: TagReadError, written: bool) -> WriteFailure {
        match f {
            TagReadError::Link(e) => {
                let code = match &e {
                    LinkError::Timeout(_) => write_code::TIMEOUT,
                    LinkError::Transport(_) => write_code::TRANSPORT_ERROR,
                    LinkError::Protocol(_) | LinkError::ForeignUnit { .. } => {
                        write_code::PROTOCOL_ERROR
                    }
                };
                let reason = e.to_string();
                self.lost(&e);
                WriteFailure::new(code, reason, written)
            }
            TagReadError::Exception(code) => WriteFailure::new(
                write_code::DEVICE_EXCEPTION,
                format!(
                    "reading the tag was answered with {}",
                    exception_reason(code)
                ),
                written,
            ),
            TagReadError::Decode(why) => {
                WriteFailure::new(write_code::READBACK_MISMATCH, why, written)
            }
        }
    }

    /// Reads the device's identity (FC 43/14) on a fresh connection and
    /// reports it for the inventory. An exception means "not supported"
    /// and keeps the connection; no answer drops it (a late reply could
    /// be taken for the next read's) and the device is not asked again.
    async fn identify(&mut self) {
        if self.link.is_none() {
            return;
        }
        if !self.cfg.identify || self.identify_gave_up {
            return self.verify_identity(None);
        }
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let limit = self.cfg.request_timeout;
        match read_identity(link, limit).await {
            Ok(identity) => {
                debug!(device = %self.cfg.name, objects = identity.fields.len(), "modbus device identity read");
                self.verify_identity(Some(&identity));
                self.notices.identity(&self.cfg.name, Ok(identity));
            }
            Err(IdentityError::Exception(code)) => {
                debug!(device = %self.cfg.name, exception = %exception_reason(code), "modbus device does not support identification");
                self.notices.identity(
                    &self.cfg.name,
                    Err(format!("not_supported ({})", exception_reason(code))),
                );
                self.verify_identity(None);
            }
            Err(IdentityError::Link(e)) => {
                if matches!(e, LinkError::Timeout(_)) {
                    warn!(device = %self.cfg.name, "the device did not answer Read Device Identification; it is not asked again (set identify = false to skip it)");
                    self.identify_gave_up = true;
                    self.notices
                        .identity(&self.cfg.name, Err("no_answer".to_owned()));
                }
                self.lost(&e);
            }
        }
    }

    /// With `expect_identity`, a device that reports another identity (or
    /// none) is not read: the connection is closed, its tags are bad with
    /// `identity_mismatch`, and the next connection (after
    /// `reconnect_max_ms`) checks again.
    fn verify_identity(&mut self, reported: Option<&twin_model::inventory::DeviceIdentity>) {
        match crate::device::check_identity(self.cfg.expect_identity.as_ref(), reported) {
            Ok(()) => {
                if self.mismatch.take().is_some() {
                    info!(device = %self.cfg.name, "the device identifies itself as expected again");
                }
            }
            Err(why) => {
                if self.mismatch.as_deref() != Some(why.as_str()) {
                    warn!(device = %self.cfg.name, %why, "NOT READ: the device does not identify itself as expect_identity requires");
                }
                self.mismatch = Some(why);
                self.link = None;
                self.stats
                    .connected
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                self.next_connect = Instant::now() + self.cfg.reconnect_max;
            }
        }
    }

    /// Takes the result of a connect attempt.
    fn connected(&mut self, res: Result<Context, ConnectError>) {
        match res {
            Ok(link) => {
                info!(device = %self.cfg.name, address = %self.cfg.address, "modbus device connected");
                self.link = Some(link);
                self.stats
                    .connected
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                self.stats
                    .connects
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.outage_logged = false;
            }
            Err(e) => {
                let delay = self.backoff.next_delay();
                self.next_connect = Instant::now() + delay;
                if self.outage_logged {
                    debug!(device = %self.cfg.name, error = %e, retry_in = ?delay, "modbus connect failed");
                } else {
                    warn!(device = %self.cfg.name, address = %self.cfg.address, error = %e, retry_in = ?delay, "modbus connect failed");
                    self.outage_logged = true;
                }
            }
        }
    }

    /// Drops the connection after a failure and schedules the reconnect.
    fn lost(&mut self, e: &LinkError) {
        if let LinkError::ForeignUnit { answered, detail } = e {
            if *answered != self.cfg.unit_id {
                self.notices.foreign_reply(
                    &self.cfg.name,
                    format!("unit {answered}"),
                    format!(
                        "{} asked unit {} and unit {answered} answered ({detail})",
                        self.cfg.address, self.cfg.unit_id
                    ),
                );
            }
        }
        self.link = None;
        self.stats
            .connected
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let delay = self.backoff.next_delay();
        self.next_connect = Instant::now() + delay;
        warn!(device = %self.cfg.name, reason = %e, reconnect_in = ?delay, "modbus connection dropped");
        self.outage_logged = true;
    }
}

/// One poll cycle over a connection: the planned requests and their tags.
struct Cycle {
    tags: Vec<ModbusTag>,
    plan: Plan,
    timeout: Duration,
    device: String,
    /// The exception last answered to each request, to log changes only.
    exceptions: Vec<Option<ExceptionCode>>,
}

impl Cycle {
    fn new(cfg: &ModbusDeviceConfig, plan: Plan) -> Self {
        Cycle {
            exceptions: vec![None; plan.requests.len()],
            tags: cfg.tags.clone(),
            plan,
            timeout: cfg.request_timeout,
            device: cfg.name.clone(),
        }
    }

    /// Every tag bad with `why`.
    fn all_bad(&self, why: &str, ts_ms: u64) -> Vec<Sample> {
        self.tags
            .iter()
            .map(|t| Sample::bad(&t.name, why, ts_ms))
            .collect()
    }

    /// Sends the planned requests one at a time. Returns one sample per tag
    /// (configuration order) and the failure that ends the connection, if
    /// any; the failed request and every later one carry its reason.
    async fn run(&mut self, link: &mut Context) -> (Vec<Sample>, Option<LinkError>) {
        let mut samples: Vec<Option<Sample>> = vec![None; self.tags.len()];
        let mut failure: Option<LinkError> = None;
        for (index, req) in self.plan.requests.iter().enumerate() {
            let mut mark = |why: &str, ts_ms: u64| {
                for slot in &req.slots {
                    if let (Some(out), Some(tag)) =
                        (samples.get_mut(slot.tag), self.tags.get(slot.tag))
                    {
                        *out = Some(Sample::bad(&tag.name, why, ts_ms));
                    }
                }
            };
            if let Some(e) = &failure {
                mark(e.reason(), now_ms());
                continue;
            }
            let reply = timeout(self.timeout, read(link, req)).await;
            let ts_ms = now_ms();
            let reply = match reply {
                Err(_) => Err(LinkError::Timeout(self.timeout)),
                Ok(r) => r,
            };
            let last = self.exceptions.get_mut(index);
            match reply {
                Err(e) => {
                    mark(e.reason(), ts_ms);
                    failure = Some(e);
                }
                Ok(Reply::Exception(code)) => {
                    mark(&exception_reason(code), ts_ms);
                    if let Some(last) = last {
                        if *last != Some(code) {
                            warn!(device = %self.device, area = ?req.area, start = req.start, count = req.count,
                                exception = %exception_reason(code), "modbus read answered with an exception");
                            *last = Some(code);
                        }
                    }
                }
                Ok(reply) => {
                    if let Some(last) = last {
                        if let Some(code) = last.take() {
                            info!(device = %self.device, area = ?req.area, start = req.start,
                                was = %exception_reason(code), "modbus read answered again");
                        }
                    }
                    for slot in &req.slots {
                        let (Some(out), Some(tag)) =
                            (samples.get_mut(slot.tag), self.tags.get(slot.tag))
                        else {
                            continue;
                        };
                        let at = usize::from(slot.offset);
                        let raw = match &reply {
                            Reply::Registers(words) => {
                                Raw::Registers(words.get(at..).unwrap_or(&[]))
                            }
                            Reply::Bits(bits) => Raw::Bits(bits.get(at..).unwrap_or(&[])),
                            Reply::Exception(_) => continue,
                        };
                        *out = Some(codec::decode(tag, raw, ts_ms));
                    }
                }
            }
        }
        // Tags no request carries (see `plan::Unreadable`).
        let ts_ms = now_ms();
        let samples = samples
            .into_iter()
            .zip(&self.tags)
            .map(|(s, tag)| {
                s.unwrap_or_else(|| Sample::bad(&tag.name, reason::PROTOCOL_ERROR, ts_ms))
            })
            .collect();
        (samples, failure)
    }
}

/// Why reading one tag (for a write) failed.
enum TagReadError {
    Link(LinkError),
    Exception(ExceptionCode),
    Decode(String),
}

impl From<LinkError> for TagReadError {
    fn from(e: LinkError) -> Self {
        TagReadError::Link(e)
    }
}

/// Reads one tag under `limit`: its value and the raw reply.
async fn read_tag(
    link: &mut Context,
    req: &ReadRequest,
    tag: &ModbusTag,
    limit: Duration,
) -> Result<(Value, Reply), TagReadError> {
    let reply = match timeout(limit, read(link, req)).await {
        Err(_) => return Err(LinkError::Timeout(limit).into()),
        Ok(Err(e)) => return Err(e.into()),
        Ok(Ok(Reply::Exception(code))) => return Err(TagReadError::Exception(code)),
        Ok(Ok(reply)) => reply,
    };
    let raw = match &reply {
        Reply::Registers(words) => Raw::Registers(words),
        Reply::Bits(bits) => Raw::Bits(bits),
        Reply::Exception(_) => return Err(TagReadError::Decode("no value".into())),
    };
    let value = codec::decode_value(tag, raw).map_err(|e| {
        TagReadError::Decode(format!("tag `{}` reads back no value: {e}", tag.name))
    })?;
    Ok((value, reply))
}

/// Why no identity was read.
enum IdentityError {
    /// The device refused the request (it does not support it).
    Exception(ExceptionCode),
    Link(LinkError),
}

/// Most requests one identity read may take (the stream continues while
/// the device says more follows).
const IDENTITY_MAX_REQUESTS: usize = 8;

/// Reads the regular identification objects (0x00-0x06), or the basic ones
/// (0x00-0x02) when the device only has those, following `more_follows`.
async fn read_identity(
    link: &mut Context,
    limit: Duration,
) -> Result<twin_model::inventory::DeviceIdentity, IdentityError> {
    use tokio_modbus::prelude::ReadCode;
    let mut code = ReadCode::Regular;
    let mut next: u8 = 0;
    let mut identity = twin_model::inventory::DeviceIdentity::default();
    for _ in 0..IDENTITY_MAX_REQUESTS {
        let reply = match timeout(
            limit,
            link.call(Request::ReadDeviceIdentification(code, next)),
        )
        .await
        {
            Err(_) => return Err(IdentityError::Link(LinkError::Timeout(limit))),
            Ok(Err(tokio_modbus::Error::Transport(e))) => {
                return Err(IdentityError::Link(LinkError::Transport(e)))
            }
            Ok(Err(tokio_modbus::Error::Protocol(e))) => {
                return Err(IdentityError::Link(protocol_error(e)))
            }
            // A device with basic identification only refuses the regular
            // read code with "illegal data value".
            Ok(Ok(Err(ExceptionCode::IllegalDataValue)))
                if code == ReadCode::Regular && identity.fields.is_empty() =>
            {
                code = ReadCode::Basic;
                next = 0;
                continue;
            }
            Ok(Ok(Err(e))) => return Err(IdentityError::Exception(e)),
            Ok(Ok(Ok(Response::ReadDeviceIdentification(reply)))) => reply,
            Ok(Ok(Ok(other))) => {
                return Err(IdentityError::Link(LinkError::Protocol(format!(
                    "reply with function code {} to Read Device Identification",
                    other.function_code().value()
                ))))
            }
        };
        for object in &reply.device_id_objects {
            if let Some(name) = identity_field(object.id) {
                identity
                    .fields
                    .insert(name.to_owned(), crate::device::printable(&object.value));
            }
        }
        // A device that says "more" but names an object already read
        // would loop: stop there.
        if !reply.more_follows || reply.next_object_id <= next {
            break;
        }
        next = reply.next_object_id;
    }
    Ok(identity)
}

/// The inventory name of a Modbus identification object (0x00-0x06);
/// extended and private objects are not kept.
fn identity_field(id: u8) -> Option<&'static str> {
    use twin_model::inventory::field;
    Some(match id {
        0x00 => field::VENDOR_NAME,
        0x01 => field::PRODUCT_CODE,
        0x02 => field::REVISION,
        0x03 => field::VENDOR_URL,
        0x04 => field::PRODUCT_NAME,
        0x05 => field::MODEL_NAME,
        0x06 => field::USER_APPLICATION_NAME,
        _ => return None,
    })
}

/// A protocol error of tokio-modbus as a [`LinkError`]. A header mismatch
/// whose reply carries another unit id becomes
/// [`LinkError::ForeignUnit`]: tokio-modbus reports the two headers only
/// in its message (`expected/request = Header { transaction_id: 1,
/// unit_id: 1 }, actual/response = Header { .., unit_id: 7 }`), so the
/// reply's unit id is taken from there.
fn protocol_error(e: tokio_modbus::ProtocolError) -> LinkError {
    let text = e.to_string();
    if let tokio_modbus::ProtocolError::HeaderMismatch { message, .. } = &e {
        let unit = |part: &str| -> Option<u8> {
            let rest = part.split("unit_id: ").nth(1)?;
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        if let Some((request, response)) = message.split_once("actual/response") {
            if let (Some(asked), Some(answered)) = (unit(request), unit(response)) {
                if asked != answered {
                    return LinkError::ForeignUnit {
                        answered,
                        detail: text,
                    };
                }
            }
        }
    }
    LinkError::Protocol(text)
}

/// Resolves `address` and opens the connection, all within `limit`.
async fn connect(address: String, unit_id: u8, limit: Duration) -> Result<Context, ConnectError> {
    let attempt = async {
        let mut last_error = None;
        for addr in tokio::net::lookup_host(address.as_str()).await? {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    // One small request, one small reply: never wait for Nagle.
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(%address, error = %e, "TCP_NODELAY not set");
                    }
                    return Ok(tokio_modbus::client::tcp::attach_slave(
                        stream,
                        Slave(unit_id),
                    ));
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(match last_error {
            Some(e) => ConnectError::Io(e),
            None => ConnectError::NoAddress(address.clone()),
        })
    };
    match timeout(limit, attempt).await {
        Ok(res) => res,
        Err(_) => Err(ConnectError::Timeout(limit)),
    }
}

/// Sends one read and checks that the reply fits the request.
async fn read(link: &mut Context, req: &ReadRequest) -> Result<Reply, LinkError> {
    let (start, count) = (req.start, req.count);
    let request = match req.area {
        Area::Coil => Request::ReadCoils(start, count),
        Area::DiscreteInput => Request::ReadDiscreteInputs(start, count),
        Area::InputRegister => Request::ReadInputRegisters(start, count),
        Area::HoldingRegister => Request::ReadHoldingRegisters(start, count),
    };
    let response = match link.call(request).await {
        Ok(Ok(response)) => response,
        Ok(Err(code)) => return Ok(Reply::Exception(code)),
        Err(tokio_modbus::Error::Transport(e)) => return Err(LinkError::Transport(e)),
        Err(tokio_modbus::Error::Protocol(e)) => return Err(protocol_error(e)),
    };
    let want = usize::from(count);
    match (req.area, response) {
        (Area::Coil, Response::ReadCoils(mut bits))
        | (Area::DiscreteInput, Response::ReadDiscreteInputs(mut bits)) => {
            // Bits come packed in bytes: up to 7 padding bits follow.
            if bits.len() < want {
                return Err(LinkError::Protocol(format!(
                    "{} bits answered to a read of {want}",
                    bits.len()
                )));
            }
            bits.truncate(want);
            Ok(Reply::Bits(bits))
        }
        (Area::InputRegister, Response::ReadInputRegisters(words))
        | (Area::HoldingRegister, Response::ReadHoldingRegisters(words)) => {
            if words.len() != want {
                return Err(LinkError::Protocol(format!(
                    "{} registers answered to a read of {want}",
                    words.len()
                )));
            }
            Ok(Reply::Registers(words))
        }
        (_, other) => Err(LinkError::Protocol(format!(
            "reply with function code {} to a read of {:?}",
            other.function_code().value(),
            req.area
        ))),
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn mismatch(asked: u8, answered: u8, tid: (u16, u16)) -> tokio_modbus::ProtocolError {
        tokio_modbus::ProtocolError::HeaderMismatch {
            message: format!(
                "expected/request = Header {{ transaction_id: {}, unit_id: {asked} }}, actual/response = Header {{ transaction_id: {}, unit_id: {answered} }}",
                tid.0, tid.1
            ),
            result: Ok(Response::ReadHoldingRegisters(vec![0])),
        }
    }

    #[test]
    fn a_reply_from_another_unit_is_a_foreign_unit_and_a_stale_transaction_is_not() {
        assert!(matches!(
            protocol_error(mismatch(1, 7, (3, 3))),
            LinkError::ForeignUnit { answered: 7, .. }
        ));
        assert!(matches!(
            protocol_error(mismatch(1, 1, (3, 2))),
            LinkError::Protocol(_)
        ));
        let other = tokio_modbus::ProtocolError::FunctionCodeMismatch {
            request: tokio_modbus::FunctionCode::ReadHoldingRegisters,
            result: Ok(Response::ReadCoils(vec![true])),
        };
        assert!(matches!(protocol_error(other), LinkError::Protocol(_)));
    }

    #[test]
    fn identification_objects_map_to_inventory_fields_and_others_are_dropped() {
        use twin_model::inventory::field;
        assert_eq!(identity_field(0), Some(field::VENDOR_NAME));
        assert_eq!(identity_field(2), Some(field::REVISION));
        assert_eq!(identity_field(6), Some(field::USER_APPLICATION_NAME));
        assert_eq!(identity_field(7), None);
        assert_eq!(identity_field(0x80), None);
        assert_eq!(
            crate::device::printable(b"AC\x00ME\x1b[31m \xff"),
            "ACME[31m \u{fffd}"
        );
        assert_eq!(crate::device::printable(&[b'x'; 400]).len(), 255);
    }
}
