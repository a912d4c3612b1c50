// CPU kernel of topk_encode (schema: csrc/ops.cpp; argument checks and
// output layout: csrc/include/flocora/host_checks.h; index codes:
// csrc/include/flocora/affine.h; bit streams: bitstream.h).
//
// Selection is a radix select over the magnitude keys (IEEE bits without the
// sign, monotonic in |x|), never a sort. The threshold T and the number of
// ties to keep are found digit by digit (11 + 10 + 10 bits):
//   phase 1  per chunk: histogram of the top digit (fits in L1), merged into
//            the group's histogram; NaN/Inf show up in its top bins. Groups
//            of kSampleMin elements or more histogram every kSampleStride-th
//            element only, on 13 key bits, for a bracket of keys around T.
//   phase 2  per chunk: the keys of the threshold's top-digit bucket (or of
//            the bracket) are copied out (a small fraction of the data); the
//            rest of the select runs on those candidates only. A bracket is
//            checked by the counts and redone from a full histogram if it
//            misses T; the largest key of each chunk catches NaN/Inf there.
//   phase 3  per chunk: from its candidates alone, the number of keys > T and
//            == T; a prefix sum over chunks then fixes each chunk's output
//            slice and its share of the ties (ties go to the lowest index).
//   phase 4  per chunk: emit values and the index code (bitmap bytes, or the
//            Elias-Fano low/high bit streams, written from batches of kept
//            positions) straight into the outputs.
// So the input is read three times, and nothing is allocated in hot loops.
// A tensor of at most kSingleMax elements (per-tensor scope) is a "single":
// one task does its whole selection, so a LoRA state dict of many small
// tensors costs one parallel region, whose tasks threads claim largest first.
// A single of kSingleSampleMin elements or more with an Elias-Fano code (the
// densities sparsification uses) takes a bracket from a sample as above,
// then reads x once more: the bits and positions of its keys above the
// bracket's bottom are staged (a small share of x), the select runs on those
// within the bracket, and the emit reads the stage, not x. Other singles
// histogram all their keys (stored to a private buffer) and select from them.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <vector>

#include <flocora/affine.h>
#include <flocora/host_checks.h>

#include "bitstream.h"
#include "quant_loops.h"
#include "topk_common.h"

