// Raw-pointer interface between the CUDA kernels of group_advantages (advantages.cu, no torch
// headers, so nvcc stays fast) and their torch-facing launcher (advantages_launch.cpp).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace grpo_fast {

struct GroupAdvantagesParams {
  const float* rewards = nullptr;  // [num_rows, num_funcs], contiguous
  const float* weights = nullptr;  // [num_funcs]
  float* out = nullptr;            // [num_rows]
  double* batch_std = nullptr;     // [1] scratch, used by scale_mode == kScaleBatch only
  int64_t num_rows = 0;
  int64_t num_funcs = 0;
  int64_t group_size = 1;
  int64_t scale_mode = 0;
  double eps = 0.0;
};

// Enqueues the kernels on `stream`; returns the launch error (cudaSuccess when fine).
cudaError_t launch_group_advantages(const GroupAdvantagesParams& p, cudaStream_t stream);

}  // namespace grpo_fast
