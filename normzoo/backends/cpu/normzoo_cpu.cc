// normzoo's CPU kernels: normalization statistics, normalization and affine in one call.
//
// XLA:CPU emits a reduction along the contiguous (minor) axis as a serial loop, several
// times slower than a copy of x (docs/performance.md). These kernels reduce
// with vector instructions on XLA's intra-op thread pool: the row kernel reads each row
// from memory once (its two reductions and the output run from L1 cache), the grouped one
// reads x twice (the channel moments, then the output; for InstanceNorm and GroupNorm one
// sample's slab is often still in L2 cache the second time).
//
// Two handlers, registered with XLA's FFI (normzoo/backends/cpu/library.py). Their
// buffers are read flat, whatever their shape; attributes give the view:
//
//   normzoo_row_norm (features = F):  x (R, F) -> y (R, F), mean (R), var (R)
//     statistics of each row over its F features (LayerNorm, RMSNorm);
//   normzoo_grouped_norm (batch = B, channels = C, group_size = k):
//     x (B, M, C) -> y (B, M, C), mean (B, C / k), var (B, C / k)
//     statistics per (b, group of k channels) over M x k elements (BatchNorm: B = 1,
//     k = 1; InstanceNorm: k = 1; GroupNorm: k = C / groups).
//
// Both compute y = (x - mean) * (r * scale) + bias with r = 1 / sqrt(var + eps), the order
// of flax.linen's arithmetic, scale and bias float32 vectors over the features/channels.
// With centered = false, mean = 0 and var is the mean square (RMSNorm). Statistics are
// float32, exact to rounding when |mean| >> std: a row is summed once, shifted by its first
// element (rows where that element lies over 8 std out are reduced again in two exact
// passes from L1), lane sums added in double; channel moments of blocks of 256 rows (one
// pass shifted by a center near the mean, two exact passes where it is over 4 std off)
// merge with Chan, Golub & LeVeque's parallel formula in double. x and y are float32 or
// bfloat16; with AVX512-BF16, bfloat16 rows and blocks whose mean is within 1 (rows) or 2
// (blocks) std of 0 are summed unshifted by dot-product instructions, without widening.
// A third forward handler, normzoo_channel_affine (channels = C): x (M, C) -> y, the
// output pass alone with given per-channel shift, mul and bias (BatchNorm at inference).
//
// Outputs not written over x, of kernels that move at least 32 MiB, go to memory with
// non-temporal stores (write_output). The backward kernels (gx and the params' gradients;
// `frozen` for given statistics) are described at "backward passes" below.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using bf16_bits = uint16_t;

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const bf16_bits* p, int64_t i) {
  uint32_t u = uint32_t(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(bf16_bits* p, int64_t i, float v) {
  // Round to nearest even, as XLA's convert; NaN stays a (quiet) NaN.
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x40u;
  p[i] = bf16_bits((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

// Runs f(i) for i in [0, n) on the caller and the XLA:CPU intra-op thread pool. Items are
// claimed from a shared counter and the caller waits for items, not for workers, so a
// pool busy elsewhere (or of one thread, the caller's own) cannot deadlock: a worker that
// starts late finds no items left. The state lives on the heap for such late workers.
template <typename Pool, typename F>
void parallel_for(Pool& pool, int64_t n, const F& f) {
  int64_t workers = std::min<int64_t>(n, std::max<int64_t>(1, pool.num_threads()));
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
  };
  auto state = std::make_shared<State>();
  const F* body = &f;
  auto drain = [state, body, n]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      (*body)(i);
      state->finished.fetch_add(1, std::memory_order_release);
    }
  };
  // A late worker touches only `state` (shared) and `body` after checking `next`, which
  // is exhausted by then; `body` is not called again, so its lifetime is not needed.
  for (int64_t w = 1; w < workers; ++w) {
    auto task = drain;
    pool.Schedule(std::move(task));
  }
  drain();
  while (state->finished.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Vectors of kLanes floats (GCC/Clang vector extensions: the compiler picks the ISA).
#ifndef NZ_LANES
#define NZ_LANES 16
#endif
constexpr int kLanes = NZ_LANES;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint16_t vhalf __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t vword __attribute__((vector_size(kLanes * sizeof(uint32_t))));

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vfloat vload(const bf16_bits* p) {
#if defined(__AVX512F__) && NZ_LANES == 16
  // One widening load (vpmovzxwd) and a shift: GCC's code for the conversion below, tuned
  // for 256-bit vectors on AMD Zen 4, takes five instructions (two half widenings, an
  // extract, an insert, the shift), and a bfloat16 output pass 1.6 ns per 16 elements.
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return vfloat(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
#else
  vhalf h;
  std::memcpy(&h, p, sizeof h);
  vword w = __builtin_convertvector(h, vword) << 16;
  vfloat v;
  std::memcpy(&v, &w, sizeof v);
  return v;
#endif
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
inline void vstore(bf16_bits* p, vfloat v) {  // round to nearest even; NaN stays NaN
#if defined(__AVX512BF16__) && NZ_LANES == 16
  // One instruction, round to nearest even; unlike XLA it flushes denormals (|y| < 1e-38)
  // to zero, which a normalized output does not reach in practice.
  __m256bh packed = _mm512_cvtneps_pbh(__m512(v));
  std::memcpy(p, &packed, sizeof packed);
#elif defined(__AVX512F__) && NZ_LANES == 16
  // AVX-512 without BF16 (e.g. Intel Ice Lake): the rounding below in mask registers and
  // one vpmovdw narrowing (GCC's code for the generic version permutes words and spills:
  // 2.7 ns per 16 elements of a bfloat16 output pass on AMD Zen 4 built without BF16).
  const __m512i w = _mm512_castps_si512(__m512(v));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(w, 16), _mm512_set1_epi32(1));
  __m512i bits = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(w, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(
      _mm512_and_si512(w, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  bits = _mm512_mask_or_epi32(bits, nan, _mm512_srli_epi32(w, 16), _mm512_set1_epi32(0x40));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bits));
#else
  vword w;
  std::memcpy(&w, &v, sizeof w);
  vword rounded = (w + 0x7fffu + ((w >> 16) & 1u)) >> 16;
  vword is_nan = (w & 0x7fffffffu) > 0x7f800000u;  // all ones where NaN
  vword bits = (rounded & ~is_nan) | (((w >> 16) | 0x40u) & is_nan);
  vhalf h = __builtin_convertvector(bits, vhalf);
  std::memcpy(p, &h, sizeof h);
#endif
}

// Non-temporal stores for outputs much larger than the cache (write_output): the line is
// written without first being read into the cache (a plain store's read-for-ownership),
// one stream of memory traffic fewer. Aligned addresses only (see write_output).
#if defined(__AVX512F__) && NZ_LANES == 16
constexpr bool kCanStream = true;
inline void vstream(float* p, vfloat v) { _mm512_stream_ps(p, __m512(v)); }
inline void vstream(bf16_bits* p, vfloat v) {
#if defined(__AVX512BF16__)
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), __m256i(_mm512_cvtneps_pbh(__m512(v))));
#else
  vhalf h;
  bf16_bits tmp[kLanes];
  vstore(tmp, v);
  std::memcpy(&h, tmp, sizeof h);
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), __m256i(h));
#endif
}
inline void stream_fence() { _mm_sfence(); }
#else
constexpr bool kCanStream = false;
template <typename U>
inline void vstream(U* p, vfloat v) { vstore(p, v); }
inline void stream_fence() {}
#endif

template <typename U>
inline void vput(U* p, vfloat v, bool stream) {
  if (stream) vstream(p, v);
  else vstore(p, v);
}

// Whether a kernel writes its output y (rows of row_elems) with non-temporal stores: where
// y is not x (in place, y's lines are in cache already), every row starts on a 64-byte
// boundary, and the kernel moves at least kStreamBytes (its inputs and y: `traffic`), the
// last-level cache of this project's machines (32 MiB), so that y's lines would leave the
// cache before anyone reads them (measurements: docs/performance.md). Each item that
// streams ends with stream_fence(), before parallel_for counts it finished.
#ifndef NZ_STREAM_BYTES
#define NZ_STREAM_BYTES (32 << 20)
#endif
constexpr int64_t kStreamBytes = NZ_STREAM_BYTES;
template <typename U>
bool write_output(const U* y, const void* x, int64_t row_elems, int64_t traffic) {
  const int64_t row_bytes = row_elems * int64_t(sizeof(U));
  return kCanStream && static_cast<const void*>(y) != x &&
         reinterpret_cast<uintptr_t>(y) % 64 == 0 && row_bytes % 64 == 0 &&
         traffic >= kStreamBytes;
}

// y[j] = (x[j] - shift[j]) * (r * mul[j]) + bias[j] for j in [0, n): flax's order.
// shift and mul are vectors (shift_stride 1) or shift one scalar (shift_stride 0).
template <typename T, typename U>
void affine_pass(const T* x, U* y, int64_t n, const float* shift, int shift_stride, float r,
                 const float* mul, const float* bias, const T* ahead = nullptr,
                 bool stream = false) {
  int64_t j = 0;
  if (shift_stride == 0) {
    const vfloat s = vfloat{} + shift[0];
    for (; j + kLanes <= n; j += kLanes) {
      if (ahead) __builtin_prefetch(ahead + j);  // a later row, while this one is written
      vput(y + j, (vload(x + j) - s) * (r * vload(mul + j)) + vload(bias + j), stream);
    }
  } else {
    for (; j + kLanes <= n; j += kLanes)
      vput(y + j, (vload(x + j) - vload(shift + j)) * (r * vload(mul + j)) + vload(bias + j),
           stream);
  }
  for (; j < n; ++j) store(y, j, (load(x, j) - shift[j * shift_stride]) * (r * mul[j]) + bias[j]);
}

inline double hsum(vfloat v) {
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// Sum of term(v[j]) over j in [0, n): four vector accumulators (independent chains, so
// the adds pipeline) of float lanes, the lanes' totals added in double per chunk: a lane
// sums at most kChunk / kLanes = 128 terms in float.
template <typename T, typename G>
double vector_sum(const T* v, int64_t n, const G& term) {
  constexpr int64_t kChunk = 2048;
  double total = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    int64_t j1 = std::min(n, j0 + kChunk), j = j0;
    vfloat a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (; j + 4 * kLanes <= j1; j += 4 * kLanes) {
      a0 += term(vload(v + j));
      a1 += term(vload(v + j + kLanes));
      a2 += term(vload(v + j + 2 * kLanes));
      a3 += term(vload(v + j + 3 * kLanes));
    }
    for (; j + kLanes <= j1; j += kLanes) a0 += term(vload(v + j));
    double s = hsum((a0 + a1) + (a2 + a3));
    for (; j < j1; ++j) {
      vfloat e = {};
      e[0] = load(v, j);
      s += term(e)[0];
    }
    total += s;
  }
  return total;
}

// One pass over v[0..n): the sums of d = v - shift and of d^2, lane totals added in double
// per chunk (two independent chains for each sum; at most 128 terms per float lane).
template <typename T>
void shifted_sums(const T* v, int64_t n, float shift, double* sum, double* sum_sq) {
  constexpr int64_t kChunk = 2048;
  const vfloat k = vfloat{} + shift;
  double s1 = 0.0, s2 = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    int64_t j1 = std::min(n, j0 + kChunk), j = j0;
    vfloat a0 = {}, a1 = {}, q0 = {}, q1 = {};
    for (; j + 2 * kLanes <= j1; j += 2 * kLanes) {
      vfloat d0 = vload(v + j) - k, d1 = vload(v + j + kLanes) - k;
      a0 += d0;
      a1 += d1;
      q0 += d0 * d0;
      q1 += d1 * d1;
    }
    for (; j + kLanes <= j1; j += kLanes) {
      vfloat d = vload(v + j) - k;
      a0 += d;
      q0 += d * d;
    }
    s1 += hsum(a0 + a1);
    s2 += hsum(q0 + q1);
    for (; j < j1; ++j) {
      double d = double(load(v, j)) - shift;
      s1 += d;
      s2 += d * d;
    }
  }
  *sum = s1;
  *sum_sq = s2;
}

// A bfloat16 row's moments from unshifted sums of x and x^2 taken with AVX512-BF16 dot
// products (vdpbf16ps: x * 1 and x * x are exact in float32; 32 elements per instruction,
// no widening), lane totals added in double per chunk of 2048 elements. Returns false
// (leaving the row to the shifted pass) where the instructions are missing, for float32
// rows, and for rows whose E[x]^2 > var: there E[x^2] - E[x]^2 would cancel more than one
// bit of the float sums' rounding. Denormal bfloat16 inputs (|x| < 1.2e-38) count as 0.
template <typename T>
bool bf16_row_moments(const T*, int64_t, bool, double, float*, float*) { return false; }
#if defined(__AVX512BF16__) && NZ_LANES == 16
inline bool bf16_row_moments(const bf16_bits* x, int64_t n, bool centered, double inv_n,
                             float* mean, float* var) {
  constexpr int64_t kChunk = 2048;
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3f80);  // bfloat16 1.0
  double s1 = 0.0, s2 = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    int64_t j1 = std::min(n, j0 + kChunk), j = j0;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, q0 = a0, q1 = a0;
    for (; j + 64 <= j1; j += 64) {
      __m512bh u = (__m512bh)_mm512_loadu_si512(x + j);
      __m512bh w = (__m512bh)_mm512_loadu_si512(x + j + 32);
      if (centered) {
        a0 = _mm512_dpbf16_ps(a0, u, ones);
        a1 = _mm512_dpbf16_ps(a1, w, ones);
      }
      q0 = _mm512_dpbf16_ps(q0, u, u);
      q1 = _mm512_dpbf16_ps(q1, w, w);
    }
    s1 += hsum(_mm512_add_ps(a0, a1));
    s2 += hsum(_mm512_add_ps(q0, q1));
    for (; j < j1; ++j) {
      double e = load(x, j);
      s1 += e;
      s2 += e * e;
    }
  }
  double mu = centered ? s1 * inv_n : 0.0, v = s2 * inv_n - mu * mu;
  if (!(mu * mu <= v)) return false;  // far from 0 (or not finite): the shifted pass
  *mean = float(mu);
  *var = float(v);
  return true;
}
#endif

