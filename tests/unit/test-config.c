/*
 * Tests of config.json parsing (engine/model.c): a realistic config of each
 * family with every field checked, the defaults of optional keys, the dtype
 * keys, the dense/MoE layer rule, and a table of bad configs, each checked
 * for its error code and message.
 */
#include "model.h"
#include "tests.h"

#include <errno.h>
#include <jansson.h>

/* Configs in the shape Hugging Face writes them (trimmed). */
static const char *const base_json[MOE_ARCH_COUNT] = {
    [MOE_ARCH_MIXTRAL] = "{\"architectures\": [\"MixtralForCausalLM\"], \"model_type\": "
                         "\"mixtral\", \"hidden_size\": 4096, \"intermediate_size\": 14336, "
                         "\"num_hidden_layers\": 32, \"num_local_experts\": 8, "
                         "\"num_experts_per_tok\": 2, \"num_attention_heads\": 32, "
                         "\"rms_norm_eps\": 1e-05, \"torch_dtype\": \"bfloat16\", "
                         "\"sliding_window\": null, \"router_aux_loss_coef\": 0.02}",
    [MOE_ARCH_QWEN2_MOE] = "{\"model_type\": \"qwen2_moe\", \"hidden_size\": 2048, "
                           "\"intermediate_size\": 5632, \"moe_intermediate_size\": 1408, "
                           "\"shared_expert_intermediate_size\": 5632, \"num_experts\": 60, "
                           "\"num_experts_per_tok\": 4, \"num_hidden_layers\": 24, "
                           "\"norm_topk_prob\": false, \"decoder_sparse_step\": 1, "
                           "\"mlp_only_layers\": [], \"torch_dtype\": \"bfloat16\", "
                           "\"use_sliding_window\": false}",
    [MOE_ARCH_QWEN3_MOE] = "{\"model_type\": \"qwen3_moe\", \"hidden_size\": 2048, "
                           "\"intermediate_size\": 6144, \"moe_intermediate_size\": 768, "
                           "\"num_experts\": 128, \"num_experts_per_tok\": 8, "
                           "\"num_hidden_layers\": 48, \"norm_topk_prob\": true, "
                           "\"decoder_sparse_step\": 1, \"mlp_only_layers\": [], "
                           "\"head_dim\": 128, \"torch_dtype\": \"bfloat16\"}",
    [MOE_ARCH_OLMOE] = "{\"model_type\": \"olmoe\", \"hidden_size\": 2048, "
                       "\"intermediate_size\": 1024, \"num_experts\": 64, "
                       "\"num_experts_per_tok\": 8, \"num_hidden_layers\": 16, "
                       "\"norm_topk_prob\": false, \"clip_qkv\": null, "
                       "\"torch_dtype\": \"float32\"}",
    [MOE_ARCH_DEEPSEEK_V3] = "{\"model_type\": \"deepseek_v3\", \"hidden_size\": 7168, "
                             "\"intermediate_size\": 18432, \"moe_intermediate_size\": 2048, "
                             "\"n_routed_experts\": 256, \"n_shared_experts\": 1, "
                             "\"num_experts_per_tok\": 8, \"n_group\": 8, \"topk_group\": 4, "
                             "\"num_hidden_layers\": 61, \"first_k_dense_replace\": 3, "
                             "\"moe_layer_freq\": 1, \"norm_topk_prob\": true, "
                             "\"routed_scaling_factor\": 2.5, \"scoring_func\": \"sigmoid\", "
                             "\"topk_method\": \"noaux_tc\", \"num_nextn_predict_layers\": 1, "
                             "\"quantization_config\": {\"activation_scheme\": \"dynamic\", "
                             "\"fmt\": \"e4m3\", \"quant_method\": \"fp8\", "
                             "\"weight_block_size\": [128, 128]}, "
                             "\"torch_dtype\": \"bfloat16\"}",
    /* gpt-oss-20b's config.json as released (less its layer_types, rope
     * and token ids): no swiglu_alpha, MXFP4 experts. */
    [MOE_ARCH_GPT_OSS] = "{\"architectures\": [\"GptOssForCausalLM\"], \"model_type\": "
                         "\"gpt_oss\", \"attention_bias\": true, \"experts_per_token\": 4, "
                         "\"head_dim\": 64, \"hidden_act\": \"silu\", \"hidden_size\": 2880, "
                         "\"intermediate_size\": 2880, \"num_attention_heads\": 64, "
                         "\"num_experts_per_tok\": 4, \"num_hidden_layers\": 24, "
                         "\"num_key_value_heads\": 8, \"num_local_experts\": 32, "
                         "\"quantization_config\": {\"quant_method\": \"mxfp4\"}, "
                         "\"router_aux_loss_coef\": 0.9, \"sliding_window\": 128, "
                         "\"swiglu_limit\": 7.0, \"tie_word_embeddings\": false}",
};

static int parse(const char *json, struct moe_model_config *c, struct moe_error *err)
{
    return moe_config_parse(json, strlen(json), "config.json", c, err);
}

