"""Animate stage: bring the raw and the stylized first frames to life under one control video.

Wan2.1 VACE through diffusers (`WanVACEPipeline`; production `Wan-AI/Wan2.1-VACE-14B-diffusers`,
or `Wan-AI/Wan2.1-VACE-1.3B-diffusers` through `hub_id`). Each member is conditioned the VACE
image-to-video way: the conditioning video is the member's first frame followed by control
frames 1..F-1, and the mask keeps frame 0 (black) and regenerates the rest (white).

The two members of a pair share everything but their first frame: the same control video, the
same prompt and negative prompt, and the same initial noise, drawn once from the sample's seed
on the CPU (so a seed means the same noise on any device) and repeated for both. They go
through ONE pipeline call: the raw member of the pair is this regenerated video, not the source
clip, which is what keeps the two motions matched.

Stock `WanVACEPipeline` refuses batches (list prompts, more than one conditioning video).
`batched_pipeline_class()` subclasses it and overrides only `prepare_video_latents` and
`prepare_masks`, which encode one video at a time in a loop; the prompt embeddings are computed
once per sample and passed repeated, and the noise is passed as `latents` (the pipeline rejects a
list of generators). Given the same latents, a batched member equals the stock single call
(tests/test_animate.py). Several pairs may share one call (`max_pairs_per_call`).

Both profiles load with the same code (`load_pipeline`); only the directory differs.
"""

from __future__ import annotations

import functools
import hashlib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from datagen.core.config import NonNegativeFloat, PositiveFloat, PositiveInt, config_class
from datagen.core.stage import ModelRef, Reject, Resources, Stage, pick_device
from datagen.models.registry import SOURCES, Profile, resolve

MODEL_KEY = "wan_vace"
# Wan's own negative prompt lists "style, works, paintings"; those would push the stylized
# member away from its style, so this one names only quality defects.
DEFAULT_NEGATIVE_PROMPT = (
    "blurry, low quality, worst quality, JPEG artifacts, overexposed, static frame, flicker, "
    "deformed, disfigured, extra limbs, fused fingers, subtitles, watermark"
)
PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"num_frames": 9, "height": 64, "width": 64, "steps": 2},
    "production": {"num_frames": 81, "height": 480, "width": 832, "steps": 50},
}
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = typing.get_args(Dtype)
HUB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$"  # owner/name
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
MAX_SEED = 2**63 - 1

# Reject reason codes.
BAD_INPUT = "bad_input"
FRAME_COUNT_MISMATCH = "frame_count_mismatch"
SIZE_MISMATCH = "size_mismatch"
CONTROL_SHA_MISMATCH = "control_sha_mismatch"
NON_FINITE_OUTPUT = "non_finite_output"


# Sizes: at least one latent step in time (5 frames) and one 16-pixel cell in space.
MinFrames = Annotated[int, Field(ge=5)]
MinSide = Annotated[int, Field(ge=16)]
HubId = Annotated[str, Field(pattern=HUB_ID_PATTERN)]
Device = Annotated[str, Field(pattern=DEVICE_PATTERN)]


