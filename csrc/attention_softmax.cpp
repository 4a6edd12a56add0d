// The attention-score softmax: y = softmax(mask(x * scale [+ mask])) over the last dim of contiguous
// (B, H, L, S) scores, forward and backward one pass per row (csrc/attention_softmax.h).
//
// Layout and parallelism: row r = (b, h, i) of the B*H*L rows sits at x + r*S; its mask row at
// b*sb + h*sh + i*sl, column j at + j*ss (strides in elements, 0 on broadcast dims: a (B|1, H|1,
// L|1, S|1) mask is read where it lies, never expanded). Rows are handed to the threads in blocks
// of kRowBlock, round robin (block k to thread k % nt): with causal masks a row's cost grows with i,
// and contiguous halves would give one thread three times the other's work when B*H is small.
// Each row is computed by one thread alone, so results do not depend on the schedule.
//
// Forward, per row, the structure of softmax.cpp's softmax_row: chunks of kChunkA elements that
// sit in L1 while they are worked on. Per chunk: z = round_T(round_T(x * scale) + mask) into a
// per-thread fp32 (fp64) scratch row -- rounded to T between the ops as eager's `scores * scale +
// mask` rounds them, so 16-bit results equal Hugging Face's eager expression --, -inf where the bool
// mask says so, its max m_c, e = exp(z - m_c) in place and s_c = sum(e) (fp32 blocks of 256, then
// fp64). Then M = max m_c, S = sum s_c exp(m_c - M), and y = e * exp(m_c - M) / S written once (y
// in U: T, or float32 for 16-bit T). Causal rows stop at column min(S, i + 1): the columns after it
// are neither read nor computed, only written (0; NaN when the row is NaN, as torch's exp(-inf - M)
// / NaN is). A NaN anywhere, or a +inf (exp(inf - inf)), makes the row NaN, as in torch; so does a
// row with every column masked (softmax over all -inf).
//   Bytes: reads B*H*L*S*sizeof(T) (causal: about half) + the mask's bytes, writes B*H*L*S*sizeof(U).
//   ~6 flops per element (mul, [add], max, sub, exp ~ 10, add, mul).
// Backward, per row: s = sum(dy * y) over the computed columns (plus dy * 0 over the causal tail,
// which is NaN exactly when a dy there is not finite, as eager's full-row sum is), then dx = keep ?
// (y * (dy - s)) * scale : 0, rounded once to T; masked columns get exact zeros (masked_fill's
// backward). Bytes: reads 2 * B*H*L*S*sizeof(U) (causal: dy whole, y about half), writes B*H*L*S*sizeof(T).
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "activations.h"
#include "attention_softmax.h"

namespace fl {

namespace {

constexpr int64_t kChunkA = 2048;  // elements per chunk (8 KiB of fp32 scratch)
constexpr int64_t kRowBlock = 16;  // rows per block handed to a thread

// Partial vectors (k < W lanes) at a row's ragged end -- every causal row has one: AVX-512 masked
// loads / stores for fp32, fp64 and 16-bit loads (no bounce through a padded buffer: measured
// 2026-12-07, 1 thread, (1, 8, 64, 128) fp32 causal forward 85 us against 45 us non-causal before);
// lanes >= k load as 0. Elsewhere load_n / store_n (common.h).
template <class T> inline typename io<T>::V load_part(const T* p, int64_t k) {
#ifdef __AVX512F__
  const __mmask16 m16 = (__mmask16)((1u << k) - 1);
  if constexpr (std::is_same_v<T, float>) return (vf)_mm512_maskz_loadu_ps(m16, p);
  if constexpr (std::is_same_v<T, double>) return (vd)_mm512_maskz_loadu_pd((__mmask8)m16, p);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  if constexpr (std::is_same_v<T, bf16>) {
    __m256i h = _mm256_maskz_loadu_epi16(m16, (const void*)p);
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
  }
  if constexpr (std::is_same_v<T, f16>) return (vf)_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m16, (const void*)p));
#endif
#endif
  return load_n(p, k);
}
template <class T> inline typename io<T>::V load_kk(const T* p, int64_t k) {
  return k == io<T>::W ? io<T>::load(p) : load_part(p, k);
}
template <class T> inline void store_kk(T* p, typename io<T>::V v, int64_t k) {
  if (k == io<T>::W) { io<T>::store(p, v); return; }
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float>) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << k) - 1), (__m512)v); return; }
  if constexpr (std::is_same_v<T, double>) { _mm512_mask_storeu_pd(p, (__mmask8)((1u << k) - 1), (__m512d)v); return; }
