"""Tiny-profile twins of the pose annotators: OpenPose (lllyasviel/Annotators, controlnet-aux)
and DWPose (yzd-v/DWPose, two ONNX models run through onnxruntime).

OpenPose: the body network is fixed-size, so its twin is the real controlnet-aux architecture
with random weights (stored in float16, about 100 MB), in the one file the control stage loads
and `datagen.models.registry.SOURCES["annotators"].files` requires (`body_pose_model.pth`; hands and
faces are not drawn into the control video). Checkpoints in that repository are saved without
the first module-name component (`util.transfer` strips it back).

DWPose: the real models are a YOLOX-L person detector and the DW-LL whole-body pose model. Their
twins are small random-weight graphs with the same input and output names, shapes and value
ranges, so datagen.stages.dwpose decodes them the production way:
- `yolox_l.onnx`: `images` (1, 3, 640, 640) raw BGR pixels -> `output` (1, 8400, 85), one row per
  anchor of the stride 8/16/32 grids: box (x, y offsets in cells, log w, log h), then sigmoid
  objectness and 80 sigmoid class scores, as YOLOX exports its head. A fixed objectness prior
  makes the central anchors of the stride-32 grid confident persons, so a frame always yields
  at least one person box and the pose model runs;
- `dw-ll_ucoco_384.onnx`: `input` (1, 3, 384, 288) normalised crop -> `simcc_x` (1, 133, 576)
  and `simcc_y` (1, 133, 768) (SimCC split ratio 2).
No ONNX exporter runs offline without the `onnx` package, so the graphs are written here as
ONNX protobuf messages directly (`_OnnxWriter`): a few message types, seeded weights, identical
bytes every build.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DETECTOR_FILE = "yolox_l.onnx"
POSE_FILE = "dw-ll_ucoco_384.onnx"


def build_annotators(target: Path) -> None:
    import torch
    from controlnet_aux.open_pose.model import bodypose_model

    torch.manual_seed(0)
    state = {
        key.split(".", 1)[1]: tensor.half() for key, tensor in bodypose_model().state_dict().items()
    }
    torch.save(state, target / "body_pose_model.pth")


def build_dwpose(target: Path) -> None:
    rng = np.random.default_rng(0)
    (target / DETECTOR_FILE).write_bytes(_detector_graph(rng))
    (target / POSE_FILE).write_bytes(_pose_graph(rng))


# --- the two graphs ------------------------------------------------------------------------

DETECTOR_SIZE = 640
DETECTOR_STRIDES = (8, 16, 32)
NUM_CLASSES = 80
POSE_SIZE = (288, 384)  # (w, h)
NUM_KEYPOINTS = 133  # COCO-WholeBody
SIMCC_SPLIT = 2


def _detector_graph(rng: np.random.Generator) -> bytes:
    g = _OnnxWriter()
    flat = []
    for stride in DETECTOR_STRIDES:
        cells = DETECTOR_SIZE // stride
        # pixels are 0..255, so small weights keep the logits near their biases
        reg_w = rng.normal(0.0, 2e-4, (4, 3, stride, stride))
        reg_b = np.array([0.5, 0.5, np.log(10.0), np.log(10.0)])  # cell centre, 320 px wide
        score_w = rng.normal(0.0, 2e-4, (1 + NUM_CLASSES, 3, stride, stride))
        score_b = np.full(1 + NUM_CLASSES, -3.0)
        score_b[0], score_b[1] = 0.0, 3.0  # objectness, then the person class
        prior = np.full((1, 1, cells, cells), -10.0)  # an objectness prior per anchor
        if stride == DETECTOR_STRIDES[-1]:
            middle = cells // 2
            prior[..., middle - 1 : middle + 1, middle - 1 : middle + 1] = 2.0
        conv = {"kernel_shape": [stride, stride], "strides": [stride, stride]}
        reg = g.node("Conv", ["images", g.const(reg_w), g.const(reg_b)], **conv)
        logits = g.node("Conv", ["images", g.const(score_w), g.const(score_b)], **conv)
        scores = g.node("Sigmoid", [g.node("Add", [logits, g.const(prior)])])
        head = g.node("Concat", [reg, scores], axis=1)
        flat.append(g.node("Reshape", [head, g.const(np.array([1, 5 + NUM_CLASSES, -1]))]))
    anchors = sum((DETECTOR_SIZE // s) ** 2 for s in DETECTOR_STRIDES)
    rows = g.node("Concat", flat, axis=2)
    g.node("Transpose", [rows], perm=[0, 2, 1], outputs=["output"])
    return g.model(
        inputs={"images": [1, 3, DETECTOR_SIZE, DETECTOR_SIZE]},
        outputs={"output": [1, anchors, 5 + NUM_CLASSES]},
    )


def _pose_graph(rng: np.random.Generator) -> bytes:
    g = _OnnxWriter()
    width, height = POSE_SIZE
    patch = 32
    cells = (height // patch) * (width // patch)
    conv_w = rng.normal(0.0, 0.05, (NUM_KEYPOINTS, 3, patch, patch))
    features = g.node(
        "Conv",
        ["input", g.const(conv_w), g.const(np.zeros(NUM_KEYPOINTS))],
        kernel_shape=[patch, patch],
        strides=[patch, patch],
    )
    tokens = g.node("Reshape", [features, g.const(np.array([1, NUM_KEYPOINTS, cells]))])
    outputs = {}
    for name, size in (("simcc_x", width), ("simcc_y", height)):
        bins = size * SIMCC_SPLIT
        weight = rng.normal(0.0, 1.0 / np.sqrt(cells), (cells, bins))
        g.node("MatMul", [tokens, g.const(weight)], outputs=[name])
        outputs[name] = [1, NUM_KEYPOINTS, bins]
    return g.model(inputs={"input": [1, 3, height, width]}, outputs=outputs)


# --- a minimal ONNX protobuf writer --------------------------------------------------------

_FLOAT, _INT64 = 1, 7  # TensorProto.DataType
_ATTR_INT, _ATTR_INTS = 2, 7  # AttributeProto.AttributeType
_IR_VERSION, _OPSET = 8, 13


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 values take ten bytes, two's complement
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(data)) + data


class _OnnxWriter:
    """Nodes and initializers of one graph, serialised as an ONNX ModelProto (onnx.proto:
    ModelProto, GraphProto, NodeProto, AttributeProto, TensorProto, ValueInfoProto)."""

    def __init__(self) -> None:
        self.nodes: list[bytes] = []
        self.initializers: list[bytes] = []
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, array: np.ndarray) -> str:
        name = self._name("w")
        if np.issubdtype(array.dtype, np.integer):
            data_type, raw = _INT64, np.asarray(array, "<i8").tobytes()
        else:
            data_type, raw = _FLOAT, np.asarray(array, "<f4").tobytes()
        tensor = b"".join(_int(1, d) for d in array.shape)
        tensor += _int(2, data_type) + _bytes(8, name) + _bytes(9, raw)
        self.initializers.append(tensor)
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | None = None, **attrs) -> str:
        outputs = outputs or [self._name(op.lower())]
        proto = b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in outputs)
        proto += _bytes(3, self._name(op)) + _bytes(4, op)
        for key, value in attrs.items():
            if isinstance(value, list):
                attr = _bytes(1, key) + b"".join(_int(8, v) for v in value) + _int(20, _ATTR_INTS)
            else:
                attr = _bytes(1, key) + _int(3, value) + _int(20, _ATTR_INT)
            proto += _bytes(5, attr)
        self.nodes.append(proto)
        return outputs[0]

    @staticmethod
    def _value_info(name: str, shape: list[int]) -> bytes:
        dims = b"".join(_bytes(1, _int(1, d)) for d in shape)
        tensor_type = _int(1, _FLOAT) + _bytes(2, dims)
        return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))

    def model(self, inputs: dict[str, list[int]], outputs: dict[str, list[int]]) -> bytes:
        graph = b"".join(_bytes(1, n) for n in self.nodes) + _bytes(2, "datagen_twin")
        graph += b"".join(_bytes(5, t) for t in self.initializers)
        graph += b"".join(_bytes(11, self._value_info(k, v)) for k, v in inputs.items())
        graph += b"".join(_bytes(12, self._value_info(k, v)) for k, v in outputs.items())
        opset = _bytes(1, "") + _int(2, _OPSET)
        return _int(1, _IR_VERSION) + _bytes(2, "datagen") + _bytes(7, graph) + _bytes(8, opset)
