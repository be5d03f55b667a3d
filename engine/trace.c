/*
 * Routing traces' tools (trace.h): Belady's MIN, summary and replay through
 * a simulated cache, and the synthetic token stream of `moectl gen-trace`.
 * The file format (writer, parser, steps) is trace_file.c's.
 *
 * Belady: the distinct experts of each step are the accesses; the next use
 * of each access is found by one backward pass over them (experts keyed by
 * (layer, expert), mapped to dense ids with a hash table); residents sit in a
 * max-heap on their next use with lazy deletion, rebuilt when stale entries
 * outnumber live ones, so a trace of A accesses takes O(A log capacity).
 *
 * Replay: the trace's steps through a simulated cache (cache.h), the same
 * calls the engine makes: acquire, release, observe.
 *
 * Stream generator: see moe_trace_generate() below.
 */
#include "trace.h"

#include "layer.h"
#include "model.h"
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- Belady's MIN ---------------------------------------------------------------------- */

#define NEVER UINT64_MAX

/* Open-addressing map from (layer, expert) keys to dense ids 0, 1, ... */
struct keymap {
    uint32_t *slot; /* key + 1, 0 empty */
    uint32_t *id;
    uint64_t mask;
    uint32_t n;
};

static int keymap_init(struct keymap *km, uint64_t max_keys)
{
    uint64_t cap = 16;

    while (cap < 2 * max_keys)
        cap *= 2;
    km->slot = calloc(cap, sizeof(*km->slot));
    km->id = malloc(cap * sizeof(*km->id));
    km->mask = cap - 1;
    km->n = 0;
    return km->slot && km->id ? 0 : -ENOMEM;
}

static void keymap_clear(struct keymap *km)
{
    free(km->slot);
    free(km->id);
}

static uint32_t keymap_get(struct keymap *km, uint32_t key)
{
    uint64_t h = ((uint64_t)key * 0x9e3779b97f4a7c15ull) >> 17;

    for (;; h++) {
        uint64_t i = h & km->mask;

        if (km->slot[i] == key + 1)
            return km->id[i];
        if (km->slot[i] == 0) {
            km->slot[i] = key + 1;
            km->id[i] = km->n;
            return km->n++;
        }
    }
}

struct hent {
    uint64_t next; /* position of the expert's next access, NEVER */
    uint32_t id;
};

/* A max-heap on next. */
struct heap {
    struct hent *a;
    size_t n, cap;
};

static void heap_down(struct heap *h, size_t i)
{
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        struct hent tmp;

        if (l < h->n && h->a[l].next > h->a[m].next)
            m = l;
        if (r < h->n && h->a[r].next > h->a[m].next)
            m = r;
        if (m == i)
            return;
        tmp = h->a[i];
        h->a[i] = h->a[m];
        h->a[m] = tmp;
        i = m;
    }
}

static int heap_push(struct heap *h, uint64_t next, uint32_t id)
{
    size_t i;

    if (h->n == h->cap) {
        size_t ncap = h->cap ? 2 * h->cap : 256;
        struct hent *na = realloc(h->a, ncap * sizeof(*na));

        if (!na)
            return -ENOMEM;
        h->a = na;
        h->cap = ncap;
    }
    i = h->n++;
    h->a[i].next = next;
    h->a[i].id = id;
    while (i > 0 && h->a[(i - 1) / 2].next < h->a[i].next) {
        struct hent tmp = h->a[i];

        h->a[i] = h->a[(i - 1) / 2];
        h->a[(i - 1) / 2] = tmp;
        i = (i - 1) / 2;
    }
    return 0;
}

static struct hent heap_pop(struct heap *h)
{
    struct hent top = h->a[0];

    h->a[0] = h->a[--h->n];
    heap_down(h, 0);
    return top;
}

/* State of one MIN run. */
struct belady {
    uint64_t n_acc;
    uint32_t *acc;  /* [n_acc] dense id of each access */
    uint64_t *next; /* [n_acc] position of the same expert's next access */
    uint64_t n_steps;
    uint64_t *step_start; /* [n_steps + 1] first access of each step */
    uint32_t n_ids;
    bool *resident; /* [n_ids] */
    uint64_t *cur;  /* [n_ids] next use of a resident (its live heap entry), 0 none */
    struct heap heap;
};