namespace flocora {
namespace cpu {

namespace {

constexpr int64_t kChunk = 1 << 16;                   // elements per selection task (multiple of kBlock)
constexpr int kBlock = 16;                            // elements per compare mask
constexpr int64_t kFlagWords = kChunk / kBlock / 64;  // block flags per chunk
constexpr int kTopShift = 20;                         // top digit: key bits 20..30 (bit 31 is the sign, cleared)
constexpr int kTopBins = 2048;
constexpr uint32_t kNonFiniteTop = 0x7f800000u >> kTopShift;  // top bins of Inf and NaN
// Elias-Fano coded singles from kSingleSampleMin on are sampled and staged
// (ResNet-18 adapter set, per tensor 10%, 2 threads: 0.26 -> 0.13 ms; 1%:
// 0.19 -> 0.10 ms); bitmap coded ones (dense) are not: staging a third of x
// or more cost more than reading it again. A single may have up to
// kSingleMax elements: phased, a tensor cost five parallel regions, and even
// alone it is faster on one thread (2^17 elements, 2 threads, phased against
// single: 10% 90 -> 53 us, 30% 87 -> 80 us; at 200k elements, with buffers
// of 12 bytes an element past the L2, phased wins).
constexpr int64_t kSingleMax = 1 << 17;
constexpr int64_t kSingleSampleMin = 2048;
constexpr int64_t kSmallSelect = 256;  // candidates few enough for nth_element
// Groups of at least kSampleMin elements histogram every kSampleStride-th
// element only, and take the candidates of a bracket of top-digit bins
// around the sample's estimate of the threshold (checked: a bracket that
// misses is redone from a full histogram). From 2^16 on (every group of a
// per-tensor selection): a full histogram costs about a cycle per element
// in scalar increments, where the sample's and the vector candidate pass
// cost a fraction (ResNet-18 adapter set, per tensor 10%: 282 -> 268 us).
constexpr int64_t kSampleMin = 1 << 16;
constexpr int64_t kSampleStride = 8;
// The sample's histogram takes 13 key bits (1/32 of an octave) instead of 11:
// a narrower bracket holds fewer candidates.
constexpr int kFineShift = 18;
constexpr int kFineBins = 8192;

// Loads N elements starting at i as float32 bits.
template <Dt D, int N>
FLOCORA_INLINE void load_bits_n(const void* x, int64_t i, int n, uint32_t* out) {
  const int m = N == kBlock ? kBlock : n;  // constant trip count for full blocks: vectorizes
  if (D == kF32) {
    const float* p = static_cast<const float*>(x) + i;
    for (int j = 0; j < m; ++j) out[j] = float_bits(p[j]);
  } else if (D == kF16) {
    const uint16_t* p = static_cast<const uint16_t*>(x) + i;
    for (int j = 0; j < m; ++j) out[j] = half_as_float_bits(p[j]);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(x) + i;
    for (int j = 0; j < m; ++j) out[j] = (uint32_t)p[j] << 16;
  }
}

// Loads n <= kBlock elements starting at i as float32 bits.
template <Dt D>
FLOCORA_INLINE void load_bits(const void* x, int64_t i, int n, uint32_t* out) {
  if (n == kBlock)
    load_bits_n<D, kBlock>(x, i, n, out);
  else
    load_bits_n<D, 0>(x, i, n, out);
}

// Magnitude keys of n <= kBlock elements; keys[n..kBlock) = 0.
template <Dt D>
FLOCORA_INLINE void load_keys(const void* x, int64_t i, int n, uint32_t* keys) {
  if (n == kBlock) {
    load_bits_n<D, kBlock>(x, i, n, keys);
    for (int j = 0; j < kBlock; ++j) keys[j] &= 0x7fffffffu;
    return;
  }
  load_bits_n<D, 0>(x, i, n, keys);
  for (int j = 0; j < n; ++j) keys[j] &= 0x7fffffffu;
  for (int j = n; j < kBlock; ++j) keys[j] = 0;
}

// Magnitude key of element i.
template <Dt D>
FLOCORA_INLINE uint32_t key_at(const void* x, int64_t i) {
  if (D == kF32) return float_bits(static_cast<const float*>(x)[i]) & 0x7fffffffu;
  if (D == kF16) return half_as_float_bits(static_cast<const uint16_t*>(x)[i]) & 0x7fffffffu;
  return (uint32_t)(static_cast<const uint16_t*>(x)[i] & 0x7fffu) << 16;
}

// Top-digit histogram of elements [begin, end) of x, added to hist; with
// Keep, the keys are also stored to keys_out[0..end-begin). Four interleaved
// sub-histograms for long ranges: neighbouring elements often share a bin,
// and one counter would serialize on its own increments.
// Returns the largest key.
template <Dt D, bool Keep, typename H>
uint32_t top_histogram_into(const void* x, int64_t begin, int64_t end, H* hist, uint32_t* keys_out) {
  uint32_t mx = 0;
  if (end - begin < 8192) {  // small: not worth clearing and summing sub-histograms
    for (int64_t i = begin; i < end; ++i) {
      uint32_t k = key_at<D>(x, i);
      if (Keep) keys_out[i - begin] = k;
      mx = std::max(mx, k);
      ++hist[k >> kTopShift];
    }
    return mx;
  }
  uint32_t sub[4][kTopBins];
  std::memset(sub, 0, sizeof(sub));
  int64_t i = begin;
  for (; i + 4 <= end; i += 4) {
    uint32_t k0 = key_at<D>(x, i), k1 = key_at<D>(x, i + 1), k2 = key_at<D>(x, i + 2), k3 = key_at<D>(x, i + 3);
    if (Keep) {
      keys_out[i - begin] = k0;
      keys_out[i - begin + 1] = k1;
      keys_out[i - begin + 2] = k2;
      keys_out[i - begin + 3] = k3;
    }
    ++sub[0][k0 >> kTopShift];
    ++sub[1][k1 >> kTopShift];
    ++sub[2][k2 >> kTopShift];
    ++sub[3][k3 >> kTopShift];
  }
  for (; i < end; ++i) {
    uint32_t k = key_at<D>(x, i);
    if (Keep) keys_out[i - begin] = k;
    ++sub[0][k >> kTopShift];
  }
  int top = 0;
  for (int b = 0; b < kTopBins; ++b) {
    uint32_t c = sub[0][b] + sub[1][b] + sub[2][b] + sub[3][b];
    hist[b] += (H)c;
    top = c ? b : top;
  }
  return (uint32_t)top << kTopShift;  // the top digit of the largest key is all the callers use
}

// Histogram of the top 13 key bits of every kSampleStride-th element of [begin, end), added to hist.
template <Dt D>
void sampled_histogram_into(const void* x, int64_t begin, int64_t end, uint32_t* hist) {
  for (int64_t i = begin; i < end; i += kSampleStride) ++hist[key_at<D>(x, i) >> kFineShift];
}

// Histogram of the top 13 key bits of every kSampleStride-th element of
// x[0..n), added to hist; returns the highest bin it touched (bins above it
// stay as they were) and sets *lowest to the lowest one.
template <Dt D>
int sampled_histogram_span(const void* x, int64_t n, uint32_t* hist, int* lowest) {
  uint32_t lo = kFineBins - 1, hi = 0;
  for (int64_t i = 0; i < n; i += kSampleStride) {
    const uint32_t b = key_at<D>(x, i) >> kFineShift;
    ++hist[b];
    lo = std::min(lo, b);
    hi = std::max(hi, b);
  }
  *lowest = (int)lo;
  return (int)hi;
}

// The candidates' bracket (lo, hi] around T, the k-th largest of n keys, from
// a histogram h of `sample` of them (every kSampleStride-th) on fine bins, no
// bin above `top` non-empty. T's rank in the sample is about r = k * sample /
// n, with a standard deviation below sqrt(r): bins whose sample counts above
// them stay under r - 5 sd hold fewer than k keys, and down to r + 5 sd, at
// least k. Probable, not certain: the callers check it by the counts.
template <typename H>
void sample_bracket(const H* h, int top, int64_t k, int64_t sample, int64_t n, int32_t* lo, int32_t* hi) {
  const double r = (double)k * (double)sample / (double)n, margin = 5.0 * std::sqrt(r) + 16.0;
  int64_t cum = 0;
  int b = top;
  *hi = 0x7fffffff;
  for (bool hi_found = false; b > 0; --b) {
    cum += (int64_t)h[b];
    if (!hi_found && (double)cum >= r - margin) {
      *hi = (int32_t)(((uint32_t)b << kFineShift) | ((1u << kFineShift) - 1));
      hi_found = true;
    }
    if ((double)cum >= r + margin) break;
  }
  *lo = (int32_t)((uint32_t)b << kFineShift) - 1;  // -1 for bin 0: every key
}

// Bit j set iff keys[j] > t, for 16 keys (signed compare: keys are < 2^31,
// and t may be -1 to mean "every key").
FLOCORA_INLINE uint32_t gt_mask(const uint32_t* keys, int32_t t) {
#if defined(__SSE2__)
  __m128i tv = _mm_set1_epi32(t);
  uint32_t m = 0;
  for (int q = 0; q < 4; ++q) {
    __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(keys + 4 * q));
    m |= (uint32_t)_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(v, tv))) << (4 * q);
  }
  return m;
#else
  uint32_t m = 0;
  for (int j = 0; j < kBlock; ++j) m |= (uint32_t)((int32_t)keys[j] > t) << j;
  return m;
#endif
}

