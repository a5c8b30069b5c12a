#!/usr/bin/env bash
# Checks that the build inputs EtLlm relies on come from the Debian packages that
# tools/install-deps.sh installs, so that a file left on a machine by hand (or shipped by
# some other package) cannot make a build pass here and fail on a fresh machine.
#
# - libclang: every libclang that clang-sys (bindgen's loader) could pick is asked, through
#   its own C API, where it finds <stddef.h> and <stdint.h>; each header it resolves and the
#   library itself must be owned by an installed package (dpkg -S). This is the check that
#   catches an image with libclang's .so but without clang's resource headers.
# - cc, c++, cmake, pkg-config, patchelf, doxygen: the program on PATH must be a file that
#   an installed package owns.
# - python3: must run pip and venv (it may be a non-Debian interpreter, such as pyenv's).
#
# Exit status 1 with one line per problem. ETLLM_SKIP_DEPS_CHECK=1 skips it (for machines
# where a build input deliberately comes from elsewhere).
set -euo pipefail
if [ "${ETLLM_SKIP_DEPS_CHECK:-0}" = 1 ]; then
  echo "check-deps: skipped (ETLLM_SKIP_DEPS_CHECK=1)" >&2
  exit 0
fi

problems=0
fail() { echo "check-deps: $*" >&2; problems=$((problems + 1)); }
owner() { dpkg -S "$(readlink -f "$1")" 2>/dev/null | head -n 1 | cut -d: -f1; }

for tool in cc c++ cmake pkg-config patchelf doxygen; do
  path=$(command -v "$tool" || true)
  if [ -z "$path" ]; then fail "$tool is not on PATH"; continue; fi
  pkg=$(owner "$path")
  [ -n "$pkg" ] || fail "$tool on PATH is $(readlink -f "$path"), which no Debian package owns"
done

python3 -m pip --version >/dev/null 2>&1 || fail "python3 ($(command -v python3)) cannot run pip"
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || fail "python3 ($(command -v python3)) has no venv/ensurepip"

# The libclang candidates, in the directories clang-sys searches on Linux (LIBCLANG_PATH,
# llvm-config --libdir, then the system library folders), with the names it accepts
# (libclang.so, libclang-N.so, and their versioned forms; never libclang-cpp).
dirs=()
[ -n "${LIBCLANG_PATH:-}" ] && dirs+=("$LIBCLANG_PATH")
if command -v llvm-config >/dev/null 2>&1; then dirs+=("$(llvm-config --libdir)"); fi
dirs+=(/usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib /usr/local/lib)
mapfile -t libs < <(
  for d in "${dirs[@]}"; do
    [ -d "$d" ] || continue
    find "$d" -maxdepth 1 \( -name 'libclang.so*' -o -name 'libclang-[0-9]*.so*' \) 2>/dev/null
  done | while read -r f; do readlink -f "$f"; done | sort -u
)
if [ ${#libs[@]} -eq 0 ]; then
  fail "no libclang found (bindgen needs Debian's libclang-dev)"
fi

probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
printf '#include <stddef.h>\n#include <stdint.h>\n' > "$probe/probe.c"
for lib in "${libs[@]}"; do
  pkg=$(owner "$lib")
  if [ -z "$pkg" ]; then fail "$lib is not owned by any Debian package"; continue; fi
  # Ask this libclang where it finds the headers, as bindgen's parse would.
  if ! headers=$(python3 - "$lib" "$probe/probe.c" <<'PY'
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.clang_createIndex.restype = ctypes.c_void_p
lib.clang_parseTranslationUnit.restype = ctypes.c_void_p
lib.clang_parseTranslationUnit.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
    ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
lib.clang_getNumDiagnostics.argtypes = [ctypes.c_void_p]
lib.clang_getDiagnostic.restype = ctypes.c_void_p
lib.clang_getDiagnostic.argtypes = [ctypes.c_void_p, ctypes.c_uint]
lib.clang_formatDiagnostic.restype = ctypes.c_void_p * 2
lib.clang_formatDiagnostic.argtypes = [ctypes.c_void_p, ctypes.c_uint]
class CXString(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("flags", ctypes.c_uint)]
lib.clang_formatDiagnostic.restype = CXString
lib.clang_getFileName.restype = CXString
lib.clang_getFileName.argtypes = [ctypes.c_void_p]
lib.clang_getCString.restype = ctypes.c_char_p
lib.clang_getCString.argtypes = [CXString]
index = lib.clang_createIndex(0, 0)
tu = lib.clang_parseTranslationUnit(index, sys.argv[2].encode(), None, 0, None, 0, 0)
if not tu:
    sys.exit("cannot parse")
errors = []
for i in range(lib.clang_getNumDiagnostics(tu)):
    d = lib.clang_getDiagnostic(tu, i)
    errors.append(lib.clang_getCString(lib.clang_formatDiagnostic(d, 0)).decode())
if errors:
    sys.exit("; ".join(errors))
files = []
VISITOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p)
def visit(f, stack, depth, data):
    files.append(lib.clang_getCString(lib.clang_getFileName(f)).decode())
cb = VISITOR(visit)
lib.clang_getInclusions.argtypes = [ctypes.c_void_p, VISITOR, ctypes.c_void_p]
lib.clang_getInclusions(tu, cb, None)
for f in files:
    if f.endswith(("/stddef.h", "/stdint.h")):
        print(f)
PY
  2>&1); then
    fail "$lib cannot compile '#include <stddef.h>' ($headers): install Debian's libclang-dev"
    continue
  fi
  [ -n "$headers" ] || { fail "$lib resolved no <stddef.h>"; continue; }
  while read -r h; do
    hp=$(owner "$h")
    [ -n "$hp" ] || fail "$lib takes $h, which no Debian package owns"
  done <<< "$headers"
done

if [ "$problems" -gt 0 ]; then
  echo "check-deps: $problems problem(s); run tools/install-deps.sh, or see the lines above" >&2
  exit 1
fi
echo "check-deps: ok (libclang: ${libs[*]})" >&2
