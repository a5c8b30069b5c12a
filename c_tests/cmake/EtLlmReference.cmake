# Turns the fixtures' eager-PyTorch references (tests/fixtures/<model>/reference.json, for
# every folder holding a model.pte and a reference.json) into
# C data at configure time, with CMake's own JSON parser (no Python):
#
#   etllm_generate_reference(<fixtures dir> <output dir> [SKIP <model>...])
#
# writes <output dir>/etllm_reference.h (declarations) and etllm_reference.c (the data) and
# sets ETLLM_REFERENCE_MODELS to the model folder names, in a stable (sorted) order, and
# ETLLM_REFERENCE_TEXT_MODELS to those whose prompt ids start with BOS (1). Models
# named after SKIP are left out of ETLLM_REFERENCE_MODELS (so no generic test is made for
# them) but their data is still written: tests of their own find it with
# etllm_ref_find_model().
# Prompts are written byte by byte as \xHH escapes, so any UTF-8 survives unchanged.
# Optional per-case fields (the static_attention fixture's): `name`, `beyond_cache`,
# `static_driver_greedy_ids`; cases without them get NULL / false / an empty list. Also
# optional, and only in an fp16 export's reference (whose greedy_ids come from upstream's
# runtime): `fp32_eager_greedy_ids`, NULL / 0 when absent (see check_reference_ids in
# c_tests/support/test_support.h). For each model it also sets
# ETLLM_REFERENCE_CASE_NAMES_<model> (the names of its named cases) and
# ETLLM_REFERENCE_BEYOND_CACHE_CASES_<model> (those with `beyond_cache` true).

function(_etllm_c_string text out_var)
  string(HEX "${text}" hex)
  string(REGEX REPLACE "(..)" "\\\\x\\1" escaped "${hex}")
  set(${out_var} "\"${escaped}\"" PARENT_SCOPE)
endfunction()

# A JSON array of integers as a C initializer list, and its length.
function(_etllm_c_ids json out_list out_len)
  string(JSON n LENGTH "${json}")
  set(items "")
  if(n GREATER 0)
    math(EXPR last "${n} - 1")
    foreach(i RANGE ${last})
      string(JSON v GET "${json}" ${i})
      if(NOT v MATCHES "^[0-9]+$")
        message(FATAL_ERROR "reference.json: token id `${v}` is not a non-negative integer")
      endif()
      list(APPEND items "${v}u")
    endforeach()
  endif()
  list(JOIN items ", " joined)
  set(${out_list} "${joined}" PARENT_SCOPE)
  set(${out_len} "${n}" PARENT_SCOPE)
endfunction()

