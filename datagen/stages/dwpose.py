"""DWPose pose maps drawn the way VACE's own pose annotator draws them: body + face, no hands.

VACE's `pose` control is `PoseBodyFaceVideoAnnotator` (VACE UserGuide.md:69;
vace/annotators/pose.py:119-136), which runs DWPose as two ONNX models through onnxruntime
(vace/annotators/dwpose/wholebody.py:40-78): the YOLOX-L person detector `yolox_l.onnx` and the
DW-LL whole-body pose model `dw-ll_ucoco_384.onnx` (SimCC heads, 133 COCO-WholeBody keypoints),
the files of `yzd-v/DWPose`. controlnet-aux 0.0.10's `DWposeDetector` runs the mmdet/mmpose
checkpoints instead (it needs mmcv), so this module runs the ONNX pair itself, step by step as
VACE does (the line references below are VACE's), and draws with controlnet-aux's DWPose
drawing functions, which match vace/annotators/dwpose/util.py's `draw_bodypose` and
`draw_facepose` line for line.

Per frame: RGB -> BGR (pose.py:50), resize so the short side is `resolution` (VACE: 1024,
pose.py:41) snapped to multiples of 64 (wholebody.py:28-38), detect persons, estimate each
person's keypoints, draw the body (18 OpenPose joints) and the face (68 landmarks) on black
(pose.py:17-32), swap the channels back and resize to the frame's size (pose.py:98-102).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

DETECTOR_FILE = "yolox_l.onnx"
POSE_FILE = "dw-ll_ucoco_384.onnx"
DETECTOR_INPUT = (640, 640)  # (h, w), onnxdet.py:101
DETECTOR_STRIDES = (8, 16, 32)  # onnxdet.py:63
DETECTOR_PAD = 114  # onnxdet.py:84
CANDIDATE_SCORE, NMS_IOU, PERSON_SCORE = 0.1, 0.45, 0.3  # onnxdet.py:117-120
BOX_PADDING = 1.25  # onnxpose.py:37
PIXEL_MEAN = np.array([123.675, 116.28, 103.53])  # onnxpose.py:43-44
PIXEL_STD = np.array([58.395, 57.12, 57.375])
SIMCC_SPLIT = 2.0  # onnxpose.py:86
VISIBLE = 0.3  # pose.py:62-73
FACE = slice(24, 92)  # 68 face landmarks after the 18 body joints and 6 feet (pose.py:77)
# mmpose's COCO order -> OpenPose's, once the neck is inserted at 17 (wholebody.py:65-71)
_MMPOSE = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3]
_OPENPOSE = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]


def resize_short_side(image: np.ndarray, resolution: int) -> np.ndarray:
    """Scale so the short side is `resolution`, each side rounded to a multiple of 64."""
    height, width = image.shape[:2]
    k = resolution / min(height, width)
    size = (int(np.round(width * k / 64.0)) * 64, int(np.round(height * k / 64.0)) * 64)
    return cv2.resize(image, size, interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)


def letterbox(image: np.ndarray) -> tuple[np.ndarray, float]:
    """The detector's input: the image scaled to fit 640x640, top-left, padded with 114;
    (1, 3, 640, 640) float32 pixels, not normalised (onnxdet.py:82-98)."""
    ratio = min(DETECTOR_INPUT[0] / image.shape[0], DETECTOR_INPUT[1] / image.shape[1])
    height, width = int(image.shape[0] * ratio), int(image.shape[1] * ratio)
    canvas = np.full((*DETECTOR_INPUT, 3), DETECTOR_PAD, np.uint8)
    canvas[:height, :width] = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(canvas.transpose(2, 0, 1)[None], np.float32), ratio


def decode_boxes(output: np.ndarray, ratio: float) -> np.ndarray:
    """YOLOX rows (N, 85) -> person boxes (M, 4) xyxy in image pixels, after class-aware NMS
    (onnxdet.py:60-80, 106-126; only the person class survives, so only it is computed)."""
    cells = []
    for stride in DETECTOR_STRIDES:
        rows, cols = DETECTOR_INPUT[0] // stride, DETECTOR_INPUT[1] // stride
        y, x = np.mgrid[:rows, :cols]
        cells.append(np.stack([x.ravel(), y.ravel(), np.full(x.size, stride)], axis=1))
    grid = np.concatenate(cells).astype(np.float64)
    rows = output.astype(np.float64)
    centre = (rows[:, :2] + grid[:, :2]) * grid[:, 2:]
    half = np.exp(rows[:, 2:4]) * grid[:, 2:] / 2.0
    boxes = np.concatenate([centre - half, centre + half], axis=1) / ratio
    scores = rows[:, 4] * rows[:, 5]  # objectness x person
    candidates = scores > CANDIDATE_SCORE
    boxes, scores = boxes[candidates], scores[candidates]
    keep = nms(boxes, scores, NMS_IOU)
    boxes, scores = boxes[keep], scores[keep]
    return boxes[scores > PERSON_SCORE]


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression; areas count pixels inclusively (onnxdet.py:8-35)."""
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        low = np.maximum(boxes[best, :2], boxes[rest, :2])
        high = np.minimum(boxes[best, 2:], boxes[rest, 2:])
        inter = np.prod(np.maximum(0.0, high - low + 1), axis=1)
        order = rest[inter / (areas[best] + areas[rest] - inter) <= threshold]
    return keep


