// Raw-pointer interface between the CUDA kernels of the chunk ops (chunk_ops.cu, no torch headers) and
// their torch-facing launchers (chunk_ops_launch.cpp).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace grpo_fast {

enum TileDtype : int { kTileFloat = 0, kTileBFloat16 = 1, kTileHalf = 2 };

struct ChunkParams {
  void* logits = nullptr;            // [rows, cols] tile, rows contiguous, row_stride elements apart
  int64_t row_stride = 0;            // in elements
  int64_t rows = 0;
  int64_t cols = 0;
  int dtype = kTileFloat;            // TileDtype
  const int64_t* targets = nullptr;  // [rows]; ids outside [0, cols): no one-hot, target logit 0
  float temperature = 1.0f;          // z = logits / temperature
  float* out = nullptr;              // chunk_stats: fp32 [k, rows], k = 3 stats or 4 partial stats
  double* out64 = nullptr;           // chunk_stats: fp64 [3, rows] instead of out (lse unrounded)
  const double* lse = nullptr;       // chunk_grad: [rows]
  const float* g = nullptr;          // chunk_grad: [rows]
  const float* ent_coef = nullptr;   // chunk_grad: [rows] or null (no entropy term)
  const float* entropy = nullptr;    // chunk_grad: [rows], set iff ent_coef is
};

// Each enqueues its kernel on `stream` and returns the launch error (cudaSuccess when fine).
cudaError_t launch_chunk_stats(const ChunkParams& p, bool partial, cudaStream_t stream);
cudaError_t launch_chunk_grad(const ChunkParams& p, cudaStream_t stream);

}  // namespace grpo_fast
