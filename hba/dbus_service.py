"""The daemon on the system DBus: its control interface and tcmu-runner's handler interface.

Theory of operation
-------------------
One connection to the system bus (dbus-next, on the daemon's own asyncio loop) owns two names:

``org.iscsihba.Daemon``
    object ``/org/iscsihba/Daemon``, interface ``org.iscsihba.Daemon1``: what ``hbactl
    attach/detach/list/status/top`` call (:class:`ControlInterface`). Results are ``a{sv}``
    dictionaries (keys with no value are left out); failures are DBus errors named
    ``org.iscsihba.Error.<Kind>`` whose message is the sentence ``hbactl`` prints. Signals
    ``DiskAttached``, ``DiskDetached`` and ``SessionStateChanged`` follow the daemon's events.

``org.kernel.TCMUService1``
    the name tcmu-runner owns (docs/tcmu-ring.md §7). targetcli lists ``user:<subtype>``
    backstores from ``GetManagedObjects`` at ``/org/kernel/TCMUService1`` (dbus-next answers
    it for every exported path below) and calls ``CheckConfig("iscsi/<cfg>")`` on
    ``/org/kernel/TCMUService1/iscsi`` before it creates a backstore; ``ConfigDesc`` is the
    help text it prints for ``create``. Our ``CheckConfig`` (:func:`check_config`) decodes the
    cfgstring, resolves it and its credentials as the daemon would, logs in and asks the LUN
    its capacity. The backstore targetcli then creates is picked up by the daemon's udev
    watcher and served like any other.

Who may call what is the bus's business (``deploy/dbus/iscsi-hba.conf``): everyone may list
and read, only root may attach, detach, reload or make the daemon log in (``CheckConfig``).

dbus-next derives DBus signatures from annotations; :func:`_method`, :func:`_signal` and
:func:`_property` take the signature as arguments instead, so the Python annotations stay real
types for mypy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from dbus_next import service as _service
from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType, MessageType, NameFlag, PropertyAccess, RequestNameReply
from dbus_next.errors import DBusError
from dbus_next.message import Message
from dbus_next.signature import Variant

from hba import kernel
from hba.errors import AttachError, DetachError, DiskBusyError, HBAError, NoSuchDiskError
from initiator.errors import ISCSIError

if TYPE_CHECKING:
    from hba.daemon import Daemon

log = logging.getLogger("iscsi-hba.dbus")
_untyped: Any = _service  # for the few dbus-next functions without annotations

BUS_NAME = "org.iscsihba.Daemon"
OBJECT_PATH = "/org/iscsihba/Daemon"
INTERFACE = "org.iscsihba.Daemon1"

TCMU_BUS_NAME = "org.kernel.TCMUService1"
TCMU_ROOT = "/org/kernel/TCMUService1"
TCMU_INTERFACE = "org.kernel.TCMUService1"
HANDLER_PATH = f"{TCMU_ROOT}/{kernel.SUBTYPE}"

CHECK_TIMEOUT = 10.0
"""Seconds CheckConfig may spend logging in and asking the LUN (targetcli waits 25 s)."""

VERSION = "0.1.0"


class Errors:
    """The DBus error names of ``org.iscsihba.Daemon1`` (the message is the human sentence)."""

    PREFIX = "org.iscsihba.Error"
    ATTACH_FAILED = f"{PREFIX}.AttachFailed"
    DETACH_FAILED = f"{PREFIX}.DetachFailed"
    IN_USE = f"{PREFIX}.InUse"
    NO_SUCH_DISK = f"{PREFIX}.NoSuchDisk"
    KERNEL_NOT_READY = f"{PREFIX}.KernelNotReady"
    CONFIG = f"{PREFIX}.Configuration"
    FAILED = f"{PREFIX}.Failed"


# --------------------------------------------------------------------------------------------
# dbus-next decorators with explicit signatures

_F = TypeVar("_F", bound=Callable[..., Any])


def _signatures(fn: Callable[..., Any], params: tuple[str, ...], result: str) -> dict[str, str]:
    """DBus signatures as annotations of ``fn``'s parameters (after ``self``) and result."""
    names = list(inspect.signature(fn).parameters)[1:]
    if len(names) != len(params):
        raise TypeError(f"{fn.__name__}: {len(names)} parameters but {len(params)} signatures")
    return {**dict(zip(names, params, strict=True)), "return": result}


