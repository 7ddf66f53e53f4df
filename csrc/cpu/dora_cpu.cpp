// CPU kernel of dora_norm: DoRA's column norm n[o] = ||W[o, :] + s (B A)[o, :]||, in the reduction
// order of ../dora_math.h (the CUDA kernel's, bit for bit).
//
// Tiling: merge_'s 6 x 16 delta tiles S = L R (merge_kernels::s_tile: merge_'s fma chains, AVX-512 /
// AVX2 / portable), each folded straight into sums of squares (v = dec(W) + S, acc = fma(v, v, acc),
// 16 lanes at a time). W is read once, in place; nothing of size [out, in] is allocated.
//   rows (`in` along the view's rows): a task is a block of 6 rows walked chunk by chunk (512
//     columns); the 128 class sums of each row live in a 6 x 128 array (L1) and are combined at
//     every chunk end, the chunk partials added in order in registers.
//   columns (`in` down the view's columns, fan_in_fan_out): a task is a chunk of 512 rows x a block
//     of 256 columns with 8 class sums per column (8 x 256 floats, L1); its partials go to a small
//     [chunks, out] workspace, summed in chunk order by a last pass over the outputs.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../dora_math.h"
#include "../merge_glue.h"
#include "merge_kernels.h"
#include "ops_cpu.h"
#include "vec16.h"  // immintrin.h (GCC 12 warning silenced)

