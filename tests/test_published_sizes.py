"""Every registered family at its published size (issue 14, item 4), without a download or a weight in memory.

Each family's `published_config()` is its hub checkpoint's config.json at full size and `published_processor()`
its real image settings over the offline test tokenizer. The model is built on the meta device (shapes, no
storage), and the checks are: the family is detected from the config and from the model, its decoder has the
published layer count, the processor puts as many vision tokens in `input_ids` as the model's own vision path
turns a 336-448 px image into, and `tuner.models.cost` gives the hand-computed FLOPs and KV bytes at full size.
A family without `published_config` fails here: every family must have one.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

import tiny_vlms
from tuner.models.cost import TextDims, kv_cache_bytes, prefill_flops
from tuner.models.families import (
    Family,
    adapter_for,
    detect_family,
    family_for_model_type,
    get_family,
    registered_families,
)

FAMILIES = registered_families()
# Test images, (width, height): the 448x336 landscape and a portrait one in the 336-448 px range.
IMAGE_SIZES = ((448, 336), (364, 420))
# Cost check: a prompt of N tokens, pruned at layer K to P kept tokens.
N_TOKENS, K, KEPT = 1000, 2, 400
_TEXT_KEYS = {"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"}

# Published facts of the bundled checkpoints, written out by hand (a family without a row gets the generic
# checks only; add one when the numbers are known).
#   dims: the text model's sizes; kv_per_token: fp16 K+V bytes per token over all layers
#   (2 * layers * kv_heads * head_dim * 2 bytes); tokens: vision tokens per image in IMAGE_SIZES.
KNOWN = {
    "llava": {  # Vicuna-7B: 32 x (32 heads of 128); one 336 px crop -> 24x24 patches, whatever the image
        "dims": TextDims(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, head_dim=128, vocab=32064),
        "kv_per_token": 2 * 32 * 32 * 128 * 2, "vision_ids": (32000,), "tokens": (576, 576)},
    "llava_next": {  # Mistral-7B: 8 KV heads. A 336 px base crop (576) + the best-fitting tile grid, unpadded
        # to the image's aspect, plus a newline per row. 448x336 -> pinpoint [336, 672]: 24x48 features, cut
        # to 24x32 (32 = int(448 * 24 / 336), 8 padding each side): 576 + 24 * 33 = 1368. 364x420 -> [672, 672]:
        # 48x48, cut to 48x42 (int(364 * 48 / 420) = 41 leaves 3 padding each side): 576 + 48 * 43 = 2640.
        "dims": TextDims(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=32064),
        "kv_per_token": 2 * 32 * 8 * 128 * 2, "vision_ids": (32000,), "tokens": (1368, 2640)},
    "qwen2_vl": {  # Qwen2-7B: 28 heads over 4 KV heads. One token per 28x28 px: 16*12 = 192, 13*15 = 195
        "dims": TextDims(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, head_dim=128, vocab=152064),
        "kv_per_token": 2 * 28 * 4 * 128 * 2, "vision_ids": (151655, 151656), "tokens": (192, 195)},
    "qwen2_5_vl": {
        "dims": TextDims(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, head_dim=128, vocab=152064),
        "kv_per_token": 2 * 28 * 4 * 128 * 2, "vision_ids": (151655, 151656), "tokens": (192, 195)},
}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_every_family_has_published_sizes(family: Family) -> None:
    """Not a skip: a family without its published config and processor is not done."""
    try:
        config, processor = family.published_config(), family.published_processor(tiny_vlms._make_tokenizer())
    except NotImplementedError as error:
        pytest.fail(f"{error}: implement published_config() and published_processor() for {family.hub_id}")
    assert config.model_type in family.model_types and processor.image_processor is not None


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda family: family.name)
def published(request: pytest.FixtureRequest) -> tuple[Family, transformers.PretrainedConfig, torch.nn.Module]:
    """(family, published config, its model built on the meta device); fails for a family without the config."""
    family = request.param
    config = family.published_config()
    cls = getattr(transformers, family.class_names[0])
    with torch.device("meta"):  # parameters and buffers without storage: a 7B model builds in ~0.1 s
        model = cls(config)
    return family, config, model.eval()


def test_family_detected_from_config_and_model(published) -> None:
    family, config, model = published
    assert family_for_model_type(config.model_type) is family
    assert detect_family(model) == family.name
    adapter = adapter_for(model)
    assert len(adapter.layers) == config.get_text_config().num_hidden_layers
    assert adapter.vision_token_ids == family.vision_token_ids(config)
    image_ids = [getattr(config, name) for name in ("image_token_id", "image_token_index")
                 if isinstance(getattr(config, name, None), int)]
    assert image_ids and set(image_ids) <= set(adapter.vision_token_ids)
    if known := KNOWN.get(family.name):
        assert len(adapter.layers) == known["dims"].layers
        assert adapter.vision_token_ids == known["vision_ids"]


class _MetaFollows(TorchFunctionMode):
    """Where an op mixes meta and real tensors, the real ones join the meta device.

    The vision paths keep their bookkeeping real (Qwen's `image_grid_thw`, LLaVA-NeXT's `image_sizes` are read
    with `.tolist()`) and mix it into the computation (rotary positions from the grid times the meta
    `inv_freq`), which torch refuses across devices. Moving such a tensor to meta keeps every shape; an op that
    needs a value computed on meta still fails loudly, so nothing is guessed.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [leaf for leaf in tree_flatten((args, kwargs))[0] if isinstance(leaf, torch.Tensor)]
        if any(t.is_meta for t in tensors) and not all(t.is_meta for t in tensors):
            args, kwargs = tree_map(lambda leaf: leaf.to("meta") if isinstance(leaf, torch.Tensor) else leaf,
                                    (args, kwargs))
        return func(*args, **kwargs)


