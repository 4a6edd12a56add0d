"""Builds fastlayers._C, the C++/OpenMP CPU kernels (pybind11 over raw buffers: no libtorch).

    pip install .                            # isolated build, as any package
    python setup.py build_ext --inplace      # in-place build for development / make test

FASTLAYERS_NATIVE=0 builds for a generic x86-64 instead of this machine's CPU (-march=native),
e.g. for a wheel that will run elsewhere.
"""
import os
import subprocess
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


def _compiler_accepts(flag: str) -> bool:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        cxx = os.environ.get("CXX", "c++")
        r = subprocess.run([cxx, flag, src, "-o", os.path.join(d, "t")], capture_output=True)
        return r.returncode == 0


# -Wno-*uninitialized: GCC 12's own AVX-512 headers trip them (`__m512 __Y = __Y;`).
compile_args = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-Wno-uninitialized", "-Wno-maybe-uninitialized",
                "-Wno-psabi"]  # psabi: 64-byte vectors passed between our inline functions without AVX-512
link_args = []
if os.environ.get("FASTLAYERS_NATIVE", "1") != "0" and _compiler_accepts("-march=native"):
    compile_args.append("-march=native")
if sys.platform != "win32" and _compiler_accepts("-fopenmp"):
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")
else:
    print("fastlayers: the compiler has no OpenMP; building the CPU kernels single-threaded")

ext = Pybind11Extension(
    "fastlayers._C",
    sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")),
    cxx_std=20,
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    depends=[os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".h")],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
