// Hot loops of the CPU quantize_pack and unpack_dequantize kernels, in three
// builds: `scalar` (portable x86-64 / any CPU), `avx2` (AVX2 + F16C) and
// `avx512` (F, BW, VL, VBMI), each vector build compiled for its target only
// (GCC target pragmas, not global -m flags) and picked at run time by cpuid,
// so the extension never needs -march=native and still uses the vector units
// it finds. All produce identical bytes: the vector code performs the same
// IEEE operations as affine.h, lane by lane (and -ffp-contract=off keeps the
// compiler from fusing them into FMAs).
#pragma once
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

#include <flocora/affine.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FLOCORA_X86 1
#endif

// On a lambda of a hot loop: GCC leaves large lambdas with several call
// sites out of line, which costs their loops their registers.
#if defined(__GNUC__)
#define FLOCORA_INLINE __attribute__((always_inline))
#else
#define FLOCORA_INLINE
#endif

namespace flocora {
namespace cpu {

// Function table of one instruction-set build.
struct QuantLoops {
  // Min and max of x[0..n); false if any element is NaN or Inf.
  bool (*minmax)(const float* x, int64_t n, float* lo, float* hi);
  // affine_params of n groups from their min/max; float16 bits of the stored
  // metadata in offset_half/scale_half when meta_half. False if any group's
  // parameters do not fit (its entry is then zeroed).
  bool (*params)(const float* lo, const float* hi, int64_t n, int bits, bool meta_half, AffineParams* p,
                 uint16_t* offset_half, uint16_t* scale_half);
  void (*quantize_nearest)(const float* x, int64_t n, const AffineParams& p, float levels, uint8_t* codes);
  // Element j uses counter index_lo + j (no 2^32 wrap inside one call).
  void (*quantize_stochastic)(const float* x, int64_t n, const AffineParams& p, float levels, uint32_t key,
                              uint32_t index_lo, uint8_t* codes);
  // codes[0..n) -> packed_nbytes(n, bits) bytes; index = bits.
  void (*pack[9])(const uint8_t* codes, int64_t n, uint8_t* dst);
  // packed_nbytes(n, bits) bytes -> codes[0..n).
  void (*unpack[9])(const uint8_t* src, int64_t n, uint8_t* codes);
  void (*dequantize)(const uint8_t* codes, int64_t n, float offset, float scale, float* out);
  void (*half_to_float)(const uint16_t* src, int64_t n, float* dst);
  void (*float_to_half)(const float* src, int64_t n, uint16_t* dst);
  // Range, parameters, codes and packing of n whole groups of `group`
  // floats (a multiple of 16), nearest rounding, float32 metadata, in one
  // pass over each group: stores scale[g], offset[g] and the n*group*bits/8
  // packed bytes at `packed`. nullptr in builds without one. False if a
  // value is not finite or a group's parameters do not fit (the bytes
  // written are then unspecified): the caller redoes the groups on the
  // checked path, which names the error.
  bool (*encode_groups_f32)(const float* x, int64_t n, int64_t group, int bits, float* scale, float* offset,
                            uint8_t* packed);
  // Float32 values of n whole groups of `group` codes (a multiple of 16),
  // float32 metadata; stream: non-temporal stores where `out` is 64-byte
  // aligned (for outputs far larger than the caches). nullptr in builds
  // without one.
  void (*decode_groups_f32)(const uint8_t* codes, int64_t n, int64_t group, const float* scale, const float* offset,
                            float* out, bool stream);
  // decode_groups_f32 from the packed codes of width bits (1..7), which
  // start at `packed` (group is a multiple of 16: every group starts on a
  // byte), without the bytes of the codes stored and read back; may read
  // any byte before readable_end. nullptr in builds without one.
  void (*decode_groups_packed_f32)(const uint8_t* packed, int bits, int64_t n, int64_t group, const float* scale,
                                   const float* offset, float* out, bool stream, const uint8_t* readable_end);
};

// fn(std::integral_constant<int, bits>{}) for bits 1..8: a width as a
// template argument.
template <typename Fn>
inline auto with_width(int bits, Fn&& fn) {
  switch (bits) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 5: return fn(std::integral_constant<int, 5>{});
    case 6: return fn(std::integral_constant<int, 6>{});
    case 7: return fn(std::integral_constant<int, 7>{});
    default: return fn(std::integral_constant<int, 8>{});
  }
}

namespace scalar {

inline bool minmax(const float* x, int64_t n, float* lo, float* hi) {
  float mn = x[0], mx = x[0];
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i];
    finite &= (v - v == 0.0f);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  *lo = mn;
  *hi = mx;
  return finite;
}

inline bool params(const float* lo, const float* hi, int64_t n, int bits, bool meta_half, AffineParams* p,
                   uint16_t* offset_half, uint16_t* scale_half) {
  bool ok = true;
  for (int64_t g = 0; g < n; ++g) {
    uint16_t oh = 0, sh = 0;
    if (!affine_params(lo[g], hi[g], bits, meta_half, &p[g], &oh, &sh)) {
      ok = false;
      p[g] = AffineParams{0.0f, 0.0f, 0.0f};
    }
    offset_half[g] = oh;
    scale_half[g] = sh;
  }
  return ok;
}

inline void quantize_nearest(const float* x, int64_t n, const AffineParams& p, float levels, uint8_t* codes) {
  for (int64_t i = 0; i < n; ++i) codes[i] = (uint8_t)flocora::quantize_nearest(x[i], p, levels);
}

inline void quantize_stochastic(const float* x, int64_t n, const AffineParams& p, float levels, uint32_t key,
                                uint32_t index_lo, uint8_t* codes) {
  for (int64_t i = 0; i < n; ++i)
    codes[i] = (uint8_t)flocora::quantize_stochastic(x[i], p, levels, uniform24(key, index_lo + (uint32_t)i));
}

// 8 codes of B bits (one per byte of c) -> 8*B contiguous bits, by halving
// the number of lanes three times (a SWAR shift-or tree).
template <int B>
inline uint64_t squeeze8(uint64_t c) {
  c = (c & 0x00FF00FF00FF00FFull) | ((c & 0xFF00FF00FF00FF00ull) >> (8 - B));
  c = (c & 0x0000FFFF0000FFFFull) | ((c & 0xFFFF0000FFFF0000ull) >> (16 - 2 * B));
  return (c & 0x00000000FFFFFFFFull) | ((c >> 32) << (4 * B));
}
// Inverse of squeeze8: 8*B bits -> one code per byte.
template <int B>
inline uint64_t spread8(uint64_t v) {
  constexpr uint64_t m4 = (1ull << (4 * B)) - 1;
  constexpr uint64_t m2 = (1ull << (2 * B)) - 1;
  constexpr uint64_t m1 = (1ull << B) - 1;
  v = (v & m4) | ((v >> (4 * B)) & m4) << 32;
  v = (v & (m2 | m2 << 32)) | ((v >> (2 * B)) & (m2 | m2 << 32)) << 16;
  constexpr uint64_t lanes = m1 | m1 << 16 | m1 << 32 | m1 << 48;
  return (v & lanes) | ((v >> B) & lanes) << 8;
}

template <int B>
inline void pack(const uint8_t* codes, int64_t n, uint8_t* dst) {
  int64_t full = n / 8;
  for (int64_t u = 0; u < full; ++u) {
    uint64_t c;
    memcpy(&c, codes + 8 * u, 8);
    uint64_t v = squeeze8<B>(c);
    memcpy(dst + B * u, &v, B);  // little-endian host: low bytes first
  }
  int64_t rest = n - 8 * full;
  if (rest) {
    uint64_t c = 0;
    memcpy(&c, codes + 8 * full, rest);
    uint64_t v = squeeze8<B>(c);
    memcpy(dst + B * full, &v, (rest * B + 7) / 8);
  }
}

template <int B>
inline void unpack(const uint8_t* src, int64_t n, uint8_t* codes) {
  int64_t full = n / 8;
  for (int64_t u = 0; u < full; ++u) {
    uint64_t v = 0;
    memcpy(&v, src + B * u, B);
    uint64_t c = spread8<B>(v);
    memcpy(codes + 8 * u, &c, 8);
  }
  int64_t rest = n - 8 * full;
  if (rest) {
    uint64_t v = 0;
    memcpy(&v, src + B * full, (rest * B + 7) / 8);
    uint64_t c = spread8<B>(v);
    memcpy(codes + 8 * full, &c, rest);
  }
}

template <>
inline void pack<8>(const uint8_t* codes, int64_t n, uint8_t* dst) {
  memcpy(dst, codes, n);
}
template <>
inline void unpack<8>(const uint8_t* src, int64_t n, uint8_t* codes) {
  memcpy(codes, src, n);
}

inline void dequantize(const uint8_t* codes, int64_t n, float offset, float scale, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = flocora::dequantize(codes[i], offset, scale);
}

inline void half_to_float(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = flocora::half_to_float(src[i]);
}
inline void float_to_half(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_half_rn(src[i]);
}

inline QuantLoops loops() {
  QuantLoops t;
  t.minmax = minmax;
  t.params = params;
  t.quantize_nearest = quantize_nearest;
  t.quantize_stochastic = quantize_stochastic;
  t.pack[0] = t.pack[1] = nullptr;
  t.unpack[0] = nullptr;
  // clang-format off: a table, one row per four widths
  t.pack[1] = pack<1>; t.pack[2] = pack<2>; t.pack[3] = pack<3>; t.pack[4] = pack<4>;
  t.pack[5] = pack<5>; t.pack[6] = pack<6>; t.pack[7] = pack<7>; t.pack[8] = pack<8>;
  t.unpack[1] = unpack<1>; t.unpack[2] = unpack<2>; t.unpack[3] = unpack<3>; t.unpack[4] = unpack<4>;
  t.unpack[5] = unpack<5>; t.unpack[6] = unpack<6>; t.unpack[7] = unpack<7>; t.unpack[8] = unpack<8>;
  // clang-format on
  t.dequantize = dequantize;
  t.half_to_float = half_to_float;
  t.float_to_half = float_to_half;
  t.encode_groups_f32 = nullptr;
  t.decode_groups_f32 = nullptr;
  t.decode_groups_packed_f32 = nullptr;
  return t;
}

}  // namespace scalar

