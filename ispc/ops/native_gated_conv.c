/* Indirect-GEMM gated convolution for the CPU (see native.py, which builds and calls this file).
 *
 * For each instance n the kernel computes conv2d(x[n] restricted to its kept channels idx[n]) with
 * the matching slices of the weight, reading the kept channels and their weights by index inside
 * the GEMM: no full im2col matrix, no per-instance Python, one call per layer for the whole batch.
 *
 * Weights are packed once (ispc_pack_weight) into panels [co_block][Cin][taps][BLOCK] so that the
 * slice of one input channel for one block of output channels is one contiguous run.
 *
 * Two orientations of the same register-blocked microkernel (MR broadcast rows x NR vector lanes):
 *   ORIENT_PIX (large feature maps): vector lanes run over output positions. The kept channels are
 *     first copied into zero-padded planes, one per stride phase some tap reads (1x1 unpadded
 *     layers read the input itself), so that for every tap the NR positions of a block are NR
 *     consecutive floats, loaded straight from the planes; the kept channels' weight runs are
 *     copied next to each other (weights are small where this orientation is used).
 *   ORIENT_CO (small feature maps, many channels): vector lanes run over output channels; positions
 *     are packed exactly (no padded columns are computed), MR at a time, for a chunk of instances.
 *   ORIENT_CL (channel lanes from channels-last panels): as ORIENT_CO, but each instance's kept
 *     channels are first transposed into one zero-padded channels-last copy (H + 2ph) x (W + 2pw) x K,
 *     and every tap of a block of positions broadcasts from it in place: a copy the size of the kept
 *     input, where ORIENT_CO's exact panels are T times that (im2col). Faster than both on ResNet's
 *     and VGG's 3x3 layers up to 28x28 (examples/kernel_speed.py --native), batch 1 and 32.
 *   ORIENT_FULL (the kernel covers the whole unpadded input: one output position, e.g. a classifier's
 *     Linear seen as a convolution): vector lanes run over output channels, and each kept channel's
 *     weights are read once per call for the whole batch, every instance that keeps the channel
 *     updated while they are in cache. Memory-bound at batch 1, so skipped channels are bytes not read.
 * Parallelism uses OpenMP, which is the runtime PyTorch itself uses (the same libgomp is loaded).
 *
 * ispc_gated_conv takes the kept channels as indices; ispc_gated_conv_select (the end of this file)
 * computes the saliencies and selects the channels itself first, so a gated layer is one call.
 *
 * Channels-last maps (the last sections): ispc_conv_nhwc is a gated or dense convolution from an
 * NHWC input to an NHWC output, output channels in vector lanes, kept channels read in place by
 * index, the epilogue (bias, residual, ReLU/ReLU6) from the accumulators, saliency sums handed
 * from a layer to the next (ispc_sums_t); ispc_dwconv3x3_nhwc is MobileNet's depthwise 3x3.
 */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <omp.h>
#include <unistd.h>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

/* Register blocks, per orientation: MR broadcast rows x NV vectors of VW lanes (NR = NV * VW).
 * With AVX-512 (32 registers of 16 floats) 16-20 accumulators; with AVX2 (16 of 8) the classic 6x16.
 * Chosen by timing ResNet/VGG layer shapes (examples/kernel_speed.py --native); the rows of the
 * channel-lane kernel are output positions, and 10 of them tile 7x7 and 14x14 maps almost exactly. */
#if defined(__AVX512F__)
#define VW 16
#define PIX_MR 8
#define PIX_NV 2
#ifndef CO_MR  /* -DCO_MR=n: other channel-lane tiles for A/B (the packed weights do not change) */
#define CO_MR 10
#endif
#define CO_NV 2
#define FULL_NV 16
#else
#define VW 8
#define PIX_MR 6
#define PIX_NV 2
#ifndef CO_MR
#define CO_MR 6
#endif
#define CO_NV 2
#define FULL_NV 8
#endif
#define PIX_NR (PIX_NV * VW)
#if PIX_NV != 2
#error "store_run assumes two vectors per row of the pixel-lane kernel"
#endif
#define CO_NR (CO_NV * VW)
#if CO_MR > 16
#error "co_tile_out writes a tile column of positions with one 16-lane masked store"
#endif

#define ORIENT_PIX 0
#define ORIENT_CO 1
#define ORIENT_FULL 2
#define ORIENT_CL 3
/* ORIENT_FULL: output channels per weight tile, whose accumulators stay in registers */
#define FULL_CT (FULL_NV * VW)

typedef float vf __attribute__((vector_size(VW * 4)));
static inline vf ld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* dst[a..b) = lanes a..b of the two vectors (v0, v1) (dst indexed by lane). By value: taking the
 * accumulators' address would keep them out of registers in the microkernel. */
#if defined(__AVX512F__)
/* lanes [a, b) of one vector, clipped to its VW lanes (the second vector of a run: a - VW, b - VW) */
static inline __mmask16 lane_mask(int a, int b) {
    a = a < 0 ? 0 : a;
    b = b > VW ? VW : b;
    return a < b ? (__mmask16)(((1u << b) - 1u) & ~((1u << a) - 1u)) : 0;
}
#endif

static inline void store_run(float *dst, vf v0, vf v1, int a, int b) {
#if defined(__AVX512F__)  /* masked stores: no fault on masked-off lanes */
    _mm512_mask_storeu_ps(dst, lane_mask(a, b), (__m512)v0);
    _mm512_mask_storeu_ps(dst + VW, lane_mask(a - VW, b - VW), (__m512)v1);
#else
    float tile[2 * VW];
    st(tile, v0);
    st(tile + VW, v1);
    memcpy(dst + a, tile + a, sizeof(float) * (b - a));
#endif
}

typedef int32_t vi __attribute__((vector_size(VW * 4)));

/* The fused epilogue of a gated layer: out = clamp(conv + bias + res, lo, hi), where res (NULL:
 * none) has the output's shape and the clamp is an activation (ReLU: [0, inf), ReLU6: [0, 6]).
 * NaN passes through, as in torch.relu and torch.clamp. on == 0: plain conv + bias. */
typedef struct {
    const float *res;
    float lo, hi;
    int on;
    int stream;  /* the layer's output exceeds the caches: whole aligned vectors bypass them */
} epi_t;

static inline float epi1(const epi_t *e, float v, int64_t m) {
    if (e->res) v += e->res[m];
    return v < e->lo ? e->lo : v > e->hi ? e->hi : v;
}

static inline vf clampv(vf v, float lo, float hi) {
    vf l = (vf){0} + lo, h = (vf){0} + hi;
    vi m = v < l;
    v = (vf)(((vi)v & ~m) | ((vi)l & m));
    m = v > h;
    return (vf)(((vi)v & ~m) | ((vi)h & m));
}

/* store_run with the epilogue: res is indexed like dst (lanes a..b of it are read) */
static inline void store_run_epi(float *dst, const float *res, vf v0, vf v1, int a, int b, float lo,
                                 float hi) {
#if defined(__AVX512F__)
    if (res) {  /* masked loads: no fault on masked-off lanes */
        v0 += (vf)_mm512_maskz_loadu_ps(lane_mask(a, b), res);
        v1 += (vf)_mm512_maskz_loadu_ps(lane_mask(a - VW, b - VW), res + VW);
    }
    store_run(dst, clampv(v0, lo, hi), clampv(v1, lo, hi), a, b);
#else
    float tile[2 * VW];
    st(tile, v0);
    st(tile + VW, v1);
    for (int l = a; l < b; l++) {
        float v = tile[l] + (res ? res[l] : 0.0f);
        dst[l] = v < lo ? lo : v > hi ? hi : v;
    }
#endif
}

/* The microkernel's shape: rows (broadcast operand) and lanes (vector operand) of an orientation. */
int ispc_block_rows(int orient) {
    return orient == ORIENT_PIX ? PIX_MR : orient == ORIENT_CO || orient == ORIENT_CL ? CO_MR : 1;
}
int ispc_block_lanes(int orient) {
    return orient == ORIENT_PIX ? PIX_NR : orient == ORIENT_CO || orient == ORIENT_CL ? CO_NR : FULL_CT;
}
/* The weight panels' block of output channels. */
static int64_t co_block(int orient) {
    return orient == ORIENT_PIX ? PIX_MR : orient == ORIENT_CO || orient == ORIENT_CL ? CO_NR : FULL_CT;
}

/* a layer's output size (bytes, whole batch) from which its stores bypass the caches; 0: never */
#ifndef STREAM_BYTES
#define STREAM_BYTES (16 << 20)
#endif

#define MAX_PHASES 64  /* strides up to 8x8 (native.py routes larger ones to the PyTorch kernels) */

typedef struct {
    int64_t C, H, W, Cout, kh, kw, sh, sw, ph, pw, dh, dw;
    int64_t Ho, Wo, T, Hq, Wq, NP, PB, pitch;
    /* ORIENT_PIX: the stride phases some tap reads get a plane each (slot), the others none; a 1x1,
     * stride-1, unpadded layer reads the input itself (direct: no planes at all) */
    int64_t nslots, direct, slot[MAX_PHASES];
} geom_t;

/* ORIENT_PIX: where tap (r, q) of flattened output position p reads: plane[p + tap_offset] */
static int64_t tap_offset(const geom_t *g, int64_t r, int64_t q) {
    int64_t a = (r * g->dh) % g->sh, b = (q * g->dw) % g->sw;
    return g->slot[a * g->sw + b] * g->Hq * g->Wq + ((r * g->dh) / g->sh) * g->Wq + (q * g->dw) / g->sw;
}

/* output length of a convolution along one axis of n inputs */
static inline int64_t conv_out(int64_t n, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
    return (n + 2 * pad - dil * (k - 1) - 1) / stride + 1;
}

static void geometry(geom_t *g, int64_t C, int64_t H, int64_t W, int64_t Cout, int64_t kh, int64_t kw,
                     int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int orient) {
    g->C = C; g->H = H; g->W = W; g->Cout = Cout; g->kh = kh; g->kw = kw;
    g->sh = sh; g->sw = sw; g->ph = ph; g->pw = pw; g->dh = dh; g->dw = dw;
    int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
    g->Ho = conv_out(H, kh, sh, ph, dh);
    g->Wo = conv_out(W, kw, sw, pw, dw);
    g->T = kh * kw;
    g->Hq = (Hp + sh - 1) / sh;
    g->Wq = (Wp + sw - 1) / sw;
    if (orient == ORIENT_PIX) {
        g->direct = kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0;
        for (int64_t i = 0; i < sh * sw && i < MAX_PHASES; i++) g->slot[i] = -1;
        g->nslots = 0;
        for (int64_t r = 0; r < kh; r++)
            for (int64_t q = 0; q < kw; q++) {
                int64_t ph_ = ((r * dh) % sh) * sw + (q * dw) % sw;
                if (g->slot[ph_] < 0) g->slot[ph_] = g->nslots++;
            }
        /* flattened output positions p = oh * Wq + ow, including Wq - Wo columns of waste */
        g->NP = g->Ho * g->Wq;
        g->PB = (g->NP + PIX_NR - 1) / PIX_NR;
        int64_t maxoff = 0;
        for (int64_t r = 0; r < kh; r++)
            for (int64_t q = 0; q < kw; q++) {
                int64_t o = tap_offset(g, r, q);
                if (o > maxoff) maxoff = o;
            }
        int64_t planes = g->nslots * g->Hq * g->Wq, need = maxoff + g->PB * PIX_NR;
        g->pitch = g->direct ? 0 : need > planes ? need : planes;
    } else {
        g->NP = g->Ho * g->Wo;
        g->PB = (g->NP + CO_MR - 1) / CO_MR;
        g->pitch = 0;
    }
}

/* ORIENT_PIX: kept channels per chunk of the reduction, sized so that the plane rows one block of
 * positions reads stay in L1 (measured: 4096-65536 floats all within a few percent) */
static int64_t kchunk(int64_t T) {
    int64_t kc = 16384 / (T * PIX_NR);
    return kc > 0 ? kc : 1;
}

/* ORIENT_PIX, direct: the last, partial block of positions of each kept channel, zero-padded to NR
 * (reading it from the input itself would run past the tensor's end) */
static int64_t pix_tail_floats(const geom_t *g, int64_t kmax, int64_t threads) {
    return g->direct ? threads * kmax * PIX_NR : 0;
}

/* ORIENT_PIX workspace: [planes: kmax * pitch][partial sums: threads * CoB * MR * NR]
 * [kept weights: CoB * kmax * T * MR][direct tails][position map: PB * NR int32] */
static int64_t pix_table_offset(const geom_t *g, int64_t kmax, int64_t threads) {
    int64_t rows = (g->Cout + PIX_MR - 1) / PIX_MR * PIX_MR;
    return kmax * g->pitch + threads * rows * PIX_NR + rows * kmax * g->T + pix_tail_floats(g, kmax, threads);
}

static int64_t co_table_floats(const geom_t *g) { return g->T * g->PB * CO_MR + g->T * g->PB; }

/* ORIENT_FULL: floats of weights per channel block, which every instance passes over from L2 */
#ifndef FULL_BLOCK_FLOATS
#define FULL_BLOCK_FLOATS (8 << 10)
#endif
static int64_t co_chunk(const geom_t *g, int64_t kmax, int64_t N);
/* ORIENT_CL: one instance's channels-last copy, (H + 2ph) x (W + 2pw) x kmax floats */
static int64_t cl_per(const geom_t *g, int64_t kmax) {
    return (g->H + 2 * g->ph) * (g->W + 2 * g->pw) * kmax;
}
static int64_t cl_chunk(const geom_t *g, int64_t kmax, int64_t N);

/* Workspace (floats) one call needs, for instances keeping at most kmax channels. */
int64_t ispc_workspace(int64_t C, int64_t H, int64_t W, int64_t Cout, int64_t kh, int64_t kw, int64_t sh,
                       int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int orient,
                       int64_t kmax, int64_t threads, int64_t N) {
    geom_t g;
    geometry(&g, C, H, W, Cout, kh, kw, sh, sw, ph, pw, dh, dw, orient);
    if (orient == ORIENT_PIX)  /* planes, partial sums per thread, kept weights, position map */
        return pix_table_offset(&g, kmax, threads) + g.PB * PIX_NR + 64;
    if (orient == ORIENT_FULL)  /* each thread's accumulators, then its row cursors (int64) */
        return threads * N * (FULL_CT + 2) + 64;
    if (orient == ORIENT_CL)  /* position table (int32), one chunk's copies, partial sums */
        return g.PB * CO_MR + cl_chunk(&g, kmax, N) * cl_per(&g, kmax)
               + threads * g.PB * CO_MR * CO_NR + 64;
    /* the source-offset and run tables (int32, stored in float slots), then the packed position
     * panels of one chunk of instances */
    return co_table_floats(&g) + co_chunk(&g, kmax, N) * kmax * g.T * g.PB * CO_MR
           + threads * g.PB * CO_MR * CO_NR + 64;
}

/* Pack weight (Cout, C, kh, kw) into [ceil(Cout/B)][C][T][B] (B = co_block(orient)), zero rows past
 * Cout: the slice of one input channel for one block of output channels is one contiguous run. */
int64_t ispc_packed_size(int64_t Cout, int64_t C, int64_t T, int orient) {
    int64_t B = co_block(orient);
    return (Cout + B - 1) / B * C * T * B;
}

void ispc_pack_weight(const float *w, int64_t Cout, int64_t C, int64_t T, int orient, float *dst) {
    int64_t B = co_block(orient), CoB = (Cout + B - 1) / B;
    memset(dst, 0, sizeof(float) * CoB * C * T * B);
    for (int64_t co = 0; co < Cout; co++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t t = 0; t < T; t++)
                dst[(((co / B) * C + c) * T + t) * B + co % B] = w[(co * C + c) * T + t];
}

/* acc[MR_][NV_] = INIT + sum over kept channels k in [K0, K1) and taps t of
 * bc[k][t][i] * vec[k][t][j]: broadcast operand BC_K (MR_ floats per tap), vector operand VEC_K at
 * VEC_T for tap t. One operand is addressed by kept channel id (the weights), the other by position. */
#define MICROKERNEL(MR_, NV_, K0, K1, INIT, BC_K, VEC_K, VEC_T)                              \
    vf acc[MR_][NV_];                                                                        \
    for (int i = 0; i < MR_; i++)                                                            \
        for (int j = 0; j < NV_; j++) acc[i][j] = (INIT) ? ld((INIT) + (i * NV_ + j) * VW) : (vf){0}; \
    for (int64_t k = (K0); k < (K1); k++) {                                                  \
        const float *bk = (BC_K), *vk = (VEC_K);                                             \
        for (int64_t t = 0; t < T; t++) {                                                    \
            vf v[NV_];                                                                       \
            for (int j = 0; j < NV_; j++) v[j] = ld(vk + (VEC_T) + j * VW);                  \
            const float *b = bk + t * MR_;                                                   \
            for (int i = 0; i < MR_; i++)                                                    \
                for (int j = 0; j < NV_; j++) acc[i][j] += b[i] * v[j];                      \
        }                                                                                    \
    }

/* Copy the kept channels of one instance into zero-padded, stride-phase-split planes: tap (r, q) of
 * output position p = oh * Wq + ow then reads plane[p + off(r, q)]. Threads split the work by plane
 * row, as the compute loop splits output rows, so that each core mostly reads rows it wrote. */
static void pack_planes(const geom_t *g, const float *x, const int64_t *idx, int64_t K, float *planes) {
    const int64_t HW = g->H * g->W, plane = g->Hq * g->Wq, phases = g->nslots;
    #pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < g->Hq; i++)
        for (int64_t k = 0; k < K; k++) {
            const float *xc = x + idx[k] * HW;
            for (int64_t a = 0; a < g->sh; a++) {
                const int64_t r = i * g->sh + a - g->ph;
                for (int64_t b = 0; b < g->sw; b++) {
                    if (g->slot[a * g->sw + b] < 0) continue;  /* no tap reads this phase */
                    float *d = planes + k * g->pitch + g->slot[a * g->sw + b] * plane + i * g->Wq;
                    if (r < 0 || r >= g->H) { memset(d, 0, sizeof(float) * g->Wq); continue; }
                    const float *src = xc + r * g->W;
                    if (g->sw == 1) {
                        memset(d, 0, sizeof(float) * g->pw);
                        memcpy(d + g->pw, src, sizeof(float) * g->W);
                        memset(d + g->pw + g->W, 0, sizeof(float) * (g->Wq - g->pw - g->W));
                    } else {
                        for (int64_t j = 0; j < g->Wq; j++) {
                            int64_t c = j * g->sw + b - g->pw;
                            d[j] = (c >= 0 && c < g->W) ? src[c] : 0.0f;
                        }
                    }
                }
            }
        }
    /* the slack after the planes is only read for discarded positions; keep it finite */
    #pragma omp for schedule(static)
    for (int64_t k = 0; k < K; k++)
        memset(planes + k * g->pitch + phases * plane, 0, sizeof(float) * (g->pitch - phases * plane));
}

/* Vector lanes over output positions: blocks of PIX_NR consecutive flattened positions, loaded for
 * every tap straight from the planes; blocks of PIX_MR output channels broadcast from the weights. */
static void conv_pix(const geom_t *g, const float *x, const int64_t *idx, int64_t K, const float *wpack,
                     const float *bias, float *out, float *ws, int64_t kmax, int64_t threads,
                     const int64_t *offs, const int32_t *omap, const epi_t *e) {
    const int64_t T = g->T, CoB = (g->Cout + PIX_MR - 1) / PIX_MR, HoWo = g->Ho * g->Wo;
    const int64_t KC = kchunk(g->T);
    float *planes = ws;
    float *cbufs = planes + kmax * g->pitch, *cbufs_end = cbufs + threads * CoB * PIX_MR * PIX_NR;
    float *cbuf = cbufs + (int64_t)omp_get_thread_num() * CoB * PIX_MR * PIX_NR;
    /* groups of output-channel blocks whose kept weights fit in half of L2: every position block is
     * swept once per group, so the weights are read from memory once, not once per position block */
    int64_t G = (128 * 1024) / (K * T * PIX_MR);
    if (G < 1) G = 1;
    const int64_t HW = g->H * g->W;
    float *tail = cbufs_end + CoB * PIX_MR * kmax * T + (int64_t)omp_get_thread_num() * kmax * PIX_NR;
    if (!g->direct) pack_planes(g, x, idx, K, planes);  /* ends with a barrier */
    /* the kept channels' weight runs, copied next to each other: the microkernel then streams one
     * contiguous panel per output-channel block (~12% faster on ResNet/VGG layers than jumping
     * between the runs in the full packed weight) */
    float *wk = cbufs_end;
    #pragma omp for schedule(static)
    for (int64_t cob = 0; cob < CoB; cob++)
        for (int64_t k = 0; k < K; k++)
            memcpy(wk + (cob * K + k) * T * PIX_MR, wpack + (cob * g->C + idx[k]) * T * PIX_MR,
                   sizeof(float) * T * PIX_MR);
    for (int64_t cg = 0; cg < CoB; cg += G) {
    const int64_t cg1 = cg + G < CoB ? cg + G : CoB;
    #pragma omp for schedule(static) nowait
    for (int64_t pb = 0; pb < g->PB; pb++) {
        const int64_t p0 = pb * PIX_NR;
        /* where each kept channel's lanes for this block start */
        const float *vp[K];
        if (!g->direct) {
            for (int64_t k = 0; k < K; k++) vp[k] = planes + k * g->pitch + p0;
        } else if (p0 + PIX_NR <= g->NP) {
            for (int64_t k = 0; k < K; k++) vp[k] = x + idx[k] * HW + p0;
        } else {
            for (int64_t k = 0; k < K; k++) {
                memset(tail + k * PIX_NR, 0, sizeof(float) * PIX_NR);
                memcpy(tail + k * PIX_NR, x + idx[k] * HW + p0, sizeof(float) * (g->NP - p0));
                vp[k] = tail + k * PIX_NR;
            }
        }
        /* the block's valid positions as runs [lane a, lane b) -> output offset m (at most
         * ceil(NR / Wo) + 1 runs: the block crosses output rows and skips padded columns) */
        int nruns = 0, ra[PIX_NR], rb[PIX_NR];
        int32_t rm[PIX_NR];
        for (int j = 0; j < PIX_NR;) {
            int32_t m = omap[p0 + j];
            if (m < 0) { j++; continue; }
            int run = 1;
            while (j + run < PIX_NR && omap[p0 + j + run] == m + run) run++;
            ra[nruns] = j; rb[nruns] = j + run; rm[nruns++] = m;
            j += run;
        }
        /* chunks of KC channels keep the planes' rows this block reads in L1 across the
         * output-channel blocks; partial sums of all but the last chunk wait in cbuf */
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int64_t k1 = k0 + KC < K ? k0 + KC : K;
            for (int64_t cob = cg; cob < cg1; cob++) {
                const float *wb = wk + cob * K * T * PIX_MR;
                float *cb = cbuf + cob * PIX_MR * PIX_NR;
                MICROKERNEL(PIX_MR, PIX_NV, k0, k1, k0 ? cb : (const float *)0, wb + k * T * PIX_MR,
                            vp[k], offs[t])
                if (k1 < K) {
                    for (int i = 0; i < PIX_MR; i++)
                        for (int j = 0; j < PIX_NV; j++) st(cb + (i * PIX_NV + j) * VW, acc[i][j]);
                    continue;
                }
                int rows = g->Cout - cob * PIX_MR < PIX_MR ? (int)(g->Cout - cob * PIX_MR) : PIX_MR;
                for (int i = 0; i < rows; i++) {
                    int64_t co = cob * PIX_MR + i;
                    float *orow = out + co * HoWo;
                    for (int j = 0; j < PIX_NV; j++) acc[i][j] += bias[co];
                    if (e->on) {
                        const float *rrow = e->res ? e->res + co * HoWo : 0;
                        for (int r = 0; r < nruns; r++)
                            store_run_epi(orow + rm[r] - ra[r], rrow ? rrow + rm[r] - ra[r] : 0,
                                          acc[i][0], acc[i][1], ra[r], rb[r], e->lo, e->hi);
                        continue;
                    }
#if defined(__AVX512F__)
                    if (e->stream && nruns == 1 && ra[0] == 0 && rb[0] == PIX_NR
                        && ((uintptr_t)(orow + rm[0]) & 63) == 0) {
                        _mm512_stream_ps(orow + rm[0], (__m512)acc[i][0]);
                        _mm512_stream_ps(orow + rm[0] + VW, (__m512)acc[i][1]);
                        continue;
                    }
#endif
                    for (int r = 0; r < nruns; r++)
                        store_run(orow + rm[r] - ra[r], acc[i][0], acc[i][1], ra[r], rb[r]);
                }
            }
        }
    }
    }  /* groups write disjoint output channels: no barrier between them */
#if defined(__AVX512F__)
    if (e->stream) _mm_sfence();  /* streamed stores visible before the barrier */
#endif
    #pragma omp barrier
}

/* ORIENT_CO: instances packed and computed together, so that each block of output channels'
 * weights is read from memory once per chunk of instances rather than once per instance (at batch
 * 32 the 7x7 layers' weights would otherwise stream from memory 32 times); chunks bound the
 * packed panels to ~8 MB. */
static int64_t co_chunk(const geom_t *g, int64_t kmax, int64_t N) {
    int64_t per = kmax * g->T * g->PB * CO_MR, nb = per > 0 ? (2 << 20) / per : N;
    return nb < 1 ? 1 : nb > N ? N : nb;
}

/* Channel lanes: one finished CO_MR x CO_NR tile (positions x output channels) plus bias into
 * the instance's NCHW output, clipped at the last channel and position. Each output channel's run
 * of positions is contiguous in the output: with AVX-512 it is gathered from the tile's column and
 * written with one masked store (scalar stores made this most of a 1x1 layer's time when its
 * reduction is short: 256->1024 at 14x14, half kept, 0.37 -> 0.16 ms without them). */
static void co_tile_out(const geom_t *g, const float tile[CO_MR][CO_NR], const float *bias, int64_t cob,
                        int64_t pb, float *on, const epi_t *e) {
    const int64_t HoWo = g->Ho * g->Wo, m0 = pb * CO_MR;
#if defined(__AVX512F__) && !defined(SCALAR_TILE_OUT)  /* -DSCALAR_TILE_OUT: the A/B baseline */
    const int64_t nv = HoWo - m0 < CO_MR ? HoWo - m0 : CO_MR;
    const __mmask16 mk = (__mmask16)((1u << nv) - 1u);
    const __m512i rows = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(CO_NR));
    for (int j = 0; j < CO_NR; j++) {
        const int64_t co = cob * CO_NR + j;
        if (co >= g->Cout) break;
        vf v = (vf)_mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk, rows, &tile[0][j], 4) + bias[co];
        if (e->on) {
            if (e->res) v += (vf)_mm512_maskz_loadu_ps(mk, e->res + co * HoWo + m0);
            v = clampv(v, e->lo, e->hi);
        }
        _mm512_mask_storeu_ps(on + co * HoWo + m0, mk, (__m512)v);
    }
#else
    for (int j = 0; j < CO_NR; j++) {
        int64_t co = cob * CO_NR + j;
        if (co >= g->Cout) break;
        float bj = bias[co];
        for (int i = 0; i < CO_MR; i++) {
            int64_t m = m0 + i;
            if (m < HoWo)
                on[co * HoWo + m] = e->on ? epi1(e, tile[i][j] + bj, co * HoWo + m) : tile[i][j] + bj;
        }
    }
#endif
}

/* A channel-lane tile after a chunk of its reduction: the partial sums into cb while kept channels
 * remain (more), else the finished tile into the output. */
static inline void co_tile_done(const geom_t *g, vf acc[CO_MR][CO_NV], int more, float *cb,
                                const float *bias, int64_t cob, int64_t pb, float *on, const epi_t *e) {
    if (more) {
        for (int i = 0; i < CO_MR; i++)
            for (int j = 0; j < CO_NV; j++) st(cb + (i * CO_NV + j) * VW, acc[i][j]);
        return;
    }
    float tile[CO_MR][CO_NR];
    for (int i = 0; i < CO_MR; i++)
        for (int j = 0; j < CO_NV; j++) st(&tile[i][j * VW], acc[i][j]);
    co_tile_out(g, tile, bias, cob, pb, on, e);
}

/* Vector lanes over output channels: blocks of CO_NR output channels from the weight panels; CO_MR
 * output positions at a time broadcast from panels packed exactly (no padded positions computed).
 * Instances n0..n1 at once; table: the (position, tap) -> input offset table and its run flags. */
static void conv_co(const geom_t *g, const float *x, int64_t n0, int64_t n1, const int64_t *idx,
                    int64_t kstride, const int64_t *counts, const float *wpack, const float *bias,
                    float *out, float *panels, int64_t kmax, const int32_t *src, const epi_t *e0) {
    const int64_t T = g->T, CoB = (g->Cout + CO_NR - 1) / CO_NR, HoWo = g->Ho * g->Wo, HW = g->H * g->W;
    const int64_t per = kmax * T * g->PB * CO_MR;  /* one instance's panels: [PB][K][T][CO_MR] */
    const int32_t *runs = src + g->PB * T * CO_MR;
    #pragma omp for collapse(2) schedule(static)
    for (int64_t n = n0; n < n1; n++)
        for (int64_t pb = 0; pb < g->PB; pb++) {
            const int64_t K = counts ? counts[n] : kstride, *in = idx + n * kstride;
            const float *xn = x + n * g->C * HW;
            float *dst = panels + (n - n0) * per + pb * K * T * CO_MR;
            const int32_t *sp = src + pb * T * CO_MR, *rp = runs + pb * T;
            for (int64_t k = 0; k < K; k++) {
                const float *xc = xn + in[k] * HW;
                for (int64_t t = 0; t < T; t++, dst += CO_MR) {
                    const int32_t *o = sp + t * CO_MR;
                    if (rp[t]) { memcpy(dst, xc + o[0], sizeof(float) * CO_MR); continue; }
                    for (int i = 0; i < CO_MR; i++) dst[i] = o[i] >= 0 ? xc[o[i]] : 0.0f;
                }
            }
        }
    /* with enough (output-channel block, instance) pairs for every thread, each pair sweeps its
     * positions once per chunk of kept channels, so the chunk's weights stay in L1 across position
     * blocks (batch 1, 7x7x512: ~15% faster); otherwise every (block, instance, positions) tile
     * runs the whole reduction, for parallelism */
    if (CoB * (n1 - n0) >= 4 * (int64_t)omp_get_num_threads()) {
    const int64_t KCc = 16384 / (T * CO_NR) > 0 ? 16384 / (T * CO_NR) : 1;
    float *cbuf = panels + (n1 - n0) * per + (int64_t)omp_get_thread_num() * g->PB * CO_MR * CO_NR;
    #pragma omp for collapse(2) schedule(static)
    for (int64_t cob = 0; cob < CoB; cob++)
        for (int64_t n = n0; n < n1; n++) {
            const int64_t K = counts ? counts[n] : kstride, *in = idx + n * kstride;
            const float *wb = wpack + cob * g->C * T * CO_NR;
            float *on = out + n * g->Cout * HoWo;
            for (int64_t k0 = 0; k0 < K || (K == 0 && k0 == 0); k0 += KCc) {
                const int64_t k1 = k0 + KCc < K ? k0 + KCc : K;
                for (int64_t pb = 0; pb < g->PB; pb++) {
                    float *cb = cbuf + pb * CO_MR * CO_NR;
                    const float *pp = panels + (n - n0) * per + pb * K * T * CO_MR;
                    MICROKERNEL(CO_MR, CO_NV, k0, k1, k0 ? cb : (const float *)0, pp + k * T * CO_MR,
                                wb + in[k] * T * CO_NR, t * CO_NR)
                    epi_t e = *e0;
                    if (e.res) e.res += n * g->Cout * HoWo;
                    co_tile_done(g, acc, k1 < K, cb, bias, cob, pb, on, &e);
                }
            }
        }
    return;
    }
    #pragma omp for collapse(3) schedule(static)
    for (int64_t cob = 0; cob < CoB; cob++)
        for (int64_t n = n0; n < n1; n++)
            for (int64_t pb = 0; pb < g->PB; pb++) {
                const int64_t K = counts ? counts[n] : kstride, *in = idx + n * kstride;
                const float *wb = wpack + cob * g->C * T * CO_NR;
                const float *pp = panels + (n - n0) * per + pb * K * T * CO_MR;
                MICROKERNEL(CO_MR, CO_NV, 0, K, (const float *)0, pp + k * T * CO_MR,
                            wb + in[k] * T * CO_NR, t * CO_NR)
                epi_t e = *e0;
                if (e.res) e.res += n * g->Cout * HoWo;
                co_tile_done(g, acc, 0, 0, bias, cob, pb, out + n * g->Cout * HoWo, &e);
            }
}

/* ORIENT_CL: weights (floats) of one output-channel block's chunk of kept channels, which every
 * block of positions reads in turn, from L2: 32768 (128 KB) was 2-7% faster on ResNet/VGG 3x3
 * layers at batch 1 and 32 than 16384, whose smaller chunks store and reload every tile's partial
 * sums more often; 4096 and 8192 read -6..+12% (A/B: -DCL_KC_FLOATS) */
#ifndef CL_KC_FLOATS
#define CL_KC_FLOATS 32768
#endif

/* ORIENT_CL: instances copied and computed together, as in ORIENT_CO (chunks bound the copies to
 * ~8 MB). */
static int64_t cl_chunk(const geom_t *g, int64_t kmax, int64_t N) {
    int64_t per = cl_per(g, kmax), nb = per > 0 ? (2 << 20) / per : N;
    return nb < 1 ? 1 : nb > N ? N : nb;
}

/* acc[CO_MR][CO_NV] (+)= sum over taps t and kept channels k in [k0, k1) of
 * bp[i][toff[t] + k] * w[in[k]][t][lanes]: the positions' values broadcast from the channels-last
 * copy (bp[i]: position i's top-left tap), the weights' CO_NR lanes from the packed panels. */
static inline void cl_block(vf acc[CO_MR][CO_NV], const float *const bp[CO_MR], const int64_t *toff,
                            int64_t T, int64_t k0, int64_t k1, const float *const *wp) {
    for (int64_t t = 0; t < T; t++) {
        const float *p[CO_MR];
        for (int i = 0; i < CO_MR; i++) p[i] = bp[i] + toff[t];
        for (int64_t k = k0; k < k1; k++) {
            const float *wk = wp[k] + t * CO_NR;
            vf v[CO_NV];
            for (int j = 0; j < CO_NV; j++) v[j] = ld(wk + j * VW);
            for (int i = 0; i < CO_MR; i++)
                for (int j = 0; j < CO_NV; j++) acc[i][j] += p[i][k] * v[j];
        }
    }
}

/* Channel lanes from channels-last copies: the kept channels of instances n0..n1 transposed into
 * zero-padded (H + 2ph) x (W + 2pw) x K copies, then blocks of CO_MR output positions (exact, across
 * rows) x CO_NR output channels, every tap read from the copy in place. pos: each position's
 * top-left tap, in pixels of the padded copy (positions past the end repeat the last one). */
static void conv_cl(const geom_t *g, const float *x, int64_t n0, int64_t n1, const int64_t *idx,
                    int64_t kstride, const int64_t *counts, const float *wpack, const float *bias,
                    float *out, float *copies, int64_t kmax, const int32_t *pos, const epi_t *e0) {
    const int64_t T = g->T, CoB = (g->Cout + CO_NR - 1) / CO_NR, HoWo = g->Ho * g->Wo, HW = g->H * g->W;
    const int64_t Hp = g->H + 2 * g->ph, Wp = g->W + 2 * g->pw, per = cl_per(g, kmax);
    /* the transpose: per padded row, blocks of input columns whose K source lines stay in L1 */
    #pragma omp for collapse(2) schedule(static)
    for (int64_t n = n0; n < n1; n++)
        for (int64_t r = 0; r < Hp; r++) {
            const int64_t K = counts ? counts[n] : kstride, *in = idx + n * kstride;
            float *d = copies + (n - n0) * per + r * Wp * K;
            const int64_t ih = r - g->ph;
            if (ih < 0 || ih >= g->H) { memset(d, 0, sizeof(float) * Wp * K); continue; }
            memset(d, 0, sizeof(float) * g->pw * K);
            memset(d + (g->pw + g->W) * K, 0, sizeof(float) * g->pw * K);
            const float *xr = x + n * g->C * HW + ih * g->W;
            int64_t kv = 0;  /* channels [0, kv) go by 16 at a time */
#if defined(__AVX512F__) && !defined(SCALAR_CL_COPY)  /* -DSCALAR_CL_COPY: the A/B baseline */
            /* one gather per 16 channels of a column, whose 16 source lines stay in L1 for the next
             * columns: VGG's 224x224 layer 4% faster than with the scalar loop below, which costs
             * ~15% of it; within 1% on 56x56 and smaller maps (A/B: -DSCALAR_CL_COPY) */
            if (g->C * HW < ((int64_t)1 << 31))
                for (; kv + VW <= K; kv += VW) {
                    int32_t o[VW];
                    for (int l = 0; l < VW; l++) o[l] = (int32_t)(in[kv + l] * HW);
                    const __m512i vo = _mm512_loadu_si512(o);
                    for (int64_t c = 0; c < g->W; c++)
                        _mm512_storeu_ps(d + (g->pw + c) * K + kv, _mm512_i32gather_ps(vo, xr + c, 4));
                }
#endif
            for (int64_t c0 = 0; c0 < g->W && kv < K; c0 += 16) {
                const int64_t c1 = c0 + 16 < g->W ? c0 + 16 : g->W;
                for (int64_t c = c0; c < c1; c++) {
                    float *dc = d + (g->pw + c) * K;
                    for (int64_t k = kv; k < K; k++) dc[k] = xr[in[k] * HW + c];
                }
            }
        }
    int64_t toffs[T];  /* per instance: K differs in threshold mode */
    const float *wp[kmax > 0 ? kmax : 1];  /* each kept channel's weight run in the block's panel */
    /* with enough (output-channel block, instance) pairs for every thread, each pair sweeps its
     * positions once per chunk of kept channels (the chunk's weights stay in cache), as in conv_co */
    const int many = CoB * (n1 - n0) >= 4 * (int64_t)omp_get_num_threads();
    const int64_t KCc = many && CL_KC_FLOATS / (T * CO_NR) > 0 ? CL_KC_FLOATS / (T * CO_NR)
                        : many ? 1 : INT64_MAX;
    float *cbuf = copies + (n1 - n0) * per + (int64_t)omp_get_thread_num() * g->PB * CO_MR * CO_NR;
    int64_t tab_cob = -1, tab_n = -1;  /* the (block, instance) toffs and wp were built for */
    #pragma omp for collapse(3) schedule(static)
    for (int64_t cob = 0; cob < CoB; cob++)
        for (int64_t n = n0; n < n1; n++)
            for (int64_t pq = 0; pq < (many ? 1 : g->PB); pq++) {
                const int64_t K = counts ? counts[n] : kstride, *in = idx + n * kstride;
                const float *wb = wpack + cob * g->C * T * CO_NR, *xk = copies + (n - n0) * per;
                if (cob != tab_cob || n != tab_n) {  /* a thread's tiles of one pair run in a row */
                    for (int64_t t = 0; t < T; t++)
                        toffs[t] = ((t / g->kw) * g->dh * Wp + (t % g->kw) * g->dw) * K;
                    for (int64_t k = 0; k < K; k++) wp[k] = wb + in[k] * T * CO_NR;
                    tab_cob = cob;
                    tab_n = n;
                }
                float *on = out + n * g->Cout * HoWo;
                epi_t e = *e0;
                if (e.res) e.res += n * g->Cout * HoWo;
                const int64_t pb0 = many ? 0 : pq, pb1 = many ? g->PB : pq + 1;
                for (int64_t k0 = 0; k0 < K || (K == 0 && k0 == 0); k0 += KCc) {
                    const int64_t k1 = KCc < K - k0 ? k0 + KCc : K;
                    for (int64_t pb = pb0; pb < pb1; pb++) {
                        float *cb = cbuf + pb * CO_MR * CO_NR;
                        const float *bp[CO_MR];
                        for (int i = 0; i < CO_MR; i++) bp[i] = xk + (int64_t)pos[pb * CO_MR + i] * K;
                        vf acc[CO_MR][CO_NV];
                        for (int i = 0; i < CO_MR; i++)
                            for (int j = 0; j < CO_NV; j++)
                                acc[i][j] = k0 ? ld(cb + (i * CO_NV + j) * VW) : (vf){0};
                        cl_block(acc, bp, toffs, T, k0, k1, wp);
                        co_tile_done(g, acc, k1 < K, cb, bias, cob, pb, on, &e);
                    }
                }
            }
}

