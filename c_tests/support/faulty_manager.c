#include "faulty_manager.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int faulty_destroy_calls = 0;

typedef struct faulty {
  faulty_control control;
  etllm_io_manager inner;
} faulty;

static const char *const names[FAULTY_NUM_POINTS] = {
    "load",           "reset",          "rewind",       "prepare_prefill",
    "update_prefill", "prepare_decode", "update_decode", "save_state",
    "restore_state",
};

const char *faulty_point_name(faulty_point point) {
  return point < FAULTY_NUM_POINTS ? names[point] : "?";
}

faulty_point faulty_point_named(const char *name) {
  for (int p = 0; p < FAULTY_NUM_POINTS; p++) {
    if (name != NULL && strcmp(names[p], name) == 0) return (faulty_point)p;
  }
  return FAULTY_NUM_POINTS;
}

const char *faulty_message(faulty_point point) {
  static char buf[FAULTY_NUM_POINTS][64];
  if (point >= FAULTY_NUM_POINTS) return "?";
  snprintf(buf[point], sizeof buf[point], "injected failure in %s", names[point]);
  return buf[point];
}

/* Counts the call; true (after setting the message) when it must fail. */
static int fires(faulty *f, faulty_point point) {
  f->control.calls[point]++;
  if (!f->control.arm[point]) return 0;
  f->control.arm[point] = 0;
  etllm_set_error_message(faulty_message(point));
  return 1;
}

static etllm_status f_load(void *ud, const etllm_model_info *model, int64_t *chunk,
                           int64_t *context) {
  faulty *f = ud;
  if (fires(f, FAULTY_LOAD)) return ETLLM_ERR_IO_MANAGER;
  return f->inner.load(f->inner.user_data, model, chunk, context);
}

static etllm_status f_reset(void *ud) {
  faulty *f = ud;
  if (fires(f, FAULTY_RESET)) return ETLLM_ERR_IO_MANAGER;
  return f->inner.reset(f->inner.user_data);
}

static etllm_status f_rewind(void *ud, int64_t pos) {
  faulty *f = ud;
  if (fires(f, FAULTY_REWIND)) return ETLLM_ERR_IO_MANAGER;
  return f->inner.rewind(f->inner.user_data, pos);
}

static etllm_status f_prepare_prefill(void *ud, const uint64_t *tokens, size_t n, int64_t pos,
                                      etllm_step *step) {
  faulty *f = ud;
  if (fires(f, FAULTY_PREPARE_PREFILL)) return ETLLM_ERR_IO_MANAGER;
  return f->inner.prepare_prefill(f->inner.user_data, tokens, n, pos, step);
}

static etllm_status f_update_prefill(void *ud, const etllm_tensor_view *outputs, size_t n,
                                     const float **logits, size_t *vocab) {
  faulty *f = ud;
  if (fires(f, FAULTY_UPDATE_PREFILL)) return ETLLM_ERR_IO_MANAGER;
  return f->inner.update_prefill(f->inner.user_data, outputs, n, logits, vocab);
}

static etllm_status f_prepare_decode(void *ud, uint64_t token, int64_t pos, etllm_step *step) {
  faulty *f = ud;
  if (fires(f, FAULTY_PREPARE_DECODE)) return ETLLM_ERR_IO_MANAGER;
  return f->inner.prepare_decode(f->inner.user_data, token, pos, step);
}

static etllm_status f_update_decode(void *ud, const etllm_tensor_view *outputs, size_t n,
                                    const float **logits, size_t *vocab) {
  faulty *f = ud;
  if (fires(f, FAULTY_UPDATE_DECODE)) return ETLLM_ERR_IO_MANAGER;
  return f->inner.update_decode(f->inner.user_data, outputs, n, logits, vocab);
}

static etllm_status f_save_state(void *ud, etllm_state_buffer *buffer) {
  faulty *f = ud;
  if (fires(f, FAULTY_SAVE_STATE)) return ETLLM_ERR_IO_MANAGER;
  return f->inner.save_state(f->inner.user_data, buffer);
}

static etllm_status f_restore_state(void *ud, const uint8_t *data, size_t len) {
  faulty *f = ud;
  if (fires(f, FAULTY_RESTORE_STATE)) return ETLLM_ERR_IO_MANAGER;
  return f->inner.restore_state(f->inner.user_data, data, len);
}

static void f_destroy(void *ud) {
  faulty *f = ud;
  faulty_destroy_calls++;
  if (f == NULL) return;
  if (f->inner.destroy != NULL) f->inner.destroy(f->inner.user_data);
  free(f);
}

etllm_io_manager faulty_manager(etllm_io_manager inner, faulty_control **out_control) {
  faulty *f = calloc(1, sizeof *f);
  if (f == NULL) {
    fprintf(stderr, "faulty_manager: out of memory\n");
    abort();
  }
  f->inner = inner;
  if (out_control != NULL) *out_control = &f->control;
  etllm_io_manager vt;
  memset(&vt, 0, sizeof vt);
  vt.struct_size = sizeof vt;
  vt.user_data = f;
  vt.load = f_load;
  vt.reset = f_reset;
  vt.rewind = f_rewind;
  vt.prepare_prefill = f_prepare_prefill;
  vt.update_prefill = f_update_prefill;
  vt.prepare_decode = f_prepare_decode;
  vt.update_decode = f_update_decode;
  vt.destroy = f_destroy;
  if (inner.save_state != NULL && inner.restore_state != NULL) {
    vt.save_state = f_save_state;
    vt.restore_state = f_restore_state;
  }
  return vt;
}
