/* hyperbit's CPU kernels, built on first use by hyperbit/nn/native.py (plain C, no torch headers).

   Every kernel has a PyTorch reference in the package; the tests compare the two, forward and
   backward. Tensors are passed as contiguous buffers; "tokens last" layouts let the compiler
   vectorise across tokens (one SIMD lane per token), with every iteration of a token's small
   problem kept in registers or L1 instead of a round trip through memory per tensor op. Every
   kernel runs in parallel over tokens on OpenMP (the runtime torch uses), and every token's
   result is computed by one thread alone, so the results do not depend on the thread count.

   Sinkhorn (pathways/sinkhorn.py: _scale, then round_doubly_stochastic), logits z (N, n, n).
   K = exp(max(z - max_j z, -range)); per round u = 1 / (K v), v = 1 / (K^T u), v_0 = 1;
   P = diag(u) K diag(v), then the rounding step onto the doubly stochastic matrices. Tokens are
   processed in blocks of SK_BLOCK, transposed to tokens last on the way in and back on the way
   out; the last block is padded with zero logits (computed, never written), so every loop runs
   over whole blocks. The backward recomputes the rounds and runs the reverse of both steps. */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#define SK_BLOCK 16  /* tokens per block (vector lanes) */
#define SK_MAXN 8    /* largest n handled here (n x n stays in registers / L1) */

#define HB_INLINE static inline __attribute__((always_inline))

/* CALL with nn a compile-time constant for the usual expansion rates, else nn = n (the fp64
   kernels, there for the tests, take the general path only) */
#define HB_BY_N_f32(n, ...)                                                                       \
    switch (n) {                                                                                  \
    case 2: { enum { nn = 2 }; __VA_ARGS__; } break;                                              \
    case 4: { enum { nn = 4 }; __VA_ARGS__; } break;                                              \
    default: { const int nn = (n); __VA_ARGS__; }                                                 \
    }
#define HB_BY_N_f64(n, ...) { const int nn = (n); __VA_ARGS__; }

#define DEFINE_SINKHORN(T, SUF, EXP)                                                              \
typedef T sk_mat_##SUF[SK_MAXN * SK_MAXN][SK_BLOCK];  /* an n x n matrix per token, tokens last */ \
typedef T sk_vec_##SUF[SK_MAXN][SK_BLOCK];                                                        \
                                                                                                  \
/* tokens t0 .. t0 + nb of a (N, n, n) buffer -> tokens last, zeros past nb */                    \
HB_INLINE void sk_gather_##SUF(const T *x, int n, int64_t t0, int nb, sk_mat_##SUF out) {         \
    const int nn2 = n * n;                                                                        \
    for (int b = 0; b < SK_BLOCK; b++)                                                            \
        for (int ij = 0; ij < nn2; ij++) out[ij][b] = b < nb ? x[(t0 + b) * nn2 + ij] : 0;        \
}                                                                                                 \
                                                                                                  \
HB_INLINE void sk_scatter_##SUF(sk_mat_##SUF in, int n, int64_t t0, int nb, T *x) {               \
    const int nn2 = n * n;                                                                        \
    for (int b = 0; b < nb; b++)                                                                  \
        for (int ij = 0; ij < nn2; ij++) x[(t0 + b) * nn2 + ij] = in[ij][b];                      \
}                                                                                                 \
                                                                                                  \
/* K from the logits zt (tokens last); live: the entries above the floor (they get a gradient) */ \
HB_INLINE void sk_load_k_##SUF(sk_mat_##SUF zt, int n, T range, sk_mat_##SUF k,                   \
                               unsigned char live[SK_MAXN * SK_MAXN][SK_BLOCK]) {                 \
    for (int i = 0; i < n; i++) {                                                                 \
        T m[SK_BLOCK];                                                                            \
        for (int b = 0; b < SK_BLOCK; b++) m[b] = zt[i * n][b];                                   \
        for (int j = 1; j < n; j++)                                                               \
            for (int b = 0; b < SK_BLOCK; b++) m[b] = zt[i * n + j][b] > m[b] ? zt[i * n + j][b] : m[b]; \
        for (int j = 0; j < n; j++)                                                               \
            for (int b = 0; b < SK_BLOCK; b++) {                                                  \
                T s = zt[i * n + j][b] - m[b];                                                    \
                live[i * n + j][b] = s >= -range;                                                 \
                k[i * n + j][b] = EXP(s >= -range ? s : -range);                                  \
            }                                                                                     \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
/* the rounds: u[t], v[t + 1] for t < iters (v[0] = 1) */                                         \
HB_INLINE void sk_rounds_##SUF(int n, int iters, sk_mat_##SUF k, sk_vec_##SUF *u, sk_vec_##SUF *v) { \
    for (int j = 0; j < n; j++)                                                                   \
        for (int b = 0; b < SK_BLOCK; b++) v[0][j][b] = 1;                                        \
    for (int t = 0; t < iters; t++) {                                                             \
        for (int i = 0; i < n; i++) {                                                             \
            T s[SK_BLOCK] = {0};                                                                  \
            for (int j = 0; j < n; j++)                                                           \
                for (int b = 0; b < SK_BLOCK; b++) s[b] += k[i * n + j][b] * v[t][j][b];          \
            for (int b = 0; b < SK_BLOCK; b++) u[t][i][b] = 1 / s[b];                             \
        }                                                                                         \
        for (int j = 0; j < n; j++) {                                                             \
            T s[SK_BLOCK] = {0};                                                                  \
            for (int i = 0; i < n; i++)                                                           \
                for (int b = 0; b < SK_BLOCK; b++) s[b] += k[i * n + j][b] * u[t][i][b];          \
            for (int b = 0; b < SK_BLOCK; b++) v[t + 1][j][b] = 1 / s[b];                         \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
/* the rounding step (round_doubly_stochastic) on a block: m (columns sum to 1) -> s + def sp^T / \
   tot; keeps what its reverse needs: R (row sums of m), def (deficits), sp (column spares), tot */ \
typedef struct { sk_vec_##SUF R, def, sp; T tot[SK_BLOCK]; sk_mat_##SUF s; } sk_state_##SUF;      \
HB_INLINE void sk_round_##SUF(int n, sk_mat_##SUF m, sk_state_##SUF *st, T floor_) {              \
    for (int b = 0; b < SK_BLOCK; b++) st->tot[b] = 0;                                            \
    for (int i = 0; i < n; i++) {                                                                 \
        T R[SK_BLOCK] = {0}, Rs[SK_BLOCK] = {0};                                                  \
        for (int j = 0; j < n; j++)                                                               \
            for (int b = 0; b < SK_BLOCK; b++) R[b] += m[i * n + j][b];                           \
        for (int j = 0; j < n; j++)                                                               \
            for (int b = 0; b < SK_BLOCK; b++) {                                                  \
                st->s[i * n + j][b] = m[i * n + j][b] / (R[b] > 1 ? R[b] : 1);                    \
                Rs[b] += st->s[i * n + j][b];                                                     \
            }                                                                                     \
        for (int b = 0; b < SK_BLOCK; b++) {                                                      \
            st->R[i][b] = R[b];                                                                   \
            st->def[i][b] = 1 - Rs[b] > 0 ? 1 - Rs[b] : 0;                                        \
            st->tot[b] += st->def[i][b];                                                          \
        }                                                                                         \
    }                                                                                             \
    for (int j = 0; j < n; j++) {                                                                 \
        T C[SK_BLOCK] = {0};                                                                      \
        for (int i = 0; i < n; i++)                                                               \
            for (int b = 0; b < SK_BLOCK; b++) C[b] += st->s[i * n + j][b];                       \
        for (int b = 0; b < SK_BLOCK; b++) st->sp[j][b] = 1 - C[b] > 0 ? 1 - C[b] : 0;            \
    }                                                                                             \
    for (int b = 0; b < SK_BLOCK; b++) st->tot[b] = st->tot[b] > floor_ ? st->tot[b] : floor_;    \
}                                                                                                 \
                                                                                                  \
/* the reverse of sk_round_: g = dL/d(its result) -> gm = dL/dm; st from sk_round_(m) */          \
HB_INLINE void sk_round_backward_##SUF(int n, sk_mat_##SUF m, sk_state_##SUF *st, T floor_,       \
                                       sk_mat_##SUF g, sk_mat_##SUF gm) {                         \
    T gdef[SK_MAXN][SK_BLOCK] = {{0}}, gsp[SK_MAXN][SK_BLOCK] = {{0}}, gtot[SK_BLOCK] = {0};      \
    for (int i = 0; i < n; i++)                                                                   \
        for (int j = 0; j < n; j++)                                                               \
            for (int b = 0; b < SK_BLOCK; b++) {                                                  \
                T go = g[i * n + j][b];                                                           \
                gm[i * n + j][b] = go; /* dL/ds, for now */                                       \
                gdef[i][b] += go * st->sp[j][b] / st->tot[b];                                     \
                gsp[j][b] += go * st->def[i][b] / st->tot[b];                                     \
                gtot[b] -= go * st->def[i][b] * st->sp[j][b] / (st->tot[b] * st->tot[b]);         \
            }                                                                                     \
    for (int b = 0; b < SK_BLOCK; b++) {                                                          \
        T t = 0;                                                                                  \
        for (int i = 0; i < n; i++) t += st->def[i][b];                                           \
        if (!(t >= floor_)) gtot[b] = 0; /* clamp_min passes the gradient where x >= floor */     \
    }                                                                                             \
    /* def_i = max(1 - rowsum(s)_i, 0); sp_j = max(1 - colsum(s)_j, 0); where 1 - sum >= 0 */     \
    for (int i = 0; i < n; i++)                                                                   \
        for (int b = 0; b < SK_BLOCK; b++) {                                                      \
            T Rs = 0;                                                                             \
            for (int j = 0; j < n; j++) Rs += st->s[i * n + j][b];                                \
            T gd = gdef[i][b] + gtot[b];                                                          \
            gdef[i][b] = 1 - Rs >= 0 ? -gd : 0; /* now dL/d rowsum(s)_i */                        \
        }                                                                                         \
    for (int j = 0; j < n; j++)                                                                   \
        for (int b = 0; b < SK_BLOCK; b++) {                                                      \
            T C = 0;                                                                              \
            for (int i = 0; i < n; i++) C += st->s[i * n + j][b];                                 \
            gsp[j][b] = 1 - C >= 0 ? -gsp[j][b] : 0; /* now dL/d colsum(s)_j */                   \
        }                                                                                         \
    /* s_ij = m_ij / max(R_i, 1) */                                                               \
    for (int i = 0; i < n; i++) {                                                                 \
        T gR[SK_BLOCK] = {0};                                                                     \
        for (int j = 0; j < n; j++)                                                               \
            for (int b = 0; b < SK_BLOCK; b++) {                                                  \
                T d = st->R[i][b] > 1 ? st->R[i][b] : 1;                                          \
                T gs = gm[i * n + j][b] + gdef[i][b] + gsp[j][b];                                 \
                gm[i * n + j][b] = gs / d;                                                        \
                gR[b] -= gs * m[i * n + j][b] / (d * d);                                          \
            }                                                                                     \
        for (int j = 0; j < n; j++)                                                               \
            for (int b = 0; b < SK_BLOCK; b++)                                                    \
                gm[i * n + j][b] += st->R[i][b] >= 1 ? gR[b] : 0;                                 \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
/* one block forward: zt (logits, tokens last) -> out (the result, tokens last) */                \
HB_INLINE void sk_forward_block_##SUF(int n, int iters, T range, T floor_, sk_mat_##SUF zt,       \
                                      sk_vec_##SUF *u, sk_vec_##SUF *v, sk_state_##SUF *st,       \
                                      sk_mat_##SUF out) {                                         \
    T k[SK_MAXN * SK_MAXN][SK_BLOCK];                                                             \
    unsigned char live[SK_MAXN * SK_MAXN][SK_BLOCK];                                              \
    sk_load_k_##SUF(zt, n, range, k, live);                                                       \
    sk_rounds_##SUF(n, iters, k, u, v);                                                           \
    for (int i = 0; i < n; i++)                                                                   \
        for (int j = 0; j < n; j++)                                                               \
            for (int b = 0; b < SK_BLOCK; b++) k[i * n + j][b] *= u[iters - 1][i][b] * v[iters][j][b]; \
    sk_round_##SUF(n, k, st, floor_);                                                             \
    for (int i = 0; i < n; i++)                                                                   \
        for (int j = 0; j < n; j++)                                                               \
            for (int b = 0; b < SK_BLOCK; b++)                                                    \
                out[i * n + j][b] = st->s[i * n + j][b] + st->def[i][b] * st->sp[j][b] / st->tot[b]; \
}                                                                                                 \
                                                                                                  \
/* one block backward: zt (logits), g = dL/d(result) -> gz = dL/dz, all tokens last */            \
HB_INLINE void sk_backward_block_##SUF(int n, int iters, T range, T floor_, sk_mat_##SUF zt,      \
                                       sk_mat_##SUF g, sk_vec_##SUF *u, sk_vec_##SUF *v,          \
                                       sk_state_##SUF *st, sk_mat_##SUF gz) {                     \
    T k[SK_MAXN * SK_MAXN][SK_BLOCK], p[SK_MAXN * SK_MAXN][SK_BLOCK], gp[SK_MAXN * SK_MAXN][SK_BLOCK]; \
    unsigned char live[SK_MAXN * SK_MAXN][SK_BLOCK];                                              \
    T gu[SK_MAXN][SK_BLOCK] = {{0}}, gv[SK_MAXN][SK_BLOCK] = {{0}};                               \
    sk_load_k_##SUF(zt, n, range, k, live);                                                       \
    sk_rounds_##SUF(n, iters, k, u, v);                                                           \
    T (*uT)[SK_BLOCK] = u[iters - 1], (*vT)[SK_BLOCK] = v[iters];                                 \
    for (int i = 0; i < n; i++)                                                                   \
        for (int j = 0; j < n; j++)                                                               \
            for (int b = 0; b < SK_BLOCK; b++) p[i * n + j][b] = k[i * n + j][b] * (uT[i][b] * vT[j][b]); \
    sk_round_##SUF(n, p, st, floor_);                                                             \
    sk_round_backward_##SUF(n, p, st, floor_, g, gp);                                             \
    /* p = diag(uT) K diag(vT); gz holds dL/dK until the end */                                   \
    for (int i = 0; i < n; i++)                                                                   \
        for (int j = 0; j < n; j++)                                                               \
            for (int b = 0; b < SK_BLOCK; b++) {                                                  \
                T gij = gp[i * n + j][b], gk = gij * k[i * n + j][b];                             \
                gz[i * n + j][b] = gij * uT[i][b] * vT[j][b];                                     \
                gu[i][b] += gk * vT[j][b];                                                        \
                gv[j][b] += gk * uT[i][b];                                                        \
            }                                                                                     \
    for (int t = iters - 1; t >= 0; t--) {                                                        \
        /* v[t+1] = 1 / (K^T u[t]) */                                                             \
        T gc[SK_MAXN][SK_BLOCK];                                                                  \
        for (int j = 0; j < n; j++)                                                               \
            for (int b = 0; b < SK_BLOCK; b++) gc[j][b] = -gv[j][b] * v[t + 1][j][b] * v[t + 1][j][b]; \
        for (int i = 0; i < n; i++) {                                                             \
            T s[SK_BLOCK] = {0};                                                                  \
            for (int j = 0; j < n; j++)                                                           \
                for (int b = 0; b < SK_BLOCK; b++) {                                              \
                    gz[i * n + j][b] += u[t][i][b] * gc[j][b];                                    \
                    s[b] += k[i * n + j][b] * gc[j][b];                                           \
                }                                                                                 \
            for (int b = 0; b < SK_BLOCK; b++) gu[i][b] += s[b];                                  \
        }                                                                                         \
        /* u[t] = 1 / (K v[t]) */                                                                 \
        T gr[SK_MAXN][SK_BLOCK];                                                                  \
        for (int i = 0; i < n; i++)                                                               \
            for (int b = 0; b < SK_BLOCK; b++) gr[i][b] = -gu[i][b] * u[t][i][b] * u[t][i][b];    \
        for (int j = 0; j < n; j++) {                                                             \
            T s[SK_BLOCK] = {0};                                                                  \
            for (int i = 0; i < n; i++)                                                           \
                for (int b = 0; b < SK_BLOCK; b++) {                                              \
                    gz[i * n + j][b] += gr[i][b] * v[t][j][b];                                    \
                    s[b] += k[i * n + j][b] * gr[i][b];                                           \
                }                                                                                 \
            for (int b = 0; b < SK_BLOCK; b++) gv[j][b] = s[b];                                   \
        }                                                                                         \
        for (int i = 0; i < n; i++)                                                               \
            for (int b = 0; b < SK_BLOCK; b++) gu[i][b] = 0;                                      \
    }                                                                                             \
    for (int ij = 0; ij < n * n; ij++)                                                            \
        for (int b = 0; b < SK_BLOCK; b++) gz[ij][b] = live[ij][b] ? gz[ij][b] * k[ij][b] : 0;    \
}                                                                                                 \
                                                                                                  \
/* Forward (g NULL): out = the result; backward: out = dL/dz given g = dL/d(the result); z, g,    \
   out (N, n, n). Blocks in parallel; each thread keeps its own rounds (u, v) and rounding state.  \
   Returns 1 for a bad n or iters, 2 when memory runs out. */                                     \
static int sk_run_##SUF(const T *z, const T *g, T *out, int64_t N, int n, int iters, T range,     \
                        T floor_, int nthreads) {                                                 \
    if (n < 1 || n > SK_MAXN || iters < 1 || nthreads < 1) return 1;                              \
    if (N <= 0) return 0;                                                                         \
    const int64_t blocks = (N + SK_BLOCK - 1) / SK_BLOCK;                                         \
    int failed = 0;                                                                               \
    _Pragma("omp parallel num_threads(blocks < nthreads ? (int)blocks : nthreads)")               \
    {                                                                                             \
        sk_vec_##SUF *u = malloc(sizeof(sk_vec_##SUF) * (size_t)iters);                           \
        sk_vec_##SUF *v = malloc(sizeof(sk_vec_##SUF) * (size_t)(iters + 1));                     \
        sk_state_##SUF *st = malloc(sizeof(sk_state_##SUF));                                      \
        if (!u || !v || !st) { _Pragma("omp atomic write") failed = 2; }                          \
        _Pragma("omp for schedule(static)")                                                       \
        for (int64_t blk = 0; blk < blocks; blk++) {                                              \
            if (!u || !v || !st) continue;                                                        \
            const int64_t t0 = blk * SK_BLOCK;                                                    \
            const int nb = N - t0 < SK_BLOCK ? (int)(N - t0) : SK_BLOCK;                          \
            sk_mat_##SUF zt, gt, res;                                                             \
            sk_gather_##SUF(z, n, t0, nb, zt);                                                    \
            if (g) {                                                                              \
                sk_gather_##SUF(g, n, t0, nb, gt);                                                \
                sk_backward_block_##SUF(n, iters, range, floor_, zt, gt, u, v, st, res);          \
            } else {                                                                              \
                sk_forward_block_##SUF(n, iters, range, floor_, zt, u, v, st, res);               \
            }                                                                                     \
            sk_scatter_##SUF(res, n, t0, nb, out);                                                \
        }                                                                                         \
        free(u); free(v); free(st);                                                               \
    }                                                                                             \
    return failed;                                                                                \
}                                                                                                 \
                                                                                                  \
int hb_sinkhorn_##SUF(const T *z, T *out, int64_t N, int n, int iters, T range, T floor_,         \
                      int nthreads) {                                                             \
    return sk_run_##SUF(z, NULL, out, N, n, iters, range, floor_, nthreads);                      \
}                                                                                                 \
                                                                                                  \
int hb_sinkhorn_backward_##SUF(const T *z, const T *g, T *gz, int64_t N, int n, int iters,        \
                               T range, T floor_, int nthreads) {                                 \
    return sk_run_##SUF(z, g, gz, N, n, iters, range, floor_, nthreads);                          \
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
   dL/dWt. Parallel over tokens (OpenMP: the runtime torch uses).

   A token's rows are walked one column block at a time (HB_COLUMNS: a vector of W elements, GCC
   vector extensions), every row of the block in registers: each output element is stored once,
   after all its terms, and each dot product keeps one accumulator per pair of rows, so no loop
   waits on its own previous add. For the usual expansion rates n is a compile-time constant
   (HB_BY_N), which is what lets the compiler keep those rows in registers. */


