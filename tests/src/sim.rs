//! A Modbus TCP PLC simulator for tests, benchmarks and the demo.
//!
//! Two kinds of device:
//! - the **tank** of `docs/tank-register-map.md` (pump, inlet valve, heater),
//!   with a process model updated every 100 ms;
//! - a **bulk** bench device: holding registers `0..n` that all change every
//!   10 ms, counter-like, for throughput measurements.
//!
//! The register memory is the only source of truth: the process model reads
//! its inputs (setpoint, mode, pump, valve, level, ...) from the registers on
//! every tick, so a value set with [`PlcSim::set_holding`] or written over
//! Modbus is picked up by the model. [`PlcSim::freeze`] stops the model so
//! values stay put for exact comparisons.
//!
//! Faults are scripted through the handle: [`PlcSim::set_exception`] (every
//! read answered with an exception), [`PlcSim::set_unresponsive`] (requests
//! are read but never answered), [`PlcSim::set_response_delay`],
//! [`PlcSim::stop`] / [`PlcSim::restart`] (device gone and back on the same
//! port). Request frames are counted by kind so a test can prove that a
//! refused command produced zero write frames.
//!
//! Unit ids 1 (the configured one), 0 and 255 (the Modbus TCP "this device"
//! id) are answered; any other unit id gets `GatewayTargetDevice`.
//!
//! Function code 43 / MEI 14 (Read Device Identification) answers the
//! [`Identity`] held in the shared state, [`Identity::default_tank`] at
//! start: the basic objects 0x00-0x02 (vendor [`VENDOR`], product code
//! [`PRODUCT_CODE`], revision [`REVISION`]) and the regular objects
//! 0x03-0x05 that are present (vendor URL, product name, model name), with
//! stream access (read codes 1-3), individual access (read code 4) and
//! `more_follows` / `next_object_id` when the objects do not fit in one PDU.
//! [`PlcSim::set_identity`] swaps the identity as a firmware update would,
//! [`PlcSim::set_identification_supported`] makes FC 43 answer
//! `IllegalFunction` as many small PLCs do, and
//! [`PlcSim::identification_frames`] counts FC 43 requests.

use anyhow::Context as _;
use rand::{rngs::StdRng, Rng as _, SeedableRng as _};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_modbus::prelude::{
    ConformityLevel, DeviceIdObject, ReadCode, ReadDeviceIdentificationResponse,
};
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

/// Vendor name of [`Identity::default_tank`].
pub const VENDOR: &str = "Twin Gateway Project";
/// Product code of [`Identity::default_tank`].
pub const PRODUCT_CODE: &str = "TANK-SIM";
/// Revision of [`Identity::default_tank`] (the crate version).
pub const REVISION: &str = env!("CARGO_PKG_VERSION");
/// The unit id of the tank in the example configuration.
pub const UNIT_ID: u8 = 1;

/// Addresses of the tank tags (zero-based protocol addresses), as in
/// `docs/tank-register-map.md`.
pub mod tank {
    /// Holding registers.
    pub const LEVEL: u16 = 0;
    pub const INFLOW: u16 = 2;
    pub const OUTFLOW: u16 = 4;
    pub const TEMPERATURE: u16 = 6;
    pub const LEVEL_SETPOINT: u16 = 7;
    pub const MODE: u16 = 8;
    pub const PUMP_RUNTIME: u16 = 10;
    pub const BATCH_ID: u16 = 14;
    /// Registers of the batch id string.
    pub const BATCH_ID_REGISTERS: u16 = 8;
    /// Number of holding registers in the map (register 9 is reserved and reads 0).
    pub const HOLDING_COUNT: u16 = 22;
    /// Coils.
    pub const PUMP: u16 = 0;
    pub const INLET_VALVE: u16 = 1;
    pub const COIL_COUNT: u16 = 2;
    /// Discrete inputs.
    pub const HIGH_ALARM: u16 = 0;
    pub const LOW_ALARM: u16 = 1;
    pub const DISCRETE_COUNT: u16 = 2;
    /// Input registers.
    pub const PRESSURE: u16 = 0;
    pub const PUMP_STARTS: u16 = 2;
    pub const ENERGY: u16 = 4;
    pub const HEATER_POWER: u16 = 8;
    pub const INPUT_COUNT: u16 = 10;

    /// Tank height in metres; the largest accepted setpoint.
    pub const HEIGHT_M: f64 = 5.0;
    /// Level above which `high_alarm` is set.
    pub const HIGH_ALARM_M: f64 = 4.5;
    /// Level below which `low_alarm` is set.
    pub const LOW_ALARM_M: f64 = 0.5;
    /// Half width of the pump's hysteresis band around the setpoint.
    pub const PUMP_BAND_M: f64 = 0.2;
}

/// What the simulator answers to Read Device Identification (FC 43 / MEI 14).
///
/// The three basic objects are always present; each regular object is
/// present when it is `Some`. A value longer than
/// [`MAX_IDENTIFICATION_VALUE`] bytes is cut at a character boundary to that
/// length, since an object cannot be split across responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Object 0x00, VendorName (basic).
    pub vendor: String,
    /// Object 0x01, ProductCode (basic).
    pub product_code: String,
    /// Object 0x02, MajorMinorRevision (basic).
    pub revision: String,
    /// Object 0x03, VendorUrl (regular).
    pub vendor_url: Option<String>,
    /// Object 0x04, ProductName (regular).
    pub product_name: Option<String>,
    /// Object 0x05, ModelName (regular).
    pub model_name: Option<String>,
}

impl Identity {
    /// The tank's identity: [`VENDOR`], [`PRODUCT_CODE`], [`REVISION`],
    /// product name "Tank simulator", model name "TANK-1", no vendor URL.
    pub fn default_tank() -> Identity {
        Identity {
            vendor: VENDOR.to_owned(),
            product_code: PRODUCT_CODE.to_owned(),
            revision: REVISION.to_owned(),
            vendor_url: None,
            product_name: Some("Tank simulator".to_owned()),
            model_name: Some("TANK-1".to_owned()),
        }
    }

    /// The present objects in ascending id order, values cut to fit a PDU.
    fn objects(&self) -> Vec<DeviceIdObject> {
        let basic = [
            (object_id::VENDOR_NAME, Some(&self.vendor)),
            (object_id::PRODUCT_CODE, Some(&self.product_code)),
            (object_id::MAJOR_MINOR_REVISION, Some(&self.revision)),
        ];
        let regular = [
            (object_id::VENDOR_URL, self.vendor_url.as_ref()),
            (object_id::PRODUCT_NAME, self.product_name.as_ref()),
            (object_id::MODEL_NAME, self.model_name.as_ref()),
        ];
        basic
            .into_iter()
            .chain(regular)
            .filter_map(|(id, value)| {
                let value = value?;
                let mut end = value.len().min(MAX_IDENTIFICATION_VALUE);
                while !value.is_char_boundary(end) {
                    end -= 1;
                }
                Some(DeviceIdObject {
                    id,
                    value: value.as_bytes()[..end].to_vec().into(),
                })
            })
            .collect()
    }
}

