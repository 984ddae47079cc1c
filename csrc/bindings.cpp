// The one registration file of grpo_fast._C: every op's schema, next to its CPU and CUDA kernels.
// Each op is a section: its schema in a TORCH_LIBRARY_FRAGMENT, then TORCH_LIBRARY_IMPL per
// device. Fake (meta) kernels for torch.compile live in grpo_fast/_native.py (named here with
// set_python_module); the module init below has it register them.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "ops.h"

// The namespace itself (TORCH_LIBRARY may appear once per namespace in the whole process, so a
// second copy of the extension fails loudly instead of silently shadowing the first).
TORCH_LIBRARY(grpo_fast, m) {}

// ---------------------------------------------------------------------------------------------
// group_advantages: TRL 1.16 "sum_then_normalize" advantages of M = num_groups * group_size
// completions (G consecutive rows per prompt).
//   rewards [M, R] fp32 contiguous, reward_weights [R] fp32 -> advantages [M] fp32.
//   scale_mode: 0 "group" (std within the group), 1 "batch" (std over all M rows, mean still per
//   group), 2 "none". NaN rewards are skipped in the weighted sum; an all-NaN row gets 0.
TORCH_LIBRARY_FRAGMENT(grpo_fast, m) {
  m.set_python_module("grpo_fast._native");
  m.def("group_advantages(Tensor rewards, Tensor reward_weights, int group_size, int scale_mode, float eps) -> Tensor");
}
TORCH_LIBRARY_IMPL(grpo_fast, CPU, m) { m.impl("group_advantages", &grpo_fast::group_advantages_cpu); }
#ifdef GRPO_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(grpo_fast, CUDA, m) { m.impl("group_advantages", &grpo_fast::group_advantages_cuda); }
#endif

// ---------------------------------------------------------------------------------------------
// The Python module itself: only what the ops cannot say.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "grpo_fast compiled ops, registered as torch.ops.grpo_fast.*";
  // The ops exist by now (static registration at load time), so their fake kernels can follow:
  // torch.compile then works however this module was imported (torch only hints at the module).
  pybind11::module_::import("grpo_fast._native").attr("_register_fakes")();
  module.def(
      "cuda_built",
      []() {
#ifdef GRPO_FAST_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the CUDA kernels were compiled into this build.");
}
