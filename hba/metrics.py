"""The daemon's metrics: one sample of what every disk and session did, for ``hbactl top``
(over DBus) and for Prometheus (``hbactl daemon --metrics ADDRESS``).

Theory of operation
-------------------
Everything is counted where it happens, into plain objects read from the event loop's thread:
per disk by its dispatcher (:mod:`tcmu_handler.stats`: commands, bytes, latency from ring entry
to ring completion, statuses and sense keys, task management), per session by the initiator
(:mod:`initiator.stats`: connections lost, reinstatements, login failures by reason, digest
errors, NOP-Out round trips, the command window). :func:`sample` reads them all at once into
one plain dictionary (numbers, strings, lists and dicts: what JSON and DBus carry), the one
home of what is exported: ``hbactl top`` asks the daemon for it every second over DBus
(``Metrics``) and works out rates, averages and percentiles from two samples;
:class:`MetricsCollector` turns it into Prometheus metric families.

:class:`MetricsServer` serves those on the opt-in listen address with ``prometheus_client``'s
own HTTP server, in a thread of its own: a scrape asks the loop for a sample
(``call_soon_threadsafe``; bounded by :data:`SCRAPE_TIMEOUT`) and formats it in the HTTP thread,
so nothing of the data path runs there and nothing of the loop waits for a scraper. Metrics
are off by default; a bare port listens on the loopback address only. Only ``GET``/``HEAD
/metrics`` is answered (:func:`metrics_only`): another path is a 404 and another method a 405,
each with a one-line plain-text body, so a typo in a scrape configuration shows as an error
rather than as metrics on a path nobody meant. A client gets :data:`REQUEST_TIMEOUT` seconds
per read or write of its request (the standard library's HTTP handler already bounds the
request line and headers), so a silent client holds no thread for ever.

Names follow Prometheus' conventions: ``iscsi_hba_`` prefix, base units (seconds, bytes),
``_total`` for counters; disks are labelled ``disk`` (each path of a multipath disk is one,
``<name>.<n>``) (``iscsi_hba_disk_info`` joins the name
to its device, target, portal and LUN), sessions ``target`` and ``portal``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from hba.disks import DiskState
from hba.errors import HBAError
from initiator.command import ScsiStatus
from initiator.errors import ConfigurationError
from initiator.scsi import SenseKey
from initiator.stats import LATENCY_BUCKETS, Histogram
from initiator.transport import Session, SessionState
from initiator.url import decimal, format_portal, parse_portal
from tcmu_handler.stats import DIRECTIONS, OPERATIONS

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from hba.daemon import Daemon
    from hba.disks import Disk, DiskPath

log = logging.getLogger("iscsi-hba")

__all__ = ["DEFAULT_PORT", "MetricsCollector", "MetricsServer", "parse_listen_address",
           "sample"]

DEFAULT_PORT = 9433
SCRAPE_TIMEOUT = 5.0
"""Seconds a scrape waits for the event loop to take a sample."""
REQUEST_TIMEOUT = 10.0
"""Seconds the HTTP server waits on each read or write of a client's socket."""
METRICS_PATH = "/metrics"


# --------------------------------------------------------------------------------------------
# the sample


def _histogram(h: Histogram) -> dict[str, Any]:
    return {"count": h.count, "sum": h.sum, "counts": list(h.counts)}


def _status_name(status: int) -> str:
    try:
        return ScsiStatus(status).name.lower()
    except ValueError:
        return f"0x{status:02x}"


def _sense_key_name(key: int) -> str:
    return SenseKey(key & 0x0F).name.lower()


def _disk(disk: Disk) -> list[dict[str, Any]]:
    """One row per path: each is a device of its own in the kernel, with its own ring. A
    multipath disk's rows are named ``<name>.<n>``, as its backstores."""
    rows = []
    for path in disk.paths:
        name = f"{disk.name}.{path.index}" if disk.spec.multipath else disk.name
        rows.append(_path(disk, path, name))
    return rows


def _path(disk: Disk, path: DiskPath, name: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": name, "device": path.device.node if path.device else "",
        "target": disk.spec.target, "portal": str(path.spec.portal), "lun": disk.spec.lun,
        "state": disk.state.value, "session": path.session.state.value,
    }
    dispatcher = path.dispatcher
    if dispatcher is None:
        return row
    stats = dispatcher.stats
    metrics = dispatcher.metrics
    operations = {}
    for index, op in enumerate(OPERATIONS):
        operations[op] = _histogram(metrics.operation_latency(index))
    statuses = {_status_name(s): n for s, n in sorted(metrics.statuses.items())}
    completed = sum(h["count"] for h in operations.values())
    statuses["good"] = completed - sum(metrics.statuses.values())
    row.update(
        in_flight=stats.in_flight, submitted=stats.submitted, failed=stats.failed,
        unservable=stats.unknown_op, tmr_requests=stats.tmr_entries, aborts=stats.aborts,
        lun_resets=stats.lun_resets, operations=operations,
        bytes={d: metrics.direction_bytes(i) for i, d in enumerate(DIRECTIONS) if d != "none"},
        statuses=statuses,
        sense_keys={_sense_key_name(k): n for k, n in sorted(metrics.sense_keys.items())})
    return row


def _session(session: Session, luns: int) -> dict[str, Any]:
    counters = session.counters
    row: dict[str, Any] = {
        "target": session.target_name or "", "portal": str(session.portal),
        "state": session.state.value, "luns": luns, "reinstatements": session.reconnects,
        "connections_lost": counters.connections_lost,
        "login_failures": dict(sorted(counters.login_failures.items())),
        "digest_errors": dict(counters.digest_errors),
        "nop_rtt": _histogram(counters.nop_rtt), "window_closed": counters.window_closed,
        "replacement_timeouts": counters.give_ups, **session.stats(),
    }
    window = session.command_window
    if window is not None:
        cmd_sn, exp_cmd_sn, max_cmd_sn = window
        row.update(cmd_sn=cmd_sn, exp_cmd_sn=exp_cmd_sn, max_cmd_sn=max_cmd_sn,
                   window=_serial_count(exp_cmd_sn, max_cmd_sn),
                   window_free=_serial_count(cmd_sn, max_cmd_sn))
    return row


def _serial_count(first: int, last: int) -> int:
    """Numbers in [first, last] in serial arithmetic (RFC 1982, §4.2.2.1); 0 when last is
    below first (an empty window: MaxCmdSN = ExpCmdSN - 1)."""
    n = (last - first + 1) & 0xFFFFFFFF
    return n if n < 0x80000000 else 0


def sample(daemon: Daemon) -> dict[str, Any]:
    """Everything the daemon counts, now (see the module docstring). Call it in the loop."""
    loop = asyncio.get_running_loop()
    disks = list(daemon.disks.values())
    sessions: dict[int, tuple[Session, int]] = {}
    for disk in disks:
        for path in disk.paths:
            session, luns = sessions.get(id(path.session), (path.session, 0))
            sessions[id(session)] = (session, luns + 1)
    rows = daemon.list()
    by_state = {state.value: 0 for state in DiskState if state is not DiskState.DETACHED}
    for row in rows:
        by_state[str(row["state"])] = by_state.get(str(row["state"]), 0) + 1
    return {
        "time": loop.time(),
        "buckets": list(LATENCY_BUCKETS),
        "disks": [row for disk in disks for row in _disk(disk)],
        "sessions": [_session(session, luns) for session, luns in sessions.values()],
        "daemon": {"disks": by_state,
                   "retries_pending": sum(row["state"] == DiskState.RETRYING.value
                                          for row in rows)},
    }


