// Scalar definitions shared by the CPU and CUDA kernels: the affine
// quantization arithmetic, the counter-based generator for stochastic
// rounding, the bit layout and the sparse index codes. Torch-free on purpose,
// so that both backends compile *one* definition of "what the bytes are".
//
// Byte identity between backends needs identical float arithmetic: every
// operation below is a single correctly rounded IEEE op. The host compiles
// with -ffp-contract=off (no FMA fusion); the device uses the __f*_rn
// intrinsics, which are never contracted.
//
// Bit layout (docs/FORMAT.md, "Packed codes"): one LSB-first bitstream.
// Element i occupies bits i*b .. i*b+b-1 of the little-endian byte stream,
// its least significant bit first. Example, b = 3, codes 5,1,7,2:
//   bits  0-2 = 101 (5), 3-5 = 001 (1), 6-8 = 111 (7), 9-11 = 010 (2)
//   byte0 = 0b11_001_101 = 0xCD, byte1 = 0b0000_010_1 = 0x05
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define FLOCORA_HD __host__ __device__ __forceinline__
#else
#define FLOCORA_HD inline
#endif

namespace flocora {

// ---- single IEEE ops that the device compiler must not contract ----------
FLOCORA_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FLOCORA_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FLOCORA_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FLOCORA_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// clang-format off: one-line unions
FLOCORA_HD uint32_t float_bits(float f) {
  union { float f; uint32_t u; } v;
  v.f = f;
  return v.u;
}
FLOCORA_HD float bits_float(uint32_t u) {
  union { float f; uint32_t u; } v;
  v.u = u;
  return v.f;
}
// clang-format on

// ---- float16 / bfloat16 conversions (exact, portable) --------------------
FLOCORA_HD float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
  // subnormal: man * 2^-24, exact in float
  float mag = mul_rn((float)man, 5.9604644775390625e-8f);
  return sign ? -mag : mag;
}

// Round to nearest, ties to even.
FLOCORA_HD uint16_t float_to_half_rn(float f) {
  uint32_t x = float_bits(f);
  uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // rounds past 65504
  if (ax < 0x38800000u) {                        // half subnormal or zero
    // value * 2^24 rounded to an integer; exact nearest-even via the
    // 2^23 trick (the product is < 2^10, so no precision is lost before it).
    float scaled = mul_rn(bits_float(ax), 16777216.0f);
    float r = sub_rn(add_rn(scaled, 8388608.0f), 8388608.0f);
    return sign | (uint16_t)r;
  }
  uint32_t mant = ax & 0x7fffffu;
  uint32_t exp = (ax >> 23) - 112u;
  uint32_t h = (exp << 10) | (mant >> 13);
  uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1;  // carries into exp correctly
  return sign | (uint16_t)h;
}

// Largest half <= f (toward -inf), and smallest half >= f (toward +inf):
// metadata stored as float16 is rounded outward so every value of the group
// still lies inside [offset, offset + levels*scale].
FLOCORA_HD uint16_t half_next_toward_neg_inf(uint16_t h) {
  if (h == 0x0000u) return 0x8001u;
  return (h & 0x8000u) ? (uint16_t)(h + 1) : (uint16_t)(h - 1);
}
FLOCORA_HD uint16_t half_next_toward_pos_inf(uint16_t h) {
  if (h == 0x8000u || h == 0x0000u) return 0x0001u;
  return (h & 0x8000u) ? (uint16_t)(h - 1) : (uint16_t)(h + 1);
}
FLOCORA_HD uint16_t float_to_half_down(float f) {
  uint16_t h = float_to_half_rn(f);
  return half_to_float(h) > f ? half_next_toward_neg_inf(h) : h;
}
FLOCORA_HD uint16_t float_to_half_up(float f) {
  uint16_t h = float_to_half_rn(f);
  return half_to_float(h) < f ? half_next_toward_pos_inf(h) : h;
}

FLOCORA_HD float bf16_to_float(uint16_t b) { return bits_float((uint32_t)b << 16); }
FLOCORA_HD uint16_t float_to_bf16_rn(float f) {
  uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t)(x >> 16);
}