/* ORIENT_FULL: out[n][co] = bias[co] + sum over n's kept channels c and taps t of x[n][c][t] *
 * w[co][c][t], for a layer whose kernel covers its whole unpadded input (one output position).
 * Weights packed [tile][C][T][FULL_CT]. Threads split the tiles of output channels. Within a tile the
 * channels go by in blocks whose weights fit in L2, and every instance adds its kept channels of the
 * block, its FULL_CT accumulators in registers: each kept weight comes from memory once per call,
 * not once per instance, and a channel no instance keeps is never read. idx rows ascending. */
static void conv_full(const geom_t *g, const float *x, int64_t N, const int64_t *idx, int64_t kstride,
                      const int64_t *counts, const float *wpack, const float *bias, float *out,
                      float *ws, int64_t threads, const epi_t *e) {
    const int64_t C = g->C, T = g->T, Cout = g->Cout, tiles = (Cout + FULL_CT - 1) / FULL_CT;
    int64_t cb = FULL_BLOCK_FLOATS / (T * FULL_CT);
    cb = cb < 1 ? 1 : cb;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t tile = 0; tile < tiles; tile++) {
        const int64_t tid = omp_get_thread_num();
        float *acc = ws + tid * N * FULL_CT;
        int64_t *pos = (int64_t *)(ws + threads * N * FULL_CT) + tid * N;  /* next kept entry per row */
        const int64_t co0 = tile * FULL_CT, width = Cout - co0 < FULL_CT ? Cout - co0 : FULL_CT;
        for (int64_t n = 0; n < N; n++) {
            pos[n] = 0;
            for (int64_t j = 0; j < FULL_CT; j++) acc[n * FULL_CT + j] = j < width ? bias[co0 + j] : 0.0f;
        }
        const float *wt = wpack + tile * C * T * FULL_CT;
        for (int64_t c1 = cb; c1 - cb < C; c1 += cb) {  /* channels [c1 - cb, c1) */
            for (int64_t n = 0; n < N; n++) {
                const int64_t K = counts ? counts[n] : kstride, *in = idx + n * kstride;
                int64_t p = pos[n];
                if (p >= K || in[p] >= c1) continue;
                float *an = acc + n * FULL_CT;
                vf a[FULL_NV];
                for (int j = 0; j < FULL_NV; j++) a[j] = ld(an + j * VW);
                for (; p < K && in[p] < c1; p++) {
                    const float *xv = x + (n * C + in[p]) * T, *wc = wt + in[p] * T * FULL_CT;
                    for (int64_t t = 0; t < T; t++) {
                        const float b = xv[t];
                        for (int j = 0; j < FULL_NV; j++) a[j] += b * ld(wc + t * FULL_CT + j * VW);
                    }
                }
                for (int j = 0; j < FULL_NV; j++) st(an + j * VW, a[j]);
                pos[n] = p;
            }
        }
        for (int64_t n = 0; n < N; n++)
            for (int64_t j = 0; j < width; j++) {
                const float v = acc[n * FULL_CT + j];
                out[n * Cout + co0 + j] = e->on ? epi1(e, v, n * Cout + co0 + j) : v;
            }
    }
}

/* A gated layer's fixed arguments (mirrored by native.py's _Layer). */
typedef struct {
    const float *wpack, *bias;
    int64_t cout, kh, kw, sh, sw, ph, pw, dh, dw, orient;
} ispc_layer_t;

/* out[n] = bias + sum over the kept channels idx[n, :counts[n]] of conv(x[n, c], w[:, c]).
 * x: (N, C, H, W) contiguous; idx: (N, kstride) int64, each row's kept channels in any order (sorted
 * here, in place); counts: (N,) int64,
 * or NULL when every instance keeps kstride channels; out: (N, Cout, Ho, Wo).
 * Returns 0 when done, or (without computing anything) the workspace size in floats it needs when
 * ws_floats is smaller. */
static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int64_t gated_conv_sorted(const ispc_layer_t *L, const float *x, int64_t N, int64_t C, int64_t H,
                                 int64_t W, const int64_t *idx, int64_t kstride, const int64_t *counts,
                                 float *out, float *ws, int64_t ws_floats, int64_t threads,
                                 const epi_t *e);

int64_t ispc_gated_conv(const ispc_layer_t *L, const float *x, int64_t N, int64_t C, int64_t H, int64_t W,
                        int64_t *idx, int64_t kstride, const int64_t *counts, float *out,
                        float *ws, int64_t ws_floats, int64_t threads) {
    /* ascending kept channels walk the input and the weight panels forward (the caller need not
     * sort: top-k comes out in any order) */
    for (int64_t n = 0; n < N; n++)
        qsort(idx + n * kstride, (size_t)(counts ? counts[n] : kstride), sizeof(int64_t), cmp_i64);
    const epi_t none = {0, 0.0f, 0.0f, 0};
    return gated_conv_sorted(L, x, N, C, H, W, idx, kstride, counts, out, ws, ws_floats, threads, &none);
}

/* ispc_gated_conv for rows of idx that are already ascending */
static int64_t gated_conv_sorted(const ispc_layer_t *L, const float *x, int64_t N, int64_t C, int64_t H,
                                 int64_t W, const int64_t *idx, int64_t kstride, const int64_t *counts,
                                 float *out, float *ws, int64_t ws_floats, int64_t threads,
                                 const epi_t *e) {
    const int orient = (int)L->orient;
    const int64_t Cout = L->cout, kh = L->kh, kw = L->kw, sh = L->sh, sw = L->sw, ph = L->ph,
                  pw = L->pw, dh = L->dh, dw = L->dw;
    const float *wpack = L->wpack, *bias = L->bias;
    geom_t g;
    geometry(&g, C, H, W, Cout, kh, kw, sh, sw, ph, pw, dh, dw, orient);
    int64_t kmax = counts ? 0 : kstride, HoWo = g.Ho * g.Wo, T = g.T;
    if (counts)
        for (int64_t n = 0; n < N; n++) if (counts[n] > kmax) kmax = counts[n];
    int64_t need = ispc_workspace(C, H, W, Cout, kh, kw, sh, sw, ph, pw, dh, dw, orient, kmax, threads, N);
    if (need > ws_floats) return need;
    if (orient == ORIENT_FULL) {  /* native.py checks the geometry: H == kh, W == kw, no padding */
        conv_full(&g, x, N, idx, kstride, counts, wpack, bias, out, ws, threads, e);
        return 0;
    }
    int64_t offs[T];
    for (int64_t r = 0; r < kh; r++)
        for (int64_t q = 0; q < kw; q++) offs[r * kw + q] = orient == ORIENT_PIX ? tap_offset(&g, r, q) : 0;
    /* geometry tables shared by every instance, at the end of the workspace */
    int32_t *table = orient == ORIENT_PIX ? (int32_t *)(ws + pix_table_offset(&g, kmax, threads))
                                          : (int32_t *)ws;
    const int64_t nb = orient == ORIENT_CO ? co_chunk(&g, kmax, N)
                       : orient == ORIENT_CL ? cl_chunk(&g, kmax, N) : 1;
    #pragma omp parallel num_threads(threads)
    {
        if (orient == ORIENT_PIX) {  /* flattened position -> output offset, or -1 (waste) */
            #pragma omp for schedule(static)
            for (int64_t p = 0; p < g.PB * PIX_NR; p++) {
                int64_t oh = p / g.Wq, ow = p % g.Wq;
                table[p] = (p < g.NP && ow < g.Wo) ? (int32_t)(oh * g.Wo + ow) : -1;
            }
        } else if (orient == ORIENT_CL) {  /* position -> its top-left tap in the padded copy */
            #pragma omp for schedule(static)
            for (int64_t p = 0; p < g.PB * CO_MR; p++) {
                const int64_t m = p < HoWo ? p : HoWo - 1, oh = m / g.Wo, ow = m % g.Wo;
                table[p] = (int32_t)(oh * sh * (W + 2 * pw) + ow * sw);
            }
        } else {  /* per block and tap: the input offset of each position within a channel, or -1
                   * (padding), then whether those offsets are one run of consecutive floats */
            int32_t *runs = table + g.PB * T * CO_MR;
            #pragma omp for schedule(static)
            for (int64_t pb = 0; pb < g.PB; pb++)
                for (int64_t t = 0; t < T; t++) {
                    int32_t *o = table + (pb * T + t) * CO_MR;
                    int run = 1;
                    for (int i = 0; i < CO_MR; i++) {
                        int64_t m = pb * CO_MR + i, oh = m / g.Wo, ow = m % g.Wo;
                        int64_t ih = oh * sh + (t / kw) * dh - ph, iw = ow * sw + (t % kw) * dw - pw;
                        int ok = m < HoWo && ih >= 0 && ih < H && iw >= 0 && iw < W;
                        o[i] = ok ? (int32_t)(ih * W + iw) : -1;
                        run = run && ok && (i == 0 || o[i] == o[i - 1] + 1);
                    }
                    runs[pb * T + t] = run;
                }
        }
        for (int64_t n = 0; n < N; n += nb) {
            /* the implicit barrier of each worksharing loop keeps the workspace safe to reuse */
            if (orient == ORIENT_CO) {
                conv_co(&g, x, n, n + nb < N ? n + nb : N, idx, kstride, counts, wpack, bias, out,
                        ws + co_table_floats(&g), kmax, table, e);
                continue;
            }
            if (orient == ORIENT_CL) {
                conv_cl(&g, x, n, n + nb < N ? n + nb : N, idx, kstride, counts, wpack, bias, out,
                        ws + g.PB * CO_MR, kmax, table, e);
                continue;
            }
            float *on = out + n * Cout * HoWo;
            const int64_t K = counts ? counts[n] : kstride, *in = idx + n * kstride;
            epi_t en = *e;  /* this instance's residual */
            if (en.res) en.res += n * Cout * HoWo;
            if (K == 0) {
                #pragma omp for schedule(static)
                for (int64_t co = 0; co < Cout; co++)
                    for (int64_t m = 0; m < HoWo; m++)
                        on[co * HoWo + m] = en.on ? epi1(&en, bias[co], co * HoWo + m) : bias[co];
            } else {
                conv_pix(&g, x + n * C * H * W, in, K, wpack, bias, on, ws, kmax, threads, offs, table,
                         &en);
            }
        }
    }
    return 0;
}

/* ---- Selection inside the kernel: saliency and kept channels without a PyTorch op per step ----
 * Mirrors ops/gated_conv.py: s[n, c] = scale[c] * (l2: root mean square over H*W; l1: mean |x|);
 * threshold mode keeps s >= threshold, top-k mode the k largest (NaN counts as the largest, as in
 * torch.topk; ties at the k-th value go to the lower channel index). Kept channels come out ascending. */
#define SAL_L2 0
#define SAL_L1 1
#define MODE_THRESHOLD 0
#define MODE_TOPK 1

static float plane_saliency(const float *p, int64_t HW, int code) {
    vf a0 = {0}, a1 = {0};
    int64_t i = 0;
    if (code == SAL_L2) {
        for (; i + 2 * VW <= HW; i += 2 * VW) {
            vf u = ld(p + i), v = ld(p + i + VW);
            a0 += u * u;
            a1 += v * v;
        }
    } else {  /* |v|: clear the sign bits */
        for (; i + 2 * VW <= HW; i += 2 * VW) {
            a0 += (vf)((vi)ld(p + i) & 0x7fffffff);
            a1 += (vf)((vi)ld(p + i + VW) & 0x7fffffff);
        }
    }
    double acc = 0.0;
    for (int j = 0; j < VW; j++) acc += (double)a0[j] + (double)a1[j];
    for (; i < HW; i++) acc += code == SAL_L2 ? (double)p[i] * p[i] : (double)(p[i] < 0 ? -p[i] : p[i]);
    const double hw = HW > 0 ? (double)HW : 1.0;
    return (float)(code == SAL_L2 ? __builtin_sqrt(acc / hw) : acc / hw);
}

static inline float nan_high(float v) { return v != v ? __builtin_inff() : v; }

/* A float's place in the selection's order as an unsigned key: a < b exactly where key(a) <
 * key(b), NaN highest (as +inf) and -0 equal to +0, the order of nan_high's float comparisons. */
static inline uint32_t order_key(float v) {
    v = nan_high(v);
    if (v == 0.0f) v = 0.0f;
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u & 0x80000000u ? ~u : u | 0x80000000u;
}

static inline int64_t count_at_least(const uint32_t *key, int64_t n, uint32_t t) {
    uint32_t cnt = 0;  /* 32-bit lanes: 16 keys a vector */
    for (int64_t c = 0; c < n; c++) cnt += key[c] >= t;
    return cnt;
}

/* One instance's kept channels (ascending) into idx; returns how many. Top-k takes the k largest
 * saliencies, ties at the k-th value in channel order: its key is found bit by bit (the largest t
 * with at least k keys >= t), 32 vectorised counting passes where a quickselect's data-dependent
 * branches cost ~10x as much (C = 2048: ~2 against ~22 us, one thread, while the others wait). */
static int64_t select_row(const float *s, int64_t C, int mode, float threshold, int64_t k, int64_t *idx,
                          float *tmp) {
    int64_t cnt = 0;
    if (mode == MODE_THRESHOLD) {
        for (int64_t c = 0; c < C; c++)
            if (s[c] >= threshold) idx[cnt++] = c;
        return cnt;
    }
    if (k <= 0) return 0;
    if (k >= C) {
        for (int64_t c = 0; c < C; c++) idx[c] = c;
        return C;
    }
    uint32_t *key = (uint32_t *)tmp, lo = UINT32_MAX, hi = 0;
    for (int64_t c = 0; c < C; c++) {
        key[c] = order_key(s[c]);
        lo = key[c] < lo ? key[c] : lo;
        hi = key[c] > hi ? key[c] : hi;
    }
    /* the k-th largest lies in [lo, hi]: the bits above their highest difference are its own */
    const int top = lo == hi ? -1 : 31 - __builtin_clz(lo ^ hi);
    uint32_t t = top == 31 ? 0 : lo & (UINT32_MAX << (top + 1));
    for (int b = top; b >= 0; b--) {
        const uint32_t cand = t | (uint32_t)1 << b;
        if (count_at_least(key, C, cand) >= k) t = cand;
    }
    int64_t ties = k - (t == UINT32_MAX ? 0 : count_at_least(key, C, t + 1));
    for (int64_t c = 0; c < C; c++) {  /* branch-free: the kept channels are unpredictable */
        const int64_t eq = key[c] == t;
        idx[cnt] = c;
        cnt += (key[c] > t) | (eq & (ties > 0));
        ties -= eq;
    }
    return cnt;
}

/* instances' input bytes per selection chunk (-D: other budgets, for A/B timings) */
#ifndef SELECT_CHUNK_BYTES
#define SELECT_CHUNK_BYTES (512 << 10)
#endif

/* output positions per channel (Ho * Wo) of layer L on an H x W input */
static int64_t ispc_out_hw(const ispc_layer_t *L, int64_t H, int64_t W) {
    return conv_out(H, L->kh, L->sh, L->ph, L->dh) * conv_out(W, L->kw, L->sw, L->pw, L->dw);
}

/* Workspace the selection takes in front of the convolution's: idx (N x C int64), saliency and a
 * scratch row per instance (N x C floats each), the kept counts (N int64), 64-byte aligned. */
static int64_t select_floats(int64_t N, int64_t C) { return (4 * N * C + 2 * N + 15) / 16 * 16; }

/* The whole gated layer in one call: saliency, selection, then the convolution of ispc_gated_conv.
 * counts (N,) receives each instance's kept count (NULL: kept in the workspace only); res, lo, hi
 * the fused epilogue (epi_t; NULL, -inf, inf: none). Returns 0, or the workspace (floats) it needs. */
int64_t ispc_gated_conv_select(const ispc_layer_t *L, const float *x, int64_t N, int64_t C, int64_t H,
                               int64_t W, const float *scale, int64_t saliency, int64_t mode,
                               float threshold, int64_t k, int64_t *counts, float *out,
                               const float *res, float lo, float hi, float *ws, int64_t ws_floats,
                               int64_t threads) {
    const int64_t sel = select_floats(N, C), HW = H * W;
    const int64_t kmax = mode == MODE_TOPK ? (k < C ? (k > 0 ? k : 0) : C) : C;
    const int64_t need = sel + ispc_workspace(C, H, W, L->cout, L->kh, L->kw, L->sh, L->sw, L->ph, L->pw,
                                              L->dh, L->dw, (int)L->orient, kmax, threads, N);
    if (need > ws_floats) return need;
    int64_t *idx = (int64_t *)ws;
    float *s = ws + 2 * N * C, *tmp = ws + 3 * N * C;
    if (!counts) counts = (int64_t *)(ws + 4 * N * C);
    const int64_t out_n = L->cout * ispc_out_hw(L, H, W);  /* one instance's output floats */
    const epi_t e = {res, lo, hi, res != 0 || lo > -__builtin_inff() || hi < __builtin_inff(),
                     STREAM_BYTES > 0 && N * out_n * (int64_t)sizeof(float) >= STREAM_BYTES};
    /* chunks of instances whose inputs fit in cache: the convolution then reads the kept planes
     * the saliency pass just read from cache, not again from memory (at batch 32 a 56x56x256 input
     * is 100 MB; A/B: examples/kernel_ab.py) */
    const int64_t per = C * HW * (int64_t)sizeof(float);
    /* ORIENT_FULL reads each kept channel's weights once per call: the whole batch in one chunk */
    int64_t nb = per > 0 && L->orient != ORIENT_FULL ? SELECT_CHUNK_BYTES / per : N;
    nb = nb < 1 ? 1 : nb > N ? N : nb;
    for (int64_t n0 = 0; n0 < N; n0 += nb) {
        const int64_t n1 = n0 + nb < N ? n0 + nb : N, m = n1 - n0;
        if (HW == 1)  /* a vector input (a linear layer): each saliency is |v| * scale, exactly */
            for (int64_t nc = n0 * C; nc < n1 * C; nc++)
                s[nc] = __builtin_fabsf(x[nc]) * scale[nc % C];
        else {
            #pragma omp parallel for num_threads(threads) schedule(static) if (m * C * HW >= (1 << 16))
            for (int64_t nc = n0 * C; nc < n1 * C; nc++)
                s[nc] = plane_saliency(x + nc * HW, HW, (int)saliency) * scale[nc % C];
        }
        for (int64_t n = n0; n < n1; n++)
            counts[n] = select_row(s + n * C, C, (int)mode, threshold, k, idx + n * C, tmp + n * C);
        epi_t en = e;
        if (en.res) en.res += n0 * out_n;
        int64_t r = gated_conv_sorted(L, x + n0 * C * HW, m, C, H, W, idx + n0 * C, C, counts + n0,
                                      out + n0 * out_n, ws + sel, ws_floats - sel, threads, &en);
        if (r) return r;  /* not reached: the whole batch's workspace was checked above */
    }
    return 0;
}

/* Saliency and selection alone, for gated layers whose convolution runs elsewhere (oneDNN on the
 * gathered channels: ispc_gather below). idx (N x C): each instance's kept channels, ascending, then
 * zeros up to C; counts (N,): how many; s (2 x N x C floats): scratch for the saliencies and the
 * selection. One pass over the input on every thread: PyTorch's norm, top-k and sort took 0.6-1.3 ms
 * on VGG-16's 56x56-224x224 layers at batch 1 (2-core Xeon), 5-10% of their convolution. */
void ispc_select(const float *x, int64_t N, int64_t C, int64_t HW, const float *scale, int64_t saliency,
                 int64_t mode, float threshold, int64_t k, int64_t *idx, int64_t *counts, float *s,
                 int64_t threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (N * C * HW >= (1 << 16))
    for (int64_t nc = 0; nc < N * C; nc++)
        s[nc] = plane_saliency(x + nc * HW, HW, (int)saliency) * scale[nc % C];
    for (int64_t n = 0; n < N; n++) {
        counts[n] = select_row(s + n * C, C, (int)mode, threshold, k, idx + n * C, s + (N + n) * C);
        for (int64_t j = counts[n]; j < C; j++) idx[n * C + j] = 0;
    }
}

/* dst[o][j] = src[o][idx[o * idx_stride + j]] (inner floats each) for j < width, zero from j =
 * counts[o] on (counts NULL: none zeroed). Gathers kept input planes (idx_stride C, one row per
 * instance) and kept weight slices (idx_stride 0: one row for every output channel), threads
 * splitting the rows. Returns how many indices fell outside [0, C) (those rows are left unwritten):
 * checked here, in the copy loop, rather than by a pass over idx before the call. */
int64_t ispc_gather(const float *src, int64_t outer, int64_t C, int64_t inner, const int64_t *idx,
                    int64_t idx_stride, const int64_t *counts, int64_t width, float *dst, int64_t threads) {
    int64_t bad = 0;
    #pragma omp parallel for num_threads(threads) schedule(static) collapse(2) reduction(+ : bad) \
        if (outer * width * inner >= (1 << 15))
    for (int64_t o = 0; o < outer; o++)
        for (int64_t j = 0; j < width; j++) {
            float *d = dst + (o * width + j) * inner;
            const int64_t c = idx[o * idx_stride + j];
            if (counts && j >= counts[o]) memset(d, 0, sizeof(float) * inner);
            else if (c < 0 || c >= C) bad++;
            else if (inner == 1) *d = src[o * C + c];  /* 1x1 weights */
            else memcpy(d, src + (o * C + c) * inner, sizeof(float) * inner);
        }
    return bad;
}

/* out = clamp(out + res, lo, hi) in place (res NULL: clamp only; NaN passes through, as in epi1),
 * threads splitting the floats: the epilogue of a gated layer whose kernel returned its output
 * without it (this kernel's outputs too large to apply it inside, at batch 32; the oneDNN and BLAS
 * kernels'), in one pass over memory where PyTorch's add_ and relu_ take two. */
void ispc_epilogue(float *out, const float *res, int64_t n, float lo, float hi, int64_t threads) {
    const int64_t nv = n / VW;
    const epi_t e = {res, lo, hi, 1, 0};
    #pragma omp parallel for num_threads(threads) schedule(static) if (n >= (1 << 16))
    for (int64_t i = 0; i < nv; i++) {
        vf v = ld(out + i * VW);
        if (res) v += ld(res + i * VW);
        st(out + i * VW, clampv(v, lo, hi));
    }
    for (int64_t m = nv * VW; m < n; m++) out[m] = epi1(&e, out[m], m);
}

/* dst (NC, H/2, W/2) = clamp(max over each 2x2 window of src (NC, H, W), lo, hi): VGG's
 * non-overlapping max-pool (a last odd row or column is ignored, as in max_pool2d) with the
 * activation before it moved after it (max commutes with the monotone clamp: exact, NaN
 * included), in one pass over src: 0.34 ms on VGG-16's 64x224x224 map where the ReLU pass and
 * PyTorch's elementwise maxima took 1.8-2.2 ms (2-core Xeon). Threads split the output rows.
 * Returns 1 (nothing done) without AVX-512. */
int64_t ispc_maxpool2x2(const float *src, int64_t NC, int64_t H, int64_t W, float lo, float hi,
                        float *dst, int64_t threads) {
#if defined(__AVX512F__)
    const int64_t Ho = H / 2, Wo = W / 2;
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(static) \
        if (NC * H * W >= (1 << 16))
    for (int64_t c = 0; c < NC; c++)
        for (int64_t oh = 0; oh < Ho; oh++) {
            const float *s = src + (c * H + oh * 2) * W;
            float *d = dst + (c * Ho + oh) * Wo;
            for (int64_t ow = 0; ow < Wo; ow += VW) {  /* 16 outputs from two rows of 32 floats */
                const float *p = s + ow * 2;
                const int nout = Wo - ow < VW ? (int)(Wo - ow) : VW;  /* a partial last block */
                const __mmask16 m0 = lane_mask(0, 2 * nout), m1 = lane_mask(0, 2 * nout - VW);
                const __m512 a0 = _mm512_maskz_loadu_ps(m0, p), a1 = _mm512_maskz_loadu_ps(m1, p + VW);
                const __m512 b0 = _mm512_maskz_loadu_ps(m0, p + W);
                const __m512 b1 = _mm512_maskz_loadu_ps(m1, p + W + VW);
                /* NaN propagates, as in max_pool2d: an unordered pair's sum is NaN */
                __m512 v0 = _mm512_max_ps(a0, b0), v1 = _mm512_max_ps(a1, b1);
                v0 = _mm512_mask_add_ps(v0, _mm512_cmp_ps_mask(a0, b0, _CMP_UNORD_Q), a0, b0);
                v1 = _mm512_mask_add_ps(v1, _mm512_cmp_ps_mask(a1, b1, _CMP_UNORD_Q), a1, b1);
                const __m512 l = _mm512_permutex2var_ps(v0, even, v1);
                const __m512 r = _mm512_permutex2var_ps(v0, odd, v1);
                __m512 m = _mm512_max_ps(l, r);
                m = _mm512_mask_add_ps(m, _mm512_cmp_ps_mask(l, r, _CMP_UNORD_Q), l, r);
                _mm512_mask_storeu_ps(d + ow, lane_mask(0, nout), (__m512)clampv((vf)m, lo, hi));
            }
        }
    return 0;
#else
    (void)src; (void)NC; (void)H; (void)W; (void)lo; (void)hi; (void)dst; (void)threads;
    return 1;
#endif
}

/* ---- channels-last (NHWC) entries: the gather path of a model that runs channels-last ----------
 * oneDNN's convolution of VGG-16's gathered 224x224-56x56 inputs runs 4-15% faster on NHWC data
 * than on NCHW (batch 1, 2-core Xeon), so a model whose gathered layers feed each other keeps its
 * maps channels-last; these are ispc_select, ispc_gather and ispc_maxpool2x2 for that layout. */

/* ispc_select for x (N, HW, C) channels-last: the same saliencies (|v| or v*v summed per channel
 * over the map, in blocks of float sums added into doubles) and the same selection. The threads
 * split each instance's positions; each sums into its own row of doubles, added in thread order
 * (deterministic for a given thread count). Returns -1 if out of memory, else 0. */
/* blk[c] += one channels-last row's v*v (SAL_L2) or |v| per channel: the saliency sums'
 * inner loop, shared by the selection entries. */
static inline void sal_add_row(float *blk, const float *row, int64_t C, int64_t saliency) {
    const int64_t nv = C / VW;
    if (saliency == SAL_L2) {
        for (int64_t v = 0; v < nv; v++) {
            const vf u = ld(row + v * VW);
            st(blk + v * VW, ld(blk + v * VW) + u * u);
        }
        for (int64_t c = nv * VW; c < C; c++) blk[c] += row[c] * row[c];
    } else {
        for (int64_t v = 0; v < nv; v++)
            st(blk + v * VW, ld(blk + v * VW) + (vf)((vi)ld(row + v * VW) & 0x7fffffff));
        for (int64_t c = nv * VW; c < C; c++) blk[c] += row[c] < 0 ? -row[c] : row[c];
    }
}

#define NHWC_SAL_BLOCK 64
int64_t ispc_select_nhwc(const float *x, int64_t N, int64_t C, int64_t HW, const float *scale,
                         int64_t saliency, int64_t mode, float threshold, int64_t k, int64_t *idx,
                         int64_t *counts, float *s, int64_t threads) {
    if (threads < 1 || N * C * HW < (1 << 16)) threads = 1;
    double *part = (double *)calloc((size_t)(threads * N * C) + 1, sizeof(double));
    int oom = part == 0;
    if (!oom) {
        #pragma omp parallel num_threads(threads) reduction(| : oom)
        {
            const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
            float *blk = (float *)aligned_alloc(64, (size_t)((C + 15) / 16 * 16) * sizeof(float));
            if (!blk) oom = 1;
            for (int64_t n = 0; blk && n < N; n++) {
                const int64_t p0 = HW * t / T, p1 = HW * (t + 1) / T;
                double *acc = part + (t * N + n) * C;
                for (int64_t p = p0; p < p1; p += NHWC_SAL_BLOCK) {
                    const int64_t pe = p + NHWC_SAL_BLOCK < p1 ? p + NHWC_SAL_BLOCK : p1;
                    memset(blk, 0, sizeof(float) * (size_t)C);
                    for (int64_t q = p; q < pe; q++) {
                        sal_add_row(blk, x + (n * HW + q) * C, C, saliency);
                    }
                    for (int64_t c = 0; c < C; c++) acc[c] += (double)blk[c];
                }
            }
            free(blk);
        }
    }
    if (oom) {
        free(part);
        return -1;
    }
    const double hw = HW > 0 ? (double)HW : 1.0;
    for (int64_t n = 0; n < N; n++) {
        for (int64_t c = 0; c < C; c++) {
            double a = 0.0;
            for (int64_t t = 0; t < threads; t++) a += part[(t * N + n) * C + c];
            s[n * C + c] = (float)(saliency == SAL_L2 ? __builtin_sqrt(a / hw) : a / hw) * scale[c];
        }
        counts[n] = select_row(s + n * C, C, (int)mode, threshold, k, idx + n * C, s + (N + n) * C);
        for (int64_t j = counts[n]; j < C; j++) idx[n * C + j] = 0;
    }
    free(part);
    return 0;
}

/* dst (N, HW, width) = each position's kept channels of src (N, HW, C), channels-last: dst[n][p][j]
 * = src[n][p][idx[n * C + j]] for j < counts[n], zeros up to width. Threads split the positions;
 * with AVX-512 each run of 16 channels is one masked gather from the position's row (in L1). The
 * pass is bound by memory: whole rows are read, where the NCHW gather skips the planes it drops
 * (VGG-16's 64x224x224 map at half the channels: 1.4x its time; a load and a compress per 16
 * channels instead of the gathers measured the same).
 * Returns how many of the used indices fall outside [0, C) (nothing is written then), -1 if out
 * of memory. */
int64_t ispc_gather_nhwc(const float *src, int64_t N, int64_t HW, int64_t C, const int64_t *idx,
                         const int64_t *counts, int64_t width, float *dst, int64_t threads) {
    int64_t bad = 0;
    for (int64_t n = 0; n < N; n++) {
        const int64_t kept = counts[n] < width ? counts[n] : width;
        for (int64_t j = 0; j < kept; j++) bad += idx[n * C + j] < 0 || idx[n * C + j] >= C;
    }
    if (bad) return bad;
    const int64_t nj = (width + VW - 1) / VW;
    int32_t *ix = (int32_t *)malloc((size_t)(N * nj * VW + 1) * sizeof(int32_t));
    if (!ix) return -1;
    for (int64_t n = 0; n < N; n++)
        for (int64_t j = 0; j < nj * VW; j++)
            ix[n * nj * VW + j] = j < width && j < counts[n] ? (int32_t)idx[n * C + j] : 0;
    #pragma omp parallel for num_threads(threads) schedule(static) collapse(2) \
        if (N * HW * width >= (1 << 15))
    for (int64_t n = 0; n < N; n++)
        for (int64_t p = 0; p < HW; p++) {
            const float *row = src + (n * HW + p) * C;
            float *d = dst + (n * HW + p) * width;
            const int64_t kept = counts[n] < width ? counts[n] : width;
            const int32_t *xi = ix + n * nj * VW;
#if defined(__AVX512F__)
            for (int64_t j = 0; j < width; j += VW) {
                const __mmask16 use = lane_mask(0, (int)(kept - j < VW ? kept - j : VW));
                const __m512i vi_ = _mm512_loadu_si512((const void *)(xi + j));
                const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), use, vi_, row, 4);
                _mm512_mask_storeu_ps(d + j, lane_mask(0, (int)(width - j < VW ? width - j : VW)), v);
            }
#else
            for (int64_t j = 0; j < width; j++) d[j] = j < kept ? row[xi[j]] : 0.0f;
#endif
        }
    free(ix);
    return 0;
}

/* ispc_maxpool2x2 for src (N, H, W, C) channels-last -> dst (N, H/2, W/2, C): each output position
 * the clamped maximum of four input rows of C floats, NaN propagating. Threads split output rows.
 * Returns 1 (nothing done) without AVX-512. */
int64_t ispc_maxpool2x2_nhwc(const float *src, int64_t N, int64_t H, int64_t W, int64_t C, float lo,
                             float hi, float *dst, int64_t threads) {
#if defined(__AVX512F__)
    const int64_t Ho = H / 2, Wo = W / 2;
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(static) \
        if (N * H * W * C >= (1 << 16))
    for (int64_t n = 0; n < N; n++)
        for (int64_t oh = 0; oh < Ho; oh++)
            for (int64_t ow = 0; ow < Wo; ow++) {
                const float *a = src + ((n * H + 2 * oh) * W + 2 * ow) * C, *b = a + W * C;
                float *d = dst + ((n * Ho + oh) * Wo + ow) * C;
                for (int64_t c = 0; c < C; c += VW) {
                    const __mmask16 m = lane_mask(0, (int)(C - c < VW ? C - c : VW));
                    const __m512 a0 = _mm512_maskz_loadu_ps(m, a + c), a1 = _mm512_maskz_loadu_ps(m, a + C + c);
                    const __m512 b0 = _mm512_maskz_loadu_ps(m, b + c), b1 = _mm512_maskz_loadu_ps(m, b + C + c);
                    __m512 u = _mm512_max_ps(a0, a1), v = _mm512_max_ps(b0, b1);
                    u = _mm512_mask_add_ps(u, _mm512_cmp_ps_mask(a0, a1, _CMP_UNORD_Q), a0, a1);
                    v = _mm512_mask_add_ps(v, _mm512_cmp_ps_mask(b0, b1, _CMP_UNORD_Q), b0, b1);
                    __m512 r = _mm512_max_ps(u, v);
                    r = _mm512_mask_add_ps(r, _mm512_cmp_ps_mask(u, v, _CMP_UNORD_Q), u, v);
                    _mm512_mask_storeu_ps(d + c, m, (__m512)clampv((vf)r, lo, hi));
                }
            }
    return 0;
#else
    (void)src; (void)N; (void)H; (void)W; (void)C; (void)lo; (void)hi; (void)dst; (void)threads;
    return 1;
#endif
}

/* ---- NHWC convolution: channels-last in and out, output channels in vector lanes ---------------
 * ispc_conv_nhwc is a whole gated layer on channels-last maps: the saliencies and the selection
 * (the same semantics as ispc_gated_conv_select), then the convolution over the kept channels,
 * read in place from the NHWC input, and an NHWC output with the bias, a residual (NHWC) and a
 * ReLU/ReLU6 clamp fused. With every channel kept (mode NHWC_DENSE, or an instance that keeps all)
 * it is a dense convolution, the kw taps of a row read as one run of kw * C floats.
 *
 * The microkernel: a tile of MR consecutive output positions (flattened over rows) x NR = NV * VW
 * output channels, MR * NV accumulators in registers for the whole reduction. The reduction runs
 * over segments (one per tap, or per tap row when dense), each a list of MR position pointers
 * (a padding tap's pointer is a row of zeros) and a run of L input channels: per channel, NV weight
 * vectors (packed [co block][tap][C][NR]: a kept channel's weights for one tap are one run of NR
 * floats) and MR broadcasts, MR * NV FMAs. Kept channels are read through their index (no compress
 * pass): the input row of a position is contiguous, and every index of the tile serves MR positions.
 */

#define NHWC_DENSE (-1)  /* mode: no selection, every channel kept */

/* register tiles (MR positions x NV vectors); the layer's NV picks its MR. Throughput of each,
 * inner loop from L1, one core (GFLOP/s, 2-core Xeon): AVX-512 7x4 186, 8x3 189, 14x2 179,
 * 14x1 136; AVX2 (-mno-avx512f) 4x3 117, 6x2 113, 12x1 88. On whole layers (ResNet, VGG,
 * MobileNetV2, batch 1) 7x4 leads on AVX-512, 8x3 trails it by ~15%; on AVX2 6x2 and 4x3 tied on
 * the Xeon, on AMD Zen 4 4x3 ran at 0.72-0.85 of 6x2 (ispc_nhwc_vectors' rates).
 * 7x4 needs 33 registers (28 accumulators, 4 weights, a broadcast): GCC keeps one accumulator on
 * the stack, a store and a reload every step; 6x4 (NH_MR4S, 29 registers) is faster wherever its
 * last tile wastes little (nh_mr), 7x4 where positions come in sevens (7x7 maps). */
#if defined(__AVX512F__)
#ifndef NH_MR4
#define NH_MR4 7
#endif
#ifndef NH_MR4S
#define NH_MR4S 6
#endif
#define NH_MR3 8
#ifndef NH_MR2  /* -DNH_MR2=n: A/B of other tiles (the packed weights do not change) */
#define NH_MR2 14
#endif
#define NH_MR1 14
#define NH_MAXNV 4
#else
#define NH_MR4 0  /* not a tile on 16 registers */
#define NH_MR3 4
#define NH_MR2 6
#define NH_MR1 12
#define NH_MAXNV 3
#endif
#define NH_MAXMR 14

/* NH_MR4S's speed per position over NH_MR4's (ResNet-50 layers at 14x14 to 112x112, batch 1:
 * 1.00-1.08; at 7x7 with its wasted positions 0.90-0.95) */
#define NH_MR4S_GAIN 1.04

/* the tile's positions for nv vectors on maps of howo output positions (0: unknown) */
static int nh_mr(int64_t nv, int64_t howo) {
#if defined(__AVX512F__)
    if (nv == 4 && NH_MR4S > 0) {
        const double a = (double)((howo + NH_MR4 - 1) / NH_MR4 * NH_MR4);
        const double b = (double)((howo + NH_MR4S - 1) / NH_MR4S * NH_MR4S) / NH_MR4S_GAIN;
        return howo > 0 && a <= b ? NH_MR4 : NH_MR4S;
    }
#else
    (void)howo;
#endif
    return nv == 4 ? NH_MR4 : nv == 3 ? NH_MR3 : nv == 2 ? NH_MR2 : nv == 1 ? NH_MR1 : 0;
}

#ifndef NH_EXP_OLDCLAMP
#define NH_EXP_OLDCLAMP 0
#endif

