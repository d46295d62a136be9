// Runs every thread of a CUDA mix launch on the CPU, in order: the kernel bodies and the launch plan of
// csrc/cuda/mix_kernel.cuh, compiled for the host (tests/test_cuda_mix_emulation.py), with
// -ffp-contract=off (the kernels' _rn intrinsics are never contracted into an FMA on the GPU).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace {
// Every data access the kernel makes: a vector access must be aligned to its size (else a GPU faults)
// and inside its buffer (else it is not made). Loads and stores are counted per byte.
struct Buffer {
  const char* begin;
  const char* end;
};
Buffer g_x, g_out;
std::vector<int32_t> g_loads, g_stores;  // per byte of x, and of the output (x itself in place)
// Which thread touched a byte of the output first, and whether another did too: in place, a byte that
// is stored and touched (read or written) by two threads is a race on a GPU.
std::vector<int64_t> g_toucher;
std::vector<uint8_t> g_shared;
int64_t g_thread = 0;  // the running thread's index in the launch
int64_t g_errors = 0;

bool check_access(const void* ptr, size_t bytes, bool is_store) {
  const char* p = static_cast<const char*>(ptr);
  const Buffer& buf = is_store ? g_out : g_x;
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0 || p < buf.begin || p + bytes > buf.end) {
    ++g_errors;
    return false;  // not made
  }
  std::vector<int32_t>& counts = is_store ? g_stores : g_loads;
  for (size_t k = 0; k < bytes; ++k) ++counts[p - buf.begin + k];
  if (is_store || g_out.begin == g_x.begin) {  // the output's bytes (x's, in place)
    for (size_t k = 0; k < bytes; ++k) {
      int64_t& first = g_toucher[p - g_out.begin + k];
      if (first < 0) first = g_thread;
      if (first != g_thread) g_shared[p - g_out.begin + k] = 1;
    }
  }
  return true;
}
}  // namespace

// The check kernel's device-side asserts: the messages that fired, with how many threads fired each.
std::map<std::string, int64_t> g_asserts;

#define FASTSD_CUDA_ACCESS(ptr, bytes, is_store) check_access(ptr, bytes, is_store)
#define FASTSD_DEVICE_ASSERT(cond, message) \
  do {                                       \
    if (!(cond)) ++g_asserts[message];       \
  } while (0)
#include "../../csrc/cuda/mix_kernel.cuh"

namespace {
using namespace fastsd::cuda_mix;

template <typename T, int V>
void run_grid(const Plan& plan, Direction direction) {
  for (uint32_t z = 0; z < plan.grid.z; ++z)
    for (uint32_t y = 0; y < plan.grid.y; ++y)
      for (uint32_t x = 0; x < plan.grid.x; ++x)
        for (uint32_t t = 0; t < plan.block.x; ++t) {
          const Dim3 bid{x, y, z}, tid{t, 0, 0};
          g_thread = ((int64_t(z) * plan.grid.y + y) * plan.grid.x + x) * plan.block.x + t;
          if (direction == Direction::kInPlace) {
            mix_inplace_thread<T, V>(plan.p, bid, tid, plan.grid);
          } else if (direction == Direction::kForward) {
            mix_thread<T, V>(plan.p, bid, tid, plan.grid);
          } else if constexpr (!std::is_same<T, uint8_t>::value) {
            mix_backward_thread<T, V>(plan.p, bid, tid, plan.grid);
          }
        }
}

template <typename T>
void run(const Plan& plan, Direction direction) {
  constexpr int kVec = 16 / sizeof(T);  // the two widths mix.cu instantiates
  if (plan.vec == kVec) {
    run_grid<T, kVec>(plan, direction);
  } else {
    run_grid<T, 1>(plan, direction);
  }
}
}  // namespace

