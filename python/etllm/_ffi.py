"""ctypes declarations of the EtLlm C ABI (include/etllm.h).

This is the only module that touches raw pointers. The library is loaded by absolute path
from ``etllm/_lib/libetllm.so`` (bundled by the install; the ExecuTorch runtime libraries
sit beside it and are found through its ``$ORIGIN`` RUNPATH). ``ETLLM_LIBRARY`` may point
at another ``libetllm.so`` (for development); it is never needed after an install.
"""

from __future__ import annotations

import ctypes
import os
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char,
    c_char_p,
    c_float,
    c_int32,
    c_int64,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
)

MAX_DIMS = 8

# etllm_dtype
DTYPE_F32 = 0
DTYPE_I64 = 1
DTYPE_I32 = 2
DTYPE_OTHER = 3
DTYPE_F16 = 4
DTYPE_BF16 = 5

# etllm_input_kind
INPUT_TEXT = 0
INPUT_TOKENS = 1
INPUT_IMAGE_FILE = 2
INPUT_IMAGE_ENCODED = 3
INPUT_IMAGE_PIXELS = 4
INPUT_AUDIO_FILE = 5
INPUT_AUDIO_SAMPLES = 6
INPUT_FEATURES = 7


def _library_path() -> str:
    override = os.environ.get("ETLLM_LIBRARY")
    if override:
        return os.path.abspath(override)
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lib", "libetllm.so")


class GenerationConfigC(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("echo", c_bool),
        ("warming", c_bool),
        ("ignore_eos", c_bool),
        ("has_seed", c_bool),
        ("max_new_tokens", c_int32),
        ("seq_len", c_int32),
        ("temperature", c_float),
        ("num_bos", c_int32),
        ("num_eos", c_int32),
        ("seed", c_uint64),
        ("stop_token_ids", POINTER(c_uint32)),
        ("num_stop_token_ids", c_size_t),
        ("top_k", c_int32),
        ("top_p", c_float),
        ("min_p", c_float),
        ("repetition_penalty", c_float),
        ("stop_strings", POINTER(c_char_p)),
        ("num_stop_strings", c_size_t),
        ("grammar", c_char_p),
        ("grammar_type", c_char_p),
        ("grammar_no_fast_forward", c_bool),
        ("reuse_prefix", c_bool),
    ]


class StatsC(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("stop_reason", c_int32),
        ("model_load_start_us", c_uint64),
        ("model_load_end_us", c_uint64),
        ("inference_start_us", c_uint64),
        ("token_encode_end_us", c_uint64),
        ("prompt_eval_end_us", c_uint64),
        ("first_token_us", c_uint64),
        ("inference_end_us", c_uint64),
        ("aggregate_sampling_time_us", c_uint64),
        ("aggregate_model_execution_time_us", c_uint64),
        ("num_prompt_tokens", c_uint64),
        ("num_generated_tokens", c_uint64),
        ("decode_model_execution_time_us", c_uint64),
        ("reused_prompt_tokens", c_uint64),
    ]


class TensorViewC(Structure):
    _fields_ = [
        ("dtype", c_int32),
        ("ndim", c_uint32),
        ("sizes", c_int64 * MAX_DIMS),
        ("data", c_void_p),
        ("nbytes", c_size_t),
    ]


class StepC(Structure):
    _fields_ = [
        ("method", c_char_p),
        ("inputs", POINTER(TensorViewC)),
        ("num_inputs", c_size_t),
    ]


class ModelMetadataC(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("max_seq_len", c_int64),
        ("max_context_len", c_int64),
        ("vocab_size", c_int64),
        ("bos_id", c_int64),
        ("use_kv_cache", c_bool),
        ("enable_dynamic_shape", c_bool),
    ]


class ChatMessageC(Structure):
    _fields_ = [("role", c_char_p), ("content", c_char_p)]


TOKEN_CB = CFUNCTYPE(c_int32, c_void_p, POINTER(c_char), c_size_t, c_int64)
STATS_CB = CFUNCTYPE(None, c_void_p, POINTER(StatsC))

