// Linear layers for the CPU with float32 activations and float32, int8 or int4 weights (built by
// cpu_kernels.py).
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
#include <cmath>
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
// 16 bytes hold 32 int4 codes: byte i has code i in its low nibble and code i + 16 in its high one
inline void vload_u4x32(const uint8_t* p, V* q) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), lo = _mm_set1_epi8(15);
  q[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, lo)));
  q[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), lo)));
}
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
const char* kIsa = "avx512";

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
inline void vload_u4x32(const uint8_t* p, V* q) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), lo = _mm_set1_epi8(15);
  const __m128i l = _mm_and_si128(b, lo), h = _mm_and_si128(_mm_srli_epi16(b, 4), lo);
  q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(l));
  q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(l, 8)));
  q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(h));
  q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(h, 8)));
}
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
const char* kIsa = "avx2";

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
inline void vload_u4x32(const uint8_t* p, V* q) {
  for (int i = 0; i < 16; ++i) {
    q[i] = static_cast<float>(p[i] & 15);
    q[i + 16] = static_cast<float>(p[i] >> 4);
  }
}
inline void prefetch(const void*) {}
const char* kIsa = "portable";
#endif

constexpr int MT = 4;  // rows of x per tile
constexpr int NT = 4;  // output channels per tile
// Weights are prefetched this many tiles ahead into L2 (more misses in flight than the L1 allows:
// the head's 28 MB streamed at 13 GB/s with the next tile prefetched into L1, 19.6 with this).
constexpr int kAhead = 2;

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

#define TILE_ROW(f, mb) {f<mb, 1>, f<mb, 2>, f<mb, 3>, f<mb, 4>}
template <int MB, int NB> constexpr DenseFn<int8_t> int8_tile = dense_tile<int8_t, MB, NB>;
template <int MB, int NB> constexpr DenseFn<float> float_tile = dense_tile<float, MB, NB>;
const DenseFn<int8_t> kInt8Tiles[MT][NT] = {TILE_ROW(int8_tile, 1), TILE_ROW(int8_tile, 2), TILE_ROW(int8_tile, 3),
                                            TILE_ROW(int8_tile, 4)};
const DenseFn<float> kFloatTiles[MT][NT] = {TILE_ROW(float_tile, 1), TILE_ROW(float_tile, 2),
                                            TILE_ROW(float_tile, 3), TILE_ROW(float_tile, 4)};
const Int4Fn kInt4Tiles[MT][NT] = {TILE_ROW(int4_tile, 1), TILE_ROW(int4_tile, 2), TILE_ROW(int4_tile, 3),
                                   TILE_ROW(int4_tile, 4)};
#undef TILE_ROW

// Runs tile(m0, mb, n0, nb) over all tiles, channel tiles split between threads (each thread reads
// its own slice of the weights once; the rows of x are shared and stay in cache).
// `w` and `row_bytes` locate the weights, for prefetching the tiles the loop starts with.
template <typename Tile>
void for_tiles(int64_t M, int64_t N, const void* w, int64_t row_bytes, const Tile& tile) {
  const int64_t tiles = (N + NT - 1) / NT;
  const int64_t grain = std::max<int64_t>(1, 32768 / (NT * row_bytes));  // >= ~32 KB of weights per thread
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    const char* start = static_cast<const char*>(w) + t0 * NT * row_bytes;
    for (int64_t b = 0; b < std::min<int64_t>(t1 - t0, kAhead) * NT * row_bytes; b += 64) prefetch(start + b);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * NT, nb = std::min<int64_t>(NT, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += MT) tile(m0, std::min<int64_t>(MT, M - m0), n0, nb);
    }
  });
}

// Many rows (a prompt): arithmetic, not reading the weights, is the cost, and the BLAS GEMM does it
// faster than the tiles, so the weight is dequantized to float32 a chunk of channels at a time
// (about 2 MB, into one buffer that stays in cache) and multiplied by at::mm_out. Not row-invariant:
// only passes of more than kMaxTileRows rows come here.
constexpr int64_t kMaxTileRows = 16;  // cpu_kernels.EXACT_ROWS
constexpr int64_t kChunkFloats = 1 << 19;
template <typename Dequant>
at::Tensor dequantized_mm(const at::Tensor& x, int64_t N, int64_t K, const Dequant& dequant_row) {
  auto y = at::empty({x.size(0), N}, x.options());
  const int64_t chunks = (N * K + kChunkFloats - 1) / kChunkFloats;
  const int64_t chunk = (N + chunks - 1) / chunks;
  auto w = at::empty({chunk, K}, x.options());
  float* wp = w.data_ptr<float>();
  for (int64_t c0 = 0; c0 < N; c0 += chunk) {
    const int64_t nc = std::min(chunk, N - c0);
    at::parallel_for(0, nc, std::max<int64_t>(1, 16384 / K), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) dequant_row(c0 + n, wp + n * K);
    });
    auto out = y.narrow(1, c0, nc);
    at::mm_out(out, x, w.narrow(0, 0, nc).t());
  }
  return y;
}

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be a 2-D float32 tensor");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the weight ", K);
}

