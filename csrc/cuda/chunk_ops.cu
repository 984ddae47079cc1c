// CUDA kernels of the chunk ops. One block per row of the [C, V] tile:
//   pass 1: every thread folds its columns into an online softmax state (m, s, u) in one read of the
//           row, 16-byte vector loads (4 fp32 or 8 bf16/fp16 per load) where the row's alignment allows,
//           one exp per element (plus one per vector when the running max grows); the block merges the
//           states (warp shuffles, then shared memory);
//   pass 2 (chunk_grad): the row is read again and overwritten with g (onehot - p) / T, minus
//           e p (log p + H) / T when the entropy term is on (chosen once per block); lse comes in fp64 and is
//           split into two floats, log p = (z - hi) - lo (an fp32 lse is rounded at |lse| ~ |z|, and that
//           rounding would shift every p of the row; log_softmax's exp((z - m) - log s) has no such error).
//           Each thread writes only
//           the elements it has just read itself and needs nothing else from the row (the target is an
//           index, not a logit), so the in-place write needs no barrier.
// Statistics stay fp32 whatever the tile's dtype; indices are 64-bit (row * stride passes 2^31 on large
// tiles). Torch-facing checks, device guard and stream in chunk_ops_launch.cpp.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "chunk_ops.cuh"

namespace grpo_fast {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxWarps = 32;  // 1024 threads
// Below this log p, p = expf(log p) is exactly 0 in fp32: the entropy term's coefficient clamps log p here,
// so masked (-inf) logits give 0 * finite = 0, not 0 * inf = NaN (as the CPU kernel).
constexpr float kMinLogP = -104.0f;

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// VEC consecutive elements moved as one 16-byte (or smaller, VEC = 1) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Online softmax state: m = max z, s = sum exp(z - m), u = sum exp(z - m) * (z - m) (u relative to m:
// the entropy log s - u / s has no cancellation).
struct Stats {
  float m;
  float s;
  float u;
};

__device__ __forceinline__ Stats merge(const Stats& a, const Stats& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return a;  // both empty
  Stats out{m, 0.0f, 0.0f};
  if (a.s > 0.0f) {
    const float d = a.m - m;
    const float r = expf(d);
    out.s += r * a.s;
    out.u += r * (a.u + a.s * d);
  }
  if (b.s > 0.0f) {
    const float d = b.m - m;
    const float r = expf(d);
    out.s += r * b.s;
    out.u += r * (b.u + b.s * d);
  }
  return out;
}

// Folds VEC scaled logits into the state: one rescale when the max grows, then one exp per element.
template <int VEC>
__device__ __forceinline__ void fold(Stats& st, const float (&z)[VEC]) {
  float vmax = z[0];
#pragma unroll
  for (int k = 1; k < VEC; ++k) vmax = fmaxf(vmax, z[k]);
  if (vmax > st.m) {
    if (st.s > 0.0f) {
      const float d = st.m - vmax;
      const float r = expf(d);
      st.u = r * (st.u + st.s * d);
      st.s *= r;
    }
    st.m = vmax;
  }
  if (st.m == -INFINITY) return;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float d = z[k] - st.m;
    const float e = expf(d);
    st.s += e;
    st.u += e > 0.0f ? e * d : 0.0f;  // -inf logits: e = 0, and 0 * -inf must not make a NaN
  }
}

// The block's merged state, returned to every thread.
__device__ Stats block_merge(Stats st) {
  __shared__ Stats shared[kMaxWarps];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int num_warps = (blockDim.x + kWarp - 1) / kWarp;
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    Stats other;
    other.m = __shfl_xor_sync(0xffffffffu, st.m, offset);
    other.s = __shfl_xor_sync(0xffffffffu, st.s, offset);
    other.u = __shfl_xor_sync(0xffffffffu, st.u, offset);
    st = merge(st, other);
  }
  if (lane == 0) shared[warp] = st;
  __syncthreads();
  st = lane < num_warps ? shared[lane] : Stats{-INFINITY, 0.0f, 0.0f};
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    Stats other;
    other.m = __shfl_xor_sync(0xffffffffu, st.m, offset);
    other.s = __shfl_xor_sync(0xffffffffu, st.s, offset);
    other.u = __shfl_xor_sync(0xffffffffu, st.u, offset);
    st = merge(st, other);
  }
  __syncthreads();  // shared[] may be reused by a later call
  return st;
}

// z = x / T, correctly rounded (__fdiv_rn: never an approximate division, never fused), so every pass (max,
// exps, grad) sees the same z. Not x * fl(1 / T): that product carries one relative rounding of 1 / T into
// every logit of every row alike, an error the tokens of the weight gradient do not average out (3-5x
// PyTorch's gradient error at T = 0.7 on the CPU, where torch divides).
__device__ __forceinline__ float scaled(float x, float t) { return __fdiv_rn(x, t); }

// Pass 1 over one row (every thread gets the row's state).
template <typename T, int VEC>
__device__ Stats row_stats(const T* row, int64_t cols, float t) {
  Stats st{-INFINITY, 0.0f, 0.0f};
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < cols; i += step) {
    const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(row + i);
    float z[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) z[k] = scaled(to_float(pk.v[k]), t);
    fold<VEC>(st, z);
  }
  return block_merge(st);
}

// The scaled target logit, 0 when the target is not in [0, cols) (another vocabulary shard's token).
template <typename T>
__device__ __forceinline__ float target_logit(const T* row, int64_t target, int64_t cols, float t) {
  return (target >= 0 && target < cols) ? scaled(to_float(row[target]), t) : 0.0f;
}

// A row's logsumexp as two floats, lse = hi + lo: log p = (z - hi) - lo is exact but for its own last rounding
// (z - hi is exact for the logits near the max, whose p matter).
struct Lse {
  float hi;
  float lo;
};

