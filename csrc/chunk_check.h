// Input checks of the chunk ops (chunk_stats, chunk_partial_stats, chunk_grad), shared by the CPU and
// CUDA entry points. Every message names the op and the argument.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace grpo_fast {

// A [C, V] logits tile: fp32/bf16/fp16, rows contiguous (stride(1) == 1), any row stride, on `device`.
inline void check_tile(const char* op, const at::Tensor& logits, c10::DeviceType device) {
  TORCH_CHECK(logits.dim() == 2, "grpo_fast::", op, ": logits must be a 2-D [C, V] tile, got ", logits.dim(),
              "-D shape ", logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "grpo_fast::", op,
              ": logits must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(logits.device().type() == device, "grpo_fast::", op, ": logits must be a ", device,
              " tensor here, got ", logits.device());
  TORCH_CHECK(logits.size(1) > 0, "grpo_fast::", op, ": the tile has no vocabulary columns (shape ",
              logits.sizes(), ")");
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1, "grpo_fast::", op,
              ": logits rows must be contiguous (stride(1) == 1), got strides ", logits.strides());
  TORCH_CHECK(logits.size(0) <= 1 || logits.stride(0) >= logits.size(1), "grpo_fast::", op,
              ": logits rows must not overlap (stride(0) >= V), got strides ", logits.strides());
}

// A contiguous 1-D [rows] vector of `dtype` on the device of `like`.
inline void check_rows(const char* op, const char* name, const at::Tensor& x, int64_t rows, at::ScalarType dtype,
                       const at::Tensor& like) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) == rows, "grpo_fast::", op, ": ", name, " must have shape [", rows,
              "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == dtype, "grpo_fast::", op, ": ", name, " must be ", dtype, ", got ",
              x.scalar_type());
  TORCH_CHECK(x.device() == like.device(), "grpo_fast::", op, ": ", name, " must be on ", like.device(),
              " like the other inputs, got ", x.device());
  TORCH_CHECK(x.is_contiguous(), "grpo_fast::", op, ": ", name, " must be contiguous");
}

inline void check_rows(const char* op, const char* name, const std::optional<at::Tensor>& x, int64_t rows,
                       at::ScalarType dtype, const at::Tensor& like) {
  if (x.has_value()) check_rows(op, name, *x, rows, dtype, like);
}

// The [k, rows] output a chunk op writes into: fp32, or fp64 where `wide` (chunk_stats: lse = m + log s unrounded).
inline void check_out(const char* op, const at::Tensor& out, int64_t k, int64_t rows, const at::Tensor& like,
                      bool wide = false) {
  TORCH_CHECK(out.dim() == 2 && out.size(0) == k && out.size(1) == rows, "grpo_fast::", op, ": out must have shape [",
              k, ", ", rows, "], got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat || (wide && out.scalar_type() == at::kDouble), "grpo_fast::", op,
              ": out must be float32", wide ? " or float64" : "", ", got ", out.scalar_type());
  TORCH_CHECK(out.device() == like.device(), "grpo_fast::", op, ": out must be on ", like.device(), ", got ",
              out.device());
  TORCH_CHECK(out.is_contiguous(), "grpo_fast::", op, ": out must be contiguous");
}

inline void check_temperature(const char* op, double temperature) {
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), "grpo_fast::", op,
              ": temperature must be a positive finite number, got ", temperature);
}

// Targets int64 [C]; ids outside [0, V) (another vocabulary shard's tokens) get no one-hot term.
inline void check_tile_inputs(const char* op, const at::Tensor& logits, const at::Tensor& targets, double temperature,
                              c10::DeviceType device) {
  check_tile(op, logits, device);
  check_rows(op, "targets", targets, logits.size(0), at::kLong, logits);
  check_temperature(op, temperature);
}

// chunk_grad's per-row inputs: lse fp64 [C] (or fp32: rounded at |lse|, every p then carries that rounding),
// g fp32 [C]; ent_coef and entropy (the entropy-gradient term) fp32 [C], both or neither. Returns whether the
// entropy term is on.
inline bool check_grad_inputs(const char* op, const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& g,
                              const std::optional<at::Tensor>& ent_coef, const std::optional<at::Tensor>& entropy) {
  const int64_t rows = logits.size(0);
  check_rows(op, "lse", lse, rows, lse.scalar_type() == at::kFloat ? at::kFloat : at::kDouble, logits);
  check_rows(op, "g", g, rows, at::kFloat, logits);
  TORCH_CHECK(ent_coef.has_value() == entropy.has_value(), "grpo_fast::", op, ": ent_coef and entropy go together ",
              "(the entropy-gradient term needs both), got ", ent_coef.has_value() ? "ent_coef" : "entropy",
              " alone");
  check_rows(op, "ent_coef", ent_coef, rows, at::kFloat, logits);
  check_rows(op, "entropy", entropy, rows, at::kFloat, logits);
  return ent_coef.has_value();
}

}  // namespace grpo_fast
