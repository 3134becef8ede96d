#!/bin/bash
# Issue 12, question 2: which ring completion (SCSI status + sense) makes dm-multipath fail the
# path and retry on the other one, and which kernel knobs do. Two paths of the daemon (with
# research/faultpath.py's fault injection) to one LIO LUN, one dm-multipath map over them, a
# write/read-verify probe on the map; for each candidate, path 127.0.0.1 answers every command
# with it for 8 s, then goes back to normal. Run inside the VM:
#   deploy/vm/run -- research/statuses.sh [CASE...]
set -u
. "$(dirname "$0")/common.sh"
trap 'mpathd_stop; hba_stop' EXIT

CASES=(
    "nr0800|status 02 2 08 00"      # NOT READY, LU communication failure (SessionFailed today)
    "ab0800|status 02 b 08 00"      # ABORTED COMMAND, LU communication failure
    "nr0401|status 02 2 04 01"      # NOT READY, becoming ready (ConnectionFailed today)
    "busy|status 08"                # BUSY
    "nr040a|status 02 2 04 0a"      # NOT READY, ALUA state transition
    "nr040c|status 02 2 04 0c"      # NOT READY, target port in unavailable state
    "hw4400|status 02 4 44 00"      # HARDWARE ERROR, internal target failure
    "me1100|status 02 3 11 00"      # MEDIUM ERROR, unrecovered read error
    "tcmloop_offline|knob"          # tcm_loop tpgt_1/transport_status = offline
    "block_dev|knob"                # TCMU action/block_dev = 1
    "hold|hold"                     # no answer for 8 s (a session in recovery)
)
[ $# -gt 0 ] && { sel=(); for c in "${CASES[@]}"; do for w in "$@"; do [ "${c%%|*}" = "$w" ] && sel+=("$c"); done; done; CASES=("${sel[@]}"); }

lio_setup || exit 1
fault_start 5 || exit 1
read -r A B <<<"$(fault_disks)"
echo "paths: p1=$A (127.0.0.1) p2=$B (127.0.0.2)"
mpathd_start || exit 1
mpath_adopt "$A" || exit 1
MAP=/dev/mapper/$(dm_name)
show multipath -ll
SA=${A#/dev/}
LOOP_TPG=
for t in /sys/kernel/config/target/loopback/naa.*/tpgt_1; do
    [ "$(cat "$t/address")" = "$(basename "$(readlink -f "/sys/block/$SA/device")" | cut -d: -f1-3)" ] && LOOP_TPG=$t
done
SO=$(ls -d /sys/kernel/config/target/core/user_*/hba-p1)
echo "p1: tcm_loop $LOOP_TPG, backstore $SO"

for c in "${CASES[@]}"; do
    name=${c%%|*}
    spec=${c#*|}
    say "case $name: $spec"
    wait_active 2 60
    mark "case $name"
    python3 "$RESEARCH/stallprobe.py" "$MAP" --seconds 24 --json "$OUT/case-$name.json" \
        >"$OUT/case-$name.txt" 2>&1 &
    probe=$!
    sleep 4
    t0=$(uptime_s)
    # On for exactly 8 s, whatever blocks meanwhile: anything that touches a path that holds
    # commands (sg_turs, dd, even multipath -ll's priority check) blocks until a timeout.
    case $name in
    tcmloop_offline) on="echo offline >$LOOP_TPG/transport_status"; off="echo online >$LOOP_TPG/transport_status" ;;
    block_dev) on="echo 1 >$SO/action/block_dev"; off="echo 0 >$SO/action/block_dev" ;;
    *) on="fault_set 127.0.0.1 '$spec'"; off="fault_clear 127.0.0.1" ;;
    esac
    eval "$on"
    ( sleep 8; eval "$off"; echo "fault off at $(uptime_s)" ) &
    offjob=$!
    echo "fault on at $t0"
    { sleep 3
      show dmsetup status --target multipath
      show multipathd show paths format "%d %t %T %o %s"
      t=$(uptime_s); show sg_turs -v "$A"; echo "(after $(awk -v a="$t" '{printf "%.1f", $1 - a}' /proc/uptime) s)"
      t=$(uptime_s); show dd if="$A" of=/dev/null bs=4k count=1 iflag=direct; echo "(after $(awk -v a="$t" '{printf "%.1f", $1 - a}' /proc/uptime) s)"
    } >"$OUT/case-$name.diag" 2>&1 &
    diag=$!
    wait "$offjob"
    wait_active 2 60
    wait "$probe"
    cat "$OUT/case-$name.txt"
    wait "$diag"
    echo "--- while faulty: dm status, checkers, what the path itself answered (sg_turs, dd)"
    cat "$OUT/case-$name.diag"
    echo "--- kernel log of the case"
    dmesg_since "case $name" | grep -vE 'alua: (port group|transition timeout)|Optimal transfer size' | head -40
done

say "multipathd log (path events)"
grep -E 'reinstat|fail|tur state|checker|mark as failed|remaining active' "$OUT/multipathd.log" | tail -80
say "daemon log (tail)"
tail -40 "$OUT/faultpath.log"
mpathd_stop
show multipath -F
