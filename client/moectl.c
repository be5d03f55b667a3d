/*
 * moectl: the operator's command line for moed.
 *
 * Offline commands, linked against the engine, that work without a daemon:
 *   gen-model   write a deterministic synthetic checkpoint (Hugging Face layout)
 *   inspect     describe a checkpoint: architecture, layers, experts, bytes
 *   forward     run one MoE layer in process (--local) on a .npy of hidden states
 *
 * Exit status: 0 success, 1 the command failed (the message says why),
 * 2 bad usage.
 */
#include "backend.h"
#include "common.h"
#include "genmodel.h"
#include "layer.h"
#include "model.h"
#include "npy.h"
#include "threadpool.h"

#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MOECTL_VERSION "0.1.0"

static const char *prog = "moectl";

__attribute__((format(printf, 1, 2))) static void errorf(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "%s: ", prog);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

/* Parses a whole decimal integer in [min, max] for option opt. */
static int parse_long(const char *opt, const char *s, long min, long max, long *ret)
{
    char *end;
    long v;

    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < min || v > max) {
        errorf("%s '%s': expected an integer from %ld to %ld", opt, s, min, max);
        return -EINVAL;
    }
    *ret = v;
    return 0;
}

static int parse_int(const char *opt, const char *s, int min, int max, int *ret)
{
    long v;
    int r = parse_long(opt, s, min, max, &v);

    if (r == 0)
        *ret = (int)v;
    return r;
}

static int parse_u64(const char *opt, const char *s, uint64_t *ret)
{
    char *end;
    unsigned long long v;

    errno = 0;
    v = strtoull(s, &end, 0);
    if (errno || end == s || *end || s[0] == '-') {
        errorf("%s '%s': expected a non-negative integer", opt, s);
        return -EINVAL;
    }
    *ret = v;
    return 0;
}

/* "1.5 GiB" */
static const char *human_bytes(uint64_t n, char *buf, size_t len)
{
    static const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)n;
    size_t u = 0;

    while (v >= 1024.0 && u + 1 < MOE_ARRAY_SIZE(units)) {
        v /= 1024.0;
        u++;
    }
    if (u == 0)
        snprintf(buf, len, "%llu B", (unsigned long long)n);
    else
        snprintf(buf, len, "%.1f %s", v, units[u]);
    return buf;
}

/* ---- gen-model ---------------------------------------------------------- */

static void gen_model_usage(FILE *f)
{
    fprintf(f, "usage: moectl gen-model --arch ARCH --out DIR [options]\n"
               "\n"
               "Writes a deterministic synthetic checkpoint in the exact Hugging Face layout of\n"
               "the family (config.json, safetensors shards, index), with skewed routers.\n"
               "\n"
               "  --arch ARCH            mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3\n"
               "  --out DIR              output directory (created; old shards replaced)\n"
               "  --layers N             decoder layers\n"
               "  --experts E            routed experts per MoE layer\n"
               "  --top-k K              experts per token\n"
               "  --hidden H             hidden size\n"
               "  --ffn F                routed expert intermediate size\n"
               "  --shared-experts S     shared experts (qwen2_moe: 0 or 1; deepseek_v3: any)\n"
               "  --dtype bf16|f16|f32   weight type (default bf16)\n"
               "  --shards N             safetensors files (default 1)\n"
               "  --seed S               seed of the weights (default 0)\n"
               "  -q, --quiet            no progress output\n"
               "\n"
               "Unset sizes take the family's small defaults; `moectl inspect` shows them.\n");
}

struct progress_ctx {
    bool show;
};

static void gen_progress(void *ctx, int done, int total)
{
    struct progress_ctx *p = ctx;
    const int width = 30;
    int fill = total > 0 ? done * width / total : width;

    if (!p->show)
        return;
    fprintf(stderr, "\r  writing [%.*s%*s] %d/%d files", fill, "##############################",
            width - fill, "", done, total);
    if (done == total)
        fputc('\n', stderr);
    fflush(stderr);
}