#if defined(FLOCORA_X86) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
namespace avx2 {

inline float hmin8(__m256 v) {
  v = _mm256_min_ps(v, _mm256_permute2f128_ps(v, v, 1));
  v = _mm256_min_ps(v, _mm256_shuffle_ps(v, v, 0x4e));
  v = _mm256_min_ps(v, _mm256_shuffle_ps(v, v, 0xb1));
  return _mm256_cvtss_f32(v);
}
inline float hmax8(__m256 v) {
  v = _mm256_max_ps(v, _mm256_permute2f128_ps(v, v, 1));
  v = _mm256_max_ps(v, _mm256_shuffle_ps(v, v, 0x4e));
  v = _mm256_max_ps(v, _mm256_shuffle_ps(v, v, 0xb1));
  return _mm256_cvtss_f32(v);
}

// Min/max are exact whatever the order of evaluation (the sign of a zero
// aside, which affine_params normalizes), so lanes may be combined freely.
inline bool minmax(const float* x, int64_t n, float* lo, float* hi) {
  if (n < 8) return scalar::minmax(x, n, lo, hi);
  const __m256 zero = _mm256_setzero_ps();
  __m256 mn0 = _mm256_loadu_ps(x), mx0 = mn0, mn1 = mn0, mx1 = mn0;
  __m256 bad = zero;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    // x - x is NaN exactly for NaN and +-Inf.
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(a, a), zero, _CMP_NEQ_UQ));
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(b, b), zero, _CMP_NEQ_UQ));
    mn0 = _mm256_min_ps(a, mn0);
    mx0 = _mm256_max_ps(a, mx0);
    mn1 = _mm256_min_ps(b, mn1);
    mx1 = _mm256_max_ps(b, mx1);
  }
  for (; i + 8 <= n; i += 8) {
    __m256 a = _mm256_loadu_ps(x + i);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(a, a), zero, _CMP_NEQ_UQ));
    mn0 = _mm256_min_ps(a, mn0);
    mx0 = _mm256_max_ps(a, mx0);
  }
  float mn = hmin8(_mm256_min_ps(mn0, mn1)), mx = hmax8(_mm256_max_ps(mx0, mx1));
  bool finite = _mm256_movemask_ps(bad) == 0;
  if (i < n) {
    float tl, th;
    finite &= scalar::minmax(x + i, n - i, &tl, &th);
    mn = tl < mn ? tl : mn;
    mx = th > mx ? th : mx;
  }
  *lo = mn;
  *hi = mx;
  return finite;
}

// affine_params for 8 groups at a time (float32 metadata; float16 metadata
// takes the scalar path): the same IEEE operations, lane by lane.
inline bool params(const float* lo, const float* hi, int64_t n, int bits, bool meta_half, AffineParams* p,
                   uint16_t* offset_half, uint16_t* scale_half) {
  if (meta_half) return scalar::params(lo, hi, n, bits, meta_half, p, offset_half, scale_half);
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  const __m256 levels = _mm256_set1_ps((float)((1 << bits) - 1)), fmin = _mm256_set1_ps(kFloatMinNormal);
  bool ok = true;
  int64_t g = 0;
  alignas(32) float off[8], sc[8], inv[8];
  for (; g + 8 <= n; g += 8) {
    __m256 o = _mm256_add_ps(_mm256_loadu_ps(lo + g), zero);
    __m256 range = _mm256_sub_ps(_mm256_add_ps(_mm256_loadu_ps(hi + g), zero), o);
    __m256 bad = _mm256_or_ps(_mm256_cmp_ps(_mm256_sub_ps(range, range), zero, _CMP_NEQ_UQ),
                              _mm256_cmp_ps(_mm256_sub_ps(o, o), zero, _CMP_NEQ_UQ));
    __m256 scale = _mm256_div_ps(range, levels);
    scale = _mm256_and_ps(scale, _mm256_cmp_ps(scale, fmin, _CMP_GE_OQ));
    __m256 r = _mm256_and_ps(_mm256_div_ps(one, scale), _mm256_cmp_ps(scale, zero, _CMP_GT_OQ));
    _mm256_store_ps(off, o);
    _mm256_store_ps(sc, scale);
    _mm256_store_ps(inv, r);
    int badmask = _mm256_movemask_ps(bad);
    for (int j = 0; j < 8; ++j) {
      p[g + j] = (badmask >> j) & 1 ? AffineParams{0.0f, 0.0f, 0.0f} : AffineParams{off[j], sc[j], inv[j]};
    }
    ok &= badmask == 0;
  }
  return scalar::params(lo + g, hi + g, n - g, bits, meta_half, p + g, offset_half + g, scale_half + g) && ok;
}

// 8 int32 lanes (values 0..255) -> 8 bytes in order.
inline void store_codes8(__m256i q, uint8_t* dst) {
  __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  _mm_storel_epi64((__m128i*)dst, _mm_packus_epi16(w, w));
}

// 32 int32 lanes (4 vectors, values 0..255) -> 32 bytes in order.
inline __m256i codes32(__m256i q0, __m256i q1, __m256i q2, __m256i q3) {
  __m256i a = _mm256_packs_epi32(q0, q1);  // per 128-bit lane: q0lo q1lo | q0hi q1hi
  __m256i b = _mm256_packs_epi32(q2, q3);
  __m256i c = _mm256_packus_epi16(a, b);
  return _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
inline void store_codes32(__m256i q0, __m256i q1, __m256i q2, __m256i q3, uint8_t* dst) {
  _mm256_storeu_si256((__m256i*)dst, codes32(q0, q1, q2, q3));
}

// The same operations as flocora::quantize_nearest, 8 lanes at a time.
inline __m256i nearest8(__m256 x, __m256 off, __m256 inv, __m256 lev) {
  const __m256 magic = _mm256_set1_ps(8388608.0f);
  __m256 v = _mm256_mul_ps(_mm256_sub_ps(x, off), inv);
  v = _mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), lev);  // max(NaN,0)=0 as clamp_levels
  v = _mm256_sub_ps(_mm256_add_ps(v, magic), magic);
  return _mm256_cvttps_epi32(v);
}

inline void quantize_nearest(const float* x, int64_t n, const AffineParams& p, float levels, uint8_t* codes) {
  const __m256 off = _mm256_set1_ps(p.offset), inv = _mm256_set1_ps(p.inv_scale), lev = _mm256_set1_ps(levels);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    store_codes32(nearest8(_mm256_loadu_ps(x + i), off, inv, lev), nearest8(_mm256_loadu_ps(x + i + 8), off, inv, lev),
                  nearest8(_mm256_loadu_ps(x + i + 16), off, inv, lev),
                  nearest8(_mm256_loadu_ps(x + i + 24), off, inv, lev), codes + i);
  }
  for (; i + 8 <= n; i += 8) store_codes8(nearest8(_mm256_loadu_ps(x + i), off, inv, lev), codes + i);
  scalar::quantize_nearest(x + i, n - i, p, levels, codes + i);
}

inline __m256i mix32x8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x7feb352du));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x846ca68bu));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

inline __m256i stochastic8(__m256 x, __m256i idx, __m256i key, __m256 off, __m256 inv, __m256 lev) {
  __m256 v = _mm256_mul_ps(_mm256_sub_ps(x, off), inv);
  v = _mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), lev);
  __m256i fl_i = _mm256_cvttps_epi32(v);
  __m256 frac = _mm256_sub_ps(v, _mm256_cvtepi32_ps(fl_i));
  __m256i h = mix32x8(_mm256_add_epi32(mix32x8(_mm256_xor_si256(idx, key)), key));
  __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), _mm256_set1_ps(5.9604644775390625e-8f));
  __m256i up = _mm256_castps_si256(_mm256_cmp_ps(u, frac, _CMP_LT_OQ));  // -1 where u < frac
  __m256i q = _mm256_sub_epi32(fl_i, up);
  return _mm256_min_epi32(q, _mm256_cvttps_epi32(lev));
}

inline void quantize_stochastic(const float* x, int64_t n, const AffineParams& p, float levels, uint32_t key,
                                uint32_t index_lo, uint8_t* codes) {
  const __m256 off = _mm256_set1_ps(p.offset), inv = _mm256_set1_ps(p.inv_scale), lev = _mm256_set1_ps(levels);
  const __m256i k = _mm256_set1_epi32((int)key);
  const __m256i step = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i q[4];
    for (int j = 0; j < 4; ++j) {
      __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)(index_lo + (uint32_t)(i + 8 * j))), step);
      q[j] = stochastic8(_mm256_loadu_ps(x + i + 8 * j), idx, k, off, inv, lev);
    }
    store_codes32(q[0], q[1], q[2], q[3], codes + i);
  }
  for (; i + 8 <= n; i += 8) {
    __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)(index_lo + (uint32_t)i)), step);
    store_codes8(stochastic8(_mm256_loadu_ps(x + i), idx, k, off, inv, lev), codes + i);
  }
  scalar::quantize_stochastic(x + i, n - i, p, levels, key, index_lo + (uint32_t)i, codes + i);
}

