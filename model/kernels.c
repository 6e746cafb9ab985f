/* Matrix-vector kernels for decoding on x86 CPUs with AVX-512: weight-only int8 / int4 in the checkpoint
 * layout, and bf16; and attention of one new token over a bf16 KV cache (decode_attention_bf16, at the end). Built on first use by model/kernels.py (gcc -O3 -march=native -fopenmp) and called
 * through ctypes; every function works on plain row-major buffers.
 *
 * Layouts (all row-major, one row per output feature n):
 *   int8: w[N][K] int8, y[m][n] = scale[n] * sum_k x[m][k] * w[n][k] + bias[n]
 *   int4: w[N][K/2] bytes, column 2j in the high nibble and 2j+1 in the low nibble, each a 4-bit two's
 *         complement value in -8..7; same formula.
 *   bf16: w[N][K] bfloat16, y[m][n] = sum_k x[m][k] * w[n][k] + bias[n].
 * x, scale, bias and y are float32 (the caller converts); accumulation is float32, so the result equals a
 * float32 matmul of x with the dequantized weight up to summation order.
 * Every exported function returns 0, NO_BF16 or NO_MEMORY (model/kernels.py raises for the last two) and
 * trusts its sizes: model/kernels.py checks them against the tensors first.
 *
 * Several rows of x (a batch of sequences decoding together) share each read of the weights: the tiles loop
 * over the rows of x while their weight rows are in cache. On CPUs with AMX (and the OS granting its tile
 * state) the integer and bf16 kernels multiply 16 weight rows with up to 16 rows of x per tile instruction,
 * so up to decode_rows() rows cost about what one row costs: the time to stream the weights.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AMX_INT8__) && defined(__AMX_BF16__) && defined(__AVX512VNNI__) && defined(__AVX512BF16__)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define ROWS 4  /* output rows per tile: independent accumulator chains and shared loads of x */

/* Up to this many rows of x the int4 integer kernel uses its AVX512-VNNI tiles even where AMX is usable */
#ifndef Q4_VNNI_MAX_ROWS
#define Q4_VNNI_MAX_ROWS 2
#endif

#define NO_BF16 (-1)
#define NO_MEMORY (-2)

int chatglm_kernels_abi(void) { return 9; }

static inline float nibble_value(unsigned v) { return (float)((int)(v & 15u) - (int)((v & 8u) << 1)); }

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {  /* round to nearest even, as torch; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline void finish_row(float *y, long n, float acc, const float *scale, const float *bias) {
    float v = scale ? acc * scale[n] : acc;
    y[n] = bias ? v + bias[n] : v;
}

/* 64 bytes of an int4 weight row as the integer kernels' unsigned operands: u = nibble ^ 8 = n + 8 (0..15),
 * the high nibbles (even columns) in *ue, the low ones (odd columns) in *uo */
static inline void q4_unpack(const uint8_t *p, __m512i *ue, __m512i *uo) {
    const __m512i v = _mm512_xor_si512(_mm512_loadu_si512((const void *)p), _mm512_set1_epi8((char)0x88));
    *ue = _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0f));
    *uo = _mm512_and_si512(v, _mm512_set1_epi8(0x0f));
}

/* ---------------------------------------------------------------- int8 */

static void q8_tile(const float *x, int K, const int8_t *w, long n0, int rows, const float *scale,
                    const float *bias, float *y) {
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    int k = 0;
    if (rows == ROWS) {
        const int8_t *w0 = w + (n0 + 0) * (long)K, *w1 = w + (n0 + 1) * (long)K;
        const int8_t *w2 = w + (n0 + 2) * (long)K, *w3 = w + (n0 + 3) * (long)K;
        for (; k + 16 <= K; k += 16) {
            __m512 xv = _mm512_loadu_ps(x + k);
            acc[0] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w0 + k)))), acc[0]);
            acc[1] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w1 + k)))), acc[1]);
            acc[2] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w2 + k)))), acc[2]);
            acc[3] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w3 + k)))), acc[3]);
        }
    }
    for (int r = 0; r < rows; r++) {
        const int8_t *wr = w + (n0 + r) * (long)K;
        float tail = 0.f;
        for (int kk = k; kk < K; kk++) tail += x[kk] * (float)wr[kk];
        finish_row(y, n0 + r, _mm512_reduce_add_ps(acc[r]) + tail, scale, bias);
    }
}

int gemv_q8(const float *x, int M, int K, const int8_t *w, int N, const float *scale, const float *bias,
            float *y) {
#pragma omp parallel for schedule(static)
    for (long n0 = 0; n0 < N; n0 += ROWS) {  /* every row of x while the tile's weights are in cache */
        int rows = N - n0 < ROWS ? (int)(N - n0) : ROWS;
        for (int m = 0; m < M; m++) q8_tile(x + (long)m * K, K, w, n0, rows, scale, bias, y + (long)m * N);
    }
    return 0;
}

/* ---------------------------------------------------------------- int4 */

/* x is given de-interleaved: xe[j] = x[2j], xo[j] = x[2j+1], j < K/2. */
static void q4_tile(const float *xe, const float *xo, int K2, const uint8_t *w, long n0, int rows,
                    const float *scale, const float *bias, float *y) {
    const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    __m512 acc[ROWS], acc2[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = acc2[r] = _mm512_setzero_ps();
    int j = 0;
    if (rows == ROWS) {
        for (; j + 16 <= K2; j += 16) {
            __m512 xev = _mm512_loadu_ps(xe + j), xov = _mm512_loadu_ps(xo + j);
            for (int r = 0; r < ROWS; r++) {
                __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + (n0 + r) * (long)K2 + j)));
                /* vpermps reads only the low 4 bits of each index: the low nibble needs no mask */
                acc[r] = _mm512_fmadd_ps(xev, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table), acc[r]);
                acc2[r] = _mm512_fmadd_ps(xov, _mm512_permutexvar_ps(v, table), acc2[r]);
            }
        }
    }
    for (int r = 0; r < rows; r++) {
        const uint8_t *wr = w + (n0 + r) * (long)K2;
        float tail = 0.f;
        for (int jj = j; jj < K2; jj++) tail += xe[jj] * nibble_value(wr[jj] >> 4) + xo[jj] * nibble_value(wr[jj]);
        finish_row(y, n0 + r, _mm512_reduce_add_ps(_mm512_add_ps(acc[r], acc2[r])) + tail, scale, bias);
    }
}

int gemv_q4(const float *x, int M, int K, const uint8_t *w, int N, const float *scale, const float *bias,
            float *y) {
    int K2 = K / 2;
    float *buf = (float *)malloc(sizeof(float) * (size_t)M * (size_t)K);  /* per row m: xe [K2], xo [K2] */
    if (!buf) return NO_MEMORY;
    for (long m = 0; m < M; m++)
        for (int j = 0; j < K2; j++) { buf[m * K + j] = x[m * K + 2 * j]; buf[m * K + K2 + j] = x[m * K + 2 * j + 1]; }
#pragma omp parallel for schedule(static)
    for (long n0 = 0; n0 < N; n0 += ROWS) {
        int rows = N - n0 < ROWS ? (int)(N - n0) : ROWS;
        for (long m = 0; m < M; m++) q4_tile(buf + m * K, buf + m * K + K2, K2, w, n0, rows, scale, bias, y + m * N);
    }
    free(buf);
    return 0;
}

/* ---------------------------------------------------------------- AMX: 16 weight rows x up to 16 rows of x
 * For several rows of x (a batch decoding together): one tile instruction multiplies 16 weight rows with up to
 * 16 rows of x, so the weights are read once per call and the arithmetic stays far below the time to read
 * them. The integer kernels form the same exact integer dot products as the AVX512-VNNI tiles below (and so
 * the same results); the bf16 one sums in float32 in its own order, and is used for every row count (and the
 * same rows) so that a row's result does not depend on the batch it is in.
 * Each returns how many leading output rows (a multiple of 16) it wrote, 0 when AMX is not usable (the
 * caller does them all), or -1 when out of memory. */
#ifdef HAVE_AMX
#define AMX_PREFETCH 512 /* bytes ahead on each of a tile's 16 weight rows */

typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tile_config;

static int amx_usable(void) {  /* Linux grants a process the AMX tile state on request (once) */
    static int state;  /* 0: not asked yet, 1: granted, -1: refused */
    if (!state) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) ? -1 : 1;
    return state > 0;
}

/* Tiles for m rows of x: 0, 1 accumulators (16 weight rows x m 32-bit sums), 2, 3 weights (16 rows of 64
 * bytes), 4..7 x (16 rows of 4m bytes: 64 bytes of each row of x, 4 bytes of each in turn per tile row). */
static void configure_tiles(int m) {
    tile_config c __attribute__((aligned(64)));
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) { c.rows[t] = 16; c.colsb[t] = t == 2 || t == 3 ? 64 : 4 * m; }
    _tile_loadconfig(&c);
}

/* m rows of x (`bytes` each, `stride` apart, each byte XOR `flip`) in the layout of tiles 4..7: per 64 bytes
 * of the rows, 16 tile rows of 4m bytes; tile row t holds bytes 4t..4t+3 of each row of x in turn. */
static void pack_x(uint8_t *dst, const uint8_t *src, long stride, int m, long bytes, uint8_t flip) {
    for (long i = 0; i < m; i++)
        for (long c = 0; c < bytes; c++) dst[(c / 4) * 4 * m + i * 4 + c % 4] = src[i * stride + c] ^ flip;
}

static inline void prefetch_rows(const void *a, long stride) {
    for (int r = 0; r < 16; r++) _mm_prefetch((const char *)a + r * stride + AMX_PREFETCH, _MM_HINT_T0);
}

/* int8: x_q = 256 hi + lo with hi = (x_q + 32768 >> 8) - 128 signed and lo unsigned (xh, xl as the VNNI
 * kernel's digits): dot = 256 dot(w, hi) + dot(w, lo). */
