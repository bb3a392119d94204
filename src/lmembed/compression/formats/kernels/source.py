"""The C source of lmembed's CPU kernels, its compiler flags and the symbols it must export.

One engine serves every packed format. A matrix is a list of *segments* (column ranges); in each,
a row belongs to one of up to 8 *classes* (read from a bit-packed map, or class 0 for every row
when there is none) and is stored in that class's *format*, at its *slot* (its index among the rows
of that class, which are stored in vocabulary order):

- ZERO: every value 0 (a tc band at 0 bits);
- SYM: symmetric codes, value = (q + shift) * scale of its group (QuantizedEmbedding: fp16 scales;
  tc: one scale byte per row looked up in a 256-entry table);
- KQ: super-block codes, value = (D * a_g) * q - (M * b_g) with 6-bit a_g, b_g and the row's fp16
  super-parameters D, M (SuperBlockEmbedding).

A segment's map has a count table (rows of each class before every BLOCK rows), so a block of rows
knows its slots without a per-row index. Three entry points walk it: `lm_logits` (few hidden states:
each row's dot products taken on its codes, in registers), `lm_decode` (a range of rows as fp32:
the buffer a prompt's BLAS matmul reads) and `lm_gather` (rows by id: lookups). The `rr_*` trio
does the same for per-row-rank factor codes (RowRankEmbedding). Decoded values are exactly the
PyTorch path's (no fused multiply-add where PyTorch rounds twice); logits differ only in summation
order.
"""

from __future__ import annotations

import ctypes

BLOCK = 64  # rows per entry of a segment's class-count table
MAX_CLASSES = 8
MAX_SEGMENTS = 32
MAX_M = 8  # hidden states lm_logits / rr_logits take at once

FLAGS = ["-O3", "-march=native", "-fopenmp", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
         "-shared", "-fPIC"]

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define BLOCK @BLOCK@
#define MAX_CLASSES @MAX_CLASSES@
#define MAX_SEGMENTS @MAX_SEGMENTS@
#define MAX_M @MAX_M@

enum { F_ZERO = 0, F_SYM = 1, F_KQ = 2 };
enum { S_F32 = 0, S_F16 = 1, S_LUT = 2 };

typedef struct {
    int64_t kind, rows, bits, group, groups, row_bytes, scale_type, sub_bytes, super_type;
    const uint8_t *codes;   /* rows x row_bytes, `bits`-wide codes packed little-endian */
    const void *scales;     /* SYM: rows x groups (f32, f16, or u8 indices into lut) */
    const float *lut;
    const uint8_t *subs;    /* KQ: rows x sub_bytes, 6-bit a_g then b_g */
    const void *supers;     /* KQ: rows x 2 (D, M), f32 or f16 */
    float shift;
} lm_format;

typedef struct {
    int64_t col0, n, map_bits, classes;
    const uint8_t *map;     /* NULL: every row is class 0 at slot = row */
    const int32_t *counts;  /* blocks x classes: rows of each class before the block */
    lm_format fmt[MAX_CLASSES];
} lm_segment;

