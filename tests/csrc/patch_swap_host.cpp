// Runs every thread of a CUDA patch swap launch on the CPU, in order: the kernel body and the launch
// plan of csrc/cuda/patch_swap_kernel.cuh, compiled for the host (tests/test_cuda_emulation.py).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <vector>

namespace {
// Every access the kernel makes: a vector access must be aligned to its size (else a GPU faults),
// inside its buffer (else it is not made), and each output byte is stored exactly once.
struct Buffer {
  const char* begin;
  const char* end;
};
Buffer g_x, g_out, g_mask;
std::vector<uint8_t> g_stores;  // per output byte
int64_t g_errors = 0;

bool check_access(const void* ptr, size_t bytes, bool is_store) {
  const char* p = static_cast<const char*>(ptr);
  const Buffer& buf = is_store ? g_out : (p >= g_mask.begin && p < g_mask.end ? g_mask : g_x);
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0 || p < buf.begin || p + bytes > buf.end) {
    ++g_errors;
    return false;  // not made
  }
  if (is_store) {
    for (size_t k = 0; k < bytes; ++k) ++g_stores[p - buf.begin + k];
  }
  return true;
}
}  // namespace

// The check kernel's device-side asserts: how many threads' asserts fired.
int64_t g_asserts = 0;

#define FASTSD_CUDA_ACCESS(ptr, bytes, is_store) check_access(ptr, bytes, is_store)
#define FASTSD_DEVICE_ASSERT(cond, message) \
  do {                                       \
    if (!(cond)) ++g_asserts;                \
  } while (0)
#include "../../csrc/cuda/patch_swap_kernel.cuh"

namespace {
using namespace fastsd::cuda_patch_swap;

template <typename T, int V, bool kBackward>
void run_grid(const Plan& plan) {
  for (uint32_t z = 0; z < plan.grid.z; ++z)
    for (uint32_t y = 0; y < plan.grid.y; ++y)
      for (uint32_t x = 0; x < plan.grid.x; ++x)
        for (uint32_t t = 0; t < plan.block.x; ++t)
          cell_select_thread<T, V, kBackward>(plan.p, Dim3{x, y, z}, Dim3{t, 0, 0}, plan.grid);
}

template <typename T>
void run(const Plan& plan, bool backward) {
  constexpr int kVec = 16 / sizeof(T);  // the two widths patch_swap.cu instantiates
  if (plan.vec == kVec) {
    backward ? run_grid<T, kVec, true>(plan) : run_grid<T, kVec, false>(plan);
  } else {
    backward ? run_grid<T, 1, true>(plan) : run_grid<T, 1, false>(plan);
  }
}
}  // namespace

// dtype: 0 uint8, 1 float16, 2 bfloat16, 3 float32, 4 float64. info receives the plan: vec, grid.x,
// grid.y, rows_per_thread, planes_per_thread, plane_splits, then the number of bad accesses
// (misaligned, out of bounds) and of output bytes not stored exactly once.
extern "C" int fastsd_patch_swap_host(int dtype, int backward, const void* x, void* out, const int64_t* src,
                                      const uint8_t* mask, int64_t B, int64_t C, int64_t H, int64_t W, int64_t gh,
                                      int64_t gw, int channels_last, int64_t target_threads, int64_t max_grid_y,
                                      int64_t* info) {
  static const int kSize[] = {1, 2, 2, 4, 8};
  if (dtype < 0 || dtype > 4) return 1;
  const int64_t bytes = B * C * H * W * kSize[dtype];
  g_x = Buffer{static_cast<const char*>(x), static_cast<const char*>(x) + bytes};
  g_out = Buffer{static_cast<const char*>(out), static_cast<const char*>(out) + bytes};
  g_mask = Buffer{reinterpret_cast<const char*>(mask), reinterpret_cast<const char*>(mask) + B * gh * gw};
  g_stores.assign(size_t(bytes), 0);
  g_errors = 0;
  const Plan plan = make_plan(x, out, src, mask, backward != 0, B, C, H, W, gh, gw, channels_last != 0, kSize[dtype],
                              target_threads, max_grid_y);
  switch (dtype) {
    case 0: run<uint8_t>(plan, backward); break;
    case 1: run<c10::Half>(plan, backward); break;
    case 2: run<c10::BFloat16>(plan, backward); break;
    case 3: run<float>(plan, backward); break;
    default: run<double>(plan, backward);
  }
  int64_t not_once = 0;
  for (const uint8_t n : g_stores) not_once += n != 1;
  const int64_t values[] = {plan.vec, plan.grid.x, plan.grid.y, plan.p.rows_per_thread, plan.p.planes_per_thread,
                            plan.p.plane_splits, g_errors, not_once};
  for (int k = 0; k < 8; ++k) info[k] = values[k];
  return 0;
}

// Every thread of a permutation_check_kernel launch over `sorted` (partner sorted, [B]): how many
// threads' asserts fired.
extern "C" int64_t fastsd_permutation_check_host(const int64_t* sorted, int64_t B) {
  g_asserts = 0;
  const PermutationCheck check{sorted, B};
  const uint32_t blocks = uint32_t((B + kThreads - 1) / kThreads);
  for (uint32_t x = 0; x < blocks; ++x)
    for (uint32_t t = 0; t < kThreads; ++t) permutation_check_thread(check, Dim3{x, 0, 0}, Dim3{t, 0, 0});
  return g_asserts;
}