/* The streams a backward kernel reads per token: h itself (T or bf16), or, when h is NULL, h
   rebuilt from what the nodes before keep: h_i = sum_j alpha[j][i + 1] prev_j + beta_i y (the
   mixing of hb_hc_forward, then the depth connection: bit for bit the streams made from prev in
   T), rounded through bf16 when the streams were bf16. prev (N, n, d), y (N, d) in T or bf16;
   alpha (n, n+1) or (N, n, n+1); beta (n) or (N, n), in T. */
typedef struct {
    const void *h, *prev, *alpha, *beta, *y;
    int h_bf16, prev_bf16, alpha_per_token, beta_per_token, y_bf16, round_bf16;
} hb_streams;

/* The depth connection before, whose output H these streams are (pathways/_depth_fused.py: the
   depth node's offer): its backward, dL/dy = sum_i beta_i g_i and dL/dbeta_i = <g_i, y> with
   g = dL/dH, runs inside the width backward while dL/dH is in registers (one read of the n d
   gradient less per branch). beta (n) or (N, n) and the outputs g_y (N, d), g_beta (N, n) in
   the kernel's T; y (N, d) in T or bf16. */
typedef struct {
    const void *beta, *y;
    void *g_y, *g_beta;
    int beta_per_token, y_bf16;
} hb_depth;

/* The branch norm of a width connection, when the kernels apply it (n >= 2; see _hc_fused):
   forward, the branch input x (d) becomes x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps),
   rstd written per token; backward, dL/dx comes from dL/d(normed x) g_out and the saved rstd
   (x recomputed from the streams), and dL/dw is accumulated; dL/dx also written out per token
   (N, d) when g_x is given. Pointers in the kernel's T. */
typedef struct {
    const void *w, *g_out;
    void *rstd, *g_w, *g_x;
    double eps;
} hb_norm;

