"""Classifier guidance (Dhariwal & Nichol 2021): steering sampling with grad log p_phi(y | z_t).

    g = grad_{z_t} sum_heads log p_phi(y_h | z_t, t)              (``classifier_gradient``)

- Ancestral DDPM (their Algorithm 1): the step's mean moves by s Sigma_t g,
  z_{t-1} = mu + s Sigma_t g + sigma_t n, so the shift is added after the scheduler's step.
- Every other sampler (DDIM and the ODE solvers; their eq. 14): the score gains s g, i.e.
  eps^ = eps - s sqrt(1 - abar_t) g, and the sampler runs on eps^ (for a v or x_0 prediction, the
  same change in closed form: v^ = v - s sqrt(1 - abar) / sqrt(abar) g, x^_0 = x_0 + s (1 - abar) /
  sqrt(abar) g), with abar the sampler's own at the step (``sampler_abar``).

It composes with classifier-free guidance: the CFG prediction is the one that is guided. The
gradient is taken at z_t as the UNet sees it (after a sampler's input scaling), in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from ldm.core.safe_load import check_model_folder, from_pretrained_kwargs
from ldm.diffusion.ddpm import DDPM
from ldm.models.classifier import NO_LABEL, NoiseConditionalClassifier, caption_labels, log_likelihood


def classifier_gradient(
    classifier: NoiseConditionalClassifier, z_t: Tensor, t: Tensor, targets: dict[str, Tensor]
) -> Tensor:
    """grad_{z_t} sum_h log p(y_h | z_t, t) (summed over the batch, so each row gets its own), (B, C, h, w)."""
    with torch.inference_mode(False), torch.enable_grad():  # (sampling runs under inference_mode)
        z = z_t.detach().clone().to(torch.promote_types(z_t.dtype, torch.float32)).requires_grad_(True)
        t = t.detach().clone()
        dtype = next(classifier.parameters()).dtype
        log_p = log_likelihood(classifier(z.to(dtype), t), targets).sum()
        (grad,) = torch.autograd.grad(log_p, z)
    return grad.to(z_t.dtype)


def ancestral_variance(scheduler: DDPMScheduler, t: int) -> float:
    """Sigma_t of DDPM's ancestral step from t to the scheduler's previous timestep: beta~ (fixed_small,
    the posterior's) or beta (fixed_large), beta = 1 - abar_t / abar_prev; 0 at the last step (no noise)."""
    if t <= 0:
        return 0.0
    ac = scheduler.alphas_cumprod.to(torch.float64)
    prev = int(scheduler.previous_timestep(t))
    a_t, a_prev = float(ac[t]), float(ac[prev]) if prev >= 0 else 1.0
    beta = 1 - a_t / a_prev
    large = str(scheduler.config.variance_type).startswith("fixed_large")
    return beta if large else (1 - a_prev) / (1 - a_t) * beta


@dataclass
class ClassifierGuide:
    """What ``denoise`` needs to guide by a classifier: the classifier, each image's targets, the scale."""

    classifier: NoiseConditionalClassifier
    targets: dict[str, Tensor]  # head -> (n,) class indices
    scale: float
    objective: DDPM  # the UNet's process: converts its prediction through eps

    def check(self) -> None:
        """The classifier must know the model's noise schedule: it was trained on those z_t."""
        theirs, mine = self.classifier.alphas_cumprod, self.objective.alphas_cumprod.cpu()
        if theirs.shape != mine.shape or not torch.allclose(theirs.double(), mine.double(), atol=1e-5):
            raise ValueError(
                "the classifier was trained on another noise schedule than this model's "
                f"({self.classifier.config.beta_schedule}, {self.classifier.config.num_train_timesteps} steps): "
                "train it with the model's noise settings (train_classifier.py pretrained=MODEL)"
            )

    def guided(
        self, scheduler: SchedulerMixin, z_t: Tensor, t: Tensor, pred: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """(the prediction to step with, a shift to add after the step or None)."""
        grad = classifier_gradient(self.classifier, z_t, t.reshape(1).expand(len(z_t)), self.targets).float()
        if isinstance(scheduler, DDPMScheduler):  # Algorithm 1: mu + s Sigma g
            return pred, (self.scale * ancestral_variance(scheduler, int(t)) * grad).to(pred.dtype)
        a = sampler_abar(scheduler, t, self.objective.alphas_cumprod).to(z_t.device).float()
        # eq. 14, eps^ = eps - s sqrt(1 - abar) g, written for the model's own prediction (eps, v or x_0)
        shift = -self.scale * (1 - a).sqrt() * grad  # (the change in eps)
        kind = self.objective.prediction_type
        if kind == "v_prediction":  # dv/d(eps) = 1 / sqrt(abar) at fixed z_t
            shift = shift / a.sqrt()
        elif kind == "sample":  # d(x_0)/d(eps) = -sqrt(1 - abar) / sqrt(abar)
            shift = -shift * (1 - a).sqrt() / a.sqrt()
        return (pred.float() + shift).to(pred.dtype), None


def sampler_abar(scheduler: SchedulerMixin, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """abar at this step as the sampler has it: from its sigma (Euler, Heun, LMS, DPM-Solver, UniPC:
    sigma = sqrt((1 - abar) / abar), so abar = 1 / (1 + sigma^2); Karras or fractional timesteps
    included), else ``alphas_cumprod`` at the integer timestep (DDIM, PNDM)."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None:
        index = scheduler.step_index if scheduler.step_index is not None else (scheduler.begin_index or 0)
        sigma = sigmas[index].double()
        return 1 / (1 + sigma**2)
    return alphas_cumprod.double()[int(t)]  # (integer timesteps)


Labels = dict[str, str] | list[dict[str, str]] | None


def label_targets(heads: dict[str, list[str]], class_labels: Labels, prompts: list[str]) -> dict[str, Tensor]:
    """{head: (n,) class indices} for the n images: from ``class_labels`` (one {head: class} for all,
    or one per image; a head left out is not guided), else read from each prompt (``caption_labels``)."""
    if class_labels is None:
        targets = caption_labels(prompts, heads)
    else:
        rows = [class_labels] * len(prompts) if isinstance(class_labels, dict) else list(class_labels)
        if len(rows) != len(prompts):
            raise ValueError(
                f"class_labels: {len(rows)} for {len(prompts)} images; give one dict, or one per image"
            )
        targets = {name: torch.full((len(rows),), NO_LABEL, dtype=torch.long) for name in heads}
        for i, row in enumerate(rows):
            for name, value in row.items():
                if name not in heads:
                    raise ValueError(f"class_labels: no head {name!r}; the classifier has {', '.join(heads)}")
                if value not in heads[name]:
                    raise ValueError(
                        f"class_labels: {value!r} is not a class of {name!r} ({', '.join(heads[name])})"
                    )
                targets[name][i] = heads[name].index(value)
    if all((y == NO_LABEL).all() for y in targets.values()):
        raise ValueError(
            "classifier guidance has nothing to guide toward: no prompt names a class of "
            f"{', '.join(heads)}; pass class_labels={{head: class}}"
        )
    return targets


def make_guide(
    classifier: NoiseConditionalClassifier | str | Path,
    class_labels: Labels,
    prompts: list[str],
    scale: float,
    objective,
    device: torch.device,
    channels: int,
) -> ClassifierGuide:
    """The guide for one call: the classifier (a model or its folder, safetensors only) on ``device``,
    checked against the model's noise schedule and latent channels, and each image's targets."""
    if not isinstance(objective, DDPM):
        raise ValueError(
            f"classifier guidance needs a DDPM model; this one is {objective.name} (its score is not eps-based)"
        )
    with torch.inference_mode(False):  # (called while sampling: weights made here must take gradients)
        if not isinstance(classifier, NoiseConditionalClassifier):
            check_model_folder(classifier, False, "classifier")
            classifier = NoiseConditionalClassifier.from_pretrained(
                classifier, **from_pretrained_kwargs(False)
            )
        classifier = classifier.to(device).eval().requires_grad_(False)
    if classifier.config.in_channels != channels:
        raise ValueError(
            f"the classifier reads {classifier.config.in_channels}-channel latents, this model's have {channels}: "
            "train it on this model's latents (train_classifier.py pretrained=MODEL)"
        )
    targets = {
        k: v.to(device) for k, v in label_targets(classifier.config.heads, class_labels, prompts).items()
    }
    guide = ClassifierGuide(classifier, targets, float(scale), objective)
    guide.check()
    return guide
