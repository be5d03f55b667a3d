/*
 * moectl gen-model and inspect: write a synthetic checkpoint, describe one.
 */
#include "moectl.h"

#include "common.h"
#include "genmodel.h"
#include "model.h"
#include "quant.h"

#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- gen-model ---------------------------------------------------------- */

static void gen_model_usage(FILE *f)
{
    fprintf(f, "usage: moectl gen-model --arch ARCH --out DIR [options]\n"
               "\n"
               "Writes a deterministic synthetic checkpoint in the exact Hugging Face layout of\n"
               "the family (config.json, safetensors shards, index), with skewed routers.\n"
               "\n"
               "  --arch ARCH            mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3,\n"
               "                         deepseek_v2, kimi_k2, glm4_moe, qwen3_next, qwen3_5_moe,\n"
               "                         llama4_text, gpt_oss\n"
               "  --layout per-expert|fused\n"
               "                         how the routed experts are stored: per expert\n"
               "                         (mlp.experts.E.gate_proj...) or fused as transformers 5\n"
               "                         keeps them (mlp.experts.gate_up_proj, down_proj), with\n"
               "                         the same values; default: as the family ships (fused\n"
               "                         for qwen3_5_moe, fused and transposed for llama4_text\n"
               "                         (feed_forward.experts.gate_up_proj [E, H, 2F]), fused,\n"
               "                         transposed and interleaved for gpt_oss (its only\n"
               "                         layout), per expert for the others)\n"
               "  --out DIR              output directory (created; refused when not empty)\n"
               "  --force                write into a non-empty --out, replacing a checkpoint\n"
               "  --layers N             decoder layers\n"
               "  --experts E            routed experts per MoE layer\n"
               "  --top-k K              experts per token\n"
               "  --hidden H             hidden size\n"
               "  --ffn F                routed expert intermediate size\n"
               "  --shared-experts S     shared experts (qwen2_moe, qwen3_next, qwen3_5_moe:\n"
               "                         0 or 1; deepseek_v3,\n"
               "                         deepseek_v2, kimi_k2, glm4_moe: any; llama4_text: 1)\n"
               "  --dtype bf16|f16|f32|fp8|mxfp4\n"
               "                         weight type (default bf16); fp8: linear weights as\n"
               "                         float8 e4m3 with a float32 weight_scale_inv per\n"
               "                         128x128 block, the rest bf16 (DeepSeek-V3's layout);\n"
               "                         mxfp4 (gpt_oss): the experts as released, e2m1\n"
               "                         blocks with an e8m0 scale per 32, the rest bf16\n"
               "  --shards N             safetensors files (default 1)\n"
               "  --seed S               seed of the weights (default 0)\n"
               "  -q, --quiet            no progress output\n"
               "\n"
               "Unset sizes take the family's small defaults:\n"
               "  family       layers experts top-k hidden  ffn shared\n");
    for (int a = 0; a < MOE_ARCH_COUNT; a++) {
        struct moe_genmodel_opts o;

        moe_genmodel_defaults((enum moe_arch)a, &o);
        fprintf(f, "  %-12s %6d %7d %5d %6d %4d %6d\n", moe_arch_name((enum moe_arch)a), o.n_layers,
                o.n_experts, o.top_k, o.hidden, o.ffn, o.n_shared);
    }
    fprintf(f, "`moectl inspect --model DIR` shows what was written.\n");
}

/* gen-model refuses a non-empty --out without --force, as pack does: a
 * mistyped path must not overwrite someone's checkpoint.  0, or 1 with the
 * message printed. */
static int check_out_dir(const char *out, bool force)
{
    DIR *dir = opendir(out);
    struct dirent *e;
    bool empty = true;

    if (!dir)
        return 0; /* missing: created; not a directory: the writer says so */
    while ((e = readdir(dir)))
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) {
            empty = false;
            break;
        }
    closedir(dir);
    if (empty || force)
        return 0;
    errorf("gen-model: '%s' is not empty; pass --force to write the checkpoint into it anyway "
           "(its files of the same names are replaced), or choose another --out",
           out);
    return 1;
}

struct progress_ctx {
    bool show;
    int last_pct, last_file; /* what the line shows now; -1: nothing yet */
    bool ended;
};

/* One line on a terminal, redrawn as bytes are written: by bytes, not by
 * files (a checkpoint of one 1.5 GiB shard used to sit at "1/2 files"). */