/* Vectors: HB_VB bytes, one AVX-512 register (two AVX2 or four SSE/NEON registers elsewhere) */
#if defined(__AVX512F__)
#define HB_VB 64
#else
#define HB_VB 32
#endif
typedef float hb_vf32 __attribute__((vector_size(HB_VB), aligned(4)));
typedef double hb_vf64 __attribute__((vector_size(HB_VB), aligned(8)));
typedef uint32_t hb_vu32 __attribute__((vector_size(HB_VB), aligned(4)));
typedef uint16_t hb_vh32 __attribute__((vector_size(HB_VB / 2), aligned(2)));  /* bf16 of hb_vf32 */
typedef float hb_vf32h __attribute__((vector_size(HB_VB / 2), aligned(4)));
typedef uint32_t hb_vu32h __attribute__((vector_size(HB_VB / 2), aligned(4)));
typedef uint16_t hb_vh64 __attribute__((vector_size(HB_VB / 4), aligned(2)));  /* bf16 of hb_vf64 */

/* bf16 <-> float lane by lane; the rounding is torch's: to nearest even, NaN to 0x7fc0 */
static inline hb_vf32 hb_widen_f32(hb_vh32 h) {
    return (hb_vf32)(__builtin_convertvector(h, hb_vu32) << 16);
}
static inline hb_vh32 hb_narrow_f32(hb_vf32 f) {
    hb_vu32 b = (hb_vu32)f, nan = (hb_vu32)(f != f);
    b = (b + 0x7fff + ((b >> 16) & 1)) >> 16;
    return __builtin_convertvector((b & ~nan) | (0x7fc0 & nan), hb_vh32);
}
static inline hb_vf64 hb_widen_f64(hb_vh64 h) {
    return __builtin_convertvector((hb_vf32h)(__builtin_convertvector(h, hb_vu32h) << 16), hb_vf64);
}
static inline hb_vh64 hb_narrow_f64(hb_vf64 v) {
    hb_vf32h f = __builtin_convertvector(v, hb_vf32h);
    hb_vu32h b = (hb_vu32h)f, nan = (hb_vu32h)(f != f);
    b = (b + 0x7fff + ((b >> 16) & 1)) >> 16;
    return __builtin_convertvector((b & ~nan) | (0x7fc0 & nan), hb_vh64);
}

/* Stores that bypass the caches (no read for ownership of the lines written) for outputs that no
   kernel reads soon: dL/dH of HC's width backward (read after the previous branch's backward; the
   fused depth backward takes it from registers) and the bf16 copy of the streams (read in
   backward). mHC's backward stores dL/dH plainly: its fused depth backward reads it back. A whole
   vector at an aligned address; else a plain store. A kernel that streams ends each thread's part
   with hb_fence. Measured: HC's kernels 19% less time per training step (docs/benchmarks.md). */
static inline int hb_aligned(const void *p, uintptr_t bytes) { return ((uintptr_t)p & (bytes - 1)) == 0; }
static inline void hb_stream_f32(float *p, hb_vf32 v) {
#if HB_VB == 64
    _mm512_stream_ps(p, (__m512)v);
#elif defined(__AVX__)
    _mm256_stream_ps(p, (__m256)v);
#else
    *(hb_vf32 *)p = v;
#endif
}
static inline void hb_stream_h_f32(uint16_t *p, hb_vh32 h) {
#if HB_VB == 64
    _mm256_stream_si256((__m256i *)p, (__m256i)h);
#elif defined(__AVX__)
    _mm_stream_si128((__m128i *)p, (__m128i)h);
#else
    *(hb_vh32 *)p = h;
#endif
}
/* (the fp64 kernels are references: plain stores) */
static inline void hb_stream_f64(double *p, hb_vf64 v) { *(hb_vf64 *)p = v; }
static inline void hb_stream_h_f64(uint16_t *p, hb_vh64 h) { *(hb_vh64 *)p = h; }
static inline void hb_fence(void) {
#if defined(__AVX__)
    _mm_sfence();
#endif
}

/* tanh in float to about 1 ulp, lane by lane and branch-free (glibc's tanhf is an out-of-line
   call, several times slower): an odd polynomial below |x| = 0.625 (tanh(x) / x - 1
   fitted in x^2), else 1 - 2 / (e^{2|x|} + 1), with e^y = 2^k e^f, |f| <= ln 2 / 2, by its Taylor
   series to f^7; |x| is capped at 9, where float rounds tanh to 1. NaN stays NaN. */
static inline hb_vf32 hb_tanh_vf32(hb_vf32 x) {
    typedef int32_t vi __attribute__((vector_size(HB_VB)));
    vi sign = (vi)x & (int32_t)0x80000000;
    hb_vf32 a = (hb_vf32)((vi)x & 0x7fffffff), s = x * x;
    hb_vf32 q = 0.0023143845f + (hb_vf32){0};
    q = q * s - 0.0083661100f;
    q = q * s + 0.021777019f;
    q = q * s - 0.053960511f;
    q = q * s + 0.13333311f;
    q = q * s - 0.33333333f;
    hb_vf32 small = x + x * s * q;
    vi capped = a > 9.0f;
    hb_vf32 y = 2 * (hb_vf32)(((vi)a & ~capped) | ((vi)(9.0f + (hb_vf32){0}) & capped));
    vi k = __builtin_convertvector(y * 1.44269504f + 0.5f, vi);
    hb_vf32 kf = __builtin_convertvector(k, hb_vf32);
    hb_vf32 f = (y - kf * 0.693145751953125f) - kf * 1.42860677e-06f;
    hb_vf32 e = 1.0f / 5040 + (hb_vf32){0};
    e = e * f + 1.0f / 720;
    e = e * f + 1.0f / 120;
    e = e * f + 1.0f / 24;
    e = e * f + 1.0f / 6;
    e = e * f + 0.5f;
    e = e * f + 1.0f;
    e = e * f + 1.0f;
    hb_vf32 scale = (hb_vf32)((k + 127) << 23);
    vi big = ((vi)(1.0f - 2.0f / (e * scale + 1.0f)) & 0x7fffffff) | sign;
    vi is_small = a < 0.625f;
    return (hb_vf32)(((vi)small & is_small) | (big & ~is_small));
}

static inline hb_vf64 hb_tanh_vf64(hb_vf64 x) {  /* libm's, lane by lane (the fp64 kernels are references) */
    for (int l = 0; l < HB_VB / 8; l++) x[l] = tanh(x[l]);
    return x;
}

/* BODY once per column block of a d-long row: c its first element, m its width (W, then the
   tail, m < W, where the loads fill the missing lanes with zeros and the stores skip them) */
#define HB_COLUMNS(W, d, ...)                                                                     \
    do {                                                                                          \
        int64_t c_ = 0;                                                                           \
        for (; c_ + (W) <= (d); c_ += (W)) { const int64_t c = c_; const int m = (W); __VA_ARGS__ } \
        if (c_ < (d)) { const int64_t c = c_; const int m = (int)((d) - c_); __VA_ARGS__ }        \
    } while (0)

/* the largest n of the vectorised kernels (HC_MAX_N in native.py): a token's rows as vectors */
#define HB_MAXN 16
/* tokens per partial sum of a backward kernel's parameter gradients */
#define HB_TOKBLK 64


#define DEFINE_HC(T, SUF, VT, HV, W, SQRT, TANH)                                                  \
HB_INLINE VT hb_ld_##SUF(const T *p, int m) {                                                     \
    if (m == W) return *(const VT *)p;                                                            \
    VT v = {0};                                                                                   \
    memcpy(&v, p, sizeof(T) * m);                                                                 \
    return v;                                                                                     \
}                                                                                                 \
                                                                                                  \
