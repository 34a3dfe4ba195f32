"""Control stage: the per-frame control video both branches are animated under.

Three kinds:
- `depth`: Depth-Anything-V2 through transformers (production
  `depth-anything/Depth-Anything-V2-Large-hf`), each frame's relative depth resized back with
  bilinear interpolation and normalised on its own, the way VACE's Depth-Anything-V2 annotator
  makes the maps VACE was trained on (vace/annotators/depth_anything_v2/dpt.py:54;
  vace/annotators/depth.py:72-75: min to 0, max to 255, truncated to uint8; its MiDaS
  annotator, depth.py:32-36, does the same per frame).
- `pose`: controlnet-aux OpenPose body detector (production `lllyasviel/Annotators`,
  `body_pose_model.pth`); skeletons drawn on black.
- `dwpose`: DWPose body + face (production `yzd-v/DWPose`, two ONNX models through onnxruntime),
  drawn as VACE's own pose annotator draws them (datagen/stages/dwpose.py).

Whatever the kind, the stylize step's SDXL depth ControlNet (`diffusers/controlnet-depth-sdxl-1.0`,
trained on depth maps) is conditioned on depth: each ControlInput names the frames the stylize
step will stylize (`stylize_frames`), and the output carries their depth maps
(`stylize_maps`): for `depth` those frames of the control video; for the pose kinds, the depth
model runs on just those frames too (per-frame normalisation makes them the same maps).

The output has exactly the clip's frame count and size: detectors work at their own resolution
(controlnet-aux snaps sizes to multiples of 64 and can distort the aspect ratio), and every map
is resized back to the frame size here. `control_sha256` is the SHA-256 of the control video's
shape and pixels, recorded in the row so that both branches provably used the same control.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from PIL import Image
from pydantic import Field

from datagen.core.config import PositiveInt, config_class
from datagen.core.stage import ModelRef, Reject, Resources, Stage, pick_device
from datagen.models.registry import Profile, resolve

CONTROL_KINDS = ("depth", "pose", "dwpose")
MODEL_KEYS = {"depth": "depth_anything", "pose": "annotators", "dwpose": "dwpose"}
STYLIZE_CONTROL = "depth"  # what the stylize step's ControlNet is conditioned on, for every kind
MinResolution = Annotated[int, Field(ge=64)]  # a pose detector's working size, in pixels


@config_class
class ControlConfig:
    kind: str = "depth"  # one of CONTROL_KINDS (checked below, in the message "control kind")
    profile: Profile = "tiny"
    tiny_dir: str | None = None
    hub_id: str | None = None  # override the production repo (e.g. a Depth-Anything-V2 Small)
    frame_batch: PositiveInt = 16  # frames per depth forward pass
    pose_detect_resolution: MinResolution = 512  # OpenPose's working size (production default)
    dwpose_resolution: MinResolution = 1024  # DWPose's short side: VACE's RESIZE_SIZE (pose.py:41)

    def __post_init__(self) -> None:
        if self.kind not in CONTROL_KINDS:
            raise ValueError(f"control kind must be one of {CONTROL_KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class ControlInput:
    sample_id: str
    frames: np.ndarray  # (F, H, W, 3) uint8
    stylize_frames: tuple[int, ...] = ()  # indices of the frames the stylize step stylizes


@dataclass(frozen=True)
class ControlOutput:
    sample_id: str
    kind: str
    frames: np.ndarray  # (F, H, W, 3) uint8, same F, H, W as the input
    sha256: str
    # (len(stylize_frames), H, W, 3) uint8: the depth maps of the stylize frames, in order
    stylize_maps: np.ndarray | None = None
    stylize_control: str = STYLIZE_CONTROL


def control_sha256(frames: np.ndarray) -> str:
    """SHA-256 of a control video: its shape, dtype and pixels."""
    digest = hashlib.sha256(f"{frames.shape}|{frames.dtype}|".encode())
    digest.update(np.ascontiguousarray(frames).tobytes())
    return digest.hexdigest()


def normalize_depth(depth: np.ndarray) -> np.ndarray:
    """(F, H, W) float relative depth -> (F, H, W, 3) uint8 gray maps, each frame on its own:
    its minimum to 0 and its maximum to 255, truncated to uint8, as VACE's depth annotators do
    (vace/annotators/depth.py:72-78 and 32-37). A constant frame maps to black (VACE's
    division would be 0/0 there)."""
    low = depth.min(axis=(1, 2), keepdims=True)
    span = depth.max(axis=(1, 2), keepdims=True) - low
    scaled = np.divide(depth - low, span, out=np.zeros_like(depth), where=span > 0)
    gray = (scaled * 255.0).clip(0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (F, h, w, 3) uint8 maps to (F, height, width, 3), ignoring aspect (they were
    computed on a distorted copy of the frame and map back onto it exactly)."""
    if maps.shape[1:3] == (height, width):
        return maps
    return np.stack(
        [
            np.asarray(Image.fromarray(m).resize((width, height), Image.Resampling.BILINEAR))
            for m in maps
        ]
    )


