// The one place the resnet_fused operators are declared. Kernels register
// against these schemas per dispatch key in csrc/cpu and csrc/cuda; fake
// (meta) implementations live in resnet_fused/ops/extension.py.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <cstring>

#include "cpu/bn_reduce_host.h"
#include "cpu/gemm_plan.h"
#include "cpu/output_cache.h"

namespace resnet_fused {
namespace cpu {
const char* kernel_targets();  // csrc/cpu/kernels.cpp
}  // namespace cpu
}  // namespace resnet_fused

namespace {
// How the library was built, for tests and bug reports: whether
// at::parallel_for runs on threads here (it is compiled into this library and
// falls back to one thread without -fopenmp) and which instruction sets the
// CPU hot loops were compiled for.
PyObject* build_info(PyObject*, PyObject*) {
#ifdef _OPENMP
  PyObject* openmp = Py_True;
#else
  PyObject* openmp = Py_False;
#endif
  return Py_BuildValue("{s:O,s:s}", "openmp", openmp, "cpu_targets", resnet_fused::cpu::kernel_targets());
}

// same_values(a, b): whether two equally long tuples of tensors (or None)
// hold the same tensors by value — dtype, device, shape and every bit (so a
// NaN equals itself, unlike torch.equal). For the oneDNN weight cache, which
// compares a conv+BN pair's small BN vectors with the ones its packed weights
// were made from on every call: one C call instead of a torch.equal
// dispatch per vector.
PyObject* same_values(PyObject*, PyObject* args) {
  PyObject *a = nullptr, *b = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!", &PyTuple_Type, &a, &PyTuple_Type, &b)) return nullptr;
  const Py_ssize_t n = PyTuple_GET_SIZE(a);
  if (PyTuple_GET_SIZE(b) != n) Py_RETURN_FALSE;
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* x = PyTuple_GET_ITEM(a, i);
      PyObject* y = PyTuple_GET_ITEM(b, i);
      if (x == Py_None || y == Py_None) {
        if (x != y) Py_RETURN_FALSE;
        continue;
      }
      if (!THPVariable_Check(x) || !THPVariable_Check(y)) {
        PyErr_SetString(PyExc_TypeError, "same_values: a and b must hold only tensors or None");
        return nullptr;
      }
      const at::Tensor& tx = THPVariable_Unpack(x);
      const at::Tensor& ty = THPVariable_Unpack(y);
      if (tx.scalar_type() != ty.scalar_type() || tx.device() != ty.device() || tx.sizes() != ty.sizes()) {
        Py_RETURN_FALSE;
      }
      if (tx.is_cpu() && tx.layout() == at::kStrided && ty.layout() == at::kStrided && tx.is_contiguous() &&
          ty.is_contiguous() && !tx.is_conj() && !ty.is_conj() && !tx.is_neg() && !ty.is_neg()) {
        if (tx.nbytes() > 0 && std::memcmp(tx.const_data_ptr(), ty.const_data_ptr(), tx.nbytes()) != 0) {
          Py_RETURN_FALSE;
        }
      } else if (!at::equal(tx, ty)) {
        Py_RETURN_FALSE;
      }
    }
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_TRUE;
}

// bn_reduce_on_host(grads, x, grad_out, out, mean, invstd, relu, sm_count,
// wide_index) -> (a, b, plan): the CUDA BatchNorm reductions run on the host
// (csrc/cpu/bn_reduce_host.cpp), for tests. grads=False: (mean, biased var)
// of x; True: (Σdz, Σdz·x̂). plan: the launch the GPU would use.
PyObject* bn_reduce_on_host(PyObject*, PyObject* args) {
  int grads = 0, relu = 0, wide = 0;
  long long sms = 0;
  PyObject *x, *g, *o, *m, *s;
  if (!PyArg_ParseTuple(args, "pOOOOOpLp", &grads, &x, &g, &o, &m, &s, &relu, &sms, &wide)) return nullptr;
  auto tensor = [](PyObject* t) { return t == Py_None ? at::Tensor() : THPVariable_Unpack(t); };
  for (PyObject* t : {x, g, o, m, s}) {
    if (t != Py_None && !THPVariable_Check(t)) {
      PyErr_SetString(PyExc_TypeError, "bn_reduce_on_host: tensors or None expected");
      return nullptr;
    }
  }
  try {
    const auto r = resnet_fused::cpu::bn_reduce_on_host(grads, tensor(x), tensor(g), tensor(o), tensor(m),
                                                        tensor(s), relu, sms, wide);
    const auto& p = r.plan;
    return Py_BuildValue("(NN{s:L,s:L,s:L,s:L,s:L,s:L,s:O})", THPVariable_Wrap(r.a), THPVariable_Wrap(r.b), "vec",
                         (long long)p.vec, "tx", (long long)p.tx, "ty", (long long)p.ty, "tiles",
                         (long long)p.tiles, "splits", (long long)p.splits, "chunk", (long long)p.chunk,
                         "wide_index", p.wide_index ? Py_True : Py_False);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

// cpu_gemm_isa(isa=None) -> str: the CPU GEMM kernel in use (csrc/cpu/gemm.h:
// "avx512", "avx2" or "generic"); with an isa, switch to it first ("" picks
// the best this CPU has). Every kernel gives the same bits: for tests.
PyObject* cpu_gemm_isa(PyObject*, PyObject* args) {
  const char* wanted = nullptr;
  if (!PyArg_ParseTuple(args, "|z", &wanted)) return nullptr;
  try {
    if (wanted != nullptr) resnet_fused::cpu::gemm::set_isa(wanted);
    return PyUnicode_FromString(resnet_fused::cpu::gemm::isa().c_str());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

// cpu_output_cache_bytes() -> int: the bytes of freed output blocks the CPU
// kernels hold for reuse (csrc/cpu/output_cache.h): for tests.
PyObject* cpu_output_cache_bytes(PyObject*, PyObject*) {
  return PyLong_FromSize_t(resnet_fused::cpu::output_cache_bytes());
}

// cpu_gemm_schedule(M, N, K, count, begin, end) -> [(product, m0, m1, n0,
// n1, k0, k1, [(first, lines), ...]), ...]: the blocks that tasks [begin,
// end) of one thread run (end < 0: to the last task), in order, for an M x N
// x K product on run() (count 0) or `count` of them on run_batch() (product i's
// B at i * K * N floats), each with the spans of B's lines it fetches ahead
// (csrc/cpu/gemm_plan.h schedule; gemm.h Ahead) as their first float's offset
// from the first B and their 64-byte lines: for tests.
PyObject* cpu_gemm_schedule(PyObject*, PyObject* args) {
  long long M, N, K, count, begin, end;
  if (!PyArg_ParseTuple(args, "LLLLLL", &M, &N, &K, &count, &begin, &end)) return nullptr;
  if (!(M >= 0 && N >= 0 && N % resnet_fused::cpu::gemm::kColumns == 0 && K >= 0 && count >= 0 && count <= 64 &&
        (count > 0 ? count : 1) * K * N <= (int64_t(64) << 20))) {
    PyErr_Format(PyExc_ValueError,
                 "cpu_gemm_schedule: expected M, K >= 0, N >= 0 a multiple of 16, 0 <= count <= 64 and at most 64 M "
                 "floats of B, got M=%lld N=%lld K=%lld count=%lld", M, N, K, count);
    return nullptr;
  }
  namespace gemm = resnet_fused::cpu::gemm;
  const int64_t products = count > 0 ? count : 1;
  const at::Tensor b = at::empty({products * K * N + 16}, at::kFloat);  // never read: its address anchors the spans
  const float* base = b.data_ptr<float>();
  std::vector<gemm::Problem> problems(products);
  for (int64_t i = 0; i < products; ++i)
    problems[i] = gemm::product(gemm::Rows::matrix(nullptr, K), K, base + i * K * N, N, nullptr, N);
  const auto blocks = gemm::schedule(problems.data(), count, M, N, begin, end);
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(blocks.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const auto& s = blocks[i];
    PyObject* spans = PyList_New(s.ahead.spans);
    if (spans == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    for (int j = 0; j < s.ahead.spans; ++j) {
      const auto first = (s.ahead.begin[j] - reinterpret_cast<const char*>(base)) / int64_t(sizeof(float));
      PyList_SET_ITEM(spans, j, Py_BuildValue("(LL)", (long long)first, (long long)s.ahead.lines[j]));
    }
    PyObject* item = Py_BuildValue("(LLLLLLLN)", (long long)s.product, (long long)s.m0, (long long)s.m1,
                                   (long long)s.n0, (long long)s.n1, (long long)s.k0, (long long)s.k1, spans);
    if (item == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), item);
  }
  return out;
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How resnet_fused._C was built: {'openmp': bool, 'cpu_targets': str}."},
    {"same_values", same_values, METH_VARARGS,
     "same_values(a, b): whether two tuples of tensors (or None) match in dtype, device, shape and bits."},
    {"bn_reduce_on_host", bn_reduce_on_host, METH_VARARGS,
     "bn_reduce_on_host(grads, x, grad_out, out, mean, invstd, relu, sm_count, wide_index): the CUDA BN "
     "reductions run on the host, for tests."},
    {"cpu_gemm_isa", cpu_gemm_isa, METH_VARARGS,
     "cpu_gemm_isa(isa=None): the CPU GEMM kernel in use ('avx512', 'avx2', 'generic'); with isa, switch "
     "to it first ('' picks the best this CPU has)."},
    {"cpu_gemm_schedule", cpu_gemm_schedule, METH_VARARGS,
     "cpu_gemm_schedule(M, N, K, count, begin, end): the blocks one thread runs for tasks [begin, end) of an "
     "M x N x K GEMM (count products on run_batch, 0: one on run), each with the spans of B it fetches "
     "ahead, for tests."},
    {"cpu_output_cache_bytes", cpu_output_cache_bytes, METH_NOARGS,
     "cpu_output_cache_bytes(): bytes of freed CPU kernel outputs kept for reuse (at most 256 MB)."},
    {nullptr, nullptr, 0, nullptr},
};
}  // namespace

extern "C" {
// Importing resnet_fused._C loads this library, which runs the TORCH_LIBRARY
// registrations below; the Python module only has build_info(),
// same_values(), bn_reduce_on_host(), cpu_gemm_isa(), cpu_gemm_schedule() and
// cpu_output_cache_bytes().
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(resnet_fused, m) {
  // Inference epilogue, in place on a convolution's output y:
  //   y = act(y * scale[c] + shift[c] + residual)
  // scale and shift are fp32 per-channel vectors; the math runs in fp32
  // (fp64 for double y) and rounds once at the store. It returns nothing:
  // torch.compile can functionalize a custom op that mutates an input only
  // when the op does not also return an alias of it.
  // With residual_channel_offset >= 0 the residual may hold fewer channels
  // than y, C_r: it is then added to channels [offset, offset + C_r) only —
  // the zero-padded option-A shortcut, whose subsampling is a strided view.
  // The default, -1, requires a residual of y's shape. The CPU kernel
  // reads such a residual (and any strided one) in place; the CUDA kernel
  // pads it to a dense tensor first.
  m.def(
      "scale_shift_add_relu_(Tensor(a!) y, Tensor scale, Tensor shift, "
      "Tensor? residual, bool relu, int residual_channel_offset=-1) -> ()");
  // The same epilogue with an eval-mode BatchNorm's own tensors (fp32
  // vectors of length C; weight, bias and conv_bias optional): scale and
  // shift are folded from them on the device first (csrc/epilogue.h
  // bn_scale_shift, resnet_fused/ops/fold.py's formula and bits), one small
  // pass over C values instead of the six torch ops the fold takes.
  m.def(
      "bn_eval_add_relu_(Tensor(a!) y, Tensor? weight, Tensor? bias, Tensor running_mean, "
      "Tensor running_var, float eps, Tensor? conv_bias, Tensor? residual, bool relu, "
      "int residual_channel_offset=-1) -> ()");

  // Train-mode BatchNorm with batch statistics, + residual, ReLU:
  //   out = act((x - mean) * invstd * weight + bias + residual)
  // Returns the output and, per channel (fp32; fp64 for double x), the batch
  // mean, 1/sqrt(var + eps) and the biased variance (for the running-stat
  // update, which the caller does). Backward needs x, out, mean and invstd.
  m.def(
      "batch_norm_act_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, "
      "Tensor? residual, bool relu, int residual_channel_offset=-1) "
      "-> (Tensor out, Tensor mean, Tensor invstd, Tensor var)");
  // Gradients of batch_norm_act_fwd: (grad_x, grad_weight, grad_bias,
  // grad_residual). grad_residual is dz and is only written when
  // residual_grad is true (else it is an empty tensor); with a narrower
  // residual (residual_channels >= 0) it is dz's channels
  // [residual_channel_offset, + residual_channels).
  // A narrower or strided residual (the option-A shortcut) is read in place
  // by the CPU kernels and padded to a dense tensor by the CUDA ones.
  m.def(
      "batch_norm_act_bwd(Tensor grad_out, Tensor x, Tensor out, Tensor? weight, "
      "Tensor mean, Tensor invstd, bool relu, bool residual_grad, "
      "int residual_channels=-1, int residual_channel_offset=0) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");

  // Inference max pooling (CPU): F.max_pool2d's values without computing
  // indices; bitwise ATen's (NaN payloads aside). A channels_last x gets a channels_last output
  // from the library's kernel; other layouts are ATen's max_pool2d. No
  // autograd: the models call it only where no gradient is recorded.
  m.def(
      "max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool ceil_mode) -> Tensor");

  // Inference 3x3 convolution, stride 1, padding 1, as Winograd F(4x4, 3x3)
  // (CPU, float32), with the epilogue fused into the output transform:
  //   out = act(conv(x, w) + bias + residual)
  // `weight` is winograd_weight(w): w (K, C, 3, 3) transformed into 36
  // (C x K) matrices, computed in double and rounded once, each packed for
  // the CPU GEMM (csrc/cpu/gemm.h): a (36, C * K) tensor. C and K are
  // multiples of 16. The output has x's memory format. No autograd.
  m.def("winograd_weight(Tensor weight) -> Tensor");
  m.def("winograd_conv3x3(Tensor x, Tensor weight, Tensor bias, Tensor? residual, bool relu) -> Tensor");

  // Inference 1x1 convolution, stride s, no padding (CPU, float32), as one
  // GEMM with the epilogue applied before its store (csrc/cpu/gemm.h):
  //   out = act(conv(x, w) + bias + residual)
  // `weight` is conv1x1_weight(w): w (K, C, 1, 1) packed into (K/16, C, 16)
  // panels; K is a multiple of 16. The output has x's memory format;
  // conv1x1_add_ writes it into `residual` (channels_last) instead. Each
  // output is one fused multiply-add chain over the C channels in order: the
  // same bits on every CPU and thread count. No autograd.
  m.def("conv1x1_weight(Tensor weight) -> Tensor");
  m.def("conv1x1(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, bool relu, int stride=1) -> Tensor");
  m.def("conv1x1_add_(Tensor(a!) residual, Tensor x, Tensor weight, Tensor? bias, bool relu, int stride=1) -> ()");

  // Inference R x S convolution, stride s and padding p both ways, one group
  // (CPU, float32), as one implicit GEMM over a zero-padded copy of x with
  // the epilogue applied before its store (csrc/cpu/conv_gemm.cpp):
  //   out = act(conv(x, w) + bias + residual)
  // `weight` is conv_gemm_weight(w): w (K, C, R, S) as (R * S * C) x K
  // packed into the GEMM's panels; K is a multiple of 16. The output has x's
  // memory format. Each output is one fused multiply-add chain over the taps
  // (r, s) and then the channels, in order: the same bits on every CPU and
  // thread count. No autograd.
  m.def("conv_gemm_weight(Tensor weight) -> Tensor");
  m.def("conv_gemm(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, bool relu, int[2] kernel_size, "
        "int stride=1, int padding=0) -> Tensor");

  // Inference grouped 3x3 convolution, padding 1, stride 1 or 2, as many
  // output channels as input (ResNeXt's middle convolution; CPU, float32),
  // direct, with the epilogue applied before its store:
  //   out = act(conv(x, w, groups) + bias + residual)
  // `weight` is grouped_conv3x3_weight(w): w (C, C / groups, 3, 3), C a
  // multiple of 16, C / groups 4, 8 or a multiple of 16, reordered into
  // (C / 16, 3, 3, C / groups, 16). Each output is one fused multiply-add
  // chain over the taps, then the group's channels, in order: the same bits
  // on every CPU and thread count. The output has x's memory format. No
  // autograd.
  m.def("grouped_conv3x3_weight(Tensor weight) -> Tensor");
  m.def("grouped_conv3x3(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, bool relu, int stride=1) -> Tensor");
}
