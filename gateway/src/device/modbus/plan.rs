//! Read planning: which requests one poll cycle sends.
//!
//! Pure, no I/O. Tags of the same area are sorted by address and merged
//! into one request while the hole between them is at most
//! `max_gap_registers` and the request stays within
//! `max_registers_per_request` (register areas) or `max_bits_per_request`
//! (bit areas). A tag is never split across two requests. Each request
//! lists, for every tag it carries, the tag's index in the configuration
//! and its offset in the response.
//!
//! Tags that no request can carry (wider than a request may be, past the
//! end of the address space, or a number in a bit area) are listed apart
//! in [`Plan::unreadable`]; configuration validation refuses them, so this
//! is a second line of defence, not a feature.

use crate::config::{Area, DataType, ModbusDeviceConfig, ModbusTag};

/// The Modbus limit for FC 3 and FC 4 (registers per request).
pub const PROTOCOL_MAX_REGISTERS: u16 = 125;
/// The Modbus limit for FC 1 and FC 2 (bits per request).
pub const PROTOCOL_MAX_BITS: u16 = 2000;

/// How requests may be shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Unused registers (or bits) that may be read along to merge two tags.
    pub max_gap: u16,
    /// Most registers in one request (1..=125).
    pub max_registers: u16,
    /// Most bits in one request (1..=2000).
    pub max_bits: u16,
}

impl Limits {
    /// The limits of a device, clamped to what the protocol allows.
    pub fn from_config(cfg: &ModbusDeviceConfig) -> Self {
        Limits {
            max_gap: cfg.max_gap_registers,
            max_registers: cfg
                .max_registers_per_request
                .clamp(1, PROTOCOL_MAX_REGISTERS),
            max_bits: cfg.max_bits_per_request.clamp(1, PROTOCOL_MAX_BITS),
        }
    }

    /// The largest request (registers or bits) allowed in `area`.
    pub fn max_for(&self, area: Area) -> u16 {
        if area.is_bits() {
            self.max_bits
        } else {
            self.max_registers
        }
    }
}

/// Where one tag sits in a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Index of the tag in the device's tag list.
    pub tag: usize,
    /// Registers (or bits) from the start of the response to the tag.
    pub offset: u16,
}

/// One read request of a poll cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    pub area: Area,
    /// First register (or bit) read.
    pub start: u16,
    /// Registers (or bits) read; at least 1.
    pub count: u16,
    /// The tags this request carries, by address.
    pub slots: Vec<Slot>,
}

impl ReadRequest {
    /// One past the last register (or bit) read.
    pub fn end(&self) -> u32 {
        u32::from(self.start) + u32::from(self.count)
    }
}

/// Why a tag cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    /// The tag is wider than one request may be.
    #[error("the tag is {width} wide, more than the {max} one request may read")]
    TooWide { width: u16, max: u16 },
    /// The tag occupies no register (a zero-length string).
    #[error("the tag occupies no register")]
    Empty,
    /// The tag runs past address 65535.
    #[error("the tag runs past the end of the address space")]
    BeyondAddressSpace,
    /// Only booleans live in coils and discrete inputs.
    #[error("only booleans can be read from a bit area")]
    WrongArea,
}

/// The requests of one poll cycle.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// In area order, then by start address.
    pub requests: Vec<ReadRequest>,
    /// Tags no request carries (by index), with the reason.
    pub unreadable: Vec<(usize, Unreadable)>,
}