// 32 codes (4 x 64-bit lanes of 8 codes) -> each 128-bit lane's 2*B packed
// bytes at its start, squeezed as avx512::squeeze64: two multiply-adds join
// neighbours (pairs into 16-bit lanes, quads into 32-bit lanes), a shift
// and a select join the two halves of each 64-bit lane, a byte shuffle
// gathers the low B bytes of the two 64-bit lanes.
template <int B>
struct Squeeze32 {
  static_assert(B >= 1 && B <= 7, "8-bit codes are stored as they are");
  // unsigned multipliers times signed codes (codes < 2^7 fit; 2^7 does not fit a signed byte)
  __m256i pair = _mm256_set1_epi16((short)(1 | (1 << B) << 8));
  __m256i quad = _mm256_set1_epi32(1 | (1 << (2 * B)) << 16);
  __m256i low = _mm256_set1_epi64x((long long)((1ull << (4 * B)) - 1));
  __m256i gather;
  Squeeze32() {
    alignas(32) int8_t order[32];
    for (int k = 0; k < 32; ++k) {
      const int j = k % 16, q = j / B, r = j % B;  // byte r of 64-bit lane q of the 128-bit lane
      // Width 6: the 3 bytes of each 32-bit half, gathered as they are.
      order[k] = (int8_t)(j >= 2 * B ? -1 : B == 6 ? q * 8 + (r < 3 ? r : r + 1) : q * 8 + r);
    }
    gather = _mm256_load_si256((const __m256i*)order);
  }
  __m256i operator()(__m256i c) const {
    __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(pair, c), quad);  // 4 codes per 32-bit lane, 4B bits
    if constexpr (B == 6) return _mm256_shuffle_epi8(d, gather);         // 4B = 24 bits: whole bytes, no join
    __m256i hi = _mm256_srli_epi64(d, 32 - 4 * B);                       // the upper lane's codes from bit 4B on
    // Up to 4 bits the shift moves nothing of the lower lane's codes (4B
    // bits, below 32 - 4B): a plain or joins the halves.
    if constexpr (4 * B <= 32 - 4 * B) return _mm256_shuffle_epi8(_mm256_or_si256(d, hi), gather);
    return _mm256_shuffle_epi8(_mm256_or_si256(_mm256_and_si256(d, low), _mm256_andnot_si256(low, hi)), gather);
  }
};

// Stores the 4*B bytes of a Squeeze32 result at o. room: the 2*B + 16
// bytes from o are the caller's to write (two 16-byte stores, the second
// overwriting what the first wrote past its 2*B bytes; the bytes past 4*B
// are left for later stores to overwrite).
template <int B>
inline void store_squeezed32(__m256i d, uint8_t* o, bool room) {
  const __m128i first = _mm256_castsi256_si128(d), second = _mm256_extracti128_si256(d, 1);
  if (room) {
    _mm_storeu_si128((__m128i*)o, first);
    _mm_storeu_si128((__m128i*)(o + 2 * B), second);
  } else {
    alignas(16) uint8_t bytes[32];
    _mm_store_si128((__m128i*)bytes, first);
    _mm_store_si128((__m128i*)(bytes + 16), second);
    memcpy(o, bytes, 2 * B);
    memcpy(o + 2 * B, bytes + 16, 2 * B);
  }
}

template <int B>
inline void pack(const uint8_t* codes, int64_t n, uint8_t* dst) {
  const Squeeze32<B> squeeze;
  const int64_t nbytes = (n * B + 7) / 8;
  int64_t u = 0, units = n / 8;
  for (; u + 4 <= units; u += 4)
    store_squeezed32<B>(squeeze(_mm256_loadu_si256((const __m256i*)(codes + 8 * u))), dst + B * u,
                        B * u + 2 * B + 16 <= nbytes);
  scalar::pack<B>(codes + 8 * u, n - 8 * u, dst + B * u);
}

// Unpack 8 codes from B bytes: each 32-bit lane takes the two bytes its
// code starts in, then shifts by its bit offset. Wide: 8 bytes may be read
// (the bytes past B never reach a code); otherwise exactly B, which costs a
// store-forwarding stall (a 3-bit decode ran at a fifth of the 4-bit speed).
template <int B, bool Wide>
inline __m256i unpack8(const uint8_t* src) {
  uint64_t v = 0;
  memcpy(&v, src, Wide ? 8 : B);
  __m256i bytes = _mm256_set1_epi64x((long long)v);
  // lane j: bytes (j*B)/8 and (j*B)/8+1 into the low 16 bits
  // clang-format off: two lanes per row
  const __m256i shuf = _mm256_setr_epi8(
      (0 * B) / 8, (0 * B) / 8 + 1, -1, -1, (1 * B) / 8, (1 * B) / 8 + 1, -1, -1,
      (2 * B) / 8, (2 * B) / 8 + 1, -1, -1, (3 * B) / 8, (3 * B) / 8 + 1, -1, -1,
      (4 * B) / 8, (4 * B) / 8 + 1, -1, -1, (5 * B) / 8, (5 * B) / 8 + 1, -1, -1,
      (6 * B) / 8, (6 * B) / 8 + 1, -1, -1, (7 * B) / 8, (7 * B) / 8 + 1, -1, -1);
  // clang-format on
  __m256i w = _mm256_shuffle_epi8(bytes, shuf);
  const __m256i shifts = _mm256_setr_epi32((0 * B) % 8, (1 * B) % 8, (2 * B) % 8, (3 * B) % 8, (4 * B) % 8, (5 * B) % 8,
                                           (6 * B) % 8, (7 * B) % 8);
  return _mm256_and_si256(_mm256_srlv_epi32(w, shifts), _mm256_set1_epi32((1 << B) - 1));
}

template <int B>
inline void unpack(const uint8_t* src, int64_t n, uint8_t* codes) {
  const int64_t nbytes = (n * B + 7) / 8;
  int64_t i = 0;
  for (; i + 32 <= n && (i / 8) * B + 3 * B + 8 <= nbytes; i += 32) {
    const uint8_t* s = src + (i / 8) * B;
    store_codes32(unpack8<B, true>(s), unpack8<B, true>(s + B), unpack8<B, true>(s + 2 * B),
                  unpack8<B, true>(s + 3 * B), codes + i);
  }
  for (; i + 32 <= n; i += 32) {
    const uint8_t* s = src + (i / 8) * B;
    store_codes32(unpack8<B, false>(s), unpack8<B, false>(s + B), unpack8<B, false>(s + 2 * B),
                  unpack8<B, false>(s + 3 * B), codes + i);
  }
  scalar::unpack<B>(src + (i / 8) * B, n - i, codes + i);
}

inline void dequantize(const uint8_t* codes, int64_t n, float offset, float scale, float* out) {
  const __m256 off = _mm256_set1_ps(offset), sc = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i c8 = _mm_loadl_epi64((const __m128i*)(codes + i));
    __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c8));
    _mm256_storeu_ps(out + i, _mm256_add_ps(off, _mm256_mul_ps(q, sc)));
  }
  scalar::dequantize(codes + i, n - i, offset, scale, out + i);
}

// op of each of 8 vectors, lane g of the result from v[(g % 4) * 2 + g / 4]:
// as avx512::encode_groups_f32's reduction, 8 lanes. The shuffles move whole
// 32-bit lanes, so the vectors may hold float bits or integers alike.
template <typename Op>
inline __m256i reduce_transpose8(const __m256i* v, Op op) {
  auto f = [](__m256i a) { return _mm256_castsi256_ps(a); };
  auto i = [](__m256 a) { return _mm256_castps_si256(a); };
  __m256i w[4], x[2];
  for (int j = 0; j < 4; ++j)
    w[j] = op(i(_mm256_permute2f128_ps(f(v[2 * j]), f(v[2 * j + 1]), 0x20)),
              i(_mm256_permute2f128_ps(f(v[2 * j]), f(v[2 * j + 1]), 0x31)));
  for (int j = 0; j < 2; ++j)
    x[j] = op(i(_mm256_shuffle_ps(f(w[2 * j]), f(w[2 * j + 1]), 0x44)),
              i(_mm256_shuffle_ps(f(w[2 * j]), f(w[2 * j + 1]), 0xEE)));
  return op(i(_mm256_shuffle_ps(f(x[0]), f(x[1]), 0x88)), i(_mm256_shuffle_ps(f(x[0]), f(x[1]), 0xDD)));
}

// avx512::nearest16_unclamped, 8 lanes (the conversion rounds as MXCSR says:
// to nearest even unless a caller changed it, as the scalar loop's 2^23 trick).
inline __m256i nearest8_unclamped(__m256 x, __m256 off, __m256 inv) {
  return _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(x, off), inv));
}

// The bytes of 32 codes (q0..q3: int32 codes 0..255) in "split" order, as
// two packs leave them: 128-bit lane l holds, for q0, q1, q2, q3 in turn,
// the codes of its lanes 4l..4l+3.
inline __m256i codes_split32(__m256i q0, __m256i q1, __m256i q2, __m256i q3) {
  return _mm256_packus_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
}
inline __m256i split_to_order(__m256i c) {
  return _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// 32 codes of B = 1, 2 or 4 bits in split order -> their 4*B packed bytes at
// the start of the result. The codes fill whole bytes of each 32-bit lane
// (B = 2, 4) or one bit of a mask (B = 1), so multiply-adds and one byte
// shuffle do what Squeeze32 needs shifts and selects for. With q2 = q3 = 0
// the first 2*B bytes are the packed first 16 codes.
template <int B>
inline __m128i pack_split32(__m256i c) {
  static_assert(B == 1 || B == 2 || B == 4, "other widths take Squeeze32");
  if constexpr (B == 4) {
    // Byte pairs -> c0 + 16*c1 per 16-bit lane; one byte each: lane l then
    // holds two bytes per source vector, which the shuffle interleaves with
    // lane 1's.
    const __m256i m = _mm256_maddubs_epi16(c, _mm256_set1_epi16(1 | 16 << 8));
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi16(m, m), 0x08);  // lane 0's 8 bytes, lane 1's
    return _mm_shuffle_epi8(_mm256_castsi256_si128(p),
                            _mm_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15));
  } else if constexpr (B == 2) {
    // Four codes -> one byte per 32-bit lane (c0 + 4*c1 + 16*c2 + 64*c3).
    const __m256i d =
        _mm256_madd_epi16(_mm256_maddubs_epi16(c, _mm256_set1_epi16(1 | 4 << 8)), _mm256_set1_epi32(1 | 16 << 16));
    const __m256i g =
        _mm256_shuffle_epi8(d, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8,
                                                12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
    return _mm_unpacklo_epi8(_mm256_castsi256_si128(g), _mm256_extracti128_si256(g, 1));
  } else {
    return _mm_cvtsi32_si128(_mm256_movemask_epi8(_mm256_slli_epi16(split_to_order(c), 7)));
  }
}

