// Shared plumbing for the CPU kernels: storage types, 16-lane vector load/store with fp32 (or
// fp64) math, and the OpenMP row partitioner.
//
// Vectors are GCC/Clang vector extensions: 64 bytes (16 x fp32 or 8 x fp64). With -march=native
// on an AVX-512 machine each op is one instruction; elsewhere the compiler splits them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace fl {

typedef float vf __attribute__((vector_size(64)));      // 16 x fp32
typedef int32_t vi __attribute__((vector_size(64)));    // 16 x int32 (comparison masks of vf)
typedef uint32_t vu __attribute__((vector_size(64)));
typedef double vd __attribute__((vector_size(64)));     // 8 x fp64
typedef int64_t vl __attribute__((vector_size(64)));    // 8 x int64 (comparison masks of vd)
typedef uint16_t vh16 __attribute__((vector_size(32)));  // 16 x 16-bit storage
typedef _Float16 vhf16 __attribute__((vector_size(32)));

struct bf16 { uint16_t bits; };  // bfloat16 storage; math in fp32
using f16 = _Float16;            // IEEE half storage; math in fp32

// dtype codes shared with fastlayers/backends/cpu/_ext.py
enum DType { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };

// io<T>: how storage type T is loaded into / stored from a math vector V of W lanes of C.
template <class T> struct io;

template <> struct io<float> {
  using C = float; using V = vf; static constexpr int W = 16;
  static V load(const float* p) { V v; std::memcpy(&v, p, sizeof v); return v; }
  static void store(float* p, V v) { std::memcpy(p, &v, sizeof v); }
};

template <> struct io<double> {
  using C = double; using V = vd; static constexpr int W = 8;
  static V load(const double* p) { V v; std::memcpy(&v, p, sizeof v); return v; }
  static void store(double* p, V v) { std::memcpy(p, &v, sizeof v); }
};

template <> struct io<bf16> {
  using C = float; using V = vf; static constexpr int W = 16;
  static V load(const bf16* p) {
#ifdef __AVX512F__
    __m256i h = _mm256_loadu_si256((const __m256i*)p);
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);  // bf16 is the top half of an fp32
#else
    vh16 h; std::memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
  }
  static void store(bf16* p, V v) {
    // Round to nearest even, as torch does; NaN stays a (quiet) NaN.
    vu u = (vu)v;
    vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    r = (v != v) ? ((u >> 16) | 0x40u) : r;
#ifdef __AVX512F__
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16((__m512i)r));  // vpmovdw: no permutes
#else
    vh16 h = __builtin_convertvector(r, vh16);
    std::memcpy(p, &h, sizeof h);
#endif
  }
};

template <> struct io<f16> {
  using C = float; using V = vf; static constexpr int W = 16;
#ifdef __AVX512F__
  // vcvtph2ps / vcvtps2ph (F16C, part of AVX-512F): IEEE conversions, round to nearest even,
  // subnormals, inf and NaN kept. Without AVX512-FP16 (AMD Zen 4, Intel before Sapphire Rapids)
  // GCC lowers __builtin_convertvector on _Float16 lane by lane: measured 5x slower passes
  // (fp16 ReLU over 8192 x 1024: 3.4 ms against torch's 0.64 ms, 2026-12-02).
  static V load(const f16* p) { return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static void store(f16* p, V v) {
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#else
  static V load(const f16* p) { vhf16 h; std::memcpy(&h, p, sizeof h); return __builtin_convertvector(h, vf); }
  static void store(f16* p, V v) { vhf16 h = __builtin_convertvector(v, vhf16); std::memcpy(p, &h, sizeof h); }
#endif
};

// Partial vectors at the end of a row: go through a zero-padded buffer of one vector.
template <class T>
static inline typename io<T>::V load_n(const T* p, int64_t n) {
  T buf[io<T>::W];
  std::memset(buf, 0, sizeof buf);
  std::memcpy(buf, p, n * sizeof(T));
  return io<T>::load(buf);
}
template <class T>
static inline void store_n(T* p, typename io<T>::V v, int64_t n) {
  T buf[io<T>::W];
  io<T>::store(buf, v);
  std::memcpy(p, buf, n * sizeof(T));
}

// Full vector or masked tail load of k <= W elements.
template <class T> static inline typename io<T>::V load_k(const T* p, int64_t k) {
  return k == io<T>::W ? io<T>::load(p) : load_n(p, k);
}
template <class T> static inline void store_k(T* p, typename io<T>::V v, int64_t k) {
  if (k == io<T>::W) io<T>::store(p, v); else store_n(p, v, k);
}

// v rounded to T and back through io<T>'s store (the rounding eager applies between two ops in T);
// identity for fp32 / fp64.
template <class T> static inline typename io<T>::V round_to(typename io<T>::V v) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return v;
  } else {
    T buf[io<T>::W];
    io<T>::store(buf, v);
    return io<T>::load(buf);
  }
}

