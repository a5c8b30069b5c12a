#!/usr/bin/env bash
# Usage: tools/setup-openvino.sh DIR
#
# Prepares the OpenVINO runtime that ExecuTorch 1.5.1's OpenVINO delegate (and so EtLlm) loads
# at run time, for the CPU device, from the PyPI wheel openvino==2025.4.1 (the version that
# exported tests/fixtures/backends/openvino/model.pte; see docs/backends-openvino-qnn.md):
#   1. `pip download --no-deps` of the wheel for this machine (manylinux x86_64 or aarch64;
#      for this Python, else the cp311 build: the C libraries are the same). Nothing is
#      installed into any Python environment, and torch is never needed.
#   2. Extracts only the five libraries the CPU path needs into DIR: libopenvino_c.so.<v>,
#      libopenvino.so.<v>, the CPU plugin (libopenvino_intel_cpu_plugin.so on x86_64,
#      libopenvino_arm_cpu_plugin.so on aarch64), libopenvino_ir_frontend.so.<v>, libtbb.so.12.
#   3. Writes DIR/plugins.xml (read by OpenVINO next to libopenvino.so) with
#      INFERENCE_PRECISION_HINT=f32 for the CPU plugin: otherwise CPUs with AMX / avx512_bf16
#      compute in bf16 and the logits drift by ~1e-2 from eager PyTorch.
#   4. Checks the result through OpenVINO's C API (ctypes): the runtime reports version
#      2025.4.1, the CPU device is available, and its INFERENCE_PRECISION_HINT is f32.
#   5. Prints the OPENVINO_LIB_PATH value to use on stdout (the only line on stdout).
#
# Idempotent: DIR/openvino-manifest.txt records the wheel's version and file name and the
# sha256 of every file written. A re-run with a manifest of the same version and an arch
# whose files all match their checksums skips the download and only re-runs step 4; any
# other state (another version, a missing or changed file, no manifest) is rebuilt from a
# fresh download. Needs python3 with pip (Debian: python3-pip), sha256sum, and the network.
set -euo pipefail

OPENVINO_VERSION=2025.4.1
PY=${PYTHON:-python3}

if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
mkdir -p "$1"
DIR=$(cd "$1" && pwd -P)
MANIFEST="$DIR/openvino-manifest.txt"

ARCH=$(uname -m)
case "$ARCH" in
  x86_64)
    PLUGIN=libopenvino_intel_cpu_plugin.so
    PLATFORMS=(manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64) ;;
  aarch64)
    PLUGIN=libopenvino_arm_cpu_plugin.so
    PLATFORMS=(manylinux_2_28_aarch64 manylinux_2_31_aarch64 manylinux_2_35_aarch64) ;;
  *)
    echo "setup-openvino: no openvino==$OPENVINO_VERSION Linux wheel for $ARCH" >&2
    exit 1 ;;
esac

log() { echo "setup-openvino: $*" >&2; }

# Loads the libraries in DIR through OpenVINO's C API and checks version, CPU device and
# precision; prints the libopenvino_c path.
check_runtime() {
  "$PY" - "$DIR" "$OPENVINO_VERSION" <<'PY'
import ctypes, pathlib, sys

d, want = pathlib.Path(sys.argv[1]), sys.argv[2]
c_libs = sorted(d.glob("libopenvino_c.so.*"))
if len(c_libs) != 1:
    sys.exit(f"setup-openvino: expected one libopenvino_c.so.* in {d}, found {c_libs}")
lib = ctypes.CDLL(str(c_libs[0]))

class Version(ctypes.Structure):
    _fields_ = [("buildNumber", ctypes.c_char_p), ("description", ctypes.c_char_p)]

def ok(status, what):
    if status != 0:
        msg = lib.ov_get_last_err_msg
        msg.restype = ctypes.c_char_p
        sys.exit(f"setup-openvino: {what} failed (status {status}): {(msg() or b'').decode()}")

v = Version()
ok(lib.ov_get_openvino_version(ctypes.byref(v)), "ov_get_openvino_version")
build = v.buildNumber.decode()
lib.ov_version_free(ctypes.byref(v))
if not build.startswith(want + "-"):
    sys.exit(f"setup-openvino: {c_libs[0]} reports version {build}, want {want}")

core = ctypes.c_void_p()
ok(lib.ov_core_create(ctypes.byref(core)), "ov_core_create")
value = ctypes.c_char_p()
lib.ov_core_get_property.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                                     ctypes.POINTER(ctypes.c_char_p)]
ok(lib.ov_core_get_property(core, b"CPU", b"INFERENCE_PRECISION_HINT", ctypes.byref(value)),
   "loading the CPU plugin (ov_core_get_property CPU INFERENCE_PRECISION_HINT)")
