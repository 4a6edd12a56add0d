// pybind11 bindings of the CPU kernels. The module does not link libtorch (no rebuild when torch
// changes): fastlayers.backends.cpu hands each tensor over as a buffer descriptor
//     (data_ptr, dtype code, shape, strides)          -- see backends/cpu/_ext.py's _buf()
// and every entry point checks here, before any kernel runs, that each buffer is what the kernel
// will read or write: a known dtype code (common.h), the same dtype for all buffers, the shape the
// other arguments imply, contiguous strides, a non-null pointer when it has elements. A mismatch
// raises ValueError naming the entry point and the argument, never an out-of-bounds access.
// The GIL is released around each kernel.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "activations.h"
#include "kernels.h"
#include "norms.h"
#include "rotary.h"

#include "attention.h"
#include "attention_softmax.h"

namespace py = pybind11;
using namespace fl;

// (data_ptr, dtype code, shape, strides in elements), as backends/cpu/_ext.py's _buf() builds it.
using Buf = std::tuple<uintptr_t, int, std::vector<int64_t>, std::vector<int64_t>>;

static std::string dims(const std::vector<int64_t>& v) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < v.size(); ++i) s << (i ? ", " : "") << v[i];
  s << (v.size() == 1 ? ",)" : ")");
  return s.str();
}

// Checks that `b` is a contiguous buffer of dtype `dtype` and shape `shape`; returns its pointer.
static uintptr_t expect(const char* fn, const char* name, const Buf& b, int dtype,
                        const std::vector<int64_t>& shape) {
  const auto& [p, code, sh, st] = b;
  auto fail = [&](const std::string& what) {
    throw std::invalid_argument(std::string("fastlayers._C.") + fn + ": argument '" + name + "' " + what);
  };
  if (code != dtype) fail("has dtype code " + std::to_string(code) + ", expected " + std::to_string(dtype));
  if (sh != shape) fail("has shape " + dims(sh) + ", expected " + dims(shape));
  if (st.size() != sh.size()) fail("has " + std::to_string(st.size()) + " strides for " + std::to_string(sh.size()) + " dims");
  int64_t numel = 1;
  for (int64_t d : sh) {
    if (d < 0) fail("has a negative size");
    numel *= d;
  }
  if (numel == 0) return p;  // nothing is read or written: any strides, any pointer
  if (p == 0) fail("is a null pointer");
  for (int64_t i = (int64_t)sh.size() - 1, expected = 1; i >= 0; expected *= sh[i--])
    if (sh[i] != 1 && st[i] != expected) fail("is not contiguous (strides " + dims(st) + ")");
  return p;
}

static const std::vector<int64_t>& shape_of(const Buf& b) { return std::get<2>(b); }

static int dtype_of(const char* fn, const char* name, const Buf& b, size_t ndim) {
  int code = std::get<1>(b);
  if (code < F32 || code > F16)
    throw std::invalid_argument(std::string("fastlayers._C.") + fn + ": argument '" + name +
                                "' has unknown dtype code " + std::to_string(code));
  if (shape_of(b).size() != ndim)
    throw std::invalid_argument(std::string("fastlayers._C.") + fn + ": argument '" + name + "' must have " +
                                std::to_string(ndim) + " dims, got shape " + dims(shape_of(b)));
  return code;
}

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

static void check_act(const char* fn, int act) {
  if (act < 0 || act >= kNumActs)
    throw std::invalid_argument(std::string("fastlayers._C.") + fn + ": unknown activation code " + std::to_string(act));
}

// Buffer code of int64 class-index targets (no float kernel is instantiated for it).
constexpr int kI64 = 64;

template <class T> static T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// The optional bias gradients (cols,) of the gated backward entry points: checked pointers, 0 if absent.
static std::pair<uintptr_t, uintptr_t> bias_grads(const char* fn, const std::optional<Buf>& dbg,
                                                  const std::optional<Buf>& dbu, int dt, int64_t cols) {
  return {dbg ? expect(fn, "dbg", *dbg, dt, {cols}) : 0, dbu ? expect(fn, "dbu", *dbu, dt, {cols}) : 0};
}

// The targets of a cross-entropy entry point: exactly one of class indices `target` (rows,) int64
// and class probabilities `probs` (rows, nc) in x's dtype; `weight` (nc,) in the compute dtype;
// label smoothing eps in [0, 1]. Returns their checked pointers (0 for the absent ones).
static std::tuple<uintptr_t, uintptr_t, uintptr_t> ce_targets(
    const char* fn, const std::optional<Buf>& target, const std::optional<Buf>& probs,
    const std::optional<Buf>& weight, int dt, int cd, int64_t rows, int64_t nc, double eps) {
  if (bool(target) == bool(probs))
    throw std::invalid_argument(std::string("fastlayers._C.") + fn + ": expected exactly one of 'target' "
                                "(class indices) and 'probs' (class probabilities)");
  if (!(eps >= 0.0 && eps <= 1.0))
    throw std::invalid_argument(std::string("fastlayers._C.") + fn + ": eps must be in [0, 1]");
  return {target ? expect(fn, "target", *target, kI64, {rows}) : 0,
          probs ? expect(fn, "probs", *probs, dt, {rows, nc}) : 0,
          weight ? expect(fn, "weight", *weight, cd, {nc}) : 0};
}

