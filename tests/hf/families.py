"""The MoE families of the Hugging Face tier: small configurations built
from transformers' own config classes, and where their checkpoints live.

Shared by make_models.py (which writes the checkpoints with transformers'
save_pretrained) and check_layers.py (which compares their MoE layers with
moed).  Nothing here comes from a hub: every model is randomly initialised.

The shapes are small enough for the tier to run in a few minutes on two
cores, and each family sets the options its routing depends on to values
that differ from the obvious ones, so that a loader that ignores a key gets
a wrong answer instead of a lucky right one:
  - mixtral: tied word embeddings (no lm_head.weight in the file);
  - qwen2_moe: shared expert with its sigmoid gate, norm_topk_prob false,
    decoder_sparse_step 2 (layers 0 and 2 dense);
  - qwen3_moe: norm_topk_prob true, a dense layer through mlp_only_layers;
  - olmoe: norm_topk_prob true (the config's default is false);
  - deepseek_v3: first_k_dense_replace 1, n_group 4 > topk_group 2, two
    shared experts, routed_scaling_factor 2.5, norm_topk_prob false, and a
    random, non-zero e_score_correction_bias (transformers makes it zero);
  - deepseek_v2: softmax with topk_method group_limited_greedy (n_group 4 >
    topk_group 2), routed_scaling_factor 16 (as DeepSeek-V2), two shared
    experts, first_k_dense_replace 1;
  - glm4_moe: sigmoid with a random bias, n_group 4 > topk_group 2,
    routed_scaling_factor 2.5, norm_topk_prob true, one shared expert,
    first_k_dense_replace 1 (the default; transformers has no moe_layer_freq);
  - qwen3_next: norm_topk_prob false (the config's default is true), a dense
    layer through mlp_only_layers, the shared expert and its sigmoid gate,
    and the hybrid attention of the release (linear attention in three layers
    of four, run by transformers' torch fallback);
  - qwen3_5_moe: transformers' text-only class (model_type qwen3_5_moe_text),
    which always renormalises and has no dense layers, with its shared expert
    and hybrid attention;
  - llama4_text: top-2 (the releases route top-1: two slots check that each
    expert's input, not its output, is scaled by its own sigmoid), the shared
    expert, dense and MoE layers interleaved (interleave_moe_layer_step 2),
    and experts that transformers keeps fused and transposed in every layout
    (feed_forward.experts.gate_up_proj [E, H, 2F], down_proj [E, F, H]);
  - gpt_oss: top-3 (the config's default is 4), a router with a random,
    non-zero bias (transformers makes it zero), experts fused, transposed and
    interleaved in every layout (mlp.experts.gate_up_proj [E, H, 2F], gate at
    even columns, up at odd ones) with random biases, and a clamped SwiGLU
    whose swiglu_limit (1.25) and swiglu_alpha (1.5) differ from the release's
    7.0 and 1.702, so that the clamps act on a good part of the elements.

Layouts: "single" and "sharded" are save_pretrained's per-expert names
(save_original_format=True); "fused" is transformers 5's own layout
(save_original_format=False: mlp.experts.gate_up_proj and down_proj), sharded.
"""
import os

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2",
            "glm4_moe", "qwen3_next", "qwen3_5_moe", "llama4_text", "gpt_oss"]
DTYPES = ["float32", "bfloat16"]
LAYOUTS = ["single", "sharded", "fused"]

# Router weights are multiplied by this after initialisation, so that the
# top-k choice is decisive (initialised at std 0.02, logits of random
# hidden states would differ by ~0.2, and bf16 rounding would flip many).
ROUTER_SCALE = 8.0

# A shard limit that gives every model at least two shards.
MAX_SHARD_SIZE = "1MB"

