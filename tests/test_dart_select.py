"""Independent tests of ``tuner.pruning.dart.dart_select`` and ``reference_quota``.

Spec: ``docs/design/DART.md`` §2 (selection) and §3 (function contract); background in
``research/dart_reference.md`` §2, §3, §11, §13.

Three parts:

1. An independent oracle (``oracle_row``): a literal, batch-1, plain-Python/float64
   restatement of the official DART ``get_retained_image_token``, compared with
   ``dart_select`` on many seeded random batches (offsets, left padding, several vision
   runs, GQA-repeated keys, float32/bfloat16/float64, quota and budget modes, few text
   tokens, pools running dry).  The oracle also reports the smallest decision margin of a
   case so that near-ties (where float32 and float64 may legitimately disagree) are
   skipped instead of compared.
2. Hand-worked cases with literal expected indices.
3. ``reference_quota`` against the counts that the reference code produces, and input
   validation.
4. The ``dart`` method's ``hidden_*`` pivot metrics: pivots ranked on the hidden states entering
   layer K, so no keys are needed (what pruning before layer 0 has).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from tuner.pruning.dart import dart_select, reference_quota

# ---------------------------------------------------------------------------------------
# Part 1: the oracle
# ---------------------------------------------------------------------------------------


def _l1(vec):
    return sum(abs(float(x)) for x in vec)


def _cosine(a, b):
    dot = 0.0
    na = 0.0
    nb = 0.0
    for x, y in zip(a, b):
        x = float(x)
        y = float(y)
        dot += x * y
        na += x * x
        nb += y * y
    return dot / (math.sqrt(na) * math.sqrt(nb))


def _visit_order(image_pivots, text_pivots, pivot_order):
    if pivot_order == "reference":
        # The reference: `indices_set = set(image_indices + query_indices)` and
        # `for item in list(indices_set)`, positions as Python ints, each list best-first.
        return list(set(image_pivots + text_pivots))
    if pivot_order == "rank":
        return list(image_pivots) + list(text_pivots)
    if pivot_order == "position":
        return sorted(image_pivots + text_pivots)
    raise AssertionError(pivot_order)


def oracle_row(
    norm_states,
    key_states,
    vision,
    *,
    quota=None,
    budget=None,
    n_image_pivots=4,
    n_text_pivots=4,
    attention=None,
    pivot_order="reference",
):
    """DART selection for ONE sequence, plain Python, float64.

    norm_states: N lists of D floats; key_states: N lists of F floats; vision: N bools;
    attention: N ints (0 = padding) or None.  Returns ``(kept, margin)``: the kept vision
    positions (ascending, in the coordinates of the given row) and the smallest margin of
    any ranking decision taken (relative gap for key scores, absolute gap for cosines).

    Padding tokens are removed first, so the selection (and the Python-set visiting order,
    which depends on the integer positions) is exactly that of the row run on its own
    without padding; the result is mapped back to the padded coordinates.
    """
    assert (quota is None) != (budget is None)
    n = len(vision)
    real = [i for i in range(n) if attention is None or attention[i]]
    norm = [norm_states[i] for i in real]
    keys = [key_states[i] for i in real]
    vis_flags = [bool(vision[i]) for i in real]
    m = len(real)
    margin = math.inf

    vis = [c for c in range(m) if vis_flags[c]]
    if not vis:
        return [], margin

    # Step 1: L1 norm of the (flattened) key vector.
    score = [_l1(keys[c]) for c in range(m)]

    def top(cands, k):
        nonlocal margin
        ranked = sorted(cands, key=lambda c: (-score[c], c))  # best first, ties -> lower pos
        head = ranked[: k + 1]
        if k > 0:
            for a, b in zip(head, head[1:]):
                gap = (score[a] - score[b]) / max(abs(score[a]), 1e-300)
                margin = min(margin, gap)
        return ranked[:k]

    # Step 2: image pivots over all vision tokens of the row (one pool), text pivots over
    # the non-padding tokens after the LAST vision token.
    image_pivots = top(vis, n_image_pivots)
    last_vision = max(vis)
    text_pivots = top(list(range(last_vision + 1, m)), n_text_pivots)

    if budget is not None and budget <= n_image_pivots:
        kept = sorted(image_pivots[:budget])
        return [real[c] for c in kept], margin

    # Step 3: candidates.  Step 4: visiting order.
    candidates = [c for c in vis if c not in image_pivots]
    order = _visit_order(image_pivots, text_pivots, pivot_order)
    if quota is not None:
        quotas = [quota] * len(order)
    else:
        picks = budget - len(image_pivots)
        base, extra = divmod(picks, len(order))
        quotas = [base + (1 if i < extra else 0) for i in range(len(order))]

    # Step 5: each pivot takes its quota of the least cosine-similar remaining candidates.
    picked = []
    for pivot, q in zip(order, quotas):
        if q <= 0 or not candidates:
            continue
        sims = sorted((_cosine(norm[pivot], norm[c]), c) for c in candidates)
        take = min(q, len(sims))
        if take < len(sims):
            margin = min(margin, sims[take][0] - sims[take - 1][0])
        chosen = [c for _, c in sims[:take]]
        picked.extend(chosen)
        chosen_set = set(chosen)
        candidates = [c for c in candidates if c not in chosen_set]

    # Step 6: kept vision = image pivots + picks.
    kept = sorted(image_pivots + picked)
    return [real[c] for c in kept], margin


def call(norm, keys, vmask, **kw):
    """Run dart_select and check the shape of its answer; return plain lists."""
    out = dart_select(norm, keys, vmask, **kw)
    assert isinstance(out, list), type(out)
    assert len(out) == norm.shape[0]
    rows = []
    for t in out:
        assert isinstance(t, torch.Tensor)
        assert t.dtype == torch.long, t.dtype
        assert t.dim() == 1
        lst = t.tolist()
        assert lst == sorted(lst), "kept positions must be ascending"
        assert len(set(lst)) == len(lst), "duplicate positions"
        rows.append(lst)
    return rows


# --- random batches ---------------------------------------------------------------------


def _row_layout(rng, max_runs=3):
    """A row as a string of kinds: 't' text, 'v' vision."""
    kinds = ["t"] * rng.randint(0, 5)
    runs = rng.randint(1, max_runs)
    for r in range(runs):
        if r:
            kinds += ["t"] * rng.randint(1, 3)
        kinds += ["v"] * rng.randint(1, 14)
    kinds += ["t"] * rng.choice([0, 1, 2, 3, 5, 7, 9])
    return kinds


def make_batch(seed, *, batch=3, dtype=torch.float32, d=12, kv_heads=2, head_dim=4, rep=1,
               layouts=None, pad_with_text=False):
    """Random left-padded batch.  Returns (norm, keys, vision_mask, attention_mask).

    With ``pad_with_text`` the rows are filled up on the left with ordinary text tokens
    instead of padding (attention_mask all ones)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    if layouts is None:
        layouts = [_row_layout(rng) for _ in range(batch)]
    n = max(len(k) for k in layouts)
    b = len(layouts)
    vmask = torch.zeros(b, n, dtype=torch.bool)
    amask = torch.zeros(b, n, dtype=torch.long)
    for r, kinds in enumerate(layouts):
        pad = n - len(kinds)
        amask[r, 0 if pad_with_text else pad:] = 1
        for j, k in enumerate(kinds):
            vmask[r, pad + j] = k == "v"
    norm = torch.randn(b, n, d, generator=gen, dtype=torch.float64)
    keys = torch.randn(b, n, kv_heads, head_dim, generator=gen, dtype=torch.float64)
    # padding slots get huge values: they must never matter
    keys[amask == 0] *= 50.0
    keys = keys.repeat_interleave(rep, dim=2).reshape(b, n, kv_heads * rep * head_dim)
    return norm.to(dtype), keys.to(dtype), vmask, amask


