// The per-element passes of topk_encode_cpu.cpp after the histograms: the
// select's bucket compaction, candidate staging (phase 2) and emitting values
// and index codes (phase 4). Included three times by that file, without an
// include guard, as namespaces generic_loops, avx2_loops and avx512_loops,
// the last two inside `#pragma GCC target(...)`, with FLOCORA_TOPK_ISA = 0, 1,
// 2 (g++ defines no __AVX2__ or __AVX512F__ for a pragma). AVX-512: float32
// blocks take one masked compare per 16 keys, and kept keys, values and
// positions are compressed in a register. AVX2: whole float32 blocks take two
// 8-key compares, and kept keys, values and positions are compressed 8 at a
// time through a permutation table. float16 and bfloat16 blocks, and the last
// part block, run the generic blocks (built for the target). Elias-Fano fields
// are written from batches of kept positions, not block by block. All give
// the same bytes (tests force each instruction set).
// Expects from the includer: kBlock, kChunk, kTopShift, load_keys, load_bits,
// gt_mask, valid_mask, EncTensor, FieldWriter, UnaryWriter, FLOCORA_INLINE,
// FLOCORA_LAMBDA_INLINE.

namespace FLOCORA_TOPK_LOOPS {

#if FLOCORA_TOPK_ISA == 2
// 16 float32 elements from i as bits (lanes past n zero) and their magnitude keys.
FLOCORA_INLINE __m512i load_block_f32(const void* x, int64_t i, __mmask16 valid, __m512i* keys) {
  __m512i b = _mm512_maskz_loadu_epi32(valid, static_cast<const float*>(x) + i);
  *keys = _mm512_and_si512(b, _mm512_set1_epi32(0x7fffffff));
  return b;
}

FLOCORA_INLINE __mmask16 lanes(int n) { return (__mmask16)(n >= 16 ? 0xffffu : ((1u << n) - 1u)); }
#endif

#if FLOCORA_TOPK_ISA == 1
// For each 8-bit mask, the lane numbers of its set bits, lowest first, one per nibble.
struct Compress8Table {
  uint32_t lanes[256];
  constexpr Compress8Table() : lanes() {
    for (int m = 0; m < 256; ++m) {
      uint32_t packed = 0;
      for (int j = 0, k = 0; j < 8; ++j)
        if ((m >> j) & 1) packed |= (uint32_t)j << (4 * k++);
      lanes[m] = packed;
    }
  }
};
constexpr Compress8Table kCompress8{};

// Bit j set iff lane j of the compare result c is set.
FLOCORA_INLINE uint32_t lane_mask(__m256i c) { return (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(c)); }

// The lanes of v selected by the 8-bit mask m, moved to the front (the rest undefined).
FLOCORA_INLINE __m256i compress8(__m256i v, uint32_t m) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32((int)kCompress8.lanes[m]), shifts);
  return _mm256_permutevar8x32_epi32(v, idx);  // uses the low 3 bits of each index
}
#endif

// Magnitude keys of float32 x[0..n) to keys[0..n); returns the smallest and
// largest (single_histogram clears and sums only the bins between them).
inline void keys_f32(const float* x, int64_t n, uint32_t* keys, uint32_t* lo, uint32_t* hi) {
  uint32_t mn = 0xffffffffu, mx = 0;
  int64_t i = 0;
#if FLOCORA_TOPK_ISA == 2
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  __m512i vmn = _mm512_set1_epi32(-1), vmx = _mm512_setzero_si512();
  for (; i + 16 <= n; i += 16) {
    const __m512i k = _mm512_and_si512(_mm512_loadu_si512((const void*)(x + i)), abs_mask);
    _mm512_storeu_si512((void*)(keys + i), k);
    vmn = _mm512_min_epu32(vmn, k);
    vmx = _mm512_max_epu32(vmx, k);
  }
  mn = _mm512_reduce_min_epu32(vmn);
  mx = _mm512_reduce_max_epu32(vmx);
#elif FLOCORA_TOPK_ISA == 1
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  __m256i vmn = _mm256_set1_epi32(-1), vmx = _mm256_setzero_si256();
  for (; i + 8 <= n; i += 8) {
    const __m256i k = _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(x + i)), abs_mask);
    _mm256_storeu_si256((__m256i*)(keys + i), k);
    vmn = _mm256_min_epu32(vmn, k);
    vmx = _mm256_max_epu32(vmx, k);
  }
  alignas(32) uint32_t lanes_mn[8], lanes_mx[8];
  _mm256_store_si256((__m256i*)lanes_mn, vmn);
  _mm256_store_si256((__m256i*)lanes_mx, vmx);
  for (int j = 0; j < 8; ++j) {
    mn = std::min(mn, lanes_mn[j]);
    mx = std::max(mx, lanes_mx[j]);
  }
