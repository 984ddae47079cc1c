// CPU kernel of grpo_fast::group_advantages: parallel over groups (at::parallel_for, OpenMP in
// torch's builds). Arithmetic in csrc/advantages_math.h, shared with the CUDA kernel.
#include <algorithm>
#include <cstdint>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "../advantages_check.h"
#include "../advantages_math.h"
#include "../ops.h"

namespace grpo_fast {
namespace {

// Groups per parallel task: below a few thousand rows the threads cost more than they save.
constexpr int64_t kGrainRows = 4096;

// Mean and (if "group") std of the row rewards r[0:n], then the advantages written over them.
void finish_group(float* r, int64_t n, int64_t scale_mode, double eps, double batch_std) {
  MeanAcc mean_acc;
  for (int64_t i = 0; i < n; ++i) mean_acc.add(r[i]);
  const double mean = mean_acc.mean();
  double stddev = batch_std;
  if (scale_mode == kScaleGroup) {
    SquareAcc sq;
    for (int64_t i = 0; i < n; ++i) sq.add(r[i], mean);
    stddev = sq.stddev(mean_acc.count);
  }
  for (int64_t i = 0; i < n; ++i) r[i] = advantage(r[i], mean, stddev, scale_mode, eps);
}

}  // namespace

at::Tensor group_advantages_cpu(const at::Tensor& rewards, const at::Tensor& reward_weights, int64_t group_size,
                                int64_t scale_mode, double eps) {
  check_group_advantages_inputs(rewards, reward_weights, group_size, scale_mode, c10::DeviceType::CPU);
  const int64_t num_rows = rewards.size(0);
  const int64_t num_funcs = rewards.size(1);
  const int64_t num_groups = num_rows / group_size;
  at::Tensor out = at::empty({num_rows}, rewards.options());
  if (num_rows == 0) return out;

  const float* rw = rewards.const_data_ptr<float>();
  const float* w = reward_weights.const_data_ptr<float>();
  float* r = out.mutable_data_ptr<float>();  // row rewards first, advantages in place after
  const int64_t grain = std::max<int64_t>(1, kGrainRows / group_size);

  auto rows_of = [&](int64_t begin_group, int64_t end_group) {
    for (int64_t m = begin_group * group_size; m < end_group * group_size; ++m) {
      r[m] = row_reward(rw + m * num_funcs, w, num_funcs);
    }
  };

  if (scale_mode != kScaleBatch) {
    at::parallel_for(0, num_groups, grain, [&](int64_t begin, int64_t end) {
      rows_of(begin, end);
      for (int64_t g = begin; g < end; ++g) finish_group(r + g * group_size, group_size, scale_mode, eps, 0.0);
    });
    return out;
  }

  // "batch": the std of all rows first (serial, so the result does not depend on the thread count;
  // M is small next to everything else in a GRPO step), group means after.
  at::parallel_for(0, num_groups, grain, rows_of);
  MeanAcc all;
  for (int64_t m = 0; m < num_rows; ++m) all.add(r[m]);
  const double batch_mean = all.mean();
  SquareAcc all_sq;
  for (int64_t m = 0; m < num_rows; ++m) all_sq.add(r[m], batch_mean);
  const double batch_std = all_sq.stddev(all.count);
  at::parallel_for(0, num_groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) finish_group(r + g * group_size, group_size, scale_mode, eps, batch_std);
  });
  return out;
}

}  // namespace grpo_fast
