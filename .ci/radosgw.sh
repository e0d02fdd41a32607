#!/usr/bin/env bash
# A throw-away one-node Ceph cluster with radosgw on 127.0.0.1, for running the S3 tests against a
# second, independent S3 implementation (Debian 12's Ceph 16 packages).
#
#   .ci/radosgw.sh start DIR   install the packages if needed, start mon, osd and rgw in DIR,
#                              print the environment the tests need (eval it)
#   .ci/radosgw.sh stop DIR    stop them (rgw first: stopped after the OSD it hangs ~120 s)
#
# Then: eval "$(.ci/radosgw.sh start /tmp/rgw)"; python3 -m pytest -q tests/test_s3_*.py
# The tests use FCSNAP_S3_ENDPOINT's server instead of starting SeaweedFS.
set -euo pipefail

cmd=${1:?usage: radosgw.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: radosgw.sh start|stop DIR}")
conf=$dir/ceph.conf

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

diagnose() {  # what a failed start leaves for whoever reads the CI log
    echo "radosgw.sh: free disk and memory:" >&2
    df -h "$dir" >&2 || true; free -m >&2 || true
    for f in "$dir"/log/*; do
        [[ -f $f ]] || continue
        echo "----- tail of $f" >&2; tail -n 25 "$f" >&2
    done
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then echo "radosgw.sh: $what did not come up" >&2; diagnose; return 1; fi
        sleep 0.5
    done
}

stop() {
    for daemon in rgw osd mon; do  # rgw first: stopped after the OSD it hangs on SIGTERM
        if [[ -f $dir/$daemon.pid ]]; then
            pid=$(cat "$dir/$daemon.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$dir/$daemon.pid"
        fi
    done
}

if [[ $cmd == stop ]]; then stop; exit 0; fi
[[ $cmd == start ]] || { echo "usage: radosgw.sh start|stop DIR" >&2; exit 2; }

if ! command -v radosgw >/dev/null || ! command -v ceph-osd >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends radosgw ceph-mon ceph-osd >/dev/null
fi

start_once() {  # one attempt at a cluster in $dir; 1 (with diagnostics) if any part fails
    mkdir -p "$dir"/{mon,osd,rgw,run,log}
    mon_port=$(free_port); rgw_port=$(free_port)
    fsid=$(python3 -c 'import uuid; print(uuid.uuid4())')
    key=K$(python3 -c 'import uuid; print(uuid.uuid4().hex[:15])')
    secret=$(python3 -c 'import uuid; print(uuid.uuid4().hex)')
    cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$mon_port
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
ms bind msgr2 = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
run dir = $dir/run
log file = $dir/log/\$name.log
[mon.a]
mon data = $dir/mon
[osd.0]
osd data = $dir/osd
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 4294967296
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$rgw_port
rgw data = $dir/rgw
EOF

    monmaptool --create --fsid "$fsid" --addv a "[v1:127.0.0.1:$mon_port]" "$dir/monmap" >/dev/null || return 1
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" >"$dir/log/mon-mkfs.out" 2>&1 || return 1
    ceph-mon -c "$conf" -f -i a >"$dir/log/mon.out" 2>&1 & echo $! >"$dir/mon.pid"
    wait_for 30 "the monitor" timeout 5 ceph -c "$conf" mon stat || return 1
    uuid=$(python3 -c 'import uuid; print(uuid.uuid4())')
    id=$(timeout 30 ceph -c "$conf" osd new "$uuid") || return 1
    ceph-osd -c "$conf" -i "$id" --mkfs --osd-uuid "$uuid" >"$dir/log/osd-mkfs.out" 2>&1 || { diagnose; return 1; }
    ceph-osd -c "$conf" -f -i "$id" >"$dir/log/osd.out" 2>&1 & echo $! >"$dir/osd.pid"
    wait_for 90 "the OSD" bash -c "timeout 5 ceph -c '$conf' osd stat | grep -q '1 up'" || return 1
    timeout 60 radosgw-admin -c "$conf" user create --uid fcsnap --display-name fcsnap \
        --access-key "$key" --secret "$secret" >/dev/null || { diagnose; return 1; }
    radosgw -c "$conf" -f -n client.rgw.a >"$dir/log/rgw.out" 2>&1 & echo $! >"$dir/rgw.pid"
    wait_for 90 "radosgw" python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$rgw_port/', timeout=2)" || return 1

    echo "export FCSNAP_S3_ENDPOINT=http://127.0.0.1:$rgw_port AWS_ACCESS_KEY_ID=$key AWS_SECRET_ACCESS_KEY=$secret AWS_REGION=us-east-1"
}

# A one-node Ceph sometimes fails to bring its OSD up on the first try: start afresh, three times.
for attempt in 1 2 3; do
    if start_once; then exit 0; fi
    echo "radosgw.sh: attempt $attempt failed; starting afresh" >&2
    stop
    rm -rf "${dir:?}"/{mon,osd,rgw,run,log,monmap,ceph.conf}
done
echo "radosgw.sh: the cluster did not start in 3 attempts" >&2
exit 1
