// CPU kernels of the chunk ops: row-wise softmax work on one [C, V] logits tile (fp32/bf16/fp16 in,
// fp32 math). Rows are spread over threads (at::parallel_for: torch's OpenMP pool, static blocks of rows,
// so torch.set_num_threads applies); within a row the vocabulary is walked in L1-sized blocks:
//   pass 1 (online softmax): block max, one rescale of the running (m, s, u) when the max grows, then
//          e = exp(z - m) once per element, reused for s = sum e and u = sum e * (z - m);
//   pass 2 (chunk_grad): dlogits = g * (onehot - p) / T with p = exp(z - lse), minus e * p * (log p + H) / T
//          when the entropy term is on (chosen once per row), written over the tile. lse comes in fp64 and is
//          split into two floats, log p = (z - hi) - lo: an fp32 lse is rounded at |lse| (~|z|), and that
//          rounding would shift every p of the row; log_softmax's p = exp((z - m) - log s) has no such error.
// So the tile is read once for the statistics and once more (read + write) for the gradient. The inner
// loops are branch-free float loops (a polynomial exp, selects instead of branches) that the compiler
// vectorizes; on x86 they are compiled three times (AVX-512, AVX2+FMA, baseline) and picked at load
// (target_clones). AVX-512 halves the time of both passes where the CPU has it (2 cores, [768, 32768] fp32:
// stats 13.0 -> 8.7 ms, dlogits 23.8 -> 10.2 ms).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../chunk_check.h"
#include "../ops.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define GF_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GF_MULTIVERSION
#endif

namespace grpo_fast {
namespace {

// Vocabulary columns per block: 8 KiB of fp32, so a block stays in L1 between its max and exp loops.
constexpr int64_t kBlock = 2048;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 88 (here: shifted logits, x <= 0), branch-free so loops over it vectorize: Cephes' expf
// (range reduction by ln 2, degree-6 polynomial, about 1 ulp), 2^n from the exponent bits. Below -87
// (and for -inf, masked vocabulary) it returns exactly 0, as the true value underflows there anyway.
inline float exp_neg(float x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float lo = x < -87.0f ? -87.0f : x;
  const float xc = lo > 88.0f ? 88.0f : lo;
  const float t = xc * 1.44269504088896341f + magic;
  int32_t t_bits;
  std::memcpy(&t_bits, &t, sizeof(t_bits));
  const float n = t - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  // n is in [-126, 127]: its bits above the magic's are the integer; shift them into the exponent.
  const int32_t e_bits = (t_bits - 0x4B400000 + 127) << 23;
  float scale;
  std::memcpy(&scale, &e_bits, sizeof(scale));
  const float keep = x < -87.0f ? 0.0f : 1.0f;  // a select of constants: the loops stay branch-free
  return p * scale * keep;
}

// Running softmax statistics of a row of scaled logits z = x / T: m = max z, s = sum exp(z - m),
// u = sum exp(z - m) * (z - m). Keeping u relative to m makes the entropy log s - u / s a sum of two
// non-negative terms (no cancellation). Rescaling to a larger max m' (r = exp(m - m')): s' = r s,
// u' = r (u + s (m - m')).
struct RowStats {
  float m = kNegInf;
  float s = 0.0f;
  float u = 0.0f;
};

// The scaled logits of a block, z = x / T, written to z (may alias x) once for all the loops over the block:
// the max, the exps and the gradient see the same z, so p of a row's top logit is exactly exp(z - lse) of one
// z. Divided as torch divides (x / float(T)), not multiplied by 1 / T: fl(1 / T) carries one relative
// rounding into every logit of every row alike, an error the tokens of the weight gradient do not average
// out (3-5x PyTorch's gradient error at T = 0.7). Where 1 / T is exact (T a power of two) the product is the
// same number, and cheaper.
struct Scale {
  float t;
  float inv_t;
  bool divide;
};

inline Scale make_scale(double temperature) {
  const float t = static_cast<float>(temperature);
  const float inv_t = 1.0f / t;
  return {t, inv_t, static_cast<double>(inv_t) * static_cast<double>(t) != 1.0};
}

inline float scaled(float x, const Scale& sc) { return sc.divide ? x / sc.t : x * sc.inv_t; }

GF_MULTIVERSION void scale_block(const float* x, float* z, int64_t n, Scale sc) {
  if (sc.divide) {
    const float t = sc.t;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) z[i] = x[i] / t;
  } else {
    const float inv_t = sc.inv_t;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) z[i] = x[i] * inv_t;
  }
}

// scale_block, and the block's max z (in the same loop: a max loop of its own over z did not vectorize).
GF_MULTIVERSION float scale_max_block(const float* x, float* z, int64_t n, Scale sc) {
  float bm = kNegInf;
  if (sc.divide) {
    const float t = sc.t;
#pragma omp simd reduction(max : bm)
    for (int64_t i = 0; i < n; ++i) {
      const float v = x[i] / t;
      z[i] = v;
      bm = std::max(bm, v);
    }
  } else {
    const float inv_t = sc.inv_t;
#pragma omp simd reduction(max : bm)
    for (int64_t i = 0; i < n; ++i) {
      const float v = x[i] * inv_t;
      z[i] = v;
      bm = std::max(bm, v);
    }
  }
  return bm;
}

// Folds the scaled logits z[0:n], whose max is bm, into `st`.
GF_MULTIVERSION void fold_block(const float* z, int64_t n, float bm, RowStats* st) {
  if (bm > st->m) {
    if (st->s > 0.0f) {
      const float shift = st->m - bm;
      const float r = std::exp(shift);
      st->u = r * (st->u + st->s * shift);
      st->s = r * st->s;
    }
    st->m = bm;
  }
  if (st->m == kNegInf) return;  // nothing but -inf so far: every exp is 0
  const float m = st->m;
  float bs = 0.0f;
  float bu = 0.0f;
#pragma omp simd reduction(+ : bs, bu)
  for (int64_t i = 0; i < n; ++i) {
    const float d = z[i] - m;
    const float e = exp_neg(d);
    bs += e;
    bu += e > 0.0f ? e * d : 0.0f;  // e > 0 keeps -inf logits from making 0 * -inf
  }
  st->s += bs;
  st->u += bu;
}

// A row's logsumexp as two floats, lse = hi + lo: log p = (z - hi) - lo is exact but for its own last rounding
// (z - hi is exact for the logits near the max, whose p matter).
struct Lse {
  float hi;
  float lo;
};

inline Lse split_lse(double lse) {
  const float hi = static_cast<float>(lse);
  return {hi, std::isfinite(hi) ? static_cast<float>(lse - static_cast<double>(hi)) : 0.0f};
}

// out[i] = -scale * exp(z[i] - lse): the softmax part of dlogits (out may alias z).
GF_MULTIVERSION void softmax_grad_block(const float* z, float* out, int64_t n, Lse lse, float scale) {
  const float neg = -scale;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = neg * exp_neg((z[i] - lse.hi) - lse.lo);
}

// Below this log p, p is exactly 0 in fp32 (exp_neg flushes from -87 on, CUDA's expf from about -103.97): the
// entropy term's coefficient clamps log p here, so masked (-inf) logits give 0 * finite = 0, not 0 * inf = NaN.
constexpr float kMinLogP = -104.0f;

// out[i] = -exp(d) * (scale + ent * (d + entropy)), d = z[i] - lse = log p: the softmax part of
// g's term and the whole entropy term (scale = g / T, ent = e / T; out may alias z).
GF_MULTIVERSION void entropy_grad_block(const float* z, float* out, int64_t n, Lse lse, float scale, float ent,
                                        float entropy) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float d = (z[i] - lse.hi) - lse.lo;
    const float dc = d < kMinLogP ? kMinLogP : d;  // a select (NaN stays NaN: p carries it anyway)
    out[i] = -exp_neg(d) * (scale + ent * (dc + entropy));
  }
}

// ---- the tile's dtype <-> fp32 blocks (branch-free loops, multiversioned like the math above)

// bf16 -> fp32 is a shift of the bits.
GF_MULTIVERSION void bf16_to_float(const uint16_t* x, float* out, int64_t n) {
  uint32_t* bits = reinterpret_cast<uint32_t*>(out);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) bits[i] = static_cast<uint32_t>(x[i]) << 16;
}

// fp32 -> bf16, round to nearest even; NaN stays a (quiet) NaN, as c10::BFloat16 does it.
GF_MULTIVERSION void float_to_bf16(const float* x, uint16_t* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &x[i], sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    out[i] = static_cast<uint16_t>(x[i] != x[i] ? 0x7FC0u : rounded);
  }
}

#if defined(__FLT16_MAX__) && (defined(__x86_64__) || defined(__aarch64__))
// IEEE half is c10::Half's layout: the compiler's _Float16 converts it (F16C instructions in the AVX2 clone).
GF_MULTIVERSION void half_to_float(const c10::Half* x, float* out, int64_t n) {
  const _Float16* h = reinterpret_cast<const _Float16*>(x);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(h[i]);
}
GF_MULTIVERSION void float_to_half(const float* x, c10::Half* out, int64_t n) {
  _Float16* h = reinterpret_cast<_Float16*>(out);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) h[i] = static_cast<_Float16>(x[i]);  // round to nearest even
}
#else
void half_to_float(const c10::Half* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(x[i]);
}
void float_to_half(const float* x, c10::Half* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<c10::Half>(x[i]);
}
#endif

// fp32 view of a block of the tile (the tile itself when it is fp32), and the way back.
template <typename T>
struct Tile;

template <>
struct Tile<float> {
  static const float* load(const float* x, int64_t, float*) { return x; }
  static float* out_block(float* x, float*) { return x; }  // dlogits are written in place
  static void store(const float*, float*, int64_t) {}
};

template <>
struct Tile<c10::BFloat16> {
  static const float* load(const c10::BFloat16* x, int64_t n, float* buf) {
    bf16_to_float(reinterpret_cast<const uint16_t*>(x), buf, n);
    return buf;
  }
  static float* out_block(c10::BFloat16*, float* buf) { return buf; }
  static void store(const float* src, c10::BFloat16* dst, int64_t n) {
    float_to_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
  }
};

template <>
struct Tile<c10::Half> {
  static const float* load(const c10::Half* x, int64_t n, float* buf) {
    half_to_float(x, buf, n);
    return buf;
  }
  static float* out_block(c10::Half*, float* buf) { return buf; }
  static void store(const float* src, c10::Half* dst, int64_t n) { float_to_half(src, dst, n); }
};

struct RowIO {
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_stride = 0;
  Scale sc{1.0f, 1.0f, false};
};

// Pass 1 over one row: its (m, s, u) and the scaled target logit (0 when the target is not in [0, V)).
template <typename T>
RowStats row_stats(const T* row, int64_t cols, Scale sc, int64_t target, float* target_z, float* buf) {
  RowStats st;
  for (int64_t start = 0; start < cols; start += kBlock) {
    const int64_t n = std::min(kBlock, cols - start);
    const float bm = scale_max_block(Tile<T>::load(row + start, n, buf), buf, n, sc);  // the tile is kept
    fold_block(buf, n, bm, &st);
  }
  const bool owned = target >= 0 && target < cols;
  *target_z = owned ? scaled(static_cast<float>(row[target]), sc) : 0.0f;
  return st;
}

// Pass 2 over one row: row = scale * (onehot(target) - p) in the tile's dtype, minus ent * p * (log p + H)
// when ENT (the entropy term; a template parameter, so the plain pass is untouched by it).
template <bool ENT, typename T>
void row_grad(T* row, int64_t cols, Scale sc, int64_t target, Lse lse, float scale, float ent, float entropy,
              float* buf) {
  for (int64_t start = 0; start < cols; start += kBlock) {
    const int64_t n = std::min(kBlock, cols - start);
    scale_block(Tile<T>::load(row + start, n, buf), buf, n, sc);
    float* out = Tile<T>::out_block(row + start, buf);
    if constexpr (ENT) {
      entropy_grad_block(buf, out, n, lse, scale, ent, entropy);
    } else {
      softmax_grad_block(buf, out, n, lse, scale);
    }
    if (target >= start && target < start + n) out[target - start] += scale;  // as torch: -s p + s
    Tile<T>::store(out, row + start, n);
  }
}

// at::parallel_for over rows: enough rows per task that a task is worth a thread.
template <typename F>
void for_rows(int64_t rows, int64_t cols, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kBlock];
    for (int64_t r = begin; r < end; ++r) f(r, buf);
  });
}

template <typename F>
void dispatch_tile(const at::Tensor& logits, const F& f) {
  switch (logits.scalar_type()) {
    case at::kFloat:
      f(static_cast<float*>(nullptr));
      break;
    case at::kBFloat16:
      f(static_cast<c10::BFloat16*>(nullptr));
      break;
    case at::kHalf:
      f(static_cast<c10::Half*>(nullptr));
      break;
    default:
      TORCH_CHECK(false, "grpo_fast: unsupported tile dtype ", logits.scalar_type());
  }
}