static int cmd_gen_model(int argc, char **argv)
{
    static const struct option opts[] = {
        {"arch", required_argument, NULL, 'a'},   {"out", required_argument, NULL, 'o'},
        {"layers", required_argument, NULL, 'L'}, {"experts", required_argument, NULL, 'E'},
        {"top-k", required_argument, NULL, 'k'},  {"hidden", required_argument, NULL, 'H'},
        {"ffn", required_argument, NULL, 'F'},    {"shared-experts", required_argument, NULL, 'S'},
        {"dtype", required_argument, NULL, 'd'},  {"shards", required_argument, NULL, 'n'},
        {"seed", required_argument, NULL, 's'},   {"quiet", no_argument, NULL, 'q'},
        {"help", no_argument, NULL, 'h'},         {0},
    };
    struct moe_genmodel_opts o;
    struct progress_ctx pc = {.show = isatty(STDERR_FILENO)};
    struct moe_error err = {0};
    struct moe_model *m = NULL;
    const char *arch = NULL, *out = NULL;
    int layers = 0, experts = 0, top_k = 0, hidden = 0, ffn = 0, shared = -1, shards = 1;
    enum moe_dtype dtype = MOE_DTYPE_BF16;
    enum moe_arch a;
    uint64_t seed = 0, t0;
    char b1[32];
    int c, r = 0;

    while ((c = getopt_long(argc, argv, "qh", opts, NULL)) != -1) {
        switch (c) {
        case 'a':
            arch = optarg;
            break;
        case 'o':
            out = optarg;
            break;
        case 'L':
            r = parse_int("--layers", optarg, 1, MOE_MAX_LAYERS, &layers);
            break;
        case 'E':
            r = parse_int("--experts", optarg, 1, MOE_MAX_EXPERTS, &experts);
            break;
        case 'k':
            r = parse_int("--top-k", optarg, 1, MOE_MAX_TOP_K, &top_k);
            break;
        case 'H':
            r = parse_int("--hidden", optarg, 1, MOE_MAX_HIDDEN, &hidden);
            break;
        case 'F':
            r = parse_int("--ffn", optarg, 1, MOE_MAX_FFN, &ffn);
            break;
        case 'S':
            r = parse_int("--shared-experts", optarg, 0, 64, &shared);
            break;
        case 'n':
            r = parse_int("--shards", optarg, 1, 99999, &shards);
            break;
        case 's':
            r = parse_u64("--seed", optarg, &seed);
            break;
        case 'd':
            if (moe_dtype_parse_user(optarg, &dtype) < 0) {
                errorf("--dtype '%s': expected bf16, f16 or f32", optarg);
                return 2;
            }
            break;
        case 'q':
            pc.show = false;
            break;
        case 'h':
            gen_model_usage(stdout);
            return 0;
        default:
            gen_model_usage(stderr);
            return 2;
        }
        if (r < 0)
            return 2;
    }
    if (optind < argc) {
        errorf("gen-model: unexpected argument '%s'", argv[optind]);
        return 2;
    }
    if (!arch || !out) {
        errorf("gen-model: --arch and --out are required (see moectl gen-model --help)");
        return 2;
    }
    if (moe_arch_parse(arch, &a) < 0) {
        errorf("--arch '%s': expected mixtral, qwen2_moe, qwen3_moe, olmoe or deepseek_v3", arch);
        return 2;
    }
    moe_genmodel_defaults(a, &o);
    o.out_dir = out;
    if (layers)
        o.n_layers = layers;
    if (experts)
        o.n_experts = experts;
    if (top_k)
        o.top_k = top_k;
    if (hidden)
        o.hidden = hidden;
    if (ffn)
        o.ffn = ffn;
    if (shared >= 0)
        o.n_shared = shared;
    o.dtype = dtype;
    o.n_shards = shards;
    o.seed = seed;
    o.progress = gen_progress;
    o.progress_ctx = &pc;

    t0 = moe_now_ns();
    r = moe_genmodel_write(&o, &err);
    if (r < 0) {
        errorf("gen-model: %s", err.msg);
        return 1;
    }
    /* Read back what was written with the real loader: the generator and the
     * loader must agree. */
    r = moe_model_open(out, &m, &err);
    if (r < 0) {
        errorf("gen-model: the written checkpoint does not load: %s", err.msg);
        return 1;
    }
    printf("wrote %s checkpoint to %s: %d layers (%d MoE), %d experts, top-%d, hidden %d, "
           "expert ffn %d, %s, %zu file(s), %s of experts in %.2f s\n",
           moe_arch_name(a), out, m->cfg.n_layers, m->n_moe_layers, m->cfg.n_experts, m->cfg.top_k,
           m->cfg.hidden, m->cfg.expert_ffn, moe_dtype_user_name(m->expert_dtype), m->n_files,
           human_bytes(m->total_expert_bytes, b1, sizeof(b1)), (double)(moe_now_ns() - t0) / 1e9);
    moe_model_free(m);
    return 0;
}

