// CUDA kernels of quantize_pack (schema: csrc/ops.cpp, semantics:
// flocora_codec/ops.py, argument checks: csrc/include/flocora/host_checks.h).
// Byte-identical to the CPU kernel: every
// float operation is an affine.h function (__f*_rn on the device), and the
// extension is compiled with --fmad=false.
//
// Work layout. One thread produces whole bytes: 8 codes = BITS bytes of the
// stream ("a unit"), so no two threads share an output byte. Groups whose
// tile fits in shared memory (group size g with lcm(8, g) <= 8192 elements,
// i.e. every row/group granularity up to 8192) take the *fused* kernel: a
// block loads a tile of whole groups once (coalesced, 16-byte loads), reduces
// each group's min/max from shared memory, and packs the tile: one trip
// through DRAM. Larger groups (per-tensor, long rows) need their range before
// any code: a chunked min/max pass, a per-group finalize, then a pack pass.
// Groups of 8 * 2^k elements (k <= 5: 8, 16, ..., 256; group 64 is the
// common case) skip shared memory altogether: one unit per lane, a group is
// g/8 consecutive lanes of a warp, its range a shuffle reduction (the lanes
// kernel). The shared-memory kernel serialized each group's parameters on one
// lane of 32 and ran at a sixth of the copy bandwidth on an H200.
// Every kernel covers a whole list of tensors (descriptor packs, common.cuh).
#include "bitstream.cuh"
#include "common.cuh"

