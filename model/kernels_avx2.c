/* Weight-only int8 / int4, bf16 and float32 linears for a few rows (decoding) on x86 CPUs with AVX2 and FMA
 * but no AVX-512. The same functions and layouts as model/kernels.c (see there), so model/kernels.py loads
 * whichever of the two the CPU can run. Built on first use (gcc -O3 -march=native -fopenmp), called
 * through ctypes.
 *
 * Each tile reads NR weight rows once from memory, turns 8 (int8, bf16) or 16 (int4) weights per row into
 * float32 in registers, and multiplies them with up to MR rows of x before moving on, so a batch of
 * sequences costs little more than one. Products are exact float32 products of x with the stored integer
 * (or bf16) weight, summed in float32 in an order that depends only on K: a sequence gets bit-identical
 * results alone or in a batch. The per-row scale is applied once at the end.
 * Every exported function returns 0 or NO_MEMORY (model/kernels.py raises MemoryError) and trusts its
 * sizes: model/kernels.py checks them against the tensors first.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NR 8 /* weight rows per tile: 8 independent accumulator chains for one row of x */
#define MR 3 /* x rows per tile; several rows of x go through the tile's rows HR at a time */
#define HR 4 /* MR * HR accumulators */
/* int4 and integer products for one row of x: software prefetch of the next tile's rows (measured: int4
 * 27392x4096 from 7.2 to 4.1 ms; the float int8 and bf16 loops did not gain). Rows are short (2 KB for int4
 * at K=4096), too short for the hardware prefetcher to ramp up on each. */
#define PF(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)

#define NO_MEMORY (-2)

int chatglm_kernels_abi(void) { return 9; }
/* Rows of x up to which the matrix-vector kernels beat de-quantize + GEMM (read by model/kernels.py). */
int decode_rows(void) { return 16; }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float nibble_value(unsigned v) { return (float)((int)(v & 15u) - (int)((v & 8u) << 1)); }

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline void store(float *y, int N, int m, long n, float acc, const float *scale, const float *bias) {
    float v = scale ? acc * scale[n] : acc;
    y[(long)m * N + n] = bias ? v + bias[n] : v;
}

/* ---------------------------------------------------------------- int8 and bf16: 8 weights per step */

static inline __m256 load8_q8(const void *w, long i) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + i))));
}

static inline __m256 load8_bf16(const void *w, long i) {
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __m256 load8_f32(const void *w, long i) { return _mm256_loadu_ps((const float *)w + i); }

static inline float scalar_q8(const void *w, long i) { return (float)((const int8_t *)w)[i]; }
static inline float scalar_f32(const void *w, long i) { return ((const float *)w)[i]; }
static inline float scalar_bf16(const void *w, long i) { return bf16_to_float(((const uint16_t *)w)[i]); }

/* y[m][n] = scale[n] * sum_k x[m][k] w[n][k] + bias[n], x float32 [M][K]. */
#define DEFINE_LINEAR8(NAME, LOAD, SCALAR, WTYPE)                                                              \
    static void NAME(const float *x, int M, int K, const WTYPE *w, int N, const float *scale,                  \
                     const float *bias, float *y) {                                                            \
        const int K8 = K & ~7;                                                                                 \
        _Pragma("omp parallel for schedule(static)")                                                           \
        for (long n0 = 0; n0 < N; n0 += NR) {                                                                  \
            const int rows = N - n0 < NR ? (int)(N - n0) : NR;                                                 \
            const WTYPE *wr[NR];                                                                               \
            for (int r = 0; r < NR; r++) wr[r] = w + (n0 + (r < rows ? r : 0)) * (long)K;                      \
            for (int m0 = 0; m0 < M; m0 += MR) {                                                               \
                const int ms = M - m0 < MR ? M - m0 : MR;                                                      \
                const float *xr[MR];                                                                           \
                for (int i = 0; i < MR; i++) xr[i] = x + (long)(m0 + (i < ms ? i : 0)) * K;                    \
                __m256 acc[MR][NR];                                                                            \
                for (int i = 0; i < MR; i++)                                                                   \
                    for (int r = 0; r < NR; r++) acc[i][r] = _mm256_setzero_ps();                              \
                if (ms == 1) {                                                                                 \
                    for (int k = 0; k < K8; k += 8) {                                                          \
                        const __m256 xv = _mm256_loadu_ps(xr[0] + k);                                          \
                        for (int r = 0; r < NR; r++) acc[0][r] = _mm256_fmadd_ps(xv, LOAD(wr[r], k), acc[0][r]); \
                    }                                                                                          \
                } else {                                                                                       \
                    for (int h = 0; h < NR; h += HR)                                                           \
                        for (int k = 0; k < K8; k += 8) {                                                      \
                            for (int r = h; r < h + HR; r++) {                                                 \
                                const __m256 wv = LOAD(wr[r], k);                                              \
                                for (int i = 0; i < MR; i++)                                                   \
                                    acc[i][r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr[i] + k), wv, acc[i][r]);    \
                            }                                                                                  \
                        }                                                                                      \
                }                                                                                              \
                for (int i = 0; i < ms; i++)                                                                   \
                    for (int r = 0; r < rows; r++) {                                                           \
                        float s = hsum(acc[i][r]);                                                             \
                        for (int k = K8; k < K; k++) s += xr[i][k] * SCALAR(wr[r], k);                         \
                        store(y, N, m0 + i, n0 + r, s, scale, bias);                                           \
                    }                                                                                          \
            }                                                                                                  \
        }                                                                                                      \
    }

