/*
 * One MoE layer's forward pass in process (see layer.h).
 *
 * Owns: per layer, the router weight (backend memory), the selection bias
 * as fp32, gpt-oss's router bias (fp32) and expert biases (fp32, backend
 * memory, gate and up apart), the shared expert(s) and the qwen2_moe shared-expert gate, read
 * once on the layer's first use and kept for the engine's lifetime; and,
 * unless it was given one, its expert cache.  Routed experts come from the
 * cache: a forward acquires the ones its tokens use, computes on them in
 * ascending expert order as they become ready (the resident ones at once,
 * the others as their page-ins land), and releases them.  Keeping the order
 * fixed keeps every token's sum in the same order whatever was resident, so
 * the output does not depend on the cache.
 *
 * Lock: e->lock guards the layer table while a layer loads and the trace
 * token counters; forwards on different layers (and on the same layer) run
 * concurrently otherwise: the cache and the backend are thread-safe.
 */
#include "layer.h"

#include "backend.h"
#include "cache.h"
#include "dtype.h"
#include "model.h"
#include "quant.h"
#include "router.h"
#include "trace.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* How long a batch waits for room in a cache full of other batches' pins. */
#define ENOSPC_WAIT_NS (10ull * 1000 * 1000 * 1000)

/* What is kept of one MoE layer after its first use. */
struct layer_state {
    bool loaded;
    void *router;     /* [n_experts, hidden], backend memory */
    float *bias;      /* [n_experts] fp32, host, or NULL */
    void *shared_buf; /* shared expert gate|up|down, backend memory */
    struct moe_expert_weights shared;
    void *shared_gate;  /* [1, hidden], backend memory, or NULL */
    float *router_bias; /* [n_experts] fp32, host, added to the logits, or NULL */
    /* gpt-oss: expert e's biases at e * (2 ffn + hidden): gate [ffn], up
     * [ffn], down [hidden], fp32 in backend memory; or NULL. */
    float *expert_bias;
};

struct moe_engine {
    struct moe_model *m;
    struct moe_backend *b;
    struct moe_cache *cache;
    bool own_cache;
    int model; /* id in the cache */
    pthread_mutex_t lock;
    struct layer_state *layers; /* [n_layers]; guarded by lock while loading */
    struct moe_trace_writer *trace;
    uint32_t *trace_tokens; /* [n_layers]: tokens recorded per layer */
};

static void layer_unload(struct moe_engine *e, struct layer_state *ls);

int moe_engine_attach(struct moe_model *m, struct moe_backend *b, struct moe_cache *cache,
                      int model, struct moe_engine **ret)
{
    struct moe_engine *e = calloc(1, sizeof(*e));

    if (!e)
        return -ENOMEM;
    e->layers = calloc((size_t)m->cfg.n_layers, sizeof(*e->layers));
    e->trace_tokens = calloc((size_t)m->cfg.n_layers, sizeof(*e->trace_tokens));
    if (!e->layers || !e->trace_tokens) {
        free(e->layers);
        free(e->trace_tokens);
        free(e);
        return -ENOMEM;
    }
    e->m = m;
    e->b = b;
    e->cache = cache;
    e->model = model;
    pthread_mutex_init(&e->lock, NULL);
    *ret = e;
    return 0;
}

uint64_t moe_engine_all_experts_bytes(const struct moe_model *m)
{
    /* Each expert's slot holds the aligned spans of its three tensors (six
     * when quantized: values and scales). */
    uint64_t per = m->expert_bytes + (m->expert_quant.q != MOE_QUANT_NONE ? 6 : 3) * 2 * 4096;

    return (uint64_t)MOE_MAX(1, m->n_moe_layers) * (uint64_t)m->cfg.n_experts * per;
}

int moe_engine_init_cache(struct moe_model *m, struct moe_backend *b,
                          const struct moe_cache_config *cfg, struct moe_engine **ret,
                          struct moe_error *err)
{
    struct moe_cache_config c = {.policy = MOE_POLICY_LRU};
    struct moe_cache *cache;
    struct moe_engine *e;
    int model, r;

    if (cfg)
        c = *cfg;
    if (c.host_bytes == 0)
        c.host_bytes = moe_engine_all_experts_bytes(m);
    r = moe_cache_create(&c, &cache, err);
    if (r < 0)
        return r;
    r = moe_cache_add_model(cache, m, NULL, &model, err);
    if (r < 0) {
        moe_cache_free(cache);
        return r;
    }
    r = moe_engine_attach(m, b, cache, model, &e);
    if (r < 0) {
        moe_cache_free(cache);
        return moe_error_set(err, r, "out of memory");
    }
    e->own_cache = true;
    *ret = e;
    return 0;
}

int moe_engine_init(struct moe_model *m, struct moe_backend *b, struct moe_engine **ret)
{
    return moe_engine_init_cache(m, b, NULL, ret, NULL);
}

void moe_engine_free(struct moe_engine *e)
{
    if (!e)
        return;
    for (int i = 0; i < e->m->cfg.n_layers; i++)
        layer_unload(e, &e->layers[i]);
    if (e->own_cache)
        moe_cache_free(e->cache);
    pthread_mutex_destroy(&e->lock);
    free(e->layers);
    free(e->trace_tokens);
    free(e);
}

struct moe_cache *moe_engine_cache(struct moe_engine *e)
{
    return e->cache;
}

const struct moe_model *moe_engine_model(const struct moe_engine *e)
{
    return e->m;
}

int moe_engine_model_id(struct moe_engine *e)
{
    return e->model;
}

void moe_engine_set_trace(struct moe_engine *e, struct moe_trace_writer *w)
{
    pthread_mutex_lock(&e->lock);
    if (w != e->trace) /* a new trace numbers its tokens from 0 */
        memset(e->trace_tokens, 0, (size_t)e->m->cfg.n_layers * sizeof(*e->trace_tokens));
    e->trace = w;
    pthread_mutex_unlock(&e->lock);
}