static void test_families(void)
{
    struct moe_model_config c;
    struct moe_error err = {0};

    ASSERT_EQ(parse(base_json[MOE_ARCH_MIXTRAL], &c, &err), 0);
    ASSERT_EQ(c.arch, MOE_ARCH_MIXTRAL);
    ASSERT_EQ(c.n_layers, 32);
    ASSERT_EQ(c.hidden, 4096);
    ASSERT_EQ(c.expert_ffn, 14336);
    ASSERT_EQ(c.dense_ffn, 0);
    ASSERT_EQ(c.n_experts, 8);
    ASSERT_EQ(c.top_k, 2);
    ASSERT_EQ(c.n_shared_experts, 0);
    ASSERT_EQ(c.shared_ffn, 0);
    ASSERT_TRUE(!c.shared_expert_gate);
    ASSERT_TRUE(c.norm_topk_prob);
    ASSERT_EQ(c.score_func, MOE_SCORE_SOFTMAX);
    ASSERT_EQ(c.n_group, 1);
    ASSERT_EQ(c.topk_group, 1);
    ASSERT_NEAR(c.routed_scaling_factor, 1.0, 0);
    ASSERT_TRUE(!c.has_score_bias);
    ASSERT_EQ(c.first_k_dense, 0);
    ASSERT_EQ(c.moe_layer_freq, 1);
    ASSERT_EQ(c.decoder_sparse_step, 1);
    ASSERT_EQ(c.n_mlp_only_layers, 0);
    ASSERT_EQ(c.dtype, MOE_DTYPE_BF16);
    for (int i = 0; i < 32; i++)
        ASSERT_TRUE(moe_config_layer_is_moe(&c, i));
    moe_config_clear(&c);

    ASSERT_EQ(parse(base_json[MOE_ARCH_QWEN2_MOE], &c, &err), 0);
    ASSERT_EQ(c.arch, MOE_ARCH_QWEN2_MOE);
    ASSERT_EQ(c.n_layers, 24);
    ASSERT_EQ(c.hidden, 2048);
    ASSERT_EQ(c.expert_ffn, 1408);
    ASSERT_EQ(c.dense_ffn, 5632);
    ASSERT_EQ(c.n_experts, 60);
    ASSERT_EQ(c.top_k, 4);
    ASSERT_EQ(c.n_shared_experts, 1);
    ASSERT_EQ(c.shared_ffn, 5632);
    ASSERT_TRUE(c.shared_expert_gate);
    ASSERT_TRUE(!c.norm_topk_prob);
    ASSERT_EQ(c.score_func, MOE_SCORE_SOFTMAX);
    ASSERT_EQ(c.n_group, 1);
    ASSERT_TRUE(!c.has_score_bias);
    ASSERT_EQ(c.dtype, MOE_DTYPE_BF16);
    moe_config_clear(&c);

    ASSERT_EQ(parse(base_json[MOE_ARCH_QWEN3_MOE], &c, &err), 0);
    ASSERT_EQ(c.arch, MOE_ARCH_QWEN3_MOE);
    ASSERT_EQ(c.n_layers, 48);
    ASSERT_EQ(c.expert_ffn, 768);
    ASSERT_EQ(c.dense_ffn, 6144);
    ASSERT_EQ(c.n_experts, 128);
    ASSERT_EQ(c.top_k, 8);
    ASSERT_EQ(c.n_shared_experts, 0);
    ASSERT_EQ(c.shared_ffn, 0);
    ASSERT_TRUE(!c.shared_expert_gate);
    ASSERT_TRUE(c.norm_topk_prob);
    moe_config_clear(&c);

    ASSERT_EQ(parse(base_json[MOE_ARCH_OLMOE], &c, &err), 0);
    ASSERT_EQ(c.arch, MOE_ARCH_OLMOE);
    ASSERT_EQ(c.n_layers, 16);
    ASSERT_EQ(c.expert_ffn, 1024);
    ASSERT_EQ(c.dense_ffn, 0);
    ASSERT_EQ(c.n_experts, 64);
    ASSERT_EQ(c.top_k, 8);
    ASSERT_TRUE(!c.norm_topk_prob);
    ASSERT_EQ(c.dtype, MOE_DTYPE_F32);
    moe_config_clear(&c);

    ASSERT_EQ(parse(base_json[MOE_ARCH_DEEPSEEK_V3], &c, &err), 0);
    ASSERT_EQ(c.arch, MOE_ARCH_DEEPSEEK_V3);
    /* its quantization_config as released */
    ASSERT_EQ(c.quant.q, MOE_QUANT_FP8);
    ASSERT_EQ(c.quant.brows, 128);
    ASSERT_EQ(c.quant.bcols, 128);
    ASSERT_EQ(c.n_layers, 61);
    ASSERT_EQ(c.hidden, 7168);
    ASSERT_EQ(c.expert_ffn, 2048);
    ASSERT_EQ(c.dense_ffn, 18432);
    ASSERT_EQ(c.n_experts, 256);
    ASSERT_EQ(c.top_k, 8);
    ASSERT_EQ(c.n_shared_experts, 1);
    ASSERT_EQ(c.shared_ffn, 2048);
    ASSERT_TRUE(!c.shared_expert_gate);
    ASSERT_TRUE(c.norm_topk_prob);
    ASSERT_EQ(c.score_func, MOE_SCORE_SIGMOID);
    ASSERT_EQ(c.n_group, 8);
    ASSERT_EQ(c.topk_group, 4);
    ASSERT_NEAR(c.routed_scaling_factor, 2.5, 0);
    ASSERT_TRUE(c.has_score_bias);
    ASSERT_EQ(c.first_k_dense, 3);
    ASSERT_EQ(c.moe_layer_freq, 1);
    ASSERT_TRUE(!moe_config_layer_is_moe(&c, 0));
    ASSERT_TRUE(!moe_config_layer_is_moe(&c, 2));
    ASSERT_TRUE(moe_config_layer_is_moe(&c, 3));
    ASSERT_TRUE(moe_config_layer_is_moe(&c, 60));
    ASSERT_TRUE(!moe_config_layer_is_moe(&c, 61));
    ASSERT_TRUE(!moe_config_layer_is_moe(&c, -1));
    moe_config_clear(&c);
    moe_config_clear(&c);
}

