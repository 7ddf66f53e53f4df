// C++ unit tests of the CPU micro-kernels on raw buffers (part of test_cpu_kernels, see check.h):
// micro_6x16, micro_tn_8x16 and pack_panels against naive loops; the vector 16-bit row
// conversions (rows16.h) and micro_6x16_acc's 16-bit epilogue bit for bit against c10's scalar
// ones; the AVX512-BF16 shrink kernels against fp64.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include "check.h"
#include "cpu/lowrank_microkernel.h"
#include "cpu/rows16.h"

namespace lora_ext_test {
namespace {

using lora_ext::cpu::kMR;
using lora_ext::cpu::kNR;

}  // namespace

// ---- micro-kernel and packing against naive loops ----

void test_micro_6x16() {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  for (int64_t K : {0, 1, 2, 7, 16, 33, 300}) {
    const int64_t ld = K + 3;  // rows anywhere in memory: a gap between them
    std::vector<float> a(kMR * ld), panel(K * kNR);
    for (float& v : a) v = dist(rng);
    for (float& v : panel) v = dist(rng);
    const float* rows[kMR];
    for (int m = 0; m < kMR; ++m) rows[m] = a.data() + m * ld;
    rows[4] = rows[1];  // rows may alias (the kernels point short tails at one zero row)
    float out[kMR][kNR];
    for (auto& row : out)
      for (float& v : row) v = std::numeric_limits<float>::quiet_NaN();
    lora_ext::cpu::micro_6x16(K, rows, panel.data(), out);
    for (int m = 0; m < kMR; ++m) {
      for (int n = 0; n < kNR; ++n) {
        double ref = 0, mag = 0;
        for (int64_t k = 0; k < K; ++k) {
          ref += double(rows[m][k]) * panel[k * kNR + n];
          mag += std::fabs(double(rows[m][k]) * panel[k * kNR + n]);
        }
        EXPECT(std::fabs(out[m][n] - ref) <= 1e-5 * mag, "K=", K, " m=", m,
              " n=", n, ": got ", out[m][n], ", want ", ref);
      }
    }
  }
}

// c[m][0:16] += sum_k a[k * lda + m] * brows[k][n0:16]: accumulates onto what c holds, reads the
// 8 columns of a at any row stride, rows of b anywhere (aliased rows too), K = 0 leaves c alone.
void test_micro_tn_8x16() {
  using lora_ext::cpu::kTR;
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  for (int64_t K : {0, 1, 2, 7, 24, 301}) {
    const int64_t lda = kTR + 5, ldb = 40, n0 = 11;  // b columns [11, 27) of 40-wide rows
    std::vector<float> a(std::max<int64_t>(K, 1) * lda), b(std::max<int64_t>(K, 1) * ldb), c(kTR * kNR);
    for (float& v : a) v = dist(rng);
    for (float& v : b) v = dist(rng);
    for (float& v : c) v = dist(rng);
    std::vector<const float*> brows(std::max<int64_t>(K, 1));
    for (int64_t k = 0; k < K; ++k) brows[k] = b.data() + (k == 3 ? 1 : k) * ldb;  // row 3 aliases row 1
    const std::vector<float> c0 = c;
    float* crow[kTR];
    for (int m = 0; m < kTR; ++m) crow[m] = c.data() + m * kNR;
    lora_ext::cpu::micro_tn_8x16_acc(K, a.data(), lda, brows.data(), n0, crow);
    for (int m = 0; m < kTR; ++m) {
      for (int n = 0; n < kNR; ++n) {
        double ref = c0[m * kNR + n], mag = std::fabs(ref);
        for (int64_t k = 0; k < K; ++k) {
          ref += double(a[k * lda + m]) * brows[k][n0 + n];
          mag += std::fabs(double(a[k * lda + m]) * brows[k][n0 + n]);
        }
        EXPECT(std::fabs(c[m * kNR + n] - ref) <= 1e-5 * mag + 1e-7, "K=", K, " m=", m, " n=", n,
               ": got ", c[m * kNR + n], ", want ", ref);
      }
    }
  }
}

template <class T>
void check_pack_panels(const char* name) {
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> dist(-4.f, 4.f);
  const float sentinel = -777.f;
  auto load = [](T v) { return static_cast<float>(v); };
  struct Case {
    int64_t N, K, ld;
  };
  for (Case c : {Case{1, 1, 1}, Case{15, 3, 5}, Case{16, 4, 4}, Case{17, 5, 9}, Case{40, 2, 2}}) {
    const int64_t P = (c.N + kNR - 1) / kNR;
    std::vector<T> src(c.N * c.ld);
    for (T& v : src) v = static_cast<T>(dist(rng));
    for (int64_t p_begin : {int64_t{0}, std::min<int64_t>(1, P)}) {  // all panels, or all but panel 0
      std::vector<float> dst(P * c.K * kNR, sentinel);
      lora_ext::cpu::pack_panels(src.data(), c.N, c.K, c.ld, dst.data(), load, p_begin, P);
      for (int64_t p = 0; p < P; ++p) {
        for (int64_t k = 0; k < c.K; ++k) {
          for (int64_t col = 0; col < kNR; ++col) {
            const int64_t j = p * kNR + col;
            const float want = p < p_begin ? sentinel : j < c.N ? load(src[j * c.ld + k]) : 0.f;
            const float got = dst[(p * c.K + k) * kNR + col];
            EXPECT(got == want, name, " N=", c.N, " K=", c.K, " ld=", c.ld, " p_begin=", p_begin,
                  " [", p, "][", k, "][", col, "]: got ", got, ", want ", want);
          }
        }
      }
    }
  }
}

void test_pack_panels() {
  check_pack_panels<float>("float32");
  check_pack_panels<c10::Half>("float16");
  check_pack_panels<c10::BFloat16>("bfloat16");
}

// ---- 16-bit rows (rows16.h) against c10's scalar conversions, bit for bit ----

template <class C, class E>
void check_rows16(const char* name) {
  // widening: every 16-bit pattern
  std::vector<E> all(1 << 16);
  for (uint32_t h = 0; h < (1u << 16); ++h) std::memcpy(&all[h], &h, 2);
  std::vector<float> wide(all.size());
  lora_ext::cpu::to_f32(all.data(), static_cast<int64_t>(all.size()), wide.data());
  int bad = 0;
  for (uint32_t h = 0; h < (1u << 16); ++h) {
    const float ref = static_cast<float>(C(static_cast<uint16_t>(h), C::from_bits()));
    bad += std::memcmp(&ref, &wide[h], 4) != 0 && !(std::isnan(ref) && std::isnan(wide[h]));
  }
  EXPECT(bad == 0, name, ": ", bad, " 16-bit patterns widen to other fp32 values than c10's");
  // narrowing: every pattern with low bits at and around the rounding points (ties, both
  // neighbours), plus random patterns; NaNs, infinities, subnormals and overflow included
  std::vector<float> f;
  const int drop = std::is_same_v<E, uint16_t> ? 16 : 13;  // fp32 mantissa bits the type drops
  const uint32_t half = 1u << (drop - 1);
  for (uint32_t hi = 0; hi < (1u << (32 - drop)); hi += (drop == 16 ? 1 : 7))
    for (uint32_t lo : {0u, 1u, half - 1, half, half + 1, (1u << drop) - 1}) {
      const uint32_t w = (hi << drop) | lo;
      float v;
      std::memcpy(&v, &w, 4);
      f.push_back(v);
    }
  std::mt19937 gen(5);
  for (int i = 0; i < (1 << 20); ++i) {
    const uint32_t w = gen();
    float v;
    std::memcpy(&v, &w, 4);
    f.push_back(v);
  }
  std::vector<E> narrow(f.size());
  lora_ext::cpu::from_f32(f.data(), static_cast<int64_t>(f.size()), narrow.data());
  bad = 0;
  for (size_t i = 0; i < f.size(); ++i) {
    const uint16_t ref = C(f[i]).x;
    bad += std::memcmp(&ref, &narrow[i], 2) != 0;
  }
  EXPECT(bad == 0, name, ": ", bad, " of ", f.size(), " fp32 values round to other bits than c10's");
  // y = round(y + a x), with a tail (n % 8 != 0)
  const int64_t n = 1003;
  std::vector<E> y(n), y0(n);
  std::vector<float> x(n);
  std::normal_distribution<float> nd;
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t b = C(nd(gen)).x;
    std::memcpy(&y0[i], &b, 2);
    x[i] = nd(gen);
  }
  y = y0;
  lora_ext::cpu::axpy_rounded(y.data(), x.data(), 0.37f, n);
  bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint16_t b0;
    std::memcpy(&b0, &y0[i], 2);
    const float prod = 0.37f * x[i];
    const uint16_t ref = C(static_cast<float>(C(b0, C::from_bits())) + prod).x;
    bad += std::memcmp(&ref, &y[i], 2) != 0;
  }
  EXPECT(bad == 0, name, ": axpy_rounded differs from the scalar update in ", bad, " of ", n);
}