precision = value.value.decode()
lib.ov_core_free(core)
if precision != "f32":
    sys.exit(f"setup-openvino: CPU INFERENCE_PRECISION_HINT is {precision}, want f32 (plugins.xml)")
print(f"setup-openvino: OpenVINO {build}, CPU plugin loads, INFERENCE_PRECISION_HINT={precision}",
      file=sys.stderr)
print(c_libs[0])
PY
}

# Is DIR already set up from this version's wheel for this arch, unchanged?
up_to_date() {
  [ -f "$MANIFEST" ] || return 1
  grep -qx "version $OPENVINO_VERSION" "$MANIFEST" || return 1
  grep -qx "arch $ARCH" "$MANIFEST" || return 1
  (cd "$DIR" && grep -E '^[0-9a-f]{64}  ' "$MANIFEST" | sha256sum --check --quiet --strict) \
    >/dev/null 2>&1
}

if up_to_date; then
  log "$DIR holds openvino==$OPENVINO_VERSION ($ARCH), checksums match; no download"
else
  if [ -f "$MANIFEST" ]; then
    log "$DIR: manifest is for another version/arch or files changed; setting up again"
  fi
  WORK=$(mktemp -d "$DIR/.download.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  start=$(date +%s)
  log "pip download --no-deps openvino==$OPENVINO_VERSION ($ARCH)"
  PIP=("$PY" -m pip download --no-deps --only-binary=:all: --disable-pip-version-check
       --dest "$WORK/wheel" "openvino==$OPENVINO_VERSION")
  if ! "${PIP[@]}" >&2; then
    # No wheel for this Python: the shared libraries do not depend on it, take cp311's.
    log "no wheel for this Python; downloading the cp311 build"
    plat=()
    for p in "${PLATFORMS[@]}"; do plat+=(--platform "$p"); done
    "${PIP[@]}" --python-version 3.11 --implementation cp --abi cp311 "${plat[@]}" >&2
  fi
  WHEEL=$(ls "$WORK"/wheel/openvino-"$OPENVINO_VERSION"-*.whl)
  log "downloaded $(basename "$WHEEL") ($(stat -c %s "$WHEEL") bytes) in $(( $(date +%s) - start )) s"

  # Extract the five libraries and write plugins.xml and the manifest in a scratch folder,
  # then move them into DIR.
  "$PY" - "$WHEEL" "$WORK/out" "$PLUGIN" <<'PY'
import pathlib, re, shutil, sys, zipfile

wheel, out, plugin = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
wanted = [r"libopenvino_c\.so\.\d+", r"libopenvino\.so\.\d+", re.escape(plugin),
          r"libopenvino_ir_frontend\.so\.\d+", r"libtbb\.so\.12"]
out.mkdir(parents=True)
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("openvino/libs/")]
    for pattern in wanted:
        hits = [n for n in names if re.fullmatch(r"openvino/libs/" + pattern, n)]
        if len(hits) != 1:
            sys.exit(f"setup-openvino: {wheel}: expected one openvino/libs/{pattern}, found {hits}")
        target = out / pathlib.Path(hits[0]).name
        with z.open(hits[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        target.chmod(0o755)
(out / "plugins.xml").write_text(
    '<ie><plugins><plugin name="CPU" location="%s">\n'
    '  <properties><property key="INFERENCE_PRECISION_HINT" value="f32"/></properties>\n'
    '</plugin></plugins></ie>\n' % plugin)
PY
  {
    echo "# Written by tools/setup-openvino.sh; checked on every run."
    echo "version $OPENVINO_VERSION"
    echo "arch $ARCH"
    echo "wheel $(basename "$WHEEL")"
    (cd "$WORK/out" && sha256sum -- *)
  } >"$WORK/manifest.new"
  # Remove what an earlier set-up wrote (the libraries of another version have other names).
  if [ -f "$MANIFEST" ]; then
    grep -E '^[0-9a-f]{64}  ' "$MANIFEST" | cut -c67- | while IFS= read -r f; do
      case "$f" in */*|..|.|'') ;; *) rm -f -- "$DIR/$f" ;; esac
    done
    rm -f "$MANIFEST"
  fi
  mv -f -- "$WORK"/out/* "$DIR/"
  mv -f "$WORK/manifest.new" "$MANIFEST"
  rm -rf "$WORK"
  log "$DIR: $(du -sh --exclude='.download.*' "$DIR" | cut -f1) written in $(( $(date +%s) - start )) s"
fi

LIB=$(check_runtime)
log "export OPENVINO_LIB_PATH=$LIB"
echo "$LIB"