DEFINE_LINEAR8(linear_q8, load8_q8, scalar_q8, int8_t)
DEFINE_LINEAR8(linear_bf16, load8_bf16, scalar_bf16, uint16_t)
DEFINE_LINEAR8(linear_f32_rows, load8_f32, scalar_f32, float)

/* float32 y = x W^T + b (x [M][K], w [N][K], y [M][N]). Where the stock GEMMs handle so few rows poorly
 * (measured on an AMD EPYC with AVX2: MKL 36 / 182 ms for 1 / 8 rows of a 27392x4096 weight), the tiles read
 * each weight block once for all rows. */
int linear_f32(const float *x, int M, int K, const float *w, int N, const float *b, float *y) {
    linear_f32_rows(x, M, K, w, N, NULL, b, y);
    return 0;
}

int gemv_q8(const float *x, int M, int K, const int8_t *w, int N, const float *scale, const float *bias,
            float *y) {
    linear_q8(x, M, K, w, N, scale, bias, y);
    return 0;
}

/* x is bf16 [M][K]; its values are exact in float32, so the products are the bf16 x bf16 products. */
int gemv_bf16(const uint16_t *x, int M, int K, const uint16_t *w, int N, const float *bias, float *y) {
    float *xf = (float *)malloc(sizeof(float) * (size_t)M * (size_t)K);
    if (!xf) return NO_MEMORY;
    for (long i = 0; i < (long)M * K; i++) xf[i] = bf16_to_float(x[i]);
    linear_bf16(xf, M, K, w, N, NULL, bias, y);
    free(xf);
    return 0;
}

/* ---------------------------------------------------------------- int4: 16 weights (8 bytes) per step */
/* Byte j of a row holds column 2j in its high nibble and 2j+1 in its low one. x is de-interleaved per row
 * (xe[j] = x[2j], xo[j] = x[2j+1]), so 8 bytes give the 8 even-column weights (the high nibbles: an
 * arithmetic shift of the sign-extended byte) and the 8 odd-column ones (the low nibbles: shifted to the top
 * and back), each multiplied with 8 consecutive xe / xo values. */
static inline void load16_q4(const uint8_t *w, long j, __m256 *even, __m256 *odd) {
    __m256i b = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + j)));
    *even = _mm256_cvtepi32_ps(_mm256_srai_epi32(b, 4));
    *odd = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(b, 28), 28));
}

