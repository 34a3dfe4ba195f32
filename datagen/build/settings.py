"""The build's settings: ONE definition, read everywhere a build is configured.

`BuildConfig`'s fields are the settings. Each field's type carries its bounds and choices
(checked by pydantic, strictly: `field_problems`), and its metadata its help text, its choices,
the tiers it applies to (`splits`) and the stage setting it feeds (`stage`). From that one
list come:

- the parameters of the `build-ct` and `build-sft` flows (`flow_parameters`, used in flows/),
  which is also what a deployment's parameters and the Prefect UI's run form show;
- the options of `datagen build` (`cli_options`, used in datagen/cli/), each named after
  its setting (`num_frames` -> `--num-frames`);
- run-config files (`datagen build --config run.toml`, or the flows' `config` parameter): TOML
  whose keys are the same names.

Precedence, lowest first: the field's default here; the profile's default (PROFILE_DEFAULTS) or,
for stage settings left unset, the stage's own default, where the value from the paper or the
reference repository is cited (datagen/stages/stylize/, datagen/stages/animate.py, ...); the
run-config file; the flow parameters or command-line options given. An unknown key, in a file or
anywhere else, is an error naming the key.

The module is longer than most (~690 lines) because it is that one definition: some 200 lines
are the settings themselves (their help, bounds and profile defaults), and the rest is what is
made from them (the checks, the work-dir key, the flow parameters, the options, run-config
files), which reads the fields' metadata and changes with it; split apart, adding a setting
would again mean editing several modules.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import os
import tomllib
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError

from datagen.core.api_keys import check_key_source
from datagen.core.config import STRICT, NonNegativeInt, PositiveInt
from datagen.stages.caption import CAPTION_MAX_NEW_TOKENS, caption_token_budget
from datagen.stages.control import CONTROL_KINDS
from datagen.stages.describe import CONTENT_MAX_WORDS
from datagen.stages.stylize import INSTANTSTYLE_BLOCKS

PROFILES = ("tiny", "production")
SPLITS = ("ct", "sft")
CAPTION_BACKENDS = ("transformers", "openai")  # datagen/stages/vlm/
STYLIZE_BACKENDS = ("sdxl", "http")  # datagen/stages/stylize/
DEFAULT_ANIMATE_PROMPT = (
    "a high quality video with smooth, natural motion, consistent subjects and stable details"
)
# What each profile runs at when a setting is left unset. `tiny` is the embedded default:
# random-weight twins, seconds per sample on a CPU. `production` follows the reference code:
# Wan2.1 (Wan-Video/Wan2.1) generates 81 frames (generate.py:84-85) at 16 fps
# (wan/configs/shared_config.py:18), 480x832 is its 480p size (wan/configs/__init__.py:33), and
# its VACE/t2v default is 50 sampling steps (generate.py:71-72); SDXL runs 30 steps at 1024 px
# as in InstantStyle's ControlNet example (infer_style_controlnet.py:49).
PROFILE_DEFAULTS = {
    "tiny": {
        "num_frames": 9,
        "height": 64,
        "width": 64,
        "fps": 8.0,
        "stylize_steps": 2,
        "animate_steps": 2,
        "stylize_resolution": 64,
        "caption_max_new_tokens": 24,
        "describe_max_new_tokens": 16,
        # random-weight twins never end a sentence: their captions are kept cut off
        "vlm_accept_truncated": True,
        # the VLM sees the 64x64 frames at most doubled, not upscaled to production's size
        "vlm_max_pixels": 112 * 112,
    },
    "production": {
        "num_frames": 81,
        "height": 480,
        "width": 832,
        "fps": 16.0,
        "stylize_steps": 30,
        "animate_steps": 50,
        "stylize_resolution": 1024,
        "caption_max_new_tokens": CAPTION_MAX_NEW_TOKENS,  # a 120-word caption_sty fits
        "describe_max_new_tokens": caption_token_budget(CONTENT_MAX_WORDS),
        "vlm_accept_truncated": False,
        "vlm_max_pixels": 448 * 448,
    },
}
# Bump when a stage default changes what a build makes (flow shift, InstantStyle blocks, depth
# normalisation, ...): it is part of the work folder's key, so an interrupted build of an
# older recipe is not resumed into a dataset made with the new one.
RECIPE = 2


class BuildConfigError(ValueError):
    """Bad build parameters: raised before any work starts."""


def setting(
    default: Any = None,
    help: str = "",
    *,
    choices: tuple[str, ...] = (),
    splits: tuple[str, ...] = SPLITS,
    stage: tuple[str, str] | None = None,
    flags: tuple[str, ...] = (),
    exposed: bool = True,
) -> Any:
    """A BuildConfig field with what the flows, the CLI and run-config files need to know.

    `stage` = (stage, field of its config) this setting feeds when set; `flags` = extra
    command-line spellings kept for users of older releases; `exposed=False` keeps a field out
    of the flows and the CLI (the tier is the flow's or the command's own argument)."""
    metadata = {
        "help": help,
        "choices": choices,
        "splits": splits,
        "stage": stage,
        "flags": flags,
        "exposed": exposed,
    }
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


REQUIRED = dataclasses.MISSING


@dataclass(frozen=True)
class BuildConfig:
    """Every setting of a build run, validated up front: all problems in one message (but a
    value of the wrong type stops the checks that combine settings)."""

    source: str = setting(REQUIRED, "Directory, video file or .txt list of source videos.")
    out: str = setting(REQUIRED, "Output root; rows go to OUT/<split>.")
    split: Literal[SPLITS] = setting("ct", "Which tier: ct | sft.", choices=SPLITS, exposed=False)
    styles: tuple[str, ...] = setting((), "Style ids from prompts/styles.toml; default all.")
    limit: NonNegativeInt | None = setting(None, "At most this many samples (default: all).")
    clips_per_video: PositiveInt = setting(1, "Clips sampled from each source video.")
    shard_size: PositiveInt = setting(8, "Samples per shard (the unit of work and of retries).")
    profile: Literal[PROFILES] = setting(
        "tiny", "Model profile: tiny twins | production.", choices=PROFILES
    )
    tiny_dir: str | None = setting(None, "Where the tiny twins live (default: the user cache).")
    seed: int = setting(0, "Base seed; each sample's seed derives from it and its id.")
    # a pair carries K >= 1 style references
    k_refs: Annotated[int, Field(ge=1, le=16)] = setting(
        3, "K: style reference images per sample.", flags=("--k",)
    )
    # checked by the control stage's own config (reported once, as "control: ...")
    control_kind: str = setting(
        "depth", "Control video the pair is animated under.", choices=CONTROL_KINDS
    )
    dwpose_resolution: int | None = setting(
        None,
        "dwpose: the frame size the pose detector works at (stage default 1024, VACE's).",
        stage=("control", "dwpose_resolution"),
    )
    csd_threshold: Annotated[float, Field(ge=-1, le=1, allow_inf_nan=False)] = setting(
        0.5,
        "CT keeps csd_score > this (DreamStyle's 0.5).",
        splits=("ct",),
        flags=("--csd",),
    )
    vlm_judge: bool = setting(False, "Ask the VLM judge its three questions.")
    require_vlm_pass: bool = setting(
        False, "CT keeps only pairs the VLM judge passed.", splits=("ct",)
    )
    # sizes, steps and scales: None takes the profile's default, or the stage's cited one
    num_frames: int | None = setting(None, "Frames per clip, 4k+1 (profile default).")
    height: int | None = setting(None, "Clip height, a multiple of 16 (profile default).")
    width: int | None = setting(None, "Clip width, a multiple of 16 (profile default).")
    fps: float | None = setting(None, "Clip frame rate (profile default).")
    stylize_steps: int | None = setting(None, "SDXL sampling steps (profile default).")
    stylize_resolution: int | None = setting(
        None, "SDXL works at about this many pixels squared (profile default)."
    )
    stylize_guidance_scale: float | None = setting(
        None,
        "SDXL classifier-free guidance (stage default 5).",
        stage=("stylize", "guidance_scale"),
    )
    controlnet_scale: float | None = setting(
        None,
        "SDXL depth ControlNet conditioning scale (stage default 0.6, InstantStyle's).",
        stage=("stylize", "controlnet_conditioning_scale"),
    )
    ip_adapter_scale: float | None = setting(
        None,
        "IP-Adapter weight inside the InstantStyle blocks (stage default 1.0).",
        stage=("stylize", "ip_adapter_scale"),
    )
    instantstyle_blocks: str | None = setting(
        None,
        "UNet blocks the style image enters: style (published default) | style_layout.",
        choices=tuple(INSTANTSTYLE_BLOCKS),
        stage=("stylize", "ip_adapter_blocks"),
    )
    animate_steps: int | None = setting(None, "Wan VACE sampling steps (profile default).")
    animate_guidance_scale: float | None = setting(
        None,
        "Wan VACE classifier-free guidance (stage default 5).",
        stage=("animate", "guidance_scale"),
    )
    flow_shift: float | None = setting(
        None,
        "Wan VACE sampler flow shift (stage default 16, VACE's).",
        stage=("animate", "flow_shift"),
    )
    animate_conditioning_scale: float | None = setting(
        None,
        "Weight of the VACE control (stage default 1.0).",
        stage=("animate", "conditioning_scale"),
    )
    animate_prompt: str = setting(
        DEFAULT_ANIMATE_PROMPT, "Quality words after the clip's content in the animate prompt."
    )
    caption_max_new_tokens: int | None = setting(
        None, "Token budget of a caption (profile default)."
    )
    describe_max_new_tokens: int | None = setting(
        None, "Token budget of the content sentence before stylize (profile default)."
    )
    vlm_accept_truncated: bool | None = setting(
        None, "Keep captions cut off at their token budget instead of rejecting them."
    )
    vlm_max_pixels: int | None = setting(
        None, "Largest frame the VLM sees, in pixels (profile default)."
    )
    batch_size: PositiveInt = setting(2, "Samples per stage call.")
    crf: Annotated[int, Field(ge=0, le=51)] = setting(
        18, "H.264 quality of the written videos (0 = lossless, 51 = worst)."
    )
    caption_backend: Literal[CAPTION_BACKENDS] = setting(
        "transformers",
        "Caption and judge VLM: transformers (in-process) | openai (a VLM server).",
        choices=CAPTION_BACKENDS,
    )
    caption_base_url: str | None = setting(
        None, "openai: the server, e.g. http://127.0.0.1:8000/v1."
    )
    caption_model: str | None = setting(None, "openai: the served model name.")
    # Prefect Secret blocks holding API keys, by NAME (never the key). The stage that sends
    # the requests reads its block when it loads.
    vlm_api_key_block: str | None = setting(
        None,
        "openai: NAME of the Prefect Secret block holding the server's API key "
        "(default: the key in $DATAGEN_VLM_API_KEY, if any).",
    )
    stylize_backend: Literal[STYLIZE_BACKENDS] = setting(
        "sdxl",
        "sft: sdxl (in-process) | http (an image-edit API).",
        choices=STYLIZE_BACKENDS,
        splits=("sft",),
    )
    stylize_url: str | None = setting(None, "http: the image-edit endpoint.", splits=("sft",))
    stylize_api_key_block: str | None = setting(
        None,
        "http: NAME of the Prefect Secret block holding the API key "
        "(default: the key in $DATAGEN_IMAGE_EDIT_API_KEY, if any).",
        splits=("sft",),
    )
    scene_threshold: Annotated[float, Field(ge=0)] | None = setting(
        None,
        "Shot-cut threshold of PySceneDetect's AdaptiveDetector over each clip's frames "
        "(a frame's change over its neighbours' mean), during planning: a clip is moved past "
        "a cut or rejected (scene_cut); 0 turns it off (default 3.0, PySceneDetect's).",
    )
    min_motion: Annotated[float, Field(ge=0)] | None = setting(
        None,
        "Least motion of a clip, as mean optical flow in % of the frame width per frame; "
        "slower clips are rejected during planning (too_static); 0 turns it off "
        "(default 0.1).",
    )
    stage_timeout_s: Annotated[float, Field(gt=0)] = setting(  # inf: no limit
        3600.0, "A stage call slower than this is hung: its samples are rejected."
    )
    shards_in_flight: PositiveInt | None = setting(
        None,
        "Shards between plan and write at once (default: enough to give every actor of the "
        "largest pool work twice over; 2 in process, where it bounds memory).",
    )
    pool_sizes: str | None = setting(
        None,
        "Least and most actors of a step's pool, resized between them during the run as the "
        "cluster and the measured throughput change: 'animate=4:64,caption=1:8' ('score=2': "
        "exactly 2; default: from the cluster and the steps' costs, at least 1).",
    )
    gpu_memory_gb: Annotated[float, Field(gt=0)] | None = setting(
        None,
        "GB of memory of one GPU, for steps that share GPUs when there are fewer GPUs than "
        "steps (default 80: an H100).",
    )

    def __post_init__(self) -> None:
        problems, mistyped = field_problems(self)
        if mistyped:  # the checks below compare and combine values of the fields' types
            raise BuildConfigError("invalid build parameters: " + "; ".join(problems))
        if self.split in SPLITS:
            problems += split_problems(self.split, asdict(self))
        if not Path(self.source).exists():
            problems.append(f"source {self.source} does not exist")
        else:
            from datagen.data.manifest import is_manifest, manifest_problems

            problems += manifest_problems(self.source) if is_manifest(self.source) else []
        if self.require_vlm_pass and not self.vlm_judge:
            problems.append("require_vlm_pass needs vlm_judge")
        problems += self._backend_problems()
        try:
            self.pool_bounds()
        except ValueError as error:
            problems.append(str(error))
        if self.profile in PROFILES:
            settings = self.clip_settings()
            if (settings.num_frames - 1) % 4:
                problems.append(
                    f"num_frames must be 4k+1 for the animate model, got {settings.num_frames}"
                )
            if settings.height % 16 or settings.width % 16:
                problems.append("height and width must be multiples of 16")
            problems += self._stage_problems()
        from datagen.data.styles import load_style_library

        try:
            load_style_library().select(list(self.styles))
        except ValueError as error:
            problems.append(str(error))
        problems += _check_writable(Path(self.out))
        if problems:
            raise BuildConfigError("invalid build parameters: " + "; ".join(problems))

    def clean_settings(self):
        """The clip checks of planning (stages/clean.py), their defaults where unset."""
        from datagen.stages.clean import (
            DEFAULT_MIN_MOTION,
            DEFAULT_SCENE_THRESHOLD,
            CleanSettings,
        )

        return CleanSettings(
            DEFAULT_SCENE_THRESHOLD if self.scene_threshold is None else self.scene_threshold,
            DEFAULT_MIN_MOTION if self.min_motion is None else self.min_motion,
        )

    def pool_bounds(self) -> dict[str, tuple[int, int | None]]:
        """`pool_sizes` as step -> (least, most) actors; a ValueError naming what is wrong."""
        from datagen.build.steps import steps_for

        names = [s.name for s in steps_for(self)]
        bounds: dict[str, tuple[int, int | None]] = {}
        for part in filter(None, (p.strip() for p in (self.pool_sizes or "").split(","))):
            name, _, sizes = part.partition("=")
            least, colon, most = sizes.partition(":")
            try:
                least_n = int(least)
                most_n = (int(most) if most else None) if colon else least_n
            except ValueError:
                raise ValueError(
                    f"pool_sizes: {part!r} is not STEP=LEAST:MOST, STEP=LEAST: or STEP=N"
                ) from None
            if name.strip() not in names:
                raise ValueError(
                    f"pool_sizes: no step {name.strip()!r} in this build (its steps: "
                    f"{', '.join(names)})"
                )
            if least_n < 1 or (most_n is not None and most_n < least_n):
                raise ValueError(f"pool_sizes: {part!r} needs 1 <= LEAST <= MOST")
            bounds[name.strip()] = (least_n, most_n)
        return bounds

    def _stage_problems(self) -> list[str]:
        """The stages' own checks of the settings they take (ranges, multiples, choices), so
        a bad value fails here, before any work, with the stage's message."""
        from datagen.build.stage_configs import stage_config_problems

        return stage_config_problems(self)

    def _backend_problems(self) -> list[str]:
        """The caption and stylize backends with their URLs and key blocks. A setting for a
        backend this build does not use is refused rather than silently ignored."""
        problems = []
        for field_name in ("vlm_api_key_block", "stylize_api_key_block"):
            try:  # its messages never echo the value: a key pasted here stays out of logs
                check_key_source(None, getattr(self, field_name), block_field=field_name)
            except ValueError as error:
                problems.append(str(error))
        # (a backend that is not one of the choices is a field problem: neither branch)
        if self.caption_backend == "openai":
            from datagen.stages.vlm import VLMConfig

            try:  # the stage's own checks of the server URL and model name
                VLMConfig(**vlm_server(self), api_key_env=None)
            except ValueError as error:
                problems.append(f"caption: {error}".replace("VLMConfig: ", ""))
        elif self.caption_backend == "transformers":
            problems += _unused(
                self,
                "caption_backend",
                "'openai' (a VLM server)",
                ("caption_base_url", "caption_model", "vlm_api_key_block"),
            )
        if self.stylize_backend == "http":
            from datagen.stages.stylize import StylizeConfig

            if self.stylize_url is None:
                problems.append("stylize_backend 'http' needs stylize_url (the image-edit API)")
            else:
                try:  # the stage's own checks of the URL
                    StylizeConfig(backend="http", url=self.stylize_url, api_key_env=None)
                except ValueError as error:
                    problems.append(f"stylize_url: {error}".replace("StylizeConfig: ", ""))
        elif self.stylize_backend == "sdxl":
            problems += _unused(
                self,
                "stylize_backend",
                "'http' (an image-edit API)",
                ("stylize_url", "stylize_api_key_block"),
            )
        return problems

    def key_blocks(self) -> dict[str, str]:
        """stage -> the Prefect Secret block it reads its API key from, for this run's stages
        that read one."""
        blocks = {}
        if self.vlm_api_key_block is not None:  # every stage that talks to the VLM
            blocks["caption"] = blocks["describe"] = self.vlm_api_key_block
            if self.vlm_judge:
                blocks["judge"] = self.vlm_api_key_block
        if self.stylize_api_key_block is not None:
            blocks["stylize"] = self.stylize_api_key_block
        return blocks

    def default(self, name: str) -> Any:
        """The setting's value, or its profile default when unset."""
        value = getattr(self, name)
        return PROFILE_DEFAULTS[self.profile][name] if value is None else value

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """{field of the stage's config: value} for the settings of `stage` that are set;
        the unset ones keep the stage's own (cited) defaults."""
        return {
            field: getattr(self, setting)
            for setting, field in self.setting_names(stage).items()
            if getattr(self, setting) is not None
        }

    def setting_names(self, stage: str) -> dict[str, str]:
        """{setting: field of the stage's config} for the settings that feed `stage`."""
        return {
            field.name: field.metadata["stage"][1]
            for field in dataclasses.fields(self)
            if field.metadata["stage"] is not None and field.metadata["stage"][0] == stage
        }

    def clip_settings(self):
        """The clip every sample is cut to (datagen.stages.plan.ClipSettings)."""
        from datagen.stages.plan import ClipSettings

        return ClipSettings(
            self.default("num_frames"),
            self.default("height"),
            self.default("width"),
            float(self.default("fps")),
        )

    @property
    def dataset_dir(self) -> Path:
        return Path(self.out) / self.split

    @property
    def work_root(self) -> Path:
        """Work files of this exact build (same settings and recipe -> same folder -> resume).

        Fields that cannot change the output (WORK_KEY_EXCLUDED) stay out of the key, so a
        build resumes whichever block holds its key; so do unset (None) settings, so a setting
        added in a later release leaves the keys of builds that do not set it as they were (a
        changed default is a RECIPE bump).
        """
        fields = {
            k: v for k, v in asdict(self).items() if k not in WORK_KEY_EXCLUDED and v is not None
        }
        fields.update(WORK_KEY_FROZEN)
        fields["recipe"] = RECIPE
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        return Path(self.out) / "_work" / f"{self.split}-{key[:12]}"


