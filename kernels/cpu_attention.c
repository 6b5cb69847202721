/* Paged attention over the strided per-layer KV view, fp32, for the CPU engine.
 *
 * Built at first use by kernels/cpu_native.py (plain C, no torch headers, so a fresh
 * machine compiles it in about a second) and called through ctypes with raw pointers
 * and element strides. The torch path (ref_attention.py) gathers each sequence's
 * blocks into a contiguous copy and then runs SDPA; this reads K and V straight from
 * the blocks, once per KV head for all G query heads of its group.
 *
 * Work item = (sequence, kv head, tile of up to QTILE query tokens). Its rows are the
 * tile's (query token, group head) pairs; row r of token i attends to key positions
 * 0 .. seq_len - query_len + i (causal, on top of the cached prefix). Per item:
 *   1. scores s[r][t] = (q_r . k_t) * scale for every key a row may see
 *   2. exact softmax per row: max, exp(s - max), sum (all scores of a row are held,
 *      so there is no online rescaling: the same sum order as a two-pass softmax)
 *   3. out_r = (sum_t p[r][t] v_t) / sum_r
 * Items run in parallel (OpenMP, dynamic schedule: ragged lengths make them uneven).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16  /* one AVX-512 register of floats; gcc splits it for AVX2 (reduce_add assumes 16) */
#define QTILE 8   /* query tokens per work item: K/V reads shared by 8 * G rows */
#define MAX_GROUP 64 /* query heads per KV head; sizes the per-item row arrays */

/* acc[0] + ... + acc[15] as a fixed pairwise tree (written out: gcc keeps a loop over
 * the tree levels in memory). */
static inline float reduce_add(float *acc) {
    for (int l = 0; l < 8; l++) acc[l] += acc[l + 8];
    for (int l = 0; l < 4; l++) acc[l] += acc[l + 4];
    for (int l = 0; l < 2; l++) acc[l] += acc[l + 2];
    return acc[0] + acc[1];
}

/* Dot product with LANES independent partial sums, then a fixed pairwise tree: the
 * inner loop vectorises without -ffast-math and the result does not depend on it. */
static inline float dot(const float *restrict a, const float *restrict b, int64_t d) {
    float acc[LANES] = {0};
    const int64_t whole = d - d % LANES;
    for (int64_t i = 0; i < whole; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    float tail = 0.f;
    if (whole < d)
        for (int64_t i = whole; i < d; i++) tail += a[i] * b[i];
    return reduce_add(acc) + tail;
}

/* Sum with LANES partial sums and the same fixed tree as dot. */
static inline float sum(const float *restrict x, int64_t n) {
    float acc[LANES] = {0};
    const int64_t whole = n - n % LANES;
    for (int64_t i = 0; i < whole; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += x[i + l];
    float tail = 0.f;
    for (int64_t i = whole; i < n; i++) tail += x[i];
    return reduce_add(acc) + tail;
}

/* Max of n >= 1 values, LANES running maxima (exact in any order). */
static inline float max(const float *restrict x, int64_t n) {
    float acc[LANES];
    for (int l = 0; l < LANES; l++) acc[l] = x[0];
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] = x[i + l] > acc[l] ? x[i + l] : acc[l];
    for (; i < n; i++) acc[0] = x[i] > acc[0] ? x[i] : acc[0];
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) acc[l] = acc[l + w] > acc[l] ? acc[l + w] : acc[l];
    return acc[0];
}

/* exp(x) for x <= 0 (scores minus their row max), Cephes-style: x = n ln2 + r with
 * |r| <= ln2/2, a degree-7 polynomial for e^r, then 2^n through the exponent bits.
 * About 1 ulp, and a plain loop over it vectorises (glibc's expf does not). */
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;  /* keeps 2^n normal; e^-87 ~ 1.6e-38 weighs nothing */
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

typedef struct {
    int32_t seq, kv_head, first; /* first query token of the tile, 0-based in the chunk */
} Item;

/* Shapes and strides (in elements) of one call; see paged_attention_f32. */
typedef struct {
    const float *q;
    int64_t q_row, q_head;
    const float *cache;
    int64_t c_block, c_kv, c_tok, c_head;
    float *out;
    int64_t o_row, o_head;
    const int32_t *query_start, *seq_lens, *block_tables;
    int64_t bt_row;
    int64_t group, d, block_size;
    float scale;
} Args;

/* One work item. Always inlined into run_item with the common head sizes as constants,
 * so the D loops unroll into whole vector registers. */