HB_INLINE void hb_st_##SUF(T *p, VT v, int m) {                                                   \
    if (m == W) *(VT *)p = v;                                                                     \
    else memcpy(p, &v, sizeof(T) * m);                                                            \
}                                                                                                 \
                                                                                                  \
HB_INLINE void hb_stnt_##SUF(T *p, VT v, int m) {                                                 \
    if (m == W && hb_aligned(p, sizeof(VT))) hb_stream_##SUF(p, v);                               \
    else hb_st_##SUF(p, v, m);                                                                    \
}                                                                                                 \
                                                                                                  \
HB_INLINE VT hb_ldh_##SUF(const uint16_t *p, int m) {                                             \
    HV h = {0};                                                                                   \
    if (m == W) h = *(const HV *)p;                                                               \
    else memcpy(&h, p, 2 * m);                                                                    \
    return hb_widen_##SUF(h);                                                                     \
}                                                                                                 \
                                                                                                  \
HB_INLINE void hb_sth_##SUF(uint16_t *p, VT v, int m) {                                           \
    HV h = hb_narrow_##SUF(v);                                                                    \
    if (m == W) *(HV *)p = h;                                                                     \
    else memcpy(p, &h, 2 * m);                                                                    \
}                                                                                                 \
                                                                                                  \
HB_INLINE void hb_sthnt_##SUF(uint16_t *p, VT v, int m) {                                         \
    if (m == W && hb_aligned(p, sizeof(HV))) hb_stream_h_##SUF(p, hb_narrow_##SUF(v));            \
    else hb_sth_##SUF(p, v, m);                                                                   \
}                                                                                                 \
                                                                                                  \
/* from a buffer in T or in bf16 */                                                               \
HB_INLINE VT hb_lda_##SUF(const void *p, int bf16, int64_t at, int m) {                           \
    return bf16 ? hb_ldh_##SUF((const uint16_t *)p + at, m) : hb_ld_##SUF((const T *)p + at, m);  \
}                                                                                                 \
                                                                                                  \
HB_INLINE T hb_hsum_##SUF(VT v) {                                                                 \
    T s = 0;                                                                                      \
    for (int l = 0; l < W; l++) s += v[l];                                                        \
    return s;                                                                                     \
}                                                                                                 \
                                                                                                  \
/* sum_i a[i stride] v_i: one row of a mixing, for a column block */                              \
HB_INLINE VT hc_comb_##SUF(int n, const T *a, int stride, const VT *v) {                          \
    VT o = a[0] * v[0];                                                                           \
    for (int i = 1; i < n; i++) o += a[i * stride] * v[i];                                        \
    return o;                                                                                     \
}                                                                                                 \
                                                                                                  \
/* out[k] = <x, ys[k]> over d elements, k < ny <= HB_MAXN + 3 */                                  \
HB_INLINE void hc_dots_##SUF(const T *x, const T *const *ys, int ny, int64_t d, T *out) {         \
    VT acc[HB_MAXN + 3];                                                                          \
    for (int k = 0; k < ny; k++) acc[k] = (VT){0};                                                \
    HB_COLUMNS(W, d,                                                                              \
        VT xv = hb_ld_##SUF(x + c, m);                                                            \
        for (int k = 0; k < ny; k++) acc[k] += xv * hb_ld_##SUF(ys[k] + c, m);                    \
    );                                                                                            \
    for (int k = 0; k < ny; k++) out[k] = hb_hsum_##SUF(acc[k]);                                  \
}                                                                                                 \
                                                                                                  \
/* one token's mixing: x (d) = A_m^T H, mixed (n, d) = A_r^T H if mixed (else the depth           \
   connection mixes, hb_hc_streams), and the bf16 copy of H if saved */                           \
HB_INLINE void hc_mix_token_##SUF(int n, const T *ht, int64_t d, const T *a, T *x, T *mixed,      \
                                  uint16_t *saved) {                                              \
    HB_COLUMNS(W, d,                                                                              \
        VT hv[HB_MAXN];                                                                           \
        for (int i = 0; i < n; i++) hv[i] = hb_ld_##SUF(ht + i * d + c, m);                       \
        hb_st_##SUF(x + c, hc_comb_##SUF(n, a, n + 1, hv), m);                                    \
        if (mixed)                                                                                \
            for (int j = 0; j < n; j++)                                                           \
                hb_st_##SUF(mixed + j * d + c, hc_comb_##SUF(n, a + j + 1, n + 1, hv), m);        \
        if (saved)                                                                                \
            for (int i = 0; i < n; i++) hb_sthnt_##SUF(saved + i * d + c, hv[i], m);              \
    );                                                                                            \
}                                                                                                 \
                                                                                                  \
/* one token's branch norm, in place: x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) */           \
HB_INLINE void hc_norm_token_##SUF(T *x, int64_t d, const hb_norm *nm, int64_t tok) {             \
    const T *w = (const T *)nm->w, *xs[1] = {x};                                                  \
    T ss;                                                                                         \
    hc_dots_##SUF(x, xs, 1, d, &ss);                                                              \
    T rs = 1 / SQRT(ss / (T)d + (T)nm->eps);                                                      \
    ((T *)nm->rstd)[tok] = rs;                                                                    \
    HB_COLUMNS(W, d, hb_st_##SUF(x + c, hb_ld_##SUF(x + c, m) * rs * hb_ld_##SUF(w + c, m), m);); \
}                                                                                                 \
                                                                                                  \
/* h (N, n, d); alpha (n, n+1) or (N, n, n+1) (alpha_per_token); mixed, or NULL; saved: a bf16    \
   copy of h, or NULL; nm: the branch norm, or NULL. */                                           \
int hb_hc_forward_##SUF(const T *h, int64_t N, int n, int64_t d, const T *alpha,                  \
                        int alpha_per_token, T *x, T *mixed, uint16_t *saved, const hb_norm *nm,  \
                        int nthreads) {                                                           \
    if (n < 1 || n > HB_MAXN) return 1;                                                           \
    _Pragma("omp parallel num_threads(nthreads)")                                                 \
    {                                                                                             \
        _Pragma("omp for schedule(static)")                                                       \
        for (int64_t tok = 0; tok < N; tok++) {                                                   \
            HB_BY_N_##SUF(n, hc_mix_token_##SUF(nn, h + tok * n * d, d,                           \
                                          alpha + (alpha_per_token ? tok * n * (n + 1) : 0),      \
                                          x + tok * d, mixed ? mixed + tok * n * d : NULL,        \
                                          saved ? saved + tok * n * d : NULL));                   \
            if (nm) hc_norm_token_##SUF(x + tok * d, d, nm, tok);                                 \
        }                                                                                         \
        hb_fence();  /* this thread's streamed stores (the bf16 copy) */                          \
    }                                                                                             \
    return 0;                                                                                     \
}                                                                                                 \
                                                                                                  \
/* DHC's forward, the dynamic weights and the mixing in one pass over a token's streams (in L1):  \
   per stream i, r_i = 1 / sqrt(mean(H_i^2) + eps), p_ik = <H_i, wt_k> (k < n + 2),               \
   t = tanh(p r) (or p r), alpha_i = s_alpha t_i[:n+1] + static_alpha_i, beta_i =                 \
   s_beta t_i[n+1] + static_beta_i; then the mixing with these alpha. Writes r (N, n), p and t    \
   (N, n, n+2), alpha (N, n, n+1), beta (N, n), and x, mixed, saved as hb_hc_forward. */          \
