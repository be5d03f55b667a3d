/*
 * moectl forward: run MoE layers in process (--local) on a .npy of hidden
 * states.
 */
#include "moectl.h"

#include "backend.h"
#include "cache.h"
#include "common.h"
#include "layer.h"
#include "model.h"
#include "npy.h"
#include "threadpool.h"
#include "trace.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- forward ------------------------------------------------------------ */

static void forward_usage(FILE *f)
{
    fprintf(f,
            "usage: moectl forward --local --model DIR --layer L|all --in X.npy --out Y.npy\n"
            "                      [--routing-out R.npz] [--routing-in R.npz] [--step N]\n"
            "                      [--cache-bytes B] [--policy lru|freq|routing] [--no-prefetch]\n"
            "                      [--buffered] [--register-buffers] [--trace FILE]\n"
            "                      [--threads N] [--compute-precision exact|bf16]\n"
            "                      [--kernel auto|generic|avx2|avx512|amx|onednn] [-q]\n"
            "       moectl forward --local --kernel list\n"
            "\n"
            "Runs MoE layers in this process.  X.npy: float32 [tokens, hidden] hidden states.\n"
            "With --layer L, Y.npy is layer L's output (routed experts weighted and summed,\n"
            "plus shared experts).  With --layer all, every MoE layer runs in order on a\n"
            "residual stream, x <- x + layer(x), the way a model would, and Y.npy is the\n"
            "final x.  --routing-out writes the routing used (arrays 'ids' int32 and\n"
            "'weights' float32, [tokens, top_k]); --routing-in takes it from such a file\n"
            "instead of the model's router (both with a single layer only).\n"
            "\n"
            "  --step N           N tokens per forward call (default: all at once); with\n"
            "                     --layer all, N tokens go through every layer before the\n"
            "                     next N, as in decoding\n"
            "  --cache-bytes B    host expert cache size (K/M/G suffixes; default: every\n"
            "                     expert); smaller caches page experts in and out\n"
            "  --policy P         eviction policy: lru, freq or routing (default routing)\n"
            "  --no-prefetch      do not prefetch the next layer's predicted experts\n"
            "  --buffered         read through the page cache instead of O_DIRECT\n"
            "  --register-buffers register the cache's memory with io_uring: faster page-ins,\n"
            "                     but the whole --cache-bytes is locked in memory at start\n"
            "  --trace FILE       record the routing to FILE (see moectl cache-sim)\n"
            "  --compute-precision exact|bf16\n"
            "                     exact (default): activations to fp32 accuracy; bf16: x and\n"
            "                     the SwiGLU intermediate rounded to bf16 as torch computes a\n"
            "                     bf16 model (faster where the CPU multiplies bf16)\n"
            "  --kernel K         the CPU kernel (default auto: the best this CPU runs);\n"
            "                     --kernel list prints each, and what this CPU lacks for it\n"
            "\n"
            "The output does not depend on the cache size or policy.  Unless -q, prints the\n"
            "timing and the cache statistics (hits, misses, prefetches, page-in latency).\n"
            "\n"
            "Without --local, one layer runs in a running moed instead:\n"
            "  moectl forward --model NAME --layer L --in X.npy --out Y.npy\n"
            "                 [--routing-out R.npz] [--dtype f32|bf16|f16]\n"
            "                 [--remote HOST:PORT | --socket PATH] [--tls ...] [--token T]\n"
            "NAME is a model loaded in moed (moectl models lists them).\n");
}

static int load_routing(const char *path, int n_tokens, int top_k, struct moe_npy *ids,
                        struct moe_npy *w)
{
    struct moe_error err = {0};

    if (moe_npz_read_array(path, "ids", ids, &err) < 0 ||
        moe_npz_read_array(path, "weights", w, &err) < 0) {
        errorf("forward: %s", err.msg);
        return -EINVAL;
    }
    if (ids->type != MOE_NPY_I32 || ids->ndim != 2 || ids->shape[0] != n_tokens ||
        ids->shape[1] != top_k) {
        errorf("forward: %s: 'ids' must be int32 [%d, %d] (tokens, top_k)", path, n_tokens, top_k);
        return -EINVAL;
    }
    if (w->type != MOE_NPY_F32 || w->ndim != 2 || w->shape[0] != n_tokens || w->shape[1] != top_k) {
        errorf("forward: %s: 'weights' must be float32 [%d, %d] (tokens, top_k)", path, n_tokens,
               top_k);
        return -EINVAL;
    }
    return 0;
}

