/* mHC's CPU kernels (pathways/_mhc_fused.py; entry points in nn/native_mhc.py), included at the
   end of native.c: they build on its Sinkhorn blocks (DEFINE_SINKHORN) and on the width
   connection's per-token helpers (DEFINE_HC). Forward and backward are each one pass over the
   streams per block of tokens; see the comments at each kernel. */

/* hb_mhc_backward: tokens per group sharing the loads of phi, and per partial sum of dL/dphi */
#define MHC_GROUP 8
#define MHC_TOKBLK 128
/* hb_mhc_project: tokens x rows of phi whose dot products accumulate in registers together (all
   of a group's tokens stay in L1 while it runs over phi, MHC_PROJ_ROWS rows at a time) */
#if HB_VB == 64
#define MHC_PROJ_TOKENS 8
#define MHC_PROJ_ROWS 3
#else
#define MHC_PROJ_TOKENS 4
#define MHC_PROJ_ROWS 2
#endif

/* mHC's per-token map (pathways/manifold.py: ManifoldHyperConnection._map, res="sinkhorn") from
   the projections z (N, m), m = 2n + n^2, rows [pre | post | res logits]:
       pre = sigmoid(a_pre z_pre + b_pre), post = 2 sigmoid(a_post z_post + b_post),
       res = the Sinkhorn (native.c) of the logits a_res z_res + b_res,
   written as alpha (N, n, n+1) = [pre | res^T] and post (N, n), with the logits (N, n, n) kept
   for backward; b = [b_pre (n) | b_post (n) | b_res (n n)], a = [a_pre, a_post, a_res]. Run per
   block of tokens inside hb_mhc_forward; its reverse is inside hb_mhc_backward_fused. */
#define DEFINE_MHC(T, SUF, VT, W, SQRT, EXP)                                                      \
HB_INLINE T mhc_sigmoid_##SUF(T x) { return 1 / (1 + EXP(-x)); }                                  \
                                                                                                  \
