/*
 * moectl gen-trace and cache-sim: make a routing trace from a model's real
 * routers over a synthetic token stream, and replay a trace through the
 * expert cache (simulated) for each replacement policy, next to Belady's
 * optimum; and trace import, routing recorded by other tools into a trace.
 */
#include "moectl.h"

#include "backend.h"
#include "cache.h"
#include "common.h"
#include "layer.h"
#include "model.h"
#include "safetensors.h"
#include "trace.h"
#include "trace_import.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GEN_TRACE_MAX_TOKENS 100000000

/* ---- gen-trace ------------------------------------------------------------------------- */

static void gen_trace_usage(FILE *f)
{
    fprintf(f,
            "usage: moectl gen-trace --model DIR --tokens N --out FILE [--seed S] [--batch B]\n"
            "                        [--threads N] [-q]\n"
            "\n"
            "Runs the model's routers over a synthetic stream of N tokens and writes the\n"
            "experts each token picks at each MoE layer to FILE (a routing trace, see\n"
            "engine/trace.h), for `moectl cache-sim`.  No expert is read.\n"
            "\n"
            "The stream has temporal locality, as text does: a few topics (random\n"
            "directions) in a slowly drifting mixture (the topic changes every few dozen\n"
            "tokens, smoothly), a per-token part correlated with the previous token's, and\n"
            "noise; through the layers a residual stream (each layer adds a small\n"
            "perturbation), so that consecutive layers see correlated states.\n"
            "\n"
            "  --model DIR   checkpoint or packed store\n"
            "  --tokens N    tokens to generate (1 to %d)\n"
            "  --out FILE    the trace (replaced)\n"
            "  --seed S      seed of the stream (default 1); the same seed gives the same trace\n"
            "  --batch B     tokens routed together (default 1: decode); records come in\n"
            "                decode order: for each batch, every MoE layer in order\n"
            "  --threads N   CPU threads for the router matmuls (default: all)\n"
            "  -q, --quiet   no summary\n",
            GEN_TRACE_MAX_TOKENS);
}

/* The directory's base name: "/models/mixtral/" -> "mixtral". */
static void base_name(const char *dir, char *buf, size_t len)
{
    size_t n = strlen(dir);
    const char *p;

    while (n > 1 && dir[n - 1] == '/')
        n--;
    p = dir + n;
    while (p > dir && p[-1] != '/')
        p--;
    snprintf(buf, len, "%.*s", (int)(dir + n - p), p);
}

static int cmp_int(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;

    return (x > y) - (x < y);
}

/* Prints the one-line summary of the trace at path. */
static int gen_trace_summary(const char *path, int tokens, double secs)
{
    struct moe_error err = {0};
    struct moe_trace *t;
    int L, E, K, n = 0;
    int *used_n = NULL;
    uint8_t *used = NULL;

    if (moe_trace_read(path, &t, &err) < 0) {
        errorf("gen-trace: reading back %s", err.msg);
        return -EIO;
    }
    L = t->info.n_layers;
    E = t->info.n_experts;
    K = t->info.top_k;
    used = calloc((size_t)L * E, 1);
    used_n = calloc((size_t)L, sizeof(int));
    if (!used || !used_n) {
        errorf("gen-trace: out of memory");
        moe_trace_free(t);
        free(used);
        free(used_n);
        return -ENOMEM;
    }
    for (uint64_t i = 0; i < t->n_records; i++)
        for (int j = 0; j < K; j++)
            used[(size_t)t->layer[i] * E + t->expert[i * K + j]] = 1;
    for (int l = 0; l < L; l++) {
        int u = 0;

        for (int e = 0; e < E; e++)
            u += used[(size_t)l * E + e];
        if (u)
            used_n[n++] = u;
    }
    qsort(used_n, (size_t)n, sizeof(int), cmp_int);
    printf("wrote %s: %d tokens, %" PRIu64 " records (%d MoE layers x %d experts, top-%d); "
           "distinct experts used per layer: min %d, median %d, max %d of %d; %.2f s\n",
           path, tokens, t->n_records, n, E, K, n ? used_n[0] : 0, n ? used_n[n / 2] : 0,
           n ? used_n[n - 1] : 0, E, secs);
    moe_trace_free(t);
    free(used);
    free(used_n);
    return 0;
}

