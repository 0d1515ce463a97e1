"""Teach the shapes demo model a new concept from 8 images: the cross, a shape no dataset item has,
with textual inversion, pivotal tuning and DreamBooth-LoRA with prior preservation; score each.

    python bench/new_concept.py make data/cross                 # 8 crosses: data/cross/{token,sks}
    python bench/new_concept.py train ti|pivotal|dreambooth data/cross [--steps N] [key=value ...]
    python bench/new_concept.py score [--base runs/ldm-shapes/model] [--run runs/nc-ti] [--seeds 4]

``make`` draws 8 items of the shapes validation split as crosses with the export tool
(``python -m ldm.cli.export_folder --shape cross``), twice: captioned with the new token
``<cross>`` ("a red <cross> on a white background", for textual inversion and pivotal tuning) and
with DreamBooth's rare identifier ``sks``. ``train`` runs ``train_ldm.py`` with the method's preset
(``configs/ldm/textual-inversion.yaml``, ``pivotal.yaml``, ``dreambooth-lora.yaml``) from the demo
model, all 8 images training (``data.val_size=0``), and prints its command. DreamBooth's class
images are the base model's own drawings of the 54 shapes captions (``class_prompts``, one image
each), drawn by the run into ``<run>/class-images``.

``score`` loads the base model, then the run's embeddings and LoRA (what the run exported), and
prints one JSON line:

- ``drawn``: the share of images read as a cross (``ldm.eval.shapes_reader`` with
  ``new_shapes=("cross",)``) among 18 prompts "a {color} <word> on a {background} background"
  (every color and background) x ``--seeds``; ``drawn_caption``: color, cross and background all right;
  ``read_as``: what the reader saw in those images (shape -> count);
- ``captions``: caption accuracy on the 54 original captions x 2 seeds (circles, squares, triangles):
  how the model holds up on what it knew.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from ldm.data.export_folder import export_folder
from ldm.data.shapes import BACKGROUNDS, COLORS, SHAPES, caption
from ldm.eval.shapes_reader import caption_accuracy, classify_batch
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "<cross>"
WORDS = {"token": TOKEN, "sks": "sks"}  # folder -> the concept's word in its captions
IMAGES = 8
ORIGINAL = [caption(c, s, b) for c in COLORS for s in SHAPES for b in BACKGROUNDS]  # 54 captions
PROMPT_SEEDS = 2  # seeds per original caption
METHODS = {
    "ti": ("textual-inversion.yaml", "token", [f"ti.tokens=['{TOKEN}']", "ti.init=[square]"]),
    "pivotal": ("pivotal.yaml", "token", [f"ti.tokens=['{TOKEN}']", "ti.init=[square]"]),
    "dreambooth": ("dreambooth-lora.yaml", "sks", []),
}


def concept_prompts(word: str) -> tuple[list[str], list[str]]:
    """(prompts with ``word``, the same captions with "cross"): every color x background."""
    pairs = [(c, b) for c in COLORS for b in BACKGROUNDS]
    return [caption(c, word, b) for c, b in pairs], [caption(c, "cross", b) for c, b in pairs]


def make(root: Path) -> None:
    for folder, word in WORDS.items():  # the same 8 crosses (seed 0 of the validation split) twice
        export_folder(root / folder, IMAGES, 32, seed=0, split="val", shape="cross", word=word)
    sys.stdout.write(f"wrote {IMAGES} crosses to {root / 'token'} ({TOKEN}) and {root / 'sks'} (sks)\n")


def train(method: str, data: Path, steps: int | None, extra: list[str]) -> None:
    preset, folder, overrides = METHODS[method]
    out = ROOT / "runs" / f"nc-{method}"
    common = [f"output_dir={out}", *([f"train.max_steps={steps}"] if steps else []), "data.val_size=0", "train.val_every=0",
              f"sample.prompts=['{caption('red', WORDS[folder], 'white')}']", "caption.prefix=''"]  # fmt: skip
    if method == "dreambooth":
        prompts = "[" + ", ".join(f"'{c}'" for c in ORIGINAL) + "]"
        overrides = [f"data.sources.0.path={data / folder}", "data.sources.0.prefix=''",
                     f"data.sources.1.path={out / 'class-images'}", f"data.sources.1.class_prompts={prompts}",
                     f"data.sources.1.num_class_images={len(ORIGINAL)}"]  # fmt: skip
    else:
        overrides = [f"data.path={data / folder}", *overrides]
    cmd = [sys.executable, "train_ldm.py", "--config", f"configs/ldm/{preset}", *common, *overrides, *extra]
    sys.stdout.write(" ".join(cmd[1:]) + "\n")
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    sys.stdout.write(f"{method}: trained in {time.perf_counter() - t0:.0f} s\n")


@torch.no_grad()
def draw(pipe: LatentDiffusionPipeline, prompts: list[str], seeds: list[int], args) -> torch.Tensor:
    images = []
    for start in range(0, len(prompts), 64):
        out = pipe(
            prompts[start : start + 64], num_inference_steps=args.steps, guidance_scale=args.guidance,
            sampler="dpm++2m", seed=seeds[start : start + 64], output_type="pt_signed", progress=False,
        )  # fmt: skip
        images.append(out.images)
    return torch.cat(images)


def score(args) -> dict:
    pipe = LatentDiffusionPipeline.from_pretrained(args.base)
    word = "sks"
    if args.run is not None:
        run = Path(args.run)
        if (run / "embeddings").is_dir():
            pipe.load_textual_inversion(run / "embeddings")
            word = TOKEN
        if (run / "lora").is_dir():
            pipe.load_lora_weights(run / "lora")
        word = args.word or word
    else:
        word = args.word or TOKEN
    t0 = time.perf_counter()
    prompts, truth = concept_prompts(word)
    prompts = [p for p in prompts for _ in range(args.seeds)]
    truth = [t for t in truth for _ in range(args.seeds)]
    seeds = [k for _ in range(len(prompts) // args.seeds) for k in range(args.seeds)]
    drawn = draw(pipe, prompts, seeds, args)
    concept = caption_accuracy(drawn, truth, new_shapes=("cross",))
    shapes = [label[1] for label in classify_batch(drawn, new_shapes=("cross",))]
    original = [c for c in ORIGINAL for _ in range(PROMPT_SEEDS)]
    seeds = [k for _ in ORIGINAL for k in range(PROMPT_SEEDS)]
    held = caption_accuracy(draw(pipe, original, seeds, args), original)
    return {
        "run": args.run or "base", "word": word, "drawn": concept["shape"], "drawn_caption": concept["accuracy"],
        "drawn_n": concept["n"], "read_as": {k: shapes.count(k) for k in sorted(set(shapes))},
        "captions": held["accuracy"], "captions_n": held["n"],
        "score_seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("make").add_argument("root", type=Path)
    t = sub.add_parser("train")
    t.add_argument("method", choices=sorted(METHODS))
    t.add_argument("data", type=Path)
    t.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the preset's)")
    s = sub.add_parser("score")
    s.add_argument("--base", default=str(ROOT / "runs" / "ldm-shapes" / "model"))
    s.add_argument("--run", default=None, help="a run folder: its embeddings/ and lora/ are loaded")
    s.add_argument("--word", default=None, help="the concept's word in the prompts (default: the run's)")
    s.add_argument("--seeds", type=int, default=4)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--guidance", type=float, default=4.0)
    args, overrides = parser.parse_known_args(argv)
    if overrides and (args.command != "train" or not all("=" in o for o in overrides)):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    if args.command == "make":
        make(args.root)
    elif args.command == "train":
        train(args.method, args.data, args.steps, overrides)
    else:
        sys.stdout.write(json.dumps(score(args)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
