"""Where a configuration runs: for each target (`transformers`, `vllm`, `sglang`), whether a `PruningConfig` of a
model family runs there natively, part by part, and the engine's launch settings for the parts that do.

`transformers` (`tuner.apply_pruning`) runs every configuration. The serving engines run none of dart-tuner's
pruning: vLLM and SGLang prune only video, before the language model (EVS), image pruning in vLLM is an open pull
request and in-LM pruning requests were closed. What they do take is the processor's own vision-token budget
(`PruningConfig.processor`), passed to the Hugging Face processor they load: so `keep_all` with processor settings
ports, when the engine forwards those settings for the model's family.

This module is the one owner of these facts; each names its source and the engine version it was checked against
(`ENGINE_VERSIONS`). docs/serving.md shows them as a table, which tests/test_ports.py holds to these versions.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tuner.config.pruning_config import PruningConfig
from tuner.errors import DartTunerError

__all__ = ["ENGINE_VERSIONS", "TARGETS", "Blocked", "Part", "PortError", "Verdict", "check_target", "engine_settings",
           "launch_settings", "launch_text", "portable_processor_settings", "verdict"]

TARGETS = ("transformers", "vllm", "sglang")

# The version each engine fact below was read from (source and docs), so a reader knows how old a verdict is.
ENGINE_VERSIONS = {
    "vllm": "0.20.0 (docs.vllm.ai/en/v0.20.0; source vllm/model_executor/models/qwen2_vl.py, qwen3_vl.py)",
    "sglang": "main at commit 02065f0 (python/sglang/srt/server_args.py mm_process_config, "
              "multimodal/processors/qwen_vl.py)",
}

# Why each kind of pruning stage runs on no serving engine (one line each; sources in docs/serving.md).
IN_LM = ("no serving engine prunes inside the language model (vLLM's FastV-style requests #3394 and #20791 were "
         "closed; SGLang has none)")
BEFORE_LM = ("no serving engine prunes images before the language model yet (vLLM and SGLang prune only video, "
             "EVS; vLLM's image pruning is the open PR #38888)")

_QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
_FIXED_SIZE = ("{engine}'s LLaVA processor has no such setting: the image-token count comes from the vision "
               "config's fixed image_size (the CLIP position embeddings are not interpolated)")

# engine -> family -> dart-tuner setting -> the engine's name for it (a str), or why it does not port (a Blocked).
# vLLM forwards `--mm-processor-kwargs` to the Hugging Face processor it loads (`get_hf_processor(**kwargs)`),
# whose Qwen2-VL image processor takes `min_pixels` / `max_pixels`; SGLang passes `--mm-process-config`'s
# "image" mapping to the processor's call.


@dataclass(frozen=True)
class Blocked:
    """A setting an engine does not take for a family, and why (one line)."""

    reason: str


_SETTINGS: dict[str, dict[str, dict[str, str | Blocked]]] = {
    "vllm": {**{family: {"max_pixels": "max_pixels", "min_pixels": "min_pixels"} for family in _QWEN},
             "llava": {"image_size": Blocked(_FIXED_SIZE.format(engine="vLLM"))}},
    "sglang": {**{family: {"max_pixels": "max_pixels", "min_pixels": "min_pixels"} for family in _QWEN},
               "llava": {"image_size": Blocked(_FIXED_SIZE.format(engine="SGLang"))}},
}
# SGLang resizes Qwen-VL images itself before its processor, to at most this environment variable's pixels
# (default 16384 x 28 x 28): a launch sets it to the configuration's max_pixels, so both resizes share the bound.
SGLANG_MAX_PIXELS_ENV = "SGLANG_IMAGE_MAX_PIXELS"


class PortError(DartTunerError, ValueError):
    """A target that is not one of `TARGETS`, or a configuration asked to launch where it does not run."""


def check_target(target: str) -> str:
    """`target` if it is one of `TARGETS`, else PortError naming it and the choices."""
    if target not in TARGETS:
        raise PortError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    return target


@dataclass(frozen=True)
class Part:
    """One part of a configuration (a pruning stage or a processor setting) and, when it does not port, why."""

    name: str
    reason: str | None = None  # None: it runs on the target

    @property
    def ports(self) -> bool:
        return self.reason is None

    def text(self) -> str:
        return self.name if self.ports else f"{self.name}: {self.reason}"


@dataclass(frozen=True)
class Verdict:
    """Whether a configuration of `family` runs natively on `target`, part by part."""

    target: str
    family: str
    parts: tuple[Part, ...]

    @property
    def ports(self) -> bool:
        return all(part.ports for part in self.parts)

    @property
    def blockers(self) -> tuple[Part, ...]:
        return tuple(part for part in self.parts if not part.ports)

    def first_blocker(self) -> str:
        """The first part that does not port, as one line ('' when everything ports)."""
        return self.blockers[0].text() if self.blockers else ""


def engine_settings(target: str, family: str) -> Mapping[str, str | Blocked]:
    """dart-tuner processor setting -> the engine's name for it or why not, for one family (empty when none)."""
    return _SETTINGS.get(check_target(target), {}).get(family, {})


