// CPU kernels of sparse_decode, sparse_decode_add_ and sparse_decode_into_
// (schemas: csrc/ops.cpp; argument checks and sizes:
// csrc/include/flocora/host_checks.h; index codes: csrc/include/flocora/affine.h;
// bit streams: bitstream.h).
//
// The index codes are untrusted bytes. Every size is checked first; then the
// unary stream (bitmap, or Elias-Fano high part) is cut into pieces of
// kPieceBytes: a pass counts the set bits of each piece (the ranks), a second
// expands every set bit to its index and checks range and order. Errors are
// raised in the order padding, bit count, decoded indices, for the lowest
// failing tensor; only then are the outputs written: by chunks of kOutChunk
// elements, each zeroed (unless adding) and then given its values while it is
// still in cache.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include <flocora/affine.h>
#include <flocora/host_checks.h>

#include "bitstream.h"
#include "topk_common.h"

namespace flocora {
namespace cpu {

namespace {

constexpr int64_t kPieceBytes = 1 << 13;  // unary-stream bytes per task
constexpr int64_t kPosBatch = 512;        // set-bit positions decoded at a time

struct DecPiece {
  int32_t tensor;
  int64_t b0, b1;  // byte range within the tensor's unary stream
  int64_t pop, rank0;
  int64_t first, last;  // first and last decoded index
};

struct DecodePlan {
  SparseLayout lay;
  // tensor-local index of every value (uninitialized: the decode writes each
  // one; zeroing 8 bytes a value cost about 10 us on a 58k-value message)
  std::unique_ptr<int64_t[]> idx;
};

void set_error(std::vector<int>& errs, int32_t t, int e) { __atomic_store_n(&errs[t], e, __ATOMIC_RELAXED); }

// Checks sizes, then decodes and validates every index code (nothing is
// written to any output before all of it passed).
DecodePlan decode_plan(const char* op, const at::Tensor& index_bytes, const at::Tensor& values, at::IntArrayRef numels,
                       at::IntArrayRef counts) {
  DecodePlan plan;
  plan.lay = sparse_decode_layout(op, index_bytes, values, numels, counts, [&]() {
    TORCH_CHECK(index_bytes.device().is_cpu() && values.device().is_cpu(), op,
                ": index_bytes and values must be on the CPU");
  });
  const std::vector<SparseTensor>& ts = plan.lay.ts;
  const int64_t nt = (int64_t)ts.size();

  at::Tensor ib = index_bytes.contiguous();
  const uint8_t* src = ib.data_ptr<uint8_t>();
  std::vector<int> errs(nt, kIdxOk);

  // Padding bits (serial: one or two bytes per tensor).
  for (int64_t i = 0; i < nt; ++i) {
    const SparseTensor& t = ts[i];
    if (t.ubits % 8 && (src[t.ubase + t.unbytes - 1] >> (t.ubits % 8)) != 0) errs[i] = kIdxPadding;
    const int64_t lbits = t.k * t.low_bits;
    if (t.code == kIndexEliasFano && lbits % 8 && (src[t.ibase + t.low_nbytes - 1] >> (lbits % 8)) != 0)
      errs[i] = kIdxLowPadding;
  }
  auto raise_first = [&]() {
    for (int64_t i = 0; i < nt; ++i) {
      if (errs[i] == kIdxOk) continue;
      const SparseTensor& t = ts[i];
      raise_malformed_index_code(op, i, t, errs[i]);
    }
  };
  raise_first();

  std::vector<DecPiece> pieces;
  for (int64_t i = 0; i < nt; ++i) {
    const SparseTensor& t = ts[i];
    for (int64_t b = 0; b < t.unbytes; b += kPieceBytes)
      pieces.push_back(DecPiece{(int32_t)i, b, std::min(t.unbytes, b + kPieceBytes), 0, 0, -1, -1});
  }
  std::vector<int64_t> pcost(pieces.size());
  for (size_t pi = 0; pi < pieces.size(); ++pi) pcost[pi] = 8 * (pieces[pi].b1 - pieces[pi].b0);
  run_balanced(pcost, [&](int64_t lo, int64_t hi) {
    for (int64_t pi = lo; pi < hi; ++pi) {
      DecPiece& p = pieces[pi];
      const uint8_t* s = src + ts[p.tensor].ubase;
      int64_t pop = 0, b = p.b0;
      for (; b + 8 <= p.b1; b += 8) pop += popcount64(load_word8(s + b));
      pop += popcount64(load_word(s + b, p.b1 - b));
      p.pop = pop;
    }
  });
  {
    std::vector<int64_t> seen(nt, 0);
    for (DecPiece& p : pieces) {
      p.rank0 = seen[p.tensor];
      seen[p.tensor] += p.pop;
    }
    for (int64_t i = 0; i < nt; ++i)
      if (seen[i] != ts[i].k) errs[i] = kIdxBitCount;
    raise_first();
  }

  plan.idx.reset(new int64_t[std::max<int64_t>(plan.lay.nvalues, 1)]);
  int64_t* out_idx = plan.idx.get();
  for (size_t pi = 0; pi < pieces.size(); ++pi) pcost[pi] = 8 * (pieces[pi].b1 - pieces[pi].b0) + 4 * pieces[pi].pop;
  run_balanced(pcost, [&](int64_t lo, int64_t hi) {
    int64_t pos[kPosBatch + 128];  // set-bit positions awaiting decode (+ room for whole rounds of 8)
    for (int64_t pi = lo; pi < hi; ++pi) {
      DecPiece& p = pieces[pi];
      const SparseTensor& t = ts[p.tensor];
      const uint8_t* s = src + t.ubase;
      const int low_bits = t.code == kIndexEliasFano ? t.low_bits : -1;  // -1: a bitmap
      const int64_t n = t.n;
      int64_t* dst = out_idx + t.vbase + p.rank0;  // this piece's indices (no other piece writes here)
      FieldReader low(src + t.ibase, t.low_nbytes, p.rank0 * (int64_t)std::max(low_bits, 0));
      int64_t r = p.rank0, prev = -1;
      bool bad_order = false, bad_range = false;
      // The set bits' positions are batched, then decoded into indices and
      // checked in a loop of known length: a loop per 64-bit word ended on
      // each word's own count, a branch the predictor misses (Elias-Fano
      // adapter set: 101-104 -> 90-98 us).
      auto drain = [&](int64_t count) {
        if (low_bits < 0) {
          for (int64_t j = 0; j < count; ++j) {
            const int64_t e = pos[j];
            bad_range |= e >= n;
            bad_order |= e <= prev;
            prev = e;
            dst[j] = e;
          }
        } else {
          FieldReader lows = low;  // a copy: the stores to dst could alias the reader, forcing reloads
          for (int64_t j = 0; j < count; ++j) {
            const int64_t e = ((pos[j] - (r + j)) << low_bits) | (int64_t)lows.get(low_bits);
            bad_range |= e >= n;
            bad_order |= e <= prev;
            prev = e;
            dst[j] = e;
          }
          low = lows;
        }
        if (count && p.first < 0) p.first = dst[0];
        dst += count;
        r += count;
      };
      int64_t npos = 0;
      for (int64_t b = p.b0; b < p.b1; b += 8) {
        const int64_t nb = std::min<int64_t>(8, p.b1 - b);
        uint64_t w = nb == 8 ? load_word8(s + b) : load_word(s + b, nb);
        const int cnt = popcount64(w);
        const int64_t base = b * 8;
        // Rounds of 8 positions (those past cnt are overwritten later): the
        // loop ends on a count, not on each bit.
        int64_t* d = pos + npos;
        for (int i = 0; i < cnt; i += 8, d += 8)
          for (int k = 0; k < 8; ++k) {
            d[k] = base + __builtin_ctzll(w | (1ull << 63));  // (the OR: defined for w == 0; 63 is never read)
            w &= w - 1;
          }
        npos += cnt;
        if (npos >= kPosBatch) {
          drain(npos);
          npos = 0;
        }
      }
      drain(npos);
      p.last = prev;
      if (bad_range)
        set_error(errs, p.tensor, kIdxOutOfRange);
      else if (bad_order)
        set_error(errs, p.tensor, kIdxNotIncreasing);
    }
  });
  // Order across piece boundaries.
  {
    std::vector<int64_t> last(nt, -1);
    for (const DecPiece& p : pieces) {
      if (p.pop == 0) continue;
      if (p.first <= last[p.tensor] && errs[p.tensor] == kIdxOk) errs[p.tensor] = kIdxNotIncreasing;
      last[p.tensor] = p.last;
    }
    raise_first();
  }
  return plan;
}

template <Dt VT>
FLOCORA_INLINE float value_at(const void* v, int64_t i) {
  if constexpr (VT == kF32) return static_cast<const float*>(v)[i];
  if constexpr (VT == kF16) return bits_float(half_as_float_bits(static_cast<const uint16_t*>(v)[i]));
  return bf16_to_float(static_cast<const uint16_t*>(v)[i]);
}

// out[idx[j]] = v[j] (or +=, computed in float32, float64 for float64 outputs,
// then rounded to nearest even once), for j in [a, b).
template <bool Add, Dt VT>
void scatter_values(void* out, at::ScalarType st, const int64_t* idx, const void* v, int64_t a, int64_t b) {
  switch (st) {
    case at::kFloat: {
      float* o = static_cast<float*>(out);
      for (int64_t j = a; j < b; ++j) {
        float x = value_at<VT>(v, j);
        o[idx[j]] = Add ? add_rn(o[idx[j]], x) : x;
      }
      break;
    }
    case at::kDouble: {
      double* o = static_cast<double*>(out);
      for (int64_t j = a; j < b; ++j) {
        double x = (double)value_at<VT>(v, j);
        o[idx[j]] = Add ? o[idx[j]] + x : x;
      }
      break;
    }
    case at::kHalf: {
      uint16_t* o = static_cast<uint16_t*>(out);
      for (int64_t j = a; j < b; ++j) {
        float x = value_at<VT>(v, j);
        o[idx[j]] = float_to_half_rn(Add ? add_rn(half_to_float(o[idx[j]]), x) : x);
      }
      break;
    }
    default: {
      uint16_t* o = static_cast<uint16_t*>(out);
      for (int64_t j = a; j < b; ++j) {
        float x = value_at<VT>(v, j);
        o[idx[j]] = float_to_bf16_rn(Add ? add_rn(bf16_to_float(o[idx[j]]), x) : x);
      }
      break;
    }
  }
}

template <bool Add>
void scatter(void* out, at::ScalarType st, const int64_t* idx, const void* v, Dt vt, int64_t a, int64_t b) {
  switch (vt) {
    case kF32: return scatter_values<Add, kF32>(out, st, idx, v, a, b);
    case kF16: return scatter_values<Add, kF16>(out, st, idx, v, a, b);
    default: return scatter_values<Add, kBF16>(out, st, idx, v, a, b);
  }
}

// A task of the write phase: output elements [o0, o1) of one tensor and the
// values [a, b) that land there. Assigning, a task zeroes its range (still in
// cache when its values are scattered into it), so every output element is
// written by exactly one task and the outputs need no zeroing pass of their
// own; adding, a task touches only its values.
struct ScatterTask {
  int32_t tensor;
  int64_t o0, o1;
  int64_t a, b;
};

constexpr int64_t kOutChunk = 1 << 14;  // output elements per task (64 KiB of float32: within L2)

std::vector<ScatterTask> scatter_tasks(const DecodePlan& plan) {
  std::vector<ScatterTask> tasks;
  const int64_t* idx = plan.idx.get();
  for (size_t i = 0; i < plan.lay.ts.size(); ++i) {
    const SparseTensor& t = plan.lay.ts[i];
    const int64_t* first = idx + t.vbase;  // this tensor's indices, increasing (validated)
    int64_t a = t.vbase;
    for (int64_t o0 = 0; o0 < t.n; o0 += kOutChunk) {
      const int64_t o1 = std::min(t.n, o0 + kOutChunk);
      const int64_t b = o1 == t.n ? t.vbase + t.k : (std::lower_bound(first + (a - t.vbase), first + t.k, o1) - idx);
      tasks.push_back({(int32_t)i, o0, o1, a, b});
      a = b;
    }
  }
  return tasks;
}

std::vector<int64_t> scatter_cost(const std::vector<ScatterTask>& tasks, bool accumulate) {
  std::vector<int64_t> cost(tasks.size());
  // A scattered value costs about as much as zeroing 8 elements.
  for (size_t i = 0; i < tasks.size(); ++i)
    cost[i] = 8 * (tasks[i].b - tasks[i].a) + (accumulate ? 0 : tasks[i].o1 - tasks[i].o0);
  return cost;
}

// The write phase: tensor i's output starts at ptr_of(i), of dtype type_of(i).
template <typename PtrOf, typename TypeOf>
void write_values(const DecodePlan& plan, const void* v, Dt vt, bool accumulate, const PtrOf& ptr_of,
                  const TypeOf& type_of) {
  const std::vector<ScatterTask> tasks = scatter_tasks(plan);
  const int64_t* idx = plan.idx.get();
  run_balanced(scatter_cost(tasks, accumulate), [&](int64_t lo, int64_t hi) {
    for (int64_t ti = lo; ti < hi; ++ti) {
      const ScatterTask& t = tasks[ti];
      char* out = static_cast<char*>(ptr_of(t.tensor));
      const at::ScalarType st = type_of(t.tensor);
      if (accumulate) {
        scatter<true>(out, st, idx, v, vt, t.a, t.b);
      } else {
        const int64_t es = (int64_t)c10::elementSize(st);
        std::memset(out + es * t.o0, 0, es * (t.o1 - t.o0));  // +0.0 in every float dtype
        scatter<false>(out, st, idx, v, vt, t.a, t.b);
      }
    }
  });
}

}  // namespace

at::Tensor sparse_decode_cpu(const at::Tensor& index_bytes, const at::Tensor& values_in, at::IntArrayRef numels,
                             at::IntArrayRef counts, at::ScalarType dtype) {
  const char* op = "flocora::sparse_decode";
  const Dt vt = sparse_decode_dtypes(op, dtype, values_in);
  DecodePlan plan = decode_plan(op, index_bytes, values_in, numels, counts);
  at::Tensor values = values_in.contiguous();
  at::Tensor out = at::empty({plan.lay.total_numel}, at::TensorOptions().dtype(dtype));  // every element written below
  char* base = static_cast<char*>(out.data_ptr());
  const int64_t es = out.element_size();
  write_values(
      plan, values.data_ptr(), vt, false, [&](int32_t i) { return base + es * plan.lay.ts[i].obase; },
      [&](int32_t) { return dtype; });
  return out;
}

namespace {

// Validates every index code, then (only then) writes the outputs: zeros and
// the values (assign), or the values added.
void sparse_decode_outs(const char* op, at::TensorList outs, const at::Tensor& index_bytes, const at::Tensor& values_in,
                        at::IntArrayRef counts, bool accumulate) {
  const Dt vt = sparse_decode_add_outputs(op, outs, counts, values_in, [&](const at::Tensor& out, size_t i) {
    TORCH_CHECK(out.device().is_cpu(), op, ": output ", i, " is on ", out.device(), "; all tensors must be on the CPU");
  });
  std::vector<int64_t> numels(outs.size());
  for (size_t i = 0; i < outs.size(); ++i) numels[i] = outs[i].numel();

  DecodePlan plan = decode_plan(op, index_bytes, values_in, numels, counts);
  at::Tensor values = values_in.contiguous();
  // Non-contiguous outputs are updated through a contiguous copy.
  std::vector<at::Tensor> work(outs.size());
  for (size_t i = 0; i < outs.size(); ++i) {
    if (outs[i].is_contiguous())
      work[i] = outs[i];
    else
      work[i] = accumulate ? outs[i].contiguous() : at::empty_like(outs[i], at::MemoryFormat::Contiguous);
  }
  std::vector<void*> ptr(outs.size());
  for (size_t i = 0; i < outs.size(); ++i) ptr[i] = numels[i] ? work[i].data_ptr() : nullptr;
  write_values(
      plan, values.data_ptr(), vt, accumulate, [&](int32_t i) { return ptr[i]; },
      [&](int32_t i) { return work[i].scalar_type(); });
  for (size_t i = 0; i < outs.size(); ++i)
    if (!outs[i].is_contiguous()) outs[i].copy_(work[i]);
}

}  // namespace

void sparse_decode_add__cpu(at::TensorList outs, const at::Tensor& index_bytes, const at::Tensor& values_in,
                            at::IntArrayRef counts) {
  sparse_decode_outs("flocora::sparse_decode_add_", outs, index_bytes, values_in, counts, true);
}

void sparse_decode_into__cpu(at::TensorList outs, const at::Tensor& index_bytes, const at::Tensor& values_in,
                             at::IntArrayRef counts, bool accumulate) {
  sparse_decode_outs("flocora::sparse_decode_into_", outs, index_bytes, values_in, counts, accumulate);
}

}  // namespace cpu
}  // namespace flocora

TORCH_LIBRARY_IMPL(flocora, CPU, m) {
  m.impl("sparse_decode", &flocora::cpu::sparse_decode_cpu);
  m.impl("sparse_decode_add_", &flocora::cpu::sparse_decode_add__cpu);
  m.impl("sparse_decode_into_", &flocora::cpu::sparse_decode_into__cpu);
}
