"""A request (one generate call, or one forward outside generate) is pruned once and never fails when it can run:
generate without a cache reuses the prefill's choice, while a forward outside generate extending the last prompt
is pruned on its own text; a mask hiding every vision token passes through unpruned (counted), DART clamps its
pivots to a short row; and greedy selections keep, in a left-padded batch, what each row keeps alone on several
image draws."""

import inspect
import warnings

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import tiny_vlms
import tuner
from conftest import Loader
from tuner.pruning.request import GenerateCalls, RequestChoice

NEW_TOKENS = 4
ATOL = 1e-4
# The greedy selections whose picks among exact duplicates and near ties depend on float rounding
# (`tuner.pruning.ties`); every K = 0 method's batch equals its rows alone on one draw in test_before_lm.py.
TIE_METHODS = ("divprune", "cdpruner")


def generate(model, inputs, **kwargs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)


@pytest.mark.parametrize("family, method, layer", [
    ("llava", "random", 0), ("llava", "random", 2), ("llava", "fastv", 2), ("llava", "avgpool", 2),
    ("idefics3", "fastv", 2), ("smolvlm", "fastv", 2),  # the families whose configs generate without a cache
])
def test_generate_without_cache_reuses_the_prefill_choice(family, method, layer, loaded: Loader):
    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor, batch=2)
    cfg = tuner.PruningConfig(method=method, layer=layer, keep_ratio=0.3)
    with tuner.apply_pruning(model, cfg) as handle:
        cached_tokens, cached_logits = generate(model, inputs)
        cached_kept = [k.clone() for k in handle.last_kept]
        tokens, logits = generate(model, inputs, use_cache=False)
    assert torch.equal(tokens, cached_tokens)
    torch.testing.assert_close(logits, cached_logits, rtol=0, atol=ATOL)
    assert len(handle.requests) == 2  # one per generate call, not one per uncached step
    prompt_length = inputs["input_ids"].shape[1]
    for row in range(2):
        assert torch.equal(handle.last_kept[row][handle.last_kept[row] < prompt_length], cached_kept[row])


def extended(inputs, tokenizer, text: str = " Answer: a red square") -> dict:
    """`inputs` with `text` appended to its prompt, the same images: what a multiple-choice option looks like."""
    extra = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    return dict(inputs, input_ids=torch.cat([inputs["input_ids"], extra], 1),
                attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(extra)], 1))


def test_a_forward_extending_the_last_prompt_outside_generate_is_pruned_on_its_own(loaded: Loader):
    """Outside generate nothing is continued: FastV ranks by the last token's attention, so the longer prompt
    (another option's text) keeps what it keeps alone, not what the shorter one kept."""
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor)
    longer = extended(inputs, processor.tokenizer)
    cfg = tuner.PruningConfig(method="fastv", layer=2, keep_ratio=0.3)
    with tuner.apply_pruning(model, cfg) as handle, torch.no_grad():
        model(**inputs)
        short_kept = handle.last_kept[0].clone()
        model(**longer)
        after_short = handle.last_kept[0].clone()
    with tuner.apply_pruning(model, cfg) as fresh, torch.no_grad():
        model(**longer)
    assert [r.n_tokens for r in handle.requests] == [[inputs["input_ids"].shape[1]], [longer["input_ids"].shape[1]]]
    assert torch.equal(after_short, fresh.last_kept[0])
    prompt_length = inputs["input_ids"].shape[1]
    assert not torch.equal(after_short[after_short < prompt_length], short_kept)  # the text changed the choice


def test_only_a_later_forward_of_the_same_generate_call_with_the_same_images_continues_a_request(loaded: Loader):
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor)
    longer = extended(inputs, processor.tokenizer)
    other_images = dict(longer, pixel_values=tiny_vlms.make_inputs("llava", processor, seed=5)["pixel_values"])
    vision = tiny_vlms.vision_mask(model, inputs)
    ids, attention = longer["input_ids"], longer["attention_mask"].bool()
    in_call = RequestChoice.begin(inputs["input_ids"], inputs["attention_mask"].bool(), vision, inputs, 1)
    assert in_call.continued_by(ids, attention, longer, 1)
    assert not in_call.continued_by(ids, attention, longer, 2)  # another generate call
    assert not in_call.continued_by(ids, attention, longer, None)  # a forward outside generate
    assert not in_call.continued_by(ids, attention, other_images, 1)  # the same text, another image
    assert not in_call.continued_by(inputs["input_ids"], inputs["attention_mask"].bool(), inputs, 1)  # not longer
    outside = RequestChoice.begin(inputs["input_ids"], inputs["attention_mask"].bool(), vision, inputs, None)
    assert not outside.continued_by(ids, attention, longer, None)