at::Tensor int8_linear(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& scales_) {
  TORCH_CHECK(w_.dim() == 2 && w_.scalar_type() == at::kChar, "weight must be a 2-D int8 tensor");
  const int64_t N = w_.size(0), K = w_.size(1);
  check_x(x_, K);
  TORCH_CHECK(scales_.scalar_type() == at::kFloat && scales_.numel() == N, "scales must be float32 [N]");
  const auto x = x_.contiguous(), w = w_.contiguous(), scales = scales_.contiguous();
  const int64_t M = x.size(0);
  auto y = at::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *sp = scales.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  if (M > kMaxTileRows) {
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

// float32 weights, up to kMaxTileRows rows (more rows: the BLAS GEMM, F.linear, is the faster tool)
at::Tensor float_linear(const at::Tensor& x_, const at::Tensor& w_) {
  TORCH_CHECK(w_.dim() == 2 && w_.scalar_type() == at::kFloat, "weight must be a 2-D float32 tensor");
  const int64_t N = w_.size(0), K = w_.size(1);
  check_x(x_, K);
  const auto x = x_.contiguous(), w = w_.contiguous();
  const int64_t M = x.size(0);
  if (M > kMaxTileRows) return at::mm(x, w.t());
  auto y = at::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_tiles(M, N, wp, K * 4, [&](int64_t m0, int64_t mb, int64_t n0, int64_t nb) {
    kFloatTiles[mb - 1][nb - 1](xp + m0 * K, wp + n0 * K, nullptr, yp + m0 * N + n0, K, N);
  });
  return y;
}

at::Tensor int4_linear(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& scales_,
                       const at::Tensor& biases_, int64_t G) {
  TORCH_CHECK(w_.dim() == 2 && w_.scalar_type() == at::kByte, "weight must be a 2-D uint8 tensor");
  const int64_t N = w_.size(0), K = w_.size(1) * 2;
  check_x(x_, K);
  TORCH_CHECK(G > 0 && G % 32 == 0 && K % G == 0, "group size ", G, " must be a multiple of 32 dividing ", K);
  for (const auto* t : {&scales_, &biases_})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == N * (K / G), "scales and biases must be float32 [N, K / G]");
  const auto x = x_.contiguous(), w = w_.contiguous(), scales = scales_.contiguous(), biases = biases_.contiguous();
  const int64_t M = x.size(0), groups = K / G;
  auto y = at::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *sp = scales.data_ptr<float>(), *bp = biases.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  if (M > kMaxTileRows) {
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

// Attention of L query rows over a KV cache, each row attending the positions up to its own
// (causal: row l sees cache positions 0..input_pos[l]). Reads only those positions, not the whole
// static cache, and reduces every output in one order whatever L: like the linear kernels,
// row-invariant. q [B, H, L, D], k and v [B, KV, S, D] (query head h reads KV head h / (H / KV)).
at::Tensor attention(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& pos_) {
  TORCH_CHECK(q_.dim() == 4 && k_.dim() == 4 && v_.dim() == 4, "q, k and v must be 4-D");
  for (const auto* t : {&q_, &k_, &v_}) TORCH_CHECK(t->scalar_type() == at::kFloat, "q, k and v must be float32");
  const int64_t B = q_.size(0), H = q_.size(1), L = q_.size(2), D = q_.size(3), KV = k_.size(1), S = k_.size(2);
  TORCH_CHECK(k_.sizes() == v_.sizes() && k_.size(0) == B && k_.size(3) == D && KV > 0 && H % KV == 0,
              "k and v must be [B, KV, S, D] with KV dividing the query heads");
  TORCH_CHECK(pos_.dim() == 1 && pos_.size(0) == L && pos_.scalar_type() == at::kLong, "input_pos must be int64 [L]");
  const auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), pos = pos_.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t l = 0; l < L; ++l) TORCH_CHECK(pp[l] >= 0 && pp[l] < S, "input_pos out of the cache's range");
  auto y = at::empty(q.sizes(), q.options());  // contiguous, as the fake says
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t group = H / KV, dv = D - D % W;
  at::parallel_for(0, B * H * L, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> p(S);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (H * L), h = r / L % H, n = pp[r % L] + 1;
      const float* qr = qp + r * D;
      const float* kh = kp + (b * KV + h / group) * S * D;
      const float* vh = vp + (b * KV + h / group) * S * D;
      float top = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        V acc = vzero();
        for (int64_t d = 0; d < dv; d += W) acc = vfma(vload(qr + d), vload(kh + j * D + d), acc);
        float s = vsum(acc);
        for (int64_t d = dv; d < D; ++d) s += qr[d] * kh[j * D + d];
        p[j] = s * scale;
        top = std::max(top, p[j]);
      }
      float total = 0.f;
      for (int64_t j = 0; j < n; ++j) total += (p[j] = std::exp(p[j] - top));
      float* out = yp + r * D;
      for (int64_t d = 0; d < dv; d += W) {
        V acc = vzero();
        for (int64_t j = 0; j < n; ++j) acc = vfma(vset1(p[j]), vload(vh + j * D + d), acc);
        vstore(out + d, acc);
      }
      for (int64_t d = dv; d < D; ++d) {
        float acc = 0.f;
        for (int64_t j = 0; j < n; ++j) acc += p[j] * vh[j * D + d];
        out[d] = acc;
      }
      for (int64_t d = 0; d < D; ++d) out[d] /= total;
    }
  });
  return y;
}

std::string isa() { return kIsa; }

}  // namespace

TORCH_LIBRARY(layerskip_cpu, m) {
  m.def("float_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor weight, Tensor scales, Tensor biases, int groupsize) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor input_pos) -> Tensor");
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(layerskip_cpu, CPU, m) {
  m.impl("float_linear", &float_linear);
  m.impl("attention", &attention);
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
}
