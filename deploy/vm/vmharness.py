"""The kernel-test VM harness behind ``deploy/vm/run``.

Theory of operation
-------------------
The development and CI machines run a kernel without SCSI, configfs or target support, so the
kernel tier runs inside QEMU (TCG) on a stock Debian kernel (see ``docs/vm-tier.md``):

1. *Prepare* (cached under ``.cache/vm/``, idempotent, under a lock):
   - the kernel version comes from ``apt-cache depends linux-image-amd64`` (or ``HBA_VM_KERNEL``);
   - ``kernel/<kver>/`` is the ``linux-image-<kver>`` package fetched with ``apt-get download``,
     unpacked with ``dpkg-deb -x`` and indexed with ``depmod -b``;
   - ``initrd/<kver>-<hash>.cpio`` is a busybox initramfs holding ``init`` (stage 1),
     ``guest-init`` (stage 2) and the modules of ``modules`` with their dependencies, in load
     order; ``<hash>`` covers every input, so editing one of those files rebuilds it.
2. *Run*: QEMU boots that kernel with the host's ``/`` shared read-only over 9p (the guest puts a
   tmpfs overlay on it, so the guest runs the host's Python, virtualenv and checkout at the same
   paths, and its writes stay in the VM), a per-run control directory (the command, its
   environment and, back from the guest, its exit status and dmesg) and a writable results
   directory mounted at the same path inside (``HBA_VM_RESULTS``). The command's stdout and stderr
   come back live on two virtio-serial ports; the serial console (kernel warnings and the init
   scripts' progress) goes to a log file shown when something fails.
3. *Paths the guest hides.* The guest mounts its own tmpfs on ``/tmp`` and ``/run``. A checkout
   (or current directory, or command) under them — people clone into ``/tmp`` — is listed in
   the control directory's ``binds``; stage 1 binds the overlay's view of each over the fresh
   tmpfs at the same path, so it is seen, and written, like every other host path.
4. *Time.* Two limits, both per run: the whole run (``HBA_VM_TIMEOUT``) and silence
   (``HBA_VM_IDLE_TIMEOUT``: the command printed nothing for that long — a hang, not a slow
   machine, since a test run prints as it goes). When one is reached the host asks the guest
   to stop (the ``stop`` file in the control directory, polled by stage 2), which kills the
   command, saves the kernel log and powers off; QEMU is killed only if that does not happen
   within a margin. The guest also enforces the whole-run limit by itself.

Exit status: the command's own, 124 when it was stopped for time (overall or idle), 125 when the
harness itself failed (with a message saying what failed).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import lzma
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

# Initramfs images kept per kernel in the cache (the most recently used ones).
KEEP_INITRDS = 6

# Part of the initramfs hash, with the bytes of init, guest-init, modules, this file and busybox.
INITRD_FORMAT = "3"

PR_SET_PDEATHSIG = 1

EXIT_TIMEOUT = 124
EXIT_HARNESS = 125

DEFAULT_TIMEOUT = 3600.0
# Longer than any kernel test's own pytest timeout (900 s, test_install.py's 1200 s), so a stuck
# test is reported by pytest first and the VM is stopped only when pytest cannot stop it.
DEFAULT_IDLE_TIMEOUT = 1500.0
# A quiet machine boots in 30-60 s under TCG; a busy one (load 4-8 on 2 cores) 4 times that.
DEFAULT_BOOT_TIMEOUT = 600.0
DEFAULT_MEMORY_MB = 3072
DEFAULT_CPUS = 2
# Seconds between the guest's own time limit for the command and the host's hard kill of QEMU:
# enough for the guest to kill the command, save dmesg and power off.
GUEST_MARGIN = 45

# Host environment variables forwarded into the VM (plus -e options): enough for tools to behave
# as on the host, without host-only state (sockets, runtime dirs, pytest's per-test variables).
FORWARD_NAMES = frozenset(
    {
        "PATH", "HOME", "LANG", "LANGUAGE", "TERM", "TZ", "USER", "LOGNAME", "VIRTUAL_ENV",
        "CI", "NO_COLOR", "FORCE_COLOR", "PY_COLORS", "COLUMNS", "PYTEST_ADDOPTS",
    }
)
FORWARD_PREFIXES = ("LC_", "PYTHON", "HBA_")
# Always on the guest's PATH (iscsiadm, tgtd, mkfs.* live in sbin).
SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

KERNEL_CMDLINE = (
    "console=ttyS0 quiet loglevel=4 panic=-1 rdinit=/init mitigations=off "
    "8250.nr_uarts=1 random.trust_cpu=on"
)

# Where the guest mounts fresh tmpfs: host paths below them are bound back in (see binds()).
GUEST_TMPFS = ("/tmp", "/run")
# The guest's own kernel filesystems: host paths there cannot be shown in the VM at all.
GUEST_KERNEL = ("/proc", "/sys", "/dev")


def guest_margin(timeout: float) -> float:
    return min(GUEST_MARGIN, timeout / 4)


class HarnessError(Exception):
    """The harness itself failed (not the command): reported with exit status 125."""


def log(message: str) -> None:
    print(f"deploy/vm/run: {message}", file=sys.stderr, flush=True)


def run_tool(
    argv: Sequence[str | Path], what: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a preparation tool; on failure raise HarnessError naming ``what`` and its output."""
    try:
        proc = subprocess.run(
            [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, check=False
        )
    except FileNotFoundError as exc:
        raise HarnessError(f"{what}: {argv[0]} not found (run deploy/setup)") from exc
    if proc.returncode != 0:
        output = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise HarnessError(f"{what}: `{shlex.join(map(str, argv))}` failed:\n{output}")
    return proc


# --------------------------------------------------------------------------------------------
# Preparation: kernel package, module tree, initramfs


@dataclass(frozen=True)
class Prepared:
    kver: str
    kernel: Path  # an ELF vmlinux booted through PVH, or the bzImage
    modules: Path  # .../lib/modules/<kver> of the unpacked package
    initrd: Path


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _apt_kernel_depends() -> str | None:
    proc = subprocess.run(
        ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True, check=False
    )
    for line in proc.stdout.splitlines():
        dep = line.strip().removeprefix("|")
        if dep.startswith("Depends:"):
            name = dep.split(":", 1)[1].strip()
            if name.startswith("linux-image-"):
                return name.removeprefix("linux-image-")
    return None


def apt_update(reason: str) -> None:
    log(f"apt-get update ({reason})")
    run_tool(["apt-get", "update", "-qq"], "updating the package lists")


def resolve_kernel_version(cache: Path) -> str:
    """The kernel ABI version to boot: ``HBA_VM_KERNEL``, else what linux-image-amd64 depends on."""
    pinned = os.environ.get("HBA_VM_KERNEL", "").strip()
    if pinned:
        return pinned.removeprefix("linux-image-")
    if shutil.which("apt-cache") is None:
        raise HarnessError("apt-cache not found: the harness needs a Debian host (apt)")
    kver = _apt_kernel_depends()
    if kver is None:
        apt_update("the package lists name no linux-image-amd64")
        kver = _apt_kernel_depends()
    if kver is not None:
        return kver
    cached = sorted(p.name for p in (cache / "kernel").glob("*") if (p / ".complete").exists())
    if cached:
        log(f"apt-cache names no linux-image-amd64 dependency; using cached kernel {cached[-1]}")
        return cached[-1]
    raise HarnessError(
        "no kernel package: `apt-cache depends linux-image-amd64` names no linux-image-<version> "
        "(check /etc/apt/sources.list; or set HBA_VM_KERNEL=6.1.0-<abi>-amd64)"
    )


def ensure_kernel(cache: Path, kver: str) -> Path:
    """``cache/kernel/<kver>``: the unpacked, depmod-indexed ``linux-image-<kver>`` package."""
    kdir = cache / "kernel" / kver
    if (kdir / ".complete").exists():
        return kdir
    log(f"preparing kernel {kver} (apt-get download + dpkg-deb -x + depmod)")
    shutil.rmtree(kdir, ignore_errors=True)
    kdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kver}.", dir=kdir.parent))
    try:
        tmp.chmod(0o755)  # apt's _apt user reads the download directory
        package = f"linux-image-{kver}"
        try:
            run_tool(["apt-get", "download", "-q", package], f"downloading {package}", cwd=tmp)
        except HarnessError:
            apt_update(f"apt-get download {package} failed")
            run_tool(["apt-get", "download", "-q", package], f"downloading {package}", cwd=tmp)
        debs = sorted(tmp.glob("*.deb"))
        if not debs:
            raise HarnessError(f"apt-get download {package} produced no .deb")
        root = tmp / "root"
        run_tool(["dpkg-deb", "-x", debs[0], root], f"unpacking {debs[0].name}")
        for deb in debs:
            deb.unlink()
        if not (root / "boot" / f"vmlinuz-{kver}").exists():
            raise HarnessError(f"{package} holds no boot/vmlinuz-{kver}")
        run_tool(["depmod", "-b", root, kver], f"indexing the modules of {kver}")
        root.rename(kdir)
        (kdir / ".complete").touch()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # One kernel in the cache (about 400 MB each): drop the ones a newer ABI replaced, and their
    # initramfs images. A pinned HBA_VM_KERNEL downloads again if it was dropped.
    for old in kdir.parent.iterdir():
        if old != kdir and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
            for image in (cache / "initrd").glob(f"{old.name}-*.cpio"):
                image.unlink(missing_ok=True)
    return kdir