/* The NHWC epilogue's activation: clamp code 1 is [lo, hi] (ReLU, ReLU6); NH_GELU, chosen by
 * lo = hi = NaN (native.GELU), is the exact GELU 0.5 v (1 + erf(v / sqrt 2)) with PyTorch's CPU erf
 * (Abramowitz-Stegun 7.1.26, |error| < 1.5e-7) and a Cephes exp: ConvNeXt's pwconv1 -> GELU in
 * one pass over its output instead of two. */
#define NH_GELU 2

/* an epilogue's clamp code for (lo, hi): NH_GELU (both NaN), 1 (a finite bound), 0 (none) */
static inline int nh_clamp_code(float lo, float hi) {
    return lo != lo ? NH_GELU : lo > -__builtin_inff() || hi < __builtin_inff();
}

/* exp(x) for x <= 0, flushed to exp(-87) below -87 (the GELU's use: exp(-z * z)) */
static inline vf nh_exp_neg(vf x) {
    const vf floor = (vf){0} - 87.0f;
    const vi m = x < floor;
    x = (vf)(((vi)x & ~m) | ((vi)floor & m));
    const vi n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi);  /* round, x <= 0 */
    const vf nf = __builtin_convertvector(n, vf);
    const vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf p = (vf){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const vf e = p * (r * r) + r + 1.0f;
    return e * (vf)((n + 127) << 23);
}

static inline vf nh_gelu(vf v) {
    const vf z = v * 0.70710678118654752f, one = (vf){0} + 1.0f;
    const vi sign = (vi)z & (int32_t)0x80000000;
    const vf a = (vf)((vi)z & 0x7fffffff);
    const vf d = a * 0.3275911f + 1.0f;
#if defined(__AVX512F__)  /* 1 / d: rcp14 and one Newton step (float precision) instead of a division */
    vf t = (vf)_mm512_rcp14_ps((__m512)d);
    t = t * (2.0f - d * t);
#else
    const vf t = one / d;
#endif
    vf r = (vf){0} + 1.061405429f;
    r = r * t - 1.453152027f;
    r = r * t + 1.421413741f;
    r = r * t - 0.284496736f;
    r = r * t + 0.254829592f;
    const vf erf = (vf)((vi)(one - r * t * nh_exp_neg(-(z * z))) ^ sign);
    return (v * 0.5f) * (erf + 1.0f);
}

/* clampv's values bit for bit (NaN and -0 included: vmaxps(l, v) is v < l ? l : v) in two
 * instructions instead of four */
static inline vf nh_clampv(vf v, float lo, float hi) {
#if defined(__AVX512F__) && !NH_EXP_OLDCLAMP
    const __m512 l = _mm512_set1_ps(lo), h = _mm512_set1_ps(hi);
    return (vf)_mm512_min_ps(h, _mm512_max_ps(l, (__m512)v));
#elif defined(__AVX__) && !NH_EXP_OLDCLAMP
    const __m256 l = _mm256_set1_ps(lo), h = _mm256_set1_ps(hi);
    return (vf)_mm256_min_ps(h, _mm256_max_ps(l, (__m256)v));
#else
    return clampv(v, lo, hi);
#endif
}

static inline vf nh_act(vf v, int code, float lo, float hi) {
    return code == NH_GELU ? nh_gelu(v) : nh_clampv(v, lo, hi);
}

/* lanes [0, n) of v (+ bias, residual, activation) to dst: the epilogue of one output vector */
static inline vf nh_store(float *dst, vf v, const float *bias, const float *res, int n, float lo,
                          float hi, int clamp) {
    if (n >= VW) {  /* AVX-512: a masked store measured 8x slower than a plain one into uncached lines */
        v += ld(bias);
        if (res) v += ld(res);
        v = clamp ? nh_act(v, clamp, lo, hi) : v;
        st(dst, v);
        return v;
    }
#if defined(__AVX512F__)
    const __mmask16 m = (__mmask16)((1u << n) - 1u);
    v += (vf)_mm512_maskz_loadu_ps(m, bias);
    if (res) v += (vf)_mm512_maskz_loadu_ps(m, res);
    if (clamp) v = nh_act(v, clamp, lo, hi);
    _mm512_mask_storeu_ps(dst, m, (__m512)v);
    return (vf)_mm512_maskz_mov_ps(m, (__m512)v);
#else
    float t[VW];
    st(t, v);
    for (int l = 0; l < VW; l++) {
        float u = l < n ? t[l] + bias[l] + (res ? res[l] : 0.0f) : 0.0f;
        t[l] = clamp == 1 && l < n ? (u < lo ? lo : u > hi ? hi : u) : u;
        if (l < n) dst[l] = t[l];
    }
    if (clamp == NH_GELU) {  /* lanes past n are 0, and GELU(0) = 0 */
        st(t, nh_gelu(ld(t)));
        for (int l = 0; l < n; l++) dst[l] = t[l];
    }
    return ld(t);
#endif
}

/* Saliency sums a gated layer's selection starts from: per instance and channel, the sum over the
 * map's positions of v * v (SAL_L2) or |v| (SAL_L1). A layer may take its input's from the layer
 * that wrote the input (in: no pass over the input of its own) and hand its output's to the next
 * (out, computed in its epilogue from the values it stores). */
typedef struct {
    const float *in;   /* (N, C) of x for the layer's saliency code; NULL: computed from x */
    float *out;        /* (N, cout) of the output; NULL: none */
    int64_t out_kind;  /* SAL_L2 or SAL_L1 */
    /* a program's hand-off (ispc_run_ops, one instance): hand_out, the threads' rows of output
     * sums left there unreduced (out not written); hand_in, the previous op's such rows (rows of
     * hand_cs doubles, one a thread), reduced by the selection in place of in. NULL: none */
    double *hand_out;
    const double *hand_in;
    int64_t hand_cs;
} ispc_sums_t;

typedef double vd __attribute__((vector_size(VW * 8)));

/* v * v or |v| */
static inline vf sum_term(vf v, int kind) {
    return kind == SAL_L2 ? v * v : (vf)((vi)v & 0x7fffffff);
}

/* row[0..n) += lanes [0, n) of v, in doubles */
static inline void add_lanes(double *row, vf v, int n) {
#if !defined(__AVX512F__) && defined(__AVX__)
    /* two halves converted in registers: the vector-extension form went through the stack (stores
     * of 64 bits, a load of 256: a store-forwarding stall each call) */
    if (n >= VW) {
        const __m256 x = (__m256)v;
        const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x)),
                      hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
        _mm256_storeu_pd(row, _mm256_add_pd(_mm256_loadu_pd(row), lo));
        _mm256_storeu_pd(row + 4, _mm256_add_pd(_mm256_loadu_pd(row + 4), hi));
        return;
    }
#endif
    if (n >= VW) {
        vd a;
        memcpy(&a, row, sizeof a);
        a += __builtin_convertvector(v, vd);
        memcpy(row, &a, sizeof a);
        return;
    }
    float t[VW];
    st(t, v);
    for (int l = 0; l < n; l++) row[l] += (double)t[l];
}

/* out[n][c] = sum over threads of part[t][n][c] (rows of stride cs), in thread order: the same
 * sums for a given thread count. Inside a parallel region; ends with a barrier. */
/* one sum over the threads' rows (stride apart), in thread order, rounded to float: what
 * reduce_sums writes and what a hand-off's reader (nh_select) reduces, the same values */
static inline float sum_rows(const double *p, int64_t threads, int64_t stride) {
    double a = 0.0;
    for (int64_t t = 0; t < threads; t++) a += p[t * stride];
    return (float)a;
}

static void reduce_sums(const double *part, int64_t threads, int64_t N, int64_t C, int64_t cs,
                        float *out) {
    #pragma omp for collapse(2) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < C; c++)
            out[n * C + c] = sum_rows(part + n * cs + c, threads, N * cs);
}

/* A tile's epilogue: positions' outputs out + i * ostride (npos of them valid), lanes [0, lanes)
 * of the block, bias, residual (NULL: none) indexed like out, clamp; output sums (yrow NULL: none)
 * of kind ykind added into yrow[0..lanes). */
typedef struct {
    float *out;
    const float *res, *bias;
    int64_t ostride;
    int npos, lanes, clamp, ykind;
    float lo, hi;
    double *yrow;
    int stream;  /* whole tiles' vectors stored past the caches (aligned: see nh_stream) */
    /* IND 2 tiles: rows pfr[0..pfn) (nr floats each, another group's) prefetched into L2, one
     * every pfe steps (see NH_NPF) */
    const float *const *pfr;
    int64_t pfn, pfe;
} nh_epi_t;

/* the epilogue of the block o lanes on: its outputs, residual, bias and output sums */
static inline __attribute__((always_inline)) void
nh_epi_shift(nh_epi_t *e, int64_t o) {
    e->out += o;
    if (e->res) e->res += o;
    e->bias += o;
    if (e->yrow) e->yrow += o;
}

/* a whole output vector to dst, aligned to its size, with a non-temporal store where the build
 * has one: no read of the line before it is written (write-allocate), and the caches kept for
 * what is read again */
static inline void nt_st(float *dst, vf v) {
#if defined(__AVX512F__)
    _mm512_stream_ps(dst, (__m512)v);
#elif defined(__AVX__)
    _mm256_stream_ps(dst, (__m256)v);
#else
    st(dst, v);
#endif
}

/* The finished accumulators through the epilogue into the output. The whole tile's path is
 * unrolled with the epilogue's fields in locals, and the partial tile's reads a copy of the
 * accumulators: an accumulator indexed at run time kept the whole tile in memory (zeroed, spilled
 * and reloaded around the reduction: ~100 of the ~220 cycles a 1x1 tile spent beside its FMAs). */
#ifndef NH_EPI_REGS  /* 0: the former loops (A/B) */
#define NH_EPI_REGS 1
#endif
#if NH_EPI_REGS
#define NH_UNROLL _Pragma("GCC unroll 16")
#else
#define NH_UNROLL
#endif
#define NH_EPILOGUE(MR, NV, acc, e)                                                              \
    if ((e)->npos == MR && (e)->lanes == NV * VW) { /* whole tile: plain stores */               \
        const float *const res_ = (e)->res;                                                      \
        float *const out_ = (e)->out;                                                            \
        const int64_t os_ = (e)->ostride;                                                        \
        const int clamp_ = (e)->clamp, ykind_ = (e)->ykind, stream_ = (e)->stream;               \
        const float lo_ = (e)->lo, hi_ = (e)->hi;                                                \
        double *const yrow_ = (e)->yrow;                                                         \
        vf bv[NV], sq[NV];                                                                       \
        NH_UNROLL                                                                                \
        for (int j = 0; j < NV; j++) {                                                           \
            bv[j] = ld((e)->bias + j * VW);                                                      \
            sq[j] = (vf){0};                                                                     \
        }                                                                                        \
        NH_UNROLL                                                                                \
        for (int i = 0; i < MR; i++) {                                                           \
            vf v[NV];                                                                            \
            NH_UNROLL                                                                            \
            for (int j = 0; j < NV; j++) {                                                       \
                v[j] = acc[i][j] + bv[j];                                                        \
                if (res_) v[j] += ld(res_ + i * os_ + j * VW);                                   \
                v[j] = clamp_ ? nh_act(v[j], clamp_, lo_, hi_) : v[j];                           \
                if (yrow_) sq[j] += sum_term(v[j], ykind_);                                      \
            }                                                                                    \
            /* a position's vectors stored back to back: whole lines for the streaming stores */ \
            float *d = out_ + i * os_;                                                           \
            NH_UNROLL                                                                            \
            for (int j = 0; j < NV; j++)                                                         \
                if (stream_) nt_st(d + j * VW, v[j]); else st(d + j * VW, v[j]);                 \
        }                                                                                        \
        if (yrow_)                                                                               \
            for (int j = 0; j < NV; j++) add_lanes(yrow_ + j * VW, sq[j], VW);                   \
    } else {                                                                                     \
        vf a_[MR][NV];                                                                           \
        NH_UNROLL                                                                                \
        for (int i = 0; i < MR; i++)                                                             \
            NH_UNROLL                                                                            \
            for (int j = 0; j < NV; j++) a_[i][j] = acc[i][j];                                   \
        for (int j = 0; j < NV && j * VW < (e)->lanes; j++) {                                    \
            const int nl = (e)->lanes - j * VW < VW ? (e)->lanes - j * VW : VW;                  \
            vf sq = {0};                                                                         \
            for (int i = 0; i < MR && i < (e)->npos; i++) {                                      \
                const int64_t o = i * (e)->ostride + j * VW;                                     \
                const vf v = nh_store((e)->out + o, a_[i][j], (e)->bias + j * VW,                \
                                      (e)->res ? (e)->res + o : 0, nl, (e)->lo, (e)->hi,         \
                                      (e)->clamp);                                               \
                if ((e)->yrow) sq += sum_term(v, (e)->ykind);                                    \
            }                                                                                    \
            if ((e)->yrow) add_lanes((e)->yrow + j * VW, sq, nl);                                \
        }                                                                                        \
    }

/* Software prefetch of the weights NH_PF channels ahead: the indirect walk jumps between kept
 * channels' weight rows (and at a segment's end to the next tap's), which the hardware
 * prefetchers do not follow, and even the direct walk gains (it restarts at every 4 KiB page).
 * Dense: where a block of output channels' weights outgrows this CPU's L1 data cache (nh_pf_min;
 * NH_PF_MIN_BYTES fixes it); gated: where the layer's weights outgrow L2 (NH_PF_GATED_BYTES),
 * below which it measured no faster. */
#ifndef NH_PF
#define NH_PF 8
#endif
#ifndef NH_PF_LOC  /* the prefetches' locality hint: 3 into L1, 1 or 2 into L2 */
#define NH_PF_LOC 3
#endif
/* the L1 data cache's bytes (32 KiB where unknown): a block that fits is not prefetched (the
 * ResNet stem's 37.6 KB block on a 48 KiB L1 ran 3-5% faster without) */
static int64_t nh_l1_bytes = 32 << 10;
/* a core's L2 bytes (2 MiB where unknown; NH_L2_BYTES fixes it): the blocking and prefetch
 * thresholds that keep a working set in L2 derive from it, so that a 1 MiB L2 (AMD Zen 4) gets
 * blocks of its own size, not those of a 2 MiB one (Intel Sapphire Rapids) */
static int64_t nh_l2_bytes = 2 << 20;

__attribute__((constructor)) static void nh_read_caches(void) {  /* once, at load: no races */
#ifdef _SC_LEVEL1_DCACHE_SIZE
    const long v = sysconf(_SC_LEVEL1_DCACHE_SIZE);
    if (v >= (16 << 10) && v <= (1 << 20)) nh_l1_bytes = v;
#endif
#ifdef NH_L2_BYTES
    nh_l2_bytes = NH_L2_BYTES;
#elif defined(_SC_LEVEL2_CACHE_SIZE)
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (l2 >= (128 << 10) && l2 <= (64 << 20)) nh_l2_bytes = l2;
#endif
}

/* the L1 data cache's and L2's bytes as the kernels use them (level 1 or 2; -1 otherwise) */
int64_t ispc_cache_bytes(int level) { return level == 1 ? nh_l1_bytes : level == 2 ? nh_l2_bytes : -1; }

static int64_t nh_pf_min(void) {
#ifdef NH_PF_MIN_BYTES
    return NH_PF_MIN_BYTES;
#else
    return nh_l1_bytes;
#endif
}
/* NH_PF_GATED_BYTES: three quarters of L2 (1.5 MiB on a 2 MiB L2); -D fixes it */
static int64_t nh_pf_gated(void) {
#ifdef NH_PF_GATED_BYTES
    return NH_PF_GATED_BYTES;
#else
    return nh_l2_bytes / 4 * 3;
#endif
}

/* While a thread's tiles walk a group's compacted rows, they prefetch the kept rows of the
 * (group, instance) it runs next into L2, spread over the steps (NH_NPF 0: not), where the
 * layer's weights reach NH_NPF_BYTES (smaller ones stay in L2 from call to call). */
#ifndef NH_NPF
#define NH_NPF 1
#endif
#ifndef NH_NPF_LOC
#define NH_NPF_LOC 1
#endif
static int64_t nh_npf_bytes(void) {  /* NH_NPF_BYTES: nh_pf_gated where not fixed */
#ifdef NH_NPF_BYTES
    return NH_NPF_BYTES;
#else
    return nh_pf_gated();
#endif
}

/* one kept channel c of a tile: NV weight vectors at wc, MR broadcasts p[i][c], MR * NV FMAs;
 * pf (NULL: none): the weights to prefetch, NV * VW floats */
#define NH_STEP(MR, NV, c, wc, pf)                                                              \
    {                                                                                           \
        vf w[NV];                                                                               \
        NH_UNROLL                                                                               \
        for (int j = 0; j < NV; j++) w[j] = ld((wc) + j * VW);                                  \
        for (int j = 0; j < (pf ? NV * VW * 4 : 0); j += 64)                                    \
            __builtin_prefetch((const char *)(pf) + j, 0, NH_PF_LOC);                      \
        NH_UNROLL                                                                               \
        for (int i = 0; i < MR; i++) {                                                          \
            const float b = p[i][c];                                                            \
            NH_UNROLL                                                                           \
            for (int j = 0; j < NV; j++) acc[i][j] += b * w[j];                                 \
        }                                                                                       \
    }

/* the tile over segments s < nseg: acc[i][j] = sum over s, l < L of ptab[s][i][c] * w[s][cw][j],
 * c = ix[l] (IND 1, 2: kept channels by index) or l (IND 0: direct), cw = c, or l where the kept
 * rows were copied contiguously (IND 2, NH_COMPACT_TILES), weights prefetched D channels ahead
 * (0: not); the result through the epilogue */
/* A tile's walk over its segments of positions and its L channels (kept, by index or all:
   IND), one STEP(..., c, the channel's weight row of RW floats, the row to prefetch) each:
   the weights D channels ahead prefetched, or with IND 2 the next group's rows (e->pfr). Shared
   by the whole tiles (NH_STEP) and the partial ones (NH_PSTEP). */
#define NH_SEGMENTS(MR, IND, RW, STEP, ...)                                                     \
    for (int64_t s = 0; s < nseg; s++) {                                                        \
        const float *p[MR];                                                                     \
        NH_UNROLL                                                                               \
        for (int i = 0; i < MR; i++) p[i] = ptab[s * MR + i];                                   \
        const float *ws = wseg[s];                                                              \
        if (D <= 0) {                                                                           \
            for (int64_t l = 0; l < L; l++) {                                                   \
                const int64_t c = IND ? ix[l] : l, cw = IND == 2 ? l : c;                       \
                STEP(__VA_ARGS__, c, ws + cw * (RW), (const float *)0)                          \
                if (IND == 2 && pi < e->pfn && ++pc == e->pfe) {                                \
                    const char *q = (const char *)e->pfr[pi++];                                 \
                    pc = 0;                                                                     \
                    for (int j = 0; j < (RW) * 4; j += 64)                                      \
                        __builtin_prefetch(q + j, 0, NH_NPF_LOC);                               \
                }                                                                               \
            }                                                                                   \
            continue;                                                                           \
        }                                                                                       \
        /* ahead: this segment's channel l + D, past its end the next segment's first ones */   \
        const float *wn = s + 1 < nseg ? wseg[s + 1] : ws;                                      \
        const int64_t l1 = L > D ? L - D : 0;                                                   \
        int64_t l = 0;                                                                          \
        for (; l < l1; l++) {                                                                   \
            const int64_t c = IND ? ix[l] : l, cp = IND == 1 ? ix[l + D] : l + D;               \
            STEP(__VA_ARGS__, c, ws + (IND == 2 ? l : c) * (RW), ws + cp * (RW))                \
        }                                                                                       \
        for (; l < L; l++) {                                                                    \
            const int64_t c = IND ? ix[l] : l, j = l + D - L < L ? l + D - L : L - 1;           \
            const int64_t cp = IND == 1 ? ix[j] : j;                                            \
            STEP(__VA_ARGS__, c, ws + (IND == 2 ? l : c) * (RW), wn + cp * (RW))                \
        }                                                                                       \
    }

#define NHWC_KERNEL(NAME, MR, NV, IND)                                                          \
static void NAME(const float *const *ptab, const float *const *wseg, int64_t nseg, int64_t L,   \
                 const int32_t *ix, int64_t D, const nh_epi_t *e) {                             \
    vf acc[MR][NV];                                                                             \
    int64_t pc = 0, pi = 0;                                                                     \
    (void)pc; (void)pi;                                                                         \
    NH_UNROLL                                                                                   \
    for (int i = 0; i < MR; i++)                                                                \
        NH_UNROLL                                                                               \
        for (int j = 0; j < NV; j++) acc[i][j] = (vf){0};                                       \
    NH_SEGMENTS(MR, IND, NV * VW, NH_STEP, MR, NV)                                              \
    NH_EPILOGUE(MR, NV, acc, e)                                                                 \
}

typedef void (*nh_kernel_t)(const float *const *, const float *const *, int64_t, int64_t,
                            const int32_t *, int64_t, const nh_epi_t *);
#if defined(__AVX512F__)
NHWC_KERNEL(nh_i4, NH_MR4, 4, 1)
NHWC_KERNEL(nh_d4, NH_MR4, 4, 0)
NHWC_KERNEL(nh_c4, NH_MR4, 4, 2)
#if NH_MR4S > 0
NHWC_KERNEL(nh_i4s, NH_MR4S, 4, 1)
NHWC_KERNEL(nh_d4s, NH_MR4S, 4, 0)
NHWC_KERNEL(nh_c4s, NH_MR4S, 4, 2)
#endif
#endif
NHWC_KERNEL(nh_i3, NH_MR3, 3, 1)
NHWC_KERNEL(nh_d3, NH_MR3, 3, 0)
NHWC_KERNEL(nh_c3, NH_MR3, 3, 2)
NHWC_KERNEL(nh_i2, NH_MR2, 2, 1)
NHWC_KERNEL(nh_d2, NH_MR2, 2, 0)
NHWC_KERNEL(nh_c2, NH_MR2, 2, 2)
NHWC_KERNEL(nh_i1, NH_MR1, 1, 1)
NHWC_KERNEL(nh_d1, NH_MR1, 1, 0)
NHWC_KERNEL(nh_c1, NH_MR1, 1, 2)

/* AVX2 only: 1x1 stride-1 unpadded layers of short reductions (at most NH_PW_SHORT kept or
 * dense channels; MobileNetV2's expansions keep 8-12), the 6x2 tile's positions whole. The tile's
 * K inputs are gathered once into xg (contiguous), then every block of the group runs its K steps
 * from xg and its contiguous weight rows (compacted or dense) in this one call: no call through a
 * pointer, no position pointers or kept-channel index per step and block. The FMAs and the
 * epilogue are nh_c2's / nh_d2's in the same order: the same values. 0: off (A/B). */
#if !defined(__AVX512F__)
#ifndef NH_PW_SHORT
#define NH_PW_SHORT 16
#endif
#if NH_PW_SHORT > 0
static inline __attribute__((always_inline)) void
nh_pw_body(const float *x, int64_t C, const int32_t *ix, const int64_t K, const float *w,
           int64_t wstride, int64_t nb, int64_t nr, int64_t rem, nh_epi_t e) {
    float xg[NH_MR2 * NH_PW_SHORT];
    for (int i = 0; i < NH_MR2; i++)
        for (int64_t l = 0; l < K; l++) xg[i * NH_PW_SHORT + l] = x[i * C + (ix ? ix[l] : l)];
    for (int64_t b = 0; b < nb; b++, w += wstride, rem -= nr) {
        vf acc[NH_MR2][2];
        NH_UNROLL
        for (int i = 0; i < NH_MR2; i++) acc[i][0] = acc[i][1] = (vf){0};
        for (int64_t l = 0; l < K; l++) {
            const vf w0 = ld(w + l * nr), w1 = ld(w + l * nr + VW);
            NH_UNROLL
            for (int i = 0; i < NH_MR2; i++) {
                const float v = xg[i * NH_PW_SHORT + l];
                acc[i][0] += v * w0;
                acc[i][1] += v * w1;
            }
        }
        e.lanes = (int)(rem < nr ? rem : nr);
        nh_epi_t *const ep = &e;
        NH_EPILOGUE(NH_MR2, 2, acc, ep)
        nh_epi_shift(&e, nr);
    }
}

/* nh_pw_body with MobileNetV2's reductions (8, 12, 16) as constants: steps unrolled */
static void nh_pw_tile(const float *x, int64_t C, const int32_t *ix, int64_t K, const float *w,
                       int64_t wstride, int64_t nb, int64_t nr, int64_t rem, nh_epi_t e) {
    switch (K) {
    case 8: nh_pw_body(x, C, ix, 8, w, wstride, nb, nr, rem, e); break;
    case 12: nh_pw_body(x, C, ix, 12, w, wstride, nb, nr, rem, e); break;
    case 16: nh_pw_body(x, C, ix, 16, w, wstride, nb, nr, rem, e); break;
    default: nh_pw_body(x, C, ix, K, w, wstride, nb, nr, rem, e);
    }
}
#endif
#else
#define NH_PW_SHORT 0
#endif

/* AVX2 only: the last, partial tile of a (group, instance) on the 6x2 tile (49 positions of a 7x7
 * map are 8 tiles and 1 position; 196 of 14x14, 32 and 4), as a tile of its r positions over NB
 * blocks of output channels at once (r x 2 x NB <= 12 accumulators; the weights as the FMAs'
 * memory operands): the 6x2 kernel ran it as 6 positions (5 of 6 wasted at 7x7, a tenth of
 * ResNet-50's layer4), and a 1x2 tile alone would wait on its 2 FMA chains. Per position and lane
 * the sums are nh_c2's / nh_d2's / nh_i2's in the same order, the epilogue theirs: the same values.
 * Blocks past nb (the group's last batch) repeat block 0's weights and are not stored. 0: off. */
