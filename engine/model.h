/*
 * A model: its config.json, its safetensors files and, for every layer, where
 * the MoE tensors are.  Opening a model reads config.json, the index and the
 * safetensors headers, and nothing else; expert weights are read later, by
 * byte range, with moe_model_read().
 *
 * Supported families (config.json "model_type") and their tensor names, for
 * layer i (prefix "model.layers.i."):
 *   mixtral      block_sparse_moe.gate.weight [E,H];
 *                block_sparse_moe.experts.e.{w1 (gate) [F,H], w3 (up) [F,H], w2 (down) [H,F]}
 *   qwen2_moe    mlp.gate.weight; mlp.experts.e.{gate,up,down}_proj.weight;
 *                mlp.shared_expert.{gate,up,down}_proj.weight; mlp.shared_expert_gate.weight [1,H]
 *   qwen3_moe,   mlp.gate.weight; mlp.experts.e.{gate,up,down}_proj.weight
 *   olmoe
 *   deepseek_v3  mlp.gate.weight; mlp.gate.e_score_correction_bias [E];
 *                mlp.experts.e.{gate,up,down}_proj.weight;
 *                mlp.shared_experts.{gate,up,down}_proj.weight [S*F,H]/[H,S*F];
 *                layers < first_k_dense_replace (and i % moe_layer_freq != 0) are dense.
 *   kimi_k2,     as deepseek_v3 (DeepSeek-V3's layout and routing under its own
 *   glm4_moe     model type; glm4_moe has no moe_layer_freq)
 *   deepseek_v2  as deepseek_v3 without e_score_correction_bias (softmax scores)
 *   qwen3_next,  as qwen2_moe (shared expert and its sigmoid gate); their linear-
 *   qwen3_5_moe  attention layers are the caller's.  qwen3_5_moe has no dense
 *                layers; its released config.json is the multimodal one
 *                (model_type qwen3_5_moe, the text model's keys in "text_config"),
 *                whose layers are model.language_model.layers.i. (layer_prefix);
 *                transformers' text-only class writes model_type qwen3_5_moe_text,
 *                flat, with model.layers.i.
 *   llama4_text  feed_forward.router.weight [E,H]; feed_forward.experts.gate_up_proj
 *                [E, H, 2F] and feed_forward.experts.down_proj [E, F, H], fused and
 *                TRANSPOSED (the expert computes x @ W: expert e's gate is the
 *                columns [0, F) of gate_up_proj[e], its up the columns [F, 2F));
 *                feed_forward.shared_expert.{gate,up,down}_proj.weight, F = intermediate_size;
 *                layers in moe_layers, or else every interleave_moe_layer_step-th
 *                ((i + 1) % step == 0), are MoE.  The multimodal config (model_type
 *                llama4, the text keys in "text_config") has its layers under
 *                language_model.model.layers.i. (layer_prefix).  A packed store
 *                holds the plain per-expert layout, feed_forward.experts.e.*.
 *   gpt_oss      mlp.router.weight [E,H] and mlp.router.bias [E] (logits = W x + b;
 *                top-k, softmax over the k: mixtral's rule); mlp.experts.gate_up_proj
 *                [E, H, 2F] and mlp.experts.down_proj [E, F, H], fused and TRANSPOSED
 *                as llama4_text's, but gate and up INTERLEAVED: expert e's gate is
 *                the even columns of gate_up_proj[e], its up the odd ones;
 *                mlp.experts.gate_up_proj_bias [E, 2F] (interleaved alike) and
 *                mlp.experts.down_proj_bias [E, H]; the clamped SwiGLU (swiglu_alpha,
 *                swiglu_limit; backend.h MOE_ACT_SWIGLU_CLAMP).  F =
 *                intermediate_size; every layer is a MoE layer.  As released, the
 *                experts are MXFP4 (quantization_config quant_method "mxfp4"):
 *                mlp.experts.gate_up_proj_blocks U8 [E, 2F, H / 32, 16] (NOT
 *                transposed: rows are outputs, gate at the even rows, up at the
 *                odd) with gate_up_proj_scales U8 [E, 2F, H / 32] (e8m0), and
 *                down_proj_blocks [E, H, F / 32, 16] with down_proj_scales
 *                [E, H, F / 32]; biases as above.  A packed store holds
 *                the plain per-expert layout, mlp.experts.e.{gate,up,down}_proj.weight,
 *                and the biases as the checkpoint has them.
 * The routed experts of any family may also be stored fused, as transformers 5
 * keeps them (save_pretrained(save_original_format=False), and releases such as
 * Qwen3.5-MoE): mlp.experts.gate_up_proj [E, 2F, H], each expert's gate rows
 * then its up rows, and mlp.experts.down_proj [E, H, F]; mixtral's router is
 * then mlp.gate.weight.  Expert e is the slices [e] of the two: still two
 * contiguous byte ranges, gate and up back to back.
 * Qwen layers (qwen2_moe, qwen3_moe, qwen3_next) listed in mlp_only_layers, or
 * with (i + 1) % decoder_sparse_step != 0, are dense.  Every other tensor (attention, norms,
 * embeddings, dense MLPs, DeepSeek's multi-token-prediction layer beyond num_hidden_layers) is
 * ignored, but its byte range is still checked by the safetensors parser.
 */
