"""One user turn with images and a question, in the model's own chat format, ending where the answer starts."""

from __future__ import annotations

from transformers import ProcessorMixin

from tuner.models.families import get_family


def build_prompt(processor: ProcessorMixin, family: str, text: str, n_images: int) -> str:
    """The processor's chat template when it has one, else the family's documented format.

    Text that already holds the image placeholder (some lmms-eval tasks put it in the question) is used as is.
    """
    spec = get_family(family)
    placeholder = getattr(processor, "image_token", None) or spec.image_placeholder
    if n_images and placeholder in text:
        n_images = 0
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=False)
        return _without_second_bos(prompt, getattr(processor, "tokenizer", None))
    return spec.fallback_prompt(text, n_images)


def _without_second_bos(prompt: str, tokenizer) -> str:
    """The prompt minus a leading BOS the template wrote (Gemma's does) when the tokenizer adds one itself.

    The processor tokenizes the rendered prompt with the tokenizer's special tokens, so both would stay.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if bos and prompt.startswith(bos) and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]:
        return prompt[len(bos):]
    return prompt
