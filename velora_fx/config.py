"""Configuration of the VeLoRA pass: one frozen dataclass, validated at construction."""
from __future__ import annotations

import dataclasses
import math
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

__all__ = ["VeloraConfig", "ConfigError", "RECIPES"]

_INIT_RE = re.compile(r"^(first_batch|batch|random|ema:(0?\.\d+|0|1|0\.|1\.0*))$")
_MODES = ("auto", "max_memory", "all")
_ESTIMATES = ("gradient", "activation")
# Sub-token sizes "auto" chooses from (powers of two that divide the feature size)
AUTO_SUB_TOKEN_SIZES = (2, 4, 8, 16, 32, 64)
# Default bound on a site's estimated weight-gradient error in "auto" (see docs/quality.md)
DEFAULT_MAX_ERROR = 0.6
# Default least memory-per-approximation in "auto": a site must free at least this fraction of the
# graph's saved bytes per fraction of the trained weights whose gradients it approximates.  The
# sites that read a norm output (q/k/v, gate/up, c_attn, c_fc) free ~1.3 % each for ~11-22 % of the
# weights (0.07-0.12) and cost the most loss; the MLP down input frees ~0.36 per weight share
# (docs/quality.md: with them, GPT-2's auto cost +1.3 % over 5 seeds)
DEFAULT_MIN_EFFICIENCY = 0.2
# What the planner may use, by name (each one a file under codecs/; see docs/codecs.md)
CODECS = ("velora", "fewbit", "rmm", "gated", "chunked_loss")
# ``codecs`` when not given.  With a memory_budget: VeLoRA and the exact loss head, which frees the
# largest tensors of a causal LM's step (the logits) at no gradient error.  Without one, in "auto":
# VeLoRA plus the near-exact codecs (few-bit nonlinearity backward, int8 gate/up storage), whose
# estimated_error is ~0.006-0.007 against ~0.5 for VeLoRA at g = 2, and which free a GELU MLP's
# pre-activation or a gated MLP's gate and up, plus the exact loss head (a causal LM called with
# labels in training then returns no logits, as with Liger-Kernel's fused loss; keep_logits=True
# keeps them).  H200, 12 x 1024, plain call: peak 0.68x GPT-2 at 1.04x step time, 0.58x Llama at
# 1.01x, where the near-exact codecs alone gave 0.79x and 0.85x (results/gpu/v15).  "max_memory"
# uses the same codecs (every freeing site, no min_efficiency); "all" is VeLoRA's paper mode: VeLoRA alone.
# With offload=True the default is exact: keep, recompute, offload and the exact loss head only
DEFAULT_CODECS = {"budget": ("velora", "chunked_loss"), "offload": ("chunked_loss",),
                  "auto": ("velora", "fewbit", "gated", "chunked_loss"),
                  "max_memory": ("velora", "fewbit", "gated", "chunked_loss"), "all": ("velora",)}
_COEFF_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ConfigError(ValueError):
    """An option, or an option against the model, is wrong (bad group size, unknown mode...)."""


def _as_patterns(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise ConfigError(f"{name} must be a glob string or a list of them, got {value!r}") from None
    if not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"{name} must hold glob strings, got {value!r}")
    return patterns


def _as_dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str) and value.replace("torch.", "") in _COEFF_DTYPES:
        dtype = _COEFF_DTYPES[value.replace("torch.", "")]
    else:
        raise ConfigError(f"coeff_dtype must be one of {sorted(_COEFF_DTYPES)} or None, got {value!r}")
    if dtype is not None and dtype not in _COEFF_DTYPES.values():
        raise ConfigError(f"unsupported coeff_dtype {dtype}; use float32, float16 or bfloat16")
    return dtype


