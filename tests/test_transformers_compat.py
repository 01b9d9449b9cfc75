"""The hooks follow transformers' calling conventions whichever cache keyword a caller uses."""

import pytest
import torch

import tiny_vlms
import tuner
from conftest import Loader
from tuner.models.compat import CACHE_KWARG, cache_from_kwargs, positions_from_mask

K = 2


def test_cache_keyword_is_the_installed_releases_own():
    import inspect

    from transformers import LlamaModel

    assert CACHE_KWARG in inspect.signature(LlamaModel.forward).parameters


def test_cache_is_found_under_either_name():
    cache = object()
    assert cache_from_kwargs({"cache": cache}) is cache
    assert cache_from_kwargs({"past_key_values": cache}) is cache
    assert cache_from_kwargs({"past_key_values": None, "input_ids": 1}) is None


def test_positions_count_from_each_rows_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask, 5).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert positions_from_mask(mask, 2).tolist() == [[1, 2], [3, 4]]


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("keyword", sorted({CACHE_KWARG, "past_key_values"}))  # the names this release accepts
@pytest.mark.parametrize("family", ("llava", "llava_next"))  # Qwen2-VL needs generate() to decode
def test_manual_decode_loop_sees_the_cache_under_either_keyword(family, keyword, loaded: Loader):
    """A hand-written decode loop (old or new keyword) continues the pruned prompt instead of re-selecting."""
    from transformers import DynamicCache

    model, processor = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor)
    cfg = tuner.PruningConfig(method="dart", layer=K, keep_ratio=0.3)
    with tuner.apply_pruning(model, cfg) as handle, torch.no_grad():
        cache = DynamicCache(config=model.config.get_text_config())
        out = model(**inputs, **{keyword: cache}, use_cache=True)
        mask = inputs["attention_mask"]
        for _ in range(2):
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            out = model(input_ids=token, attention_mask=mask, use_cache=True, **{keyword: cache})
    assert len(handle.requests) == 1  # the decode steps were not taken for new prompts
    n_prompt = inputs["input_ids"].shape[1]
    n_kept = handle.requests[0].n_kept[0]
    assert cache.get_seq_length(0) == n_prompt + 2
    assert cache.get_seq_length(K) == n_kept + 2 < n_prompt + 2