static void linear_q4(const float *xd, int M, int K, const uint8_t *w, int N, const float *scale,
                      const float *bias, float *y) {
    const int K2 = K / 2, J8 = K2 & ~7;
#pragma omp parallel for schedule(static)
    for (long n0 = 0; n0 < N; n0 += NR) {
        const int rows = N - n0 < NR ? (int)(N - n0) : NR;
        const uint8_t *wr[NR];
        for (int r = 0; r < NR; r++) wr[r] = w + (n0 + (r < rows ? r : 0)) * (long)K2;
        for (int m0 = 0; m0 < M; m0 += MR) {
            const int ms = M - m0 < MR ? M - m0 : MR;
            const float *xe[MR], *xo[MR];
            for (int i = 0; i < MR; i++) {
                xe[i] = xd + (long)(m0 + (i < ms ? i : 0)) * K;
                xo[i] = xe[i] + K2;
            }
            __m256 acc[MR][NR];
            for (int i = 0; i < MR; i++)
                for (int r = 0; r < NR; r++) acc[i][r] = _mm256_setzero_ps();
            if (ms == 1) {
                for (int j = 0; j < J8; j += 8) {
                    const __m256 ev = _mm256_loadu_ps(xe[0] + j), ov = _mm256_loadu_ps(xo[0] + j);
                    for (int r = 0; r < NR; r++) {
                        __m256 we, wo;
                        PF(wr[r] + NR * (long)K2 + j);
                        load16_q4(wr[r], j, &we, &wo);
                        acc[0][r] = _mm256_fmadd_ps(ov, wo, _mm256_fmadd_ps(ev, we, acc[0][r]));
                    }
                }
            } else {
                for (int h = 0; h < NR; h += HR)
                    for (int j = 0; j < J8; j += 8) {
                        for (int r = h; r < h + HR; r++) {
                            __m256 we, wo;
                            load16_q4(wr[r], j, &we, &wo);
                            for (int i = 0; i < MR; i++)
                                acc[i][r] = _mm256_fmadd_ps(_mm256_loadu_ps(xo[i] + j), wo,
                                                            _mm256_fmadd_ps(_mm256_loadu_ps(xe[i] + j), we, acc[i][r]));
                        }
                    }
            }
            for (int i = 0; i < ms; i++)
                for (int r = 0; r < rows; r++) {
                    float s = hsum(acc[i][r]);
                    for (int j = J8; j < K2; j++)
                        s += xe[i][j] * nibble_value(wr[r][j] >> 4) + xo[i][j] * nibble_value(wr[r][j]);
                    store(y, N, m0 + i, n0 + r, s, scale, bias);
                }
        }
    }
}

int gemv_q4(const float *x, int M, int K, const uint8_t *w, int N, const float *scale, const float *bias,
            float *y) {
    const int K2 = K / 2;
    float *xd = (float *)malloc(sizeof(float) * (size_t)M * (size_t)K);
    if (!xd) return NO_MEMORY;
    for (long m = 0; m < M; m++)
        for (int j = 0; j < K2; j++) {
            xd[m * K + j] = x[m * K + 2 * j];
            xd[m * K + K2 + j] = x[m * K + 2 * j + 1];
        }
    linear_q4(xd, M, K, w, N, scale, bias, y);
    free(xd);
    return 0;
}

/* ---------------------------------------------------------------- integer products for bf16 models
 * x is rounded per row to 16 (int8 weights) or 15 (int4) bits, far finer than the 8-bit mantissa of a bf16
 * activation, and multiplied with the weights as int16 pairs by vpmaddwd (16 products per instruction,
 * exact int32 sums): half the instructions per weight of the float32 path. The int32 sums are moved into
 * float32 every FLUSH steps, long before they could overflow (128 * 2 * 127 * 32767 < 2^31). */
#define FLUSH 128

int has_vnni(void) { return 1; } /* "has the integer kernels": the name model/kernels.py asks for */

/* xq[k] = x[k] / sx rounded to nearest even (as lrintf), sx = max |x| / qmax (1 for a row of zeros). A row
 * holding a NaN or an infinity gets sx = NaN (and xq = 0): its outputs are NaN, as a float matmul gives them.
 * Vectorized (lrintf was a library call per value). */
static float quantize_row(const float *x, int K, int16_t *xq, int qmax) {
    const __m256 sign = _mm256_set1_ps(-0.f), big = _mm256_set1_ps(3.40282347e38f);
    __m256 top = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k));
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ));  /* NaN or infinity */
        top = _mm256_max_ps(top, a);
    }
    float lanes[8], amax = 0.f;
    _mm256_storeu_ps(lanes, top);
    for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
    int nonfinite = _mm256_movemask_ps(bad);
    for (int kk = k; kk < K; kk++) {
        float a = x[kk] < 0 ? -x[kk] : x[kk];
        if (!(a <= 3.40282347e38f)) nonfinite = 1;
        else if (a > amax) amax = a;
    }
    if (nonfinite) {
        memset(xq, 0, sizeof(int16_t) * (size_t)K);
        return __builtin_nanf("");
    }
    const float sx = amax > 0 ? amax / (float)qmax : 1.f, inv = 1.f / sx;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (k = 0; k + 8 <= K; k += 8) {
        __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv));
        _mm_storeu_si128((__m128i *)(xq + k), _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)));
    }
    for (; k < K; k++) xq[k] = (int16_t)__builtin_lrintf(x[k] * inv);
    return sx;
}

static inline int hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* Weights of one step as int16 lanes: int8: 16 columns; int4: the 16 even (*a) and 16 odd (*b) columns of
 * 32, from 16 bytes (the high nibble is an arithmetic shift of the sign-extended byte, the low one is
 * shifted to the top and back). */
static inline void step_q8(const uint8_t *w, long j, __m256i *a, __m256i *b) {
    *a = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + j)));
    (void)b;
}
static inline void step_q4(const uint8_t *w, long j, __m256i *a, __m256i *b) {
    __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + j)));
    *a = _mm256_srai_epi16(v, 4);
    *b = _mm256_srai_epi16(_mm256_slli_epi16(v, 12), 12);
}

/* One step for x row pointers xa (and xb for int4's odd columns) at step offset j. */
#define MADD_Q8(acc, wa, wb, xa, xb, j) \
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(wa, _mm256_loadu_si256((const __m256i *)((xa) + (j)))))
#define MADD_Q4(acc, wa, wb, xa, xb, j)                                                                    \
    acc = _mm256_add_epi32(acc, _mm256_add_epi32(                                                          \
        _mm256_madd_epi16(wa, _mm256_loadu_si256((const __m256i *)((xa) + (j)))),                          \
        _mm256_madd_epi16(wb, _mm256_loadu_si256((const __m256i *)((xb) + (j))))))

/* xq: per x row, int16 [K]: int8 weights: x in column order; int4: x de-interleaved (K/2 even columns,
 * then K/2 odd ones). Row length in bytes is L (K for int8, K/2 for int4); a step covers 16 bytes. */
