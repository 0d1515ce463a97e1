"""New tokens for textual inversion (Gal et al. 2022, "An Image is Worth One Word"): words for a concept
the text encoder has none for, learned as embedding rows while every network stays frozen.

A token ``<tok>`` with ``vectors`` = k gets k rows, named ``<tok>``, ``<tok>_1``, ..., ``<tok>_{k-1}``
as diffusers names them; a prompt's ``<tok>`` stands for all k (``expand_multi_vector``, diffusers'
``maybe_convert_prompt``). Each row starts as the mean embedding of an init word's tokens.

While training, the text model's token embedding is an ``AddedTokenEmbedding``: the base table (V, D)
frozen, the new rows (n, D) a parameter of their own. So the optimizer holds state for n rows, not for
V + n (about 150 MB for SD's 49,408 x 768 in AdamW), and the base rows cannot move. ``fuse_new_tokens``
turns it back into one ``nn.Embedding`` (V + n, D) for the export. ``token_embeddings`` gives the rows
in the layout diffusers' ``load_textual_inversion`` reads.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conditioning.tokenizer import clean_caption
from ldm.core.errors import ConfigError


class AddedTokenEmbedding(nn.Module):
    """Ids < V look up ``base`` (frozen), ids >= V the trained ``added`` rows: (B, L) -> (B, L, D)."""

    def __init__(self, base: nn.Embedding, added: Tensor):
        super().__init__()
        self.base = base
        self.added = nn.Parameter(added)  # (n, D)

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings + len(self.added)

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> Tensor:
        """The whole table (V + n, D), a new tensor: for code that reads it (the rows stay separate)."""
        return torch.cat([self.base.weight, self.added.detach().to(self.base.weight.dtype)])

    def forward(self, input_ids: Tensor) -> Tensor:
        v = self.base.num_embeddings
        out = self.base(input_ids.clamp(max=v - 1))  # (B, L, D)
        new = F.embedding((input_ids - v).clamp(min=0), self.added).to(out.dtype)
        return torch.where((input_ids >= v).unsqueeze(-1), new, out)


def _body(model: nn.Module) -> nn.Module:
    return getattr(model, "text_model", model)  # transformers < 5 nests the modules under .text_model


def token_embedding(model: nn.Module) -> nn.Module:
    return _body(model).embeddings.token_embedding


def vector_names(token: str, vectors: int) -> list[str]:
    """``<tok>``, ``<tok>_1``, ...: the names of a token's rows in the tokenizer (diffusers' naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def check_new_token(token: str, tokenizer, vectors: int = 1) -> None:
    """A clear error unless ``token`` and its vector names are new words a caption can carry."""
    if not token or token != clean_caption(token) or " " in token:
        raise ConfigError(
            f"new token {token!r}: write it in lower case, without spaces (captions are lower-cased "
            f"before tokenizing), e.g. {clean_caption(token).replace(' ', '-') or '<my-concept>'!r}"
        )
    vocabulary = tokenizer.get_vocab()
    for name in vector_names(token, vectors):
        if name in vocabulary or f"{name}</w>" in vocabulary:
            raise ConfigError(
                f"new token {name!r} already exists in the tokenizer's vocabulary: training it would change "
                "a word the model knows; choose a new one, e.g. '<my-concept>' with angle brackets"
            )


def init_rows(model: nn.Module, tokenizer, word: str, vectors: int) -> Tensor:
    """(vectors, D): the mean of ``word``'s token embeddings (float32), repeated."""
    ids = tokenizer(clean_caption(word), add_special_tokens=False).input_ids
    if not word.strip() or not ids:
        raise ConfigError(f"ti.init word {word!r} has no tokens: give a word close to the concept")
    table = token_embedding(model).weight
    if max(ids) >= len(table):
        raise ConfigError(f"ti.init word {word!r} has token ids past the text encoder's {len(table)} rows")
    row = table[torch.tensor(ids, device=table.device)].float().mean(0)  # (D,)
    return row.detach().clone().expand(vectors, -1).clone()


