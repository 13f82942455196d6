# Helpers for guest workloads; /init sources this before /workload.sh.
#
# The harness reads these lines from the serial console:
#   DOVETAIL-RESULT: ok NAME [DETAIL]      a check passed
#   DOVETAIL-RESULT: fail NAME REASON      a check failed (the test fails)
#   DOVETAIL-INFO: KEY VALUE               a value for the host to assert on
#   DOVETAIL-WAIT: TOKEN                   the guest waits for the host to send TOKEN
#   DOVETAIL-DONE: STATUS                  the workload ended (printed by /init)
# Names and keys are single words.

# busybox's shell runs its own applets before anything on PATH; these must be the real tools.
blkdiscard() { /usr/sbin/blkdiscard "$@"; }
fallocate() { /usr/bin/fallocate "$@"; }
mke2fs() { /usr/sbin/mke2fs "$@"; }

ok() {
    echo "DOVETAIL-RESULT: ok $*"
}

fail() {
    _name=$1
    shift
    echo "DOVETAIL-RESULT: fail $_name ${*:-failed}"
    : >>/tmp/.dovetail-failed
    return 1
}

info() {
    _key=$1
    shift
    echo "DOVETAIL-INFO: $_key $*"
}

_uptime() {
    cut -d' ' -f1 /proc/uptime
}

# check NAME CMD [ARGS...]: runs CMD; ok with its run time if it succeeds, otherwise fail with its
# exit status and the tail of its output. Returns CMD's status.
check() {
    _name=$1
    shift
    _out=/tmp/check.$_name.out
    _t0=$(_uptime)
    "$@" >"$_out" 2>&1
    _rc=$?
    _t1=$(_uptime)
    if [ "$_rc" -eq 0 ]; then
        ok "$_name" "$(awk -v a="$_t0" -v b="$_t1" 'BEGIN { printf "%.2fs", b - a }')"
    else
        tail -n 25 "$_out" | sed 's/^/  | /'
        fail "$_name" "exit $_rc: $*"
    fi
    return "$_rc"
}

# check_fails NAME CMD [ARGS...]: ok if CMD fails (its error becomes an info line), fail if it
# succeeds.
check_fails() {
    _name=$1
    shift
    _out=/tmp/check.$_name.out
    if "$@" >"$_out" 2>&1; then
        tail -n 10 "$_out" | sed 's/^/  | /'
        fail "$_name" "succeeded but must fail: $*"
        return 1
    fi
    info "$_name-error" "$(grep -v -m1 'records \(in\|out\)' "$_out")"
    ok "$_name"
}

# expect_eq NAME ACTUAL EXPECTED
expect_eq() {
    if [ "$2" = "$3" ]; then
        ok "$1" "$2"
    else
        fail "$1" "got '$2', expected '$3'"
    fi
}

# wait_host TOKEN: tells the host the guest is idle at TOKEN and blocks until the host writes the
# line TOKEN to the console.
wait_host() {
    echo "DOVETAIL-WAIT: $1"
    while read -r _line; do
        _line=$(printf '%s' "$_line" | tr -d '\r')
        if [ "$_line" = "$1" ]; then
            info resumed "$1"
            return 0
        fi
    done </dev/console
    fail wait-host "console closed while waiting for $1"
}

# nonzero_bytes DEV OFFSET_MIB LENGTH_MIB: prints how many bytes of the range are not zero,
# reading around the page cache.
nonzero_bytes() {
    dd if="$1" bs=1M skip="$2" count="$3" iflag=direct 2>/dev/null | tr -d '\000' | wc -c
}

# sha_of DEV OFFSET_MIB LENGTH_MIB: sha256 of a range, read around the page cache.
sha_of() {
    dd if="$1" bs=1M skip="$2" count="$3" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1
}
