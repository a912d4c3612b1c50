// The decoder's check of a message's affine metadata (FORMAT.md 3.2), and the
// encoder's refusal of groups a decoder would reject, in one pass over the
// groups: flocora::_affine_meta_check. codec.affine_meta_violation maps the
// code it returns to the reason; its numpy formulation (the reference
// backend's) defines the checks and their order. As numpy ops they cost
// about a dozen calls of 1-3 us each on a ResNet-18 adapter message's 10k
// groups, on every encode and decode.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "quant_loops.h"

namespace flocora {
namespace cpu {

namespace {

// The checks, in order (codec.affine_meta_violation's numbering): 1 a scale
// or offset is NaN or infinite; 2 a scale's sign bit is set (-0.0 too); 3 an
// offset is -0.0; 4 a float32 scale is subnormal; 5 offset + scale * levels
// is not finite in float32; 6 that top value or the offset is not finite in
// the output dtype.

inline uint32_t bits_of(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}

// Which checks some group of [0, n) breaks, as bit c - 1 for check c. Bit
// tests and compares without branches, so that the loop vectorizes (its
// first form, with std::isfinite and c10::Half conversions, took 1.5 ns a
// group, 6.5 with a float16 output: no faster than the numpy it replaced).
// out_kind: 0 float32 (or wider), 1 float16, 2 bfloat16.
uint32_t violations(const float* scales, const float* offsets, int64_t n, float levels, bool f32_meta, int out_kind) {
  constexpr uint32_t kExp = 0x7f800000u, kMag = 0x7fffffffu;
  // Round to nearest even overflows float16 from 65520 up (half way past
  // 65504, its largest finite value) and bfloat16 from the bits 0x7f7f8000 up.
  constexpr float kHalfInfFrom = 65520.0f;
  constexpr uint32_t kBf16InfFrom = 0x7f7f8000u;
  uint32_t non_finite = 0, negative = 0, neg_zero = 0, subnormal = 0, top_inf = 0, beyond = 0;
  for (int64_t g = 0; g < n; ++g) {
    const float s = scales[g], o = offsets[g];
    const uint32_t sb = bits_of(s), ob = bits_of(o);
    non_finite |= ((sb & kExp) == kExp) | ((ob & kExp) == kExp);
    negative |= sb >> 31;
    neg_zero |= ob == 0x80000000u;
    subnormal |= ((sb & kExp) == 0) & ((sb & 0x007fffffu) != 0);
    const float top = o + s * levels;  // two roundings, as the kernels decode (no FMA: -ffp-contract=off)
    const uint32_t tb = bits_of(top);
    top_inf |= (tb & kExp) == kExp;
    if (out_kind == 1) beyond |= (std::fabs(top) >= kHalfInfFrom) | (std::fabs(o) >= kHalfInfFrom);
    if (out_kind == 2) beyond |= ((tb & kMag) >= kBf16InfFrom) | ((ob & kMag) >= kBf16InfFrom);
  }
  // A group that breaks an earlier check may also trip a later one (a NaN
  // scale's top); only the lowest check counts.
  return (non_finite ? 1u : 0u) | (negative ? 2u : 0u) | (neg_zero ? 4u : 0u) | (f32_meta && subnormal ? 8u : 0u) |
         (top_inf ? 16u : 0u) | (beyond ? 32u : 0u);
}

// 0 if every group could come from an encoder, else the lowest-numbered
// check that some group breaks (each check is over all groups, in order, as
// the numpy formulation runs them).
int64_t affine_meta_check_cpu(const at::Tensor& scales, const at::Tensor& offsets, int64_t bits,
                              at::ScalarType out_dtype) {
  const char* op = "flocora::_affine_meta_check";
  TORCH_CHECK(scales.device().is_cpu() && offsets.device().is_cpu(), op, ": scales and offsets must be CPU tensors");
  TORCH_CHECK(scales.scalar_type() == offsets.scalar_type() &&
                  (scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf),
              op, ": scales and offsets must both be float32 or both float16; got ", scales.scalar_type(), " and ",
              offsets.scalar_type());
  TORCH_CHECK(scales.dim() == 1 && offsets.dim() == 1 && scales.numel() == offsets.numel() && scales.is_contiguous() &&
                  offsets.is_contiguous(),
              op, ": scales and offsets must be contiguous 1-D tensors of one length");
  TORCH_CHECK(bits >= 1 && bits <= 8, op, ": bits must be in 1..8, got ", bits);
  const int64_t n = scales.numel();
  const float levels = static_cast<float>((1 << bits) - 1);
  const bool f32_meta = scales.scalar_type() == at::kFloat;
  const int out_kind = out_dtype == at::kHalf ? 1 : out_dtype == at::kBFloat16 ? 2 : 0;
  std::atomic<uint32_t> found{0};
  at::parallel_for(0, n, 1 << 16, [&](int64_t lo, int64_t hi) {
    uint32_t f = 0;
    if (f32_meta) {
      f = violations(scales.data_ptr<float>() + lo, offsets.data_ptr<float>() + lo, hi - lo, levels, true, out_kind);
    } else {  // float16 metadata: to float32 (exactly) a piece at a time
      constexpr int64_t kPiece = 4096;
      float sf[kPiece], of[kPiece];
      const auto* sh = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
      const auto* oh = reinterpret_cast<const uint16_t*>(offsets.data_ptr<at::Half>());
      const QuantLoops& L = loops();
      for (int64_t b = lo; b < hi; b += kPiece) {
        const int64_t m = std::min(kPiece, hi - b);
        L.half_to_float(sh + b, m, sf);
        L.half_to_float(oh + b, m, of);
        f |= violations(sf, of, m, levels, false, out_kind);
      }
    }
    if (f) found.fetch_or(f, std::memory_order_relaxed);
  });
  const uint32_t f = found.load();
  return f ? (int64_t)__builtin_ctz(f) + 1 : 0;
}

}  // namespace

}  // namespace cpu
}  // namespace flocora

TORCH_LIBRARY_IMPL(flocora, CPU, m) { m.impl("_affine_meta_check", &flocora::cpu::affine_meta_check_cpu); }
