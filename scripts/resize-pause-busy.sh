#!/bin/sh
# The pause of a live `ctl resize` under a busy guest (BENCHMARKS.md, "Live resize"): for
# parallax-v1 and parallax-v2, a disk of 1 GiB and one of 16 GiB, each in a fresh store, served
# alone, under `dovetail-bench run` (4 KiB random writes over the first GiB, QD 8, a FLUSH every
# 100 writes, 8 s), grown live to twice its size 3 s into the load; prints the reply's pause
# and the load's IOPS and latencies (p99, p99.9, slowest request).
# Usage: DOVETAIL=target/release/dovetail BENCH=target/release/dovetail-bench \
#        scripts/resize-pause-busy.sh
set -e
D=${DOVETAIL:-target/release/dovetail}
B=${BENCH:-target/release/dovetail-bench}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
for l in parallax-v1 parallax-v2; do
  for s in 1G 16G; do
    st=$W/st
    "$D" store create "$st" --size 64G >/dev/null
    "$D" disk create "$st" d --size $s --layout $l >/dev/null
    "$D" serve --store "$st" --disk d="$W/d.sock" --control "$W/ctl.sock" >"$W/log" 2>&1 &
    pid=$!
    while [ ! -S "$W/ctl.sock" ]; do sleep 0.05; done
    "$B" run --socket "$W/d.sock" --pattern randwrite --iodepth 8 --length 1G --flush-every 100 --duration 8s --json >"$W/load.json" &
    lp=$!
    sleep 3
    case $s in 1G) n=2G ;; 16G) n=32G ;; esac
    p=$("$D" ctl --control "$W/ctl.sock" --json resize d $n |
      python3 -c "import json,sys; r=json.load(sys.stdin); print(r[\"pause\"])")
    wait $lp
    python3 - "$W/load.json" "$l $s -> $n: pause $p ms" <<'PY'
import json,sys
r=json.load(open(sys.argv[1]))
def find(d, keys):
    out={}
    for k,v in d.items():
        if isinstance(v,dict): out.update({k+'.'+a:b for a,b in find(v,keys).items()})
        elif any(x in k for x in keys): out[k]=v
    return out
print(sys.argv[2], find(r, ["iops","max","p99"]))
PY
    kill $pid
    wait $pid || true
    rm -rf "$st" "$W/ctl.sock" "$W/d.sock"
  done
done