def process_sample() -> dict[str, Any]:
    """This process's CPU time, resident memory and open files: a worker adds it to its
    sample (:mod:`hba.workers`), because the Prometheus ``process_*`` metrics are those of
    the main process, which serves no disk when there are workers."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            resident = int(f.read().split()[1]) * resource.getpagesize()
        fds = len(os.listdir("/proc/self/fd"))
    except (OSError, ValueError, IndexError):   # no /proc: what getrusage knows
        resident, fds = usage.ru_maxrss * 1024, 0
    return {"pid": os.getpid(), "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "resident_bytes": resident, "open_fds": fds}


def merge_samples(main: Mapping[str, Any], workers: Iterable[Mapping[str, Any]]
                  ) -> dict[str, Any]:
    """The main process's :func:`sample` (its retries; no disk of its own) with the workers'
    (:mod:`hba.workers`): their disks and sessions, the disks by state counted together. The
    time is the main process's (every process's loop clock is the monotonic clock)."""
    out = {**main, "disks": list(main["disks"]), "sessions": list(main["sessions"]),
           "daemon": {**main["daemon"], "disks": dict(main["daemon"]["disks"])}}
    out["workers"] = []
    for data in workers:
        if "process" in data:
            out["workers"].append(data["process"])
        out["disks"] += data["disks"]
        out["sessions"] += data["sessions"]
        for state, n in data["daemon"]["disks"].items():
            if state != DiskState.RETRYING.value:   # retries are the main process's
                out["daemon"]["disks"][state] = out["daemon"]["disks"].get(state, 0) + n
    return out


# --------------------------------------------------------------------------------------------
# Prometheus


def _families(data: Mapping[str, Any]) -> Iterator[Any]:
    """The Prometheus metric families of one :func:`sample`."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        InfoMetricFamily,
    )

    bounds = [float(b) for b in data["buckets"]]

    def buckets(h: Mapping[str, Any]) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip([*bounds, float("inf")], h["counts"], strict=True):
            total += int(n)
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out

    disk_labels = ["disk"]
    info = InfoMetricFamily("iscsi_hba_disk", "A disk the daemon serves: its device node, "
                            "target, portal and LUN", labels=disk_labels)
    commands = CounterMetricFamily(
        "iscsi_hba_disk_commands", "SCSI commands completed through the ring, by operation",
        labels=[*disk_labels, "op"])
    nbytes = CounterMetricFamily(
        "iscsi_hba_disk_bytes", "Bytes moved by commands that completed, by direction",
        labels=[*disk_labels, "direction"])
    latency = HistogramMetricFamily(
        "iscsi_hba_disk_latency_seconds", "Time from the ring entry to the ring completion of "
        "each command, by operation", labels=[*disk_labels, "op"])
    queue = GaugeMetricFamily("iscsi_hba_disk_queue_depth",
                              "Commands taken from the ring and not completed yet",
                              labels=disk_labels)
    aborts = CounterMetricFamily(
        "iscsi_hba_disk_aborts", "ABORT TASKs sent for commands the kernel aborted",
        labels=disk_labels)
    resets = CounterMetricFamily("iscsi_hba_disk_lun_resets",
                                 "LOGICAL UNIT RESETs sent for the kernel", labels=disk_labels)
    tmr = CounterMetricFamily("iscsi_hba_disk_task_management_requests",
                              "Task management requests of the kernel (TMR ring entries)",
                              labels=disk_labels)
    statuses = CounterMetricFamily(
        "iscsi_hba_disk_scsi_statuses", "SCSI statuses returned to the kernel",
        labels=[*disk_labels, "status"])
    sense_keys = CounterMetricFamily(
        "iscsi_hba_disk_sense_keys", "Sense keys of the CHECK CONDITIONs returned to the kernel",
        labels=[*disk_labels, "sense_key"])
    failed = CounterMetricFamily(
        "iscsi_hba_disk_transport_failures",
        "Commands the initiator could not deliver or complete (returned as CHECK CONDITION)",
        labels=disk_labels)
    for disk in data["disks"]:
        name = str(disk["name"])
        info.add_metric([name], {"device": str(disk["device"]), "target": str(disk["target"]),
                                 "portal": str(disk["portal"]), "lun": str(disk["lun"])})
        if "operations" not in disk:
            continue
        for op, h in disk["operations"].items():
            commands.add_metric([name, op], h["count"])
            latency.add_metric([name, op], buckets(h), h["sum"])
        for direction, n in disk["bytes"].items():
            nbytes.add_metric([name, direction], n)
        queue.add_metric([name], disk["in_flight"])
        aborts.add_metric([name], disk["aborts"])
        resets.add_metric([name], disk["lun_resets"])
        tmr.add_metric([name], disk["tmr_requests"])
        failed.add_metric([name], disk["failed"])
        for status, n in disk["statuses"].items():
            statuses.add_metric([name, status], n)
        for key, n in disk["sense_keys"].items():
            sense_keys.add_metric([name, key], n)
    yield from (info, commands, nbytes, latency, queue, aborts, resets, tmr, statuses,
                sense_keys, failed)

    session_labels = ["target", "portal"]
    state = GaugeMetricFamily("iscsi_hba_session_state",
                              "1 for the state the session is in, 0 for the others",
                              labels=[*session_labels, "state"])
    luns = GaugeMetricFamily("iscsi_hba_session_luns", "Disks using the session",
                             labels=session_labels)
    reinstated = CounterMetricFamily(
        "iscsi_hba_session_reinstatements",
        "Times the session was logged in again after a lost connection", labels=session_labels)
    lost = CounterMetricFamily("iscsi_hba_session_connection_losses",
                               "Connections of the session that failed", labels=session_labels)
    logins = CounterMetricFamily("iscsi_hba_session_login_failures",
                                 "Failed logins (first and recovery attempts), by reason",
                                 labels=[*session_labels, "reason"])
    digests = CounterMetricFamily("iscsi_hba_session_digest_errors",
                                  "Header and data digest mismatches (each ends a connection)",
                                  labels=[*session_labels, "kind"])
    rtt = HistogramMetricFamily("iscsi_hba_session_nop_rtt_seconds",
                                "Round trip of the NOP-Out pings the target answered",
                                labels=session_labels)
    window = GaugeMetricFamily(
        "iscsi_hba_session_cmd_window", "The target's command window, MaxCmdSN - ExpCmdSN + 1",
        labels=session_labels)
    window_free = GaugeMetricFamily(
        "iscsi_hba_session_cmd_window_free",
        "Commands that may be sent now, MaxCmdSN - CmdSN + 1 (0: the window is closed)",
        labels=session_labels)
    exp_cmd_sn = GaugeMetricFamily("iscsi_hba_session_exp_cmd_sn",
                                   "ExpCmdSN: the next CmdSN the target expects",
                                   labels=session_labels)
    max_cmd_sn = GaugeMetricFamily("iscsi_hba_session_max_cmd_sn",
                                   "MaxCmdSN: the last CmdSN the target accepts",
                                   labels=session_labels)
    closed = CounterMetricFamily("iscsi_hba_session_cmd_window_closed",
                                 "Times commands had to wait for the target to open the window",
                                 labels=session_labels)
    gave_up = CounterMetricFamily(
        "iscsi_hba_session_replacement_timeouts",
        "Outages that lasted the replacement timeout (the waiting commands failed)",
        labels=session_labels)
    sent = CounterMetricFamily("iscsi_hba_session_bytes_sent",
                               "Data-Out bytes sent on the session's current connection",
                               labels=session_labels)
    received = CounterMetricFamily("iscsi_hba_session_bytes_received",
                                   "Data-In bytes received on the session's current connection",
                                   labels=session_labels)
    states = [s.value for s in SessionState]
    for s in data["sessions"]:
        labels = [str(s["target"]), str(s["portal"])]
        for value in states:
            state.add_metric([*labels, value], 1.0 if s["state"] == value else 0.0)
        luns.add_metric(labels, s["luns"])
        reinstated.add_metric(labels, s["reinstatements"])
        lost.add_metric(labels, s["connections_lost"])
        for reason, n in s["login_failures"].items():
            logins.add_metric([*labels, reason], n)
        for kind, n in s["digest_errors"].items():
            digests.add_metric([*labels, kind], n)
        rtt.add_metric(labels, buckets(s["nop_rtt"]), s["nop_rtt"]["sum"])
        if "window" in s:
            window.add_metric(labels, s["window"])
            window_free.add_metric(labels, s["window_free"])
            exp_cmd_sn.add_metric(labels, s["exp_cmd_sn"])
            max_cmd_sn.add_metric(labels, s["max_cmd_sn"])
        closed.add_metric(labels, s["window_closed"])
        gave_up.add_metric(labels, s["replacement_timeouts"])
        sent.add_metric(labels, s["bytes_out"])
        received.add_metric(labels, s["bytes_in"])
    yield from (state, luns, reinstated, lost, logins, digests, rtt, window, window_free,
                exp_cmd_sn, max_cmd_sn, closed, gave_up, sent, received)

    disks = GaugeMetricFamily("iscsi_hba_disks", "Disks (and configuration entries being "
                              "retried or refused) by state", labels=["state"])
    for value, n in data["daemon"]["disks"].items():
        disks.add_metric([value], n)
    retries = GaugeMetricFamily("iscsi_hba_retries_pending",
                                "Enable = on entries waiting for their next attach attempt")
    retries.add_metric([], data["daemon"]["retries_pending"])
    yield from (disks, retries)

    if data.get("workers"):
        labels = ["worker", "pid"]
        cpu = CounterMetricFamily("iscsi_hba_worker_cpu_seconds",
                                  "CPU time of a worker process (user and system)",
                                  labels=labels)
        memory = GaugeMetricFamily("iscsi_hba_worker_resident_memory_bytes",
                                   "Resident memory of a worker process", labels=labels)
        fds = GaugeMetricFamily("iscsi_hba_worker_open_fds",
                                "Open file descriptors of a worker process", labels=labels)
        for w in data["workers"]:
            values = [str(w["worker"]), str(w["pid"])]
            cpu.add_metric(values, w["cpu_seconds"])
            memory.add_metric(values, w["resident_bytes"])
            fds.add_metric(values, w["open_fds"])
        yield from (cpu, memory, fds)


