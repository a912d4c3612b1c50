// CPU kernels of unpack_dequantize and unpack_dequantize_into_ (schemas:
// csrc/ops.cpp; argument checks: csrc/include/flocora/host_checks.h; loops:
// quant_loops.h).
//
// The output is cut into pieces of kQuantChunk elements over *all* tensors of
// the call and run with one at::parallel_for: each piece unpacks its codes,
// dequantizes them group by group and narrows to the output dtype.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include <flocora/affine.h>
#include <flocora/host_checks.h>

#include "huge_pages.h"
#include "out_checks.h"
#include "quant_loops.h"
#include "resident_pages.h"

namespace flocora {
namespace cpu {

namespace {

// Outputs from 32 MiB on are written with streaming stores (measured on a
// 32 MiB L3: 16 MiB outputs decode at 75% of copy_ with ordinary stores and
// 54% streaming; 32 MiB ones at 70% and 95%).
constexpr int64_t kStreamBytes = kPastCachesBytes;

// Where one tensor's elements go: contiguous memory of a float dtype.
struct OutSpan {
  char* ptr;
  at::ScalarType st;
};

// Unpacks and dequantizes every tensor of lay into out[i] (assigning, or
// adding when accumulate: in float32, after rounding the decoded value to the
// output dtype, so the sums equal out + unpack_dequantize(...) in PyTorch).
void unpack_into(const UnpackLayout& lay, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& offsets,
                 int64_t bits, const std::vector<OutSpan>& out, bool accumulate, bool output_mapped) {
  const bool meta_half = lay.meta_half;
  const uint8_t* src = packed.data_ptr<uint8_t>();
  const uint8_t* const src_end = src + packed.numel();
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
  const bool whole_groups = !meta_half && L.decode_groups_f32 != nullptr;
  // Streaming stores skip reading the output lines in before writing them
  // (the bandwidth memcpy gets), but leave nothing in cache: only for
  // outputs that would not fit the last-level cache anyway.
  // An output on pages not yet mapped loses: its page faults bring every
  // line in zeroed anyway (resident_pages.h).
  const bool stream = output_mapped && lay.total * (int64_t)sizeof(float) >= kStreamBytes;
  at::parallel_for(0, (int64_t)pieces.size(), kTasksPerThreadMin, [&](int64_t lo, int64_t hi) {
    std::unique_ptr<uint8_t[]> codes_buf(new uint8_t[kQuantChunk]);
    struct {
      uint8_t* p;
      uint8_t* data() const { return p; }
    } codes{codes_buf.get()};
    std::vector<float> fbuf, gbuf;
    std::vector<uint16_t> hbuf;
    for (int64_t k = lo; k < hi; ++k) {
      const Piece& pc = pieces[k];
      const UnpackTensor& t = lay.ts[pc.tensor];
      const at::ScalarType st = out[pc.tensor].st;
      const int64_t G = t.group, n = pc.end - pc.begin;
      // 8-bit codes are the packed bytes themselves: read them in place.
      const uint8_t* const piece_packed = src + t.byte_base + pc.begin * bits / 8;
      const uint8_t* piece_codes = piece_packed;
      const int64_t g_in = (pc.begin + G - 1) / G, g_out = pc.end / G;  // the piece's whole groups
      const bool whole = whole_groups && G % 16 == 0 && g_in < g_out;
      // Whole groups of narrower codes decode from the packed bytes where the
      // loops can; only the codes of the part groups at either end go
      // through the bytes buffer (each end starts on a byte: a piece starts
      // at a multiple of kQuantChunk, a whole group at a multiple of 16).
      const bool fused = whole && bits != 8 && L.decode_groups_packed_f32 != nullptr;
      if (bits != 8) {
        if (fused) {
          L.unpack[bits](piece_packed, g_in * G - pc.begin, codes.data());
          const int64_t tail = g_out * G - pc.begin;
          L.unpack[bits](piece_packed + tail * bits / 8, n - tail, codes.data() + tail);
        } else {
          L.unpack[bits](piece_packed, n, codes.data());
        }
        piece_codes = codes.data();
      }
      float* outf;
      if (st == at::kFloat && !accumulate) {
        outf = reinterpret_cast<float*>(out[pc.tensor].ptr) + pc.begin;
      } else {
        fbuf.resize(kQuantChunk);
        outf = fbuf.data();
      }
      auto dequantize_range = [&](int64_t b, int64_t e) {  // elements [b, e) of the piece, group by group
        for (int64_t s = b; s < e;) {
          int64_t g = s / G, se = std::min(e, (g + 1) * G);
          L.dequantize(piece_codes + (s - pc.begin), se - s, meta_at(of, t.group_base + g),
                       meta_at(sc, t.group_base + g), outf + (s - pc.begin));
          s = se;
        }
      };
      if (whole) {
        dequantize_range(pc.begin, g_in * G);
        const int64_t at = g_in * G - pc.begin;
        const float* group_sc = static_cast<const float*>(sc) + t.group_base + g_in;
        const float* group_of = static_cast<const float*>(of) + t.group_base + g_in;
        const bool stream_out = stream && outf != fbuf.data();
        if (fused)
          L.decode_groups_packed_f32(piece_packed + at * bits / 8, (int)bits, g_out - g_in, G, group_sc, group_of,
                                     outf + at, stream_out, src_end);
        else
          L.decode_groups_f32(piece_codes + at, g_out - g_in, G, group_sc, group_of, outf + at, stream_out);
        dequantize_range(g_out * G, pc.end);
      } else {
        dequantize_range(pc.begin, pc.end);
      }
      if (st == at::kFloat) {
        if (accumulate) {
          float* d = reinterpret_cast<float*>(out[pc.tensor].ptr) + pc.begin;
          for (int64_t i = 0; i < n; ++i) d[i] = d[i] + outf[i];
        }
      } else if (st == at::kHalf) {
        uint16_t* d = reinterpret_cast<uint16_t*>(out[pc.tensor].ptr) + pc.begin;
        if (!accumulate) {
          L.float_to_half(outf, n, d);
        } else {
          hbuf.resize(kQuantChunk);
          gbuf.resize(kQuantChunk);
          L.float_to_half(outf, n, hbuf.data());  // the decoded value, as its dtype holds it
          L.half_to_float(hbuf.data(), n, outf);
          L.half_to_float(d, n, gbuf.data());
          for (int64_t i = 0; i < n; ++i) gbuf[i] = gbuf[i] + outf[i];
          L.float_to_half(gbuf.data(), n, d);
        }
      } else {  // bfloat16
        uint16_t* d = reinterpret_cast<uint16_t*>(out[pc.tensor].ptr) + pc.begin;
        for (int64_t i = 0; i < n; ++i) {
          uint16_t v = float_to_bf16_rn(outf[i]);
          d[i] = accumulate ? float_to_bf16_rn(bf16_to_float(d[i]) + bf16_to_float(v)) : v;
        }
      }
    }
  });
}

}  // namespace

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
  char* base = static_cast<char*>(result.data_ptr());
  std::vector<OutSpan> out(lay.ts.size());
  for (size_t i = 0; i < lay.ts.size(); ++i) out[i] = {base + result.element_size() * lay.ts[i].elem_base, dtype};
  const bool mapped = result.nbytes() >= (size_t)kStreamBytes && pages_resident(base, result.nbytes());
  unpack_into(lay, packed, scales, offsets, bits, out, false, /*output_mapped=*/mapped);
  return result;
}

// unpack_dequantize into caller-owned tensors: tensor i of the stream goes to
// outs[i] (its numel), in place; no output is allocated (a non-contiguous
// output is written through a contiguous copy). All checks run before any
// output is touched.
void unpack_dequantize_into__cpu(at::TensorList outs, const at::Tensor& packed_in, const at::Tensor& scales_in,
                                 const at::Tensor& offsets_in, int64_t bits, at::IntArrayRef group_sizes,
                                 bool accumulate) {
  const char* op = "flocora::unpack_dequantize_into_";
  std::vector<int64_t> numels(outs.size());
  for (size_t i = 0; i < outs.size(); ++i) {
    TORCH_CHECK(outs[i].device().is_cpu(), op, ": output ", i, " is on ", outs[i].device(),
                "; all tensors must be on the CPU");
    Dt dt;
    TORCH_CHECK(float_dt(outs[i].scalar_type(), &dt), op, ": output ", i, " has dtype ", outs[i].scalar_type(),
                " (expected float32, float16 or bfloat16)");
    numels[i] = outs[i].numel();
  }
  check_outputs_disjoint(op, outs);
  const UnpackLayout lay =
      unpack_dequantize_layout(op, packed_in, scales_in, offsets_in, bits, numels, group_sizes, at::kFloat, [&]() {
        TORCH_CHECK(packed_in.device().is_cpu() && scales_in.device().is_cpu() && offsets_in.device().is_cpu(), op,
                    ": all tensors must be on the CPU");
      });
  at::Tensor packed = packed_in.contiguous(), scales = scales_in.contiguous(), offsets = offsets_in.contiguous();
  std::vector<at::Tensor> work(outs.size());
  std::vector<OutSpan> out(outs.size());
  for (size_t i = 0; i < outs.size(); ++i) {
    work[i] = outs[i].is_contiguous()
                  ? outs[i]
                  : (accumulate ? outs[i].contiguous() : at::empty_like(outs[i], at::MemoryFormat::Contiguous));
    out[i] = {numels[i] ? static_cast<char*>(work[i].data_ptr()) : nullptr, outs[i].scalar_type()};
  }
  unpack_into(lay, packed, scales, offsets, bits, out, accumulate, /*output_mapped=*/true);
  for (size_t i = 0; i < outs.size(); ++i)
    if (!outs[i].is_contiguous()) outs[i].copy_(work[i]);
}

void copy_from_bytes__cpu(at::TensorList outs, const at::Tensor& src, at::IntArrayRef offsets) {
  const char* op = "flocora::_copy_from_bytes_";
  TORCH_CHECK(src.device().is_cpu() && src.scalar_type() == at::kByte && src.is_contiguous(), op,
              ": src must be a contiguous uint8 CPU tensor");
  TORCH_CHECK(offsets.size() == outs.size(), op, ": got ", offsets.size(), " offsets for ", outs.size(), " outputs");
  int64_t total = 0;
  for (size_t i = 0; i < outs.size(); ++i) {
    TORCH_CHECK(outs[i].device().is_cpu() && outs[i].is_contiguous(), op, ": output ", i,
                " must be a contiguous CPU tensor");
    const int64_t n = (int64_t)outs[i].nbytes();
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] <= src.numel() && n <= src.numel() - offsets[i], op, ": output ", i, " (",
                n, " bytes at ", offsets[i], ") reaches past src (", src.numel(), " bytes)");
    total += n;
  }
  check_outputs_disjoint(op, outs);
  const uint8_t* base = src.data_ptr<uint8_t>();
  // One task per tensor; a second thread only pays for itself past ~1 MiB.
  at::parallel_for(0, (int64_t)outs.size(), total >= (1 << 20) ? 1 : (int64_t)outs.size() + 1,
                   [&](int64_t lo, int64_t hi) {
                     for (int64_t i = lo; i < hi; ++i)
                       if (outs[i].nbytes()) std::memcpy(outs[i].data_ptr(), base + offsets[i], outs[i].nbytes());
                   });
}

