"""Builds fastlayers._C, the C++/OpenMP CPU kernels (pybind11 over buffer descriptors: no libtorch).

    pip install .                            # isolated build, as any package
    python setup.py build_ext --inplace      # in-place build for development / make test

FASTLAYERS_NATIVE=0 builds for a generic x86-64 instead of this machine's CPU (-march=native),
e.g. for a wheel that will run elsewhere.
"""
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext, has_flag
from setuptools import setup

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

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