static void belady_clear(struct belady *b)
{
    free(b->acc);
    free(b->next);
    free(b->step_start);
    free(b->resident);
    free(b->cur);
    free(b->heap.a);
}

/* Keeps only the live entries of the heap (one per resident). */
static void heap_compact(struct belady *b)
{
    size_t n = 0;

    for (size_t i = 0; i < b->heap.n; i++) {
        struct hent e = b->heap.a[i];

        if (b->resident[e.id] && b->cur[e.id] == e.next)
            b->heap.a[n++] = e;
    }
    b->heap.n = n;
    for (size_t i = n / 2; i-- > 0;)
        heap_down(&b->heap, i);
}

/* Fills the accesses of t: distinct experts per step, with next uses. */
static int belady_prepare(struct belady *b, const struct moe_trace *t, uint64_t capacity,
                          struct moe_error *err)
{
    const int k = t->info.top_k, E = t->info.n_experts;
    struct moe_trace_step *steps = NULL;
    uint64_t *stamp = NULL, *last = NULL, max_acc;
    struct keymap km = {0};
    int r;

    r = moe_trace_steps(t, &steps, &b->n_steps);
    if (r < 0)
        return moe_error_set(err, r, "out of memory for the trace's steps");
    max_acc = t->n_records * (uint64_t)k;
    b->acc = malloc(MOE_MAX(max_acc, 1) * sizeof(*b->acc));
    b->step_start = malloc((b->n_steps + 1) * sizeof(*b->step_start));
    stamp = calloc((size_t)E, sizeof(*stamp));
    r = keymap_init(&km, MOE_MIN(max_acc, (uint64_t)t->info.n_layers * (uint64_t)E));
    if (r < 0 || !b->acc || !b->step_start || !stamp) {
        r = moe_error_set(err, -ENOMEM, "out of memory for %" PRIu64 " accesses", max_acc);
        goto out;
    }
    b->n_acc = 0;
    for (uint64_t s = 0; s < b->n_steps; s++) {
        const struct moe_trace_step *st = &steps[s];
        uint64_t start = b->n_acc;

        b->step_start[s] = start;
        for (uint64_t i = st->first; i < st->first + st->n; i++)
            for (int j = 0; j < k; j++) {
                uint16_t x = t->expert[i * k + j];

                if (stamp[x] == s + 1)
                    continue;
                stamp[x] = s + 1;
                b->acc[b->n_acc++] = keymap_get(&km, (uint32_t)st->layer * (uint32_t)E + x);
            }
        if (b->n_acc - start > capacity) {
            r = moe_error_set(err, -EINVAL,
                              "capacity %" PRIu64 " experts is below the %" PRIu64
                              " distinct experts of step %" PRIu64 " (layer %u, records %" PRIu64
                              " to %" PRIu64 ")",
                              capacity, b->n_acc - start, s, st->layer, st->first,
                              st->first + st->n - 1);
            goto out;
        }
    }
    b->step_start[b->n_steps] = b->n_acc;
    b->n_ids = km.n;
    b->next = malloc(MOE_MAX(b->n_acc, 1) * sizeof(*b->next));
    last = malloc(MOE_MAX(b->n_ids, 1) * sizeof(*last));
    b->resident = calloc(MOE_MAX(b->n_ids, 1), sizeof(*b->resident));
    b->cur = calloc(MOE_MAX(b->n_ids, 1), sizeof(*b->cur));
    if (!b->next || !last || !b->resident || !b->cur) {
        r = moe_error_set(err, -ENOMEM, "out of memory for %" PRIu64 " accesses", b->n_acc);
        goto out;
    }
    for (uint32_t i = 0; i < b->n_ids; i++)
        last[i] = NEVER;
    for (uint64_t p = b->n_acc; p-- > 0;) {
        b->next[p] = last[b->acc[p]];
        last[b->acc[p]] = p;
    }
    r = 0;
out:
    free(steps);
    free(stamp);
    free(last);
    keymap_clear(&km);
    return r;
}

int moe_trace_belady(const struct moe_trace *t, uint64_t capacity, struct moe_belady_result *ret,
                     struct moe_error *err)
{
    struct belady b = {0};
    uint64_t hits = 0, n_resident = 0;
    int r;