static inline __attribute__((always_inline)) void item_impl(
    const Args *a, Item it, float *scores, float *acc, const int64_t d) {
    const int64_t q0 = a->query_start[it.seq];
    const int64_t ql = a->query_start[it.seq + 1] - q0;
    const int64_t sl = a->seq_lens[it.seq];
    const int64_t g = a->group, bs = a->block_size;
    const int64_t nq = ql - it.first < QTILE ? ql - it.first : QTILE;
    const int64_t rows = nq * g;
    const int64_t n_keys = sl - ql + it.first + nq; /* what the tile's last token sees */
    const int32_t *table = a->block_tables + (int64_t)it.seq * a->bt_row;
    const float *qp[QTILE * MAX_GROUP];
    float *op[QTILE * MAX_GROUP];
    int64_t lim[QTILE * MAX_GROUP]; /* keys visible to each row */
    float inv_sum[QTILE * MAX_GROUP];
    for (int64_t i = 0; i < nq; i++) {
        for (int64_t h = 0; h < g; h++) {
            const int64_t row = q0 + it.first + i, head = it.kv_head * g + h, r = i * g + h;
            qp[r] = a->q + row * a->q_row + head * a->q_head;
            op[r] = a->out + row * a->o_row + head * a->o_head;
            lim[r] = sl - ql + it.first + i + 1;
        }
    }
    const float *k_base = a->cache + it.kv_head * a->c_head;
    const float *v_base = k_base + a->c_kv;

    /* 1. scores, block by block: only the block table says where a token lives. */
    for (int64_t t0 = 0; t0 < n_keys; t0 += bs) {
        const float *kb = k_base + table[t0 / bs] * a->c_block;
        const int64_t n = n_keys - t0 < bs ? n_keys - t0 : bs;
        for (int64_t j = 0; j < n; j++) {
            const float *k = kb + j * a->c_tok;
            for (int64_t r = 0; r < rows; r++)
                if (t0 + j < lim[r]) scores[r * n_keys + t0 + j] = dot(qp[r], k, d) * a->scale;
        }
    }
    /* 2. softmax numerators in place, and 1 / their sum per row. */
    for (int64_t r = 0; r < rows; r++) {
        float *s = scores + r * n_keys;
        const int64_t n = lim[r];
        const float m = max(s, n);
        for (int64_t t = 0; t < n; t++) s[t] = exp_neg(s[t] - m);
        inv_sum[r] = 1.0f / sum(s, n);
    }
    /* 3. weighted sum of V rows, each V row read once for all rows of the item. */
    memset(acc, 0, (size_t)(rows * d) * sizeof(float));
    for (int64_t t0 = 0; t0 < n_keys; t0 += bs) {
        const float *vb = v_base + table[t0 / bs] * a->c_block;
        const int64_t n = n_keys - t0 < bs ? n_keys - t0 : bs;
        for (int64_t j = 0; j < n; j++) {
            const float *restrict v = vb + j * a->c_tok;
            for (int64_t r = 0; r < rows; r++) {
                if (t0 + j >= lim[r]) continue;
                const float p = scores[r * n_keys + t0 + j];
                float *restrict o = acc + r * d;
                for (int64_t e = 0; e < d; e++) o[e] += p * v[e];
            }
        }
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t e = 0; e < d; e++) op[r][e] = acc[r * d + e] * inv_sum[r];
}

static void run_item(const Args *a, Item it, float *scores, float *acc) {
    switch (a->d) {
    case 64: item_impl(a, it, scores, acc, 64); break;
    case 128: item_impl(a, it, scores, acc, 128); break;
    default: item_impl(a, it, scores, acc, a->d);
    }
}

/* Attention of the query rows of the listed sequences (seqs[0..num_seqs)); rows of
 * other sequences are left untouched. Returns 0, -1 when group > MAX_GROUP (the caller
 * checks shapes; this only guards the fixed-size row arrays), -2 when out of memory. */
int paged_attention_f32(
    const float *q, int64_t q_row, int64_t q_head,
    const float *cache, int64_t c_block, int64_t c_kv, int64_t c_tok, int64_t c_head,
    float *out, int64_t o_row, int64_t o_head,
    const int32_t *query_start, const int32_t *seq_lens,
    const int32_t *block_tables, int64_t bt_row,
    const int32_t *seqs, int64_t num_seqs,
    int64_t num_kv_heads, int64_t group, int64_t d, int64_t block_size, float scale,
    int num_threads) {
    if (group > MAX_GROUP) return -1;
    Args a = {q, q_row, q_head, cache, c_block, c_kv, c_tok, c_head, out, o_row, o_head,
              query_start, seq_lens, block_tables, bt_row, group, d, block_size, scale};
    int64_t n_items = 0, max_keys = 1;
    for (int64_t i = 0; i < num_seqs; i++) {
        const int32_t b = seqs[i];
        const int64_t ql = query_start[b + 1] - query_start[b];
        n_items += num_kv_heads * ((ql + QTILE - 1) / QTILE);
        if (seq_lens[b] > max_keys) max_keys = seq_lens[b];
    }
    Item *items = malloc((size_t)n_items * sizeof(Item));
    if (!items) return -2;
    int64_t k = 0;
    for (int64_t i = 0; i < num_seqs; i++) {
        const int32_t b = seqs[i];
        const int32_t ql = query_start[b + 1] - query_start[b];
        for (int32_t first = 0; first < ql; first += QTILE)
            for (int32_t h = 0; h < num_kv_heads; h++) items[k++] = (Item){b, h, first};
    }
    /* Scratch per thread: the scores of an item's rows, then its output accumulators. */
    const int64_t rows_max = QTILE * group;
    const int64_t per_thread = rows_max * max_keys + rows_max * d;
    float *scratch = malloc((size_t)(num_threads * per_thread) * sizeof(float));
    if (!scratch) {
        free(items);
        return -2;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t i = 0; i < n_items; i++) {
        float *mine = scratch + omp_get_thread_num() * per_thread;
        run_item(&a, items[i], mine, mine + rows_max * max_keys);
    }
    free(scratch);
    free(items);
    return 0;
}