#endif
  for (; i < n; ++i) {
    const uint32_t k = float_bits(x[i]) & 0x7fffffffu;
    keys[i] = k;
    mn = std::min(mn, k);
    mx = std::max(mx, k);
  }
  *lo = mn;
  *hi = mx;
}

// Keeps keys[0..m) whose digit (key >> s) & mask is b, in order, in place;
// returns how many. keys has room for m + kBlock.
inline int64_t keep_bucket(uint32_t* keys, int64_t m, int s, uint32_t mask, uint32_t b) {
  int64_t j = 0;
#if FLOCORA_TOPK_ISA == 2
  const __m512i maskv = _mm512_set1_epi32((int)mask), bv = _mm512_set1_epi32((int)b);
  const __m128i shift = _mm_cvtsi32_si128(s);
  for (int64_t i = 0; i < m; i += kBlock) {
    const __mmask16 valid = lanes((int)std::min<int64_t>(kBlock, m - i));
    __m512i v = _mm512_maskz_loadu_epi32(valid, keys + i);
    __mmask16 in = _mm512_mask_cmpeq_epi32_mask(valid, _mm512_and_si512(_mm512_srl_epi32(v, shift), maskv), bv);
    // j <= i: the store reaches at most keys[i + 15], already loaded.
    _mm512_storeu_si512(keys + j, _mm512_maskz_compress_epi32(in, v));
    j += __builtin_popcount(in);
  }
#else
  int64_t i = 0;
#if FLOCORA_TOPK_ISA == 1
  const __m256i maskv = _mm256_set1_epi32((int)mask), bv = _mm256_set1_epi32((int)b);
  const __m128i shift = _mm_cvtsi32_si128(s);
  for (; i + 8 <= m; i += 8) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i));
    __m256i eq = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_srl_epi32(v, shift), maskv), bv);
    uint32_t in = (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(eq));
    // j <= i: the store reaches at most keys[i + 7], already loaded.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + j), compress8(v, in));
    j += __builtin_popcount(in);
  }
#endif
  for (; i < m; ++i) {  // j <= i: in place
    uint32_t v = keys[i];
    keys[j] = v;
    j += ((v >> s) & mask) == b;
  }
#endif
  return j;
}

