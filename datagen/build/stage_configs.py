"""Each step's stage config, made from the build's settings.

The build's settings for a stage (BuildConfig.stage_settings) go in by name; a stage setting
left unset keeps the stage's own default, which is cited where it is defined (the stage's
config class in datagen/stages/). Every config validates itself when it is built, so a bad
setting fails the build before any work (`stage_config_problems`).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any

from datagen.build.settings import BuildConfig, vlm_server
from datagen.core.stage import Stage


def control(c: BuildConfig) -> Any:
    from datagen.stages.control import ControlConfig

    return ControlConfig(
        kind=c.control_kind, profile=c.profile, tiny_dir=c.tiny_dir, **c.stage_settings("control")
    )


def describe(c: BuildConfig) -> Any:
    from datagen.stages.describe import DescribeConfig

    return DescribeConfig(
        **_vlm(c, "describe"),
        max_new_tokens=c.default("describe_max_new_tokens"),
        accept_truncated=c.default("vlm_accept_truncated"),
    )


def stylize(c: BuildConfig) -> Any:
    from datagen.stages.stylize import StylizeConfig

    return StylizeConfig(
        backend=c.stylize_backend,
        profile=c.profile,
        tiny_dir=c.tiny_dir,
        num_style_refs=c.k_refs,
        steps=c.default("stylize_steps"),
        resolution=c.default("stylize_resolution"),
        url=c.stylize_url,
        api_key_block=c.stylize_api_key_block,
        **c.stage_settings("stylize"),
    )


def animate(c: BuildConfig) -> Any:
    from datagen.stages.animate import AnimateConfig

    clip = c.clip_settings()
    return AnimateConfig(
        profile=c.profile,
        tiny_dir=c.tiny_dir,
        num_frames=clip.num_frames,
        height=clip.height,
        width=clip.width,
        steps=c.default("animate_steps"),
        **c.stage_settings("animate"),
    )


def caption(c: BuildConfig) -> Any:
    from datagen.stages.caption import CaptionConfig

    return CaptionConfig(
        **_vlm(c, "caption"),
        max_new_tokens=c.default("caption_max_new_tokens"),
        accept_truncated=c.default("vlm_accept_truncated"),
    )


def score(c: BuildConfig) -> Any:
    from datagen.stages.score import ScoreConfig

    return ScoreConfig(profile=c.profile, tiny_dir=c.tiny_dir, **c.stage_settings("score"))


def judge(c: BuildConfig) -> Any:
    from datagen.stages.judge import JudgeConfig

    return JudgeConfig(**_vlm(c, "judge"))


def _vlm(c: BuildConfig, stage: str) -> dict[str, Any]:
    """The VLM backend settings the describe, caption and judge steps share."""
    backend: dict[str, Any] = {
        "backend": c.caption_backend,
        "profile": c.profile,
        "tiny_dir": c.tiny_dir,
        "max_pixels": c.default("vlm_max_pixels"),
        **c.stage_settings(stage),
    }
    if c.caption_backend == "openai":
        backend |= vlm_server(c) | {"api_key_block": c.vlm_api_key_block}
    return backend


def stage_config_problems(config: BuildConfig) -> list[str]:
    """Each enabled step's own complaint about the settings it takes (a bad scale, say), in
    the user's names for them."""
    from datagen.build.steps import steps_for

    problems = []
    for step in steps_for(config):
        try:
            step.config(config)
        except ValueError as error:
            message = re.sub(r"^\w+Config: ", "", str(error), flags=re.MULTILINE)
            for setting, field in config.setting_names(step.name).items():
                message = re.sub(rf"\b{field}\b", setting, message)
            problems += [f"{step.name}: {line}" for line in message.splitlines()]
    return problems


@dataclass(frozen=True)
class StageFactory:
    """Builds a step's stage from the build's settings (picklable: Ray actors call it)."""

    step_name: str
    config: BuildConfig

    def __call__(self) -> Stage:
        from datagen.build.steps import step

        found = step(self.step_name)
        module, class_name = found.stage.split(":")
        stage_class = getattr(importlib.import_module(module), class_name)
        return stage_class(found.config(self.config))


def stage_factories(config: BuildConfig) -> dict[str, StageFactory]:
    """How to build the stage of each step this build runs, by step name."""
    from datagen.build.steps import steps_for

    return {s.name: StageFactory(s.name, config) for s in steps_for(config)}


def stage_config(step_name: str, config: BuildConfig) -> Any:
    """The stage config of step `step_name` for this build."""
    from datagen.build.steps import step

    return step(step_name).config(config)
