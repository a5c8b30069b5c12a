# Turns the eager-transformers references of the multimodal and speech-to-text fixtures into
# C data at configure time, with CMake's own JSON parser (no Python):
#
#   etllm_generate_media_reference(<fixtures dir> <output dir>)
#
# writes <output dir>/etllm_media_reference.h (declarations) and etllm_media_reference.c
# from tests/fixtures/multimodal/reference.json (each case's inputs, prompt length and
# greedy ids), tests/fixtures/multimodal/preprocess.json (rgb.png as transformers'
# CLIPImageProcessor saw it: the 8-bit pixels after resize and crop, and the pixel values)
# and tests/fixtures/whisper/reference.json (each case's audio, prompt and greedy ids, and
# the WAV files it marks valid and invalid). It sets ETLLM_MM_BAD_IMAGES (preprocess.json's
# bad_images), ETLLM_ASR_BAD_WAVS (the reference's invalid WAV files) and ETLLM_ASR_CASES
# ("<wav file>:<prompt>" per case). Floats come out of CMake's JSON parser as the double
# nearest the file's decimal (17 digits); they are written as double constants that the
# compiler rounds to float, as a JSON reader converting to float32 does.

# A JSON array of non-negative integers as a C initializer list, and its length.
function(_etllm_media_c_ints json out_list out_len)
  string(JSON n LENGTH "${json}")
  set(items "")
  if(n GREATER 0)
    math(EXPR last "${n} - 1")
    foreach(i RANGE ${last})
      string(JSON v GET "${json}" ${i})
      if(NOT v MATCHES "^[0-9]+$")
        message(FATAL_ERROR "media reference: `${v}` is not a non-negative integer")
      endif()
      list(APPEND items "${v}u")
    endforeach()
  endif()
  list(JOIN items ", " joined)
  set(${out_list} "${joined}" PARENT_SCOPE)
  set(${out_len} "${n}" PARENT_SCOPE)
endfunction()

# A long JSON array of numbers as a C initializer list (double constants, or integers with
# INTS), split from the array's text rather than read item by item (thousands of items).
function(_etllm_media_c_numbers json out_list out_len)
  cmake_parse_arguments(ARG "INTS" "" "" ${ARGN})
  string(REGEX REPLACE "[][ \t\r\n]" "" flat "${json}")
  string(REPLACE "," ";" values "${flat}")
  set(items "")
  foreach(v IN LISTS values)
    if(ARG_INTS)
      if(NOT v MATCHES "^[0-9]+$")
        message(FATAL_ERROR "media reference: `${v}` is not a non-negative integer")
      endif()
      list(APPEND items "${v}")
    else()
      if(NOT v MATCHES "^-?[0-9]+(\\.[0-9]*)?([eE][-+]?[0-9]+)?$")
        message(FATAL_ERROR "media reference: `${v}` is not a number")
      endif()
      list(APPEND items "${v}")
    endif()
  endforeach()
  list(LENGTH items n)
  list(JOIN items ", " joined)
  set(${out_list} "${joined}" PARENT_SCOPE)
  set(${out_len} "${n}" PARENT_SCOPE)
endfunction()

function(_etllm_media_c_string text out_var)
  string(HEX "${text}" hex)
  string(REGEX REPLACE "(..)" "\\\\x\\1" escaped "${hex}")
  set(${out_var} "\"${escaped}\"" PARENT_SCOPE)
endfunction()

