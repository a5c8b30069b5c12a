#!/usr/bin/env bash
# Installs EtLlm for C and C++ users into PREFIX:
#
#   PREFIX/bin/etllm                           the command-line tool
#   PREFIX/include/etllm.h, etllm.hpp          the C API and the C++ wrapper
#   PREFIX/lib/libetllm.so, libetllm.a         the library (shared and static)
#   PREFIX/lib/libexecutorch*.so               the ExecuTorch 1.5.1 runtime libetllm.so needs
#   PREFIX/lib/cmake/EtLlm/                    find_package(EtLlm CONFIG): EtLlm::etllm,
#                                              EtLlm::etllm_static
#   PREFIX/lib/pkgconfig/etllm.pc              pkg-config --cflags --libs etllm
#   PREFIX/lib/pkgconfig/etllm-static.pc       ... etllm-static (libetllm.a)
#
# Usage: tools/install.sh PREFIX
#
# The prefix is relocatable: libetllm.so finds the runtime next to itself ($ORIGIN), and the
# CMake and pkg-config files compute every path from their own location, so the folder can
# be moved or copied elsewhere after installing. No installed file holds a path of the build
# machine; the script checks that before it reports success.
#
# The library is built with `cargo build --release --locked` in target/install (a target
# folder of its own, because the build remaps source paths, which a plain release build
# does not do). Needs the tools of tools/install-deps.sh, plus patchelf.
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ] || [ "${1#-}" != "$1" ]; then
  echo "usage: tools/install.sh PREFIX" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
mkdir -p "$1"
PREFIX=$(cd "$1" && pwd -P)
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
for tool in cargo python3 strip patchelf readelf; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "install.sh: $tool not found (run tools/install-deps.sh)" >&2
    exit 1
  }
done

VERSION=$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' "$ROOT/Cargo.toml" | head -n 1)
[ -n "$VERSION" ] || { echo "install.sh: no version in Cargo.toml" >&2; exit 1; }

# --- Build --------------------------------------------------------------------------------
# Source paths that end up in the binaries (panic locations, __FILE__ in the C++ bridge) are
# remapped so that nothing points into this machine's folders.
CARGO_HOME_DIR=${CARGO_HOME:-$HOME/.cargo}
TARGET_DIR="$ROOT/target/install"
remaps=(
  "--remap-path-prefix=$ROOT=etllm"
  "--remap-path-prefix=$CARGO_HOME_DIR/registry/src=cargo-registry"
  "--remap-path-prefix=$CARGO_HOME_DIR/git/checkouts=cargo-git"
)
encoded=""
for flag in "${remaps[@]}"; do
  encoded+="${encoded:+$'\x1f'}$flag"
done
if [ -n "${RUSTFLAGS:-}" ]; then
  for flag in $RUSTFLAGS; do encoded+=$'\x1f'"$flag"; done
fi
cmaps="-ffile-prefix-map=$ROOT=etllm -ffile-prefix-map=$CARGO_HOME_DIR/registry/src=cargo-registry"
cmaps+=" -ffile-prefix-map=$CARGO_HOME_DIR/git/checkouts=cargo-git -ffile-prefix-map=$TARGET_DIR=target"

messages=$(mktemp)
# SentencePiece's CMake build compiles its install folder (the build's OUT_DIR) into the
# library as a default data folder, which EtLlm never uses (its data is embedded). A
# toolchain file, read by the `cmake` crate from CMAKE_TOOLCHAIN_FILE, points it at a
# neutral absolute path instead; it changes nothing else.
trap 'rm -f "$messages"' EXIT
mkdir -p "$TARGET_DIR"
toolchain="$TARGET_DIR/etllm-install-toolchain.cmake"
echo 'set(CMAKE_INSTALL_DATADIR "/usr/share" CACHE PATH "no build-machine path in libetllm" FORCE)' \
  >"$toolchain"
(
  cd "$ROOT"
  CARGO_ENCODED_RUSTFLAGS="$encoded" CMAKE_TOOLCHAIN_FILE="$toolchain" \
    CFLAGS="${CFLAGS:-} $cmaps" CXXFLAGS="${CXXFLAGS:-} $cmaps" \
    cargo build --release --locked --lib --bin etllm --quiet --target-dir "$TARGET_DIR" \
    --message-format=json-render-diagnostics >"$messages"
)

