#!/usr/bin/env bash
# Fuzzes every target of examples/fuzz.rs for SECONDS each (default 20) with a fixed seed,
# (the same seed makes the same sequence of cases): tools/fuzz.sh [SECONDS_PER_TARGET] [SEED]. Crashes and hangs go
# to build/fuzz/<target>/ (the input, a minimized input and the child's stderr per crash
# kind). Prints one summary line per target and exits non-zero if any target found a crash
# or a confirmed hang (crash kinds listed in tools/fuzz-allow.txt are reported but allowed).
# FUZZ_TARGETS="model c-abi" limits the targets. FUZZ_PROFILE=dev fuzzes the debug build
# (tools/test-all.sh does: `cargo test --all-targets` has built it already, so the CI run
# costs no extra build; a release build runs about 2.5 times as many cases a second).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
SECONDS_PER_TARGET=${1:-20}
SEED=${2:-1}
OUT=build/fuzz
TARGETS=${FUZZ_TARGETS:-model data-file tokenizer-hf tokenizer-sentencepiece tokenizer-tiktoken tokenizer-llama2c chat-template grammar session-state server-request image wav c-abi}

PROFILE=${FUZZ_PROFILE:-release}
case "$PROFILE" in
  release) cargo build --release --locked --example fuzz >&2; BIN=target/release/examples/fuzz ;;
  dev) cargo build --locked --example fuzz >&2; BIN=target/debug/examples/fuzz ;;
  *) echo "fuzz: FUZZ_PROFILE must be release or dev" >&2; exit 2 ;;
esac
rm -rf "$OUT"
failed=0
for t in $TARGETS; do
    if ! "$BIN" run --target "$t" --seconds "$SECONDS_PER_TARGET" \
        --seed "$SEED" --out "$OUT" --minimize-secs 10 --allow tools/fuzz-allow.txt; then
        failed=1
    fi
done
if [ "$failed" != 0 ]; then
    echo "fuzz: crashes or hangs found; inputs under $OUT/ (reproduce one with" \
        "$BIN exec --target T FILE)" >&2
fi
exit "$failed"