#if !defined(__AVX512F__)
#ifndef NH_TAIL
#define NH_TAIL 1
#endif
#else
#undef NH_TAIL
#define NH_TAIL 0
#endif
#if NH_TAIL
/* ptab rows are NH_MR2 apart (nh_conv's tile); e: block 0's epilogue, rem: lanes from block 0 on */
#define NHWC_TAIL(NAME, MR, NB, IND)                                                            \
static void NAME(const float *const *ptab, const float *const *wseg, int64_t nseg, int64_t L,   \
                 const int32_t *ix, int64_t bstride, int64_t nb, int64_t rem, const nh_epi_t *e0) { \
    vf acc[NB][MR][2];                                                                          \
    int64_t boff[NB];                                                                           \
    int64_t pc = 0, pi = 0;                                                                     \
    (void)pc; (void)pi;                                                                         \
    NH_UNROLL                                                                                   \
    for (int b = 0; b < NB; b++) {                                                              \
        boff[b] = b < nb ? b * bstride : 0;                                                     \
        NH_UNROLL                                                                               \
        for (int i = 0; i < MR; i++) acc[b][i][0] = acc[b][i][1] = (vf){0};                     \
    }                                                                                           \
    for (int64_t s = 0; s < nseg; s++) {                                                        \
        const float *p[MR];                                                                     \
        NH_UNROLL                                                                               \
        for (int i = 0; i < MR; i++) p[i] = ptab[s * NH_MR2 + i];                               \
        const float *ws = wseg[s];                                                              \
        for (int64_t l = 0; l < L; l++) {                                                       \
            const int64_t c = IND ? ix[l] : l, cw = IND == 2 ? l : c;                           \
            const float *wc = ws + cw * (2 * VW);                                               \
            float bc[MR];                                                                       \
            NH_UNROLL                                                                           \
            for (int i = 0; i < MR; i++) bc[i] = p[i][c];                                       \
            NH_UNROLL                                                                           \
            for (int b = 0; b < NB; b++) {                                                      \
                const vf w0 = ld(wc + boff[b]), w1 = ld(wc + boff[b] + VW);                     \
                NH_UNROLL                                                                       \
                for (int i = 0; i < MR; i++) {                                                  \
                    acc[b][i][0] += bc[i] * w0;                                                 \
                    acc[b][i][1] += bc[i] * w1;                                                 \
                }                                                                               \
            }                                                                                   \
            if (IND == 2 && pi < e0->pfn && ++pc == e0->pfe) {                                  \
                const char *q = (const char *)e0->pfr[pi++];                                    \
                pc = 0;                                                                         \
                for (int j = 0; j < 2 * VW * 4; j += 64) __builtin_prefetch(q + j, 0, NH_NPF_LOC); \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    for (int b = 0; b < NB && b < nb; b++) {                                                    \
        const int64_t o = b * 2 * VW;                                                           \
        nh_epi_t eb = *e0;                                                                      \
        nh_epi_shift(&eb, o);                                                                   \
        eb.lanes = (int)(rem - o < 2 * VW ? rem - o : 2 * VW);                                  \
        nh_epi_t *const e = &eb;                                                                \
        NH_EPILOGUE(MR, 2, acc[b], e)                                                           \
    }                                                                                           \
}

typedef void (*nh_tail_t)(const float *const *, const float *const *, int64_t, int64_t,
                          const int32_t *, int64_t, int64_t, int64_t, const nh_epi_t *);
NHWC_TAIL(nh_t1d, 1, 6, 0) NHWC_TAIL(nh_t1i, 1, 6, 1) NHWC_TAIL(nh_t1c, 1, 6, 2)
NHWC_TAIL(nh_t2d, 2, 3, 0) NHWC_TAIL(nh_t2i, 2, 3, 1) NHWC_TAIL(nh_t2c, 2, 3, 2)
NHWC_TAIL(nh_t3d, 3, 2, 0) NHWC_TAIL(nh_t3i, 3, 2, 1) NHWC_TAIL(nh_t3c, 3, 2, 2)
NHWC_TAIL(nh_t4d, 4, 1, 0) NHWC_TAIL(nh_t4i, 4, 1, 1) NHWC_TAIL(nh_t4c, 4, 1, 2)
NHWC_TAIL(nh_t5d, 5, 1, 0) NHWC_TAIL(nh_t5i, 5, 1, 1) NHWC_TAIL(nh_t5c, 5, 1, 2)

/* the tail kernel of r positions (1 to NH_MR2 - 1; ind as nh_kernel's) and its blocks a call */
static nh_tail_t nh_tail(int64_t r, int ind, int64_t *nbk) {
    static const nh_tail_t t[5][3] = {{nh_t1d, nh_t1i, nh_t1c}, {nh_t2d, nh_t2i, nh_t2c},
                                      {nh_t3d, nh_t3i, nh_t3c}, {nh_t4d, nh_t4i, nh_t4c},
                                      {nh_t5d, nh_t5i, nh_t5c}};
    static const int64_t blocks[5] = {6, 3, 2, 1, 1};
    *nbk = blocks[r - 1];
    return t[r - 1][ind];
}
#endif

/* the tile of nv vectors and mr positions; ind: 0 direct, 1 indirect, 2 compacted weights */
static nh_kernel_t nh_kernel(int64_t nv, int64_t mr, int ind) {
    static const nh_kernel_t k3[3] = {nh_d3, nh_i3, nh_c3}, k2[3] = {nh_d2, nh_i2, nh_c2},
                             k1[3] = {nh_d1, nh_i1, nh_c1};
    switch (nv) {
#if defined(__AVX512F__)
    case 4: {
        static const nh_kernel_t k4[3] = {nh_d4, nh_i4, nh_c4};
#if NH_MR4S > 0
        static const nh_kernel_t k4s[3] = {nh_d4s, nh_i4s, nh_c4s};
        if (mr == NH_MR4S) return k4s[ind];
#endif
        (void)mr;
        return k4[ind];
    }
#else
    (void)mr;
#endif
    case 3: return k3[ind];
    case 2: return k2[ind];
    default: return k1[ind];
    }
}

/* ---- partial last blocks (AVX-512): a block whose kept lanes end short of its nv * 16 (the
 * last of a layer whose cout is not a multiple: MobileNetV2's 24-channel projections on the
 * 32-lane tile, 144 = 4 x 32 + 16, 160 = 2 x 64 + 32) runs a tile of NZ whole vectors and, where
 * NH, one 8-float (256-bit) vector, on the same packed weights (PNV vectors a row). On 256-bit
 * datapaths (AMD Zen 4) a 512-bit FMA is two 256-bit ones: 24 lanes as 16 + 8 skip a quarter of
 * a 32-lane tile's FMAs. The lanes computed are the full tile's in the same order: the same
 * values bit for bit. NH_PART 0: the full tiles (A/B). */
#if defined(__AVX512F__)
#ifndef NH_PART
#define NH_PART 1
#endif
#else
#undef NH_PART
#define NH_PART 0
#endif
#if NH_PART
typedef float vh __attribute__((vector_size(32)));  /* 8 floats: a ymm register */
typedef double vd8 __attribute__((vector_size(64)));
static inline vh ldh(const float *p) { vh v; memcpy(&v, p, sizeof v); return v; }
static inline vf nh_zext(vh v) { return (vf)_mm512_zextps256_ps512((__m256)v); }
static inline vh nh_lo(vf v) { return (vh)_mm512_castps512_ps256((__m512)v); }

/* NH_STEP for the partial tile: NZ whole vectors and NH (0 or 1) half vectors of a PNV-vector row */
#define NH_PSTEP(MR, PNV, NZ, NH, c, wc, pf)                                                    \
    {                                                                                           \
        vf w[NZ];                                                                               \
        vh wh = {0};                                                                            \
        NH_UNROLL                                                                               \
        for (int j = 0; j < NZ; j++) w[j] = ld((wc) + j * VW);                                  \
        if (NH) wh = ldh((wc) + NZ * VW);                                                       \
        for (int j = 0; j < (pf ? PNV * VW * 4 : 0); j += 64)                                   \
            __builtin_prefetch((const char *)(pf) + j, 0, NH_PF_LOC);                           \
        NH_UNROLL                                                                               \
        for (int i = 0; i < MR; i++) {                                                          \
            const float b = p[i][c];                                                            \
            NH_UNROLL                                                                           \
            for (int j = 0; j < NZ; j++) acc[i][j] += b * w[j];                                 \
            if (NH) acch[i] += b * wh;                                                          \
        }                                                                                       \
    }

/* the epilogue: a whole tile of NZ * 16 + 8 lanes here (the half vector's bias and residual
 * read 8 floats), anything else through NH_EPILOGUE on the accumulators widened */
#define NH_PART_EPILOGUE(MR, NZ, NH, acc, acch, e)                                              \
    if (NH && (e)->npos == MR && (e)->lanes == NZ * VW + 8 && !(e)->stream) {                   \
        const float *const res_ = (e)->res;                                                     \
        float *const out_ = (e)->out;                                                           \
        const int64_t os_ = (e)->ostride;                                                       \
        const int clamp_ = (e)->clamp, ykind_ = (e)->ykind;                                     \
        const float lo_ = (e)->lo, hi_ = (e)->hi;                                               \
        double *const yrow_ = (e)->yrow;                                                        \
        vf bv[NZ + 1], sq[NZ + 1];                                                              \
        NH_UNROLL                                                                               \
        for (int j = 0; j < NZ; j++) bv[j] = ld((e)->bias + j * VW);                            \
        bv[NZ] = nh_zext(ldh((e)->bias + NZ * VW));                                             \
        NH_UNROLL                                                                               \
        for (int j = 0; j <= NZ; j++) sq[j] = (vf){0};                                          \
        NH_UNROLL                                                                               \
        for (int i = 0; i < MR; i++) {                                                          \
            vf v[NZ + 1];                                                                       \
            NH_UNROLL                                                                           \
            for (int j = 0; j <= NZ; j++) {                                                     \
                v[j] = (j < NZ ? acc[i][j < NZ ? j : 0] : nh_zext(acch[i])) + bv[j];            \
                if (res_) v[j] += j < NZ ? ld(res_ + i * os_ + j * VW)                          \
                                         : nh_zext(ldh(res_ + i * os_ + NZ * VW));              \
                v[j] = clamp_ ? nh_act(v[j], clamp_, lo_, hi_) : v[j];                          \
                if (yrow_) sq[j] += sum_term(v[j], ykind_);                                     \
            }                                                                                   \
            float *d = out_ + i * os_;                                                          \
            NH_UNROLL                                                                           \
            for (int j = 0; j < NZ; j++) st(d + j * VW, v[j]);                                  \
            vh h = nh_lo(v[NZ]);                                                                \
            memcpy(d + NZ * VW, &h, sizeof h);                                                  \
        }                                                                                       \
        if (yrow_) {                                                                            \
            for (int j = 0; j < NZ; j++) add_lanes(yrow_ + j * VW, sq[j], VW);                  \
            vd8 a;                                                                              \
            memcpy(&a, yrow_ + NZ * VW, sizeof a);                                              \
            a += __builtin_convertvector(nh_lo(sq[NZ]), vd8);                                   \
            memcpy(yrow_ + NZ * VW, &a, sizeof a);                                              \
        }                                                                                       \
    } else {                                                                                    \
        vf w_[MR][NZ + NH];                                                                     \
        NH_UNROLL                                                                               \
        for (int i = 0; i < MR; i++) {                                                          \
            NH_UNROLL                                                                           \
            for (int j = 0; j < NZ; j++) w_[i][j] = acc[i][j];                                  \
            if (NH) w_[i][NZ + NH - 1] = nh_zext(acch[i]);                                      \
        }                                                                                       \
        NH_EPILOGUE(MR, (NZ + NH), w_, e)                                                       \
    }

/* NHWC_KERNEL's walk (the same segments, indices and prefetches) on the partial tile */
#define NHWC_PART_KERNEL(NAME, MR, PNV, NZ, NH, IND)                                            \
static void NAME(const float *const *ptab, const float *const *wseg, int64_t nseg, int64_t L,   \
                 const int32_t *ix, int64_t D, const nh_epi_t *e) {                             \
    vf acc[MR][NZ];                                                                             \
    vh acch[MR];                                                                                \
    int64_t pc = 0, pi = 0;                                                                     \
    (void)pc; (void)pi; (void)acch;                                                             \
    NH_UNROLL                                                                                   \
    for (int i = 0; i < MR; i++) {                                                              \
        NH_UNROLL                                                                               \
        for (int j = 0; j < NZ; j++) acc[i][j] = (vf){0};                                       \
        acch[i] = (vh){0};                                                                      \
    }                                                                                           \
    NH_SEGMENTS(MR, IND, PNV * VW, NH_PSTEP, MR, PNV, NZ, NH)                                   \
    NH_PART_EPILOGUE(MR, NZ, NH, acc, acch, e)                                                  \
}

/* 2-vector blocks (14 positions): 16 + 8 lanes, 16 lanes; 4-vector blocks: 32 lanes */
NHWC_PART_KERNEL(nh_d2h, NH_MR2, 2, 1, 1, 0)
NHWC_PART_KERNEL(nh_i2h, NH_MR2, 2, 1, 1, 1)
NHWC_PART_KERNEL(nh_c2h, NH_MR2, 2, 1, 1, 2)
NHWC_PART_KERNEL(nh_d2q, NH_MR2, 2, 1, 0, 0)
NHWC_PART_KERNEL(nh_i2q, NH_MR2, 2, 1, 0, 1)
NHWC_PART_KERNEL(nh_c2q, NH_MR2, 2, 1, 0, 2)
NHWC_PART_KERNEL(nh_d4q, NH_MR4, 4, 2, 0, 0)
NHWC_PART_KERNEL(nh_i4q, NH_MR4, 4, 2, 0, 1)
NHWC_PART_KERNEL(nh_c4q, NH_MR4, 4, 2, 0, 2)
#if NH_MR4S > 0
NHWC_PART_KERNEL(nh_d4sq, NH_MR4S, 4, 2, 0, 0)
NHWC_PART_KERNEL(nh_i4sq, NH_MR4S, 4, 2, 0, 1)
NHWC_PART_KERNEL(nh_c4sq, NH_MR4S, 4, 2, 0, 2)
#endif
#endif

/* AVX-512: 1x1 stride-1 unpadded layers of short reductions (at most NH_PW512 kept or dense
 * channels: MobileNetV2's 112x112 and 56x56 expansions, 16 and 24 channels, 8 and 12 kept) on the
 * 14x2 tile, positions whole: the AVX2 build's nh_pw_tile. The tile's K inputs are gathered once
 * into a contiguous array (read in place where dense), so one base register serves the
 * broadcasts where the 14 position pointers spilled, then every block of the group runs its K
 * steps in this one call, the last one on its partial tile (NH_PART). The FMAs and epilogues are
 * the tiles' in the same order: the same values. Off (0) by default: alone it ran 0.98-1.08x the
 * usual tiles' time on Zen 4 (docs/benchmarks.md); -DNH_PW512=24 for A/Bs. */
#if NH_PART
#ifndef NH_PW512
#define NH_PW512 0
#endif
#else
#undef NH_PW512
#define NH_PW512 0
#endif
#if NH_PW512 > 0
#ifndef NH_PW512_UNROLL  /* the steps' unrolling: whole, the code outgrew L1i (A/B) */
#define NH_PW512_UNROLL _Pragma("GCC unroll 2")
#endif
/* one block: NZ whole and NH half vectors of rows of nr floats */
#define NH_PW_BLOCK(NAME, NZ, NH)                                                               \
static inline __attribute__((always_inline)) void                                               \
NAME(const float *xg, const int64_t XS, const int64_t K, const float *w, int64_t nr,            \
     const nh_epi_t *e) {                                                                       \
    vf acc[NH_MR2][NZ];                                                                         \
    vh acch[NH_MR2];                                                                            \
    (void)acch;                                                                                 \
    NH_UNROLL                                                                                   \
    for (int i = 0; i < NH_MR2; i++) {                                                          \
        NH_UNROLL                                                                               \
        for (int j = 0; j < NZ; j++) acc[i][j] = (vf){0};                                       \
        acch[i] = (vh){0};                                                                      \
    }                                                                                           \
    NH_PW512_UNROLL                                                                             \
    for (int64_t l = 0; l < K; l++) {                                                           \
        vf wv[NZ];                                                                              \
        vh wh = {0};                                                                            \
        NH_UNROLL                                                                               \
        for (int j = 0; j < NZ; j++) wv[j] = ld(w + l * nr + j * VW);                           \
        if (NH) wh = ldh(w + l * nr + NZ * VW);                                                 \
        NH_UNROLL                                                                               \
        for (int i = 0; i < NH_MR2; i++) {                                                      \
            const float v = xg[i * XS + l];                                                     \
            NH_UNROLL                                                                           \
            for (int j = 0; j < NZ; j++) acc[i][j] += v * wv[j];                                \
            if (NH) acch[i] += v * wh;                                                          \
        }                                                                                       \
    }                                                                                           \
    NH_PART_EPILOGUE(NH_MR2, NZ, NH, acc, acch, e)                                              \
}
NH_PW_BLOCK(nh_pw_blk2, 2, 0)
NH_PW_BLOCK(nh_pw_blk1h, 1, 1)
NH_PW_BLOCK(nh_pw_blk1, 1, 0)

/* the inputs read from xs, XS floats a position: x itself where dense and C == XS (positions
 * contiguous), else the gathered copy */
static inline __attribute__((always_inline)) void
nh_pw512_body(const float *x, int64_t C, const int32_t *ix, const int64_t K, const int64_t XS,
              const float *w, int64_t wstride, int64_t nb, int64_t nr, int64_t rem, nh_epi_t e) {
    float xg[NH_MR2 * NH_PW512];
    const float *xs = x;
    if (ix || C != XS) {
        for (int i = 0; i < NH_MR2; i++)
            for (int64_t l = 0; l < K; l++) xg[i * XS + l] = x[i * C + (ix ? ix[l] : l)];
        xs = xg;
    }
    for (int64_t b = 0; b < nb; b++, w += wstride, rem -= nr) {
        e.lanes = (int)(rem < nr ? rem : nr);
        if (e.lanes > VW + 8)
            nh_pw_blk2(xs, XS, K, w, nr, &e);
        else if (e.lanes > VW)
            nh_pw_blk1h(xs, XS, K, w, nr, &e);
        else
            nh_pw_blk1(xs, XS, K, w, nr, &e);
        nh_epi_shift(&e, nr);
    }
}

/* nh_pw512_body; dense 16- and 24-channel inputs (MobileNetV2's) read in place, a constant stride */
static void nh_pw512_tile(const float *x, int64_t C, const int32_t *ix, int64_t K, const float *w,
                          int64_t wstride, int64_t nb, int64_t nr, int64_t rem, nh_epi_t e) {
    if (!ix && K == 16) {  /* MobileNetV2's dense 16- and 24-channel inputs, read in place */
        nh_pw512_body(x, C, ix, 16, 16, w, wstride, nb, nr, rem, e);
        return;
    }
    if (!ix && K == 24) {
        nh_pw512_body(x, C, ix, 24, 24, w, wstride, nb, nr, rem, e);
        return;
    }
    nh_pw512_body(x, C, ix, K, NH_PW512, w, wstride, nb, nr, rem, e);
}
#endif

/* the partial tile for a block of nv vectors and mr positions whose kept lanes are lanes (< nv *
 * 16); ind as nh_kernel. NULL: none (the full tile) */
static nh_kernel_t nh_part_kernel(int64_t nv, int64_t mr, int64_t lanes, int ind) {
#if NH_PART
    static const nh_kernel_t h2[3] = {nh_d2h, nh_i2h, nh_c2h}, q2[3] = {nh_d2q, nh_i2q, nh_c2q},
                             q4[3] = {nh_d4q, nh_i4q, nh_c4q};
    if (nv == 2 && mr == NH_MR2 && lanes > 0)
        return lanes <= VW ? q2[ind] : lanes <= VW + 8 ? h2[ind] : 0;
    if (nv == 4 && lanes > 0 && lanes <= 2 * VW) {
        if (mr == NH_MR4) return q4[ind];
#if NH_MR4S > 0
        static const nh_kernel_t q4s[3] = {nh_d4sq, nh_i4sq, nh_c4sq};
        if (mr == NH_MR4S) return q4s[ind];
#endif
    }
#else
    (void)nv; (void)mr; (void)lanes; (void)ind;
#endif
    return 0;
}

/* The vectors per output-channel block a layer of cout output channels on maps of howo output
 * positions (0: unknown) packs its weights for: the tile with the least computed-but-unused work
 * (lanes past cout, positions past howo), weighed by each tile's measured speed. */
int64_t ispc_nhwc_vectors(int64_t cout, int64_t howo) {
#if defined(__AVX512F__)  /* ResNet/VGG/MobileNetV2 layers, per tile (benchmarks/layers.py A/B) */
    static const double rate[5] = {0, 0.72, 0.95, 0.85, 1.0};
#else  /* 4x3 streams 1.5x 6x2's weight bytes per FMA: where weights come from L2 (gated 1x1
        * layers, 7x7 maps) it ran at ~0.72 of 6x2, on small MobileNetV2 layers at ~0.85 */
    static const double rate[4] = {0, 0.7, 1.0, 0.78};
#endif
    int64_t best = 1;
    double best_cost = 1e300;
    for (int64_t nv = NH_MAXNV; nv >= 1; nv--) {
        const int64_t nr = nv * VW, mr = nh_mr(nv, howo);
        const double lanes = (double)((cout + nr - 1) / nr * nr);
        double pos = howo > 0 ? (double)((howo + mr - 1) / mr * mr) : 1.0;
#if defined(__AVX512F__)
        if (nv == 4 && mr != NH_MR4) pos /= NH_MR4S_GAIN;  /* rate[4]: the 7x4 tile's */
#endif
        const double cost = lanes * pos / rate[nv];
        if (cost < best_cost * 0.999) { best = nv; best_cost = cost; }
    }
    return best;
}

/* the widest tile's vectors on this build */
int64_t ispc_nhwc_max_vectors(void) { return NH_MAXNV; }

/* floats per vector register on this build (16: AVX-512, 8: AVX2 and the generic vectors): its
 * FMAs' width, which decides where Winograd pays (native.winograd_chosen) */
int64_t ispc_vector_floats(void) { return VW; }

/* ispc_nhwc_vectors for a layer whose reduction per output (kept channels x taps, 0: unknown) is
 * short: on AVX-512, where ispc_nhwc_vectors picks 6x4/7x4, a reduction r of at most
 * NH_SHORT_REDUCTION weighs the 8x3 tile as 1 + NH_SHORT_GAIN / r times as fast (fewer tiles, so
 * less of a tile's fixed cost). Off (0) since the tiles keep their accumulators in registers: the
 * fixed cost fell from ~310 to ~130-270 cycles a tile and block, and 6x4/7x4 then ran 0.87-0.96x
 * 8x3's time on ResNet-50's 1x1 layers at r = 32-256 (gated, residual, ReLU, output sums; AMD
 * Zen 4; docs/benchmarks.md). */
#ifndef NH_SHORT_REDUCTION
#define NH_SHORT_REDUCTION 0
#endif
#ifndef NH_SHORT_GAIN
#define NH_SHORT_GAIN 10.0
#endif
int64_t ispc_nhwc_vectors_for(int64_t cout, int64_t howo, int64_t reduction) {
    const int64_t nv = ispc_nhwc_vectors(cout, howo);
#if defined(__AVX512F__)
    if (nv == 4 && reduction > 0 && reduction <= NH_SHORT_REDUCTION) {  /* 6x4/7x4 or 8x3 */
        const int64_t mr4 = nh_mr(4, howo);
        double pos4 = howo > 0 ? (double)((howo + mr4 - 1) / mr4 * mr4) : 1.0;
        if (mr4 != NH_MR4) pos4 /= NH_MR4S_GAIN;
        const double pos3 = howo > 0 ? (double)((howo + NH_MR3 - 1) / NH_MR3 * NH_MR3) : 1.0;
        const double cost4 = (double)((cout + 4 * VW - 1) / (4 * VW) * 4 * VW) * pos4;
        const double cost3 = (double)((cout + 3 * VW - 1) / (3 * VW) * 3 * VW) * pos3
                             / (1.0 + NH_SHORT_GAIN / (double)reduction);
        return cost3 < cost4 * 0.999 ? 3 : 4;
    }
#else
    (void)reduction;
#endif
    return nv;
}

/* Weights (Cout, C, kh, kw) -> [ceil(Cout / NR)][kh * kw][C][NR], NR = nv * VW, zero past Cout. */
int64_t ispc_nhwc_packed_size(int64_t cout, int64_t C, int64_t T, int64_t nv) {
    const int64_t nr = nv * VW;
    return (cout + nr - 1) / nr * T * C * nr;
}

void ispc_pack_weight_nhwc(const float *w, int64_t cout, int64_t C, int64_t T, int64_t nv, float *dst) {
    const int64_t nr = nv * VW, cob = (cout + nr - 1) / nr;
    memset(dst, 0, sizeof(float) * cob * T * C * nr);
    for (int64_t co = 0; co < cout; co++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t t = 0; t < T; t++)
                dst[(((co / nr) * T + t) * C + c) * nr + co % nr] = w[(co * C + c) * T + t];
}

/* A layer for ispc_conv_nhwc (mirrored by native.py's _NhwcLayer). */
typedef struct {
    const float *wpack, *bias;
    int64_t C, cout, kh, kw, sh, sw, ph, pw, dh, dw, nv;
    const float *wino;  /* 3x3 stride 1: Winograd F(2x2, 3x3) weights (nh_wino); NULL: direct */
} ispc_nhwc_layer_t;

/* saliency blocks of positions: float sums per block, added into doubles in block order (the same
 * sums for any thread count) */
#define NH_SAL_BLOCK 64

/* Saliency and selection of instances [0, N) of x (N, HW, C), inside a parallel region (its
 * worksharing loops end with barriers): ix (N x C int32) ascending kept channels, counts (N,).
 * part: N * ceil(HW / NH_SAL_BLOCK) * C floats; s: N * C floats; tmp: N * C floats + N * C int64.
 * priv (one instance, its sums given): each thread selects alone into buffers of its own (the
 * same values as the shared path), no barrier: see nh_sel_private. */
static void nh_select(const float *x, int64_t N, int64_t HW, int64_t C, const float *scale,
                      int64_t saliency, int64_t mode, float threshold, int64_t k, int32_t *ix,
                      int64_t *counts, float *part, float *s, float *tmp, const float *xsums,
                      int priv, const double *hin, int64_t hcs) {
    const int64_t nb = (HW + NH_SAL_BLOCK - 1) / NH_SAL_BLOCK;
    const double hw = HW > 0 ? (double)HW : 1.0;
    if (priv) {
        int64_t *idx = (int64_t *)(tmp + C);
        const int64_t T = omp_get_num_threads();
        for (int64_t c = 0; c < C; c++) {
            /* the producer's rows reduced as reduce_sums would have (sum_rows), or its sums */
            const double a = hin ? (double)sum_rows(hin + c, T, hcs) : (double)xsums[c];
            s[c] = (float)(saliency == SAL_L2 ? __builtin_sqrt(a / hw) : a / hw) * scale[c];
        }
        counts[0] = select_row(s, C, (int)mode, threshold, k, idx, tmp);
        for (int64_t j = 0; j < counts[0]; j++) ix[j] = (int32_t)idx[j];
        return;
    }
    if (xsums) {  /* the input's sums from the layer that wrote it: no pass over x */
        #pragma omp for schedule(static)
        for (int64_t nc = 0; nc < N * C; nc++) {
            const double a = (double)xsums[nc];
            s[nc] = (float)(saliency == SAL_L2 ? __builtin_sqrt(a / hw) : a / hw) * scale[nc % C];
        }
        goto select;
    }
    #pragma omp for collapse(2) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t b = 0; b < nb; b++) {
            float *blk = part + (n * nb + b) * C;
            const int64_t p0 = b * NH_SAL_BLOCK, p1 = p0 + NH_SAL_BLOCK < HW ? p0 + NH_SAL_BLOCK : HW;
            memset(blk, 0, sizeof(float) * C);
            for (int64_t q = p0; q < p1; q++) {
                sal_add_row(blk, x + (n * HW + q) * C, C, saliency);
            }
        }
    const int64_t cblocks = (C + 63) / 64;  /* the block sums, in block order, 64 channels a task */
    #pragma omp for collapse(2) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t cb = 0; cb < cblocks; cb++)
            for (int64_t c = cb * 64; c < C && c < cb * 64 + 64; c++) {
                double a = 0.0;
                for (int64_t b = 0; b < nb; b++) a += (double)part[(n * nb + b) * C + c];
                s[n * C + c] = (float)(saliency == SAL_L2 ? __builtin_sqrt(a / hw) : a / hw) * scale[c];
            }
select:;
    int64_t *idx = (int64_t *)(tmp + N * C);
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        counts[n] = select_row(s + n * C, C, (int)mode, threshold, k, idx + n * C, tmp + n * C);
        for (int64_t j = 0; j < counts[n]; j++) ix[n * C + j] = (int32_t)idx[n * C + j];
    }
}

/* output positions per tile row: see the loop in nh_conv */
typedef struct {
    int64_t N, H, W, C, Ho, Wo, cout, kh, kw, sh, sw, ph, pw, dh, dw, T, nv, nr, mr, cob, tiles;
    int stream;  /* whole tiles' outputs with non-temporal stores (nh_stream) */
    int wino;    /* computed by nh_wino (the layer has its weights, the window fits) */
} nh_geom_t;

/* a call's output size (bytes) from which its whole tiles are stored past the caches
 * (non-temporal): at batch 32 ResNet-50's 56x56 1x1 layers write ~100 MB, which the next layer
 * cannot find in cache anyway, and a plain store reads each line first. 0: never. */
#ifndef NH_STREAM_BYTES
#define NH_STREAM_BYTES STREAM_BYTES
#endif

/* whether a call streams its output: large enough, and each whole tile's run of a position's
 * block a run of whole cache lines (a line-aligned output, rows and blocks whole lines: a
 * streamed line written in part is flushed in part). On AVX2 (two 32-byte stores a line) not
 * with a residual: ResNet-50's 64->256 1x1 + residual at 56x56, batch 32, ran 5-10% slower
 * streamed (the same layer without the residual 1.25-1.6x faster, and every AVX-512 case faster). */
static int nh_stream(const nh_geom_t *g, const float *out, const float *res) {
    const int64_t bytes = g->N * g->Ho * g->Wo * g->cout * (int64_t)sizeof(float);
#if !defined(__AVX512F__)
    if (res) return 0;
#else
    (void)res;
#endif
    return NH_STREAM_BYTES > 0 && bytes >= NH_STREAM_BYTES && g->cout % 16 == 0
           && g->nr % 16 == 0 && ((uintptr_t)out & 63) == 0;
}

static inline void nh_sfence(void) {
#if defined(__AVX512F__) || defined(__AVX__)
    _mm_sfence();
#endif
}

/* weights (bytes) of the blocks of output channels one tile runs through in a row: each tile
 * writes all of a group's channels of its positions at once (one pass over the output rows where
 * a group per block wrote each row in several strided passes: 1x1 64->256 at 56x56, its output
 * beyond L2, 1.6x faster), the group's weights staying in L2 across tiles: a quarter of L2
 * (512 KiB on a 2 MiB L2; on a 1 MiB L2 256 KiB measured the same as 512 KiB, ResNet-50 batch 1,
 * AMD EPYC Zen 4); -DNHWC_GROUP_BYTES fixes it */
static int64_t nh_group_bytes(void) {
#ifdef NHWC_GROUP_BYTES
    return NHWC_GROUP_BYTES;
#else
    return nh_l2_bytes / 4;
#endif
}

/* Gated layers whose (group, instance) runs at least NH_COMPACT_TILES tiles copy the group's
 * kept weight rows, [block][tap][K][nr], into a buffer of the thread's before its first tile, so
 * that every tile then reads them in order (the hardware prefetchers follow; the indirect walk
 * over scattered rows ran ~1.45x a dense layer of the kept channels at 7x7-14x14). 0: never. */
#ifndef NH_COMPACT_TILES
#define NH_COMPACT_TILES 2
#endif
/* ... in calls of at most this many instances: with more, a group's weights stay in L2 from one
 * instance to the next (ResNet-50 at batch 32 measured no gain compacted) */
#ifndef NH_COMPACT_MAX_N
#define NH_COMPACT_MAX_N 1
#endif
/* the copy's software prefetch: rows ahead, and its locality hint (1: into L2) */
#ifndef NH_CPF
#define NH_CPF 32
#endif
#ifndef NH_CPF_LOC
#define NH_CPF_LOC 1
#endif

/* this thread's compaction buffer, grown on demand (OpenMP's threads persist; never freed) */
static __thread float *nh_cbuf;
static __thread int64_t nh_cbuf_floats;

static float *nh_compact_buf(int64_t floats) {
    if (floats > nh_cbuf_floats) {
        free(nh_cbuf);
        const size_t bytes = (size_t)((floats + 15) / 16 * 16) * sizeof(float);
        nh_cbuf = (float *)aligned_alloc(64, bytes);
        nh_cbuf_floats = nh_cbuf ? floats : 0;
    }
    return nh_cbuf;  /* NULL: no memory, the tiles walk by index */
}

static __thread const float **nh_pbuf;  /* the rows to prefetch (NH_NPF), the same way */
static __thread int64_t nh_pbuf_n;

static const float **nh_prefetch_buf(int64_t n) {
    if (n > nh_pbuf_n) {
        free(nh_pbuf);
        nh_pbuf = (const float **)malloc(sizeof(const float *) * (size_t)n);
        nh_pbuf_n = nh_pbuf ? n : 0;
    }
    return nh_pbuf;
}

/* blocks [cb0, cb1) of the packed weights, their kept rows ix[0..K) of every tap, into dst */
static void nh_compact(const float *wpack, int64_t cb0, int64_t cb1, int64_t T, int64_t C,
                       int64_t nr, const int32_t *ix, int64_t K, float *dst) {
    for (int64_t cb = cb0; cb < cb1; cb++)
        for (int64_t t = 0; t < T; t++) {
            const float *src = wpack + (cb * T + t) * C * nr;
            for (int64_t l = 0; l < K; l++, dst += nr) {
                const float *a = src + ix[l] * nr;
                if (NH_CPF > 0) {
                    const float *pf = src + ix[l + NH_CPF < K ? l + NH_CPF : K - 1] * nr;
                    for (int64_t j = 0; j < nr; j += 16)
                        __builtin_prefetch(pf + j, 0, NH_CPF_LOC);
                }
                for (int64_t j = 0; j < nr; j += VW) st(dst + j, ld(a + j));
            }
        }
}

/* The convolution of instances [0, N) (x, out, res already offset to the first), inside a
 * parallel region: ix (N x C int32) each instance's kept channels, counts (N,) how many (NULL:
 * all, dense). zeros: kw * C zero floats. Threads split (group of output-channel blocks, instance,
 * tile) in that order: a group's weights stay in cache across its tiles, each tile writes the
 * group's channels of its positions at once. Ends with a barrier. */
/* Thread tid's run [i0, i1) of nth of the items (group, instance, tile), per items of each of
 * groups groups of G blocks of output channels (the last has the rest of cob): runs of nearly
 * equal blocks x tiles, not of equal items. A split by items gave a thread twice its partner's
 * work where a small layer's last group is short (MobileNetV2's 960 -> 160 at 7x7, batch 1: cob
 * 3 in groups of 2 and 1, 7 tiles each: 14 block-tiles against 7). */
static void nh_split(int64_t groups, int64_t G, int64_t cob, int64_t per, int64_t nth, int64_t tid,
                     int64_t *i0, int64_t *i1) {
    const int64_t total = cob * per, last = cob - (groups - 1) * G;  /* blocks x items */
    int64_t at[2];
    for (int e = 0; e < 2; e++) {
        /* the first item whose work before it reaches the thread's share, rounded to the nearer
         * item boundary */
        const int64_t want = (tid + e) * total / nth;
        const int64_t full = (groups - 1) * G * per;  /* the work of every group but the last */
        int64_t it;
        if (want <= full) {
            const int64_t q = want / G, r = want % G;  /* items of G blocks */
            it = q + (2 * r >= G && q < (groups - 1) * per);
        } else {
            const int64_t q = (want - full) / last, r = (want - full) % last;
            it = (groups - 1) * per + q + (2 * r >= last);
        }
        at[e] = it > groups * per ? groups * per : it;
    }
    *i0 = at[0];
    *i1 = tid + 1 == nth ? groups * per : at[1];
}

/* Calls that copy their kept rows (batch 1, gated) on several threads (not an op's window on
 * one) group blocks by the copy's bytes, up to NH_CGROUP_L2 of L2 (0: by the layer's whole rows,
 * nh_group_bytes, as every other call): fewer groups leave more of a call split by positions, so
 * that each thread reads its own part of the input map from its L2 once per group instead of the
 * whole map from L3 (each thread then copies every group's rows, the layer's kept weights twice a
 * call: fewer bytes than the map's passes). */
#ifndef NH_CGROUP_L2
#define NH_CGROUP_L2 0.5
#endif
static int64_t nh_kmax(int64_t N, const int64_t *counts) {  /* the most rows an instance keeps */
    int64_t k = 0;
    for (int64_t n = 0; n < N; n++) k = counts[n] > k ? counts[n] : k;
    return k;
}

/* a group's bytes where a walk groups its blocks by the rows it keeps (never below nh_group_bytes) */
static int64_t nh_kept_budget(void) {
    const int64_t budget = (int64_t)(NH_CGROUP_L2 * nh_l2_bytes);
    return budget > nh_group_bytes() ? budget : nh_group_bytes();
}

/* blocks a group: as many of block_bytes as budget holds (1 to cob), evened out so that the
 * groups are of (nearly) equal size */
static int64_t nh_equal_groups(int64_t budget, int64_t block_bytes, int64_t cob) {
    int64_t G = budget / (block_bytes + 1);
    G = G < 1 ? 1 : G > cob ? cob : G;
    const int64_t groups = (cob + G - 1) / G;
    return (cob + groups - 1) / groups;
}

static int64_t nh_group_blocks(const nh_geom_t *g, const int64_t *counts) {
    int64_t rows = g->C, budget = nh_group_bytes();
    if (NH_CGROUP_L2 > 0 && counts && NH_COMPACT_TILES > 0 && g->tiles >= NH_COMPACT_TILES
        && g->N <= NH_COMPACT_MAX_N && omp_get_num_threads() > 1) {
        rows = nh_kmax(g->N, counts);
        budget = nh_kept_budget();
    }
    return nh_equal_groups(budget, g->T * rows * g->nr * (int64_t)sizeof(float), g->cob);
}

/* AVX2 only, weights stationary: 1x1 stride-1 unpadded layers at batch 1 whose reduction is at
 * most NH_WS_K kept (or dense) channels, no output sums, no streaming stores. A thread's positions
 * go in chunks of NH_WS_CHUNK: their K inputs gathered once (xg), then for each output vector (8
 * channels) its K weight vectors are loaded into registers once and the chunk's positions stream
 * past them, 6 at a time (6 accumulators, each position's K FMAs in the kept order, then the
 * epilogue: the tiles' values bit for bit). Off (0) by default: alone it measured 0.93-1.04x the
 * usual tiles' time, nh_pw_tile 0.77-0.90x (docs/benchmarks.md); -DNH_WS_K=8 or 12 for A/Bs. */
#if !defined(__AVX512F__)
#ifndef NH_WS_K
#define NH_WS_K 0
#endif
#define NH_WS_CHUNK 48
#if NH_WS_K > 0
static inline __attribute__((always_inline)) void
nh_ws_body(const float *xg, int64_t np, const int64_t K, const float *w, int64_t wrow,
           float *out, int64_t ostride, const float *bias, const float *res, int nl, float lo,
           float hi, int clamp) {
    vf wv[NH_WS_K];
    NH_UNROLL
    for (int l = 0; l < K; l++) wv[l] = ld(w + l * wrow);
    const vf bv = ld(bias);
    for (int64_t p = 0; p < np; p += 6) {
        vf acc[6];
        NH_UNROLL
        for (int i = 0; i < 6; i++) acc[i] = (vf){0};
        NH_UNROLL
        for (int l = 0; l < K; l++)
            NH_UNROLL
            for (int i = 0; i < 6; i++) acc[i] += xg[(p + i) * NH_WS_K + l] * wv[l];
        const int m = np - p < 6 ? (int)(np - p) : 6;
        for (int i = 0; i < m; i++) {
            float *d = out + (p + i) * ostride;
            if (nl == VW) {
                vf v = acc[i] + bv;
                if (res) v += ld(res + (p + i) * ostride);
                st(d, clamp ? nh_act(v, clamp, lo, hi) : v);
            } else {
                nh_store(d, acc[i], bias, res ? res + (p + i) * ostride : 0, nl, lo, hi, clamp);
            }
        }
    }
}

/* positions [q0, q1) of instance 0 (x, out, res at position 0) */
static void nh_ws(const nh_geom_t *g, const ispc_nhwc_layer_t *L, const float *x, const int32_t *ix,
                  int64_t K, float *out, const float *res, float lo, float hi, int clamp,
                  int64_t q0, int64_t q1) {
    const int64_t C = g->C, nr = g->nr, cout = g->cout, nvec = (cout + VW - 1) / VW;
    float xg[(NH_WS_CHUNK + 6) * NH_WS_K] __attribute__((aligned(32)));
    memset(xg + NH_WS_CHUNK * NH_WS_K, 0, sizeof(float) * 6 * NH_WS_K);
    for (int64_t q = q0; q < q1; q += NH_WS_CHUNK) {
        const int64_t np = q1 - q < NH_WS_CHUNK ? q1 - q : NH_WS_CHUNK;
        for (int64_t p = 0; p < np; p++)
            for (int64_t l = 0; l < K; l++) xg[p * NH_WS_K + l] = x[(q + p) * C + (ix ? ix[l] : l)];
        for (int64_t p = np; p < (np + 5) / 6 * 6; p++)
            for (int64_t l = 0; l < K; l++) xg[p * NH_WS_K + l] = 0.0f;
        for (int64_t v = 0; v < nvec; v++) {
            const int64_t cb = v * VW / nr, off = v * VW % nr;
            const float *w = L->wpack + cb * C * nr + off;  /* kept row l at + ix[l] * nr */
            int64_t wrow = nr;
            const int nl = cout - v * VW < VW ? (int)(cout - v * VW) : VW;
            float *o = out + q * cout + v * VW;
            const float *r = res ? res + q * cout + v * VW : 0;
            float wk[NH_WS_K * VW] __attribute__((aligned(32)));
            if (ix) {  /* kept rows by index: gathered into a contiguous copy (K vectors) */
                for (int64_t l = 0; l < K; l++) st(wk + l * VW, ld(w + ix[l] * nr));
                w = wk;
                wrow = VW;
            }
            switch (K) {
            case 8: nh_ws_body(xg, np, 8, w, wrow, o, cout, L->bias + v * VW, r, nl, lo, hi, clamp); break;
#if NH_WS_K >= 12
            case 12: nh_ws_body(xg, np, 12, w, wrow, o, cout, L->bias + v * VW, r, nl, lo, hi, clamp); break;
#endif
            default: nh_ws_body(xg, np, K, w, wrow, o, cout, L->bias + v * VW, r, nl, lo, hi, clamp);
            }
        }
    }
}
#endif
#else
#define NH_WS_K 0
#endif

static void nh_conv(const nh_geom_t *g, const ispc_nhwc_layer_t *L, const float *x, const int32_t *ix,
                    const int64_t *counts, float *out, const float *res, float lo, float hi,
                    int clamp, const float *zeros, double *ysums, int ykind) {
    const int64_t T = g->T, mr = g->mr, nr = g->nr, C = g->C, HoWo = g->Ho * g->Wo;
    const int64_t cs = g->cob * nr;  /* a row of output sums */
    double *yrow = 0;  /* this thread's rows of output sums, zeroed here: only it writes them */
    if (ysums) {
        yrow = ysums + (int64_t)omp_get_thread_num() * g->N * cs;
        memset(yrow, 0, sizeof(double) * g->N * cs);
    }
    const int64_t HWC = g->H * g->W * C;
    const nh_kernel_t kind = nh_kernel(g->nv, mr, 1), kdir = nh_kernel(g->nv, mr, 0),
                      kcmp = nh_kernel(g->nv, mr, 2);
    /* the last block's partial tile, where its lanes end short (nh_part_kernel) */
    const int64_t plast = g->cout - (g->cob - 1) * nr;
    const nh_kernel_t pind = nh_part_kernel(g->nv, mr, plast, 1),
                      pdir = nh_part_kernel(g->nv, mr, plast, 0),
                      pcmp = nh_part_kernel(g->nv, mr, plast, 2);
    const int64_t G = nh_group_blocks(g, counts), groups = (g->cob + G - 1) / G;
    const int64_t wbytes = T * C * nr * (int64_t)sizeof(float);  /* a block's */
    const int64_t pfd = wbytes >= nh_pf_min() ? NH_PF : 0;
    const int64_t pfg = wbytes * g->cob >= nh_pf_gated() ? pfd : 0;
    float *cbuf = counts && NH_COMPACT_TILES > 0 && g->tiles >= NH_COMPACT_TILES
                  && g->N <= NH_COMPACT_MAX_N
                  ? nh_compact_buf(G * T * nh_kmax(g->N, counts) * nr) : 0;
    int64_t ccg = -1, cn = -1;  /* the (group, instance) whose rows cbuf holds */
    const float *ptab[T * NH_MAXMR];
    const float *wseg[T];
    int64_t woff[T];
    /* the items (group, instance, tile) split into one run [i0, i1) per thread, so that a pair's
     * tiles know the pair it runs next (NH_NPF); weighed by their group's blocks (nh_split) */
    const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
    int64_t i0, i1;
    nh_split(groups, G, g->cob, g->N * g->tiles, nth, tid, &i0, &i1);
#if NH_WS_K > 0
    if (g->N == 1 && T == 1 && g->sh == 1 && g->sw == 1 && g->ph == 0 && g->pw == 0 && !yrow
        && !g->stream && (counts ? counts[0] : C) <= NH_WS_K && (counts ? counts[0] : C) > 0
        && groups == 1) {
        const int64_t q1 = i1 * mr < HoWo ? i1 * mr : HoWo;
        if (i0 * mr < q1)
            nh_ws(g, L, x, counts ? ix : 0, counts ? counts[0] : C, out, res, lo, hi, clamp, i0 * mr, q1);
        #pragma omp barrier
        return;
    }
#endif
    const float **prow = cbuf && NH_NPF && wbytes * g->cob >= nh_npf_bytes()
                         ? nh_prefetch_buf(G * T * nh_kmax(g->N, counts)) : 0;
    int64_t pn = 0, pt = 1, pk = 0;  /* rows in prow, this pair's tiles here, tiles done */
#if NH_PW_SHORT > 0
    const int pw1 = T == 1 && g->sh == 1 && g->sw == 1 && g->ph == 0 && g->pw == 0 && g->nv == 2
                    && mr == NH_MR2;  /* nh_pw_tile's layers */
#endif
#if NH_PW512 > 0
    const int pw512 = T == 1 && g->sh == 1 && g->sw == 1 && g->ph == 0 && g->pw == 0 && g->nv == 2
                      && mr == NH_MR2;  /* nh_pw512_tile's layers */
#endif
    for (int64_t it = i0; it < i1; it++) {
        const int64_t cg = it / (g->N * g->tiles), n = it / g->tiles % g->N;
        const int64_t tl = it % g->tiles;
        const int64_t K = counts ? counts[n] : C;
        const int dense = K == C;
        const float *xn = x + n * HWC;
        const int64_t p0 = tl * mr;
        int64_t ih0[NH_MAXMR], iw0[NH_MAXMR];
        int cols_inside = 1;
        int64_t oh = p0 / g->Wo, ow = p0 % g->Wo;  /* one division a tile */
        for (int64_t i = 0; i < mr; i++, ow++) {
            if (ow == g->Wo) { oh++; ow = 0; }
            if (p0 + i >= HoWo) { ih0[i] = -1 << 30; iw0[i] = 0; continue; }  /* past the end */
            ih0[i] = oh * g->sh - g->ph;
            iw0[i] = ow * g->sw - g->pw;
            cols_inside &= iw0[i] >= 0 && iw0[i] + (g->kw - 1) * g->dw < g->W;
        }
        /* the segments: position pointers and each one's weight offset in a block */
        int64_t nseg = 0, len;
        if (dense && cols_inside && g->dw == 1) {  /* one run of kw * C per tap row */
            len = g->kw * C;
            for (int64_t r = 0; r < g->kh; r++) {
                int any = 0;
                for (int64_t i = 0; i < mr; i++) {
                    const int64_t ih = ih0[i] + r * g->dh;
                    const int in = ih >= 0 && ih < g->H;
                    ptab[nseg * mr + i] = in ? xn + (ih * g->W + iw0[i]) * C : zeros;
                    any |= in;
                }
                if (any) woff[nseg++] = r * g->kw * C * nr;
            }
        } else {  /* one segment per tap */
            len = K;
            for (int64_t t = 0; t < T; t++) {
                const int64_t r = t / g->kw, q = t % g->kw;
                int any = 0;
                for (int64_t i = 0; i < mr; i++) {
                    const int64_t ih = ih0[i] + r * g->dh, iw = iw0[i] + q * g->dw;
                    const int in = ih >= 0 && ih < g->H && iw >= 0 && iw < g->W;
                    ptab[nseg * mr + i] = in ? xn + (ih * g->W + iw) * C : zeros;
                    any |= in;
                }
                if (any) woff[nseg++] = t * C * nr;
            }
        }
        const int64_t cb1 = (cg + 1) * G < g->cob ? (cg + 1) * G : g->cob;
        const int cmp = cbuf && !dense && K > 0;
        if (cmp && (cg != ccg || n != cn)) {
            nh_compact(L->wpack, cg * G, cb1, T, C, nr, ix + n * C, K, cbuf);
            ccg = cg;
            cn = n;
            const int64_t pair = it / g->tiles, next = (pair + 1) * g->tiles;
            pt = (next < i1 ? next : i1) - it;
            pk = 0;
            pn = 0;
            if (prow && next < i1) {  /* the next pair's kept rows, if gated */
                const int64_t cg2 = next / (g->N * g->tiles), n2 = next / g->tiles % g->N;
                const int64_t K2 = counts[n2];
                const int64_t c2 = (cg2 + 1) * G < g->cob ? (cg2 + 1) * G : g->cob;
                if (K2 > 0 && K2 < C)
                    for (int64_t cb = cg2 * G; cb < c2; cb++)
                        for (int64_t t = 0; t < T; t++) {
                            const float *src = L->wpack + (cb * T + t) * C * nr;
                            for (int64_t l = 0; l < K2; l++)
                                prow[pn++] = src + ix[n2 * C + l] * nr;
                        }
            }
        }
#if NH_PW512 > 0
        if (pw512 && p0 + mr <= HoWo && K > 0 && K <= NH_PW512 && (dense || cmp) && pn == 0) {
            const int64_t o = (n * HoWo + p0) * g->cout + cg * G * nr;
            nh_epi_t e = {out + o, res ? res + o : 0, L->bias + cg * G * nr, g->cout, (int)mr,
                          (int)nr, clamp, ykind, lo, hi, yrow ? yrow + n * cs + cg * G * nr : 0,
                          g->stream, 0, 0, 1};
            nh_pw512_tile(xn + p0 * C, C, dense ? 0 : ix + n * C, K,
                          cmp ? cbuf : L->wpack + cg * G * C * nr, (cmp ? K : C) * nr,
                          cb1 - cg * G, nr, g->cout - cg * G * nr, e);
            pk++;
            continue;
        }
#endif
#if NH_PW_SHORT > 0
        if (pw1 && p0 + mr <= HoWo && K > 0 && K <= NH_PW_SHORT && (dense || cmp) && pn == 0) {
            const int64_t o = (n * HoWo + p0) * g->cout + cg * G * nr;
            nh_epi_t e = {out + o, res ? res + o : 0, L->bias + cg * G * nr, g->cout, (int)mr,
                          (int)nr, clamp, ykind, lo, hi, yrow ? yrow + n * cs + cg * G * nr : 0,
                          g->stream, 0, 0, 1};
            nh_pw_tile(xn + p0 * C, C, dense ? 0 : ix + n * C, K,
                       cmp ? cbuf : L->wpack + cg * G * C * nr, (cmp ? K : C) * nr, cb1 - cg * G,
                       nr, g->cout - cg * G * nr, e);
            pk++;
            continue;
        }
#endif
#if NH_TAIL
        if (g->nv == 2 && mr == NH_MR2 && HoWo - p0 < mr) {  /* the partial last tile: nh_tail */
            int64_t nbk;
            const int ind = dense ? 0 : cmp ? 2 : 1;
            const nh_tail_t tk = nh_tail(HoWo - p0, ind, &nbk);
            const int64_t nb = cb1 - cg * G, bstride = T * (cmp ? K : C) * nr;
            for (int64_t cb = cg * G; cb < cb1; cb += nbk) {
                const float *wb = cmp ? cbuf + (cb - cg * G) * T * K * nr : L->wpack + cb * T * C * nr;
                for (int64_t s = 0; s < nseg; s++) wseg[s] = wb + (cmp ? woff[s] / C * K : woff[s]);
                const int64_t o = (n * HoWo + p0) * g->cout + cb * nr;
                nh_epi_t e = {out + o, res ? res + o : 0, L->bias + cb * nr, g->cout,
                              (int)(HoWo - p0), (int)nr, clamp, ykind, lo, hi,
                              yrow ? yrow + n * cs + cb * nr : 0, g->stream, 0, 0, 1};
                const int64_t nbb = cb1 - cb < nbk ? cb1 - cb : nbk;
                if (cmp && pn > 0) {  /* this tile's share of the rows, over its steps */
                    const int64_t q = pk * nb + (cb - cg * G);
                    const int64_t r0 = pn * q / (pt * nb), r1 = pn * (q + nbb) / (pt * nb);
                    const int64_t steps = nseg * len;
                    e.pfr = prow + r0;
                    e.pfn = r1 - r0;
                    e.pfe = e.pfn > 0 && steps > e.pfn ? steps / e.pfn : 1;
                }
                tk(ptab, wseg, K ? nseg : 0, len, dense ? 0 : ix + n * C,
                   bstride, nbb, g->cout - cb * nr, &e);
            }
            pk++;
            continue;
        }
#endif
        for (int64_t cb = cg * G; cb < cb1; cb++) {
            const float *wb = L->wpack + cb * T * C * nr;
            if (cmp) {  /* woff[s] = t * C * nr: tap t's rows at t * K * nr */
                wb = cbuf + (cb - cg * G) * T * K * nr;
                for (int64_t s = 0; s < nseg; s++) wseg[s] = wb + woff[s] / C * K;
            } else {
                for (int64_t s = 0; s < nseg; s++) wseg[s] = wb + woff[s];
            }
            const int64_t o = (n * HoWo + p0) * g->cout + cb * nr;
            const int64_t lanes = g->cout - cb * nr < nr ? g->cout - cb * nr : nr;
            nh_epi_t e = {out + o, res ? res + o : 0, L->bias + cb * nr, g->cout,
                          (int)(HoWo - p0 < mr ? HoWo - p0 : mr), (int)lanes, clamp,
                          ykind, lo, hi, yrow ? yrow + n * cs + cb * nr : 0,
                          g->stream, 0, 0, 1};
            if (cmp && pn > 0) {  /* this tile's share of the rows, over its steps */
                const int64_t nb = cb1 - cg * G, q = pk * nb + (cb - cg * G);
                const int64_t r0 = pn * q / (pt * nb), r1 = pn * (q + 1) / (pt * nb);
                const int64_t steps = nseg * len;
                e.pfr = prow + r0;
                e.pfn = r1 - r0;
                e.pfe = e.pfn > 0 && steps > e.pfn ? steps / e.pfn : 1;
            }
            const int part = lanes < nr && pdir;
            if (dense)
                (part ? pdir : kdir)(ptab, wseg, K ? nseg : 0, len, 0, pfd, &e);
            else if (cmp)
                (part ? pcmp : kcmp)(ptab, wseg, nseg, len, ix + n * C, 0, &e);
            else
                (part ? pind : kind)(ptab, wseg, K ? nseg : 0, len, ix + n * C, pfg, &e);
        }
        pk++;
    }
    if (g->stream) nh_sfence();  /* the streamed lines visible to every thread after the barrier */
    #pragma omp barrier
}