    r = belady_prepare(&b, t, capacity, err);
    if (r < 0)
        goto out;
    if (capacity >= b.n_ids) {
        /* Everything fits: only the first access of each expert misses. */
        hits = b.n_acc - b.n_ids;
        goto done;
    }
    for (uint64_t s = 0; s < b.n_steps; s++) {
        const uint64_t first = b.step_start[s], end = b.step_start[s + 1];

        /* Misses make room first.  Until the step's entries are pushed
         * below, its hits keep their heap entries keyed by their positions
         * in this step, nearer than any other resident's next use; and
         * capacity >= the step's experts leaves enough others to evict,
         * so the step's own experts are never chosen. */
        for (uint64_t p = first; p < end; p++) {
            uint32_t id = b.acc[p];

            if (b.resident[id]) {
                hits++;
                continue;
            }
            while (n_resident >= capacity) {
                struct hent v;

                if (b.heap.n == 0) {
                    r = moe_error_set(err, -EFAULT, "belady: no expert to evict at step %" PRIu64,
                                      s);
                    goto out;
                }
                v = heap_pop(&b.heap);

                if (!b.resident[v.id] || b.cur[v.id] != v.next)
                    continue; /* stale */
                if (v.next < end) {
                    /* Our own bug: the argument above failed. */
                    r = moe_error_set(err, -EFAULT, "belady: evicting an expert of step %" PRIu64,
                                      s);
                    goto out;
                }
                b.resident[v.id] = false;
                b.cur[v.id] = 0;
                n_resident--;
            }
            b.resident[id] = true;
            n_resident++;
        }
        for (uint64_t p = first; p < end; p++) {
            b.cur[b.acc[p]] = b.next[p];
            if (heap_push(&b.heap, b.next[p], b.acc[p]) < 0) {
                r = moe_error_set(err, -ENOMEM, "out of memory");
                goto out;
            }
        }
        if (b.heap.n > 2 * n_resident + 1024)
            heap_compact(&b);
    }
done:
    ret->accesses = b.n_acc;
    ret->hits = hits;
    r = 0;
out:
    belady_clear(&b);
    return r;
}

/* ---- summary and replay ---------------------------------------------------------------- */

/* The distinct experts of step s (first-seen order) into out; their count.
 * stamp: [n_experts] scratch, marked with s + 1. */
static int step_experts(const struct moe_trace *t, const struct moe_trace_step *sp, uint64_t s,
                        uint64_t *stamp, int32_t *out)
{
    const int k = t->info.top_k;
    int n = 0;

    for (uint64_t i = sp->first; i < sp->first + sp->n; i++)
        for (int j = 0; j < k; j++) {
            uint16_t x = t->expert[i * k + j];

            if (stamp[x] != s + 1) {
                stamp[x] = s + 1;
                out[n++] = x;
            }
        }
    return n;
}

int moe_trace_summarize(const struct moe_trace *t, struct moe_trace_summary *ret)
{
    const int E = t->info.n_experts;
    struct moe_trace_step *steps = NULL;
    uint64_t *stamp = calloc((size_t)E, sizeof(*stamp));
    struct keymap km = {0};
    bool *layer_seen = calloc((size_t)t->info.n_layers, sizeof(*layer_seen));
    int32_t *tmp = malloc((size_t)E * sizeof(*tmp));
    int r = -ENOMEM;

    memset(ret, 0, sizeof(*ret));
    if (!stamp || !layer_seen || !tmp ||
        keymap_init(&km, MOE_MIN(t->n_records * (uint64_t)t->info.top_k,
                                 (uint64_t)t->info.n_layers * (uint64_t)E)) < 0 ||
        moe_trace_steps(t, &steps, &ret->n_steps) < 0)
        goto out;
    for (uint64_t s = 0; s < ret->n_steps; s++) {
        const struct moe_trace_step *sp = &steps[s];
        int n = step_experts(t, sp, s, stamp, tmp);

        ret->accesses += (uint64_t)n;
        if ((uint32_t)n > ret->max_step) {
            ret->max_step = (uint32_t)n;
            ret->max_step_at = s;
        }
        if (!layer_seen[sp->layer]) {
            layer_seen[sp->layer] = true;
            ret->n_moe_layers++;
        }
        for (int i = 0; i < n; i++)
            keymap_get(&km, (uint32_t)sp->layer * (uint32_t)E + (uint32_t)tmp[i]);
    }
    ret->distinct = km.n;
    r = 0;
out:
    keymap_clear(&km);
    free(steps);
    free(stamp);
    free(layer_seen);
    free(tmp);
    return r;
}

