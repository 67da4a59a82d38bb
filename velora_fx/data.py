"""Offline real text for examples and quality benchmarks.

No downloads: the Python standard library's own ``.py`` sources (about 10-12 MB, the same on every
machine with the same Python) give real, structured text for a byte-level language model, so
quality comparisons (exact vs compressed training) are reproducible anywhere.
"""
from __future__ import annotations

import os
import sysconfig
from typing import Iterator

import torch

__all__ = ["stdlib_text", "byte_lm_batches", "token_lm_batches"]

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_text(max_bytes: int | None = None, *, include_tests: bool = False) -> bytes:
    """The standard library's ``.py`` files, concatenated in sorted path order.

    Installed packages (site-packages) are skipped so the text depends only on the Python version;
    test directories are skipped by default (they are large and repetitive).  Each file is
    preceded by a ``# file: <relative path>`` line.  ``max_bytes`` truncates the result.
    """
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_parts = os.path.relpath(dirpath, root).split(os.sep)
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and (include_tests or d not in _TEST_DIRS)]
        if not include_tests and _TEST_DIRS.intersection(rel_parts):
            continue
        paths.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    chunks, total = [], 0
    for path in sorted(paths, key=lambda p: os.path.relpath(p, root)):
        with open(path, "rb") as fh:
            chunk = f"# file: {os.path.relpath(path, root)}\n".encode() + fh.read() + b"\n"
        chunks.append(chunk)
        total += len(chunk)
        if max_bytes is not None and total >= max_bytes:
            break
    text = b"".join(chunks)
    return text if max_bytes is None else text[:max_bytes]


def byte_lm_batches(data: bytes, batch_size: int, seq_len: int, *, split: str = "train",
                    val_fraction: float = 0.05, seed: int = 0,
                    device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Infinite ``(inputs, targets)`` batches of byte ids (vocab 256), targets shifted by one.

    The split is by position (the last ``val_fraction`` of ``data`` is validation), so train and
    val never share text.  Windows start at random offsets drawn from a private generator seeded
    with ``seed``: the same arguments give the same batches in the same order, whatever else
    uses the global RNG -- so regimes compared in a benchmark see identical data.
    """
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return token_lm_batches(tokens, batch_size, seq_len, split=split, val_fraction=val_fraction, seed=seed,
                            device=device)


def token_lm_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, *, split: str = "train",
                     val_fraction: float = 0.05, seed: int = 0,
                     device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Infinite ``(inputs, targets)`` batches of token ids (int64) from a 1-D id tensor, with the
    same split and seeding rules as ``byte_lm_batches``."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(tokens) * (1.0 - val_fraction))
    part = tokens[:cut] if split == "train" else tokens[cut:]
    if len(part) < seq_len + 2:
        raise ValueError(f"the {split} split has {len(part)} tokens, too few for seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, len(part) - seq_len - 1, (batch_size, 1), generator=generator)
        window = part[starts + offsets].long()
        yield window[:, :-1].contiguous().to(device), window[:, 1:].contiguous().to(device)
