// CUDA kernels of topk_encode (schema: csrc/ops.cpp, semantics:
// flocora_codec/ops.py, argument checks and output layout:
// csrc/include/flocora/host_checks.h), byte-identical to the CPU kernel.
//
// No sort. The k-th largest magnitude key (affine.h magnitude_key, 31 bits)
// is found by a radix select over 8-bit digits (4 histogram passes over the
// data, each followed by a tiny bucket-choice kernel); then every chunk
// counts its keys above and equal to the threshold, two scans give each
// chunk its first tie rank and first output rank, and a write pass emits the
// values in index order and ORs the index code bits (bitmap or Elias-Fano,
// affine.h sizes) into the output words (bitstream.cuh). Ties at the
// threshold go to the lower index: the first `need` equal keys in (tensor,
// index) order. A "segment" is what one selection runs over: one tensor
// (local scope) or the whole list (global scope).
#include "bitstream.cuh"
#include "common.cuh"

namespace flocora {
namespace cuda {
namespace {

constexpr int kItems = 16;                              // consecutive elements per thread
constexpr int64_t kChunk = (int64_t)kThreads * kItems;  // elements per block

// ---- top-k encode ---------------------------------------------------------
struct TopkDesc {
  const void* x;
  int64_t numel;
  int64_t work_begin;
  int64_t chunk_base;  // global index of this tensor's first chunk
  int64_t count;       // elements kept (write pass)
  int64_t val_off;     // first value of this tensor in values (write pass)
  int64_t idx_off;     // first byte of this tensor's index code (write pass)
  int64_t low_nbytes;  // Elias-Fano: bytes of the low-bits stream
  int32_t code;        // kIndexBitmap / kIndexEliasFano
  int32_t low_bits;    // Elias-Fano l
  int32_t dtype;
  int32_t vec;
  int32_t seg;     // selection segment
  int32_t tensor;  // position in the list
};

__device__ __forceinline__ int load_chunk(const TopkDesc& d, int64_t c0, float (&v)[kItems]) {
  const int64_t i0 = c0 + (int64_t)threadIdx.x * kItems;
  const int cnt = (int)max((int64_t)0, min((int64_t)kItems, d.numel - i0));
  load_n<kItems>(d.x, i0, d.dtype, d.vec != 0, cnt, v);
  return cnt;
}

// Histogram of the 8-bit digit at `shift` of the keys that match the
// segment's prefix above it.
__global__ __launch_bounds__(kThreads) void topk_hist_kernel(const __grid_constant__ Pack<TopkDesc> pack, int shift,
                                                             const uint32_t* __restrict__ prefix,
                                                             const int64_t* __restrict__ krem,
                                                             unsigned long long* __restrict__ hist) {
  __shared__ uint32_t h[256];
  const int64_t w = block_id();
  if (w >= pack.total) return;
  const TopkDesc& d = pack.d[find_desc(pack, w)];
  if (krem[d.seg] == 0) return;  // k == 0: nothing to select (uniform per block)
  for (int i = threadIdx.x; i < 256; i += kThreads) h[i] = 0;
  __syncthreads();
  float v[kItems];
  const int cnt = load_chunk(d, (w - d.work_begin) * kChunk, v);
  const uint32_t pre = prefix[d.seg];
  const uint32_t hmask = shift >= 24 ? 0u : (0xffffffffu << (shift + 8));
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const uint32_t key = magnitude_key(v[j]);
    const uint32_t bin = (j < cnt && (key & hmask) == (pre & hmask)) ? (key >> shift) & 255u : 256u;
    // Few distinct digits are common (similar magnitudes): aggregate equal
    // bins of the warp before the shared-memory atomic.
    const unsigned peers = __match_any_sync(0xffffffffu, bin);
    if (bin < 256u && lane == __ffs(peers) - 1) atomicAdd(&h[bin], (uint32_t)__popc(peers));
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 256; i += kThreads)
    if (h[i]) atomicAdd(&hist[(int64_t)d.seg * 256 + i], (unsigned long long)h[i]);
}

// One block per segment: the digit holding the k_rem-th largest key, then
// clears the histogram for the next pass.
__global__ __launch_bounds__(256) void topk_select_kernel(int shift, uint32_t* __restrict__ prefix,
                                                          int64_t* __restrict__ krem,
                                                          unsigned long long* __restrict__ hist) {
  __shared__ unsigned long long h[256];
  const int64_t seg = blockIdx.x;
  h[threadIdx.x] = hist[seg * 256 + threadIdx.x];
  hist[seg * 256 + threadIdx.x] = 0;
  __syncthreads();
  if (threadIdx.x == 0) {
    const int64_t k = krem[seg];
    if (k > 0) {
      unsigned long long above = 0;
      int b = 255;
      for (; b > 0; --b) {
        if ((int64_t)(above + h[b]) >= k) break;
        above += h[b];
      }
      prefix[seg] |= (uint32_t)b << shift;
      krem[seg] = k - (int64_t)above;
    }
  }
}

// Per chunk: keys above and equal to the segment's threshold; NaN/Inf check.
__global__ __launch_bounds__(kThreads) void topk_count_kernel(const __grid_constant__ Pack<TopkDesc> pack,
                                                              const uint32_t* __restrict__ thresh,
                                                              int64_t* __restrict__ gt, int64_t* __restrict__ eq,
                                                              int32_t* __restrict__ chunk_seg, int* flag) {
  __shared__ int64_t sm[kThreads / 32 + 1];
  const int64_t w = block_id();
  if (w >= pack.total) return;
  const TopkDesc& d = pack.d[find_desc(pack, w)];
  float v[kItems];
  const int cnt = load_chunk(d, (w - d.work_begin) * kChunk, v);
  const uint32_t t = thresh[d.seg];
  int ngt = 0, neq = 0;
  bool bad = false;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    if (j < cnt) {
      const uint32_t key = magnitude_key(v[j]);
      bad |= !is_finite(v[j]);
      ngt += key > t;
      neq += key == t;
    }
  }
  if (bad) raise_error(flag, kErrNonFinite);
  int64_t tgt, teq;
  block_exclusive_sum<kThreads>((int64_t)ngt, sm, &tgt);
  block_exclusive_sum<kThreads>((int64_t)neq, sm, &teq);
  if (threadIdx.x == 0) {
    const int64_t c = d.chunk_base + (w - d.work_begin);
    gt[c] = tgt;
    eq[c] = teq;
    chunk_seg[c] = d.seg;
  }
}

// sel[c] = keys above the threshold + the ties this chunk keeps.
__global__ void topk_take_kernel(int64_t nchunks, const int64_t* __restrict__ gt, const int64_t* __restrict__ eq,
                                 const int64_t* __restrict__ eq_before, const int32_t* __restrict__ chunk_seg,
                                 const int64_t* __restrict__ seg_first, const int64_t* __restrict__ need,
                                 int64_t* __restrict__ sel) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= nchunks) return;
  const int s = chunk_seg[c];
  const int64_t before = eq_before[c] - eq_before[seg_first[s]];
  sel[c] = gt[c] + min(eq[c], max((int64_t)0, need[s] - before));
}