void copy_to_bytes__cpu(const at::Tensor& dst, at::TensorList srcs, const at::Tensor& ranges_t) {
  const char* op = "flocora::_copy_to_bytes_";
  TORCH_CHECK(dst.device().is_cpu() && dst.scalar_type() == at::kByte && dst.is_contiguous(), op,
              ": dst must be a contiguous uint8 CPU tensor");
  TORCH_CHECK(ranges_t.device().is_cpu() && ranges_t.scalar_type() == at::kLong && ranges_t.dim() == 1 &&
                  ranges_t.is_contiguous(),
              op, ": ranges must be a contiguous 1-D int64 CPU tensor");
  const at::IntArrayRef ranges(ranges_t.data_ptr<int64_t>(), (size_t)ranges_t.numel());
  TORCH_CHECK(ranges.size() % 4 == 0, op, ": ranges must be quadruples (source, offset, dst offset, bytes); got ",
              ranges.size(), " numbers");
  const uintptr_t dst_lo = (uintptr_t)dst.data_ptr(), dst_hi = dst_lo + (uintptr_t)dst.numel();
  for (size_t i = 0; i < srcs.size(); ++i) {
    TORCH_CHECK(srcs[i].device().is_cpu() && srcs[i].is_contiguous(), op, ": source ", i,
                " must be a contiguous CPU tensor");
    const uintptr_t lo = (uintptr_t)srcs[i].data_ptr(), hi = lo + (uintptr_t)srcs[i].nbytes();
    TORCH_CHECK(srcs[i].nbytes() == 0 || hi <= dst_lo || lo >= dst_hi, op, ": source ", i, " overlaps dst");
  }
  const int64_t nr = (int64_t)ranges.size() / 4;
  std::vector<std::pair<int64_t, int64_t>> spans;  // dst [begin, end) of each range
  spans.reserve(nr);
  int64_t total = 0;
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t s = ranges[4 * r], so = ranges[4 * r + 1], d = ranges[4 * r + 2], n = ranges[4 * r + 3];
    TORCH_CHECK(s >= 0 && s < (int64_t)srcs.size(), op, ": range ", r, " names source ", s, " of ", srcs.size());
    const int64_t sn = (int64_t)srcs[s].nbytes();
    TORCH_CHECK(n >= 0 && so >= 0 && so <= sn && n <= sn - so, op, ": range ", r, " (", n, " bytes at ", so,
                ") reaches past source ", s, " (", sn, " bytes)");
    TORCH_CHECK(d >= 0 && d <= dst.numel() && n <= dst.numel() - d, op, ": range ", r, " (", n, " bytes at ", d,
                ") reaches past dst (", dst.numel(), " bytes)");
    if (n) spans.emplace_back(d, d + n);
    total += n;
  }
  std::sort(spans.begin(), spans.end());
  for (size_t k = 1; k < spans.size(); ++k)
    TORCH_CHECK(spans[k].first >= spans[k - 1].second, op, ": dst ranges overlap at byte ", spans[k].first);
  uint8_t* out = dst.data_ptr<uint8_t>();
  // A second thread only pays for itself past ~1 MiB.
  at::parallel_for(0, nr, total >= (1 << 20) ? 1 : nr + 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      if (ranges[4 * r + 3])
        std::memcpy(out + ranges[4 * r + 2],
                    static_cast<const uint8_t*>(srcs[ranges[4 * r]].data_ptr()) + ranges[4 * r + 1], ranges[4 * r + 3]);
  });
}

}  // namespace cpu
}  // namespace flocora