static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else {  /* subnormal: normalise */
            exp = 113;
            while (!(man & 1024)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 1023) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7f800000 | (man << 13);
    else bits = sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline float value_at(const void *p, int64_t type, const float *lut, int64_t i) {
    if (type == S_F16) return half_to_float(((const uint16_t *)p)[i]);
    if (type == S_LUT) return lut[((const uint8_t *)p)[i]];
    return ((const float *)p)[i];
}

/* Entry i of a packed array of `bits`-wide values (bits <= 8: at most two bytes). */
static inline uint32_t entry(const uint8_t *p, int64_t i, int bits) {
    int64_t bit = i * bits;
    uint32_t x = p[bit >> 3];
    if ((bit & 7) + bits > 8) x |= (uint32_t)p[(bit >> 3) + 1] << 8;
    return (x >> (bit & 7)) & ((1u << bits) - 1);
}

#ifdef __AVX2__
/* Codes 0..7 of a chunk packed at b bits (b bytes; 8 readable at p) as 8 floats. With AVX-512 VBMI
   one multishift picks the 8 bit fields; else codes 0-3 lie in the low 32 bits, codes 4-7 in the 32
   bits from bit 4b, and each lane shifts its own code down. One path for every width: a branch on
   the width would be mispredicted wherever widths vary from row to row (tc, kmixed). */
typedef struct { __m256i shifts, mask; __m128i fields, mask8; int b; } unpacker;

static const int32_t SHIFTS[9][8] = {@SHIFTS@};
static const uint8_t FIELDS[9][16] = {@FIELDS@};

static inline unpacker unpacker_for(int b) {
    unpacker u = {_mm256_loadu_si256((const __m256i *)SHIFTS[b]), _mm256_set1_epi32((1 << b) - 1),
                  _mm_loadu_si128((const __m128i *)FIELDS[b]), _mm_set1_epi8((char)((1 << b) - 1)), b};
    return u;
}

static inline __m256 codes8(const uint8_t *p, const unpacker *u) {
    uint64_t x;
    memcpy(&x, p, 8);
#if defined(__AVX512VBMI__) && defined(__AVX512VL__)
    __m128i f = _mm_and_si128(_mm_multishift_epi64_epi8(u->fields, _mm_cvtsi64_si128((long long)x)), u->mask8);
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(f));
#else
    __m256i v = _mm256_set_m128i(_mm_set1_epi32((int)(uint32_t)(x >> (4 * u->b))), _mm_set1_epi32((int)(uint32_t)x));
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(v, u->shifts), u->mask));
#endif
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

static inline float dot(const float *a, const float *b, int n) {
    float acc = 0.f;
    for (int k = 0; k < n; k++) acc += a[k] * b[k];
    return acc;
}

/* Codes k0 .. k1-1 of a row packed at b bits (p: the row; avail: bytes readable from p) as floats
   into q[k0 .. k1-1]. */
static void unpack(const uint8_t *p, int64_t avail, int b, int k0, int k1, float *q) {
    int k = k0;
#ifdef __AVX2__
    if ((k & 7) == 0) {
        unpacker u = unpacker_for(b);
        for (; k + 8 <= k1 && (int64_t)(k >> 3) * b + 8 <= avail; k += 8)
            _mm256_storeu_ps(q + k, codes8(p + (k >> 3) * b, &u));
    }
#endif
    for (; k < k1; k++) q[k] = (float)entry(p, k, b);
}

/* Dot products of packed codes with h: whole 8-code chunks go into an 8-lane accumulator (summed
   once per row), the rest into a scalar. */
#ifdef __AVX2__
typedef __m256 vec8;
static inline vec8 vzero(void) { return _mm256_setzero_ps(); }
static inline vec8 vscaled(float s, vec8 x, vec8 acc) { return _mm256_fmadd_ps(_mm256_set1_ps(s), x, acc); }
static inline float vsum(vec8 x) { return hsum8(x); }
#else
typedef float vec8;
typedef int unpacker;
static inline unpacker unpacker_for(int b) { return b; }
static inline vec8 vzero(void) { return 0.f; }
static inline vec8 vscaled(float s, vec8 x, vec8 acc) { return acc + s * x; }
static inline float vsum(vec8 x) { return x; }
#endif

/* One class's rows as lm_logits reads them: the format with what every row shares worked out once
   per call (the per-row work is small: a tc row is 8 bands, the first of 4 columns). */
typedef struct {
    const lm_format *f;
    int kind, b, g, ng, n;
    int64_t safe;     /* rows below it may load 8 bytes from any chunk start: the tensor goes on */
    const float *hs;  /* h's sums over each group, M x ng */
    unpacker u;
} plan;