static void gen_progress(void *ctx, const struct moe_genmodel_progress *pr)
{
    struct progress_ctx *p = ctx;
    const int width = 30;
    uint64_t total = MOE_MAX(pr->bytes_total, 1);
    int pct = (int)(pr->bytes_done * 100 / total), fill = (int)(pr->bytes_done * width / total);
    bool end = pr->file == pr->n_files && pr->bytes_done >= pr->bytes_total;
    char b1[32], b2[32];

    /* Redrawn when the percentage or the file changes: at most ~100 lines. */
    if (!p->show || p->ended || (pct == p->last_pct && pr->file == p->last_file && !end))
        return;
    p->last_pct = pct;
    p->last_file = pr->file;
    fprintf(stderr, "\r  writing [%.*s%*s] %3d%%  %s of %s, file %d of %d  ", fill,
            "##############################", width - fill, "", pct,
            human_bytes(pr->bytes_done, b1, sizeof(b1)),
            human_bytes(pr->bytes_total, b2, sizeof(b2)), pr->file, pr->n_files);
    if (end) {
        fputc('\n', stderr);
        p->ended = true;
    }
    fflush(stderr);
}

int moectl_gen_model(int argc, char **argv)
{
    static const struct option opts[] = {
        {"arch", required_argument, NULL, 'a'},
        {"layout", required_argument, NULL, 'l'},
        {"out", required_argument, NULL, 'o'},
        {"layers", required_argument, NULL, 'L'},
        {"experts", required_argument, NULL, 'E'},
        {"top-k", required_argument, NULL, 'k'},
        {"hidden", required_argument, NULL, 'H'},
        {"ffn", required_argument, NULL, 'F'},
        {"shared-experts", required_argument, NULL, 'S'},
        {"dtype", required_argument, NULL, 'd'},
        {"shards", required_argument, NULL, 'n'},
        {"seed", required_argument, NULL, 's'},
        {"quiet", no_argument, NULL, 'q'},
        {"force", no_argument, NULL, 'f'},
        {"help", no_argument, NULL, 'h'},
        {0},
    };
    struct moe_genmodel_opts o;
    struct progress_ctx pc = {.show = isatty(STDERR_FILENO), .last_pct = -1};
    struct moe_error err = {0};
    struct moe_model *m = NULL;
    const char *arch = NULL, *out = NULL;
    int layers = 0, experts = 0, top_k = 0, hidden = 0, ffn = 0, shared = -1, shards = 1;
    enum moe_dtype dtype = MOE_DTYPE_BF16;
    enum moe_quant quant = MOE_QUANT_NONE;
    enum moe_genmodel_layout layout = MOE_GEN_LAYOUT_DEFAULT;
    enum moe_arch a;
    bool force = false;
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
        case 'l':
            if (strcmp(optarg, "per-expert") == 0) {
                layout = MOE_GEN_LAYOUT_PER_EXPERT;
            } else if (strcmp(optarg, "fused") == 0) {
                layout = MOE_GEN_LAYOUT_FUSED;
            } else {
                errorf("--layout '%s': expected per-expert or fused", optarg);
                return 2;
            }
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
            quant = MOE_QUANT_NONE;
            if (strcmp(optarg, "fp8") == 0) {
                dtype = MOE_DTYPE_F8_E4M3;
            } else if (strcmp(optarg, "mxfp4") == 0) {
                dtype = MOE_DTYPE_BF16;
                quant = MOE_QUANT_MXFP4;
            } else if (moe_dtype_parse_user(optarg, &dtype) < 0) {
                errorf("--dtype '%s': expected bf16, f16, f32, fp8 or mxfp4", optarg);
                return 2;
            }
            break;
        case 'q':
            pc.show = false;
            break;
        case 'f':
            force = true;
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
        errorf("--arch '%s': expected mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, "
               "deepseek_v2, kimi_k2, glm4_moe, qwen3_next, qwen3_5_moe, llama4_text or gpt_oss",
               arch);
        return 2;
    }
    if (check_out_dir(out, force))
        return 1;
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
    o.quant = quant;
    o.n_shards = shards;
    o.layout = layout;
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
           m->cfg.hidden, m->cfg.expert_ffn,
           m->expert_quant.q != MOE_QUANT_NONE ? moe_quant_name(m->expert_quant.q)
                                               : moe_dtype_user_name(m->expert_dtype),
           m->n_files, human_bytes(m->total_expert_bytes, b1, sizeof(b1)),
           (double)(moe_now_ns() - t0) / 1e9);
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
    if (c->score_func == MOE_SCORE_TOPK_SIGMOID)
        snprintf(buf, len, "top-k of the logits, sigmoid(logit) scales the expert's input");
    else if (c->score_func == MOE_SCORE_SIGMOID)
        snprintf(buf, len, "sigmoid, bias for selection, %d groups keep %d, %s, x %g", c->n_group,
                 c->topk_group, c->norm_topk_prob ? "renormalised" : "not renormalised",
                 (double)c->routed_scaling_factor);
    else if (c->n_group > 1 && c->topk_group < c->n_group)
        snprintf(buf, len, "softmax, %d groups keep %d (a group's best expert), %s, x %g",
                 c->n_group, c->topk_group, c->norm_topk_prob ? "renormalised" : "not renormalised",
                 (double)c->routed_scaling_factor);
    else if (c->routed_scaling_factor != 1.0f)
        snprintf(buf, len, "softmax, %s, x %g",
                 c->norm_topk_prob ? "renormalised" : "not renormalised",
                 (double)c->routed_scaling_factor);
    else if (c->router_bias)
        snprintf(buf, len, "logits + router bias, top-k, softmax over the k");
    else
        snprintf(buf, len, "softmax, %s", c->norm_topk_prob ? "renormalised" : "not renormalised");
    return buf;
}