template <typename Pool, typename T, typename U>
void row_norm(Pool& pool, const T* x, const float* scale, const float* bias,
              U* y, float* mean, float* var, int64_t rows, int64_t features, float eps,
              bool centered) {
  constexpr int64_t kRowsPerItem = 64, kAhead = 2;  // prefetch distance, in rows
  const int64_t items = (rows + kRowsPerItem - 1) / kRowsPerItem;
  const double inv_n = 1.0 / double(features);
  const bool stream =
      write_output(y, x, features, rows * features * int64_t(sizeof(T) + sizeof(U)));
  parallel_for(pool, items, [&](int64_t item) {
    int64_t r1 = std::min(rows, (item + 1) * kRowsPerItem);
    for (int64_t r = item * kRowsPerItem; r < r1; ++r) {
      const T* xr = x + r * features;
      U* yr = y + r * features;
      // One pass of sums shifted by the row's first element; where that element lies over
      // 8 std from the mean (E[d]^2 > 64 var), E[d^2] - E[d]^2 would lose > 2^-17 of var
      // to cancellation, and the row is reduced again exactly (two passes from L1).
      float m = 0.f, v;
      if (bf16_row_moments(xr, features, centered, inv_n, &m, &v)) {
        // bfloat16 rows: sums by dot products (bf16_row_moments)
      } else if (centered) {
        float shift = load(xr, 0);
        double sum, sum_sq;
        shifted_sums(xr, features, shift, &sum, &sum_sq);
        double shifted_mean = sum * inv_n;
        m = float(shift + shifted_mean);
        v = float(sum_sq * inv_n - shifted_mean * shifted_mean);
        if (shifted_mean * shifted_mean > 64.0 * double(v)) {
          m = float(vector_sum(xr, features, [](vfloat e) { return e; }) * inv_n);
          v = float(vector_sum(xr, features, [m](vfloat e) {
                      e -= m;
                      return e * e;
                    }) * inv_n);
        }
      } else {  // the mean square
        v = float(vector_sum(xr, features, [](vfloat e) { return e * e; }) * inv_n);
      }
      v = std::max(v, 0.f);
      float rr = 1.f / std::sqrt(v + eps);
      const T* ahead = r + kAhead < rows ? xr + kAhead * features : nullptr;
      affine_pass(xr, yr, features, &m, 0, rr, scale, bias, ahead, stream);
      mean[r] = m;
      var[r] = v;
    }
    if (stream) stream_fence();
  });
}

