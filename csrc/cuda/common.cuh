// Helpers shared by the CUDA kernels: light ATen/c10 includes (no
// <torch/extension.h>, which costs a minute of compile per file), the device
// check, multi-tensor descriptor packs, element loads, block scans, the
// single-block exclusive scan and the device error flag. Bit-stream loads and
// stores: bitstream.cuh; argument checks shared with the CPU kernels:
// csrc/include/flocora/host_checks.h.
#pragma once
#include <stdint.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <flocora/affine.h>
#include <flocora/host_checks.h>

#include <algorithm>
#include <string>
#include <vector>

namespace flocora {
namespace cuda {

constexpr int kThreads = 256;  // every kernel but the single-block scans

// ---- element loads and stores ---------------------------------------------
// Element dtypes are flocora::Dt codes (host_checks.h), passed as int32_t.

// Exact widening of one element to float32 (affine.h conversions, so the
// CPU and the GPU read the same value).
__device__ __forceinline__ float to_float(uint16_t v, int32_t dt) {
  return dt == kF16 ? half_to_float(v) : bf16_to_float(v);
}
__device__ __forceinline__ float load_float(const void* p, int64_t i, int32_t dt) {
  if (dt == kF32) return static_cast<const float*>(p)[i];
  return to_float(static_cast<const uint16_t*>(p)[i], dt);
}
// Round-to-nearest-even narrowing, as the CPU kernels do.
__device__ __forceinline__ void store_float(void* p, int64_t i, int32_t dt, float v) {
  if (dt == kF32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<uint16_t*>(p)[i] = dt == kF16 ? float_to_half_rn(v) : float_to_bf16_rn(v);
  }
}

// N consecutive elements starting at i; vec: the base pointer is 16-byte
// aligned and i is a multiple of 8, so 16-byte loads are legal. cnt < N reads
// only the first cnt elements (the rest are 0).
template <int N>
__device__ __forceinline__ void load_n(const void* p, int64_t i, int32_t dt, bool vec, int cnt, float (&v)[N]) {
  static_assert(N % 8 == 0, "load_n reads whole 8-element units");
  if (vec && cnt == N) {
    if (dt == kF32) {
      const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
#pragma unroll
      for (int j = 0; j < N / 4; ++j) {
        float4 f = __ldg(q + j);
        // clang-format off: the four lanes of one load
        v[4 * j] = f.x; v[4 * j + 1] = f.y; v[4 * j + 2] = f.z; v[4 * j + 3] = f.w;
        // clang-format on
      }
    } else {
      const uint4* q = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + i);
#pragma unroll
      for (int j = 0; j < N / 8; ++j) {
        uint4 w = __ldg(q + j);
        uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          v[8 * j + 2 * h] = to_float((uint16_t)(ws[h] & 0xffffu), dt);
          v[8 * j + 2 * h + 1] = to_float((uint16_t)(ws[h] >> 16), dt);
        }
      }
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < N; ++j) v[j] = j < cnt ? load_float(p, i + j, dt) : 0.0f;
}

__device__ __forceinline__ bool is_finite(float v) { return (float_bits(v) & 0x7f800000u) != 0x7f800000u; }

// ---- device error flag ----------------------------------------------------
// Kernels OR error bits into one int; the host reads it back once per call.
enum ErrorBits : int {
  kErrNonFinite = 1,    // NaN or Inf input
  kErrRange = 2,        // group range does not fit the metadata dtype
  kErrCount = 4,        // index code holds a different number of entries than counts[i]
  kErrPadding = 8,      // nonzero padding bits in an index code
  kErrOrder = 16,       // decoded indices not strictly increasing
  kErrLowPadding = 32,  // nonzero padding bits after the Elias-Fano low bits
  kErrOutOfRange = 64,  // a decoded index >= numel
};
__device__ __forceinline__ void raise_error(int* flag, int bits) { atomicOr(flag, bits); }

// Reads the flag (one device-to-host copy, a sync). Under CUDA graph capture
// nothing can be read back: errors of captured calls go unreported.
inline int read_error_flag(const at::Tensor& flag) {
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return 0;
  return flag.item<int>();
}

// ---- multi-tensor descriptor packs ---------------------------------------
// Descriptors travel as a __grid_constant__ kernel argument (no host-to-device
// copy, so launches are CUDA-graph safe, as PyTorch's multi_tensor_apply).
// CUDA >= 12.1 on sm_70+ takes kernel arguments up to 32 KiB: 128
// descriptors (~10 KiB) cover a whole adapter state dict in one launch; a
// longer list takes ceil(len / kPack) launches.
constexpr int kPack = 128;
template <typename D>
struct Pack {
  D d[kPack];
  int n;
  int64_t total;  // work items (blocks) of the launch
};

// Descriptor index owning work item w: the last d with d.work_begin <= w.
template <typename D>
__device__ __forceinline__ int find_desc(const Pack<D>& p, int64_t w) {
  int lo = 0, hi = p.n - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (p.d[mid].work_begin <= w)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Splits descriptors into packs (with work_begin relative to the pack) and
// calls launch(pack) for every pack with work. work(d) = its work items.
template <typename D, typename WorkFn, typename LaunchFn>
void for_each_pack(std::vector<D>& descs, WorkFn work, LaunchFn launch) {
  Pack<D> p;
  p.n = 0;
  p.total = 0;
  auto flush = [&]() {
    if (p.n > 0 && p.total > 0) launch(p);
    p.n = 0;
    p.total = 0;
  };
  for (auto& d : descs) {
    int64_t w = work(d);
    if (w == 0) continue;
    if (p.n == kPack) flush();
    d.work_begin = p.total;
    p.d[p.n++] = d;
    p.total += w;
  }
  flush();
}

// The packs of descs, built once for several kernels over the same work.
template <typename D, typename WorkFn>
std::vector<Pack<D>> make_packs(std::vector<D>& descs, WorkFn work) {
  std::vector<Pack<D>> packs;
  for_each_pack(descs, work, [&](const Pack<D>& p) { packs.push_back(p); });
  return packs;
}

// Grid of `total` blocks: x carries up to 2^31-1, y the rest.
inline dim3 grid_for(int64_t total) {
  const int64_t kMaxX = 2147483647;
  if (total <= kMaxX) return dim3((unsigned)total);
  return dim3((unsigned)kMaxX, (unsigned)((total + kMaxX - 1) / kMaxX));
}
__device__ __forceinline__ int64_t block_id() { return (int64_t)blockIdx.y * gridDim.x + blockIdx.x; }

// ---- block scans --------------------------------------------------------
template <typename T>
__device__ __forceinline__ T warp_inclusive_sum(T v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    T u = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += u;
  }
  return v;
}
// Exclusive prefix sum over the block (NT threads, all must call); *total
// gets the block sum. smem: NT/32 + 1 entries.
template <int NT, typename T>
__device__ __forceinline__ T block_exclusive_sum(T v, T* smem, T* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T inc = warp_inclusive_sum(v);
  if (lane == 31) smem[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    T w = lane < NT / 32 ? smem[lane] : T(0);
    T wi = warp_inclusive_sum(w);
    if (lane < NT / 32) smem[lane] = wi - w;
    if (lane == NT / 32 - 1) smem[NT / 32] = wi;
  }
  __syncthreads();
  T r = smem[warp] + inc - v;
  *total = smem[NT / 32];
  __syncthreads();  // smem is reused by the caller's next scan
  return r;
}

// ---- single-block exclusive scan ---------------------------------------------
// out[0..n] = exclusive prefix sums of in[0..n), out[n] = total. n is a
// number of chunks (tens of thousands at most), so one block is enough.
constexpr int kScanThreads = 1024;
template <int NT = kScanThreads>
__global__ __launch_bounds__(NT) void exclusive_scan_kernel(const int64_t* __restrict__ in, int64_t* __restrict__ out,
                                                            int64_t n) {
  __shared__ int64_t sm[NT / 32 + 1];
  int64_t carry = 0;
  for (int64_t base = 0; base < n; base += NT) {
    const int64_t i = base + threadIdx.x;
    int64_t tot;
    const int64_t ex = block_exclusive_sum<NT>(i < n ? in[i] : (int64_t)0, sm, &tot);
    if (i < n) out[i] = carry + ex;
    carry += tot;
  }
  if (threadIdx.x == 0) out[n] = carry;
}

inline void exclusive_scan(const at::Tensor& in, const at::Tensor& out, cudaStream_t stream) {
  exclusive_scan_kernel<kScanThreads>
      <<<1, kScanThreads, 0, stream>>>(in.data_ptr<int64_t>(), out.data_ptr<int64_t>(), in.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- packed codes: 8-element units -------------------------------------------
// One thread of quantize_pack / unpack_dequantize handles whole units: 8
// codes = BITS bytes of the stream, so no two threads share an output byte.
constexpr int kUnitsPerThread = 4;  // units per thread in the pack/unpack passes
constexpr int64_t kUnitsPerBlock = (int64_t)kThreads * kUnitsPerThread;

// ---- host checks ------------------------------------------------------
inline void check_cuda_tensor(const at::Tensor& t, const c10::Device& dev, const char* op, const std::string& what) {
  TORCH_CHECK(t.defined(), op, ": ", what, " is undefined");
  TORCH_CHECK(t.is_cuda(), op, ": ", what, " is on ", t.device(), " but the other arguments are on ", dev,
              " (mixed CPU/CUDA arguments)");
  TORCH_CHECK(t.device() == dev, op, ": ", what, " is on ", t.device(), " but the other arguments are on ", dev);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace cuda
}  // namespace flocora
