# dmdserve_cc_test(<name> [LABEL <label>] [TIMEOUT <seconds>] LIBS <targets...>)
#
# The one way a C++ test is registered: a GoogleTest binary built from <name>.cc in the calling
# directory, linked with <targets>, GoogleTest's main and gmock, with the source tree and the
# Python interpreter compiled in (DMDSERVE_SOURCE_DIR, DMDSERVE_PYTHON) for tests that read
# repository files or run the Python fixtures. Each test case becomes a CTest test with label
# LABEL (default: unit) and TIMEOUT (default: CTest's). In a sanitizer build (DMDSERVE_SANITIZE)
# the whole binary is one CTest test named <name> instead: one process per binary rather than per
# case (a process start under a sanitizer costs seconds, and per-process fixtures such as
# test_util.h's BuiltBundle run once), and no discovery run at build time.
function(dmdserve_cc_test name)
  cmake_parse_arguments(PARSE_ARGV 1 ARG "" "LABEL;TIMEOUT" "LIBS")
  if(ARG_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "dmdserve_cc_test(${name}): unknown arguments ${ARG_UNPARSED_ARGUMENTS}")
  endif()
  if(NOT ARG_LABEL)
    set(ARG_LABEL unit)
  endif()
  add_executable(${name} ${name}.cc)
  target_link_libraries(${name} PRIVATE ${ARG_LIBS} GTest::gtest GTest::gtest_main GTest::gmock)
  target_compile_definitions(${name} PRIVATE
    DMDSERVE_SOURCE_DIR="${PROJECT_SOURCE_DIR}" DMDSERVE_PYTHON="${DMDSERVE_PYTHON}")
  # Listed in <build>/unit_tests.txt (the top-level CMakeLists.txt writes it), which the ASan
  # job of scripts/sanitize.sh runs whole.
  if(ARG_LABEL STREQUAL "unit")
    set_property(GLOBAL APPEND PROPERTY DMDSERVE_UNIT_TESTS ${name})
  endif()
  set(_properties LABELS ${ARG_LABEL})
  if(ARG_TIMEOUT)
    list(APPEND _properties TIMEOUT ${ARG_TIMEOUT})
  endif()
  if(DMDSERVE_SANITIZE)
    add_test(NAME ${name} COMMAND ${name})
    set_tests_properties(${name} PROPERTIES ${_properties})
  else()
    gtest_discover_tests(${name} DISCOVERY_TIMEOUT 60 PROPERTIES ${_properties})
  endif()
endfunction()