#endif
  store_n(p, v, k);
}

template <class V> inline V vmax2(V a, V b) { return a > b ? a : b; }

template <class V> inline auto hmax2(V v) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<V, vf>) return _mm512_reduce_max_ps((__m512)v);
  if constexpr (std::is_same_v<V, vd>) return _mm512_reduce_max_pd((__m512d)v);
#endif
  auto m = v[0];
  for (int i = 1; i < (int)(sizeof(V) / sizeof(v[0])); ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// Per-thread scratch kept between calls (OpenMP's pool threads persist): the z / exp row and the
// per-chunk maxima and sums.
template <class C> struct RowScratch {
  std::vector<C> e;
  std::vector<C> mc;
  std::vector<double> sc;
  void fit(int64_t n, int W) {
    const size_t ne = (size_t)((n + W - 1) / W * W), nc = (size_t)((n + kChunkA - 1) / kChunkA);
    if (e.size() < ne) e.resize(ne);
    if (mc.size() < nc) { mc.resize(nc); sc.resize(nc); }
  }
};

// One forward row: x (n scores), the row's mask (kind MK, element j at mrow[j * ss]), y (n outputs);
// columns [valid, n) are causally masked.
template <class T, class U, int MK>
void forward_row(const T* x, const void* mrow, int64_t ss, U* y, RowScratch<typename io<T>::C>& scr, int64_t n,
                 int64_t valid, typename io<T>::C scale, bool stream) {
  using IO = io<T>;
  using V = typename IO::V;
  using C = typename IO::C;
  constexpr int W = IO::W;
  const C ninf = -std::numeric_limits<C>::infinity();
  const C nan = std::numeric_limits<C>::quiet_NaN();
  C* e = scr.e.data();
  C* mc = scr.mc.data();
  double* sc = scr.sc.data();
  const bool do_scale = scale != C(1);
  const int64_t nchunks = (valid + kChunkA - 1) / kChunkA;
  decltype(V{} != V{}) bad{};  // lanes that saw a NaN
  C big_m = ninf;
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t j0 = c * kChunkA, j1 = std::min(valid, j0 + kChunkA);
    const int64_t jv1 = j0 + (j1 - j0 + W - 1) / W * W;  // padded to whole vectors with -inf
    // z = round(round(x * scale) + mask) into e
    for (int64_t j = j0; j < jv1; j += W) {
      const int64_t k = std::min<int64_t>(W, j1 - j);
      V v = load_kk(x + j, k);
      if (do_scale) v = round_to<T>(v * scale);
      if constexpr (MK == kAttnMaskFloat) {
        const T* mp = (const T*)mrow;
        V mv;
        if (ss == 1) {
          mv = load_kk(mp + j, k);
        } else {
          T buf[W];
          for (int64_t l = 0; l < k; ++l) buf[l] = mp[(j + l) * ss];
          mv = load_n(buf, k);  // (a gathered mask column: rare)
        }
        v = round_to<T>(v + mv);
      }
      if (k < W)
        for (int l = (int)k; l < W; ++l) v[l] = ninf;
      std::memcpy(e + j, &v, sizeof v);
    }
    if constexpr (MK == kAttnMaskBool) {
      const uint8_t* mb = (const uint8_t*)mrow;
      if (ss == 1) {
        for (int64_t j = j0; j < j1; ++j) e[j] = mb[j] ? e[j] : ninf;
      } else {
        for (int64_t j = j0; j < j1; ++j) e[j] = mb[j * ss] ? e[j] : ninf;
      }
    }
    V m0, m1;
    m0 = m1 = splat<V>(ninf);
    int64_t j = j0;
    for (; j + 2 * W <= jv1; j += 2 * W) {
      V a, b;
      std::memcpy(&a, e + j, sizeof a);
      std::memcpy(&b, e + j + W, sizeof b);
      m0 = vmax2(m0, a);
      m1 = vmax2(m1, b);
      bad |= (a != a) | (b != b);
    }
    if (j < jv1) {
      V a;
      std::memcpy(&a, e + j, sizeof a);
      m0 = vmax2(m0, a);
      bad |= (a != a);
    }
    const C m = hmax2(vmax2(m0, m1));
    mc[c] = m;
    big_m = m > big_m ? m : big_m;
    if (m == ninf) {  // only -inf here: zero weight (and finite scratch for the write pass)
      sc[c] = 0;
      std::fill(e + j0, e + jv1, C(0));
      continue;
    }
    sc[c] = blocked_sum<T>(j0, jv1, [&](int64_t jj) {
      V z;
      std::memcpy(&z, e + jj, sizeof z);
      V ex = vexp_nonpos(z - m);
      std::memcpy(e + jj, &ex, sizeof ex);
      return ex;
    });
  }
  bool any_nan = false;
  for (int l = 0; l < W; ++l) any_nan |= bad[l] != 0;
  double total = 0;
  auto rescale = [&](int64_t c) { return mc[c] == big_m ? 1.0 : std::exp((double)mc[c] - (double)big_m); };
  for (int64_t c = 0; c < nchunks; ++c)
    if (sc[c] != 0) total += sc[c] * rescale(c);
  if (big_m == ninf || any_nan) total = nan;  // an all-masked row, or a NaN in it

  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t j0 = c * kChunkA, j1 = std::min(valid, j0 + kChunkA);
    const C f = (C)(rescale(c) / total);  // 0 for an all -inf chunk (unless the row is NaN)
    int64_t j = j0;
    for (; j + W <= j1; j += W) {
      V ex;
      std::memcpy(&ex, e + j, sizeof ex);
      store_out(y + j, ex * f, stream);
    }
    if (j < j1) {
      V ex;
      std::memcpy(&ex, e + j, sizeof ex);
      store_kk(y + j, ex * f, j1 - j);
    }
  }
  if (valid < n) {  // the causal tail: 0, or NaN in a NaN row
    const V fill = splat<V>(std::isnan(total) ? nan : C(0));
    for (int64_t j = valid; j < n; j += W) store_kk(y + j, fill, std::min<int64_t>(W, n - j));
  }
}

