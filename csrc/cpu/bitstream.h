// The LSB-first bit streams of the sparse index codes (docs/FORMAT.md; sizes:
// csrc/include/flocora/affine.h), as the CPU kernels write them
// (topk_encode_cpu.cpp) and read them back (sparse_decode_cpu.cpp).
#pragma once
#include <stdint.h>

#include <cstring>

#include "topk_common.h"

namespace flocora {
namespace cpu {

// Portable popcount (the x86-64 baseline has no POPCNT; the builtin would
// call into libgcc).
FLOCORA_INLINE int popcount64(uint64_t v) {
  v = v - ((v >> 1) & 0x5555555555555555ull);
  v = (v & 0x3333333333333333ull) + ((v >> 2) & 0x3333333333333333ull);
  v = (v + (v >> 4)) & 0x0f0f0f0f0f0f0f0full;
  return (int)((v * 0x0101010101010101ull) >> 56);
}

// ---- writers ----------------------------------------------------------------------
inline void atomic_or_byte(uint8_t* p, uint8_t v) {
  if (v) __atomic_fetch_or(p, v, __ATOMIC_RELAXED);
}

// Appends fixed-width fields to an LSB-first bit stream, from bit `pos` on.
// Several tasks write adjacent ranges of one stream at once: the first and
// the last byte of a range may hold a neighbour's bits, so they are OR-ed
// atomically into the zeroed stream; the bytes in between are this task's alone.
struct FieldWriter {
  uint8_t* base;
  int64_t byte;
  uint64_t acc;
  int nacc;
  bool first;
  FieldWriter(uint8_t* b, int64_t pos) : base(b), byte(pos >> 3), acc(0), nacc((int)(pos & 7)), first(true) {}
  void flush_full() {
    while (nacc >= 8) {
      uint8_t v = (uint8_t)acc;
      if (first) {
        atomic_or_byte(base + byte, v);
        first = false;
      } else {
        base[byte] = v;
      }
      ++byte;
      acc >>= 8;
      nacc -= 8;
    }
  }
  void put(uint64_t v, int nb) {  // v < 2^nb, nb <= 62
    if (nb > 32) {
      put(v & 0xffffffffu, 32);
      put(v >> 32, nb - 32);
      return;
    }
    acc |= v << nacc;  // nacc < 32 before, so at most 63 bits
    nacc += nb;
    if (nacc < 32) return;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (!first) {  // four whole bytes of this task's at once (one branch per 32 bits)
      const uint32_t word = (uint32_t)acc;
      std::memcpy(base + byte, &word, 4);
      byte += 4;
      acc >>= 32;
      nacc -= 32;
      return;
    }
#endif
    flush_full();
  }
  void finish() {
    flush_full();
    if (nacc > 0) atomic_or_byte(base + byte, (uint8_t)acc);
  }
};

// Sets bits at increasing positions of a zeroed bit stream (the Elias-Fano
// unary part); shared first/last byte as in FieldWriter.
struct UnaryWriter {
  uint8_t* base;
  int64_t cur = -1;  // the 64-bit word (of the stream, from base) being filled
  uint64_t v = 0;
  bool first = true;
  explicit UnaryWriter(uint8_t* b) : base(b) {}
  // The first word may begin, and the last one end, in a neighbour's bytes:
  // their nonzero bytes are OR-ed in one by one; a word in between is all ours.
  void flush_shared() {
    for (int k = 0; k < 8; ++k) atomic_or_byte(base + 8 * cur + k, (uint8_t)(v >> (8 * k)));
  }
  void set(int64_t q) {
    int64_t w = q >> 6;
    if (w != cur) {
      if (cur >= 0) {
        if (first) {
          flush_shared();
          first = false;
        } else {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
          std::memcpy(base + 8 * cur, &v, 8);
#else
          for (int k = 0; k < 8; ++k) base[8 * cur + k] = (uint8_t)(v >> (8 * k));
#endif
        }
      }
      cur = w;
      v = 0;
    }
    v |= 1ull << (q & 63);
  }
  void finish() {
    if (cur >= 0) flush_shared();
  }
};

// ---- readers ----------------------------------------------------------------------
inline uint64_t load_word(const uint8_t* p, int64_t nbytes) {  // nbytes <= 8, LSB-first
  uint64_t w = 0;
  for (int64_t i = 0; i < nbytes; ++i) w |= (uint64_t)p[i] << (8 * i);
  return w;
}
inline uint64_t load_word8(const uint8_t* p) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
#else
  return load_word(p, 8);
#endif
}

// Sequential reader of fixed-width fields of an LSB-first stream. Away from
// the end it refills 8 bytes at a time (the bits it keeps above `nacc` are
// those of the bytes from `byte` on, so OR-ing them in again changes nothing);
// the last 7 bytes are read one at a time, and past the end reads zeros.
struct FieldReader {
  const uint8_t* p;
  int64_t nbytes, byte;
  uint64_t acc = 0;
  int nacc = 0;
  FieldReader(const uint8_t* base, int64_t nb, int64_t pos) : p(base), nbytes(nb), byte(pos >> 3) {
    int skip = (int)(pos & 7);
    if (skip) get(skip);
  }
  void refill() {  // to at least 57 bits
    if (byte + 8 <= nbytes) {
      acc |= load_word8(p + byte) << nacc;
      byte += (63 - nacc) >> 3;
      nacc |= 56;
      return;
    }
    for (; nacc <= 56; ++byte, nacc += 8) acc |= (uint64_t)(byte < nbytes ? p[byte] : 0) << nacc;
  }
  FLOCORA_INLINE uint64_t get(int nb) {  // nb <= 62
    if (nb == 0) return 0;
    if (nb > 56) {
      uint64_t lo = get_upto56(32);
      return lo | (get_upto56(nb - 32) << 32);
    }
    return get_upto56(nb);
  }
  FLOCORA_INLINE uint64_t get_upto56(int nb) {  // 1 <= nb <= 56
    if (nacc < nb) refill();
    uint64_t v = acc & (~0ull >> (64 - nb));
    acc >>= nb;
    nacc -= nb;
    return v;
  }
};

}  // namespace cpu
}  // namespace flocora