def _decorated(fn: Callable[..., Any], signatures: dict[str, str],
               decorator: Callable[[Any], Any]) -> Any:
    """``decorator(fn)`` (a dbus-next one, which reads DBus signatures from annotations) with
    ``signatures`` as ``fn``'s annotations meanwhile; the real ones are put back."""
    saved = dict(fn.__annotations__)
    fn.__annotations__ = signatures
    try:
        return decorator(fn)
    finally:
        fn.__annotations__ = saved


def _method(*params: str, result: str = "", name: str) -> Callable[[_F], _F]:
    """``@dbus_next.service.method(name)`` with the signature given here."""

    def decorate(fn: _F) -> _F:
        return cast(_F, _decorated(fn, _signatures(fn, params, result),
                                   cast(Any, _service.method)(name=name)))

    return decorate


def _signal(*params: str, name: str) -> Callable[[_F], _F]:
    """``@dbus_next.service.signal(name)``: the method returns the signal's arguments."""

    def decorate(fn: _F) -> _F:
        # dbus-next reads only the return type of a signal
        return cast(_F, _decorated(fn, {"return": "".join(params)},
                                   cast(Any, _service.signal)(name=name)))

    return decorate


def _property(signature: str, *, name: str) -> Callable[[Callable[[Any], Any]], Any]:
    """A read-only ``@dbus_next.service.dbus_property`` with the signature given here."""

    def decorate(fn: Callable[[Any], Any]) -> Any:
        return _decorated(fn, _signatures(fn, (), signature), cast(Any, _service.dbus_property)(
            access=PropertyAccess.READ, name=name))

    return decorate


# --------------------------------------------------------------------------------------------
# values


def to_variant(value: Any) -> Variant:
    """A Python value (str, bool, int, float, dict, list; no None) as a DBus variant."""
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        return Variant("x", value)
    if isinstance(value, float):
        return Variant("d", value)
    if isinstance(value, str):
        return Variant("s", value)
    if isinstance(value, Mapping):
        return Variant("a{sv}", vardict(value))
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, Mapping) for v in value):
            return Variant("aa{sv}", [vardict(v) for v in value])
        if all(isinstance(v, str) for v in value):
            return Variant("as", list(value))
        return Variant("av", [to_variant(v) for v in value if v is not None])
    raise TypeError(f"no DBus type for {type(value).__name__}")


def vardict(data: Mapping[str, Any]) -> dict[str, Variant]:
    """``a{sv}`` of a dict; keys whose value is None are left out (DBus has no null)."""
    return {key: to_variant(value) for key, value in data.items() if value is not None}


def unwrap(value: Any) -> Any:
    """The plain Python value of what a DBus reply holds (variants, dicts, lists)."""
    if isinstance(value, Variant):
        return unwrap(value.value)
    if isinstance(value, dict):
        return {key: unwrap(v) for key, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


def _error(name: str, text: str) -> DBusError:
    error: DBusError = cast(Any, DBusError)(name, text)  # dbus-next's __init__ is untyped
    return error


def dbus_error(exc: BaseException, doing: str) -> DBusError:
    """The DBus error a client gets for ``exc``, raised while ``doing`` (e.g. "attach").

    Known errors carry their own sentence; anything else is a bug, logged here with its
    traceback and reported as ``Failed`` without internals.
    """
    from hba.config import ConfigError

    if isinstance(exc, DiskBusyError):
        return _error(Errors.IN_USE, str(exc))
    if isinstance(exc, NoSuchDiskError):
        return _error(Errors.NO_SUCH_DISK, str(exc))
    if isinstance(exc, kernel.KernelSetupError):
        return _error(Errors.KERNEL_NOT_READY, str(exc))
    if isinstance(exc, ConfigError):
        return _error(Errors.CONFIG, str(exc))
    if isinstance(exc, DetachError):
        return _error(Errors.DETACH_FAILED, str(exc))
    if isinstance(exc, (AttachError, HBAError, ISCSIError)):
        name = Errors.DETACH_FAILED if doing == "detach" else Errors.ATTACH_FAILED
        return _error(name, str(exc) or type(exc).__name__)
    log.error("internal error during %s", doing, exc_info=exc)
    return _error(Errors.FAILED,
                     f"the iscsi-hba daemon failed to {doing} because of an internal error "
                     f"({type(exc).__name__}); its log has the details")


# --------------------------------------------------------------------------------------------
# org.iscsihba.Daemon1


class ControlInterface(_service.ServiceInterface):
    """``org.iscsihba.Daemon1`` at ``/org/iscsihba/Daemon``."""

    def __init__(self, daemon: Daemon, ready: asyncio.Event, started: float) -> None:
        super().__init__(INTERFACE)
        self._daemon = daemon
        self._ready = ready
        self._started = started
        self.tcmu_handler = False

    async def _wait_ready(self) -> None:
        # Attach and detach wait for the start (adoption of existing devices) to finish; a
        # client that does not want to wait has its own timeout.
        await self._ready.wait()

    @_method("s", result="a{sv}", name="Attach")
    async def attach(self, what: str) -> dict[str, Variant]:
        """Attach a LUN named by ``iscsi://`` URL or configuration nickname; the reply comes
        once its disk is usable."""
        await self._wait_ready()
        try:
            await asyncio.to_thread(kernel.preflight)
            disk = await self._daemon.attach_described(what)
        except Exception as exc:
            raise dbus_error(exc, "attach") from None
        return vardict(disk)

    @_method("s", "b", result="a{sv}", name="Detach")
    async def detach(self, what: str, force: bool) -> dict[str, Variant]:
        """Detach by name, ``/dev/sdX`` or by-id link; refused while in use unless ``force``."""
        await self._wait_ready()
        try:
            described = await self._daemon.detach(what, force=force)
        except Exception as exc:
            raise dbus_error(exc, "detach") from None
        return vardict(described)

    @_method(result="aa{sv}", name="List")
    async def list_disks(self) -> list[dict[str, Variant]]:
        """Every LUN the daemon serves."""
        await self._refresh()
        return [vardict(disk) for disk in await self._daemon.list_all()]

    @_method(result="a{sv}", name="Status")
    async def status(self) -> dict[str, Variant]:
        """The daemon, its sessions and its disks."""
        await self._refresh()
        status = await self._daemon.status_all()
        status.update(pid=os.getpid(), version=VERSION, ready=self._ready.is_set(),
                      uptime=round(time.monotonic() - self._started, 1),
                      tcmu_handler=self.tcmu_handler)
        return vardict(status)

    @_method(result="a{sv}", name="Metrics")
    async def metrics(self) -> dict[str, Variant]:
        """What every disk and session counted so far (:func:`hba.metrics.sample`): what
        ``hbactl top`` shows, as rates between two calls."""
        return vardict(await self._daemon.sample_all())

    @_method(name="Reload")
    async def reload(self) -> None:
        """Read the configuration file again, attach entries newly enabled in it, and try
        at once those waiting to be tried again."""
        try:
            await self._daemon.reload_config()
        except Exception as exc:
            raise dbus_error(exc, "reload the configuration") from None
        await self._daemon.attach_enabled()

    async def _refresh(self) -> None:
        try:
            await self._daemon.refresh_all()
        except Exception as exc:  # reporting must work even when configfs misbehaves
            log.debug("could not refresh the disks: %s", exc)

    @_signal("a{sv}", name="DiskAttached")
    def disk_attached(self, disk: dict[str, Variant]) -> dict[str, Variant]:
        return disk

    @_signal("a{sv}", name="DiskDetached")
    def disk_detached(self, disk: dict[str, Variant]) -> dict[str, Variant]:
        return disk

    @_signal("s", "s", "s", name="SessionStateChanged")
    def session_state_changed(self, target: str, portal: str, state: str) -> list[str]:
        return [target, portal, state]


# --------------------------------------------------------------------------------------------
# org.kernel.TCMUService1 (tcmu-runner's handler interface, for targetcli)


def config_desc(config_path: str | None) -> str:
    """The help targetcli prints under ``help create`` for ``user:iscsi``."""
    where = config_path or "/etc/iscsi-hba.conf"
    return (
        "iscsi-hba passes the disk through to a remote iSCSI LUN. cfgstring is either the "
        f"nickname of an entry of {where} (the entry holds the address, target name, LUN and "
        "CHAP credentials), e.g. cfgstring=disk1, or <host>%3A<port>/<target-iqn>/<lun> with "
        "every ':' written as %3A (targetcli refuses ':'), e.g. "
        "cfgstring=192.0.2.10%3A3260/iqn.2003-01.org.example%3Adisk1/0 (CHAP credentials then "
        f"come from an entry of {where} with the same target). Never put a secret in it: the "
        "kernel shows it to every user. The iscsi-hba daemon checks that it can log in and "
        "that the LUN answers, serves the backstore as soon as it exists, and the disk "
        "appears once a /loopback LUN links it."
    )


class TcmuHandlerInterface(_service.ServiceInterface):
    """``org.kernel.TCMUService1`` at ``/org/kernel/TCMUService1/iscsi``."""

    def __init__(self, daemon: Daemon, ready: asyncio.Event,
                 timeout: float = CHECK_TIMEOUT) -> None:
        super().__init__(TCMU_INTERFACE)
        self._daemon = daemon
        self._ready = ready
        self._timeout = timeout

    @_property("s", name="ConfigDesc")
    def config_desc(self) -> str:
        return config_desc(self._daemon.options.config_path)

    @_method("s", result="bs", name="CheckConfig")
    async def check_config(self, cfg: str) -> list[Any]:
        """``(true, what was found)`` when the daemon can serve ``cfg``, else ``(false, why)``."""
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), self._timeout)
            except TimeoutError:
                return [False, "the iscsi-hba daemon is still starting; try again in a moment"]
        try:
            ok, message = await check_config(self._daemon, cfg, timeout=self._timeout)
        except Exception as exc:
            ok, message = False, dbus_error(exc, "check the cfgstring").text
        log.info("CheckConfig %s: %s", cfg, message)
        return [ok, message]


async def check_config(daemon: Daemon, cfg: str, *,
                       timeout: float = CHECK_TIMEOUT) -> tuple[bool, str]:
    """Whether the daemon can serve a ``user:iscsi`` backstore with this cfgstring.

    ``cfg`` is ``iscsi/<cfgstring>`` (what targetcli passes) or the bare cfgstring. Checks what
    rtslib and the kernel would refuse without saying why, resolves it as the daemon would
    (nickname or portal form, credentials from the configuration or the environment), logs
    in and reads the LUN's capacity within ``timeout`` seconds.
    """
    # Here rather than at the top: hbactl's clients import this module for its names only.
    from hba import cfgstring
    from hba.control import human_size
    from initiator.client import ScsiClient
    from initiator.transport import Session

    text = cfg.strip()
    subtype, slash, rest = text.partition("/")
    if slash and subtype == kernel.SUBTYPE:
        text = rest
    syntax = ("the nickname of an entry of the configuration, or "
              "<host>%3A<port>/<target-iqn>/<lun>")
    if not text:
        return False, f"the cfgstring is empty: give {syntax}"
    if any(c.isspace() for c in text) or "," in text:
        return False, ("the cfgstring may not contain spaces or ',' (the kernel splits its "
                       "control options there); write ',' as %2C")
    if ":" in text:
        try:
            hint = f": cfgstring={cfgstring.decode(text).encode()}"
        except cfgstring.CfgStringError:
            hint = ""
        return False, f"targetcli (rtslib) refuses ':' in a cfgstring; write each ':' as %3A{hint}"
    if len(kernel.SUBTYPE) + 1 + len(text) > cfgstring.MAX_LENGTH:
        return False, (f"the cfgstring is longer than the kernel's {cfgstring.MAX_LENGTH} "
                       "characters: give the LUN a nickname in the configuration")
    try:
        ref = cfgstring.decode(text)
    except cfgstring.CfgStringError as exc:
        return False, str(exc)
    if ref.nickname is not None:
        config = daemon.config
        if config is None or config.get(ref.nickname) is None:
            await daemon.reload_config()  # the entry may have been added since the start
        config = daemon.config
        if config is None or config.get(ref.nickname) is None:
            where = daemon.options.config_path or "the configuration file"
            return False, (f"{ref.nickname!r} is not the nickname of an entry of {where}: add "
                           f"an entry `{ref.nickname} {{ TargetAddress = ...; TargetName = "
                           "...; }` there, or give <host>%3A<port>/<target-iqn>/<lun>")
    path = daemon.specs.from_cfgstring(text, ref.nickname or "cfgstring")
    spec = path.disk
    where = f"{spec.target} LUN {spec.lun} at {path.portal}"
    session = Session(path.portal, spec.target, dataclasses.replace(
        spec.session, login_timeout=min(spec.session.login_timeout, timeout),
        reconnect_forever=False))
    try:
        async with asyncio.timeout(timeout):
            await session.login()
            capacity = await ScsiClient(session, spec.lun).capacity()
    except TimeoutError:
        return False, (f"{where} did not answer within {timeout:g} s: check that the target "
                       "runs and that this host can reach it")
    except (ISCSIError, OSError) as exc:
        return False, f"{where}: {exc}"
    finally:
        try:
            await session.logout(timeout=2)
        except (ISCSIError, OSError) as exc:
            log.debug("CheckConfig: logout from %s: %s", where, exc)
    size = capacity.size_bytes
    return True, (f"{where} answers: {size} bytes ({human_size(size)}), "
                  f"{capacity.blocks} blocks of {capacity.block_size} bytes")


