// Flash attention for CPUs, forward and backward, as XLA FFI custom calls.
//
// XLA:CPU has no fused attention: written in jnp, attention becomes a loop of small GEMMs and
// elementwise ops that XLA runs one after another and cannot spread over its threads. This is
// the FlashAttention-2 algorithm on 64 x 64 tiles, written with GCC/Clang vector extensions
// (AVX2/AVX-512 on x86, NEON on ARM; the compiler picks from -march=native), parallel over
// XLA's own intra-op thread pool. `llm/kernels/cpu_attention.py` compiles it, registers it and
// wraps it in a custom_vjp; the semantics are `llm.kernels.reference.mha_reference`'s.
//
// Layouts (row-major, fp32):
//   q, out, dq, dout  [batch, seq, heads, head_dim]
//   k, v, dk, dv      [batch, seq, kv_heads, head_dim]    (GQA: heads % kv_heads == 0)
//   q_seg, kv_seg     [batch, seq] int32                  (attend only within a segment)
//   lse               [batch, heads, seq]                 (log-sum-exp of each query row)
// Self-attention only (q and kv have the same length); causal or bidirectional.
//
// Forward: one task per (batch, head, 64-query block); it walks the key blocks left to right
// (stopping at the causal diagonal, skipping blocks whose segment ranges cannot meet) with an
// online softmax, and writes the normalised output and lse.
// Backward: one task per (batch, kv head). For each key block it walks the query blocks that
// can see it, recomputes P = exp(S - lse) and accumulates dV += P^T dO, dK += dS^T Q in the
// block and dQ += dS K in a per-task buffer, so no two tasks write the same memory.
// Every task's arithmetic is in a fixed order, so results are bitwise reproducible whatever
// the thread count.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 64;  // query and key rows per tile
constexpr int kLanes = 8;       // floats per vector
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
inline vec splat(float x) { return vec{x, x, x, x, x, x, x, x}; }  // kLanes copies

// Rows i..i+R of C[m][n] (+)= sum_k A[m][k] B[k][n] (A[k][m] when TransA): an R x 16 tile
// of C stays in 2R vector registers while k runs.
template <int R, bool TransA>
inline void gemm_rows(int64_t i, int64_t N, int64_t K, const float* A, int64_t lda,
                      const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < N; j += 2 * kLanes) {
    vec c[R][2];
    for (int r = 0; r < R; ++r) {
      c[r][0] = accumulate ? load(C + (i + r) * ldc + j) : vec{};
      c[r][1] = accumulate ? load(C + (i + r) * ldc + j + kLanes) : vec{};
    }
    for (int64_t k = 0; k < K; ++k) {
      const vec b0 = load(B + k * ldb + j), b1 = load(B + k * ldb + j + kLanes);
      for (int r = 0; r < R; ++r) {
        const vec a = splat(TransA ? A[k * lda + i + r] : A[(i + r) * lda + k]);
        c[r][0] += a * b0;
        c[r][1] += a * b1;
      }
    }
    for (int r = 0; r < R; ++r) {
      store(C + (i + r) * ldc + j, c[r][0]);
      store(C + (i + r) * ldc + j + kLanes, c[r][1]);
    }
  }
}

// C[m][n] (+)= sum_k A[m][k] B[k][n] for m < M, n < N (A[k][m] when TransA); leading
// dimensions in floats; M % 2 == 0, N % 16 == 0. Six-row tiles (12 accumulators, the most
// that leave registers for the operands on AVX2), then the rest two rows at a time.
template <bool TransA>
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) gemm_rows<6, TransA>(i, N, K, A, lda, B, ldb, C, ldc, accumulate);
  for (; i + 2 <= M; i += 2) gemm_rows<2, TransA>(i, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));

