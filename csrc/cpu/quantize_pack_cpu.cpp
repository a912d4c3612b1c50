// CPU kernels of quantize_pack and unpack_dequantize (schemas: csrc/ops.cpp).
//
// Work is cut into tasks of about kChunk elements over *all* tensors of the
// call, then run with one at::parallel_for, so a state dict of many small
// tensors is one dispatch and one parallel region. Groups up to kChunk
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
#include <numeric>
#include <vector>

#include <flocora/affine.h>

#include "huge_pages.h"
#include "quant_loops.h"

namespace flocora {
namespace cpu {

namespace {

constexpr int64_t kChunk = 16384;
// A task is ~10 us of work; waking a second thread for fewer tasks than this
// costs more than it saves (much more when the cores are busy with training).
constexpr int64_t kTasksPerThreadMin = 4;
constexpr uint64_t kIndexBlock = 1ull << 32;  // the generator's key changes every 2^32 elements

// ---- instruction-set dispatch ----------------------------------------------------
// -1: pick the best this CPU supports; 0: scalar; 1: AVX2. Tests force both.
std::atomic<int> g_isa_override{-1};

bool cpu_has_avx2() {
#if defined(FLOCORA_X86) && defined(__GNUC__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

const QuantLoops& loops() {
  static const QuantLoops scalar_loops = scalar::loops();
#if defined(FLOCORA_X86) && defined(__GNUC__)
  static const QuantLoops avx2_loops = avx2::loops();
  int isa = g_isa_override.load(std::memory_order_relaxed);
  if (isa != 0 && cpu_has_avx2()) return avx2_loops;
#endif
  return scalar_loops;
}

enum class Dt { F32, F16, BF16 };

Dt float_kind(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dt::F32;
    case at::kHalf: return Dt::F16;
    case at::kBFloat16: return Dt::BF16;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type(), " (expected float32, float16 or bfloat16)");
  }
}

// Returns a pointer to n floats of x starting at element `begin`: x itself for
// float32, else the converted values in buf.
const float* as_float(const void* x, Dt dt, int64_t begin, int64_t n, float* buf, const QuantLoops& L) {
  switch (dt) {
    case Dt::F32: return static_cast<const float*>(x) + begin;
    case Dt::F16: L.half_to_float(static_cast<const uint16_t*>(x) + begin, n, buf); return buf;
    case Dt::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(x) + begin;
      for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_float(s[i]);
      return buf;
    }
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
  bool fused;        // range + pack of whole groups; else a range-only or pack-only piece
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_pack_cpu(at::TensorList xs, int64_t bits,
                                                                 at::IntArrayRef group_sizes, bool stochastic,
                                                                 at::IntArrayRef seeds, at::ScalarType meta_dtype) {
  const char* op = "flocora::quantize_pack";
  TORCH_CHECK(bits >= 1 && bits <= 8, op, ": bits must be in 1..8, got ", bits);
  TORCH_CHECK(group_sizes.size() == xs.size(), op, ": got ", group_sizes.size(), " group sizes for ", xs.size(),
              " tensors");
  TORCH_CHECK(seeds.size() == xs.size(), op, ": got ", seeds.size(), " seeds for ", xs.size(), " tensors");
  TORCH_CHECK(meta_dtype == at::kFloat || meta_dtype == at::kHalf, op,
              ": meta_dtype must be float32 or float16, got ", meta_dtype);
  const bool meta_half = meta_dtype == at::kHalf;
  const float levels = (float)((1 << bits) - 1);

  std::vector<at::Tensor> keep;  // contiguous inputs, alive until the end
  std::vector<QuantTensor> tensors;
  keep.reserve(xs.size());
  tensors.reserve(xs.size());
  int64_t total_bytes = 0, total_groups = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    TORCH_CHECK(xs[i].device().is_cpu(), op, ": tensor ", i, " is on ", xs[i].device(),
                "; all tensors of one call must be on the CPU");
    Dt dt = float_kind(xs[i], op);
    TORCH_CHECK(group_sizes[i] >= 1, op, ": group size of tensor ", i, " must be >= 1, got ", group_sizes[i]);
    keep.push_back(xs[i].contiguous());
    QuantTensor t;
    t.x = keep.back().data_ptr();
    t.dt = dt;
    t.n = keep.back().numel();
    t.group = group_sizes[i];
    t.ngroups = num_groups(t.n, t.group);
    t.byte_base = total_bytes;
    t.group_base = total_groups;
    t.seed = (uint64_t)seeds[i];
    total_bytes += packed_nbytes(t.n, (int)bits);
    total_groups += t.ngroups;
    tensors.push_back(t);
  }

  auto device = xs.empty() ? at::Device(at::kCPU) : xs[0].device();
  at::Tensor packed = at::empty({total_bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  at::Tensor scales = at::empty({total_groups}, at::TensorOptions().dtype(meta_dtype).device(device));
  at::Tensor offsets = at::empty({total_groups}, at::TensorOptions().dtype(meta_dtype).device(device));
  uint8_t* out = packed.data_ptr<uint8_t>();
  advise_huge_pages(out, (size_t)total_bytes);
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
  struct Range { int32_t tensor; int64_t group; int64_t first_piece, pieces; };
  std::vector<Range> ranges;
  int64_t max_task = 8;
  for (size_t ti = 0; ti < tensors.size(); ++ti) {
    const QuantTensor& t = tensors[ti];
    if (t.n == 0) continue;
    if (t.group <= kChunk) {
      int64_t unit = 8 / std::gcd<int64_t>(t.group, 8);
      int64_t per_task = std::max<int64_t>(unit, (kChunk / t.group) / unit * unit);
      for (int64_t g = 0; g < t.ngroups; g += per_task) {
        int64_t e = std::min(t.n, (g + per_task) * t.group);
        phase1.push_back({(int32_t)ti, true, g * t.group, e});
        max_task = std::max(max_task, e - g * t.group);
      }
    } else {
      for (int64_t g = 0; g < t.ngroups; ++g) {
        int64_t gb = g * t.group, ge = std::min(t.n, gb + t.group);
        Range r{(int32_t)ti, g, (int64_t)phase1.size(), 0};
        for (int64_t b = gb; b < ge; b += kChunk) {
          phase1.push_back({(int32_t)ti, false, b, std::min(ge, b + kChunk)});
          ++r.pieces;
        }
        ranges.push_back(r);
      }
      for (int64_t b = 0; b < t.n; b += kChunk) phase2.push_back({(int32_t)ti, false, b, std::min(t.n, b + kChunk)});
      max_task = std::max(max_task, kChunk);
    }
  }

  const QuantLoops& L = loops();
  std::atomic<bool> nonfinite{false}, unfit{false};
  std::vector<float> piece_lo(phase1.size()), piece_hi(phase1.size());

  auto pack_range = [&](const QuantTensor& t, int64_t b, int64_t e, const float* xf, uint8_t* codes,
                        const AffineParams* params_of_group, int64_t first_group) {
    // Quantize [b, e) group segment by group segment, then pack the codes.
    for (int64_t s = b; s < e;) {
      int64_t g = s / t.group;
      int64_t se = std::min(e, (g + 1) * t.group);
      quantize_segment(L, t, xf + (s - b), s, se - s, params_of_group[g - first_group], levels, stochastic,
                       codes + (s - b));
      s = se;
    }
    L.pack[bits](codes, e - b, out + t.byte_base + b * bits / 8);
  };

  at::parallel_for(0, (int64_t)phase1.size(), kTasksPerThreadMin, [&](int64_t lo, int64_t hi) {
    std::vector<float> fbuf(max_task);
    std::vector<uint8_t> codes(max_task);
    std::vector<AffineParams> params(max_task);
    std::vector<float> lo_buf(max_task), hi_buf(max_task);
    std::vector<uint16_t> oh_buf(max_task), sh_buf(max_task);
    for (int64_t k = lo; k < hi; ++k) {
      const QuantTask& task = phase1[k];
      const QuantTensor& t = tensors[task.tensor];
      const float* xf = as_float(t.x, t.dt, task.begin, task.end - task.begin, fbuf.data(), L);
      if (!task.fused) {
        if (!L.minmax(xf, task.end - task.begin, &piece_lo[k], &piece_hi[k])) nonfinite = true;
        continue;
      }
      // Ranges of all groups of the task, then their parameters in one
      // batch (vectorized across groups: small groups are common, e.g. the
      // 16-element rows of a rank-16 LoRA B), then codes.
      int64_t g0 = task.begin / t.group;
      int64_t ng = 0;
      for (int64_t gb = task.begin; gb < task.end; gb += t.group, ++ng) {
        int64_t ge = std::min(task.end, gb + t.group);
        if (!L.minmax(xf + (gb - task.begin), ge - gb, &lo_buf[ng], &hi_buf[ng])) {
          nonfinite = true;
          lo_buf[ng] = hi_buf[ng] = 0.0f;
        }
      }
      if (!L.params(lo_buf.data(), hi_buf.data(), ng, (int)bits, meta_half, params.data(), oh_buf.data(),
                    sh_buf.data()))
        unfit = true;
      for (int64_t j = 0; j < ng; ++j)
        meta.store(t.group_base + g0 + j, params[j].scale, params[j].offset, sh_buf[j], oh_buf[j]);
      pack_range(t, task.begin, task.end, xf, codes.data(), params.data(), g0);
    }
  });

  if (!ranges.empty() && !nonfinite) {
    // Reduce the range pieces of large groups, then pack them.
    std::vector<std::vector<AffineParams>> params(tensors.size());
    for (size_t ti = 0; ti < tensors.size(); ++ti)
      if (tensors[ti].group > kChunk) params[ti].resize(tensors[ti].ngroups);
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
      std::vector<float> fbuf(kChunk);
      std::vector<uint8_t> codes(kChunk);
      for (int64_t k = lo; k < hi; ++k) {
        const QuantTask& task = phase2[k];
        const QuantTensor& t = tensors[task.tensor];
        const float* xf = as_float(t.x, t.dt, task.begin, task.end - task.begin, fbuf.data(), L);
        pack_range(t, task.begin, task.end, xf, codes.data(), params[task.tensor].data(), 0);
      }
    });
  }
  // ValueError: the input cannot be encoded (not a kernel failure).
  TORCH_CHECK_VALUE(!nonfinite, op, ": input has NaN or Inf values");
  TORCH_CHECK_VALUE(!unfit, op, ": a group's range does not fit the metadata dtype ", meta_dtype,
              " (float16 holds |values| up to 65504)");
  return {packed, scales, offsets};
}

at::Tensor unpack_dequantize_cpu(const at::Tensor& packed_in, const at::Tensor& scales_in,
                                 const at::Tensor& offsets_in, int64_t bits, at::IntArrayRef numels,
                                 at::IntArrayRef group_sizes, at::ScalarType dtype) {
  const char* op = "flocora::unpack_dequantize";
  TORCH_CHECK(bits >= 1 && bits <= 8, op, ": bits must be in 1..8, got ", bits);
  TORCH_CHECK(numels.size() == group_sizes.size(), op, ": got ", numels.size(), " numels and ",
              group_sizes.size(), " group sizes");
  TORCH_CHECK(packed_in.scalar_type() == at::kByte, op, ": packed must be uint8, got ", packed_in.scalar_type());
  TORCH_CHECK(scales_in.scalar_type() == offsets_in.scalar_type() &&
                  (scales_in.scalar_type() == at::kFloat || scales_in.scalar_type() == at::kHalf),
              op, ": scales and offsets must both be float32 or both float16, got ", scales_in.scalar_type(),
              " and ", offsets_in.scalar_type());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": output dtype must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(packed_in.device().is_cpu() && scales_in.device().is_cpu() && offsets_in.device().is_cpu(), op,
              ": all tensors must be on the CPU");
  int64_t total_bytes = 0, total_groups = 0, total = 0;
  for (size_t i = 0; i < numels.size(); ++i) {
    TORCH_CHECK(numels[i] >= 0, op, ": numel of tensor ", i, " is negative (", numels[i], ")");
    TORCH_CHECK(group_sizes[i] >= 1, op, ": group size of tensor ", i, " must be >= 1, got ", group_sizes[i]);
    total_bytes += packed_nbytes(numels[i], (int)bits);
    total_groups += num_groups(numels[i], group_sizes[i]);
    total += numels[i];
  }
  TORCH_CHECK(packed_in.numel() == total_bytes, op, ": packed has ", packed_in.numel(), " bytes, the sizes need ",
              total_bytes);
  TORCH_CHECK(scales_in.numel() == total_groups && offsets_in.numel() == total_groups, op, ": expected ",
              total_groups, " scales and offsets, got ", scales_in.numel(), " and ", offsets_in.numel());

