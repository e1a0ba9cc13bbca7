// The one pybind11 binding file. Compiled twice: as vespo_ext._core (VESPO_BACKEND=cpu) and, when
// nvcc is available, as vespo_ext._cuda (VESPO_BACKEND=cuda). Arrays arrive through DLPack (zero
// copy) from any producer: torch, NumPy, CuPy. Outputs are preallocated by the caller.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "vespo/dlpack_abi.h"
#include "vespo/kernels.h"

#ifndef VESPO_BACKEND
#error "VESPO_BACKEND must be cpu or cuda"
#endif
#define VESPO_STR2(x) #x
#define VESPO_STR(x) VESPO_STR2(x)

namespace py = pybind11;
namespace be = vespo::VESPO_BACKEND;
using vespo::DType;

namespace {

constexpr bool kIsCuda = std::string_view(VESPO_STR(VESPO_BACKEND)) == "cuda";
const char* kModule = kIsCuda ? "vespo_ext._cuda" : "vespo_ext._core";

// Runs a binding's body and turns any C++ exception into the Python error it stands for, here, in
// this module: std::invalid_argument -> ValueError, pybind11's builtin exceptions -> their type,
// anything else -> RuntimeError. pybind11's dispatcher (compiled into this module) catches the
// resulting error_already_set itself, so the conversion does not depend on exception translators
// that other extensions in the process registered. The body's Arrays are destroyed, and their
// capsules returned, before the handler runs.
template <class Body>
void checked(Body&& body) {
  try {
    body();
  } catch (py::error_already_set&) {
    throw;
  } catch (const py::builtin_exception& e) {
    e.set_error();
    throw py::error_already_set();
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    throw py::error_already_set();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    throw py::error_already_set();
  }
}

// "(4, 6)", "(3,)". Plain string concatenation: std::ostringstream segfaulted in a build on the
// H200 image (torch 2.11, Python 3.12), in exactly the error messages that used it, presumably a
// libstdc++ loaded by the process older than the compiler's headers.
std::string shape_str(const vespo::dl::Tensor& t) {
  std::string s = "(";
  for (int i = 0; i < t.ndim; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + (t.ndim == 1 ? ",)" : ")");
}

// A borrowed view of a DLPack array; returns the capsule's memory to its producer on destruction.
class Array {
 public:
  Array(const py::handle& obj, const char* name) : name_(name) {
    if (obj.is_none()) return;
    if (!py::hasattr(obj, "__dlpack__"))
      throw py::type_error(std::string(kModule) + ": argument '" + name + "' must support DLPack (__dlpack__), got " +
                           std::string(py::str(py::type::of(obj))));
    // CUDA producers are exported without a stream handshake (-1): the caller launches on the
    // producer's current stream and passes it to us explicitly.
    py::tuple dev = obj.attr("__dlpack_device__")();
    const int dev_type = dev[0].cast<int>();
    capsule_ = (dev_type == vespo::dl::kCUDA || dev_type == vespo::dl::kCUDAManaged)
                   ? obj.attr("__dlpack__")(py::arg("stream") = -1)
                   : obj.attr("__dlpack__")();
    auto* mt = static_cast<vespo::dl::ManagedTensor*>(PyCapsule_GetPointer(capsule_.ptr(), "dltensor"));
    if (mt == nullptr) throw py::error_already_set();
    PyCapsule_SetName(capsule_.ptr(), "used_dltensor");
    managed_ = mt;
  }
  ~Array() {
    if (managed_ && managed_->deleter) managed_->deleter(managed_);
  }
  Array(const Array&) = delete;
  Array& operator=(const Array&) = delete;

  bool present() const { return managed_ != nullptr; }
  const vespo::dl::Tensor& t() const { return managed_->dl_tensor; }
  void* data() const {
    return present() ? static_cast<char*>(t().data) + t().byte_offset : nullptr;
  }
  template <class T>
  T* ptr() const { return static_cast<T*>(data()); }
  int64_t dim(int i) const { return t().shape[i]; }
  int64_t stride(int i) const {
    if (t().strides) return t().strides[i];
    int64_t s = 1;
    for (int k = t().ndim - 1; k > i; --k) s *= t().shape[k];
    return s;
  }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < t().ndim; ++i) n *= t().shape[i];
    return n;
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw std::invalid_argument(std::string(kModule) + ": argument '" + name_ + "' " + what);
  }
  void require_device() const {
    if (!present()) fail("is required, got None");
    const int dt = t().device.device_type;
    const bool ok = kIsCuda ? (dt == vespo::dl::kCUDA || dt == vespo::dl::kCUDAManaged) : (dt == vespo::dl::kCPU);
    if (!ok) fail(std::string("must live on ") + (kIsCuda ? "a CUDA device" : "the CPU") + ", got DLPack device type " + std::to_string(dt));
  }
  // 1-D, length n (n < 0: any), unit stride, one of the given dtypes (code, bits).
  void require_vector(int64_t n, std::initializer_list<std::pair<uint8_t, uint8_t>> dtypes, const char* dtype_names) const {
    require_device();
    if (t().ndim != 1) fail("must be 1-D, got shape " + shape_str(t()));
    if (n >= 0 && dim(0) != n) fail("must have shape (" + std::to_string(n) + ",), got " + shape_str(t()));
    if (dim(0) > 1 && stride(0) != 1) fail("must be contiguous");
    require_dtype(dtypes, dtype_names);
  }
  void require_dtype(std::initializer_list<std::pair<uint8_t, uint8_t>> dtypes, const char* dtype_names) const {
    if (!present()) fail("is required, got None");
    for (auto d : dtypes)
      if (t().dtype.code == d.first && t().dtype.bits == d.second && t().dtype.lanes == 1) return;
    fail(std::string("must have dtype ") + dtype_names + ", got DLPack code " + std::to_string(t().dtype.code) + " bits " +
         std::to_string(t().dtype.bits));
  }

