// Candidate CUDA kernels for quantize_pack and unpack_dequantize, timed in one
// program against the device-to-device copy and checked byte for byte against
// the host definition (csrc/include/flocora/affine.h). Not part of the
// extension: a GPU session runs it (benchmarks/gpu_check.sh builds and runs it
// last), and the variant that wins moves into csrc/cuda.
//
// The case: float32 input, group 64, float32 metadata, nearest rounding, 4 and
// 8 bits (and 2 for the quantize variants): the default of affine messages.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 --fmad=false -I csrc/include \
//       benchmarks/cuda_variants/quant_variants.cu -o /tmp/quant_variants
//   /tmp/quant_variants [MiB ...]       (default: 256 1024)
//
// Variants (what each changes against the one before, and why):
//   q_lanes   the extension's kernel at 176e8f9: one 8-value unit per lane, a
//             group on 8 lanes, min/max under a total order (two compares and
//             selects each), every lane computing its group's parameters.
//   q_keys    min/max of order-preserving integer keys (one IMNMX each), the
//             non-finite check read off the extreme keys, codes packed in 32-bit
//             words: fewer instructions per value.
//   q_shared  q_keys, and the parameters of a warp's 16 groups (4 units per lane)
//             computed once, one group per lane, then shuffled back: affine_params
//             (two IEEE divisions) runs once per warp instead of 4 times.
//   q_capped  q_shared with a register cap (5 blocks of 256 per SM: 48 registers).
//   d_units   the extension's decode: 8 codes per lane, two 16-byte stores each,
//             a warp's store covering every other 16 bytes of 1 KiB.
//   d_halves  4 codes per lane per step, so that each warp store covers 512
//             contiguous bytes.
//
// Without a GPU, sass_counts.sh counts each kernel's SASS instructions
// (static, sm_90, tails and slow paths included; kernels of 36a20e9). Per
// thread of 32 values at 4 bits: q_lanes 2368 (74 a value, 64 registers),
// q_keys 1512 (47, 68), q_shared 1304 (41, 60), q_capped 1336 (42, 48);
// decode d_units 1440 (32 registers), d_halves 2872 (46 registers).
#include <cuda_runtime.h>
#include <flocora/affine.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

using namespace flocora;

#define CHECK(call)                                                                              \
  do {                                                                                           \
    cudaError_t e_ = (call);                                                                     \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

constexpr int kGroup = 64;
constexpr int kThreads = 256;
constexpr int kUnits = 4;  // units (8 values) per thread

// ---- host definition -------------------------------------------------------------
void host_quantize(const float* x, int64_t n, int bits, std::vector<uint8_t>& packed, std::vector<float>& scales,
                   std::vector<float>& offsets) {
  const int64_t ng = (n + kGroup - 1) / kGroup;
  packed.assign((size_t)packed_nbytes(n, bits), 0);
  scales.resize(ng);
  offsets.resize(ng);
  const float levels = (float)((1 << bits) - 1);
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t s = g * kGroup, e = std::min(n, s + kGroup);
    float mn = x[s], mx = x[s];
    for (int64_t i = s + 1; i < e; ++i) {
      mn = x[i] < mn ? x[i] : mn;
      mx = x[i] > mx ? x[i] : mx;
    }
    AffineParams p;
    uint16_t oh, sh;
    affine_params(mn, mx, bits, false, &p, &oh, &sh);
    scales[g] = p.scale;
    offsets[g] = p.offset;
    for (int64_t i = s; i < e; ++i) {
      const uint64_t q = quantize_nearest(x[i], p, levels);
      const int64_t bit = i * bits;
      for (int b = 0; b < bits; ++b)
        if ((q >> b) & 1) packed[(bit + b) >> 3] |= (uint8_t)(1u << ((bit + b) & 7));
    }
  }
}

// ---- shared device pieces --------------------------------------------------------
__device__ __forceinline__ float min_ord(float a, float b) {
  return (b < a || (b == a && (float_bits(b) >> 31))) ? b : a;
}
__device__ __forceinline__ float max_ord(float a, float b) {
  return (b > a || (b == a && !(float_bits(b) >> 31))) ? b : a;
}
// Order-preserving key: signed comparison of keys is the total order of the
// floats with -0 < +0 (NaNs beyond the infinities).
__device__ __forceinline__ int32_t ord_key(float f) {
  const int32_t b = (int32_t)float_bits(f);
  return b ^ ((b >> 31) & 0x7fffffff);
}
__device__ __forceinline__ float key_float(int32_t k) { return bits_float((uint32_t)(k ^ ((k >> 31) & 0x7fffffff))); }

