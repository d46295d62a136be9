// What the CUDA kernels of csrc/cuda share, free of torch so that each kernel's body compiles for the
// GPU (nvcc, without torch's headers) and for the host (tests/csrc/*_host.cpp run every thread of a
// launch on the CPU): the host/device qualifier, 16-byte vector loads and stores through one checked
// access hook, lane masks, and a division by a per-launch constant as a multiply-high.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define FASTSD_HD __host__ __device__ __forceinline__
#else
#define FASTSD_HD inline
#endif

// The host test builds define this to check every access (alignment, bounds, which bytes are read and
// written); an access it refuses is skipped there. On the GPU it is `true` and compiles away.
#ifndef FASTSD_CUDA_ACCESS
#define FASTSD_CUDA_ACCESS(ptr, bytes, is_store) true
#endif

#include <cassert>

// A device-side assert that fires whatever NDEBUG says (as PyTorch's CUDA_KERNEL_ASSERT): the message
// is printed by the device and the launch's stream reports "device-side assert triggered". The host
// test build defines it to record the failures.
#ifndef FASTSD_DEVICE_ASSERT
#if defined(__CUDA_ARCH__) && defined(_MSC_VER)  // as c10's CUDA_KERNEL_ASSERT on Windows
#define FASTSD_DEVICE_ASSERT(cond, message)                                                       \
  do {                                                                                            \
    if (!(cond)) (void)_wassert(_CRT_WIDE(message), _CRT_WIDE(__FILE__), static_cast<unsigned>(__LINE__)); \
  } while (0)
#elif defined(__CUDA_ARCH__)
#define FASTSD_DEVICE_ASSERT(cond, message) \
  do {                                       \
    if (!(cond)) __assert_fail(message, __FILE__, static_cast<unsigned int>(__LINE__), __func__); \
  } while (0)
#else
#define FASTSD_DEVICE_ASSERT(cond, message) ((void)0)
#endif
#endif

namespace fastsd {
namespace cuda_common {

// The element types of the kernels, as the launchers name them (uint8, float16, bfloat16, float32, float64).
enum class Dtype { kUInt8, kHalf, kBFloat16, kFloat, kDouble };

struct Dim3 {
  uint32_t x, y, z;
};

constexpr uint32_t kThreads = 256;          // threads per block of every kernel here
constexpr int kMinBlocksPerSM = 2;          // at most 128 registers: a quarter of an SM's threads or more resident
constexpr uint32_t kMaxGridY = 65535;
constexpr int64_t kTargetThreads = int64_t(1) << 18;  // about one full wave of an H100 (132 SMs x 2048 threads)
constexpr int64_t kMaxVectorsPerThread = 32;

FASTSD_HD uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return uint32_t((uint64_t(a) * b) >> 32);
#endif
}

// n / d for any 32-bit n by a multiply-high, an add and a shift (d fixed per launch, d >= 1).
struct FastDiv {
  uint32_t d, magic, shift;
  static FastDiv make(uint32_t divisor) {
    uint32_t s = 0;
    while ((uint64_t(1) << s) < divisor) ++s;
    const uint64_t m = ((uint64_t(1) << 32) * ((uint64_t(1) << s) - divisor)) / divisor + 1;
    return FastDiv{divisor, uint32_t(m), s};
  }
  FASTSD_HD uint32_t div(uint32_t n) const { return uint32_t((uint64_t(mulhi(n, magic)) + n) >> shift); }
};

// What a thread moves at once: 16 bytes as four words (LDG.E.128 / STG.E.128), or one element.
struct alignas(16) Words {
  uint32_t w[4];
};

template <typename T, int V>
using Raw = std::conditional_t<V == 1, T, Words>;

template <typename T, int V>
FASTSD_HD Raw<T, V> load(const T* ptr) {
  static_assert(V == 1 || sizeof(T) * V == sizeof(Words), "one element or 16 bytes");
  if (!FASTSD_CUDA_ACCESS(ptr, sizeof(Raw<T, V>), false)) return Raw<T, V>{};
  return *reinterpret_cast<const Raw<T, V>*>(ptr);
}

template <typename T, int V>
FASTSD_HD void store(T* ptr, const Raw<T, V>& value) {
  if (!FASTSD_CUDA_ACCESS(ptr, sizeof(Raw<T, V>), true)) return;
  *reinterpret_cast<Raw<T, V>*>(ptr) = value;
}

// Byte masks of the lanes whose bit is set in `bits` (lane l: bytes [l * sizeof(T), (l + 1) * sizeof(T))).
template <typename T>
FASTSD_HD Words lane_mask(uint32_t bits) {
  Words m;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t w = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) w |= (0u - ((bits >> ((4 * i + k) / int(sizeof(T)))) & 1u)) & (0xFFu << (8 * k));
    m.w[i] = w;
  }
  return m;
}

}  // namespace cuda_common
}  // namespace fastsd