class ControlStage(Stage[ControlInput, ControlOutput]):
    name = "control"

    def __init__(self, config: ControlConfig | None = None, resources: Resources | None = None):
        super().__init__(resources or Resources(num_gpus=0.25, num_cpus=1))
        self.config = config or ControlConfig()
        self._refs: dict[str, ModelRef] = {}

    def _load(self) -> None:
        import torch
        from transformers import AutoImageProcessor, DepthAnythingForDepthEstimation

        self.device = pick_device(self.resources)
        self._torch = torch
        config = self.config
        model = resolve(MODEL_KEYS[config.kind], config.profile, config.tiny_dir, config.hub_id)
        # depth serves the stylize step whatever the kind; for `depth` it is the control too
        if config.kind == "depth":
            depth = model
        else:
            depth = resolve(MODEL_KEYS["depth"], config.profile, config.tiny_dir)
        self.processor = AutoImageProcessor.from_pretrained(depth.path)
        self.depth_model = DepthAnythingForDepthEstimation.from_pretrained(depth.path)
        self.depth_model.to(self.device).eval()
        self._refs = {f"control_{config.kind}": model.ref}
        if config.kind == "pose":
            from controlnet_aux.open_pose import OpenposeDetector
            from controlnet_aux.open_pose.body import Body

            # Body only: hands and faces are not drawn into the control video. Body() loads
            # with torch.load, whose default is weights_only=True in the torch we require.
            body = Body(str(model.path / "body_pose_model.pth")).to(self.device)
            self.model = OpenposeDetector(body)
        elif config.kind == "dwpose":
            from datagen.stages.dwpose import DWPose

            self.model = DWPose(model.path, self.device, threads=torch.get_num_threads())
        if config.kind != "depth":
            self._refs["stylize_depth"] = depth.ref

    def models(self) -> dict[str, ModelRef]:
        return dict(self._refs)

    def params(self) -> dict:
        return {
            "kind": self.config.kind,
            "frame_batch": self.config.frame_batch,
            "pose_detect_resolution": self.config.pose_detect_resolution,
            "dwpose_resolution": self.config.dwpose_resolution,
            "depth_normalization": "per_frame",
            "stylize_control": STYLIZE_CONTROL,
        }

    def _process(self, batch: list[ControlInput]) -> list[ControlOutput | Reject]:
        results: list[ControlOutput | Reject] = []
        for item in batch:
            frames = item.frames
            if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
                results.append(
                    self.reject(
                        item.sample_id,
                        "bad_frames",
                        f"expected uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}",
                    )
                )
                continue
            if len(frames) == 0:
                results.append(self.reject(item.sample_id, "bad_frames", "no frames"))
                continue
            chosen = list(item.stylize_frames)
            if any(not 0 <= i < len(frames) for i in chosen):
                results.append(
                    self.reject(
                        item.sample_id,
                        "bad_frames",
                        f"stylize frames {chosen} outside the clip's {len(frames)} frames",
                    )
                )
                continue
            if self.config.kind == "depth":
                maps = self._depth(frames)
                stylize_maps = None if maps is None else maps[chosen]
            else:
                maps = self._pose(frames) if self.config.kind == "pose" else self._dwpose(frames)
                stylize_maps = self._depth(frames[chosen])
            if maps is None or stylize_maps is None:
                results.append(
                    self.reject(
                        item.sample_id, "control_nan", "depth model returned non-finite values"
                    )
                )
                continue
            results.append(
                ControlOutput(
                    item.sample_id, self.config.kind, maps, control_sha256(maps), stylize_maps
                )
            )
        return results

    def _depth(self, frames: np.ndarray) -> np.ndarray | None:
        """Per-frame normalised depth maps, (F, H, W, 3) uint8; None if any value is not
        finite. F may be 0 (no stylize frames asked for)."""
        torch = self._torch
        height, width = frames.shape[1:3]
        if not len(frames):
            return np.zeros((0, height, width, 3), np.uint8)
        depths = []
        with torch.inference_mode():
            for start in range(0, len(frames), self.config.frame_batch):
                chunk = list(frames[start : start + self.config.frame_batch])
                inputs = self.processor(images=chunk, return_tensors="pt").to(self.device)
                predicted = self.depth_model(**inputs).predicted_depth  # (B, h, w)
                # back to the frame's size as VACE's annotator does (dpt.py:54)
                resized = torch.nn.functional.interpolate(
                    predicted[:, None].float(),
                    size=(height, width),
                    mode="bilinear",
                    align_corners=True,
                )[:, 0]
                depths.append(resized.cpu().numpy())
        depth = np.concatenate(depths)
        if not np.isfinite(depth).all():
            return None
        return normalize_depth(depth)

    def _dwpose(self, frames: np.ndarray) -> np.ndarray:
        resolution = self.config.dwpose_resolution
        return np.stack([self.model(frame, resolution) for frame in frames])

    def _pose(self, frames: np.ndarray) -> np.ndarray:
        height, width = frames.shape[1:3]
        resolution = self.config.pose_detect_resolution
        maps = [
            self.model(
                frame, detect_resolution=resolution, image_resolution=resolution, output_type="np"
            )
            for frame in frames
        ]
        return np.stack([resize_maps(m[None], height, width)[0] for m in maps])