# BuildConfig fields that do not change a build's output, left out of its work_root key.
WORK_KEY_EXCLUDED = frozenset(
    {
        "vlm_api_key_block",
        "stylize_api_key_block",
        "gpu_memory_gb",
        "shards_in_flight",
        "pool_sizes",
    }
)
# Fields that were in the key once and no longer are: hashed at the default they had then, so
# the work folders of builds started by earlier releases keep their keys (the shard window was
# 2 before it was derived from the largest pool).
WORK_KEY_FROZEN = {"shards_in_flight": 2}

# The fields' types (their bounds and choices included) are checked by pydantic, strictly (no
# bool for an int, no "3" for a number), here rather than by making BuildConfig a pydantic
# dataclass: the values are checked, never converted (a pydantic float field keeps an int 1 as
# 1.0, and `work_root` hashes the values as given, so a build given an int for a float setting
# would get a new key and lose its resumable work); a pydantic dataclass stops at a bad field
# and never reaches the checks that combine fields, where this reports every problem in one
# message; and a later release's subclass may stay a plain dataclass.
_RELATIONS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<="}


@functools.cache
def _field_adapters(config_class: type) -> dict[str, TypeAdapter]:
    hints = typing.get_type_hints(config_class, include_extras=True)
    return {
        field.name: TypeAdapter(hints[field.name], config=STRICT)
        for field in dataclasses.fields(config_class)
    }


