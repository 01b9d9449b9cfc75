"""The embedded model's sizes and training recipe as plain data (no torch import), for the model builder, the
training loop and the command line's defaults alike."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TinyShape:
    """Sizes of the tiny LLaVA: 128 px images in 8 px patches give 256 vision tokens (LLaVA-1.5 has 576). The first
    `local_layers` text layers use a sliding window of `local_window` tokens; why is in `tuner.tiny.model`'s doc."""

    image_size: int = 128
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 192
    text_layers: int = 8
    heads: int = 6
    local_layers: int = 2
    local_window: int = 8

    @property
    def n_vision_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (stored next to the checkpoint); the defaults are the shipped model's."""

    steps: int = 2400
    batch_size: int = 16
    turns_per_image: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    seed: int = 0
    eval_every: int = 200
    eval_docs: int = 300
    shape: TinyShape = field(default_factory=TinyShape)
    init_from: str | None = None  # continue from this checkpoint's weights (a new optimizer and schedule)
    first_image: int = 0  # index of the first training scene; a continued run starts after the images seen
    bf16: bool = True  # bfloat16 autocast (fp32 weights and optimizer): 1.3x faster on AVX512-BF16 CPUs
    # weight of the attention-guidance loss at the first full-attention layer (`train.guidance_loss`)
    guidance: float = 1.0
    guidance_steps: int = 1200  # the guidance weight falls linearly to 0 over these steps