@config_class
class AnimateConfig:
    """Settings of the animate stage. Sizes and steps left as None take the profile's default."""

    profile: Profile = "tiny"
    tiny_dir: str | None = None
    hub_id: HubId | None = None  # production only, e.g. "Wan-AI/Wan2.1-VACE-1.3B-diffusers"
    num_frames: MinFrames | None = None  # 4k+1 (the VAE compresses time x4 after the first frame)
    height: MinSide | None = None  # multiple of 16 (VAE x8 times patch 2)
    width: MinSide | None = None
    steps: PositiveInt | None = None
    # Wan2.1 generate.py:242-245 (sample_guide_scale); 1.0 = no CFG
    guidance_scale: Annotated[float, Field(ge=1.0, allow_inf_nan=False)] = 5.0
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    # VACE's sample shift: Wan2.1 generate.py:80-81 sets 16 for every "vace" task (3.0 there is
    # the I2V 480p value, generate.py:78-79), and VACE's own vace/vace_wan_inference.py:49-50
    # defaults to 16 too.
    flow_shift: PositiveFloat = 16.0
    conditioning_scale: NonNegativeFloat = 1.0
    max_sequence_length: Annotated[int, Field(ge=1, le=512)] = 512
    max_pairs_per_call: PositiveInt = 1  # pairs per pipeline call (2 members each)
    device: Device = "auto"  # "auto" follows Resources: cuda when a GPU is asked for and visible
    dtype: Dtype = "auto"  # transformer and text encoder; auto: bfloat16 on cuda, else float32

    def __post_init__(self) -> None:
        for name, value in PROFILE_DEFAULTS[self.profile].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames must be 4k+1 (5, 9, ..., 81), got {self.num_frames}")
        for name in ("height", "width"):
            if getattr(self, name) % 16:
                raise ValueError(f"{name} must be a multiple of 16, got {getattr(self, name)}")
        if self.hub_id is not None and self.profile != "production":
            raise ValueError("hub_id selects a production checkpoint; use profile=production")

    @property
    def repo(self) -> str:
        """The production hub id this config loads (the default or the override)."""
        return self.hub_id or SOURCES[MODEL_KEY].hub_id


@dataclass(frozen=True)
class AnimateInput:
    sample_id: str
    raw_first_frame: np.ndarray  # (H, W, 3) uint8
    stylized_first_frame: np.ndarray  # (H, W, 3) uint8
    control_frames: np.ndarray  # (F, H, W, 3) uint8
    control_sha256: str  # datagen.stages.control.control_sha256(control_frames)
    prompt: str
    seed: int


@dataclass(frozen=True)
class AnimateOutput:
    sample_id: str
    raw_frames: np.ndarray  # (F, H, W, 3) uint8
    stylized_frames: np.ndarray  # (F, H, W, 3) uint8
    # {"raw": {...}, "stylized": {...}}: identical records (control_sha256, seed, prompt, noise
    # hash and sampler settings), which `datagen validate` checks in params["animate"]
    conditions: dict[str, dict[str, Any]]


@functools.cache
def batched_pipeline_class() -> type:
    """`WanVACEPipeline` with batched conditioning (imports diffusers, so built on first use)."""
    import torch
    from diffusers import WanVACEPipeline

    class BatchedWanVACEPipeline(WanVACEPipeline):
        """Encodes each member's conditioning video and mask on its own, then stacks them.

        Upstream, only these two steps refuse more than one video (list prompts are refused
        too, which the stage avoids by passing prompt embeddings); the denoising loop and the
        decoding are batched already. Each member goes through the stock single-video code.
        """

        def prepare_video_latents(
            self, video, mask, reference_images=None, generator=None, device=None
        ):
            parent = super()  # bound here: a bare super() inside a comprehension fails
            parts = [
                parent.prepare_video_latents(
                    video[i : i + 1],
                    None if mask is None else mask[i : i + 1],
                    None if reference_images is None else reference_images[i : i + 1],
                    generator,
                    device,
                )
                for i in range(video.shape[0])
            ]
            return torch.cat(parts)

        def prepare_masks(self, mask, reference_images=None, generator=None):
            parent = super()
            parts = [
                parent.prepare_masks(
                    mask[i : i + 1],
                    None if reference_images is None else reference_images[i : i + 1],
                    generator,
                )
                for i in range(mask.shape[0])
            ]
            return torch.cat(parts)

    return BatchedWanVACEPipeline