 private:
  const char* name_;
  py::object capsule_;
  vespo::dl::ManagedTensor* managed_ = nullptr;
};

const std::initializer_list<std::pair<uint8_t, uint8_t>> kF32 = {{vespo::dl::kFloat, 32}};
const std::initializer_list<std::pair<uint8_t, uint8_t>> kI64 = {{vespo::dl::kInt, 64}};
const std::initializer_list<std::pair<uint8_t, uint8_t>> kMaskTypes = {{vespo::dl::kUInt, 8}, {vespo::dl::kBool, 8}};

DType logits_dtype(const Array& a) {
  if (!a.present()) a.fail("is required, got None");
  const auto& d = a.t().dtype;
  if (d.lanes == 1 && d.code == vespo::dl::kFloat && d.bits == 32) return DType::kFloat32;
  if (d.lanes == 1 && d.code == vespo::dl::kBfloat && d.bits == 16) return DType::kBFloat16;
  if (d.lanes == 1 && d.code == vespo::dl::kFloat && d.bits == 16) return DType::kFloat16;
  a.fail("must be float32, bfloat16 or float16");
}

void require_same_device(const Array& a, const Array& b) {
  if (!b.present()) return;
  if (a.t().device.device_type != b.t().device.device_type || a.t().device.device_id != b.t().device.device_id)
    b.fail("must be on the same device as the logits");
}

// Common validation of the (T, V) logits and their per-token companions.
vespo::LogprobParams logprob_params(const Array& logits, const Array& labels, const Array& mask, double inv_temperature,
                                    int64_t ignore_index, int num_threads, uintptr_t stream) {
  logits.require_device();
  if (logits.t().ndim != 2) logits.fail("must be 2-D (T, V), got shape " + shape_str(logits.t()));
  const int64_t T = logits.dim(0), V = logits.dim(1);
  if (V < 1) logits.fail("must have a non-empty vocabulary (V >= 1), got shape " + shape_str(logits.t()));
  // (an empty batch has no element to stride over: NumPy exports (0, V) with arbitrary strides)
  if (T > 0 && V > 1 && logits.stride(1) != 1) logits.fail("must have unit stride along the vocabulary");
  if (T > 1 && logits.stride(0) < V)
    logits.fail("has overlapping rows (row stride " + std::to_string(logits.stride(0)) + " < V = " + std::to_string(V) +
                ", e.g. an expanded or broadcast array): pass a contiguous copy (.contiguous(), np.ascontiguousarray)");
  labels.require_vector(T, kI64, "int64");
  require_same_device(logits, labels);
  if (mask.present()) {
    mask.require_vector(T, kMaskTypes, "uint8 or bool");
    require_same_device(logits, mask);
  }
  const float inv_t32 = static_cast<float>(inv_temperature);
  if (!(inv_temperature > 0.0) || !(inv_t32 > 0.f) || !(inv_t32 <= 3.4028234663852886e38f))
    throw std::invalid_argument(std::string(kModule) + ": argument 'inv_temperature' (1 / temperature) must be > 0 and "
                                "representable in float32 (temperature within about [3e-38, 1e38]), got " +
                                std::to_string(inv_temperature));
  vespo::LogprobParams p;
  p.logits = logits.data();
  p.dtype = logits_dtype(logits);
  p.T = T;
  p.V = V;
  p.row_stride = T > 1 ? logits.stride(0) : V;
  p.labels = labels.ptr<int64_t>();
  p.mask = mask.ptr<uint8_t>();
  p.ignore_index = ignore_index;
  p.inv_temperature = static_cast<float>(inv_temperature);
  p.num_threads = num_threads;
  p.stream = reinterpret_cast<void*>(stream);
  return p;
}

