/* What the two builds' decode attention (decode_attention_bf16 in model/kernels.c and model/kernels_avx2.c)
 * share beside their vector code: the task sizes, the mask, and the last step, which combines the partial
 * softmaxes of a (batch, group)'s chunks of positions, and the polynomial of their vector e^x. Each build
 * defines exp1 (e^x of one float, as its vector exp computes it) and att_to_bf16 (float32 -> bf16, nearest
 * even, NaN stays NaN) before including it. */

/* out = e^(x - n ln 2) for n = round(x / ln 2), the reduced argument within ln(2) / 2 of 0 (Cephes' expf:
 * with out * 2^n, within 1.3 ulp of e^x). V(op) names the build's vector intrinsic _mm..._op_ps; each build
 * forms 2^n its own way. */
#define ATT_EXP_REDUCED(V, x, n, out)                                                                           \
    do {                                                                                                        \
        __typeof__(V(set1)(0.f)) r_ = V(fnmadd)(n, V(set1)(0.693359375f), x);                                 \
        r_ = V(fnmadd)(n, V(set1)(-2.12194440e-4f), r_);                                                        \
        __typeof__(V(set1)(0.f)) p_ = V(set1)(1.9875691500e-4f);                                              \
        p_ = V(fmadd)(p_, r_, V(set1)(1.3981999507e-3f));                                                       \
        p_ = V(fmadd)(p_, r_, V(set1)(8.3334519073e-3f));                                                       \
        p_ = V(fmadd)(p_, r_, V(set1)(4.1665795894e-2f));                                                       \
        p_ = V(fmadd)(p_, r_, V(set1)(1.6666665459e-1f));                                                       \
        p_ = V(fmadd)(p_, r_, V(set1)(5.0000001201e-1f));                                                       \
        out = V(fmadd)(V(mul)(p_, r_), r_, V(add)(r_, V(set1)(1.f)));                                           \
    } while (0)

static inline float exp1(float x);
static inline uint16_t att_to_bf16(float f);

#define ATT_CHUNK 512  /* positions per task (multiple of ATT_SPAN): fixed, so that the order of the sums, and
                        * with it a sequence's result, depends on neither the batch nor the thread count */
#define ATT_BLOCK 16  /* positions per block: one widened block of cached rows */
#define ATT_SPAN 128  /* positions per online-softmax step (multiple of ATT_BLOCK) */

typedef struct {
    const uint8_t *allowed;
    const float *bias;
    int64_t ms;
} att_mask;

static inline int att_masked(att_mask m, long s) {
    return m.allowed ? !m.allowed[s * m.ms] : m.bias && m.bias[s * m.ms] == -__builtin_inff();
}

/* The start of a task with `lanes` heads in the lanes of a vector: qt [hg / lanes][d][lanes] = the queries
 * q [hg][d] (bf16) widened, lane = head; acc [hg][d] and sum [hg] zero, mx [hg] -inf. */
static void att_start(const uint16_t *q, int hg, int d, int lanes, float *qt, float *acc, float *mx, float *sum) {
    for (int h = 0; h < hg; h++)
        for (int c = 0; c < d; c++)
            qt[((long)(h / lanes) * d + c) * lanes + h % lanes] = bf16_to_float(q[(long)h * d + c]);
    for (long i = 0; i < (long)hg * d; i++) acc[i] = 0.f;
    for (int h = 0; h < hg; h++) { mx[h] = -__builtin_inff(); sum[h] = 0.f; }
}

/* The mask on scores [position][hg] of positions s..s+n-1, after the scale as torch adds it */
static void att_mask_scores(float *scores, int hg, long s, int n, att_mask m) {
    for (int i = 0; i < n; i++) {
        float *sc = scores + (long)i * hg;
        if (att_masked(m, s + i)) for (int h = 0; h < hg; h++) sc[h] = -__builtin_inff();
        else if (m.bias) for (int h = 0; h < hg; h++) sc[h] += m.bias[(s + i) * m.ms];
    }
}

/* Heads hb..hb+lanes-1 whose maximum score in a span, top[l], exceeds their running maximum: what came before
 * is scaled by alpha[l] = e^(running maximum - top[l]) (by 0 where nothing came before), and the maximum
 * raised. */
static void att_raise(float *acc, float *mx, float *sum, int d, int hb, int lanes, const float *top,
                      const float *alpha) {
    for (int l = 0; l < lanes; l++) {
        if (!(top[l] > mx[hb + l])) continue;
        const float a = mx[hb + l] == -__builtin_inff() ? 0.f : alpha[l];
        float *row = acc + (long)(hb + l) * d;
        for (long j = 0; j < d; j++) row[j] *= a;
        sum[hb + l] *= a;
        mx[hb + l] = top[l];
    }
}

/* part: per task (pair = batch * g + group, chunk c) at part + (pair * chunks + c) * (hg * (d + 2)): acc [hg][d],
 * mx [hg], sum [hg]. Each head's chunks are rescaled to the overall maximum and summed (into the first
 * chunk's acc), then divided by the total: out [B][nh][d] bf16, NaN where no position could be attended. */
static void att_combine(float *part, int B, int nh, int g, int d, long chunks, uint16_t *out) {
    const int hg = nh / g;
    const long pairs = (long)B * g, per_task = (long)hg * (d + 2);
#pragma omp parallel for schedule(static)
    for (long ph = 0; ph < pairs * hg; ph++) {
        const long pair = ph / hg, h = ph % hg, b = pair / g, grp = pair % g;
        float *first = part + pair * chunks * per_task, *y = first + h * (long)d;  /* the sum goes into y */
        uint16_t *o = out + (b * nh + grp * hg + h) * (long)d;
        float top = -__builtin_inff(), total = 0.f;
        for (long c = 0; c < chunks; c++) {
            const float mc = first[c * per_task + (long)hg * d + h];
            if (mc > top) top = mc;
        }
        for (long c = 0; c < chunks; c++) {
            const float *pc = first + c * per_task, mc = pc[(long)hg * d + h];
            const float w = mc == -__builtin_inff() ? 0.f : exp1(mc - top);
            total += w * pc[(long)hg * d + hg + h];
            for (long j = 0; j < d; j++) y[j] = c ? y[j] + w * pc[h * (long)d + j] : w * y[j];
        }
        for (long j = 0; j < d; j++)
            o[j] = att_to_bf16(top == -__builtin_inff() ? __builtin_nanf("") : y[j] / total);
    }
}