class MetricsCollector:
    """A ``prometheus_client`` collector of the daemon's :func:`sample`, taken in the daemon's
    loop from whichever thread collects."""

    def __init__(self, daemon: Daemon, loop: asyncio.AbstractEventLoop,
                 timeout: float = SCRAPE_TIMEOUT) -> None:
        self._daemon = daemon
        self._loop = loop
        self._timeout = timeout

    def collect(self) -> Iterator[Any]:
        yield from _families(self.take())

    def take(self) -> dict[str, Any]:
        """A sample, from the loop (from another thread: waits up to the timeout)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            return sample(self._daemon)
        # With worker processes the sample is theirs too: asked from the loop.
        result = asyncio.run_coroutine_threadsafe(self._daemon.sample_all(), self._loop)
        try:
            return result.result(self._timeout)
        except concurrent.futures.TimeoutError:
            result.cancel()
            raise HBAError(f"the daemon's event loop did not take a sample within "
                           f"{self._timeout:g} s") from None


def parse_listen_address(text: str) -> tuple[str, int]:
    """``--metrics``/``Metrics`` value: ``PORT`` (loopback), ``HOST:PORT``, ``[IPv6]:PORT``
    or ``HOST`` (port 9433). Raises :class:`ConfigurationError`."""
    value = text.strip()
    number = decimal(value)
    if number is not None:
        host, port = "127.0.0.1", number
    else:
        try:
            host, port = parse_portal(value, default_port=DEFAULT_PORT)
        except ConfigurationError as exc:
            raise ConfigurationError(f"metrics listen address: {exc}") from None
    if not 0 < port < 65536:
        raise ConfigurationError(f"metrics listen address {text!r}: port {port} is not "
                                 "between 1 and 65535")
    return host, port


_WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def metrics_only(app: _WsgiApp) -> _WsgiApp:
    """``app`` (prometheus_client's, which answers ``GET`` on any path) answering ``GET`` and
    ``HEAD`` on :data:`METRICS_PATH` only: 404 for another path, 405 (with ``Allow``) for
    another method, each with a one-line plain-text body."""
    def plain(start_response: Callable[..., Any], status: str, text: str,
              *extra: tuple[str, str]) -> list[bytes]:
        body = (text + "\n").encode()
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                ("Content-Length", str(len(body))), *extra])
        return [body]

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "")
        if environ.get("PATH_INFO", "") != METRICS_PATH:
            return plain(start_response, "404 Not Found",
                         f"not found: this server serves Prometheus metrics on {METRICS_PATH} "
                         "only")
        if method == "GET":
            return app(environ, start_response)
        if method != "HEAD":
            return plain(start_response, "405 Method Not Allowed",
                         f"method not allowed: {METRICS_PATH} answers GET and HEAD only",
                         ("Allow", "GET, HEAD"))
        # HEAD: the headers of a GET (wsgiref sends whatever body it is given, so drop it).
        answer: list[Any] = []
        body = b"".join(app({**environ, "REQUEST_METHOD": "GET"},
                            lambda status, headers, *_: answer.extend((status, headers))))
        status, headers = answer
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [b""]

    return serve


class MetricsServer:
    """``prometheus_client``'s HTTP server for the daemon's metrics (``GET``/``HEAD
    /metrics`` only)."""

    def __init__(self, daemon: Daemon, address: str) -> None:
        self.host, self.port = parse_listen_address(address)
        self._daemon = daemon
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return format_portal(self.host, self.port)

    def registry(self, loop: asyncio.AbstractEventLoop) -> CollectorRegistry:
        from prometheus_client import CollectorRegistry, ProcessCollector

        registry = CollectorRegistry(auto_describe=False)
        registry.register(MetricsCollector(self._daemon, loop))
        ProcessCollector(registry=registry)  # the daemon's CPU, memory, open files
        return registry

    def start(self) -> None:
        """Listen and serve (from the loop that runs the daemon). Raises :class:`HBAError`
        naming the address when it cannot listen."""
        registry = self.registry(asyncio.get_running_loop())
        try:
            self._server, self._thread = _serve(self.host, self.port, registry)
        except OSError as exc:
            raise HBAError(f"cannot serve metrics on {self.address}: "
                           f"{exc.strerror or exc}; give --metrics (or Metrics in the "
                           "configuration) another address or port") from None
        # The actual port (a test may ask for port 0).
        self.port = int(self._server.server_address[1])
        log.info("serving Prometheus metrics on http://%s/metrics", self.address)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5)


def _serve(host: str, port: int, registry: CollectorRegistry
           ) -> tuple[Any, threading.Thread]:
    """A threading WSGI server (as prometheus_client's ``start_http_server``: the address
    family of ``host``, daemon threads, no request log) with :func:`metrics_only` around
    prometheus_client's app and :data:`REQUEST_TIMEOUT` on each client socket; served from a
    daemon thread."""
    import socket
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import make_wsgi_app

    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingMixIn, WSGIServer):
        address_family = family
        daemon_threads = True

    class Handler(WSGIRequestHandler):
        timeout = REQUEST_TIMEOUT

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds are not news for the journal

    server = make_server(str(sockaddr[0]), port, metrics_only(make_wsgi_app(registry)),
                         Server, handler_class=Handler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread
