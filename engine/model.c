/*
 * Models: owns the parsing of config.json for each supported family, the
 * opening of a checkpoint directory (index, shard headers, open file
 * descriptors), the mapping of every MoE layer to the byte ranges of its
 * router, bias, routed and shared experts, and reading those ranges.
 *
 * Invariants of an open model: every file in files[] is open read-only and
 * its header passed moe_st_header_read_fd(); every tensor_ref points into
 * headers[] and holds a range inside its file as it was at open; every MoE
 * layer has all its routed experts, of one dtype (expert_dtype) and of the
 * shapes config.json implies; no dense layer has MoE tensors.  A model is
 * read-only once open: moe_model_read() only uses pread() on the kept fds, so
 * any number of threads may read at once without a lock.
 *
 * A packed store (pack.h) opens through the same code: its experts.bin is
 * the one file and its index's tensors the one header, so that names,
 * shapes and dtypes are checked exactly as for a checkpoint; then each
 * routed expert gets its blob and checksum from the index.
 */
#include "fileio.h"
#include "json.h"
#include "model.h"
#include "pack.h"
#include "quant.h"
#include "safetensors.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CONFIG_MAX_BYTES (16u << 20)
#define INDEX_MAX_BYTES (64u << 20)
#define CONFIG_NAME "config.json"
#define INDEX_NAME "model.safetensors.index.json"
#define SINGLE_NAME "model.safetensors"
#define VALUE_TEXT_MAX 64
#define NAME_MAX_LEN 256

/* ---- architectures -------------------------------------------------------- */

static const char *const arch_names[MOE_ARCH_COUNT] = {
    [MOE_ARCH_MIXTRAL] = "mixtral",         [MOE_ARCH_QWEN2_MOE] = "qwen2_moe",
    [MOE_ARCH_QWEN3_MOE] = "qwen3_moe",     [MOE_ARCH_OLMOE] = "olmoe",
    [MOE_ARCH_DEEPSEEK_V3] = "deepseek_v3", [MOE_ARCH_DEEPSEEK_V2] = "deepseek_v2",
    [MOE_ARCH_KIMI_K2] = "kimi_k2",         [MOE_ARCH_GLM4_MOE] = "glm4_moe",
    [MOE_ARCH_QWEN3_NEXT] = "qwen3_next",   [MOE_ARCH_QWEN3_5_MOE] = "qwen3_5_moe",
    [MOE_ARCH_LLAMA4] = "llama4_text",      [MOE_ARCH_GPT_OSS] = "gpt_oss",
};

#define ARCH_LIST                                                                                  \
    "mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, deepseek_v2, kimi_k2, glm4_moe, "          \
    "qwen3_next, qwen3_5_moe (or qwen3_5_moe_text), llama4_text (or llama4), gpt_oss"

/* The model_type of transformers' text-only Qwen3.5-MoE class. */
#define QWEN3_5_TEXT "qwen3_5_moe_text"
#define LAYER_PREFIX "model.layers."
#define LAYER_PREFIX_MM "model.language_model.layers."
/* The model_type of Llama 4's multimodal config, and its text layers. */
#define LLAMA4_MM "llama4"
#define LAYER_PREFIX_LLAMA4_MM "language_model.model.layers."

/* DeepSeek's layout: n_routed_experts, shared_experts, first_k_dense_replace. */
static bool is_deepseek_like(enum moe_arch a)
{
    return a == MOE_ARCH_DEEPSEEK_V3 || a == MOE_ARCH_DEEPSEEK_V2 || a == MOE_ARCH_KIMI_K2 ||
           a == MOE_ARCH_GLM4_MOE;
}

/* Qwen's shared expert: mlp.shared_expert.*, scaled by sigmoid(shared_expert_gate . x). */
static bool has_qwen_shared(enum moe_arch a)
{
    return a == MOE_ARCH_QWEN2_MOE || a == MOE_ARCH_QWEN3_NEXT || a == MOE_ARCH_QWEN3_5_MOE;
}

const char *moe_arch_name(enum moe_arch a)
{
    return (unsigned)a < MOE_ARCH_COUNT ? arch_names[a] : "?";
}

int moe_arch_parse(const char *s, enum moe_arch *ret)
{
    for (int i = 0; i < MOE_ARCH_COUNT; i++) {
        if (strcmp(s, arch_names[i]) == 0) {
            *ret = (enum moe_arch)i;
            return 0;
        }
    }
    if (strcmp(s, QWEN3_5_TEXT) == 0) {
        *ret = MOE_ARCH_QWEN3_5_MOE;
        return 0;
    }
    if (strcmp(s, LLAMA4_MM) == 0) {
        *ret = MOE_ARCH_LLAMA4;
        return 0;
    }
    return -EINVAL;
}

/* config.json key holding the routed expert count, and the expert ffn. */
static const char *experts_key(enum moe_arch a)
{
    switch (a) {
    case MOE_ARCH_MIXTRAL:
    case MOE_ARCH_LLAMA4:
    case MOE_ARCH_GPT_OSS:
        return "num_local_experts";
    case MOE_ARCH_DEEPSEEK_V3:
    case MOE_ARCH_DEEPSEEK_V2:
    case MOE_ARCH_KIMI_K2:
    case MOE_ARCH_GLM4_MOE:
        return "n_routed_experts";
    default:
        return "num_experts";
    }
}

/*
 * The other name transformers accepts for the expert count (its config
 * class's attribute_map), or NULL.  transformers 5 writes config.json under
 * its own attribute name, so a Qwen3-MoE checkpoint it saves says
 * "num_local_experts" where the released ones say "num_experts".
 */
static const char *experts_alias(enum moe_arch a)
{
    switch (a) {
    case MOE_ARCH_MIXTRAL:
    case MOE_ARCH_GPT_OSS:
        return "num_experts";
    case MOE_ARCH_QWEN3_MOE:
    case MOE_ARCH_OLMOE:
    case MOE_ARCH_DEEPSEEK_V3:
    case MOE_ARCH_KIMI_K2:
    case MOE_ARCH_GLM4_MOE:
        return "num_local_experts";
    case MOE_ARCH_DEEPSEEK_V2:
        return "num_experts";
    default:
        return NULL;
    }
}

static const char *ffn_key(enum moe_arch a)
{
    return a == MOE_ARCH_MIXTRAL || a == MOE_ARCH_OLMOE || a == MOE_ARCH_LLAMA4 ||
                   a == MOE_ARCH_GPT_OSS
               ? "intermediate_size"
               : "moe_intermediate_size";
}

/* torch_dtype spelling of a compute dtype. */
static const char *torch_name(enum moe_dtype t)
{
    switch (t) {
    case MOE_DTYPE_BF16:
        return "bfloat16";
    case MOE_DTYPE_F16:
        return "float16";
    case MOE_DTYPE_F32:
        return "float32";
    default:
        return moe_dtype_name(t);
    }
}

/* ---- config.json ---------------------------------------------------------- */

struct cfg_ctx {
    json_t *root;
    const char *fname;
    const char *arch; /* model_type, for "required for ..." */
    struct moe_error *err;
};

/* True when key is set to something other than null. */
static bool cfg_has(const struct cfg_ctx *c, const char *key)
{
    json_t *v = json_object_get(c->root, key);

    return v && !json_is_null(v);
}

/*
 * An integer key in [lo, hi].  hi_name, when not NULL, names where hi comes
 * from.  An absent (or null) optional key takes def.
 */
static int cfg_int(const struct cfg_ctx *c, const char *key, bool required, int def, long long lo,
                   long long hi, const char *hi_name, int *ret)
{
    json_t *v = json_object_get(c->root, key);
    char vb[VALUE_TEXT_MAX], range[160];
    long long x;

    if (hi_name)
        snprintf(range, sizeof(range), "%lld to %s (%lld)", lo, hi_name, hi);
    else
        snprintf(range, sizeof(range), "%lld to %lld", lo, hi);
    if (!v || (json_is_null(v) && !required)) {
        if (required)
            return moe_error_set(c->err, -EINVAL,
                                 "%s: '%s' is missing: expected an integer "
                                 "from %s (required for %s)",
                                 c->fname, key, range, c->arch);
        /* A default can clash with the values set next to it. */
        if (def < lo || def > hi)
            return moe_error_set(c->err, -EINVAL,
                                 "%s: '%s' is not set and its default %d is "
                                 "not within %s: set '%s'",
                                 c->fname, key, def, range, key);
        *ret = def;
        return 0;
    }
    if (!json_is_integer(v))
        return moe_error_set(c->err, -EINVAL, "%s: '%s' is %s (%s): expected an integer from %s",
                             c->fname, key, moe_json_text(v, vb, sizeof(vb)), moe_json_kind(v),
                             range);
    x = json_integer_value(v);
    if (x < lo || x > hi)
        return moe_error_set(c->err, -EINVAL, "%s: '%s' is %lld: expected %s", c->fname, key, x,
                             range);
    *ret = (int)x;
    return 0;
}

static int cfg_bool(const struct cfg_ctx *c, const char *key, bool def, bool *ret)
{
    json_t *v = json_object_get(c->root, key);
    char vb[VALUE_TEXT_MAX];

    if (!v || json_is_null(v)) {
        *ret = def;
        return 0;
    }
    if (!json_is_boolean(v))
        return moe_error_set(c->err, -EINVAL, "%s: '%s' is %s (%s): expected true or false",
                             c->fname, key, moe_json_text(v, vb, sizeof(vb)), moe_json_kind(v));
    *ret = json_is_true(v);
    return 0;
}

/* An optional string key: *ret is NULL when absent or null. */
static int cfg_str(const struct cfg_ctx *c, const char *key, const char **ret)
{
    json_t *v = json_object_get(c->root, key);
    char vb[VALUE_TEXT_MAX];

    *ret = NULL;
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_string(v))
        return moe_error_set(c->err, -EINVAL, "%s: '%s' is %s (%s): expected a string", c->fname,
                             key, moe_json_text(v, vb, sizeof(vb)), moe_json_kind(v));
    *ret = json_string_value(v);
    return 0;
}

/* An optional number > 0 (integer or real), at most 1e6. */
static int cfg_positive(const struct cfg_ctx *c, const char *key, float def, float *ret)
{
    json_t *v = json_object_get(c->root, key);
    char vb[VALUE_TEXT_MAX];
    double x;

    if (!v || json_is_null(v)) {
        *ret = def;
        return 0;
    }
    if (!json_is_number(v))
        return moe_error_set(c->err, -EINVAL, "%s: '%s' is %s (%s): expected a number > 0",
                             c->fname, key, moe_json_text(v, vb, sizeof(vb)), moe_json_kind(v));
    x = json_number_value(v);
    if (!isfinite(x) || !(x > 0) || x > 1e6)
        return moe_error_set(c->err, -EINVAL,
                             "%s: '%s' is %s: expected a number > 0 and at "
                             "most 1e6",
                             c->fname, key, moe_json_text(v, vb, sizeof(vb)));
    *ret = (float)x;
    return 0;
}

/* torch_dtype or dtype: bfloat16, float16, float32; MOE_DTYPE_COUNT when absent. */
static int cfg_dtype(const struct cfg_ctx *c, enum moe_dtype *ret)
{
    static const char *const keys[] = {"torch_dtype", "dtype"};
    enum moe_dtype got[2] = {MOE_DTYPE_COUNT, MOE_DTYPE_COUNT};
    const char *s;
    int r;

    for (int i = 0; i < 2; i++) {
        r = cfg_str(c, keys[i], &s);
        if (r < 0)
            return r;
        if (!s)
            continue;
        if (strcmp(s, "bfloat16") == 0)
            got[i] = MOE_DTYPE_BF16;
        else if (strcmp(s, "float16") == 0)
            got[i] = MOE_DTYPE_F16;
        else if (strcmp(s, "float32") == 0)
            got[i] = MOE_DTYPE_F32;
        else
            return moe_error_set(c->err, -EINVAL,
                                 "%s: '%s' is \"%s\": unsupported; expected "
                                 "\"bfloat16\", \"float16\" or \"float32\"",
                                 c->fname, keys[i], s);
    }
    if (got[0] != MOE_DTYPE_COUNT && got[1] != MOE_DTYPE_COUNT && got[0] != got[1])
        return moe_error_set(c->err, -EINVAL,
                             "%s: 'torch_dtype' is \"%s\" but 'dtype' is "
                             "\"%s\": expected one dtype",
                             c->fname, torch_name(got[0]), torch_name(got[1]));
    *ret = got[0] != MOE_DTYPE_COUNT ? got[0] : got[1];
    return 0;
}

/*
 * quantization_config: FP8 with block scales as DeepSeek-V3 and Qwen3 FP8
 * publish it (quant_method "fp8", fmt "e4m3", weight_block_size [r, c]), or
 * gpt-oss's MXFP4 (quant_method "mxfp4"), into m->quant; anything else is
 * refused, saying what is supported.
 */
static int cfg_quant(const struct cfg_ctx *c, struct moe_quant_fmt *ret)
{
    json_t *q = json_object_get(c->root, "quantization_config"), *v, *bs;
    char vb[VALUE_TEXT_MAX];
    const char *method, *fmt;
    long long b[2];

    memset(ret, 0, sizeof(*ret));
    if (!q || json_is_null(q))
        return 0;
    if (!json_is_object(q))
        return moe_error_set(c->err, -EINVAL, "%s: 'quantization_config' is %s: expected an object",
                             c->fname, moe_json_kind(q));
    v = json_object_get(q, "quant_method");
    method = v && json_is_string(v) ? json_string_value(v) : NULL;
    /* gpt-oss as released: MXFP4 experts (e2m1 values, an e8m0 scale per
     * 32), the rest bf16 (modules_to_not_convert).  A bf16 conversion often
     * keeps the key: each layer's tensors decide (get_mxfp4_experts). */
    if (method && strcmp(method, "mxfp4") == 0 && c->arch && strcmp(c->arch, "gpt_oss") == 0) {
        ret->q = MOE_QUANT_MXFP4;
        ret->brows = 1;
        ret->bcols = 32;
        return 0;
    }
    if (!method || strcmp(method, "fp8") != 0)
        return moe_error_set(
            c->err, -EINVAL,
            "%s: 'quantization_config': quant_method is %s: unsupported; "
            "moed serves \"fp8\" checkpoints (e4m3 with block scales) and "
            "gpt_oss \"mxfp4\" ones as published, or a bf16 checkpoint packed with moectl pack "
            "--quantize int8|int4",
            c->fname, v ? moe_json_text(v, vb, sizeof(vb)) : "missing");
    v = json_object_get(q, "fmt");
    fmt = v && json_is_string(v) ? json_string_value(v) : NULL;
    if (v && (!fmt || strcmp(fmt, "e4m3") != 0))
        return moe_error_set(c->err, -EINVAL,
                             "%s: 'quantization_config': fmt is %s: unsupported; expected "
                             "\"e4m3\"",
                             c->fname, moe_json_text(v, vb, sizeof(vb)));
    bs = json_object_get(q, "weight_block_size");
    if (!bs || json_is_null(bs))
        return moe_error_set(c->err, -EINVAL,
                             "%s: 'quantization_config': no weight_block_size: per-tensor FP8 "
                             "scales are not supported; expected block scales, "
                             "weight_block_size [128, 128]",
                             c->fname);
    if (!json_is_array(bs) || json_array_size(bs) != 2 || !json_is_integer(json_array_get(bs, 0)) ||
        !json_is_integer(json_array_get(bs, 1)))
        return moe_error_set(c->err, -EINVAL,
                             "%s: 'quantization_config': weight_block_size is %s: expected two "
                             "integers, [rows, columns]",
                             c->fname, moe_json_text(bs, vb, sizeof(vb)));
    b[0] = json_integer_value(json_array_get(bs, 0));
    b[1] = json_integer_value(json_array_get(bs, 1));
    /* The kernels take column blocks of whole 32-element steps. */
    if (b[0] < 1 || b[0] > MOE_QUANT_GROUP_MAX || b[1] < 32 || b[1] > MOE_QUANT_GROUP_MAX ||
        b[1] % 32 != 0)
        return moe_error_set(c->err, -EINVAL,
                             "%s: 'quantization_config': weight_block_size [%lld, %lld]: "
                             "unsupported block size; expected rows 1 to %d and columns a "
                             "multiple of 32 up to %d (published checkpoints use [128, 128])",
                             c->fname, b[0], b[1], MOE_QUANT_GROUP_MAX, MOE_QUANT_GROUP_MAX);
    ret->q = MOE_QUANT_FP8;
    ret->brows = (int)b[0];
    ret->bcols = (int)b[1];
    return 0;
}

/*
 * An optional array of layer numbers under key (qwen mlp_only_layers, llama4
 * moe_layers): *ret (owned, NULL when empty) and *ret_n; *ret_set tells an
 * absent or null key from an empty array.
 */
static int cfg_layer_list(const struct cfg_ctx *c, const struct moe_model_config *m,
                          const char *key, bool *ret_set, int **ret, int *ret_n)
{
    json_t *v = json_object_get(c->root, key);
    char vb[VALUE_TEXT_MAX];
    size_t n;

    if (!v || json_is_null(v))
        return 0;
    if (!json_is_array(v))
        return moe_error_set(c->err, -EINVAL,
                             "%s: '%s' is %s (%s): expected an "
                             "array of layer numbers",
                             c->fname, key, moe_json_text(v, vb, sizeof(vb)), moe_json_kind(v));
    n = json_array_size(v);
    if (n > MOE_MAX_LAYERS)
        return moe_error_set(c->err, -EINVAL,
                             "%s: '%s' has %zu entries: expected "
                             "at most %d",
                             c->fname, key, n, MOE_MAX_LAYERS);
    if (ret_set)
        *ret_set = true;
    if (n == 0)
        return 0;
    *ret = calloc(n, sizeof(**ret));
    if (!*ret)
        return moe_error_set(c->err, -ENOMEM, "%s: out of memory", c->fname);
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(v, i);

        if (!json_is_integer(e) || json_integer_value(e) < 0 ||
            json_integer_value(e) >= m->n_layers)
            return moe_error_set(c->err, -EINVAL,
                                 "%s: '%s' entry %zu is %s: "
                                 "expected a layer from 0 to num_hidden_layers - 1 (%d)",
                                 c->fname, key, i, moe_json_text(e, vb, sizeof(vb)),
                                 m->n_layers - 1);
        (*ret)[i] = (int)json_integer_value(e);
        *ret_n = (int)i + 1;
    }
    return 0;
}

static int cfg_mlp_only_layers(const struct cfg_ctx *c, struct moe_model_config *m)
{
    return cfg_layer_list(c, m, "mlp_only_layers", NULL, &m->mlp_only_layers,
                          &m->n_mlp_only_layers);
}

/*
 * The expert count, under key or its alias: either may be set, and both
 * when they agree.  *ret_key is the key read, for later messages.
 */
static int cfg_experts(const struct cfg_ctx *c, const char *key, const char *alias, int *ret,
                       const char **ret_key)
{
    int n, a, r;

    if (!alias || cfg_has(c, key)) {
        r = cfg_int(c, key, true, 0, 1, MOE_MAX_EXPERTS, NULL, &n);
        if (r == 0 && alias && cfg_has(c, alias)) {
            r = cfg_int(c, alias, true, 0, 1, MOE_MAX_EXPERTS, NULL, &a);
            if (r == 0 && a != n)
                r = moe_error_set(c->err, -EINVAL,
                                  "%s: '%s' is %d but '%s' is %d: expected one expert count",
                                  c->fname, key, n, alias, a);
        }
        if (r < 0)
            return r;
        *ret = n;
        *ret_key = key;
        return 0;
    }
    if (!cfg_has(c, alias))
        return moe_error_set(c->err, -EINVAL,
                             "%s: '%s' (or '%s') is missing: expected an integer from 1 to %d "
                             "(required for %s)",
                             c->fname, key, alias, MOE_MAX_EXPERTS, c->arch);
    r = cfg_int(c, alias, true, 0, 1, MOE_MAX_EXPERTS, NULL, ret);
    if (r == 0)
        *ret_key = alias;
    return r;
}

static int cfg_deepseek(const struct cfg_ctx *c, struct moe_model_config *m, const char *ek);

/* The keys of a family; everything else of m was zeroed by the caller. */
static int cfg_family(const struct cfg_ctx *c, struct moe_model_config *m)
{
    const char *ek = experts_key(m->arch), *fk = ffn_key(m->arch);
    int r, shared_size, kmax;

    r = cfg_int(c, "num_hidden_layers", true, 0, 1, MOE_MAX_LAYERS, NULL, &m->n_layers);
    if (r == 0)
        r = cfg_int(c, "hidden_size", true, 0, 1, MOE_MAX_HIDDEN, NULL, &m->hidden);
    if (r == 0)
        r = cfg_int(c, fk, true, 0, 1, MOE_MAX_FFN, NULL, &m->expert_ffn);
    if (r == 0)
        r = cfg_experts(c, ek, experts_alias(m->arch), &m->n_experts, &ek);
    if (r < 0)
        return r;
    kmax = MOE_MIN(m->n_experts, MOE_MAX_TOP_K);
    r = cfg_int(c, "num_experts_per_tok", true, 0, 1, kmax,
                m->n_experts <= MOE_MAX_TOP_K ? ek : "the supported maximum", &m->top_k);
    if (r < 0)
        return r;

    m->score_func = MOE_SCORE_SOFTMAX;
    m->n_group = 1;
    m->topk_group = 1;
    m->routed_scaling_factor = 1.0f;
    m->moe_layer_freq = 1;
    m->decoder_sparse_step = 1;
    m->moe_layer_step = 1;

    switch (m->arch) {
    case MOE_ARCH_MIXTRAL:
        m->norm_topk_prob = true;
        return 0;
    case MOE_ARCH_GPT_OSS:
        /* GptOssMLP: logits = W x + b, top-k of them, softmax over the k
         * (softmax, top-k, renormalise: the same weights); experts with
         * biases and the clamped SwiGLU, GptOssConfig's defaults. */
        m->norm_topk_prob = true;
        m->router_bias = true;
        m->expert_bias = true;
        m->act = MOE_ACT_SWIGLU_CLAMP;
        r = cfg_positive(c, "swiglu_alpha", 1.702f, &m->swiglu_alpha);
        if (r == 0)
            r = cfg_positive(c, "swiglu_limit", 7.0f, &m->swiglu_limit);
        return r;
    case MOE_ARCH_LLAMA4:
        /* Llama4TextMoe: top-k on the logits, sigmoid of the chosen ones
         * scales the expert's input; one shared expert as wide as a routed
         * one, unscaled.  Dense layers are intermediate_size_mlp wide. */
        m->score_func = MOE_SCORE_TOPK_SIGMOID;
        m->scale_input = true;
        m->n_shared_experts = 1;
        m->shared_ffn = m->expert_ffn;
        r = cfg_int(c, "intermediate_size_mlp", false, 16384, 0, MOE_MAX_FFN, NULL, &m->dense_ffn);
        if (r == 0)
            r = cfg_int(c, "interleave_moe_layer_step", false, 1, 1, MOE_MAX_LAYERS, NULL,
                        &m->moe_layer_step);
        if (r == 0)
            r = cfg_layer_list(c, m, "moe_layers", &m->has_moe_layer_list, &m->moe_layer_list,
                               &m->n_moe_layer_list);
        return r;
    case MOE_ARCH_OLMOE:
        return cfg_bool(c, "norm_topk_prob", false, &m->norm_topk_prob);
    case MOE_ARCH_QWEN2_MOE:
    case MOE_ARCH_QWEN3_MOE:
    case MOE_ARCH_QWEN3_NEXT:
    case MOE_ARCH_QWEN3_5_MOE:
        /* transformers' defaults: Qwen3-Next renormalises unless told not
         * to, Qwen3.5-MoE always (it has no norm_topk_prob), its layers are
         * all MoE layers and its shared expert is 512 wide by default. */
        if (m->arch == MOE_ARCH_QWEN3_5_MOE) {
            m->norm_topk_prob = true;
        } else {
            r = cfg_bool(c, "norm_topk_prob", m->arch == MOE_ARCH_QWEN3_NEXT, &m->norm_topk_prob);
            if (r == 0)
                r = cfg_int(c, "intermediate_size", false,
                            m->arch == MOE_ARCH_QWEN3_NEXT ? 5632 : 0, 0, MOE_MAX_FFN, NULL,
                            &m->dense_ffn);
            if (r == 0)
                r = cfg_int(c, "decoder_sparse_step", false, 1, 1, MOE_MAX_LAYERS, NULL,
                            &m->decoder_sparse_step);
            if (r == 0)
                r = cfg_mlp_only_layers(c, m);
        }
        if (r < 0 || m->arch == MOE_ARCH_QWEN3_MOE)
            return r;
        r = cfg_int(c, "shared_expert_intermediate_size", m->arch == MOE_ARCH_QWEN2_MOE, 512, 0,
                    MOE_MAX_FFN, NULL, &shared_size);
        if (r < 0)
            return r;
        if (shared_size > 0) {
            m->n_shared_experts = 1;
            m->shared_ffn = shared_size;
            m->shared_expert_gate = true;
        }
        return 0;
    default:
        break;
    }
    return cfg_deepseek(c, m, ek);
}

