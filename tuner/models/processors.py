"""Loading a VLM's processor, with an image-only fallback for Qwen where torchvision is missing.

Qwen2-VL / Qwen2.5-VL processors carry a video processor that transformers only builds with torchvision,
which cannot be installed next to a CPU torch (see the README). Pruning and evaluation here use images only,
so when `AutoProcessor` fails for that reason the processor is rebuilt from the checkpoint's tokenizer and
image processor alone. Nothing in transformers is patched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import AutoProcessor, ProcessorMixin, Qwen2_5_VLProcessor, Qwen2VLProcessor

logger = logging.getLogger(__name__)


class _ImageOnlyProcessorMixin:
    """A Qwen processor built without its video processor.

    `ProcessorMixin` derives the sub-processors from the `__init__` signature, so leaving `video_processor`
    out of it skips the class check that fails for `video_processor=None`, and `from_pretrained` loads just
    the tokenizer and the image processor. The Qwen `__init__` passes a positional `None` for the video
    processor on to `ProcessorMixin.__init__`, which zips positional arguments with the sub-processor names
    and so drops it.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen2VLProcessor(_ImageOnlyProcessorMixin, Qwen2VLProcessor):
    """Qwen2-VL processor for images only (see `_ImageOnlyProcessorMixin`)."""


class ImageOnlyQwen2_5_VLProcessor(_ImageOnlyProcessorMixin, Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for images only (see `_ImageOnlyProcessorMixin`)."""


IMAGE_ONLY_PROCESSORS: dict[str, type[ProcessorMixin]] = {
    "qwen2_vl": ImageOnlyQwen2VLProcessor,
    "qwen2_5_vl": ImageOnlyQwen2_5_VLProcessor,
}


def _needs_torchvision(error: Exception) -> bool:
    return "torchvision" in str(error).lower()


def load_processor(path: str | Path, family: str, *, revision: str | None = None,
                   trust_remote_code: bool = False) -> ProcessorMixin:
    """`AutoProcessor` for `path`, left-padding, with the image-only Qwen fallback when torchvision is missing."""
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        processor = AutoProcessor.from_pretrained(path, **kwargs)
    except ImportError as error:
        if family not in IMAGE_ONLY_PROCESSORS or not _needs_torchvision(error):
            raise
        logger.info("torchvision is not installed: loading %s's processor for images only", path)
        processor = IMAGE_ONLY_PROCESSORS[family].from_pretrained(path, **kwargs)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise ValueError(f"{path}: AutoProcessor returned {type(processor).__name__}, which has no tokenizer and "
                         "image processor; the checkpoint needs a processor (preprocessor_config.json)")
    tokenizer.padding_side = "left"  # batched generation appends after the last prompt token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor
