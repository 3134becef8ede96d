"""An in-memory iSCSI target for unit tests: sans-I/O core plus a small asyncio adapter.

Theory of operation
-------------------
:class:`FakeTarget` is the portal: the target nodes it serves (each with RAM-disk LUNs), its
negotiation preferences, CHAP configuration, command window, and the record of every login
(:class:`LoginRecord`: ISID, the TSIH asked for and the one assigned). :meth:`FakeTarget.connect`
gives a :class:`FakeConnection`, the sans-I/O state machine of one TCP connection: bytes from
the initiator go into :meth:`FakeConnection.receive`, which returns the bytes the target sends
back. Nothing here touches a socket or a clock; :class:`FakeTargetServer` serves the same
objects on a real 127.0.0.1 port for end-to-end tests of :mod:`initiator.transport`.

The target plays by the rules of RFC 7143 with real logic, not canned bytes:

* login (§6): security stage with AuthMethod None or CHAP (:class:`~initiator.chap.ChapTarget`,
  one-way or mutual), operational stage through a target-role
  :class:`~initiator.keys.Negotiator`, C-bit continuation both ways, TSIH assignment, redirects
  and any status class/detail on demand;
* Full Feature Phase: CmdSN/ExpCmdSN/MaxCmdSN (a configurable window), StatSN, SCSI commands
  against RAM disks (INQUIRY with VPD 0x00/0x80/0x83, READ CAPACITY(10/16), READ/WRITE(10/16),
  TEST UNIT READY, REPORT LUNS, SYNCHRONIZE CACHE), R2T generation (FirstBurstLength,
  MaxBurstLength, InitialR2T, ImmediateData, several outstanding R2Ts), Data-In split at the
  initiator's MaxRecvDataSegmentLength with status in the last Data-In or in a SCSI Response,
  sense data and residuals, digests, NOP-In/NOP-Out both ways, Async Messages, Reject, task
  management, Text (SendTargets discovery, with continuation) and Logout.

Everything the initiator does wrong is recorded in :attr:`FakeConnection.violations` (the
target does not crash on it), so a test can assert ``not target.violations()``.

:class:`Hostility` makes the target misbehave on purpose: corrupt digests, wrong ITTs, Data-In
beyond the buffer, R2Ts out of range, bogus StatSN/MaxCmdSN, withheld responses, garbage,
silence, dropped connections; lying lengths and residuals, repeated or misnumbered Data-In,
R2T storms, conditions the SCSI midlayer retries, CHAP garbage.
``FakeConnection.inject``/``inject_bytes`` send anything at all. (Control characters in
INQUIRY strings, target names and addresses need no switch: :class:`RamDisk` and
:class:`TargetNode` take any string.)

:class:`Loopback` wires a :class:`~initiator.login.LoginMachine` and a
:class:`~initiator.session.ConnectionCore` to a :class:`FakeConnection` in memory, the way
:mod:`initiator.transport` does over TCP, for deterministic sans-I/O tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

from initiator import pdu as P
from initiator import serial
from initiator.chap import DEFAULT_ALGORITHMS, ChapAlgorithm, ChapCredentials, ChapTarget
from initiator.errors import AuthenticationError, ISCSIError, NegotiationError
from initiator.keys import (
    MissingParameter,
    NegotiationSettings,
    Negotiator,
    Role,
    SessionParameters,
    SessionType,
)
from initiator.login import LoginMachine, LoginRedirect, LoginSuccess, Portal
from initiator.pdu import Stage
from initiator.reader import PDUReader
from initiator.session import ConnectionCore, TransferParameters
from initiator.text import Pair, TextAssembler, TextSplitter, encode

MASK = 0xFFFFFFFF
RESERVED = P.RESERVED_TAG

# SCSI status and sense (SAM-5, SPC-5).
GOOD = 0x00
CHECK_CONDITION = 0x02
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
ABORTED_COMMAND = 0xB
ASC_INVALID_OPCODE = (0x20, 0x00)
ASC_LBA_OUT_OF_RANGE = (0x21, 0x00)
ASC_INVALID_FIELD_IN_CDB = (0x24, 0x00)
ASC_LUN_NOT_SUPPORTED = (0x25, 0x00)

# SCSI opcodes the RAM disk answers.
TEST_UNIT_READY = 0x00
INQUIRY = 0x12
MODE_SENSE_6 = 0x1A
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
WRITE_10 = 0x2A
SYNCHRONIZE_CACHE_10 = 0x35
READ_16 = 0x88
WRITE_16 = 0x8A
SYNCHRONIZE_CACHE_16 = 0x91
SERVICE_ACTION_IN_16 = 0x9E
READ_CAPACITY_16_SA = 0x10
REPORT_LUNS = 0xA0


# --------------------------------------------------------------------------------------------
# CDB builders for tests


def cdb_test_unit_ready() -> bytes:
    return bytes(6)


def cdb_inquiry(page: int | None = None, allocation_length: int = 255) -> bytes:
    evpd = 0 if page is None else 1
    return struct.pack(">BBBHB", INQUIRY, evpd, page or 0, allocation_length, 0)


def cdb_read_capacity10() -> bytes:
    return bytes((READ_CAPACITY_10,)) + bytes(9)


def cdb_read_capacity16(allocation_length: int = 32) -> bytes:
    return struct.pack(">BBQIBB", SERVICE_ACTION_IN_16, READ_CAPACITY_16_SA, 0,
                       allocation_length, 0, 0)


def cdb_read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", READ_10, 0, lba, 0, blocks, 0)


def cdb_write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", WRITE_10, 0, lba, 0, blocks, 0)


def cdb_read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", READ_16, 0, lba, blocks, 0, 0)


def cdb_write16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", WRITE_16, 0, lba, blocks, 0, 0)


def fixed_sense(key: int, asc: int, ascq: int) -> bytes:
    """Fixed-format sense data (SPC-5 §4.4.3): response code 70h, 18 bytes."""
    sense = bytearray(18)
    sense[0] = 0x70
    sense[2] = key & 0x0F
    sense[7] = 10
    sense[12] = asc
    sense[13] = ascq
    return bytes(sense)


def sense_key_asc(sense: bytes) -> tuple[int, int, int]:
    """(sense key, ASC, ASCQ) of fixed-format sense data."""
    return sense[2] & 0x0F, sense[12], sense[13]


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class RamDisk:
    """One LUN: a block device held in a bytearray."""

    blocks: int = 2048
    block_size: int = 512
    vendor: str = "FAKE"
    product: str = "RAMDISK"
    revision: str = "0001"
    serial: str = "FAKE0001"
    naa: int = 0x6001405FA4E00001
    peripheral_type: int = 0x00
    """INQUIRY peripheral device type: 0 a disk, 0x0C a storage array controller (what tgt
    puts at LUN 0)."""
    data: bytearray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.data = bytearray(self.blocks * self.block_size)

    @property
    def size(self) -> int:
        return self.blocks * self.block_size

    def fill_pattern(self) -> None:
        """Give every block a recognisable content (tests compare what they read)."""
        size = len(self.data)
        block = bytes((i * 7) & 0xFF for i in range(self.block_size))
        for lba in range(self.blocks):
            # Each block differs from the others: its LBA is in its first eight bytes.
            start = lba * self.block_size
            self.data[start : start + self.block_size] = block
            self.data[start : start + 8] = lba.to_bytes(8, "big")
        del self.data[size:]


@dataclass
class TargetNode:
    """A target node: its name, LUNs, and the TargetAddress values SendTargets lists for it
    (empty: the portal's own address)."""

    name: str
    luns: dict[int, RamDisk] = field(default_factory=lambda: {0: RamDisk()})
    addresses: tuple[str, ...] = ()
    alias: str | None = None
    announce_portal: bool = True
    """Without ``addresses``, list the portal's own address (False: list no address at all,
    which means "the portal you asked", RFC 7143 Appendix C)."""
    refuse_login: tuple[int, int] | None = None
    """Answer every normal-session login to this node with this status class/detail (an
    ACL: (2, 2) "authorization failure"); SendTargets still lists it."""


@dataclass
class LoginRecord:
    """One login attempt as the target saw it."""

    connection: int
    isid: int
    tsih_requested: int
    cid: int
    initiator_name: str | None = None
    target_name: str | None = None
    session_type: str = "Normal"
    tsih: int = 0
    """The TSIH assigned (0 until the login succeeded)."""
    status: tuple[int, int] = (0, 0)
    auth_method: str | None = None
    chap_algorithm: ChapAlgorithm | None = None
    parameters: SessionParameters | None = None


LoginHook = Callable[[P.LoginRequest, P.LoginResponse], "P.LoginResponse | bytes | None"]
PduHook = Callable[["FakeConnection", P.PDU], bool]


@dataclass
class Hostility:
    """Misbehaviours, all off by default. Tests set the fields they need."""

    # -- login
    login_status: tuple[int, int] | None = None
    """Answer with this status class/detail (in stage ``login_status_stage``)."""
    login_status_stage: int | None = None
    """The stage (CSG) whose request gets ``login_status`` (None: the first request)."""
    redirect: tuple[str, bool] | None = None
    """(TargetAddress, permanent): redirect every login."""
    force_auth_method: str | None = None
    """Answer AuthMethod with this value whatever was offered."""
    skip_chap: bool = False
    """Leave the security stage at once even though AuthMethod=CHAP was agreed."""
    skip_mutual_response: bool = False
    """Do not send CHAP_N/CHAP_R back when the initiator asks for mutual CHAP."""
    version_active: int = 0
    login_itt_xor: int = 0
    login_isid_xor: int = 0
    zero_tsih: bool = False
    hold_transit: int = 0
    """Answer that many transit requests with T=0 before moving on."""
    login_hook: LoginHook | None = None
    """Called with each request and the response about to go out; may return a replacement
    response, raw bytes to send instead, or None to keep the response."""
    # -- full feature phase
    wrong_itt: bool = False
    data_in_overrun: int = 0
    r2t_out_of_range: bool = False
    bogus_stat_sn: bool = False
    bogus_window: bool = False
    corrupt_header_digest: int = 0
    """Corrupt the header digest of that many PDUs."""
    corrupt_data_digest: int = 0
    withhold: bool = False
    """Accept SCSI commands (and their data) but send no status until released."""
    silent: bool = False
    """Answer nothing at all in Full Feature Phase (NOP-Outs included)."""
    drop_after_commands: int | None = None
    """Drop the connection, unanswered, when this many SCSI commands have arrived."""
    drop_connections: int | None = None
    """How many connections ``drop_after_commands`` drops (None: every one). The target counts
    them itself: a test that switched the drop off once it saw it would race the initiator's
    reconnect, which can re-issue the commands before the test's next look."""
    garbage_after_login: bytes = b""
    """Bytes sent right after the final Login Response."""
    pdu_hook: PduHook | None = None
    """Sees every Full Feature Phase PDU first; returning True skips the normal handling."""
    # -- lying about lengths (tests/unit/test_hostile_target.py)
    data_in_opcodes: frozenset[int] | None = None
    """The data_in_*, residual_* and overflow_* lies apply to these SCSI opcodes (None: all)."""
    data_in_withheld: int = 0
    """Leave the last that many bytes of a command's data out of its Data-In; the status
    reports them as an underflow residual unless ``residual_claim`` says otherwise."""
    residual_claim: int | None = None
    """Report this underflow residual whatever was sent (0: no U bit, as if complete)."""
    overflow_claim: int = 0
    """Report an overflow residual of that many bytes."""
    data_in_repeat_first: bool = False
    """Send the first Data-In PDU of a command twice (same offset and DataSN)."""
    data_sn_skip: bool = False
    """Number a command's Data-In PDUs from 1 instead of 0."""
    # -- R2T storms (tests/unit/test_hostile_target.py)
    r2t_repeat: int = 0
    """Ask for each R2T's range that many times more, each time with the next R2TSN and a
    TTT of its own (an R2T storm: megabytes of Data-Out for a 4 KiB write)."""
    r2t_ignore_max_outstanding: bool = False
    """Send every R2T of a write at once, whatever MaxOutstandingR2T says."""
    r2t_sn_offset: int = 0
    """Add this to every R2TSN."""
    r2t_length_extra: int = 0
    """Ask for that many bytes more than MaxBurstLength allows in each R2T."""
    # -- conditions the SCSI midlayer retries (tests/unit/test_hostile_target.py)
    fail_first: int = 0
    """End that many SCSI commands (of ``fail_opcodes``) with ``fail_status`` first."""
    fail_status: int = 0x02
    """CHECK CONDITION (with ``fail_sense``), BUSY (0x08), TASK SET FULL (0x28) ..."""
    fail_sense: tuple[int, int, int] = (0x6, 0x29, 0x00)
    """Sense key, ASC, ASCQ: by default UNIT ATTENTION, POWER ON OR RESET OCCURRED."""
    fail_opcodes: frozenset[int] | None = None
    """The commands ``fail_first`` applies to (None: all)."""
    # -- REPORT LUNS lies (tests/unit/test_report_luns.py)
    report_luns_length: int | None = None
    """Put this LUN LIST LENGTH in the REPORT LUNS header whatever the list holds."""
    report_luns_extra: tuple[int, ...] = ()
    """List these 8-byte LUN fields too, after the node's own (duplicates, several levels)."""
    # -- CHAP garbage (tests/unit/test_hostile_target.py)
    chap_replace: dict[str, str] = field(default_factory=dict)
    """Send these values instead of the real ones for the CHAP keys the target sends
    (CHAP_A, CHAP_I, CHAP_C; CHAP_N, CHAP_R of the mutual answer)."""
    chap_drop: tuple[str, ...] = ()
    """Leave these CHAP keys out of the target's CHAP messages."""
    # -- recovery and liveness (issue 10: bounds, progress, reinstatement)
    ping_with_final_login_response: bool = False
    """Send a NOP-In ping right behind the final Login Response, in the same write, framed
    with the negotiated digests (legal: Full Feature Phase starts after it, §13.12)."""


class ConnState(enum.Enum):
    LOGIN = "login"
    FULL_FEATURE = "full feature phase"
    LOGGED_OUT = "logged out"
    CLOSED = "closed"


class FakeTarget:
    """The portal: nodes, policies, and what happened (see the module docstring)."""

    def __init__(
        self,
        nodes: Sequence[TargetNode] | None = None,
        *,
        settings: NegotiationSettings | None = None,
        chap: ChapCredentials | None = None,
        chap_algorithms: Sequence[ChapAlgorithm] = DEFAULT_ALGORITHMS,
        require_mutual: bool = False,
        discovery_chap: bool = False,
        auth_methods: tuple[str, ...] | None = None,
        portal_group_tag: int = 1,
        cmd_window: int = 32,
        login_window: int | None = None,
        phase_collapse: bool = True,
        login_chunk: int | None = None,
        text_chunk: int | None = None,
        initial_stat_sn: int = 0x1000,
        first_tsih: int = 0x10,
        portal_address: str = "127.0.0.1:3260",
        logout_time2wait: int = 0,
        hostile: Hostility | None = None,
    ) -> None:
        self.nodes: list[TargetNode] = list(nodes) if nodes is not None else [
            TargetNode("iqn.2003-01.org.example:disk1")]
        self.settings = settings or NegotiationSettings.rfc_defaults()
        self.chap = chap
        self.chap_algorithms = tuple(chap_algorithms)
        self.require_mutual = require_mutual
        self.discovery_chap = discovery_chap
        self.auth_methods = auth_methods
        self.portal_group_tag = portal_group_tag
        self.cmd_window = cmd_window
        self.login_window = login_window
        """The window the Login Responses announce, when it is not ``cmd_window`` (LIO
        announces one command and opens the window to its queue depth only after)."""
        self.phase_collapse = phase_collapse
        self.login_chunk = login_chunk
        self.text_chunk = text_chunk
        self.initial_stat_sn = initial_stat_sn
        self.next_tsih = first_tsih
        self.portal_address = portal_address
        self.logout_time2wait = logout_time2wait
        self.hostile = hostile or Hostility()
        self.logins: list[LoginRecord] = []
        self.connections: list[FakeConnection] = []
        self.report_luns_allocations: list[int] = []
        """The allocation length of every REPORT LUNS, in order."""

    @property
    def node(self) -> TargetNode:
        """The first node (most tests have one)."""
        return self.nodes[0]

    @property
    def disk(self) -> RamDisk:
        """LUN 0 of the first node."""
        return self.nodes[0].luns[0]

    def find(self, name: str) -> TargetNode | None:
        return next((n for n in self.nodes if n.name == name), None)

    def connect(self) -> FakeConnection:
        """A new connection (the server calls this on accept)."""
        conn = FakeConnection(self, len(self.connections))
        self.connections.append(conn)
        return conn

    def violations(self) -> list[str]:
        """Every rule the initiator broke, on every connection."""
        return [v for c in self.connections for v in c.violations]

    def successful_logins(self) -> list[LoginRecord]:
        return [r for r in self.logins if r.tsih]

    def allocate_tsih(self) -> int:
        tsih = self.next_tsih
        self.next_tsih = (self.next_tsih + 1) & 0xFFFF or 1
        return tsih


# --------------------------------------------------------------------------------------------
# One connection


@dataclass
class _R2T:
    ttt: int
    offset: int
    length: int
    next_offset: int
    data_sn: int = 0


@dataclass
class _Task:
    itt: int
    lun: int
    cdb: bytes
    edtl: int
    read: bool
    write: bool
    cmd_sn: int
    need: int = 0
    cdb_bytes: int = 0
    data: bytearray = field(default_factory=bytearray)
    received: int = 0
    unsol_open: bool = False
    unsol_next: int = 0
    unsol_data_sn: int = 0
    next_r2t: int = 0
    r2t_sn: int = 0
    r2ts: dict[int, _R2T] = field(default_factory=dict)
    held: bool = False


class _Numbers(TypedDict):
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int


class _ScsiFailure(Exception):
    def __init__(self, key: int, asc_ascq: tuple[int, int]) -> None:
        super().__init__(f"sense {key:x}/{asc_ascq[0]:02x}/{asc_ascq[1]:02x}")
        self.sense = fixed_sense(key, *asc_ascq)


class FakeConnection:
    """One connection of the fake target, sans-I/O: ``receive(bytes) -> bytes``."""

    def __init__(self, target: FakeTarget, index: int) -> None:
        self.target = target
        self.index = index
        self.state = ConnState.LOGIN
        self.violations: list[str] = []
        self.received: list[P.PDU] = []
        self.closing = False
        """The target wants the connection closed once the output is sent."""
        self.dropped = False
        """The target dropped the connection without a word (abort, not close)."""
        self.wakeup: Callable[[], None] | None = None
        """Set by the server: called when output appears outside :meth:`receive`."""
        self.record: LoginRecord | None = None
        self.node: TargetNode | None = None
        self.params: SessionParameters | None = None
        self.stat_sn = target.initial_stat_sn
        self.exp_cmd_sn = 0
        self.window = target.cmd_window
        self.tasks: dict[int, _Task] = {}
        self.held: list[_Task] = []
        self.finished: set[int] = set()
        self.commands_seen = 0
        self.reject_next: dict[P.Opcode, P.RejectReason] = {}
        self.tmf_responses: dict[P.TMFunction, P.TMResponse] = {}
        self.logout_response = P.LogoutResponseCode.CLOSED
        self.pings_outstanding: set[int] = set()
        self.ping_answers: list[int] = []
        self.text_assemblers: dict[int, TextAssembler] = {}
        self.text_out: dict[int, tuple[int, TextSplitter]] = {}
        self._next_ttt = 0x100
        self._out = bytearray()
        self._reader = PDUReader(max_data_segment_length=8192)
        self._hd = False
        self._dd = False
        # login state
        self._stage = Stage.SECURITY
        self._negotiator: Negotiator | None = None
        self._chap: ChapTarget | None = None
        self._auth: str | None = None
        self._login_in = TextAssembler()
        self._login_out: TextSplitter | None = None
        self._login_out_transit = False
        self._login_out_nsg = Stage.SECURITY
        self._login_out_final = False
        self._holds = target.hostile.hold_transit

    # -- I/O -----------------------------------------------------------------------------

    def receive(self, data: bytes | bytearray | memoryview) -> bytes:
        """Bytes from the initiator in; the bytes to send back out."""
        if self.state is ConnState.CLOSED or self.dropped:
            return b""
        try:
            pdus = self._reader.feed(data)
        except ISCSIError as exc:
            self._violation(f"undecodable bytes from the initiator: {exc}")
            pdus = []
            self.closing = True
        for pdu in pdus:
            if self.dropped or self.state in (ConnState.CLOSED, ConnState.LOGGED_OUT):
                if not self.dropped:
                    self._violation(f"{type(pdu).__name__} after the connection was closed")
                break
            self.received.append(pdu)
            if self.state is ConnState.LOGIN:
                self._on_login_pdu(pdu)
            else:
                self._on_ffp_pdu(pdu)
        return self.data_to_send()

    def data_to_send(self) -> bytes:
        if self.dropped:
            self._out.clear()
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    def connection_lost(self) -> None:
        """The TCP connection is gone (called by the server)."""
        self.state = ConnState.CLOSED

    def drop(self) -> None:
        """Vanish: no more output, the server aborts the connection."""
        self.dropped = True
        self.closing = True
        self._out.clear()
        self._wake()

    def _wake(self) -> None:
        if self.wakeup is not None:
            self.wakeup()

    def _violation(self, text: str) -> None:
        self.violations.append(text)

    def _send(self, pdu: P.PDU) -> None:
        raw = bytearray(P.encode(pdu, header_digest=self._hd, data_digest=self._dd))
        hostile = self.target.hostile
        if self._hd and hostile.corrupt_header_digest > 0 and self.state is not ConnState.LOGIN:
            hostile.corrupt_header_digest -= 1
            end = P.BHS_LEN + len(pdu.ahs_bytes())
            raw[end] ^= 0x01
        if (self._dd and len(pdu.data) and hostile.corrupt_data_digest > 0
                and self.state is not ConnState.LOGIN):
            hostile.corrupt_data_digest -= 1
            raw[-1] ^= 0x80
        self._out += raw

    def inject(self, pdu: P.PDU) -> None:
        """Send any PDU, framed with the connection's digests."""
        self._send(pdu)
        self._wake()

    def inject_bytes(self, raw: bytes) -> None:
        """Send raw bytes (garbage, truncated PDUs ...)."""
        self._out += raw
        self._wake()

    # -- sequence numbers ----------------------------------------------------------------

    def _stat(self, advance: bool = True) -> int:
        sn = self.stat_sn
        if advance:
            self.stat_sn = (sn + 1) & MASK
        if self.target.hostile.bogus_stat_sn:
            sn = (sn + 0x01000000) & MASK
        return sn

    @property
    def max_cmd_sn(self) -> int:
        if self.target.hostile.bogus_window:
            return (self.exp_cmd_sn - 10) & MASK
        return (self.exp_cmd_sn - 1 + max(0, self.window - len(self.held))) & MASK

    def _alloc_ttt(self) -> int:
        ttt = self._next_ttt
        self._next_ttt = (ttt + 1) & 0x7FFFFFFF or 0x100
        return ttt

    # -- login ---------------------------------------------------------------------------

    def _on_login_pdu(self, pdu: P.PDU) -> None:
        if not isinstance(pdu, P.LoginRequest):
            self._violation(f"{type(pdu).__name__} during login")
            self._login_reject(None, (2, 0x0B))
            return
        req = pdu
        target = self.target
        hostile = target.hostile
        if self.record is None:
            self.record = LoginRecord(connection=self.index, isid=req.isid,
                                      tsih_requested=req.tsih, cid=req.cid)
            target.logins.append(self.record)
            self.exp_cmd_sn = req.cmd_sn
            if hostile.redirect is not None:
                address, permanent = hostile.redirect
                self._login_reject(req, (1, 2 if permanent else 1),
                                   encode([("TargetAddress", address)]))
                return
        if req.version_min > 0:
            self._login_reject(req, (2, 0x05))
            return
        if hostile.login_status is not None and (
                int(req.csg) == hostile.login_status_stage
                or (hostile.login_status_stage is None and self._negotiator is None)):
            self._login_reject(req, hostile.login_status)
            return
        if req.csg is Stage.OPERATIONAL and self._stage is Stage.SECURITY and \
                self._negotiator is None:
            self._stage = Stage.OPERATIONAL  # no security stage at all (§6.3)
        if req.cont:
            # A piece of a longer text: acknowledge it with an empty response (§6.5).
            try:
                self._login_in.feed(req.data, True)
            except ISCSIError as exc:
                self._violation(str(exc))
                self._login_reject(req, (2, 0))
                return
            self._login_respond(req, transit=False, nsg=req.csg, data=b"",
                                cont=False, final=False)
            return
        if self._login_out is not None and not self._login_out.done:
            if req.data:
                self._violation("the initiator sent keys while fetching the rest of our text")
            self._next_login_piece(req)
            return
        try:
            pairs = self._login_in.feed(req.data, False) or []
        except ISCSIError as exc:
            self._violation(f"malformed login text: {exc}")
            self._login_reject(req, (2, 0))
            return
        stage = req.csg
        if stage is not self._stage:
            self._violation(f"login request in stage {stage.name} while in {self._stage.name}")
            self._login_reject(req, (2, 0x0B))
            return
        if self._negotiator is None and not self._start_negotiation(req, pairs):
            return
        assert self._negotiator is not None and self.record is not None
        if stage is Stage.OPERATIONAL and self.record.auth_method is None:
            # The login skipped the security stage: fine unless we require authentication
            # (LIO and tgtd answer 0201 then).
            if "None" not in self._negotiator_auth_methods():
                self._violation("the initiator skipped authentication")
                self._login_reject(req, (2, 0x01))
                return
            self.record.auth_method = "None"
        try:
            if stage is Stage.SECURITY:
                self._security(req, pairs)
            else:
                self._operational(req, pairs)
        except MissingParameter as exc:
            self._violation(str(exc))
            self._login_reject(req, (2, 0x07))
        except AuthenticationError as exc:
            self._violation(f"authentication: {exc}")
            self._login_reject(req, (2, 0x01))
        except NegotiationError as exc:
            self._violation(f"negotiation: {exc}")
            self._login_reject(req, (2, 0x00))

    def _start_negotiation(self, req: P.LoginRequest, pairs: list[Pair]) -> bool:
        target = self.target
        keys = dict(pairs)
        record = self.record
        assert record is not None
        record.initiator_name = keys.get("InitiatorName")
        session_type = keys.get("SessionType", "Normal")
        record.session_type = session_type
        record.target_name = keys.get("TargetName")
        if record.initiator_name is None:
            self._violation("the first login request lacks InitiatorName")
            self._login_reject(req, (2, 0x07))
            return False
        discovery = session_type == SessionType.DISCOVERY.value
        if not discovery:
            if record.target_name is None:
                self._violation("a normal session without TargetName")
                self._login_reject(req, (2, 0x07))
                return False
            self.node = target.find(record.target_name)
            if self.node is None:
                self._login_reject(req, (2, 0x03))
                return False
            if self.node.refuse_login is not None:
                self._login_reject(req, self.node.refuse_login)
                return False
        elif req.tsih == 0 and record.target_name is not None:
            self._violation("TargetName sent on a discovery session")
        if req.tsih != 0 and not any(
                r.tsih == req.tsih and r.isid == req.isid for r in target.logins):
            self._login_reject(req, (2, 0x0A))
            return False
        chap_wanted = target.chap is not None and (not discovery or target.discovery_chap)
        methods = target.auth_methods or (("CHAP",) if chap_wanted else ("None",))
        settings = dataclasses.replace(
            target.settings, auth_methods=methods,
            target_portal_group_tag=target.portal_group_tag,
            target_alias=self.node.alias if self.node is not None else None)
        self._negotiator = Negotiator(Role.TARGET, settings,
                                      peer=f"initiator {record.initiator_name}")
        if target.chap is not None:
            self._chap = ChapTarget(target.chap, initiator=record.initiator_name,
                                    algorithms=target.chap_algorithms,
                                    require_mutual=target.require_mutual)
        return True

    def _security(self, req: P.LoginRequest, pairs: list[Pair]) -> None:
        neg = self._negotiator
        assert neg is not None and self.record is not None
        hostile = self.target.hostile
        got = neg.receive(pairs, Stage.SECURITY)
        answers = list(got.answers)
        if hostile.force_auth_method is not None:
            answers = [(k, hostile.force_auth_method if k == "AuthMethod" else v)
                       for k, v in answers]
        answers += neg.offer(Stage.SECURITY)
        method = neg.auth_method
        if "AuthMethod" in neg.rejected and method is None:
            raise AuthenticationError("no acceptable AuthMethod was offered")
        self.record.auth_method = method
        if got.deferred:
            if method != "CHAP" or self._chap is None:
                self._violation("CHAP keys without AuthMethod=CHAP")
                self._login_reject(req, (2, 0x0B))
                return
            if hostile.skip_chap:
                self._login_text(req, answers, transit=True, nsg=Stage.OPERATIONAL)
                return
            answers += self._chap.receive(got.deferred)
            self.record.chap_algorithm = self._chap.algorithm
            if hostile.skip_mutual_response:
                answers = [(k, v) for k, v in answers if k not in ("CHAP_N", "CHAP_R")]
            answers = [(k, hostile.chap_replace.get(k, v)) for k, v in answers
                       if k not in hostile.chap_drop]
        if method is None and req.transit:
            # No AuthMethod negotiated at all: acceptable only when we need none.
            wanted = self._negotiator_auth_methods()
            if "None" not in wanted:
                raise AuthenticationError("the initiator skipped authentication")
            method = "None"
        auth_done = (method == "None"
                     or (method == "CHAP" and self._chap is not None and self._chap.done))
        transit = req.transit and auth_done
        nsg = req.nsg if transit else Stage.SECURITY
        self._login_text(req, answers, transit=transit, nsg=nsg)

    def _negotiator_auth_methods(self) -> tuple[str, ...]:
        target = self.target
        record = self.record
        assert record is not None
        discovery = record.session_type == SessionType.DISCOVERY.value
        chap_wanted = target.chap is not None and (not discovery or target.discovery_chap)
        return target.auth_methods or (("CHAP",) if chap_wanted else ("None",))

    def _operational(self, req: P.LoginRequest, pairs: list[Pair]) -> None:
        neg = self._negotiator
        assert neg is not None
        got = neg.receive(pairs, Stage.OPERATIONAL)
        if got.deferred:
            self._violation(f"{got.deferred[0][0]} in the operational stage")
            self._login_reject(req, (2, 0x0B))
            return
        answers = list(got.answers) + neg.offer(Stage.OPERATIONAL)
        # Offers of the initiator answered in this response need no further round; offers of
        # ours (still awaited by the negotiator) need their answers first.
        transit = req.transit and int(req.nsg) == Stage.FULL_FEATURE and neg.complete
        self._login_text(req, answers, transit=transit,
                         nsg=Stage.FULL_FEATURE if transit else Stage.OPERATIONAL)

    def _login_text(self, req: P.LoginRequest, pairs: list[Pair], *, transit: bool,
                    nsg: Stage) -> None:
        if transit and self._holds > 0:
            self._holds -= 1
            transit = False
            nsg = self._stage
        chunk = self.target.login_chunk or 8192
        self._login_out = TextSplitter(encode(pairs), chunk)
        self._login_out_transit = transit
        self._login_out_nsg = nsg
        self._next_login_piece(req)

    def _next_login_piece(self, req: P.LoginRequest) -> None:
        assert self._login_out is not None
        piece = self._login_out.next_segment()
        transit = self._login_out_transit and not piece.more
        nsg = self._login_out_nsg if transit else self._stage
        final = transit and nsg is Stage.FULL_FEATURE
        self._login_respond(req, transit=transit, nsg=nsg, data=piece.data, cont=piece.more,
                            final=final)

    def _login_respond(self, req: P.LoginRequest, *, transit: bool, nsg: Stage, data: bytes,
                       cont: bool, final: bool) -> None:
        hostile = self.target.hostile
        tsih = 0
        params: SessionParameters | None = None
        if final:
            assert self._negotiator is not None and self.record is not None
            try:
                params = self._negotiator.finish()
            except MissingParameter as exc:
                self._violation(str(exc))
                self._login_reject(req, (2, 0x07))
                return
            except NegotiationError as exc:
                self._violation(f"negotiation: {exc}")
                self._login_reject(req, (2, 0x00))
                return
            tsih = req.tsih or self.target.allocate_tsih()
            self.record.tsih = tsih
            self.record.parameters = params
        csg = self._stage
        response = P.LoginResponse(
            transit=transit, cont=cont, csg=csg, nsg=nsg,
            version_max=0, version_active=hostile.version_active,
            isid=req.isid ^ hostile.login_isid_xor,
            tsih=0 if hostile.zero_tsih else tsih, itt=req.itt ^ hostile.login_itt_xor,
            stat_sn=self._stat(), exp_cmd_sn=self.exp_cmd_sn,
            max_cmd_sn=(self.exp_cmd_sn - 1 + (self.target.login_window or self.window)) & MASK,
            data=data)
        self._emit_login(req, response)
        if transit:
            self._stage = nsg
        if final and params is not None:
            self._enter_ffp(params)

    def _login_reject(self, req: P.LoginRequest | None, status: tuple[int, int],
                      data: bytes = b"") -> None:
        if self.record is not None:
            self.record.status = status
        response = P.LoginResponse(
            csg=self._stage, version_max=0, version_active=0,
            isid=req.isid if req else 0, itt=req.itt if req else 0, stat_sn=self._stat(),
            exp_cmd_sn=self.exp_cmd_sn, max_cmd_sn=self.exp_cmd_sn,
            status_class=status[0], status_detail=status[1], data=data)
        if req is not None:
            self._emit_login(req, response)
        else:
            self._send(response)
        # §6.5 / §11.13.5: after a login reject the target closes the connection.
        self.closing = True
        self.state = ConnState.LOGGED_OUT

    def _emit_login(self, req: P.LoginRequest, response: P.LoginResponse) -> None:
        hook = self.target.hostile.login_hook
        if hook is not None:
            replaced = hook(req, response)
            if isinstance(replaced, bytes):
                self._out += replaced
                return
            if replaced is not None:
                response = replaced
        self._send(response)

    def _enter_ffp(self, params: SessionParameters) -> None:
        self.params = params
        self.state = ConnState.FULL_FEATURE
        self._hd = params.header_digest
        self._dd = params.data_digest
        self._reader.header_digest = params.header_digest
        self._reader.data_digest = params.data_digest
        self._reader.max_data_segment_length = params.max_recv_data_segment_length
        # Reinstatement (§6.3.5): a new session with the ISID of an old one replaces it.
        record = self.record
        assert record is not None
        for other in self.target.connections:
            if other is not self and other.record is not None and \
                    other.record.isid == record.isid and other.state is ConnState.FULL_FEATURE:
                other.state = ConnState.CLOSED
                other.closing = True
                other._wake()
        garbage = self.target.hostile.garbage_after_login
        if garbage:
            self._out += garbage
        if self.target.hostile.ping_with_final_login_response:
            self.send_ping(b"right behind the login")

    # -- full feature phase: dispatch -----------------------------------------------------

    def _on_ffp_pdu(self, pdu: P.PDU) -> None:
        hostile = self.target.hostile
        if hostile.pdu_hook is not None and hostile.pdu_hook(self, pdu):
            return
        if not self._check_sequence(pdu):
            return
        reason = self.reject_next.pop(P.Opcode(pdu.OPCODE), None)
        if reason is not None:
            self.send_reject(reason, P.encode(pdu)[: P.BHS_LEN])
            return
        if hostile.silent:
            return
        if isinstance(pdu, P.ScsiCommand):
            self._on_command(pdu)
        elif isinstance(pdu, P.DataOut):
            self._on_data_out(pdu)
        elif isinstance(pdu, P.NopOut):
            self._on_nop_out(pdu)
        elif isinstance(pdu, P.TaskMgmtRequest):
            self._on_tmf(pdu)
        elif isinstance(pdu, P.TextRequest):
            self._on_text(pdu)
        elif isinstance(pdu, P.LogoutRequest):
            self._on_logout(pdu)
        else:
            self._violation(f"unexpected {type(pdu).__name__} in Full Feature Phase")
            self.send_reject(P.RejectReason.PROTOCOL_ERROR, P.encode(pdu)[: P.BHS_LEN])

    def _check_sequence(self, pdu: P.PDU) -> bool:
        """CmdSN rules of §4.2.2.1 for the PDUs that carry a CmdSN."""
        if isinstance(pdu, P.DataOut | P.SnackRequest):
            return True
        cmd_sn: int = getattr(pdu, "cmd_sn", 0)
        immediate: bool = getattr(pdu, "immediate", False)
        exp_stat_sn: int = getattr(pdu, "exp_stat_sn", 0)
        if serial.gt(exp_stat_sn, self.stat_sn):
            self._violation(f"{type(pdu).__name__} acknowledges StatSN {exp_stat_sn - 1} "
                            f"that was never sent (next is {self.stat_sn})")
        if immediate:
            if cmd_sn != self.exp_cmd_sn:
                self._violation(f"immediate {type(pdu).__name__} carries CmdSN {cmd_sn}, "
                                f"expected {self.exp_cmd_sn}")
            return True
        if cmd_sn != self.exp_cmd_sn:
            self._violation(f"{type(pdu).__name__} with CmdSN {cmd_sn}, expected "
                            f"{self.exp_cmd_sn}")
        elif not serial.le(cmd_sn, self.max_cmd_sn):
            self._violation(f"{type(pdu).__name__} with CmdSN {cmd_sn} outside the window "
                            f"(MaxCmdSN {self.max_cmd_sn})")
        self.exp_cmd_sn = (cmd_sn + 1) & MASK
        return True

    def _status_fields(self, advance: bool = True) -> _Numbers:
        return {"stat_sn": self._stat(advance), "exp_cmd_sn": self.exp_cmd_sn,
                "max_cmd_sn": self.max_cmd_sn}

    def _reply_itt(self, itt: int) -> int:
        return itt ^ 0x00FF0000 if self.target.hostile.wrong_itt else itt

    # -- SCSI commands --------------------------------------------------------------------

    def _on_command(self, pdu: P.ScsiCommand) -> None:
        assert self.params is not None
        self.commands_seen += 1
        hostile = self.target.hostile
        limit = hostile.drop_after_commands
        if limit is not None and self.commands_seen >= limit and hostile.drop_connections != 0:
            if hostile.drop_connections is not None:
                hostile.drop_connections -= 1
            self.drop()
            return
        if self.record is not None and self.record.session_type == "Discovery":
            self._violation("SCSI command on a discovery session")
            self.send_reject(P.RejectReason.PROTOCOL_ERROR, P.encode(pdu)[: P.BHS_LEN])
            return
        if pdu.itt in self.tasks:
            self._violation(f"ITT 0x{pdu.itt:08x} reused while its task is outstanding")
        task = _Task(itt=pdu.itt, lun=P.lun_from_wire(pdu.lun), cdb=pdu.cdb,
                     edtl=pdu.expected_data_transfer_length, read=pdu.read, write=pdu.write,
                     cmd_sn=pdu.cmd_sn)
        params = self.params
        if not pdu.write:
            if pdu.data:
                self._violation("immediate data on a command without the W bit")
            if not pdu.final:
                self._violation("a command without data to send has F=0")
            self._execute(task)
            return
        try:
            task.cdb_bytes = self._write_length(task)
            task.need = min(task.edtl, task.cdb_bytes)
        except _ScsiFailure as exc:
            # Status at once; unsolicited data that follows is dropped (§4.2.5.1 allows a
            # target to end a command early).
            self.finished.add(task.itt)
            self._respond(task, CHECK_CONDITION, exc.sense, b"")
            return
        task.data = bytearray(max(task.edtl, task.need))
        first_burst = params.first_burst_length
        if pdu.data:
            if not params.immediate_data:
                self._violation("immediate data with ImmediateData=No")
            if len(pdu.data) > min(first_burst, params.max_recv_data_segment_length):
                self._violation(f"{len(pdu.data)} bytes of immediate data exceed "
                                f"FirstBurstLength/MaxRecvDataSegmentLength")
            n = min(len(pdu.data), len(task.data))
            task.data[:n] = pdu.data[:n]
            task.received = n
            task.unsol_next = len(pdu.data)
        if not pdu.final:
            if params.initial_r2t:
                self._violation("unsolicited Data-Out announced (F=0) with InitialR2T=Yes")
            task.unsol_open = True
        self.tasks[task.itt] = task
        task.next_r2t = task.unsol_next
        if not task.unsol_open:
            self._advance_write(task)

    def _write_length(self, task: _Task) -> int:
        disk = self._disk(task)
        lba, blocks = self._lba_blocks(task.cdb)
        if lba + blocks > disk.blocks:
            raise _ScsiFailure(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)
        return blocks * disk.block_size

    def _disk(self, task: _Task) -> RamDisk:
        assert self.node is not None
        disk = self.node.luns.get(task.lun)
        if disk is None:
            raise _ScsiFailure(ILLEGAL_REQUEST, ASC_LUN_NOT_SUPPORTED)
        return disk

    @staticmethod
    def _lba_blocks(cdb: bytes) -> tuple[int, int]:
        op = cdb[0]
        if op in (READ_10, WRITE_10):
            return int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")
        if op in (READ_16, WRITE_16):
            return int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")
        raise _ScsiFailure(ILLEGAL_REQUEST, ASC_INVALID_OPCODE)

    def _on_data_out(self, pdu: P.DataOut) -> None:
        assert self.params is not None
        task = self.tasks.get(pdu.itt)
        if task is None:
            if pdu.itt not in self.finished:
                self._violation(f"Data-Out for unknown task 0x{pdu.itt:08x}")
            return
        n = len(pdu.data)
        if pdu.ttt == RESERVED:
            if not task.unsol_open:
                self._violation("unsolicited Data-Out outside the unsolicited sequence")
                return
            if pdu.buffer_offset != task.unsol_next:
                self._violation(f"unsolicited Data-Out at offset {pdu.buffer_offset}, expected "
                                f"{task.unsol_next}")
            if pdu.data_sn != task.unsol_data_sn:
                self._violation(f"unsolicited Data-Out DataSN {pdu.data_sn}, expected "
                                f"{task.unsol_data_sn}")
            if pdu.buffer_offset + n > min(self.params.first_burst_length, task.edtl):
                self._violation(f"unsolicited data up to {pdu.buffer_offset + n} exceeds "
                                f"FirstBurstLength {self.params.first_burst_length}")
            task.unsol_data_sn += 1
            task.unsol_next = pdu.buffer_offset + n
            self._store(task, pdu.buffer_offset, pdu.data)
            if pdu.final:
                task.unsol_open = False
                task.next_r2t = max(task.next_r2t, task.unsol_next)
                self._advance_write(task)
            return
        r2t = task.r2ts.get(pdu.ttt)
        if r2t is None:
            self._violation(f"Data-Out with TTT 0x{pdu.ttt:08x}, which no outstanding R2T has")
            return
        if pdu.buffer_offset != r2t.next_offset:
            self._violation(f"Data-Out at offset {pdu.buffer_offset}, expected {r2t.next_offset}")
        if pdu.data_sn != r2t.data_sn:
            self._violation(f"Data-Out DataSN {pdu.data_sn}, expected {r2t.data_sn}")
        if pdu.buffer_offset + n > r2t.offset + r2t.length:
            self._violation(f"Data-Out up to {pdu.buffer_offset + n} beyond its R2T "
                            f"({r2t.offset}+{r2t.length})")
        r2t.data_sn += 1
        r2t.next_offset = pdu.buffer_offset + n
        self._store(task, pdu.buffer_offset, pdu.data)
        if pdu.final:
            if r2t.next_offset != r2t.offset + r2t.length:
                self._violation(f"R2T sequence ended at {r2t.next_offset}, expected "
                                f"{r2t.offset + r2t.length}")
            del task.r2ts[pdu.ttt]
            self._advance_write(task)

    def _store(self, task: _Task, offset: int, data: P.Buffer) -> None:
        n = len(data)
        if offset + n > len(task.data):
            self._violation(f"Data-Out up to {offset + n} beyond the {task.edtl}-byte transfer")
            n = max(0, len(task.data) - offset)
        task.data[offset : offset + n] = bytes(data[:n])
        task.received += n

    def _advance_write(self, task: _Task) -> None:
        """Issue R2Ts up to MaxOutstandingR2T; execute once all data is in."""
        params = self.params
        assert params is not None
        hostile = self.target.hostile
        outstanding = 1 << 30 if hostile.r2t_ignore_max_outstanding \
            else params.max_outstanding_r2t
        while len(task.r2ts) < outstanding and task.next_r2t < task.need:
            length = min(params.max_burst_length + hostile.r2t_length_extra,
                          task.need - task.next_r2t)
            offset = task.next_r2t
            if hostile.r2t_out_of_range:
                offset = task.edtl
            for _ in range(1 + hostile.r2t_repeat):
                r2t = _R2T(self._alloc_ttt(), offset, length, offset)
                task.r2ts[r2t.ttt] = r2t
                self._send(P.R2T(lun=P.lun_to_wire(task.lun), itt=self._reply_itt(task.itt),
                                 ttt=r2t.ttt, r2t_sn=(task.r2t_sn + hostile.r2t_sn_offset) & MASK,
                                 buffer_offset=offset, desired_data_transfer_length=length,
                                 **self._status_fields(advance=False)))
                task.r2t_sn += 1
            task.next_r2t += length
        if not task.r2ts and not task.unsol_open and task.next_r2t >= task.need:
            del self.tasks[task.itt]
            self._execute(task)

    def _execute(self, task: _Task) -> None:
        hostile = self.target.hostile
        if hostile.fail_first > 0 and (hostile.fail_opcodes is None
                                       or task.cdb[0] in hostile.fail_opcodes):
            hostile.fail_first -= 1
            sense = fixed_sense(*hostile.fail_sense) if hostile.fail_status == CHECK_CONDITION \
                else b""
            self._respond(task, hostile.fail_status, sense, b"")
            return
        if self.target.hostile.withhold:
            task.held = True
            self.held.append(task)
            return
        try:
            data = self._run_cdb(task)
        except _ScsiFailure as exc:
            self._respond(task, CHECK_CONDITION, exc.sense, b"")
            return
        self._respond(task, GOOD, b"", data)

    def release(self) -> None:
        """Answer every withheld command."""
        held, self.held = self.held, []
        for task in held:
            task.held = False
            try:
                data = self._run_cdb(task)
            except _ScsiFailure as exc:
                self._respond(task, CHECK_CONDITION, exc.sense, b"")
                continue
            self._respond(task, GOOD, b"", data)
        self._wake()

    def _run_cdb(self, task: _Task) -> bytes:
        """Execute the CDB against the LUN; returns Data-In bytes (for writes, b"")."""
        assert self.node is not None
        cdb = task.cdb
        op = cdb[0]
        disk = self.node.luns.get(task.lun)
        if op == INQUIRY:
            return self._inquiry(disk, cdb, task.lun)
        if op == REPORT_LUNS:
            luns = sorted(self.node.luns)
            fields = [*map(P.lun_to_wire, luns), *self.target.hostile.report_luns_extra]
            body = b"".join(field.to_bytes(8, "big") for field in fields)
            alloc = int.from_bytes(cdb[6:10], "big")
            claim = self.target.hostile.report_luns_length
            length = len(body) if claim is None else claim
            self.target.report_luns_allocations.append(alloc)
            return (length.to_bytes(4, "big") + bytes(4) + body)[:alloc]
        if disk is None:
            raise _ScsiFailure(ILLEGAL_REQUEST, ASC_LUN_NOT_SUPPORTED)
        if op in (TEST_UNIT_READY, SYNCHRONIZE_CACHE_10, SYNCHRONIZE_CACHE_16):
            return b""
        if op == READ_CAPACITY_10:
            last = min(disk.blocks - 1, 0xFFFFFFFF)
            return struct.pack(">II", last, disk.block_size)
        if op == SERVICE_ACTION_IN_16 and (cdb[1] & 0x1F) == READ_CAPACITY_16_SA:
            alloc = int.from_bytes(cdb[10:14], "big")
            return (struct.pack(">QI", disk.blocks - 1, disk.block_size) + bytes(20))[:alloc]
        if op == MODE_SENSE_6:
            return bytes((3, 0, 0, 0))[: cdb[4]]
        if op in (READ_10, READ_16):
            lba, blocks = self._lba_blocks(cdb)
            if lba + blocks > disk.blocks:
                raise _ScsiFailure(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)
            start = lba * disk.block_size
            return bytes(disk.data[start : start + blocks * disk.block_size])
        if op in (WRITE_10, WRITE_16):
            lba, blocks = self._lba_blocks(cdb)
            if lba + blocks > disk.blocks:
                raise _ScsiFailure(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)
            start = lba * disk.block_size
            n = min(task.need, blocks * disk.block_size)
            disk.data[start : start + n] = task.data[:n]
            return b""
        raise _ScsiFailure(ILLEGAL_REQUEST, ASC_INVALID_OPCODE)

    @staticmethod
    def _inquiry(disk: RamDisk | None, cdb: bytes, lun: int) -> bytes:
        alloc = int.from_bytes(cdb[3:5], "big")
        evpd = cdb[1] & 1
        if not evpd:
            if cdb[2]:
                raise _ScsiFailure(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)
            # Peripheral qualifier 3 / type 1Fh: no LUN here (SPC-5 §6.7.2).
            peripheral = disk.peripheral_type & 0x1F if disk is not None else 0x7F
            d = disk or RamDisk(blocks=1)
            data = bytes((peripheral, 0, 0x06, 0x02, 31, 0, 0, 0x02)) \
                + d.vendor.encode().ljust(8)[:8] + d.product.encode().ljust(16)[:16] \
                + d.revision.encode().ljust(4)[:4]
            return data[:alloc]
        if disk is None:
            raise _ScsiFailure(ILLEGAL_REQUEST, ASC_LUN_NOT_SUPPORTED)
        page = cdb[2]
        if page == 0x00:
            body = bytes((0x00, 0x80, 0x83))
        elif page == 0x80:
            body = disk.serial.encode()
        elif page == 0x83:
            naa = disk.naa.to_bytes(8, "big")
            body = bytes((0x01, 0x03, 0x00, len(naa))) + naa
        else:
            raise _ScsiFailure(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)
        return (bytes((0, page)) + len(body).to_bytes(2, "big") + body)[:alloc]

    def _respond(self, task: _Task, status: int, sense: bytes, data: bytes) -> None:
        """Data-In (read data), then status: in the last Data-In or a SCSI Response."""
        params = self.params
        assert params is not None
        hostile = self.target.hostile
        itt = self._reply_itt(task.itt)
        if task.write:
            expected, actual, data = task.edtl, task.cdb_bytes, b""
        else:
            expected, actual = (task.edtl if task.read else 0), len(data)
        underflow = actual < expected
        overflow = actual > expected
        residual = abs(expected - actual)
        if status != GOOD:
            underflow = overflow = False
            residual = 0
        payload = data[:expected] if task.read else b""
        if hostile.data_in_overrun and payload:
            payload += bytes(hostile.data_in_overrun)
        lie = hostile.data_in_opcodes is None or task.cdb[0] in hostile.data_in_opcodes
        if lie and hostile.data_in_withheld and task.read:
            kept = max(0, len(payload) - hostile.data_in_withheld)
            residual, underflow = expected - kept, kept < expected
            payload = payload[:kept]
        if lie and hostile.residual_claim is not None:
            residual, overflow = hostile.residual_claim, False
            underflow = residual > 0
        if lie and hostile.overflow_claim:
            residual, underflow, overflow = hostile.overflow_claim, False, True
        collapse = self.target.phase_collapse and status == GOOD and bool(payload)
        mxdsl = params.max_xmit_data_segment_length
        mbl = params.max_burst_length
        offset = 0
        data_sn = 1 if lie and hostile.data_sn_skip else 0
        repeat = lie and hostile.data_in_repeat_first
        total = len(payload)
        while offset < total:
            burst_end = min(total, (offset // mbl + 1) * mbl)
            n = min(mxdsl, burst_end - offset)
            last = offset + n == total
            with_status = last and collapse
            fields: _Numbers = self._status_fields(advance=True) if with_status else {
                "stat_sn": 0, "exp_cmd_sn": self.exp_cmd_sn, "max_cmd_sn": self.max_cmd_sn}
            data_in = P.DataIn(
                final=offset + n == burst_end, status_present=with_status,
                status=status if with_status else 0,
                underflow=with_status and underflow, overflow=with_status and overflow,
                residual_count=residual if with_status else 0, itt=itt, ttt=RESERVED,
                data_sn=data_sn, buffer_offset=offset, data=payload[offset : offset + n],
                **fields)
            self._send(data_in)
            if repeat and not with_status:
                self._send(data_in)
            repeat = False
            data_sn += 1
            offset += n
        self.finished.add(task.itt)
        if collapse:
            return
        body = (len(sense).to_bytes(2, "big") + sense) if sense else b""
        self._send(P.ScsiResponse(
            response=P.ServiceResponse.COMPLETED, status=status, itt=itt,
            underflow=underflow, overflow=overflow, residual_count=residual,
            exp_data_sn=data_sn, data=body, **self._status_fields()))

    # -- other requests -------------------------------------------------------------------

    def _on_nop_out(self, pdu: P.NopOut) -> None:
        if pdu.ttt != RESERVED:
            if pdu.ttt not in self.pings_outstanding:
                self._violation(f"NOP-Out answers TTT 0x{pdu.ttt:08x}, which we never sent")
            self.pings_outstanding.discard(pdu.ttt)
            self.ping_answers.append(pdu.ttt)
            if pdu.itt != RESERVED:
                self._violation("a NOP-Out answering our ping must have ITT 0xffffffff")
            return
        if pdu.itt == RESERVED:
            return  # nothing to answer (§11.18)
        self._send(P.NopIn(lun=pdu.lun, itt=pdu.itt, ttt=RESERVED, data=bytes(pdu.data),
                           **self._status_fields()))

    def _on_tmf(self, pdu: P.TaskMgmtRequest) -> None:
        function = pdu.function
        lun = P.lun_from_wire(pdu.lun)
        response = self.tmf_responses.get(function)
        if response is None:
            response = self._do_tmf(function, lun, pdu.referenced_task_tag)
        self._send(P.TaskMgmtResponse(response=response, itt=pdu.itt, **self._status_fields()))

    def _do_tmf(self, function: P.TMFunction, lun: int, rtt: int) -> P.TMResponse:
        everything = list(self.tasks.values()) + self.held

        def kill(match: Callable[[_Task], bool]) -> int:
            victims = [t for t in everything if match(t)]
            for t in victims:
                self.tasks.pop(t.itt, None)
                if t in self.held:
                    self.held.remove(t)
                self.finished.add(t.itt)
            return len(victims)

        if function is P.TMFunction.ABORT_TASK:
            found = kill(lambda t: t.itt == rtt)
            return P.TMResponse.COMPLETE if found else P.TMResponse.TASK_DOES_NOT_EXIST
        if function in (P.TMFunction.ABORT_TASK_SET, P.TMFunction.CLEAR_TASK_SET,
                        P.TMFunction.LOGICAL_UNIT_RESET):
            if self.node is None or lun not in self.node.luns:
                return P.TMResponse.LUN_DOES_NOT_EXIST
            kill(lambda t: t.lun == lun)
            return P.TMResponse.COMPLETE
        if function in (P.TMFunction.TARGET_WARM_RESET, P.TMFunction.TARGET_COLD_RESET):
            kill(lambda t: True)
            return P.TMResponse.COMPLETE
        if function is P.TMFunction.CLEAR_ACA:
            return P.TMResponse.COMPLETE
        return P.TMResponse.REASSIGNMENT_NOT_SUPPORTED

    def _on_text(self, pdu: P.TextRequest) -> None:
        if pdu.ttt != RESERVED:
            pending = self.text_out.get(pdu.ttt)
            if pending is None or pending[0] != pdu.itt:
                self._violation(f"Text Request continues TTT 0x{pdu.ttt:08x}, which is not ours")
                self.send_reject(P.RejectReason.INVALID_PDU_FIELD, P.encode(pdu)[: P.BHS_LEN])
                return
            del self.text_out[pdu.ttt]
            self._text_piece(pdu.itt, pending[1])
            return
        assembler = self.text_assemblers.setdefault(pdu.itt, TextAssembler(
            repeatable=("TargetName", "TargetAddress")))
        try:
            pairs = assembler.feed(pdu.data, pdu.cont)
        except ISCSIError as exc:
            self._violation(f"malformed text: {exc}")
            del self.text_assemblers[pdu.itt]
            self.send_reject(P.RejectReason.PROTOCOL_ERROR, P.encode(pdu)[: P.BHS_LEN])
            return
        if pairs is None:
            self._send(P.TextResponse(final=False, cont=False, itt=pdu.itt,
                                      ttt=self._alloc_ttt(), **self._status_fields()))
            return
        del self.text_assemblers[pdu.itt]
        answer: list[Pair] = []
        other: list[Pair] = []
        for key, value in pairs:
            if key == "SendTargets":
                answer += self._send_targets(value)
            else:
                other.append((key, value))
        if other and self._negotiator is not None:
            try:
                got = self._negotiator.receive(other, Stage.FULL_FEATURE)
                answer += list(got.answers)
            except ISCSIError as exc:
                self._violation(f"text negotiation: {exc}")
                answer += [(k, "Reject") for k, _ in other]
        chunk = min(self.target.text_chunk or 1 << 24, self._xmit_limit())
        self._text_piece(pdu.itt, TextSplitter(encode(answer), chunk))

    def _xmit_limit(self) -> int:
        return self.params.max_xmit_data_segment_length if self.params else 8192

    def _text_piece(self, itt: int, splitter: TextSplitter) -> None:
        piece = splitter.next_segment()
        ttt = RESERVED
        if piece.more:
            ttt = self._alloc_ttt()
            self.text_out[ttt] = (itt, splitter)
        self._send(P.TextResponse(final=not piece.more, cont=piece.more, itt=itt, ttt=ttt,
                                  data=piece.data, **self._status_fields()))

    def _send_targets(self, what: str) -> list[Pair]:
        record = self.record
        assert record is not None
        discovery = record.session_type == SessionType.DISCOVERY.value
        if discovery:
            if what == "All":
                nodes = self.target.nodes
            else:
                node = self.target.find(what)
                nodes = [node] if node is not None else []
        else:
            # §13.3: in a normal session SendTargets reports the session's own target.
            nodes = [self.node] if self.node is not None and what in ("", "All",
                                                                      self.node.name) else []
        out: list[Pair] = []
        for node in nodes:
            out.append(("TargetName", node.name))
            own = (f"{self.target.portal_address},{self.target.portal_group_tag}",) \
                if node.announce_portal else ()
            for address in node.addresses or own:
                out.append(("TargetAddress", address))
        return out

    def _on_logout(self, pdu: P.LogoutRequest) -> None:
        self._send(P.LogoutResponse(response=self.logout_response, itt=pdu.itt,
                                    time2wait=self.target.logout_time2wait, time2retain=0,
                                    **self._status_fields()))
        if self.logout_response == P.LogoutResponseCode.CLOSED:
            self.state = ConnState.LOGGED_OUT
            self.closing = True

    # -- target-initiated PDUs --------------------------------------------------------------

    def send_ping(self, data: bytes = b"") -> int:
        """A NOP-In asking for an answer (TTT set, ITT reserved, §11.19); returns its TTT."""
        ttt = self._alloc_ttt()
        self.pings_outstanding.add(ttt)
        self._send(P.NopIn(itt=RESERVED, ttt=ttt, data=data, **self._status_fields(False)))
        self._wake()
        return ttt

    def set_window(self, window: int, *, announce: bool = True) -> None:
        """Change the command window; announce it with an unsolicited NOP-In."""
        self.window = window
        if announce and self.state is ConnState.FULL_FEATURE:
            self._send(P.NopIn(itt=RESERVED, ttt=RESERVED, **self._status_fields(False)))
            self._wake()

    def send_async(self, event: int, *, lun: int = 0, sense: bytes = b"", parameter1: int = 0,
                   parameter2: int = 0, parameter3: int = 0, vcode: int = 0) -> None:
        """An Asynchronous Message (§11.9)."""
        data = (len(sense).to_bytes(2, "big") + sense) if sense else b""
        self._send(P.AsyncMessage(lun=P.lun_to_wire(lun), itt=RESERVED, async_event=event,
                                  async_vcode=vcode, parameter1=parameter1,
                                  parameter2=parameter2, parameter3=parameter3, data=data,
                                  **self._status_fields()))
        self._wake()

    def send_reject(self, reason: int, header: bytes) -> None:
        """A Reject carrying the rejected PDU's header (§11.17)."""
        self._send(P.Reject(reason=reason, itt=RESERVED, data=header, **self._status_fields()))
        self._wake()


# --------------------------------------------------------------------------------------------
# In-memory wiring of the initiator's sans-I/O machines to a fake connection


def transfer_parameters(params: SessionParameters) -> TransferParameters:
    """What :mod:`initiator.transport` gives the connection core after login."""
    return TransferParameters(
        header_digest=params.header_digest, data_digest=params.data_digest,
        max_recv_data_segment_length=params.max_recv_data_segment_length,
        max_xmit_data_segment_length=params.max_xmit_data_segment_length,
        first_burst_length=params.first_burst_length,
        max_burst_length=params.max_burst_length,
        immediate_data=params.immediate_data, initial_r2t=params.initial_r2t,
        max_outstanding_r2t=params.max_outstanding_r2t,
        data_pdu_in_order=params.data_pdu_in_order,
        data_sequence_in_order=params.data_sequence_in_order)


class Loopback:
    """A LoginMachine and then a ConnectionCore talking to one :class:`FakeConnection`."""

    def __init__(self, target: FakeTarget) -> None:
        self.target = target
        self.conn = target.connect()
        self.core: ConnectionCore | None = None
        self.reader: PDUReader | None = None
        self._to_initiator = bytearray()
        self.chunk: int | None = None
        """Deliver bytes to the initiator in pieces of this size (None: all at once)."""

    def login(self, machine: LoginMachine) -> LoginSuccess | LoginRedirect:
        """Run a login to its outcome; raises what the machine raises."""
        request: P.PDU = machine.start()
        for _ in range(1000):
            self._to_initiator += self.conn.receive(P.encode(request))
            if not self._to_initiator:
                raise ConnectionError("the fake target closed the connection without answering")
            response, used = P.decode(bytes(self._to_initiator))
            del self._to_initiator[:used]
            result = machine.receive(response)
            if isinstance(result, P.LoginRequest):
                request = result
                continue
            return result
        raise RuntimeError("the login did not end after 1000 exchanges")

    def start(self, login: LoginSuccess, *, now: float = 0.0, noop_interval: float = 0.0,
              noop_timeout: float = 5.0) -> ConnectionCore:
        """The connection core for a successful login, as the transport builds it."""
        params = login.parameters
        core = ConnectionCore(
            transfer_parameters(params), cmd_sn=login.cmd_sn, exp_stat_sn=login.exp_stat_sn,
            exp_cmd_sn=login.exp_cmd_sn, max_cmd_sn=login.max_cmd_sn, target="fake",
            now=now, noop_interval=noop_interval, noop_timeout=noop_timeout)
        self.core = core
        self.reader = PDUReader(header_digest=params.header_digest,
                                data_digest=params.data_digest,
                                max_data_segment_length=params.max_recv_data_segment_length,
                                sink=core)
        return core

    def pump(self, now: float = 0.0, *, rounds: int = 10000) -> None:
        """Move bytes both ways until neither side has anything to say."""
        core, reader = self.core, self.reader
        assert core is not None and reader is not None
        for _ in range(rounds):
            moved = False
            while core.wants_to_send:
                bufs = core.send_buffers()
                data = b"".join(bytes(b) for b in bufs)
                core.sent(len(data))
                self._to_initiator += self.conn.receive(data)
                moved = True
            self._to_initiator += self.conn.data_to_send()
            if self._to_initiator:
                moved = True
                data = bytes(self._to_initiator)
                self._to_initiator.clear()
                step = self.chunk or len(data)
                for pos in range(0, len(data), step):
                    for pdu in reader.feed(data[pos : pos + step]):
                        core.receive_pdu(pdu, now)
            if not moved:
                return
        raise RuntimeError("the loopback did not settle")


# --------------------------------------------------------------------------------------------
# asyncio adapter


class _Link:
    """One accepted TCP connection and its fake connection."""

    def __init__(self, conn: FakeConnection, writer: asyncio.StreamWriter) -> None:
        self.conn = conn
        self.writer = writer

    def flush(self) -> None:
        if self.writer.is_closing():
            return
        out = self.conn.data_to_send()
        if out:
            self.writer.write(out)
        if self.conn.dropped:
            self.writer.transport.abort()
        elif self.conn.closing:
            self.writer.close()

    def abort(self) -> None:
        self.conn.dropped = True
        self.writer.transport.abort()


class FakeTargetServer:
    """Serves a :class:`FakeTarget` on 127.0.0.1 (a random free port, kept across restarts)."""

    def __init__(self, target: FakeTarget, host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self.port = 0
        self.links: list[_Link] = []
        self.accepting = True
        """When False, new connections are accepted and closed at once (a dead service)."""
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def portal(self) -> Portal:
        return Portal(self.host, self.port)

    async def start(self) -> FakeTargetServer:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        self.target.portal_address = f"{self.host}:{self.port}"
        return self

    async def stop_listening(self) -> None:
        """Stop listening; the open connections go on (:meth:`stop` aborts them too)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def stop(self) -> None:
        """Stop listening and abort every connection."""
        await self.stop_listening()
        self.drop()
        # Aborted connections end their handlers by themselves (cancelling them would make
        # asyncio.start_server log the CancelledError).
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=2.0)
        for task in list(self._handlers):
            task.cancel()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def drop(self) -> None:
        """Abort every open connection (the initiator sees a reset)."""
        for link in self.links:
            link.abort()

    @property
    def connections(self) -> list[FakeConnection]:
        return [link.conn for link in self.links]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Poll ``predicate`` on the loop until it holds (TimeoutError otherwise)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() > deadline:
                raise TimeoutError("condition not reached on the fake target")
            await asyncio.sleep(0.002)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        conn = self.target.connect()
        link = _Link(conn, writer)
        self.links.append(link)
        conn.wakeup = link.flush
        try:
            if not self.accepting:
                link.abort()
                return
            while not conn.closing:
                data = await reader.read(1 << 16)
                if not data:
                    break
                out = conn.receive(data)
                if out and not writer.is_closing():
                    writer.write(out)
                link.flush()
            link.flush()
        except (ConnectionError, OSError):
            pass
        finally:
            conn.connection_lost()
            if not writer.is_closing():
                writer.close()
            self._handlers.discard(task)

    async def __aenter__(self) -> FakeTargetServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


__all__ = [
    "CHECK_CONDITION", "GOOD", "ConnState", "FakeConnection", "FakeTarget", "FakeTargetServer",
    "Hostility", "LoginRecord", "Loopback", "RamDisk", "TargetNode", "cdb_inquiry",
    "cdb_read10", "cdb_read16", "cdb_read_capacity10", "cdb_read_capacity16",
    "cdb_test_unit_ready", "cdb_write10", "cdb_write16", "fixed_sense",
    "sense_key_asc", "transfer_parameters",
]