static void nh_geometry(nh_geom_t *g, const ispc_nhwc_layer_t *L, int64_t N, int64_t H, int64_t W) {
    g->N = N; g->H = H; g->W = W; g->C = L->C; g->cout = L->cout;
    g->kh = L->kh; g->kw = L->kw; g->sh = L->sh; g->sw = L->sw; g->ph = L->ph; g->pw = L->pw;
    g->dh = L->dh; g->dw = L->dw;
    g->Ho = conv_out(H, L->kh, L->sh, L->ph, L->dh);
    g->Wo = conv_out(W, L->kw, L->sw, L->pw, L->dw);
    g->T = L->kh * L->kw;
    g->nv = L->nv; g->nr = L->nv * VW; g->mr = nh_mr(L->nv, g->Ho * g->Wo);
    g->cob = (L->cout + g->nr - 1) / g->nr;
    g->tiles = (g->Ho * g->Wo + g->mr - 1) / g->mr;
    g->stream = 0;
    g->wino = L->wino && L->kh == 3 && L->kw == 3 && L->sh == 1 && L->sw == 1 && L->dh == 1
              && L->dw == 1 && g->Ho > 0 && g->Wo > 0;
}

/* instances' input bytes per chunk: saliency, selection and convolution run chunk by chunk, so
 * that the convolution reads the input the saliency pass just brought into cache: half of L2
 * (1 MiB on a 2 MiB L2); -DNHWC_CHUNK_BYTES fixes it */
static int64_t nh_chunk_bytes(void) {
#ifdef NHWC_CHUNK_BYTES
    return NHWC_CHUNK_BYTES;
#else
    return nh_l2_bytes / 2;
#endif
}

/* Gated layers with at least this many output positions per instance (28x28 and up) and at
 * least NH_GATHER_TAPS taps run each instance that keeps some but not all channels as a dense
 * convolution of copies: its kept channels gathered into a channels-last map of K channels, the
 * kept weights into [block][tap][K][nr]. The dense walk then reads each tap row as one run of
 * kw * K (one segment per tap row instead of per tap) and its input rows in order; the copies
 * cost ~1 / positions of the MACs. 0: never. */
#ifndef NH_GATHER_POSITIONS
#define NH_GATHER_POSITIONS 784
#endif
#ifndef NH_GATHER_TAPS
#define NH_GATHER_TAPS 2
#endif

static int nh_gathers(const nh_geom_t *g, int64_t mode) {
    return NH_GATHER_POSITIONS > 0 && mode != NHWC_DENSE && g->T >= NH_GATHER_TAPS
           && g->Ho * g->Wo >= NH_GATHER_POSITIONS;
}

/* instance i of a chunk (x, ix at the chunk's first) gathered: xg (HW, K) its kept channels,
 * wg [cob][T][K][nr] their weights. Inside a parallel region; ends with a barrier. */
static void nh_gather(const nh_geom_t *g, const ispc_nhwc_layer_t *L, const float *x,
                      const int32_t *ixi, int64_t K, float *xg, float *wg) {
    const int64_t HW = g->H * g->W, C = g->C, nr = g->nr, T = g->T;
    #pragma omp for schedule(static) nowait
    for (int64_t q = 0; q < HW; q++) {
        const float *src = x + q * C;
        float *dst = xg + q * K;
        for (int64_t l = 0; l < K; l++) dst[l] = src[ixi[l]];
    }
    #pragma omp for collapse(2) schedule(static)
    for (int64_t cb = 0; cb < g->cob; cb++)
        for (int64_t t = 0; t < T; t++) {
            const float *src = L->wpack + (cb * T + t) * C * nr;
            float *dst = wg + (cb * T + t) * K * nr;
            for (int64_t l = 0; l < K; l++) memcpy(dst + l * nr, src + ixi[l] * nr, sizeof(float) * nr);
        }
}

/* The workspace's parts (floats), shared by ispc_conv_nhwc and its size query; priv: a thread's
 * floats of selection where each thread selects alone (nh_sel_private), 0 where they share it. */
typedef struct {
    int64_t zeros, gather, sums, chunk, select, wino, total, priv;
} nh_plan_t;

/* Whether a gated layer's selection runs in every thread alone, redundantly (one instance whose
 * saliency sums its producer wrote: C values to scale and a top-k over them, ~1-3 us): the shared
 * selection's two worksharing loops (the second a top-k on one thread while the others wait)
 * cost two barriers a gated layer; -DNH_PRIVATE_SELECT=0 restores them */
#ifndef NH_PRIVATE_SELECT
#define NH_PRIVATE_SELECT 1
#endif
static int nh_sel_private(int64_t N, int64_t mode, const ispc_sums_t *sums) {
    return NH_PRIVATE_SELECT && mode != NHWC_DENSE && N == 1 && sums && sums->in;
}

/* a thread's selection floats (one instance): ix, the count, saliencies, scratch */
static int64_t nh_sel_thread_floats(int64_t C) {
    return ((C + 15) / 16 * 16 + 2 + C + 3 * C + 15) / 16 * 16;
}

static int64_t wino_thread_floats(const nh_geom_t *g, int64_t threads);

static void nh_plan(nh_plan_t *P, const nh_geom_t *g, int64_t mode, int64_t k,
                    const ispc_sums_t *sums, int64_t threads) {
    const int64_t N = g->N, C = g->C, HW = g->H * g->W, nb = (HW + NH_SAL_BLOCK - 1) / NH_SAL_BLOCK;
    P->zeros = (g->kw * C + 15) / 16 * 16;  /* a tap row of zeros: the padding's input */
    P->sums = sums && sums->out ? 2 * threads * N * g->cob * g->nr : 0;  /* doubles per thread */
    (void)k;
    /* instances per chunk: the selection's input budget (none with the input's sums given) */
    int64_t m = N;
    if (mode != NHWC_DENSE && !(sums && sums->in) && HW * C > 0)
        m = nh_chunk_bytes() / (HW * C * (int64_t)sizeof(float));
    P->chunk = m < 1 ? 1 : m > N ? N : m;
    /* gated: int32 indices, counts, saliencies, scratch (floats and int64), block sums */
    P->priv = nh_sel_private(N, mode, sums) ? nh_sel_thread_floats(C) : 0;
    P->select = mode == NHWC_DENSE ? 0 : P->priv ? threads * P->priv
                : (N * C + 15) / 16 * 16 + 2 * N + N * C + 3 * N * C
                  + (sums && sums->in ? 0 : N * nb * C);
    /* gathered: an instance's map and the packed weights, each at most whole */
    P->gather = nh_gathers(g, mode) && !g->wino
                ? (HW * C + 15) / 16 * 16 + g->cob * g->T * C * g->nr : 0;
    /* Winograd: each thread's V, M and zeros */
    P->wino = g->wino ? threads * wino_thread_floats(g, threads) : 0;
    P->total = P->zeros + P->gather + P->sums + P->select + P->wino + 64;
}

/* Workspace (floats) of ispc_conv_nhwc for a batch of N on H x W inputs. */
int64_t ispc_conv_nhwc_workspace(const ispc_nhwc_layer_t *L, int64_t N, int64_t H, int64_t W,
                                 int64_t mode, int64_t k, const ispc_sums_t *sums, int64_t threads) {
    nh_geom_t g;
    nh_geometry(&g, L, N, H, W);
    nh_plan_t P;
    nh_plan(&P, &g, mode, k, sums, threads);
    return P.total;
}

/* ---- Winograd F(2x2, 3x3) for 3x3 stride-1 layers ---------------------------------------------
 * The same sum as nh_conv in 16 / 36 of its multiplications: per 2x2 output block (a tile) the
 * 4x4 input patch d goes to V = B^T d B, the layer's weights were made U = G g G^T once
 * (native.py, in float64), and the block is A^T M A with M[t] = sum over kept c of V[t][c] U[t][c]
 * for each of the 16 points t: 16 GEMMs, each run by the register-tile kernels (one segment,
 * positions = tiles, the kept channels by index as in nh_conv), into a scratch M; the layer's
 * epilogue (bias, residual, clamp, output sums) comes with the output transform. U is packed
 * [cout block][16][C][nr] (ispc_pack_weight_nhwc with T = 16). Each thread takes the run of
 * (instance, tile) that nh_conv's split of positions would give it, in chunks whose V and M
 * (all output channels) fit WINO_TILE_FLOATS, and reads all of U per chunk: right where U is
 * small beside the maps (28x28 and up in ResNets; native.py chooses). A larger U splits the
 * output channels between the threads instead (WINO_COUT_SPLIT_BYTES): it loses less there, but
 * at 14x14 and 7x7 still does not beat the direct kernel on gated calls (docs/benchmarks.md). */
static int64_t wino_tile_floats(void) {  /* a quarter of L2 (128 Ki floats on a 2 MiB L2) */
#ifdef WINO_TILE_FLOATS
    return WINO_TILE_FLOATS;
#else
    return nh_l2_bytes / 4 / (int64_t)sizeof(float);
#endif
}

/* floats between two points' planes of V or M past their tiles: planes a multiple of 4 KiB apart
 * would put a tile's 16 vectors into one L1 set */
#define WINO_SKEW 32

/* U bytes above which the threads split the output channels instead of the positions: each
 * reads its own blocks' U once per chunk of tiles, every thread transforms every chunk's input */
static int64_t wino_cout_split_bytes(void) {  /* half of L2 (1 MiB on a 2 MiB L2) */
#ifdef WINO_COUT_SPLIT_BYTES
    return WINO_COUT_SPLIT_BYTES;
#else
    return nh_l2_bytes / 2;
#endif
}
/* a chunk's V and M when the output channels are split: five eighths of L2 (320 Ki floats on a
 * 2 MiB L2) */
static int64_t wino_split_floats(void) {
#ifdef WINO_SPLIT_FLOATS
    return WINO_SPLIT_FLOATS;
#else
    return nh_l2_bytes / 8 * 5 / (int64_t)sizeof(float);
#endif
}

#ifndef NH_WPF
#define NH_WPF 1
#endif

typedef struct {
    int64_t TH, TW, tiles, tgmax;  /* tile rows and columns, tiles, tiles a chunk at most */
    int64_t split, ownb;           /* output channels split; a thread's blocks at most */
} wino_dims_t;

static void wino_dims(wino_dims_t *d, const nh_geom_t *g, int64_t threads) {
    d->TH = (g->Ho + 1) / 2;
    d->TW = (g->Wo + 1) / 2;
    d->tiles = d->TH * d->TW;
    d->split = threads > 1 && g->cob > 1
               && 16 * g->C * g->cout * (int64_t)sizeof(float) > wino_cout_split_bytes();
    d->ownb = d->split ? (g->cob + threads - 1) / threads : g->cob;
    int64_t tg = (d->split ? wino_split_floats() : wino_tile_floats())
                 / (16 * ((g->C + 15) / 16 * 16 + d->ownb * g->nr));
    if (tg < d->tiles) tg = tg / g->mr * g->mr;
    tg = tg < g->mr ? g->mr : tg;
    d->tgmax = tg < d->tiles ? tg : d->tiles;
}

/* a thread's scratch: V (16 x tgmax x C), M (16 x tgmax x ownb nr), a chunk's output sums
 * (ownb nr + VW), an input row of zeros */
static int64_t wino_thread_floats(const nh_geom_t *g, int64_t threads) {
    wino_dims_t d;
    wino_dims(&d, g, threads);
    return 16 * (d.tgmax * ((g->C + 15) / 16 * 16 + d.ownb * g->nr) + 2 * WINO_SKEW)
           + d.ownb * g->nr + VW + (g->C + 15) / 16 * 16 + 32;
}

/* V[t][i][c] = (B^T d B)[t] of tiles [t0, t0 + nt) of instance x at V + t * vt + i * vs; returns
 * whether some value of V is not finite (an inf or NaN in the input, or an overflow) */
static int wino_input(const nh_geom_t *g, const wino_dims_t *d, const float *x, int64_t t0,
                      int64_t nt, float *V, int64_t vs, int64_t vt, const float *zr) {
    const int64_t C = g->C, H = g->H, W = g->W;
    vf bad = {0};  /* stays 0 unless a stored value is inf or NaN (0 * either is NaN) */
    float bads = 0.0f;
    for (int64_t i = 0; i < nt; i++) {
        const int64_t th = (t0 + i) / d->TW, tw = (t0 + i) % d->TW;
        const int64_t ih0 = 2 * th - g->ph, iw0 = 2 * tw - g->pw;
        const float *row[4][4];  /* the patch's positions, zr (C zeros) in the padding */
        for (int r = 0; r < 4; r++)
            for (int q = 0; q < 4; q++) {
                const int64_t ih = ih0 + r, iw = iw0 + q;
                row[r][q] = ih >= 0 && ih < H && iw >= 0 && iw < W ? x + (ih * W + iw) * C : zr;
            }
        float *v = V + i * vs;
        int64_t c = 0;
        for (; c + VW <= C; c += VW) {
            /* V = B^T (d B): each input row's d B, then the rows combined, in an order that
             * keeps at most three rows' four vectors live (16 registers on AVX2) */
            vf w0[4], w1[4], w2[4], w3[4], o, sum;
#define WINO_ROW(r, w)                                                                          \
            {                                                                                   \
                const vf a0 = ld(row[r][0] + c), a1 = ld(row[r][1] + c), a2 = ld(row[r][2] + c), \
                         a3 = ld(row[r][3] + c);                                                \
                w[0] = a0 - a2; w[1] = a1 + a2; w[2] = a2 - a1; w[3] = a1 - a3;                 \
            }
            WINO_ROW(1, w1)
            WINO_ROW(2, w2)
            o = w1[0] + w2[0]; st(v + 4 * vt + c, o); sum = o;
            for (int j = 1; j < 4; j++) { o = w1[j] + w2[j]; st(v + (4 + j) * vt + c, o); sum += o; }
            for (int j = 0; j < 4; j++) { o = w2[j] - w1[j]; st(v + (8 + j) * vt + c, o); sum += o; }
            WINO_ROW(0, w0)
            for (int j = 0; j < 4; j++) { o = w0[j] - w2[j]; st(v + j * vt + c, o); sum += o; }
            WINO_ROW(3, w3)
            for (int j = 0; j < 4; j++) { o = w1[j] - w3[j]; st(v + (12 + j) * vt + c, o); sum += o; }
#undef WINO_ROW
            /* the 16 values' sum is not finite if one of them is not (or, harmlessly, if the
             * sum overflows: the chunk then takes the exact direct path): one add a step on
             * bad's chain, not one per value */
            bad += sum * 0.0f;
        }
        for (; c < C; c++) {
            float p[4][4], u[4][4];
            for (int r = 0; r < 4; r++)
                for (int q = 0; q < 4; q++) p[r][q] = row[r][q][c];
            for (int q = 0; q < 4; q++) {
                u[0][q] = p[0][q] - p[2][q];
                u[1][q] = p[1][q] + p[2][q];
                u[2][q] = p[2][q] - p[1][q];
                u[3][q] = p[1][q] - p[3][q];
            }
            for (int r = 0; r < 4; r++) {
                const float o[4] = {u[r][0] - u[r][2], u[r][1] + u[r][2], u[r][2] - u[r][1],
                                    u[r][1] - u[r][3]};
                for (int q = 0; q < 4; q++) {
                    v[(r * 4 + q) * vt + c] = o[q];
                    bads += o[q] * 0.0f;
                }
            }
        }
    }
    for (int j = 0; j < VW; j++) bads += bad[j];
    return bads != 0.0f;
}

/* The Winograd GEMMs' second tile of 2 vectors on 16 registers (AVX2): 5 tiles a group beside
 * NH_MR2's 6, for chunks whose tile counts come in fives and sevens (a 14x14 map's 49 tiles: 6s
 * computed 54), at WINO_MR2S_RATE of 6x2's speed a tile. 0: none. */
#if !defined(__AVX512F__)
#ifndef WINO_MR2S
#define WINO_MR2S 5
#endif
#else
#undef WINO_MR2S
#define WINO_MR2S 0
#endif
#ifndef WINO_MR2S_RATE
#define WINO_MR2S_RATE 0.97
#endif

/* the tile (its positions, mr) for n tiles of a GEMM of nv vectors: the fewest computed tiles
 * weighed by the tile's speed; returns that weighed count */
static double wino_rows(int64_t nv, int64_t n, int64_t *mr) {
    int64_t cand[2] = {nh_mr(nv, 0), 0};
    double rate[2] = {1.0, 0.0};
#if defined(__AVX512F__) && NH_MR4S > 0
    if (nv == 4) { cand[0] = NH_MR4; cand[1] = NH_MR4S; rate[1] = NH_MR4S_GAIN; }
#endif
#if WINO_MR2S > 0
    if (nv == 2) { cand[1] = WINO_MR2S; rate[1] = WINO_MR2S_RATE; }
#endif
    double best = 1e300;
    for (int k = 0; k < 2; k++) {
        if (cand[k] <= 0) continue;
        const double cost = (double)((n + cand[k] - 1) / cand[k] * cand[k]) / rate[k];
        if (cost < best * 0.999) { best = cost; *mr = cand[k]; }
    }
    return best;
}

/* the next chunk's tiles of a run of R tiles (of one instance) and its tile (mr): whole chunks
 * of tgmax (a multiple of the layer's tile), and the last two split where they compute the
 * fewest tiles (ResNet's 14x14 maps: 49 tiles as 25 + 24, not 24 + 24 + 1) */
static int64_t wino_chunk(const nh_geom_t *g, const wino_dims_t *d, int64_t R, int64_t *mr) {
    if (R <= d->tgmax) {
        wino_rows(g->nv, R, mr);
        return R;
    }
    if (R > 2 * d->tgmax) {
        *mr = g->mr;
        return d->tgmax;
    }
    int64_t best = d->tgmax, m = g->mr;
    double cost = 1e300;
    for (int64_t nt = d->tgmax; nt >= R - d->tgmax; nt--) {
        int64_t m1, m2;
        const double c = wino_rows(g->nv, nt, &m1) + wino_rows(g->nv, R - nt, &m2);
        if (c < cost * 0.999) { cost = c; best = nt; m = m1; }
    }
    *mr = m;
    return best;
}

/* One of nh_wino's 16 GEMMs for one output block, all of a chunk's tiles: M[i][0..NV VW) = sum
 * over l < K of V[i][c] U[c][0..NV VW), c = ix[l] (IND 1) or l (IND 0); V's tile i at V + i * vs,
 * U's row c at U + c * NV VW, M's tile i at M + i * ms. The tiles' groups of MR in one call, M
 * stored plainly: no call, setup and epilogue (a zero bias) per group as with nh_kernel's tiles.
 * Gated with a U beyond L2 (D > 0): the first group prefetches U's kept rows D channels ahead. */
#define WINO_GEMM(NAME, MR, NV, IND)                                                            \
static void NAME(const float *V, int64_t vs, int64_t nt, const float *U, int64_t K,             \
                 const int32_t *ix, float *M, int64_t ms, int64_t D) {                          \
    for (int64_t i0 = 0; i0 < nt; i0 += MR) {                                                   \
        const int64_t np = nt - i0 < MR ? nt - i0 : MR;                                         \
        const float *p[MR];                                                                     \
        for (int i = 0; i < MR; i++) p[i] = V + (i0 + (i < np ? i : 0)) * vs;                   \
        vf acc[MR][NV];                                                                         \
        for (int i = 0; i < MR; i++)                                                            \
            for (int j = 0; j < NV; j++) acc[i][j] = (vf){0};                                   \
        const int64_t lp = IND && i0 == 0 && D > 0 ? (K > D ? K - D : 0) : 0;                   \
        int64_t l = 0;                                                                          \
        for (; l < lp; l++) {                                                                   \
            const int64_t c = ix[l];                                                            \
            for (int j = 0; j < NV * VW * 4; j += 64)                                           \
                __builtin_prefetch((const char *)(U + ix[l + D] * (NV * VW)) + j, 0, NH_PF_LOC); \
            NH_STEP(MR, NV, c, U + c * (NV * VW), (const float *)0)                             \
        }                                                                                       \
        for (; l < K; l++) {                                                                    \
            const int64_t c = IND ? ix[l] : l;                                                  \
            NH_STEP(MR, NV, c, U + c * (NV * VW), (const float *)0)                             \
        }                                                                                       \
        for (int i = 0; i < MR; i++)                                                            \
            if (i < np)                                                                         \
                for (int j = 0; j < NV; j++) st(M + (i0 + i) * ms + j * VW, acc[i][j]);         \
    }                                                                                           \
}

typedef void (*wino_gemm_t)(const float *, int64_t, int64_t, const float *, int64_t,
                            const int32_t *, float *, int64_t, int64_t);
#if defined(__AVX512F__)
WINO_GEMM(wino_g4d, NH_MR4, 4, 0)
WINO_GEMM(wino_g4i, NH_MR4, 4, 1)
#if NH_MR4S > 0
WINO_GEMM(wino_g4sd, NH_MR4S, 4, 0)
WINO_GEMM(wino_g4si, NH_MR4S, 4, 1)
#endif
#endif
WINO_GEMM(wino_g3d, NH_MR3, 3, 0)
WINO_GEMM(wino_g3i, NH_MR3, 3, 1)
WINO_GEMM(wino_g2d, NH_MR2, 2, 0)
WINO_GEMM(wino_g2i, NH_MR2, 2, 1)
#if WINO_MR2S > 0
WINO_GEMM(wino_g2sd, WINO_MR2S, 2, 0)
WINO_GEMM(wino_g2si, WINO_MR2S, 2, 1)
#endif
WINO_GEMM(wino_g1d, NH_MR1, 1, 0)
WINO_GEMM(wino_g1i, NH_MR1, 1, 1)

/* the GEMM of nv vectors and mr positions (nh_kernel's tiles); ind: kept channels by index */
static wino_gemm_t wino_gemm(int64_t nv, int64_t mr, int ind) {
    switch (nv) {
#if defined(__AVX512F__)
    case 4:
#if NH_MR4S > 0
        if (mr == NH_MR4S) return ind ? wino_g4si : wino_g4sd;
#endif
        (void)mr;
        return ind ? wino_g4i : wino_g4d;
#else
    (void)mr;
#endif
    case 3: return ind ? wino_g3i : wino_g3d;
    case 2:
#if WINO_MR2S > 0
        if (mr == WINO_MR2S) return ind ? wino_g2si : wino_g2sd;
#endif
        return ind ? wino_g2i : wino_g2d;
    default: return ind ? wino_g1i : wino_g1d;
    }
}

/* The output vector of channels [c, c + VW) (block cb) at (oh, ow) of instance x, summed directly
 * over the kept channels and taps */
static vf wino_direct(const nh_geom_t *g, const ispc_nhwc_layer_t *L, const float *x,
                      const int32_t *ix, int64_t K, int64_t oh, int64_t ow, int64_t c) {
    const int64_t C = g->C, nr = g->nr, cb = c / nr;
    vf y = {0};
    for (int64_t t = 0; t < 9; t++) {
        const int64_t ih = oh - g->ph + t / 3, iw = ow - g->pw + t % 3;
        if (ih < 0 || ih >= g->H || iw < 0 || iw >= g->W) continue;
        const float *xp = x + (ih * g->W + iw) * C;
        const float *wt = L->wpack + (cb * 9 + t) * C * nr + (c - cb * nr);
        for (int64_t l = 0; l < K; l++) {
            const int64_t ch = ix ? ix[l] : l;
            y += xp[ch] * ld(wt + ch * nr);
        }
    }
    return y;
}

/* nh_wino's path for a chunk (tiles [t0, t0 + nt) of instance x) whose transformed input is not
 * finite, where the transforms' subtractions would turn an inf into NaN in outputs whose direct
 * sum is inf (the reference's): channels [c0, c1) of its outputs summed directly, through the
 * layer's epilogue, their output sums (sq: NULL none) added into sq[c - c0]. M is not read. */
static void wino_direct_chunk(const nh_geom_t *g, const wino_dims_t *d, const ispc_nhwc_layer_t *L,
                              const float *x, const int32_t *ix, int64_t K, int64_t t0, int64_t nt,
                              int64_t c0, int64_t c1, float *on, const float *rn, float lo,
                              float hi, int clamp, float *sq, int ykind) {
    for (int64_t i = 0; i < nt; i++) {
        const int64_t tr = (t0 + i) / d->TW, tc = (t0 + i) % d->TW;
        for (int64_t oh = 2 * tr; oh < 2 * tr + 2 && oh < g->Ho; oh++)
            for (int64_t ow = 2 * tc; ow < 2 * tc + 2 && ow < g->Wo; ow++)
                for (int64_t c = c0; c < c1; c += VW) {
                    const int nl = c1 - c < VW ? (int)(c1 - c) : VW;
                    const int64_t o = (oh * g->Wo + ow) * g->cout + c;
                    const vf v = nh_store(on + o, wino_direct(g, L, x, ix, K, oh, ow, c),
                                          L->bias + c, rn ? rn + o : 0, nl, lo, hi, clamp);
                    if (sq) st(sq + (c - c0), ld(sq + (c - c0)) + sum_term(v, ykind));
                }
    }
}

/* vectors per 64-byte line: the output transform's channels per walk over a chunk's tiles */
#define WINO_LINE_VECTORS (64 / (VW * (int)sizeof(float)) > 1 ? 64 / (VW * (int)sizeof(float)) : 1)

/* Y = A^T M A for tiles [t0, t0 + nt) (tile i's point t at M + t * mt + i * ms, channel c at
 * c - m0), channels [c0, c1), through the layer's epilogue; output sums (sq: NULL none) added into
 * sq[c - c0]. A line of channels at a time over the tiles, its vectors one after the other: each
 * 64-byte line of M is read whole at once (a vector at a time, 8-float vectors read each line
 * twice, the second time from L2; docs/benchmarks.md has the walks tried). */
static void wino_output(const nh_geom_t *g, const wino_dims_t *d, const ispc_nhwc_layer_t *L,
                        const float *M, int64_t ms, int64_t mt, int64_t m0, int64_t t0, int64_t nt,
                        int64_t c0, int64_t c1, float *on, const float *rn, float lo, float hi,
                        int clamp, float *sq, int ykind) {
    const int64_t Ho = g->Ho, Wo = g->Wo, cout = g->cout;
    for (int64_t cl = c0; cl < c1; cl += WINO_LINE_VECTORS * VW) {
        vf s[WINO_LINE_VECTORS];
        for (int h = 0; h < WINO_LINE_VECTORS; h++) s[h] = (vf){0};
        for (int64_t i = 0; i < nt; i++) {
            const int64_t tr = (t0 + i) / d->TW, tc = (t0 + i) % d->TW;
            const int rows = 2 * tr + 1 < Ho ? 2 : 1, cols = 2 * tc + 1 < Wo ? 2 : 1;
            const int64_t o0 = (2 * tr * Wo + 2 * tc) * cout;
            for (int h = 0; h < WINO_LINE_VECTORS; h++) {
                const int64_t c = cl + h * VW;
                if (c >= c1) break;
                const int nl = c1 - c < VW ? (int)(c1 - c) : VW;
                const float *mc = M + i * ms + (c - m0);
                vf u[2][4];
                for (int q = 0; q < 4; q++) {  /* A^T M: a column of 4 points at a time */
                    const vf m0q = ld(mc + q * mt), m1q = ld(mc + (4 + q) * mt),
                             m2q = ld(mc + (8 + q) * mt), m3q = ld(mc + (12 + q) * mt);
                    u[0][q] = m0q + m1q + m2q;
                    u[1][q] = m1q - m2q - m3q;
                }
                for (int r = 0; r < rows; r++) {
                    const vf y[2] = {u[r][0] + u[r][1] + u[r][2], u[r][1] - u[r][2] - u[r][3]};
                    for (int q = 0; q < cols; q++) {
                        const int64_t o = o0 + (r * Wo + q) * cout + c;
                        const vf v = nh_store(on + o, y[q], L->bias + c, rn ? rn + o : 0, nl, lo,
                                              hi, clamp);
                        if (sq) s[h] += sum_term(v, ykind);
                    }
                }
            }
        }
        if (sq)
            for (int h = 0; h < WINO_LINE_VECTORS && cl + h * VW < c1; h++)
                st(sq + (cl + h * VW - c0), ld(sq + (cl + h * VW - c0)) + s[h]);
    }
}

/* Instances [0, N) (x, out, res at the first), inside a parallel region, as nh_conv (ix, counts:
 * NULL dense); scratch: each thread's wino_thread_floats. Ends with a barrier. */
static void nh_wino(const nh_geom_t *g, const ispc_nhwc_layer_t *L, const float *x, const int32_t *ix,
                    const int64_t *counts, float *out, const float *res, float lo, float hi,
                    int clamp, double *ysums, int ykind, float *scratch) {
    const int64_t nth = omp_get_num_threads(), th = omp_get_thread_num();
    wino_dims_t d;
    wino_dims(&d, g, nth);
    const int64_t C = g->C, nr = g->nr, HoWo = g->Ho * g->Wo, cs = g->cob * nr;
    double *yrow = 0;
    if (ysums) {
        yrow = ysums + th * g->N * cs;
        memset(yrow, 0, sizeof(double) * g->N * cs);
    }
    /* this thread's output blocks [cb0, cb1) (split: its share; else all of them) */
    const int64_t cb0 = d.split ? g->cob * th / nth : 0, cb1 = d.split ? g->cob * (th + 1) / nth : g->cob;
    const int64_t vs = (C + 15) / 16 * 16, ms = d.ownb * nr;  /* a V row's and an M row's floats */
    float *base = scratch + th * wino_thread_floats(g, nth);
    base = (float *)(((uintptr_t)base + 63) & ~(uintptr_t)63);
    float *V = base, *M = V + 16 * (d.tgmax * vs + WINO_SKEW);
    float *sq = M + 16 * (d.tgmax * ms + WINO_SKEW);  /* a chunk's output sums */
    float *zr = sq + ms + VW;  /* an input row of zeros: the padding */
    memset(zr, 0, sizeof(float) * vs);
    if (!ysums) sq = 0;
    const int64_t HWC = g->H * g->W * C, total = g->N * d.tiles;
    /* gated, a U beyond L2 (threads splitting its blocks): its kept rows, scattered, come from
     * memory on the first tiles of each (point, block); prefetched NH_PF channels ahead as
     * nh_conv's indirect walk does (NH_WPF 0: not) */
    const int64_t wpf = NH_WPF && d.split && 16 * C * g->cout * (int64_t)sizeof(float) >= nh_pf_gated()
                        ? NH_PF : 0;
    /* this thread's run of (instance, tile) (split: all of them), in chunks of at most tgmax
     * tiles of one instance: the positions nh_conv's split gives it, so that the layers before
     * and after find their parts of the maps in this core's caches */
    const int64_t a = d.split ? 0 : total * th / nth, b = d.split ? total : total * (th + 1) / nth;
    for (int64_t pos = a; pos < b && cb0 < cb1;) {
        const int64_t n = pos / d.tiles, t0 = pos % d.tiles;
        int64_t mr;
        const int64_t nt = wino_chunk(g, &d, d.tiles - t0 < b - pos ? d.tiles - t0 : b - pos, &mr);
        pos += nt;
        const int64_t K = counts ? counts[n] : C;
        const int64_t vt = nt * vs + WINO_SKEW, mt = nt * ms + WINO_SKEW;  /* a plane's floats */
        const int direct = wino_input(g, &d, x + n * HWC, t0, nt, V, vs, vt, zr);
        const wino_gemm_t gm = wino_gemm(g->nv, mr, K != C);
        for (int64_t t = 0; t < (direct ? 0 : 16); t++)
            for (int64_t cb = cb0; cb < cb1; cb++)
                gm(V + t * vt, vs, nt, L->wino + (cb * 16 + t) * C * nr, K, ix ? ix + n * C : 0,
                   M + t * mt + (cb - cb0) * nr, ms, wpf);
        float *on = out + n * HoWo * g->cout;
        const float *rn = res ? res + n * HoWo * g->cout : 0;
        const int64_t c0 = cb0 * nr, c1 = cb1 * nr < g->cout ? cb1 * nr : g->cout;
        if (sq) memset(sq, 0, sizeof(float) * (c1 - c0 + VW));
        if (direct)
            wino_direct_chunk(g, &d, L, x + n * HWC, ix ? ix + n * C : 0, K, t0, nt, c0, c1, on, rn,
                              lo, hi, clamp, sq, ykind);
        else
            wino_output(g, &d, L, M, ms, mt, cb0 * nr, t0, nt, c0, c1, on, rn, lo, hi, clamp, sq,
                        ykind);
        if (sq)
            for (int64_t c = c0; c < c1; c += VW)
                add_lanes(yrow + n * cs + c, ld(sq + (c - c0)), c1 - c < VW ? (int)(c1 - c) : VW);
    }
    #pragma omp barrier
}

/* ispc_conv_nhwc's work inside a parallel region (ispc_run_ops runs it in its own): g with its
 * stream flag set, zeros (P->zeros zero floats) and w (the rest of P's workspace: nh_gather's
 * part, then the sums' and the selection's) given. Its shared writes end with a barrier. */
static void nh_region(const nh_geom_t *gp, const nh_plan_t *P, const ispc_nhwc_layer_t *L,
                      const float *x, const float *scale, int64_t saliency, int64_t mode,
                      float threshold, int64_t k, int64_t *counts, float *out, const float *res,
                      float lo, float hi, const ispc_sums_t *sums, const float *zeros, float *w) {
    const nh_geom_t g = *gp;
    const int64_t N = g.N, H = g.H, W = g.W;
    const int64_t C = L->C, HW = H * W, out_n = g.Ho * g.Wo * L->cout, cs = g.cob * g.nr;
    const int clamp = nh_clamp_code(lo, hi);
    float *xg = w, *wg = xg + (HW * C + 15) / 16 * 16;  /* P->gather: nh_gather's */
    w += P->gather;
    double *const hout = sums ? sums->hand_out : 0;  /* rows left unreduced for the next op */
    double *ysums = hout ? hout : P->sums ? (double *)w : 0;
    const int ykind = sums ? (int)sums->out_kind : SAL_L2;
    w += P->sums;
    const float *xsums = sums ? sums->in : 0;
    float *wsel = w + omp_get_thread_num() * P->priv;  /* this thread's where it selects alone */
    int32_t *ix = (int32_t *)wsel;
    int64_t *cnt = (int64_t *)(wsel + (N * C + 15) / 16 * 16);
    float *s = (float *)(cnt + N), *tmp = s + N * C, *part = tmp + 3 * N * C;
    const int dense = mode == NHWC_DENSE;
    for (int64_t n0 = 0; n0 < N; n0 += P->chunk) {
        const int64_t m = n0 + P->chunk < N ? P->chunk : N - n0;
        const float *xc = x + n0 * HW * C;
        float *oc = out + n0 * out_n;
        const float *rc = res ? res + n0 * out_n : 0;
        nh_geom_t gc = g;
        gc.N = m;
        if (!dense)
            nh_select(xc, m, HW, C, scale, saliency, mode, threshold, k, ix, cnt, part, s, tmp,
                      xsums ? xsums + n0 * C : 0, P->priv != 0, sums ? sums->hand_in : 0,
                      sums ? sums->hand_cs : 0);
        if (g.wino) {
            nh_wino(&gc, L, xc, dense ? 0 : ix, dense ? 0 : cnt, oc, rc, lo, hi, clamp, ysums, ykind,
                    w + P->select);
            if (ysums && !hout)
                reduce_sums(ysums, omp_get_num_threads(), m, L->cout, cs, sums->out + n0 * L->cout);
        } else if (P->gather) {  /* instance by instance, see NH_GATHER_POSITIONS */
            for (int64_t i = 0; i < m; i++) {
                const int64_t K = cnt[i];
                nh_geom_t gi = g;
                gi.N = 1;
                const float *xi = xc + i * HW * C;
                float *oi = oc + i * out_n;
                const float *ri = rc ? rc + i * out_n : 0;
                if (K == 0 || K == C) {  /* nothing to gather */
                    nh_conv(&gi, L, xi, ix + i * C, cnt + i, oi, ri, lo, hi, clamp, zeros, ysums,
                            ykind);
                } else {
                    nh_gather(&gi, L, xi, ix + i * C, K, xg, wg);
                    ispc_nhwc_layer_t Lk = *L;
                    Lk.wpack = wg;
                    Lk.C = gi.C = K;
                    nh_conv(&gi, &Lk, xg, 0, 0, oi, ri, lo, hi, clamp, zeros, ysums, ykind);
                }
                if (ysums && !hout)
                    reduce_sums(ysums, omp_get_num_threads(), 1, L->cout, cs,
                                sums->out + (n0 + i) * L->cout);
            }
        } else {
            nh_conv(&gc, L, xc, dense ? 0 : ix, dense ? 0 : cnt, oc, rc, lo, hi, clamp, zeros,
                    ysums, ykind);
            if (ysums && !hout)
                reduce_sums(ysums, omp_get_num_threads(), m, L->cout, cs, sums->out + n0 * L->cout);
        }
        #pragma omp single nowait
        if (counts && !dense)
            for (int64_t i = 0; i < m; i++) counts[n0 + i] = cnt[i];
    }
}

