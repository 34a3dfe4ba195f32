"""Tiny twins of the stylize stage's models: SDXL base, the SDXL depth ControlNet, IP-Adapter.

Each builder writes the hub repository's layout through the production classes, so the stylize
stage's loading code (`StableDiffusionXLControlNetPipeline.from_pretrained(sdxl_dir,
controlnet=ControlNetModel.from_pretrained(controlnet_dir))` then `pipe.load_ip_adapter(ip_dir,
subfolder="sdxl_models", weight_name="ip-adapter_sdxl.safetensors")`) loads them unchanged:

- `stabilityai/stable-diffusion-xl-base-1.0`: model_index.json, unet/, vae/, text_encoder/,
  text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/;
- `diffusers/controlnet-depth-sdxl-1.0`: config.json + diffusion_pytorch_model.safetensors;
- `h94/IP-Adapter`: sdxl_models/ip-adapter_sdxl.safetensors (the original h94 key names:
  `image_proj.proj.*`, `image_proj.norm.*`, `ip_adapter.<i>.to_k_ip/to_v_ip.weight` with `i`
  the index of the cross-attention processor among all of the UNet's processors, so 1, 3, 5...)
  and sdxl_models/image_encoder/ (a CLIPVisionModelWithProjection).

The UNet keeps SDXL's block layout (DownBlock2D + 2 x CrossAttnDownBlock2D, 3 up blocks, two
layers per block) at toy widths, so InstantStyle's block map addresses the same attention
modules as on the real model (`down_blocks.2.attentions.1`, `up_blocks.0.attentions.1`). The VAE
has four levels, so its scale factor is 8 like SDXL's and image sizes follow the same rules.
Tokenizers are built in memory: a byte-level CLIP BPE with no merges.
"""

from __future__ import annotations

from pathlib import Path

# Toy widths; the text encoders' hidden sizes add up to the UNet's cross-attention width, as
# SDXL's 768 + 1280 = 2048 do, and the pooled projection plus six time ids of width 8 gives the
# text_time embedding's input width (SDXL: 1280 + 6 * 256 = 2816).
TEXT_HIDDEN = 32
TEXT_PROJECTION = 32
TIME_EMBED_DIM = 8
CROSS_ATTENTION_DIM = 2 * TEXT_HIDDEN
BLOCK_OUT_CHANNELS = (32, 64, 64)
DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
IMAGE_EMBED_DIM = 32  # CLIP vision projection width (ViT-bigG's is 1280)
IP_TOKENS = 4  # ip-adapter_sdxl projects one image embedding to 4 tokens
MAX_TOKENS = 77


def _unet_kwargs() -> dict:
    return {
        "block_out_channels": BLOCK_OUT_CHANNELS,
        "layers_per_block": 2,
        "down_block_types": DOWN_BLOCKS,
        "attention_head_dim": (2, 4, 4),
        "transformer_layers_per_block": (1, 2, 2),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": 6 * TIME_EMBED_DIM + TEXT_PROJECTION,
        "cross_attention_dim": CROSS_ATTENTION_DIM,
        "in_channels": 4,
    }


def _unet():
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        out_channels=4,
        up_block_types=UP_BLOCKS,
        **_unet_kwargs(),
    )


def _tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    # Every byte as a word-inner and a word-final symbol: with no merges, any text tokenizes
    # into single bytes, so the tokenizer needs no downloaded vocabulary.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)


def _text_config(tokenizer, hidden_act: str):
    from transformers import CLIPTextConfig

    # CLIPTextModel pools at the first EOS token, so the config must carry the tokenizer's ids.
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=3,  # SDXL reads the penultimate hidden state
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_PROJECTION,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_sdxl(target: Path) -> None:
    """SDXL base in the hub layout (a StableDiffusionXLPipeline saved with save_pretrained)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = _unet()
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        norm_num_groups=8,
        layers_per_block=1,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.13025,  # SDXL's VAE values
        force_upcast=True,
    )
    # SDXL base's scheduler config.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )
    tokenizer = _tokenizer()
    tokenizer_2 = _tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config(tokenizer, "quick_gelu"))
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, "gelu"))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(target)


def build_controlnet_depth_sdxl(target: Path) -> None:
    """An SDXL ControlNet with the twin UNet's down path (config.json + safetensors)."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    controlnet = ControlNetModel(
        # Four levels of conditioning embedding: the depth image is downsampled 8x to latent size.
        conditioning_embedding_out_channels=(16, 16, 32, 32),
        conditioning_channels=3,
        **_unet_kwargs(),
    )
    # ControlNet starts with zero convolutions (its output is exactly zero until trained) and
    # a conditioning encoder whose default init all but erases the control image. A trained
    # checkpoint has neither, so the twin gets He-initialised conditioning convolutions and
    # small random zero-convolutions: the control image then visibly steers the output.
    with torch.no_grad():
        for name, module in controlnet.named_modules():
            if not isinstance(module, torch.nn.Conv2d):
                continue
            if name.startswith("controlnet_cond_embedding."):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                torch.nn.init.zeros_(module.bias)
            elif name.startswith(("controlnet_down_blocks.", "controlnet_mid_block")):
                module.weight.normal_(0.0, 0.05)
                module.bias.normal_(0.0, 0.05)
    controlnet.save_pretrained(target)


_ZERO_CONVS = (
    "controlnet_down_blocks.",
    "controlnet_mid_block.",
    "controlnet_cond_embedding.conv_out.",
)


def build_ip_adapter(target: Path) -> None:
    """h94/IP-Adapter's SDXL files: sdxl_models/ip-adapter_sdxl.safetensors + image_encoder/."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = target / "sdxl_models"
    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            projection_dim=IMAGE_EMBED_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            hidden_act="gelu",
        )
    )
    encoder.save_pretrained(folder / "image_encoder")

    # The original IP-Adapter numbers its modules by position among ALL the UNet's attention
    # processors (self- and cross-attention); only cross-attention ones carry weights.
    names = list(_unet().attn_processors)
    torch.manual_seed(0)
    tensors: dict[str, torch.Tensor] = {
        "image_proj.proj.weight": torch.randn(CROSS_ATTENTION_DIM * IP_TOKENS, IMAGE_EMBED_DIM)
        * 0.02,
        "image_proj.proj.bias": torch.zeros(CROSS_ATTENTION_DIM * IP_TOKENS),
        "image_proj.norm.weight": torch.ones(CROSS_ATTENTION_DIM),
        "image_proj.norm.bias": torch.zeros(CROSS_ATTENTION_DIM),
    }
    for index, name in enumerate(names):
        if name.endswith("attn1.processor"):
            continue
        hidden = _hidden_size(name)
        for projection in ("to_k_ip", "to_v_ip"):
            weight = torch.randn(hidden, CROSS_ATTENTION_DIM) * CROSS_ATTENTION_DIM**-0.5
            tensors[f"ip_adapter.{index}.{projection}.weight"] = weight
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, folder / "ip-adapter_sdxl.safetensors"
    )


def _hidden_size(processor_name: str) -> int:
    """Channel width of the block an attention processor sits in (as diffusers computes it)."""
    if processor_name.startswith("mid_block"):
        return BLOCK_OUT_CHANNELS[-1]
    block = int(processor_name.split(".")[1])
    if processor_name.startswith("up_blocks"):
        return tuple(reversed(BLOCK_OUT_CHANNELS))[block]
    return BLOCK_OUT_CHANNELS[block]
