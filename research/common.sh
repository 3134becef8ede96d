# Shared shell functions for the multipath experiments (sourced; run inside the VM).
# Research prototype for issue 12, not product code.

RESEARCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$RESEARCH")
export PATH=$ROOT/.venv/bin:$PATH
OUT=${OUT:-$HBA_VM_RESULTS/research}
mkdir -p "$OUT"
IQN=iqn.2003-01.org.example:mpath

say() { printf '\n=== [%s] %s\n' "$(cut -d' ' -f1 /proc/uptime)" "$*"; }
show() { printf '$ %s\n' "$*"; timeout 120 "$@" 2>&1; }

# /etc/target/pr: where LIO writes APTPL metadata on every PR registration; without it the
# (remote) target answers REGISTER with NOT READY 08/00 although the key is registered.
lio_setup() { mkdir -p /etc/target/pr && python3 "$RESEARCH/lio_mpath.py" setup "$@"; }
lio_alua() { python3 "$RESEARCH/lio_mpath.py" alua "$@"; }

# One configuration entry per portal (p1 -> 127.0.0.1, p2 -> 127.0.0.2) in /tmp/hba-mpath.conf.
# $1: ReplacementTimeout of the entries.
hba_config() {
    local rt=${1:-5}
    cat >/tmp/hba-mpath.conf <<EOF
p1 {
    TargetAddress = 127.0.0.1:3260
    TargetName    = $IQN
    ReplacementTimeout = $rt
}
p2 {
    TargetAddress = 127.0.0.2:3260
    TargetName    = $IQN
    ReplacementTimeout = $rt
}
EOF
    chmod 600 /tmp/hba-mpath.conf
}

# The daemon (hbactl daemon) with hba_config's entries.
hba_start() {
    hba_config "$@"
    hbactl daemon --config /tmp/hba-mpath.conf >"$OUT/daemon.log" 2>&1 &
    HBA_PID=$!
    local i
    for i in $(seq 1 240); do
        grep -q "daemon ready" "$OUT/daemon.log" && return 0
        sleep 1
    done
    echo "daemon not ready in 240 s" >&2
    tail -30 "$OUT/daemon.log" >&2
    return 1
}

hba_stop() {
    [ -n "${HBA_PID:-}" ] && kill "$HBA_PID" 2>/dev/null && wait "$HBA_PID" 2>/dev/null
    HBA_PID=
}

# The two /dev/sdX of the daemon's paths, in entry order (p1 p2).
hba_disks() {
    hbactl list --json | python3 -c 'import json,sys
d={x["name"]:x for x in json.load(sys.stdin)["disks"]}
print(" ".join(d[n]["device"] for n in ("p1","p2")))'
}

# multipathd in the foreground (-d), logging to $OUT/multipathd.log.
mpathd_start() {
    mkdir -p /etc/multipath
    multipathd -d -s -v3 >"$OUT/multipathd.log" 2>&1 &
    MPATHD_PID=$!
    local i
    for i in $(seq 1 30); do
        multipathd show daemon >/dev/null 2>&1 && return 0
        sleep 1
    done
    echo "multipathd did not start" >&2
    return 1
}

mpathd_stop() {
    [ -n "${MPATHD_PID:-}" ] && kill "$MPATHD_PID" 2>/dev/null && wait "$MPATHD_PID" 2>/dev/null
    MPATHD_PID=
}

# Cut / restore one portal with nftables: drop TCP to and from 127.0.0.N:3260 (no RST, no
# FIN: the connection just goes silent, like a pulled cable).
nft_init() {
    nft add table inet cut
    nft add chain inet cut input '{ type filter hook input priority 0 ; }'
    nft add chain inet cut output '{ type filter hook output priority 0 ; }'
}
cut_path() {
    nft add rule inet cut input ip daddr "$1" tcp dport 3260 counter drop comment "\"cut $1\""
    nft add rule inet cut output ip saddr "$1" tcp sport 3260 counter drop comment "\"cut $1\""
}
restore_path() {
    local chain h
    for chain in input output; do
        for h in $(nft -a list chain inet cut $chain | sed -n "s/.*\"cut $1\" # handle \([0-9]*\)/\1/p"); do
            nft delete rule inet cut $chain handle "$h"
        done
    done
}

dm_name() { dmsetup ls --target multipath | awk 'NR==1{print $1}'; }

# The daemon with fault injection (research/faultpath.py); control files in /run/faultpath.
fault_start() {
    hba_config "$@"
    rm -rf /run/faultpath /run/faultpath.ready
    PYTHONPATH=$ROOT python3 "$RESEARCH/faultpath.py" --config /tmp/hba-mpath.conf --control /run/faultpath \
        --log "$OUT/faultpath.log" --ready /run/faultpath.ready ${FAULTPATH_ARGS:-} >"$OUT/faultpath.out" 2>&1 &
    HBA_PID=$!
    local i
    for i in $(seq 1 300); do
        [ -s /run/faultpath.ready ] && return 0
        kill -0 "$HBA_PID" 2>/dev/null || break
        sleep 1
    done
    echo "fault-injecting daemon not ready" >&2
    tail -n 30 "$OUT/faultpath.out" "$OUT/faultpath.log" >&2
    return 1
}
fault_disks() { awk '{printf "%s ", $2}' /run/faultpath.ready; }
fault_set() { mkdir -p /run/faultpath && echo "$2" >"/run/faultpath/$1"; }
fault_clear() { rm -f "/run/faultpath/$1"; }

# Record the paths' WWID for multipathd (find_multipaths strict) and wait for the map.
mpath_adopt() {
    show multipath -a "$1"
    show multipathd reconfigure
    wait_active "${2:-2}" 60 && udevadm settle
}

# Wait until the multipath map has N active paths (dmsetup status "A"); $2: seconds.
active_paths() { dmsetup status --target multipath 2>/dev/null | grep -oE '[0-9]+:[0-9]+ A' | wc -l; }
wait_active() {
    local want=$1 limit=${2:-60} t0 i
    t0=$(cut -d' ' -f1 /proc/uptime)
    for i in $(seq 1 $((limit * 5))); do
        if [ "$(active_paths)" -ge "$want" ]; then
            echo "active paths: $want after $(awk -v a="$t0" '{printf "%.1f", $1 - a}' /proc/uptime) s"
            return 0
        fi
        sleep 0.2
    done
    echo "active paths: still $(active_paths) after $limit s"
    return 1
}
uptime_s() { cut -d' ' -f1 /proc/uptime; }
mark() { echo "research: $*" >/dev/kmsg; }
dmesg_since() { dmesg | sed -n "/research: $1/,\$p"; }