// Copies the keys of [begin, end) with lo < key <= hi to stage (room for
// end - begin + kBlock keys); returns how many, *above the number of keys >
// hi and *max_key the largest key. Block b of the range gets bit b of
// `flags` iff it holds a key > lo: the emit pass reads only those blocks
// (at low density, most blocks have none). lo may be -1: every key.
template <Dt D>
int64_t top_candidates(const void* x, int64_t begin, int64_t end, int32_t lo, int32_t hi, uint32_t* stage,
                       int64_t* above, uint32_t* max_key, uint64_t* flags) {
  int64_t cnt = 0, up = 0;
  std::memset(flags, 0, sizeof(uint64_t) * ((end - begin + kBlock * 64 - 1) / (kBlock * 64)));
  // The flag word being set, in a register: an or into memory per block
  // chained each block to the last one's store (and the stage's stores may
  // alias it, so the compiler kept it there).
  int64_t word_at = 0;
  uint64_t word = 0;
  auto flag_block = [&](int64_t blk) {
    if ((blk >> 6) != word_at) {
      flags[word_at] = word;
      word_at = blk >> 6;
      word = 0;
    }
    word |= 1ull << (blk & 63);
  };
#if FLOCORA_TOPK_ISA == 2
  if (D == kF32) {
    const __m512i lov = _mm512_set1_epi32(lo), hiv = _mm512_set1_epi32(hi);
    __m512i mx = _mm512_setzero_si512();
    for (int64_t i = begin; i < end; i += kBlock) {
      __m512i keys;
      load_block_f32(x, i, lanes((int)std::min<int64_t>(kBlock, end - i)), &keys);  // lanes past the end: key 0
      mx = _mm512_max_epu32(mx, keys);
      const __mmask16 valid = lanes((int)std::min<int64_t>(kBlock, end - i));
      __mmask16 ge = _mm512_mask_cmpgt_epi32_mask(valid, keys, lov);
      if (!ge) continue;
      const int64_t blk = (i - begin) / kBlock;
      flag_block(blk);
      __mmask16 gt = _mm512_cmpgt_epi32_mask(keys, hiv);
      up += __builtin_popcount(gt);
      __mmask16 in = (__mmask16)(ge & ~gt);
      // The stage is private to the task and has room for a whole block past cnt.
      _mm512_storeu_si512(stage + cnt, _mm512_maskz_compress_epi32(in, keys));
      cnt += __builtin_popcount(in);
    }
    if (end > begin) flags[word_at] = word;
    *above = up;
    *max_key = _mm512_reduce_max_epu32(mx);
    return cnt;
  }
#endif
  uint32_t keys[kBlock];
  uint32_t mx = 0;
  int64_t i = begin;
#if FLOCORA_TOPK_ISA == 1
  if (D == kF32) {  // whole float32 blocks: two 8-key vectors, kept keys compressed through the table
    const __m256i lov = _mm256_set1_epi32(lo), hiv = _mm256_set1_epi32(hi), magnitude = _mm256_set1_epi32(0x7fffffff);
    __m256i mxv = _mm256_setzero_si256();
    for (; i + kBlock <= end; i += kBlock) {
      const float* p = static_cast<const float*>(x) + i;
      const __m256i k0 = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), magnitude);
      const __m256i k1 = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8)), magnitude);
      mxv = _mm256_max_epu32(mxv, _mm256_max_epu32(k0, k1));
      const uint32_t ge = lane_mask(_mm256_cmpgt_epi32(k0, lov)) | lane_mask(_mm256_cmpgt_epi32(k1, lov)) << 8;
      if (!ge) continue;
      const int64_t blk = (i - begin) / kBlock;
      flag_block(blk);
      const uint32_t gt = lane_mask(_mm256_cmpgt_epi32(k0, hiv)) | lane_mask(_mm256_cmpgt_epi32(k1, hiv)) << 8;
      up += __builtin_popcount(gt);
      const uint32_t in = ge & ~gt;
      // The stage is private to the task and has room for a whole block past cnt.
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(stage + cnt), compress8(k0, in & 0xffu));
      cnt += __builtin_popcount(in & 0xffu);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(stage + cnt), compress8(k1, in >> 8));
      cnt += __builtin_popcount(in >> 8);
    }
    alignas(32) uint32_t lanes8[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes8), mxv);
    for (uint32_t v : lanes8) mx = std::max(mx, v);
  }
#endif
  for (; i < end; i += kBlock) {
    int n = (int)std::min<int64_t>(kBlock, end - i);
    load_keys<D>(x, i, n, keys);
    for (int j = 0; j < kBlock; ++j) mx = std::max(mx, keys[j]);  // keys past n are 0
    uint32_t valid = valid_mask(n);
    uint32_t ge = gt_mask(keys, lo) & valid;
    if (!ge) continue;
    const int64_t blk = (i - begin) / kBlock;
    flag_block(blk);
    uint32_t gt = gt_mask(keys, hi) & valid;
    uint32_t in = ge & ~gt;
    up += popcount64(gt);
#if FLOCORA_TOPK_ISA == 1
    // The stage is private to the task and has room for a whole block past cnt.
    for (int h = 0; h < 2; ++h) {
      const uint32_t half = (in >> (8 * h)) & 0xffu;
      __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + 8 * h));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(stage + cnt), compress8(k, half));
      cnt += __builtin_popcount(half);
    }
