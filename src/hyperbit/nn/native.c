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
