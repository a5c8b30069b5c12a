/*
 * A KV-cache manager written in C for the standard export whose KV cache lives inside the
 * model: `forward(tokens[1, seq], input_pos[1])`, or `forward(tokens[1, seq],
 * cache_positions[seq])`, with i64 or i32 integers (the same signatures as EtLlm's
 * built-in KvCacheInModel manager). The cache is state inside the program, so this manager
 * only fills the two inputs and finds the logits of the last token; rewinding only moves
 * the position (the model masks the entries past it and the next steps overwrite them).
 * Its saved state (save_state) is a tag and a version: it keeps nothing else between steps.
 *
 *   etllm_io_manager manager = example_kv_in_model_manager();
 *   options.io_manager = &manager;        // the runner owns it from here on
 */
#ifndef EXAMPLE_KV_IN_MODEL_MANAGER_H
#define EXAMPLE_KV_IN_MODEL_MANAGER_H

#include <etllm.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A filled-in vtable whose user_data is a new, unloaded manager; the runner that receives
 * it frees it through destroy. Should the allocation fail, user_data is NULL and load
 * reports it. */
etllm_io_manager example_kv_in_model_manager(void);

#ifdef __cplusplus
}
#endif

#endif /* EXAMPLE_KV_IN_MODEL_MANAGER_H */