#else
    while (in) {
      stage[cnt++] = keys[__builtin_ctz(in)];
      in &= in - 1;
    }
#endif
  }
  if (end > begin) flags[word_at] = word;
  *above = up;
  *max_key = mx;
  return cnt;
}

// A sampled single's one pass over its input: the float32 bits and the
// positions of its elements with key > lo go to bits_out and pos_out (room
// for n + kBlock each), in order; returns how many. *above: the number of
// keys > hi; *max_key: the largest key. The select and the emit then read
// these (a small share of x at the densities sparsification uses) instead
// of x again. lo may be -1: every element.
template <Dt D>
int64_t stage_above(const void* x, int64_t n, int32_t lo, int32_t hi, uint32_t* bits_out, int32_t* pos_out,
                    int64_t* above, uint32_t* max_key) {
  int64_t cnt = 0, up = 0;
  int64_t i = 0;
  uint32_t mx = 0;
#if FLOCORA_TOPK_ISA == 2
  if (D == kF32) {
    const __m512i lov = _mm512_set1_epi32(lo), hiv = _mm512_set1_epi32(hi);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i mxv = _mm512_setzero_si512();
    for (; i < n; i += kBlock) {
      const __mmask16 valid = lanes((int)std::min<int64_t>(kBlock, n - i));
      __m512i keys;
      const __m512i b = load_block_f32(x, i, valid, &keys);  // lanes past the end: key 0
      mxv = _mm512_max_epu32(mxv, keys);
      // No branches on the masks: near the threshold of a dense selection
      // they change at random from block to block.
      const __mmask16 ge = _mm512_mask_cmpgt_epi32_mask(valid, keys, lov);
      up += __builtin_popcount(_mm512_cmpgt_epi32_mask(keys, hiv));
      _mm512_storeu_si512(bits_out + cnt, _mm512_maskz_compress_epi32(ge, b));
      _mm512_storeu_si512(pos_out + cnt,
                          _mm512_maskz_compress_epi32(ge, _mm512_add_epi32(_mm512_set1_epi32((int32_t)i), iota)));
      cnt += __builtin_popcount(ge);
    }
    *above = up;
    *max_key = _mm512_reduce_max_epu32(mxv);
    return cnt;
  }
#endif
#if FLOCORA_TOPK_ISA == 1
  if (D == kF32) {  // whole blocks: two 8-lane halves, compressed through the table
    const __m256i lov = _mm256_set1_epi32(lo), hiv = _mm256_set1_epi32(hi), magnitude = _mm256_set1_epi32(0x7fffffff);
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i mxv = _mm256_setzero_si256();
    for (; i + kBlock <= n; i += kBlock) {
      const float* p = static_cast<const float*>(x) + i;
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8));
      const __m256i k0 = _mm256_and_si256(b0, magnitude), k1 = _mm256_and_si256(b1, magnitude);
      mxv = _mm256_max_epu32(mxv, _mm256_max_epu32(k0, k1));
      const uint32_t ge0 = lane_mask(_mm256_cmpgt_epi32(k0, lov)), ge1 = lane_mask(_mm256_cmpgt_epi32(k1, lov));
      up += __builtin_popcount(lane_mask(_mm256_cmpgt_epi32(k0, hiv)) | lane_mask(_mm256_cmpgt_epi32(k1, hiv)) << 8);
      const __m256i at = _mm256_add_epi32(_mm256_set1_epi32((int32_t)i), iota);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(bits_out + cnt), compress8(b0, ge0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pos_out + cnt), compress8(at, ge0));
      cnt += __builtin_popcount(ge0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(bits_out + cnt), compress8(b1, ge1));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pos_out + cnt),
                          compress8(_mm256_add_epi32(at, _mm256_set1_epi32(8)), ge1));
      cnt += __builtin_popcount(ge1);
    }
    alignas(32) uint32_t lanes8[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes8), mxv);
    for (uint32_t v : lanes8) mx = std::max(mx, v);
  }