#ifndef MOED_ENGINE_MODEL_H
#define MOED_ENGINE_MODEL_H

#include "backend.h"
#include "common.h"
#include "router.h"

enum moe_arch {
    MOE_ARCH_MIXTRAL = 0,
    MOE_ARCH_QWEN2_MOE,
    MOE_ARCH_QWEN3_MOE,
    MOE_ARCH_OLMOE,
    MOE_ARCH_DEEPSEEK_V3,
    MOE_ARCH_DEEPSEEK_V2,
    MOE_ARCH_KIMI_K2,
    MOE_ARCH_GLM4_MOE,
    MOE_ARCH_QWEN3_NEXT,
    MOE_ARCH_QWEN3_5_MOE,
    MOE_ARCH_LLAMA4,
    MOE_ARCH_GPT_OSS,
    MOE_ARCH_COUNT,
};

/* "mixtral", "qwen2_moe", ... (config.json model_type). */
const char *moe_arch_name(enum moe_arch a);
/* Returns 0 and sets *ret, or -EINVAL for names not listed above. */
int moe_arch_parse(const char *s, enum moe_arch *ret);

#define MOE_MAX_LAYERS 1024
#define MOE_MAX_HIDDEN (1 << 16)
#define MOE_MAX_FFN (1 << 18)

/* What config.json says, normalised across families. */
struct moe_model_config {
    enum moe_arch arch;
    int n_layers;            /* num_hidden_layers */
    int hidden;              /* hidden_size */
    int expert_ffn;          /* rows of a routed expert's gate/up: intermediate_size
                              * (mixtral, olmoe) or moe_intermediate_size */
    int dense_ffn;           /* intermediate_size of dense layers; 0 when none */
    int n_experts;           /* routed experts per MoE layer */
    int top_k;               /* num_experts_per_tok */
    int n_shared_experts;    /* deepseek n_shared_experts; qwen2_moe, qwen3_next,
                              * qwen3_5_moe 1 when it has one */
    int shared_ffn;          /* rows of the shared expert's gate/up (all shared experts
                              * fused, as stored); 0 when none */
    bool shared_expert_gate; /* qwen2_moe, qwen3_next, qwen3_5_moe: shared output
                              * scaled by sigmoid(shared_expert_gate . x) */
    bool norm_topk_prob;     /* mixtral: always true */
    enum moe_score_func score_func;
    int n_group;                 /* deepseek; 1 elsewhere */
    int topk_group;              /* deepseek; 1 elsewhere */
    float routed_scaling_factor; /* deepseek; 1 elsewhere */
    bool has_score_bias;         /* deepseek: e_score_correction_bias present */
    int first_k_dense;           /* deepseek first_k_dense_replace; 0 elsewhere */
    int moe_layer_freq;          /* deepseek; 1 elsewhere */
    int decoder_sparse_step;     /* qwen; 1 elsewhere */
    int n_mlp_only_layers;
    int *mlp_only_layers;    /* qwen mlp_only_layers, owned */
    int moe_layer_step;      /* llama4 interleave_moe_layer_step; 1 elsewhere */
    bool has_moe_layer_list; /* llama4 moe_layers given: it, not the step, decides */
    int n_moe_layer_list;
    int *moe_layer_list;     /* llama4 moe_layers, owned */
    bool scale_input;        /* llama4: a routed expert's input, not its output, is
                              * multiplied by the token's routing weight */
    bool router_bias;        /* gpt_oss: the router has a bias (added to the logits) */
    bool expert_bias;        /* gpt_oss: routed experts have gate/up and down biases */
    enum moe_activation act; /* gpt_oss MOE_ACT_SWIGLU_CLAMP; MOE_ACT_SILU elsewhere */
    float swiglu_alpha;      /* gpt_oss swiglu_alpha (1.702); 0 elsewhere */
    float swiglu_limit;      /* gpt_oss swiglu_limit (7.0); 0 elsewhere */
    enum moe_dtype dtype;    /* torch_dtype; MOE_DTYPE_COUNT when absent */
    /* quantization_config (quant_method "fp8", fmt "e4m3", weight_block_size
     * [r, c]): FP8 with brows r, bcols c; .q NONE when absent.  A packed
     * store's moe-pack.json "quantization" overrides it. */
    struct moe_quant_fmt quant;
    /* Prefix of layer i's tensors, before "<i>.": "model.layers." or, for a
     * multimodal qwen3_5_moe config, "model.language_model.layers.", for a
     * multimodal llama4 one "language_model.model.layers." (static). */
    const char *layer_prefix;
};

/*
 * Parses config.json (json_len bytes).  fname names it in messages: missing
 * keys, wrong types, values out of range and unsupported model types are
 * refused with the key, the value and what is expected.  Free the result's
 * contents with moe_config_clear.
 */
int moe_config_parse(const char *json, size_t json_len, const char *fname,
                     struct moe_model_config *ret, struct moe_error *err);
void moe_config_clear(struct moe_model_config *c);

/* True when layer (0-based) is a MoE layer under the family's rule. */
bool moe_config_layer_is_moe(const struct moe_model_config *c, int layer);

/* Where one tensor's bytes are. */
struct moe_tensor_ref {
    int file;         /* index into moe_model.files */
    const char *name; /* points into the model's headers; for a slice, the fused tensor's */
    bool slice;       /* one expert's part of a fused tensor (gate_up_proj, down_proj) */
    enum moe_dtype dtype;
    int64_t rows; /* [rows, cols]; 1-D tensors: rows = 1 */
    int64_t cols;
    uint64_t offset; /* absolute offset in the file */
    uint64_t nbytes;
};

/*
 * One SwiGLU expert: down(silu(gate x) * up x).  Quantized (quant.q not
 * NONE): gate, up and down are the values (dtype moe_quant_value_dtype;
 * rows and cols the matrix's, nbytes the stored bytes) and gate_s, up_s,
 * down_s their scale tensors (quant.h): "<name>_scale_inv" beside each
 * "<name>" weight for FP8 as published, "<name>_scale" for INT8 and INT4
 * (moectl pack --quantize).
 */
struct moe_expert_ref {
    struct moe_tensor_ref gate;                 /* [ffn, hidden] (mixtral w1) */
    struct moe_tensor_ref up;                   /* [ffn, hidden] (mixtral w3) */
    struct moe_tensor_ref down;                 /* [hidden, ffn] (mixtral w2) */
    uint64_t nbytes;                            /* gate + up + down, with their scales */
    struct moe_quant_fmt quant;                 /* .q NONE: plain */
    struct moe_tensor_ref gate_s, up_s, down_s; /* scales, when quantized */
    /* Llama 4's fused experts, as stored: gate's bytes then up's (contiguous)
     * are one [hidden, 2 x ffn] matrix that the input multiplies from the
     * left (each row: ffn gate columns, then ffn up columns), and down is
     * [ffn, hidden].  The shapes above are the plain ones; the bytes become
     * plain with moe_expert_untranspose() once read. */
    bool transposed;
    /* gpt-oss's fused experts: transposed as above, but each row of the
     * [hidden, 2 x ffn] matrix interleaves gate and up (gate at even
     * columns, up at odd); moe_expert_untranspose() handles it too.
     * Interleaved but not transposed: gpt-oss's MXFP4 experts, whose gate
     * and up are the halves of one [2 x ffn, hidden] matrix (values and
     * scales alike) with gate at the even rows and up at the odd ones;
     * moe_expert_deinterleave() makes them plain. */
    bool interleaved;
    /* Packed store (pack.h): gate, up and down lie back to back from
     * gate.offset (MOE_PACK_ALIGN-aligned) in one file, and xxh3 is the
     * XXH3-64 of those nbytes.  False/0 for a Hugging Face checkpoint. */
    bool blob;
    bool has_xxh3;
    uint64_t xxh3;
};

struct moe_layer {
    bool is_moe;                  /* false: a dense layer, nothing below is set */
    struct moe_tensor_ref router; /* [n_experts, hidden] */
    bool has_bias;
    struct moe_tensor_ref bias;     /* e_score_correction_bias [n_experts] */
    struct moe_expert_ref *experts; /* [n_experts], owned */
    bool has_shared;
    struct moe_expert_ref shared; /* shared expert(s), ffn = cfg.shared_ffn */
    bool has_shared_gate;
    struct moe_tensor_ref shared_gate; /* qwen2_moe [1, hidden] */
    bool has_router_bias;
    struct moe_tensor_ref router_bias; /* gpt_oss mlp.router.bias [n_experts] */
    bool has_expert_bias;
    /* gpt_oss, every routed expert's, as stored: gate_up_proj_bias [n_experts,
     * 2 x ffn] (gate and up interleaved) and down_proj_bias [n_experts,
     * hidden].  Small: the layer keeps them, as it keeps its router. */
    struct moe_tensor_ref gate_up_bias;
    struct moe_tensor_ref down_bias;
};

struct moe_model_file {
    char *path;    /* owned, as opened */
    char *name;    /* owned, file name within the directory */
    uint64_t size; /* at open */
    int fd;        /* O_RDONLY, open for the model's lifetime */
};