# etllm_io_manager functions (status returned as a plain int32).
LOAD_FN = CFUNCTYPE(c_int32, c_void_p, c_void_p, POINTER(c_int64), POINTER(c_int64))
RESET_FN = CFUNCTYPE(c_int32, c_void_p)
REWIND_FN = CFUNCTYPE(c_int32, c_void_p, c_int64)
PREPARE_PREFILL_FN = CFUNCTYPE(
    c_int32, c_void_p, POINTER(c_uint64), c_size_t, c_int64, POINTER(StepC)
)
UPDATE_FN = CFUNCTYPE(
    c_int32, c_void_p, POINTER(TensorViewC), c_size_t, POINTER(c_void_p), POINTER(c_size_t)
)
PREPARE_DECODE_FN = CFUNCTYPE(c_int32, c_void_p, c_uint64, c_int64, POINTER(StepC))
DESTROY_FN = CFUNCTYPE(None, c_void_p)
SAVE_STATE_FN = CFUNCTYPE(c_int32, c_void_p, c_void_p)  # (user_data, etllm_state_buffer *)
RESTORE_STATE_FN = CFUNCTYPE(c_int32, c_void_p, c_void_p, c_size_t)  # (user_data, data, len)


class IoManagerC(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("user_data", c_void_p),
        ("load", LOAD_FN),
        ("reset", RESET_FN),
        ("rewind", REWIND_FN),
        ("prepare_prefill", PREPARE_PREFILL_FN),
        ("update_prefill", UPDATE_FN),
        ("prepare_decode", PREPARE_DECODE_FN),
        ("update_decode", UPDATE_FN),
        ("destroy", DESTROY_FN),
        ("save_state", SAVE_STATE_FN),
        ("restore_state", RESTORE_STATE_FN),
    ]


class RunnerOptionsC(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("num_threads", c_uint32),
        ("io_manager", POINTER(IoManagerC)),
        ("preset", c_int32),
        ("data_paths", POINTER(c_char_p)),
        ("num_data_paths", c_size_t),
        ("method_name", c_char_p),
        ("preprocessor_config", c_char_p),
    ]


