// Linear layers for the CPU with float32 activations and float32, int8 or int4 weights, and for
// int8 / int4 weights with int8 activations (the `_q8` ops, further down) (built by cpu_kernels.py).
//
// y[m, n] = sum_k x[m, k] * w[n, k]. Decoding is bound by reading the weights, so each weight is
// converted to float32 in registers as it streams by and never written back; a tile of NB output
// channels is read once for up to MB rows of x (the rows of a speculative verify pass).
//
// Every y[m, n] is reduced by the same sequence of instructions whatever the number of rows and
// whichever tile the row lands in, so a row's result does not depend on the rows beside it: the
// verify pass over k + 1 <= 16 rows gets bitwise the products that k + 1 one-row steps would.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr int W = 16;  // float32 lanes per vector
using V = __m512;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline V vset1(float a) { return _mm512_set1_ps(a); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(V a) { return _mm512_reduce_add_ps(a); }
inline void vstore(float* p, V a) { _mm512_storeu_ps(p, a); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vload_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// bfloat16 to float32 is exact: the 16 bits become a float32's high half
inline V vload(const at::BFloat16* p) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
// 16 bytes hold 32 int4 codes: byte i has code i in its low nibble and code i + 16 in its high one
inline void vload_u4x32(const uint8_t* p, V* q) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), lo = _mm_set1_epi8(15);
  q[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, lo)));
  q[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), lo)));
}
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
inline float vmax_all(V a) { return _mm512_reduce_max_ps(a); }
inline V vround(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V vpow2(V p, V n) { return _mm512_scalef_ps(p, n); }  // p * 2^n
inline bool vany_eq(V a, float b) { return _mm512_cmp_ps_mask(a, _mm512_set1_ps(b), _CMP_EQ_OQ) != 0; }
// lane i = the sum of a[i]'s lanes, for i < 16: a transpose and add, one tree for every a[i]
inline V vsum_each(const V* a) {
  V c[8], d[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit chunk: [x0 + x2, y0 + y2, x1 + x3, y1 + y3]
    c[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per chunk: the chunk's sums of a[4i..4i+3]
    d[i] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const V f0 = _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const V f1 = _mm512_add_ps(_mm512_shuffle_f32x4(d[2], d[3], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(d[2], d[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(f0, f1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(f0, f1, _MM_SHUFFLE(3, 1, 3, 1)));
}
const char* kIsa = "avx512";
#define VECTOR_EXP 1

#elif defined(__AVX2__) && defined(__FMA__)
constexpr int W = 8;
using V = __m256;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline V vset1(float a) { return _mm256_set1_ps(a); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, V a) { _mm256_storeu_ps(p, a); }
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline float vsum(V a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline V vload_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline V vload(const at::BFloat16* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
}
inline void vload_u4x32(const uint8_t* p, V* q) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), lo = _mm_set1_epi8(15);
  const __m128i l = _mm_and_si128(b, lo), h = _mm_and_si128(_mm_srli_epi16(b, 4), lo);
  q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(l));
  q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(l, 8)));
  q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(h));
  q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(h, 8)));
}
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
inline float vmax_all(V a) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
inline V vround(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline bool vany_eq(V a, float b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_set1_ps(b), _CMP_EQ_OQ)) != 0; }
inline V vpow2(V p, V n) {  // p * 2^n for integral n in [-126, 127]
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
// lane i = the sum of a[i]'s lanes, for i < 8: a transpose and add, one tree for every a[i]
inline V vsum_each(const V* a) {
  const V d0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const V d1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(d0, d1, 0x20), _mm256_permute2f128_ps(d0, d1, 0x31));
}
const char* kIsa = "avx2";
#define VECTOR_EXP 1

#else  // portable: the compiler vectorizes what it can
constexpr int W = 1;
using V = float;
inline V vzero() { return 0.f; }
inline V vload(const float* p) { return *p; }
inline V vset1(float a) { return a; }
inline V vfma(V a, V b, V c) { return a * b + c; }
inline float vsum(V a) { return a; }
inline void vstore(float* p, V a) { *p = a; }
inline V vmul(V a, V b) { return a * b; }
inline V vload_i8(const int8_t* p) { return static_cast<float>(*p); }
inline V vload(const at::BFloat16* p) { return static_cast<float>(*p); }
inline void vload_u4x32(const uint8_t* p, V* q) {
  for (int i = 0; i < 16; ++i) {
    q[i] = static_cast<float>(p[i] & 15);
    q[i + 16] = static_cast<float>(p[i] >> 4);
  }
}
inline void prefetch(const void*) {}
inline V vadd(V a, V b) { return a + b; }
inline V vmax(V a, V b) { return std::max(a, b); }
inline float vmax_all(V a) { return a; }
inline V vsum_each(const V* a) { return a[0]; }
inline bool vany_eq(V a, float b) { return a == b; }
const char* kIsa = "portable";
#endif

#ifdef VECTOR_EXP
// exp(x) for x <= 0 (softmax's exponent): x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so
// n ln2 is exact), e^r by its degree-7 Taylor polynomial (error below 1e-8 relative), times 2^n;
// below -87 it clamps (e^-87 is 1.6e-38: weights that small vanish against the largest, 1). The
// max's operands in this order keep a NaN (max returns its second operand when one is NaN), so a
// model gone NaN still says so in its output.
inline V vexp(V x) {
  x = vmax(vset1(-87.f), x);
  const V n = vround(vmul(x, vset1(1.44269504088896341f)));
  V r = vfma(n, vset1(-0.693145751953125f), x);
  r = vfma(n, vset1(-1.42860682030941723212e-6f), r);
  V p = vset1(1.f / 5040);
  p = vfma(p, r, vset1(1.f / 720));
  p = vfma(p, r, vset1(1.f / 120));
  p = vfma(p, r, vset1(1.f / 24));
  p = vfma(p, r, vset1(1.f / 6));
  p = vfma(p, r, vset1(0.5f));
  p = vfma(p, r, vset1(1.f));
  p = vfma(p, r, vset1(1.f));
  return vpow2(p, n);
}
#else
inline V vexp(V x) { return std::exp(x); }
#endif

constexpr int MT = 4;  // rows of x per tile
constexpr int NT = 4;  // output channels per tile
// Weights are prefetched this many tiles ahead into L2 (more misses in flight than the L1 allows:
// the head's 28 MB streamed at 13 GB/s with the next tile prefetched into L1, 19.6 with this).
constexpr int kAhead = 2;

// An int4 tile's scales and biases (n values from sc and bi): those of the tile after next are
// prefetched with its codes (g32: a third of the bytes)
inline void prefetch_group_scales(const float* sc, const float* bi, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    prefetch(sc + kAhead * n + i);
    prefetch(bi + kAhead * n + i);
  }
}

inline V vload_w(const float* p) { return vload(p); }
inline V vload_w(const int8_t* p) { return vload_i8(p); }

// y[m * ldy + n] for m < MB, n < NB; x and w rows are K long; float32 weights have no scales.
template <typename T, int MB, int NB>
void dense_tile(const float* x, const T* w, const float* scales, float* y, int64_t K, int64_t ldy) {
  V acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = vzero();
  const int64_t kv = K - K % W;
  for (int64_t k = 0; k < kv; k += W) {
    if (k * sizeof(T) % 64 == 0)  // one prefetch per cache line
      for (int n = 0; n < NB; ++n) prefetch(w + (n + kAhead * NB) * K + k);
    V xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = vload(x + m * K + k);
    for (int n = 0; n < NB; ++n) {
      const V wv = vload_w(w + n * K + k);
      for (int m = 0; m < MB; ++m) acc[m][n] = vfma(wv, xv[m], acc[m][n]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) {
      float s = vsum(acc[m][n]);
      for (int64_t k = kv; k < K; ++k) s += x[m * K + k] * static_cast<float>(w[n * K + k]);
      y[m * ldy + n] = scales ? s * scales[n] : s;
    }
}

// int4: w = q * scale + bias per group of G input channels; K % 32 == 0 and G % 32 == 0.
template <int MB, int NB>
void int4_tile(const float* x, const uint8_t* w, const float* scales, const float* biases, float* y,
               int64_t K, int64_t G, int64_t ldy) {
  constexpr int Q = 32 / W;  // vectors per 32 codes
  const int64_t groups = K / G, row_bytes = K / 2;
  V acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = vzero();
  for (int64_t k = 0; k < K; k += 32) {
    if (k % 128 == 0)
      for (int n = 0; n < NB; ++n) prefetch(w + (n + kAhead * NB) * row_bytes + k / 2);
    V xv[MB][Q];
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < Q; ++j) xv[m][j] = vload(x + m * K + k + j * W);
    const int64_t g = k / G;
    for (int n = 0; n < NB; ++n) {
      V q[Q];
      vload_u4x32(w + n * row_bytes + k / 2, q);
      const V s = vset1(scales[n * groups + g]), b = vset1(biases[n * groups + g]);
      for (int j = 0; j < Q; ++j) {
        const V wv = vfma(q[j], s, b);
        for (int m = 0; m < MB; ++m) acc[m][n] = vfma(wv, xv[m][j], acc[m][n]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) y[m * ldy + n] = vsum(acc[m][n]);
}

template <typename T>
using DenseFn = void (*)(const float*, const T*, const float*, float*, int64_t, int64_t);
using Int4Fn = void (*)(const float*, const uint8_t*, const float*, const float*, float*, int64_t, int64_t, int64_t);

// Tile tables: [MB - 1][NB - 1] -> T<MB, NB>::run, the tile of MB rows x NB channels
template <typename Fn, template <int, int> class T, int MB, int... N>
constexpr std::array<Fn, sizeof...(N)> tile_row(std::integer_sequence<int, N...>) {
  return {T<MB, N + 1>::run...};
}
template <typename Fn, template <int, int> class T, int Channels, int... M>
constexpr std::array<std::array<Fn, Channels>, sizeof...(M)> tile_rows(std::integer_sequence<int, M...>) {
  return {tile_row<Fn, T, M + 1>(std::make_integer_sequence<int, Channels>())...};
}
template <typename Fn, template <int, int> class T, int Rows, int Channels>
constexpr auto tile_table() {
  return tile_rows<Fn, T, Channels>(std::make_integer_sequence<int, Rows>());
}
// float32 weights with W output channels in the vector lanes, [N / W, K, W] (cpu_kernels.pack_float):
// per lane group of W channels, the K input channels in turn, each a vector of the W channels'
// weights. Each row's activation is broadcast and multiplied into NV lane groups at once, so output
// lane n is one running sum over k = 0 .. K - 1, the same whatever the tile's row count (every row
// count is row-invariant, prompts included), with no horizontal sum and a row's activations read as
// scalars (the rows' layout reads a vector of them per FMA pair and ends each output with a
// horizontal sum). Against the rows' layout on SmolLM2's linears (BENCHMARKS.md, "float32 weights
// with channels in the lanes"): 1 row 1.04x, 16 rows 1.19x (1.47x with the spans below, in a run
// where memory was faster), 32 rows 1.5x (the rows' layout then takes MKL's GEMM), 512 rows even.
constexpr int kFloatLaneHalf = W == 16 ? 8 : 4;    // rows a register tile: 8 x 3 (AVX-512) or 4 x 2 (AVX2) accumulators
// A tile of more rows (a verify pass of 9-16) runs two register tiles span by span of inputs, the
// sums kept in L1 between spans, so each span of weights comes from memory once and is read again
// from L1 at once: 16 rows 5-9% faster than two passes over the whole tile (BENCHMARKS.md). Only the
// first register tile's span waits on memory, the second's computes from L1, so the shorter the
// spans the more evenly the weights stream: when both register tiles have 2 or more rows, spans of
// kFloatLaneShortSpan (16 rows 4.5% faster than spans of 64 on the AVX-512 Xeon; the AVX2 build,
// 6-16 rows, 1-3%); a second tile of one row costs less than the sums' extra stores (9 rows, 1%).
constexpr int kFloatLaneRows = 2 * kFloatLaneHalf;
constexpr int64_t kFloatLaneSpan = 64;
constexpr int64_t kFloatLaneShortSpan = W == 16 ? 8 : 16;
constexpr int kFloatLaneGroups = W == 16 ? 3 : 2;  // lane groups a tile
// With AVX-512 a tile of 4 or more rows prefetches the next tile's weights into L2; fewer rows
// leave it to the hardware's streamer, which kept ahead better (1 row: 29.4 -> 26.0 ms a step of
// linears) while more rows lose to it (16 rows: 40.2 -> 43.3); prefetching 2-8 tiles ahead was
// slower than 1. The AVX2 build's one-row tiles fell 16% behind its rows' layout without
// prefetches (18.9 against 16.2 ms), and even with them (16.6 / 16.2), so there every tile prefetches.
constexpr int kFloatLanePrefetchRows = W == 16 ? 4 : 1;
// Inputs k0 .. k1 - 1 into the running sums of MB rows x NV lane groups, kept in `sums` between calls
template <int MB, int NV>
inline void float_lanes_span(const float* x, const float* w, int64_t K, int64_t k0, int64_t k1, V* sums, bool fetch) {
  const int64_t panel = K * W;  // floats a lane group
  V acc[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = k0 == 0 ? vzero() : sums[m * NV + v];
  for (int64_t k = k0; k < k1; ++k) {
    if (fetch && k * W * 4 % 64 == 0)  // one prefetch per cache line
      for (int v = 0; v < NV; ++v) prefetch(w + (v + NV) * panel + k * W);
    V wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = vload(w + v * panel + k * W);
    for (int m = 0; m < MB; ++m) {
      const V xb = vset1(x[m * K + k]);
      for (int v = 0; v < NV; ++v) acc[m][v] = vfma(wv[v], xb, acc[m][v]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) sums[m * NV + v] = acc[m][v];
}

template <int MB, int NV>
void float_lanes_tile(const float* x, const float* w, const float*, float* y, int64_t K, int64_t ldy) {
  constexpr int kHalf = MB > kFloatLaneHalf ? kFloatLaneHalf : MB;
  constexpr int kRest = MB - kHalf > 0 ? MB - kHalf : 1;
  alignas(64) V a[kHalf * NV], b[kRest * NV];
  const int64_t span = MB <= kFloatLaneHalf ? K : kRest >= 2 ? kFloatLaneShortSpan : kFloatLaneSpan;
  for (int64_t k0 = 0; k0 < K; k0 += span) {
    const int64_t k1 = std::min(K, k0 + span);
    float_lanes_span<kHalf, NV>(x, w, K, k0, k1, a, MB >= kFloatLanePrefetchRows);
    if (MB > kFloatLaneHalf) float_lanes_span<kRest, NV>(x + kHalf * K, w, K, k0, k1, b, false);
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) vstore(y + m * ldy + v * W, m < kHalf ? a[m * NV + v] : b[(m - kHalf) * NV + v]);
}
template <int MB, int NV> struct FloatLanesTile { static constexpr DenseFn<float> run = float_lanes_tile<MB, NV>; };
const auto kFloatLanesTiles = tile_table<DenseFn<float>, FloatLanesTile, kFloatLaneRows, kFloatLaneGroups>();

template <int MB, int NB> struct Int8Tile { static constexpr DenseFn<int8_t> run = dense_tile<int8_t, MB, NB>; };
template <int MB, int NB> struct FloatTile { static constexpr DenseFn<float> run = dense_tile<float, MB, NB>; };
template <int MB, int NB> struct Int4Tile { static constexpr Int4Fn run = int4_tile<MB, NB>; };
const auto kInt8Tiles = tile_table<DenseFn<int8_t>, Int8Tile, MT, NT>();
const auto kFloatTiles = tile_table<DenseFn<float>, FloatTile, MT, NT>();
const auto kInt4Tiles = tile_table<Int4Fn, Int4Tile, MT, NT>();

// int4 weights with W output channels in the vector lanes (W = 16 in the AVX-512 VNNI builds, 8 in
// the AVX2 ones; cpu_kernels.pack_int4 makes this layout where N % W == 0 and the activations are
// int8, the rows' layout above otherwise). The weight is [N / W, K / 8, 4W] bytes: for channels
// Wv .. Wv + W - 1 and input channels k0 = 8o .. 8o + 7 (an "octet"), byte 4c + j holds channel
// Wv + c's code at k0 + j in its low nibble and at k0 + 4 + j in its high one; scales and biases are
// [N / W, groups, W]. One load unpacks (a mask; a shift and a mask) into two vectors whose 32-bit
// lane c holds channel c's 4 codes at k0 .. k0 + 3 (k0 + 4 .. k0 + 7), so one integer dot against a
// row's 4 activation codes, broadcast, multiplies W channels at once and lane c ends as output c,
// with no horizontal sum (the `_q8` tile below; BENCHMARKS.md, "int4 with 16 channels in the
// lanes"). Integer parts: LI (a vector of W 32-bit lanes), li_bcast4, unpack_octet, lane_dot (a
// running dot of codes against broadcast activation quads), lane_sum (two running dots as float32),
// lane_shuffle and lane_float (for LanePick).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define INT4_LANES 1
using LI = __m512i;
inline LI li_zero() { return _mm512_setzero_si512(); }
// 4 bytes at p in every 32-bit lane: one broadcast load (no shuffle-port uop)
inline LI li_bcast4(const void* p) { return _mm512_broadcastd_epi32(_mm_loadu_si32(p)); }
inline void unpack_octet(const uint8_t* p, LI* lo, LI* hi) {
  const LI raw = _mm512_loadu_si512(p), low4 = _mm512_set1_epi8(15);
  *lo = _mm512_and_si512(raw, low4);
  *hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
}
// dpbusd: int32 sums, exact
inline LI lane_dot(LI acc, LI q, LI x) { return _mm512_dpbusd_epi32(acc, q, x); }
inline V lane_sum(LI a, LI b) { return _mm512_cvtepi32_ps(_mm512_add_epi32(a, b)); }
inline LI lane_shuffle(LI q, LI pick) { return _mm512_shuffle_epi8(q, pick); }
inline V lane_float(LI a) { return _mm512_cvtepi32_ps(a); }
inline LI li_load(const void* p) { return _mm512_loadu_si512(p); }
inline LI lane_add(LI a, LI b) { return _mm512_add_epi32(a, b); }
// int8 weights against signed activation codes (int8_lanes_q8_tile): dpbusd takes its first operand
// unsigned, so the weights go in as w + 128 (a flip of the sign bit, once per load for all rows) and
// a block's dot is sum((w + 128) x) = sum(w x) + 128 * sum(x), corrected by the row's code sum
constexpr int32_t kI8Offset = 128;
struct I8Quad {
  LI w;
  void set(LI w_) { w = _mm512_xor_si512(w_, _mm512_set1_epi8(static_cast<char>(0x80))); }
  LI dot(LI acc, LI x) const { return _mm512_dpbusd_epi32(acc, w, x); }
};
inline LI li_set1(int32_t a) { return _mm512_set1_epi32(a); }
#elif defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define INT4_LANES 1
using LI = __m256i;
inline LI li_zero() { return _mm256_setzero_si256(); }
inline LI li_bcast4(const void* p) { return _mm256_broadcastd_epi32(_mm_loadu_si32(p)); }
inline void unpack_octet(const uint8_t* p, LI* lo, LI* hi) {
  const LI raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), low4 = _mm256_set1_epi8(15);
  *lo = _mm256_and_si256(raw, low4);
  *hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
}
// maddubs (codes unsigned, activations signed) into int16 sums: a pair of products is at most
// 2 * 15 * 127 = 3810, so a running dot stays exact over 4 octets' halves (15240) and the two of a
// block of 32 together too (30480 < 32767); lane_sum widens the pairs to int32 with madd.
inline LI lane_dot(LI acc, LI q, LI x) { return _mm256_add_epi16(acc, _mm256_maddubs_epi16(q, x)); }
inline V lane_sum(LI a, LI b) {
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_add_epi16(a, b), _mm256_set1_epi16(1)));
}
inline LI lane_shuffle(LI q, LI pick) { return _mm256_shuffle_epi8(q, pick); }
inline V lane_float(LI a) { return _mm256_cvtepi32_ps(a); }
inline LI li_load(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline LI lane_add(LI a, LI b) { return _mm256_add_epi32(a, b); }
inline LI li_set1(int32_t a) { return _mm256_set1_epi32(a); }
// int8 weights against signed activation codes: the sign trick (maddubs of |w| and x * sign(w): a
// pair of products is at most 2 * 127 * 127 = 32258, no int16 saturation), widened to int32 (madd)
constexpr int32_t kI8Offset = 0;
struct I8Quad {
  LI w, wabs;
  void set(LI w_) {
    w = w_;
    wabs = _mm256_abs_epi8(w_);
  }
  LI dot(LI acc, LI x) const {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1)));
  }
};
#endif

#ifdef INT4_LANES
constexpr int64_t kLanes = W;  // output channels a lane group
constexpr int64_t kOctetBytes = 4 * kLanes;  // one lane group's 8 input channels
// pick[j] moves byte j of each 32-bit lane to the lane's low byte and zeroes the rest (shuffle_epi8
// indexes within 128 bits: lane i of those 4 starts at byte 4i)
struct LanePick {
  LI pick[4];
  LanePick() {
    uint32_t lanes[kLanes];
    for (int j = 0; j < 4; ++j) {
      for (int i = 0; i < kLanes; ++i) lanes[i] = 0x80808000u | (4 * (i % 4) + j);
      std::memcpy(&pick[j], lanes, sizeof(pick[j]));
    }
  }
  // the lane group's codes at k0 + j (j < 4 of a vector from unpack_octet) as float32
  V codes(LI q, int j) const { return lane_float(lane_shuffle(q, pick[j])); }
};

#ifdef __AVX512F__
#define LANES_OCTET_LOOP
constexpr int kLaneTiles = 2;   // lane groups a tile of the float32-activation tiles (up to MT rows)
constexpr int kLaneQ8Rows = 8;  // rows a tile of the _q8 tiles (int4_linear_q8) ...
constexpr int kLaneWideRows = 4;  // ... of which up to this many take kLaneTiles lane groups, more one
constexpr int kDotChains = 2;   // running dots a (row, lane group): dpbusd's latency
#else
// 16 vector registers: unrolled, the octets' dots were all computed first and spilled to the stack
#define LANES_OCTET_LOOP _Pragma("GCC unroll 1")
constexpr int kLaneTiles = 1;
constexpr int kLaneQ8Rows = 4;
constexpr int kLaneWideRows = 4;
constexpr int kDotChains = 1;   // maddubs + add: a one-cycle chain
#endif

// Float32 activations: per group of G input channels, sum_k x[m, k] * code[n, k] (a lane group a
// vector: each code converted once for all the tile's rows, each row's activation broadcast); at the
// group's end acc += that sum * scale[n, g] + bias[n, g] * (the group's sum of x[m]). So no weight
// is dequantized, and every output is reduced in one order whatever the tile (row-invariant).
template <int MB, int NV>
void int4_lanes_tile(const float* x, const uint8_t* w, const float* sc, const float* bi, float* y,
                     int64_t K, int64_t G, int64_t ldy) {
  const int64_t groups = K / G, group_bytes = kLanes * K / 2;
  static const LanePick lp;
  prefetch_group_scales(sc, bi, NV * groups * kLanes);
  V acc[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = vzero();
  for (int64_t g = 0; g < groups; ++g) {
    V part[MB][NV];
    for (int m = 0; m < MB; ++m)
      for (int v = 0; v < NV; ++v) part[m][v] = vzero();
    for (int64_t o = g * G / 8; o < (g + 1) * G / 8; ++o) {
      LI q[NV][2];
      for (int v = 0; v < NV; ++v) {
        const uint8_t* p = w + v * group_bytes + o * kOctetBytes;
        prefetch(p + kAhead * NV * group_bytes);
        unpack_octet(p, &q[v][0], &q[v][1]);
      }
      for (int j = 0; j < 8; ++j) {
        V xb[MB];
        for (int m = 0; m < MB; ++m) xb[m] = vset1(x[m * K + 8 * o + j]);
        for (int v = 0; v < NV; ++v) {
          const V c = lp.codes(q[v][j / 4], j % 4);
          for (int m = 0; m < MB; ++m) part[m][v] = vfma(c, xb[m], part[m][v]);
        }
      }
    }
    for (int m = 0; m < MB; ++m) {
      V xs = vzero();  // the group's sum of x[m]: W lanes, then their sum
      for (int64_t k = g * G; k < (g + 1) * G; k += W) xs = vadd(xs, vload(x + m * K + k));
      const V xsum = vset1(vsum(xs));
      for (int v = 0; v < NV; ++v) {
        const V s = vload(sc + (v * groups + g) * kLanes), b = vload(bi + (v * groups + g) * kLanes);
        acc[m][v] = vfma(b, xsum, vfma(part[m][v], s, acc[m][v]));
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) vstore(y + m * ldy + v * kLanes, acc[m][v]);
}
template <int MB, int NV> struct Int4LanesTile { static constexpr Int4Fn run = int4_lanes_tile<MB, NV>; };
const auto kInt4LanesTiles = tile_table<Int4Fn, Int4LanesTile, MT, kLaneTiles>();

// Channels Wv .. Wv + W - 1 (w, sc and bi at their group) dequantized to out [W, K] (prompts: the
// dequantize + GEMM path): per octet and 4 (AVX-512) or 2 (AVX2) channels, their codes widened to
// float32, scaled (each channel's scale spread over its 4 lanes), and stored 4 values a channel.
inline void dequantize_lanes(const uint8_t* w, const float* sc, const float* bi, int64_t K, int64_t G, float* out) {
  const __m128i low4 = _mm_set1_epi8(15);
#ifdef __AVX512F__
  constexpr int kPer = 4;  // channels a vector
  __m512i spread[4];  // lane l of part h: channel 4h + l / 4
  for (int h = 0; h < 4; ++h)
    spread[h] = _mm512_add_epi32(_mm512_set1_epi32(4 * h), _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0));
#else
  constexpr int kPer = 2;
  __m256i spread[4];  // lane l of part h: channel 2h + l / 4
  for (int h = 0; h < 4; ++h) spread[h] = _mm256_add_epi32(_mm256_set1_epi32(2 * h), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
#endif
  V s4[4], b4[4];
  alignas(64) float f[W];
  for (int64_t o = 0; o < K / 8; ++o) {
    const int64_t k0 = 8 * o;
    if (k0 % G == 0) {
      const V s = vload(sc + k0 / G * kLanes), b = vload(bi + k0 / G * kLanes);
      for (int h = 0; h < 4; ++h) {
#ifdef __AVX512F__
        s4[h] = _mm512_permutexvar_ps(spread[h], s);
        b4[h] = _mm512_permutexvar_ps(spread[h], b);
#else
        s4[h] = _mm256_permutevar8x32_ps(s, spread[h]);
        b4[h] = _mm256_permutevar8x32_ps(b, spread[h]);
#endif
      }
    }
    for (int h = 0; h < 4; ++h) {  // channels kPer h ..: 4 codes each (low nibbles), then 4 more (high)
      const uint8_t* src = w + o * kOctetBytes + 4 * kPer * h;
#ifdef __AVX512F__
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
#else
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
#endif
      for (int half = 0; half < 2; ++half) {
        const __m128i c = _mm_and_si128(half ? _mm_srli_epi16(raw, 4) : raw, low4);
#ifdef __AVX512F__
        const V codes = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c));
#else
        const V codes = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c));
#endif
        vstore(f, vfma(codes, s4[h], b4[h]));
        for (int i = 0; i < kPer; ++i) std::memcpy(out + (kPer * h + i) * K + k0 + 4 * half, f + 4 * i, 16);
      }
    }
  }
}
// Channels Lv .. Lv + L - 1 of that layout (w at their lane group, sc their scales) dequantized to
// out [L, K] (prompts: the dequantize + GEMM path): per quad and 4 (AVX-512) or 2 (AVX2) channels,
// their weights widened to float32, times each channel's scale (spread over its 4 lanes; the same
// product w * scale as the rows' layout), stored 4 values a channel.
inline void dequantize_int8_lanes(const int8_t* w, const float* sc, int64_t K, float* out) {
  constexpr int kPer = W / 4;  // channels a vector
  V s[kLanes / kPer];
  alignas(64) float f[W];
  for (int h = 0; h < kLanes / kPer; ++h) {
    for (int i = 0; i < W; ++i) f[i] = sc[kPer * h + i / 4];
    s[h] = vload(f);
  }
  for (int64_t o = 0; o < K / 4; ++o)
    for (int h = 0; h < kLanes / kPer; ++h) {
      const int8_t* src = w + o * 4 * kLanes + 4 * kPer * h;
#ifdef __AVX512F__
      const V q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
#else
      const V q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src))));
