// CUDA kernels of topk_encode, sparse_decode and sparse_decode_add_
// (schemas: csrc/ops.cpp, semantics: flocora_codec/ops.py), byte-identical to
// the CPU kernels.
//
// topk_encode: no sort. The k-th largest magnitude key (affine.h
// magnitude_key, 31 bits) is found by a radix select over 8-bit digits (4
// histogram passes over the data, each followed by a tiny bucket-choice
// kernel); then every chunk counts its keys above and equal to the
// threshold, two scans give each chunk its first tie rank and first output
// rank, and a write pass emits the values in index order and ORs the index
// code bits (bitmap or Elias-Fano, affine.h sizes) into the output words.
// Ties at the threshold go to the lower index: the first `need` equal keys
// in (tensor, index) order. A "segment" is what one selection runs over: one
// tensor (local scope) or the whole list (global scope).
//
// sparse_decode(_add_): the index codes are untrusted. Count set bits per
// chunk, scan, check counts and padding, expand every set bit to its index,
// check that indices are in range and strictly increasing, and read the error
// flag back on the host: only then is anything written to the outputs.
#include "common.cuh"

#include <climits>

namespace flocora {
namespace cuda {
namespace {

constexpr int kItems = 16;                               // consecutive elements per thread
constexpr int64_t kChunk = (int64_t)kThreads * kItems;  // elements per block
constexpr int kScanThreads = 1024;
constexpr int64_t kByteChunk = (int64_t)kThreads * 8;    // index-code bytes per block (decode)
constexpr int64_t kPerBlock = kThreads;                  // entries per block (decode validate/scatter)
constexpr int32_t kF64Out = 3;                           // decoder output dtype code of float64

// ---- single-block exclusive scan ---------------------------------------------
// out[0..n] = exclusive prefix sums of in[0..n), out[n] = total. n is the
// number of chunks (tens of thousands at most), so one block is enough.
__global__ __launch_bounds__(kScanThreads) void exclusive_scan_kernel(const int64_t* __restrict__ in,
                                                                      int64_t* __restrict__ out, int64_t n) {
  __shared__ int64_t sm[kScanThreads / 32 + 1];
  int64_t carry = 0;
  for (int64_t base = 0; base < n; base += kScanThreads) {
    const int64_t i = base + threadIdx.x;
    int64_t tot;
    const int64_t ex = block_exclusive_sum<kScanThreads>(i < n ? in[i] : (int64_t)0, sm, &tot);
    if (i < n) out[i] = carry + ex;
    carry += tot;
  }
  if (threadIdx.x == 0) out[n] = carry;
}

void exclusive_scan(const at::Tensor& in, const at::Tensor& out, cudaStream_t stream) {
  exclusive_scan_kernel<<<1, kScanThreads, 0, stream>>>(in.data_ptr<int64_t>(), out.data_ptr<int64_t>(),
                                                        in.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

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
  int64_t tie = block_exclusive_sum<kThreads>((int64_t)__popc(eqm), sm, &tot) + eq_before[c] -
                eq_before[seg_first[d.seg]];
  const int64_t nd = need[d.seg];
  uint32_t selm = gtm;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    if ((eqm >> j) & 1u) {
      if (tie < nd) selm |= 1u << j;
      ++tie;
    }
  }
  int64_t rank = block_exclusive_sum<kThreads>((int64_t)__popc(selm), sm, &tot) + sel_before[c] -
                 sel_before[d.chunk_base];
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

// ---- sparse decode -----------------------------------------------------------
struct SparseDesc {
  void* out;        // decode: the flat result; add_: this tensor's (contiguous) data
  int64_t n;
  int64_t k;
  int64_t work_begin;
  int64_t chunk_base;  // global index of the first chunk of the counted region
  int64_t idx_off;     // first byte of this tensor's code in index_bytes
  int64_t region_off;  // first byte of the counted region (bitmap, or Elias-Fano high part)
  int64_t region_bits; // valid bits of the counted region
  int64_t val_off;     // first value of this tensor
  int64_t out_off;     // decode: first element of this tensor in the result
  int32_t code;
  int32_t low_bits;
  int32_t out_dtype;
  int32_t tensor;
};

// flag[0]: the error bits; flag[ffs(bit)]: INT_MAX - the lowest tensor with
// that error (0: none), so the host can name the tensor the CPU names.
constexpr int kFlagSlots = 8;
__device__ __forceinline__ void record_error(int* flag, int bit, int tensor) {
  atomicOr(flag, bit);
  atomicMax(flag + __ffs(bit), INT_MAX - tensor);
}

// The 8 region bytes of this thread, padding bits cleared; *pad: some were set.
__device__ __forceinline__ uint64_t region_word(const uint8_t* __restrict__ ib, const SparseDesc& d, int64_t b0,
                                                bool* pad) {
  uint64_t word = 0;
  const int64_t nbytes = (d.region_bits + 7) / 8;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int64_t b = b0 + j;
    if (b < nbytes) {
      uint32_t byte = ib[d.region_off + b];
      const int64_t valid = d.region_bits - 8 * b;
      if (valid < 8) {
        if (byte >> valid) *pad = true;
        byte &= (1u << valid) - 1;
      }
      word |= (uint64_t)byte << (8 * j);
    }
  }
  return word;
}

__global__ __launch_bounds__(kThreads) void sparse_count_kernel(const __grid_constant__ Pack<SparseDesc> pack,
                                                                const uint8_t* __restrict__ ib,
                                                                int64_t* __restrict__ counts, int* flag) {
  __shared__ int64_t sm[kThreads / 32 + 1];
  const int64_t w = block_id();
  if (w >= pack.total) return;
  const SparseDesc& d = pack.d[find_desc(pack, w)];
  const int64_t local = w - d.work_begin;
  bool pad = false;
  const uint64_t word = region_word(ib, d, local * kByteChunk + (int64_t)threadIdx.x * 8, &pad);
  if (local == 0 && threadIdx.x == 0 && d.code == kIndexEliasFano) {
    // Padding of the low-bits stream (its last byte).
    const int64_t low_total = d.k * d.low_bits;
    if (low_total % 8 && (ib[d.idx_off + low_total / 8] >> (low_total % 8)))
      record_error(flag, kErrLowPadding, d.tensor);
  }
  if (pad) record_error(flag, kErrPadding, d.tensor);
  int64_t tot;
  block_exclusive_sum<kThreads>((int64_t)__popcll(word), sm, &tot);
  if (threadIdx.x == 0) counts[d.chunk_base + local] = tot;
}

__global__ void sparse_check_counts_kernel(const __grid_constant__ Pack<SparseDesc> pack,
                                           const int64_t* __restrict__ before, int* flag) {
  const int i = threadIdx.x;
  if (i >= pack.n) return;
  const SparseDesc& d = pack.d[i];
  const int64_t nch = ((d.region_bits + 7) / 8 + kByteChunk - 1) / kByteChunk;
  if (before[d.chunk_base + nch] - before[d.chunk_base] != d.k) record_error(flag, kErrCount, d.tensor);
}

__device__ __forceinline__ uint64_t read_bits(const uint8_t* __restrict__ p, uint64_t pos, int nbits) {
  uint64_t r = 0;
  int got = 0;
  while (got < nbits) {
    const uint64_t q = pos + got;
    const int off = (int)(q & 7u);
    const int take = min(8 - off, nbits - got);
    r |= (uint64_t)((p[q >> 3] >> off) & ((1u << take) - 1)) << got;
    got += take;
  }
  return r;
}

// Every set bit of the region -> its index, at its rank, in idx.
__global__ __launch_bounds__(kThreads) void sparse_expand_kernel(const __grid_constant__ Pack<SparseDesc> pack,
                                                                 const uint8_t* __restrict__ ib,
                                                                 const int64_t* __restrict__ before,
                                                                 int64_t* __restrict__ idx) {
  __shared__ int64_t sm[kThreads / 32 + 1];
  const int64_t w = block_id();
  if (w >= pack.total) return;
  const SparseDesc& d = pack.d[find_desc(pack, w)];
  const int64_t local = w - d.work_begin;
  const int64_t b0 = local * kByteChunk + (int64_t)threadIdx.x * 8;
  bool pad = false;
  uint64_t word = region_word(ib, d, b0, &pad);
  int64_t tot;
  int64_t r = block_exclusive_sum<kThreads>((int64_t)__popcll(word), sm, &tot) + before[d.chunk_base + local] -
              before[d.chunk_base];
  const int l = d.low_bits;
  while (word) {
    const int bit = __ffsll((long long)word) - 1;
    word &= word - 1;
    if (r >= d.k) break;  // count mismatch: reported, nothing written past k
    const int64_t p = 8 * b0 + bit;
    int64_t i = p;
    if (d.code == kIndexEliasFano)
      i = (int64_t)(((uint64_t)(p - r) << l) | read_bits(ib + d.idx_off, (uint64_t)r * l, l));
    idx[d.val_off + r] = i;
    ++r;
  }
}

__global__ __launch_bounds__(kThreads) void sparse_validate_kernel(const __grid_constant__ Pack<SparseDesc> pack,
                                                                   const int64_t* __restrict__ idx, int* flag) {
  const int64_t w = block_id();
  if (w >= pack.total) return;
  const SparseDesc& d = pack.d[find_desc(pack, w)];
  const int64_t r = (w - d.work_begin) * kPerBlock + threadIdx.x;
  if (r >= d.k) return;
  const int64_t i = idx[d.val_off + r];
  if (i < 0 || i >= d.n) record_error(flag, kErrOutOfRange, d.tensor);
  else if (r > 0 && idx[d.val_off + r - 1] >= i) record_error(flag, kErrOrder, d.tensor);
}

__global__ __launch_bounds__(kThreads) void sparse_scatter_kernel(const __grid_constant__ Pack<SparseDesc> pack,
                                                                  const int64_t* __restrict__ idx,
                                                                  const void* __restrict__ values, int32_t val_dtype,
                                                                  bool accumulate, const int* __restrict__ flag) {
  const int64_t w = block_id();
  if (w >= pack.total) return;
  // Under CUDA graph capture the host cannot read the validation flag before
  // this launch, so the kernel reads it itself: a corrupt code writes nothing,
  // and no index, valid-looking or not, writes outside its tensor.
  if (flag[0] != 0) return;
  const SparseDesc& d = pack.d[find_desc(pack, w)];
  const int64_t r = (w - d.work_begin) * kPerBlock + threadIdx.x;
  if (r >= d.k) return;
  const int64_t i = idx[d.val_off + r];
  if (i < 0 || i >= d.n) return;
  const int64_t o = d.out_off + i;
  float v = load_float(values, d.val_off + r, val_dtype);
  // Indices are distinct (validated), so no two threads touch one element.
  // The sum is computed in float32 (float64 for float64 outputs) and rounded
  // once, as on the CPU.
  if (d.out_dtype == kF64Out) {
    double* out = static_cast<double*>(d.out);
    out[o] = accumulate ? out[o] + (double)v : (double)v;
    return;
  }
  if (accumulate) v = add_rn(load_float(d.out, o, d.out_dtype), v);
  store_float(d.out, o, d.out_dtype, v);
}

// Output dtypes of the decoders: the float dtypes, and float64.
int32_t out_dtype_code(at::ScalarType t, const char* op, const char* what) {
  if (t == at::kDouble) return kF64Out;
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op, ": ", what,
              " must be float32, float16, bfloat16 or float64, got ", t);
  return dtype_code(t, op, what);
}

at::Tensor to_device_i64(const std::vector<int64_t>& v, const at::TensorOptions& opts) {
  at::Tensor h = at::empty({(int64_t)v.size()}, at::TensorOptions().dtype(at::kLong));
  std::copy(v.begin(), v.end(), h.data_ptr<int64_t>());
  return h.to(at::TensorOptions().device(opts.device()).dtype(at::kLong));
}

static_assert(sizeof(Pack<TopkDesc>) + 256 <= 32764, "kernel arguments over the 32 KiB limit");
static_assert(sizeof(Pack<SparseDesc>) + 256 <= 32764, "kernel arguments over the 32 KiB limit");
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode_cuda(at::TensorList xs, at::IntArrayRef ks,
                                                                bool global_scope) {
  const char* op = "flocora::topk_encode";
  TORCH_CHECK(!xs.empty(), op, ": empty tensor list");
  const c10::Device dev = xs[0].device();
  for (size_t i = 0; i < xs.size(); ++i) check_cuda_tensor(xs[i], dev, op, "tensor " + std::to_string(i));
  c10::cuda::CUDAGuard guard(dev);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t T = (int64_t)xs.size();
  if (global_scope) {
    TORCH_CHECK(ks.size() == 1, op, ": global_scope=True takes ks = [k] (one k over all tensors), got ", ks.size(),
                " values");
  } else {
    TORCH_CHECK((int64_t)ks.size() == T, op, ": got ", ks.size(), " values of k for ", T, " tensors");
  }

  std::vector<at::Tensor> keep;
  std::vector<TopkDesc> descs;
  std::vector<int64_t> seg_first, need0;
  int64_t nchunks = 0, total_numel = 0;
  for (int64_t i = 0; i < T; ++i) {
    const int32_t dt = dtype_code(xs[i].scalar_type(), op, ("tensor " + std::to_string(i)).c_str());
    keep.push_back(xs[i].contiguous());
    TopkDesc d{};
    d.x = keep.back().data_ptr();
    d.numel = keep.back().numel();
    d.chunk_base = nchunks;
    d.dtype = dt;
    d.vec = aligned16(d.x);
    d.seg = global_scope ? 0 : (int32_t)i;
    d.tensor = (int32_t)i;
    if (!global_scope) {
      TORCH_CHECK(ks[i] >= 0 && ks[i] <= d.numel, op, ": k of tensor ", i, " must be in [0, numel = ", d.numel,
                  "], got ", ks[i]);
      seg_first.push_back(nchunks);
      need0.push_back(ks[i]);
    }
    nchunks += (d.numel + kChunk - 1) / kChunk;
    total_numel += d.numel;
    descs.push_back(d);
  }
  if (global_scope) {
    TORCH_CHECK(ks[0] >= 0 && ks[0] <= total_numel, op, ": k must be in [0, total numel = ", total_numel, "], got ",
                ks[0]);
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
    topk_count_kernel<<<grid_for(p.total), kThreads, 0, stream>>>(p, prefix_p, gt.data_ptr<int64_t>(),
                                                                  eq.data_ptr<int64_t>(), chunk_seg.data_ptr<int>(),
                                                                  flag_p);
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
  TORCH_CHECK_VALUE(!(err & kErrNonFinite), op, ": input has NaN or Inf values");

  // Output sizes: static for the local scope (counts = ks), read back for the global one.
  std::vector<int64_t> cnt(T);
  if (global_scope) {
    at::Tensor hc = counts.cpu();
    std::copy(hc.data_ptr<int64_t>(), hc.data_ptr<int64_t>() + T, cnt.begin());
  } else {
    std::copy(ks.begin(), ks.end(), cnt.begin());
  }
  int64_t nvalues = 0, nbytes = 0;
  for (int64_t i = 0; i < T; ++i) {
    TopkDesc& d = descs[i];
    d.count = cnt[i];
    d.val_off = nvalues;
    d.idx_off = nbytes;
    d.code = choose_index_code(d.numel, d.count);
    d.low_bits = elias_fano_low_bits(d.numel, d.count);
    d.low_nbytes = elias_fano_low_nbytes(d.numel, d.count);
    nvalues += d.count;
    nbytes += index_nbytes(d.numel, d.count);
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

namespace {

// Builds the per-tensor descriptors of a decode and checks every size
// before anything is read.
std::vector<SparseDesc> sparse_plan(const char* op, const at::Tensor& index_bytes, const at::Tensor& values,
                                    const std::vector<int64_t>& numels, at::IntArrayRef counts, int64_t* nchunks) {
  TORCH_CHECK(numels.size() == counts.size(), op, ": got ", numels.size(), " numels and ", counts.size(),
              " counts");
  TORCH_CHECK(index_bytes.scalar_type() == at::kByte, op, ": index_bytes must be uint8, got ",
              index_bytes.scalar_type());
  dtype_code(values.scalar_type(), op, "values");
  std::vector<SparseDesc> descs;
  int64_t nbytes = 0, nvalues = 0, elems = 0;
  *nchunks = 0;
  for (size_t i = 0; i < numels.size(); ++i) {
    const int64_t n = numels[i], k = counts[i];
    TORCH_CHECK(n >= 0, op, ": numel of tensor ", i, " is negative (", n, ")");
    TORCH_CHECK(k >= 0 && k <= n, op, ": count of tensor ", i, " must be in [0, numel = ", n, "], got ", k);
    SparseDesc d{};
    d.n = n;
    d.k = k;
    d.idx_off = nbytes;
    d.val_off = nvalues;
    d.out_off = elems;
    d.code = choose_index_code(n, k);
    d.low_bits = elias_fano_low_bits(n, k);
    d.tensor = (int32_t)i;
    if (d.code == kIndexBitmap) {
      d.region_off = nbytes;
      d.region_bits = n;
    } else {
      d.region_off = nbytes + elias_fano_low_nbytes(n, k);
      d.region_bits = k > 0 ? ((n - 1) >> d.low_bits) + k : 0;
    }
    d.chunk_base = *nchunks;
    *nchunks += ((d.region_bits + 7) / 8 + kByteChunk - 1) / kByteChunk;
    nbytes += index_nbytes(n, k);
    nvalues += k;
    elems += n;
    descs.push_back(d);
  }
  TORCH_CHECK(index_bytes.numel() == nbytes, op, ": index_bytes has ", index_bytes.numel(),
              " bytes, numels and counts need ", nbytes);
  TORCH_CHECK(values.numel() == nvalues, op, ": values has ", values.numel(), " elements, counts need ", nvalues);
  return descs;
}

// Validates every index code (nothing written), then scatters.
void sparse_run(const char* op, std::vector<SparseDesc>& descs, int64_t nchunks, const at::Tensor& ib,
                const at::Tensor& values, bool accumulate) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto opts = ib.options();
  auto lopts = opts.dtype(at::kLong);
  int64_t nvalues = 0;
  for (const auto& d : descs) nvalues += d.k;
  at::Tensor counts = at::empty({nchunks}, lopts), before = at::empty({nchunks + 1}, lopts);
  at::Tensor idx = at::empty({nvalues}, lopts);
  at::Tensor flag = at::zeros({kFlagSlots}, opts.dtype(at::kInt));
  int* flag_p = flag.data_ptr<int>();
  const uint8_t* ib_p = ib.data_ptr<uint8_t>();
  auto region_packs = make_packs(descs, [](const SparseDesc& d) {
    return ((d.region_bits + 7) / 8 + kByteChunk - 1) / kByteChunk;
  });
  for (const auto& p : region_packs) {
    sparse_count_kernel<<<grid_for(p.total), kThreads, 0, stream>>>(p, ib_p, counts.data_ptr<int64_t>(), flag_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  exclusive_scan(counts, before, stream);
  for (const auto& p : region_packs) {
    sparse_check_counts_kernel<<<1, kPack, 0, stream>>>(p, before.data_ptr<int64_t>(), flag_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sparse_expand_kernel<<<grid_for(p.total), kThreads, 0, stream>>>(p, ib_p, before.data_ptr<int64_t>(),
                                                                     idx.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto entry_packs = make_packs(descs, [](const SparseDesc& d) { return (d.k + kPerBlock - 1) / kPerBlock; });
  for (const auto& p : entry_packs) {
    sparse_validate_kernel<<<grid_for(p.total), kThreads, 0, stream>>>(p, idx.data_ptr<int64_t>(), flag_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // The one sync of the call: nothing is written before the codes are known good.
  int h[kFlagSlots] = {0};
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    at::Tensor hf = flag.cpu();
    std::copy(hf.data_ptr<int>(), hf.data_ptr<int>() + kFlagSlots, h);
  }
  // The CPU's order: padding of any tensor, then the counts, then the decoded
  // indices; within a phase the lowest failing tensor, with the kind the CPU
  // reports for it (low padding over padding, out of range over order).
  auto lowest = [&](int bit) -> int64_t {
    const int v = h[__builtin_ffs(bit)];
    return v ? (int64_t)INT_MAX - v : -1;
  };
  auto first_of = [&](int bit_a, int kind_a, int bit_b, int kind_b, int* kind) -> int64_t {
    const int64_t a = lowest(bit_a), b = lowest(bit_b);
    if (a >= 0 && (b < 0 || a <= b)) {
      *kind = kind_a;
      return a;
    }
    *kind = kind_b;
    return b;
  };
  int kind = kIdxOk;
  int64_t bad = first_of(kErrLowPadding, kIdxLowPadding, kErrPadding, kIdxPadding, &kind);
  if (bad < 0) {
    kind = kIdxBitCount;
    bad = lowest(kErrCount);
  }
  if (bad < 0) bad = first_of(kErrOutOfRange, kIdxOutOfRange, kErrOrder, kIdxNotIncreasing, &kind);
  if (bad >= 0) {
    const SparseDesc& d = descs[bad];
    // ValueError: a format violation of the message, not a kernel failure.
    TORCH_CHECK_VALUE(false, op, ": index code of tensor ", bad, " (",
                      d.code == kIndexBitmap ? "bitmap" : "Elias-Fano", ", numel ", d.n, ", count ", d.k,
                      ") is malformed: ", index_code_error_text(kind));
  }
  const int32_t vdt = dtype_code(values.scalar_type(), op, "values");
  for (const auto& p : entry_packs) {
    sparse_scatter_kernel<<<grid_for(p.total), kThreads, 0, stream>>>(p, idx.data_ptr<int64_t>(), values.data_ptr(),
                                                                      vdt, accumulate, flag_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

at::Tensor sparse_decode_cuda(const at::Tensor& index_bytes_in, const at::Tensor& values_in, at::IntArrayRef numels,
                              at::IntArrayRef counts, at::ScalarType dtype) {
  const char* op = "flocora::sparse_decode";
  const c10::Device dev = values_in.device();
  check_cuda_tensor(values_in, dev, op, "values");
  check_cuda_tensor(index_bytes_in, dev, op, "index_bytes");
  c10::cuda::CUDAGuard guard(dev);
  const int32_t out_dt = out_dtype_code(dtype, op, "dtype");
  at::Tensor ib = index_bytes_in.contiguous(), values = values_in.contiguous();
  int64_t nchunks = 0;
  std::vector<int64_t> ns(numels.begin(), numels.end());
  auto descs = sparse_plan(op, ib, values, ns, counts, &nchunks);
  int64_t total = 0;
  for (int64_t n : ns) total += n;
  at::Tensor out = at::zeros({total}, values.options().dtype(dtype));
  for (auto& d : descs) {
    d.out = out.data_ptr();
    d.out_dtype = out_dt;
  }
  sparse_run(op, descs, nchunks, ib, values, /*accumulate=*/false);
  return out;
}

void sparse_decode_add__cuda(at::TensorList outs, const at::Tensor& index_bytes_in, const at::Tensor& values_in,
                             at::IntArrayRef counts) {
  const char* op = "flocora::sparse_decode_add_";
  const c10::Device dev = values_in.device();
  check_cuda_tensor(values_in, dev, op, "values");
  check_cuda_tensor(index_bytes_in, dev, op, "index_bytes");
  TORCH_CHECK(outs.size() == counts.size(), op, ": got ", outs.size(), " output tensors and ", counts.size(),
              " counts");
  std::vector<at::Tensor> work;  // contiguous views (or copies) of outs
  std::vector<int64_t> ns;
  // Memory spans of the outputs: an element written twice would race.
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  for (size_t i = 0; i < outs.size(); ++i) {
    check_cuda_tensor(outs[i], dev, op, "output " + std::to_string(i));
    out_dtype_code(outs[i].scalar_type(), op, "every output");
    work.push_back(outs[i].contiguous());
    ns.push_back(outs[i].numel());
    if (ns.back() == 0) continue;
    int64_t extent = 1;
    for (int64_t d = 0; d < outs[i].dim(); ++d) extent += (outs[i].size(d) - 1) * outs[i].stride(d);
    uintptr_t p = reinterpret_cast<uintptr_t>(outs[i].data_ptr());
    spans.push_back({p, p + (uintptr_t)(extent * outs[i].element_size())});
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    TORCH_CHECK(spans[i].first >= spans[i - 1].second, op, ": output tensors overlap in memory");
  c10::cuda::CUDAGuard guard(dev);
  at::Tensor ib = index_bytes_in.contiguous(), values = values_in.contiguous();
  int64_t nchunks = 0;
  auto descs = sparse_plan(op, ib, values, ns, counts, &nchunks);
  for (size_t i = 0; i < descs.size(); ++i) {
    descs[i].out = work[i].data_ptr();
    descs[i].out_off = 0;
    descs[i].out_dtype = out_dtype_code(work[i].scalar_type(), op, "every output");
  }
  sparse_run(op, descs, nchunks, ib, values, /*accumulate=*/true);
  for (size_t i = 0; i < outs.size(); ++i)
    if (!work[i].is_same(outs[i])) outs[i].copy_(work[i]);
}

}  // namespace cuda
}  // namespace flocora

TORCH_LIBRARY_IMPL(flocora, CUDA, m) {
  m.impl("topk_encode", &flocora::cuda::topk_encode_cuda);
  m.impl("sparse_decode", &flocora::cuda::sparse_decode_cuda);
  m.impl("sparse_decode_add_", &flocora::cuda::sparse_decode_add__cuda);
}