static void make_plan(const lm_format *f, int n, const float *hs, plan *pl) {
    pl->f = f;
    pl->kind = (int)f->kind;
    pl->b = (int)f->bits;
    pl->g = (int)f->group;
    pl->ng = (int)f->groups;
    pl->n = n;
    pl->hs = hs;
    if (f->kind == F_ZERO) return;
    int64_t after = (8 + f->row_bytes - 1) / f->row_bytes;  /* rows an 8-byte load may reach into */
    pl->safe = f->rows > after ? f->rows - after : 0;
    pl->u = unpacker_for(pl->b);
}

/* Sum over k0 <= k < k1 of code_k * h_k for one row's codes at b bits (as unpack): the chunks'
   part returned (two accumulators: the FMA latency chain is the bottleneck otherwise), the tail's
   added to *tail. `avail` (bytes readable from p) is only looked at when the row is not `safe`. */
static inline vec8 codes_dot(const uint8_t *p, int safe, int64_t avail, const unpacker *u, int b, int k0, int k1,
                             const float *h, float *tail) {
    vec8 v = vzero();
    int k = k0;
#ifdef __AVX2__
    if ((k & 7) == 0) {
        int c = k >> 3, ce = k1 >> 3;
        if (!safe)  /* the last rows of the tensor: never load past its end */
            while (ce > c && (int64_t)(ce - 1) * b + 8 > avail) ce--;
        vec8 v1 = vzero();
        for (; c + 2 <= ce; c += 2) {
            v = _mm256_fmadd_ps(codes8(p + c * b, u), _mm256_loadu_ps(h + 8 * c), v);
            v1 = _mm256_fmadd_ps(codes8(p + (c + 1) * b, u), _mm256_loadu_ps(h + 8 * c + 8), v1);
        }
        if (c < ce) v = _mm256_fmadd_ps(codes8(p + c * b, u), _mm256_loadu_ps(h + 8 * c), v), c++;
        k = 8 * c;
        if (safe && k < k1) {  /* a short tail (a tc band of 4 columns): the chunk with h's lanes past k1 at 0 */
            __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(k1 - k), _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0));
            v1 = _mm256_fmadd_ps(codes8(p + c * b, u), _mm256_maskload_ps(h + k, lanes), v1);
            k = k1;
        }
        v = _mm256_add_ps(v, v1);
    }
#else
    (void)safe, (void)avail, (void)u;
#endif
    float t = 0.f;
    for (; k < k1; k++) t += (float)entry(p, k, b) * h[k];
    *tail += t;
    return v;
}

/* Row `slot` of a class (plan pl) dotted with h[m] (h at the segment's first column, rows d apart),
   added to va[m] (8 lanes) + sa[m]; q is scratch for 2n floats. */
static inline void fmt_dot(const plan *pl, int64_t slot, const float *h, int64_t d, int M, float *q, vec8 *va,
                           float *sa) {
    if (pl->kind == F_ZERO) return;
    const lm_format *f = pl->f;
    const uint8_t *p = f->codes + slot * f->row_bytes;
    int safe = slot < pl->safe, g = pl->g, ng = pl->ng, b = pl->b, n = pl->n;
    int64_t avail = (f->rows - slot) * f->row_bytes;
    if (pl->kind == F_SYM && ng == 1) {  /* one scale per row (tc's bands, per-row int8): no group loop */
        float sc = value_at(f->scales, f->scale_type, f->lut, slot);
        for (int m = 0; m < M; m++) {
            float tail = f->shift * pl->hs[m];
            va[m] = vscaled(sc, codes_dot(p, safe, avail, &pl->u, b, 0, n, h + m * d, &tail), va[m]);
            sa[m] += sc * tail;
        }
        return;
    }
    if (pl->kind == F_SYM) {  /* sum_g s_g * (sum_k q_k h_k + shift * sum_k h_k) */
        for (int m = 0; m < M; m++)
            for (int gi = 0, k0 = 0; gi < ng; gi++, k0 += g) {
                int k1 = k0 + g < n ? k0 + g : n;
                float sc = value_at(f->scales, f->scale_type, f->lut, slot * ng + gi);
                float tail = f->shift * pl->hs[m * ng + gi];
                va[m] = vscaled(sc, codes_dot(p, safe, avail, &pl->u, b, k0, k1, h + m * d, &tail), va[m]);
                sa[m] += sc * tail;
            }
        return;
    }
    /* KQ: D * sum_g a_g (sum_k q_k h_k) - M * sum_g b_g (sum_k h_k) */
    unpack(f->subs + slot * f->sub_bytes, (f->rows - slot) * f->sub_bytes, 6, 0, 2 * ng, q);  /* a_g, then b_g */
    float D = value_at(f->supers, f->super_type, 0, 2 * slot), Mn = value_at(f->supers, f->super_type, 0, 2 * slot + 1);
    for (int gi = 0; gi < ng; gi++) q[gi] *= D;
    for (int m = 0; m < M; m++) {
        float sb = 0.f;
        for (int gi = 0, k0 = 0; gi < ng; gi++, k0 += g) {
            int k1 = k0 + g < n ? k0 + g : n;
            float tail = 0.f;
            va[m] = vscaled(q[gi], codes_dot(p, safe, avail, &pl->u, b, k0, k1, h + m * d, &tail), va[m]);
            sa[m] += q[gi] * tail;
            sb += q[ng + gi] * pl->hs[m * ng + gi];
        }
        sa[m] -= Mn * sb;
    }
}