def _oracle_batch(norm, keys, vmask, amask, budgets=None, **kw):
    res = []
    for r in range(norm.shape[0]):
        if budgets is not None:
            kw["budget"] = budgets[r]
        res.append(
            oracle_row(
                norm[r].double().tolist(),
                keys[r].double().tolist(),
                vmask[r].tolist(),
                attention=None if amask is None else amask[r].tolist(),
                **kw,
            )
        )
    return res


TOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 1e-3}
PIVOT_SPLITS = [(4, 4), (1, 1), (2, 3), (3, 1), (5, 2)]


def _compare_random(seed, dtype, mode, pivot_order="reference", padding=True):
    rng = random.Random(10_000 + seed)
    n_img, n_txt = PIVOT_SPLITS[seed % len(PIVOT_SPLITS)]
    rep = rng.choice([1, 2, 4])  # GQA-like repeated KV heads
    norm, keys, vmask, amask = make_batch(seed, dtype=dtype, rep=rep, pad_with_text=not padding)
    kw = dict(n_image_pivots=n_img, n_text_pivots=n_txt, pivot_order=pivot_order)
    budgets = None
    if mode == "quota":
        q = rng.choice([0, 1, 2, 3, 5, 8, 40])  # 40: every pool runs dry
        kw_impl = dict(kw, quota=q)
        kw_oracle = dict(kw, quota=q)
    else:
        n_vis = vmask.sum(1).tolist()
        budgets = [rng.randint(1, v + 3) for v in n_vis]  # may exceed the pool
        if rng.random() < 0.3:
            budgets = [budgets[0]] * len(budgets)
            kw_impl = dict(kw, budget=budgets[0])
        else:
            kw_impl = dict(kw, budget=list(budgets))
        kw_oracle = dict(kw)
    got = call(norm, keys, vmask, attention_mask=amask, **kw_impl)
    want = _oracle_batch(norm, keys, vmask, amask, budgets=budgets, **kw_oracle)
    compared = 0
    for r, ((exp, margin), g) in enumerate(zip(want, got)):
        # the kept count never depends on near-ties
        assert len(g) == len(exp), (seed, r, len(g), len(exp))
        if margin < TOL[dtype]:
            continue
        assert g == exp, f"seed={seed} row={r} mode={mode} {kw_impl}\n got={g}\nwant={exp}"
        compared += 1
    return compared, norm.shape[0]