static long amx_q8v(const uint8_t *xh, const uint8_t *xl, const int32_t *xq, const float *sx, int M, int K,
                    const int8_t *w, int N, const float *scale, const float *bias, float *y) {
    const long covered = K / 64 * 64, groups = N / 16 * 16;
    if (!covered || !groups || !amx_usable()) return 0;
    uint8_t *b = (uint8_t *)malloc((size_t)covered * 16 * 2);
    if (!b) return -1;
    for (int m0 = 0; m0 < M; m0 += 16) {
        const int m = M - m0 < 16 ? M - m0 : 16;
        uint8_t *bh = b, *bl = b + covered * m;
        pack_x(bh, xh + (long)m0 * K, K, m, covered, 0x80);
        pack_x(bl, xl + (long)m0 * K, K, m, covered, 0);
#pragma omp parallel
        {
            int32_t ch[256], cl[256];
            configure_tiles(m);
#pragma omp for schedule(static)
            for (long n0 = 0; n0 < groups; n0 += 16) {
                const int8_t *a = w + n0 * K;
                _tile_zero(0);
                _tile_zero(1);
                for (long k = 0; k < covered; k += 64) {
                    prefetch_rows(a + k, K);
                    _tile_loadd(2, a + k, K);
                    _tile_loadd(4, bh + k * m, 4 * m);
                    _tile_loadd(5, bl + k * m, 4 * m);
                    _tile_dpbssd(0, 2, 4);
                    _tile_dpbsud(1, 2, 5);
                }
                _tile_stored(0, ch, 4 * m);
                _tile_stored(1, cl, 4 * m);
                for (int r = 0; r < 16; r++)
                    for (int i = 0; i < m; i++) {
                        const int32_t *q = xq + (long)(m0 + i) * K;
                        int64_t dot = 256 * (int64_t)ch[r * m + i] + cl[r * m + i];
                        for (long kk = covered; kk < K; kk++) dot += (int64_t)a[r * (long)K + kk] * q[kk];
                        finish_row(y + (long)(m0 + i) * N, n0 + r, (float)dot * sx[m0 + i], scale, bias);
                    }
            }
            _tile_release();
        }
    }
    free(b);
    return groups;
}

/* int4: the VNNI kernel's operands: u = nibble ^ 8 (unsigned, even and odd columns apart) against x_q's
 * de-interleaved digits (per row of x: xeh, xel, xoh, xol [K/2], in `digits`); dot = 128 dot(u, hi) +
 * dot(u, lo) - 8 sum(x_q). */
static long amx_q4v(const int8_t *digits, const int32_t *xq, const int64_t *xqsum, const float *sx, int M, int K,
                    const uint8_t *w, int N, const float *scale, const float *bias, float *y) {
    const long K2 = K / 2, covered = K2 / 64 * 64, groups = N / 16 * 16;
    if (!covered || !groups || !amx_usable()) return 0;
    uint8_t *b = (uint8_t *)malloc((size_t)covered * 16 * 4);
    if (!b) return -1;
    for (int m0 = 0; m0 < M; m0 += 16) {
        const int m = M - m0 < 16 ? M - m0 : 16;
        const long part = covered * m;
        for (int d = 0; d < 4; d++)
            pack_x(b + d * part, (const uint8_t *)digits + (long)m0 * 4 * K2 + d * K2, 4 * K2, m, covered, 0);
#pragma omp parallel
        {
            int32_t ch[256], cl[256];
            uint8_t ue[1024] __attribute__((aligned(64))), uo[1024] __attribute__((aligned(64)));
            configure_tiles(m);
#pragma omp for schedule(static)
            for (long n0 = 0; n0 < groups; n0 += 16) {
                const uint8_t *a = w + n0 * K2;
                _tile_zero(0);
                _tile_zero(1);
                for (long j = 0; j < covered; j += 64) {
                    prefetch_rows(a + j, K2);
                    for (int r = 0; r < 16; r++) {
                        __m512i e, o;
                        q4_unpack(a + r * K2 + j, &e, &o);
                        _mm512_store_si512((void *)(ue + 64 * r), e);
                        _mm512_store_si512((void *)(uo + 64 * r), o);
                    }
                    _tile_loadd(2, ue, 64);
                    _tile_loadd(3, uo, 64);
                    _tile_loadd(4, b + j * m, 4 * m);
                    _tile_loadd(5, b + part + j * m, 4 * m);
                    _tile_loadd(6, b + 2 * part + j * m, 4 * m);
                    _tile_loadd(7, b + 3 * part + j * m, 4 * m);
                    _tile_dpbusd(0, 2, 4);
                    _tile_dpbusd(0, 3, 6);
                    _tile_dpbusd(1, 2, 5);
                    _tile_dpbusd(1, 3, 7);
                }
                _tile_stored(0, ch, 4 * m);
                _tile_stored(1, cl, 4 * m);
                for (int r = 0; r < 16; r++)
                    for (int i = 0; i < m; i++) {
                        const uint8_t *wr = a + r * K2;
                        const int32_t *q = xq + (long)(m0 + i) * K;
                        int64_t dot = 128 * (int64_t)ch[r * m + i] + cl[r * m + i] - 8 * xqsum[m0 + i];
                        for (long jj = covered; jj < K2; jj++)
                            dot += (int64_t)nibble_value(wr[jj] >> 4) * q[2 * jj] + (int64_t)nibble_value(wr[jj]) * q[2 * jj + 1];
                        finish_row(y + (long)(m0 + i) * N, n0 + r, (float)dot * sx[m0 + i], scale, bias);
                    }
            }
            _tile_release();
        }
    }
    free(b);
    return groups;
}

/* bf16: bf16 pairs of the weight rows against pairs of x, summed in float32 */
static long amx_bf16(const uint16_t *x, int M, int K, const uint16_t *w, int N, const float *bias, float *y) {
    const long covered = K / 32 * 32, groups = N / 16 * 16;
    if (!covered || !groups || !amx_usable()) return 0;
    uint8_t *b = (uint8_t *)malloc((size_t)covered * 2 * 16);
    if (!b) return -1;
    for (int m0 = 0; m0 < M; m0 += 16) {
        const int m = M - m0 < 16 ? M - m0 : 16;
        pack_x(b, (const uint8_t *)(x + (long)m0 * K), 2L * K, m, 2 * covered, 0);
#pragma omp parallel
        {
            float c[256];
            configure_tiles(m);
#pragma omp for schedule(static)
            for (long n0 = 0; n0 < groups; n0 += 16) {
                const uint16_t *a = w + n0 * K;
                _tile_zero(0);
                for (long k = 0; k < covered; k += 32) {
                    prefetch_rows(a + k, 2L * K);
                    _tile_loadd(2, a + k, 2L * K);
                    _tile_loadd(4, b + 2 * k * m, 4 * m);
                    _tile_dpbf16ps(0, 2, 4);
                }
                _tile_stored(0, c, 4 * m);
                for (int r = 0; r < 16; r++)
                    for (int i = 0; i < m; i++) {
                        const uint16_t *xr = x + (long)(m0 + i) * K, *wr = a + r * (long)K;
                        float tail = 0.f;
                        for (long kk = covered; kk < K; kk++) tail += bf16_to_float(xr[kk]) * bf16_to_float(wr[kk]);
                        finish_row(y + (long)(m0 + i) * N, n0 + r, c[r * m + i] + tail, NULL, bias);
                    }
            }
            _tile_release();
        }
    }
    free(b);
    return groups;
}
#else
static int amx_usable(void) { return 0; }
#define amx_q8v(...) 0L
#define amx_q4v(...) 0L
#define amx_bf16(...) 0L
#endif

/* Rows of x up to which the matrix-vector kernels beat de-quantize + GEMM (read by model/kernels.py). With AMX
 * they cost about what one row costs. Without it (AVX512-VNNI / -BF16 tiles, blocks of 2-4 rows of x over
 * weights in cache) each further row adds its arithmetic, yet 16 rows still take a fraction of the GEMM
 * route, which first writes the layer out de-quantized (2-core Xeon without AMX, 27392x4096 at 8 / 16 rows,
 * the two routes alternating: int4 9 / 19 against 54 / 65 ms, int8 12 / 23 against 61 / 70, bf16 18 / 31
 * against 66 / 75). */
int decode_rows(void) { return 16; }

/* ---------------------------------------------------------------- int8 / int4 with integer dot products
 * For bf16 models: x is quantized per row to 16 (int8 weights) or 15 (int4) bits, far finer than bf16's
 * 8-bit mantissa, split into two byte "digits", and multiplied with the weight bytes by AVX512-VNNI
 * vpdpbusd (64 multiply-adds per instruction, exact int32 sums). */
#ifdef __AVX512VNNI__
/* xq[k] = x[k] / sx rounded to nearest even (as lrintf), sx = max |x| / qmax (1 for a row of zeros), so |xq| <=
 * qmax. A row holding a NaN or an infinity gets sx = NaN (and xq = 0): its outputs are NaN, as a float matmul
 * gives them, where its integers would otherwise be garbage. Vectorized: this runs for every row of x of every
 * layer, and lrintf was a library call per value (about a tenth of a batch-16 step of the 6B shape). */
static float quantize_row(const float *x, int K, int32_t *xq, int qmax) {
    __m512 top = _mm512_setzero_ps();
    __mmask16 bad = 0;
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 v = _mm512_loadu_ps(x + k);
        bad |= _mm512_fpclass_ps_mask(v, 0x99);  /* NaN or infinity */
        top = _mm512_max_ps(top, _mm512_abs_ps(v));
    }
    float amax = _mm512_reduce_max_ps(top);
    for (int kk = k; kk < K; kk++) {
        float a = x[kk] < 0 ? -x[kk] : x[kk];
        if (!(a <= 3.40282347e38f)) bad = 1;
        else if (a > amax) amax = a;
    }
    if (bad) {
        memset(xq, 0, sizeof(int32_t) * (size_t)K);
        return __builtin_nanf("");
    }
    const float sx = amax > 0 ? amax / (float)qmax : 1.f, inv = 1.f / sx;
    const __m512 vinv = _mm512_set1_ps(inv);
    for (k = 0; k + 16 <= K; k += 16)
        _mm512_storeu_si512((void *)(xq + k), _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), vinv)));
    for (; k < K; k++) xq[k] = (int32_t)__builtin_lrintf(x[k] * inv);
    return sx;
}