def load_pipeline(path: str | Path, device: str, dtype: Any, flow_shift: float):
    """Load the batched VACE pipeline from a diffusers repo directory (hub snapshot or twin)."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

    # The VAE stays in float32 whatever the transformer's dtype, as diffusers' Wan examples
    # load it: it is small, and the decoded pixels are the product.
    vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=torch.float32)
    pipe = batched_pipeline_class().from_pretrained(path, vae=vae, dtype=dtype)
    # Set once here, never per call: Wan's UniPC flow sampler with the configured shift (VACE: 16).
    pipe.scheduler = UniPCMultistepScheduler.from_config(
        pipe.scheduler.config,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class AnimateStage(Stage[AnimateInput, AnimateOutput]):
    """Wan VACE image-to-video: one (raw, stylized) pair per sample, same conditions."""

    name = "animate"

    def __init__(self, config: AnimateConfig | None = None, resources: Resources | None = None):
        super().__init__(resources or Resources(num_gpus=1, num_cpus=1))
        self.config = config or AnimateConfig()
        self.pipe = None
        self._ref: ModelRef | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def _load(self) -> None:
        import torch

        config = self.config
        model = resolve(MODEL_KEY, config.profile, config.tiny_dir, hub_id=config.hub_id)
        self.device = pick_device(self.resources) if config.device == "auto" else config.device
        if config.dtype == "auto":
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        else:
            dtype = getattr(torch, config.dtype)
        self.pipe = load_pipeline(model.path, self.device, dtype, config.flow_shift)
        self._ref = model.ref
        self._torch = torch

    def models(self) -> dict[str, ModelRef]:
        return {MODEL_KEY: self._ref} if self._ref else {}

    def params(self) -> dict[str, Any]:
        return self._settings()

    # --- inference -------------------------------------------------------------------------

    def initial_noise(self, seed: int):
        """The seed's initial latents, (1, C, T, H/8, W/8) float32, drawn on the CPU."""
        torch = self._torch
        pipe = self.pipe
        shape = (
            1,
            pipe.transformer.config.in_channels,
            (self.config.num_frames - 1) // pipe.vae_scale_factor_temporal + 1,
            self.config.height // pipe.vae_scale_factor_spatial,
            self.config.width // pipe.vae_scale_factor_spatial,
        )
        generator = torch.Generator("cpu").manual_seed(seed)
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    def generate_pairs(self, samples: list[AnimateInput]) -> tuple[np.ndarray, list[str]]:
        """One pipeline call for len(samples) pairs: float frames in [0, 1] of shape
        (2N, F, H, W, 3), members ordered raw_0, stylized_0, raw_1, ...; and per sample the
        SHA-256 of the noise both of its members started from. Inputs must be validated."""
        torch = self._torch
        config = self.config
        count, frames, height, width = len(samples), config.num_frames, config.height, config.width
        # The VideoProcessor takes float arrays in [0, 1] (uint8 arrays would not be rescaled).
        video = np.empty((2 * count, frames, height, width, 3), dtype=np.float32)
        for i, sample in enumerate(samples):
            video[2 * i, 0] = sample.raw_first_frame
            video[2 * i + 1, 0] = sample.stylized_first_frame
            video[2 * i : 2 * i + 2, 1:] = sample.control_frames[1:]
        video /= 255.0
        # Keep frame 0 (mask 0, black), generate frames 1..F-1 (mask 1, white).
        mask = np.ones((2 * count, frames, height, width, 1), dtype=np.float32)
        mask[:, 0] = 0.0
        noise = [self.initial_noise(sample.seed) for sample in samples]
        latents = torch.cat([n.repeat(2, 1, 1, 1, 1) for n in noise])
        guided = config.guidance_scale > 1.0
        with torch.inference_mode():
            prompt_embeds, negative_embeds = self.pipe.encode_prompt(
                [sample.prompt for sample in samples],
                negative_prompt=[config.negative_prompt] * count if guided else None,
                do_classifier_free_guidance=guided,
                num_videos_per_prompt=2,  # each prompt repeated for its raw and stylized member
                max_sequence_length=config.max_sequence_length,
            )
            output = self.pipe(
                video=video,
                mask=mask,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds,
                latents=latents,
                height=height,
                width=width,
                num_frames=frames,
                num_inference_steps=config.steps,
                guidance_scale=config.guidance_scale,
                conditioning_scale=config.conditioning_scale,
                max_sequence_length=config.max_sequence_length,
                output_type="np",
            ).frames
        hashes = [hashlib.sha256(n.numpy().tobytes()).hexdigest() for n in noise]
        return np.asarray(output, dtype=np.float32), hashes

    def _process(self, batch: list[AnimateInput]) -> list[AnimateOutput | Reject]:
        results: list[AnimateOutput | Reject | None] = [None] * len(batch)
        ready: list[int] = []
        for index, sample in enumerate(batch):
            problem = self._check(sample)
            if problem:
                results[index] = self.reject(sample.sample_id, *problem)
            else:
                ready.append(index)
        step = self.config.max_pairs_per_call
        for start in range(0, len(ready), step):
            chunk = ready[start : start + step]
            frames, noise_hashes = self.generate_pairs([batch[i] for i in chunk])
            for j, index in enumerate(chunk):
                results[index] = self._output(
                    batch[index], frames[2 * j], frames[2 * j + 1], noise_hashes[j]
                )
        return results  # type: ignore[return-value]

    # --- helpers ---------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        c = self.config
        return {
            "negative_prompt": c.negative_prompt,
            "num_frames": c.num_frames,
            "height": c.height,
            "width": c.width,
            "steps": c.steps,
            "guidance_scale": c.guidance_scale,
            "flow_shift": c.flow_shift,
            "conditioning_scale": c.conditioning_scale,
            "max_sequence_length": c.max_sequence_length,
        }

    def _output(
        self, sample: AnimateInput, raw: np.ndarray, stylized: np.ndarray, noise_sha256: str
    ) -> AnimateOutput | Reject:
        for branch, frames in (("raw", raw), ("stylized", stylized)):
            if not np.isfinite(frames).all():
                bad = int((~np.isfinite(frames)).sum())
                return self.reject(
                    sample.sample_id, NON_FINITE_OUTPUT, f"{branch} video has {bad} NaN/inf values"
                )
        record = {
            "control_sha256": sample.control_sha256,
            "seed": int(sample.seed),
            "prompt": sample.prompt,
            "noise_sha256": noise_sha256,
            **self._settings(),
        }
        return AnimateOutput(
            sample_id=sample.sample_id,
            raw_frames=to_uint8(raw),
            stylized_frames=to_uint8(stylized),
            conditions={"raw": dict(record), "stylized": dict(record)},
        )

    def _check(self, sample: AnimateInput) -> tuple[str, str] | None:
        """(reason, detail) when the sample cannot be animated under this config."""
        from datagen.stages.control import control_sha256

        config = self.config
        size = (config.height, config.width)
        if not isinstance(sample.prompt, str) or not sample.prompt.strip():
            return BAD_INPUT, "prompt is empty"
        if isinstance(sample.seed, bool) or not isinstance(sample.seed, int | np.integer):
            return BAD_INPUT, f"seed must be an integer, got {sample.seed!r}"
        if not 0 <= int(sample.seed) <= MAX_SEED:
            return BAD_INPUT, f"seed must be in [0, 2**63), got {sample.seed}"
        images = {
            "raw_first_frame": (sample.raw_first_frame, 3),
            "stylized_first_frame": (sample.stylized_first_frame, 3),
            "control_frames": (sample.control_frames, 4),
        }
        for name, (array, ndim) in images.items():
            if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
                kind = getattr(array, "dtype", type(array).__name__)
                return BAD_INPUT, f"{name} must be a uint8 array, got {kind}"
            if array.ndim != ndim or array.shape[-1] != 3:
                return BAD_INPUT, f"{name} must have {ndim} dims ending in 3, got {array.shape}"
        control = sample.control_frames
        if control.shape[0] != config.num_frames:
            return (
                FRAME_COUNT_MISMATCH,
                f"control video has {control.shape[0]} frames, the model makes {config.num_frames}",
            )
        for name, (array, _) in images.items():
            if array.shape[-3:-1] != size:
                return (
                    SIZE_MISMATCH,
                    f"{name} is {array.shape[-3]}x{array.shape[-2]}, expected "
                    f"{config.height}x{config.width}",
                )
        if sample.control_sha256 != control_sha256(control):
            return (
                CONTROL_SHA_MISMATCH,
                "control_sha256 does not describe the control frames given",
            )
        return None


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Frames in [0, 1] to uint8, rounding to nearest."""
    return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)
