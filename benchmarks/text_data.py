"""Offline token corpora for the quality benchmark: a BPE (or word-level) vocabulary trained
locally on the Python standard library's sources, and batches of token ids.

No downloads.  ``bpe_corpus`` trains a byte-level BPE tokenizer with the ``tokenizers`` package
(``pip install tokenizers``; it also comes with ``transformers``) on the text, encodes the whole
text and caches both (tokenizer JSON + int16/int32 id tensor) under ``cache_dir``, keyed by a hash
of the text, the vocabulary size and the tokenizer kind; a second call (or a subprocess) loads
the cache.  Without ``tokenizers`` a simple word-level vocabulary (most frequent words,
punctuation and whitespace runs, ``<unk>`` for the rest) is built in Python instead; the
``kind`` in the returned metadata says which.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import tempfile
import time

import torch

__all__ = ["default_cache_dir", "bpe_corpus"]

_FILE_MARK = b"# file: "
_WORD_RE = re.compile(r"\w+|\s+|[^\w\s]")


def default_cache_dir() -> str:
    """``$VELORA_FX_CACHE`` or ``<tmp>/velora_fx_cache``."""
    return os.environ.get("VELORA_FX_CACHE") or os.path.join(tempfile.gettempdir(), "velora_fx_cache")


def _documents(text: bytes, piece: int = 1 << 20) -> list[str]:
    """The text split at its ``# file:`` markers (one document per source file), pieces of at
    most ``piece`` bytes, decoded as UTF-8 (invalid bytes replaced)."""
    docs, start = [], 0
    while start < len(text):
        nxt = text.find(b"\n" + _FILE_MARK, start + 1)
        end = len(text) if nxt < 0 else nxt + 1
        for i in range(start, end, piece):
            docs.append(text[i:min(end, i + piece)].decode("utf-8", errors="replace"))
        start = end
    return docs


def _tokenizer_kind(prefer: str) -> str:
    if prefer == "word":
        return "word"
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        if prefer == "bpe":
            raise
        return "word"
    return "bpe"


def _train_bpe(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(docs, trainer, length=len(docs))
    ids: list[int] = []
    for i in range(0, len(docs), 256):
        for enc in tok.encode_batch(docs[i:i + 256]):
            ids.extend(enc.ids)
    return tok.to_str(), ids, tok.get_vocab_size()


def _train_word(docs: list[str], vocab_size: int):
    counts = collections.Counter()
    for doc in docs:
        counts.update(_WORD_RE.findall(doc))
    vocab = ["<unk>"] + [w for w, _ in counts.most_common(vocab_size - 1)]
    index = {w: i for i, w in enumerate(vocab)}
    ids = [index.get(w, 0) for doc in docs for w in _WORD_RE.findall(doc)]
    return json.dumps({"kind": "word", "vocab": vocab}), ids, len(vocab)


def bpe_corpus(text: bytes, vocab_size: int = 8192, *, cache_dir: str | None = None,
               tokenizer: str = "auto", verbose: bool = True) -> tuple[torch.Tensor, dict]:
    """Token ids of ``text`` under a vocabulary of ``vocab_size`` trained on ``text`` itself.

    ``tokenizer``: ``"auto"`` (BPE with ``tokenizers`` when importable, else word-level),
    ``"bpe"`` or ``"word"``.  Returns ``(ids, meta)``: ``ids`` a 1-D int16/int32 CPU tensor,
    ``meta`` a dict (kind, vocab_size, tokens, text_bytes, text_sha256, cache path, seconds).
    The cache write is atomic (temp file + rename), so concurrent readers see whole files only.
    """
    kind = _tokenizer_kind(tokenizer)
    version = ""
    if kind == "bpe":
        import tokenizers
        version = tokenizers.__version__
    text_hash = hashlib.sha256(text).hexdigest()[:16]
    key = f"{kind}{vocab_size}_{text_hash}" + (f"_tok{version}" if version else "")
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, key)
    ids_path, meta_path, tok_path = (os.path.join(path, n) for n in ("ids.pt", "meta.json", "tokenizer.json"))
    if os.path.exists(meta_path) and os.path.exists(ids_path):
        with open(meta_path) as fh:
            meta = json.load(fh)
        return torch.load(ids_path), {**meta, "cache": path, "cached": True}
    t0 = time.perf_counter()
    if verbose:
        print(f"training a {kind} vocabulary of {vocab_size} on {len(text) / 1e6:.1f} MB (cache: {path})", flush=True)
    docs = _documents(text)
    tok_json, ids, real_vocab = (_train_bpe if kind == "bpe" else _train_word)(docs, vocab_size)
    dtype = torch.int16 if real_vocab <= 2**15 else torch.int32
    tensor = torch.tensor(ids, dtype=dtype)
    meta = {"kind": kind, "tokenizers_version": version or None, "vocab_size": real_vocab,
            "requested_vocab_size": vocab_size, "tokens": len(ids), "text_bytes": len(text),
            "bytes_per_token": len(text) / max(1, len(ids)), "text_sha256": text_hash,
            "build_s": time.perf_counter() - t0}
    os.makedirs(path, exist_ok=True)
    for target, write in ((tok_path, lambda f: f.write(tok_json)), (meta_path, lambda f: json.dump(meta, f, indent=1))):
        tmp = f"{target}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            write(fh)
        os.replace(tmp, target)
    tmp = f"{ids_path}.{os.getpid()}.tmp"
    torch.save(tensor, tmp)
    os.replace(tmp, ids_path)  # written last: its presence (with meta) marks a complete cache entry
    if verbose:
        print(f"  {len(ids) / 1e6:.2f} M tokens ({meta['bytes_per_token']:.2f} bytes/token), "
              f"{meta['build_s']:.1f} s", flush=True)
    return tensor, {**meta, "cache": path, "cached": False}