#endif
      vstore(f, vmul(q, s[h]));
      for (int i = 0; i < kPer; ++i) std::memcpy(out + (kPer * h + i) * K + 4 * o, f + 4 * i, 16);
    }
}
#endif

// Runs tile(m0, mb, n0, nb) over all tiles, channel tiles split between threads (each thread reads
// its own slice of the weights once; the rows of x are shared and stay in cache).
// `w` and `row_bytes` locate the weights, for prefetching the tiles the loop starts with.
template <int RowTile = MT, int ChannelTile = NT, typename Tile>
void for_tiles(int64_t M, int64_t N, const void* w, int64_t row_bytes, const Tile& tile) {
  const int64_t tiles = (N + ChannelTile - 1) / ChannelTile;
  const int64_t grain = std::max<int64_t>(1, 32768 / (ChannelTile * row_bytes));  // >= ~32 KB of weights per thread
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    const char* start = static_cast<const char*>(w) + t0 * ChannelTile * row_bytes;
    for (int64_t b = 0; b < std::min<int64_t>(t1 - t0, kAhead) * ChannelTile * row_bytes; b += 64) prefetch(start + b);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * ChannelTile, nb = std::min<int64_t>(ChannelTile, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += RowTile) tile(m0, std::min<int64_t>(RowTile, M - m0), n0, nb);
    }
  });
}

// Many rows (a prompt): arithmetic, not reading the weights, is the cost, and the BLAS GEMM does it
// faster than the tiles, so the weight is dequantized to float32 a chunk of channels at a time
// (about 2 MB, into one buffer that stays in cache) and multiplied by at::mm_out. Not row-invariant:
// only prompts (a 2-D x of more than kMaxTileRows rows, check_x) come here.
constexpr int64_t kMaxTileRows = 16;  // cpu_kernels.EXACT_ROWS
constexpr int64_t kChunkFloats = 1 << 19;
// dequant(n, out) writes the float32 rows n .. n + Rows - 1 (N % Rows == 0) to out [Rows, K].
template <int64_t Rows = 1, typename Dequant>
at::Tensor dequantized_mm(const at::Tensor& x, int64_t N, int64_t K, const Dequant& dequant) {
  auto y = at::empty({x.size(0), N}, x.options());
  const int64_t chunks = (N * K + kChunkFloats - 1) / kChunkFloats;
  const int64_t chunk = ((N + chunks - 1) / chunks + Rows - 1) / Rows * Rows;
  auto w = at::empty({chunk, K}, x.options());
  float* wp = w.data_ptr<float>();
  for (int64_t c0 = 0; c0 < N; c0 += chunk) {
    const int64_t nc = std::min(chunk, N - c0);
    at::parallel_for(0, nc / Rows, std::max<int64_t>(1, 16384 / (Rows * K)), [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) dequant(c0 + u * Rows, wp + u * Rows * K);
    });
    auto out = y.narrow(1, c0, nc);
    at::mm_out(out, x, w.narrow(0, 0, nc).t());
  }
  return y;
}

// x is [M, K], or [B, T, K]: a batched step's B x T rows, which all go through the row tiles (each
// row's result independent of the others, in one pass over the weights) however many they are;
// a 2-D x of more than kMaxTileRows rows (a prompt) goes to the GEMM instead.
void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK((x.dim() == 2 || x.dim() == 3) && x.scalar_type() == at::kFloat,
              "x must be a float32 tensor [M, K] or [B, T, K]");
  TORCH_CHECK(x.size(-1) == K, "x has ", x.size(-1), " columns, the weight ", K);
}
int64_t rows_of(const at::Tensor& x) { return x.numel() / x.size(-1); }
bool to_gemm(const at::Tensor& x) { return x.dim() == 2 && x.size(0) > kMaxTileRows; }
at::Tensor output_for(const at::Tensor& x, int64_t N) {  // [..., N]
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = N;
  return at::empty(sizes, x.options());
}

// Output channels a lane group of the int8 and int4 layouts with channels in the lanes
// (cpu_kernels.pack_int8, pack_int4), 0 where only the rows' layouts are built
int64_t int4_lanes() {
#ifdef INT4_LANES
  return kLanes;
#else
  return 0;
#endif
}

// The arguments of the int8 ops (float or int8 activations alike): (N, K) of the weight
// or [N / L, K / 4, 4L] with L = kLanes channels in the lanes (INT4_LANES builds; K % 32 == 0)
std::pair<int64_t, int64_t> check_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  const int64_t lanes = int4_lanes();
  TORCH_CHECK(w.scalar_type() == at::kChar && (w.dim() == 2 || (lanes && w.dim() == 3 && w.size(2) == 4 * lanes &&
                                                                 w.size(1) % 8 == 0)),  // K % 32
              lanes ? "weight must be an int8 tensor [N, K] or [N / L, K / 4, 4L] with L = " + std::to_string(lanes) +
                          " and K % 32 == 0"
                    : std::string("weight must be a 2-D int8 tensor"));
  const int64_t N = w.dim() == 3 ? w.size(0) * lanes : w.size(0), K = w.dim() == 3 ? w.size(1) * 4 : w.size(1);
  check_x(x, K);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == N, "scales must be float32 [N]");
  return {N, K};
}

// The arguments of the int4 ops: (N, K) of the unpacked weight, [N, K / 2] bytes in the rows' layout
// or [N / L, K / 8, 4L] with L = kLanes channels in the lanes (INT4_LANES builds only; scales and
// biases then [N / L, groups, L]: the same number of values)
std::pair<int64_t, int64_t> check_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                                       const at::Tensor& biases, int64_t G) {
  const int64_t lanes = int4_lanes();
  TORCH_CHECK(w.scalar_type() == at::kByte && (w.dim() == 2 || (lanes && w.dim() == 3 && w.size(2) == 4 * lanes)),
              lanes ? "weight must be a uint8 tensor [N, K / 2] or [N / L, K / 8, 4L] with L = " + std::to_string(lanes)
                    : std::string("weight must be a 2-D uint8 tensor (this build has no int4 lanes layout)"));
  const int64_t N = w.dim() == 3 ? w.size(0) * lanes : w.size(0), K = w.dim() == 3 ? w.size(1) * 8 : w.size(1) * 2;
  check_x(x, K);
  TORCH_CHECK(G > 0 && G % 32 == 0 && K % G == 0, "group size ", G, " must be a multiple of 32 dividing ", K);
  for (const auto* t : {&scales, &biases})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == N * (K / G), "scales and biases must be float32 [N, K / G]");
  return {N, K};
}

at::Tensor int8_linear(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& scales_) {
  const auto shape = check_int8(x_, w_, scales_);
  const int64_t N = shape.first, K = shape.second;
  const auto x = x_.contiguous(), w = w_.contiguous(), scales = scales_.contiguous();
  const int64_t M = rows_of(x);
  auto y = output_for(x, N);
  const float *xp = x.data_ptr<float>(), *sp = scales.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
#ifdef INT4_LANES
  if (w.dim() == 3) {  // lane group of channel n at byte n K
    auto dequant = [&](int64_t n, float* out) { dequantize_int8_lanes(wp + n * K, sp + n, K, out); };
    if (to_gemm(x)) return dequantized_mm<kLanes>(x, N, K, dequant);
    // Float activations over the lanes layout (a tool switching cpu_kernels.ACTIVATIONS after the
    // model was packed for int8 ones): the float32 weight made whole, then the rows' float tiles,
    // row-invariant like every path here; slow, and nothing in decoding comes here
    auto wf = at::empty({N, K}, x.options());
    float* wfp = wf.data_ptr<float>();
    at::parallel_for(0, N / kLanes, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) dequant(g * kLanes, wfp + g * kLanes * K);
    });
    for_tiles(M, N, wfp, K * 4, [&](int64_t m0, int64_t mb, int64_t n0, int64_t nb) {
      kFloatTiles[mb - 1][nb - 1](xp + m0 * K, wfp + n0 * K, nullptr, yp + m0 * N + n0, K, N);
    });
    return y;
  }
#endif
  if (to_gemm(x)) {
    return dequantized_mm(x, N, K, [&](int64_t n, float* out) {
      const int8_t* row = wp + n * K;
      const V s = vset1(sp[n]);
      const int64_t kv = K - K % W;
      for (int64_t k = 0; k < kv; k += W) vstore(out + k, vmul(vload_i8(row + k), s));
      for (int64_t k = kv; k < K; ++k) out[k] = static_cast<float>(row[k]) * sp[n];
    });
  }
  for_tiles(M, N, wp, K, [&](int64_t m0, int64_t mb, int64_t n0, int64_t nb) {
    kInt8Tiles[mb - 1][nb - 1](xp + m0 * K, wp + n0 * K, sp + n0, yp + m0 * N + n0, K, N);
  });
  return y;
}

// float32 weights [N, K]: the rows through the tiles (check_x), a prompt's through the BLAS GEMM, the
// faster tool there. In the lanes layout [N / W, K, W] (float_lanes_tile) every row count takes the
// tiles, as fast as the GEMM (BENCHMARKS.md), in blocks of rows whose activations stay in L2.
at::Tensor float_linear(const at::Tensor& x_, const at::Tensor& w_) {
  const bool lanes = w_.dim() == 3;
  TORCH_CHECK((w_.dim() == 2 || (lanes && W > 1 && w_.size(2) == W)) && w_.scalar_type() == at::kFloat,
              "weight must be a float32 tensor [N, K]", W > 1 ? " or [N / W, K, W] with W = " + std::to_string(W) : "");
  const int64_t N = lanes ? w_.size(0) * W : w_.size(0), K = w_.size(1);
  check_x(x_, K);
  const auto x = x_.contiguous(), w = w_.contiguous();
  const int64_t M = rows_of(x);
  if (!lanes && to_gemm(x)) return at::mm(x, w.t());
  auto y = output_for(x, N);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (lanes) {
    const int64_t block = std::max<int64_t>(kFloatLaneRows, (1 << 19) / (4 * K) / kFloatLaneRows * kFloatLaneRows);
    for (int64_t r0 = 0; r0 < M; r0 += block)
      for_tiles<kFloatLaneRows, kFloatLaneGroups * W>(std::min(block, M - r0), N, wp, K * 4,
                                                      [&](int64_t m0, int64_t mb, int64_t n0, int64_t nb) {
        kFloatLanesTiles[mb - 1][nb / W - 1](xp + (r0 + m0) * K, wp + n0 * K, nullptr, yp + (r0 + m0) * N + n0, K, N);
      });
    return y;
  }
  for_tiles(M, N, wp, K * 4, [&](int64_t m0, int64_t mb, int64_t n0, int64_t nb) {
    kFloatTiles[mb - 1][nb - 1](xp + m0 * K, wp + n0 * K, nullptr, yp + m0 * N + n0, K, N);
  });
  return y;
}

at::Tensor int4_linear(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& scales_,
                       const at::Tensor& biases_, int64_t G) {
  const auto shape = check_int4(x_, w_, scales_, biases_, G);
  const int64_t N = shape.first, K = shape.second;
  const auto x = x_.contiguous(), w = w_.contiguous(), scales = scales_.contiguous(), biases = biases_.contiguous();
  const int64_t M = rows_of(x), groups = K / G;
  auto y = output_for(x, N);
  const float *xp = x.data_ptr<float>(), *sp = scales.data_ptr<float>(), *bp = biases.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
#ifdef INT4_LANES
  if (w.dim() == 3) {
    if (to_gemm(x))
      return dequantized_mm<kLanes>(x, N, K, [&](int64_t n, float* out) {
        dequantize_lanes(wp + n * (K / 2), sp + n * groups, bp + n * groups, K, G, out);
      });
    for_tiles<MT, kLaneTiles * kLanes>(M, N, wp, K / 2, [&](int64_t m0, int64_t mb, int64_t n0, int64_t nb) {
      kInt4LanesTiles[mb - 1][nb / kLanes - 1](xp + m0 * K, wp + n0 * (K / 2), sp + n0 * groups, bp + n0 * groups,
                                               yp + m0 * N + n0, K, G, N);
    });
    return y;
  }
#endif
  if (to_gemm(x)) {
    return dequantized_mm(x, N, K, [&](int64_t n, float* out) {
      const uint8_t* row = wp + n * (K / 2);
      constexpr int Q = 32 / W;
      for (int64_t k = 0; k < K; k += 32) {
        V q[Q];
        vload_u4x32(row + k / 2, q);
        const V s = vset1(sp[n * groups + k / G]), b = vset1(bp[n * groups + k / G]);
        for (int j = 0; j < Q; ++j) vstore(out + k + j * W, vfma(q[j], s, b));
      }
    });
  }
  for_tiles(M, N, wp, K / 2, [&](int64_t m0, int64_t mb, int64_t n0, int64_t nb) {
    kInt4Tiles[mb - 1][nb - 1](xp + m0 * K, wp + n0 * (K / 2), sp + n0 * groups, bp + n0 * groups,
                               yp + m0 * N + n0, K, G, N);
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// int8 activations: integer dot products (the `*_q8` ops)
//
// With float32 activations every weight is converted to float32 in registers (int8: a widening, a
// conversion and an FMA per 8 weights), and on AVX2 that arithmetic, not memory, is the limit
// (BENCHMARKS.md). Here the rows of x are quantized once per call, before the threads start, to
// int8 in blocks of 32 values with a float32 scale each (d = absmax / 127, codes rounded to the
// nearest, ties to even, in [-127, 127]: blocks of 32 follow the activations' outliers, which one
// scale per row would spread over the whole row), and the tiles multiply 32 integer pairs at a time:
//
// - int8 weights: y[m, n] = sw[n] * sum_b d[m, b] * idot_b, idot_b the int32 dot of block b.
// - int4 weights (codes q in [0, 15], w = q * scale + bias per group of G channels):
//   y[m, n] = sum_b (d[m, b] * scale[n, g(b)]) * idot(q_b, xq_b) + sum_g bias[n, g] * xs[m, g],
//   xs[m, g] the sum of the group's *dequantized* activations (sum_b d[m, b] * sum of the codes of
//   b), made with the codes: so y is the product of the dequantized weights and the dequantized
//   activations up to float32 rounding (also the smaller error: the original sums would leave
//   (w - bias) * error, all of one sign, where these leave w * error).
//
// The integer dots are exact (no saturation, see dot_u8s8); float32 rounding happens only in the
// per-block scaling and accumulation, in one order for every (m, n) whatever the tile: these tiles
// are row-invariant like the ones above.
constexpr int QB = 32;  // activations per quantization block

#if defined(__AVX2__) && defined(__FMA__)
// 256-bit code in the AVX2 and AVX-512 builds alike: one block of 32 codes is one vector, and
// reading the weights, not the arithmetic, is the cost once the products are integer.
using VI = __m256i;
using XB = __m256i;   // 32 activation codes
using Dot = __m256i;  // 8 int32 partial sums of one block's 32 products
using W4 = __m256i;   // 32 int4 codes, one per byte
using Acc = __m256;   // 8 float32 partial sums
inline VI vi_load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline float hsum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
// Unsigned a times signed b, 32 pairs into 8 int32 sums of 4. maddubs first adds pairs of products
// into int16 with saturation, so it is exact only while a pair stays within 32767: a <= 128 and
// |b| <= 127 give at most 2 * 128 * 127 = 32512. VNNI's dpbusd adds into int32 directly.
inline Dot dot_u8s8(VI a, VI b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}
inline Acc acc_zero() { return _mm256_setzero_ps(); }
inline float acc_sum(Acc a) { return hsum8(a); }
// acc += c * dot: the block's integer sums scaled in float32
inline Acc acc_add(Acc acc, float c, Dot dot) {
  return _mm256_fmadd_ps(_mm256_set1_ps(c), _mm256_cvtepi32_ps(dot), acc);
}
inline XB x_block(const int8_t* p) { return vi_load(p); }
// int8 weights: one operand of maddubs must be unsigned, so |w| times x carrying w's sign (the sign
// trick). |w| of -128 is 128 as a byte, so any int8 weight is exact against codes in [-127, 127].
struct W8 {
  VI abs, w;
};
inline W8 w8_block(const int8_t* p) {
  const VI w = vi_load(p);
  return {_mm256_sign_epi8(w, w), w};
}
inline Dot dot8(const W8& w, XB x) { return dot_u8s8(w.abs, _mm256_sign_epi8(x, w.w)); }
// int4: 16 bytes -> 32 codes in order (low nibbles are codes 0-15, high nibbles 16-31), unsigned
// already, so maddubs takes them as they are: 2 * 15 * 127 fits int16.
inline W4 w4_block(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(15));
}
inline Dot dot4(W4 q, XB x) { return dot_u8s8(q, x); }
// sum_g bias[g] * xs[g]: xs rows are zero-padded to 8, the bias row is read with a mask at its end
// (the last channel's row ends the tensor)
inline float bias_dot(const float* bias, const float* xs, int64_t groups) {
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(bias + g), _mm256_loadu_ps(xs + g), acc);
  if (g < groups) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(groups - g)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    acc = _mm256_fmadd_ps(_mm256_maskload_ps(bias + g, mask), _mm256_loadu_ps(xs + g), acc);
  }
  return hsum8(acc);
}
// 32 floats -> 32 codes round(x / d) and d = absmax / 127; *sum = the sum of the codes
inline void quantize_block(const float* x, int8_t* q, float* d, int32_t* sum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4], a = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_loadu_ps(x + 8 * j);
    a = _mm256_max_ps(a, _mm256_andnot_ps(sign, v[j]));
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  const float scale = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h))) / 127.f;
  *d = scale;
  if (scale == 0.f) {  // all zeros (or too small to scale): contributes 0
    std::memset(q, 0, QB);
    *sum = 0;
    return;
  }
  // a division, not a multiplication by 1 / d, so that the codes are those of round(x / d)
  const __m256 vd = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  __m256i c[4];
  for (int j = 0; j < 4; ++j)  // cvtps rounds to the nearest, ties to even (the default MXCSR mode)
    c[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_div_ps(v[j], vd), lo), hi));
  __m256i s = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
  *sum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1)));
  // int32 -> int8: the packs interleave 128-bit lanes, the permutation puts the 4-code groups back
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

