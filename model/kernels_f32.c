/* float32 y = x W^T + b for a few rows of x, on x86 CPUs with AVX2 and FMA. Built on first use by
 * model/kernels.py (gcc -O3 -march=native -fopenmp) and called through ctypes.
 *
 * Decoding a batch of sequences multiplies a few rows of activations by every weight matrix. Where the
 * stock GEMMs handle so few rows poorly (measured on an AMD EPYC with AVX2: 61 ms for 8 rows of a 27392x4096
 * weight, 3x the one-row time), this reads each block of NR weight rows once from memory and multiplies it
 * with every row of x while it sits in cache, in register tiles of MR x-rows by NR weight rows.
 * Each output is one dot product summed in the same order whatever the number of rows, so a sequence gets
 * bit-identical results alone or in a batch.
 *
 * Layout: x[M][K], w[N][K], y[M][N] row-major float32; b[N] or NULL.
 */
#include <immintrin.h>

#define NR 4 /* weight rows per tile */
#define MR 3 /* x rows per tile: MR * NR accumulators + NR weight vectors + 1 x vector fit the 16 registers */

int chatglm_f32_abi(void) { return 1; }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

void linear_f32(const float *x, int M, int K, const float *w, int N, const float *b, float *y) {
    const int K8 = K & ~7;
    #pragma omp parallel for schedule(static)
    for (long n0 = 0; n0 < N; n0 += NR) {
        const int rows = N - n0 < NR ? (int)(N - n0) : NR;
        const float *wr[NR];
        for (int r = 0; r < NR; r++) wr[r] = w + (n0 + (r < rows ? r : 0)) * (long)K;
        for (int m0 = 0; m0 < M; m0 += MR) {
            const int ms = M - m0 < MR ? M - m0 : MR;
            const float *xr[MR];
            for (int i = 0; i < MR; i++) xr[i] = x + (long)(m0 + (i < ms ? i : 0)) * K;
            __m256 acc[MR][NR];
            for (int i = 0; i < MR; i++)
                for (int r = 0; r < NR; r++) acc[i][r] = _mm256_setzero_ps();
            for (int k = 0; k < K8; k += 8) {
                __m256 wv[NR];
                for (int r = 0; r < NR; r++) wv[r] = _mm256_loadu_ps(wr[r] + k);
                for (int i = 0; i < MR; i++) {
                    const __m256 xv = _mm256_loadu_ps(xr[i] + k);
                    for (int r = 0; r < NR; r++) acc[i][r] = _mm256_fmadd_ps(xv, wv[r], acc[i][r]);
                }
            }
            for (int i = 0; i < ms; i++)
                for (int r = 0; r < rows; r++) {
                    float s = hsum(acc[i][r]);
                    for (int k = K8; k < K; k++) s += xr[i][k] * wr[r][k];
                    y[(long)(m0 + i) * N + n0 + r] = s + (b ? b[n0 + r] : 0.f);
                }
        }
    }
}