/// Plans the requests that read every readable tag once.
pub fn plan(tags: &[ModbusTag], limits: Limits) -> Plan {
    let mut out = Plan::default();
    let mut readable: Vec<(usize, Area, u32, u32)> = Vec::with_capacity(tags.len());
    for (index, tag) in tags.iter().enumerate() {
        let width = tag.data_type.width();
        let max = limits.max_for(tag.area);
        let start = u32::from(tag.address);
        let problem = if tag.area.is_bits() && tag.data_type != DataType::Bool {
            Some(Unreadable::WrongArea)
        } else if width == 0 {
            Some(Unreadable::Empty)
        } else if width > max {
            Some(Unreadable::TooWide { width, max })
        } else if start + u32::from(width) > 1 << 16 {
            Some(Unreadable::BeyondAddressSpace)
        } else {
            None
        };
        match problem {
            Some(p) => out.unreadable.push((index, p)),
            None => readable.push((index, tag.area, start, start + u32::from(width))),
        }
    }
    // Stable: tags at the same address keep their configuration order.
    readable.sort_by_key(|&(_, area, start, _)| (area, start));

    let gap = u32::from(limits.max_gap);
    let mut current: Option<(ReadRequest, u32)> = None;
    for (index, area, start, end) in readable {
        let max = u32::from(limits.max_for(area));
        if let Some((req, req_end)) = current.as_mut() {
            let span = (*req_end).max(end) - u32::from(req.start);
            if req.area == area && start <= *req_end + gap && span <= max {
                *req_end = (*req_end).max(end);
                req.count = narrow(span);
                req.slots.push(Slot {
                    tag: index,
                    offset: narrow(start - u32::from(req.start)),
                });
                continue;
            }
        }
        if let Some((done, _)) = current.take() {
            out.requests.push(done);
        }
        let first = ReadRequest {
            area,
            start: narrow(start),
            count: narrow(end - start),
            slots: vec![Slot {
                tag: index,
                offset: 0,
            }],
        };
        current = Some((first, end));
    }
    if let Some((done, _)) = current {
        out.requests.push(done);
    }
    out
}

