"""Build of the flocora_codec._C extension.

CPU kernels always; CUDA kernels (csrc/cuda/*.cu) when torch is a CUDA build
and nvcc is found (FLOCORA_NO_CUDA=1 forces a CPU-only build).
FLOCORA_NO_EXT=1 builds no extension at all (no compiler needed): a
pure-Python package whose ops run the reference implementation.
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
_DEPS = [
    "numpy>=1.24",
    # CRC32C of every message, hardware-accelerated (SSE4.2/ARMv8 CRC).
    "crc32c>=2.4",
]


def _write_build_info(torch_version, cuda, extension):
    with open(os.path.join(ROOT, "flocora_codec", "_build_info.py"), "w") as f:
        f.write(
            '"""Written by setup.py at build time: what flocora_codec._C was compiled against."""\n'
            f"EXTENSION = {extension!r}\n"
            f"TORCH_VERSION = {torch_version!r}\n"
            f"TORCH_CUDA = {cuda!r}\n"
        )


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _setup_with_extension():
    import torch
    from torch.utils import cpp_extension

    use_cuda = os.environ.get("FLOCORA_NO_CUDA") != "1" and (
        torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    )

    _torch_minor = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    # torch >= 2.14 headers need C++20 (operator<=> in c10); older ones build as C++17.
    _std = "-std=c++20" if _torch_minor >= (2, 14) else "-std=c++17"

    # _C uses libtorch's C++ ABI, which changes between torch minor releases (the
    # stable ABI was evaluated and not adopted; README, "Installing"). So the
    # wheel's metadata requires the minor release it is built against, and the
    # package records it: flocora_codec.ops refuses to load _C under another torch
    # and falls back to the pure-PyTorch reference instead of risking a crash.
    _torch_pin = f"torch>={_torch_minor[0]}.{_torch_minor[1]},<{_torch_minor[0]}.{_torch_minor[1] + 1}"
    _write_build_info(torch.__version__, torch.version.cuda if use_cuda else None, True)
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # -ffp-contract=off: no FMA fusion, so CPU and CUDA compute the same floats.
    # -fopenmp: at::parallel_for is serial without it. -g0 keeps the .so small.
    cxx_flags = ["-O3", _std, "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-g0"]
    extra_compile_args = {"cxx": cxx_flags}
    define_macros = [("Py_LIMITED_API", "0x030a0000")]
    extension = cpp_extension.CppExtension
    if use_cuda:
        sources += _sources("csrc/cuda/*.cu")
        extension = cpp_extension.CUDAExtension
        define_macros.append(("FLOCORA_WITH_CUDA", "1"))
        extra_compile_args["nvcc"] = ["-O3", _std, "--fmad=false", "-lineinfo"]

    setup(
        install_requires=[_torch_pin, *_DEPS],
        ext_modules=[
            extension(
                "flocora_codec._C",
                sources,
                include_dirs=[os.path.join(ROOT, "csrc", "include")],
                extra_compile_args=extra_compile_args,
                extra_link_args=["-fopenmp"],
                define_macros=define_macros,
                py_limited_api=True,
            )
        ],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )


if os.environ.get("FLOCORA_NO_EXT") == "1":
    # The reference ops are plain PyTorch: any torch the package supports.
    _write_build_info(None, None, False)
    setup(install_requires=["torch>=2.4", *_DEPS])
else:
    _setup_with_extension()