inline uint32_t valid_mask(int n) { return n >= 32 ? 0xffffffffu : ((1u << n) - 1u); }

// ---- encode plan ---------------------------------------------------------------
struct EncTensor : TopkOutput {  // + where its values and index code go
  const void* x;
  Dt dt;
  int64_t n;
};

struct Group {  // one selection: a tensor (per-tensor scope) or all tensors
  int64_t k;
  int64_t first_chunk, nchunks;
  int64_t need;  // rank of T among the candidates
  int64_t cand_base, cand_count;
  uint32_t t;            // threshold key
  int64_t ties;          // keys == T to keep
  int64_t n = 0;         // elements
  bool sampled = false;  // phase 1 histogrammed a sample: the bracket may miss T
  int32_t lo, hi;        // candidates: keys with lo < key <= hi
};

struct Chunk {
  int32_t tensor, group;
  int64_t begin, end;
  int64_t above_top;  // keys whose top digit is above the group's
  int64_t cand_off, cand_cnt;
  int64_t above, eq;  // keys > T and == T
  int64_t rank0, share, out_cnt;
};

// The passes that touch every element or candidate after the histograms
// (compaction, candidates, emit): generic, AVX2 and AVX-512 builds of one
// source, picked at run time like the quantization loops.
#define FLOCORA_TOPK_LOOPS generic_loops
#define FLOCORA_TOPK_ISA 0
#include "topk_loops.h"
#undef FLOCORA_TOPK_ISA
#undef FLOCORA_TOPK_LOOPS
#if defined(FLOCORA_X86) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,popcnt,bmi,bmi2")
#define FLOCORA_TOPK_LOOPS avx2_loops
#define FLOCORA_TOPK_ISA 1
#include "topk_loops.h"
#undef FLOCORA_TOPK_ISA
#undef FLOCORA_TOPK_LOOPS
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,popcnt,bmi,bmi2")
#define FLOCORA_TOPK_LOOPS avx512_loops
#define FLOCORA_TOPK_ISA 2
#include "topk_loops.h"
#undef FLOCORA_TOPK_ISA
#undef FLOCORA_TOPK_LOOPS
#pragma GCC pop_options
#endif

// The instruction set in use: 0 generic, 1 AVX2, 2 AVX-512 (tests force each one).
int topk_isa() { return cpu_isa(); }

#if defined(FLOCORA_X86) && defined(__GNUC__)
#define FLOCORA_TOPK_DISPATCH(isa, call)       \
  do {                                         \
    if ((isa) == 2) return avx512_loops::call; \
    if ((isa) == 1) return avx2_loops::call;   \
    return generic_loops::call;                \
  } while (0)
#else
#define FLOCORA_TOPK_DISPATCH(isa, call) return generic_loops::call
#endif

template <Dt D>
int64_t top_candidates(int isa, const void* x, int64_t begin, int64_t end, int32_t lo, int32_t hi, uint32_t* stage,
                       int64_t* above, uint32_t* max_key, uint64_t* flags) {
  FLOCORA_TOPK_DISPATCH(isa, top_candidates<D>(x, begin, end, lo, hi, stage, above, max_key, flags));
}

template <Dt D>
void emit_range(int isa, const EncTensor& t, int64_t begin, int64_t end, uint32_t thr, int64_t ties, int64_t rank0,
                float* vals, uint8_t* idx, const uint64_t* flags) {
  FLOCORA_TOPK_DISPATCH(isa, emit_range<D>(t, begin, end, thr, ties, rank0, vals, idx, flags));
}

template <Dt D>
int64_t stage_above(int isa, const void* x, int64_t n, int32_t lo, int32_t hi, uint32_t* bits_out, int32_t* pos_out,
                    int64_t* above, uint32_t* max_key) {
  FLOCORA_TOPK_DISPATCH(isa, stage_above<D>(x, n, lo, hi, bits_out, pos_out, above, max_key));
}

int64_t bracket_keys(int isa, const uint32_t* bits, int64_t m, int32_t hi, uint32_t* keys) {
  FLOCORA_TOPK_DISPATCH(isa, bracket_keys(bits, m, hi, keys));
}

void emit_staged(int isa, const EncTensor& t, const uint32_t* bits, const int32_t* pos, int64_t m, uint32_t thr,
                 int64_t ties, float* vals, uint8_t* idx) {
  FLOCORA_TOPK_DISPATCH(isa, emit_staged(t, bits, pos, m, thr, ties, vals, idx));
}

void keys_f32(int isa, const float* x, int64_t n, uint32_t* keys, uint32_t* lo, uint32_t* hi) {
  FLOCORA_TOPK_DISPATCH(isa, keys_f32(x, n, keys, lo, hi));
}