/* Row `slot` of format f as n floats, exactly as the PyTorch path computes them (each product and
   difference rounded on its own: no fused multiply-add); q is scratch for 2n floats. */
__attribute__((optimize("fp-contract=off")))
static void fmt_decode(const lm_format *f, int64_t slot, int n, float *q, float *w) {
    if (f->kind == F_ZERO) {
        memset(w, 0, sizeof(float) * n);
        return;
    }
    int g = (int)f->group, ng = (int)f->groups;
    unpack(f->codes + slot * f->row_bytes, (f->rows - slot) * f->row_bytes, (int)f->bits, 0, n, w);
    if (f->kind == F_SYM) {
        for (int gi = 0; gi < ng; gi++) {
            int k0 = gi * g, end = k0 + g < n ? k0 + g : n;
            float sc = value_at(f->scales, f->scale_type, f->lut, slot * ng + gi);
            for (int k = k0; k < end; k++) w[k] = (w[k] + f->shift) * sc;
        }
        return;
    }
    unpack(f->subs + slot * f->sub_bytes, (f->rows - slot) * f->sub_bytes, 6, 0, 2 * ng, q);
    float D = value_at(f->supers, f->super_type, 0, 2 * slot), Mn = value_at(f->supers, f->super_type, 0, 2 * slot + 1);
    for (int gi = 0; gi < ng; gi++) {
        int k0 = gi * g, end = k0 + g < n ? k0 + g : n;
        float s = D * q[gi], mn = Mn * q[ng + gi];
        for (int k = k0; k < end; k++) {
            float t = s * w[k];
            w[k] = t - mn;
        }
    }
}

static inline int row_class(const lm_segment *s, int64_t v) {
    return s->map ? (int)entry(s->map, v, (int)s->map_bits) : 0;
}

/* Segment s's slot of every class at the first row of block b. */
static void block_slots(const lm_segment *s, int64_t b, int64_t *slots) {
    if (!s->map) slots[0] = b * BLOCK;
    else
        for (int c = 0; c < s->classes; c++) slots[c] = s->counts[b * s->classes + c];
}

/* Slot of row v (of class c) in segment s: its block's count plus the rows of class c before it. */
static int64_t slot_of(const lm_segment *s, int64_t v, int c) {
    if (!s->map) return v;
    int64_t b = v / BLOCK, slot = s->counts[b * s->classes + c];
    for (int64_t u = b * BLOCK; u < v; u++) slot += row_class(s, u) == c;
    return slot;
}