// exp(x) lane by lane, to ~1 ulp for x in [-87, 88] (Cephes expf: 2^n e^r, |r| <= ln2/2);
// inputs below -87 give exp(-87), so callers mask what must be exactly 0.
inline vec exp_vec(vec x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  x = x > 88.0f ? splat(88.0f) : x;
  const vec magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vec n = (x * 1.44269504088896341f + magic) - magic;
  const vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// row[c] = exp(row[c] - shift) for c < kBlock, 0 where row[c] is -inf; returns the sum.
inline float exp_row(float* row, float shift) {
  vec sum{};
  for (int64_t c = 0; c < kBlock; c += kLanes) {
    const vec x = load(row + c);
    const vec e = x == -INFINITY ? vec{} : exp_vec(x - shift);
    store(row + c, e);
    sum += e;
  }
  float total = 0.0f;
  for (int i = 0; i < kLanes; ++i) total += sum[i];
  return total;
}

inline float max_row(const float* row, float init) {
  vec m = splat(init);
  for (int64_t c = 0; c < kBlock; c += kLanes) {
    const vec x = load(row + c);
    m = x > m ? x : m;
  }
  float best = init;
  for (int i = 0; i < kLanes; ++i) best = std::max(best, m[i]);
  return best;
}

// Runs fn(i) for i in [0, n) on the caller and up to num_threads - 1 pool threads. Items are
// claimed from a shared counter, so the caller alone finishes the work if the pool is busy; a
// pool task that starts after everything is claimed touches only the shared state.
template <typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const Fn& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto run = [state, n, &fn] {
    int64_t finished = 0;
    for (int64_t i; (i = state->next.fetch_add(1)) < n; ++finished) fn(i);
    if (finished && state->done.fetch_add(finished) + finished == n) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([run] { run(); });
  run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

struct Dims {
  int64_t batch, seq, heads, kv_heads, head_dim;
  int64_t blocks() const { return (seq + kBlock - 1) / kBlock; }
  int64_t group() const { return heads / kv_heads; }
};

// Which (query, key) pairs of a tile are allowed, and whether the tile can be skipped.
struct Mask {
  const int32_t* q_seg;   // [seq] of this batch row, or null
  const int32_t* kv_seg;  // [seq], or null
  bool causal;
  int64_t seq;

  bool allowed(int64_t qp, int64_t kp) const {
    if (kp >= seq || qp >= seq) return false;
    if (causal && kp > qp) return false;
    return !q_seg || q_seg[qp] == kv_seg[kp];
  }
  // False only if no pair of the tile is allowed.
  bool may_attend(int64_t q0, int64_t k0) const {
    if (causal && k0 > std::min(q0 + kBlock, seq) - 1) return false;
    if (!q_seg) return true;
    int32_t qlo = INT32_MAX, qhi = INT32_MIN, klo = INT32_MAX, khi = INT32_MIN;
    for (int64_t p = q0; p < std::min(q0 + kBlock, seq); ++p)
      qlo = std::min(qlo, q_seg[p]), qhi = std::max(qhi, q_seg[p]);
    for (int64_t p = k0; p < std::min(k0 + kBlock, seq); ++p)
      klo = std::min(klo, kv_seg[p]), khi = std::max(khi, kv_seg[p]);
    return qlo <= khi && klo <= qhi;
  }
  // True if every pair of the tile is allowed (no per-element mask needed).
  bool full(int64_t q0, int64_t k0) const {
    if (q0 + kBlock > seq || k0 + kBlock > seq) return false;
    if (causal && k0 + kBlock - 1 > q0) return false;
    if (!q_seg) return true;
    const int32_t s = q_seg[q0];
    for (int64_t p = 0; p < kBlock; ++p)
      if (q_seg[q0 + p] != s || kv_seg[k0 + p] != s) return false;
    return true;
  }
};

// Copies rows [row0, row0 + kBlock) of head `h` of x [seq, heads_x, head_dim] (one batch row)
// into dst [kBlock][head_dim] times `scale`, zero past the end.
void pack_rows(const float* x, int64_t heads_x, int64_t h, int64_t row0, const Dims& d,
               float scale, float* dst) {
  for (int64_t r = 0; r < kBlock; ++r) {
    float* out = dst + r * d.head_dim;
    if (row0 + r >= d.seq) {
      std::fill(out, out + d.head_dim, 0.0f);
      continue;
    }
    const float* in = x + ((row0 + r) * heads_x + h) * d.head_dim;
    for (int64_t c = 0; c < d.head_dim; ++c) out[c] = in[c] * scale;
  }
}

// dst [head_dim][kBlock] = the transpose of pack_rows' block (scale 1).
void pack_cols(const float* x, int64_t heads_x, int64_t h, int64_t row0, const Dims& d,
               float* dst) {
  for (int64_t r = 0; r < kBlock; ++r) {
    const bool in_range = row0 + r < d.seq;
    const float* in = x + ((row0 + r) * heads_x + h) * d.head_dim;
    for (int64_t c = 0; c < d.head_dim; ++c) dst[c * kBlock + r] = in_range ? in[c] : 0.0f;
  }
}

void forward(ffi::ThreadPool& pool, const Dims& d, const float* q, const float* k,
             const float* v, const int32_t* q_seg, const int32_t* kv_seg, bool causal,
             float scale, float* out, float* lse) {
  const int64_t nb = d.blocks(), hd = d.head_dim, padded = nb * kBlock;
  // K^T and V of each (batch, kv head), packed once: kt_all [b][kvh][block][hd][kBlock],
  // v_all [b][kvh][padded][hd], so every tile reads contiguous operands.
  std::vector<float> kt_all(d.batch * d.kv_heads * padded * hd);
  std::vector<float> v_all(kt_all.size());
  parallel_for(pool, d.batch * d.kv_heads * nb, [&](int64_t task) {
    const int64_t kb = task % nb, kvh = task / nb % d.kv_heads, b = task / nb / d.kv_heads;
    const int64_t at = ((b * d.kv_heads + kvh) * padded + kb * kBlock) * hd;
    pack_cols(k + b * d.seq * d.kv_heads * hd, d.kv_heads, kvh, kb * kBlock, d,
              kt_all.data() + at);
    pack_rows(v + b * d.seq * d.kv_heads * hd, d.kv_heads, kvh, kb * kBlock, d, 1.0f,
              v_all.data() + at);
  });
  // Heaviest (last) query blocks first, so the causal imbalance evens out across threads.
  parallel_for(pool, d.batch * d.heads * nb, [&](int64_t task) {
    const int64_t qb = nb - 1 - task % nb, h = task / nb % d.heads, b = task / nb / d.heads;
    const int64_t kvh = h / d.group(), q0 = qb * kBlock;
    const Mask mask{q_seg ? q_seg + b * d.seq : nullptr, kv_seg ? kv_seg + b * d.seq : nullptr,
                    causal, d.seq};
    std::vector<float> buf(kBlock * hd * 2 + kBlock * kBlock);
    float *qs = buf.data(), *acc = qs + kBlock * hd, *s = acc + kBlock * hd;
    float m[kBlock], l[kBlock];
    std::fill(m, m + kBlock, -INFINITY);
    std::fill(l, l + kBlock, 0.0f);
    std::fill(acc, acc + kBlock * hd, 0.0f);
    pack_rows(q + b * d.seq * d.heads * hd, d.heads, h, q0, d, scale, qs);
    const int64_t head_at = (b * d.kv_heads + kvh) * padded * hd;
    for (int64_t k0 = 0; k0 < d.seq; k0 += kBlock) {
      if (!mask.may_attend(q0, k0)) {
        if (causal && k0 > q0) break;
        continue;
      }
      const float* kt = kt_all.data() + head_at + k0 * hd;  // [hd][kBlock]
      const float* vs = v_all.data() + head_at + k0 * hd;   // [kBlock][hd]
      gemm<false>(kBlock, kBlock, hd, qs, hd, kt, kBlock, s, kBlock, false);
      const bool full = mask.full(q0, k0);
      for (int64_t r = 0; r < kBlock; ++r) {
        float* row = s + r * kBlock;
        if (!full)
          for (int64_t c = 0; c < kBlock; ++c)
            if (!mask.allowed(q0 + r, k0 + c)) row[c] = -INFINITY;
        const float mx = max_row(row, m[r]);
        if (mx == -INFINITY) {  // nothing allowed in this row yet
          std::fill(row, row + kBlock, 0.0f);
          continue;
        }
        const float sum = exp_row(row, mx);
        const float alpha = m[r] == -INFINITY ? 0.0f : std::exp(m[r] - mx);
        l[r] = alpha * l[r] + sum;
        m[r] = mx;
        for (int64_t c = 0; c < hd; ++c) acc[r * hd + c] *= alpha;
      }
      gemm<false>(kBlock, hd, kBlock, s, kBlock, vs, hd, acc, hd, true);
    }
    for (int64_t r = 0; r < kBlock && q0 + r < d.seq; ++r) {
      const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
      float* o = out + ((b * d.seq + q0 + r) * d.heads + h) * hd;
      for (int64_t c = 0; c < hd; ++c) o[c] = acc[r * hd + c] * inv;
      lse[(b * d.heads + h) * d.seq + q0 + r] = l[r] > 0.0f ? m[r] + std::log(l[r]) : INFINITY;
    }
  });
}

// The backward's operands, packed once per call and shared by its tasks: per (batch, head)
// q (scaled), dO [padded][hd], lse and delta = rowsum(dO * O) [padded]; per (batch, kv head)
// k [padded][hd], k^T and v^T [block][hd][kBlock].
struct Packed {
  std::vector<float> q, dout, lse, delta, k, kt, vt;
};

Packed pack_backward(ffi::ThreadPool& pool, const Dims& d, const float* q, const float* k,
                     const float* v, float scale, const float* out, const float* lse,
                     const float* dout) {
  const int64_t nb = d.blocks(), hd = d.head_dim, padded = nb * kBlock;
  Packed pk;
  pk.q.resize(d.batch * d.heads * padded * hd);
  pk.dout.resize(pk.q.size());
  pk.lse.resize(d.batch * d.heads * padded);
  pk.delta.resize(pk.lse.size());
  pk.k.resize(d.batch * d.kv_heads * padded * hd);
  pk.kt.resize(pk.k.size());
  pk.vt.resize(pk.k.size());
  parallel_for(pool, d.batch * d.heads * nb, [&](int64_t task) {
    const int64_t qb = task % nb, h = task / nb % d.heads, b = task / nb / d.heads;
    const int64_t row = (b * d.heads + h) * padded + qb * kBlock;
    pack_rows(q + b * d.seq * d.heads * hd, d.heads, h, qb * kBlock, d, scale,
              pk.q.data() + row * hd);
    pack_rows(dout + b * d.seq * d.heads * hd, d.heads, h, qb * kBlock, d, 1.0f,
              pk.dout.data() + row * hd);
    for (int64_t r = 0; r < kBlock; ++r) {
      const int64_t pos = qb * kBlock + r;
      if (pos >= d.seq) {
        pk.delta[row + r] = 0.0f;
        pk.lse[row + r] = INFINITY;
        continue;
      }
      const float* o = out + ((b * d.seq + pos) * d.heads + h) * hd;
      const float* g = pk.dout.data() + (row + r) * hd;
      float acc = 0.0f;
      for (int64_t c = 0; c < hd; ++c) acc += o[c] * g[c];
      pk.delta[row + r] = acc;
      pk.lse[row + r] = lse[(b * d.heads + h) * d.seq + pos];
    }
    if (h % d.group() == 0) {  // once per kv head
      const int64_t kvh = h / d.group(), kv_row = (b * d.kv_heads + kvh) * padded + qb * kBlock;
      const float* kb = k + b * d.seq * d.kv_heads * hd;
      pack_rows(kb, d.kv_heads, kvh, qb * kBlock, d, 1.0f, pk.k.data() + kv_row * hd);
      pack_cols(kb, d.kv_heads, kvh, qb * kBlock, d, pk.kt.data() + kv_row * hd);
      pack_cols(v + b * d.seq * d.kv_heads * hd, d.kv_heads, kvh, qb * kBlock, d,
                pk.vt.data() + kv_row * hd);
    }
  });
  return pk;
}

// One tile of the backward: p = P = exp(S - lse) and ds = dS = P * (dP - delta), both
// [kBlock][kBlock], for query block q0 of head h and key block k0 of its kv head.
void tile_grads(const Packed& pk, const Dims& d, const Mask& mask, int64_t qrow, int64_t kvrow,
                int64_t q0, int64_t k0, float* p, float* ds) {
  const int64_t hd = d.head_dim;
  const float *qs = pk.q.data() + qrow * hd, *dos = pk.dout.data() + qrow * hd;
  gemm<false>(kBlock, kBlock, hd, qs, hd, pk.kt.data() + kvrow * hd, kBlock, p, kBlock, false);
  gemm<false>(kBlock, kBlock, hd, dos, hd, pk.vt.data() + kvrow * hd, kBlock, ds, kBlock, false);
  const bool full = mask.full(q0, k0);
  for (int64_t r = 0; r < kBlock; ++r) {
    float *prow = p + r * kBlock, *drow = ds + r * kBlock;
    const float lr = pk.lse[qrow + r], dr = pk.delta[qrow + r];
    if (lr == INFINITY) {  // a row with no allowed key (or past the end)
      std::fill(prow, prow + kBlock, -INFINITY);
    } else if (!full) {
      for (int64_t c = 0; c < kBlock; ++c)
        if (!mask.allowed(q0 + r, k0 + c)) prow[c] = -INFINITY;
    }
    exp_row(prow, lr == INFINITY ? 0.0f : lr);
    for (int64_t c = 0; c < kBlock; c += kLanes)
      store(drow + c, load(prow + c) * (load(drow + c) - dr));
  }
}

// Backward. With at least as many (batch, kv head) pairs as threads, one task per pair walks
// its key blocks and, for each, the query blocks that see it, accumulating dK, dV and dQ
// together. With fewer (a batch of one, GQA, many cores) it splits in two passes with more
// tasks: dK, dV per (batch, kv head, key block), then dQ per (batch, head, query block), which
// recomputes the tiles' P and dS. Every sum runs in the same order either way (dK, dV over the
// group's heads, then query blocks; dQ over key blocks), so the result is bitwise the same
// whatever the schedule and thread count.
void backward(ffi::ThreadPool& pool, const Dims& d, const float* q, const float* k,
              const float* v, const int32_t* q_seg, const int32_t* kv_seg, bool causal,
              float scale, const float* out, const float* lse, const float* dout, float* dq,
              float* dk, float* dv) {
  const int64_t nb = d.blocks(), hd = d.head_dim, padded = nb * kBlock;
  const Packed pk = pack_backward(pool, d, q, k, v, scale, out, lse, dout);
  auto mask_of = [&](int64_t b) {
    return Mask{q_seg ? q_seg + b * d.seq : nullptr, kv_seg ? kv_seg + b * d.seq : nullptr,
                causal, d.seq};
  };
  auto first_q = [&](int64_t k0) { return causal ? k0 : int64_t{0}; };
  // dK, dV of key block k0 of (b, kvh), accumulated in dks, dvs [kBlock][hd] over the group's
  // heads and their query blocks; when dqa is given ([group][padded][hd]), dQ too.
  auto key_block = [&](int64_t b, int64_t kvh, int64_t k0, float* dks, float* dvs, float* p,
                       float* ds, float* dqa) {
    const Mask mask = mask_of(b);
    const int64_t kvrow = (b * d.kv_heads + kvh) * padded + k0;
    for (int64_t h = kvh * d.group(); h < (kvh + 1) * d.group(); ++h) {
      for (int64_t q0 = first_q(k0); q0 < d.seq; q0 += kBlock) {
        if (!mask.may_attend(q0, k0)) continue;
        const int64_t qrow = (b * d.heads + h) * padded + q0;
        tile_grads(pk, d, mask, qrow, kvrow, q0, k0, p, ds);
        gemm<true>(kBlock, hd, kBlock, p, kBlock, pk.dout.data() + qrow * hd, hd, dvs, hd, true);
        gemm<true>(kBlock, hd, kBlock, ds, kBlock, pk.q.data() + qrow * hd, hd, dks, hd, true);
        if (dqa)
          gemm<false>(kBlock, hd, kBlock, ds, kBlock, pk.k.data() + kvrow * hd, hd,
                      dqa + ((h - kvh * d.group()) * padded + q0) * hd, hd, true);
      }
    }
  };
  auto write_kv = [&](int64_t b, int64_t kvh, int64_t k0, const float* dks, const float* dvs) {
    for (int64_t r = 0; r < kBlock && k0 + r < d.seq; ++r) {
      const int64_t at = ((b * d.seq + k0 + r) * d.kv_heads + kvh) * hd;
      std::memcpy(dk + at, dks + r * hd, sizeof(float) * hd);
      std::memcpy(dv + at, dvs + r * hd, sizeof(float) * hd);
    }
  };
  auto write_q = [&](int64_t b, int64_t h, int64_t q0, const float* dqs) {  // unscaled q
    for (int64_t r = 0; r < kBlock && q0 + r < d.seq; ++r) {
      float* o = dq + ((b * d.seq + q0 + r) * d.heads + h) * hd;
      for (int64_t c = 0; c < hd; ++c) o[c] = dqs[r * hd + c] * scale;
    }
  };
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  if (d.batch * d.kv_heads >= threads) {
    parallel_for(pool, d.batch * d.kv_heads, [&](int64_t task) {
      const int64_t kvh = task % d.kv_heads, b = task / d.kv_heads;
      std::vector<float> buf(d.group() * padded * hd + 2 * kBlock * (hd + kBlock), 0.0f);
      float *dqa = buf.data(), *dks = dqa + d.group() * padded * hd, *dvs = dks + kBlock * hd,
            *p = dvs + kBlock * hd, *ds = p + kBlock * kBlock;
      for (int64_t k0 = 0; k0 < d.seq; k0 += kBlock) {
        std::fill(dks, dks + 2 * kBlock * hd, 0.0f);
        key_block(b, kvh, k0, dks, dvs, p, ds, dqa);
        write_kv(b, kvh, k0, dks, dvs);
      }
      for (int64_t g = 0; g < d.group(); ++g)
        for (int64_t q0 = 0; q0 < d.seq; q0 += kBlock)
          write_q(b, kvh * d.group() + g, q0, dqa + (g * padded + q0) * hd);
    });
    return;
  }
  parallel_for(pool, d.batch * d.kv_heads * nb, [&](int64_t task) {
    const int64_t kb = task % nb, kvh = task / nb % d.kv_heads, b = task / nb / d.kv_heads;
    std::vector<float> buf(2 * kBlock * hd + 2 * kBlock * kBlock, 0.0f);
    float *dks = buf.data(), *dvs = dks + kBlock * hd, *p = dvs + kBlock * hd,
          *ds = p + kBlock * kBlock;
    key_block(b, kvh, kb * kBlock, dks, dvs, p, ds, nullptr);
    write_kv(b, kvh, kb * kBlock, dks, dvs);
  });
  parallel_for(pool, d.batch * d.heads * nb, [&](int64_t task) {
    const int64_t qb = nb - 1 - task % nb, h = task / nb % d.heads, b = task / nb / d.heads;
    const int64_t q0 = qb * kBlock, kvh = h / d.group(), qrow = (b * d.heads + h) * padded + q0;
    const Mask mask = mask_of(b);
    std::vector<float> buf(kBlock * hd + 2 * kBlock * kBlock, 0.0f);
    float *dqs = buf.data(), *p = dqs + kBlock * hd, *ds = p + kBlock * kBlock;
    for (int64_t k0 = 0; k0 < d.seq; k0 += kBlock) {
      if (first_q(k0) > q0 || !mask.may_attend(q0, k0)) continue;
      const int64_t kvrow = (b * d.kv_heads + kvh) * padded + k0;
      tile_grads(pk, d, mask, qrow, kvrow, q0, k0, p, ds);
      gemm<false>(kBlock, hd, kBlock, ds, kBlock, pk.k.data() + kvrow * hd, hd, dqs, hd, true);
    }
    write_q(b, h, q0, dqs);
  });
}

ffi::Error dims_of(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, Dims* d) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4)
    return ffi::Error::InvalidArgument("q and k must be [batch, seq, heads, head_dim]");
  *d = Dims{qd[0], qd[1], qd[2], kd[2], qd[3]};
  if (kd[0] != d->batch || kd[1] != d->seq || kd[3] != d->head_dim)
    return ffi::Error::InvalidArgument("k must be [batch, seq, kv_heads, head_dim] like q");
  if (d->kv_heads <= 0 || d->heads % d->kv_heads)
    return ffi::Error::InvalidArgument("heads must be a multiple of kv_heads");
  if (d->head_dim % 16)
    return ffi::Error::InvalidArgument("head_dim must be a multiple of 16");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_seg,
                   ffi::Buffer<ffi::S32> kv_seg, int32_t causal, int32_t segments, float scale,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Dims d;
  if (auto e = dims_of(q, k, &d); e.failure()) return e;
  forward(pool, d, q.typed_data(), k.typed_data(), v.typed_data(),
          segments ? q_seg.typed_data() : nullptr, segments ? kv_seg.typed_data() : nullptr,
          causal != 0, scale, out->typed_data(), lse->typed_data());
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_seg,
                    ffi::Buffer<ffi::S32> kv_seg, int32_t causal, int32_t segments,
                    float scale, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Dims d;
  if (auto e = dims_of(q, k, &d); e.failure()) return e;
  backward(pool, d, q.typed_data(), k.typed_data(), v.typed_data(),
           segments ? q_seg.typed_data() : nullptr, segments ? kv_seg.typed_data() : nullptr,
           causal != 0, scale, out.typed_data(), lse.typed_data(), dout.typed_data(),
           dq->typed_data(), dk->typed_data(), dv->typed_data());
  return ffi::Error::Success();
}

}  // namespace

// Both calls take q, k, v, the segment ids and the three attributes first.
static auto BindInputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()  // q
      .Arg<ffi::Buffer<ffi::F32>>()  // k
      .Arg<ffi::Buffer<ffi::F32>>()  // v
      .Arg<ffi::Buffer<ffi::S32>>()  // q_seg
      .Arg<ffi::Buffer<ffi::S32>>()  // kv_seg
      .Attr<int32_t>("causal")
      .Attr<int32_t>("segments")
      .Attr<float>("scale");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmFlashAttentionForward, Forward,
                              BindInputs()
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmFlashAttentionBackward, Backward,
                              BindInputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // out
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dout
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dv
