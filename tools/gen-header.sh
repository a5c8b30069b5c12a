#!/usr/bin/env bash
# Regenerates include/etllm.h with the cbindgen version pinned in Cargo.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
ETLLM_BLESS_HEADER=1 cargo test --test header --quiet
echo "wrote include/etllm.h" >&2