/*
 * Reads the tensors in refs[] (n of them) back to back into one block of
 * backend memory, staging through host memory when the backend's memory is
 * not host memory.  Returns the block in *ret and the address of each
 * tensor in ptrs[].
 */
static int read_tensors(struct moe_engine *e, const struct moe_tensor_ref *const *refs, int n,
                        void **ret, void **ptrs, struct moe_error *err)
{
    struct moe_backend *b = e->b;
    size_t total = 0, off[8];
    uint8_t *dst, *host;
    int r;

    for (int i = 0; i < n; i++) {
        off[i] = total;
        /* Keep each tensor 64-byte aligned for the vector kernels. */
        total += (refs[i]->nbytes + 63) & ~(uint64_t)63;
    }
    dst = b->ops->alloc(b, total);
    if (!dst)
        return moe_error_set(err, -ENOMEM, "out of memory reading %zu bytes of weights", total);
    host = b->ops->host_memory ? dst : moe_alloc_aligned(total);
    if (!host) {
        b->ops->mem_free(b, dst);
        return moe_error_set(err, -ENOMEM, "out of memory staging %zu bytes of weights", total);
    }
    for (int i = 0; i < n; i++) {
        r = moe_model_read(e->m, refs[i], host + off[i], err);
        if (r < 0)
            goto fail;
        ptrs[i] = dst + off[i];
    }
    if (host != dst) {
        r = b->ops->copy_in(b, dst, host, total);
        if (r < 0) {
            moe_error_set(err, r, "copying %zu bytes of weights to the %s backend failed", total,
                          b->ops->name);
            goto fail;
        }
        moe_free_aligned(host);
    }
    *ret = dst;
    return 0;
fail:
    if (host != dst)
        moe_free_aligned(host);
    b->ops->mem_free(b, dst);
    return r;
}

static void expert_weights(const struct moe_expert_ref *x, void *const *ptrs,
                           struct moe_expert_weights *w)
{
    memset(w, 0, sizeof(*w));
    w->dtype = x->gate.dtype;
    w->hidden = x->gate.cols;
    w->ffn = x->gate.rows;
    w->gate = ptrs[0];
    w->up = ptrs[1];
    w->down = ptrs[2];
    if (x->quant.q != MOE_QUANT_NONE) {
        w->quant = x->quant;
        w->gate_s = ptrs[3];
        w->up_s = ptrs[4];
        w->down_s = ptrs[5];
    }
}

static int read_expert(struct moe_engine *e, const struct moe_expert_ref *x, void **ret,
                       struct moe_expert_weights *w, struct moe_error *err)
{
    const struct moe_tensor_ref *refs[6];
    int n = moe_expert_tensors(x, refs);
    void *ptrs[6];
    int r = read_tensors(e, refs, n, ret, ptrs, err);

    if (r < 0)
        return r;
    /* the scales, as a page-in checks a routed expert's */
    if (x->quant.q != MOE_QUANT_NONE && e->b->ops->host_memory) {
        for (int i = 3; i < 6; i++) {
            r = moe_quant_check_scales(x->quant.q, ptrs[i],
                                       refs[i]->nbytes / moe_quant_scale_size(x->quant.q),
                                       refs[i]->name, err);
            if (r < 0) {
                moe_error_prefix(err, "%s", e->m->files[refs[i]->file].path);
                e->b->ops->mem_free(e->b, *ret);
                *ret = NULL;
                return r;
            }
        }
    }
    expert_weights(x, ptrs, w);
    return 0;
}

/* Converts a 1-D tensor of a compute dtype to fp32. */
static int read_vector_f32(struct moe_engine *e, const struct moe_tensor_ref *t, float **ret,
                           struct moe_error *err)
{
    size_t n = (size_t)(t->rows * t->cols);
    size_t esz = moe_dtype_size(t->dtype);
    uint8_t *raw = malloc(t->nbytes ? t->nbytes : 1);
    float *v = malloc(n * sizeof(float));
    int r;

    if (!raw || !v) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    r = moe_model_read(e->m, t, raw, err);
    if (r < 0)
        goto out;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *p = raw + i * esz;
        uint16_t h;

        switch (t->dtype) {
        case MOE_DTYPE_F32:
            memcpy(&v[i], p, 4);
            break;
        case MOE_DTYPE_F16:
            memcpy(&h, p, 2);
            v[i] = moe_f16_to_f32(h);
            break;
        default:
            memcpy(&h, p, 2);
            v[i] = moe_bf16_to_f32(h);
            break;
        }
    }
    *ret = v;
    v = NULL;
out:
    free(raw);
    free(v);
    return r;
}

static void layer_unload(struct moe_engine *e, struct layer_state *ls)
{
    e->b->ops->mem_free(e->b, ls->router);
    e->b->ops->mem_free(e->b, ls->shared_buf);
    e->b->ops->mem_free(e->b, ls->shared_gate);
    e->b->ops->mem_free(e->b, ls->expert_bias);
    free(ls->bias);
    free(ls->router_bias);
    memset(ls, 0, sizeof(*ls));
}

/*
 * gpt-oss's expert biases, as stored (gate_up [E, 2F] interleaved, down
 * [E, H]), into ls->expert_bias: per expert gate [F], up [F], down [H].
 */
static int load_expert_bias(struct moe_engine *e, const struct moe_layer *L, struct layer_state *ls,
                            struct moe_error *err)
{
    struct moe_backend *b = e->b;
    const int64_t E = e->m->cfg.n_experts, F = e->m->cfg.expert_ffn, H = e->m->cfg.hidden;
    const size_t per = (size_t)(2 * F + H), bytes = (size_t)E * per * sizeof(float);
    float *gu = NULL, *dn = NULL, *host;
    int r;