/* Lane i: the sum of a[i]'s 16 int32 lanes (a transposing tree, as sum16 below; int32 sums wrap as
 * _mm512_reduce_add_epi32's do, so the result is the same whatever the order) */
static inline __m512i isum16(const __m512i *a) {
    __m512i b[8], c[4], e[2];
    for (int i = 0; i < 8; i++)
        b[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_epi32(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        c[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(b[2 * i], b[2 * i + 1]), _mm512_unpackhi_epi64(b[2 * i], b[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        e[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(c[2 * i], c[2 * i + 1], 0x88), _mm512_shuffle_i32x4(c[2 * i], c[2 * i + 1], 0xdd));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(e[0], e[1], 0x88), _mm512_shuffle_i32x4(e[0], e[1], 0xdd));
}

/* sums[i] (i < n <= 64) = the lanes of acc[2 i + half] summed: a tile's accumulators, 16 at a time */
static void tile_sums(const __m512i *acc, int n, int half, int32_t *sums) {
    for (int i0 = 0; i0 < n; i0 += 16) {
        __m512i a[16];
        for (int i = 0; i < 16; i++) a[i] = i0 + i < n ? acc[2 * (i0 + i) + half] : _mm512_setzero_si512();
        _mm512_storeu_si512((void *)(sums + i0), isum16(a));
    }
}

/* Software prefetch of the next tile's weights while a tile works: a tile reads ROWS short row streams at
 * once, too short for the hardware prefetcher to ramp up on (prefetching past the end of w is harmless: it
 * never faults). The next tile's lines go in column order (64-byte steps, the ROWS rows at each: the order
 * its blocks read them, except where int4 unpacks a pass row by row first), `per` of them at each block
 * iteration, spread over all of this tile's iterations: one block of rows of x (batch 1-2) asks for ROWS lines
 * a step, as before; with more blocks they share the work. Before, only the first block of each pass asked for
 * the next tile's lines of that pass (the int4 tiles that unpack a pass: while unpacking), so the fetches came
 * in bursts at the start of each pass and did not overlap the other blocks' products. 6B decoding steps
 * (bench/step_ab.py, Xeon without AMX), batch 8 / 16: int8 628 -> 552 / 921 -> 826 ms, int4 494 -> 459 /
 * 1097 -> 1010, bf16 940 -> 817 / 1294 -> 1154; batch 1 as before (bf16 at batch 1 does not prefetch: one
 * stream per row suits the hardware prefetcher). */
typedef struct { const char *base; long row_bytes; long i, n; int per; } next_tile;
/* iters: the 64-byte steps of this tile's blocks: M rows of x in groups of 16 and blocks of mb */
static inline next_tile next_tile_for(const void *w, long n0, long row_bytes, long covered_bytes, int M, int mb) {
    const long iters = (long)(M / 16 * ((16 + mb - 1) / mb) + (M % 16 + mb - 1) / mb) * (covered_bytes / 64);
    next_tile p = {(const char *)w + (n0 + ROWS) * row_bytes, row_bytes, 0, ROWS * (covered_bytes / 64), ROWS};
    if (iters > 0 && (p.n + iters - 1) / iters < ROWS) p.per = (int)((p.n + iters - 1) / iters);
    return p;
}
static inline __attribute__((always_inline)) void next_tile_step(next_tile *p) {
    for (int j = 0; j < p->per && p->i < p->n; j++, p->i++)
        _mm_prefetch(p->base + (p->i % ROWS) * p->row_bytes + p->i / ROWS * 64, _MM_HINT_T0);
}

/* Several rows of x (a decoding batch) where the tiles below do the work (no AMX): the rows in groups of up to
 * 16, each group over a tile's columns in passes of VNNI_KC, in blocks of rows that share every weight vector
 * loaded (two rows here, four in gemv_bf16: the accumulators a block holds in registers). A tile's weight rows
 * and a group's x stay in the L1 cache for a pass, and the blocks prefetch the next tile (next_tile). One
 * row of x at a time over all of K, as before, read the tile's weights again for every row. Each (row of x,
 * weight row) pair is summed in the same order at any batch size. 2-core Xeon without AMX, a decoding step of
 * the 6B shape at batch 8 (the model's forward pass, mean of 2 interleaved runs): int4 0.67 -> 0.56 s, int8 1.05 ->
 * 0.78 s, bf16 1.64 -> 1.07 s; batch 1 unchanged. */
/* Columns a pass (int4: 1024 bytes of a weight row). 2048 rather than 1024: fewer passes, each reloading its
 * blocks' accumulators and waiting on the first block's weights; 6B decoding steps (bench/step_ab.py, Xeon
 * without AMX, four sittings) batch 16 int8 1.02-1.09x, int4 1.03-1.08x, batch 4-8 0.98-1.06x. */
#define VNNI_KC 2048
/* From this many rows of x in a group the int4 tiles unpack each pass of their weight rows once into a small
 * buffer that every block of rows then reads, instead of each block unpacking them again (4 vector ops per 64
 * bytes, against 8 products for a block of 2 rows). 6B int4 decoding steps (bench/step_ab.py, Xeon without
 * AMX): batch 16 1.14-1.16x, batch 8 1.02-1.07x, 7 1.11x, 5 and 6 1.01-1.02x; at 3-4 rows it was slower. */
#ifndef Q4_UNPACK_ROWS
#define Q4_UNPACK_ROWS 5
#endif

/* int8: x_u = x_q + 32768 = 256 * hi + lo with hi, lo unsigned bytes; dot(w, x_q) = 256 dot(w, hi) +
 * dot(w, lo) - 32768 sum(w). sum(w) comes from a third vpdpbusd against ones for the first row of x (ws not
 * NULL) and is kept for the others (it is a third of the work per row of x). MB rows of x (1 or 2) share each
 * loaded weight vector; the sums of acc [MB][ROWS][hi, lo] run in the same order whatever MB is. */
static inline __attribute__((always_inline)) void q8v_block(const uint8_t *xh, const uint8_t *xl, int K,
                                                            const int8_t *w, long n0, int k0, int k1,
                                                            __m512i *acc, __m512i *ws, const int mb,
                                                            next_tile *pf) {
    __m512i ah[2][ROWS], al[2][ROWS], as[ROWS];
    const __m512i ones = _mm512_set1_epi8(1);
    for (int r = 0; r < ROWS; r++) {
        if (ws) as[r] = ws[r];
        for (int m = 0; m < mb; m++) ah[m][r] = acc[(m * ROWS + r) * 2], al[m][r] = acc[(m * ROWS + r) * 2 + 1];
    }
    for (int k = k0; k < k1; k += 64) {
        __m512i hv[2], lv[2];
        for (int m = 0; m < mb; m++) {
            hv[m] = _mm512_loadu_si512((const void *)(xh + (long)m * K + k));
            lv[m] = _mm512_loadu_si512((const void *)(xl + (long)m * K + k));
        }
        next_tile_step(pf);
        for (int r = 0; r < ROWS; r++) {
            __m512i wv = _mm512_loadu_si512((const void *)(w + (n0 + r) * (long)K + k));
            for (int m = 0; m < mb; m++) {
                ah[m][r] = _mm512_dpbusd_epi32(ah[m][r], hv[m], wv);
                al[m][r] = _mm512_dpbusd_epi32(al[m][r], lv[m], wv);
            }
            if (ws) as[r] = _mm512_dpbusd_epi32(as[r], ones, wv);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        if (ws) ws[r] = as[r];
        for (int m = 0; m < mb; m++) acc[(m * ROWS + r) * 2] = ah[m][r], acc[(m * ROWS + r) * 2 + 1] = al[m][r];
    }
}

static void q8v_tile(const uint8_t *xh, const uint8_t *xl, const int32_t *xq, const float *sx, int M, int K,
                     const int8_t *w, long n0, int rows, const float *scale, const float *bias, float *y, long N) {
    __m512i acc[16 * ROWS * 2], ws[ROWS];
    int64_t wsum[ROWS] = {0};
    const int covered = rows == ROWS ? K / 64 * 64 : 0;
    next_tile pf = next_tile_for(w, n0, K, covered, M, 2);
    for (int r = 0; r < ROWS; r++) ws[r] = _mm512_setzero_si512();
    for (long g = 0; g < M; g += 16) {
        const int gm = M - g < 16 ? (int)(M - g) : 16;
        const long o = g * K;
        for (int i = 0; i < gm * ROWS * 2; i++) acc[i] = _mm512_setzero_si512();
        const int kc = gm > 2 ? VNNI_KC : covered;  /* one block of rows: one pass */
        for (int k0 = 0; k0 < covered; k0 += kc) {
            const int k1 = covered - k0 < kc ? covered : k0 + kc;
            int m = 0;
            for (; m + 2 <= gm; m += 2)
                q8v_block(xh + o + (long)m * K, xl + o + (long)m * K, K, w, n0, k0, k1, acc + m * ROWS * 2,
                          g == 0 && m == 0 ? ws : NULL, 2, &pf);
            if (m < gm)
                q8v_block(xh + o + (long)m * K, xl + o + (long)m * K, K, w, n0, k0, k1, acc + m * ROWS * 2,
                          g == 0 && m == 0 ? ws : NULL, 1, &pf);
        }
        if (g == 0)
            for (int r = 0; r < rows; r++) wsum[r] = _mm512_reduce_add_epi32(ws[r]);
        int32_t sh[16 * ROWS], sl[16 * ROWS];
        tile_sums(acc, gm * ROWS, 0, sh);
        tile_sums(acc, gm * ROWS, 1, sl);
        for (int m = 0; m < gm; m++) {
            const int32_t *q = xq + o + (long)m * K;
            for (int r = 0; r < rows; r++) {
                const int8_t *wr = w + (n0 + r) * (long)K;
                int64_t dot = 256 * (int64_t)sh[m * ROWS + r] + sl[m * ROWS + r] - 32768 * wsum[r];
                for (int kk = covered; kk < K; kk++) dot += (int64_t)wr[kk] * q[kk];
                finish_row(y + (g + m) * N, n0 + r, (float)dot * sx[g + m], scale, bias);
            }
        }
    }
}

int gemv_q8v(const float *x, int M, int K, const int8_t *w, int N, const float *scale, const float *bias,
             float *y) {
    /* per row m: xq [K], its two digits xh / xl [K] (x_q + 32768 = 256 xh + xl) and its scale sx */
    int32_t *xq = (int32_t *)malloc(sizeof(int32_t) * (size_t)M * (size_t)K);
    uint8_t *xh = (uint8_t *)malloc((size_t)M * (size_t)K), *xl = (uint8_t *)malloc((size_t)M * (size_t)K);
    float *sx = (float *)malloc(sizeof(float) * (size_t)M);
    if (!xq || !xh || !xl || !sx) { free(xq); free(xh); free(xl); free(sx); return NO_MEMORY; }
    const __m512i bias16 = _mm512_set1_epi32(32768), low = _mm512_set1_epi32(255);
    for (long m = 0; m < M; m++) {
        sx[m] = quantize_row(x + m * K, K, xq + m * K, 32767);
        long k = m * K;
        for (; k + 16 <= (m + 1) * K; k += 16) {
            __m512i u = _mm512_add_epi32(_mm512_loadu_si512((const void *)(xq + k)), bias16);
            _mm_storeu_si128((__m128i *)(xh + k), _mm512_cvtepi32_epi8(_mm512_srli_epi32(u, 8)));
            _mm_storeu_si128((__m128i *)(xl + k), _mm512_cvtepi32_epi8(_mm512_and_si512(u, low)));
        }
        for (; k < (m + 1) * K; k++) { int32_t u = xq[k] + 32768; xh[k] = (uint8_t)(u >> 8); xl[k] = (uint8_t)(u & 255); }
    }
    long done = amx_q8v(xh, xl, xq, sx, M, K, w, N, scale, bias, y);  /* output rows done with AMX */
    if (done < 0) { free(xq); free(xh); free(xl); free(sx); return NO_MEMORY; }
#pragma omp parallel for schedule(static)
    for (long n0 = done; n0 < N; n0 += ROWS)
        q8v_tile(xh, xl, xq, sx, M, K, w, n0, N - n0 < ROWS ? (int)(N - n0) : ROWS, scale, bias, y, N);
    free(xq); free(xh); free(xl); free(sx);
    return 0;
}

/* int4: u = nibble ^ 8 = n + 8 in 0..15 is the unsigned operand; x_q = 128 * hi + lo with hi a signed byte
 * and lo in 0..127; dot(n, x_q) = 128 dot(u, hi) + dot(u, lo) - 8 sum(x_q). The even columns (high
 * nibbles) meet x's even columns, the odd ones x's odd columns: the xe.. / xo.. buffers are x de-interleaved. */
static inline __attribute__((always_inline)) void q4v_block(const int8_t *buf, int K2, const uint8_t *w,
                                                            long n0, int j0, int j1, __m512i *acc, const int mb,
                                                            next_tile *pf, const uint8_t *pre) {
    __m512i ah[2][ROWS], al[2][ROWS];
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < ROWS; r++) ah[m][r] = acc[(m * ROWS + r) * 2], al[m][r] = acc[(m * ROWS + r) * 2 + 1];
    for (int j = j0; j < j1; j += 64) {
        __m512i eh[2], el[2], oh[2], ol[2];  /* x's digits: xeh, xel, xoh, xol [K2] each, row after row */
        for (int m = 0; m < mb; m++) {
            const int8_t *xm = buf + (long)m * 4 * K2 + j;
            eh[m] = _mm512_loadu_si512((const void *)xm), el[m] = _mm512_loadu_si512((const void *)(xm + K2));
            oh[m] = _mm512_loadu_si512((const void *)(xm + 2 * (long)K2));
            ol[m] = _mm512_loadu_si512((const void *)(xm + 3 * (long)K2));
        }
        next_tile_step(pf);
        for (int r = 0; r < ROWS; r++) {
            __m512i ue, uo;
            if (pre) {  /* unpacked once for every block of the pass */
                ue = _mm512_load_si512((const void *)(pre + (2 * r) * (VNNI_KC / 2) + (j - j0)));
                uo = _mm512_load_si512((const void *)(pre + (2 * r + 1) * (VNNI_KC / 2) + (j - j0)));
            } else
                q4_unpack(w + (n0 + r) * (long)K2 + j, &ue, &uo);
            for (int m = 0; m < mb; m++) {
                ah[m][r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(ah[m][r], ue, eh[m]), uo, oh[m]);
                al[m][r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(al[m][r], ue, el[m]), uo, ol[m]);
            }
        }
    }
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < ROWS; r++) acc[(m * ROWS + r) * 2] = ah[m][r], acc[(m * ROWS + r) * 2 + 1] = al[m][r];
}

static void q4v_tile(const int8_t *buf, const int32_t *xq, const int64_t *xqsum, const float *sx, int M, int K2,
                     const uint8_t *w, long n0, int rows, const float *scale, const float *bias, float *y, long N) {
    __m512i acc[16 * ROWS * 2];
    uint8_t pre[ROWS * VNNI_KC] __attribute__((aligned(64)));  /* per weight row: ue, uo of a pass */
    const int covered = rows == ROWS ? K2 / 64 * 64 : 0;
    next_tile pf = next_tile_for(w, n0, K2, covered, M, 2);
    for (long g = 0; g < M; g += 16) {
        const int gm = M - g < 16 ? (int)(M - g) : 16;
        const int8_t *bg = buf + g * 4 * K2;
        for (int i = 0; i < gm * ROWS * 2; i++) acc[i] = _mm512_setzero_si512();
        const int jc = gm > 2 ? VNNI_KC / 2 : covered;  /* one block of rows: one pass */
        for (int j0 = 0; j0 < covered; j0 += jc) {
            const int j1 = covered - j0 < jc ? covered : j0 + jc;
            int m = 0;
            if (gm >= Q4_UNPACK_ROWS) {
                for (int r = 0; r < ROWS; r++)  /* unpack the pass once for all blocks */
                    for (int j = j0; j < j1; j += 64) {
                        __m512i e, o;
                        q4_unpack(w + (n0 + r) * (long)K2 + j, &e, &o);
                        _mm512_store_si512((void *)(pre + (2 * r) * (VNNI_KC / 2) + (j - j0)), e);
                        _mm512_store_si512((void *)(pre + (2 * r + 1) * (VNNI_KC / 2) + (j - j0)), o);
                    }
                for (; m + 2 <= gm; m += 2)
                    q4v_block(bg + (long)m * 4 * K2, K2, w, n0, j0, j1, acc + m * ROWS * 2, 2, &pf, pre);
                if (m < gm) q4v_block(bg + (long)m * 4 * K2, K2, w, n0, j0, j1, acc + m * ROWS * 2, 1, &pf, pre);
                continue;
            }
            for (; m + 2 <= gm; m += 2)
                q4v_block(bg + (long)m * 4 * K2, K2, w, n0, j0, j1, acc + m * ROWS * 2, 2, &pf, NULL);
            if (m < gm) q4v_block(bg + (long)m * 4 * K2, K2, w, n0, j0, j1, acc + m * ROWS * 2, 1, &pf, NULL);
        }
        int32_t sh[16 * ROWS], sl[16 * ROWS];
        if (covered) {
            tile_sums(acc, gm * ROWS, 0, sh);
            tile_sums(acc, gm * ROWS, 1, sl);
        }
        for (int m = 0; m < gm; m++) {
            const int32_t *q = xq + (g + m) * 2 * K2;
            for (int r = 0; r < rows; r++) {
                const uint8_t *wr = w + (n0 + r) * (long)K2;
                int64_t dot = 0;
                if (covered) dot = 128 * (int64_t)sh[m * ROWS + r] + sl[m * ROWS + r] - 8 * xqsum[g + m];
                for (int jj = covered; jj < K2; jj++)
                    dot += (int64_t)nibble_value(wr[jj] >> 4) * q[2 * jj] + (int64_t)nibble_value(wr[jj]) * q[2 * jj + 1];
                finish_row(y + (g + m) * N, n0 + r, (float)dot * sx[g + m], scale, bias);
            }
        }
    }
}

int gemv_q4v(const float *x, int M, int K, const uint8_t *w, int N, const float *scale, const float *bias,
             float *y) {
    int K2 = K / 2, covered = K2 / 64 * 64;
    /* per row m: xq [K], x_q's digits de-interleaved (xeh, xel, xoh, xol [K2] each), sx and sum(x_q) */
    int32_t *xq = (int32_t *)malloc(sizeof(int32_t) * (size_t)M * (size_t)K);
    int8_t *buf = (int8_t *)malloc((size_t)M * (size_t)K2 * 4);
    float *sx = (float *)malloc(sizeof(float) * (size_t)M);
    int64_t *xqsum = (int64_t *)malloc(sizeof(int64_t) * (size_t)M);
    if (!xq || !buf || !sx || !xqsum) { free(xq); free(buf); free(sx); free(xqsum); return NO_MEMORY; }
    const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1)), low7 = _mm512_set1_epi32(127);
    for (long m = 0; m < M; m++) {
        int32_t *q = xq + m * K;
        int8_t *xeh = buf + m * 4 * K2, *xel = xeh + K2, *xoh = xeh + 2 * K2, *xol = xeh + 3 * K2;
        sx[m] = quantize_row(x + m * K, K, q, 16383);
        xqsum[m] = 0;
        int j = 0;
        __m512i total = _mm512_setzero_si512();  /* int64 lanes */
        for (; j + 16 <= K2; j += 16) {  /* 16 pairs: even columns to e, odd to o */
            __m512i a = _mm512_loadu_si512((const void *)(q + 2 * j)), b = _mm512_loadu_si512((const void *)(q + 2 * j + 16));
            __m512i e = _mm512_permutex2var_epi32(a, evens, b), o = _mm512_permutex2var_epi32(a, odds, b);
            _mm_storeu_si128((__m128i *)(xeh + j), _mm512_cvtepi32_epi8(_mm512_srai_epi32(e, 7)));
            _mm_storeu_si128((__m128i *)(xel + j), _mm512_cvtepi32_epi8(_mm512_and_si512(e, low7)));
            _mm_storeu_si128((__m128i *)(xoh + j), _mm512_cvtepi32_epi8(_mm512_srai_epi32(o, 7)));
            _mm_storeu_si128((__m128i *)(xol + j), _mm512_cvtepi32_epi8(_mm512_and_si512(o, low7)));
            if (j < covered) {
                __m512i t = _mm512_add_epi32(e, o);
                total = _mm512_add_epi64(total, _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(t)),
                                                                 _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(t, 1))));
            }
        }
        xqsum[m] = _mm512_reduce_add_epi64(total);
        for (; j < K2; j++) {
            int32_t e = q[2 * j], o = q[2 * j + 1];
            xeh[j] = (int8_t)(e >> 7); xel[j] = (int8_t)(e & 127);
            xoh[j] = (int8_t)(o >> 7); xol[j] = (int8_t)(o & 127);
            if (j < covered) xqsum[m] += e + o;
        }
    }
    /* output rows done with AMX: not for one or two rows of x, where the VNNI tiles below are about twice as
     * fast (an int4 AMX step unpacks its weights through memory and runs four tile products whatever m is;
     * 27392x4096, 2-core Xeon: 3.4 against 7-9 ms at one row, 5.5 against 8 at two, equal at three). Both
     * form the same exact integer sums, so a row's result does not depend on which one ran. */
    long done = M <= Q4_VNNI_MAX_ROWS ? 0 : amx_q4v(buf, xq, xqsum, sx, M, K, w, N, scale, bias, y);
    if (done < 0) { free(xq); free(buf); free(sx); free(xqsum); return NO_MEMORY; }
#pragma omp parallel for schedule(static)
    for (long n0 = done; n0 < N; n0 += ROWS)
        q4v_tile(buf, xq, xqsum, sx, M, K2, w, n0, N - n0 < ROWS ? (int)(N - n0) : ROWS, scale, bias, y, N);
    free(xq); free(buf); free(sx); free(xqsum);
    return 0;
}
int has_vnni(void) { return 1; }
#else
int gemv_q8v(const float *x, int M, int K, const int8_t *w, int N, const float *scale, const float *bias, float *y) {
    return gemv_q8(x, M, K, w, N, scale, bias, y);
}
int gemv_q4v(const float *x, int M, int K, const uint8_t *w, int N, const float *scale, const float *bias, float *y) {
    return gemv_q4(x, M, K, w, N, scale, bias, y);
}
int has_vnni(void) { return 0; }
#endif

/* ---------------------------------------------------------------- bf16 */

#ifdef __AVX512BF16__
#define BF16_KC 1024  /* columns a pass over a group of rows (as the integer kernels above): 40 KB in L1 */

/* x is bf16 here (xb), so the products are the exact bf16 x bf16 products a bf16 matmul forms. MB rows of x
 * (1-4, a constant where it is inlined) against the ROWS weight rows of a tile over columns k0..k1 (steps of
 * 32), carrying the MB * ROWS sums in acc: each weight vector is loaded once for the MB rows and each x
 * vector once for the ROWS rows. */