/* the map for the tokens t0 .. t0 + nb - 1 (nb <= SK_BLOCK): one block of the Sinkhorn */        \
HB_INLINE void mhc_map_block_##SUF(int n, int64_t t0, int nb, const T *z, const T *b, const T *a, \
                                   int iters, T range, T floor_, sk_vec_##SUF *u, sk_vec_##SUF *v,\
                                   sk_state_##SUF *st, T *logits, T *alpha, T *post) {            \
    const int m = 2 * n + n * n, nn = n * n;                                                      \
    for (int64_t t = t0; t < t0 + nb; t++)                                                        \
        for (int k = 0; k < nn; k++) logits[t * nn + k] = a[2] * z[t * m + 2 * n + k] + b[2 * n + k];\
    sk_mat_##SUF zt, res;                                                                         \
    sk_gather_##SUF(logits, n, t0, nb, zt);                                                       \
    sk_forward_block_##SUF(n, iters, range, floor_, zt, u, v, st, res);                           \
    for (int bb = 0; bb < nb; bb++) {                                                             \
        const int64_t t = t0 + bb;                                                                \
        for (int i = 0; i < n; i++) {                                                             \
            T *at = alpha + (t * n + i) * (n + 1);                                                \
            at[0] = mhc_sigmoid_##SUF(a[0] * z[t * m + i] + b[i]);                                \
            post[t * n + i] = 2 * mhc_sigmoid_##SUF(a[1] * z[t * m + n + i] + b[n + i]);          \
            for (int j = 0; j < n; j++) at[1 + j] = res[j * n + i][bb];  /* res^T */              \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
/* per-thread scratch of the Sinkhorn's rounds; 0 when out of memory */                           \
HB_INLINE int mhc_sk_alloc_##SUF(int iters, sk_vec_##SUF **u, sk_vec_##SUF **v, sk_state_##SUF **st) {\
    *u = malloc(sizeof(sk_vec_##SUF) * (size_t)iters);                                            \
    *v = malloc(sizeof(sk_vec_##SUF) * (size_t)(iters + 1));                                      \
    *st = malloc(sizeof(sk_state_##SUF));                                                         \
    return *u && *v && *st;                                                                       \
}                                                                                                 \
                                                                                                  \
/* mHC's projection of the flat streams (pathways/_mhc_fused.py), G tokens from x (G a constant   \
   after inlining): per token r = 1 / sqrt(mean(x^2) + eps) and z = (x phi^T) r over K = n d;      \
   phi (rows, K) with rows a whole number of MHC_PROJ_ROWS (zero rows at the end), z (G, nr). */  \
HB_INLINE void mhc_project_group_##SUF(int G, const T *x, int64_t K, const T *phi, int rows, int nr, \
                                       T eps, T *z, T *r) {                                       \
    for (int t = 0; t < G; t++) {                                                                 \
        VT ss = {0};                                                                              \
        HB_COLUMNS(W, K, VT v = hb_ld_##SUF(x + t * K + c, m); ss += v * v;);                     \
        r[t] = 1 / SQRT(hb_hsum_##SUF(ss) / (T)K + eps);                                          \
    }                                                                                             \
    for (int k0 = 0; k0 < rows; k0 += MHC_PROJ_ROWS) {                                            \
        VT acc[MHC_PROJ_ROWS][MHC_PROJ_TOKENS];                                                   \
        for (int j = 0; j < MHC_PROJ_ROWS; j++)                                                   \
            for (int t = 0; t < G; t++) acc[j][t] = (VT){0};                                      \
        HB_COLUMNS(W, K,                                                                          \
            VT pv[MHC_PROJ_ROWS];                                                                 \
            for (int j = 0; j < MHC_PROJ_ROWS; j++) pv[j] = hb_ld_##SUF(phi + (k0 + j) * K + c, m); \
            for (int t = 0; t < G; t++) {                                                         \
                VT xv = hb_ld_##SUF(x + t * K + c, m);                                            \
                for (int j = 0; j < MHC_PROJ_ROWS; j++) acc[j][t] += pv[j] * xv;                  \
            }                                                                                     \
        );                                                                                        \
        for (int j = 0; j < MHC_PROJ_ROWS && k0 + j < nr; j++)                                    \
            for (int t = 0; t < G; t++) z[t * nr + k0 + j] = hb_hsum_##SUF(acc[j][t]) * r[t];     \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
/* mhc_project_group over nt tokens from x: groups of MHC_PROJ_TOKENS, then one at a time */      \
HB_INLINE void mhc_project_tokens_##SUF(const T *x, int64_t nt, int64_t K, const T *phi, int rows, int nr, \
                                        T eps, T *z, T *r) {                                      \
    int64_t t = 0;                                                                                \
    for (; t + MHC_PROJ_TOKENS <= nt; t += MHC_PROJ_TOKENS)                                       \
        mhc_project_group_##SUF(MHC_PROJ_TOKENS, x + t * K, K, phi, rows, nr, eps, z + t * nr, r + t); \
    for (; t < nt; t++)                                                                           \
        mhc_project_group_##SUF(1, x + t * K, K, phi, rows, nr, eps, z + t * nr, r + t);          \
}                                                                                                 \
                                                                                                  \
/* phi (nr, K) copied with zero rows up to a whole number of MHC_PROJ_ROWS (*rows); NULL when out \
   of memory */                                                                                   \
HB_INLINE T *mhc_padded_phi_##SUF(const T *phi, int nr, int64_t K, int *rows) {                   \
    *rows = (nr + MHC_PROJ_ROWS - 1) / MHC_PROJ_ROWS * MHC_PROJ_ROWS;                             \
    T *php = calloc((size_t)(*rows * K > 0 ? *rows * K : 1), sizeof(T));                          \
    if (php) memcpy(php, phi, sizeof(T) * nr * K);                                                \
    return php;                                                                                   \
}                                                                                                 \
                                                                                                  \
/* x (N, K), phi (nr, K) -> z (N, nr), r (N) */                                                   \
int hb_mhc_project_##SUF(const T *x, int64_t N, int64_t K, const T *phi, int nr, T eps, T *z,     \
                         T *r, int nthreads) {                                                    \
    int rows;                                                                                     \
    T *php = mhc_padded_phi_##SUF(phi, nr, K, &rows);                                             \
    if (!php) return 2;                                                                           \
    const int64_t groups = (N + MHC_PROJ_TOKENS - 1) / MHC_PROJ_TOKENS;                           \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                            \
    for (int64_t gi = 0; gi < groups; gi++) {                                                     \
        int64_t t0 = gi * MHC_PROJ_TOKENS;                                                        \
        mhc_project_tokens_##SUF(x + t0 * K, N - t0 < MHC_PROJ_TOKENS ? N - t0 : MHC_PROJ_TOKENS, K, php, \
                                 rows, nr, eps, z + t0 * nr, r + t0);                             \
    }                                                                                             \
    free(php);                                                                                    \
    return 0;                                                                                     \
}                                                                                                 \
                                                                                                  \
/* mHC's width forward in one pass over the streams h (N, n, d): per block of SK_BLOCK tokens the \
   projection z and rstd r (mhc_project_group), the map (mhc_map_block: logits, alpha, post), then\
   the mixing of hb_hc_forward (x, mixed if given, the bf16 copy if given, the branch norm nm if  \
   given), the block's streams still in cache. phi (nr, n d); b (nr) and a (3) as DEFINE_MHC_MAP   \
   describes them. */                                                                             \
int hb_mhc_forward_##SUF(const T *h, int64_t N, int n, int64_t d, const T *phi, int nr, T eps,    \
                         const T *b, const T *a, int iters, T range, T floor_, T *z, T *r,        \
                         T *logits, T *alpha, T *post, T *x, T *mixed, uint16_t *saved,           \
                         const hb_norm *nm, int nthreads) {                                       \
    if (n < 1 || n > SK_MAXN || nr != 2 * n + n * n || iters < 1) return 1;                       \
    const int64_t nd = n * d, blocks = (N + SK_BLOCK - 1) / SK_BLOCK;                             \
    int rows;                                                                                     \
    T *php = mhc_padded_phi_##SUF(phi, nr, nd, &rows);                                            \
    if (!php) return 2;                                                                           \
    int bad = 0;                                                                                  \
    _Pragma("omp parallel num_threads(nthreads)")                                                 \
    {                                                                                             \
        sk_vec_##SUF *u, *v;                                                                      \
        sk_state_##SUF *st;                                                                       \
        int ok = mhc_sk_alloc_##SUF(iters, &u, &v, &st);                                          \
        if (!ok) { _Pragma("omp atomic write") bad = 2; }                                         \
        _Pragma("omp for schedule(static)")                                                       \
        for (int64_t blk = 0; blk < blocks; blk++) {                                              \
            if (!ok) continue;  /* every thread reaches the loop's barrier */                     \
            const int64_t t0 = blk * SK_BLOCK;                                                    \
            const int nb = N - t0 < SK_BLOCK ? (int)(N - t0) : SK_BLOCK;                          \
            mhc_project_tokens_##SUF(h + t0 * nd, nb, nd, php, rows, nr, eps, z + t0 * nr, r + t0); \
            mhc_map_block_##SUF(n, t0, nb, z, b, a, iters, range, floor_, u, v, st, logits, alpha, post);\
            for (int64_t tok = t0; tok < t0 + nb; tok++) {                                        \
                HB_BY_N_##SUF(n, hc_mix_token_##SUF(nn, h + tok * nd, d, alpha + tok * n * (n + 1),\
                                              x + tok * d, mixed ? mixed + tok * nd : NULL,       \
                                              saved ? saved + tok * nd : NULL));                  \
                if (nm) hc_norm_token_##SUF(x + tok * d, d, nm, tok);                             \
            }                                                                                     \
        }                                                                                         \
        hb_fence();  /* this thread's streamed stores (the bf16 copy), before the region ends */  \
        free(u); free(v); free(st);                                                               \
    }                                                                                             \
    free(php);                                                                                    \
    return bad;                                                                                   \
}                                                                                                 \
                                                                                                  \
/* The second half of mHC's width backward (pathways/_mhc_fused.py), for G tokens from t0 (G a     \
   constant after inlining) whose streams are ht: per token, with H (n, d) flattened to x (n d),  \
   gx (d) = dL/dx of the branch input, gm (n, d) = dL/d mixed or NULL, gp (nr) = dL/dz r and coef \
   = sum_k dL/dz_k z_k r^2 / (n d):                                                               \
       dL/dH_i = a_i0 gx + sum_j a_i,j+1 gm_j + sum_k gp_k phi_k,i - coef H_i   (phi_k,i: row k's   \
       i-th d-block), and gphi_k,i += gp_k H_i;                                                   \
   the G tokens share each load of phi and of gphi. gx, gp and coef: rows from the group's first   \
   token; alpha, g_mixed and g_h: rows of all tokens. */                                          \
HB_INLINE void mhc_group_##SUF(int G, int n, const T *const *ht, int64_t t0, int64_t d,            \
                               const T *alpha, const T *gx, const T *g_mixed, const T *gp,        \
                               const T *coef, const T *phi, int nr, T *g_h, T *gphi) {            \
    const int64_t nd = n * d;                                                                     \
    HB_COLUMNS(W, d,                                                                              \
        for (int i = 0; i < n; i++) {                                                             \
            VT o[MHC_GROUP], hv[MHC_GROUP];                                                       \
            for (int t = 0; t < G; t++) {                                                         \
                const int64_t tok = t0 + t;                                                       \
                const T *a = alpha + (tok * n + i) * (n + 1);                                     \
                hv[t] = hb_ld_##SUF(ht[t] + i * d + c, m);                                        \
                VT v = a[0] * hb_ld_##SUF(gx + t * d + c, m) - coef[t] * hv[t];                   \
                if (g_mixed)                                                                      \
                    for (int j = 0; j < n; j++)                                                   \
                        v += a[j + 1] * hb_ld_##SUF(g_mixed + (tok * n + j) * d + c, m);          \
                o[t] = v;                                                                         \
            }                                                                                     \
            const T *pk = phi + i * d + c;                                                        \
            T *gk = gphi + i * d + c;                                                             \
            for (int k = 0; k < nr; k++, pk += nd, gk += nd) {                                    \
                VT pv = hb_ld_##SUF(pk, m), acc[2] = {hb_ld_##SUF(gk, m), {0}};                   \
                for (int t = 0; t < G; t++) {                                                     \
                    T g = gp[t * nr + k];                                                         \
                    o[t] += g * pv;                                                               \
                    acc[t & 1] += g * hv[t];  /* two chains: half the latency */                  \
                }                                                                                 \
                hb_st_##SUF(gk, acc[0] + acc[1], m);                                              \
            }                                                                                     \
            for (int t = 0; t < G; t++) hb_st_##SUF(g_h + ((t0 + t) * n + i) * d + c, o[t], m);   \
        }                                                                                         \
    );                                                                                            \
}                                                                                                 \
                                                                                                  \
/* mhc_group over nt tokens from t0 (in groups of MHC_GROUP, then one by one), then the depth     \
   backward before (dp, or NULL) on their dL/dH */                                                \
HB_INLINE void mhc_tokens_##SUF(int n, const T *const *ht, int64_t t0, int64_t nt, int64_t d,      \
                                const T *alpha, const T *gx, const T *g_mixed, const T *gp,       \
                                const T *coef, const T *phi, int nr, T *g_h, T *gphi,             \
                                const hb_depth *dp) {                                             \
    int64_t t = 0;                                                                                \
    for (; t + MHC_GROUP <= nt; t += MHC_GROUP)                                                   \
        mhc_group_##SUF(MHC_GROUP, n, ht + t, t0 + t, d, alpha, gx + t * d, g_mixed, gp + t * nr, \
                        coef + t, phi, nr, g_h, gphi);                                            \
    for (; t < nt; t++)                                                                           \
        mhc_group_##SUF(1, n, ht + t, t0 + t, d, alpha, gx + t * d, g_mixed, gp + t * nr, coef + t, \
                        phi, nr, g_h, gphi);                                                      \
    if (dp)                                                                                       \
        for (int64_t tok = t0; tok < t0 + nt; tok++)                                              \
            hc_depth_backward_token_##SUF(n, g_h + tok * n * d,                                   \
                                          (const T *)dp->beta + (dp->beta_per_token ? tok * n : 0), \
                                          dp->y, dp->y_bf16, tok, d, (T *)dp->g_y + tok * d,      \
                                          (T *)dp->g_beta + tok * n);                             \
}                                                                                                 \
                                                                                                  \
