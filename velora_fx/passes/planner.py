"""Planner: per activation group, compress or not, at which sub-token size, and why.

- ``all``: every selected site, at the configured g (paper-faithful).
- ``max_memory``: every group whose compression can remove bytes from what the baseline
  partition saves; at the configured g, or without one at the largest g whose estimated
  weight-gradient error stays within ``max_error`` (g = 32 everywhere cost 8-23 % of validation
  loss, g = 2 everywhere 0.6-2.4 %: docs/quality.md).
- ``auto`` (default): only where the estimated weight-gradient error stays within ``max_error``;
  without a fixed g it picks, per group, the largest g that does.  And only where the
  approximation buys enough memory: the fraction of the saved bytes it frees, over the fraction of
  the trained weights whose gradients it approximates, is at least ``min_efficiency`` (a site read
  by q/k/v approximates three weights to free one norm output).

A model's plan is sticky: a group planned by an earlier graph of the same model (a recompile for
new shapes, another graph of a graph break) keeps its decision and g, so the set of approximated
gradients never changes mid-training.  The pipeline verifies choices on the real partition
afterwards and reverts those that freed nothing (first plans only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..codecs.base import get_codec
from ..config import AUTO_SUB_TOKEN_SIZES, ConfigError, VeloraConfig
from .estimate import structural_error
from .partition_probe import SavedSet
from .sites import ActivationGroup, Site

__all__ = ["Decision", "plan_groups", "structural_error"]

ErrorFn = Callable[[ActivationGroup, int], float]


@dataclass
class Decision:
    group: ActivationGroup
    sites: list[Site] = field(default_factory=list)  # sites to rewrite (empty: skipped)
    reason: str = ""
    sub_token_size: int | None = None
    estimated_error: float = 0.0
    sticky: bool = False                              # decided by an earlier graph of the model
    codec: str = "velora"                             # velora | rmm
    error_source: str | None = None                   # velora: gradient | activation | structural (the larger)
    gradient_error: float | None = None               # velora: the weight gradients' own error (measured)
    update_share: float | None = None                 # velora: sign-step loss decrease lost (measured)

    @property
    def compress(self) -> bool:
        return bool(self.sites)

    @property
    def codec_name(self) -> str:  # as element-wise codec decisions name theirs
        return self.codec

    def skip(self, reason: str) -> "Decision":
        self.sites, self.reason, self.sub_token_size, self.estimated_error = [], reason, None, 0.0
        return self

    # what ``candidates.propose`` reads, as element-wise codec decisions have it
    @property
    def encode_at(self) -> str:
        return self.group.encode_at

    @property
    def saved_forms(self) -> list[str]:
        return self.group.forms

    def code_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, config: VeloraConfig) -> int:
        """What forward saves instead of an activation of ``shape``: VeLoRA's coefficients and v,
        or RMM's sketch (``k`` rows of the flattened activation plus its seed row)."""
        codec = get_codec("rmm", ratio=config.rmm_ratio, salt=self.group.name) if self.codec == "rmm" else \
            get_codec("velora", sub_token_size=self.sub_token_size, coeff_dtype=config.coeff_dtype)
        return codec.saved_bytes(shape, dtype)

    def error_reach(self, producers: Callable[[str], list]) -> list:
        """Whose gradients its error reaches: its sites' weights (``producers`` is for codes of a
        nonlinearity's input, the matmuls above it)."""
        return self.sites


RMM_PLAN = -1  # a sticky plan entry meaning "compressed with rmm"


def plan_groups(groups: list[ActivationGroup], baseline: SavedSet, config: VeloraConfig, error: ErrorFn,
                features: Callable[[ActivationGroup], int], sticky: dict[str, int],
                fixed: Callable[[ActivationGroup], int | None],
                rmm_error: Callable[[ActivationGroup], float | None] = lambda g: None,
                weight_share: Callable[[list[Site]], float] = lambda sites: 0.0) -> list[Decision]:
    """``error(group, g)`` estimates a group's error at g; ``features(group)`` is its D;
    ``sticky`` maps group names an earlier graph planned to their g (0: skipped, -1: rmm);
    ``fixed(group)`` is a g the group's state already holds (loaded or planned), if any;
    ``rmm_error(group)`` is RMM's estimated error there (None: it cannot);
    ``weight_share(sites)`` is the fraction of the graph's trained weight elements those sites'
    weights hold (0: unknown, no efficiency bound)."""
    decisions = [_decide(g, baseline, config, error, features(g), sticky, fixed(g), rmm_error, weight_share)
                 for g in groups]
    bad = [d for d in decisions if d.reason.startswith("!")]
    if bad:
        raise ConfigError("velora_fx: mode='all' cannot compress these sites:\n  " + "\n  ".join(
            f"{d.group.name}: {d.reason[1:]}" for d in bad))
    return decisions