def field_problems(config: BuildConfig) -> tuple[list[str], bool]:
    """A problem per field whose value is not of its type, bounds or choices, worded as the
    build words them ("limit must be >= 0, got -1"), and whether a value is of the wrong type."""
    problems, mistyped = [], False
    for field in dataclasses.fields(config):
        try:
            _field_adapters(type(config))[field.name].validate_python(getattr(config, field.name))
        except ValidationError as error:
            for item in error.errors(include_url=False):
                name = ".".join(str(part) for part in (field.name, *item["loc"]))
                value, kind = item["input"], item["type"]
                if kind in _RELATIONS:
                    (bound,) = item["ctx"].values()
                    bound = int(bound) if float(bound).is_integer() else bound
                    problems.append(f"{name} must be {_RELATIONS[kind]} {bound}, got {value}")
                elif kind == "literal_error":
                    choices = field.metadata["choices"] or item["ctx"]["expected"]
                    problems.append(f"{name} must be one of {choices}, got {value!r}")
                else:
                    mistyped = mistyped or kind.endswith("_type")
                    message = item["msg"].replace("Input should be", "must be")
                    problems.append(f"{name} {message}, got {value!r}")
    return problems, mistyped


def _unused(config: BuildConfig, backend: str, used_with: str, names: tuple[str, ...]) -> list:
    """A problem per setting in `names` that is set although `backend` is not `used_with`."""
    return [
        f"{name} is only used with {backend} {used_with}, and {backend} is "
        f"{getattr(config, backend)!r}"
        for name in names
        if getattr(config, name) is not None
    ]