def ensure_pvh_kernel(kdir: Path, kver: str) -> Path | None:
    """An uncompressed ELF ``vmlinux`` QEMU can boot directly through PVH, or None.

    Under TCG the bzImage's own decompressor (xz for Debian) and the BIOS cost several seconds of
    every boot; QEMU boots an ELF kernel with a PVH entry note straight into 32-bit mode instead.
    """
    target = kdir / "boot" / f"vmlinux-{kver}"
    if target.exists():
        return target
    config = kdir / "boot" / f"config-{kver}"
    if not config.exists() or "CONFIG_PVH=y" not in config.read_text().splitlines():
        return None
    data = (kdir / "boot" / f"vmlinuz-{kver}").read_bytes()
    elf = None
    for magic in (b"\xfd7zXZ\x00", b"\x1f\x8b\x08"):
        start = data.find(magic)
        while start >= 0 and elf is None:
            decomp: lzma.LZMADecompressor | zlib._Decompress
            if magic.startswith(b"\xfd"):
                decomp = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            else:
                decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                out = decomp.decompress(data[start:])
            except (lzma.LZMAError, zlib.error):
                out = b""
            if out[:4] == b"\x7fELF":
                elf = out
            start = data.find(magic, start + 1)
    if elf is None:
        return None
    partial = target.with_suffix(".partial")
    partial.write_bytes(elf)
    partial.rename(target)
    return target


