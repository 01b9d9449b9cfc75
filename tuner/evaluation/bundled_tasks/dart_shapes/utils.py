"""Hooks that dart_shapes.yaml names with `!function utils.<name>`; lmms-eval loads this file by path."""

from tuner.evaluation.shapes import doc_image, normalize_answer


def doc_to_visual(doc):
    """One PIL image, redrawn from the document's scene."""
    return [doc_image(doc)]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The question between the configured pre- and post-prompt."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc, results):
    """Exact match of the normalised first word of the reply."""
    return {"exact_match": float(normalize_answer(results[0]) == doc["answer"])}
