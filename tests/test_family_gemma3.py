"""Gemma 3: the image tokens kept by pruning still attend to each other both ways, in every layer type.

Gemma 3 builds its masks from `token_type_ids` (`create_masks_for_vision_model`): full layers
OR(causal, blockwise), sliding layers AND(sliding_window, OR(causal, blockwise)). The tiny model alternates
sliding (window 8, shorter than an image's 16 tokens) and full layers, so pruning at K = 2 meets both kinds
above K, and both kinds below K hold the whole prompt in the cache when the pruned layers' masks are built.
"""

import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import DynamicCache, StaticCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

import tiny_vlms
import tuner
from conftest import Loader
from tuner.evaluation.inputs import build_inputs
from tuner.models import load_model
from tuner.models.compat import positions_from_mask
from tuner.models.cost import TextDims, layer_flops, prefill_flops
from tuner.models.families import adapter_for, get_family
from tuner.models.prompts import build_prompt
from tuner.pruning import PruningMethod, Selection, SelectionContext, register_method

FAMILY = "gemma3"
ATTN = ("sdpa", "eager")
K = 2
NEW_TOKENS = 4
ATOL = 1e-4


@register_method("test_gemma3_restate")
class KeepAllRestated(PruningMethod):
    """Test-only: keep every vision token and hand back its own hidden state as a "new" state.

    Nothing changes, but a selection with new states goes through the gather path (gathered states, gathered
    rotary, rebuilt masks), so the output equals the unhooked model only if the rebuilt masks are the model's.
    """

    needs_amount = False

    def select(self, ctx: SelectionContext) -> Selection:
        kept = [ctx.vision_positions(row) for row in range(ctx.hidden_states.shape[0])]
        return Selection(kept, new_states=[ctx.hidden_states[row, positions] for row, positions in enumerate(kept)])


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """[B, q, kv] True where attention is allowed, from an sdpa (bool) or eager (additive) 4D mask."""
    return (mask if mask.dtype == torch.bool else mask == 0)[:, 0]


def _layer_inputs(model, layers: range) -> tuple[dict, list]:
    """Pre-hooks (registered after the pruning hooks, so they see what the layers get) recording the masks."""
    seen: dict[int, dict] = {}
    text_model = model.get_decoder()
    hooks = [text_model.layers[i].register_forward_pre_hook(
        lambda m, a, kw, i=i: seen.setdefault(i, dict(kw)) and None, with_kwargs=True) for i in layers]
    return seen, hooks


@pytest.mark.parametrize("batch", (1, 2))
@pytest.mark.parametrize("attn", ATTN)
def test_pruned_prefill_equals_hand_run_with_the_models_own_masks(attn, batch, loaded: Loader):
    """Layers K.. by hand on the gathered tokens, masked by transformers' `create_masks_for_vision_model` over
    the gathered `token_type_ids` (not a plain causal mask), rotary per layer type at the kept positions."""
    model, processor = loaded(FAMILY, attn)
    inputs = tiny_vlms.make_inputs(FAMILY, processor, batch=batch)
    text_model = model.get_decoder()
    n_tokens = inputs["input_ids"].shape[1]
    positions = positions_from_mask(inputs["attention_mask"], n_tokens)  # what the hooks number rows with
    _, layer_input = tiny_vlms.unhooked_forward(model, inputs, layer=K, position_ids=positions)
    with tuner.apply_pruning(model, tuner.PruningConfig(method="random", layer=K, keep_ratio=0.3)) as handle, \
            torch.no_grad():
        pruned = model(**inputs).logits

    # The gathered, left-padded layout: each row's kept positions at the end.
    width = max(len(kept) for kept in handle.last_kept)
    assert width < n_tokens
    index = torch.zeros(batch, width, dtype=torch.long)
    valid = torch.zeros(batch, width, dtype=torch.bool)
    for row, kept in enumerate(handle.last_kept):
        index[row, width - len(kept):], valid[row, width - len(kept):] = kept, True
    token_types = inputs["token_type_ids"].gather(1, index).masked_fill(~valid, 0)
    assert (token_types.sum(1) >= 2).all()  # several image tokens kept per row: the blocks matter
    with torch.no_grad():
        hidden = layer_input.gather(1, index[..., None].expand(-1, -1, layer_input.shape[-1]))
        kept_positions = positions.gather(1, index)
        masks = create_masks_for_vision_model(
            config=text_model.config, inputs_embeds=hidden, attention_mask=valid.long(), cache=None,
            position_ids=None, block_sequence_ids=get_block_sequence_ids_for_mask(token_types))
        for layer, kind in zip(text_model.layers[K:], text_model.config.layer_types[K:]):
            rotary = text_model.rotary_emb(hidden, kept_positions, layer_type=kind)
            hidden = layer(hidden, attention_mask=masks[kind], position_embeddings=rotary, position_ids=None)
        manual = model.lm_head(text_model.norm(hidden))
    torch.testing.assert_close(pruned[valid], manual[valid], rtol=0, atol=ATOL)


