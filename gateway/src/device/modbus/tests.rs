//! The driver against an in-process tokio-modbus TCP server with a shared
//! register bank and switchable faults (exceptions, silence, slow or short
//! replies, listener gone).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::sync::CancellationToken;
use twin_model::sample::reason;
use twin_model::{Quality, Value};

use super::ModbusDriver;
use crate::config::{Area, ByteOrder, DataType, ModbusDeviceConfig, ModbusTag};
use crate::device::{DeviceContext, DeviceEvent};

/// The simulated device memory and its faults.
#[derive(Debug, Default)]
struct Bank {
    holding: Vec<u16>,
    input: Vec<u16>,
    coils: Vec<bool>,
    discrete: Vec<bool>,
    /// Reads of this area are answered with this exception.
    exception: Option<(Area, ExceptionCode)>,
    /// Requests are read but never answered.
    silent: bool,
    /// Replies are sent this late.
    delay: Option<Duration>,
    /// Register reads are answered with one register too few.
    short: bool,
}

impl Bank {
    fn answer(&self, req: Request<'static>) -> Result<Response, ExceptionCode> {
        fn range<T: Clone>(v: &[T], start: u16, count: u16) -> Result<Vec<T>, ExceptionCode> {
            let start = usize::from(start);
            v.get(start..start + usize::from(count))
                .map(<[T]>::to_vec)
                .ok_or(ExceptionCode::IllegalDataAddress)
        }
        let area = match req {
            Request::ReadCoils(..) => Area::Coil,
            Request::ReadDiscreteInputs(..) => Area::DiscreteInput,
            Request::ReadInputRegisters(..) => Area::InputRegister,
            Request::ReadHoldingRegisters(..) => Area::HoldingRegister,
            _ => return Err(ExceptionCode::IllegalFunction),
        };
        if let Some((a, code)) = self.exception {
            if a == area {
                return Err(code);
            }
        }
        let short = |mut words: Vec<u16>| {
            if self.short {
                words.pop();
            }
            words
        };
        match req {
            Request::ReadCoils(s, n) => Ok(Response::ReadCoils(range(&self.coils, s, n)?)),
            Request::ReadDiscreteInputs(s, n) => {
                Ok(Response::ReadDiscreteInputs(range(&self.discrete, s, n)?))
            }
            Request::ReadInputRegisters(s, n) => Ok(Response::ReadInputRegisters(short(range(
                &self.input,
                s,
                n,
            )?))),
            Request::ReadHoldingRegisters(s, n) => Ok(Response::ReadHoldingRegisters(short(
                range(&self.holding, s, n)?,
            ))),
            _ => Err(ExceptionCode::IllegalFunction),
        }
    }
}

#[derive(Clone)]
struct Plc(Arc<Mutex<Bank>>);

impl tokio_modbus::server::Service for Plc {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let bank = self.0.lock().expect("bank lock not poisoned");
        if bank.silent {
            return Box::pin(std::future::pending());
        }
        let answer = bank.answer(req);
        match bank.delay {
            None => Box::pin(std::future::ready(answer)),
            Some(d) => Box::pin(async move {
                tokio::time::sleep(d).await;
                answer
            }),
        }
    }
}

/// A Modbus TCP server on 127.0.0.1 that can be stopped and restarted on
/// the same port.
struct TestServer {
    addr: SocketAddr,
    bank: Arc<Mutex<Bank>>,
    connections: Arc<AtomicUsize>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    async fn start(bank: Bank) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a free port");
        let addr = listener.local_addr().expect("bound address");
        let mut server = TestServer {
            addr,
            bank: Arc::new(Mutex::new(bank)),
            connections: Arc::new(AtomicUsize::new(0)),
            task: None,
        };
        server.serve(listener);
        server
    }

    fn serve(&mut self, listener: TcpListener) {
        let bank = self.bank.clone();
        let connections = self.connections.clone();
        self.task = Some(tokio::spawn(async move {
            let on_connected = |stream, peer| {
                let bank = bank.clone();
                connections.fetch_add(1, Ordering::SeqCst);
                async move {
                    accept_tcp_connection(stream, peer, move |_| {
                        Ok::<_, io::Error>(Some(Plc(bank.clone())))
                    })
                }
            };
            let _ = Server::new(listener).serve(&on_connected, |_| {}).await;
        }));
    }

    fn bank(&self) -> MutexGuard<'_, Bank> {
        self.bank.lock().expect("bank lock not poisoned")
    }

    /// Closes the listener and every open connection.
    async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("the same port again");
        self.serve(listener);
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Big-endian bytes as registers in `order` (written independently of the codec).
fn wire(be: &[u8], order: ByteOrder) -> Vec<u16> {
    let mut words: Vec<u16> = be
        .chunks(2)
        .map(|p| u16::from_be_bytes([p[0], p[1]]))
        .collect();
    if matches!(order, ByteOrder::Cdab | ByteOrder::Dcba) {
        words.reverse();
    }
    if matches!(order, ByteOrder::Badc | ByteOrder::Dcba) {
        words.iter_mut().for_each(|w| *w = w.swap_bytes());
    }
    words
}

