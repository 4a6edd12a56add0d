// Rotary position embeddings (Hugging Face's apply_rotary_pos_emb), q and k in one pass
// (csrc/rotary.h).
//
// Layout: each operand is a (n0, n1, n2, d) view with arbitrary strides on the leading dims and a
// contiguous last dim (e.g. (B, H, S, D) from `.view(B, S, H, D).transpose(1, 2)`): no copies.
// cos / sin are (n0, n1, n2, r) views broadcast to the operand (stride 0 over heads, typically);
// the visiting order (row_order) keeps their rows in cache across heads.
//
// Parallelism: the rows of q then the rows of k (each in the order of row_order below: memory
// order, cos / sin tiles reused across heads) form one index space split into contiguous blocks,
// one per thread (parallel_for): each output element is written by exactly one thread,
// in a fixed order of operations: deterministic, no atomics.
//
// Per row: rotate_half layout: vectors of W lanes over i in [0, r/2) read x[i], x[i + r/2] and
// the matching cos / sin lanes, write both halves; GPT-J layout: vectors over [0, r), the pair
// partner is the neighbouring lane (a shuffle). bf16 (AVX-512) takes 32 lanes a step in both
// layouts, as the even and the odd lanes of one load (load32 / store32). The pass-through tail
// [r, d) is copied.
// Bytes per row: reads d + 2r elements (cos / sin mostly from cache), writes d. ~3 flops/element.
//
// Rounding: fp32 / fp64 compute the formula in T (multiply-adds contracted into FMAs, one rounding
// per element). bf16 / fp16 round as eager's three ops in T do (PyTorch's CPU 16-bit ops compute each
// op in fp32 and round its result once): forward rnd(rnd(x*cos) + rnd(rotate(x)*sin)), backward
// rnd(rnd(g*cos) + rotate^T(rnd(g*sin))), with rnd = round_t below. The rounding between the
// products and the sum is a bit-level op (bf16) or a conversion instruction (fp16), so the compiler
// cannot contract them into an FMA (-ffp-contract=fast); negation commutes with rounding (RNE is
// symmetric), so x*c - rnd(x2*s) rounds as eager's x*c + (-x2)*s.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "rotary.h"

namespace fl {

namespace {

// Lanes (0 1)(2 3)... swapped: the pair partner of every lane (GPT-J layout).
inline vf swap_pairs(vf v) {
  return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
}
inline vd swap_pairs(vd v) { return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6); }

// -1 on even lanes, +1 on odd lanes.
template <class V> inline V even_minus() {
  V s{};
  for (int l = 0; l < (int)(sizeof(V) / sizeof(s[0])); ++l) s[l] = (l & 1) ? 1 : -1;
  return s;
}

// v rounded to T and back (the rounding eager applies between two ops in T); identity for fp32/fp64.
// In registers: io<T>::store's rounding without its trip through memory. Measured 2026-12-07 (2
// threads, busy machine), bf16 q (1, 32, 2048, 128) + k (1, 8, 2048, 128) forward, output buffers
// reused: 2.27 ms through memory, 1.65 ms in registers, 1.2 ms for the once-rounded formula before.
template <class T> inline typename io<T>::V round_t(typename io<T>::V v) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return v;
  } else if constexpr (std::is_same_v<T, bf16>) {
    // Round to nearest even at bit 16, as io<bf16>::store. No NaN case (store's keeps a NaN whose
    // payload sits in the low 16 bits from rounding into inf / across the sign): v is always a
    // product of two bf16 values, and such a NaN -- a bf16 input's, quieted, or the default NaN of
    // 0 * inf -- has zero low bits, which the rounding leaves as they are.
    const vu u = (vu)v;
    return (vf)((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
  } else {
#ifdef __AVX512F__
    return (vf)_mm512_cvtph_ps(_mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    T buf[io<T>::W];
    io<T>::store(buf, v);
    return io<T>::load(buf);
#endif
  }
}

// Hugging Face's rotate_half formula on one vector of each half: (o1, o2) from x1 = x[j..],
// x2 = x[h + j..] and the matching cos / sin lanes.
template <class T, bool Inverse, class V>
inline void rotate_half_math(V x1, V x2, V c1, V c2, V s1, V s2, V& o1, V& o2) {
  if constexpr (!Inverse) {  // rotate_half(x) = (-x2, x1)
    o1 = round_t<T>(x1 * c1) - round_t<T>(x2 * s1);
    o2 = round_t<T>(x2 * c2) + round_t<T>(x1 * s2);
  } else {                   // rotate_half^T(g * s) = (g2 s2, -g1 s1)
    o1 = round_t<T>(x1 * c1) + round_t<T>(x2 * s2);
    o2 = round_t<T>(x2 * c2) - round_t<T>(x1 * s1);
  }
}

#ifdef __AVX512F__
// 32 bf16 lanes as two fp32 vectors, the even lanes and the odd lanes (a bf16 is the top half of
// an fp32): one load and one op per 16 values, where io<bf16>::load takes a widening shuffle and a
// shift. The formula is per lane, so running it on the even and odd lanes apart changes nothing.
inline void load32(const bf16* p, vf& even, vf& odd) {
  const __m512i w = _mm512_loadu_si512(p);
  even = (vf)_mm512_slli_epi32(w, 16);
  odd = (vf)_mm512_and_si512(w, _mm512_set1_epi32((int)0xffff0000u));
}
// The inverse of load32, rounding each lane to bf16 as io<bf16>::store does: even lanes into the
// low halves, odd lanes into the top halves, one store. round_t's rounding suffices (no NaN case):
// every value stored is a sum of two round_t results, whose low 16 bits are zero, and so are a NaN
// operand's (propagated) and the default NaN's (inf - inf).
inline void store32(bf16* p, vf even, vf odd) {
  _mm512_storeu_si512(p, (__m512i)(((vu)round_t<bf16>(even) >> 16) | (vu)round_t<bf16>(odd)));
}
#endif

template <class T, bool Inverse>
inline void rotate_half_row(const T* x, T* o, const T* c, const T* s, int64_t r) {
  using IO = io<T>;
  using V = typename IO::V;
  constexpr int W = IO::W;
  const int64_t h = r / 2;
  int64_t j = 0;
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, bf16>) {
    // bf16 is compute-bound here (eager's three roundings per element): 32 lanes per step, split
    // into even and odd lanes, cost fewer instructions than two steps of 16. Measured 2026-12-07
    // (2 threads, outputs preallocated), forward of q (B, 32, S, D) + k (B, 8, S, D): 1.09 -> 0.78 ms
    // at (2, 1024, 64), 1.89 -> 1.62 ms at (1, 2048, 128).
    for (; j + 32 <= h; j += 32) {
      vf x1e, x1o, x2e, x2o, c1e, c1o, c2e, c2o, s1e, s1o, s2e, s2o, o1e, o1o, o2e, o2o;
      load32(x + j, x1e, x1o);
      load32(x + h + j, x2e, x2o);
      load32(c + j, c1e, c1o);
      load32(c + h + j, c2e, c2o);
      load32(s + j, s1e, s1o);
      load32(s + h + j, s2e, s2o);
      rotate_half_math<T, Inverse>(x1e, x2e, c1e, c2e, s1e, s2e, o1e, o2e);
      rotate_half_math<T, Inverse>(x1o, x2o, c1o, c2o, s1o, s2o, o1o, o2o);
      store32(o + j, o1e, o1o);
      store32(o + h + j, o2e, o2o);
    }
  }
#endif
  for (; j < h; j += W) {
    const int64_t k = std::min<int64_t>(W, h - j);
    const V x1 = load_k(x + j, k), x2 = load_k(x + h + j, k);
    const V c1 = load_k(c + j, k), c2 = load_k(c + h + j, k);
    const V s1 = load_k(s + j, k), s2 = load_k(s + h + j, k);
    V o1, o2;
    rotate_half_math<T, Inverse>(x1, x2, c1, c2, s1, s2, o1, o2);
    store_k(o + j, o1, k);
    store_k(o + h + j, o2, k);
  }
}

template <class T, bool Inverse>
inline void interleaved_row(const T* x, T* o, const T* c, const T* s, int64_t r) {
  using IO = io<T>;
  using V = typename IO::V;
  constexpr int W = IO::W;
  const V sgn = even_minus<V>();  // j and every tail length are even: pairs never straddle vectors
  int64_t j = 0;
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, bf16>) {
    // As rotate_half_row: 32 lanes a step as even / odd lanes, where a pair's partner is the same
    // lane of the other vector (no shuffle).
    for (; j + 32 <= r; j += 32) {
      vf xe, xo, ce, co, se, so, oe, oo;
      load32(x + j, xe, xo);
      load32(c + j, ce, co);
      load32(s + j, se, so);
      if constexpr (!Inverse) {  // [2i] = x[2i] c - x[2i+1] s, [2i+1] = x[2i+1] c + x[2i] s
        oe = round_t<T>(xe * ce) - round_t<T>(xo * se);
        oo = round_t<T>(xo * co) + round_t<T>(xe * so);
      } else {                   // [2i] = g[2i] c + (g s)[2i+1], [2i+1] = g[2i+1] c - (g s)[2i]
        oe = round_t<T>(xe * ce) + round_t<T>(xo * so);
        oo = round_t<T>(xo * co) - round_t<T>(xe * se);
      }
      store32(o + j, oe, oo);
    }
  }
#endif
  for (; j < r; j += W) {
    const int64_t k = std::min<int64_t>(W, r - j);
    const V v = load_k(x + j, k), cv = load_k(c + j, k), sv = load_k(s + j, k);
    V out;
    if constexpr (!Inverse) {  // rotate_every_two(x)[2i] = -x[2i+1], [2i+1] = x[2i]
      out = round_t<T>(v * cv) + sgn * round_t<T>(swap_pairs(v) * sv);
    } else {                   // its transpose applied to g * s: [2i] = +(gs)[2i+1], [2i+1] = -(gs)[2i]
      out = round_t<T>(v * cv) - sgn * swap_pairs(round_t<T>(v * sv));
    }
    store_k(o + j, out, k);
  }
}

