"""Causal-LM sources: a local Hugging Face folder, a GGUF file, or a GGUF file inside a folder."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgepipe.core.errors import BadInput, one_line
from edgepipe.recipe import Recipe

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


@dataclasses.dataclass
class CausalLM:
    """The float reference: a transformers causal LM (eval, float32), its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    origin: str  # a readable "folder" or "folder/file.gguf"

    def __post_init__(self) -> None:
        self.config = self.model.config

    def release(self) -> None:
        """Drop the weights (the reference outputs are computed); config and tokenizer stay."""
        self.model = None

    @property
    def eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos = eos if eos is not None else self.model.config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return [int(i) for i in ids]


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the duration of a load (a local source never needs the network)."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def locate(recipe: Recipe) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) named by the recipe's model.hf / model.gguf."""
    src = recipe.model
    if src.gguf:
        gguf = recipe.path(src.gguf) if not src.hf else recipe.path(src.hf) / src.gguf
        if not gguf.is_file():
            raise BadInput(f"model.gguf: {gguf} not found")
        return gguf.parent, gguf.name
    folder = recipe.path(src.hf or "")
    if not (folder / "config.json").is_file():
        raise BadInput(f"model.hf: {folder} is not a Hugging Face model folder (no config.json); for a GGUF file use model.gguf")
    return folder, None


def load_tokenizer(folder: Path, gguf: str | None) -> Any:
    from transformers import AutoTokenizer

    where = folder / gguf if gguf else folder
    if not gguf and not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")):
        raise BadInput(f"{folder} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json + merges.txt); "
                       "copy the model's tokenizer files into the folder")
    try:
        with _offline(), _quiet():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    except Exception as exc:
        raise BadInput(one_line(f"cannot load a tokenizer from {where} ({type(exc).__name__}: {exc}); "
                                "a text-generation source needs its tokenizer files (tokenizer.json ...) or a GGUF file")) from None
    return tokenizer


def load_causal_lm(recipe: Recipe) -> CausalLM:
    """The recipe's causal LM in float32 with its tokenizer; bad sources are one-line BadInput."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, gguf = locate(recipe)
    where = str(folder / gguf) if gguf else str(folder)
    try:
        with _offline(), _quiet():
            config = AutoConfig.from_pretrained(str(folder), gguf_file=gguf)
    except Exception as exc:
        kind = "GGUF file" if gguf else "model folder"
        raise BadInput(one_line(f"cannot read the {kind} {where}: {type(exc).__name__}: {exc}")) from None
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise BadInput(f"{where} is a {archs[0]} (no language-model head); task text-generation needs a causal LM "
                       "(…ForCausalLM); use task feature-extraction or text-classification for it")
    tokenizer = load_tokenizer(folder, gguf)
    try:
        with _offline(), _quiet():
            model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, dtype="float32")
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise BadInput(f"{where}: model_type {config.model_type!r} has no causal-LM head in transformers; "
                           "task text-generation needs a causal LM") from None
        raise BadInput(one_line(f"cannot load the model from {where}: {type(exc).__name__}: {exc}")) from None
    except Exception as exc:
        raise BadInput(one_line(f"cannot load the model from {where}: {type(exc).__name__}: {exc}")) from None
    model.eval()
    logger.info("loaded %s (%s, %.1f M parameters)", where, type(model).__name__, model.num_parameters() / 1e6)
    return CausalLM(model, tokenizer, where)


def save_tokenizer(lm: CausalLM, folder: Path) -> list[Path]:
    """Write the tokenizer files a runtime needs (tokenizer.json ...) into ``folder``; returns them."""
    folder.mkdir(parents=True, exist_ok=True)
    with _quiet():
        lm.tokenizer.save_pretrained(str(folder))
    return [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' load-time chatter (legacy-tokenizer notices, progress bars) off for one call."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