#else  // portable: plain loops (the compiler vectorizes the integer dots where it can)
using XB = const int8_t*;
using Dot = int32_t;
using Acc = float;
struct W8 {
  const int8_t* p;
};
struct W4 {
  uint8_t c[QB];
};
inline Acc acc_zero() { return 0.f; }
inline float acc_sum(Acc a) { return a; }
inline Acc acc_add(Acc acc, float c, Dot dot) { return acc + c * static_cast<float>(dot); }
inline XB x_block(const int8_t* p) { return p; }
inline W8 w8_block(const int8_t* p) { return {p}; }
inline Dot dot8(const W8& w, XB x) {
  int32_t s = 0;
  for (int i = 0; i < QB; ++i) s += w.p[i] * x[i];
  return s;
}
inline W4 w4_block(const uint8_t* p) {
  W4 q;
  for (int i = 0; i < 16; ++i) {
    q.c[i] = p[i] & 15;
    q.c[i + 16] = p[i] >> 4;
  }
  return q;
}
inline Dot dot4(const W4& q, XB x) {
  int32_t s = 0;
  for (int i = 0; i < QB; ++i) s += q.c[i] * x[i];
  return s;
}
inline float bias_dot(const float* bias, const float* xs, int64_t groups) {
  float s = 0.f;
  for (int64_t g = 0; g < groups; ++g) s += bias[g] * xs[g];
  return s;
}
inline void quantize_block(const float* x, int8_t* q, float* d, int32_t* sum) {
  float amax = 0.f;
  for (int i = 0; i < QB; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float scale = amax / 127.f;
  *d = scale;
  *sum = 0;
  for (int i = 0; i < QB; ++i) {  // nearbyint: to the nearest, ties to even (the default mode)
    q[i] = scale == 0.f ? 0 : static_cast<int8_t>(std::nearbyint(std::min(std::max(x[i] / scale, -127.f), 127.f)));
    *sum += q[i];
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
// AVX-512 with VNNI: two blocks per 512-bit dpbusd (Q8_PAIRS below), so the codes of a row are padded
// to a whole number of pairs (64), the padding a block of zeros with d = 0.
#define Q8_PAIRS 1
constexpr int64_t kQ8Pad = 2 * QB;
#else
constexpr int64_t kQ8Pad = QB;
#endif

// The rows of one call quantized: codes [M, Kp] (Kp = K rounded up to kQ8Pad, zero-padded), block
// scales d [M, Kp / 32] and, for int4 weights, the group sums xs [M, lds] (zero-padded to a
// multiple of 8 for bias_dot). With Q8_PAIRS, dv [M, Kp / 64, 16] holds each pair of blocks' scales
// as the lanes of a vector (8 x d of the even block, 8 x d of the odd one), and for the int8 rows'
// tile the codes are stored offset by 128 (unsigned: see int8_q8_tile); qs holds each block's sum of
// codes. One per calling thread, reused: no allocation per call once grown.
struct QRows {
  std::vector<int8_t> q;
  std::vector<float> d, xs, dv;
  std::vector<int32_t> qs;  // each block's sum of codes (the int8 lanes layout's correction, I8Quad)
  int64_t Kp = 0, blocks = 0, lds = 0;
};

// G: the int4 group size (a multiple of 32 dividing K), 0 for int8 weights (no group sums).
// offset_codes: with Q8_PAIRS, store x + 128 (the int8 rows' tile, int8_q8_tile)
QRows& quantize_rows(const float* x, int64_t M, int64_t K, int64_t G, bool offset_codes) {
  thread_local QRows r;
  r.Kp = (K + kQ8Pad - 1) / kQ8Pad * kQ8Pad;
  r.blocks = r.Kp / QB;
  const int64_t groups = G ? K / G : 0;
  r.lds = (groups + 7) / 8 * 8;
  r.q.resize(M * r.Kp);
  r.d.resize(M * r.blocks);
  r.qs.assign(M * r.blocks, 0);
  r.xs.assign(M * r.lds, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    float gsum = 0.f;
    for (int64_t b = 0; b < r.blocks; ++b) {
      if (b * QB >= K) {  // a block of padding (Q8_PAIRS: K's blocks rounded up to pairs): zeros, d = 0
        std::memset(r.q.data() + m * r.Kp + b * QB, 0, QB);
        r.d[m * r.blocks + b] = 0.f;
        continue;
      }
      const float* src = x + m * K + b * QB;
      float tail[QB] = {};
      if ((b + 1) * QB > K) {  // the last K % 32 values, zero-padded
        std::copy(src, x + (m + 1) * K, tail);
        src = tail;
      }
      int32_t sum;
      float& d = r.d[m * r.blocks + b];
      quantize_block(src, r.q.data() + m * r.Kp + b * QB, &d, &sum);
      r.qs[m * r.blocks + b] = sum;
      if (G) {
        gsum += d * static_cast<float>(sum);
        if ((b + 1) * QB % G == 0) {
          r.xs[m * r.lds + (b + 1) * QB / G - 1] = gsum;
          gsum = 0.f;
        }
      }
    }
  }
#ifdef Q8_PAIRS
  const int64_t pairs = r.blocks / 2;
  r.dv.resize(M * pairs * 16);
  for (int64_t i = 0; i < M * pairs; ++i)
    for (int l = 0; l < 16; ++l) r.dv[i * 16 + l] = r.d[2 * i + l / 8];
  if (offset_codes)  // x + 128 in [1, 255]: a zero code (the padding too) becomes 128
    for (auto& c : r.q) c = static_cast<int8_t>(static_cast<uint8_t>(c) ^ 0x80);
#endif
  return r;
}

// What every tile of one call shares
struct QCall {
  const QRows* x;
  const void* w;        // int8 [N, K] or int4 [N, K / 2] (the lanes layout: [N / L, K / 8, 4L])
  const float* scales;  // int8: [N]; int4: [N, groups] ([N / L, groups, L])
  const float* biases;  // int4: as scales
  int64_t K, G, groups;
  float* y;
  int64_t ldy;
};

#ifdef Q8_PAIRS
// Two blocks of 32 per 512-bit vector: lane i of a dot sums 4 products of the even block (i < 8) or
// the odd one, lane i of acc accumulates those lanes' scaled sums pair after pair, and the output
// is the sum of acc's 16 lanes (one order for every (m, n) whatever the tile: row-invariant).
inline __m512 pair_dot(__m512i dot, __m512 scale, __m512 acc) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc);
}

// int8 weights: AVX-512 has no byte sign instruction for the sign trick, so the activations are
// unsigned codes u = x + 128 (quantize_rows) and dpbusd(u, w) = dot(x, w) + 128 * sum(w): each dot
// starts from c = -128 * sum(w), lane by lane, made once per channel and pair for all rows. Exact
// in int32, as before.
template <int MB, int NB>
void int8_q8_tile(const QCall& c, int64_t m0, int64_t n0) {
  const int64_t K = c.K, Kp = c.x->Kp, pairs = Kp / 64, full = K / 64;
  const int8_t* w = static_cast<const int8_t*>(c.w) + n0 * K;
  const int8_t* xq = c.x->q.data() + m0 * Kp;
  const float* dv = c.x->dv.data() + m0 * pairs * 16;
  __m512 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_setzero_ps();
  const __m512i u128 = _mm512_set1_epi8(static_cast<char>(0x80));
  auto pair = [&](const int8_t* const* wp, int64_t p) {
    __m512i wv[NB], start[NB];
    for (int n = 0; n < NB; ++n) {
      wv[n] = _mm512_loadu_si512(wp[n]);
      start[n] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), u128, wv[n]));
    }
    for (int m = 0; m < MB; ++m) {
      const __m512i xv = _mm512_loadu_si512(xq + m * Kp + p * 64);
      const __m512 d = _mm512_loadu_ps(dv + (m * pairs + p) * 16);
      for (int n = 0; n < NB; ++n) acc[m][n] = pair_dot(_mm512_dpbusd_epi32(start[n], xv, wv[n]), d, acc[m][n]);
    }
  };
  for (int64_t p = 0; p < full; ++p) {
    for (int n = 0; n < NB; ++n) prefetch(w + (n + kAhead * NB) * K + p * 64);
    const int8_t* wp[NB];
    for (int n = 0; n < NB; ++n) wp[n] = w + n * K + p * 64;
    pair(wp, p);
  }
  if (full < pairs) {  // K % 64 != 0: zero weights past K (the bytes past a row's end are not ours)
    alignas(64) int8_t tail[NB][64] = {};
    const int8_t* wp[NB];
    for (int n = 0; n < NB; ++n) {
      std::copy(w + n * K + full * 64, w + (n + 1) * K, tail[n]);
      wp[n] = tail[n];
    }
    pair(wp, full);
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n)
      c.y[(m0 + m) * c.ldy + n0 + n] = _mm512_reduce_add_ps(acc[m][n]) * c.scales[n0 + n];
}