    r = read_vector_f32(e, &L->gate_up_bias, &gu, err);
    if (r == 0)
        r = read_vector_f32(e, &L->down_bias, &dn, err);
    if (r < 0)
        goto out;
    ls->expert_bias = b->ops->alloc(b, bytes);
    host = b->ops->host_memory ? ls->expert_bias : malloc(bytes);
    if (!ls->expert_bias || !host) {
        r = moe_error_set(err, -ENOMEM, "out of memory for %zu bytes of expert biases", bytes);
        if (host != ls->expert_bias)
            free(host);
        goto out;
    }
    for (int64_t x = 0; x < E; x++) {
        float *d = host + (size_t)x * per;
        const float *src = gu + (size_t)x * 2 * F;

        for (int64_t f = 0; f < F; f++) {
            d[f] = src[2 * f];
            d[F + f] = src[2 * f + 1];
        }
        memcpy(d + 2 * F, dn + (size_t)x * H, (size_t)H * sizeof(float));
    }
    if (host != ls->expert_bias) {
        r = b->ops->copy_in(b, ls->expert_bias, host, bytes);
        free(host);
        if (r < 0)
            moe_error_set(err, r, "copying expert biases to the %s backend failed", b->ops->name);
    }
out:
    free(gu);
    free(dn);
    return r;
}

static int layer_load(struct moe_engine *e, int layer, struct moe_error *err)
{
    const struct moe_layer *L = &e->m->layers[layer];
    struct layer_state *ls = &e->layers[layer];
    const struct moe_tensor_ref *refs[1];
    void *ptrs[1];
    int r;

    if (ls->loaded)
        return 0;
    refs[0] = &L->router;
    r = read_tensors(e, refs, 1, &ls->router, ptrs, err);
    if (r == 0 && L->has_bias)
        r = read_vector_f32(e, &L->bias, &ls->bias, err);
    if (r == 0 && L->has_router_bias)
        r = read_vector_f32(e, &L->router_bias, &ls->router_bias, err);
    if (r == 0 && L->has_expert_bias)
        r = load_expert_bias(e, L, ls, err);
    if (r == 0 && L->has_shared)
        r = read_expert(e, &L->shared, &ls->shared_buf, &ls->shared, err);
    if (r == 0 && L->has_shared_gate) {
        refs[0] = &L->shared_gate;
        r = read_tensors(e, refs, 1, &ls->shared_gate, ptrs, err);
    }
    if (r < 0) {
        /* Nothing half-loaded survives: the next call starts over. */
        layer_unload(e, ls);
        moe_error_prefix(err, "layer %d", layer);
        return r;
    }
    ls->loaded = true;
    return 0;
}

static int check_input(const float *x, int n_tokens, int hidden, struct moe_error *err)
{
    for (int t = 0; t < n_tokens; t++) {
        for (int c = 0; c < hidden; c++) {
            if (!isfinite(x[(size_t)t * hidden + c]))
                return moe_error_set(err, -EINVAL,
                                     "input token %d, element %d is %s: hidden states must be "
                                     "finite",
                                     t, c, isnan(x[(size_t)t * hidden + c]) ? "NaN" : "infinite");
        }
    }
    return 0;
}

/*
 * A finite input can still overflow f32 inside the layer (1e38 times a
 * weight): the row that does is the caller's error, and a row of NaN must
 * never go back as an answer.  -EINVAL naming the first such row.
 */
static int check_output(const float *out, int n_tokens, int hidden, struct moe_error *err)
{
    for (int t = 0; t < n_tokens; t++) {
        for (int c = 0; c < hidden; c++) {
            float v = out[(size_t)t * hidden + c];

            if (!isfinite(v))
                return moe_error_set(err, -EINVAL,
                                     "output row %d is not finite (element %d is %s): the input "
                                     "row's magnitudes overflow f32 in this layer; scale it down",
                                     t, c, isnan(v) ? "NaN" : "infinite");
        }
    }
    return 0;
}

/* Everything one forward allocates, freed together. */
struct fwd_scratch {
    int32_t *ids;    /* [n_tokens, top_k] */
    float *weights;  /* [n_tokens, top_k] */
    int32_t *la_ids; /* [n_tokens, top_k] lookahead routing of the next layer */
    float *la_w;
    int32_t *count;               /* [n_experts + 1]: tokens per expert, then offsets */
    int32_t *tokens;              /* [n_tokens * top_k] grouped by expert */
    float *scales;                /* [n_tokens * top_k] */
    int32_t *used;                /* [n_experts] the experts used, ascending */
    struct moe_cache_ref *refs;   /* [n_experts] */
    int n_refs;                   /* refs acquired (to release) */
    void **bufs;                  /* [n_experts] staged weights (non-host backends) */
    struct moe_expert_weights *w; /* [n_experts] */
    struct moe_ffn_work *work;    /* [n_experts + 1] */
    int32_t *all_tokens;          /* [n_tokens]: 0..n_tokens-1 for shared experts */
    float *shared_scale;          /* [n_tokens] */
    float *xb;                    /* input in backend memory (NULL: host memory backend) */
    float *outb;                  /* output in backend memory */
    /* Llama 4 (cfg.scale_input): row t * top_k + j of xs is token t's input
     * times its j-th weight, and the routed experts write row t * top_k + j
     * of outs (oc itself when top_k is 1), summed into oc in slot order. */
    float *xs;   /* [n_tokens * top_k, hidden], backend memory */
    float *outs; /* [n_tokens * top_k, hidden], backend memory; NULL: oc */
    float *host; /* [n_tokens * top_k, hidden] host staging (non-host backends) */
};