// Stores of an op's last pass over its output. Outputs much larger than the caches go around them
// when T is float and `stream` (non-temporal stores: no read-for-ownership of the output, no
// eviction of the rows still to come); the caller orders them (_mm_sfence) before the output is read.
template <class T> static inline void store_out(T* p, typename io<T>::V v, bool stream) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float>) {
    if (stream) { _mm512_stream_ps(p, (__m512)v); return; }
  }
#endif
  (void)stream;
  io<T>::store(p, v);
}

// Calls f(r, j, k) for each row r in [r0, r1) and each vector of its n columns starting at column
// j: k = W lanes, or k < W for the row's tail (pair with load_k / store_k).
template <class T, class F>
static inline void for_row_vectors(int64_t r0, int64_t r1, int64_t n, F&& f) {
  constexpr int W = io<T>::W;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t j = 0; j < n; j += W) f(r, j, std::min<int64_t>(W, n - j));
}

template <class V> static inline V splat(decltype(V{}[0]) s) { return V{} + s; }

template <class V> static inline auto hsum(V v) {
  decltype(v[0] + 0.0) s = 0;  // accumulate the lanes in double
  for (int i = 0; i < (int)(sizeof(V) / sizeof(v[0])); ++i) s += v[i];
  return s;
}
#ifdef __AVX512F__
// fp32 lanes: two fp64 halves added as vectors, then reduced (no 16-step dependent chain).
template <> inline auto hsum<vf>(vf v) {
  __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256((__m512)v));
  __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd((__m512)v), 1)));
  return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
}
#endif

// The sum of f(j) (a vector of io<T>::V) over j = j0, j0 + W, ... < j1, as the softmax kernels add
// up a chunk: partial sums of <= 256 elements in the math type (fp32 / fp64), then fp64 across them.
template <class T, class F> static inline double blocked_sum(int64_t j0, int64_t j1, F&& f) {
  double sum = 0;
  for (int64_t b0 = j0; b0 < j1; b0 += 256) {
    const int64_t b1 = std::min(j1, b0 + 256);
    typename io<T>::V acc{};
    for (int64_t j = b0; j < b1; j += io<T>::W) acc += f(j);
    sum += hsum(acc);
  }
  return sum;
}

// acc[0:k] += v[0:k] in fp64 (column sums of the backward passes: bias gradients).
static inline void add_to(double* acc, vd v, int64_t k) {
  if (k == 8) { vd a; std::memcpy(&a, acc, sizeof a); a += v; std::memcpy(acc, &a, sizeof a); return; }
  for (int64_t l = 0; l < k; ++l) acc[l] += v[l];
}
static inline void add_to(double* acc, vf v, int64_t k) {
  typedef float vf8 __attribute__((vector_size(32)));
  vf8 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  vf8 hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  add_to(acc, __builtin_convertvector(lo, vd), std::min<int64_t>(k, 8));
  if (k > 8) add_to(acc + 8, __builtin_convertvector(hi, vd), k - 8);
}

// Column sums of (rows, n) values made vector by vector (the bias gradients), in two stages: the
// rows of a block of kSumBlockRows are summed in the compute type C (fp32 for fp32 / bf16 / fp16)
// into `part` (n values of C, L1/L2-resident), which flush() then adds into the fp64 sums `acc`:
// one C add per element instead of two fp64 conversions and adds. Measured 2026-12-02 (AMD EPYC,
// 2 threads, 8192 x 1024 GELU backward): fp64 per element made the pass 1.5x slower than without a
// bias gradient (bf16 5.3 vs 3.5 ms); two stages cost 0.4 ms. A block's fp32 sum of 16 terms is
// off by at most ~1e-6 of its magnitude; blocks then add up in fp64, in a fixed order.
constexpr int64_t kSumBlockRows = 16;