// The order the rows are visited in. The three leading dims are permuted so that x's largest
// stride is outermost (memory order: Hugging Face hands q over as a (B, S, H, D) buffer viewed as
// (B, H, S, D); visiting it head by head strode 16 KB between 512-byte rows and read cos / sin once
// per head). After the permutation, when cos / sin are broadcast over the middle dim (heads) but
// not the inner one (positions) -- a contiguous (B, H, S, D) x -- the inner dim is cut into tiles of
// `tile` rows and every head runs over one tile before the next tile: the tile's cos / sin rows
// stay in L1 / L2 instead of being re-read from memory for each head (2048 x 128 fp32 cos and sin
// are 2 MiB, a core's whole L2). Row index -> (i0, tile, i1, j): i0 outer, then tiles, then the
// middle dim, then j within the tile; a tile of `tile` >= n2 rows is the plain order.
struct RowOrder {
  int perm[3];  // perm[k]: the operand's dim visited at level k
  int64_t n[3];
  int64_t tile;
};

template <class T>
RowOrder row_order(const RotaryOperand<T>& a, int64_t r) {
  RowOrder o;
  int p[3] = {0, 1, 2};
  // stable: size-1 dims (any stride) outermost, then by x's stride, largest first
  auto key = [&](int i) { return a.n[i] <= 1 ? INT64_MAX : a.xs[i]; };
  std::stable_sort(p, p + 3, [&](int u, int v) { return key(u) > key(v); });
  for (int k = 0; k < 3; ++k) {
    o.perm[k] = p[k];
    o.n[k] = a.n[p[k]];
  }
  const bool heads_broadcast = o.n[1] > 1 && a.cs[p[1]] == 0 && a.ss[p[1]] == 0 && (a.cs[p[2]] || a.ss[p[2]]);
  constexpr int64_t kTileBytes = 64 << 10;  // cos + sin rows of one tile
  o.tile = heads_broadcast ? std::max<int64_t>(1, kTileBytes / std::max<int64_t>(1, 2 * r * (int64_t)sizeof(T)))
                           : std::max<int64_t>(1, o.n[2]);
  return o;
}

