#!/usr/bin/env bash
# Installs what EtLlm needs to build and test on Debian 12 (or a Debian-based system):
# a C/C++ toolchain, libclang (bindgen), Doxygen (the C API reference), Python 3 with pip
# (the build fetches the prebuilt ExecuTorch 1.5.1 runtime wheel with pip), and a Rust
# toolchain (rustup) when cargo is missing or too old. Safe to run again; it only installs what is missing.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_apt=()
command -v cc >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1 || need_apt+=(build-essential)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
command -v curl >/dev/null 2>&1 || need_apt+=(curl ca-certificates)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
# The sentencepiece-sys crate builds SentencePiece's C++ library with CMake.
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
# tools/install.sh sets the installed libetllm.so's RUNPATH to $ORIGIN.
command -v patchelf >/dev/null 2>&1 || need_apt+=(patchelf)
# tools/build-docs.sh builds the C API reference with Doxygen.
command -v doxygen >/dev/null 2>&1 || need_apt+=(doxygen)
# For the CMake venv below (Debian ships venv/ensurepip apart from python3).
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
# bindgen (used by the executorch-sys crate) loads libclang.
if ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 && ! ls /usr/lib/*/libclang*.so* >/dev/null 2>&1; then
  need_apt+=(libclang-dev)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need_apt[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Rust 1.85 or newer.
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
rust_ok() {
  command -v cargo >/dev/null 2>&1 || return 1
  local minor
  minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
  [ "${minor:-0}" -ge 85 ]
}
if ! rust_ok; then
  echo "install-deps: installing Rust with rustup" >&2
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy -c rustfmt >&2
  . "$HOME/.cargo/env"
fi

# CMake 3.28 or newer for the C/C++ tests (tools/test-c.sh): Debian 12 ships 3.25. The PyPI
# build goes into a venv inside the repository (build/ is git-ignored), never system-wide.
VENV="$(cd "$(dirname "$0")/.." && pwd -P)/build/tools-venv"
cmake_ok() {
  local v
  v=$("$VENV/bin/cmake" --version 2>/dev/null | sed -n '1s/^cmake version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  [ -n "$v" ] || return 1
  set -- $v
  [ "$1" -gt 3 ] || { [ "$1" -eq 3 ] && [ "$2" -ge 28 ]; }
}
if ! cmake_ok; then
  echo "install-deps: installing CMake from PyPI into build/tools-venv" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "cmake>=3.28,<5"
fi
echo "install-deps: ok ($(cargo --version), $("$VENV/bin/cmake" --version | head -n 1))" >&2
