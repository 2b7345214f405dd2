// oneDNN's convolutions as XLA FFI handlers for affinity_jax/models/onednn.py, which compiles
// this file once per machine and says why these convolutions are used on a CPU.
//
// Activations are NHWC and kernels HWIO, float32, as XLA holds them; padding is given on the
// left (`pad`), and the right padding follows from the output's size, as PyTorch pads. Each
// handler lets oneDNN choose the kernel's layout for its fastest primitive and reorders the
// kernel (or its gradient) from (or to) HWIO around the call. Primitives are made once per
// geometry and kept for the life of the process. Each call brings its own scratchpad
// (scratchpad_mode::user): XLA runs independent custom calls side by side, and oneDNN's
// library-managed scratchpad is shared between distinct primitives unless oneDNN was built
// with DNNL_ENABLE_CONCURRENT_EXEC; a kernel gradient's thread barrier lives there.

#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = dnnl::memory::format_tag;
constexpr auto kF32 = dnnl::memory::data_type::f32;

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// Every primitive here takes its scratchpad from the caller (see the top of the file).
const dnnl::primitive_attr& Attr() {
  static const dnnl::primitive_attr* attr = [] {
    auto* a = new dnnl::primitive_attr();
    a->set_scratchpad_mode(dnnl::scratchpad_mode::user);
    return a;
  }();
  return *attr;
}

// One convolution's shapes: input [b, h, w, c], kernel [kh, kw, c, o], output [b, ho, wo, o].
struct Geometry {
  int64_t b, h, w, c, o, kh, kw, ho, wo, stride, dilation, pad;

  memory::desc Input(Tag tag = Tag::nhwc) const { return {{b, c, h, w}, kF32, tag}; }
  memory::desc Kernel(Tag tag = Tag::hwio) const { return {{o, c, kh, kw}, kF32, tag}; }
  memory::desc Output() const { return {{b, o, ho, wo}, kF32, Tag::nhwc}; }
  memory::dims Strides() const { return {stride, stride}; }
  memory::dims Dilations() const { return {dilation - 1, dilation - 1}; }  // oneDNN counts from 0
  memory::dims PadLeft() const { return {pad, pad}; }
  memory::dims PadRight() const {
    return {(ho - 1) * stride + (kh - 1) * dilation + 1 - h - pad,
            (wo - 1) * stride + (kw - 1) * dilation + 1 - w - pad};
  }

  std::string Key(char kind) const {
    std::string key(1, kind);
    for (int64_t v : {b, h, w, c, o, kh, kw, ho, wo, stride, dilation, pad}) {
      key += ',' + std::to_string(v);
    }
    return key;
  }

  dnnl::convolution_forward::primitive_desc ForwardHint() const {
    return {Engine(),  dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
            Input(),   Kernel(Tag::any), Output(), Strides(), Dilations(), PadLeft(), PadRight(),
            Attr()};
  }
};

// A primitive and the reorder between the kernel as XLA holds it (HWIO) and as it wants it,
// with the scratchpad each needs.
struct Prepared {
  dnnl::primitive conv;
  memory::desc conv_scratchpad;
  memory::desc kernel;
  bool reorder = false;
  dnnl::reorder kernel_reorder;
  memory::desc reorder_scratchpad;
};

// Runs `p` on `args` with a scratchpad of its own for this call.
void Execute(const dnnl::primitive& p, const memory::desc& scratchpad, const dnnl::stream& s,
             std::unordered_map<int, memory> args) {
  if (scratchpad.get_size() > 0) args.insert({DNNL_ARG_SCRATCHPAD, memory(scratchpad, Engine())});
  p.execute(s, args);
}

// One oneDNN call at a time in the process: each already uses every core (its OpenMP team),
// and a demo run hung once in a kernel gradient's thread barrier while XLA could run two of
// these calls side by side (experiments/RESULTS.md, "oneDNN's convolutions").
std::mutex& CallMutex() {
  static std::mutex* mutex = new std::mutex();
  return *mutex;
}

std::shared_ptr<const Prepared> Prepare(const Geometry& g, char kind) {
  static std::mutex mutex;
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<const Prepared>>();
  const std::string key = g.Key(kind);
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = cache->find(key); it != cache->end()) return it->second;
  auto p = std::make_shared<Prepared>();
  const memory::desc hwio = g.Kernel();
  auto hint = g.ForwardHint();
  if (kind == 'f') {
    p->conv = dnnl::convolution_forward(hint);
    p->conv_scratchpad = hint.scratchpad_desc();
    p->kernel = hint.weights_desc();
  } else if (kind == 'd') {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.Input(), g.Kernel(Tag::any), g.Output(),
        g.Strides(), g.Dilations(), g.PadLeft(), g.PadRight(), hint, Attr());
    p->conv = dnnl::convolution_backward_data(pd);
    p->conv_scratchpad = pd.scratchpad_desc();
    p->kernel = pd.weights_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.Input(), g.Kernel(Tag::any), g.Output(),
        g.Strides(), g.Dilations(), g.PadLeft(), g.PadRight(), hint, Attr());
    p->conv = dnnl::convolution_backward_weights(pd);
    p->conv_scratchpad = pd.scratchpad_desc();
    p->kernel = pd.diff_weights_desc();
  }
  p->reorder = p->kernel != hwio;
  if (p->reorder) {
    dnnl::reorder::primitive_desc pd(Engine(), kind == 'w' ? p->kernel : hwio, Engine(),
                                     kind == 'w' ? hwio : p->kernel, Attr());
    p->kernel_reorder = dnnl::reorder(pd);
    p->reorder_scratchpad = pd.scratchpad_desc();
  }
  cache->emplace(key, p);
  return p;
}

