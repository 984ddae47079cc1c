// Torch-facing entry points of the ops of grpo_fast._C, registered in csrc/bindings.cpp.
// Kept free of CUDA headers: bindings.cpp includes it in every build.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>

namespace grpo_fast {

// grpo_fast::group_advantages (schema and semantics in bindings.cpp).
at::Tensor group_advantages_cpu(const at::Tensor& rewards, const at::Tensor& reward_weights,
                                int64_t group_size, int64_t scale_mode, double eps);
#ifdef GRPO_FAST_WITH_CUDA
at::Tensor group_advantages_cuda(const at::Tensor& rewards, const at::Tensor& reward_weights,
                                 int64_t group_size, int64_t scale_mode, double eps);
#endif

// The chunk ops (schemas and semantics in bindings.cpp): one entry point per device, same signature.
#define GRPO_FAST_CHUNK_OPS(DEV)                                                                                   \
  void chunk_stats_##DEV(const at::Tensor& logits, const at::Tensor& targets, double temperature,                  \
                         at::Tensor& out);                                                                         \
  void chunk_partial_stats_##DEV(const at::Tensor& logits, const at::Tensor& targets, double temperature,          \
                                 at::Tensor& out);                                                                 \
  void chunk_grad_##DEV(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& g, \
                        double temperature, const std::optional<at::Tensor>& ent_coef,                             \
                        const std::optional<at::Tensor>& entropy);

GRPO_FAST_CHUNK_OPS(cpu)
#ifdef GRPO_FAST_WITH_CUDA
GRPO_FAST_CHUNK_OPS(cuda)
#endif
#undef GRPO_FAST_CHUNK_OPS

}  // namespace grpo_fast
