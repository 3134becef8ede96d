"""initiator.splice: payloads in shared memory sent by vmsplice + splice, not copied.

The pipe's bookkeeping against a real loopback socket that fills up (partial loads and
drains, the stream byte for byte), and a session that writes from an ``mmap`` to the fake
target: everything spliced arrives intact and in order, digests or not, through a send buffer
small enough to make every splice partial, across a connection that fails mid-write, and with
a kernel that refuses to splice (the connection copies instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import mmap
import select
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from initiator.errors import ConnectionFailed
from initiator.keys import NegotiationSettings
from initiator.splice import PIPE_SIZE, SPLICE_MIN, Splicer, spliceable
from initiator.transport import Connection, Session
from tests.support.fake_target import Hostility, cdb_write10
from tests.unit.test_transport import fake, logged_in, pattern, within

MIB = 1 << 20


@contextmanager
def shared(data: bytes) -> Iterator[memoryview]:
    """``data`` in an anonymous shared mapping, as the TCMU data area is one."""
    area = mmap.mmap(-1, len(data))
    area[:] = data
    view = memoryview(area)
    try:
        yield view
    finally:
        view.release()
        area.close()


@contextmanager
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        sender = socket.create_connection(server.getsockname())
        receiver, _ = server.accept()
    with sender, receiver:
        yield sender, receiver


def test_only_large_writable_views_of_a_mapping_are_spliced() -> None:
    with shared(bytes(2 * SPLICE_MIN)) as view:
        assert spliceable(view)
        assert spliceable(view[1:SPLICE_MIN + 1])
        assert not spliceable(view[:SPLICE_MIN - 1])           # cheaper to copy
        assert not spliceable(view[::2])                       # not one run of memory
        assert not spliceable(view.toreadonly())
    assert not spliceable(memoryview(bytearray(2 * SPLICE_MIN)))   # heap memory
    assert not spliceable(bytes(2 * SPLICE_MIN))


def test_partial_loads_and_drains_keep_the_stream_whole() -> None:
    data = pattern(PIPE_SIZE + 3 * SPLICE_MIN, 1)
    with shared(data) as view, tcp_pair() as (sender, receiver):
        sender.setblocking(False)
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        splicer = Splicer(sender.fileno())
        received = bytearray()
        offset = 0
        partial_loads = partial_drains = 0
        try:
            while len(received) < len(data):
                if not splicer.pending and offset < len(data):
                    n = splicer.load(view[offset:])
                    assert 0 < n <= len(data) - offset
                    partial_loads += n < len(data) - offset
                    offset += n
                readable, writable, _ = select.select(
                    [receiver], [sender] if splicer.pending else [], [], 5)
                assert readable or writable, "the stream stalled"
                if writable:
                    before = splicer.pending
                    with contextlib.suppress(BlockingIOError):
                        moved = splicer.drain()
                        assert 0 < moved == before - splicer.pending
                        partial_drains += splicer.pending > 0
                if readable:
                    chunk = receiver.recv(PIPE_SIZE)
                    assert chunk
                    received += chunk
            assert splicer.loaded == len(data) and splicer.pending == 0
        finally:
            splicer.close()
    assert received == data
    assert partial_loads and partial_drains   # both ends were full at times


def splicer_of(conn: Connection) -> Splicer | None:
    """The connection's splicer, read afresh (mypy would keep an earlier narrowing)."""
    return conn._splicer


def settings(**kw: object) -> NegotiationSettings:
    base: dict[str, object] = dict(
        default_time2wait=0, max_recv_data_segment_length=256 * 1024,
        max_burst_length=256 * 1024, first_burst_length=64 * 1024)
    base.update(kw)
    return NegotiationSettings.rfc_defaults(**base)


async def write_all(session: Session, view: memoryview, size: int) -> None:
    blocks = size // 512
    results = await within(asyncio.gather(*(
        session.execute(0, cdb_write10(i * blocks, blocks), data_out=[view[i * size:][:size]])
        for i in range(len(view) // size))))
    assert all(r.ok for r in results)


@pytest.mark.parametrize("digests", [False, True])
async def test_writes_from_shared_memory_are_spliced_and_arrive_intact(digests: bool) -> None:
    digest = ("CRC32C",) if digests else ("None",)
    target = fake(settings=settings(header_digest=digest, data_digest=digest))
    data = pattern(2 * MIB, 2)
    cfg = {"header_digest": "CRC32C", "data_digest": "CRC32C"} if digests else {}
    async with logged_in(target, **cfg) as (_, session):
        conn = session._conn
        assert conn is not None and conn._sock is not None and conn._splicer is not None
        # A send buffer this small leaves most of every payload in the pipe for a while.
        conn._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        with shared(data) as view:
            await write_all(session, view, MIB)
            # Immediate data (64 KiB) and every Data-Out (256 KiB): all of it spliced.
            assert conn._splicer.loaded == len(data)
            await write_all(session, view[:128 * 1024], 16 * 1024)   # small ones are copied
            assert conn._splicer.loaded == len(data)
    assert target.disk.data[:len(data)] == data
    assert not target.violations(), target.violations()


async def test_a_connection_failing_with_spliced_data_is_reset_and_the_writes_reissued() -> None:
    target = fake(settings=settings(), hostile=Hostility(withhold=True))
    data = pattern(2 * MIB, 3)
    async with logged_in(target) as (server, session):
        conn = session._conn
        assert conn is not None and conn._sock is not None and conn._splicer is not None
        sock, splicer = conn._sock, conn._splicer
        with shared(data) as view:
            writes = asyncio.ensure_future(write_all(session, view, MIB))
            await server.wait_for(lambda: len(server.connections[-1].held) == 2)
            assert splicer.loaded == len(data)
            conn.fail(ConnectionFailed("test: connection given up"))
            # Reset, not closed cleanly: nothing left in the send queue may go out later.
            assert struct.unpack("ii", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, 8)) == (1, 0)
            assert splicer.pending == 0 and session._conn is not conn   # pipe closed
            target.hostile.withhold = False
            await writes
        assert session.reconnects == 1
    assert target.disk.data[:len(data)] == data


async def test_a_kernel_refusing_to_splice_makes_the_connection_copy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Splicer, buf: memoryview) -> int:
        raise OSError(errno.EFAULT, "Bad address")

    monkeypatch.setattr(Splicer, "load", refuse)
    target = fake(settings=settings())
    data = pattern(2 * MIB, 4)
    async with logged_in(target) as (_, session):
        conn = session._conn
        assert conn is not None and conn._splicer is not None
        with shared(data) as view:
            await write_all(session, view, MIB)
        assert splicer_of(conn) is None and session.reconnects == 0
    assert target.disk.data[:len(data)] == data