// int4: the codes (unsigned) are dpbusd's first operand and the activation codes its second, as
// they are; each pair's scale is d[m, b] * scale[n, g(b)], block by block.
template <int MB, int NB>
void int4_q8_tile(const QCall& c, int64_t m0, int64_t n0) {
  const int64_t K = c.K, Kp = c.x->Kp, pairs = Kp / 64, groups = c.groups, G = c.G, row_bytes = K / 2;
  const uint8_t* w = static_cast<const uint8_t*>(c.w) + n0 * row_bytes;
  const float *sc = c.scales + n0 * groups, *bi = c.biases + n0 * groups;
  const int8_t* xq = c.x->q.data() + m0 * Kp;
  const float* dv = c.x->dv.data() + m0 * pairs * 16;
  prefetch_group_scales(sc, bi, NB * groups);
  __m512 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_setzero_ps();
  // 128-bit lanes of a pair's 32 bytes as [bytes 0-15, 0-15, 16-31, 16-31], the odd lanes shifted
  // by 4: the low nibbles (codes 0-15 of a block), then the high ones (16-31), block after block
  const __m512i shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0), low4 = _mm512_set1_epi8(15);
  for (int64_t p = 0; p < pairs; ++p) {
    const bool half = 64 * (p + 1) > K;  // an odd number of blocks: the last pair has one
    for (int n = 0; n < NB; ++n) prefetch(w + (n + kAhead * NB) * row_bytes + p * 32);
    __m512i qv[NB];
    __m512 s[NB];
    const int64_t g0 = 64 * p / G, g1 = half ? g0 : (64 * p + 32) / G;
    for (int n = 0; n < NB; ++n) {
      const uint8_t* src = w + n * row_bytes + p * 32;
      const __m256i b = half ? _mm256_maskz_loadu_epi8(0xffff, src) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
      const __m512i z = _mm512_castsi256_si512(b);
      qv[n] = _mm512_and_si512(_mm512_srlv_epi64(_mm512_shuffle_i64x2(z, z, 0x50), shift), low4);
      s[n] = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(sc[n * groups + g0])),
                                                 _mm256_castps_pd(_mm256_set1_ps(sc[n * groups + g1])), 1));
    }
    for (int m = 0; m < MB; ++m) {
      const __m512i xv = _mm512_loadu_si512(xq + m * Kp + p * 64);
      const __m512 d = _mm512_loadu_ps(dv + (m * pairs + p) * 16);
      for (int n = 0; n < NB; ++n)
        acc[m][n] = pair_dot(_mm512_dpbusd_epi32(_mm512_setzero_si512(), qv[n], xv), _mm512_mul_ps(d, s[n]), acc[m][n]);
    }
  }
  const float* xs = c.x->xs.data() + m0 * c.x->lds;
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n)
      c.y[(m0 + m) * c.ldy + n0 + n] = _mm512_reduce_add_ps(acc[m][n]) + bias_dot(bi + n * groups, xs + m * c.x->lds, groups);
}

#else
template <int MB, int NB>
void int8_q8_tile(const QCall& c, int64_t m0, int64_t n0) {
  const int64_t K = c.K, blocks = c.x->blocks, Kp = c.x->Kp, full = K / QB;
  const int8_t* w = static_cast<const int8_t*>(c.w) + n0 * K;
  const int8_t* xq = c.x->q.data() + m0 * Kp;
  const float* xd = c.x->d.data() + m0 * blocks;
  Acc acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = acc_zero();
  // block b of every channel, from wb[n] (the weights, or a zero-padded copy of the last K % 32)
  auto block = [&](const int8_t* const* wb, int64_t b) {
    W8 wv[NB];
    for (int n = 0; n < NB; ++n) wv[n] = w8_block(wb[n]);
    for (int m = 0; m < MB; ++m) {
      const XB xv = x_block(xq + m * Kp + b * QB);
      const float d = xd[m * blocks + b];
      for (int n = 0; n < NB; ++n) acc[m][n] = acc_add(acc[m][n], d, dot8(wv[n], xv));
    }
  };
  for (int64_t b = 0; b < full; ++b) {
    if (b % 2 == 0)  // one prefetch per cache line
      for (int n = 0; n < NB; ++n) prefetch(w + (n + kAhead * NB) * K + b * QB);
    const int8_t* wb[NB];
    for (int n = 0; n < NB; ++n) wb[n] = w + n * K + b * QB;
    block(wb, b);
  }
  if (full < blocks) {  // K % 32 != 0: the bytes past the last row's end may not be ours to read
    int8_t tail[NB][QB] = {};
    const int8_t* wb[NB];
    for (int n = 0; n < NB; ++n) {
      std::copy(w + n * K + full * QB, w + (n + 1) * K, tail[n]);
      wb[n] = tail[n];
    }
    block(wb, full);
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) c.y[(m0 + m) * c.ldy + n0 + n] = acc_sum(acc[m][n]) * c.scales[n0 + n];
}

// int4: K % G == 0 and G % 32 == 0, so K % 32 == 0 (no tail)
template <int MB, int NB>
void int4_q8_tile(const QCall& c, int64_t m0, int64_t n0) {
  const int64_t K = c.K, blocks = K / QB, groups = c.groups, per_group = c.G / QB, row_bytes = K / 2;
  const uint8_t* w = static_cast<const uint8_t*>(c.w) + n0 * row_bytes;
  const float *sc = c.scales + n0 * groups, *bi = c.biases + n0 * groups;
  const int8_t* xq = c.x->q.data() + m0 * K;
  const float* xd = c.x->d.data() + m0 * blocks;
  prefetch_group_scales(sc, bi, NB * groups);
  Acc acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = acc_zero();
  for (int64_t b = 0; b < blocks; ++b) {
    if (b % 4 == 0)
      for (int n = 0; n < NB; ++n) prefetch(w + (n + kAhead * NB) * row_bytes + b * 16);
    const int64_t g = b / per_group;
    W4 qv[NB];
    float s[NB];
    for (int n = 0; n < NB; ++n) {
      qv[n] = w4_block(w + n * row_bytes + b * 16);
      s[n] = sc[n * groups + g];
    }
    for (int m = 0; m < MB; ++m) {
      const XB xv = x_block(xq + m * K + b * QB);
      const float d = xd[m * blocks + b];
      for (int n = 0; n < NB; ++n) acc[m][n] = acc_add(acc[m][n], d * s[n], dot4(qv[n], xv));
    }
  }
  const float* xs = c.x->xs.data() + m0 * c.x->lds;
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n)
      c.y[(m0 + m) * c.ldy + n0 + n] = acc_sum(acc[m][n]) + bias_dot(bi + n * groups, xs + m * c.x->lds, groups);
}

#endif

