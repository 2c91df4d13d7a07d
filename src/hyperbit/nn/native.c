/* hyperbit's CPU kernels, built on first use by hyperbit/nn/native.py (plain C, no torch headers).

   Every kernel has a PyTorch reference in the package; the tests compare the two, forward and
   backward. Tensors are passed as contiguous buffers; "tokens last" layouts let the compiler
   vectorise across tokens (one SIMD lane per token), with every iteration of a token's small
   problem kept in registers or L1 instead of a round trip through memory per tensor op.

   Sinkhorn (pathways/sinkhorn.py: _scale, then round_doubly_stochastic), logits z (N, n, n).
   K = exp(max(z - max_j z, -range)); per round u = 1 / (K v), v = 1 / (K^T u), v_0 = 1;
   P = diag(u) K diag(v), then the rounding step onto the doubly stochastic matrices. Inside,
   tokens are processed in blocks of BLOCK, laid out tokens last. The backward recomputes the
   rounds and runs the reverse of both steps. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 16  /* tokens per vector block */
#define MAXN 8    /* largest n handled here (n x n stays in registers / L1) */

#define DEFINE_SINKHORN(T, SUF, EXP)                                                              \
static void load_k_##SUF(const T *z, int64_t nn, int n, int64_t t0, int nb, T range,            \
                         T k[MAXN * MAXN][BLOCK], unsigned char live[MAXN * MAXN][BLOCK]) {      \
    for (int i = 0; i < n; i++) {                                                                 \
        T m[BLOCK];                                                                               \
        for (int b = 0; b < nb; b++) m[b] = z[(t0 + b) * nn + i * n];                     \
        for (int j = 1; j < n; j++)                                                               \
            for (int b = 0; b < nb; b++) {                                                        \
                T x = z[(t0 + b) * nn + i * n + j];                                       \
                m[b] = x > m[b] ? x : m[b];                                                       \
            }                                                                                     \
        for (int j = 0; j < n; j++)                                                               \
            for (int b = 0; b < nb; b++) {                                                        \
                T s = z[(t0 + b) * nn + i * n + j] - m[b];                                \
                live[i * n + j][b] = s >= -range;                                                 \
                k[i * n + j][b] = EXP(s >= -range ? s : -range);                                  \
            }                                                                                     \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
/* the rounds: u[t], v[t + 1] for t < iters (v[0] = 1) */                                        \
static void rounds_##SUF(int n, int nb, int iters, T k[MAXN * MAXN][BLOCK],                      \
                         T (*u)[MAXN][BLOCK], T (*v)[MAXN][BLOCK]) {                              \
    for (int j = 0; j < n; j++)                                                                   \
        for (int b = 0; b < nb; b++) v[0][j][b] = 1;                                              \
    for (int t = 0; t < iters; t++) {                                                             \
        for (int i = 0; i < n; i++) {                                                             \
            T s[BLOCK] = {0};                                                                     \
            for (int j = 0; j < n; j++)                                                           \
                for (int b = 0; b < nb; b++) s[b] += k[i * n + j][b] * v[t][j][b];                \
            for (int b = 0; b < nb; b++) u[t][i][b] = 1 / s[b];                                   \
        }                                                                                         \
        for (int j = 0; j < n; j++) {                                                             \
            T s[BLOCK] = {0};                                                                     \
            for (int i = 0; i < n; i++)                                                           \
                for (int b = 0; b < nb; b++) s[b] += k[i * n + j][b] * u[t][i][b];                \
            for (int b = 0; b < nb; b++) v[t + 1][j][b] = 1 / s[b];                               \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
/* the rounding step (round_doubly_stochastic) on a block: m (columns sum to 1) -> o; keeps     \
   what its reverse needs in r (row sums of m), d (deficits), sp (column spares), tot */         \
typedef struct { T R[MAXN][BLOCK], def[MAXN][BLOCK], sp[MAXN][BLOCK], tot[BLOCK], s[MAXN * MAXN][BLOCK]; } \
    round_state_##SUF;                                                                            \
static void round_##SUF(int n, int nb, T m[MAXN * MAXN][BLOCK], round_state_##SUF *st,           \
                        T floor_) {                                                               \
    for (int b = 0; b < nb; b++) st->tot[b] = 0;                                                  \
    for (int i = 0; i < n; i++) {                                                                 \
        T R[BLOCK] = {0}, Rs[BLOCK] = {0};                                                        \
        for (int j = 0; j < n; j++)                                                               \
            for (int b = 0; b < nb; b++) R[b] += m[i * n + j][b];                                 \
        for (int j = 0; j < n; j++)                                                               \
            for (int b = 0; b < nb; b++) {                                                        \
                st->s[i * n + j][b] = m[i * n + j][b] / (R[b] > 1 ? R[b] : 1);                    \
                Rs[b] += st->s[i * n + j][b];                                                     \
            }                                                                                     \
        for (int b = 0; b < nb; b++) {                                                            \
            st->R[i][b] = R[b];                                                                   \
            st->def[i][b] = 1 - Rs[b] > 0 ? 1 - Rs[b] : 0;                                        \
            st->tot[b] += st->def[i][b];                                                          \
        }                                                                                         \
    }                                                                                             \
    for (int j = 0; j < n; j++) {                                                                 \
        T C[BLOCK] = {0};                                                                         \
        for (int i = 0; i < n; i++)                                                               \
            for (int b = 0; b < nb; b++) C[b] += st->s[i * n + j][b];                             \
        for (int b = 0; b < nb; b++) st->sp[j][b] = 1 - C[b] > 0 ? 1 - C[b] : 0;                  \
    }                                                                                             \
    for (int b = 0; b < nb; b++) st->tot[b] = st->tot[b] > floor_ ? st->tot[b] : floor_;          \
}                                                                                                 \
                                                                                                  \
/* the reverse of round_: g (N, n, n) rows of this block -> gm = dL/dm; st from round_(m) */     \
static void round_backward_##SUF(int n, int nb, T m[MAXN * MAXN][BLOCK], round_state_##SUF *st, \
                                 T floor_, const T *g, int64_t t0, T gm[MAXN * MAXN][BLOCK]) {    \
    T gdef[MAXN][BLOCK] = {{0}}, gsp[MAXN][BLOCK] = {{0}}, gtot[BLOCK] = {0};                     \
    for (int i = 0; i < n; i++)                                                                   \
        for (int j = 0; j < n; j++)                                                               \
            for (int b = 0; b < nb; b++) {                                                        \
                T go = g[(t0 + b) * n * n + i * n + j];                                           \
                gm[i * n + j][b] = go; /* dL/ds, for now */                                       \
                gdef[i][b] += go * st->sp[j][b] / st->tot[b];                                     \
                gsp[j][b] += go * st->def[i][b] / st->tot[b];                                     \
                gtot[b] -= go * st->def[i][b] * st->sp[j][b] / (st->tot[b] * st->tot[b]);         \
            }                                                                                     \
    for (int b = 0; b < nb; b++) {                                                                \
        T t = 0;                                                                                  \
        for (int i = 0; i < n; i++) t += st->def[i][b];                                           \
        if (!(t >= floor_)) gtot[b] = 0; /* clamp_min passes the gradient where x >= floor */     \
    }                                                                                             \
    /* def_i = max(1 - rowsum(s)_i, 0); sp_j = max(1 - colsum(s)_j, 0); where 1 - sum >= 0 */   \
    for (int i = 0; i < n; i++)                                                                   \
        for (int b = 0; b < nb; b++) {                                                            \
            T Rs = 0;                                                                             \
            for (int j = 0; j < n; j++) Rs += st->s[i * n + j][b];                                \
            T gd = gdef[i][b] + gtot[b];                                                          \
            gdef[i][b] = 1 - Rs >= 0 ? -gd : 0; /* now dL/d rowsum(s)_i */                        \
        }                                                                                         \
    for (int j = 0; j < n; j++)                                                                   \
        for (int b = 0; b < nb; b++) {                                                            \
            T C = 0;                                                                              \
            for (int i = 0; i < n; i++) C += st->s[i * n + j][b];                                 \
            gsp[j][b] = 1 - C >= 0 ? -gsp[j][b] : 0; /* now dL/d colsum(s)_j */                   \
        }                                                                                         \
    /* s_ij = m_ij / max(R_i, 1) */                                                               \
    for (int i = 0; i < n; i++) {                                                                 \
        T gR[BLOCK] = {0};                                                                        \
        for (int j = 0; j < n; j++)                                                               \
            for (int b = 0; b < nb; b++) {                                                        \
                T d = st->R[i][b] > 1 ? st->R[i][b] : 1;                                          \
                T gs = gm[i * n + j][b] + gdef[i][b] + gsp[j][b];                                 \
                gm[i * n + j][b] = gs / d;                                                        \
                gR[b] -= gs * m[i * n + j][b] / (d * d);                                          \
            }                                                                                     \
        for (int b = 0; b < nb; b++)                                                              \
            if (st->R[i][b] >= 1)                                                                 \
                for (int j = 0; j < n; j++) gm[i * n + j][b] += gR[b];                            \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
int hb_sinkhorn_##SUF(const T *z, T *out, int64_t N, int n, int iters, T range, T floor_) {          \
    if (n < 1 || n > MAXN || iters < 1) return 1;                                                 \
    T (*u)[MAXN][BLOCK] = malloc(sizeof(T[MAXN][BLOCK]) * (size_t)iters);                         \
    T (*v)[MAXN][BLOCK] = malloc(sizeof(T[MAXN][BLOCK]) * (size_t)(iters + 1));                   \
    round_state_##SUF *st = malloc(sizeof(round_state_##SUF));                                    \
    if (!u || !v || !st) { free(u); free(v); free(st); return 2; }                                \
    T k[MAXN * MAXN][BLOCK];                                                                      \
    unsigned char live[MAXN * MAXN][BLOCK];                                                       \
    for (int64_t t0 = 0; t0 < N; t0 += BLOCK) {                                                   \
        int nb = N - t0 < BLOCK ? (int)(N - t0) : BLOCK;                                          \
        load_k_##SUF(z, (int64_t)n * n, n, t0, nb, range, k, live);                                            \
        rounds_##SUF(n, nb, iters, k, u, v);                                                      \
        for (int i = 0; i < n; i++)                                                               \
            for (int j = 0; j < n; j++)                                                           \
                for (int b = 0; b < nb; b++)                                                      \
                    k[i * n + j][b] *= u[iters - 1][i][b] * v[iters][j][b];                       \
        round_##SUF(n, nb, k, st, floor_);                                                        \
        for (int i = 0; i < n; i++)                                                               \
            for (int j = 0; j < n; j++)                                                           \
                for (int b = 0; b < nb; b++)                                                      \
                    out[(t0 + b) * n * n + i * n + j] = st->s[i * n + j][b]                       \
                        + st->def[i][b] * st->sp[j][b] / st->tot[b];                              \
    }                                                                                             \
    free(u); free(v); free(st);                                                                   \
    return 0;                                                                                     \
}                                                                                                 \
                                                                                                  \
/* g: dL/d(result), gz: dL/dz; both (N, n, n) like z */                                          \
int hb_sinkhorn_backward_##SUF(const T *z, const T *g, T *gz, int64_t N, int n, int iters,       \
                               T range, T floor_) {                                               \
    if (n < 1 || n > MAXN || iters < 1) return 1;                                                 \
    T (*u)[MAXN][BLOCK] = malloc(sizeof(T[MAXN][BLOCK]) * (size_t)iters);                         \
    T (*v)[MAXN][BLOCK] = malloc(sizeof(T[MAXN][BLOCK]) * (size_t)(iters + 1));                   \
    round_state_##SUF *st = malloc(sizeof(round_state_##SUF));                                    \
    if (!u || !v || !st) { free(u); free(v); free(st); return 2; }                                \
    T k[MAXN * MAXN][BLOCK], gk[MAXN * MAXN][BLOCK], p[MAXN * MAXN][BLOCK], gp[MAXN * MAXN][BLOCK]; \
    unsigned char live[MAXN * MAXN][BLOCK];                                                       \
    for (int64_t t0 = 0; t0 < N; t0 += BLOCK) {                                                   \
        int nb = N - t0 < BLOCK ? (int)(N - t0) : BLOCK;                                          \
        load_k_##SUF(z, (int64_t)n * n, n, t0, nb, range, k, live);                                            \
        rounds_##SUF(n, nb, iters, k, u, v);                                                      \
        T gu[MAXN][BLOCK] = {{0}}, gv[MAXN][BLOCK] = {{0}};                                       \
        T *uT = &u[iters - 1][0][0], *vT = &v[iters][0][0];                                       \
        for (int ij = 0; ij < n * n; ij++)                                                        \
            for (int b = 0; b < nb; b++)                                                          \
                p[ij][b] = k[ij][b] * (uT[(ij / n) * BLOCK + b] * vT[(ij % n) * BLOCK + b]);      \
        round_##SUF(n, nb, p, st, floor_);                                                        \
        round_backward_##SUF(n, nb, p, st, floor_, g, t0, gp);                                    \
        for (int i = 0; i < n; i++)                                                               \
            for (int j = 0; j < n; j++)                                                           \
                for (int b = 0; b < nb; b++) {                                                    \
                    T gij = gp[i * n + j][b];                                                     \
                    T gp = gij * k[i * n + j][b];                                                 \
                    gk[i * n + j][b] = gij * uT[i * BLOCK + b] * vT[j * BLOCK + b];               \
                    gu[i][b] += gp * vT[j * BLOCK + b];                                           \
                    gv[j][b] += gp * uT[i * BLOCK + b];                                           \
                }                                                                                 \
        for (int t = iters - 1; t >= 0; t--) {                                                    \
            /* v[t+1] = 1 / (K^T u[t]) */                                                         \
            T gc[MAXN][BLOCK];                                                                    \
            for (int j = 0; j < n; j++)                                                           \
                for (int b = 0; b < nb; b++) gc[j][b] = -gv[j][b] * v[t + 1][j][b] * v[t + 1][j][b]; \
            for (int i = 0; i < n; i++) {                                                         \
                T s[BLOCK] = {0};                                                                 \
                for (int j = 0; j < n; j++)                                                       \
                    for (int b = 0; b < nb; b++) {                                                \
                        gk[i * n + j][b] += u[t][i][b] * gc[j][b];                                \
                        s[b] += k[i * n + j][b] * gc[j][b];                                       \
                    }                                                                             \
                for (int b = 0; b < nb; b++) gu[i][b] += s[b];                                    \
            }                                                                                     \
            /* u[t] = 1 / (K v[t]) */                                                             \
            T gr[MAXN][BLOCK];                                                                    \
            for (int i = 0; i < n; i++)                                                           \
                for (int b = 0; b < nb; b++) gr[i][b] = -gu[i][b] * u[t][i][b] * u[t][i][b];      \
            for (int j = 0; j < n; j++) {                                                         \
                T s[BLOCK] = {0};                                                                 \
                for (int i = 0; i < n; i++)                                                       \
                    for (int b = 0; b < nb; b++) {                                                \
                        gk[i * n + j][b] += gr[i][b] * v[t][j][b];                                \
                        s[b] += k[i * n + j][b] * gr[i][b];                                       \
                    }                                                                             \
                for (int b = 0; b < nb; b++) gv[j][b] = s[b];                                     \
            }                                                                                     \
            for (int i = 0; i < n; i++)                                                           \
                for (int b = 0; b < nb; b++) gu[i][b] = 0;                                        \
        }                                                                                         \
        for (int ij = 0; ij < n * n; ij++)                                                        \
            for (int b = 0; b < nb; b++)                                                          \
                gz[(t0 + b) * n * n + ij] = live[ij][b] ? gk[ij][b] * k[ij][b] : 0;               \
    }                                                                                             \
    free(u); free(v); free(st);                                                                   \
    return 0;                                                                                     \
}

DEFINE_SINKHORN(float, f32, expf)
DEFINE_SINKHORN(double, f64, exp)

/* Hyper-connection width connection (pathways/_hc_fused.py), one token at a time, everything of
   a token in L1: H (n, d) per token; alpha (n, n+1) static or per token. Forward writes the
   branch input x = A_m^T H, RMS-normed when given the norm (hb_norm; the callers keep one-stream
   connections on PyTorch's norm, so a one-stream HC is Pre-Norm bit for bit), and the mixed
   streams A_r^T H; for DHC it first computes the token's dynamic weights (below) in the same
   pass. Backward takes dL/dx, or dL/d(normed x) and runs the norm's backward per token, and
   dL/d mixed, and writes dL/dH and dL/dalpha per token, and for DHC (r_i = rsqrt(mean(H_i^2) +
   eps), P = H Wt^T, t = tanh(P r), alpha = t s_a + static alpha, beta = t s_b + static beta) runs
   the chain back through the dynamic weights: dL/dH += dL/dP Wt - H r^3/d sum_k dL/dz_k P_k, and
   dL/dWt. Parallel over tokens (OpenMP: the runtime torch uses). */

#include <string.h>
#include <omp.h>

static inline float hb_bf16_to_f32(uint16_t v) {
    uint32_t b = (uint32_t)v << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline uint16_t hb_f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t b;
    memcpy(&b, &f, 4);
    if (f != f) return 0x7fc0;
    b += 0x7fff + ((b >> 16) & 1);
    return (uint16_t)(b >> 16);
}

/* The streams a backward kernel reads per token: h itself (T or bf16), or, when h is NULL, h
   rebuilt from what the nodes before keep: h_i = sum_j alpha[j][i + 1] prev_j + beta_i y (the
   mixing of hb_hc_forward, then hb_depth_forward: bit for bit the streams made from prev in T),
   rounded through bf16 when the streams were bf16. prev (N, n, d), y (N, d) in T or bf16; alpha
   (n, n+1) or (N, n, n+1); beta (n) or (N, n), in T. */
typedef struct {
    const void *h, *prev, *alpha, *beta, *y;
    int h_bf16, prev_bf16, alpha_per_token, beta_per_token, y_bf16, round_bf16;
} hb_streams;

/* The branch norm of a width connection, when the kernels apply it (n >= 2; see _hc_fused):
   forward, the branch input x (d) becomes x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps),
   rstd written per token; backward, dL/dx comes from dL/d(normed x) g_out and the saved rstd
   (x recomputed from the streams), and dL/dw is accumulated. Pointers in the kernel's T. */
typedef struct {
    const void *w, *g_out;
    void *rstd, *g_w;
    double eps;
} hb_norm;

/* tanh in float to about 1 ulp, branch-free so that a loop of them vectorises (glibc's tanhf is
   an out-of-line call, several times slower): an odd polynomial below |x| = 0.625 (tanh(x) / x - 1
   fitted in x^2), else 1 - 2 / (e^{2|x|} + 1), with e^y = 2^k e^f, |f| <= ln 2 / 2, by its Taylor
   series to f^7; |x| is capped at 9, where float rounds tanh to 1. NaN stays NaN. */
static inline float hb_tanhf(float x) {
    float a = fabsf(x), s = x * x;
    float q = 0.0023143845f;
    q = q * s - 0.0083661100f;
    q = q * s + 0.021777019f;
    q = q * s - 0.053960511f;
    q = q * s + 0.13333311f;
    q = q * s - 0.33333333f;
    float small = x + x * s * q;
    float y = 2 * (a > 9.0f ? 9.0f : a);                         /* NaN passes */
    int k = (int)(y * 1.44269504f + 0.5f);                        /* round(y / ln 2), y >= 0 */
    float f = (y - (float)k * 0.693145751953125f) - (float)k * 1.42860677e-06f;  /* y - k ln 2 */
    float e = 1.0f / 5040;
    e = e * f + 1.0f / 720;
    e = e * f + 1.0f / 120;
    e = e * f + 1.0f / 24;
    e = e * f + 1.0f / 6;
    e = e * f + 0.5f;
    e = e * f + 1.0f;
    e = e * f + 1.0f;
    uint32_t bits = (uint32_t)(k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    float big = copysignf(1.0f - 2.0f / (e * scale + 1.0f), x);
    return a < 0.625f ? small : big;
}

#define DEFINE_HC(T, SUF, SQRT, TANH)                                                             \
/* out row j (d) = sum_i a[i][j] h_i; j = 0: x, j >= 1: mixed stream j - 1 */                    \
static void hc_mix_row_##SUF(const T *ht, int n, int64_t d, const T *a, int j, T *out) {         \
    T a0 = a[j];                                                                                  \
    _Pragma("omp simd")                                                                           \
    for (int64_t c = 0; c < d; c++) out[c] = a0 * ht[c];                                          \
    for (int i = 1; i < n; i++) {                                                                 \
        T ai = a[i * (n + 1) + j];                                                                \
        const T *hi = ht + i * d;                                                                 \
        _Pragma("omp simd")                                                                       \
        for (int64_t c = 0; c < d; c++) out[c] += ai * hi[c];                                     \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
/* <a, b> over d elements, vectorised (the kernels' one dot product) */                          \
static inline T hc_dot_##SUF(const T *a, const T *b, int64_t d) {                                 \
    T acc = 0;                                                                                    \
    _Pragma("omp simd reduction(+:acc)")                                                          \
    for (int64_t c = 0; c < d; c++) acc += a[c] * b[c];                                           \
    return acc;                                                                                   \
}                                                                                                 \
                                                                                                  \
/* one token's branch norm, in place: x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) */         \
static void hc_norm_token_##SUF(T *x, int64_t d, const hb_norm *nm, int64_t tok) {                \
    const T *w = (const T *)nm->w;                                                                \
    T rs = 1 / SQRT(hc_dot_##SUF(x, x, d) / (T)d + (T)nm->eps);                                   \
    ((T *)nm->rstd)[tok] = rs;                                                                    \
    _Pragma("omp simd")                                                                           \
    for (int64_t c = 0; c < d; c++) x[c] = x[c] * rs * w[c];                                      \
}                                                                                                 \
                                                                                                  \
/* one token's mixing: x (d) = A_m^T H (normed if nm), mixed (n, d) = A_r^T H if mixed (else the \
   depth connection mixes, hb_hc_streams), and the bf16 copy of H if saved */                    \
static void hc_mix_token_##SUF(const T *ht, int n, int64_t d, const T *a, T *x, T *mixed,         \
                               uint16_t *saved, const hb_norm *nm, int64_t tok) {                 \
    hc_mix_row_##SUF(ht, n, d, a, 0, x);                                                          \
    if (nm) hc_norm_token_##SUF(x, d, nm, tok);                                                   \
    if (mixed)                                                                                    \
        for (int j = 1; j <= n; j++) hc_mix_row_##SUF(ht, n, d, a, j, mixed + (int64_t)(j - 1) * d); \
    if (saved)                                                                                    \
        for (int64_t c = 0; c < n * d; c++) saved[c] = hb_f32_to_bf16((float)ht[c]);             \
}                                                                                                 \
                                                                                                  \
/* h (N, n, d); alpha (n, n+1) or (N, n, n+1) (alpha_per_token); mixed, or NULL; saved: a bf16  \
   copy of h, or NULL; nm: the branch norm, or NULL. */                                          \
int hb_hc_forward_##SUF(const T *h, int64_t N, int n, int64_t d, const T *alpha,                \
                        int alpha_per_token, T *x, T *mixed, uint16_t *saved, const hb_norm *nm, \
                        int nthreads) {                                                           \
    if (n < 1 || n > 64) return 1;                                                                \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                            \
    for (int64_t tok = 0; tok < N; tok++)                                                         \
        hc_mix_token_##SUF(h + tok * n * d, n, d,                                                 \
                           alpha + (alpha_per_token ? tok * n * (n + 1) : 0), x + tok * d,       \
                           mixed ? mixed + tok * n * d : NULL, saved ? saved + tok * n * d : NULL, \
                           nm, tok);                                                              \
    return 0;                                                                                     \
}                                                                                                 \
                                                                                                  \