# --------------------------------------------------------------------------------------------
# the connection


class _Bus(MessageBus):
    """dbus-next's asyncio bus, with one fix for methods that are coroutines.

    dbus-next 0.2.3 sends the error reply for a :class:`DBusError` raised by a method (or by
    its own handlers, e.g. ``Properties.GetAll`` on a path without objects, which targetcli's
    proxies call), then lets the exception escape, and it gets logged with a traceback: for
    every refused attach. Here the reply is sent and that is all; any other exception
    (a bug: our methods convert what they expect) is logged once and answered with
    ``org.iscsihba.Error.Failed`` instead of dbus-next's reply carrying a traceback.
    """

    def _on_message(self, msg: Message) -> None:
        # dbus-next re-raises a DBusError of a method (or of its own Properties handler) after
        # sending it as the error reply, and logs it with a traceback: the reply is all.
        try:
            self._process_message(msg)  # type: ignore[no-untyped-call]
        except DBusError as exc:
            log.debug("%s.%s on %s: %s", msg.interface, msg.member, msg.path, exc.text)
        except Exception:
            log.exception("could not handle a DBus message (%s.%s on %s)", msg.interface,
                          msg.member, msg.path)

    def _make_method_handler(self, interface: Any, method: Any) -> Any:
        if not asyncio.iscoroutinefunction(method.fn):
            return super()._make_method_handler(interface, method)  # type: ignore[no-untyped-call]

        def handler(msg: Message, send_reply: Callable[[Message], None]) -> None:
            def done(fut: asyncio.Future[Any]) -> None:
                reply: Message
                try:
                    result = fut.result()
                    body, fds = _untyped.ServiceInterface._fn_result_to_body(
                        result, method.out_signature_tree)
                    reply = Message.new_method_return(msg, method.out_signature, body, fds)
                except DBusError as exc:
                    reply = cast(Any, exc)._as_message(msg)
                except BaseException as exc:
                    log.error("internal error in %s.%s", interface.name, method.name,
                              exc_info=exc)
                    reply = Message.new_error(
                        msg, Errors.FAILED, f"the iscsi-hba daemon failed {method.name} because "
                        f"of an internal error ({type(exc).__name__}); its log has the details")
                send_reply(reply)

            args = _untyped.ServiceInterface._msg_body_to_args(msg)
            task = asyncio.ensure_future(method.fn(interface, *args))
            task.add_done_callback(done)

        return handler


class BusError(HBAError):
    """The system bus cannot be used: not running, policy missing, name taken."""

    exit_status = 1


class BusNameTaken(BusError):
    """Another process owns ``org.iscsihba.Daemon``."""


class BusPolicyMissing(BusError):
    """The bus does not let us own our names: the policy file is not installed."""

    exit_status = 78


POLICY_HINT = ("install deploy/dbus/iscsi-hba.conf as /etc/dbus-1/system.d/iscsi-hba.conf "
               "(deploy/setup does) and reload the bus (`systemctl reload dbus`)")


