// The arithmetic of grpo_fast::group_advantages, shared by the CPU and CUDA kernels.
// Plain C++ (host and device), no torch: it mirrors TRL 1.16 GRPOTrainer's "sum_then_normalize":
//   r_m   = nansum_k(rewards[m, k] * w[k]), NaN when every rewards[m, :] is NaN ("unscorable")
//   mean  = nanmean of r over the group
//   std   = trl.trainer.utils.nanstd over the group ("group") or over all rows ("batch"):
//           sqrt(nanmean((r - nanmean(r))^2) * n / (n - 1)), NaN when n < 2 (n = non-NaN count)
//   adv   = r - mean, divided by (std + eps) unless scale is "none", then nan_to_num(nan=0)
// Sums are accumulated in double; inputs and outputs are fp32. NaN tests use x != x, so never
// compile these files with -ffast-math / --use_fast_math.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GF_HD __host__ __device__ __forceinline__
#else
#define GF_HD inline
#endif

namespace grpo_fast {

enum ScaleMode : int64_t { kScaleGroup = 0, kScaleBatch = 1, kScaleNone = 2 };

GF_HD bool is_nan(double x) { return x != x; }

// Weighted nansum of one row of R rewards, rounded to fp32 like TRL's fp32 tensor.
GF_HD float row_reward(const float* row, const float* weights, int64_t num_funcs) {
  double sum = 0.0;
  bool scorable = false;
  for (int64_t k = 0; k < num_funcs; ++k) {
    const float x = row[k];
    if (is_nan(x)) continue;
    scorable = true;
    const float product = x * weights[k];  // fp32 product as in TRL; may still be NaN (inf * 0)
    if (!is_nan(product)) sum += product;
  }
  return scorable ? static_cast<float>(sum) : static_cast<float>(NAN);
}

// First pass of nanmean: sum and count of the non-NaN values.
struct MeanAcc {
  double sum = 0.0;
  int64_t count = 0;
  GF_HD void add(float x) {
    if (!is_nan(x)) {
      sum += x;
      count += 1;
    }
  }
  GF_HD void merge(double other_sum, int64_t other_count) {
    sum += other_sum;
    count += other_count;
  }
  GF_HD double mean() const { return count > 0 ? sum / static_cast<double>(count) : static_cast<double>(NAN); }
};

// Second pass of nanstd: nanmean of the squared deviations (a square that is NaN, e.g. of
// inf - inf, is skipped by nanmean, as in TRL), then Bessel's correction by the non-NaN count.
struct SquareAcc {
  double sum = 0.0;
  int64_t count = 0;
  GF_HD void add(float x, double mean) {
    if (is_nan(x)) return;
    const double d = static_cast<double>(x) - mean;
    const double sq = d * d;
    if (!is_nan(sq)) {
      sum += sq;
      count += 1;
    }
  }
  GF_HD void merge(double other_sum, int64_t other_count) {
    sum += other_sum;
    count += other_count;
  }
  // values_count: the number of non-NaN values (MeanAcc::count).
  GF_HD double stddev(int64_t values_count) const {
    if (count == 0 || values_count < 2) return static_cast<double>(NAN);
    const double variance = sum / static_cast<double>(count);
    return sqrt(variance * static_cast<double>(values_count) / static_cast<double>(values_count - 1));
  }
};

// torch.nan_to_num(x, nan=0.0) of the fp32 result: NaN -> 0, +-inf -> +-FLT_MAX.
GF_HD float nan_to_num(double x) {
  if (is_nan(x)) return 0.0f;
  if (x > static_cast<double>(FLT_MAX)) return FLT_MAX;
  if (x < -static_cast<double>(FLT_MAX)) return -FLT_MAX;
  return static_cast<float>(x);
}

GF_HD float advantage(float reward, double mean, double stddev, int64_t scale_mode, double eps) {
  double adv = static_cast<double>(reward) - mean;
  if (scale_mode != kScaleNone) adv /= (stddev + eps);
  return nan_to_num(adv);
}

}  // namespace grpo_fast
