"""The one-shot ``hbactl`` commands: discover, inquiry, readcap, read, write, perf.

Each logs in, does its work over :class:`initiator.client.ScsiClient`, logs out, and returns a
plain ``dict`` that :mod:`hba.cli` prints as text or JSON.

``read`` and ``write`` move at most :data:`MAX_TRANSFER` (or the Block Limits VPD's maximum)
per command. ``write`` streams its input (:class:`_WriteStream`): a chunk is read while up to
:data:`WRITE_DEPTH` WRITEs are in flight, so its memory is bounded whatever the input's size;
what can only be known by reading (a pipe's length) is judged as it shows, and an error or
Ctrl-C says which blocks were written.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import random
import stat
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from hba import plot
from hba.config import MAX_QUEUE_DEPTH
from hba.errors import EXIT_INTERRUPTED, HBAError
from initiator import scsi, urlconfig
from initiator.client import COMMAND_ATTEMPTS, Capacity, ScsiClient, retry_delay
from initiator.command import CommandResult
from initiator.discovery import discover
from initiator.errors import CommandError, CommandTimeout, ConfigurationError, ISCSIError
from initiator.login import Portal
from initiator.output import not_a_file, open_for_writing
from initiator.stats import Histogram, quantile
from initiator.text import TextValueError, check_iscsi_name
from initiator.transport import Session, SessionConfig
from initiator.url import PORTAL_URL_SYNTAX, IscsiUrl, check_seconds, parse_url
from initiator.urlconfig import target_url

Result = dict[str, Any]
T = TypeVar("T")

# A command moves at most this much per SCSI command (also capped by the Block Limits VPD).
MAX_TRANSFER = 1 << 20


@dataclass(frozen=True, slots=True)
class Options:
    """What every command shares: how to log in, the bounds of every wait (None: the
    :class:`SessionConfig` default), and where to record the wire."""

    initiator_name: str | None = None
    login_timeout: float = 15.0
    pcap: str | None = None
    command_timeout: float | None = None
    tmf_timeout: float | None = None
    replacement_timeout: float | None = None
    noop_interval: float | None = None
    noop_timeout: float | None = None
    logout_timeout: float | None = None

    def timeouts(self) -> dict[str, float]:
        """The bounds set, as SessionConfig fields; checked (ConfigurationError)."""
        out: dict[str, float] = {}
        for name, option, zero in _TIMEOUTS:
            value = getattr(self, name)
            if value is not None:
                out[name] = check_seconds(option, value, zero=zero)
        return out


# The bounds hbactl sets: SessionConfig field, option, whether 0 is allowed (it disables the
# command deadline and the NOP pings, and gives up at once on a lost connection).
_TIMEOUTS = (
    ("login_timeout", "--login-timeout", False),
    ("command_timeout", "--command-timeout", True),
    ("tmf_timeout", "--task-management-timeout", False),
    ("replacement_timeout", "--replacement-timeout", True),
    ("noop_interval", "--noop-interval", True),
    ("noop_timeout", "--noop-timeout", False),
    ("logout_timeout", "--logout-timeout", False),
)


def session_config(url: IscsiUrl, options: Options, **extra: Any) -> SessionConfig:
    """The SessionConfig a URL asks for (CHAP from the URL or the environment, digests);
    every option checked, the capture's path too, before anything is sent."""
    if options.pcap is not None:
        check_writable(options.pcap)
    return urlconfig.session_config(url, initiator_name=options.initiator_name,
                                    **{**options.timeouts(), **extra})


async def with_client(url: IscsiUrl, options: Options,
                      work: Callable[[ScsiClient], Awaitable[Result]],
                      **config: Any) -> Result:
    """Log in to the URL's target, run ``work`` on its LUN, log out."""
    assert url.target_iqn is not None and url.lun is not None
    session = Session(Portal(url.host, url.port), url.target_iqn,
                      session_config(url, options, **config), pcap_path=options.pcap)
    await session.login()
    try:
        return await work(ScsiClient(session, url.lun))
    finally:
        await session.logout()


# -- discover ---------------------------------------------------------------------------------