@dataclass(frozen=True)
class ModuleSpec:
    name: str
    optional: bool


def read_module_list(path: Path) -> list[ModuleSpec]:
    specs = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            specs.append(ModuleSpec(line.rstrip("?"), line.endswith("?")))
    return specs


@dataclass(frozen=True)
class ModuleLoad:
    path: str  # relative to lib/modules/<kver>
    required: bool


def resolve_modules(modules_dir: Path, kver: str, specs: list[ModuleSpec]) -> list[ModuleLoad]:
    """The .ko files to load, in load order (dependencies first).

    ``modprobe --show-depends`` lists the dependencies and softdeps first and the module itself
    last; only the listed, non-optional modules are required (a softdep that cannot load, e.g.
    for a missing CPU feature, must not stop the boot; a real dependency that cannot load makes
    its module fail anyway).
    """
    base = modules_dir.parents[2]  # the unpacked package root (<base>/lib/modules/<kver>)
    order: dict[str, ModuleLoad] = {}
    for spec in specs:
        proc = subprocess.run(
            ["modprobe", "-d", str(base), "-S", kver, "--show-depends", spec.name],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            if spec.optional:
                continue
            raise HarnessError(
                f"kernel {kver} has no module {spec.name!r} (listed in deploy/vm/modules): "
                f"{proc.stderr.strip()}"
            )
        paths = []
        for line in proc.stdout.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "insmod":
                paths.append(str(Path(words[1]).relative_to(modules_dir)))
        for i, rel in enumerate(paths):
            required = i == len(paths) - 1 and not spec.optional
            known = order.get(rel)
            if known is None or (required and not known.required):
                order[rel] = ModuleLoad(rel, required)
    return list(order.values())


def _static_elf(path: Path) -> bool:
    """True when ``path`` is an ELF executable without a program interpreter (statically linked)."""
    data = path.read_bytes()[:4096]
    if data[:4] != b"\x7fELF" or data[4] != 2:  # ELFCLASS64
        return False
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(data[off : off + 4], "little") == 3:  # PT_INTERP
            return False
    return True


def find_busybox() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.exists() and _static_elf(path):
            return path
    raise HarnessError(
        "no statically linked busybox (Debian package busybox-static): run deploy/setup"
    )


def initrd_inputs(kver: str, busybox: Path) -> tuple[str, list[ModuleSpec]]:
    """The hash of everything that goes into the initramfs, and the module list."""
    h = hashlib.sha256()
    h.update(f"format={INITRD_FORMAT}\nkver={kver}\n".encode())
    for name in ("init", "guest-init", "modules", "vmharness.py"):
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes() + b"\0")
    h.update(busybox.read_bytes())
    return h.hexdigest()[:16], read_module_list(HERE / "modules")