class RecordAndRaise(LogitsProcessor):
    """Notes which generate call is running at the first step, then stops generate with an error."""

    def __init__(self, calls: GenerateCalls, seen: list) -> None:
        self.calls, self.seen = calls, seen

    def __call__(self, input_ids, scores):
        self.seen.append(self.calls.current)
        raise RuntimeError("stop here")


def test_generate_calls_are_numbered_apart_and_end_even_when_generate_raises(loaded: Loader):
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor)
    calls, seen = GenerateCalls(model), []
    try:
        for _ in range(2):
            with pytest.raises(RuntimeError, match="stop here"), torch.no_grad():
                model.generate(**inputs, max_new_tokens=2, logits_processor=LogitsProcessorList([RecordAndRaise(
                    calls, seen)]))
            assert calls.current is None  # outside generate again: later forwards are requests of their own
    finally:
        calls.remove()
    assert seen == [1, 2]
    assert "generate" not in vars(model)


def test_generate_is_wrapped_on_the_instance_while_applied_and_the_model_restored_after(loaded: Loader):
    model, processor = loaded("llava", "sdpa")
    before, class_generate = dict(vars(model)), type(model).generate
    own_signature = inspect.signature(model.generate)
    with tuner.apply_pruning(model, tuner.PruningConfig(method="random", keep_ratio=0.3)):
        assert "generate" in vars(model) and inspect.signature(model.generate) == own_signature
        assert type(model).generate is class_generate  # an instance attribute: the class is untouched
    assert vars(model).keys() == before.keys() and all(vars(model)[k] is v for k, v in before.items())
    assert model.generate.__func__ is type(model).generate


def test_a_mask_hiding_every_vision_token_passes_through_unpruned(loaded: Loader):
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor)
    hidden = dict(inputs, attention_mask=inputs["attention_mask"] & ~tiny_vlms.vision_mask(model, inputs))
    with torch.no_grad():
        expected = model(**hidden).logits
    with tuner.apply_pruning(model, tuner.PruningConfig(method="dart", keep_ratio=0.3)) as handle, torch.no_grad():
        logits = model(**hidden).logits
    assert torch.equal(logits, expected)
    (stats,) = handle.requests
    assert not stats.pruned and stats.n_vision == stats.n_kept_vision == [0]
    assert stats.n_tokens == hidden["attention_mask"].sum(1).tolist()


def test_dart_clamps_its_image_pivots_to_a_short_row_and_warns_once(loaded: Loader):
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor)
    n_vision = int(tiny_vlms.vision_mask(model, inputs).sum())
    cfg = tuner.PruningConfig(method="dart", budget=1, options={"n_image_pivots": n_vision + 3})
    with tuner.apply_pruning(model, cfg) as handle, torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(**inputs)
        model(**inputs)
    assert [r.n_kept_vision for r in handle.requests] == [[1], [1]]
    messages = [str(w.message) for w in caught if "n_image_pivots" in str(w.message)]
    assert len(messages) == 1 and f"exceeds the {n_vision} vision tokens of batch row 0" in messages[0]


@pytest.mark.parametrize("attn", ("eager", "sdpa"))
@pytest.mark.parametrize("family", ("llava_next", "llava_onevision"))
def test_k0_batch_equals_rows_alone_over_image_draws(family, attn, loaded: Loader):
    """LLaVA-NeXT and OneVision repeat one `image_newline` vector per grid row: exact duplicates at K = 0, where
    DivPrune and CDPruner must break ties by position alike in a left-padded batch and alone."""
    model, processor = loaded(family, attn)
    for seed in range(1, 5):  # draw 0 is test_before_lm.py's test_k0_left_padded_batch_equals_rows_alone
        inputs = tiny_vlms.make_inputs(family, processor, batch=2, seed=seed)
        for method in TIE_METHODS:
            cfg = tuner.PruningConfig(method=method, layer=0, keep_ratio=0.3)
            tiny_vlms.assert_batch_equals_rows_alone(model, family, inputs, cfg, 1, ATOL)  # the prefill: 1 token