void moe_trace_timing_default(struct moe_trace_timing *tm)
{
    memset(tm, 0, sizeof(*tm));
    tm->disk_bw = MOE_TRACE_DISK_BW;
    tm->disk_latency = MOE_TRACE_DISK_LATENCY;
    tm->compute_bw = MOE_TRACE_COMPUTE_BW;
}

/* The replay's disk and clock (trace.h, struct moe_trace_timing). */
struct sim_disk {
    double xfer;         /* seconds one read holds the disk */
    double latency;      /* seconds from the end of its transfer to ready */
    double now;          /* the current step's start */
    double step_end;     /* when the current step would end without waiting */
    double free_at;      /* when the disk is done with the reads queued */
    double *ready;       /* [n_moe * E]: when each expert's last read is ready */
    int E;
    uint64_t reads;
};

static void sim_read(void *arg, int model, int layer, int expert, bool prefetch)
{
    struct sim_disk *d = arg;
    double start = MOE_MAX(d->now, d->free_at);

    (void)model, (void)prefetch; /* one FIFO queue for both */
    d->free_at = start + d->xfer;
    d->ready[(size_t)layer * d->E + expert] = d->free_at + d->latency;
    d->reads++;
}

/* The share of a read of bytes queued now that would still hold the disk
 * when the next step starts (moe_cache_disk.late). */
static double sim_late(void *arg, uint64_t bytes)
{
    struct sim_disk *d = arg;
    double start = MOE_MAX(d->now, d->free_at);

    (void)bytes; /* every read of the replay holds the disk d->xfer */
    if (!(d->xfer > 0))
        return 0.0;
    return MOE_MIN(1.0, MOE_MAX(0.0, (start + d->xfer - d->step_end) / d->xfer));
}

int moe_trace_replay(const struct moe_trace *t, uint64_t capacity,
                     const struct moe_cache_config *cfg, const struct moe_trace_timing *tm,
                     struct moe_trace_replay_result *ret, struct moe_error *err)
{
    const int L = t->info.n_layers, E = t->info.n_experts, K = t->info.top_k;
    const uint64_t eb = t->info.expert_bytes ? t->info.expert_bytes : 1;
    /* The cache gives a shape's expert a slot of its bytes rounded up to
     * the pager's alignment: capacity is counted in those slots. */
    const uint64_t slot = (eb + MOE_PAGER_ALIGN - 1) / MOE_PAGER_ALIGN * MOE_PAGER_ALIGN;
    struct moe_cache_config sim = *cfg;
    struct moe_trace_timing deftm;
    struct sim_disk disk = {0};
    struct moe_cache_disk dm = {&disk, sim_read, sim_late};
    uint64_t read_bytes;
    double *ready = NULL;
    struct moe_cache_stats stats = {0};
    struct moe_trace_step *steps = NULL;
    struct moe_cache_ref *refs = NULL;
    struct moe_cache *c = NULL;
    uint64_t n_steps, *stamp = NULL;
    int32_t *exp = NULL, *ids = NULL;
    int *compact = NULL, n_moe = 0, model, r;
    size_t ids_cap = 0;

    memset(ret, 0, sizeof(*ret));
    if (capacity > UINT64_MAX / slot)
        return moe_error_set(err, -EOVERFLOW,
                             "capacity %" PRIu64 " experts of %" PRIu64 " bytes: too large",
                             capacity, slot);
    if (!tm) {
        moe_trace_timing_default(&deftm);
        tm = &deftm;
    }
    if (!(tm->disk_bw > 0) || !(tm->disk_latency >= 0) || !(tm->compute_step >= 0) ||
        !(tm->compute_bw >= 0) || isinf(tm->disk_latency) || isinf(tm->compute_step))
        return moe_error_set(err, -EINVAL,
                             "timing: disk %g B/s, latency %g s, compute %g s + bytes / %g B/s: "
                             "expected a positive bandwidth and finite times >= 0",
                             tm->disk_bw, tm->disk_latency, tm->compute_step, tm->compute_bw);
    read_bytes = tm->expert_bytes ? tm->expert_bytes : t->info.expert_bytes;
    disk.xfer = (double)read_bytes / tm->disk_bw;
    disk.latency = tm->disk_latency;
    disk.E = E;
    sim.host_bytes = capacity * slot;
    sim.simulate = true;
    sim.disk = &dm;
    compact = malloc((size_t)L * sizeof(*compact));
    stamp = calloc((size_t)E, sizeof(*stamp));
    exp = malloc((size_t)E * sizeof(*exp));
    refs = calloc((size_t)E, sizeof(*refs));
    if (!compact || !stamp || !exp || !refs || moe_trace_steps(t, &steps, &n_steps) < 0) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    /* The cache sees the MoE layers of the trace only, in order. */
    for (int l = 0; l < L; l++)
        compact[l] = -1;
    for (uint64_t i = 0; i < t->n_records; i++)
        compact[t->layer[i]] = 0;
    for (int l = 0; l < L; l++)
        if (compact[l] == 0)
            compact[l] = n_moe++;
    if (n_moe == 0)
        goto done;
    ready = calloc((size_t)n_moe * E, sizeof(*ready));
    if (!ready) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    disk.ready = ready;
    ret->tokens = t->n_records / (uint64_t)n_moe;
    r = moe_cache_create(&sim, &c, err);
    if (r < 0)
        goto out;
    r = moe_cache_add_shape(c, t->info.model[0] ? t->info.model : "trace", n_moe, E, K, eb, &model,
                            err);
    if (r < 0)
        goto out;
    for (uint64_t s = 0; s < n_steps; s++) {
        const struct moe_trace_step *sp = &steps[s];
        const int layer = compact[sp->layer];
        const int n = step_experts(t, sp, s, stamp, exp);
        const size_t n_ids = (size_t)sp->n * K;
        bool has_next;

        if (sp->n > MOE_MAX_TOKENS) {
            r = moe_error_set(err, -E2BIG,
                              "step %" PRIu64 " (layer %u): %" PRIu32 " records in one batch, "
                              "over the engine's %d tokens",
                              s, sp->layer, sp->n, MOE_MAX_TOKENS);
            goto out;
        }
        if ((uint64_t)n > capacity) {
            r = moe_error_set(err, -EINVAL,
                              "capacity %" PRIu64 " experts is below the %d distinct experts "
                              "of step %" PRIu64 " (layer %u)",
                              capacity, n, s, sp->layer);
            goto out;
        }
        const double compute =
            tm->compute_step +
            (tm->compute_bw > 0 ? (double)n * (double)read_bytes / tm->compute_bw : 0.0);
        double ready_all;

        /* The step starts: its demand reads queue at disk.now. */
        disk.step_end = disk.now + compute;
        r = moe_cache_acquire(c, model, layer, exp, n, refs, err);
        if (r < 0) {
            moe_error_prefix(err, "step %" PRIu64 " (layer %u)", s, sp->layer);
            goto out;
        }
        for (int i = 0; i < n; i++) {
            if (refs[i].status != 0) {
                r = refs[i].status;
                moe_cache_release(c, refs, n);
                r = moe_error_set(err, r < 0 ? r : -EIO,
                                  "step %" PRIu64 " (layer %u): expert %d is not ready in "
                                  "simulation: %s",
                                  s, sp->layer, refs[i].expert, strerror(r < 0 ? -r : EIO));
                goto out;
            }
            ret->hits += refs[i].hit;
        }
        ret->accesses += (uint64_t)n;
        ready_all = disk.now;
        for (int i = 0; i < n; i++) {
            double at = ready[(size_t)layer * E + exp[i]];

            ret->late_hits += refs[i].hit && at > disk.now;
            ready_all = MOE_MAX(ready_all, at);
        }
        ret->stall += ready_all - disk.now;
        ret->compute += compute;
        disk.step_end = ready_all + compute;
        if (2 * n_ids > ids_cap) {
            int32_t *ni = realloc(ids, 2 * n_ids * sizeof(*ids));

            if (!ni) {
                r = moe_error_set(err, -ENOMEM, "out of memory");
                goto out;
            }
            ids = ni;
            ids_cap = 2 * n_ids;
        }
        for (size_t i = 0; i < n_ids; i++)
            ids[i] = t->expert[sp->first * K + i];
        has_next = t->next && t->next[sp->first * K] != MOE_TRACE_NO_EXPERT;
        for (size_t i = 0; has_next && i < n_ids; i++)
            ids[n_ids + i] = t->next[sp->first * K + i];
        /* As a forward does: the routing is observed (and the next layer
         * prefetched) while the step still holds its experts. */
        moe_cache_observe_ahead(c, model, layer, ids, has_next ? ids + n_ids : NULL, (int)sp->n, K);
        moe_cache_release(c, refs, n);
        disk.now = disk.step_end;
    }
    ret->bytes_read = disk.reads * read_bytes;
    r = moe_cache_snapshot(c, &stats);
    if (r < 0) {
        r = moe_error_set(err, r, "out of memory");
        goto out;
    }
    ret->c = stats.total;
    moe_cache_stats_clear(&stats);
done:
    r = 0;
out:
    moe_cache_free(c);
    free(ready);
    free(steps);
    free(compact);
    free(stamp);
    free(exp);
    free(refs);
    free(ids);
    return r;
}