// The first N bytes of v at o (N = 2, 4, 8 or 16).
template <int N>
inline void store_first(__m128i v, uint8_t* o) {
  if constexpr (N == 16) {
    _mm_storeu_si128((__m128i*)o, v);
  } else if constexpr (N == 8) {
    _mm_storel_epi64((__m128i*)o, v);
  } else {
    const uint32_t w = (uint32_t)_mm_cvtsi128_si32(v);
    memcpy(o, &w, N);
  }
}

// avx512::encode_groups_bits, 8 groups a block and 32 codes a unit.
template <int bits, int kFixed>
inline bool encode_groups_bits(const float* x, int64_t n, int64_t group, float* scale_out, float* offset_out,
                               uint8_t* packed) {
  const int64_t k = kFixed > 0 ? kFixed : group / 8;  // vectors per group, even (group is a multiple of 16)
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  const __m256 levels = _mm256_set1_ps((float)((1 << bits) - 1)), fmin = _mm256_set1_ps(kFloatMinNormal);
  const __m256i lev8 = _mm256_set1_epi8((char)((1 << bits) - 1));
  const Squeeze32 < bits<8 ? bits : 1> squeeze;  // widths 3, 5, 6, 7
  const uint8_t* const packed_end = packed + (uint64_t)(n * group) / 8 * bits;
  __m256 bad = zero;
  alignas(32) float off_of[2][8], inv_of[2][8];  // this block's and the next's
  auto range_params = [&](int64_t g0, float* off_out, float* inv_out) FLOCORA_INLINE {
    const int nb = (int)std::min<int64_t>(8, n - g0);
    const float* xb = x + g0 * group;
    // The range from integer min/max of the values' bits, which run on every
    // vector pipe (float min/max share two pipes with the codes' subtract and
    // conversion). As signed integers, non-negative floats order as floats and
    // negative ones in reverse; so the largest float is the signed maximum if
    // that is non-negative (else every value is negative, and it is the
    // smallest as unsigned), the smallest float is the unsigned maximum if its
    // sign is set (else the unsigned minimum). NaN bits order above Inf's in
    // both, so a NaN reaches the range and fails the check below.
    alignas(32) __m256i smax_slot[8], umax_slot[8], umin_slot[8];
    // kc: the vectors per group, fixed for the common groups (a loop of
    // one vector per turn spends more on its counter than on the work).
    auto groups_range = [&](auto kc) FLOCORA_INLINE {
      const int64_t kk = decltype(kc)::value > 0 ? decltype(kc)::value : k;
      for (int j = 0; j < nb; ++j) {
        const float* xg = xb + j * group;
        for (int64_t t = 0; t < kk; t += 2)
          _mm_prefetch((const char*)(xg + 8 * t + 4096), _MM_HINT_T0);  // 16 KiB: 8 measured no different
        const __m256i a = _mm256_loadu_si256((const __m256i*)xg);
        __m256i smax = a, umax = a, umin = a;
        for (int64_t t = 1; t < kk; ++t) {
          const __m256i b = _mm256_loadu_si256((const __m256i*)(xg + 8 * t));
          smax = _mm256_max_epi32(smax, b);
          umax = _mm256_max_epu32(umax, b);
          umin = _mm256_min_epu32(umin, b);
        }
        const int slot = (j % 4) * 2 + j / 4;
        smax_slot[slot] = smax;
        umax_slot[slot] = umax;
        umin_slot[slot] = umin;
      }
    };
    if constexpr (kFixed > 0)
      groups_range(std::integral_constant<int, kFixed>{});
    else if (k == 16)
      groups_range(std::integral_constant<int, 16>{});
    else
      groups_range(std::integral_constant<int, 0>{});
    for (int j = nb; j < 8; ++j) {  // unused slots repeat group 0
      const int slot = (j % 4) * 2 + j / 4;
      smax_slot[slot] = smax_slot[0];
      umax_slot[slot] = umax_slot[0];
      umin_slot[slot] = umin_slot[0];
    }
    const __m256 smax =
        _mm256_castsi256_ps(reduce_transpose8(smax_slot, [](__m256i p, __m256i q) { return _mm256_max_epi32(p, q); }));
    const __m256 umax =
        _mm256_castsi256_ps(reduce_transpose8(umax_slot, [](__m256i p, __m256i q) { return _mm256_max_epu32(p, q); }));
    const __m256 umin =
        _mm256_castsi256_ps(reduce_transpose8(umin_slot, [](__m256i p, __m256i q) { return _mm256_min_epu32(p, q); }));
    const __m256 lo = _mm256_blendv_ps(umin, umax, umax), hi = _mm256_blendv_ps(smax, umin, smax);
    __m256 o = _mm256_add_ps(lo, zero);
    __m256 range = _mm256_sub_ps(_mm256_add_ps(hi, zero), o);
    alignas(32) static const int32_t first[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    const __m256 valid = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i*)(first + 8 - nb)));
    bad = _mm256_or_ps(bad,
                       _mm256_and_ps(valid, _mm256_or_ps(_mm256_cmp_ps(_mm256_sub_ps(range, range), zero, _CMP_NEQ_UQ),
                                                         _mm256_cmp_ps(_mm256_sub_ps(o, o), zero, _CMP_NEQ_UQ))));
    __m256 scale = _mm256_div_ps(range, levels);
    scale = _mm256_and_ps(scale, _mm256_cmp_ps(scale, fmin, _CMP_GE_OQ));
    __m256 inv = _mm256_and_ps(_mm256_div_ps(one, scale), _mm256_cmp_ps(scale, zero, _CMP_GT_OQ));
    if (nb == 8) {  // a masked store costs tens of cycles on AMD CPUs
      _mm256_storeu_ps(scale_out + g0, scale);
      _mm256_storeu_ps(offset_out + g0, o);
    } else {
      _mm256_maskstore_ps(scale_out + g0, _mm256_castps_si256(valid), scale);
      _mm256_maskstore_ps(offset_out + g0, _mm256_castps_si256(valid), o);
    }
    _mm256_store_ps(off_out, o);
    _mm256_store_ps(inv_out, inv);
  };
  auto codes_of = [&](int64_t g0, const float* off_of, const float* inv_of) FLOCORA_INLINE {
    const int nb = (int)std::min<int64_t>(8, n - g0);
    const float* xb = x + g0 * group;
    const int64_t code_base = g0 * group;  // code index of the block's first value
    // Codes packed on the way out (as avx512::encode_groups_bits). No check
    // for NaN here: the range pass has failed any group holding one. The
    // byte clamp costs one op per 32 codes and keeps a code within its
    // width whatever the rounding mode.
    auto clamped_split32 = [&](__m256i q0, __m256i q1, __m256i q2, __m256i q3) FLOCORA_INLINE {
      const __m256i c = codes_split32(q0, q1, q2, q3);
      return bits < 8 ? _mm256_min_epu8(c, lev8) : c;
    };
    constexpr bool kByteLanes = bits == 1 || bits == 2 || bits == 4;
    auto store32 = [&](__m256i q0, __m256i q1, __m256i q2, __m256i q3, int64_t code) FLOCORA_INLINE {
      const __m256i c = clamped_split32(q0, q1, q2, q3);
      uint8_t* o = packed + ((uint64_t)code >> 3) * bits;
      if constexpr (bits == 8) {
        _mm256_storeu_si256((__m256i*)o, split_to_order(c));
      } else if constexpr (kByteLanes) {
        store_first<4 * bits>(pack_split32<bits>(c), o);
      } else {
        store_squeezed32<bits>(squeeze(split_to_order(c)), o, o + 2 * bits + 16 <= packed_end);
      }
    };
    auto store16 = [&](__m256i q0, __m256i q1, int64_t code) FLOCORA_INLINE {  // the first 16 codes of a unit
      const __m256i zero_codes = _mm256_setzero_si256();
      const __m256i c = clamped_split32(q0, q1, zero_codes, zero_codes);
      uint8_t* o = packed + ((uint64_t)code >> 3) * bits;
      if constexpr (bits == 8) {
        _mm_storeu_si128((__m128i*)o, _mm256_castsi256_si128(split_to_order(c)));
      } else if constexpr (kByteLanes) {
        store_first<2 * bits>(pack_split32<bits>(c), o);
      } else {
        const __m128i d = _mm256_castsi256_si128(squeeze(split_to_order(c)));
        if (o + 16 <= packed_end) {
          _mm_storeu_si128((__m128i*)o, d);
        } else {
          alignas(16) uint8_t bytes[16];
          _mm_store_si128((__m128i*)bytes, d);
          memcpy(o, bytes, 2 * bits);
        }
      }
    };
    if (k == 2 && nb % 2 == 0) {  // groups of 16: two groups per 32 codes
      for (int v = 0; v < nb * 2; v += 4) {
        __m256i q[4];
        for (int u = 0; u < 4; ++u) {
          const int j = (v + u) >> 1;
          q[u] = nearest8_unclamped(_mm256_loadu_ps(xb + 8 * (v + u)), _mm256_set1_ps(off_of[j]),
                                    _mm256_set1_ps(inv_of[j]));
        }
        store32(q[0], q[1], q[2], q[3], code_base + 8 * v);
      }
      return;
    }
    for (int j = 0; j < nb; ++j) {
      const float* xg = xb + j * group;
      const int64_t cg = code_base + j * group;
      const __m256 off = _mm256_set1_ps(off_of[j]), iv = _mm256_set1_ps(inv_of[j]);
      int64_t t = 0;
      for (; t + 4 <= k; t += 4)
        store32(nearest8_unclamped(_mm256_loadu_ps(xg + 8 * t), off, iv),
                nearest8_unclamped(_mm256_loadu_ps(xg + 8 * t + 8), off, iv),
                nearest8_unclamped(_mm256_loadu_ps(xg + 8 * t + 16), off, iv),
                nearest8_unclamped(_mm256_loadu_ps(xg + 8 * t + 24), off, iv), cg + 8 * t);
      if (t < k)  // k is even: two vectors left
        store16(nearest8_unclamped(_mm256_loadu_ps(xg + 8 * t), off, iv),
                nearest8_unclamped(_mm256_loadu_ps(xg + 8 * t + 8), off, iv), cg + 8 * t);
    }
  };
  // The next block's range and parameters before this block's codes (as
  // avx512::encode_groups_bits).
  for (int64_t g0 = -8, b = 1; g0 < n; g0 += 8, b ^= 1) {
    if (g0 + 8 < n) range_params(g0 + 8, off_of[b ^ 1], inv_of[b ^ 1]);
    if (g0 >= 0) codes_of(g0, off_of[b], inv_of[b]);
  }
  return _mm256_movemask_ps(bad) == 0;
}

