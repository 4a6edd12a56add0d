// fastlayers._fastpath: the tiny no-grad CPU linear of fastlayers/_dispatch.py (tiny_cpu_linear)
// and its tiny softmax (tiny_cpu_softmax) in C++, against libtorch's own C++ API.
//
// Why: at 1 x 64 -> 64 the whole eager F.relu(F.linear(x, w, b)) takes ~3.3 us, of which the
// GEMM is a few hundred ns; the rest is two trips through PyTorch's Python argument parser and
// dispatcher. Python-level checks of the same call (is it a plain CPU tensor? grad? modes?) cost
// ~1 us more, so a Python gate could not get within 10% of eager. Here the checks read the
// tensors' C++ fields (a few ns each) and the two ops are called as at::linear + the in-place
// activation: measured 2026-12-02 (AMD EPYC, 2 threads, torch 2.13), 2.7 us for the C++ call vs
// 3.4 us for eager's two Python calls.
//
// Unlike fastlayers._C (pybind11 over raw buffers, no libtorch), this module includes torch's
// headers and links libtorch / libtorch_python, so it is tied to the torch it was built against:
// setup.py builds it only where torch imports at build time and records that torch's version
// (FASTLAYERS_TORCH_VERSION); fastlayers/_dispatch.py uses it only when the running torch matches.
#include <Python.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include <ATen/EmptyTensor.h>
#include <ATen/Functions.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/Reduction.h>
#include <ATen/TracerMode.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>

#include "../activations.h"  // the activation codes (fl::Act, fl::kActNames)

#ifndef FASTLAYERS_TORCH_VERSION
#error "setup.py defines FASTLAYERS_TORCH_VERSION (the torch this module is built against)"
#endif

namespace {

bool plain_cpu(const at::Tensor& t) {  // a dense CPU tensor (not sparse, mkldnn, meta or nested)
  return t.is_cpu() && t.layout() == c10::kStrided && !t.is_nested();
}

bool floating(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf || s == at::kDouble;
}

// Whatever would make F.linear from Python behave differently from at::linear here, or must take
// fastlayers' own route instead: a torch.func transform (its dynamic layer keys in the thread's
// dispatch keys), a TorchDispatchMode, a TorchFunctionMode (F.linear would call it), jit.trace.
bool special_mode_active() {
  return c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         c10::impl::TorchDispatchModeTLS::stack_len() > 0 || at::impl::torch_function_mode_enabled() ||
         at::tracer::impl::is_dispatch_enabled();
}

// The activation codes: the C++ backend's one table (csrc/activations.h, checked against
// fastlayers/activations.py at import). Each has an in-place ATen op here but quick_gelu, which
// PyTorch lacks: the Python gate runs it.
bool runs_here(long code) { return code >= 0 && code < fl::kNumActs && code != fl::QUICK_GELU; }

// y = act(y) in place: the ATen kernels of activations.py's `ref_` column (bit-identical to `ref`).
void activate_(at::Tensor& y, int code, double slope) {
  switch (code) {
    case fl::RELU: at::relu_(y); break;
    case fl::LEAKY_RELU: at::leaky_relu_(y, slope); break;
    case fl::GELU: at::gelu_(y, "none"); break;
    case fl::GELU_TANH: at::gelu_(y, "tanh"); break;
    case fl::SILU: at::silu_(y); break;
    case fl::SIGMOID: at::sigmoid_(y); break;
    case fl::TANH: at::tanh_(y); break;
    case fl::HARDSWISH: at::hardswish_(y); break;
    case fl::HARDSIGMOID: at::hardsigmoid_(y); break;
    case fl::RELU6: at::relu6_(y); break;
    case fl::MISH: at::mish_(y); break;
    default: break;  // NONE (QUICK_GELU never gets here: runs_here)
  }
}

// F.linear and F.relu release the GIL around their kernels, so that other Python threads run
// meanwhile; releasing and taking it back costs ~0.3 us (measured), a tenth of a 1 x 64 -> 64
// call. Calls of fewer multiply-adds than this (under ~10 us of work) keep it.
constexpr int64_t kReleaseGilMacs = int64_t(1) << 16;

struct ReleaseGil {
  PyThreadState* state;
  explicit ReleaseGil(bool release) : state(release ? PyEval_SaveThread() : nullptr) {}
  ~ReleaseGil() {
    if (state != nullptr) PyEval_RestoreThread(state);
  }
};

// tiny_linear(x, w, b, code, slope, max_out, max_macs) -> act(F.linear(x, w, b)), or None.
//
// x: (*, K), w: (N, K), b: (N,) or None, any strides; y (*, N) is at::linear's fresh output, the
// activation applied to it in place. Admits only what fastlayers' general path would also send to
// these two ops (see _dispatch.tiny_cpu_linear): exactly torch.Tensor / nn.Parameter, dense CPU,
// a floating x, a 2-D weight, nothing requiring grad while grad mode is on, no special mode, at
// most max_out outputs (M * N, M = numel(x) / K) and fewer than max_macs multiply-adds. Anything
// else, and anything at::linear raises on (mismatched shapes, dtypes, devices), returns None: the
// caller then takes the general path, which checks every argument and raises fastlayers' errors.
// Threads: the ATen ops' own (tiny here: one); without the GIL from kReleaseGilMacs up.
PyObject* tiny_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 7) {
    PyErr_SetString(PyExc_TypeError, "fastlayers._fastpath.tiny_linear: expected 7 arguments");
    return nullptr;
  }
  PyObject *px = args[0], *pw = args[1], *pb = args[2];
  if (!THPVariable_CheckExact(px) || !THPVariable_CheckExact(pw) ||
      (pb != Py_None && !THPVariable_CheckExact(pb)))
    Py_RETURN_NONE;
  const long code = PyLong_AsLong(args[3]);
  const double slope = PyFloat_AsDouble(args[4]);
  const long long max_out = PyLong_AsLongLong(args[5]), max_macs = PyLong_AsLongLong(args[6]);
  if (PyErr_Occurred()) return nullptr;
  const at::Tensor& x = THPVariable_Unpack(px);
  const at::Tensor& w = THPVariable_Unpack(pw);
  if (!plain_cpu(x) || !floating(x) || !plain_cpu(w) || w.dim() != 2) Py_RETURN_NONE;
  const bool grad = at::GradMode::is_enabled();
  if (grad && (x.requires_grad() || w.requires_grad())) Py_RETURN_NONE;
  if (special_mode_active()) Py_RETURN_NONE;
  const int64_t n = w.size(0), k = w.size(1);
  // M * N <= max_out with M = numel(x) / K (K = 0: M unknown, the general path decides), and
  // M * K * N < max_macs.
  const int64_t macs = x.numel() * n;
  if (k == 0 || macs > max_out * k || macs >= max_macs) Py_RETURN_NONE;
  std::optional<at::Tensor> b;
  if (pb != Py_None) {
    const at::Tensor& bt = THPVariable_Unpack(pb);
    // (F.linear refuses a sparse, mkldnn or meta bias itself, but would broadcast (1, N), (1,), ())
    if ((grad && bt.requires_grad()) || bt.dim() != 1 || bt.numel() != n) Py_RETURN_NONE;
    b = bt;
  }
  if (!runs_here(code)) Py_RETURN_NONE;
  at::Tensor y;
  try {
    ReleaseGil nogil(macs >= kReleaseGilMacs);
    y = at::linear(x, w, b);
    activate_(y, static_cast<int>(code), slope);
  } catch (const std::exception&) {  // c10::Error from a mismatched call: the general path says why
    Py_RETURN_NONE;
  }
  return THPVariable_Wrap(std::move(y));
}

// y = act(y) out of place: what the eager F.<act>(y) records, for a call autograd follows
// (activations.py's `ref` column; each saves what eager's own node saves).
at::Tensor activate(const at::Tensor& y, int code, double slope) {
  switch (code) {
    case fl::RELU: return at::relu(y);
    case fl::LEAKY_RELU: return at::leaky_relu(y, slope);
    case fl::GELU: return at::gelu(y, "none");
    case fl::GELU_TANH: return at::gelu(y, "tanh");
    case fl::SILU: return at::silu(y);
    case fl::SIGMOID: return at::sigmoid(y);
    case fl::TANH: return at::tanh(y);
    case fl::HARDSWISH: return at::hardswish(y);
    case fl::HARDSIGMOID: return at::hardsigmoid(y);
    case fl::RELU6: return at::relu6(y);
    case fl::MISH: return at::mish(y);
    default: return y;  // NONE
  }
}

