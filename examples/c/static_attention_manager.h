/*
 * A KV-cache manager written in C for static-attention exports (the layout of
 * tests/fixtures/static_attention/README.md, upstream's static_attention.py): the model
 * never stores its KV cache; every layer's k and v cache is an explicit method input and
 * each call returns the new cache rows. This manager owns the caches, the attention mask
 * and the RoPE rows, and reads the whole layout from the model through etllm_model_info:
 *
 *   constant methods  cache_len, head_dim, freqs_cos, freqs_sin,
 *                     {forward,prefill}_input_specs   (or input_specs),
 *                     {forward,prefill}_kv_cache_specs (or kv_cache_specs)
 *   methods           forward (decode, L = 1), prefill (optional, prompts in chunks of L)
 *
 * Behaviour (the same as EtLlm's built-in StaticAttention manager):
 * - ring buffer: position p lives in cache slot p mod cache_len; buffers never move;
 * - prompts go through `prefill` in chunks of its input length; the last chunk is padded
 *   (token 0, cos 1 / sin 0) and last_valid_token_pos marks its last real token;
 * - decode goes through `forward`;
 * - past cache_len the window slides: each token attends to the last cache_len positions
 *   plus the tokens of its own call; positions stop at the RoPE table's length;
 * - rewind keeps the first `pos` positions (refused once the window has slid), reset
 *   forgets everything;
 * - save_state writes the position and the filled cache slots behind a header (tag
 *   "exSA", version, cache layout); restore_state refuses a state of another layout, a
 *   truncated or a foreign one, and then keeps its own;
 * - a layout that does not fit is refused in load with a message saying what is wrong.
 *
 * Use:
 *
 *   etllm_io_manager manager = example_static_attention_manager();
 *   etllm_runner_options options = etllm_runner_options_default();
 *   options.io_manager = &manager;       // the runner owns it from here on, whatever happens
 *   etllm_runner_open(model, tokenizer, &options, &runner);
 */
#ifndef EXAMPLE_STATIC_ATTENTION_MANAGER_H
#define EXAMPLE_STATIC_ATTENTION_MANAGER_H

#include <etllm.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A filled-in vtable whose user_data is a new, unloaded manager. Hand it to exactly one
 * runner (etllm_runner_options.io_manager): the runner calls its destroy, which frees it.
 * Should the allocation fail, user_data is NULL and load reports it. */
etllm_io_manager example_static_attention_manager(void);

#ifdef __cplusplus
}
#endif

#endif /* EXAMPLE_STATIC_ATTENTION_MANAGER_H */