async def cmd_discover(text: str, options: Options, *, luns: bool = False) -> Result:
    """SendTargets; with ``luns``, also log in to each target and list its LUNs
    (:func:`_list_luns`). A target or LUN that fails is reported in its entry (``error``) and
    makes the exit status 1; the others are listed all the same.

    A TargetAddress that cannot be used is skipped and listed in ``skipped`` (target, address,
    why), the rest listed all the same, as iscsiadm does; a target left without any usable
    portal is not listed (nor logged in to). As iscsiadm's "No portals found", the exit status
    is 1 when addresses were skipped and no portal is left at all."""
    url = parse_url(text)
    if not url.is_discovery:
        # SendTargets=All lists every target of the portal: a target or LUN in the URL would
        # be ignored without a word, as if the listing were of that target alone.
        raise ConfigurationError(
            f"URL {str(url)!r} names a target; hbactl discover takes a portal, "
            f"{PORTAL_URL_SYNTAX}, and lists every target it offers (`hbactl inquiry` "
            "shows one LUN)")
    portal = Portal(url.host, url.port)
    if luns and options.pcap is not None and (kind := not_a_file(options.pcap)) is not None:
        # Before any login: the targets' captures would be regular files beside it.
        example = _target_pcap(options.pcap, 1)
        raise ConfigurationError(
            f"--pcap {options.pcap} is {kind}: with --luns each target's session is "
            f"recorded in a file of its own named after it ({example}, ...), which would be "
            "created as regular files beside it; give a regular file's name with --luns (or "
            "leave out --luns to record the discovery session alone into it)")
    targets = await discover(portal, session_config(url, options), pcap_path=options.pcap)
    result: Result = {
        "portal": str(portal),
        "targets": [
            {"name": t.name,
             "portals": [{"address": str(p), "host": p.host, "port": p.port, "tpgt": p.tpgt}
                         for p in t.portals]}
            for t in targets if t.portals
        ],
        "skipped": [{"target": t.name, "address": address, "error": why}
                    for t in targets for address, why in t.unusable],
    }
    if result["skipped"] and not result["targets"]:
        result["exit_status"] = 1
    elif luns:
        failed = False
        for number, entry in enumerate(result["targets"], 1):
            entry["luns"], entry["error"] = await _list_luns(url, options, entry["name"], number)
            failed = failed or entry["error"] is not None or any(
                lun["error"] is not None for lun in entry["luns"])
        result["exit_status"] = 1 if failed else 0
    return result


# REPORT LUNS is asked again with the length the target says its list needs, at most this many
# times in all (the list may grow between two asks), and never for more than this many bytes:
# the header and every single-level LUN (what this initiator can address, pdu.lun_to_wire).
REPORT_LUNS_ATTEMPTS = 3
REPORT_LUNS_INITIAL = 4096
REPORT_LUNS_MAX = 8 + 8 * 0x10000


async def _list_luns(url: IscsiUrl, options: Options, name: str, number: int,
                     ) -> tuple[list[Result], str | None]:
    """Log in to target ``name`` through the portal the user gave (the addresses SendTargets
    lists may not be reachable from here; a target elsewhere redirects the login) and describe
    each LUN REPORT LUNS lists: its entries, and why the listing stopped or is incomplete
    (None: complete). A ConfigurationError (ours, the same for every target) is raised."""
    found: list[Result] = []
    try:
        check_iscsi_name(name, key="TargetName")
    except TextValueError as exc:
        # The name came from the target's SendTargets answer: it cannot be logged in to, but
        # that is this entry's problem, not a mistake in the user's command line.
        return found, f"the portal listed a name that cannot be logged in to: {exc}"

    async def work(client: ScsiClient) -> Result:
        report, error = await report_luns(client)
        seen: set[int] = set()
        for lun in report.luns:
            if lun.number in seen:
                continue  # listed twice: one INQUIRY is enough
            seen.add(lun.number)
            found.append(await _describe_lun(ScsiClient(client.session, lun.number), lun))
        return {"error": error}

    # Each session gets a capture of its own: the discovery session's file is not overwritten.
    if options.pcap is not None:
        options = dataclasses.replace(options, pcap=_target_pcap(options.pcap, number))
    try:
        done = await with_client(dataclasses.replace(url, target_iqn=name, lun=0), options, work)
    except ConfigurationError:
        raise
    except (ISCSIError, OSError) as exc:
        why = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.strerror:
            why = exc.strerror
        return found, (f"stopped after {len(found)} LUN(s): {why}" if found else why)
    return found, done["error"]


def _target_pcap(path: str, number: int) -> str:
    """The capture of the ``number``-th target's session of ``discover --luns --pcap path``."""
    root, ext = os.path.splitext(path)
    return f"{root}.target{number}{ext or '.pcap'}"


async def report_luns(client: ScsiClient) -> tuple[scsi.ReportLuns, str | None]:
    """REPORT LUNS, asked again with the length the target says its list needs (SPC-5
    §6.33: the LUN LIST LENGTH is that of the whole list whatever the allocation length):
    the list, and why it is incomplete (None: it is whole)."""
    length = REPORT_LUNS_INITIAL
    for attempt in range(1, REPORT_LUNS_ATTEMPTS + 1):
        data = await client.read_data(scsi.report_luns(allocation_length=length), length, 8)
        report = scsi.parse_report_luns(data)
        if report.complete:
            return report, None
        listed = f"{report.list_length} bytes ({report.list_length // 8} LUNs)"
        need = report.required_allocation_length
        if need > REPORT_LUNS_MAX:
            return report, (
                f"the target says its LUN list is {listed}, more than the "
                f"{REPORT_LUNS_MAX - 8} bytes of every LUN this initiator can address; "
                f"listed the first {len(report.luns)}")
        if len(data) < length or attempt == REPORT_LUNS_ATTEMPTS:
            # Less than asked for and still more to come is a lie; a list that keeps
            # growing is not chased forever.
            return report, (
                f"the target says its LUN list is {listed} but sent {len(report.luns)} LUNs "
                f"when asked for up to {(length - 8) // 8}; listed those")
        length = need
    raise AssertionError("unreachable")