// small_linear(x, w, b, code, slope, max_macs) -> act(F.linear(x, w, b)), or None.
//
// The small-call route of FusedLinear (fastlayers/nn.py) in one call: a CPU linear (+ activation)
// of fewer than max_macs multiply-adds (the cpp backend's FUSED_MIN_MACS) runs PyTorch's own two
// ops, with or without a gradient -- what linear_act's general path does below that size (the
// composite with grad, the backend's forward of the same two ops without: same bits), minus its
// Python: measured in a whole training step, the gates' Python between two GEMMs costs 3-5x its
// hot-loop time (cold caches after each GEMM), ~15-50 us a call. Same admission as tiny_linear
// (plain dense CPU tensors, floating x, 2-D weight, 1-D bias of N, no special mode, a runnable
// activation) but for grad; with autograd recording the activation runs out of place (eager's
// node and saved tensors), else in place on the fresh output (the same kernel, same bits).
// Anything at::linear raises on returns None: the caller's general path says why.
// Threads: the ATen ops' own; without the GIL from kReleaseGilMacs up.
PyObject* small_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 6) {
    PyErr_SetString(PyExc_TypeError, "fastlayers._fastpath.small_linear: expected 6 arguments");
    return nullptr;
  }
  PyObject *px = args[0], *pw = args[1], *pb = args[2];
  if (!THPVariable_CheckExact(px) || !THPVariable_CheckExact(pw) ||
      (pb != Py_None && !THPVariable_CheckExact(pb)))
    Py_RETURN_NONE;
  const long code = PyLong_AsLong(args[3]);
  const double slope = PyFloat_AsDouble(args[4]);
  const long long max_macs = PyLong_AsLongLong(args[5]);
  if (PyErr_Occurred()) return nullptr;
  const at::Tensor& x = THPVariable_Unpack(px);
  const at::Tensor& w = THPVariable_Unpack(pw);
  if (!plain_cpu(x) || !floating(x) || !plain_cpu(w) || w.dim() != 2 || !runs_here(code) ||
      special_mode_active())
    Py_RETURN_NONE;
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t macs = x.numel() * n;  // M * K * N with M = numel(x) / K
  if (k == 0 || x.dim() == 0 || macs >= max_macs) Py_RETURN_NONE;
  std::optional<at::Tensor> b;
  bool needs_grad = x.requires_grad() || w.requires_grad();
  if (pb != Py_None) {
    const at::Tensor& bt = THPVariable_Unpack(pb);
    if (bt.dim() != 1 || bt.numel() != n) Py_RETURN_NONE;  // F.linear would broadcast it
    needs_grad = needs_grad || bt.requires_grad();
    b = bt;
  }
  const bool record = needs_grad && at::GradMode::is_enabled();
  at::Tensor y;
  try {
    ReleaseGil nogil(macs >= kReleaseGilMacs);
    y = at::linear(x, w, b);
    if (record) {
      y = activate(y, static_cast<int>(code), slope);
    } else {
      activate_(y, static_cast<int>(code), slope);
    }
  } catch (const std::exception&) {
    Py_RETURN_NONE;
  }
  return THPVariable_Wrap(std::move(y));
}