#endif
  uint32_t bits[kBlock];
  for (; i < n; i += kBlock) {
    const int m = (int)std::min<int64_t>(kBlock, n - i);
    load_bits<D>(x, i, m, bits);
    for (int j = 0; j < m; ++j) {
      const uint32_t k = bits[j] & 0x7fffffffu;
      mx = std::max(mx, k);
      up += (int32_t)k > hi;
      bits_out[cnt] = bits[j];
      pos_out[cnt] = (int32_t)(i + j);
      cnt += (int32_t)k > lo;
    }
  }
  *above = up;
  *max_key = mx;
  return cnt;
}

// Keys of the staged bits bits[0..m) that are at most hi (the rest of the
// stage is > lo already): the candidates the select runs on, to keys.
inline int64_t bracket_keys(const uint32_t* bits, int64_t m, int32_t hi, uint32_t* keys) {
  int64_t cnt = 0;
  int64_t i = 0;
#if FLOCORA_TOPK_ISA == 2
  const __m512i hiv = _mm512_set1_epi32(hi), magnitude = _mm512_set1_epi32(0x7fffffff);
  for (; i < m; i += kBlock) {
    const __mmask16 valid = lanes((int)std::min<int64_t>(kBlock, m - i));
    const __m512i k = _mm512_and_si512(_mm512_maskz_loadu_epi32(valid, bits + i), magnitude);
    const __mmask16 in = _mm512_mask_cmple_epi32_mask(valid, k, hiv);
    _mm512_storeu_si512(keys + cnt, _mm512_maskz_compress_epi32(in, k));
    cnt += __builtin_popcount(in);
  }
#elif FLOCORA_TOPK_ISA == 1
  const __m256i hiv = _mm256_set1_epi32(hi), magnitude = _mm256_set1_epi32(0x7fffffff);
  for (; i + 8 <= m; i += 8) {
    const __m256i k = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + i)), magnitude);
    const uint32_t in = lane_mask(_mm256_cmpgt_epi32(k, hiv)) ^ 0xffu;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + cnt), compress8(k, in));
    cnt += __builtin_popcount(in);
  }
#endif
  for (; i < m; ++i) {
    const uint32_t k = bits[i] & 0x7fffffffu;
    keys[cnt] = k;
    cnt += (int32_t)k <= hi;
  }
  return cnt;
}

// Kept elements batched for their Elias-Fano fields (emit_range), as int32
// offsets within a range of at most kChunk elements.
constexpr int kPosBatch = 512;
static_assert(kChunk <= INT32_MAX, "emit_range keeps positions as int32 offsets");

// The Elias-Fano fields of elements base + pos[0..n), of ranks rank, rank + 1, ...
// Until both writers are past their first (shared) byte or word, their own
// put/set run; then their state lives in locals (working on the writers'
// fields, the compiler reloaded and spilled them around every store, which
// might alias them), and low fields up to 32 bits go out 4 bytes at a time.
__attribute__((noinline)) inline void write_elias_fano(FieldWriter& low, UnaryWriter& high, int64_t base,
                                                       const int32_t* pos, int n, int64_t rank, int l,
                                                       uint64_t low_mask) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  constexpr bool little_endian = true;  // the word stores below
#else
  constexpr bool little_endian = false;
#endif
  int j = 0;
  for (; j < n && (!little_endian || low.first || high.first || l > 32); ++j) {
    const uint64_t e = (uint64_t)(base + pos[j]);
    low.put(e & low_mask, l);
    high.set((int64_t)(e >> l) + rank + j);
  }
  if (j == n) return;
  uint64_t acc = low.acc, word = high.v;
  int nacc = low.nacc;  // < 32 between puts
  uint8_t* low_at = low.base + low.byte;
  int64_t cur = high.cur;
  uint8_t* const high_base = high.base;
  for (; j < n; ++j) {
    const uint64_t e = (uint64_t)(base + pos[j]);
    acc |= (e & low_mask) << nacc;  // at most 63 bits
    nacc += l;
    if (nacc >= 32) {  // four whole bytes of this range's alone
      const uint32_t w32 = (uint32_t)acc;
      std::memcpy(low_at, &w32, 4);
      low_at += 4;
      acc >>= 32;
      nacc -= 32;
    }
    const int64_t q = (int64_t)(e >> l) + rank + j;
    if ((q >> 6) != cur) {  // cur is past the first word: all this range's
      std::memcpy(high_base + 8 * cur, &word, 8);
      cur = q >> 6;
      word = 0;
    }
    word |= 1ull << (q & 63);
  }
  low.acc = acc;
  low.nacc = nacc;
  low.byte = low_at - low.base;
  high.cur = cur;
  high.v = word;
}

