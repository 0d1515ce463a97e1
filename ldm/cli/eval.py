"""``ldm-eval``: the figures and report of a trained autoencoder or text-to-image pipeline.

    ldm-eval runs/ldm-shapes                        a run folder: its model/ and config.yaml
    ldm-eval runs/vae-shapes eval.inception_weights=/weights/inception.safetensors
    ldm-eval path/to/sd-folder --out eval/sd data.dataset=folder data.path=/data/val

MODEL is a run folder (with model/ and config.yaml), or a model folder: a diffusers pipeline
(model_index.json) or an ``AutoencoderKL`` (config.json). Settings come from the run's
config.yaml when there is one, else from the defaults, and then from ``key=value`` overrides
(``eval.*``, ``data.*``, ``sample.*``, ``allow_pickle``). Writes ``eval.json``, ``report.md`` and
its PNGs to ``--out`` (default: the run folder).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ldm.cli.common import CliParser, setup_logging, user_errors
from ldm.core.config import load_config
from ldm.core.errors import MissingFileError, UserError
from ldm.core.io import write_json

logger = logging.getLogger("ldm")


def find_model(path: Path) -> tuple[str, Path, Path | None]:
    """(kind "pipeline" | "autoencoder", model folder, run folder or None) for a run or model folder."""
    if not path.is_dir():
        raise MissingFileError(
            f"no folder at {path}: give a run folder (model/ and config.yaml), a pipeline folder or an "
            "AutoencoderKL folder"
        )
    run = path if (path / "model").is_dir() else (path.parent if path.name == "model" else None)
    model = path / "model" if (path / "model").is_dir() else path
    if run is not None and not (run / "config.yaml").is_file():
        run = None
    if (model / "model_index.json").is_file():
        return "pipeline", model, run
    config = model / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("_class_name") == "AutoencoderKL":
        return "autoencoder", model, run
    raise MissingFileError(
        f"{path}: neither a diffusers pipeline (model_index.json) nor an AutoencoderKL (config.json), "
        "nor a run folder holding one in model/"
    )


def evaluate_pipeline_folder(model: Path, run: Path | None, out: Path, overrides: list[str]) -> dict:
    from ldm.data import build_dataset
    from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
    from ldm.train.config import LDMRunConfig
    from ldm.train.evaluate import evaluate_run

    cfg = load_config(LDMRunConfig, run / "config.yaml" if run else None, overrides)
    pipe = LatentDiffusionPipeline.from_pretrained(
        model,
        device="cuda" if torch.cuda.is_available() else "cpu",
        allow_pickle=cfg.allow_pickle,
    )
    return evaluate_run(pipe, build_dataset(cfg.data, "val", cfg.seed), cfg, out, run)


def evaluate_autoencoder_folder(model: Path, run: Path | None, out: Path, overrides: list[str]) -> dict:
    from autoencoder.config import VAERunConfig
    from autoencoder.evaluate import evaluate_autoencoder, save_reconstructions
    from autoencoder.model import load_pretrained_autoencoder
    from autoencoder.perceptual import load_lpips
    from autoencoder.report import autoencoder_report
    from ldm.data import build_dataset

    cfg = load_config(VAERunConfig, run / "config.yaml" if run else None, overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = load_pretrained_autoencoder(model, cfg.allow_pickle).to(device).eval()
    lpips, _ = load_lpips(cfg.loss.lpips_weights, cfg.allow_pickle)
    val_set = build_dataset(cfg.data, "val", cfg.seed)
    results = evaluate_autoencoder(
        vae, val_set, cfg.eval, batch_size=cfg.train.batch_size * 4, allow_pickle=cfg.allow_pickle,
        lpips=lpips.to(device) if lpips is not None else None,
    )  # fmt: skip
    results["scaling_factor"] = vae.config.scaling_factor
    save_reconstructions(
        vae,
        torch.stack([val_set[i]["pixel_values"] for i in range(min(8, len(val_set)))]),
        out / "reconstructions.png",
    )
    autoencoder_report(out, results, f"Report: {(run or model).name}", run)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(
        prog="ldm-eval", description="Evaluate an autoencoder or a text-to-image pipeline and write a report."
    )
    parser.add_argument("model", type=Path, help="a run folder, a pipeline folder or an AutoencoderKL folder")
    parser.add_argument(
        "--out", type=Path, default=None, help="where eval.json and report.md go (default: the run)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (eval.*, data.*, sample.*)")
    args = parser.parse_intermixed_args(argv)  # overrides before or after --out
    setup_logging()
    with user_errors(parser):
        kind, model, run = find_model(args.model)
        out = args.out or run
        if out is None:
            raise UserError(
                f"{args.model} is not a run folder (no config.yaml next to model/): give --out DIR"
            )
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out}: that is a file; give a folder for eval.json and report.md")
        out.mkdir(parents=True, exist_ok=True)
        evaluate = evaluate_pipeline_folder if kind == "pipeline" else evaluate_autoencoder_folder
        results = evaluate(model, run, out, args.overrides)
    write_json(out / "eval.json", results)
    logger.info("wrote %s and %s", out / "eval.json", out / "report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
