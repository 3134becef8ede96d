#!/bin/bash
# Issue 12, question 1: can hbactl attach the same target and LUN through two portals today?
#   deploy/vm/run -- research/attach_twice.sh
set -u
. "$(dirname "$0")/common.sh"
trap 'hba_stop' EXIT
lio_setup || exit 1
show hbactl discover iscsi://127.0.0.1
: >/tmp/empty.conf
hbactl daemon --config /tmp/empty.conf >"$OUT/daemon.log" 2>&1 &
HBA_PID=$!
for i in $(seq 1 120); do grep -q "daemon ready" "$OUT/daemon.log" && break; sleep 1; done
show hbactl attach "iscsi://127.0.0.1/$IQN/0"
show hbactl attach "iscsi://127.0.0.2/$IQN/0"
show hbactl list
show hbactl status --json