Geometry Shapes(ffi::Span<const int64_t> input, ffi::Span<const int64_t> kernel,
                ffi::Span<const int64_t> output, int64_t stride, int64_t dilation, int64_t pad) {
  return {input[0], input[1], input[2], input[3], kernel[3], kernel[0],  kernel[1],
          output[1], output[2], stride,  dilation, pad};
}

template <typename F>
ffi::Error Guarded(const char* what, F&& body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN ") + what + ": " + e.what());
  } catch (...) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN ") + what + ": unknown error");
  }
}

// The forward ('f': x -> y) and the input gradient ('d': dy -> dx) read the kernel alike:
// `in` and `out` are x and y, or dy and dx.
ffi::Error ThroughKernel(char kind, ffi::Buffer<ffi::F32> in, ffi::Buffer<ffi::F32> k,
                         ffi::ResultBuffer<ffi::F32> out, int64_t stride, int64_t dilation,
                         int64_t pad) {
  const bool forward = kind == 'f';
  return Guarded(forward ? "convolution" : "input gradient", [&] {
    std::lock_guard<std::mutex> lock(CallMutex());
    const Geometry g = forward ? Shapes(in.dimensions(), k.dimensions(), out->dimensions(),
                                        stride, dilation, pad)
                               : Shapes(out->dimensions(), k.dimensions(), in.dimensions(),
                                        stride, dilation, pad);
    auto p = Prepare(g, kind);
    dnnl::stream s(Engine());
    memory kernel(g.Kernel(), Engine(), k.typed_data());
    if (p->reorder) {
      memory blocked(p->kernel, Engine());
      Execute(p->kernel_reorder, p->reorder_scratchpad, s,
              {{DNNL_ARG_FROM, kernel}, {DNNL_ARG_TO, blocked}});
      kernel = blocked;
    }
    memory a(forward ? g.Input() : g.Output(), Engine(), in.typed_data());
    memory b(forward ? g.Output() : g.Input(), Engine(), out->typed_data());
    Execute(p->conv, p->conv_scratchpad, s,
            {{forward ? DNNL_ARG_SRC : DNNL_ARG_DIFF_DST, a},
             {DNNL_ARG_WEIGHTS, kernel},
             {forward ? DNNL_ARG_DST : DNNL_ARG_DIFF_SRC, b}});
    s.wait();
  });
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t dilation,
                   int64_t pad) {
  return ThroughKernel('f', x, k, y, stride, dilation, pad);
}

ffi::Error InputGrad(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> k,
                     ffi::ResultBuffer<ffi::F32> dx, int64_t stride, int64_t dilation,
                     int64_t pad) {
  return ThroughKernel('d', dy, k, dx, stride, dilation, pad);
}

ffi::Error KernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dk, int64_t stride, int64_t dilation,
                      int64_t pad) {
  return Guarded("kernel gradient", [&] {
    std::lock_guard<std::mutex> lock(CallMutex());
    const Geometry g = Shapes(x.dimensions(), dk->dimensions(), dy.dimensions(), stride, dilation, pad);
    auto p = Prepare(g, 'w');
    dnnl::stream s(Engine());
    memory hwio(g.Kernel(), Engine(), dk->typed_data());
    memory kernel = p->reorder ? memory(p->kernel, Engine()) : hwio;
    Execute(p->conv, p->conv_scratchpad, s,
            {{DNNL_ARG_SRC, memory(g.Input(), Engine(), x.typed_data())},
             {DNNL_ARG_DIFF_DST, memory(g.Output(), Engine(), dy.typed_data())},
             {DNNL_ARG_DIFF_WEIGHTS, kernel}});
    if (p->reorder) {
      Execute(p->kernel_reorder, p->reorder_scratchpad, s,
              {{DNNL_ARG_FROM, kernel}, {DNNL_ARG_TO, hwio}});
    }
    s.wait();
  });
}

}  // namespace

#define AFFINITY_ONEDNN_BINDING                                                         \
  ffi::Ffi::Bind()                                                                      \
      .Arg<ffi::Buffer<ffi::F32>>()                                                     \
      .Arg<ffi::Buffer<ffi::F32>>()                                                     \
      .Ret<ffi::Buffer<ffi::F32>>()                                                     \
      .Attr<int64_t>("stride")                                                          \
      .Attr<int64_t>("dilation")                                                        \
      .Attr<int64_t>("pad")

XLA_FFI_DEFINE_HANDLER_SYMBOL(AffinityOnednnForward, Forward, AFFINITY_ONEDNN_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AffinityOnednnInputGrad, InputGrad, AFFINITY_ONEDNN_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AffinityOnednnKernelGrad, KernelGrad, AFFINITY_ONEDNN_BINDING);