// avx512::encode_groups_f32 (the AVX2 build).
inline bool encode_groups_f32(const float* x, int64_t n, int64_t group, int bits, float* scale_out, float* offset_out,
                              uint8_t* packed) {
  return with_width(bits, [&](auto width) {
    constexpr int B = decltype(width)::value;
    switch (group) {  // as avx512::encode_groups_f32
      case 16: return encode_groups_bits<B, 2>(x, n, group, scale_out, offset_out, packed);
      case 32: return encode_groups_bits<B, 4>(x, n, group, scale_out, offset_out, packed);
      case 64: return encode_groups_bits<B, 8>(x, n, group, scale_out, offset_out, packed);
      default: return encode_groups_bits<B, 0>(x, n, group, scale_out, offset_out, packed);
    }
  });
}

inline void decode_groups_f32(const uint8_t* codes, int64_t n, int64_t group, const float* scale, const float* offset,
                              float* out, bool stream) {
  const int64_t k = group / 8;
  stream = stream && ((uintptr_t)out & 31) == 0;  // then every group starts 32-byte aligned
  for (int64_t g = 0; g < n; ++g) {
    const __m256 off = _mm256_set1_ps(offset[g]), sc = _mm256_set1_ps(scale[g]);
    const uint8_t* c = codes + g * group;
    float* o = out + g * group;
    for (int64_t t = 0; t < k; ++t) {
      __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(c + 8 * t))));
      __m256 v = _mm256_add_ps(off, _mm256_mul_ps(q, sc));
      if (stream)
        _mm256_stream_ps(o + 8 * t, v);
      else
        _mm256_storeu_ps(o + 8 * t, v);
    }
  }
  if (stream) _mm_sfence();
}

// decode_groups_f32 straight from packed codes of width B: unpack8's lanes
// go to floats as they are (as decode_groups_f32 would from their bytes).
template <int B>
inline void decode_groups_packed(const uint8_t* packed, int64_t n, int64_t group, const float* scale,
                                 const float* offset, float* out, bool stream, const uint8_t* readable_end) {
  const int64_t k = group / 8;                                    // units of 8 codes (B bytes) per group
  const int64_t room = readable_end - packed;                     // bytes that may be read from packed on
  const int64_t wide_units = room >= 8 ? (room - 8) / B + 1 : 0;  // units u with u * B + 8 <= room
  stream = stream && ((uintptr_t)out & 31) == 0;
  for (int64_t g = 0; g < n; ++g) {
    const __m256 off = _mm256_set1_ps(offset[g]), sc = _mm256_set1_ps(scale[g]);
    float* o = out + g * group;
    const int64_t u0 = g * k;
    auto codes_to_floats = [&](auto wide) FLOCORA_INLINE {
      auto unit = [&](int64_t t) FLOCORA_INLINE {
        const uint8_t* c = packed + (u0 + t) * B;
        const __m256i q = decltype(wide)::value || u0 + t < wide_units ? unpack8<B, true>(c) : unpack8<B, false>(c);
        const __m256 v = _mm256_add_ps(off, _mm256_mul_ps(_mm256_cvtepi32_ps(q), sc));
        if (stream)
          _mm256_stream_ps(o + 8 * t, v);
        else
          _mm256_storeu_ps(o + 8 * t, v);
      };
      for (int64_t t = 0; t < k; t += 2) {  // k is even; two units a turn (one left some widths 40% slower)
        unit(t);
        unit(t + 1);
      }
    };
    // A choice per unit made even widths 70% slower (the branch, not the loads).
    if (u0 + k <= wide_units)
      codes_to_floats(std::true_type{});
    else
      codes_to_floats(std::false_type{});
  }
  if (stream) _mm_sfence();
}
inline void decode_groups_packed_f32(const uint8_t* packed, int bits, int64_t n, int64_t group, const float* scale,
                                     const float* offset, float* out, bool stream, const uint8_t* readable_end) {
  with_width(bits, [&](auto width) {
    constexpr int B = decltype(width)::value;
    if constexpr (B < 8) decode_groups_packed<B>(packed, n, group, scale, offset, out, stream, readable_end);
    return 0;
  });
}

inline void half_to_float(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + i))));
  scalar::half_to_float(src + i, n - i, dst + i);
}
inline void float_to_half(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128((__m128i*)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  scalar::float_to_half(src + i, n - i, dst + i);
}

inline QuantLoops loops() {
  QuantLoops t = scalar::loops();
  t.minmax = minmax;
  t.params = params;
  t.quantize_nearest = quantize_nearest;
  t.quantize_stochastic = quantize_stochastic;
  // clang-format off: a table, one row per four widths
  t.pack[1] = pack<1>; t.pack[2] = pack<2>; t.pack[3] = pack<3>; t.pack[4] = pack<4>;
  t.pack[5] = pack<5>; t.pack[6] = pack<6>; t.pack[7] = pack<7>;
  t.unpack[1] = unpack<1>; t.unpack[2] = unpack<2>; t.unpack[3] = unpack<3>; t.unpack[4] = unpack<4>;
  t.unpack[5] = unpack<5>; t.unpack[6] = unpack<6>; t.unpack[7] = unpack<7>;
  // clang-format on
  t.dequantize = dequantize;
  t.half_to_float = half_to_float;
  t.float_to_half = float_to_half;
  t.encode_groups_f32 = encode_groups_f32;
  t.decode_groups_f32 = decode_groups_f32;
  t.decode_groups_packed_f32 = decode_groups_packed_f32;
  return t;
}

}  // namespace avx2
#pragma GCC pop_options
#endif

#if defined(FLOCORA_X86) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx2,f16c")
namespace avx512 {

inline __mmask16 tail16(int64_t n) { return (__mmask16)((1u << n) - 1); }  // n < 16

// Min/max are exact in any order (see avx2::minmax); 32 lanes per step.
inline bool minmax(const float* x, int64_t n, float* lo, float* hi) {
  if (n < 16) return avx2::minmax(x, n, lo, hi);
  const __m512 zero = _mm512_setzero_ps();
  __m512 mn0 = _mm512_loadu_ps(x), mx0 = mn0, mn1 = mn0, mx1 = mn0;
  __mmask16 bad = 0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
    bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(a, a), zero, _CMP_NEQ_UQ);  // NaN exactly for NaN and +-Inf
    bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(b, b), zero, _CMP_NEQ_UQ);
    mn0 = _mm512_min_ps(a, mn0);
    mx0 = _mm512_max_ps(a, mx0);
    mn1 = _mm512_min_ps(b, mn1);
    mx1 = _mm512_max_ps(b, mx1);
  }
  if (i + 16 <= n) {
    __m512 a = _mm512_loadu_ps(x + i);
    bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(a, a), zero, _CMP_NEQ_UQ);
    mn0 = _mm512_min_ps(a, mn0);
    mx0 = _mm512_max_ps(a, mx0);
    i += 16;
  }
  if (i < n) {  // the last 16 elements again: re-reading some is harmless for min/max
    __m512 a = _mm512_loadu_ps(x + n - 16);
    bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(a, a), zero, _CMP_NEQ_UQ);
    mn1 = _mm512_min_ps(a, mn1);
    mx1 = _mm512_max_ps(a, mx1);
  }
  *lo = _mm512_reduce_min_ps(_mm512_min_ps(mn0, mn1));
  *hi = _mm512_reduce_max_ps(_mm512_max_ps(mx0, mx1));
  return bad == 0;
}

// The same operations as flocora::quantize_nearest (avx2::nearest8), 16 lanes.
inline __m512i nearest16(__m512 x, __m512 off, __m512 inv, __m512 lev) {
  const __m512 magic = _mm512_set1_ps(8388608.0f);
  __m512 v = _mm512_mul_ps(_mm512_sub_ps(x, off), inv);
  v = _mm512_min_ps(_mm512_max_ps(v, _mm512_setzero_ps()), lev);  // max(NaN,0)=0 as clamp_levels
  v = _mm512_sub_ps(_mm512_add_ps(v, magic), magic);
  return _mm512_cvttps_epi32(v);
}

inline void quantize_nearest(const float* x, int64_t n, const AffineParams& p, float levels, uint8_t* codes) {
  const __m512 off = _mm512_set1_ps(p.offset), inv = _mm512_set1_ps(p.inv_scale), lev = _mm512_set1_ps(levels);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m128i a = _mm512_cvtepi32_epi8(nearest16(_mm512_loadu_ps(x + i), off, inv, lev));
    __m128i b = _mm512_cvtepi32_epi8(nearest16(_mm512_loadu_ps(x + i + 16), off, inv, lev));
    _mm256_storeu_si256((__m256i*)(codes + i), _mm256_set_m128i(b, a));
  }
  for (; i + 16 <= n; i += 16)
    _mm_storeu_si128((__m128i*)(codes + i), _mm512_cvtepi32_epi8(nearest16(_mm512_loadu_ps(x + i), off, inv, lev)));
  if (i < n) {
    __mmask16 m = tail16(n - i);
    __m512i q = nearest16(_mm512_maskz_loadu_ps(m, x + i), off, inv, lev);
    _mm_mask_storeu_epi8(codes + i, m, _mm512_cvtepi32_epi8(q));
  }
}

