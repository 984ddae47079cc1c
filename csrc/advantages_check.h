// Input checks of grpo_fast::group_advantages, shared by the CPU and CUDA entry points.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "advantages_math.h"

namespace grpo_fast {

inline void check_group_advantages_inputs(const at::Tensor& rewards, const at::Tensor& reward_weights,
                                          int64_t group_size, int64_t scale_mode, c10::DeviceType device) {
  TORCH_CHECK(rewards.dim() == 2, "grpo_fast::group_advantages: rewards must be 2-D [M, R] (M = num_groups * ",
              "group_size rows, R reward functions), got ", rewards.dim(), "-D shape ", rewards.sizes());
  TORCH_CHECK(reward_weights.dim() == 1 && reward_weights.size(0) == rewards.size(1),
              "grpo_fast::group_advantages: reward_weights must be 1-D [R] with R = rewards.size(1) = ",
              rewards.size(1), ", got shape ", reward_weights.sizes());
  TORCH_CHECK(rewards.scalar_type() == at::kFloat, "grpo_fast::group_advantages: rewards must be float32, got ",
              rewards.scalar_type());
  TORCH_CHECK(reward_weights.scalar_type() == at::kFloat,
              "grpo_fast::group_advantages: reward_weights must be float32, got ", reward_weights.scalar_type());
  TORCH_CHECK(rewards.device().type() == device && reward_weights.device() == rewards.device(),
              "grpo_fast::group_advantages: rewards and reward_weights must be on the same ", device,
              " device, got ", rewards.device(), " and ", reward_weights.device());
  TORCH_CHECK(rewards.is_contiguous(), "grpo_fast::group_advantages: rewards must be contiguous");
  TORCH_CHECK(reward_weights.is_contiguous(), "grpo_fast::group_advantages: reward_weights must be contiguous");
  TORCH_CHECK(group_size > 0, "grpo_fast::group_advantages: group_size must be positive, got ", group_size);
  TORCH_CHECK(rewards.size(0) % group_size == 0, "grpo_fast::group_advantages: group_size=", group_size,
              " must divide the number of rows M=", rewards.size(0));
  TORCH_CHECK(scale_mode == kScaleGroup || scale_mode == kScaleBatch || scale_mode == kScaleNone,
              "grpo_fast::group_advantages: scale_mode must be 0 (group), 1 (batch) or 2 (none), got ",
              scale_mode);
}

}  // namespace grpo_fast
