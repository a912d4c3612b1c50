// CPU kernel of _crc32c: the CRC-32C (Castagnoli) of a message's bytes, the
// checksum every message and schema ends with (docs/FORMAT.md), equal to what
// the crc32c package computes.
//
// One core checksums about 30 GB/s with the SSE4.2 crc32 instruction (the
// package's speed), so a raw ResNet-18 adapter message (2.4 MB) spent 73 us
// on its checksum, a third of its encode. Here the bytes are split between
// the threads, each thread runs kStreams independent crc32 chains over equal
// parts of its share (the instruction's latency is several cycles, its
// throughput one or more a cycle), and the parts' CRCs are joined in order
// as zlib's crc32_combine joins them: crc(A B) = crc(A) * x^(8 |B|) + crc(B)
// modulo the polynomial. CPUs without SSE4.2 (and the scalar loops that
// tests force with _set_cpu_isa(0)) use a byte table.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

#include "quant_loops.h"

namespace flocora {
namespace cpu {

namespace {

constexpr uint32_t kPoly = 0x82F63B78u;    // CRC-32C, bit-reflected
constexpr int kStreams = 8;                // independent chains per thread
constexpr int64_t kThreadMin = 128 << 10;  // bytes a thread's share is worth
constexpr int64_t kStreamsMin = 4096;      // below: one chain (the joins cost ~1 us)

// a(x) * b(x) modulo the polynomial, bit-reflected (zlib's multmodp); a != 0.
uint32_t multmodp(uint32_t a, uint32_t b) {
  uint32_t m = 1u << 31, p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) == 0) break;
    }
    m >>= 1;
    b = b & 1 ? (b >> 1) ^ kPoly : b >> 1;
  }
  return p;
}

// x^(2^k) modulo the polynomial, k = 0..31.
const std::array<uint32_t, 32>& x2n_table() {
  static const std::array<uint32_t, 32> table = [] {
    std::array<uint32_t, 32> t{};
    uint32_t p = 1u << 30;  // x^1
    t[0] = p;
    for (int k = 1; k < 32; ++k) t[k] = p = multmodp(p, p);
    return t;
  }();
  return table;
}

// x^(8 n) modulo the polynomial: the operator that appends n zero bytes.
uint32_t x8n(uint64_t n) {
  const auto& t = x2n_table();
  uint32_t p = 1u << 31;  // x^0
  for (int k = 3; n; n >>= 1, ++k)
    if (n & 1) p = multmodp(t[k & 31], p);
  return p;
}

// CRC-32C of A B from crc(A), crc(B) and |B|, given shift = x8n(|B|).
inline uint32_t join(uint32_t crc_a, uint32_t crc_b, uint32_t shift) { return multmodp(shift, crc_a) ^ crc_b; }

const std::array<uint32_t, 256>& byte_table() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int j = 0; j < 8; ++j) c = c & 1 ? (c >> 1) ^ kPoly : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  return table;
}

// The CRC register over p[0..n) (no inversions: the caller's).
uint32_t update_table(uint32_t reg, const uint8_t* p, int64_t n) {
  const auto& t = byte_table();
  for (int64_t i = 0; i < n; ++i) reg = t[(reg ^ p[i]) & 0xff] ^ (reg >> 8);
  return reg;
}

#if defined(FLOCORA_X86) && defined(__GNUC__)
__attribute__((target("sse4.2"))) uint32_t update_hw(uint32_t reg, const uint8_t* p, int64_t n) {
  uint64_t r = reg;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    r = _mm_crc32_u64(r, w);
  }
  uint32_t r32 = (uint32_t)r;
  for (; i < n; ++i) r32 = _mm_crc32_u8(r32, p[i]);
  return r32;
}

// CRC-32C of p[0..n), n >= kStreamsMin: kStreams chains over equal parts of
// whole 8-byte words, joined, then the rest.
__attribute__((target("sse4.2"))) uint32_t crc_streams_hw(const uint8_t* p, int64_t n) {
  const int64_t part = n / kStreams / 8 * 8;
  uint64_t r[kStreams];
  for (int s = 0; s < kStreams; ++s) r[s] = 0xffffffffu;
  for (int64_t i = 0; i < part; i += 8) {
    for (int s = 0; s < kStreams; ++s) {
      uint64_t w;
      std::memcpy(&w, p + s * part + i, 8);
      r[s] = _mm_crc32_u64(r[s], w);
    }
  }
  const uint32_t shift = x8n((uint64_t)part);
  uint32_t crc = ~(uint32_t)r[0];
  for (int s = 1; s < kStreams; ++s) crc = join(crc, ~(uint32_t)r[s], shift);
  return ~update_hw(~crc, p + kStreams * part, n - kStreams * part);
}
#endif

// CRC-32C of p[0..n) on this thread.
uint32_t crc_serial(const uint8_t* p, int64_t n) {
#if defined(FLOCORA_X86) && defined(__GNUC__)
  if (cpu_isa() >= 1)  // AVX2 CPUs have SSE4.2
    return n >= kStreamsMin ? crc_streams_hw(p, n) : ~update_hw(0xffffffffu, p, n);
#endif
  return ~update_table(0xffffffffu, p, n);
}

int64_t crc32c_cpu(const at::Tensor& data, int64_t value) {
  const char* op = "flocora::_crc32c";
  TORCH_CHECK(data.device().is_cpu() && data.scalar_type() == at::kByte && data.dim() == 1 && data.is_contiguous(), op,
              ": data must be a contiguous 1-D uint8 CPU tensor");
  TORCH_CHECK(value >= 0 && value <= 0xffffffffLL, op, ": value must be a CRC-32C (0 .. 2^32 - 1), got ", value);
  const uint8_t* p = data.data_ptr<uint8_t>();
  const int64_t n = data.numel();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kThreadMin));
  uint32_t crc;
  if (parts == 1 || at::in_parallel_region()) {
    crc = crc_serial(p, n);
  } else {
    std::vector<uint32_t> crcs(parts);
    const int64_t share = n / parts;
    at::parallel_for(0, parts, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t q = lo; q < hi; ++q) {
        const int64_t b = q * share, e = q == parts - 1 ? n : b + share;
        crcs[q] = crc_serial(p + b, e - b);
      }
    });
    crc = crcs[0];
    const uint32_t shift = x8n((uint64_t)share);
    for (int64_t q = 1; q < parts - 1; ++q) crc = join(crc, crcs[q], shift);
    crc = join(crc, crcs[parts - 1], x8n((uint64_t)(n - (parts - 1) * share)));
  }
  // Continuing from `value` (the CRC of bytes before these): join as above.
  return value == 0 ? (int64_t)crc : (int64_t)join((uint32_t)value, crc, x8n((uint64_t)n));
}

}  // namespace

}  // namespace cpu
}  // namespace flocora

TORCH_LIBRARY_IMPL(flocora, CPU, m) { m.impl("_crc32c", &flocora::cpu::crc32c_cpu); }