struct moe_st_header;

struct moe_model {
    char *dir;   /* owned */
    bool packed; /* opened from a packed store (pack.h), not a checkpoint */
    struct moe_model_config cfg;
    size_t n_files;
    struct moe_model_file *files;   /* owned */
    struct moe_st_header **headers; /* [n_files], owned */
    struct moe_layer *layers;       /* [cfg.n_layers], owned */
    int n_moe_layers;
    enum moe_dtype expert_dtype;       /* dtype of every routed expert tensor */
    struct moe_quant_fmt expert_quant; /* quantization of every routed expert */
    uint64_t expert_bytes;             /* bytes of one routed expert (gate+up+down) */
    uint64_t total_expert_bytes;       /* all routed and shared experts */
    /* How its experts compute (a serving choice, not in config.json): exact
     * after open; moed sets it from the model's compute_precision, moectl
     * forward --local from --compute-precision. */
    enum moe_compute_precision precision;
};

/* "exact" or "bf16" (enum moe_compute_precision, backend.h). */
const char *moe_precision_name(enum moe_compute_precision p);
/* Sets *ret from "exact" or "bf16"; -EINVAL for anything else. */
int moe_precision_parse(const char *s, enum moe_compute_precision *ret);

/*
 * Opens the checkpoint in dir: config.json, then model.safetensors.index.json
 * and its shards, or a single model.safetensors; or, when dir holds
 * moe-pack.json, the packed store (pack.h).  Checks every MoE tensor is
 * present with the shape and dtype config.json implies.  Returns 0 and sets
 * *ret (free with moe_model_free), or -errno with *err naming the file, the
 * tensor and what is wrong.
 */
int moe_model_open(const char *dir, struct moe_model **ret, struct moe_error *err);
void moe_model_free(struct moe_model *m);

/* Reads t's bytes into dst (t->nbytes).  A short read (file truncated since
 * open) is -EIO with a message naming file and tensor. */
int moe_model_read(const struct moe_model *m, const struct moe_tensor_ref *t, void *dst,
                   struct moe_error *err);

/*
 * Rewrites a transposed expert (x->transposed), whose tensors were read as
 * stored to gate, up and down, into the plain layout in place: gate [ffn,
 * hidden], up [ffn, hidden], down [hidden, ffn], row-major; an interleaved
 * one (gpt-oss) takes gate from the even columns, up from the odd ones.  gate and up must
 * be adjacent (up == gate + x->gate.nbytes), as they are in the file.
 * Does nothing for a plain expert.  0, or -ENOMEM (the bytes untouched).
 */
int moe_expert_untranspose(const struct moe_expert_ref *x, void *gate, void *up, void *down);

/*
 * Rewrites an MXFP4 expert whose gate and up rows are interleaved
 * (x->interleaved, not transposed), read as stored, into gate's ffn rows
 * then up's, in place: the values from gate (up == gate + x->gate.nbytes)
 * and the scales from gate_s (up_s == gate_s + x->gate_s.nbytes).  Does
 * nothing for any other expert.  0, or -ENOMEM (the bytes untouched).
 */
int moe_expert_deinterleave(const struct moe_expert_ref *x, void *gate, void *gate_s);

/* The tensors of an expert in the order of moe_expert_ref: gate, up, down,
 * then their scales when quantized; returns how many (3 or 6). */
int moe_expert_tensors(const struct moe_expert_ref *x, const struct moe_tensor_ref *ret[6]);

/* The scale tensor name suffix of a quantization: "_scale_inv" (FP8),
 * "_scale" (INT8, INT4, MXFP4). */
const char *moe_quant_scale_suffix(enum moe_quant q);

/* Which part of an expert: gate, up, down (the order of moe_expert_ref). */
enum moe_expert_part {
    MOE_PART_GATE = 0,
    MOE_PART_UP,
    MOE_PART_DOWN,
};

/*
 * The per-expert tensor name of a routed expert's part ("model.layers.3.mlp.
 * experts.5.gate_proj.weight", mixtral "...block_sparse_moe.experts.5.w1.weight"),
 * whatever layout the checkpoint has: the name a packed store gives a slice of
 * a fused tensor.  Returns snprintf's count.
 */
int moe_model_expert_tensor_name(const struct moe_model *m, int layer, int expert,
                                 enum moe_expert_part part, char *buf, size_t len);

/* The routed expert tensor of m that name (as moe_model_expert_tensor_name
 * writes it) denotes, or NULL. */
const struct moe_tensor_ref *moe_model_find_expert_tensor(const struct moe_model *m,
                                                          const char *name);

/* Router parameters of a MoE layer; bias: the layer's bias as fp32 or NULL. */
void moe_model_router_params(const struct moe_model *m, const float *bias,
                             struct moe_router_params *ret);

#endif
