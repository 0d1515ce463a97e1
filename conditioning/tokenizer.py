"""The CLIP BPE tokenizer, built offline from the vocabulary file that ``open_clip_torch`` ships.

CLIP (Radford et al. 2021) tokenizes lower-cased text with byte-level BPE (Sennrich et al. 2016, in
the byte-level form of GPT-2): 49,408 tokens = 256 byte symbols + the same with the end-of-word
suffix ``</w>`` + 48,894 merges + ``<|startoftext|>`` (49406) + ``<|endoftext|>`` (49407).

``build_clip_tokenizer`` returns a ``transformers.CLIPTokenizer`` whose ids equal
``open_clip.tokenize`` for every caption passed through ``clean_caption`` first:

- padding with ``"!"`` (id 0) after the end token, as OpenCLIP and Stable Diffusion 2 do (OpenAI CLIP
  and SD 1.x pad with ``<|endoftext|>`` instead);
- ``split_special_tokens=True``, so that a ``"!"`` in a caption is BPE-encoded like any character.
  Without it the pad token ``"!"`` is matched as a special token inside captions (every ``"!"``
  becomes id 0; diffusers issue #4153, transformers issue #24925). The flag is saved in
  ``tokenizer_config.json``, so ``CLIPTokenizer.from_pretrained`` (and diffusers) load it back;
- truncation keeps ``<|startoftext|>``, the first ``max_length - 2`` tokens and ``<|endoftext|>``,
  which is what OpenCLIP's truncation (cut to ``max_length``, last id set to the end token) gives.

Text cleaning: OpenCLIP runs ``ftfy.fix_text``, unescapes HTML twice, collapses whitespace and
lower-cases with Python's ``str.lower``; the Hugging Face tokenizer only applies NFC, collapses
whitespace and lower-cases character by character. ``clean_caption`` does OpenCLIP's part, so that
``tokenizer(clean_caption(c))`` equals ``open_clip.tokenize(c)``; without it, captions with HTML
entities, mojibake, curly quotes, ligatures, full-width letters, control characters or a final
Greek sigma tokenize differently. The one remaining difference: OpenCLIP treats the literal strings
``<start_of_text>`` and ``<end_of_text>`` inside a caption as its special tokens; here they are text.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import tempfile
from functools import lru_cache
from pathlib import Path

import ftfy
from transformers import CLIPTokenizer

from ldm.core.errors import MissingFileError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"  # inside the open_clip package
NUM_MERGES = 49152 - 256 - 2  # merges CLIP uses from the file (OpenAI CLIP, simple_tokenizer.py)
BOS_TOKEN = "<|startoftext|>"  # id 49406
EOS_TOKEN = "<|endoftext|>"  # id 49407
PAD_TOKEN = "!"  # id 0, OpenCLIP's and SD 2's padding
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
VOCAB_SIZE = 49408


def clean_caption(text: str) -> str:
    """OpenCLIP's text cleaning (``_clean_lower``): ftfy, HTML unescape (twice), whitespace, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def bpe_vocab_path() -> Path:
    """The BPE merges file shipped inside ``open_clip_torch`` (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise MissingFileError(
            f"open_clip_torch is not installed; it ships {BPE_FILE}: pip install open_clip_torch"
        )
    path = Path(spec.origin).parent / BPE_FILE
    if not path.is_file():
        raise MissingFileError(f"no {BPE_FILE} in {path.parent}; reinstall open_clip_torch")
    return path


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable unicode character, reversible (GPT-2's byte-level BPE, as used by CLIP).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to chr(256 + n) in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


@lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], tuple[str, ...]]:
    """(token -> id, merges) exactly as OpenCLIP's ``SimpleTokenizer`` builds its encoder and BPE ranks."""
    lines = gzip.open(bpe_vocab_path()).read().decode("utf-8").split("\n")
    merges = tuple(lines[1 : NUM_MERGES + 1])  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    tokens = (
        symbols
        + [s + "</w>" for s in symbols]
        + ["".join(m.split()) for m in merges]
        + [BOS_TOKEN, EOS_TOKEN]
    )
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{bpe_vocab_path()} gave {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def write_clip_vocab(folder: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (the Hugging Face CLIP files) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def build_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer equal to ``open_clip.tokenize`` (see the module docstring), built offline.

    ``model_max_length`` is ``max_length``: diffusers pads prompts to it.
    """
    with tempfile.TemporaryDirectory(prefix="clip-vocab-") as tmp:
        write_clip_vocab(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(
            tmp,
            pad_token=PAD_TOKEN,
            model_max_length=max_length,
            split_special_tokens=True,
            local_files_only=True,
        )
    tokenizer.name_or_path = f"open_clip/{BPE_FILE}"  # not the deleted temporary folder
    if tokenizer.pad_token_id != PAD_TOKEN_ID or tokenizer.eos_token_id != EOS_TOKEN_ID:
        raise ValueError(
            f"CLIP tokenizer ids are off: pad {tokenizer.pad_token_id} (want {PAD_TOKEN_ID}), "
            f"eos {tokenizer.eos_token_id} (want {EOS_TOKEN_ID})"
        )
    return tokenizer