/* DHC's forward, the dynamic weights and the mixing in one pass over a token's streams (in L1):  \
   per stream i, r_i = 1 / sqrt(mean(H_i^2) + eps), p_ik = <H_i, wt_k> (k < n + 2),              \
   t = tanh(p r) (or p r), alpha_i = s_alpha t_i[:n+1] + static_alpha_i, beta_i =                \
   s_beta t_i[n+1] + static_beta_i; then the mixing with these alpha. Writes r (N, n), p and t    \
   (N, n, n+2), alpha (N, n, n+1), beta (N, n), and x, mixed, saved as hb_hc_forward. */          \
int hb_hc_forward_dynamic_##SUF(const T *h, int64_t N, int n, int64_t d, const T *static_alpha,  \
                                const T *static_beta, const T *wt, T s_alpha, T s_beta, T eps,   \
                                int use_tanh, T *r, T *p, T *t, T *alpha, T *beta, T *x,         \
                                T *mixed, uint16_t *saved, const hb_norm *nm, int nthreads) {    \
    if (n < 1 || n > 64) return 1;                                                                \
    int k2 = n + 2;                                                                               \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                            \
    for (int64_t tok = 0; tok < N; tok++) {                                                       \
        const T *ht = h + tok * n * d;                                                            \
        T *pt = p + tok * n * k2, *tt = t + tok * n * k2, *at = alpha + tok * n * (n + 1);        \
        for (int i = 0; i < n; i++) {                                                             \
            const T *hi = ht + i * d;                                                             \
            T ri = 1 / SQRT(hc_dot_##SUF(hi, hi, d) / (T)d + eps);                                \
            r[tok * n + i] = ri;                                                                  \
            for (int k = 0; k < k2; k++) {                                                        \
                T acc = hc_dot_##SUF(hi, wt + k * d, d);                                          \
                pt[i * k2 + k] = acc;                                                             \
                tt[i * k2 + k] = acc * ri;                                                        \
            }                                                                                     \
        }                                                                                         \
        if (use_tanh) {                                                                           \
            _Pragma("omp simd")                                                                   \
            for (int q = 0; q < n * k2; q++) tt[q] = TANH(tt[q]);                                 \
        }                                                                                         \
        for (int i = 0; i < n; i++) {                                                             \
            for (int j = 0; j <= n; j++)                                                          \
                at[i * (n + 1) + j] = tt[i * k2 + j] * s_alpha + static_alpha[i * (n + 1) + j];   \
            beta[tok * n + i] = tt[i * k2 + n + 1] * s_beta + static_beta[i];                     \
        }                                                                                         \
        hc_mix_token_##SUF(ht, n, d, at, x + tok * d, mixed ? mixed + tok * n * d : NULL,         \
                           saved ? saved + tok * n * d : NULL, nm, tok);                          \
    }                                                                                             \
    return 0;                                                                                     \
}                                                                                                 \
                                                                                                  \
