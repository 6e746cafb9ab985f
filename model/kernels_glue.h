/* The small steps of a bf16 forward pass between the matrix products, one C call each instead of 3-13 torch
 * ops: RMSNorm, the rotary embedding, SiLU(a) * b, and the bf16 in / bf16 out wrapper of the linear kernels.
 * Included by both builds (model/kernels.c, model/kernels_avx2.c) after their gemv_* functions; plain C that
 * the compiler vectorizes for the CPU at hand.
 *
 * Why: decoding one token of the 6B shape runs about 2,000 such ops. Each costs 5-10 us of dispatch, and
 * several times that right after a matrix product has streamed tens of MB through the caches (2-core Xeon,
 * int4: 47 of a 235 ms step outside the matrix kernels).
 *
 * Results equal torch's bf16 arithmetic (each op computed in float32 and rounded to nearest even, NaN to
 * 0x7fc0) except where noted: RMSNorm's mean of squares is summed in another order (float32 partial sums,
 * combined in double), and SiLU's exp is computed another way. Every row is computed alone, so a row's result does
 * not depend on the rows beside it.
 */
#include <math.h>

static inline uint16_t glue_round(float f) {  /* float32 -> bf16 as torch: nearest even, NaN -> 0x7fc0 */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define NO_SUCH_KIND (-3)  /* linear_bf16io: a kind it does not know (model/kernels.py checks first) */
#define GLUE_PARALLEL_ROWS 8  /* rows from which a step splits its rows over the threads */

/* out[r] = bf16(w * (x[r] * rsqrt(mean(x[r]^2) + eps))), each product in float32, as modeling.RMSNorm. */
int rmsnorm_bf16(const uint16_t *x, int rows, int n, const uint16_t *w, float eps, uint16_t *out) {
#pragma omp parallel for schedule(static) if (rows >= GLUE_PARALLEL_ROWS)
    for (long r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * (long)n;
        float part[16] = {0};
        int k = 0;
        for (; k + 16 <= n; k += 16)
            for (int i = 0; i < 16; i++) { float v = bf16_to_float(xr[k + i]); part[i] += v * v; }
        double sum = 0;
        for (int i = 0; i < 16; i++) sum += part[i];
        for (; k < n; k++) { float v = bf16_to_float(xr[k]); sum += v * v; }
        const float scale = 1.0f / sqrtf((float)sum / (float)n + eps);  /* a sum past FLT_MAX: inf, as torch */
        uint16_t *o = out + r * (long)n;
        for (k = 0; k < n; k++) o[k] = glue_round(bf16_to_float(w[k]) * (bf16_to_float(xr[k]) * scale));
    }
    return 0;
}

/* In place, for each of `rows` rows (stride `stride` elements): the first `heads` heads of d values each get
 * the interleaved rotary on their first 2 * pairs values, with the row's cos[pairs], sin[pairs] (bf16):
 * (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), every product and sum rounded to bf16 as in
 * modeling.apply_rotary. */
int rotary_bf16(uint16_t *x, int rows, long stride, int heads, int d, int pairs, const uint16_t *cos_,
                const uint16_t *sin_) {
#pragma omp parallel for schedule(static) if (rows >= GLUE_PARALLEL_ROWS)
    for (long r = 0; r < rows; r++) {
        const uint16_t *c = cos_ + r * pairs, *s = sin_ + r * pairs;
        for (int h = 0; h < heads; h++) {
            uint16_t *p = x + r * stride + (long)h * d;
            for (int j = 0; j < pairs; j++) {
                float x0 = bf16_to_float(p[2 * j]), x1 = bf16_to_float(p[2 * j + 1]);
                float cj = bf16_to_float(c[j]), sj = bf16_to_float(s[j]);
                float a = bf16_to_float(glue_round(x0 * cj)), b = bf16_to_float(glue_round(x1 * sj));
                float e = bf16_to_float(glue_round(x1 * cj)), f = bf16_to_float(glue_round(x0 * sj));
                p[2 * j] = glue_round(a - b);
                p[2 * j + 1] = glue_round(e + f);
            }
        }
    }
    return 0;
}

/* exp(x) in float32 within about 1 ulp (Cephes' expf polynomial), branch-free so that loops over it vectorize:
 * the C library's expf is a call per value (5x slower here). 2^n goes into the exponent field as an integer
 * add, so no float multiply ends it that a compiler could fuse with the caller's add (GCC's default
 * -ffp-contract=fast would, changing bits between compilers). Below -86.6 it stays at exp(-86.6) (about
 * 2.4e-38; 1 + that is 1, as 1 + exp(x) is there); past 88.72 it is inf, as expf. */
static inline float glue_exp(float x) {
    float c = x < -86.6f ? -86.6f : x > 88.7f ? 88.7f : x;
    c = c == c ? c : 0.0f;  /* NaN: computed as 0, returned as NaN below (no NaN to int conversion) */
    float n = rintf(c * 1.44269504088896341f);  /* -125 .. 128 */
    float r = fmaf(n, -0.693359375f, c);
    r = fmaf(n, 2.12194440e-4f, r);  /* c - n ln 2 in two steps */
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r) + 1.0f;  /* e^r, r in about -0.35 .. 0.35 */
    uint32_t bits;
    memcpy(&bits, &p, 4);
    bits += (uint32_t)(int32_t)n << 23;  /* p 2^n stays a normal float over the clamped range */
    float e;
    memcpy(&e, &bits, 4);
    return x > 88.7228f ? INFINITY : x == x ? e : x;
}