// ---- affine parameters ----------------------------------------------------
// Codes are integers q in [0, 2^bits - 1]; x_hat = offset + q * scale.
constexpr float kFloatMinNormal = 1.17549435e-38f;

struct AffineParams {
  float offset;     // group minimum, as stored (float32 or rounded down to float16)
  float scale;      // as stored; 0 for a constant (or sub-normal-range) group
  float inv_scale;  // 1 / scale, or 0 when scale == 0
};

// meta_half: metadata is stored as float16 (offset rounded down, scale up).
// Returns false when the parameters do not fit the metadata dtype
// (non-finite range, or |value| beyond float16's 65504).
FLOCORA_HD bool affine_params(float group_min, float group_max, int bits, bool meta_half, AffineParams* p,
                              uint16_t* offset_half, uint16_t* scale_half) {
  const float levels = (float)((1 << bits) - 1);
  // + 0.0f turns -0.0 into +0.0: min/max of {-0.0, +0.0} depends on the
  // order of evaluation, and the stored bytes must not.
  group_min = add_rn(group_min, 0.0f);
  group_max = add_rn(group_max, 0.0f);
  float offset = group_min;
  if (meta_half) {
    *offset_half = float_to_half_down(group_min);
    offset = half_to_float(*offset_half);
  }
  float range = sub_rn(group_max, offset);
  float scale = div_rn(range, levels);
  if (!(range - range == 0.0f) || !(offset - offset == 0.0f)) return false;  // inf/nan
  if (meta_half) {
    *scale_half = float_to_half_up(scale);
    scale = half_to_float(*scale_half);
    if (!(scale - scale == 0.0f)) return false;
  }
  // A scale too small to invert stays 0: the group decodes to its offset.
  if (!(scale >= kFloatMinNormal)) {
    scale = 0.0f;
    if (meta_half) *scale_half = 0;
  }
  p->offset = offset;
  p->scale = scale;
  p->inv_scale = scale > 0.0f ? div_rn(1.0f, scale) : 0.0f;
  return true;
}

// Round to nearest, ties to even, for 0 <= v <= 255: adding and removing 2^23
// leaves exactly the rounded integer (IEEE default rounding), and vectorizes.
FLOCORA_HD float round_nearest_small(float v) { return sub_rn(add_rn(v, 8388608.0f), 8388608.0f); }

FLOCORA_HD float clamp_levels(float v, float levels) {
  v = v > 0.0f ? v : 0.0f;  // also maps NaN to 0 (inputs are checked finite before)
  return v < levels ? v : levels;
}

FLOCORA_HD uint32_t quantize_nearest(float x, const AffineParams& p, float levels) {
  float v = clamp_levels(mul_rn(sub_rn(x, p.offset), p.inv_scale), levels);
  return (uint32_t)round_nearest_small(v);
}

// ---- counter-based generator for stochastic rounding ----------------------
// Keyed by (seed, element index) only, so the bytes do not depend on how the
// work is split over threads or blocks. mix32 is the "lowbias32" integer hash
// (a bijection on 32 bits); two rounds per element.
FLOCORA_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}
// Key for all elements whose index shares the upper 32 bits.
FLOCORA_HD uint32_t stochastic_key(uint64_t seed, uint64_t index) {
  uint32_t k = mix32((uint32_t)(seed >> 32) ^ 0x9e3779b9u);
  k = mix32((uint32_t)seed ^ k);
  return mix32(k ^ (uint32_t)(index >> 32) ^ 0x85ebca6bu);
}
// Uniform integer in [0, 2^24).
FLOCORA_HD uint32_t uniform24(uint32_t key, uint32_t index_lo) { return mix32(mix32(index_lo ^ key) + key) >> 8; }
// q = floor(v) + [u < frac(v)], so E[q] = v exactly up to the 2^-24 grid of u.
FLOCORA_HD uint32_t quantize_stochastic(float x, const AffineParams& p, float levels, uint32_t u24) {
  float v = clamp_levels(mul_rn(sub_rn(x, p.offset), p.inv_scale), levels);
  float fl = (float)(uint32_t)v;  // v >= 0, so truncation is floor
  float frac = sub_rn(v, fl);
  float u = mul_rn((float)u24, 5.9604644775390625e-8f);  // * 2^-24, exact
  uint32_t q = (uint32_t)fl + (u < frac ? 1u : 0u);
  uint32_t top = (uint32_t)levels;
  return q < top ? q : top;
}

