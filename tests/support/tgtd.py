"""A private tgtd (the Linux SCSI target framework daemon) for tests, on the host or in the VM.

The process itself — its own management channel (``tgtd -C N``) and iSCSI portal on a free
loopback port, so it never meets the packaged service, another test's tgtd or another engineer's
— is :class:`hba.tgtd.TgtdProcess`, shared with ``./run demo``. This module adds the targets:
backed by sparse files in the given work directory, with CHAP accounts and parameters. tgtd is
pure userspace: it needs root (it binds the management socket under /run) but no kernel module,
so the same helper serves the host integration tests and the kernel tests.

    with Tgtd.start(tmp_path) as tgtd:
        target = tgtd.add_target(size=64 << 20, chap=Chap.one_way())
        ...  # target.portal, target.iqn, target.lun, target.url()

For recovery tests, :meth:`Tgtd.kill` ends tgtd abruptly (SIGKILL: connections reset, nothing
logged out) and :meth:`Tgtd.restart` brings it back on the same portal with the same targets
(same tid, IQN, backing file, CHAP accounts and :meth:`Tgtd.set_target_param` parameters).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hba.tgtd import TgtdError, TgtdProcess
from tests.support.targets import Chap, TargetInfo, unique_iqn

__all__ = ["FIRST_DATA_LUN", "NULL_BS_SIZE", "Tgtd", "TgtdError", "TgtdTarget", "tgtd_available"]

# tgt exposes LUN 0 of every target as its own controller (peripheral type 0x0c); the first
# backing store is LUN 1.
FIRST_DATA_LUN = 1
NULL_BS_SIZE = 1 << 40  # tgt's null backing store (bs_null.c) is always 1 TiB


@dataclass(frozen=True)
class TgtdTarget(TargetInfo):
    """A target of this tgtd: what initiators need, plus the tgt target id and backing file."""

    tid: int = 0
    backing_file: Path | None = None
    bstype: str = "rdwr"


class Tgtd:
    """One tgtd process; use :meth:`start` (a context manager) or :meth:`launch` + :meth:`stop`."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.workdir = workdir
        self.host = host
        self.process = TgtdProcess(workdir, host, port)
        self._next_tid = 1
        self._targets: dict[int, TgtdTarget] = {}
        self._accounts: dict[str, str] = {}
        self._params: dict[int, dict[str, str]] = {}

    @classmethod
    @contextlib.contextmanager
    def start(cls, workdir: Path, host: str = "127.0.0.1",
              port: int | None = None) -> Iterator[Tgtd]:
        """Start a tgtd, yield it, and stop it (removing its targets and files) afterwards.

        ``port`` fixes the portal's port (e.g. 3260 on an address of 127/8); by default a free
        one is picked.
        """
        tgtd = cls(workdir, host, port)
        tgtd.launch()
        try:
            yield tgtd
        finally:
            tgtd.stop()

    # -- process ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def control_port(self) -> int:
        return self.process.control_port

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    @property
    def running(self) -> bool:
        return self.process.running

    def launch(self, attempts: int = 5) -> None:
        """Start tgtd on a free portal port and an unused control port; wait until it answers."""
        self.process.launch(attempts)

    def stop(self) -> None:
        """Remove every target, stop tgtd and delete the backing files."""
        if not self.running:
            # Never started, or killed and not restarted: only the files are left.
            for target in self._targets.values():
                if target.backing_file is not None:
                    target.backing_file.unlink(missing_ok=True)
            self._targets.clear()
            self.process.stop()
            return
        for tid in list(self._targets):
            with contextlib.suppress(TgtdError):
                self.remove_target(tid)
        self.process.stop()

    def kill(self) -> None:
        """End tgtd with SIGKILL, as a crash would: connections are reset, nothing is logged
        out. Targets, accounts, parameters and backing files are kept for :meth:`restart`."""
        self.process.kill()

    def restart(self) -> None:
        """Start tgtd again on the same portal and re-create every target as it was: same tid,
        IQN, backing file (so the data is still there), CHAP accounts and parameters."""
        if self.running:
            raise TgtdError("tgtd is still running; kill() or stop() it first")
        fixed, self.process.fixed_port = self.process.fixed_port, self.port
        try:
            self.launch()
        finally:
            self.process.fixed_port = fixed
        accounts, self._accounts = self._accounts, {}
        for tid in sorted(self._targets):
            self._create(self._targets[tid])
            for name, value in self._params.get(tid, {}).items():
                self.tgtadm("--op", "update", "--mode", "target", "--tid", str(tid),
                            "--name", name, "--value", value)
        for user, password in accounts.items():
            self._account(user, password)  # accounts bound to no target survive too

    # -- management ------------------------------------------------------------------------

    def tgtadm(self, *args: str) -> str:
        """Run ``tgtadm -C <control port> --lld iscsi ARGS``; raise TgtdError on failure."""
        return self.process.tgtadm(*args)

    def add_target(
        self,
        size: int = 64 << 20,
        *,
        chap: Chap | None = None,
        iqn: str | None = None,
        label: str = "tgtd",
        bstype: str = "rdwr",
    ) -> TgtdTarget:
        """A new target with one LUN (LUN 1) backed by a sparse file of ``size`` bytes.

        Any initiator may log in; with ``chap`` it must authenticate (and with mutual
        credentials tgtd authenticates back). CHAP user names are global to a tgtd: reuse one
        only with the same password. ``bstype="null"`` makes a LUN that stores nothing and
        reads zeros, always 1 TiB (``size`` is ignored): for benchmarks.
        """
        if not self.running:
            raise TgtdError("tgtd is not running")
        tid = self._next_tid
        self._next_tid += 1
        iqn = iqn or unique_iqn(label)
        backing: Path | None = None
        if bstype == "null":
            size = NULL_BS_SIZE
        else:
            backing = self.workdir / f"tgtd-{self.control_port}-tid{tid}.img"
            with backing.open("wb") as f:
                f.truncate(size)
        target = TgtdTarget(
            host=self.host, port=self.port, iqn=iqn, lun=FIRST_DATA_LUN, size=size, chap=chap,
            tid=tid, backing_file=backing, bstype=bstype,
        )
        self._targets[tid] = target
        self._create(target)
        return target

    def set_target_param(self, target: TgtdTarget | int, name: str, value: str) -> None:
        """``tgtadm --op update --mode target --name NAME --value VALUE``: the value tgtd
        negotiates from for logins that start afterwards (MaxBurstLength, FirstBurstLength,
        InitialR2T, ImmediateData, MaxOutstandingR2T, MaxRecvDataSegmentLength, HeaderDigest,
        DataDigest ...). Kept for :meth:`restart`."""
        tid = target if isinstance(target, int) else target.tid
        self.tgtadm("--op", "update", "--mode", "target", "--tid", str(tid),
                    "--name", name, "--value", value)
        self._params.setdefault(tid, {})[name] = value

    def _create(self, target: TgtdTarget) -> None:
        tid, chap = target.tid, target.chap
        self.tgtadm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", target.iqn)
        self.tgtadm(
            "--op", "new", "--mode", "logicalunit", "--tid", str(tid),
            "--lun", str(FIRST_DATA_LUN), "--bstype", target.bstype,
            "-b", str(target.backing_file or "null"),
        )
        self.tgtadm("--op", "bind", "--mode", "target", "--tid", str(tid), "-I", "ALL")
        if chap is not None:
            self._account(chap.userid, chap.password)
            self.tgtadm(
                "--op", "bind", "--mode", "account", "--tid", str(tid), "--user", chap.userid
            )
            if chap.mutual_userid is not None and chap.mutual_password is not None:
                self._account(chap.mutual_userid, chap.mutual_password)
                self.tgtadm(
                    "--op", "bind", "--mode", "account", "--tid", str(tid),
                    "--user", chap.mutual_userid, "--outgoing",
                )

    def remove_target(self, target: TgtdTarget | int) -> None:
        """Delete the target (even with sessions logged in) and its backing file."""
        tid = target if isinstance(target, int) else target.tid
        known = self._targets.pop(tid, None)
        self._params.pop(tid, None)
        try:
            self.tgtadm("--op", "delete", "--mode", "target", "--tid", str(tid), "--force")
        finally:
            if known is not None and known.backing_file is not None:
                known.backing_file.unlink(missing_ok=True)

    @property
    def targets(self) -> list[TgtdTarget]:
        return list(self._targets.values())

    def _account(self, user: str, password: str) -> None:
        known = self._accounts.get(user)
        if known == password:
            return
        if known is not None:
            raise TgtdError(f"CHAP user {user!r} already exists in this tgtd with another password")
        self.tgtadm("--op", "new", "--mode", "account", "--user", user, "--password", password)
        self._accounts[user] = password


def tgtd_available() -> bool:
    """True when tgtd can run here (installed, and root for its management socket)."""
    return shutil.which("tgtd") is not None and os.geteuid() == 0