// Per-channel sums of d = x - center and of d^2 over rows [b0, b1) of an (M, C) slab, in
// one pass: tiles of kTile vectors of channels, their centers and both sums in registers.
template <typename T>
void column_shifted_sums(const T* x, int64_t b0, int64_t b1, int64_t channels,
                         const float* center, float* sum, float* sum_sq) {
  constexpr int kTile = 8;
  int64_t c = 0;
  for (; c + kTile * kLanes <= channels; c += kTile * kLanes) {
    vfloat k[kTile], s1[kTile] = {}, s2[kTile] = {};
    for (int t = 0; t < kTile; ++t) k[t] = vload(center + c + t * kLanes);
    for (int64_t i = b0; i < b1; ++i) {
      const T* xi = x + i * channels + c;
      for (int t = 0; t < kTile; ++t) {
        vfloat d = vload(xi + t * kLanes) - k[t];
        s1[t] += d;
        s2[t] += d * d;
      }
    }
    for (int t = 0; t < kTile; ++t) {
      vstore(sum + c + t * kLanes, s1[t]);
      vstore(sum_sq + c + t * kLanes, s2[t]);
    }
  }
  for (; c + kLanes <= channels; c += kLanes) {
    const vfloat k = vload(center + c);
    vfloat s1 = {}, s2 = {};
    for (int64_t i = b0; i < b1; ++i) {
      vfloat d = vload(x + i * channels + c) - k;
      s1 += d;
      s2 += d * d;
    }
    vstore(sum + c, s1);
    vstore(sum_sq + c, s2);
  }
  for (; c < channels; ++c) {
    float s1 = 0.f, s2 = 0.f;
    for (int64_t i = b0; i < b1; ++i) {
      float d = load(x, i * channels + c) - center[c];
      s1 += d;
      s2 += d * d;
    }
    sum[c] = s1;
    sum_sq[c] = s2;
  }
}

// A bfloat16 block's per-channel mean and M2 from unshifted sums of x and x^2 taken with
// AVX512-BF16 dot products over pairs of rows: two rows' vectors of 32 channels are
// interleaved (unpacklo/hi) so each 32-bit lane holds one channel of both rows, and
// vdpbf16ps adds x_i * 1 + x_(i+1) * 1 (or the squares, exact in float32) to it: per two
// rows of 32 channels 2 unpacks and 4 instructions, where widening and the shifted float
// sums take 20. Returns false (the block is left to the shifted pass) where the
// instructions are missing, for float32 x, and where in a group of k channels (the
// statistic the caller needs) sum E[x]^2 > 4 M2 / n: the rounding of each channel's sum of
// squares, ~ n (E[x]^2 + var), would then exceed 5 float roundings of the group's M2 (for
// GroupNorm the spread of the channel means counts into M2).
template <typename T>
bool dot_block_moments(const T*, int64_t, int64_t, int64_t, int64_t, bool, double*,
                       double*) {
  return false;
}
#if defined(__AVX512BF16__) && NZ_LANES == 16
inline bool dot_block_moments(const bf16_bits* x, int64_t b0, int64_t b1, int64_t channels,
                              int64_t k, bool centered, double* mean, double* m2) {
  constexpr int kTile = 4;  // vectors of 32 channels
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3f80);  // bfloat16 1.0
  const __m512i zero = _mm512_setzero_si512();
  const double nb = double(b1 - b0);
  float s[kTile * 32], q[kTile * 32];
  auto finish = [&](int64_t c, int64_t count) {  // lanes -> channels, then the moments
    for (int64_t j = 0; j < count; ++j) {
      double mu = centered ? double(s[j]) / nb : 0.0;
      mean[c + j] = mu;
      m2[c + j] = double(q[j]) - mu * mu * nb;
    }
  };
  int64_t c = 0;
  for (; c + 32 <= channels;) {
    const int tiles = int(std::min<int64_t>(kTile, (channels - c) / 32));
    __m512 lo_s[kTile], hi_s[kTile], lo_q[kTile], hi_q[kTile];
    for (int t = 0; t < kTile; ++t)
      lo_s[t] = hi_s[t] = lo_q[t] = hi_q[t] = _mm512_setzero_ps();
    for (int64_t i = b0; i < b1; i += 2) {
      const bf16_bits* xi = x + i * channels + c;
      for (int t = 0; t < tiles; ++t) {
        __m512i u = _mm512_loadu_si512(xi + 32 * t);
        __m512i w = i + 1 < b1 ? _mm512_loadu_si512(xi + channels + 32 * t) : zero;
        __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(u, w);
        __m512bh hi = (__m512bh)_mm512_unpackhi_epi16(u, w);
        if (centered) {
          lo_s[t] = _mm512_dpbf16_ps(lo_s[t], lo, ones);
          hi_s[t] = _mm512_dpbf16_ps(hi_s[t], hi, ones);
        }
        lo_q[t] = _mm512_dpbf16_ps(lo_q[t], lo, lo);
        hi_q[t] = _mm512_dpbf16_ps(hi_q[t], hi, hi);
      }
    }
    // Lane 4L + k of the lo (hi) sums is channel 8L + k (8L + 4 + k) of its 32.
    for (int t = 0; t < tiles; ++t) {
      alignas(64) float ls[16], hs[16], lq[16], hq[16];
      _mm512_store_ps(ls, lo_s[t]);
      _mm512_store_ps(hs, hi_s[t]);
      _mm512_store_ps(lq, lo_q[t]);
      _mm512_store_ps(hq, hi_q[t]);
      for (int l = 0; l < 16; ++l) {
        int at = 32 * t + 8 * (l / 4) + l % 4;
        s[at] = ls[l];
        s[at + 4] = hs[l];
        q[at] = lq[l];
        q[at + 4] = hq[l];
      }
    }
    finish(c, 32 * tiles);
    c += 32 * tiles;
  }
  if (c < channels) {  // the last channels (fewer than 32): widened, in float
    const int64_t rest = channels - c;
    for (int64_t j = 0; j < rest; ++j) s[j] = q[j] = 0.f;
    for (int64_t i = b0; i < b1; ++i)
      for (int64_t j = 0; j < rest; ++j) {
        float e = load(x, i * channels + c + j);
        s[j] += e;
        q[j] += e * e;
      }
    finish(c, rest);
  }
  for (int64_t g = 0; g < channels; g += k) {
    double mu = 0.0, sq = 0.0, within = 0.0, between = 0.0;
    for (int64_t j = g; j < g + k; ++j) mu += mean[j] / double(k);
    for (int64_t j = g; j < g + k; ++j) {
      sq += mean[j] * mean[j];
      within += m2[j];
      between += (mean[j] - mu) * (mean[j] - mu);
    }
    if (!(sq * nb <= 4.0 * (within + between * nb))) return false;  // also NaN, inf
  }
  return true;
}
#endif

