// Torch-facing launchers of the CUDA chunk-op kernels (host compiler, CUDA builds only): the shared
// input checks (csrc/chunk_check.h), a device guard, the current stream, and raw pointers for chunk_ops.cu.
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../chunk_check.h"
#include "../ops.h"
#include "chunk_ops.cuh"

namespace grpo_fast {
namespace {

constexpr auto kCUDA = c10::DeviceType::CUDA;

int tile_dtype(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kBFloat16:
      return kTileBFloat16;
    case at::kHalf:
      return kTileHalf;
    default:
      return kTileFloat;
  }
}

ChunkParams tile_params(const at::Tensor& logits, const at::Tensor& targets, double temperature) {
  ChunkParams p;
  p.logits = logits.data_ptr();
  p.rows = logits.size(0);
  p.cols = logits.size(1);
  p.row_stride = logits.size(0) > 1 ? logits.stride(0) : logits.size(1);
  p.dtype = tile_dtype(logits);
  p.targets = targets.const_data_ptr<int64_t>();
  p.inv_t = static_cast<float>(1.0 / temperature);
  return p;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void stats_impl(const char* op, const at::Tensor& logits, const at::Tensor& targets, double temperature,
                at::Tensor& out, bool partial) {
  check_tile_inputs(op, logits, targets, temperature, kCUDA);
  check_out(op, out, partial ? 4 : 3, logits.size(0), logits);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  ChunkParams p = tile_params(logits, targets, temperature);
  p.out = out.mutable_data_ptr<float>();
  C10_CUDA_CHECK(launch_chunk_stats(p, partial, current_stream()));
}

}  // namespace

void chunk_stats_cuda(const at::Tensor& logits, const at::Tensor& targets, double temperature, at::Tensor& out) {
  stats_impl("chunk_stats", logits, targets, temperature, out, /*partial=*/false);
}

void chunk_partial_stats_cuda(const at::Tensor& logits, const at::Tensor& targets, double temperature,
                              at::Tensor& out) {
  stats_impl("chunk_partial_stats", logits, targets, temperature, out, /*partial=*/true);
}

void chunk_grad_cuda(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& g,
                     double temperature) {
  const char* op = "chunk_grad";
  check_tile_inputs(op, logits, targets, temperature, kCUDA);
  check_rows(op, "lse", lse, logits.size(0), at::kFloat, logits);
  check_rows(op, "g", g, logits.size(0), at::kFloat, logits);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  ChunkParams p = tile_params(logits, targets, temperature);
  p.lse = lse.const_data_ptr<float>();
  p.g = g.const_data_ptr<float>();
  C10_CUDA_CHECK(launch_chunk_grad(p, current_stream()));
}

void token_pass_cuda(at::Tensor& logits, const at::Tensor& targets, const std::optional<at::Tensor>& old_logp,
                     const std::optional<at::Tensor>& ref_logp, const at::Tensor& adv, const at::Tensor& w,
                     at::Tensor& out, int64_t family, double lo, double hi, double cispo_max,
                     std::optional<double> delta, double beta, bool bias_correction_kl, double temperature,
                     double tau_pos, double tau_neg) {
  const char* op = "token_pass";
  check_tile_inputs(op, logits, targets, temperature, kCUDA);
  const TokenTerms terms =
      make_token_terms(family, lo, hi, cispo_max, delta, beta, bias_correction_kl, tau_pos, tau_neg);
  const TokenArgs a = token_args(op, logits.size(0), old_logp, ref_logp, adv, w, out, 2, terms, logits);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  ChunkParams p = tile_params(logits, targets, temperature);
  p.out = a.out;
  p.old_logp = a.old_logp;
  p.ref_logp = a.ref_logp;
  p.adv = a.adv;
  p.w = a.w;
  p.terms = terms;
  C10_CUDA_CHECK(launch_token_pass(p, current_stream()));
}

void token_loss_cuda(const at::Tensor& logp, const std::optional<at::Tensor>& old_logp,
                     const std::optional<at::Tensor>& ref_logp, const at::Tensor& adv, const at::Tensor& w,
                     at::Tensor& out, int64_t family, double lo, double hi, double cispo_max,
                     std::optional<double> delta, double beta, bool bias_correction_kl, double tau_pos,
                     double tau_neg) {
  const char* op = "token_loss";
  const int64_t n = check_logp(op, logp, kCUDA);
  const TokenTerms terms =
      make_token_terms(family, lo, hi, cispo_max, delta, beta, bias_correction_kl, tau_pos, tau_neg);
  const TokenArgs a = token_args(op, n, old_logp, ref_logp, adv, w, out, 5, terms, logp);
  const c10::cuda::CUDAGuard device_guard(logp.device());
  TokenLossParams p;
  p.logp = logp.const_data_ptr<float>();
  p.old_logp = a.old_logp;
  p.ref_logp = a.ref_logp;
  p.adv = a.adv;
  p.w = a.w;
  p.out = a.out;
  p.n = n;
  p.terms = terms;
  C10_CUDA_CHECK(launch_token_loss(p, current_stream()));
}

}  // namespace grpo_fast
