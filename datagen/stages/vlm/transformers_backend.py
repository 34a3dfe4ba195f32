"""The `transformers` backend of the VLM: Qwen2.5-VL in-process (see the package's doc)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datagen.core.stage import ModelRef, Resources
from datagen.models.registry import resolve
from datagen.stages.vlm import (
    MIN_PIXELS,
    Conversation,
    Video,
    VLMBackend,
    VLMConfig,
    VLMReply,
    VLMRequestError,
)


class TransformersVLM(VLMBackend):
    """Qwen2.5-VL in-process, loaded once from the resolved directory."""

    def __init__(self, config: VLMConfig, resources: Resources):
        import torch
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        from datagen.core.stage import pick_device

        resolved = resolve("qwen_vl", config.profile, config.tiny_dir, hub_id=config.hub_id)
        self.config = config
        self.device = pick_device(resources)
        if config.dtype == "auto":
            self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        else:
            self.dtype = getattr(torch, config.dtype)
        self.processor = AutoProcessor.from_pretrained(resolved.path)
        # Batched generation appends to the right end of every row, so pad on the left. Set
        # once here: the processor is this backend's own.
        self.processor.tokenizer.padding_side = "left"
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            resolved.path, dtype=self.dtype
        )
        self.model.to(self.device).eval()
        # Greedy: the captions of a sample must not change from run to run. Set once on the
        # model this backend owns; generate() then only passes the per-call token limit.
        generation = self.model.generation_config
        generation.do_sample = False
        for name in ("temperature", "top_p", "top_k"):
            setattr(generation, name, None)
        eos = generation.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        video_size = dict(self.processor.video_processor.size)
        self.video_size = {
            "shortest_edge": min(video_size.get("shortest_edge", MIN_PIXELS), config.max_pixels),
            "longest_edge": config.max_pixels,
        }
        self._ref = resolved.ref
        self._torch = torch

    def model_ref(self) -> ModelRef:
        return self._ref

    def close(self) -> None:
        self.model = None
        self.processor = None

    def _chat(self, conversation: Conversation) -> tuple[str, list[Video]]:
        messages, videos = [], []
        for turn in conversation:
            content = []
            for part in turn.parts:
                if isinstance(part, Video):
                    content.append({"type": "video"})
                    videos.append(part)
                else:
                    content.append({"type": "text", "text": part})
            messages.append({"role": turn.role, "content": content})
        text = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return text, videos

    def generate(
        self, conversations: Sequence[Conversation], max_new_tokens: int
    ) -> list[VLMReply | VLMRequestError]:
        replies: list[VLMReply | VLMRequestError] = []
        size = self.config.batch_size
        for start in range(0, len(conversations), size):
            replies.extend(self._generate(conversations[start : start + size], max_new_tokens))
        return replies

    def _generate(self, conversations: Sequence[Conversation], max_new_tokens: int) -> list:
        from transformers.video_utils import VideoMetadata

        texts, videos = [], []
        for conversation in conversations:
            text, clip = self._chat(conversation)
            texts.append(text)
            videos.extend(clip)
        video_kwargs: dict[str, Any] = {}
        if videos:
            video_kwargs = {
                "videos": [v.frames for v in videos],
                # the frames are already the sampled ones: metadata says they are all of them
                "video_metadata": [
                    VideoMetadata(
                        total_num_frames=len(v.frames),
                        fps=v.fps,
                        height=v.frames.shape[1],
                        width=v.frames.shape[2],
                        frames_indices=list(range(len(v.frames))),
                    )
                    for v in videos
                ],
                "do_sample_frames": False,
                "size": self.video_size,
                "cap_pixels_per_frame": True,  # the reference (qwen-vl-utils) pixel budget
            }
        inputs = self.processor(text=texts, padding=True, return_tensors="pt", **video_kwargs)
        inputs = inputs.to(self.device)
        if "pixel_values_videos" in inputs:
            inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(self.dtype)
        with self._torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens)
        generated = output[:, inputs["input_ids"].shape[1] :].tolist()
        replies = []
        for tokens in generated:
            # Rows that stopped early are padded with end tokens; a row with none ran out.
            truncated = not any(t in self.eos_ids for t in tokens)
            text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True)
            replies.append(VLMReply(text=text.strip(), truncated=truncated))
        return replies