/*
 * The DeepSeek-like families, each with its transformers config class's
 * defaults (kimi_k2, which transformers lacks, with DeepSeek-V3's):
 *   deepseek_v3, kimi_k2: sigmoid + bias, noaux_tc, n_group 8, topk_group 4,
 *     norm_topk_prob true, routed_scaling_factor 2.5, first_k_dense_replace 3;
 *   glm4_moe: sigmoid + bias, n_group 1, topk_group 1, norm_topk_prob true,
 *     routed_scaling_factor 1, first_k_dense_replace 1, one shared expert;
 *   deepseek_v2: softmax, no bias, topk_method greedy (no groups) or
 *     group_limited_greedy (group score: its best expert), no renormalisation,
 *     routed_scaling_factor 1, first_k_dense_replace 0, two shared experts.
 */
static int cfg_deepseek(const struct cfg_ctx *c, struct moe_model_config *m, const char *ek)
{
    const bool v2 = m->arch == MOE_ARCH_DEEPSEEK_V2, glm = m->arch == MOE_ARCH_GLM4_MOE;
    const char *an = arch_names[m->arch];
    int def_shared = v2 ? 2 : 1, def_group = v2 || glm ? 1 : 8, def_topk_group = v2 || glm ? 1 : 4;
    float def_scale = v2 || glm ? 1.0f : 2.5f;
    int def_dense = v2 ? 0 : glm ? 1 : 3;
    bool group_limited = !v2;
    {
        char shared_max[64];
        const char *s = NULL;
        int gsize, r;

        m->score_func = v2 ? MOE_SCORE_SOFTMAX : MOE_SCORE_SIGMOID;
        m->has_score_bias = !v2;
        r = cfg_int(c, "intermediate_size", true, 0, 1, MOE_MAX_FFN, NULL, &m->dense_ffn);
        snprintf(shared_max, sizeof(shared_max), "%d / moe_intermediate_size", MOE_MAX_FFN);
        if (r == 0)
            r = cfg_int(c, "n_shared_experts", false, def_shared, 0, MOE_MAX_FFN / m->expert_ffn,
                        shared_max, &m->n_shared_experts);
        if (r == 0)
            r = cfg_bool(c, "norm_topk_prob", !v2, &m->norm_topk_prob);
        if (r == 0)
            r = cfg_positive(c, "routed_scaling_factor", def_scale, &m->routed_scaling_factor);
        if (r == 0)
            r = cfg_int(c, "first_k_dense_replace", false, def_dense, 0, MOE_MAX_LAYERS, NULL,
                        &m->first_k_dense);
        if (r == 0 && !glm)
            r = cfg_int(c, "moe_layer_freq", false, 1, 1, MOE_MAX_LAYERS, NULL, &m->moe_layer_freq);
        if (r == 0 && !glm)
            r = cfg_str(c, "scoring_func", &s);
        if (r < 0)
            return r;
        if (s && strcmp(s, v2 ? "softmax" : "sigmoid") != 0)
            return moe_error_set(c->err, -EINVAL,
                                 "%s: 'scoring_func' is \"%s\": unsupported; "
                                 "expected \"%s\" for %s",
                                 c->fname, s, v2 ? "softmax" : "sigmoid", an);
        s = NULL;
        if (!glm)
            r = cfg_str(c, "topk_method", &s);
        if (r < 0)
            return r;
        if (v2) {
            /* transformers' DeepseekV2TopkRouter never renormalises. */
            if (m->norm_topk_prob)
                return moe_error_set(c->err, -EINVAL,
                                     "%s: 'norm_topk_prob' is true: unsupported for deepseek_v2 "
                                     "(transformers ignores it and never renormalises); "
                                     "expected false",
                                     c->fname);
            if (s && strcmp(s, "greedy") != 0 && strcmp(s, "group_limited_greedy") != 0)
                return moe_error_set(c->err, -EINVAL,
                                     "%s: 'topk_method' is \"%s\": unsupported; expected "
                                     "\"greedy\" or \"group_limited_greedy\" for deepseek_v2",
                                     c->fname, s);
            group_limited = s && strcmp(s, "group_limited_greedy") == 0;
        } else if (s && strcmp(s, "noaux_tc") != 0) {
            return moe_error_set(c->err, -EINVAL,
                                 "%s: 'topk_method' is \"%s\": unsupported; "
                                 "expected \"noaux_tc\" for %s",
                                 c->fname, s, an);
        }
        m->shared_ffn = m->n_shared_experts * m->expert_ffn;
        if (!group_limited) {
            /* greedy: n_group and topk_group are not read at all. */
            m->n_group = 1;
            m->topk_group = 1;
            return 0;
        }
        r = cfg_int(c, "n_group", v2, def_group, 1, m->n_experts, ek, &m->n_group);
        if (r < 0)
            return r;

        if (m->n_experts % m->n_group != 0)
            return moe_error_set(c->err, -EINVAL,
                                 "%s: 'n_group' is %d%s: expected a divisor of "
                                 "%s (%d)",
                                 c->fname, m->n_group, cfg_has(c, "n_group") ? "" : " (default)",
                                 ek, m->n_experts);
        gsize = m->n_experts / m->n_group;
        if (m->n_group > 1 && gsize < 2 && !v2)
            return moe_error_set(c->err, -EINVAL,
                                 "%s: 'n_group' is %d%s: groups of %d expert "
                                 "of %s (%d); expected groups of at least 2 experts",
                                 c->fname, m->n_group, cfg_has(c, "n_group") ? "" : " (default)",
                                 gsize, ek, m->n_experts);
        r = cfg_int(c, "topk_group", v2, def_topk_group, 1, m->n_group, "n_group", &m->topk_group);
        if (r < 0)
            return r;
        if (m->top_k > m->topk_group * gsize)
            return moe_error_set(c->err, -EINVAL,
                                 "%s: 'num_experts_per_tok' is %d: expected at "
                                 "most topk_group (%d) x experts per group (%d) = %d",
                                 c->fname, m->top_k, m->topk_group, gsize, m->topk_group * gsize);
    }
    return 0;
}

/* How the family decides a layer is dense, for messages. */
static void dense_rule(const struct moe_model_config *c, char *buf, size_t len)
{
    switch (c->arch) {
    case MOE_ARCH_DEEPSEEK_V3:
    case MOE_ARCH_DEEPSEEK_V2:
    case MOE_ARCH_KIMI_K2:
    case MOE_ARCH_GLM4_MOE:
        snprintf(buf, len, "first_k_dense_replace %d, moe_layer_freq %d", c->first_k_dense,
                 c->moe_layer_freq);
        break;
    case MOE_ARCH_QWEN2_MOE:
    case MOE_ARCH_QWEN3_MOE:
    case MOE_ARCH_QWEN3_NEXT:
        snprintf(buf, len, "mlp_only_layers (%d listed), decoder_sparse_step %d",
                 c->n_mlp_only_layers, c->decoder_sparse_step);
        break;
    case MOE_ARCH_LLAMA4:
        if (c->has_moe_layer_list)
            snprintf(buf, len, "moe_layers (%d listed)", c->n_moe_layer_list);
        else
            snprintf(buf, len, "interleave_moe_layer_step %d", c->moe_layer_step);
        break;
    default:
        snprintf(buf, len, "every %s layer is a MoE layer", moe_arch_name(c->arch));
        break;
    }
}

int moe_config_parse(const char *json, size_t json_len, const char *fname,
                     struct moe_model_config *ret, struct moe_error *err)
{
    struct moe_model_config m = {0};
    struct moe_router_params rp;
    struct cfg_ctx c = {.fname = fname, .arch = "?", .err = err};
    json_error_t jerr;
    const char *type;
    char vb[VALUE_TEXT_MAX], text_fname[160];
    json_t *v, *doc;
    int r, n_moe = 0;

    doc = c.root = moe_json_loadb(json, json_len, JSON_REJECT_DUPLICATES, &jerr);
    if (!c.root)
        return moe_error_set(err, -EINVAL, "%s: not valid JSON: %s (line %d, column %d)", fname,
                             jerr.text, jerr.line, jerr.column);
    if (!json_is_object(c.root)) {
        r = moe_error_set(err, -EINVAL, "%s: is %s, expected a JSON object", fname,
                          moe_json_kind(c.root));
        goto fail;
    }
    v = json_object_get(c.root, "model_type");
    if (!v || !json_is_string(v)) {
        r = moe_error_set(err, -EINVAL, "%s: 'model_type' is %s: expected one of " ARCH_LIST, fname,
                          v ? moe_json_text(v, vb, sizeof(vb)) : "missing");
        goto fail;
    }
    type = json_string_value(v);
    if (moe_arch_parse(type, &m.arch) < 0) {
        r = moe_error_set(err, -EINVAL,
                          "%s: 'model_type' is \"%s\": unsupported; expected one "
                          "of " ARCH_LIST,
                          fname, type);
        goto fail;
    }
    c.arch = arch_names[m.arch];
    m.layer_prefix = LAYER_PREFIX;
    if ((m.arch == MOE_ARCH_QWEN3_5_MOE && strcmp(type, QWEN3_5_TEXT) != 0) ||
        strcmp(type, LLAMA4_MM) == 0) {
        /* The released, multimodal configs: the text model's keys are in
         * text_config and its layers under model.language_model. (Qwen3.5)
         * or language_model.model. (Llama 4). */
        bool llama = m.arch == MOE_ARCH_LLAMA4;

        v = json_object_get(doc, "text_config");
        if (!v || !json_is_object(v)) {
            r = moe_error_set(err, -EINVAL,
                              "%s: 'text_config' is %s: expected an object with the text "
                              "model's keys for model_type %s (a text-only config "
                              "says \"%s\")",
                              fname, v ? moe_json_kind(v) : "missing", type,
                              llama ? "llama4_text" : QWEN3_5_TEXT);
            goto fail;
        }
        c.root = v;
        snprintf(text_fname, sizeof(text_fname), "%s: text_config", fname);
        c.fname = text_fname;
        m.layer_prefix = llama ? LAYER_PREFIX_LLAMA4_MM : LAYER_PREFIX_MM;
    }
    r = cfg_family(&c, &m);
    if (r == 0)
        r = cfg_dtype(&c, &m.dtype);
    if (r == 0 && m.dtype == MOE_DTYPE_COUNT && c.root != doc) {
        /* A multimodal config may give the dtype at its top level only. */
        struct cfg_ctx top = {.root = doc, .fname = fname, .arch = c.arch, .err = err};

        r = cfg_dtype(&top, &m.dtype);
    }
    if (r == 0) {
        /* at the top level, or (multimodal) in text_config */
        struct cfg_ctx top = {.root = doc, .fname = fname, .arch = c.arch, .err = err};

        r = cfg_quant(json_object_get(c.root, "quantization_config") ? &c : &top, &m.quant);
    }
    if (r < 0)
        goto fail;

