// Scheduler, collectives, launches and detectors of the CUDA emulator (see emu.h).
//
// A launch runs its blocks one after another (in the schedule's order); a block's threads are
// ucontext fibers on the calling thread with their own stacks. The scheduler runs every runnable
// fiber (in the schedule's order for that pass) until it blocks at __syncthreads or a warp
// collective, or exits. A collective completes when every lane of its mask has arrived; the
// barrier releases when every thread of the block waits at the same call site. Anything else
// that leaves no fiber runnable is a finding, as are the checks in emu.h. Findings abort the
// block and fail the launch with cudaErrorLaunchFailure; take_errors() returns their text.
#define LORA_EXT_EMU_DEVICE 1
#include "emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <vector>

// AddressSanitizer hooks (weak: present only when the kernels are built with ASan).
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size)
    __attribute__((weak));
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old,
                                     size_t* size_old) __attribute__((weak));
void __asan_set_error_report_callback(void (*callback)(const char*)) __attribute__((weak));
}

namespace lora_ext::emu {

Thread* g_thread = nullptr;
uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim, g_grid_dim;

namespace {

constexpr size_t kStackBytes = 256 << 10;
constexpr int kMaxThreads = 1024;

enum class State { kRunnable, kBarrier, kWarp, kDone };

struct Fiber {
  Thread t;
  int lane = 0, warp = 0;
  State state = State::kRunnable;
  ucontext_t ctx;
  char* stack = nullptr;
  uint64_t value = 0, result = 0;
  int arg = 0;
  int barrier_line = 0;
  const char* barrier_file = nullptr;
  uint64_t wmma_ops = 0;
};

struct WarpColl {
  unsigned arrived = 0, mask = 0;
  Coll kind = Coll::kSyncWarp;
};

const char* coll_name(Coll k) {
  switch (k) {
    case Coll::kSyncWarp: return "__syncwarp";
    case Coll::kShflIdx: return "__shfl_sync";
    case Coll::kShflXor: return "__shfl_xor_sync";
    case Coll::kShflUp: return "__shfl_up_sync";
    case Coll::kShflDown: return "__shfl_down_sync";
    case Coll::kBallot: return "__ballot_sync";
    case Coll::kMatchAny: return "__match_any_sync";
  }
  return "?";
}

struct Config {
  uint64_t schedule = 0;  // 0: in order, 1: reversed, else a random permutation seed
  int sms = 132, cc = 90;
};

std::mutex g_mutex;  // one launch at a time
Config g_cfg;
std::string g_errors;
cudaError_t g_last = cudaSuccess;
std::set<std::string> g_sites;
std::string g_sites_text, g_errors_text;

std::vector<Fiber> g_fibers;
std::vector<WarpColl> g_warps;
ucontext_t g_sched;
const void* g_sched_bottom = nullptr;
size_t g_sched_size = 0;
const std::function<void()>* g_body = nullptr;
Fiber* g_cur = nullptr;
bool g_abort = false;      // a finding in the running block
bool g_asan_hit = false;   // AddressSanitizer reported during the launch
char* g_stacks = nullptr;  // kMaxThreads stacks, a guard page below each

void set_last(cudaError_t e) {
  if (g_last == cudaSuccess) g_last = e;
}

std::string where() {
  std::ostringstream os;
  os << "block (" << g_block_idx.x << "," << g_block_idx.y << "," << g_block_idx.z << ")";
  if (g_cur != nullptr) os << " thread " << g_cur->t.tid.x;
  return os.str();
}

void record(const std::string& what) {
  g_errors += what;
  g_errors += '\n';
}

std::vector<uint64_t> order(uint64_t n, uint64_t salt) {
  std::vector<uint64_t> v(n);
  std::iota(v.begin(), v.end(), uint64_t{0});
  if (g_cfg.schedule == 1) {
    std::reverse(v.begin(), v.end());
  } else if (g_cfg.schedule > 1) {
    std::mt19937_64 rng(g_cfg.schedule * 0x9E3779B97F4A7C15ull + salt);
    std::shuffle(v.begin(), v.end(), rng);
  }
  return v;
}

void ensure_stacks() {
  if (g_stacks != nullptr) return;
  const size_t total = kStackBytes * kMaxThreads;
  void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "lora_ext emu: cannot map fiber stacks\n");
    std::abort();
  }
  g_stacks = static_cast<char*>(p);
  for (int i = 0; i < kMaxThreads; ++i) mprotect(g_stacks + i * kStackBytes, 4096, PROT_NONE);
}