/* count elements of a buffer from element start on, in T: in place when the buffer is T, else  \
   (bf16: a saved copy of H, or a branch output under autocast) widened into buf */               \
static inline const T *load_row_##SUF(const void *src, int bf16, int64_t start, int64_t count,    \
                                      T *buf) {                                                   \
    if (!bf16) return (const T *)src + start;                                                     \
    const uint16_t *sb = (const uint16_t *)src + start;                                           \
    for (int64_t c = 0; c < count; c++) buf[c] = (T)hb_bf16_to_f32(sb[c]);                        \
    return buf;                                                                                   \
}                                                                                                 \
                                                                                                  \
/* a token's streams (n, d) in T, read or rebuilt (hb_streams) into per-thread scratch: buf (n d), \
   pbuf (n d), ybuf (d) */                                                                        \
static const T *streams_row_##SUF(const hb_streams *s, int64_t tok, int n, int64_t d, T *buf,    \
                                  T *pbuf, T *ybuf) {                                             \
    if (s->h) return load_row_##SUF(s->h, s->h_bf16, tok * n * d, n * d, buf);                   \
    const T *pt = load_row_##SUF(s->prev, s->prev_bf16, tok * n * d, n * d, pbuf);                \
    const T *yt = load_row_##SUF(s->y, s->y_bf16, tok * d, d, ybuf);                              \
    const T *a = (const T *)s->alpha + (s->alpha_per_token ? tok * n * (n + 1) : 0);              \
    const T *bt = (const T *)s->beta + (s->beta_per_token ? tok * n : 0);                         \
    for (int i = 0; i < n; i++) {                                                                 \
        T *oi = buf + i * d, b = bt[i];                                                           \
        hc_mix_row_##SUF(pt, n, d, a, i + 1, oi);                                                 \
        _Pragma("omp simd")                                                                       \
        for (int64_t c = 0; c < d; c++) oi[c] = oi[c] + b * yt[c];                                \
        if (s->round_bf16)                                                                        \
            for (int64_t c = 0; c < d; c++) oi[c] = (T)hb_bf16_to_f32(hb_f32_to_bf16((float)oi[c])); \
    }                                                                                             \
    return buf;                                                                                   \
}                                                                                                 \
                                                                                                  \
