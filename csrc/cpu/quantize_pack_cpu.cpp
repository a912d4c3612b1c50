// CPU kernel of quantize_pack, and the test hooks _set_cpu_isa and
// _quantize_stochastic_at (schemas: csrc/ops.cpp; argument checks:
// csrc/include/flocora/host_checks.h; loops: quant_loops.h).
//
// Work is cut into tasks of about kQuantChunk elements over *all* tensors of
// the call, then run with one at::parallel_for, so a state dict of many small
// tensors is one dispatch and one parallel region. Groups up to kQuantChunk
// elements are "fused": a task computes the range of its groups and packs
// them while the data is still in L1/L2 (one trip through memory). Larger
// groups (per-tensor, long rows) need their range before any code, so they
// take a range pass and a pack pass.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <utility>
#include <vector>

#include <flocora/affine.h>
#include <flocora/host_checks.h>

#include "huge_pages.h"
#include "quant_loops.h"

namespace flocora {
namespace cpu {

namespace {

constexpr uint64_t kIndexBlock = 1ull << 32;  // the generator's key changes every 2^32 elements

// Returns a pointer to n floats of x starting at element `begin`: x itself for
// float32, else the converted values in buf.
const float* as_float(const void* x, Dt dt, int64_t begin, int64_t n, float* buf, const QuantLoops& L) {
  switch (dt) {
    case kF32: return static_cast<const float*>(x) + begin;
    case kF16: L.half_to_float(static_cast<const uint16_t*>(x) + begin, n, buf); return buf;
    case kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(x) + begin;
      for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_float(s[i]);
      return buf;
    }
    default: break;
  }
  return buf;
}

struct QuantTensor {
  const void* x;
  Dt dt;
  int64_t n;
  int64_t group;
  int64_t ngroups;
  int64_t byte_base;   // first byte of this tensor's stream in `packed`
  int64_t group_base;  // first group of this tensor in scales/offsets
  uint64_t seed;
};

struct QuantTask {
  int32_t tensor;
  bool fused;          // range + pack of whole groups; else a range-only or pack-only piece
  int64_t begin, end;  // element range within the tensor (begin is a multiple of 8 for packing tasks)
};

struct MetaOut {
  bool half;
  float* f32_scale;
  float* f32_offset;
  uint16_t* f16_scale;
  uint16_t* f16_offset;
  void store(int64_t g, float scale, float offset, uint16_t scale_h, uint16_t offset_h) const {
    if (half) {
      f16_scale[g] = scale_h;
      f16_offset[g] = offset_h;
    } else {
      f32_scale[g] = scale;
      f32_offset[g] = offset;
    }
  }
};

// Quantizes x[0..n) (elements begin..begin+n of tensor t, all in one group)
// into codes, splitting at the generator's 2^32-element key blocks.
void quantize_segment(const QuantLoops& L, const QuantTensor& t, const float* x, int64_t begin, int64_t n,
                      const AffineParams& p, float levels, bool stochastic, uint8_t* codes) {
  if (!stochastic) {
    L.quantize_nearest(x, n, p, levels, codes);
    return;
  }
  int64_t done = 0;
  while (done < n) {
    uint64_t index = (uint64_t)(begin + done);
    int64_t block_left = (int64_t)(kIndexBlock - (index & (kIndexBlock - 1)));
    int64_t len = std::min(n - done, block_left);
    L.quantize_stochastic(x + done, len, p, levels, stochastic_key(t.seed, index), (uint32_t)index, codes + done);
    done += len;
  }
}

}  // namespace

namespace {

// The kernel proper, into outputs of the layout's sizes (allocated or checked
// by the caller).
void quantize_pack_run(const char* op, at::TensorList xs, int64_t bits, bool stochastic, at::IntArrayRef seeds,
                       at::ScalarType meta_dtype, const QuantizeLayout& lay, const at::Tensor& packed,
                       const at::Tensor& scales, const at::Tensor& offsets) {
  const bool meta_half = meta_dtype == at::kHalf;
  const float levels = (float)((1 << bits) - 1);

  std::vector<at::Tensor> keep;  // contiguous inputs, alive until the end
  std::vector<QuantTensor> tensors;
  keep.reserve(xs.size());
  tensors.reserve(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    const QuantizeTensor& l = lay.ts[i];
    keep.push_back(xs[i].contiguous());
    QuantTensor t;
    t.x = keep.back().data_ptr();
    t.dt = l.dt;
    t.n = l.numel;
    t.group = l.group;
    t.ngroups = l.ngroups;
    t.byte_base = l.byte_base;
    t.group_base = l.group_base;
    t.seed = (uint64_t)seeds[i];
    tensors.push_back(t);
  }
  uint8_t* out = packed.data_ptr<uint8_t>();
  MetaOut meta{meta_half, nullptr, nullptr, nullptr, nullptr};
  if (meta_half) {
    meta.f16_scale = reinterpret_cast<uint16_t*>(scales.data_ptr());
    meta.f16_offset = reinterpret_cast<uint16_t*>(offsets.data_ptr());
  } else {
    meta.f32_scale = scales.data_ptr<float>();
    meta.f32_offset = offsets.data_ptr<float>();
  }

  // Plan. Fused tasks cover c whole groups with c*G a multiple of 8, so every
  // task starts on a byte boundary of the stream.
  std::vector<QuantTask> phase1, phase2;
  struct Range {
    int32_t tensor;
    int64_t group;
    int64_t first_piece, pieces;
  };
  std::vector<Range> ranges;
  int64_t max_task = 8, max_task_groups = 1;
  bool any_converted = false;  // float16/bfloat16 inputs need a float32 buffer
  for (size_t ti = 0; ti < tensors.size(); ++ti) {
    const QuantTensor& t = tensors[ti];
    if (t.n == 0) continue;
    any_converted |= t.dt != kF32;
    if (t.group <= kQuantChunk) {
      int64_t unit = 8 / std::gcd<int64_t>(t.group, 8);
      int64_t per_task = std::max<int64_t>(unit, (kQuantChunk / t.group) / unit * unit);
      for (int64_t g = 0; g < t.ngroups; g += per_task) {
        int64_t e = std::min(t.n, (g + per_task) * t.group);
        phase1.push_back({(int32_t)ti, true, g * t.group, e});
        max_task = std::max(max_task, e - g * t.group);
        max_task_groups = std::max(max_task_groups, std::min(per_task, t.ngroups - g));
      }
    } else {
      for (int64_t g = 0; g < t.ngroups; ++g) {
        int64_t gb = g * t.group, ge = std::min(t.n, gb + t.group);
        Range r{(int32_t)ti, g, (int64_t)phase1.size(), 0};
        for (int64_t b = gb; b < ge; b += kQuantChunk) {
          phase1.push_back({(int32_t)ti, false, b, std::min(ge, b + kQuantChunk)});
          ++r.pieces;
        }
        ranges.push_back(r);
      }
      for (int64_t b = 0; b < t.n; b += kQuantChunk)
        phase2.push_back({(int32_t)ti, false, b, std::min(t.n, b + kQuantChunk)});
      max_task = std::max(max_task, kQuantChunk);
    }
  }

  const QuantLoops& L = loops();
  // Past the caches the AVX2 one-pass loop reads memory faster than the
  // AVX-512 one (measured on Zen 5, 2 threads, 64 and 256 MiB, runs
  // alternated: input read at 37-42 GB/s against 28-32, at 1, 4 and 8 bits;
  // from the caches it is 35-40% slower).
  int64_t input_bytes = 0;
  for (const QuantTensor& t : tensors) input_bytes += t.n * (t.dt == kF32 ? 4 : 2);
  const auto encode_groups_f32 =
      cpu_isa() == 2 && input_bytes >= kPastCachesBytes ? loops_at(1).encode_groups_f32 : L.encode_groups_f32;
  std::atomic<bool> nonfinite{false}, unfit{false};
  std::vector<float> piece_lo(phase1.size()), piece_hi(phase1.size());

  // Codes of elements [b, e) (xf[0] is element b) into codes[0..e-b), group
  // segment by group segment.
  auto quantize_range = [&](const QuantTensor& t, int64_t b, int64_t e, const float* xf, uint8_t* codes,
                            const AffineParams* params_of_group, int64_t first_group) {
    for (int64_t s = b; s < e;) {
      int64_t g = s / t.group;
      int64_t se = std::min(e, (g + 1) * t.group);
      quantize_segment(L, t, xf + (s - b), s, se - s, params_of_group[g - first_group], levels, stochastic,
                       codes + (s - b));
      s = se;
    }
  };
  auto pack_codes = [&](const QuantTensor& t, int64_t b, int64_t e, const uint8_t* codes) {
    L.pack[bits](codes, e - b, out + t.byte_base + b * bits / 8);
  };
  // The one-pass loop covers the common case; the checked path below does
  // the rest (and any group the loop refuses, so that errors are named alike).
  const bool one_pass = !stochastic && !meta_half && encode_groups_f32 != nullptr;

  at::parallel_for(0, (int64_t)phase1.size(), kTasksPerThreadMin, [&](int64_t lo, int64_t hi) {
    // Scratch of this thread, left uninitialized (every use writes first):
    // zeroing it cost more than encoding a 1 MiB tensor's groups.
    std::unique_ptr<float[]> fbuf(any_converted ? new float[max_task] : nullptr);
    std::unique_ptr<uint8_t[]> codes(new uint8_t[max_task]);
    std::unique_ptr<AffineParams[]> params(new AffineParams[max_task_groups]);
    std::unique_ptr<float[]> lo_buf(new float[max_task_groups]), hi_buf(new float[max_task_groups]);
    std::unique_ptr<uint16_t[]> oh_buf(new uint16_t[max_task_groups]), sh_buf(new uint16_t[max_task_groups]);
    for (int64_t k = lo; k < hi; ++k) {
      const QuantTask& task = phase1[k];
      const QuantTensor& t = tensors[task.tensor];
      const float* xf = as_float(t.x, t.dt, task.begin, task.end - task.begin, fbuf.get(), L);
      if (!task.fused) {
        if (!L.minmax(xf, task.end - task.begin, &piece_lo[k], &piece_hi[k])) nonfinite = true;
        continue;
      }
      // Ranges of all groups of the task, then their parameters in one
      // batch (vectorized across groups: small groups are common, e.g. the
      // 16-element rows of a rank-16 LoRA B), then codes.
      const int64_t len = task.end - task.begin;
      int64_t g0 = task.begin / t.group;
      int64_t done = 0;  // leading groups the one-pass loop encoded
      if (one_pass && t.group % 16 == 0 && len >= t.group) {
        const int64_t whole = len / t.group;
        if (encode_groups_f32(xf, whole, t.group, (int)bits, meta.f32_scale + t.group_base + g0,
                              meta.f32_offset + t.group_base + g0, out + t.byte_base + task.begin * bits / 8))
          done = whole;
      }
      const int64_t rest_begin = task.begin + done * t.group;
      int64_t ng = 0;
      for (int64_t gb = rest_begin; gb < task.end; gb += t.group, ++ng) {
        int64_t ge = std::min(task.end, gb + t.group);
        if (!L.minmax(xf + (gb - task.begin), ge - gb, &lo_buf[ng], &hi_buf[ng])) {
          nonfinite = true;
          lo_buf[ng] = hi_buf[ng] = 0.0f;
        }
      }
      if (!L.params(lo_buf.get(), hi_buf.get(), ng, (int)bits, meta_half, params.get(), oh_buf.get(), sh_buf.get()))
        unfit = true;
      for (int64_t j = 0; j < ng; ++j)
        meta.store(t.group_base + g0 + done + j, params[j].scale, params[j].offset, sh_buf[j], oh_buf[j]);
      quantize_range(t, rest_begin, task.end, xf + (rest_begin - task.begin), codes.get() + (rest_begin - task.begin),
                     params.get(), g0 + done);
      // The one-pass loop packed its groups (a multiple of 16 values: whole bytes).
      pack_codes(t, rest_begin, task.end, codes.get() + (rest_begin - task.begin));
    }
  });

  if (!ranges.empty() && !nonfinite) {
    // Reduce the range pieces of large groups, then pack them.
    std::vector<std::vector<AffineParams>> params(tensors.size());
    for (size_t ti = 0; ti < tensors.size(); ++ti)
      if (tensors[ti].group > kQuantChunk) params[ti].resize(tensors[ti].ngroups);
    for (const Range& r : ranges) {
      float mn = piece_lo[r.first_piece], mx = piece_hi[r.first_piece];
      for (int64_t p = r.first_piece + 1; p < r.first_piece + r.pieces; ++p) {
        mn = piece_lo[p] < mn ? piece_lo[p] : mn;
        mx = piece_hi[p] > mx ? piece_hi[p] : mx;
      }
      uint16_t sh = 0, oh = 0;
      AffineParams& p = params[r.tensor][r.group];
      if (!affine_params(mn, mx, (int)bits, meta_half, &p, &oh, &sh)) {
        unfit = true;
        p = AffineParams{0.0f, 0.0f, 0.0f};
      }
      meta.store(tensors[r.tensor].group_base + r.group, p.scale, p.offset, sh, oh);
    }
    at::parallel_for(0, (int64_t)phase2.size(), kTasksPerThreadMin, [&](int64_t lo, int64_t hi) {
      std::vector<float> fbuf(kQuantChunk);
      std::vector<uint8_t> codes(kQuantChunk);
      for (int64_t k = lo; k < hi; ++k) {
        const QuantTask& task = phase2[k];
        const QuantTensor& t = tensors[task.tensor];
        const float* xf = as_float(t.x, t.dt, task.begin, task.end - task.begin, fbuf.data(), L);
        quantize_range(t, task.begin, task.end, xf, codes.data(), params[task.tensor].data(), 0);
        pack_codes(t, task.begin, task.end, codes.data());
      }
    });
  }
  check_quantize_result(op, nonfinite, unfit, meta_dtype);
}

// Start and end address of the memory a tensor's elements occupy.
std::pair<uintptr_t, uintptr_t> span_of(const at::Tensor& t) {
  int64_t extent = 1;
  for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
  uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {p, p + (uintptr_t)(extent * t.element_size())};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_pack_cpu(at::TensorList xs, int64_t bits,
                                                                 at::IntArrayRef group_sizes, bool stochastic,
                                                                 at::IntArrayRef seeds, at::ScalarType meta_dtype) {
  const char* op = "flocora::quantize_pack";
  const QuantizeLayout lay =
      quantize_pack_layout(op, xs, bits, group_sizes, seeds, meta_dtype, [&](const at::Tensor& x, size_t i) {
        TORCH_CHECK(x.device().is_cpu(), op, ": tensor ", i, " is on ", x.device(),
                    "; all tensors of one call must be on the CPU");
      });
  const auto on_cpu = at::TensorOptions().device(at::kCPU);
  at::Tensor packed = at::empty({lay.total_bytes}, on_cpu.dtype(at::kByte));
  at::Tensor scales = at::empty({lay.total_groups}, on_cpu.dtype(meta_dtype));
  at::Tensor offsets = at::empty({lay.total_groups}, on_cpu.dtype(meta_dtype));
  advise_huge_pages(packed.data_ptr(), (size_t)lay.total_bytes);
  quantize_pack_run(op, xs, bits, stochastic, seeds, meta_dtype, lay, packed, scales, offsets);
  return {packed, scales, offsets};
}

// quantize_pack into caller-owned outputs (meta dtype: the scales'), so a
// caller encoding the same shapes again reuses its buffers instead of
// faulting in fresh pages each call. Every check runs before any write.
void quantize_pack_into_cpu(at::TensorList xs, int64_t bits, at::IntArrayRef group_sizes, bool stochastic,
                            at::IntArrayRef seeds, const at::Tensor& packed, const at::Tensor& scales,
                            const at::Tensor& offsets) {
  const char* op = "flocora::quantize_pack_into_";
  const at::ScalarType meta_dtype = scales.scalar_type();
  const QuantizeLayout lay =
      quantize_pack_layout(op, xs, bits, group_sizes, seeds, meta_dtype, [&](const at::Tensor& x, size_t i) {
        TORCH_CHECK(x.device().is_cpu(), op, ": tensor ", i, " is on ", x.device(), "; this op runs on the CPU");
      });
  auto check_out = [&](const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel) {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), "; this op runs on the CPU");
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
    TORCH_CHECK(t.numel() == numel, op, ": ", name, " has ", t.numel(), " elements, the encoding needs ", numel);
  };
  check_out(packed, "packed", at::kByte, lay.total_bytes);
  check_out(scales, "scales", meta_dtype, lay.total_groups);
  check_out(offsets, "offsets", meta_dtype, lay.total_groups);
  std::vector<std::pair<uintptr_t, uintptr_t>> outs;
  for (const at::Tensor* t : {&packed, &scales, &offsets})
    if (t->numel()) outs.push_back(span_of(*t));
  auto overlaps = [](std::pair<uintptr_t, uintptr_t> a, std::pair<uintptr_t, uintptr_t> b) {
    return a.first < b.second && b.first < a.second;
  };
  for (size_t i = 0; i < outs.size(); ++i)
    for (size_t j = i + 1; j < outs.size(); ++j)
      TORCH_CHECK(!overlaps(outs[i], outs[j]), op, ": packed, scales and offsets overlap in memory");
  for (size_t i = 0; i < xs.size(); ++i) {
    if (xs[i].numel() == 0) continue;
    for (const auto& o : outs)
      TORCH_CHECK(!overlaps(span_of(xs[i]), o), op, ": tensor ", i, " overlaps an output in memory");
  }
  quantize_pack_run(op, xs, bits, stochastic, seeds, meta_dtype, lay, packed, scales, offsets);
}

// Test hook: force the scalar (0), AVX2 (1) or AVX-512 (2) loops, or auto
// (-1). Returns the instruction set now in use: the one asked for, or the
// best below it that this CPU has.
int64_t set_cpu_isa_cpu(int64_t level) {
  TORCH_CHECK(level >= -1 && level <= 2, "flocora::_set_cpu_isa: level must be -1, 0, 1 or 2, got ", level);
  g_isa_override = (int)level;
  return cpu_isa_for((int)level);
}

// Test hook: the stochastic codes (unpacked, one per byte) of x, float32 as
// one group, as if x were elements first_index .. first_index + numel - 1 of a
// tensor quantized with this seed. Reaches the generator's 2^32-element key
// blocks through the kernel's own code path without a 2^32-element tensor.
at::Tensor quantize_stochastic_at_cpu(const at::Tensor& x_in, int64_t bits, int64_t seed, int64_t first_index) {
  const char* op = "flocora::_quantize_stochastic_at";
  check_bits(bits, op);
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat, op, ": x must be a float32 CPU tensor");
  TORCH_CHECK(first_index >= 0, op, ": first_index must be >= 0, got ", first_index);
  at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  at::Tensor codes = at::empty({n}, x.options().dtype(at::kByte));
  if (n == 0) return codes;
  const QuantLoops& L = loops();
  const float* xf = x.data_ptr<float>();
  float lo = 0.0f, hi = 0.0f;
  TORCH_CHECK_VALUE(L.minmax(xf, n, &lo, &hi), op, ": input has NaN or Inf values");
  AffineParams p;
  uint16_t oh = 0, sh = 0;
  TORCH_CHECK_VALUE(affine_params(lo, hi, (int)bits, false, &p, &oh, &sh), op, ": range does not fit float32");
  QuantTensor t{};
  t.seed = (uint64_t)seed;
  quantize_segment(L, t, xf, first_index, n, p, (float)((1 << bits) - 1), true, codes.data_ptr<uint8_t>());
  return codes;
}

}  // namespace cpu
}  // namespace flocora

TORCH_LIBRARY_IMPL(flocora, CPU, m) {
  m.impl("quantize_pack", &flocora::cpu::quantize_pack_cpu);
  m.impl("quantize_pack_into_", &flocora::cpu::quantize_pack_into_cpu);
}

// The test hooks run whatever the arguments' device (one has no tensor to
// dispatch on): the same catch-all kernels an m.def(schema, fn) registers.
TORCH_LIBRARY_IMPL(flocora, CompositeImplicitAutograd, m) {
  m.impl("_set_cpu_isa", &flocora::cpu::set_cpu_isa_cpu);
  m.impl("_quantize_stochastic_at", &flocora::cpu::quantize_stochastic_at_cpu);
}