def ensure_initrd(cache: Path, kver: str, kdir: Path) -> Path:
    busybox = find_busybox()
    digest, specs = initrd_inputs(kver, busybox)
    out_dir = cache / "initrd"
    target = out_dir / f"{kver}-{digest}.cpio"
    if target.exists():
        os.utime(target)  # recently used: kept by the pruning below
        return target
    log(f"building the initramfs for {kver} ({target.name})")
    out_dir.mkdir(parents=True, exist_ok=True)
    modules_dir = kdir / "lib" / "modules" / kver
    load = resolve_modules(modules_dir, kver, specs)
    with tempfile.TemporaryDirectory(prefix=".initrd.", dir=out_dir) as tmp_s:
        tmp = Path(tmp_s)
        root = tmp / "root"
        # No etc/target: target_core_mod then starts with the db_root a stock host gives it
        # (/var/target, "db_root: cannot open: /etc/target"), and the product must cope.
        for d in ("bin", "dev", "proc", "sys", "run", "tmp", "lower", "upper"):
            (root / d).mkdir(parents=True)
        (root / "newroot").mkdir()
        os.mknod(root / "dev" / "console", 0o600 | 0o020000, os.makedev(5, 1))
        shutil.copy2(busybox, root / "bin" / "busybox")
        for script in ("init", "guest-init"):
            shutil.copy2(HERE / script, root / script)
            (root / script).chmod(0o755)
        lines = []
        for mod in load:
            dest = root / "lib" / "modules" / mod.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(modules_dir / mod.path, dest)
            lines.append(f"{mod.path} {'required' if mod.required else 'optional'}\n")
        (root / "modules.load").write_text("".join(lines))
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        listing = "\n".join([".", *files]) + "\n"
        try:
            cpio = subprocess.run(
                ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0", "--reproducible"],
                cwd=root, input=listing.encode(), capture_output=True, check=False,
            )
        except FileNotFoundError as exc:
            raise HarnessError("cpio not found (Debian package cpio): run deploy/setup") from exc
        if cpio.returncode != 0:
            raise HarnessError(f"cpio failed: {cpio.stderr.decode(errors='replace')}")
        # Uncompressed: the kernel unpacks it faster than it would gunzip it under TCG.
        partial = tmp / "initrd.cpio"
        partial.write_bytes(cpio.stdout)
        partial.rename(target)
    # Keep a few images: a shared cache (HBA_VM_CACHE) serves checkouts whose harness differs,
    # and each would otherwise delete the others' image and rebuild its own on every run.
    images = sorted(out_dir.glob(f"{kver}-*.cpio"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in images[KEEP_INITRDS:]:
        if old != target:
            old.unlink(missing_ok=True)
    return target


def prepare(cache: Path) -> Prepared:
    for tool, package in (
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("apt-get", "apt"),
        ("dpkg-deb", "dpkg"),
        ("depmod", "kmod"),
        ("modprobe", "kmod"),
        ("cpio", "cpio"),
    ):
        if shutil.which(tool) is None:
            raise HarnessError(f"{tool} not found (Debian package {package}): run deploy/setup")
    with locked(cache / ".lock"):
        kver = resolve_kernel_version(cache)
        kdir = ensure_kernel(cache, kver)
        kernel = ensure_pvh_kernel(kdir, kver) or kdir / "boot" / f"vmlinuz-{kver}"
        initrd = ensure_initrd(cache, kver, kdir)
    return Prepared(
        kver=kver,
        kernel=kernel,
        modules=kdir / "lib" / "modules" / kver,
        initrd=initrd,
    )


# --------------------------------------------------------------------------------------------
# Running a command in the VM


@dataclass
class RunOptions:
    command: list[str]
    env: dict[str, str]
    cwd: str
    results: Path
    timeout: float
    boot_timeout: float
    idle_timeout: float
    memory_mb: int
    cpus: int
    verbose: bool
    binds: list[str] = field(default_factory=list)
    logs_name: str = ""  # the logs go to results/vm/<logs_name>


@dataclass
class Outcome:
    status: int
    reason: str = ""  # empty when the command ran to completion
    logs: dict[str, Path] = field(default_factory=dict)
    boot_seconds: float | None = None  # QEMU start to the command's start


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def binds(paths: Sequence[str]) -> list[str]:
    """The host directories the guest must bind over its own tmpfs for ``paths`` to be seen.

    ``paths`` are the host paths the command needs (current directory, checkout, absolute
    arguments); of those under ``/tmp`` or ``/run``, each directory (or a file's directory) is
    bound, minus those inside another. ``/tmp`` or ``/run`` itself cannot be: the guest needs
    its own. Raises HarnessError for a path the guest cannot show (``/proc``, ``/sys``,
    ``/dev``, a name with a newline).
    """
    wanted: set[str] = set()
    for raw in paths:
        path = os.path.normpath(os.path.abspath(raw))
        if any(_under(path, root) for root in GUEST_KERNEL):
            raise HarnessError(
                f"{path} cannot be seen inside the VM (the guest has its own "
                f"{', '.join(GUEST_KERNEL)}): run from another directory")
        if not any(_under(path, root) for root in GUEST_TMPFS):
            continue
        if "\n" in path:
            raise HarnessError(f"{path!r}: a path with a newline cannot be shared with the VM")
        if not os.path.isdir(path):
            path = os.path.dirname(path)
        if path in GUEST_TMPFS:
            raise HarnessError(
                f"{path} itself cannot be shared with the VM (the guest mounts its own {path}): "
                f"run from a directory below it, e.g. {path}/work")
        wanted.add(path)
    return sorted(p for p in wanted if not any(_under(p, q) and p != q for q in wanted))


def guest_environment(extra: Sequence[str], results: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k in FORWARD_NAMES or k.startswith(FORWARD_PREFIXES)
    }
    # The guest's stdout is a virtio port, not a terminal: keep Python's output streaming, and
    # keep pytest's colours and width when the host's is a terminal.
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("HOME", "/root")
    path = [p for p in env.get("PATH", "").split(":") if p]
    env["PATH"] = ":".join(path + [p for p in SYSTEM_PATH if p not in path])
    if sys.stdout.isatty() and "NO_COLOR" not in env:
        env.setdefault("PY_COLORS", "1")
        env.setdefault("COLUMNS", str(shutil.get_terminal_size().columns))
    for item in extra:
        name, sep, value = item.partition("=")
        if not name.isidentifier():
            raise HarnessError(f"-e {item!r}: expected VAR=VALUE or VAR")
        if sep:
            env[name] = value
        elif name in os.environ:
            env[name] = os.environ[name]
    env["HBA_VM"] = "1"
    env["HBA_VM_RESULTS"] = str(results)
    return env


def command_script(opts: RunOptions) -> str:
    # The host's env(1), not busybox's: Debian's static busybox prefers its own applets, so
    # `busybox env sh -c ...` would run busybox's sh, ls, grep, modprobe... instead of the host's.
    cwd = shlex.quote(opts.cwd)
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(opts.env.items()))
    return (
        f"cd -- {cwd} || {{ echo 'deploy/vm/run: cannot enter '{cwd}' inside the VM' >&2; "
        f"exit {EXIT_HARNESS}; }}\n"
        f"exec /usr/bin/env -i {assignments} {shlex.join(opts.command)}\n"
    )


def qemu_command(prep: Prepared, opts: RunOptions, ctl: Path, fifos: Path) -> list[str]:
    # 9p shares: the host's root (read-only; the guest overlays a tmpfs), the run's control
    # directory and the results directory.
    shares = [
        ("hostroot", "/", True),
        ("hbactl", str(ctl), False),
        ("hbares", str(opts.results), False),
    ]
    fs_args: list[str] = []
    for tag, path, readonly in shares:
        ro = ",readonly=on" if readonly else ""
        fs_args += [
            "-fsdev", f"local,id={tag},path={path},security_model=passthrough,multidevs=remap{ro}",
            "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}",
        ]
    # TCG by default: /dev/kvm on the development machines does not run a stock kernel.
    if os.environ.get("HBA_VM_ACCEL", "tcg") == "kvm":
        accel = ["-accel", "kvm", "-cpu", "host"]
    else:
        accel = ["-accel", "tcg,thread=multi", "-cpu", "max"]
    return [
        "qemu-system-x86_64",
        "-M", "pc",
        "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
        *accel,
        "-smp", str(opts.cpus), "-m", f"{opts.memory_mb}M",
        "-kernel", str(prep.kernel), "-initrd", str(prep.initrd),
        "-append", f"{KERNEL_CMDLINE} {os.environ.get('HBA_VM_KERNEL_ARGS', '')}".strip(),
        "-chardev", f"pipe,id=console,path={fifos}/console",
        "-serial", "chardev:console",
        "-device", "virtio-serial-pci,id=vser",
        "-chardev", f"pipe,id=out,path={fifos}/stdout",
        "-device", "virtserialport,bus=vser.0,chardev=out,name=hba.stdout",
        "-chardev", f"pipe,id=err,path={fifos}/stderr",
        "-device", "virtserialport,bus=vser.0,chardev=err,name=hba.stderr",
        *fs_args,
    ]


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def run_in_vm(prep: Prepared, opts: RunOptions) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="hba-vm-") as tmp_s:
        tmp = Path(tmp_s)
        ctl, fifos = tmp / "ctl", tmp / "fifos"
        ctl.mkdir()
        fifos.mkdir()
        deadline_in_guest = max(1, int(opts.timeout - guest_margin(opts.timeout)))
        (ctl / "params").write_text(
            f"HBA_VM_KVER={shlex.quote(prep.kver)}\n"
            f"HBA_VM_MODULES={shlex.quote(str(prep.modules))}\n"
            f"HBA_VM_RESULTS={shlex.quote(str(opts.results))}\n"
            f"HBA_VM_DEADLINE={deadline_in_guest}\n"
        )
        (ctl / "cmd.sh").write_text(command_script(opts))
        # One path a line (binds() refused newlines); read by stage 1 with `read -r`.
        (ctl / "binds").write_text("".join(f"{p}\n" for p in opts.binds))
        for name in ("console", "stdout", "stderr"):
            for suffix in (".in", ".out"):
                os.mkfifo(fifos / f"{name}{suffix}")
        logs_dir = opts.results / "vm" / opts.logs_name
        logs_dir.mkdir(parents=True, exist_ok=True)
        logs = {
            "console": logs_dir / "console.log",
            "qemu": logs_dir / "qemu.log",
            "dmesg": logs_dir / "dmesg.txt",
        }
        logs["dmesg"].unlink(missing_ok=True)
        argv = qemu_command(prep, opts, ctl, fifos)
        (logs_dir / "qemu-command.txt").write_text(shlex.join(argv) + "\n")
        with logs["qemu"].open("wb") as qemu_log, logs["console"].open("wb") as console_log:
            outcome = _supervise(argv, opts, ctl, fifos, qemu_log, console_log)
        if (ctl / "dmesg.txt").exists():
            shutil.copyfile(ctl / "dmesg.txt", logs["dmesg"])
        if not outcome.reason:
            boot_seconds = outcome.boot_seconds
            outcome = _read_status(ctl, opts)
            outcome.boot_seconds = boot_seconds
        outcome.logs = logs
        return outcome