static void print_cache_stats(struct moe_engine *e)
{
    struct moe_cache_stats s;
    char b1[32], b2[32], b3[32];

    if (moe_cache_snapshot(moe_engine_cache(e), &s) < 0)
        return;
    for (int k = 0; k < s.n_tiers; k++) {
        const struct moe_cache_tier_stats *t = &s.tiers[k];
        const struct moe_cache_counters *c = &t->c;

        printf("cache %s: %s of %s resident (%llu experts), policy %s%s: %llu hits, %llu misses "
               "(hit rate %.1f%%), %llu prefetch hits of %llu prefetches (%llu wasted), %llu "
               "evictions, %s paged in",
               t->name, human_bytes(t->used, b1, sizeof(b1)),
               human_bytes(t->capacity, b2, sizeof(b2)), (unsigned long long)t->resident, s.policy,
               s.prefetch ? "+prefetch" : "", (unsigned long long)c->hits,
               (unsigned long long)c->misses, 100.0 * moe_cache_hit_rate(c),
               (unsigned long long)c->prefetch_hits, (unsigned long long)c->prefetches,
               (unsigned long long)c->wasted_prefetches, (unsigned long long)c->evictions,
               human_bytes(c->bytes_paged, b3, sizeof(b3)));
        if (t->latency.count)
            printf("; page-in p50 %.2f ms, p99 %.2f ms, max %.2f ms", t->latency.p50_ns / 1e6,
                   t->latency.p99_ns / 1e6, t->latency.max_ns / 1e6);
        if (c->page_in_errors)
            printf("; %llu page-in errors", (unsigned long long)c->page_in_errors);
        printf("\n");
    }
    moe_cache_stats_clear(&s);
}

/* --kernel list: the CPU kernels, best first, and which this CPU runs. */
static int list_kernels(void)
{
    struct moe_cpu_kernel_info info[8];
    int n = MOE_MIN(moe_backend_cpu_kernels(info, 8), 8);

    for (int i = 0; i < n; i++) {
        if (info[i].available)
            printf("%-8s yes%s", info[i].name, info[i].auto_pick ? " (auto picks it)" : "");
        else
            printf("%-8s no: needs %s; this CPU lacks %s", info[i].name, info[i].needs,
                   info[i].missing);
        printf("%s%s\n", info[i].note[0] ? "; " : "", info[i].note);
    }
    return 0;
}

