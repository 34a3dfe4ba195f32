"""Where each model comes from: its production hub id and the files its loader reads.

`SOURCES` lists, once per model, the files its production loader reads (`ModelSource.files`,
glob patterns as `hf download --include` and huggingface_hub match them: `*` crosses `/`). The
same list is what must be present for the model to count as present (datagen/models/registry.py
resolves it), and what the fetch command downloads, so a check that passes means the loader
finds its files, and a fetch downloads nothing the loader does not read (SDXL's repository
alone holds fp32, fp16, ONNX and OpenVINO copies of every weight). Where the hub repository
carries half-precision copies, the source names the variant (`ModelSource.variant = "fp16"`)
and lists the variant files.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

Profile = Literal["tiny", "production"]
PROFILES: tuple[str, ...] = typing.get_args(Profile)


@dataclass(frozen=True)
class ModelSource:
    """One model a stage loads. `env` names a variable that may point at a local directory.

    `files`: glob patterns (relative to the repository root) of every file the production
    loader reads; each must match at least one file for the model to be present, and they are
    the fetch command's `--include` list. `variant`: the weight variant those patterns name
    ("fp16": `*.fp16.safetensors`), or None; `plain_files` are the same patterns without it.
    """

    key: str
    hub_id: str
    purpose: str
    files: tuple[str, ...] = ()
    twin: str = ""  # "module:function" that builds the tiny twin into a directory
    variant: str | None = None

    @property
    def env(self) -> str:
        return f"DATAGEN_MODEL_{self.key.upper()}"

    @property
    def plain_files(self) -> tuple[str, ...]:
        """`files` with the variant taken out of the weight names (what save_pretrained writes
        without a variant, and what a full-precision download holds)."""
        if not self.variant:
            return self.files
        return tuple(pattern.replace(f".{self.variant}.", ".") for pattern in self.files)

    def download_command(self, hub_id: str | None = None) -> str:
        include = "".join(f" --include '{pattern}'" for pattern in self.files)
        return f"hf download {hub_id or self.hub_id}{include}"


def with_variant(name: str, variant: str | None) -> str:
    """A weight file's name in `variant` (`a/model.safetensors` -> `a/model.fp16.safetensors`),
    as diffusers and transformers name variant files (before the last suffix, or before
    `.json` in a shard index)."""
    if not variant:
        return name
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.rpartition(".")
    if not dot:
        return name
    renamed = f"{stem}.{variant}.{suffix}"
    return f"{folder}/{renamed}" if folder else renamed


# Tokenizer folders hold different files in the real repositories (vocab.json + merges.txt)
# and in the twins (tokenizer.json, as transformers 5 saves them): the folder is the pattern.
SDXL_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "tokenizer_2/*",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.fp16.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
)

# The 14B repository shards its transformer and text encoder (`*-0000k-of-0000n.safetensors` +
# `*.safetensors.index.json`); the 1.3B one and the twin hold single files. Both match.
WAN_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model*.safetensors*",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model*.safetensors*",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)

SOURCES: dict[str, ModelSource] = {
    source.key: source
    for source in (
        ModelSource(
            "depth_anything",
            "depth-anything/Depth-Anything-V2-Large-hf",
            "control: depth",
            files=("config.json", "model.safetensors", "preprocessor_config.json"),
            twin="datagen.models.twins.depth:build_depth_anything",
        ),
        ModelSource(
            "annotators",
            "lllyasviel/Annotators",
            "control: OpenPose body",
            # The pose control reads the body model only (hands and faces are not drawn).
            files=("body_pose_model.pth",),
            twin="datagen.models.twins.annotators:build_annotators",
        ),
        ModelSource(
            "dwpose",
            "yzd-v/DWPose",
            "control: DWPose (YOLOX-L detector + DW-LL pose, ONNX)",
            files=("yolox_l.onnx", "dw-ll_ucoco_384.onnx"),
            twin="datagen.models.twins.annotators:build_dwpose",
        ),
        ModelSource(
            "sdxl",
            "stabilityai/stable-diffusion-xl-base-1.0",
            "stylize: SDXL base",
            files=SDXL_FILES,
            twin="datagen.models.twins.sdxl:build_sdxl",
            variant="fp16",
        ),
        ModelSource(
            "controlnet_depth_sdxl",
            "diffusers/controlnet-depth-sdxl-1.0",
            "stylize: depth ControlNet",
            files=("config.json", "diffusion_pytorch_model.fp16.safetensors"),
            twin="datagen.models.twins.sdxl:build_controlnet_depth_sdxl",
            variant="fp16",
        ),
        ModelSource(
            "ip_adapter",
            "h94/IP-Adapter",
            "stylize: IP-Adapter (InstantStyle)",
            # load_ip_adapter(subfolder="sdxl_models", weight_name=...) reads the adapter and
            # the image encoder in sdxl_models/image_encoder/ (safetensors only: not the .bin).
            files=(
                "sdxl_models/ip-adapter_sdxl.safetensors",
                "sdxl_models/image_encoder/config.json",
                "sdxl_models/image_encoder/model.safetensors",
            ),
            twin="datagen.models.twins.sdxl:build_ip_adapter",
        ),
        ModelSource(
            "wan_vace",
            "Wan-AI/Wan2.1-VACE-14B-diffusers",
            "animate: image-to-video under control",
            files=WAN_FILES,
            twin="datagen.models.twins.wan:build_wan_vace",
        ),
        ModelSource(
            "qwen_vl",
            "Qwen/Qwen2.5-VL-7B-Instruct",
            "describe, caption and judge",
            # AutoProcessor + Qwen2_5_VLForConditionalGeneration. The hub repository has
            # preprocessor_config.json and chat_template.json, the twin (transformers 5's
            # save_pretrained) processor_config.json and chat_template.jinja: both match.
            files=(
                "config.json",
                "generation_config.json",
                "model*.safetensors*",
                "*processor_config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "chat_template.*",
            ),
            twin="datagen.models.twins.qwen:build_qwen_vl",
        ),
        ModelSource(
            "csd",
            "tomg-group-umd/CSD-ViT-L",
            "score: CSD style similarity",
            files=("pytorch_model.bin",),
            twin="datagen.models.twins.csd:build_csd",
        ),
        ModelSource(
            "dinov2",
            "facebook/dinov2-base",
            "score: DINOv2 structure",
            files=("config.json", "model.safetensors", "preprocessor_config.json"),
            twin="datagen.models.twins.dinov2:build_dinov2",
        ),
    )
}

# Lighter production alternatives a config may name instead of the default hub id.
ALTERNATIVES = {"wan_vace": ["Wan-AI/Wan2.1-VACE-1.3B-diffusers"]}