static inline __attribute__((always_inline)) void bf16_block(const uint16_t *xb, int K, const uint16_t *w,
                                                             long n0, int k0, int k1, __m512 *acc,
                                                             const int mb, next_tile *pf, const int fma) {
    __m512 a[4][ROWS];
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < ROWS; r++) a[m][r] = acc[m * ROWS + r];
    for (int k = k0; k < k1; k += 32) {
        __m512bh xv[4];
        __m512 xe[4], xo[4];  /* fma: x's even and odd columns widened (a bf16 is the top half of its float) */
        for (int m = 0; m < mb; m++) {
            __m512i v = _mm512_loadu_si512((const void *)(xb + (long)m * K + k));
            if (fma) {
                xe[m] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
                xo[m] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
            } else
                xv[m] = (__m512bh)v;
        }
        next_tile_step(pf);
        for (int r = 0; r < ROWS; r++) {
            __m512i wv = _mm512_loadu_si512((const void *)(w + (n0 + r) * (long)K + k));
            if (fma) {
                __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16)), wo = _mm512_castsi512_ps(_mm512_and_si512(wv, high));
                for (int m = 0; m < mb; m++) a[m][r] = _mm512_fmadd_ps(xo[m], wo, _mm512_fmadd_ps(xe[m], we, a[m][r]));
            } else
                for (int m = 0; m < mb; m++) a[m][r] = _mm512_dpbf16_ps(a[m][r], xv[m], (__m512bh)wv);
        }
    }
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < ROWS; r++) acc[m * ROWS + r] = a[m][r];
}

/* Rows of x in groups of up to 16, each group over the tile's columns in passes of BF16_KC (one pass for one
 * block). Each (x row, weight row) pair is one chain of 32-column steps, then the columns past them, at any
 * M, so a row's result does not depend on the batch. */
static inline __attribute__((always_inline)) void bf16_tile(const uint16_t *x, int M, int K, const uint16_t *w,
                                                            long n0, int rows, const float *bias, float *y, long N,
                                                            const int fma) {
    __m512 acc[16 * ROWS];
    const int covered = rows == ROWS ? K / 32 * 32 : 0;
    next_tile pf = next_tile_for(w, n0, 2L * K, 2L * covered, M, 4);
    if (M == 1) pf.n = 0;  /* one row of x: left to the hardware */
    for (long g = 0; g < M; g += 16) {
        const int gm = M - g < 16 ? (int)(M - g) : 16;
        const uint16_t *xg = x + g * K;
        for (int i = 0; i < gm * ROWS; i++) acc[i] = _mm512_setzero_ps();
        const int kc = gm > 4 ? BF16_KC : covered;  /* one block of rows: one pass */
        for (int k0 = 0; k0 < covered; k0 += kc) {
            const int k1 = covered - k0 < kc ? covered : k0 + kc;
            int m = 0;
            for (; m + 4 <= gm; m += 4) bf16_block(xg + (long)m * K, K, w, n0, k0, k1, acc + m * ROWS, 4, &pf, fma);
            switch (gm - m) {
            case 3: bf16_block(xg + (long)m * K, K, w, n0, k0, k1, acc + m * ROWS, 3, &pf, fma); break;
            case 2: bf16_block(xg + (long)m * K, K, w, n0, k0, k1, acc + m * ROWS, 2, &pf, fma); break;
            case 1: bf16_block(xg + (long)m * K, K, w, n0, k0, k1, acc + m * ROWS, 1, &pf, fma); break;
            }
        }
        for (int m = 0; m < gm; m++) {
            const uint16_t *xr = xg + (long)m * K;
            for (int r = 0; r < rows; r++) {
                const uint16_t *wr = w + (n0 + r) * (long)K;
                float tail = 0.f;
                for (int kk = covered; kk < K; kk++) tail += bf16_to_float(xr[kk]) * bf16_to_float(wr[kk]);
                finish_row(y + (g + m) * N, n0 + r, _mm512_reduce_add_ps(acc[m * ROWS + r]) + tail, NULL, bias);
            }
        }
    }
}

/* How the vector tiles form bf16 products: vdpbf16ps (32 products an instruction), or widening both operands
 * to float32 (a shift or a mask: a bf16 is the top half of its float) for float32 multiply-adds (16 products,
 * but two of them an instruction cycle where vdpbf16ps takes more than one). Measured on a 2-core Xeon without
 * AMX (Emerald Rapids): vdpbf16ps 0.74 ns an instruction against 0.19 for vfmadd231ps, so batches, bound by
 * their products, ran up to ~1.5x faster with multiply-adds; AMD's Zen 4 issues vdpbf16ps as fast as a
 * multiply-add, so there it stays. Chosen once per process (by vendor, or CHATGLM_BF16_PRODUCTS=fma / dpbf16),
 * for every batch size: a row's bits never depend on its batch. Both are exact products summed in float32. */
static int bf16_use_fma(void) {
    static int route = -1;
    if (route < 0) {
        const char *forced = getenv("CHATGLM_BF16_PRODUCTS");
        __builtin_cpu_init();
        route = forced && !strcmp(forced, "fma") ? 1 : forced && !strcmp(forced, "dpbf16") ? 0
              : __builtin_cpu_is("intel");
    }
    return route;
}

int gemv_bf16(const uint16_t *x, int M, int K, const uint16_t *w, int N, const float *bias, float *y) {
    long done = amx_bf16(x, M, K, w, N, bias, y);  /* output rows done with AMX */
    if (done < 0) return NO_MEMORY;
    const int fma = bf16_use_fma();
#pragma omp parallel for schedule(static)
    for (long n0 = done; n0 < N; n0 += ROWS) {
        const int rows = N - n0 < ROWS ? (int)(N - n0) : ROWS;
        if (fma) bf16_tile(x, M, K, w, n0, rows, bias, y, N, 1);
        else bf16_tile(x, M, K, w, n0, rows, bias, y, N, 0);
    }
    return 0;
}
#else
int gemv_bf16(const uint16_t *x, int M, int K, const uint16_t *w, int N, const float *bias, float *y) {
    (void)x; (void)M; (void)K; (void)w; (void)N; (void)bias; (void)y;
    return NO_BF16;  /* no AVX512-BF16 on this CPU: the caller uses torch */
}
#endif

#include "kernels_glue.h"  /* RMSNorm, rotary, SiLU * b, bf16 in / out linears */

/* ---------------------------------------------------------------- de-quantization for multi-token inputs */

/* out[n][k] = q[n][k] * scale[n] as bf16 (out_bf16) or float32 (out_f32), q the int8 value or nibble. */
static inline __m512 q16_values(const uint8_t *q, int bits, int k) {  /* 16 weights from column k (k % 16 == 0) */
    if (bits == 8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + k))));
    /* 8 bytes hold columns k..k+15; byte j: column k+2j in the high nibble, k+2j+1 in the low one */
    __m128i b = _mm_loadl_epi64((const __m128i *)(q + k / 2));
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0f)), lo = _mm_and_si128(b, _mm_set1_epi8(0x0f));
    __m128i inter = _mm_unpacklo_epi8(hi, lo);  /* column order */
    __m512i v = _mm512_cvtepu8_epi32(inter);
    v = _mm512_sub_epi32(_mm512_xor_si512(v, _mm512_set1_epi32(8)), _mm512_set1_epi32(8));
    return _mm512_cvtepi32_ps(v);
}