/* Sums of h over every group of every (segment, class): hs + offs[s * MAX_CLASSES + c], M x groups. */
static float *group_sums(const lm_segment *sg, int nseg, const float *h, int64_t d, int M, int64_t *offs) {
    int64_t total = 0;
    for (int s = 0; s < nseg; s++)
        for (int c = 0; c < MAX_CLASSES; c++) {
            offs[s * MAX_CLASSES + c] = total;
            if (c < (sg[s].map ? sg[s].classes : 1) && sg[s].fmt[c].kind != F_ZERO)
                total += M * ((sg[s].n + sg[s].fmt[c].group - 1) / sg[s].fmt[c].group);
        }
    float *hs = malloc(sizeof(float) * (total + 1));
    if (!hs) return 0;
    for (int s = 0; s < nseg; s++)
        for (int c = 0; c < (sg[s].map ? sg[s].classes : 1); c++) {
            if (sg[s].fmt[c].kind == F_ZERO) continue;
            int n = (int)sg[s].n, g = (int)sg[s].fmt[c].group, ng = (n + g - 1) / g;
            for (int m = 0; m < M; m++)
                for (int gi = 0; gi < ng; gi++) {
                    int k0 = gi * g, len = k0 + g < n ? g : n - k0;
                    float acc = 0.f;
                    for (int k = 0; k < len; k++) acc += h[m * d + sg[s].col0 + k0 + k];
                    hs[offs[s * MAX_CLASSES + c] + m * ng + gi] = acc;
                }
        }
    return hs;
}

/* Rows are walked CHUNK at a time, one segment after the other: the streams read at once are one
   segment's classes (a tc matrix has up to 8 x 7 code arrays: all at once defeat the prefetcher). */
#define CHUNK (16 * BLOCK)

/* out[m, v] = row v . h[m] for all V rows and M <= MAX_M hidden states; 0 on success. */
int lm_logits(const lm_segment *sg, int nseg, int64_t V, int64_t d, const float *h, int M, float *out, int threads) {
    if (M > MAX_M || nseg > MAX_SEGMENTS) return 2;
    int64_t offs[MAX_SEGMENTS * MAX_CLASSES], nc = (V + CHUNK - 1) / CHUNK;
    float *hs = group_sums(sg, nseg, h, d, M, offs);
    plan *plans = aligned_alloc(32, sizeof(plan) * MAX_SEGMENTS * MAX_CLASSES);  /* unpackers hold vectors */
    if (!hs || !plans) {
        free(hs);
        free(plans);
        return 1;
    }
    for (int s = 0; s < nseg; s++)
        for (int c = 0; c < MAX_CLASSES; c++)
            make_plan(&sg[s].fmt[c], (int)sg[s].n, hs + offs[s * MAX_CLASSES + c], plans + s * MAX_CLASSES + c);
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        float *q = malloc(sizeof(float) * (2 * d + 16)), *sa = malloc(sizeof(float) * MAX_M * CHUNK);
        vec8 *va = aligned_alloc(32, sizeof(vec8) * MAX_M * CHUNK);
        if (!q || !sa || !va) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t ch = 0; ch < nc; ch++) {
            if (!q || !sa || !va) continue;
            int64_t r0 = ch * CHUNK, r1 = r0 + CHUNK < V ? r0 + CHUNK : V;
            for (int64_t i = 0; i < M * (r1 - r0); i++) va[i] = vzero(), sa[i] = 0.f;
            for (int s = 0; s < nseg; s++) {  /* per row: 8 lanes + a scalar, summed once at the end */
                int64_t slots[MAX_CLASSES];
                block_slots(sg + s, r0 / BLOCK, slots);
                for (int64_t v = r0; v < r1; v++) {
                    int c = row_class(sg + s, v);
                    fmt_dot(plans + s * MAX_CLASSES + c, slots[c]++, h + sg[s].col0, d, M, q, va + (v - r0) * M,
                            sa + (v - r0) * M);
                }
            }
            for (int64_t v = r0; v < r1; v++)
                for (int m = 0; m < M; m++) out[m * V + v] = vsum(va[(v - r0) * M + m]) + sa[(v - r0) * M + m];
        }
        free(q);
        free(sa);
        free(va);
    }
    free(hs);
    free(plans);
    return failed;
}

