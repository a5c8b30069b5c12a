//! The ExecuTorch adapter: the only module that calls the runtime. Every `unsafe` block
//! that touches ExecuTorch lives here; the rest of the crate sees [`Program`] and the
//! safe types of [`crate::tensor`].

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Once;

use executorch::evalue::{EValue, Tag};
use executorch::memory::HierarchicalAllocator;
use executorch::module::{LoadMode, Module, ModuleBuilder};
use executorch::platform::{LogEntry, LogLevel, PlatformImpl};
use executorch::program::{HeaderStatus, ProgramVerification};
use executorch::tensor::{ScalarType, TensorPtr, TensorPtrBuilder, View};
use executorch::util::Span;
use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::tensor::{ConstValue, DType, MethodInfo, TensorData, TensorSpec, TensorView, ValueSpec};

extern "C" {
    fn etllm_threadpool_set_threads(num_threads: u32) -> bool;
    fn etllm_threadpool_thread_count() -> usize;
    fn etllm_llama_ops_count() -> u32;
    fn etllm_llama_ops_name(index: u32) -> *const std::ffi::c_char;
    fn etllm_llama_ops_register(status: *mut u8, count: u32);
}

/// How many ExecuTorch log lines of level Error or worse are kept per thread.
const MAX_CAPTURED_LOG_LINES: usize = 16;

thread_local! {
    /// Error-level ExecuTorch log lines emitted on this thread since the last call to
    /// [`take_log`]. They are attached to the error EtLlm returns.
    static CAPTURED_LOG: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

static INIT: Once = Once::new();

/// Routes ExecuTorch's log output away from the process's streams: Error-level lines are
/// captured for error messages; every line goes to stderr only when `ETLLM_LOG` is set.
fn init_runtime() {
    INIT.call_once(|| {
        let mut pal = PlatformImpl::new(None);
        pal.set_emit_log_message(|entry: LogEntry| {
            let level = match entry.level {
                LogLevel::Debug => "D",
                LogLevel::Info => "I",
                LogLevel::Error => "E",
                LogLevel::Fatal => "F",
                LogLevel::Unknown => "?",
            };
            if std::env::var_os("ETLLM_LOG").is_some() {
                eprintln!(
                    "[executorch {level} {}:{}] {}",
                    entry.filename.unwrap_or("?"),
                    entry.line,
                    entry.message
                );
            }
            if matches!(entry.level, LogLevel::Error | LogLevel::Fatal) {
                let _ = CAPTURED_LOG.try_with(|log| {
                    if let Ok(mut log) = log.try_borrow_mut() {
                        if log.len() == MAX_CAPTURED_LOG_LINES {
                            log.remove(0);
                        }
                        let message = entry.message.trim_end();
                        log.push(if message.starts_with("? (invalid utf8") {
                            format!(
                                "(unprintable message at {}:{})",
                                entry.filename.unwrap_or("?"),
                                entry.line
                            )
                        } else {
                            message.to_string()
                        });
                    }
                });
            }
        });
        // Safety: `pal` holds only functions with 'static lifetime; registration happens
        // once, before this crate creates any runtime object.
        unsafe {
            executorch::platform::register_platform_impl(pal);
            executorch::platform::pal_init();
        }
        register_llama_ops();
    });
}

/// Who provides one of the `llama::` custom operators after [`register_llama_ops`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OpProvider {
    /// EtLlm's own kernel was registered by this call.
    EtLlm,
    /// The registry already had the operator (registered earlier, by EtLlm or by another
    /// library in the process); it was left as it was.
    AlreadyRegistered,
    /// The registry refused EtLlm's kernel (for example because it is full).
    Failed,
}

/// Registers EtLlm's kernels for upstream's `llama::` custom operators
/// (`custom_sdpa.out`, `update_cache.out`, `sdpa_with_kv_cache.out`,
/// `update_cache_with_indices.out`, `custom_quantized_sdpa.out`) with ExecuTorch's kernel registry. An operator the
/// registry already has is skipped, so a process where another library registered them
/// keeps that library's kernels and does not abort. Called once by the runtime's
/// initialisation; calling it again only skips.
pub(crate) fn register_llama_ops() -> Vec<(String, OpProvider)> {
    // Safety: plain C calls into llama_ops.cpp; `status` has room for `count` entries and
    // the names are static NUL-terminated strings. The registry is not thread-safe: this
    // runs under `INIT`, or in tests before any model is loaded.
    unsafe {
        let count = etllm_llama_ops_count();
        let mut status = vec![u8::MAX; count as usize];
        etllm_llama_ops_register(status.as_mut_ptr(), count);
        status
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let name = std::ffi::CStr::from_ptr(etllm_llama_ops_name(i as u32))
                    .to_string_lossy()
                    .into_owned();
                let provider = match s {
                    0 => OpProvider::EtLlm,
                    1 => OpProvider::AlreadyRegistered,
                    _ => OpProvider::Failed,
                };
                (name, provider)
            })
            .collect()
    }
}

/// Drops the lines captured so far on this thread.
fn clear_log() {
    let _ = CAPTURED_LOG.try_with(|log| log.borrow_mut().clear());
}

