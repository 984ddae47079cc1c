// Torch-facing launchers of the CUDA chunk-op kernels (host compiler, CUDA builds only): the shared
// input checks (csrc/chunk_check.h), a device guard, the current stream, and raw pointers for chunk_ops.cu.
#include <cstdint>
#include <limits>
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

ChunkParams tile_params(const char* op, const at::Tensor& logits, const at::Tensor& targets, double temperature) {
  // One block per row, and gridDim.x is at most 2^31 - 1 (a larger count would wrap in the unsigned cast).
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max(), "grpo_fast::", op,
              ": at most 2^31 - 1 rows per tile on CUDA, got ", logits.size(0));
  ChunkParams p;
  p.logits = logits.data_ptr();
  p.rows = logits.size(0);
  p.cols = logits.size(1);
  p.row_stride = logits.size(0) > 1 ? logits.stride(0) : logits.size(1);
  p.dtype = tile_dtype(logits);
  p.targets = targets.const_data_ptr<int64_t>();
  p.temperature = static_cast<float>(temperature);  // as torch divides by it: float(T)
  return p;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void stats_impl(const char* op, const at::Tensor& logits, const at::Tensor& targets, double temperature,
                at::Tensor& out, bool partial) {
  check_tile_inputs(op, logits, targets, temperature, kCUDA);
  check_out(op, out, partial ? 4 : 3, logits.size(0), logits, /*wide=*/!partial);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  ChunkParams p = tile_params(op, logits, targets, temperature);
  if (out.scalar_type() == at::kDouble) {
    p.out64 = out.mutable_data_ptr<double>();
  } else {
    p.out = out.mutable_data_ptr<float>();
  }
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
                     double temperature, const std::optional<at::Tensor>& ent_coef,
                     const std::optional<at::Tensor>& entropy) {
  const char* op = "chunk_grad";
  check_tile_inputs(op, logits, targets, temperature, kCUDA);
  const bool ent = check_grad_inputs(op, logits, lse, g, ent_coef, entropy);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  ChunkParams p = tile_params(op, logits, targets, temperature);
  const at::Tensor lse64 = lse.to(at::kDouble);  // [C]: no copy when it already is fp64
  p.lse = lse64.const_data_ptr<double>();
  p.g = g.const_data_ptr<float>();
  if (ent) {
    p.ent_coef = ent_coef->const_data_ptr<float>();
    p.entropy = entropy->const_data_ptr<float>();
  }
  C10_CUDA_CHECK(launch_chunk_grad(p, current_stream()));
}

}  // namespace grpo_fast