#define DEFINE_INTEGER(NAME, STEP, MADD, BITS)                                                                 \
    static void NAME(const int16_t *xq, const float *sx, int M, int K, const uint8_t *w, int N,                \
                     const float *scale, const float *bias, float *y) {                                        \
        const int L = BITS == 8 ? K : K / 2, L16 = L & ~15, half = BITS == 8 ? 0 : K / 2;                      \
        _Pragma("omp parallel for schedule(static)")                                                           \
        for (long n0 = 0; n0 < N; n0 += NR) {                                                                  \
            const int rows = N - n0 < NR ? (int)(N - n0) : NR;                                                 \
            const uint8_t *wr[NR];                                                                             \
            for (int r = 0; r < NR; r++) wr[r] = w + (n0 + (r < rows ? r : 0)) * (long)L;                      \
            for (int m0 = 0; m0 < M; m0 += MR) {                                                               \
                const int ms = M - m0 < MR ? M - m0 : MR;                                                      \
                const int16_t *xa[MR], *xb[MR];                                                                \
                for (int i = 0; i < MR; i++) {                                                                 \
                    xa[i] = xq + (long)(m0 + (i < ms ? i : 0)) * K;                                            \
                    xb[i] = xa[i] + half;                                                                      \
                }                                                                                              \
                float total[MR][NR] = {{0}};                                                                   \
                for (int j0 = 0; j0 < L16; j0 += 16 * FLUSH) {                                                 \
                    const int j1 = L16 - j0 < 16 * FLUSH ? L16 : j0 + 16 * FLUSH;                              \
                    __m256i acc[MR][NR];                                                                       \
                    for (int i = 0; i < MR; i++)                                                               \
                        for (int r = 0; r < NR; r++) acc[i][r] = _mm256_setzero_si256();                       \
                    if (ms == 1) {                                                                             \
                        for (int j = j0; j < j1; j += 16) {                                                    \
                            /* the next tile's NR rows are contiguous: prefetch them in order, 16 bytes a row */ \
                            const uint8_t *next = w + (n0 + NR) * (long)L + (long)j * NR;                      \
                            for (int p = 0; p < NR * 16; p += 64) PF(next + p);                                \
                            for (int r = 0; r < NR; r++) {                                                     \
                                __m256i wa, wb;                                                                \
                                STEP(wr[r], j, &wa, &wb);                                                      \
                                MADD(acc[0][r], wa, wb, xa[0], xb[0], j);                                      \
                            }                                                                                  \
                        }                                                                                      \
                    } else {                                                                                   \
                        for (int h = 0; h < NR; h += HR)                                                       \
                            for (int j = j0; j < j1; j += 16)                                                  \
                                for (int r = h; r < h + HR; r++) {                                             \
                                    __m256i wa, wb;                                                            \
                                    STEP(wr[r], j, &wa, &wb);                                                  \
                                    for (int i = 0; i < MR; i++) MADD(acc[i][r], wa, wb, xa[i], xb[i], j);     \
                                }                                                                              \
                    }                                                                                          \
                    for (int i = 0; i < ms; i++)                                                               \
                        for (int r = 0; r < rows; r++) total[i][r] += (float)hsum_epi32(acc[i][r]);            \
                }                                                                                              \
                for (int i = 0; i < ms; i++)                                                                   \
                    for (int r = 0; r < rows; r++) {                                                           \
                        long tail = 0;                                                                         \
                        for (int j = L16; j < L; j++) {                                                        \
                            if (BITS == 8) tail += (long)(int8_t)wr[r][j] * xa[i][j];                          \
                            else tail += (long)nibble_value(wr[r][j] >> 4) * xa[i][j] +                        \
                                         (long)nibble_value(wr[r][j]) * xb[i][j];                              \
                        }                                                                                      \
                        store(y, N, m0 + i, n0 + r, (total[i][r] + (float)tail) * sx[m0 + i], scale, bias);    \
                    }                                                                                          \
            }                                                                                                  \
        }                                                                                                      \
    }

DEFINE_INTEGER(integer_q8, step_q8, MADD_Q8, 8)
DEFINE_INTEGER(integer_q4, step_q4, MADD_Q4, 4)

static int integer_linear(const float *x, int M, int K, const uint8_t *w, int N, const float *scale,
                          const float *bias, float *y, int bits) {
    int16_t *xq = (int16_t *)malloc(sizeof(int16_t) * (size_t)M * (size_t)K * 2);
    float *sx = (float *)malloc(sizeof(float) * (size_t)M);
    if (!xq || !sx) { free(xq); free(sx); return NO_MEMORY; }
    int16_t *row = xq + (long)M * K;
    for (long m = 0; m < M; m++) {
        sx[m] = quantize_row(x + m * K, K, bits == 8 ? xq + m * K : row, bits == 8 ? 32767 : 16383);
        if (bits == 4)
            for (int j = 0; j < K / 2; j++) { xq[m * K + j] = row[2 * j]; xq[m * K + K / 2 + j] = row[2 * j + 1]; }
    }
    if (bits == 8) integer_q8(xq, sx, M, K, w, N, scale, bias, y);
    else integer_q4(xq, sx, M, K, w, N, scale, bias, y);
    free(xq); free(sx);
    return 0;
}

int gemv_q8v(const float *x, int M, int K, const int8_t *w, int N, const float *scale, const float *bias,
             float *y) {
    return integer_linear(x, M, K, (const uint8_t *)w, N, scale, bias, y, 8);
}

int gemv_q4v(const float *x, int M, int K, const uint8_t *w, int N, const float *scale, const float *bias,
             float *y) {
    return integer_linear(x, M, K, w, N, scale, bias, y, 4);
}

