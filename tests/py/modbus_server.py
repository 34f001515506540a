#!/usr/bin/env python3
"""Independent Modbus TCP peer for the interoperability tests.

A pymodbus server whose registers hold known values of every data type and
byte order the gateway decodes. The values are encoded by pymodbus itself
(BinaryPayloadBuilder for all four orders, cross-checked against
ModbusClientMixin.convert_to_registers where that supports the order), never
by hand, so a passing test proves the gateway's decoding against another
implementation.

Usage: modbus_server.py --port PORT --points FILE.json

Writes FILE.json listing every point (name, area, address, type, order,
length_registers, expected, registers) and the Read Device Identification
identity (FC 43 / MEI 14) the server answers ("identity": VendorName,
ProductCode, MajorMinorRevision = the pymodbus version, VendorUrl,
ProductName, ModelName), then prints `READY <port>` on stdout once the server
accepts connections. Protocol addresses are zero-based. Every unit id is
answered.
"""

import argparse
import asyncio
import json
import socket
import sys

import pymodbus
from pymodbus.client.mixin import ModbusClientMixin
from pymodbus.constants import Endian
from pymodbus.datastore import (
    ModbusSequentialDataBlock,
    ModbusServerContext,
    ModbusSlaveContext,
)
from pymodbus.device import ModbusDeviceIdentification
from pymodbus.payload import BinaryPayloadBuilder
from pymodbus.server import StartAsyncTcpServer

DT = ModbusClientMixin.DATATYPE

# (byteorder, wordorder) of BinaryPayloadBuilder for each order name, where
# the order is named after the bytes of a 32-bit value A B C D on the wire.
ORDERS = {
    "ABCD": (Endian.BIG, Endian.BIG),
    "BADC": (Endian.LITTLE, Endian.BIG),
    "CDAB": (Endian.BIG, Endian.LITTLE),
    "DCBA": (Endian.LITTLE, Endian.LITTLE),
}

# Values whose bytes are all different, so any order mistake shows.
VALUES = {
    "u16": (54321, "add_16bit_uint", DT.UINT16),
    "i16": (-12345, "add_16bit_int", DT.INT16),
    "u32": (0x12345678, "add_32bit_uint", DT.UINT32),
    "i32": (-123456789, "add_32bit_int", DT.INT32),
    "u64": (0x0123456789ABCDEF, "add_64bit_uint", DT.UINT64),
    "i64": (-1234567890123456789, "add_64bit_int", DT.INT64),
    "f32": (-1234.5625, "add_32bit_float", DT.FLOAT32),  # exact in f32
    "f64": (3.141592653589793, "add_64bit_float", DT.FLOAT64),
}

STRING_VALUE = "PYMODBUS-3"
STRING_REGISTERS = 8

# Read Device Identification objects 0x00-0x05, by their pymodbus names.
IDENTITY = {
    "VendorName": "Pymodbus Peer Works",
    "ProductCode": "PM-PEER",
    "MajorMinorRevision": pymodbus.__version__,
    "VendorUrl": "https://example.invalid/peer",
    "ProductName": "pymodbus peer",
    "ModelName": "PEER-1",
}


def encode(kind, order):
    """Registers of VALUES[kind] in `order`, by pymodbus's payload builder."""
    value, method, datatype = VALUES[kind]
    byteorder, wordorder = ORDERS[order]
    builder = BinaryPayloadBuilder(byteorder=byteorder, wordorder=wordorder)
    getattr(builder, method)(value)
    regs = builder.to_registers()
    # Cross-check with the newer converter where it can express the order.
    if order in ("ABCD", "CDAB"):
        word_order = "big" if order == "ABCD" else "little"
        other = ModbusClientMixin.convert_to_registers(value, datatype, word_order=word_order)
        assert regs == other, (kind, order, regs, other)
    return value, regs


def build_points():
    holding, inputs, points = [], [], []

    def add(area, store, name, kind, order, expected, regs):
        points.append({
            "name": name,
            "area": area,
            "address": len(store),
            "type": kind,
            "order": order,
            "length_registers": len(regs),
            "expected": expected,
            "registers": regs,
        })
        store.extend(regs)

    for kind in VALUES:
        orders = ["ABCD"] if kind in ("u16", "i16") else list(ORDERS)
        for order in orders:
            value, regs = encode(kind, order)
            add("holding_register", holding, f"hr_{kind}_{order.lower()}", kind, order, value, regs)
    regs = ModbusClientMixin.convert_to_registers(STRING_VALUE, DT.STRING)
    regs = regs + [0] * (STRING_REGISTERS - len(regs))
    add("holding_register", holding, "hr_string_abcd", "string", "ABCD", STRING_VALUE, regs)

    # The input register area repeats a few types to prove the area is right.
    for kind, order in [("u16", "ABCD"), ("i32", "DCBA"), ("f32", "CDAB"), ("f64", "BADC")]:
        value, regs = encode(kind, order)
        add("input_register", inputs, f"ir_{kind}_{order.lower()}", kind, order, value, regs)

    coils = [True, False, True, True, False, False, True, False, False, True]
    discrete = [False, True, True, False, True, False, False, True]
    for area, bits, prefix in [("coil", coils, "co"), ("discrete_input", discrete, "di")]:
        for i, bit in enumerate(bits):
            points.append({
                "name": f"{prefix}_bool_{i}",
                "area": area,
                "address": i,
                "type": "bool",
                "order": "ABCD",
                "length_registers": 1,
                "expected": bit,
                "registers": [],
            })
    return holding, inputs, coils, discrete, points


def context(holding, inputs, coils, discrete):
    # The slave context adds 1 to every protocol address: blocks start at 1
    # so that protocol address 0 is the first value.
    slave = ModbusSlaveContext(
        hr=ModbusSequentialDataBlock(1, holding),
        ir=ModbusSequentialDataBlock(1, inputs),
        co=ModbusSequentialDataBlock(1, coils),
        di=ModbusSequentialDataBlock(1, discrete),
    )
    return ModbusServerContext(slaves=slave, single=True)


async def wait_listening(port, server_task):
    for _ in range(200):
        if server_task.done():
            server_task.result()  # raises the server's error
            raise RuntimeError("server stopped before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"server did not listen on port {port} within 10 s")


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--points", required=True, help="where to write the expectations (JSON)")
    args = parser.parse_args()

    holding, inputs, coils, discrete, points = build_points()
    with open(args.points, "w", encoding="utf-8") as f:
        json.dump({"unit_id": 1, "points": points, "identity": IDENTITY}, f, indent=1)

    server = asyncio.create_task(
        StartAsyncTcpServer(
            context=context(holding, inputs, coils, discrete),
            identity=ModbusDeviceIdentification(info_name=IDENTITY),
            address=("127.0.0.1", args.port),
        )
    )
    await wait_listening(args.port, server)
    print(f"READY {args.port}", flush=True)
    await server


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
