// C++ tests of csrc/cpu/merge_kernels.cpp: remerge_'s row pieces, merge_kernels::transition_piece (the
// AVX-512 form where the kernel set picked has it, else the element loop) against merge_math's
// scalar transition, element by element: W bits, failure masks and code bits must be equal.
// Every fp16 / bf16 pattern (fp32: random patterns and specials) under sums near |W| (the
// windows the codes pick from), tiny and huge sums, ±0, ±inf and NaN; code widths 0, 1, 2, 4;
// first merge, remerge and unmerge; pieces of 1..16 elements at unaligned code bit offsets.
// And merge_cpu (its tiles: AVX-512, AVX2 or portable, as picked) against the element-wise
// definition: fl32(s * B), the fma chain over the rank from +0, merged().
#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "cpu/merge_kernels.h"
#include "cpu/ops_cpu.h"
#include "merge_math.h"

namespace lora_ext_test {
namespace {

namespace mm = lora_ext::merge_math;
namespace mv = lora_ext::cpu::merge_kernels;

// A sum for an element of value w: mostly a fraction or multiple of |w| (both signs), else one
// of the special values.
float sum_for(float w, std::mt19937& rng) {
  static const float special[] = {0.f, -0.f, 1e-40f, -1e-40f, 6e-8f, 1e-3f, -0.5f, 65504.f, -65520.f,
                                  3e38f, std::numeric_limits<float>::infinity(),
                                  -std::numeric_limits<float>::infinity(),
                                  std::numeric_limits<float>::quiet_NaN()};
  static const float factor[] = {1e-6f, 1e-3f, 3e-3f, 0.01f, 0.1f, 0.3f, 1.f, 3.f, 100.f};
  const uint32_t r = rng();
  if (r % 8 == 0 || !std::isfinite(w) || w == 0.f) return special[(r >> 3) % 13];
  const float f = factor[(r >> 3) % 9] * (1.f + static_cast<float>((r >> 8) % 1000) / 1000.f);
  return (r >> 20) & 1 ? w * f : -w * f;
}

template <class F, class R>
void check_format(const char* name, const std::vector<R>& w_in, uint32_t seed) {
  const int64_t N = static_cast<int64_t>(w_in.size());
  std::mt19937 rng(seed);
  std::vector<float> so(N + 16), sn(N + 16);
  for (int64_t e = 0; e < N; ++e) {
    const float w = mm::decode(F{}, w_in[e]);
    so[e] = sum_for(w, rng);
    sn[e] = sum_for(w, rng);
  }
  const bool modes[3][2] = {{false, true}, {true, true}, {true, false}};  // (has_old, has_new)
  for (const int k : {0, 1, 2, 4}) {
    for (const auto& mode : modes) {
      const bool has_old = mode[0], has_new = mode[1];
      const int64_t nwords = (N * k + 31) / 32 + 1;
      std::vector<uint32_t> codes_got(nwords), codes_ref(nwords);
      if (has_old)
        for (auto& c : codes_got) c = rng();
      codes_ref = codes_got;
      std::vector<R> got = w_in, ref = w_in;
      int64_t bad = 0;
      for (int64_t e0 = 0; e0 < N;) {
        const int n = static_cast<int>(std::min<int64_t>(1 + rng() % 16, N - e0));
        const uint32_t fail = mv::transition_piece<F>(got.data() + e0, n, e0, so.data() + e0,
                                                      sn.data() + e0, codes_got.data(), k, has_old, has_new);
        uint32_t fail_ref = 0;
        for (int c = 0; c < n; ++c) {
          const int64_t e = e0 + c;
          uint32_t v = ref[e], code;
          if (!has_old) {
            code = mm::code_of<F>(v, k);
            if (k) codes_ref[(e * k) >> 5] |= code << ((e * k) & 31);
          } else {
            code = mm::read_code(codes_ref.data(), e, k);
          }
          if (!mm::transition<F>(v, has_old ? so[e] : 0.f, has_new ? sn[e] : 0.f, code, k, has_old, has_new))
            fail_ref |= 1u << c;
          ref[e] = static_cast<R>(v);
          if (got[e] != ref[e] && bad++ < 3)
            EXPECT(false, name, " k=", k, " has_old=", has_old, " has_new=", has_new, " element ", e,
                   ": w ", w_in[e], " s_old ", so[e], " s_new ", sn[e], " -> ", got[e], ", scalar ", ref[e]);
        }
        EXPECT(fail == fail_ref || bad > 3, name, " k=", k, " failure mask at ", e0, ": ", fail, " vs ",
               fail_ref);
        e0 += n;
      }
      EXPECT(bad == 0, name, " k=", k, " has_old=", has_old, " has_new=", has_new, ": ", bad,
             " elements differ");
      EXPECT(codes_got == codes_ref, name, " k=", k, ": code bits differ");
    }
  }
}

// raw bits of element i of a contiguous fp32 / fp16 / bf16 tensor
uint32_t raw(const at::Tensor& t, int64_t i) {
  if (t.scalar_type() == at::kFloat) {
    uint32_t u;
    std::memcpy(&u, t.data_ptr<float>() + i, 4);
    return u;
  }
  return static_cast<const uint16_t*>(t.data_ptr())[i];
}

template <class F>
void check_merge(at::ScalarType dt, int64_t P, int64_t Q, int64_t r) {
  at::manual_seed(P * 1000 + Q + r);
  at::Tensor W0 = (at::randn({P, Q}) * 0.02).to(dt), A = at::randn({r, Q}).to(dt),
             B = (at::randn({P, r}) * 0.01).to(dt);
  // specials in W0: NaN payloads of both signs, infinities, zeros, a subnormal
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  const double specials[] = {nan, -nan, inf, -inf, 0.0, -0.0, 1e-41};
  for (int64_t i = 0; i < std::min<int64_t>(7, P * Q); ++i) W0.view(-1)[(i * 7919) % (P * Q)] = specials[i];
  const double scale = 0.7;
  at::Tensor W = W0.clone();
  lora_ext::cpu::merge_cpu(W, {A}, {B}, {scale}, false);
  const at::Tensor Af = A.to(at::kFloat).contiguous(), Bf = B.to(at::kFloat).contiguous();
  const float s = static_cast<float>(scale);
  int64_t bad = 0;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t q = 0; q < Q; ++q) {
      float S = 0.f;
      for (int64_t j = 0; j < r; ++j)
        S = mm::fma_rn(s * Bf.data_ptr<float>()[p * r + j], Af.data_ptr<float>()[j * Q + q], S);
      const uint32_t want = mm::merged<F>(raw(W0, p * Q + q), S, true), got = raw(W, p * Q + q);
      if (got != want && bad++ < 3)
        EXPECT(false, "merge_cpu ", dt, " ", P, "x", Q, " r=", r, " element (", p, ", ", q, "): ", got,
               ", element-wise ", want);
    }
  EXPECT(bad == 0, "merge_cpu ", dt, " ", P, "x", Q, " r=", r, ": ", bad, " elements differ");
}

}  // namespace