static void scratch_free(struct moe_engine *e, struct fwd_scratch *s, int n_experts)
{
    struct moe_backend *b = e->b;

    if (s->refs && s->n_refs)
        moe_cache_release(e->cache, s->refs, s->n_refs);
    if (s->bufs) {
        for (int i = 0; i < n_experts; i++)
            b->ops->mem_free(b, s->bufs[i]);
    }
    free(s->ids);
    free(s->weights);
    free(s->la_ids);
    free(s->la_w);
    free(s->count);
    free(s->tokens);
    free(s->scales);
    free(s->used);
    free(s->refs);
    free(s->bufs);
    free(s->w);
    free(s->work);
    free(s->all_tokens);
    free(s->shared_scale);
    b->ops->mem_free(b, s->xb);
    b->ops->mem_free(b, s->outb);
    b->ops->mem_free(b, s->xs);
    b->ops->mem_free(b, s->outs);
    free(s->host);
}

/*
 * Llama 4 multiplies each routed expert's input, not its output, by the
 * token's weight: fills s->xs (and s->outs when top_k > 1, zeroed) from the
 * host input x and the routing in s, and points every (token, slot) pair of
 * the grouped work at its own row with weight 1.  Each row of outs gets one
 * expert's output, so the sum does not depend on the order experts land in.
 */
static int scale_inputs(struct moe_engine *e, struct fwd_scratch *s, const float *x, int n_tokens,
                        struct moe_error *err)
{
    struct moe_backend *b = e->b;
    const int K = e->m->cfg.top_k, H = e->m->cfg.hidden;
    const size_t TK = (size_t)n_tokens * K, bytes = TK * (size_t)H * sizeof(float);
    float *xs;
    int r = 0;

    s->xs = b->ops->alloc(b, bytes);
    if (K > 1)
        s->outs = b->ops->alloc(b, bytes);
    xs = b->ops->host_memory ? s->xs : (s->host = malloc(bytes));
    if (!s->xs || (K > 1 && !s->outs) || !xs)
        return moe_error_set(err, -ENOMEM, "out of memory for %zu scaled input rows", TK);
    for (size_t i = 0; i < TK; i++) {
        const float *xt = x + (i / (size_t)K) * (size_t)H;
        float w = s->ids[i] >= 0 ? s->weights[i] : 0.0f, *row = xs + i * (size_t)H;

        for (int c = 0; c < H; c++)
            row[c] = xt[c] * w;
    }
    if (xs != s->xs)
        r = b->ops->copy_in(b, s->xs, xs, bytes);
    if (r == 0 && s->outs && b->ops->host_memory) {
        memset(s->outs, 0, bytes);
    } else if (r == 0 && s->outs) {
        memset(xs, 0, bytes); /* the staging buffer, copied in already */
        r = b->ops->copy_in(b, s->outs, xs, bytes);
    }
    if (r < 0)
        return moe_error_set(err, r, "copying scaled inputs to the %s backend failed",
                             b->ops->name);
    /* The grouped tokens were token numbers in ascending order per expert;
     * each becomes its (token, slot) row, still ascending. */
    for (int i = 0; i < e->m->cfg.n_experts; i++) {
        for (int32_t at = s->count[i]; at < s->count[i + 1]; at++) {
            int32_t t = s->tokens[at];
            int j = 0;

            while (s->ids[(size_t)t * K + j] != i)
                j++;
            s->tokens[at] = t * K + j;
            s->scales[at] = 1.0f;
        }
    }
    return 0;
}

/* oc[t] = sum over j of outs[t * top_k + j], in slot order (top_k > 1). */
static int sum_slots(struct moe_engine *e, struct fwd_scratch *s, int n_tokens, float *oc,
                     struct moe_error *err)
{
    struct moe_backend *b = e->b;
    const int K = e->m->cfg.top_k, H = e->m->cfg.hidden;
    const size_t rows = (size_t)n_tokens * K;
    const float *o = s->outs;
    float *dst = oc;
    int r = 0;

    if (!b->ops->host_memory) {
        /* Staged through host memory: s->host holds rows x H floats. */
        r = b->ops->copy_out(b, s->host, s->outs, rows * H * sizeof(float));
        o = s->host;
        dst = malloc((size_t)n_tokens * H * sizeof(float));
        if (r == 0 && !dst)
            r = -ENOMEM;
    }
    for (int t = 0; r == 0 && t < n_tokens; t++)
        for (int c = 0; c < H; c++) {
            float v = 0;

            for (int j = 0; j < K; j++)
                v += o[((size_t)t * K + j) * H + c];
            dst[(size_t)t * H + c] = v;
        }
    if (r == 0 && dst != oc)
        r = b->ops->copy_in(b, oc, dst, (size_t)n_tokens * H * sizeof(float));
    if (dst != oc)
        free(dst);
    if (r < 0)
        return moe_error_set(err, r, "summing the routed experts' outputs failed on the %s backend",
                             b->ops->name);
    return 0;
}

/*
 * The model's router on xc (backend memory) for n_tokens: ids and weights
 * [n_tokens, top_k] in host memory.  The layer must be loaded.
 */
