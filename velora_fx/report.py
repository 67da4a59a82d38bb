"""What the pass did, per site, as the real partitioner decided: printable and ``to_dict()``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SiteReport", "GraphReport", "Report"]

_WIDTH = 120


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _clip(text: str, width: int) -> str:
    """Shorten to ``width`` characters, keeping both ends (module paths differ at the end)."""
    if len(text) <= width:
        return text
    keep = width - 1
    return text[: keep // 3] + "…" + text[-(keep - keep // 3):]


def _clip_end(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


@dataclass
class SiteReport:
    """One activation and its weight-gradient consumers."""

    name: str                        # module path(s) of its consumers (a group: common prefix + {leaves})
    consumers: list[str]             # module paths whose weight gradients read it
    op: str                          # forward op(s): addmm / mm / bmm
    shape: tuple[int, ...]
    dtype: str
    saved_by_baseline: bool          # some form of it is in the baseline's saved set
    saved_forms: list[str]           # which forms (joint-graph node names) the baseline saves
    bytes_before: int                # bytes of its saved forms in the baseline partition
    bytes_after: int                 # bytes of its saved forms + coefficients after the rewrite
    decision: str                    # "compressed" or "skipped"
    reason: str
    sub_token_size: int | None = None
    approximated: list[str] = field(default_factory=list)  # consumers whose weight grads are approximated
    estimated_error: float = 0.0     # relative energy of the activation VeLoRA drops (0: exact)
    state: str | None = None         # state_dict key of the v it uses
    codec: str = "velora"            # velora | fewbit | rmm | chunked_loss
    bits: int | None = None          # fewbit: bits per element
    predicted_bytes_after: int | None = None  # what the planner expected the codec to store (None:
                                              # skipped, or a codec without a prediction)

    @property
    def setting(self) -> str:
        """The codec and its size, as the table shows it (``velora g=2``, ``fewbit 3b``)."""
        if self.decision != "compressed":
            return "-"
        if self.codec == "fewbit":
            return f"fewbit {self.bits}b"
        if self.codec == "velora":
            return f"velora g={self.sub_token_size}"
        if self.codec == "rmm":
            return "rmm"
        if self.codec == "chunked_loss":
            return "chunked loss"
        return self.codec

    @property
    def bytes_freed(self) -> int:
        return self.bytes_before - self.bytes_after

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["bytes_freed"] = self.bytes_freed
        return d


@dataclass
class GraphReport:
    """One compiled graph: its sites and the saved-set totals of both partitions."""

    graph_id: int
    status: str                      # "rewritten", "unchanged", "fallback"
    message: str = ""
    sites: list[SiteReport] = field(default_factory=list)
    saved_bytes_before: int = 0      # activation bytes the baseline partition saves (no params)
    saved_bytes_after: int = 0       # same, after the rewrite
    model: str = ""                  # which compiled model (or "functions") it belongs to
    frame: str = ""                  # dynamo's frame id: a recompile of the same code replaces a graph
    budget_target: int | None = None     # memory_budget: saved bytes asked for
    recompute_budget: float | None = None  # memory_budget: inductor's activation_memory_budget used
    budget_plans: list[dict[str, Any]] = field(default_factory=list)  # memory_budget: the plans weighed

    def to_dict(self) -> dict[str, Any]:
        return {"graph_id": self.graph_id, "model": self.model, "frame": self.frame, "status": self.status,
                "message": self.message, "saved_bytes_before": self.saved_bytes_before,
                "saved_bytes_after": self.saved_bytes_after, "budget_target": self.budget_target,
                "recompute_budget": self.recompute_budget, "budget_plans": list(self.budget_plans),
                "sites": [s.to_dict() for s in self.sites]}


@dataclass
class Report:
    """Graphs a backend compiled (or one ``transform``).  Totals count the latest graph of each
    compiled frame and set of modules: a recompile for new shapes replaces its predecessor rather
    than adding to it, while the graphs of different layers compiled from one frame all count."""

    graphs: list[GraphReport] = field(default_factory=list)

    @property
    def current(self) -> list[GraphReport]:
        latest: dict[tuple, GraphReport] = {}
        for g in self.graphs:
            # the modules a graph's sites belong to tell one layer's graph from another's when
            # dynamo compiles several layers as recompiles of one frame (FSDP2 units)
            modules = tuple(sorted({c for s in g.sites for c in s.consumers}))
            key = (g.model, g.frame, modules) if g.frame else (g.model, f"#{g.graph_id}")
            latest[key] = g
        return sorted(latest.values(), key=lambda g: g.graph_id)

    @property
    def sites(self) -> list[SiteReport]:
        return [s for g in self.graphs for s in g.sites]

    @property
    def compressed(self) -> list[SiteReport]:
        return [s for s in self.sites if s.decision == "compressed"]

    @property
    def saved_bytes_before(self) -> int:
        return sum(g.saved_bytes_before for g in self.current)

    @property
    def saved_bytes_after(self) -> int:
        return sum(g.saved_bytes_after for g in self.current)

    def to_dict(self) -> dict[str, Any]:
        return {"saved_bytes_before": self.saved_bytes_before, "saved_bytes_after": self.saved_bytes_after,
                "totals_count": "the latest graph of each compiled frame",
                "graphs": [g.to_dict() for g in self.graphs]}

    def table(self) -> str:
        """At most 120 columns; every detail (shapes, forms, consumers) is in ``to_dict()``."""
        header = ("graph", "site", "codec", "est.err", "before", "after", "pred.", "decision", "reason")
        rows = []
        for graph in self.graphs:
            for s in graph.sites:
                partial = s.decision == "compressed" and len(s.approximated) < len(s.consumers)
                reason = f"{s.reason} (approximated: {', '.join(s.approximated)})" if partial else s.reason
                rows.append([str(graph.graph_id), s.name, s.setting,
                             f"{s.estimated_error:.2f}" if s.decision == "compressed" or s.estimated_error else "-",
                             _size(s.bytes_before), _size(s.bytes_after),
                             _size(s.predicted_bytes_after) if s.predicted_bytes_after is not None else "-",
                             s.decision, reason])
        widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(len(header))]
        widths[1] = min(widths[1], 36)
        fixed = sum(widths[:-1]) + 2 * (len(header) - 1)
        widths[-1] = max(10, min(widths[-1], _WIDTH - fixed))
        lines = ["  ".join((_clip(c, w) if i < len(r) - 1 else _clip_end(c, w)).ljust(w) for i, (c, w)
                           in enumerate(zip(r, widths))).rstrip() for r in [list(header)] + rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for g in self.graphs:
            if g.status not in ("rewritten", "unchanged") or g.message:
                lines.append(_clip(f"graph {g.graph_id}: {g.status}{': ' + g.message if g.message else ''}", _WIDTH))
            for p in g.budget_plans:  # memory_budget: every plan weighed, the chosen one marked
                fit = (f"saved {_size(p['saved_bytes'])} at recompute budget {p['recompute_budget']:.3g}"
                       if p["fitted"] else "not fitted (cost before recompute above the winner's)")
                lines.append(_clip(f"  {'*' if p['chosen'] else ' '} plan {p['plan']}: {fit}; est. time "
                                   f"{p['estimated_time_ratio']:.3f}x + error_cost x error {p['error']:.3f} = {p['score']:.3f}",
                                   _WIDTH))
        current = self.current
        n_sites = sum(len(g.sites) for g in current)
        n_compressed = sum(1 for g in current for s in g.sites if s.decision == "compressed")
        scope = f"{len(current)} graph{'s' if len(current) != 1 else ''}"
        if len(current) != len(self.graphs):
            scope += f", latest of each frame of {len(self.graphs)} compiled"
        lines.append(f"activations saved for backward ({scope}): {_size(self.saved_bytes_before)} -> "
                     f"{_size(self.saved_bytes_after)}; {n_compressed} of {n_sites} sites compressed")
        return "\n".join(lines)

    __str__ = table

    def __repr__(self) -> str:
        return self.table()