RowIO row_io(const at::Tensor& logits, double temperature) {
  RowIO io;
  io.rows = logits.size(0);
  io.cols = logits.size(1);
  io.row_stride = logits.size(0) > 1 ? logits.stride(0) : logits.size(1);
  io.sc = make_scale(temperature);
  return io;
}

void stats_impl(const char* op, const at::Tensor& logits, const at::Tensor& targets, double temperature,
                at::Tensor& out, bool partial) {
  check_tile_inputs(op, logits, targets, temperature, c10::DeviceType::CPU);
  check_out(op, out, partial ? 4 : 3, logits.size(0), logits, /*wide=*/!partial);
  const RowIO io = row_io(logits, temperature);
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  const bool wide = out.scalar_type() == at::kDouble;
  float* o = wide ? nullptr : out.mutable_data_ptr<float>();
  double* o64 = wide ? out.mutable_data_ptr<double>() : nullptr;
  dispatch_tile(logits, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* base = static_cast<const T*>(logits.const_data_ptr());
    for_rows(io.rows, io.cols, [&](int64_t r, float* buf) {
      float t = 0.0f;
      const RowStats st = row_stats(base + r * io.row_stride, io.cols, io.sc, tgt[r], &t, buf);
      if (partial) {
        o[r] = st.m;
        o[io.rows + r] = st.s;
        o[2 * io.rows + r] = st.u;
        o[3 * io.rows + r] = t;
      } else {
        const float log_s = std::log(st.s);
        // (t - m) - log s, not t - lse: lse is rounded at its own magnitude, an extra rounding of log p
        // that log_softmax does not have (1.3x its error per token, summed over a sequence by GSPO/VESPO).
        const float logp = (t - st.m) - log_s;
        const float entropy = log_s - st.u / st.s;
        if (wide) {  // lse unrounded (m + log s is exact in fp64): chunk_grad's p carry no rounding of it
          o64[r] = static_cast<double>(st.m) + static_cast<double>(log_s);
          o64[io.rows + r] = logp;
          o64[2 * io.rows + r] = entropy;
        } else {
          o[r] = st.m + log_s;
          o[io.rows + r] = logp;
          o[2 * io.rows + r] = entropy;
        }
      }
    });
  });
}

}  // namespace

void chunk_stats_cpu(const at::Tensor& logits, const at::Tensor& targets, double temperature, at::Tensor& out) {
  stats_impl("chunk_stats", logits, targets, temperature, out, /*partial=*/false);
}

void chunk_partial_stats_cpu(const at::Tensor& logits, const at::Tensor& targets, double temperature,
                             at::Tensor& out) {
  stats_impl("chunk_partial_stats", logits, targets, temperature, out, /*partial=*/true);
}

void chunk_grad_cpu(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& g,
                    double temperature, const std::optional<at::Tensor>& ent_coef,
                    const std::optional<at::Tensor>& entropy) {
  const char* op = "chunk_grad";
  check_tile_inputs(op, logits, targets, temperature, c10::DeviceType::CPU);
  const bool ent = check_grad_inputs(op, logits, lse, g, ent_coef, entropy);
  const RowIO io = row_io(logits, temperature);
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  const at::Tensor lse64 = lse.to(at::kDouble);  // [C]: no copy when it already is fp64
  const double* lse_p = lse64.const_data_ptr<double>();
  const float* g_p = g.const_data_ptr<float>();
  const float* e_p = ent ? ent_coef->const_data_ptr<float>() : nullptr;
  const float* h_p = ent ? entropy->const_data_ptr<float>() : nullptr;
  dispatch_tile(logits, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    T* base = static_cast<T*>(logits.mutable_data_ptr());
    for_rows(io.rows, io.cols, [&](int64_t r, float* buf) {
      T* row = base + r * io.row_stride;
      const float scale = scaled(g_p[r], io.sc);
      const Lse l = split_lse(lse_p[r]);
      if (ent) {
        row_grad<true>(row, io.cols, io.sc, tgt[r], l, scale, scaled(e_p[r], io.sc), h_p[r], buf);
      } else {
        row_grad<false>(row, io.cols, io.sc, tgt[r], l, scale, 0.0f, 0.0f, buf);
      }
    });
  });
}

}  // namespace grpo_fast