@pytest.mark.parametrize("padding", [True, False], ids=["left_pad", "no_pad"])
@pytest.mark.parametrize("mode", ["quota", "budget"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=["fp32", "bf16", "fp64"])
def test_random_batches_match_oracle(dtype, mode, padding):
    """Each row of a random batch equals the oracle run on that row alone.

    ``no_pad`` fills short rows on the left with real text tokens, so every row has the
    same length and no padding; ``left_pad`` uses padding (attention_mask 0)."""
    compared = total = 0
    for seed in range(30):
        c, t = _compare_random(seed, dtype, mode, padding=padding)
        compared += c
        total += t
    assert compared >= 0.85 * total, (compared, total)


def test_rows_equal_the_row_run_alone():
    """Batch with left padding == each row without padding at batch 1 (shifted back)."""
    for seed in range(40):
        norm, keys, vmask, amask = make_batch(100 + seed, batch=4)
        q = [1, 2, 3, 6][seed % 4]
        got = call(norm, keys, vmask, attention_mask=amask, quota=q)
        for r in range(norm.shape[0]):
            pad = int((amask[r] == 0).sum())
            alone = call(norm[r:r + 1, pad:], keys[r:r + 1, pad:], vmask[r:r + 1, pad:], quota=q)[0]
            assert got[r] == [p + pad for p in alone], (seed, r)
        budget = [int(v) // 2 + 1 for v in vmask.sum(1)]
        got = call(norm, keys, vmask, attention_mask=amask, budget=budget)
        for r in range(norm.shape[0]):
            pad = int((amask[r] == 0).sum())
            alone = call(norm[r:r + 1, pad:], keys[r:r + 1, pad:], vmask[r:r + 1, pad:],
                         budget=budget[r])[0]
            assert got[r] == [p + pad for p in alone], (seed, r)


def test_repeated_kv_heads_do_not_change_selection():
    for seed in range(10):
        norm, keys, vmask, amask = make_batch(200 + seed, rep=1, kv_heads=2, head_dim=4)
        b, n, _ = keys.shape
        rep4 = keys.view(b, n, 2, 4).repeat_interleave(4, dim=2).reshape(b, n, 32)
        a = call(norm, keys, vmask, attention_mask=amask, quota=3)
        c = call(norm, rep4, vmask, attention_mask=amask, quota=3)
        assert a == c


def test_position_order_option_matches_oracle():
    for seed in range(10):
        _compare_random(300 + seed, torch.float32, "quota", pivot_order="position")


@pytest.mark.parametrize("n_img,n_txt", [(3, 0), (0, 3)])
def test_zero_pivots_of_one_kind(n_img, n_txt):
    """Image-only or text-only pivots (paper Fig. 7 ablation) follow the same rules."""
    # (a row without text after its image has no pivot at all for (0, 3): it keeps nothing)
    norm, keys, vmask, amask = make_batch(400, batch=3, pad_with_text=True)
    got = call(norm, keys, vmask, attention_mask=amask, quota=2, n_image_pivots=n_img, n_text_pivots=n_txt)
    want = _oracle_batch(norm, keys, vmask, amask, quota=2,
                         n_image_pivots=n_img, n_text_pivots=n_txt)
    for (exp, margin), g in zip(want, got):
        if margin >= 1e-4:
            assert g == exp


def test_oracle_catches_wrong_visiting_order():
    """Sensitivity control: rank order disagrees with the reference on random data."""
    differ = 0
    for seed in range(20):
        norm, keys, vmask, amask = make_batch(500 + seed, batch=1,
                                              layouts=[["t"] * 3 + ["v"] * 40 + ["t"] * 6])
        ref = _oracle_batch(norm, keys, vmask, amask, quota=3)[0][0]
        rank = _oracle_batch(norm, keys, vmask, amask, quota=3, pivot_order="rank")[0][0]
        differ += ref != rank
        assert call(norm, keys, vmask, attention_mask=amask, quota=3)[0] == ref
    assert differ >= 10


def test_row_without_vision_tokens_returns_empty():
    norm, keys, vmask, amask = make_batch(600, batch=2)
    vmask[1] = False
    got = call(norm, keys, vmask, attention_mask=amask, quota=2)
    assert got[1] == []
    got = call(norm, keys, vmask, attention_mask=amask, budget=5)
    assert got[1] == []


def test_inputs_are_not_modified():
    norm, keys, vmask, amask = make_batch(601, batch=2)
    copies = [t.clone() for t in (norm, keys, vmask, amask)]
    call(norm, keys, vmask, attention_mask=amask, quota=2)
    call(norm, keys, vmask, attention_mask=amask, budget=[3, 4])
    for a, b in zip((norm, keys, vmask, amask), copies):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# Part 2: hand-worked cases
# ---------------------------------------------------------------------------------------
#
# Base row, N = 10, 1 image pivot + 1 text pivot:
#
#   pos   0      1       2      3      4      5      6      7      8      9
#   kind  text   text    text   vis    vis    vis    vis    vis    text   text
#   norm  (1,1)  (-1,0)  (1,1)  X      Y      Z      W      A      (1,1)  T
#         X=(-1,-1) Y=(2,-1) Z=(-1,2) W=(1,1) A=(1,0) T=(0,1)
#   key   L1:    1  100   1      1      2      3      8      10     2      5
#
# Key vectors (F = 3): pos 6 = (0,0,8): L1 8, L2 8; pos 7 = (4,-3,3): L1 10, L2 5.83,
# signed sum 4.  So the image pivot is 7 by L1 (an L2, max-abs or signed-sum ranking would
# pick 6).  Text pivot: among the tokens after the last vision token (8: 2, 9: 5) -> 9;
# token 1 has score 100 but lies BEFORE the image, so it must not be a pivot.
#
# Cosines of the candidates 3..6 with the pivots:
#         X(3)    Y(4)    Z(5)    W(6)
#   A=7  -0.707  +0.894  -0.447  +0.707      (cos with (1,0) = x / |v|)
#   T=9  -0.707  -0.447  +0.894  +0.707      (cos with (0,1) = y / |v|)
#
# Visiting order: list({7, 9}) == [9, 7]  (9 % 8 = 1 comes before 7 % 8 = 7).
# quota 1, reference order [9, 7]: T takes X=3; A takes the least similar of {4,5,6}: Z=5
#   -> kept [3, 5, 7].
# quota 1, rank order [7, 9]: A takes X=3; T takes the least similar of {4,5,6}: Y=4
#   -> kept [3, 4, 7].
# quota 1 if token 1 (norm (-1,0), cos = -cos with A: X +.707, Y -.894, Z +.447, W -.707)
#   were the text pivot: list({7, 1}) == [1, 7]: 1 takes Y=4, A takes X=3 -> [3, 4, 7].

X, Y, Z, W, A, T = (-1.0, -1.0), (2.0, -1.0), (-1.0, 2.0), (1.0, 1.0), (1.0, 0.0), (0.0, 1.0)
ONE = (1.0, 1.0)
BASE_NORM = [ONE, (-1.0, 0.0), ONE, X, Y, Z, W, A, ONE, T]
BASE_KEYS = [
    (1.0, 0.0, 0.0), (0.0, 100.0, 0.0), (0.0, 0.0, 1.0),
    (1.0, 0.0, 0.0), (0.0, 2.0, 0.0), (0.0, 0.0, -3.0), (0.0, 0.0, 8.0), (4.0, -3.0, 3.0),
    (2.0, 0.0, 0.0), (0.0, -5.0, 0.0),
]
BASE_KINDS = "tttvvvvvtt"


def _tensors(norm_rows, key_rows, kinds, pad=0, dtype=torch.float32):
    d = len(norm_rows[0])
    f = len(key_rows[0])
    norm = torch.tensor([[0.5] * d] * pad + [list(v) for v in norm_rows], dtype=dtype)
    keys = torch.tensor([[9.0] * f] * pad + [list(v) for v in key_rows], dtype=dtype)
    vmask = torch.tensor([False] * pad + [k == "v" for k in kinds])
    amask = torch.tensor([0] * pad + [1] * len(kinds))
    return norm[None], keys[None], vmask[None], amask[None]


def _base(pad=0):
    return _tensors(BASE_NORM, BASE_KEYS, BASE_KINDS, pad=pad)


def _sel(tensors, **kw):
    norm, keys, vmask, amask = tensors
    kw.setdefault("n_image_pivots", 1)
    kw.setdefault("n_text_pivots", 1)
    return call(norm, keys, vmask, attention_mask=amask, **kw)[0]


def _oracle_sel(tensors, **kw):
    norm, keys, vmask, amask = tensors
    kw.setdefault("n_image_pivots", 1)
    kw.setdefault("n_text_pivots", 1)
    return _oracle_batch(norm, keys, vmask, amask, **kw)[0][0]


def test_hand_python_set_order_facts():
    # Facts the hand cases rely on (evaluated, not assumed).
    assert list({7, 9}) == [9, 7]
    assert list({7, 1}) == [1, 7]
    assert list({10, 12}) == [10, 12]
    assert list({7, 4}) == [4, 7]


def test_hand_a_image_pivot_by_l1_of_keys():
    # quota 0: only the image pivot is kept -> it is 7 (L1 10), not 6 (L2 8 > 5.83).
    assert _sel(_base(), quota=0) == [7]
    assert _oracle_sel(_base(), quota=0) == [7]
    # budget 1 keeps the single best image pivot.
    assert _sel(_base(), budget=1) == [7]
    # two image pivots, quota 0: the two best by L1 are 7 (10) and 6 (8).
    assert _sel(_base(), quota=0, n_image_pivots=2) == [6, 7]
    # budget 1 with two image pivots: the best one only.
    assert _sel(_base(), budget=1, n_image_pivots=2) == [7]
    # bf16 input gives the same (all values exactly representable)
    norm, keys, vmask, amask = _base()
    assert call(norm.bfloat16(), keys.bfloat16(), vmask, attention_mask=amask, quota=1,
                n_image_pivots=1, n_text_pivots=1)[0] == [3, 5, 7]


def test_hand_b_text_pivot_only_after_last_vision_token():
    # See the table above: text pivot 9 -> [3, 5, 7]; token 1 (score 100, before the
    # image) as text pivot would give [3, 4, 7].
    assert _oracle_sel(_base(), quota=1) == [3, 5, 7]
    assert _sel(_base(), quota=1) == [3, 5, 7]
    # Also without attention_mask.
    norm, keys, vmask, _ = _base()
    assert call(norm, keys, vmask, quota=1, n_image_pivots=1, n_text_pivots=1)[0] == [3, 5, 7]


def test_hand_b_multi_image_one_pool_and_tokens_between_images_ignored():
    # N = 11:
    #   pos   0    1      2  3  | 4      | 5  6  7  | 8    9
    #   kind  t    t      v  v  | t      | v  v  v  | t    t
    #   norm  1,1  -1,0   X  Y  | -1,0   | Z  W  A  | 1,1  T
    #   L1    1    100    1  2  | 50     | 3  8  10 | 2    5
    # All five vision tokens form one pool: image pivot 7 (L1 10).  Text pivot: only 8, 9
    # are after the LAST vision token -> 9 (token 4 between the images, score 50, and
    # token 1, score 100, are not eligible).  list({7, 9}) == [9, 7]:
    #   T takes X=2 (cos -.707); A takes, of {3 (Y +.894), 5 (Z -.447), 6 (W +.707)}, 5.
    #   -> [2, 5, 7].
    # Were token 4 (-1,0) the text pivot: list({7, 4}) == [4, 7]: 4 takes Y=3 (-.894),
    #   A takes X=2 -> [2, 3, 7].
    norm = [ONE, (-1.0, 0.0), X, Y, (-1.0, 0.0), Z, W, A, ONE, T]
    keys = [(1.0, 0.0, 0.0), (0.0, 100.0, 0.0), (1.0, 0.0, 0.0), (0.0, 2.0, 0.0),
            (50.0, 0.0, 0.0), (0.0, 0.0, -3.0), (0.0, 0.0, 8.0), (4.0, -3.0, 3.0),
            (2.0, 0.0, 0.0), (0.0, -5.0, 0.0)]
    kinds = "ttvvtvvvtt"
    t = _tensors(norm, keys, kinds)
    assert _oracle_sel(t, quota=1) == [2, 5, 7]
    assert _sel(t, quota=1) == [2, 5, 7]


def test_hand_c_visiting_order_reference_vs_rank():
    # reference visits [9, 7] -> [3, 5, 7]; rank (score order, image pivots first; the
    # image pivot also has the higher score, 10 > 5) visits [7, 9] -> [3, 4, 7].
    assert _oracle_sel(_base(), quota=1, pivot_order="reference") == [3, 5, 7]
    assert _oracle_sel(_base(), quota=1, pivot_order="rank") == [3, 4, 7]
    assert _sel(_base(), quota=1) == [3, 5, 7]  # default is "reference"
    assert _sel(_base(), quota=1, pivot_order="reference") == [3, 5, 7]
    assert _sel(_base(), quota=1, pivot_order="rank") == [3, 4, 7]


def test_hand_c_position_order():
    # position order visits [7, 9] like rank here -> [3, 4, 7].
    assert _sel(_base(), quota=1, pivot_order="position") == [3, 4, 7]


def test_hand_d_quota_count():
    # quota mode keeps n_img + (n_img + n_txt) * q vision tokens when the pool suffices.
    # Row: 3 text, 60 vision, 6 text; 4 + 4 pivots.
    layouts = [["t"] * 3 + ["v"] * 60 + ["t"] * 6]
    norm, keys, vmask, amask = make_batch(700, layouts=layouts)
    for q in range(0, 8):
        got = call(norm, keys, vmask, attention_mask=amask, quota=q)[0]
        assert len(got) == 4 + 8 * q
        assert all(vmask[0, p] for p in got)
    # Only 2 text tokens after the image -> 2 text pivots: 4 + 6 * q.
    layouts = [["t"] * 3 + ["v"] * 60 + ["t"] * 2]
    norm, keys, vmask, amask = make_batch(701, layouts=layouts)
    for q in (1, 5, 9):
        assert len(call(norm, keys, vmask, attention_mask=amask, quota=q)[0]) == 4 + 6 * q
    # No text after the image -> image pivots only: 4 + 4 * q.
    layouts = [["t"] * 3 + ["v"] * 60]
    norm, keys, vmask, amask = make_batch(702, layouts=layouts)
    for q in (1, 5, 9):
        assert len(call(norm, keys, vmask, attention_mask=amask, quota=q)[0]) == 4 + 4 * q
    # The base hand row: 1 + 2 * q, capped by the 5 vision tokens.
    assert _sel(_base(), quota=2) == [3, 4, 5, 6, 7]  # T: X, Y; A: Z, W


def test_hand_e_budget_exact_counts():
    # Base row, 1 + 1 pivots, visiting order [9 (T), 7 (A)].
    # budget 1 <= n_image_pivots: the best image pivot.
    assert _sel(_base(), budget=1) == [7]
    # budget 2: picks 1 over P = 2 pivots: floor(1/2) = 0 each, the first visited (T) gets
    # one more: T takes X=3.
    assert _sel(_base(), budget=2) == [3, 7]
    # budget 3: picks 2 -> 1 each = quota 1.
    assert _sel(_base(), budget=3) == [3, 5, 7]
    # budget 4: picks 3 -> T (first) 2, A 1: T takes X=3, Y=4; A takes Z=5 of {5, 6}.
    #   (If the extra went to the last pivot instead: T 3; A 5, 6 -> [3, 5, 6, 7].)
    assert _oracle_sel(_base(), budget=4) == [3, 4, 5, 7]
    assert _sel(_base(), budget=4) == [3, 4, 5, 7]
    # budget 5 = all vision tokens; budget 9 > pool: all, no crash.
    assert _sel(_base(), budget=5) == [3, 4, 5, 6, 7]
    assert _sel(_base(), budget=9) == [3, 4, 5, 6, 7]
    # two image pivots (7: L1 10, 6: L1 8): budget 1 -> [7]; budget 2 -> [6, 7].
    assert _sel(_base(), budget=1, n_image_pivots=2) == [7]
    assert _sel(_base(), budget=2, n_image_pivots=2) == [6, 7]
    # Exact counts on random data, 4 + 4 pivots, 60 vision tokens.
    layouts = [["t"] * 3 + ["v"] * 60 + ["t"] * 6, ["t"] * 1 + ["v"] * 37 + ["t"] * 2]
    norm, keys, vmask, amask = make_batch(703, layouts=layouts)
    for b in [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 17, 30, 37, 45, 59, 60]:
        got = call(norm, keys, vmask, attention_mask=amask, budget=b)
        assert [len(g) for g in got] == [b, min(b, 37)], b
    # per-row budgets
    got = call(norm, keys, vmask, attention_mask=amask, budget=[11, 3])
    assert [len(g) for g in got] == [11, 3]
    # budget <= n_image_pivots keeps the b best image pivots: the best-L1 vision tokens
    score = keys[0].abs().sum(-1).double()
    vis = torch.nonzero(vmask[0]).flatten().tolist()
    best = sorted(vis, key=lambda p: -float(score[p]))
    for b in (1, 2, 3, 4):
        assert call(norm[:1], keys[:1], vmask[:1], attention_mask=amask[:1],
                    budget=b)[0] == sorted(best[:b])


def test_hand_f_quota_larger_than_pool():
    # The reference would raise "selected index k out of range"; we take what is left.
    assert _sel(_base(), quota=3) == [3, 4, 5, 6, 7]
    assert _sel(_base(), quota=1000) == [3, 4, 5, 6, 7]
    layouts = [["t"] * 3 + ["v"] * 20 + ["t"] * 6, ["v"] * 3 + ["t"]]  # 3 < 4 image pivots
    norm, keys, vmask, amask = make_batch(704, layouts=layouts)
    got = call(norm, keys, vmask, attention_mask=amask, quota=50)
    assert got == [torch.nonzero(vmask[r]).flatten().tolist() for r in range(2)]
    got = call(norm, keys, vmask, attention_mask=amask, quota=0)
    assert [len(g) for g in got] == [4, 3]


def test_hand_g_left_padding_does_not_change_visiting_order():
    # The base row behind 3 padding slots: same tokens, positions + 3.  Run alone it keeps
    # [3, 5, 7]; in the padded row it must keep [6, 8, 10].  (Visiting the pivots by their
    # padded positions, list({10, 12}) == [10, 12], i.e. image pivot first, would give
    # the rank-order answer [6, 7, 10].)
    assert _oracle_sel(_base(pad=3), quota=1) == [6, 8, 10]
    assert _sel(_base(pad=3), quota=1) == [6, 8, 10]
    # In a batch next to an unpadded row of length 13.
    n0, k0, v0, a0 = _base(pad=3)
    norm2 = BASE_NORM[:3] + [X, Y, Z, W, A, T, ONE, ONE, ONE, ONE]
    keys2 = BASE_KEYS[:8] + [(0.0, -5.0, 0.0), (2.0, 0.0, 0.0), (1.0, 0.0, 0.0),
                             (0.0, 0.0, 1.0), (0.0, 0.0, 0.0)]
    # row 2: vision 3..7 as before, text pivot now at 8 (L1 5) with norm T.
    # list({7, 8}) == [8, 7]: T takes X=3, A takes Z=5 -> [3, 5, 7].
    assert list({7, 8}) == [8, 7]
    n1, k1, v1, a1 = _tensors(norm2, keys2, "tttvvvvvttttt")
    got = call(torch.cat([n0, n1]), torch.cat([k0, k1]), torch.cat([v0, v1]),
               attention_mask=torch.cat([a0, a1]), quota=1, n_image_pivots=1,
               n_text_pivots=1)
    assert got == [[6, 8, 10], [3, 5, 7]]


def test_hand_padding_after_the_image_is_not_a_text_pivot():
    # attention_mask 0 on token 8 of the base row, which gets norm (-1,0) and score 100:
    # the text pivot stays 9 -> [3, 5, 7].  (Token 8 as pivot: list({7, 8}) == [8, 7],
    # 8 takes Y=4, A takes X=3 -> [3, 4, 7].)
    norm = list(BASE_NORM)
    keys = list(BASE_KEYS)
    norm[8] = (-1.0, 0.0)
    keys[8] = (100.0, 0.0, 0.0)
    t = list(_tensors(norm, keys, BASE_KINDS))
    t[3] = t[3].clone()
    t[3][0, 8] = 0
    assert _oracle_sel(tuple(t), quota=1) == [3, 5, 7]
    assert _sel(tuple(t), quota=1) == [3, 5, 7]


# ---------------------------------------------------------------------------------------
# Part 3: reference_quota and validation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mnt,quota,kept", [(64, 8, 68), (128, 16, 132), (192, 24, 196)])
def test_reference_quota_llava15_max_num_trunction(mnt, quota, kept):
    q = reference_quota("llava15", 576, max_num_trunction=mnt)
    assert q == quota
    assert 4 + 8 * q == kept
    # keep_ratio is ignored whenever max_num_trunction is set
    assert reference_quota("llava15", 576, max_num_trunction=mnt, keep_ratio=0.5) == quota


def test_reference_quota_llava15_default_is_128():
    assert reference_quota("llava15", 576) == 16


@pytest.mark.parametrize("keep,quota,kept", [
    (0.111, 7, 60),   # B = int(576 * 0.111) = int(63.936) = 63, 63 // 8 = 7, 4 + 56 = 60
    (0.222, 15, 124),  # B = int(127.872) = 127, 127 // 8 = 15, 4 + 120 = 124
    (0.333, 23, 188),  # B = int(191.808) = 191, 191 // 8 = 23, 4 + 184 = 188
    (1 - 0.889, 7, 60), (1 - 0.778, 15, 124), (1 - 0.667, 23, 188),
])
def test_reference_quota_llava15_ratio(keep, quota, kept):
    q = reference_quota("llava15", 576, max_num_trunction=None, keep_ratio=keep)
    assert q == quota
    assert 4 + 8 * q == kept


def test_reference_quota_llava15_other_pivot_counts():
    # P = 2 + 2: 128 // 4 = 32;  P = 4 + 2: 128 // 6 = 21
    assert reference_quota("llava15", 576, n_image_pivots=2, n_text_pivots=2) == 32
    assert reference_quota("llava15", 576, n_image_pivots=4, n_text_pivots=2) == 21


def test_reference_quota_llava_next():
    # min(320, 2880 - 4) // 8 = 40 -> 4 + 8 * 40 = 324 kept
    assert reference_quota("llava_next", 2880) == 40
    # CLI ratio and max_num_trunction are dead on this path
    assert reference_quota("llava_next", 2880, keep_ratio=0.5, max_num_trunction=64) == 40
    # small image: min(320, 296) // 8 = 37 -> 4 + 296 = 300 = everything
    assert reference_quota("llava_next", 300) == 37
    assert 4 + 8 * reference_quota("llava_next", 300) == 4 + 8 * (296 // 8) == 300
    assert reference_quota("llava_next", 2880, retain_tokens=640) == 80


def test_reference_quota_qwen():
    # int(1280 * 0.222 / 8) = int(35.52) = 35 -> 4 + 280 = 284 kept
    assert reference_quota("qwen", 1280, keep_ratio=0.222) == 35
    assert reference_quota("qwen", 1280, keep_ratio=1 - 0.778) == 35
    # max_num_trunction is ignored on the Qwen path
    assert reference_quota("qwen", 1280, keep_ratio=0.222, max_num_trunction=64) == 35
    # int(1280 * 0.333 / 8) = int(53.28) = 53; int(1280 * 0.111 / 8) = int(17.76) = 17
    assert reference_quota("qwen", 1280, keep_ratio=0.333) == 53
    assert reference_quota("qwen", 1280, keep_ratio=0.111) == 17


def test_reference_quota_bad_rule():
    with pytest.raises(ValueError):
        reference_quota("llava2", 576)


@pytest.mark.parametrize("rule,n,kw,kept", [
    ("llava15", 576, dict(max_num_trunction=64), 68),
    ("llava15", 576, dict(max_num_trunction=128), 132),
    ("llava15", 576, dict(max_num_trunction=192), 196),
    ("llava15", 576, dict(max_num_trunction=None, keep_ratio=0.111), 60),
    ("llava15", 576, dict(max_num_trunction=None, keep_ratio=0.222), 124),
    ("llava15", 576, dict(max_num_trunction=None, keep_ratio=0.333), 188),
    ("qwen", 1280, dict(keep_ratio=0.222), 284),
    ("llava_next", 2880, dict(), 324),
    ("llava_next", 300, dict(), 300),
])
def test_end_to_end_reference_counts(rule, n, kw, kept):
    q = reference_quota(rule, n, **kw)
    layouts = [["t"] * 35 + ["v"] * n + ["t"] * 20]
    norm, keys, vmask, amask = make_batch(800 + n, layouts=layouts, d=16)
    got = call(norm, keys, vmask, attention_mask=amask, quota=q)[0]
    assert len(got) == kept
    assert all(35 <= p < 35 + n for p in got)


def test_end_to_end_576_matches_oracle():
    layouts = [["t"] * 35 + ["v"] * 576 + ["t"] * 20]
    norm, keys, vmask, amask = make_batch(900, layouts=layouts, d=16, kv_heads=4, head_dim=8,
                                          rep=2)
    q = reference_quota("llava15", 576)
    got = call(norm, keys, vmask, attention_mask=amask, quota=q)[0]
    exp, margin = _oracle_batch(norm, keys, vmask, amask, quota=q)[0]
    assert len(exp) == 132
    if margin >= 1e-4:
        assert got == exp


def _valid():
    norm, keys, vmask, amask = make_batch(1000, batch=2)
    return norm, keys, vmask, amask


def test_validation_quota_and_budget_exclusive():
    norm, keys, vmask, amask = _valid()
    with pytest.raises(ValueError):
        dart_select(norm, keys, vmask, quota=2, budget=5, attention_mask=amask)
    with pytest.raises(ValueError):
        dart_select(norm, keys, vmask, attention_mask=amask)


def test_validation_negative_budget():
    norm, keys, vmask, amask = _valid()
    with pytest.raises(ValueError):
        dart_select(norm, keys, vmask, budget=-1, attention_mask=amask)
    with pytest.raises(ValueError):
        dart_select(norm, keys, vmask, budget=[3, -2], attention_mask=amask)


def test_validation_negative_quota():
    norm, keys, vmask, amask = _valid()
    with pytest.raises(ValueError):
        dart_select(norm, keys, vmask, quota=-1, attention_mask=amask)


def test_validation_budget_list_length():
    norm, keys, vmask, amask = _valid()
    with pytest.raises(ValueError, match="budget"):
        dart_select(norm, keys, vmask, budget=[3, 4, 5], attention_mask=amask)


def test_validation_bad_pivot_order():
    norm, keys, vmask, amask = _valid()
    with pytest.raises(ValueError, match="pivot_order"):
        dart_select(norm, keys, vmask, quota=1, attention_mask=amask, pivot_order="bogus")


@pytest.mark.parametrize("which", ["norm_states", "key_states", "vision_mask",
                                   "attention_mask"])
def test_validation_shape_mismatch_names_argument(which):
    norm, keys, vmask, amask = _valid()
    args = dict(norm_states=norm, key_states=keys, vision_mask=vmask, attention_mask=amask)
    args[which] = args[which][:, :-1]  # one token short
    # norm_states vs key_states: either may be called the wrong one, but one must be named
    pattern = "norm_states|key_states" if which in ("norm_states", "key_states") else which
    with pytest.raises(ValueError, match=pattern):
        dart_select(args["norm_states"], args["key_states"], args["vision_mask"], quota=1,
                    attention_mask=args["attention_mask"])


@pytest.mark.parametrize("which", ["norm_states", "key_states"])
def test_validation_batch_mismatch_and_rank(which):
    norm, keys, vmask, amask = _valid()
    args = dict(norm_states=norm, key_states=keys)
    args[which] = args[which][:1]  # batch 1 vs 2
    with pytest.raises(ValueError, match="norm_states|key_states"):
        dart_select(args["norm_states"], args["key_states"], vmask, quota=1,
                    attention_mask=amask)
    args = dict(norm_states=norm, key_states=keys)
    args[which] = args[which][0]  # 2-D instead of 3-D
    with pytest.raises(ValueError, match=which):
        dart_select(args["norm_states"], args["key_states"], vmask, quota=1,
                    attention_mask=amask)


# ---------------------------------------------------------------------------------------
# Part 4: pivot metrics on the stage's input hidden states (no keys)
# ---------------------------------------------------------------------------------------


def _hidden_context(budget):
    """One row: a text token, four 2-D vision states, a text token; keys are absent."""
    from tuner.pruning.base import SelectionContext

    vision = torch.tensor([[1.0, 0.0], [0.0, -3.0], [2.0, 2.0], [0.0, 0.5]])
    states = torch.cat([torch.tensor([[5.0, 5.0]]), vision, torch.tensor([[-9.0, 1.0]])])[None]
    mask = torch.tensor([[False, True, True, True, True, False]])
    return SelectionContext(hidden_states=states, vision_mask=mask, attention_mask=torch.ones_like(mask),
                            input_ids=torch.zeros(1, 6, dtype=torch.long), budgets=[budget],
                            final_norm=torch.nn.Identity(), keys=None)


# Vision states v0 (1, 0), v1 (0, -3), v2 (2, 2), v3 (0, 0.5): L1 1, 3, 4, 0.5; L2 1, 3, 2.83, 0.5.
# One image pivot, no text pivot, budget 2: the pivot and the vision token least cosine-similar to it.
# hidden_l1: pivot v2 (45 deg); cos to v0, v1, v3 = 0.71, -0.71, 0.71 -> v1.
# hidden_l2: pivot v1 (-90 deg); cos to v0, v2, v3 = 0, -0.71, -1 -> v3.
# hidden_l1_min / hidden_l2_min: pivot v3 (90 deg); cos to v0, v1, v2 = 0, -1, 0.71 -> v1.
@pytest.mark.parametrize("metric, expected", [
    ("hidden_l1", [1, 2]), ("hidden_l2", [1, 3]), ("hidden_l1_min", [1, 3]), ("hidden_l2_min", [1, 3]),
])
def test_hidden_metrics_rank_pivots_on_the_input_states_without_keys(metric, expected):
    import tuner
    from tuner.pruning import get_method_class

    cfg = tuner.PruningConfig(method="dart", budget=2,
                              options={"n_image_pivots": 1, "n_text_pivots": 0, "pivot_metric": metric})
    method = get_method_class("dart")(cfg)
    assert method.needs.keys is False
    ctx = _hidden_context(2)
    (kept,) = method.select(ctx).kept_vision
    assert kept.tolist() == [1 + i for i in expected]
    (same,) = dart_select(ctx.hidden_states, ctx.hidden_states, ctx.vision_mask, budget=2, n_image_pivots=1,
                          n_text_pivots=0, pivot_metric=metric.removeprefix("hidden_"))
    assert torch.equal(kept, same)


def test_key_metrics_still_need_keys_and_bad_metrics_list_the_hidden_ones():
    import tuner
    from tuner.pruning import get_method_class

    for metric in ("l1", "l2", "l1_min", "l2_min"):
        cfg = tuner.PruningConfig(method="dart", budget=2, options={"pivot_metric": metric})
        assert get_method_class("dart")(cfg).needs.keys is True
    assert get_method_class("dart").needs.keys is True  # the class default is untouched by instances
    with pytest.raises(ValueError, match="pivot_metric.*hidden_l1.*hidden_l2_min"):
        tuner.PruningConfig(method="dart", budget=2, options={"pivot_metric": "hidden_l3"})


def test_hooked_hidden_metric_captures_nothing_and_selects_on_the_states_entering_layer_k(loaded):
    import tiny_vlms
    import tuner
    from tuner.models.compat import positions_from_mask
    from tuner.models.families import adapter_for

    layer = 2
    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor, batch=2)
    reference_inputs = dict(inputs)
    if adapter_for(model).positions_ignore_padding:  # the hooks number each row from its first real token
        reference_inputs["position_ids"] = positions_from_mask(inputs["attention_mask"], inputs["input_ids"].shape[1])
    _, hidden = tiny_vlms.unhooked_forward(model, reference_inputs, layer=layer)
    vision = (inputs["input_ids"] == model.config.image_token_id) & inputs["attention_mask"].bool()
    cfg = tuner.PruningConfig(method="dart", layer=layer, keep_ratio=0.3, options={"pivot_metric": "hidden_l1"})
    with torch.no_grad():
        expected = dart_select(model.get_decoder().norm(hidden), hidden, vision, pivot_metric="l1",
                               budget=[cfg.budget_for(int(n)) for n in vision.sum(1)],
                               attention_mask=inputs["attention_mask"])
    attention = model.get_decoder().layers[layer - 1].self_attn
    with tuner.apply_pruning(model, cfg) as handle, torch.no_grad():
        assert not hasattr(attention, "_dart_tuner_capture")  # no key capture: the layer keeps its sdpa path
        model(**inputs)
    for row in range(2):
        kept = handle.last_kept[row]
        assert torch.equal(kept[vision[row, kept]], expected[row])


def _dart_k0(**kwargs):
    import tuner

    kwargs.setdefault("keep_ratio", 0.3)
    return tuner.PruningConfig(method="dart", layer=0, options={"pivot_metric": "hidden_l1"}, **kwargs)


def test_hidden_metrics_run_at_k0_and_key_metrics_are_refused_there():
    import tuner

    assert _dart_k0().layer == 0
    with pytest.raises(ValueError, match="reads layer K-1's keys"):
        tuner.PruningConfig(method="dart", layer=0, keep_ratio=0.3, options={"pivot_metric": "l1"})


def test_k0_keep_ratio_one_equals_the_unhooked_model(loaded):
    import tiny_vlms
    import tuner

    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor, batch=2)
    ref_tokens, ref_logits, _ = tiny_vlms.greedy(model, inputs, 4)
    with tuner.apply_pruning(model, _dart_k0(keep_ratio=1.0)):
        tokens, logits, _ = tiny_vlms.greedy(model, inputs, 4)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)