def _supervise(
    argv: list[str],
    opts: RunOptions,
    ctl: Path,
    fifos: Path,
    qemu_log: BinaryIO,
    console_log: BinaryIO,
) -> Outcome:
    """Run QEMU, relay its output FIFOs, enforce the boot, idle and overall time limits."""
    start = time.monotonic()
    last_output = start

    def relay(name: str, data: bytes) -> None:
        nonlocal last_output
        if name == "stdout":
            _write_all(1, data)
        elif name == "stderr":
            _write_all(2, data)
        else:
            console_log.write(data)
            console_log.flush()
            if opts.verbose:
                _write_all(2, data)
            return
        last_output = time.monotonic()

    # Open the read ends before QEMU starts; QEMU opens both FIFO ends O_RDWR, so nothing blocks.
    readers = {
        name: os.open(fifos / f"{name}.out", os.O_RDONLY | os.O_NONBLOCK)
        for name in ("console", "stdout", "stderr")
    }
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=qemu_log,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads in this process
        )
    except OSError as exc:
        for fd in readers.values():
            os.close(fd)
        raise HarnessError(f"cannot start QEMU: {exc}") from exc
    sel = selectors.DefaultSelector()
    for name, fd in readers.items():
        sel.register(fd, selectors.EVENT_READ, name)
    margin = guest_margin(opts.timeout)
    booted_at: float | None = None
    stop_sent_at: float | None = None
    reason = ""
    try:
        while proc.poll() is None:
            for key, _ in sel.select(timeout=0.2):
                with contextlib.suppress(BlockingIOError):
                    data = os.read(key.fd, 65536)
                    if data:
                        relay(key.data, data)
                    else:
                        sel.unregister(key.fd)
            now = time.monotonic()
            if booted_at is None and (ctl / "booted").exists():
                booted_at = last_output = now
            if booted_at is None and now - start > opts.boot_timeout:
                reason = (
                    f"boot timeout: the VM did not start the command within "
                    f"{opts.boot_timeout:.0f} s (HBA_VM_BOOT_TIMEOUT)"
                )
                break
            if stop_sent_at is None:
                why = ""
                if now - start > opts.timeout - margin:
                    why = (f"time limit: the run took more than {opts.timeout - margin:.0f} s "
                           f"(HBA_VM_TIMEOUT={opts.timeout:.0f} s, less {margin:.0f} s kept "
                           "for shutting down)")
                elif booted_at is not None and now - last_output > opts.idle_timeout:
                    why = (f"hang: the command printed nothing for {opts.idle_timeout:.0f} s "
                           "(HBA_VM_IDLE_TIMEOUT)")
                if why:
                    log(f"{why}: stopping the command")
                    _write_atomic(ctl / "stop", why + "\n")
                    stop_sent_at = now
            elif now - stop_sent_at > margin:
                reason = (f"timeout: {(ctl / 'stop').read_text().strip()}; the VM did not stop "
                          f"within {margin:.0f} s after that, QEMU killed")
                break
    finally:
        # Also on KeyboardInterrupt/SystemExit: never leave a VM behind.
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for key in list(sel.get_map().values()):  # what QEMU wrote before it exited
            with contextlib.suppress(OSError):
                while data := os.read(key.fd, 65536):
                    relay(key.data, data)
        sel.close()
        for fd in readers.values():
            os.close(fd)
    boot_seconds = None if booted_at is None else booted_at - start
    if reason:
        status = EXIT_TIMEOUT if reason.startswith("timeout") else EXIT_HARNESS
        return Outcome(status=status, reason=reason, boot_seconds=boot_seconds)
    return Outcome(status=EXIT_HARNESS, boot_seconds=boot_seconds)


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    partial.rename(path)


