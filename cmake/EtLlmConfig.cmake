# CMake package configuration for EtLlm (installed by tools/install.sh).
#
#   find_package(EtLlm 0.1 CONFIG REQUIRED)
#   target_link_libraries(app PRIVATE EtLlm::etllm)         # shared libetllm.so
#   target_link_libraries(app PRIVATE EtLlm::etllm_static)  # static libetllm.a
#
# Both targets carry the include folder (etllm.h, etllm.hpp). EtLlm::etllm_static also
# brings the ExecuTorch runtime shared libraries installed beside it; the kernel and
# delegate libraries are wrapped in -Wl,--no-as-needed because they only register
# themselves from static constructors. Executables built in the build tree get an RPATH to
# the prefix's lib folder from CMake; for installed executables set INSTALL_RPATH (or ship
# the libraries next to them).
#
# Every path is computed from this file's own location (PREFIX/lib/cmake/EtLlm), so the
# installed prefix can be moved. ExecuTorch's own CMake package is not needed.

cmake_policy(PUSH)
cmake_policy(VERSION 3.16...3.31)

get_filename_component(_etllm_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
set(_etllm_libdir "${_etllm_prefix}/lib")
set(_etllm_includedir "${_etllm_prefix}/include")

set(_etllm_missing "")
foreach(_etllm_file
    "${_etllm_includedir}/etllm.h"
    "${_etllm_libdir}/libetllm.so"
    "${_etllm_libdir}/libetllm.a"
    "${_etllm_libdir}/libexecutorch.so"
    "${_etllm_libdir}/libexecutorch_threadpool.so"
    "${_etllm_libdir}/libexecutorch_kernels_optimized.so"
    "${_etllm_libdir}/libexecutorch_kernels_quantized.so"
    "${_etllm_libdir}/libexecutorch_backend_xnnpack.so")
  if(NOT EXISTS "${_etllm_file}")
    list(APPEND _etllm_missing "${_etllm_file}")
  endif()
endforeach()
if(_etllm_missing)
  set(EtLlm_FOUND FALSE)
  set(EtLlm_NOT_FOUND_MESSAGE
      "The EtLlm installation at ${_etllm_prefix} is incomplete; missing: ${_etllm_missing}")
  unset(_etllm_missing)
  unset(_etllm_file)
  cmake_policy(POP)
  return()
endif()
unset(_etllm_missing)
unset(_etllm_file)

if(NOT TARGET EtLlm::etllm)
  add_library(EtLlm::etllm SHARED IMPORTED)
  set_target_properties(EtLlm::etllm PROPERTIES
    IMPORTED_LOCATION "${_etllm_libdir}/libetllm.so"
    IMPORTED_SONAME "libetllm.so"
    INTERFACE_INCLUDE_DIRECTORIES "${_etllm_includedir}")
endif()

if(NOT TARGET EtLlm::etllm_static)
  add_library(EtLlm::etllm_static STATIC IMPORTED)
  set_target_properties(EtLlm::etllm_static PROPERTIES
    IMPORTED_LOCATION "${_etllm_libdir}/libetllm.a"
    IMPORTED_LINK_INTERFACE_LANGUAGES "C"
    INTERFACE_INCLUDE_DIRECTORIES "${_etllm_includedir}"
    INTERFACE_LINK_LIBRARIES
      "${_etllm_libdir}/libexecutorch.so;${_etllm_libdir}/libexecutorch_threadpool.so;-Wl,--no-as-needed;${_etllm_libdir}/libexecutorch_kernels_optimized.so;${_etllm_libdir}/libexecutorch_kernels_quantized.so;${_etllm_libdir}/libexecutorch_backend_xnnpack.so;-Wl,--as-needed;stdc++;pthread;dl;m")
endif()

set(EtLlm_INCLUDE_DIR "${_etllm_includedir}")
set(EtLlm_LIBRARY_DIR "${_etllm_libdir}")
unset(_etllm_prefix)
unset(_etllm_libdir)
unset(_etllm_includedir)
cmake_policy(POP)