def add_new_tokens(
    model: nn.Module, tokenizer, tokens: list[str], init: list[str], vectors: int
) -> list[int]:
    """Add ``tokens`` (``vectors`` rows each) to ``tokenizer`` and ``model`` (as an
    ``AddedTokenEmbedding``), each initialised from its ``init`` word; returns the new rows' ids."""
    if len(init) != len(tokens):
        raise ConfigError(f"ti.init has {len(init)} word(s) for {len(tokens)} token(s): give one per token")
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"ti.tokens {tokens} repeats a token")
    embedding = token_embedding(model)
    if isinstance(embedding, AddedTokenEmbedding):
        raise ValueError("this text encoder has new tokens already")
    for token in tokens:
        check_new_token(token, tokenizer, vectors)
        clash = [t for t in tokens if t != token and re.fullmatch(re.escape(token) + r"_\d+", t)]
        if clash:  # "<a>_1" is the name of "<a>"'s second vector
            raise ConfigError(
                f"new tokens {token!r} and {clash[0]!r}: a token's extra vectors are named "
                f"{token}_1, {token}_2, ...; choose names that are not of that form"
            )
    if len(tokenizer) != embedding.num_embeddings:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens and the text encoder {embedding.num_embeddings} "
            "embedding rows: new tokens need the two to match (is this the model's own tokenizer?)"
        )
    rows = torch.cat([init_rows(model, tokenizer, w, vectors) for w in init])  # (n, D)
    names = [name for token in tokens for name in vector_names(token, vectors)]
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    first = embedding.num_embeddings
    if ids != list(range(first, first + len(names))):
        raise ValueError(f"the tokenizer gave the new tokens ids {ids}, not {first}..")
    _body(model).embeddings.token_embedding = AddedTokenEmbedding(embedding, rows.to(embedding.weight.device))
    pool_at_end_of_text(model, tokenizer)
    return ids


def pool_at_end_of_text(model: nn.Module, tokenizer) -> None:
    """Make the pooled embedding read the end-of-text token. Older CLIP configs (SD 1.x's, SDXL's:
    ``eos_token_id`` 2) pool at the largest id, which new tokens (ids past the vocabulary) would
    take over. With the tokenizer's end-of-text id, transformers pools at its first occurrence: the
    same place for every caption without new tokens (transformers PR #24777)."""
    eos = tokenizer.eos_token_id
    if eos is not None and model.config.eos_token_id != eos:
        model.config.eos_token_id = eos
        body = _body(model)
        if hasattr(body, "eos_token_id"):
            body.eos_token_id = eos


def new_rows(model: nn.Module) -> Tensor | None:
    """The trained rows (n, D) of a text model with new tokens, else None."""
    embedding = token_embedding(model)
    return embedding.added if isinstance(embedding, AddedTokenEmbedding) else None


def fuse_new_tokens(model: nn.Module) -> None:
    """Replace an ``AddedTokenEmbedding`` by one ``nn.Embedding`` (V + n, D) holding both (in place):
    the plain layout that ``save_pretrained`` writes and any CLIP text model loads."""
    embedding = token_embedding(model)
    if not isinstance(embedding, AddedTokenEmbedding):
        return
    weight = embedding.weight  # (V + n, D) in the base's dtype
    fused = nn.Embedding(*weight.shape, device=weight.device, dtype=weight.dtype)
    fused.weight.data.copy_(weight)
    _body(model).embeddings.token_embedding = fused
    model.config.vocab_size = len(weight)


def token_embeddings(model: nn.Module, tokenizer, token: str) -> Tensor:
    """(k, D) float32 on the CPU: the rows of ``token`` and its ``token_i`` vectors, from the text model."""
    vocabulary = tokenizer.get_vocab()
    names = [token]
    while f"{token}_{len(names)}" in vocabulary:
        names.append(f"{token}_{len(names)}")
    ids = tokenizer.convert_tokens_to_ids(names)
    embedding = token_embedding(model)
    table = embedding.weight if not isinstance(embedding, AddedTokenEmbedding) else None
    if table is None:
        v = embedding.base.num_embeddings
        rows = [embedding.added[i - v] if i >= v else embedding.base.weight[i] for i in ids]
        return torch.stack(rows).detach().float().cpu()
    return table[torch.tensor(ids, device=table.device)].detach().float().cpu()


def expand_multi_vector(text: str, tokenizer) -> str:
    """``<tok>`` -> ``<tok> <tok>_1 ...`` for each added token that has more vectors, as diffusers'
    ``maybe_convert_prompt`` does: the same token ids as diffusers' pipelines for the same prompt."""
    added = getattr(tokenizer, "added_tokens_encoder", {})
    if not any(f"{t}_1" in added for t in added):  # no multi-vector token: nothing to do
        return text
    for token in set(tokenizer.tokenize(text)):
        if token in added and f"{token}_1" in added:
            names = [token]
            while f"{token}_{len(names)}" in added:
                names.append(f"{token}_{len(names)}")
            text = text.replace(token, " ".join(names))
    return text