void test_merge_tiles() {
  for (const auto& [P, Q, r] : {std::array<int64_t, 3>{6, 16, 1}, {12, 32, 16}, {7, 17, 3}, {13, 35, 16},
                                {64, 64, 64}, {1, 5, 2}, {100, 48, 17}}) {
    check_merge<mm::F32>(at::kFloat, P, Q, r);
    check_merge<mm::F16>(at::kHalf, P, Q, r);
    check_merge<mm::BF16>(at::kBFloat16, P, Q, r);
  }
}

void test_merge_pieces() {
  std::vector<uint16_t> all16(65536);
  for (int i = 0; i < 65536; ++i) all16[i] = static_cast<uint16_t>(i);
  check_format<mm::BF16>("bf16", all16, 1);
  check_format<mm::F16>("fp16", all16, 2);
  // fp32: random patterns (NaN payloads of both signs included), values near ±1, and specials
  std::mt19937 rng(3);
  std::vector<uint32_t> w32;
  for (int i = 0; i < 40000; ++i) w32.push_back(rng());
  std::normal_distribution<float> normal(0.f, 0.02f);
  for (int i = 0; i < 40000; ++i) {
    const float f = normal(rng);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    w32.push_back(u);
  }
  for (uint32_t u : {0u, 0x80000000u, 1u, 0x80000001u, 0x007FFFFFu, 0x7F7FFFFFu, 0xFF7FFFFFu,
                     0x7F800000u, 0xFF800000u, 0x7FC00000u, 0xFFC00001u, 0x7F800001u})
    w32.push_back(u);
  check_format<mm::F32>("fp32", w32, 4);
  std::printf("  merge pieces: %s\n", mv::available() ? "AVX-512" : "element loop");
}

}  // namespace lora_ext_test