int moectl_gen_trace(int argc, char **argv)
{
    static const struct option opts[] = {
        {"model", required_argument, NULL, 'm'},
        {"tokens", required_argument, NULL, 'n'},
        {"out", required_argument, NULL, 'o'},
        {"seed", required_argument, NULL, 's'},
        {"batch", required_argument, NULL, 'b'},
        {"threads", required_argument, NULL, 't'},
        {"quiet", no_argument, NULL, 'q'},
        {"help", no_argument, NULL, 'h'},
        {0},
    };
    const char *dir = NULL, *outp = NULL;
    struct moe_cpu_config cpu = {0};
    struct moe_error err = {0};
    struct moe_model *m = NULL;
    struct moe_backend *b = NULL;
    struct moe_engine *e = NULL;
    struct moe_trace_writer *w = NULL;
    struct moe_trace_info info;
    uint64_t seed = 1, t0;
    int tokens = 0, batch = 1, c, ret = 1;
    bool quiet = false;
    char name[64];

    while ((c = getopt_long(argc, argv, "qh", opts, NULL)) != -1) {
        switch (c) {
        case 'm':
            dir = optarg;
            break;
        case 'n':
            if (parse_int("--tokens", optarg, 1, GEN_TRACE_MAX_TOKENS, &tokens) < 0)
                return 2;
            break;
        case 'o':
            outp = optarg;
            break;
        case 's':
            if (parse_u64("--seed", optarg, &seed) < 0)
                return 2;
            break;
        case 'b':
            if (parse_int("--batch", optarg, 1, MOE_TRACE_MAX_BATCH, &batch) < 0)
                return 2;
            break;
        case 't':
            if (parse_int("--threads", optarg, 1, 1024, &cpu.n_threads) < 0)
                return 2;
            break;
        case 'q':
            quiet = true;
            break;
        case 'h':
            gen_trace_usage(stdout);
            return 0;
        default:
            gen_trace_usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        errorf("gen-trace: unexpected argument '%s'", argv[optind]);
        return 2;
    }
    if (!dir || !outp || tokens == 0) {
        errorf("gen-trace: --model, --tokens and --out are required (see moectl gen-trace "
               "--help)");
        return 2;
    }

    t0 = moe_now_ns();
    if (moe_model_open(dir, &m, &err) < 0) {
        errorf("gen-trace: %s", err.msg);
        goto out;
    }
    if (moe_backend_cpu_init(&cpu, &b, &err) < 0) {
        errorf("gen-trace: %s", err.msg);
        goto out;
    }
    if (moe_engine_init(m, b, &e) < 0) {
        errorf("gen-trace: out of memory");
        goto out;
    }
    base_name(dir, name, sizeof(name));
    moe_trace_info_from_model(m, name, &info);
    if (moe_trace_writer_open(outp, &info, &w, &err) < 0) {
        errorf("gen-trace: %s", err.msg);
        goto out;
    }
    if (moe_trace_generate(e, m, tokens, seed, batch, w, &err) < 0) {
        errorf("gen-trace: %s: %s", dir, err.msg);
        moe_trace_writer_close(w, NULL);
        w = NULL;
        goto out;
    }
    if (moe_trace_writer_close(w, &err) < 0) {
        w = NULL;
        errorf("gen-trace: %s", err.msg);
        goto out;
    }
    w = NULL;
    if (!quiet && gen_trace_summary(outp, tokens, (double)(moe_now_ns() - t0) / 1e9) < 0)
        goto out;
    ret = 0;
out:
    moe_trace_writer_close(w, NULL);
    moe_engine_free(e);
    moe_backend_free(b);
    moe_model_free(m);
    return ret;
}

/* ---- cache-sim ------------------------------------------------------------------------- */

static void cache_sim_usage(FILE *f)
{
    fprintf(f,
            "usage: moectl cache-sim --trace FILE --capacity C [--policy P] [--prefetch]\n"
            "                        [--half-life N] [--disk-bw B] [--disk-latency T]\n"
            "                        [--compute T] [--expert-bytes B]\n"
            "                        [--prefetch-precision P] [--json] [-q]\n"
            "\n"
            "Replays a routing trace (from `moectl gen-trace` or moed) through the expert\n"
            "cache in simulation (no memory, no I/O; the cache's own code and policies) and\n"
            "prints, per policy, the hit rate next to Belady's optimum for the same capacity.\n"
            "\n"
            "Replay: a step is a run of consecutive records of one layer (one forward of a\n"
            "batch); its distinct experts are acquired (one access each; a hit when\n"
            "resident), the step's routing is given to the cache (its popularity counts and\n"
            "next-layer predictor, which may prefetch), then the experts are released.\n"
            "\n"
            "  --trace FILE    the routing trace\n"
            "  --capacity C    cache size: experts (\"64\"), bytes (\"12G\", \"512MiB\": divided\n"
            "                  by the trace's expert size), or a share of all routed experts\n"
            "                  of the MoE layers in the trace (\"25%%\"); at least the\n"
            "                  distinct experts of the largest step\n"
            "  --policy P      lru, freq, routing, adaptive (moed's default), or all\n"
            "                  (default): each of the four\n"
            "  --prefetch      with the cache's prefetcher on: with one policy, that policy\n"
            "                  with prefetch; with all, each policy without and then with\n"
            "                  prefetch (eight runs)\n"
            "  --half-life N   freq and routing: use counts halve every N uses of a layer\n"
            "                  (default: the cache's)\n"
            "  --prefetch-precision P  prefetch only experts expected to be used with\n"
            "                  probability P (the forecast calibrated per layer on the\n"
            "                  prefetches used and wasted so far), and only when that\n"
            "                  probability pays for the part of the read that would still\n"
            "                  hold the disk when the next step starts; default 0.5, -1: no\n"
            "                  throttle\n"
            "\n"
            "Time: one disk reads experts in the order asked (a demand read waits behind\n"
            "the prefetches queued before it); a read holds it for bytes / bandwidth and is\n"
            "ready after the latency on top; a step computes once its experts are ready.\n"
            "  --disk-bw B     disk bandwidth in bytes/s (\"4.5G\", default: the pager's\n"
            "                  measured 4.5 GB/s)\n"
            "  --disk-latency T  per read on top of its transfer (\"1.7ms\", default 1.7 ms)\n"
            "  --compute T     compute time per step, a layer's forward of a batch (\"2ms\";\n"
            "                  default: the bytes of its experts at 40 GB/s, the CPU kernel's\n"
            "                  decode rate)\n"
            "  --expert-bytes B  bytes of one expert (\"352M\"; default: the trace's); sizes\n"
            "                  the reads, the compute and --capacity in bytes\n"
            "  --json          one JSON object instead of the table\n"
            "  -q, --quiet     the table only, without the trace's description\n"
            "\n"
            "Columns: accesses and hits; hit rate; prefetch hits (first uses of prefetched\n"
            "experts) and wasted prefetches (evicted unused); evictions; stall per token\n"
            "(time the steps waited for experts, over the trace's tokens); bytes read per\n"
            "token; Belady's hit rate;\n"
            "x belady = hit rate / Belady's; gap closed = (hit rate - LRU's) / (Belady's -\n"
            "LRU's), the share of LRU's distance to the optimum the policy makes up (LRU\n"
            "without prefetch is run as the baseline when not asked for).\n");
}

/* One policy run. */
struct sim_run {
    enum moe_cache_policy policy;
    bool prefetch;
    bool baseline; /* run only as LRU's baseline */
    struct moe_trace_replay_result res;
};

static double rate(uint64_t hits, uint64_t accesses)
{
    return accesses ? (double)hits / (double)accesses : 0.0;
}

static const char *run_name(const struct sim_run *r, char *buf, size_t len)
{
    snprintf(buf, len, "%s%s", moe_cache_policy_name(r->policy), r->prefetch ? "+prefetch" : "");
    return buf;
}

/* Parses --capacity's syntax: *kind 'e' experts, 'b' bytes, '%' share. */
static int parse_capacity(const char *s, char *kind, uint64_t *val, double *pct)
{
    struct moe_error err = {0};
    size_t n = strlen(s);
    char *end;

    if (n > 1 && s[n - 1] == '%') {
        *pct = strtod(s, &end);
        if (end != s + n - 1 || !(*pct > 0.0 && *pct <= 100.0)) {
            errorf("cache-sim: --capacity '%s': expected a share above 0%% and at most 100%%", s);
            return -EINVAL;
        }
        *kind = '%';
        return 0;
    }
    if (n > 0 && strspn(s, "0123456789") == n) {
        if (parse_u64("--capacity", s, val) < 0)
            return -EINVAL;
        *kind = 'e';
        return 0;
    }
    if (moe_parse_bytes(s, val, &err) < 0) {
        errorf("cache-sim: --capacity '%s': expected experts (\"64\"), bytes with a suffix "
               "(\"12G\", \"512MiB\") or a share (\"25%%\")",
               s);
        return -EINVAL;
    }
    *kind = 'b';
    return 0;
}

/* "4.5G", "800M", "1e9": a positive number, k/M/G multiplying by 10^3/6/9. */
static int parse_rate(const char *opt, const char *s, double *ret)
{
    char *end;
    double v;

    errno = 0;
    v = strtod(s, &end);
    if (end != s && *end && !end[1]) {
        if (*end == 'k' || *end == 'K')
            v *= 1e3, end++;
        else if (*end == 'M')
            v *= 1e6, end++;
        else if (*end == 'G')
            v *= 1e9, end++;
    }
    if (errno || end == s || *end || !(v > 0) || isinf(v)) {
        errorf("cache-sim: %s '%s': expected bytes per second, e.g. \"4.5G\"", opt, s);
        return -EINVAL;
    }
    *ret = v;
    return 0;
}

/* "1.7ms", "200us", "0.5s", "0": a time >= 0 in seconds. */
static int parse_seconds(const char *opt, const char *s, double *ret)
{
    static const struct {
        const char *suffix;
        double scale;
    } units[] = {{"ns", 1e-9}, {"us", 1e-6}, {"ms", 1e-3}, {"s", 1.0}, {"", 1.0}};
    char *end;
    double v;

    errno = 0;
    v = strtod(s, &end);
    if (!errno && end != s) {
        for (size_t i = 0; i < MOE_ARRAY_SIZE(units); i++) {
            if (strcmp(end, units[i].suffix) == 0 && v >= 0 && !isinf(v)) {
                *ret = v * units[i].scale;
                return 0;
            }
        }
    }
    errorf("cache-sim: %s '%s': expected a time >= 0 with a unit: \"1.7ms\", \"200us\", "
           "\"0.5s\"",
           opt, s);
    return -EINVAL;
}

static json_t *num_or_null(bool ok, double v)
{
    return ok ? json_real(v) : json_null();
}

/* The table's row, or the JSON object, of one run. */
static void print_run(const struct sim_run *r, double bel_rate, double lru_rate, json_t *arr)
{
    const struct moe_trace_replay_result *x = &r->res;
    double hr = rate(x->hits, x->accesses);
    double tok = x->tokens ? (double)x->tokens : 1.0;
    bool plain_lru = r->policy == MOE_POLICY_LRU && !r->prefetch;
    bool has_gap = !plain_lru && bel_rate > lru_rate;
    char gap[16] = "-", ratio[16] = "-", nm[48], nb[32];

    if (arr) {
        json_t *o = json_pack(
            "{s:s, s:b, s:b, s:I, s:I, s:f, s:I, s:I, s:I}", "policy",
            moe_cache_policy_name(r->policy), "prefetch", r->prefetch, "baseline", r->baseline,
            "accesses", (json_int_t)x->accesses, "hits", (json_int_t)x->hits, "hit_rate", hr,
            "prefetch_hits", (json_int_t)x->c.prefetch_hits, "wasted_prefetches",
            (json_int_t)x->c.wasted_prefetches, "evictions", (json_int_t)x->c.evictions);

        json_object_set_new(o, "late_prefetch_hits", json_integer((json_int_t)x->late_hits));
        json_object_set_new(o, "tokens", json_integer((json_int_t)x->tokens));
        json_object_set_new(o, "stall_s", json_real(x->stall));
        json_object_set_new(o, "compute_s", json_real(x->compute));
        json_object_set_new(o, "stall_per_token_s", json_real(x->stall / tok));
        json_object_set_new(o, "bytes_read", json_integer((json_int_t)x->bytes_read));
        json_object_set_new(o, "bytes_per_token", json_real((double)x->bytes_read / tok));
        json_object_set_new(o, "ratio_to_belady", num_or_null(bel_rate > 0, hr / bel_rate));
        json_object_set_new(o, "gap_closed",
                            num_or_null(has_gap, (hr - lru_rate) / (bel_rate - lru_rate)));
        json_array_append_new(arr, o);
        return;
    }
    if (has_gap)
        snprintf(gap, sizeof(gap), "%.0f%%", 100.0 * (hr - lru_rate) / (bel_rate - lru_rate));
    if (bel_rate > 0)
        snprintf(ratio, sizeof(ratio), "%.3f", hr / bel_rate);
    snprintf(nm, sizeof(nm), "%s%s", run_name(r, nb, sizeof(nb)), r->baseline ? " (baseline)" : "");
    printf("%-22s %10" PRIu64 " %10" PRIu64 " %7.2f%% %9" PRIu64 " %9" PRIu64 " %10" PRIu64
           " %10.3f %9s %7.2f%% %8s %6s\n",
           nm, x->accesses, x->hits, 100.0 * hr, x->c.prefetch_hits, x->c.wasted_prefetches,
           x->c.evictions, 1e3 * x->stall / tok,
           human_bytes((uint64_t)((double)x->bytes_read / tok), nb, sizeof(nb)), 100.0 * bel_rate,
           ratio, gap);
}

int moectl_cache_sim(int argc, char **argv)
{
    static const struct option opts[] = {
        {"trace", required_argument, NULL, 't'},
        {"capacity", required_argument, NULL, 'c'},
        {"policy", required_argument, NULL, 'p'},
        {"prefetch", no_argument, NULL, 'f'},
        {"json", no_argument, NULL, 'j'},
        {"quiet", no_argument, NULL, 'q'},
        {"half-life", required_argument, NULL, 'H'},
        {"disk-bw", required_argument, NULL, 'B'},
        {"disk-latency", required_argument, NULL, 'L'},
        {"compute", required_argument, NULL, 'C'},
        {"expert-bytes", required_argument, NULL, 'E'},
        {"prefetch-precision", required_argument, NULL, 'P'},
        {"help", no_argument, NULL, 'h'},
        {0},
    };
    const char *path = NULL, *cap_s = NULL, *pol_s = "all";
    struct moe_trace *t = NULL;
    struct moe_trace_summary sum;
    struct sim_run runs[2 * MOE_POLICY_COUNT + 1];
    struct moe_cache_config cfg = {0};
    struct moe_belady_result bel;
    struct moe_error err = {0};
    bool prefetch = false, json = false, quiet = false, all;
    enum moe_cache_policy one = MOE_POLICY_LRU;
    uint64_t cap = 0, cap_val = 0, total, eb;
    double pct = 0, lru_rate, bel_rate;
    json_t *root = NULL, *arr = NULL;
    int c, n_runs = 0, ret = 1;
    char kind = 0, b1[32];
    struct moe_trace_timing tm;

    moe_trace_timing_default(&tm);
    while ((c = getopt_long(argc, argv, "qh", opts, NULL)) != -1) {
        switch (c) {
        case 't':
            path = optarg;
            break;
        case 'B':
            if (parse_rate("--disk-bw", optarg, &tm.disk_bw) < 0)
                return 2;
            break;
        case 'L':
            if (parse_seconds("--disk-latency", optarg, &tm.disk_latency) < 0)
                return 2;
            break;
        case 'C':
            if (parse_seconds("--compute", optarg, &tm.compute_step) < 0)
                return 2;
            tm.compute_bw = 0;
            break;
        case 'E':
            if (parse_bytes("--expert-bytes", optarg, &tm.expert_bytes) < 0)
                return 2;
            if (tm.expert_bytes == 0) {
                errorf("cache-sim: --expert-bytes '%s': expected at least 1 byte", optarg);
                return 2;
            }
            break;
        case 'P': {
            char *end;

            errno = 0;
            cfg.prefetch_precision = strtod(optarg, &end);
            if (errno || end == optarg || *end || !(cfg.prefetch_precision <= 1) ||
                (cfg.prefetch_precision < 0 && cfg.prefetch_precision != -1)) {
                errorf("cache-sim: --prefetch-precision '%s': expected 0 to 1, or -1 (no "
                       "throttle)",
                       optarg);
                return 2;
            }
            break;
        }
        case 'c':
            cap_s = optarg;
            break;
        case 'p':
            pol_s = optarg;
            break;
        case 'f':
            prefetch = true;
            break;
        case 'j':
            json = true;
            break;
        case 'H': {
            char *end;

            errno = 0;
            cfg.half_life = strtod(optarg, &end);
            if (errno || end == optarg || *end || !(cfg.half_life > 0) || cfg.half_life > 1e9) {
                errorf("cache-sim: --half-life '%s': expected a positive number of layer uses",
                       optarg);
                return 2;
            }
            break;
        }
        case 'q':
            quiet = true;
            break;
        case 'h':
            cache_sim_usage(stdout);
            return 0;
        default:
            cache_sim_usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        errorf("cache-sim: unexpected argument '%s'", argv[optind]);
        return 2;
    }
    if (!path || !cap_s) {
        errorf("cache-sim: --trace and --capacity are required (see moectl cache-sim --help)");
        return 2;
    }
    all = strcmp(pol_s, "all") == 0;
    if (!all && moe_cache_policy_parse(pol_s, &one) < 0) {
        errorf("cache-sim: --policy '%s': expected lru, freq, routing, adaptive or all", pol_s);
        return 2;
    }
    if (parse_capacity(cap_s, &kind, &cap_val, &pct) < 0)
        return 2;

    if (moe_trace_read(path, &t, &err) < 0) {
        errorf("cache-sim: %s", err.msg);
        goto out;
    }
    if (t->n_records == 0) {
        errorf("cache-sim: %s: the trace has no records", path);
        goto out;
    }
    if (moe_trace_summarize(t, &sum) < 0) {
        errorf("cache-sim: out of memory");
        goto out;
    }
    eb = tm.expert_bytes ? tm.expert_bytes : t->info.expert_bytes;
    total = (uint64_t)sum.n_moe_layers * (uint64_t)t->info.n_experts;
    if (kind == '%') {
        cap = (uint64_t)(pct / 100.0 * (double)total);
    } else if (kind == 'e') {
        cap = cap_val;
    } else if (!eb) {
        errorf("cache-sim: %s does not say how large an expert is (expert_bytes 0): give "
               "--capacity in experts or as a share",
               path);
        goto out;
    } else {
        cap = cap_val / eb;
    }
    if (cap < sum.max_step) {
        struct moe_trace_step *steps;
        uint64_t n_steps;

        if (moe_trace_steps(t, &steps, &n_steps) < 0) {
            errorf("cache-sim: out of memory");
            goto out;
        }
        errorf("cache-sim: --capacity %s (%" PRIu64 " experts) is below the %" PRIu32
               " distinct experts that step %" PRIu64 " (layer %u, tokens %" PRIu32 " to %" PRIu32
               ") needs at once; give at least %" PRIu32 " experts",
               cap_s, cap, sum.max_step, sum.max_step_at, steps[sum.max_step_at].layer,
               t->token[steps[sum.max_step_at].first],
               t->token[steps[sum.max_step_at].first + steps[sum.max_step_at].n - 1], sum.max_step);
        free(steps);
        goto out;
    }
    /* More than every expert changes nothing, and keeps host_bytes small. */
    cap = MOE_MIN(cap, total);

    if (moe_trace_belady(t, cap, &bel, &err) < 0) {
        errorf("cache-sim: %s: %s", path, err.msg);
        goto out;
    }
    bel_rate = rate(bel.hits, bel.accesses);

    /* The runs: LRU without prefetch first (also the baseline of the gap),
     * then the others without prefetch, then those with. */
    runs[n_runs++] = (struct sim_run){.policy = MOE_POLICY_LRU,
                                      .baseline = !(all || (one == MOE_POLICY_LRU && !prefetch))};
    for (int pf = 0; pf < 2; pf++) {
        if ((pf && !prefetch) || (!pf && prefetch && !all))
            continue;
        for (int p = 0; p < MOE_POLICY_COUNT; p++) {
            if ((!all && p != (int)one) || (p == MOE_POLICY_LRU && !pf))
                continue;
            runs[n_runs++] = (struct sim_run){.policy = (enum moe_cache_policy)p, .prefetch = pf};
        }
    }
    for (int i = 0; i < n_runs; i++) {
        cfg.policy = runs[i].policy;
        cfg.prefetch = runs[i].prefetch;
        if (moe_trace_replay(t, cap, &cfg, &tm, &runs[i].res, &err) < 0) {
            errorf("cache-sim: %s: %s%s: %s", path, moe_cache_policy_name(cfg.policy),
                   cfg.prefetch ? "+prefetch" : "", err.msg);
            goto out;
        }
        /* The same accounting on both sides, or the comparison means nothing. */
        if (runs[i].res.accesses != bel.accesses) {
            errorf("cache-sim: internal error: %" PRIu64 " accesses replayed, %" PRIu64
                   " for Belady",
                   runs[i].res.accesses, bel.accesses);
            goto out;
        }
    }
    lru_rate = rate(runs[0].res.hits, runs[0].res.accesses);

    if (json) {
        char *text;

        root = json_object();
        arr = json_array();
        json_object_set_new(root, "trace", json_string(path));
        json_object_set_new(root, "model", json_string(t->info.model));
        json_object_set_new(root, "records", json_integer((json_int_t)t->n_records));
        json_object_set_new(root, "steps", json_integer((json_int_t)sum.n_steps));
        json_object_set_new(root, "moe_layers", json_integer(sum.n_moe_layers));
        json_object_set_new(root, "experts", json_integer(t->info.n_experts));
        json_object_set_new(root, "top_k", json_integer(t->info.top_k));
        json_object_set_new(root, "expert_bytes", json_integer((json_int_t)eb));
        json_object_set_new(root, "capacity_experts", json_integer((json_int_t)cap));
        json_object_set_new(root, "capacity_bytes", json_integer((json_int_t)(cap * eb)));
        json_object_set_new(root, "capacity_share", json_real((double)cap / (double)total));
        json_object_set_new(root, "timing",
                            json_pack("{s:f, s:f, s:f, s:f}", "disk_bw", tm.disk_bw,
                                      "disk_latency_s", tm.disk_latency, "compute_step_s",
                                      tm.compute_step, "compute_bw", tm.compute_bw));
        json_object_set_new(root, "belady",
                            json_pack("{s:I, s:I, s:f}", "accesses", (json_int_t)bel.accesses,
                                      "hits", (json_int_t)bel.hits, "hit_rate", bel_rate));
        for (int i = 0; i < n_runs; i++)
            print_run(&runs[i], bel_rate, lru_rate, arr);
        json_object_set_new(root, "runs", arr);
        text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(6));
        if (!text) {
            errorf("cache-sim: out of memory");
            goto out;
        }
        printf("%s\n", text);
        free(text);
        ret = 0;
        goto out;
    }

    if (!quiet) {
        printf("trace %s: model '%s', %" PRIu64 " records in %" PRIu64 " steps, %" PRIu64
               " accesses; %d MoE layers x %d experts, top-%d\n",
               path, t->info.model, t->n_records, sum.n_steps, sum.accesses, sum.n_moe_layers,
               t->info.n_experts, t->info.top_k);
        printf("capacity: %" PRIu64 " experts, %.1f%% of %" PRIu64 "%s%s\n", cap,
               100.0 * (double)cap / (double)total, total, eb ? ", " : "",
               eb ? human_bytes(cap * eb, b1, sizeof(b1)) : "");
    }
    if (!quiet) {
        printf("time: disk %.3g GB/s, %.3g ms latency per read; compute ", tm.disk_bw / 1e9,
               1e3 * tm.disk_latency);
        if (tm.compute_bw > 0)
            printf("%.3g ms per step + its experts' bytes at %.3g GB/s\n", 1e3 * tm.compute_step,
                   tm.compute_bw / 1e9);
        else
            printf("%.3g ms per step\n", 1e3 * tm.compute_step);
    }
    printf("%-22s %10s %10s %8s %9s %9s %10s %10s %9s %8s %8s %6s\n", "policy", "accesses", "hits",
           "hit rate", "pf hits", "pf wasted", "evictions", "stall/tok", "read/tok", "belady",
           "x belady", "gap");
    for (int i = 0; i < n_runs; i++)
        print_run(&runs[i], bel_rate, lru_rate, NULL);
    printf("(stall/tok in ms: the time steps waited for their experts, per token)\n");
    printf("%-22s %10" PRIu64 " %10" PRIu64 " %7.2f%%  (Belady's MIN: the offline optimum)\n",
           "belady", bel.accesses, bel.hits, 100.0 * bel_rate);
    ret = 0;
out:
    json_decref(root);
    moe_trace_free(t);
    return ret;
}

/* ---- trace import ---------------------------------------------------------------------- */

/* Largest input `trace import` reads (the whole file is read into memory). */
#define TRACE_IMPORT_MAX_BYTES (4ull << 30)

static void trace_usage(FILE *f)
{
    fprintf(f,
            "usage: moectl trace import --format csv|jsonl (--model DIR | --shape L,E,K[,BYTES])\n"
            "                           IN OUT [-q]\n"
            "\n"
            "Converts routing recorded by another tool into a routing trace (engine/trace.h)\n"
            "for `moectl cache-sim`: one row per (layer, token), in the order the layers ran.\n"
            "\n"
            "  --format csv    layer,token,experts[,weights]: experts and weights are top-k\n"
            "                  values separated by spaces, ';' or '|' (\"[3, 7]\" in quotes\n"
            "                  too); a first line that is not a row is a header; '#' comments\n"
            "  --format jsonl  one object per line: {\"layer\": 3, \"token\": 17, \"experts\":\n"
            "                  [5, 9], \"weights\": [0.6, 0.4]} (weights optional)\n"
            "  --model DIR     the model the routing is of: its shape, expert size and dense\n"
            "                  layers (a checkpoint or packed store)\n"
            "  --shape L,E,K[,BYTES]  or its shape alone: layers, routed experts per layer,\n"
            "                  experts per token, bytes of one expert (\"26,64,6,17M\")\n"
            "  -q, --quiet     no summary\n"
            "\n"
            "Every row is checked as the trace reader checks a record (the line number names a\n"
            "bad one): layer in range (and not dense), top-k distinct experts in range, a\n"
            "token below 2^32, top-k finite weights when given (not kept).\n");
}

/* "26,64,6" or "26,64,6,17M" into info. */
static int parse_shape(const char *s, struct moe_trace_info *info)
{
    char buf[128], *save = NULL, *tok;
    long v[3];
    int n = 0;

    if (strlen(s) >= sizeof(buf))
        goto bad;
    strcpy(buf, s);
    for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save), n++) {
        if (n < 3) {
            char *end;

            errno = 0;
            v[n] = strtol(tok, &end, 10);
            if (errno || end == tok || *end)
                goto bad;
        } else if (n == 3) {
            if (parse_bytes("--shape", tok, &info->expert_bytes) < 0)
                return -EINVAL;
        } else {
            goto bad;
        }
    }
    if (n < 3 || v[0] < 1 || v[0] > MOE_TRACE_MAX_LAYERS || v[1] < 1 ||
        v[1] > MOE_TRACE_MAX_EXPERTS || v[2] < 1 || v[2] > MOE_MIN(MOE_TRACE_MAX_TOPK, v[1]))
        goto bad;
    info->n_layers = (int)v[0];
    info->n_experts = (int)v[1];
    info->top_k = (int)v[2];
    return 0;