def _die_with_parent() -> None:
    """In QEMU's child process: get SIGKILL if deploy/vm/run dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Interrupted(BaseException):
    """SIGTERM/SIGHUP: unwinds like KeyboardInterrupt, so QEMU gets killed on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def handle_stop_signals() -> None:
    """A CI runner stopping us with SIGTERM/SIGHUP must not leave QEMU running: turn the signal
    into an exception (Interrupted) so the cleanup in _supervise runs."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupted)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        view = view[n:]


def _read_status(ctl: Path, opts: RunOptions) -> Outcome:
    error = ctl / "error"
    status = ctl / "status"
    if error.exists():
        return Outcome(EXIT_HARNESS, f"the VM's setup failed: {error.read_text().strip()}")
    if not status.exists():
        return Outcome(
            EXIT_HARNESS,
            "the VM stopped before the command finished (kernel panic, init failure or QEMU "
            "error; see the console and QEMU logs below)",
        )
    try:
        code = int(status.read_text().strip())
    except ValueError:
        return Outcome(EXIT_HARNESS, f"unreadable exit status {status.read_text()!r}")
    if (ctl / "timed-out").exists():
        stop = ctl / "stop"
        why = stop.read_text().strip() if stop.exists() else (
            f"time limit: the command ran out of time inside the VM (HBA_VM_TIMEOUT="
            f"{opts.timeout:.0f} s, less {guest_margin(opts.timeout):.0f} s kept for shutting "
            "down)")
        return Outcome(EXIT_TIMEOUT, f"timeout: {why}; the command was killed")
    return Outcome(code)


def report(outcome: Outcome) -> None:
    """Explain a failure on stderr: what failed, the kernel log's tail, where the logs are."""
    if outcome.status == 0:
        return
    if outcome.reason:
        log(outcome.reason)
    dmesg = outcome.logs.get("dmesg")
    console = outcome.logs.get("console")
    qemu = outcome.logs.get("qemu")
    if dmesg is not None and dmesg.exists():
        tail = _tail(dmesg, 25)
        if tail:
            log(f"exit status {outcome.status}; last kernel messages ({dmesg}):")
            print(tail, file=sys.stderr, flush=True)
    elif outcome.reason:
        for path in (console, qemu):
            if path is not None:
                tail = _tail(path, 40)
                if tail:
                    log(f"tail of {path}:")
                    print(tail, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" in args:
        i = args.index("--")
        opt_args, command = args[:i], args[i + 1 :]
    else:
        opt_args, command = args, []
    parser = argparse.ArgumentParser(
        prog="deploy/vm/run",
        usage="deploy/vm/run [-e VAR[=VALUE]]... [--prepare] [--verbose] -- CMD [ARGS...]",
        description="Boot the kernel-test VM and run CMD as root inside it, with the host's "
        "userland at the same paths; exit with CMD's exit status (124: time limit, 125: the "
        "harness failed). See deploy/vm/README.md.",
    )
    parser.add_argument(
        "-e", "--env", action="append", default=[], metavar="VAR[=VALUE]",
        help="set VAR inside the VM (without =VALUE: the host's value)",
    )
    parser.add_argument(
        "--prepare", action="store_true",
        help="only prepare (download the kernel, build the initramfs) and print the paths",
    )
    parser.add_argument(
        "--verbose", action="store_true", default=os.environ.get("HBA_VM_VERBOSE") == "1",
        help="also stream the serial console (boot and init messages) to stderr",
    )
    opts_ns = parser.parse_args(opt_args)
    handle_stop_signals()
    if not command and not opts_ns.prepare:
        parser.error("no command: deploy/vm/run -- CMD [ARGS...]")
    try:
        return _main(opts_ns, command)
    except HarnessError as exc:
        log(str(exc))
        return EXIT_HARNESS
    except KeyboardInterrupt:
        log("interrupted; the VM was stopped")
        return 130
    except Interrupted as exc:
        log(f"stopped by signal {exc.signum}; the VM was stopped")
        return 128 + exc.signum


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise HarnessError(f"{name}={raw!r} is not a number") from exc


def _main(ns: argparse.Namespace, command: list[str]) -> int:
    prep = prepare(cache_dir())
    if ns.prepare:
        print(f"kernel  {prep.kver}\nimage   {prep.kernel}\nmodules {prep.modules}\n"
              f"initrd  {prep.initrd}")
        return 0
    opts = run_options(prep, command, ns.env, verbose=ns.verbose)
    outcome = run_in_vm(prep, opts)
    report(outcome)
    return outcome.status


def cache_dir() -> Path:
    """Where kernels and initramfs images are kept (``HBA_VM_CACHE``); checks we are root."""
    if os.geteuid() != 0:
        raise HarnessError("run as root (the VM reads the host's / through a 9p passthrough share)")
    return Path(os.environ.get("HBA_VM_CACHE") or REPO / ".cache" / "vm")


def run_options(
    prep: Prepared, command: list[str], env_args: Sequence[str] = (), *,
    verbose: bool = False, timeout: float | None = None,
) -> RunOptions:
    """The run's options from the environment (``HBA_VM_*``), for ``command`` in this directory."""
    cwd = os.getcwd()
    needed = [cwd, str(REPO), str(prep.modules)]
    needed += [arg for arg in command if arg.startswith("/") and os.path.exists(arg)]
    results = Path(os.environ.get("HBA_VM_RESULTS") or cache_dir() / "results").resolve()
    results.mkdir(parents=True, exist_ok=True)
    return RunOptions(
        command=command,
        env=guest_environment(env_args, results),
        cwd=cwd,
        results=results,
        timeout=timeout or _env_number("HBA_VM_TIMEOUT", DEFAULT_TIMEOUT),
        boot_timeout=_env_number("HBA_VM_BOOT_TIMEOUT", DEFAULT_BOOT_TIMEOUT),
        idle_timeout=_env_number("HBA_VM_IDLE_TIMEOUT", DEFAULT_IDLE_TIMEOUT),
        memory_mb=int(_env_number("HBA_VM_MEMORY_MB", DEFAULT_MEMORY_MB)),
        cpus=int(_env_number("HBA_VM_CPUS", DEFAULT_CPUS)),
        verbose=verbose,
        binds=binds(needed),
    )
