"""`bench-pruning --shape/--device/--dtype`: the named shapes are the published models' text stacks (sizes checked
on the meta device, nothing built), bad values are one line naming them, and `.ci/gpu-bench --dry-run` runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from tuner.bench.shapes import SHAPES, build_prompt, get_shape
from tuner.cli import app

ROOT = Path(__file__).resolve().parent.parent

# Published parameter counts: Vicuna-7B v1.5 (Llama-2-7B's architecture) and Qwen2-7B's text stack, which
# Qwen2.5-VL-7B's language model shares.
PARAMETERS = {"llava-1.5-7b": 6_738_415_616, "llava-next-7b": 6_738_415_616, "qwen2.5-vl-7b": 7_615_616_512}
VISION = {"small": 576, "llava-1.5-7b": 576, "llava-next-7b": 2880, "qwen2.5-vl-7b": 36 * 36}


@pytest.mark.parametrize("name", list(PARAMETERS))
def test_the_7b_shapes_have_the_published_sizes(name):
    shape = get_shape(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape.config())
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]
    assert model.config.num_key_value_heads == (4 if name.startswith("qwen") else 32)
    assert shape.n_vision == VISION[name] and shape.n_tokens < model.config.max_position_embeddings


def test_every_prompt_holds_one_run_of_its_vision_tokens_and_default_budgets_are_ninths():
    assert list(SHAPES) == list(VISION)
    for shape in SHAPES.values():
        ids = build_prompt(shape, torch.device("cpu"))[0]
        vision = (ids == shape.vision_token_id).nonzero().squeeze(1)
        assert ids.numel() == shape.n_tokens and vision.numel() == shape.n_vision
        assert vision.tolist() == list(range(shape.text_before, shape.text_before + shape.n_vision))
        assert shape.budgets() == tuple(shape.n_vision * k // 9 for k in (1, 2, 3))
    assert get_shape("small").budgets() == (64, 128, 192) and get_shape("llava-next-7b").budgets()[0] == 320
    small = get_shape("small").config(hidden=64, layers=2)
    assert (small.hidden_size, small.num_hidden_layers, small.intermediate_size, small.num_attention_heads) == \
        (64, 2, 172, 1)  # the sizes `--hidden 64 --layers 2` always gave


@pytest.mark.parametrize("args, culprit", [
    (["--shape", "gpt-9"], "unknown --shape 'gpt-9'"),
    (["--dtype", "fp8"], "unknown --dtype 'fp8'"),
    (["--device", "tpu"], "unknown --device 'tpu'"),
    (["--attn-implementation", "paged"], "unknown --attn-implementation 'paged'"),
    pytest.param(["--device", "cuda"], "--device cuda: no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
])
def test_a_bad_shape_device_dtype_or_attention_is_one_line_naming_it(args, culprit):
    result = CliRunner().invoke(app, ["bench-pruning", "--hidden", "64", "--layers", "2", "--layer", "1",
                                      "--method", "random", "--budget", "8", *args])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0], result.output


def test_gpu_bench_dry_run_writes_one_json_of_cpu_rows(tmp_path):
    out = tmp_path / "dry.json"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / ".ci" / "gpu-bench"), "--dry-run", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["failed"] == {} and data["device"] == "cpu" and len(data["runs"]) == 1
    run = data["runs"][0]
    assert (run["shape"], run["device"], run["dtype"], run["attn_implementation"]) == ("small", "cpu", "float32",
                                                                                       "sdpa")
    rows = {row["name"]: row for row in run["rows"]}
    assert list(rows) == ["no hooks", "keep_all", "random 64", "divprune 64", "cdpruner 64"]
    for row in rows.values():
        assert {"name", "method", "budget", "kept_vision", "median_ms", "speedup", "bound", "select_ms"} <= set(row)
        assert (row["device"], row["dtype"], row["shape"]) == ("cpu", "float32", "small")
    assert rows["divprune 64"]["kept_vision"] == 64 and 0 < rows["cdpruner 64"]["select_ms"]


def test_gpu_bench_refuses_unknown_arguments():
    done = subprocess.run(["bash", str(ROOT / ".ci" / "gpu-bench"), "--nope"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr
