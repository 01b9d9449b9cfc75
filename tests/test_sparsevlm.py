"""`sparsevlm`: rater choice, rank-based count and recycling against literal re-statements of the official rules;
its attention capture against eager's real weights; and the hook properties on a tiny LLaVA."""

import math

import pytest
import torch

import tiny_vlms
import tuner
from conftest import Loader
from tuner.config import Stage
from tuner.pruning import Selection, get_method_class, register_method
from tuner.pruning.base import PromptInputs, SelectionContext
from tuner.pruning.capture import AttentionCapture
from tuner.pruning.methods.sparsevlm import (
    OFFICIAL_TOP_COUNTS,
    SparseVLM,
    density_peak_clusters,
    keep_and_recycle,
    official_schedule,
    rank_keep_count,
    rater_positions,
    split_count,
)

ATOL = 1e-4


# -- literal re-statements of the rules (plain Python, no torch) ---------------------------------------------------
def restated_raters(embeddings: list[list[float]], vision: list[int], text_after: list[int]) -> list[int]:
    """Relevance of text token t = mean over vision v of exp(v.t) / sum_t' exp(v.t'); raters: relevance > mean."""
    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))
    relevance = []
    for t in text_after:
        shares = []
        for v in vision:
            logits = [dot(embeddings[v], embeddings[u]) for u in text_after]
            shares.append(math.exp(dot(embeddings[v], embeddings[t])) / sum(math.exp(x) for x in logits))
        relevance.append(sum(shares) / len(shares))
    mean = sum(relevance) / len(relevance)
    return [t for t, r in zip(text_after, relevance) if r > mean]


def restated_counts(n_vision: int, total: int) -> tuple[int, int, int]:
    """(top, recycled, merged): the largest top count k with k + (int(int(0.3 (L - k)) + 1) / 10) + 1) == total."""
    for top in range(total, -1, -1):
        pruned = n_vision - top
        recycled = int(pruned * 0.3) + 1 if pruned else 0
        merged = int(recycled / 10) + 1 if pruned else 0
        if top + merged == total:
            return top, recycled, merged
    return total, 0, 0