int moectl_forward(int argc, char **argv)
{
    static const struct option opts[] = {
        {"local", no_argument, NULL, 'l'},
        {"model", required_argument, NULL, 'm'},
        {"layer", required_argument, NULL, 'L'},
        {"in", required_argument, NULL, 'i'},
        {"out", required_argument, NULL, 'o'},
        {"routing-out", required_argument, NULL, 'R'},
        {"routing-in", required_argument, NULL, 'r'},
        {"threads", required_argument, NULL, 't'},
        {"kernel", required_argument, NULL, 'k'},
        {"compute-precision", required_argument, NULL, 'p'},
        {"step", required_argument, NULL, 's'},
        {"cache-bytes", required_argument, NULL, 'C'},
        {"policy", required_argument, NULL, 'P'},
        {"no-prefetch", no_argument, NULL, 'N'},
        {"buffered", no_argument, NULL, 'B'},
        {"register-buffers", no_argument, NULL, 'G'},
        {"trace", required_argument, NULL, 'T'},
        {"quiet", no_argument, NULL, 'q'},
        {"help", no_argument, NULL, 'h'},
        {0},
    };
    const char *dir = NULL, *in = NULL, *outp = NULL, *rout = NULL, *rin = NULL, *tracep = NULL;
    struct moe_cache_config ccfg = {.policy = MOE_POLICY_ROUTING, .prefetch = true};
    struct moe_trace_writer *tw = NULL;
    bool all = false;
    int step = 0;
    struct moe_cpu_config cpu = {0};
    struct moe_error err = {0};
    struct moe_model *m = NULL;
    struct moe_backend *b = NULL;
    struct moe_engine *e = NULL;
    struct moe_npy x = {0}, rids = {0}, rw = {0};
    struct moe_forward_stats st;
    int32_t *ids = NULL;
    float *w = NULL, *y = NULL;
    bool local = false, quiet = false;
    enum moe_compute_precision prec = MOE_PRECISION_EXACT;
    int layer = -1, c, r, ret = 1, T;
    char b1[32];

    /* Without --local the layer runs in moed (client/moectl_remote.c). */
    for (int i = 1; i < argc && !local; i++)
        local = strcmp(argv[i], "--local") == 0 || strcmp(argv[i], "--help") == 0 ||
                strcmp(argv[i], "-h") == 0;
    if (!local)
        return moectl_forward_remote(argc, argv);
    local = false;
    while ((c = getopt_long(argc, argv, "qh", opts, NULL)) != -1) {
        switch (c) {
        case 'l':
            local = true;
            break;
        case 'm':
            dir = optarg;
            break;
        case 'L':
            if (strcmp(optarg, "all") == 0)
                all = true;
            else if (parse_int("--layer", optarg, 0, MOE_MAX_LAYERS - 1, &layer) < 0)
                return 2;
            break;
        case 's':
            if (parse_int("--step", optarg, 1, MOE_MAX_TOKENS, &step) < 0)
                return 2;
            break;
        case 'C':
            if (parse_bytes("--cache-bytes", optarg, &ccfg.host_bytes) < 0)
                return 2;
            if (ccfg.host_bytes == 0) {
                errorf("forward: --cache-bytes 0: the cache must hold at least one expert");
                return 2;
            }
            break;
        case 'P':
            if (moe_cache_policy_parse(optarg, &ccfg.policy) < 0) {
                errorf("forward: --policy '%s': expected lru, freq or routing", optarg);
                return 2;
            }
            break;
        case 'N':
            ccfg.prefetch = false;
            break;
        case 'B':
            ccfg.pager.buffered = true;
            break;
        case 'G':
            ccfg.register_buffers = true;
            break;
        case 'T':
            tracep = optarg;
            break;
        case 'i':
            in = optarg;
            break;
        case 'o':
            outp = optarg;
            break;
        case 'R':
            rout = optarg;
            break;
        case 'r':
            rin = optarg;
            break;
        case 't':
            if (parse_int("--threads", optarg, 1, 1024, &cpu.n_threads) < 0)
                return 2;
            break;
        case 'k':
            if (strcmp(optarg, "list") == 0)
                return list_kernels();
            cpu.kernel = optarg;
            break;
        case 'p':
            if (moe_precision_parse(optarg, &prec) < 0) {
                errorf("forward: --compute-precision '%s': expected exact or bf16", optarg);
                return 2;
            }
            break;
        case 'q':
            quiet = true;
            break;
        case 'h':
            forward_usage(stdout);
            return 0;
        default:
            forward_usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        errorf("forward: unexpected argument '%s'", argv[optind]);
        return 2;
    }
    if (!dir || (layer < 0 && !all) || !in || !outp) {
        errorf("forward: --model, --layer, --in and --out are required (see moectl forward "
               "--help)");
        return 2;
    }
    if (all && (rin || rout)) {
        errorf("forward: --routing-in and --routing-out need a single --layer, not all");
        return 2;
    }

    if (moe_model_open(dir, &m, &err) < 0) {
        errorf("forward: %s", err.msg);
        goto out;
    }
    m->precision = prec;
    if (moe_npy_read(in, &x, &err) < 0) {
        errorf("forward: %s", err.msg);
        goto out;
    }
    if (x.type != MOE_NPY_F32 || x.ndim != 2 || x.shape[1] != m->cfg.hidden) {
        errorf("forward: %s: expected float32 hidden states of shape [tokens, %d], got %s of "
               "%d dimension(s)%s",
               in, m->cfg.hidden, x.type == MOE_NPY_F32 ? "float32" : "int32", x.ndim,
               x.ndim == 2 ? " with another width" : "");
        goto out;
    }
    if (x.shape[0] < 1 || x.shape[0] > MOE_MAX_TOKENS) {
        errorf("forward: %s: %lld tokens: expected 1 to %d", in, (long long)x.shape[0],
               MOE_MAX_TOKENS);
        goto out;
    }
    T = (int)x.shape[0];
    if (rin && load_routing(rin, T, m->cfg.top_k, &rids, &rw) < 0)
        goto out;

    r = moe_backend_cpu_init(&cpu, &b, &err);
    if (r < 0) {
        errorf("forward: %s", err.msg);
        goto out;
    }
    if (moe_engine_init_cache(m, b, &ccfg, &e, &err) < 0) {
        errorf("forward: %s", err.msg);
        goto out;
    }
    if (tracep) {
        struct moe_trace_info ti = {
            .n_layers = m->cfg.n_layers,
            .n_experts = m->cfg.n_experts,
            .top_k = m->cfg.top_k,
            .expert_bytes = m->expert_bytes,
            .lookahead = true,
        };
        const char *base = strrchr(dir, '/');

        snprintf(ti.model, sizeof(ti.model), "%s", base && base[1] ? base + 1 : dir);
        if (moe_trace_writer_open(tracep, &ti, &tw, &err) < 0) {
            errorf("forward: %s", err.msg);
            goto out;
        }
        moe_engine_set_trace(e, tw);
    }
    ids = malloc((size_t)T * m->cfg.top_k * sizeof(*ids));
    w = malloc((size_t)T * m->cfg.top_k * sizeof(*w));
    y = malloc((size_t)T * m->cfg.hidden * sizeof(*y));
    if (!ids || !w || !y) {
        errorf("forward: out of memory for %d tokens", T);
        goto out;
    }
    if (!step)
        step = T;
    r = 0;
    memset(&st, 0, sizeof(st));
    if (all)
        memcpy(y, x.data, (size_t)T * m->cfg.hidden * sizeof(float));
    {
        float *part = all ? malloc((size_t)step * m->cfg.hidden * sizeof(float)) : NULL;
        uint64_t t0 = moe_now_ns();
        int calls = 0;

        if (all && !part) {
            errorf("forward: out of memory");
            goto out;
        }
        for (int t = 0; t < T && r == 0; t += step) {
            int n = MOE_MIN(step, T - t);
            size_t H = (size_t)m->cfg.hidden, K = (size_t)m->cfg.top_k;

            for (int l = all ? 0 : layer; l < (all ? m->cfg.n_layers : layer + 1); l++) {
                struct moe_forward_stats s1;
                float *xt = all ? y + (size_t)t * H : (float *)x.data + (size_t)t * H;

                if (all && !m->layers[l].is_moe)
                    continue;
                r = moe_layer_forward(e, l, xt, n, rin ? (int32_t *)rids.data + t * K : NULL,
                                      rin ? (float *)rw.data + t * K : NULL,
                                      all ? part : y + (size_t)t * H, ids + t * K, w + t * K, &s1,
                                      &err);
                if (r < 0)
                    break;
                calls++;
                if (all)
                    for (size_t i = 0; i < (size_t)n * H; i++)
                        xt[i] += part[i];
                st.route_ns += s1.route_ns;
                st.load_ns += s1.load_ns;
                st.compute_ns += s1.compute_ns;
                st.experts_used = MOE_MAX(st.experts_used, s1.experts_used);
                st.bytes_read += s1.bytes_read;
                st.hits += s1.hits;
                st.misses += s1.misses;
            }
        }
        free(part);
        if (r < 0) {
            errorf("forward: %s", err.msg);
            goto out;
        }
        if (!quiet) {
            uint64_t total = moe_now_ns() - t0;

            if (all)
                printf("%d MoE layers x %d tokens in %d calls of up to %d tokens: %.3f ms "
                       "(route %.3f ms, waiting for experts %.3f ms, compute %.3f ms); "
                       "%.0f tokens/s [%s %s]\n",
                       m->n_moe_layers, T, calls, step, (double)total / 1e6,
                       (double)st.route_ns / 1e6, (double)st.load_ns / 1e6,
                       (double)st.compute_ns / 1e6, total ? (double)T * 1e9 / (double)total : 0.0,
                       b->ops->name, moe_backend_cpu_kernel(b));
            else
                printf("layer %d: %d tokens, %d of %d experts used (%s read), %.3f ms: route "
                       "%.3f ms, read %.3f ms, compute %.3f ms; %.0f tokens/s [%s %s]\n",
                       layer, T, st.experts_used, m->cfg.n_experts,
                       human_bytes(st.bytes_read, b1, sizeof(b1)), (double)total / 1e6,
                       (double)st.route_ns / 1e6, (double)st.load_ns / 1e6,
                       (double)st.compute_ns / 1e6, total ? (double)T * 1e9 / (double)total : 0.0,
                       b->ops->name, moe_backend_cpu_kernel(b));
        }
    }
    {
        int64_t shape[2] = {T, m->cfg.hidden};

        if (moe_npy_write(outp, MOE_NPY_F32, 2, shape, y, &err) < 0) {
            errorf("forward: %s", err.msg);
            goto out;
        }
    }
    if (rout) {
        int64_t shape[2] = {T, m->cfg.top_k};
        struct moe_npz_entry ent[2] = {
            {"ids", MOE_NPY_I32, 2, shape, ids},
            {"weights", MOE_NPY_F32, 2, shape, w},
        };

        if (moe_npz_write(rout, ent, 2, &err) < 0) {
            errorf("forward: %s", err.msg);
            goto out;
        }
    }
    if (tw) {
        moe_engine_set_trace(e, NULL);
        r = moe_trace_writer_close(tw, &err);
        tw = NULL;
        if (r < 0) {
            errorf("forward: %s", err.msg);
            goto out;
        }
    }
    if (!quiet)
        print_cache_stats(e);
    ret = 0;
out:
    if (tw) {
        moe_engine_set_trace(e, NULL);
        moe_trace_writer_close(tw, NULL);
    }
    moe_engine_free(e);
    moe_backend_free(b);
    moe_model_free(m);
    moe_npy_clear(&x);
    moe_npy_clear(&rids);
    moe_npy_clear(&rw);
    free(ids);
    free(w);
    free(y);
    return ret;
}