fn put(regs: &mut [u16], at: usize, words: &[u16]) {
    regs[at..at + words.len()].copy_from_slice(words);
}

fn tag(name: &str, area: Area, address: u16, data_type: DataType, order: ByteOrder) -> ModbusTag {
    ModbusTag {
        name: name.into(),
        area,
        address,
        data_type,
        order,
        scale: None,
        offset: None,
        unit: None,
        writable: false,
    }
}

fn scaled(mut t: ModbusTag, scale: f64) -> ModbusTag {
    t.scale = Some(scale);
    t
}

/// The tags of `docs/tank-register-map.md`.
fn tank_tags() -> Vec<ModbusTag> {
    use Area::*;
    use ByteOrder::*;
    use DataType::*;
    vec![
        tag("tank1.level", HoldingRegister, 0, F32, Abcd),
        tag("tank1.inflow", HoldingRegister, 2, F32, Abcd),
        tag("tank1.outflow", HoldingRegister, 4, F32, Abcd),
        scaled(tag("tank1.temperature", HoldingRegister, 6, I16, Abcd), 0.1),
        scaled(
            tag("tank1.level_setpoint", HoldingRegister, 7, U16, Abcd),
            0.01,
        ),
        tag("tank1.mode", HoldingRegister, 8, U16, Abcd),
        tag("tank1.pump_runtime", HoldingRegister, 10, U64, Abcd),
        tag(
            "tank1.batch_id",
            HoldingRegister,
            14,
            String { registers: 8 },
            Abcd,
        ),
        tag("tank1.pump", Coil, 0, Bool, Abcd),
        tag("tank1.inlet_valve", Coil, 1, Bool, Abcd),
        tag("tank1.high_alarm", DiscreteInput, 0, Bool, Abcd),
        tag("tank1.low_alarm", DiscreteInput, 1, Bool, Abcd),
        tag("tank1.pressure", InputRegister, 0, F32, Cdab),
        tag("tank1.pump_starts", InputRegister, 2, U32, Dcba),
        tag("tank1.energy", InputRegister, 4, F64, Badc),
        scaled(
            tag("tank1.heater_power", InputRegister, 8, I32, Abcd),
            0.001,
        ),
    ]
}

/// The tank bank and the values the driver must read from it, in tag order.
fn tank_bank() -> (Bank, Vec<Value>) {
    use ByteOrder::*;
    let mut holding = vec![0u16; 22];
    put(&mut holding, 0, &wire(&1.5f32.to_be_bytes(), Abcd));
    put(&mut holding, 2, &wire(&2.25f32.to_be_bytes(), Abcd));
    put(&mut holding, 4, &wire(&0.75f32.to_be_bytes(), Abcd));
    put(&mut holding, 6, &wire(&(-123i16).to_be_bytes(), Abcd));
    put(&mut holding, 7, &[250]);
    put(&mut holding, 8, &[1]);
    put(&mut holding, 9, &[0xFFFF]); // reserved: read along, never decoded
    put(
        &mut holding,
        10,
        &wire(&0x0102_0304_0506_0708u64.to_be_bytes(), Abcd),
    );
    put(&mut holding, 14, &wire(b"B-0042\0\0\0\0\0\0\0\0\0\0", Abcd));
    let mut input = vec![0u16; 10];
    put(&mut input, 0, &wire(&1.25f32.to_be_bytes(), Cdab));
    put(&mut input, 2, &wire(&0x1122_3344u32.to_be_bytes(), Dcba));
    put(&mut input, 4, &wire(&12_345.678f64.to_be_bytes(), Badc));
    put(&mut input, 8, &wire(&(-1500i32).to_be_bytes(), Abcd));
    let bank = Bank {
        holding,
        input,
        coils: vec![true, false],
        discrete: vec![false, true],
        ..Bank::default()
    };
    let expected = vec![
        Value::Float(1.5),
        Value::Float(2.25),
        Value::Float(0.75),
        Value::Float(-123.0 * 0.1),
        Value::Float(250.0 * 0.01),
        Value::UInt(1),
        Value::UInt(0x0102_0304_0506_0708),
        Value::Text("B-0042".into()),
        Value::Bool(true),
        Value::Bool(false),
        Value::Bool(false),
        Value::Bool(true),
        Value::Float(1.25),
        Value::UInt(0x1122_3344),
        Value::Float(12_345.678),
        Value::Float(-1500.0 * 0.001),
    ];
    (bank, expected)
}

fn config(addr: SocketAddr) -> ModbusDeviceConfig {
    ModbusDeviceConfig {
        name: "tank-plc".into(),
        address: addr.to_string(),
        unit_id: 1,
        poll_interval: Duration::from_millis(50),
        request_timeout: Duration::from_millis(100),
        max_gap_registers: 4,
        max_registers_per_request: 125,
        max_bits_per_request: 2000,
        reconnect_min: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(100),
        identify: true,
        expect_identity: None,
        tags: tank_tags(),
    }
}

struct Running {
    rx: mpsc::Receiver<DeviceEvent>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

fn spawn(cfg: ModbusDeviceConfig) -> Running {
    let (tx, rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let ctx = DeviceContext {
        shutdown: shutdown.clone(),
        out: tx,
        // No writes in these tests: the closed queue is never served.
        writes: mpsc::channel(1).1,
        notices: Default::default(),
        stats: Default::default(),
    };
    let task = tokio::spawn(ModbusDriver::new(cfg).run(ctx));
    Running { rx, shutdown, task }
}

impl Running {
    /// The first event that satisfies `pred`, within 5 s.
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&DeviceEvent) -> bool) -> DeviceEvent {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let event = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no event with {what} within 5 s"))
                .expect("the driver is running");
            assert!(event.cycle_done);
            assert_eq!(event.samples.len(), tank_tags().len(), "one sample per tag");
            if pred(&event) {
                return event;
            }
        }
    }
}

fn all_reason(e: &DeviceEvent, why: &str) -> bool {
    e.samples
        .iter()
        .all(|s| s.quality == Quality::Bad && s.value.is_none() && s.reason.as_deref() == Some(why))
}

fn all_good(e: &DeviceEvent) -> bool {
    e.samples.iter().all(|s| s.quality == Quality::Good)
}

#[tokio::test]
async fn tank_values_decode_end_to_end_in_configuration_order() {
    let (bank, expected) = tank_bank();
    let server = TestServer::start(bank).await;
    let before = crate::clock::now_ms();
    let mut driver = spawn(config(server.addr));

    let event = driver.wait_for("any samples", |_| true).await;
    let after = crate::clock::now_ms();
    assert_eq!(event.device, "tank-plc");
    let names: Vec<_> = event.samples.iter().map(|s| s.tag.as_str()).collect();
    let configured: Vec<_> = tank_tags().into_iter().map(|t| t.name).collect();
    assert_eq!(names, configured);
    for (sample, value) in event.samples.iter().zip(expected) {
        assert_eq!(sample.quality, Quality::Good, "{sample:?}");
        assert_eq!(sample.value.as_ref(), Some(&value), "{}", sample.tag);
        assert!(sample.ts_ms >= before && sample.ts_ms <= after);
    }
    driver.shutdown.cancel();
}

#[tokio::test]
async fn an_exception_marks_only_the_tags_of_that_request_bad_and_keeps_the_connection() {
    let (mut bank, expected) = tank_bank();
    bank.exception = Some((Area::InputRegister, ExceptionCode::ServerDeviceBusy));
    let server = TestServer::start(bank).await;
    let mut driver = spawn(config(server.addr));

    let event = driver.wait_for("samples", |_| true).await;
    for (sample, t) in event.samples.iter().zip(tank_tags()) {
        if t.area == Area::InputRegister {
            assert_eq!(sample.quality, Quality::Bad, "{sample:?}");
            assert_eq!(sample.value, None);
            assert_eq!(
                sample.reason.as_deref(),
                Some("modbus_exception:server_device_busy")
            );
        } else {
            assert_eq!(sample.quality, Quality::Good, "{sample:?}");
        }
    }

    server.bank().exception = Some((Area::Coil, ExceptionCode::new(0x0C)));
    let event = driver
        .wait_for("a custom exception on coils", |e| {
            e.samples[8].reason.as_deref() == Some("modbus_exception:custom_0x0c")
        })
        .await;
    assert_eq!(
        event.samples[9].reason.as_deref(),
        Some("modbus_exception:custom_0x0c")
    );
    assert!(event.samples[12..]
        .iter()
        .all(|s| s.quality == Quality::Good));

    server.bank().exception = None;
    let event = driver.wait_for("all good again", all_good).await;
    let values: Vec<_> = event.samples.into_iter().map(|s| s.value).collect();
    assert_eq!(values, expected.into_iter().map(Some).collect::<Vec<_>>());
    assert_eq!(
        server.connections.load(Ordering::SeqCst),
        1,
        "never reconnected"
    );
    driver.shutdown.cancel();
}

#[tokio::test]
async fn a_silent_then_vanished_device_gives_timeout_then_disconnected_and_recovers_without_restart(
) {
    let (bank, _) = tank_bank();
    let mut server = TestServer::start(bank).await;
    let mut driver = spawn(config(server.addr));
    driver.wait_for("all good", all_good).await;

    server.bank().silent = true;
    driver
        .wait_for("every tag timed out", |e| all_reason(e, reason::TIMEOUT))
        .await;

    server.stop().await;
    driver
        .wait_for("every tag disconnected", |e| {
            all_reason(e, reason::DISCONNECTED)
        })
        .await;

    server.bank().silent = false;
    server.restart().await;
    driver
        .wait_for("all good after the restart", all_good)
        .await;
    assert!(!driver.task.is_finished());
    driver.shutdown.cancel();
}

#[tokio::test]
async fn a_late_reply_is_never_taken_for_the_next_request() {
    let (bank, expected) = tank_bank();
    let server = TestServer::start(bank).await;
    let mut driver = spawn(config(server.addr));
    driver.wait_for("all good", all_good).await;

    // Replies arrive after the timeout: the driver gives up the connection.
    server.bank().delay = Some(Duration::from_millis(150));
    driver
        .wait_for("a timeout", |e| all_reason(e, reason::TIMEOUT))
        .await;
    server.bank().delay = None;
    // Every good cycle afterwards has exactly the right values.
    for _ in 0..5 {
        let event = driver.wait_for("all good", all_good).await;
        let values: Vec<_> = event.samples.into_iter().map(|s| s.value).collect();
        assert_eq!(
            values,
            expected.iter().cloned().map(Some).collect::<Vec<_>>()
        );
    }
    assert!(
        server.connections.load(Ordering::SeqCst) >= 2,
        "reconnected"
    );
    driver.shutdown.cancel();
}

#[tokio::test]
async fn a_reply_of_the_wrong_length_is_a_protocol_error_and_forces_a_reconnect() {
    let (bank, _) = tank_bank();
    let server = TestServer::start(bank).await;
    let mut driver = spawn(config(server.addr));
    driver.wait_for("all good", all_good).await;

    server.bank().short = true;
    let event = driver
        .wait_for("a protocol error", |e| {
            e.samples[12].reason.as_deref() == Some(reason::PROTOCOL_ERROR)
        })
        .await;
    // Bits were read before the input registers; everything after failed.
    assert!(event.samples[8..12]
        .iter()
        .all(|s| s.quality == Quality::Good));
    assert!(event.samples[..8]
        .iter()
        .chain(&event.samples[12..])
        .all(|s| s.reason.as_deref() == Some(reason::PROTOCOL_ERROR)));

    server.bank().short = false;
    driver.wait_for("all good", all_good).await;
    assert!(
        server.connections.load(Ordering::SeqCst) >= 2,
        "reconnected"
    );
    driver.shutdown.cancel();
}

#[tokio::test]
async fn shutdown_stops_the_driver_during_an_unanswered_request() {
    let (bank, _) = tank_bank();
    let server = TestServer::start(bank).await;
    let mut cfg = config(server.addr);
    cfg.request_timeout = Duration::from_secs(2);
    let mut driver = spawn(cfg);
    driver.wait_for("all good", all_good).await;

    server.bank().silent = true;
    tokio::time::sleep(Duration::from_millis(150)).await; // a request is in flight
    let started = Instant::now();
    driver.shutdown.cancel();
    timeout(Duration::from_millis(500), driver.task)
        .await
        .expect("stopped well within the 2 s request timeout")
        .expect("no panic");
    assert!(started.elapsed() < Duration::from_millis(500));
}

#[tokio::test]
async fn shutdown_stops_the_driver_during_the_reconnect_backoff() {
    let (bank, _) = tank_bank();
    let mut server = TestServer::start(bank).await;
    let mut cfg = config(server.addr);
    cfg.reconnect_min = Duration::from_secs(10);
    cfg.reconnect_max = Duration::from_secs(10);
    server.stop().await;
    let mut driver = spawn(cfg);
    driver
        .wait_for("every tag disconnected", |e| {
            all_reason(e, reason::DISCONNECTED)
        })
        .await;
    driver.shutdown.cancel();
    timeout(Duration::from_millis(200), driver.task)
        .await
        .expect("stopped without waiting out the backoff")
        .expect("no panic");
}
