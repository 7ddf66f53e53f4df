// CPU emulation of the CUDA subset lora_ext's kernels use, so that csrc/cuda/*.cu compile with the
// host C++ compiler (-DLORA_EXT_EMU, this directory's include/ first on the include path) and run
// on CPU tensors. Used only by the test harness (tests/emu); the real build never sees it.
//
// Execution (runtime.cpp): one block at a time; each CUDA thread is a fiber (ucontext) on the
// launching OS thread. __syncthreads is a real barrier; warp collectives (__shfl_*_sync,
// __ballot_sync, __match_any_sync, __syncwarp) are warp-wide rendezvous; `__shared__` is a
// function-local static (one block runs at a time, so it is per-block memory). The fibers of a
// block run in a different order in each phase between barriers, and blocks in a permuted order,
// under a schedule the harness chooses, so a missing barrier or an order-dependent atomic shows
// as a changed result. Detected and reported as a launch failure (cudaErrorLaunchFailure, message
// from take_errors()): barriers not reached by every thread or reached at different call sites,
// collectives whose mask does not match the arriving lanes or that read an absent lane,
// misaligned 16/8-byte vector accesses, __trap, bad launch configurations (as CUDA), and — with
// the AddressSanitizer build — out-of-bounds global and shared accesses.
// WMMA: each lane's fragment holds the whole tile (element-wise code on frag.x[] is layout
// independent); mma_sync uses only the TF32 bits of its inputs and adds the k products to the
// accumulator in k order (fp32); __float_to_tf32 rounds to nearest, ties away (cvt.rna);
// load/store_matrix_sync check their pointer (32-byte aligned) and ldm (a multiple of 16 bytes).
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>

// ------------------------------------------------------------------ host side: runtime API
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr : int {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);

namespace lora_ext::emu {
// Runs `body` (one call of the kernel) for every thread of every block of the grid.
void launch(const char* file, int line, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            const std::function<void()>& body);
// Detector reports since the last call (empty when none), and the error they raised.
std::string take_errors();
// Reports a detector finding for the running thread (the launch then fails).
void fail(const std::string& what);
// 16/8-byte accesses must be aligned as on the GPU.
void check_align(const void* p, size_t align, const char* what);
}  // namespace lora_ext::emu

// Vector types: copies check the alignment of both sides (a misaligned uint4/float4 access
// is a fault on the GPU).
#define LORA_EXT_EMU_VEC(name, T, N, ...)                                                     \
  struct alignas(sizeof(T) * N) name {                                                       \
    T __VA_ARGS__;                                                                           \
    name() = default;                                                                        \
    name(const name& o) {                                                                    \
      ::lora_ext::emu::check_align(&o, sizeof(name), "read of " #name);                     \
      std::memcpy(static_cast<void*>(this), &o, sizeof(name));                               \
    }                                                                                        \
    name& operator=(const name& o) {                                                         \
      ::lora_ext::emu::check_align(this, sizeof(name), "write of " #name);                  \
      ::lora_ext::emu::check_align(&o, sizeof(name), "read of " #name);                     \
      std::memcpy(static_cast<void*>(this), &o, sizeof(name));                               \
      return *this;                                                                          \
    }                                                                                        \
  };
LORA_EXT_EMU_VEC(uint4, unsigned, 4, x, y, z, w)
LORA_EXT_EMU_VEC(uint2, unsigned, 2, x, y)
LORA_EXT_EMU_VEC(float4, float, 4, x, y, z, w)
#undef LORA_EXT_EMU_VEC
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
  uint4 v;
  v.x = x, v.y = y, v.z = z, v.w = w;
  return v;
}
inline uint2 make_uint2(unsigned x, unsigned y) {
  uint2 v;
  v.x = x, v.y = y;
  return v;
}

// 16-bit float types (bits only: lora_ext builds with __CUDA_NO_HALF_CONVERSIONS__) and their
// conversions, rounded to nearest even like the CUDA intrinsics.
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
namespace lora_ext::emu {
inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace lora_ext::emu
inline float __half2float(__half h) {
  const uint32_t sign = (h.x & 0x8000u) << 16, e = (h.x >> 10) & 0x1Fu, m = h.x & 0x3FFu;
  if (e == 31) return lora_ext::emu::u2f(sign | 0x7F800000u | (m << 13));
  if (e == 0) return (sign ? -1.f : 1.f) * std::ldexp(static_cast<float>(m), -24);
  return lora_ext::emu::u2f(sign | ((e + 112) << 23) | (m << 13));
}
inline __half __float2half_rn(float f) {
  const uint32_t x = lora_ext::emu::f2u(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return {0x7FFF};  // NaN
  if (ax >= 0x477FF000u) return {static_cast<uint16_t>(sign | 0x7C00u)};
  if (ax >= 0x38800000u) {
    const uint32_t m = ax - 0x38000000u;
    return {static_cast<uint16_t>(sign | ((m + 0x0FFFu + ((m >> 13) & 1u)) >> 13))};
  }
  // subnormal: round |f| / 2^-24 to an integer, nearest even (exact in double)
  return {static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(
                                          std::ldexp(static_cast<double>(std::fabs(f)), 24))))};
}
inline float __bfloat162float(__nv_bfloat16 b) { return lora_ext::emu::u2f(uint32_t{b.x} << 16); }
inline __half __ushort_as_half(unsigned short v) { return {v}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = lora_ext::emu::f2u(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return {0x7FFF};
  return {static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16)};
}

// ------------------------------------------------------------------ device side (kernel TUs)
#if defined(LORA_EXT_EMU_DEVICE)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

namespace lora_ext::emu {
struct Thread {
  uint3 tid;
};
extern Thread* g_thread;  // the running fiber's thread
extern uint3 g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

void syncthreads_at(const char* file, int line);
enum class Coll : int { kSyncWarp, kShflIdx, kShflXor, kShflUp, kShflDown, kBallot, kMatchAny };
// Warp-wide rendezvous of the lanes in `mask`; returns this lane's result bits.
uint64_t collective(Coll kind, unsigned mask, uint64_t value, int arg);
// Counts a WMMA op of the running lane (all lanes of a warp must issue the same ones).
void wmma_op();
[[noreturn]] void trap();

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
}  // namespace lora_ext::emu

#define threadIdx (::lora_ext::emu::g_thread->tid)
#define blockIdx (::lora_ext::emu::g_block_idx)
#define blockDim (::lora_ext::emu::g_block_dim)
#define gridDim (::lora_ext::emu::g_grid_dim)

#define __syncthreads() ::lora_ext::emu::syncthreads_at(__FILE__, __LINE__)
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  lora_ext::emu::collective(lora_ext::emu::Coll::kSyncWarp, mask, 0, 0);
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int = 32) {
  using namespace lora_ext::emu;
  return from_bits<T>(collective(Coll::kShflIdx, mask, to_bits(v), src));
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int = 32) {
  using namespace lora_ext::emu;
  return from_bits<T>(collective(Coll::kShflXor, mask, to_bits(v), lane_mask));
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int = 32) {
  using namespace lora_ext::emu;
  return from_bits<T>(collective(Coll::kShflUp, mask, to_bits(v), static_cast<int>(delta)));
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int = 32) {
  using namespace lora_ext::emu;
  return from_bits<T>(collective(Coll::kShflDown, mask, to_bits(v), static_cast<int>(delta)));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  using namespace lora_ext::emu;
  return static_cast<unsigned>(collective(Coll::kBallot, mask, pred != 0, 0));
}
template <class T>
unsigned __match_any_sync(unsigned mask, T v) {
  using namespace lora_ext::emu;
  return static_cast<unsigned>(collective(Coll::kMatchAny, mask, to_bits(v), 0));
}

// Atomics: the fibers of a block never run at the same time, so a plain read-modify-write is
// atomic; their order follows the schedule.
template <class T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <class T>
T atomicOr(T* p, T v) {
  const T old = *p;
  *p = old | v;
  return old;
}
inline void __threadfence() {}

template <class T>
T __ldg(const T* p) {
  return *p;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }  // never contracted into an fma
inline float __fadd_rn(float a, float b) { return a + b; }
inline float fmaf(float a, float b, float c) { return std::fma(a, b, c); }
inline unsigned __float_as_uint(float f) { return lora_ext::emu::f2u(f); }
inline float __uint_as_float(unsigned u) { return lora_ext::emu::u2f(u); }
[[noreturn]] inline void __trap() { lora_ext::emu::trap(); }
template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// WMMA (the m16n16k8 TF32 shape lora_ext uses, fp32 accumulators).
namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K>
constexpr int frag_rows() {
  return std::is_same_v<Use, matrix_b> ? K : M;
}
template <class Use, int M, int N, int K>
constexpr int frag_cols() {
  return std::is_same_v<Use, matrix_a> ? K : N;
}
// Whole tile per lane, row-major [rows][cols].
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = frag_rows<Use, M, N, K>(), cols = frag_cols<Use, M, N, K>();
  static constexpr int num_elements = rows * cols;
  float x[num_elements];
};