int dequantize(const uint8_t *w, int bits, int N, int K, const float *scale, uint16_t *out_bf16, float *out_f32) {
    long stride = bits == 8 ? K : K / 2;
#pragma omp parallel for schedule(static)
    for (long n = 0; n < N; n++) {
        const uint8_t *q = w + n * stride;
        __m512 s = _mm512_set1_ps(scale[n]);
        int k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 v = _mm512_mul_ps(q16_values(q, bits, k), s);
            if (out_f32) _mm512_storeu_ps(out_f32 + n * (long)K + k, v);
            else {
                /* round to nearest even like float_to_bf16 (the values are finite) */
                __m512i u = _mm512_castps_si512(v);
                __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                             _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
                _mm256_storeu_si256((__m256i *)(out_bf16 + n * (long)K + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
            }
        }
        for (; k < K; k++) {
            float qv = bits == 8 ? (float)(int8_t)q[k] : nibble_value((k & 1) ? q[k / 2] : (unsigned)(q[k / 2] >> 4));
            float v = qv * scale[n];
            if (out_f32) out_f32[n * (long)K + k] = v;
            else out_bf16[n * (long)K + k] = float_to_bf16(v);
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- decode attention over a bf16 KV cache
 * One new token per sequence: q [B][nh][d] (contiguous) over keys / values [B][g][S][d] at any strides (a view
 * into a larger preallocated cache), query head h reading group h / (nh / g). Scores q.k * scale, the mask
 * (allowed: bytes, 0 = masked; or bias: an additive float32 mask; strides mb for the batch and ms for
 * positions, 0 to broadcast), softmax and the weighted sum of values, all in float32; out [B][nh][d] bf16
 * (round to nearest even, as torch). The cache is read once, at its stored 2 bytes a value: by AMX tiles
 * where the CPU has them, else widened to float32 16 rows at a time into a small buffer, never as a whole.
 *
 * Tasks: (batch, group, ATT_CHUNK positions) with an online softmax over ATT_SPAN positions at a time (running
 * maximum and sum per head, accumulators rescaled when the maximum grows); the chunks of a (batch, group) are
 * combined at the end, so one sequence with 2 groups still keeps every core busy. Masked positions (mask
 * False, or an additive -inf) get the score -inf whatever their key, and their value rows are never read
 * (zeros in the buffers, weight 0), so whatever a masked slot holds (NaN, inf) cannot reach the result. A
 * query that may attend to nothing gets NaN, as torch's softmax gives it. */
static inline __m512 widen16_bf16(const uint16_t *p) {  /* exact */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

#define att_to_bf16 float_to_bf16
#include "kernels_attention.h"  /* ATT_CHUNK / _BLOCK / _SPAN, the mask, e^x's polynomial, att_combine */
#define V512(op) _mm512_##op##_ps

/* e^x for x <= 0 (scores less their running maximum): Cephes' expf, within 1.3 ulp (checked over -104..0);
 * 0 below -150, NaN stays NaN */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-150.f), x);  /* max returns its second operand for a NaN */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 p;
    ATT_EXP_REDUCED(V512, x, n, p);
    return _mm512_scalef_ps(p, n);
}

static inline float exp1(float x) { return _mm512_cvtss_f32(exp16(_mm512_set1_ps(x))); }

/* Lane i: the sum of a[i]'s 16 lanes (a transposing tree: 45 shuffles and adds for 16 sums). */
static inline __m512 sum16(const __m512 *a) {
    __m512 b[8], c[4], e[2];
    for (int i = 0; i < 8; i++)  /* per 128 bits: a0+a2, b0+b2, a1+a3, b1+b3 */
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* per 128 bits: the partial sums of 4 vectors */
        __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
        c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++)
        e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88), _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(e[0], e[1], 0x88), _mm512_shuffle_f32x4(e[0], e[1], 0xdd));
}

/* rows [ATT_BLOCK][d] float32 <- rows s..s+n-1 of src (stride apart); masked rows and rows past n are zeros.
 * Each row asks for the same row of the next block too (a prefetch never faults, past the cache's end or not):
 * a block is 4 KB at the 6B head shape, a page of its own, which the hardware's prefetchers do not enter ahead
 * of use. Measured per call at 8192 cached tokens of the 6B shape, 2 threads (AVX-512 Xeon without AMX, one
 * run, the variants interleaved): 1.13 -> 1.01 ms with att_span_lanes, 1.34 -> 1.22 ms without. */
static void widen_rows(float *rows, const uint16_t *src, int64_t stride, long s, int n, int d, att_mask m) {
    for (int i = 0; i < ATT_BLOCK; i++) {
        float *dst = rows + (long)i * d;
        if (i >= n || att_masked(m, s + i)) { memset(dst, 0, sizeof(float) * (size_t)d); continue; }
        const uint16_t *r = src + (s + i) * stride;
        for (int c = 0; c < d; c += 32) _mm_prefetch((const char *)(r + ATT_BLOCK * stride + c), _MM_HINT_T0);
        for (int c = 0; c < d; c += 16) _mm512_storeu_ps(dst + c, widen16_bf16(r + c));
    }
}

/* acc[h][dc..dc+16 nv) += sum_i p[h * hs + i * ps] * rows[i][dc..] for heads h < nh over the ATT_BLOCK rows:
 * nh * nv accumulators in registers, each widened value read once for the nh heads */
static inline __attribute__((always_inline)) void att_values(float *acc, const float *p, long hs, long ps,
                                                             const float *rows, int d, int dc, const int nh,
                                                             const int nv) {
    __m512 a[4][8];
#pragma GCC unroll 4
    for (int h = 0; h < nh; h++)
#pragma GCC unroll 8
        for (int j = 0; j < nv; j++) a[h][j] = _mm512_loadu_ps(acc + (long)h * d + dc + 16 * j);
    for (int i = 0; i < ATT_BLOCK; i++) {
        const float *r = rows + (long)i * d + dc;
#pragma GCC unroll 8
        for (int j = 0; j < nv; j++) {
            const __m512 x = _mm512_loadu_ps(r + 16 * j);
#pragma GCC unroll 4
            for (int h = 0; h < nh; h++) a[h][j] = _mm512_fmadd_ps(_mm512_set1_ps(p[h * hs + i * ps]), x, a[h][j]);
        }
    }
#pragma GCC unroll 4
    for (int h = 0; h < nh; h++)
#pragma GCC unroll 8
        for (int j = 0; j < nv; j++) _mm512_storeu_ps(acc + (long)h * d + dc + 16 * j, a[h][j]);
}

/* acc [hg][d] += weights x the value rows s..s+n-1 (masked ones as zeros); the weight of position s + i for
 * head h is w[h * hs + i * ps], zero from n on. 4 heads x 64 values of d at a time (16 accumulators, 8 loads
 * per 16 multiply-adds) against 2 heads x 128 before: 1.70 -> 1.34 ms a call in the same run as widen_rows'
 * numbers. The order of each sum (position by position) is the same for any grouping. */
static void att_weigh_values(const float *w, long hs, long ps, int hg, int d, const uint16_t *v, int64_t vs,
                             long s, int n, att_mask m, float *acc, float *rows) {
    for (int blk = 0; blk < n; blk += ATT_BLOCK) {
        widen_rows(rows, v, vs, s + blk, n - blk, d, m);
        int h = 0;
        for (; h + 4 <= hg; h += 4) {
            float *a = acc + (long)h * d;
            const float *p = w + h * hs + blk * ps;
            int dc = 0;
            for (; dc + 64 <= d; dc += 64) att_values(a, p, hs, ps, rows, d, dc, 4, 4);
            for (; dc < d; dc += 16) att_values(a, p, hs, ps, rows, d, dc, 4, 1);
        }
        for (; h < hg; h++) {
            float *a = acc + (long)h * d;
            const float *p = w + h * hs + blk * ps;
            int dc = 0;
            for (; dc + 128 <= d; dc += 128) att_values(a, p, hs, ps, rows, d, dc, 1, 8);
            for (; dc < d; dc += 16) att_values(a, p, hs, ps, rows, d, dc, 1, 1);
        }
    }
}

/* scores[h][0..16) = (q_h . k_s) * scale for the ATT_BLOCK positions s0.. (n of them valid) and heads h < hg;
 * rows of masked positions and past n count as zeros. q [hg][d] bf16; rows: ATT_BLOCK * d floats of room.
 * The rows are widened to float32 (exact) in a buffer and multiplied in float32. vdpbf16ps on the bf16 rows
 * straight from the cache (half the instructions, no widening) measured slower on a Sapphire Rapids Xeon: 2.0
 * against 1.8 ms for 8192 positions of the 6B shape on one core. */
static void att_scores(const uint16_t *q, int hg, int d, const uint16_t *k, int64_t ks, long s0, int n,
                       att_mask m, float scale, float *scores, float *rows) {
    widen_rows(rows, k, ks, s0, n, d, m);
    for (int h = 0; h < hg; h++) {
        __m512 a[ATT_BLOCK];
        for (int i = 0; i < ATT_BLOCK; i++) a[i] = _mm512_setzero_ps();
        for (int c = 0; c < d; c += 16) {
            __m512 qv = widen16_bf16(q + (long)h * d + c);
            for (int i = 0; i < ATT_BLOCK; i++) a[i] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(rows + (long)i * d + c), a[i]);
        }
        _mm512_storeu_ps(scores + (long)h * ATT_SPAN, _mm512_mul_ps(sum16(a), _mm512_set1_ps(scale)));
    }
}

