"""Tiny twin of the animate stage's model: Wan2.1 VACE (`Wan-AI/Wan2.1-VACE-14B-diffusers`).

`build_wan_vace(target)` writes the hub repository's layout through the production classes, so
the animate stage's loading code (`WanVACEPipeline.from_pretrained(path, vae=AutoencoderKLWan
.from_pretrained(path, subfolder="vae"))`, through its batched subclass) loads it unchanged:
model_index.json, transformer/ (`WanVACETransformer3DModel`), vae/ (`AutoencoderKLWan`),
text_encoder/ (`UMT5EncoderModel`), tokenizer/ (T5 Unigram, listed as `T5TokenizerFast` as on
the hub) and scheduler/ (`UniPCMultistepScheduler` in flow-prediction mode, Wan's sampler).

The shapes follow the real model where the pipeline depends on them: VAE latent channels 16,
temporal x4 and spatial x8 compression, transformer patch (1, 2, 2), so frame counts (4k+1) and
sizes (multiples of 16) obey the same rules; the VACE input width is 2 x 16 latent channels plus
the 8 x 8 = 64 mask channels. Widths are toy-sized (~0.5 MB of weights in all).

One deliberate difference from a plain random init: the VAE config's `latents_mean` and
`latents_std` are the twin VAE's own latent statistics, measured on seeded synthetic clips (the
real config holds the real VAE's statistics, so this keeps the same meaning). With the real
model's numbers, a random tiny VAE's latents would be drowned in the normalisation offsets, and
the first frame would barely change the output; with its own, raw and stylized first frames give
visibly different videos, as they must for the pair tests.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

TEXT_DIM = 32  # UMT5 d_model; the transformer's text_dim (umt5-xxl: 4096)
Z_DIM = 16  # VAE latent channels, as in Wan2.1
MAX_TOKENS = 512  # Wan's text length
HUB_TOKENIZER_CLASS = "T5TokenizerFast"  # what the hub repo's model_index.json names


def build_t5_tokenizer():
    """A T5 Unigram tokenizer over printable ASCII (characters and word-initial characters)."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    characters = string.ascii_letters + string.digits + string.punctuation
    # Word-initial pieces score better than "▁" + character, so words start with one token.
    pieces += [("▁" + c, -3.5) for c in characters]
    pieces += [(c, -3.0) for c in characters]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_TOKENS)


def _text_encoder(vocab_size: int):
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return UMT5EncoderModel(config).eval()


def _vae():
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=Z_DIM,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()
    mean, std = _latent_statistics(vae)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    return vae


def _latent_statistics(vae) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the VAE's latents over seeded, smooth synthetic clips."""
    import torch

    generator = torch.Generator().manual_seed(1)
    coarse = torch.rand(4, 3, 9, 8, 8, generator=generator)
    clips = torch.nn.functional.interpolate(coarse, size=(9, 64, 64), mode="trilinear") * 2 - 1
    with torch.no_grad():
        latents = vae.encode(clips).latent_dist.mode()
    # Rounded, so float noise across machines cannot change the config (and the revision hash).
    mean = [round(v, 4) for v in latents.mean(dim=(0, 2, 3, 4)).tolist()]
    std = [round(v, 4) for v in latents.std(dim=(0, 2, 3, 4)).tolist()]
    return mean, std


def _transformer():
    import torch
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(0)
    return WanVACETransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=Z_DIM,
        out_channels=Z_DIM,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=3,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        vace_layers=[0, 2],
        vace_in_channels=2 * Z_DIM + 8 * 8,
    ).eval()


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )


def build_wan_vace(target: Path) -> None:
    """Write the tiny Wan2.1 VACE pipeline into `target` in the hub repository's layout."""
    from diffusers import WanVACEPipeline

    target = Path(target)
    tokenizer = build_t5_tokenizer()
    pipe = WanVACEPipeline(
        tokenizer=tokenizer,
        text_encoder=_text_encoder(len(tokenizer)),
        vae=_vae(),
        scheduler=_scheduler(),
        transformer=_transformer(),
    )
    pipe.save_pretrained(target, safe_serialization=True)
    # The hub repo lists the tokenizer as T5TokenizerFast (transformers 5 aliases it to
    # T5Tokenizer); naming it the same way makes the twin exercise that line of the real file.
    index_path = target / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", HUB_TOKENIZER_CLASS]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