inline float __float_to_tf32(float f) {
  uint32_t u = lora_ext::emu::f2u(f);
  if ((u & 0x7F800000u) == 0x7F800000u) return f;  // inf / NaN unchanged
  u = (u + 0x1000u) & ~0x1FFFu;                      // nearest, ties away from zero
  return lora_ext::emu::u2f(u);
}

template <class Use, int M, int N, int K, class T, class L>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
  lora_ext::emu::wmma_op();
  for (float& e : f.x) e = v;
}
// load/store_matrix_sync need a 256-bit aligned pointer and ldm a multiple of 16 bytes (CUDA
// Programming Guide, WMMA); anything else is undefined on the GPU.
inline void check_wmma_ptr(const float* p, unsigned ldm, const char* what) {
  lora_ext::emu::check_align(p, 32, what);
  if (ldm % 4 != 0)
    lora_ext::emu::fail(std::string(what) + ": ldm = " + std::to_string(ldm) +
                        " floats is not a multiple of 16 bytes");
}
template <class Use, int M, int N, int K, class T, class L>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const float* p, unsigned ldm) {
  lora_ext::emu::wmma_op();
  check_wmma_ptr(p, ldm, "wmma::load_matrix_sync pointer");
  using F = fragment<Use, M, N, K, T, L>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = std::is_same_v<L, col_major> ? p[r + c * static_cast<size_t>(ldm)]
                                                          : p[r * static_cast<size_t>(ldm) + c];
}
template <int M, int N, int K, class T>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                       layout_t layout) {
  lora_ext::emu::wmma_op();
  check_wmma_ptr(p, ldm, "wmma::store_matrix_sync pointer");
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      (layout == mem_row_major ? p[r * static_cast<size_t>(ldm) + c]
                               : p[r + c * static_cast<size_t>(ldm)]) = f.x[r * N + c];
}
template <int M, int N, int K, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d,
              const fragment<matrix_a, M, N, K, precision::tf32, LA>& a,
              const fragment<matrix_b, M, N, K, precision::tf32, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  lora_ext::emu::wmma_op();
  auto tf32 = [](float v) { return lora_ext::emu::u2f(lora_ext::emu::f2u(v) & ~0x1FFFu); };
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += tf32(a.x[i * K + k]) * tf32(b.x[k * N + j]);
      out[i * N + j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}
}  // namespace nvcuda::wmma

#endif  // LORA_EXT_EMU_DEVICE