/// Takes the captured lines, formatted as an error suffix (": line; line"), or "".
fn take_log() -> String {
    let lines = CAPTURED_LOG
        .try_with(|log| std::mem::take(&mut *log.borrow_mut()))
        .unwrap_or_default();
    if lines.is_empty() {
        String::new()
    } else {
        format!(": {}", lines.join("; "))
    }
}

/// " with the data files a, b" when there are any.
fn data_note(data_paths: &[PathBuf]) -> String {
    if data_paths.is_empty() {
        String::new()
    } else {
        format!(
            " with the data files {}",
            data_paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

fn runtime_error(operation: impl Into<String>, err: executorch::Error) -> Error {
    Error::Runtime {
        operation: operation.into(),
        code: format!("{err:?}"),
        details: take_log(),
    }
}

/// Programs alive in this process. ExecuTorch's XNNPACK delegate keeps a pointer to the
/// thread pool's `pthreadpool` from the moment a method is loaded, and resizing the pool
/// frees that `pthreadpool`: a program loaded before a resize then waits forever on a
/// freed mutex (or worse) at its next call. So the pool is only resized while no program
/// is alive; the lock is held across the check and the resize, and across the count's
/// change when a program is opened.
static LIVE_PROGRAMS: std::sync::Mutex<usize> = std::sync::Mutex::new(0);

fn live_programs() -> std::sync::MutexGuard<'static, usize> {
    LIVE_PROGRAMS.lock().unwrap_or_else(|e| e.into_inner())
}

/// One live program's share of [`LIVE_PROGRAMS`]; dropping it releases the share.
struct LiveProgram;

impl LiveProgram {
    fn new() -> Self {
        *live_programs() += 1;
        LiveProgram
    }
}

impl Drop for LiveProgram {
    fn drop(&mut self) {
        *live_programs() -= 1;
    }
}

/// Sets the size of ExecuTorch's shared CPU thread pool (used by XNNPACK and the optimized
/// kernels). It is process-wide. Asking for the current size always succeeds; another size
/// is refused while any model is loaded (see [`LIVE_PROGRAMS`]).
pub(crate) fn set_num_threads(threads: usize) -> Result<()> {
    init_runtime();
    let n = u32::try_from(threads)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| Error::InvalidArgument(format!("thread count {threads} is out of range")))?;
    let live = live_programs();
    let current = num_threads();
    if current == threads {
        return Ok(());
    }
    if *live > 0 {
        return Err(Error::InvalidArgument(format!(
            "cannot resize ExecuTorch's thread pool from {current} to {threads} threads while \
             {} model(s) are loaded (their XNNPACK delegates keep the pool); set the thread \
             count before loading the first model, or free every runner first",
            *live
        )));
    }
    // Safety: plain C calls into the shim; it checks for a missing pool itself. No program
    // is alive, and none can be opened while `live` is held.
    let ok = unsafe { etllm_threadpool_set_threads(n) };
    drop(live);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "ExecuTorch's thread pool could not be resized to {threads} threads"
        )))
    }
}

/// Current size of ExecuTorch's shared CPU thread pool.
pub(crate) fn num_threads() -> usize {
    init_runtime();
    // Safety: plain C call into the shim.
    unsafe { etllm_threadpool_thread_count() }
}

/// A loaded ExecuTorch program (memory-mapped `.pte`).
pub(crate) struct Program {
    /// Declared first so that it is dropped first: its methods point into `planned`.
    module: Module<'static>,
    /// The memory-planned buffers EtLlm gives each method (activations and mutable buffers
    /// such as the KV cache), owned here so that a session's state can be read and written.
    planned: PlannedMemory,
    /// Keeps the thread pool from being resized under this program's delegates.
    _live: LiveProgram,
    path: PathBuf,
    /// The external data files (`.ptd`) the program was opened with.
    data_paths: Vec<PathBuf>,
    /// The program's method names, sorted; read once at load time (see [`read_method_names`]).
    method_names: Vec<String>,
    /// One buffer per output index, reused from step to step: f16 and bf16 outputs are
    /// widened into them (see [`TensorData`]).
    widened: Vec<Vec<f32>>,
}

