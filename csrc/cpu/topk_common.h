// Shared by the CPU kernels of topk_encode (topk_encode_cpu.cpp) and
// sparse_decode / sparse_decode_add_ (sparse_decode_cpu.cpp): load-balanced
// task runs and the exact float16 widening both read their inputs with.
#pragma once
#include <stdint.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <vector>

#include <flocora/affine.h>

#if defined(__GNUC__)
#define FLOCORA_INLINE inline __attribute__((always_inline))
#define FLOCORA_LAMBDA_INLINE __attribute__((always_inline))  // [&](...) FLOCORA_LAMBDA_INLINE { ... }
#else
#define FLOCORA_INLINE inline
#define FLOCORA_LAMBDA_INLINE
#endif

namespace flocora {
namespace cpu {

constexpr int64_t kInlineWork = 32768;  // below this many elements (or bits, values), no threads

// float32 bits of a float16 (exact widening; branch-free so loops vectorize).
inline uint32_t half_as_float_bits(uint16_t h) {
  uint32_t a = h & 0x7fffu;
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t normal = (a << 13) + (112u << 23);
  uint32_t sub = float_bits(mul_rn((float)a, 5.9604644775390625e-8f));  // a * 2^-24, exact
  uint32_t special = (a << 13) | 0x7f800000u;
  uint32_t m = a < 0x400u ? sub : (a >= 0x7c00u ? special : normal);
  return m | sign;
}

// Splits tasks 0..n-1 into contiguous runs of about equal cost, one per
// thread (at::parallel_for splits by count, not by work), and calls
// fn(first, last) once per run, so that a run can set up its scratch once.
template <typename Fn>
inline void run_balanced(const std::vector<int64_t>& cost, const Fn& fn) {
  const int64_t ntasks = (int64_t)cost.size();
  if (ntasks == 0) return;
  int64_t total = 0;
  for (int64_t c : cost) total += c;
  if (total < kInlineWork || at::get_num_threads() == 1 || at::in_parallel_region()) {
    fn(0, ntasks);  // too little work to pay for waking threads
    return;
  }
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  std::vector<int64_t> bound(parts + 1, ntasks);
  bound[0] = 0;
  int64_t acc = 0, p = 1;
  for (int64_t t = 0; t < ntasks && p < parts; ++t) {
    acc += cost[t];
    while (p < parts && acc * parts >= total * p) bound[p++] = t + 1;
  }
  at::parallel_for(0, parts, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q)
      if (bound[q] < bound[q + 1]) fn(bound[q], bound[q + 1]);
  });
}

// Hands tasks 0..n-1 out one at a time, the costliest first, to every thread
// as it comes free: fn(take) runs once per thread (so it can set up its
// scratch once) and calls take() for its next task, -1 when none is left.
// For task sizes that vary a lot (the tensors of a per-tensor top-k), where
// run_balanced's fixed runs left one thread waiting on the other.
template <typename Fn>
inline void run_claimed(const std::vector<int64_t>& cost, const Fn& fn) {
  const int64_t ntasks = (int64_t)cost.size();
  if (ntasks == 0) return;
  std::vector<int64_t> order(ntasks);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::atomic<int64_t> next{0};
  auto take = [&]() -> int64_t {
    const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
    return i < ntasks ? order[i] : -1;
  };
  int64_t total = 0;
  for (int64_t c : cost) total += c;
  if (total < kInlineWork || at::get_num_threads() == 1 || at::in_parallel_region() || ntasks == 1) {
    fn(take);
    return;
  }
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), ntasks);
  at::parallel_for(0, parts, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q) fn(take);
  });
}

}  // namespace cpu
}  // namespace flocora