__device__ __forceinline__ void load8(const float* x, int64_t i, int cnt, float (&v)[8]) {
  if (cnt == 8) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(x + i)),
                 b = __ldg(reinterpret_cast<const float4*>(x + i) + 1);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = j < cnt ? x[i + j] : 0.0f;
  }
}

template <int BITS>
__device__ __forceinline__ void store_unit(uint8_t* dst, uint64_t w, int cnt) {
  const int nb = cnt == 8 ? BITS : (cnt * BITS + 7) / 8;
  if (BITS == 8 && nb == 8) {
    *reinterpret_cast<uint64_t*>(dst) = w;
  } else if (BITS == 4 && nb == 4) {
    *reinterpret_cast<uint32_t*>(dst) = (uint32_t)w;
  } else if (BITS == 2 && nb == 2) {
    *reinterpret_cast<uint16_t*>(dst) = (uint16_t)w;
  } else {
    for (int b = 0; b < nb; ++b) dst[b] = (uint8_t)(w >> (8 * b));
  }
}

// ---- q_lanes: the extension's kernel, for float32 / group 64 / nearest ---------
template <int BITS>
__global__ __launch_bounds__(kThreads) void q_lanes(const float* __restrict__ x, int64_t n,
                                                    uint8_t* __restrict__ packed, float* __restrict__ scales,
                                                    float* __restrict__ offsets, int* flag) {
  constexpr int L = kGroup / 8;
  const int64_t nunits = (n + 7) / 8;
  const int64_t u0 = (int64_t)blockIdx.x * kThreads * kUnits;
  const int lane_in_group = (int)(threadIdx.x & 31) & (L - 1);
  float v[kUnits][8];
  int cnt[kUnits];
#pragma unroll
  for (int k = 0; k < kUnits; ++k) {
    const int64_t u = u0 + k * kThreads + threadIdx.x;
    cnt[k] = u < nunits ? (int)min((int64_t)8, n - 8 * u) : 0;
    if (cnt[k] > 0) load8(x, 8 * u, cnt[k], v[k]);
  }
  bool bad = false;
#pragma unroll
  for (int k = 0; k < kUnits; ++k) {
    const int64_t u = u0 + k * kThreads + threadIdx.x;
    float mn = __int_as_float(0x7f800000), mx = __int_as_float(0xff800000);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (j < cnt[k]) {
        bad |= (float_bits(v[k][j]) & 0x7f800000u) == 0x7f800000u;
        mn = min_ord(mn, v[k][j]);
        mx = max_ord(mx, v[k][j]);
      }
    }
    for (int o = L >> 1; o > 0; o >>= 1) {
      mn = min_ord(mn, __shfl_xor_sync(0xffffffffu, mn, o));
      mx = max_ord(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    }
    if (u - lane_in_group >= nunits) continue;
    AffineParams p;
    uint16_t sh = 0, oh = 0;
    if (!affine_params(mn, mx, BITS, false, &p, &oh, &sh)) p = AffineParams{0.0f, 0.0f, 0.0f};
    if (lane_in_group == 0) {
      scales[u / L] = p.scale;
      offsets[u / L] = p.offset;
    }
    if (cnt[k] == 0) continue;
    constexpr float levels = (float)((1 << BITS) - 1);
    uint64_t word = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (j < cnt[k]) word |= (uint64_t)quantize_nearest(v[k][j], p, levels) << (j * BITS);
    store_unit<BITS>(packed + u * BITS, word, cnt[k]);
  }
  if (bad) atomicOr(flag, 1);
}