/* How the routed experts are stored: per expert, fused (transformers 5's
 * gate_up_proj and down_proj), fused-transposed (Llama 4's),
 * fused-interleaved (gpt-oss's), fused-interleaved-mxfp4 (gpt-oss's as released), or
 * several of them in different layers. */
static const char *expert_layout(const struct moe_model *m)
{
    bool fused = false, separate = false, transposed = false, interleaved = false, mx = false;

    for (int i = 0; i < m->cfg.n_layers; i++) {
        if (!m->layers[i].is_moe)
            continue;
        if (m->layers[i].experts[0].interleaved && !m->layers[i].experts[0].transposed)
            mx = true;
        else if (m->layers[i].experts[0].interleaved)
            interleaved = true;
        else if (m->layers[i].experts[0].transposed)
            transposed = true;
        else if (m->layers[i].experts[0].gate.slice)
            fused = true;
        else
            separate = true;
    }
    if (fused + separate + transposed + interleaved + mx > 1)
        return "mixed";
    return mx            ? "fused-interleaved-mxfp4"
           : interleaved ? "fused-interleaved"
           : transposed  ? "fused-transposed"
           : fused       ? "fused"
                         : "per-expert";
}

static const char *score_func_name(enum moe_score_func f)
{
    return f == MOE_SCORE_TOPK_SIGMOID ? "topk_sigmoid"
           : f == MOE_SCORE_SIGMOID    ? "sigmoid"
                                       : "softmax";
}

/* What the layout line adds to the layout's name. */
static const char *layout_detail(const char *layout)
{
    if (strcmp(layout, "fused") == 0)
        return " (mlp.experts.gate_up_proj [E, 2 x ffn, hidden], down_proj [E, hidden, ffn])";
    if (strcmp(layout, "fused-transposed") == 0)
        return " (feed_forward.experts.gate_up_proj [E, hidden, 2 x ffn], down_proj [E, ffn, "
               "hidden]; made plain as each expert is read)";
    if (strcmp(layout, "fused-interleaved") == 0)
        return " (mlp.experts.gate_up_proj [E, hidden, 2 x ffn], gate and up columns "
               "interleaved, down_proj [E, ffn, hidden], with their biases; made plain as each "
               "expert is read)";
    if (strcmp(layout, "fused-interleaved-mxfp4") == 0)
        return " (mlp.experts.gate_up_proj_blocks [E, 2 x ffn, hidden / 32, 16] and _scales, "
               "gate and up rows interleaved, down_proj_blocks [E, hidden, ffn / 32, 16] and "
               "_scales, with their biases; gate and up taken apart as each expert is read)";
    return "";
}

/* The routed experts' quantization, for people: "none", or the format,
 * its scale block and where the scales are. */
