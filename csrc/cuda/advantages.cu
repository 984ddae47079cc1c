// CUDA kernels of grpo_fast::group_advantages. Arithmetic in csrc/advantages_math.h (shared with
// the CPU kernel); torch-facing checks and allocation in advantages_launch.cpp.
//   group / none: one launch, one warp per group (rows -> mean -> std -> advantages).
//   batch:        row rewards, then one block for the std over all rows, then one warp per group.
#include <cstdint>

#include <cuda_runtime.h>

#include "../advantages_math.h"
#include "advantages.cuh"

namespace grpo_fast {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kStdThreads = 1024;

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ int64_t warp_sum(int64_t v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, static_cast<long long>(v), offset));
  }
  return v;
}

__global__ void row_rewards_kernel(GroupAdvantagesParams p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; m < p.num_rows; m += stride) {
    p.out[m] = row_reward(p.rewards + m * p.num_funcs, p.weights, p.num_funcs);
  }
}

// Sum of (v, c) over the block; every thread gets the result.
__device__ void block_sum(double& v, int64_t& c) {
  __shared__ double s_v[kStdThreads / kWarp];
  __shared__ int64_t s_c[kStdThreads / kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int num_warps = blockDim.x / kWarp;
  v = warp_sum(v);
  c = warp_sum(c);
  if (lane == 0) {
    s_v[warp] = v;
    s_c[warp] = c;
  }
  __syncthreads();
  v = lane < num_warps ? s_v[lane] : 0.0;
  c = lane < num_warps ? s_c[lane] : 0;
  v = warp_sum(v);
  c = warp_sum(c);
  __syncthreads();  // the shared slots are reused by the next call
}

// One block: nanstd of the row rewards p.out[0:num_rows] into *p.batch_std.
__global__ void batch_std_kernel(GroupAdvantagesParams p) {
  MeanAcc mean_acc;
  for (int64_t m = threadIdx.x; m < p.num_rows; m += blockDim.x) mean_acc.add(p.out[m]);
  block_sum(mean_acc.sum, mean_acc.count);
  const double mean = mean_acc.mean();
  SquareAcc sq;
  for (int64_t m = threadIdx.x; m < p.num_rows; m += blockDim.x) sq.add(p.out[m], mean);
  block_sum(sq.sum, sq.count);
  if (threadIdx.x == 0) *p.batch_std = sq.stddev(mean_acc.count);
}

// One warp per group. Each lane touches only rows lane, lane + 32, ... of its group, so the row
// rewards can live in p.out between the passes without synchronization.
__global__ void group_advantages_kernel(GroupAdvantagesParams p, bool compute_rows) {
  const int64_t num_groups = p.num_rows / p.group_size;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (group >= num_groups) return;  // whole warps leave together
  const int lane = threadIdx.x % kWarp;
  const int64_t first = group * p.group_size;
  float* r = p.out + first;

  MeanAcc mean_acc;
  for (int64_t i = lane; i < p.group_size; i += kWarp) {
    if (compute_rows) r[i] = row_reward(p.rewards + (first + i) * p.num_funcs, p.weights, p.num_funcs);
    mean_acc.add(r[i]);
  }
  mean_acc.sum = warp_sum(mean_acc.sum);
  mean_acc.count = warp_sum(mean_acc.count);
  const double mean = mean_acc.mean();

  double stddev = 0.0;
  if (p.scale_mode == kScaleGroup) {
    SquareAcc sq;
    for (int64_t i = lane; i < p.group_size; i += kWarp) sq.add(r[i], mean);
    sq.sum = warp_sum(sq.sum);
    sq.count = warp_sum(sq.count);
    stddev = sq.stddev(mean_acc.count);
  } else if (p.scale_mode == kScaleBatch) {
    stddev = *p.batch_std;
  }
  for (int64_t i = lane; i < p.group_size; i += kWarp) r[i] = advantage(r[i], mean, stddev, p.scale_mode, p.eps);
}

}  // namespace

cudaError_t launch_group_advantages(const GroupAdvantagesParams& p, cudaStream_t stream) {
  if (p.num_rows == 0) return cudaSuccess;
  const int64_t num_groups = p.num_rows / p.group_size;
  const bool batch = p.scale_mode == kScaleBatch;
  if (batch) {
    const int threads = 256;
    const int64_t blocks = (p.num_rows + threads - 1) / threads;
    row_rewards_kernel<<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), threads, 0, stream>>>(p);
    batch_std_kernel<<<1, kStdThreads, 0, stream>>>(p);
  }
  const int64_t blocks = (num_groups + kWarpsPerBlock - 1) / kWarpsPerBlock;
  group_advantages_kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarp, 0, stream>>>(p, !batch);
  return cudaGetLastError();
}

}  // namespace grpo_fast
