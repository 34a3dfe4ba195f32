"""Control stage: the per-frame control video both branches are animated under.

Two kinds:
- `depth`: Depth-Anything-V2 through transformers (production
  `depth-anything/Depth-Anything-V2-Large-hf`); relative depth normalised over the whole clip
  (one min/max per clip, so brightness does not flicker from frame to frame).
- `pose`: controlnet-aux OpenPose body detector (production `lllyasviel/Annotators`,
  `body_pose_model.pth`); skeletons drawn on black.

The output has exactly the clip's frame count and size: detectors work at their own resolution
(controlnet-aux snaps sizes to multiples of 64 and can distort the aspect ratio), and every map
is resized back to the frame size here. `control_sha256` is the SHA-256 of the control video's
shape and pixels, recorded in the row so that both branches provably used the same control.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from datagen.models import PROFILES, resolve
from datagen.stage import ModelRef, Reject, Resources, Stage, pick_device

CONTROL_KINDS = ("depth", "pose")


@dataclass(frozen=True)
class ControlConfig:
    kind: str = "depth"
    profile: str = "tiny"
    tiny_dir: str | None = None
    hub_id: str | None = None  # override the production repo (e.g. a Depth-Anything-V2 Small)
    frame_batch: int = 16  # frames per depth forward pass
    pose_detect_resolution: int = 512  # the detector's working size (production default)

    def __post_init__(self) -> None:
        if self.kind not in CONTROL_KINDS:
            raise ValueError(f"control kind must be one of {CONTROL_KINDS}, got {self.kind!r}")
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {self.profile!r}")
        if self.frame_batch < 1:
            raise ValueError(f"frame_batch must be >= 1, got {self.frame_batch}")
        if self.pose_detect_resolution < 64:
            raise ValueError("pose_detect_resolution must be >= 64")


@dataclass(frozen=True)
class ControlInput:
    sample_id: str
    frames: np.ndarray  # (F, H, W, 3) uint8


@dataclass(frozen=True)
class ControlOutput:
    sample_id: str
    kind: str
    frames: np.ndarray  # (F, H, W, 3) uint8, same F, H, W as the input
    sha256: str


def control_sha256(frames: np.ndarray) -> str:
    """SHA-256 of a control video: its shape, dtype and pixels."""
    digest = hashlib.sha256(f"{frames.shape}|{frames.dtype}|".encode())
    digest.update(np.ascontiguousarray(frames).tobytes())
    return digest.hexdigest()


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
        self._ref: ModelRef | None = None

    def _load(self) -> None:
        import torch

        self.device = pick_device(self.resources)
        if self.config.kind == "depth":
            from transformers import AutoImageProcessor, DepthAnythingForDepthEstimation

            model = resolve(
                "depth_anything",
                self.config.profile,
                self.config.tiny_dir,
                hub_id=self.config.hub_id,
            )
            self.processor = AutoImageProcessor.from_pretrained(model.path)
            self.model = DepthAnythingForDepthEstimation.from_pretrained(model.path)
            self.model.to(self.device).eval()
        else:
            from controlnet_aux.open_pose import OpenposeDetector
            from controlnet_aux.open_pose.body import Body

            model = resolve(
                "annotators", self.config.profile, self.config.tiny_dir, hub_id=self.config.hub_id
            )
            # Body only: hands and faces are not drawn into the control video. Body() loads
            # with torch.load, whose default is weights_only=True in the torch we require.
            body = Body(str(model.path / "body_pose_model.pth")).to(self.device)
            self.model = OpenposeDetector(body)
        self._ref = model.ref
        self._torch = torch

    def models(self) -> dict[str, ModelRef]:
        return {f"control_{self.config.kind}": self._ref} if self._ref else {}

    def params(self) -> dict:
        return {
            "kind": self.config.kind,
            "frame_batch": self.config.frame_batch,
            "pose_detect_resolution": self.config.pose_detect_resolution,
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
            maps = self._depth(frames) if self.config.kind == "depth" else self._pose(frames)
            if maps is None:
                results.append(
                    self.reject(
                        item.sample_id, "control_nan", "depth model returned non-finite values"
                    )
                )
                continue
            results.append(
                ControlOutput(item.sample_id, self.config.kind, maps, control_sha256(maps))
            )
        return results

    def _depth(self, frames: np.ndarray) -> np.ndarray | None:
        torch = self._torch
        height, width = frames.shape[1:3]
        depths = []
        with torch.inference_mode():
            for start in range(0, len(frames), self.config.frame_batch):
                chunk = list(frames[start : start + self.config.frame_batch])
                inputs = self.processor(images=chunk, return_tensors="pt").to(self.device)
                predicted = self.model(**inputs).predicted_depth  # (B, h, w)
                resized = torch.nn.functional.interpolate(
                    predicted[:, None].float(),
                    size=(height, width),
                    mode="bicubic",
                    align_corners=False,
                )[:, 0]
                depths.append(resized.cpu().numpy())
        depth = np.concatenate(depths)
        if not np.isfinite(depth).all():
            return None
        low, high = float(depth.min()), float(depth.max())
        scaled = (depth - low) / (high - low) if high > low else np.zeros_like(depth)
        gray = np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)

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