@dataclass(frozen=True)
class VeloraConfig:
    """Options of the VeLoRA rewrite (Miles et al., 2024, "VeLoRA: Memory Efficient Training
    using Rank-1 Sub-Token Projections").

    The sub-token size g: ``num_groups`` (g = D / num_groups) **or** ``sub_token_size`` fixes it
    for every site; with neither, ``mode="auto"`` chooses g per site (the largest power of two
    whose estimated error stays under ``max_error``) and the other modes use the paper's 32 groups.
    A feature size a fixed g does not divide is skipped in "auto" and an error elsewhere.
    """

    num_groups: int | None = field(default=None, metadata={"help": "sub-tokens per token (g = D / num_groups)"})
    sub_token_size: int | None = field(default=None, metadata={"help": "size g of each sub-token"})
    init: str = field(default="first_batch", metadata={"help": "first_batch | batch | ema:<decay> | random"})
    estimate: str = field(default="gradient", metadata={
        "help": "how estimated_error is measured on the first batch: gradient (one calibration backward: the weight "
                "gradients' own error with the real output gradients) or activation (the activation energy the "
                "projection drops; no backward, less compile-time memory)"})
    scale: float = field(default=1.0, metadata={"help": "multiplier (> 0) on the reconstructed weight gradient"})
    mode: str = field(default="auto", metadata={
        "help": "auto: sites that free enough saved bytes within max_error; max_memory: every site that frees "
                "bytes (g within max_error unless num_groups/sub_token_size fix it); all: every selected site "
                "(paper-faithful)"})
    max_error: float = field(default=DEFAULT_MAX_ERROR, metadata={
        "help": "auto, max_memory: bound on a site's estimated relative weight-gradient error (0 = exact only)"})
    min_efficiency: float = field(default=DEFAULT_MIN_EFFICIENCY, metadata={
        "help": "auto: least (fraction of saved bytes a site frees) / (fraction of trained weights it approximates)"})
    include: tuple[str, ...] = field(default=(), metadata={"help": "glob patterns on module paths to consider"})
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "glob patterns on module paths to skip"})
    coeff_dtype: torch.dtype | None = field(default=None, metadata={"help": "dtype of saved coefficients (default: the activation's)"})
    codecs: tuple[str, ...] | None = field(default=None, metadata={
        "help": f"what the planner may use: any of {CODECS} (default: in mode='auto' and 'max_memory' VeLoRA with "
                "the near-exact fewbit and gated codecs and the exact chunked_loss head; in 'all' VeLoRA alone; "
                "with memory_budget, VeLoRA and the exact chunked_loss head; with memory_budget and offload, the "
                "exact chunked_loss head alone)"})
    bits: int = field(default=3, metadata={"help": "fewbit: bits per element of a nonlinearity's saved input (1-8)"})
    pack_codes: bool = field(default=True, metadata={
        "help": "fewbit: pack eight codes into `bits` bytes (False: one code per byte, 8/bits times larger, "
                "element-wise like the nonlinearity, so inductor can encode in its kernel)"})
    rmm_ratio: float = field(default=0.25, metadata={"help": "rmm: sketch rows / tokens, in (0, 1]"})
    memory_budget: float | int | None = field(default=None, metadata={
        "help": "target activation peak of a step: a fraction (0, 1] of the graph's predicted peak as dynamo gave it, "
                "or a number of bytes (int) for the whole model"})
    error_cost: float = field(default=1.0, metadata={
        "help": "memory_budget: step-time fraction one unit of weighted gradient error is worth when the planner "
                "weighs codecs against exact recompute (0: fastest plan, any error; large: exact whenever it fits)"})
    loss_chunk_size: int = field(default=2048, metadata={
        "help": "chunked_loss: rows of logits alive at once (H200, vocabulary 32000: 2048 rows cost 1.07x the "
                "unchunked head's time, 1024 rows 1.19x; benchmarks/bench_head.py)"})
    keep_logits: bool = field(default=False, metadata={
        "help": "chunked_loss on transformers causal LMs: keep returning the logits (and the KV cache) when the "
                "loss will be backpropagated (the head then cannot apply on the plain model call; see docs/codecs.md)"})
    plan_cache: bool = field(default=True, metadata={
        "help": "reuse the planner's decisions for the same graph and options from an earlier process (a JSON "
                "per graph under the inductor cache dir's velora_fx/; also off with VELORA_FX_PLAN_CACHE=0 or "
                "torch's force_disable_caches)"})
    offload: bool = field(default=False, metadata={
        "help": "memory_budget: also move saved tensors to pinned host memory in forward and back in backward, "
                "where the copies overlap compute on the step's estimated timeline (exact; CUDA only, skipped with "
                "a reason elsewhere and under CUDA graphs, mode='reduce-overhead')"})
    offload_bandwidth: float | None = field(default=None, metadata={
        "help": "offload: the host link's copy bandwidth in GB/s (default: measured once per device and cached)"})
    offload_max_bytes: int | None = field(default=None, metadata={
        "help": "offload: most host bytes one graph may offload (default: half of the machine's physical memory)"})
    version: int = 4

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.num_groups is not None and self.sub_token_size is not None:
            raise ConfigError("give num_groups or sub_token_size, not both")
        for name in ("num_groups", "sub_token_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.init, str) or not _INIT_RE.match(self.init):
            raise ConfigError(f"init must be 'first_batch', 'batch', 'ema:<decay in [0, 1]>' or 'random', got {self.init!r}")
        if self.estimate not in _ESTIMATES:
            raise ConfigError(f"estimate must be one of {_ESTIMATES}, got {self.estimate!r}")
        if self.mode not in _MODES:
            raise ConfigError(f"mode must be one of {_MODES}, got {self.mode!r}")
        for name in ("scale", "max_error", "min_efficiency", "error_cost"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
            set_(self, name, float(value))
        if self.scale <= 0:
            raise ConfigError(f"scale must be > 0 (it multiplies the weight gradient), got {self.scale!r}")
        if self.max_error < 0:
            raise ConfigError(f"max_error must be >= 0, got {self.max_error!r}")
        if self.min_efficiency < 0:
            raise ConfigError(f"min_efficiency must be >= 0 (0: no bound), got {self.min_efficiency!r}")
        if self.error_cost < 0:
            raise ConfigError(f"error_cost must be >= 0 (0: ignore gradient error), got {self.error_cost!r}")
        set_(self, "include", _as_patterns(self.include, "include"))
        set_(self, "exclude", _as_patterns(self.exclude, "exclude"))
        set_(self, "coeff_dtype", _as_dtype(self.coeff_dtype))
        set_(self, "memory_budget", _as_budget(self.memory_budget))
        default = "offload" if self.offload and self.memory_budget is not None else \
            "budget" if self.memory_budget is not None else self.mode
        set_(self, "codecs", _as_codecs(self.codecs if self.codecs is not None else DEFAULT_CODECS[default]))
        for name in ("keep_logits", "plan_cache", "offload", "pack_codes"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name, low, high in (("bits", 1, 8), ("loss_chunk_size", 1, None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
                bound = f"an integer in [{low}, {high}]" if high else f"an integer >= {low}"
                raise ConfigError(f"{name} must be {bound}, got {value!r}")
        if self.offload and self.memory_budget is None:
            raise ConfigError("offload=True needs a memory_budget: the planner offloads what the budget asks for "
                              "beyond what it keeps (e.g. velora_fx.backend(memory_budget=0.5, offload=True))")
        bandwidth = self.offload_bandwidth
        if bandwidth is not None and (isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float))
                                      or not math.isfinite(bandwidth) or bandwidth <= 0):
            raise ConfigError(f"offload_bandwidth must be a positive number of GB/s, got {bandwidth!r}")
        if bandwidth is not None:
            set_(self, "offload_bandwidth", float(bandwidth))
        limit = self.offload_max_bytes
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ConfigError(f"offload_max_bytes must be a number of bytes >= 0, got {limit!r}")
        ratio = self.rmm_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ConfigError(f"rmm_ratio must be a number in (0, 1] (sketch rows per token), got {ratio!r}")
        set_(self, "rmm_ratio", float(ratio))

    def uses(self, codec: str) -> bool:
        return codec in self.codecs

    # -- derived -----------------------------------------------------------------------------
    @property
    def ema_decay(self) -> float | None:
        return float(self.init.split(":", 1)[1]) if self.init.startswith("ema:") else None

    @property
    def chooses_size(self) -> bool:
        """Whether the planner picks g per site ("auto" or "max_memory" without a fixed
        num_groups/sub_token_size)."""
        return self.mode in ("auto", "max_memory") and self.num_groups is None and self.sub_token_size is None

    def sub_token_size_for(self, features: int, where: str = "") -> int:
        """The fixed sub-token size g for a feature size D (32 groups when neither option is
        given), or a ConfigError naming the site."""
        at = f" at {where}" if where else ""
        if self.sub_token_size is not None:
            if features % self.sub_token_size:
                raise ConfigError(
                    f"sub_token_size={self.sub_token_size} does not divide the feature size {features}{at}; "
                    "choose a divisor, or exclude the site")
            return self.sub_token_size
        groups = self.num_groups or 32
        if features % groups:
            raise ConfigError(
                f"num_groups={groups} does not divide the feature size {features}{at}; "
                "choose a divisor, or exclude the site")
        return features // groups

    def candidate_sizes(self, features: int) -> list[int]:
        """Sub-token sizes the planner may use for a feature size D, smallest first."""
        if not self.chooses_size:
            try:
                return [self.sub_token_size_for(features)]
            except ConfigError:
                return []
        return [g for g in AUTO_SUB_TOKEN_SIZES if g < features and features % g == 0]

    def selects(self, module_path: str) -> bool:
        """Whether include/exclude let a module path through."""
        if self.include and not any(fnmatch.fnmatchcase(module_path, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(module_path, p) for p in self.exclude)

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        d["codecs"] = list(self.codecs)
        d["coeff_dtype"] = None if self.coeff_dtype is None else str(self.coeff_dtype).replace("torch.", "")
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VeloraConfig":
        data = dict(data)
        data.pop("version", None)  # older versions read the same fields
        return cls.from_options(**data)

    @classmethod
    def from_options(cls, **options: Any) -> "VeloraConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            hint = {n: _closest(n, names) for n in unknown}
            raise TypeError("unknown velora_fx option(s): " + ", ".join(
                f"{n!r}" + (f" (did you mean {hint[n]!r}?)" if hint[n] else "") for n in unknown))
        return cls(**options)

    @classmethod
    def from_recipe_name(cls, name: str, **overrides: Any) -> "VeloraConfig":
        if name not in RECIPES:
            raise ConfigError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
        recipe = dict(RECIPES[name])
        if "sub_token_size" in overrides or "num_groups" in overrides:  # an override replaces the recipe's size
            recipe.pop("num_groups", None)
            recipe.pop("sub_token_size", None)
        return cls.from_options(**{**recipe, **overrides})


def _as_codecs(value: Any) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else None
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"codecs must be a non-empty list of names from {CODECS}, got {value!r}")
    unknown = [n for n in names if n not in CODECS]
    if unknown:
        raise ConfigError(f"unknown codec(s) {unknown}; known: {list(CODECS)}")
    return tuple(dict.fromkeys(names))


def _as_budget(value: Any) -> float | int | None:
    """None, a fraction in (0, 1] (float) or a number of bytes (int >= 1)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConfigError(f"memory_budget must be a fraction in (0, 1] or a number of bytes, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"memory_budget in bytes must be >= 1, got {value}")
        return value
    if not 0 < value <= 1:
        raise ConfigError(f"memory_budget as a fraction of the step's activation peak must be in (0, 1], got {value} "
                          "(give bytes as an int)")
    return float(value)


def _closest(name: str, candidates: Iterable[str]) -> str | None:
    import difflib
    match = difflib.get_close_matches(name, list(candidates), n=1)
    return match[0] if match else None


RECIPES: dict[str, dict[str, Any]] = {
    # the paper's LLaMA configuration: v_proj and down_proj inputs, D/32 sub-tokens, fixed first-batch v
    "paper": dict(num_groups=32, init="first_batch", mode="all", include=("*v_proj", "*down_proj")),
    # partition-aware and quality-bounded: sites that free saved bytes, g chosen per site
    "auto": dict(init="first_batch", mode="auto"),
    # every site that frees saved bytes, g per site within max_error, with every codec (docs/quality.md)
    "max_memory": dict(init="first_batch", mode="max_memory"),
}