void out_vector(const Array& a, const Array& logits, int64_t n) {
  a.require_vector(n, kF32, "float32");
  require_same_device(logits, a);
}

// The optional (row_max, log_sum) pair of float32 (T,) vectors: both or neither.
void row_stats(const Array& row_max, const Array& log_sum, const Array& logits, vespo::LogprobParams& p) {
  if (row_max.present() != log_sum.present())
    (row_max.present() ? log_sum : row_max).fail("must be given together with '" +
                                                std::string(row_max.present() ? "row_max" : "log_sum") + "'");
  if (!row_max.present()) return;
  out_vector(row_max, logits, p.T);
  out_vector(log_sum, logits, p.T);
  p.row_max = row_max.ptr<float>();
  p.log_sum = log_sum.ptr<float>();
}

void logprob_fwd(py::handle logits_o, py::handle labels_o, py::handle mask_o, py::handle logp_o, py::handle lse_o,
                 py::handle entropy_o, py::handle bad_o, double inv_temperature, int64_t ignore_index, int num_threads,
                 uintptr_t stream, py::handle row_max_o, py::handle log_sum_o) {
  checked([&] {
    Array logits(logits_o, "logits"), labels(labels_o, "labels"), mask(mask_o, "mask"), logp(logp_o, "logp"),
        lse(lse_o, "lse"), entropy(entropy_o, "entropy"), bad(bad_o, "bad_label_row"), row_max(row_max_o, "row_max"),
        log_sum(log_sum_o, "log_sum");
    auto p = logprob_params(logits, labels, mask, inv_temperature, ignore_index, num_threads, stream);
    out_vector(logp, logits, p.T);
    out_vector(lse, logits, p.T);
    if (entropy.present()) out_vector(entropy, logits, p.T);
    row_stats(row_max, log_sum, logits, p);
    bad.require_vector(1, kI64, "int64");
    p.logp = logp.ptr<float>();
    p.lse = lse.ptr<float>();
    p.entropy = entropy.ptr<float>();
    p.bad_label_row = bad.ptr<int64_t>();
    py::gil_scoped_release nogil;
    be::logprob_fwd(p);
  });
}

void logprob_bwd(py::handle logits_o, py::handle labels_o, py::handle mask_o, py::handle logp_o, py::handle lse_o,
                 py::handle dlogp_o, py::handle scale_o, py::handle grad_o, double inv_temperature, int64_t ignore_index,
                 int num_threads, uintptr_t stream, py::handle row_max_o, py::handle log_sum_o) {
  checked([&] {
    Array logits(logits_o, "logits"), labels(labels_o, "labels"), mask(mask_o, "mask"), logp(logp_o, "logp"),
        lse(lse_o, "lse"), dlogp(dlogp_o, "dlogp"), scale(scale_o, "grad_scale"), grad(grad_o, "grad"),
        row_max(row_max_o, "row_max"), log_sum(log_sum_o, "log_sum");
    auto p = logprob_params(logits, labels, mask, inv_temperature, ignore_index, num_threads, stream);
    out_vector(logp, logits, p.T);
    out_vector(lse, logits, p.T);
    out_vector(dlogp, logits, p.T);
    row_stats(row_max, log_sum, logits, p);
    if (scale.present()) {
      scale.require_device();
      if (scale.numel() != 1) scale.fail("must hold one element");
      scale.require_dtype(kF32, "float32");
      require_same_device(logits, scale);
    }
    grad.require_device();
    require_same_device(logits, grad);
    if (grad.t().ndim != 2 || grad.dim(0) != p.T || grad.dim(1) != p.V)
      grad.fail("must have the logits' shape " + shape_str(logits.t()) + ", got " + shape_str(grad.t()));
    if (logits_dtype(grad) != p.dtype) grad.fail("must have the logits' dtype");
    if (p.T > 0 && p.V > 1 && grad.stride(1) != 1) grad.fail("must have unit stride along the vocabulary");
    p.logp = logp.ptr<float>();
    p.lse = lse.ptr<float>();
    p.dlogp = dlogp.ptr<float>();
    p.grad_scale = scale.ptr<float>();
    p.grad = grad.data();
    p.grad_row_stride = p.T > 1 ? grad.stride(0) : p.V;
    if (p.T > 1 && p.grad_row_stride < p.V) grad.fail("rows must not overlap");
    py::gil_scoped_release nogil;
    be::logprob_bwd(p);
  });
}

