#!/usr/bin/env bash
# Tests the Python package as a user gets it: a fresh virtual environment under
# build/py-test-venv, numpy and pytest, then the documented install (`pip install ./python`),
# then pytest on python/tests from outside the source tree's package folder.
# jsonschema and lark are the independent checkers of constrained output (test_grammar.py).
#
# The install bundles libetllm.so from an installed prefix: ETLLM_PREFIX when set, else the
# one tools/test-c.sh left in build/test-c/moved/etllm, else `pip install` runs
# tools/install.sh itself (a few minutes). The seed test compares with that prefix's
# bin/etllm (ETLLM_CLI). Run tools/install-deps.sh first on a fresh machine.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$ROOT"
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi

VENV="$ROOT/build/py-test-venv"
if [ -z "${ETLLM_PREFIX:-}" ] && [ -f "$ROOT/build/test-c/moved/etllm/lib/libetllm.so" ]; then
  export ETLLM_PREFIX="$ROOT/build/test-c/moved/etllm"
fi
if [ -z "${ETLLM_CLI:-}" ]; then
  for cli in "${ETLLM_PREFIX:-/nonexistent}/bin/etllm" "$ROOT/target/install/release/etllm" \
             "$ROOT/target/release/etllm"; do
    if [ -x "$cli" ]; then export ETLLM_CLI="$cli"; break; fi
  done
fi

echo "== Python: fresh venv, pip install ./python" >&2
rm -rf "$VENV" "$ROOT/python/build" "$ROOT/python/etllm.egg-info"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check numpy pytest jsonschema lark openai httpx
"$VENV/bin/pip" install --quiet --disable-pip-version-check ./python

echo "== Python: pytest" >&2
cd "$ROOT/python/tests"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --import-mode=importlib .