void test_rows16() {
  check_rows16<c10::BFloat16, uint16_t>("bf16");
  check_rows16<c10::Half, _Float16>("fp16");
}

// ---- the accumulating micro-kernel's epilogue into 16-bit rows, and the bf16 dot shrink ----

// dst = round(src + tile) with alpha = 1 (one rounding whether or not a*b+c is fused): every
// 16-bit pattern as src, in place and from another row, bit for bit against c10's conversions
// of micro_6x16's tile.
template <class C, class E>
void check_acc_epilogue(const char* name) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-2.f, 2.f);
  const int64_t K = 3;
  std::vector<float> a(kMR * K), panel(K * kNR);
  for (float& v : a) v = dist(rng);
  for (float& v : panel) v = dist(rng);
  const float* rows[kMR];
  for (int m = 0; m < kMR; ++m) rows[m] = a.data() + m * K;
  float tile[kMR][kNR];
  lora_ext::cpu::micro_6x16(K, rows, panel.data(), tile);
  std::vector<E> all(1 << 16);
  for (uint32_t h = 0; h < (1u << 16); ++h) std::memcpy(&all[h], &h, 2);
  for (bool in_place : {true, false}) {
    std::vector<E> dst = all;
    int bad = 0;
    for (size_t i0 = 0; i0 < all.size(); i0 += kMR * kNR) {
      const E* src[kMR];
      E* out[kMR];
      E scratch[kNR];
      for (int m = 0; m < kMR; ++m) {
        const size_t i = i0 + m * kNR;
        src[m] = i < all.size() ? all.data() + i : all.data();
        out[m] = i < all.size() ? (in_place ? dst.data() + i : dst.data() + (all.size() - kNR - i)) : scratch;
        if (in_place) src[m] = out[m];
      }
      lora_ext::cpu::micro_6x16_acc(K, rows, panel.data(), src, out, 1.f);
      for (int m = 0; m < kMR && i0 + m * kNR < all.size(); ++m)
        for (int n = 0; n < kNR; ++n) {
          const size_t i = i0 + m * kNR + n;
          uint16_t h;
          std::memcpy(&h, &all[i], 2);
          const uint16_t ref = C(static_cast<float>(C(h, C::from_bits())) + tile[m][n]).x;
          bad += std::memcmp(&ref, out[m] + n, 2) != 0;
        }
    }
    EXPECT(bad == 0, name, in_place ? " in place" : " from another row", ": ", bad,
           " of 65536 patterns differ from c10's round(src + tile)");
  }
}