def vlm_server(config: BuildConfig) -> dict[str, Any]:
    """The openai-backend settings of caption and judge (VLMConfig's defaults where unset)."""
    server: dict[str, Any] = {"backend": "openai"}
    if config.caption_base_url is not None:
        server["base_url"] = config.caption_base_url
    if config.caption_model is not None:
        server["model"] = config.caption_model
    return server


def _check_writable(out: Path) -> list[str]:
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return [f"out {out}: {existing} is not a directory"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"out {out}: {existing} is not writable"]
    return []


# --- the settings as flow parameters, command-line options and run-config files ----------


def settings_fields(split: str) -> list[dataclasses.Field]:
    """The settings a `split` build takes, in definition order."""
    return [
        f
        for f in dataclasses.fields(BuildConfig)
        if f.metadata["exposed"] and split in f.metadata["splits"]
    ]


def split_problems(split: str, values: dict[str, Any]) -> list[str]:
    """A problem per setting in `values` that belongs to the other tier and is not left at
    its default (the ct tier stylizes with SDXL; sft keeps every candidate for review)."""
    problems = []
    for field in dataclasses.fields(BuildConfig):
        if split in field.metadata["splits"] or field.name not in values:
            continue
        if values[field.name] != field.default:
            others = "/".join(field.metadata["splits"])
            problems.append(f"{field.name} is for {others} builds, not {split}")
    return problems