bad:
    errorf("trace import: --shape '%s': expected LAYERS,EXPERTS,TOPK[,BYTES] with 1 to %d "
           "layers, 1 to %d experts and 1 <= top-k <= min(%d, experts)",
           s, MOE_TRACE_MAX_LAYERS, MOE_TRACE_MAX_EXPERTS, MOE_TRACE_MAX_TOPK);
    return -EINVAL;
}

static int trace_import(int argc, char **argv)
{
    static const struct option opts[] = {
        {"format", required_argument, NULL, 'f'},
        {"model", required_argument, NULL, 'm'},
        {"shape", required_argument, NULL, 's'},
        {"quiet", no_argument, NULL, 'q'},
        {"help", no_argument, NULL, 'h'},
        {0},
    };
    const char *fmt_s = NULL, *dir = NULL, *shape = NULL, *in, *outp;
    enum moe_trace_import_format fmt;
    struct moe_trace_info info = {0};
    struct moe_error err = {0};
    struct moe_model *m = NULL;
    struct moe_trace *t = NULL;
    struct moe_trace_writer *w = NULL;
    bool quiet = false, *is_moe = NULL;
    char *buf = NULL;
    size_t len;
    int c, ret = 1;

    optind = 1;
    while ((c = getopt_long(argc, argv, "qh", opts, NULL)) != -1) {
        switch (c) {
        case 'f':
            fmt_s = optarg;
            break;
        case 'm':
            dir = optarg;
            break;
        case 's':
            shape = optarg;
            break;
        case 'q':
            quiet = true;
            break;
        case 'h':
            trace_usage(stdout);
            return 0;
        default:
            trace_usage(stderr);
            return 2;
        }
    }
    if (argc - optind != 2 || !fmt_s || !dir == !shape) {
        errorf("trace import: --format, one of --model and --shape, IN and OUT are required "
               "(see moectl trace --help)");
        return 2;
    }
    in = argv[optind];
    outp = argv[optind + 1];
    if (moe_trace_import_format_parse(fmt_s, &fmt) < 0) {
        errorf("trace import: --format '%s': expected csv or jsonl", fmt_s);
        return 2;
    }
    if (shape) {
        if (parse_shape(shape, &info) < 0)
            return 2;
        snprintf(info.model, sizeof(info.model), "imported");
    } else {
        char name[64];

        if (moe_model_open(dir, &m, &err) < 0) {
            errorf("trace import: %s", err.msg);
            goto out;
        }
        base_name(dir, name, sizeof(name));
        moe_trace_info_from_model(m, name, &info);
        is_moe = calloc((size_t)info.n_layers, sizeof(*is_moe));
        if (!is_moe) {
            errorf("trace import: out of memory");
            goto out;
        }
        for (int l = 0; l < info.n_layers; l++)
            is_moe[l] = m->layers[l].is_moe;
    }
    info.lookahead = false;
    if (moe_read_file(in, TRACE_IMPORT_MAX_BYTES, &buf, &len, &err) < 0) {
        errorf("trace import: %s", err.msg);
        goto out;
    }
    if (moe_trace_import(buf, len, fmt, &info, is_moe, in, &t, &err) < 0) {
        errorf("trace import: %s", err.msg);
        goto out;
    }
    if (t->n_records == 0) {
        errorf("trace import: %s: no rows", in);
        goto out;
    }
    if (moe_trace_writer_open(outp, &t->info, &w, &err) < 0) {
        errorf("trace import: %s", err.msg);
        goto out;
    }
    for (uint64_t i = 0; i < t->n_records; i++) {
        int32_t ids[MOE_TRACE_MAX_TOPK];

        for (int j = 0; j < t->info.top_k; j++)
            ids[j] = t->expert[i * t->info.top_k + j];
        if (moe_trace_write(w, t->token[i], t->layer[i], ids, 1) < 0)
            break; /* sticky: close says what */
    }
    if (moe_trace_writer_close(w, &err) < 0) {
        w = NULL;
        errorf("trace import: %s", err.msg);
        goto out;
    }
    w = NULL;
    if (!quiet)
        printf("wrote %s: %" PRIu64 " records (%d layers x %d experts, top-%d) from %s\n", outp,
               t->n_records, t->info.n_layers, t->info.n_experts, t->info.top_k, in);
    ret = 0;
out:
    moe_trace_writer_close(w, NULL);
    moe_trace_free(t);
    moe_model_free(m);
    free(is_moe);
    free(buf);
    return ret;
}

int moectl_trace(int argc, char **argv)
{
    if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        trace_usage(stdout);
        return 0;
    }
    if (argc < 2 || strcmp(argv[1], "import") != 0) {
        errorf("trace: expected a subcommand: import (see moectl trace --help)");
        return 2;
    }
    return trace_import(argc - 1, argv + 1);
}