void seq_reduce(py::handle cu_o, py::handle logp_o, py::handle old_o, py::handle adv_o, py::handle mask_o,
                py::handle isw_o, py::handle norm_o, py::handle loss_o, py::handle dlogp_o, py::handle metrics_o,
                py::handle ws_o, int loss_type, std::vector<double> params, int agg, double norm_len, int num_threads,
                uintptr_t stream) {
  checked([&] {
    Array cu(cu_o, "cu_seqlens"), logp(logp_o, "logp"), old(old_o, "old_logp"), adv(adv_o, "advantages"),
        mask(mask_o, "mask"), isw(isw_o, "rollout_is_weights"), norm(norm_o, "norm"), loss(loss_o, "loss"),
        dlogp(dlogp_o, "dlogp"), metrics(metrics_o, "metrics"), ws(ws_o, "workspace");
    logp.require_vector(-1, kF32, "float32");
    const int64_t T = logp.dim(0);
    cu.require_vector(-1, kI64, "int64");
    if (cu.dim(0) < 1) cu.fail("must have at least one entry");
    const int64_t S = cu.dim(0) - 1;
    for (const Array* a : {&cu, &old, &adv, &mask, &isw, &norm, &loss, &dlogp, &metrics, &ws}) require_same_device(logp, *a);
    old.require_vector(T, kF32, "float32");
    adv.require_vector(-1, kF32, "float32");
    if (adv.dim(0) != S && adv.dim(0) != T)
      adv.fail("must have one value per sequence (" + std::to_string(S) + ") or per token (" + std::to_string(T) + "), got " +
               shape_str(adv.t()));
    if (mask.present()) mask.require_vector(T, kMaskTypes, "uint8 or bool");
    if (isw.present()) isw.require_vector(T, kF32, "float32");
    if (norm.present()) norm.require_vector(1, kF32, "float32");
    loss.require_vector(1, kF32, "float32");
    dlogp.require_vector(T, kF32, "float32");
    metrics.require_vector(vespo::kNumMetrics, kF32, "float32");
    ws.require_vector((S + 1) * vespo::kSeqStride, {{vespo::dl::kFloat, 64}}, "float64");
    if (loss_type < 0 || loss_type > static_cast<int>(vespo::LossType::kCispo))
      throw std::invalid_argument(std::string(kModule) + ": unknown loss type " + std::to_string(loss_type));
    if (agg < 0 || agg > static_cast<int>(vespo::Agg::kSeqMeanTokenSumNorm))
      throw std::invalid_argument(std::string(kModule) + ": unknown aggregation mode " + std::to_string(agg));
    if (params.size() > static_cast<size_t>(vespo::kMaxLossParams))
      throw std::invalid_argument(std::string(kModule) + ": too many loss parameters");
    vespo::SeqParams p;
    p.T = T;
    p.S = S;
    p.cu_seqlens = cu.ptr<int64_t>();
    p.logp = logp.ptr<float>();
    p.old_logp = old.ptr<float>();
    p.adv = adv.ptr<float>();
    // One value per sequence whenever the length is S (if S == T and every sequence has one token,
    // the two readings are the same values).
    p.adv_per_token = adv.dim(0) != S;
    p.mask = mask.ptr<uint8_t>();
    p.is_weights = isw.ptr<float>();
    p.loss = static_cast<vespo::LossType>(loss_type);
    for (size_t k = 0; k < params.size(); ++k) p.p[k] = params[k];
    p.agg = static_cast<vespo::Agg>(agg);
    p.norm = norm.ptr<float>();
    p.norm_len = norm_len;
    p.loss_out = loss.ptr<float>();
    p.dlogp = dlogp.ptr<float>();
    p.metrics = metrics.ptr<float>();
    p.seq_ws = ws.ptr<double>();
    p.num_threads = num_threads;
    p.stream = reinterpret_cast<void*>(stream);
    py::gil_scoped_release nogil;
    be::seq_reduce(p);
  });
}

}  // namespace

