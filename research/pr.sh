#!/bin/bash
# Issue 12, question 5: persistent reservations over two paths of our daemon. First with the
# TCMU backstores as created today (attrib/pgr_support=1: LIO emulates PR locally, per
# backstore), then with pgr_support=0 (PR commands go through the ring to the remote target).
# The remote LIO's own view is read from its configfs (pr/). Run inside the VM:
#   deploy/vm/run -- research/pr.sh
set -u
. "$(dirname "$0")/common.sh"
trap 'mpathd_stop; hba_stop' EXIT

remote_pr() {
    local d
    d=$(ls -d /sys/kernel/config/target/core/*/mpath_lun)
    echo "--- remote LIO $d/pr:"
    for f in res_holder res_pr_registered_i_pts res_type res_pr_generation; do
        printf '%s: %s\n' "$f" "$(tr '\n' ' ' <"$d/pr/$f")"
    done
}

try_write() {  # $1: device; one 4 KiB O_DIRECT write at 1 MiB
    local r
    r=$(dd if=/dev/zero of="$1" bs=4k count=1 seek=256 oflag=direct 2>&1 | head -1)
    echo "write through $1: $r"
}

round() {
    say "$1"
    show sg_persist --out --register --param-sark=0x1111 "$A"
    show sg_persist --out --register --param-sark=0x2222 "$B"
    show sg_persist --in --read-keys "$A"
    show sg_persist --in --read-keys "$B"
    remote_pr
    say "$1: reserve WRITE EXCLUSIVE through $A (key 0x1111)"
    show sg_persist --out --reserve --param-rk=0x1111 --prout-type=1 "$A"
    show sg_persist --in --read-reservation "$A"
    show sg_persist --in --read-reservation "$B"
    remote_pr
    try_write "$A"
    try_write "$B"
    dmesg | grep -i 'reservation' | tail -3
    say "$1: release and unregister"
    show sg_persist --out --release --param-rk=0x1111 --prout-type=1 "$A"
    show sg_persist --out --register --param-rk=0x1111 --param-sark=0 "$A"
    show sg_persist --out --register --param-rk=0x2222 --param-sark=0 "$B"
    show sg_persist --in --read-keys "$B"
    remote_pr
}

lio_setup || exit 1
hba_start 5 || exit 1
read -r A B <<<"$(hba_disks)"
for so in /sys/kernel/config/target/core/user_*/hba-*; do
    printf '%s: pgr_support=%s emulate_pr=%s\n' "$so" "$(cat "$so/attrib/pgr_support")" \
        "$(cat "$so/attrib/emulate_pr")"
done
round "today (pgr_support=1, LIO emulates PR per TCMU backstore)"

for so in /sys/kernel/config/target/core/user_*/hba-*; do
    echo 0 >"$so/attrib/pgr_support"
    printf '%s: pgr_support=%s\n' "$so" "$(cat "$so/attrib/pgr_support")"
done
round "pass-through (pgr_support=0 on both backstores, set while exported)"

say "mpathpersist on the dm-multipath map (registers every path)"
mpathd_start && mpath_adopt "$A" || exit 1
MAP=/dev/mapper/$(dm_name)
show mpathpersist --out --register --param-sark=0x3333 "$MAP"
show mpathpersist --in -k "$MAP"
show mpathpersist --out --reserve --param-rk=0x3333 --prout-type=5 "$MAP"
show mpathpersist --in -r "$MAP"
remote_pr
try_write "$MAP"
show mpathpersist --out --release --param-rk=0x3333 --prout-type=5 "$MAP"
show mpathpersist --out --register --param-rk=0x3333 --param-sark=0 "$MAP"
show mpathpersist --in -k "$MAP"
remote_pr