/* ---- inspect ------------------------------------------------------------ */

static void inspect_usage(FILE *f)
{
    fprintf(f, "usage: moectl inspect --model DIR [--json]\n"
               "\n"
               "Describes a checkpoint: architecture, layers (MoE or dense), experts per layer,\n"
               "top-k, routing rule, shared experts, dtype, bytes per expert and in all.\n"
               "Reads only config.json and the safetensors headers.\n");
}

static const char *routing_rule(const struct moe_model_config *c, char *buf, size_t len)
{
    if (c->score_func == MOE_SCORE_SIGMOID)
        snprintf(buf, len, "sigmoid, bias for selection, %d groups keep %d, %s, x %g", c->n_group,
                 c->topk_group, c->norm_topk_prob ? "renormalised" : "not renormalised",
                 (double)c->routed_scaling_factor);
    else
        snprintf(buf, len, "softmax, %s", c->norm_topk_prob ? "renormalised" : "not renormalised");
    return buf;
}

static int inspect_json(const struct moe_model *m)
{
    const struct moe_model_config *c = &m->cfg;
    json_t *root = json_object(), *layers = json_array(), *files = json_array();
    int r = 1;

    if (!root || !layers || !files)
        goto out;
    for (size_t i = 0; i < m->n_files; i++)
        json_array_append_new(files, json_pack("{s:s, s:I}", "name", m->files[i].name, "bytes",
                                               (json_int_t)m->files[i].size));
    for (int i = 0; i < c->n_layers; i++) {
        const struct moe_layer *L = &m->layers[i];

        json_array_append_new(layers, json_pack("{s:i, s:s, s:i, s:b}", "layer", i, "kind",
                                                L->is_moe ? "moe" : "dense", "experts",
                                                L->is_moe ? c->n_experts : 0, "shared",
                                                L->is_moe && L->has_shared));
    }
    json_object_set_new(root, "model", json_string(m->dir));
    json_object_set_new(root, "architecture", json_string(moe_arch_name(c->arch)));
    json_object_set_new(root, "layers", json_integer(c->n_layers));
    json_object_set_new(root, "moe_layers", json_integer(m->n_moe_layers));
    json_object_set_new(root, "hidden", json_integer(c->hidden));
    json_object_set_new(root, "expert_ffn", json_integer(c->expert_ffn));
    json_object_set_new(root, "experts", json_integer(c->n_experts));
    json_object_set_new(root, "top_k", json_integer(c->top_k));
    json_object_set_new(root, "score_func",
                        json_string(c->score_func == MOE_SCORE_SIGMOID ? "sigmoid" : "softmax"));
    json_object_set_new(root, "norm_topk_prob", json_boolean(c->norm_topk_prob));
    json_object_set_new(root, "n_group", json_integer(c->n_group));
    json_object_set_new(root, "topk_group", json_integer(c->topk_group));
    json_object_set_new(root, "routed_scaling_factor", json_real(c->routed_scaling_factor));
    json_object_set_new(root, "shared_experts", json_integer(c->n_shared_experts));
    json_object_set_new(root, "shared_ffn", json_integer(c->shared_ffn));
    json_object_set_new(root, "shared_expert_gate", json_boolean(c->shared_expert_gate));
    json_object_set_new(root, "dtype", json_string(moe_dtype_user_name(m->expert_dtype)));
    json_object_set_new(root, "bytes_per_expert", json_integer((json_int_t)m->expert_bytes));
    json_object_set_new(root, "total_expert_bytes",
                        json_integer((json_int_t)m->total_expert_bytes));
    json_object_set_new(root, "files", files);
    json_object_set_new(root, "layer_table", layers);
    files = layers = NULL;
    if (json_dumpf(root, stdout, JSON_INDENT(2)) == 0) {
        fputc('\n', stdout);
        r = 0;
    }
out:
    json_decref(root);
    json_decref(layers);
    json_decref(files);
    return r;
}

