// The decoder's check of a message's affine metadata (FORMAT.md 3.2), and the
// encoder's refusal of groups a decoder would reject, in one pass over the
// groups: flocora::_affine_meta_check. codec.affine_meta_violation maps the
// code it returns to the reason; its numpy formulation (the reference
// backend's) defines the checks and their order. As numpy ops they cost
// about a dozen calls of 1-3 us each on a ResNet-18 adapter message's 10k
// groups, on every encode and decode.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace flocora {
namespace cpu {

namespace {

// Bit c - 1 of the result: some group breaks check c (codes as returned).
enum MetaViolation : int64_t {
  kNonFinite = 1,      // a scale or offset is NaN or infinite
  kNegativeScale = 2,  // sign bit set (-0.0 included)
  kNegativeZeroOffset = 3,
  kSubnormalScale = 4,  // float32 metadata only
  kTopOverflows = 5,    // offset + scale * levels is not finite in float32
  kBeyondOutDtype = 6,  // the top value or the offset is not finite in the output dtype
};

inline bool sign_bit(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return (u >> 31) != 0;
}

template <typename Meta>
uint32_t violations(const Meta* scales, const Meta* offsets, int64_t begin, int64_t end, float levels, bool f32_meta,
                    at::ScalarType out_dtype) {
  constexpr float kFloat32MinNormal = 1.17549435e-38f;
  uint32_t found = 0;
  for (int64_t g = begin; g < end; ++g) {
    const float s = static_cast<float>(scales[g]), o = static_cast<float>(offsets[g]);
    if (!std::isfinite(s) || !std::isfinite(o)) {
      found |= 1u << (kNonFinite - 1);
      continue;  // every later check is moot once this one fires
    }
    if (sign_bit(s)) found |= 1u << (kNegativeScale - 1);
    if (o == 0.0f && sign_bit(o)) found |= 1u << (kNegativeZeroOffset - 1);
    if (f32_meta && s != 0.0f && s < kFloat32MinNormal) found |= 1u << (kSubnormalScale - 1);
    const float top = o + s * levels;  // two roundings, as the kernels decode (no FMA: -ffp-contract=off)
    if (!std::isfinite(top)) {
      found |= 1u << (kTopOverflows - 1);
      continue;
    }
    if (out_dtype == at::kHalf) {
      if (!std::isfinite(static_cast<float>(c10::Half(top))) || !std::isfinite(static_cast<float>(c10::Half(o))))
        found |= 1u << (kBeyondOutDtype - 1);
    } else if (out_dtype == at::kBFloat16) {
      if (!std::isfinite(static_cast<float>(c10::BFloat16(top))) ||
          !std::isfinite(static_cast<float>(c10::BFloat16(o))))
        found |= 1u << (kBeyondOutDtype - 1);
    }
  }
  return found;
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
  std::atomic<uint32_t> found{0};
  at::parallel_for(0, n, 1 << 16, [&](int64_t lo, int64_t hi) {
    const uint32_t f =
        f32_meta
            ? violations(scales.data_ptr<float>(), offsets.data_ptr<float>(), lo, hi, levels, true, out_dtype)
            : violations(scales.data_ptr<at::Half>(), offsets.data_ptr<at::Half>(), lo, hi, levels, false, out_dtype);
    if (f) found.fetch_or(f, std::memory_order_relaxed);
  });
  const uint32_t f = found.load();
  return f ? (int64_t)__builtin_ctz(f) + 1 : 0;
}

}  // namespace

}  // namespace cpu
}  // namespace flocora

TORCH_LIBRARY_IMPL(flocora, CPU, m) { m.impl("_affine_meta_check", &flocora::cpu::affine_meta_check_cpu); }