namespace flocora {
namespace cuda {
namespace {

constexpr int kTileMax = 8192;          // elements of a fused tile (32 KiB as float)
constexpr int kTileGroupsMax = 1024;    // groups of a fused tile
constexpr int64_t kRangeChunk = 16384;  // elements per block of the min/max pass

// Min/max under a total order with -0 < +0, so the result (and the stored
// offset's sign) does not depend on the reduction order. Inputs are finite
// (non-finite input is an error).
__device__ __forceinline__ float min_ord(float a, float b) {
  return (b < a || (b == a && (float_bits(b) >> 31))) ? b : a;
}
__device__ __forceinline__ float max_ord(float a, float b) {
  return (b > a || (b == a && !(float_bits(b) >> 31))) ? b : a;
}

// (min, max) of every thread's (mn, mx) over the block (kThreads threads,
// all must call); the result is valid in thread 0. red: kThreads/32 entries.
__device__ __forceinline__ float2 block_minmax(float mn, float mx, float2* red) {
  for (int o = 16; o > 0; o >>= 1) {
    mn = min_ord(mn, __shfl_xor_sync(0xffffffffu, mn, o));
    mx = max_ord(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  }
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = make_float2(mn, mx);
  __syncthreads();
  float2 r = red[0];
  if (threadIdx.x == 0)
    for (int i = 1; i < kThreads / 32; ++i) r = make_float2(min_ord(r.x, red[i].x), max_ord(r.y, red[i].y));
  return r;
}

struct QuantDesc {
  const void* x;
  int64_t numel;
  int64_t group;       // group size (clamped to numel, so it fits an int in the fused path)
  int64_t tile;        // fused: elements per tile; big groups: range chunks per group
  int64_t work_begin;  // first work item (block) of this tensor in its launch
  int64_t byte_base;   // first byte of this tensor's stream in packed
  int64_t group_base;  // first group of this tensor in scales/offsets (and in the params buffer)
  int64_t aux_base;    // big groups: first range chunk of this tensor in the partials buffer
  uint64_t seed;
  int32_t dtype;
  int32_t vec;  // x is 16-byte aligned
};

struct MetaOut {
  void* scales;
  void* offsets;
  bool half;
  __device__ __forceinline__ void store(int64_t g, const AffineParams& p, uint16_t sh, uint16_t oh) const {
    if (half) {
      static_cast<uint16_t*>(scales)[g] = sh;
      static_cast<uint16_t*>(offsets)[g] = oh;
    } else {
      static_cast<float*>(scales)[g] = p.scale;
      static_cast<float*>(offsets)[g] = p.offset;
    }
  }
};

// affine_params of one group; writes the metadata, returns (offset, inv_scale).
__device__ __forceinline__ float2 finish_group(float mn, float mx, int bits, const MetaOut& meta, int64_t g,
                                               int* flag) {
  AffineParams p;
  uint16_t sh = 0, oh = 0;
  if (!affine_params(mn, mx, bits, meta.half, &p, &oh, &sh)) {
    raise_error(flag, kErrRange);
    p = AffineParams{0.0f, 0.0f, 0.0f};
  }
  meta.store(g, p, sh, oh);
  return make_float2(p.offset, p.inv_scale);
}

// Codes of the cnt (<= 8) elements idx0..idx0+cnt-1 (idx0 a multiple of 8),
// packed LSB-first into BITS bytes. params(j) -> (offset, inv_scale).
template <int BITS, typename ParamsFn>
__device__ __forceinline__ uint64_t quantize_unit(const float (&v)[8], int cnt, int64_t idx0, bool stochastic,
                                                  uint64_t seed, ParamsFn params) {
  constexpr float levels = (float)((1 << BITS) - 1);
  uint64_t word = 0;
  // idx0 % 8 == 0, so the 8 elements share the upper 32 index bits (one key).
  const uint32_t key = stochastic ? stochastic_key(seed, (uint64_t)idx0) : 0u;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (j < cnt) {
      float2 po = params(j);
      AffineParams p{po.x, 0.0f, po.y};
      uint32_t q = stochastic ? quantize_stochastic(v[j], p, levels, uniform24(key, (uint32_t)(idx0 + j)))
                              : quantize_nearest(v[j], p, levels);
      word |= (uint64_t)q << (j * BITS);
    }
  }
  return word;
}

// ---- fused path: small groups ----------------------------------------------
template <int BITS>
__global__ __launch_bounds__(kThreads) void quantize_pack_kernel(const __grid_constant__ Pack<QuantDesc> pack,
                                                                 uint8_t* __restrict__ packed, MetaOut meta,
                                                                 bool stochastic, int* flag) {
  __shared__ __align__(16) float xs[kTileMax];
  __shared__ float2 gp[kTileGroupsMax];
  const int64_t w = block_id();
  if (w >= pack.total) return;
  const QuantDesc& d = pack.d[find_desc(pack, w)];
  const int64_t e0 = (w - d.work_begin) * d.tile;  // a multiple of lcm(8, group)
  const int n = (int)min(d.tile, d.numel - e0);
  const int g = (int)d.group;
  const int nunits = (n + 7) / 8;

  bool bad = false;
  for (int u = threadIdx.x; u < nunits; u += kThreads) {
    float v[8];
    const int cnt = min(8, n - 8 * u);
    load_n<8>(d.x, e0 + 8 * u, d.dtype, d.vec != 0, cnt, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) bad |= j < cnt && !is_finite(v[j]);
    float4* dst = reinterpret_cast<float4*>(xs + 8 * u);
    dst[0] = make_float4(v[0], v[1], v[2], v[3]);
    dst[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
  if (bad) raise_error(flag, kErrNonFinite);
  __syncthreads();

  // Range of each group: L lanes per group (a power of two up to a warp),
  // strided over shared memory, then a shuffle reduction inside the segment.
  const int L = g >= 32 ? 32 : (g <= 1 ? 1 : 1 << (32 - __clz(g - 1)));
  const int per_pass = kThreads / L;
  const int seg = threadIdx.x / L, lane = threadIdx.x % L;
  const int ngroups = (n + g - 1) / g;
  const int64_t g0 = e0 / g;
  for (int base = 0; base < ngroups; base += per_pass) {  // uniform trip count: shuffles below are safe
    const int gi = base + seg;
    float mn = __int_as_float(0x7f800000), mx = __int_as_float(0xff800000);
    if (gi < ngroups) {
      const int s = gi * g, e = min(s + g, n);
      for (int i = s + lane; i < e; i += L) {
        mn = min_ord(mn, xs[i]);
        mx = max_ord(mx, xs[i]);
      }
    }
    for (int o = L >> 1; o > 0; o >>= 1) {
      mn = min_ord(mn, __shfl_xor_sync(0xffffffffu, mn, o));
      mx = max_ord(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    }
    if (gi < ngroups && lane == 0) gp[gi] = finish_group(mn, mx, BITS, meta, d.group_base + g0 + gi, flag);
  }
  __syncthreads();

  uint8_t* out = packed + d.byte_base + (e0 / 8) * BITS;
  for (int u = threadIdx.x; u < nunits; u += kThreads) {
    const int b = 8 * u, cnt = min(8, n - b);
    const float4* src = reinterpret_cast<const float4*>(xs + b);
    float4 a = src[0], c = src[1];
    float v[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
    int gi = b / g, gend = (gi + 1) * g;
    float2 cur = gp[gi];
    uint64_t word = quantize_unit<BITS>(v, cnt, e0 + b, stochastic, d.seed, [&](int j) {
      if (b + j >= gend) {  // groups shorter than 8 change inside a unit
        ++gi;
        gend += g;
        cur = gp[gi];
      }
      return cur;
    });
    store_bytes(out + (int64_t)u * BITS, word, cnt == 8 ? BITS : (cnt * BITS + 7) / 8);
  }
}

// ---- fused path in registers: groups of 8 * 2^k elements, k <= 5 -----------
// Work item = kUnitsPerBlock units of one tensor; unit u sits on lane u % 32
// (u0 and the k * kThreads steps are multiples of 32), so the L = g/8 units of
// a group are L consecutive lanes starting at a multiple of L. Every lane
// reduces over its segment with xor shuffles (the same min/max on each lane:
// min_ord/max_ord are a total order) and computes the group's parameters
// itself; the segment's first lane writes the metadata. A thread's loads are
// all issued before the first use.
template <int BITS>
__global__ __launch_bounds__(kThreads) void quantize_pack_lanes_kernel(const __grid_constant__ Pack<QuantDesc> pack,
                                                                       uint8_t* __restrict__ packed, MetaOut meta,
                                                                       bool stochastic, int* flag) {
  const int64_t w = block_id();
  if (w >= pack.total) return;  // the whole block: the shuffles below see full warps
  const QuantDesc& d = pack.d[find_desc(pack, w)];
  const int64_t u0 = (w - d.work_begin) * kUnitsPerBlock;
  const int64_t nunits = (d.numel + 7) / 8;
  const int L = (int)(d.group / 8);
  const int lane_in_group = (int)(threadIdx.x & 31) & (L - 1);
  float v[kUnitsPerThread][8];
  int cnt[kUnitsPerThread];
#pragma unroll
  for (int k = 0; k < kUnitsPerThread; ++k) {
    const int64_t u = u0 + k * kThreads + threadIdx.x;
    cnt[k] = u < nunits ? (int)min((int64_t)8, d.numel - 8 * u) : 0;
    if (cnt[k] > 0) {
      load_n<8>(d.x, 8 * u, d.dtype, d.vec != 0, cnt[k], v[k]);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) v[k][j] = 0.0f;
    }
  }
  bool bad = false;
#pragma unroll
  for (int k = 0; k < kUnitsPerThread; ++k) {
    const int64_t u = u0 + k * kThreads + threadIdx.x;
    float mn = __int_as_float(0x7f800000), mx = __int_as_float(0xff800000);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (j < cnt[k]) {
        bad |= !is_finite(v[k][j]);
        mn = min_ord(mn, v[k][j]);
        mx = max_ord(mx, v[k][j]);
      }
    }
    for (int o = L >> 1; o > 0; o >>= 1) {
      mn = min_ord(mn, __shfl_xor_sync(0xffffffffu, mn, o));
      mx = max_ord(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    }
    if (u - lane_in_group >= nunits) continue;  // no group here (past the tensor's end)
    AffineParams p;
    uint16_t sh = 0, oh = 0;
    const bool ok = affine_params(mn, mx, BITS, meta.half, &p, &oh, &sh);
    if (!ok) p = AffineParams{0.0f, 0.0f, 0.0f};
    if (lane_in_group == 0) {
      if (!ok) raise_error(flag, kErrRange);
      meta.store(d.group_base + u / L, p, sh, oh);
    }
    if (cnt[k] == 0) continue;
    const float2 po = make_float2(p.offset, p.inv_scale);
    const uint64_t word = quantize_unit<BITS>(v[k], cnt[k], 8 * u, stochastic, d.seed, [&](int) { return po; });
    store_bytes(packed + d.byte_base + u * BITS, word, cnt[k] == 8 ? BITS : (cnt[k] * BITS + 7) / 8);
  }
  if (bad) raise_error(flag, kErrNonFinite);
}

// ---- big groups: range pass, finalize, pack pass ---------------------------
// Work item = one chunk of kRangeChunk elements of one group.
__global__ __launch_bounds__(kThreads) void quantize_range_kernel(const __grid_constant__ Pack<QuantDesc> pack,
                                                                  float2* __restrict__ partial, int* flag) {
  __shared__ float2 red[kThreads / 32];
  const int64_t w = block_id();
  if (w >= pack.total) return;
  const QuantDesc& d = pack.d[find_desc(pack, w)];
  const int64_t local = w - d.work_begin;
  const int64_t grp = local / d.tile, piece = local % d.tile;
  const int64_t gb = grp * d.group;
  const int64_t s = gb + piece * kRangeChunk;
  const int64_t e = min(min(gb + d.group, d.numel), s + kRangeChunk);
  float mn = __int_as_float(0x7f800000), mx = __int_as_float(0xff800000);
  bool bad = false;
  // 8-element units from the first multiple of 8 (16-byte loads when aligned).
  const int64_t head_end = min(e, (s + 7) & ~(int64_t)7);
  for (int64_t i = s + threadIdx.x; i < head_end; i += kThreads) {
    float v = load_float(d.x, i, d.dtype);
    bad |= !is_finite(v);
    mn = min_ord(mn, v);
    mx = max_ord(mx, v);
  }
  for (int64_t i = head_end + 8 * (int64_t)threadIdx.x; i < e; i += 8 * kThreads) {
    float v[8];
    const int cnt = (int)min((int64_t)8, e - i);
    load_n<8>(d.x, i, d.dtype, d.vec != 0, cnt, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (j < cnt) {
        bad |= !is_finite(v[j]);
        mn = min_ord(mn, v[j]);
        mx = max_ord(mx, v[j]);
      }
    }
  }
  if (bad) raise_error(flag, kErrNonFinite);
  const float2 r = block_minmax(mn, mx, red);
  if (threadIdx.x == 0) partial[d.aux_base + local] = r;
}

// Work item = one group: a block reduces its partials (up to 16384 for a
// 1 GiB per-tensor group), writes the metadata and the (offset, inv_scale)
// the pack pass reads.
__global__ __launch_bounds__(kThreads) void quantize_finalize_kernel(const __grid_constant__ Pack<QuantDesc> pack,
                                                                     const float2* __restrict__ partial,
                                                                     float2* __restrict__ params, int bits,
                                                                     MetaOut meta, int* flag) {
  __shared__ float2 red[kThreads / 32];
  const int64_t w = block_id();
  if (w >= pack.total) return;
  const QuantDesc& d = pack.d[find_desc(pack, w)];
  const int64_t grp = w - d.work_begin;
  float mn = __int_as_float(0x7f800000), mx = __int_as_float(0xff800000);
  const float2* p = partial + d.aux_base + grp * d.tile;
  for (int64_t i = threadIdx.x; i < d.tile; i += kThreads) {
    const float2 v = p[i];
    mn = min_ord(mn, v.x);
    mx = max_ord(mx, v.y);
  }
  const float2 r = block_minmax(mn, mx, red);
  if (threadIdx.x == 0) params[d.group_base + grp] = finish_group(r.x, r.y, bits, meta, d.group_base + grp, flag);
}

// Work item = kUnitsPerBlock units of one tensor.
template <int BITS>
__global__ __launch_bounds__(kThreads) void quantize_pack_big_kernel(const __grid_constant__ Pack<QuantDesc> pack,
                                                                     const float2* __restrict__ params,
                                                                     uint8_t* __restrict__ packed, bool stochastic) {
  const int64_t w = block_id();
  if (w >= pack.total) return;
  const QuantDesc& d = pack.d[find_desc(pack, w)];
  const int64_t u0 = (w - d.work_begin) * kUnitsPerBlock;
  const int64_t nunits = (d.numel + 7) / 8;
  const float2* gp = params + d.group_base;
#pragma unroll
  for (int k = 0; k < kUnitsPerThread; ++k) {
    const int64_t u = u0 + k * kThreads + threadIdx.x;
    if (u >= nunits) break;
    const int64_t i0 = 8 * u;
    const int cnt = (int)min((int64_t)8, d.numel - i0);
    float v[8];
    load_n<8>(d.x, i0, d.dtype, d.vec != 0, cnt, v);
    int64_t gi = i0 / d.group, gend = (gi + 1) * d.group;
    float2 cur = gp[gi];
    uint64_t word = quantize_unit<BITS>(v, cnt, i0, stochastic, d.seed, [&](int j) {
      if (i0 + j >= gend) {
        ++gi;
        gend += d.group;
        cur = gp[gi];
      }
      return cur;
    });
    store_bytes(packed + d.byte_base + u * BITS, word, cnt == 8 ? BITS : (cnt * BITS + 7) / 8);
  }
}

// ---- host side -------------------------------------------------------------
int64_t gcd64(int64_t a, int64_t b) {
  while (b) {
    int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

static_assert(sizeof(Pack<QuantDesc>) + 256 <= 32764, "kernel arguments over the 32 KiB limit");
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_pack_cuda(at::TensorList xs, int64_t bits,
                                                                  at::IntArrayRef group_sizes, bool stochastic,
                                                                  at::IntArrayRef seeds, at::ScalarType meta_dtype) {
  const char* op = "flocora::quantize_pack";
  TORCH_CHECK(!xs.empty(), op, ": empty tensor list");
  const c10::Device dev = xs[0].device();
  const QuantizeLayout lay = quantize_pack_layout(
      op, xs, bits, group_sizes, seeds, meta_dtype,
      [&](const at::Tensor& x, size_t i) { check_cuda_tensor(x, dev, op, "tensor " + std::to_string(i)); });
  c10::cuda::CUDAGuard guard(dev);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  std::vector<at::Tensor> keep;  // contiguous inputs, alive until the kernels are queued
  std::vector<QuantDesc> lanes, fused, big;
  const int64_t total_bytes = lay.total_bytes, total_groups = lay.total_groups;
  int64_t total_pieces = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const QuantizeTensor& l = lay.ts[i];
    keep.push_back(xs[i].contiguous());
    QuantDesc d{};
    d.x = keep.back().data_ptr();
    d.numel = l.numel;
    d.group = std::min<int64_t>(l.group, std::max<int64_t>(d.numel, 1));
    d.byte_base = l.byte_base;
    d.group_base = l.group_base;
    d.seed = (uint64_t)seeds[i];
    d.dtype = l.dt;
    d.vec = aligned16(d.x);
    if (d.numel == 0) continue;
    const int64_t lanes_per_group = d.group / 8;
    if (d.group % 8 == 0 && lanes_per_group <= 32 && (lanes_per_group & (lanes_per_group - 1)) == 0) {
      lanes.push_back(d);
      continue;
    }
    // Fused tiles hold whole groups and start on unit (8-element) boundaries.
    const int64_t max_elems = std::min<int64_t>(kTileMax, (int64_t)kTileGroupsMax * d.group);
    const int64_t l8 = d.group / gcd64(d.group, 8) * 8;
    if (d.numel <= max_elems) {
      d.tile = d.numel;  // one tile
      fused.push_back(d);
    } else if (l8 <= max_elems) {
      d.tile = max_elems / l8 * l8;
      fused.push_back(d);
    } else {
      d.tile = (d.group + kRangeChunk - 1) / kRangeChunk;  // range chunks per group
      d.aux_base = total_pieces;
      total_pieces += num_groups(d.numel, d.group) * d.tile;
      big.push_back(d);
    }
  }

  auto opts = keep[0].options();
  at::Tensor packed = at::empty({total_bytes}, opts.dtype(at::kByte));
  at::Tensor scales = at::empty({total_groups}, opts.dtype(meta_dtype));
  at::Tensor offsets = at::empty({total_groups}, opts.dtype(meta_dtype));
  at::Tensor flag = at::zeros({1}, opts.dtype(at::kInt));
  int* flag_p = flag.data_ptr<int>();
  MetaOut meta{scales.data_ptr(), offsets.data_ptr(), meta_dtype == at::kHalf};
  uint8_t* out = packed.data_ptr<uint8_t>();

  dispatch_bits(bits, [&](auto B) {
    constexpr int BITS = decltype(B)::value;
    for_each_pack(
        lanes, [](const QuantDesc& d) { return num_groups((d.numel + 7) / 8, kUnitsPerBlock); },
        [&](const Pack<QuantDesc>& p) {
          quantize_pack_lanes_kernel<BITS>
              <<<grid_for(p.total), kThreads, 0, stream>>>(p, out, meta, stochastic, flag_p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    for_each_pack(
        fused, [](const QuantDesc& d) { return (d.numel + d.tile - 1) / d.tile; },
        [&](const Pack<QuantDesc>& p) {
          quantize_pack_kernel<BITS><<<grid_for(p.total), kThreads, 0, stream>>>(p, out, meta, stochastic, flag_p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  });
  if (!big.empty()) {
    at::Tensor partial = at::empty({total_pieces * 2}, opts.dtype(at::kFloat));
    at::Tensor params = at::empty({total_groups * 2}, opts.dtype(at::kFloat));
    float2* partial_p = reinterpret_cast<float2*>(partial.data_ptr<float>());
    float2* params_p = reinterpret_cast<float2*>(params.data_ptr<float>());
    for_each_pack(
        big, [](const QuantDesc& d) { return num_groups(d.numel, d.group) * d.tile; },
        [&](const Pack<QuantDesc>& p) {
          quantize_range_kernel<<<grid_for(p.total), kThreads, 0, stream>>>(p, partial_p, flag_p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    for_each_pack(
        big, [](const QuantDesc& d) { return num_groups(d.numel, d.group); },
        [&](const Pack<QuantDesc>& p) {
          quantize_finalize_kernel<<<grid_for(p.total), kThreads, 0, stream>>>(p, partial_p, params_p, (int)bits, meta,
                                                                               flag_p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    dispatch_bits(bits, [&](auto B) {
      constexpr int BITS = decltype(B)::value;
      for_each_pack(
          big, [](const QuantDesc& d) { return num_groups((d.numel + 7) / 8, kUnitsPerBlock); },
          [&](const Pack<QuantDesc>& p) {
            quantize_pack_big_kernel<BITS><<<grid_for(p.total), kThreads, 0, stream>>>(p, params_p, out, stochastic);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
    });
  }
  const int err = read_error_flag(flag);
  check_quantize_result(op, (err & kErrNonFinite) != 0, (err & kErrRange) != 0, meta_dtype);
  return {packed, scales, offsets};
}

}  // namespace cuda
}  // namespace flocora

TORCH_LIBRARY_IMPL(flocora, CUDA, m) { m.impl("quantize_pack", &flocora::cuda::quantize_pack_cuda); }
