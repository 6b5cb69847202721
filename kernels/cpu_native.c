/* Native CPU kernels for the engine's fp32 path: paged attention over the strided
 * per-layer KV view, and rotary embedding fused with the KV-cache store; both also for
 * an int8 cache (kernels/kv_quant.py: each (token, head) row is head_dim int8 values
 * then their fp32 scale).
 *
 * Built at first use by kernels/cpu_native.py (plain C with GCC vector extensions and
 * OpenMP, no torch headers, so a fresh machine compiles it in 1-2 s) and
 * called through ctypes with raw pointers and element strides.
 *
 * Attention. The torch path (ref_attention.py) copies each sequence's blocks into a
 * contiguous tensor and then runs SDPA; this reads K and V where they are, once per KV
 * head for all G query heads that share it.
 * Work item = (sequence, kv head, tile of up to QTILE query tokens). Its rows are the
 * tile's (query token, group head) pairs; row r of token i attends to key positions
 * 0 .. seq_len - query_len + i (causal, on top of the cached prefix). Per item:
 *   1. scores s[r][t] = (q_r . k_t) * scale, 16 keys at a time
 *   2. exact softmax per row: max, exp(s - max), sum. All of a row's scores are held,
 *      so there is no online rescaling (the arithmetic of a two-pass softmax)
 *   3. out_r = (sum_t p[r][t] v_t) / sum_r
 * Items run in parallel (OpenMP, dynamic schedule: ragged lengths make them uneven).
 * head_dim must be a multiple of 16 and at most 256 (the caller checks).
 *
 * int8 cache: the same kernel, compiled a second time; per 16 keys it widens the 16
 * int8 rows to floats times their scale into a 16-row tile in L1 (rows_f32) and runs
 * the fp32 loops on it, so no dequantized copy of the cache is ever made.
 *
 * Rotary + store. Replaces ~20 small torch ops per layer (rotary's slices and products,
 * store_kv's index arithmetic and two index_put_) by one call; the rotary products are
 * the torch path's exact IEEE operations (no FMA contraction), so results are
 * bit-identical to it.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define VL 16        /* floats per vector: one AVX-512 register, two AVX2 ones */
#define QTILE 8      /* query tokens per work item: K/V reads shared by QTILE * G rows */
#define MAX_GROUP 64 /* query heads per KV head; sizes the per-item row arrays */
#define MAX_NV 16    /* head_dim / VL */
#define MAX_ROWS (QTILE * MAX_GROUP)
#define PARALLEL_WORK (1 << 18) /* query-key pairs x head_dim: ~25 us on one core */

typedef float vec __attribute__((vector_size(64)));
typedef int8_t vec_i8 __attribute__((vector_size(16)));

static inline vec vload(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v); /* unaligned load */
    return v;
}

static inline void vstore(float *p, vec v) { memcpy(p, &v, sizeof v); }

/* The n <= 16 rows at tok[j] as fp32 rows for dots16 / weighted_sum16: an fp32 cache's
 * rows where they are; an int8 cache's rows (d values, then their fp32 scale) widened
 * and scaled into ``tile`` (16 rows of d floats, in L1), once per 16 keys and shared by
 * all the item's query rows: converting inside the dot products would redo it per row
 * (3.3x slower than fp32 at 3 query heads per KV head). ``quant`` is a constant
 * wherever this is inlined. */
static inline __attribute__((always_inline)) void rows_f32(
    const char *const *tok, const int64_t n, const int64_t nv, const int quant, float *tile,
    const float **out) {
    if (!quant) {
        for (int64_t j = 0; j < n; j++) out[j] = (const float *)tok[j];
        return;
    }
    const int64_t d = nv * VL;
    for (int64_t j = 0; j < n; j++) {
        float s;
        memcpy(&s, tok[j] + d, sizeof s);
        for (int64_t v = 0; v < nv; v++) {
            vec_i8 x;
            memcpy(&x, tok[j] + v * VL, sizeof x);
            vstore(tile + j * d + v * VL, __builtin_convertvector(x, vec) * s);
        }
        out[j] = tile + j * d;
    }
}

/* Lane i of the result = the sum of the lanes of p[i]. A transposing tree (16 -> 8 -> 4
 * -> 2 -> 1 vectors) costs ~3 operations per dot product, where reducing each product
 * on its own costs ~8 and is one long dependency chain. */
