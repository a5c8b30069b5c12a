//! Finds the official prebuilt ExecuTorch 1.5.1 runtime and links EtLlm against it.
//!
//! The runtime is looked for, in this order:
//! 1. `ETLLM_EXECUTORCH_DIR`: an ExecuTorch package root (a folder with `lib/`, `include/`
//!    and `share/cmake/`), for example `.../site-packages/executorch`;
//! 2. the `executorch` package of the `python3` on PATH (`ETLLM_PYTHON` names another
//!    interpreter), located without importing it;
//! 3. otherwise the pinned wheel `executorch==1.5.1` is fetched with `pip download --no-deps`
//!    into a cache folder (`ETLLM_CACHE_DIR`, else `$XDG_CACHE_HOME/etllm`, else
//!    `~/.cache/etllm`) and unpacked there.
//!
//! Any other version is refused. Torch is never needed.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const EXECUTORCH_VERSION: &str = "1.5.1";

fn main() {
    for var in [
        "ETLLM_EXECUTORCH_DIR",
        "ETLLM_PYTHON",
        "ETLLM_CACHE_DIR",
        "XDG_CACHE_HOME",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/et/threadpool_shim.cpp");
    println!("cargo:rerun-if-changed=src/et/llama_ops.cpp");

    let root = match find_runtime() {
        Ok(root) => root,
        Err(msg) => {
            eprintln!("error: {msg}");
            panic!("etllm: ExecuTorch {EXECUTORCH_VERSION} runtime not found: {msg}");
        }
    };
    let lib_dir = root.join("lib");
    let include_dir = root.join("include");

    // The thread-pool shim declares the two ThreadPool members it calls; the wheel ships
    // no threadpool header, and the shim needs no other ExecuTorch header.
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .cpp_link_stdlib(None)
        .file("src/et/threadpool_shim.cpp")
        .compile("etllm_threadpool_shim");

    // Kernels for upstream's `llama::` custom ops, compiled against the runtime's own
    // headers (with the defines its libraries were built with).
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .cpp_link_stdlib(None)
        .opt_level(3)
        .flag_if_supported("-fopenmp-simd")
        .flag_if_supported("-Wno-unused-parameter")
        .include(&include_dir)
        .include(include_dir.join("executorch/runtime/core/portable_type/c10"))
        .define("C10_USING_CUSTOM_GENERATED_MACROS", None)
        .define("ET_EVENT_TRACER_ENABLED", None)
        .define("ET_USE_THREADPOOL", None)
        .file("src/et/llama_ops.cpp")
        .compile("etllm_llama_ops");

    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=executorch");
    println!("cargo:rustc-link-lib=dylib=executorch_threadpool");
    // Kernel and delegate libraries only register themselves from static constructors;
    // the linker would drop them under --as-needed (which rustc passes), so they are
    // wrapped in --no-as-needed.
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-L{}", lib_dir.display());
    println!("cargo:rustc-link-arg=-lexecutorch_kernels_optimized");
    // quantized_decomposed::* (4-bit and 8-bit embeddings, per-token quantization of
    // int8 KV caches and 8da4w activations).
    println!("cargo:rustc-link-arg=-lexecutorch_kernels_quantized");
    println!("cargo:rustc-link-arg=-lexecutorch_backend_xnnpack");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
    println!("cargo:rustc-link-lib=dylib=stdc++");
    // Built binaries find the runtime without LD_LIBRARY_PATH: first next to themselves
    // (an installed libetllm.so sits beside the runtime libraries it was installed with),
    // then where the build found it.
    println!(
        "cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN:{}",
        lib_dir.display()
    );
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libetllm.so");

    println!(
        "cargo:rustc-env=ETLLM_EXECUTORCH_LIB_DIR={}",
        lib_dir.display()
    );
    println!("cargo:lib_dir={}", lib_dir.display());
    println!("cargo:include_dir={}", include_dir.display());
    println!("cargo:root={}", root.display());
}

fn find_runtime() -> Result<PathBuf, String> {
    if let Some(dir) = env::var_os("ETLLM_EXECUTORCH_DIR") {
        let root = PathBuf::from(dir);
        check_root(&root).map_err(|e| format!("ETLLM_EXECUTORCH_DIR={}: {e}", root.display()))?;
        return Ok(root);
    }
    let python = env::var("ETLLM_PYTHON").unwrap_or_else(|_| "python3".to_string());
    if let Some(root) = python_package_root(&python) {
        check_root(&root).map_err(|e| {
            format!(
                "the `executorch` package of {python} at {}: {e}. Install executorch=={EXECUTORCH_VERSION} \
                 there, or set ETLLM_EXECUTORCH_DIR to a {EXECUTORCH_VERSION} package root",
                root.display()
            )
        })?;
        return Ok(root);
    }
    download_wheel(&python)
}

/// Where `python` would import `executorch` from, found without importing it (importing
/// would load torch).
fn python_package_root(python: &str) -> Option<PathBuf> {
    let out = Command::new(python)
        .args([
            "-c",
            "import importlib.util as u\ns = u.find_spec('executorch')\n\
             print(list(s.submodule_search_locations)[0] if s and s.submodule_search_locations else '')",
        ])
        .output()
        .ok()?;
    let path = String::from_utf8(out.stdout).ok()?.trim().to_string();
    if !out.status.success() || path.is_empty() {
        return None;
    }
    let root = PathBuf::from(path);
    // A source checkout or a torch-only install has no prebuilt runtime: ignore it.
    root.join("lib")
        .join("libexecutorch.so")
        .exists()
        .then_some(root)
}

/// Checks that `root` holds the prebuilt runtime, at the pinned version.
fn check_root(root: &Path) -> Result<(), String> {
    for lib in [
        "libexecutorch.so",
        "libexecutorch_threadpool.so",
        "libexecutorch_kernels_optimized.so",
        "libexecutorch_kernels_quantized.so",
        "libexecutorch_backend_xnnpack.so",
    ] {
        if !root.join("lib").join(lib).exists() {
            return Err(format!("lib/{lib} is missing"));
        }
    }
    let found = runtime_version(root).ok_or_else(|| {
        "its version is unknown (no share/cmake/executorch-config-version.cmake or version.py)"
            .to_string()
    })?;
    let base = found.split('+').next().unwrap_or("");
    if base != EXECUTORCH_VERSION {
        return Err(format!(
            "found ExecuTorch {found}, but EtLlm needs exactly {EXECUTORCH_VERSION} (its Rust bindings \
             match that ABI). Install it with `pip install --no-deps executorch=={EXECUTORCH_VERSION}`, \
             or unset ETLLM_EXECUTORCH_DIR and let the build fetch the pinned wheel"
        ));
    }
    Ok(())
}

fn runtime_version(root: &Path) -> Option<String> {
    let quoted = |text: &str, key: &str| -> Option<String> {
        let line = text.lines().find(|l| l.contains(key))?;
        let start = line.find('"')? + 1;
        let end = start + line[start..].find('"')?;
        Some(line[start..end].to_string())
    };
    if let Ok(text) = fs::read_to_string(root.join("share/cmake/executorch-config-version.cmake")) {
        if let Some(v) = quoted(&text, "set(PACKAGE_VERSION ") {
            return Some(v);
        }
    }
    let text = fs::read_to_string(root.join("version.py")).ok()?;
    quoted(&text, "__version__")
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = env::var_os("ETLLM_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("etllm");
    }
    let home = env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(env::temp_dir);
    home.join(".cache").join("etllm")
}

/// Fetches the pinned wheel with pip (no dependencies) and unpacks its runtime parts into
/// the cache. The wheel's native libraries do not depend on the Python version, so the
/// cp311 build is requested whatever the local interpreter is.
fn download_wheel(python: &str) -> Result<PathBuf, String> {
    let cache = cache_dir();
    let unpacked = cache.join(format!("executorch-{EXECUTORCH_VERSION}"));
    let root = unpacked.join("executorch");
    if check_root(&root).is_ok() {
        return Ok(root);
    }
    let arch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86_64",
        Ok("aarch64") => "aarch64",
        other => {
            return Err(format!(
                "no prebuilt ExecuTorch wheel for target arch {other:?}"
            ))
        }
    };
    let wheel_dir = cache.join("wheels");
    fs::create_dir_all(&wheel_dir)
        .map_err(|e| format!("cannot create {}: {e}", wheel_dir.display()))?;
    let status = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args(["--platform", &format!("manylinux_2_28_{arch}")])
        .args([
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--abi",
            "cp311",
        ])
        .arg("--dest")
        .arg(&wheel_dir)
        .arg(format!("executorch=={EXECUTORCH_VERSION}"))
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| {
            format!("cannot run `{python} -m pip`: {e}. Install pip (Debian: python3-pip)")
        })?;
    if !status.success() {
        return Err(format!(
            "`{python} -m pip download executorch=={EXECUTORCH_VERSION}` failed ({status}); \
             set ETLLM_EXECUTORCH_DIR to an unpacked ExecuTorch {EXECUTORCH_VERSION} package root instead"
        ));
    }
    let wheel = fs::read_dir(&wheel_dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("executorch-{EXECUTORCH_VERSION}-")) && n.ends_with(".whl")
            })
        })
        .ok_or("pip reported success but left no wheel")?;
    let staging = cache.join(format!("executorch-{EXECUTORCH_VERSION}.partial"));
    let _ = fs::remove_dir_all(&staging);
    let script = "import sys, zipfile\n\
        z = zipfile.ZipFile(sys.argv[1])\n\
        keep = ('executorch/lib/', 'executorch/include/', 'executorch/share/', 'executorch/version.py')\n\
        z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith(keep)])\n";
    let status = Command::new(python)
        .args(["-c", script])
        .arg(&wheel)
        .arg(&staging)
        .status()
        .map_err(|e| format!("cannot run {python} to unpack the wheel: {e}"))?;
    if !status.success() {
        return Err(format!("unpacking {} failed", wheel.display()));
    }
    let _ = fs::remove_dir_all(&unpacked);
    fs::rename(&staging, &unpacked)
        .map_err(|e| format!("cannot move the unpacked runtime: {e}"))?;
    check_root(&root)?;
    Ok(root)
}
