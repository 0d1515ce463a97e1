"""Textual-inversion files: a pipeline's new tokens written as, and read from, the layouts in use.

- SD 1.x/2.x: diffusers' ``{token: (k, D)}`` (its ``textual_inversion`` example's ``learned_embeds``);
  AUTOMATIC1111 and ComfyUI read it too.
- SDXL: ``{"clip_l": (k, 768), "clip_g": (k, 1280)}``, the rows for the first and the second text
  encoder, the layout AUTOMATIC1111, ComfyUI and kohya's SDXL embeddings share; diffusers loads it
  with one ``load_textual_inversion`` call per encoder, which is what ``load_textual_inversion`` here does.

The token is the file's key (SD), else its ``token`` metadata (ours), else the file name (as
AUTOMATIC1111 names embeddings). Loading goes through diffusers' ``load_textual_inversion``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from conditioning.new_tokens import token_embeddings
from ldm.core.io import replace_dir, umask_permissions
from ldm.core.safe_load import pickle_refused

SDXL_KEYS = ("clip_l", "clip_g")  # the first and the second text encoder's rows


def file_name(token: str) -> str:
    """A file name for ``token``: ``<my-cat>`` -> ``my-cat.safetensors``."""
    stem = re.sub(r"[^a-z0-9_.-]+", "_", token.strip("<>").lower()).strip("_.") or "token"
    return f"{stem}.safetensors"


def save_textual_inversion(pipe, folder: Path, tokens: list[str]) -> list[Path]:
    """One file per token in ``folder`` (replaced atomically); see the module's layouts."""
    from safetensors.torch import save_file

    pairs = [(pipe.text_encoder, pipe.tokenizer)]
    if pipe.is_sdxl:
        pairs.append((pipe.text_encoder_2, pipe.tokenizer_2))
    for token in tokens:
        for _, tokenizer in pairs:
            if token not in tokenizer.get_vocab():
                raise ValueError(f"token {token!r} is not in this pipeline's tokenizer: nothing to save")
    names = [file_name(t) for t in tokens]
    if len(set(names)) != len(names):
        raise ValueError(f"tokens {tokens} give the same file name; make them differ in letters or digits")
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = []
    for token, name in zip(tokens, names, strict=True):
        rows = [token_embeddings(model, tokenizer, token).contiguous() for model, tokenizer in pairs]
        state = dict(zip(SDXL_KEYS, rows, strict=True)) if pipe.is_sdxl else {token: rows[0]}
        save_file(state, str(tmp / name), metadata={"token": token, "vectors": str(len(rows[0]))})
        files.append(folder / name)
    umask_permissions(tmp)
    replace_dir(tmp, folder)
    return files


def read_embedding_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a ``.safetensors`` embedding file; pickle files are refused."""
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        raise pickle_refused(path)
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def token_of(path: Path, state: dict, metadata: dict, token: str | None) -> str:
    """The token a file's rows get: ``token``, else the key of a one-key SD file, else the file's
    ``token`` metadata, else its name."""
    if token:
        return token
    if len(state) == 1 and not set(state) & {*SDXL_KEYS, "emb_params"}:
        return next(iter(state))
    return metadata.get("token") or path.stem


def load_textual_inversion(pipe, path: Path, token: str | None = None) -> list[str]:
    """Every embedding file at ``path`` (a file, or a folder's ``*.safetensors``) into ``pipe``'s
    tokenizer(s) and text encoder(s); returns the tokens, in file order."""
    if not path.exists():
        raise FileNotFoundError(f"no textual-inversion file at {path}")
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no .safetensors embedding files in {path}")
    if token and len(files) > 1:
        raise ValueError(f"token={token!r} names one token, but {path} holds {len(files)} files")
    sd = pipe.as_diffusers()
    tokens = []
    for file in files:
        state, metadata = read_embedding_file(file)
        name = token_of(file, state, metadata, token)
        sdxl_file = bool(set(state) & set(SDXL_KEYS))
        if sdxl_file != pipe.is_sdxl:
            raise ValueError(
                f"{file} is an {'SDXL' if sdxl_file else 'SD 1.x/2.x'} embedding ({', '.join(state)}), but this "
                f"pipeline is {'SDXL' if pipe.is_sdxl else 'SD 1.x/2.x'}: use an embedding trained for its text encoders"
            )
        if sdxl_file:
            missing = [k for k in SDXL_KEYS if k not in state]
            if missing:
                raise ValueError(f"{file} has no {', '.join(missing)} rows: SDXL needs both encoders' rows")
            for key, model, tokenizer in zip(
                SDXL_KEYS,
                (pipe.text_encoder, pipe.text_encoder_2),
                (pipe.tokenizer, pipe.tokenizer_2),
                strict=True,
            ):
                sd.load_textual_inversion(state[key], token=name, text_encoder=model, tokenizer=tokenizer)
        else:
            rows = state[name] if name in state else next(iter(state.values()))
            if len(state) > 1 and name not in state and "emb_params" not in state:
                raise ValueError(
                    f"{file} holds {len(state)} tensors ({', '.join(state)}); expected one token's rows"
                )
            sd.load_textual_inversion(state.get("emb_params", rows), token=name)
        tokens.append(name)
    return tokens