// One backward row (see the file comment); mb: the row's bool mask (element j at mb[j * ss]) or null.
template <class T, class U>
void backward_row(const U* dy, const U* y, const uint8_t* mb, int64_t ss, T* dx, int64_t n, int64_t valid,
                  typename io<T>::C scale) {
  using IU = io<U>;
  using V = typename IU::V;
  using C = typename IU::C;
  constexpr int W = IU::W;
  double s = 0;
  for (int64_t b0 = 0; b0 < valid; b0 += 256) {
    const int64_t b1 = std::min(valid, b0 + 256);
    V acc{};
    for (int64_t j = b0; j < b1; j += W) {
      const int64_t k = std::min<int64_t>(W, b1 - j);
      acc += load_kk(dy + j, k) * load_kk(y + j, k);  // padding lanes are 0 * 0
    }
    s += hsum(acc);
  }
  if (valid < n) {  // y is 0 there: dy * 0 is NaN exactly where dy is not finite, as in eager's sum
    V acc{};
    for (int64_t j = valid; j < n; j += W) acc += load_kk(dy + j, std::min<int64_t>(W, n - j)) * C(0);
    s += hsum(acc);
  }
  const C sv = (C)s;
  for (int64_t j = 0; j < valid; j += W) {
    const int64_t k = std::min<int64_t>(W, valid - j);
    V r = (load_kk(y + j, k) * (load_kk(dy + j, k) - sv)) * scale;
    store_kk(dx + j, r, k);
  }
  if (mb) {
    if (ss == 1) {
      for (int64_t j = 0; j < valid; ++j)
        if (!mb[j]) dx[j] = T{};
    } else {
      for (int64_t j = 0; j < valid; ++j)
        if (!mb[j * ss]) dx[j] = T{};
    }
  }
  if (valid < n) std::memset((void*)(dx + valid), 0, (size_t)(n - valid) * sizeof(T));  // +0 in every type
}

