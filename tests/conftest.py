"""Tests run on the CPU, offline, with tiny models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from ldm.training.compile import missing_compiler  # noqa: E402

# train.compile on the CPU needs TorchInductor's C++ compiler; the tests of compiled training run where there is one
NEEDS_COMPILER = pytest.mark.skipif(
    missing_compiler(torch.device("cpu")) is not None, reason="train.compile needs a C++ compiler on the CPU"
)


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory):
    """A randomly initialised torchvision Inception-v3 saved as safetensors (no download)."""
    import torch
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=True, init_weights=True)
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_clip_folder(tmp_path_factory):
    """A tiny random transformers CLIPModel (32 px images, CLIP vocabulary) saved to disk."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    torch.manual_seed(0)
    text = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=77)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)  # fmt: skip
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(
        CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    ).save_pretrained(folder)
    return folder


def tiny_autoencoder(scaling_factor: float):
    """A tiny untrained f=2 AutoencoderKL (8 channels, 16 px), built as stage 1 builds its model."""
    import torch

    from autoencoder.config import AutoencoderConfig
    from autoencoder.model import build_autoencoder

    torch.manual_seed(0)
    vae = build_autoencoder(AutoencoderConfig(block_out_channels=[8, 8], norm_num_groups=4), sample_size=16)
    vae.register_to_config(scaling_factor=scaling_factor)
    return vae


TINY_TEXT = dict(vocab_size=49408, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, pad_token_id=0, bos_token_id=49406, eos_token_id=49407)  # fmt: skip


def tiny_diffusers_vae(sample_size: int, **config):
    """A tiny random f=2 diffusers ``AutoencoderKL`` with 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4,
        sample_size=sample_size, **config,
    )  # fmt: skip


def save_tiny_sd_pipeline(folder):
    """A tiny SD 1.x-style pipeline (f=2 VAE, scaled_linear epsilon schedule), saved by diffusers at ``folder``."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from conditioning import build_clip_tokenizer

    torch.manual_seed(0)
    vae = tiny_diffusers_vae(48)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, **TINY_TEXT))
    unet = UNet2DConditionModel(
        sample_size=24,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=8,
    )
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=build_clip_tokenizer(77), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)  # fmt: skip
    return folder


def tiny_sdxl_parts(seed: int = 0, width_2: int = 32) -> dict:
    """The modules of a tiny SDXL pipeline (f=2 VAE; two CLIP text encoders, the first 32 wide, the
    second ``width_2`` wide with a projection; a UNet with ``addition_embed_type="text_time"``),
    diffusers and transformers classes only."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from conditioning import build_clip_tokenizer

    torch.manual_seed(seed)
    vae = tiny_diffusers_vae(32, scaling_factor=0.13025)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, **TINY_TEXT))
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=width_2, projection_dim=16, **TINY_TEXT)
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + width_2,  # both encoders' contexts side by side
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,  # time ids + the pooled embedding
        norm_num_groups=8,
    )
    return {
        "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
        "tokenizer": build_clip_tokenizer(77), "tokenizer_2": build_clip_tokenizer(77), "unet": unet,
    }  # fmt: skip


def save_tiny_sdxl_pipeline(
    folder, prediction_type: str = "epsilon", zero_terminal_snr: bool = False, width_2: int = 32
):
    """A tiny SDXL pipeline (``tiny_sdxl_parts``) saved by diffusers' ``StableDiffusionXLPipeline`` at
    ``folder``; its scheduler is SDXL's (scaled_linear, leading spacing), with ``prediction_type`` and
    zero terminal SNR as asked."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
        timestep_spacing="leading", prediction_type=prediction_type, rescale_betas_zero_snr=zero_terminal_snr,
    )  # fmt: skip
    StableDiffusionXLPipeline(
        **tiny_sdxl_parts(width_2=width_2), scheduler=scheduler, add_watermarker=False
    ).save_pretrained(folder)
    return folder


MIXED_SIZES = [(64, 32), (32, 64), (48, 48), (96, 40), (40, 96), (50, 50), (70, 36), (36, 70), (64, 64),
               (80, 44), (44, 80), (56, 56)]  # fmt: skip


@pytest.fixture(scope="session")
def mixed_folder(tmp_path_factory):
    """12 shapes images stretched to mixed sizes and aspect ratios, captions in metadata.jsonl."""
    import json

    from PIL import Image

    from ldm.data.shapes import ShapesDataset

    root = tmp_path_factory.mktemp("mixed")
    shapes = ShapesDataset(len(MIXED_SIZES), resolution=64, split="val")
    lines = []
    for i, size in enumerate(MIXED_SIZES):
        spec, image = shapes.image(i)
        Image.fromarray(image.permute(1, 2, 0).numpy()).resize(size).save(root / f"{i:02d}.png")
        lines.append(json.dumps({"file_name": f"{i:02d}.png", "text": spec.caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def finetune_config(out, pretrained, data, *extra):
    """A 5-step fine-tune of ``pretrained`` on the folder ``data`` at 48 px with buckets, tiny evaluation."""
    from ldm.core.config import load_config
    from ldm.train.config import LDMRunConfig

    return load_config(
        LDMRunConfig,
        None,
        [f"output_dir={out}", f"pretrained={pretrained}", "data.dataset=folder", f"data.path={data}",
         "data.resolution=48", "data.buckets=true", "data.repeats=2", "train.batch_size=2", "train.max_steps=5",
         "train.lr=1e-2", "train.lr_warmup_steps=0", "train.ema_decay=0", "train.log_every=1",
         "train.sample_every=0", "train.checkpoint_every=0", "sample.steps=2", "sample.grid_prompts=1",
         "sample.grid_seeds=1", "eval.num_samples=2", "eval.batch_size=2", "train.compile=false", *extra],
    )  # fmt: skip


@pytest.fixture()
def fresh_accelerate_state():
    """accelerate keeps one process-wide state: reset it around a run with another precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
