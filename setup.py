"""Builds fastlayers._C, the C++/OpenMP CPU kernels (pybind11 over buffer descriptors: no libtorch),
and, where torch imports at build time, fastlayers._fastpath (csrc/torch/: the tiny no-grad linear
in C++ against libtorch; optional, tied to that torch version, skipped with a message otherwise).

    pip install .                            # isolated build, as any package
    python setup.py build_ext --inplace      # in-place build for development / make test

FASTLAYERS_NATIVE=0 builds for a generic x86-64 instead of this machine's CPU (-march=native),
e.g. for a wheel that will run elsewhere. FASTLAYERS_FASTPATH=0 skips fastlayers._fastpath.
`pip install .` builds in an isolated environment without torch, so without _fastpath;
`pip install --no-build-isolation .` (or `make build`) builds it against the installed torch.
"""
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext, has_flag
from setuptools import Extension, setup

# -Wno-*uninitialized: GCC 12's own AVX-512 headers trip them (`__m512 __Y = __Y;`).
# -Wno-psabi: 64-byte vectors passed between our inline functions without AVX-512.
BASE_ARGS = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-Wno-uninitialized",
             "-Wno-maybe-uninitialized", "-Wno-psabi"]


class BuildExt(build_ext):
    """pybind11's build_ext, plus the flags the compiler setuptools actually uses accepts."""

    def build_extensions(self):
        extra, link = [], []
        if os.environ.get("FASTLAYERS_NATIVE", "1") != "0" and has_flag(self.compiler, "-march=native"):
            extra.append("-march=native")
        if has_flag(self.compiler, "-fopenmp"):
            extra.append("-fopenmp")
            link.append("-fopenmp")
        else:
            print("fastlayers: the compiler has no OpenMP; building the CPU kernels single-threaded")
        for ext in self.extensions:
            if ext.name != "fastlayers._C":
                continue
            ext.extra_compile_args += extra
            ext.extra_link_args += link
        super().build_extensions()


ext = Pybind11Extension(
    "fastlayers._C",
    sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")),
    cxx_std=20,
    extra_compile_args=list(BASE_ARGS),
    depends=[os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".h")],
)


# The torch version _fastpath was last built against, rewritten only when torch changes: a
# dependency of _fastpath, so setuptools (and the Makefile's build stamp) rebuild it exactly then.
TORCH_VERSION_FILE = os.path.join("fastlayers", ".torch-version")


def _record_torch_version(version: str) -> None:
    try:
        with open(TORCH_VERSION_FILE) as f:
            if f.read().strip() == version:
                return
    except OSError:
        pass
    with open(TORCH_VERSION_FILE, "w") as f:
        f.write(version + "\n")


def fastpath_extension():
    """fastlayers._fastpath against the torch importable now, or None (no torch, or switched off).
    It includes torch's headers and links libtorch, like torch.utils.cpp_extension's CppExtension,
    with the torch version recorded for the import-time check in fastlayers/_dispatch.py."""
    if os.environ.get("FASTLAYERS_FASTPATH", "1") == "0":
        return None
    try:
        import torch
        from torch.utils.cpp_extension import include_paths, library_paths
    except Exception as e:  # an isolated build environment has no torch
        print(f"fastlayers: building without fastlayers._fastpath (torch does not import here: {e}); "
              "tiny no-grad linears take the Python gate")
        return None
    libs = library_paths()
    _record_torch_version(torch.__version__)
    return Extension(
        "fastlayers._fastpath", [os.path.join("csrc", "torch", "fastpath.cpp")],
        include_dirs=include_paths(), library_dirs=libs, runtime_library_dirs=libs,
        libraries=["c10", "torch", "torch_cpu", "torch_python"], language="c++",
        extra_compile_args=["-O2", "-std=c++20", "-Wno-psabi",
                            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                            f'-DFASTLAYERS_TORCH_VERSION="{torch.__version__}"'],
        depends=[os.path.join("csrc", "torch", "fastpath.cpp"), os.path.join("csrc", "activations.h"),
                 os.path.join("csrc", "common.h"), TORCH_VERSION_FILE],
        optional=True)  # a failed build of it (a compiler torch's headers defeat) skips it, loudly


setup(ext_modules=[e for e in (ext, fastpath_extension()) if e is not None], cmdclass={"build_ext": BuildExt})