/* per token of hb_streams: the streams written out (N, n, d) when out is given, the branch input \
   x = A_m^T H (N, d) when x is given (alpha (n, n+1) or per token), both in T */                  \
int hb_hc_streams_##SUF(const hb_streams *s, int64_t N, int n, int64_t d, const T *alpha,         \
                        int alpha_per_token, T *out, T *x, int nthreads) {                       \
    int bad = 0;                                                                                  \
    _Pragma("omp parallel num_threads(nthreads)")                                                 \
    {                                                                                             \
        T *buf = malloc(sizeof(T) * (2 * n * d + d));                                             \
        if (!buf) bad = 1;                                                                        \
        else {                                                                                    \
            _Pragma("omp for schedule(static)")                                                   \
            for (int64_t tok = 0; tok < N; tok++) {                                               \
                const T *ht = streams_row_##SUF(s, tok, n, d, buf, buf + n * d, buf + 2 * n * d); \
                if (out) memcpy(out + tok * n * d, ht, sizeof(T) * n * d);                        \
                if (x)                                                                            \
                    hc_mix_row_##SUF(ht, n, d, alpha + (alpha_per_token ? tok * n * (n + 1) : 0), \
                                     0, x + tok * d);                                             \
            }                                                                                     \
        }                                                                                         \
        free(buf);                                                                                \
    }                                                                                             \
    return bad ? 2 : 0;                                                                           \
}                                                                                                 \
                                                                                                  \