TORCH_LIBRARY_IMPL(flocora, CPU, m) {
  m.impl("_copy_to_bytes_", &flocora::cpu::copy_to_bytes__cpu);
  m.impl("_copy_from_bytes_", &flocora::cpu::copy_from_bytes__cpu);
  m.impl("unpack_dequantize", &flocora::cpu::unpack_dequantize_cpu);
  m.impl("unpack_dequantize_into_", &flocora::cpu::unpack_dequantize_into__cpu);
}

namespace flocora {
namespace cpu {
namespace {

// _plan_layout's descriptor of ts, appended to d: count, then per tensor its
// dtype, rank and sizes. False if some tensor is not a strided CPU tensor.
bool plan_layout(at::TensorList ts, std::vector<int64_t>* d) {
  d->push_back((int64_t)ts.size());
  for (const at::Tensor& t : ts) {
    if (!t.device().is_cpu() || t.layout() != at::kStrided) return false;
    d->push_back((int64_t)t.scalar_type());
    d->push_back(t.dim());
    for (int64_t s : t.sizes()) d->push_back(s);
  }
  return true;
}

}  // namespace

// _split_views: tensors sharing flat's storage, made as ATen makes a view
// (alias_with_sizes_and_strides), without a dispatch per tensor.
std::vector<at::Tensor> split_views(const at::Tensor& flat, const at::Tensor& layout) {
  const char* op = "flocora::_split_views";
  TORCH_CHECK(flat.dim() == 1 && flat.is_contiguous() && !flat.is_quantized(), op,
              ": flat must be a 1-D contiguous tensor");
  TORCH_CHECK(
      layout.device().is_cpu() && layout.scalar_type() == at::kLong && layout.dim() == 1 && layout.is_contiguous(), op,
      ": layout must be a contiguous 1-D int64 CPU tensor");
  const int64_t* p = layout.data_ptr<int64_t>();
  const int64_t n = layout.numel(), numel = flat.numel();
  std::vector<at::Tensor> out;
  for (int64_t i = 0; i < n;) {
    TORCH_CHECK(i + 2 <= n, op, ": layout ends inside an entry");
    const int64_t offset = p[i], nd = p[i + 1];
    TORCH_CHECK(nd >= 0 && nd <= 64 && i + 2 + 2 * nd <= n, op, ": bad ndim ", nd, " at layout position ", i);
    const int64_t* sizes = p + i + 2;
    const int64_t* strides = sizes + nd;
    bool empty = false;
    for (int64_t d = 0; d < nd; ++d) {
      TORCH_CHECK(sizes[d] >= 0 && strides[d] >= 0, op, ": negative size or stride at layout position ", i);
      empty |= sizes[d] == 0;
    }
    TORCH_CHECK(offset >= 0 && offset <= numel, op, ": view at layout position ", i, " starts outside flat's ", numel,
                " elements");
    if (!empty) {
      int64_t last = offset;  // the largest element index the view reaches, kept below numel (no overflow)
      for (int64_t d = 0; d < nd; ++d)
        if (strides[d] > 0) {
          TORCH_CHECK(sizes[d] - 1 <= (numel - 1 - last) / strides[d], op, ": view at layout position ", i,
                      " reaches past flat's ", numel, " elements");
          last += (sizes[d] - 1) * strides[d];
        }
      TORCH_CHECK(last < numel, op, ": view at layout position ", i, " reaches past flat's ", numel, " elements");
    }
    at::Tensor v = at::detail::make_tensor<c10::TensorImpl>(c10::TensorImpl::VIEW, c10::Storage(flat.storage()),
                                                            flat.key_set(), flat.dtype());
    c10::TensorImpl* impl = v.unsafeGetTensorImpl();
    impl->set_storage_offset(flat.storage_offset() + offset);
    impl->set_sizes_and_strides(c10::IntArrayRef(sizes, nd), c10::IntArrayRef(strides, nd));
    out.push_back(std::move(v));
    i += 2 + 2 * nd;
  }
  return out;
}

}  // namespace cpu
}  // namespace flocora