@functools.cache
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(BuildConfig)


def _setting_type(field: dataclasses.Field) -> Any:
    """The type a flow parameter or an option of this setting takes; None means unset."""
    if field.metadata["choices"]:
        return Literal[field.metadata["choices"]] | None
    hint = _type_hints()[field.name]
    if hint == tuple[str, ...]:
        return list[str] | None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (args[0] if args else hint) | None


def _default_text(field: dataclasses.Field) -> str:
    if field.default is dataclasses.MISSING:
        return "required"
    if field.default is None or field.default == ():
        return ""
    return f"default: {field.default!r}"


def flow_parameters(split: str):
    """Give a flow function `fn(**parameters)` the settings of `split` as its parameters
    (each optional: unset takes the run-config file's value, then the default), plus
    `config` (a run-config file) and `use_ray`, with a docstring Prefect shows per field."""

    def decorate(fn):
        parameters, lines = [], []
        for field in settings_fields(split):
            parameters.append(
                inspect.Parameter(
                    field.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=_setting_type(field),
                )
            )
            default = _default_text(field)
            suffix = f" ({default})" if default else ""
            lines.append(f"    {field.name}: {field.metadata['help']}{suffix}")
        parameters.append(
            inspect.Parameter(
                "config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=str | None
            )
        )
        lines.append("    config: A run-config file (TOML) of settings; parameters given win.")
        parameters.append(
            inspect.Parameter(
                "use_ray", inspect.Parameter.KEYWORD_ONLY, default=True, annotation=bool
            )
        )
        lines.append("    use_ray: Run each stage's model in a Ray actor (default: true).")
        fn.__signature__ = inspect.Signature(parameters, return_annotation=dict)
        fn.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": dict}
        fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n\nArgs:\n" + "\n".join(lines) + "\n"
        return fn

    return decorate