// small_norm(x, w, b, residual, eps, rms, shape, max_numel) -> y, or (y, x + residual); or None.
//
// The norm modules' small-call route (fastlayers/ops/norms.py, _small_cpu_norm) in one call:
// s = x + residual (when given), y = F.layer_norm(s, shape, w, b, eps) (rms false) or
// F.rms_norm(s, shape, w, eps) (rms true) -- norm_composite's ops, which fastlayers' general path
// runs below _TORCH_MAX_NUMEL too. Admits: exactly torch.Tensor / nn.Parameter, dense CPU, floating
// x of fewer than max_numel elements whose last dims are `shape` (a tuple of ints); w and b None or
// of x's dtype and exactly `shape`; residual None or of x's dtype and shape; eps a float >= 0; no
// special mode. Anything else, or anything an ATen op raises on, returns None (the Python route
// decides and raises fastlayers' errors). Autograd records PyTorch's own nodes. Threads: ATen's.
PyObject* small_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 8) {
    PyErr_SetString(PyExc_TypeError, "fastlayers._fastpath.small_norm: expected 8 arguments");
    return nullptr;
  }
  PyObject *px = args[0], *pw = args[1], *pb = args[2], *pr = args[3], *peps = args[4], *pshape = args[6];
  if (!THPVariable_CheckExact(px) || (pw != Py_None && !THPVariable_CheckExact(pw)) ||
      (pb != Py_None && !THPVariable_CheckExact(pb)) || (pr != Py_None && !THPVariable_CheckExact(pr)) ||
      !PyFloat_CheckExact(peps) || !PyTuple_Check(pshape))
    Py_RETURN_NONE;
  const double eps = PyFloat_AS_DOUBLE(peps);
  const int rms = PyObject_IsTrue(args[5]);
  const long long max_numel = PyLong_AsLongLong(args[7]);
  if (rms < 0 || PyErr_Occurred()) return nullptr;
  if (!(eps >= 0.0)) Py_RETURN_NONE;  // (NaN too)
  const at::Tensor& x = THPVariable_Unpack(px);
  if (!plain_cpu(x) || !floating(x) || x.numel() >= max_numel || special_mode_active()) Py_RETURN_NONE;
  const Py_ssize_t nd = PyTuple_GET_SIZE(pshape);
  if (nd < 1 || nd > x.dim()) Py_RETURN_NONE;
  std::vector<int64_t> shape(nd);
  for (Py_ssize_t i = 0; i < nd; ++i) {
    PyObject* d = PyTuple_GET_ITEM(pshape, i);
    if (!PyLong_CheckExact(d)) Py_RETURN_NONE;
    shape[i] = PyLong_AsLongLong(d);
    if (PyErr_Occurred()) {
      PyErr_Clear();
      Py_RETURN_NONE;
    }
    if (x.size(x.dim() - nd + i) != shape[i]) Py_RETURN_NONE;
  }
  const auto matches = [&](PyObject* p) -> bool {  // None, or x's dtype, `shape`, dense CPU
    if (p == Py_None) return true;
    const at::Tensor& t = THPVariable_Unpack(p);
    return plain_cpu(t) && t.scalar_type() == x.scalar_type() && t.sizes() == at::IntArrayRef(shape);
  };
  if (!matches(pw) || !matches(pb)) Py_RETURN_NONE;
  std::optional<at::Tensor> w, b;
  if (pw != Py_None) w = THPVariable_Unpack(pw);
  if (pb != Py_None) b = THPVariable_Unpack(pb);
  if (pr != Py_None) {
    const at::Tensor& r = THPVariable_Unpack(pr);
    if (!plain_cpu(r) || r.scalar_type() != x.scalar_type() || r.sizes() != x.sizes()) Py_RETURN_NONE;
  }
  at::Tensor y, sum;
  try {
    const at::Tensor s = pr != Py_None ? at::add(x, THPVariable_Unpack(pr)) : x;  // x + residual
    y = rms ? at::rms_norm(s, shape, w, eps) : at::layer_norm(s, shape, w, b, eps);
    if (pr != Py_None) sum = s;
  } catch (const std::exception&) {
    Py_RETURN_NONE;
  }
  if (pr == Py_None) return THPVariable_Wrap(std::move(y));
  PyObject* py = THPVariable_Wrap(std::move(y));
  if (py == nullptr) return nullptr;
  PyObject* ps = THPVariable_Wrap(std::move(sum));
  if (ps == nullptr) {
    Py_DECREF(py);
    return nullptr;
  }
  PyObject* out = PyTuple_Pack(2, py, ps);  // (new references to both)
  Py_DECREF(py);
  Py_DECREF(ps);
  return out;
}

// The losses' options as the C++ gates take them: ignore_index an int (fitting int64),
// label_smoothing a float, reduction "mean" / "sum" / "none". False: not these (the caller refuses
// the call; the Python route checks and raises).
struct LossOptions {
  int64_t reduction;
  long long ignore_index;
  double smoothing;
};

bool loss_options(PyObject* pig, PyObject* pls, PyObject* pred, LossOptions* o) {
  if (!PyLong_CheckExact(pig) || !PyFloat_CheckExact(pls) || !PyUnicode_Check(pred)) return false;
  if (PyUnicode_CompareWithASCIIString(pred, "mean") == 0) {
    o->reduction = at::Reduction::Mean;
  } else if (PyUnicode_CompareWithASCIIString(pred, "sum") == 0) {
    o->reduction = at::Reduction::Sum;
  } else if (PyUnicode_CompareWithASCIIString(pred, "none") == 0) {
    o->reduction = at::Reduction::None;
  } else {
    return false;
  }
  int overflow = 0;
  o->ignore_index = PyLong_AsLongLongAndOverflow(pig, &overflow);
  o->smoothing = PyFloat_AS_DOUBLE(pls);
  return overflow == 0;
}