static void bind_norms(py::module_& m);  // csrc/norms.cpp's entry points, bound at the end of this file
static void bind_rotary(py::module_& m);  // csrc/rotary.cpp's, at the end of this file

static void bind_attention_softmax(py::module_& m);  // csrc/attention_softmax.cpp's, at the end too
static void bind_attention(py::module_& m);  // csrc/attention.cpp's, at the end too

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastlayers CPU kernels (OpenMP, vectorised); see csrc/kernels.h for the layouts.";

  m.def("bias_act_forward",
        [](const Buf& z, const std::optional<Buf>& b, const Buf& y, int act, double slope, int nthreads) {
          const char* fn = "bias_act_forward";
          int dt = dtype_of(fn, "z", z, 2);
          int64_t rows = shape_of(z)[0], cols = shape_of(z)[1];
          uintptr_t pz = expect(fn, "z", z, dt, {rows, cols}), py_ = expect(fn, "y", y, dt, {rows, cols});
          uintptr_t pb = b ? expect(fn, "b", *b, dt, {cols}) : 0;
          check_act(fn, act);
          py::gil_scoped_release nogil;
          by_dtype(dt, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            bias_act_forward<T>(ptr<T>(pz), ptr<const T>(pb), ptr<T>(py_), rows, cols, act, slope, nthreads);
          });
        },
        py::arg("z"), py::arg("b"), py::arg("y"), py::arg("act"), py::arg("slope"), py::arg("nthreads"),
        "y = act(z + b) over row-major (rows, cols) z; in place when y is z, else z becomes z + b.");

  m.def("act_grad",
        [](const Buf& dy, const std::optional<Buf>& s, const std::optional<Buf>& dz, const std::optional<Buf>& db,
           int act, double slope, int nthreads) {
          const char* fn = "act_grad";
          int dt = dtype_of(fn, "dy", dy, 2);
          int64_t rows = shape_of(dy)[0], cols = shape_of(dy)[1];
          uintptr_t pdy = expect(fn, "dy", dy, dt, {rows, cols});
          check_act(fn, act);
          if (act != NONE && !(s && dz))
            throw std::invalid_argument("fastlayers._C.act_grad: 'saved' and 'dz' are required for an activation");
          uintptr_t ps = act != NONE ? expect(fn, "saved", *s, dt, {rows, cols}) : 0;
          uintptr_t pdz = act != NONE ? expect(fn, "dz", *dz, dt, {rows, cols}) : 0;
          uintptr_t pdb = db ? expect(fn, "db", *db, dt, {cols}) : 0;
          py::gil_scoped_release nogil;
          by_dtype(dt, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            act_grad<T>(ptr<const T>(pdy), ptr<const T>(ps), ptr<T>(pdz), ptr<T>(pdb), rows, cols, act, slope, nthreads);
          });
        },
        py::arg("dy"), py::arg("saved"), py::arg("dz"), py::arg("db"), py::arg("act"), py::arg("slope"),
        py::arg("nthreads"),
        "dz = dy * act'(saved) and db = column sums of dz (db None: skipped; act NONE: only db).");

  m.def("softmax_forward",
        [](const Buf& x, const Buf& y, bool log, int nthreads) {
          const char* fn = "softmax_forward";
          int dt = dtype_of(fn, "x", x, 3);
          const auto sh = shape_of(x);
          uintptr_t px = expect(fn, "x", x, dt, sh), py_ = expect(fn, "y", y, dt, sh);
          py::gil_scoped_release nogil;
          by_dtype(dt, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            softmax_forward<T>(ptr<const T>(px), ptr<T>(py_), sh[0], sh[1], sh[2], log, nthreads);
          });
        },
        py::arg("x"), py::arg("y"), py::arg("log"), py::arg("nthreads"),
        "(log_)softmax over dim 1 of a contiguous (outer, len, inner) x into y.");

  m.def("softmax_backward",
        [](const Buf& dy, const Buf& y, const Buf& dx, bool log, int nthreads) {
          const char* fn = "softmax_backward";
          int dt = dtype_of(fn, "y", y, 3);
          const auto sh = shape_of(y);
          uintptr_t pdy = expect(fn, "dy", dy, dt, sh), py_ = expect(fn, "y", y, dt, sh);
          uintptr_t pdx = expect(fn, "dx", dx, dt, sh);
          py::gil_scoped_release nogil;
          by_dtype(dt, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            softmax_backward<T>(ptr<const T>(pdy), ptr<const T>(py_), ptr<T>(pdx), sh[0], sh[1], sh[2], log, nthreads);
          });
        },
        py::arg("dy"), py::arg("y"), py::arg("dx"), py::arg("log"), py::arg("nthreads"),
        "dx from dy and the forward's output y, contiguous (outer, len, inner).");

  // Gated linear unit (csrc/gated.cpp): g, u, h, dh, dg, du (rows, cols); biases and their
  // gradients (cols,). Checked like the others: dtype, shape, contiguity, non-null pointers.
  m.def("gated_forward",
        [](const Buf& g, const std::optional<Buf>& bg, const Buf& u, const std::optional<Buf>& bu, const Buf& h,
           int act, double slope, bool keep, int nthreads) {
          const char* fn = "gated_forward";
          int dt = dtype_of(fn, "g", g, 2);
          int64_t rows = shape_of(g)[0], cols = shape_of(g)[1];
          uintptr_t pg = expect(fn, "g", g, dt, {rows, cols}), pu = expect(fn, "u", u, dt, {rows, cols});
          uintptr_t ph = expect(fn, "h", h, dt, {rows, cols});
          uintptr_t pbg = bg ? expect(fn, "bg", *bg, dt, {cols}) : 0, pbu = bu ? expect(fn, "bu", *bu, dt, {cols}) : 0;
          check_act(fn, act);
          if (keep && ph == pg && rows * cols > 0)
            throw std::invalid_argument("fastlayers._C.gated_forward: keep=True needs 'h' apart from 'g'");
          if (pu == pg && rows * cols > 0)
            throw std::invalid_argument("fastlayers._C.gated_forward: 'g' and 'u' must be different buffers");
          py::gil_scoped_release nogil;
          by_dtype(dt, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            gated_forward<T>(ptr<T>(pg), ptr<const T>(pbg), ptr<T>(pu), ptr<const T>(pbu), ptr<T>(ph), rows, cols,
                             cols, act, slope, keep, nthreads);
          });
        },
        py::arg("g"), py::arg("bg"), py::arg("u"), py::arg("bu"), py::arg("h"), py::arg("act"), py::arg("slope"),
        py::arg("keep"), py::arg("nthreads"),
        "h = act(g + bg) * (u + bu) over row-major (rows, cols); keep: g, u become g + bg, u + bu.");

  m.def("gated_backward",
        [](const Buf& dh, const Buf& g, const Buf& u, const Buf& dg, const Buf& du, const std::optional<Buf>& dbg,
           const std::optional<Buf>& dbu, int act, double slope, bool from_output, int nthreads) {
          const char* fn = "gated_backward";
          int dt = dtype_of(fn, "dh", dh, 2);
          int64_t rows = shape_of(dh)[0], cols = shape_of(dh)[1];
          uintptr_t pdh = expect(fn, "dh", dh, dt, {rows, cols}), pg = expect(fn, "g", g, dt, {rows, cols});
          uintptr_t pu = expect(fn, "u", u, dt, {rows, cols}), pdg = expect(fn, "dg", dg, dt, {rows, cols});
          uintptr_t pdu = expect(fn, "du", du, dt, {rows, cols});
          auto [pdbg, pdbu] = bias_grads(fn, dbg, dbu, dt, cols);
          check_act(fn, act);
          py::gil_scoped_release nogil;
          by_dtype(dt, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            gated_backward<T>(ptr<const T>(pdh), ptr<const T>(pg), ptr<const T>(pu), ptr<T>(pdg), ptr<T>(pdu),
                              ptr<T>(pdbg), ptr<T>(pdbu), rows, cols, cols, cols, act, slope, from_output, nthreads);
          });
        },
        py::arg("dh"), py::arg("g"), py::arg("u"), py::arg("dg"), py::arg("du"), py::arg("dbg"), py::arg("dbu"),
        py::arg("act"), py::arg("slope"), py::arg("from_output"), py::arg("nthreads"),
        "dg = dh * u * act'(g), du = dh * act(g); dbg / dbu (None: skipped) = their column sums.");

  // The same over one (rows, 2 * cols) buffer gu = [g | u] (and dgu = [dg | du]): the output of one
  // GEMM on the stacked weights [Wg; Wu] when they lie back to back in memory.
  m.def("gated_forward_paired",
        [](const Buf& gu, const std::optional<Buf>& bg, const std::optional<Buf>& bu, const Buf& h, int act,
           double slope, bool keep, int nthreads) {
          const char* fn = "gated_forward_paired";
          int dt = dtype_of(fn, "gu", gu, 2);
          int64_t rows = shape_of(gu)[0], cols2 = shape_of(gu)[1], cols = cols2 / 2;
          if (cols2 % 2) throw std::invalid_argument("fastlayers._C.gated_forward_paired: 'gu' must have an even number of columns");
          uintptr_t pgu = expect(fn, "gu", gu, dt, {rows, cols2}), ph = expect(fn, "h", h, dt, {rows, cols});
          uintptr_t pbg = bg ? expect(fn, "bg", *bg, dt, {cols}) : 0, pbu = bu ? expect(fn, "bu", *bu, dt, {cols}) : 0;
          check_act(fn, act);
          if (ph == pgu && rows * cols > 0)
            throw std::invalid_argument("fastlayers._C.gated_forward_paired: 'h' must be apart from 'gu'");
          py::gil_scoped_release nogil;
          by_dtype(dt, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            T* g = ptr<T>(pgu);
            gated_forward<T>(g, ptr<const T>(pbg), g + cols, ptr<const T>(pbu), ptr<T>(ph), rows, cols, cols2, act,
                             slope, keep, nthreads);
          });
        },
        py::arg("gu"), py::arg("bg"), py::arg("bu"), py::arg("h"), py::arg("act"), py::arg("slope"), py::arg("keep"),
        py::arg("nthreads"), "gated_forward over gu = [g | u] (rows, 2 * cols) into h (rows, cols).");

  m.def("gated_backward_paired",
        [](const Buf& dh, const Buf& gu, const Buf& dgu, const std::optional<Buf>& dbg, const std::optional<Buf>& dbu,
           int act, double slope, bool from_output, int nthreads) {
          const char* fn = "gated_backward_paired";
          int dt = dtype_of(fn, "dh", dh, 2);
          int64_t rows = shape_of(dh)[0], cols = shape_of(dh)[1];
          uintptr_t pdh = expect(fn, "dh", dh, dt, {rows, cols}), pgu = expect(fn, "gu", gu, dt, {rows, 2 * cols});
          uintptr_t pdgu = expect(fn, "dgu", dgu, dt, {rows, 2 * cols});
          auto [pdbg, pdbu] = bias_grads(fn, dbg, dbu, dt, cols);
          check_act(fn, act);
          py::gil_scoped_release nogil;
          by_dtype(dt, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            const T* g = ptr<const T>(pgu);
            T* dg = ptr<T>(pdgu);
            gated_backward<T>(ptr<const T>(pdh), g, g + cols, dg, dg + cols, ptr<T>(pdbg), ptr<T>(pdbu), rows, cols,
                              2 * cols, 2 * cols, act, slope, from_output, nthreads);
          });
        },
        py::arg("dh"), py::arg("gu"), py::arg("dgu"), py::arg("dbg"), py::arg("dbu"), py::arg("act"), py::arg("slope"),
        py::arg("from_output"), py::arg("nthreads"), "gated_backward over gu = [g | u] into dgu = [dg | du].");

  // Cross-entropy (loss.cpp). Class-index targets are int64 buffers (code kI64, cpu/loss.py's
  // _I64_CODE); weights, losses, stats and scales are in the compute type (fp32, fp64 for fp64 x).
  // The kernels read x[t] at each target t: loss.cpp checks every target against nc first.
  m.def("cross_entropy_forward",
        [](const Buf& x, const std::optional<Buf>& target, const std::optional<Buf>& probs,
           const std::optional<Buf>& weight, const Buf& loss, const Buf& stats, int64_t ignore_index, double eps,
           int nthreads) {
          const char* fn = "cross_entropy_forward";
          int dt = dtype_of(fn, "x", x, 2), cd = dt == F64 ? F64 : F32;
          int64_t rows = shape_of(x)[0], nc = shape_of(x)[1];
          uintptr_t px = expect(fn, "x", x, dt, {rows, nc});
          auto [pt, pq, pw] = ce_targets(fn, target, probs, weight, dt, cd, rows, nc, eps);
          uintptr_t pl = expect(fn, "loss", loss, cd, {rows}), ps = expect(fn, "stats", stats, cd, {rows, 3});
          py::gil_scoped_release nogil;
          by_dtype(dt, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            using C = typename io<T>::C;
            cross_entropy_forward<T>(ptr<const T>(px), ptr<const int64_t>(pt), ptr<const T>(pq), ptr<const C>(pw),
                                     ptr<C>(pl), ptr<C>(ps), rows, nc, ignore_index, eps, nthreads);
          });
        },
        py::arg("x"), py::arg("target"), py::arg("probs"), py::arg("weight"), py::arg("loss"), py::arg("stats"),
        py::arg("ignore_index"), py::arg("eps"), py::arg("nthreads"),
        "Per-row softmax cross-entropy of a contiguous (rows, nc) x into loss (rows,) and stats (rows, 3).");

  m.def("first_bad_target",
        [](const Buf& target, int64_t classes, int64_t ignore_index) -> int64_t {
          int64_t rows = shape_of(target)[0];
          const int64_t* t = ptr<const int64_t>(expect("first_bad_target", "target", target, kI64, {rows}));
          py::gil_scoped_release nogil;
          for (int64_t i = 0; i < rows; ++i)  // one pass over n int64: ~1 ns per target
            if (t[i] != ignore_index && (t[i] < 0 || t[i] >= classes)) return i;
          return -1;
        },
        py::arg("target"), py::arg("classes"), py::arg("ignore_index"),
        "The index of the first class-index target outside [0, classes) and != ignore_index, or -1: the "
        "argument check of the losses on the CPU (the torch-ops check costs ~10-30 us: five ops and a sync).");

  m.def("cross_entropy_backward",
        [](const Buf& x, const std::optional<Buf>& target, const std::optional<Buf>& probs,
           const std::optional<Buf>& weight, const Buf& stats, const Buf& scale, const Buf& dx, int64_t ignore_index,
           double eps, int64_t col0, int64_t classes, int nthreads) {
          const char* fn = "cross_entropy_backward";
          int dt = dtype_of(fn, "x", x, 2), cd = dt == F64 ? F64 : F32;
          int64_t rows = shape_of(x)[0], nc = shape_of(x)[1];
          uintptr_t px = expect(fn, "x", x, dt, {rows, nc}), pdx = expect(fn, "dx", dx, dt, {rows, nc});
          if (col0 < 0 || classes < col0 + nc || ((col0 != 0 || classes != nc) && probs))
            throw std::invalid_argument("fastlayers._C.cross_entropy_backward: columns [" + std::to_string(col0) +
                                        ", " + std::to_string(col0 + nc) + ") are not a block of " +
                                        std::to_string(classes) + " classes (or a block with probabilities)");
          auto [pt, pq, pw] = ce_targets(fn, target, probs, weight, dt, cd, rows, classes, eps);
          uintptr_t ps = expect(fn, "stats", stats, cd, {rows, 3}), pg = expect(fn, "scale", scale, cd, {rows});
          py::gil_scoped_release nogil;
          by_dtype(dt, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            using C = typename io<T>::C;
            cross_entropy_backward<T>(ptr<const T>(px), ptr<const int64_t>(pt), ptr<const T>(pq), ptr<const C>(pw),
                                      ptr<const C>(ps), ptr<const C>(pg), ptr<T>(pdx), rows, nc, col0, classes,
                                      ignore_index, eps, nthreads);
          });
        },
        py::arg("x"), py::arg("target"), py::arg("probs"), py::arg("weight"), py::arg("stats"), py::arg("scale"),
        py::arg("dx"), py::arg("ignore_index"), py::arg("eps"), py::arg("col0"), py::arg("classes"),
        py::arg("nthreads"),
        "dx = scale_i * dloss_i/dx over a contiguous (rows, nc) x, the columns [col0, col0 + nc) of rows "
        "with `classes` classes; dx may be x.");
  m.attr("INT64_CODE") = kI64;

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

  // The codes this build was compiled with; fastlayers.backends.cpu checks them against
  // fastlayers/activations.py and its dtype table at import and refuses to run on a mismatch.
  py::dict acts;
  for (int a = 0; a < kNumActs; ++a) acts[py::str(kActNames[a])] = a;
  m.attr("ACTIVATION_CODES") = acts;
  py::dict dtypes;
  dtypes["float32"] = (int)F32; dtypes["float64"] = (int)F64; dtypes["bfloat16"] = (int)BF16; dtypes["float16"] = (int)F16;
  m.attr("DTYPE_CODES") = dtypes;
  bind_norms(m);
  bind_rotary(m);
  bind_attention_softmax(m);
  bind_attention(m);
}



