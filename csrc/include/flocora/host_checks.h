// Host-side argument checks, output layouts and dtype dispatch of every op,
// shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels. The decoders
// read untrusted bytes: a check lives here once, so a fix cannot reach one
// backend and miss the other, and both reject the same arguments with the
// same message in the same order. A backend adds only its device checks,
// passed in as callables and run at the point the CPU has always run them.
//
// Host code only (ATen and affine.h's sizes): no device code, no kernels.
#pragma once
#include <stdint.h>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include <flocora/affine.h>

namespace flocora {

// ---- element dtypes ----------------------------------------------------------
// The element dtypes the kernels read and write. The values are also the
// codes the CUDA kernels receive.
enum Dt : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

inline int elem_size(Dt dt) { return dt == kF64 ? 8 : (dt == kF32 ? 4 : 2); }

// float32, float16 or bfloat16 -> its code; false for any other dtype.
inline bool float_dt(at::ScalarType st, Dt* dt) {
  switch (st) {
    case at::kFloat: *dt = kF32; return true;
    case at::kHalf: *dt = kF16; return true;
    case at::kBFloat16: *dt = kBF16; return true;
    default: return false;
  }
}

// `what` (values, an output dtype) must be float32, float16 or bfloat16.
inline Dt float_dtype(at::ScalarType st, const char* op, const char* what) {
  Dt dt = kF32;
  TORCH_CHECK(float_dt(st, &dt), op, ": ", what, " must be float32, float16 or bfloat16, got ", st);
  return dt;
}

// The decoders' outputs: the float dtypes, and float64.
inline Dt decode_out_dtype(at::ScalarType st, const char* op, const char* what) {
  Dt dt = kF32;
  if (st == at::kDouble) return kF64;
  TORCH_CHECK(float_dt(st, &dt), op, ": ", what, " must be float32, float16, bfloat16 or float64, got ", st);
  return dt;
}

// fn(std::integral_constant<Dt, D>()) for the float dtype dt (not kF64).
template <typename Fn>
void dispatch_dt(Dt dt, const Fn& fn) {
  switch (dt) {
    case kF32: fn(std::integral_constant<Dt, kF32>()); break;
    case kF16: fn(std::integral_constant<Dt, kF16>()); break;
    case kBF16: fn(std::integral_constant<Dt, kBF16>()); break;
    default: TORCH_CHECK(false, "flocora: no float dtype of code ", (int)dt);
  }
}

inline void check_bits(int64_t bits, const char* op) {
  TORCH_CHECK(bits >= 1 && bits <= 8, op, ": bits must be in 1..8, got ", bits);
}

// fn(std::integral_constant<int, B>()) for bits = B in 1..8.
template <typename Fn>
void dispatch_bits(int64_t bits, const Fn& fn) {
  switch (bits) {
    case 1: fn(std::integral_constant<int, 1>()); break;
    case 2: fn(std::integral_constant<int, 2>()); break;
    case 3: fn(std::integral_constant<int, 3>()); break;
    case 4: fn(std::integral_constant<int, 4>()); break;
    case 5: fn(std::integral_constant<int, 5>()); break;
    case 6: fn(std::integral_constant<int, 6>()); break;
    case 7: fn(std::integral_constant<int, 7>()); break;
    case 8: fn(std::integral_constant<int, 8>()); break;
    default: TORCH_CHECK(false, "flocora: bits must be in 1..8, got ", bits);
  }
}

// ---- quantize_pack -------------------------------------------------------------
struct QuantizeTensor {
  Dt dt;
  int64_t numel;
  int64_t group;  // group size as given (>= 1)
  int64_t ngroups;
  int64_t byte_base;   // first byte of this tensor's stream in `packed`
  int64_t group_base;  // first group of this tensor in scales/offsets
};
struct QuantizeLayout {
  std::vector<QuantizeTensor> ts;
  int64_t total_bytes = 0, total_groups = 0;
};

// check_device(x, i) runs first for each tensor.
template <typename CheckDevice>
QuantizeLayout quantize_pack_layout(const char* op, at::TensorList xs, int64_t bits, at::IntArrayRef group_sizes,
                                    at::IntArrayRef seeds, at::ScalarType meta_dtype, const CheckDevice& check_device) {
  check_bits(bits, op);
  TORCH_CHECK(group_sizes.size() == xs.size(), op, ": got ", group_sizes.size(), " group sizes for ", xs.size(),
              " tensors");
  TORCH_CHECK(seeds.size() == xs.size(), op, ": got ", seeds.size(), " seeds for ", xs.size(), " tensors");
  TORCH_CHECK(meta_dtype == at::kFloat || meta_dtype == at::kHalf, op, ": meta_dtype must be float32 or float16, got ",
              meta_dtype);
  QuantizeLayout lay;
  lay.ts.reserve(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    check_device(xs[i], i);
    QuantizeTensor t;
    TORCH_CHECK(float_dt(xs[i].scalar_type(), &t.dt), op, ": unsupported dtype ", xs[i].scalar_type(),
                " (expected float32, float16 or bfloat16)");
    TORCH_CHECK(group_sizes[i] >= 1, op, ": group size of tensor ", i, " must be >= 1, got ", group_sizes[i]);
    t.numel = xs[i].numel();
    t.group = group_sizes[i];
    t.ngroups = num_groups(t.numel, t.group);
    t.byte_base = lay.total_bytes;
    t.group_base = lay.total_groups;
    lay.total_bytes += packed_nbytes(t.numel, (int)bits);
    lay.total_groups += t.ngroups;
    lay.ts.push_back(t);
  }
  return lay;
}

// After the kernels: ValueError, the input cannot be encoded (not a kernel failure).
inline void check_quantize_result(const char* op, bool nonfinite, bool unfit, at::ScalarType meta_dtype) {
  TORCH_CHECK_VALUE(!nonfinite, op, ": input has NaN or Inf values");
  TORCH_CHECK_VALUE(!unfit, op, ": a group's range does not fit the metadata dtype ", meta_dtype,
                    " (float16 holds |values| up to 65504)");
}

// ---- unpack_dequantize ---------------------------------------------------------
struct UnpackTensor {
  int64_t numel;
  int64_t group;
  int64_t byte_base;   // first byte of this tensor's stream in `packed`
  int64_t group_base;  // first group of this tensor in scales/offsets
  int64_t elem_base;   // first element of this tensor in the output
};
struct UnpackLayout {
  std::vector<UnpackTensor> ts;
  int64_t total_bytes = 0, total_groups = 0, total = 0;
  Dt out_dt = kF32;
  bool meta_half = false;
};

// check_devices() runs after the dtype checks.
template <typename CheckDevices>
UnpackLayout unpack_dequantize_layout(const char* op, const at::Tensor& packed, const at::Tensor& scales,
                                      const at::Tensor& offsets, int64_t bits, at::IntArrayRef numels,
                                      at::IntArrayRef group_sizes, at::ScalarType dtype,
                                      const CheckDevices& check_devices) {
  check_bits(bits, op);
  TORCH_CHECK(numels.size() == group_sizes.size(), op, ": got ", numels.size(), " numels and ", group_sizes.size(),
              " group sizes");
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(scales.scalar_type() == offsets.scalar_type() &&
                  (scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf),
              op, ": scales and offsets must both be float32 or both float16, got ", scales.scalar_type(), " and ",
              offsets.scalar_type());
  UnpackLayout lay;
  lay.out_dt = float_dtype(dtype, op, "output dtype");
  lay.meta_half = scales.scalar_type() == at::kHalf;
  check_devices();
  lay.ts.reserve(numels.size());
  for (size_t i = 0; i < numels.size(); ++i) {
    TORCH_CHECK(numels[i] >= 0, op, ": numel of tensor ", i, " is negative (", numels[i], ")");
    TORCH_CHECK(group_sizes[i] >= 1, op, ": group size of tensor ", i, " must be >= 1, got ", group_sizes[i]);
    lay.ts.push_back(UnpackTensor{numels[i], group_sizes[i], lay.total_bytes, lay.total_groups, lay.total});
    lay.total_bytes += packed_nbytes(numels[i], (int)bits);
    lay.total_groups += num_groups(numels[i], group_sizes[i]);
    lay.total += numels[i];
  }
  TORCH_CHECK(packed.numel() == lay.total_bytes, op, ": packed has ", packed.numel(), " bytes, the sizes need ",
              lay.total_bytes);
  TORCH_CHECK(scales.numel() == lay.total_groups && offsets.numel() == lay.total_groups, op, ": expected ",
              lay.total_groups, " scales and offsets, got ", scales.numel(), " and ", offsets.numel());
  return lay;
}

// ---- topk_encode ---------------------------------------------------------------
struct TopkInput {
  std::vector<Dt> dt;
  std::vector<int64_t> numel;
  int64_t total = 0;
};

// check_device(x, i) runs first for each tensor.
template <typename CheckDevice>
TopkInput topk_encode_input(const char* op, at::TensorList xs, at::IntArrayRef ks, bool global_scope,
                            const CheckDevice& check_device) {
  const int64_t nt = (int64_t)xs.size();
  if (global_scope) {
    TORCH_CHECK(ks.size() == 1, op, ": global_scope=True takes ks = [k] (one k over all tensors), got ", ks.size(),
                " values");
  } else {
    TORCH_CHECK((int64_t)ks.size() == nt, op, ": got ", ks.size(), " values of k for ", nt, " tensors");
  }
  TopkInput in;
  in.dt.resize(nt);
  in.numel.resize(nt);
  for (int64_t i = 0; i < nt; ++i) {
    check_device(xs[i], (size_t)i);
    TORCH_CHECK(float_dt(xs[i].scalar_type(), &in.dt[i]), op, ": tensor ", i, " has dtype ", xs[i].scalar_type(),
                " (expected float32, float16 or bfloat16)");
    in.numel[i] = xs[i].numel();
    in.total += in.numel[i];
    if (!global_scope) {
      TORCH_CHECK(ks[i] >= 0 && ks[i] <= in.numel[i], op, ": k of tensor ", i, " must be in [0, numel = ", in.numel[i],
                  "], got ", ks[i]);
    }
  }
  if (global_scope) {
    TORCH_CHECK(ks[0] >= 0 && ks[0] <= in.total, op, ": k must be in [0, total numel = ", in.total, "], got ", ks[0]);
  }
  return in;
}

// Where each tensor's values and index code go, once its count is known.
struct TopkOutput {
  int64_t count;       // elements kept
  int64_t voff;        // first value in `values`
  int64_t ioff;        // first byte in `index_bytes`
  int code;            // kIndexBitmap / kIndexEliasFano
  int low_bits;        // Elias-Fano l
  int64_t low_nbytes;  // Elias-Fano: bytes of the low-bits stream
};

// Fills out[i] from numels[i] and counts[i]; *nvalues, *nbytes: the totals.
inline void topk_output_layout(const std::vector<int64_t>& numels, const std::vector<int64_t>& counts,
                               std::vector<TopkOutput>* out, int64_t* nvalues, int64_t* nbytes) {
  out->resize(numels.size());
  int64_t voff = 0, ioff = 0;
  for (size_t i = 0; i < numels.size(); ++i) {
    const int64_t n = numels[i], k = counts[i];
    (*out)[i] =
        TopkOutput{k, voff, ioff, choose_index_code(n, k), elias_fano_low_bits(n, k), elias_fano_low_nbytes(n, k)};
    voff += k;
    ioff += index_nbytes(n, k);
  }
  *nvalues = voff;
  *nbytes = ioff;
}

inline void check_finite_input(const char* op, bool nonfinite) {
  TORCH_CHECK_VALUE(!nonfinite, op, ": input has NaN or Inf values");
}

// ---- sparse_decode / sparse_decode_add_ ----------------------------------------
// sparse_decode's dtypes; returns the values' dtype.
inline Dt sparse_decode_dtypes(const char* op, at::ScalarType dtype, const at::Tensor& values) {
  decode_out_dtype(dtype, op, "dtype");
  return float_dtype(values.scalar_type(), op, "values");
}

// sparse_decode_add_'s outputs: count, the values' dtype, then per output
// check_device(out, i) and its dtype; no two outputs may overlap in memory
// (an element written twice would race). Returns the values' dtype.
template <typename CheckDevice>
Dt sparse_decode_add_outputs(const char* op, at::TensorList outs, at::IntArrayRef counts, const at::Tensor& values,
                             const CheckDevice& check_device) {
  TORCH_CHECK(outs.size() == counts.size(), op, ": got ", outs.size(), " output tensors and ", counts.size(),
              " counts");
  const Dt vt = float_dtype(values.scalar_type(), op, "values");
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  for (size_t i = 0; i < outs.size(); ++i) {
    check_device(outs[i], i);
    decode_out_dtype(outs[i].scalar_type(), op, "every output");
    if (outs[i].numel() == 0) continue;
    int64_t extent = 1;
    for (int64_t d = 0; d < outs[i].dim(); ++d) extent += (outs[i].size(d) - 1) * outs[i].stride(d);
    uintptr_t p = reinterpret_cast<uintptr_t>(outs[i].data_ptr());
    spans.push_back({p, p + (uintptr_t)(extent * outs[i].element_size())});
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    TORCH_CHECK(spans[i].first >= spans[i - 1].second, op, ": output tensors overlap in memory");
  return vt;
}

struct SparseTensor {
  int64_t n, k;
  int64_t ibase;       // first byte of this tensor's index code in index_bytes
  int64_t vbase;       // first value of this tensor
  int64_t obase;       // first element of this tensor in a flat result
  int code, low_bits;  // kIndexBitmap / kIndexEliasFano; Elias-Fano l
  int64_t low_nbytes;  // Elias-Fano low-bits stream (0 for a bitmap)
  int64_t ubase;       // first byte of the unary stream (bitmap, or Elias-Fano high part)
  int64_t ubits;       // bits of the unary stream that carry data
  int64_t unbytes;     // bytes of the unary stream
};
struct SparseLayout {
  std::vector<SparseTensor> ts;
  int64_t nbytes = 0, nvalues = 0, total_numel = 0;
};

// The sizes of an index code message, checked before any byte is read.
// check_devices() runs after the index dtype check.
template <typename CheckDevices>
SparseLayout sparse_decode_layout(const char* op, const at::Tensor& index_bytes, const at::Tensor& values,
                                  at::IntArrayRef numels, at::IntArrayRef counts, const CheckDevices& check_devices) {
  TORCH_CHECK(numels.size() == counts.size(), op, ": got ", numels.size(), " numels and ", counts.size(), " counts");
  TORCH_CHECK(index_bytes.scalar_type() == at::kByte, op, ": index_bytes must be uint8, got ",
              index_bytes.scalar_type());
  check_devices();
  SparseLayout lay;
  lay.ts.resize(numels.size());
  for (size_t i = 0; i < numels.size(); ++i) {
    TORCH_CHECK(numels[i] >= 0, op, ": numel of tensor ", i, " is negative (", numels[i], ")");
    TORCH_CHECK(counts[i] >= 0 && counts[i] <= numels[i], op, ": count of tensor ", i,
                " must be in [0, numel = ", numels[i], "], got ", counts[i]);
    SparseTensor& t = lay.ts[i];
    t.n = numels[i];
    t.k = counts[i];
    t.ibase = lay.nbytes;
    t.vbase = lay.nvalues;
    t.obase = lay.total_numel;
    t.code = choose_index_code(t.n, t.k);
    t.low_bits = elias_fano_low_bits(t.n, t.k);
    if (t.code == kIndexBitmap) {
      t.low_nbytes = 0;
      t.ubits = t.n;
      t.unbytes = bitmap_nbytes(t.n);
    } else {
      t.low_nbytes = elias_fano_low_nbytes(t.n, t.k);
      t.ubits = t.k ? ((t.n - 1) >> t.low_bits) + t.k : 0;
      t.unbytes = elias_fano_high_nbytes(t.n, t.k);
    }
    t.ubase = t.ibase + t.low_nbytes;
    lay.nbytes += index_nbytes(t.n, t.k);
    lay.nvalues += t.k;
    lay.total_numel += t.n;
  }
  TORCH_CHECK(index_bytes.numel() == lay.nbytes, op, ": index_bytes has ", index_bytes.numel(),
              " bytes, numels and counts need ", lay.nbytes);
  TORCH_CHECK(values.numel() == lay.nvalues, op, ": values has ", values.numel(), " elements, counts need ",
              lay.nvalues);
  return lay;
}

// ValueError: a format violation of the message, not a kernel failure.
[[noreturn]] inline void raise_malformed_index_code(const char* op, int64_t i, const SparseTensor& t, int kind) {
  TORCH_CHECK_VALUE(false, op, ": index code of tensor ", i, " (", t.code == kIndexBitmap ? "bitmap" : "Elias-Fano",
                    ", numel ", t.n, ", count ", t.k, ") is malformed: ", index_code_error_text(kind));
  __builtin_unreachable();
}

}  // namespace flocora