// ---- q_keys / q_shared / q_capped ------------------------------------------------
// SHARED: one affine_params per warp for its kUnits * 32 / L groups.
template <int BITS, bool SHARED>
__device__ __forceinline__ void q_keys_body(const float* __restrict__ x, int64_t n, uint8_t* __restrict__ packed,
                                            float* __restrict__ scales, float* __restrict__ offsets, int* flag) {
  constexpr int L = kGroup / 8;
  constexpr int kSegs = 32 / L;  // groups per warp per unit step
  static_assert(kUnits * kSegs <= 32, "one group per lane");
  constexpr float levels = (float)((1 << BITS) - 1);
  const int64_t nunits = (n + 7) / 8;
  const int64_t u0 = (int64_t)blockIdx.x * kThreads * kUnits;
  const int lane = threadIdx.x & 31, lane_in_group = lane & (L - 1);
  float v[kUnits][8];
  int cnt[kUnits];
#pragma unroll
  for (int k = 0; k < kUnits; ++k) {
    const int64_t u = u0 + k * kThreads + threadIdx.x;
    cnt[k] = u < nunits ? (int)min((int64_t)8, n - 8 * u) : 0;
    if (cnt[k] > 0) load8(x, 8 * u, cnt[k], v[k]);
  }
  int32_t lo[kUnits], hi[kUnits];
#pragma unroll
  for (int k = 0; k < kUnits; ++k) {
    int32_t a = INT32_MAX, b = INT32_MIN;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (j < cnt[k]) {
        const int32_t key = ord_key(v[k][j]);
        a = min(a, key);
        b = max(b, key);
      }
    }
#pragma unroll
    for (int o = L >> 1; o > 0; o >>= 1) {
      a = min(a, __shfl_xor_sync(0xffffffffu, a, o));
      b = max(b, __shfl_xor_sync(0xffffffffu, b, o));
    }
    lo[k] = a;
    hi[k] = b;
  }
  // Non-finite: +Inf/NaN keys sit above +Inf's, -Inf/-NaN at or below -Inf's.
  bool bad = false;
#pragma unroll
  for (int k = 0; k < kUnits; ++k) bad |= hi[k] >= 0x7f800000 || (lo[k] <= ord_key(-__int_as_float(0x7f800000)));
  if (bad) atomicOr(flag, 1);

  float off[kUnits], inv[kUnits];
  if (SHARED) {
    // Lane t computes group (k = t / kSegs, segment = t % kSegs); its range
    // sits on lane segment * L of step k.
    const int k_mine = lane / kSegs, src = (lane % kSegs) * L;
    int32_t a = INT32_MAX, b = INT32_MIN;
#pragma unroll
    for (int k = 0; k < kUnits; ++k) {
      const int32_t ak = __shfl_sync(0xffffffffu, lo[k], src), bk = __shfl_sync(0xffffffffu, hi[k], src);
      if (k == k_mine) a = ak, b = bk;
    }
    AffineParams p{0.0f, 0.0f, 0.0f};
    const int64_t u_first = u0 + k_mine * kThreads + (threadIdx.x & ~31) + src;  // the group's first unit
    if (lane < kUnits * kSegs && u_first < nunits) {
      uint16_t sh, oh;
      if (!affine_params(key_float(a), key_float(b), BITS, false, &p, &oh, &sh)) p = AffineParams{0.0f, 0.0f, 0.0f};
      scales[u_first / L] = p.scale;
      offsets[u_first / L] = p.offset;
    }
#pragma unroll
    for (int k = 0; k < kUnits; ++k) {
      const int from = k * kSegs + lane / L;
      off[k] = __shfl_sync(0xffffffffu, p.offset, from);
      inv[k] = __shfl_sync(0xffffffffu, p.inv_scale, from);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kUnits; ++k) {
      const int64_t u = u0 + k * kThreads + threadIdx.x;
      AffineParams p{0.0f, 0.0f, 0.0f};
      if (u - lane_in_group < nunits) {
        uint16_t sh, oh;
        if (!affine_params(key_float(lo[k]), key_float(hi[k]), BITS, false, &p, &oh, &sh))
          p = AffineParams{0.0f, 0.0f, 0.0f};
        if (lane_in_group == 0) {
          scales[u / L] = p.scale;
          offsets[u / L] = p.offset;
        }
      }
      off[k] = p.offset;
      inv[k] = p.inv_scale;
    }
  }
