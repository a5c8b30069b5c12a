#!/usr/bin/env bash
# Installs what EtLlm needs to build and test on Debian 12 (or a Debian-based system):
# a C/C++ toolchain, libclang with clang's resource headers (bindgen), CMake, patchelf,
# Doxygen (the C API reference), Python 3 with pip and venv (the build fetches the prebuilt
# ExecuTorch 1.5.1 runtime wheel with pip), and a Rust toolchain (rustup) when cargo is
# missing or too old. Safe to run again.
#
# Every Debian package is decided by its own name (dpkg-query), never by the presence of a
# file that some other package may also ship: a machine image can carry libclang's .so
# without clang's headers, or a python3 that is not Debian's. At the end,
# tools/check-deps.sh checks that the build inputs really come from these packages.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd -P)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# One line a package, with what needs it.
APT_PACKAGES=(
  build-essential   # cc, c++, make, libstdc++ headers (cc crate, the C tests)
  pkg-config        # the pkg-config package test
  cmake             # the sentencepiece-sys crate builds SentencePiece with CMake
  libclang-dev      # bindgen (executorch-sys): libclang and clang's resource headers
  patchelf          # tools/install.sh sets the installed libetllm.so's RUNPATH
  doxygen           # tools/build-docs.sh: the C API reference
  python3           # build.rs fetches the ExecuTorch wheel with pip; Python tests
  python3-pip
  python3-venv      # the CMake venv below and the Python test venv
  curl              # rustup, when Rust must be installed
  ca-certificates
)
export APT_PACKAGES_LIST="${APT_PACKAGES[*]}"

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }
need_apt=()
for pkg in "${APT_PACKAGES[@]}"; do installed "$pkg" || need_apt+=("$pkg"); done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need_apt[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Rust 1.88 or newer (the image crate), with rustfmt and clippy (tools/test-all.sh runs both).
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
rust_ok() {
  command -v cargo >/dev/null 2>&1 || return 1
  local minor
  minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
  [ "${minor:-0}" -ge 88 ]
}
if ! rust_ok; then
  echo "install-deps: installing Rust with rustup" >&2
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy -c rustfmt >&2
  . "$HOME/.cargo/env"
fi
for comp in rustfmt clippy; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    echo "install-deps: rustup component add $comp" >&2
    rustup component add "$comp" >&2
  fi
done

# CMake 3.28 or newer for the C/C++ tests (tools/test-c.sh): Debian 12 ships 3.25. The PyPI
# build goes into a venv inside the repository (build/ is git-ignored), never system-wide.
# Whether it is there is decided by the venv's own pip, not by a file.
VENV="$ROOT/build/tools-venv"
CMAKE_REQ="cmake>=3.28,<5"
cmake_ok() {
  "$VENV/bin/python" -m pip show cmake >/dev/null 2>&1 || return 1
  "$VENV/bin/python" - "$CMAKE_REQ" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
major, minor = (int(x) for x in version("cmake").split(".")[:2])
sys.exit(0 if (major, minor) >= (3, 28) and major < 5 else 1)
PY
}
if ! cmake_ok; then
  echo "install-deps: installing CMake from PyPI into build/tools-venv" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "$CMAKE_REQ"
fi

bash "$ROOT/tools/check-deps.sh"
echo "install-deps: ok ($(cargo --version), $("$VENV/bin/cmake" --version | head -n 1))" >&2
