#!/usr/bin/env bash
# Runs every test: formatting and lints, the Rust unit, integration and CLI tests, and
# the doc tests. Run tools/install-deps.sh first on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test" >&2
cargo test --all-targets --locked
cargo test --doc --locked
echo "== C and C++ tests (CTest, then AddressSanitizer)" >&2
bash tools/test-c.sh
