// The bit streams of the CUDA kernels, as bytes in global memory: whole-byte
// loads and stores of packed codes (quantize_pack_cuda.cu,
// unpack_dequantize_cuda.cu) and bit-granular writes and reads of the sparse
// index codes (topk_encode_cuda.cu, sparse_decode_cuda.cu). The layout is
// affine.h's (LSB-first, little-endian); the CPU's: csrc/cpu/bitstream.h.
#pragma once
#include <stdint.h>

namespace flocora {
namespace cuda {

// nb (<= 8) little-endian bytes of w at dst, with the widest aligned stores.
__device__ __forceinline__ void store_bytes(uint8_t* dst, uint64_t w, int nb) {
  uintptr_t a = reinterpret_cast<uintptr_t>(dst);
  if (nb == 8 && (a & 7u) == 0) {
    *reinterpret_cast<uint64_t*>(dst) = w;
    return;
  }
  int i = 0;
  while (i < nb) {
    uintptr_t ai = a + i;
    if ((ai & 3u) == 0 && nb - i >= 4) {
      *reinterpret_cast<uint32_t*>(dst + i) = (uint32_t)(w >> (8 * i));
      i += 4;
    } else if ((ai & 1u) == 0 && nb - i >= 2) {
      *reinterpret_cast<uint16_t*>(dst + i) = (uint16_t)(w >> (8 * i));
      i += 2;
    } else {
      dst[i] = (uint8_t)(w >> (8 * i));
      i += 1;
    }
  }
}
// nb (<= 8) bytes at src as a little-endian word (upper bytes 0).
__device__ __forceinline__ uint64_t load_bytes(const uint8_t* src, int nb) {
  uintptr_t a = reinterpret_cast<uintptr_t>(src);
  if (nb == 8 && (a & 7u) == 0) return *reinterpret_cast<const uint64_t*>(src);
  uint64_t w = 0;
  int i = 0;
  while (i < nb) {
    uintptr_t ai = a + i;
    if ((ai & 3u) == 0 && nb - i >= 4) {
      w |= (uint64_t)*reinterpret_cast<const uint32_t*>(src + i) << (8 * i);
      i += 4;
    } else if ((ai & 1u) == 0 && nb - i >= 2) {
      w |= (uint64_t)*reinterpret_cast<const uint16_t*>(src + i) << (8 * i);
      i += 2;
    } else {
      w |= (uint64_t)src[i] << (8 * i);
      i += 1;
    }
  }
  return w;
}

// OR the low nbits (<= 64) of value into a bitstream of 32-bit words at bit
// position pos. Used where several threads share output bytes (index codes).
__device__ __forceinline__ void atomic_or_bits(uint32_t* words, uint64_t pos, uint64_t value, int nbits) {
  while (nbits > 0) {
    int off = (int)(pos & 31u);
    int take = min(32 - off, nbits);
    uint32_t part = (uint32_t)(value & ((1ull << take) - 1)) << off;
    if (part) atomicOr(words + (pos >> 5), part);
    value >>= take;
    pos += take;
    nbits -= take;
  }
}

// nbits (<= 64) bits at bit position pos of an LSB-first byte stream.
__device__ __forceinline__ uint64_t read_bits(const uint8_t* __restrict__ p, uint64_t pos, int nbits) {
  uint64_t r = 0;
  int got = 0;
  while (got < nbits) {
    const uint64_t q = pos + got;
    const int off = (int)(q & 7u);
    const int take = min(8 - off, nbits - got);
    r |= (uint64_t)((p[q >> 3] >> off) & ((1u << take) - 1)) << got;
    got += take;
  }
  return r;
}

}  // namespace cuda
}  // namespace flocora
