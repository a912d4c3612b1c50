// CUDA kernel of unpack_dequantize (schema: csrc/ops.cpp, semantics:
// flocora_codec/ops.py, argument checks: csrc/include/flocora/host_checks.h).
// Byte-identical to the CPU kernel: dequantize is affine.h's (__f*_rn on the
// device), and the extension is compiled with --fmad=false.
//
// One thread reads kUnitsPerThread whole units (8 codes = BITS bytes of the
// stream each), all loads first, and writes their outputs (16-byte stores when aligned). Every
// launch covers a whole list of tensors (descriptor packs, common.cuh).
#include "bitstream.cuh"
#include "common.cuh"

namespace flocora {
namespace cuda {
namespace {

struct UnpackDesc {
  int64_t numel;
  int64_t group;
  int64_t work_begin;
  int64_t byte_base;
  int64_t group_base;
  int64_t elem_base;  // first element of this tensor in the output
  int32_t vec;        // output of this tensor is 16-byte aligned
};

template <int BITS>
__global__ __launch_bounds__(kThreads) void unpack_dequantize_kernel(const __grid_constant__ Pack<UnpackDesc> pack,
                                                                     const uint8_t* __restrict__ packed,
                                                                     const void* __restrict__ scales,
                                                                     const void* __restrict__ offsets, bool meta_half,
                                                                     void* __restrict__ out, int32_t out_dtype) {
  const int64_t w = block_id();
  if (w >= pack.total) return;
  const UnpackDesc& d = pack.d[find_desc(pack, w)];
  const int64_t u0 = (w - d.work_begin) * kUnitsPerBlock;
  const int64_t nunits = (d.numel + 7) / 8;
  auto meta = [&](const void* base, int64_t g) {
    return meta_half ? half_to_float(static_cast<const uint16_t*>(base)[g]) : static_cast<const float*>(base)[g];
  };
  constexpr uint64_t mask = (1u << BITS) - 1;
  // Every unit's codes are loaded before the first is used: the loads are in
  // flight together instead of one round trip per unit.
  uint64_t words[kUnitsPerThread];
#pragma unroll
  for (int k = 0; k < kUnitsPerThread; ++k) {
    const int64_t u = u0 + k * kThreads + threadIdx.x;
    const int cnt = u < nunits ? (int)min((int64_t)8, d.numel - 8 * u) : 0;
    words[k] = cnt > 0 ? load_bytes(packed + d.byte_base + u * BITS, cnt == 8 ? BITS : (cnt * BITS + 7) / 8) : 0;
  }
#pragma unroll
  for (int k = 0; k < kUnitsPerThread; ++k) {
    const int64_t u = u0 + k * kThreads + threadIdx.x;
    if (u >= nunits) break;
    const int64_t i0 = 8 * u;
    const int cnt = (int)min((int64_t)8, d.numel - i0);
    const uint64_t word = words[k];
    int64_t gi = i0 / d.group, gend = (gi + 1) * d.group;
    float off = meta(offsets, d.group_base + gi), sc = meta(scales, d.group_base + gi);
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (j < cnt) {
        if (i0 + j >= gend) {
          ++gi;
          gend += d.group;
          off = meta(offsets, d.group_base + gi);
          sc = meta(scales, d.group_base + gi);
        }
        v[j] = dequantize((uint32_t)((word >> (j * BITS)) & mask), off, sc);
      }
    }
    const int64_t o = d.elem_base + i0;
    if (d.vec && cnt == 8) {
      if (out_dtype == kF32) {
        float4* dst = reinterpret_cast<float4*>(static_cast<float*>(out) + o);
        dst[0] = make_float4(v[0], v[1], v[2], v[3]);
        dst[1] = make_float4(v[4], v[5], v[6], v[7]);
      } else {
        uint32_t h[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          uint16_t lo = out_dtype == kF16 ? float_to_half_rn(v[2 * j]) : float_to_bf16_rn(v[2 * j]);
          uint16_t hi = out_dtype == kF16 ? float_to_half_rn(v[2 * j + 1]) : float_to_bf16_rn(v[2 * j + 1]);
          h[j] = (uint32_t)lo | ((uint32_t)hi << 16);
        }
        *reinterpret_cast<uint4*>(static_cast<uint16_t*>(out) + o) = make_uint4(h[0], h[1], h[2], h[3]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (j < cnt) store_float(out, o + j, out_dtype, v[j]);
    }
  }
}

static_assert(sizeof(Pack<UnpackDesc>) + 256 <= 32764, "kernel arguments over the 32 KiB limit");
}  // namespace

at::Tensor unpack_dequantize_cuda(const at::Tensor& packed_in, const at::Tensor& scales_in,
                                  const at::Tensor& offsets_in, int64_t bits, at::IntArrayRef numels,
                                  at::IntArrayRef group_sizes, at::ScalarType dtype) {
  const char* op = "flocora::unpack_dequantize";
  const c10::Device dev = packed_in.device();
  const UnpackLayout lay =
      unpack_dequantize_layout(op, packed_in, scales_in, offsets_in, bits, numels, group_sizes, dtype, [&]() {
        check_cuda_tensor(packed_in, dev, op, "packed");
        check_cuda_tensor(scales_in, dev, op, "scales");
        check_cuda_tensor(offsets_in, dev, op, "offsets");
      });
  c10::cuda::CUDAGuard guard(dev);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int32_t out_dt = lay.out_dt;

  at::Tensor packed = packed_in.contiguous(), scales = scales_in.contiguous(), offsets = offsets_in.contiguous();
  at::Tensor result = at::empty({lay.total}, packed.options().dtype(dtype));
  const int esz = elem_size(lay.out_dt);
  std::vector<UnpackDesc> descs;
  for (const UnpackTensor& t : lay.ts) {
    UnpackDesc d{};
    d.numel = t.numel;
    d.group = t.group;
    d.byte_base = t.byte_base;
    d.group_base = t.group_base;
    d.elem_base = t.elem_base;
    d.vec = aligned16(static_cast<const char*>(result.data_ptr()) + d.elem_base * esz);
    descs.push_back(d);
  }
  dispatch_bits(bits, [&](auto B) {
    constexpr int BITS = decltype(B)::value;
    for_each_pack(
        descs, [](const UnpackDesc& d) { return num_groups((d.numel + 7) / 8, kUnitsPerBlock); },
        [&](const Pack<UnpackDesc>& p) {
          unpack_dequantize_kernel<BITS><<<grid_for(p.total), kThreads, 0, stream>>>(
              p, packed.data_ptr<uint8_t>(), scales.data_ptr(), offsets.data_ptr(), scales.scalar_type() == at::kHalf,
              result.data_ptr(), out_dt);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  });
  return result;
}

}  // namespace cuda
}  // namespace flocora

TORCH_LIBRARY_IMPL(flocora, CUDA, m) { m.impl("unpack_dequantize", &flocora::cuda::unpack_dequantize_cuda); }
