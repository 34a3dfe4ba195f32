"""VLM judge: the optional `vlm_verdict` score of a pair (see datagen/stages/vlm/ for the VLM).

The VLM sees the raw video (A) and the stylized video (B) and answers three questions as a JSON
object (prompts/judge.txt): same content and motion? style applied? visible artifacts? The
verdict is "pass" only for yes / yes / no. The answers travel as JSON text in `detail` (the
row's `vlm_detail`). An answer without a readable JSON object with the three yes/no answers is
rejected as `judge_unparseable`; the backend's per-sample failures keep their own reasons.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

import numpy as np

from datagen.core.config import PositiveInt, config_class
from datagen.core.stage import Reject, Resources
from datagen.stages.vlm import (
    Turn,
    VLMConfig,
    VLMRequestError,
    VLMStage,
    check_videos,
    load_prompt,
    prompt_sha256,
    sample_video,
)

QUESTIONS = ("same_content_and_motion", "style_applied", "artifacts")
PASSING = {"same_content_and_motion": "yes", "style_applied": "yes", "artifacts": "no"}
_YES = {"yes", "y", "true"}
_NO = {"no", "n", "false"}


@config_class
class JudgeConfig(VLMConfig):
    max_new_tokens: PositiveInt = 160  # three answers and a one-sentence reason


@dataclass(frozen=True)
class JudgeInput:
    sample_id: str
    raw_frames: np.ndarray  # (F, H, W, 3) uint8
    stylized_frames: np.ndarray  # (F, H, W, 3) uint8
    style_prompt: str
    fps: float = 16.0


@dataclass(frozen=True)
class JudgeOutput:
    sample_id: str
    verdict: str  # "pass" | "fail"
    detail: str  # JSON text: the three answers ("yes"/"no") and the VLM's reason


def first_json_object(text: str) -> dict | None:
    """The first JSON object in `text` (models wrap JSON in prose or code fences), or None."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text or ""):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def parse_answers(text: str) -> dict[str, str] | None:
    """{question: "yes"|"no"} (plus "reason" when given) from a judge reply, or None."""
    found = first_json_object(text)
    if found is None:
        return None
    by_key = {str(k).strip().lower(): v for k, v in found.items()}
    answers: dict[str, str] = {}
    for question in QUESTIONS:
        value = by_key.get(question)
        if isinstance(value, bool):
            value = "yes" if value else "no"
        word = str(value).strip().strip(".!").lower() if isinstance(value, str | bool) else ""
        if word in _YES:
            answers[question] = "yes"
        elif word in _NO:
            answers[question] = "no"
        else:
            return None
    reason = by_key.get("reason")
    if isinstance(reason, str) and reason.strip():
        answers["reason"] = " ".join(reason.split())[:300]
    return answers


def verdict_of(answers: dict[str, str]) -> str:
    return "pass" if all(answers[q] == PASSING[q] for q in QUESTIONS) else "fail"


class JudgeStage(VLMStage[JudgeInput, JudgeOutput]):
    name = "judge"

    def __init__(self, config: JudgeConfig | None = None, resources: Resources | None = None):
        self.config = config or JudgeConfig()
        super().__init__(resources or self.config.default_resources())
        self.prompt = load_prompt("judge.txt", ("style_prompt",))

    def params(self) -> dict:
        return {**asdict(self.config), "prompts": prompt_sha256(self.prompt)}

    def _process(self, batch: list[JudgeInput]) -> list[JudgeOutput | Reject]:
        results: dict[int, JudgeOutput | Reject] = {}
        conversations = {}
        for i, item in enumerate(batch):
            problem = check_videos(item.fps, item.raw_frames, item.stylized_frames)
            if problem:
                results[i] = self.reject(item.sample_id, "bad_frames", problem)
                continue
            raw = sample_video(item.raw_frames, item.fps, self.config.num_frames)
            stylized = sample_video(item.stylized_frames, item.fps, self.config.num_frames)
            prompt = self.prompt.substitute(style_prompt=item.style_prompt.strip())
            conversations[i] = [Turn("user", ("Video A:", raw, "Video B:", stylized, prompt))]
        replies = (
            self.backend.generate(list(conversations.values()), self.config.max_new_tokens)
            if conversations
            else []
        )
        for i, reply in zip(conversations, replies, strict=True):
            sample_id = batch[i].sample_id
            if isinstance(reply, VLMRequestError):
                results[i] = self.reject(sample_id, reply.reason, reply.detail)
                continue
            answers = parse_answers(reply.text)
            if answers is None:
                cut = " (cut off at max_new_tokens)" if reply.truncated else ""
                results[i] = self.reject(
                    sample_id, "judge_unparseable", f"reply{cut}: {reply.text[:300]!r}"
                )
                continue
            results[i] = JudgeOutput(sample_id, verdict_of(answers), json.dumps(answers))
        return [results[i] for i in range(len(batch))]
