"""Describe step: what the clip shows, in one content-only sentence, before it is stylized.

InstantStyle conditions SDXL on a prompt that says what to draw before the style words ("a man,
masterpiece, ...", instantX-research/InstantStyle infer_style_controlnet.py:44), and the animate
prompt should say what moves. Both get this sentence: the VLM (datagen/stages/vlm/, the caption
backend) looks at the raw clip's first frame and its K reference frames (spread over the clip)
and answers under the `caption_ns` rules: content only, no style, palette, texture or tone
words and no colours (the stylized member's colours differ), checked against the style
vocabulary and regenerated in the same conversation on a hit, up to `max_retries`
generations, then rejected (`content_style_words`).

The sentence is short (CONTENT_MAX_WORDS): SDXL's CLIP text encoders read 77 tokens, and the
style prompt follows it.

Rejects: those of the caption stage (`bad_frames`, `caption_truncated`, `caption_empty` and the
backend's per-sample failures, each detail starting with `content`) and `content_style_words`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from datagen.core.config import PositiveInt, config_class
from datagen.core.stage import Reject, Resources
from datagen.stages.caption import CaptionConfig, WritingStage, caption_token_budget
from datagen.stages.vlm import Turn, check_videos, load_prompt, prompt_sha256, sample_video

# 25 words are about 35 CLIP tokens; with a style prompt of 20-30 tokens the stylize prompt
# stays inside CLIP's 77-token window (SDXL truncates beyond it).
CONTENT_MAX_WORDS = 25


def content_first(content: str, rest: str) -> str:
    """'<content>, <rest>': what the clip shows, then the rest of a prompt (the style words for
    stylize, the quality words for animate); `rest` alone when there is no content."""
    content = content.strip().rstrip(".")
    return f"{content}, {rest}" if content else rest


@config_class
class DescribeConfig(CaptionConfig):
    """The caption stage's VLM settings, with the budget of a CONTENT_MAX_WORDS sentence."""

    max_new_tokens: PositiveInt = caption_token_budget(CONTENT_MAX_WORDS)


@dataclass(frozen=True)
class DescribeInput:
    sample_id: str
    frames: np.ndarray  # (N, H, W, 3) uint8: the raw clip's first frame and reference frames
    fps: float  # the rate those frames span the clip at (N frames over the clip's duration)


@dataclass(frozen=True)
class DescribeOutput:
    sample_id: str
    content: str
    attempts: int  # generations it took (1 = clean at the first try)


class DescribeStage(WritingStage[DescribeInput, DescribeOutput]):
    name = "describe"

    def __init__(self, config: DescribeConfig | None = None, resources: Resources | None = None):
        super().__init__(config or DescribeConfig(), resources)
        # Read at build time, so a broken prompt file is a config error, not a failed run.
        self.prompt = load_prompt("describe.txt", ("max_words",))
        self.retry_prompt = load_prompt("describe_retry.txt", ("words", "max_words"))

    def params(self) -> dict:
        return {
            **asdict(self.config),
            "prompts": prompt_sha256(self.prompt, self.retry_prompt),
            "max_words": CONTENT_MAX_WORDS,
        }

    def _process(self, batch: list[DescribeInput]) -> list[DescribeOutput | Reject]:
        results: dict[int, DescribeOutput | Reject] = {}
        asked: dict[int, Turn] = {}
        question = self.prompt.substitute(max_words=CONTENT_MAX_WORDS)
        for i, item in enumerate(batch):
            problem = check_videos(item.fps, item.frames)
            if problem:
                results[i] = self.reject(item.sample_id, "bad_frames", problem)
                continue
            video = sample_video(item.frames, item.fps, self.config.num_frames)
            asked[i] = Turn("user", (video, question))
        replies = dict(zip(asked, self._generate([[t] for t in asked.values()]), strict=True))
        described = self._content_only(
            {i: batch[i].sample_id for i in asked},
            asked,
            replies,
            lambda words: self.retry_prompt.substitute(words=words, max_words=CONTENT_MAX_WORDS),
            "content",
        )
        for i, outcome in described.items():
            if isinstance(outcome, Reject):
                results[i] = outcome
            else:
                results[i] = DescribeOutput(batch[i].sample_id, *outcome)
        return [results[i] for i in range(len(batch))]