// top_histogram_into with Keep, for a whole float32 tensor, from a vector
// pass that stores the keys and finds their smallest and largest: only the
// bins between those two are cleared and summed (a single's values span a
// few octaves, a few dozen of the 2048 bins), and the increments read the
// stored keys. hist must be zero. Returns the largest key.
uint32_t single_histogram_f32(int isa, const float* x, int64_t n, int64_t* hist, uint32_t* keys) {
  uint32_t lo = 0, hi = 0;
  keys_f32(isa, x, n, keys, &lo, &hi);
  if (n == 0) return 0;
  const int b0 = (int)(lo >> kTopShift), b1 = (int)(hi >> kTopShift);
  if (n < 8192) {  // small: one histogram (as top_histogram_into)
    for (int64_t i = 0; i < n; ++i) ++hist[keys[i] >> kTopShift];
    return hi;
  }
  uint32_t sub[4][kTopBins];  // only [b0, b1] of each is used
  for (auto& h : sub) std::fill(h + b0, h + b1 + 1, 0u);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    ++sub[0][keys[i] >> kTopShift];
    ++sub[1][keys[i + 1] >> kTopShift];
    ++sub[2][keys[i + 2] >> kTopShift];
    ++sub[3][keys[i + 3] >> kTopShift];
  }
  for (; i < n; ++i) ++sub[0][keys[i] >> kTopShift];
  for (int b = b0; b <= b1; ++b) hist[b] += (int64_t)sub[0][b] + sub[1][b] + sub[2][b] + sub[3][b];
  return hi;
}

// Keeps keys[0..m) whose digit (key >> s) & mask is b, in order, in place;
// returns how many. keys has room for m + kBlock.
int64_t keep_bucket(int isa, uint32_t* keys, int64_t m, int s, uint32_t mask, uint32_t b) {
  FLOCORA_TOPK_DISPATCH(isa, keep_bucket(keys, m, s, mask, b));
}

// ---- radix select -------------------------------------------------------------
// Digit d of a key: d = 0 bits 20..30, d = 1 bits 10..19, d = 2 bits 0..9.
constexpr int kShift[3] = {20, 10, 0};
constexpr int kBins[3] = {2048, 1024, 1024};

// Scans a histogram from the top bin down for the bin holding the need-th
// largest key; *need becomes its rank inside that bin.
// highest: a bin at or above the highest non-empty one.
int top_bin(const int64_t* hist, int highest, int64_t* need) {
  int64_t cum = 0;
  int b = highest;
  for (; b > 0; --b) {
    if (cum + hist[b] >= *need) break;
    cum += hist[b];
  }
  *need -= cum;
  return b;
}

// T, the need-th largest of keys[0..m), and *ties (as select_inplace) by nth_element.
uint32_t select_small(uint32_t* keys, int64_t m, int64_t need, int64_t* ties) {
  std::nth_element(keys, keys + (need - 1), keys + m, std::greater<uint32_t>());
  const uint32_t t = keys[need - 1];
  int64_t above = 0;
  for (int64_t i = 0; i < m; ++i) above += keys[i] > t;
  *ties = need - above;
  return t;
}

// keys[0..m) agree on every digit above d; 1 <= need <= m. Returns T, the
// need-th largest key, and *ties = need - #(keys > T): the number of keys
// equal to T that belong to the top `need`. Compacts keys in place.
// first_hist: the histogram of digit d when the caller has it already.
// first_top: a bin at or above the highest non-empty one of first_hist.
uint32_t select_inplace(int isa, uint32_t* keys, int64_t m, int64_t need, int d, const int64_t* first_hist,
                        int first_top, int64_t* ties) {
  int64_t hist[kTopBins];
  for (; d < 3; ++d) {
    if (m <= kSmallSelect) return select_small(keys, m, need, ties);
    const int s = kShift[d];
    const uint32_t mask = (uint32_t)kBins[d] - 1;
    const int64_t* h = first_hist;
    int highest = first_hist ? first_top : kBins[d] - 1;
    if (h == nullptr) {
      std::fill(hist, hist + kBins[d], 0);
      uint32_t top = 0;  // the scan starts here, not at the last of 2048 bins
      for (int64_t i = 0; i < m; ++i) {
        const uint32_t bin = (keys[i] >> s) & mask;
        ++hist[bin];
        top = std::max(top, bin);
      }
      h = hist;
      highest = (int)top;
    }
    first_hist = nullptr;
    const uint32_t b = (uint32_t)top_bin(h, highest, &need);
    m = keep_bucket(isa, keys, m, s, mask, b);
  }
  *ties = need;  // all m keys are equal now
  return keys[0];
}

// As select_inplace, for keys[0..m) that all lie in [lo, hi] (a sampled
// bracket, which spans a few fine bins, not whole digits): each round's digit
// is the bits that tell the keys of the current range apart (up to 11, fewer
// for fewer keys), counted in four interleaved sub-histograms cleared over
// that range only (candidates crowd into few bins: one counter per bin
// serialized on its increments).
uint32_t select_in_range(int isa, uint32_t* keys, int64_t m, int64_t need, uint32_t lo, uint32_t hi, int64_t* ties) {
  uint32_t sub[4][kTopBins];
  while (m > kSmallSelect) {
    if (lo == hi) {  // every key equal
      *ties = need;
      return keys[0];
    }
    // About m / 8 bins (at most 2048): the scan over the bins stays cheaper
    // than the counting, and the next round gets a few keys per bin.
    const uint32_t max_bins = (uint32_t)std::min<int64_t>(kTopBins, std::max<int64_t>(64, m / 8));
    int s = 0;
    while ((hi >> s) - (lo >> s) >= max_bins) ++s;
    const uint32_t base = lo >> s;
    const int nb = (int)((hi >> s) - base) + 1;
    for (auto& h : sub) std::fill(h, h + nb, 0u);
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
      ++sub[0][(keys[i] >> s) - base];
      ++sub[1][(keys[i + 1] >> s) - base];
      ++sub[2][(keys[i + 2] >> s) - base];
      ++sub[3][(keys[i + 3] >> s) - base];
    }
    for (; i < m; ++i) ++sub[0][(keys[i] >> s) - base];
    int64_t cum = 0;
    int b = nb - 1;
    for (; b > 0; --b) {
      const int64_t c = (int64_t)sub[0][b] + sub[1][b] + sub[2][b] + sub[3][b];
      if (cum + c >= need) break;
      cum += c;
    }
    need -= cum;
    m = keep_bucket(isa, keys, m, s, 0xffffffffu, base + (uint32_t)b);
    lo = (base + (uint32_t)b) << s;
    hi = lo | ((1u << s) - 1);  // s == 0: lo == hi, the loop's first test ends it
  }
  return select_small(keys, m, need, ties);
}

