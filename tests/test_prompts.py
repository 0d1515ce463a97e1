"""Prompt files for sample grids (kohya-style per-line options): parsing, errors before training, grids."""

import pytest
from PIL import Image

from ldm.core.config import load_config
from ldm.core.errors import ConfigError
from ldm.pipelines.prompts import SamplePrompt, parse_prompt_line, read_prompt_file
from ldm.train.config import LDMRunConfig


def test_a_line_with_every_option():
    line = "a red circle on a black background --n blurry, dark --l 4.5 --s 12 --d 7 --w 32 --h 48"
    assert parse_prompt_line(line) == SamplePrompt(
        "a red circle on a black background", "blurry, dark", 4.5, 12, 7, 32, 48
    )
    assert parse_prompt_line("just a prompt") == SamplePrompt("just a prompt")


@pytest.mark.parametrize(
    "line, words",
    [
        ("a cat --x 3", "unknown option --x"),
        ("a cat --s many", "--s 'many' is not a int"),
        ("a cat --l", "--l needs a value"),
        ("--s 3", "no prompt"),
        ("a cat --w 0", "--w must be positive"),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path, line, words):
    path = tmp_path / "prompts.txt"
    path.write_text(f"# grid prompts\n\na dog --s 4\n{line}\n")
    with pytest.raises(ConfigError, match=rf"prompts.txt:4: .*{words}"):
        read_prompt_file(path)
    with pytest.raises(ConfigError, match="prompts.txt:4"):  # at config load: before anything trains
        load_config(LDMRunConfig, None, [f"sample.prompts_file={path}"])


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ConfigError, match="no file"):
        read_prompt_file(tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="no prompts"):
        read_prompt_file(tmp_path / "empty.txt")


def test_prompt_file_drives_the_training_grids(tmp_path):
    from conftest import tiny_autoencoder

    from ldm.train.diffusion import train_ldm

    vae = tmp_path / "vae"
    tiny_autoencoder(scaling_factor=0.8).save_pretrained(vae)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "a red circle on a black background --n blue --l 3 --s 2 --d 5\n"
        "a blue square on a white background --w 32 --h 16\n"
    )
    cfg = load_config(
        LDMRunConfig,
        None,
        [f"output_dir={tmp_path / 'run'}", f"vae={vae}", "data.resolution=16", "data.train_size=16",
         "data.val_size=4", "unet.block_out_channels=[32,32]", "unet.norm_num_groups=8", "text.hidden_size=32",
         "text.num_heads=2", "text.intermediate_size=64", "train.batch_size=4", "train.compile=false",
         "train.max_steps=2", "train.sample_every=0", "train.checkpoint_every=0", "sample.steps=2",
         "sample.grid_seeds=2", "eval.num_samples=0", "preflight.samples=0", f"sample.prompts_file={prompts}"],
    )  # fmt: skip
    out = train_ldm(cfg)
    grid = Image.open(out / "samples" / "final.png")
    # 2 rows (one per line) x 2 seeds; the 32 x 16 line sets the cell size: 2 + 2 * (32 + 2) wide
    assert grid.size == (2 + 2 * (32 + 2), 2 + 2 * (16 + 2))
