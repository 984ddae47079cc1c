// Torch-facing entry points of the ops of grpo_fast._C, registered in csrc/bindings.cpp.
// Kept free of CUDA headers: bindings.cpp includes it in every build.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace grpo_fast {

// grpo_fast::group_advantages (schema and semantics in bindings.cpp).
at::Tensor group_advantages_cpu(const at::Tensor& rewards, const at::Tensor& reward_weights,
                                int64_t group_size, int64_t scale_mode, double eps);
#ifdef GRPO_FAST_WITH_CUDA
at::Tensor group_advantages_cuda(const at::Tensor& rewards, const at::Tensor& reward_weights,
                                 int64_t group_size, int64_t scale_mode, double eps);
#endif

}  // namespace grpo_fast