/* g_x (N, d): dL/dx after the norm; g_mixed (N, n, d) or NULL; dynamic (wt != NULL): g_beta      \
   (N, n) or NULL, t, r, p from the forward. Out: g_h (N, n, d), g_alpha (N, n, n+1) (dL/dalpha   \
   per token, before the dynamic chain), g_wt (n+2, d) when dynamic. */                          \
int hb_hc_backward_##SUF(const hb_streams *s, int64_t N, int n, int64_t d, const T *alpha,        \
                         int alpha_per_token, const T *g_x, const T *g_mixed, const T *g_beta,   \
                         const T *t, const T *r, const T *p, const T *wt, T s_alpha, T s_beta,   \
                         int use_tanh, T *g_h, T *g_alpha, T *g_wt, const hb_norm *nm,          \
                         int nthreads) {                                                          \
    int k2 = n + 2, bad = 0;                                                                      \
    int64_t wsize = wt ? (int64_t)k2 * d : 0;                                                     \
    T *g_w = nm ? (T *)nm->g_w : NULL;                                                            \
    /* the parameter gradients: one partial sum per thread, added in thread order afterwards, so \
       that a run is reproducible (a critical section would add them in arrival order) */         \
    int64_t part = wsize + (g_w ? d : 0);                                                         \
    T *parts = part ? calloc((size_t)(nthreads * part), sizeof(T)) : NULL;                        \
    if (part && !parts) return 2;                                                                 \
    _Pragma("omp parallel num_threads(nthreads)")                                                 \
    {                                                                                             \
        T *buf = malloc(sizeof(T) * (2 * n * d + 3 * d));                                         \
        T *gw = wt ? parts + omp_get_thread_num() * part : NULL;                                  \
        T *gnw = g_w ? parts + omp_get_thread_num() * part + wsize : NULL;                        \
        T gp[64 * 66], coef[64];                                                                  \
        if (!buf) bad = 1;                                                                        \
        else {                                                                                    \
            _Pragma("omp for schedule(static)")                                                   \
            for (int64_t tok = 0; tok < N; tok++) {                                               \
                const T *ht = streams_row_##SUF(s, tok, n, d, buf, buf + n * d, buf + 2 * n * d); \
                const T *a = alpha + (alpha_per_token ? tok * n * (n + 1) : 0);                   \
                const T *gx = nm ? buf + 2 * n * d + 2 * d : g_x + tok * d;                       \
                if (nm) { /* the branch norm's backward: x (recomputed) -> dL/dx */              \
                    T *xb = buf + 2 * n * d + d, *gxb = buf + 2 * n * d + 2 * d;                  \
                    const T *w = (const T *)nm->w, *go = (const T *)nm->g_out + tok * d;          \
                    T rs = ((const T *)nm->rstd)[tok], dot = 0;                                   \
                    hc_mix_row_##SUF(ht, n, d, a, 0, xb);                                         \
                    _Pragma("omp simd reduction(+:dot)")                                          \
                    for (int64_t c = 0; c < d; c++) {                                             \
                        T xh = xb[c] * rs;                                                        \
                        dot += go[c] * w[c] * xh;                                                 \
                    }                                                                             \
                    T m = dot / (T)d;                                                             \
                    _Pragma("omp simd")                                                           \
                    for (int64_t c = 0; c < d; c++) {                                             \
                        T xh = xb[c] * rs;                                                        \
                        gxb[c] = (go[c] * w[c] - xh * m) * rs;                                    \
                    }                                                                             \
                    if (gnw) {                                                                    \
                        _Pragma("omp simd")                                                       \
                        for (int64_t c = 0; c < d; c++) gnw[c] += go[c] * (xb[c] * rs);           \
                    }                                                                             \
                }                                                                                 \
                const T *gm = g_mixed ? g_mixed + tok * n * d : NULL;                             \
                T *ga = g_alpha + tok * n * (n + 1);                                              \
                for (int i = 0; i < n; i++) {                                                     \
                    const T *hi = ht + i * d;                                                     \
                    ga[i * (n + 1)] = hc_dot_##SUF(hi, gx, d);                                    \
                    for (int j = 0; j < n; j++)                                                   \
                        ga[i * (n + 1) + j + 1] = gm ? hc_dot_##SUF(hi, gm + j * d, d) : 0;       \
                }                                                                                 \
                if (wt) { /* z = t (pre-tanh: P r); dL/dz, then dL/dP = dL/dz r */               \
                    const T *tt = t + tok * n * k2, *pt = p + tok * n * k2, *rt = r + tok * n;    \
                    for (int i = 0; i < n; i++) {                                                 \
                        T cs = 0;                                                                 \
                        for (int k = 0; k < k2; k++) {                                            \
                            T gz = k <= n ? ga[i * (n + 1) + k] * s_alpha                         \
                                          : (g_beta ? g_beta[tok * n + i] * s_beta : 0);          \
                            if (use_tanh) gz *= 1 - tt[i * k2 + k] * tt[i * k2 + k];              \
                            gp[i * k2 + k] = gz * rt[i];                                          \
                            cs += gz * pt[i * k2 + k];                                            \
                        }                                                                         \
                        coef[i] = cs * rt[i] * rt[i] * rt[i] / (T)d;                              \
                    }                                                                             \
                }                                                                                 \
                for (int i = 0; i < n; i++) {                                                     \
                    T *gi = g_h + (tok * n + i) * d;                                              \
                    const T *hi = ht + i * d;                                                     \
                    T a0 = a[i * (n + 1)];                                                        \
                    _Pragma("omp simd")                                                           \
                    for (int64_t c = 0; c < d; c++) gi[c] = a0 * gx[c];                           \
                    if (gm)                                                                       \
                        for (int j = 0; j < n; j++) {                                             \
                            T aj = a[i * (n + 1) + j + 1];                                        \
                            const T *gj = gm + j * d;                                             \
                            _Pragma("omp simd")                                                   \
                            for (int64_t c = 0; c < d; c++) gi[c] += aj * gj[c];                  \
                        }                                                                         \
                    if (wt) {                                                                     \
                        for (int k = 0; k < k2; k++) {                                            \
                            T g = gp[i * k2 + k];                                                 \
                            const T *wk = wt + k * d;                                             \
                            T *gwk = gw + k * d;                                                  \
                            _Pragma("omp simd")                                                   \
                            for (int64_t c = 0; c < d; c++) {                                     \
                                gi[c] += g * wk[c];                                               \
                                gwk[c] += g * hi[c];                                              \
                            }                                                                     \
                        }                                                                         \
                        T cf = coef[i];                                                           \
                        _Pragma("omp simd")                                                       \
                        for (int64_t c = 0; c < d; c++) gi[c] -= cf * hi[c];                      \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        free(buf);                                                                                \
    }                                                                                             \
    if (wt) memset(g_wt, 0, sizeof(T) * wsize);                                                   \
    if (g_w) memset(g_w, 0, sizeof(T) * d);                                                       \
    for (int th = 0; th < nthreads; th++) {                                                       \
        for (int64_t c = 0; c < wsize; c++) g_wt[c] += parts[th * part + c];                      \
        if (g_w)                                                                                  \
            for (int64_t c = 0; c < d; c++) g_w[c] += parts[th * part + wsize + c];               \
    }                                                                                             \
    free(parts);                                                                                  \
    return bad ? 2 : 0;                                                                           \
}

DEFINE_HC(float, f32, sqrtf, hb_tanhf)
DEFINE_HC(double, f64, sqrt, tanh)

/* Depth connection (pathways/_depth_fused.py: DepthConnection): out_i = mixed_i + beta_i y per token,
   beta (n) static or (N, n) per token, y (N, d) in T or bf16 (a branch output under autocast).
   Backward: dL/dy = sum_i beta_i g_i and dL/dbeta_i = <g_i, y> per token, in one pass over g. */

#define DEFINE_DEPTH(T, SUF)                                                                      \
int hb_depth_forward_##SUF(const T *mixed, const T *beta, int beta_per_token, const void *y,     \
                           int y_bf16, int64_t N, int n, int64_t d, T *out, int nthreads) {      \
    int bad = 0;                                                                                  \
    _Pragma("omp parallel num_threads(nthreads)")                                                 \
    {                                                                                             \
        T *buf = y_bf16 ? malloc(sizeof(T) * d) : NULL;                                           \
        if (y_bf16 && !buf) bad = 1;                                                              \
        else {                                                                                    \
            _Pragma("omp for schedule(static)")                                                   \
            for (int64_t tok = 0; tok < N; tok++) {                                               \
                const T *yt = load_row_##SUF(y, y_bf16, tok * d, d, buf);                         \
                const T *bt = beta + (beta_per_token ? tok * n : 0);                              \
                for (int i = 0; i < n; i++) {                                                     \
                    const T *mi = mixed + (tok * n + i) * d;                                      \
                    T *oi = out + (tok * n + i) * d, b = bt[i];                                   \
                    _Pragma("omp simd")                                                           \
                    for (int64_t c = 0; c < d; c++) oi[c] = mi[c] + b * yt[c];                    \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        free(buf);                                                                                \
    }                                                                                             \
    return bad ? 2 : 0;                                                                           \
}                                                                                                 \
                                                                                                  \
/* g (N, n, d); g_y (N, d) or NULL; g_beta (N, n) per token or NULL */                           \
int hb_depth_backward_##SUF(const T *g, const T *beta, int beta_per_token, const void *y,        \
                            int y_bf16, int64_t N, int n, int64_t d, T *g_y, T *g_beta,          \
                            int nthreads) {                                                       \
    int bad = 0;                                                                                  \
    _Pragma("omp parallel num_threads(nthreads)")                                                 \
    {                                                                                             \
        T *buf = y_bf16 && g_beta ? malloc(sizeof(T) * d) : NULL;                                 \
        if (y_bf16 && g_beta && !buf) bad = 1;                                                    \
        else {                                                                                    \
            _Pragma("omp for schedule(static)")                                                   \
            for (int64_t tok = 0; tok < N; tok++) {                                               \
                const T *gt = g + tok * n * d, *bt = beta + (beta_per_token ? tok * n : 0);       \
                if (g_y) {                                                                        \
                    T *gy = g_y + tok * d, b0 = bt[0];                                            \
                    _Pragma("omp simd")                                                           \
                    for (int64_t c = 0; c < d; c++) gy[c] = b0 * gt[c];                           \
                    for (int i = 1; i < n; i++) {                                                 \
                        const T *gi = gt + i * d;                                                 \
                        T b = bt[i];                                                              \
                        _Pragma("omp simd")                                                       \
                        for (int64_t c = 0; c < d; c++) gy[c] += b * gi[c];                       \
                    }                                                                             \
                }                                                                                 \
                if (g_beta) {                                                                     \
                    const T *yt = load_row_##SUF(y, y_bf16, tok * d, d, buf);                     \
                    for (int i = 0; i < n; i++)                                                   \
                        g_beta[tok * n + i] = hc_dot_##SUF(gt + i * d, yt, d);                    \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        free(buf);                                                                                \
    }                                                                                             \
    return bad ? 2 : 0;                                                                           \
}

DEFINE_DEPTH(float, f32)
DEFINE_DEPTH(double, f64)
