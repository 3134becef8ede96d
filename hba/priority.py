"""The daemon's CPU priority (``Priority``, ``hbactl daemon --priority``), off by default.

Theory of operation
-------------------
open-iscsi moves a disk's data in the kernel, in softirq and a workqueue per session, and
iscsid itself runs at nice -10 (``oom_adjust()`` in open-iscsi's ``usr/iscsi_util.c``). Here the
data path is the daemon's event loop, one per worker process, a user process like any other.

Two things decide a thread's share of a CPU (sched(7)):

- its nice value, against the other threads of its scheduling group;
- the group's weight. With autogroup (``kernel.sched_autogroup_enabled``, on in Debian's
  kernels) every session (``setsid``) is one group, and the groups share the CPU by the
  *group's* nice value (``/proc/<pid>/autogroup``) whatever the nice values inside them.

So :func:`raise_priority` gives every thread of the process the nice value (threads started
later inherit it) and gives it to the autogroup too, but only when that group is the daemon's
own, i.e. the process leads its session: systemd starts services so, and a worker process
makes itself one (:func:`own_session`). A daemon started from a terminal shares the shell's
session, and renicing that group would raise every program of the session: it is left alone,
and the log says so. Under a cgroup with the cpu controller (systemd's ``CPUWeight=``),
autogroup does not apply and the nice values act within the cgroup.

Why it is not on by default, measured on 2026-12-07 (alternating runs, same hour):

- Against a CPU hog that does no I/O through us it helps: ``bench/ring --disks 2 --workers 2``
  beside ``stress-ng --cpu 1``, the two workers got 1.00 and 0.89 cores at nice 0, 1.66 and
  1.81 cores at nice -10 in their own groups.
- Against the program that does the I/O it hurts: fio on our disk in the VM, the disk's
  worker in a group of its own, 4 KiB random reads beside stress-ng fell from 0.64x and 0.71x
  of open-iscsi at nice 0 to 0.49x and 0.53x at nice -10 (1 MiB writes 0.63x/0.62x against
  0.62x/0.66x; quiet, 4 KiB 0.65x against 0.68x and 0.77x). A worker that outweighs fio takes
  the CPU at each command fio submits, so commands reach it one at a time instead of in
  batches, and each costs a whole wake-up.

Raising a priority needs CAP_SYS_NICE (root has it). Without it the daemon runs at the priority
it was given, and says so once.
"""

from __future__ import annotations

import contextlib
import logging
import os

from initiator.url import decimal

log = logging.getLogger(__name__)

LOWEST, HIGHEST = 19, -20
"""The range of nice values (setpriority(2)): 19 is the least CPU, -20 the most."""

_AUTOGROUP = "/proc/self/autogroup"
_TASKS = "/proc/self/task"


def parse_priority(text: str) -> int | None:
    """A nice value a person wrote (``-10``, ``0``, ``+5``), or None when it is not one."""
    sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text[1:] if text[:1] == "+"
                                                           else text)
    number = decimal(digits)
    if number is None or not HIGHEST <= sign * number <= LOWEST:
        return None
    return sign * number


def own_session() -> bool:
    """Lead a session of our own (and so, under autogroup, a scheduling group of our own);
    True when we do. A worker process calls it: it is never a process group leader."""
    if os.getsid(0) == os.getpid():
        return True
    try:
        os.setsid()
    except OSError:   # a process group leader (started from a shell) cannot
        return False
    return True


def raise_priority(nice: int, what: str = "daemon") -> bool:
    """Give every thread of this process the nice value ``nice`` and, when this process leads
    its session, give it to its autogroup too (module docstring). False, with a warning
    logged, when the system refused; ``what`` names the process in the messages."""
    try:
        tids = [int(name) for name in os.listdir(_TASKS)]
    except OSError:   # no /proc: this thread at least
        tids = [0]
    try:
        for tid in tids:
            with contextlib.suppress(ProcessLookupError):   # a thread that just ended
                os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:
        log.warning("%s: cannot set its CPU priority to nice %d (%s): its disks slow down "
                    "when other programs keep the CPUs busy; run it as root (or with "
                    "CAP_SYS_NICE), or set Priority = 0 in the configuration to keep the "
                    "default", what, nice, exc.strerror or exc)
        return False
    if not os.path.exists(_AUTOGROUP):
        return True   # a kernel without autogroup: the nice values are all there is
    if os.getsid(0) != os.getpid():
        log.info("%s: nice %d for its threads; its scheduling group is the session's of the "
                 "program that started it, left as it is (started by systemd, the daemon has "
                 "a group of its own)", what, nice)
        return True
    try:
        with open(_AUTOGROUP, "w", encoding="ascii") as group:
            group.write(f"{nice}\n")
    except OSError as exc:
        log.warning("%s: cannot set the CPU priority of its scheduling group to nice %d (%s): "
                    "its disks slow down when other programs keep the CPUs busy", what, nice,
                    exc.strerror or exc)
        return False
    return True
