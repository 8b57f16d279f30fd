# Runs `cmake --build BUILD_DIR --target TARGET --config CONFIG` and succeeds only if the build
# fails with output matching REGEX. Called by the compile_fail.* tests (see CMakeLists.txt).
execute_process(
  COMMAND "${CMAKE_COMMAND}" --build "${BUILD_DIR}" --target "${TARGET}" --config "${CONFIG}"
  RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _out)
if(_rc EQUAL 0)
  message("${_out}")
  message(FATAL_ERROR "${TARGET} compiled, but it must not")
endif()
if(NOT _out MATCHES "${REGEX}")
  message("${_out}")
  message(FATAL_ERROR "${TARGET} failed to compile, but the output above does not match `${REGEX}`")
endif()
message(STATUS "${TARGET} failed to compile, as expected (matched `${REGEX}`)")