/* The layer on x (N, H, W, C) float32 channels-last: out (N, Ho, Wo, cout) = clamp(conv(x masked
 * to each instance's kept channels) + bias + res, lo, hi), res (NULL: none) of the output's shape;
 * lo = hi = NaN: the exact GELU instead of the clamp (NH_GELU). mode: MODE_TOPK (k channels),
 * MODE_THRESHOLD (saliency >= threshold) or NHWC_DENSE (all).
 * counts (N,) receives each instance's kept count (NULL: not wanted); sums (NULL: none) the
 * input's saliency sums and/or where the output's go. Returns 0, or the workspace (floats) it
 * needs when ws_floats is smaller (nothing computed). */
int64_t ispc_conv_nhwc(const ispc_nhwc_layer_t *L, const float *x, int64_t N, int64_t H, int64_t W,
                       const float *scale, int64_t saliency, int64_t mode, float threshold, int64_t k,
                       int64_t *counts, float *out, const float *res, float lo, float hi,
                       const ispc_sums_t *sums, float *ws, int64_t ws_floats, int64_t threads) {
    nh_geom_t g;
    nh_geometry(&g, L, N, H, W);
    nh_plan_t P;
    nh_plan(&P, &g, mode, k, sums, threads);
    if (P.total > ws_floats) return P.total;
    g.stream = nh_stream(&g, out, res);
    memset(ws, 0, sizeof(float) * P.zeros);
    #pragma omp parallel num_threads(threads)
    nh_region(&g, &P, L, x, scale, saliency, mode, threshold, k, counts, out, res, lo, hi, sums, ws,
              ws + P.zeros);
    return 0;
}

/* ---- depthwise 3x3 convolution, NHWC: MobileNet's ---------------------------------------------
 * out[n, oh, ow, c] = clamp(bias[c] + sum over taps (r, q) of x[n, oh*s - p + r, ow*s - p + q, c] *
 * w[r*3 + q][c] (+ res), lo, hi); weights packed [9][C]. Channels in vector lanes: per output row
 * and block of VW channels, the nine weight vectors stay in registers along the row, and a tile of
 * DW_MR output positions across the width loads each input vector it reads once and adds it into
 * every accumulator whose window holds it (stride 1: 3 (MR + 2) loads for 9 MR FMAs, where one load
 * per tap was 9 MR). Tiles whose taps reach into the padding or past the row's end take the checked
 * variant (taps outside skipped, only the row's positions stored). */
#if defined(__AVX512F__)
#define DW_MR 8    /* 8 accumulators + 9 weights + the loaded vector of 32 registers */
#else
#define DW_MR 4    /* of 16: 4 + 9 + 1 */
#endif

static inline vf dw_load(const float *src, int full, int nl) {
#if defined(__AVX512F__)
    return full ? ld(src) : (vf)_mm512_maskz_loadu_ps((__mmask16)((1u << nl) - 1u), src);
#else
    if (full) return ld(src);
    vf v = {0};
    memcpy(&v, src, sizeof(float) * nl);
    return v;
#endif
}

/* Positions [ow0, ow0 + m) (m <= MR) of one output row, VW channels c0.. (full: all VW lanes, else
 * the first nl): MR and S (the stride) constants where it is inlined, so that every tap's weight
 * index is resolved at compile time. Returns the output's saliency terms (ykind >= 0) over the
 * stored positions, masked lanes zero. */
static inline __attribute__((always_inline)) vf
dw_tile(const float *const rows[3], int64_t W, int64_t C, int64_t Co, int64_t c0, int full, int nl,
        int64_t ow0, int64_t m, const int MR, const int S, int64_t p, const vf wv[9], vf bv, float *orow,
        const float *rrow, float lo, float hi, int clamp, const int checked, int ykind) {
    vf acc[DW_MR];
    #pragma GCC unroll 16
    for (int i = 0; i < MR; i++) acc[i] = bv;
    for (int r = 0; r < 3; r++) {
        if (!rows[r]) continue;
        const float *src = rows[r] + c0;
        #pragma GCC unroll 40
        for (int j = 0; j < (MR - 1) * S + 3; j++) {
            const int64_t iw = ow0 * S - p + j;
            if (checked && (iw < 0 || iw >= W)) continue;
            const vf v = dw_load(src + iw * C, full, nl);
            #pragma GCC unroll 16
            for (int i = 0; i < MR; i++) {
                const int q = j - i * S;
                if (q >= 0 && q < 3) acc[i] += v * wv[r * 3 + q];
            }
        }
    }
    vf sq = {0};
    #pragma GCC unroll 16
    for (int i = 0; i < MR; i++) {
        if (checked && i >= m) break;
        float *d = orow + (ow0 + i) * Co + c0;
        const float *rs = rrow ? rrow + (ow0 + i) * Co + c0 : 0;
        vf v = acc[i];
#if defined(__AVX512F__)
        if (full) {
            if (rs) v += ld(rs);
            v = clamp ? clampv(v, lo, hi) : v;
            st(d, v);
        } else {
            const __mmask16 mk = (__mmask16)((1u << nl) - 1u);
            if (rs) v += (vf)_mm512_maskz_loadu_ps(mk, rs);
            v = (vf)_mm512_maskz_mov_ps(mk, (__m512)(clamp ? clampv(v, lo, hi) : v));
            _mm512_mask_storeu_ps(d, mk, (__m512)v);
        }
#else
        if (full) {
            if (rs) v += ld(rs);
            v = clamp ? clampv(v, lo, hi) : v;
            st(d, v);
        } else {
            float t[VW];
            st(t, v);
            for (int l = 0; l < VW; l++) {
                float u = l < nl ? t[l] + (rs ? rs[l] : 0.0f) : 0.0f;
                t[l] = clamp && l < nl ? (u < lo ? lo : u > hi ? hi : u) : u;
                if (l < nl) d[l] = t[l];
            }
            v = ld(t);
        }
#endif
        if (ykind >= 0) sq += sum_term(v, ykind);
    }
    return sq;
}

/* One output row's block of VW channels, tiles of MR positions across it; stride S (1 or 2). */
static inline __attribute__((always_inline)) vf
dw_row(const float *const rows[3], int64_t W, int64_t Wo, int64_t C, int64_t Co, int64_t c0, int full, int nl,
       const int S, int64_t p, int64_t a, int64_t b, const vf wv[9], vf bv, float *orow,
       const float *rrow, float lo, float hi, int clamp, int ykind) {
    vf sq = {0};
    for (int64_t ow = 0; ow < Wo; ow += DW_MR) {
        const int64_t m = Wo - ow < DW_MR ? Wo - ow : DW_MR;
        if (ow >= a && ow + DW_MR <= b)
            sq += dw_tile(rows, W, C, Co, c0, full, nl, ow, DW_MR, DW_MR, S, p, wv, bv, orow, rrow, lo,
                          hi, clamp, 0, ykind);
        else
            sq += dw_tile(rows, W, C, Co, c0, full, nl, ow, m, DW_MR, S, p, wv, bv, orow, rrow, lo, hi,
                          clamp, 1, ykind);
    }
    return sq;
}

/* Any stride: one position at a time, every tap checked (strides other than 1 and 2). */
static vf dw_row_any(const float *const rows[3], int64_t W, int64_t Wo, int64_t C, int64_t Co, int64_t c0,
                     int full, int nl, int64_t s, int64_t p, const vf wv[9], vf bv, float *orow,
                     const float *rrow, float lo, float hi, int clamp, int ykind) {
    vf sq = {0};
    for (int64_t ow = 0; ow < Wo; ow++) {
        vf acc = bv;
        for (int r = 0; r < 3; r++) {
            if (!rows[r]) continue;
            for (int q = 0; q < 3; q++) {
                const int64_t iw = ow * s - p + q;
                if (iw >= 0 && iw < W) acc += dw_load(rows[r] + iw * C + c0, full, nl) * wv[r * 3 + q];
            }
        }
        float t[VW];
        st(t, acc);
        float *d = orow + ow * Co + c0;
        const float *rs = rrow ? rrow + ow * Co + c0 : 0;
        for (int l = 0; l < VW; l++) {
            float u = l < nl ? t[l] + (rs ? rs[l] : 0.0f) : 0.0f;
            t[l] = clamp && l < nl ? (u < lo ? lo : u > hi ? hi : u) : u;
            if (l < nl) d[l] = t[l];
        }
        if (ykind >= 0) sq += sum_term(ld(t), ykind);
    }
    return sq;
}

static int64_t dw_workspace(int64_t N, int64_t C, const ispc_sums_t *sums, int64_t threads) {
    return sums && sums->out ? 2 * threads * N * C + 64 : 0;
}

/* ---- the depthwise layer on several output rows at once (AVX-512) ------------------------------
 * dw_out_rows reads each input row once per output row that needs it: three times at stride 1,
 * from L2 (a fused op's window, a map's rows), where those loads and not the FMAs bound the
 * 112x112 and 56x56 layers. Here DWR_ROWS consecutive output rows run in one pass over the
 * (DWR_ROWS - 1) S + 3 input rows they read, each input vector loaded once for every accumulator
 * of every row whose window holds it. Each output sums its terms in dw_tile's order (kernel rows,
 * then taps, then the bias first), the epilogue and the output sums are dw_tile's / dw_out_rows':
 * the same values bit for bit. 1: off (A/B). AVX2 builds: dwr2_whole, below. */
#ifndef DWR_ROWS
#if defined(__AVX512F__)
#define DWR_ROWS 4
#else
#define DWR_ROWS 4  /* AVX2: dwr2_whole; 4 x 2 measured ahead of 3 x 4 and 2 x 4 (docs/benchmarks.md) */
#endif
#endif
#ifndef DWR_MR
#if defined(__AVX512F__)
#define DWR_MR 4   /* positions a tile: DWR_ROWS x DWR_MR accumulators + 9 weights of 32 registers */
#else
#define DWR_MR 2   /* of 16: DWR_ROWS x DWR_MR + 3 weights + the input vector */
#endif
#endif
#if DW_MR % DWR_MR
#error "DWR_MR must divide DW_MR (the output sums add DW_MR positions at a time, as dw_row)"
#endif

/* ---- AVX2 (16 registers): depthwise tiles with the weights one kernel row at a time ----------
 * dw_tile keeps all nine weights in registers beside its accumulators: on 16 registers that leaves
 * DW_MR 4 and, with the bias, the clamp and the output sums, GCC spilled the weights inside the
 * tile's loop. Here a tile loads each kernel row's three weights as it reaches that row (from L1:
 * 3 loads per row of MR positions), so DW2_MR accumulators + 3 weights + the input vector + the sums
 * fit; the same FMAs in the same order as dw_tile (outputs bit for bit those of the old tile). */
#if !defined(__AVX512F__)
#ifndef DW2_MR
#define DW2_MR 7   /* MobileNet's widths at 224x224 (112, 56, 28, 14, 7) are multiples of 7 */
#endif
#ifndef DW_AVX2_ROWS  /* 0: dw_tile's nine weights in registers (A/B) */
#define DW_AVX2_ROWS 1
#endif

static inline __attribute__((always_inline)) vf
dw2_tile(const float *const rows[3], int64_t W, int64_t C, int64_t Co, int64_t c0, int64_t ow0, int64_t m,
         const int MR, const int S, int64_t p, const float *w, vf bv, float *orow, const float *rrow,
         float lo, float hi, int clamp, const int checked, int ykind) {
    vf acc[DW2_MR];
    #pragma GCC unroll 16
    for (int i = 0; i < MR; i++) acc[i] = bv;
    #pragma GCC unroll 3
    for (int r = 0; r < 3; r++) {
        if (!rows[r]) continue;
        const float *src = rows[r] + c0;
        const vf w0 = ld(w + (3 * r) * Co), w1 = ld(w + (3 * r + 1) * Co), w2 = ld(w + (3 * r + 2) * Co);
        #pragma GCC unroll 40
        for (int j = 0; j < (MR - 1) * S + 3; j++) {
            const int64_t iw = ow0 * S - p + j;
            if (checked && (iw < 0 || iw >= W)) continue;
            const vf v = ld(src + iw * C);
            #pragma GCC unroll 16
            for (int i = 0; i < MR; i++) {
                const int q = j - i * S;
                if (q == 0) acc[i] += v * w0;
                else if (q == 1) acc[i] += v * w1;
                else if (q == 2) acc[i] += v * w2;
            }
        }
    }
    vf sq = {0};
    #pragma GCC unroll 16
    for (int i = 0; i < MR; i++) {
        if (checked && i >= m) break;
        float *d = orow + (ow0 + i) * Co + c0;
        vf v = acc[i];
        if (rrow) v += ld(rrow + (ow0 + i) * Co + c0);
        v = clamp ? nh_clampv(v, lo, hi) : v;  /* clampv's values in two instructions */
        st(d, v);
        if (ykind >= 0) sq += sum_term(v, ykind);
    }
    return sq;
}

/* Positions [o0, o1) of one output row, one vector of channels c0 (w, bv: its weights [9][Co] and
 * bias), in tiles of DW2_MR. */
static inline __attribute__((always_inline)) vf
dw2_row(const float *const rows[3], int64_t W, int64_t o0, int64_t o1, int64_t C, int64_t Co, int64_t c0,
        const int S, int64_t p, int64_t a, int64_t b, const float *w, vf bv, float *orow, const float *rrow,
        float lo, float hi, int clamp, int ykind) {
    vf sq = {0};
    for (int64_t ow = o0; ow < o1; ow += DW2_MR) {
        const int64_t m = o1 - ow < DW2_MR ? o1 - ow : DW2_MR;
        if (m == DW2_MR && ow >= a && ow + DW2_MR <= b)
            sq += dw2_tile(rows, W, C, Co, c0, ow, DW2_MR, DW2_MR, S, p, w, bv, orow, rrow, lo, hi, clamp,
                           0, ykind);
        else
            sq += dw2_tile(rows, W, C, Co, c0, ow, m, DW2_MR, S, p, w, bv, orow, rrow, lo, hi, clamp, 1,
                           ykind);
    }
    return sq;
}

#ifndef DW2_L1_SHARE  /* the share of L1 a segment's input rows may take */
#define DW2_L1_SHARE 0.6
#endif
#ifndef DW2_L2_SHARE  /* maps (W x W x C) up to this share of L2 take dw2_out_rows; on larger ones,
                        * whose rows stream from L3, its segments measured slower than dw_row */
#define DW2_L2_SHARE 0.5
#endif

/* The whole vectors of channels of one output row (see dw_out_rows), stride S: the row in segments
 * of positions whose three input rows fit in L1, every vector of channels over a segment before
 * the next (an 8-float vector is half a line: a segment's lines serve all its vectors from L1).
 * Faster on maps held in L2 (MobileNet's 14x14 and 7x7); on wide rows the old walk is, hence
 * DW2_L2_SHARE. Returns how many channels it did (the whole vectors; none on maps past it, the
 * square W x W assumed); sums in yrow as dw_out_rows' (within float rounding: summed per segment). */
static __attribute__((unused)) int64_t dw2_out_rows(const float *const rows[3], int64_t W, int64_t Wo, int64_t C, int64_t Co,
                            int64_t Cn, const float *w, const float *bias, const int S, int64_t p,
                            int64_t a, int64_t b, float *orow, const float *rrow, float lo, float hi,
                            int clamp, double *yrow, int ykind) {
    const int64_t nv = Cn / VW;
    if (nv == 0 || W * W * C * (int64_t)sizeof(float) > DW2_L2_SHARE * nh_l2_bytes) return 0;
    int64_t seg = ((int64_t)(DW2_L1_SHARE * nh_l1_bytes) / (3 * C * (int64_t)sizeof(float)) - 2) / S;
    seg = seg < DW2_MR ? DW2_MR : seg / DW2_MR * DW2_MR;
    vf sqv[nv];
    memset(sqv, 0, sizeof sqv);
    for (int64_t o0 = 0; o0 < Wo; o0 += seg) {
        const int64_t o1 = Wo - o0 < seg ? Wo : o0 + seg;
        for (int64_t v = 0; v < nv; v++) {
            const int64_t c0 = v * VW;
            const vf bv = ld(bias + c0);
            if (S == 1)
                sqv[v] += dw2_row(rows, W, o0, o1, C, Co, c0, 1, p, a, b, w + c0, bv, orow, rrow, lo, hi,
                                  clamp, ykind);
            else
                sqv[v] += dw2_row(rows, W, o0, o1, C, Co, c0, 2, p, a, b, w + c0, bv, orow, rrow, lo, hi,
                                  clamp, ykind);
        }
    }
    if (yrow)
        for (int64_t v = 0; v < nv; v++) add_lanes(yrow + v * VW, sqv[v], VW);
    return nv * VW;
}
#endif

/* One output row of the depthwise layer (Cn channels) from its three input rows (NULL: in the
 * padding) of C floats a position; a, b: its columns whose taps are all inside the row. Output,
 * residual and weights ([9][Co]) have Co floats a position (Co = C but for the channel-split fused
 * op, which gives one thread's channels). Output sums added into yrow (NULL: none). */
#if !defined(__AVX512F__) && DWR_ROWS > 1
static int64_t dwr2_whole(const float *const *rows, int ro, int64_t W, int64_t Wo, int64_t C,
                          int64_t Co, int64_t Cn, const float *w, const float *bias, int64_t s, int64_t p,
                          int64_t a, int64_t b, float *const *orow, const float *const *rrow, float lo,
                          float hi, int clamp, double *yrow, int ykind);
#endif

/* channels [cfrom, Cn) of dw_out_rows: one vector of channels at a time, dw_row */
static void dw_rows_from(const float *const rows[3], int64_t W, int64_t Wo, int64_t C, int64_t Co,
                         int64_t Cn, int64_t cfrom, const float *w, const float *bias, int64_t s,
                         int64_t p, int64_t a, int64_t b, float *orow, const float *rrow, float lo,
                         float hi, int clamp, double *yrow, int ykind);

static void dw_out_rows(const float *const rows[3], int64_t W, int64_t Wo, int64_t C, int64_t Co,
                        int64_t Cn, const float *w, const float *bias, int64_t s, int64_t p, int64_t a,
                        int64_t b, float *orow, const float *rrow, float lo, float hi, int clamp,
                        double *yrow, int ykind) {
    int64_t cdone = 0;
#if !defined(__AVX512F__) && DWR_ROWS > 1
    /* the multi-row kernel on one row: the same sums' grouping as its rows (dwr2_whole) */
    if (s == 1 || s == 2) {
        float *orr[1] = {orow};
        const float *rr[1] = {rrow};
        cdone = dwr2_whole(rows, 1, W, Wo, C, Co, Cn, w, bias, s, p, a, b, orr, rr, lo, hi, clamp, yrow,
                           ykind);
    }
#elif !defined(__AVX512F__) && DW_AVX2_ROWS
    if (s == 1 || s == 2)
        cdone = dw2_out_rows(rows, W, Wo, C, Co, Cn, w, bias, (int)s, p, a, b, orow, rrow, lo, hi, clamp,
                             yrow, ykind);
#endif
    dw_rows_from(rows, W, Wo, C, Co, Cn, cdone, w, bias, s, p, a, b, orow, rrow, lo, hi, clamp, yrow,
                 ykind);
}

static void dw_rows_from(const float *const rows[3], int64_t W, int64_t Wo, int64_t C, int64_t Co,
                         int64_t Cn, int64_t cfrom, const float *w, const float *bias, int64_t s,
                         int64_t p, int64_t a, int64_t b, float *orow, const float *rrow, float lo,
                         float hi, int clamp, double *yrow, int ykind) {
    for (int64_t c0 = cfrom; c0 < Cn; c0 += VW) {
        const int nl = Cn - c0 < VW ? (int)(Cn - c0) : VW, full = nl == VW;
        vf wv[9], bv, sq;
        for (int t = 0; t < 9; t++) wv[t] = dw_load(w + t * Co + c0, full, nl);
        bv = dw_load(bias + c0, full, nl);
        if (s == 1 && full)
            sq = dw_row(rows, W, Wo, C, Co, c0, 1, VW, 1, p, a, b, wv, bv, orow, rrow, lo, hi, clamp,
                        ykind);
        else if (s == 2 && full)
            sq = dw_row(rows, W, Wo, C, Co, c0, 1, VW, 2, p, a, b, wv, bv, orow, rrow, lo, hi, clamp,
                        ykind);
        else if (s == 1)
            sq = dw_row(rows, W, Wo, C, Co, c0, 0, nl, 1, p, a, b, wv, bv, orow, rrow, lo, hi, clamp,
                        ykind);
        else if (s == 2)
            sq = dw_row(rows, W, Wo, C, Co, c0, 0, nl, 2, p, a, b, wv, bv, orow, rrow, lo, hi, clamp,
                        ykind);
        else
            sq = dw_row_any(rows, W, Wo, C, Co, c0, full, nl, s, p, wv, bv, orow, rrow, lo, hi, clamp,
                            ykind);
        if (yrow) add_lanes(yrow + c0, sq, nl);
    }
}

/* One output row of the depthwise layer, all C channels (see dw_out_rows). */
static void dw_out_row(const float *const rows[3], int64_t W, int64_t Wo, int64_t C, const float *w,
                       const float *bias, int64_t s, int64_t p, int64_t a, int64_t b, float *orow,
                       const float *rrow, float lo, float hi, int clamp, double *yrow, int ykind) {
    dw_out_rows(rows, W, Wo, C, C, C, w, bias, s, p, a, b, orow, rrow, lo, hi, clamp, yrow, ykind);
}

#if defined(__AVX512F__) && DWR_ROWS > 1
/* Positions [ow0, ow0 + m) of output rows o < RO, channels c0.. (full, or the first nl): rows[i]
 * the input rows (NULL: padding), orow / rrow each output row's output and residual (NULL: none);
 * the output sums' terms of row o added in order into pend[o] (dwr_row adds those of DW_MR
 * positions into the row's sum at a time, as dw_row adds dw_tile's). */
static inline __attribute__((always_inline)) void
dwr_tile(const float *const *rows, int64_t W, int64_t C, int64_t Co, int64_t c0, int full, int nl,
         int64_t ow0, int64_t m, const int MR, const int S, const int RO, int64_t p, const vf wv[9],
         vf bv, float *const *orow, const float *const *rrow, float lo, float hi, int clamp,
         const int checked, int ykind, vf *pend) {
    vf acc[DWR_ROWS][DWR_MR];
    #pragma GCC unroll 16
    for (int o = 0; o < RO; o++)
        #pragma GCC unroll 16
        for (int i = 0; i < MR; i++) acc[o][i] = bv;
    #pragma GCC unroll 16
    for (int r = 0; r < (RO - 1) * S + 3; r++) {
        if (!rows[r]) continue;
        const float *src = rows[r] + c0;
        #pragma GCC unroll 40
        for (int j = 0; j < (MR - 1) * S + 3; j++) {
            const int64_t iw = ow0 * S - p + j;
            if (checked && (iw < 0 || iw >= W)) continue;
            const vf v = dw_load(src + iw * C, full, nl);
            #pragma GCC unroll 16
            for (int o = 0; o < RO; o++) {
                const int k = r - o * S;  /* the kernel row of output row o that reads input row r */
                if (k < 0 || k >= 3) continue;
                #pragma GCC unroll 16
                for (int i = 0; i < MR; i++) {
                    const int q = j - i * S;
                    if (q >= 0 && q < 3) acc[o][i] += v * wv[k * 3 + q];
                }
            }
        }
    }
    #pragma GCC unroll 16
    for (int o = 0; o < RO; o++) {
        vf so = pend[o];
        #pragma GCC unroll 16
        for (int i = 0; i < MR; i++) {
            if (checked && i >= m) break;
            float *d = orow[o] + (ow0 + i) * Co + c0;
            const float *rs = rrow[o] ? rrow[o] + (ow0 + i) * Co + c0 : 0;
            vf v = acc[o][i];
            if (full) {
                if (rs) v += ld(rs);
                v = clamp ? clampv(v, lo, hi) : v;
                st(d, v);
            } else {
                const __mmask16 mk = (__mmask16)((1u << nl) - 1u);
                if (rs) v += (vf)_mm512_maskz_loadu_ps(mk, rs);
                v = (vf)_mm512_maskz_mov_ps(mk, (__m512)(clamp ? clampv(v, lo, hi) : v));
                _mm512_mask_storeu_ps(d, mk, (__m512)v);
            }
            if (ykind >= 0) so += sum_term(v, ykind);
        }
        pend[o] = so;
    }
}

static inline __attribute__((always_inline)) void
dwr_row(const float *const *rows, int64_t W, int64_t Wo, int64_t C, int64_t Co, int64_t c0, int full,
        int nl, const int S, const int RO, int64_t p, int64_t a, int64_t b, const vf wv[9], vf bv,
        float *const *orow, const float *const *rrow, float lo, float hi, int clamp, int ykind,
        vf *sq) {
    vf pend[DWR_ROWS];
    for (int64_t ow = 0; ow < Wo; ow += DWR_MR) {
        const int64_t m = Wo - ow < DWR_MR ? Wo - ow : DWR_MR;
        if (ow % DW_MR == 0)
            for (int o = 0; o < RO; o++) pend[o] = (vf){0};
        if (ow >= a && ow + DWR_MR <= b)
            dwr_tile(rows, W, C, Co, c0, full, nl, ow, DWR_MR, DWR_MR, S, RO, p, wv, bv, orow, rrow,
                     lo, hi, clamp, 0, ykind, pend);
        else
            dwr_tile(rows, W, C, Co, c0, full, nl, ow, m, DWR_MR, S, RO, p, wv, bv, orow, rrow, lo, hi,
                     clamp, 1, ykind, pend);
        if ((ow + DWR_MR) % DW_MR == 0 || ow + DWR_MR >= Wo)  /* dw_row's tile of DW_MR ends */
            for (int o = 0; o < RO; o++) sq[o] += pend[o];
    }
}

/* RO output rows of all C channels (dw_out_row's arguments per row; s 1 or 2): rows holds the
 * (RO - 1) s + 3 input rows they read, orow / rrow their outputs and residuals */
static inline __attribute__((always_inline)) void
dwr_rows(const float *const *rows, const int RO, int64_t W, int64_t Wo, int64_t C, const float *w,
         const float *bias, int64_t s, int64_t p, int64_t a, int64_t b, float *const *orow,
         const float *const *rrow, float lo, float hi, int clamp, double *yrow, int ykind) {
    for (int64_t c0 = 0; c0 < C; c0 += VW) {
        const int nl = C - c0 < VW ? (int)(C - c0) : VW, full = nl == VW;
        vf wv[9], bv, sq[DWR_ROWS];
        for (int t = 0; t < 9; t++) wv[t] = dw_load(w + t * C + c0, full, nl);
        bv = dw_load(bias + c0, full, nl);
        for (int o = 0; o < RO; o++) sq[o] = (vf){0};
        if (s == 1 && full)
            dwr_row(rows, W, Wo, C, C, c0, 1, VW, 1, RO, p, a, b, wv, bv, orow, rrow, lo, hi, clamp,
                    ykind, sq);
        else if (s == 2 && full)
            dwr_row(rows, W, Wo, C, C, c0, 1, VW, 2, RO, p, a, b, wv, bv, orow, rrow, lo, hi, clamp,
                    ykind, sq);
        else if (s == 1)
            dwr_row(rows, W, Wo, C, C, c0, 0, nl, 1, RO, p, a, b, wv, bv, orow, rrow, lo, hi, clamp,
                    ykind, sq);
        else
            dwr_row(rows, W, Wo, C, C, c0, 0, nl, 2, RO, p, a, b, wv, bv, orow, rrow, lo, hi, clamp,
                    ykind, sq);
        if (yrow)
            for (int o = 0; o < RO; o++) add_lanes(yrow + c0, sq[o], nl);
    }
}

/* ro (DWR_ROWS, or 2 <= DWR_ROWS) output rows: dwr_rows */
static void dwr_out_rows(const float *const *rows, int ro, int64_t W, int64_t Wo, int64_t C,
                         const float *w, const float *bias, int64_t s, int64_t p, int64_t a, int64_t b,
                         float *const *orow, const float *const *rrow, float lo, float hi, int clamp,
                         double *yrow, int ykind) {
    if (ro == DWR_ROWS)
        dwr_rows(rows, DWR_ROWS, W, Wo, C, w, bias, s, p, a, b, orow, rrow, lo, hi, clamp, yrow, ykind);
    else
        dwr_rows(rows, 2, W, Wo, C, w, bias, s, p, a, b, orow, rrow, lo, hi, clamp, yrow, ykind);
}
#endif

/* ---- the depthwise layer on several output rows at once (AVX2) ---------------------------------
 * dwr_rows' pass on 16 registers: RO output rows x DWR_MR positions of accumulators, and per kernel
 * row its three weights (dw2_tile's), each row's input row for that kernel row read from L1 (a
 * tile's (RO - 1) S + 3 input rows are 1-2 KB): each input row comes from L2 once per RO output
 * rows, not once per row. Whole rows, a vector of channels at a time (segments of positions whose
 * input rows fit in L1, as dw2_out_rows, and the weights as memory operands of the FMAs were both
 * slower on MobileNetV2: docs/benchmarks.md). Each output sums its terms in dw_tile's order and the
 * output sums add DW_MR positions a time as dw_row: outputs and sums bit for bit dw_row's
 * (-DDWR_ROWS=1 runs dw2_out_rows / dw_row; its sums on maps in L2 differ in rounding). */
#if !defined(__AVX512F__) && DWR_ROWS > 1

/* Positions [ow0, ow0 + m) of output rows o < RO, VW channels c0.. (w: their weights, [9][Co]):
 * rows[i] the input rows (NULL: padding), orow / rrow each row's output and residual (NULL: none);
 * row o's output sums' terms added in order into pend[o] */
static inline __attribute__((always_inline)) void
dwr2_tile(const float *const *rows, int64_t W, int64_t C, int64_t Co, int64_t c0, int64_t ow0, int64_t m,
          const int MR, const int S, const int RO, int64_t p, const float *w, vf bv, float *const *orow,
          const float *const *rrow, float lo, float hi, int clamp, const int checked, int ykind,
          vf *pend) {
    vf acc[DWR_ROWS][DWR_MR];
    #pragma GCC unroll 16
    for (int o = 0; o < RO; o++)
        #pragma GCC unroll 16
        for (int i = 0; i < MR; i++) acc[o][i] = bv;
    #pragma GCC unroll 3
    for (int k = 0; k < 3; k++) {
        const vf w0 = ld(w + (3 * k) * Co), w1 = ld(w + (3 * k + 1) * Co), w2 = ld(w + (3 * k + 2) * Co);
        #pragma GCC unroll 16
        for (int o = 0; o < RO; o++) {
            if (!rows[o * S + k]) continue;
            const float *src = rows[o * S + k] + c0;
            #pragma GCC unroll 40
            for (int j = 0; j < (MR - 1) * S + 3; j++) {
                const int64_t iw = ow0 * S - p + j;
                if (checked && (iw < 0 || iw >= W)) continue;
                const vf v = ld(src + iw * C);
                #pragma GCC unroll 16
                for (int i = 0; i < MR; i++) {
                    const int q = j - i * S;
                    if (q == 0) acc[o][i] += v * w0;
                    else if (q == 1) acc[o][i] += v * w1;
                    else if (q == 2) acc[o][i] += v * w2;
                }
            }
        }
    }
    #pragma GCC unroll 16
    for (int o = 0; o < RO; o++) {
        vf so = pend[o];
        #pragma GCC unroll 16
        for (int i = 0; i < MR; i++) {
            if (checked && i >= m) break;
            float *d = orow[o] + (ow0 + i) * Co + c0;
            vf v = acc[o][i];
            if (rrow[o]) v += ld(rrow[o] + (ow0 + i) * Co + c0);
            v = clamp ? nh_clampv(v, lo, hi) : v;
            st(d, v);
            if (ykind >= 0) so += sum_term(v, ykind);
        }
        pend[o] = so;
    }
}

/* Positions [o0, o1) (o0 a multiple of DW_MR, o1 one or Wo) of RO rows, one vector of channels;
 * row o's output sums added into sq[o] DW_MR positions at a time (dw_row's grouping) */
static inline __attribute__((always_inline)) void
dwr2_seg(const float *const *rows, int64_t W, int64_t o0, int64_t o1, int64_t C, int64_t Co, int64_t c0,
         const int S, const int RO, int64_t p, int64_t a, int64_t b, const float *w, vf bv,
         float *const *orow, const float *const *rrow, float lo, float hi, int clamp, int ykind,
         vf *sq) {
    vf pend[DWR_ROWS] = {{0}};
    for (int64_t ow = o0; ow < o1; ow += DWR_MR) {
        const int64_t m = o1 - ow < DWR_MR ? o1 - ow : DWR_MR;
        if (ow % DW_MR == 0)
            for (int o = 0; o < RO; o++) pend[o] = (vf){0};
        if (m == DWR_MR && ow >= a && ow + DWR_MR <= b)
            dwr2_tile(rows, W, C, Co, c0, ow, DWR_MR, DWR_MR, S, RO, p, w, bv, orow, rrow, lo, hi, clamp,
                      0, ykind, pend);
        else
            dwr2_tile(rows, W, C, Co, c0, ow, m, DWR_MR, S, RO, p, w, bv, orow, rrow, lo, hi, clamp, 1,
                      ykind, pend);
        if ((ow + DWR_MR) % DW_MR == 0 || ow + DWR_MR >= o1)  /* dw_row's tile of DW_MR ends */
            for (int o = 0; o < RO; o++) sq[o] += pend[o];
    }
}

/* ro (1, 2 or DWR_ROWS) output rows, the whole vectors of Cn channels (input rows of C floats a
 * position; outputs, residuals and weights of Co: see dw_out_rows), strides 1 and 2: rows holds
 * the (ro - 1) s + 3 input rows they read. Returns how many channels it did (the rest:
 * dw_rows_from). */
static int64_t dwr2_whole(const float *const *rows, int ro, int64_t W, int64_t Wo, int64_t C,
                          int64_t Co, int64_t Cn, const float *w, const float *bias, int64_t s, int64_t p,
                          int64_t a, int64_t b, float *const *orow, const float *const *rrow, float lo,
                          float hi, int clamp, double *yrow, int ykind) {
    const int64_t nv = Cn / VW;
    if (nv == 0) return 0;
    vf sq[DWR_ROWS * nv];
    memset(sq, 0, sizeof sq);
    for (int64_t v = 0; v < nv; v++) {
        const int64_t c0 = v * VW;
        const vf bv = ld(bias + c0);
        vf *sv = sq + v * DWR_ROWS;
        if (ro == DWR_ROWS && s == 1)
            dwr2_seg(rows, W, 0, Wo, C, Co, c0, 1, DWR_ROWS, p, a, b, w + c0, bv, orow, rrow, lo, hi,
                     clamp, ykind, sv);
        else if (ro == DWR_ROWS)
            dwr2_seg(rows, W, 0, Wo, C, Co, c0, 2, DWR_ROWS, p, a, b, w + c0, bv, orow, rrow, lo, hi,
                     clamp, ykind, sv);
        else if (ro == 2 && s == 1)
            dwr2_seg(rows, W, 0, Wo, C, Co, c0, 1, 2, p, a, b, w + c0, bv, orow, rrow, lo, hi, clamp,
                     ykind, sv);
        else if (ro == 2)
            dwr2_seg(rows, W, 0, Wo, C, Co, c0, 2, 2, p, a, b, w + c0, bv, orow, rrow, lo, hi, clamp,
                     ykind, sv);
        else if (s == 1)
            dwr2_seg(rows, W, 0, Wo, C, Co, c0, 1, 1, p, a, b, w + c0, bv, orow, rrow, lo, hi, clamp,
                     ykind, sv);
        else
            dwr2_seg(rows, W, 0, Wo, C, Co, c0, 2, 1, p, a, b, w + c0, bv, orow, rrow, lo, hi, clamp,
                     ykind, sv);
    }
    if (yrow)
        for (int64_t v = 0; v < nv; v++)
            for (int o = 0; o < ro; o++) add_lanes(yrow + v * VW, sq[v * DWR_ROWS + o], VW);
    return nv * VW;
}

/* ro (DWR_ROWS or 2) output rows of Cn channels (dw_out_rows' arguments): dwr2_whole, the
 * channels past the last whole vector one row at a time */
static void dwr2_out_rows(const float *const *rows, int ro, int64_t W, int64_t Wo, int64_t C, int64_t Co,
                          int64_t Cn, const float *w, const float *bias, int64_t s, int64_t p, int64_t a,
                          int64_t b, float *const *orow, const float *const *rrow, float lo, float hi,
                          int clamp, double *yrow, int ykind) {
    const int64_t done = dwr2_whole(rows, ro, W, Wo, C, Co, Cn, w, bias, s, p, a, b, orow, rrow, lo, hi,
                                    clamp, yrow, ykind);
    if (done < Cn)
        for (int o = 0; o < ro; o++)
            dw_rows_from(rows + o * s, W, Wo, C, Co, Cn, done, w, bias, s, p, a, b, orow[o], rrow[o], lo,
                         hi, clamp, yrow, ykind);
}

/* all C channels (dwr_out_rows of AVX-512 builds) */
static void dwr_out_rows(const float *const *rows, int ro, int64_t W, int64_t Wo, int64_t C,
                         const float *w, const float *bias, int64_t s, int64_t p, int64_t a, int64_t b,
                         float *const *orow, const float *const *rrow, float lo, float hi, int clamp,
                         double *yrow, int ykind) {
    dwr2_out_rows(rows, ro, W, Wo, C, C, C, w, bias, s, p, a, b, orow, rrow, lo, hi, clamp, yrow, ykind);
}
#endif

/* output columns whose taps are all inside the row: [*a, *b) */
static void dw_inside(int64_t W, int64_t Wo, int64_t s, int64_t p, int64_t *a, int64_t *b) {
    int64_t x = (p + s - 1) / s, y = W - 3 + p >= 0 ? (W - 3 + p) / s + 1 : 0;
    x = x > Wo ? Wo : x;
    *a = x;
    *b = y < x ? x : y > Wo ? Wo : y;
}

