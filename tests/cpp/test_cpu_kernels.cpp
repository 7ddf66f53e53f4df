// C++ unit tests of the CPU kernels, built by CMakeLists.txt and run by ctest (cpu_kernels).
//
// Dependency-free (check.h): EXPECT records a failure and the test goes on; each test is a
// function in kTests, and main returns 1 when any check failed or a test threw.
// Covered here: lora_apply_cpu against an fp64
// at::matmul reference (fp32/fp16/bf16, r = 1, odd widths, T = 0, layouts, thread counts);
// bad input raising c10::Error that names the argument; the CPU/CUDA registrations. The
// micro-kernel tests (test_cpu_microkernels.cpp) and the merge pieces (test_merge_kernels.cpp)
// run first, from the same kTests list.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <cmath>
#include <cstring>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "check.h"
#include "cpu/ops_cpu.h"

namespace lora_ext_test {
namespace {

// Relative Frobenius error of out against ref (both converted to fp64); inf when not finite.
double rel_err(const at::Tensor& out, const at::Tensor& ref) {
  const at::Tensor o = out.to(at::kDouble), r = ref.to(at::kDouble);
  if (!at::isfinite(o).all().item<bool>()) return std::numeric_limits<double>::infinity();
  const double den = r.norm().item<double>();
  return (o - r).norm().item<double>() / (den > 0 ? den : 1.0);
}

double rtol(at::ScalarType dt) {  // tests/conftest.py RTOL: the result is rounded once into dt
  return dt == at::kFloat ? 1e-5 : dt == at::kHalf ? 2e-3 : 1e-2;
}

at::Tensor reference(const at::Tensor& y, const at::Tensor& x, const at::Tensor& A,
                     const at::Tensor& B, double s) {
  const at::Tensor u = at::matmul(x.to(at::kDouble), A.to(at::kDouble).t());
  return y.to(at::kDouble) + s * at::matmul(u, B.to(at::kDouble).t());
}

struct Problem {
  at::Tensor y, x, A, B;
};

// Same scaling as tests/test_lora_apply.py::make, so outputs stay O(1).
Problem make(int64_t T, int64_t in, int64_t out, int64_t r, at::ScalarType dt, uint64_t seed) {
  at::manual_seed(seed);
  const auto f = at::TensorOptions().dtype(at::kFloat);
  Problem p;
  p.x = at::randn({T, in}, f).to(dt);
  p.A = (at::randn({r, in}, f) / std::sqrt(static_cast<double>(std::max<int64_t>(in, 1)))).to(dt);
  p.B = (at::randn({out, r}, f) / std::sqrt(static_cast<double>(r))).to(dt);
  p.y = at::randn({T, out}, f).to(dt);
  return p;
}

// ---- lora_apply_cpu against the fp64 reference ----

void test_lora_apply_matches_reference() {
  struct Shape {
    int64_t T, in, out, r;
  };
  const Shape shapes[] = {{1, 64, 64, 1},   {0, 32, 16, 4},    {3, 4097, 33, 1},  {7, 5, 4097, 3},
                          {8, 128, 96, 16}, {130, 257, 131, 31}, {17, 33, 3, 128}, {65, 70, 50, 65},
                          {25, 1, 19, 2},   {6, 16, 16, 17}};
  uint64_t seed = 10;
  for (at::ScalarType dt : {at::kFloat, at::kHalf, at::kBFloat16}) {
    for (const Shape& s : shapes) {
      Problem p = make(s.T, s.in, s.out, s.r, dt, ++seed);
      const at::Tensor ref = reference(p.y, p.x, p.A, p.B, 0.75);
      const void* y_ptr = p.y.data_ptr();
      lora_ext::cpu::lora_apply_cpu(p.y, p.x, p.A, p.B, 0.75);
      const double err = rel_err(p.y, ref);
      EXPECT(err < rtol(dt), dt, " T=", s.T, " in=", s.in, " out=", s.out, " r=", s.r,
            ": rel err ", err, " >= ", rtol(dt));
      EXPECT(p.y.data_ptr() == y_ptr && p.y.dtype() == dt, "y must be updated in place");
    }
  }
}

void test_layouts() {
  // Leading dims: x [3, 6, 40], y [3, 6, 24].
  Problem p = make(18, 40, 24, 4, at::kFloat, 100);
  at::Tensor y = p.y.view({3, 6, 24}), x = p.x.view({3, 6, 40});
  at::Tensor ref = reference(y, x, p.A, p.B, 2.0);
  lora_ext::cpu::lora_apply_cpu(y, x, p.A, p.B, 2.0);
  EXPECT(rel_err(y, ref) < 1e-5, "leading dims: rel err ", rel_err(y, ref));

  // x transposed (non-unit last stride); y a column slice of a wider tensor (strided rows).
  at::manual_seed(101);
  const at::Tensor xt = at::randn({40, 9}).t();
  at::Tensor wide = at::randn({9, 50});
  const at::Tensor before = wide.clone();
  at::Tensor ysl = wide.narrow(1, 10, 24);
  ref = reference(ysl, xt, p.A, p.B, -1.5);
  lora_ext::cpu::lora_apply_cpu(ysl, xt, p.A, p.B, -1.5);
  EXPECT(rel_err(wide.narrow(1, 10, 24), ref) < 1e-5, "column slice: rel err ", rel_err(ysl, ref));
  EXPECT(at::equal(wide.narrow(1, 0, 10), before.narrow(1, 0, 10)) &&
            at::equal(wide.narrow(1, 34, 16), before.narrow(1, 34, 16)),
        "columns outside the slice of y were modified");

  // y a non-contiguous 3-D view (the kernel works on a copy and copies back), fp16.
  Problem h = make(12, 33, 20, 3, at::kHalf, 102);
  at::Tensor yt = h.y.view({4, 3, 20}).transpose(0, 1);  // [3, 4, 20], not contiguous
  const at::Tensor x3 = h.x.view({4, 3, 33}).transpose(0, 1);
  ref = reference(yt, x3, h.A, h.B, 0.5);
  lora_ext::cpu::lora_apply_cpu(yt, x3, h.A, h.B, 0.5);
  EXPECT(rel_err(yt, ref) < rtol(at::kHalf), "non-contiguous y: rel err ", rel_err(yt, ref));
}

void test_degenerate_sizes() {
  for (at::ScalarType dt : {at::kFloat, at::kHalf, at::kBFloat16}) {
    // T = 0, out = 0 and in = 0 (x @ A^T is then 0): y must come back unchanged.
    const int64_t sizes[][4] = {{0, 8, 8, 2}, {5, 8, 0, 2}, {5, 0, 7, 3}};
    for (const auto& s : sizes) {
      Problem p = make(s[0], s[1], s[2], s[3], dt, 200);
      const at::Tensor before = p.y.clone();
      lora_ext::cpu::lora_apply_cpu(p.y, p.x, p.A, p.B, 3.0);
      EXPECT(at::equal(p.y, before), dt, " T=", s[0], " in=", s[1], " out=", s[2], ": y changed");
    }
    // scale = 0 adds exact zeros.
    Problem p = make(9, 31, 17, 5, dt, 201);
    const at::Tensor before = p.y.clone();
    lora_ext::cpu::lora_apply_cpu(p.y, p.x, p.A, p.B, 0.0);
    EXPECT(at::equal(p.y, before), dt, " scale=0: y changed");
  }
}

void test_thread_count_invariance() {
  // Each token block is computed by one thread in a fixed order: results must not depend on
  // how the blocks are split (4 threads force a split even on a 2-core machine).
  const int saved = at::get_num_threads();
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
    Problem p = make(203, 96, 80, 8, dt, 300);
    at::Tensor y1 = p.y.clone(), y4 = p.y.clone();
    at::set_num_threads(1);
    lora_ext::cpu::lora_apply_cpu(y1, p.x, p.A, p.B, 1.25);
    at::set_num_threads(4);
    lora_ext::cpu::lora_apply_cpu(y4, p.x, p.A, p.B, 1.25);
    EXPECT(at::equal(y1, y4), dt, ": 1 and 4 threads give different results");
  }
  at::set_num_threads(saved);
}

// ---- bad input: c10::Error naming the argument, y untouched ----

void expect_error(const char* what, const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT(msg.find(needle) != std::string::npos, what, ": message \"", msg, "\" lacks \"", needle,
          "\"");
    return;
  }
  EXPECT(false, what, ": no c10::Error thrown");
}

