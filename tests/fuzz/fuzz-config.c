/*
 * Fuzz target of config.json parsing (engine/model.c).  Anything accepted
 * must be within the limits the rest of the engine relies on, route
 * consistently (moe_router_check), have at least one MoE layer and a
 * quantization_config the kernels can compute with (FP8 blocks, or gpt_oss's MXFP4).
 */
#include "model.h"

#include <stdint.h>
#include <stdlib.h>

static void check(const struct moe_model_config *c)
{
    struct moe_router_params rp = {
        .score_func = c->score_func,
        .n_experts = c->n_experts,
        .top_k = c->top_k,
        .norm_topk_prob = c->norm_topk_prob,
        .n_group = c->n_group,
        .topk_group = c->topk_group,
        .routed_scaling_factor = c->routed_scaling_factor,
    };
    struct moe_error err;
    int n_moe = 0;

    if ((unsigned)c->arch >= MOE_ARCH_COUNT || c->n_layers < 1 || c->n_layers > MOE_MAX_LAYERS ||
        c->hidden < 1 || c->hidden > MOE_MAX_HIDDEN || c->expert_ffn < 1 ||
        c->expert_ffn > MOE_MAX_FFN || c->shared_ffn < 0 || c->shared_ffn > MOE_MAX_FFN ||
        c->dense_ffn < 0 || c->dense_ffn > MOE_MAX_FFN ||
        (c->n_shared_experts > 0) != (c->shared_ffn > 0))
        abort();
    if (moe_router_check(&rp, &err) != 0)
        abort();
    for (int i = -1; i <= c->n_layers; i++)
        n_moe += moe_config_layer_is_moe(c, i);
    if (n_moe < 1 || n_moe > c->n_layers)
        abort();
    if (c->dtype != MOE_DTYPE_COUNT && !moe_dtype_is_compute(c->dtype))
        abort();
    /* quantization_config: none, FP8 blocks the kernels take, or gpt-oss's
     * MXFP4 (an e8m0 scale per 1 x 32) */
    if (c->quant.q == MOE_QUANT_MXFP4 &&
        (c->arch != MOE_ARCH_GPT_OSS || c->quant.brows != 1 || c->quant.bcols != 32))
        abort();
    if (c->quant.q != MOE_QUANT_NONE && c->quant.q != MOE_QUANT_MXFP4 &&
        (c->quant.q != MOE_QUANT_FP8 || c->quant.brows < 1 || c->quant.bcols < 32 ||
         c->quant.bcols % 32 != 0 || c->quant.brows > 4096 || c->quant.bcols > 4096))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct moe_model_config c;
    struct moe_error err;

    if (moe_config_parse((const char *)data, size, "config.json", &c, &err) == 0) {
        check(&c);
        moe_config_clear(&c);
    } else if (err.code >= 0 || !err.msg[0]) {
        abort();
    }
    return 0;
}