static int route_loaded(struct moe_engine *e, int layer, const float *xc, int n_tokens,
                        int32_t *ids, float *weights, struct moe_error *err)
{
    const struct moe_model *m = e->m;
    const struct moe_layer *L = &m->layers[layer];
    struct layer_state *ls = &e->layers[layer];
    struct moe_backend *b = e->b;
    const int E = m->cfg.n_experts, H = m->cfg.hidden;
    size_t lbytes = (size_t)n_tokens * E * sizeof(float);
    struct moe_router_params rp;
    float *logits = malloc(lbytes);
    int r;

    if (!logits)
        return moe_error_set(err, -ENOMEM, "out of memory for router logits");
    if (b->ops->host_memory) {
        r = b->ops->matmul(b, ls->router, L->router.dtype, E, H, xc, n_tokens, logits);
    } else {
        float *lb = b->ops->alloc(b, lbytes);

        r = lb ? b->ops->matmul(b, ls->router, L->router.dtype, E, H, xc, n_tokens, lb) : -ENOMEM;
        if (r == 0)
            r = b->ops->copy_out(b, logits, lb, lbytes);
        b->ops->mem_free(b, lb);
    }
    if (r < 0) {
        free(logits);
        return moe_error_set(err, r, "router of layer %d failed on the %s backend", layer,
                             b->ops->name);
    }
    if (ls->router_bias) {
        /* gpt-oss: the router is a linear layer with a bias. */
        for (int t = 0; t < n_tokens; t++)
            for (int x = 0; x < E; x++)
                logits[(size_t)t * E + x] += ls->router_bias[x];
    }
    moe_model_router_params(m, ls->bias, &rp);
    r = moe_route(&rp, logits, n_tokens, ids, weights, err);
    free(logits);
    if (r < 0)
        moe_error_prefix(err, "layer %d", layer);
    return r;
}

/* Copies an expert's weights (host memory, from the cache) to backend
 * memory for a backend that computes elsewhere. */
static int stage_weights(struct moe_engine *e, const struct moe_expert_ref *x,
                         const struct moe_expert_weights *in, void **buf,
                         struct moe_expert_weights *out, struct moe_error *err)
{
    struct moe_backend *b = e->b;
    const struct moe_tensor_ref *t[6];
    const void *src[6] = {in->gate, in->up, in->down, in->gate_s, in->up_s, in->down_s};
    const void **dst[6] = {&out->gate,   &out->up,   &out->down,
                           &out->gate_s, &out->up_s, &out->down_s};
    int n = moe_expert_tensors(x, t);
    uint64_t off[6], total = 0;
    uint8_t *p;
    int r = 0;

    for (int i = 0; i < n; i++) {
        off[i] = total;
        total += (t[i]->nbytes + 63) & ~63ull;
    }
    p = b->ops->alloc(b, total);
    if (!p)
        return moe_error_set(err, -ENOMEM, "out of %s backend memory for an expert", b->ops->name);
    *out = *in;
    for (int i = 0; i < n && r == 0; i++) {
        r = b->ops->copy_in(b, p + off[i], src[i], t[i]->nbytes);
        *dst[i] = p + off[i];
    }
    if (r < 0) {
        b->ops->mem_free(b, p);
        return moe_error_set(err, r, "copying an expert to the %s backend failed", b->ops->name);
    }
    *buf = p;
    return 0;
}

/* Sets a routed expert's biases (the layer's, loaded) and activation. */
static void expert_activation(struct moe_engine *e, int layer, int expert,
                              struct moe_expert_weights *w)
{
    const struct moe_model_config *c = &e->m->cfg;
    const float *eb = e->layers[layer].expert_bias;

    w->act = c->act;
    w->alpha = c->swiglu_alpha;
    w->limit = c->swiglu_limit;
    if (eb) {
        eb += (size_t)expert * (size_t)(2 * c->expert_ffn + c->hidden);
        w->gate_bias = eb;
        w->up_bias = eb + c->expert_ffn;
        w->down_bias = eb + 2 * c->expert_ffn;
    }
}

/* Runs the work items [lo, hi) (ready experts) into oc. */
static int compute_range(struct moe_engine *e, int layer, struct fwd_scratch *s, int lo, int hi,
                         const float *xc, int n_tokens, float *oc, struct moe_error *err)
{
    struct moe_backend *b = e->b;
    const struct moe_layer *L = &e->m->layers[layer];
    /* Weights the backend can read where they are: host memory for a host
     * backend, or a tier of the backend's own memory in front of the
     * cache (a GPU tier); otherwise each expert is staged for the call. */
    bool direct = b->ops->host_memory || !moe_cache_tier0_host(e->cache);
    int r;

    for (int i = lo; i < hi; i++) {
        if (direct) {
            s->w[i] = s->refs[i].w;
        } else {
            r = stage_weights(e, &L->experts[s->used[i]], &s->refs[i].w, &s->bufs[i], &s->w[i],
                              err);
            if (r < 0)
                return r;
        }
        expert_activation(e, layer, s->used[i], &s->w[i]);
        s->work[i].w = &s->w[i];
        s->work[i].precision = e->m->precision;
    }
    r = b->ops->grouped_ffn(b, xc, e->m->cfg.hidden, n_tokens, s->work + lo, hi - lo, oc);
    if (r == -ENOTSUP && e->m->expert_quant.q != MOE_QUANT_NONE)
        return moe_error_set(err, r,
                             "expert FFNs of layer %d: the %s backend has no kernels for %s "
                             "experts; serve this model on the cpu backend",
                             layer, b->ops->name, moe_quant_name(e->m->expert_quant.q));
    if (r < 0)
        return moe_error_set(err, r, "expert FFNs of layer %d failed on the %s backend", layer,
                             b->ops->name);
    if (!direct) {
        for (int i = lo; i < hi; i++) {
            b->ops->mem_free(b, s->bufs[i]);
            s->bufs[i] = NULL;
        }
    }
    return 0;
}

/* Caller routing of a partial forward: ids in [-1, n_experts) (-1: left
 * out), no expert twice for a token, finite weights. */