class DaemonService:
    """The daemon's connection to the system bus: names, objects, signals.

    ``await DaemonService.connect(daemon)``, ``await claim()`` before the daemon starts (so a
    second daemon refuses before touching any device), :meth:`set_ready` once it has started,
    :meth:`publish` as ``DaemonOptions.on_event``, :meth:`close` at the end.
    """

    def __init__(self, daemon: Daemon, bus: MessageBus) -> None:
        self.daemon = daemon
        self.bus = bus
        self.ready = asyncio.Event()
        self.control = ControlInterface(daemon, self.ready, time.monotonic())
        self.handler = TcmuHandlerInterface(daemon, self.ready)

    @classmethod
    async def connect(cls, daemon: Daemon, *, address: str | None = None) -> DaemonService:
        """Connect to the system bus (``$DBUS_SYSTEM_BUS_ADDRESS`` if set) or ``address``."""
        try:
            unconnected = _Bus(bus_address=address) if address else \
                _Bus(bus_type=BusType.SYSTEM)
            bus: MessageBus = await asyncio.wait_for(unconnected.connect(), 10)
        except Exception as exc:
            raise BusError(
                f"cannot connect to the system DBus ({exc or type(exc).__name__}): is "
                "dbus-daemon running? (`systemctl start dbus`)") from None
        return cls(daemon, bus)

    async def claim(self) -> None:
        """Export the objects, then own ``org.iscsihba.Daemon`` (or raise) and, if nobody
        else does, ``org.kernel.TCMUService1``."""
        self.bus.export(OBJECT_PATH, self.control)
        self.bus.export(HANDLER_PATH, self.handler)
        reply = await self._request(BUS_NAME)
        if reply is RequestNameReply.EXISTS:
            pid = await self._owner_pid(BUS_NAME)
            raise BusNameTaken(
                f"another iscsi-hba daemon{f' (pid {pid})' if pid else ''} already runs: it "
                f"owns {BUS_NAME} on the system DBus. Use it (`hbactl list`), or stop it first "
                "(`systemctl stop iscsi-hba`)")
        reply = await self._request(TCMU_BUS_NAME)
        if reply is RequestNameReply.EXISTS:
            pid = await self._owner_pid(TCMU_BUS_NAME)
            log.warning(
                "%s is owned by another process%s (tcmu-runner?): targetcli will not offer "
                "user:%s backstores; devices created otherwise are still served",
                TCMU_BUS_NAME, f" (pid {pid})" if pid else "", kernel.SUBTYPE)
            self.bus.unexport(HANDLER_PATH)
        else:
            self.control.tcmu_handler = True

    async def _request(self, name: str) -> RequestNameReply:
        try:
            return await self.bus.request_name(name, NameFlag.DO_NOT_QUEUE)
        except DBusError as exc:
            if exc.type == "org.freedesktop.DBus.Error.AccessDenied":
                raise BusPolicyMissing(
                    f"the system DBus does not let this process own {name}: run as root, and "
                    f"{POLICY_HINT}") from None
            raise BusError(f"cannot own {name} on the system DBus: {exc.text}") from None

    async def _owner_pid(self, name: str) -> int | None:
        reply = await self.bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="GetConnectionUnixProcessID",
            signature="s", body=[name]))
        if reply is None or reply.message_type != MessageType.METHOD_RETURN:
            return None
        return int(reply.body[0])

    def set_ready(self) -> None:
        self.ready.set()

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        """Turn a daemon event into a signal (``DaemonOptions.on_event``)."""
        try:
            if kind in ("attach", "adopt"):
                self.control.disk_attached(vardict(data))
            elif kind == "detach":
                self.control.disk_detached(vardict(data))
            elif kind == "session":
                self.control.session_state_changed(
                    str(data.get("target")), str(data.get("portal")), str(data.get("state")))
        except Exception as exc:  # a signal must never break the daemon
            log.debug("could not emit the %s signal: %s", kind, exc)

    async def wait_disconnected(self) -> None:
        """Return when the bus connection is gone (dbus-daemon stopped or restarted)."""
        # Shielded: cancelling this wait must not cancel dbus-next's own disconnect future.
        await asyncio.shield(cast(Any, self.bus).wait_for_disconnect())

    async def close(self) -> None:
        bus: Any = self.bus  # these two methods are untyped in dbus-next
        bus.disconnect()
        try:
            await asyncio.wait_for(bus.wait_for_disconnect(), 5)
        except Exception as exc:  # already gone, or gone with an error: either way, closed
            log.debug("DBus disconnect: %s", exc)


__all__ = [
    "BUS_NAME",
    "HANDLER_PATH",
    "INTERFACE",
    "OBJECT_PATH",
    "TCMU_BUS_NAME",
    "BusError",
    "BusNameTaken",
    "BusPolicyMissing",
    "ControlInterface",
    "DaemonService",
    "Errors",
    "TcmuHandlerInterface",
    "check_config",
    "dbus_error",
    "to_variant",
    "unwrap",
    "vardict",
]