/// Object ids of Read Device Identification (Modbus application protocol
/// 1.1b3, 6.21). Basic 0x00-0x02, regular 0x03-0x7F, extended 0x80-0xFF.
mod object_id {
    pub const VENDOR_NAME: u8 = 0x00;
    pub const PRODUCT_CODE: u8 = 0x01;
    pub const MAJOR_MINOR_REVISION: u8 = 0x02;
    pub const VENDOR_URL: u8 = 0x03;
    pub const PRODUCT_NAME: u8 = 0x04;
    pub const MODEL_NAME: u8 = 0x05;
    /// Last id of the basic category.
    pub const LAST_BASIC: u8 = 0x02;
    /// Last id of the regular category.
    pub const LAST_REGULAR: u8 = 0x7F;
}

/// Largest Modbus PDU (function code and data), in bytes.
const MAX_PDU: usize = 253;
/// Fixed part of a Read Device Identification response: function code, MEI
/// type, read code, conformity level, more follows, next object id, count.
const IDENTIFICATION_HEADER: usize = 7;
/// Longest identification object value: one object alone in one response
/// (id and length bytes after the fixed part).
pub const MAX_IDENTIFICATION_VALUE: usize = MAX_PDU - IDENTIFICATION_HEADER - 2;

/// Byte and word order of a multi-register value, named after the bytes of
/// a 32-bit value `A B C D` on the wire (same convention as the gateway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Big-endian throughout.
    Abcd,
    /// Bytes swapped inside each register.
    Badc,
    /// Registers in reverse order.
    Cdab,
    /// Little-endian throughout.
    Dcba,
}

/// Registers holding `be` (big-endian bytes, even length) in `order`.
pub fn encode(be: &[u8], order: Order) -> Vec<u16> {
    let mut regs: Vec<u16> = be
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
        .collect();
    if matches!(order, Order::Cdab | Order::Dcba) {
        regs.reverse();
    }
    if matches!(order, Order::Badc | Order::Dcba) {
        regs.iter_mut().for_each(|r| *r = r.swap_bytes());
    }
    regs
}

/// Big-endian bytes of the value held by `regs` in `order` (inverse of [`encode`]).
pub fn decode(regs: &[u16], order: Order) -> Vec<u8> {
    let mut regs = regs.to_vec();
    if matches!(order, Order::Badc | Order::Dcba) {
        regs.iter_mut().for_each(|r| *r = r.swap_bytes());
    }
    if matches!(order, Order::Cdab | Order::Dcba) {
        regs.reverse();
    }
    regs.iter().flat_map(|r| r.to_be_bytes()).collect()
}

/// Registers of an ASCII string, two bytes per register (big-endian), NUL padded.
pub fn encode_string(s: &str, registers: u16) -> Vec<u16> {
    let mut bytes = s.as_bytes().to_vec();
    bytes.resize(usize::from(registers) * 2, 0);
    encode(&bytes, Order::Abcd)
}

/// The string held by `regs` (two bytes per register, trailing NULs removed).
pub fn decode_string(regs: &[u16]) -> String {
    let bytes = decode(regs, Order::Abcd);
    let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn array<const N: usize>(v: Vec<u8>) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&v[..N]);
    out
}

/// Engineering values of the tank, decoded from the register memory.
#[derive(Debug, Clone, PartialEq)]
pub struct TankSnapshot {
    pub level: f32,
    pub inflow: f32,
    pub outflow: f32,
    /// degC (raw / 10).
    pub temperature: f64,
    /// m (raw / 100).
    pub level_setpoint: f64,
    pub mode: u16,
    pub pump_runtime: u64,
    pub batch_id: String,
    pub pump: bool,
    pub inlet_valve: bool,
    pub high_alarm: bool,
    pub low_alarm: bool,
    pub pressure: f32,
    pub pump_starts: u32,
    pub energy: f64,
    /// kW (raw / 1000).
    pub heater_power: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tank,
    Bulk,
}

/// The four Modbus data areas.
#[derive(Debug, Default)]
struct Memory {
    holding: Vec<u16>,
    input: Vec<u16>,
    coils: Vec<bool>,
    discrete: Vec<bool>,
}

impl Memory {
    fn tank() -> Self {
        let mut m = Memory {
            holding: vec![0; usize::from(tank::HOLDING_COUNT)],
            input: vec![0; usize::from(tank::INPUT_COUNT)],
            coils: vec![false; usize::from(tank::COIL_COUNT)],
            discrete: vec![false; usize::from(tank::DISCRETE_COUNT)],
        };
        m.put_f32(tank::LEVEL, 2.4, Order::Abcd);
        m.holding[usize::from(tank::TEMPERATURE)] = 195;
        m.holding[usize::from(tank::LEVEL_SETPOINT)] = 250;
        m.holding[usize::from(tank::MODE)] = 0;
        m.put_holding(tank::BATCH_ID, &encode_string(&batch_name(1), 8));
        m.coils[usize::from(tank::INLET_VALVE)] = true;
        m.put_f32_input(tank::PRESSURE, 1.25, Order::Cdab);
        m
    }

    fn put_holding(&mut self, addr: u16, regs: &[u16]) {
        let a = usize::from(addr);
        self.holding[a..a + regs.len()].copy_from_slice(regs);
    }
    fn put_input(&mut self, addr: u16, regs: &[u16]) {
        let a = usize::from(addr);
        self.input[a..a + regs.len()].copy_from_slice(regs);
    }
    fn holding_bytes(&self, addr: u16, n: u16, order: Order) -> Vec<u8> {
        let a = usize::from(addr);
        decode(&self.holding[a..a + usize::from(n)], order)
    }
    fn input_bytes(&self, addr: u16, n: u16, order: Order) -> Vec<u8> {
        let a = usize::from(addr);
        decode(&self.input[a..a + usize::from(n)], order)
    }
    fn f32(&self, addr: u16, order: Order) -> f32 {
        f32::from_be_bytes(array(self.holding_bytes(addr, 2, order)))
    }
    fn put_f32(&mut self, addr: u16, v: f32, order: Order) {
        self.put_holding(addr, &encode(&v.to_be_bytes(), order));
    }
    fn put_f32_input(&mut self, addr: u16, v: f32, order: Order) {
        self.put_input(addr, &encode(&v.to_be_bytes(), order));
    }

    fn snapshot(&self) -> TankSnapshot {
        use tank::*;
        let h = |a: u16| self.holding[usize::from(a)];
        TankSnapshot {
            level: self.f32(LEVEL, Order::Abcd),
            inflow: self.f32(INFLOW, Order::Abcd),
            outflow: self.f32(OUTFLOW, Order::Abcd),
            temperature: f64::from(h(TEMPERATURE) as i16) / 10.0,
            level_setpoint: f64::from(h(LEVEL_SETPOINT)) / 100.0,
            mode: h(MODE),
            pump_runtime: u64::from_be_bytes(array(self.holding_bytes(
                PUMP_RUNTIME,
                4,
                Order::Abcd,
            ))),
            batch_id: decode_string(
                &self.holding[usize::from(BATCH_ID)..usize::from(BATCH_ID + BATCH_ID_REGISTERS)],
            ),
            pump: self.coils[usize::from(PUMP)],
            inlet_valve: self.coils[usize::from(INLET_VALVE)],
            high_alarm: self.discrete[usize::from(HIGH_ALARM)],
            low_alarm: self.discrete[usize::from(LOW_ALARM)],
            pressure: f32::from_be_bytes(array(self.input_bytes(PRESSURE, 2, Order::Cdab))),
            pump_starts: u32::from_be_bytes(array(self.input_bytes(PUMP_STARTS, 2, Order::Dcba))),
            energy: f64::from_be_bytes(array(self.input_bytes(ENERGY, 4, Order::Badc))),
            heater_power: f64::from(i32::from_be_bytes(array(self.input_bytes(
                HEATER_POWER,
                2,
                Order::Abcd,
            )))) / 1000.0,
        }
    }
}

fn batch_name(n: u32) -> String {
    format!("BATCH-{n:06}")
}

/// State of the process model that the registers do not hold exactly.
struct Model {
    rng: StdRng,
    /// Temperature with more precision than the 0.1 degC register.
    temperature: f64,
    /// Raw temperature the model last wrote; anything else was set from outside.
    temperature_raw: u16,
    runtime_fraction: f64,
    pump_was_on: bool,
    heater_on: bool,
    batch: u32,
    ticks: u64,
}

/// Ticks of 100 ms between batch id changes (3 minutes).
const BATCH_TICKS: u64 = 1800;
/// Cross-section of the tank in m^2 (small, so the level visibly moves).
const AREA_M2: f64 = 0.5;

impl Model {
    fn new(mem: &Memory) -> Self {
        let raw = mem.holding[usize::from(tank::TEMPERATURE)];
        Model {
            rng: StdRng::from_os_rng(),
            temperature: f64::from(raw as i16) / 10.0,
            temperature_raw: raw,
            runtime_fraction: 0.0,
            pump_was_on: mem.coils[usize::from(tank::PUMP)],
            heater_on: false,
            batch: 1,
            ticks: 0,
        }
    }

    /// One step of `dt` seconds.
    fn step(&mut self, m: &mut Memory, dt: f64) {
        use tank::*;
        self.ticks += 1;
        let noise = |rng: &mut StdRng, amp: f64| rng.random_range(-amp..=amp);

        // Control: the pump follows the level in auto mode.
        let setpoint = f64::from(m.holding[usize::from(LEVEL_SETPOINT)]) / 100.0;
        let mut level = f64::from(m.f32(LEVEL, Order::Abcd));
        if !level.is_finite() {
            level = 0.0;
        }
        if m.holding[usize::from(MODE)] == 0 {
            if level < setpoint - PUMP_BAND_M {
                m.coils[usize::from(PUMP)] = true;
            } else if level > setpoint + PUMP_BAND_M {
                m.coils[usize::from(PUMP)] = false;
            }
        }
        let pump = m.coils[usize::from(PUMP)];
        let valve = m.coils[usize::from(INLET_VALVE)];

        // Flows (m3/h) and level.
        let inflow = match (pump, valve) {
            (true, true) => (12.0 + noise(&mut self.rng, 0.3)).max(0.0),
            (false, true) => (1.5 + noise(&mut self.rng, 0.1)).max(0.0),
            (_, false) => 0.0,
        };
        let outflow = if level > 0.0 {
            (6.0 * (level / 2.5).sqrt() + noise(&mut self.rng, 0.2)).max(0.0)
        } else {
            0.0
        };
        level = (level + (inflow - outflow) / 3600.0 * dt / AREA_M2).clamp(0.0, HEIGHT_M);
        m.put_f32(LEVEL, level as f32, Order::Abcd);
        m.put_f32(INFLOW, inflow as f32, Order::Abcd);
        m.put_f32(OUTFLOW, outflow as f32, Order::Abcd);
        m.discrete[usize::from(HIGH_ALARM)] = level > HIGH_ALARM_M;
        m.discrete[usize::from(LOW_ALARM)] = level < LOW_ALARM_M;

        // Pump counters.
        if pump && !self.pump_was_on {
            let starts = u32::from_be_bytes(array(m.input_bytes(PUMP_STARTS, 2, Order::Dcba)));
            m.put_input(
                PUMP_STARTS,
                &encode(&starts.wrapping_add(1).to_be_bytes(), Order::Dcba),
            );
        }
        self.pump_was_on = pump;
        if pump {
            self.runtime_fraction += dt;
            if self.runtime_fraction >= 1.0 {
                let whole = self.runtime_fraction.floor();
                self.runtime_fraction -= whole;
                let runtime =
                    u64::from_be_bytes(array(m.holding_bytes(PUMP_RUNTIME, 4, Order::Abcd)));
                m.put_holding(
                    PUMP_RUNTIME,
                    &encode(&(runtime + whole as u64).to_be_bytes(), Order::Abcd),
                );
            }
        }

        // Heater (thermostat 18..22 degC), temperature and energy.
        let raw = m.holding[usize::from(TEMPERATURE)];
        if raw != self.temperature_raw {
            self.temperature = f64::from(raw as i16) / 10.0;
        }
        if self.temperature < 18.0 {
            self.heater_on = true;
        } else if self.temperature > 22.0 {
            self.heater_on = false;
        }
        let heater_kw = if self.heater_on {
            3.5 + noise(&mut self.rng, 0.05)
        } else {
            0.0
        };
        self.temperature += dt
            * (heater_kw * 0.004 - (self.temperature - 12.0) * 0.0005
                + noise(&mut self.rng, 0.002));
        self.temperature_raw = ((self.temperature * 10.0).round() as i16) as u16;
        m.holding[usize::from(TEMPERATURE)] = self.temperature_raw;
        let heater_raw = (heater_kw * 1000.0).round() as i32;
        m.put_input(
            HEATER_POWER,
            &encode(&heater_raw.to_be_bytes(), Order::Abcd),
        );
        let energy = f64::from_be_bytes(array(m.input_bytes(ENERGY, 4, Order::Badc)));
        let energy = energy + heater_kw * dt / 3600.0;
        m.put_input(ENERGY, &encode(&energy.to_be_bytes(), Order::Badc));

        // Pressure at the outlet: hydrostatic head plus pump head.
        let pressure =
            1.013 + 0.0981 * level + if pump { 0.8 } else { 0.0 } + noise(&mut self.rng, 0.005);
        m.put_f32_input(PRESSURE, pressure as f32, Order::Cdab);

        // A new batch every few minutes.
        if self.ticks % BATCH_TICKS == 0 {
            self.batch += 1;
            m.put_holding(BATCH_ID, &encode_string(&batch_name(self.batch), 8));
        }
    }
}

/// State shared by the handle, the Modbus service and the model task.
struct Shared {
    kind: Kind,
    mem: Mutex<Memory>,
    read_frames: AtomicU64,
    write_frames: AtomicU64,
    connections: AtomicU64,
    exception: Mutex<Option<ExceptionCode>>,
    delay: Mutex<Option<Duration>>,
    unresponsive: AtomicBool,
    frozen: AtomicBool,
    identity: Mutex<Identity>,
    identification_supported: AtomicBool,
    identification_frames: AtomicU64,
}

impl Shared {
    fn mem(&self) -> MutexGuard<'_, Memory> {
        // A panic while holding the lock leaves plain data behind: keep going.
        self.mem.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Largest register count of one read (Modbus application protocol limit).
const MAX_READ_REGISTERS: u16 = 125;
/// Largest bit count of one read.
const MAX_READ_BITS: u16 = 2000;

fn range(
    addr: u16,
    qty: u16,
    len: usize,
    max: u16,
) -> Result<std::ops::Range<usize>, ExceptionCode> {
    if qty == 0 || qty > max {
        return Err(ExceptionCode::IllegalDataValue);
    }
    let start = usize::from(addr);
    let end = start + usize::from(qty);
    if end > len {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    Ok(start..end)
}

impl Shared {
    fn handle(&self, req: Request<'_>) -> Result<Option<Response>, ExceptionCode> {
        use Request::*;
        let is_read = matches!(
            req,
            ReadCoils(..)
                | ReadDiscreteInputs(..)
                | ReadInputRegisters(..)
                | ReadHoldingRegisters(..)
        );
        if is_read {
            if let Some(code) = *lock(&self.exception) {
                return Err(code);
            }
        }
        let mut m = self.mem();
        match req {
            ReadCoils(a, q) => {
                let r = range(a, q, m.coils.len(), MAX_READ_BITS)?;
                Ok(Some(Response::ReadCoils(m.coils[r].to_vec())))
            }
            ReadDiscreteInputs(a, q) => {
                let r = range(a, q, m.discrete.len(), MAX_READ_BITS)?;
                Ok(Some(Response::ReadDiscreteInputs(m.discrete[r].to_vec())))
            }
            ReadHoldingRegisters(a, q) => {
                let r = range(a, q, m.holding.len(), MAX_READ_REGISTERS)?;
                Ok(Some(Response::ReadHoldingRegisters(m.holding[r].to_vec())))
            }
            ReadInputRegisters(a, q) => {
                let r = range(a, q, m.input.len(), MAX_READ_REGISTERS)?;
                Ok(Some(Response::ReadInputRegisters(m.input[r].to_vec())))
            }
            WriteSingleCoil(a, v) => {
                self.check_coils(&m, a, 1)?;
                m.coils[usize::from(a)] = v;
                Ok(Some(Response::WriteSingleCoil(a, v)))
            }
            WriteMultipleCoils(a, vs) => {
                let n = u16::try_from(vs.len()).map_err(|_| ExceptionCode::IllegalDataValue)?;
                self.check_coils(&m, a, n)?;
                let a0 = usize::from(a);
                m.coils[a0..a0 + vs.len()].copy_from_slice(&vs);
                Ok(Some(Response::WriteMultipleCoils(a, n)))
            }
            WriteSingleRegister(a, v) => {
                self.check_registers(&m, a, &[v])?;
                m.holding[usize::from(a)] = v;
                Ok(Some(Response::WriteSingleRegister(a, v)))
            }
            WriteMultipleRegisters(a, vs) => {
                let n = u16::try_from(vs.len()).map_err(|_| ExceptionCode::IllegalDataValue)?;
                self.check_registers(&m, a, &vs)?;
                m.put_holding(a, &vs);
                Ok(Some(Response::WriteMultipleRegisters(a, n)))
            }
            ReadDeviceIdentification(code, object) => {
                if !self.identification_supported.load(Ordering::SeqCst) {
                    return Err(ExceptionCode::IllegalFunction);
                }
                let identity = lock(&self.identity);
                device_identification(&identity, code, object)
                    .map(|r| Some(Response::ReadDeviceIdentification(r)))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        }
    }

    fn check_coils(&self, m: &Memory, addr: u16, n: u16) -> Result<(), ExceptionCode> {
        let end = usize::from(addr) + usize::from(n);
        if n == 0 || end > m.coils.len() {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        Ok(())
    }

    /// Tank: only the setpoint and the mode are writable, within their ranges.
    /// Bulk: every register is writable.
    fn check_registers(&self, m: &Memory, addr: u16, vs: &[u16]) -> Result<(), ExceptionCode> {
        let end = usize::from(addr) + vs.len();
        if vs.is_empty() || end > m.holding.len() {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        if self.kind == Kind::Bulk {
            return Ok(());
        }
        for (i, v) in vs.iter().enumerate() {
            match addr + i as u16 {
                tank::LEVEL_SETPOINT if f64::from(*v) / 100.0 <= tank::HEIGHT_M => {}
                tank::MODE if *v <= 1 => {}
                tank::LEVEL_SETPOINT | tank::MODE => return Err(ExceptionCode::IllegalDataValue),
                _ => return Err(ExceptionCode::IllegalDataAddress),
            }
        }
        Ok(())
    }
}

/// The answer to Read Device Identification (Modbus application protocol
/// 1.1b3, 6.21) for `identity`.
///
/// - Read codes 1-3 stream the objects of their category and those below it
///   (1: basic; 2: basic and regular; 3: all, which is the same here since
///   there are no extended objects: a device asked for more than its
///   conformity level answers at its level). A start `object` that names no
///   object of the stream restarts at the first. Objects are added while the
///   response fits in one PDU; if some are left, `more_follows` is set and
///   `next_object_id` names the first of them, to be asked for next.
/// - Read code 4 returns the one object `object`, or `IllegalDataAddress`
///   when it is not present.
///
/// The conformity level is regular when a regular object is present, basic
/// otherwise, both with the individual access bit (0x81 / 0x82).
fn device_identification(
    identity: &Identity,
    code: ReadCode,
    object: u8,
) -> Result<ReadDeviceIdentificationResponse, ExceptionCode> {
    let objects = identity.objects();
    let conformity_level = if objects.iter().any(|o| o.id > object_id::LAST_BASIC) {
        ConformityLevel::RegularIdentification
    } else {
        ConformityLevel::BasicIdentification
    };
    let last = match code {
        ReadCode::Basic => object_id::LAST_BASIC,
        ReadCode::Regular => object_id::LAST_REGULAR,
        ReadCode::Extended => u8::MAX,
        ReadCode::Specific => {
            let one = objects
                .into_iter()
                .find(|o| o.id == object)
                .ok_or(ExceptionCode::IllegalDataAddress)?;
            return Ok(ReadDeviceIdentificationResponse {
                read_code: code,
                conformity_level,
                more_follows: false,
                next_object_id: 0,
                device_id_objects: vec![one],
            });
        }
    };
    let stream: Vec<DeviceIdObject> = objects.into_iter().filter(|o| o.id <= last).collect();
    let start = stream.iter().position(|o| o.id == object).unwrap_or(0);
    let mut size = IDENTIFICATION_HEADER;
    let mut device_id_objects = Vec::new();
    let mut next_object_id = None;
    for o in stream.into_iter().skip(start) {
        let object_size = 2 + o.value.len();
        if size + object_size > MAX_PDU {
            next_object_id = Some(o.id);
            break;
        }
        size += object_size;
        device_id_objects.push(o);
    }
    Ok(ReadDeviceIdentificationResponse {
        read_code: code,
        conformity_level,
        more_follows: next_object_id.is_some(),
        next_object_id: next_object_id.unwrap_or(0),
        device_id_objects,
    })
}

/// The per-connection Modbus service.
#[derive(Clone)]
struct SimService(Arc<Shared>);

type ServiceFuture = Pin<Box<dyn Future<Output = Result<Option<Response>, ExceptionCode>> + Send>>;

impl tokio_modbus::server::Service for SimService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = ServiceFuture;

    fn call(&self, req: Self::Request) -> Self::Future {
        let shared = self.0.clone();
        Box::pin(async move {
            use Request::*;
            match req.request {
                ReadCoils(..)
                | ReadDiscreteInputs(..)
                | ReadInputRegisters(..)
                | ReadHoldingRegisters(..) => {
                    shared.read_frames.fetch_add(1, Ordering::SeqCst);
                }
                WriteSingleCoil(..)
                | WriteMultipleCoils(..)
                | WriteSingleRegister(..)
                | WriteMultipleRegisters(..) => {
                    shared.write_frames.fetch_add(1, Ordering::SeqCst);
                }
                ReadDeviceIdentification(..) => {
                    shared.identification_frames.fetch_add(1, Ordering::SeqCst);
                }
                _ => {}
            }
            if shared.unresponsive.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let delay = *lock(&shared.delay);
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            if ![UNIT_ID, 0, 255].contains(&req.slave) {
                return Err(ExceptionCode::GatewayTargetDevice);
            }
            shared.handle(req.request)
        })
    }
}

/// A running simulated PLC. Dropping the handle stops it.
pub struct PlcSim {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Mutex<Option<JoinHandle<()>>>,
    model: JoinHandle<()>,
}

impl PlcSim {
    /// Starts the tank on `bind` (`127.0.0.1:0` picks a free port) with its
    /// process model ticking every 100 ms.
    pub async fn start(bind: SocketAddr) -> anyhow::Result<PlcSim> {
        let mem = Memory::tank();
        let mut model = Model::new(&mem);
        let shared = Arc::new(Shared::new(Kind::Tank, mem));
        let weak = Arc::downgrade(&shared);
        let model = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                if !shared.frozen.load(Ordering::SeqCst) {
                    model.step(&mut shared.mem(), 0.1);
                }
            }
        });
        PlcSim::serve(shared, bind, model).await
    }

    /// Starts a bench device: holding registers `0..registers`, all changing
    /// every 10 ms (register `i` holds `counter + i`). No tank, no other area.
    pub async fn start_bulk(bind: SocketAddr, registers: u16) -> anyhow::Result<PlcSim> {
        let mem = Memory {
            holding: (0..registers).collect(),
            ..Memory::default()
        };
        let shared = Arc::new(Shared::new(Kind::Bulk, mem));
        let weak = Arc::downgrade(&shared);
        let model = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut counter: u16 = 0;
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                if !shared.frozen.load(Ordering::SeqCst) {
                    counter = counter.wrapping_add(1);
                    for (i, r) in shared.mem().holding.iter_mut().enumerate() {
                        *r = counter.wrapping_add(i as u16);
                    }
                }
            }
        });
        PlcSim::serve(shared, bind, model).await
    }

    async fn serve(
        shared: Arc<Shared>,
        bind: SocketAddr,
        model: JoinHandle<()>,
    ) -> anyhow::Result<PlcSim> {
        let listener = match TcpListener::bind(bind).await {
            Ok(l) => l,
            Err(e) => {
                model.abort();
                return Err(e).with_context(|| format!("PLC simulator cannot listen on {bind}"));
            }
        };
        let addr = listener
            .local_addr()
            .context("PLC simulator local address")?;
        let server = spawn_server(shared.clone(), listener);
        Ok(PlcSim {
            shared,
            addr,
            server: Mutex::new(Some(server)),
            model,
        })
    }

    /// The address the simulator listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// Requests of FC 1-4 received.
    pub fn read_frames(&self) -> u64 {
        self.shared.read_frames.load(Ordering::SeqCst)
    }
    /// Requests of FC 5, 6, 15 and 16 received, counted even when refused.
    pub fn write_frames(&self) -> u64 {
        self.shared.write_frames.load(Ordering::SeqCst)
    }
    /// TCP connections accepted since start.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }
    /// Requests of FC 43 (Read Device Identification) received, counted
    /// even when refused or left unanswered.
    pub fn identification_frames(&self) -> u64 {
        self.shared.identification_frames.load(Ordering::SeqCst)
    }
    /// The identity answered to Read Device Identification.
    pub fn identity(&self) -> Identity {
        lock(&self.shared.identity).clone()
    }
    /// Replaces the identity, as a firmware swap would; the next FC 43
    /// request gets the new one.
    pub fn set_identity(&self, identity: Identity) {
        *lock(&self.shared.identity) = identity;
    }
    /// Whether FC 43 is answered (the default) or refused with
    /// `IllegalFunction`, as many small PLCs do.
    pub fn set_identification_supported(&self, on: bool) {
        self.shared
            .identification_supported
            .store(on, Ordering::SeqCst);
    }
    /// Answers every read with `code` (`None` to heal).
    pub fn set_exception(&self, code: Option<ExceptionCode>) {
        *lock(&self.shared.exception) = code;
    }
    /// Keeps connections open but answers nothing while `on`.
    pub fn set_unresponsive(&self, on: bool) {
        self.shared.unresponsive.store(on, Ordering::SeqCst);
    }
    /// Delays every answer by `delay` (`None` for no delay).
    pub fn set_response_delay(&self, delay: Option<Duration>) {
        *lock(&self.shared.delay) = delay;
    }
    /// Stops (or resumes) the process model so values stay put.
    pub fn freeze(&self, on: bool) {
        self.shared.frozen.store(on, Ordering::SeqCst);
    }

    /// Closes the listener and every connection, as if the device were
    /// unplugged. The process model keeps running.
    pub async fn stop(&self) {
        let server = lock(&self.server).take();
        if let Some(server) = server {
            server.abort();
            let _ = server.await;
        }
    }

    /// Listens again on the same address after [`PlcSim::stop`]. Retries for
    /// a few seconds while the port is still held by the old listener.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.stop().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(e).with_context(|| {
                        format!("PLC simulator cannot listen again on {}", self.addr)
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        *lock(&self.server) = Some(spawn_server(self.shared.clone(), listener));
        Ok(())
    }

    /// Holding register `addr` (panics outside the map: a test error).
    pub fn holding(&self, addr: u16) -> u16 {
        self.shared.mem().holding[usize::from(addr)]
    }
    /// Holding registers `addr..addr + n`.
    pub fn holdings(&self, addr: u16, n: u16) -> Vec<u16> {
        let a = usize::from(addr);
        self.shared.mem().holding[a..a + usize::from(n)].to_vec()
    }
    pub fn set_holding(&self, addr: u16, v: u16) {
        self.shared.mem().holding[usize::from(addr)] = v;
    }
    /// Sets holding registers starting at `addr`.
    pub fn set_holdings(&self, addr: u16, vs: &[u16]) {
        self.shared.mem().put_holding(addr, vs);
    }
    pub fn input(&self, addr: u16) -> u16 {
        self.shared.mem().input[usize::from(addr)]
    }
    /// Input registers `addr..addr + n`.
    pub fn inputs(&self, addr: u16, n: u16) -> Vec<u16> {
        let a = usize::from(addr);
        self.shared.mem().input[a..a + usize::from(n)].to_vec()
    }
    pub fn set_input(&self, addr: u16, v: u16) {
        self.shared.mem().input[usize::from(addr)] = v;
    }
    /// Sets input registers starting at `addr`.
    pub fn set_inputs(&self, addr: u16, vs: &[u16]) {
        self.shared.mem().put_input(addr, vs);
    }
    pub fn coil(&self, addr: u16) -> bool {
        self.shared.mem().coils[usize::from(addr)]
    }
    pub fn set_coil(&self, addr: u16, v: bool) {
        self.shared.mem().coils[usize::from(addr)] = v;
    }
    pub fn discrete(&self, addr: u16) -> bool {
        self.shared.mem().discrete[usize::from(addr)]
    }
    pub fn set_discrete(&self, addr: u16, v: bool) {
        self.shared.mem().discrete[usize::from(addr)] = v;
    }
    /// The tank's values in engineering units (tank devices only).
    pub fn snapshot(&self) -> TankSnapshot {
        assert_eq!(
            self.shared.kind,
            Kind::Tank,
            "snapshot() needs a tank simulator"
        );
        self.shared.mem().snapshot()
    }
}