/* this thread's share [*r0, *r1) of n rows: contiguous, in thread order (as a static schedule),
 * so that the fused expansion + depthwise op sums each row's terms on the thread that the
 * depthwise layer's own call does */
static void thread_rows(int64_t n, int64_t *r0, int64_t *r1) {
    const int64_t T = omp_get_num_threads(), t = omp_get_thread_num(), q = n / T, rem = n % T;
    *r0 = t * q + (t < rem ? t : rem);
    *r1 = *r0 + q + (t < rem);
}

/* ispc_dwconv3x3_nhwc's work inside a parallel region, ws its workspace; ends with a barrier.
 * Threads take contiguous runs of the batch's output rows. */
static void dw_region(const float *x, int64_t N, int64_t H, int64_t W, int64_t C, const float *w,
                      const float *bias, int64_t s, int64_t p, float *out, const float *res,
                      float lo, float hi, const ispc_sums_t *sums, float *ws) {
    const int64_t Ho = conv_out(H, 3, s, p, 1), Wo = conv_out(W, 3, s, p, 1);
    const int clamp = lo > -__builtin_inff() || hi < __builtin_inff();
    const int ykind = sums && sums->out ? (int)sums->out_kind : -1;
    double *const hout = ykind >= 0 ? sums->hand_out : 0;  /* rows left for the next op */
    double *ysums = hout ? hout : ykind >= 0 ? (double *)ws : 0;
    int64_t a, b, r0, r1;
    dw_inside(W, Wo, s, p, &a, &b);
    double *yrow = ysums ? ysums + (int64_t)omp_get_thread_num() * N * C : 0;
    if (yrow) memset(yrow, 0, sizeof(double) * N * C);
    thread_rows(N * Ho, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) {
        const int64_t n = r / Ho, oh = r % Ho;
#if DWR_ROWS > 1
        /* rows of one instance several at a time on shared input rows (dwr_out_rows) */
        const int64_t left = (r1 - r < Ho - oh ? r1 - r : Ho - oh);
        const int nr = left >= DWR_ROWS ? DWR_ROWS : left >= 2 ? 2 : 1;
        if ((s == 1 || s == 2) && nr > 1) {
            const float *rows[(DWR_ROWS - 1) * 2 + 3], *rr[DWR_ROWS];
            float *orr[DWR_ROWS];
            for (int64_t q = 0; q < (nr - 1) * s + 3; q++) {
                const int64_t ih = oh * s - p + q;
                rows[q] = ih >= 0 && ih < H ? x + (n * H + ih) * W * C : 0;
            }
            for (int q = 0; q < nr; q++) {
                orr[q] = out + (r + q) * Wo * C;
                rr[q] = res ? res + (r + q) * Wo * C : 0;
            }
            dwr_out_rows(rows, nr, W, Wo, C, w, bias, s, p, a, b, orr, rr, lo, hi, clamp,
                         yrow ? yrow + n * C : 0, ykind);
            r += nr - 1;
            continue;
        }
#endif
        const float *rows[3];
        for (int q = 0; q < 3; q++) {
            const int64_t ih = oh * s - p + q;
            rows[q] = ih >= 0 && ih < H ? x + (n * H + ih) * W * C : 0;
        }
        dw_out_row(rows, W, Wo, C, w, bias, s, p, a, b, out + r * Wo * C,
                   res ? res + r * Wo * C : 0, lo, hi, clamp, yrow ? yrow + n * C : 0, ykind);
    }
    #pragma omp barrier
    if (ysums && !hout) reduce_sums(ysums, omp_get_num_threads(), N, C, C, sums->out);
}

/* The depthwise layer on x (N, H, W, C) channels-last -> out (N, Ho, Wo, C); res (NULL: none) of
 * the output's shape; sums (NULL: none): sums->out receives the output's saliency sums (sums->in
 * is not read). Threads split the output rows of the batch. Returns 0, or the workspace (floats) it
 * needs when ws_floats is smaller (nothing computed). */
int64_t ispc_dwconv3x3_nhwc(const float *x, int64_t N, int64_t H, int64_t W, int64_t C, const float *w,
                            const float *bias, int64_t s, int64_t p, float *out, const float *res,
                            float lo, float hi, const ispc_sums_t *sums, float *ws, int64_t ws_floats,
                            int64_t threads) {
    const int64_t need = dw_workspace(N, C, sums, threads);
    if (need > ws_floats) return need;
    const int64_t Ho = conv_out(H, 3, s, p, 1), Wo = conv_out(W, 3, s, p, 1);
    #pragma omp parallel num_threads(threads) if ((sums && sums->out) || N * Ho * Wo * C >= (1 << 14))
    dw_region(x, N, H, W, C, w, bias, s, p, out, res, lo, hi, sums, ws);
    return 0;
}

/* ---- pooling on channels-last maps: ResNet's stem max-pool, global average pools ----------------
 * Channels in vector lanes, as the layers around them store their maps: one pass over the input,
 * no layout copy; a max-pool applies the activation before it after it (it commutes with the max). */

/* max(a, b) per lane, NaN propagating as max_pool2d does: a NaN in either operand gives NaN */
static inline vf pool_max(vf a, vf b) {
    const vi pick = (a > b) | (a != a);
    return (vf)((pick & (vi)a) | (~pick & (vi)b));
}

static inline float pool_max1(float a, float b) { return (a > b || a != a) ? a : b; }

/* dst (N, Ho, Wo, C) = clamp(max over each kh x kw window (stride sh, sw; padding ph, pw, never
 * selected) of src (N, H, W, C), lo, hi); floor-mode output size, no dilation; every window holds
 * at least one input position (padding below the kernel, as max_pool2d requires). Threads split
 * output rows. */
static void maxpool_region(const float *src, int64_t N, int64_t H, int64_t W, int64_t C, int64_t kh,
                           int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, float lo,
                           float hi, float *dst) {
    const int64_t Ho = (H + 2 * ph - kh) / sh + 1, Wo = (W + 2 * pw - kw) / sw + 1;
    const int clamp = lo > -__builtin_inff() || hi < __builtin_inff();
    const int64_t CV = C / VW * VW;
    #pragma omp for collapse(2) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t oh = 0; oh < Ho; oh++) {
            const int64_t ih0 = oh * sh - ph;
            const int64_t r0 = ih0 < 0 ? 0 : ih0, r1 = ih0 + kh > H ? H : ih0 + kh;
            for (int64_t ow = 0; ow < Wo; ow++) {
                const int64_t iw0 = ow * sw - pw;
                const int64_t q0 = iw0 < 0 ? 0 : iw0, q1 = iw0 + kw > W ? W : iw0 + kw;
                float *d = dst + ((n * Ho + oh) * Wo + ow) * C;
                const float *first = src + ((n * H + r0) * W + q0) * C;
                for (int64_t c = 0; c < CV; c += VW) {
                    vf m = ld(first + c);
                    for (int64_t r = r0; r < r1; r++)
                        for (int64_t q = q0; q < q1; q++)
                            m = pool_max(ld(src + ((n * H + r) * W + q) * C + c), m);
                    st(d + c, clamp ? clampv(m, lo, hi) : m);
                }
                for (int64_t c = CV; c < C; c++) {
                    float m = first[c];
                    for (int64_t r = r0; r < r1; r++)
                        for (int64_t q = q0; q < q1; q++)
                            m = pool_max1(src[((n * H + r) * W + q) * C + c], m);
                    d[c] = clamp && m == m ? (m < lo ? lo : m > hi ? hi : m) : m;
                }
            }
        }
}

int64_t ispc_maxpool_nhwc(const float *src, int64_t N, int64_t H, int64_t W, int64_t C, int64_t kh,
                          int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, float lo,
                          float hi, float *dst, int64_t threads) {
    const int64_t Ho = (H + 2 * ph - kh) / sh + 1, Wo = (W + 2 * pw - kw) / sw + 1;
    #pragma omp parallel num_threads(threads) if (N * Ho * Wo * C >= (1 << 15))
    maxpool_region(src, N, H, W, C, kh, kw, sh, sw, ph, pw, lo, hi, dst);
    return 0;
}

/* dst (N, C) = the mean over the HW positions of src (N, HW, C): a global average pool (the
 * classifier's input), float sums over positions in order, divided by HW. Threads split (instance,
 * block of channels) only for large maps: on a small one, waking them costs more than the pass. */
static void avgpool_region(const float *src, int64_t N, int64_t HW, int64_t C, float *dst) {
    const int64_t CB = 4 * VW, blocks = (C + CB - 1) / CB;
    const float div = (float)HW;
    #pragma omp for collapse(2) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t c0 = b * CB, c1 = c0 + CB < C ? c0 + CB : C;
            const float *x = src + n * HW * C;
            if (c1 - c0 == CB) {
                vf a[4] = {{0}, {0}, {0}, {0}};
                for (int64_t p = 0; p < HW; p++)
                    for (int j = 0; j < 4; j++) a[j] += ld(x + p * C + c0 + j * VW);
                for (int j = 0; j < 4; j++) st(dst + n * C + c0 + j * VW, a[j] / div);
            } else {
                for (int64_t c = c0; c < c1; c++) {
                    float a = 0.0f;
                    for (int64_t p = 0; p < HW; p++) a += x[p * C + c];
                    dst[n * C + c] = a / div;
                }
            }
        }
}

int64_t ispc_avgpool_global_nhwc(const float *src, int64_t N, int64_t HW, int64_t C, float *dst,
                                 int64_t threads) {
    #pragma omp parallel num_threads(threads) if (N * HW * C >= (1 << 18))
    avgpool_region(src, N, HW, C, dst);
    return 0;
}

/* ---- layout: a model's NCHW input to the channels-last maps it runs in ---------------------------
 * dst (N, HW, C) = src (N, C, HW) transposed, for the few channels of an image (C <= 16): each
 * position's C values gathered from C planes, read and written once in order. (PyTorch's copy took
 * 0.075-0.083 ms for a 3x224x224 image inside a compiled model, 2-core Xeon.) Threads split the
 * positions. */
static void to_nhwc_region(const float *src, int64_t N, int64_t C, int64_t HW, float *dst) {
    #pragma omp for collapse(2) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t b = 0; b < (HW + 1023) / 1024; b++) {
            const int64_t p0 = b * 1024, p1 = p0 + 1024 < HW ? p0 + 1024 : HW;
            const float *s = src + n * C * HW;
            float *d = dst + n * HW * C;
            if (C == 3) {  /* an RGB image: the constant channel count lets the compiler vectorize */
                for (int64_t p = p0; p < p1; p++) {
                    d[p * 3] = s[p];
                    d[p * 3 + 1] = s[HW + p];
                    d[p * 3 + 2] = s[2 * HW + p];
                }
            } else {
                for (int64_t p = p0; p < p1; p++)
                    for (int64_t c = 0; c < C; c++) d[p * C + c] = s[c * HW + p];
            }
        }
}

int64_t ispc_nchw_to_nhwc(const float *src, int64_t N, int64_t C, int64_t HW, float *dst,
                          int64_t threads) {
    if (C > 16) return 1;
    #pragma omp parallel num_threads(threads) if (N * C * HW >= (1 << 16))
    to_nhwc_region(src, N, C, HW, dst);
    return 0;
}

/* ---- a chain of channels-last layers in one call ------------------------------------------------
 * A compiled model's layers run from Python one call each cost more than the kernels of a small
 * model at batch 1 (MobileNetV2 on 16x16 inputs took 1.7 ms in 52 layer calls). ispc_run_ops runs
 * a prepared list of the entries above in order, maps in slots (pointers the caller fills), with
 * the same arguments the per-layer calls pass: the same results. native_plan.py builds the list.
 * All ops run in one parallel region, each as the work-sharing loops of its entry's own region
 * (every op ends with a barrier): one fork/join per call, not one per op.
 * A run of consecutive ops with the same chunk (0 < chunk < N) runs chunk instances at a time
 * through all of its ops, so that the maps between them stay in cache (each op then computes as
 * its own call on those instances would: the same results as the per-layer calls per chunk). */
#define OP_CONV 0     /* ispc_conv_nhwc */
#define OP_DW 1       /* ispc_dwconv3x3_nhwc */
#define OP_AVGPOOL 2  /* ispc_avgpool_global_nhwc */
#define OP_TO_NHWC 3  /* ispc_nchw_to_nhwc */
#define OP_MAXPOOL 4  /* ispc_maxpool_nhwc */
#define OP_EXPAND_DW 5  /* a 1x1 convolution (ispc_conv_nhwc) and the depthwise 3x3 that reads it */
#define OP_LINEAR 6     /* a fully connected layer on (N, C) features (the classifier): linear_region */
#define OP_LINEAR_T 7   /* the same on input-major weights, zero inputs skipped: linear_t_region */
#define OP_EXPAND_DW_CH 8  /* OP_EXPAND_DW split between threads by channels: expand_dw_ch_region */
#define OP_CONV_MAXPOOL 9  /* a dense convolution (ispc_conv_nhwc) and the max-pool that reads it */
#define OP_CONV_PAIR 10    /* two 1x1 convolutions summed, the first's map unwritten: pair_region */
#define OP_LAST OP_CONV_PAIR

typedef struct {
    int64_t kind, x, out, res;           /* slots; res -1: none */
    int64_t N, H, W, C;                  /* the input map */
    const ispc_nhwc_layer_t *layer;      /* OP_CONV */
    const float *w, *bias;               /* OP_DW: packed [9][C] weights and bias */
    int64_t kh, kw, sh, sw, ph, pw;      /* OP_DW (sh, ph), OP_MAXPOOL, OP_CONV_MAXPOOL's pool */
    const float *scale;                  /* OP_CONV gated modes */
    int64_t saliency, mode, k;
    float threshold, lo, hi;
    int64_t sums_in, sums_out, sums_kind;  /* slots of (N, C) / (N, cout) sums; -1: none */
    int64_t chunk;                       /* instances per pass (0: all N at once) */
    int64_t local;                       /* OP_LOCAL_*: slots holding one chunk's maps */
    float lo2, hi2;                      /* OP_EXPAND_DW, OP_CONV_MAXPOOL: the second layer's clamp */
    int64_t outs;                        /* OP_LINEAR: output features (w: packed, bias: padded);
                                            OP_LINEAR_T: (w: (C H W, outs), features in NCHW order) */
    /* OP_CONV_PAIR: the second layer (layer, x, scale, ... and sums_in are the first's; lo, hi,
       sums_out, sums_kind the second's; res the first's map) */
    const ispc_nhwc_layer_t *layer2;
    int64_t x2, H2, W2, C2;              /* its input map: slot and size */
    const float *scale2;
    int64_t saliency2, mode2, k2;
    float threshold2;
    int64_t sums_in2;
} ispc_op_t;

/* an op's x, out or res slot holds one chunk's instances only (a map made and used inside one
 * chunked run: the same buffer for every chunk, so that it stays in cache) */
#define OP_LOCAL_X 1
#define OP_LOCAL_OUT 2
#define OP_LOCAL_RES 4
#define OP_LOCAL_X2 8

/* the op's output map per instance: positions and channels */
static void op_out(const ispc_op_t *o, int64_t *hw, int64_t *c) {
    switch (o->kind) {
    case OP_CONV:
    case OP_CONV_PAIR: {  /* the pair's: its first layer's (the second's is the same) */
        const ispc_nhwc_layer_t *L = o->layer;
        *hw = conv_out(o->H, L->kh, L->sh, L->ph, L->dh) * conv_out(o->W, L->kw, L->sw, L->pw, L->dw);
        *c = L->cout;
        return;
    }
    case OP_DW:
        *hw = conv_out(o->H, 3, o->sh, o->ph, 1) * conv_out(o->W, 3, o->sh, o->ph, 1);
        break;
    case OP_EXPAND_DW:
    case OP_EXPAND_DW_CH: {  /* the depthwise layer on the first layer's output */
        const ispc_nhwc_layer_t *L = o->layer;
        const int64_t hx = conv_out(o->H, L->kh, L->sh, L->ph, L->dh);
        const int64_t wx = conv_out(o->W, L->kw, L->sw, L->pw, L->dw);
        *hw = conv_out(hx, 3, o->sh, o->ph, 1) * conv_out(wx, 3, o->sh, o->ph, 1);
        *c = L->cout;
        return;
    }
    case OP_AVGPOOL:
        *hw = 1;
        break;
    case OP_LINEAR:
    case OP_LINEAR_T:
        *hw = 1;
        *c = o->outs;
        return;
    case OP_MAXPOOL:
        *hw = ((o->H + 2 * o->ph - o->kh) / o->sh + 1) * ((o->W + 2 * o->pw - o->kw) / o->sw + 1);
        break;
    case OP_CONV_MAXPOOL: {
        const ispc_nhwc_layer_t *L = o->layer;
        const int64_t hc = conv_out(o->H, L->kh, L->sh, L->ph, L->dh);
        const int64_t wc = conv_out(o->W, L->kw, L->sw, L->pw, L->dw);
        *hw = ((hc + 2 * o->ph - o->kh) / o->sh + 1) * ((wc + 2 * o->pw - o->kw) / o->sw + 1);
        *c = L->cout;
        return;
    }
    default:
        *hw = o->H * o->W;
    }
    *c = o->C;
}

/* per-op seconds added by ispc_run_ops (NULL: not timed): a profiling aid, one caller at a time */
static double *op_times;

void ispc_run_ops_times(double *times) { op_times = times; }

/* ---- a 1x1 expansion and the depthwise 3x3 after it, fused (MobileNetV2's blocks) --------------
 * The expanded map (6x the block's channels; 4.8 MB at 112x112 for one image) never goes to
 * memory: each thread takes the depthwise layer's output rows that its own call gives the thread
 * (thread_rows) and walks them in groups, computing the expanded rows the group reads into a
 * window of its own (rows the previous group also read are moved, not computed again) with the
 * expansion's kernel (nh_conv, on those rows alone: the same values as on the whole map), then the
 * group's output rows from the window. Gated expansions select each instance's channels first,
 * all threads together (nh_select), as their own call does. Results equal the two layers' calls. */

/* bytes of expanded rows a thread's window aims at (with the rows' inputs, in its L2) */
#ifndef EXPAND_DW_WINDOW_BYTES
#define EXPAND_DW_WINDOW_BYTES (384 << 10)
#endif

/* output rows per group and the window's rows for a depthwise layer of stride s on rows of
 * rowf floats */
static void xdw_window(int64_t rowf, int64_t s, int64_t *group, int64_t *rows) {
    int64_t g = ((int64_t)EXPAND_DW_WINDOW_BYTES / (rowf * (int64_t)sizeof(float) + 1) - 3) / s + 1;
    *group = g < 1 ? 1 : g;
    *rows = (*group - 1) * s + 3;
}

typedef struct {
    nh_plan_t P;       /* the expansion's workspace, as its own call (no output sums) */
    int64_t group, rows, win, ysums;  /* floats: a thread's window, the output sums' doubles */
} xdw_plan_t;

/* Both fused expansion + depthwise ops (threads splitting rows: expand_dw_region; channels:
 * expand_dw_ch_region) lay their workspace out alike: the expansion's selection workspace as its
 * own call (no output sums), then the output sums' doubles (2 * threads * N * cout floats), then
 * each thread's window or buffer. */
static void xop_plan(nh_plan_t *P, nh_geom_t *g, int64_t *ysums, const ispc_op_t *o, int64_t N,
                     const ispc_sums_t *sums, int64_t threads) {
    nh_geometry(g, o->layer, N, o->H, o->W);
    const ispc_sums_t in = {sums ? sums->in : 0, 0, 0};
    nh_plan(P, g, o->mode, o->k, in.in ? &in : 0, threads);
    *ysums = sums && sums->out ? (2 * threads * N * o->layer->cout + 15) / 16 * 16 : 0;
}

/* floats from the workspace's start to the output sums */
static int64_t xop_yoff(const nh_plan_t *P) {
    return (P->total - P->zeros + 15) / 16 * 16;
}

typedef struct {
    int32_t *ix;     /* each instance's kept input channels (gated) */
    int64_t *cnt;    /* and how many */
    double *ysums;   /* the output sums, every thread's rows (0 without) */
    double *yrow;    /* this thread's row, zeroed */
    int dense;       /* the expansion keeps every channel */
    int clamp;       /* the expansion's clamp code (nh_clamp_code) */
    int clamp2;      /* whether the depthwise layer clamps */
    int ykind;       /* the output sums' kind (-1: none) */
    int hand;        /* the rows are left unreduced for the next op (ispc_sums_t.hand_out) */
} xop_head_t;

/* the head of the workspace: the expansion's selection over the HW positions of x, made here
 * where gated, and this thread's row of output sums; and the op's flags */
static void xop_head(xop_head_t *h, const ispc_op_t *o, const float *x, int64_t N, int64_t HW,
                     const ispc_sums_t *sums, float *ws, const nh_plan_t *P) {
    const int64_t C = o->C, E = o->layer->cout;
    const int ykind = sums && sums->out ? (int)sums->out_kind : -1;
    h->dense = o->mode == NHWC_DENSE;
    h->clamp = nh_clamp_code(o->lo, o->hi);
    h->clamp2 = o->lo2 > -__builtin_inff() || o->hi2 < __builtin_inff();
    h->ykind = ykind;
    float *wsel = ws + omp_get_thread_num() * P->priv;  /* this thread's where it selects alone */
    h->ix = (int32_t *)wsel;
    h->cnt = (int64_t *)(wsel + (N * C + 15) / 16 * 16);
    float *sal = (float *)(h->cnt + N), *tmp = sal + N * C, *part = tmp + 3 * N * C;
    if (o->mode != NHWC_DENSE)
        nh_select(x, N, HW, C, o->scale, o->saliency, o->mode, o->threshold, o->k, h->ix, h->cnt,
                  part, sal, tmp, sums ? sums->in : 0, P->priv != 0, sums ? sums->hand_in : 0,
                  sums ? sums->hand_cs : 0);
    h->hand = ykind >= 0 && sums->hand_out;
    h->ysums = h->hand ? sums->hand_out : ykind >= 0 ? (double *)(ws + xop_yoff(P)) : 0;
    h->yrow = h->ysums ? h->ysums + (int64_t)omp_get_thread_num() * N * E : 0;
    if (h->yrow) memset(h->yrow, 0, sizeof(double) * N * E);
}

/* the end of either op: every thread's rows written, the output sums reduced */
static void xop_tail(const xop_head_t *h, int64_t N, int64_t E, const ispc_sums_t *sums) {
    #pragma omp barrier
    if (h->ysums && !h->hand) reduce_sums(h->ysums, omp_get_num_threads(), N, E, E, sums->out);
}

static void xdw_plan(xdw_plan_t *X, const ispc_op_t *o, int64_t N, const ispc_sums_t *sums,
                     int64_t threads) {
    nh_geom_t g;
    xop_plan(&X->P, &g, &X->ysums, o, N, sums, threads);
    xdw_window(g.Wo * o->layer->cout, o->sh, &X->group, &X->rows);
    X->win = (X->rows * g.Wo * o->layer->cout + 15) / 16 * 16;
}

/* floats of workspace besides the zeros */
static int64_t xdw_rest(const xdw_plan_t *X, int64_t threads) {
    return xop_yoff(&X->P) + X->ysums + threads * X->win + 64;
}

static void expand_dw_region(const ispc_op_t *o, const float *x, int64_t N, float *out,
                             const float *res, const ispc_sums_t *sums, const float *zeros,
                             float *ws, int64_t threads) {
    const ispc_nhwc_layer_t *L = o->layer;
    xdw_plan_t X;
    xdw_plan(&X, o, N, sums, threads);
    /* the first layer's input H x W, its output (the expanded map) H x W as the depthwise
     * layer's input: the names below are the depthwise layer's */
    const int64_t Hi = o->H, Wi = o->W, C = o->C, E = L->cout, s = o->sh, p = o->ph;
    const int64_t H = conv_out(Hi, L->kh, L->sh, L->ph, L->dh), W = conv_out(Wi, L->kw, L->sw, L->pw, L->dw);
    const int64_t Ho = conv_out(H, 3, s, p, 1), Wo = conv_out(W, 3, s, p, 1), rowf = W * E;
    /* workspace: the selection's (as the expansion's call), the output sums, the windows */
    xop_head_t h;
    xop_head(&h, o, x, N, Hi * Wi, sums, ws, &X.P);
    float *win = ws + xop_yoff(&X.P) + X.ysums + omp_get_thread_num() * X.win;
    int64_t a, b, r0, r1;
    dw_inside(W, Wo, s, p, &a, &b);
    thread_rows(N * Ho, &r0, &r1);
    int64_t have_n = -1, have0 = 0, have1 = 0;  /* the window holds expanded rows [have0, have1) of have_n */
    for (int64_t r = r0; r < r1;) {
        const int64_t n = r / Ho, oh0 = r % Ho;
        int64_t e1 = oh0 + X.group;  /* the group: output rows [oh0, e1) of instance n */
        e1 = e1 > Ho ? Ho : e1;
        e1 = e1 > oh0 + (r1 - r) ? oh0 + (r1 - r) : e1;
        int64_t i0 = oh0 * s - p, i1 = (e1 - 1) * s - p + 3;  /* expanded rows read */
        i0 = i0 < 0 ? 0 : i0;
        i1 = i1 > H ? H : i1;
        /* keep what the window has of [i0, i1) (its last rows), compute the rest */
        int64_t k0 = i0;
        if (have_n == n && have1 > i0 && have0 <= i0) {
            memmove(win, win + (i0 - have0) * rowf, sizeof(float) * (have1 - i0) * rowf);
            k0 = have1;
        }
        if (k0 < i1) {
            /* the first layer's output rows [k0, i1) from the input rows they read: the top
             * padding only at the map's top (ph < sh, and no output row reads the bottom's:
             * add_expand_dw's check), the same values as on the whole map */
            ispc_nhwc_layer_t Ls = *L;
            const int64_t in0 = k0 * L->sh - L->ph, first = in0 > 0 ? in0 : 0;
            const int64_t end = (i1 - 1) * L->sh - L->ph + (L->kh - 1) * L->dh + 1;
            Ls.ph = in0 < 0 ? L->ph : 0;
            nh_geom_t g;
            nh_geometry(&g, &Ls, 1, end - first, Wi);
            const float *xr = x + (n * Hi + first) * Wi * C;
            float *dst = win + (k0 - i0) * rowf;
            #pragma omp parallel num_threads(1)
            nh_conv(&g, &Ls, xr, h.dense ? 0 : h.ix + n * C, h.dense ? 0 : h.cnt + n, dst, 0, o->lo,
                    o->hi, h.clamp, zeros, 0, SAL_L2);
        }
        have_n = n; have0 = i0; have1 = i1;
        for (int64_t oh = oh0; oh < e1; oh++) {
#if DWR_ROWS > 1
            const int nr = oh + DWR_ROWS <= e1 ? DWR_ROWS : oh + 2 <= e1 ? 2 : 1;
            if ((s == 1 || s == 2) && nr > 1) {  /* nr rows on shared input rows */
                const float *rows[(DWR_ROWS - 1) * 2 + 3], *rr[DWR_ROWS];
                float *orr[DWR_ROWS];
                for (int64_t q = 0; q < (nr - 1) * s + 3; q++) {
                    const int64_t ih = oh * s - p + q;
                    rows[q] = ih >= 0 && ih < H ? win + (ih - i0) * rowf : 0;
                }
                for (int q = 0; q < nr; q++) {
                    const int64_t off = (n * Ho + oh + q) * Wo * E;
                    orr[q] = out + off;
                    rr[q] = res ? res + off : 0;
                }
                dwr_out_rows(rows, nr, W, Wo, E, o->w, o->bias, s, p, a, b, orr, rr, o->lo2, o->hi2,
                             h.clamp2, h.yrow ? h.yrow + n * E : 0, h.ykind);
                oh += nr - 1;
                continue;
            }
#endif
            const float *rows[3];
            for (int q = 0; q < 3; q++) {
                const int64_t ih = oh * s - p + q;
                rows[q] = ih >= 0 && ih < H ? win + (ih - i0) * rowf : 0;
            }
            const int64_t ro = (n * Ho + oh) * Wo * E;
            dw_out_row(rows, W, Wo, E, o->w, o->bias, s, p, a, b, out + ro, res ? res + ro : 0,
                       o->lo2, o->hi2, h.clamp2, h.yrow ? h.yrow + n * E : 0, h.ykind);
        }
        r += e1 - oh0;
    }
    xop_tail(&h, N, E, sums);
}

/* ---- the same fusion split by channels (small maps: MobileNetV2's 14x14 and 7x7 blocks) ---------
 * On a small map row strips give each thread a few rows and the rows around them computed twice,
 * and every thread reads all of the expansion's weights. Here each thread takes a run of the
 * expansion's blocks of output channels: it computes those channels of an instance's whole
 * expanded map into a buffer of its own (reading only their weights, no row twice), then the
 * depthwise layer's output on the same channels. Gated expansions select first, all threads
 * together, as expand_dw_region. Results equal the two layers' calls; the output sums equal
 * theirs within float rounding (each channel summed over rows by one thread, not two). */

typedef struct {
    nh_plan_t P;       /* the expansion's workspace, as its own call (no output sums) */
    int64_t per, buf, ysums;  /* blocks a thread; floats: a thread's buffer, the output sums' doubles */
} xdc_plan_t;

static void xdc_plan(xdc_plan_t *X, const ispc_op_t *o, int64_t N, const ispc_sums_t *sums,
                     int64_t threads) {
    nh_geom_t g;
    xop_plan(&X->P, &g, &X->ysums, o, N, sums, threads);
    X->per = (g.cob + threads - 1) / threads;
    X->buf = (o->H * o->W * X->per * g.nr + 15) / 16 * 16;
}

/* floats of workspace besides the zeros */
static int64_t xdc_rest(const xdc_plan_t *X, int64_t threads) {
    return xop_yoff(&X->P) + X->ysums + threads * X->buf + 64;
}

static void expand_dw_ch_region(const ispc_op_t *o, const float *x, int64_t N, float *out,
                                const float *res, const ispc_sums_t *sums, const float *zeros,
                                float *ws, int64_t threads) {
    const ispc_nhwc_layer_t *L = o->layer;
    xdc_plan_t X;
    xdc_plan(&X, o, N, sums, threads);
    const int64_t H = o->H, W = o->W, C = o->C, E = L->cout, s = o->sh, p = o->ph;
    const int64_t Ho = conv_out(H, 3, s, p, 1), Wo = conv_out(W, 3, s, p, 1);
    /* workspace: the selection's (as the expansion's call), the output sums, the buffers */
    xop_head_t h;
    xop_head(&h, o, x, N, H * W, sums, ws, &X.P);
    const int64_t t = omp_get_thread_num();
    float *buf = ws + xop_yoff(&X.P) + X.ysums + t * X.buf;
    const int64_t nr = L->nv * VW, cob = (E + nr - 1) / nr, b0 = t * X.per;
    const int64_t b1 = b0 + X.per < cob ? b0 + X.per : cob;
    if (b0 < b1) {
        const int64_t c0 = b0 * nr, Ec = (b1 * nr < E ? b1 * nr : E) - c0;
        ispc_nhwc_layer_t Lc = *L;  /* this thread's channels: blocks [b0, b1) */
        Lc.wpack = L->wpack + b0 * C * nr;
        Lc.bias = L->bias + c0;
        Lc.cout = Ec;
        int64_t a, b;
        dw_inside(W, Wo, s, p, &a, &b);
        for (int64_t n = 0; n < N; n++) {
            nh_geom_t g;
            nh_geometry(&g, &Lc, 1, H, W);
            #pragma omp parallel num_threads(1)
            nh_conv(&g, &Lc, x + n * H * W * C, h.dense ? 0 : h.ix + n * C, h.dense ? 0 : h.cnt + n,
                    buf, 0, o->lo, o->hi, h.clamp, zeros, 0, SAL_L2);
            for (int64_t oh = 0; oh < Ho; oh++) {
#if !defined(__AVX512F__) && DWR_ROWS > 1
                const int nr = oh + DWR_ROWS <= Ho ? DWR_ROWS : oh + 2 <= Ho ? 2 : 1;
                if ((s == 1 || s == 2) && nr > 1) {  /* nr rows on shared input rows */
                    const float *rows[(DWR_ROWS - 1) * 2 + 3], *rr[DWR_ROWS];
                    float *orr[DWR_ROWS];
                    for (int64_t q = 0; q < (nr - 1) * s + 3; q++) {
                        const int64_t ih = oh * s - p + q;
                        rows[q] = ih >= 0 && ih < H ? buf + ih * W * Ec : 0;
                    }
                    for (int q = 0; q < nr; q++) {
                        const int64_t off = (n * Ho + oh + q) * Wo * E + c0;
                        orr[q] = out + off;
                        rr[q] = res ? res + off : 0;
                    }
                    dwr2_out_rows(rows, nr, W, Wo, Ec, E, Ec, o->w + c0, o->bias + c0, s, p, a, b, orr,
                                  rr, o->lo2, o->hi2, h.clamp2, h.yrow ? h.yrow + n * E + c0 : 0,
                                  h.ykind);
                    oh += nr - 1;
                    continue;
                }
#endif
                const float *rows[3];
                for (int q = 0; q < 3; q++) {
                    const int64_t ih = oh * s - p + q;
                    rows[q] = ih >= 0 && ih < H ? buf + ih * W * Ec : 0;
                }
                const int64_t ro = (n * Ho + oh) * Wo * E + c0;
                dw_out_rows(rows, W, Wo, Ec, E, Ec, o->w + c0, o->bias + c0, s, p, a, b, out + ro,
                            res ? res + ro : 0, o->lo2, o->hi2, h.clamp2,
                            h.yrow ? h.yrow + n * E + c0 : 0, h.ykind);
            }
        }
    }
    xop_tail(&h, N, E, sums);
}

/* ---- a fully connected layer: the classifier after the global average pool ----------------------
 * out (N, O) = x (N, C) W^T + bias, W packed as blocks of LIN_B output features, each block's
 * weights [C][LIN_B] contiguous (zero-padded to whole blocks; bias padded alike, NULL: none).
 * Output features in vector lanes: each output sums its C terms in order (x[0] w[0] first), then
 * adds the bias, so AVX-512 and AVX2 builds give the same values. Threads split the blocks; the
 * weights stream once per call at batch 1 (1000x1280: 5 MB), as a GEMV must. */
#define LIN_B 64
#define LIN_V (LIN_B / VW)
#define LIN_N (LIN_V <= 4 ? 4 : 2)  /* instances at a time: LIN_N * LIN_V accumulators in registers */

static void linear_region(const float *x, int64_t N, int64_t C, const float *w, const float *bias,
                          int64_t O, float *out) {
    const int64_t blocks = (O + LIN_B - 1) / LIN_B;
    #pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const float *wb = w + b * C * LIN_B;
        const int64_t o0 = b * LIN_B, on = O - o0 < LIN_B ? O - o0 : LIN_B;
        for (int64_t n0 = 0; n0 < N; n0 += LIN_N) {  /* LIN_N instances per pass over the block */
            const int64_t nn = N - n0 < LIN_N ? N - n0 : LIN_N;
            vf acc[LIN_N][LIN_V];
            for (int q = 0; q < LIN_N; q++)
                for (int j = 0; j < LIN_V; j++) acc[q][j] = (vf){0};
            if (nn == LIN_N) {
                for (int64_t i = 0; i < C; i++) {
                    const float *wi = wb + i * LIN_B;
                    for (int q = 0; q < LIN_N; q++) {
                        const float xi = x[(n0 + q) * C + i];
                        for (int j = 0; j < LIN_V; j++) acc[q][j] += xi * ld(wi + j * VW);
                    }
                }
            } else {
                for (int q = 0; q < nn; q++)
                    for (int64_t i = 0; i < C; i++) {
                        const float xi = x[(n0 + q) * C + i];
                        const float *wi = wb + i * LIN_B;
                        for (int j = 0; j < LIN_V; j++) acc[q][j] += xi * ld(wi + j * VW);
                    }
            }
            for (int q = 0; q < nn; q++) {
                float row[LIN_B];
                for (int j = 0; j < LIN_V; j++) {
                    if (bias) acc[q][j] += ld(bias + o0 + j * VW);
                    st(row + j * VW, acc[q][j]);
                }
                memcpy(out + (n0 + q) * O + o0, row, sizeof(float) * on);
            }
        }
    }
}

/* ---- a fully connected layer on input-major weights that skips zero inputs ---------------------
 * out (N, O) = clamp(x W^T + bias, lo, hi), wt = W^T (C, O) contiguous: the module's (O, C) weight
 * held as a transposed view of it, one copy. Feature i of instance n is x[n C + i], or for the
 * flatten of a channels-last (C / hw, hw) map (hw > 1) x[n C + (i % hw) (C / hw) + i / hw]. The
 * features that are zero in every instance (ReLU outputs) are skipped with their weight rows: at
 * batch 1 such a layer is bound by reading its weights, and a zero term adds nothing. Each output
 * sums its kept terms in input order, then adds the bias (the same values on AVX-512 and AVX2).
 * The kept features are listed once (one thread; the others wait at the barrier), then threads
 * split the output columns, each walking the kept weight rows in groups of LT_R, accumulating a
 * slab of its columns for every instance in a buffer that stays in L2; batches in register tiles
 * of LT_NI instances (lt_tile), the instances left over row group by row group (lt_rows). */
#define LT_R 4
#ifndef LT_PF
#define LT_PF 1  /* groups of kept rows ahead whose weights are prefetched */
#endif
#ifndef LT_SLAB
#define LT_SLAB 32768  /* accumulator floats per slab (all instances): 128 KB, in L2 */
#endif
#define LT_NI (VW == 16 ? 4 : 2)  /* instances per register tile (batches of LT_NI or more) */
#define LT_NV 4       /* column vectors per register tile */
#define LT_KB 128     /* kept rows per block: a tile's weights for them stay in L1 */

/* acc[q S + [0, LT_NV VW)] += sum over the kept rows k in [k0, k1), in order, of xv[k N + q] times
 * row k's weights at columns j + [0, LT_NV VW), for q < LT_NI instances at once: each weight
 * vector loaded once for all of them (as one GEMV per instance, batch 32 ran 1.6x F.linear's time) */
static inline void lt_tile(float *acc, int64_t S, const float *wt, int64_t O, const int32_t *idx,
                           const float *xv, int64_t N, int64_t k0, int64_t k1, int64_t j, int pf) {
    vf a[LT_NI][LT_NV];
    for (int q = 0; q < LT_NI; q++)
        for (int v = 0; v < LT_NV; v++) a[q][v] = ld(acc + q * S + v * VW);
    for (int64_t k = k0; k < k1; k++) {
        const float *w = wt + (int64_t)idx[k] * O + j, *x = xv + k * N;
        vf wv[LT_NV];
        for (int v = 0; v < LT_NV; v++) wv[v] = ld(w + v * VW);
        if (pf)  /* the next tile's weights of this row (rows O apart: no hardware stream) */
            for (int v = 0; v < LT_NV; v++) __builtin_prefetch(w + (LT_NV + v) * VW, 0, 2);
        for (int q = 0; q < LT_NI; q++)
            for (int v = 0; v < LT_NV; v++) a[q][v] += x[q] * wv[v];
    }
    for (int q = 0; q < LT_NI; q++)
        for (int v = 0; v < LT_NV; v++) st(acc + q * S + v * VW, a[q][v]);
}