// counts[t] from the selection scan.
__global__ void topk_counts_kernel(const __grid_constant__ Pack<TopkDesc> pack, const int64_t* __restrict__ sel_before,
                                   int64_t* __restrict__ counts) {
  const int i = threadIdx.x;
  if (i >= pack.n) return;
  const TopkDesc& d = pack.d[i];
  const int64_t nch = (d.numel + kChunk - 1) / kChunk;
  counts[d.tensor] = sel_before[d.chunk_base + nch] - sel_before[d.chunk_base];
}

// Values in index order, index code bits ORed into 32-bit words (the output
// is zeroed and padded to whole words; bytes of other tensors get zero bits).
__global__ __launch_bounds__(kThreads) void topk_write_kernel(
    const __grid_constant__ Pack<TopkDesc> pack, const uint32_t* __restrict__ thresh, const int64_t* __restrict__ need,
    const int64_t* __restrict__ seg_first, const int64_t* __restrict__ eq_before,
    const int64_t* __restrict__ sel_before, float* __restrict__ values, uint32_t* __restrict__ words) {
  __shared__ int64_t sm[kThreads / 32 + 1];
  const int64_t w = block_id();
  if (w >= pack.total) return;
  const TopkDesc& d = pack.d[find_desc(pack, w)];
  const int64_t local = w - d.work_begin, c = d.chunk_base + local;
  float v[kItems];
  const int cnt = load_chunk(d, local * kChunk, v);
  const uint32_t t = thresh[d.seg];
  uint32_t gtm = 0, eqm = 0;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    if (j < cnt) {
      const uint32_t key = magnitude_key(v[j]);
      gtm |= (uint32_t)(key > t) << j;
      eqm |= (uint32_t)(key == t) << j;
    }
  }
  int64_t tot;
  int64_t tie =
      block_exclusive_sum<kThreads>((int64_t)__popc(eqm), sm, &tot) + eq_before[c] - eq_before[seg_first[d.seg]];
  const int64_t nd = need[d.seg];
  uint32_t selm = gtm;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    if ((eqm >> j) & 1u) {
      if (tie < nd) selm |= 1u << j;
      ++tie;
    }
  }
  int64_t rank =
      block_exclusive_sum<kThreads>((int64_t)__popc(selm), sm, &tot) + sel_before[c] - sel_before[d.chunk_base];
  if (selm == 0) return;
  const int64_t i0 = local * kChunk + (int64_t)threadIdx.x * kItems;
  const uint64_t code_bit = (uint64_t)d.idx_off * 8;
  if (d.code == kIndexBitmap) atomic_or_bits(words, code_bit + i0, selm, kItems);
  const int l = d.low_bits;
  const uint64_t high_bit = code_bit + (uint64_t)d.low_nbytes * 8;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    if ((selm >> j) & 1u) {
      values[d.val_off + rank] = v[j];
      if (d.code == kIndexEliasFano) {
        const uint64_t idx = (uint64_t)(i0 + j);
        atomic_or_bits(words, code_bit + (uint64_t)rank * l, idx & ((1ull << l) - 1), l);
        atomic_or_bits(words, high_bit + (idx >> l) + (uint64_t)rank, 1, 1);
      }
      ++rank;
    }
  }
}