// As select_in_range, but leaves src intact (phase 3 counts each chunk's
// candidates there afterwards). Candidates crowd into a few bins of a fixed
// digit (a sampled bracket spans about one top-digit bin), where one counter
// per bin serialized on its increments: 18 us, against 4 now, for the 8.5k
// candidates of a global 10% of the ResNet-18 adapter set.
uint32_t select_copy_in_range(int isa, const uint32_t* src, int64_t m, int64_t need, uint32_t lo, uint32_t hi,
                              int64_t* ties) {
  std::unique_ptr<uint32_t[]> keys(new uint32_t[m + kBlock]);  // + keep_bucket's overhang
  std::copy(src, src + m, keys.get());
  return select_in_range(isa, keys.get(), m, need, lo, hi, ties);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode_cpu(at::TensorList xs, at::IntArrayRef ks,
                                                               bool global_scope) {
  const char* op = "flocora::topk_encode";
  const int64_t nt = (int64_t)xs.size();
  int isa = topk_isa();
  const TopkInput in = topk_encode_input(op, xs, ks, global_scope, [&](const at::Tensor& x, size_t i) {
    TORCH_CHECK(x.device().is_cpu(), op, ": tensor ", i, " is on ", x.device(),
                "; all tensors of one call must be on the CPU");
  });
  std::vector<at::Tensor> keep;
  std::vector<EncTensor> ts(nt);
  keep.reserve(nt);
  for (int64_t i = 0; i < nt; ++i) {
    ts[i].dt = in.dt[i];
    keep.push_back(xs[i].contiguous());  // row-major logical order
    ts[i].x = keep.back().data_ptr();
    ts[i].n = in.numel[i];
  }
  // Past the caches the AVX2 passes read memory faster than the AVX-512 ones
  // (as the quantization loops; 2 threads, 1% of 64 MiB: 4.5 against 6.8 ms).
  int64_t input_bytes = 0;
  for (const EncTensor& t : ts) input_bytes += t.n * (t.dt == kF32 ? 4 : 2);
  if (isa == 2 && input_bytes >= kPastCachesBytes) isa = 1;

  // Groups and chunks. Per-tensor scope: a tensor of at most kSingleMax
  // elements is one self-contained task ("single"); larger ones are phased
  // groups.
  std::vector<Group> groups;
  std::vector<Chunk> chunks;
  std::vector<int32_t> singles;
  auto add_chunks = [&](int32_t ti, int32_t g) {
    for (int64_t b = 0; b < ts[ti].n; b += kChunk) {
      Chunk c{};
      c.tensor = ti;
      c.group = g;
      c.begin = b;
      c.end = std::min(ts[ti].n, b + kChunk);
      chunks.push_back(c);
    }
  };
  if (global_scope) {
    groups.push_back(Group{ks[0], 0, 0, 0, 0, 0, 0, 0});
    for (int32_t i = 0; i < nt; ++i) add_chunks(i, 0);
    groups[0].nchunks = (int64_t)chunks.size();
  } else {
    for (int32_t i = 0; i < nt; ++i) {
      if (ts[i].n == 0) continue;
      if (ts[i].n <= kSingleMax) {
        singles.push_back(i);
        continue;
      }
      Group g{ks[i], (int64_t)chunks.size(), 0, 0, 0, 0, 0, 0};
      add_chunks(i, (int32_t)groups.size());
      g.nchunks = (int64_t)chunks.size() - g.first_chunk;
      groups.push_back(g);
    }
  }

  std::vector<int64_t> sample_n(groups.size(), 0);  // elements a sampled group's histogram counts
  for (const Chunk& c : chunks) {
    groups[c.group].n += c.end - c.begin;
    sample_n[c.group] += (c.end - c.begin + kSampleStride - 1) / kSampleStride;
  }
  std::vector<int32_t> fine_of(groups.size(), -1);  // a sampled group's row of fine_hist
  int32_t nsampled = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    Group& gr = groups[g];
    gr.sampled = gr.k > 0 && gr.n >= kSampleMin && 2 * gr.k <= gr.n;
    if (gr.sampled) fine_of[g] = nsampled++;
  }
  std::vector<int64_t> fine_hist((size_t)nsampled * kFineBins, 0);

  at::Tensor counts = at::empty({nt}, at::TensorOptions().dtype(at::kLong));
  int64_t* counts_p = counts.data_ptr<int64_t>();
  at::Tensor values, index;
  // Offsets, codes and outputs, once every count is known.
  auto layout = [&]() {
    std::vector<int64_t> cnt(nt);
    for (int64_t i = 0; i < nt; ++i) cnt[i] = ts[i].count;
    std::vector<TopkOutput> out;
    int64_t nvalues = 0, nbytes = 0;
    topk_output_layout(in.numel, cnt, &out, &nvalues, &nbytes);
    for (int64_t i = 0; i < nt; ++i) {
      static_cast<TopkOutput&>(ts[i]) = out[i];
      counts_p[i] = ts[i].count;
    }
    values = at::empty({nvalues}, at::TensorOptions().dtype(at::kFloat));
    index = at::zeros({nbytes}, at::TensorOptions().dtype(at::kByte));  // the bit writers OR into zeros
  };
  if (!global_scope) {
    for (int64_t i = 0; i < nt; ++i) ts[i].count = ks[i];
    layout();
  }

  bool nonfinite = false;  // written only as true, read after the regions
  int64_t max_single = 0;
  for (int32_t i : singles) max_single = std::max(max_single, ts[i].n);

  // ---- phase 1: single tensors end to end, top-digit histograms of chunks.
  std::vector<int64_t> ghist(groups.size() * kTopBins, 0);
  {
    const int64_t nsingle = (int64_t)singles.size();
    std::vector<int64_t> cost(nsingle + chunks.size());
    // A single runs the whole selection (histogram, select, emit: about 3x a
    // chunk's histogram pass) plus a fixed cost per task.
    for (int64_t s = 0; s < nsingle; ++s) cost[s] = 3 * ts[singles[s]].n + 64;
    for (size_t c = 0; c < chunks.size(); ++c)
      cost[nsingle + c] =
          (chunks[c].end - chunks[c].begin) / (groups[chunks[c].group].sampled ? kSampleStride : 1) + 64;
    float* vals_base = values.defined() ? values.data_ptr<float>() : nullptr;
    uint8_t* idx_base = index.defined() ? index.data_ptr<uint8_t>() : nullptr;
    run_claimed(cost, [&](const auto& take) {
      // A single tensor's keys, compacted by the select (uninitialized: every
      // use writes before it reads, and zeroing it cost a few us a call).
      std::unique_ptr<uint32_t[]> keys;
      std::unique_ptr<uint32_t[]> single_fine;  // a sampled single's fine histogram
      std::unique_ptr<uint32_t[]> stage_bits;   // and its elements above the bracket's bottom
      std::unique_ptr<int32_t[]> stage_pos;
      int64_t h64[kTopBins];
      // Chunks of one group that a thread claims one after another add up
      // here and reach the shared histogram once: a merge per chunk (the many
      // small tensors of a global top-k, all one group) cost more than their
      // histograms, in contended atomics.
      int64_t acc[kTopBins];
      int32_t acc_group = -1;
      std::unique_ptr<uint32_t[]> fine_acc;  // the same for sampled groups, allocated when one comes
      auto flush = [&]() {
        if (acc_group < 0) return;
        if (groups[acc_group].sampled) {
          int64_t* fh = fine_hist.data() + (int64_t)fine_of[acc_group] * kFineBins;
          for (int b = 0; b < kFineBins; ++b)
            if (fine_acc[b]) __atomic_fetch_add(fh + b, (int64_t)fine_acc[b], __ATOMIC_RELAXED);
        } else {
          int64_t* gh = ghist.data() + (int64_t)acc_group * kTopBins;
          for (int b = 0; b < kTopBins; ++b)
            if (acc[b]) __atomic_fetch_add(gh + b, acc[b], __ATOMIC_RELAXED);
        }
        acc_group = -1;
      };
      for (int64_t task; (task = take()) >= 0;) {
        if (task >= nsingle) {
          const Chunk& c = chunks[task - nsingle];
          const EncTensor& t = ts[c.tensor];
          const bool sampled = groups[c.group].sampled;
          if (c.group != acc_group) {
            flush();
            if (!sampled) {
              std::fill(acc, acc + kTopBins, 0);
            } else {
              if (!fine_acc) fine_acc.reset(new uint32_t[kFineBins]);  // counts of < 2^32 samples
              std::fill(fine_acc.get(), fine_acc.get() + kFineBins, 0u);
            }
            acc_group = c.group;
          }
          if (sampled) {  // non-finite keys are caught by phase 2's largest key
            dispatch_dt(
                t.dt, [&](auto d) { sampled_histogram_into<decltype(d)::value>(t.x, c.begin, c.end, fine_acc.get()); });
            continue;
          }
          uint32_t mx = 0;
          dispatch_dt(t.dt, [&](auto d) {
            mx = top_histogram_into<decltype(d)::value, false>(t.x, c.begin, c.end, acc, nullptr);
          });
          if ((mx >> kTopShift) >= kNonFiniteTop) __atomic_store_n(&nonfinite, true, __ATOMIC_RELAXED);
          continue;
        }
        const EncTensor& t = ts[singles[task]];
        if (!keys) keys.reset(new uint32_t[max_single + kBlock]);  // + keep_bucket's and the stores' overhang
        if (t.count > 0 && t.n >= kSingleSampleMin && t.code == kIndexEliasFano) {
          // As a sampled group, in one task: a bracket from a sample, the
          // elements above its bottom staged, the select on the bracket's
          // keys, the emit from the stage.
          if (!single_fine) {
            single_fine.reset(new uint32_t[kFineBins]());  // kept zero between tensors
            stage_bits.reset(new uint32_t[max_single + kBlock]);
            stage_pos.reset(new int32_t[max_single + kBlock]);
          }
          int low_bin = 0, top_bin_seen = 0;
          dispatch_dt(t.dt, [&](auto d) {
            top_bin_seen = sampled_histogram_span<decltype(d)::value>(t.x, t.n, single_fine.get(), &low_bin);
          });
          int32_t lo = 0, hi = 0;
          sample_bracket(single_fine.get(), top_bin_seen, t.count, (t.n + kSampleStride - 1) / kSampleStride, t.n, &lo,
                         &hi);
          std::fill(single_fine.get() + low_bin, single_fine.get() + top_bin_seen + 1, 0u);
          int64_t above = 0, staged = 0;
          uint32_t max_key = 0;
          dispatch_dt(t.dt, [&](auto d) {
            staged = stage_above<decltype(d)::value>(isa, t.x, t.n, lo, hi, stage_bits.get(), stage_pos.get(), &above,
                                                     &max_key);
          });
          if (max_key >= 0x7f800000u) {
            __atomic_store_n(&nonfinite, true, __ATOMIC_RELAXED);
            continue;
          }
          if (above < t.count && staged >= t.count) {  // T is in the bracket
            const int64_t cand = bracket_keys(isa, stage_bits.get(), staged, hi, keys.get());
            int64_t ties = 0;
            const uint32_t thr =
                select_in_range(isa, keys.get(), cand, t.count - above, (uint32_t)(lo + 1), (uint32_t)hi, &ties);
            emit_staged(isa, t, stage_bits.get(), stage_pos.get(), staged, thr, ties, vals_base + t.voff,
                        idx_base + t.ioff);
            continue;
          }
          // The bracket missed T: the full histogram below.
        }
        std::fill(h64, h64 + kTopBins, 0);
        uint32_t mx = 0;
        if (t.dt == kF32)
          mx = single_histogram_f32(isa, static_cast<const float*>(t.x), t.n, h64, keys.get());
        else
          dispatch_dt(t.dt,
                      [&](auto d) { mx = top_histogram_into<decltype(d)::value, true>(t.x, 0, t.n, h64, keys.get()); });
        if ((mx >> kTopShift) >= kNonFiniteTop) {
          __atomic_store_n(&nonfinite, true, __ATOMIC_RELAXED);
          continue;
        }
        if (t.count == 0) continue;
        int64_t ties = 0;
        uint32_t thr = select_inplace(isa, keys.get(), t.n, t.count, 0, h64, (int)(mx >> kTopShift), &ties);
        dispatch_dt(t.dt, [&](auto d) {
          emit_range<decltype(d)::value>(isa, t, 0, t.n, thr, ties, 0, vals_base + t.voff, idx_base + t.ioff, nullptr);
        });
      }
      flush();
    });
  }
  check_finite_input(op, nonfinite);

  // The top-digit bins of each group's candidates, and room for them.
  auto exact_bin = [&](size_t g) {  // the bin of T, from a full histogram
    Group& gr = groups[g];
    gr.need = gr.k;
    const uint32_t b = (uint32_t)top_bin(ghist.data() + g * kTopBins, kTopBins - 1, &gr.need);
    gr.lo = (int32_t)(b << kTopShift) - 1;  // -1 for bin 0: every key
    gr.hi = (int32_t)((b << kTopShift) | ((1u << kTopShift) - 1));
    gr.cand_count = ghist[g * kTopBins + b];
  };
  int64_t ncand = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    Group& gr = groups[g];
    gr.cand_base = ncand;
    if (gr.k == 0) continue;
    if (!gr.sampled) {
      exact_bin(g);
      ncand += gr.cand_count;
      continue;
    }
    sample_bracket(fine_hist.data() + (int64_t)fine_of[g] * kFineBins, kFineBins - 1, gr.k, sample_n[g], gr.n, &gr.lo,
                   &gr.hi);
    gr.cand_count = gr.n;  // a bound until phase 2 counts them
    ncand += gr.n;
  }

  // ---- phase 2: candidates (keys in the groups' candidate bins) per chunk.
  // Uninitialized: a sampled group reserves room for all its elements and
  // touches only the pages its candidates fill.
  std::unique_ptr<uint32_t[]> cands(new uint32_t[ncand + 1]);
  std::vector<uint64_t> flags(chunks.size() * kFlagWords);  // blocks worth emitting, per chunk
  std::vector<int64_t> cursor(groups.size(), 0);
  std::vector<uint32_t> chunk_max(chunks.size(), 0);  // largest key of each chunk
  auto stage_candidates = [&](const std::vector<char>& of_group) {
    std::vector<int64_t> cost(chunks.size());
    for (size_t c = 0; c < chunks.size(); ++c)
      cost[c] = groups[chunks[c].group].k && of_group[chunks[c].group] ? chunks[c].end - chunks[c].begin : 0;
    run_balanced(cost, [&](int64_t first, int64_t last) {
      // a chunk's candidates, before its slice is known (uninitialized: zeroing
      // 256 KiB per call cost more than a small message's candidates)
      std::unique_ptr<uint32_t[]> stage(new uint32_t[kChunk + kBlock]);  // + a vector store's overhang
      for (int64_t ci = first; ci < last; ++ci) {
        Chunk& c = chunks[ci];
        const Group& g = groups[c.group];
        if (g.k == 0 || !of_group[c.group]) continue;
        const EncTensor& t = ts[c.tensor];
        int64_t cnt = 0;
        dispatch_dt(t.dt, [&](auto d) {
          cnt = top_candidates<decltype(d)::value>(isa, t.x, c.begin, c.end, g.lo, g.hi, stage.get(), &c.above_top,
                                                   &chunk_max[ci], flags.data() + ci * kFlagWords);
        });
        c.cand_cnt = cnt;
        c.cand_off = g.cand_base + __atomic_fetch_add(&cursor[c.group], cnt, __ATOMIC_RELAXED);
        std::copy(stage.get(), stage.get() + cnt, cands.get() + c.cand_off);
      }
    });
  };
  stage_candidates(std::vector<char>(groups.size(), 1));
  for (uint32_t m : chunk_max) nonfinite |= m >= 0x7f800000u;  // sampled groups' first look at every key
  check_finite_input(op, nonfinite);

  // A sampled group's bracket holds T iff fewer than k keys lie above it and
  // at least k from its bottom up; else its candidates come again from the
  // bin of a full histogram.
  std::vector<char> redo(groups.size(), 0);
  bool any_redo = false;
  for (size_t g = 0; g < groups.size(); ++g) {
    Group& gr = groups[g];
    if (!gr.sampled) continue;
    int64_t above = 0, cand = 0;
    for (int64_t ci = gr.first_chunk; ci < gr.first_chunk + gr.nchunks; ++ci) {
      above += chunks[ci].above_top;
      cand += chunks[ci].cand_cnt;
    }
    if (above < gr.k && above + cand >= gr.k) {
      gr.need = gr.k - above;
      gr.cand_count = cand;
    } else {
      redo[g] = 1;
      any_redo = true;
    }
  }
  if (any_redo) {
    std::vector<int64_t> cost(chunks.size());
    for (size_t c = 0; c < chunks.size(); ++c) cost[c] = redo[chunks[c].group] ? chunks[c].end - chunks[c].begin : 0;
    for (size_t g = 0; g < groups.size(); ++g)
      if (redo[g]) std::fill(ghist.begin() + g * kTopBins, ghist.begin() + (g + 1) * kTopBins, 0);
    run_balanced(cost, [&](int64_t first, int64_t last) {
      int64_t acc[kTopBins];
      for (int64_t ci = first; ci < last; ++ci) {
        const Chunk& c = chunks[ci];
        if (!redo[c.group]) continue;
        std::fill(acc, acc + kTopBins, 0);
        dispatch_dt(ts[c.tensor].dt, [&](auto d) {
          top_histogram_into<decltype(d)::value, false>(ts[c.tensor].x, c.begin, c.end, acc, nullptr);
        });
        int64_t* gh = ghist.data() + (int64_t)c.group * kTopBins;
        for (int b = 0; b < kTopBins; ++b)
          if (acc[b]) __atomic_fetch_add(gh + b, acc[b], __ATOMIC_RELAXED);
      }
    });
    for (size_t g = 0; g < groups.size(); ++g) {
      if (!redo[g]) continue;
      exact_bin(g);
      cursor[g] = 0;
    }
    stage_candidates(redo);
  }

  // Threshold of each group from its candidates.
  std::vector<int64_t> gcost(groups.size());
  for (size_t g = 0; g < groups.size(); ++g) gcost[g] = groups[g].cand_count;
  run_balanced(gcost, [&](int64_t lo, int64_t hi) {
    for (int64_t g = lo; g < hi; ++g) {
      Group& gr = groups[g];
      if (gr.k == 0) continue;
      // Every candidate lies in (lo, hi]: a sampled bracket, or a top-digit bin (lo = -1: bin 0).
      gr.t = select_copy_in_range(isa, cands.get() + gr.cand_base, gr.cand_count, gr.need, (uint32_t)(gr.lo + 1),
                                  (uint32_t)gr.hi, &gr.ties);
    }
  });

  // ---- phase 3: each chunk's keys > T and == T, from its candidates alone.
  std::vector<int64_t> ccost(chunks.size());
  for (size_t c = 0; c < chunks.size(); ++c) ccost[c] = chunks[c].cand_cnt;
  run_balanced(ccost, [&](int64_t lo, int64_t hi) {
    for (int64_t ci = lo; ci < hi; ++ci) {
      Chunk& c = chunks[ci];
      const Group& g = groups[c.group];
      if (g.k == 0) continue;
      int64_t above = 0, eq = 0;
      const uint32_t* p = cands.get() + c.cand_off;
      for (int64_t i = 0; i < c.cand_cnt; ++i) {
        above += p[i] > g.t;
        eq += p[i] == g.t;
      }
      c.above = c.above_top + above;
      c.eq = eq;
    }
  });

  // Prefix sums: ties go to the earliest chunks; ranks restart per tensor.
  {
    std::vector<int64_t> running(nt, 0);
    for (Group& g : groups) {
      int64_t ties_left = g.k ? g.ties : 0;
      for (int64_t ci = g.first_chunk; ci < g.first_chunk + g.nchunks; ++ci) {
        Chunk& c = chunks[ci];
        if (g.k == 0) continue;
        c.share = std::min(c.eq, ties_left);
        ties_left -= c.share;
        c.out_cnt = c.above + c.share;
        c.rank0 = running[c.tensor];
        running[c.tensor] += c.out_cnt;
      }
      TORCH_INTERNAL_ASSERT(ties_left == 0, op, ": tie shares do not add up");
    }
    if (global_scope) {
      for (int64_t i = 0; i < nt; ++i) ts[i].count = running[i];
      layout();
    } else {
      for (const Group& g : groups) {
        const Chunk& c = chunks[g.first_chunk];
        TORCH_INTERNAL_ASSERT(running[c.tensor] == ts[c.tensor].count, op, ": selected ", running[c.tensor],
                              " elements of tensor ", c.tensor, ", expected ", ts[c.tensor].count);
      }
    }
  }

  // ---- phase 4: emit values and index codes.
  {
    float* vals_base = values.data_ptr<float>();
    uint8_t* idx_base = index.data_ptr<uint8_t>();
    std::vector<int64_t> cost(chunks.size());
    for (size_t c = 0; c < chunks.size(); ++c) cost[c] = chunks[c].out_cnt ? chunks[c].end - chunks[c].begin : 0;
    run_balanced(cost, [&](int64_t first, int64_t last) {
      for (int64_t ci = first; ci < last; ++ci) {
        const Chunk& c = chunks[ci];
        if (c.out_cnt == 0) continue;
        const Group& g = groups[c.group];
        const EncTensor& t = ts[c.tensor];
        dispatch_dt(t.dt, [&](auto d) {
          emit_range<decltype(d)::value>(isa, t, c.begin, c.end, g.t, c.share, c.rank0, vals_base + t.voff,
                                         idx_base + t.ioff, flags.data() + ci * kFlagWords);
        });
      }
    });
  }
  return {counts, values, index};
}

}  // namespace cpu
}  // namespace flocora

TORCH_LIBRARY_IMPL(flocora, CPU, m) { m.impl("topk_encode", &flocora::cpu::topk_encode_cpu); }