COMMON = dict(vocab_size=256, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def config_kwargs(family):
    """Keyword arguments of the family's config class."""
    if family == "mixtral":
        return dict(COMMON, num_hidden_layers=3, intermediate_size=96, num_local_experts=8,
                    num_experts_per_tok=2, tie_word_embeddings=True)
    if family == "qwen2_moe":
        return dict(COMMON, num_hidden_layers=4, intermediate_size=160, moe_intermediate_size=64,
                    shared_expert_intermediate_size=96, num_experts=12, num_experts_per_tok=4,
                    norm_topk_prob=False, decoder_sparse_step=2)
    if family == "qwen3_moe":
        return dict(COMMON, num_hidden_layers=4, intermediate_size=192, moe_intermediate_size=64,
                    num_experts=16, num_experts_per_tok=4, norm_topk_prob=True,
                    mlp_only_layers=[2], head_dim=32)
    if family == "olmoe":
        return dict(COMMON, num_hidden_layers=3, intermediate_size=64, num_experts=8,
                    num_experts_per_tok=3, norm_topk_prob=True)
    if family == "deepseek_v3":
        return dict(COMMON, num_key_value_heads=4, num_hidden_layers=3, intermediate_size=192,
                    moe_intermediate_size=64, n_routed_experts=16, num_experts_per_tok=4,
                    n_group=4, topk_group=2, n_shared_experts=2, first_k_dense_replace=1,
                    routed_scaling_factor=2.5, norm_topk_prob=False, q_lora_rank=32,
                    kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
    if family == "deepseek_v2":
        return dict(COMMON, num_key_value_heads=4, num_hidden_layers=3, intermediate_size=192,
                    moe_intermediate_size=64, n_routed_experts=16, num_experts_per_tok=4,
                    topk_method="group_limited_greedy", n_group=4, topk_group=2,
                    n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=16.0,
                    norm_topk_prob=False, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16,
                    qk_nope_head_dim=16, v_head_dim=16)
    if family == "glm4_moe":
        return dict(COMMON, num_hidden_layers=3, intermediate_size=192, moe_intermediate_size=64,
                    n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                    n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                    head_dim=32)
    # Small linear-attention heads for the hybrid families.
    linear = dict(head_dim=32, linear_key_head_dim=16, linear_value_head_dim=16,
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_conv_kernel_dim=4)
    if family == "qwen3_next":
        return dict(COMMON, **linear, num_hidden_layers=4, intermediate_size=160,
                    moe_intermediate_size=32, shared_expert_intermediate_size=96, num_experts=32,
                    num_experts_per_tok=6, norm_topk_prob=False, mlp_only_layers=[1])
    if family == "qwen3_5_moe":
        return dict(COMMON, **linear, num_hidden_layers=4, moe_intermediate_size=32,
                    shared_expert_intermediate_size=96, num_experts=32, num_experts_per_tok=6)
    if family == "llama4_text":
        return dict(COMMON, num_hidden_layers=4, head_dim=32, intermediate_size=64,
                    intermediate_size_mlp=160, num_local_experts=8, num_experts_per_tok=2,
                    interleave_moe_layer_step=2)
    if family == "gpt_oss":
        return dict(COMMON, num_hidden_layers=3, head_dim=32, intermediate_size=64,
                    num_local_experts=8, num_experts_per_tok=3, swiglu_limit=1.25,
                    swiglu_alpha=1.5, sliding_window=16,
                    # YaRN as released, scaled to this context.
                    rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=2.0,
                                         beta_fast=32.0, beta_slow=1.0, truncate=False,
                                         original_max_position_embeddings=128))
    raise ValueError(family)


def config_class(family):
    import transformers
    return {
        "mixtral": transformers.MixtralConfig,
        "qwen2_moe": transformers.Qwen2MoeConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "olmoe": transformers.OlmoeConfig,
        "deepseek_v3": transformers.DeepseekV3Config,
        "deepseek_v2": transformers.DeepseekV2Config,
        "glm4_moe": transformers.Glm4MoeConfig,
        "qwen3_next": transformers.Qwen3NextConfig,
        # The text-only class; the released multimodal config (text_config,
        # model.language_model.*) is checked by the unit tests.
        "qwen3_5_moe": transformers.Qwen3_5MoeTextConfig,
        "llama4_text": transformers.Llama4TextConfig,
        "gpt_oss": transformers.GptOssConfig,
    }[family]


def checkpoints(workdir):
    """(family, dtype, layout, directory) of every checkpoint, in order."""
    return [(f, d, l, os.path.join(workdir, f"{f}-{d}-{l}"))
            for f in FAMILIES for d in DTYPES for l in LAYOUTS]


# moed's name of a family whose transformers config says another model_type.
MODEL_TYPE_FAMILY = {"qwen3_5_moe_text": "qwen3_5_moe"}


def moe_block(model, layer):
    """The sparse MoE block of decoder layer `layer`, or None when it is dense
    (a block is sparse when it has routed experts; Llama 4 calls it
    feed_forward)."""
    d = model.model.layers[layer]
    mlp = d.mlp if hasattr(d, "mlp") else d.feed_forward
    return mlp if hasattr(mlp, "experts") else None


def router(block):
    """The block's router module: gate, or Llama 4's router."""
    return block.router if hasattr(block, "router") else block.gate


def route_ids(block, t):
    """The experts transformers' block picks for t [T, H]: [T, k] int64."""
    if hasattr(block, "router") and getattr(block.router, "bias", None) is not None:
        # gpt-oss: GptOssTopKRouter returns (logits, scores, indices).
        return block.router(t)[2]
    if hasattr(block, "router"):
        # Llama 4: top-k of the logits (the scores are their sigmoid).
        _, logits = block.router(t)
        return torch_topk(logits, block.top_k)
    return block.gate(t)[2]


def torch_topk(logits, k):
    import torch
    return torch.topk(logits, k, dim=1).indices