// ----------------------------------------------------------------------------- norms (csrc/norms.cpp)
// x, res, s, y, dy, ds, src, dx: (rows, n); w, b, dw, db: (n,); mean, rstd: (rows,) in the compute
// dtype (float64 for float64 buffers, else float32). Optional buffers are None.
static void bind_norms(py::module_& m) {
  m.attr("NORM_KINDS") = py::dict(py::arg("rms") = (int)kNormRms, py::arg("rms_hf") = (int)kNormRmsHf,
                                  py::arg("layer") = (int)kNormLayer);
  // What a norm entry point reads off its (rows, n) argument b: the data dtype, the compute dtype
  // (fp64 for fp64 data, else fp32), rows and n; and its kind, checked.
  struct NormShape { int dt, cd; int64_t rows, n; };
  auto norm_shape = [](const char* fn, const char* name, const Buf& b, int kind) {
    const int dt = dtype_of(fn, name, b, 2);
    if (kind < kNormRms || kind > kNormLayer)
      throw std::invalid_argument(std::string("fastlayers._C.") + fn + ": unknown norm kind " + std::to_string(kind));
    return NormShape{dt, dt == F64 ? F64 : F32, shape_of(b)[0], shape_of(b)[1]};
  };
  auto opt = [](const char* fn, const char* name, const std::optional<Buf>& b, int dt,
                const std::vector<int64_t>& shape) -> uintptr_t { return b ? expect(fn, name, *b, dt, shape) : 0; };
  m.def("norm_forward",
        [=](const Buf& x, const std::optional<Buf>& res, const std::optional<Buf>& s, const std::optional<Buf>& w,
            const std::optional<Buf>& b, const Buf& y, const std::optional<Buf>& mean, const std::optional<Buf>& rstd,
            int kind, double eps, int nthreads) {
          const char* fn = "norm_forward";
          const auto [dt, cd, rows, n] = norm_shape(fn, "x", x, kind);
          uintptr_t px = expect(fn, "x", x, dt, {rows, n}), py_ = expect(fn, "y", y, dt, {rows, n});
          uintptr_t pr = opt(fn, "res", res, dt, {rows, n}), ps = opt(fn, "s", s, dt, {rows, n});
          if ((pr != 0) != (ps != 0) && rows * n > 0)
            throw std::invalid_argument("fastlayers._C.norm_forward: 'res' and 's' go together");
          uintptr_t pw = opt(fn, "w", w, dt, {n}), pb = opt(fn, "b", b, dt, {n});
          if (pb && kind != kNormLayer) throw std::invalid_argument("fastlayers._C.norm_forward: 'b' is for kind layer only");
          uintptr_t pm = opt(fn, "mean", mean, cd, {rows}), pq = opt(fn, "rstd", rstd, cd, {rows});
          py::gil_scoped_release nogil;
          by_dtype(dt, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            using C = typename io<T>::C;
            norm_forward<T>(ptr<const T>(px), ptr<const T>(pr), ptr<T>(ps), ptr<const T>(pw), ptr<const T>(pb),
                            ptr<T>(py_), ptr<C>(pm), ptr<C>(pq), rows, n, kind, eps, nthreads);
          });
        },
        py::arg("x"), py::arg("res"), py::arg("s"), py::arg("w"), py::arg("b"), py::arg("y"), py::arg("mean"),
        py::arg("rstd"), py::arg("kind"), py::arg("eps"), py::arg("nthreads"),
        "y = norm(x [+ res]) * w [+ b] over the rows of a contiguous (rows, n) x; s = x + res; mean / rstd per row.");
  m.def("norm_backward",
        [=](const Buf& dy, const std::optional<Buf>& ds, const Buf& src, const std::optional<Buf>& w,
            const std::optional<Buf>& mean, const Buf& rstd, const std::optional<Buf>& dx, const std::optional<Buf>& dw,
            const std::optional<Buf>& db, int kind, int nthreads) {
          const char* fn = "norm_backward";
          const auto [dt, cd, rows, n] = norm_shape(fn, "src", src, kind);
          uintptr_t pdy = expect(fn, "dy", dy, dt, {rows, n}), psrc = expect(fn, "src", src, dt, {rows, n});
          uintptr_t pds = opt(fn, "ds", ds, dt, {rows, n}), pdx = opt(fn, "dx", dx, dt, {rows, n});
          uintptr_t pw = opt(fn, "w", w, dt, {n}), pdw = opt(fn, "dw", dw, dt, {n}), pdb = opt(fn, "db", db, dt, {n});
          uintptr_t pm = opt(fn, "mean", mean, cd, {rows}), pq = expect(fn, "rstd", rstd, cd, {rows});
          if (kind == kNormLayer && !pm && rows > 0)
            throw std::invalid_argument("fastlayers._C.norm_backward: kind layer needs 'mean'");
          py::gil_scoped_release nogil;
          by_dtype(dt, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            using C = typename io<T>::C;
            norm_backward<T>(ptr<const T>(pdy), ptr<const T>(pds), ptr<const T>(psrc), ptr<const T>(pw),
                             ptr<const C>(pm), ptr<const C>(pq), ptr<T>(pdx), ptr<T>(pdw), ptr<T>(pdb), rows, n,
                             kind, nthreads);
          });
        },
        py::arg("dy"), py::arg("ds"), py::arg("src"), py::arg("w"), py::arg("mean"), py::arg("rstd"), py::arg("dx"),
        py::arg("dw"), py::arg("db"), py::arg("kind"), py::arg("nthreads"),
        "dx = dnorm/dsrc . dy [+ ds], dw = colsum(dy * xhat), db = colsum(dy) (each optional).");
}


