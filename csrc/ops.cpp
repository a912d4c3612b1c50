// Every op schema of the flocora_codec extension, declared once. Each op has
// one kernel file per backend, named after it (csrc/cpu/<op>_cpu.cpp,
// csrc/cuda/<op>_cuda.cu; sparse_decode_add_ lives with sparse_decode), which
// registers its kernel with TORCH_LIBRARY_IMPL(flocora, CPU|CUDA, m); the
// dispatcher picks by device. Argument checks shared by both backends:
// csrc/include/flocora/host_checks.h.
//
// All ops take *lists* of tensors so that a whole state dict is one dispatch;
// a single tensor is a list of one. Outputs are concatenated flat buffers in
// list order; flocora_codec/ops.py documents the exact sizes and slices them.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing flocora_codec._C runs the static TORCH_LIBRARY initializers.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(flocora, m) {
  // Affine quantization of each xs[i] in groups of group_sizes[i] consecutive
  // elements (row-major order), codes in [0, 2^bits-1] packed as one LSB-first
  // bitstream per tensor. packed: uint8, the per-tensor streams back to back
  // (ceil(numel*bits/8) bytes each). scales/offsets: meta_dtype (float32 or
  // float16), one per group, tensors back to back.
  m.def(
      "quantize_pack(Tensor[] xs, int bits, int[] group_sizes, bool stochastic, int[] seeds, "
      "ScalarType meta_dtype) -> (Tensor packed, Tensor scales, Tensor offsets)");
  // Inverse of quantize_pack: one flat tensor of sum(numels) elements of dtype.
  m.def(
      "unpack_dequantize(Tensor packed, Tensor scales, Tensor offsets, int bits, int[] numels, "
      "int[] group_sizes, ScalarType dtype) -> Tensor");
  // Top-k by |x| (ties to the lower index). global_scope=False: ks[i] for
  // xs[i]; global_scope=True: ks = [k] over all elements of all tensors.
  // counts: int64 [len(xs)], values: float32, the selected values of each
  // tensor in index order, back to back; index_bytes: uint8, each tensor's
  // index code (bitmap or Elias-Fano, whichever is smaller) back to back.
  m.def(
      "topk_encode(Tensor[] xs, int[] ks, bool global_scope) -> "
      "(Tensor counts, Tensor values, Tensor index_bytes)");
  // Scatter values into dense zeros: one flat tensor of sum(numels) elements.
  m.def(
      "sparse_decode(Tensor index_bytes, Tensor values, int[] numels, int[] counts, "
      "ScalarType dtype) -> Tensor");
  // outs[i].view(-1)[idx] += values, in place.
  m.def("sparse_decode_add_(Tensor(a!)[] outs, Tensor index_bytes, Tensor values, int[] counts) -> ()");

  // ---- encoding and decoding into caller-owned tensors (CPU kernels only) ----
  // quantize_pack into packed/scales/offsets (contiguous, of exactly the sizes
  // quantize_pack returns; meta dtype: the scales'). Sizes, dtypes and
  // overlap are checked before any write; after a ValueError (input that
  // cannot be encoded) their contents are unspecified.
  m.def(
      "quantize_pack_into_(Tensor[] xs, int bits, int[] group_sizes, bool stochastic, int[] seeds, "
      "Tensor(a!) packed, Tensor(b!) scales, Tensor(c!) offsets) -> ()");
  // unpack_dequantize into outs[i] (numels and dtypes: the outputs'), in
  // place; accumulate: outs[i] += the decoded values (rounded to the output
  // dtype first, summed in float32). Nothing is written unless every check passes.
  m.def(
      "unpack_dequantize_into_(Tensor(a!)[] outs, Tensor packed, Tensor scales, Tensor offsets, int bits, "
      "int[] group_sizes, bool accumulate) -> ()");
  // sparse_decode into outs[i]: zeros and the values (accumulate=False), or
  // sparse_decode_add_ (accumulate=True). Every index code is validated
  // before any output is touched.
  m.def(
      "sparse_decode_into_(Tensor(a!)[] outs, Tensor index_bytes, Tensor values, int[] counts, "
      "bool accumulate) -> ()");

  // True if the memory spans of no two tensors overlap: decode_into's check
  // of its targets, one call instead of a few Python calls per tensor.
  m.def("_disjoint(Tensor[] ts) -> bool");
  // An encode plan's check that a message's tensors have the layout the plan
  // was made for: their count, dtypes and shapes as one int64 tensor, empty
  // if any is not a strided CPU tensor (no plan applies); and whether they
  // match such a descriptor. One call for all tensors: reading dtype and
  // shape from Python cost about 0.25 us a tensor.
  m.def("_plan_layout(Tensor[] ts) -> Tensor");
  m.def("_plan_layout_matches(Tensor[] ts, Tensor layout) -> bool");
  // Decode's outputs: tensors over flat's memory (1-D, contiguous), each
  // described in the int64 CPU tensor layout as (element offset, ndim,
  // sizes, strides); every one checked to lie within flat. One call for a
  // message's tensors: a Python as_strided call cost 0.86 us a tensor.
  m.def("_split_views(Tensor(a) flat, Tensor layout) -> Tensor(a)[]");
  // outs[i]'s bytes = src[offsets[i] : offsets[i] + outs[i].nbytes()] (CPU,
  // contiguous outs, every range checked first): decode_into's raw tensors
  // straight from the message, one call for all of them.
  m.def("_copy_from_bytes_(Tensor(a!)[] outs, Tensor src, int[] offsets) -> ()");
  // The reverse, for encode: byte ranges of srcs into dst, given as
  // quadruples (source, source byte offset, dst byte offset, bytes) in an
  // int64 CPU tensor (an int[] of a message's ranges cost 17 ns a number to
  // convert on every call; an encode plan keeps the tensor); every range
  // checked first, dst ranges pairwise disjoint, no source inside dst. A
  // message's kernel outputs and raw tensors land in place in one call.
  m.def("_copy_to_bytes_(Tensor(a!) dst, Tensor[] srcs, Tensor ranges) -> ()");
  // CRC-32C of data's bytes continuing from value (the CRC of the bytes
  // before them; 0 for none), as the crc32c package computes it: the
  // checksum of a message, on every thread (csrc/cpu/crc32c_cpu.cpp).
  m.def("_crc32c(Tensor data, int value) -> int");
  // Whether affine metadata could come from an encoder (FORMAT.md 3.2): 0, or
  // the number of the first check some group breaks, in the order of
  // codec.affine_meta_violation, which names it. One pass over the groups
  // (csrc/cpu/affine_meta_check_cpu.cpp); out_dtype: the decoded dtype.
  m.def("_affine_meta_check(Tensor scales, Tensor offsets, int bits, ScalarType out_dtype) -> int");
  // Sign values of a top-k group (FORMAT.md 3.3): of each member's kept
  // values (counts[i] of them, back to back in float32 CPU values) the mean
  // magnitude mu in float64 (the sum in a fixed order, reference.magnitude_sum,
  // over the count) of those that keep any, and the
  // sign bits padded to a whole byte, the members' streams back to back
  // (csrc/cpu/sign_sections_cpu.cpp).
  m.def("_sign_sections(Tensor values, int[] counts) -> (Tensor, Tensor)");
  // The layout of a planned message whose top-k counts vary (a global
  // selection): from fixed pieces (rows: tensor, source, source offset,
  // bytes; in section order), top-k members (rows: tensor, numel, group),
  // their counts and the groups' kinds (rows: kind 0 plain / 1 sign / 2
  // quantized, value or metadata itemsize, bits, value group size (0: the
  // whole vector), first source), the copy_to_bytes_ ranges of the whole
  // body, the header's top-k field records (count u64, index code u8,
  // metadata, index and payload lengths u64; with their ranges, from source
  // fields_src, where field_positions names where each goes) and the end of
  // the body (csrc/cpu/topk_layout_cpu.cpp; reference.topk_layout).
  m.def(
      "_topk_layout(Tensor pieces, Tensor members, Tensor counts, Tensor kinds, Tensor field_positions, "
      "int num_tensors, int header_len, int fields_src) -> (Tensor, Tensor, int)");

  // ---- test hooks (CPU kernels in csrc/cpu/quantize_pack_cpu.cpp) ----
  // Forces the CPU quant loops: level 0 scalar, 1 AVX2, 2 AVX-512, -1 the best
  // this CPU supports. Returns the instruction set now in use (0, 1 or 2).
  m.def("_set_cpu_isa(int level) -> int");
  // The stochastic codes (one per byte) of float32 x as one group, as if x
  // were elements first_index.. of a tensor quantized with this seed.
  m.def("_quantize_stochastic_at(Tensor x, int bits, int seed, int first_index) -> Tensor");
}