  at::Tensor packed = packed_in.contiguous(), scales = scales_in.contiguous(), offsets = offsets_in.contiguous();
  at::Tensor result = at::empty({total}, at::TensorOptions().dtype(dtype).device(packed.device()));
  advise_huge_pages(result.data_ptr(), (size_t)result.nbytes());
  const bool meta_half = scales.scalar_type() == at::kHalf;
  const uint8_t* src = packed.data_ptr<uint8_t>();
  const void* sc = scales.data_ptr();
  const void* of = offsets.data_ptr();
  auto meta_at = [&](const void* base, int64_t g) {
    return meta_half ? flocora::half_to_float(static_cast<const uint16_t*>(base)[g]) : static_cast<const float*>(base)[g];
  };

  struct Piece { int32_t tensor; int64_t begin, end, elem_base, byte_base, group_base; };
  std::vector<Piece> pieces;
  int64_t elem_base = 0, byte_base = 0, group_base = 0;
  for (size_t i = 0; i < numels.size(); ++i) {
    for (int64_t b = 0; b < numels[i]; b += kChunk)
      pieces.push_back({(int32_t)i, b, std::min(numels[i], b + kChunk), elem_base, byte_base, group_base});
    elem_base += numels[i];
    byte_base += packed_nbytes(numels[i], (int)bits);
    group_base += num_groups(numels[i], group_sizes[i]);
  }
  const QuantLoops& L = loops();
  char* dst_base = static_cast<char*>(result.data_ptr());
  const int64_t out_size = result.element_size();
  at::parallel_for(0, (int64_t)pieces.size(), kTasksPerThreadMin, [&](int64_t lo, int64_t hi) {
    std::vector<uint8_t> codes(kChunk);
    std::vector<float> fbuf(dtype == at::kFloat ? 0 : kChunk);
    for (int64_t k = lo; k < hi; ++k) {
      const Piece& pc = pieces[k];
      const int64_t G = group_sizes[pc.tensor], n = pc.end - pc.begin;
      L.unpack[bits](src + pc.byte_base + pc.begin * bits / 8, n, codes.data());
      float* outf = dtype == at::kFloat
                        ? reinterpret_cast<float*>(dst_base) + pc.elem_base + pc.begin
                        : fbuf.data();
      for (int64_t s = pc.begin; s < pc.end;) {
        int64_t g = s / G, se = std::min(pc.end, (g + 1) * G);
        L.dequantize(codes.data() + (s - pc.begin), se - s, meta_at(of, pc.group_base + g),
                     meta_at(sc, pc.group_base + g), outf + (s - pc.begin));
        s = se;
      }
      if (dtype == at::kHalf) {
        L.float_to_half(outf, n, reinterpret_cast<uint16_t*>(dst_base + out_size * (pc.elem_base + pc.begin)));
      } else if (dtype == at::kBFloat16) {
        uint16_t* d = reinterpret_cast<uint16_t*>(dst_base + out_size * (pc.elem_base + pc.begin));
        for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16_rn(outf[i]);
      }
    }
  });
  return result;
}

// Test hook: force the scalar (0) or AVX2 (1) loops, or auto (-1). Returns
// the instruction set now in use (0 or 1).
int64_t set_cpu_isa_cpu(int64_t level) {
  TORCH_CHECK(level >= -1 && level <= 1, "flocora::_set_cpu_isa: level must be -1, 0 or 1, got ", level);
  g_isa_override = (int)level;
  return (level != 0 && cpu_has_avx2()) ? 1 : 0;
}

// Test hook: the stochastic codes (unpacked, one per byte) of x, float32 as
// one group, as if x were elements first_index .. first_index + numel - 1 of a
// tensor quantized with this seed. Reaches the generator's 2^32-element key
// blocks through the kernel's own code path without a 2^32-element tensor.
at::Tensor quantize_stochastic_at_cpu(const at::Tensor& x_in, int64_t bits, int64_t seed, int64_t first_index) {
  const char* op = "flocora::_quantize_stochastic_at";
  TORCH_CHECK(bits >= 1 && bits <= 8, op, ": bits must be in 1..8, got ", bits);
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
  m.impl("unpack_dequantize", &flocora::cpu::unpack_dequantize_cpu);
}

TORCH_LIBRARY_FRAGMENT(flocora, m) {
  m.def("_set_cpu_isa(int level) -> int", &flocora::cpu::set_cpu_isa_cpu);
  m.def("_quantize_stochastic_at(Tensor x, int bits, int seed, int first_index) -> Tensor",
        &flocora::cpu::quantize_stochastic_at_cpu);
}
