// Checks on caller-owned outputs of the CPU in-place decoders.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace flocora {
namespace cpu {

// True if no two of the tensors share a byte of memory (empty ones never do).
inline bool tensors_disjoint(at::TensorList outs) {
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  spans.reserve(outs.size());
  for (const at::Tensor& o : outs) {
    if (o.numel() == 0) continue;
    int64_t extent = 1;
    for (int64_t d = 0; d < o.dim(); ++d) extent += (o.size(d) - 1) * o.stride(d);
    uintptr_t p = reinterpret_cast<uintptr_t>(o.data_ptr());
    spans.push_back({p, p + (uintptr_t)(extent * o.element_size())});
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].first < spans[i - 1].second) return false;
  return true;
}

// No two outputs may overlap in memory: an element written twice would race.
inline void check_outputs_disjoint(const char* op, at::TensorList outs) {
  TORCH_CHECK(tensors_disjoint(outs), op, ": output tensors overlap in memory");
}

}  // namespace cpu
}  // namespace flocora
