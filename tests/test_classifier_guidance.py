"""Classifier guidance: the classifier's gradient, the guided samplers, the labels, and training the classifier."""

import json

import pytest
import torch
from conftest import save_tiny_sd_pipeline

from ldm.models.classifier import NO_LABEL, NoiseConditionalClassifier, caption_labels, log_likelihood
from ldm.pipelines.classifier_guidance import classifier_gradient, label_targets
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.train.classifier import ClassifierRunConfig, train_classifier

HEADS = {"color": ["red", "blue", "green"], "shape": ["circle", "square"]}


def tiny_classifier(in_channels=4, **schedule) -> NoiseConditionalClassifier:
    torch.manual_seed(0)
    return NoiseConditionalClassifier(in_channels=in_channels, sample_size=8, heads=HEADS,
                                      block_out_channels=(16, 32), norm_num_groups=8, **schedule).eval()  # fmt: skip


def test_the_guidance_gradient_equals_finite_differences():
    classifier = tiny_classifier().double()
    z = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 700])
    targets = {"color": torch.tensor([0, 2]), "shape": torch.tensor([1, NO_LABEL])}
    grad = classifier_gradient(classifier, z, t, targets)
    assert grad.shape == z.shape and grad.dtype == torch.float64

    def f(x):
        with torch.no_grad():
            return float(log_likelihood(classifier(x, t), targets).sum())

    gen = torch.Generator().manual_seed(2)
    for _ in range(3):  # directional derivatives along random directions (central differences)
        v = torch.randn(z.shape, dtype=torch.float64, generator=gen)
        h = 1e-5
        numeric = (f(z + h * v) - f(z - h * v)) / (2 * h)
        analytic = float((grad * v).sum())
        assert abs(numeric - analytic) <= 1e-3 * max(1.0, abs(analytic)), (numeric, analytic)
    # each image's gradient is its own: the second image's rows do not move the first's log p
    only_first = classifier_gradient(classifier, z[:1], t[:1], {k: v[:1] for k, v in targets.items()})
    assert torch.allclose(only_first, grad[:1], atol=1e-12)


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    folder = save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")
    return LatentDiffusionPipeline.from_pretrained(folder, channels_last=False)


def schedule_of(pipe) -> dict:
    c = pipe.scheduler_config
    return {"num_train_timesteps": c["num_train_timesteps"], "beta_schedule": c["beta_schedule"],
            "beta_start": c["beta_start"], "beta_end": c["beta_end"]}  # fmt: skip


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm++2m", "euler"])
def test_guided_sampling_at_scale_0_equals_unguided_and_a_larger_scale_raises_log_p(tiny_pipe, sampler):
    classifier = tiny_classifier(**schedule_of(tiny_pipe))
    kw = {"num_inference_steps": 4, "guidance_scale": 3.0, "sampler": sampler, "seed": [0, 1], "height": 16,
          "width": 16, "output_type": "latent", "progress": False}  # fmt: skip
    prompts = ["a red circle", "a blue square"]
    plain = tiny_pipe(prompts, **kw).images
    zero = tiny_pipe(prompts, classifier=classifier, classifier_scale=0.0, **kw).images
    assert torch.equal(plain, zero)
    strong = tiny_pipe(prompts, classifier=classifier, classifier_scale=200.0, **kw).images
    targets = caption_labels(prompts, HEADS)
    t0 = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        before = log_likelihood(classifier(plain.float(), t0), targets)
        after = log_likelihood(classifier(strong.float(), t0), targets)
    assert (after > before).all(), (before, after)  # guidance moves z_0 toward the labels


