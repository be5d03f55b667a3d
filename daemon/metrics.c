/*
 * The Prometheus endpoint (metrics.h).
 *
 * Owns: the request series (a fixed array, appended under m->lock, never
 * removed: readers scan the published prefix without the lock) and the
 * libmicrohttpd daemon.  A scrape runs on libmicrohttpd's one polling
 * thread, so scrapes never overlap; it builds the whole text into a growing
 * buffer that the response frees.
 *
 * Names follow the Prometheus conventions: the moed_ prefix, base units
 * (seconds, bytes) in the name, _total on counters.  Histograms are
 * cumulative here: the series keep per-bucket counts and the scrape sums
 * them, so a family's _count is always its +Inf bucket.
 */
#include "metrics.h"
#include "server.h"

#include "cluster.h"
#include "moed.h"

#include "log.h"
#include "logging.h"
#include "moe.pb-c.h"
#include "rpc_client.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define GRPC_CODES 17 /* OK .. UNAUTHENTICATED */

/* Request latency buckets (upper bounds, ns): 1, 2.5, 5 per decade from
 * 100 us to 10 s; one more slot for what is slower. */
static const uint64_t duration_le_ns[] = {
    100000,   250000,    500000,    1000000,   2500000,    5000000,    10000000,   25000000,
    50000000, 100000000, 250000000, 500000000, 1000000000, 2500000000, 5000000000, 10000000000,
};
#define DURATION_BUCKETS (MOE_ARRAY_SIZE(duration_le_ns) + 1)

/* Page-in latency: the cache's bucket i is [2^i, 2^(i+1)) ns; the buckets
 * below PAGE_IN_FIRST fold into the first emitted (le 2^10 ns, ~1 us), those
 * from PAGE_IN_LAST + 1 on into +Inf (beyond 2^35 ns, ~34 s). */
#define PAGE_IN_FIRST 9
#define PAGE_IN_LAST 34

static const char *const transport_names[MOED_TRANSPORT_COUNT] = {"grpc", "shm"};

/* One (model, transport).  model and transport are written before the
 * series is published and never change; the counters are relaxed atomics
 * (each is a count on its own: a scrape may see one request in requests
 * and not yet in duration, which the next scrape settles). */
struct series {
    char *model; /* "" for requests naming no loaded model */
    enum moed_transport transport;
    _Atomic uint64_t requests;
    _Atomic uint64_t tokens;
    _Atomic uint64_t errors[GRPC_CODES]; /* [0] unused: OK is no error */
    _Atomic uint64_t duration[DURATION_BUCKETS];
    _Atomic uint64_t duration_sum_ns;
};

struct moed_metrics {
    struct moed *d;
    struct MHD_Daemon *httpd; /* NULL until listening */
    int port;
    pthread_mutex_t lock; /* serializes appending to series */
    /* Series published: entries below it are complete.  Release store in
     * series_get() pairs with the acquire loads of readers. */
    _Atomic int n_series;
    struct series series[MOED_METRICS_MAX_SERIES];
};

/* ---- request series ------------------------------------------------------------------ */

static struct series *series_find(struct moed_metrics *m, int n, const char *model,
                                  enum moed_transport t)
{
    for (int i = 0; i < n; i++)
        if (m->series[i].transport == t && strcmp(m->series[i].model, model) == 0)
            return &m->series[i];
    return NULL;
}

/* The series of (model, t), added when new; the model="" one of t when the
 * table is full or out of memory. */
static struct series *series_get(struct moed_metrics *m, const char *model, enum moed_transport t)
{
    /* Acquire: pairs with the release store below, so the entries counted
     * are fully written. */
    int n = atomic_load_explicit(&m->n_series, memory_order_acquire);
    struct series *s = series_find(m, n, model, t);

    if (s)
        return s;
    pthread_mutex_lock(&m->lock);
    /* Relaxed: appends are serialized by m->lock, which we hold. */
    n = atomic_load_explicit(&m->n_series, memory_order_relaxed);
    s = series_find(m, n, model, t);
    if (!s && n < MOED_METRICS_MAX_SERIES) {
        char *name = strdup(model);

        if (name) {
            s = &m->series[n];
            s->model = name;
            s->transport = t;
            /* Release: publishes model and transport written above; pairs
             * with the acquire loads in series_get() and the scrape. */
            atomic_store_explicit(&m->n_series, n + 1, memory_order_release);
        }
    }
    pthread_mutex_unlock(&m->lock);
    if (!s) {
        moe_log_once(MOE_LOG_WARN,
                     "metrics: more than %d (model, transport) series: counting model '%s' "
                     "under model=\"\", ignoring",
                     MOED_METRICS_MAX_SERIES, model);
        s = &m->series[t]; /* created first by moed_metrics_create */
    }
    return s;
}