/// Values bounded by a request size (at most 2000) or by a start address
/// already checked to be below 65536.
fn narrow(v: u32) -> u16 {
    u16::try_from(v).expect("bounded by the request limit or the address space")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ByteOrder;
    use proptest::prelude::*;

    fn tag(name: &str, area: Area, address: u16, data_type: DataType) -> ModbusTag {
        ModbusTag {
            name: name.into(),
            area,
            address,
            data_type,
            order: ByteOrder::Abcd,
            scale: None,
            offset: None,
            unit: None,
            writable: false,
        }
    }

    /// The tags of `docs/tank-register-map.md`, in its order.
    fn tank_tags() -> Vec<ModbusTag> {
        use Area::*;
        use DataType::*;
        vec![
            tag("tank1.level", HoldingRegister, 0, F32),
            tag("tank1.inflow", HoldingRegister, 2, F32),
            tag("tank1.outflow", HoldingRegister, 4, F32),
            tag("tank1.temperature", HoldingRegister, 6, I16),
            tag("tank1.level_setpoint", HoldingRegister, 7, U16),
            tag("tank1.mode", HoldingRegister, 8, U16),
            tag("tank1.pump_runtime", HoldingRegister, 10, U64),
            tag(
                "tank1.batch_id",
                HoldingRegister,
                14,
                String { registers: 8 },
            ),
            tag("tank1.pump", Coil, 0, Bool),
            tag("tank1.inlet_valve", Coil, 1, Bool),
            tag("tank1.high_alarm", DiscreteInput, 0, Bool),
            tag("tank1.low_alarm", DiscreteInput, 1, Bool),
            tag("tank1.pressure", InputRegister, 0, F32),
            tag("tank1.pump_starts", InputRegister, 2, U32),
            tag("tank1.energy", InputRegister, 4, F64),
            tag("tank1.heater_power", InputRegister, 8, I32),
        ]
    }

    const LIMITS: Limits = Limits {
        max_gap: 4,
        max_registers: 125,
        max_bits: 2000,
    };

    #[test]
    fn the_tank_map_is_read_with_one_request_per_area() {
        let p = plan(&tank_tags(), LIMITS);
        assert!(p.unreadable.is_empty());
        let shape: Vec<_> = p
            .requests
            .iter()
            .map(|r| (r.area, r.start, r.count, r.slots.len()))
            .collect();
        assert_eq!(
            shape,
            [
                (Area::Coil, 0, 2, 2),
                (Area::DiscreteInput, 0, 2, 2),
                (Area::InputRegister, 0, 10, 4),
                (Area::HoldingRegister, 0, 22, 8),
            ]
        );
        let runtime = p.requests[3].slots.iter().find(|s| s.tag == 6);
        assert_eq!(runtime, Some(&Slot { tag: 6, offset: 10 }));
    }

    #[test]
    fn a_hole_wider_than_the_gap_starts_a_new_request() {
        let tags = [
            tag("a", Area::HoldingRegister, 0, DataType::U16),
            tag("b", Area::HoldingRegister, 6, DataType::U16),
            tag("c", Area::HoldingRegister, 12, DataType::U16),
        ];
        let p = plan(&tags, LIMITS);
        let starts: Vec<_> = p.requests.iter().map(|r| (r.start, r.count)).collect();
        assert_eq!(starts, [(0, 1), (6, 1), (12, 1)]);
        let p = plan(
            &tags,
            Limits {
                max_gap: 5,
                ..LIMITS
            },
        );
        let starts: Vec<_> = p.requests.iter().map(|r| (r.start, r.count)).collect();
        assert_eq!(starts, [(0, 13)]);
    }

    #[test]
    fn tags_no_request_can_carry_are_set_apart() {
        let tags = [
            tag(
                "wide",
                Area::HoldingRegister,
                0,
                DataType::String { registers: 126 },
            ),
            tag("end", Area::HoldingRegister, 65535, DataType::U32),
            tag("bits", Area::Coil, 0, DataType::U16),
            tag(
                "empty",
                Area::InputRegister,
                0,
                DataType::String { registers: 0 },
            ),
            tag("ok", Area::HoldingRegister, 65535, DataType::U16),
        ];
        let p = plan(&tags, LIMITS);
        assert_eq!(
            p.unreadable,
            [
                (
                    0,
                    Unreadable::TooWide {
                        width: 126,
                        max: 125
                    }
                ),
                (1, Unreadable::BeyondAddressSpace),
                (2, Unreadable::WrongArea),
                (3, Unreadable::Empty),
            ]
        );
        assert_eq!(p.requests.len(), 1);
        assert_eq!((p.requests[0].start, p.requests[0].count), (65535, 1));
    }

    fn any_tag() -> impl Strategy<Value = ModbusTag> {
        let register_type = proptest::sample::select(vec![
            DataType::Bool,
            DataType::U16,
            DataType::I32,
            DataType::F64,
            DataType::String { registers: 3 },
            DataType::String { registers: 20 },
        ]);
        prop_oneof![
            (
                proptest::sample::select(vec![Area::HoldingRegister, Area::InputRegister]),
                0u16..300,
                register_type
            )
                .prop_map(|(area, addr, dt)| tag("r", area, addr, dt)),
            (
                proptest::sample::select(vec![Area::Coil, Area::DiscreteInput]),
                0u16..3000
            )
                .prop_map(|(area, addr)| tag("b", area, addr, DataType::Bool)),
        ]
    }

    proptest! {
        #[test]
        fn every_tag_is_read_once_within_bounds_and_no_mergeable_requests_stay_apart(
            tags in proptest::collection::vec(any_tag(), 0..60),
            max_gap in 0u16..12,
            max_registers in 20u16..=125,
            max_bits in 1u16..=2000,
        ) {
            let limits = Limits { max_gap, max_registers, max_bits };
            let p = plan(&tags, limits);
            prop_assert!(p.unreadable.is_empty());
            let mut seen = vec![0usize; tags.len()];
            for r in &p.requests {
                prop_assert!(r.count >= 1 && r.count <= limits.max_for(r.area));
                for s in &r.slots {
                    let t = &tags[s.tag];
                    seen[s.tag] += 1;
                    prop_assert_eq!(t.area, r.area);
                    prop_assert_eq!(u32::from(r.start) + u32::from(s.offset), u32::from(t.address));
                    prop_assert!(u32::from(s.offset) + u32::from(t.data_type.width()) <= u32::from(r.count));
                }
            }
            prop_assert!(seen.iter().all(|&n| n == 1), "coverage {:?}", seen);
            for pair in p.requests.windows(2) {
                let (a, b) = (&pair[0], &pair[1]);
                if a.area != b.area {
                    continue;
                }
                prop_assert!(b.start >= a.start);
                let span = a.end().max(b.end()) - u32::from(a.start);
                let gap = u32::from(b.start).saturating_sub(a.end());
                prop_assert!(
                    span > u32::from(limits.max_for(a.area)) || gap > u32::from(max_gap),
                    "{:?} and {:?} could be one request", a, b
                );
            }
        }
    }
}
