#!/usr/bin/env bash
# Installs what the tests need (QEMU, the guest's userland; the guest kernel is fetched and
# cached by the VM tests themselves) and runs every test: unit, in-process vhost-user, and the
# VM boot tests in qemu-tests/.
#
#   scripts/test.sh                 everything
#   scripts/test.sh -p dovetail-qemu-tests --test fio_verify    extra args go to `cargo test`
#
# DOVETAIL_SKIP_VM_TESTS=1 skips the VM boots (developers only; CI never sets it).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/test-deps.sh

# A CI machine builds everything once from scratch: incremental compilation's caches would only
# cost time there (they pay off on a developer's next build).
if [ "${CI:-}" = true ]; then
    export CARGO_INCREMENTAL=0
fi

# The daemon's crash points (the `fail` crate) are compiled into the test build only: the crash
# suite (backend/tests/crash_suite.rs) needs them.
FEATURES=(--features dovetail-backend/failpoints)

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets "${FEATURES[@]}" --quiet -- -D warnings
# The production build alone: the test harnesses (the `test-utils` features, which the crates'
# dev-dependencies turn on) are left out, so code only they use must not be left dead.
cargo clippy --workspace --quiet -- -D warnings

echo "== the backend's modules: no import circle (ARCHITECTURE.md, The backend in layers)"
python3 scripts/modcycles.py backend/src

echo "== tests"
if [ $# -gt 0 ]; then
    # e.g. scripts/test.sh -p dovetail-backend --features failpoints --test crash_suite
    cargo test "$@"
else
    cargo test --workspace "${FEATURES[@]}"
fi

if [ $# -eq 0 ]; then
    # The reruns below select their test binaries with --workspace and the same features as the
    # run above, so cargo reuses the binaries it built (features unify over the packages
    # selected: with `-p dovetail-backend` cargo resolved them differently and built
    # dovetail-backend and each test binary named here a second time).
    # The in-process I/O suites again on direct I/O (--cache none), and on the thread pool and
    # the one-at-a-time engine (backend/tests/common: DOVETAIL_TEST_CACHE, DOVETAIL_TEST_ENGINE).
    # Only the suites whose disks follow those variables (common::raw_disk, common::open_raw_disk,
    # layouts_io's own reading of them): direct_io runs every cache mode on every engine itself,
    # and tee_frontend, guest_memory and limits choose their disks' settings themselves, so
    # running them again here would repeat the same test.
    IO_SUITES=(--test frontend --test malformed --test layouts_io)
    # Both --cache none runs with the server's threads under the daemon's seccomp filters
    # (DOVETAIL_TEST_SECCOMP, SECURITY.md "Least privilege"): io_uring and the thread pool.
    echo "== in-process I/O tests with --cache none (seccomp filters on)"
    DOVETAIL_TEST_CACHE=none DOVETAIL_TEST_SECCOMP=trap cargo test --workspace "${FEATURES[@]}" "${IO_SUITES[@]}"
    echo "== in-process I/O tests with --cache none on the thread pool (seccomp filters on)"
    DOVETAIL_TEST_CACHE=none DOVETAIL_TEST_ENGINE=threads DOVETAIL_TEST_SECCOMP=trap \
        cargo test --workspace "${FEATURES[@]}" "${IO_SUITES[@]}"
    echo "== in-process I/O tests one request at a time"
    DOVETAIL_TEST_ENGINE=sync cargo test --workspace "${FEATURES[@]}" "${IO_SUITES[@]}"
    # The crash suites with the daemon serving its store with --cache none (tier files with
    # O_DIRECT), and the power-loss suite over the transfers direct I/O makes (RELIABILITY.md).
    # ... and the daemon sandboxed (--seccomp trap --landlock: DOVETAIL_TEST_SANDBOX).
    echo "== crash and power-loss suites with --cache none (sandboxed daemon)"
    DOVETAIL_TEST_CACHE=none DOVETAIL_CRASH_ITERATIONS=40 DOVETAIL_TEST_SANDBOX=1 \
        cargo test --workspace "${FEATURES[@]}" --test crash_suite --test tiers_crash --test inflight_restart
    DOVETAIL_TEST_CACHE=none cargo test --workspace "${FEATURES[@]}" --test powerloss
    # The soak (RELIABILITY.md, *The soak*): 2 minutes of every layout under a verifying load with
    # copy-outs, snapshots, random FLUSH, candidate fault rules turned on and off, the store's own
    # faults (failed syncs, EIO on writes, slow I/O: `serve --store-faults`, which needs the
    # failpoints build) switched on for a few seconds, control-socket
    # abuse and kill -9 of both daemons with restarts; exits non-zero on any acknowledged write
    # lost or read back wrong. Debug binaries with the features the tests used (so only the
    # binaries are linked: 54 s here on a busy machine), then 122 s for the run.
    echo "== the soak, 2 minutes"
    # The daemon is built with `-p dovetail-backend --features failpoints`: `--workspace
    # --features dovetail-backend/failpoints --bins` does not turn the feature on for the binary
    # (cargo applies it only where a dev-dependency selects it, i.e. to test builds), and the
    # VM tests' own `cargo build -p dovetail-backend --bin dovetail` replaces target/debug/dovetail
    # with a build without it. A copy under its own name keeps later builds from replacing it.
    cargo build -p dovetail-backend --features failpoints --bin dovetail --quiet
    cargo build -p dovetail-bench --bin dovetail-bench --quiet
    TARGET="${CARGO_TARGET_DIR:-target}"
    cp "$TARGET/debug/dovetail" "$TARGET/debug/dovetail-soak"
    "$TARGET/debug/dovetail-bench" soak --minutes 2 --dovetail "$TARGET/debug/dovetail-soak" \
        --dir "$TARGET/ci-soak"
fi