int moed_metrics_create(struct moed *d, struct moed_metrics **ret)
{
    struct moed_metrics *m = calloc(1, sizeof(*m));

    if (!m)
        return -ENOMEM;
    m->d = d;
    pthread_mutex_init(&m->lock, NULL);
    /* model="" of each transport first: series_get falls back on them. */
    for (int t = 0; t < MOED_TRANSPORT_COUNT; t++) {
        m->series[t].model = strdup("");
        m->series[t].transport = (enum moed_transport)t;
        if (!m->series[t].model) {
            moed_metrics_free(m);
            return -ENOMEM;
        }
        /* Relaxed: nothing else sees m yet. */
        atomic_store_explicit(&m->n_series, t + 1, memory_order_relaxed);
    }
    *ret = m;
    return 0;
}

void moed_metrics_request(struct moed_metrics *m, const char *model, int layer,
                          enum moed_transport t, int code, int tokens, uint64_t duration_ns)
{
    struct series *s;
    size_t b = 0;

    moed_log_request(model, layer, tokens, transport_names[t], moe_rpc_status_name(code),
                     duration_ns);
    if (!m)
        return;
    s = series_get(m, model ? model : "", t);
    while (b < MOE_ARRAY_SIZE(duration_le_ns) && duration_ns > duration_le_ns[b])
        b++;
    /* Relaxed, all of them: independent counts, read by the scrape only. */
    atomic_fetch_add_explicit(&s->requests, 1, memory_order_relaxed);
    if (code == 0)
        atomic_fetch_add_explicit(&s->tokens, (uint64_t)MOE_MAX(tokens, 0), memory_order_relaxed);
    else
        atomic_fetch_add_explicit(&s->errors[code > 0 && code < GRPC_CODES ? code : 2], 1,
                                  memory_order_relaxed);
    atomic_fetch_add_explicit(&s->duration[b], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->duration_sum_ns, duration_ns, memory_order_relaxed);
}

/* ---- the text ------------------------------------------------------------------------- */

struct buf {
    char *p;
    size_t len, cap;
    bool failed; /* out of memory: the scrape answers 500 */
};

