"""The lmms-eval 0.7 model `dart_tuner`: a loaded VLM answering every request under a switchable pruning config.

From the command line (registered through the `lmms_eval.models` entry point)::

    lmms-eval eval --model dart_tuner \
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=dart,layer=2,keep_ratio=0.25 --tasks mme

In-process, a study loads the model once and switches configurations between evaluations::

    lm = DartTunerLMM.from_loaded(load_model("llava-hf/llava-1.5-7b-hf"))
    lm.set_config(PruningConfig(method="dart", layer=2, keep_ratio=0.25))
    simple_evaluate(model=lm, tasks=[...])

Requests are batched with left padding. Answers are never reused across configurations: `repr(lm)` names the
configuration, and lmms-eval's response cache keys on it. A generation that raises, or too many that come back
empty, fail the evaluation with `GenerationFailure` instead of scoring as wrong answers.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from tuner.config import PruningConfig, as_pruning_config, check_layer
from tuner.config.preset import config_from_dict, load_preset
from tuner.config.schema import LEGACY_FIELDS
from tuner.evaluation.inputs import as_images, build_inputs
from tuner.evaluation.lmms_compat import import_lmms_eval
from tuner.models.feature_cache import FeatureCache
from tuner.models.loading import LoadedModel, load_model
from tuner.pruning import apply_pruning

_lmms_eval = import_lmms_eval("api.model")
lmms = _lmms_eval.api.model.lmms

MODEL_NAME = "dart_tuner"
# Every shared field (schedules: preset=), and DART's pivot fields as shorthands for option_<name> (schema 1 form).
_CONFIG_ARGS = ({f.name for f in dataclasses.fields(PruningConfig)} - {"options", "stages"}) | set(LEGACY_FIELDS)
_LOAD_ARGS = {"dtype", "device", "attn_implementation", "revision", "trust_remote_code"}
_IGNORED_ARGS = {"max_batch_size"}  # passed by lmms-eval to every model

class GenerationFailure(RuntimeError):
    """Generation raised or returned nothing; the evaluation is not a valid measurement of the config."""

@dataclass(frozen=True)
class SampleRecord:
    """Token counts and output of one answered request (padding excluded)."""

    n_tokens: int
    n_vision: int
    n_kept_vision: int
    n_output_tokens: int
    empty: bool
    stage_kept_vision: tuple[int, ...] = ()  # what each stage of a schedule kept (n_kept_vision: the last)

def _config_from_args(args: dict[str, Any], preset: str | None) -> PruningConfig | None:
    config_args = {key: args.pop(key) for key in list(args) if key in _CONFIG_ARGS}
    options = {key.removeprefix("option_"): args.pop(key) for key in list(args) if key.startswith("option_")}
    if preset is not None:
        if config_args or options:
            raise ValueError(f"give preset= or pruning arguments, not both (got preset and {sorted(config_args)})")
        return load_preset(preset).config
    if not config_args:
        return None
    if "method" not in config_args:
        raise ValueError(f"pruning arguments {sorted(config_args)} need method= (e.g. method=dart)")
    if options:
        config_args["options"] = options
    return config_from_dict(config_args, "dart_tuner model_args", schema=1)

class DartTunerLMM(lmms):
    """lmms-eval model: one loaded VLM, its pruning configuration (None = unpruned) applied to every request."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, *, loaded: LoadedModel | None = None,
                 config: PruningConfig | None = None, preset: str | None = None, batch_size: int | str | None = 1,
                 max_failures: int = 0, **kwargs: Any) -> None:
        super().__init__()
        if (pretrained is None) == (loaded is None):
            raise ValueError("dart_tuner needs exactly one of pretrained=<hub id or folder> and a loaded model")
        load_args = {key: kwargs.pop(key) for key in list(kwargs) if key in _LOAD_ARGS and kwargs[key] is not None}
        from_args = _config_from_args(kwargs, preset)
        unknown = sorted(set(kwargs) - _IGNORED_ARGS)
        if unknown:
            raise ValueError(f"dart_tuner: unknown model_args {unknown}; pruning fields: {sorted(_CONFIG_ARGS)}, "
                             f"option_<name> for method options, preset=, loading: {sorted(_LOAD_ARGS)}")
        if config is not None and from_args is not None:
            raise ValueError("give config= or pruning model_args, not both")
        self.loaded = loaded if loaded is not None else load_model(pretrained, **load_args)
        self.batch_size = int(batch_size or 1)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_failures = int(max_failures)
        self._config: PruningConfig | None = None
        self.set_config(config if config is not None else from_args)
        self.records: dict[tuple[str, int], SampleRecord] = {}
        self.on_progress: Callable[[int], None] | None = None  # called with the number of requests just answered
        self.feature_cache: FeatureCache | None = None  # image features served from it while answering requests
        tokenizer = self.loaded.processor.tokenizer
        self._pad_token_id = tokenizer.pad_token_id

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, config: PruningConfig | None = None, *, batch_size: int = 1,
                    max_failures: int = 0, feature_cache: FeatureCache | None = None) -> DartTunerLMM:
        """Wrap an already loaded model (a study loads it once and reuses it for every trial)."""
        lm = cls(loaded=loaded, config=config, batch_size=batch_size, max_failures=max_failures)
        lm.feature_cache = feature_cache
        return lm

    @property
    def config(self) -> PruningConfig | None:
        return self._config

    def set_config(self, config: PruningConfig | Any | None) -> None:
        """Switch the pruning configuration for the following requests (a preset's config, or None = unpruned)."""
        if config is not None:
            config = as_pruning_config(config)
            check_layer(config.layer, len(self.loaded.adapter.layers))
        self._config = config

    def __repr__(self) -> str:
        # lmms-eval's response cache keys on f"{model}|{model_args}": naming the config keeps answers apart.
        config = json.dumps(self._config.to_dict(), sort_keys=True) if self._config else "unpruned"
        return f"{MODEL_NAME}({self.loaded.model_id}, {self.loaded.revision}, {config})"

    @contextmanager
    def _pruning(self) -> Iterator[Any]:
        """The configuration applied while requests are answered: its processor settings (how many vision tokens
        an image becomes) and its pruning."""
        if self._config is None:
            yield None
            return
        with apply_pruning(self.loaded.model, self._config, processor=self.loaded.processor) as handle:
            yield handle

    def _cached_features(self) -> AbstractContextManager:
        """The feature cache attached to the model while requests are answered (latency runs never see it)."""
        if self.feature_cache is None:
            return nullcontext()
        return self.feature_cache.attach(self.loaded.model, self.loaded.adapter.spec)

    def _generation_kwargs(self, gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        sample = bool(gen_kwargs.get("do_sample")) and temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or 128),
                                  "do_sample": sample, "num_beams": int(gen_kwargs.get("num_beams") or 1),
                                  "pad_token_id": self._pad_token_id}
        if sample:
            kwargs["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                kwargs["top_p"] = float(gen_kwargs["top_p"])
        return kwargs, until

    def _vision_counts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
        return self.loaded.adapter.vision_mask(input_ids, attention_mask).sum(-1).tolist()

    def _answer_batch(self, batch: Sequence[Any], handle: Any) -> list[str]:
        contexts, image_lists = [], []
        for request in batch:
            context, _, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            where = f"task {task}, doc {doc_id}"
            image_lists.append(as_images(doc_to_visual(doc) if doc_to_visual else None, where))
            contexts.append(context)
        gen_kwargs, until = self._generation_kwargs(batch[0].args[1])
        inputs = build_inputs(self.loaded, contexts, image_lists)
        n_before = len(handle.requests) if handle is not None else 0
        with torch.inference_mode():
            output = self.loaded.model.generate(**inputs, **gen_kwargs)
        prompt_length = inputs["input_ids"].shape[1]
        new_tokens = output[:, prompt_length:]
        texts = self.loaded.processor.batch_decode(new_tokens, skip_special_tokens=True)
        n_tokens = inputs["attention_mask"].sum(-1).tolist()
        n_vision = self._vision_counts(inputs["input_ids"], inputs["attention_mask"])
        kept = handle.requests[n_before].n_kept_vision if handle is not None else n_vision
        stage_kept = handle.requests[n_before].stage_kept_vision if handle is not None else [n_vision]
        n_out = (new_tokens != self._pad_token_id).sum(-1).tolist()
        answers = []
        for row, (request, text) in enumerate(zip(batch, texts)):
            for stop in until:
                text = text.split(stop)[0] if stop else text
            text = text.strip()
            _, _, _, doc_id, task, _ = request.args
            self.records[(task, doc_id)] = SampleRecord(n_tokens=n_tokens[row], n_vision=n_vision[row],
                                                        n_kept_vision=kept[row], n_output_tokens=n_out[row],
                                                        empty=not text,
                                                        stage_kept_vision=tuple(k[row] for k in stage_kept))
            answers.append(text)
        return answers

    def generate_until(self, requests: list[Any]) -> list[str]:
        """Answer every request, batched with left padding, under the current configuration."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(index)
        answers: list[str | None] = [None] * len(requests)
        with self._pruning() as handle, self._cached_features():
            for indices in groups.values():
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start:start + self.batch_size]
                    batch = [requests[i] for i in chunk]
                    try:
                        texts = self._answer_batch(batch, handle)
                    except Exception as error:
                        docs = ", ".join(f"{r.args[4]}/{r.args[3]}" for r in batch)
                        raise GenerationFailure(f"generation failed under {self!r} for {docs}: "
                                                f"{type(error).__name__}: {error}") from error
                    for i, text in zip(chunk, texts):
                        answers[i] = text
                    if self.on_progress is not None:
                        self.on_progress(len(chunk))
        empty = [f"{r.args[4]}/{r.args[3]}" for r, a in zip(requests, answers) if not a]
        if len(empty) > self.max_failures:
            raise GenerationFailure(f"{len(empty)} of {len(requests)} generations were empty under {self!r} "
                                    f"(allowed: {self.max_failures}): {', '.join(empty[:10])}"
                                    f"{' ...' if len(empty) > 10 else ''}")
        return [a or "" for a in answers]

    def clean(self) -> None:
        """Nothing to free after an evaluation: lmms-eval's default, meant to make room for an LLM judge, runs two
        full `gc.collect()` and drops the wrapper's modules, costing about a second per evaluation (per chunk of an
        early-stopped trial); here the model lives on in `self.loaded` for the next evaluation, and no task of ours
        loads a judge."""

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError("dart_tuner evaluates generate_until tasks; this task asks for loglikelihood "
                                  "(multiple-choice scoring), which pruning at prefill does not define")

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("dart_tuner evaluates single-round generate_until tasks")

def lmms_eval_manifest() -> Any:
    """The `lmms_eval.models` entry point: registers this class as model `dart_tuner`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.DartTunerLMM")