/* A thread's scratch for fmt_decode (2d + 16 floats); NULL, with *failed set, when there is no memory. */
static float *decode_scratch(int64_t d, int *failed) {
    float *q = malloc(sizeof(float) * (2 * d + 16));
    if (!q) {
        #pragma omp atomic write
        *failed = 1;
    }
    return q;
}

/* Rows v0 .. v0+n-1 as floats into out (n x d); 0 on success. */
int lm_decode(const lm_segment *sg, int nseg, int64_t V, int64_t d, int64_t v0, int64_t n, float *out,
              int threads) {
    if (nseg > MAX_SEGMENTS) return 2;
    int64_t v1 = v0 + n, c0 = v0 / CHUNK, c1 = (v1 + CHUNK - 1) / CHUNK;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        float *q = decode_scratch(d, &failed);
        #pragma omp for schedule(static)
        for (int64_t ch = c0; ch < c1; ch++) {
            if (!q) continue;
            int64_t r0 = ch * CHUNK > v0 ? ch * CHUNK : v0, r1 = (ch + 1) * CHUNK < v1 ? (ch + 1) * CHUNK : v1;
            for (int s = 0; s < nseg; s++) {
                int64_t slots[MAX_CLASSES];
                block_slots(sg + s, r0 / BLOCK, slots);
                for (int64_t v = r0 / BLOCK * BLOCK; v < r1; v++) {
                    int c = row_class(sg + s, v);
                    int64_t slot = slots[c]++;
                    if (v >= r0) fmt_decode(&sg[s].fmt[c], slot, (int)sg[s].n, q, out + (v - v0) * d + sg[s].col0);
                }
            }
        }
        free(q);
    }
    return failed;
}

/* Rows ids[0 .. n-1] (each in 0 .. V-1) as floats into out (n x d); 0 on success. */
int lm_gather(const lm_segment *sg, int nseg, int64_t d, const int64_t *ids, int64_t n, float *out, int threads) {
    if (nseg > MAX_SEGMENTS) return 2;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        float *q = decode_scratch(d, &failed);
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            if (!q) continue;
            for (int s = 0; s < nseg; s++) {
                int c = row_class(sg + s, ids[i]);
                fmt_decode(&sg[s].fmt[c], slot_of(sg + s, ids[i], c), (int)sg[s].n, q, out + i * d + sg[s].col0);
            }
        }
        free(q);
    }
    return failed;
}

/* out (n x d) = x @ R (transpose 0) or x @ R^T (1), R[k][j] = dec[k][j] * s[k] rounded to float as
   PyTorch rounds it (tc's int8 decoder and its row scales), without forming R. */
int tc_rotate(const float *x, int64_t n, int64_t d, const int8_t *dec, const float *s, int transpose, float *out,
              int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (n * d * d > 4000000)
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * d;
        float *oi = out + i * d;
        if (transpose) {
            for (int64_t k = 0; k < d; k++) {
                const int8_t *r = dec + k * d;
                float acc = 0.f, sk = s[k];
                for (int64_t j = 0; j < d; j++) acc += xi[j] * ((float)r[j] * sk);
                oi[k] = acc;
            }
        } else {
            memset(oi, 0, sizeof(float) * d);
            for (int64_t k = 0; k < d; k++) {
                const int8_t *r = dec + k * d;
                float a = xi[k], sk = s[k];
                for (int64_t j = 0; j < d; j++) oi[j] += a * ((float)r[j] * sk);
            }
        }
    }
    return 0;
}

/* Per-row ranks: row v keeps k = ranks[v] codes, at codes + start[k] + (pos[v] - first[k]) * k (rows of
   equal rank stored together; pos = a row's place in the stored order, first/start = each rank's
   first place and first code). */
