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

  // Cross-entropy: sizes and pointers are checked here (the kernels index x[t] by the targets,
  // which loss.cpp checks against nc before reading any row).
  auto ce_check = [](const char* what, uintptr_t x, uintptr_t target, uintptr_t probs, uintptr_t stats,
                     uintptr_t out, int64_t rows, int64_t nc, double eps) {
    const std::string op = std::string("fastlayers.cross_entropy (") + what + "): ";
    if (rows < 0 || nc < 0) throw std::invalid_argument(op + "negative size");
    if (rows > 0 && nc > 0 && (target == 0) == (probs == 0))
      throw std::invalid_argument(op + "expected exactly one of target (class indices) and probs");
    if (!(eps >= 0.0 && eps <= 1.0)) throw std::invalid_argument(op + "label smoothing must be in [0, 1]");
    if (rows > 0 && (stats == 0 || out == 0 || (nc > 0 && x == 0)))
      throw std::invalid_argument(op + "null buffer");
  };

  m.def("cross_entropy_forward",
        [ce_check](int dtype, uintptr_t x, uintptr_t target, uintptr_t probs, uintptr_t weight, uintptr_t loss,
                   uintptr_t stats, int64_t rows, int64_t nc, int64_t ignore_index, double eps, int nthreads) {
          ce_check("forward", x, target, probs, stats, loss, rows, nc, eps);
          py::gil_scoped_release nogil;
          by_dtype(dtype, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            using C = typename io<T>::C;
            cross_entropy_forward<T>(ptr<const T>(x), ptr<const int64_t>(target), ptr<const T>(probs),
                                     ptr<const C>(weight), ptr<C>(loss), ptr<C>(stats), rows, nc, ignore_index,
                                     eps, nthreads);
          });
        },
        py::arg("dtype"), py::arg("x"), py::arg("target"), py::arg("probs"), py::arg("weight"), py::arg("loss"),
        py::arg("stats"), py::arg("rows"), py::arg("nc"), py::arg("ignore_index"), py::arg("eps"),
        py::arg("nthreads"),
        "Per-row softmax cross-entropy of a contiguous (rows, nc) x; loss (rows,), stats (rows, 3) in the "
        "compute type (fp32, fp64 for fp64). target (int64) or probs (x's dtype): exactly one non-zero.");

  m.def("cross_entropy_backward",
        [ce_check](int dtype, uintptr_t x, uintptr_t target, uintptr_t probs, uintptr_t weight, uintptr_t stats,
                   uintptr_t scale, uintptr_t dx, int64_t rows, int64_t nc, int64_t ignore_index, double eps,
                   int nthreads) {
          ce_check("backward", x, target, probs, stats, dx, rows, nc, eps);
          if (rows > 0 && scale == 0) throw std::invalid_argument("fastlayers.cross_entropy (backward): null scale");
          py::gil_scoped_release nogil;
          by_dtype(dtype, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            using C = typename io<T>::C;
            cross_entropy_backward<T>(ptr<const T>(x), ptr<const int64_t>(target), ptr<const T>(probs),
                                      ptr<const C>(weight), ptr<const C>(stats), ptr<const C>(scale), ptr<T>(dx),
                                      rows, nc, ignore_index, eps, nthreads);
          });
        },
        py::arg("dtype"), py::arg("x"), py::arg("target"), py::arg("probs"), py::arg("weight"), py::arg("stats"),
        py::arg("scale"), py::arg("dx"), py::arg("rows"), py::arg("nc"), py::arg("ignore_index"), py::arg("eps"),
        py::arg("nthreads"), "dx = scale_i * dloss_i/dx (rows, nc); dx may equal x.");

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
