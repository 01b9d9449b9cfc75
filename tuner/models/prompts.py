"""One user turn with images and a question, in the model's own chat format, ending where the answer starts."""

from __future__ import annotations

from transformers import ProcessorMixin

_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def build_prompt(processor: ProcessorMixin, family: str, text: str, n_images: int) -> str:
    """The processor's chat template when it has one, else the family's documented format.

    Text that already holds the image placeholder (some lmms-eval tasks put it in the question) is used as is.
    """
    placeholder = getattr(processor, "image_token", None) or ("<|image_pad|>" if family.startswith("qwen") else
                                                               "<image>")
    if n_images and placeholder in text:
        n_images = 0
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    if family.startswith("qwen"):
        return f"<|im_start|>user\n{_QWEN_IMAGE * n_images}{text}<|im_end|>\n<|im_start|>assistant\n"
    return f"USER: {'<image>' * n_images}\n{text} ASSISTANT:"