static const char *quant_text(const struct moe_quant_fmt *q, char *buf, size_t len)
{
    switch (q->q) {
    case MOE_QUANT_NONE:
        snprintf(buf, len, "none");
        break;
    case MOE_QUANT_FP8:
        snprintf(buf, len, "fp8 (float8 e4m3), one f32 scale per %d x %d block (weight_scale_inv)",
                 q->brows, q->bcols);
        break;
    case MOE_QUANT_MXFP4:
        snprintf(buf, len, "mxfp4 (e2m1), one e8m0 scale per %d values", q->bcols);
        break;
    default:
        snprintf(buf, len, "%s, symmetric, one f32 scale per %d values of a row (weight_scale)",
                 moe_quant_name(q->q), q->bcols);
        break;
    }
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
    json_object_set_new(root, "score_func", json_string(score_func_name(c->score_func)));
    json_object_set_new(root, "scale_input", json_boolean(c->scale_input));
    json_object_set_new(root, "norm_topk_prob", json_boolean(c->norm_topk_prob));
    json_object_set_new(root, "n_group", json_integer(c->n_group));
    json_object_set_new(root, "topk_group", json_integer(c->topk_group));
    json_object_set_new(root, "routed_scaling_factor", json_real(c->routed_scaling_factor));
    json_object_set_new(root, "shared_experts", json_integer(c->n_shared_experts));
    json_object_set_new(root, "shared_ffn", json_integer(c->shared_ffn));
    json_object_set_new(root, "shared_expert_gate", json_boolean(c->shared_expert_gate));
    json_object_set_new(root, "router_bias", json_boolean(c->router_bias));
    json_object_set_new(root, "expert_bias", json_boolean(c->expert_bias));
    json_object_set_new(root, "activation",
                        json_string(c->act == MOE_ACT_SWIGLU_CLAMP ? "swiglu_clamp" : "silu"));
    if (c->act == MOE_ACT_SWIGLU_CLAMP) {
        json_object_set_new(root, "swiglu_alpha", json_real(c->swiglu_alpha));
        json_object_set_new(root, "swiglu_limit", json_real(c->swiglu_limit));
    }
    json_object_set_new(root, "dtype", json_string(moe_dtype_user_name(m->expert_dtype)));
    if (m->expert_quant.q != MOE_QUANT_NONE)
        json_object_set_new(root, "quantization",
                            json_pack("{s:s, s:[i, i], s:s}", "format",
                                      moe_quant_name(m->expert_quant.q), "block",
                                      m->expert_quant.brows, m->expert_quant.bcols, "scale_dtype",
                                      m->expert_quant.q == MOE_QUANT_MXFP4 ? "e8m0" : "f32"));
    else
        json_object_set_new(root, "quantization", json_null());
    json_object_set_new(root, "expert_layout", json_string(expert_layout(m)));
    json_object_set_new(root, "bytes_per_expert", json_integer((json_int_t)m->expert_bytes));
    json_object_set_new(root, "total_expert_bytes",
                        json_integer((json_int_t)m->total_expert_bytes));
    json_object_set_new(root, "files", files);
    json_object_set_new(root, "layer_table", layers);
    files = layers = NULL;
    if (json_dumpf(root, stdout, JSON_INDENT(2) | JSON_REAL_PRECISION(6)) == 0) {
        fputc('\n', stdout);
        r = 0;
    }
out:
    json_decref(root);
    json_decref(layers);
    json_decref(files);
    return r;
}

int moectl_inspect(int argc, char **argv)
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
               cf->shared_expert_gate ? ", scaled by sigmoid(shared_expert_gate . x)"
               : cf->scale_input      ? ", on the unscaled input"
                                      : "");
    else
        printf("shared        none\n");
    if (cf->act == MOE_ACT_SWIGLU_CLAMP)
        printf("activation    clamped SwiGLU (alpha %g, limit %g)%s\n", (double)cf->swiglu_alpha,
               (double)cf->swiglu_limit, cf->expert_bias ? ", gate/up and down biases" : "");
    printf("dtype         %s\n", moe_dtype_user_name(m->expert_dtype));
    printf("quantization  %s\n", quant_text(&m->expert_quant, rule, sizeof(rule)));
    printf("layout        %s%s\n", expert_layout(m), layout_detail(expert_layout(m)));
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