int hb_hc_forward_dynamic_##SUF(const T *h, int64_t N, int n, int64_t d, const T *static_alpha,   \
                                const T *static_beta, const T *wt, T s_alpha, T s_beta, T eps,    \
                                int use_tanh, T *r, T *p, T *t, T *alpha, T *beta, T *x,          \
                                T *mixed, uint16_t *saved, const hb_norm *nm, int nthreads) {     \
    if (n < 1 || n > HB_MAXN) return 1;                                                           \
    int k2 = n + 2;                                                                               \
    _Pragma("omp parallel num_threads(nthreads)")                                                 \
    {                                                                                             \
        _Pragma("omp for schedule(static)")                                                       \
        for (int64_t tok = 0; tok < N; tok++) {                                                   \
            const T *ht = h + tok * n * d, *ys[HB_MAXN + 3];                                      \
            T *pt = p + tok * n * k2, *tt = t + tok * n * k2, *at = alpha + tok * n * (n + 1);    \
            T dots[HB_MAXN + 3];                                                                  \
            for (int k = 0; k < k2; k++) ys[k + 1] = wt + k * d;                                  \
            for (int i = 0; i < n; i++) {                                                         \
                ys[0] = ht + i * d;                                                               \
                HB_BY_N_##SUF(n, hc_dots_##SUF(ht + i * d, ys, nn + 3, d, dots));                 \
                T ri = 1 / SQRT(dots[0] / (T)d + eps);                                            \
                r[tok * n + i] = ri;                                                              \
                for (int k = 0; k < k2; k++) {                                                    \
                    pt[i * k2 + k] = dots[k + 1];                                                 \
                    tt[i * k2 + k] = dots[k + 1] * ri;                                            \
                }                                                                                 \
            }                                                                                     \
            if (use_tanh)                                                                         \
                HB_COLUMNS(W, n * k2, hb_st_##SUF(tt + c, TANH(hb_ld_##SUF(tt + c, m)), m););     \
            for (int i = 0; i < n; i++) {                                                         \
                for (int j = 0; j <= n; j++)                                                      \
                    at[i * (n + 1) + j] =                                                         \
                        tt[i * k2 + j] * s_alpha + static_alpha[i * (n + 1) + j];                 \
                beta[tok * n + i] = tt[i * k2 + n + 1] * s_beta + static_beta[i];                 \
            }                                                                                     \
            HB_BY_N_##SUF(n, hc_mix_token_##SUF(nn, ht, d, at, x + tok * d,                       \
                                                mixed ? mixed + tok * n * d : NULL,               \
                                                saved ? saved + tok * n * d : NULL));             \
            if (nm) hc_norm_token_##SUF(x + tok * d, d, nm, tok);                                 \
        }                                                                                         \
        hb_fence();  /* this thread's streamed stores (the bf16 copy) */                          \
    }                                                                                             \
    return 0;                                                                                     \
}                                                                                                 \
                                                                                                  \
/* a token's streams (n, d) in T (hb_streams): h itself, or widened from bf16 or rebuilt into     \
   dst (n d) */                                                                                   \
HB_INLINE const T *hc_streams_token_##SUF(int n, const hb_streams *s, int64_t tok, int64_t d,     \
                                          T *dst) {                                               \
    if (s->h && !s->h_bf16) return (const T *)s->h + tok * n * d;                                 \
    if (s->h) {                                                                                   \
        const uint16_t *hb = (const uint16_t *)s->h + tok * n * d;                                \
        HB_COLUMNS(W, n * d, hb_st_##SUF(dst + c, hb_ldh_##SUF(hb + c, m), m););                  \
        return dst;                                                                               \
    }                                                                                             \
    const T *a = (const T *)s->alpha + (s->alpha_per_token ? tok * n * (n + 1) : 0);              \
    const T *bt = (const T *)s->beta + (s->beta_per_token ? tok * n : 0);                         \
    int prev_bf16 = s->prev_bf16, y_bf16 = s->y_bf16, round = s->round_bf16;                      \
    HB_COLUMNS(W, d,                                                                              \
        VT pv[HB_MAXN];                                                                           \
        for (int j = 0; j < n; j++) pv[j] = hb_lda_##SUF(s->prev, prev_bf16, (tok * n + j) * d + c, m); \
        VT yv = hb_lda_##SUF(s->y, y_bf16, tok * d + c, m);                                       \
        for (int i = 0; i < n; i++) {                                                             \
            VT o = hc_comb_##SUF(n, a + i + 1, n + 1, pv) + bt[i] * yv;                           \
            if (round) o = hb_widen_##SUF(hb_narrow_##SUF(o));                                    \
            hb_st_##SUF(dst + i * d + c, o, m);                                                   \
        }                                                                                         \
    );                                                                                            \
    return dst;                                                                                   \
}                                                                                                 \
                                                                                                  \
/* per token of hb_streams: the streams written out (N, n, d) when out is given, the branch input \
   x = A_m^T H (N, d) when x is given (alpha (n, n+1) or per token), both in T */                 \
int hb_hc_streams_##SUF(const hb_streams *s, int64_t N, int n, int64_t d, const T *alpha,         \
                        int alpha_per_token, T *out, T *x, int nthreads) {                        \
    if (n < 1 || n > HB_MAXN) return 1;                                                           \
    int bad = 0;                                                                                  \
    _Pragma("omp parallel num_threads(nthreads)")                                                 \
    {                                                                                             \
        T *buf = malloc(sizeof(T) * n * d);                                                       \
        if (!buf) { _Pragma("omp atomic write") bad = 1; }                                        \
        _Pragma("omp for schedule(static)")                                                       \
        for (int64_t tok = 0; tok < N; tok++) {                                                   \
            if (!buf) continue;  /* every thread reaches the loop's barrier */                    \
            T *dst = out ? out + tok * n * d : buf;                                               \
            const T *ht;                                                                          \
            HB_BY_N_##SUF(n, ht = hc_streams_token_##SUF(nn, s, tok, d, dst));                    \
            if (out && ht != dst) memcpy(dst, ht, sizeof(T) * n * d);                             \
            if (x)                                                                                \
                HB_BY_N_##SUF(n, hc_mix_token_##SUF(nn, ht, d,                                    \
                                              alpha + (alpha_per_token ? tok * n * (n + 1) : 0),  \
                                              x + tok * d, NULL, NULL));                          \
        }                                                                                         \
        free(buf);                                                                                \
    }                                                                                             \
    return bad ? 2 : 0;                                                                           \
}                                                                                                 \
                                                                                                  \
/* one column block of a depth connection's backward, g = dL/d out given as its n rows gv: the    \
   block of dL/dy = sum_i beta_i g_i into gy (if gy), and <g_i, y> added to acc[i] (if acc; the   \
   caller sums the lanes into dL/dbeta_i). y in T or bf16, its token's row at element at */       \