/* Optional keys left out take transformers' defaults. */
static void test_defaults(void)
{
    struct moe_model_config c;
    struct moe_error err = {0};

    ASSERT_EQ(parse("{\"model_type\": \"qwen2_moe\", \"hidden_size\": 64, "
                    "\"moe_intermediate_size\": 32, \"shared_expert_intermediate_size\": 0, "
                    "\"num_experts\": 8, \"num_experts_per_tok\": 2, \"num_hidden_layers\": 2}",
                    &c, &err),
              0);
    ASSERT_TRUE(!c.norm_topk_prob);
    ASSERT_EQ(c.decoder_sparse_step, 1);
    ASSERT_EQ(c.n_mlp_only_layers, 0);
    ASSERT_EQ(c.dense_ffn, 0);
    ASSERT_EQ(c.n_shared_experts, 0);
    ASSERT_EQ(c.shared_ffn, 0);
    ASSERT_TRUE(!c.shared_expert_gate);
    ASSERT_EQ(c.dtype, MOE_DTYPE_COUNT);
    moe_config_clear(&c);

    ASSERT_EQ(parse("{\"model_type\": \"olmoe\", \"hidden_size\": 64, \"intermediate_size\": 32, "
                    "\"num_experts\": 8, \"num_experts_per_tok\": 2, \"num_hidden_layers\": 2, "
                    "\"norm_topk_prob\": null}",
                    &c, &err),
              0);
    ASSERT_TRUE(!c.norm_topk_prob);
    moe_config_clear(&c);

    ASSERT_EQ(parse("{\"model_type\": \"qwen3_moe\", \"hidden_size\": 64, "
                    "\"moe_intermediate_size\": 32, \"num_experts\": 8, "
                    "\"num_experts_per_tok\": 2, \"num_hidden_layers\": 2}",
                    &c, &err),
              0);
    ASSERT_TRUE(!c.norm_topk_prob);
    moe_config_clear(&c);

    /* DeepSeek: n_group 8, topk_group 4, norm true, scaling 2.5, first 3 dense,
     * freq 1, one shared expert (n_shared_experts null: DeepseekV3Config's 1). */
    ASSERT_EQ(parse("{\"model_type\": \"deepseek_v3\", \"hidden_size\": 64, "
                    "\"intermediate_size\": 128, \"moe_intermediate_size\": 32, "
                    "\"n_routed_experts\": 64, \"num_experts_per_tok\": 8, "
                    "\"num_hidden_layers\": 5, \"n_shared_experts\": null}",
                    &c, &err),
              0);
    ASSERT_EQ(c.n_group, 8);
    ASSERT_EQ(c.topk_group, 4);
    ASSERT_TRUE(c.norm_topk_prob);
    ASSERT_NEAR(c.routed_scaling_factor, 2.5, 0);
    ASSERT_EQ(c.first_k_dense, 3);
    ASSERT_EQ(c.moe_layer_freq, 1);
    ASSERT_EQ(c.n_shared_experts, 1);
    ASSERT_EQ(c.shared_ffn, 32);
    ASSERT_EQ(c.score_func, MOE_SCORE_SIGMOID);
    ASSERT_TRUE(c.has_score_bias);
    moe_config_clear(&c);

    /* Qwen3-Next: transformers' Qwen3NextConfig defaults: renormalised, a
     * shared expert of 512 with its gate, dense intermediate_size 5632. */
    ASSERT_EQ(parse("{\"model_type\": \"qwen3_next\", \"hidden_size\": 64, "
                    "\"moe_intermediate_size\": 32, \"num_experts\": 64, "
                    "\"num_experts_per_tok\": 10, \"num_hidden_layers\": 4, "
                    "\"decoder_sparse_step\": 2}",
                    &c, &err),
              0);
    ASSERT_EQ(c.arch, MOE_ARCH_QWEN3_NEXT);
    ASSERT_TRUE(c.norm_topk_prob);
    ASSERT_EQ(c.n_shared_experts, 1);
    ASSERT_EQ(c.shared_ffn, 512);
    ASSERT_TRUE(c.shared_expert_gate);
    ASSERT_EQ(c.dense_ffn, 5632);
    ASSERT_STREQ(c.layer_prefix, "model.layers.");
    for (int i = 0; i < 4; i++)
        ASSERT_EQ(moe_config_layer_is_moe(&c, i), i % 2 == 1);
    moe_config_clear(&c);

    /* Qwen3.5-MoE, text-only (transformers' qwen3_5_moe_text): always
     * renormalised (norm_topk_prob is not its key), every layer MoE. */
    ASSERT_EQ(parse("{\"model_type\": \"qwen3_5_moe_text\", \"hidden_size\": 64, "
                    "\"moe_intermediate_size\": 32, \"num_experts\": 64, "
                    "\"num_experts_per_tok\": 8, \"num_hidden_layers\": 4, "
                    "\"norm_topk_prob\": false, \"decoder_sparse_step\": 2, "
                    "\"mlp_only_layers\": [0], \"dtype\": \"bfloat16\"}",
                    &c, &err),
              0);
    ASSERT_EQ(c.arch, MOE_ARCH_QWEN3_5_MOE);
    ASSERT_TRUE(c.norm_topk_prob);
    ASSERT_EQ(c.shared_ffn, 512);
    ASSERT_EQ(c.dtype, MOE_DTYPE_BF16);
    ASSERT_STREQ(c.layer_prefix, "model.layers.");
    for (int i = 0; i < 4; i++)
        ASSERT_TRUE(moe_config_layer_is_moe(&c, i));
    moe_config_clear(&c);

    /* Qwen3.5-MoE as released: the keys in text_config (the top's ignored),
     * the dtype at the top, the layers under model.language_model. */
    ASSERT_EQ(parse("{\"model_type\": \"qwen3_5_moe\", \"torch_dtype\": \"bfloat16\", "
                    "\"hidden_size\": 999, \"text_config\": {\"model_type\": "
                    "\"qwen3_5_moe_text\", \"hidden_size\": 64, \"moe_intermediate_size\": 32, "
                    "\"num_experts\": 64, \"num_experts_per_tok\": 8, "
                    "\"num_hidden_layers\": 4, \"shared_expert_intermediate_size\": 0}}",
                    &c, &err),
              0);
    ASSERT_EQ(c.arch, MOE_ARCH_QWEN3_5_MOE);
    ASSERT_EQ(c.hidden, 64);
    ASSERT_EQ(c.n_shared_experts, 0);
    ASSERT_TRUE(!c.shared_expert_gate);
    ASSERT_EQ(c.dtype, MOE_DTYPE_BF16);
    ASSERT_STREQ(c.layer_prefix, "model.language_model.layers.");
    moe_config_clear(&c);
    ASSERT_EQ(parse("{\"model_type\": \"qwen3_5_moe\", \"text_config\": [1]}", &c, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "config.json: 'text_config' is an array: expected an object");
    ASSERT_EQ(
        parse("{\"model_type\": \"qwen3_5_moe\", \"text_config\": {\"hidden_size\": 4}}", &c, &err),
        -EINVAL);
    ASSERT_CONTAINS(err.msg, "config.json: text_config: 'num_hidden_layers' is missing");

    /* Llama 4 (text): top-k then sigmoid, the input scaled, one shared
     * expert as wide as a routed one; moe_layers decides over the step. */
    ASSERT_EQ(parse("{\"model_type\": \"llama4_text\", \"hidden_size\": 64, "
                    "\"intermediate_size\": 32, \"intermediate_size_mlp\": 96, "
                    "\"num_local_experts\": 16, \"num_experts_per_tok\": 1, "
                    "\"num_hidden_layers\": 4, \"interleave_moe_layer_step\": 2, "
                    "\"moe_layers\": [0, 3]}",
                    &c, &err),
              0);
    ASSERT_EQ(c.arch, MOE_ARCH_LLAMA4);
    ASSERT_EQ(c.score_func, MOE_SCORE_TOPK_SIGMOID);
    ASSERT_TRUE(c.scale_input && !c.norm_topk_prob && !c.shared_expert_gate);
    ASSERT_EQ(c.n_shared_experts, 1);
    ASSERT_EQ(c.shared_ffn, 32);
    ASSERT_EQ(c.dense_ffn, 96);
    ASSERT_STREQ(c.layer_prefix, "model.layers.");
    for (int i = 0; i < 4; i++)
        ASSERT_EQ(moe_config_layer_is_moe(&c, i), i == 0 || i == 3);
    moe_config_clear(&c);
    /* Without moe_layers: every interleave_moe_layer_step-th layer. */
    ASSERT_EQ(parse("{\"model_type\": \"llama4_text\", \"hidden_size\": 64, "
                    "\"intermediate_size\": 32, \"num_local_experts\": 16, "
                    "\"num_experts_per_tok\": 2, \"num_hidden_layers\": 4, "
                    "\"interleave_moe_layer_step\": 2}",
                    &c, &err),
              0);
    ASSERT_EQ(c.dense_ffn, 16384);
    for (int i = 0; i < 4; i++)
        ASSERT_EQ(moe_config_layer_is_moe(&c, i), i % 2 == 1);
    moe_config_clear(&c);
    /* The multimodal config: the text keys in text_config, the layers under
     * language_model.model. */
    ASSERT_EQ(parse("{\"model_type\": \"llama4\", \"torch_dtype\": \"bfloat16\", "
                    "\"text_config\": {\"model_type\": \"llama4_text\", \"hidden_size\": 64, "
                    "\"intermediate_size\": 32, \"num_local_experts\": 16, "
                    "\"num_experts_per_tok\": 1, \"num_hidden_layers\": 2}}",
                    &c, &err),
              0);
    ASSERT_EQ(c.arch, MOE_ARCH_LLAMA4);
    ASSERT_EQ(c.dtype, MOE_DTYPE_BF16);
    ASSERT_STREQ(c.layer_prefix, "language_model.model.layers.");
    ASSERT_TRUE(moe_config_layer_is_moe(&c, 0) && moe_config_layer_is_moe(&c, 1));
    moe_config_clear(&c);
    ASSERT_EQ(parse("{\"model_type\": \"llama4\"}", &c, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg,
                    "'text_config' is missing: expected an object with the text model's "
                    "keys for model_type llama4 (a text-only config says \"llama4_text\")");
    ASSERT_EQ(parse("{\"model_type\": \"llama4_text\", \"hidden_size\": 64, "
                    "\"intermediate_size\": 32, \"num_local_experts\": 16, "
                    "\"num_experts_per_tok\": 1, \"num_hidden_layers\": 2, \"moe_layers\": []}",
                    &c, &err),
              -EINVAL);
    ASSERT_CONTAINS(err.msg, "none of the 2 layers is a MoE layer (moe_layers (0 listed))");
    ASSERT_EQ(parse("{\"model_type\": \"llama4_text\", \"hidden_size\": 64, "
                    "\"intermediate_size\": 32, \"num_local_experts\": 16, "
                    "\"num_experts_per_tok\": 1, \"num_hidden_layers\": 2, \"moe_layers\": [2]}",
                    &c, &err),
              -EINVAL);
    ASSERT_CONTAINS(err.msg, "'moe_layers' entry 0 is 2: expected a layer from 0 to "
                             "num_hidden_layers - 1 (1)");
}

/* gpt-oss: mixtral's routing plus a router bias, experts with biases and
 * the clamped SwiGLU; GptOssConfig's defaults (swiglu_alpha 1.702,
 * swiglu_limit 7.0); num_experts is its alias of num_local_experts. */
static void test_gpt_oss(void)
{
    struct moe_model_config c;
    struct moe_error err = {0};

    ASSERT_EQ(parse(base_json[MOE_ARCH_GPT_OSS], &c, &err), 0);
    ASSERT_EQ(c.arch, MOE_ARCH_GPT_OSS);
    ASSERT_EQ(c.n_layers, 24);
    ASSERT_EQ(c.hidden, 2880);
    ASSERT_EQ(c.expert_ffn, 2880);
    ASSERT_EQ(c.n_experts, 32);
    ASSERT_EQ(c.top_k, 4);
    ASSERT_EQ(c.n_shared_experts, 0);
    ASSERT_EQ(c.score_func, MOE_SCORE_SOFTMAX);
    ASSERT_TRUE(c.norm_topk_prob && c.router_bias && c.expert_bias && !c.scale_input);
    ASSERT_EQ(c.act, MOE_ACT_SWIGLU_CLAMP);
    ASSERT_NEAR(c.swiglu_alpha, 1.702, 1e-6);
    ASSERT_NEAR(c.swiglu_limit, 7.0, 0);
    /* MXFP4 experts as released: e2m1, an e8m0 scale per 32 */
    ASSERT_EQ(c.quant.q, MOE_QUANT_MXFP4);
    ASSERT_EQ(c.quant.brows, 1);
    ASSERT_EQ(c.quant.bcols, 32);
    ASSERT_EQ(c.dtype, MOE_DTYPE_COUNT);
    ASSERT_STREQ(c.layer_prefix, "model.layers.");
    for (int i = 0; i < 24; i++)
        ASSERT_TRUE(moe_config_layer_is_moe(&c, i));
    moe_config_clear(&c);
    /* As transformers 5 saves it: both SwiGLU keys, num_experts too. */
    ASSERT_EQ(parse("{\"model_type\": \"gpt_oss\", \"hidden_size\": 64, "
                    "\"intermediate_size\": 32, \"num_local_experts\": 8, \"num_experts\": 8, "
                    "\"num_experts_per_tok\": 2, \"num_hidden_layers\": 2, "
                    "\"swiglu_alpha\": 1.5, \"swiglu_limit\": 3, \"dtype\": \"float32\"}",
                    &c, &err),
              0);
    ASSERT_NEAR(c.swiglu_alpha, 1.5, 0);
    ASSERT_NEAR(c.swiglu_limit, 3.0, 0);
    ASSERT_EQ(c.dtype, MOE_DTYPE_F32);
    moe_config_clear(&c);
    /* Other families keep silu and no biases. */
    ASSERT_EQ(parse(base_json[MOE_ARCH_MIXTRAL], &c, &err), 0);
    ASSERT_TRUE(!c.router_bias && !c.expert_bias && c.act == MOE_ACT_SILU);
    moe_config_clear(&c);
}

static void test_dtype_keys(void)
{
    static const struct {
        const char *keys;
        int r;
        enum moe_dtype dtype;
        const char *needle;
    } cases[] = {
        {"", 0, MOE_DTYPE_COUNT, NULL},
        {", \"torch_dtype\": \"float16\"", 0, MOE_DTYPE_F16, NULL},
        {", \"dtype\": \"float32\"", 0, MOE_DTYPE_F32, NULL},
        {", \"dtype\": \"bfloat16\", \"torch_dtype\": \"bfloat16\"", 0, MOE_DTYPE_BF16, NULL},
        {", \"torch_dtype\": null", 0, MOE_DTYPE_COUNT, NULL},
        {", \"torch_dtype\": \"float64\"", -EINVAL, 0,
         "config.json: 'torch_dtype' is \"float64\": unsupported; expected \"bfloat16\", "
         "\"float16\" or \"float32\""},
        {", \"dtype\": \"bf16\"", -EINVAL, 0, "'dtype' is \"bf16\": unsupported"},
        {", \"torch_dtype\": 16", -EINVAL, 0,
         "'torch_dtype' is 16 (an integer): expected a string"},
        {", \"torch_dtype\": \"bfloat16\", \"dtype\": \"float16\"", -EINVAL, 0,
         "'torch_dtype' is \"bfloat16\" but 'dtype' is \"float16\""},
    };

    for (size_t i = 0; i < MOE_ARRAY_SIZE(cases); i++) {
        struct moe_model_config c;
        struct moe_error err = {0};
        char *json;
        int r;

        if (asprintf(&json,
                     "{\"model_type\": \"mixtral\", \"hidden_size\": 64, "
                     "\"intermediate_size\": 32, \"num_local_experts\": 4, "
                     "\"num_experts_per_tok\": 2, \"num_hidden_layers\": 2%s}",
                     cases[i].keys) < 0)
            FAIL("asprintf");
        r = parse(json, &c, &err);
        if (r != cases[i].r)
            FAIL("dtype case %zu: %d != %d (%s)", i, r, cases[i].r, err.msg);
        if (r == 0) {
            ASSERT_EQ(c.dtype, cases[i].dtype);
            moe_config_clear(&c);
        } else {
            ASSERT_CONTAINS(err.msg, cases[i].needle);
        }
        free(json);
    }
}

static void test_layer_rule(void)
{
    struct moe_model_config c;
    struct moe_error err = {0};
    static const bool qwen_moe[8] = {false, false, false, true, false, false, false, true};
    static const bool ds_moe[8] = {false, false, true, false, true, false, true, false};

    /* Qwen: every 2nd layer ((i + 1) % 2 == 0), but not layer 1 or 5. */
    ASSERT_EQ(parse("{\"model_type\": \"qwen3_moe\", \"hidden_size\": 64, "
                    "\"moe_intermediate_size\": 32, \"num_experts\": 8, "
                    "\"num_experts_per_tok\": 2, \"num_hidden_layers\": 8, "
                    "\"decoder_sparse_step\": 2, \"mlp_only_layers\": [1, 5]}",
                    &c, &err),
              0);
    ASSERT_EQ(c.n_mlp_only_layers, 2);
    ASSERT_EQ(c.mlp_only_layers[0], 1);
    ASSERT_EQ(c.mlp_only_layers[1], 5);
    for (int i = 0; i < 8; i++)
        if (moe_config_layer_is_moe(&c, i) != qwen_moe[i])
            FAIL("qwen layer %d: is_moe %d", i, !qwen_moe[i]);
    ASSERT_TRUE(!moe_config_layer_is_moe(&c, 8));
    moe_config_clear(&c);
    ASSERT_EQ(c.n_mlp_only_layers, 0);
    ASSERT_TRUE(!c.mlp_only_layers);

    /* DeepSeek: first 2 dense, then every 2nd. */
    ASSERT_EQ(parse("{\"model_type\": \"deepseek_v3\", \"hidden_size\": 64, "
                    "\"intermediate_size\": 128, \"moe_intermediate_size\": 32, "
                    "\"n_routed_experts\": 8, \"num_experts_per_tok\": 2, \"n_group\": 4, "
                    "\"topk_group\": 2, \"num_hidden_layers\": 8, "
                    "\"first_k_dense_replace\": 2, \"moe_layer_freq\": 2}",
                    &c, &err),
              0);
    for (int i = 0; i < 8; i++)
        if (moe_config_layer_is_moe(&c, i) != ds_moe[i])
            FAIL("deepseek layer %d: is_moe %d", i, !ds_moe[i]);
    moe_config_clear(&c);
}

/*
 * The expert count under the other name transformers gives it (the config
 * class's attribute_map): transformers 5 saves Qwen3-MoE's as
 * num_local_experts, and accepts either name for each family.
 */
static void test_expert_count_alias(void)
{
    static const struct {
        const char *json;
        int n_experts;
    } ok[] = {
        /* As transformers 5.25 Qwen3MoeConfig.save_pretrained writes it. */
        {"{\"model_type\": \"qwen3_moe\", \"hidden_size\": 128, \"moe_intermediate_size\": 64, "
         "\"num_local_experts\": 16, \"num_experts_per_tok\": 4, \"num_hidden_layers\": 4, "
         "\"mlp_only_layers\": [2], \"dtype\": \"float32\"}",
         16},
        {"{\"model_type\": \"qwen3_moe\", \"hidden_size\": 128, \"moe_intermediate_size\": 64, "
         "\"num_local_experts\": 16, \"num_experts\": 16, \"num_experts_per_tok\": 4, "
         "\"num_hidden_layers\": 4}",
         16},
        {"{\"model_type\": \"mixtral\", \"hidden_size\": 64, \"intermediate_size\": 32, "
         "\"num_experts\": 4, \"num_experts_per_tok\": 2, \"num_hidden_layers\": 2}",
         4},
        {"{\"model_type\": \"olmoe\", \"hidden_size\": 64, \"intermediate_size\": 32, "
         "\"num_local_experts\": 6, \"num_experts_per_tok\": 2, \"num_hidden_layers\": 2}",
         6},
        {"{\"model_type\": \"deepseek_v3\", \"hidden_size\": 64, \"intermediate_size\": 128, "
         "\"moe_intermediate_size\": 32, \"num_local_experts\": 16, \"num_experts_per_tok\": 4, "
         "\"n_group\": 4, \"topk_group\": 2, \"num_hidden_layers\": 5}",
         16},
    };
    struct moe_model_config c;
    struct moe_error err = {0};

    for (size_t i = 0; i < MOE_ARRAY_SIZE(ok); i++) {
        if (parse(ok[i].json, &c, &err) != 0)
            FAIL("config %zu: %s", i, err.msg);
        ASSERT_EQ(c.n_experts, ok[i].n_experts);
        moe_config_clear(&c);
    }
    /* qwen2_moe has no alias: num_local_experts alone is not its count. */
    ASSERT_EQ(parse("{\"model_type\": \"qwen2_moe\", \"hidden_size\": 64, "
                    "\"moe_intermediate_size\": 32, \"shared_expert_intermediate_size\": 0, "
                    "\"num_local_experts\": 8, \"num_experts_per_tok\": 2, "
                    "\"num_hidden_layers\": 2}",
                    &c, &err),
              -EINVAL);
    ASSERT_CONTAINS(err.msg, "'num_experts' is missing");
    /* The alias's range is checked, and a message later names the key read. */
    ASSERT_EQ(parse("{\"model_type\": \"deepseek_v3\", \"hidden_size\": 64, "
                    "\"intermediate_size\": 128, \"moe_intermediate_size\": 32, "
                    "\"num_local_experts\": 6, \"num_experts_per_tok\": 4, \"n_group\": 4, "
                    "\"topk_group\": 2, \"num_hidden_layers\": 5}",
                    &c, &err),
              -EINVAL);
    ASSERT_CONTAINS(err.msg, "'n_group' is 4: expected a divisor of num_local_experts (6)");
}

static void test_arch_names(void)
{
    enum moe_arch a;

    for (int i = 0; i < MOE_ARCH_COUNT; i++) {
        ASSERT_EQ(moe_arch_parse(moe_arch_name((enum moe_arch)i), &a), 0);
        ASSERT_EQ(a, i);
    }
    ASSERT_STREQ(moe_arch_name(MOE_ARCH_QWEN2_MOE), "qwen2_moe");
    ASSERT_EQ(moe_arch_parse("qwen3_5_moe_text", &a), 0);
    ASSERT_EQ(a, MOE_ARCH_QWEN3_5_MOE);
    ASSERT_EQ(moe_arch_parse("llama", &a), -EINVAL);
    ASSERT_EQ(moe_arch_parse("Mixtral", &a), -EINVAL);
    ASSERT_STREQ(moe_arch_name(MOE_ARCH_COUNT), "?");
}

/* A base config of arch with key set to value (JSON text), or deleted when
 * value is NULL; then the expected code and a part of the message. */
struct bad_config {
    enum moe_arch arch;
    const char *key;
    const char *value;
    const char *needle;
};

static const struct bad_config bad_configs[] = {
    /* model_type */
    {MOE_ARCH_MIXTRAL, "model_type", "\"llama\"",
     "config.json: 'model_type' is \"llama\": unsupported; expected one of mixtral, qwen2_moe, "
     "qwen3_moe, olmoe, deepseek_v3"},
    {MOE_ARCH_MIXTRAL, "model_type", NULL, "'model_type' is missing: expected one of mixtral"},
    {MOE_ARCH_MIXTRAL, "model_type", "3", "'model_type' is 3: expected one of"},
    {MOE_ARCH_QWEN2_MOE, "model_type", "\"jamba\"", "\"jamba\": unsupported"},
    /* mixtral */
    {MOE_ARCH_MIXTRAL, "num_experts_per_tok", "9",
     "config.json: 'num_experts_per_tok' is 9: expected 1 to num_local_experts (8)"},
    {MOE_ARCH_MIXTRAL, "num_experts_per_tok", "0", "'num_experts_per_tok' is 0: expected 1 to"},
    {MOE_ARCH_MIXTRAL, "num_local_experts", NULL,
     "'num_local_experts' (or 'num_experts') is missing: expected an integer from 1 to 4096 "
     "(required for mixtral)"},
    {MOE_ARCH_MIXTRAL, "num_experts", "4",
     "config.json: 'num_local_experts' is 8 but 'num_experts' is 4: expected one expert count"},
    {MOE_ARCH_MIXTRAL, "num_experts", "0", "'num_experts' is 0: expected 1 to 4096"},
    {MOE_ARCH_MIXTRAL, "num_local_experts", "5000",
     "'num_local_experts' is 5000: expected 1 to "
     "4096"},
    {MOE_ARCH_MIXTRAL, "intermediate_size", NULL, "'intermediate_size' is missing"},
    {MOE_ARCH_MIXTRAL, "intermediate_size", "\"14336\"",
     "'intermediate_size' is \"14336\" (a string): expected an integer from 1 to 262144"},
    {MOE_ARCH_MIXTRAL, "intermediate_size", "14336.5",
     "'intermediate_size' is 14336.5 (a real "
     "number)"},
    {MOE_ARCH_MIXTRAL, "hidden_size", "0", "'hidden_size' is 0: expected 1 to 65536"},
    {MOE_ARCH_MIXTRAL, "hidden_size", "null", "'hidden_size' is null (null): expected an integer"},
    {MOE_ARCH_MIXTRAL, "hidden_size", "99999999999999", "'hidden_size' is 99999999999999"},
    {MOE_ARCH_MIXTRAL, "num_hidden_layers", "2000",
     "'num_hidden_layers' is 2000: expected 1 to "
     "1024"},
    {MOE_ARCH_MIXTRAL, "num_hidden_layers", "-1", "'num_hidden_layers' is -1"},
    /* qwen2_moe */
    {MOE_ARCH_QWEN2_MOE, "num_experts", NULL, "'num_experts' is missing"},
    {MOE_ARCH_QWEN2_MOE, "num_experts_per_tok", "61",
     "'num_experts_per_tok' is 61: expected 1 to num_experts (60)"},
    {MOE_ARCH_QWEN2_MOE, "moe_intermediate_size", NULL, "'moe_intermediate_size' is missing"},
    {MOE_ARCH_QWEN2_MOE, "shared_expert_intermediate_size", NULL,
     "'shared_expert_intermediate_size' is missing"},
    {MOE_ARCH_QWEN2_MOE, "shared_expert_intermediate_size", "-5",
     "'shared_expert_intermediate_size' is -5: expected 0 to 262144"},
    {MOE_ARCH_QWEN2_MOE, "norm_topk_prob", "\"yes\"",
     "'norm_topk_prob' is \"yes\" (a string): expected true or false"},
    {MOE_ARCH_QWEN2_MOE, "decoder_sparse_step", "0", "'decoder_sparse_step' is 0: expected 1 to"},
    {MOE_ARCH_QWEN2_MOE, "decoder_sparse_step", "30",
     "none of the 24 layers is a MoE layer (mlp_only_layers (0 listed), decoder_sparse_step 30)"},
    {MOE_ARCH_QWEN2_MOE, "mlp_only_layers", "3",
     "'mlp_only_layers' is 3 (an integer): expected "
     "an array"},
    {MOE_ARCH_QWEN2_MOE, "mlp_only_layers", "[1, 24]",
     "'mlp_only_layers' entry 1 is 24: expected a layer from 0 to num_hidden_layers - 1 (23)"},
    {MOE_ARCH_QWEN2_MOE, "mlp_only_layers", "[\"1\"]", "'mlp_only_layers' entry 0 is \"1\""},
    {MOE_ARCH_QWEN2_MOE, "intermediate_size", "-1", "'intermediate_size' is -1"},
    /* qwen3_moe */
    {MOE_ARCH_QWEN3_MOE, "num_experts_per_tok", "129",
     "'num_experts_per_tok' is 129: expected 1 to the supported maximum (64)"},
    {MOE_ARCH_QWEN3_MOE, "num_experts", "0", "'num_experts' is 0"},
    {MOE_ARCH_QWEN3_MOE, "mlp_only_layers",
     "[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,"
     "33,34,35,36,37,38,39,40,41,42,43,44,45,46,47]",
     "none of the 48 layers is a MoE layer"},
    /* olmoe */
    {MOE_ARCH_OLMOE, "num_experts", "[64]", "'num_experts' is [64] (an array)"},
    {MOE_ARCH_OLMOE, "intermediate_size", NULL,
     "'intermediate_size' is missing: expected an "
     "integer from 1 to 262144 (required for olmoe)"},
    {MOE_ARCH_OLMOE, "norm_topk_prob", "1", "'norm_topk_prob' is 1 (an integer)"},
    /* deepseek_v3 */
    {MOE_ARCH_DEEPSEEK_V3, "scoring_func", "\"softmax\"",
     "'scoring_func' is \"softmax\": unsupported; expected \"sigmoid\""},
    {MOE_ARCH_DEEPSEEK_V3, "topk_method", "\"greedy\"",
     "'topk_method' is \"greedy\": unsupported; expected \"noaux_tc\""},
    {MOE_ARCH_DEEPSEEK_V3, "n_routed_experts", NULL,
     "'n_routed_experts' (or 'num_local_experts') is missing"},
    {MOE_ARCH_DEEPSEEK_V3, "intermediate_size", NULL, "'intermediate_size' is missing"},
    {MOE_ARCH_DEEPSEEK_V3, "moe_intermediate_size", "0", "'moe_intermediate_size' is 0"},
    {MOE_ARCH_DEEPSEEK_V3, "n_group", "7",
     "'n_group' is 7: expected a divisor of "
     "n_routed_experts (256)"},
    {MOE_ARCH_DEEPSEEK_V3, "n_group", "256", "'n_group' is 256: groups of 1 expert"},
    {MOE_ARCH_DEEPSEEK_V3, "n_group", "0", "'n_group' is 0: expected 1 to n_routed_experts"},
    {MOE_ARCH_DEEPSEEK_V3, "topk_group", "9", "'topk_group' is 9: expected 1 to n_group (8)"},
    {MOE_ARCH_DEEPSEEK_V3, "topk_group", "0", "'topk_group' is 0"},
    {MOE_ARCH_DEEPSEEK_V3, "n_group", "1", "'topk_group' is 4: expected 1 to n_group (1)"},
    {MOE_ARCH_DEEPSEEK_V3, "routed_scaling_factor", "-1",
     "'routed_scaling_factor' is -1: expected a number > 0"},
    {MOE_ARCH_DEEPSEEK_V3, "routed_scaling_factor", "\"2.5\"",
     "'routed_scaling_factor' is \"2.5\" (a string)"},
    {MOE_ARCH_DEEPSEEK_V3, "n_shared_experts", "-1", "'n_shared_experts' is -1"},
    {MOE_ARCH_DEEPSEEK_V3, "n_shared_experts", "200",
     "'n_shared_experts' is 200: expected 0 to 262144 / moe_intermediate_size (128)"},
    {MOE_ARCH_DEEPSEEK_V3, "moe_layer_freq", "0", "'moe_layer_freq' is 0"},
    {MOE_ARCH_DEEPSEEK_V3, "first_k_dense_replace", "61",
     "none of the 61 layers is a MoE layer (first_k_dense_replace 61, moe_layer_freq 1)"},
    {MOE_ARCH_DEEPSEEK_V3, "first_k_dense_replace", "-3", "'first_k_dense_replace' is -3"},
    /* gpt_oss */
    {MOE_ARCH_GPT_OSS, "swiglu_limit", "0", "'swiglu_limit' is 0: expected a number > 0"},
    {MOE_ARCH_GPT_OSS, "swiglu_limit", "\"7\"", "'swiglu_limit' is \"7\" (a string)"},
    {MOE_ARCH_GPT_OSS, "swiglu_alpha", "-1.702", "'swiglu_alpha' is -1.702: expected a number > 0"},
    {MOE_ARCH_GPT_OSS, "swiglu_alpha", "1e30",
     "'swiglu_alpha' is 1e30: expected a number > 0 and at most 1e6"},
    {MOE_ARCH_GPT_OSS, "num_local_experts", NULL,
     "'num_local_experts' (or 'num_experts') is missing"},
    {MOE_ARCH_GPT_OSS, "num_experts", "16",
     "'num_local_experts' is 32 but 'num_experts' is 16: expected one expert count"},
    {MOE_ARCH_GPT_OSS, "intermediate_size", NULL,
     "'intermediate_size' is missing: expected an integer from 1 to 262144 (required for "
     "gpt_oss)"},
    {MOE_ARCH_GPT_OSS, "num_experts_per_tok", "33",
     "'num_experts_per_tok' is 33: expected 1 to num_local_experts (32)"},
};

static void test_bad_configs(void)
{
    for (size_t i = 0; i < MOE_ARRAY_SIZE(bad_configs); i++) {
        const struct bad_config *b = &bad_configs[i];
        struct moe_model_config c = {.n_layers = -7};
        struct moe_error err = {0};
        json_error_t jerr;
        json_t *root = json_loads(base_json[b->arch], 0, &jerr);
        char *text;
        int r;

        if (!root)
            FAIL("base config of %s: %s", moe_arch_name(b->arch), jerr.text);
        if (b->value) {
            json_t *v = json_loads(b->value, JSON_DECODE_ANY, &jerr);

            if (!v)
                FAIL("case %zu: value %s: %s", i, b->value, jerr.text);
            json_object_set_new(root, b->key, v);
        } else {
            json_object_del(root, b->key);
        }
        text = json_dumps(root, 0);
        r = parse(text, &c, &err);
        if (r != -EINVAL)
            FAIL("%s %s=%s: expected -EINVAL, got %d (%s)", moe_arch_name(b->arch), b->key,
                 b->value ? b->value : "(deleted)", r, err.msg);
        if (!strstr(err.msg, b->needle))
            FAIL("%s %s=%s: \"%s\" does not contain \"%s\"", moe_arch_name(b->arch), b->key,
                 b->value ? b->value : "(deleted)", err.msg, b->needle);
        /* *ret untouched on failure. */
        ASSERT_EQ(c.n_layers, -7);
        free(text);
        json_decref(root);
    }
}

static void test_bad_json(void)
{
    struct moe_model_config c;
    struct moe_error err;

    ASSERT_EQ(parse("{\"model_type\": ", &c, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "config.json: not valid JSON");
    ASSERT_CONTAINS(err.msg, "line 1, column");
    ASSERT_EQ(parse("{\"model_type\": \"mixtral\",\n\"model_type\": \"olmoe\"}", &c, &err),
              -EINVAL);
    ASSERT_CONTAINS(err.msg, "duplicate");
    ASSERT_CONTAINS(err.msg, "line 2");
    ASSERT_EQ(parse("[\"mixtral\"]", &c, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "config.json: is an array, expected a JSON object");
    ASSERT_EQ(moe_config_parse("", 0, "c.json", &c, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "c.json: not valid JSON");
    moe_config_clear(NULL);

    /* The file's bytes are never quoted: a config.json that is some other
     * file (a symlink to /etc/passwd) must not show what it holds in an
     * error sent to a remote caller.  Table: text, what jansson would quote. */
    {
        static const struct {
            const char *text, *secret;
        } leak[] = {
            {"root:x:0:0:root:/root:/bin/bash\n", "root"},
            {"{\"a\": 1}\nsecret-token-xyz", "secret"},
            {"{\"a\": tru3-s3cret}", "s3cret"},
            {"[1, 2, \"unterminated s3cret", "s3cret"},
            {"{\"k\": 1, \"k\": 2, \"s3cret\": 3}", "\"k\""},
        };

        for (size_t i = 0; i < MOE_ARRAY_SIZE(leak); i++) {
            ASSERT_EQ(
                moe_config_parse(leak[i].text, strlen(leak[i].text), "/m/config.json", &c, &err),
                -EINVAL);
            ASSERT_CONTAINS(err.msg, "/m/config.json: not valid JSON: ");
            ASSERT_CONTAINS(err.msg, "(line ");
            if (strstr(err.msg, leak[i].secret) || strstr(err.msg, " near ")) {
                fprintf(stderr, "%s:%d: case %zu: the error quotes the file: %s\n", __FILE__,
                        __LINE__, i, err.msg);
                exit(1);
            }
        }
    }

    /* DeepSeek: top_k more than the kept groups hold. */
    ASSERT_EQ(parse("{\"model_type\": \"deepseek_v3\", \"hidden_size\": 64, "
                    "\"intermediate_size\": 128, \"moe_intermediate_size\": 32, "
                    "\"n_routed_experts\": 64, \"num_experts_per_tok\": 8, \"n_group\": 16, "
                    "\"topk_group\": 1, \"num_hidden_layers\": 8}",
                    &c, &err),
              -EINVAL);
    ASSERT_CONTAINS(err.msg, "config.json: 'num_experts_per_tok' is 8: expected at most "
                             "topk_group (1) x experts per group (4) = 4");
    /* A default that clashes with what is set: n_group 8 for 4 experts. */
    ASSERT_EQ(parse("{\"model_type\": \"deepseek_v3\", \"hidden_size\": 64, "
                    "\"intermediate_size\": 128, \"moe_intermediate_size\": 32, "
                    "\"n_routed_experts\": 4, \"num_experts_per_tok\": 2, "
                    "\"num_hidden_layers\": 8}",
                    &c, &err),
              -EINVAL);
    ASSERT_CONTAINS(err.msg, "'n_group' is not set and its default 8 is not within 1 to "
                             "n_routed_experts (4): set 'n_group'");
}

int main(void)
{
    test_families();
    test_defaults();
    test_gpt_oss();
    test_dtype_keys();
    test_layer_rule();
    test_expert_count_alias();
    test_arch_names();
    test_bad_configs();
    test_bad_json();
    printf("test-config: ok\n");
    return 0;
}
