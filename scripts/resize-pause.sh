#!/bin/sh
# The pause of a live `ctl resize` (BENCHMARKS.md, "Live resize"): for parallax-v1 and
# parallax-v2, an empty disk of 1 GiB and one of 16 GiB, each in a fresh store, served alone
# and grown live to twice its size; prints the daemon's own pause figure from each reply.
# Usage: DOVETAIL=target/release/dovetail scripts/resize-pause.sh
set -e
D=${DOVETAIL:-target/release/dovetail}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
for l in parallax-v1 parallax-v2; do
  for s in 1G 16G; do
    st=$W/st-$l-$s
    "$D" store create "$st" --size 64G >/dev/null
    "$D" disk create "$st" d --size $s --layout $l >/dev/null
    "$D" serve --store "$st" --disk d="$W/d.sock" --control "$W/ctl.sock" >"$W/log" 2>&1 &
    pid=$!
    while [ ! -S "$W/ctl.sock" ]; do sleep 0.05; done
    case $s in 1G) n=2G ;; 16G) n=32G ;; esac
    p=$("$D" ctl --control "$W/ctl.sock" --json resize d $n |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["pause"]["total_us"] / 1000)')
    echo "$l $s -> $n: pause $p ms"
    kill $pid
    wait $pid || true
    rm -rf "$st" "$W/ctl.sock" "$W/d.sock"
  done
done