// Per-channel (count, mean, M2) of rows [m0, m1) of one (M, C) slab, merged block by block
// with Chan et al.'s formula. Each block (at most kBlock rows, in L2 cache) is summed in one
// pass shifted by a center: the mean of its first 8 rows for the first block, the mean so
// far after it, so no float sum grows to ~kBlock |mean|. M2 = sum d^2 - (sum d)^2 / n
// loses (E[d]^2 / var + 1) float roundings of the block's M2 to cancellation; where a
// channel's center lies over 4 std from the block's mean (E[d]^2 > 16 var), the block is
// summed again in two exact passes (its mean, then its squared deviations) from L2. k: the
// channels per statistic (1, or GroupNorm's group size), for dot_block_moments' guard.
template <typename T>
void channel_moments(const T* x, int64_t m0, int64_t m1, int64_t channels, int64_t k,
                     bool centered, double* count, double* mean, double* m2) {
  constexpr int64_t kBlock = 256;
  std::vector<float> center(channels, 0.f), bsum(channels), bsq(channels);
  std::vector<double> bmean(channels), bm2(channels);
  double n = 0.0;  // rows merged so far: the same count for every channel
  // The block's (nb, bmean, bm2) into the running moments. The weights nb / n_new and
  // n nb / n_new are the same for every channel: two divisions per block, not per channel.
  auto merge = [&](double nb) {
    const double n_new = n + nb, w = nb / n_new, f = n * w;
    for (int64_t c = 0; c < channels; ++c) {
      double delta = bmean[c] - mean[c];
      mean[c] += delta * w;
      m2[c] += bm2[c] + delta * delta * f;
    }
    n = n_new;
  };
  for (int64_t c = 0; c < channels; ++c) mean[c] = m2[c] = 0.0;
  bool dot = true;  // bfloat16: dot-product sums until a block needs the shifted pass
  for (int64_t b0 = m0; b0 < m1; b0 += kBlock) {
    int64_t b1 = std::min(m1, b0 + kBlock);
    double nb = double(b1 - b0);
    if (dot && (dot = dot_block_moments(x, b0, b1, channels, k, centered, bmean.data(),
                                        bm2.data()))) {
      merge(nb);
      continue;
    }
    if (centered && b0 == m0) {  // the mean of the first (up to) 8 rows
      int64_t rows = std::min<int64_t>(8, b1 - b0);
      for (int64_t c = 0; c < channels; ++c) {
        float s = 0.f;
        for (int64_t i = b0; i < b0 + rows; ++i) s += load(x + i * channels, c);
        center[c] = s / float(rows);
      }
    } else if (centered) {
      for (int64_t c = 0; c < channels; ++c) center[c] = float(mean[c]);
    }
    column_shifted_sums(x, b0, b1, channels, center.data(), bsum.data(), bsq.data());
    bool exact = false;
    for (int64_t c = 0; c < channels; ++c) {
      double shifted_mean = centered ? double(bsum[c]) / nb : 0.0;
      bmean[c] = double(center[c]) + shifted_mean;
      bm2[c] = double(bsq[c]) - shifted_mean * shifted_mean * nb;
      exact |= shifted_mean * shifted_mean * nb > 16.0 * bm2[c];
    }
    if (exact) {  // the block's mean (shifted by its first row), then the deviations from it
      for (int64_t c = 0; c < channels; ++c) center[c] = load(x + b0 * channels, c);
      column_shifted_sums(x, b0, b1, channels, center.data(), bsum.data(), bsq.data());
      for (int64_t c = 0; c < channels; ++c) center[c] = float(center[c] + bsum[c] / nb);
      column_shifted_sums(x, b0, b1, channels, center.data(), bsum.data(), bsq.data());
      for (int64_t c = 0; c < channels; ++c) {
        double shifted_mean = double(bsum[c]) / nb;  // ~0: the center is the block's mean
        bmean[c] = double(center[c]) + shifted_mean;
        bm2[c] = double(bsq[c]) - shifted_mean * shifted_mean * nb;
      }
    }
    merge(nb);
  }
  for (int64_t c = 0; c < channels; ++c) count[c] = n;
}

// Merges (count, mean, M2) of `parts` partial sets, each of `channels` entries at stride
// `channels`, into out_* (per group of k consecutive channels).
inline void merge_moments(const double* count, const double* mean, const double* m2,
                          int64_t parts, int64_t channels, int64_t k, double* out_count,
                          double* out_mean, double* out_m2) {
  for (int64_t g = 0; g < channels / k; ++g) {
    double n = 0.0, mu = 0.0, q = 0.0;
    for (int64_t p = 0; p < parts; ++p) {
      for (int64_t c = g * k; c < (g + 1) * k; ++c) {
        int64_t at = p * channels + c;
        double nb = count[at];
        if (nb == 0.0) continue;
        double n_new = n + nb, delta = mean[at] - mu;
        mu += delta * nb / n_new;
        q += m2[at] + delta * delta * n * nb / n_new;
        n = n_new;
      }
    }
    out_count[g] = n;
    out_mean[g] = mu;
    out_m2[g] = q;
  }
}

// Rows per block of the channel-tiled passes below: a block's rows stay in L1 while its
// tiles of channels go over them (a tile sweeping all of a slab would read it from memory
// once per tile).
constexpr int64_t kRowBlock = 16;

// y = (x - shift) * mul + bias over rows [m0, m1) of an (M, C) slab. Channels go in tiles
// of kTile vectors whose shift, mul and bias stay in registers down the rows: the pass then
// loads x only, three vector loads fewer per vector of x.
template <typename T, typename U>
void normalize_rows(const T* x, U* y, int64_t m0, int64_t m1, int64_t channels,
                    const float* shift, const float* mul, const float* bias, bool stream) {
  constexpr int kTile = 8;
  for (int64_t r0 = m0; r0 < m1; r0 += kRowBlock) {  // blocks of rows, in L1 across tiles
    const int64_t r1 = std::min(m1, r0 + kRowBlock);
    int64_t c = 0;
    for (; c + kTile * kLanes <= channels; c += kTile * kLanes) {
      vfloat sh[kTile], mu[kTile], bi[kTile];
      for (int t = 0; t < kTile; ++t) {
        sh[t] = vload(shift + c + t * kLanes);
        mu[t] = vload(mul + c + t * kLanes);
        bi[t] = vload(bias + c + t * kLanes);
      }
      for (int64_t i = r0; i < r1; ++i) {
        const T* xi = x + i * channels + c;
        U* yi = y + i * channels + c;
        for (int t = 0; t < kTile; ++t)
          vput(yi + t * kLanes, (vload(xi + t * kLanes) - sh[t]) * mu[t] + bi[t], stream);
      }
    }
    if (c == channels) continue;
    for (int64_t i = r0; i < r1; ++i)  // the remaining channels (fewer than a tile)
      affine_pass(x + i * channels + c, y + i * channels + c, channels - c, shift + c, 1, 1.f,
                  mul + c, bias + c, static_cast<const T*>(nullptr), stream);
  }
}