class InputC(Structure):
    """etllm_input. Arrays of it are read with a stride of ``struct_size``: set it to
    ``ctypes.sizeof(InputC)``."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("kind", c_int32),
        ("text", c_char_p),
        ("path", c_char_p),
        ("tokens", POINTER(c_uint32)),
        ("num_tokens", c_size_t),
        ("bytes", POINTER(ctypes.c_uint8)),
        ("num_bytes", c_size_t),
        ("width", c_uint32),
        ("height", c_uint32),
        ("channels", c_uint32),
        ("sample_rate", c_uint32),
        ("floats", POINTER(c_float)),
        ("num_floats", c_size_t),
        ("sizes", POINTER(c_size_t)),
        ("num_sizes", c_size_t),
    ]


class AsrOptionsC(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("num_threads", c_uint32),
        ("preprocessor_config", c_char_p),
        ("data_paths", POINTER(c_char_p)),
        ("num_data_paths", c_size_t),
    ]


class TranscribeOptionsC(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("translate", c_bool),
        ("language", c_char_p),
        ("decoder_prompt", POINTER(c_uint32)),
        ("num_decoder_prompt", c_size_t),
    ]


class ServerOptionsC(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("port", ctypes.c_uint16),
        ("log_requests", c_bool),
        ("host", c_char_p),
        ("parallel", c_uint32),
        ("queue_size", c_uint32),
        ("context_length", c_uint32),
        ("shutdown_timeout_ms", c_uint32),
        ("max_body_bytes", ctypes.c_uint64),
        ("api_key", c_char_p),
        ("model_name", c_char_p),
    ]


lib = ctypes.CDLL(_library_path())

_S = c_int32  # etllm_status
_P = c_void_p  # opaque handles


def _fn(name: str, restype, *argtypes) -> None:
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)


_fn("etllm_version", c_char_p)
_fn("etllm_executorch_version", c_char_p)
_fn("etllm_string_free", None, c_void_p)
_fn("etllm_buffer_free", None, c_void_p)
_fn("etllm_last_error_message", c_char_p)
_fn("etllm_status_name", c_char_p, c_int32)
_fn("etllm_set_error_message", None, c_char_p)
_fn("etllm_generation_config_default", GenerationConfigC)
_fn("etllm_runner_options_default", RunnerOptionsC)
_fn("etllm_stats_default", StatsC)
_fn("etllm_stats_to_json", _S, POINTER(StatsC), POINTER(c_void_p))

# Runner
_fn("etllm_runner_new", _S, c_char_p, c_char_p, POINTER(RunnerOptionsC), POINTER(_P))
_fn("etllm_runner_open", _S, c_char_p, c_char_p, POINTER(RunnerOptionsC), POINTER(_P))
_fn("etllm_runner_load", _S, _P)
_fn("etllm_runner_is_loaded", _S, _P, POINTER(c_bool))
_fn("etllm_runner_free", None, _P)
_fn(
    "etllm_runner_generate", _S, _P, c_char_p, POINTER(GenerationConfigC), TOKEN_CB, STATS_CB,
    c_void_p, POINTER(StatsC),
)
_fn(
    "etllm_runner_generate_tokens", _S, _P, POINTER(c_uint32), c_size_t,
    POINTER(GenerationConfigC), TOKEN_CB, STATS_CB, c_void_p, POINTER(StatsC),
)
_fn("etllm_runner_prefill", _S, _P, c_char_p, POINTER(GenerationConfigC), POINTER(StatsC))
_fn(
    "etllm_runner_prefill_tokens", _S, _P, POINTER(c_uint32), c_size_t,
    POINTER(GenerationConfigC), POINTER(StatsC),
)
_fn("etllm_runner_stop", _S, _P)
_fn("etllm_runner_rewind", _S, _P, c_int64)
_fn("etllm_runner_warmup", _S, _P)
_fn("etllm_runner_reset", _S, _P)
_fn("etllm_runner_max_context_len", _S, _P, POINTER(c_int64))
_fn("etllm_runner_max_seq_len", _S, _P, POINTER(c_int64))
_fn("etllm_runner_vocab_size", _S, _P, POINTER(c_int64))
_fn("etllm_runner_bos_id", _S, _P, POINTER(c_uint32))
_fn("etllm_runner_eos_ids", _S, _P, POINTER(c_uint32), c_size_t, POINTER(c_size_t))
_fn("etllm_runner_position", _S, _P, POINTER(c_int64))

# The HTTP server
_fn("etllm_server_options_default", ServerOptionsC)
_fn("etllm_server_start", _S, _P, POINTER(ServerOptionsC), POINTER(_P))
_fn("etllm_server_port", ctypes.c_uint16, _P)
_fn("etllm_server_stop", _S, _P)
_fn("etllm_server_free", None, _P)

# Sessions (byte buffers in: c_char_p with a length; out: a library buffer, take_bytes)
_fn("etllm_session_new", _S, _P, POINTER(_P))
_fn("etllm_session_free", None, _P)
_fn(
    "etllm_session_generate", _S, _P, c_char_p, POINTER(GenerationConfigC), TOKEN_CB, STATS_CB,
    c_void_p, POINTER(StatsC),
)
_fn(
    "etllm_session_generate_tokens", _S, _P, POINTER(c_uint32), c_size_t,
    POINTER(GenerationConfigC), TOKEN_CB, STATS_CB, c_void_p, POINTER(StatsC),
)
_fn("etllm_session_prefill", _S, _P, c_char_p, POINTER(GenerationConfigC), POINTER(StatsC))
_fn(
    "etllm_session_prefill_tokens", _S, _P, POINTER(c_uint32), c_size_t,
    POINTER(GenerationConfigC), POINTER(StatsC),
)
_fn("etllm_session_stop", _S, _P)
_fn("etllm_session_rewind", _S, _P, c_int64)
_fn("etllm_session_reset", _S, _P)
_fn("etllm_session_position", _S, _P, POINTER(c_int64))
_fn("etllm_session_tokens", _S, _P, POINTER(c_uint32), c_size_t, POINTER(c_size_t))
_fn(
    "etllm_session_save_state", _S, _P, c_char_p, c_size_t, POINTER(c_void_p), POINTER(c_size_t)
)
_fn(
    "etllm_session_load_state", _S, _P, c_char_p, c_size_t, POINTER(c_void_p), POINTER(c_size_t)
)
_fn("etllm_session_save_state_file", _S, _P, c_char_p, c_char_p, c_size_t)
_fn("etllm_session_load_state_file", _S, _P, c_char_p, POINTER(c_void_p), POINTER(c_size_t))

# Model info (inside an io manager's load)
_fn("etllm_model_info_num_methods", _S, _P, POINTER(c_size_t))
_fn("etllm_model_info_method_name", _S, _P, c_size_t, POINTER(c_char_p))
_fn("etllm_model_info_method", _S, _P, c_char_p, POINTER(c_size_t), POINTER(c_size_t))
_fn("etllm_model_info_input", _S, _P, c_char_p, c_size_t, POINTER(TensorViewC))
_fn("etllm_model_info_output", _S, _P, c_char_p, c_size_t, POINTER(TensorViewC))
_fn(
    "etllm_model_info_constant_ints", _S, _P, c_char_p, POINTER(c_int64), c_size_t,
    POINTER(c_size_t),
)
_fn(
    "etllm_model_info_constant_floats", _S, _P, c_char_p, POINTER(c_float), c_size_t,
    POINTER(c_size_t),
)
_fn("etllm_model_info_constant_shape", _S, _P, c_char_p, POINTER(c_int64), POINTER(c_uint32))
_fn("etllm_model_info_metadata", _S, _P, POINTER(ModelMetadataC))

# Saved states of io managers
_fn("etllm_state_buffer_new", _S, POINTER(_P))
_fn("etllm_state_buffer_append", _S, _P, c_void_p, c_size_t)
_fn("etllm_state_buffer_data", _S, _P, POINTER(c_void_p), POINTER(c_size_t))
_fn("etllm_state_buffer_free", None, _P)

# Tokenizer
_fn("etllm_tokenizer_load", _S, c_char_p, c_int32, POINTER(_P))
_fn("etllm_tokenizer_free", None, _P)
_fn(
    "etllm_tokenizer_encode", _S, _P, c_char_p, c_uint32, c_uint32, POINTER(POINTER(c_uint32)),
    POINTER(c_size_t),
)
_fn(
    "etllm_tokenizer_decode", _S, _P, POINTER(c_uint32), c_size_t, POINTER(c_void_p),
    POINTER(c_size_t),
)
_fn("etllm_tokenizer_token_to_piece", _S, _P, c_uint32, POINTER(c_void_p), POINTER(c_size_t))
_fn("etllm_tokenizer_vocab_size", _S, _P, POINTER(c_size_t))
_fn("etllm_tokenizer_bos_id", _S, _P, POINTER(c_uint32))
_fn("etllm_tokenizer_eos_ids", _S, _P, POINTER(POINTER(c_uint32)), POINTER(c_size_t))
_fn("etllm_text_stream_new", _S, _P, POINTER(_P))
_fn("etllm_text_stream_push", _S, _P, c_uint32, POINTER(c_void_p), POINTER(c_size_t))
_fn("etllm_text_stream_flush", _S, _P, POINTER(c_void_p), POINTER(c_size_t))
_fn("etllm_text_stream_free", None, _P)

# Chat
_fn("etllm_chat_template_new", _S, c_char_p, POINTER(_P))
_fn("etllm_chat_template_llama3", _S, POINTER(_P))
_fn("etllm_chat_template_llama2", _S, POINTER(_P))
_fn("etllm_chat_template_from_model_dir", _S, c_char_p, POINTER(_P))
_fn("etllm_chat_template_set_token", _S, _P, c_char_p, c_char_p)
_fn(
    "etllm_chat_template_apply", _S, _P, POINTER(ChatMessageC), c_size_t, c_bool,
    POINTER(c_void_p),
)
_fn("etllm_chat_template_free", None, _P)
_fn("etllm_runner_set_chat_template", _S, _P, _P)
_fn(
    "etllm_runner_apply_chat_template", _S, _P, POINTER(ChatMessageC), c_size_t, c_bool,
    POINTER(c_void_p),
)
_fn("etllm_conversation_new", _S, _P, _P, POINTER(_P))
_fn("etllm_conversation_set_system", _S, _P, c_char_p)
_fn(
    "etllm_conversation_send", _S, _P, _P, c_char_p, POINTER(GenerationConfigC), TOKEN_CB,
    STATS_CB, c_void_p, POINTER(StatsC),
)
_fn("etllm_conversation_rewind", _S, _P, _P, POINTER(c_bool))
_fn("etllm_conversation_reset", _S, _P, _P)
_fn("etllm_conversation_num_messages", _S, _P, POINTER(c_size_t))
_fn("etllm_conversation_message", _S, _P, c_size_t, POINTER(c_void_p), POINTER(c_void_p))
_fn(
    "etllm_conversation_send_session", _S, _P, _P, c_char_p, POINTER(GenerationConfigC),
    TOKEN_CB, STATS_CB, c_void_p, POINTER(StatsC),
)
_fn("etllm_conversation_rewind_session", _S, _P, _P, POINTER(c_bool))
_fn("etllm_conversation_reset_session", _S, _P, _P)
_fn("etllm_conversation_to_json", _S, _P, POINTER(c_void_p))
_fn("etllm_conversation_from_json", _S, _P, _P, c_char_p, POINTER(_P))
_fn("etllm_conversation_free", None, _P)

# Multimodal inputs
_fn("etllm_input_default", InputC)
for _owner in ("runner", "session"):
    _fn(
        f"etllm_{_owner}_generate_inputs", _S, _P, POINTER(InputC), c_size_t,
        POINTER(GenerationConfigC), TOKEN_CB, STATS_CB, c_void_p, POINTER(StatsC),
    )
    _fn(
        f"etllm_{_owner}_prefill_inputs", _S, _P, POINTER(InputC), c_size_t,
        POINTER(GenerationConfigC), POINTER(StatsC),
    )

# Speech to text
_fn("etllm_asr_options_default", AsrOptionsC)
_fn("etllm_transcribe_options_default", TranscribeOptionsC)
_fn("etllm_asr_open", _S, c_char_p, c_char_p, POINTER(AsrOptionsC), POINTER(_P))
_fn("etllm_asr_free", None, _P)
_fn("etllm_asr_stop", _S, _P)
_fn(
    "etllm_asr_transcribe", _S, _P, POINTER(InputC), POINTER(TranscribeOptionsC),
    POINTER(GenerationConfigC), TOKEN_CB, c_void_p, POINTER(c_void_p),
    POINTER(POINTER(c_uint32)), POINTER(c_size_t), POINTER(StatsC),
)


def take_bytes(ptr: c_void_p, length: int) -> bytes:
    """Copies a library-allocated buffer of ``length`` bytes and frees it (etllm_buffer_free)."""
    if not ptr.value:
        return b""
    try:
        return ctypes.string_at(ptr.value, length)
    finally:
        lib.etllm_buffer_free(ptr)


def take_string(ptr: c_void_p) -> str:
    """Copies a library-allocated NUL-terminated string and frees it (etllm_string_free)."""
    if not ptr.value:
        return ""
    try:
        return ctypes.string_at(ptr.value).decode("utf-8")
    finally:
        lib.etllm_string_free(ptr)
