// Torch-facing launcher of the CUDA group_advantages kernels (host compiler, CUDA builds only).
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../advantages_check.h"
#include "../ops.h"
#include "advantages.cuh"

namespace grpo_fast {

at::Tensor group_advantages_cuda(const at::Tensor& rewards, const at::Tensor& reward_weights, int64_t group_size,
                                 int64_t scale_mode, double eps) {
  check_group_advantages_inputs(rewards, reward_weights, group_size, scale_mode, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(rewards.device());
  at::Tensor out = at::empty({rewards.size(0)}, rewards.options());
  if (rewards.size(0) == 0) return out;

  at::Tensor batch_std;
  GroupAdvantagesParams p;
  p.rewards = rewards.const_data_ptr<float>();
  p.weights = reward_weights.const_data_ptr<float>();
  p.out = out.mutable_data_ptr<float>();
  if (scale_mode == kScaleBatch) {
    batch_std = at::empty({1}, rewards.options().dtype(at::kDouble));
    p.batch_std = batch_std.mutable_data_ptr<double>();
  }
  p.num_rows = rewards.size(0);
  p.num_funcs = rewards.size(1);
  p.group_size = group_size;
  p.scale_mode = scale_mode;
  p.eps = eps;
  C10_CUDA_CHECK(launch_group_advantages(p, c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

}  // namespace grpo_fast