/* ---- synthetic stream ------------------------------------------------------------------ */

/*
 * Generator parameters (see moe_trace_generate in trace.h).  Values are
 * uniform in [-sqrt(3), sqrt(3)] (variance 1), made with IEEE arithmetic
 * and sqrt only, so a seed gives the same states whatever the libm.
 *
 * Input x_t = W_TOPIC * topic mix + W_TOKEN * AR(1) part + W_NOISE * noise,
 * each of unit variance per element, so x_t's is about 1 (0.45^2 + 0.35^2 +
 * 0.82^2).  Chosen so that on genmodel's routers consecutive tokens share
 * experts clearly more often than independent tokens would (Mixtral-like: a
 * top-2 slot reused 49% of the time against 34% for independent tokens of
 * the same popularity; LRU with a quarter of the experts resident hits about
 * 44%) without collapsing onto a few experts: the layers' fixed directions
 * are kept small, since a large common offset in the residual makes the
 * experts aligned with it win nearly always.
 */
#define GEN_TOPICS 8            /* topic directions */
#define GEN_SWITCH_PER_TOKEN 40 /* mean tokens between topic changes */
#define GEN_MIX_RATE 0.12       /* the mixture's step towards the current topic per token */
#define GEN_W_TOPIC 0.45        /* weights of topic, per-token part and noise in x_t */
#define GEN_W_TOKEN 0.35
#define GEN_W_NOISE 0.82
#define GEN_TOKEN_RHO 0.8    /* AR(1) coefficient of the per-token part */
#define GEN_LAYER_GAMMA 0.20 /* size of each layer's perturbation of the residual */
#define GEN_LAYER_DIR 0.3    /* weight of its fixed direction, against its token part */
#define GEN_LAYER_RHO 0.7    /* AR(1) coefficient over tokens of its token part */

enum gen_tag { TAG_TOPIC_DIR = 1, TAG_SWITCH, TAG_TOKEN, TAG_NOISE, TAG_LAYER_DIR, TAG_LAYER };

struct rng {
    uint64_t s[4];
};

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* A generator for (seed, tag, a, b): counter-based, so that a token's
 * values do not depend on the order tokens are generated in. */
static void rng_seed(struct rng *g, uint64_t seed, uint64_t tag, uint64_t a, uint64_t b)
{
    uint64_t x = mix64(mix64(mix64(seed ^ 0x6d6f6574726163ull) ^ tag) ^ a) ^ b;

    for (int i = 0; i < 4; i++)
        g->s[i] = mix64(x += 0x9e3779b97f4a7c15ull);
}

static uint64_t rng_next(struct rng *g)
{
    uint64_t *s = g->s, res = ((s[1] * 5) << 7 | (s[1] * 5) >> 57) * 9, t = s[1] << 17;

    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = s[3] << 45 | s[3] >> 19;
    return res;
}

/* Uniform in [0, 1). */
static double rng_unit(struct rng *g)
{
    return (double)(rng_next(g) >> 11) * 0x1p-53;
}

/* n values of mean 0 and variance 1 (uniform). */
static void rng_fill(struct rng *g, float *out, int n)
{
    const double a = 2.0 * sqrt(3.0);

    for (int i = 0; i < n; i++)
        out[i] = (float)((rng_unit(g) - 0.5) * a);
}

struct gen {
    int H, L;
    uint64_t seed;
    float *topic;     /* [GEN_TOPICS][H] */
    float *layer_dir; /* [L][H] fixed direction of each layer's perturbation */
    float *layer_ar;  /* [L][H] AR(1) token-dependent part of each layer's perturbation */
    float *token_ar;  /* [H] AR(1) per-token component */
    float *tmp;       /* [H] */
    double mix[GEN_TOPICS];
    int cur_topic;
    uint32_t next_token; /* the token stream_next makes next */
};