// Rows [b, e) of operand a in the order of row_order.
template <class T, bool Inverse>
void rows(const RotaryOperand<T>& a, const RowOrder& ord, int64_t b, int64_t e, int64_t r, bool interleaved) {
  const int *pm = ord.perm;
  const int64_t n1 = ord.n[1], n2 = ord.n[2], P = ord.tile;
  const int64_t xs0 = a.xs[pm[0]], xs1 = a.xs[pm[1]], xs2 = a.xs[pm[2]];
  const int64_t os0 = a.os[pm[0]], os1 = a.os[pm[1]], os2 = a.os[pm[2]];
  const int64_t cs0 = a.cs[pm[0]], cs1 = a.cs[pm[1]], cs2 = a.cs[pm[2]];
  const int64_t ss0 = a.ss[pm[0]], ss1 = a.ss[pm[1]], ss2 = a.ss[pm[2]];
  const int64_t tail = a.d - r;
  // (i0, t, i1, j) of row b, then stepped row by row: 64-bit divisions per row cost more than a
  // 128-wide row's arithmetic (measured: 2x slower rows in cache). Tiles before the last are full
  // (n1 * P rows each); the last has len = n2 - t * P positions.
  const int64_t per0 = n1 * n2;
  int64_t i0 = b / per0, rem = b % per0;
  int64_t t = rem / (n1 * P);
  rem -= t * n1 * P;
  int64_t len = std::min(P, n2 - t * P);
  int64_t i1 = rem / len, j = rem % len;
  for (int64_t row = b; row < e; ++row) {
    const int64_t i2 = t * P + j;
    const T* x = a.x + i0 * xs0 + i1 * xs1 + i2 * xs2;
    T* o = a.out + i0 * os0 + i1 * os1 + i2 * os2;
    const T* c = a.cos + i0 * cs0 + i1 * cs1 + i2 * cs2;
    const T* s = a.sin + i0 * ss0 + i1 * ss1 + i2 * ss2;
    if (interleaved)
      interleaved_row<T, Inverse>(x, o, c, s, r);
    else
      rotate_half_row<T, Inverse>(x, o, c, s, r);
    if (tail > 0) std::memcpy(o + r, x + r, tail * sizeof(T));  // pass-through dims (and their gradient)
    if (++j == len) {
      j = 0;
      if (++i1 == n1) {
        i1 = 0;
        if ((++t) * P >= n2) {
          t = 0;
          ++i0;
        }
        len = std::min(P, n2 - t * P);
      }
    }
  }
}

}  // namespace

template <class T>
void rotary_apply(const RotaryOperand<T>& q, const RotaryOperand<T>& k, int64_t r, bool interleaved, bool inverse,
                  int nthreads) {
  const int64_t rq = q.n[0] * q.n[1] * q.n[2], rk = k.n[0] * k.n[1] * k.n[2];
  if (r == 0 && q.d == 0 && k.d == 0) return;
  const RowOrder oq = row_order(q, r), ok = row_order(k, r);
  const int64_t cost = std::max<int64_t>({q.d, k.d, 1});
  parallel_for(rq + rk, cost, nthreads, [&](int64_t b, int64_t e, int) {
    auto run = [&](const RotaryOperand<T>& a, const RowOrder& ord, int64_t lo, int64_t hi) {
      if (lo >= hi) return;
      if (inverse) rows<T, true>(a, ord, lo, hi, r, interleaved);
      else rows<T, false>(a, ord, lo, hi, r, interleaved);
    };
    run(q, oq, std::min(b, rq), std::min(e, rq));
    run(k, ok, std::max(b, rq) - rq, std::max(e, rq) - rq);
  });
}

#define FL_ROTARY(T) \
  template void rotary_apply<T>(const RotaryOperand<T>&, const RotaryOperand<T>&, int64_t, bool, bool, int);
FL_ROTARY(float)
FL_ROTARY(double)
FL_ROTARY(bf16)
FL_ROTARY(f16)
#undef FL_ROTARY

}  // namespace fl