// Any device's tensors (only addresses or metadata are read), and none at all.
TORCH_LIBRARY_IMPL(flocora, CompositeImplicitAutograd, m) {
  m.impl("_disjoint", [](at::TensorList ts) { return flocora::cpu::tensors_disjoint(ts); });
  m.impl("_plan_layout", [](at::TensorList ts) {
    std::vector<int64_t> d;
    if (!flocora::cpu::plan_layout(ts, &d)) d.clear();
    at::Tensor out = at::empty({(int64_t)d.size()}, at::TensorOptions().dtype(at::kLong));
    std::copy(d.begin(), d.end(), out.data_ptr<int64_t>());
    return out;
  });
  m.impl("_split_views", &flocora::cpu::split_views);
  m.impl("_plan_layout_matches", [](at::TensorList ts, const at::Tensor& layout) {
    TORCH_CHECK(
        layout.device().is_cpu() && layout.scalar_type() == at::kLong && layout.dim() == 1 && layout.is_contiguous(),
        "flocora::_plan_layout_matches: layout must be a contiguous 1-D int64 CPU tensor");
    std::vector<int64_t> d;
    d.reserve((size_t)layout.numel());
    return flocora::cpu::plan_layout(ts, &d) && (int64_t)d.size() == layout.numel() &&
           std::equal(d.begin(), d.end(), layout.data_ptr<int64_t>());
  });
}