def restated_clusters(points: list[list[float]], n_clusters: int) -> tuple[list[int], list[int]]:
    """DPC-kNN as the official `cluster_and_merge` does it (minus its noise: density ties go to the earlier token)."""
    n, dim = len(points), len(points[0])
    dist = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(points[i], points[j]))) / math.sqrt(dim) for j in range(n)]
            for i in range(n)]
    density = [math.exp(-sum(d * d for d in sorted(dist[i])[:n_clusters]) / n_clusters) for i in range(n)]
    largest = max(max(row) for row in dist)
    peak = []
    for i in range(n):
        denser = [dist[i][j] for j in range(n) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        peak.append(min(denser + [largest]))
    centres = sorted(range(n), key=lambda i: (-peak[i] * density[i], i))[:n_clusters]
    assignment = [min(range(n_clusters), key=lambda c: (dist[i][centres[c]], c)) for i in range(n)]
    for c, centre in enumerate(centres):
        assignment[centre] = c
    return centres, assignment


# -- hand-built contexts -------------------------------------------------------------------------------------------
def context(attention: torch.Tensor, hidden: torch.Tensor, vision: list[int], embeddings: torch.Tensor,
            budget: int) -> SelectionContext:
    """One row whose layer K-1 attention of every query row is `attention` [H, N, N]."""
    n = hidden.shape[0]
    vision_mask = torch.zeros(1, n, dtype=torch.bool)
    vision_mask[0, vision] = True
    valid = torch.ones(1, n, dtype=torch.bool)
    return SelectionContext(
        hidden_states=hidden[None], vision_mask=vision_mask, attention_mask=valid,
        input_ids=torch.zeros(1, n, dtype=torch.long), budgets=[budget], final_norm=torch.nn.Identity(),
        attention_rows=lambda row, queries: attention[:, queries], prompt=PromptInputs(embeddings[None], vision_mask,
                                                                                       valid))


def select(ctx: SelectionContext, **options) -> Selection:
    cfg = tuner.PruningConfig(method="sparsevlm", budget=ctx.budgets[0], options=options)
    return get_method_class("sparsevlm")(cfg).select(ctx)


def test_raters_are_the_text_tokens_after_the_image_above_the_mean_relevance():
    # 0: text before the image (very relevant, but not after the image), 1-2: vision, 3-5: text after the image.
    # Relevance of 3, 4, 5: v1 = (1, 0) gives softmax(2, 0, 0), v2 = (0, 1) softmax(0, 2, 0): means 0.447, 0.447,
    # 0.106 against their mean 1/3, so 3 and 4 rate.
    embeddings = torch.tensor([[3.0, 3.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    vision = torch.tensor([[False, True, True, False, False, False]])
    prompt = PromptInputs(embeddings[None], vision, torch.ones(1, 6, dtype=torch.bool))
    assert rater_positions(prompt, 0).tolist() == [3, 4]
    assert restated_raters(embeddings.tolist(), [1, 2], [3, 4, 5]) == [3, 4]


@pytest.mark.parametrize("seed", range(4))
def test_rater_choice_matches_the_restated_rule_with_left_padding(seed):
    generator = torch.Generator().manual_seed(seed)
    pad, before, n_vision, after = 3, 2, 7, 6
    n = pad + before + n_vision + after
    embeddings = torch.randn(n, 5, generator=generator)
    embeddings[:pad] = 100.0  # padding must not count
    vision = torch.zeros(1, n, dtype=torch.bool)
    vision[0, pad + before:pad + before + n_vision] = True
    valid = torch.ones(1, n, dtype=torch.bool)
    valid[0, :pad] = False
    chosen = rater_positions(PromptInputs(embeddings[None], vision, valid), 0).tolist()
    text_after = list(range(pad + before + n_vision, n))
    assert chosen == restated_raters(embeddings.tolist(), list(range(pad + before, pad + before + n_vision)),
                                     text_after)
    assert chosen and set(chosen) <= set(text_after)


def test_equal_relevance_makes_every_text_token_a_rater():
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])  # both text tokens: equal relevance
    vision = torch.tensor([[True, True, False, False]])
    assert rater_positions(PromptInputs(embeddings[None], vision, torch.ones(1, 4, dtype=torch.bool)), 0).tolist() \
        == [2, 3]


def test_rank_rule_deletes_lambda_times_the_rank_deficit():
    # Three raters over 8 vision tokens, the third row the sum of the first two: rank 2. lambda = 0.5 deletes
    # floor(0.5 * (8 - 2)) = 3 tokens, keeping 5; lambda = 1 deletes 6 (keeps the rank, 2).
    r1 = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.0])
    r2 = torch.tensor([0.0, 0.0, 0.2, 0.3, 0.1, 0.1, 0.1, 0.2])
    relation = torch.stack([r1, r2, r1 + r2])
    assert rank_keep_count(relation, 0.5) == 5
    assert rank_keep_count(relation, 1.0) == 2
    assert rank_keep_count(relation, 0.34) == 6  # floor(2.04) = 2
    assert rank_keep_count(torch.eye(3), 1.0) == 3  # full rank: nothing is redundant


def restated_rank_count(rows: list[list[int]], scale: float) -> int:
    """L_v - floor(scale * (L_v - rank)), the rank by exact Gaussian elimination over the rationals."""
    from fractions import Fraction
    matrix = [[Fraction(x) for x in row] for row in rows]
    rank, n_cols = 0, len(matrix[0])
    for col in range(n_cols):
        pivot = next((r for r in range(rank, len(matrix)) if matrix[r][col] != 0), None)
        if pivot is None:
            continue
        matrix[rank], matrix[pivot] = matrix[pivot], matrix[rank]
        for r in range(len(matrix)):
            if r != rank and matrix[r][col] != 0:
                factor = matrix[r][col] / matrix[rank][col]
                matrix[r] = [a - factor * b for a, b in zip(matrix[r], matrix[rank])]
        rank += 1
    return max(1, n_cols - math.floor(scale * (n_cols - rank)))


@pytest.mark.parametrize("seed", range(5))
def test_rank_rule_matches_the_restated_rule_on_low_rank_inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    n_raters, n_vision, rank = 6, 12, 1 + seed % 4
    rows = (torch.randint(0, 4, (n_raters, rank), generator=generator)
            @ torch.randint(0, 4, (rank, n_vision), generator=generator))
    for scale in (0.25, 0.5, 0.9, 1.0):
        assert rank_keep_count(rows.float(), scale) == restated_rank_count(rows.tolist(), scale)


