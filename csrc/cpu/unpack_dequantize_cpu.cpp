// CPU kernel of unpack_dequantize (schema: csrc/ops.cpp; argument checks:
// csrc/include/flocora/host_checks.h; loops: quant_loops.h).
//
// The output is cut into pieces of kQuantChunk elements over *all* tensors of
// the call and run with one at::parallel_for: each piece unpacks its codes,
// dequantizes them group by group and narrows to the output dtype.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include <flocora/affine.h>
#include <flocora/host_checks.h>

#include "huge_pages.h"
#include "quant_loops.h"

namespace flocora {
namespace cpu {

at::Tensor unpack_dequantize_cpu(const at::Tensor& packed_in, const at::Tensor& scales_in, const at::Tensor& offsets_in,
                                 int64_t bits, at::IntArrayRef numels, at::IntArrayRef group_sizes,
                                 at::ScalarType dtype) {
  const char* op = "flocora::unpack_dequantize";
  const UnpackLayout lay =
      unpack_dequantize_layout(op, packed_in, scales_in, offsets_in, bits, numels, group_sizes, dtype, [&]() {
        TORCH_CHECK(packed_in.device().is_cpu() && scales_in.device().is_cpu() && offsets_in.device().is_cpu(), op,
                    ": all tensors must be on the CPU");
      });

  at::Tensor packed = packed_in.contiguous(), scales = scales_in.contiguous(), offsets = offsets_in.contiguous();
  at::Tensor result = at::empty({lay.total}, at::TensorOptions().dtype(dtype).device(packed.device()));
  advise_huge_pages(result.data_ptr(), (size_t)result.nbytes());
  const bool meta_half = lay.meta_half;
  const uint8_t* src = packed.data_ptr<uint8_t>();
  const void* sc = scales.data_ptr();
  const void* of = offsets.data_ptr();
  auto meta_at = [&](const void* base, int64_t g) {
    return meta_half ? flocora::half_to_float(static_cast<const uint16_t*>(base)[g])
                     : static_cast<const float*>(base)[g];
  };

  struct Piece {
    int32_t tensor;
    int64_t begin, end;
  };
  std::vector<Piece> pieces;
  for (size_t i = 0; i < lay.ts.size(); ++i)
    for (int64_t b = 0; b < lay.ts[i].numel; b += kQuantChunk)
      pieces.push_back({(int32_t)i, b, std::min(lay.ts[i].numel, b + kQuantChunk)});
  const QuantLoops& L = loops();
  char* dst_base = static_cast<char*>(result.data_ptr());
  const int64_t out_size = result.element_size();
  at::parallel_for(0, (int64_t)pieces.size(), kTasksPerThreadMin, [&](int64_t lo, int64_t hi) {
    std::vector<uint8_t> codes(kQuantChunk);
    std::vector<float> fbuf(dtype == at::kFloat ? 0 : kQuantChunk);
    for (int64_t k = lo; k < hi; ++k) {
      const Piece& pc = pieces[k];
      const UnpackTensor& t = lay.ts[pc.tensor];
      const int64_t G = t.group, n = pc.end - pc.begin;
      L.unpack[bits](src + t.byte_base + pc.begin * bits / 8, n, codes.data());
      float* outf = dtype == at::kFloat ? reinterpret_cast<float*>(dst_base) + t.elem_base + pc.begin : fbuf.data();
      for (int64_t s = pc.begin; s < pc.end;) {
        int64_t g = s / G, se = std::min(pc.end, (g + 1) * G);
        L.dequantize(codes.data() + (s - pc.begin), se - s, meta_at(of, t.group_base + g),
                     meta_at(sc, t.group_base + g), outf + (s - pc.begin));
        s = se;
      }
      if (dtype == at::kHalf) {
        L.float_to_half(outf, n, reinterpret_cast<uint16_t*>(dst_base + out_size * (t.elem_base + pc.begin)));
      } else if (dtype == at::kBFloat16) {
        uint16_t* d = reinterpret_cast<uint16_t*>(dst_base + out_size * (t.elem_base + pc.begin));
        for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16_rn(outf[i]);
      }
    }
  });
  return result;
}

}  // namespace cpu
}  // namespace flocora

TORCH_LIBRARY_IMPL(flocora, CPU, m) { m.impl("unpack_dequantize", &flocora::cpu::unpack_dequantize_cpu); }
