"""Write a folder with the config files (no weights) of SDXL 1.0 base's components, for
``train_ldm.py --dry-run pretrained=FOLDER`` where the real folder is not at hand (the dry run reads
configs only). The values are the published architecture of stabilityai/stable-diffusion-xl-base-1.0;
the dry run's parameter counts check them (UNet 2567.46M, text encoders 123.06M and 694.66M, VAE 83.65M).

    python bench/sdxl_base_configs.py /tmp/sdxl-base-configs
    python train_ldm.py --config configs/ldm/sdxl-lora.yaml pretrained=/tmp/sdxl-base-configs --dry-run
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from diffusers import AutoencoderKL, EulerDiscreteScheduler
from transformers import CLIPTextConfig

from conditioning import build_clip_tokenizer

UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)  # fmt: skip
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)  # fmt: skip
TEXT = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=2)
TEXT_1 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768, pad_token_id=1, **TEXT)  # fmt: skip
TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu", projection_dim=1280, pad_token_id=1, **TEXT)  # fmt: skip


def main(folder: str) -> None:
    root = Path(folder)
    (root / "unet").mkdir(parents=True, exist_ok=True)
    (root / "vae").mkdir(exist_ok=True)
    (root / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **UNET}))
    (root / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **VAE}))
    CLIPTextConfig(**TEXT_1).save_pretrained(root / "text_encoder")
    CLIPTextConfig(**TEXT_2).save_pretrained(root / "text_encoder_2")
    for sub in ("tokenizer", "tokenizer_2"):
        build_clip_tokenizer(77).save_pretrained(root / sub)
    EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        timestep_spacing="leading",
    ).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True})
    )
    assert AutoencoderKL.load_config(root / "vae")["latent_channels"] == 4
    sys.stdout.write(f"wrote SDXL 1.0 base configs (no weights) to {root}\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sdxl-base-configs")