// Scheduler -> fiber f, until f blocks, exits or aborts.
void to_fiber(Fiber& f) {
  g_cur = &f;
  g_thread = &f.t;
  void* fake = nullptr;
  if (__sanitizer_start_switch_fiber) __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
  swapcontext(&g_sched, &f.ctx);
  if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
  g_cur = nullptr;
}

// Running fiber -> scheduler; returns when the fiber is resumed (never when `dying`).
void to_scheduler(bool dying) {
  Fiber& f = *g_cur;
  void* fake = nullptr;
  if (__sanitizer_start_switch_fiber)
    __sanitizer_start_switch_fiber(dying ? nullptr : &fake, g_sched_bottom, g_sched_size);
  swapcontext(&f.ctx, &g_sched);
  if (__sanitizer_finish_switch_fiber)
    __sanitizer_finish_switch_fiber(fake, &g_sched_bottom, &g_sched_size);
}

void fiber_entry() {
  if (__sanitizer_finish_switch_fiber)
    __sanitizer_finish_switch_fiber(nullptr, &g_sched_bottom, &g_sched_size);
  (*g_body)();
  g_cur->state = State::kDone;
  to_scheduler(true);
}

// A finding that stops the block (scheduler side).
void block_finding(const std::string& what) {
  record("block (" + std::to_string(g_block_idx.x) + "," + std::to_string(g_block_idx.y) + "," +
         std::to_string(g_block_idx.z) + "): " + what);
  g_abort = true;
}

std::string lanes_text(unsigned bits) {
  std::string s;
  for (int l = 0; l < 32; ++l)
    if (bits >> l & 1u) s += (s.empty() ? "" : ",") + std::to_string(l);
  return s;
}

// Why no fiber can run: names the first warp whose collective waits for absent lanes.
std::string deadlock_text() {
  for (size_t w = 0; w < g_warps.size(); ++w) {
    const WarpColl& c = g_warps[w];
    if (c.arrived == 0) continue;
    std::ostringstream os;
    os << "warp " << w << ": " << coll_name(c.kind) << " with mask 0x" << std::hex << c.mask
       << std::dec << " waits for lanes " << lanes_text(c.mask & ~c.arrived) << ", which ";
    bool barrier = false;
    for (int l = 0; l < 32; ++l) {
      const size_t i = w * 32 + l;
      if ((c.mask & ~c.arrived) >> l & 1u && i < g_fibers.size())
        barrier = barrier || g_fibers[i].state == State::kBarrier;
    }
    os << (barrier ? "wait at __syncthreads" : "never arrive");
    return os.str();
  }
  return "no thread can proceed";
}