async def _describe_lun(client: ScsiClient, lun: scsi.Lun) -> Result:
    """Standard INQUIRY and, for a block device, READ CAPACITY, of one listed LUN. A command
    that fails is this LUN's ``error``; a failure of the session is raised."""
    entry: Result = {"lun": lun.number, "device_type": None, "vendor": None, "product": None,
                     "revision": None, "blocks": None, "block_size": None, "size_bytes": None,
                     "error": None}
    if lun.number > 0xFFFF:
        entry["error"] = (f"LUN {lun} has more than one addressing level; this initiator "
                          "addresses single-level LUNs only")
        return entry
    try:
        std = await client.inquiry()
        entry.update(device_type=std.device_type_name, vendor=std.vendor, product=std.product,
                     revision=std.revision)
        if not std.connected:
            entry["error"] = (
                f"INQUIRY says no logical unit is connected at this LUN (peripheral qualifier "
                f"{std.peripheral_qualifier:03b}b) although REPORT LUNS lists it")
        elif std.block_device:
            cap = await client.capacity()
            entry.update(blocks=cap.blocks, block_size=cap.block_size,
                         size_bytes=cap.size_bytes)
    except CommandTimeout:
        # A target that let one command run out its deadline is asked nothing more: with
        # up to 65536 LUNs listed, going on could take that deadline for every one of them.
        raise
    except (CommandError, scsi.ScsiDataError) as exc:
        # The command failed (the session escalates a timeout itself); the next LUN may
        # answer. A lost session is raised: every LUN after it would fail the same way.
        entry["error"] = str(exc)
    return entry


# -- inquiry / readcap ------------------------------------------------------------------------

async def cmd_inquiry(text: str, options: Options) -> Result:
    url = target_url(text)

    async def work(client: ScsiClient) -> Result:
        ident = await client.identity()
        return {"target": url.target_iqn, "lun": url.lun, "vendor": ident.vendor,
                "product": ident.product, "revision": ident.revision,
                "device_type": ident.device_type, "unit_serial": ident.unit_serial,
                "naa": ident.naa, "wwn": ident.wwn, "designators": list(ident.designators)}

    return await with_client(url, options, work)


async def cmd_readcap(text: str, options: Options) -> Result:
    url = target_url(text)

    async def work(client: ScsiClient) -> Result:
        cap = await client.capacity()
        return {"target": url.target_iqn, "lun": url.lun, "blocks": cap.blocks,
                "block_size": cap.block_size, "size_bytes": cap.size_bytes,
                "thin_provisioned": cap.thin_provisioned}

    return await with_client(url, options, work)


# -- read / write -----------------------------------------------------------------------------

async def _geometry(client: ScsiClient) -> tuple[Capacity, int]:
    """The LUN's capacity and the most blocks one command should move."""
    cap = await client.capacity()
    limit = MAX_TRANSFER // cap.block_size
    limits = await client.block_limits()
    if limits is not None and limits.max_transfer_length:
        limit = min(limit, limits.max_transfer_length)
    return cap, max(1, limit)


def _check_numbers(lba: int, blocks: int | None) -> None:
    """What ``--lba``/``--blocks`` can be judged by before a login (the LUN's end is judged
    after it, by :func:`_check_range`): a session for nothing is not opened."""
    if lba < 0:
        raise ConfigurationError(f"--lba {lba}: a block number is 0 or more")
    if blocks is not None and blocks < 1:
        raise ConfigurationError(f"--blocks {blocks}: give 1 or more blocks to move")


def _check_range(lba: int, blocks: int, total: int, url: IscsiUrl) -> None:
    if lba + blocks > total:
        raise ConfigurationError(
            f"blocks {lba}..{lba + blocks - 1} are beyond the end of {url.target_iqn} LUN "
            f"{url.lun}, which has {total} blocks (0..{total - 1})")


_fifos: dict[str, int] = {}
"""FIFOs :func:`check_writable` opened, by path, until :func:`open_output` takes them (or
hbactl's command ends, :func:`release_outputs`: a ``--pcap`` or ``--histogram`` FIFO is opened
again by its writer while this one is held)."""


def check_writable(path: str) -> None:
    """Raise ConfigurationError when ``path`` cannot be written: checked before the login, so
    that a typo in a file name costs no session (and no run), without creating or truncating
    the file before there is something to put in it.

    A FIFO is opened now (:func:`initiator.output.open_for_writing`): one that nobody reads is
    refused at once rather than blocking hbactl after its run, and one that is read stays open
    so that its reader does not see an end of file before the output comes."""
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path):
        raise ConfigurationError(f"cannot write {path}: it is a directory; give a file name")
    if not os.path.isdir(folder):
        raise ConfigurationError(f"cannot write {path}: there is no directory {folder}")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ConfigurationError(f"cannot write {path}: permission denied")
    try:
        fifo = stat.S_ISFIFO(os.stat(path).st_mode)
    except FileNotFoundError:
        fifo = False
    if not fifo or path in _fifos:
        return
    try:
        _fifos[path] = open_for_writing(path)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc.strerror or exc}") from None


