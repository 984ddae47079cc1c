// Input checks of the chunk ops (chunk_stats, chunk_partial_stats, chunk_grad, token_pass, token_loss),
// shared by the CPU and CUDA entry points. Every message names the op and the argument.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "token_math.h"

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

// The fp32 [k, rows] output a chunk op writes into.
inline void check_out(const char* op, const at::Tensor& out, int64_t k, int64_t rows, const at::Tensor& like) {
  TORCH_CHECK(out.dim() == 2 && out.size(0) == k && out.size(1) == rows, "grpo_fast::", op, ": out must have shape [",
              k, ", ", rows, "], got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat, "grpo_fast::", op, ": out must be float32, got ", out.scalar_type());
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

// The per-token GRPO inputs of token_pass / token_loss: old_logp optional (None: on-policy, ratio 1);
// ref_logp required when beta != 0 (and never read otherwise).
inline void check_token_inputs(const char* op, int64_t rows, const std::optional<at::Tensor>& old_logp,
                               const std::optional<at::Tensor>& ref_logp, const at::Tensor& adv, const at::Tensor& w,
                               const TokenTerms& terms, const at::Tensor& like) {
  check_rows(op, "old_logp", old_logp, rows, at::kFloat, like);
  check_rows(op, "ref_logp", ref_logp, rows, at::kFloat, like);
  check_rows(op, "adv", adv, rows, at::kFloat, like);
  check_rows(op, "w", w, rows, at::kFloat, like);
  TORCH_CHECK(terms.family == kFamilyClipped || terms.family == kFamilyCispo || terms.family == kFamilySapo,
              "grpo_fast::", op, ": family must be 0 (clipped), 1 (cispo) or 2 (sapo), got ", terms.family);
  TORCH_CHECK(terms.beta == 0.0f || ref_logp.has_value(), "grpo_fast::", op, ": beta=", terms.beta,
              " needs ref_logp (the KL term's reference log-probs)");
}

// token_loss's per-token log-probs: fp32 [N], contiguous, on `device`; returns N.
inline int64_t check_logp(const char* op, const at::Tensor& logp, c10::DeviceType device) {
  TORCH_CHECK(logp.dim() == 1, "grpo_fast::", op, ": logp must be 1-D [N], got shape ", logp.sizes());
  TORCH_CHECK(logp.device().type() == device, "grpo_fast::", op, ": logp must be a ", device,
              " tensor here, got ", logp.device());
  check_rows(op, "logp", logp, logp.size(0), at::kFloat, logp);
  return logp.size(0);
}

// The per-token inputs of token_pass / token_loss, checked (with their fp32 [k, rows] output), as the
// kernels read them.
struct TokenArgs {
  const float* old_logp;  // null: on-policy
  const float* ref_logp;  // null unless terms.beta != 0
  const float* adv;
  const float* w;
  float* out;
};

inline TokenArgs token_args(const char* op, int64_t rows, const std::optional<at::Tensor>& old_logp,
                            const std::optional<at::Tensor>& ref_logp, const at::Tensor& adv, const at::Tensor& w,
                            at::Tensor& out, int64_t out_k, const TokenTerms& terms, const at::Tensor& like) {
  check_token_inputs(op, rows, old_logp, ref_logp, adv, w, terms, like);
  check_out(op, out, out_k, rows, like);
  return TokenArgs{old_logp.has_value() ? old_logp->const_data_ptr<float>() : nullptr,
                   (ref_logp.has_value() && terms.beta != 0.0f) ? ref_logp->const_data_ptr<float>() : nullptr,
                   adv.const_data_ptr<float>(), w.const_data_ptr<float>(), out.mutable_data_ptr<float>()};
}

// The hyper-parameters as the op schemas take them, as the kernels take them.
inline TokenTerms make_token_terms(int64_t family, double lo, double hi, double cispo_max, std::optional<double> delta,
                                   double beta, bool bias_correction_kl, double tau_pos, double tau_neg) {
  TokenTerms t;
  t.family = family;
  t.lo = static_cast<float>(lo);
  t.hi = static_cast<float>(hi);
  t.cispo_max = static_cast<float>(cispo_max);
  t.has_delta = delta.has_value();
  t.delta = delta.has_value() ? static_cast<float>(*delta) : 0.0f;
  t.beta = static_cast<float>(beta);
  t.bias_correction_kl = bias_correction_kl;
  t.tau_pos = static_cast<float>(tau_pos);
  t.tau_neg = static_cast<float>(tau_neg);
  return t;
}

}  // namespace grpo_fast
