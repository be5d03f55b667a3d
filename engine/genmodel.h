/*
 * Synthetic checkpoints in the exact Hugging Face layout of each family:
 * config.json, model.safetensors or model-0000X-of-0000N.safetensors shards
 * with model.safetensors.index.json, the real tensor names, and the non-MoE
 * tensors (embeddings, attention, norms, dense MLPs) at small sizes.
 *
 * Weights are deterministic: every tensor's values come from (seed, tensor
 * name) alone, so the same options give byte-identical files whatever the
 * sharding.  Scales keep outputs O(1) for O(1) inputs.  Router rows are
 * skewed so that, as in real models, some experts are chosen far more often
 * than others: a random permutation ranks the experts, pairs of ranks get a
 * Zipf-like popularity and a gain growing with it, and the two rows of a pair
 * share a component with opposite signs (see genmodel.c).  For N(0,1) hidden
 * states the most popular expert is picked 4x to 30x as often as the least.
 */
#ifndef MOED_ENGINE_GENMODEL_H
#define MOED_ENGINE_GENMODEL_H

#include "common.h"
#include "model.h"

/* How the routed experts are stored. */
enum moe_genmodel_layout {
    /* As the family's releases: fused for qwen3_5_moe, else per expert. */
    MOE_GEN_LAYOUT_DEFAULT = 0,
    /* mlp.experts.<e>.{gate,up,down}_proj.weight (mixtral: w1, w3, w2). */
    MOE_GEN_LAYOUT_PER_EXPERT,
    /* transformers 5's mlp.experts.gate_up_proj [E, 2F, H] and down_proj
     * [E, H, F] (mixtral's router then mlp.gate), with the same values as
     * the per-expert layout, byte for byte. */
    MOE_GEN_LAYOUT_FUSED,
};

/* How far moe_genmodel_write has come, for its progress callback. */
struct moe_genmodel_progress {
    uint64_t bytes_done;  /* tensor bytes written, of every file so far */
    uint64_t bytes_total; /* tensor bytes of the whole checkpoint */
    int file;             /* the file being written, 1 to n_files */
    int n_files;          /* config.json, the shards and their index */
};

struct moe_genmodel_opts {
    enum moe_arch arch;
    const char *out_dir; /* created if missing; existing files are replaced */
    int n_layers;        /* all counts: <= 0 means the family's default */
    int n_experts;
    int top_k;
    int hidden;
    int ffn;                         /* routed expert ffn */
    int n_shared;                    /* shared experts: -1 default, 0 none (qwen2_moe: 0 or 1;
                                      * deepseek-like: any; others: must be 0 or -1) */
    enum moe_dtype dtype;            /* BF16, F16 or F32 (F8_E4M3: FP8 linear weights) */
    enum moe_quant quant;            /* NONE, or MXFP4 (gpt_oss, bf16): the routed experts as
                                      * released, gate_up_proj_blocks and _scales, down_proj_blocks
                                      * and _scales, quantized from the bf16 layout's values with
                                      * moe_quant_mxfp4_row */
    int n_shards;                    /* 1: model.safetensors; >1 sharded with index */
    enum moe_genmodel_layout layout; /* how the routed experts are stored */
    uint64_t seed;
    /* Called as the checkpoint is written (may be NULL): when a file is
     * begun and done, and after every tensor and every GEN_CHUNK elements
     * of a large one, so that one file of gigabytes shows its bytes move. */
    void (*progress)(void *ctx, const struct moe_genmodel_progress *pr);
    void *progress_ctx;
};

/* Fills o with the family's small defaults (and arch set). */
void moe_genmodel_defaults(enum moe_arch arch, struct moe_genmodel_opts *o);

/*
 * Writes the checkpoint.  Options <= 0 (n_shared: -1) take the family's
 * defaults.  -EINVAL with a message for impossible options (top_k > experts,
 * experts not divisible into DeepSeek's groups, shared experts on a family
 * without them...), -errno for I/O errors naming the file.
 */
int moe_genmodel_write(const struct moe_genmodel_opts *o, struct moe_error *err);

#endif
