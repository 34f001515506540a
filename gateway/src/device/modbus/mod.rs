//! Modbus TCP driver (being written).
