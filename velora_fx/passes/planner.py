"""Planner: per activation group, compress or not, and why.

"auto" compresses a group only when that can remove bytes from what the baseline partition
saves; "all" compresses every selected site (paper-faithful).  The pipeline verifies "auto"'s
choices on the real partition afterwards and reverts any that freed nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import VeloraConfig
from .partition_probe import SavedSet
from .sites import ActivationGroup, Site

__all__ = ["Decision", "plan_groups"]


@dataclass
class Decision:
    group: ActivationGroup
    sites: list[Site] = field(default_factory=list)  # sites to rewrite (empty: skipped)
    reason: str = ""

    @property
    def compress(self) -> bool:
        return bool(self.sites)


def plan_groups(groups: list[ActivationGroup], baseline: SavedSet, config: VeloraConfig) -> list[Decision]:
    return [_decide(g, baseline, config) for g in groups]


def _decide(group: ActivationGroup, baseline: SavedSet, config: VeloraConfig) -> Decision:
    selected = [s for s in group.sites if config.selects(s.module_path)]
    skip = Decision(group)
    if not selected:
        skip.reason = "excluded by include/exclude"
        return skip
    if group.unsupported:
        skip.reason = group.unsupported
        return skip
    if config.mode == "all":
        return Decision(group, selected, "compressed (mode='all')")
    unselected = sorted({s.module_path for s in group.sites} - {s.module_path for s in selected})
    if unselected:
        skip.reason = f"also read by unselected {', '.join(unselected)}: compressing the rest frees nothing"
    elif group.is_graph_input:
        skip.reason = "graph input (the caller holds it)"
    elif not baseline.which(group.forms):
        skip.reason = "not saved by baseline (recomputed from kept tensors)"
    elif group.other_backward_users:
        skip.reason = f"backward of {', '.join(group.other_backward_users)} keeps it anyway"
    else:
        return Decision(group, selected, "compressed: frees its saved forms")
    return skip
