"""Stable Diffusion 1.5-shaped configurations, written inline (nothing is downloaded).

Shared by tools/gpu/sd15_diffusers.py (the PyTorch side of the GPU benchmark) and
tools/gpu/make_sd15_bundle.py (our side: a randomly initialised bundle of the same shapes).

`full`: the shapes of runwayml/stable-diffusion-v1-5 (UNet 859.5M parameters, VAE 83.7M, CLIP
ViT-L/14 text encoder 123.1M), CLIP ViT-L/14's vision tower with its projection (304.0M), GILL's
Mapper_LDM as StoryGPT-V uses it, and OPT's configurations. `tiny`: the same layout at toy
widths, so that both scripts can be checked on a CPU in seconds (`--tiny`).
"""

SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# CLIP ViT-L/14 text encoder as SD 1.5 ships it (token ids of a real CLIP tokenizer: bos 49406,
# eos 49407). make_sd15_bundle.py overrides the special ids with its tokenizer's.
SD15_TEXT = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

# openai/clip-vit-large-patch14's vision tower with its projection (portraits, and past frames
# for Mapper_LLM).
VIT_L14_VISION = {
    "architectures": ["CLIPVisionModelWithProjection"],
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 768,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
}

# Stable Diffusion 1.5's scheduler (PNDM, as its scheduler_config.json).
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}

# GILL's Mapper_LDM (`gen_text_hidden_fcs.0`, mode gill_mapper): width 512, 4 heads, 4 encoder
# and 4 decoder layers, feed-forward 2048, 77 queries.
GILL_MAPPER = {"d_model": 512, "heads": 4, "encoder_layers": 4, "decoder_layers": 4, "ff_dim": 2048}

# OPT configurations (facebook/opt-*), vocabulary 50272, learned positions for 2048 tokens.
OPT = {
    "opt-125m": {"hidden_size": 768, "ffn_dim": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    "opt-1.3b": {"hidden_size": 2048, "ffn_dim": 8192, "num_hidden_layers": 24, "num_attention_heads": 32},
    "opt-6.7b": {"hidden_size": 4096, "ffn_dim": 16384, "num_hidden_layers": 32, "num_attention_heads": 32},
}


def tiny_unet():
    return {
        **SD15_UNET,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "sample_size": 8,
    }


def tiny_vae():
    return {**SD15_VAE, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "sample_size": 64}


def tiny_text():
    return {**SD15_TEXT, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4}


def tiny_vision():
    return {**VIT_L14_VISION, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8}


TINY_MAPPER = {"d_model": 32, "heads": 4, "encoder_layers": 1, "decoder_layers": 1, "ff_dim": 64}


def configs(tiny):
    """(unet, vae, text, vision, mapper, frame size) for the full or the tiny shapes."""
    if tiny:
        return tiny_unet(), tiny_vae(), tiny_text(), tiny_vision(), dict(TINY_MAPPER), 64
    return (dict(SD15_UNET), dict(SD15_VAE), dict(SD15_TEXT), dict(VIT_L14_VISION),
            dict(GILL_MAPPER), 512)


def public(cfg):
    """The config without its `_class_name`-style keys (constructor arguments)."""
    return {k: v for k, v in cfg.items() if not k.startswith("_")}
