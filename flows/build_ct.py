"""Flow `build-ct`: the CT tier of paired video stylization data.

    plan -> control -> describe -> stylize -> animate -> caption -> score [-> judge] -> write

CT keeps pairs with `csd_score > csd_threshold` (0.5 in the paper) and, when asked, a passing
VLM verdict; the rest are recorded as rejects with their reason. The parameters are the build's
settings (datagen/build/settings.py, one definition for the flows, `datagen build` and run-config
files); each may be left unset, and `config` names a run-config file (TOML) whose settings the
given parameters override. Caption (and judge) may use an OpenAI-compatible VLM server
(`caption_backend="openai"`), whose API key comes from $DATAGEN_VLM_API_KEY on the stage's
worker or from the Prefect Secret block named by `vlm_api_key_block` (datagen/core/api_keys.py).
Run it through a deployment (`prefect deployment run build-ct/local`) or directly
(`datagen build ct ...`).
"""

from __future__ import annotations

from prefect import flow

from datagen.build.settings import build_config, flow_parameters
from datagen.run.prefect import run_build


@flow(name="build-ct", log_prints=True)
@flow_parameters("ct")
def build_ct(*, config: str | None = None, use_ray: bool = True, **settings) -> dict:
    """Build CT pairs from the videos in `source` into `out`/ct."""
    return run_build(build_config("ct", settings, config), use_ray=use_ray)