def read_run_config(path: str | os.PathLike, split: str) -> dict[str, Any]:
    """The settings in a run-config file (TOML, keys named as the settings). An unknown key,
    or one for the other tier, is an error naming it."""
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise BuildConfigError(f"run-config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise BuildConfigError(f"run-config file {path}: {error}") from None
    check_setting_names(values, split, where=f"run-config file {path}")
    if isinstance(values.get("styles"), str):
        values["styles"] = [values["styles"]]
    return typed_settings(values, where=f"run-config file {path}")


def typed_settings(values: dict[str, Any], where: str) -> dict[str, Any]:
    """The values as their settings' types (a TOML integer for a float setting, say), or an
    error naming each setting whose value is of the wrong kind."""
    import pydantic

    fields = {f.name: f for f in dataclasses.fields(BuildConfig)}
    typed, problems = {}, []
    for name, value in values.items():
        try:
            typed[name] = pydantic.TypeAdapter(_setting_type(fields[name])).validate_python(value)
        except pydantic.ValidationError as error:
            reason = error.errors()[0]["msg"]
            problems.append(f"{name} = {value!r}: {reason}")
    if problems:
        raise BuildConfigError(f"{where}: " + "; ".join(problems))
    return typed


def check_setting_names(values: dict[str, Any], split: str, where: str) -> None:
    """Refuse keys that are not settings of a `split` build, naming each (and a close match)."""
    known = {f.name for f in settings_fields(split)}
    every = {f.name for f in dataclasses.fields(BuildConfig) if f.metadata["exposed"]}
    problems = []
    for key in values:
        if key in known:
            continue
        if key in every:
            problems.append(f"{key!r} is not a setting of {split} builds")
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1)
        problems.append(
            f"unknown setting {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
        )
    if problems:
        raise BuildConfigError(f"{where}: " + "; ".join(problems))


