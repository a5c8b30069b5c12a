/* A KV-cache manager (etllm_io_manager) for tests: it wraps another manager, forwards every
 * call to it, counts the calls, and on command makes one callback fail instead (with
 * etllm_set_error_message(faulty_message(point)) and ETLLM_ERR_IO_MANAGER). It has
 * save_state and restore_state when the wrapped manager has them. Its destroy counts itself
 * in faulty_destroy_calls, then destroys the wrapped manager. */
#ifndef ETLLM_FAULTY_MANAGER_H
#define ETLLM_FAULTY_MANAGER_H

#include <stddef.h>

#include "etllm.h"

typedef enum faulty_point {
  FAULTY_LOAD,
  FAULTY_RESET,
  FAULTY_REWIND,
  FAULTY_PREPARE_PREFILL,
  FAULTY_UPDATE_PREFILL,
  FAULTY_PREPARE_DECODE,
  FAULTY_UPDATE_DECODE,
  FAULTY_SAVE_STATE,
  FAULTY_RESTORE_STATE,
  FAULTY_NUM_POINTS
} faulty_point;

/* What a test controls and observes. It lives in the manager's user_data: valid until the
 * runner that owns the manager calls destroy. */
typedef struct faulty_control {
  /* Set arm[p] to make the next call of p fail; it disarms itself when it fires. */
  int arm[FAULTY_NUM_POINTS];
  /* Calls made to each function (failed ones included). */
  size_t calls[FAULTY_NUM_POINTS];
} faulty_control;

/* Wraps `inner` (whose ownership passes to the new manager). *out_control, when not NULL,
 * receives the control block. */
etllm_io_manager faulty_manager(etllm_io_manager inner, faulty_control **out_control);

/* The message a failure injected at `point` sets, e.g. "injected failure in update_decode". */
const char *faulty_message(faulty_point point);
/* The callback's name, e.g. "update_decode". */
const char *faulty_point_name(faulty_point point);
/* The point called `name`, or FAULTY_NUM_POINTS. */
faulty_point faulty_point_named(const char *name);

/* How many times any faulty manager's destroy has run in this process. */
extern int faulty_destroy_calls;

#endif /* ETLLM_FAULTY_MANAGER_H */