at::Tensor to_device_i64(const std::vector<int64_t>& v, const at::TensorOptions& opts) {
  at::Tensor h = at::empty({(int64_t)v.size()}, at::TensorOptions().dtype(at::kLong));
  std::copy(v.begin(), v.end(), h.data_ptr<int64_t>());
  return h.to(at::TensorOptions().device(opts.device()).dtype(at::kLong));
}

static_assert(sizeof(Pack<TopkDesc>) + 256 <= 32764, "kernel arguments over the 32 KiB limit");
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode_cuda(at::TensorList xs, at::IntArrayRef ks,
                                                                bool global_scope) {
  const char* op = "flocora::topk_encode";
  TORCH_CHECK(!xs.empty(), op, ": empty tensor list");
  const c10::Device dev = xs[0].device();
  const TopkInput in = topk_encode_input(op, xs, ks, global_scope, [&](const at::Tensor& x, size_t i) {
    check_cuda_tensor(x, dev, op, "tensor " + std::to_string(i));
  });
  c10::cuda::CUDAGuard guard(dev);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t T = (int64_t)xs.size();

  std::vector<at::Tensor> keep;
  std::vector<TopkDesc> descs;
  std::vector<int64_t> seg_first, need0;
  int64_t nchunks = 0;
  for (int64_t i = 0; i < T; ++i) {
    keep.push_back(xs[i].contiguous());
    TopkDesc d{};
    d.x = keep.back().data_ptr();
    d.numel = in.numel[i];
    d.chunk_base = nchunks;
    d.dtype = in.dt[i];
    d.vec = aligned16(d.x);
    d.seg = global_scope ? 0 : (int32_t)i;
    d.tensor = (int32_t)i;
    if (!global_scope) {
      seg_first.push_back(nchunks);
      need0.push_back(ks[i]);
    }
    nchunks += (d.numel + kChunk - 1) / kChunk;
    descs.push_back(d);
  }
  if (global_scope) {
    seg_first.push_back(0);
    need0.push_back(ks[0]);
  }
  const int64_t nseg = (int64_t)need0.size();
  auto opts = keep[0].options();
  auto lopts = opts.dtype(at::kLong);

  // Radix select state: prefix (the threshold key, built digit by digit) and
  // k_rem (how many of the keys matching the prefix are still to take). k = 0
  // starts at prefix 0xFFFFFFFF, above every key: nothing is selected.
  std::vector<int64_t> prefix0(nseg);
  for (int64_t s = 0; s < nseg; ++s) prefix0[s] = need0[s] == 0 ? (int64_t)0xFFFFFFFF : 0;
  at::Tensor prefix = to_device_i64(prefix0, opts).to(at::kInt);  // uint32 bits in int32
  at::Tensor krem = to_device_i64(need0, opts);
  at::Tensor segfirst = to_device_i64(seg_first, opts);
  at::Tensor hist = at::zeros({nseg * 256}, lopts);
  at::Tensor flag = at::zeros({1}, opts.dtype(at::kInt));
  int* flag_p = flag.data_ptr<int>();
  uint32_t* prefix_p = reinterpret_cast<uint32_t*>(prefix.data_ptr<int>());
  int64_t* krem_p = krem.data_ptr<int64_t>();
  auto hist_p = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());

  auto chunk_work = [](const TopkDesc& d) { return (d.numel + kChunk - 1) / kChunk; };
  auto packs = make_packs(descs, chunk_work);
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (const auto& p : packs) {
      topk_hist_kernel<<<grid_for(p.total), kThreads, 0, stream>>>(p, shift, prefix_p, krem_p, hist_p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    topk_select_kernel<<<(unsigned)nseg, 256, 0, stream>>>(shift, prefix_p, krem_p, hist_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // Now prefix = the k-th largest key of each segment, krem = ties to take.
  at::Tensor gt = at::empty({nchunks}, lopts), eq = at::empty({nchunks}, lopts);
  at::Tensor chunk_seg = at::empty({nchunks}, opts.dtype(at::kInt));
  at::Tensor eq_before = at::empty({nchunks + 1}, lopts), sel = at::empty({nchunks}, lopts);
  at::Tensor sel_before = at::empty({nchunks + 1}, lopts);
  at::Tensor counts = at::zeros({T}, lopts);
  for (const auto& p : packs) {
    topk_count_kernel<<<grid_for(p.total), kThreads, 0, stream>>>(
        p, prefix_p, gt.data_ptr<int64_t>(), eq.data_ptr<int64_t>(), chunk_seg.data_ptr<int>(), flag_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  exclusive_scan(eq, eq_before, stream);
  if (nchunks > 0) {
    topk_take_kernel<<<(unsigned)((nchunks + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        nchunks, gt.data_ptr<int64_t>(), eq.data_ptr<int64_t>(), eq_before.data_ptr<int64_t>(),
        chunk_seg.data_ptr<int>(), segfirst.data_ptr<int64_t>(), krem_p, sel.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  exclusive_scan(sel, sel_before, stream);
  for (const auto& p : packs) {
    topk_counts_kernel<<<1, kPack, 0, stream>>>(p, sel_before.data_ptr<int64_t>(), counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int err = read_error_flag(flag);
  check_finite_input(op, (err & kErrNonFinite) != 0);

  // Output sizes: static for the local scope (counts = ks), read back for the global one.
  std::vector<int64_t> cnt(T);
  if (global_scope) {
    at::Tensor hc = counts.cpu();
    std::copy(hc.data_ptr<int64_t>(), hc.data_ptr<int64_t>() + T, cnt.begin());
  } else {
    std::copy(ks.begin(), ks.end(), cnt.begin());
  }
  std::vector<TopkOutput> outl;
  int64_t nvalues = 0, nbytes = 0;
  topk_output_layout(in.numel, cnt, &outl, &nvalues, &nbytes);
  for (int64_t i = 0; i < T; ++i) {
    TopkDesc& d = descs[i];
    d.count = outl[i].count;
    d.val_off = outl[i].voff;
    d.idx_off = outl[i].ioff;
    d.code = outl[i].code;
    d.low_bits = outl[i].low_bits;
    d.low_nbytes = outl[i].low_nbytes;
  }
  at::Tensor values = at::empty({nvalues}, opts.dtype(at::kFloat));
  const int64_t nwords = (nbytes + 3) / 4;
  at::Tensor words = at::zeros({nwords * 4}, opts.dtype(at::kByte));
  auto write_packs = make_packs(descs, chunk_work);
  for (const auto& p : write_packs) {
    topk_write_kernel<<<grid_for(p.total), kThreads, 0, stream>>>(
        p, prefix_p, krem_p, segfirst.data_ptr<int64_t>(), eq_before.data_ptr<int64_t>(),
        sel_before.data_ptr<int64_t>(), values.data_ptr<float>(), reinterpret_cast<uint32_t*>(words.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor index_bytes = nwords * 4 == nbytes ? words : words.narrow(0, 0, nbytes).clone();
  return {counts, values, index_bytes};
}

}  // namespace cuda
}  // namespace flocora

TORCH_LIBRARY_IMPL(flocora, CUDA, m) { m.impl("topk_encode", &flocora::cuda::topk_encode_cuda); }