void test_acc_epilogue() {
  check_acc_epilogue<c10::BFloat16, uint16_t>("bf16");
  check_acc_epilogue<c10::Half, _Float16>("fp16");
}

// shrink_block_bf16 and shrink_rows_bf16 (where the CPU has AVX512-BF16) against an fp64 sum of
// the exact products: odd and even K (the last element read alone), several K chunks, K % 32
// tails, 1..kTB rows, r past a panel; x past K is NaN, so a read past a row shows.
void test_shrink_bf16() {
  namespace cpu = lora_ext::cpu;
  if (!cpu::bf16_dot()) {
    std::printf("shrink_bf16: no AVX512-BF16 on this CPU (or LORA_EXT_CPU_ISA), fp32 path only\n");
    return;
  }
  std::mt19937 rng(11);
  std::normal_distribution<float> nd;
  auto bf = [&](float v) { return c10::BFloat16(v).x; };
  for (int64_t K : {1, 2, 7, 33, 256, 513, 1030})
    for (int64_t nt : {int64_t{1}, int64_t{5}, cpu::kTB})
      for (int64_t r : {1, 6, 16, 21}) {
        const int64_t ld = K + 3, rp = (r + kNR - 1) / kNR, us = rp * kNR;
        std::vector<uint16_t> x(nt * ld), A(r * K), Apk(rp * ((K + 1) / 2) * 2 * kNR), zeros(K + 1, 0);
        for (int64_t i = 0; i < nt * ld; ++i) x[i] = i % ld < K ? bf(nd(rng)) : 0x7FC0;  // NaN past K
        for (auto& v : A) v = bf(nd(rng));
        cpu::pack_pairs_bf16(A.data(), r, K, K, Apk.data(), 0, rp);
        std::vector<const uint16_t*> rows(nt);
        for (int64_t q = 0; q < nt; ++q) rows[q] = x.data() + q * ld;  // x[q, K:ld] (NaN) stays unread
        std::vector<float> u(nt * us, 0.5f);
        cpu::shrink_block_bf16(nt, K, rp, rows.data(), Apk.data(), u.data(), us, zeros.data());
        double worst = 0;
        for (int64_t q = 0; q < nt; ++q)
          for (int64_t j = 0; j < us; ++j) {
            double ref = 0.5, mag = 0.5;
            for (int64_t k = 0; j < r && k < K; ++k) {
              const double p = double(c10::BFloat16(x[q * ld + k], c10::BFloat16::from_bits())) *
                               double(c10::BFloat16(A[j * K + k], c10::BFloat16::from_bits()));
              ref += p;
              mag += std::fabs(p);
            }
            const double err = std::fabs(u[q * us + j] - ref) / mag;
            worst = std::isnan(err) || std::isnan(worst) ? NAN : std::max(worst, err);
          }
        EXPECT(worst <= 4e-7 * std::sqrt(double(K)), "K=", K, " nt=", nt, " r=", r, ": error ", worst);
        // the few-tokens kernel on the same rows, A unpacked (up to 4 tokens, u overwritten)
        for (int64_t q0 = 0; q0 < nt; q0 += 4) {
          const int n4 = static_cast<int>(std::min<int64_t>(4, nt - q0));
          std::vector<float> u4(4 * r, 0.5f);
          float* urows[4];
          for (int t = 0; t < 4; ++t) urows[t] = u4.data() + t * r;
          cpu::shrink_rows_bf16(A.data(), K, r, rows.data() + q0, n4, K, urows);
          double bad = 0;
          for (int t = 0; t < 4; ++t)
            for (int64_t j = 0; j < r; ++j) {
              const double got = u4[t * r + j];
              if (t >= n4) {
                bad += got != 0.5f;  // rows past nt untouched
                continue;
              }
              double ref = 0, mag = 0;
              for (int64_t k = 0; k < K; ++k) {
                const double p = double(c10::BFloat16(x[(q0 + t) * ld + k], c10::BFloat16::from_bits())) *
                                 double(c10::BFloat16(A[j * K + k], c10::BFloat16::from_bits()));
                ref += p;
                mag += std::fabs(p);
              }
              bad += !(std::fabs(got - ref) <= 4e-7 * std::sqrt(double(K)) * mag + 1e-30);
            }
          EXPECT(bad == 0, "shrink_rows_bf16 K=", K, " nt=", n4, " r=", r, ": ", bad, " wrong");
        }
      }
}

}  // namespace lora_ext_test
