"""Caption stage: the two captions of a pair, written by a VLM (see datagen/stages/vlm/).

- `caption_sty` describes content AND style, from the stylized video (the prompt names the
  style the video was rendered in, so the VLM can name it).
- `caption_ns` describes content only, from the raw video. It is checked against the style
  vocabulary (prompts/style_vocabulary.txt); on a hit the VLM is asked again, in the same
  conversation, to rewrite it without the words it used, up to `max_retries` generations in
  all, after which the sample is rejected (`caption_ns_style_words`).

Rejects: `bad_frames`, `caption_truncated` (the generation hit max_new_tokens), `caption_empty`,
`caption_ns_style_words`, and the backend's per-sample failures (`vlm_http_error`,
`vlm_bad_response`). Prompts are the text files prompts/caption_*.txt.

Length: the prompts state a word limit (`$max_words`, filled in from CAPTION_NS_MAX_WORDS and
CAPTION_STY_MAX_WORDS), and the generation budget is derived from the larger of the two
(`caption_token_budget`), so a caption that keeps to its limit is never cut off and rejected.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from datagen.core.config import PositiveInt, config_class
from datagen.core.stage import In, Out, Reject, Resources
from datagen.data.style_vocab import load_style_vocabulary
from datagen.stages.vlm import (
    Turn,
    Video,
    VLMConfig,
    VLMReply,
    VLMRequestError,
    VLMStage,
    check_videos,
    load_prompt,
    prompt_sha256,
    sample_video,
)

log = logging.getLogger(__name__)

# The word limits the prompts state ($max_words in prompts/caption_*.txt; the retry prompt
# repeats caption_ns's). caption_sty describes content and style, so it gets more words.
CAPTION_NS_MAX_WORDS = 100
CAPTION_STY_MAX_WORDS = 120
# English prose is about 1.3-1.5 tokens per word with Qwen2.5's byte-level BPE tokenizer
# (151k vocabulary); the upper end, so wordier captions (names, numbers) still fit.
TOKENS_PER_WORD = 1.5
# Models keep to a stated word count only roughly: room for a caption 25% over its limit.
WORD_LIMIT_OVERSHOOT = 1.25
# The end-of-turn token, quotes and punctuation a reply may open or close with.
TOKEN_MARGIN = 8


def caption_token_budget(words: int = max(CAPTION_NS_MAX_WORDS, CAPTION_STY_MAX_WORDS)) -> int:
    """max_new_tokens that holds a `words`-word caption: words x TOKENS_PER_WORD x
    WORD_LIMIT_OVERSHOOT + TOKEN_MARGIN, rounded up (233 for the 120-word caption_sty)."""
    if isinstance(words, bool) or not isinstance(words, int) or words < 1:
        raise ValueError(f"words must be an integer >= 1, got {words!r}")
    return math.ceil(words * TOKENS_PER_WORD * WORD_LIMIT_OVERSHOOT) + TOKEN_MARGIN


# What production captions should be generated with (the default of CaptionConfig).
CAPTION_MAX_NEW_TOKENS = caption_token_budget()


@config_class
class CaptionConfig(VLMConfig):
    """The VLM settings (datagen.stages.vlm.VLMConfig) plus the caption_ns regeneration budget.

    `max_new_tokens` defaults to CAPTION_MAX_NEW_TOKENS, the budget of the prompts' word limits.
    """

    max_new_tokens: PositiveInt = CAPTION_MAX_NEW_TOKENS
    # caption_ns generations in all (the first included) before a reject
    max_retries: PositiveInt = 3
    # A caption cut off at max_new_tokens is rejected. Only the tiny profile turns this off:
    # its random-weight twin never ends a sentence, and the demo still has to produce rows.
    accept_truncated: bool = False


@dataclass(frozen=True)
class CaptionInput:
    sample_id: str
    raw_frames: np.ndarray  # (F, H, W, 3) uint8: the regenerated raw video
    stylized_frames: np.ndarray  # (F, H, W, 3) uint8
    style_name: str
    style_prompt: str
    fps: float = 16.0


@dataclass(frozen=True)
class CaptionOutput:
    sample_id: str
    caption_ns: str
    caption_sty: str
    attempts: int  # caption_ns generations it took (1 = clean at the first try)


class WritingStage(VLMStage[In, Out]):
    """A VLM stage that writes text about frames: replies checked for truncation and
    emptiness, and content-only texts kept free of style words (caption and describe)."""

    def __init__(self, config: CaptionConfig, resources: Resources | None = None):
        self.config = config
        super().__init__(resources or self.config.default_resources())
        self.vocabulary = load_style_vocabulary()

    def _content_only(
        self,
        sample_ids: dict[int, str],
        asked: dict[int, Turn],
        replies: dict[int, VLMReply | VLMRequestError],
        retry_prompt: Callable[[str], str],
        which: str,
    ) -> dict[int, tuple[str, int] | Reject]:
        """A content-only text per sample: each reply is checked against the style vocabulary
        and, on a hit, the VLM is asked again in the same conversation (`retry_prompt` of the
        words used so far) up to `max_retries` generations in all; then the sample is
        rejected (`<which>_style_words`). Returns (text, generations it took) or a Reject."""
        results: dict[int, tuple[str, int] | Reject] = {}
        attempts = dict.fromkeys(replies, 1)
        forbidden: dict[int, list[str]] = {i: [] for i in replies}
        pending = list(replies)
        while pending:
            retry: dict[int, list[Turn]] = {}
            for i in pending:
                text, failure = self._text(sample_ids[i], replies[i], which)
                if failure:
                    results[i] = failure
                    continue
                words = self.vocabulary.find(text)
                if not words:
                    results[i] = (text, attempts[i])
                    continue
                forbidden[i] += [w for w in dict.fromkeys(words) if w not in forbidden[i]]
                if attempts[i] >= self.config.max_retries:
                    results[i] = self.reject(
                        sample_ids[i],
                        f"{which}_style_words",
                        f"style words {', '.join(forbidden[i])} in {which} after "
                        f"{attempts[i]} attempts; last: {text[:200]!r}",
                    )
                    continue
                # Same conversation, the offending answer included: greedy decoding would
                # repeat itself on the same prompt.
                retry[i] = [
                    asked[i],
                    Turn("assistant", (text,)),
                    Turn("user", (retry_prompt(", ".join(forbidden[i])),)),
                ]
            pending = list(retry)
            for i, reply in zip(pending, self._generate(list(retry.values())), strict=True):
                replies[i] = reply
                attempts[i] += 1
        return results

    def _generate(self, conversations: list) -> list[VLMReply | VLMRequestError]:
        if not conversations:
            return []
        return self.backend.generate(conversations, self.config.max_new_tokens)

    def _text(
        self, sample_id: str, reply: VLMReply | VLMRequestError, which: str
    ) -> tuple[str, Reject | None]:
        """The caption in `reply`, or the reject it amounts to."""
        if isinstance(reply, VLMRequestError):
            return "", self.reject(sample_id, reply.reason, f"{which}: {reply.detail}")
        if reply.truncated and not self.config.accept_truncated:
            return "", self.reject(
                sample_id,
                "caption_truncated",
                f"{which} hit max_new_tokens={self.config.max_new_tokens} without ending: "
                f"{reply.text[:200]!r}",
            )
        text = " ".join(reply.text.split()).strip("\"' ")
        if not text:
            return "", self.reject(sample_id, "caption_empty", f"{which} is empty")
        return text, None


class CaptionStage(WritingStage[CaptionInput, CaptionOutput]):
    name = "caption"

    def __init__(self, config: CaptionConfig | None = None, resources: Resources | None = None):
        super().__init__(config or CaptionConfig(), resources)
        # Read at build time, so a broken prompt file is a config error, not a failed run.
        self.sty_prompt = load_prompt(
            "caption_sty.txt", ("style_name", "style_prompt", "max_words")
        )
        self.ns_prompt = load_prompt("caption_ns.txt", ("max_words",))
        self.retry_prompt = load_prompt("caption_ns_retry.txt", ("words", "max_words"))
        needed = caption_token_budget()
        if self.config.max_new_tokens < needed and not self.config.accept_truncated:
            log.warning(
                "caption max_new_tokens=%d is below the %d tokens a %d-word caption may take "
                "(caption_token_budget): captions that keep to the prompts' word limits can be "
                "cut off and rejected as caption_truncated",
                self.config.max_new_tokens,
                needed,
                max(CAPTION_NS_MAX_WORDS, CAPTION_STY_MAX_WORDS),
            )

    def params(self) -> dict:
        """The settings that shaped the captions (recorded in the row's params)."""
        return {
            **asdict(self.config),
            "prompts": prompt_sha256(self.sty_prompt, self.ns_prompt, self.retry_prompt),
            "max_words": {"caption_ns": CAPTION_NS_MAX_WORDS, "caption_sty": CAPTION_STY_MAX_WORDS},
        }

    def _ns_prompt(self) -> str:
        return self.ns_prompt.substitute(max_words=CAPTION_NS_MAX_WORDS)

    def _process(self, batch: list[CaptionInput]) -> list[CaptionOutput | Reject]:
        results: dict[int, CaptionOutput | Reject] = {}
        raw: dict[int, Video] = {}
        stylized: dict[int, Video] = {}
        for i, item in enumerate(batch):
            problem = check_videos(item.fps, item.raw_frames, item.stylized_frames)
            if problem:
                results[i] = self.reject(item.sample_id, "bad_frames", problem)
                continue
            raw[i] = sample_video(item.raw_frames, item.fps, self.config.num_frames)
            stylized[i] = sample_video(item.stylized_frames, item.fps, self.config.num_frames)
        todo = list(raw)

        # One round for both captions, so the backend batches them together.
        sty_conversations = [self._sty_conversation(batch[i], stylized[i]) for i in todo]
        ns_conversations = [[Turn("user", (raw[i], self._ns_prompt()))] for i in todo]
        replies = self._generate(sty_conversations + ns_conversations)
        caption_sty: dict[int, str] = {}
        ns_replies = dict(zip(todo, replies[len(todo) :], strict=True))
        for i, reply in zip(todo, replies[: len(todo)], strict=True):
            text, failure = self._text(batch[i].sample_id, reply, "caption_sty")
            if failure:
                results[i] = failure
            else:
                caption_sty[i] = text

        ns = self._content_only(
            {i: batch[i].sample_id for i in caption_sty},
            {i: Turn("user", (raw[i], self._ns_prompt())) for i in caption_sty},
            {i: ns_replies[i] for i in caption_sty},
            lambda words: self.retry_prompt.substitute(words=words, max_words=CAPTION_NS_MAX_WORDS),
            "caption_ns",
        )
        for i, outcome in ns.items():
            if isinstance(outcome, Reject):
                results[i] = outcome
            else:
                text, attempts = outcome
                results[i] = CaptionOutput(batch[i].sample_id, text, caption_sty[i], attempts)
        return [results[i] for i in range(len(batch))]

    def _sty_conversation(self, item: CaptionInput, video: Video) -> list[Turn]:
        prompt = self.sty_prompt.substitute(
            style_name=item.style_name.strip(),
            style_prompt=item.style_prompt.strip(),
            max_words=CAPTION_STY_MAX_WORDS,
        )
        return [Turn("user", (video, prompt))]