def _processor_part(target: str, family: str, name: str, value: int) -> Part:
    label = f"processor.{name}={value}"
    if target == "transformers":
        return Part(label)
    fact = engine_settings(target, family).get(name)
    if fact is None:
        return Part(label, f"dart-tuner knows no {target} argument for this setting of family {family}")
    return Part(label, fact.reason) if isinstance(fact, Blocked) else Part(label)


def _stage_parts(config: PruningConfig) -> list[Part]:
    parts = []
    for stage in config.stage_configs():
        if stage.method == "keep_all":
            continue
        where = "before the LM (K=0)" if stage.layer == 0 else f"at layer {stage.layer}"
        kind = "before-the-LM image pruning" if stage.layer == 0 else "in-LM pruning"
        parts.append(Part(f"{kind}: {stage.method} {where}", BEFORE_LM if stage.layer == 0 else IN_LM))
    return parts


def verdict(config: PruningConfig, family: str, target: str) -> Verdict:
    """Whether `config` (of a model of `family`) runs natively on `target`: every pruning stage and processor
    setting as a part, with the reason a part does not port. `transformers` runs everything."""
    check_target(target)
    if target == "transformers":
        stages = [Part(f"{stage.method} at layer {stage.layer}") for stage in config.stage_configs()
                  if stage.method != "keep_all"]
        return Verdict(target, family, (*stages, *(Part(f"processor.{n}={v}") for n, v in config.processor.items())))
    parts = _stage_parts(config) + [_processor_part(target, family, name, value)
                                    for name, value in config.processor.items()]
    return Verdict(target, family, tuple(parts))


def portable_processor_settings(target: str, family: str | None = None) -> frozenset[str]:
    """The processor settings `target` takes for `family` (None: for at least one family)."""
    check_target(target)
    if target == "transformers":
        raise PortError("transformers takes every processor setting: ask for an engine's (vllm, sglang)")
    families = [family] if family is not None else list(_SETTINGS[target])
    return frozenset(name for f in families for name, fact in engine_settings(target, f).items()
                     if not isinstance(fact, Blocked))


def launch_settings(config: PruningConfig, family: str, target: str, model_id: str) -> dict[str, Any]:
    """The engine launch settings of a configuration that ports (PortError naming the first part that does not):
    `args` (the server's command-line arguments), `env` (environment variables) and the engine version checked."""
    check_target(target)
    if target == "transformers":
        raise PortError("transformers runs a preset through tuner.apply_pruning; launch settings are for engines")
    found = verdict(config, family, target)
    if not found.ports:
        raise PortError(found.first_blocker())
    names = engine_settings(target, family)
    kwargs = {str(names[name]): value for name, value in config.processor.items()}
    env: dict[str, str] = {}
    if target == "vllm":
        args = ["vllm", "serve", model_id]
        if kwargs:
            args += ["--mm-processor-kwargs", json.dumps(kwargs, sort_keys=True)]
    else:
        args = ["python", "-m", "sglang.launch_server", "--model-path", model_id]
        if kwargs:
            args += ["--mm-process-config", json.dumps({"image": kwargs}, sort_keys=True)]
        if "max_pixels" in kwargs:  # SGLang's own resize first, at the same bound
            env[SGLANG_MAX_PIXELS_ENV] = str(kwargs["max_pixels"])
    return {"target": target, "engine_version_checked": ENGINE_VERSIONS[target], "model": model_id,
            "processor_kwargs": kwargs, "args": args, "env": env}


def launch_text(settings: Mapping[str, Any]) -> str:
    """A launch's shell line: environment variables, then the quoted command."""
    env = " ".join(f"{key}={shlex.quote(value)}" for key, value in settings["env"].items())
    command = " ".join(shlex.quote(arg) for arg in settings["args"])
    return f"{env} {command}" if env else command