#ifdef INT4_LANES
// int4 with a lane group of channels per vector (INT4_LANES above), int8 activations: per block of
// 32 codes, row and lane group, 8 integer dots (the weights' codes unsigned, the row's 4 activation
// codes broadcast, signed; exact, whatever the order of their sums), then one conversion and one FMA
// by d[m, b] * scale[n, g]; the biases' term is added at the end, group by group. One order for
// every (m, n): row-invariant.
template <int MB, int NV>
void int4_lanes_q8_tile(const QCall& c, int64_t m0, int64_t n0) {
  const int64_t K = c.K, Kp = c.x->Kp, xblocks = c.x->blocks, groups = c.groups, per_group = c.G / QB;
  const int64_t group_bytes = kLanes * K / 2, v0 = n0 / kLanes;
  const uint8_t* w = static_cast<const uint8_t*>(c.w) + v0 * group_bytes;
  const float *sc = c.scales + v0 * groups * kLanes, *bi = c.biases + v0 * groups * kLanes;
  const int8_t* xq = c.x->q.data() + m0 * Kp;
  const float* xd = c.x->d.data() + m0 * xblocks;
  prefetch_group_scales(sc, bi, NV * groups * kLanes);
  V acc[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = vzero();
  for (int64_t b = 0, g = 0, in_group = 0; b < K / QB; ++b) {  // g: block b's group (no division a block)
    LI dot[MB][NV][kDotChains];
    for (int m = 0; m < MB; ++m)
      for (int v = 0; v < NV; ++v)
        for (int h = 0; h < kDotChains; ++h) dot[m][v][h] = li_zero();
    LANES_OCTET_LOOP
    for (int o = 0; o < 4; ++o) {
      LI q[NV][2];
      for (int v = 0; v < NV; ++v) {
        const uint8_t* p = w + v * group_bytes + (4 * b + o) * kOctetBytes;
        prefetch(p + kAhead * NV * group_bytes);
        unpack_octet(p, &q[v][0], &q[v][1]);
      }
      for (int m = 0; m < MB; ++m) {
        const int8_t* x8 = xq + m * Kp + b * QB + 8 * o;  // the row's codes at 8o .. 8o + 7 of the block
        const LI xa = li_bcast4(x8), xb = li_bcast4(x8 + 4);
        for (int v = 0; v < NV; ++v) {
          dot[m][v][0] = lane_dot(dot[m][v][0], q[v][0], xa);
          dot[m][v][kDotChains - 1] = lane_dot(dot[m][v][kDotChains - 1], q[v][1], xb);
        }
      }
    }
    for (int v = 0; v < NV; ++v) {
      const V s = vload(sc + (v * groups + g) * kLanes);
      for (int m = 0; m < MB; ++m)
        acc[m][v] = vfma(lane_sum(dot[m][v][0], kDotChains == 2 ? dot[m][v][kDotChains - 1] : li_zero()),
                         vmul(vset1(xd[m * xblocks + b]), s), acc[m][v]);
    }
    if (++in_group == per_group) {
      ++g;
      in_group = 0;
    }
  }
  const float* xs = c.x->xs.data() + m0 * c.x->lds;
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) {
      V bias = vzero();
      for (int64_t g = 0; g < groups; ++g) bias = vfma(vload(bi + (v * groups + g) * kLanes), vset1(xs[m * c.x->lds + g]), bias);
      vstore(c.y + (m0 + m) * c.ldy + n0 + v * kLanes, vadd(acc[m][v], bias));
    }
}
#endif
#ifdef INT4_LANES
// int8 weights with a lane group of channels per vector, int8 activations. The weight is
// [N / L, K / 4, 4L] bytes (cpu_kernels.pack_int8; L = kLanes, K % 32 == 0): for channels Lv .. Lv
// + L - 1 and input channels 4o .. 4o + 3 (a quad), byte 4c + j holds channel Lv + c's weight at
// 4o + j, so one load holds L channels' 4 weights and one integer dot (I8Quad) against a row's 4
// activation codes, broadcast, multiplies L channels at once. Per block of 32 inputs, row and lane
// group: 8 dots (I8Quad), one conversion and one FMA by d[m, b]; the channels' scales multiply at the end,
// and lane c ends as output c: no horizontal sums, no per-channel float work a block (the rows'
// layout does both). Exact integer sums, one order for every output: row-invariant.
template <int MB, int NV>
void int8_lanes_q8_tile(const QCall& c, int64_t m0, int64_t n0) {
  const int64_t K = c.K, Kp = c.x->Kp, xblocks = c.x->blocks, group_bytes = kLanes * K;
  const int8_t* w = static_cast<const int8_t*>(c.w) + n0 * K;
  const int8_t* xq = c.x->q.data() + m0 * Kp;
  const float* xd = c.x->d.data() + m0 * xblocks;
  const int32_t* xsum = c.x->qs.data() + m0 * xblocks;
  V acc[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = vzero();
  for (int64_t b = 0; b < K / QB; ++b) {
    LI dot[MB][NV];
    for (int m = 0; m < MB; ++m)
      for (int v = 0; v < NV; ++v) dot[m][v] = li_zero();
    LANES_OCTET_LOOP
    for (int o = 0; o < QB / 4; ++o) {
      I8Quad q[NV];
      for (int v = 0; v < NV; ++v) {
        const int8_t* p = w + v * group_bytes + (b * QB / 4 + o) * 4 * kLanes;
        prefetch(p + kAhead * NV * group_bytes);
        q[v].set(li_load(p));
      }
      for (int m = 0; m < MB; ++m) {
        const LI xa = li_bcast4(xq + m * Kp + b * QB + 4 * o);
        for (int v = 0; v < NV; ++v) dot[m][v] = q[v].dot(dot[m][v], xa);
      }
    }
    for (int m = 0; m < MB; ++m) {
      const V d = vset1(xd[m * xblocks + b]);
      const LI fix = li_set1(-kI8Offset * xsum[m * xblocks + b]);
      for (int v = 0; v < NV; ++v) acc[m][v] = vfma(lane_float(kI8Offset ? lane_add(dot[m][v], fix) : dot[m][v]), d, acc[m][v]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v)
      vstore(c.y + (m0 + m) * c.ldy + n0 + v * kLanes, vmul(acc[m][v], vload(c.scales + n0 + v * kLanes)));
}

#endif
using QTileFn = void (*)(const QCall&, int64_t, int64_t);
template <int MB, int NB> struct Int8Q8 { static constexpr QTileFn run = int8_q8_tile<MB, NB>; };
template <int MB, int NB> struct Int4Q8 { static constexpr QTileFn run = int4_q8_tile<MB, NB>; };
// Tile shapes: 4 channels per tile for both weight types, so that each activation block serves 4
// channels and 4 independent chains of FMAs hide their latency. (One channel per tile, one stream
// per thread, streamed the int8 weights of a one-row decode step at 76% of the read bandwidth on the
// AVX-512 Xeon against 91% with 4: BENCHMARKS.md, "Integer-activation CPU kernels".) Every output
// is the same instructions in the same order whatever the tile: row invariance.
constexpr int kQ8Rows = 4;
constexpr int kQ8Channels = 4;
const auto kInt8Q8Tiles = tile_table<QTileFn, Int8Q8, kQ8Rows, kQ8Channels>();
const auto kInt4Q8Tiles = tile_table<QTileFn, Int4Q8, kQ8Rows, kQ8Channels>();
#ifdef INT4_LANES
template <int MB, int NV> struct Int4LanesQ8 { static constexpr QTileFn run = int4_lanes_q8_tile<MB, NV>; };
// With AVX-512, tiles of up to 4 rows take 2 lane groups (32 channels), of 5 to 8 rows one (the
// registers: two int32 chains and a float32 sum per row and group); 8 rows at once read the unpacked
// codes for twice as many rows as 4, which pays from 8 rows on (BENCHMARKS.md). AVX2 (16
// registers): up to 4 rows, one lane group.
const auto kInt4LanesQ8Tiles = tile_table<QTileFn, Int4LanesQ8, kLaneQ8Rows, kLaneTiles>();
template <int MB, int NV> struct Int8LanesQ8 { static constexpr QTileFn run = int8_lanes_q8_tile<MB, NV>; };
const auto kInt8LanesQ8Tiles = tile_table<QTileFn, Int8LanesQ8, kLaneQ8Rows, kLaneTiles>();

// The lanes layouts' tiles over M rows and N channels: up to kLaneWideRows rows take kLaneTiles
// lane groups a tile, more rows one (registers)
template <typename Table>
void run_lanes_q8_tiles(const Table& tiles, const QCall& c, int64_t M, int64_t N, int64_t lane_bytes) {
  for_tiles<kLaneQ8Rows, kLaneTiles * kLanes>(M, N, c.w, lane_bytes, [&](int64_t m0, int64_t mb, int64_t n0, int64_t nb) {
    if (mb <= kLaneWideRows) return tiles[mb - 1][nb / kLanes - 1](c, m0, n0);
    for (int64_t n = n0; n < n0 + nb; n += kLanes) tiles[mb - 1][0](c, m0, n);
  });
}
#endif

template <int NT_, typename Table>
void run_q8_tiles(const Table& tiles, const QCall& c, int64_t M, int64_t N, int64_t row_bytes) {
  for_tiles<kQ8Rows, NT_>(M, N, c.w, row_bytes, [&](int64_t m0, int64_t mb, int64_t n0, int64_t nb) {
    tiles[mb - 1][nb - 1](c, m0, n0);
  });
}

// int8 weights [N, K] (in [-127, 127] as quantize_int8 makes them; -128 works too), float32 x:
// its rows with int8 activations (check_x), a prompt's through int8_linear's dequantize + GEMM.
at::Tensor int8_linear_q8(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& scales_) {
  const auto shape = check_int8(x_, w_, scales_);
  const int64_t N = shape.first, K = shape.second;
  if (to_gemm(x_)) return int8_linear(x_, w_, scales_);
  const auto x = x_.contiguous(), w = w_.contiguous(), scales = scales_.contiguous();
  const int64_t M = rows_of(x);
  auto y = output_for(x, N);
  const QRows& xq = quantize_rows(x.data_ptr<float>(), M, K, 0, w.dim() == 2);
  const QCall c{&xq, w.data_ptr<int8_t>(), scales.data_ptr<float>(), nullptr, K, 0, 0, y.data_ptr<float>(), N};
#ifdef INT4_LANES
  if (w.dim() == 3) {
    run_lanes_q8_tiles(kInt8LanesQ8Tiles, c, M, N, K);
    return y;
  }
#endif
  run_q8_tiles<kQ8Channels>(kInt8Q8Tiles, c, M, N, K);
  return y;
}

at::Tensor int4_linear_q8(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& scales_,
                          const at::Tensor& biases_, int64_t G) {
  const auto shape = check_int4(x_, w_, scales_, biases_, G);
  const int64_t N = shape.first, K = shape.second;
  if (to_gemm(x_)) return int4_linear(x_, w_, scales_, biases_, G);
  const auto x = x_.contiguous(), w = w_.contiguous(), scales = scales_.contiguous(), biases = biases_.contiguous();
  const int64_t M = rows_of(x);
  auto y = output_for(x, N);
  const QRows& xq = quantize_rows(x.data_ptr<float>(), M, K, G, false);
  const QCall c{&xq, w.data_ptr<uint8_t>(), scales.data_ptr<float>(), biases.data_ptr<float>(), K, G, K / G,
                y.data_ptr<float>(), N};
#ifdef INT4_LANES
  if (w.dim() == 3) {
    run_lanes_q8_tiles(kInt4LanesQ8Tiles, c, M, N, K / 2);
    return y;
  }
#endif
  run_q8_tiles<kQ8Channels>(kInt4Q8Tiles, c, M, N, K / 2);
  return y;
}

// Attention of L query rows over a KV cache, each row attending the positions up to its own
// (causal: row l sees cache positions 0..input_pos[l]; input_pos [L] for every sequence b, or [B, L],
// each its own). Reads only those positions, not the whole static cache, and reduces every output in
// one order whatever L and B: like the linear kernels, row-invariant. q [B, H, L, D], k and v
// [B, KV, S, D] (query head h reads KV head h / (H / KV)).
//
// The query rows of one KV head (its heads' L rows each) go in tiles of up to 8 rows, so each block
// of keys and values is read from memory once for the tile and then from the L1 cache: a verify
// pass of 9 rows over 3 heads a KV head reads the cache once, not 27 times. A row's instructions
// depend only on its own position (how many keys it sees), never on the tile it lands in.
constexpr int kTileMost = 8;   // query rows a tile
constexpr int64_t kKeyBlock = 64;  // keys of V per pass over a tile's rows (16 KB at D = 64)

template <typename T>  // the cache's element type: float or at::BFloat16 (read as float32, exactly)
struct AttnTile {
  const T* k;               // the KV head's keys, [S, D]
  const T* v;               // and values
  const float* q[kTileMost];  // the tile's query rows, D long
  float* y[kTileMost];        // and their outputs
  int64_t n[kTileMost];       // keys each row sees (its position + 1)
  int rows;
};

// Keys (or values) j0 .. j1 - 1 of a KV head's [S, D] cache as float32: the cache itself, or a
// bfloat16 cache's widened into `wide` (exactly), once for all the rows of a tile.
inline const float* widened(const float* x, int64_t j0, int64_t, int64_t D, float*) { return x + j0 * D; }
inline const float* widened(const at::BFloat16* x, int64_t j0, int64_t j1, int64_t D, float* wide) {
  const at::BFloat16* src = x + j0 * D;
  const int64_t n = (j1 - j0) * D, nv = n / W * W;
  for (int64_t i = 0; i < nv; i += W) vstore(wide + i, vload(src + i));
  for (int64_t i = nv; i < n; ++i) wide[i] = static_cast<float>(src[i]);
  return wide;
}

// The scores of keys j0 .. j0 + W - 1 for query row q: lane i = q . k[i], k pointing at key j0.
// Keys past n - 1 read key n - 1 again (never past the row's position); the caller drops those
// lanes. DC: D / W when known at compile time (0: dc at run time); the last D % W dimensions are
// added one by one.
template <int DC>
inline V key_scores(const float* q, const float* k, int64_t j0, int64_t n, int64_t D, int64_t dc) {
  const int64_t nc = DC ? DC : dc;
  V acc[W];
  const bool full = j0 + W <= n;
  // unrolled, so that acc stays in registers (GCC kept it on the stack: 7% of a 16-row call)
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i) {
    const float* kj = k + (full ? i : std::min<int64_t>(i, n - 1 - j0)) * D;
    V a = vzero();
#pragma GCC unroll 16
    for (int64_t c = 0; c < nc; ++c) a = vfma(vload(q + c * W), vload(kj + c * W), a);
    acc[i] = a;
  }
  V s = vsum_each(acc);
  if (nc * W < D) {
    float t[W];
    for (int i = 0; i < W; ++i) {
      const float* kj = k + std::min<int64_t>(i, n - 1 - j0) * D;
      float a = 0.f;
      for (int64_t d = nc * W; d < D; ++d) a += q[d] * kj[d];
      t[i] = a;
    }
    s = vadd(s, vload(t));
  }
  return s;
}

// p (the tile's rows, each ps long), acc (2 D each) and wide (kKeyBlock x D) are the caller's scratch.
template <int DC, typename T>
void attend_tile(const AttnTile<T>& t, int64_t D, float scale, float* p, int64_t ps, float* acc, float* wide) {
  const int64_t dc = DC ? DC : D / W, dv = dc * W;
  int64_t most = 0;
  for (int r = 0; r < t.rows; ++r) most = std::max(most, t.n[r]);
  // scores, W keys at a time for every row (the block of keys stays in L1 across the rows)
  V top[kTileMost];
  for (int r = 0; r < t.rows; ++r) top[r] = vset1(-INFINITY);
  for (int64_t j0 = 0; j0 < most; j0 += W) {
    const float* kb = widened(t.k, j0, std::min(j0 + W, most), D, wide);
    for (int r = 0; r < t.rows; ++r) {
      if (j0 >= t.n[r]) continue;
      const V s = vmul(key_scores<DC>(t.q[r], kb, j0, t.n[r], D, dc), vset1(scale));
      vstore(p + r * ps + j0, s);
      top[r] = vmax(top[r], s);  // the repeated lanes hold a real score: the max is unchanged
    }
  }
  // softmax weights, unnormalized; the lanes past n are zeroed
  float total[kTileMost];
  for (int r = 0; r < t.rows; ++r) {
    float* pr = p + r * ps;
    const int64_t n = t.n[r];
    const V m = vset1(vmax_all(top[r]));
    V sum = vzero();
    for (int64_t j0 = 0; j0 < n; j0 += W) {
      vstore(pr + j0, vexp(vadd(vload(pr + j0), vmul(m, vset1(-1.f)))));
      for (int64_t j = n; j < j0 + W; ++j) pr[j] = 0.f;
      sum = vadd(sum, vload(pr + j0));
    }
    total[r] = vsum(sum);
  }
  // weighted values: a block of values for every row, two chains a dimension (even and odd keys)
  // where a row has few vectors of D, so the FMAs' latency is covered
  constexpr int PAR = DC != 0 && DC <= 4 ? 2 : 1;
  std::fill(acc, acc + t.rows * 2 * D, 0.f);
  for (int64_t b0 = 0; b0 < most; b0 += kKeyBlock) {
    const float* vb = widened(t.v, b0, std::min(b0 + kKeyBlock, most), D, wide);  // value j: vb + (j - b0) D
    for (int r = 0; r < t.rows; ++r) {
      const int64_t b1 = std::min(b0 + kKeyBlock, t.n[r]);
      if (b0 >= b1) continue;
      const float* pr = p + r * ps;
      float* ar = acc + r * 2 * D;
      if (DC) {
        V a[PAR][DC ? DC : 1];
        for (int h = 0; h < PAR; ++h)
          for (int c = 0; c < DC; ++c) a[h][c] = vload(ar + h * D + c * W);
        for (int64_t j = b0; j < b1; j += PAR)
          for (int h = 0; h < PAR && j + h < b1; ++h) {
            const V w = vset1(pr[j + h]);
            const float* vj = vb + (j + h - b0) * D;
            for (int c = 0; c < DC; ++c) a[h][c] = vfma(w, vload(vj + c * W), a[h][c]);
          }
        for (int h = 0; h < PAR; ++h)
          for (int c = 0; c < DC; ++c) vstore(ar + h * D + c * W, a[h][c]);
      } else {
        for (int64_t j = b0; j < b1; ++j) {
          const V w = vset1(pr[j]);
          const float* vj = vb + (j - b0) * D;
          for (int64_t d = 0; d < dv; d += W) vstore(ar + d, vfma(w, vload(vj + d), vload(ar + d)));
        }
      }
      for (int64_t j = b0; j < b1; ++j)
        for (int64_t d = dv; d < D; ++d) ar[d] += pr[j] * vb[(j - b0) * D + d];
    }
  }
  for (int r = 0; r < t.rows; ++r) {
    const float* ar = acc + r * 2 * D;
    for (int64_t d = 0; d < D; ++d) t.y[r][d] = (ar[d] + ar[D + d]) / total[r];
  }
}

template <typename T>
void attend(const float* qp, const T* kp, const T* vp, const int64_t* pp, float* yp, bool per_row, int64_t B,
            int64_t H, int64_t L, int64_t D, int64_t KV, int64_t S) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  // a KV head's group x L rows in equal tiles, small enough that every thread gets a couple
  const int64_t group = H / KV, rows = group * L;
  const int64_t most = std::clamp<int64_t>(B * H * L / (2 * at::get_num_threads()), 1, kTileMost);
  const int64_t tiles = (rows + most - 1) / most, tile = (rows + tiles - 1) / tiles;
  const int64_t ps = (S + W - 1) / W * W;
  at::parallel_for(0, B * KV * tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(tile * ps), acc(tile * 2 * D), wide(std::is_same_v<T, float> ? 0 : kKeyBlock * D);
    for (int64_t i = t0; i < t1; ++i) {
      const int64_t bg = i / tiles, b = bg / KV, r0 = i % tiles * tile, r1 = std::min(rows, r0 + tile);
      AttnTile<T> t{kp + bg * S * D, vp + bg * S * D, {}, {}, {}, static_cast<int>(r1 - r0)};
      for (int64_t r = r0; r < r1; ++r) {  // row r: head bg % KV * group + r / L, query position r % L
        const int64_t qr = (b * H + bg % KV * group + r / L) * L + r % L;
        t.q[r - r0] = qp + qr * D;
        t.y[r - r0] = yp + qr * D;
        t.n[r - r0] = pp[(per_row ? b * L : 0) + r % L] + 1;
      }
      switch (D / W) {
        case 1: attend_tile<1>(t, D, scale, p.data(), ps, acc.data(), wide.data()); break;
        case 2: attend_tile<2>(t, D, scale, p.data(), ps, acc.data(), wide.data()); break;
        case 4: attend_tile<4>(t, D, scale, p.data(), ps, acc.data(), wide.data()); break;
        case 8: attend_tile<8>(t, D, scale, p.data(), ps, acc.data(), wide.data()); break;
        case 16: attend_tile<16>(t, D, scale, p.data(), ps, acc.data(), wide.data()); break;
        default: attend_tile<0>(t, D, scale, p.data(), ps, acc.data(), wide.data());
      }
    }
  });
}

