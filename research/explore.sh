#!/bin/bash
# First look (issue 12, question 1): what the kernel presents for two paths of our daemon to one
# LIO LUN, and what stock multipathd makes of them. Run inside the VM:
#   deploy/vm/run -- research/explore.sh
set -u
. "$(dirname "$0")/common.sh"
trap 'mpathd_stop; hba_stop' EXIT

say "kernel $(uname -r); multipath-tools $(dpkg-query -W -f='${Version}' multipath-tools)"
say "nftables"
show modprobe nf_tables
nft_init && show nft list ruleset

say "LIO target, one LUN on two portals"
lio_setup || exit 1

say "daemon with two entries (one per portal)"
hba_start 5 || exit 1
show hbactl list
read -r A B <<<"$(hba_disks)"
echo "paths: $A $B"

for d in "$A" "$B"; do
    say "$d as the kernel shows it"
    show udevadm info --query=property --name="$d" | grep -E 'ID_SERIAL|ID_WWN|ID_VENDOR|ID_MODEL|ID_PATH|SCSI_IDENT|DM_MULTIPATH|FIND_MULTIPATHS|SYSTEMD_READY'
    show sg_inq "$d"
    show sg_vpd -p di "$d"
    show sg_rtpg -d "$d"
    show cat "/sys/block/${d#/dev/}/device/dh_state"
    show cat "/sys/block/${d#/dev/}/device/access_state"
    show cat "/sys/block/${d#/dev/}/device/timeout"
    show cat "/sys/block/${d#/dev/}/device/state"
    show ls "/sys/block/${d#/dev/}/device/scsi_host"
done
show lsscsi -t 2>/dev/null
for so in /sys/kernel/config/target/core/user_*/hba-*; do
    say "TCMU backstore $so"
    for a in alua_support pgr_support emulate_pr cmd_time_out qfull_time_out emulate_tpu; do
        printf '%s=%s\n' "$a" "$(cat "$so/attrib/$a" 2>&1)"
    done
    show ls "$so/alua"
    show cat "$so/alua/default_tg_pt_gp/alua_access_state" "$so/alua/default_tg_pt_gp/alua_access_type"
done
for t in /sys/kernel/config/target/loopback/naa.*/tpgt_1; do
    printf '%s: nexus=%s transport_status=%s address=%s\n' "$t" "$(cat "$t/nexus")" \
        "$(cat "$t/transport_status")" "$(cat "$t/address")"
    show cat "$t"/lun/lun_0/alua_tg_pt_gp
done

say "stock multipathd (no /etc/multipath.conf)"
show ls -la /etc/multipath.conf /etc/multipath
mpathd_start
sleep 8
show multipath -ll
show multipathd show paths format "%d %w %t %T %o %p %s %g"
say "multipath -a on both paths (records the WWID in /etc/multipath/wwids), then reconfigure"
show multipath -a "$A"
show cat /etc/multipath/wwids
show multipathd reconfigure
sleep 8
show multipath -ll
show dmsetup table
show dmsetup status
show multipathd show paths format "%d %w %t %T %o %p %s %g %P"
show multipathd show config local | grep -A10 LIO-ORG

say "daemon log"
cat "$OUT/daemon.log"
say "multipathd log (tail)"
tail -60 "$OUT/multipathd.log"
say "dmesg (tail)"
dmesg | tail -60