def build_config(
    split: str, given: dict[str, Any], config_file: str | os.PathLike | None = None
) -> BuildConfig:
    """The BuildConfig of a run: the run-config file's settings, then those `given` that are
    set (not None) on top."""
    check_setting_names(given, split, where="build parameters")
    values = read_run_config(config_file, split) if config_file else {}
    values |= {k: v for k, v in given.items() if v is not None}
    missing = [name for name in ("source", "out") if name not in values]
    if missing:
        raise BuildConfigError(
            f"invalid build parameters: {' and '.join(missing)} must be given (as a parameter, "
            "an option or in the run-config file)"
        )
    if "styles" in values:
        values["styles"] = tuple(values["styles"])
    for name in ("source", "out", "tiny_dir"):
        if isinstance(values.get(name), os.PathLike):
            values[name] = os.fspath(values[name])
    return BuildConfig(split=split, **values)  # a value of the wrong kind is a BuildConfigError


def cli_options(config_class: type = BuildConfig) -> list[tuple[str, Any, Any]]:
    """(name, type, typer.Option) per setting of either tier, for `datagen build`: named after
    the setting (`--num-frames`), with the older spellings kept (`--k`, `--csd`), each unset
    (None) unless given. The command refuses the other tier's settings by name."""
    import typer

    options = []
    for field in dataclasses.fields(config_class):
        if not field.metadata["exposed"]:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = _setting_type(field)
        if field.name == "styles":  # one style per option, repeated
            declarations: tuple[str, ...] = ("--style", "--styles")
        elif kind == bool | None:
            declarations = (f"{flag}/--no-{flag[2:]}",)
        else:
            declarations = (flag, *field.metadata["flags"])
        default = _default_text(field)
        tiers = field.metadata["splits"]
        help_text = field.metadata["help"] + (f" ({default})" if default else "")
        if tiers != SPLITS:
            help_text += f" [{'/'.join(tiers)} only]"
        options.append((field.name, kind, typer.Option(None, *declarations, help=help_text)))
    return options
