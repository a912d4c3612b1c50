// Sign values (FORMAT.md 3.3, values = 5) of a top-k group in one pass:
// flocora::_sign_sections. Each member's kept values (back to back in
// `values`, counts[i] of them) give STC's mean magnitude mu in float64 (the
// sum of their magnitudes over the count; the caller rounds it), for members
// that keep any, and a stream of sign bits (1 for v >= 0, -0.0 included) padded
// to a whole byte. As numpy calls per member (packbits,
// reduceat) they cost about 1.5 us a tensor: 0.12 ms for the 74 tensors of a
// global 10% of a ResNet-18 adapter set.
//
// The magnitudes are summed in 16 lanes (lane j: the values at member
// positions i = j mod 16, in order), the lanes then pairwise (0+1, 2+3, ...,
// then the pairs' sums pairwise, down to one): a fixed order, so that
// reference.magnitude_sum computes the same sums, with 16 independent chains
// of additions instead of one (a single chain waited on every addition).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "quant_loops.h"  // cpu_isa, FLOCORA_X86
#if defined(FLOCORA_X86) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace flocora {
namespace cpu {

namespace {

constexpr int kLanes = 16;

double combine_lanes(const double* s) {
  double t[kLanes];
  for (int j = 0; j < kLanes; ++j) t[j] = s[j];
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int j = 0; j < width; ++j) t[j] = t[2 * j] + t[2 * j + 1];
  return t[0];
}

double magnitude_sum_scalar(const float* v, int64_t n) {
  double s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) s[j] += (double)std::fabs(v[i + j]);
  for (int j = 0; i + j < n; ++j) s[j] += (double)std::fabs(v[i + j]);
  return combine_lanes(s);
}

// Sign bits of v[0..n), LSB first, into out[0..ceil(n / 8)); padding bits zero.
void pack_signs_scalar(const float* v, int64_t n, uint8_t* out) {
  for (int64_t i = 0; i < n; i += 8) {
    uint32_t b = 0;
    for (int j = 0; j < 8 && i + j < n; ++j) b |= (uint32_t)(v[i + j] >= 0.0f) << j;  // NaN: 0 (the caller refuses it)
    *out++ = (uint8_t)b;
  }
}

#if defined(FLOCORA_X86) && defined(__GNUC__)
__attribute__((target("avx2"))) double magnitude_sum_avx2(const float* v, int64_t n) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {  // acc[q] holds lanes 4q..4q+3
    const __m256 a = _mm256_and_ps(_mm256_loadu_ps(v + i), magnitude);
    const __m256 b = _mm256_and_ps(_mm256_loadu_ps(v + i + 8), magnitude);
    acc[0] = _mm256_add_pd(acc[0], _mm256_cvtps_pd(_mm256_castps256_ps128(a)));
    acc[1] = _mm256_add_pd(acc[1], _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
    acc[2] = _mm256_add_pd(acc[2], _mm256_cvtps_pd(_mm256_castps256_ps128(b)));
    acc[3] = _mm256_add_pd(acc[3], _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1)));
  }
  double s[kLanes];
  for (int q = 0; q < 4; ++q) _mm256_storeu_pd(s + 4 * q, acc[q]);
  for (int j = 0; i + j < n; ++j) s[j] += (double)std::fabs(v[i + j]);
  return combine_lanes(s);
}

__attribute__((target("avx2"))) void pack_signs_avx2(const float* v, int64_t n, uint8_t* out) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    *out++ = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + i), zero, _CMP_GE_OQ));
  if (i < n) pack_signs_scalar(v + i, n - i, out);
}
#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor> sign_sections_cpu(const at::Tensor& values, at::IntArrayRef counts) {
  const char* op = "flocora::_sign_sections";
  TORCH_CHECK(
      values.device().is_cpu() && values.scalar_type() == at::kFloat && values.dim() == 1 && values.is_contiguous(), op,
      ": values must be a contiguous 1-D float32 CPU tensor");
  int64_t total = 0, nbytes = 0;
  for (int64_t c : counts) {
    TORCH_CHECK(c >= 0 && c <= values.numel() - total, op, ": counts must be >= 0 and add up to values' ",
                values.numel(), " elements");
    total += c;
    nbytes += (c + 7) / 8;
  }
  TORCH_CHECK(total == values.numel(), op, ": counts add up to ", total, ", values has ", values.numel());
  int64_t kept = 0;
  for (int64_t c : counts) kept += c > 0;
  at::Tensor mus = at::empty({kept}, values.options().dtype(at::kDouble));
  at::Tensor signs = at::empty({nbytes}, values.options().dtype(at::kByte));
  const float* v = values.data_ptr<float>();
  double* mu = mus.data_ptr<double>();
  uint8_t* out = signs.data_ptr<uint8_t>();
  const bool avx2 = cpu_isa() >= 1;
  for (int64_t c : counts) {  // small: a top-k group's kept values, one thread
    if (c == 0) continue;
    double sum;
#if defined(FLOCORA_X86) && defined(__GNUC__)
    if (avx2) {
      sum = magnitude_sum_avx2(v, c);
      pack_signs_avx2(v, c, out);
    } else
#endif
    {
      sum = magnitude_sum_scalar(v, c);
      pack_signs_scalar(v, c, out);
    }
    *mu++ = sum / (double)c;
    v += c;
    out += (c + 7) / 8;
  }
  return {mus, signs};
}

}  // namespace cpu
}  // namespace flocora

TORCH_LIBRARY_IMPL(flocora, CPU, m) { m.impl("_sign_sections", &flocora::cpu::sign_sections_cpu); }
