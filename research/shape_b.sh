#!/bin/bash
# Issue 12, question 1 (b): one TCMU backstore linked to a second tcm_loop port. What does the
# kernel present on the second port, and can a failure be told apart per port? Run in the VM:
#   deploy/vm/run -- research/shape_b.sh
set -u
. "$(dirname "$0")/common.sh"
trap 'mpathd_stop; hba_stop' EXIT

lio_setup || exit 1
nft_init
hba_start 5 || exit 1
read -r A B <<<"$(hba_disks)"

say "a second tcm_loop target whose LUN 0 links backstore hba-p1 (already behind $A)"
python3 - <<'EOF'
import rtslib_fb as rts
so = rts.UserBackedStorageObject("hba-p1")
target = rts.Target(rts.FabricModule("loopback"))
tpg = rts.TPG(target, 1)
rts.LUN(tpg, 0, so)
print("linked", so.path, "to", tpg.path, "address", open(tpg.path + "/address").read().strip())
EOF
udevadm settle
sleep 3
C=$(lsblk -dpno NAME,HCTL | awk -v a="$A" -v b="$B" '$1 != a && $1 != b && $1 ~ /sd/ {print $1}' | head -1)
echo "second port of backstore hba-p1: $C"
show lsblk -o NAME,HCTL,SIZE,WWN
show ls /sys/kernel/config/target/core/user_1/hba-p1/
for d in "$A" "$C" "$B"; do
    say "$d"
    show sg_vpd -p di "$d"
    show sg_rtpg -d "$d"
    printf 'access_state=%s\n' "$(cat "/sys/block/${d#/dev/}/device/access_state")"
done
say "LIO's own ALUA view of the two tcm_loop ports of hba-p1 (local target port groups)"
for l in /sys/kernel/config/target/loopback/*/tpgt_1/lun/lun_0; do
    printf '%s -> %s\n' "$l" "$(readlink "$l"/* | head -1)"
    head -3 "$l/alua_tg_pt_gp"
done
say "the ring carries no port: struct tcmu_cmd_entry (uapi)"
sed -n '/struct tcmu_cmd_entry {/,/^};/p' /usr/include/linux/target_core_user.h

say "multipathd with three paths (two ports of one backstore, one of the other)"
mpathd_start && mpath_adopt "$A" 3
show multipath -ll
say "cut 127.0.0.1 (the session behind hba-p1): both of its ports fail together"
python3 "$RESEARCH/stallprobe.py" "/dev/mapper/$(dm_name)" --seconds 35 >"$OUT/shape-b-probe.txt" 2>&1 &
probe=$!
sleep 3
cut_path 127.0.0.1
sleep 22
show multipath -ll
restore_path 127.0.0.1
wait "$probe"
cat "$OUT/shape-b-probe.txt"
wait_active 3 60
show multipath -ll
mpathd_stop
multipath -F
# The extra tcm_loop target goes with the VM; the daemon's stop leaves the disks in place.