template <typename Pool, typename T, typename U>
void grouped_norm(Pool& pool, const T* x, const float* scale, const float* bias,
                  U* y, float* mean_out, float* var_out, int64_t batch, int64_t m,
                  int64_t channels, int64_t k, float eps, bool centered) {
  const int64_t groups = channels / k;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Slabs of at least ~64 KiB per item, enough items for every thread.
  const int64_t row_bytes = channels * int64_t(sizeof(T));
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(
      (2 * threads + batch - 1) / batch, m * row_bytes / (64 << 10)));
  chunks = std::min(chunks, m);
  const int64_t rows_per_chunk = (m + chunks - 1) / chunks;
  chunks = (m + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t items = batch * chunks;
  std::vector<double> count(items * channels), mean(items * channels), m2(items * channels);
  std::vector<float> shift(batch * channels), mul(batch * channels);
  auto moments = [&](int64_t item) {
    int64_t b = item / chunks, chunk = item % chunks;
    int64_t m0 = chunk * rows_per_chunk, m1 = std::min(m, m0 + rows_per_chunk);
    channel_moments(x + b * m * channels, m0, m1, channels, k, centered,
                    &count[item * channels], &mean[item * channels], &m2[item * channels]);
  };
  auto finish = [&](int64_t b) {  // b's statistics from its chunks' moments
    std::vector<double> gn(groups), gmean(groups), gm2(groups);
    int64_t at = b * chunks * channels;
    merge_moments(&count[at], &mean[at], &m2[at], chunks, channels, k, gn.data(),
                  gmean.data(), gm2.data());
    for (int64_t g = 0; g < groups; ++g) {
      float mu = centered ? float(gmean[g]) : 0.f;
      // Not centered: the blocks' means were 0, so M2 is the sum of squares.
      float v = float(gm2[g] / gn[g]);
      float rr = 1.f / std::sqrt(v + eps);
      mean_out[b * groups + g] = mu;
      var_out[b * groups + g] = v;
      for (int64_t c = g * k; c < (g + 1) * k; ++c) {
        shift[b * channels + c] = mu;
        mul[b * channels + c] = rr * scale[c];
      }
    }
  };
  const bool stream = write_output(
      y, x, channels, batch * m * channels * int64_t(sizeof(T) + sizeof(U)));
  auto normalize = [&](int64_t item) {
    int64_t b = item / chunks, chunk = item % chunks;
    int64_t m0 = chunk * rows_per_chunk, m1 = std::min(m, m0 + rows_per_chunk);
    normalize_rows(x + b * m * channels, y + b * m * channels, m0, m1, channels,
                   &shift[b * channels], &mul[b * channels], bias, stream);
    if (stream) stream_fence();
  };
  if (chunks == 1) {  // one item per b: its slab is still in cache for the second pass
    parallel_for(pool, batch, [&](int64_t b) {
      moments(b);
      finish(b);
      normalize(b);
    });
    return;
  }
  parallel_for(pool, items, moments);
  for (int64_t b = 0; b < batch; ++b) finish(b);
  parallel_for(pool, items, normalize);
}

// y = (x - shift) * mul + bias per channel over the rows of an (M, C) matrix: normalization
// by given statistics (BatchNorm at inference: shift the running mean, mul = r * scale).
template <typename Pool, typename T, typename U>
void channel_affine(Pool& pool, const T* x, const float* shift, const float* mul,
                    const float* bias, U* y, int64_t m, int64_t channels) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t bytes = m * channels * int64_t(sizeof(T));
  const int64_t items = std::max<int64_t>(1, std::min<int64_t>({m, 8 * threads, bytes >> 16}));
  const int64_t rows_per_item = (m + items - 1) / items;
  const bool stream = write_output(y, x, channels, m * channels * int64_t(sizeof(T) + sizeof(U)));
  parallel_for(pool, items, [&](int64_t item) {
    const int64_t m0 = item * rows_per_item, m1 = std::min(m, m0 + rows_per_item);
    if (m0 < m1) normalize_rows(x, y, m0, m1, channels, shift, mul, bias, stream);
    if (stream) stream_fence();
  });
}

// ---------------------------------------------------------------- backward passes
//
// The transpose of the normalization's linearization (the closed form of Ioffe & Szegedy
// 2015, section 3), with xhat = (x - mean) r, g = gy * scale, n the elements of a
// statistic and E their mean:
//
//   gx = r (g - E[g] - xhat E[g xhat]) + (gmean + 2 gvar (x - mean)) / n
//      = (r scale) gy + (x - mean) (2 gvar / n - r^2 E[g xhat]) + (gmean / n - r E[g])
//   gscale = sum gy xhat,   gbias = sum gy        (over everything but the features)
//
// (not centered: mean = 0 and no E[g] or gmean terms). The statistics' cotangents gmean
// and gvar make gradients through the returned moments (running averages) exact.
// With frozen statistics (the grouped kernel's `frozen`: mean and var given, such as
// BatchNorm's running averages at inference, not functions of x) gx = (r scale) gy alone,
// written in the one pass that takes the sums for gscale and gbias.

// gx[j] = a[j] gy[j] + (x[j] - shift[j]) b[j] + d[j] over one row of channels.
template <typename T, typename G>
void gradient_pass(const T* x, const G* gy, T* gx, int64_t n, const float* a,
                   const float* shift, const float* b, const float* d, bool stream) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    vput(gx + j, vload(a + j) * vload(gy + j) + (vload(x + j) - vload(shift + j)) *
                                                     vload(b + j) + vload(d + j), stream);
  for (; j < n; ++j) store(gx, j, a[j] * load(gy, j) + (load(x, j) - shift[j]) * b[j] + d[j]);
}

// gx[j] = r (scale[j] gy[j]) + (x[j] - m) b + d over one row (r, m, b, d scalars).
template <typename T, typename G>
void row_gradient(const T* x, const G* gy, T* gx, int64_t n, const float* scale, float r,
                  float m, float b, float d, bool stream) {
  const vfloat rv = vfloat{} + r, mv = vfloat{} + m, bv = vfloat{} + b, dv = vfloat{} + d;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    vput(gx + j, rv * (vload(scale + j) * vload(gy + j)) + ((vload(x + j) - mv) * bv + dv),
         stream);
  for (; j < n; ++j) store(gx, j, r * (scale[j] * load(gy, j)) + ((load(x, j) - m) * b + d));
}