// sel with the first *ties keys of eq (keys == thr, in lane order) added:
// the ties a block keeps, taken from the count left.
FLOCORA_INLINE uint32_t join_ties(int64_t* ties, uint32_t sel, uint32_t eq) {
  while (eq && *ties > 0) {
    sel |= eq & (0u - eq);
    eq &= eq - 1;
    --*ties;
  }
  return sel;
}

// Emits the kept elements of [begin, end) of tensor t (begin a multiple of
// kBlock): all keys > thr, and the first `ties` keys == thr. Values go to
// vals[rank0...], the index code into the zeroed idx bytes of the tensor.
// flags (or null: every block): the blocks that may hold a kept key.
template <Dt D>
void emit_range(const EncTensor& t, int64_t begin, int64_t end, uint32_t thr, int64_t ties, int64_t rank0, float* vals,
                uint8_t* idx, const uint64_t* flags) {
  const bool bitmap = t.code == kIndexBitmap;
  const int l = t.low_bits;
  const uint64_t low_mask = l ? (~0ull >> (64 - l)) : 0;
  FieldWriter low(idx, rank0 * (int64_t)l);
  UnaryWriter high(idx + t.low_nbytes);
  int64_t rank = rank0;
  // Elias-Fano: the blocks append the offsets (from begin; a range is at most
  // kChunk elements) of their kept elements, and the fields are written a
  // batch at a time in a loop of known length. Written block by block, each
  // block's loop ended on its own count: a branch the predictor misses.
  int32_t pos[kPosBatch + kBlock];
  int npos = 0;
  int64_t ef_rank = rank0;
  auto flush_positions = [&]() FLOCORA_LAMBDA_INLINE {
    write_elias_fano(low, high, begin, pos, npos, ef_rank, l, low_mask);
    ef_rank += npos;
    npos = 0;
  };
  // Index code of the kept lanes `sel` of the block at i; values are written by the caller.
  auto code = [&](int64_t i, uint32_t sel, int n) FLOCORA_LAMBDA_INLINE {
    if (bitmap) {
      idx[i >> 3] = (uint8_t)sel;
      if (n > 8) idx[(i >> 3) + 1] = (uint8_t)(sel >> 8);
      return;
    }
    for (; sel; sel &= sel - 1) pos[npos++] = (int32_t)(i - begin + __builtin_ctz(sel));
    if (npos >= kPosBatch) flush_positions();
  };
#if FLOCORA_TOPK_ISA == 2
  const __m512i tv = _mm512_set1_epi32((int32_t)thr);
#endif
  uint32_t bits[kBlock], keys[kBlock];
  auto block = [&](int64_t i) FLOCORA_LAMBDA_INLINE {
    int n = (int)std::min<int64_t>(kBlock, end - i);
#if FLOCORA_TOPK_ISA == 2
    if (D == kF32) {
      __m512i k;
      __m512i b = load_block_f32(t.x, i, lanes(n), &k);
      uint32_t sel = _mm512_cmpgt_epi32_mask(k, tv);  // lanes past the end hold key 0 <= thr
      if (ties > 0) sel = join_ties(&ties, sel, _mm512_mask_cmpeq_epi32_mask(lanes(n), k, tv));
      if (!sel) return;
      const int cnt = __builtin_popcount(sel);
      // A masked store: the next slot of vals belongs to another task's block.
      _mm512_mask_storeu_epi32(vals + rank, lanes(cnt), _mm512_maskz_compress_epi32((__mmask16)sel, b));
      rank += cnt;
      if (bitmap) {
        code(i, sel, n);
        return;
      }
      const __m512i offsets = _mm512_add_epi32(_mm512_set1_epi32((int32_t)(i - begin)),
                                               _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
      _mm512_storeu_si512(pos + npos, _mm512_maskz_compress_epi32((__mmask16)sel, offsets));  // pos has kBlock spare
      npos += cnt;
      if (npos >= kPosBatch) flush_positions();
      return;
    }
#endif
#if FLOCORA_TOPK_ISA == 1
    if (D == kF32 && n == kBlock) {
      const float* p = static_cast<const float*>(t.x) + i;
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8));
      const __m256i magnitude = _mm256_set1_epi32(0x7fffffff), tv = _mm256_set1_epi32((int32_t)thr);
      const __m256i k0 = _mm256_and_si256(b0, magnitude), k1 = _mm256_and_si256(b1, magnitude);
      uint32_t sel = lane_mask(_mm256_cmpgt_epi32(k0, tv)) | lane_mask(_mm256_cmpgt_epi32(k1, tv)) << 8;
      if (ties > 0)
        sel = join_ties(&ties, sel, lane_mask(_mm256_cmpeq_epi32(k0, tv)) | lane_mask(_mm256_cmpeq_epi32(k1, tv)) << 8);
      if (!sel) return;
      // Masked stores: the slots past this block's values belong to another task's block.
      const int lo_cnt = __builtin_popcount(sel & 0xffu), hi_cnt = __builtin_popcount(sel >> 8);
      const __m256i first = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      _mm256_maskstore_epi32(reinterpret_cast<int*>(vals + rank), _mm256_cmpgt_epi32(_mm256_set1_epi32(lo_cnt), first),
                             compress8(b0, sel & 0xffu));
      _mm256_maskstore_epi32(reinterpret_cast<int*>(vals + rank + lo_cnt),
                             _mm256_cmpgt_epi32(_mm256_set1_epi32(hi_cnt), first), compress8(b1, sel >> 8));
      rank += lo_cnt + hi_cnt;
      if (bitmap) {
        code(i, sel, n);
        return;
      }
      const __m256i offsets = _mm256_add_epi32(_mm256_set1_epi32((int32_t)(i - begin)), first);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pos + npos), compress8(offsets, sel & 0xffu));  // kBlock spare
      npos += lo_cnt;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pos + npos),
                          compress8(_mm256_add_epi32(offsets, _mm256_set1_epi32(8)), sel >> 8));
      npos += hi_cnt;
      if (npos >= kPosBatch) flush_positions();
      return;
    }