/* ---------------------------------------------------------------- de-quantization for multi-token inputs */
/* out[n][k] = q[n][k] * scale[n] as bf16 (out_bf16, rounded to nearest even) or float32 (out_f32). */
static inline __m256 q8_values(const uint8_t *q, int bits, int k) { /* 8 weights from column k (k % 8 == 0) */
    if (bits == 8) return load8_q8(q, k);
    /* 4 bytes hold columns k..k+7: broadcast them and move each lane's nibble to the top, then shift back
     * arithmetically (sign extension) */
    int32_t word;
    memcpy(&word, q + k / 2, 4);
    const __m256i shifts = _mm256_setr_epi32(24, 28, 16, 20, 8, 12, 0, 4);
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_sllv_epi32(_mm256_set1_epi32(word), shifts), 28));
}

#include "kernels_glue.h"  /* RMSNorm, rotary, SiLU * b, bf16 in / out linears */

int dequantize(const uint8_t *w, int bits, int N, int K, const float *scale, uint16_t *out_bf16, float *out_f32) {
    long stride = bits == 8 ? K : K / 2;
#pragma omp parallel for schedule(static)
    for (long n = 0; n < N; n++) {
        const uint8_t *q = w + n * stride;
        const __m256 s = _mm256_set1_ps(scale[n]);
        int k = 0;
        for (; k + 8 <= K; k += 8) {
            __m256 v = _mm256_mul_ps(q8_values(q, bits, k), s);
            if (out_f32) _mm256_storeu_ps(out_f32 + n * (long)K + k, v);
            else {
                __m256i u = _mm256_castps_si256(v);
                __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                             _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
                r = _mm256_srli_epi32(r, 16);
                __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
                _mm_storeu_si128((__m128i *)(out_bf16 + n * (long)K + k), packed);
            }
        }
        for (; k < K; k++) {
            float qv = bits == 8 ? (float)(int8_t)q[k] : nibble_value((k & 1) ? q[k / 2] : (unsigned)(q[k / 2] >> 4));
            float v = qv * scale[n];
            if (out_f32) out_f32[n * (long)K + k] = v;
            else {
                uint32_t u;
                memcpy(&u, &v, 4);
                u += 0x7fffu + ((u >> 16) & 1u);
                out_bf16[n * (long)K + k] = (uint16_t)(u >> 16);
            }
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- decode attention over a bf16 KV cache
 * The same function and contract as decode_attention_bf16 in model/kernels.c (read that comment): one new
 * token per sequence over keys / values [B][g][S][d] at any strides, the mask (allowed bytes or an additive
 * float32 bias), softmax and the weighted sum in float32, out [B][nh][d] bf16. Tasks of ATT_CHUNK positions
 * of one (batch, group), an online softmax over ATT_SPAN positions at a time, the chunks combined at the end,
 * so that a sequence's result depends on neither the batch nor the thread count. Here 8 heads lie in the
 * lanes of a vector: the scores are one multiply-add per key value (broadcast) and 8 heads, the softmax runs
 * across lanes; so a group must have a multiple of 8 heads (ChatGLM2 / 3: 16), else it returns
 * NOT_THIS_SHAPE and the caller uses torch. d: a multiple of 16. */
#define NOT_THIS_SHAPE (-4)
#include "kernels_attention.h"  /* ATT_CHUNK / _BLOCK / _SPAN, the mask, e^x's polynomial, att_combine */

/* e^x in float32 (ATT_EXP_REDUCED times 2^n), 0 below -87 (where float32 would go subnormal), NaN stays NaN */
#define V256(op) _mm256_##op##_ps
static inline __m256 exp8(__m256 x) {
    const __m256 low = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
    const __m256 c = _mm256_max_ps(_mm256_set1_ps(-87.f), x);  /* max gives its second operand for a NaN */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(c, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 p;
    ATT_EXP_REDUCED(V256, c, n, p);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(low, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));  /* n >= -126: 2^n is normal */
}

static inline float exp1(float x) { return _mm256_cvtss_f32(exp8(_mm256_set1_ps(x))); }

static inline uint16_t att_to_bf16(float f) {  /* float32 -> bf16, nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}


/* rows [ATT_BLOCK][d] float32 <- rows s..s+n-1 of src (stride apart); masked rows and rows past n are zeros;
 * the same rows of the next block are prefetched (a block of the 6B shape is a 4 KB page of its own) */
static void widen_rows(float *rows, const uint16_t *src, int64_t stride, long s, int n, int d, att_mask m) {
    for (int i = 0; i < ATT_BLOCK; i++) {
        float *dst = rows + (long)i * d;
        if (i >= n || att_masked(m, s + i)) { memset(dst, 0, sizeof(float) * (size_t)d); continue; }
        const uint16_t *r = src + (s + i) * stride;
        for (int c = 0; c < d; c += 32) PF(r + ATT_BLOCK * stride + c);
        for (int c = 0; c < d; c += 8)
            _mm256_storeu_ps(dst + c, _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(r + c))), 16)));
    }
}

/* scores [ATT_BLOCK][hg] = q.k * scale for the positions of the widened rows; qt [hg / 8][d][8]: the queries
 * widened, lane = head. 8 positions x 8 heads a pass: 8 accumulators, one broadcast key value per product. */
static void att_scores(const float *qt, int hg, int d, const float *rows, float scale, float *scores) {
    for (int hb = 0; hb < hg; hb += 8)
        for (int i0 = 0; i0 < ATT_BLOCK; i0 += 8) {
            const float *qh = qt + (long)hb * d, *r = rows + (long)i0 * d;
            __m256 a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
            for (int c = 0; c < d; c++) {
                const __m256 qv = _mm256_loadu_ps(qh + (long)c * 8);
                for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(qv, _mm256_broadcast_ss(r + (long)i * d + c), a[i]);
            }
            for (int i = 0; i < 8; i++)
                _mm256_storeu_ps(scores + (long)(i0 + i) * hg + hb, _mm256_mul_ps(a[i], _mm256_set1_ps(scale)));
        }
}

/* acc [hg][d] += w [position][hg] x the widened value rows: 4 heads x 16 values of d a pass */
static void att_values(const float *w, int hg, int d, const float *rows, float *acc) {
    for (int h = 0; h < hg; h += 4)
        for (int dc = 0; dc < d; dc += 16) {
            __m256 a[4][2];
            for (int j = 0; j < 4; j++) {
                a[j][0] = _mm256_loadu_ps(acc + (long)(h + j) * d + dc);
                a[j][1] = _mm256_loadu_ps(acc + (long)(h + j) * d + dc + 8);
            }
            for (int i = 0; i < ATT_BLOCK; i++) {
                const __m256 x0 = _mm256_loadu_ps(rows + (long)i * d + dc), x1 = _mm256_loadu_ps(rows + (long)i * d + dc + 8);
                for (int j = 0; j < 4; j++) {
                    const __m256 p = _mm256_broadcast_ss(w + (long)i * hg + h + j);
                    a[j][0] = _mm256_fmadd_ps(p, x0, a[j][0]);
                    a[j][1] = _mm256_fmadd_ps(p, x1, a[j][1]);
                }
            }
            for (int j = 0; j < 4; j++) {
                _mm256_storeu_ps(acc + (long)(h + j) * d + dc, a[j][0]);
                _mm256_storeu_ps(acc + (long)(h + j) * d + dc + 8, a[j][1]);
            }
        }
}

/* One task: heads q [hg][d] (bf16) over positions s0..s1-1 of one (batch, group): acc [hg][d], mx [hg] and
 * sum [hg] get its partial softmax (running maximum, sum of e^(score - max), sum of weighted values).
 * Work: scores [ATT_SPAN][hg], rows [ATT_BLOCK][d], qt [hg][d] floats. */
