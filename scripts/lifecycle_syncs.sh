#!/bin/bash
# Counts the syncs and tier-file fallocates each life-cycle verb makes on a running daemon:
# three disk-create / attach / detach / disk-delete cycles, the daemon under strace.
# Usage: scripts/lifecycle_syncs.sh [DOVETAIL_BINARY [SERVE_ARGS...]]
# (default binary: target/release/dovetail). BENCHMARKS.md, "A host's day".
set -e
BIN=${1:-target/release/dovetail}
shift || true
D=$(mktemp -d)
# The daemon (strace's child) first: strace only detaches from it when it is killed itself.
trap 'kill $(pgrep -P "$SPID") 2>/dev/null; sleep 0.5; kill "$SPID" 2>/dev/null; rm -rf "$D"' EXIT
"$BIN" store create "$D/st" --size 1G --extent-size 16M >/dev/null
strace -f -qq -y -e trace=fdatasync,fsync,fallocate,sync_file_range -e signal=none \
  -o "$D/strace.txt" "$BIN" serve --store "$D/st" --control "$D/ctl.sock" "$@" 2>"$D/log" &
SPID=$!
for _ in $(seq 200); do [ -S "$D/ctl.sock" ] && break; sleep 0.1; done
sleep 0.5
for n in 1 2 3; do
  for v in disk-create attach detach disk-delete; do
    sleep 0.3
    s=$(wc -l < "$D/strace.txt")
    case $v in
      disk-create) "$BIN" ctl --control "$D/ctl.sock" disk-create "c$n" --size 16M >/dev/null ;;
      attach) "$BIN" ctl --control "$D/ctl.sock" attach "c$n" --socket "$D/c$n.sock" >/dev/null ;;
      *) "$BIN" ctl --control "$D/ctl.sock" "$v" "c$n" >/dev/null ;;
    esac
    sleep 0.3
    echo "cycle $n, $v:"
    sed -n "$((s + 1)),\$p" "$D/strace.txt" |
      sed -n 's/^[0-9]* *\([a-z_]*\)([0-9]*<\([^>]*\)>.*/\1 \2/p' |
      sed 's#/.*/##' | sort | uniq -c | sed 's/^/  /'
  done
done