@pytest.mark.parametrize("batch", (1, 2))
@pytest.mark.parametrize("attn", ATTN)
def test_keeping_every_image_token_through_the_gather_path_equals_the_model(attn, batch, loaded: Loader):
    """Every image token kept, but restated: the layers >= K get gathered states and rebuilt masks, and
    `generate()` (which passes `token_type_ids` in its prefill) gives the unhooked model's tokens and logits."""
    model, processor = loaded(FAMILY, attn)
    inputs = tiny_vlms.make_inputs(FAMILY, processor, batch=batch)
    ref_tokens, ref_logits, _ = tiny_vlms.greedy(model, inputs, NEW_TOKENS)
    with tuner.apply_pruning(model, tuner.PruningConfig(method="test_gemma3_restate", layer=K)) as handle:
        seen, hooks = _layer_inputs(model, range(K, K + 1))
        try:
            tokens, logits, _ = tiny_vlms.greedy(model, inputs, NEW_TOKENS)
        finally:
            for hook in hooks:
                hook.remove()
    assert seen[K]["position_ids"] is None  # the hooks substituted gathered rotary: the gather path ran
    assert handle.requests[0].n_kept_vision == handle.requests[0].n_vision
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("attn", ATTN)
def test_kept_image_tokens_see_each_other_both_ways_in_every_layer_type(attn, loaded: Loader):
    """In the masks the pruned layers get, an earlier kept image token attends to a later one of its image (in a
    sliding layer: within the window), while text stays causal; padding slots see nothing."""
    model, processor = loaded(FAMILY, attn)
    inputs = tiny_vlms.make_inputs(FAMILY, processor, batch=2)
    config = model.get_decoder().config
    layer_types = config.layer_types
    assert {layer_types[i] for i in range(K, len(layer_types))} == {"sliding_attention", "full_attention"}
    with tuner.apply_pruning(model, tuner.PruningConfig(method="dart", layer=K, keep_ratio=0.3)) as handle:
        seen, hooks = _layer_inputs(model, range(K, len(layer_types)))
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for hook in hooks:
                hook.remove()
    width = max(len(kept) for kept in handle.last_kept)
    for index, kwargs in seen.items():
        allowed = _allowed(kwargs["attention_mask"])
        window = config.sliding_window if layer_types[index] == "sliding_attention" else width
        for row, kept in enumerate(handle.last_kept):
            slots = torch.arange(width - len(kept), width)
            image = slots[inputs["token_type_ids"][row, kept] == 1]
            assert len(image) >= 2
            for q in image:
                for kv in image:
                    assert bool(allowed[row, q, kv]) == bool(abs(q - kv) < window), (index, row, q, kv)
            first_image = int(image[0])
            assert not allowed[row, first_image - 1, first_image:].any()  # <start_of_image> does not look ahead
            text_after = int(image[-1]) + 1
            assert not allowed[row, text_after, text_after + 1:].any()  # nor does the text after the image
            if len(kept) < width:
                assert not allowed[row, :, : width - len(kept)].any()  # nobody attends to a padding slot