// ----------------------------------------------------------------------------- rotary (csrc/rotary.cpp)
// q, out_q: (n0, n1, n2, dq); cos_q, sin_q: (n0, n1, n2, r); the same for k with its own sizes.
// Strided: any strides on the three leading dims (0 allowed for cos / sin), the last dim contiguous.
// Returns the pointer and fills the three leading strides; checks dtype, shape and the last stride.
static uintptr_t expect_rows(const char* fn, const char* name, const Buf& b, int dtype,
                             const std::vector<int64_t>& shape, int64_t* strides) {
  const auto& [p, code, sh, st] = b;
  auto fail = [&](const std::string& what) {
    throw std::invalid_argument(std::string("fastlayers._C.") + fn + ": argument '" + name + "' " + what);
  };
  if (code != dtype) fail("has dtype code " + std::to_string(code) + ", expected " + std::to_string(dtype));
  if (sh != shape) fail("has shape " + dims(sh) + ", expected " + dims(shape));
  if (st.size() != 4) fail("must have 4 strides, got " + std::to_string(st.size()));
  int64_t numel = 1;
  for (int i = 0; i < 4; ++i) {
    if (sh[i] < 0) fail("has a negative size");
    if (st[i] < 0) fail("has a negative stride");
    numel *= sh[i];
  }
  for (int i = 0; i < 3; ++i) strides[i] = st[i];
  if (numel == 0) return p;
  if (p == 0) fail("is a null pointer");
  if (sh[3] > 1 && st[3] != 1) fail("must be contiguous in its last dim (strides " + dims(st) + ")");
  return p;
}