#endif
    load_bits<D>(t.x, i, n, bits);
    for (int j = 0; j < kBlock; ++j) keys[j] = j < n ? (bits[j] & 0x7fffffffu) : 0u;
    uint32_t valid = valid_mask(n);
    uint32_t sel = gt_mask(keys, (int32_t)thr) & valid;
    if (ties > 0) sel = join_ties(&ties, sel, gt_mask(keys, (int32_t)thr - 1) & ~sel & valid);
    if (!sel) return;
    code(i, sel, n);
    for (; sel; sel &= sel - 1) vals[rank++] = bits_float(bits[__builtin_ctz(sel)]);
  };
  if (flags) {
    const int64_t nwords = (end - begin + kBlock * 64 - 1) / (kBlock * 64);
    const int esize = D == kF32 ? 4 : 2;
    for (int64_t w = 0; w < nwords; ++w) {
      // Skipping blocks defeats the hardware prefetcher: fetch the next word's blocks now.
      if (w + 1 < nwords)
        for (uint64_t f = flags[w + 1]; f; f &= f - 1)
          __builtin_prefetch(static_cast<const char*>(t.x) +
                             esize * (begin + ((w + 1) * 64 + __builtin_ctzll(f)) * kBlock));
      for (uint64_t f = flags[w]; f; f &= f - 1) block(begin + (w * 64 + __builtin_ctzll(f)) * kBlock);
    }
  } else {
    for (int64_t i = begin; i < end; i += kBlock) block(i);
  }
  if (!bitmap) {
    flush_positions();
    low.finish();
    high.finish();
  }
}