static void put(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void put(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (b->failed)
        return;
    if (!b->p) {
        b->cap = 16384;
        b->p = malloc(b->cap);
        if (!b->p) {
            b->failed = true;
            return;
        }
    }
    for (;;) {
        va_start(ap, fmt);
        n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->failed = true;
            return;
        }
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = MOE_MAX(b->cap * 2, b->len + (size_t)n + 1);
        char *p = realloc(b->p, cap);

        if (!p) {
            b->failed = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
}

/* A label value, escaped as the format wants: \\, \" and \n. */
static void put_value(struct buf *b, const char *v)
{
    const char *run = v;

    for (; *v; v++) {
        const char *esc = *v == '\\' ? "\\\\" : *v == '"' ? "\\\"" : *v == '\n' ? "\\n" : NULL;

        if (!esc)
            continue;
        put(b, "%.*s%s", (int)(v - run), run, esc);
        run = v + 1;
    }
    put(b, "%s", run);
}

/* label="value" */
static void put_label(struct buf *b, const char *name, const char *value)
{
    put(b, "%s=\"", name);
    put_value(b, value);
    put(b, "\"");
}

static void family(struct buf *b, const char *name, const char *type, const char *help)
{
    put(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* name value, for a family without labels */
static void sample(struct buf *b, const char *name, double v)
{
    put(b, "%s %.17g\n", name, v);
}

/* name{tier="..."} value */
static void tier_sample(struct buf *b, const char *name, const char *tier, uint64_t v)
{
    put(b, "%s{", name);
    put_label(b, "tier", tier);
    put(b, "} %llu\n", (unsigned long long)v);
}

/* The model and transport labels of a series, without braces. */
static void series_labels(struct buf *b, const struct series *s)
{
    put_label(b, "model", s->model);
    put(b, ",");
    put_label(b, "transport", transport_names[s->transport]);
}

/* model="" shows once it has counted something; the models' series always. */
static bool shown(const struct series *s)
{
    return s->model[0] || atomic_load_explicit(&s->requests, memory_order_relaxed);
}

static void put_requests(struct buf *b, struct moed_metrics *m)
{
    /* Acquire: pairs with the release store in series_get(). */
    int n = atomic_load_explicit(&m->n_series, memory_order_acquire);

    family(b, "moed_requests_total", "counter",
           "Forward requests answered (successfully or not), by model and transport.");
    for (int i = 0; i < n; i++) {
        if (!shown(&m->series[i]))
            continue;
        put(b, "moed_requests_total{");
        series_labels(b, &m->series[i]);
        put(b, "} %llu\n",
            (unsigned long long)atomic_load_explicit(&m->series[i].requests, memory_order_relaxed));
    }
    family(b, "moed_tokens_total", "counter",
           "Tokens of the Forward requests answered successfully, by model and transport.");
    for (int i = 0; i < n; i++) {
        if (!shown(&m->series[i]))
            continue;
        put(b, "moed_tokens_total{");
        series_labels(b, &m->series[i]);
        put(b, "} %llu\n",
            (unsigned long long)atomic_load_explicit(&m->series[i].tokens, memory_order_relaxed));
    }
    family(b, "moed_request_errors_total", "counter",
           "Forward requests answered with an error, by model, transport and gRPC status code.");
    for (int i = 0; i < n; i++)
        for (int c = 1; c < GRPC_CODES; c++) {
            uint64_t v = atomic_load_explicit(&m->series[i].errors[c], memory_order_relaxed);

            if (!v)
                continue;
            put(b, "moed_request_errors_total{");
            series_labels(b, &m->series[i]);
            put(b, ",");
            put_label(b, "code", moe_rpc_status_name(c));
            put(b, "} %llu\n", (unsigned long long)v);
        }
    family(b, "moed_request_duration_seconds", "histogram",
           "Time from receiving a Forward request to answering it, by model and transport.");
    for (int i = 0; i < n; i++) {
        const struct series *s = &m->series[i];
        uint64_t cum = 0;

        if (!shown(s))
            continue;
        for (size_t k = 0; k < DURATION_BUCKETS; k++) {
            cum += atomic_load_explicit(&s->duration[k], memory_order_relaxed);
            put(b, "moed_request_duration_seconds_bucket{");
            series_labels(b, s);
            if (k < MOE_ARRAY_SIZE(duration_le_ns))
                put(b, ",le=\"%.9g\"} %llu\n", (double)duration_le_ns[k] * 1e-9,
                    (unsigned long long)cum);
            else
                put(b, ",le=\"+Inf\"} %llu\n", (unsigned long long)cum);
        }
        put(b, "moed_request_duration_seconds_sum{");
        series_labels(b, s);
        put(b, "} %.17g\n",
            (double)atomic_load_explicit(&s->duration_sum_ns, memory_order_relaxed) * 1e-9);
        put(b, "moed_request_duration_seconds_count{");
        series_labels(b, s);
        put(b, "} %llu\n", (unsigned long long)cum);
    }
}

/* A histogram without labels from the scheduler's power-of-two buckets. */
static void put_batch_histogram(struct buf *b, const char *name, const char *help,
                                const uint64_t *buckets, uint64_t sum)
{
    uint64_t cum = 0;

    family(b, name, "histogram", help);
    for (int i = 0; i < MOE_SCHED_HIST_BUCKETS; i++) {
        cum += buckets[i];
        put(b, "%s_bucket{le=\"%llu\"} %llu\n", name, 1ull << i, (unsigned long long)cum);
    }
    put(b, "%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)cum);
    put(b, "%s_sum %llu\n%s_count %llu\n", name, (unsigned long long)sum, name,
        (unsigned long long)cum);
}

/* The cache counters, by field: one family per {tier} and per {model,layer}. */
struct counter_field {
    const char *tier_name, *layer_name;
    size_t off;
    const char *help;
};

#define CF(f, what)                                                                                \
    {                                                                                              \
        "moed_cache_" #f "_total", "moed_cache_layer_" #f "_total",                                \
            offsetof(struct moe_cache_counters, f), what                                           \
    }

static const struct counter_field counter_fields[] = {
    CF(hits, "Expert acquires that found the expert resident"),
    CF(misses, "Expert acquires that had to page the expert in or wait for it"),
    CF(prefetch_hits, "First uses of a prefetched expert"),
    CF(prefetches, "Prefetch page-ins started"),
    CF(wasted_prefetches, "Prefetched experts evicted before any use"),
    CF(evictions, "Experts evicted"),
    CF(prefetched_bytes, "Bytes of the prefetch page-ins started"),
    CF(wasted_bytes, "Bytes of prefetched experts evicted before any use"),
    CF(warm_loads, "Experts paged in by the warm start"),
    CF(warm_hits, "First uses of an expert the warm start paged in"),
};

static uint64_t field(const struct moe_cache_counters *c, const struct counter_field *f)
{
    uint64_t v;

    memcpy(&v, (const char *)c + f->off, sizeof(v));
    return v;
}

/* Whether each layer of the cache's model id is MoE (dense layers have no
 * experts); every layer is when the model is gone meanwhile. */
static void moe_layers(struct moed *d, const struct moe_cache_model_stats *ms, bool *is_moe)
{
    for (int l = 0; l < ms->n_layers; l++)
        is_moe[l] = true;
    pthread_mutex_lock(&d->lock);
    for (int k = 0; k < d->n_models; k++)
        if (d->models[k]->cache_id == ms->id)
            for (int l = 0; l < ms->n_layers && l < d->models[k]->m->cfg.n_layers; l++)
                is_moe[l] = d->models[k]->m->layers[l].is_moe;
    pthread_mutex_unlock(&d->lock);
}

/* The per-layer sums of every model: [model][layer], NULL for no memory. */
static struct moe_cache_counters *layer_sums(struct moed *d, const struct moe_cache_stats *s,
                                             bool *is_moe)
{
    size_t n = 0, at = 0;
    struct moe_cache_counters *sum;

    for (int i = 0; i < s->n_models; i++)
        n += (size_t)s->models[i].n_layers;
    sum = calloc(MOE_MAX(n, 1), sizeof(*sum));
    if (!sum)
        return NULL;
    for (int i = 0; i < s->n_models; i++) {
        const struct moe_cache_model_stats *ms = &s->models[i];

        moe_layers(d, ms, is_moe + at);
        for (int l = 0; l < ms->n_layers; l++, at++) {
            if (!is_moe[at])
                continue;
            for (int x = 0; x < ms->n_experts; x++) {
                const struct moe_cache_counters *c = &ms->experts[(size_t)l * ms->n_experts + x].c;

                for (size_t f = 0; f < MOE_ARRAY_SIZE(counter_fields); f++) {
                    uint64_t v = field(&sum[at], &counter_fields[f]) + field(c, &counter_fields[f]);

                    memcpy((char *)&sum[at] + counter_fields[f].off, &v, sizeof(v));
                }
            }
        }
    }
    return sum;
}

static void put_cache(struct buf *b, struct moed *d, const struct moe_cache_stats *s)
{
    struct moe_cache_counters *sums;
    bool *is_moe;
    size_t n = 0;

    for (int i = 0; i < s->n_models; i++)
        n += (size_t)s->models[i].n_layers;
    is_moe = calloc(MOE_MAX(n, 1), sizeof(*is_moe));
    sums = is_moe ? layer_sums(d, s, is_moe) : NULL;
    if (!sums) {
        b->failed = true;
        goto out;
    }
    for (size_t f = 0; f < MOE_ARRAY_SIZE(counter_fields); f++) {
        const struct counter_field *cf = &counter_fields[f];
        char help[160];
        size_t at = 0;

        snprintf(help, sizeof(help), "%s, by cache tier.", cf->help);
        family(b, cf->tier_name, "counter", help);
        for (int k = 0; k < s->n_tiers; k++)
            tier_sample(b, cf->tier_name, s->tiers[k].name, field(&s->tiers[k].c, cf));
        snprintf(help, sizeof(help), "%s, over every tier, by model and MoE layer.", cf->help);
        family(b, cf->layer_name, "counter", help);
        for (int i = 0; i < s->n_models; i++)
            for (int l = 0; l < s->models[i].n_layers; l++, at++) {
                if (!is_moe[at])
                    continue;
                put(b, "%s{", cf->layer_name);
                put_label(b, "model", s->models[i].name);
                put(b, ",layer=\"%d\"} %llu\n", l, (unsigned long long)field(&sums[at], cf));
            }
    }
    family(b, "moed_cache_resident_bytes", "gauge",
           "Bytes of experts resident or being paged in, by cache tier.");
    for (int k = 0; k < s->n_tiers; k++)
        tier_sample(b, "moed_cache_resident_bytes", s->tiers[k].name, s->tiers[k].used);
    family(b, "moed_cache_capacity_bytes", "gauge", "Capacity of each cache tier in bytes.");
    for (int k = 0; k < s->n_tiers; k++)
        tier_sample(b, "moed_cache_capacity_bytes", s->tiers[k].name, s->tiers[k].capacity);
    family(b, "moed_cache_resident_experts", "gauge", "Experts resident, by cache tier.");
    for (int k = 0; k < s->n_tiers; k++)
        tier_sample(b, "moed_cache_resident_experts", s->tiers[k].name, s->tiers[k].resident);
    family(b, "moed_page_in_bytes_total", "counter", "Bytes paged into each cache tier.");
    for (int k = 0; k < s->n_tiers; k++)
        tier_sample(b, "moed_page_in_bytes_total", s->tiers[k].name, s->tiers[k].c.bytes_paged);
    family(b, "moed_page_in_errors_total", "counter",
           "Page-ins that failed (I/O error, short file, checksum), by cache tier.");
    for (int k = 0; k < s->n_tiers; k++)
        tier_sample(b, "moed_page_in_errors_total", s->tiers[k].name, s->tiers[k].c.page_in_errors);
    family(b, "moed_page_in_duration_seconds", "histogram",
           "Time to page one expert into a cache tier.");
    for (int k = 0; k < s->n_tiers; k++) {
        const struct moe_latency *lat = &s->tiers[k].latency;
        uint64_t cum = 0;

        for (int i = 0; i < MOE_HIST_BUCKETS; i++) {
            cum += lat->buckets[i];
            if (i < PAGE_IN_FIRST || i > PAGE_IN_LAST)
                continue;
            put(b, "moed_page_in_duration_seconds_bucket{");
            put_label(b, "tier", s->tiers[k].name);
            /* bucket i ends below 2^(i+1) ns */
            put(b, ",le=\"%.12g\"} %llu\n", (double)(1ull << (i + 1)) * 1e-9,
                (unsigned long long)cum);
        }
        put(b, "moed_page_in_duration_seconds_bucket{");
        put_label(b, "tier", s->tiers[k].name);
        put(b, ",le=\"+Inf\"} %llu\n", (unsigned long long)cum);
        put(b, "moed_page_in_duration_seconds_sum{");
        put_label(b, "tier", s->tiers[k].name);
        put(b, "} %.17g\n", (double)lat->sum_ns * 1e-9);
        put(b, "moed_page_in_duration_seconds_count{");
        put_label(b, "tier", s->tiers[k].name);
        put(b, "} %llu\n", (unsigned long long)cum);
    }
    family(b, "moed_bad_experts", "gauge",
           "Experts marked bad after a failed page-in (moectl retry clears them), by model.");
    for (int i = 0; i < s->n_models; i++) {
        put(b, "moed_bad_experts{");
        put_label(b, "model", s->models[i].name);
        put(b, "} %d\n", s->models[i].bad_experts);
    }
out:
    free(is_moe);
    free(sums);
}

/* The whole text of one scrape into b. */
/* name{peer="..."} value */
static void peer_sample(struct buf *b, const char *name, const char *peer, double v)
{
    put(b, "%s{", name);
    put_label(b, "peer", peer);
    put(b, "} %.17g\n", v);
}

/* The cluster: this node's counters (zero without peers) and one series
 * per peer, as Stats has them. */
static void put_cluster(struct buf *b, struct moed *d)
{
    Moe__V1__ClusterCounters k = MOE__V1__CLUSTER_COUNTERS__INIT;
    Moe__V1__PeerInfo **p = NULL;
    size_t n = 0;
    static const struct {
        const char *name, *type, *help;
        size_t off;
    } fields[] = {
        {"moed_cluster_forwards_total", "counter",
         "Requests at this node split across nodes (some of their experts elsewhere).",
         offsetof(Moe__V1__ClusterCounters, forwards)},
        {"moed_cluster_remote_calls_total", "counter", "ForwardExperts sent to other nodes.",
         offsetof(Moe__V1__ClusterCounters, remote_calls)},
        {"moed_cluster_failovers_total", "counter",
         "Calls to other nodes that failed and were served by a replica or here.",
         offsetof(Moe__V1__ClusterCounters, failovers)},
        {"moed_cluster_failovers_local_total", "counter",
         "Of the failovers, those computed here (experts paged in locally).",
         offsetof(Moe__V1__ClusterCounters, failover_local)},
        {"moed_cluster_tokens_remote_total", "counter", "Token rows sent to other nodes.",
         offsetof(Moe__V1__ClusterCounters, tokens_remote)},
        {"moed_cluster_tokens_split_total", "counter", "Token rows of the split requests.",
         offsetof(Moe__V1__ClusterCounters, tokens_total)},
        {"moed_cluster_sent_bytes_total", "counter",
         "ForwardExperts request bytes sent to other nodes.",
         offsetof(Moe__V1__ClusterCounters, bytes_sent)},
        {"moed_cluster_received_bytes_total", "counter",
         "ForwardExperts answer bytes received from other nodes.",
         offsetof(Moe__V1__ClusterCounters, bytes_received)},
        {"moed_cluster_served_calls_total", "counter", "ForwardExperts answered for other nodes.",
         offsetof(Moe__V1__ClusterCounters, peer_calls_served)},
        {"moed_cluster_nccl_fallbacks_total", "counter",
         "NCCL transfers that failed and went over gRPC.",
         offsetof(Moe__V1__ClusterCounters, nccl_fallbacks)},
        {"moed_cluster_strays_evicted_total", "counter",
         "Copies of experts held elsewhere given back once a holder was up.",
         offsetof(Moe__V1__ClusterCounters, strays_evicted)},
        {"moed_cluster_placement_version", "gauge",
         "Bumped when the membership or the replicas change.",
         offsetof(Moe__V1__ClusterCounters, placement_version)},
    };

    moed_cluster_counters(d, &k);
    for (size_t i = 0; i < MOE_ARRAY_SIZE(fields); i++) {
        uint64_t v;

        memcpy(&v, (const char *)&k + fields[i].off, sizeof(v));
        family(b, fields[i].name, fields[i].type, fields[i].help);
        sample(b, fields[i].name, (double)v);
    }
    if (moed_cluster_peers(d, &p, &n) < 0 || !n) {
        moed_cluster_free_peers(p, n);
        return;
    }
    family(b, "moed_peer_up", "gauge", "1 while the peer answers its pings, else 0.");
    for (size_t i = 0; i < n; i++)
        peer_sample(b, "moed_peer_up", p[i]->name, strcmp(p[i]->state, "up") == 0);
    family(b, "moed_peer_rtt_seconds", "gauge", "The peer's last ping round trip.");
    for (size_t i = 0; i < n; i++)
        peer_sample(b, "moed_peer_rtt_seconds", p[i]->name, (double)p[i]->rtt_ns * 1e-9);
    family(b, "moed_peer_calls_total", "counter", "ForwardExperts sent to the peer.");
    for (size_t i = 0; i < n; i++)
        peer_sample(b, "moed_peer_calls_total", p[i]->name, (double)p[i]->calls);
    family(b, "moed_peer_calls_failed_total", "counter", "ForwardExperts to the peer that failed.");
    for (size_t i = 0; i < n; i++)
        peer_sample(b, "moed_peer_calls_failed_total", p[i]->name, (double)p[i]->calls_failed);
    family(b, "moed_peer_nccl_ready", "gauge",
           "1 while token rows to the peer go over NCCL, else 0 (gRPC).");
    for (size_t i = 0; i < n; i++)
        peer_sample(b, "moed_peer_nccl_ready", p[i]->name,
                    p[i]->nccl && strcmp(p[i]->nccl, "ready") == 0);
    moed_cluster_free_peers(p, n);
}

static void scrape(struct moed_metrics *m, struct buf *b)
{
    struct moed *d = m->d;
    struct moe_cache_stats cs;
    struct moe_sched_stats ss;
    struct moe_shm_server_stats shm;
    char names[MOED_MAX_MODELS][256];
    int n_models;

    /* Loaded models show from the start, with zero requests. */
    pthread_mutex_lock(&d->lock);
    n_models = d->n_models;
    for (int i = 0; i < n_models; i++)
        snprintf(names[i], sizeof(names[i]), "%s", d->models[i]->name);
    pthread_mutex_unlock(&d->lock);
    for (int i = 0; i < n_models; i++)
        series_get(m, names[i], MOED_TRANSPORT_GRPC);

    family(b, "moed_info", "gauge", "moed's version, in the version label; the value is 1.");
    put(b, "moed_info{");
    put_label(b, "version", MOED_VERSION);
    put(b, "} 1\n");
    family(b, "moed_uptime_seconds", "gauge", "Seconds since moed started.");
    sample(b, "moed_uptime_seconds", (double)(moe_now_ns() - d->t_start) * 1e-9);
    family(b, "moed_failed", "gauge",
           "1 once the backend's device is lost (a CUDA error that cannot be recovered): moed "
           "takes no requests and exits to be restarted.");
    sample(b, "moed_failed", atomic_load(&d->state) == MOED_FAILED);
    family(b, "moed_models", "gauge", "Models loaded.");
    sample(b, "moed_models", n_models);
    family(b, "moed_in_flight_requests", "gauge",
           "Forward requests accepted and not answered yet (queued or computing).");
    /* Relaxed: a gauge read on its own. */
    sample(b, "moed_in_flight_requests", atomic_load_explicit(&d->in_flight, memory_order_relaxed));
    family(b, "moed_connected_clients", "gauge",
           "gRPC calls in flight (unary calls and open streams), not distinct peers.");
    sample(b, "moed_connected_clients", d->rpc ? moe_rpc_server_in_flight(d->rpc) : 0);
    moe_shm_server_get_stats(d->shm, &shm); /* zeros when there is no shm socket */
    family(b, "moed_shm_sessions", "gauge", "Shared-memory client sessions open now.");
    sample(b, "moed_shm_sessions", shm.sessions);
    family(b, "moed_shm_sessions_opened_total", "counter",
           "Shared-memory sessions opened (closed ones included).");
    sample(b, "moed_shm_sessions_opened_total", (double)shm.sessions_opened);
    family(b, "moed_shm_refused_total", "counter",
           "Shared-memory clients refused: credentials, protocol version or session limit.");
    sample(b, "moed_shm_refused_total", (double)shm.refused);
    family(b, "moed_shm_bad_requests_total", "counter",
           "Shared-memory submissions refused by the descriptor check.");
    sample(b, "moed_shm_bad_requests_total", (double)shm.bad_requests);
    put_requests(b, m);

    moe_sched_get_stats(d->sched, &ss);
    put_batch_histogram(b, "moed_batch_size", "Requests per batch computed.", ss.batch_requests,
                        ss.batch_requests_sum);
    put_batch_histogram(b, "moed_batch_tokens", "Tokens per batch computed.", ss.batch_tokens,
                        ss.batch_tokens_sum);
    put_cluster(b, d);

    if (moe_cache_snapshot(d->cache, &cs) < 0) {
        b->failed = true;
        return;
    }
    put_cache(b, d, &cs);
    moe_cache_stats_clear(&cs);
}

/* ---- HTTP ----------------------------------------------------------------------------- */

static enum MHD_Result answer(struct MHD_Connection *conn, unsigned int status, const char *type,
                              char *body, size_t len)
{
    /* body is malloc'd (or NULL with len 0): the response frees it. */
    struct MHD_Response *r = MHD_create_response_from_buffer_with_free_callback(len, body, free);
    enum MHD_Result ret;

    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    if (status == MHD_HTTP_METHOD_NOT_ALLOWED)
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
    ret = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result answer_text(struct MHD_Connection *conn, unsigned int status,
                                   const char *text)
{
    char *body = strdup(text);

    return answer(conn, status, "text/plain; charset=utf-8", body, body ? strlen(body) : 0);
}

static enum MHD_Result on_http(void *cls, struct MHD_Connection *conn, const char *url,
                               const char *method, const char *version, const char *upload,
                               size_t *upload_size, void **con_cls)
{
    struct moed_metrics *m = cls;
    struct buf b = {0};

    (void)version, (void)upload, (void)upload_size, (void)con_cls;
    /* Probes for orchestrators: alive (the process answers), and ready (it
     * takes forward requests: not draining or stopping). */
    if (strcmp(url, "/healthz") == 0)
        return answer_text(conn, MHD_HTTP_OK, "ok\n");
    if (strcmp(url, "/readyz") == 0) {
        int st = atomic_load_explicit(&m->d->state, memory_order_relaxed);

        char why[sizeof(m->d->fatal_msg) + 64];

        if (st == MOED_SERVING)
            return answer_text(conn, MHD_HTTP_OK, "ready\n");
        if (st == MOED_FAILED)
            snprintf(why, sizeof(why), "not ready: moed failed: %s\n", moed_fatal_reason(m->d));
        else
            snprintf(why, sizeof(why), "not ready: moed is %s\n", moed_state_name(st));
        return answer_text(conn, MHD_HTTP_SERVICE_UNAVAILABLE, why);
    }
    if (strcmp(url, "/metrics") != 0)
        return answer_text(conn, MHD_HTTP_NOT_FOUND,
                           "not found: moed serves /metrics, /healthz and /readyz\n");
    if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
        return answer_text(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "/metrics: GET or HEAD only\n");
    scrape(m, &b);
    if (b.failed) {
        free(b.p);
        moe_log(MOE_LOG_WARN, "metrics: out of memory for a scrape, answering 500");
        return answer_text(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory\n");
    }
    return answer(conn, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", b.p, b.len);
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap)
    __attribute__((format(printf, 2, 0)));

/* libmicrohttpd's messages, into our log. */
static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
    char msg[512];
    size_t n;

    (void)cls;
    vsnprintf(msg, sizeof(msg), fmt, ap);
    n = strlen(msg);
    while (n && msg[n - 1] == '\n')
        msg[--n] = 0;
    moe_log(MOE_LOG_WARN, "metrics: %s", msg);
}

/* Splits "HOST:PORT" or "[V6]:PORT" and binds a listening socket: the fd,
 * or -errno with err. */
static int bind_addr(const char *addr, struct moe_error *err)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE | AI_NUMERICSERV},
                    *ai = NULL;
    char host[256], *port;
    int fd = -1, r, one = 1;

    if (strlen(addr) >= sizeof(host))
        return moe_error_set(err, -EINVAL, "metrics = '%.32s...': address too long", addr);
    snprintf(host, sizeof(host), "%s", addr);
    port = strrchr(host, ':');
    if (!port || port == host || !port[1])
        return moe_error_set(err, -EINVAL, "metrics = '%s': expected HOST:PORT (127.0.0.1:9464)",
                             addr);
    *port++ = 0;
    for (const char *p = port; *p; p++)
        if (*p < '0' || *p > '9' || p - port > 5)
            return moe_error_set(err, -EINVAL, "metrics = '%s': port '%s' is not a number", addr,
                                 port);
    if (atoi(port) > 65535)
        return moe_error_set(err, -EINVAL, "metrics = '%s': port %s is above 65535", addr, port);
    if (host[0] == '[') {
        size_t n = strlen(host);

        if (host[n - 1] != ']')
            return moe_error_set(err, -EINVAL, "metrics = '%s': expected [IPV6]:PORT", addr);
        host[n - 1] = 0;
        memmove(host, host + 1, n - 1);
    }
    r = getaddrinfo(host, port, &hints, &ai);
    if (r != 0)
        return moe_error_set(err, r == EAI_SYSTEM ? -errno : -EADDRNOTAVAIL, "metrics = '%s': %s",
                             addr, gai_strerror(r));
    r = -EADDRNOTAVAIL;
    for (struct addrinfo *a = ai; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            r = -errno;
            continue;
        }
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, 64) == 0)
            break;
        r = -errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(ai);
    if (fd < 0)
        return moe_error_set(err, r, "metrics = '%s': cannot listen: %s", addr, strerror(-r));
    return fd;
}

int moed_metrics_listen(struct moed_metrics *m, const char *addr, struct moe_error *err)
{
    const union MHD_DaemonInfo *info;
    int fd = bind_addr(addr, err);

    if (fd < 0)
        return fd;
    /* libmicrohttpd owns fd from here: MHD_stop_daemon closes it.  A failed
     * start may or may not have closed it: leave it (moed exits then). */
    m->httpd = MHD_start_daemon(
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG, 0, NULL, NULL, on_http, m,
        MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, NULL, MHD_OPTION_LISTEN_SOCKET, fd,
        /* Caps: scrapers are few and quick. */
        MHD_OPTION_CONNECTION_LIMIT, 16u, MHD_OPTION_CONNECTION_TIMEOUT, 10u,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)64 * 1024, MHD_OPTION_END);
    if (!m->httpd)
        return moe_error_set(err, -EIO, "metrics = '%s': libmicrohttpd did not start", addr);
    info = MHD_get_daemon_info(m->httpd, MHD_DAEMON_INFO_BIND_PORT);
    m->port = info ? info->port : 0;
    return 0;
}

int moed_metrics_port(const struct moed_metrics *m)
{
    return m ? m->port : 0;
}

void moed_metrics_stop(struct moed_metrics *m)
{
    if (!m || !m->httpd)
        return;
    MHD_stop_daemon(m->httpd);
    m->httpd = NULL;
    m->port = 0;
}

void moed_metrics_free(struct moed_metrics *m)
{
    if (!m)
        return;
    moed_metrics_stop(m);
    for (int i = 0; i < MOED_METRICS_MAX_SERIES; i++)
        free(m->series[i].model);
    pthread_mutex_destroy(&m->lock);
    free(m);
}