static void bind_rotary(py::module_& m) {
  m.def("rotary",
        [](const Buf& q, const Buf& k, const Buf& cq, const Buf& sq, const Buf& ck, const Buf& sk, const Buf& oq,
           const Buf& ok, bool interleaved, bool inverse, int nthreads) {
          const char* fn = "rotary";
          const int dt = dtype_of(fn, "q", q, 4);
          dtype_of(fn, "k", k, 4);
          dtype_of(fn, "cos_q", cq, 4);
          const auto& shq = shape_of(q);
          const auto& shk = shape_of(k);
          const int64_t r = shape_of(cq)[3];
          if (r % 2 != 0 || r > shq[3] || r > shk[3])
            throw std::invalid_argument("fastlayers._C.rotary: rotary dim " + std::to_string(r) +
                                        " must be even and at most q's and k's last dims");
          struct Checked {  // one operand's checked pointers (x, out, cos, sin) and strides
            uintptr_t p[4];
            int64_t st[4][3];
          } ops_[2];
          const Buf* bufs[2][4] = {{&q, &oq, &cq, &sq}, {&k, &ok, &ck, &sk}};
          const char* names[2][4] = {{"q", "out_q", "cos_q", "sin_q"}, {"k", "out_k", "cos_k", "sin_k"}};
          for (int a = 0; a < 2; ++a) {
            const auto& sh = a ? shk : shq;
            const std::vector<int64_t> tab = {sh[0], sh[1], sh[2], r};
            for (int i = 0; i < 4; ++i)
              ops_[a].p[i] = expect_rows(fn, names[a][i], *bufs[a][i], dt, i < 2 ? sh : tab, ops_[a].st[i]);
          }
          py::gil_scoped_release nogil;
          by_dtype(dt, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            RotaryOperand<T> ops[2];
            for (int a = 0; a < 2; ++a) {
              const auto& sh = a ? shk : shq;
              const Checked& c = ops_[a];
              RotaryOperand<T>& o = ops[a];
              o.x = ptr<const T>(c.p[0]);
              o.out = ptr<T>(c.p[1]);
              o.cos = ptr<const T>(c.p[2]);
              o.sin = ptr<const T>(c.p[3]);
              for (int i = 0; i < 3; ++i) {
                o.n[i] = sh[i];
                o.xs[i] = c.st[0][i];
                o.os[i] = c.st[1][i];
                o.cs[i] = c.st[2][i];
                o.ss[i] = c.st[3][i];
              }
              o.d = sh[3];
            }
            rotary_apply<T>(ops[0], ops[1], r, interleaved, inverse, nthreads);
          });
        },
        py::arg("q"), py::arg("k"), py::arg("cos_q"), py::arg("sin_q"), py::arg("cos_k"), py::arg("sin_k"),
        py::arg("out_q"), py::arg("out_k"), py::arg("interleaved"), py::arg("inverse"), py::arg("nthreads"),
        "out = x * cos + rotate(x) * sin (inverse: x * cos + rotate^T(x * sin)) for q and k, (n0, n1, n2, d) "
        "views with a contiguous last dim; the first r = cos.shape[-1] dims rotate, the rest are copied.");

}

