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

# The daemon's crash points (the `fail` crate) are compiled into the test build only: the crash
# suite (backend/tests/crash_suite.rs) needs them.
FEATURES=(--features dovetail-backend/failpoints)

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets "${FEATURES[@]}" --quiet -- -D warnings

echo "== tests"
if [ $# -gt 0 ]; then
    # e.g. scripts/test.sh -p dovetail-backend --features failpoints --test crash_suite
    cargo test "$@"
else
    cargo test --workspace "${FEATURES[@]}"
fi
