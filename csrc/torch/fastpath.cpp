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

#include <ATen/Functions.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/TracerMode.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
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

PyMethodDef kMethods[] = {
    {"tiny_softmax", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(tiny_softmax)),
     METH_FASTCALL, "tiny_softmax(x, dim, log, max_numel): torch.(log_)softmax(x, dim) or None"},
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