static inline const float *rr_row(const float *codes, const int16_t *ranks, const int32_t *pos, const int64_t *first,
                                  const int64_t *start, int64_t v, int *k) {
    *k = ranks[v];
    return codes + start[*k] + (pos[v] - first[*k]) * (int64_t)*k;
}

/* out[m, v] = codes_v . z[m, :k_v] for every row (z: M x kmax). */
int rr_logits(const float *codes, const int16_t *ranks, const int32_t *pos, const int64_t *first, const int64_t *start,
              const float *z, int64_t kmax, int64_t V, int M, float *out, int threads) {
    if (M > MAX_M) return 2;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t v = 0; v < V; v++) {
        int k;
        const float *c = rr_row(codes, ranks, pos, first, start, v, &k);
        for (int m = 0; m < M; m++) out[m * V + v] = dot(c, z + m * kmax, k);
    }
    return 0;
}

/* Rows as kmax codes each, zero past the row's rank: rows v0 .. v0+n-1 (ids NULL) or ids[0 .. n-1]. */
int rr_rows(const float *codes, const int16_t *ranks, const int32_t *pos, const int64_t *first, const int64_t *start,
            int64_t kmax, int64_t v0, const int64_t *ids, int64_t n, float *out, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; i++) {
        int k;
        const float *c = rr_row(codes, ranks, pos, first, start, ids ? ids[i] : v0 + i, &k);
        memcpy(out + i * kmax, c, sizeof(float) * k);
        memset(out + i * kmax + k, 0, sizeof(float) * (kmax - k));
    }
    return 0;
}
"""

SOURCE = SOURCE.replace("@SHIFTS@", ", ".join("{" + ", ".join(str(b * (i % 4)) for i in range(8)) + "}"
                                              for b in range(9)))
SOURCE = SOURCE.replace("@FIELDS@", ", ".join("{" + ", ".join(str(b * i % 64) for i in range(16)) + "}"
                                              for b in range(9)))
for _name, _value in (("BLOCK", BLOCK), ("MAX_CLASSES", MAX_CLASSES), ("MAX_SEGMENTS", MAX_SEGMENTS),
                      ("MAX_M", MAX_M)):
    SOURCE = SOURCE.replace(f"@{_name}@", str(_value))

_P, _I32, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
# name -> argument types; every function returns int (0: done)
SYMBOLS: dict[str, list] = {
    "lm_logits": [_P, _I32, _I64, _I64, _P, _I32, _P, _I32],
    "lm_decode": [_P, _I32, _I64, _I64, _I64, _I64, _P, _I32],
    "lm_gather": [_P, _I32, _I64, _P, _I64, _P, _I32],
    "tc_rotate": [_P, _I64, _I64, _P, _P, _I32, _P, _I32],
    "rr_logits": [_P, _P, _P, _P, _P, _P, _I64, _I64, _I32, _P, _I32],
    "rr_rows": [_P, _P, _P, _P, _P, _I64, _I64, _P, _I64, _P, _I32],
}


class Format(ctypes.Structure):
    """lm_format: one class's stored rows (see SOURCE)."""

    _fields_ = [("kind", _I64), ("rows", _I64), ("bits", _I64), ("group", _I64), ("groups", _I64),
                ("row_bytes", _I64), ("scale_type", _I64),
                ("sub_bytes", _I64), ("super_type", _I64), ("codes", _P), ("scales", _P), ("lut", _P),
                ("subs", _P), ("supers", _P), ("shift", ctypes.c_float)]


class Segment(ctypes.Structure):
    """lm_segment: a column range, its class map and count table, a format per class."""

    _fields_ = [("col0", _I64), ("n", _I64), ("map_bits", _I64), ("classes", _I64), ("map", _P), ("counts", _P),
                ("fmt", Format * MAX_CLASSES)]


F_ZERO, F_SYM, F_KQ = 0, 1, 2
S_F32, S_F16, S_LUT = 0, 1, 2