static void gen_clear(struct gen *g)
{
    free(g->topic);
    free(g->layer_dir);
    free(g->layer_ar);
    free(g->token_ar);
    free(g->tmp);
}

static int gen_init(struct gen *g, int H, int L, uint64_t seed)
{
    struct rng r;

    memset(g, 0, sizeof(*g));
    g->H = H;
    g->L = L;
    g->seed = seed;
    g->topic = malloc((size_t)GEN_TOPICS * H * sizeof(float));
    g->layer_dir = malloc((size_t)L * H * sizeof(float));
    g->layer_ar = malloc((size_t)L * H * sizeof(float));
    g->token_ar = malloc((size_t)H * sizeof(float));
    g->tmp = malloc((size_t)H * sizeof(float));
    if (!g->topic || !g->layer_dir || !g->layer_ar || !g->token_ar || !g->tmp)
        return -ENOMEM;
    for (int i = 0; i < GEN_TOPICS; i++) {
        rng_seed(&r, seed, TAG_TOPIC_DIR, (uint64_t)i, 0);
        rng_fill(&r, g->topic + (size_t)i * H, H);
    }
    for (int l = 0; l < L; l++) {
        rng_seed(&r, seed, TAG_LAYER_DIR, (uint64_t)l, 0);
        rng_fill(&r, g->layer_dir + (size_t)l * H, H);
        rng_seed(&r, seed, TAG_LAYER, (uint64_t)l, UINT64_MAX);
        rng_fill(&r, g->layer_ar + (size_t)l * H, H);
    }
    rng_seed(&r, seed, TAG_TOKEN, UINT64_MAX, 0);
    rng_fill(&r, g->token_ar, H);
    rng_seed(&r, seed, TAG_SWITCH, UINT64_MAX, 0);
    g->cur_topic = (int)(rng_next(&r) % GEN_TOPICS);
    g->mix[g->cur_topic] = 1.0;
    return 0;
}

/* The next token's input state x (before the first layer), into x[H]. */
static void gen_token(struct gen *g, float *x)
{
    const uint32_t t = g->next_token++;
    const int H = g->H;
    const double ar = sqrt(1.0 - GEN_TOKEN_RHO * GEN_TOKEN_RHO);
    double norm = 0, w[GEN_TOPICS];
    struct rng r;

    /* The topic changes now and then; the mixture follows it smoothly. */
    rng_seed(&r, g->seed, TAG_SWITCH, t, 0);
    if (rng_unit(&r) < 1.0 / GEN_SWITCH_PER_TOKEN)
        g->cur_topic = (int)(rng_next(&r) % GEN_TOPICS);
    for (int i = 0; i < GEN_TOPICS; i++) {
        g->mix[i] += GEN_MIX_RATE * ((i == g->cur_topic) - g->mix[i]);
        norm += g->mix[i] * g->mix[i];
    }
    /* Unit variance per element whatever the mixture: topics are nearly
     * orthogonal, so the mix's variance is its squared norm. */
    norm = sqrt(norm);
    for (int i = 0; i < GEN_TOPICS; i++)
        w[i] = GEN_W_TOPIC * g->mix[i] / norm;

    rng_seed(&r, g->seed, TAG_TOKEN, t, 0);
    rng_fill(&r, g->tmp, H);
    for (int i = 0; i < H; i++)
        g->token_ar[i] = (float)(GEN_TOKEN_RHO * g->token_ar[i] + ar * g->tmp[i]);
    rng_seed(&r, g->seed, TAG_NOISE, t, 0);
    rng_fill(&r, g->tmp, H);
    for (int i = 0; i < H; i++) {
        double v = GEN_W_TOKEN * g->token_ar[i] + GEN_W_NOISE * g->tmp[i];

        for (int j = 0; j < GEN_TOPICS; j++)
            v += w[j] * g->topic[(size_t)j * H + i];
        x[i] = (float)v;
    }
}