inline __m512i mix32x16(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x7feb352du));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x846ca68bu));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

// avx2::stochastic8, 16 lanes.
inline __m512i stochastic16(__m512 x, __m512i idx, __m512i key, __m512 off, __m512 inv, __m512 lev) {
  __m512 v = _mm512_mul_ps(_mm512_sub_ps(x, off), inv);
  v = _mm512_min_ps(_mm512_max_ps(v, _mm512_setzero_ps()), lev);
  __m512i fl_i = _mm512_cvttps_epi32(v);
  __m512 frac = _mm512_sub_ps(v, _mm512_cvtepi32_ps(fl_i));
  __m512i h = mix32x16(_mm512_add_epi32(mix32x16(_mm512_xor_si512(idx, key)), key));
  __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(h, 8)), _mm512_set1_ps(5.9604644775390625e-8f));
  __mmask16 up = _mm512_cmp_ps_mask(u, frac, _CMP_LT_OQ);
  __m512i q = _mm512_mask_add_epi32(fl_i, up, fl_i, _mm512_set1_epi32(1));
  return _mm512_min_epi32(q, _mm512_cvttps_epi32(lev));
}

inline void quantize_stochastic(const float* x, int64_t n, const AffineParams& p, float levels, uint32_t key,
                                uint32_t index_lo, uint8_t* codes) {
  const __m512 off = _mm512_set1_ps(p.offset), inv = _mm512_set1_ps(p.inv_scale), lev = _mm512_set1_ps(levels);
  const __m512i k = _mm512_set1_epi32((int)key);
  const __m512i step = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int)(index_lo + (uint32_t)i)), step);
    _mm_storeu_si128((__m128i*)(codes + i),
                     _mm512_cvtepi32_epi8(stochastic16(_mm512_loadu_ps(x + i), idx, k, off, inv, lev)));
  }
  if (i < n) {
    __mmask16 m = tail16(n - i);
    __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int)(index_lo + (uint32_t)i)), step);
    __m512i q = stochastic16(_mm512_maskz_loadu_ps(m, x + i), idx, k, off, inv, lev);
    _mm_mask_storeu_epi8(codes + i, m, _mm512_cvtepi32_epi8(q));
  }
}

// Constants of squeeze64 for width B (1..7).
struct Squeeze {
  __m512i pair, quad, low;
  __m128i shift;
  explicit Squeeze(int B)
      // unsigned multipliers times signed codes (codes < 2^7 fit; 2^7 does not fit a signed byte)
      : pair(_mm512_set1_epi16((short)(1 | (1 << B) << 8))),
        quad(_mm512_set1_epi32(1 | (1 << (2 * B)) << 16)),
        low(_mm512_set1_epi64((long long)((1ull << (4 * B)) - 1))),
        shift(_mm_cvtsi32_si128(32 - 4 * B)) {}
};

// 64 codes -> 8*B bytes: two multiply-adds join neighbours (pairs into
// 16-bit lanes, then quads into 32-bit lanes), a shift and a bit select join
// the two halves of each 64-bit lane (8 codes, 8*B bits); the caller's byte
// permute then gathers the low B bytes of the 8 lanes. Codes must be < 2^B.
inline __m512i squeeze64(__m512i c, const Squeeze& s) {
  __m512i d = _mm512_madd_epi16(_mm512_maddubs_epi16(s.pair, c), s.quad);  // 4 codes per 32-bit lane, 4B bits
  __m512i hi = _mm512_srl_epi64(d, s.shift);                               // the upper lane's codes from bit 4B on
  return _mm512_ternarylogic_epi64(d, hi, s.low, 0xE4);                    // c ? a : b
}
// squeeze64 of 16 codes (the low 128 bits).
inline __m128i squeeze16(__m128i c, const Squeeze& s) {
  __m128i d = _mm_madd_epi16(_mm_maddubs_epi16(_mm512_castsi512_si128(s.pair), c), _mm512_castsi512_si128(s.quad));
  return _mm_ternarylogic_epi64(d, _mm_srl_epi64(d, s.shift), _mm512_castsi512_si128(s.low), 0xE4);
}

template <int B>
inline __m512i gather_packed_bytes() {
  alignas(64) uint8_t perm[64];
  for (int k = 0; k < 64; ++k) perm[k] = (uint8_t)(k < 8 * B ? (k / B) * 8 + k % B : 0);
  return _mm512_load_si512((const void*)perm);
}

template <int B>
inline void pack(const uint8_t* codes, int64_t n, uint8_t* dst) {
  static_assert(B >= 1 && B <= 7, "8-bit codes are stored as they are");
  const Squeeze sq(B);
  const __m512i gather = gather_packed_bytes<B>();
  const __mmask64 keep = (__mmask64)((1ull << (8 * B)) - 1);
  int64_t i = 0;
  // Full 64-byte stores while the bytes past this unit's 8*B are still ours
  // (the next units overwrite them); masked stores only at the end.
  for (; i + 64 <= n && (i / 8) * B + 64 <= (n / 8) * B; i += 64) {
    __m512i c = _mm512_loadu_si512((const void*)(codes + i));
    _mm512_storeu_si512((void*)(dst + (i / 8) * B), _mm512_permutexvar_epi8(gather, squeeze64(c, sq)));
  }
  for (; i + 64 <= n; i += 64) {
    __m512i c = _mm512_loadu_si512((const void*)(codes + i));
    _mm512_mask_storeu_epi8(dst + (i / 8) * B, keep, _mm512_permutexvar_epi8(gather, squeeze64(c, sq)));
  }
  scalar::pack<B>(codes + i, n - i, dst + (i / 8) * B);
}

// 16 codes of flocora::quantize_nearest with float32 metadata, before the
// clamp to `levels`: rounding (x - offset) * inv_scale to nearest even in one
// conversion equals clamping then rounding (the bounds are integers), and
// the value is never below 0 (x >= offset). NaN converts to 0x80000000.
inline __m512i nearest16_unclamped(__m512 x, __m512 off, __m512 inv) {
  return _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_sub_ps(x, off), inv),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// Byte permutes that finish encode_groups_f32's code units, per width:
// `unit[B]` takes the 8*B packed bytes of 64 codes out of a squeezed vector,
// `single[B]` the 2*B bytes of 16 (0x80: a zero byte).
struct PackedUnitTables {
  alignas(64) uint8_t unit[9][64];
  alignas(16) uint8_t single[9][16];
};
inline const PackedUnitTables& packed_unit_tables() {
  static const PackedUnitTables tables = [] {
    PackedUnitTables t{};
    for (int b = 1; b <= 8; ++b) {
      for (int o = 0; o < (b == 1 ? 64 : 8 * b); ++o) {
        if (b == 1) {
          // store64 puts one-bit codes in order, still bytes, and takes
          // their mask. Byte 16*lane + 4*u + w of the packs' layout holds
          // code 16*u + 4*lane + w.
          const int u = o / 16, lane = o % 16 / 4, w = o % 4;
          t.unit[b][o] = (uint8_t)(16 * lane + 4 * u + w);
        } else if (b == 2 || b == 4) {
          // Byte o holds codes 8/b * o on, whose byte the multiply-adds
          // left at the start of their 32- or 16-bit lane: that of the
          // first, at 16*lane + 4*u + w (code 16*u + 4*lane + w).
          const int code = 8 / b * o, u = code / 16, lane = code % 16 / 4, w = code % 4;
          t.unit[b][o] = (uint8_t)(16 * lane + 4 * u + w);
        } else if (b % 2 == 0) {
          // Width 6 squeezes the packs' interleaved layout as it is: 4
          // codes are b/2 whole bytes, so runs of 4 land in whole bytes
          // and this permute puts them in order. Byte 16*lane + 4*u + w of
          // the layout holds code 16*u + 4*lane + w (see store64).
          const int half = b / 2, run = o / half, w = o % half, u = run / 4, lane = run % 4;
          t.unit[b][o] = (uint8_t)((2 * lane + u / 2) * 8 + (u % 2) * half + w);
        } else {
          t.unit[b][o] = (uint8_t)((o / b) * 8 + o % b);  // as gather_packed_bytes
        }
      }
      for (int o = 0; o < 16; ++o) t.single[b][o] = (uint8_t)(o < 2 * b ? (o / b) * 8 + o % b : 0x80);
    }
    return t;
  }();
  return tables;
}

