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
// The chunk ops: row-wise softmax work on one [C, V] logits tile (rows contiguous, any row stride;
// fp32/bf16/fp16, fp32 math), z = logits / temperature, targets int64 [C]. Targets outside [0, V)
// (another vocabulary shard's tokens) have no one-hot term and a target logit of 0. Each op writes into
// tensors the caller gives it (annotated (a!)), so it allocates nothing and its fake kernel checks only.
// The Python side is grpo_fast/native_ops.py (NativeChunkOps); grpo_fast/objective.py has the math.
//
// chunk_stats: out fp32 [3, C] = (logsumexp z, log_softmax(z)[target], entropy of softmax(z)).
// chunk_partial_stats: out fp32 [4, C] = (m = max z, s = sum exp(z - m), u = sum exp(z - m) (z - m),
//   z[target] or 0), the partials a vocabulary shard contributes (grpo_fast/parallel.py combines them).
// chunk_grad: logits overwritten with g * (onehot(target) - exp(z - lse)) / T; lse, g fp32 [C].
// token_pass: the fused per-chunk pass of the token-level loss: the stats, then per token
//   g = w * d loss / d logp of TRL's per-token loss (family 0 clipped: grpo/bnpo/dr_grpo/dapo/luspo,
//   1 cispo, 2 sapo; lo = 1 - epsilon_low, hi = 1 + epsilon_high, cispo_max = CISPO's cap, delta the
//   two-sided cap or None, beta the k3 KL coefficient), then logits overwritten with dlogits.
//   out fp32 [2, C] = (logp, entropy). old_logp None: on-policy (ratio 1); ref_logp read iff beta != 0.
// token_loss: the same per-token terms from log-probs alone (no logits), for callers that have them:
//   out fp32 [5, N] = (per-token loss, g = w * d loss / d logp, KL, clipped low, clipped high) with
//   the clip flags 0/1 (cispo: its clip in the "high" row).
TORCH_LIBRARY_FRAGMENT(grpo_fast, m) {
  m.set_python_module("grpo_fast._native");
  m.def("chunk_stats(Tensor logits, Tensor targets, float temperature, Tensor(a!) out) -> ()");
  m.def("chunk_partial_stats(Tensor logits, Tensor targets, float temperature, Tensor(a!) out) -> ()");
  m.def("chunk_grad(Tensor(a!) logits, Tensor targets, Tensor lse, Tensor g, float temperature) -> ()");
  m.def(
      "token_pass(Tensor(a!) logits, Tensor targets, Tensor? old_logp, Tensor? ref_logp, Tensor adv, Tensor w, "
      "Tensor(b!) out, int family, float lo, float hi, float cispo_max, float? delta, float beta, "
      "bool bias_correction_kl, float temperature, float sapo_tau_pos, float sapo_tau_neg) -> ()");
  m.def(
      "token_loss(Tensor logp, Tensor? old_logp, Tensor? ref_logp, Tensor adv, Tensor w, Tensor(a!) out, "
      "int family, float lo, float hi, float cispo_max, float? delta, float beta, bool bias_correction_kl, "
      "float sapo_tau_pos, float sapo_tau_neg) -> ()");
}
TORCH_LIBRARY_IMPL(grpo_fast, CPU, m) {
  m.impl("chunk_stats", &grpo_fast::chunk_stats_cpu);
  m.impl("chunk_partial_stats", &grpo_fast::chunk_partial_stats_cpu);
  m.impl("chunk_grad", &grpo_fast::chunk_grad_cpu);
  m.impl("token_pass", &grpo_fast::token_pass_cpu);
  m.impl("token_loss", &grpo_fast::token_loss_cpu);
}
#ifdef GRPO_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(grpo_fast, CUDA, m) {
  m.impl("chunk_stats", &grpo_fast::chunk_stats_cuda);
  m.impl("chunk_partial_stats", &grpo_fast::chunk_partial_stats_cuda);
  m.impl("chunk_grad", &grpo_fast::chunk_grad_cuda);
  m.impl("token_pass", &grpo_fast::token_pass_cuda);
  m.impl("token_loss", &grpo_fast::token_loss_cuda);
}
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