/* h += the perturbation of layer l for token t (tokens in order per layer). */
static void gen_layer(struct gen *g, int l, uint32_t t, float *h)
{
    const int H = g->H;
    const double ar = sqrt(1.0 - GEN_LAYER_RHO * GEN_LAYER_RHO);
    float *st = g->layer_ar + (size_t)l * H, *dir = g->layer_dir + (size_t)l * H;
    struct rng r;

    rng_seed(&r, g->seed, TAG_LAYER, (uint64_t)l, t);
    rng_fill(&r, g->tmp, H);
    for (int i = 0; i < H; i++) {
        st[i] = (float)(GEN_LAYER_RHO * st[i] + ar * g->tmp[i]);
        h[i] += (float)(GEN_LAYER_GAMMA * (GEN_LAYER_DIR * dir[i] + st[i]));
    }
}

/* out = h scaled to unit root mean square, as the RMSNorm before a router. */
static void rms_norm(const float *h, int H, float *out)
{
    double ss = 0;
    float s;

    for (int i = 0; i < H; i++)
        ss += (double)h[i] * h[i];
    s = (float)(1.0 / sqrt(ss / H + 1e-6));
    for (int i = 0; i < H; i++)
        out[i] = h[i] * s;
}

int moe_trace_generate(struct moe_engine *e, const struct moe_model *m, int n_tokens, uint64_t seed,
                       int batch, struct moe_trace_writer *w, struct moe_error *err)
{
    const int H = m->cfg.hidden, L = m->cfg.n_layers, K = m->cfg.top_k;
    const struct moe_trace_info *wi = moe_trace_writer_info(w);
    struct gen g;
    float *h = NULL, *x = NULL, *wts = NULL;
    int32_t *ids = NULL, *nxt = NULL;
    int r;

    if (n_tokens < 0 || batch < 1 || batch > MOE_TRACE_MAX_BATCH)
        return moe_error_set(err, -EINVAL,
                             "%d tokens in batches of %d: expected >= 0 tokens and "
                             "a batch of 1 to %d",
                             n_tokens, batch, MOE_TRACE_MAX_BATCH);
    if (wi->n_layers != L || wi->n_experts != m->cfg.n_experts || wi->top_k != K)
        return moe_error_set(err, -EINVAL,
                             "the trace is for %d layers x %d experts, top-%d; the model has "
                             "%d x %d, top-%d",
                             wi->n_layers, wi->n_experts, wi->top_k, L, m->cfg.n_experts, K);
    r = gen_init(&g, H, L, seed);
    h = malloc((size_t)batch * H * sizeof(*h));
    x = malloc((size_t)batch * H * sizeof(*x));
    ids = malloc((size_t)batch * K * sizeof(*ids));
    nxt = malloc((size_t)batch * K * sizeof(*nxt));
    wts = malloc((size_t)batch * K * sizeof(*wts));
    if (r < 0 || !h || !x || !ids || !nxt || !wts) {
        r = moe_error_set(err, -ENOMEM, "out of memory for the token stream (hidden %d)", H);
        goto out;
    }
    for (int t0 = 0; t0 < n_tokens; t0 += batch) {
        const int B = MOE_MIN(batch, n_tokens - t0);

        for (int b = 0; b < B; b++)
            gen_token(&g, h + (size_t)b * H);
        for (int l = 0; l < L; l++) {
            if (m->layers[l].is_moe) {
                for (int b = 0; b < B; b++)
                    rms_norm(h + (size_t)b * H, H, x + (size_t)b * H);
                r = moe_layer_route(e, l, x, B, ids, wts, err);
                if (r < 0) {
                    moe_error_prefix(err, "tokens %d to %d", t0, t0 + B - 1);
                    goto out;
                }
                /* Lookahead: the next MoE layer's router on this layer's
                 * input, as the engine computes it for its prefetcher. */
                int nl = l + 1;

                while (nl < L && !m->layers[nl].is_moe)
                    nl++;
                if (wi->lookahead && nl < L) {
                    r = moe_layer_route(e, nl, x, B, nxt, wts, err);
                    if (r < 0)
                        goto out;
                }
                r = moe_trace_write_ahead(w, (uint32_t)t0, l, ids,
                                          wi->lookahead && nl < L ? nxt : NULL, B);
                if (r < 0) {
                    r = moe_error_set(err, r, "writing the trace (layer %d, token %d): %s", l, t0,
                                      strerror(-r));
                    goto out;
                }
            }
            for (int b = 0; b < B && l + 1 < L; b++)
                gen_layer(&g, l, (uint32_t)(t0 + b), h + (size_t)b * H);
        }
    }
    r = 0;
out:
    gen_clear(&g);
    free(h);
    free(x);
    free(ids);
    free(nxt);
    free(wts);
    return r;
}
