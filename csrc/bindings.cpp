// The one registration file of grpo_fast._C: every op's schema, next to its CPU and CUDA kernels.
// Each op is a section: its schema in a TORCH_LIBRARY_FRAGMENT, then TORCH_LIBRARY_IMPL per
// device. Fake (meta) kernels for torch.compile live in grpo_fast/backends/_native.py (named here with
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
  m.set_python_module("grpo_fast.backends._native");
  m.def("group_advantages(Tensor rewards, Tensor reward_weights, int group_size, int scale_mode, float eps) -> Tensor");
}
TORCH_LIBRARY_IMPL(grpo_fast, CPU, m) { m.impl("group_advantages", &grpo_fast::group_advantages_cpu); }
#ifdef GRPO_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(grpo_fast, CUDA, m) { m.impl("group_advantages", &grpo_fast::group_advantages_cuda); }
#endif

// ---------------------------------------------------------------------------------------------
// The chunk ops: row-wise softmax work on one [C, V] logits tile (rows contiguous, any row stride;
// fp32/bf16/fp16, fp32 math), z = logits / temperature, targets int64 [C]. Targets outside [0, V)
// (another vocabulary shard's tokens) have no one-hot term and a target logit of 0. Each op writes into
// tensors the caller gives it (annotated (a!)), so it allocates nothing and its fake kernel checks only.
// The Python side is grpo_fast/backends/native_ops.py (NativeChunkOps); the per-token GRPO math that
// turns the stats into g and ent_coef is grpo_fast/engine/objective.py, not here.
//
// chunk_stats: out fp32 or fp64 [3, C] = (logsumexp z, log_softmax(z)[target], entropy of softmax(z)), computed
//   in fp32; an fp64 out gets lse = m + log s unrounded (what chunk_grad's p need).
// chunk_partial_stats: out fp32 [4, C] = (m = max z, s = sum exp(z - m), u = sum exp(z - m) (z - m),
//   z[target] or 0), the partials a vocabulary shard contributes (grpo_fast/engine/parallel.py combines them).
// chunk_grad: logits overwritten with dLoss/dlogits from per-row coefficients (lse fp64 or fp32 [C], g fp32 [C]),
//   p = exp(z - lse):
//   g * (onehot(target) - p) / T, minus ent_coef * p * ((z - lse) + entropy) / T when ent_coef (dLoss/dH) and
//   the rows' entropy H (fp32 [C], both or neither) are given: that is ent_coef * dH/dlogits.
TORCH_LIBRARY_FRAGMENT(grpo_fast, m) {
  m.set_python_module("grpo_fast.backends._native");
  m.def("chunk_stats(Tensor logits, Tensor targets, float temperature, Tensor(a!) out) -> ()");
  m.def("chunk_partial_stats(Tensor logits, Tensor targets, float temperature, Tensor(a!) out) -> ()");
  m.def(
      "chunk_grad(Tensor(a!) logits, Tensor targets, Tensor lse, Tensor g, float temperature, "
      "Tensor? ent_coef=None, Tensor? entropy=None) -> ()");
}
TORCH_LIBRARY_IMPL(grpo_fast, CPU, m) {
  m.impl("chunk_stats", &grpo_fast::chunk_stats_cpu);
  m.impl("chunk_partial_stats", &grpo_fast::chunk_partial_stats_cpu);
  m.impl("chunk_grad", &grpo_fast::chunk_grad_cpu);
}
#ifdef GRPO_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(grpo_fast, CUDA, m) {
  m.impl("chunk_stats", &grpo_fast::chunk_stats_cuda);
  m.impl("chunk_partial_stats", &grpo_fast::chunk_partial_stats_cuda);
  m.impl("chunk_grad", &grpo_fast::chunk_grad_cuda);
}
#endif

// ---------------------------------------------------------------------------------------------
// The Python module itself: only what the ops cannot say.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "grpo_fast compiled ops, registered as torch.ops.grpo_fast.*";
  // The ops exist by now (static registration at load time), so their fake kernels can follow:
  // torch.compile then works however this module was imported (torch only hints at the module).
  pybind11::module_::import("grpo_fast.backends._native").attr("_register_fakes")();
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