HB_INLINE void hc_depth_column_##SUF(int n, const T *bt, const VT *gv, const void *y, int y_bf16, \
                                     int64_t at, int64_t c, int m, T *gy, VT *acc) {              \
    if (gy) hb_st_##SUF(gy + c, hc_comb_##SUF(n, bt, 1, gv), m);                                  \
    if (acc) {                                                                                    \
        VT yv = hb_lda_##SUF(y, y_bf16, at + c, m);                                               \
        for (int i = 0; i < n; i++) acc[i] += gv[i] * yv;                                         \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
/* the first half of a token's width backward: the branch norm's backward (nm, or NULL: gx is dL/dx \
   already; x recomputed from the streams ht into scr, 2 d scratch) and dL/dalpha ga (n, n+1) from  \
   dL/dx and gm (n, d, or NULL); adds to gnw (the norm's gain). Returns dL/dx (in scr with nm). */ \
HB_INLINE const T *hc_alpha_token_##SUF(int n, const T *ht, int64_t tok, int64_t d, const T *a,   \
                                        const T *gx, const T *gm, const hb_norm *nm, T *gnw,      \
                                        T *scr, T *ga) {                                          \
    if (nm) { /* the branch norm's backward: x (recomputed) -> dL/dx */                           \
        T *xb = scr, *gxb = xb + d;                                                               \
        const T *w = (const T *)nm->w, *go = (const T *)nm->g_out + tok * d;                      \
        T rs = ((const T *)nm->rstd)[tok];                                                        \
        VT dot = {0};                                                                             \
        HB_COLUMNS(W, d,                                                                          \
            VT hv[HB_MAXN];                                                                       \
            for (int i = 0; i < n; i++) hv[i] = hb_ld_##SUF(ht + i * d + c, m);                   \
            VT xv = hc_comb_##SUF(n, a, n + 1, hv);                                               \
            hb_st_##SUF(xb + c, xv, m);                                                           \
            dot += hb_ld_##SUF(go + c, m) * hb_ld_##SUF(w + c, m) * (xv * rs);                    \
        );                                                                                        \
        T mean = hb_hsum_##SUF(dot) / (T)d;                                                       \
        HB_COLUMNS(W, d,                                                                          \
            VT gov = hb_ld_##SUF(go + c, m), xh = hb_ld_##SUF(xb + c, m) * rs;                    \
            hb_st_##SUF(gxb + c, (gov * hb_ld_##SUF(w + c, m) - xh * mean) * rs, m);              \
            if (gnw) hb_st_##SUF(gnw + c, hb_ld_##SUF(gnw + c, m) + gov * xh, m);                 \
        );                                                                                        \
        gx = gxb;                                                                                 \
    }                                                                                             \
    const T *ys[HB_MAXN + 3];                                                                     \
    ys[0] = gx;                                                                                   \
    for (int j = 0; j < n; j++) ys[j + 1] = gm ? gm + j * d : gx;                                 \
    for (int i = 0; i < n; i++) {                                                                 \
        if (gm) hc_dots_##SUF(ht + i * d, ys, n + 1, d, ga + i * (n + 1));                        \
        else {                                                                                    \
            hc_dots_##SUF(ht + i * d, ys, 1, d, ga + i * (n + 1));                                \
            for (int j = 1; j <= n; j++) ga[i * (n + 1) + j] = 0;                                 \
        }                                                                                         \
    }                                                                                             \
    return gx;                                                                                    \
}                                                                                                 \
                                                                                                  \
/* one token of hb_hc_backward: gx (d), gm (n, d) or NULL, gb (n) or NULL; writes gh (n, d), ga   \
   (n, n+1), adds to gw ((n+2, d), DHC) and gnw (d, the norm's gain), and runs the backward of the \
   depth connection before (dp, or NULL) on gh; buf: n d + 2 d scratch */                         \
HB_INLINE void hc_backward_token_##SUF(int n, const hb_streams *s, int64_t tok, int64_t d,        \
                                       const T *a, const T *gx, const T *gm, const T *gb,         \
                                       const T *t, const T *r, const T *p, const T *wt,           \
                                       T s_alpha, T s_beta, int use_tanh, T *gh, T *ga, T *gw,    \
                                       const hb_norm *nm, T *gnw, const hb_depth *dp, T *buf) {   \
    int k2 = n + 2;                                                                               \
    const T *ht = hc_streams_token_##SUF(n, s, tok, d, buf);                                      \
    gx = hc_alpha_token_##SUF(n, ht, tok, d, a, gx, gm, nm, gnw, buf + n * d, ga);                \
    if (nm && nm->g_x) memcpy((T *)nm->g_x + tok * d, gx, sizeof(T) * d);                         \
    if (!gh) return;  /* dL/dalpha only (hb_mhc_backward writes dL/dH) */                         \
    T gp[HB_MAXN * (HB_MAXN + 2)], coef[HB_MAXN];                                                 \
    if (wt) { /* z = t (pre-tanh: P r); dL/dz, then dL/dP = dL/dz r */                            \
        const T *tt = t + tok * n * k2, *pt = p + tok * n * k2, *rt = r + tok * n;                \
        for (int i = 0; i < n; i++) {                                                             \
            T cs = 0;                                                                             \
            for (int k = 0; k < k2; k++) {                                                        \
                T gz = k <= n ? ga[i * (n + 1) + k] * s_alpha : (gb ? gb[i] * s_beta : 0);        \
                if (use_tanh) gz *= 1 - tt[i * k2 + k] * tt[i * k2 + k];                          \
                gp[i * k2 + k] = gz * rt[i];                                                      \
                cs += gz * pt[i * k2 + k];                                                        \
            }                                                                                     \
            coef[i] = cs * rt[i] * rt[i] * rt[i] / (T)d;                                          \
        }                                                                                         \
    }                                                                                             \
    /* dL/dH_i = alpha_i0 gx + sum_j alpha_i,j+1 gm_j [+ sum_k gp_ik wt_k - coef_i H_i]; dL/dWt;  \
       the depth backward before on dL/dH (hc_depth_column, as hc_depth_backward_token) */        \
    const T *db = dp ? (const T *)dp->beta + (dp->beta_per_token ? tok * n : 0) : NULL;           \
    VT dacc[HB_MAXN];                                                                             \
    for (int i = 0; i < n; i++) dacc[i] = (VT){0};                                                \
    HB_COLUMNS(W, d,                                                                              \
        VT hv[HB_MAXN], gmv[HB_MAXN], wv[HB_MAXN + 2], ov[HB_MAXN], gxv = hb_ld_##SUF(gx + c, m); \
        for (int i = 0; i < n; i++) hv[i] = hb_ld_##SUF(ht + i * d + c, m);                       \
        if (gm)                                                                                   \
            for (int j = 0; j < n; j++) gmv[j] = hb_ld_##SUF(gm + j * d + c, m);                  \
        if (wt)                                                                                   \
            for (int k = 0; k < k2; k++) wv[k] = hb_ld_##SUF(wt + k * d + c, m);                  \
        for (int i = 0; i < n; i++) {                                                             \
            const T *ai = a + i * (n + 1);                                                        \
            VT o = ai[0] * gxv;                                                                   \
            if (gm)                                                                               \
                for (int j = 0; j < n; j++) o += ai[j + 1] * gmv[j];                              \
            if (wt) {                                                                             \
                for (int k = 0; k < k2; k++) o += gp[i * k2 + k] * wv[k];                         \
                o -= coef[i] * hv[i];                                                             \
            }                                                                                     \
            hb_stnt_##SUF(gh + i * d + c, o, m);                                                  \
            ov[i] = o;                                                                            \
        }                                                                                         \
        if (wt)                                                                                   \
            for (int k = 0; k < k2; k++) {                                                        \
                VT g = hb_ld_##SUF(gw + k * d + c, m);                                            \
                for (int i = 0; i < n; i++) g += gp[i * k2 + k] * hv[i];                          \
                hb_st_##SUF(gw + k * d + c, g, m);                                                \
            }                                                                                     \
        if (dp)                                                                                   \
            hc_depth_column_##SUF(n, db, ov, dp->y, dp->y_bf16, tok * d, c, m, (T *)dp->g_y + tok * d, dacc); \
    );                                                                                            \
    if (dp)                                                                                       \
        for (int i = 0; i < n; i++) ((T *)dp->g_beta)[tok * n + i] = hb_hsum_##SUF(dacc[i]);      \
}                                                                                                 \
                                                                                                  \
