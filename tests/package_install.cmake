# The installed package works for a consumer: `cmake --install` into a fresh prefix, then a separate
# project finds it with find_package(lycoris) and builds and runs examples/standalone.cpp against it.
# Run by CTest (tests/CMakeLists.txt) with BUILD_DIR, SOURCE_DIR and WORK_DIR set.
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}/consumer")

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE code OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT code EQUAL 0)
    message(FATAL_ERROR "failed (${code}): ${ARGN}\n${out}\n${err}")
  endif()
endfunction()

run(${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${WORK_DIR}/prefix")

# only the library's public headers are installed: nothing from src/, no test or example headers
file(GLOB_RECURSE installed RELATIVE "${WORK_DIR}/prefix/include" "${WORK_DIR}/prefix/include/*")
foreach(h ${installed})
  if(NOT h MATCHES "^lycoris/" OR NOT EXISTS "${SOURCE_DIR}/include/${h}" AND NOT h STREQUAL "lycoris/version.hpp")
    message(FATAL_ERROR "installed header that is not a public one: ${h}")
  endif()
endforeach()

file(WRITE "${WORK_DIR}/consumer/CMakeLists.txt" "
cmake_minimum_required(VERSION 3.18)
project(lycoris_consumer CXX)
set(CMAKE_CXX_STANDARD 17)
set(CMAKE_BUILD_TYPE Release)
find_package(lycoris REQUIRED)
add_executable(standalone \"${SOURCE_DIR}/examples/standalone.cpp\")
target_link_libraries(standalone PRIVATE lycoris::lycoris)
")
run(${CMAKE_COMMAND} -S "${WORK_DIR}/consumer" -B "${WORK_DIR}/consumer/build"
    "-DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix")
run(${CMAKE_COMMAND} --build "${WORK_DIR}/consumer/build")
run("${WORK_DIR}/consumer/build/standalone")
message(STATUS "standalone built against the installed package and ran")