// Calls f(r, b, h, i, t) for every row r = (b, h, i), blocks of kRowBlock rows round robin over threads;
// fence: each thread orders its streamed stores (sfence) before the region ends.
template <class F>
void for_rows(int64_t B, int64_t H, int64_t L, int64_t S, int nthreads, bool fence, F&& f) {
  const int64_t rows = B * H * L, nblk = (rows + kRowBlock - 1) / kRowBlock;
  const int nt = threads_for(rows, S, nthreads);
  auto run = [&](int t, int got) {
    for (int64_t blk = t; blk < nblk; blk += got)
      for (int64_t r = blk * kRowBlock; r < std::min(rows, (blk + 1) * kRowBlock); ++r) {
        const int64_t i = r % L, bh = r / L;
        f(r, bh / H, bh % H, i, t);
      }
#ifdef __AVX512F__
    if (fence) _mm_sfence();
#endif
    (void)fence;
  };
#ifdef _OPENMP
  if (nt > 1) {
#pragma omp parallel num_threads(nt)
    run(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  if (rows > 0) run(0, 1);
}

}  // namespace

template <class T, class U>
void attention_softmax_forward(const T* x, AttnMask mask, U* y, int64_t B, int64_t H, int64_t L, int64_t S,
                               double scale, bool causal, int nthreads) {
  using C = typename io<T>::C;
  if (B * H * L == 0 || S == 0) return;
  const bool stream = std::is_same_v<U, float> && B * H * L * S * (int64_t)sizeof(U) >= (int64_t(4) << 20) &&
                      (S * sizeof(U)) % 64 == 0 && (uintptr_t)y % 64 == 0;
  for_rows(B, H, L, S, nthreads, stream, [&](int64_t r, int64_t b, int64_t h, int64_t i, int) {
    thread_local RowScratch<C> scr;
    scr.fit(S, io<T>::W);
    const int64_t valid = causal ? std::min(S, i + 1) : S;
    const int64_t moff = b * mask.sb + h * mask.sh + i * mask.sl;
    const T* xr = x + r * S;
    U* yr = y + r * S;
    switch (mask.kind) {
      case kAttnMaskBool:
        forward_row<T, U, kAttnMaskBool>(xr, (const uint8_t*)mask.p + moff, mask.ss, yr, scr, S, valid, (C)scale, stream);
        break;
      case kAttnMaskFloat:
        forward_row<T, U, kAttnMaskFloat>(xr, (const T*)mask.p + moff, mask.ss, yr, scr, S, valid, (C)scale, stream);
        break;
      default:
        forward_row<T, U, kAttnMaskNone>(xr, nullptr, 0, yr, scr, S, valid, (C)scale, stream);
    }
  });
}

template <class T, class U>
void attention_softmax_backward(const U* dy, const U* y, AttnMask mask, T* dx, int64_t B, int64_t H, int64_t L,
                                int64_t S, double scale, bool causal, int nthreads) {
  using C = typename io<T>::C;
  if (B * H * L == 0 || S == 0) return;
  const bool has_bool = mask.kind == kAttnMaskBool;
  for_rows(B, H, L, S, nthreads, false, [&](int64_t r, int64_t b, int64_t h, int64_t i, int) {
    const int64_t valid = causal ? std::min(S, i + 1) : S;
    const uint8_t* mb = has_bool ? (const uint8_t*)mask.p + b * mask.sb + h * mask.sh + i * mask.sl : nullptr;
    backward_row<T, U>(dy + r * S, y + r * S, mb, mask.ss, dx + r * S, S, valid, (C)scale);
  });
}

#define FL_ATTN_INSTANTIATE(T, U)                                                                             \
  template void attention_softmax_forward<T, U>(const T*, AttnMask, U*, int64_t, int64_t, int64_t, int64_t,   \
                                                double, bool, int);                                          \
  template void attention_softmax_backward<T, U>(const U*, const U*, AttnMask, T*, int64_t, int64_t, int64_t, \
                                                 int64_t, double, bool, int);
FL_ATTN_INSTANTIATE(float, float)
FL_ATTN_INSTANTIATE(double, double)
FL_ATTN_INSTANTIATE(bf16, bf16)
FL_ATTN_INSTANTIATE(f16, f16)
FL_ATTN_INSTANTIATE(bf16, float)
FL_ATTN_INSTANTIATE(f16, float)

}  // namespace fl