static inline vec reduce16(const vec *p) {
    vec a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = __builtin_shufflevector(p[2 * i], p[2 * i + 1],
                                       0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(p[2 * i], p[2 * i + 1],
                                       8, 9, 10, 11, 12, 13, 14, 15,
                                       24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)
        b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1],
                                       0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(a[2 * i], a[2 * i + 1],
                                       4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
        c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1],
                                       0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               __builtin_shufflevector(b[2 * i], b[2 * i + 1],
                                       2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(c[0], c[1],
                                   0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           __builtin_shufflevector(c[0], c[1],
                                   1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* Lane j of the result = q . k_j for the n <= 16 keys at tok[j] (0 past n). Inlined
 * with n = 16 and nv constant, the 16 partial products stay in registers. */
static inline __attribute__((always_inline)) vec dots16(
    const vec *q, const float *const *tok, const int64_t n, const int64_t nv) {
    vec part[VL];
    for (int64_t j = 0; j < VL; j++) {
        vec s = {0};
        if (j < n) {
            s = q[0] * vload(tok[j]);
            for (int64_t v = 1; v < nv; v++) s += q[v] * vload(tok[j] + v * VL);
        }
        part[j] = s;
    }
    return reduce16(part);
}

/* o += sum_j p[j] v_j over the n <= 16 rows at tok[j]. Two sets of accumulators (even
 * and odd j) halve the FMA dependency chains. */
static inline __attribute__((always_inline)) void weighted_sum16(
    vec *o, const float *p, const float *const *tok, const int64_t n, const int64_t nv) {
    vec e[MAX_NV], f[MAX_NV];
    for (int64_t v = 0; v < nv; v++) {
        e[v] = o[v];
        f[v] = (vec){0};
    }
    int64_t j = 0;
    for (; j + 1 < n; j += 2) {
        for (int64_t v = 0; v < nv; v++) {
            e[v] += p[j] * vload(tok[j] + v * VL);
            f[v] += p[j + 1] * vload(tok[j + 1] + v * VL);
        }
    }
    if (j < n)
        for (int64_t v = 0; v < nv; v++) e[v] += p[j] * vload(tok[j] + v * VL);
    for (int64_t v = 0; v < nv; v++) o[v] = e[v] + f[v];
}

/* Max of n >= 1 values, VL running maxima (exact in any order). */
static inline float max_of(const float *restrict x, int64_t n) {
    float acc[VL];
    for (int l = 0; l < VL; l++) acc[l] = x[0];
    const int64_t whole = n - n % VL;
    for (int64_t i = 0; i < whole; i += VL)
        for (int l = 0; l < VL; l++) acc[l] = x[i + l] > acc[l] ? x[i + l] : acc[l];
    for (int64_t i = whole; i < n; i++) acc[0] = x[i] > acc[0] ? x[i] : acc[0];
    for (int l = 1; l < VL; l++) acc[0] = acc[l] > acc[0] ? acc[l] : acc[0];
    return acc[0];
}

/* Sum with VL partial sums, then a fixed pairwise tree. */
static inline float sum_of(const float *restrict x, int64_t n) {
    float acc[VL] = {0};
    const int64_t whole = n - n % VL;
    for (int64_t i = 0; i < whole; i += VL)
        for (int l = 0; l < VL; l++) acc[l] += x[i + l];
    float tail = 0.f;
    for (int64_t i = whole; i < n; i++) tail += x[i];
    for (int w = VL / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0] + tail;
}

/* exp(x) for x <= 0 (scores minus their row max), Cephes-style: x = n ln2 + r with
 * |r| <= ln2/2, a degree-7 polynomial for e^r, then 2^n through the exponent bits.
 * About 1 ulp, and a loop over it vectorises (glibc's expf does not). */
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x; /* keeps 2^n normal; e^-87 ~ 1.6e-38 weighs nothing */
    const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

typedef struct {
    int32_t seq, kv_head, first; /* first query token of the tile, 0-based in the chunk */
} Item;

/* One call's tensors, shapes and strides (in elements; the cache's in bytes); see
 * paged_attention_f32. */
typedef struct {
    const float *q;
    int64_t q_row, q_head;
    const char *cache;
    int64_t c_block, c_kv, c_tok, c_head;
    float *out;
    int64_t o_row, o_head;
    const int32_t *query_start, *seq_lens, *block_tables;
    int64_t bt_row;
    int64_t group, d, block_size;
    float scale;
} Args;

/* Keys in the 16-key step starting at t0. */
static inline int64_t chunk(int64_t n_keys, int64_t t0) {
    return n_keys - t0 < VL ? n_keys - t0 : VL;
}

/* Addresses of keys t0 .. t0+n-1 (n <= VL) of one head: the block table says where each
 * token lives; one division per 16 keys, whatever the block size. */
static inline void token_ptrs(const Args *a, const int32_t *table, const char *base,
                              int64_t t0, int64_t n, const char **ptr) {
    int64_t blk = t0 / a->block_size, off = t0 % a->block_size;
    for (int64_t j = 0; j < n; j++) {
        ptr[j] = base + table[blk] * a->c_block + off * a->c_tok;
        if (++off == a->block_size) {
            off = 0;
            blk++;
        }
    }
}

/* Asks for keys t0 .. t0+n-1 of one head ahead of use: a sequence's blocks lie far
 * apart (a block holds every layer), so the hardware prefetchers lose the stream at
 * each block edge and every 16 keys would otherwise wait on DRAM. */
static inline void prefetch_tokens(const Args *a, const int32_t *table, const char *base,
                                   int64_t t0, int64_t n, const int64_t row_bytes) {
    const char *tok[VL];
    token_ptrs(a, table, base, t0, n, tok);
    for (int64_t j = 0; j < n; j++)
        for (int64_t e = 0; e < row_bytes; e += 64) __builtin_prefetch(tok[j] + e);
}

/* One work item. Always inlined into run_item with the common head sizes as constants
 * (nv = head_dim / 16), so the head_dim loops unroll into registers. */
static inline __attribute__((always_inline)) void item_impl(
    const Args *a, Item it, float *scores, vec *acc, const int64_t nv, const int quant) {
    const int64_t q0 = a->query_start[it.seq];
    const int64_t ql = a->query_start[it.seq + 1] - q0;
    const int64_t sl = a->seq_lens[it.seq];
    const int64_t g = a->group;
    const int64_t nq = ql - it.first < QTILE ? ql - it.first : QTILE;
    const int64_t rows = nq * g;
    const int64_t n_keys = sl - ql + it.first + nq; /* what the tile's last token sees */
    const int64_t stride = (n_keys + VL - 1) / VL * VL; /* of a row of scores */
    const int32_t *table = a->block_tables + (int64_t)it.seq * a->bt_row;
    const float *qp[MAX_ROWS];
    int64_t lim[MAX_ROWS]; /* keys visible to each row */
    float inv_sum[MAX_ROWS];
    for (int64_t i = 0; i < nq; i++) {
        for (int64_t h = 0; h < g; h++) {
            const int64_t row = q0 + it.first + i, head = it.kv_head * g + h;
            qp[i * g + h] = a->q + row * a->q_row + head * a->q_head;
            lim[i * g + h] = sl - ql + it.first + i + 1;
        }
    }
    const char *k_base = a->cache + it.kv_head * a->c_head;
    const char *v_base = k_base + a->c_kv;
    const char *tok[VL];
    const float *rows_at[VL];
    float tile[VL * VL * MAX_NV]; /* int8: 16 dequantized rows */
    /* the bytes of a row (int8: the values, then the scale) */
    const int64_t rb = quant ? a->d + (int64_t)sizeof(float) : a->d * (int64_t)sizeof(float);

    /* 1. scores, 16 keys at a time (a row's keys past its limit are computed and then
     *    ignored: within a tile they are live tokens of later queries). */
    prefetch_tokens(a, table, k_base, 0, chunk(n_keys, 0), rb);
    for (int64_t t0 = 0; t0 < n_keys; t0 += VL) {
        const int64_t n = chunk(n_keys, t0);
        token_ptrs(a, table, k_base, t0, n, tok);
        if (t0 + VL < n_keys)
            prefetch_tokens(a, table, k_base, t0 + VL, chunk(n_keys, t0 + VL), rb);
        else
            prefetch_tokens(a, table, v_base, 0, chunk(n_keys, 0), rb); /* for step 3 */
        rows_f32(tok, n, nv, quant, tile, rows_at);
        for (int64_t r = 0; r < rows; r++) {
            vec q[MAX_NV];
            for (int64_t v = 0; v < nv; v++) q[v] = vload(qp[r] + v * VL);
            const vec sc = n == VL ? dots16(q, rows_at, VL, nv) : dots16(q, rows_at, n, nv);
            vstore(scores + r * stride + t0, sc * a->scale);
        }
    }
    /* 2. softmax numerators in place (0 past each row's limit), 1 / their sum per row. */
    for (int64_t r = 0; r < rows; r++) {
        float *s = scores + r * stride;
        const int64_t n = lim[r];
        const float m = max_of(s, n);
        for (int64_t t = 0; t < n; t++) s[t] = exp_neg(s[t] - m);
        for (int64_t t = n; t < n_keys; t++) s[t] = 0.f;
        inv_sum[r] = 1.0f / sum_of(s, n);
    }
    /* 3. weighted sum of V rows; per 16 keys each row's accumulators stay in registers. */
    for (int64_t i = 0; i < rows * nv; i++) acc[i] = (vec){0};
    for (int64_t t0 = 0; t0 < n_keys; t0 += VL) {
        const int64_t n = chunk(n_keys, t0);
        token_ptrs(a, table, v_base, t0, n, tok);
        if (t0 + VL < n_keys)
            prefetch_tokens(a, table, v_base, t0 + VL, chunk(n_keys, t0 + VL), rb);
        rows_f32(tok, n, nv, quant, tile, rows_at);
        for (int64_t r = 0; r < rows; r++) {
            const float *p = scores + r * stride + t0;
            if (n == VL)
                weighted_sum16(acc + r * nv, p, rows_at, VL, nv);
            else
                weighted_sum16(acc + r * nv, p, rows_at, n, nv);
        }
    }
    for (int64_t i = 0; i < nq; i++) {
        for (int64_t h = 0; h < g; h++) {
            const int64_t r = i * g + h, head = it.kv_head * g + h;
            float *o = a->out + (q0 + it.first + i) * a->o_row + head * a->o_head;
            for (int64_t v = 0; v < nv; v++) vstore(o + v * VL, acc[r * nv + v] * inv_sum[r]);
        }
    }
}

static void run_item(const Args *a, Item it, float *scores, vec *acc) {
    switch (a->d) {
    case 64: item_impl(a, it, scores, acc, 4, 0); break;
    case 128: item_impl(a, it, scores, acc, 8, 0); break;
    default: item_impl(a, it, scores, acc, a->d / VL, 0);
    }
}

static void run_item_i8(const Args *a, Item it, float *scores, vec *acc) {
    switch (a->d) {
    case 64: item_impl(a, it, scores, acc, 4, 1); break;
    case 128: item_impl(a, it, scores, acc, 8, 1); break;
    default: item_impl(a, it, scores, acc, a->d / VL, 1);
    }
}

/* Attention of every query row of the step's num_seqs sequences. Returns 0, -1 for a
 * shape it does not take (group > MAX_GROUP, head_dim not a multiple of 16 or above
 * 256), -2 when out of memory. Threads: the calling thread's OpenMP team size, which
 * torch.set_num_threads sets (torch's own parallel regions use the same runtime and
 * pool). */
typedef void (*ItemFn)(const Args *, Item, float *, vec *);

static int attention(const Args a, int64_t num_seqs, int64_t num_kv_heads, ItemFn run) {
    const int32_t *query_start = a.query_start, *seq_lens = a.seq_lens;
    const int64_t group = a.group, d = a.d;
    int64_t n_items = 0, max_keys = 1, work = 0;
    for (int64_t b = 0; b < num_seqs; b++) {
        const int64_t ql = query_start[b + 1] - query_start[b];
        n_items += num_kv_heads * ((ql + QTILE - 1) / QTILE);
        if (seq_lens[b] > max_keys) max_keys = seq_lens[b];
        work += ql * seq_lens[b]; /* (query, key) pairs, per query head, ~2x causal */
    }
    if (n_items == 0) return 0;
    Item *items = malloc((size_t)n_items * sizeof(Item));
    if (!items) return -2;
    int64_t k = 0;
    for (int32_t b = 0; b < num_seqs; b++) {
        const int32_t ql = query_start[b + 1] - query_start[b];
        for (int32_t first = 0; first < ql; first += QTILE)
            for (int32_t h = 0; h < num_kv_heads; h++) items[k++] = (Item){b, h, first};
    }
    /* Scratch per thread: the scores of an item's rows, then its output accumulators. */
    const int64_t rows_max = QTILE * group;
    const int64_t n_scores = rows_max * ((max_keys + VL - 1) / VL * VL);
    const int64_t n_acc = rows_max * (d / VL);
    const int threads = omp_get_max_threads();
    float *scores = malloc((size_t)(threads * n_scores) * sizeof(float));
    vec *acc = aligned_alloc(sizeof(vec), (size_t)(threads * n_acc) * sizeof(vec));
    if (!scores || !acc) {
        free(items);
        free(scores);
        free(acc);
        return -2;
    }
    /* Below ~25 us of work a parallel region costs more than it saves (more still when
     * the other core is busy and the region waits for its thread to be scheduled). */
    work *= group * num_kv_heads * d;
#pragma omp parallel for schedule(dynamic, 1) if (work >= PARALLEL_WORK)
    for (int64_t i = 0; i < n_items; i++) {
        const int t = omp_get_thread_num();
        run(&a, items[i], scores + t * n_scores, acc + t * n_acc);
    }
    free(scores);
    free(acc);
    free(items);
    return 0;
}

int paged_attention_f32(
    const float *q, int64_t q_row, int64_t q_head,
    const float *cache, int64_t c_block, int64_t c_kv, int64_t c_tok, int64_t c_head,
    float *out, int64_t o_row, int64_t o_head,
    const int32_t *query_start, const int32_t *seq_lens,
    const int32_t *block_tables, int64_t bt_row, int64_t num_seqs,
    int64_t num_kv_heads, int64_t group, int64_t d, int64_t block_size, float scale) {
    if (group > MAX_GROUP || d % VL || d > VL * MAX_NV) return -1;
    const int64_t e = sizeof(float); /* cache strides in bytes */
    const Args a = {q, q_row, q_head, (const char *)cache, c_block * e, c_kv * e, c_tok * e,
                    c_head * e, out, o_row, o_head, query_start, seq_lens, block_tables,
                    bt_row, group, d, block_size, scale};
    return attention(a, num_seqs, num_kv_heads, run_item);
}

/* paged_attention_f32 over an int8 cache: rows of d int8 values and their fp32 scale
 * (cache strides in elements = bytes). */
int paged_attention_i8(
    const float *q, int64_t q_row, int64_t q_head,
    const int8_t *cache, int64_t c_block, int64_t c_kv, int64_t c_tok, int64_t c_head,
    float *out, int64_t o_row, int64_t o_head,
    const int32_t *query_start, const int32_t *seq_lens,
    const int32_t *block_tables, int64_t bt_row, int64_t num_seqs,
    int64_t num_kv_heads, int64_t group, int64_t d, int64_t block_size, float scale) {
    if (group > MAX_GROUP || d % VL || d > VL * MAX_NV) return -1;
    const Args a = {q, q_row, q_head, (const char *)cache, c_block, c_kv, c_tok, c_head,
                    out, o_row, o_head, query_start, seq_lens, block_tables, bt_row, group, d,
                    block_size, scale};
    return attention(a, num_seqs, num_kv_heads, run_item_i8);
}

/* Neox rotary of one head in place: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), the
 * torch path's operations in its order and without FMAs (so bit-identical to it). */
__attribute__((optimize("fp-contract=off"))) static inline void rotate(
    float *restrict x, const float *restrict cos, const float *restrict sin, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * cos[i] - x2 * sin[i];
        x[i + half] = x2 * cos[i] + x1 * sin[i];
    }
}

/* One row of d floats -> d int8 values then their fp32 scale s = absmax / 127, each
 * value round-half-even(x / s) (an all-zero row: s = 0, values 0). The operations of
 * kernels/kv_quant.py's quantize, so both paths store the same bytes. */
static void quantize_row(int8_t *restrict dst, const float *restrict x, int64_t d) {
    float m = 0.f;
    for (int64_t i = 0; i < d; i++) {
        const float a = __builtin_fabsf(x[i]);
        m = a > m ? a : m;
    }
    const float s = m / 127.0f, div = s > 0.f ? s : 1.0f;
    for (int64_t i = 0; i < d; i++) {
        float y = __builtin_nearbyintf(x[i] / div);
        y = y > 127.f ? 127.f : (y < -127.f ? -127.f : y);
        dst[i] = (int8_t)y;
    }
    memcpy(dst + d, &s, sizeof s);
}

/* Rotates q (T, Hq, D) and k (T, Hkv, D) in place at their positions, using the
 * (max_pos, D) table of [cos | sin] halves, then copies k and v (T, Hkv, D) into the
 * cache at their slots (slot -1: not stored); ``quant``: the cache is int8 rows (cache
 * strides in bytes either way). Returns 0, or -1 when a position or slot is out of
 * range (nothing is written then). */
static int rotary_store(
    float *q, int64_t q_row, int64_t q_head,
    float *k, int64_t k_row, int64_t k_head,
    const float *v, int64_t v_row, int64_t v_head,
    const int64_t *positions, const float *cos_sin, int64_t cs_row, int64_t max_pos,
    char *cache, int64_t c_block, int64_t c_kv, int64_t c_tok, int64_t c_head,
    const int64_t *slots, int64_t num_slots, int64_t block_size,
    int64_t num_tokens, int64_t hq, int64_t hkv, int64_t d, const int quant) {
    for (int64_t t = 0; t < num_tokens; t++)
        if (positions[t] < 0 || positions[t] >= max_pos || slots[t] < -1 ||
            slots[t] >= num_slots)
            return -1;
    const int64_t half = d / 2;
    /* Decode steps have a few dozen tokens: a parallel region would cost more than it
     * saves. Prefill chunks have hundreds. */
#pragma omp parallel for schedule(static) if (num_tokens >= 64)
    for (int64_t t = 0; t < num_tokens; t++) {
        const float *cos = cos_sin + positions[t] * cs_row, *sin = cos + half;
        for (int64_t h = 0; h < hq; h++) rotate(q + t * q_row + h * q_head, cos, sin, half);
        for (int64_t h = 0; h < hkv; h++) rotate(k + t * k_row + h * k_head, cos, sin, half);
        if (slots[t] < 0) continue;
        char *dst = cache + slots[t] / block_size * c_block + slots[t] % block_size * c_tok;
        for (int64_t h = 0; h < hkv; h++) {
            const float *kr = k + t * k_row + h * k_head, *vr = v + t * v_row + h * v_head;
            if (quant) {
                quantize_row((int8_t *)(dst + h * c_head), kr, d);
                quantize_row((int8_t *)(dst + c_kv + h * c_head), vr, d);
            } else {
                memcpy(dst + h * c_head, kr, (size_t)d * sizeof(float));
                memcpy(dst + c_kv + h * c_head, vr, (size_t)d * sizeof(float));
            }
        }
    }
    return 0;
}

int rotary_store_f32(
    float *q, int64_t q_row, int64_t q_head,
    float *k, int64_t k_row, int64_t k_head,
    const float *v, int64_t v_row, int64_t v_head,
    const int64_t *positions, const float *cos_sin, int64_t cs_row, int64_t max_pos,
    float *cache, int64_t c_block, int64_t c_kv, int64_t c_tok, int64_t c_head,
    const int64_t *slots, int64_t num_slots, int64_t block_size,
    int64_t num_tokens, int64_t hq, int64_t hkv, int64_t d) {
    const int64_t e = sizeof(float);
    return rotary_store(q, q_row, q_head, k, k_row, k_head, v, v_row, v_head, positions,
                        cos_sin, cs_row, max_pos, (char *)cache, c_block * e, c_kv * e,
                        c_tok * e, c_head * e, slots, num_slots, block_size, num_tokens, hq,
                        hkv, d, 0);
}

/* rotary_store_f32 into an int8 cache (strides in elements = bytes), quantizing k and v
 * rows as they are stored. */
int rotary_store_i8(
    float *q, int64_t q_row, int64_t q_head,
    float *k, int64_t k_row, int64_t k_head,
    const float *v, int64_t v_row, int64_t v_head,
    const int64_t *positions, const float *cos_sin, int64_t cs_row, int64_t max_pos,
    int8_t *cache, int64_t c_block, int64_t c_kv, int64_t c_tok, int64_t c_head,
    const int64_t *slots, int64_t num_slots, int64_t block_size,
    int64_t num_tokens, int64_t hq, int64_t hkv, int64_t d) {
    return rotary_store(q, q_row, q_head, k, k_row, k_head, v, v_row, v_head, positions,
                        cos_sin, cs_row, max_pos, (char *)cache, c_block, c_kv, c_tok, c_head,
                        slots, num_slots, block_size, num_tokens, hq, hkv, d, 1);
}
