"""Flow `build-ct`: the CT tier of paired video stylization data.

    plan -> control -> stylize -> animate -> caption -> score [-> judge] -> write

CT keeps pairs with `csd_score > csd_threshold` (0.5 in the paper) and, when asked, a passing
VLM verdict; the rest are recorded as rejects with their reason. Caption (and judge) may use an
OpenAI-compatible VLM server (`caption_backend="openai"`, `caption_base_url`, `caption_model`),
whose API key comes from $DATAGEN_VLM_API_KEY on the stage's worker or from the Prefect Secret
block named by `vlm_api_key_block` (datagen/api_keys.py). Run it through a deployment
(`prefect deployment run build-ct/local`) or directly (`datagen build ct ...`).
"""

from __future__ import annotations

from typing import Literal

from prefect import flow

from datagen.orchestrate import run_build
from datagen.pipeline import BuildConfig


@flow(name="build-ct", log_prints=True)
def build_ct(
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
    csd_threshold: float = 0.5,
    vlm_judge: bool = False,
    require_vlm_pass: bool = False,
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
    """Build CT pairs from the videos in `source` into `out`/ct."""
    config = BuildConfig(
        source=source,
        out=out,
        split="ct",
        styles=tuple(styles or ()),
        limit=limit,
        clips_per_video=clips_per_video,
        shard_size=shard_size,
        profile=profile,
        tiny_dir=tiny_dir,
        seed=seed,
        k_refs=k_refs,
        control_kind=control_kind,
        csd_threshold=csd_threshold,
        vlm_judge=vlm_judge,
        require_vlm_pass=require_vlm_pass,
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
