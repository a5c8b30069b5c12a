#!/usr/bin/env bash
# Runs every test: formatting and lints, the Rust unit, integration, CLI and doc tests,
# the header check, then the C and C++ tests through CTest against an installed prefix
# (and once more under AddressSanitizer), then the Python package's pytest suite
# (tools/test-python.sh), then builds the C, Rust and Python API references with warnings as
# errors (tools/build-docs.sh), then fuzzes every target's debug build for FUZZ_SECONDS (default 25) each
# (tools/fuzz.sh; a crash fails the run). Run tools/install-deps.sh first on a fresh
# machine. Ends with one summary line: "N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --all-targets --locked -- -D warnings
echo "== OpenVINO runtime for tests/openvino.rs (tools/setup-openvino.sh build/openvino)" >&2
# Two lines: `export X=$(...)` would hide a failed setup from `set -e`.
OPENVINO_LIB_PATH=$(bash tools/setup-openvino.sh build/openvino)
export OPENVINO_LIB_PATH
echo "== cargo test" >&2
cargo test --all-targets --locked 2>&1 | tee -a "$LOG"
cargo test --doc --locked 2>&1 | tee -a "$LOG"
echo "== C and C++ tests (CTest, then AddressSanitizer)" >&2
bash tools/test-c.sh 2>&1 | tee -a "$LOG"
echo "== Python package (fresh venv, pip install ./python, pytest)" >&2
bash tools/test-python.sh 2>&1 | tee -a "$LOG"
echo "== API references (Doxygen, cargo doc, pdoc; any warning fails)" >&2
bash tools/build-docs.sh
echo "== fuzz (tools/fuzz.sh: every target for ${FUZZ_SECONDS:-25} s, fixed seed; a crash fails)" >&2
FUZZ_PROFILE=dev bash tools/fuzz.sh "${FUZZ_SECONDS:-25}"

rust=$(grep -Eo 'test result: ok\. [0-9]+ passed' "$LOG" | awk '{s += $4} END {print s + 0}')
c=$(grep -Eo 'tests passed out of [0-9]+' "$LOG" | awk '{s += $5} END {print s + 0}')
py=$(grep -Eo '(^|= )[0-9]+ passed(, [0-9]+ [a-z]+)* in [0-9.]+s' "$LOG" | sed 's/^= //' | awk '{s += $1} END {print s + 0}')
echo "$((rust + c + py)) passed, 0 failed"
