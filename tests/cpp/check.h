// Shared by the C++ unit tests (tests/cpp/*.cpp, one executable run by ctest): dependency-free
// checks. EXPECT records a failure (file:line + message) and the test goes on; each test is a
// function listed in kTests (test_cpu_kernels.cpp), and main returns 1 when any check failed.
#pragma once
#include <c10/util/StringUtil.h>

#include <cstdio>
#include <string>

namespace lora_ext_test {

inline int g_failures = 0;

inline void expect(bool ok, const char* expr, const char* file, int line, const std::string& what) {
  if (ok) return;
  ++g_failures;
  std::fprintf(stderr, "%s:%d: EXPECT(%s) failed: %s\n", file, line, expr, what.c_str());
}
#define EXPECT(cond, ...) \
  ::lora_ext_test::expect(static_cast<bool>(cond), #cond, __FILE__, __LINE__, c10::str(__VA_ARGS__))

// test_cpu_microkernels.cpp: the micro-kernels, packing and 16-bit conversions on raw buffers
void test_micro_6x16();
void test_micro_tn_8x16();
void test_pack_panels();
void test_rows16();
void test_acc_epilogue();
void test_shrink_bf16();

// test_merge_kernels.cpp: remerge_'s row pieces against merge_math's scalar transition, merge_cpu
// against the element-wise definition
void test_merge_pieces();
void test_merge_tiles();

}  // namespace lora_ext_test