def release_outputs() -> None:
    """Close the FIFOs :func:`check_writable` holds (their readers see the end of file)."""
    while _fifos:
        os.close(_fifos.popitem()[1])


def open_output(path: str) -> IO[bytes]:
    """``path`` opened for writing, truncated; a FIFO :func:`check_writable` holds is used as
    it is, and another one with no reader fails at once (OSError) instead of blocking."""
    fd = _fifos.pop(path, None)
    return open(open_for_writing(path) if fd is None else fd, "wb")


async def cmd_read(text: str, options: Options, lba: int, blocks: int, output: str) -> Result:
    url = target_url(text)
    _check_numbers(lba, blocks)
    if output != "-":
        check_writable(output)
    elif sys.stdout.isatty():
        # A disk's blocks are binary: on a terminal they are garbage that can reconfigure it
        # (escape sequences), as gzip and curl refuse too.
        raise ConfigurationError("standard output is a terminal, and blocks are binary: give "
                                 "-o FILE, or send them on (-o - | xxd, -o - > FILE)")

    where = "standard output" if output == "-" else output

    def failed(exc: OSError) -> HBAError:
        return HBAError(f"cannot write {where}: {exc.strerror or exc}")

    async def work(client: ScsiClient) -> Result:
        cap, chunk = await _geometry(client)
        _check_range(lba, blocks, cap.blocks, url)
        try:
            out: IO[bytes] = sys.stdout.buffer if output == "-" else open_output(output)
        except OSError as exc:
            raise failed(exc) from None
        try:
            buf = bytearray(chunk * cap.block_size)
            view = memoryview(buf)
            done = 0
            while done < blocks:
                n = min(chunk, blocks - done)
                part = view[: n * cap.block_size]
                await client.read(lba + done, n, part)
                try:
                    out.write(part)
                except OSError as exc:
                    raise failed(exc) from None
                done += n
            try:
                out.flush()
            except OSError as exc:
                raise failed(exc) from None
        finally:
            if out is not sys.stdout.buffer:
                out.close()
        return {"target": url.target_iqn, "lun": url.lun, "lba": lba, "blocks": blocks,
                "bytes": blocks * cap.block_size, "output": output}

    return await with_client(url, options, work)


async def cmd_write(text: str, options: Options, lba: int, source: str,
                    blocks: int | None) -> Result:
    url = target_url(text)
    _check_numbers(lba, blocks)
    shown = "standard input" if source == "-" else source

    def unreadable(exc: OSError) -> ConfigurationError:
        if isinstance(exc, IsADirectoryError):
            return ConfigurationError(f"cannot read {source}: it is a directory; give a file "
                                      "name, or - for standard input")
        if isinstance(exc, FileNotFoundError):
            return ConfigurationError(f"cannot read {source}: there is no such file; check "
                                      "the path")
        return ConfigurationError(f"cannot read {shown}: {exc.strerror}")

    # Opened before the login (a wrong path is told at once; a FIFO waits for its writer),
    # read after it, a chunk at a time (_WriteStream): the LUN's block size and end bound
    # what is read, so that `-i /dev/zero --blocks 8` reads 8 blocks, and memory stays at a
    # few chunks whatever the input's size.
    # Its first byte too: an empty input is told before the login as well.
    try:
        source_file = await _in_thread(lambda: _open_input(source), f"open {source}")
        size = _regular_size(source_file)
        first = await _in_thread(lambda: source_file.read(1), f"read {source}")
    except OSError as exc:
        raise unreadable(exc) from None
    if not first:
        raise ConfigurationError(f"nothing to write: {shown} is empty")

    async def work(client: ScsiClient) -> Result:
        cap, chunk = await _geometry(client)
        bs = cap.block_size
        # Everything the input can be judged by before a block is written is judged now: a
        # regular file by its size. A pipe's or a device's length only reading finds.
        if blocks is not None:
            _check_range(lba, blocks, cap.blocks, url)
            count, known = blocks, True
            if size is not None and size < blocks * bs:
                raise ConfigurationError(
                    f"--blocks {blocks} needs {blocks * bs} bytes; {shown} has only {size}")
        elif size is not None:    # a regular file: as many blocks as it holds
            if size % bs:
                raise _not_whole(shown, size, bs)
            count, known = size // bs, True
            _check_range(lba, count, cap.blocks, url)
        else:                     # a pipe, a device: up to the LUN's end, where it must end
            _check_range(lba, 1, cap.blocks, url)
            count, known = cap.blocks - lba, False
        stream = _WriteStream(client, source_file, first, lba, bs, chunk)

        def read_failed(exc: OSError) -> ConfigurationError:
            return ConfigurationError(f"{unreadable(exc)}; {stream.written()}")

        # Ctrl-C (asyncio.run() cancels this task) stops the reading and the issuing; the
        # commands in flight finish (each within the session's bounds; Ctrl-C again quits at
        # once), so that the one line can say exactly which blocks were written.
        try:
            got = await stream.run(count, lookahead=not known, read_failed=read_failed)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.uncancel() > 0:
                raise
            await stream.settle()
            raise WriteInterrupted(f"interrupted: {stream.written()}") from None
        if got > count * bs:
            raise ConfigurationError(
                f"{shown} holds more than the {cap.blocks - lba} blocks from block {lba} to "
                f"the end of {url.target_iqn} LUN {url.lun}; give --blocks; "
                f"{stream.written()}")
        if got % bs:
            raise ConfigurationError(f"{_not_whole(shown, got, bs)}; {stream.written()}")
        if got < count * bs and known:
            needed = (f"--blocks {count} needs {count * bs} bytes" if blocks is not None
                      else f"{shown} was {size} bytes when the write began")
            raise ConfigurationError(f"{needed}; {shown} has only {got}; {stream.written()}")
        count = got // bs
        await client.synchronize_cache()
        return {"target": url.target_iqn, "lun": url.lun, "lba": lba, "blocks": count,
                "bytes": count * bs, "input": source}

    try:
        return await with_client(url, options, work)
    finally:
        if source_file is not sys.stdin.buffer:
            source_file.close()


