"""Evaluation and reports (``ldm-eval``): numbers and pictures for autoencoders and pipelines.

- ``ldm.eval.bound``: the variational bound in bits per dimension (Ho et al. 2020, eq. 5);
- ``ldm.eval.timestep_loss``: the denoising loss per timestep;
- ``ldm.eval.clip_score``: CLIP score from a local CLIP model;
- ``ldm.eval.pipeline_eval``: the guidance sweep (caption accuracy, diversity, CLIP score),
  FID / KID (``ldm.eval.fid``), and the two above on held-out latents;
- ``ldm.eval.report``: ``report.md`` and its plots; ``ldm.cli.eval``: the ``ldm-eval`` command.
Autoencoders are evaluated by ``autoencoder.evaluate`` and reported by ``autoencoder.report``.
"""

from ldm.eval.bound import variational_bound
from ldm.eval.pipeline_eval import PipelineEvalSettings, evaluate_pipeline
from ldm.eval.timestep_loss import loss_per_timestep

__all__ = ["PipelineEvalSettings", "evaluate_pipeline", "loss_per_timestep", "variational_bound"]