void run_block(int n, uint64_t block_linear) {
  for (int i = 0; i < n; ++i) {
    Fiber& f = g_fibers[i];
    f.t.tid = {i % g_block_dim.x, (i / g_block_dim.x) % g_block_dim.y,
               i / (g_block_dim.x * g_block_dim.y)};
    f.lane = i % 32;
    f.warp = i / 32;
    f.state = State::kRunnable;
    f.wmma_ops = 0;
    f.stack = g_stacks + static_cast<size_t>(i) * kStackBytes + 4096;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes - 4096;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  g_warps.assign((n + 31) / 32, WarpColl{});
  for (uint64_t pass = 0; !g_abort; ++pass) {
    bool ran = false;
    for (uint64_t i : order(n, block_linear * 0x100000001B3ull + pass)) {
      if (g_abort) break;
      if (g_fibers[i].state == State::kRunnable) {
        to_fiber(g_fibers[i]);
        ran = true;
      }
    }
    if (g_abort) break;
    int done = 0, at_barrier = 0;
    for (int i = 0; i < n; ++i) {
      done += g_fibers[i].state == State::kDone;
      at_barrier += g_fibers[i].state == State::kBarrier;
    }
    if (done == n) break;
    if (ran) continue;
    if (at_barrier + done == n) {
      const Fiber* first = nullptr;
      for (int i = 0; i < n && !g_abort; ++i) {
        const Fiber& f = g_fibers[i];
        if (f.state != State::kBarrier) continue;
        if (first == nullptr) {
          first = &f;
        } else if (f.barrier_line != first->barrier_line || f.barrier_file != first->barrier_file) {
          block_finding("threads wait at different __syncthreads: thread " +
                        std::to_string(first->t.tid.x) + " at line " +
                        std::to_string(first->barrier_line) + ", thread " +
                        std::to_string(f.t.tid.x) + " at line " + std::to_string(f.barrier_line));
        }
      }
      if (!g_abort && done > 0) {
        int gone = -1;
        for (int i = 0; i < n && gone < 0; ++i)
          if (g_fibers[i].state == State::kDone) gone = i;
        block_finding("__syncthreads at " + std::string(first->barrier_file) + ":" +
                      std::to_string(first->barrier_line) + " is not reached by " +
                      std::to_string(done) + " of " + std::to_string(n) +
                      " threads (they exited; e.g. thread " + std::to_string(gone) + ")");
      }
      for (int i = 0; i < n; ++i)
        if (g_fibers[i].state == State::kBarrier) g_fibers[i].state = State::kRunnable;
      continue;
    }
    block_finding(deadlock_text());
  }
  if (g_abort) return;
  for (int w = 0; w * 32 < n; ++w)
    for (int l = 1; l < 32 && w * 32 + l < n; ++l)
      if (g_fibers[w * 32 + l].wmma_ops != g_fibers[w * 32].wmma_ops) {
        block_finding("warp " + std::to_string(w) + ": lane " + std::to_string(l) + " issued " +
                      std::to_string(g_fibers[w * 32 + l].wmma_ops) + " WMMA ops, lane 0 " +
                      std::to_string(g_fibers[w * 32].wmma_ops) + " (they are warp-wide)");
        return;
      }
}

void asan_report(const char* report) {
  g_errors += "AddressSanitizer: ";
  g_errors += report;
  g_errors += '\n';
  g_asan_hit = true;
}

struct InstallAsanCallback {
  InstallAsanCallback() {
    if (__asan_set_error_report_callback) __asan_set_error_report_callback(asan_report);
  }
} install_asan_callback;

}  // namespace

void fail(const std::string& what) {
  record(where() + ": " + what);
  if (g_cur == nullptr) return;
  g_abort = true;
  g_cur->state = State::kDone;
  to_scheduler(true);
  __builtin_unreachable();
}

void check_align(const void* p, size_t align, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % align != 0) {
    std::ostringstream os;
    os << "misaligned " << what << " at " << p << " (needs " << align << "-byte alignment)";
    fail(os.str());
  }
}

void syncthreads_at(const char* file, int line) {
  Fiber& f = *g_cur;
  f.barrier_file = file;
  f.barrier_line = line;
  f.state = State::kBarrier;
  to_scheduler(false);
}