void test_bad_input() {
  using lora_ext::cpu::lora_apply_cpu;
  Problem p = make(4, 8, 6, 2, at::kFloat, 400);
  const at::Tensor y0 = p.y.clone();
  auto call = [&](at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B) {
    return [=] { lora_apply_cpu(y, x, A, B, 1.0); };
  };
  expect_error("A 1-D", call(p.y, p.x, p.A.view({-1}), p.B), "A must be 2-D");
  expect_error("B 1-D", call(p.y, p.x, p.A, p.B.view({-1})), "B must be 2-D");
  expect_error("x scalar", call(p.y, p.x.sum(), p.A, p.B), "x must have at least 1 dim");
  expect_error("A width", call(p.y, p.x, at::randn({2, 7}), p.B), "A must be [r, in]");
  expect_error("B rank", call(p.y, p.x, p.A, at::randn({6, 3})), "B must be [out, r]");
  expect_error("y width", call(at::randn({4, 5}), p.x, p.A, p.B), "y.size(-1) must equal out");
  expect_error("y dims", call(p.y.view({1, 4, 6}), p.x, p.A, p.B), "same number of dims");
  expect_error("leading dims", call(at::randn({3, 6}), p.x, p.A, p.B), "leading dims");
  expect_error("rank 0", call(p.y, p.x, at::randn({0, 8}), at::randn({6, 0})), "rank r");
  expect_error("int dtype", call(p.y.to(at::kInt), p.x.to(at::kInt), p.A.to(at::kInt), p.B.to(at::kInt)),
               "x has dtype");
  expect_error("mixed dtype", call(p.y, p.x, p.A.to(at::kHalf), p.B), "A has dtype");
  expect_error("y expanded", call(at::randn({1, 6}).expand({4, 6}), p.x, p.A, p.B),
               "internal overlap");
  const at::Tensor xy = at::randn({4, 8});
  expect_error("y aliases x", call(xy.narrow(1, 0, 6), xy, p.A, p.B), "shares memory with x");
  EXPECT(at::equal(p.y, y0), "y was modified by a rejected call");
}

