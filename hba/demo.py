"""The quick start: a LUN of an embedded target becomes a disk and gets a filesystem.

``./run demo`` runs ``python -m hba.demo``:

1. if this kernel cannot do TCMU + tcm_loop (no modules, no configfs), the demo re-runs itself
   inside the project's QEMU VM (``deploy/vm/run``), which boots a stock Debian kernel;
2. it starts an embedded default target — tgtd on a free loopback port, with a sparse file as
   its LUN;
3. it attaches that LUN with the daemon's own attach path (``hba.daemon``), which makes it
   ``/dev/sdX``;
4. ``mkfs.ext4``, mount, write a file, print ``lsblk`` and ``df``;
5. unmount, detach, stop the target: nothing is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from hba import kernel
from hba.daemon import Daemon, DaemonOptions, Disk
from hba.errors import HBAError
from hba.tgtd import TgtdError, TgtdProcess
from initiator.argtypes import size
from initiator.errors import ISCSIError

log = logging.getLogger("iscsi-hba.demo")
REPO = Path(__file__).resolve().parent.parent
DEMO_IQN = "iqn.2026-11.org.iscsi-hba:demo"
MIN_SIZE = 16 << 20
"""The smallest LUN ``--size`` makes: room for the ext4 filesystem, its journal and the file."""
T = TypeVar("T")


class DemoError(HBAError):
    """A step of the demo failed."""


@contextlib.contextmanager
def embedded_target(workdir: Path, size: int) -> Iterator[str]:
    """A private tgtd (:mod:`hba.tgtd`) with one sparse-file LUN; yields the LUN's URL."""
    backing = workdir / "demo-lun.img"
    with backing.open("wb") as f:
        f.truncate(size)
    try:
        with TgtdProcess(workdir) as tgtd:
            tgtd.tgtadm("--op", "new", "--mode", "target", "--tid", "1", "-T", DEMO_IQN)
            tgtd.tgtadm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                        "-b", str(backing))
            tgtd.tgtadm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
            try:
                yield f"iscsi://{tgtd.portal}/{DEMO_IQN}/1"
            finally:
                with contextlib.suppress(TgtdError):
                    tgtd.tgtadm("--op", "delete", "--mode", "target", "--tid", "1", "--force")
    finally:
        backing.unlink(missing_ok=True)


class DaemonThread:
    """The daemon on its own event loop in a thread, so that this thread may block on mkfs
    and mount while the daemon keeps serving the ring."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.daemon = Daemon(DaemonOptions(watch_uio=False))
        self._thread = threading.Thread(target=self.loop.run_forever, name="iscsi-hba",
                                        daemon=True)

    def __enter__(self) -> DaemonThread:
        self._thread.start()
        self.call(self.daemon.start(attach_enabled=False))
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.call(self.daemon.stop(), timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 300) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)


def _run(argv: list[str], *, show: bool = True) -> str:
    if show:
        print(f"$ {' '.join(argv)}", flush=True)
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DemoError(f"`{' '.join(argv)}` failed ({result.returncode}): "
                        f"{(result.stderr or result.stdout).strip()}")
    if show and result.stdout.strip():
        print(result.stdout.rstrip(), flush=True)
    return result.stdout


def run_here(size: int) -> None:
    """The demo on this kernel."""
    kernel.preflight()
    with tempfile.TemporaryDirectory(prefix="iscsi-hba-demo-") as tmp:
        work = Path(tmp)
        mountpoint = work / "mnt"
        mountpoint.mkdir()
        with embedded_target(work, size) as url, DaemonThread() as dt:
            print(f"==> embedded target: {url}", flush=True)
            disk: Disk = dt.call(dt.daemon.attach(url))
            assert disk.device is not None
            node = disk.device.node
            print(f"==> attached {disk.name} as {node} ({disk.device.primary_link})",
                  flush=True)
            mounted = False
            try:
                _run(["mkfs.ext4", "-q", "-F", "-L", "iscsi-hba", node])
                _run(["mount", node, str(mountpoint)])
                mounted = True
                (mountpoint / "hello.txt").write_text(
                    f"written through iscsi-hba to {DEMO_IQN}\n")
                os.sync()
                _run(["lsblk", "-o", "NAME,SIZE,TYPE,FSTYPE,LABEL,MOUNTPOINTS,VENDOR,MODEL",
                      node])
                _run(["df", "-h", str(mountpoint)])
            finally:
                if mounted:
                    _run(["umount", str(mountpoint)])
                dt.call(dt.daemon.detach(disk.name))
                print(f"==> detached {node}; stopping the embedded target", flush=True)
    print("==> demo complete: the LUN was a disk with an ext4 filesystem", flush=True)


def _kernel_ready() -> bool:
    try:
        kernel.preflight()
    except HBAError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--here", action="store_true",
                        help="run on this kernel, never in the VM")
    parser.add_argument("--size", default=1 << 30, type=size,
                        help="LUN size in bytes, or with a unit: 256m, 2g (at least "
                             f"{MIN_SIZE >> 20}m; default 1g)")
    args = parser.parse_args(argv)
    if args.size < MIN_SIZE:
        parser.error(f"--size {args.size}: the demo's filesystem needs at least {MIN_SIZE} bytes")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if os.geteuid() != 0:
        print("hba.demo: run as root (it creates kernel devices)", file=sys.stderr)
        return 1
    if not args.here and not _kernel_ready():
        print("==> this kernel has no TCMU/tcm_loop: running the demo in the project's VM "
              "(deploy/vm/run, a stock Debian kernel under QEMU)", flush=True)
        vm = REPO / "deploy" / "vm" / "run"
        python = REPO / ".venv" / "bin" / "python"
        return subprocess.call([str(vm), "--", str(python), "-m", "hba.demo", "--here",
                                "--size", str(args.size)], cwd=REPO)
    try:
        run_here(args.size)
    except (HBAError, ISCSIError, OSError) as exc:
        print(f"hba.demo: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
