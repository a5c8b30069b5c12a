#!/usr/bin/env bash
# Builds the three API references of docs/ and fails on any warning:
#   1. the C API reference from include/etllm.h's doc comments, with Doxygen
#      (docs/Doxyfile, WARN_AS_ERROR) -> build/docs/c-api/html/index.html;
#   2. the Rust API docs, `cargo doc --no-deps` with RUSTDOCFLAGS="-D warnings"
#      -> target/doc/etllm/index.html (the doc examples run in `cargo test --doc`);
#   3. the Python API reference from the package's docstrings, with pdoc run with
#      `-W error` -> build/docs/python/etllm.html. It imports the installed package:
#      PYTHON (first argument, default build/py-test-venv/bin/python, the venv
#      tools/test-python.sh made) must have `etllm` installed; pdoc is installed into it.
# Run tools/install-deps.sh first on a fresh machine (it installs doxygen).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$ROOT"
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
PYTHON=${1:-$ROOT/build/py-test-venv/bin/python}

echo "== docs: C API reference (doxygen docs/Doxyfile)" >&2
rm -rf build/docs/c-api
mkdir -p build/docs/c-api
doxygen docs/Doxyfile
test -f build/docs/c-api/html/etllm_8h.html

echo "== docs: Rust API (cargo doc, warnings are errors)" >&2
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked --quiet
test -f target/doc/etllm/index.html

echo "== docs: Python API reference (pdoc, warnings are errors)" >&2
if [ ! -x "$PYTHON" ] || ! "$PYTHON" -c 'import etllm' >/dev/null 2>&1; then
  echo "build-docs: $PYTHON cannot import etllm; run tools/test-python.sh first" >&2
  exit 1
fi
"$PYTHON" -m pip install --quiet --disable-pip-version-check "pdoc==16.0.0"
rm -rf build/docs/python
# From outside the source tree, so that the installed package is the one documented.
(cd /tmp && "$PYTHON" -W error -m pdoc --docformat restructuredtext \
  --output-directory "$ROOT/build/docs/python" etllm)
test -f build/docs/python/etllm.html
echo "build-docs: ok (build/docs/c-api/html, target/doc/etllm, build/docs/python)" >&2