impl Shared {
    fn new(kind: Kind, mem: Memory) -> Self {
        Shared {
            kind,
            mem: Mutex::new(mem),
            read_frames: AtomicU64::new(0),
            write_frames: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            exception: Mutex::new(None),
            delay: Mutex::new(None),
            unresponsive: AtomicBool::new(false),
            frozen: AtomicBool::new(false),
            identity: Mutex::new(Identity::default_tank()),
            identification_supported: AtomicBool::new(true),
            identification_frames: AtomicU64::new(0),
        }
    }
}

/// Serves `listener` until the task is aborted; aborting it also closes
/// every connection (the server cancels its connection tasks on drop).
fn spawn_server(shared: Arc<Shared>, listener: TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        let server = Server::new(listener);
        let on_connected = |stream, peer| {
            shared.connections.fetch_add(1, Ordering::SeqCst);
            let service = SimService(shared.clone());
            async move { accept_tcp_connection(stream, peer, |_| Ok(Some(service.clone()))) }
        };
        let on_error =
            |e: std::io::Error| tracing::debug!(error = %e, "PLC simulator connection ended");
        if let Err(e) = server.serve(&on_connected, on_error).await {
            tracing::warn!(error = %e, "PLC simulator stopped listening");
        }
    })
}

impl Drop for PlcSim {
    fn drop(&mut self) {
        self.model.abort();
        if let Some(server) = lock(&self.server).take() {
            server.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_modbus::client::{tcp, Reader, Writer};
    use tokio_modbus::Slave;

    async fn started() -> (PlcSim, tokio_modbus::client::Context) {
        let sim = PlcSim::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let ctx = tcp::connect_slave(sim.addr(), Slave(UNIT_ID))
            .await
            .unwrap();
        (sim, ctx)
    }

    #[test]
    fn byte_orders_follow_the_gateway_convention() {
        let be = 0x1122_3344u32.to_be_bytes();
        assert_eq!(encode(&be, Order::Abcd), [0x1122, 0x3344]);
        assert_eq!(encode(&be, Order::Badc), [0x2211, 0x4433]);
        assert_eq!(encode(&be, Order::Cdab), [0x3344, 0x1122]);
        assert_eq!(encode(&be, Order::Dcba), [0x4433, 0x2211]);
        let be = 0x1122_3344_5566_7788u64.to_be_bytes();
        assert_eq!(
            encode(&be, Order::Dcba),
            encode(&0x1122_3344_5566_7788u64.to_le_bytes(), Order::Abcd)
        );
        for o in [Order::Abcd, Order::Badc, Order::Cdab, Order::Dcba] {
            assert_eq!(decode(&encode(&be, o), o), be);
        }
        assert_eq!(decode_string(&encode_string("AB-1", 8)), "AB-1");
    }

    #[tokio::test]
    async fn tank_registers_hold_the_documented_raw_encodings() {
        let (sim, mut ctx) = started().await;
        sim.freeze(true);
        sim.set_holdings(tank::LEVEL, &encode(&2.75f32.to_be_bytes(), Order::Abcd));
        sim.set_holding(tank::TEMPERATURE, (-12i16) as u16);
        sim.set_inputs(tank::PRESSURE, &encode(&1.5f32.to_be_bytes(), Order::Cdab));
        sim.set_inputs(
            tank::PUMP_STARTS,
            &encode(&70_000u32.to_be_bytes(), Order::Dcba),
        );
        sim.set_inputs(tank::ENERGY, &encode(&123.25f64.to_be_bytes(), Order::Badc));
        sim.set_inputs(
            tank::HEATER_POWER,
            &encode(&(-3500i32).to_be_bytes(), Order::Abcd),
        );

        let h = ctx
            .read_holding_registers(0, tank::HOLDING_COUNT)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            &h[0..2],
            &2.75f32
                .to_bits()
                .to_be_bytes()
                .chunks(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect::<Vec<_>>()[..]
        );
        assert_eq!(h[6] as i16, -12);
        assert_eq!(h[7], 250, "setpoint 2.50 m as raw m*100");
        assert_eq!(h[8], 0, "auto mode");
        assert_eq!(decode_string(&h[14..22]), "BATCH-000001");
        assert_eq!(h[14], u16::from_be_bytes(*b"BA"));
        let i = ctx
            .read_input_registers(0, tank::INPUT_COUNT)
            .await
            .unwrap()
            .unwrap();
        let p = 1.5f32.to_bits();
        assert_eq!(&i[0..2], &[(p & 0xffff) as u16, (p >> 16) as u16], "CDAB");
        let le = 70_000u32.to_le_bytes();
        assert_eq!(
            &i[2..4],
            &[
                u16::from_be_bytes([le[0], le[1]]),
                u16::from_be_bytes([le[2], le[3]])
            ],
            "DCBA"
        );
        let e = 123.25f64.to_be_bytes();
        assert_eq!(i[4], u16::from_be_bytes([e[1], e[0]]), "BADC");
        assert_eq!(i[7], u16::from_be_bytes([e[7], e[6]]), "BADC");
        assert_eq!((u32::from(i[8]) << 16 | u32::from(i[9])) as i32, -3500);
        let s = sim.snapshot();
        assert_eq!(
            (
                s.level,
                s.temperature,
                s.pressure,
                s.pump_starts,
                s.energy,
                s.heater_power
            ),
            (2.75, -1.2, 1.5, 70_000, 123.25, -3.5)
        );
        let c = ctx.read_coils(0, 2).await.unwrap().unwrap();
        assert_eq!(c, vec![sim.coil(0), sim.coil(1)]);
        assert_eq!(sim.read_frames(), 3);
    }

    #[tokio::test]
    async fn requests_outside_the_map_get_illegal_data_address() {
        let (sim, mut ctx) = started().await;
        assert_eq!(
            ctx.read_holding_registers(20, 3).await.unwrap(),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            ctx.read_input_registers(10, 1).await.unwrap(),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            ctx.read_coils(2, 1).await.unwrap(),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            ctx.read_discrete_inputs(0, 3).await.unwrap(),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            ctx.write_single_register(tank::LEVEL, 1).await.unwrap(),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            ctx.write_single_coil(5, true).await.unwrap(),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(sim.read_frames(), 4);
        assert_eq!(sim.write_frames(), 2);
    }

    #[tokio::test]
    async fn writes_are_applied_counted_and_checked() {
        let (sim, mut ctx) = started().await;
        ctx.write_single_register(tank::MODE, 1)
            .await
            .unwrap()
            .unwrap();
        ctx.write_single_coil(tank::PUMP, true)
            .await
            .unwrap()
            .unwrap();
        ctx.write_multiple_registers(tank::LEVEL_SETPOINT, &[310, 1])
            .await
            .unwrap()
            .unwrap();
        ctx.write_multiple_coils(tank::PUMP, &[true, false])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            ctx.write_single_register(tank::MODE, 7).await.unwrap(),
            Err(ExceptionCode::IllegalDataValue)
        );
        assert_eq!(
            ctx.write_single_register(tank::LEVEL_SETPOINT, 501)
                .await
                .unwrap(),
            Err(ExceptionCode::IllegalDataValue)
        );
        assert_eq!(sim.write_frames(), 6);
        assert_eq!(sim.read_frames(), 0);
        assert_eq!(sim.holding(tank::LEVEL_SETPOINT), 310);
        assert_eq!(sim.holding(tank::MODE), 1);
        assert!(!sim.coil(tank::INLET_VALVE));
        // Manual mode: the auto logic leaves the pump alone.
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(sim.coil(tank::PUMP), "manual pump stays on");
    }

    #[tokio::test]
    async fn auto_mode_runs_the_pump_below_the_setpoint_and_counts_starts() {
        let (sim, _ctx) = started().await;
        sim.set_coil(tank::PUMP, false);
        sim.set_holdings(tank::LEVEL, &encode(&1.0f32.to_be_bytes(), Order::Abcd));
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let s = sim.snapshot();
        assert!(s.pump && s.inflow > 10.0, "{s:?}");
        assert_eq!(s.pump_starts, 1);
        assert!(s.pump_runtime >= 1, "{s:?}");
        assert!(s.level > 1.0 && s.level < 1.1, "{s:?}");
        sim.set_holdings(tank::LEVEL, &encode(&4.8f32.to_be_bytes(), Order::Abcd));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let s = sim.snapshot();
        assert!(!s.pump && s.high_alarm && !s.low_alarm, "{s:?}");
    }

    #[tokio::test]
    async fn scripted_faults_answer_exceptions_or_nothing() {
        let (sim, mut ctx) = started().await;
        sim.set_exception(Some(ExceptionCode::ServerDeviceBusy));
        assert_eq!(
            ctx.read_holding_registers(0, 2).await.unwrap(),
            Err(ExceptionCode::ServerDeviceBusy)
        );
        sim.set_exception(None);
        sim.set_unresponsive(true);
        let r = tokio::time::timeout(Duration::from_millis(300), ctx.read_holding_registers(0, 2))
            .await;
        assert!(r.is_err(), "no answer while unresponsive");
        assert_eq!(sim.read_frames(), 2);
        sim.set_unresponsive(false);
        let mut other = tcp::connect_slave(sim.addr(), Slave(9)).await.unwrap();
        assert_eq!(
            other.read_holding_registers(0, 1).await.unwrap(),
            Err(ExceptionCode::GatewayTargetDevice)
        );
    }

    #[tokio::test]
    async fn stop_closes_connections_and_restart_listens_on_the_same_port() {
        let (sim, mut ctx) = started().await;
        ctx.read_holding_registers(0, 1).await.unwrap().unwrap();
        sim.stop().await;
        let r =
            tokio::time::timeout(Duration::from_secs(2), ctx.read_holding_registers(0, 1)).await;
        assert!(matches!(r, Ok(Err(_))), "old connection is closed: {r:?}");
        assert!(tcp::connect(sim.addr()).await.is_err(), "nothing listens");
        sim.restart().await.unwrap();
        let mut ctx = tcp::connect_slave(sim.addr(), Slave(UNIT_ID))
            .await
            .unwrap();
        ctx.read_holding_registers(0, 1).await.unwrap().unwrap();
        assert_eq!(sim.connections(), 2);
    }

    #[tokio::test]
    async fn device_identification_names_the_simulator() {
        let (_sim, mut ctx) = started().await;
        let id = ctx
            .read_device_identification(ReadCode::Basic, 0)
            .await
            .unwrap()
            .unwrap();
        let v: Vec<_> = id
            .device_id_objects
            .iter()
            .map(|o| o.value_as_str().unwrap().to_string())
            .collect();
        assert_eq!(v, [VENDOR, PRODUCT_CODE, REVISION]);
    }

    /// The values of a response's objects, as (id, text).
    fn objects(r: &ReadDeviceIdentificationResponse) -> Vec<(u8, String)> {
        r.device_id_objects
            .iter()
            .map(|o| (o.id, o.value_as_str().unwrap().to_owned()))
            .collect()
    }

    /// Bytes of the response PDU, as tokio-modbus encodes it.
    fn pdu_size(r: &ReadDeviceIdentificationResponse) -> usize {
        IDENTIFICATION_HEADER
            + r.device_id_objects
                .iter()
                .map(|o| 2 + o.value.len())
                .sum::<usize>()
    }

    #[tokio::test]
    async fn regular_identification_streams_the_present_objects_at_regular_level() {
        let (sim, mut ctx) = started().await;
        let r = ctx
            .read_device_identification(ReadCode::Regular, 0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            objects(&r),
            [
                (0, VENDOR.to_owned()),
                (1, PRODUCT_CODE.to_owned()),
                (2, REVISION.to_owned()),
                (4, "Tank simulator".to_owned()),
                (5, "TANK-1".to_owned()),
            ]
        );
        assert_eq!(r.conformity_level, ConformityLevel::RegularIdentification);
        assert_eq!(
            (r.read_code, r.more_follows, r.next_object_id),
            (ReadCode::Regular, false, 0)
        );
        // Asked for more than it has, the device answers at its level.
        let e = ctx
            .read_device_identification(ReadCode::Extended, 0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(objects(&e), objects(&r));
        // A start id naming a present object starts there; any other restarts at 0.
        let from4 = ctx
            .read_device_identification(ReadCode::Regular, 4)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(from4.device_id_objects.len(), 2);
        assert_eq!(from4.device_id_objects[0].id, 4);
        let from3 = ctx
            .read_device_identification(ReadCode::Regular, 3)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(objects(&from3), objects(&r), "no vendor URL: restart at 0");
        let basic_from4 = ctx
            .read_device_identification(ReadCode::Basic, 4)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            basic_from4.device_id_objects.len(),
            3,
            "4 is not a basic object"
        );
        assert_eq!(sim.identification_frames(), 5);
        assert_eq!(sim.read_frames(), 0);
    }

    #[tokio::test]
    async fn individual_access_returns_one_object_or_illegal_data_address() {
        let (sim, mut ctx) = started().await;
        let r = ctx
            .read_device_identification(ReadCode::Specific, 5)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(objects(&r), [(5, "TANK-1".to_owned())]);
        assert_eq!((r.read_code, r.more_follows), (ReadCode::Specific, false));
        assert_eq!(
            ctx.read_device_identification(ReadCode::Specific, 3)
                .await
                .unwrap(),
            Err(ExceptionCode::IllegalDataAddress),
            "the tank has no vendor URL"
        );
        assert_eq!(
            ctx.read_device_identification(ReadCode::Specific, 0x80)
                .await
                .unwrap(),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(sim.identification_frames(), 3);
    }

    #[tokio::test]
    async fn a_new_identity_is_answered_from_the_next_request_on() {
        let (sim, mut ctx) = started().await;
        assert_eq!(sim.identity(), Identity::default_tank());
        let swapped = Identity {
            vendor: "Other Vendor".into(),
            product_code: "OTHER".into(),
            revision: "9.9".into(),
            vendor_url: None,
            product_name: None,
            model_name: None,
        };
        sim.set_identity(swapped.clone());
        assert_eq!(sim.identity(), swapped);
        let r = ctx
            .read_device_identification(ReadCode::Regular, 0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            objects(&r),
            [
                (0, "Other Vendor".to_owned()),
                (1, "OTHER".to_owned()),
                (2, "9.9".to_owned())
            ]
        );
        assert_eq!(r.conformity_level, ConformityLevel::BasicIdentification);
        sim.set_identity(Identity {
            vendor_url: Some("https://example.invalid".into()),
            ..swapped
        });
        let r = ctx
            .read_device_identification(ReadCode::Regular, 0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.device_id_objects.last().unwrap().id, 3);
        assert_eq!(r.conformity_level, ConformityLevel::RegularIdentification);
    }

    #[tokio::test]
    async fn identification_can_be_unsupported_and_is_counted_anyway() {
        let (sim, mut ctx) = started().await;
        sim.set_identification_supported(false);
        for code in [ReadCode::Basic, ReadCode::Specific] {
            assert_eq!(
                ctx.read_device_identification(code, 0).await.unwrap(),
                Err(ExceptionCode::IllegalFunction)
            );
        }
        sim.set_identification_supported(true);
        ctx.read_device_identification(ReadCode::Basic, 0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sim.identification_frames(), 3);
        assert_eq!((sim.read_frames(), sim.write_frames()), (0, 0));
    }

    #[tokio::test]
    async fn long_identities_continue_with_more_follows_and_next_object_id() {
        let (sim, mut ctx) = started().await;
        let long = |c: char| c.to_string().repeat(120);
        let identity = Identity {
            vendor: long('v'),
            product_code: long('p'),
            revision: long('r'),
            vendor_url: Some(long('u')),
            product_name: Some(long('n')),
            model_name: Some(long('m')),
        };
        sim.set_identity(identity.clone());
        let mut got = Vec::new();
        let mut next = 0;
        let mut requests = 0;
        loop {
            let r = ctx
                .read_device_identification(ReadCode::Regular, next)
                .await
                .unwrap()
                .unwrap();
            requests += 1;
            assert!(pdu_size(&r) <= MAX_PDU, "{}", pdu_size(&r));
            assert!(!r.device_id_objects.is_empty());
            got.extend(objects(&r));
            if !r.more_follows {
                assert_eq!(r.next_object_id, 0);
                break;
            }
            assert_eq!(r.next_object_id, r.device_id_objects.last().unwrap().id + 1);
            next = r.next_object_id;
        }
        // 7 + 2 * 122 = 251 bytes: two objects per response.
        assert_eq!(requests, 3);
        let ids: Vec<u8> = got.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [0, 1, 2, 3, 4, 5]);
        assert_eq!(got[3].1, identity.vendor_url.unwrap());
        assert_eq!(sim.identification_frames(), 3);
    }

    #[test]
    fn values_longer_than_one_response_are_cut_at_a_character_boundary() {
        let identity = Identity {
            // Three bytes each: 244 bytes would end inside a character.
            vendor: "€".repeat(100),
            ..Identity::default_tank()
        };
        let r = device_identification(&identity, ReadCode::Specific, 0).unwrap();
        let v = r.device_id_objects[0].value_as_str().expect("still UTF-8");
        assert_eq!((MAX_IDENTIFICATION_VALUE, v.len()), (244, 243));
        assert_eq!(pdu_size(&r), MAX_PDU - 1);
        let r = device_identification(&identity, ReadCode::Basic, 0).unwrap();
        assert_eq!(
            (r.device_id_objects.len(), r.more_follows, r.next_object_id),
            (1, true, 1)
        );
        let r = device_identification(&identity, ReadCode::Basic, 1).unwrap();
        assert_eq!((r.device_id_objects.len(), r.more_follows), (2, false));
    }

    #[tokio::test]
    async fn bulk_device_registers_change_every_few_milliseconds() {
        let sim = PlcSim::start_bulk("127.0.0.1:0".parse().unwrap(), 1000)
            .await
            .unwrap();
        let mut ctx = tcp::connect_slave(sim.addr(), Slave(UNIT_ID))
            .await
            .unwrap();
        let a = ctx.read_holding_registers(875, 125).await.unwrap().unwrap();
        assert_eq!(a[1], a[0].wrapping_add(1));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let b = ctx.read_holding_registers(875, 125).await.unwrap().unwrap();
        assert_ne!(a, b);
        assert_eq!(
            ctx.read_holding_registers(999, 2).await.unwrap(),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            ctx.read_input_registers(0, 1).await.unwrap(),
            Err(ExceptionCode::IllegalDataAddress)
        );
    }
}
