"""The diffusion objective's config: the noise process and what the UNet predicts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ldm.core.config import ConfigError, check_bounds, check_choice

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")


@dataclass
class NoiseConfig:
    """The objective (``ldm.diffusion.registry``): the forward process q(z_t | z_0) and what the UNet predicts."""

    # ddpm | rectified_flow (the names of ldm.diffusion.registry.OBJECTIVES)
    objective: str = "ddpm"
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # linear | scaled_linear | squaredcos_cap_v2
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = False  # rescale betas to SNR(T) = 0 (Lin et al. 2023)
    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample
    min_snr_gamma: float = 0.0  # min-SNR-gamma loss weight (Hang et al. 2023); 0 disables
    # debiased estimation (Yu et al. 2024; kohya's --debiased_estimation_loss): the loss weighted by
    # 1 / sqrt(SNR) (eps) or 1 / (SNR + 1) (v), SNR capped at 1000; ddpm only
    debiased_estimation: bool = False
    # [lo, hi]: train on that part of the schedule only, as fractions of it (DDPM: t in
    # [lo T, hi T); flow: t in [lo, hi]); None: all of it (kohya's --min_timestep / --max_timestep)
    timestep_range: list[float] | None = None
    offset_noise: float = 0.0  # std of per-channel noise added to eps (offset noise); 0 disables
    # rectified_flow: how t in [0, 1] is drawn, uniform | logit_normal (Esser et al. 2024)
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # rectified_flow: t' = a t / (1 + (a - 1) t), a = sqrt(pixels / base pixels) for a larger resolution
    shift: float = 1.0

    BOUNDS: ClassVar[dict[str, str]] = {
        "num_train_timesteps": ">= 1",
        "beta_start": "(0, 1)",
        "beta_end": "(0, 1)",
        "min_snr_gamma": ">= 0",
        "offset_noise": ">= 0",
        "logit_std": "> 0",
        "shift": "> 0",
    }

    def __post_init__(self) -> None:
        check_choice("noise.beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice("noise.prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("noise.timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
        check_bounds("noise", self)
        if self.timestep_range is not None:
            lo_hi = list(self.timestep_range)
            if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= 1:
                raise ConfigError(
                    f"noise.timestep_range={lo_hi}: give [lo, hi] with 0 <= lo < hi <= 1 (fractions of the "
                    "schedule, e.g. [0.0, 0.5] for the less noisy half)"
                )
        if self.debiased_estimation and (self.objective != "ddpm" or self.prediction_type == "sample"):
            raise ConfigError(
                "noise.debiased_estimation weights eps or v losses by the SNR: it needs noise.objective=ddpm "
                "with noise.prediction_type=epsilon or v_prediction"
            )
        if self.objective == "ddpm" and (self.timestep_sampling != "uniform" or self.shift != 1.0):
            raise ConfigError(
                "noise.timestep_sampling and noise.shift apply to noise.objective=rectified_flow; "
                "DDPM draws t uniformly from 0..T-1"
            )
        if self.objective != "ddpm" and (
            self.prediction_type != "epsilon" or self.min_snr_gamma or self.zero_terminal_snr
        ):
            raise ConfigError(
                f"noise.objective={self.objective} predicts the velocity eps - z_0: noise.prediction_type, "
                "noise.min_snr_gamma and noise.zero_terminal_snr apply to noise.objective=ddpm only"
            )
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ConfigError(
                "noise.zero_terminal_snr=true needs noise.prediction_type=v_prediction (or sample): "
                "at SNR 0 the noise is the whole input and eps cannot be learned (Lin et al. 2023)"
            )