// encode_groups_f32 of one width; kFixed: the vectors per group, when the
// caller fixes them (0: group / 16).
template <int bits, int kFixed>
inline bool encode_groups_bits(const float* x, int64_t n, int64_t group, float* scale_out, float* offset_out,
                               uint8_t* packed) {
  const int64_t k = kFixed > 0 ? kFixed : group / 16;  // vectors per group
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  const __m512 levels = _mm512_set1_ps((float)((1 << bits) - 1)), fmin = _mm512_set1_ps(kFloatMinNormal);
  const __m512i lev = _mm512_set1_epi32((1 << bits) - 1);
  const __m512i lev8 = _mm512_set1_epi8((char)((1 << bits) - 1));
  // Puts the 4-lane runs the two packs interleave in order (odd widths).
  const __m512i runs = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const PackedUnitTables& tables = packed_unit_tables();
  const __m512i unit_gather = _mm512_load_si512((const void*)tables.unit[bits]);
  const __m128i single_gather = _mm_load_si128((const __m128i*)tables.single[bits]);
  const Squeeze sq(bits < 8 ? bits : 1);
  constexpr bool odd = bits % 2 == 1, squeeze = bits < 8;
  const __mmask64 unit_keep = bits == 8 ? ~(__mmask64)0 : (__mmask64)((1ull << (8 * bits)) - 1);
  const __mmask16 single_keep = (__mmask16)((1u << (2 * bits)) - 1);
  const uint8_t* const packed_end = packed + (uint64_t)(n * group) / 8 * bits;  // group is a multiple of 16
  __mmask16 bad = 0;
  __m512i raw_or = _mm512_setzero_si512();         // sign bit set iff some value was NaN
  alignas(64) float off_of[2][16], inv_of[2][16];  // this block's and the next's
  struct Range16 {
    __m512 lo, hi;
  };
  // Range and parameters of the 16 groups from g0 on (stores their scale
  // and offset).
  auto range_params = [&](int64_t g0, float* off_out, float* inv_out) FLOCORA_INLINE {
    const int nb = (int)std::min<int64_t>(16, n - g0);
    const float* xb = x + g0 * group;
    // Range of each group in registers, merged as the groups come into one
    // transposing reduction: four rounds of 128-bit, 128-bit, 32-bit and
    // 64-bit shuffles halve the vectors and double the groups per vector.
    // Taking group (s % 4) * 4 + s / 4 as slot s makes lane g of the result
    // group g without a last permute.
    Range16 first{};
    auto leaf = [&](int s) FLOCORA_INLINE -> Range16 {
      const int j = (s % 4) * 4 + s / 4;
      if (j >= nb) return first;  // unused slots repeat group 0 (slot 0, done first)
      const float* xg = xb + j * group;
      // 8 KiB (two blocks) ahead: reads stay in flight while this block's
      // codes are computed (the hardware prefetcher alone left encode at ~70%
      // of copy_ past the caches; beyond the input's end a prefetch is a
      // no-op). From the L3, one Zen 5 core, 4 bits: 21.6 cycles a group
      // against 23.3 at 16 KiB ahead (means of 8 runs; 32 KiB: 24-31, 4 KiB:
      // 21-25, a T1 or NTA hint: no better).
      for (int64_t t = 0; t < k; ++t) _mm_prefetch((const char*)(xg + 16 * t + 2048), _MM_HINT_T0);
      __m512 a = _mm512_loadu_ps(xg), mn0 = a, mx0 = a, mn1 = a, mx1 = a;
      int64_t t = 1;
      for (; t + 2 <= k; t += 2) {
        __m512 b = _mm512_loadu_ps(xg + 16 * t), c = _mm512_loadu_ps(xg + 16 * t + 16);
        mn0 = _mm512_min_ps(mn0, b);
        mx0 = _mm512_max_ps(mx0, b);
        mn1 = _mm512_min_ps(mn1, c);
        mx1 = _mm512_max_ps(mx1, c);
      }
      if (t < k) {
        __m512 b = _mm512_loadu_ps(xg + 16 * t);
        mn0 = _mm512_min_ps(mn0, b);
        mx0 = _mm512_max_ps(mx0, b);
      }
      Range16 r{_mm512_min_ps(mn0, mn1), _mm512_max_ps(mx0, mx1)};
      if (j == 0) first = r;
      return r;
    };
    auto level1 = [&](int s) FLOCORA_INLINE {  // slots s, s + 1
      Range16 a = leaf(s), b = leaf(s + 1);
      return Range16{_mm512_min_ps(_mm512_shuffle_f32x4(a.lo, b.lo, 0x44), _mm512_shuffle_f32x4(a.lo, b.lo, 0xEE)),
                     _mm512_max_ps(_mm512_shuffle_f32x4(a.hi, b.hi, 0x44), _mm512_shuffle_f32x4(a.hi, b.hi, 0xEE))};
    };
    auto level2 = [&](int s) FLOCORA_INLINE {  // slots s .. s + 3
      Range16 a = level1(s), b = level1(s + 2);
      return Range16{_mm512_min_ps(_mm512_shuffle_f32x4(a.lo, b.lo, 0x88), _mm512_shuffle_f32x4(a.lo, b.lo, 0xDD)),
                     _mm512_max_ps(_mm512_shuffle_f32x4(a.hi, b.hi, 0x88), _mm512_shuffle_f32x4(a.hi, b.hi, 0xDD))};
    };
    auto level3 = [&](int s) FLOCORA_INLINE {  // slots s .. s + 7
      Range16 a = level2(s), b = level2(s + 4);
      return Range16{_mm512_min_ps(_mm512_unpacklo_ps(a.lo, b.lo), _mm512_unpackhi_ps(a.lo, b.lo)),
                     _mm512_max_ps(_mm512_unpacklo_ps(a.hi, b.hi), _mm512_unpackhi_ps(a.hi, b.hi))};
    };
    Range16 y0 = level3(0), y1 = level3(8);
    auto level4 = [](__m512 a, __m512 b, bool is_min) FLOCORA_INLINE {
      __m512 lo = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
      __m512 hi = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
      return is_min ? _mm512_min_ps(lo, hi) : _mm512_max_ps(lo, hi);
    };
    const __m512 group_lo = level4(y0.lo, y1.lo, true), group_hi = level4(y0.hi, y1.hi, false);
    // affine_params of 16 groups (as avx2::params, 16 lanes).
    __m512 o = _mm512_add_ps(group_lo, zero);
    __m512 range = _mm512_sub_ps(_mm512_add_ps(group_hi, zero), o);
    const __mmask16 valid = (__mmask16)((1u << nb) - 1);
    bad |= valid & (_mm512_cmp_ps_mask(_mm512_sub_ps(range, range), zero, _CMP_NEQ_UQ) |
                    _mm512_cmp_ps_mask(_mm512_sub_ps(o, o), zero, _CMP_NEQ_UQ));
    __m512 scale = _mm512_div_ps(range, levels);
    scale = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(scale, fmin, _CMP_GE_OQ), scale);
    __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(scale, zero, _CMP_GT_OQ), one, scale);
    if (nb == 16) {  // masked stores to lines not yet cached slowed the loop past the caches
      _mm512_storeu_ps(scale_out + g0, scale);
      _mm512_storeu_ps(offset_out + g0, o);
    } else {
      _mm512_mask_storeu_ps(scale_out + g0, valid, scale);
      _mm512_mask_storeu_ps(offset_out + g0, valid, o);
    }
    _mm512_store_ps(off_out, o);
    _mm512_store_ps(inv_out, inv);
  };
  auto codes_of = [&](int64_t g0, const float* off_of, const float* inv_of) FLOCORA_INLINE {
    const int nb = (int)std::min<int64_t>(16, n - g0);
    const float* xb = x + g0 * group;
    // Codes, while the block is still in L1, packed on the way out. Widths
    // 1, 2, 4 and 8 store exactly their bytes; at the others, the bytes a
    // full store writes past its unit belong to later units of this call,
    // which overwrite them, and only stores near the end are masked.
    const int64_t code_base = g0 * group;  // code index of the block's first value
    auto store64 = [&](__m512i q0, __m512i q1, __m512i q2, __m512i q3, int64_t code) FLOCORA_INLINE {
      // Byte 16*lane + 4*u + w: code 16*u + 4*lane + w. Codes are clamped
      // as bytes (one op for 64 codes). The first pack saturates signed, so
      // a NaN's 0x80000000 stays negative (-32768) for one check of 64
      // codes; the second maps it to 0.
      const __m512i q01 = _mm512_packs_epi32(q0, q1), q23 = _mm512_packs_epi32(q2, q3);
      raw_or = _mm512_ternarylogic_epi32(raw_or, q01, q23, 0xFE);  // a | b | c
      __m512i c = _mm512_packus_epi16(q01, q23);
      if constexpr (bits < 8) c = _mm512_min_epu8(c, lev8);
      uint8_t* dst = packed + ((uint64_t)code >> 3) * bits;
      if constexpr (bits == 1) {  // codes in order, one bit each
        c = _mm512_permutexvar_epi8(unit_gather, c);
        const uint64_t mask = _mm512_test_epi8_mask(c, c);
        memcpy(dst, &mask, 8);
        return;
      }
      if constexpr (bits == 4) {
        c = _mm512_maddubs_epi16(sq.pair, c);  // neighbours' byte in each 16-bit lane (the permute gathers them)
      } else if constexpr (bits == 2) {
        c = _mm512_madd_epi16(_mm512_maddubs_epi16(sq.pair, c), sq.quad);  // 4 codes' byte in each 32-bit lane
      } else {
        if constexpr (odd)
          c = _mm512_permutexvar_epi32(runs, c);  // 4 odd-width codes end mid-byte: squeeze them in order
        if constexpr (squeeze) c = squeeze64(c, sq);
      }
      c = _mm512_permutexvar_epi8(unit_gather, c);
      // Exact stores where a register part holds 8*bits bytes.
      if constexpr (bits == 8) {
        _mm512_storeu_si512((void*)dst, c);
      } else if constexpr (bits == 4) {
        _mm256_storeu_si256((__m256i*)dst, _mm512_castsi512_si256(c));
      } else if constexpr (bits == 2) {
        _mm_storeu_si128((__m128i*)dst, _mm512_castsi512_si128(c));
      } else if (dst + 64 <= packed_end) {
        _mm512_storeu_si512((void*)dst, c);
      } else {
        _mm512_mask_storeu_epi8(dst, unit_keep, c);
      }
    };
    auto store16 = [&](__m512i q, int64_t code) FLOCORA_INLINE {
      raw_or = _mm512_or_si512(raw_or, q);
      __m128i c = _mm512_cvtepi32_epi8(_mm512_min_epu32(q, lev));
      if constexpr (squeeze) c = _mm_shuffle_epi8(squeeze16(c, sq), single_gather);
      _mm_mask_storeu_epi8(packed + ((uint64_t)code >> 3) * bits, single_keep, c);
    };
    if (k <= 2 && (nb * k) % 4 == 0) {  // groups of 16 or 32: 4 or 2 groups per 64 codes
      const int shift = k == 2 ? 1 : 0;
      for (int v = 0; v < nb * k; v += 4) {
        __m512i q[4];
        for (int u = 0; u < 4; ++u) {
          const int j = (v + u) >> shift;
          q[u] = nearest16_unclamped(_mm512_loadu_ps(xb + 16 * (v + u)), _mm512_set1_ps(off_of[j]),
                                     _mm512_set1_ps(inv_of[j]));
        }
        store64(q[0], q[1], q[2], q[3], code_base + 16 * v);
      }
      return;
    }
    for (int j = 0; j < nb; ++j) {
      const float* xg = xb + j * group;
      const int64_t cg = code_base + j * group;
      const __m512 off = _mm512_set1_ps(off_of[j]), iv = _mm512_set1_ps(inv_of[j]);
      int64_t t = 0;
      for (; t + 4 <= k; t += 4)
        store64(nearest16_unclamped(_mm512_loadu_ps(xg + 16 * t), off, iv),
                nearest16_unclamped(_mm512_loadu_ps(xg + 16 * t + 16), off, iv),
                nearest16_unclamped(_mm512_loadu_ps(xg + 16 * t + 32), off, iv),
                nearest16_unclamped(_mm512_loadu_ps(xg + 16 * t + 48), off, iv), cg + 16 * t);
      for (; t < k; ++t) store16(nearest16_unclamped(_mm512_loadu_ps(xg + 16 * t), off, iv), cg + 16 * t);
    }
  };
  // The next block's range and parameters before this block's codes: their
  // long chain of shuffles and divisions then overlaps the codes. (One call
  // site each, so that both stay inlined.)
  for (int64_t g0 = -16, b = 1; g0 < n; g0 += 16, b ^= 1) {
    if (g0 + 16 < n) range_params(g0 + 16, off_of[b ^ 1], inv_of[b ^ 1]);
    if (g0 >= 0) codes_of(g0, off_of[b], inv_of[b]);
  }
  return bad == 0 && _mm512_movepi16_mask(raw_or) == 0;  // (store16 ors 32-bit lanes: their sign is a 16-bit one)
}

