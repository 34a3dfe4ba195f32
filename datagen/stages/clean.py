"""Clean clips before any GPU: no shot cut inside a clip, and enough motion to make a pair.

Both checks run on the CPU during planning, on the frames the clip will be made of (its
source frames resampled to the build's fps, as data/video.py clip_frame_indices picks them),
scaled down to ANALYSIS_WIDTH pixels wide first: a cut and a motion field are as visible at
that size, and decoding dominates the cost.

- **Shot cuts**: PySceneDetect's AdaptiveDetector over the clip's frames: a frame whose
  content change (HSV distance to the frame before, ContentDetector's score) is at least
  `scene_threshold` times the mean change of the frames around it, and at least 15, starts a
  new shot. The threshold 3.0, the window of 2 frames and the floor of 15 are PySceneDetect's
  defaults (scenedetect/detectors/adaptive_detector.py:39-42). The adaptive rule is what
  tells a hard cut from a fast pan: ContentDetector's fixed threshold (27) flagged the demo's
  pan across a photo at 8 fps (scores rising smoothly 17, 20, 24, 22, 28) as a cut. The
  minimum scene length is turned off, so a cut a few frames into the clip is found too. A
  clip that crosses a cut is moved to start at the cut (inside the next shot) where that
  still fits the video, and checked again; otherwise it is rejected (`scene_cut`).
- **Motion**: the mean magnitude of dense optical flow (OpenCV's Farneback) between
  consecutive clip frames, in percent of the frame's width per frame. A still video
  measures about 0 whatever its compression noise (0.006 at CRF 20, tests/test_clean.py).
  Clips below `min_motion` are rejected (`too_static`). DEFAULT_MIN_MOTION, 0.1% of the
  width per frame (8% of the frame over an 81-frame clip), is this project's choice, not a
  paper's: it rejects a still or nearly still shot and keeps a slow pan; the demo clips
  measure 0.5 to 4.8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datagen.core.stage import Reject

ANALYSIS_WIDTH = 160  # pixels: the size both checks look at
DEFAULT_SCENE_THRESHOLD = 3.0  # scenedetect/detectors/adaptive_detector.py:39 (its default)
ADAPTIVE_WINDOW = 2  # frames on either side: scenedetect/detectors/adaptive_detector.py:41
DEFAULT_MIN_MOTION = 0.1  # % of the frame width per frame (see the module docstring)


@dataclass(frozen=True)
class CleanSettings:
    """0 turns a check off."""

    scene_threshold: float = DEFAULT_SCENE_THRESHOLD
    min_motion: float = DEFAULT_MIN_MOTION

    @property
    def enabled(self) -> bool:
        return self.scene_threshold > 0 or self.min_motion > 0


def analysis_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Decoded RGB source frames (T, H, W, 3) as the clip will show them (centre-cropped to
    the build's aspect), ANALYSIS_WIDTH pixels wide, as BGR for OpenCV."""
    import cv2

    from datagen.data.video import resize_center_crop

    small_width = min(ANALYSIS_WIDTH, width)
    small_height = max(1, round(height * small_width / width))
    cropped = resize_center_crop(frames, small_height, small_width)
    return np.stack([cv2.cvtColor(frame, cv2.COLOR_RGB2BGR) for frame in cropped])


def clean_start(
    path, info, settings, start: int, clean: CleanSettings, end: int | None = None
) -> int | Reject:
    """The start of a clean clip at `start`, or just past a shot cut inside it (ending before
    source frame `end`, the span's end, if given); a Reject (sample id left empty: the planner
    names the clip) where there is none."""
    from datagen.data.video import TooFewFramesError, clip_frame_indices, decode_frames

    for attempt in range(2):
        indices = clip_frame_indices(info.num_frames, info.fps, settings.spec(start))
        frames = analysis_frames(
            decode_frames(path, indices, rotation=info.rotation), settings.height, settings.width
        )
        cut = (
            first_cut(frames, settings.fps, clean.scene_threshold)
            if clean.scene_threshold
            else None
        )
        if cut is None:
            break
        span = f"source frames {indices[0]}..{indices[-1]}"
        if attempt == 1:
            return _reject(
                "scene_cut",
                f"shot cuts at source frames {start} and {indices[cut]}: no clip of one shot here",
            )
        start = indices[cut]
        try:  # the clip moved to the first frame of the next shot, if it still fits
            moved = clip_frame_indices(info.num_frames, info.fps, settings.spec(start))
        except TooFewFramesError:
            moved = None
        if moved is None or (end is not None and moved[-1] >= end):
            return _reject(
                "scene_cut",
                f"a shot cut at source frame {start} inside the clip ({span}) and the next "
                "shot is too short for a clip",
            )
    if clean.min_motion:
        measured = motion(frames)
        if measured < clean.min_motion:
            return _reject(
                "too_static",
                f"motion {measured:.3f}% of the width per frame < min_motion {clean.min_motion:g}",
            )
    return start


def _reject(reason: str, detail: str) -> Reject:
    return Reject("", "plan", reason, detail)


def first_cut(frames_bgr: np.ndarray, fps: float, threshold: float) -> int | None:
    """The index of the first frame of a new shot after the first frame, or None (no cut).

    AdaptiveDetector compares each frame's content change with the mean of the WINDOW frames
    on either side, so it needs that many before the first frame and after the last: the
    edge frames are repeated (a change of 0), which lets a cut next to either end show as
    the outlier it is."""
    from scenedetect import AdaptiveDetector, FrameTimecode

    pad = ADAPTIVE_WINDOW
    padded = np.concatenate(
        [frames_bgr[:1].repeat(pad, 0), frames_bgr, frames_bgr[-1:].repeat(pad, 0)]
    )
    detector = AdaptiveDetector(adaptive_threshold=threshold, window_width=pad, min_scene_len=0)
    for index, frame in enumerate(padded):
        for cut in detector.process_frame(FrameTimecode(index, fps=fps), frame):
            inside = int(cut.frame_num) - pad
            if 0 < inside < len(frames_bgr):
                return inside
    return None


def motion(frames_bgr: np.ndarray) -> float:
    """Mean optical-flow magnitude between consecutive frames, in % of the width per frame."""
    import cv2

    if len(frames_bgr) < 2:
        return 0.0
    gray = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in frames_bgr]
    magnitudes = []
    for before, after in zip(gray, gray[1:], strict=False):
        # Farneback's parameters as in OpenCV's own optical-flow sample (samples/python/
        # opt_flow.py:76: pyr_scale 0.5, 3 levels, window 15, 3 iterations, poly_n 5, sigma 1.2)
        flow = cv2.calcOpticalFlowFarneback(before, after, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        magnitudes.append(float(np.linalg.norm(flow, axis=2).mean()))
    return 100.0 * float(np.mean(magnitudes)) / frames_bgr.shape[2]