def test_rank_rule_through_select_is_capped_by_the_budget():
    # Raters 11 and 12 (text after the image); their attention rows over vision tokens 1..8 have rank 2.
    n, vision = 13, list(range(1, 9))
    attention = torch.zeros(2, n, n)
    attention[:, 11, 1:9] = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.0])
    attention[:, 12, 1:9] = torch.tensor([0.0, 0.0, 0.2, 0.3, 0.1, 0.1, 0.1, 0.2])
    embeddings = torch.zeros(n, 2)
    embeddings[1:9, 0] = 1.0
    embeddings[11:13] = torch.tensor([2.0, 0.0])  # 9, 10 score 0: 11 and 12 are the raters
    hidden = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    ctx = context(attention, hidden, vision, embeddings, budget=8)
    cfg = tuner.PruningConfig(method="sparsevlm", options={"rank_scale": 1.0, "recycle": False})
    (kept,) = get_method_class("sparsevlm")(cfg).select(ctx).kept_vision
    assert kept.tolist() == [1, 4]  # rank 2: the two best mean scores, 0.25 and 0.2
    cfg = tuner.PruningConfig(method="sparsevlm", options={"rank_scale": 0.5, "recycle": False})
    assert get_method_class("sparsevlm")(cfg).select(ctx).kept_vision[0].tolist() == [1, 3, 4, 5, 8]
    ctx.budgets = [3]  # the amount caps what the rule keeps
    assert get_method_class("sparsevlm")(cfg).select(ctx).kept_vision[0].tolist() == [1, 3, 4]


@pytest.mark.parametrize("n_vision", (20, 40, 64, 576))
def test_the_split_keeps_exactly_the_total_and_matches_the_restated_counts(n_vision):
    for total in range(1, n_vision + 1):
        top = split_count(n_vision, total)
        restated_top, recycled, merged = restated_counts(n_vision, total)
        assert top == restated_top
        scores = torch.arange(n_vision, 0, -1).float()
        hidden = torch.randn(n_vision, 3, generator=torch.Generator().manual_seed(total))
        kept_top, centres, states = keep_and_recycle(scores, hidden, total)
        assert kept_top.numel() + centres.numel() == total  # the budget is exact
        assert centres.numel() == (merged if total < n_vision else 0) and states.shape[0] == centres.numel()


def test_the_official_schedules_reproduce_the_official_counts():
    # 192: 576 -> top 300 of 576 (+9 merged) = 309 -> top 200 (+4) = 204 -> top 110 (+3) = 113.
    cfg = official_schedule(192)
    assert cfg.layers == (3, 7, 16)
    assert [s.budget for s in cfg.stage_configs()] == [309, 204, 113]
    for retain, tops in OFFICIAL_TOP_COUNTS.items():
        held = 576
        for stage, top in zip(official_schedule(retain).stage_configs(), tops):
            assert split_count(held, stage.budget) == top  # our split recovers the official top count
            held = stage.budget
    with pytest.raises(ValueError, match=r"official sparsevlm schedules exist for \[64, 96, 128, 192\] tokens"):
        official_schedule(100)


def test_recycling_merges_the_best_pruned_tokens_into_their_cluster_means_at_the_centres():
    # 40 vision tokens (positions 1..40), scores falling with position, total 11: top 9, the next 10 (positions
    # 10..19) recycled into 2 merged tokens. Their states form two groups far apart: each merged token is its
    # group's mean, at the group's density peak.
    n_vision, n = 40, 43
    vision = list(range(1, n_vision + 1))
    attention = torch.zeros(1, n, n)
    attention[0, 41, 1:41] = torch.linspace(1.0, 0.1, n_vision)
    embeddings = torch.zeros(n, 2)
    embeddings[41] = torch.tensor([1.0, 0.0])  # 41 the one rater (42 scores lower)
    embeddings[1:41, 0] = 1.0
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(n, 4, generator=generator)
    groups = [[10, 12, 13, 16, 19], [11, 14, 15, 17, 18]]
    hidden[groups[0]] = torch.randn(5, 4, generator=generator) * 0.1
    hidden[groups[1]] = torch.randn(5, 4, generator=generator) * 0.1 + 10.0
    selection = select(context(attention, hidden, vision, embeddings, budget=11))
    (kept,), (states,) = selection.kept_vision, selection.new_states
    top = list(range(1, 10))
    centres, assignment = restated_clusters(hidden[10:20].tolist(), 2)
    expected_centres = sorted(10 + c for c in centres)
    assert kept.tolist() == top + expected_centres
    assert {frozenset(g) for g in groups} == {frozenset(10 + i for i in range(10) if assignment[i] == c)
                                              for c in range(2)}
    for centre in expected_centres:
        group = next(g for g in groups if centre in g)
        torch.testing.assert_close(states[kept.tolist().index(centre)], hidden[group].mean(0))
    torch.testing.assert_close(states[:9], hidden[1:10])  # the top tokens keep their own states


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_clusters", (1, 2, 4))
def test_density_peak_clustering_matches_the_restated_rule(seed, n_clusters):
    generator = torch.Generator().manual_seed(seed)
    points = torch.randn(17, 6, generator=generator).double()
    centres, assignment = density_peak_clusters(points, n_clusters)
    assert (centres.tolist(), assignment.tolist()) == restated_clusters(points.tolist(), n_clusters)