// ----------------------------------------------------------------------------- attention softmax (csrc/attention_softmax.cpp)
// x, dx: (B, H, L, S) contiguous scores in T; y, dy: the same shape in U (T, or float32 for 16-bit T);
// mask: None or a (B, H, L, S) buffer of any non-negative strides (0 on broadcast dims) whose dtype
// code is kAttnBoolCode (torch.bool, one byte) or T's.
constexpr int kAttnBoolCode = 11;

static AttnMask attn_mask_of(const char* fn, const std::optional<Buf>& mask, int dt, const std::vector<int64_t>& shape,
                             bool float_ok) {
  AttnMask mk;
  if (!mask) return mk;
  const auto& [p, code, sh, st] = *mask;
  auto fail = [&](const std::string& what) {
    throw std::invalid_argument(std::string("fastlayers._C.") + fn + ": argument 'mask' " + what);
  };
  if (code != kAttnBoolCode && !(float_ok && code == dt))
    fail("has dtype code " + std::to_string(code) + ", expected " + std::to_string(kAttnBoolCode) +
         (float_ok ? " (bool) or " + std::to_string(dt) : std::string(" (bool)")));
  if (sh != shape) fail("has shape " + dims(sh) + ", expected " + dims(shape));
  if (st.size() != 4) fail("has " + std::to_string(st.size()) + " strides, expected 4");
  for (int64_t s : st)
    if (s < 0) fail("has a negative stride " + dims(st));
  int64_t numel = 1;
  for (int64_t d : sh) numel *= d;
  if (numel > 0 && p == 0) fail("is a null pointer");
  mk.p = (const void*)p;
  mk.kind = code == kAttnBoolCode ? kAttnMaskBool : kAttnMaskFloat;
  mk.sb = st[0], mk.sh = st[1], mk.sl = st[2], mk.ss = st[3];
  return mk;
}

