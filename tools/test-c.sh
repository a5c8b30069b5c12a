#!/usr/bin/env bash
# Tests the C and C++ interface as a user gets it:
#   1. installs EtLlm into a fresh prefix under build/test-c (tools/install.sh);
#   2. moves that prefix to another folder, to prove it is relocatable;
#   3. configures c_tests/ against the moved prefix (find_package(EtLlm CONFIG)), builds it
#      and runs its CTest suite;
#   4. builds and runs the same suite again under AddressSanitizer, with LeakSanitizer on:
#      any memory error or leak fails it.
# Run tools/install-deps.sh first on a fresh machine (it provides the CMake this needs, in
# build/tools-venv). Prints one line per step; a failing step prints its full log.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$ROOT"
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi

CMAKE="$ROOT/build/tools-venv/bin/cmake"
CTEST="$ROOT/build/tools-venv/bin/ctest"
if [ ! -x "$CMAKE" ] || [ ! -x "$CTEST" ]; then
  echo "test-c: $CMAKE not found; run tools/install-deps.sh first" >&2
  exit 1
fi
JOBS=$(nproc 2>/dev/null || echo 2)

WORK="$ROOT/build/test-c"
rm -rf "$WORK"
mkdir -p "$WORK"

# Runs a command with its output in a log file; shows the log only if it fails.
quiet() {
  local log="$WORK/$1.log"
  shift
  if ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    echo "test-c: FAILED: $*" >&2
    exit 1
  fi
}

# Runs the suite in build folder $1 (extra environment in the rest); prints ctest's summary,
# or everything when a test fails.
run_suite() {
  local dir=$1 name
  name=$(basename "$dir")
  shift
  if ! env "$@" "$CTEST" --test-dir "$dir" --output-on-failure -j "$JOBS" \
      >"$WORK/$name-ctest.log" 2>&1; then
    cat "$WORK/$name-ctest.log" >&2
    echo "test-c: FAILED: ctest in $dir" >&2
    exit 1
  fi
  grep -E '^(100% tests passed|Total Test time)' "$WORK/$name-ctest.log" | sed 's/^/   /' >&2
}

echo "== install into a fresh prefix (cargo build --release)" >&2
quiet install tools/install.sh "$WORK/staging/etllm"

echo "== move the prefix" >&2
mkdir -p "$WORK/moved"
mv "$WORK/staging/etllm" "$WORK/moved/etllm"
rmdir "$WORK/staging"
PREFIX="$WORK/moved/etllm"

configure() {
  local dir=$1
  shift
  quiet "$(basename "$dir")-configure" "$CMAKE" -S "$ROOT/c_tests" -B "$dir" \
    -DCMAKE_BUILD_TYPE=Debug -DCMAKE_PREFIX_PATH="$PREFIX" "$@"
  quiet "$(basename "$dir")-build" "$CMAKE" --build "$dir" -j "$JOBS"
}

echo "== c_tests against the moved prefix" >&2
configure "$WORK/c_tests"
run_suite "$WORK/c_tests"

echo "== c_tests under AddressSanitizer + LeakSanitizer" >&2
SAN="-fsanitize=address -fno-omit-frame-pointer"
configure "$WORK/c_tests-asan" -DCMAKE_C_FLAGS="$SAN" -DCMAKE_CXX_FLAGS="$SAN" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address"
# No suppressions: every leak, in EtLlm or in the ExecuTorch runtime, fails the run.
run_suite "$WORK/c_tests-asan" \
  ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:abort_on_error=0:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1" \
  LSAN_OPTIONS="report_objects=1"
echo "test-c: ok" >&2