/* g_x (N, d): dL/dx after the norm; g_mixed (N, n, d) or NULL; dynamic (wt != NULL): g_beta      \
   (N, n) or NULL, t, r, p from the forward. Out: g_h (N, n, d), g_alpha (N, n, n+1) (dL/dalpha   \
   per token, before the dynamic chain), g_wt (n+2, d) when dynamic; dp: the depth backward of the \
   connection before (hb_depth), or NULL. g_h NULL (not with wt or dp): dL/dalpha (and the norm's \
   dL/dx, hb_norm.g_x) only, for hb_mhc_backward. */                                              \
int hb_hc_backward_##SUF(const hb_streams *s, int64_t N, int n, int64_t d, const T *alpha,        \
                         int alpha_per_token, const T *g_x, const T *g_mixed, const T *g_beta,    \
                         const T *t, const T *r, const T *p, const T *wt, T s_alpha, T s_beta,    \
                         int use_tanh, T *g_h, T *g_alpha, T *g_wt, const hb_norm *nm,            \
                         const hb_depth *dp, int nthreads) {                                      \
    if (n < 1 || n > HB_MAXN) return 1;                                                           \
    int bad = 0;                                                                                  \
    int64_t wsize = wt ? (int64_t)(n + 2) * d : 0;                                                \
    T *g_w = nm ? (T *)nm->g_w : NULL;                                                            \
    /* the parameter gradients: one partial sum per block of HB_TOKBLK tokens, each block's tokens \
       in order, the blocks added in order afterwards: the same bits at any thread count */       \
    int64_t part = wsize + (g_w ? d : 0), nblk = (N + HB_TOKBLK - 1) / HB_TOKBLK;                 \
    T *parts = part ? calloc((size_t)(nblk * part), sizeof(T)) : NULL;                            \
    if (part && !parts) return 2;                                                                 \
    _Pragma("omp parallel num_threads(nthreads)")                                                 \
    {                                                                                             \
        T *buf = malloc(sizeof(T) * (n * d + 2 * d));                                             \
        if (!buf) { _Pragma("omp atomic write") bad = 1; }                                        \
        _Pragma("omp for schedule(static)")                                                       \
        for (int64_t blk = 0; blk < nblk; blk++) {                                                \
            if (!buf) continue;  /* every thread reaches the loop's barrier */                    \
            T *gw = wt ? parts + blk * part : NULL;                                               \
            T *gnw = g_w ? parts + blk * part + wsize : NULL;                                     \
            int64_t end = (blk + 1) * HB_TOKBLK < N ? (blk + 1) * HB_TOKBLK : N;                  \
            for (int64_t tok = blk * HB_TOKBLK; tok < end; tok++)                                 \
                HB_BY_N_##SUF(n, hc_backward_token_##SUF(                                         \
                    nn, s, tok, d, alpha + (alpha_per_token ? tok * n * (n + 1) : 0), g_x + tok * d, \
                    g_mixed ? g_mixed + tok * n * d : NULL, g_beta ? g_beta + tok * n : NULL, t, r, \
                    p, wt, s_alpha, s_beta, use_tanh, g_h ? g_h + tok * n * d : NULL,             \
                    g_alpha + tok * n * (n + 1), gw, nm, gnw, dp, buf));                          \
        }                                                                                         \
        hb_fence();  /* this thread's streamed stores, before the region ends */                  \
        free(buf);                                                                                \
    }                                                                                             \
    if (wt) memset(g_wt, 0, sizeof(T) * wsize);                                                   \
    if (g_w) memset(g_w, 0, sizeof(T) * d);                                                       \
    for (int64_t blk = 0; blk < nblk; blk++) {                                                    \
        for (int64_t c = 0; c < wsize; c++) g_wt[c] += parts[blk * part + c];                     \
        if (g_w)                                                                                  \
            for (int64_t c = 0; c < d; c++) g_w[c] += parts[blk * part + wsize + c];              \
    }                                                                                             \
    free(parts);                                                                                  \
    return bad ? 2 : 0;                                                                           \
}                                                                                                 \
                                                                                                  \
/* Depth connection (pathways/_depth_fused.py: DepthConnection): out_i = mixed_i + beta_i y per   \
   token, beta (n) static or (N, n) per token, y (N, d) in T or bf16 (a branch output under       \
   autocast). Backward: dL/dy = sum_i beta_i g_i and dL/dbeta_i = <g_i, y> per token, in one pass \
   over g. */                                                                                     \
int hb_depth_forward_##SUF(const T *mixed, const T *beta, int beta_per_token, const void *y,      \
                           int y_bf16, int64_t N, int n, int64_t d, T *out, int nthreads) {       \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                            \
    for (int64_t tok = 0; tok < N; tok++) {                                                       \
        const T *bt = beta + (beta_per_token ? tok * n : 0);                                      \
        HB_COLUMNS(W, d,                                                                          \
            VT yv = hb_lda_##SUF(y, y_bf16, tok * d + c, m);                                      \
            for (int i = 0; i < n; i++)                                                           \
                hb_st_##SUF(out + (tok * n + i) * d + c,                                          \
                            hb_ld_##SUF(mixed + (tok * n + i) * d + c, m) + bt[i] * yv, m);       \
        );                                                                                        \
    }                                                                                             \
    return 0;                                                                                     \
}                                                                                                 \
                                                                                                  \
HB_INLINE void hc_depth_backward_token_##SUF(int n, const T *gt, const T *bt, const void *y,      \
                                             int y_bf16, int64_t tok, int64_t d, T *gy, T *gb) {  \
    VT acc[HB_MAXN];                                                                              \
    for (int i = 0; i < n; i++) acc[i] = (VT){0};                                                 \
    HB_COLUMNS(W, d,                                                                              \
        VT gv[HB_MAXN];                                                                           \
        for (int i = 0; i < n; i++) gv[i] = hb_ld_##SUF(gt + i * d + c, m);                       \
        hc_depth_column_##SUF(n, bt, gv, y, y_bf16, tok * d, c, m, gy, gb ? acc : NULL);          \
    );                                                                                            \
    if (gb)                                                                                       \
        for (int i = 0; i < n; i++) gb[i] = hb_hsum_##SUF(acc[i]);                                \
}                                                                                                 \
                                                                                                  \
/* g (N, n, d); g_y (N, d) or NULL; g_beta (N, n) per token or NULL */                            \
int hb_depth_backward_##SUF(const T *g, const T *beta, int beta_per_token, const void *y,         \
                            int y_bf16, int64_t N, int n, int64_t d, T *g_y, T *g_beta,           \
                            int nthreads) {                                                       \
    if (n < 1 || n > HB_MAXN) return 1;                                                           \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                            \
    for (int64_t tok = 0; tok < N; tok++)                                                         \
        HB_BY_N_##SUF(n, hc_depth_backward_token_##SUF(                                           \
            nn, g + tok * n * d, beta + (beta_per_token ? tok * n : 0), y, y_bf16, tok, d,        \
            g_y ? g_y + tok * d : NULL, g_beta ? g_beta + tok * n : NULL));                       \
    return 0;                                                                                     \
}

DEFINE_HC(float, f32, hb_vf32, hb_vh32, HB_VB / 4, sqrtf, hb_tanh_vf32)
DEFINE_HC(double, f64, hb_vf64, hb_vh64, HB_VB / 8, sqrt, hb_tanh_vf64)

/* mHC's own kernels, on the Sinkhorn blocks and the per-token helpers above */
#include "native_mhc.c"