function(etllm_generate_reference fixtures_dir out_dir)
  cmake_parse_arguments(ARG "" "" "SKIP" ${ARGN})
  # Model fixtures: folders with a model.pte and its reference.json (other folders, such as
  # tokenizers/ with a reference.json of its own, are not models).
  # The exports made with upstream's recipes live one level down, in shipped/<name>/; their
  # model names are "shipped/<name>" (C identifiers replace the slash).
  file(GLOB model_files LIST_DIRECTORIES false "${fixtures_dir}/*/model.pte"
    "${fixtures_dir}/shipped/*/model.pte")
  set(ref_files "")
  foreach(pte IN LISTS model_files)
    get_filename_component(dir "${pte}" DIRECTORY)
    if(EXISTS "${dir}/reference.json")
      # References of multimodal prompts (cases with `inputs`) and of speech (cases with
      # `audio`) are not text generation: their fixtures have tests of their own
      # (test_multimodal.c, test_asr.c, EtLlmMediaReference.cmake).
      file(READ "${dir}/reference.json" ref_json)
      string(JSON ignored ERROR_VARIABLE no_inputs GET "${ref_json}" cases 0 inputs)
      string(JSON ignored ERROR_VARIABLE no_audio GET "${ref_json}" cases 0 audio)
      if(no_inputs AND no_audio)
        list(APPEND ref_files "${dir}/reference.json")
      endif()
    endif()
  endforeach()
  list(SORT ref_files)
  if(NOT ref_files)
    message(FATAL_ERROR "no ${fixtures_dir}/*/reference.json: set ETLLM_FIXTURES_DIR")
  endif()
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${ref_files})

  set(data "")
  set(models "")
  set(text_models "")
  set(all_models "")
  set(model_rows "")
  foreach(ref IN LISTS ref_files)
    get_filename_component(dir "${ref}" DIRECTORY)
    file(RELATIVE_PATH model "${fixtures_dir}" "${dir}")
    if(NOT model MATCHES "^(shipped/)?[A-Za-z0-9_]+$")
      message(FATAL_ERROR "fixture folder name `${model}` is not a C identifier")
    endif()
    string(REPLACE "/" "_" cname "${model}")
    if(NOT model IN_LIST ARG_SKIP)
      list(APPEND models "${model}")
    endif()
    list(APPEND all_models "${model}")
    file(READ "${ref}" json)
    # Prompts whose ids start with BOS (1) can also be checked from their text with one BOS
    # added; some fixtures of upstream's layouts feed prompts without BOS.
    string(JSON first_id ERROR_VARIABLE err GET "${json}" cases 0 prompt_ids 0)
    if(NOT err AND first_id EQUAL 1 AND NOT model IN_LIST ARG_SKIP)
      list(APPEND text_models "${model}")
    endif()
    string(JSON dtype ERROR_VARIABLE dtype_err GET "${json}" config dtype)
    string(JSON cases GET "${json}" cases)
    string(JSON n_cases LENGTH "${cases}")
    math(EXPR last_case "${n_cases} - 1")
    set(case_rows "")
    set(case_names "")
    set(beyond_names "")
    foreach(c RANGE ${last_case})
      string(JSON prompt GET "${cases}" ${c} prompt)
      string(JSON prompt_ids GET "${cases}" ${c} prompt_ids)
      string(JSON greedy_ids GET "${cases}" ${c} greedy_ids)
      _etllm_c_string("${prompt}" prompt_c)
      _etllm_c_ids("${prompt_ids}" prompt_list prompt_len)
      _etllm_c_ids("${greedy_ids}" greedy_list greedy_len)
      string(APPEND data
        "static const uint32_t ${cname}_prompt_ids_${c}[] = {${prompt_list}};\n"
        "static const uint32_t ${cname}_greedy_ids_${c}[] = {${greedy_list}};\n")
      # Optional fields.
      string(JSON name ERROR_VARIABLE err GET "${cases}" ${c} name)
      if(err)
        set(name_c "NULL")
      else()
        _etllm_c_string("${name}" name_c)
        list(APPEND case_names "${name}")
      endif()
      string(JSON beyond ERROR_VARIABLE err GET "${cases}" ${c} beyond_cache)
      if(NOT err AND beyond)
        set(beyond_c "true")
        list(APPEND beyond_names "${name}")
      else()
        set(beyond_c "false")
      endif()
      string(JSON driver_ids ERROR_VARIABLE err GET "${cases}" ${c} static_driver_greedy_ids)
      if(err)
        set(driver_c "NULL, 0")
      else()
        _etllm_c_ids("${driver_ids}" driver_list driver_len)
        string(APPEND data
          "static const uint32_t ${cname}_static_driver_greedy_ids_${c}[] = {${driver_list}};\n")
        set(driver_c "${cname}_static_driver_greedy_ids_${c}, ${driver_len}")
      endif()
      # The second reference of an f16 export (see check_reference_ids).
      string(JSON eager_ids ERROR_VARIABLE err GET "${cases}" ${c} fp32_eager_greedy_ids)
      if(err)
        set(eager_c "NULL, 0")
      else()
        if(dtype_err OR NOT dtype STREQUAL "fp16")
          message(FATAL_ERROR
            "${ref}: fp32_eager_greedy_ids in a reference that is not an fp16 export's")
        endif()
        _etllm_c_ids("${eager_ids}" eager_list eager_len)
        string(APPEND data
          "static const uint32_t ${cname}_fp32_eager_greedy_ids_${c}[] = {${eager_list}};\n")
        set(eager_c "${cname}_fp32_eager_greedy_ids_${c}, ${eager_len}")
      endif()
      # Data files (.ptd) the case needs, relative to the fixture folder.
      string(JSON data_files ERROR_VARIABLE err GET "${cases}" ${c} data_files)
      set(data_c "NULL, 0")
      if(NOT err)
        string(JSON n_data LENGTH "${data_files}")
        if(n_data GREATER 0)
          math(EXPR last_data "${n_data} - 1")
          set(data_items "")
          foreach(d RANGE ${last_data})
            string(JSON data_file GET "${data_files}" ${d})
            _etllm_c_string("${model}/${data_file}" data_file_c)
            list(APPEND data_items "${data_file_c}")
          endforeach()
          list(JOIN data_items ", " data_joined)
          string(APPEND data
            "static const char *const ${cname}_data_files_${c}[] = {${data_joined}};\n")
          set(data_c "${cname}_data_files_${c}, ${n_data}")
        endif()
      endif()
      string(JSON method ERROR_VARIABLE err GET "${cases}" ${c} method)
      if(err OR method STREQUAL "forward")
        set(method_c "NULL")
      else()
        _etllm_c_string("${method}" method_c)
      endif()
      string(APPEND case_rows
        "  {${prompt_c},\n"
        "   ${cname}_prompt_ids_${c}, ${prompt_len}, ${cname}_greedy_ids_${c}, ${greedy_len},\n"
        "   ${name_c}, ${beyond_c}, ${driver_c}, ${method_c}, ${data_c}, ${eager_c}},\n")
    endforeach()
    string(APPEND data
      "static const etllm_ref_case ${cname}_cases[] = {\n${case_rows}};\n\n")
    string(APPEND model_rows "  {\"${model}\", ${cname}_cases, ${n_cases}},\n")
    set(ETLLM_REFERENCE_CASE_NAMES_${model} "${case_names}" PARENT_SCOPE)
    set(ETLLM_REFERENCE_BEYOND_CACHE_CASES_${model} "${beyond_names}" PARENT_SCOPE)
  endforeach()
  list(LENGTH all_models n_models)

  file(MAKE_DIRECTORY "${out_dir}")
  file(CONFIGURE OUTPUT "${out_dir}/etllm_reference.h" @ONLY CONTENT [=[
/* Generated at configure time from tests/fixtures/<model>/reference.json by
 * c_tests/cmake/EtLlmReference.cmake. Do not edit. */
#ifndef ETLLM_REFERENCE_H
#define ETLLM_REFERENCE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* One prompt and the eager-PyTorch greedy continuation (EOS ignored). */
typedef struct etllm_ref_case {
  const char *prompt;          /* UTF-8 */
  const uint32_t *prompt_ids;  /* BOS first, then the tokenizer's ids */
  size_t num_prompt_ids;
  const uint32_t *greedy_ids;
  size_t num_greedy_ids;
  const char *name;            /* the case's `name`, or NULL */
  bool beyond_cache;           /* static_attention: prompt + greedy ids exceed cache_len */
  /* static_attention: what a runtime following the fixture's spec generates (NULL, 0 when
   * the reference has no such field). */
  const uint32_t *static_driver_greedy_ids;
  size_t num_static_driver_greedy_ids;
  /* The method that runs the model's steps (etllm_runner_options.method_name), or NULL for
   * "forward". */
  const char *method;
  /* The data files (.ptd) the case needs, relative to the fixtures folder (NULL, 0: none
   * given; the library then looks for <stem>.ptd beside the model). */
  const char *const *data_files;
  size_t num_data_files;
  /* Only for an fp16 export whose greedy_ids come from upstream's runtime: the eager-fp32
   * greedy continuation, which a run may equal instead (see check_reference_ids in
   * test_support.h); NULL, 0 for every other reference. */
  const uint32_t *fp32_eager_greedy_ids;
  size_t num_fp32_eager_greedy_ids;
} etllm_ref_case;

/* A fixture model: tests/fixtures/<name>/model.pte (<name> may be "shipped/<export>"). Every fixture with a reference.json is
 * here, those CMake's SKIP list leaves out of the generic tests included. */
typedef struct etllm_ref_model {
  const char *name;
  const etllm_ref_case *cases;
  size_t num_cases;
} etllm_ref_model;

#define ETLLM_REF_NUM_MODELS @n_models@
extern const etllm_ref_model etllm_ref_models[ETLLM_REF_NUM_MODELS];

/* The model called `name`, or NULL. */
const etllm_ref_model *etllm_ref_find_model(const char *name);

#ifdef __cplusplus
}
#endif

#endif /* ETLLM_REFERENCE_H */
]=])
  file(CONFIGURE OUTPUT "${out_dir}/etllm_reference.c" @ONLY CONTENT [=[
/* Generated at configure time from tests/fixtures/<model>/reference.json by
 * c_tests/cmake/EtLlmReference.cmake. Do not edit. */
#include "etllm_reference.h"

#include <string.h>

@data@const etllm_ref_model etllm_ref_models[ETLLM_REF_NUM_MODELS] = {
@model_rows@};

const etllm_ref_model *etllm_ref_find_model(const char *name) {
  for (size_t i = 0; i < ETLLM_REF_NUM_MODELS; i++) {
    if (strcmp(etllm_ref_models[i].name, name) == 0) return &etllm_ref_models[i];
  }
  return NULL;
}
]=])
  set(ETLLM_REFERENCE_MODELS "${models}" PARENT_SCOPE)
  set(ETLLM_REFERENCE_TEXT_MODELS "${text_models}" PARENT_SCOPE)
endfunction()