template <typename Pool, typename T, typename G>
void row_norm_backward(Pool& pool, const T* x, const G* gy, const float* scale,
                       const float* mean, const float* var, const float* gmean,
                       const float* gvar, T* gx, float* gscale, float* gbias, int64_t rows,
                       int64_t features, float eps, bool centered) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t items = std::min(rows, 4 * threads);  // each with its own param sums
  const int64_t rows_per_item = (rows + items - 1) / items;
  std::vector<float> sums(items * 2 * features, 0.f);
  const double inv_n = 1.0 / double(features);
  const bool stream = write_output(
      gx, x, features, rows * features * int64_t(2 * sizeof(T) + sizeof(G)));
  parallel_for(pool, items, [&](int64_t item) {
    float* ps = &sums[item * 2 * features];  // gscale partial, then gbias partial
    float* pb = ps + features;
    const int64_t r_end = std::min(rows, (item + 1) * rows_per_item);
    // Rows in groups of kRows: one pass from memory gives each row's E[g] and E[g xhat] and
    // the group's param sums (ps and pb read and written once per group, scale loaded once
    // per group); the rows stay in L1 for their gradient pass.
    constexpr int kRows = 4;
    for (int64_t r0 = item * rows_per_item; r0 < r_end; r0 += kRows) {
      const int nr = int(std::min<int64_t>(kRows, r_end - r0));
      float m[kRows], rr[kRows];
      vfloat mv[kRows], rv[kRows], sg[kRows], sgx[kRows];
      for (int q = 0; q < nr; ++q) {
        m[q] = mean[r0 + q];
        rr[q] = 1.f / std::sqrt(var[r0 + q] + eps);
        mv[q] = vfloat{} + m[q];
        rv[q] = vfloat{} + rr[q];
        sg[q] = sgx[q] = vfloat{};
      }
      int64_t j = 0;
      for (; j + kLanes <= features; j += kLanes) {
        const vfloat sc = vload(scale + j);
        vfloat accs = vload(ps + j), accb = vload(pb + j);
        for (int q = 0; q < nr; ++q) {
          const int64_t at = (r0 + q) * features + j;
          vfloat g0 = vload(gy + at), xh = (vload(x + at) - mv[q]) * rv[q], g = g0 * sc;
          sg[q] += g;
          sgx[q] += g * xh;
          accs += g0 * xh;
          accb += g0;
        }
        vstore(ps + j, accs);
        vstore(pb + j, accb);
      }
      double tg[kRows], tgx[kRows];
      for (int q = 0; q < nr; ++q) {
        tg[q] = hsum(sg[q]);
        tgx[q] = hsum(sgx[q]);
      }
      for (; j < features; ++j)
        for (int q = 0; q < nr; ++q) {
          const int64_t at = (r0 + q) * features + j;
          float g0 = load(gy, at), xh = (load(x, at) - m[q]) * rr[q];
          tg[q] += g0 * scale[j];
          tgx[q] += g0 * scale[j] * xh;
          ps[j] += g0 * xh;
          pb[j] += g0;
        }
      for (int q = 0; q < nr; ++q) {
        const int64_t r = r0 + q;
        float b = float((2.0 * gvar[r] - double(rr[q]) * rr[q] * tgx[q]) * inv_n);
        float d = float(((centered ? gmean[r] : 0.0) - (centered ? rr[q] * tg[q] : 0.0)) *
                        inv_n);
        row_gradient(x + r * features, gy + r * features, gx + r * features, features, scale,
                     rr[q], m[q], b, d, stream);
      }
    }
    if (stream) stream_fence();
  });
  for (int64_t j = 0; j < features; ++j) {
    double ts = 0.0, tb = 0.0;
    for (int64_t item = 0; item < items; ++item) {
      ts += sums[item * 2 * features + j];
      tb += sums[item * 2 * features + features + j];
    }
    gscale[j] = float(ts);
    gbias[j] = float(tb);
  }
}

// Per-channel sums of gy and of gy (x - shift) over rows [b0, b1) of one (M, C) slab, in
// tiles of kTile / 2 vectors of channels (two accumulators each) kept in registers.
template <typename T, typename G>
void gradient_column_sums(const T* x, const G* gy, int64_t b0, int64_t b1, int64_t channels,
                          const float* shift, float* sum_g, float* sum_gc) {
  constexpr int kTile = 4;
  int64_t c = 0;
  for (; c + kTile * kLanes <= channels; c += kTile * kLanes) {
    vfloat ag[kTile] = {}, agc[kTile] = {}, sh[kTile];
    for (int t = 0; t < kTile; ++t) sh[t] = vload(shift + c + t * kLanes);
    for (int64_t i = b0; i < b1; ++i) {
      const T* xi = x + i * channels + c;
      const G* gi = gy + i * channels + c;
      for (int t = 0; t < kTile; ++t) {
        vfloat g = vload(gi + t * kLanes);
        ag[t] += g;
        agc[t] += g * (vload(xi + t * kLanes) - sh[t]);
      }
    }
    for (int t = 0; t < kTile; ++t) {
      vstore(sum_g + c + t * kLanes, ag[t]);
      vstore(sum_gc + c + t * kLanes, agc[t]);
    }
  }
  for (; c < channels; ++c) {
    float ag = 0.f, agc = 0.f;
    for (int64_t i = b0; i < b1; ++i) {
      float g = load(gy, i * channels + c);
      ag += g;
      agc += g * (load(x, i * channels + c) - shift[c]);
    }
    sum_g[c] = ag;
    sum_gc[c] = agc;
  }
}

// The same over rows [m0, m1): float per block of rows, double across blocks. Then
// after_block(b0, b1) runs on the block's rows while they are still in cache.
template <typename T, typename G, typename F>
void channel_gradient_sums(const T* x, const G* gy, int64_t m0, int64_t m1, int64_t channels,
                           const float* shift, double* sum_g, double* sum_gc,
                           const F& after_block) {
  constexpr int64_t kBlock = 64;
  std::vector<float> bg(channels), bgc(channels);
  for (int64_t c = 0; c < channels; ++c) sum_g[c] = sum_gc[c] = 0.0;
  for (int64_t b0 = m0; b0 < m1; b0 += kBlock) {
    const int64_t b1 = std::min(m1, b0 + kBlock);
    gradient_column_sums(x, gy, b0, b1, channels, shift, bg.data(), bgc.data());
    for (int64_t c = 0; c < channels; ++c) {
      sum_g[c] += bg[c];
      sum_gc[c] += bgc[c];
    }
    after_block(b0, b1);
  }
}

// gx[j] = a[j] gy[j] over one row of channels (frozen statistics).
template <typename T, typename G>
void scaled_gradient(const G* gy, T* gx, int64_t n, const float* a, bool stream) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) vput(gx + j, vload(a + j) * vload(gy + j), stream);
  for (; j < n; ++j) store(gx, j, a[j] * load(gy, j));
}