// ---- registrations (register_cpu.cpp) ----

void test_registration() {
  const auto op = c10::Dispatcher::singleton().findOp(c10::OperatorName("lora_ext::lora_apply_", ""));
  EXPECT(op.has_value(), "lora_ext::lora_apply_ has no registration");
  if (!op) return;
  EXPECT(op->hasKernelForDispatchKey(c10::DispatchKey::CPU), "no CPU kernel for lora_apply_");
#ifdef LORA_EXT_WITH_CUDA
  EXPECT(op->hasKernelForDispatchKey(c10::DispatchKey::CUDA), "no CUDA kernel for lora_apply_");
#endif
}

struct NamedTest {
  const char* name;
  void (*fn)();
};
const NamedTest kTests[] = {
    {"micro_6x16", test_micro_6x16},
    {"micro_tn_8x16", test_micro_tn_8x16},
    {"pack_panels", test_pack_panels},
    {"rows16", test_rows16},
    {"acc_epilogue", test_acc_epilogue},
    {"shrink_bf16", test_shrink_bf16},
    {"merge_pieces", test_merge_pieces},
    {"merge_tiles", test_merge_tiles},
    {"lora_apply_matches_reference", test_lora_apply_matches_reference},
    {"layouts", test_layouts},
    {"degenerate_sizes", test_degenerate_sizes},
    {"thread_count_invariance", test_thread_count_invariance},
    {"bad_input", test_bad_input},
    {"registration", test_registration},
};

}  // namespace
}  // namespace lora_ext_test

int main() {
  using namespace lora_ext_test;
  int failed_tests = 0;
  for (const NamedTest& t : kTests) {
    const int before = g_failures;
    try {
      t.fn();
    } catch (const std::exception& e) {
      ++g_failures;
      std::fprintf(stderr, "%s: unexpected exception: %s\n", t.name, e.what());
    }
    const int n = g_failures - before;
    failed_tests += n > 0;
    std::printf("[%s] %s%s\n", n ? "FAIL" : " OK ", t.name,
                n ? c10::str(" (", n, " failed checks)").c_str() : "");
  }
  const int total = static_cast<int>(sizeof(kTests) / sizeof(kTests[0]));
  std::printf("%d/%d tests passed\n", total - failed_tests, total);
  return failed_tests ? 1 : 0;
}