static int cmd_inspect(int argc, char **argv)
{
    static const struct option opts[] = {
        {"model", required_argument, NULL, 'm'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {0},
    };
    struct moe_error err = {0};
    struct moe_model *m = NULL;
    const char *dir = NULL;
    bool json = false;
    char b1[32], b2[32], rule[160];
    uint64_t file_bytes = 0;
    int c, r;

    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'm':
            dir = optarg;
            break;
        case 'j':
            json = true;
            break;
        case 'h':
            inspect_usage(stdout);
            return 0;
        default:
            inspect_usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        errorf("inspect: unexpected argument '%s'", argv[optind]);
        return 2;
    }
    if (!dir) {
        errorf("inspect: --model DIR is required");
        return 2;
    }
    r = moe_model_open(dir, &m, &err);
    if (r < 0) {
        errorf("inspect: %s", err.msg);
        return 1;
    }
    if (json) {
        r = inspect_json(m);
        moe_model_free(m);
        return r;
    }

    const struct moe_model_config *cf = &m->cfg;
    for (size_t i = 0; i < m->n_files; i++)
        file_bytes += m->files[i].size;
    printf("model         %s\n", m->dir);
    printf("architecture  %s\n", moe_arch_name(cf->arch));
    printf("files         %zu, %s\n", m->n_files, human_bytes(file_bytes, b1, sizeof(b1)));
    printf("layers        %d: %d MoE, %d dense\n", cf->n_layers, m->n_moe_layers,
           cf->n_layers - m->n_moe_layers);
    printf("hidden        %d\n", cf->hidden);
    printf("experts       %d per MoE layer, top-%d, expert ffn %d\n", cf->n_experts, cf->top_k,
           cf->expert_ffn);
    printf("routing       %s\n", routing_rule(cf, rule, sizeof(rule)));
    if (cf->n_shared_experts > 0)
        printf("shared        %d expert(s), ffn %d%s\n", cf->n_shared_experts, cf->shared_ffn,
               cf->shared_expert_gate ? ", scaled by sigmoid(shared_expert_gate . x)" : "");
    else
        printf("shared        none\n");
    printf("dtype         %s\n", moe_dtype_user_name(m->expert_dtype));
    printf("expert bytes  %llu (%s) per routed expert\n", (unsigned long long)m->expert_bytes,
           human_bytes(m->expert_bytes, b1, sizeof(b1)));
    printf("all experts   %llu (%s) routed and shared\n", (unsigned long long)m->total_expert_bytes,
           human_bytes(m->total_expert_bytes, b2, sizeof(b2)));
    printf("\nlayer  kind   experts  shared\n");
    for (int i = 0; i < cf->n_layers; i++) {
        const struct moe_layer *L = &m->layers[i];

        if (L->is_moe)
            printf("%5d  moe    %7d  %s\n", i, cf->n_experts, L->has_shared ? "yes" : "no");
        else
            printf("%5d  dense        -  -\n", i);
    }
    moe_model_free(m);
    return 0;
}

/* ---- forward ------------------------------------------------------------ */