/// An input tensor handed to the runtime, viewing a host buffer.
enum InputPtr<'a> {
    F32(TensorPtr<'a, View<f32>>),
    I64(TensorPtr<'a, View<i64>>),
    I32(TensorPtr<'a, View<i32>>),
    F16(TensorPtr<'a, View<f16>>),
    BF16(TensorPtr<'a, View<bf16>>),
    U8(TensorPtr<'a, View<u8>>),
}

/// Checks that `path` names a readable regular file.
fn check_file(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::FileAccess {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if !meta.is_file() {
        return Err(Error::FileAccess {
            path: path.to_path_buf(),
            message: "not a regular file".into(),
        });
    }
    std::fs::File::open(path).map_err(|e| Error::FileAccess {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(())
}

/// Magic of ExecuTorch's flat-tensor data files (`.ptd`): bytes 4..8 of the file.
const PTD_MAGIC: &[u8; 4] = b"FT01";

/// Checks that `path` looks like an ExecuTorch data file, so that a wrong file is named
/// in the error rather than reported as an unloadable program.
fn check_data_file(path: &Path) -> Result<()> {
    check_file(path)?;
    let mut head = Vec::with_capacity(8);
    std::fs::File::open(path)
        .and_then(|f| std::io::Read::read_to_end(&mut std::io::Read::take(f, 8), &mut head))
        .map_err(|e| Error::FileAccess {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if head.len() < 8 || &head[4..8] != PTD_MAGIC {
        return Err(Error::InvalidModel {
            path: path.to_path_buf(),
            message: "it is not an ExecuTorch data file (.ptd: no FT01 header)".into(),
        });
    }
    if path.to_str().is_none_or(|s| s.contains('\0')) {
        return Err(Error::InvalidArgument(format!(
            "data path {} is not valid UTF-8",
            path.display()
        )));
    }
    ptd::check(path).map_err(|message| Error::InvalidModel {
        path: path.to_path_buf(),
        message,
    })
}

impl Program {
    /// Opens and verifies the program at `path`, with the external data files (`.ptd`,
    /// ExecuTorch's named data maps) that hold its weights when the export put them
    /// outside the `.pte`. `share_arenas` sees the method names and says whether the
    /// methods must share their memory arenas (a program exported with
    /// `share_mutable_buffers`, whose methods share the KV cache). Nothing is executed yet.
    pub(crate) fn load(
        path: &Path,
        data_paths: &[PathBuf],
        share_arenas: impl FnOnce(&[String]) -> bool,
    ) -> Result<Self> {
        init_runtime();
        check_file(path)?;
        for data in data_paths {
            check_data_file(data)?;
        }
        let mut head = Vec::with_capacity(64);
        std::fs::File::open(path)
            .and_then(|f| std::io::Read::read_to_end(&mut std::io::Read::take(f, 64), &mut head))
            .map_err(|e| Error::FileAccess {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let header_problem = match executorch::program::Program::check_header(&head) {
            HeaderStatus::CompatibleVersion => None,
            HeaderStatus::IncompatibleVersion => {
                Some("it was written for an ExecuTorch version this runtime (1.5.1) cannot read")
            }
            HeaderStatus::NotPresent => Some("it is not an ExecuTorch program (no .pte header)"),
            HeaderStatus::ShortData => Some("it is too short to be an ExecuTorch program"),
        };
        if let Some(message) = header_problem {
            return Err(Error::InvalidModel {
                path: path.to_path_buf(),
                message: message.to_string(),
            });
        }
        if path.to_str().is_none_or(|s| s.contains('\0')) {
            return Err(Error::InvalidArgument(format!(
                "model path {} is not valid UTF-8",
                path.display()
            )));
        }
        let method_names = read_method_names(path).map_err(|message| Error::InvalidModel {
            path: path.to_path_buf(),
            message,
        })?;
        let share = share_arenas(&method_names);
        let live = LiveProgram::new();
        clear_log();
        let data_refs: Vec<&Path> = data_paths.iter().map(PathBuf::as_path).collect();
        let mut module = ModuleBuilder::new(path)
            .data_files(&data_refs)
            .load_mode(LoadMode::Mmap)
            .share_memory_arenas(share)
            .build();
        module
            .load(Some(ProgramVerification::InternalConsistency), None)
            .map_err(|e| Error::InvalidModel {
                path: path.to_path_buf(),
                message: format!(
                    "ExecuTorch cannot load it{} ({e:?}){}",
                    data_note(data_paths),
                    take_log()
                ),
            })?;
        Ok(Self {
            module,
            planned: PlannedMemory {
                share,
                ..Default::default()
            },
            _live: live,
            path: path.to_path_buf(),
            data_paths: data_paths.to_vec(),
            method_names,
            widened: Vec::new(),
        })
    }

    /// Names of all methods, sorted.
    pub(crate) fn method_names(&self) -> Vec<String> {
        self.method_names.clone()
    }

    fn data_list(&self) -> String {
        self.data_paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn invalid(&self, message: String) -> Error {
        Error::InvalidModel {
            path: self.path.clone(),
            message,
        }
    }

    /// Loads `method` (resolving its operators and delegates) so that the first call does
    /// not pay for it and a missing operator is reported at load time.
    /// An operator without a kernel in this process is reported as an unsupported model,
    /// naming the operators.
    ///
    /// ExecuTorch 1.5.1 loads some corrupt methods while logging an error (a KernelCall
    /// naming an operator index past the operator table is logged as "Op index N out of
    /// range" and left as a null kernel that crashes at execution). So a load that logged
    /// an Error-level line is refused too: the method is unloaded and the model is reported
    /// invalid with the logged lines.
    pub(crate) fn load_method(&mut self, method: &str) -> Result<()> {
        self.load_method_with(method, true)
    }

    /// [`load_method`](Self::load_method); `state` says whether the method's arenas hold
    /// state worth keeping between calls (not for metadata methods).
    fn load_method_with(&mut self, method: &str, state: bool) -> Result<()> {
        if self.module.is_method_loaded(method) {
            return Ok(());
        }
        let sizes = self.check_planned_memory(method)?;
        let allocator = self.planned.allocator_for(&sizes, state);
        clear_log();
        self.module
            .load_method(method, Some(allocator), None)
            .map_err(|e| match e {
                executorch::Error::OperatorMissing => {
                    let log = take_log();
                    let mut missing: Vec<&str> = log
                        .split("; ")
                        .filter_map(|line| line.split("Missing operator: ").nth(1))
                        .filter_map(|rest| rest.split_whitespace().last())
                        .collect();
                    missing.dedup();
                    Error::UnsupportedModel(format!(
                        "{}: method `{method}` uses operators that no kernel library in this \
                         process provides: {} (EtLlm provides the ExecuTorch runtime's \
                         optimized, portable and quantized (quantized_decomposed::) \
                         kernels, XNNPACK, and upstream's \
                         llama::custom_sdpa, update_cache, sdpa_with_kv_cache, \
                         update_cache_with_indices and custom_quantized_sdpa)",
                        self.path.display(),
                        if missing.is_empty() {
                            format!("(unnamed; ExecuTorch said{log})")
                        } else {
                            missing.join(", ")
                        }
                    ))
                }
                e @ (executorch::Error::InvalidExternalData
                | executorch::Error::NotFound
                | executorch::Error::InvalidState) => {
                    let log = take_log();
                    if self.data_paths.is_empty() && log.contains("external_data_map is null") {
                        self.invalid(format!(
                            "method `{method}` keeps its weights in an external data file \
                             (.ptd) and none was given: pass it as a data path (`--data` in \
                             the CLI), or put it beside the .pte with the same stem{log}"
                        ))
                    } else if !self.data_paths.is_empty() {
                        self.invalid(format!(
                            "method `{method}` cannot be loaded with the data files {} \
                             ({e:?}); do they belong to this program?{log}",
                            self.data_list()
                        ))
                    } else {
                        Error::Runtime {
                            operation: format!("loading method `{method}`"),
                            code: format!("{e:?}"),
                            details: log,
                        }
                    }
                }
                e => runtime_error(format!("loading method `{method}`"), e),
            })?;
        let log = take_log();
        if !log.is_empty() {
            self.module.unload_method(method);
            return Err(self.invalid(format!(
                "ExecuTorch reported errors while loading method `{method}`{log}"
            )));
        }
        Ok(())
    }

    /// Refuses a method whose memory-planned buffers add up to more than this machine's
    /// physical memory, or than the process's address-space or data limit. ExecuTorch's `Module` allocates them with `new` when it loads the
    /// method, and the `std::bad_alloc` of an impossible size (a corrupt buffer size in the
    /// program) would cross the cxx bridge and terminate the process.
    /// Returns the sizes of the method's memory-planned buffers.
    fn check_planned_memory(&mut self, method: &str) -> Result<Vec<usize>> {
        clear_log();
        let meta = self
            .module
            .method_meta(method)
            .map_err(|e| runtime_error(format!("reading metadata of method `{method}`"), e))?;
        let mut total: u128 = 0;
        let mut sizes = Vec::with_capacity(meta.num_memory_planned_buffers());
        for i in 0..meta.num_memory_planned_buffers() {
            let size = meta.memory_planned_buffer_size(i).map_err(|e| {
                runtime_error(format!("reading planned buffer {i} of `{method}`"), e)
            })?;
            total += size as u128;
            sizes.push(size);
        }
        // An output without a memory-planned buffer (an export made with
        // `MemoryPlanningPass(alloc_graph_output=False)`, as upstream's static-attention
        // script does) needs a buffer bound with `Method::set_output_data_ptr`, which the
        // Rust bindings do not expose; run as is, the delegate writes through a null pointer.
        for i in 0..meta.num_outputs() {
            if meta.output_tag(i).is_ok_and(|t| t == Tag::Tensor)
                && meta
                    .output_tensor_meta(i)
                    .is_ok_and(|info| !info.is_memory_planned())
            {
                return Err(Error::UnsupportedModel(format!(
                    "{}: output {i} of method `{method}` has no memory-planned buffer (the \
                     export used MemoryPlanningPass(alloc_graph_output=False)); EtLlm needs \
                     planned outputs: export with alloc_graph_output=True",
                    self.path.display()
                )));
            }
        }
        if self.planned.share {
            // Shared arenas are as large as the largest method's (see `PlannedMemory`).
            for name in self.method_names.clone() {
                let meta = self.module.method_meta(&name).map_err(|e| {
                    runtime_error(format!("reading metadata of method `{name}`"), e)
                })?;
                for i in 0..meta.num_memory_planned_buffers().min(SHARED_ARENAS) {
                    let size = meta.memory_planned_buffer_size(i).map_err(|e| {
                        runtime_error(format!("reading planned buffer {i} of `{name}`"), e)
                    })?;
                    if i < sizes.len() && size > sizes[i] {
                        total += (size - sizes[i]) as u128;
                        sizes[i] = size;
                    }
                }
            }
        }
        let limit = physical_memory();
        if total > limit {
            return Err(self.invalid(format!(
                "method `{method}` asks for {total} bytes of memory-planned buffers, more than \
                 the {limit} bytes this process can allocate (physical memory, or its \
                 RLIMIT_AS / RLIMIT_DATA limit)"
            )));
        }
        Ok(sizes)
    }

    /// The memory-planned buffers that hold the program's state between calls (the
    /// mutable buffers such as a KV cache, with the activations planned beside them), in a
    /// fixed order: the sizes say the layout.
    pub(crate) fn state_arenas(&self) -> Vec<&[u8]> {
        self.planned.state_arenas()
    }

    /// The same buffers, to write. Nothing runs while they are borrowed.
    pub(crate) fn state_arenas_mut(&mut self) -> Vec<&mut [u8]> {
        self.planned.state_arenas_mut()
    }

    /// How many memory-planned buffers (arenas) `method` has: 2 or more when the export
    /// planned its mutable buffers (the KV cache) separately, to share them between methods.
    pub(crate) fn planned_buffer_count(&mut self, method: &str) -> Result<usize> {
        clear_log();
        let meta = self
            .module
            .method_meta(method)
            .map_err(|e| runtime_error(format!("reading metadata of method `{method}`"), e))?;
        Ok(meta.num_memory_planned_buffers())
    }

    /// Input and output metadata of `method`.
    pub(crate) fn method_info(&mut self, method: &str) -> Result<MethodInfo> {
        clear_log();
        let meta = self
            .module
            .method_meta(method)
            .map_err(|e| runtime_error(format!("reading metadata of method `{method}`"), e))?;
        let mut inputs = Vec::with_capacity(meta.num_inputs());
        for i in 0..meta.num_inputs() {
            let tag = meta
                .input_tag(i)
                .map_err(|e| runtime_error(format!("reading input {i} of `{method}`"), e))?;
            inputs.push(if tag == Tag::Tensor {
                let info = meta
                    .input_tensor_meta(i)
                    .map_err(|e| runtime_error(format!("reading input {i} of `{method}`"), e))?;
                ValueSpec::Tensor(TensorSpec {
                    dtype: dtype_of(info.scalar_type()),
                    sizes: info.sizes().iter().map(|&s| s.max(0) as usize).collect(),
                })
            } else {
                ValueSpec::Other(format!("{tag:?}"))
            });
        }
        let mut outputs = Vec::with_capacity(meta.num_outputs());
        for i in 0..meta.num_outputs() {
            let tag = meta
                .output_tag(i)
                .map_err(|e| runtime_error(format!("reading output {i} of `{method}`"), e))?;
            outputs.push(if tag == Tag::Tensor {
                let info = meta
                    .output_tensor_meta(i)
                    .map_err(|e| runtime_error(format!("reading output {i} of `{method}`"), e))?;
                ValueSpec::Tensor(TensorSpec {
                    dtype: dtype_of(info.scalar_type()),
                    sizes: info.sizes().iter().map(|&s| s.max(0) as usize).collect(),
                })
            } else {
                ValueSpec::Other(format!("{tag:?}"))
            });
        }
        Ok(MethodInfo {
            name: method.to_string(),
            inputs,
            outputs,
        })
    }

    /// Calls a method that takes no input and returns one value (the export's metadata
    /// methods such as `get_max_seq_len`).
    pub(crate) fn call_constant(&mut self, method: &str) -> Result<ConstValue> {
        // Loaded through `load_method` so that its checks apply to metadata methods too.
        self.load_method_with(method, false)?;
        clear_log();
        let outputs = self
            .module
            .execute(method, &[])
            .map_err(|e| runtime_error(format!("calling metadata method `{method}`"), e))?;
        // A Python list in `constant_methods` is exported as one Int output per element.
        if outputs.len() > 1 {
            return if outputs.iter().all(|v| v.tag() == Tag::Int) {
                Ok(ConstValue::IntList(
                    outputs.iter().map(|v| v.as_i64()).collect(),
                ))
            } else {
                Ok(ConstValue::Other(format!("{} outputs", outputs.len())))
            };
        }
        let value = outputs
            .first()
            .ok_or_else(|| Error::UnsupportedModel(format!("`{method}` returned nothing")))?;
        Ok(match value.tag() {
            Tag::Int => ConstValue::Int(value.as_i64()),
            Tag::Bool => ConstValue::Bool(value.as_bool()),
            Tag::Double => ConstValue::Double(value.as_f64()),
            Tag::ListInt => ConstValue::IntList(value.as_i64_list().to_vec()),
            Tag::Tensor => {
                let t = value.as_tensor();
                let n = t.numel();
                let ptr = t.as_data_ptr_raw();
                let sizes: Vec<usize> = t.sizes().iter().map(|&s| s.max(0) as usize).collect();
                // Safety: the runtime owns `n` contiguous elements of this type at `ptr`
                // until `outputs` is dropped; they are copied out before that.
                unsafe {
                    match dtype_of(t.scalar_type()) {
                        DType::I64 => ConstValue::IntTensor {
                            sizes,
                            data: std::slice::from_raw_parts(ptr as *const i64, n).to_vec(),
                        },
                        DType::I32 => ConstValue::IntTensor {
                            sizes,
                            data: std::slice::from_raw_parts(ptr as *const i32, n)
                                .iter()
                                .map(|&v| v as i64)
                                .collect(),
                        },
                        DType::F32 => ConstValue::FloatTensor {
                            sizes,
                            data: std::slice::from_raw_parts(ptr as *const f32, n).to_vec(),
                        },
                        DType::F16 => ConstValue::FloatTensor {
                            sizes,
                            data: std::slice::from_raw_parts(ptr as *const f16, n)
                                .iter()
                                .map(|v| v.to_f32())
                                .collect(),
                        },
                        DType::BF16 => ConstValue::FloatTensor {
                            sizes,
                            data: std::slice::from_raw_parts(ptr as *const bf16, n)
                                .iter()
                                .map(|v| v.to_f32())
                                .collect(),
                        },
                        other => ConstValue::Other(format!("{other:?} tensor")),
                    }
                }
            }
            other => ConstValue::Other(format!("{other:?}")),
        })
    }

    /// Runs `method` on `inputs` and returns views of its outputs, valid until the next
    /// call on this program. The input buffers are read in place. Outputs in f16 or bf16
    /// are widened to f32 into buffers kept from step to step (see [`TensorData`]).
    pub(crate) fn execute(
        &mut self,
        method: &str,
        inputs: &[TensorView<'_>],
    ) -> Result<Vec<TensorView<'_>>> {
        let mut ptrs = Vec::with_capacity(inputs.len());
        for (i, t) in inputs.iter().enumerate() {
            let numel: usize = t.sizes.iter().product();
            let len = match t.data {
                TensorData::F32(v) => v.len(),
                TensorData::I64(v) => v.len(),
                TensorData::I32(v) => v.len(),
                TensorData::F16(v) => v.len(),
                TensorData::BF16(v) => v.len(),
                TensorData::Bytes(DType::U8, v) => v.len(),
                TensorData::Bytes(dtype, _) => {
                    return Err(Error::IoManager(format!(
                        "input {i} of `{method}` is {dtype:?}; inputs must be f32, f16, bf16, \
                         i64, i32 or u8"
                    )))
                }
            };
            if numel != len || t.sizes.iter().any(|&s| s > i32::MAX as usize) {
                return Err(Error::IoManager(format!(
                    "input {i} of `{method}`: sizes {:?} do not match its {len} elements",
                    t.sizes
                )));
            }
            let sizes = t.sizes.iter().map(|&s| s as i32);
            // Safety (`sizes`): the sizes cover exactly the slice's elements (checked above)
            // and the layout is contiguous; the slice outlives the call.
            let ptr = unsafe {
                match t.data {
                    TensorData::F32(v) => TensorPtrBuilder::<View<f32>>::from_slice(v)
                        .sizes(sizes)
                        .build()
                        .map(InputPtr::F32),
                    TensorData::I64(v) => TensorPtrBuilder::<View<i64>>::from_slice(v)
                        .sizes(sizes)
                        .build()
                        .map(InputPtr::I64),
                    TensorData::I32(v) => TensorPtrBuilder::<View<i32>>::from_slice(v)
                        .sizes(sizes)
                        .build()
                        .map(InputPtr::I32),
                    TensorData::F16(v) => TensorPtrBuilder::<View<f16>>::from_slice(v)
                        .sizes(sizes)
                        .build()
                        .map(InputPtr::F16),
                    TensorData::BF16(v) => TensorPtrBuilder::<View<bf16>>::from_slice(v)
                        .sizes(sizes)
                        .build()
                        .map(InputPtr::BF16),
                    TensorData::Bytes(_, v) => TensorPtrBuilder::<View<u8>>::from_slice(v)
                        .sizes(sizes)
                        .build()
                        .map(InputPtr::U8),
                }
            }
            .map_err(|e| runtime_error(format!("building an input for `{method}`"), e))?;
            ptrs.push(ptr);
        }
        let evalues: Vec<EValue> = ptrs
            .iter()
            .map(|p| match p {
                InputPtr::F32(p) => EValue::new(p),
                InputPtr::I64(p) => EValue::new(p),
                InputPtr::I32(p) => EValue::new(p),
                InputPtr::F16(p) => EValue::new(p),
                InputPtr::BF16(p) => EValue::new(p),
                InputPtr::U8(p) => EValue::new(p),
            })
            .collect();
        clear_log();
        let outputs = self
            .module
            .execute(method, &evalues)
            .map_err(|e| runtime_error(format!("executing `{method}`"), e))?;
        drop(evalues);
        drop(ptrs);
        if self.widened.len() < outputs.len() {
            self.widened.resize_with(outputs.len(), Vec::new);
        }
        let mut views = Vec::with_capacity(outputs.len());
        for ((i, value), widened) in outputs.iter().enumerate().zip(self.widened.iter_mut()) {
            if value.tag() != Tag::Tensor {
                return Err(Error::UnsupportedModel(format!(
                    "output {i} of `{method}` is a {:?}, not a tensor",
                    value.tag()
                )));
            }
            let t = value.as_tensor();
            let sizes: Vec<usize> = t.sizes().iter().map(|&s| s.max(0) as usize).collect();
            let n = t.numel();
            let ptr = t.as_data_ptr_raw();
            let dtype = dtype_of(t.scalar_type());
            // Safety: the output tensors' buffers belong to the method's memory plan, which
            // lives as long as `self.module` and is only rewritten by the next `execute`,
            // which needs `&mut self` and so ends these borrows first. The widened buffers
            // are only written here, under the same `&mut self`.
            let data = unsafe {
                match dtype {
                    DType::F32 => TensorData::F32(std::slice::from_raw_parts(ptr as *const f32, n)),
                    DType::I64 => TensorData::I64(std::slice::from_raw_parts(ptr as *const i64, n)),
                    DType::I32 => TensorData::I32(std::slice::from_raw_parts(ptr as *const i32, n)),
                    DType::F16 => TensorData::F32(crate::tensor::widen_f16(
                        std::slice::from_raw_parts(ptr as *const f16, n),
                        widened,
                    )),
                    DType::BF16 => TensorData::F32(crate::tensor::widen_bf16(
                        std::slice::from_raw_parts(ptr as *const bf16, n),
                        widened,
                    )),
                    other => TensorData::Bytes(
                        other,
                        std::slice::from_raw_parts(ptr as *const u8, n * other.size()),
                    ),
                }
            };
            views.push(TensorView { sizes, data });
        }
        Ok(views)
    }
}

/// How many of a method's planned buffers are shared between methods when they share
/// arenas: mem_id 1 and 2, as upstream's `Module` shares them.
const SHARED_ARENAS: usize = 2;

/// Alignment of the planned buffers (ExecuTorch's own come from `std::vector`, at least
/// 16; XNNPACK prefers 64).
const ARENA_ALIGN: usize = 64;

/// One zero-filled, aligned heap buffer.
struct Arena {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

impl Arena {
    fn new(len: usize) -> Self {
        if len == 0 {
            return Arena {
                ptr: std::ptr::NonNull::<u8>::dangling(),
                len: 0,
            };
        }
        let layout = std::alloc::Layout::from_size_align(len, ARENA_ALIGN)
            .expect("size checked against physical memory");
        // Safety: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Arena { ptr, len }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        if self.len > 0 {
            // Safety: allocated in `new` with this layout.
            unsafe {
                std::alloc::dealloc(
                    self.ptr.as_ptr(),
                    std::alloc::Layout::from_size_align_unchecked(self.len, ARENA_ALIGN),
                )
            }
        }
    }
}

/// The allocator a method was loaded with, and the spans it reads: both must stay where
/// they are while the method lives.
struct MethodPlan {
    allocator: Box<HierarchicalAllocator<'static>>,
    _spans: Box<[Span<'static, u8>]>,
}

/// Every planned buffer of the program's loaded methods. Methods that share arenas (a
/// prefill/decode pair exported with `share_mutable_buffers`) use the same first
/// [`SHARED_ARENAS`] buffers, sized for the largest method, as upstream's `Module` does.
#[derive(Default)]
struct PlannedMemory {
    share: bool,
    /// Declared before `arenas`: the plans point into them.
    plans: Vec<MethodPlan>,
    arenas: Vec<Arena>,
    /// Indices in `arenas` of the shared buffers, once made.
    shared: Vec<usize>,
    /// Indices in `arenas` of the buffers that hold state, in load order, without repeats.
    state: Vec<usize>,
}

// Safety: the arenas are plain heap memory owned here; the allocators only point into
// them. The whole is moved between threads with its `Program`, never shared.
unsafe impl Send for PlannedMemory {}

impl PlannedMemory {
    /// Allocates buffers of `sizes` for one method (reusing the shared ones) and returns
    /// the allocator to load it with, valid as long as `self`.
    fn allocator_for(
        &mut self,
        sizes: &[usize],
        state: bool,
    ) -> &'static mut HierarchicalAllocator<'static> {
        let mut indices = Vec::with_capacity(sizes.len());
        for (i, &size) in sizes.iter().enumerate() {
            let index = if self.share && i < SHARED_ARENAS {
                match self.shared.get(i) {
                    Some(&index) => index,
                    None => {
                        self.arenas.push(Arena::new(size));
                        self.shared.push(self.arenas.len() - 1);
                        self.arenas.len() - 1
                    }
                }
            } else {
                self.arenas.push(Arena::new(size));
                self.arenas.len() - 1
            };
            if state && self.arenas[index].len > 0 && !self.state.contains(&index) {
                self.state.push(index);
            }
            indices.push(index);
        }
        let mut spans: Box<[Span<'static, u8>]> = indices
            .iter()
            .map(|&index| {
                let arena = &self.arenas[index];
                // Safety: the arena lives as long as `self`, and `self` outlives the
                // module's methods (see `Program`'s field order). The runtime writes it
                // only while a method executes, under `&mut Program`.
                Span::from_slice(unsafe {
                    std::slice::from_raw_parts_mut(arena.ptr.as_ptr(), arena.len)
                })
            })
            .collect();
        // Safety: the spans are boxed (fixed address) and kept in `plans` with the
        // allocator; their 'static lifetime stands for "as long as this Program".
        let spans_ref: &'static mut [Span<'static, u8>] =
            unsafe { &mut *(spans.as_mut() as *mut [Span<'static, u8>]) };
        let allocator = Box::new(HierarchicalAllocator::new(spans_ref));
        self.plans.push(MethodPlan {
            allocator,
            _spans: spans,
        });
        let plan = self.plans.last_mut().expect("pushed");
        // Safety: the allocator is boxed (fixed address) and lives in `plans` as long as
        // `self`; only the module uses it from here on.
        unsafe { &mut *(plan.allocator.as_mut() as *mut HierarchicalAllocator<'static>) }
    }

    fn state_arenas(&self) -> Vec<&[u8]> {
        self.state
            .iter()
            .map(|&i| {
                let a = &self.arenas[i];
                // Safety: see `allocator_for`; no method runs while `self` is borrowed.
                unsafe { std::slice::from_raw_parts(a.ptr.as_ptr(), a.len) }
            })
            .collect()
    }

    fn state_arenas_mut(&mut self) -> Vec<&mut [u8]> {
        self.state
            .iter()
            .map(|&i| {
                let a = &self.arenas[i];
                // Safety: as above; the indices in `state` are distinct, so the slices do
                // not overlap.
                unsafe { std::slice::from_raw_parts_mut(a.ptr.as_ptr(), a.len) }
            })
            .collect()
    }
}

/// A file mapped read-only into memory (its pages come from the page cache, without a
/// copy). Reads through it see the file as it was when mapped, unless another process
/// truncates it meanwhile (then reading past the new end would fault): so it is only used
/// for files EtLlm reads at once and lets go, like saved session states.
pub(crate) struct MappedFile {
    ptr: *mut libc::c_void,
    len: usize,
}

// Safety: a read-only mapping owned here; it is only read.
unsafe impl Send for MappedFile {}

impl MappedFile {
    /// Maps the whole file at `path`.
    pub(crate) fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(path)?;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| std::io::Error::other("the file is too large to map"))?;
        if len == 0 {
            return Ok(MappedFile {
                ptr: std::ptr::null_mut(),
                len: 0,
            });
        }
        // Safety: a fresh private read-only mapping of an open file; the descriptor may
        // close afterwards (the mapping keeps the file).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(MappedFile { ptr, len })
    }
}

impl std::ops::Deref for MappedFile {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // Safety: `len` bytes are mapped readable at `ptr` until drop.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if self.len > 0 {
            // Safety: mapped in `open` with this length.
            unsafe {
                libc::munmap(self.ptr, self.len);
            }
        }
    }
}

/// The most memory this process can allocate, in bytes: the machine's physical memory, or
/// the process's address-space or data limit (`RLIMIT_AS`, `RLIMIT_DATA`) when lower
/// (unbounded when the system says none of these).
fn physical_memory() -> u128 {
    // Safety: sysconf and getrlimit only read system configuration into a local struct.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let mut limit = if pages > 0 && page_size > 0 {
        pages as u128 * page_size as u128
    } else {
        u128::MAX
    };
    for resource in [libc::RLIMIT_AS, libc::RLIMIT_DATA] {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // Safety: `rl` is a valid rlimit for getrlimit to fill.
        if unsafe { libc::getrlimit(resource, &mut rl) } == 0 && rl.rlim_cur != libc::RLIM_INFINITY
        {
            limit = limit.min(rl.rlim_cur as u128);
        }
    }
    limit
}

/// Reads the method names of the program at `path` through ExecuTorch's `Program`, whose
/// accessor reports a name that is not UTF-8 as an error. (`Module::method_names()` of the
/// `executorch` crate builds Rust strings in C++ and aborts the process on such a name.)
/// Names are sorted; an empty name or a duplicate is refused too.
fn read_method_names(path: &Path) -> std::result::Result<Vec<String>, String> {
    use executorch::data_loader::{MlockConfig, MmapDataLoader};
    clear_log();
    let loader = MmapDataLoader::from_path(path, Some(MlockConfig::NoMlock))
        .map_err(|e| format!("cannot map it ({e:?}){}", take_log()))?;
    let program =
        executorch::program::Program::load(&loader, Some(ProgramVerification::InternalConsistency))
            .map_err(|e| format!("ExecuTorch cannot load it ({e:?}){}", take_log()))?;
    let mut names = Vec::with_capacity(program.num_methods());
    for i in 0..program.num_methods() {
        match program.get_method_name(i) {
            Ok("") => return Err(format!("method {i} has an empty name")),
            Ok(name) => names.push(name.to_string()),
            Err(executorch::Error::InvalidString) => {
                return Err(format!("the name of method {i} is not valid UTF-8"))
            }
            Err(e) => return Err(format!("cannot read the name of method {i} ({e:?})")),
        }
    }
    names.sort();
    if let Some(dup) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("two methods are named `{}`", dup[0]));
    }
    Ok(names)
}

fn dtype_of(s: ScalarType) -> DType {
    match s {
        ScalarType::Float => DType::F32,
        ScalarType::Half => DType::F16,
        ScalarType::BFloat16 => DType::BF16,
        ScalarType::Double => DType::F64,
        ScalarType::Long => DType::I64,
        ScalarType::Int => DType::I32,
        ScalarType::Short => DType::I16,
        ScalarType::Char => DType::I8,
        ScalarType::Byte => DType::U8,
        ScalarType::Bool => DType::Bool,
        _ => DType::Other,
    }
}

mod ptd;

#[cfg(test)]
mod llama_ops_kernel_tests;
#[cfg(test)]
mod llama_ops_tests;