PYBIND11_MODULE(VESPO_MODULE, m) {
  m.doc() = kIsCuda ? "vespo CUDA kernels (DLPack in, DLPack out)" : "vespo CPU kernels (DLPack in, DLPack out)";
  m.attr("backend") = VESPO_STR(VESPO_BACKEND);
  m.attr("num_metrics") = static_cast<int>(vespo::kNumMetrics);
  m.attr("seq_stride") = static_cast<int>(vespo::kSeqStride);
  m.def("logprob_fwd", &logprob_fwd, py::arg("logits"), py::arg("labels"), py::arg("mask"), py::arg("logp"),
        py::arg("lse"), py::arg("entropy"), py::arg("bad_label_row"), py::kw_only(), py::arg("inv_temperature"),
        py::arg("ignore_index") = -100, py::arg("num_threads") = 1, py::arg("stream") = 0,
        py::arg("row_max") = py::none(), py::arg("log_sum") = py::none(),
        "Per-token log-softmax at the label (and entropy) in one read of each logits row; optionally the row max\n"
        "and log s = lse - row_max / tau, which the backward then uses (shift-invariant).");
  m.def("logprob_bwd", &logprob_bwd, py::arg("logits"), py::arg("labels"), py::arg("mask"), py::arg("logp"),
        py::arg("lse"), py::arg("dlogp"), py::arg("grad_scale"), py::arg("grad"), py::kw_only(),
        py::arg("inv_temperature"), py::arg("ignore_index") = -100, py::arg("num_threads") = 1, py::arg("stream") = 0,
        py::arg("row_max") = py::none(), py::arg("log_sum") = py::none(),
        "grad[t, v] = scale * dlogp[t] * (1[v == y_t] - p[t, v]) / tau; grad may be the logits themselves.");
  m.def("seq_reduce", &seq_reduce, py::arg("cu_seqlens"), py::arg("logp"), py::arg("old_logp"), py::arg("advantages"),
        py::arg("mask"), py::arg("rollout_is_weights"), py::arg("norm"), py::arg("loss"), py::arg("dlogp"),
        py::arg("metrics"), py::arg("workspace"), py::kw_only(), py::arg("loss_type"), py::arg("params"),
        py::arg("agg"), py::arg("norm_len"), py::arg("num_threads") = 1, py::arg("stream") = 0,
        "Per-sequence reduction: loss, dloss/dlogp and metrics, no host synchronisation.");
#if !defined(VESPO_HAS_CUDA_BACKEND)
  m.def("cpu_isa", [] {
        std::string name;
        checked([&] { name = vespo::cpu::active_isa(); });
        return name;
      },
        "Instruction set of the CPU kernels' hot loops: avx512bf16, avx512, avx2 or generic (VESPO_CPU_ISA caps it).");
#endif
#if defined(VESPO_HAS_CUDA_BACKEND)
  m.def("kernel_variant", [] {
        std::string name;
        checked([&] { name = be::kernel_variant(); });
        return name;
      },
        "Generation of the log-prob kernels the next launches use: v1 (default), v2, v2-mufu or v2-split\n"
        "(set_kernel_variant, else the environment variable VESPO_CUDA_KERNELS, read at every launch).");
  m.def("set_kernel_variant", [](std::optional<std::string> name) {
        checked([&] { be::set_kernel_variant(name ? name->c_str() : nullptr); });
      }, py::arg("name"),
        "Use these log-prob kernels from now on in this process (v1, v2, v2-mufu, v2-split); None: follow\n"
        "VESPO_CUDA_KERNELS again.");
#endif
  m.def("device_count", [] {
#if defined(VESPO_HAS_CUDA_BACKEND)
    return be::device_count();
#else
    return 0;
#endif
  });
}