// small_cross_entropy(logits, target, ignore_index, label_smoothing, reduction, max_numel)
//   -> F.cross_entropy(logits, target, ...), or None.
//
// cross_entropy's small-call route (fastlayers/ops/cross_entropy.py: below _TORCH_MAX_NUMEL
// logits on the CPU the general path runs PyTorch's op) in one call, for its common form:
// contiguous (N, C) floating logits, (N,) int64 class targets, no class weights, no autocast, no
// special mode. Out-of-range targets (and anything else ATen raises on) return None: the general
// path raises fastlayers' error. Autograd records PyTorch's node. Threads: ATen's.
PyObject* small_cross_entropy(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 6) {
    PyErr_SetString(PyExc_TypeError, "fastlayers._fastpath.small_cross_entropy: expected 6 arguments");
    return nullptr;
  }
  PyObject *px = args[0], *pt = args[1];
  const long long max_numel = PyLong_AsLongLong(args[5]);
  if (PyErr_Occurred()) return nullptr;
  LossOptions o;
  if (!THPVariable_CheckExact(px) || !THPVariable_CheckExact(pt) || !loss_options(args[2], args[3], args[4], &o))
    Py_RETURN_NONE;
  const at::Tensor& x = THPVariable_Unpack(px);
  const at::Tensor& t = THPVariable_Unpack(pt);
  if (!plain_cpu(x) || !floating(x) || x.dim() != 2 || !x.is_contiguous() || x.numel() >= max_numel ||
      !plain_cpu(t) || t.scalar_type() != at::kLong || t.dim() != 1 || t.size(0) != x.size(0) ||
      special_mode_active() || at::autocast::is_autocast_enabled(at::kCPU))
    Py_RETURN_NONE;
  at::Tensor loss;
  try {
    loss = at::cross_entropy_loss(x, t, std::nullopt, o.reduction, o.ignore_index, o.smoothing);
  } catch (const std::exception&) {
    Py_RETURN_NONE;
  }
  return THPVariable_Wrap(std::move(loss));
}

// small_linear_ce(h, w, b, target, ignore_index, label_smoothing, reduction, fp32_out, max_logits)
//   -> F.cross_entropy(F.linear(h, w, b) in its compute dtype, target, ...), or None.
//
// linear_cross_entropy's small-call route (fastlayers/ops/linear_cross_entropy.py,
// _linear_ce_torch: the logits upcast to float32 when 16-bit, as transformers' loss does; the
// loss cast to float32 when fp32_out, else to h's dtype) in one call: below max_logits (N x V)
// logits on the CPU the general path runs these same ops, after ~10 Python checks that cost, in
// a small model's training step, about as much as the loss itself. Admits: exactly torch.Tensor /
// nn.Parameter, dense CPU, floating h (N, H), w (V, H) and b (V,) or None of h's dtype, target
// (N,) int64, ignore_index an int, label_smoothing a float, reduction "mean" / "sum" / "none", no
// special mode, no autocast. The targets are checked by at::cross_entropy_loss itself: an
// out-of-range one (or anything an ATen op raises on) returns None, and the general path raises
// fastlayers' error naming it. Autograd records PyTorch's own nodes. Threads: ATen's.
PyObject* small_linear_ce(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 9) {
    PyErr_SetString(PyExc_TypeError, "fastlayers._fastpath.small_linear_ce: expected 9 arguments");
    return nullptr;
  }
  PyObject *ph = args[0], *pw = args[1], *pb = args[2], *pt = args[3];
  const int fp32_out = PyObject_IsTrue(args[7]);
  const long long max_logits = PyLong_AsLongLong(args[8]);
  if (fp32_out < 0 || PyErr_Occurred()) return nullptr;
  LossOptions o;
  if (!THPVariable_CheckExact(ph) || !THPVariable_CheckExact(pw) || !THPVariable_CheckExact(pt) ||
      (pb != Py_None && !THPVariable_CheckExact(pb)) || !loss_options(args[4], args[5], args[6], &o))
    Py_RETURN_NONE;
  const at::Tensor& h = THPVariable_Unpack(ph);
  const at::Tensor& w = THPVariable_Unpack(pw);
  const at::Tensor& t = THPVariable_Unpack(pt);
  if (!plain_cpu(h) || !floating(h) || h.dim() != 2 || !plain_cpu(w) || w.dim() != 2 ||
      w.scalar_type() != h.scalar_type() || w.size(1) != h.size(1) || !plain_cpu(t) ||
      t.scalar_type() != at::kLong || t.dim() != 1 || t.size(0) != h.size(0) ||
      h.size(0) * w.size(0) >= max_logits || special_mode_active() || at::autocast::is_autocast_enabled(at::kCPU))
    Py_RETURN_NONE;
  std::optional<at::Tensor> b;
  if (pb != Py_None) {
    const at::Tensor& bt = THPVariable_Unpack(pb);
    if (!plain_cpu(bt) || bt.scalar_type() != h.scalar_type() || bt.dim() != 1 || bt.size(0) != w.size(0))
      Py_RETURN_NONE;
    b = bt;
  }
  const auto dtype = h.scalar_type();
  const bool half = dtype == at::kBFloat16 || dtype == at::kHalf;
  at::Tensor loss;
  try {
    ReleaseGil nogil(h.size(0) * w.size(0) * h.size(1) >= kReleaseGilMacs);
    at::Tensor z = at::linear(h, w, b);
    if (half) z = z.to(at::kFloat);
    loss = at::cross_entropy_loss(z, t, std::nullopt, o.reduction, o.ignore_index, o.smoothing);
    loss = loss.to(fp32_out ? at::kFloat : dtype);
  } catch (const std::exception&) {
    Py_RETURN_NONE;
  }
  return THPVariable_Wrap(std::move(loss));
}

// tiny_softmax(x, dim, log, max_numel) -> torch.softmax(x, dim) (log_softmax if log), or None.
//
// The softmax twin of tiny_linear, for _dispatch.tiny_cpu_softmax (no dtype argument: that one's
// Python path takes it): exactly torch.Tensor / nn.Parameter, dense CPU, floating, fewer than
// max_numel elements, dim an int (not a bool) in [-max(ndim, 1), max(ndim, 1)), no special mode.
// at::softmax records PyTorch's own autograd node when x requires grad, as torch.softmax does.
// Threads: ATen's; without the GIL from kReleaseGilElems elements (~4 us of work) up.
constexpr int64_t kReleaseGilElems = int64_t(1) << 14;

PyObject* tiny_softmax(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4) {
    PyErr_SetString(PyExc_TypeError, "fastlayers._fastpath.tiny_softmax: expected 4 arguments");
    return nullptr;
  }
  PyObject *px = args[0], *pdim = args[1];
  if (!THPVariable_CheckExact(px) || !PyLong_CheckExact(pdim)) Py_RETURN_NONE;
  const int log = PyObject_IsTrue(args[2]);
  const long long max_numel = PyLong_AsLongLong(args[3]);
  if (log < 0 || PyErr_Occurred()) return nullptr;
  int overflow = 0;
  const long long dim = PyLong_AsLongLongAndOverflow(pdim, &overflow);
  if (overflow != 0 || PyErr_Occurred()) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  const at::Tensor& x = THPVariable_Unpack(px);
  if (!plain_cpu(x) || !floating(x) || x.numel() >= max_numel || special_mode_active()) Py_RETURN_NONE;
  const int64_t n = std::max<int64_t>(x.dim(), 1);
  if (dim < -n || dim >= n) Py_RETURN_NONE;
  at::Tensor y;
  try {
    ReleaseGil nogil(x.numel() >= kReleaseGilElems);
    y = log ? at::log_softmax(x, dim) : at::softmax(x, dim);
  } catch (const std::exception&) {
    Py_RETURN_NONE;
  }
  return THPVariable_Wrap(std::move(y));
}

// ----------------------------------------------------------------------------- the output cache
// Large CPU outputs of fastlayers' kernels (fastlayers/backends/cpu/_ext.py `_empty`, from 32 MiB:
// the size from which glibc serves every allocation with a fresh mmap, faulted in and zeroed by the
// kernel page by page) come from this allocator, which keeps freed blocks for reuse: a fresh 32 MiB
// output costs about as much as the pass that fills it (add + RMSNorm 8192 x 1024 fp32 forward:
// 23.6 ms into fresh outputs, 15.8 ms into reused ones, a same-size copy 7.9 ms; measured
// 2026-12-07, Xeon, 2 threads, busy). What it keeps: freed blocks, newest first, up to `cap`
// bytes in all (FASTLAYERS_CPU_CACHE_MB, default min(1 GiB, RAM / 16); 0 turns it off), each reused
// for a request of its size down to 4/5 of it; fastlayers.empty_cache() returns them all to the OS.
// The tensors are ordinary CPU tensors (resizable; their storage's allocator is this one). Freed
// from any thread: a mutex guards the lists. The cache is never destroyed (blocks may be freed
// during interpreter shutdown, after static destructors ran).
class OutputCache final : public c10::Allocator {
 public:
  OutputCache() : cap_(default_cap()) {}

  at::DataPtr allocate(size_t n) override {
    Block* b = take(n);
    if (b == nullptr) {
      b = new Block{c10::alloc_cpu(n), n};
      advise_huge(b->p, n);
    }
    return {b->p, b, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  size_t empty() {  // frees every cached block; returns the bytes freed
    std::multimap<size_t, Entry> gone;
    {
      std::lock_guard<std::mutex> lock(mu_);
      gone.swap(free_);
      cached_ = 0;
    }
    size_t bytes = 0;
    for (auto& kv : gone) {
      bytes += kv.first;
      c10::free_cpu(kv.second.block->p);
      delete kv.second.block;
    }
    return bytes;
  }
  std::pair<size_t, size_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {cached_, cap_};
  }
  void set_cap(size_t cap) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      cap_ = cap;
    }
    if (cap == 0) empty();
  }

 private:
  struct Block {
    void* p;
    size_t n;  // the block's size (a reused block may be larger than its tensor)
  };
  struct Entry {
    Block* block;
    uint64_t tick;  // when it was freed (eviction: the oldest first)
  };

  static size_t default_cap() {
    if (const char* env = std::getenv("FASTLAYERS_CPU_CACHE_MB")) return size_t(std::strtoull(env, nullptr, 10)) << 20;
    size_t cap = size_t(1) << 30;
#if defined(__linux__)
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    if (pages > 0 && page > 0) cap = std::min(cap, size_t(pages) * size_t(page) / 16);
#endif
    return cap;
  }

  static void advise_huge(void* p, size_t n) {  // transparent huge pages on the 2 MiB-aligned interior
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = uintptr_t(1) << 21, a = reinterpret_cast<uintptr_t>(p);
    const uintptr_t b = (a + huge - 1) & ~(huge - 1), e = (a + n) & ~(huge - 1);
    if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#else
    (void)p;
    (void)n;
#endif
  }

  Block* take(size_t n) {  // a cached block of n .. 5n/4 bytes (the smallest), or nullptr
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.lower_bound(n);
    if (it == free_.end() || it->first > n + n / 4) return nullptr;
    Block* b = it->second.block;
    cached_ -= it->first;
    free_.erase(it);
    return b;
  }

  static void release(void* ctx);

  void put(Block* b) {
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (b->n <= cap_) {
        while (cached_ + b->n > cap_ && !free_.empty()) {  // make room: the oldest blocks go
          auto oldest = free_.begin();
          for (auto it = free_.begin(); it != free_.end(); ++it)
            if (it->second.tick < oldest->second.tick) oldest = it;
          cached_ -= oldest->first;
          evicted.push_back(oldest->second.block);
          free_.erase(oldest);
        }
        free_.emplace(b->n, Entry{b, ++tick_});
        cached_ += b->n;
        b = nullptr;
      }
    }
    if (b != nullptr) evicted.push_back(b);
    for (Block* e : evicted) {
      c10::free_cpu(e->p);
      delete e;
    }
  }

  std::mutex mu_;
  std::multimap<size_t, Entry> free_;  // size -> freed block
  size_t cached_ = 0, cap_;
  uint64_t tick_ = 0;
};

OutputCache& output_cache() {
  static OutputCache* cache = new OutputCache();  // never destroyed (see above)
  return *cache;
}

void OutputCache::release(void* ctx) { output_cache().put(static_cast<Block*>(ctx)); }

