"""Flow `build-sft`: SFT candidates, written with `review_status = pending` for human review.

Same stages as build-ct; the stylize stage may use the higher-quality HTTP image-edit backend
(`stylize_backend="http"`, `stylize_url`), and caption (and judge) an OpenAI-compatible VLM
server (`caption_backend="openai"`, `caption_base_url`, `caption_model`). Their API keys come
from $DATAGEN_IMAGE_EDIT_API_KEY and $DATAGEN_VLM_API_KEY on the stage's worker, or from the
Prefect Secret blocks named by `stylize_api_key_block` and `vlm_api_key_block`
(datagen/api_keys.py). Nothing is filtered out automatically: every candidate goes to
`datagen review`.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow

from datagen.orchestrate import run_build
from datagen.pipeline import BuildConfig


@flow(name="build-sft", log_prints=True)
def build_sft(
    source: str,
    out: str,
    styles: list[str] | None = None,
    limit: int | None = None,
    clips_per_video: int = 1,
    shard_size: int = 8,
    profile: Literal["tiny", "production"] = "tiny",
    tiny_dir: str | None = None,
    seed: int = 0,
    k_refs: int = 3,
    control_kind: Literal["depth", "pose"] = "depth",
    vlm_judge: bool = False,
    stylize_backend: Literal["sdxl", "http"] = "sdxl",
    stylize_url: str | None = None,
    stylize_api_key_block: str | None = None,
    caption_backend: Literal["transformers", "openai"] = "transformers",
    caption_base_url: str | None = None,
    caption_model: str | None = None,
    vlm_api_key_block: str | None = None,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    fps: float | None = None,
    batch_size: int = 2,
    use_ray: bool = True,
) -> dict:
    """Build SFT candidates from the videos in `source` into `out`/sft."""
    config = BuildConfig(
        source=source,
        out=out,
        split="sft",
        styles=tuple(styles or ()),
        limit=limit,
        clips_per_video=clips_per_video,
        shard_size=shard_size,
        profile=profile,
        tiny_dir=tiny_dir,
        seed=seed,
        k_refs=k_refs,
        control_kind=control_kind,
        vlm_judge=vlm_judge,
        stylize_backend=stylize_backend,
        stylize_url=stylize_url,
        stylize_api_key_block=stylize_api_key_block,
        caption_backend=caption_backend,
        caption_base_url=caption_base_url,
        caption_model=caption_model,
        vlm_api_key_block=vlm_api_key_block,
        num_frames=num_frames,
        height=height,
        width=width,
        fps=fps,
        batch_size=batch_size,
    )
    return run_build(config, use_ray=use_ray)
