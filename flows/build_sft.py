"""Flow `build-sft`: SFT candidates, written with `review_status = pending` for human review.

Same steps as build-ct; the stylize step may use the higher-quality HTTP image-edit backend
(`stylize_backend="http"`, `stylize_url`), and caption (and judge) an OpenAI-compatible VLM
server (`caption_backend="openai"`). Their API keys come from $DATAGEN_IMAGE_EDIT_API_KEY and
$DATAGEN_VLM_API_KEY on the stage's worker, or from the Prefect Secret blocks named by
`stylize_api_key_block` and `vlm_api_key_block` (datagen/core/api_keys.py). The parameters are the
build's settings (datagen/build/settings.py), each optional, with `config` naming a run-config file.
Nothing is filtered out automatically: every candidate goes to `datagen review`.
"""

from __future__ import annotations

from prefect import flow

from datagen.build.settings import build_config, flow_parameters
from datagen.run.prefect import run_build


@flow(name="build-sft", log_prints=True)
@flow_parameters("sft")
def build_sft(*, config: str | None = None, use_ray: bool = True, **settings) -> dict:
    """Build SFT candidates from the videos in `source` into `out`/sft."""
    return run_build(build_config("sft", settings, config), use_ray=use_ray)