/* With AMX (16 heads or fewer a group, d a multiple of 32): the same sums as tile products. The vector loops
 * above are bound by their float32 multiply-adds, not by reading the cache: measured on one (shared) core of
 * a Sapphire Rapids Xeon, 8192 positions of the 6B shape took 1.56 ms with tiles against 2.55 ms without
 * (512 positions: 0.092 against 0.159 ms); that was before att_span_lanes, which tiles have not been measured
 * against (the CPUs since had no AMX), so they keep the 16-head groups where AMX is. Products of bf16 values
 * are exact and summed in float32 (tiles flush bf16 denormals to zero, below 1e-38). Scores: tile A = 16 cached key rows as stored (bf16 pairs along d), B = the group's queries packed in
 * pairs, C[position][head] in float32. Values: the weights split into bf16 hi + lo (p - hi rounded again:
 * 2^-17 relative, as float32 as makes no difference to a bf16 result) times the value rows packed in pairs of
 * positions, C[head][16 columns of d] accumulated onto the float32 sums. Tiles: 0 C, 1 keys, 2 queries for
 * scores; 3, 4 weights hi / lo, 5 values, 6, 7 two C tiles (32 columns of d) for values. */
#ifdef HAVE_AMX
typedef struct {
    uint32_t *qpack;   /* [d/32][16][hg]: the queries' bf16 pairs, as tile B */
    uint16_t *stage;   /* [ATT_BLOCK][d]: the last rows of the cache, zeros past its end */
    float *ct;         /* [16][16]: one score tile */
    uint16_t *hi, *lo; /* [hg][ATT_SPAN]: the weights split in two bf16 */
    uint16_t *vpack;   /* [ATT_SPAN/32][d/16][16][32]: value rows in pairs of positions, as tile B */
} att_tiles;

static void att_configure(int hg) {
    tile_config c __attribute__((aligned(64)));
    memset(&c, 0, sizeof c);
    c.palette = 1;
    const int rows[8] = {16, 16, 16, hg, hg, 16, hg, hg}, colsb[8] = {4 * hg, 64, 4 * hg, 64, 64, 64, 64, 64};
    for (int t = 0; t < 8; t++) { c.rows[t] = (uint8_t)rows[t]; c.colsb[t] = (uint16_t)colsb[t]; }
    _tile_loadconfig(&c);
}

static void att_pack_queries(const uint16_t *q, int hg, int d, uint32_t *qpack) {
    for (int c = 0; c < d / 32; c++)
        for (int r = 0; r < 16; r++)
            for (int h = 0; h < hg; h++) {
                uint32_t pair;
                memcpy(&pair, q + (long)h * d + 32 * c + 2 * r, 4);
                qpack[((long)c * 16 + r) * hg + h] = pair;
            }
}

/* r[i][j] <- r[j][i] */
static inline void transpose16(__m512 *r) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) {  /* per 128 bits: t[2i] = r2i[0] r2i+1[0] r2i[1] r2i+1[1], t[2i+1] the same of [2], [3] */
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int a = 0; a < 4; a++) {  /* u[4a + c], 128 bits L: column 4L + c of rows 4a..4a+3 */
        __m512d t0 = _mm512_castps_pd(t[4 * a]), t1 = _mm512_castps_pd(t[4 * a + 1]);
        __m512d t2 = _mm512_castps_pd(t[4 * a + 2]), t3 = _mm512_castps_pd(t[4 * a + 3]);
        u[4 * a] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
        u[4 * a + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
        u[4 * a + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
        u[4 * a + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
    }
    for (int c = 0; c < 4; c++) {  /* column 4L + c: 128 bits L of u[c], u[4 + c], u[8 + c], u[12 + c] */
        __m512 x0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), x1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xee);
        __m512 y0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44), y1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xee);
        r[c] = _mm512_shuffle_f32x4(x0, y0, 0x88);
        r[4 + c] = _mm512_shuffle_f32x4(x0, y0, 0xdd);
        r[8 + c] = _mm512_shuffle_f32x4(x1, y1, 0x88);
        r[12 + c] = _mm512_shuffle_f32x4(x1, y1, 0xdd);
    }
}

/* scores [hg][ATT_SPAN] (row stride ATT_SPAN) for positions s.. s+n-1 of keys k (rows ks apart, S of them) */
static void att_scores_amx(int hg, int d, const uint16_t *k, int64_t ks, long S, long s, int n, float scale,
                           float *scores, att_tiles *t) {
    for (int blk = 0; blk < n; blk += ATT_BLOCK) {
        const uint16_t *rows = k + (s + blk) * ks;
        long stride = 2 * ks;
        if (s + blk + ATT_BLOCK > S) {  /* a tile reads 16 rows: past the cache's end, zeros */
            for (long i = 0; i < ATT_BLOCK; i++)
                if (s + blk + i < S) memcpy(t->stage + i * d, rows + i * ks, 2 * (size_t)d);
                else memset(t->stage + i * d, 0, 2 * (size_t)d);
            rows = t->stage, stride = 2L * d;
        }
        _tile_zero(0);
        for (int c = 0; c < d / 32; c++) {
            _tile_loadd(1, rows + 32 * c, stride);
            _tile_loadd(2, t->qpack + (long)c * 16 * hg, 4 * hg);
            _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, t->ct, 64);
        __m512 r[16];
        for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(t->ct + 16 * i);
        transpose16(r);  /* [head][position] */
        for (int h = 0; h < hg; h++) _mm512_storeu_ps(scores + (long)h * ATT_SPAN + blk, _mm512_mul_ps(r[h], _mm512_set1_ps(scale)));
    }
}

/* acc [hg][d] += weights [hg][ATT_SPAN] (zeros from n on) x value rows s..s+n-1 (masked ones as zeros) */
static void att_values_amx(const float *weights, int hg, int d, const uint16_t *v, int64_t vs, long s, int n,
                           att_mask m, float *acc, att_tiles *t) {
    const int blocks = (n + 31) / 32, tiles = d / 16;
    for (long i = 0; i < (long)hg * ATT_SPAN; i += 16) {
        __m512 w = _mm512_loadu_ps(weights + i);
        __m256bh hi = _mm512_cvtneps_pbh(w);
        __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)hi), 16));
        _mm256_storeu_si256((__m256i *)(t->hi + i), (__m256i)hi);
        _mm256_storeu_si256((__m256i *)(t->lo + i), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(w, back)));
    }
    const __m512i even = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                          39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(16));
    for (int b = 0; b < blocks; b++)
        for (int r = 0; r < 16; r++) {  /* positions 2r, 2r+1 of the block interleaved per column of d */
            const int i0 = 32 * b + 2 * r, i1 = i0 + 1;
            const uint16_t *r0 = i0 < n && !att_masked(m, s + i0) ? v + (s + i0) * vs : NULL;
            const uint16_t *r1 = i1 < n && !att_masked(m, s + i1) ? v + (s + i1) * vs : NULL;
            for (int c = 0; c < d; c += 32) {
                __m512i a = r0 ? _mm512_loadu_si512((const void *)(r0 + c)) : _mm512_setzero_si512();
                __m512i z = r1 ? _mm512_loadu_si512((const void *)(r1 + c)) : _mm512_setzero_si512();
                uint16_t *dst = t->vpack + (((long)b * tiles + c / 16) * 16 + r) * 32;
                _mm512_storeu_si512((void *)dst, _mm512_permutex2var_epi16(a, even, z));
                _mm512_storeu_si512((void *)(dst + 16 * 32), _mm512_permutex2var_epi16(a, odd, z));
            }
        }
    for (int c = 0; c < tiles; c += 2) {
        _tile_loadd(6, acc + 16 * c, 4L * d);
        _tile_loadd(7, acc + 16 * c + 16, 4L * d);
        for (int b = 0; b < blocks; b++) {
            _tile_loadd(3, t->hi + 32 * b, 2 * ATT_SPAN);
            _tile_loadd(4, t->lo + 32 * b, 2 * ATT_SPAN);
            _tile_loadd(5, t->vpack + ((long)b * tiles + c) * 16 * 32, 64);
            _tile_dpbf16ps(6, 3, 5);
            _tile_dpbf16ps(6, 4, 5);
            _tile_loadd(5, t->vpack + ((long)b * tiles + c + 1) * 16 * 32, 64);
            _tile_dpbf16ps(7, 3, 5);
            _tile_dpbf16ps(7, 4, 5);
        }
        _tile_stored(6, acc + 16 * c, 4L * d);
        _tile_stored(7, acc + 16 * c + 16, 4L * d);
    }
}
#else
typedef struct { int unused; } att_tiles;
#endif

/* One task: heads q[hg][d] (bf16) over positions s0..s1-1 of one (batch, group). acc [hg][d], mx [hg],
 * sum [hg] get its partial softmax: the running maximum, sum of e^(score - max) and sum of weighted values. */
static void att_span(const uint16_t *q, int hg, int d, const uint16_t *k, int64_t ks, const uint16_t *v, int64_t vs,
                     long S, long s0, long s1, att_mask m, float scale, float *acc, float *mx, float *sum,
                     float *scores, float *rows, att_tiles *tiles) {
    (void)S, (void)tiles;  /* the tile path's */
    for (long i = 0; i < (long)hg * d; i++) acc[i] = 0.f;
    for (int h = 0; h < hg; h++) { mx[h] = -__builtin_inff(); sum[h] = 0.f; }
    for (long s = s0; s < s1; s += ATT_SPAN) {
        const int n = s1 - s < ATT_SPAN ? (int)(s1 - s) : ATT_SPAN;
#ifdef HAVE_AMX
        if (tiles) att_scores_amx(hg, d, k, ks, S, s, n, scale, scores, tiles);
        else
#endif
        for (int blk = 0; blk < n; blk += ATT_BLOCK) att_scores(q, hg, d, k, ks, s + blk, n - blk, m, scale,
                                                               scores + blk, rows);
        for (int i = 0; i < n; i++) {  /* the mask, after the scale as torch adds it */
            if (att_masked(m, s + i)) for (int h = 0; h < hg; h++) scores[(long)h * ATT_SPAN + i] = -__builtin_inff();
            else if (m.bias) for (int h = 0; h < hg; h++) scores[(long)h * ATT_SPAN + i] += m.bias[(s + i) * m.ms];
        }
        const __mmask16 tail = (__mmask16)((1u << (n % 16)) - 1);
        for (int h = 0; h < hg; h++) {  /* scores -> weights e^(score - running max); rescale what came before */
            float *sc = scores + (long)h * ATT_SPAN;
            __m512 vmax = _mm512_set1_ps(-__builtin_inff());
            int i = 0;
            for (; i + 16 <= n; i += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(sc + i));
            if (i < n) vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_loadu_ps(sc + i));
            float top = _mm512_reduce_max_ps(vmax), before = mx[h];
            if (top > before) {
                float alpha = before == -__builtin_inff() ? 0.f : exp1(before - top);
                for (long j = 0; j < d; j++) acc[(long)h * d + j] *= alpha;
                sum[h] *= alpha;
                mx[h] = top;
            }
            const float now = mx[h];
            if (now == -__builtin_inff()) {  /* all masked so far: weights 0 */
                memset(sc, 0, sizeof(float) * ATT_SPAN);
                continue;
            }
            __m512 vsum = _mm512_setzero_ps(), vnow = _mm512_set1_ps(now);
            for (i = 0; i < ATT_SPAN; i += 16) {
                __m512 w = i + 16 <= n ? exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + i), vnow))
                         : i < n ? _mm512_maskz_mov_ps(tail, exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + i), vnow)))
                         : _mm512_setzero_ps();
                _mm512_storeu_ps(sc + i, w);
                vsum = _mm512_add_ps(vsum, w);
            }
            sum[h] += _mm512_reduce_add_ps(vsum);
        }
