"""What each step costs per sample on an H100/H200-class GPU, and what its models take on one.

Used to size the steps' actor pools so that their throughputs balance (run/placement.py) and
to share a GPU between steps when there are fewer GPUs than steps. Until a run has measured its
own (the next step of the scale-out work), these are the published and arithmetic figures, with
where each comes from (shared/FINDINGS.md "Cost anchors" quotes the sources):

- animate: Wan2.1 14B, 81 frames 480p, 40 steps + CFG, one H200: 366 s per video with the
  official code (ModelTC/LightX2V benchmark docs); a pair is two videos in one batched call.
- stylize: SDXL 1024x1024, 30 steps: ~2.5 s per image on an H100 (diffusers' baseline in the
  SDXL TensorRT model card); the first frame and K=3 reference frames are four images.
- control, describe, caption, score, judge: "everything else in the pipeline is under ~2 s per
  pair at peak" (FINDINGS, arithmetic over the model sizes); the VLM steps are given a few
  seconds for generation.

GPU memory is the weights at the dtype each stage loads them in (parameter counts from the model
cards) plus working memory at production shapes, rounded up: Wan2.1-VACE-14B bf16 (~35 GB) +
UMT5-XXL bf16 (11 GB) + activations of 81x480x832 (~14 GB); SDXL + depth ControlNet +
IP-Adapter fp16 (~11 GB) + 1024² activations; Qwen2.5-VL-7B bf16 (16.6 GB) + vision and KV
cache; Depth-Anything-V2-Large and CSD ViT-L + DINOv2-base in fp32. The tiny twins take a few
MB each.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepCost:
    seconds_per_sample: float
    gpu_memory_gb: float


PRODUCTION = {
    "control": StepCost(2.0, 3.0),
    "describe": StepCost(3.0, 20.0),
    "stylize": StepCost(4 * 2.5, 14.0),
    "animate": StepCost(2 * 366.0, 60.0),
    "caption": StepCost(5.0, 20.0),
    "score": StepCost(1.0, 3.0),
    "judge": StepCost(4.0, 20.0),
}
# Relative costs as the production ones (the balance is the same recipe); memory: the twins.
TINY = {name: StepCost(cost.seconds_per_sample, 0.5) for name, cost in PRODUCTION.items()}


def step_cost(profile: str, step: str) -> StepCost:
    return (PRODUCTION if profile == "production" else TINY)[step]
