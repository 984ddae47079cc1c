// The per-token GRPO terms of the chunk ops (token_pass, token_loss), shared by the CPU and CUDA kernels.
// Plain C++ (host and device), no torch. A port of grpo_fast/objective.py, fp32 throughout:
//   token_grad            -> dloss_dlogp (ties of torch.min split 0.5/0.5, clamp passes its closed bounds)
//   per_token_objective   -> token_loss  (token-level ratios; the loss value, KL and clip flags)
// The kernels/token_pass.py Triton kernel is the same function; tests keep all three in step.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GF_TOKEN_HD __host__ __device__ __forceinline__
#else
#define GF_TOKEN_HD inline
#endif

namespace grpo_fast {

// Loss families, numbered as grpo_fast.objective numbers them (FAMILY_*).
enum LossFamily : int64_t { kFamilyClipped = 0, kFamilyCispo = 1, kFamilySapo = 2 };

// Hyper-parameters of the per-token terms: runtime op arguments, never template parameters.
struct TokenTerms {
  int64_t family = kFamilyClipped;
  float lo = 0.8f;          // 1 - epsilon_low
  float hi = 1.2f;          // 1 + epsilon_high
  float cispo_max = 0.2f;   // CISPO's cap on the ratio (TRL clamps at epsilon_high itself)
  bool has_delta = false;   // two-sided clipping: the unclipped branch's ratio capped at delta
  float delta = 0.0f;
  float beta = 0.0f;        // KL coefficient; 0: no KL term and ref_logp is never read
  bool bias_correction_kl = true;
  float tau_pos = 1.0f;     // SAPO temperatures for positive / non-positive advantages
  float tau_neg = 1.05f;
};

GF_TOKEN_HD float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

// The importance ratio exp(logp - old), 1 on-policy (no old log-probs).
GF_TOKEN_HD float token_ratio(float logp, float old, bool has_old) { return has_old ? expf(logp - old) : 1.0f; }

// d loss_t / d logp_t (unweighted) of TRL's per-token loss; objective.token_grad branch for branch.
GF_TOKEN_HD float dloss_dlogp(float logp, float old, float ref, float adv, bool has_old, const TokenTerms& t) {
  const float ratio = token_ratio(logp, old, has_old);
  float d;
  if (t.family == kFamilyCispo) {  // the clamped ratio is detached: only logp's own factor counts
    d = -fminf(ratio, t.cispo_max) * adv;
  } else if (t.family == kFamilySapo) {
    const float tau = adv > 0.0f ? t.tau_pos : t.tau_neg;
    const float s = sigmoid_f(tau * (ratio - 1.0f));
    d = -adv * 4.0f * s * (1.0f - s) * ratio;
  } else {
    const float c1 = t.has_delta ? fminf(ratio, t.delta) : ratio;
    const float c2 = fminf(fmaxf(ratio, t.lo), t.hi);
    const float a = c1 * adv;
    const float b = c2 * adv;
    const float tie = a == b ? 0.5f : 0.0f;
    const float ga = (a < b ? 1.0f : 0.0f) + tie;
    const float gb = (a > b ? 1.0f : 0.0f) + tie;
    const float dc1 = t.has_delta ? (ratio <= t.delta ? ratio : 0.0f) : ratio;
    const float dc2 = (ratio >= t.lo && ratio <= t.hi) ? ratio : 0.0f;
    d = -(ga * dc1 + gb * dc2) * adv;
  }
  if (t.beta != 0.0f) {  // k3 KL exp(ref - logp) - (ref - logp) - 1, times the ratio with bias correction
    const float diff = ref - logp;
    const float e = expf(diff);
    float dkl = 1.0f - e;
    if (t.bias_correction_kl) dkl = (dkl + (e - diff - 1.0f)) * ratio;
    d = d + t.beta * dkl;
  }
  return d;
}

// What token_loss writes per token (rows of its [5, N] output).
struct TokenLoss {
  float loss = 0.0f;  // TRL's per_token_loss (KL term included when beta != 0), unweighted
  float kl = 0.0f;    // the k3 KL (times the ratio with bias correction); 0 when beta == 0
  float low = 0.0f;   // 1 where the ratio is clipped below with a negative advantage (clipped family)
  float high = 0.0f;  // 1 where clipped above with a positive advantage (clipped; cispo: its clip)
};

// TRL's per-token loss for token-level ratios; objective.per_token_objective.
GF_TOKEN_HD TokenLoss token_loss(float logp, float old, float ref, float adv, bool has_old, const TokenTerms& t) {
  TokenLoss out;
  const float ratio = token_ratio(logp, old, has_old);
  if (t.beta != 0.0f) {
    const float diff = ref - logp;
    out.kl = expf(diff) - diff - 1.0f;
    if (t.bias_correction_kl) out.kl *= ratio;
  }
  if (t.family == kFamilyCispo) {
    out.loss = -fminf(ratio, t.cispo_max) * adv * logp;
    out.high = (ratio > t.cispo_max && adv > 0.0f) ? 1.0f : 0.0f;
  } else if (t.family == kFamilySapo) {
    const float tau = adv > 0.0f ? t.tau_pos : t.tau_neg;
    out.loss = -sigmoid_f(tau * (ratio - 1.0f)) * 4.0f / tau * adv;
  } else {
    const float c2 = fminf(fmaxf(ratio, t.lo), t.hi);
    const float c1 = t.has_delta ? fminf(ratio, t.delta) : ratio;
    out.loss = -fminf(c1 * adv, c2 * adv);
    out.low = (c1 < t.lo && adv < 0.0f) ? 1.0f : 0.0f;
    out.high = (c1 > t.hi && adv > 0.0f) ? 1.0f : 0.0f;
  }
  if (t.beta != 0.0f) out.loss += t.beta * out.kl;
  return out;
}

}  // namespace grpo_fast