@pytest.mark.parametrize("options, message", [
    ({"rank_scale": 0.0}, r"rank_scale must be a number in \(0, 1\] or null, got 0.0"),
    ({"rank_scale": 1.5}, r"rank_scale must be a number in \(0, 1\] or null, got 1.5"),
    ({"rank_scale": True}, r"rank_scale must be a number in \(0, 1\] or null, got True"),
    ({"recycle": "yes"}, r"recycle must be true or false, got 'yes'"),
    ({"lambda": 1}, r"unknown option\(s\) \['lambda'\] for method 'sparsevlm'"),
])
def test_bad_options_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        tuner.PruningConfig(method="sparsevlm", keep_ratio=0.5, options=options)


def test_an_amount_is_needed_unless_the_rank_rule_decides():
    with pytest.raises(ValueError, match="method 'sparsevlm' needs keep_ratio"):
        tuner.PruningConfig(method="sparsevlm")
    tuner.PruningConfig(method="sparsevlm", options={"rank_scale": 0.5})


# -- on a tiny LLaVA -----------------------------------------------------------------------------------------------
K = 2
SCHEDULE = tuner.PruningConfig(method="sparsevlm", layer=1, keep_ratio=0.5, stages=(Stage(3, keep_ratio=0.4),))


def vision_of(model, inputs) -> torch.Tensor:
    return (inputs["input_ids"] == model.config.image_token_id) & inputs["attention_mask"].bool()


@pytest.mark.parametrize("batch", (1, 2))  # 1: sdpa takes its causal fast path (no mask); 2: left padding
@pytest.mark.parametrize("family", ("llava", "llava_local", "qwen2_vl"))
def test_captured_rows_under_sdpa_equal_eager_attention(family, batch, loaded: Loader):
    """The rows `attention_rows` gives on an sdpa model (GQA, left padding, sliding window) are eager's weights."""
    eager_model, processor = loaded(family, "eager")
    sdpa_model, _ = loaded(family, "sdpa")
    inputs = tiny_vlms.make_inputs(family, processor, batch=batch)
    with torch.no_grad():
        weights = eager_model(**inputs, output_attentions=True).attentions[K - 1]
    attention = sdpa_model.get_decoder().layers[K - 1].self_attn
    capture = AttentionCapture(attention, keys=False, last_row_attention=False, query_rows=True)
    try:
        with torch.no_grad():
            sdpa_model(**inputs)
        for row in range(batch):
            valid = inputs["attention_mask"][row].bool().nonzero().squeeze(1)
            queries = valid[torch.tensor([0, 5, valid.numel() // 2, valid.numel() - 3, valid.numel() - 1])]
            got = capture.attention_rows(row, queries)
            torch.testing.assert_close(got, weights[row][:, queries].float(), rtol=0, atol=1e-5)
    finally:
        capture.remove()
    assert attention.config._attn_implementation == "sdpa"  # only while captured, and one module only
    assert all(layer.self_attn.config._attn_implementation == "sdpa" for layer in sdpa_model.get_decoder().layers)


def test_only_the_stage_layers_attention_is_wrapped(loaded: Loader):
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor)
    layers = model.get_decoder().layers
    with tuner.apply_pruning(model, SCHEDULE), torch.no_grad():
        wrapped = [i for i, layer in enumerate(layers) if hasattr(layer.self_attn, "_dart_tuner_capture")]
        model(**inputs)
    assert wrapped == [0, 2]  # K - 1 of each stage; every other layer keeps sdpa


@pytest.mark.parametrize("attn", ("sdpa", "eager"))
def test_keep_ratio_one_leaves_the_model_unchanged(attn, loaded: Loader):
    model, processor = loaded("llava", attn)
    inputs = tiny_vlms.make_inputs("llava", processor, batch=2)
    ref_tokens, ref_logits, _ = tiny_vlms.greedy(model, inputs, 4)
    cfg = tuner.PruningConfig(method="sparsevlm", layer=1, keep_ratio=1.0, stages=(Stage(3, keep_ratio=1.0),))
    with tuner.apply_pruning(model, cfg) as handle:
        tokens, logits, _ = tiny_vlms.greedy(model, inputs, 4)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL)
    assert handle.requests[0].n_kept_vision == handle.requests[0].n_vision


def test_every_stage_keeps_exactly_its_budget(loaded: Loader):
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor, batch=2)
    with tuner.apply_pruning(model, SCHEDULE) as handle, torch.no_grad():
        model(**inputs)
    stats = handle.requests[0]
    first = [round(0.5 * n) for n in stats.n_vision]
    assert stats.stage_kept_vision == [first, [round(0.4 * n) for n in first]]
    no_recycling = tuner.PruningConfig(**{**SCHEDULE.to_dict(), "options": {"recycle": False}})
    with tuner.apply_pruning(model, no_recycling) as plain, torch.no_grad():
        model(**inputs)
    assert plain.requests[0].stage_kept_vision == stats.stage_kept_vision