// q float32; k and v float32 or bfloat16 (a 16-bit cache: half the bytes a step reads, each value
// widened exactly, so the result is the float32 kernel's on the rounded cache)
at::Tensor attention(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& pos_) {
  TORCH_CHECK(q_.dim() == 4 && k_.dim() == 4 && v_.dim() == 4, "q, k and v must be 4-D");
  TORCH_CHECK(q_.scalar_type() == at::kFloat, "q must be float32");
  const auto kv_type = k_.scalar_type();
  TORCH_CHECK(v_.scalar_type() == kv_type && (kv_type == at::kFloat || kv_type == at::kBFloat16),
              "k and v must be both float32 or both bfloat16");
  const int64_t B = q_.size(0), H = q_.size(1), L = q_.size(2), D = q_.size(3), KV = k_.size(1), S = k_.size(2);
  TORCH_CHECK(k_.sizes() == v_.sizes() && k_.size(0) == B && k_.size(3) == D && KV > 0 && H % KV == 0,
              "k and v must be [B, KV, S, D] with KV dividing the query heads");
  const bool per_row = pos_.dim() == 2;
  TORCH_CHECK(pos_.scalar_type() == at::kLong && (pos_.dim() == 1 || (per_row && pos_.size(0) == B)) &&
              pos_.size(-1) == L, "input_pos must be int64 [L] or [B, L]");
  const auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), pos = pos_.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < pos.numel(); ++i) TORCH_CHECK(pp[i] >= 0 && pp[i] < S, "input_pos out of the cache's range");
  auto y = at::empty(q.sizes(), q.options());  // contiguous, as the fake says
  if (y.numel() == 0) return y;
  if (kv_type == at::kBFloat16)
    attend(q.data_ptr<float>(), k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(), pp, y.data_ptr<float>(), per_row,
           B, H, L, D, KV, S);
  else
    attend(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), pp, y.data_ptr<float>(), per_row, B, H, L,
           D, KV, S);
  return y;
}

// torch.argmax of one row of n floats: the index of the first maximum, or of the first NaN if there
// is one. A vector pass finds the maximum (and whether a NaN or an infinity is there: x * 0 is NaN
// only for those), a second the first lane equal to it; with NaN or infinities, one plain pass
// decides as torch does. torch's own CPU argmax is a scalar loop: 80 us for a 49152-token row.
int64_t argmax_row(const float* x, int64_t n) {
  const int64_t nv = n / W * W;
  V m = vset1(-INFINITY), odd = vzero();
  for (int64_t i = 0; i < nv; i += W) {
    const V a = vload(x + i);
    m = vmax(m, a);
    odd = vadd(odd, vmul(a, vzero()));
  }
  float best = vmax_all(m), tail = 0.f;
  for (int64_t i = nv; i < n; ++i) {
    best = std::max(best, x[i]);
    tail += x[i] * 0.f;
  }
  if (!std::isnan(vsum(odd) + tail)) {
    for (int64_t i = 0; i < nv; i += W)
      if (vany_eq(vload(x + i), best))
        for (int64_t j = i;; ++j)
          if (x[j] == best) return j;
    for (int64_t i = nv; i < n; ++i)
      if (x[i] == best) return i;
  }
  int64_t at = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > x[at]) at = i;
  }
  return at;
}

// x [..., N] float32 -> [...] int64, torch.argmax(x, -1)
at::Tensor argmax(const at::Tensor& x_) {
  TORCH_CHECK(x_.scalar_type() == at::kFloat && x_.dim() >= 1 && x_.size(-1) > 0,
              "argmax takes float32 [..., N] with N > 0");
  const auto x = x_.contiguous();
  const int64_t n = x.size(-1), rows = x.numel() / n;
  auto out = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) op[r] = argmax_row(xp + r * n, n);
  });
  return out;
}

// The vector instruction set, and "+vnni" where the integer dots use VNNI (dpbusd)
std::string isa() {
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
  if (std::string(kIsa) != "portable") return std::string(kIsa) + "+vnni";
#endif
  return kIsa;
}

// Output channels a lane group of the float32 lanes layout (cpu_kernels.pack_float); 0 in the
// portable build, which has the rows' layout only
int64_t float_lanes() { return W > 1 ? W : 0; }
}  // namespace

TORCH_LIBRARY(layerskip_cpu, m) {
  m.def("float_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor weight, Tensor scales, Tensor biases, int groupsize) -> Tensor");
  m.def("int8_linear_q8(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("int4_linear_q8(Tensor x, Tensor weight, Tensor scales, Tensor biases, int groupsize) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor input_pos) -> Tensor");
  m.def("argmax(Tensor x) -> Tensor");
  m.def("isa() -> str", &isa);
  m.def("int4_lanes() -> int", &int4_lanes);
  m.def("float_lanes() -> int", &float_lanes);
}

TORCH_LIBRARY_IMPL(layerskip_cpu, CPU, m) {
  m.impl("float_linear", &float_linear);
  m.impl("attention", &attention);
  m.impl("argmax", &argmax);
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear_q8", &int8_linear_q8);
  m.impl("int4_linear_q8", &int4_linear_q8);
}