static int validate_partial(int E, int K, int n_tokens, const int32_t *ids, const float *w,
                            struct moe_error *err)
{
    for (int t = 0; t < n_tokens; t++)
        for (int j = 0; j < K; j++) {
            int32_t id = ids[(size_t)t * K + j];

            if (id < -1 || id >= E)
                return moe_error_set(err, -EINVAL,
                                     "routing of token %d slot %d: expert id %d is out of range, "
                                     "expected -1 (left out) or 0..%d",
                                     t, j, (int)id, E - 1);
            if (id >= 0 && !isfinite(w[(size_t)t * K + j]))
                return moe_error_set(err, -EINVAL,
                                     "routing of token %d slot %d: weight is not finite", t, j);
            for (int i = 0; i < j && id >= 0; i++)
                if (ids[(size_t)t * K + i] == id)
                    return moe_error_set(err, -EINVAL,
                                         "routing of token %d slot %d: expert id %d is already "
                                         "in slot %d",
                                         t, j, (int)id, i);
        }
    return 0;
}

static int forward_run(struct moe_engine *e, int layer, const float *x, int n_tokens,
                       const int32_t *ids_in, const float *weights_in, unsigned flags, float *out,
                       int32_t *ret_ids, float *ret_weights, struct moe_forward_stats *st,
                       struct moe_error *err)
{
    const struct moe_model *m = e->m;
    const struct moe_model_config *c = &m->cfg;
    const struct moe_layer *L = &m->layers[layer];
    struct layer_state *ls = &e->layers[layer];
    struct moe_backend *b = e->b;
    const int E = c->n_experts, K = c->top_k, H = c->hidden;
    const size_t TK = (size_t)n_tokens * (size_t)K, xbytes = (size_t)n_tokens * H * sizeof(float);
    struct fwd_scratch s = {0};
    const float *xc = x;
    float *oc = out;
    uint64_t t0, t1, wait_ns = 0;
    int n_used = 0, r;

    t0 = moe_now_ns();
    pthread_mutex_lock(&e->lock);
    r = layer_load(e, layer, err);
    pthread_mutex_unlock(&e->lock);
    if (r < 0)
        return r;

    s.ids = malloc(TK * sizeof(*s.ids));
    s.weights = malloc(TK * sizeof(*s.weights));
    s.count = calloc((size_t)E + 1, sizeof(*s.count));
    s.tokens = malloc(TK * sizeof(*s.tokens));
    s.scales = malloc(TK * sizeof(*s.scales));
    s.used = malloc((size_t)E * sizeof(*s.used));
    s.refs = calloc((size_t)E, sizeof(*s.refs));
    s.bufs = calloc((size_t)E, sizeof(*s.bufs));
    s.w = calloc((size_t)E + 1, sizeof(*s.w));
    s.work = calloc((size_t)E + 1, sizeof(*s.work));
    if (!s.ids || !s.weights || !s.count || !s.tokens || !s.scales || !s.used || !s.refs ||
        !s.bufs || !s.w || !s.work) {
        r = moe_error_set(err, -ENOMEM, "out of memory for %d tokens", n_tokens);
        goto out;
    }
    if (!b->ops->host_memory) {
        s.xb = b->ops->alloc(b, xbytes);
        s.outb = b->ops->alloc(b, xbytes);
        if (!s.xb || !s.outb) {
            r = moe_error_set(err, -ENOMEM, "out of %s backend memory for %d tokens", b->ops->name,
                              n_tokens);
            goto out;
        }
        r = b->ops->copy_in(b, s.xb, x, xbytes);
        if (r < 0) {
            moe_error_set(err, r, "copying the input to the %s backend failed", b->ops->name);
            goto out;
        }
        xc = s.xb;
        oc = s.outb;
    }

    /* Routing: the caller's, or the model's router. */
    if (ids_in) {
        r = flags & MOE_FWD_PARTIAL ? validate_partial(E, K, n_tokens, ids_in, weights_in, err)
                                    : moe_routing_validate(E, K, n_tokens, ids_in, weights_in, err);
        if (r < 0)
            goto out;
        memcpy(s.ids, ids_in, TK * sizeof(*s.ids));
        memcpy(s.weights, weights_in, TK * sizeof(*s.weights));
    } else {
        r = route_loaded(e, layer, xc, n_tokens, s.ids, s.weights, err);
        if (r < 0)
            goto out;
    }
    /* Lookahead for the prefetcher: the next MoE layer's router on this
     * layer's input picks, most of the time, the experts that layer will
     * use (the residual stream changes little from one layer to the next).
     * Best effort: without it the predictor uses its table alone. */
    pthread_mutex_lock(&e->lock);
    bool tracing = e->trace != NULL;
    pthread_mutex_unlock(&e->lock);
    if (moe_cache_wants_lookahead(e->cache) || tracing) {
        int nl = layer + 1;

        while (nl < c->n_layers && !m->layers[nl].is_moe)
            nl++;
        if (nl < c->n_layers) {
            s.la_ids = malloc(TK * sizeof(*s.la_ids));
            s.la_w = malloc(TK * sizeof(*s.la_w));
            pthread_mutex_lock(&e->lock);
            r = s.la_ids && s.la_w ? layer_load(e, nl, NULL) : -ENOMEM;
            pthread_mutex_unlock(&e->lock);
            if (r == 0)
                r = route_loaded(e, nl, xc, n_tokens, s.la_ids, s.la_w, NULL);
            if (r < 0) {
                free(s.la_ids);
                s.la_ids = NULL;
            }
            r = 0;
        }
    }
    t1 = moe_now_ns();
    /* The writer may be set or taken away meanwhile (a live recording):
     * looked at again under the lock.  A partial forward (a cluster peer's
     * share) is not the whole routing of its tokens: not recorded. */
    if (!(flags & MOE_FWD_PARTIAL)) {
        pthread_mutex_lock(&e->lock);
        if (e->trace) {
            moe_trace_write_ahead(e->trace, e->trace_tokens[layer], layer, s.ids, s.la_ids,
                                  n_tokens);
            e->trace_tokens[layer] += (uint32_t)n_tokens;
        }
        pthread_mutex_unlock(&e->lock);
    }