uint64_t collective(Coll kind, unsigned mask, uint64_t value, int arg) {
  Fiber& me = *g_cur;
  const int n = static_cast<int>(g_block_dim.x * g_block_dim.y * g_block_dim.z);
  auto hex = [](unsigned m) {
    char b[16];
    std::snprintf(b, sizeof(b), "0x%08x", m);
    return std::string(b);
  };
  if (!(mask >> me.lane & 1u))
    fail(std::string(coll_name(kind)) + " with mask " + hex(mask) + " does not name the calling lane " +
         std::to_string(me.lane));
  const int base = me.warp * 32;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (base + l >= n)
      fail(std::string(coll_name(kind)) + " mask " + hex(mask) + " names lane " + std::to_string(l) +
           ", which does not exist");
    if (g_fibers[base + l].state == State::kDone)
      fail(std::string(coll_name(kind)) + " mask " + hex(mask) + " names lane " + std::to_string(l) +
           ", which has exited");
  }
  WarpColl& w = g_warps[me.warp];
  if (w.arrived == 0) {
    w.kind = kind;
    w.mask = mask;
  } else if (w.kind != kind || w.mask != mask) {
    fail("lanes of warp " + std::to_string(me.warp) + " meet at different collectives: " +
         coll_name(w.kind) + " mask " + hex(w.mask) + " and " + coll_name(kind) + " mask " +
         hex(mask));
  }
  me.value = value;
  me.arg = arg;
  w.arrived |= 1u << me.lane;
  if (w.arrived != mask) {
    me.state = State::kWarp;
    to_scheduler(false);
    return me.result;
  }
  // Every lane is here: compute all results.
  auto src_value = [&](int l, int src) {
    if (src < 0 || src >= 32 || !(mask >> src & 1u))
      fail(std::string(coll_name(kind)) + ": lane " + std::to_string(l) + " reads lane " +
           std::to_string(src) + ", which is not in mask " + hex(mask));
    return g_fibers[base + src].value;
  };
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& f = g_fibers[base + l];
    uint64_t r = 0;
    switch (kind) {
      case Coll::kSyncWarp: break;
      case Coll::kShflIdx: r = src_value(l, f.arg & 31); break;
      case Coll::kShflXor: r = src_value(l, l ^ f.arg); break;
      case Coll::kShflUp: r = l - f.arg < 0 ? f.value : src_value(l, l - f.arg); break;
      case Coll::kShflDown: r = l + f.arg >= 32 ? f.value : src_value(l, l + f.arg); break;
      case Coll::kBallot:
        for (int m = 0; m < 32; ++m)
          if (mask >> m & 1u && g_fibers[base + m].value != 0) r |= uint64_t{1} << m;
        break;
      case Coll::kMatchAny:
        for (int m = 0; m < 32; ++m)
          if (mask >> m & 1u && g_fibers[base + m].value == f.value) r |= uint64_t{1} << m;
        break;
    }
    f.result = r;
    if (&f != &me) f.state = State::kRunnable;
  }
  w = WarpColl{};
  return me.result;
}

void wmma_op() { ++g_cur->wmma_ops; }

void trap() {
  fail("__trap()");
  std::abort();  // outside a kernel: unreachable
}

void launch(const char* file, int line, dim3 grid, dim3 block, size_t smem, cudaStream_t,
            const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const char* base = std::strrchr(file, '/');
  const std::string site = std::string(base ? base + 1 : file) + ":" + std::to_string(line);
  g_sites.insert(site);
  const uint64_t n = uint64_t{block.x} * block.y * block.z;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  if (n == 0 || n > kMaxThreads || blocks == 0 || grid.x > 0x7FFFFFFFu || grid.y > 65535 ||
      grid.z > 65535 || block.z > 64 || smem > 0) {
    std::ostringstream os;
    os << site << ": invalid launch configuration grid (" << grid.x << "," << grid.y << ","
       << grid.z << ") block (" << block.x << "," << block.y << "," << block.z << ") smem "
       << smem << (smem > 0 ? " (dynamic shared memory is not emulated)" : "");
    record(os.str());
    set_last(cudaErrorInvalidConfiguration);
    return;
  }
  ensure_stacks();
  g_fibers.resize(kMaxThreads);
  g_block_dim = block;
  g_grid_dim = grid;
  g_body = &body;
  g_abort = false;
  g_asan_hit = false;
  for (uint64_t b : order(blocks, 0x5DEECE66Dull)) {
    g_block_idx = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                   static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))};
    run_block(static_cast<int>(n), b);
    if (g_abort || g_asan_hit) break;
  }
  if (g_abort || g_asan_hit) {
    record("kernel launched at " + site + " failed");
    set_last(cudaErrorLaunchFailure);
  }
  g_thread = nullptr;
}

std::string take_errors() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::string e;
  e.swap(g_errors);
  return e;
}

}  // namespace lora_ext::emu

using namespace lora_ext::emu;

cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last;
  g_last = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return g_last; }
const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = g_cfg.sms; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = g_cfg.cc / 10; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = g_cfg.cc % 10; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

// Control interface for the test harness (ctypes).
extern "C" {
void lora_ext_emu_configure(uint64_t schedule, int sms, int cc) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_cfg = {schedule, sms, cc};
}
const char* lora_ext_emu_sites() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_sites_text.clear();
  for (const auto& s : g_sites) g_sites_text += s + "\n";
  return g_sites_text.c_str();
}
const char* lora_ext_emu_take_errors() {
  g_errors_text = take_errors();
  return g_errors_text.c_str();
}
}