function(etllm_generate_media_reference fixtures_dir out_dir)
  set(mm_ref "${fixtures_dir}/multimodal/reference.json")
  set(mm_pre "${fixtures_dir}/multimodal/preprocess.json")
  set(asr_ref "${fixtures_dir}/whisper/reference.json")
  foreach(f IN ITEMS "${mm_ref}" "${mm_pre}" "${asr_ref}")
    if(NOT EXISTS "${f}")
      message(FATAL_ERROR "no ${f}: the multimodal and whisper fixtures are needed")
    endif()
  endforeach()
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${mm_ref}" "${mm_pre}" "${asr_ref}")
  set(data "")

  # --- multimodal/reference.json ---
  file(READ "${mm_ref}" json)
  string(JSON cases GET "${json}" cases)
  string(JSON n_cases LENGTH "${cases}")
  math(EXPR last_case "${n_cases} - 1")
  set(case_rows "")
  foreach(c RANGE ${last_case})
    string(JSON name GET "${cases}" ${c} name)
    string(JSON inputs GET "${cases}" ${c} inputs)
    string(JSON n_inputs LENGTH "${inputs}")
    math(EXPR last_input "${n_inputs} - 1")
    set(input_rows "")
    foreach(i RANGE ${last_input})
      string(JSON type GET "${inputs}" ${i} type)
      string(JSON rows GET "${inputs}" ${i} num_rows)
      if(type STREQUAL "text")
        string(JSON ids GET "${inputs}" ${i} token_ids)
        string(JSON text GET "${inputs}" ${i} text)
        _etllm_media_c_ints("${ids}" id_list id_len)
        _etllm_media_c_string("${text}" text_c)
        string(APPEND data "static const uint32_t mm_ids_${c}_${i}[] = {${id_list}};\n")
        string(APPEND input_rows "  {false, mm_ids_${c}_${i}, ${id_len}, ${text_c}, NULL, ${rows}},\n")
      elseif(type STREQUAL "image")
        string(JSON file GET "${inputs}" ${i} file)
        _etllm_media_c_string("${file}" file_c)
        string(APPEND input_rows "  {true, NULL, 0, NULL, ${file_c}, ${rows}},\n")
      else()
        message(FATAL_ERROR "${mm_ref}: input type `${type}` is neither text nor image")
      endif()
    endforeach()
    string(JSON prompt_len GET "${cases}" ${c} prompt_len)
    string(JSON greedy GET "${cases}" ${c} greedy_ids)
    _etllm_media_c_ints("${greedy}" greedy_list greedy_len)
    _etllm_media_c_string("${name}" name_c)
    string(APPEND data
      "static const etllm_mm_ref_input mm_inputs_${c}[] = {\n${input_rows}};\n"
      "static const uint32_t mm_greedy_${c}[] = {${greedy_list}};\n")
    string(APPEND case_rows
      "  {${name_c}, mm_inputs_${c}, ${n_inputs}, ${prompt_len}, mm_greedy_${c}, ${greedy_len}},\n")
  endforeach()
  string(APPEND data
    "const etllm_mm_ref_case etllm_mm_ref_cases[] = {\n${case_rows}};\n"
    "const size_t etllm_mm_ref_num_cases = ${n_cases};\n\n")

  # --- multimodal/preprocess.json: rgb.png ---
  file(READ "${mm_pre}" json)
  string(JSON cropped GET "${json}" images rgb.png cropped_hwc_uint8)
  string(JSON values GET "${json}" images rgb.png pixel_values_chw)
  _etllm_media_c_numbers("${cropped}" cropped_list cropped_len INTS)
  _etllm_media_c_numbers("${values}" values_list values_len)
  if(NOT cropped_len EQUAL 3072 OR NOT values_len EQUAL 3072)
    message(FATAL_ERROR "${mm_pre}: rgb.png is not 32x32x3 after resize and crop")
  endif()
  string(JSON bad_images GET "${json}" bad_images)
  string(JSON n_bad_images LENGTH "${bad_images}")
  math(EXPR last_bad_image "${n_bad_images} - 1")
  set(bad_image_names "")
  foreach(b RANGE ${last_bad_image})
    string(JSON name MEMBER "${bad_images}" ${b})
    list(APPEND bad_image_names "${name}")
  endforeach()
  set(ETLLM_MM_BAD_IMAGES "${bad_image_names}" PARENT_SCOPE)
  string(APPEND data
    "const uint8_t etllm_mm_rgb_cropped_hwc[3072] = {${cropped_list}};\n"
    "const float etllm_mm_rgb_pixel_values_chw[3072] = {${values_list}};\n\n")

  # --- whisper/reference.json ---
  file(READ "${asr_ref}" json)
  string(JSON eos GET "${json}" eos_token_id)
  string(JSON max_new GET "${json}" greedy_max_new_tokens)
  string(JSON cases GET "${json}" cases)
  string(JSON n_cases LENGTH "${cases}")
  math(EXPR last_case "${n_cases} - 1")
  set(case_rows "")
  set(asr_cases "")
  foreach(c RANGE ${last_case})
    string(JSON audio GET "${cases}" ${c} audio)
    string(JSON prompt GET "${cases}" ${c} prompt)
    string(JSON prompt_ids GET "${cases}" ${c} prompt_ids)
    string(JSON greedy GET "${cases}" ${c} greedy_ids)
    string(JSON on_eos GET "${cases}" ${c} stopped_on_eos)
    string(JSON text GET "${cases}" ${c} text)
    _etllm_media_c_ints("${prompt_ids}" prompt_list prompt_len)
    _etllm_media_c_ints("${greedy}" greedy_list greedy_len)
    _etllm_media_c_string("${audio}" audio_c)
    _etllm_media_c_string("${prompt}" prompt_c)
    _etllm_media_c_string("${text}" text_c)
    if(on_eos)
      set(on_eos_c "true")
    else()
      set(on_eos_c "false")
    endif()
    string(APPEND data
      "static const uint32_t asr_prompt_${c}[] = {${prompt_list}};\n"
      "static const uint32_t asr_greedy_${c}[] = {${greedy_list}};\n")
    get_filename_component(wav "${audio}" NAME)
    list(APPEND asr_cases "${wav}:${prompt}")
    string(APPEND case_rows
      "  {${audio_c}, ${prompt_c}, asr_prompt_${c}, ${prompt_len}, asr_greedy_${c}, ${greedy_len}, "
      "${on_eos_c}, ${text_c}},\n")
  endforeach()
  string(JSON audio GET "${json}" audio)
  string(JSON n_audio LENGTH "${audio}")
  math(EXPR last_audio "${n_audio} - 1")
  set(bad_items "")
  set(good_items "")
  set(bad_names "")
  foreach(a RANGE ${last_audio})
    string(JSON wav MEMBER "${audio}" ${a})
    string(JSON valid GET "${audio}" "${wav}" valid)
    _etllm_media_c_string("${wav}" wav_c)
    if(valid)
      list(APPEND good_items "${wav_c}")
    else()
      list(APPEND bad_items "${wav_c}")
      list(APPEND bad_names "${wav}")
    endif()
  endforeach()
  set(ETLLM_ASR_BAD_WAVS "${bad_names}" PARENT_SCOPE)
  set(ETLLM_ASR_CASES "${asr_cases}" PARENT_SCOPE)
  list(LENGTH bad_items n_bad)
  list(JOIN bad_items ", " bad_joined)
  list(LENGTH good_items n_good)
  list(JOIN good_items ", " good_joined)
  string(APPEND data
    "const etllm_asr_ref_case etllm_asr_ref_cases[] = {\n${case_rows}};\n"
    "const size_t etllm_asr_ref_num_cases = ${n_cases};\n"
    "const uint32_t etllm_asr_ref_eos_id = ${eos};\n"
    "const int32_t etllm_asr_ref_max_new_tokens = ${max_new};\n"
    "const char *const etllm_asr_ref_bad_wavs[] = {${bad_joined}};\n"
    "const size_t etllm_asr_ref_num_bad_wavs = ${n_bad};\n"
    "const char *const etllm_asr_ref_good_wavs[] = {${good_joined}};\n"
    "const size_t etllm_asr_ref_num_good_wavs = ${n_good};\n")

  file(MAKE_DIRECTORY "${out_dir}")
  file(CONFIGURE OUTPUT "${out_dir}/etllm_media_reference.h" @ONLY CONTENT [=[
/* Generated at configure time from tests/fixtures/multimodal/{reference,preprocess}.json
 * and tests/fixtures/whisper/reference.json by c_tests/cmake/EtLlmMediaReference.cmake.
 * Do not edit. */
#ifndef ETLLM_MEDIA_REFERENCE_H
#define ETLLM_MEDIA_REFERENCE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* One input of a multimodal case: text (as its token ids, and the text they encode) or an
 * image file (relative to tests/fixtures/multimodal). */
typedef struct etllm_mm_ref_input {
  bool is_image;
  const uint32_t *token_ids; /* text: the ids, BOS included where the text has "<s>" */
  size_t num_token_ids;
  const char *text;          /* text: UTF-8 */
  const char *file;          /* image: e.g. "images/rgb.png" */
  size_t num_rows;           /* positions it fills (an image: its image tokens) */
} etllm_mm_ref_input;

/* One multimodal prompt and eager transformers' greedy continuation. */
typedef struct etllm_mm_ref_case {
  const char *name; /* "one_image", "two_images" */
  const etllm_mm_ref_input *inputs;
  size_t num_inputs;
  size_t prompt_len; /* positions of the whole prompt */
  const uint32_t *greedy_ids;
  size_t num_greedy_ids;
} etllm_mm_ref_case;

extern const etllm_mm_ref_case etllm_mm_ref_cases[];
extern const size_t etllm_mm_ref_num_cases;
/* rgb.png after Pillow's resize and center crop (32x32 RGB, HWC), and the pixel values
 * CLIPImageProcessor made of it (CHW, [3, 32, 32]). */
extern const uint8_t etllm_mm_rgb_cropped_hwc[3072];
extern const float etllm_mm_rgb_pixel_values_chw[3072];

/* One transcription and eager transformers' greedy continuation (its end-of-text token
 * included when `stopped_on_eos`). */
typedef struct etllm_asr_ref_case {
  const char *audio;  /* relative to tests/fixtures/whisper, e.g. "audio/speech16k.wav" */
  const char *prompt; /* "sot_en_transcribe_notimestamps" or "sot_only" */
  const uint32_t *prompt_ids;
  size_t num_prompt_ids;
  const uint32_t *greedy_ids;
  size_t num_greedy_ids;
  bool stopped_on_eos;
  const char *text; /* the greedy ids' text, special tokens skipped */
} etllm_asr_ref_case;

extern const etllm_asr_ref_case etllm_asr_ref_cases[];
extern const size_t etllm_asr_ref_num_cases;
extern const uint32_t etllm_asr_ref_eos_id;
extern const int32_t etllm_asr_ref_max_new_tokens;
/* The WAV files (in tests/fixtures/whisper/audio) the reference marks invalid, and those
 * it marks valid. */
extern const char *const etllm_asr_ref_bad_wavs[];
extern const size_t etllm_asr_ref_num_bad_wavs;
extern const char *const etllm_asr_ref_good_wavs[];
extern const size_t etllm_asr_ref_num_good_wavs;

#endif /* ETLLM_MEDIA_REFERENCE_H */
]=])
  file(CONFIGURE OUTPUT "${out_dir}/etllm_media_reference.c" @ONLY CONTENT [=[
/* Generated at configure time by c_tests/cmake/EtLlmMediaReference.cmake. Do not edit. */
#include "etllm_media_reference.h"

@data@]=])
endfunction()
