#!/usr/bin/env python3
"""A third-party-style upload client for examples/versus_nginx.rs: Python
asyncio streams over TLS, 64 KiB DATA frames, as issue 13 measured before its
work (`versus_nginx --python-client`).

    pyclient.py HOST PORT SESSIONS SIZE ID_PREFIX CUSTOMER

Opens SESSIONS connections (HELLO -> WELCOME, 256 at a time), prints
`opened N failed M`, waits for a line on stdin, then uploads SIZE bytes on
every session at once and prints one JSON line: each session's rate in bytes
a second, timed from PUT sent to STORED received, and the failures.

Benchmark only: it does not check the server's certificate (the tool starts
both servers itself, on loopback).
"""

import asyncio
import hashlib
import json
import ssl
import struct
import sys
import time

HELLO, WELCOME, PUT, DATA, END, STORED = 0x01, 0x02, 0x10, 0x11, 0x12, 0x13
FRAME = 64 << 10


def frame(kind, payload):
    return struct.pack(">IB", len(payload) + 1, kind) + payload


def control(kind, obj):
    return frame(kind, json.dumps(obj).encode())


async def expect(reader, kind):
    head = await reader.readexactly(5)
    length, got = struct.unpack(">IB", head)
    body = await reader.readexactly(length - 1)
    if got != kind:
        raise RuntimeError(f"expected frame {kind:#x}, got {got:#x}: {body[:200]!r}")
    return body


async def open_session(host, port, ctx, client_id, customer, gate):
    async with gate:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost"),
            120,
        )
        hello = {"protocol": 1, "client_id": client_id, "customer": customer, "schedule": "bench"}
        writer.write(control(HELLO, hello))
        await writer.drain()
        await expect(reader, WELCOME)
        return reader, writer


async def upload(reader, writer, size, chunk, digest):
    t0 = time.monotonic()
    writer.write(control(PUT, {"path": "bench.bin", "size": size}))
    sent = 0
    while sent < size:
        k = min(FRAME, size - sent)
        writer.write(frame(DATA, chunk[:k]))
        await writer.drain()
        sent += k
    writer.write(control(END, {"sha256": digest}))
    await writer.drain()
    await expect(reader, STORED)
    rate = size / (time.monotonic() - t0)
    writer.close()
    return rate


async def main():
    host, port, sessions, size, prefix, customer = sys.argv[1:7]
    port, sessions, size = int(port), int(sessions), int(size)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    gate = asyncio.Semaphore(256)
    opened = await asyncio.gather(
        *(open_session(host, port, ctx, f"{prefix}-{i}", customer, gate) for i in range(sessions)),
        return_exceptions=True,
    )
    conns = [c for c in opened if not isinstance(c, BaseException)]
    errors = [repr(e) for e in opened if isinstance(e, BaseException)]
    print(f"opened {len(conns)} failed {len(errors)}", flush=True)

    chunk = bytes([0xA5]) * FRAME
    h = hashlib.sha256()
    n = 0
    while n < size:
        k = min(FRAME, size - n)
        h.update(chunk[:k])
        n += k
    digest = h.hexdigest()

    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    done = await asyncio.gather(
        *(upload(r, w, size, chunk, digest) for r, w in conns), return_exceptions=True
    )
    rates = [d for d in done if not isinstance(d, BaseException)]
    errors += [repr(d) for d in done if isinstance(d, BaseException)]
    print(json.dumps({"rates": rates, "failed": len(errors), "first_error": errors[:1]}), flush=True)


asyncio.run(main())