// dtype: 0 uint8, 1 float16, 2 bfloat16, 3 float32, 4 float64; direction: 0 forward, 1 in place (out is
// nullptr), 2 backward (x the output gradient, partner its inverse). loads / stores receive the per-byte
// counts (of x, and of out or x); info the plan: vec, grid.x, grid.y, rows_per_thread, then the number
// of bad accesses (misaligned, out of bounds), of output bytes stored and touched by two threads (a
// race), and whether the plan packs samples into blocks.
extern "C" int fastsd_mix_host(int dtype, int direction, void* x, void* out, const int64_t* partner, const int64_t* boxes,
                               const void* lam, int lam_double, const bool* use_box, int64_t B, int64_t C, int64_t H,
                               int64_t W, int channels_last, int64_t target_threads, int64_t max_grid_y,
                               int32_t* loads, int32_t* stores, int64_t* info) {
  static const int kSize[] = {1, 2, 2, 4, 8};
  if (dtype < 0 || dtype > 4 || direction < 0 || direction > 2 || (direction == 1) != (out == nullptr)) return 1;
  const bool inplace = out == nullptr;
  const int64_t bytes = B * C * H * W * kSize[dtype];
  g_x = Buffer{static_cast<const char*>(x), static_cast<const char*>(x) + bytes};
  g_out = inplace ? g_x : Buffer{static_cast<const char*>(out), static_cast<const char*>(out) + bytes};
  g_loads.assign(size_t(bytes), 0);
  g_stores.assign(size_t(bytes), 0);
  g_toucher.assign(size_t(bytes), -1);
  g_shared.assign(size_t(bytes), 0);
  g_errors = 0;
  const Plan plan = make_plan(x, out, partner, boxes, lam, lam_double != 0, use_box, B, C, H, W, channels_last != 0,
                              kSize[dtype], target_threads, max_grid_y);
  switch (dtype) {
    case 0: run<uint8_t>(plan, Direction(direction)); break;
    case 1: run<c10::Half>(plan, Direction(direction)); break;
    case 2: run<c10::BFloat16>(plan, Direction(direction)); break;
    case 3: run<float>(plan, Direction(direction)); break;
    default: run<double>(plan, Direction(direction));
  }
  int64_t races = 0;
  for (int64_t k = 0; k < bytes; ++k) {
    loads[k] = g_loads[k], stores[k] = g_stores[k];
    races += g_shared[k] && g_stores[k] > 0;
  }
  const int64_t values[] = {plan.vec, plan.grid.x, plan.grid.y, plan.p.rows_per_thread, g_errors, races,
                            plan.p.packed};
  for (int k = 0; k < 7; ++k) info[k] = values[k];
  return 0;
}

// Every thread of a mix_check_kernel launch. `counts` receives, per message in `messages` (a
// newline-separated list), how many threads' asserts fired with it; returns how many fired in all.
extern "C" int64_t fastsd_mix_check_host(const int64_t* partner, const int64_t* sorted, const int64_t* boxes,
                                         const void* lam, int lam_double, int64_t B, int64_t H, int64_t W,
                                         int involution, const char* messages, int64_t* counts) {
  g_asserts.clear();
  const CheckParams params{partner, sorted, boxes, lam, lam_double != 0, involution != 0, B, H, W};
  const uint32_t blocks = uint32_t((B + kThreads - 1) / kThreads);
  for (uint32_t x = 0; x < blocks; ++x)
    for (uint32_t t = 0; t < kThreads; ++t) mix_check_thread(params, Dim3{x, 0, 0}, Dim3{t, 0, 0});
  int64_t total = 0, k = 0;
  for (const auto& [message, n] : g_asserts) total += n;
  for (const char* m = messages; *m; ++k) {
    const char* end = std::strchr(m, '\n');
    const std::string wanted(m, end ? end - m : std::strlen(m));
    counts[k] = g_asserts.count(wanted) ? g_asserts[wanted] : 0;
    m = end ? end + 1 : m + wanted.size();
  }
  return total;
}