// cached_empty(shape, dtype) -> torch.empty(shape, dtype=dtype) on the output cache (CPU, contiguous).
PyObject* cached_empty(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !PyTuple_Check(args[0]) || !THPDtype_Check(args[1])) {
    PyErr_SetString(PyExc_TypeError, "fastlayers._fastpath.cached_empty: expected (shape tuple, dtype)");
    return nullptr;
  }
  const Py_ssize_t nd = PyTuple_GET_SIZE(args[0]);
  std::vector<int64_t> shape(nd);
  for (Py_ssize_t i = 0; i < nd; ++i) {
    shape[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(args[0], i));
    if (PyErr_Occurred()) return nullptr;
    if (shape[i] < 0) {
      PyErr_SetString(PyExc_ValueError, "fastlayers._fastpath.cached_empty: negative dimension");
      return nullptr;
    }
  }
  const auto dtype = reinterpret_cast<THPDtype*>(args[1])->scalar_type;
  at::Tensor t;
  try {
    t = at::Tensor(at::detail::empty_generic(shape, &output_cache(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                             std::nullopt));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  return THPVariable_Wrap(std::move(t));
}

// cached_empty_like(x) -> torch.empty_like(x) (preserve_format) on the output cache, for a plain
// CPU tensor that is non-overlapping and dense (empty_like then keeps x's exact strides: a
// transposed view's output is transposed too); None otherwise (the caller uses torch.empty_like).
PyObject* cached_empty_like(PyObject*, PyObject* arg) {
  if (!THPVariable_CheckExact(arg)) Py_RETURN_NONE;
  const at::Tensor& x = THPVariable_Unpack(arg);
  if (!x.defined() || x.device().type() != c10::DeviceType::CPU || x.layout() != c10::kStrided ||
      !x.unsafeGetTensorImpl()->is_non_overlapping_and_dense())
    Py_RETURN_NONE;
  at::Tensor t;
  try {
    t = at::Tensor(at::detail::empty_strided_generic(x.sizes(), x.strides(), &output_cache(),
                                                     c10::DispatchKeySet(c10::DispatchKey::CPU), x.scalar_type()));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  return THPVariable_Wrap(std::move(t));
}

PyObject* empty_cache(PyObject*, PyObject*) { return PyLong_FromSize_t(output_cache().empty()); }

PyObject* cache_stats(PyObject*, PyObject*) {
  const auto s = output_cache().stats();
  return Py_BuildValue("(nn)", Py_ssize_t(s.first), Py_ssize_t(s.second));
}

PyObject* set_cache_cap(PyObject*, PyObject* arg) {
  const long long cap = PyLong_AsLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  output_cache().set_cap(size_t(std::max<long long>(cap, 0)));
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"tiny_softmax", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(tiny_softmax)),
     METH_FASTCALL, "tiny_softmax(x, dim, log, max_numel): torch.(log_)softmax(x, dim) or None"},
    {"small_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(small_linear)),
     METH_FASTCALL, "small_linear(x, w, b, code, slope, max_macs): act(F.linear(x, w, b)) with or without grad, or None"},
    {"small_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(small_norm)),
     METH_FASTCALL, "small_norm(x, w, b, residual, eps, rms, shape, max_numel): F.layer_norm / F.rms_norm of x (+ residual), or None"},
    {"small_linear_ce", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(small_linear_ce)),
     METH_FASTCALL, "small_linear_ce(h, w, b, target, ignore_index, label_smoothing, reduction, fp32_out, max_logits): the loss by PyTorch's ops, or None"},
    {"small_cross_entropy", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(small_cross_entropy)),
     METH_FASTCALL, "small_cross_entropy(logits, target, ignore_index, label_smoothing, reduction, max_numel): F.cross_entropy, or None"},
    {"cached_empty", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(cached_empty)), METH_FASTCALL,
     "cached_empty(shape, dtype): a new contiguous CPU tensor on the output cache"},
    {"cached_empty_like", cached_empty_like, METH_O,
     "cached_empty_like(x): torch.empty_like(x) on the output cache for a dense, non-overlapping CPU x, or None"},
    {"empty_cache", empty_cache, METH_NOARGS, "empty_cache() -> bytes freed: frees the output cache's blocks"},
    {"cache_stats", cache_stats, METH_NOARGS, "cache_stats() -> (bytes cached, cap in bytes)"},
    {"set_cache_cap", set_cache_cap, METH_O, "set_cache_cap(bytes): the cache's cap (0: off, frees it)"},
    {"tiny_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(tiny_linear)),
     METH_FASTCALL, "tiny_linear(x, w, b, code, slope, max_out, max_macs): act(F.linear(x, w, b)) or None"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_fastpath",
                       "The tiny CPU linear and softmax gates in C++ (see csrc/torch/fastpath.cpp)", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__fastpath() {
  PyObject* m = PyModule_Create(&kModule);
  if (m == nullptr) return nullptr;
  PyObject* acts = PyDict_New();
  if (acts == nullptr || PyModule_AddObject(m, "ACTIVATION_CODES", acts) < 0) {
    Py_XDECREF(acts);
    Py_DECREF(m);
    return nullptr;
  }
  for (int c = 0; c < fl::kNumActs; ++c) {  // the codes tiny_linear runs, by name
    if (!runs_here(c)) continue;
    PyObject* v = PyLong_FromLong(c);
    if (v == nullptr || PyDict_SetItemString(acts, fl::kActNames[c], v) < 0) {
      Py_XDECREF(v);
      Py_DECREF(m);
      return nullptr;
    }
    Py_DECREF(v);
  }
  if (PyModule_AddStringConstant(m, "TORCH_VERSION", FASTLAYERS_TORCH_VERSION) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
