# pkg-config consumer: compile and run test_package/main.cpp with only
# `pkg-config --cflags --libs kvcache` against an installed prefix.
#   cmake -DPREFIX=<install prefix> -DSOURCE=<main.cpp> -DCXX=<compiler> -DOUT=<dir>
#         -DVERSION=<expected version> -P pkgconfig_consumer.cmake
cmake_minimum_required(VERSION 3.21)
foreach(_var PREFIX SOURCE CXX OUT VERSION)
  if(NOT DEFINED ${_var})
    message(FATAL_ERROR "pkgconfig_consumer: -D${_var}= is required")
  endif()
endforeach()

find_program(PKG_CONFIG_EXECUTABLE NAMES pkg-config pkgconf)
if(NOT PKG_CONFIG_EXECUTABLE)
  # The ctest SKIP_REGULAR_EXPRESSION matches this line; scripts/check/package installs it.
  message("SKIP: pkg-config is not installed")
  return()
endif()

# Only our prefix: a kvcache.pc installed system-wide must not satisfy the test.
set(ENV{PKG_CONFIG_PATH} "${PREFIX}/share/pkgconfig")
set(ENV{PKG_CONFIG_LIBDIR} "${PREFIX}/share/pkgconfig")

function(_pc out)
  execute_process(COMMAND "${PKG_CONFIG_EXECUTABLE}" ${ARGN} kvcache
    OUTPUT_VARIABLE _out ERROR_VARIABLE _err RESULT_VARIABLE _rc OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "pkg-config ${ARGN} kvcache failed (${_rc}): ${_err}")
  endif()
  set(${out} "${_out}" PARENT_SCOPE)
endfunction()

_pc(_version --modversion)
if(NOT _version STREQUAL VERSION)
  message(FATAL_ERROR "kvcache.pc says version '${_version}', the project is ${VERSION}")
endif()
_pc(_flags --cflags --libs)
message(STATUS "pkg-config --cflags --libs kvcache: ${_flags}")
file(REAL_PATH "${PREFIX}/include" _want_include)
separate_arguments(_flag_list UNIX_COMMAND "${_flags}")
set(_found_include OFF)
foreach(_flag IN LISTS _flag_list)
  # Nested: ${CMAKE_MATCH_1} is expanded before MATCHES runs in one condition.
  if(_flag MATCHES "^-I(.+)$")
    set(_dir "${CMAKE_MATCH_1}")
    if(EXISTS "${_dir}")
      file(REAL_PATH "${_dir}" _dir)
      if(_dir STREQUAL _want_include)
        set(_found_include ON)
      endif()
    endif()
  endif()
endforeach()
if(NOT _found_include)
  message(FATAL_ERROR "pkg-config's flags do not point at ${PREFIX}/include: ${_flags}")
endif()

file(MAKE_DIRECTORY "${OUT}")
set(_exe "${OUT}/kvcache_pkgconfig_consumer")
execute_process(COMMAND "${CXX}" -std=c++20 "${SOURCE}" -o "${_exe}" ${_flag_list}
  RESULT_VARIABLE _rc ERROR_VARIABLE _err)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "compiling with the pkg-config flags failed:\n${_err}")
endif()
execute_process(COMMAND "${_exe}" RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
file(REMOVE_RECURSE "${OUT}")
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "the pkg-config consumer failed (${_rc}): ${_out}${_err}")
endif()
message(STATUS "${_out}")