namespace lora_ext::cpu {
namespace {

namespace mm = lora_ext::merge_math;
namespace dm = lora_ext::dora_math;
constexpr int kDR = merge_kernels::kTileRows;  // 6
constexpr int kDC = merge_kernels::kTileCols;  // 16
constexpr int64_t kChunk = dm::kDoraChunk;
constexpr int64_t kColBlock = 256;  // columns per task in column mode

// acc[m][l] = fma(v, v, acc[m][l]) with v = dec(W[m * ld + l]) + S[m][l], for m < rows, l < nc
// (rows in order: rows sharing an accumulator chain in ascending row order). Every path gives
// the same bits (exact decoders, correctly rounded add and fma); the vector ones take whole
// 16-column pieces, the scalar code the tails.
using SqRows = void (*)(const void*, int64_t, int, int, const float (*)[kDC], float* const*);

template <class F, class R>
void sq_scalar(const void* W, int64_t ld, int rows, int nc, const float (*S)[kDC], float* const* acc) {
  for (int m = 0; m < rows; ++m) {
    const R* w = static_cast<const R*>(W) + m * ld;
    for (int l = 0; l < nc; ++l) {
      const float v = mm::decode(F{}, w[l]) + S[m][l];
      acc[m][l] = mm::fma_rn(v, v, acc[m][l]);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define LORA_EXT_DORA_VEC 1
#define LORA_EXT_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define LORA_EXT_AVX2 __attribute__((target("avx2,fma,f16c")))

template <class F>
LORA_EXT_AVX512 inline __m512 dec16(const void* p) {
  if constexpr (F::kBits == 32) {
    return _mm512_loadu_ps(p);
  } else {
    const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
    if constexpr (F::kNaN == mm::F16::kNaN) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <class F, class R>
LORA_EXT_AVX512 void sq_avx512(const void* W, int64_t ld, int rows, int nc, const float (*S)[kDC],
                               float* const* acc) {
  if (nc < kDC) return sq_scalar<F, R>(W, ld, rows, nc, S, acc);
  for (int m = 0; m < rows; ++m) {
    const __m512 v = _mm512_add_ps(dec16<F>(static_cast<const R*>(W) + m * ld), _mm512_loadu_ps(S[m]));
    _mm512_storeu_ps(acc[m], _mm512_fmadd_ps(v, v, _mm512_loadu_ps(acc[m])));
  }
}

template <class F>
LORA_EXT_AVX2 inline __m256 dec8(const void* p) {
  if constexpr (F::kBits == 32) {
    return _mm256_loadu_ps(static_cast<const float*>(p));
  } else {
    const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
    if constexpr (F::kNaN == mm::F16::kNaN) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

template <class F, class R>
LORA_EXT_AVX2 void sq_avx2(const void* W, int64_t ld, int rows, int nc, const float (*S)[kDC],
                           float* const* acc) {
  if (nc < kDC) return sq_scalar<F, R>(W, ld, rows, nc, S, acc);
  for (int m = 0; m < rows; ++m) {
    const R* w = static_cast<const R*>(W) + m * ld;
    for (int h = 0; h < kDC; h += 8) {
      const __m256 v = _mm256_add_ps(dec8<F>(w + h), _mm256_loadu_ps(S[m] + h));
      _mm256_storeu_ps(acc[m] + h, _mm256_fmadd_ps(v, v, _mm256_loadu_ps(acc[m] + h)));
    }
  }
}
#endif

// The path of the kernel set picked (merge_kernels.h: AVX-512, AVX2 + FMA + F16C, portable).
template <class F>
SqRows sq_rows() {
  using R = std::conditional_t<F::kBits == 32, uint32_t, uint16_t>;
#ifdef LORA_EXT_DORA_VEC
  if (merge_kernels::available()) return sq_avx512<F, R>;
  if (merge_kernels::avx2_tiles()) return sq_avx2<F, R>;
#endif
  return sq_scalar<F, R>;
}

// dora_math::row_combine on 4-lane vectors (the same adds of the same pairs: the same bits).
typedef float v4 __attribute__((vector_size(16)));
float row_combine(const float* x) {
  v4 v[dm::kRowClasses / 4];
  std::memcpy(v, x, sizeof(v));
  for (int h = dm::kRowClasses / 8; h >= 1; h >>= 1)  // halvings 64 .. 4, in vectors of 4
    for (int k = 0; k < h; ++k) v[k] = v[k] + v[k + h];
  return (v[0][0] + v[0][1]) + (v[0][2] + v[0][3]);
}

// The kernel's view of the problem: W [P, Q] (row stride ld, element size esz), operands of
// merge_ (Rt == 0: S = 0), the output.
struct Job {
  const char* w;
  int64_t P, Q, ld, esz;
  const float* L;   // [Ppad, Rt]
  const float* Rp;  // panels [Qpad / 16][Rt][16]
  int64_t Rt, Ppad;
  SqRows sq;
  merge_kernels::STile tile;
  float* out;
};

const float kZeroS[kDR][kDC] = {};

// S for rows p0.. p0 + 5 of the view and columns q0 .. q0 + 15 (L rows past Ppad read as zero).
const float (*delta(const Job& j, const float* Lp, int64_t q0, float (*S)[kDC]))[kDC] {
  if (j.Rt == 0) return kZeroS;
  j.tile(Lp, j.Rt, j.Rp + q0 * j.Rt, kDC, S);
  return S;
}

void rows_mode(const Job& j) {
  const int64_t nblk = (j.P + kDR - 1) / kDR;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, kDR * j.Q * (j.Rt + 2)));
  at::parallel_for(0, nblk, grain, [&](int64_t b0, int64_t b1) {
    alignas(64) float A[kDR][dm::kRowClasses];
    alignas(64) float S[kDR][kDC];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t p0 = b * kDR;
      const int rows = static_cast<int>(std::min<int64_t>(kDR, j.P - p0));
      const char* W = j.w + p0 * j.ld * j.esz;
      float total[kDR] = {};
      for (int64_t c0 = 0; c0 < j.Q; c0 += kChunk) {
        std::memset(A, 0, sizeof(A));
        const int64_t c1 = std::min(j.Q, c0 + kChunk);
        for (int64_t q0 = c0; q0 < c1; q0 += kDC) {
          const int nc = static_cast<int>(std::min<int64_t>(kDC, c1 - q0));
          const int cls = static_cast<int>((q0 - c0) % dm::kRowClasses);
          float* const acc[kDR] = {A[0] + cls, A[1] + cls, A[2] + cls, A[3] + cls, A[4] + cls, A[5] + cls};
          j.sq(W + q0 * j.esz, j.ld, rows, nc, delta(j, j.Rt ? j.L + p0 * j.Rt : nullptr, q0, S), acc);
        }
        for (int m = 0; m < rows; ++m) {
          const float part = row_combine(A[m]);
          total[m] = c0 == 0 ? part : total[m] + part;
        }
      }
      for (int m = 0; m < rows; ++m) j.out[p0 + m] = dm::finish(total[m]);
    }
  });
}

template <class F>
void cols_mode(const Job& j) {
  const int64_t chunks = (j.P + kChunk - 1) / kChunk, nblk = (j.Q + kColBlock - 1) / kColBlock;
  std::vector<float> ws(static_cast<size_t>(chunks * j.Q));
  at::parallel_for(0, chunks * nblk, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) float C[dm::kColClasses][kColBlock];
    alignas(64) float S[kDR][kDC];
    std::vector<float> lbuf;  // L rows of a tile that reaches past Ppad, zero padded
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ck = t / nblk, c0 = ck * kChunk, c1 = std::min(j.P, c0 + kChunk);
      const int64_t qb = (t % nblk) * kColBlock, qe = std::min(j.Q, qb + kColBlock);
      std::memset(C, 0, sizeof(C));
      for (int64_t p0 = c0; p0 < c1; p0 += kDR) {
        const int rows = static_cast<int>(std::min<int64_t>(kDR, c1 - p0));
        const float* Lp = j.Rt ? j.L + p0 * j.Rt : nullptr;
        if (j.Rt && p0 + kDR > j.Ppad) {
          lbuf.assign(static_cast<size_t>(kDR * j.Rt), 0.f);
          std::memcpy(lbuf.data(), Lp, static_cast<size_t>((j.Ppad - p0) * j.Rt) * sizeof(float));
          Lp = lbuf.data();
        }
        int cls[kDR];
        for (int m = 0; m < kDR; ++m) cls[m] = dm::col_class<F>(p0 + m);
        const char* W = j.w + p0 * j.ld * j.esz;
        for (int64_t q0 = qb; q0 < qe; q0 += kDC) {
          const int nc = static_cast<int>(std::min<int64_t>(kDC, qe - q0));
          float* acc[kDR];
          for (int m = 0; m < kDR; ++m) acc[m] = C[cls[m]] + (q0 - qb);
          j.sq(W + q0 * j.esz, j.ld, rows, nc, delta(j, Lp, q0, S), acc);
        }
      }
      float* part = ws.data() + ck * j.Q;
      for (int64_t q = qb; q < qe; ++q) {
        const int64_t k = q - qb;
        part[q] = dm::col_combine(C[0][k], C[1][k], C[2][k], C[3][k], C[4][k], C[5][k], C[6][k], C[7][k]);
      }
    }
  });
  at::parallel_for(0, j.Q, 4096, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      float s = ws[q];
      for (int64_t ck = 1; ck < chunks; ++ck) s = s + ws[ck * j.Q + q];
      j.out[q] = dm::finish(s);
    }
  });
}

}  // namespace