def _open_input(source: str) -> IO[bytes]:
    return sys.stdin.buffer if source == "-" else open(source, "rb")


def _regular_size(source: IO[bytes]) -> int | None:
    """The size of ``source`` when it is a regular file (else None: a pipe, a terminal, a
    device, whose end only reading finds)."""
    try:
        st = os.fstat(source.fileno())
    except (OSError, ValueError):   # no descriptor (a test's stand-in): read to find out
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


WRITE_DEPTH = 4
"""WRITE commands ``hbactl write`` keeps in flight, as libiscsi's iscsi-dd does: its memory
is that many chunks (of at most :data:`MAX_TRANSFER`) and the one being read, whatever the
input's size."""


def _not_whole(shown: str, length: int, block_size: int) -> ConfigurationError:
    return ConfigurationError(f"{shown} holds {length} bytes, not a whole number of "
                              f"{block_size}-byte blocks; pad it or use --blocks")


class WriteInterrupted(HBAError):
    """Ctrl-C during ``hbactl write``: the message says which blocks were written."""

    exit_status = EXIT_INTERRUPTED


class PartialWriteError(HBAError):
    """A WRITE failed after others had written their blocks: the message is the failure's,
    and which blocks were written before it (never a silent partial write)."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class _WriteStream:
    """The input read a chunk at a time, each chunk written as soon as it is read, with at
    most :data:`WRITE_DEPTH` WRITEs in flight: memory stays at ``WRITE_DEPTH + 1`` chunks.

    It keeps which blocks the target acknowledged (:meth:`written`), so that every way a
    write can end early (an input that proves too long or too short, a failed command,
    Ctrl-C) says exactly that, as dd reports its records out. A chunk whose WRITE failed
    may be written in part: it is not counted."""

    def __init__(self, client: ScsiClient, source: IO[bytes], first: bytes, lba: int,
                 block_size: int, chunk: int) -> None:
        self.client, self.source, self.first = client, source, first
        self.lba, self.block_size, self.chunk = lba, block_size, chunk
        self.in_flight: dict[asyncio.Task[None], bytearray] = {}
        self.done: list[tuple[int, int]] = []   # (first block, blocks) acknowledged
        self.spare: list[bytearray] = []

    async def run(self, count: int, *, lookahead: bool,
                  read_failed: Callable[[OSError], Exception]) -> int:
        """Write up to ``count`` blocks of the input; return how many bytes it held: fewer
        when it ends before, and with ``lookahead`` (a pipe, whose end must be the LUN's at
        the latest) one byte more when it goes on beyond. A last chunk that ends in an error
        (beyond the LUN's end, no whole number of blocks, short of ``count`` without
        ``lookahead``) is not written."""
        bs, got = self.block_size, 0
        while got < count * bs:
            n = min(self.chunk, count - got // bs)
            last = got + n * bs == count * bs
            buf = await self._buffer()
            view = memoryview(buf)[: n * bs + (1 if lookahead and last else 0)]
            try:
                length = await _in_thread(functools.partial(self._fill, view), "read input")
            except OSError as exc:
                await self.settle()
                raise read_failed(exc) from None
            got += length
            if length == n * bs:
                self._issue(got - length, buf, view[:length])
                continue
            if lookahead and 0 < length < n * bs and length % bs == 0:
                self._issue(got - length, buf, view[:length])   # the input's end
            else:
                self.spare.append(buf)
            break
        await self.settle()
        return got

    async def _buffer(self) -> bytearray:
        """A buffer for the next chunk: a spare one, else a new one while fewer than
        WRITE_DEPTH + 1 exist, else the buffer of the oldest WRITE once it completes."""
        while len(self.in_flight) >= WRITE_DEPTH:
            await self._complete(next(iter(self.in_flight)))
        return self.spare.pop() if self.spare else bytearray(self.chunk * self.block_size + 1)

    def _fill(self, view: memoryview) -> int:
        """Read into ``view`` until it is full or the input ends (in a thread)."""
        filled = 0
        if self.first:
            view[: len(self.first)] = self.first
            filled, self.first = len(self.first), b""
        while filled < len(view):
            part = self.source.read(len(view) - filled)
            if not part:
                break
            view[filled : filled + len(part)] = part
            filled += len(part)
        return filled

    def _issue(self, offset: int, buf: bytearray, data: memoryview) -> None:
        first = self.lba + offset // self.block_size
        blocks = data.nbytes // self.block_size

        async def write() -> None:
            await self.client.write(first, blocks, data)
            self.done.append((first, blocks))

        self.in_flight[asyncio.ensure_future(write())] = buf

    async def _complete(self, task: asyncio.Task[None]) -> None:
        """Wait for ``task``'s WRITE (Ctrl-C leaves it running: the caller settles it);
        its buffer is free again. When it failed, wait for the others too and raise its
        error, saying which blocks were written."""
        await asyncio.wait([task])
        buf = self.in_flight.pop(task)
        exc = task.exception()
        if exc is not None:
            await self.settle()
            raise PartialWriteError(f"{exc}; {self.written()}",
                                    int(getattr(exc, "exit_status", 1))) from exc
        self.spare.append(buf)

    async def settle(self) -> None:
        """Wait for every WRITE in flight (each within the session's bounds); their
        failures are not raised, only left out of :meth:`written`."""
        if self.in_flight:
            # asyncio.wait, not gather: Ctrl-C during the wait cancels the wait, not the
            # WRITEs (the caller settles them again before it reports).
            await asyncio.wait(set(self.in_flight))
        for task in self.in_flight:
            if not task.cancelled():
                task.exception()   # retrieved: a failure here is told by what was written
        self.in_flight.clear()

    def written(self) -> str:
        """Which blocks the target acknowledged, in the words of an error."""
        spans: list[list[int]] = []
        for first, blocks in sorted(self.done):
            if spans and spans[-1][1] + 1 == first:
                spans[-1][1] = first + blocks - 1
            else:
                spans.append([first, first + blocks - 1])
        if not spans:
            return "nothing was written"
        total = sum(blocks for _, blocks in self.done)
        return ("blocks " + ", ".join(f"{a}..{b}" for a, b in spans)
                + f" were written ({total} blocks)")


async def _in_thread(call: Callable[[], T], name: str) -> T:
    """``call()`` in a thread of its own, awaited.

    Opening a FIFO waits for its writer, and reading a pipe or a terminal waits for its data,
    as ``cat`` does; done in the loop's thread, that wait could not be interrupted: asyncio's
    Ctrl-C handler only cancels the main task, which runs again when the system call
    returns. Awaited here, Ctrl-C cancels the wait at once, and the thread (a daemon, blocked
    in the kernel) is left to end with hbactl."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: list[T], exc: BaseException | None) -> None:
        if done.done():
            return  # cancelled by Ctrl-C meanwhile
        if exc is None:
            done.set_result(result[0])
        else:
            done.set_exception(exc)

    def run() -> None:
        result: list[T] = []
        error: BaseException | None = None
        try:
            result.append(call())
        except BaseException as exc:  # any: the awaiting task raises it, or it would wait on
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: hbactl is ending
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done


# -- perf -------------------------------------------------------------------------------------

PERF_MAX_BUFFERS = 1 << 30
"""The most memory ``hbactl perf`` gives its buffers (block size times queue depth)."""


@dataclass(slots=True)
class PerfSettings:
    block_size: int = 4096
    queue_depth: int = 32
    seconds: float = 10.0
    random: bool = False
    write: bool = False
    histogram: str | None = None
    """Draw the latency distribution into this SVG file (:mod:`hba.plot`)."""


async def cmd_perf(text: str, options: Options, settings: PerfSettings,
                   live: IO[str] | None) -> Result:
    """Keep ``queue_depth`` commands in flight for ``seconds``; print iscsi-perf-like lines.

    Completions resubmit from their callback: no asyncio Task per command.
    """
    url = target_url(text)
    if settings.queue_depth < 1:
        raise ConfigurationError("--queue-depth must be at least 1")
    if settings.queue_depth > MAX_QUEUE_DEPTH:
        # 100000 spent 5 s setting up its streams, well past --seconds 1.
        raise ConfigurationError(
            f"--queue-depth {settings.queue_depth} is more than {MAX_QUEUE_DEPTH}, the most "
            "commands hbactl perf keeps in flight (the target's command window admits fewer "
            "anyway)")
    if settings.block_size * settings.queue_depth > PERF_MAX_BUFFERS:
        # One buffer per command in flight: 64 MiB blocks at depth 32 would be 2 GiB.
        raise ConfigurationError(
            f"--block-size {settings.block_size} at --queue-depth {settings.queue_depth} needs "
            f"{settings.block_size * settings.queue_depth / (1 << 20):.0f} MiB of buffers, "
            f"more than the {PERF_MAX_BUFFERS >> 20} MiB hbactl perf allows; lower one of them")
    check_seconds("--seconds", settings.seconds)  # NaN ran 0 s and called it success
    if settings.histogram is not None:
        plot.require(settings.histogram)  # before the run, not after it
        check_writable(settings.histogram)

    async def work(client: ScsiClient) -> Result:
        cap = await client.capacity()
        if settings.block_size % cap.block_size or settings.block_size <= 0:
            raise ConfigurationError(
                f"--block-size {settings.block_size} is not a multiple of the LUN's "
                f"{cap.block_size}-byte blocks")
        blocks = settings.block_size // cap.block_size
        span = cap.blocks - cap.blocks % blocks
        if span < blocks:
            raise ConfigurationError(
                f"the LUN has only {cap.blocks} blocks, fewer than one {settings.block_size}-"
                "byte request")
        return await _perf_loop(client, settings, blocks, span, live)

    # NOP pings stay on: the keepalive counts progress on our commands, so it sends none
    # while they complete, and it finds a dead connection when they stop.
    result = await with_client(url, options, work)
    if settings.histogram is not None:
        latency = histogram_from(result["latency"])
        await asyncio.to_thread(
            plot.latency_svg, settings.histogram, [plot.Series("hbactl perf", latency)],
            f"hbactl perf: {result['pattern']}, {settings.block_size}-byte blocks, queue "
            f"depth {settings.queue_depth}",
            f"{url.target_iqn} LUN {url.lun}: {result['iops']:.0f} IOPS, "
            f"{result['mb_per_s']:.1f} MB/s over {result['seconds']:.1f} s "
            f"({result['commands']} commands)")
        result["histogram"] = settings.histogram
    return result


def latency_summary(h: Histogram) -> dict[str, Any]:
    """A perf run's latency for its result: mean and percentiles in ms, and the non-empty
    buckets as ``[upper bound in s, count]`` pairs (:func:`histogram_from` reads them back)."""

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1e3, 4)

    return {
        "mean_ms": ms(h.sum / h.count) if h.count else None,
        "p50_ms": ms(quantile(0.5, h.bounds, h.counts)),
        "p99_ms": ms(quantile(0.99, h.bounds, h.counts)),
        "p999_ms": ms(quantile(0.999, h.bounds, h.counts)),
        "buckets": [[h.bounds[i] if i < len(h.bounds) else None, n]
                    for i, n in enumerate(h.counts) if n],
        "sum_s": h.sum,
    }


