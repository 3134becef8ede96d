#!/bin/bash
# Issue 12, question 5 aside: why REGISTER answered NOT READY 08/00 (sg_persist -vvv), with and
# without PR pass-through, and whether mpathpersist works on the map. It was the remote LIO failing
# to write APTPL metadata to the missing /etc/target/pr (lio_setup now creates it). Run in the VM:
#   deploy/vm/run -- research/pr_aptpl_debug.sh
set -u
. "$(dirname "$0")/common.sh"
trap 'mpathd_stop; hba_stop' EXIT
lio_setup >/dev/null && rmdir /etc/target/pr   # reproduce: no APTPL directory
hba_start 5 || exit 1
read -r A B <<<"$(hba_disks)"
echo "=== local emulation"
sg_persist -vvv --out --register --param-sark=0x1111 "$A" 2>&1 | tail -25
sg_persist --in --read-keys "$A"
for so in /sys/kernel/config/target/core/user_*/hba-*; do echo 0 >"$so/attrib/pgr_support"; done
echo "=== pass-through"
sg_persist -vvv --out --register --param-sark=0x2222 "$B" 2>&1 | tail -25
sg_persist --in --read-keys "$B"
grep -iE "5f|persistent|PR" "$OUT/daemon.log" | tail -5
dmesg | tail -15
mpathd_start && mpath_adopt "$A" >/dev/null
MAP=/dev/mapper/$(dm_name)
ls -la "$MAP" /dev/dm-*
mpathpersist -v4 --in -k "$MAP" 2>&1 | tail -30
strace -f -e trace=openat mpathpersist --in -k "$MAP" 2>&1 | grep -v ENOENT | tail -15