// Range, parameters, codes and packing in one pass: the packed bytes of each
// 64 codes go straight to `packed` (no code buffer in between). The common
// groups get loops of a fixed length: with k known, the range's loads and the
// codes unroll whole, and the counters and branches of short runtime loops go
// (group 64: 22 -> 17 cycles per group on Zen 5, group 16: 1.35x faster).
inline bool encode_groups_f32(const float* x, int64_t n, int64_t group, int bits, float* scale_out, float* offset_out,
                              uint8_t* packed) {
  return with_width(bits, [&](auto width) {
    constexpr int B = decltype(width)::value;
    switch (group) {
      case 16: return encode_groups_bits<B, 1>(x, n, group, scale_out, offset_out, packed);
      case 32: return encode_groups_bits<B, 2>(x, n, group, scale_out, offset_out, packed);
      case 64: return encode_groups_bits<B, 4>(x, n, group, scale_out, offset_out, packed);
      default: return encode_groups_bits<B, 0>(x, n, group, scale_out, offset_out, packed);
    }
  });
}

// 64 codes from 8*B bytes: a byte permute gives 64-bit lane u the bytes
// u*B.., then a multishift takes byte j of each lane from bit j*B on.
template <int B>
inline void unpack(const uint8_t* src, int64_t n, uint8_t* codes) {
  alignas(64) uint8_t perm[64], shift[64];
  for (int k = 0; k < 64; ++k) {
    perm[k] = (uint8_t)((k / 8) * B + k % 8);  // <= 7B + 7 < 64
    shift[k] = (uint8_t)((k % 8) * B);
  }
  const __m512i spread = _mm512_load_si512((const void*)perm), ctrl = _mm512_load_si512((const void*)shift);
  const __m512i mask = _mm512_set1_epi8((char)((1 << B) - 1));
  const __mmask64 take = (__mmask64)((1ull << (8 * B)) - 1);
  int64_t i = 0;
  const int64_t nbytes = (n * B + 7) / 8;
  for (; i + 64 <= n; i += 64) {
    const uint8_t* s = src + (i / 8) * B;
    __m512i v = (i / 8) * B + 64 <= nbytes ? _mm512_loadu_si512((const void*)s) : _mm512_maskz_loadu_epi8(take, s);
    v = _mm512_multishift_epi64_epi8(ctrl, _mm512_permutexvar_epi8(spread, v));
    _mm512_storeu_si512((void*)(codes + i), _mm512_and_si512(v, mask));
  }
  scalar::unpack<B>(src + (i / 8) * B, n - i, codes + i);
}

// Masked loads and stores only for the tail: full-width masked stores are
// slow on some cores (a 4-bit decode of 64 MiB ran at half the AVX2 speed).
inline void dequantize(const uint8_t* codes, int64_t n, float offset, float scale, float* out) {
  const __m512 off = _mm512_set1_ps(offset), sc = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(codes + i))));
    _mm512_storeu_ps(out + i, _mm512_add_ps(off, _mm512_mul_ps(q, sc)));
  }
  if (i < n) {
    __mmask16 m = tail16(n - i);
    __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, codes + i)));
    _mm512_mask_storeu_ps(out + i, m, _mm512_add_ps(off, _mm512_mul_ps(q, sc)));
  }
}

inline void decode_groups_f32(const uint8_t* codes, int64_t n, int64_t group, const float* scale, const float* offset,
                              float* out, bool stream) {
  const int64_t k = group / 16;
  stream = stream && ((uintptr_t)out & 63) == 0;  // then every group starts 64-byte aligned
  for (int64_t g = 0; g < n; ++g) {
    const __m512 off = _mm512_set1_ps(offset[g]), sc = _mm512_set1_ps(scale[g]);
    const uint8_t* c = codes + g * group;
    float* o = out + g * group;
    for (int64_t t = 0; t < k; ++t) {
      __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(c + 16 * t))));
      __m512 v = _mm512_add_ps(off, _mm512_mul_ps(q, sc));
      if (stream)
        _mm512_stream_ps(o + 16 * t, v);
      else
        _mm512_storeu_ps(o + 16 * t, v);
    }
  }
  if (stream) _mm_sfence();  // streaming stores are weakly ordered: visible before the task ends
}

inline void half_to_float(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(src + i))));
  if (i < n) {
    __mmask16 m = tail16(n - i);
    _mm512_mask_storeu_ps(dst + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, src + i)));
  }
}
inline void float_to_half(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256((__m256i*)(dst + i), _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  if (i < n) {
    __mmask16 m = tail16(n - i);
    _mm256_mask_storeu_epi16(dst + i, m, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, src + i), _MM_FROUND_TO_NEAREST_INT));
  }
}

inline QuantLoops loops() {
  QuantLoops t = avx2::loops();  // params (per group, not per element) stays AVX2
  t.minmax = minmax;
  t.quantize_nearest = quantize_nearest;
  t.quantize_stochastic = quantize_stochastic;
  t.pack[1] = pack<1>;
  t.pack[2] = pack<2>;
  t.pack[3] = pack<3>;
  t.pack[4] = pack<4>;
  t.pack[5] = pack<5>;
  t.pack[6] = pack<6>;
  t.pack[7] = pack<7>;
  t.unpack[1] = unpack<1>;
  t.unpack[2] = unpack<2>;
  t.unpack[3] = unpack<3>;
  t.unpack[4] = unpack<4>;
  t.unpack[5] = unpack<5>;
  t.unpack[6] = unpack<6>;
  t.unpack[7] = unpack<7>;
  t.dequantize = dequantize;
  t.half_to_float = half_to_float;
  t.float_to_half = float_to_half;
  t.encode_groups_f32 = encode_groups_f32;
  t.decode_groups_f32 = decode_groups_f32;
  // Its own unpack and decode_groups_f32 beat the AVX2 fused loop (0.51-0.56
  // against 0.66 ns per 8 values, one core, in cache).
  t.decode_groups_packed_f32 = nullptr;
  return t;
}

}  // namespace avx512
#pragma GCC pop_options
#endif

// ---- instruction-set dispatch ----------------------------------------------------
// One state for the whole extension (inline: shared by every file that
// includes this header). -1: pick the best this CPU supports; 0: scalar;
// 1: AVX2; 2: AVX-512. Tests force each one the CPU has (flocora::_set_cpu_isa).
inline std::atomic<int> g_isa_override{-1};

inline bool cpu_has_avx2() {
#if defined(FLOCORA_X86) && defined(__GNUC__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

inline bool cpu_has_avx512() {
#if defined(FLOCORA_X86) && defined(__GNUC__)
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi");
  return has;
#else
  return false;
#endif
}

// The instruction set `level` (-1: the best) gives on this CPU: 0, 1 or 2.
inline int cpu_isa_for(int level) {
  int best = cpu_has_avx512() ? 2 : (cpu_has_avx2() ? 1 : 0);
  return level < 0 ? best : (level < best ? level : best);
}

// The loops of instruction set `isa` (0, 1 or 2; one this CPU runs).
inline const QuantLoops& loops_at(int isa) {
  static const QuantLoops scalar_loops = scalar::loops();
#if defined(FLOCORA_X86) && defined(__GNUC__)
  static const QuantLoops avx2_loops = avx2::loops();
  static const QuantLoops avx512_loops = avx512::loops();
  switch (isa) {
    case 2: return avx512_loops;
    case 1: return avx2_loops;
    default: break;
  }
#endif
  return scalar_loops;
}

// The instruction set in use and its loops.
inline int cpu_isa() { return cpu_isa_for(g_isa_override.load(std::memory_order_relaxed)); }
inline const QuantLoops& loops() { return loops_at(cpu_isa()); }

// Inputs or outputs of a call at least this large stream from and to memory
// rather than the caches: the L3 of the machines measured. A fixed size, as
// sysconf's L3 size is the host's in a VM (384 MiB on the one measured).
constexpr int64_t kPastCachesBytes = 32ll << 20;

// Work split of both quant kernels: tasks of about kQuantChunk elements over
// all tensors of a call. A task is ~10 us of work; waking a second thread for
// fewer than kTasksPerThreadMin tasks costs more than it saves (much more
// when the cores are busy with training).
constexpr int64_t kQuantChunk = 16384;
constexpr int64_t kTasksPerThreadMin = 4;

}  // namespace cpu
}  // namespace flocora