@pytest.mark.parametrize("attn", ATTN)
def test_static_cache_and_beam_search_agree_with_dynamic_cache(attn, loaded: Loader):
    """A static cache sizes the full layers' masks to its capacity, so the kept image blocks are padded to it;
    beam search expands `token_type_ids` with the prompt, and each beam keeps its prompt's set."""
    model, processor = loaded(FAMILY, attn)
    inputs = tiny_vlms.make_inputs(FAMILY, processor, batch=2)
    with tuner.apply_pruning(model, tuner.PruningConfig(method="dart", layer=K, keep_ratio=0.3)) as handle:
        tokens, logits, _ = tiny_vlms.greedy(model, inputs, NEW_TOKENS)
        with torch.no_grad():
            static = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                    cache_implementation="static", output_logits=True, return_dict_in_generate=True)
            beams = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                   num_beams=2)
    assert torch.equal(static.sequences[:, inputs["input_ids"].shape[1]:], tokens)
    torch.testing.assert_close(torch.stack(static.logits, 1), logits, rtol=0, atol=ATOL)
    assert beams.shape == (2, inputs["input_ids"].shape[1] + NEW_TOKENS)
    assert handle.requests[-1].n_kept_vision == [n for n in handle.requests[0].n_kept_vision for _ in range(2)]


@pytest.mark.parametrize("cache_kind", ("dynamic", "static"))
@pytest.mark.parametrize("kept", (5, 12))  # under and over the sliding window of 8
@pytest.mark.parametrize("attn", ATTN)
def test_masks_are_sized_against_the_pruned_layers(attn, kept, cache_kind, loaded: Loader):
    """With layers < K already holding the N-token prompt, the P-token masks equal the model's own
    `create_masks_for_vision_model` over an empty cache: sized against a pruned layer of each type, the image
    blocks padded to every key slot (a static sliding layer spans its whole window even when P is shorter)."""
    model, _ = loaded(FAMILY, attn)
    config = model.get_decoder().config
    family = get_family(FAMILY)
    hidden = torch.randn(2, kept, config.hidden_size)
    token_types = torch.zeros(2, kept, dtype=torch.long)
    token_types[0, 1:4] = token_types[1, 2:-1] = 1
    blocks = get_block_sequence_ids_for_mask(token_types)
    valid = torch.ones(2, kept, dtype=torch.bool)
    valid[1, :2] = False  # a left-padded row: its padding slots are text (-1) for the overlay

    def new_cache():
        if cache_kind == "static":
            return StaticCache(config=config, max_cache_len=32)
        return DynamicCache(config=config)

    expected = create_masks_for_vision_model(config=config, inputs_embeds=hidden, attention_mask=valid,
                                             cache=new_cache(), position_ids=None, block_sequence_ids=blocks)
    cache = new_cache()
    n_prompt = 20
    for layer in range(K):  # the layers below K ran on the whole prompt
        states = torch.randn(2, config.num_key_value_heads, n_prompt, config.head_dim)
        cache.update(states, states, layer)
    for kind in ("full_attention", "sliding_attention"):
        first = config.layer_types.index(kind, K)
        got = family.layer_mask(kind, config=config, hidden=hidden, mask_2d=valid, cache=cache, layer_idx=first,
                                kept_state=blocks)
        assert torch.equal(got, expected[kind]), kind


