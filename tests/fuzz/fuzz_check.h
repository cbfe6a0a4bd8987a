// FUZZ_CHECK(condition): aborts with the failed condition and its place when `condition` is false,
// which libFuzzer reports as a crash and saves the input. Active in every build type (unlike
// assert). Shared by the fuzz targets of tests/fuzz.
#ifndef DMDSERVE_TESTS_FUZZ_FUZZ_CHECK_H_
#define DMDSERVE_TESTS_FUZZ_FUZZ_CHECK_H_

#include <cstdio>
#include <cstdlib>

#define FUZZ_CHECK(condition)                                                                \
  do {                                                                                       \
    if (!(condition)) {                                                                      \
      std::fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #condition); \
      std::abort();                                                                          \
    }                                                                                        \
  } while (0)

#endif  // DMDSERVE_TESTS_FUZZ_FUZZ_CHECK_H_