    for (int i = 0; i < m.n_layers; i++)
        n_moe += moe_config_layer_is_moe(&m, i);
    if (n_moe == 0) {
        char rule[160];

        dense_rule(&m, rule, sizeof(rule));
        r = moe_error_set(err, -EINVAL,
                          "%s: none of the %d layers is a MoE layer (%s): "
                          "nothing to serve",
                          fname, m.n_layers, rule);
        goto fail;
    }

    /* The checks above should imply the router's; a failure here is a gap
     * in them, still reported as bad input. */
    rp = (struct moe_router_params){
        .score_func = m.score_func,
        .n_experts = m.n_experts,
        .top_k = m.top_k,
        .norm_topk_prob = m.norm_topk_prob,
        .n_group = m.n_group,
        .topk_group = m.topk_group,
        .routed_scaling_factor = m.routed_scaling_factor,
    };
    r = moe_router_check(&rp, err);
    if (r < 0) {
        moe_error_prefix(err, "%s", fname);
        goto fail;
    }

    json_decref(doc);
    *ret = m;
    return 0;
fail:
    moe_config_clear(&m);
    json_decref(doc);
    return r;
}

void moe_config_clear(struct moe_model_config *c)
{
    if (!c)
        return;
    free(c->mlp_only_layers);
    c->mlp_only_layers = NULL;
    c->n_mlp_only_layers = 0;
    free(c->moe_layer_list);
    c->moe_layer_list = NULL;
    c->n_moe_layer_list = 0;
}

bool moe_config_layer_is_moe(const struct moe_model_config *c, int layer)
{
    if (layer < 0 || layer >= c->n_layers)
        return false;
    switch (c->arch) {
    case MOE_ARCH_DEEPSEEK_V3:
    case MOE_ARCH_DEEPSEEK_V2:
    case MOE_ARCH_KIMI_K2:
    case MOE_ARCH_GLM4_MOE:
        return layer >= c->first_k_dense && c->moe_layer_freq > 0 && layer % c->moe_layer_freq == 0;
    case MOE_ARCH_QWEN2_MOE:
    case MOE_ARCH_QWEN3_MOE:
    case MOE_ARCH_QWEN3_NEXT:
        for (int i = 0; i < c->n_mlp_only_layers; i++)
            if (c->mlp_only_layers[i] == layer)
                return false;
        return c->decoder_sparse_step > 0 && (layer + 1) % c->decoder_sparse_step == 0;
    case MOE_ARCH_LLAMA4:
        if (c->has_moe_layer_list) {
            for (int i = 0; i < c->n_moe_layer_list; i++)
                if (c->moe_layer_list[i] == layer)
                    return true;
            return false;
        }
        return c->moe_layer_step > 0 && (layer + 1) % c->moe_layer_step == 0;
    default:
        return true;
    }
}

/* ---- opening a checkpoint ------------------------------------------------- */

void moe_model_free(struct moe_model *m)
{
    if (!m)
        return;
    if (m->layers) {
        for (int i = 0; i < m->cfg.n_layers; i++)
            free(m->layers[i].experts);
        free(m->layers);
    }
    if (m->headers)
        for (size_t i = 0; i < m->n_files; i++)
            moe_st_header_free(m->headers[i]);
    free(m->headers);
    if (m->files) {
        for (size_t i = 0; i < m->n_files; i++) {
            if (m->files[i].fd >= 0)
                close(m->files[i].fd);
            free(m->files[i].path);
            free(m->files[i].name);
        }
        free(m->files);
    }
    moe_config_clear(&m->cfg);
    free(m->dir);
    free(m);
}

static char *path_join(const char *dir, const char *name)
{
    char *s;

    if (asprintf(&s, "%s/%s", dir, name) < 0)
        return NULL;
    return s;
}

struct open_ctx {
    struct moe_model *m;
    const struct moe_st_index *idx; /* NULL for a single model.safetensors */
    struct moe_error *err;
};

/* The header entry of tensor name and its file, or NULL when absent. */
static const struct moe_st_tensor *find_tensor(const struct open_ctx *c, const char *name,
                                               int *ret_file)
{
    int f = c->idx ? moe_st_index_find(c->idx, name) : 0;

    if (f < 0)
        return NULL;
    *ret_file = f;
    return moe_st_header_find(c->m->headers[f], name);
}

/*
 * Looks up one MoE tensor of layer and fills ref.  what names it in the
 * "missing" message; ndim/rows/cols is the shape config.json implies, and
 * shape_keys says where those come from.  Any compute dtype is accepted.
 */
static int get_ref(const struct open_ctx *c, int layer, const char *what, const char *name,
                   int ndim, int64_t rows, int64_t cols, const char *shape_keys,
                   struct moe_tensor_ref *ref)
{
    const struct moe_st_tensor *t;
    int64_t want[2];
    char got[128], exp[64];
    const char *path;
    int f;

    t = find_tensor(c, name, &f);
    if (!t)
        return moe_error_set(c->err, -EINVAL, "%s: layer %d: %s missing: no tensor '%s'", c->m->dir,
                             layer, what, name);
    path = c->m->files[f].path;
    if (ndim == 1)
        want[0] = cols;
    else {
        want[0] = rows;
        want[1] = cols;
    }
    if (t->ndim != ndim || t->shape[0] != want[0] || (ndim == 2 && t->shape[1] != want[1]))
        return moe_error_set(c->err, -EINVAL,
                             "%s: tensor '%s': shape %s contradicts %s: "
                             "expected %s = %s",
                             path, name, moe_shape_text(t->shape, t->ndim, got, sizeof(got)),
                             CONFIG_NAME, shape_keys, moe_shape_text(want, ndim, exp, sizeof(exp)));
    if (!moe_dtype_is_compute(t->dtype))
        return moe_error_set(c->err, -EINVAL,
                             "%s: tensor '%s': dtype %s: expected BF16, F16 or F32%s", path, name,
                             moe_dtype_name(t->dtype),
                             t->dtype == MOE_DTYPE_F8_E4M3 || t->dtype == MOE_DTYPE_F8_E5M2
                                 ? " (fp8 checkpoints are not supported yet: use a bf16 "
                                   "conversion of the model)"
                                 : "");
    ref->file = f;
    ref->name = t->name;
    ref->dtype = t->dtype;
    ref->rows = ndim == 2 ? t->shape[0] : 1;
    ref->cols = ndim == 2 ? t->shape[1] : t->shape[0];
    ref->offset = t->offset;
    ref->nbytes = t->nbytes;
    return 0;
}

/* Checks an expert tensor's dtype against config.json and against dt, the
 * dtype the expert's other tensors (or the model's other experts) have. */
static int check_expert_dtype(const struct open_ctx *c, const struct moe_tensor_ref *t,
                              enum moe_dtype dt, const char *dt_from)
{
    const struct moe_model_config *cfg = &c->m->cfg;
    const char *path = c->m->files[t->file].path;

    /* torch_dtype is the dtype of the model's plain tensors; a quantized
     * checkpoint says bfloat16 and stores its experts as values + scales */
    bool quantized =
        cfg->quant.q != MOE_QUANT_NONE && t->dtype == moe_quant_value_dtype(cfg->quant.q);

    if (cfg->dtype != MOE_DTYPE_COUNT && t->dtype != cfg->dtype && !quantized)
        return moe_error_set(c->err, -EINVAL,
                             "%s: tensor '%s': dtype %s contradicts %s "
                             "torch_dtype %s",
                             path, t->name, moe_dtype_name(t->dtype), CONFIG_NAME,
                             torch_name(cfg->dtype));
    if (dt != MOE_DTYPE_COUNT && t->dtype != dt)
        return moe_error_set(c->err, -EINVAL,
                             "%s: tensor '%s': dtype %s, but %s is %s: "
                             "expected one dtype (one format) for every expert",
                             path, t->name, moe_dtype_name(t->dtype), dt_from, moe_dtype_name(dt));
    return 0;
}

const char *moe_quant_scale_suffix(enum moe_quant q)
{
    return q == MOE_QUANT_FP8 ? "_scale_inv" : "_scale";
}

int moe_expert_tensors(const struct moe_expert_ref *x, const struct moe_tensor_ref *ret[6])
{
    ret[0] = &x->gate;
    ret[1] = &x->up;
    ret[2] = &x->down;
    if (x->quant.q == MOE_QUANT_NONE)
        return 3;
    ret[3] = &x->gate_s;
    ret[4] = &x->up_s;
    ret[5] = &x->down_s;
    return 6;
}

/*
 * One weight of an expert, [rows, cols]: a plain tensor (get_ref), or, when
 * the model is quantized (q, cfg.quant) and the tensor has its value dtype,
 * the values and, in *sref, its scale tensor "<name><suffix>", both checked
 * against the shapes the block size implies.  *ret_q says which.
 */
static int get_weight(const struct open_ctx *c, int layer, const char *what, const char *name,
                      int64_t rows, int64_t cols, const char *shape_keys,
                      struct moe_tensor_ref *ref, struct moe_tensor_ref *sref,
                      struct moe_quant_fmt *ret_q)
{
    const struct moe_quant_fmt *q = &c->m->cfg.quant;
    const struct moe_st_tensor *t, *st;
    char sname[NAME_MAX_LEN], got[128], exp[64];
    int64_t want[2], vcols;
    const char *path;
    int f, sf;

    memset(ret_q, 0, sizeof(*ret_q));
    t = find_tensor(c, name, &f);
    if (t && q->q != MOE_QUANT_NONE && t->dtype != moe_quant_value_dtype(q->q) &&
        !moe_dtype_is_compute(t->dtype))
        return moe_error_set(c->err, -EINVAL,
                             "%s: tensor '%s': dtype %s: expected %s (%s values) or a plain BF16, "
                             "F16 or F32 tensor",
                             c->m->files[f].path, name, moe_dtype_name(t->dtype),
                             moe_dtype_name(moe_quant_value_dtype(q->q)), moe_quant_name(q->q));
    if (!t || q->q == MOE_QUANT_NONE || t->dtype != moe_quant_value_dtype(q->q)) {
        if (t && q->q == MOE_QUANT_NONE && t->dtype == MOE_DTYPE_F8_E4M3)
            return moe_error_set(c->err, -EINVAL,
                                 "%s: tensor '%s': dtype F8_E4M3 but %s has no "
                                 "quantization_config (quant_method \"fp8\", "
                                 "weight_block_size): the scales' layout is unknown",
                                 c->m->files[f].path, name, CONFIG_NAME);
        return get_ref(c, layer, what, name, 2, rows, cols, shape_keys, ref);
    }
    path = c->m->files[f].path;
    vcols = q->q == MOE_QUANT_INT4 || q->q == MOE_QUANT_MXFP4 ? cols / 2 : cols;
    if (rows % 32 != 0 || cols % 32 != 0)
        return moe_error_set(c->err, -EINVAL,
                             "%s: tensor '%s': %s [%" PRId64 ", %" PRId64
                             "]: quantized experts need both sizes a multiple of 32",
                             path, name, moe_quant_name(q->q), rows, cols);
    want[0] = rows;
    want[1] = vcols;
    if (t->ndim != 2 || t->shape[0] != want[0] || t->shape[1] != want[1])
        return moe_error_set(c->err, -EINVAL,
                             "%s: tensor '%s': shape %s contradicts %s: expected %s = %s%s", path,
                             name, moe_shape_text(t->shape, t->ndim, got, sizeof(got)), CONFIG_NAME,
                             shape_keys, moe_shape_text(want, 2, exp, sizeof(exp)),
                             vcols != cols ? " (two int4 values per byte)" : "");
    *ref = (struct moe_tensor_ref){.file = f,
                                   .name = t->name,
                                   .dtype = t->dtype,
                                   .rows = rows,
                                   .cols = cols,
                                   .offset = t->offset,
                                   .nbytes = t->nbytes};

    snprintf(sname, sizeof(sname), "%s%s", name, moe_quant_scale_suffix(q->q));
    st = find_tensor(c, sname, &sf);
    if (!st)
        return moe_error_set(c->err, -EINVAL,
                             "%s: layer %d: %s: no tensor '%s': expected the %s scales of '%s'",
                             c->m->dir, layer, what, sname, moe_quant_name(q->q), name);
    moe_quant_scale_shape(q, rows, cols, &want[0], &want[1]);
    if (st->dtype != moe_quant_scale_dtype(q->q))
        return moe_error_set(c->err, -EINVAL, "%s: tensor '%s': dtype %s: expected %s scales",
                             c->m->files[sf].path, sname, moe_dtype_name(st->dtype),
                             moe_dtype_name(moe_quant_scale_dtype(q->q)));
    if (st->ndim != 2 || st->shape[0] != want[0] || st->shape[1] != want[1])
        return moe_error_set(
            c->err, -EINVAL,
            "%s: tensor '%s': shape %s: expected %s, one scale per %d x %d "
            "block of '%s' [%" PRId64 ", %" PRId64 "]",
            c->m->files[sf].path, sname, moe_shape_text(st->shape, st->ndim, got, sizeof(got)),
            moe_shape_text(want, 2, exp, sizeof(exp)), q->brows, q->bcols, name, rows, cols);
    *sref = (struct moe_tensor_ref){.file = sf,
                                    .name = st->name,
                                    .dtype = st->dtype,
                                    .rows = want[0],
                                    .cols = want[1],
                                    .offset = st->offset,
                                    .nbytes = st->nbytes};
    *ret_q = *q;
    return 0;
}

/* Fills x with the three tensors under prefix ("model.layers.3.mlp.experts.5."). */
static int get_expert(const struct open_ctx *c, int layer, const char *what, const char *prefix,
                      int64_t ffn, const char *ffn_desc, struct moe_expert_ref *x)
{
    bool mixtral = c->m->cfg.arch == MOE_ARCH_MIXTRAL;
    const char *g = mixtral ? "w1" : "gate_proj", *u = mixtral ? "w3" : "up_proj",
               *d = mixtral ? "w2" : "down_proj";
    int64_t H = c->m->cfg.hidden;
    char name[NAME_MAX_LEN], keys[160];
    int r;

    struct moe_quant_fmt qf[3];

    snprintf(keys, sizeof(keys), "[%s, hidden_size]", ffn_desc);
    snprintf(name, sizeof(name), "%s%s.weight", prefix, g);
    r = get_weight(c, layer, what, name, ffn, H, keys, &x->gate, &x->gate_s, &qf[0]);
    if (r < 0)
        return r;
    snprintf(name, sizeof(name), "%s%s.weight", prefix, u);
    r = get_weight(c, layer, what, name, ffn, H, keys, &x->up, &x->up_s, &qf[1]);
    if (r < 0)
        return r;
    snprintf(keys, sizeof(keys), "[hidden_size, %s]", ffn_desc);
    snprintf(name, sizeof(name), "%s%s.weight", prefix, d);
    r = get_weight(c, layer, what, name, H, ffn, keys, &x->down, &x->down_s, &qf[2]);
    if (r < 0)
        return r;
    r = check_expert_dtype(c, &x->gate, MOE_DTYPE_COUNT, NULL);
    if (r == 0)
        r = check_expert_dtype(c, &x->up, x->gate.dtype, x->gate.name);
    if (r == 0)
        r = check_expert_dtype(c, &x->down, x->gate.dtype, x->gate.name);
    if (r < 0)
        return r;
    x->quant = qf[0];
    x->nbytes = x->gate.nbytes + x->up.nbytes + x->down.nbytes;
    if (x->quant.q != MOE_QUANT_NONE)
        x->nbytes += x->gate_s.nbytes + x->up_s.nbytes + x->down_s.nbytes;
    return 0;
}

static long parse_num(const char *s, char stop, const char **ret_end);
static bool starts(const char *s, const char *prefix);

/*
 * The fused layout of layer i: gate_up [E, 2F, H] and down [E, H, F] under
 * prefix ("model.layers.3.mlp.experts."), with expert e's gate the rows
 * [e][0, F) of gate_up, its up the rows [e][F, 2F) (transformers chunks the
 * product in two, gate first) and its down down[e].  Fills every expert of L.
 * transposed (Llama 4): gate_up [E, H, 2F] and down [E, F, H], the same
 * bytes per expert at the same offsets, marked so (moe_expert_untranspose);
 * interleaved (gpt-oss) as well: transposed, gate and up columns alternating.
 */
static int get_fused_experts(const struct open_ctx *c, int i, const char *prefix, bool transposed,
                             bool interleaved, struct moe_layer *L)
{
    const struct moe_model_config *cfg = &c->m->cfg;
    const int64_t E = cfg->n_experts, F = cfg->expert_ffn, H = cfg->hidden;
    const int64_t want_plain[2][3] = {{E, 2 * F, H}, {E, H, F}};
    const int64_t want_t[2][3] = {{E, H, 2 * F}, {E, F, H}};
    const int64_t(*want)[3] = transposed ? want_t : want_plain;
    static const char *const keys_plain[2] = {"[%s, 2 x %s, hidden_size]", "[%s, hidden_size, %s]"};
    static const char *const keys_t[2] = {"[%s, hidden_size, 2 x %s]", "[%s, %s, hidden_size]"};
    const char *const *keys = transposed ? keys_t : keys_plain;
    static const char *const part[2] = {"gate_up_proj", "down_proj"};
    const struct moe_st_tensor *t[2];
    char name[2][NAME_MAX_LEN], got[128], exp[64], kb[160];
    int f[2];

    for (int k = 0; k < 2; k++) {
        const char *path;

        snprintf(name[k], sizeof(name[k]), "%s%s", prefix, part[k]);
        t[k] = find_tensor(c, name[k], &f[k]);
        if (!t[k])
            return moe_error_set(c->err, -EINVAL,
                                 "%s: layer %d: fused experts missing: no tensor '%s' beside "
                                 "'%s%s'",
                                 c->m->dir, i, name[k], prefix, part[1 - k]);
        path = c->m->files[f[k]].path;
        if (t[k]->ndim != 3 || memcmp(t[k]->shape, want[k], sizeof(want[k])) != 0) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
            snprintf(kb, sizeof(kb), keys[k], experts_key(cfg->arch), ffn_key(cfg->arch));
#pragma GCC diagnostic pop
            return moe_error_set(c->err, -EINVAL,
                                 "%s: tensor '%s': shape %s contradicts %s: expected %s = %s", path,
                                 name[k], moe_shape_text(t[k]->shape, t[k]->ndim, got, sizeof(got)),
                                 CONFIG_NAME, kb, moe_shape_text(want[k], 3, exp, sizeof(exp)));
        }
        if (!moe_dtype_is_compute(t[k]->dtype))
            return moe_error_set(c->err, -EINVAL,
                                 "%s: tensor '%s': dtype %s: expected BF16, F16 "
                                 "or F32",
                                 path, name[k], moe_dtype_name(t[k]->dtype));
    }
    for (int e = 0; e < E; e++) {
        struct moe_expert_ref *x = &L->experts[e];
        uint64_t es = moe_dtype_size(t[0]->dtype), ds = moe_dtype_size(t[1]->dtype);
        uint64_t mat = (uint64_t)F * (uint64_t)H;

        x->gate = (struct moe_tensor_ref){.file = f[0],
                                          .name = t[0]->name,
                                          .slice = true,
                                          .dtype = t[0]->dtype,
                                          .rows = F,
                                          .cols = H,
                                          .offset = t[0]->offset + (uint64_t)e * 2 * mat * es,
                                          .nbytes = mat * es};
        x->up = x->gate;
        x->up.offset += mat * es;
        x->down = (struct moe_tensor_ref){.file = f[1],
                                          .name = t[1]->name,
                                          .slice = true,
                                          .dtype = t[1]->dtype,
                                          .rows = H,
                                          .cols = F,
                                          .offset = t[1]->offset + (uint64_t)e * mat * ds,
                                          .nbytes = mat * ds};
        x->nbytes = x->gate.nbytes + x->up.nbytes + x->down.nbytes;
        x->transposed = transposed;
        x->interleaved = interleaved;
    }
    return 0;
}

/* Blocked, so that both sides stay in cache: dst [cols, rows] = src [rows,
 * cols] transposed, elements of es bytes (2 or 4); column k of src is
 * element k * step of its row (step 2: every other column). */
static void transpose(void *dst, const void *src, int64_t rows, int64_t cols, int64_t src_stride,
                      int64_t step, size_t es)
{
    enum { B = 32 };

    for (int64_t r0 = 0; r0 < rows; r0 += B)
        for (int64_t c0 = 0; c0 < cols; c0 += B) {
            int64_t r1 = MOE_MIN(rows, r0 + B), c1 = MOE_MIN(cols, c0 + B);

            for (int64_t r = r0; r < r1; r++)
                for (int64_t k = c0; k < c1; k++) {
                    const uint8_t *sp =
                        (const uint8_t *)src + ((size_t)(r * src_stride + k * step)) * es;
                    uint8_t *dp = (uint8_t *)dst + ((size_t)(k * rows + r)) * es;

                    if (es == 2)
                        memcpy(dp, sp, 2);
                    else
                        memcpy(dp, sp, 4);
                }
        }
}

int moe_expert_untranspose(const struct moe_expert_ref *x, void *gate, void *up, void *down)
{
    const int64_t F = x->gate.rows, H = x->gate.cols;
    const size_t es = moe_dtype_size(x->gate.dtype), ds = moe_dtype_size(x->down.dtype);
    size_t gu = (size_t)(2 * F * H) * es, dn = (size_t)(F * H) * ds;
    uint8_t *tmp;

    if (!x->transposed)
        return 0;
    assert((uint8_t *)up == (uint8_t *)gate + x->gate.nbytes);
    (void)up;
    tmp = malloc(MOE_MAX(gu, dn));
    if (!tmp)
        return -ENOMEM;
    /* [H, 2F]: gate = columns [0, F), up = columns [F, 2F), each to [F, H];
     * interleaved: gate = the even columns, up = the odd ones. */
    memcpy(tmp, gate, gu);
    if (x->interleaved) {
        transpose(gate, tmp, H, F, 2 * F, 2, es);
        transpose((uint8_t *)gate + (size_t)(F * H) * es, tmp + es, H, F, 2 * F, 2, es);
    } else {
        transpose(gate, tmp, H, F, 2 * F, 1, es);
        transpose((uint8_t *)gate + (size_t)(F * H) * es, tmp + (size_t)F * es, H, F, 2 * F, 1, es);
    }
    /* [F, H] to [H, F]. */
    memcpy(tmp, down, dn);
    transpose(down, tmp, F, H, H, 1, ds);
    free(tmp);
    return 0;
}

int moe_expert_deinterleave(const struct moe_expert_ref *x, void *gate, void *gate_s)
{
    const int64_t F = x->gate.rows;
    const struct {
        uint8_t *p;
        size_t row; /* bytes per row */
    } m[2] = {{gate, (size_t)(x->gate.nbytes / (uint64_t)F)},
              {gate_s, (size_t)(x->gate_s.nbytes / (uint64_t)F)}};
    uint8_t *tmp;

    if (!x->interleaved || x->transposed)
        return 0;
    tmp = malloc(2 * x->gate.nbytes);
    if (!tmp)
        return -ENOMEM;
    /* [2F rows]: gate f at row 2f, up f at 2f + 1; to gate's F rows, then
     * up's. */
    for (int k = 0; k < 2; k++) {
        size_t rb = m[k].row;

        memcpy(tmp, m[k].p, 2 * (size_t)F * rb);
        for (int64_t f = 0; f < F; f++) {
            memcpy(m[k].p + (size_t)f * rb, tmp + (size_t)(2 * f) * rb, rb);
            memcpy(m[k].p + (size_t)(F + f) * rb, tmp + (size_t)(2 * f + 1) * rb, rb);
        }
    }
    free(tmp);
    return 0;
}

/* The per-expert names of mixtral (w1, w3, w2) and of the others. */
static const char *expert_part_name(enum moe_arch a, int part)
{
    static const char *const mixtral[3] = {"w1", "w3", "w2"};
    static const char *const others[3] = {"gate_proj", "up_proj", "down_proj"};

    return a == MOE_ARCH_MIXTRAL ? mixtral[part] : others[part];
}

/* The block that holds a family's per-expert tensors. */
static const char *expert_block(enum moe_arch a)
{
    return a == MOE_ARCH_MIXTRAL  ? "block_sparse_moe"
           : a == MOE_ARCH_LLAMA4 ? "feed_forward"
                                  : "mlp";
}

int moe_model_expert_tensor_name(const struct moe_model *m, int layer, int expert,
                                 enum moe_expert_part part, char *buf, size_t len)
{
    return snprintf(buf, len, "%s%d.%s.experts.%d.%s.weight", m->cfg.layer_prefix, layer,
                    expert_block(m->cfg.arch), expert, expert_part_name(m->cfg.arch, (int)part));
}

const struct moe_tensor_ref *moe_model_find_expert_tensor(const struct moe_model *m,
                                                          const char *name)
{
    const char *rest, *end, *blk = expert_block(m->cfg.arch);
    long layer, e;

    if (!starts(name, m->cfg.layer_prefix))
        return NULL;
    layer = parse_num(name + strlen(m->cfg.layer_prefix), '.', &rest);
    if (layer < 0 || layer >= m->cfg.n_layers || !m->layers[layer].is_moe || !starts(rest, blk) ||
        !starts(rest + strlen(blk), ".experts."))
        return NULL;
    e = parse_num(rest + strlen(blk) + strlen(".experts."), '.', &end);
    if (e < 0 || e >= m->cfg.n_experts)
        return NULL;
    for (int k = 0; k < 3; k++) {
        const struct moe_expert_ref *x = &m->layers[layer].experts[e];
        const struct moe_tensor_ref *t[3] = {&x->gate, &x->up, &x->down};
        const char *p = expert_part_name(m->cfg.arch, k);

        if (starts(end, p) && strcmp(end + strlen(p), ".weight") == 0)
            return t[k];
    }
    return NULL;
}

/*
 * gpt-oss as released: the experts in MXFP4 under prefix
 * ("model.layers.3.mlp.experts."), as transformers' Mxfp4 quantizer
 * stores them: gate_up_proj_blocks U8 [E, 2F, H / 32, 16] (each row of the
 * [2F, H] matrix the input multiplies from the right: H / 32 blocks of 32
 * e2m1 values, two per byte, the low nibble first; rows 2f gate and 2f + 1
 * up), gate_up_proj_scales U8 [E, 2F, H / 32] (e8m0), down_proj_blocks
 * [E, H, F / 32, 16] and down_proj_scales [E, H, F / 32].  Not transposed,
 * unlike the bf16 gate_up_proj [E, H, 2F]: transformers' dequantize makes
 * [E, 2F, H] and transposes it.  Each expert's gate and up refs are the two
 * halves of its [2F, H] rows (values and scales), marked interleaved: the
 * cache's copy takes its rows apart once read (moe_expert_deinterleave).
 */
static int get_mxfp4_experts(const struct open_ctx *c, int i, const char *prefix,
                             struct moe_layer *L)
{
    const struct moe_model_config *cfg = &c->m->cfg;
    const int64_t E = cfg->n_experts, F = cfg->expert_ffn, H = cfg->hidden;
    static const char *const part[4] = {"gate_up_proj_blocks", "gate_up_proj_scales",
                                        "down_proj_blocks", "down_proj_scales"};
    static const char *const keys[4] = {
        "[num_local_experts, 2 x intermediate_size, hidden_size / 32, 16]",
        "[num_local_experts, 2 x intermediate_size, hidden_size / 32]",
        "[num_local_experts, hidden_size, intermediate_size / 32, 16]",
        "[num_local_experts, hidden_size, intermediate_size / 32]"};
    const int64_t want[4][4] = {
        {E, 2 * F, H / 32, 16}, {E, 2 * F, H / 32, 0}, {E, H, F / 32, 16}, {E, H, F / 32, 0}};
    const struct moe_st_tensor *t[4];
    char name[4][NAME_MAX_LEN], got[128], exp[96];
    int f[4];

    for (int k = 0; k < 4; k++) {
        snprintf(name[k], sizeof(name[k]), "%s%s", prefix, part[k]);
        t[k] = find_tensor(c, name[k], &f[k]);
    }
    for (int k = 0; k < 4; k++) {
        const char *path;
        int nd = k % 2 ? 3 : 4;

        if (!t[k]) {
            int o = t[0] ? 0 : t[1] ? 1 : t[2] ? 2 : 3;

            return moe_error_set(c->err, -EINVAL,
                                 "%s: layer %d: MXFP4 experts incomplete: no tensor '%s' beside "
                                 "'%s'",
                                 c->m->dir, i, name[k], name[o]);
        }
        path = c->m->files[f[k]].path;
        if (cfg->quant.q != MOE_QUANT_MXFP4)
            return moe_error_set(c->err, -EINVAL,
                                 "%s: tensor '%s': MXFP4 experts but %s has no "
                                 "quantization_config with quant_method \"mxfp4\"",
                                 path, name[k], CONFIG_NAME);
        if (t[k]->dtype != MOE_DTYPE_U8)
            return moe_error_set(c->err, -EINVAL, "%s: tensor '%s': dtype %s: expected U8 (%s)",
                                 path, name[k], moe_dtype_name(t[k]->dtype),
                                 k % 2 ? "e8m0 scales" : "e2m1 values, two per byte");
        if (H % 32 != 0 || F % 32 != 0)
            return moe_error_set(c->err, -EINVAL,
                                 "%s: tensor '%s': MXFP4 experts need hidden_size (%" PRId64
                                 ") and intermediate_size (%" PRId64 ") multiples of 32",
                                 path, name[k], H, F);
        if (t[k]->ndim != nd || memcmp(t[k]->shape, want[k], sizeof(int64_t) * (size_t)nd) != 0)
            return moe_error_set(
                c->err, -EINVAL, "%s: tensor '%s': shape %s contradicts %s: expected %s = %s", path,
                name[k], moe_shape_text(t[k]->shape, t[k]->ndim, got, sizeof(got)), CONFIG_NAME,
                keys[k], moe_shape_text(want[k], nd, exp, sizeof(exp)));
    }
    for (int e = 0; e < E; e++) {
        struct moe_expert_ref *x = &L->experts[e];
        const uint64_t v = (uint64_t)F * (uint64_t)H / 2, s = (uint64_t)F * (uint64_t)H / 32;

        /* gate: the first half of the expert's [2F, H] (rows interleaved
         * as stored), up: the second; both [F, H] once de-interleaved. */
        x->gate = (struct moe_tensor_ref){.file = f[0],
                                          .name = t[0]->name,
                                          .slice = true,
                                          .dtype = MOE_DTYPE_U8,
                                          .rows = F,
                                          .cols = H,
                                          .offset = t[0]->offset + (uint64_t)e * 2 * v,
                                          .nbytes = v};
        x->up = x->gate;
        x->up.offset += v;
        x->gate_s = (struct moe_tensor_ref){.file = f[1],
                                            .name = t[1]->name,
                                            .slice = true,
                                            .dtype = MOE_DTYPE_U8,
                                            .rows = F,
                                            .cols = H / 32,
                                            .offset = t[1]->offset + (uint64_t)e * 2 * s,
                                            .nbytes = s};
        x->up_s = x->gate_s;
        x->up_s.offset += s;
        x->down = (struct moe_tensor_ref){.file = f[2],
                                          .name = t[2]->name,
                                          .slice = true,
                                          .dtype = MOE_DTYPE_U8,
                                          .rows = H,
                                          .cols = F,
                                          .offset = t[2]->offset + (uint64_t)e * v,
                                          .nbytes = v};
        x->down_s = (struct moe_tensor_ref){.file = f[3],
                                            .name = t[3]->name,
                                            .slice = true,
                                            .dtype = MOE_DTYPE_U8,
                                            .rows = H,
                                            .cols = F / 32,
                                            .offset = t[3]->offset + (uint64_t)e * s,
                                            .nbytes = s};
        x->quant = (struct moe_quant_fmt){.q = MOE_QUANT_MXFP4, .brows = 1, .bcols = 32};
        x->nbytes = 3 * v + 3 * s;
        x->interleaved = true;
    }
    return 0;
}

/* Whether layer i of gpt-oss has MXFP4 experts (any of their tensors), and
 * refuses a layer with both those and bf16 ones, naming both. */
static int gpt_oss_mxfp4(const struct open_ctx *c, int i, bool *ret)
{
    static const char *const mx[4] = {"gate_up_proj_blocks", "gate_up_proj_scales",
                                      "down_proj_blocks", "down_proj_scales"};
    static const char *const plain[2] = {"gate_up_proj", "down_proj"};
    const struct moe_model_config *cfg = &c->m->cfg;
    char name[NAME_MAX_LEN], pname[NAME_MAX_LEN];
    int f;

    *ret = false;
    for (int k = 0; k < 4 && !*ret; k++) {
        snprintf(name, sizeof(name), "%s%d.mlp.experts.%s", cfg->layer_prefix, i, mx[k]);
        *ret = find_tensor(c, name, &f) != NULL;
    }
    for (int k = 0; k < 2 && *ret; k++) {
        snprintf(pname, sizeof(pname), "%s%d.mlp.experts.%s", cfg->layer_prefix, i, plain[k]);
        if (find_tensor(c, pname, &f))
            return moe_error_set(c->err, -EINVAL,
                                 "%s: tensor '%s' beside '%s': layer %d mixes MXFP4 and plain "
                                 "experts: expected one format",
                                 c->m->files[f].path, pname, name, i);
    }
    return 0;
}

/* gpt_oss's biases: the router's [E] and the experts' [E, 2F] and [E, H]. */
static int get_gpt_oss_biases(const struct open_ctx *c, int i, struct moe_layer *L)
{
    const struct moe_model_config *cfg = &c->m->cfg;
    char name[NAME_MAX_LEN];
    int r;

    snprintf(name, sizeof(name), "%s%d.mlp.router.bias", cfg->layer_prefix, i);
    r = get_ref(c, i, "router bias", name, 1, 1, cfg->n_experts, "[num_local_experts]",
                &L->router_bias);
    if (r < 0)
        return r;
    L->has_router_bias = true;
    snprintf(name, sizeof(name), "%s%d.mlp.experts.gate_up_proj_bias", cfg->layer_prefix, i);
    r = get_ref(c, i, "experts' gate/up bias", name, 2, cfg->n_experts,
                2 * (int64_t)cfg->expert_ffn, "[num_local_experts, 2 x intermediate_size]",
                &L->gate_up_bias);
    if (r < 0)
        return r;
    snprintf(name, sizeof(name), "%s%d.mlp.experts.down_proj_bias", cfg->layer_prefix, i);
    r = get_ref(c, i, "experts' down bias", name, 2, cfg->n_experts, cfg->hidden,
                "[num_local_experts, hidden_size]", &L->down_bias);
    if (r < 0)
        return r;
    L->has_expert_bias = true;
    return 0;
}

static int load_layer(struct open_ctx *c, int i)
{
    struct moe_model *m = c->m;
    const struct moe_model_config *cfg = &m->cfg;
    struct moe_layer *L = &m->layers[i];
    const bool mixtral = cfg->arch == MOE_ARCH_MIXTRAL, llama = cfg->arch == MOE_ARCH_LLAMA4;
    const bool gpt = cfg->arch == MOE_ARCH_GPT_OSS;
    /* The router's block and the per-expert tensors' (mixtral's is
     * block_sparse_moe, except for the router of the fused layout; Llama 4's
     * feed_forward, with the router feed_forward.router). */
    const char *blk = "mlp", *eblk = expert_block(cfg->arch), *fblk = llama ? eblk : "mlp";
    const char *ek = experts_key(cfg->arch), *fk = ffn_key(cfg->arch);
    char name[NAME_MAX_LEN], prefix[NAME_MAX_LEN], what[64], keys[160];
    bool fused, mxfp4 = false;
    int r, f;

    L->is_moe = true;
    snprintf(name, sizeof(name), "%s%d.block_sparse_moe.gate.weight", cfg->layer_prefix, i);
    if (mixtral && find_tensor(c, name, &f))
        blk = "block_sparse_moe";
    /* Fused when expert 0 has no tensor of its own but the layer has a
     * gate_up_proj; otherwise the per-expert names, and their messages. */
    snprintf(name, sizeof(name), "%s%d.%s.experts.0.%s.weight", cfg->layer_prefix, i, eblk,
             expert_part_name(cfg->arch, 0));
    fused = !find_tensor(c, name, &f);
    if (gpt && !m->packed) {
        /* transformers writes gpt-oss's experts fused only: bf16, or MXFP4
         * as released. */
        r = gpt_oss_mxfp4(c, i, &mxfp4);
        if (r < 0)
            return r;
        fused = true;
    } else if (fused) {
        snprintf(name, sizeof(name), "%s%d.%s.experts.gate_up_proj", cfg->layer_prefix, i, fblk);
        fused = find_tensor(c, name, &f) != NULL;
    }
    snprintf(keys, sizeof(keys), "[%s, hidden_size]", ek);
    if (llama)
        snprintf(name, sizeof(name), "%s%d.feed_forward.router.weight", cfg->layer_prefix, i);
    else if (gpt)
        snprintf(name, sizeof(name), "%s%d.mlp.router.weight", cfg->layer_prefix, i);
    else
        snprintf(name, sizeof(name), "%s%d.%s.gate.weight", cfg->layer_prefix, i, blk);
    r = get_ref(c, i, "router", name, 2, cfg->n_experts, cfg->hidden, keys, &L->router);
    if (r < 0)
        return r;
    if (cfg->has_score_bias) {
        snprintf(keys, sizeof(keys), "[%s]", ek);
        snprintf(name, sizeof(name), "%s%d.mlp.gate.e_score_correction_bias", cfg->layer_prefix, i);
        r = get_ref(c, i, "router score correction bias", name, 1, 1, cfg->n_experts, keys,
                    &L->bias);
        if (r < 0)
            return r;
        L->has_bias = true;
    }

    L->experts = calloc((size_t)cfg->n_experts, sizeof(*L->experts));
    if (!L->experts)
        return moe_error_set(c->err, -ENOMEM, "%s: out of memory for %d experts", m->dir,
                             cfg->n_experts);
    if (fused) {
        snprintf(prefix, sizeof(prefix), "%s%d.%s.experts.", cfg->layer_prefix, i, fblk);
        r = mxfp4 ? get_mxfp4_experts(c, i, prefix, L)
                  : get_fused_experts(c, i, prefix, llama || gpt, gpt, L);
        if (r < 0)
            return r;
    }
    if (gpt) {
        r = get_gpt_oss_biases(c, i, L);
        if (r < 0)
            return r;
    }
    for (int e = 0; e < cfg->n_experts; e++) {
        struct moe_expert_ref *x = &L->experts[e];

        snprintf(prefix, sizeof(prefix), "%s%d.%s.experts.%d.", cfg->layer_prefix, i, eblk, e);
        snprintf(what, sizeof(what), "expert %d", e);
        r = fused ? 0 : get_expert(c, i, what, prefix, cfg->expert_ffn, fk, x);
        if (r == 0 && fused) {
            r = check_expert_dtype(c, &x->gate, MOE_DTYPE_COUNT, NULL);
            if (r == 0)
                r = check_expert_dtype(c, &x->down, x->gate.dtype, x->gate.name);
        }
        if (r < 0)
            return r;
        if (m->expert_dtype == MOE_DTYPE_COUNT) {
            m->expert_dtype = x->gate.dtype;
            m->expert_quant = x->quant;
            m->expert_bytes = x->nbytes;
        } else if (x->gate.dtype != m->expert_dtype) {
            /* the dtype says the format: values of one quantization, or
             * a plain matrix */
            return moe_error_set(c->err, -EINVAL,
                                 "%s: tensor '%s': dtype %s, but the model's "
                                 "other experts are %s: expected one dtype (one format) for "
                                 "every routed expert",
                                 m->files[x->gate.file].path, x->gate.name,
                                 moe_dtype_name(x->gate.dtype), moe_dtype_name(m->expert_dtype));
        }
        m->total_expert_bytes += x->nbytes;
    }

    if (cfg->n_shared_experts > 0) {
        bool qwen = has_qwen_shared(cfg->arch);

        snprintf(prefix, sizeof(prefix), "%s%d.%s.%s.", cfg->layer_prefix, i, fblk,
                 qwen || llama ? "shared_expert" : "shared_experts");
        r = get_expert(c, i, "shared expert", prefix, cfg->shared_ffn,
                       qwen    ? "shared_expert_intermediate_size"
                       : llama ? "intermediate_size"
                               : "n_shared_experts x moe_intermediate_size",
                       &L->shared);
        if (r < 0)
            return r;
        L->has_shared = true;
        m->total_expert_bytes += L->shared.nbytes;
    }
    if (cfg->shared_expert_gate) {
        snprintf(name, sizeof(name), "%s%d.mlp.shared_expert_gate.weight", cfg->layer_prefix, i);
        r = get_ref(c, i, "shared expert gate", name, 2, 1, cfg->hidden, "[1, hidden_size]",
                    &L->shared_gate);
        if (r < 0)
            return r;
        L->has_shared_gate = true;
    }
    m->n_moe_layers++;
    return 0;
}

/* Parses "<digits>" up to stop (no sign, at most 9 digits); -1 otherwise. */
static long parse_num(const char *s, char stop, const char **ret_end)
{
    long v = 0;
    int n = 0;

    while (*s >= '0' && *s <= '9' && n < 10) {
        v = v * 10 + (*s - '0');
        s++;
        n++;
    }
    if (n == 0 || n > 9 || *s != stop)
        return -1;
    *ret_end = s + 1;
    return v;
}

static bool starts(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

/*
 * Refuses a tensor that contradicts config.json: a MoE tensor of a layer
 * config.json makes dense, an expert number past the expert count, or a
 * shared expert where config.json has none.  Layers past num_hidden_layers
 * and tensors outside the MoE block are not ours to judge.
 */
static int check_tensor_name(const struct open_ctx *c, const char *name)
{
    const struct moe_model_config *cfg = &c->m->cfg;
    const char *rest, *sub = NULL;
    bool shared = false;
    char rule[160];
    long layer;

    if (!starts(name, cfg->layer_prefix))
        return 0;
    layer = parse_num(name + strlen(cfg->layer_prefix), '.', &rest);
    if (layer < 0 || layer >= cfg->n_layers)
        return 0;
    if (cfg->arch == MOE_ARCH_LLAMA4) {
        /* feed_forward.{gate,up,down}_proj of a dense layer are not ours. */
        if (starts(rest, "feed_forward.experts."))
            sub = rest + strlen("feed_forward.experts.");
        else if (starts(rest, "feed_forward.shared_expert."))
            shared = true;
        else if (!starts(rest, "feed_forward.router."))
            return 0;
    } else if (cfg->arch == MOE_ARCH_MIXTRAL && starts(rest, "block_sparse_moe.")) {
        if (starts(rest, "block_sparse_moe.experts."))
            sub = rest + strlen("block_sparse_moe.experts.");
    } else if (cfg->arch == MOE_ARCH_MIXTRAL && !starts(rest, "mlp.gate.") &&
               !starts(rest, "mlp.experts.")) {
        /* The fused layout names mixtral's block mlp, as the others. */
        return 0;
    } else if (starts(rest, "mlp.experts.")) {
        sub = rest + strlen("mlp.experts.");
    } else if (has_qwen_shared(cfg->arch) &&
               (starts(rest, "mlp.shared_expert.") || starts(rest, "mlp.shared_expert_gate."))) {
        shared = true;
    } else if (is_deepseek_like(cfg->arch) && starts(rest, "mlp.shared_experts.")) {
        shared = true;
    } else if (!starts(rest, "mlp.gate.")) {
        return 0;
    }

    if (!moe_config_layer_is_moe(cfg, (int)layer)) {
        dense_rule(cfg, rule, sizeof(rule));
        return moe_error_set(c->err, -EINVAL,
                             "%s: layer %ld is dense by %s (%s) but has MoE "
                             "tensor '%s'",
                             c->m->dir, layer, CONFIG_NAME, rule, name);
    }
    if (sub && (strcmp(sub, "gate_up_proj") == 0 || strcmp(sub, "down_proj") == 0))
        sub = NULL; /* the fused layout's, checked by shape when loaded */
    if (sub) {
        const char *end;
        long e = parse_num(sub, '.', &end);
        /* More digits than parse_num takes: past any expert count. */
        bool huge = e < 0 && *sub >= '0' && *sub <= '9' && strchr(sub, '.');

        if (huge || e >= cfg->n_experts)
            return moe_error_set(c->err, -EINVAL,
                                 "%s: layer %ld: tensor '%s' is expert %.*s, "
                                 "but %s has %s %d: expected experts 0 to %d",
                                 c->m->dir, layer, name, (int)strcspn(sub, "."), sub, CONFIG_NAME,
                                 experts_key(cfg->arch), cfg->n_experts, cfg->n_experts - 1);
    }
    if (shared && cfg->n_shared_experts == 0)
        return moe_error_set(c->err, -EINVAL,
                             "%s: layer %ld: tensor '%s' is a shared expert's, "
                             "but %s has none (%s 0)",
                             c->m->dir, layer, name, CONFIG_NAME,
                             has_qwen_shared(cfg->arch) ? "shared_expert_intermediate_size"
                                                        : "n_shared_experts");
    return 0;
}

/* Opens file i of the model (name in the directory) and reads its header. */
static int open_file(struct open_ctx *c, size_t i, const char *name, const char *named_in)
{
    struct moe_model *m = c->m;
    struct moe_model_file *f = &m->files[i];
    struct stat st;
    int r;

    f->name = strdup(name);
    f->path = path_join(m->dir, name);
    if (!f->name || !f->path)
        return moe_error_set(c->err, -ENOMEM, "%s: out of memory", m->dir);
    f->fd = moe_open_regular(f->path, O_RDONLY, &st, c->err);
    if (f->fd < 0) {
        r = f->fd;
        f->fd = -1;
        if (named_in)
            moe_error_named_in(c->err, named_in);
        return r;
    }
    f->size = (uint64_t)st.st_size;
    return moe_st_header_read_fd(f->fd, f->path, &m->headers[i], c->err);
}

/*
 * Fills m from the packed store whose index (path, len bytes of json) is in
 * m->dir: experts.bin as file 0 with the index's tensors as its header, the
 * layers as for a checkpoint, then each routed expert's blob, checked to be
 * exactly its gate, up and down back to back.
 */
static int open_packed(struct open_ctx *c, const char *path, const char *json, size_t len)
{
    struct moe_model *m = c->m;
    const struct moe_model_config *cfg = &m->cfg;
    struct moe_pack_index ix;
    struct moe_model_file *f;
    struct stat st;
    int r;

    r = moe_pack_index_parse(json, len, path, &ix, c->err);
    if (r < 0)
        return r;
    m->packed = true;
    /* A store packed with --quantize: its experts' format, whatever the
     * checkpoint's config.json (copied as it was) says. */
    if (ix.quant.q != MOE_QUANT_NONE)
        m->cfg.quant = ix.quant;
    m->files = calloc(1, sizeof(*m->files));
    m->headers = calloc(1, sizeof(*m->headers));
    if (!m->files || !m->headers) {
        r = moe_error_set(c->err, -ENOMEM, "out of memory");
        goto out;
    }
    m->n_files = 1;
    f = &m->files[0];
    f->fd = -1;
    m->headers[0] = ix.tensors;
    ix.tensors = NULL;
    f->name = strdup(ix.data_name);
    f->path = path_join(m->dir, ix.data_name);
    if (!f->name || !f->path) {
        r = moe_error_set(c->err, -ENOMEM, "out of memory");
        goto out;
    }
    f->fd = moe_open_regular(f->path, O_RDONLY, &st, c->err);
    if (f->fd < 0) {
        r = f->fd;
        f->fd = -1;
        moe_error_named_in(c->err, path);
        goto out;
    }
    f->size = (uint64_t)st.st_size;
    if (f->size != ix.data_bytes) {
        r = moe_error_set(c->err, -EINVAL,
                          "%s: file is %" PRIu64 " bytes but %s says data_bytes %" PRIu64
                          ": truncated or replaced since it was packed? pack the model again",
                          f->path, f->size, MOE_PACK_INDEX, ix.data_bytes);
        goto out;
    }
    for (size_t i = 0; i < m->headers[0]->n_tensors; i++) {
        r = check_tensor_name(c, m->headers[0]->tensors[i].name);
        if (r < 0)
            goto out;
    }

    m->layers = calloc((size_t)cfg->n_layers, sizeof(*m->layers));
    if (!m->layers) {
        r = moe_error_set(c->err, -ENOMEM, "out of memory for %d layers", cfg->n_layers);
        goto out;
    }
    for (int i = 0; i < cfg->n_layers; i++) {
        if (!moe_config_layer_is_moe(cfg, i))
            continue;
        r = load_layer(c, i);
        if (r < 0)
            goto out;
        for (int e = 0; e < cfg->n_experts; e++) {
            struct moe_expert_ref *x = &m->layers[i].experts[e];
            const struct moe_pack_entry *pe = moe_pack_index_find(&ix, i, e);

            if (!pe) {
                r = moe_error_set(c->err, -EINVAL,
                                  "%s: layer %d expert %d: no entry in 'experts': expected "
                                  "one for every routed expert",
                                  path, i, e);
                goto out;
            }
            const struct moe_tensor_ref *t[6];
            int nt = moe_expert_tensors(x, t);
            bool back_to_back = true;

            for (int k = 1; k < nt; k++)
                back_to_back &= t[k]->offset == t[k - 1]->offset + t[k - 1]->nbytes;
            if (pe->offset != x->gate.offset || pe->nbytes != x->nbytes || !back_to_back) {
                r = moe_error_set(
                    c->err, -EINVAL,
                    "%s: layer %d expert %d: blob [%" PRIu64 ", +%" PRIu64
                    ") is not its gate, up and down (then their scales) back to back (gate at "
                    "%" PRIu64 " +%" PRIu64 ", up at %" PRIu64 " +%" PRIu64 ", down at %" PRIu64
                    " +%" PRIu64 ")",
                    path, i, e, pe->offset, pe->nbytes, x->gate.offset, x->gate.nbytes,
                    x->up.offset, x->up.nbytes, x->down.offset, x->down.nbytes);
                goto out;
            }
            x->blob = true;
            x->has_xxh3 = true;
            x->xxh3 = pe->xxh3;
        }
    }
    /* Every routed expert found its entry and entries are distinct, so an
     * extra one is for an expert the model does not have. */
    for (size_t k = 0; k < ix.n_experts; k++) {
        const struct moe_pack_entry *pe = &ix.experts[k];

        if (!moe_config_layer_is_moe(cfg, pe->layer) || pe->expert >= cfg->n_experts) {
            r = moe_error_set(c->err, -EINVAL,
                              "%s: 'experts' has layer %d expert %d, which %s does not have "
                              "(%d layers, %d experts per MoE layer)",
                              path, pe->layer, pe->expert, CONFIG_NAME, cfg->n_layers,
                              cfg->n_experts);
            goto out;
        }
    }
    r = 0;
out:
    moe_pack_index_clear(&ix);
    return r;
}

int moe_model_open(const char *dir, struct moe_model **ret, struct moe_error *err)
{
    struct moe_st_index *idx = NULL;
    struct moe_model *m;
    struct open_ctx c = {.err = err};
    char *path = NULL, *buf = NULL;
    size_t len, n_files;
    int r;

    m = calloc(1, sizeof(*m));
    if (!m)
        return moe_error_set(err, -ENOMEM, "out of memory");
    c.m = m;
    m->expert_dtype = MOE_DTYPE_COUNT;
    m->dir = strdup(dir);
    if (!m->dir) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto fail;
    }

    /* config.json */
    path = path_join(dir, CONFIG_NAME);
    if (!path) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    r = moe_read_regular_file(path, CONFIG_MAX_BYTES, &buf, &len, err);
    if (r < 0)
        goto fail;
    r = moe_config_parse(buf, len, path, &m->cfg, err);
    free(buf);
    buf = NULL;
    if (r < 0)
        goto fail;
    free(path);

    /* A packed store, when the directory holds its index. */
    path = path_join(dir, MOE_PACK_INDEX);
    if (!path) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    r = moe_read_regular_file(path, MOE_PACK_INDEX_MAX, &buf, &len, err);
    if (r == 0) {
        r = open_packed(&c, path, buf, len);
        if (r < 0)
            goto fail;
        free(buf);
        free(path);
        *ret = m;
        return 0;
    } else if (r != -ENOENT) {
        goto fail;
    }
    free(path);

    /* The index and its shards, or one model.safetensors. */
    path = path_join(dir, INDEX_NAME);
    if (!path) {
        r = moe_error_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    r = moe_read_regular_file(path, INDEX_MAX_BYTES, &buf, &len, err);
    if (r == 0) {
        r = moe_st_index_parse(buf, len, path, &idx, err);
        free(buf);
        buf = NULL;
        if (r < 0)
            goto fail;
    } else if (r != -ENOENT) {
        goto fail;
    }
    n_files = idx ? idx->n_files : 1;
    m->files = calloc(n_files, sizeof(*m->files));
    m->headers = calloc(n_files, sizeof(*m->headers));
    if (!m->files || !m->headers) {
        r = moe_error_set(err, -ENOMEM, "out of memory for %zu files", n_files);
        goto fail;
    }
    m->n_files = n_files;
    for (size_t i = 0; i < n_files; i++)
        m->files[i].fd = -1;
    c.idx = idx;
    for (size_t i = 0; i < n_files; i++) {
        r = open_file(&c, i, idx ? idx->files[i] : SINGLE_NAME, idx ? INDEX_NAME : NULL);
        if (r == -ENOENT && !idx) {
            r = moe_error_set(err, -ENOENT, "no %s or %s in %s", SINGLE_NAME, INDEX_NAME, dir);
            goto fail;
        }
        if (r < 0)
            goto fail;
    }

    /* Every tensor of the weight_map is where the index says. */
    if (idx) {
        for (size_t i = 0; i < idx->n_entries; i++) {
            const struct moe_st_index_entry *e = &idx->entries[i];

            if (!moe_st_header_find(m->headers[e->file], e->tensor)) {
                r = moe_error_set(err, -EINVAL,
                                  "%s: maps tensor '%s' to %s, which has no such "
                                  "tensor",
                                  path, e->tensor, idx->files[e->file]);
                goto fail;
            }
        }
        for (size_t i = 0; i < idx->n_entries; i++) {
            r = check_tensor_name(&c, idx->entries[i].tensor);
            if (r < 0)
                goto fail;
        }
    } else {
        for (size_t i = 0; i < m->headers[0]->n_tensors; i++) {
            r = check_tensor_name(&c, m->headers[0]->tensors[i].name);
            if (r < 0)
                goto fail;
        }
    }

    m->layers = calloc((size_t)m->cfg.n_layers, sizeof(*m->layers));
    if (!m->layers) {
        r = moe_error_set(err, -ENOMEM, "out of memory for %d layers", m->cfg.n_layers);
        goto fail;
    }
    for (int i = 0; i < m->cfg.n_layers; i++) {
        if (!moe_config_layer_is_moe(&m->cfg, i))
            continue;
        r = load_layer(&c, i);
        if (r < 0)
            goto fail;
    }

    moe_st_index_free(idx);
    free(path);
    *ret = m;
    return 0;
fail:
    moe_st_index_free(idx);
    free(buf);
    free(path);
    moe_model_free(m);
    return r;
}

/* ---- reading -------------------------------------------------------------- */

int moe_model_read(const struct moe_model *m, const struct moe_tensor_ref *t, void *dst,
                   struct moe_error *err)
{
    const struct moe_model_file *f;
    int64_t n;

    if (t->file < 0 || (size_t)t->file >= m->n_files)
        return moe_error_set(err, -EINVAL, "tensor '%s': file %d out of range (model has %zu)",
                             t->name ? t->name : "?", t->file, m->n_files);
    f = &m->files[t->file];
    n = moe_pread_full(f->fd, dst, (size_t)t->nbytes, t->offset);
    if (n < 0)
        return moe_error_set(err, (int)n, "%s: tensor '%s': read at offset %" PRIu64 " failed: %s",
                             f->path, t->name, t->offset, strerror((int)-n));
    if ((uint64_t)n < t->nbytes)
        return moe_error_set(err, -EIO,
                             "%s: tensor '%s': short read at offset %" PRIu64
                             ": file truncated since it was opened?",
                             f->path, t->name, t->offset + (uint64_t)n);
    return 0;
}

void moe_model_router_params(const struct moe_model *m, const float *bias,
                             struct moe_router_params *ret)
{
    const struct moe_model_config *c = &m->cfg;
    bool deepseek = is_deepseek_like(c->arch);

    *ret = (struct moe_router_params){
        .score_func = c->score_func,
        .n_experts = c->n_experts,
        .top_k = c->top_k,
        .norm_topk_prob = c->norm_topk_prob,
        .n_group = deepseek ? c->n_group : 1,
        .topk_group = deepseek ? c->topk_group : 1,
        .routed_scaling_factor = deepseek ? c->routed_scaling_factor : 1.0f,
        .bias = c->score_func == MOE_SCORE_SIGMOID ? bias : NULL,
    };
}

const char *moe_precision_name(enum moe_compute_precision p)
{
    return p == MOE_PRECISION_BF16 ? "bf16" : "exact";
}

int moe_precision_parse(const char *s, enum moe_compute_precision *ret)
{
    if (!strcmp(s, "exact"))
        *ret = MOE_PRECISION_EXACT;
    else if (!strcmp(s, "bf16"))
        *ret = MOE_PRECISION_BF16;
    else
        return -EINVAL;
    return 0;
}