#pragma unroll
  for (int k = 0; k < kUnits; ++k) {
    if (cnt[k] == 0) continue;
    const int64_t u = u0 + k * kThreads + threadIdx.x;
    const AffineParams p{off[k], 0.0f, inv[k]};
    uint64_t word;
    if (BITS <= 4) {
      uint32_t w = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (j < cnt[k]) w |= quantize_nearest(v[k][j], p, levels) << (j * BITS);
      word = w;
    } else {
      uint32_t w0 = 0, w1 = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (j < cnt[k]) w0 |= quantize_nearest(v[k][j], p, levels) << (j * BITS);
        if (j + 4 < cnt[k]) w1 |= quantize_nearest(v[k][j + 4], p, levels) << (j * BITS);
      }
      word = (uint64_t)w0 | ((uint64_t)w1 << (4 * BITS));
    }
    store_unit<BITS>(packed + u * BITS, word, cnt[k]);
  }
}
template <int BITS>
__global__ __launch_bounds__(kThreads) void q_keys(const float* __restrict__ x, int64_t n, uint8_t* __restrict__ packed,
                                                   float* __restrict__ scales, float* __restrict__ offsets, int* flag) {
  q_keys_body<BITS, false>(x, n, packed, scales, offsets, flag);
}
template <int BITS>
__global__ __launch_bounds__(kThreads) void q_shared(const float* __restrict__ x, int64_t n,
                                                     uint8_t* __restrict__ packed, float* __restrict__ scales,
                                                     float* __restrict__ offsets, int* flag) {
  q_keys_body<BITS, true>(x, n, packed, scales, offsets, flag);
}
template <int BITS>
__global__ __launch_bounds__(kThreads, 5) void q_capped(const float* __restrict__ x, int64_t n,
                                                        uint8_t* __restrict__ packed, float* __restrict__ scales,
                                                        float* __restrict__ offsets, int* flag) {
  q_keys_body<BITS, true>(x, n, packed, scales, offsets, flag);
}

// ---- decode ----------------------------------------------------------------------
template <int BITS>
__global__ __launch_bounds__(kThreads) void d_units(const uint8_t* __restrict__ packed,
                                                    const float* __restrict__ scales, const float* __restrict__ offsets,
                                                    int64_t n, float* __restrict__ out) {
  const int64_t nunits = (n + 7) / 8;
  const int64_t u0 = (int64_t)blockIdx.x * kThreads * kUnits;
  constexpr uint64_t mask = (1u << BITS) - 1;
  uint64_t words[kUnits];
#pragma unroll
  for (int k = 0; k < kUnits; ++k) {
    const int64_t u = u0 + k * kThreads + threadIdx.x;
    uint64_t w = 0;
    if (u < nunits) {
      const int cnt = (int)min((int64_t)8, n - 8 * u), nb = cnt == 8 ? BITS : (cnt * BITS + 7) / 8;
      const uint8_t* src = packed + u * BITS;
      if (cnt == 8 && BITS == 8)
        w = *reinterpret_cast<const uint64_t*>(src);
      else if (cnt == 8 && BITS == 4)
        w = *reinterpret_cast<const uint32_t*>(src);
      else if (cnt == 8 && BITS == 2)
        w = *reinterpret_cast<const uint16_t*>(src);
      else
        for (int b = 0; b < nb; ++b) w |= (uint64_t)src[b] << (8 * b);
    }
    words[k] = w;
  }
#pragma unroll
  for (int k = 0; k < kUnits; ++k) {
    const int64_t u = u0 + k * kThreads + threadIdx.x;
    if (u >= nunits) break;
    const int64_t i0 = 8 * u, g = i0 / kGroup;
    const int cnt = (int)min((int64_t)8, n - i0);
    const float off = offsets[g], sc = scales[g];
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = dequantize((uint32_t)((words[k] >> (j * BITS)) & mask), off, sc);
    if (cnt == 8) {
      float4* dst = reinterpret_cast<float4*>(out + i0);
      dst[0] = make_float4(v[0], v[1], v[2], v[3]);
      dst[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      for (int j = 0; j < cnt; ++j) out[i0 + j] = v[j];
    }
  }
}

// Even BITS only: 4 codes (BITS/2 bytes) per lane per step; a warp step covers
// 128 consecutive values, so each 16-byte store of the warp is 512 B in a row.
template <int BITS>
__global__ __launch_bounds__(kThreads) void d_halves(const uint8_t* __restrict__ packed,
                                                     const float* __restrict__ scales,
                                                     const float* __restrict__ offsets, int64_t n,
                                                     float* __restrict__ out) {
  static_assert(BITS % 2 == 0, "half units are whole bytes for even widths");
  constexpr int kSteps = 2 * kUnits;
  constexpr uint32_t mask = (1u << BITS) - 1;
  const int64_t nquads = (n + 3) / 4;
  const int64_t q0 = (int64_t)blockIdx.x * kThreads * kSteps;
  uint32_t codes[kSteps];
#pragma unroll
  for (int k = 0; k < kSteps; ++k) {
    const int64_t q = q0 + k * kThreads + threadIdx.x;
    uint32_t c = 0;
    if (q < nquads) {
      const int cnt = (int)min((int64_t)4, n - 4 * q), nb = (cnt * BITS + 7) / 8;
      const uint8_t* src = packed + q * (BITS / 2);
      if (BITS == 4 && cnt == 4)
        c = *reinterpret_cast<const uint16_t*>(src);
      else if (BITS == 8 && cnt == 4)
        c = *reinterpret_cast<const uint32_t*>(src);
      else
        for (int b = 0; b < nb; ++b) c |= (uint32_t)src[b] << (8 * b);
    }
    codes[k] = c;
  }
#pragma unroll
  for (int k = 0; k < kSteps; ++k) {
    const int64_t q = q0 + k * kThreads + threadIdx.x;
    if (q >= nquads) break;
    const int64_t i0 = 4 * q, g = i0 / kGroup;
    const float off = offsets[g], sc = scales[g];
    float v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = dequantize((codes[k] >> (j * BITS)) & mask, off, sc);
    const int cnt = (int)min((int64_t)4, n - i0);
    if (cnt == 4)
      *reinterpret_cast<float4*>(out + i0) = make_float4(v[0], v[1], v[2], v[3]);
    else
      for (int j = 0; j < cnt; ++j) out[i0 + j] = v[j];
  }
}

// ---- driver ----------------------------------------------------------------------
struct Timer {
  cudaEvent_t a, b;
  Timer() {
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
  }
  template <typename F>
  float median_ms(F fn, int reps = 15) {
    fn();
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    std::vector<float> t;
    for (int r = 0; r < reps; ++r) {
      CHECK(cudaEventRecord(a));
      fn();
      CHECK(cudaEventRecord(b));
      CHECK(cudaEventSynchronize(b));
      float ms;
      CHECK(cudaEventElapsedTime(&ms, a, b));
      t.push_back(ms);
    }
    CHECK(cudaGetLastError());
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  }
};

template <typename T>
std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> h(n);
  CHECK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

// Values spread over [-4, 4) with a few exact ties, from the affine.h hash.
std::vector<float> make_input(int64_t n) {
  std::vector<float> x((size_t)n);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t h = mix32((uint32_t)i ^ mix32((uint32_t)(i >> 32) + 0x9e3779b9u));
    x[i] = (h & 0xff) == 0 ? 0.5f : ((float)(h >> 8) * 5.9604644775390625e-8f - 0.5f) * 8.0f;
  }
  return x;
}

