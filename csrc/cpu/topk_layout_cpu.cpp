// The byte layout of a planned message whose top-k counts change with the
// data (a global selection): flocora::_topk_layout. From the kernels' counts
// it finds every top-k tensor's section lengths and index code (FORMAT.md
// 3.3), every tensor's start, the copy_to_bytes_ ranges that put the
// kernels' outputs and the raw tensors in place, and the header's top-k
// fields (count, index code, section lengths) as records for the same copy.
// In Python these cost about 65 us a message of 82 tensors on every encode
// (codec._encode_with_plan; reference.topk_layout is that formulation).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include <flocora/affine.h>

namespace flocora {
namespace cpu {

namespace {

constexpr int64_t kFieldBytes = 33;  // count u64, index code u8, metadata, index and payload lengths u64
enum Kind : int64_t { kPlain = 0, kSign = 1, kQuantized = 2 };

const int64_t* rows_of(const char* op, const at::Tensor& t, int64_t width, const char* what) {
  TORCH_CHECK(
      t.device().is_cpu() && t.scalar_type() == at::kLong && t.is_contiguous() && t.dim() == 2 && t.size(1) == width,
      op, ": ", what, " must be a contiguous int64 CPU tensor of shape (n, ", width, ")");
  return t.data_ptr<int64_t>();
}

void put_u64(uint8_t* p, int64_t v) {
  const uint64_t u = (uint64_t)v;
  for (int b = 0; b < 8; ++b) p[b] = (uint8_t)(u >> (8 * b));  // little-endian on every host
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, int64_t> topk_layout_cpu(const at::Tensor& pieces, const at::Tensor& members,
                                                            const at::Tensor& counts, const at::Tensor& kinds,
                                                            const at::Tensor& field_positions, int64_t num_tensors,
                                                            int64_t header_len, int64_t fields_src) {
  const char* op = "flocora::_topk_layout";
  const int64_t* pc = rows_of(op, pieces, 4, "pieces");
  const int64_t* mb = rows_of(op, members, 3, "members");
  const int64_t* kd = rows_of(op, kinds, 5, "kinds");
  const int64_t np = pieces.size(0), nm = members.size(0), ng = kinds.size(0);
  TORCH_CHECK(counts.device().is_cpu() && counts.scalar_type() == at::kLong && counts.is_contiguous() &&
                  counts.dim() == 1 && counts.numel() == nm,
              op, ": counts must be a contiguous 1-D int64 CPU tensor, one per member");
  TORCH_CHECK(field_positions.device().is_cpu() && field_positions.scalar_type() == at::kLong &&
                  field_positions.is_contiguous() && field_positions.dim() == 1 &&
                  (field_positions.numel() == nm || field_positions.numel() == 0),
              op, ": field_positions must be a contiguous 1-D int64 CPU tensor, one per member or none");
  TORCH_CHECK(num_tensors >= 0 && header_len >= 0 && fields_src >= 0, op, ": negative size");
  const int64_t* cnt = counts.data_ptr<int64_t>();
  const int64_t* fpos = field_positions.numel() ? field_positions.data_ptr<int64_t>() : nullptr;
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t* k = kd + 5 * g;
    TORCH_CHECK(k[0] >= kPlain && k[0] <= kQuantized && k[1] > 0 && k[4] >= 0, op, ": group ", g,
                " has a bad kind row");
    TORCH_CHECK(k[0] != kQuantized || (k[2] >= 1 && k[2] <= 8 && k[3] >= 0), op, ": group ", g,
                " has bad quantized parameters");
  }

  // Section bytes of each member, source by source, in section order (at most four sources).
  std::vector<int64_t> lens(4 * nm, 0);
  std::vector<int64_t> sizes(num_tensors, 0);
  std::vector<uint8_t> codes(nm, 0);
  std::vector<int64_t> meta(nm, 0);
  for (int64_t j = 0; j < nm; ++j) {
    const int64_t t = mb[3 * j], n = mb[3 * j + 1], g = mb[3 * j + 2], c = cnt[j];
    TORCH_CHECK(t >= 0 && t < num_tensors && g >= 0 && g < ng && n > 0 && c >= 0 && c <= n, op, ": member ", j,
                " is out of range");
    const int64_t* k = kd + 5 * g;
    const int64_t index = index_nbytes(n, c);
    codes[j] = (uint8_t)choose_index_code(n, c);
    int64_t* l = lens.data() + 4 * j;
    if (k[0] == kPlain) {
      l[0] = index;
      l[1] = c * k[1];
    } else if (k[0] == kSign) {
      meta[j] = c ? k[1] : 0;
      l[0] = meta[j];
      l[1] = index;
      l[2] = (c + 7) / 8;
    } else {
      const int64_t groups = k[3] == 0 ? (c > 0) : num_groups(c, k[3]);
      meta[j] = 2 * groups * k[1];
      l[0] = l[1] = groups * k[1];
      l[2] = index;
      l[3] = packed_nbytes(c, (int)k[2]);
    }
    sizes[t] += l[0] + l[1] + l[2] + l[3];
  }
  for (int64_t r = 0; r < np; ++r) {
    const int64_t t = pc[4 * r];
    TORCH_CHECK(t >= 0 && t < num_tensors && pc[4 * r + 1] >= 0 && pc[4 * r + 2] >= 0 && pc[4 * r + 3] >= 0, op,
                ": piece ", r, " is out of range");
    sizes[t] += pc[4 * r + 3];
  }
  std::vector<int64_t> at(num_tensors);  // where each tensor's next piece goes
  int64_t end = header_len;
  for (int64_t t = 0; t < num_tensors; ++t) {
    at[t] = end;
    end += sizes[t];
  }

  std::vector<int64_t> out;
  out.reserve(4 * (np + 4 * nm + nm));
  auto range = [&](int64_t src, int64_t src_off, int64_t dst, int64_t n) {
    if (n == 0) return;
    out.insert(out.end(), {src, src_off, dst, n});
  };
  for (int64_t r = 0; r < np; ++r) {
    const int64_t* p = pc + 4 * r;
    range(p[1], p[2], at[p[0]], p[3]);
    at[p[0]] += p[3];
  }
  std::vector<int64_t> src_off(4 * ng, 0);  // bytes of each group's sources taken so far
  for (int64_t j = 0; j < nm; ++j) {
    const int64_t t = mb[3 * j], g = mb[3 * j + 2];
    const int64_t* l = lens.data() + 4 * j;
    for (int s = 0; s < 4; ++s) {
      range(kd[5 * g + 4] + s, src_off[4 * g + s], at[t], l[s]);
      src_off[4 * g + s] += l[s];
      at[t] += l[s];
    }
  }

  at::Tensor fields = at::empty({fpos ? nm * kFieldBytes : 0}, at::TensorOptions().dtype(at::kByte));
  if (fpos) {
    uint8_t* f = fields.data_ptr<uint8_t>();
    for (int64_t j = 0; j < nm; ++j, f += kFieldBytes) {
      const int64_t* l = lens.data() + 4 * j;
      const int64_t g = mb[3 * j + 2], kind = kd[5 * g];
      const int64_t index = kind == kPlain ? l[0] : l[kind == kSign ? 1 : 2];
      const int64_t payload = kind == kPlain ? l[1] : l[kind == kSign ? 2 : 3];
      put_u64(f, cnt[j]);
      f[8] = codes[j];
      put_u64(f + 9, meta[j]);
      put_u64(f + 17, index);
      put_u64(f + 25, payload);
      TORCH_CHECK(fpos[j] >= 0 && fpos[j] + kFieldBytes <= header_len, op, ": field position ", fpos[j],
                  " is outside the header");
      range(fields_src, j * kFieldBytes, fpos[j], kFieldBytes);
    }
  }
  at::Tensor ranges = at::empty({(int64_t)out.size()}, at::TensorOptions().dtype(at::kLong));
  if (!out.empty()) std::memcpy(ranges.data_ptr<int64_t>(), out.data(), out.size() * sizeof(int64_t));
  return {ranges, fields, end};
}

}  // namespace cpu
}  // namespace flocora

TORCH_LIBRARY_IMPL(flocora, CPU, m) { m.impl("_topk_layout", &flocora::cpu::topk_layout_cpu); }