def crop_transform(box: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The affine map of a person box, padded by 1.25 and widened to the model's aspect, onto
    the model's (w, h) input; and that padded box's (w, h) (onnxpose.py:117-287, rotation 0)."""
    width, height = size
    centre = (box[:2] + box[2:]) / 2.0
    extent = (box[2:] - box[:2]) * BOX_PADDING
    aspect = width / height
    if extent[0] > extent[1] * aspect:
        extent = np.array([extent[0], extent[0] / aspect])
    else:
        extent = np.array([extent[1] * aspect, extent[1]])
    k = width / extent[0]
    matrix = np.array(
        [[k, 0.0, width / 2.0 - k * centre[0]], [0.0, k, height / 2.0 - k * centre[1]]]
    )
    return matrix, extent


def decode_simcc(
    simcc_x: np.ndarray, simcc_y: np.ndarray, box: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """SimCC (1, K, Wx), (1, K, Wy) of one crop -> keypoints (K, 2) in image pixels and scores
    (K,): the arg-max bins, the smaller of the two maxima (onnxpose.py:290-352, 102-114)."""
    locs = np.stack([simcc_x[0].argmax(-1), simcc_y[0].argmax(-1)], axis=-1).astype(np.float64)
    scores = np.minimum(simcc_x[0].max(-1), simcc_y[0].max(-1)).astype(np.float64)
    locs[scores <= 0] = -1
    _, extent = crop_transform(box, size)
    centre = (box[:2] + box[2:]) / 2.0
    keypoints = locs / SIMCC_SPLIT / np.array(size) * extent + centre - extent / 2.0
    return keypoints, scores


def to_openpose(keypoints: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 133, 2), (N, 133) COCO-WholeBody -> (N, 134, ...) with OpenPose's 18 body joints
    first: a neck between the shoulders is inserted at 17, then the body reordered
    (wholebody.py:55-76). The neck scores 1 when both shoulders score above 0.3, else 0."""
    neck = keypoints[:, [5, 6]].mean(axis=1)
    neck_score = ((scores[:, 5] > VISIBLE) & (scores[:, 6] > VISIBLE)).astype(scores.dtype)
    keypoints = np.insert(keypoints, 17, neck, axis=1)
    scores = np.insert(scores, 17, neck_score, axis=1)
    keypoints[:, _OPENPOSE] = keypoints[:, _MMPOSE]
    scores[:, _OPENPOSE] = scores[:, _MMPOSE]
    return keypoints, scores


def draw_body_face(keypoints: np.ndarray, scores: np.ndarray, height: int, width: int):
    """OpenPose body + face landmarks on black, (height, width, 3) uint8, channels as drawn
    (pose.py:53-102 for the thresholds: joints above 0.3, face points from 0.3)."""
    from controlnet_aux.dwpose import util

    people = len(keypoints)
    points = keypoints / np.array([width, height])
    body = points[:, :18].reshape(people * 18, 2)
    index = np.arange(people * 18, dtype=np.float64).reshape(people, 18)
    subset = np.where(scores[:, :18] > VISIBLE, index, -1.0)
    faces = np.where((scores[:, FACE] < VISIBLE)[..., None], -1.0, points[:, FACE])
    canvas = np.zeros((height, width, 3), np.uint8)
    canvas = util.draw_bodypose(canvas, body, subset)
    return util.draw_facepose(canvas, faces)


class DWPose:
    """The detector + pose model pair, loaded once; `__call__` maps one RGB frame."""

    def __init__(self, directory: str | Path, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        directory = Path(directory)
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            index = int(device.partition(":")[2] or 0)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.detector = ort.InferenceSession(
            str(directory / DETECTOR_FILE), options, providers=providers
        )
        self.pose = ort.InferenceSession(str(directory / POSE_FILE), options, providers=providers)
        height, width = self.pose.get_inputs()[0].shape[2:]
        self.pose_size = (int(width), int(height))
        self.providers = self.pose.get_providers()

    def detect(self, image: np.ndarray) -> np.ndarray:
        """Person boxes (M, 4) xyxy of a BGR image."""
        pixels, ratio = letterbox(image)
        (output,) = self.detector.run(None, {self.detector.get_inputs()[0].name: pixels})
        return decode_boxes(output[0], ratio)

    def keypoints(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 133, 2) keypoints and (N, 133) scores of each box; with no box, of the whole
        image taken as one (onnxpose.py:27-28)."""
        if not len(boxes):
            boxes = np.array([[0.0, 0.0, image.shape[1], image.shape[0]]])
        name = self.pose.get_inputs()[0].name
        found, scores = [], []
        for box in boxes:
            matrix, _ = crop_transform(box, self.pose_size)
            crop = cv2.warpAffine(image, matrix, self.pose_size, flags=cv2.INTER_LINEAR)
            crop = ((crop - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1)[None]
            simcc_x, simcc_y = self.pose.run(None, {name: crop.astype(np.float32)})
            points, score = decode_simcc(simcc_x, simcc_y, box, self.pose_size)
            found.append(points)
            scores.append(score)
        return np.stack(found), np.stack(scores)

    def __call__(self, frame: np.ndarray, resolution: int = 1024) -> np.ndarray:
        """The body + face pose map of an RGB frame, at the frame's size."""
        image = resize_short_side(np.ascontiguousarray(frame[..., ::-1]), resolution)
        height, width = image.shape[:2]
        keypoints, scores = to_openpose(*self.keypoints(image, self.detect(image)))
        drawn = draw_body_face(keypoints, scores, height, width)[..., ::-1]
        out_h, out_w = frame.shape[:2]
        larger = out_h * out_w > height * width
        return cv2.resize(
            np.ascontiguousarray(drawn),
            (out_w, out_h),
            interpolation=cv2.INTER_LANCZOS4 if larger else cv2.INTER_AREA,
        )
