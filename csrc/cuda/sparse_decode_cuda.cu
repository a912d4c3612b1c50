// CUDA kernels of sparse_decode and sparse_decode_add_ (schemas:
// csrc/ops.cpp, semantics: flocora_codec/ops.py, argument checks and sizes:
// csrc/include/flocora/host_checks.h), byte-identical to the CPU kernels.
//
// The index codes are untrusted. Count set bits per chunk, scan, check
// counts and padding, expand every set bit to its index, check that indices
// are in range and strictly increasing, and read the error flag back on the
// host: only then is anything written to the outputs.
#include "bitstream.cuh"
#include "common.cuh"

#include <climits>

namespace flocora {
namespace cuda {
namespace {

constexpr int64_t kByteChunk = (int64_t)kThreads * 8;  // index-code bytes per block
constexpr int64_t kPerBlock = kThreads;                // entries per block (validate/scatter)

struct SparseDesc {
  void* out;  // decode: the flat result; add_: this tensor's (contiguous) data
  int64_t n;
  int64_t k;
  int64_t work_begin;
  int64_t chunk_base;   // global index of the first chunk of the counted region
  int64_t idx_off;      // first byte of this tensor's code in index_bytes
  int64_t region_off;   // first byte of the counted region (bitmap, or Elias-Fano high part)
  int64_t region_bits;  // valid bits of the counted region
  int64_t val_off;      // first value of this tensor
  int64_t out_off;      // decode: first element of this tensor in the result
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
  if (i < 0 || i >= d.n)
    record_error(flag, kErrOutOfRange, d.tensor);
  else if (r > 0 && idx[d.val_off + r - 1] >= i)
    record_error(flag, kErrOrder, d.tensor);
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
  if (d.out_dtype == kF64) {
    double* out = static_cast<double*>(d.out);
    out[o] = accumulate ? out[o] + (double)v : (double)v;
    return;
  }
  if (accumulate) v = add_rn(load_float(d.out, o, d.out_dtype), v);
  store_float(d.out, o, d.out_dtype, v);
}

static_assert(sizeof(Pack<SparseDesc>) + 256 <= 32764, "kernel arguments over the 32 KiB limit");
}  // namespace

namespace {

// The descriptors of a decode, from its checked layout.
std::vector<SparseDesc> sparse_descs(const SparseLayout& lay, int64_t* nchunks) {
  std::vector<SparseDesc> descs;
  *nchunks = 0;
  for (size_t i = 0; i < lay.ts.size(); ++i) {
    const SparseTensor& t = lay.ts[i];
    SparseDesc d{};
    d.n = t.n;
    d.k = t.k;
    d.idx_off = t.ibase;
    d.val_off = t.vbase;
    d.out_off = t.obase;
    d.code = t.code;
    d.low_bits = t.low_bits;
    d.tensor = (int32_t)i;
    d.region_off = t.ubase;
    d.region_bits = t.ubits;
    d.chunk_base = *nchunks;
    *nchunks += ((d.region_bits + 7) / 8 + kByteChunk - 1) / kByteChunk;
    descs.push_back(d);
  }
  return descs;
}

// Validates every index code (nothing written), then scatters.
void sparse_run(const char* op, const SparseLayout& lay, std::vector<SparseDesc>& descs, int64_t nchunks,
                const at::Tensor& ib, const at::Tensor& values, Dt vdt, bool accumulate) {
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
  auto region_packs =
      make_packs(descs, [](const SparseDesc& d) { return ((d.region_bits + 7) / 8 + kByteChunk - 1) / kByteChunk; });
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
  if (bad >= 0) raise_malformed_index_code(op, bad, lay.ts[bad], kind);
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
  const Dt vdt = sparse_decode_dtypes(op, dtype, values_in);
  const SparseLayout lay = sparse_decode_layout(op, index_bytes_in, values_in, numels, counts, [&]() {
    check_cuda_tensor(values_in, dev, op, "values");
    check_cuda_tensor(index_bytes_in, dev, op, "index_bytes");
  });
  c10::cuda::CUDAGuard guard(dev);
  const Dt out_dt = decode_out_dtype(dtype, op, "dtype");
  at::Tensor ib = index_bytes_in.contiguous(), values = values_in.contiguous();
  int64_t nchunks = 0;
  auto descs = sparse_descs(lay, &nchunks);
  at::Tensor out = at::zeros({lay.total_numel}, values.options().dtype(dtype));
  for (auto& d : descs) {
    d.out = out.data_ptr();
    d.out_dtype = out_dt;
  }
  sparse_run(op, lay, descs, nchunks, ib, values, vdt, /*accumulate=*/false);
  return out;
}

void sparse_decode_add__cuda(at::TensorList outs, const at::Tensor& index_bytes_in, const at::Tensor& values_in,
                             at::IntArrayRef counts) {
  const char* op = "flocora::sparse_decode_add_";
  const c10::Device dev = values_in.device();
  const Dt vdt = sparse_decode_add_outputs(op, outs, counts, values_in, [&](const at::Tensor& out, size_t i) {
    check_cuda_tensor(out, dev, op, "output " + std::to_string(i));
  });
  std::vector<int64_t> ns(outs.size());
  for (size_t i = 0; i < outs.size(); ++i) ns[i] = outs[i].numel();
  const SparseLayout lay = sparse_decode_layout(op, index_bytes_in, values_in, ns, counts, [&]() {
    check_cuda_tensor(values_in, dev, op, "values");
    check_cuda_tensor(index_bytes_in, dev, op, "index_bytes");
  });
  c10::cuda::CUDAGuard guard(dev);
  std::vector<at::Tensor> work;  // contiguous views (or copies) of outs
  for (size_t i = 0; i < outs.size(); ++i) work.push_back(outs[i].contiguous());
  at::Tensor ib = index_bytes_in.contiguous(), values = values_in.contiguous();
  int64_t nchunks = 0;
  auto descs = sparse_descs(lay, &nchunks);
  for (size_t i = 0; i < descs.size(); ++i) {
    descs[i].out = work[i].data_ptr();
    descs[i].out_off = 0;
    descs[i].out_dtype = decode_out_dtype(work[i].scalar_type(), op, "every output");
  }
  sparse_run(op, lay, descs, nchunks, ib, values, vdt, /*accumulate=*/true);
  for (size_t i = 0; i < outs.size(); ++i)
    if (!work[i].is_same(outs[i])) outs[i].copy_(work[i]);
}

}  // namespace cuda
}  // namespace flocora

TORCH_LIBRARY_IMPL(flocora, CUDA, m) {
  m.impl("sparse_decode", &flocora::cuda::sparse_decode_cuda);
  m.impl("sparse_decode_add_", &flocora::cuda::sparse_decode_add__cuda);
}