/* out[c] = sum over blocks of parts[blk * stride + c], c < size, blocks in order */               \
HB_INLINE void mhc_sum_parts_##SUF(const T *parts, int64_t nblk, int64_t stride, int64_t size, T *out) { \
    _Pragma("omp for schedule(static)")                                                           \
    for (int64_t c = 0; c < size; c++) {                                                          \
        T acc = 0;                                                                                \
        for (int64_t blk = 0; blk < nblk; blk++) acc += parts[blk * stride + c];                  \
        out[c] = acc;                                                                             \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
/* Two-pass form (the map's reverse in PyTorch between the passes): streams (hb_streams); alpha  \
   (N, n, n+1); g_x (N, d); g_mixed (N, n, d) or NULL; gp (N, nr); coef (N); phi (nr, n d). Out:  \
   g_h (N, n, d), g_phi (nr, n d); dp as for hb_hc_backward. The g_phi partial sums: one per      \
   MHC_TOKBLK tokens, added in order (the same bits at any thread count). */                      \
int hb_mhc_backward_##SUF(const hb_streams *s, int64_t N, int n, int64_t d, const T *alpha,       \
                          const T *g_x, const T *g_mixed, const T *gp, const T *coef,             \
                          const T *phi, int nr, T *g_h, T *g_phi, const hb_depth *dp,             \
                          int nthreads) {                                                         \
    if (n < 1 || n > HB_MAXN) return 1;                                                           \
    const int64_t nd = n * d, size = nr * nd, nblk = (N + MHC_TOKBLK - 1) / MHC_TOKBLK;           \
    T *parts = calloc((size_t)(nblk * size), sizeof(T));                                          \
    if (!parts) return 2;                                                                         \
    int bad = 0;                                                                                  \
    _Pragma("omp parallel num_threads(nthreads)")                                                 \
    {                                                                                             \
        T *buf = malloc(sizeof(T) * MHC_GROUP * nd);                                              \
        if (!buf) { _Pragma("omp atomic write") bad = 1; }                                        \
        _Pragma("omp for schedule(static)")                                                       \
        for (int64_t blk = 0; blk < nblk; blk++) {                                                \
            if (!buf) continue;  /* every thread reaches the loop's barrier */                    \
            int64_t end = (blk + 1) * MHC_TOKBLK < N ? (blk + 1) * MHC_TOKBLK : N;                \
            for (int64_t t0 = blk * MHC_TOKBLK; t0 < end; t0 += MHC_GROUP) {                      \
                int64_t nt = end - t0 < MHC_GROUP ? end - t0 : MHC_GROUP;                         \
                const T *ht[MHC_GROUP];                                                           \
                for (int64_t t = 0; t < nt; t++)                                                  \
                    HB_BY_N_##SUF(n, ht[t] = hc_streams_token_##SUF(nn, s, t0 + t, d, buf + t * nd)); \
                HB_BY_N_##SUF(n, mhc_tokens_##SUF(nn, ht, t0, nt, d, alpha, g_x + t0 * d, g_mixed, \
                    gp + t0 * nr, coef + t0, phi, nr, g_h, parts + blk * size, dp));              \
            }                                                                                     \
        }                                                                                         \
        free(buf);                                                                                \
        mhc_sum_parts_##SUF(parts, nblk, size, size, g_phi);                                      \
    }                                                                                             \
    free(parts);                                                                                  \
    return bad ? 2 : 0;                                                                           \
}                                                                                                 \
                                                                                                  \
