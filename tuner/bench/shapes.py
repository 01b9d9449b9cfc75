"""Named prompt shapes for `bench-pruning`: real models' text stacks (random weights) and their image prompts.

Each shape is a transformers config built from the model's published numbers, so nothing is downloaded, and a
prompt of the model's vision-token count between text tokens of its chat template. The text stack is the one
the hooks prune; the vision tower does not run (the vision tokens are placeholder embeddings). Qwen2.5-VL's
M-RoPE is replaced by 1-D RoPE: it moves positions, not cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel, Qwen2Config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True)
class BenchShape:
    """A text stack (architecture and sizes) and a prompt: `text_before` tokens, the vision run, `text_after`."""

    name: str
    about: str  # what it stands for, as the table title says it
    architecture: str  # "llama" or "qwen2"
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    n_vision: int
    text_before: int
    text_after: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_positions: int = 4096

    @property
    def n_tokens(self) -> int:
        return self.text_before + self.n_vision + self.text_after

    @property
    def vision_token_id(self) -> int:
        """The placeholder id of the vision tokens: the last id of the vocabulary, never a text token here."""
        return self.vocab - 1

    def budgets(self) -> tuple[int, ...]:
        """Default budgets: 1/9, 2/9 and 3/9 of the vision tokens (64, 128, 192 of 576; DART's 88.9% pruning)."""
        return tuple(self.n_vision * k // 9 for k in (1, 2, 3))

    def config(self, *, attn_implementation: str = "sdpa", hidden: int | None = None,
               layers: int | None = None) -> PretrainedConfig:
        """The transformers config of this text stack; `hidden` and `layers` override the sizes (smaller tests)."""
        hidden = hidden or self.hidden
        scale = hidden / self.hidden
        common = dict(hidden_size=hidden, intermediate_size=round(self.intermediate * scale),
                      num_hidden_layers=layers or self.layers, num_attention_heads=max(1, round(self.heads * scale)),
                      num_key_value_heads=max(1, round(self.kv_heads * scale)), vocab_size=self.vocab,
                      max_position_embeddings=self.max_positions, rms_norm_eps=self.rms_eps, pad_token_id=0,
                      rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                      tie_word_embeddings=False, attn_implementation=attn_implementation)
        return (LlamaConfig if self.architecture == "llama" else Qwen2Config)(**common)


VICUNA_7B = dict(architecture="llama", hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32,
                 vocab=32000)
SHAPES = {shape.name: shape for shape in (
    BenchShape("small", "Llama-shaped hidden 1024, LLaVA-1.5's proportions at a CPU size", "llama", hidden=1024,
               intermediate=2752, layers=8, heads=16, kv_heads=16, vocab=32000, n_vision=576, text_before=6,
               text_after=34),
    BenchShape("llava-1.5-7b", "LLaVA-1.5-7B's Vicuna-7B, one 336 px image", n_vision=576, text_before=35,
               text_after=30, **VICUNA_7B),
    BenchShape("llava-next-7b", "LLaVA-NeXT-7B's Vicuna-7B, anyres at its 2,880-token maximum", n_vision=2880,
               text_before=35, text_after=30, **VICUNA_7B),
    BenchShape("qwen2.5-vl-7b", "Qwen2.5-VL-7B's text stack, one 1008 x 1008 px image (36 x 36 merged patches)",
               "qwen2", hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064,
               n_vision=1296, text_before=20, text_after=30, rope_theta=1e6, rms_eps=1e-6, max_positions=128000),
)}


def get_shape(name: str) -> BenchShape:
    """The named shape, or a one-line ValueError listing the known ones."""
    if name not in SHAPES:
        raise ValueError(f"unknown --shape {name!r}; known: {', '.join(SHAPES)}")
    return SHAPES[name]


def resolve_device(name: str) -> torch.device:
    """`cpu`, `cuda` or `cuda:N`, checked against this machine (a one-line ValueError naming the device)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown --device {name!r}; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    """float32, bfloat16 or float16 (a one-line ValueError naming anything else)."""
    if name not in DTYPES:
        raise ValueError(f"unknown --dtype {name!r}; use {', '.join(DTYPES)}")
    return DTYPES[name]


def build_text_stack(shape: BenchShape, *, device: torch.device, dtype: torch.dtype, attn_implementation: str,
                     hidden: int | None = None, layers: int | None = None, seed: int = 0) -> PreTrainedModel:
    """The shape's text stack with random weights, initialised directly on `device` in `dtype`."""
    if attn_implementation not in ATTENTION:
        raise ValueError(f"unknown --attn-implementation {attn_implementation!r}; use {', '.join(ATTENTION)}")
    config = shape.config(attn_implementation=attn_implementation, hidden=hidden, layers=layers)
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ImportError, ValueError) as error:  # flash-attention not installed, or not for this device or dtype
        raise ValueError(f"--attn-implementation {attn_implementation} cannot run here: "
                         f"{' '.join(str(error).split())[:300]}") from None
    return model.eval()


def build_prompt(shape: BenchShape, device: torch.device, seed: int = 0) -> torch.Tensor:
    """[1, n_tokens]: text, the vision placeholders, text (the question after the image)."""
    generator = torch.Generator().manual_seed(seed)
    high = min(30000, shape.vision_token_id)
    before = torch.randint(10, high, (shape.text_before,), generator=generator)
    after = torch.randint(10, high, (shape.text_after,), generator=generator)
    return torch.cat([before, torch.full((shape.n_vision,), shape.vision_token_id), after])[None].to(device)


__all__ = ["ATTENTION", "DTYPES", "SHAPES", "BenchShape", "build_prompt", "build_text_stack", "get_shape",
           "resolve_device", "resolve_dtype"]