// f((T*)0, (U*)0) for the (scores, probabilities) dtype pair, or invalid_argument.
template <class F>
static void by_attn_dtypes(const char* fn, int dt, int ut, F&& f) {
  if (ut == dt) {
    by_dtype(dt, [&](auto* tag) { f(tag, tag); });
  } else if (ut == F32 && dt == BF16) {
    f((bf16*)nullptr, (float*)nullptr);
  } else if (ut == F32 && dt == F16) {
    f((f16*)nullptr, (float*)nullptr);
  } else {
    throw std::invalid_argument(std::string("fastlayers._C.") + fn + ": probabilities of dtype code " +
                                std::to_string(ut) + " for scores of code " + std::to_string(dt) +
                                " (expected the same, or float32 for 16-bit scores)");
  }
}

static void bind_attention_softmax(py::module_& m) {
  m.attr("ATTN_BOOL_CODE") = kAttnBoolCode;
  m.def("attention_softmax_forward",
        [](const Buf& x, const std::optional<Buf>& mask, const Buf& y, double scale, bool causal, int nthreads) {
          const char* fn = "attention_softmax_forward";
          int dt = dtype_of(fn, "x", x, 4), ut = dtype_of(fn, "y", y, 4);
          const auto sh = shape_of(x);
          uintptr_t px = expect(fn, "x", x, dt, sh), py_ = expect(fn, "y", y, ut, sh);
          AttnMask mk = attn_mask_of(fn, mask, dt, sh, true);
          by_attn_dtypes(fn, dt, ut, [&](auto* t, auto* u) {
            using T = std::remove_pointer_t<decltype(t)>;
            using U = std::remove_pointer_t<decltype(u)>;
            py::gil_scoped_release nogil;
            attention_softmax_forward<T, U>(ptr<const T>(px), mk, ptr<U>(py_), sh[0], sh[1], sh[2], sh[3], scale,
                                            causal, nthreads);
          });
        },
        py::arg("x"), py::arg("mask"), py::arg("y"), py::arg("scale"), py::arg("causal"), py::arg("nthreads"),
        "y = softmax(masked(x * scale [+ mask])) over the last dim of contiguous (B, H, L, S) scores.");
  m.def("attention_softmax_backward",
        [](const Buf& dy, const Buf& y, const std::optional<Buf>& mask, const Buf& dx, double scale, bool causal,
           int nthreads) {
          const char* fn = "attention_softmax_backward";
          int ut = dtype_of(fn, "y", y, 4), dt = dtype_of(fn, "dx", dx, 4);
          const auto sh = shape_of(y);
          uintptr_t pdy = expect(fn, "dy", dy, ut, sh), py_ = expect(fn, "y", y, ut, sh);
          uintptr_t pdx = expect(fn, "dx", dx, dt, sh);
          AttnMask mk = attn_mask_of(fn, mask, dt, sh, false);
          by_attn_dtypes(fn, dt, ut, [&](auto* t, auto* u) {
            using T = std::remove_pointer_t<decltype(t)>;
            using U = std::remove_pointer_t<decltype(u)>;
            py::gil_scoped_release nogil;
            attention_softmax_backward<T, U>(ptr<const U>(pdy), ptr<const U>(py_), mk, ptr<T>(pdx), sh[0], sh[1],
                                             sh[2], sh[3], scale, causal, nthreads);
          });
        },
        py::arg("dy"), py::arg("y"), py::arg("mask"), py::arg("dx"), py::arg("scale"), py::arg("causal"),
        py::arg("nthreads"),
        "dx = keep ? y * (dy - sum(dy * y)) * scale : 0 (keep: the bool mask and causal), rows of (B, H, L, S).");
}

// ----------------------------------------------------------------------------- attention (csrc/attention.cpp)
// q, o, dout, dq: (B, H, L, D); k, v, dk, dv: (B, H, S, D): any non-negative strides on the three
// leading dims, the last dim contiguous, all of one dtype; lse: (B, H, L) contiguous in the compute
// dtype (float32, float64 for float64).
static void bind_attention(py::module_& m) {
  struct Shapes {  // from q and k; ql / kl: q's and k's shapes; plse: the checked lse buffer
    int dt;
    int64_t B, H, L, S, D;
    std::vector<int64_t> ql, kl;
    uintptr_t plse;
  };
  auto shapes = [](const char* fn, const Buf& q, const Buf& k, const Buf& lse) {
    Shapes s;
    s.dt = dtype_of(fn, "q", q, 4);
    dtype_of(fn, "k", k, 4);
    const auto& sq = shape_of(q);
    const auto& sk = shape_of(k);
    s.B = sq[0], s.H = sq[1], s.L = sq[2], s.D = sq[3], s.S = sk[2];
    s.ql = {s.B, s.H, s.L, s.D};
    s.kl = {s.B, s.H, s.S, s.D};
    s.plse = expect(fn, "lse", lse, s.dt == F64 ? F64 : F32, {s.B, s.H, s.L});
    return s;
  };
  auto operand = [](const char* fn, const char* name, const Buf& b, int dt, const std::vector<int64_t>& shape,
                    auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    AttnOperand<T> a;
    a.p = reinterpret_cast<T*>(expect_rows(fn, name, b, dt, shape, a.s));
    return a;
  };
  m.def("attention_forward",
        [=](const Buf& q, const Buf& k, const Buf& v, const Buf& o, const Buf& lse, double scale, bool causal,
            int nthreads) {
          const char* fn = "attention_forward";
          const Shapes s = shapes(fn, q, k, lse);
          const auto &ql = s.ql, &kl = s.kl;
          by_dtype(s.dt, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            const T* ct = nullptr;
            auto aq = operand(fn, "q", q, s.dt, ql, ct), ak = operand(fn, "k", k, s.dt, kl, ct),
                 av = operand(fn, "v", v, s.dt, kl, ct);
            auto ao = operand(fn, "out", o, s.dt, ql, tag);
            py::gil_scoped_release nogil;
            attention_forward<T>(aq, ak, av, ao, ptr<typename io<T>::C>(s.plse), s.B, s.H, s.L, s.S, s.D, scale,
                                 causal, nthreads);
          });
        },
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("scale"),
        py::arg("causal"), py::arg("nthreads"),
        "out = softmax(scale q k^T [causal: key j <= query i]) v and lse = the rows' log-sum-exp of the scores.");
  m.def("attention_backward",
        [=](const Buf& q, const Buf& k, const Buf& v, const Buf& o, const Buf& dout, const Buf& lse, const Buf& dq,
            const Buf& dk, const Buf& dv, double scale, bool causal, int nthreads) {
          const char* fn = "attention_backward";
          const Shapes s = shapes(fn, q, k, lse);
          const auto &ql = s.ql, &kl = s.kl;
          by_dtype(s.dt, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            const T* ct = nullptr;
            auto aq = operand(fn, "q", q, s.dt, ql, ct), ak = operand(fn, "k", k, s.dt, kl, ct),
                 av = operand(fn, "v", v, s.dt, kl, ct), ao = operand(fn, "out", o, s.dt, ql, ct),
                 ado = operand(fn, "dout", dout, s.dt, ql, ct);
            auto adq = operand(fn, "dq", dq, s.dt, ql, tag), adk = operand(fn, "dk", dk, s.dt, kl, tag),
                 adv = operand(fn, "dv", dv, s.dt, kl, tag);
            py::gil_scoped_release nogil;
            attention_backward<T>(aq, ak, av, ao, ado, ptr<const typename io<T>::C>(s.plse), adq, adk, adv, s.B, s.H,
                                  s.L, s.S, s.D, scale, causal, nthreads);
          });
        },
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("dout"), py::arg("lse"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"), py::arg("scale"), py::arg("causal"), py::arg("nthreads"),
        "dq, dk, dv of attention_forward's out from dout, out and lse (written, not accumulated).");
}
