"""Errors a user can cause: every command line prints one line, ``prog: error: <message>``, and exits 2.

Each case runs a command line's ``main`` in-process and fails before any training or sampling.
"""

import json
import shutil

import pytest
import torch
from conftest import save_tiny_sd_pipeline, tiny_autoencoder
from PIL import Image

from ldm.cli.cache import main as ldm_cache
from ldm.cli.caption_eval import main as caption_eval
from ldm.cli.common import CliParser, user_errors
from ldm.cli.convert_pickle import main as safe_load
from ldm.cli.eval import main as ldm_eval
from ldm.cli.export import main as ldm_export
from ldm.cli.export_folder import main as export_folder
from ldm.cli.sample import main as ldm_sample
from ldm.cli.train_ldm import main as train_ldm
from ldm.cli.train_vae import main as train_vae
from ldm.core.errors import ConfigError, DataError, MissingFileError, UserError
from ldm.core.safe_load import PickleRefusedError


def one_line_error(capsys, main, prog: str, argv: list[str]) -> str:
    """Run ``main(argv)``; check exit status 2 and one stderr line ``prog: error: ...``; return that line."""
    capsys.readouterr()  # drop what the test's setup printed
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert done.value.code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def write_image(path, size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)


@pytest.fixture
def no_progress_bars():
    """Loading a model draws transformers' and diffusers' progress bars on stderr; they are not errors."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()
    diffusers.utils.logging.enable_progress_bar()


@pytest.fixture
def tiny_vae_folder(tmp_path):
    folder = tmp_path / "vae"
    tiny_autoencoder(scaling_factor=0.8).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------ train_vae.py: data
def _missing_folder(tmp):
    return ["data.dataset=folder", f"data.path={tmp / 'no-such-folder'}"], ["data.path", "no-such-folder"]


def _empty_folder(tmp):
    (tmp / "empty").mkdir()
    return ["data.dataset=folder", f"data.path={tmp / 'empty'}"], ["no images found", "empty"]


def _metadata_outside(tmp):
    write_image(tmp / "data" / "a.png")
    write_image(tmp / "outside.png")
    rows = [{"file_name": "a.png", "text": "a"}, {"file_name": "../outside.png", "text": "b"}]
    (tmp / "data" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["data.dataset=folder", f"data.path={tmp / 'data'}"], ["metadata.jsonl, line 2", "../outside.png"]


def _metadata_broken(tmp):
    write_image(tmp / "data" / "a.png")
    (tmp / "data" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n{"file_name": \n')
    return ["data.dataset=folder", f"data.path={tmp / 'data'}"], ["metadata.jsonl, line 2", "not valid JSON"]


def _csv_without_column(tmp):
    write_image(tmp / "a.png")
    (tmp / "data.csv").write_text("file,caption\na.png,a red square\n")
    return ["data.dataset=csv", f"data.path={tmp / 'data.csv'}"], ["data.csv", "'image'", "data.image_column"]


def _missing_hf_folder(tmp):
    return ["data.dataset=hf", f"data.path={tmp / 'no-dataset'}"], ["data.path", "no-dataset"]


def _missing_pretrained(tmp):
    return [f"pretrained={tmp / 'no-vae'}"], ["pretrained=", "no-vae"]


def _bad_resume(tmp):
    return ["--resume", str(tmp / "no-checkpoint")], [
        "--resume",
        "no-checkpoint",
        "not a complete checkpoint",
    ]


def _resume_latest_without_checkpoints(tmp):
    return ["--resume", "latest"], ["--resume latest", "no checkpoint"]


@pytest.mark.parametrize(
    "case",
    [
        _missing_folder,
        _empty_folder,
        _metadata_outside,
        _metadata_broken,
        _csv_without_column,
        _missing_hf_folder,
        _missing_pretrained,
        _bad_resume,
        _resume_latest_without_checkpoints,
    ],
)
def test_train_vae_user_errors_are_one_line(tmp_path, capsys, case):
    args, words = case(tmp_path)
    line = one_line_error(
        capsys, train_vae, "train_vae.py", [*args, f"output_dir={tmp_path / 'run'}", "train.max_steps=2"]
    )
    for word in words:
        assert word in line


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lr=-1", ["train.lr", "-1", "> 0"]),
        ("train.batch_size=0", ["train.batch_size", "0", ">= 1"]),
        ("train.max_steps=-5", ["train.max_steps", "-5"]),
        ("data.resolution=30", ["data.resolution", "30", "multiple", "4"]),
        ("loss.kl_weight=-1", ["loss.kl_weight", ">= 0"]),
        ("train.mixed_precision=fp8", ["train.mixed_precision", "fp8", "no | fp16 | bf16"]),
        ("train.nonexistent=1", ["train.nonexistent"]),
    ],
)
def test_train_vae_config_errors_are_one_line(tmp_path, capsys, override, words):
    line = one_line_error(capsys, train_vae, "train_vae.py", [override, f"output_dir={tmp_path / 'run'}"])
    for word in words:
        assert word in line


# ------------------------------------------------------------------------------ train_ldm.py
def test_train_ldm_user_errors_are_one_line(tmp_path, capsys, tiny_vae_folder):
    run = f"output_dir={tmp_path / 'run'}"
    line = one_line_error(capsys, train_ldm, "train_ldm.py", [f"vae={tmp_path / 'no-vae'}", run])
    assert "no autoencoder at" in line and "no-vae" in line and "vae=PATH" in line

    # data errors come after the models are built, so give it a real (tiny) autoencoder
    no_images = f"data.path={tmp_path / 'no-images'}"
    line = one_line_error(
        capsys, train_ldm, "train_ldm.py", [f"vae={tiny_vae_folder}", "data.dataset=folder", no_images, run]
    )
    assert "data.path" in line and "no-images" in line

    line = one_line_error(
        capsys, train_ldm, "train_ldm.py", [f"vae={tiny_vae_folder}", "data.resolution=33", run]
    )
    assert "data.resolution" in line and "33" in line and "factor 2" in line

    line = one_line_error(
        capsys,
        train_ldm,
        "train_ldm.py",
        ["--resume", str(tmp_path / "nowhere"), f"vae={tiny_vae_folder}", run],
    )
    assert "--resume" in line and "nowhere" in line


def test_train_ldm_pretrained_folder_with_a_missing_part(tmp_path, capsys):
    folder = save_tiny_sd_pipeline(tmp_path / "sd")
    shutil.rmtree(folder / "tokenizer")
    line = one_line_error(
        capsys, train_ldm, "train_ldm.py", [f"pretrained={folder}", f"output_dir={tmp_path / 'run'}"]
    )
    assert f"{folder} is not a diffusers pipeline folder" in line and "missing tokenizer/" in line


@pytest.mark.parametrize(
    "override, words",
    [
        ("text.p_uncond=1.5", ["text.p_uncond", "1.5", "[0, 1)"]),
        ("sample.sampler=foo", ["sample.sampler", "'foo'", "dpm++2m", "euler-a"]),
        ("train.ema_decay=1", ["train.ema_decay", "[0, 1)"]),
        ("train.gradient_accumulation_steps=0", ["train.gradient_accumulation_steps", ">= 1"]),
    ],
)
def test_train_ldm_config_errors_are_one_line(tmp_path, capsys, override, words):
    line = one_line_error(capsys, train_ldm, "train_ldm.py", [override, f"output_dir={tmp_path / 'run'}"])
    for word in words:
        assert word in line


# ------------------------------------------------------------------------------ ldm-sample
def test_ldm_sample_user_errors_are_one_line(tmp_path, capsys, no_progress_bars):
    out = ["--out", str(tmp_path / "out"), "--device", "cpu"]
    line = one_line_error(
        capsys, ldm_sample, "ldm-sample", ["--model", str(tmp_path / "no-model"), "--prompt", "x", *out]
    )
    assert "no-model" in line and "does not exist" in line

    line = one_line_error(
        capsys, ldm_sample, "ldm-sample", ["--model", "m", "--prompt", "x", "--sampler", "foo", *out]
    )
    assert "--sampler" in line and "'foo'" in line and "dpm++2m" in line

    line = one_line_error(
        capsys, ldm_sample, "ldm-sample", ["--model", "m", "--prompt", "x", "--steps", "0", *out]
    )
    assert "--steps" in line and ">= 1" in line

    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    line = one_line_error(
        capsys, ldm_sample, "ldm-sample", ["--model", str(tmp_path / "half"), "--prompt", "x", *out]
    )
    assert "not a diffusers pipeline folder" in line and "unet/" in line

    folder = save_tiny_sd_pipeline(tmp_path / "sd")
    line = one_line_error(
        capsys,
        ldm_sample,
        "ldm-sample",
        ["--model", str(folder), "--prompt", "x", "--lora", str(tmp_path / "no-lora"), *out],
    )
    assert "--lora" in line and "no-lora" in line
    line = one_line_error(
        capsys, ldm_sample, "ldm-sample", ["--model", str(folder), "--prompt", "x", "--size", "15", *out]
    )
    assert "--size 15" in line and "factor 2" in line
    line = one_line_error(
        capsys,
        ldm_sample,
        "ldm-sample",
        ["--model", str(folder), "--prompt", "x", "--vae", str(tmp_path / "no-vae"), *out],
    )
    assert "no vae at" in line and "no-vae" in line


# ------------------------------------------------------------------------------ ldm-eval
def test_ldm_eval_user_errors_are_one_line(tmp_path, capsys):
    line = one_line_error(capsys, ldm_eval, "ldm-eval", [str(tmp_path / "no-run")])
    assert "no-run" in line and "run folder" in line

    (tmp_path / "other").mkdir()
    line = one_line_error(capsys, ldm_eval, "ldm-eval", [str(tmp_path / "other")])
    assert "neither a diffusers pipeline" in line

    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    line = one_line_error(capsys, ldm_eval, "ldm-eval", [str(vae)])
    assert "give --out" in line
    line = one_line_error(
        capsys, ldm_eval, "ldm-eval", [str(vae), "--out", str(tmp_path / "e"), "eval.num_samples=0"]
    )
    assert "eval.num_samples" in line and ">= 1" in line


# ------------------------------------------------------------------------------ module command lines
def test_module_clis_user_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    line = one_line_error(
        capsys, export_folder, "python -m ldm.cli.export_folder", [str(tmp_path / "a-file")]
    )
    assert "a-file" in line and "folder" in line
    line = one_line_error(
        capsys, export_folder, "python -m ldm.cli.export_folder", [str(tmp_path / "x"), "--count", "-1"]
    )
    assert "--count" in line

    prog = "python -m ldm.cli.caption_eval"
    line = one_line_error(capsys, caption_eval, prog, ["--model", str(tmp_path / "no-model")])
    assert "no-model" in line
    line = one_line_error(capsys, caption_eval, prog, ["--sampler", "foo"])
    assert "--sampler" in line and "'foo'" in line

    prog = "python -m ldm.cli.convert_pickle"
    line = one_line_error(capsys, safe_load, prog, [str(tmp_path / "no-weights.pt")])
    assert "no-weights.pt" in line
    torch.save({"w": torch.zeros(2), "f": print}, tmp_path / "code.pt")  # a reference to code, not a tensor
    line = one_line_error(capsys, safe_load, prog, [str(tmp_path / "code.pt")])
    assert "code.pt" in line and "weights_only=True" in line and "print" in line


def test_export_and_cache_user_errors_are_one_line(tmp_path, capsys):
    line = one_line_error(
        capsys, ldm_export, "ldm-export", [str(tmp_path / "no.safetensors"), "--folder", "x"]
    )
    assert "no single-file checkpoint" in line and "no.safetensors" in line
    line = one_line_error(
        capsys, ldm_export, "ldm-export", [str(tmp_path / "no-model"), "--single-file", "x.safetensors"]
    )
    assert "no-model" in line
    line = one_line_error(
        capsys, ldm_export, "ldm-export", [str(tmp_path / "dir"), "--folder", "x", "--config", str(tmp_path)]
    )
    assert "--config is for a single-file" in line
    line = one_line_error(capsys, ldm_cache, "ldm-cache", [])
    assert "cache_dir=DIR" in line
    line = one_line_error(capsys, ldm_cache, "ldm-cache", [f"cache_dir={tmp_path}", "cache_shard_items=0"])
    assert "cache_shard_items=0" in line


# ------------------------------------------------------------------------------ the mechanism
def test_user_errors_derive_from_the_builtin_errors_they_replace():
    for cls in (ConfigError, DataError, PickleRefusedError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError)
    assert issubclass(MissingFileError, UserError) and issubclass(MissingFileError, FileNotFoundError)


def test_other_exceptions_keep_their_traceback(capsys):
    parser = CliParser(prog="prog")
    with pytest.raises(RuntimeError, match="a bug"):
        with user_errors(parser):
            raise RuntimeError("a bug")
    with pytest.raises(SystemExit) as done:
        with user_errors(parser):
            raise DataError("first line\nsecond line")
    assert done.value.code == 2 and capsys.readouterr().err == "prog: error: first line second line\n"