def test_decode_masks_are_the_models_plain_causal_ones(loaded: Loader):
    """In decode the new tokens are text: the family builds transformers' causal / sliding-window masks."""
    model, _ = loaded(FAMILY, "eager")
    family, config = get_family(FAMILY), model.get_decoder().config
    hidden = torch.zeros(1, 3, config.hidden_size)
    for kind, builder in (("full_attention", create_causal_mask), ("sliding_attention",
                                                                   create_sliding_window_causal_mask)):
        expected = builder(config=config, inputs_embeds=hidden, attention_mask=None, cache=None)
        got = family.layer_mask(kind, config=config, hidden=hidden, mask_2d=None, cache=None, layer_idx=K,
                                kept_state=None)
        assert torch.equal(got, expected)


def test_evaluation_inputs_keep_token_type_ids_and_the_loader_finds_the_family(saved_dirs, tmp_path):
    """`load_model` on a saved tiny checkpoint, then a two-row batch through the evaluation input builder."""
    loaded = load_model(saved_dirs[FAMILY], device="cpu", attn_implementation="sdpa")
    assert loaded.family == FAMILY and adapter_for(loaded.model).spec is get_family(FAMILY)
    images = [tiny_vlms._make_image(w, h, seed) for seed, (w, h) in enumerate(get_family(FAMILY).tiny_image_sizes)]
    inputs = build_inputs(loaded, ["What is it?", "Describe the colours."], [[images[0]], [images[1]]])
    assert inputs["token_type_ids"].shape == inputs["input_ids"].shape
    assert torch.equal(inputs["token_type_ids"].bool(), inputs["input_ids"] == loaded.model.config.image_token_id)
    answer_start = loaded.processor.tokenizer("<end_of_turn>\n<start_of_turn>model\n").input_ids
    assert inputs["input_ids"][:, -len(answer_start):].tolist() == [answer_start] * 2  # the fallback turn format
    with tuner.apply_pruning(loaded.model, tuner.PruningConfig(method="dart", layer=K, keep_ratio=0.3)) as handle:
        tiny_vlms.greedy(loaded.model, inputs, 2)
    assert handle.requests[0].n_vision == [16, 16]


def test_cost_counts_the_sliding_window_layers():
    """google/gemma-3-4b-it: 34 layers, every sixth global, the others a 1,024-token window."""
    family = get_family(FAMILY)
    dims = family.text_dims(family.published_config())
    assert dims.layers == 34 and (dims.heads, dims.kv_heads, dims.head_dim) == (8, 4, 256)
    assert dims.windows == tuple(None if (i + 1) % 6 == 0 else 1024 for i in range(34))
    full = TextDims(**{**dims.__dict__, "windows": ()})
    n = 4096
    assert prefill_flops(dims, n) == sum(layer_flops(dims, n, dims.window(i)) for i in range(34)) + \
        2 * dims.hidden * dims.vocab
    assert prefill_flops(dims, n) < prefill_flops(full, n)
    assert prefill_flops(dims, 1000) == prefill_flops(full, 1000)  # under the window nothing differs


# A Gemma-style chat template: it writes the BOS token itself, as google/gemma-3-*-it's does.
_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\\n' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{{ '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def test_chat_template_prompts_get_one_bos():
    """Gemma's template writes `<bos>` and its tokenizer adds one too: the prompt must tokenize to a single one."""
    tokenizer = get_family(FAMILY).published_processor(tiny_vlms._make_tokenizer()).tokenizer
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    processor = get_family(FAMILY).published_processor(tokenizer)
    processor.chat_template = _GEMMA_TEMPLATE
    prompt = build_prompt(processor, FAMILY, "What is it?", 1)
    assert prompt.startswith("<start_of_turn>user\n<start_of_image>What is it?")
    ids = processor(text=[prompt], images=[[tiny_vlms._make_image(64, 64, 0)]], return_tensors="pt")["input_ids"][0]
    assert ids[0] == bos and int((ids == bos).sum()) == 1
    tokenizer.backend_tokenizer.post_processor = None  # a tokenizer that adds no BOS keeps the template's
    assert build_prompt(processor, FAMILY, "What is it?", 1).startswith("<s><start_of_turn>user\n")