def test_k0_left_padded_batch_equals_rows_alone_and_cached_decode_equals_recompute(loaded):
    """At K = 0 DART ranks pivots and measures duplication on the input embeddings (projected vision features).
    Generated tokens would join the text pivots of a no-cache recomputation, so it keeps the generate's set."""
    import tiny_vlms
    import tuner

    model, processor = loaded("llava", "sdpa")
    inputs = tiny_vlms.make_inputs("llava", processor, batch=2)
    vision = (inputs["input_ids"] == model.config.image_token_id) & inputs["attention_mask"].bool()
    with tuner.apply_pruning(model, _dart_k0()) as handle:
        batch_tokens, batch_logits, _ = tiny_vlms.greedy(model, inputs, 4)
    assert handle.requests[0].n_kept_vision == [round(0.3 * n) for n in handle.requests[0].n_vision]
    for row in range(2):
        alone = tiny_vlms.row_inputs("llava", inputs, row)
        alone_vision = alone["input_ids"] == model.config.image_token_id
        with tuner.apply_pruning(model, _dart_k0()) as row_handle:
            tokens, logits, _ = tiny_vlms.greedy(model, alone, 4)
        padding = int((inputs["attention_mask"][row] == 0).sum())
        batch_kept, row_kept = handle.last_kept[row], row_handle.last_kept[0]
        chosen = row_kept[alone_vision[0, row_kept]]
        assert torch.equal(batch_kept[vision[row, batch_kept]] - padding, chosen)
        assert torch.equal(tokens[0], batch_tokens[row])
        torch.testing.assert_close(logits[0], batch_logits[row], rtol=0, atol=1e-4)
        fixed = tuner.PruningConfig(method="test_fixed", layer=0, options={"positions": [chosen.tolist()]})
        with tuner.apply_pruning(model, fixed):
            tiny_vlms.assert_cached_decode_equals_recompute(model, alone, tokens, logits, 1e-4)