# The build script prints the runtime folder it linked (`cargo:lib_dir=...`) into its output
# file; the JSON messages say where that is.
ET_LIB_DIR=$(python3 - "$messages" <<'EOF'
import json, os, re, sys
out = None
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "build-script-executed" and re.fullmatch(
            r"etllm-[0-9a-f]+", os.path.basename(os.path.dirname(m.get("out_dir", "")))):
        out = m["out_dir"]
if out is None:
    sys.exit("install.sh: no build-script output for etllm in cargo's messages")
for line in open(os.path.join(os.path.dirname(out), "output")):
    if line.startswith("cargo:lib_dir="):
        print(line.split("=", 1)[1].strip())
        break
else:
    sys.exit("install.sh: the build script printed no cargo:lib_dir")
EOF
)
BUILT="$TARGET_DIR/release"

# --- Install ------------------------------------------------------------------------------
mkdir -p "$PREFIX/bin" "$PREFIX/include" "$PREFIX/lib/cmake/EtLlm" "$PREFIX/lib/pkgconfig"
install -m 0644 "$ROOT/include/etllm.h" "$PREFIX/include/etllm.h"
if [ -f "$ROOT/include/etllm.hpp" ]; then
  install -m 0644 "$ROOT/include/etllm.hpp" "$PREFIX/include/etllm.hpp"
fi

# The release profile keeps line tables (debug = 1); installed copies drop them. The
# shared library's RUNPATH becomes just $ORIGIN: the runtime is installed beside it.
install -m 0755 "$BUILT/libetllm.so" "$PREFIX/lib/libetllm.so"
strip --strip-debug "$PREFIX/lib/libetllm.so"
patchelf --set-rpath '$ORIGIN' "$PREFIX/lib/libetllm.so"
install -m 0644 "$BUILT/libetllm.a" "$PREFIX/lib/libetllm.a"
# The CLI links the library statically and finds the runtime in ../lib.
install -m 0755 "$BUILT/etllm" "$PREFIX/bin/etllm"
strip --strip-debug "$PREFIX/bin/etllm"
patchelf --set-rpath '$ORIGIN/../lib' "$PREFIX/bin/etllm"
strip --strip-debug "$PREFIX/lib/libetllm.a"

# The ExecuTorch libraries libetllm.so needs, and what they need in turn (they find each
# other through their own $ORIGIN RUNPATH).
runtime_libs=(libexecutorch.so libexecutorch_threadpool.so
  libexecutorch_kernels_optimized.so libexecutorch_kernels_quantized.so
  libexecutorch_backend_xnnpack.so)
for lib in "${runtime_libs[@]}"; do
  install -m 0755 "$ET_LIB_DIR/$lib" "$PREFIX/lib/$lib"
done
for lib in libetllm.so ../bin/etllm "${runtime_libs[@]}"; do
  for needed in $(readelf -d "$PREFIX/lib/$lib" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
    case "$needed" in
      libexecutorch*)
        [ -f "$PREFIX/lib/$needed" ] || {
          echo "install.sh: $lib needs $needed, which is not installed" >&2
          exit 1
        } ;;
    esac
  done
done

sed "s/@ETLLM_VERSION@/$VERSION/g" "$ROOT/cmake/EtLlmConfigVersion.cmake.in" \
  >"$PREFIX/lib/cmake/EtLlm/EtLlmConfigVersion.cmake"
install -m 0644 "$ROOT/cmake/EtLlmConfig.cmake" "$PREFIX/lib/cmake/EtLlm/EtLlmConfig.cmake"
for pc in etllm etllm-static; do
  sed "s/@ETLLM_VERSION@/$VERSION/g" "$ROOT/cmake/$pc.pc.in" >"$PREFIX/lib/pkgconfig/$pc.pc"
  chmod 0644 "$PREFIX/lib/pkgconfig/$pc.pc"
done
chmod 0644 "$PREFIX/lib/cmake/EtLlm/EtLlmConfigVersion.cmake"

# --- Check: no path of this machine in any installed file -----------------------------------
leaks=$(grep -rlF -e "$ROOT" -e "$PREFIX" -e "$ET_LIB_DIR" -e "$CARGO_HOME_DIR" "$PREFIX" || true)
if [ -n "$leaks" ]; then
  echo "install.sh: these installed files hold a build-machine path:" >&2
  echo "$leaks" >&2
  exit 1
fi
echo "install.sh: installed EtLlm $VERSION into $PREFIX" >&2
