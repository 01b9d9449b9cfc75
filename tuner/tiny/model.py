"""The embedded default model: a small LLaVA (CLIP vision tower + Qwen2 text model) built from configs, offline.

The text model's first layers use sliding-window attention (`TinyShape.local_layers`), a stock Qwen2 setting: there
the question cannot see the image, so the model must read the image after them, and a pruning method that drops the
wrong tokens at K = 2 costs accuracy, as in real VLMs. With full attention everywhere a model this small reads the
image in layers 0-1 and pruning at K = 2 barely matters (measured; docs/evaluation.md, "The embedded model").

Its tokenizer is a word-level vocabulary made from the bundled task's own questions and answers. Every question
of `dart_shapes`, together with the post-prompt and the assistant tag that follow it, is a single token: a model
this small learns a lookup keyed by the token at the answer position quickly, and hardly at all when it must
first carry the question forward over intervening tokens (measured: at chance after 600 steps; see docs/evaluation.md).
The processor is an ordinary `LlavaProcessor` with a chat template, so the checkpoint loads through
`AutoProcessor` / `AutoModelForImageTextToText` like any other.
"""

from __future__ import annotations

import re

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from tuner.evaluation import shapes
from tuner.tiny.recipe import TinyShape

POST_PROMPT = "\nAnswer the question using a single word or number."  # as in dart_shapes.yaml
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
ROLE_TOKENS = ["USER:", "ASSISTANT:"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>{% endif %}{% endfor %}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    " ASSISTANT:{% else %} {% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}</s>{% endif %}{% endfor %}"
)


def task_phrases() -> list[str]:
    """Every question, the post-prompt and every answer of the bundled task: the vocabulary's content words."""
    questions = [f"What color is the shape in row {r}, column {c}?" for r in range(1, shapes.GRID + 1)
                 for c in range(1, shapes.GRID + 1)]
    questions += [f"What shape is in row {r}, column {c}?" for r in range(1, shapes.GRID + 1)
                  for c in range(1, shapes.GRID + 1)]
    questions += [f"How many {color} shapes are there?" for color in shapes.COLORS]
    answers = [*shapes.COLORS, *shapes.SHAPES, shapes.NONE_ANSWER, *map(str, range(shapes.GRID * shapes.GRID + 1))]
    return [full_prompt(q) for q in questions] + questions + [POST_PROMPT.strip()] + answers


def full_prompt(question: str) -> str:
    """The text from a question to the answer, as the chat template writes it: one token in the tiny vocabulary,
    so the answer is predicted at the question's own position (nothing to carry forward; see the module doc)."""
    return f"{question}{POST_PROMPT} ASSISTANT:"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: known phrases (whole questions) are one token each, other words split on spaces."""
    phrases = task_phrases()
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + ROLE_TOKENS + phrases)}
    alternation = "|".join(re.escape(p) for p in sorted(phrases + ROLE_TOKENS, key=len, reverse=True))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Keep the matches (known phrases, else any run of non-space characters); drop the whitespace between them.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(f"{alternation}|\\S+"), behavior="removed", invert=True)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens=["<image>"], padding_side="left")


def build_processor(shape: TinyShape = TinyShape()) -> LlavaProcessor:
    """LLaVA processor: CLIP preprocessing at `image_size` (no crop loss: the task's images are square)."""
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": shape.image_size},
                                            crop_size={"height": shape.image_size, "width": shape.image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=shape.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def build_model(tokenizer: PreTrainedTokenizerFast, shape: TinyShape = TinyShape()) -> LlavaForConditionalGeneration:
    """A randomly initialised tiny LLaVA whose vocabulary and special ids match `tokenizer`."""
    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=4 * shape.vision_hidden,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=shape.image_size, patch_size=shape.patch_size,
                              projection_dim=shape.vision_hidden)
    layer_types = ["sliding_attention"] * shape.local_layers + ["full_attention"] * (shape.text_layers
                                                                                     - shape.local_layers)
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=shape.text_hidden,
                       intermediate_size=4 * shape.text_hidden, num_hidden_layers=shape.text_layers,
                       num_attention_heads=shape.heads, num_key_value_heads=shape.heads, max_position_embeddings=1024,
                       use_sliding_window=shape.local_layers > 0, sliding_window=shape.local_window,
                       layer_types=layer_types, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=shape.n_vision_tokens, vision_feature_select_strategy="default",
                         vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