static void att_span(const uint16_t *q, int hg, int d, const uint16_t *k, int64_t ks, const uint16_t *v,
                     int64_t vs, long s0, long s1, att_mask m, float scale, float *acc, float *mx, float *sum,
                     float *scores, float *rows, float *qt) {
    att_start(q, hg, d, 8, qt, acc, mx, sum);
    const __m256 minus_inf = _mm256_set1_ps(-__builtin_inff());
    for (long s = s0; s < s1; s += ATT_SPAN) {
        const int n = s1 - s < ATT_SPAN ? (int)(s1 - s) : ATT_SPAN;
        const int padded = (n + ATT_BLOCK - 1) / ATT_BLOCK * ATT_BLOCK;
        for (int blk = 0; blk < n; blk += ATT_BLOCK) {
            widen_rows(rows, k, ks, s + blk, n - blk, d, m);
            att_scores(qt, hg, d, rows, scale, scores + (long)blk * hg);
        }
        att_mask_scores(scores, hg, s, n, m);
        for (int hb = 0; hb < hg; hb += 8) {  /* scores -> weights e^(score - running max) */
            __m256 top = minus_inf;
            for (int i = 0; i < n; i++) top = _mm256_max_ps(top, _mm256_loadu_ps(scores + (long)i * hg + hb));
            float t[8], alpha[8];
            _mm256_storeu_ps(t, top);
            _mm256_storeu_ps(alpha, exp8(_mm256_sub_ps(_mm256_loadu_ps(mx + hb), top)));
            att_raise(acc, mx, sum, d, hb, 8, t, alpha);
            const __m256 now = _mm256_loadu_ps(mx + hb);
            const __m256 live = _mm256_cmp_ps(now, minus_inf, _CMP_NEQ_OQ);  /* lanes all masked so far: 0 */
            __m256 vsum = _mm256_setzero_ps();
            for (int i = 0; i < padded; i++) {
                float *sc = scores + (long)i * hg + hb;
                const __m256 w = i < n ? _mm256_and_ps(live, exp8(_mm256_sub_ps(_mm256_loadu_ps(sc), now)))
                                       : _mm256_setzero_ps();
                _mm256_storeu_ps(sc, w);
                vsum = _mm256_add_ps(vsum, w);
            }
            _mm256_storeu_ps(sum + hb, _mm256_add_ps(_mm256_loadu_ps(sum + hb), vsum));
        }
        for (int blk = 0; blk < n; blk += ATT_BLOCK) {
            widen_rows(rows, v, vs, s + blk, n - blk, d, m);
            att_values(scores + (long)blk * hg, hg, d, rows, acc);
        }
    }
}

int decode_attention_bf16(const uint16_t *q, int B, int nh, int g, int S, int d,
                          const uint16_t *k, int64_t kb, int64_t kg, int64_t ks,
                          const uint16_t *v, int64_t vb, int64_t vg, int64_t vs,
                          const uint8_t *allowed, const float *bias, int64_t mb, int64_t ms,
                          float scale, uint16_t *out) {
    const int hg = nh / g;
    if (hg % 8 || d % 16) return NOT_THIS_SHAPE;
    const long pairs = (long)B * g, chunks = (S + ATT_CHUNK - 1) / ATT_CHUNK;
    const long per_task = (long)hg * (d + 2);  /* acc [hg][d], mx [hg], sum [hg] */
    float *part = (float *)malloc(sizeof(float) * (size_t)(pairs * chunks * per_task));
    if (!part) return NO_MEMORY;
    int failed = 0;
    const size_t floats = (size_t)hg * ATT_SPAN + (size_t)ATT_BLOCK * d + (size_t)hg * d;
#pragma omp parallel
    {
        float *scores = (float *)malloc(sizeof(float) * floats);
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
        float *rows = scores + (long)hg * ATT_SPAN, *qt = rows + (long)ATT_BLOCK * d;
#pragma omp for schedule(dynamic)
        for (long t = 0; t < pairs * chunks; t++) {
            if (!scores) continue;
            const long pair = t / chunks, c = t % chunks, b = pair / g, grp = pair % g;
            const long s0 = c * ATT_CHUNK, s1 = s0 + ATT_CHUNK < S ? s0 + ATT_CHUNK : S;
            float *acc = part + t * per_task;
            att_mask m = {allowed ? allowed + b * mb : NULL, bias ? bias + b * mb : NULL, ms};
            att_span(q + (b * nh + grp * hg) * (long)d, hg, d, k + b * kb + grp * kg, ks, v + b * vb + grp * vg,
                     vs, s0, s1, m, scale, acc, acc + (long)hg * d, acc + (long)hg * d + hg, scores, rows, qt);
        }
        free(scores);
    }
    if (failed) { free(part); return NO_MEMORY; }
    att_combine(part, B, nh, g, d, chunks, out);
    free(part);
    return 0;
}