// Emits a sampled single from its stage (stage_above: bits and positions of
// m elements, in index order): every element with key > thr and the first
// `ties` with key == thr. Values go to vals[0...], the Elias-Fano code into
// the zeroed idx bytes of the tensor, which this task alone writes. (Bitmap
// coded tensors are dense: staging their elements costs more than reading
// x again, and emit_range writes their bitmap a block at a time.)
inline void emit_staged(const EncTensor& t, const uint32_t* bits, const int32_t* pos, int64_t m, uint32_t thr,
                        int64_t ties, float* vals, uint8_t* idx) {
  const int l = t.low_bits;
  const uint64_t low_mask = l ? (~0ull >> (64 - l)) : 0;
  FieldWriter low(idx, 0);
  UnaryWriter high(idx + t.low_nbytes);
  int32_t batch[kPosBatch + kBlock];  // kept positions, + a vector store's overhang
  int nbatch = 0;
  int64_t rank = 0, batch_rank = 0;
  auto flush = [&]() FLOCORA_LAMBDA_INLINE {
    write_elias_fano(low, high, 0, batch, nbatch, batch_rank, l, low_mask);
    batch_rank += nbatch;
    nbatch = 0;
  };
  int64_t i = 0;
#if FLOCORA_TOPK_ISA == 2
  {
    const __m512i tv = _mm512_set1_epi32((int32_t)thr), magnitude = _mm512_set1_epi32(0x7fffffff);
    for (; i < m; i += kBlock) {
      const __mmask16 valid = lanes((int)std::min<int64_t>(kBlock, m - i));
      const __m512i b = _mm512_maskz_loadu_epi32(valid, bits + i);
      const __m512i k = _mm512_and_si512(b, magnitude);
      uint32_t sel = _mm512_mask_cmpgt_epi32_mask(valid, k, tv);
      if (ties > 0) sel = join_ties(&ties, sel, _mm512_mask_cmpeq_epi32_mask(valid, k, tv));
      const int cnt = __builtin_popcount(sel);
      // A masked store: the slots past this tensor's values are another task's.
      _mm512_mask_storeu_epi32(vals + rank, lanes(cnt), _mm512_maskz_compress_epi32((__mmask16)sel, b));
      _mm512_storeu_si512(batch + nbatch,
                          _mm512_maskz_compress_epi32((__mmask16)sel, _mm512_maskz_loadu_epi32(valid, pos + i)));
      rank += cnt;
      nbatch += cnt;
      if (nbatch >= kPosBatch) flush();
    }
  }
#elif FLOCORA_TOPK_ISA == 1
  {
    const __m256i tv = _mm256_set1_epi32((int32_t)thr), magnitude = _mm256_set1_epi32(0x7fffffff);
    const __m256i first = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (; i + 8 <= m; i += 8) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + i));
      const __m256i k = _mm256_and_si256(b, magnitude);
      uint32_t sel = lane_mask(_mm256_cmpgt_epi32(k, tv));
      if (ties > 0) sel = join_ties(&ties, sel, lane_mask(_mm256_cmpeq_epi32(k, tv)));
      const int cnt = __builtin_popcount(sel);
      // A masked store: the slots past this tensor's values are another task's.
      _mm256_maskstore_epi32(reinterpret_cast<int*>(vals + rank), _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), first),
                             compress8(b, sel));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(batch + nbatch),
                          compress8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pos + i)), sel));
      rank += cnt;
      nbatch += cnt;
      if (nbatch >= kPosBatch) flush();
    }
  }
#endif
  for (; i < m; ++i) {
    const uint32_t k = bits[i] & 0x7fffffffu;
    bool keep = k > thr;
    if (!keep && k == thr && ties > 0) {
      keep = true;
      --ties;
    }
    if (!keep) continue;
    vals[rank++] = bits_float(bits[i]);
    batch[nbatch++] = pos[i];
    if (nbatch >= kPosBatch) flush();
  }
  flush();
  low.finish();
  high.finish();
}

}  // namespace FLOCORA_TOPK_LOOPS
