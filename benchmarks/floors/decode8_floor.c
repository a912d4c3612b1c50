// How fast can any 8-bit decode into a reused fp32 output be? This times the
// two things such a decode cannot avoid, next to the simplest decode loop:
//   fill    writes the output (16 fp32 per store), nothing else: what
//           `flocora-codec bench` calls the fill in its `ceiling` column;
//   read    reads the codes (one byte per value), nothing else;
//   decode  both: offset + code * scale per value, group 64, fp32 metadata
//           (the arithmetic of the codec's AVX-512 decode loop).
// Each runs on every OpenMP thread over its own share, best of many rounds,
// the three interleaved so that drift hits all alike.
//
//   gcc -O2 -mavx512f -fopenmp -o /tmp/decode8_floor benchmarks/floors/decode8_floor.c
//   OMP_NUM_THREADS=2 /tmp/decode8_floor 16      # MiB of output
//
// If decode takes about fill + read, the loop is bound by memory traffic,
// and no decode into (ours or a compiled one) beats that sum with ordinary
// stores. `ceiling` over (decode / fill) is then the most any decode could
// gain over the compiled formulation.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { kGroup = 64 };

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void fill(float* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(out + i, one);
}

static int read_codes(const uint8_t* codes, int64_t n) {
  __m512i acc = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 64) acc = _mm512_xor_si512(acc, _mm512_loadu_si512((const void*)(codes + i)));
  return _mm512_reduce_add_epi32(acc);  // keeps the loads
}

static void decode(const uint8_t* codes, int64_t groups, const float* scale, const float* offset, float* out) {
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 off = _mm512_set1_ps(offset[g]), sc = _mm512_set1_ps(scale[g]);
    for (int t = 0; t < kGroup / 16; ++t) {
      const __m128i c = _mm_loadu_si128((const __m128i*)(codes + g * kGroup + 16 * t));
      const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c));
      _mm512_storeu_ps(out + g * kGroup + 16 * t, _mm512_add_ps(off, _mm512_mul_ps(q, sc)));
    }
  }
}

int main(int argc, char** argv) {
  const int64_t mib = argc > 1 ? atoll(argv[1]) : 16;
  const int64_t n = mib * 1024 * 1024 / 4, groups = n / kGroup;
  const int threads = omp_get_max_threads();
  if (mib <= 0 || groups % threads != 0) {
    fprintf(stderr, "usage: %s MIB (a positive size whose groups split evenly over %d threads)\n", argv[0], threads);
    return 2;
  }
  float* out = aligned_alloc(64, n * 4);
  uint8_t* codes = aligned_alloc(64, n);
  float* scale = aligned_alloc(64, groups * 4);
  float* offset = aligned_alloc(64, groups * 4);
  if (!out || !codes || !scale || !offset) return 1;
  for (int64_t i = 0; i < n; ++i) codes[i] = (uint8_t)(i * 2654435761u >> 24);
  for (int64_t g = 0; g < groups; ++g) scale[g] = 0.01f, offset[g] = -1.0f;
  memset(out, 0, n * 4);
  const char* names[3] = {"fill", "read", "decode"};
  double best[3] = {1e9, 1e9, 1e9};
  volatile int sink = 0;
  const int64_t share = groups / threads;
  for (int round = 0; round < 300; ++round) {
    for (int k = 0; k < 3; ++k) {
      const double t0 = now();
#pragma omp parallel
      {
        const int64_t g0 = share * omp_get_thread_num();
        if (k == 0) fill(out + g0 * kGroup, share * kGroup);
        if (k == 1) sink += read_codes(codes + g0 * kGroup, share * kGroup);
        if (k == 2) decode(codes + g0 * kGroup, share, scale + g0, offset + g0, out + g0 * kGroup);
      }
      const double t = now() - t0;
      if (t < best[k]) best[k] = t;
    }
  }
  printf("%lld MiB output, %d threads, best of 300:", (long long)mib, threads);
  for (int k = 0; k < 3; ++k) printf("  %s %.3f ms", names[k], best[k] * 1e3);
  printf("  decode / fill %.2fx, (fill + read) / fill %.2fx\n", best[2] / best[0], (best[0] + best[1]) / best[0]);
  return 0;
}