template <class T>
struct ColumnSums {
  using C = typename io<T>::C;
  using V = typename io<T>::V;
  double* acc = nullptr;  // (n,) fp64 sums of this thread; null: no sums wanted
  C* part = nullptr;      // (n,) the current block's sums
  // v: k lanes at columns [j, j + k) of a row; first: the block's first row.
  void add(bool first, int64_t j, V v, int64_t k) const {
    if (part) store_k(part + j, (first ? V{} : load_k(part + j, k)) + v, k);
  }
  void flush(int64_t n) const {
    if (!part) return;
    for (int64_t j = 0; j < n; j += io<T>::W) {
      int64_t k = std::min<int64_t>(io<T>::W, n - j);
      add_to(acc + j, load_k(part + j, k), k);
    }
  }
};

// Per-thread storage of ColumnSums for nt threads and n columns (empty when not wanted).
template <class T>
struct ColumnSumBuffers {
  std::vector<double> acc;
  std::vector<typename io<T>::C> part;
  int64_t n;
  ColumnSumBuffers(bool wanted, int nt, int64_t n_) : acc(wanted ? (size_t)nt * n_ : 0, 0.0),
                                                      part(wanted ? (size_t)nt * n_ : 0), n(n_) {}
  ColumnSums<T> of(int t) {
    if (acc.empty()) return {};
    return {acc.data() + (size_t)t * n, part.data() + (size_t)t * n};
  }
};

// Calls f(b0, b1) for the blocks of kSumBlockRows rows of [r0, r1) (f flushes its ColumnSums).
template <class F>
static inline void for_row_blocks(int64_t r0, int64_t r1, F&& f) {
  for (int64_t b0 = r0; b0 < r1; b0 += kSumBlockRows) f(b0, std::min(r1, b0 + kSumBlockRows));
}

// for_row_vectors over the rows [r0, r1) in blocks of kSumBlockRows, calling f(r, j, k, first)
// (first: r starts its block, the `first` of ColumnSums::add) and flushing each of `sums` after
// each block.
template <class T, class F, class... S>
static inline void for_summed_row_vectors(int64_t r0, int64_t r1, int64_t n, F&& f, const S&... sums) {
  for_row_blocks(r0, r1, [&](int64_t b0, int64_t b1) {
    for_row_vectors<T>(b0, b1, n, [&](int64_t r, int64_t j, int64_t k) { f(r, j, k, r == b0); });
    (sums.flush(n), ...);
  });
}

// out[j] = sum over t = 0..nt-1 of acc[t * n + j], in thread order (deterministic), rounded to T.
template <class T>
static void sum_thread_columns(const double* acc, int nt, int64_t n, T* out) {
  using IO = io<T>;
  for (int64_t j = 0; j < n; j += IO::W) {
    int64_t k = std::min<int64_t>(IO::W, n - j);
    typename IO::V v{};
    for (int64_t l = 0; l < k; ++l) {
      double total = 0;
      for (int t = 0; t < nt; ++t) total += acc[(size_t)t * n + j + l];
      v[l] = (typename IO::C)total;
    }
    store_n(out + j, v, k);
  }
}

// Threads for a problem of n items of cost_per_item work each: min(nthreads, n * cost / grain),
// so small problems stay on the calling thread. Also sizes per-thread scratch buffers.
static inline int threads_for(int64_t n, int64_t cost_per_item, int nthreads) {
  constexpr int64_t kGrain = 1 << 15;  // ~32K elements of work per thread at least
  int64_t want = std::max<int64_t>(1, (n * cost_per_item) / kGrain);
  return (int)std::min<int64_t>({(int64_t)std::max(nthreads, 1), want, std::max<int64_t>(n, 1)});
}

// Runs f(begin, end, thread_index) over [0, n) split into contiguous blocks, one per thread.
// Static contiguous blocks keep every result independent of scheduling (no atomics anywhere).
template <class F>
static void parallel_for(int64_t n, int64_t cost_per_item, int nthreads, F&& f) {
  int nt = threads_for(n, cost_per_item, nthreads);
#ifdef _OPENMP
  if (nt > 1) {
#pragma omp parallel num_threads(nt)
    {
      int t = omp_get_thread_num(), got = omp_get_num_threads();
      int64_t b = n * t / got, e = n * (t + 1) / got;
      if (b < e) f(b, e, t);
    }
    return;
  }
#endif
  if (n > 0) f(0, n, 0);
}

}  // namespace fl
