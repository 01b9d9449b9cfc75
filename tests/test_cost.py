"""Analytic FLOPs and KV-cache bytes against numbers worked out by hand for a small config."""

import pytest
import torch
from transformers import LlamaConfig

from tuner.models.cost import TextDims, kv_cache_bytes, layer_flops, prefill_flops, tokens_per_layer

# hidden 8, intermediate 16, 4 layers, 2 query heads and 1 KV head of dim 4, vocab 10
DIMS = TextDims.from_config(LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=4,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=10))


def test_dims_are_read_from_the_config():
    assert DIMS == TextDims(hidden=8, intermediate=16, layers=4, heads=2, kv_heads=1, head_dim=4, vocab=10)


def test_layer_flops_by_hand():
    # n = 3: projections 2*3*8*(8 + 4 + 4 + 8) = 1152; attention 2*2*2*4 * (3*4/2 = 6 pairs) = 192;
    # gated MLP 2*3*8*16*3 = 2304; total 3648
    assert layer_flops(DIMS, 3) == 1152 + 192 + 2304


def test_prefill_flops_split_at_k():
    # K = 1: one layer at n = 3, three at n = 2, plus the LM head 2*8*10 = 160
    # n = 2: projections 2*2*8*24 = 768, attention 32 * 3 pairs = 96, MLP 2*2*8*16*3 = 1536 -> 2400
    assert prefill_flops(DIMS, 3, kept_tokens=2, layer=1) == 3648 + 3 * 2400 + 160
    assert prefill_flops(DIMS, 3) == 4 * 3648 + 160
    assert prefill_flops(DIMS, 600, 150, layer=2) < prefill_flops(DIMS, 600)


def test_kv_cache_bytes_by_hand():
    # per token and layer: keys + values, 1 KV head of dim 4, fp16 -> 2 * 4 * 2 = 16 bytes
    assert kv_cache_bytes(DIMS, 10, kept_tokens=4, layer=1) == 16 * (1 * 10 + 3 * 4)
    assert kv_cache_bytes(DIMS, 10, dtype=torch.float32) == 32 * 4 * 10


def test_two_stage_schedule_by_hand():
    # K_0 = 1 keeps 2 of 3 tokens, K_1 = 3 keeps 1 of those: layer 0 at n = 3, layers 1-2 at n = 2, layer 3 at n = 1
    # n = 1: projections 2*1*8*24 = 384, attention 32 * 1 pair = 32, MLP 2*1*8*16*3 = 768 -> 1184
    assert tokens_per_layer(DIMS, 3, [2, 1], [1, 3]) == [3, 2, 2, 1]
    assert prefill_flops(DIMS, 3, kept_tokens=[2, 1], layer=[1, 3]) == 3648 + 2 * 2400 + 1184 + 160
    assert prefill_flops(DIMS, 3, kept_tokens=[2], layer=[1]) == prefill_flops(DIMS, 3, kept_tokens=2, layer=1)
    # KV: 10 tokens in layer 0, 4 in layers 1-2, 2 in layer 3; 16 bytes per token and layer
    assert kv_cache_bytes(DIMS, 10, kept_tokens=(4, 2), layer=(1, 3)) == 16 * (10 + 4 + 4 + 2)


@pytest.mark.parametrize("kwargs, match", [(dict(kept_tokens=[4, 5], layer=[1, 2]), "each stage keeps at most"),
                                           (dict(kept_tokens=[4, 2], layer=[2, 2]), "strictly increasing"),
                                           (dict(kept_tokens=[4, 2], layer=[1]), "one kept count per stage")])
def test_bad_schedules_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kv_cache_bytes(DIMS, 10, **kwargs)


@pytest.mark.parametrize("kwargs, match", [(dict(kept_tokens=11), "kept_tokens"), (dict(layer=5), "layer")])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prefill_flops(DIMS, 10, **kwargs)


def test_matmul_flops_equal_twice_the_weights_of_a_real_layer():
    """Projections + MLP are 2 FLOPs per weight per token: a real Llama layer's Linear weights agree."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=10)
    dims = TextDims.from_config(config)
    weights = sum(m.weight.numel() for m in LlamaDecoderLayer(config, 0).modules()
                  if isinstance(m, torch.nn.Linear))
    n = 5
    attention = 2 * 2 * dims.heads * dims.head_dim * (n * (n + 1) // 2)
    assert layer_flops(dims, n) - attention == 2 * n * weights


def test_sliding_window_layers_count_the_key_pairs_transformers_masks_allow():
    """A sliding-window layer's attention FLOPs follow the query-key pairs of transformers' own sliding mask,
    and only the layers the config marks as sliding get the window."""
    from transformers import Qwen2Config

    from tuner.models.compat import build_mask

    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=10, use_sliding_window=True, sliding_window=4,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    config._attn_implementation = "eager"
    dims = TextDims.from_config(config)
    assert dims.windows == (4, None, 4)
    n = 11
    mask = build_mask("sliding_attention", config=config, inputs_embeds=torch.zeros(1, n, 32),
                      attention_mask=torch.ones(1, n, dtype=torch.long), cache=None, layer_idx=0)
    allowed = int((mask[0, 0] == 0).sum()) if mask.dtype.is_floating_point else int(mask[0, 0].sum())
    per_pair = 2 * 2 * dims.heads * dims.head_dim
    assert layer_flops(dims, n) - layer_flops(dims, n, window=4) == per_pair * (n * (n + 1) // 2 - allowed)
    assert prefill_flops(dims, n) == (2 * layer_flops(dims, n, 4) + layer_flops(dims, n) + 2 * 32 * 10)


def test_sliding_window_layers_hold_what_transformers_sliding_cache_keeps():
    """After a prefill, a sliding layer's cache holds its last W - 1 tokens: read off a real DynamicCache."""
    from transformers import DynamicCache, Qwen2Config, Qwen2Model

    from tuner.models.compat import CACHE_KWARG, cache_from_output

    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=10, use_sliding_window=True, sliding_window=4,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    dims = TextDims.from_config(config)
    n = 11
    with torch.no_grad():
        output = Qwen2Model(config).eval()(input_ids=torch.zeros(1, n, dtype=torch.long), use_cache=True,
                                           **{CACHE_KWARG: DynamicCache(config=config)})
    cache = cache_from_output(output)
    held = sum(layer.keys.shape[-2] for layer in cache.layers)
    per_token = 2 * dims.kv_heads * dims.head_dim * 2
    assert held == 3 + n + 3
    assert kv_cache_bytes(dims, n) == per_token * held
    assert kv_cache_bytes(dims, n, kept_tokens=2, layer=1) == per_token * (3 + 2 + 2)