#ifdef HAVE_AMX
        if (tiles) {
            att_values_amx(scores, hg, d, v, vs, s, n, m, acc, tiles);
            continue;
        }
#endif
        att_weigh_values(scores, ATT_SPAN, 1, hg, d, v, vs, s, n, m, acc, rows);
    }
}

/* Scores of 16 heads at once, one head a lane (hg a multiple of 16, without AMX): for each key value, one
 * multiply-add of it (broadcast) by the 16 queries' values at that index, so no sums across lanes (att_scores
 * spends about a quarter of its instructions on its reduction trees). Same run as widen_rows' numbers:
 * 1.22 -> 1.01 ms. scores [ATT_BLOCK][hg] (position-major) = q.k * scale for positions s0.. (n valid; rows past n and masked
 * rows count as zeros); qt [hg / 16][d][16]: the queries widened, lane = head. */
static void att_scores_lanes(const float *qt, int hg, int d, const uint16_t *k, int64_t ks, long s0, int n,
                             att_mask m, float scale, float *scores, float *rows) {
    widen_rows(rows, k, ks, s0, n, d, m);
    for (int hb = 0; hb < hg; hb += 16) {
        const float *qh = qt + (long)hb * d;
        __m512 a[ATT_BLOCK];
        for (int i = 0; i < ATT_BLOCK; i++) a[i] = _mm512_setzero_ps();
        for (int c = 0; c < d; c += 8) {
            __m512 qv[8];
            for (int j = 0; j < 8; j++) qv[j] = _mm512_loadu_ps(qh + (long)(c + j) * 16);
            for (int j = 0; j < 8; j++)
                for (int i = 0; i < ATT_BLOCK; i++)
                    a[i] = _mm512_fmadd_ps(qv[j], _mm512_set1_ps(rows[(long)i * d + c + j]), a[i]);
        }
        for (int i = 0; i < ATT_BLOCK; i++)
            _mm512_storeu_ps(scores + (long)i * hg + hb, _mm512_mul_ps(a[i], _mm512_set1_ps(scale)));
    }
}

/* att_span with att_scores_lanes: the softmax in lanes too; scores [ATT_SPAN][hg]; qt [hg][d] of room */
static void att_span_lanes(const uint16_t *q, int hg, int d, const uint16_t *k, int64_t ks, const uint16_t *v,
                           int64_t vs, long s0, long s1, att_mask m, float scale, float *acc, float *mx, float *sum,
                           float *scores, float *rows, float *qt) {
    att_start(q, hg, d, 16, qt, acc, mx, sum);
    const __m512 minus_inf = _mm512_set1_ps(-__builtin_inff());
    for (long s = s0; s < s1; s += ATT_SPAN) {
        const int n = s1 - s < ATT_SPAN ? (int)(s1 - s) : ATT_SPAN, padded = (n + ATT_BLOCK - 1) / ATT_BLOCK * ATT_BLOCK;
        for (int blk = 0; blk < n; blk += ATT_BLOCK)
            att_scores_lanes(qt, hg, d, k, ks, s + blk, n - blk, m, scale, scores + (long)blk * hg, rows);
        att_mask_scores(scores, hg, s, n, m);
        for (int hb = 0; hb < hg; hb += 16) {  /* scores -> weights e^(score - running max) */
            __m512 top = minus_inf;
            for (int i = 0; i < n; i++) top = _mm512_max_ps(top, _mm512_loadu_ps(scores + (long)i * hg + hb));
            const __m512 before = _mm512_loadu_ps(mx + hb);
            if (_mm512_cmp_ps_mask(top, before, _CMP_GT_OQ)) {
                float t[16], alpha[16];
                _mm512_storeu_ps(t, top);
                _mm512_storeu_ps(alpha, exp16(_mm512_sub_ps(before, top)));
                att_raise(acc, mx, sum, d, hb, 16, t, alpha);
            }
            const __m512 now = _mm512_loadu_ps(mx + hb);
            const __mmask16 live = _mm512_cmp_ps_mask(now, minus_inf, _CMP_NEQ_OQ);  /* lanes all masked so far: 0 */
            __m512 vsum = _mm512_setzero_ps();
            for (int i = 0; i < padded; i++) {
                float *sc = scores + (long)i * hg + hb;
                __m512 w = i < n ? _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_loadu_ps(sc), now)))
                                 : _mm512_setzero_ps();
                _mm512_storeu_ps(sc, w);
                vsum = _mm512_add_ps(vsum, w);
            }
            _mm512_storeu_ps(sum + hb, _mm512_add_ps(_mm512_loadu_ps(sum + hb), vsum));
        }
        att_weigh_values(scores, 1, hg, hg, d, v, vs, s, n, m, acc, rows);
    }
}

int decode_attention_bf16(const uint16_t *q, int B, int nh, int g, int S, int d,
                          const uint16_t *k, int64_t kb, int64_t kg, int64_t ks,
                          const uint16_t *v, int64_t vb, int64_t vg, int64_t vs,
                          const uint8_t *allowed, const float *bias, int64_t mb, int64_t ms,
                          float scale, uint16_t *out) {
    const int hg = nh / g;
    const long pairs = (long)B * g, span = ATT_CHUNK, chunks = (S + span - 1) / span;
    const long per_task = (long)hg * (d + 2);  /* acc [hg][d], mx [hg], sum [hg] */
    float *part = (float *)malloc(sizeof(float) * (size_t)(pairs * chunks * per_task));
    if (!part) return NO_MEMORY;
    int failed = 0;
#ifdef HAVE_AMX
    const int amx = hg <= 16 && d % 32 == 0 && amx_usable();
#else
    const int amx = 0;
#endif
    /* per thread: scores [hg][ATT_SPAN] and rows [ATT_BLOCK][d] floats; with AMX qpack [d/32][16][hg] (as
     * many floats), stage [ATT_BLOCK][d], hi and lo [hg][ATT_SPAN], vpack [ATT_SPAN][d] bf16, ct [16][16] */
    const int lanes = !amx && hg % 16 == 0;  /* att_span_lanes, with qt [hg][d] after rows */
    const size_t floats = (size_t)hg * ATT_SPAN + (size_t)ATT_BLOCK * d + (lanes ? (size_t)hg * d : 0),
                 tile_bytes = amx ? 4 * ((size_t)d / 2 * hg + 256) + 2 * ((size_t)ATT_BLOCK * d + 2 * (size_t)hg * ATT_SPAN + (size_t)ATT_SPAN * d) : 0;
#pragma omp parallel
    {
        float *scores = (float *)malloc(sizeof(float) * floats + tile_bytes);
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
        float *rows = scores + (long)hg * ATT_SPAN;
        att_tiles *tiles = NULL;
#ifdef HAVE_AMX
        att_tiles work;
        long widened = -1;  /* the (batch, group) whose queries qpack holds */
        if (amx && scores) {
            work.qpack = (uint32_t *)(rows + (long)ATT_BLOCK * d);
            work.ct = (float *)(work.qpack + (long)d / 2 * hg);
            work.stage = (uint16_t *)(work.ct + 256);
            work.hi = work.stage + (long)ATT_BLOCK * d;
            work.lo = work.hi + (long)hg * ATT_SPAN;
            work.vpack = work.lo + (long)hg * ATT_SPAN;
            tiles = &work;
            att_configure(hg);
        }
#endif
#pragma omp for schedule(dynamic)
        for (long t = 0; t < pairs * chunks; t++) {
            if (!scores) continue;
            const long pair = t / chunks, c = t % chunks, b = pair / g, grp = pair % g;
            const long s0 = c * span, s1 = s0 + span < S ? s0 + span : S;
            const uint16_t *qg = q + (b * nh + grp * hg) * (long)d;
            float *acc = part + t * per_task;
            att_mask m = {allowed ? allowed + b * mb : NULL, bias ? bias + b * mb : NULL, ms};
#ifdef HAVE_AMX
            if (tiles && widened != pair) {
                att_pack_queries(qg, hg, d, work.qpack);
                widened = pair;
            }
#endif
            if (lanes)
                att_span_lanes(qg, hg, d, k + b * kb + grp * kg, ks, v + b * vb + grp * vg, vs, s0, s1, m, scale,
                               acc, acc + (long)hg * d, acc + (long)hg * d + hg, scores, rows,
                               rows + (long)ATT_BLOCK * d);
            else
                att_span(qg, hg, d, k + b * kb + grp * kg, ks, v + b * vb + grp * vg, vs, S, s0, s1, m, scale, acc,
                         acc + (long)hg * d, acc + (long)hg * d + hg, scores, rows, tiles);
        }
#ifdef HAVE_AMX
        if (tiles) _tile_release();
#endif
        free(scores);
    }
    if (failed) { free(part); return NO_MEMORY; }
    att_combine(part, B, nh, g, d, chunks, out);
    free(part);
    return 0;
}
