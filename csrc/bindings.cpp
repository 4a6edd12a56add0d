// pybind11 bindings of the CPU kernels over raw buffers: fastlayers.backends.cpp passes
// tensor.data_ptr() values, sizes and a dtype code (common.h: F32, F64, BF16, F16). The module
// does not link libtorch, so it needs no rebuild when torch changes. Validation (dtype,
// contiguity, shapes) happens once in Python; here the GIL is released around each kernel.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "activations.h"
#include "kernels.h"

namespace py = pybind11;
using namespace fl;

template <class F>
static void by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case F32: f((float*)nullptr); break;
    case F64: f((double*)nullptr); break;
    case BF16: f((bf16*)nullptr); break;
    case F16: f((f16*)nullptr); break;
    default: throw std::invalid_argument("fastlayers._C: unknown dtype code");
  }
}

template <class T> static T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// Sizes, activation code and thread count of a gated entry point (the dtype code is checked by by_dtype).
static void gated_check_sizes(const char* op, int64_t rows, int64_t cols, int act, int nthreads) {
  auto fail = [&](const char* what) { throw std::invalid_argument(std::string("fastlayers._C.") + op + ": " + what); };
  if (rows < 0 || cols < 0) fail("rows and cols must be >= 0");
  if (cols > 0 && rows > INT64_MAX / cols) fail("rows * cols overflows");
  if (act < 0 || act > MISH) fail("unknown activation code");
  if (nthreads < 1) fail("nthreads must be >= 1");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastlayers CPU kernels (OpenMP, vectorised); see csrc/kernels.h for the layouts.";

  m.def("bias_act_forward",
        [](int dtype, uintptr_t z, uintptr_t b, uintptr_t y, int64_t rows, int64_t cols, int act,
           double slope, int nthreads) {
          py::gil_scoped_release nogil;
          by_dtype(dtype, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            bias_act_forward<T>(ptr<T>(z), ptr<const T>(b), ptr<T>(y), rows, cols, act, slope, nthreads);
          });
        },
        py::arg("dtype"), py::arg("z"), py::arg("b"), py::arg("y"), py::arg("rows"), py::arg("cols"),
        py::arg("act"), py::arg("slope"), py::arg("nthreads"),
        "y = act(z + b) over row-major (rows, cols); in place when y == z, else z becomes z + b.");

  m.def("act_grad",
        [](int dtype, uintptr_t dy, uintptr_t s, uintptr_t dz, uintptr_t db, int64_t rows, int64_t cols,
           int act, double slope, int nthreads) {
          py::gil_scoped_release nogil;
          by_dtype(dtype, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            act_grad<T>(ptr<const T>(dy), ptr<const T>(s), ptr<T>(dz), ptr<T>(db), rows, cols, act, slope,
                        nthreads);
          });
        },
        py::arg("dtype"), py::arg("dy"), py::arg("saved"), py::arg("dz"), py::arg("db"), py::arg("rows"),
        py::arg("cols"), py::arg("act"), py::arg("slope"), py::arg("nthreads"),
        "dz = dy * act'(saved) and db = column sums of dz (db == 0: skipped).");

  m.def("softmax_forward",
        [](int dtype, uintptr_t x, uintptr_t y, int64_t outer, int64_t len, int64_t inner, bool log,
           int nthreads) {
          py::gil_scoped_release nogil;
          by_dtype(dtype, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            softmax_forward<T>(ptr<const T>(x), ptr<T>(y), outer, len, inner, log, nthreads);
          });
        },
        py::arg("dtype"), py::arg("x"), py::arg("y"), py::arg("outer"), py::arg("len"), py::arg("inner"),
        py::arg("log"), py::arg("nthreads"));

  m.def("softmax_backward",
        [](int dtype, uintptr_t dy, uintptr_t y, uintptr_t dx, int64_t outer, int64_t len, int64_t inner,
           bool log, int nthreads) {
          py::gil_scoped_release nogil;
          by_dtype(dtype, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            softmax_backward<T>(ptr<const T>(dy), ptr<const T>(y), ptr<T>(dx), outer, len, inner, log, nthreads);
          });
        },
        py::arg("dtype"), py::arg("dy"), py::arg("y"), py::arg("dx"), py::arg("outer"), py::arg("len"),
        py::arg("inner"), py::arg("log"), py::arg("nthreads"));

  // Gated linear unit (csrc/gated.cpp). Pointers that must be present are checked, as are sizes,
  // the activation code and the thread count: a bad call raises ValueError, never reads out of bounds.
  m.def("gated_forward",
        [](int dtype, uintptr_t g, uintptr_t bg, uintptr_t u, uintptr_t bu, uintptr_t h, int64_t rows,
           int64_t cols, int act, double slope, bool keep, int nthreads) {
          gated_check_sizes("gated_forward", rows, cols, act, nthreads);
          if (rows * cols > 0 && (!g || !u || !h))
            throw std::invalid_argument("fastlayers._C.gated_forward: g, u and h must be non-null");
          if (keep && h == g && rows * cols > 0) throw std::invalid_argument("fastlayers._C.gated_forward: keep needs h apart from g");
          py::gil_scoped_release nogil;
          by_dtype(dtype, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            gated_forward<T>(ptr<T>(g), ptr<const T>(bg), ptr<T>(u), ptr<const T>(bu), ptr<T>(h), rows, cols,
                             act, slope, keep, nthreads);
          });
        },
        py::arg("dtype"), py::arg("g"), py::arg("bg"), py::arg("u"), py::arg("bu"), py::arg("h"),
        py::arg("rows"), py::arg("cols"), py::arg("act"), py::arg("slope"), py::arg("keep"),
        py::arg("nthreads"),
        "h = act(g + bg) * (u + bu) over row-major (rows, cols); keep: g, u become g + bg, u + bu.");

  m.def("gated_backward",
        [](int dtype, uintptr_t dh, uintptr_t g, uintptr_t u, uintptr_t dg, uintptr_t du, uintptr_t dbg,
           uintptr_t dbu, int64_t rows, int64_t cols, int act, double slope, bool from_output, int nthreads) {
          gated_check_sizes("gated_backward", rows, cols, act, nthreads);
          if (rows * cols > 0 && (!dh || !g || !u || !dg || !du))
            throw std::invalid_argument("fastlayers._C.gated_backward: dh, g, u, dg and du must be non-null");
          py::gil_scoped_release nogil;
          by_dtype(dtype, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            gated_backward<T>(ptr<const T>(dh), ptr<const T>(g), ptr<const T>(u), ptr<T>(dg), ptr<T>(du),
                              ptr<T>(dbg), ptr<T>(dbu), rows, cols, act, slope, from_output, nthreads);
          });
        },
        py::arg("dtype"), py::arg("dh"), py::arg("g"), py::arg("u"), py::arg("dg"), py::arg("du"),
        py::arg("dbg"), py::arg("dbu"), py::arg("rows"), py::arg("cols"), py::arg("act"), py::arg("slope"),
        py::arg("from_output"), py::arg("nthreads"),
        "dg = dh * u * act'(g), du = dh * act(g); dbg / dbu = their column sums (0: skipped).");

  m.def("advise_hugepages",
        [](uintptr_t p, int64_t nbytes) {
          // Ask for transparent huge pages on the 2 MiB-aligned interior of a fresh buffer: its first
          // writes then fault once per 2 MiB instead of once per 4 KiB (a 32 MiB output: 16 faults
          // instead of 8192). Advice only: a no-op where THP is off or unsupported.
#if defined(__linux__) && defined(MADV_HUGEPAGE)
          const uintptr_t huge = uintptr_t(1) << 21;
          uintptr_t b = (p + huge - 1) & ~(huge - 1), e = (p + (uintptr_t)nbytes) & ~(huge - 1);
          if (e > b) return madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE) == 0;
#endif
          (void)p; (void)nbytes;
          return false;
        },
        py::arg("ptr"), py::arg("nbytes"), "madvise(MADV_HUGEPAGE) on the 2 MiB-aligned interior of a buffer.");

#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
