#!/bin/bash
# Issue 12, question 4: do multipathd's priorities follow the remote target's ALUA states?
# LIO on the remote side: port group 0x10 (127.0.0.1, path p1) and 0x20 (127.0.0.2, path p2);
# we change their states and watch multipath -ll, the kernel's alua handler and where the I/O
# goes (per-path I/O counters while the probe runs). Run inside the VM:
#   deploy/vm/run -- research/alua.sh
set -u
. "$(dirname "$0")/common.sh"
trap 'mpathd_stop; hba_stop' EXIT

io_count() { awk '{print $1 + $5}' "/sys/block/${1#/dev/}/stat"; }   # reads + writes completed

step() {  # $1 $2: ALUA states of ctrl_a and ctrl_b
    say "remote ALUA: ctrl_a (p1, $A) = $1, ctrl_b (p2, $B) = $2"
    mark "alua $1 $2"
    lio_alua "$1" "$2"
    # The remote queues a UNIT ATTENTION (2A/06, asymmetric access state changed) for each
    # I_T nexus; the next command of each session gets it. Give the checkers two rounds.
    local a0 b0
    a0=$(io_count "$A"); b0=$(io_count "$B")
    python3 "$RESEARCH/stallprobe.py" "$MAP" --seconds 12 >"$OUT/alua-probe.txt" 2>&1
    cat "$OUT/alua-probe.txt"
    echo "I/O completed during the probe: $A $(( $(io_count "$A") - a0 )), $B $(( $(io_count "$B") - b0 ))"
    sleep 6
    show multipath -ll
    show multipathd show paths format "%d %t %T %p %P %s"
    for d in "$A" "$B"; do
        printf '%s: access_state=%s dh_state=%s\n' "$d" "$(cat "/sys/block/${d#/dev/}/device/access_state")" \
            "$(cat "/sys/block/${d#/dev/}/device/dh_state")"
    done
    show sg_rtpg -d "$A"
    dmesg_since "alua $1 $2" | grep -E 'alua|Unit Attention|Asymmetric|multipath' | head -12
}

lio_setup || exit 1
hba_start 5 || exit 1
read -r A B <<<"$(hba_disks)"
mpathd_start && mpath_adopt "$A" || exit 1
MAP=/dev/mapper/$(dm_name)

step ao ao
step ao an
step ao standby
step an ao
step unavailable ao
step ao ao

say "the local (tcm_loop side) ALUA of our TCMU backstores: what LIO itself would answer"
for so in /sys/kernel/config/target/core/user_*/hba-*; do
    printf '%s: alua_support=%s default_tg_pt_gp state=%s\n' "$so" "$(cat "$so/attrib/alua_support")" \
        "$(cat "$so/alua/default_tg_pt_gp/alua_access_state")"
done
grep -E 'prio|alua' "$OUT/multipathd.log" | grep -v blacklist | tail -30