at::Tensor dora_norm_cpu(const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                         double scale, bool fan_in_fan_out) {
  const char* op = "dora_norm";
  DoraArgs a = dora_args(op, weight, A, B, scale, fan_in_fan_out);
  TORCH_CHECK(weight.device().is_cpu(), op, ": CPU kernel called with weight on ", weight.device());
  dora_operands(op, a, weight, A, B, scale, fan_in_fan_out, kDR, kDC, kDC);
  at::Tensor out = at::empty({a.out}, weight.options().dtype(at::kFloat));
  if (a.out == 0) return out;
  if (a.in == 0) return out.zero_();
  Job j{};
  j.w = static_cast<const char*>(a.view.data_ptr());
  j.P = a.P;
  j.Q = a.Q;
  j.ld = a.ld;
  j.esz = a.view.element_size();
  j.Rt = a.ops.Rt;
  if (j.Rt) {
    j.L = a.ops.L.data_ptr<float>();
    j.Rp = a.ops.R.data_ptr<float>();
    j.Ppad = a.ops.L.size(0);
  }
  j.tile = merge_kernels::s_tile();
  j.out = out.data_ptr<float>();
  dispatch_dtype<mm::F32, mm::F16, mm::BF16>(a.dtype, [&](auto tag) {
    using F = typename decltype(tag)::type;
    j.sq = sq_rows<F>();
    if (a.rows) {
      rows_mode(j);
    } else {
      cols_mode<F>(j);
    }
  });
  return out;
}

}  // namespace lora_ext::cpu
