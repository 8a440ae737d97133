"""Installs the ``fastlm`` package and builds the optional C++ extension ``fastlm._C``.

``kernels/`` ships as ``fastlm.kernels`` (never a top-level ``kernels`` package: Hugging Face
publishes one of that name).

Build knobs (environment):
  FASTLM_SKIP_EXT=1          build no extension (pure-Python install: the reference backend only)
  FASTLM_SKIP_CUDA_BUILD=1   build the CPU extension only, even with a CUDA torch and nvcc
  FASTLM_CUDA_ARCHS="80;90"  SM architectures for the CUDA kernels (SASS for each, plus PTX for the newest)
  FASTLM_CPU_ISA=auto|avx512|avx2|default  SIMD level of the CPU kernels. `auto` (the default) takes
                             what ATen itself dispatches to on the building machine
                             (torch.backends.cpu.get_cpu_capability(): AVX512 -> avx512, else avx2 on
                             x86-64, else default); the extension is built from source where it runs.
                             avx512 = -mavx512f/bw/vl/dq with at::vec's CPU_CAPABILITY_AVX512 path,
                             avx2 = -mavx2 -mfma -mf16c with CPU_CAPABILITY_AVX2, default = torch's
                             portable baseline. The chosen level is written to fastlm/_build_config.py,
                             and fastlm.backends.cpp refuses to load a build on a CPU that lacks it.
  FASTLM_CPU_BF16=0          with avx512, do not use AVX512-BF16 even where the building CPU has it
  MAX_JOBS                   parallel compile jobs (ninja)
Install: pip install --no-build-isolation ".[test]"   (or -e . for an in-place build)
"""
import glob
import os
import platform
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

packages = find_packages(include=["fastlm", "fastlm.*"])
package_dir = {}
if os.path.isdir(os.path.join(ROOT, "kernels")):
    packages.append("fastlm.kernels")
    package_dir["fastlm.kernels"] = "kernels"


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _extensions():
    if os.environ.get("FASTLM_SKIP_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # no torch at build time: pure-Python install
        return [], {}

    is_x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    isa = os.environ.get("FASTLM_CPU_ISA", "auto").lower()
    if isa == "auto":
        capability = torch.backends.cpu.get_cpu_capability().upper()
        isa = "avx512" if is_x86 and capability.startswith("AVX512") else "avx2" if is_x86 else "default"
    cxx = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
    if isa in ("avx2", "avx512") and not is_x86:
        raise RuntimeError(f"FASTLM_CPU_ISA={isa} needs an x86-64 target")
    avx512_bf16 = False
    if isa == "avx512":
        cxx += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
        # bf16 dot products (vdpbf16ps) for the decode linear kernel, where the building CPU has them
        avx512_bf16 = os.environ.get("FASTLM_CPU_BF16", "auto") != "0" and torch.cpu._is_avx512_bf16_supported()
        if avx512_bf16:
            cxx += ["-mavx512bf16", "-DFASTLM_AVX512_BF16"]
    elif isa == "avx2":
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    elif isa == "default":
        cxx += ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]
    else:
        raise RuntimeError(f"FASTLM_CPU_ISA must be auto, avx512, avx2 or default, got {isa!r}")
    with open(os.path.join(ROOT, "fastlm", "_build_config.py"), "w") as f:
        f.write(f'"""Written by setup.py at build time."""\nCPU_ISA = {isa!r}\nAVX512_BF16 = {avx512_bf16!r}\n')
    # at::parallel_for is an inline template around `#pragma omp parallel` when ATen's parallel backend
    # is OpenMP: without -fopenmp the pragma is dropped and every kernel runs on one thread. Linking
    # -fopenmp resolves to the libgomp.so.1 that torch has already loaded (same soname), so the
    # extension shares torch's thread pool and honours torch.set_num_threads.
    link = []
    if torch.backends.openmp.is_available() and platform.system() == "Linux":
        cxx.append("-fopenmp")
        link.append("-fopenmp")

    sources = _rel([os.path.join(ROOT, "csrc", "ops.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]

    with_cuda = (
        torch.version.cuda is not None
        and os.environ.get("FASTLM_SKIP_CUDA_BUILD") != "1"
        and cpp_extension.CUDA_HOME is not None
        and (shutil.which("nvcc") or os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")))
    )
    if with_cuda:
        archs = [a.strip() for a in os.environ.get("FASTLM_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
                 if a.strip()]
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xptxas", "-v",
                "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
        for a in archs:
            nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}"]
        # Also PTX for the newest arch built: the driver JIT-compiles it on newer GPUs (sm_100, sm_120)
        # for which no SASS is embedded, instead of failing with "no kernel image is available".
        newest = max(archs, key=lambda a: int("".join(ch for ch in a if ch.isdigit()) or 0))
        nvcc += [f"-gencode=arch=compute_{newest},code=compute_{newest}"]
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda_kernels", "*.cu")))
        ext = cpp_extension.CUDAExtension(
            "fastlm._C", sources, include_dirs=include_dirs,
            define_macros=[("FASTLM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
    else:
        ext = cpp_extension.CppExtension("fastlm._C", sources, include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cxx}, extra_link_args=link)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None
                                                          or _has_ninja_module())
    return [ext], {"build_ext": build_ext}


def _has_ninja_module():
    try:
        import ninja  # noqa: F401
        return True
    except ImportError:
        return False


ext_modules, cmdclass = _extensions()

# The embedded demo checkpoint (`fastlm generate` with no --model); built by scripts/train_demo.py.
package_data = {"fastlm": ["demo/*.json", "demo/*.safetensors", "demo/README.md"]}

setup(packages=packages, package_dir=package_dir, package_data=package_data, include_package_data=True,
      ext_modules=ext_modules, cmdclass=cmdclass)