FLOCORA_HD float dequantize(uint32_t q, const AffineParams& p) { return add_rn(p.offset, mul_rn((float)q, p.scale)); }
FLOCORA_HD float dequantize(uint32_t q, float offset, float scale) { return add_rn(offset, mul_rn((float)q, scale)); }

// ---- sizes ----------------------------------------------------------------
FLOCORA_HD int64_t packed_nbytes(int64_t numel, int bits) { return (numel * bits + 7) / 8; }
FLOCORA_HD int64_t num_groups(int64_t numel, int64_t group_size) { return (numel + group_size - 1) / group_size; }

// ---- sparse index codes ---------------------------------------------------
// Two codes for k sorted distinct indices in [0, n): a bitmap (bit i set when
// i is selected, LSB-first, ceil(n/8) bytes) and Elias-Fano with
// l = max{ l : k * 2^l <= n } low bits per index: the low bits of every index
// as one LSB-first bitstream (ceil(k*l/8) bytes), then the high parts in
// unary: bit (idx_i >> l) + i set, ((n-1) >> l) + k bits (rounded up to
// bytes). The encoder takes the smaller; on a tie, the bitmap.
enum IndexCode : int { kIndexBitmap = 0, kIndexEliasFano = 1 };

FLOCORA_HD int elias_fano_low_bits(int64_t n, int64_t k) {
  int l = 0;
  if (k <= 0) return 0;
  while (l < 62 && (k << (l + 1)) <= n) ++l;
  return l;
}
FLOCORA_HD int64_t bitmap_nbytes(int64_t n) { return (n + 7) / 8; }
FLOCORA_HD int64_t elias_fano_low_nbytes(int64_t n, int64_t k) { return (k * elias_fano_low_bits(n, k) + 7) / 8; }
FLOCORA_HD int64_t elias_fano_high_nbytes(int64_t n, int64_t k) {
  if (k <= 0) return 0;
  return ((((n - 1) >> elias_fano_low_bits(n, k)) + k) + 7) / 8;
}
FLOCORA_HD int64_t elias_fano_nbytes(int64_t n, int64_t k) {
  return elias_fano_low_nbytes(n, k) + elias_fano_high_nbytes(n, k);
}
FLOCORA_HD int choose_index_code(int64_t n, int64_t k) {
  return bitmap_nbytes(n) <= elias_fano_nbytes(n, k) ? kIndexBitmap : kIndexEliasFano;
}
FLOCORA_HD int64_t index_nbytes(int64_t n, int64_t k) {
  return choose_index_code(n, k) == kIndexBitmap ? bitmap_nbytes(n) : elias_fano_nbytes(n, k);
}

// Validation failures of an untrusted index code. Both backends report the
// same kind with the same text, so an error names one thing on either.
enum IndexCodeError : int {
  kIdxOk = 0,
  kIdxBitCount,       // the unary stream / bitmap does not hold exactly `count` set bits
  kIdxPadding,        // padding bits past the stream are not zero
  kIdxLowPadding,     // padding bits past the Elias-Fano low stream are not zero
  kIdxNotIncreasing,  // Elias-Fano indices not strictly increasing
  kIdxOutOfRange,     // an index >= numel
};
inline const char* index_code_error_text(int e) {
  switch (e) {
    case kIdxBitCount: return "the number of set bits differs from count";
    case kIdxPadding: return "padding bits past the end of the bit stream are not zero";
    case kIdxLowPadding: return "padding bits past the Elias-Fano low bits are not zero";
    case kIdxNotIncreasing: return "the indices are not strictly increasing";
    case kIdxOutOfRange: return "an index is >= numel";
    default: return "malformed";
  }
}

// Order key for |x|: the IEEE bits without the sign are monotonic in |x|.
FLOCORA_HD uint32_t magnitude_key(float x) { return float_bits(x) & 0x7fffffffu; }

}  // namespace flocora