def _decide(group: ActivationGroup, baseline: SavedSet, config: VeloraConfig, error: ErrorFn, features: int,
            sticky: dict[str, int], fixed: int | None, rmm_error, weight_share) -> Decision:
    d = Decision(group)
    selected = [s for s in group.sites if config.selects(s.module_path)]
    if not selected:
        return d.skip("excluded by include/exclude")
    if group.unsupported:
        return d.skip(group.unsupported)
    if group.name in sticky:
        g = sticky[group.name]
        d.sticky = True
        if not g:
            return d.skip("skipped by this model's first plan")
        if g == RMM_PLAN:
            return _rmm(d, selected, rmm_error(group), "kept from this model's first plan")
        return _compress(d, selected, group, g, error, "kept from this model's first plan")
    if not config.uses("velora"):
        return _decide_rmm(d, selected, group, baseline, config, rmm_error(group))
    sizes = _sizes(config, features, fixed)
    if config.mode == "all":
        if not sizes:
            return d.skip("!" + _no_size_reason(config, features, fixed))
        return _compress(d, selected, group, sizes[-1], error, "compressed (mode='all')")
    unpaid = _frees_nothing(group, selected, baseline)
    if unpaid:
        return d.skip(unpaid)
    if not sizes:
        return d.skip(_no_size_reason(config, features, fixed))
    if config.mode == "max_memory" and not config.chooses_size:
        return _compress(d, selected, group, sizes[-1], error, "frees saved bytes")
    within = [g for g in sizes if error(group, g) <= config.max_error]
    if not within:
        g = sizes[0]
        d.estimated_error = error(group, g)
        return d.skip(f"estimated error {d.estimated_error:.2f} at g={g} is above max_error={config.max_error:g}")
    g = within[-1]
    low = _inefficient(baseline, group, selected, g, config.min_efficiency, weight_share) \
        if config.mode == "auto" else ""
    if low:
        d.estimated_error = error(group, g)
        return d.skip(low)
    return _compress(d, selected, group, g, error, "frees saved bytes within max_error")


def _inefficient(baseline: SavedSet, group: ActivationGroup, selected: list[Site], g: int, bound: float,
                 weight_share: Callable[[list[Site]], float]) -> str:
    """Why compressing at g buys too little memory for the gradients it approximates ("" if not).

    Freed bytes are predicted from the baseline: the group's saved storage shrinks to 1/g."""
    share = weight_share(selected)
    total = baseline.activation_bytes
    if bound <= 0 or share <= 0 or total <= 0:
        return ""
    freed = baseline.bytes_of(group.forms, inputs=False) * (1.0 - 1.0 / g) / total
    if freed >= bound * share:
        return ""
    return (f"frees {freed:.1%} of the saved bytes for approximating {share:.1%} of the trained weights "
            f"(efficiency {freed / share:.2f} < min_efficiency={bound:g})")


def _frees_nothing(group: ActivationGroup, selected: list[Site], baseline: SavedSet) -> str:
    """Why compressing the group cannot free saved bytes ("" if it can)."""
    unselected = sorted({s.module_path for s in group.sites} - {s.module_path for s in selected})
    if unselected:
        chosen = [s.module_path for s in selected]
        one, other = len(chosen) == 1, len(unselected) == 1
        return (f"{', '.join(chosen)} {'shares its' if one else 'share their'} input with unselected "
                f"{', '.join(unselected)}, whose weight gradient{' keeps' if other else 's keep'} that input "
                f"saved: approximating the selected weight gradient{'' if one else 's'} alone would free "
                f"nothing, so {'it stays' if one else 'they stay'} exact")
    if group.is_graph_input:
        return "graph input (the caller holds it)"
    if not baseline.which(group.forms):
        return "not saved by the baseline partition (recomputed from kept tensors)"
    if group.other_backward_users:
        return f"backward of {', '.join(group.other_backward_users)} keeps it anyway"
    return ""


def _decide_rmm(d: Decision, selected: list[Site], group: ActivationGroup, baseline: SavedSet,
                config: VeloraConfig, err: float | None) -> Decision:
    """RMM alone (``codecs`` without "velora"): the same partition rules, its own error."""
    if err is None:
        return d.skip("rmm needs static shapes")
    if config.mode == "all":
        return _rmm(d, selected, err, "compressed (mode='all')")
    unpaid = _frees_nothing(group, selected, baseline)
    if unpaid:
        return d.skip(unpaid)
    if config.mode == "auto" and err > config.max_error:
        d.skip(f"rmm's estimated error {err:.2f} is above max_error={config.max_error:g} (mode='max_memory' "
               "uses it anyway)")
        d.estimated_error = err
        return d
    return _rmm(d, selected, err, "frees saved bytes (rmm sketch)")


def _rmm(d: Decision, sites: list[Site], err: float | None, reason: str) -> Decision:
    d.sites, d.sub_token_size, d.reason, d.codec = sites, None, reason, "rmm"
    d.estimated_error = err or 0.0
    return d


def _compress(d: Decision, sites: list[Site], group: ActivationGroup, g: int, error: ErrorFn, reason: str) -> Decision:
    d.sites, d.sub_token_size, d.reason = sites, g, reason
    d.estimated_error = 0.0 if g == 1 else error(group, g)
    return d


def _sizes(config: VeloraConfig, features: int, fixed: int | None) -> list[int]:
    if fixed is not None:
        return [fixed] if features % fixed == 0 else []
    return config.candidate_sizes(features)


def _no_size_reason(config: VeloraConfig, features: int, fixed: int | None) -> str:
    if fixed is not None:
        return f"its loaded v has size {fixed}, which does not divide the feature size {features}"
    if config.sub_token_size is not None:
        return f"sub_token_size={config.sub_token_size} does not divide the feature size {features}"
    if not config.chooses_size:
        return f"num_groups={config.num_groups or 32} does not divide the feature size {features}"
    return f"no sub-token size in {list(AUTO_SUB_TOKEN_SIZES)} divides the feature size {features}"