def test_the_merged_states_reach_the_model(loaded: Loader):
    """The same kept positions with and without the merged states: the logits differ."""
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor, batch=2)
    cfg = tuner.PruningConfig(method="test_sparsevlm_replay", layer=2, keep_ratio=0.3)
    with tuner.apply_pruning(model, cfg) as handle, torch.no_grad():
        merged = model(**inputs).logits[:, -1]
        selection = handle.method.replay
        assert selection.new_states is not None
        handle.method.replay = Selection(selection.kept_vision, None)
        plain = model(**inputs).logits[:, -1]
    assert (merged - plain).abs().max() > 1e-3


@pytest.mark.parametrize("attn", ("sdpa", "eager"))
@pytest.mark.parametrize("cfg", [SCHEDULE, tuner.PruningConfig(method="sparsevlm", layer=2,
                                                               options={"rank_scale": 0.5})], ids=("budget", "rank"))
def test_left_padded_batch_equals_rows_alone(attn, cfg, loaded: Loader):
    model, processor = loaded("llava", attn)
    inputs = tiny_vlms.make_inputs("llava", processor, batch=2)
    vision = vision_of(model, inputs)
    with tuner.apply_pruning(model, cfg) as handle:
        batch_tokens, batch_logits, _ = tiny_vlms.greedy(model, inputs, 4)
    for row in range(2):
        alone = tiny_vlms.row_inputs("llava", inputs, row)
        with tuner.apply_pruning(model, cfg) as row_handle:
            tokens, logits, _ = tiny_vlms.greedy(model, alone, 4)
        padding = int((inputs["attention_mask"][row] == 0).sum())
        kept = handle.last_kept[row]
        row_kept = row_handle.last_kept[0]
        assert torch.equal(kept[vision[row, kept]] - padding, row_kept[vision_of(model, alone)[0, row_kept]])
        assert handle.requests[0].stage_kept_vision[-1][row] == row_handle.requests[0].stage_kept_vision[-1][0]
        assert torch.equal(tokens[0], batch_tokens[row])
        torch.testing.assert_close(logits[0], batch_logits[row], rtol=0, atol=ATOL)


@register_method("test_sparsevlm_replay")
class ReplayedSparseVLM(SparseVLM):
    """Test-only: SparseVLM's first selection (positions and merged states), replayed on every later prefill, so a
    no-cache recomputation of prompt + generated tokens prunes exactly as the cached prefill did."""

    def select(self, ctx: SelectionContext) -> Selection:
        if not hasattr(self, "replay"):
            self.replay = super().select(ctx)
        return self.replay


def test_generate_with_cache_equals_no_cache_recomputation(loaded: Loader):
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor)
    cfg = tuner.PruningConfig(**{**SCHEDULE.to_dict(), "method": "test_sparsevlm_replay"})
    with tuner.apply_pruning(model, cfg) as handle:
        tokens, cached_logits, _ = tiny_vlms.greedy(model, inputs, 4)
        assert handle.method.replay.new_states is not None  # merged tokens are in the cache
        tiny_vlms.assert_cached_decode_equals_recompute(model, inputs, tokens, cached_logits, ATOL)
