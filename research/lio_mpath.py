#!/usr/bin/env python3
"""A LIO iSCSI target with one LUN reachable on two portals, for the multipath experiments.

Run inside the kernel-test VM (deploy/vm/run). The layout mimics a dual-controller array:

    iqn.2003-01.org.example:mpath
      tpgt_1  portal 127.0.0.1:3260   lun_0 -> backstore, ALUA group "ctrl_a" (id 16)
      tpgt_2  portal 127.0.0.2:3260   lun_0 -> backstore, ALUA group "ctrl_b" (id 32)

Each TPG is its own SCSI target port (own relative target port identifier), so the two paths
report different VPD 0x83 port designators and REPORT TARGET PORT GROUPS shows two groups.
Demo mode (generate_node_acls) lets any initiator in; each iSCSI session is its own I_T nexus
(initiator port = IQN + ISID), which persistent reservations key on.

    lio_mpath.py setup [--size BYTES] [--fileio PATH]
    lio_mpath.py alua STATE_A STATE_B      # e.g. "ao" "an" / "ao" "standby" / "unavailable" ...
    lio_mpath.py teardown

Research prototype (issue 12), not product code.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import rtslib_fb as rts

IQN = "iqn.2003-01.org.example:mpath"
NAME = "mpath_lun"
PORTALS = (("127.0.0.1", 3260, 1, "ctrl_a", 16), ("127.0.0.2", 3260, 2, "ctrl_b", 32))
# target_core_alua.h: ALUA_ACCESS_STATE_*
STATES = {"ao": 0, "an": 1, "standby": 2, "unavailable": 3, "lba": 4, "offline": 14,
          "transitioning": 15}


def _storage() -> rts.StorageObject | None:
    """The LUN's backstore, ramdisk or fileio, or None when there is none."""
    for cls in (rts.RDMCPStorageObject, rts.FileIOStorageObject):
        with contextlib.suppress(rts.RTSLibNotInCFSError, rts.RTSLibError):
            return cls(NAME)
    return None


def setup(size: int, fileio: str | None) -> None:
    if fileio:
        Path(fileio).parent.mkdir(parents=True, exist_ok=True)
        with open(fileio, "wb") as f:
            f.truncate(size)
        so = rts.FileIOStorageObject(NAME, fileio, size=size, write_back=False)
    else:
        so = rts.RDMCPStorageObject(NAME, size=size)
    target = rts.Target(rts.FabricModule("iscsi"), IQN, mode="create")
    for host, port, tag, group, group_id in PORTALS:
        tpg = rts.TPG(target, tag, mode="create")
        rts.NetworkPortal(tpg, host, port, mode="create")
        lun = rts.LUN(tpg, 0, so)
        gp = rts.ALUATargetPortGroup(so, group, group_id)
        gp.alua_access_type = 3          # implicit and explicit
        gp.preferred = 0
        lun.alua_tg_pt_gp_name = group
        tpg.set_attribute("authentication", "0")
        tpg.set_attribute("generate_node_acls", "1")
        tpg.set_attribute("demo_mode_write_protect", "0")
        tpg.set_attribute("cache_dynamic_acls", "1")
        tpg.enable = True
    print(f"LIO target {IQN}: LUN 0 ({size} bytes, {'fileio' if fileio else 'ramdisk'}) on "
          + ", ".join(f"{h}:{p} (tpgt {t}, ALUA group {g} id {i})"
                      for h, p, t, g, i in PORTALS))


def alua(state_a: str, state_b: str) -> None:
    so = _storage()
    if so is None:
        sys.exit("no backstore; run setup first")
    for (_, _, _, group, _), state in zip(PORTALS, (state_a, state_b), strict=True):
        gp = rts.ALUATargetPortGroup(so, group)
        gp.alua_access_state = STATES[state]
        print(f"ALUA group {group}: {state} ({STATES[state]})")


def teardown() -> None:
    with contextlib.suppress(rts.RTSLibNotInCFSError):
        rts.Target(rts.FabricModule("iscsi"), IQN, mode="lookup").delete()
    so = _storage()
    if so is not None:
        so.delete()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("setup")
    p.add_argument("--size", type=int, default=256 << 20)
    p.add_argument("--fileio", metavar="PATH")
    p = sub.add_parser("alua")
    p.add_argument("state_a", choices=STATES)
    p.add_argument("state_b", choices=STATES)
    sub.add_parser("teardown")
    args = parser.parse_args()
    if args.cmd == "setup":
        setup(args.size, args.fileio)
    elif args.cmd == "alua":
        alua(args.state_a, args.state_b)
    else:
        teardown()


if __name__ == "__main__":
    main()