__device__ __forceinline__ Lse split_lse(double lse) {
  const float hi = __double2float_rn(lse);
  return {hi, isfinite(hi) ? __double2float_rn(lse - static_cast<double>(hi)) : 0.0f};
}

// Pass 2 over one row: row = scale * (onehot(target) - p) - ent * p * (log p + entropy), p = exp(z - lse),
// the entropy part only when ENT (a template parameter: the plain pass is the same code as without it).
template <bool ENT, typename T, int VEC>
__device__ void row_grad(T* row, int64_t cols, float t, int64_t target, Lse lse, float scale, float ent,
                         float entropy) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < cols; i += step) {
    Pack<T, VEC>* ptr = reinterpret_cast<Pack<T, VEC>*>(row + i);
    Pack<T, VEC> pk = *ptr;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = __fsub_rn(__fsub_rn(scaled(to_float(pk.v[k]), t), lse.hi), lse.lo);
      const float p = expf(d);
      float coef = scale;
      if constexpr (ENT) coef += ent * (fmaxf(d, kMinLogP) + entropy);  // NaN logits: p is NaN anyway
      const float onehot = (i + k == target) ? scale : 0.0f;
      pk.v[k] = from_float<T>(-coef * p + onehot);
    }
    *ptr = pk;
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(1024) chunk_stats_kernel(ChunkParams p, bool partial) {
  const int64_t r = blockIdx.x;
  const T* row = static_cast<const T*>(p.logits) + r * p.row_stride;
  const Stats st = row_stats<T, VEC>(row, p.cols, p.temperature);
  if (threadIdx.x != 0) return;
  const float t = target_logit(row, p.targets[r], p.cols, p.temperature);
  if (partial) {
    p.out[r] = st.m;
    p.out[p.rows + r] = st.s;
    p.out[2 * p.rows + r] = st.u;
    p.out[3 * p.rows + r] = t;
  } else {
    const float log_s = logf(st.s);
    const float logp = (t - st.m) - log_s;  // not t - lse: lse is rounded at |lse|
    const float entropy = log_s - st.u / st.s;
    if (p.out64 != nullptr) {  // lse unrounded (m + log s is exact in fp64): chunk_grad's p carry no rounding of it
      p.out64[r] = static_cast<double>(st.m) + static_cast<double>(log_s);
      p.out64[p.rows + r] = logp;
      p.out64[2 * p.rows + r] = entropy;
    } else {
      p.out[r] = st.m + log_s;
      p.out[p.rows + r] = logp;
      p.out[2 * p.rows + r] = entropy;
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(1024) chunk_grad_kernel(ChunkParams p) {
  const int64_t r = blockIdx.x;
  T* row = static_cast<T*>(p.logits) + r * p.row_stride;
  const float scale = __fdiv_rn(p.g[r], p.temperature);
  const Lse lse = split_lse(p.lse[r]);
  if (p.ent_coef != nullptr) {  // uniform over the grid: no divergence
    row_grad<true, T, VEC>(row, p.cols, p.temperature, p.targets[r], lse, scale,
                           __fdiv_rn(p.ent_coef[r], p.temperature), p.entropy[r]);
  } else {
    row_grad<false, T, VEC>(row, p.cols, p.temperature, p.targets[r], lse, scale, 0.0f, 0.0f);
  }
}

// A row kernel's instantiation: the tile's element type and the elements per access.
template <typename T, int VEC>
struct Kind {
  using type = T;
  static constexpr int vec = VEC;
};

// Calls launch(Kind<T, VEC>{}) for the tile's dtype, with 16-byte vectors when every row start is
// aligned to them and the row length is a multiple of the vector (else one element per access).
template <typename F>
cudaError_t dispatch(const ChunkParams& p, const F& launch) {
  const auto vectors = [&](int vec) {
    return reinterpret_cast<uintptr_t>(p.logits) % 16 == 0 && p.row_stride % vec == 0 && p.cols % vec == 0;
  };
  switch (p.dtype) {
    case kTileFloat:
      return vectors(4) ? launch(Kind<float, 4>{}) : launch(Kind<float, 1>{});
    case kTileBFloat16:
      return vectors(8) ? launch(Kind<__nv_bfloat16, 8>{}) : launch(Kind<__nv_bfloat16, 1>{});
    case kTileHalf:
      return vectors(8) ? launch(Kind<__half, 8>{}) : launch(Kind<__half, 1>{});
    default:
      return cudaErrorInvalidValue;
  }
}

// Threads per row: enough for a wide row to keep loads in flight, fewer for a short one.
inline int row_threads(int64_t cols, int vec) {
  const int64_t accesses = (cols + vec - 1) / vec;
  if (accesses >= 8192) return 1024;
  if (accesses >= 2048) return 512;
  if (accesses >= 512) return 256;
  return 128;
}

}  // namespace

// One block per row: gridDim.x = rows (at most 2^31 - 1, checked by the launchers in chunk_ops_launch.cpp).
cudaError_t launch_chunk_stats(const ChunkParams& p, bool partial, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  return dispatch(p, [&](auto kind) {
    using K = decltype(kind);
    chunk_stats_kernel<typename K::type, K::vec>
        <<<static_cast<unsigned>(p.rows), row_threads(p.cols, K::vec), 0, stream>>>(p, partial);
    return cudaGetLastError();
  });
}

cudaError_t launch_chunk_grad(const ChunkParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  return dispatch(p, [&](auto kind) {
    using K = decltype(kind);
    chunk_grad_kernel<typename K::type, K::vec>
        <<<static_cast<unsigned>(p.rows), row_threads(p.cols, K::vec), 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace grpo_fast