template <typename Pool, typename T, typename G>
void grouped_norm_backward(Pool& pool, const T* x, const G* gy, const float* scale,
                           const float* mean, const float* var, const float* gmean,
                           const float* gvar, T* gx, float* gscale, float* gbias,
                           int64_t batch, int64_t m, int64_t channels, int64_t k, float eps,
                           bool centered, bool frozen) {
  const int64_t groups = channels / k;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t row_bytes = channels * int64_t(sizeof(T) + sizeof(G));
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(
      (2 * threads + batch - 1) / batch, m * row_bytes / (64 << 10)));
  chunks = std::min(chunks, m);
  const int64_t rows_per_chunk = (m + chunks - 1) / chunks;
  chunks = (m + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t items = batch * chunks;
  const double n = double(m) * double(k);
  std::vector<float> shift(batch * channels);  // the group mean, per channel
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < channels; ++c) shift[b * channels + c] = mean[b * groups + c / k];
  std::vector<double> sg(items * channels), sgc(items * channels);
  // Per-channel coefficients of gx = a gy + (x - mean) bc + d, per sample b.
  std::vector<float> a(batch * channels), bc(batch * channels), d(batch * channels);
  const bool stream = write_output(
      gx, x, channels, batch * m * channels * int64_t(2 * sizeof(T) + sizeof(G)));
  auto sums = [&](int64_t item) {
    int64_t b = item / chunks, chunk = item % chunks;
    int64_t m0 = chunk * rows_per_chunk, m1 = std::min(m, m0 + rows_per_chunk);
    channel_gradient_sums(x + b * m * channels, gy + b * m * channels, m0, m1, channels,
                          &shift[b * channels], &sg[item * channels], &sgc[item * channels],
                          [](int64_t, int64_t) {});
  };
  auto coefficients = [&](int64_t b) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t s = b * groups + g;
      const double rr = 1.0 / std::sqrt(double(float(var[s]) + eps));
      double tg = 0.0, tgx = 0.0;  // sum of g and of g xhat over the group
      for (int64_t c = g * k; c < (g + 1) * k; ++c) {
        double ag = 0.0, agc = 0.0;
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
          ag += sg[(b * chunks + chunk) * channels + c];
          agc += sgc[(b * chunks + chunk) * channels + c];
        }
        tg += scale[c] * ag;
        tgx += scale[c] * agc * rr;
      }
      const double bv = (2.0 * gvar[s] - rr * rr * tgx) / n;
      const double dv = centered ? (gmean[s] - rr * tg) / n : 0.0;
      for (int64_t c = g * k; c < (g + 1) * k; ++c) {
        a[b * channels + c] = float(rr * scale[c]);
        bc[b * channels + c] = float(bv);
        d[b * channels + c] = float(dv);
      }
    }
  };
  auto gradient = [&](int64_t item) {
    int64_t b = item / chunks, chunk = item % chunks;
    int64_t m0 = chunk * rows_per_chunk, m1 = std::min(m, m0 + rows_per_chunk);
    const int64_t off = b * channels;
    for (int64_t i = m0; i < m1; ++i) {
      const int64_t at = (b * m + i) * channels;
      gradient_pass(x + at, gy + at, gx + at, channels, &a[off], &shift[off], &bc[off],
                    &d[off], stream);
    }
    if (stream) stream_fence();
  };
  if (frozen) {
    // Statistics given (running averages), not functions of x: gx = (r scale) gy, written
    // block by block in the pass that sums gy and gy (x - mean) for gscale and gbias.
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t c = 0; c < channels; ++c)
        a[b * channels + c] =
            float(scale[c] / std::sqrt(double(float(var[b * groups + c / k]) + eps)));
    parallel_for(pool, items, [&](int64_t item) {
      int64_t b = item / chunks, chunk = item % chunks;
      int64_t m0 = chunk * rows_per_chunk, m1 = std::min(m, m0 + rows_per_chunk);
      const int64_t off = b * channels;
      channel_gradient_sums(x + off * m, gy + off * m, m0, m1, channels, &shift[off],
                            &sg[item * channels], &sgc[item * channels],
                            [&](int64_t b0, int64_t b1) {
                              for (int64_t i = b0; i < b1; ++i) {
                                const int64_t at = (b * m + i) * channels;
                                scaled_gradient(gy + at, gx + at, channels, &a[off],
                                                stream);
                              }
                            });
      if (stream) stream_fence();
    });
  } else if (chunks == 1) {
    parallel_for(pool, batch, [&](int64_t b) {
      sums(b);
      coefficients(b);
      gradient(b);
    });
  } else {
    parallel_for(pool, items, sums);
    for (int64_t b = 0; b < batch; ++b) coefficients(b);
    parallel_for(pool, items, gradient);
  }
  for (int64_t c = 0; c < channels; ++c) {  // gscale = sum gy xhat, gbias = sum gy
    double ts = 0.0, tb = 0.0;
    for (int64_t b = 0; b < batch; ++b) {
      const double rr = 1.0 / std::sqrt(double(float(var[b * groups + c / k]) + eps));
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        ts += sgc[(b * chunks + chunk) * channels + c] * rr;
        tb += sg[(b * chunks + chunk) * channels + c];
      }
    }
    gscale[c] = float(ts);
    gbias[c] = float(tb);
  }
}

// Calls f with x's and y's element pointers typed (float or bf16 bits).
template <typename F>
ffi::Error dispatch(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer>& y, const F& f) {
  auto xt = x.element_type(), yt = y->element_type();
  void* yp = y->untyped_data();
  const void* xp = x.untyped_data();
  if (xt == ffi::F32 && yt == ffi::F32) return f((const float*)xp, (float*)yp);
  if (xt == ffi::F32 && yt == ffi::BF16) return f((const float*)xp, (bf16_bits*)yp);
  if (xt == ffi::BF16 && yt == ffi::F32) return f((const bf16_bits*)xp, (float*)yp);
  if (xt == ffi::BF16 && yt == ffi::BF16) return f((const bf16_bits*)xp, (bf16_bits*)yp);
  return ffi::Error::InvalidArgument("normzoo native kernels take float32 or bfloat16 x and y");
}

// x, y and the statistics are read as flat buffers of any shape (no reshape in the caller:
// XLA copies a reshaped operand that aliases an output); the attributes give the view.
ffi::Error RowNormImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Result<ffi::AnyBuffer> mean, ffi::Result<ffi::AnyBuffer> var,
                       float epsilon, bool centered, int64_t features) {
  int64_t size = int64_t(x.element_count());
  if (features < 1 || size % features != 0)
    return ffi::Error::InvalidArgument("normzoo_row_norm: features must divide x's size");
  int64_t rows = size / features;
  if (scale.element_count() != size_t(features) || bias.element_count() != size_t(features))
    return ffi::Error::InvalidArgument("normzoo_row_norm: scale and bias need F entries");
  if (mean->element_count() != size_t(rows) || var->element_count() != size_t(rows) ||
      mean->element_type() != ffi::F32 || var->element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("normzoo_row_norm: mean and var need R float32 entries");
  return dispatch(x, y, [&](auto* xp, auto* yp) {
    row_norm(pool, xp, scale.typed_data(), bias.typed_data(), yp,
             static_cast<float*>(mean->untyped_data()), static_cast<float*>(var->untyped_data()),
             rows, features, epsilon, centered);
    return ffi::Error::Success();
  });
}

ffi::Error GroupedNormImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                           ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::AnyBuffer> y,
                           ffi::Result<ffi::AnyBuffer> mean, ffi::Result<ffi::AnyBuffer> var,
                           float epsilon, bool centered, int64_t group_size, int64_t batch,
                           int64_t channels) {
  int64_t size = int64_t(x.element_count());
  if (batch < 1 || channels < 1 || size == 0 || size % (batch * channels) != 0)
    return ffi::Error::InvalidArgument("normzoo_grouped_norm: x is not (B, M, C) for B, C given");
  int64_t m = size / (batch * channels);
  if (group_size < 1 || channels % group_size != 0)
    return ffi::Error::InvalidArgument("normzoo_grouped_norm: group_size must divide C");
  if (scale.element_count() != size_t(channels) || bias.element_count() != size_t(channels))
    return ffi::Error::InvalidArgument("normzoo_grouped_norm: scale and bias need C entries");
  size_t stats = size_t(batch * (channels / group_size));
  if (mean->element_count() != stats || var->element_count() != stats ||
      mean->element_type() != ffi::F32 || var->element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("normzoo_grouped_norm: mean and var need B * C / k floats");
  return dispatch(x, y, [&](auto* xp, auto* yp) {
    grouped_norm(pool, xp, scale.typed_data(), bias.typed_data(), yp,
                 static_cast<float*>(mean->untyped_data()), static_cast<float*>(var->untyped_data()),
                 batch, m, channels, group_size, epsilon, centered);
    return ffi::Error::Success();
  });
}

ffi::Error ChannelAffineImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> shift,
                             ffi::Buffer<ffi::F32> mul, ffi::Buffer<ffi::F32> bias,
                             ffi::Result<ffi::AnyBuffer> y, int64_t channels) {
  int64_t size = int64_t(x.element_count());
  if (channels < 1 || size % channels != 0)
    return ffi::Error::InvalidArgument("normzoo_channel_affine: channels must divide x's size");
  for (auto* v : {&shift, &mul, &bias})
    if (v->element_count() != size_t(channels))
      return ffi::Error::InvalidArgument("normzoo_channel_affine: vectors need C entries");
  return dispatch(x, y, [&](auto* xp, auto* yp) {
    channel_affine(pool, xp, shift.typed_data(), mul.typed_data(), bias.typed_data(), yp,
                   size / channels, channels);
    return ffi::Error::Success();
  });
}

// Calls f with x's, gy's and gx's element pointers typed (gx has x's type).
template <typename F>
ffi::Error dispatch_backward(ffi::AnyBuffer x, ffi::AnyBuffer gy,
                             ffi::Result<ffi::AnyBuffer>& gx, const F& f) {
  auto xt = x.element_type(), gt = gy.element_type();
  if (gx->element_type() != xt)
    return ffi::Error::InvalidArgument("normzoo backward: gx must have x's dtype");
  const void *xp = x.untyped_data(), *gp = gy.untyped_data();
  void* op = gx->untyped_data();
  if (xt == ffi::F32 && gt == ffi::F32) return f((const float*)xp, (const float*)gp, (float*)op);
  if (xt == ffi::F32 && gt == ffi::BF16)
    return f((const float*)xp, (const bf16_bits*)gp, (float*)op);
  if (xt == ffi::BF16 && gt == ffi::F32)
    return f((const bf16_bits*)xp, (const float*)gp, (bf16_bits*)op);
  if (xt == ffi::BF16 && gt == ffi::BF16)
    return f((const bf16_bits*)xp, (const bf16_bits*)gp, (bf16_bits*)op);
  return ffi::Error::InvalidArgument("normzoo native kernels take float32 or bfloat16 x and gy");
}

template <typename Buf>
float* f32(Buf& b) {
  return static_cast<float*>(b->untyped_data());
}

ffi::Error RowNormBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                               ffi::Buffer<ffi::F32> scale, ffi::AnyBuffer mean,
                               ffi::AnyBuffer var, ffi::AnyBuffer gy, ffi::AnyBuffer gmean,
                               ffi::AnyBuffer gvar,
                               ffi::Result<ffi::AnyBuffer> gx,
                               ffi::Result<ffi::AnyBuffer> gscale,
                               ffi::Result<ffi::AnyBuffer> gbias, float epsilon, bool centered,
                               int64_t features) {
  int64_t size = int64_t(x.element_count());
  if (features < 1 || size % features != 0 || gy.element_count() != size_t(size))
    return ffi::Error::InvalidArgument("normzoo_row_norm_backward: x, gy and features differ");
  int64_t rows = size / features;
  for (auto* b : {&mean, &var, &gmean, &gvar})
    if (b->element_count() != size_t(rows) || b->element_type() != ffi::F32)
      return ffi::Error::InvalidArgument("normzoo_row_norm_backward: statistics need R floats");
  return dispatch_backward(x, gy, gx, [&](auto* xp, auto* gp, auto* op) {
    row_norm_backward(pool, xp, gp, scale.typed_data(), (const float*)mean.untyped_data(),
                      (const float*)var.untyped_data(), (const float*)gmean.untyped_data(),
                      (const float*)gvar.untyped_data(), op, f32(gscale), f32(gbias), rows,
                      features, epsilon, centered);
    return ffi::Error::Success();
  });
}

ffi::Error GroupedNormBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                                   ffi::Buffer<ffi::F32> scale, ffi::AnyBuffer mean,
                                   ffi::AnyBuffer var, ffi::AnyBuffer gy, ffi::AnyBuffer gmean,
                                   ffi::AnyBuffer gvar, ffi::Result<ffi::AnyBuffer> gx,
                                   ffi::Result<ffi::AnyBuffer> gscale,
                                   ffi::Result<ffi::AnyBuffer> gbias, float epsilon,
                                   bool centered, int64_t group_size, int64_t batch,
                                   int64_t channels, bool frozen) {
  int64_t size = int64_t(x.element_count());
  if (batch < 1 || channels < 1 || size == 0 || size % (batch * channels) != 0 ||
      gy.element_count() != size_t(size) || group_size < 1 || channels % group_size != 0)
    return ffi::Error::InvalidArgument("normzoo_grouped_norm_backward: bad (B, M, C) view");
  size_t stats = size_t(batch * (channels / group_size));
  for (auto* b : {&mean, &var, &gmean, &gvar})
    if (b->element_count() != stats || b->element_type() != ffi::F32)
      return ffi::Error::InvalidArgument("normzoo_grouped_norm_backward: statistics size");
  return dispatch_backward(x, gy, gx, [&](auto* xp, auto* gp, auto* op) {
    grouped_norm_backward(pool, xp, gp, scale.typed_data(), (const float*)mean.untyped_data(),
                          (const float*)var.untyped_data(), (const float*)gmean.untyped_data(),
                          (const float*)gvar.untyped_data(), op, f32(gscale), f32(gbias),
                          batch, size / (batch * channels), channels, group_size, epsilon,
                          centered, frozen);
    return ffi::Error::Success();
  });
}

}  // namespace

#define NORMZOO_BIND_NORM                  \
  ffi::Ffi::Bind()                         \
      .Ctx<ffi::ThreadPool>()              \
      .Arg<ffi::AnyBuffer>()               \
      .Arg<ffi::Buffer<ffi::F32>>()        \
      .Arg<ffi::Buffer<ffi::F32>>()        \
      .Ret<ffi::AnyBuffer>()               \
      .Ret<ffi::AnyBuffer>()               \
      .Ret<ffi::AnyBuffer>()               \
      .Attr<float>("epsilon")              \
      .Attr<bool>("centered")

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormzooRowNorm, RowNormImpl,
                              NORMZOO_BIND_NORM.Attr<int64_t>("features"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormzooGroupedNorm, GroupedNormImpl,
                              NORMZOO_BIND_NORM.Attr<int64_t>("group_size")
                                  .Attr<int64_t>("batch")
                                  .Attr<int64_t>("channels"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormzooChannelAffine, ChannelAffineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mul
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::AnyBuffer>()         // y
                                  .Attr<int64_t>("channels"));

#define NORMZOO_BIND_BACKWARD              \
  ffi::Ffi::Bind()                         \
      .Ctx<ffi::ThreadPool>()              \
      .Arg<ffi::AnyBuffer>()  /* x */      \
      .Arg<ffi::Buffer<ffi::F32>>()        \
      .Arg<ffi::AnyBuffer>()  /* mean */   \
      .Arg<ffi::AnyBuffer>()  /* var */    \
      .Arg<ffi::AnyBuffer>()  /* gy */     \
      .Arg<ffi::AnyBuffer>()  /* gmean */  \
      .Arg<ffi::AnyBuffer>()  /* gvar */   \
      .Ret<ffi::AnyBuffer>()               \
      .Ret<ffi::AnyBuffer>()               \
      .Ret<ffi::AnyBuffer>()               \
      .Attr<float>("epsilon")              \
      .Attr<bool>("centered")

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormzooRowNormBackward, RowNormBackwardImpl,
                              NORMZOO_BIND_BACKWARD.Attr<int64_t>("features"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormzooGroupedNormBackward, GroupedNormBackwardImpl,
                              NORMZOO_BIND_BACKWARD.Attr<int64_t>("group_size")
                                  .Attr<int64_t>("batch")
                                  .Attr<int64_t>("channels")
                                  .Attr<bool>("frozen"));