/* out[r][j] = bf16(bf16(silu(a)) * b) with a = ab[r][j], b = ab[r][n + j]: F.silu(a) * b of the two halves of
 * the MLP's first product. silu(a) = a / (1 + exp(-a)) in float32 (glue_exp may differ from torch's exp in the
 * last bit of float32, which bf16 rounding almost always hides). */
int silu_mul_bf16(const uint16_t *ab, int rows, int n, uint16_t *out) {
#pragma omp parallel for schedule(static) if (rows >= GLUE_PARALLEL_ROWS)
    for (long r = 0; r < rows; r++) {
        const uint16_t *a = ab + r * 2 * (long)n, *b = a + n;
        uint16_t *o = out + r * (long)n;
        for (int j = 0; j < n; j++) {
            float v = bf16_to_float(a[j]);
            float s = bf16_to_float(glue_round(v / (1.0f + glue_exp(-v))));
            o[j] = glue_round(s * bf16_to_float(b[j]));
        }
    }
    return 0;
}

/* A linear with bf16 x [M][K] and bf16 y [M][N]: the float32 kernel named by `kind` (0 gemv_q8, 1 gemv_q4,
 * 2 gemv_q8v, 3 gemv_q4v, 4 gemv_bf16) between exact widening of x and rounding of y, so y equals the kernel's
 * float32 result .to(torch.bfloat16). */
int linear_bf16io(int kind, const uint16_t *x, int M, int K, const void *w, int N, const float *scale,
                  const float *bias, uint16_t *y) {
    float *yf = (float *)malloc(sizeof(float) * (size_t)M * (size_t)N);
    float *xf = kind == 4 ? NULL : (float *)malloc(sizeof(float) * (size_t)M * (size_t)K);
    if (!yf || (kind != 4 && !xf)) { free(yf); free(xf); return NO_MEMORY; }
    if (xf)
        for (long i = 0; i < (long)M * K; i++) xf[i] = bf16_to_float(x[i]);
    int status;
    switch (kind) {
    case 0: status = gemv_q8(xf, M, K, (const int8_t *)w, N, scale, bias, yf); break;
    case 1: status = gemv_q4(xf, M, K, (const uint8_t *)w, N, scale, bias, yf); break;
    case 2: status = gemv_q8v(xf, M, K, (const int8_t *)w, N, scale, bias, yf); break;
    case 3: status = gemv_q4v(xf, M, K, (const uint8_t *)w, N, scale, bias, yf); break;
    case 4: status = gemv_bf16(x, M, K, (const uint16_t *)w, N, bias, yf); break;
    default: status = NO_SUCH_KIND; break;
    }
    if (status == 0)
        for (long i = 0; i < (long)M * N; i++) y[i] = glue_round(yf[i]);
    free(yf); free(xf);
    return status;
}