def test_guidance_refuses_another_schedule_and_names_missing_labels(tiny_pipe):
    other = tiny_classifier(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    with pytest.raises(ValueError, match="another noise schedule"):
        tiny_pipe(
            "a red circle", classifier=other, num_inference_steps=1, height=16, width=16, progress=False
        )
    classifier = tiny_classifier(**schedule_of(tiny_pipe))
    with pytest.raises(ValueError, match="nothing to guide toward"):
        tiny_pipe(
            "a photo", classifier=classifier, num_inference_steps=1, height=16, width=16, progress=False
        )
    with pytest.raises(ValueError, match="not a class of 'color'"):
        tiny_pipe(
            "", classifier=classifier, class_labels={"color": "purple"}, num_inference_steps=1, progress=False
        )


def test_labels_from_captions_and_from_class_labels():
    labels = caption_labels(["a red circle", "a Blue square on green", "a square"], HEADS)
    assert labels["color"].tolist() == [0, NO_LABEL, NO_LABEL]  # the second names two colors
    assert labels["shape"].tolist() == [0, 1, 1]
    targets = label_targets(HEADS, [{"color": "green"}, {"shape": "circle"}], ["", ""])
    assert targets["color"].tolist() == [2, NO_LABEL] and targets["shape"].tolist() == [NO_LABEL, 0]
    with pytest.raises(ValueError, match="no head 'size'"):
        label_targets(HEADS, {"size": "big"}, [""])


def test_train_classifier_learns_pixels_and_reports_accuracy_per_t_band(tmp_path):
    from ldm.core.config import load_config

    cfg = load_config(ClassifierRunConfig, None, [
        f"output_dir={tmp_path / 'clf'}", "autoencoder.kind=identity", "data.resolution=16", "data.train_size=512",
        "data.val_size=128", "train.max_steps=150", "train.batch_size=64", "train.lr_warmup_steps=10",
        "model.block_out_channels=[16,32]", "model.norm_num_groups=8", "eval_bands=4",
    ])  # fmt: skip
    out = train_classifier(cfg)
    results = json.loads((out / "classifier.json").read_text())
    bands = results["per_t_band"]
    assert [(b["t_lo"], b["t_hi"]) for b in bands] == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    # the background (3 classes, flat colour) is easy where the noise is small, and chance-like at t ~ T
    assert bands[0]["background"] > 0.9 and bands[0]["background"] > bands[-1]["background"]
    loaded = NoiseConditionalClassifier.from_pretrained(out / "model")
    assert loaded.config.heads["shape"] == ["circle", "square", "triangle"]
    from ldm.diffusion.ddpm import DDPM

    assert torch.allclose(
        loaded.alphas_cumprod, DDPM.from_config(cfg.noise).alphas_cumprod
    )  # the schedule it learned


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_scale_0_is_exact_for_v_and_x0_models_and_a_folder_loads_under_sampling(tiny_pipe, kind, tmp_path):
    pipe = LatentDiffusionPipeline(
        tiny_pipe.vae, tiny_pipe.text_encoder, tiny_pipe.tokenizer, tiny_pipe.unet,
        {**tiny_pipe.scheduler_config, "prediction_type": kind},
    )  # fmt: skip
    folder = tmp_path / "classifier"
    tiny_classifier(**schedule_of(pipe)).save_pretrained(folder)  # loaded inside the sampling call
    kw = {"num_inference_steps": 3, "guidance_scale": 2.0, "sampler": "dpm++2m-karras", "seed": 0, "height": 16,
          "width": 16, "output_type": "latent", "progress": False}  # fmt: skip
    plain = pipe("a red circle", **kw).images
    assert torch.equal(plain, pipe("a red circle", classifier=folder, classifier_scale=0.0, **kw).images)
    assert not torch.equal(plain, pipe("a red circle", classifier=folder, classifier_scale=50.0, **kw).images)
    with pytest.raises(ValueError, match="3-channel latents"):
        pipe("a red circle", classifier=tiny_classifier(in_channels=3, **schedule_of(pipe)), **kw)


def test_train_classifier_command_line(capsys):
    from ldm.cli.train_classifier import main

    assert main(["--dry-run", "train.max_steps=7"]) == 0
    assert "max_steps: 7" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["heads={color: [dark blue, red]}"])
    assert stop.value.code == 2 and "not one word" in capsys.readouterr().err
