#!/bin/bash
# Issue 12, questions 2, 3 and 6: cut one path with an nftables drop (no RST: a silent path, like
# a pulled cable) while a write/read-verify probe runs on the dm-multipath map, restore it, and
# measure: when dm-multipath failed the path, the longest I/O stall, I/O errors, when the path
# was reinstated. Then both paths cut for less, and for more, than the no-path retry window.
# The same with our daemon and with open-iscsi (the reference), one after the other, same VM.
#   deploy/vm/run -- research/failover.sh [hba] [hbatimer] [openiscsi]   (default: all)
# Environment: ROUNDS (2), RT (replacement timeout, 5), CUT (seconds a path stays cut, 25),
# BOTH_SHORT (20), BOTH_LONG (90; 0 skips the both-paths cases).
set -u
. "$(dirname "$0")/common.sh"
trap 'mpathd_stop; hba_stop; [ -n "${ISCSID_PID:-}" ] && kill "$ISCSID_PID"' EXIT
ROUNDS=${ROUNDS:-2}
RT=${RT:-5}
CUT=${CUT:-25}
BOTH_SHORT=${BOTH_SHORT:-20}
BOTH_LONG=${BOTH_LONG:-90}
WHO=("$@")
[ ${#WHO[@]} -eq 0 ] && WHO=(hba hbatimer openiscsi)
SUMMARY=$OUT/failover-summary.txt
: >"$SUMMARY"

wait_paths_below() {  # wait until fewer than $1 paths are active; prints the time it took
    local t0 i
    t0=$(uptime_s)
    for i in $(seq 1 $(($2 * 5))); do
        [ "$(active_paths)" -lt "$1" ] && { awk -v a="$t0" '{printf "%.1f", $1 - a}' /proc/uptime; return 0; }
        sleep 0.2
    done
    echo "never"
}

# $1: label. The map exists with 2 active paths; path 1 is 127.0.0.1.
rounds() {
    local who=$1 r t_cut fail_after t_restore reinst probe
    for r in $(seq 1 "$ROUNDS"); do
        say "$who: round $r: cut 127.0.0.1 for $CUT s"
        wait_active 2 90 >/dev/null
        mark "$who round $r"
        python3 "$RESEARCH/stallprobe.py" "$MAP" --seconds $((CUT + 20)) \
            --json "$OUT/$who-round$r.json" >"$OUT/$who-round$r.txt" 2>&1 &
        probe=$!
        sleep 5
        cut_path 127.0.0.1
        t_cut=$(uptime_s)
        fail_after=$(wait_paths_below 2 "$CUT")
        echo "dm-multipath failed the path ${fail_after} s after the cut"
        show multipath -ll
        sleep "$(awk -v a="$t_cut" -v c="$CUT" '{d = a + c - $1; print (d > 0 ? d : 0)}' /proc/uptime)"
        restore_path 127.0.0.1
        t_restore=$(uptime_s)
        reinst=$(wait_active 2 90)
        echo "restored: $reinst"
        wait "$probe"
        cat "$OUT/$who-round$r.txt"
        printf '%s round %s: path failed %s s after cut; %s; %s\n' "$who" "$r" "$fail_after" \
            "$(head -1 "$OUT/$who-round$r.txt")" "reinstated: $reinst" >>"$SUMMARY"
        dmesg_since "$who round $r" | grep -E 'multipath|Failing|reinstat|connection|session|I/O error|rejecting' | head -20
    done
    if [ "$BOTH_LONG" -gt 0 ]; then
        local secs
        for secs in "$BOTH_SHORT" "$BOTH_LONG"; do
            say "$who: both paths cut for $secs s"
            wait_active 2 90 >/dev/null
            mark "$who both $secs"
            python3 "$RESEARCH/stallprobe.py" "$MAP" --seconds $((secs + 25)) \
                --json "$OUT/$who-both$secs.json" >"$OUT/$who-both$secs.txt" 2>&1 &
            probe=$!
            sleep 5
            cut_path 127.0.0.1
            cut_path 127.0.0.2
            sleep "$secs"
            show multipath -ll
            restore_path 127.0.0.1
            restore_path 127.0.0.2
            reinst=$(wait_active 2 120)
            echo "restored: $reinst"
            wait "$probe"
            cat "$OUT/$who-both$secs.txt"
            printf '%s both cut %s s: %s; %s\n' "$who" "$secs" "$(head -1 "$OUT/$who-both$secs.txt")" \
                "reinstated: $reinst" >>"$SUMMARY"
            dmesg_since "$who both $secs" | grep -E 'multipath|Failing|reinstat|queue|I/O error|rejecting' | head -20
        done
    fi
}

teardown_map() {
    mpathd_stop
    show multipath -F
    rm -f /etc/multipath/wwids
}

lio_setup || exit 1
nft_init

for who in "${WHO[@]}"; do
case $who in
hba)
    say "our daemon, ReplacementTimeout=$RT"
    hba_start "$RT" || exit 1
    read -r A B <<<"$(hba_disks)"
    mpathd_start && mpath_adopt "$A" || exit 1
    MAP=/dev/mapper/$(dm_name)
    show multipath -ll
    rounds hba
    show hbactl status
    teardown_map
    show hbactl detach p1
    show hbactl detach p2
    hba_stop
    ;;
hbatimer)
    say "our daemon, ReplacementTimeout=$RT enforced by a timer (research/faultpath.py --replacement-timer)"
    FAULTPATH_ARGS=--replacement-timer fault_start "$RT" || exit 1
    read -r A B <<<"$(fault_disks)"
    mpathd_start && mpath_adopt "$A" || exit 1
    MAP=/dev/mapper/$(dm_name)
    rounds hbatimer
    teardown_map
    hba_stop
    ;;
openiscsi)
    say "open-iscsi, replacement_timeout=$RT, noop 5/5"
    mkdir -p /run/lock/iscsi
    iscsid -f >"$OUT/iscsid.log" 2>&1 &
    ISCSID_PID=$!
    sleep 2
    show iscsiadm -m discovery -t st -p 127.0.0.1
    for p in 127.0.0.1 127.0.0.2; do
        for kv in node.session.timeo.replacement_timeout="$RT" node.conn[0].timeo.noop_out_interval=5 \
                  node.conn[0].timeo.noop_out_timeout=5; do
            iscsiadm -m node -T "$IQN" -p "$p:3260" -o update -n "${kv%%=*}" -v "${kv#*=}"
        done
    done
    show iscsiadm -m node -T "$IQN" --login
    udevadm settle
    A=$(ls -d /sys/class/iscsi_session/session*/device/target*/*/block/* | head -1)
    A=/dev/$(basename "$A")
    show lsblk -o NAME,HCTL,SIZE,TRAN
    mpathd_start && mpath_adopt "$A" || exit 1
    MAP=/dev/mapper/$(dm_name)
    show multipath -ll
    rounds openiscsi
    show iscsiadm -m session -P 1
    teardown_map
    iscsiadm -m node --logoutall=all
    kill "$ISCSID_PID"; ISCSID_PID=
    ;;
esac
done

say "summary"
cat "$SUMMARY"