def _model_vision_tokens(model: torch.nn.Module, image_inputs: dict[str, torch.Tensor]) -> int:
    """Feature vectors the model's own `get_image_features` (tower + projector) makes, on meta pixel values."""
    inputs = {key: value.to("meta") if value.is_floating_point() else value for key, value in image_inputs.items()}
    with torch.no_grad(), _MetaFollows():
        out = model.get_image_features(**inputs)
    features = getattr(out, "pooler_output", out)
    features = [features] if isinstance(features, torch.Tensor) else list(features)
    assert all(f.is_meta for f in features), "the vision path ran on real tensors"
    return sum(f.numel() // f.shape[-1] for f in features)  # [..., hidden] per image or for all images


def _image_token_id(processor) -> int:
    """The id the processor repeats once per vision feature (a tokenizer naming its image token wins, as Gemma 3's
    processors read it there; others keep it on the processor)."""
    token_id = getattr(processor.tokenizer, "image_token_id", None)
    return token_id if isinstance(token_id, int) else processor.image_token_id


@pytest.mark.parametrize("size", IMAGE_SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_processor_tokens_match_the_vision_path(published, size: tuple[int, int]) -> None:
    family, config, model = published
    processor = family.published_processor(tiny_vlms._make_tokenizer())
    image = tiny_vlms._make_image(*size, seed=0)
    batch = processor(images=[image], text=[family.fallback_prompt("Describe it.", 1)], return_tensors="pt")
    in_prompt = int((batch["input_ids"] == _image_token_id(processor)).sum())
    image_inputs = {key: value for key, value in batch.items() if key not in _TEXT_KEYS}
    derived = family.published_vision_tokens(config, image_inputs)
    from_model = derived if derived is not None else _model_vision_tokens(model, image_inputs)
    assert in_prompt == from_model > 0
    if known := KNOWN.get(family.name):
        assert in_prompt == known["tokens"][IMAGE_SIZES.index(size)]


def _hand_flops(dims: TextDims, windows: list[int | None], n: int, k: int, p: int) -> int:
    """Prefill FLOPs counted matmul by matmul (2 per multiply-add): layers < k over n tokens, the rest over p."""
    q, kv = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim

    def layer(tokens: int, window: int | None) -> int:
        qkvo = 2 * tokens * (dims.hidden * q + 2 * dims.hidden * kv + q * dims.hidden)
        keys_seen = sum(min(i, window or i) for i in range(1, tokens + 1))  # causal, at most `window` keys
        attention = 2 * keys_seen * q * 2  # scores q.k and the weighted sum of v
        mlp = 2 * tokens * dims.hidden * dims.intermediate * 3  # gate, up, down
        return qkvo + attention + mlp

    return sum(layer(n if i < k else p, windows[i]) for i in range(dims.layers)) + 2 * dims.hidden * dims.vocab


def test_cost_at_full_size(published) -> None:
    family, config, model = published
    text = config.get_text_config()
    dims = family.text_dims(config)
    assert (dims.hidden, dims.layers, dims.vocab) == (text.hidden_size, text.num_hidden_layers, text.vocab_size)
    assert dims.layers == len(adapter_for(model).layers)
    windows = [dims.window(i) for i in range(dims.layers)]
    per_token = 2 * dims.layers * dims.kv_heads * dims.head_dim * 2
    assert kv_cache_bytes(dims, N_TOKENS) == N_TOKENS * per_token
    assert kv_cache_bytes(dims, N_TOKENS, KEPT, layer=K) == \
        per_token // dims.layers * (K * N_TOKENS + (dims.layers - K) * KEPT)
    assert prefill_flops(dims, N_TOKENS, KEPT, layer=K) == _hand_flops(dims, windows, N_TOKENS, K, KEPT)
    assert prefill_flops(dims, N_TOKENS) == _hand_flops(dims, windows, N_TOKENS, 0, N_TOKENS)
    if known := KNOWN.get(family.name):
        assert dims == known["dims"]
        assert kv_cache_bytes(dims, 1) == known["kv_per_token"]


def test_llava_cost_in_numbers() -> None:
    """LLaVA-1.5-7B, 1000 tokens pruned to 400 at K = 2, written out: fp16 KV 2 * 1000 + 30 * 400 layer-rows of
    2 * 32 * 128 * 2 bytes; FLOPs per layer 2n(4 * 4096^2) + 2n(n+1) * 4096 + 6n * 4096 * 11008, LM head once."""
    llava = get_family("llava")
    dims = llava.text_dims(llava.published_config())
    assert kv_cache_bytes(dims, 1) == 524_288
    assert kv_cache_bytes(dims, N_TOKENS, KEPT, layer=K) == (2 * 1000 + 30 * 400) * 16_384 == 229_376_000

    def layer(n: int) -> int:
        return 2 * n * 4 * 4096**2 + 2 * n * (n + 1) * 4096 + 6 * n * 4096 * 11008

    expected = 2 * layer(1000) + 30 * layer(400) + 2 * 4096 * 32064
    assert prefill_flops(dims, N_TOKENS, KEPT, layer=K) == expected == 5_722_587_660_288
    assert prefill_flops(dims, N_TOKENS) == 32 * layer(1000) + 2 * 4096 * 32064 == 13_214_679_564_288