static void forward_usage(FILE *f)
{
    fprintf(f, "usage: moectl forward --local --model DIR --layer L --in X.npy --out Y.npy\n"
               "                      [--routing-out R.npz] [--routing-in R.npz]\n"
               "                      [--threads N] [--kernel auto|generic|avx2|avx512] [-q]\n"
               "\n"
               "Runs one MoE layer in this process.  X.npy: float32 [tokens, hidden] hidden\n"
               "states; Y.npy: float32 [tokens, hidden], the layer's output (routed experts\n"
               "weighted and summed, plus shared experts).  --routing-out writes the routing used\n"
               "(arrays 'ids' int32 and 'weights' float32, [tokens, top_k]); --routing-in takes\n"
               "the routing from such a file instead of the model's router.\n"
               "\n"
               "--local is required for now: forwarding through a running moed comes with the\n"
               "daemon.\n");
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

static int cmd_forward(int argc, char **argv)
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
        {"quiet", no_argument, NULL, 'q'},
        {"help", no_argument, NULL, 'h'},
        {0},
    };
    const char *dir = NULL, *in = NULL, *outp = NULL, *rout = NULL, *rin = NULL;
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
    int layer = -1, c, r, ret = 1, T;
    char b1[32];

    while ((c = getopt_long(argc, argv, "qh", opts, NULL)) != -1) {
        switch (c) {
        case 'l':
            local = true;
            break;
        case 'm':
            dir = optarg;
            break;
        case 'L':
            if (parse_int("--layer", optarg, 0, MOE_MAX_LAYERS - 1, &layer) < 0)
                return 2;
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
            cpu.kernel = optarg;
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
    if (!local) {
        errorf("forward: --local is required: forwarding through a running moed is not "
               "available yet");
        return 2;
    }
    if (!dir || layer < 0 || !in || !outp) {
        errorf("forward: --model, --layer, --in and --out are required (see moectl forward "
               "--help)");
        return 2;
    }

    if (moe_model_open(dir, &m, &err) < 0) {
        errorf("forward: %s", err.msg);
        goto out;
    }
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
    if (moe_engine_init(m, b, &e) < 0) {
        errorf("forward: out of memory");
        goto out;
    }
    ids = malloc((size_t)T * m->cfg.top_k * sizeof(*ids));
    w = malloc((size_t)T * m->cfg.top_k * sizeof(*w));
    y = malloc((size_t)T * m->cfg.hidden * sizeof(*y));
    if (!ids || !w || !y) {
        errorf("forward: out of memory for %d tokens", T);
        goto out;
    }
    r = moe_layer_forward(e, layer, x.data, T, rin ? rids.data : NULL, rin ? rw.data : NULL, y, ids,
                          w, &st, &err);
    if (r < 0) {
        errorf("forward: %s", err.msg);
        goto out;
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
    if (!quiet) {
        uint64_t total = st.route_ns + st.load_ns + st.compute_ns;

        printf("layer %d: %d tokens, %d of %d experts used (%s read), %.3f ms: route %.3f ms, "
               "read %.3f ms, compute %.3f ms; %.0f tokens/s [%s %s]\n",
               layer, T, st.experts_used, m->cfg.n_experts,
               human_bytes(st.bytes_read, b1, sizeof(b1)), (double)total / 1e6,
               (double)st.route_ns / 1e6, (double)st.load_ns / 1e6, (double)st.compute_ns / 1e6,
               total ? (double)T * 1e9 / (double)total : 0.0, b->ops->name,
               moe_backend_cpu_kernel(b));
    }
    ret = 0;
out:
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

/* ---- main --------------------------------------------------------------- */

static const struct command {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
} commands[] = {
    {"gen-model", cmd_gen_model, "write a deterministic synthetic checkpoint"},
    {"inspect", cmd_inspect, "describe a checkpoint (architecture, layers, experts, bytes)"},
    {"forward", cmd_forward, "run one MoE layer on a .npy of hidden states (--local)"},
};

static void usage(FILE *f)
{
    fprintf(f, "usage: moectl COMMAND [options]\n\ncommands:\n");
    for (size_t i = 0; i < MOE_ARRAY_SIZE(commands); i++)
        fprintf(f, "  %-10s  %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "\n`moectl COMMAND --help` describes each command.  moectl %s\n", MOECTL_VERSION);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("moectl %s\n", MOECTL_VERSION);
        return 0;
    }
    for (size_t i = 0; i < MOE_ARRAY_SIZE(commands); i++) {
        if (strcmp(argv[1], commands[i].name) == 0) {
            optind = 1;
            return commands[i].run(argc - 1, argv + 1);
        }
    }
    errorf("unknown command '%s' (see moectl --help)", argv[1]);
    return 2;
}