def histogram_from(summary: dict[str, Any]) -> Histogram:
    """The histogram of a :func:`latency_summary` (with :func:`hba.plot.fine_buckets`)."""
    h = Histogram(plot.fine_buckets())
    for bound, n in summary["buckets"]:
        h.observe(float("inf") if bound is None else float(bound), int(n))
    h.sum = float(summary["sum_s"])
    return h


async def _perf_loop(client: ScsiClient, settings: PerfSettings, blocks: int, span: int,
                     live: IO[str] | None) -> Result:
    # This loop is what the benchmark measures besides the initiator, so it is kept lean:
    # each buffer gets its issue/done pair once (no closure per command), the counters are
    # plain ints, and the clock is time.monotonic itself (what loop.time() returns, without
    # the Python method call), read once per completion.
    clock = time.monotonic
    session, lun = client.session, client.lun
    submit = session.submit
    rng = random.Random(0x15C5)
    next_lba = 0
    completed = 0
    in_flight = 0
    errors = 0
    first_error: list[ISCSIError | str] = []
    end = clock() + settings.seconds
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    build = scsi.write if settings.write else scsi.read
    is_write, is_random, slots = settings.write, settings.random, span // blocks
    size = settings.block_size
    latency = Histogram(plot.fine_buckets())
    # Histogram.observe() inlined: a method call and three attribute updates per command are
    # work iscsi-perf does not do. The sum goes into `latency` after the run.
    bounds, counts = latency.bounds, latency.counts
    latency_sum = 0.0

    def stream(buf: memoryview) -> Callable[[], None]:
        """The issue function of one buffer's chain of commands, each issued from the
        completion of the one before."""
        bufs = [buf]  # one command at a time uses it: safe to share between commands
        cdb = b""
        attempts = 1
        sent = 0.0

        def issue() -> None:
            nonlocal next_lba, cdb, attempts
            if is_random:
                lba = rng.randrange(slots) * blocks
            else:
                lba = next_lba
                next_lba = (lba + blocks) % span
            cdb = build(lba, blocks)
            attempts = 1
            send()

        def send() -> None:
            nonlocal sent
            sent = clock()
            if is_write:
                submit(lun, cdb, data_out=bufs, on_done=done)
            else:
                submit(lun, cdb, data_in=bufs, on_done=done)

        def done(result: CommandResult | ISCSIError) -> None:
            nonlocal in_flight, completed, errors, attempts, latency_sum
            now = clock()
            if isinstance(result, CommandResult):
                if result.status == 0 and not result.residual and (
                        is_write or result.data_in_length == size):
                    # GOOD and all the data moved: a short read is no completed command.
                    completed += 1
                    took = now - sent
                    counts[bisect_left(bounds, took)] += 1
                    latency_sum += took
                elif attempts < COMMAND_ATTEMPTS and \
                        (retry := scsi.retryable(result)) is not None:
                    # What the Linux midlayer retries (the UNIT ATTENTION of a new I_T nexus
                    # after a reinstatement, BUSY, ...) is retried, a bounded number of times,
                    # also after the end of the run: it is no failed command.
                    attempts += 1
                    if retry is scsi.Retry.LATER:
                        loop.call_later(retry_delay(attempts - 1), send)
                    else:
                        send()
                    return
                else:
                    failure = _failure(cdb, result, size, is_write)
                    if failure is None:  # RECOVERED ERROR, CONDITION MET: done all the same
                        completed += 1
                    else:
                        errors += 1
                        if not first_error:
                            first_error.append(failure)
            else:
                errors += 1
                if not first_error:
                    first_error.append(result)
            if now < end and not first_error:
                issue()  # this buffer's next command: in_flight stays the same
                return
            in_flight -= 1
            if in_flight == 0 and not finished.done():
                finished.set_result(None)

        return issue

    start = clock()
    wall = time.perf_counter()
    for _ in range(settings.queue_depth):
        in_flight += 1
        stream(memoryview(bytearray(settings.block_size)))()
    last_time, last_done = start, 0
    # The commands in flight when the run ends each finish within the session's bounds (the
    # command deadline and its escalation, or the replacement timeout if the connection is
    # lost); past the sum of those, waiting longer would only hide a bug.
    config = session.config
    drain = config.replacement_timeout + (
        config.command_timeout + 2 * config.tmf_timeout if config.command_timeout > 0 else 0)
    interrupted = False
    try:
        while not finished.done():
            try:
                await asyncio.wait([finished], timeout=1.0)
            except asyncio.CancelledError:
                # Ctrl-C: asyncio.run() cancels the main task. Like iscsi-perf, stop issuing,
                # let the commands in flight finish and report the run so far (a second
                # Ctrl-C ends at once, without totals).
                task = asyncio.current_task()
                if interrupted or task is None or task.uncancel() > 0:
                    raise
                interrupted = True
                end = clock()
                if live is not None and in_flight:
                    live.write(f"interrupted: waiting for the {in_flight} command(s) in "
                               "flight (Ctrl-C again to quit at once)\n")
                    live.flush()
            now = clock()
            if now > end + drain and not finished.done():
                stuck = in_flight
                await session.close()
                raise ISCSIError(
                    f"{stuck} command(s) to {session.label} were still in flight "
                    f"{now - end:.0f} s after the run ended, beyond every bound of the "
                    "session; it was closed")
            if live is not None and now - last_time >= 0.5:
                cur = (completed - last_done) / (now - last_time)
                avg = completed / max(now - start, 1e-9)
                live.write(
                    f"{_clock(now - start)} - iops current {cur:.0f} "
                    f"({cur * settings.block_size / 1e6:.0f} MB/s), iops average {avg:.0f} "
                    f"({avg * settings.block_size / 1e6:.0f} MB/s), in_flight "
                    f"{in_flight}\n")
                live.flush()
                last_time, last_done = now, completed
    finally:
        if not finished.done():
            finished.cancel()
    elapsed = time.perf_counter() - wall
    if first_error and completed == 0:
        err = first_error[0]
        if isinstance(err, ISCSIError):
            raise err
        raise ISCSIError(f"every command failed: {err}")
    iops = completed / elapsed
    latency.count = sum(counts)
    latency.sum = latency_sum
    return {"target": client.session.target_name, "lun": lun,
            "block_size": settings.block_size, "queue_depth": settings.queue_depth,
            "pattern": ("random" if settings.random else "sequential")
            + (" write" if settings.write else " read"),
            "seconds": round(elapsed, 3), "commands": completed,
            "errors": errors, "iops": round(iops, 1),
            "mb_per_s": round(iops * settings.block_size / 1e6, 2),
            "first_error": str(first_error[0]) if first_error else None,
            "latency": latency_summary(latency), "interrupted": interrupted,
            "exit_status": EXIT_INTERRUPTED if interrupted else 1 if errors else 0}


def _failure(cdb: bytes, result: CommandResult, size: int, write: bool) -> ISCSIError | None:
    """Why a perf command that reached the target failed (its status and sense in words, or
    what its data transfer lacked), or None when it did its work after all."""
    try:
        scsi.check_result(cdb, result)
        scsi.check_transfer(cdb, result, size, data_in=not write)
    except ISCSIError as exc:
        return exc
    return None


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"