    /* Group the (token, slot) pairs by expert: a counting sort, so each
     * expert's tokens stay in ascending order. */
    for (size_t i = 0; i < TK; i++)
        if (s.ids[i] >= 0) /* -1: left out of a partial forward */
            s.count[s.ids[i] + 1]++;
    for (int i = 0; i < E; i++) {
        if (s.count[i + 1] > 0)
            s.used[n_used++] = i;
        s.count[i + 1] += s.count[i];
    }
    {
        int32_t *fill = calloc((size_t)E, sizeof(*fill));

        if (!fill) {
            r = moe_error_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        for (size_t i = 0; i < TK; i++) {
            int32_t ex = s.ids[i], at;

            if (ex < 0)
                continue;
            at = s.count[ex] + fill[ex]++;

            s.tokens[at] = (int32_t)(i / (size_t)K);
            s.scales[at] = s.weights[i];
        }
        free(fill);
    }
    for (int i = 0; i < n_used; i++) {
        int ex = s.used[i];

        s.work[i].n_tokens = s.count[ex + 1] - s.count[ex];
        s.work[i].tokens = s.tokens + s.count[ex];
        s.work[i].scales = s.scales + s.count[ex];
    }
    if (c->scale_input) {
        r = scale_inputs(e, &s, x, n_tokens, err);
        if (r < 0)
            goto out;
    }

    /* The experts, as one batch: resident ones pinned, missing ones on
     * their way (making room for them never evicts one of this batch);
     * then the routing goes to the predictor (and prefetch of the next
     * layer). */
    r = moe_cache_acquire(e->cache, e->model, layer, s.used, n_used, s.refs, err);
    if (r < 0) {
        moe_error_prefix(err, "layer %d", layer);
        goto out;
    }
    s.n_refs = n_used;
    moe_cache_observe_ahead(e->cache, e->model, layer, s.ids, s.la_ids, n_tokens, K);
    if (st)
        st->experts_used = n_used;

    if (b->ops->host_memory) {
        memset(oc, 0, xbytes);
    } else {
        float *zero = calloc(1, xbytes);

        r = zero ? b->ops->copy_in(b, oc, zero, xbytes) : -ENOMEM;
        free(zero);
        if (r < 0) {
            moe_error_set(err, r, "clearing the output on the %s backend failed", b->ops->name);
            goto out;
        }
    }

    /* Compute in ascending expert order, each run of ready experts at once,
     * waiting only where the next expert is still on its way. */
    for (int i = 0; i < n_used;) {
        int j = i;

        while (j < n_used && moe_cache_ready(e->cache, &s.refs[j]) && s.refs[j].status == 0)
            j++;
        if (j > i) {
            if (c->scale_input)
                r = compute_range(e, layer, &s, i, j, s.xs, (int)TK, s.outs ? s.outs : oc, err);
            else
                r = compute_range(e, layer, &s, i, j, xc, n_tokens, oc, err);
            if (r < 0)
                goto out;
            for (int k = i; st && k < j; k++) {
                if (s.refs[k].hit) {
                    st->hits++;
                } else {
                    st->misses++;
                    st->bytes_read += L->experts[s.used[k]].nbytes;
                }
            }
            i = j;
            continue;
        }
        if (s.refs[i].status == -ENOSPC) {
            /* The batch did not fit: the cache kept the experts before
             * this one (computed now) and deferred the rest, leaving those
             * resident where they were.  Let go of every pin, then ask
             * again for the rest.  If other batches hold the room, wait
             * for them to release it, holding nothing meanwhile (so that
             * waiting batches cannot block each other), for up to
             * ENOSPC_WAIT_NS. */
            uint64_t t_give_up = moe_now_ns() + ENOSPC_WAIT_NS;

            for (;;) {
                moe_cache_release(e->cache, s.refs, n_used);
                r = moe_cache_acquire(e->cache, e->model, layer, s.used + i, n_used - i, s.refs + i,
                                      err);
                if (r < 0) {
                    moe_error_prefix(err, "layer %d", layer);
                    goto out;
                }
                if (s.refs[i].status != -ENOSPC)
                    break;
                if (moe_now_ns() > t_give_up) {
                    r = moe_cache_wait(e->cache, &s.refs[i], err); /* the -ENOSPC message */
                    goto out;
                }
                moe_cache_wait_release(e->cache, 100);
            }
            continue;
        }
        uint64_t tw = moe_now_ns();

        r = moe_cache_wait(e->cache, &s.refs[i], err);
        wait_ns += moe_now_ns() - tw;
        if (r < 0)
            goto out;
    }

    if (s.outs) {
        r = sum_slots(e, &s, n_tokens, oc, err);
        if (r < 0)
            goto out;
    }

    /* Shared experts take every token (Llama 4's its unscaled input),
     * scaled by the qwen2_moe gate or 1; last, as in the all-in-one order. */
    if (L->has_shared && !(flags & MOE_FWD_SKIP_SHARED)) {
        s.all_tokens = malloc((size_t)n_tokens * sizeof(int32_t));
        s.shared_scale = malloc((size_t)n_tokens * sizeof(float));
        if (!s.all_tokens || !s.shared_scale) {
            r = moe_error_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        for (int t = 0; t < n_tokens; t++) {
            s.all_tokens[t] = t;
            s.shared_scale[t] = 1.0f;
        }
        if (L->has_shared_gate) {
            float *gl = b->ops->host_memory ? s.shared_scale : NULL;

            if (!gl)
                gl = b->ops->alloc(b, (size_t)n_tokens * sizeof(float));
            r = gl ? b->ops->matmul(b, ls->shared_gate, L->shared_gate.dtype, 1, H, xc, n_tokens,
                                    gl)
                   : -ENOMEM;
            if (r == 0 && gl != s.shared_scale)
                r = b->ops->copy_out(b, s.shared_scale, gl, (size_t)n_tokens * sizeof(float));
            if (gl != s.shared_scale)
                b->ops->mem_free(b, gl);
            if (r < 0) {
                moe_error_set(err, r, "shared expert gate of layer %d failed", layer);
                goto out;
            }
            for (int t = 0; t < n_tokens; t++)
                s.shared_scale[t] = 1.0f / (1.0f + expf(-s.shared_scale[t]));
        }
        s.work[n_used].w = &ls->shared;
        s.work[n_used].n_tokens = n_tokens;
        s.work[n_used].tokens = s.all_tokens;
        s.work[n_used].scales = s.shared_scale;
        s.work[n_used].precision = e->m->precision;
        r = b->ops->grouped_ffn(b, xc, H, n_tokens, s.work + n_used, 1, oc);
        if (r < 0) {
            moe_error_set(err, r, "shared expert of layer %d failed on the %s backend", layer,
                          b->ops->name);
            goto out;
        }
    }
    if (oc != out) {
        r = b->ops->copy_out(b, out, oc, xbytes);
        if (r < 0) {
            moe_error_set(err, r, "copying the output from the %s backend failed", b->ops->name);
            goto out;
        }
    }
    if (ret_ids)
        memcpy(ret_ids, s.ids, TK * sizeof(*s.ids));
    if (ret_weights)
        memcpy(ret_weights, s.weights, TK * sizeof(*s.weights));
    if (st) {
        st->route_ns = t1 - t0;
        st->load_ns = wait_ns;
        st->compute_ns = moe_now_ns() - t1 - wait_ns;
    }
out:
    if (r < 0 && r != -EINVAL && err && !strstr(err->msg, "layer "))
        moe_error_prefix(err, "layer %d", layer);
    scratch_free(e, &s, E);
    return r;
}

static int check_call(struct moe_engine *e, int layer, const float *x, int n_tokens,
                      struct moe_error *err)
{
    const struct moe_model *m = e->m;

    if (layer < 0 || layer >= m->cfg.n_layers)
        return moe_error_set(err, -EINVAL, "layer %d out of range: the model has layers 0 to %d",
                             layer, m->cfg.n_layers - 1);
    if (!m->layers[layer].is_moe)
        return moe_error_set(err, -EINVAL,
                             "layer %d is a dense layer, not a MoE layer: moed serves only the "
                             "MoE layers (%d of %d here)",
                             layer, m->n_moe_layers, m->cfg.n_layers);
    if (n_tokens < 1 || n_tokens > MOE_MAX_TOKENS)
        return moe_error_set(err, -EINVAL, "%d tokens: expected 1 to %d", n_tokens, MOE_MAX_TOKENS);
    return check_input(x, n_tokens, m->cfg.hidden, err);
}

int moe_layer_forward_ex(struct moe_engine *e, const struct moe_layer_args *a,
                         struct moe_forward_stats *st, struct moe_error *err)
{
    int r;

    if (st)
        memset(st, 0, sizeof(*st));
    if (!a->ids != !a->weights)
        return moe_error_set(err, -EINVAL, "routing needs both expert ids and weights");
    if ((a->flags & MOE_FWD_PARTIAL) && !a->ids)
        return moe_error_set(err, -EINVAL, "a partial forward needs the caller's routing");
    if (a->flags & ~(MOE_FWD_PARTIAL | MOE_FWD_SKIP_SHARED))
        return moe_error_set(err, -EINVAL, "unknown forward flags %#x", a->flags);
    r = check_call(e, a->layer, a->x, a->n_tokens, err);
    if (r < 0)
        return r;
    r = forward_run(e, a->layer, a->x, a->n_tokens, a->ids, a->weights, a->flags, a->out,
                    a->ret_ids, a->ret_weights, st, err);
    if (r < 0)
        return r;
    return check_output(a->out, a->n_tokens, e->m->cfg.hidden, err);
}

int moe_layer_forward(struct moe_engine *e, int layer, const float *x, int n_tokens,
                      const int32_t *ids_in, const float *weights_in, float *out, int32_t *ret_ids,
                      float *ret_weights, struct moe_forward_stats *st, struct moe_error *err)
{
    const struct moe_layer_args a = {.layer = layer,
                                     .x = x,
                                     .n_tokens = n_tokens,
                                     .ids = ids_in,
                                     .weights = weights_in,
                                     .out = out,
                                     .ret_ids = ret_ids,
                                     .ret_weights = ret_weights};

    return moe_layer_forward_ex(e, &a, st, err);
}

int moe_layer_route(struct moe_engine *e, int layer, const float *x, int n_tokens, int32_t *ids,
                    float *weights, struct moe_error *err)
{
    struct moe_backend *b = e->b;
    size_t xbytes;
    float *xb = NULL;
    int r = check_call(e, layer, x, n_tokens, err);

    if (r < 0)
        return r;
    pthread_mutex_lock(&e->lock);
    r = layer_load(e, layer, err);
    pthread_mutex_unlock(&e->lock);
    if (r < 0)
        return r;
    xbytes = (size_t)n_tokens * e->m->cfg.hidden * sizeof(float);
    if (!b->ops->host_memory) {
        xb = b->ops->alloc(b, xbytes);
        if (!xb)
            return moe_error_set(err, -ENOMEM, "out of %s backend memory", b->ops->name);
        r = b->ops->copy_in(b, xb, x, xbytes);
        if (r < 0) {
            b->ops->mem_free(b, xb);
            return moe_error_set(err, r, "copying the input to the %s backend failed",
                                 b->ops->name);
        }
    }
    r = route_loaded(e, layer, xb ? xb : x, n_tokens, ids, weights, err);
    b->ops->mem_free(b, xb);
    return r;
}
