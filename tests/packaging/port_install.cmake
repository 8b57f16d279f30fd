# Runs the CMake steps of ports/kvcache/portfile.cmake without vcpkg: configure with the -D
# options the portfile passes (read from it, so the two cannot drift), install into PREFIX, and
# check that the files are where vcpkg_cmake_config_fixup and vcpkg_fixup_pkgconfig look.
#   cmake -DPORTFILE=<portfile.cmake> -DSOURCE_DIR=<checkout> -DBINARY_DIR=<dir> -DPREFIX=<dir>
#         -DGENERATOR=<gen> -DCXX=<compiler> [-DMAKE_PROGRAM=<make>] -P port_install.cmake
cmake_minimum_required(VERSION 3.21)
file(READ "${PORTFILE}" _portfile)
# The OPTIONS of vcpkg_cmake_configure (without the cuda feature: CUDA never looked for).
string(REGEX MATCH "vcpkg_cmake_configure\\([^)]*\\)" _configure "${_portfile}")
string(REGEX MATCHALL "-D[A-Za-z0-9_]+=[^ \t\n)]+" _options "${_configure}")
if(NOT _options)
  message(FATAL_ERROR "no -D options found in vcpkg_cmake_configure(...) of ${PORTFILE}")
endif()
list(APPEND _options -DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON)
message(STATUS "port options: ${_options}")

set(_tool_args -G "${GENERATOR}" "-DCMAKE_CXX_COMPILER=${CXX}" -DCMAKE_BUILD_TYPE=Release)
if(MAKE_PROGRAM)
  list(APPEND _tool_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
file(REMOVE_RECURSE "${BINARY_DIR}" "${PREFIX}")
execute_process(COMMAND "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${BINARY_DIR}" ${_tool_args}
                        "-DCMAKE_INSTALL_PREFIX=${PREFIX}" ${_options}
                RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "configure with the port's options failed")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BINARY_DIR}" RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "install failed")
endif()
foreach(_file share/kvcache/kvcache-config.cmake share/kvcache/kvcache-config-version.cmake
              share/kvcache/kvcache-targets.cmake share/pkgconfig/kvcache.pc
              include/kvcache/kvcache.hpp include/kvcache/version.hpp)
  if(NOT EXISTS "${PREFIX}/${_file}")
    message(FATAL_ERROR "the port's install lacks ${_file}")
  endif()
endforeach()
if(EXISTS "${PREFIX}/share/kvcache/kvcache-cuda-targets.cmake")
  message(FATAL_ERROR "kvcache::cuda exported without the port's cuda feature")
endif()
file(REMOVE_RECURSE "${BINARY_DIR}")