// One table row; bytes are read + written, as for the copy (0: not measured).
void report(int64_t n, int bits, const char* name, float ms, double bytes, double copy_gbs,
            const std::string& verdict) {
  const double gbs = bytes / ms / 1e6;
  char pct[32] = "-";
  if (copy_gbs > 0) std::snprintf(pct, sizeof pct, "%.0f%%", 100.0 * gbs / copy_gbs);
  std::printf("| %lld values | %d | %s | %.3f | %.0f | %s | %s |\n", (long long)n, bits, name, ms, gbs, pct,
              verdict.c_str());
}

template <int BITS>
void run_bits(int64_t n, bool check, Timer& timer, double copy_gbs) {
  const int64_t ng = (n + kGroup - 1) / kGroup, nbytes = packed_nbytes(n, BITS);
  std::vector<float> hx = make_input(n);
  float *x, *scales, *offsets, *out;
  uint8_t* packed;
  int* flag;
  CHECK(cudaMalloc(&x, n * 4));
  CHECK(cudaMalloc(&out, n * 4));
  CHECK(cudaMalloc(&scales, ng * 4));
  CHECK(cudaMalloc(&offsets, ng * 4));
  CHECK(cudaMalloc(&packed, nbytes));
  CHECK(cudaMalloc(&flag, 4));
  CHECK(cudaMemcpy(x, hx.data(), n * 4, cudaMemcpyHostToDevice));
  std::vector<uint8_t> want_p;
  std::vector<float> want_s, want_o;
  if (check) host_quantize(hx.data(), n, BITS, want_p, want_s, want_o);
  const int blocks = (int)(((n + 7) / 8 + kThreads * kUnits - 1) / (kThreads * kUnits));
  const double q_bytes = 4.0 * n + nbytes + 8.0 * ng;

  struct QV {
    const char* name;
    void (*k)(const float*, int64_t, uint8_t*, float*, float*, int*);
  };
  const QV qvs[] = {
      {"q_lanes", q_lanes<BITS>}, {"q_keys", q_keys<BITS>}, {"q_shared", q_shared<BITS>}, {"q_capped", q_capped<BITS>}};
  for (const QV& v : qvs) {
    CHECK(cudaMemset(packed, 0xa5, nbytes));  // poison: every byte must be written
    CHECK(cudaMemset(scales, 0xa5, ng * 4));
    CHECK(cudaMemset(offsets, 0xa5, ng * 4));
    CHECK(cudaMemset(flag, 0, 4));
    const float ms = timer.median_ms([&] { v.k<<<blocks, kThreads>>>(x, n, packed, scales, offsets, flag); });
    std::string verdict = "-";
    if (check) {
      const bool same = std::memcmp(to_host(packed, nbytes).data(), want_p.data(), nbytes) == 0 &&
                        std::memcmp(to_host(scales, ng).data(), want_s.data(), ng * 4) == 0 &&
                        std::memcmp(to_host(offsets, ng).data(), want_o.data(), ng * 4) == 0 &&
                        to_host(flag, 1)[0] == 0;
      verdict = same ? "same bytes" : "DIFFERENT";
    }
    report(n, BITS, v.name, ms, q_bytes, copy_gbs, verdict);
  }
  // Decode from the host definition's bytes (or the last variant's, unchecked).
  if (check) {
    CHECK(cudaMemcpy(packed, want_p.data(), nbytes, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(scales, want_s.data(), ng * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(offsets, want_o.data(), ng * 4, cudaMemcpyHostToDevice));
  }
  std::vector<float> want_y;
  if (check) {
    want_y.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      uint32_t q = 0;
      for (int b = 0; b < BITS; ++b) q |= (uint32_t)((want_p[(i * BITS + b) >> 3] >> ((i * BITS + b) & 7)) & 1) << b;
      want_y[i] = dequantize(q, want_o[i / kGroup], want_s[i / kGroup]);
    }
  }
  const double d_bytes = 4.0 * n + nbytes + 8.0 * ng;
  struct DV {
    const char* name;
    void (*k)(const uint8_t*, const float*, const float*, int64_t, float*);
    int blocks;
  };
  const int half_blocks = (int)(((n + 3) / 4 + kThreads * 2 * kUnits - 1) / (kThreads * 2 * kUnits));
  const DV dvs[] = {{"d_units", d_units<BITS>, blocks}, {"d_halves", d_halves<BITS>, half_blocks}};
  for (const DV& v : dvs) {
    CHECK(cudaMemset(out, 0xa5, n * 4));
    const float ms = timer.median_ms([&] { v.k<<<v.blocks, kThreads>>>(packed, scales, offsets, n, out); });
    std::string verdict = "-";
    if (check) {
      const std::vector<float> got = to_host(out, n);
      verdict = std::memcmp(got.data(), want_y.data(), n * 4) == 0 ? "same bytes" : "DIFFERENT";
    }
    report(n, BITS, v.name, ms, d_bytes, copy_gbs, verdict);
  }
  cudaFree(x), cudaFree(out), cudaFree(scales), cudaFree(offsets), cudaFree(packed), cudaFree(flag);
}

int main(int argc, char** argv) {
  std::vector<int64_t> mib;
  for (int i = 1; i < argc; ++i) mib.push_back(std::atoll(argv[i]));
  if (mib.empty()) mib = {256, 1024};
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs, L2 %d MiB\n\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  Timer timer;
  // Odd sizes first, checked: tails of units, groups and blocks.
  std::printf(
      "| input | bits | variant | ms | GB/s | %% of copy | vs host definition |\n|---|---|---|---|---|---|---|\n");
  for (int64_t n : {(int64_t)1, (int64_t)63, (int64_t)1000003}) {
    run_bits<2>(n, true, timer, 0.0);
    run_bits<4>(n, true, timer, 0.0);
    run_bits<8>(n, true, timer, 0.0);
  }
  for (int64_t m : mib) {
    const int64_t n = (m << 20) / 4;
    float *a, *b;
    CHECK(cudaMalloc(&a, n * 4));
    CHECK(cudaMalloc(&b, n * 4));
    CHECK(cudaMemset(a, 1, n * 4));
    const float ms = timer.median_ms([&] { CHECK(cudaMemcpyAsync(b, a, n * 4, cudaMemcpyDeviceToDevice)); });
    const double copy_gbs = 8.0 * n / ms / 1e6;
    cudaFree(a), cudaFree(b);
    std::printf("| %lld values (%lld MiB) | - | cudaMemcpy D2D | %.3f | %.0f | 100%% | - |\n", (long long)n,
                (long long)m, ms, copy_gbs);
    const bool check = m <= 256;  // the host definition takes seconds per 256 MiB
    run_bits<2>(n, check, timer, copy_gbs);
    run_bits<4>(n, check, timer, copy_gbs);
    run_bits<8>(n, check, timer, copy_gbs);
  }
  return 0;
}