/* One-pass form, with the map (res from Sinkhorn, DEFINE_MHC_MAP) reversed in the kernel: per    \
   block of SK_BLOCK tokens, (1) the streams rebuilt (or read), the norm's backward and dL/dalpha  \
   (hc_alpha_token), (2) the map's reverse (sigmoids, gates and the Sinkhorn's block backward) to \
   dL/dz, with gp = dL/dz r and coef, and (3) mhc_tokens, the block's streams still in cache. In: \
   g_out (N, d) = dL/d(the normed branch input), g_mixed or NULL, nm (the norm; its g_w, or NULL), \
   z (N, nr), r (N), logits (N, n, n), alpha and post as the map wrote them, g_post (N, n) or     \
   NULL, a = the three gates, phi (nr, n d). Out: g_h, g_phi, g_par (nr + 3: the gradients of b   \
   and a, in that order), the gain's gradient into nm->g_w. Parameter                             \
   gradients: partial sums per MHC_TOKBLK tokens, added in order. */                              \
int hb_mhc_backward_fused_##SUF(const hb_streams *s, int64_t N, int n, int64_t d, const T *alpha, \
                                const T *g_mixed, const hb_norm *nm, const T *z, const T *r,      \
                                const T *logits, const T *post, const T *g_post, const T *a,      \
                                int iters, T range, T floor_, const T *phi, int nr, T *g_h,       \
                                T *g_phi, T *g_par, const hb_depth *dp, int nthreads) {           \
    if (n < 1 || n > SK_MAXN || nr != 2 * n + n * n || !nm) return 1;                             \
    const int64_t nd = n * d, nblk = (N + MHC_TOKBLK - 1) / MHC_TOKBLK;                           \
    const int64_t stride = nr * nd + d + nr + 3;  /* per block: g_phi | g_w | g_par */            \
    const int nn2 = n * n;                                                                        \
    T *parts = calloc((size_t)(nblk * stride), sizeof(T));                                        \
    if (!parts) return 2;                                                                         \
    int bad = 0;                                                                                  \
    _Pragma("omp parallel num_threads(nthreads)")                                                 \
    {                                                                                             \
        /* streams, dL/dx, dL/dalpha, gp, coef of a block; norm scratch; the Sinkhorn's rounds */ \
        const int64_t scratch = SK_BLOCK * (nd + d + n * (n + 1) + nr + 1) + 2 * d;               \
        T *buf = malloc(sizeof(T) * scratch);                                                     \
        sk_vec_##SUF *u, *v;                                                                      \
        sk_state_##SUF *st;                                                                       \
        int ok = mhc_sk_alloc_##SUF(iters, &u, &v, &st) && buf;                                   \
        if (!ok) { _Pragma("omp atomic write") bad = 2; }                                         \
        T *hb = buf, *gxb = hb + SK_BLOCK * nd, *gab = gxb + SK_BLOCK * d;                        \
        T *gpb = gab + SK_BLOCK * n * (n + 1), *cb = gpb + SK_BLOCK * nr, *scr = cb + SK_BLOCK;   \
        _Pragma("omp for schedule(static)")                                                       \
        for (int64_t blk = 0; blk < nblk; blk++) {                                                \
            if (!ok) continue;  /* every thread reaches the loop's barrier */                     \
            T *pphi = parts + blk * stride, *pw = pphi + nr * nd, *ppar = pw + d;                 \
            int64_t end = (blk + 1) * MHC_TOKBLK < N ? (blk + 1) * MHC_TOKBLK : N;                \
            for (int64_t t0 = blk * MHC_TOKBLK; t0 < end; t0 += SK_BLOCK) {                       \
                const int nb = end - t0 < SK_BLOCK ? (int)(end - t0) : SK_BLOCK;                  \
                const T *ht[SK_BLOCK];                                                            \
                for (int b = 0; b < nb; b++) {  /* (1) */                                         \
                    const int64_t tok = t0 + b;                                                   \
                    T *ga = gab + b * n * (n + 1);                                                \
                    const T *gx;                                                                  \
                    HB_BY_N_##SUF(n,                                                              \
                        ht[b] = hc_streams_token_##SUF(nn, s, tok, d, hb + b * nd);               \
                        gx = hc_alpha_token_##SUF(nn, ht[b], tok, d, alpha + tok * n * (n + 1),   \
                                                  NULL, g_mixed ? g_mixed + tok * nd : NULL, nm,  \
                                                  nm->g_w ? pw : NULL, scr, ga));                 \
                    memcpy(gxb + b * d, gx, sizeof(T) * d);                                       \
                }                                                                                 \
                /* (2) dL/dres[j, i] = dL/dalpha[i, 1 + j] -> dL/dlogits (tokens last) */         \
                sk_mat_##SUF zt, gt, gl;                                                          \
                sk_gather_##SUF(logits, n, t0, nb, zt);                                           \
                for (int i = 0; i < n; i++)                                                       \
                    for (int j = 0; j < n; j++)                                                   \
                        for (int b = 0; b < SK_BLOCK; b++)                                        \
                            gt[j * n + i][b] = b < nb ? gab[(b * n + i) * (n + 1) + 1 + j] : 0;   \
                sk_backward_block_##SUF(n, iters, range, floor_, zt, gt, u, v, st, gl);           \
                for (int b = 0; b < nb; b++) {                                                    \
                    const int64_t tok = t0 + b;                                                   \
                    const T *zk = z + tok * nr;                                                   \
                    T *gz = gpb + b * nr;  /* dL/dz here, then scaled to gp */                    \
                    for (int i = 0; i < n; i++) {                                                 \
                        T pre = alpha[(tok * n + i) * (n + 1)];                                   \
                        T sp = gab[(b * n + i) * (n + 1)] * pre * (1 - pre);                      \
                        T po = post[tok * n + i], su = g_post ? g_post[tok * n + i] * po * (1 - po / 2) : 0; \
                        gz[i] = a[0] * sp;                                                        \
                        gz[n + i] = a[1] * su;                                                    \
                        ppar[i] += sp;                                                            \
                        ppar[n + i] += su;                                                        \
                        ppar[nr] += sp * zk[i];                                                   \
                        ppar[nr + 1] += su * zk[n + i];                                           \
                    }                                                                             \
                    for (int k = 0; k < nn2; k++) {                                               \
                        T g = gl[k][b];                                                           \
                        gz[2 * n + k] = a[2] * g;                                                 \
                        ppar[2 * n + k] += g;                                                     \
                        ppar[nr + 2] += g * zk[2 * n + k];                                        \
                    }                                                                             \
                    T cs = 0, rt = r[tok];                                                        \
                    for (int k = 0; k < nr; k++) cs += gz[k] * zk[k];                             \
                    cb[b] = cs * rt * rt / (T)nd;                                                 \
                    for (int k = 0; k < nr; k++) gz[k] *= rt;                                     \
                }                                                                                 \
                HB_BY_N_##SUF(n, mhc_tokens_##SUF(nn, ht, t0, nb, d, alpha, gxb, g_mixed, gpb, cb, \
                                                  phi, nr, g_h, pphi, dp));  /* (3) */            \
            }                                                                                     \
        }                                                                                         \
        free(buf); free(u); free(v); free(st);                                                    \
        mhc_sum_parts_##SUF(parts, nblk, stride, nr * nd, g_phi);                                 \
        if (nm->g_w) mhc_sum_parts_##SUF(parts + nr * nd, nblk, stride, d, (T *)nm->g_w);          \
        mhc_sum_parts_##SUF(parts + nr * nd + d, nblk, stride, nr + 3, g_par);                    \
    }                                                                                             \
    free(parts);                                                                                  \
    return bad;                                                                                   \
}

DEFINE_MHC(float, f32, hb_vf32, HB_VB / 4, sqrtf, expf)
DEFINE_MHC(double, f64, hb_vf64, HB_VB / 8, sqrt, exp)