/* floats of workspace for n instances of C features */
static int64_t lt_slab(int64_t n) { return n * VW > LT_SLAB ? n * VW : LT_SLAB; }

static int64_t linear_t_workspace(int64_t n, int64_t C, int64_t threads) {
    return 16 + (C + 15) / 16 * 16 + (n * C + 15) / 16 * 16 + threads * (lt_slab(n) + 16);
}

/* acc[0, cols) += sum over r < R, in order, of xr[r] * wr[r][off + [0, cols)) (cols a multiple of
 * VW); the next group's rows pf[0, LT_R) prefetched into L2 alongside (the skipped rows leave
 * gaps that the hardware prefetchers do not foresee: 4096 -> 1000 ran 1.5x slower without) */
static inline void lt_rows(float *acc, const float *const *wr, const float *xr, int R,
                           const float *const *pf, int64_t off, int64_t cols) {
    if (R == LT_R) {
        const float x0 = xr[0], x1 = xr[1], x2 = xr[2], x3 = xr[3];
        for (int64_t t = 0; t < cols; t += VW) {
            for (int r = 0; r < LT_R; r++) __builtin_prefetch(pf[r] + off + t, 0, 2);
            vf a = ld(acc + t);
            a += x0 * ld(wr[0] + off + t);
            a += x1 * ld(wr[1] + off + t);
            a += x2 * ld(wr[2] + off + t);
            a += x3 * ld(wr[3] + off + t);
            st(acc + t, a);
        }
        return;
    }
    for (int r = 0; r < R; r++) {
        const float xv = xr[r];
        for (int64_t t = 0; t < cols; t += VW) st(acc + t, ld(acc + t) + xv * ld(wr[r] + off + t));
    }
}

static void linear_t_region(const float *x, int64_t N, int64_t C, int64_t hw, const float *wt,
                            const float *bias, int64_t O, float lo, float hi, float *out,
                            float *ws) {
    int64_t *kept = (int64_t *)ws;  /* shared: written by the single thread before its barrier */
    int32_t *idx = (int32_t *)(ws + 16);
    float *xv = ws + 16 + (C + 15) / 16 * 16;  /* xv[k N + n]: instance n's k-th kept feature */
    float *acc = xv + (N * C + 15) / 16 * 16 + omp_get_thread_num() * (lt_slab(N) + 16);
    #pragma omp single
    {
        const int64_t cm = C / hw;
        int64_t k = 0;
        for (int64_t i = 0; i < C; i++) {
            const int64_t at = hw > 1 ? (i % hw) * cm + i / hw : i;
            int any = 0;
            for (int64_t n = 0; n < N; n++) {
                const float v = x[n * C + at];
                xv[k * N + n] = v;
                any |= v != 0.0f;
            }
            idx[k] = (int32_t)i;
            k += any;
        }
        *kept = k;
    }
    const int64_t K = *kept;
    const int clamp = lo > -__builtin_inff() || hi < __builtin_inff();
    /* this thread's columns [c0, c1): whole vectors but for the last thread's tail */
    const int64_t T = omp_get_num_threads(), t = omp_get_thread_num(), units = O / VW;
    const int64_t c0 = units * t / T * VW, c1 = t == T - 1 ? O : units * (t + 1) / T * VW;
    const int64_t TC = LT_NV * VW, NT = N / LT_NI * LT_NI;  /* instances [0, NT) in tiles */
    int64_t S = LT_SLAB / N / TC * TC;  /* columns per slab */
    S = S < TC ? TC : S;
    for (int64_t s0 = c0; s0 < c1; s0 += S) {
        const int64_t s1 = s0 + S < c1 ? s0 + S : c1, cols = s1 - s0, cv = cols / VW * VW;
        for (int64_t n = 0; n < N; n++) memset(acc + n * S, 0, sizeof(float) * cols);
        const int64_t ct = cols / TC * TC;  /* columns in whole tiles */
        for (int64_t k0 = 0; k0 < K && NT; k0 += LT_KB) {
            const int64_t k1 = k0 + LT_KB < K ? k0 + LT_KB : K;
            for (int64_t j = 0; j < ct; j += TC)
                for (int64_t n0 = 0; n0 < NT; n0 += LT_NI)
                    lt_tile(acc + n0 * S + j, S, wt, O, idx, xv + n0, N, k0, k1, s0 + j, n0 == 0);
        }
        for (int64_t k = 0; k < K; k += LT_R) {
            const int R = K - k < LT_R ? (int)(K - k) : LT_R;
            const float *wr[LT_R], *pf[LT_R];
            for (int r = 0; r < R; r++) wr[r] = wt + (int64_t)idx[k + r] * O;
            for (int r = 0; r < LT_R; r++) {  /* a later group's rows (this group's at the end) */
                const int64_t kp = k + LT_PF * LT_R + r;
                pf[r] = kp < K ? wt + (int64_t)idx[kp] * O : wr[0];
            }
            for (int64_t n = 0; n < N; n++) {  /* the instances and columns not in tiles */
                const int64_t q0 = n < NT ? ct : 0;
                if (q0 >= cols) continue;
                float xr[LT_R];
                int any = 0;
                for (int r = 0; r < R; r++) {
                    xr[r] = xv[(k + r) * N + n];
                    any |= xr[r] != 0.0f;
                }
                if (!any) continue;  /* this instance's features here are all zero */
                float *a = acc + n * S;
                if (q0 < cv) lt_rows(a + q0, wr, xr, R, n ? wr : pf, s0 + q0, cv - q0);
                for (int64_t q = cv > q0 ? cv : q0; q < cols; q++)  /* the last thread's tail */
                    for (int r = 0; r < R; r++) a[q] += xr[r] * wr[r][s0 + q];
            }
        }
        for (int64_t n = 0; n < N; n++) {
            float *a = acc + n * S, *o = out + n * O + s0;
            for (int64_t q = 0; q < cv; q += VW) {
                vf v = ld(a + q);
                if (bias) v += ld(bias + s0 + q);
                st(o + q, clamp ? clampv(v, lo, hi) : v);
            }
            for (int64_t q = cv; q < cols; q++) {
                float v = a[q];
                if (bias) v += bias[s0 + q];
                o[q] = clamp && v == v ? (v < lo ? lo : v > hi ? hi : v) : v;
            }
        }
    }
    #pragma omp barrier  /* kept and the list are read until every thread is done */
}

/* ---- a dense convolution and the max-pool after it, fused (ResNet's stem) ----------------------
 * The convolution's output (112x112x64 at batch 1 for ResNet's stem: 3.2 MB, beyond a core's L2)
 * never goes to memory: each thread takes the pool's output rows that its own call gives the
 * thread (thread_rows) and walks them in groups, computing the convolution rows the group reads
 * into a window of its own (rows the previous group also read are moved, not computed again) with
 * the convolution's kernel (nh_conv on those rows alone: the same terms in the same order as on
 * the whole map), then the group's pooled rows from the window, the max in maxpool_region's order.
 * Results equal the two ops'. Dense convolutions only (a gated one selects on its whole input). */

/* the most kernel rows of the pool (native.py's CONV_MAXPOOL_ROWS) */
#define CONV_POOL_ROWS 64

/* bytes of convolution rows a thread's window aims at (with their input rows, in its L2) */
#ifndef CONV_POOL_WINDOW_BYTES
#define CONV_POOL_WINDOW_BYTES (256 << 10)
#endif

/* the pool's output rows per group and the window's rows, for convolution rows of rowf floats */
static void cpool_window(const ispc_op_t *o, int64_t rowf, int64_t *group, int64_t *rows) {
    int64_t g = ((int64_t)CONV_POOL_WINDOW_BYTES / (rowf * (int64_t)sizeof(float) + 1) - o->kh) / o->sh + 1;
    *group = g < 1 ? 1 : g;
    *rows = (*group - 1) * o->sh + o->kh;
}

/* floats of workspace besides the convolution's zeros: a window per thread */
static int64_t cpool_rest(const ispc_op_t *o, int64_t threads) {
    const ispc_nhwc_layer_t *L = o->layer;
    const int64_t Wc = conv_out(o->W, L->kw, L->sw, L->pw, L->dw), rowf = Wc * L->cout;
    int64_t group, rows;
    cpool_window(o, rowf, &group, &rows);
    return threads * ((rows * rowf + 15) / 16 * 16) + 64;
}

/* pooled row: d (Wp, C) = clamp(max over rows[0, kh) (NULL: padding) x the kw columns of each
 * window (stride sw, padding pw) of the (Wc, C) rows) */
static void cpool_row(const float *const *rows, int64_t kh, int64_t Wc, int64_t C, int64_t Wp,
                      int64_t kw, int64_t sw, int64_t pw, float lo, float hi, int clamp, float *d) {
    const int64_t CV = C / VW * VW;
    int64_t r0 = 0;
    while (!rows[r0]) r0++;  /* every window holds a row (padding below the kernel) */
    for (int64_t ow = 0; ow < Wp; ow++, d += C) {
        const int64_t iw0 = ow * sw - pw;
        const int64_t q0 = iw0 < 0 ? 0 : iw0, q1 = iw0 + kw > Wc ? Wc : iw0 + kw;
        const float *first = rows[r0] + q0 * C;
        for (int64_t c = 0; c < CV; c += VW) {
            vf m = ld(first + c);
            for (int64_t r = r0; r < kh; r++)
                if (rows[r])
                    for (int64_t q = q0; q < q1; q++) m = pool_max(ld(rows[r] + q * C + c), m);
            st(d + c, clamp ? clampv(m, lo, hi) : m);
        }
        for (int64_t c = CV; c < C; c++) {
            float m = first[c];
            for (int64_t r = r0; r < kh; r++)
                if (rows[r])
                    for (int64_t q = q0; q < q1; q++) m = pool_max1(rows[r][q * C + c], m);
            d[c] = clamp && m == m ? (m < lo ? lo : m > hi ? hi : m) : m;
        }
    }
}

/* convolution rows [c0, c1) of one instance's x into dst (rows of Wc * cout), as nh_conv computes
 * them on the whole map: the input rows they read, the padding above them as the geometry's */
static void cpool_conv_rows(const ispc_nhwc_layer_t *L, const float *x, int64_t H, int64_t W,
                            int64_t c0, int64_t c1, float lo, float hi, int clamp,
                            const float *zeros, float *dst) {
    nh_geom_t g;
    nh_geometry(&g, L, 1, H, W);
    const int64_t i0 = c0 * L->sh - L->ph, i1 = (c1 - 1) * L->sh - L->ph + (L->kh - 1) * L->dh + 1;
    const int64_t a = i0 < 0 ? 0 : i0, b = i1 > H ? H : i1;
    g.H = b - a;
    g.ph = a - i0;
    g.Ho = c1 - c0;
    g.mr = nh_mr(g.nv, g.Ho * g.Wo);
    g.tiles = (g.Ho * g.Wo + g.mr - 1) / g.mr;
    #pragma omp parallel num_threads(1)
    nh_conv(&g, L, x + a * W * L->C, 0, 0, dst, 0, lo, hi, clamp, zeros, 0, SAL_L2);
}

static void conv_pool_region(const ispc_op_t *o, const float *x, int64_t N, float *out,
                             const float *zeros, float *ws, int64_t threads) {
    const ispc_nhwc_layer_t *L = o->layer;
    const int64_t H = o->H, W = o->W, C = L->cout;
    const int64_t Hc = conv_out(H, L->kh, L->sh, L->ph, L->dh), Wc = conv_out(W, L->kw, L->sw, L->pw, L->dw);
    const int64_t Hp = (Hc + 2 * o->ph - o->kh) / o->sh + 1, Wp = (Wc + 2 * o->pw - o->kw) / o->sw + 1;
    const int64_t rowf = Wc * C;
    const float lo = o->lo, hi = o->hi;
    const int clamp = nh_clamp_code(lo, hi);
    const int clamp2 = o->lo2 > -__builtin_inff() || o->hi2 < __builtin_inff();
    int64_t group, rows;
    cpool_window(o, rowf, &group, &rows);
    (void)threads;
    float *win = ws + omp_get_thread_num() * ((rows * rowf + 15) / 16 * 16);
    int64_t r0, r1;
    thread_rows(N * Hp, &r0, &r1);
    int64_t have_n = -1, have0 = 0, have1 = 0;  /* the window holds rows [have0, have1) of have_n */
    for (int64_t r = r0; r < r1;) {
        const int64_t n = r / Hp, oh0 = r % Hp;
        int64_t e1 = oh0 + group;  /* the group: pooled rows [oh0, e1) of instance n */
        e1 = e1 > Hp ? Hp : e1;
        e1 = e1 > oh0 + (r1 - r) ? oh0 + (r1 - r) : e1;
        int64_t i0 = oh0 * o->sh - o->ph, i1 = (e1 - 1) * o->sh - o->ph + o->kh;  /* rows read */
        i0 = i0 < 0 ? 0 : i0;
        i1 = i1 > Hc ? Hc : i1;
        int64_t k0 = i0;
        if (have_n == n && have1 > i0 && have0 <= i0) {
            memmove(win, win + (i0 - have0) * rowf, sizeof(float) * (have1 - i0) * rowf);
            k0 = have1;
        }
        if (k0 < i1)
            cpool_conv_rows(L, x + n * H * W * o->C, H, W, k0, i1, lo, hi, clamp, zeros,
                            win + (k0 - i0) * rowf);
        have_n = n; have0 = i0; have1 = i1;
        for (int64_t oh = oh0; oh < e1; oh++) {
            const float *rp[CONV_POOL_ROWS];
            for (int64_t q = 0; q < o->kh; q++) {
                const int64_t ih = oh * o->sh - o->ph + q;
                rp[q] = ih >= 0 && ih < Hc ? win + (ih - i0) * rowf : 0;
            }
            cpool_row(rp, o->kh, Wc, C, Wp, o->kw, o->sw, o->pw, o->lo2, o->hi2, clamp2,
                      out + (n * Hp + oh) * Wp * C);
        }
        r += e1 - oh0;
    }
    #pragma omp barrier
}

/* ---- two 1x1 convolutions summed (a ResNet block's last 1x1 and its downsample) ----------------
 * OP_CONV_PAIR: layer A (o->layer on x, no clamp) into the res slot, then layer B (o->layer2 on
 * x2) with A's map as its residual, B's clamp and output sums. A's map is read by nothing else.
 * Run apart, A writes its whole map (3.2 MB at 56x56 x 256 channels) and B reads it back beside
 * its own output; fused, each tile runs A's blocks into a tile of the thread's (in L1), then B's
 * blocks with that tile as their residual: the same sums in the same order, so the same values
 * as the two ops, and A's map is never written. Each layer selects its own input's channels.
 * Fused (pair_fits): 1x1 layers without padding on the same output map and register tile, one
 * instance per pass (their kept weights compacted per group of blocks), both weights within
 * pair_bytes; otherwise the two convolutions run one after the other through the res slot. */

/* both layers' packed weights (bytes) up to which they fuse: what a gated walk keeps in L2
 * without prefetching (nh_pf_gated); -DPAIR_BYTES fixes it (0: never fused) */
static int64_t pair_bytes(void) {
#ifdef PAIR_BYTES
    return PAIR_BYTES;
#else
    return nh_pf_gated();
#endif
}

static int pair_fits(const nh_geom_t *ga, const nh_geom_t *gb) {
    const nh_geom_t *gs[2] = {ga, gb};
    for (int i = 0; i < 2; i++) {
        const nh_geom_t *g = gs[i];
        if (g->kh != 1 || g->kw != 1 || g->ph != 0 || g->pw != 0 || g->wino || g->N != 1) return 0;
    }
    return ga->Ho == gb->Ho && ga->Wo == gb->Wo && ga->cout == gb->cout && ga->nv == gb->nv
           && ga->mr == gb->mr && NH_COMPACT_TILES > 0 && ga->tiles >= NH_COMPACT_TILES
           && (ga->C + gb->C) * ga->cob * ga->nr * (int64_t)sizeof(float) <= pair_bytes();
}

/* blocks of output channels per group: both layers' weights of a group within nh_group_bytes */
static int64_t pair_group(const nh_geom_t *ga, const nh_geom_t *gb) {
    return nh_equal_groups(nh_group_bytes(), (ga->C + gb->C) * gb->nr * (int64_t)sizeof(float),
                           gb->cob);
}

/* the groups a thread's buffer holds the rows of: every block where gated walks group by their
 * kept rows (NH_CGROUP_L2; a fused pair's rows fit pair_bytes) */
static int64_t pair_buf_group(const nh_geom_t *ga, const nh_geom_t *gb) {
    return NH_CGROUP_L2 > 0 ? gb->cob : pair_group(ga, gb);
}

/* the fused walk's blocks a group: by the kept rows (ka + kb) against NH_CGROUP_L2 of L2 where a
 * layer is gated and threads share the walk, as nh_group_blocks; otherwise pair_group */
#ifndef NH_CGROUP_PAIR
#define NH_CGROUP_PAIR 1  /* 0: the fused pair's groups by pair_group alone */
#endif
static int64_t pair_group_kept(const nh_geom_t *ga, const nh_geom_t *gb, int64_t ka, int64_t kb) {
    if (NH_CGROUP_L2 <= 0 || !NH_CGROUP_PAIR || (ka == ga->C && kb == gb->C) || omp_get_num_threads() < 2)
        return pair_group(ga, gb);
    return nh_equal_groups(nh_kept_budget(), (ka + kb) * gb->nr * (int64_t)sizeof(float), gb->cob);
}

/* a thread's floats of the fused walk: the group's compacted rows of both layers, A's tile */
static int64_t pair_thread_floats(const nh_geom_t *ga, const nh_geom_t *gb) {
    const int64_t rows = pair_buf_group(ga, gb) * (ga->C + gb->C) * gb->nr;
    return (rows + 15) / 16 * 16 + (gb->mr * gb->cob * gb->nr + 15) / 16 * 16;
}

/* the position pointers of a 1x1 layer without padding for the tile at p0 (zeros past the end) */
static void pair_ptab(const nh_geom_t *g, const float *xn, int64_t p0, const float *zeros,
                      const float **ptab) {
    int64_t oh = p0 / g->Wo, ow = p0 % g->Wo;
    for (int64_t i = 0; i < g->mr; i++, ow++) {
        if (ow == g->Wo) { oh++; ow = 0; }
        ptab[i] = p0 + i < g->Ho * g->Wo ? xn + (oh * g->sh * g->W + ow * g->sw) * g->C : zeros;
    }
}

/* The fused walk of one instance inside a parallel region: ixa / ka and ixb / kb each layer's
 * kept channels (k == C: dense). Threads split (group, tile) as nh_conv splits (group, instance,
 * tile); per group both layers' kept rows are compacted into the thread's buffer (tw). Ends with
 * a barrier. */
static void pair_conv(const nh_geom_t *ga, const ispc_nhwc_layer_t *La, const float *xa,
                      const int32_t *ixa, int64_t ka, const nh_geom_t *gb,
                      const ispc_nhwc_layer_t *Lb, const float *xb, const int32_t *ixb, int64_t kb,
                      float *out, float lo, float hi, int stream, const float *zeros,
                      double *ysums, int ykind, float *tw) {
    const int64_t mr = gb->mr, nr = gb->nr, cout = gb->cout, HoWo = gb->Ho * gb->Wo;
    const int64_t cs = gb->cob * nr, G = pair_group_kept(ga, gb, ka, kb);
    const int clamp = nh_clamp_code(lo, hi);
    const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
    double *yrow = 0;
    if (ysums) {
        yrow = ysums + tid * cs;
        memset(yrow, 0, sizeof(double) * cs);
    }
    float *ca = tw + tid * pair_thread_floats(ga, gb), *cbw = ca + G * ka * nr;
    float *tile = ca + (pair_buf_group(ga, gb) * (ga->C + gb->C) * nr + 15) / 16 * 16;
    const int densea = ka == ga->C, denseb = kb == gb->C;
    const nh_kernel_t kera = nh_kernel(gb->nv, mr, densea ? 0 : 2);
    const nh_kernel_t kerb = nh_kernel(gb->nv, mr, denseb ? 0 : 2);
    /* the dense walk's prefetch, as nh_conv's */
    const int64_t pfa = densea && ga->C * nr * (int64_t)sizeof(float) >= nh_pf_min() ? NH_PF : 0;
    const int64_t pfb = denseb && gb->C * nr * (int64_t)sizeof(float) >= nh_pf_min() ? NH_PF : 0;
    const int64_t groups = (gb->cob + G - 1) / G;
    int64_t i0, i1, ccg = -1;
    nh_split(groups, G, gb->cob, gb->tiles, nth, tid, &i0, &i1);
    const float *pa[NH_MAXMR], *pb[NH_MAXMR], *wsg[1];
    for (int64_t it = i0; it < i1; it++) {
        const int64_t cg = it / gb->tiles, p0 = it % gb->tiles * mr;
        const int64_t cb0 = cg * G, cb1 = (cg + 1) * G < gb->cob ? (cg + 1) * G : gb->cob;
        if (cg != ccg) {
            if (!densea && ka > 0) nh_compact(La->wpack, cb0, cb1, 1, ga->C, nr, ixa, ka, ca);
            if (!denseb && kb > 0) nh_compact(Lb->wpack, cb0, cb1, 1, gb->C, nr, ixb, kb, cbw);
            ccg = cg;
        }
        pair_ptab(ga, xa, p0, zeros, pa);
        pair_ptab(gb, xb, p0, zeros, pb);
        const int npos = (int)(HoWo - p0 < mr ? HoWo - p0 : mr);
        for (int64_t cb = cb0; cb < cb1; cb++) {  /* A: its bias, no clamp, into the tile */
            const int lanes = (int)(cout - cb * nr < nr ? cout - cb * nr : nr);
            wsg[0] = densea ? La->wpack + cb * ga->C * nr : ca + (cb - cb0) * ka * nr;
            nh_epi_t e = {tile + cb * nr, 0, La->bias + cb * nr, cout, npos, lanes, 0, ykind,
                          0.0f, 0.0f, 0, 0, 0, 0, 1};
            kera(pa, wsg, ka ? 1 : 0, ka, ixa, pfa, &e);
        }
        for (int64_t cb = cb0; cb < cb1; cb++) {  /* B, the tile its residual */
            const int lanes = (int)(cout - cb * nr < nr ? cout - cb * nr : nr);
            wsg[0] = denseb ? Lb->wpack + cb * gb->C * nr : cbw + (cb - cb0) * kb * nr;
            nh_epi_t e = {out + p0 * cout + cb * nr, tile + cb * nr, Lb->bias + cb * nr, cout, npos,
                          lanes, clamp, ykind, lo, hi, yrow ? yrow + cb * nr : 0, stream, 0, 0, 1};
            kerb(pb, wsg, kb ? 1 : 0, kb, ixb, pfb, &e);
        }
    }
    if (stream) nh_sfence();
    #pragma omp barrier
}

/* the op's layers (A: o->layer on x; B: o->layer2 on x2), geometries and workspace plans; sa,
 * sb: the sums each layer reads (A none out), NULL where none */
static void pair_plan(const ispc_op_t *o, int64_t m, const ispc_sums_t *sa, const ispc_sums_t *sb,
                      int64_t threads, nh_geom_t *ga, nh_plan_t *Pa, nh_geom_t *gb, nh_plan_t *Pb) {
    nh_geometry(ga, o->layer, m, o->H, o->W);
    nh_plan(Pa, ga, o->mode, o->k, sa, threads);
    nh_geometry(gb, o->layer2, m, o->H2, o->W2);
    nh_plan(Pb, gb, o->mode2, o->k2, sb, threads);
}

/* workspace floats past the zeros: the larger of the two convolutions' and the fused run's (B's
 * workspace, A's selection, the threads' buffers) */
static int64_t pair_rest(const ispc_op_t *o, int64_t m, const ispc_sums_t *sa,
                         const ispc_sums_t *sb, int64_t threads) {
    nh_geom_t ga, gb;
    nh_plan_t Pa, Pb;
    pair_plan(o, m, sa, sb, threads, &ga, &Pa, &gb, &Pb);
    const int64_t a = Pa.total - Pa.zeros, b = Pb.total - Pb.zeros;
    int64_t need = a > b ? a : b;
    if (pair_fits(&ga, &gb)) {
        const int64_t fused = b + Pa.select + threads * pair_thread_floats(&ga, &gb);
        need = fused > need ? fused : need;
    }
    return need;
}

/* the zero floats the op reads (its two layers' past-the-end positions) */
static int64_t pair_zeros(const ispc_op_t *o) {
    const int64_t c = o->C > o->C2 ? o->C : o->C2;
    return (c + 15) / 16 * 16;
}

/* instances of op o (x, x2, out, mid the res slot, at the first): see OP_CONV_PAIR. Inside the
 * caller's parallel region; ends with a barrier. */
static void pair_region(const ispc_op_t *o, const float *x, const float *x2, int64_t m, float *out,
                        float *mid, const ispc_sums_t *sa, const ispc_sums_t *sb,
                        const float *zeros, float *ws, int64_t threads) {
    nh_geom_t ga, gb;
    nh_plan_t Pa, Pb;
    pair_plan(o, m, sa, sb, threads, &ga, &Pa, &gb, &Pb);
    const ispc_nhwc_layer_t *La = o->layer, *Lb = o->layer2;
    ga.stream = nh_stream(&ga, mid, 0);
    gb.stream = nh_stream(&gb, out, mid);
    if (!pair_fits(&ga, &gb)) {  /* the two convolutions, A's map through the res slot */
        nh_region(&ga, &Pa, La, x, o->scale, o->saliency, o->mode, o->threshold, o->k, 0, mid, 0,
                  -__builtin_inff(), __builtin_inff(), sa, zeros, ws);
        nh_region(&gb, &Pb, Lb, x2, o->scale2, o->saliency2, o->mode2, o->threshold2, o->k2, 0, out,
                  mid, o->lo, o->hi, sb, zeros, ws);
        return;
    }
    float *w = ws + Pb.gather;  /* B's workspace as nh_region lays it out, then A's selection */
    double *ysums = Pb.sums ? (double *)w : 0;
    w += Pb.sums;
    float *wa = w + Pb.select, *tw = wa + Pa.select;
    int32_t *ixb = (int32_t *)w, *ixa = (int32_t *)wa;
    int64_t ka = ga.C, kb = gb.C;
    if (o->mode != NHWC_DENSE) {
        int64_t *cnt = (int64_t *)(wa + (ga.C + 15) / 16 * 16);
        float *s = (float *)(cnt + 1), *tmp = s + ga.C;
        nh_select(x, 1, ga.H * ga.W, ga.C, o->scale, o->saliency, o->mode, o->threshold, o->k, ixa,
                  cnt, tmp + 3 * ga.C, s, tmp, sa ? sa->in : 0, 0, 0, 0);
        ka = cnt[0];
    }
    if (o->mode2 != NHWC_DENSE) {
        int64_t *cnt = (int64_t *)(w + (gb.C + 15) / 16 * 16);
        float *s = (float *)(cnt + 1), *tmp = s + gb.C;
        nh_select(x2, 1, gb.H * gb.W, gb.C, o->scale2, o->saliency2, o->mode2, o->threshold2, o->k2,
                  ixb, cnt, tmp + 3 * gb.C, s, tmp, sb ? sb->in : 0, 0, 0, 0);
        kb = cnt[0];
    }
    pair_conv(&ga, La, x, ixa, ka, &gb, Lb, x2, ixb, kb, out, o->lo, o->hi, gb.stream, zeros,
              ysums, sb ? (int)sb->out_kind : SAL_L2, tw);
    if (ysums) reduce_sums(ysums, omp_get_num_threads(), 1, gb.cout, gb.cob * gb.nr, sb->out);
}

/* Instances [n0, n0 + m) of op o in the caller's parallel region: zeros (zero floats, at least the
 * op's), ws its workspace; hout, hin, hcs: its output sums' hand-off to the next op and its input
 * sums' from the previous one (ispc_sums_t; NULL: none). Ends with a barrier. */
static void op_region(const ispc_op_t *o, float *const *slots, int64_t n0, int64_t m,
                      const float *zeros, float *ws, int64_t threads, double *hout,
                      const double *hin, int64_t hcs) {
    int64_t ohw, oc;
    op_out(o, &ohw, &oc);
    const int64_t xn = o->H * o->W * o->C, on = ohw * oc;
    const float *x = slots[o->x] + (o->local & OP_LOCAL_X ? 0 : n0 * xn);
    const float *res = o->res >= 0 ? slots[o->res] + (o->local & OP_LOCAL_RES ? 0 : n0 * on) : 0;
    float *out = slots[o->out] + (o->local & OP_LOCAL_OUT ? 0 : n0 * on);
    const ispc_sums_t sums = {o->sums_in >= 0 ? slots[o->sums_in] + n0 * o->C : 0,
                              o->sums_out >= 0 ? slots[o->sums_out] + n0 * oc : 0, o->sums_kind,
                              hout, hin, hcs};
    const ispc_sums_t *sp = o->sums_in >= 0 || o->sums_out >= 0 ? &sums : 0;
    switch (o->kind) {
    case OP_CONV: {
        nh_geom_t g;
        nh_geometry(&g, o->layer, m, o->H, o->W);
        nh_plan_t P;
        nh_plan(&P, &g, o->mode, o->k, sp, threads);
        g.stream = nh_stream(&g, out, res);
        nh_region(&g, &P, o->layer, x, o->scale, o->saliency, o->mode, o->threshold, o->k, 0, out,
                  res, o->lo, o->hi, sp, zeros, ws);
        break;
    }
    case OP_DW:
        dw_region(x, m, o->H, o->W, o->C, o->w, o->bias, o->sh, o->ph, out, res, o->lo, o->hi, sp, ws);
        break;
    case OP_EXPAND_DW:
        expand_dw_region(o, x, m, out, res, sp, zeros, ws, threads);
        break;
    case OP_EXPAND_DW_CH:
        expand_dw_ch_region(o, x, m, out, res, sp, zeros, ws, threads);
        break;
    case OP_AVGPOOL:
        avgpool_region(x, m, o->H * o->W, o->C, out);
        break;
    case OP_LINEAR:
        linear_region(x, m, o->C, o->w, o->bias, o->outs, out);
        break;
    case OP_LINEAR_T:
        linear_t_region(x, m, o->C * o->H * o->W, o->H * o->W, o->w, o->bias, o->outs, o->lo, o->hi,
                        out, ws);
        break;
    case OP_TO_NHWC:
        to_nhwc_region(x, m, o->C, o->H * o->W, out);
        break;
    case OP_MAXPOOL:
        maxpool_region(x, m, o->H, o->W, o->C, o->kh, o->kw, o->sh, o->sw, o->ph, o->pw, o->lo, o->hi,
                       out);
        break;
    case OP_CONV_MAXPOOL:
        conv_pool_region(o, x, m, out, zeros, ws, threads);
        break;
    case OP_CONV_PAIR: {
        const float *x2 = slots[o->x2] + (o->local & OP_LOCAL_X2 ? 0 : n0 * o->H2 * o->W2 * o->C2);
        const ispc_sums_t sa = {sums.in, 0, 0};
        const ispc_sums_t sb = {o->sums_in2 >= 0 ? slots[o->sums_in2] + n0 * o->C2 : 0, sums.out,
                                o->sums_kind};
        pair_region(o, x, x2, m, out, (float *)res, o->sums_in >= 0 ? &sa : 0,
                    o->sums_in2 >= 0 || o->sums_out >= 0 ? &sb : 0, zeros, ws, threads);
        break;
    }
    }
}

/* Whether op k takes its input's saliency sums from op k - 1 as the threads' unreduced rows (a
 * hand-off: op k - 1 skips its reduction and the barrier after it, op k's selection, run in every
 * thread alone (nh_sel_private), reduces them in reduce_sums' order: the same values): one
 * instance, op k - 1's sums read by op k alone. *cs: op k - 1's row of sums (doubles). */
#ifndef NH_HANDOFF
#define NH_HANDOFF 1
#endif
static int hand_off(const ispc_op_t *ops, int64_t n, int64_t k, int64_t *cs) {
    if (!NH_HANDOFF || !NH_PRIVATE_SELECT || k < 1) return 0;
    const ispc_op_t *p = &ops[k - 1], *q = &ops[k];
    const int64_t S = p->sums_out;
    if (S < 0 || q->sums_in != S || p->N != 1 || q->N != 1 || q->mode == NHWC_DENSE) return 0;
    if (!(p->kind == OP_CONV || p->kind == OP_DW || p->kind == OP_EXPAND_DW
          || p->kind == OP_EXPAND_DW_CH) || (!p->layer && p->kind != OP_DW))
        return 0;
    if (!(q->kind == OP_CONV || q->kind == OP_EXPAND_DW || q->kind == OP_EXPAND_DW_CH)) return 0;
    for (int64_t i = 0; i < n; i++)
        if (i != k && (ops[i].sums_in == S || (ops[i].kind == OP_CONV_PAIR && ops[i].sums_in2 == S)))
            return 0;
    if (p->kind == OP_CONV) {
        nh_geom_t g;
        nh_geometry(&g, p->layer, 1, p->H, p->W);
        *cs = g.cob * g.nr;
    } else {
        *cs = p->kind == OP_DW ? p->C : p->layer->cout;
    }
    return 1;
}

/* Runs ops[0, n) on slots; returns 0, or (nothing run) the workspace (floats) they need when
 * ws_floats is smaller; -1 for an op it does not know. */
int64_t ispc_run_ops(const ispc_op_t *ops, int64_t n, float *const *slots, float *ws,
                     int64_t ws_floats, int64_t threads) {
    int64_t zmax = 0, rmax = 0;  /* the conv's zero floats; every op's workspace besides */
    for (int64_t i = 0; i < n; i++) {
        const ispc_op_t *o = &ops[i];
        const int64_t m = o->chunk > 0 && o->chunk < o->N ? o->chunk : o->N;
        if (o->kind == OP_CONV) {
            const ispc_sums_t sums = {o->sums_in >= 0 ? ws : 0, o->sums_out >= 0 ? ws : 0,
                                      o->sums_kind};
            nh_geom_t g;
            nh_geometry(&g, o->layer, m, o->H, o->W);
            nh_plan_t P;
            nh_plan(&P, &g, o->mode, o->k, o->sums_in >= 0 || o->sums_out >= 0 ? &sums : 0, threads);
            zmax = P.zeros > zmax ? P.zeros : zmax;
            rmax = P.total - P.zeros > rmax ? P.total - P.zeros : rmax;
        } else if (o->kind == OP_DW) {
            const ispc_sums_t sums = {0, o->sums_out >= 0 ? ws : 0, o->sums_kind};
            const int64_t need = dw_workspace(m, o->C, &sums, threads);
            rmax = need > rmax ? need : rmax;
        } else if (o->kind == OP_EXPAND_DW) {
            const ispc_sums_t sums = {o->sums_in >= 0 ? ws : 0, o->sums_out >= 0 ? ws : 0,
                                      o->sums_kind};
            xdw_plan_t X;
            xdw_plan(&X, o, m, &sums, threads);
            zmax = X.P.zeros > zmax ? X.P.zeros : zmax;
            rmax = xdw_rest(&X, threads) > rmax ? xdw_rest(&X, threads) : rmax;
        } else if (o->kind == OP_EXPAND_DW_CH) {
            const ispc_sums_t sums = {o->sums_in >= 0 ? ws : 0, o->sums_out >= 0 ? ws : 0,
                                      o->sums_kind};
            xdc_plan_t X;
            xdc_plan(&X, o, m, &sums, threads);
            zmax = X.P.zeros > zmax ? X.P.zeros : zmax;
            rmax = xdc_rest(&X, threads) > rmax ? xdc_rest(&X, threads) : rmax;
        } else if (o->kind == OP_CONV_MAXPOOL && o->mode == NHWC_DENSE && o->kh >= 1
                   && o->kh <= CONV_POOL_ROWS) {
            const int64_t z = (o->layer->kw * o->layer->C + 15) / 16 * 16;  /* nh_plan's zeros */
            zmax = z > zmax ? z : zmax;
            rmax = cpool_rest(o, threads) > rmax ? cpool_rest(o, threads) : rmax;
        } else if (o->kind == OP_CONV_PAIR && o->res >= 0 && o->layer2) {
            const ispc_sums_t sa = {ws, 0, 0};
            const ispc_sums_t sb = {o->sums_in2 >= 0 ? ws : 0, o->sums_out >= 0 ? ws : 0,
                                    o->sums_kind};
            const int64_t need = pair_rest(o, m, o->sums_in >= 0 ? &sa : 0,
                                           o->sums_in2 >= 0 || o->sums_out >= 0 ? &sb : 0, threads);
            zmax = pair_zeros(o) > zmax ? pair_zeros(o) : zmax;
            rmax = need > rmax ? need : rmax;
        } else if (o->kind == OP_LINEAR_T && o->outs >= 1) {
            const int64_t need = linear_t_workspace(m, o->C * o->H * o->W, threads);
            rmax = need > rmax ? need : rmax;
        } else if (o->kind < 0 || o->kind > OP_LAST || o->kind == OP_LINEAR_T
                   || o->kind == OP_CONV_MAXPOOL || o->kind == OP_CONV_PAIR
                   || (o->kind == OP_TO_NHWC && o->C > 16)
                   || (o->kind == OP_LINEAR && (o->H != 1 || o->W != 1 || o->outs < 1))) {
            return -1;
        }
    }
    /* the hand-offs' two buffers (an op writes one while the next reads the other), past the rest */
    int64_t *hcs = calloc(n > 0 ? (size_t)n : 1, sizeof(int64_t)), hmax = 0;
    if (!hcs) return -2;
    for (int64_t k = 1; k < n; k++) {
        int64_t cs = 0;
        if (hand_off(ops, n, k, &cs)) {
            hcs[k] = cs;
            hmax = 2 * threads * cs > hmax ? 2 * threads * cs : hmax;
        }
    }
    hmax = (hmax + 15) / 16 * 16;
    const int64_t hoff = (zmax + rmax + 15) / 16 * 16;
    if (hoff + 2 * hmax > ws_floats) {
        free(hcs);
        return hoff + 2 * hmax;
    }
    memset(ws, 0, sizeof(float) * zmax);
    double *hbuf[2] = {(double *)(ws + hoff), (double *)(ws + hoff + hmax)};
    double *times = op_times;
    #pragma omp parallel num_threads(threads)
    {
        double t0 = times ? omp_get_wtime() : 0.0;
        for (int64_t i = 0; i < n;) {
            const int64_t N = ops[i].N, c = ops[i].chunk;
            int64_t j = i + 1;
            if (c > 0 && c < N)
                while (j < n && ops[j].chunk == c && ops[j].N == N) j++;
            const int64_t m = c > 0 && c < N ? c : N;
            for (int64_t n0 = 0; n0 < N; n0 += m)
                for (int64_t k = i; k < j; k++) {
                    op_region(&ops[k], slots, n0, n0 + m < N ? m : N - n0, ws, ws + zmax, threads,
                              k + 1 < n && hcs[k + 1] ? hbuf[k & 1] : 0,
                              hcs[k] ? hbuf[(k - 1) & 1] : 0, hcs[k]);
                    if (times) {
                        #pragma omp master
                        {
                            const double t1 = omp_get_wtime();
                            times[k] += t1 - t0;
                            t0 = t1;
                        }
                    }
                }
            i = j;
        }
    }
    free(hcs);
    return 0;
}
