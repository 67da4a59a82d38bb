"""What the pass did, per site, as the real partitioner decided: printable and ``to_dict()``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SiteReport", "GraphReport", "Report"]


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@dataclass
class SiteReport:
    """One activation and its weight-gradient consumers."""

    name: str                        # stable site name (state key): module path(s)
    consumers: list[str]             # module paths whose weight gradients read it
    op: str                          # forward op(s): addmm / mm / bmm
    shape: tuple[int, ...]
    dtype: str
    saved_by_baseline: bool          # some form of it is in the baseline's saved set
    saved_forms: list[str]           # which forms (node names) the baseline saves
    bytes_before: int                # bytes of its saved forms in the baseline partition
    bytes_after: int                 # bytes of its saved forms + coefficients after the rewrite
    decision: str                    # "compressed" or "skipped"
    reason: str
    sub_token_size: int | None = None
    approximated: list[str] = field(default_factory=list)  # consumers whose weight grads are approximated

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
    status: str                      # "rewritten", "unchanged", "fallback", "inference"
    message: str = ""
    sites: list[SiteReport] = field(default_factory=list)
    saved_bytes_before: int = 0      # activation bytes the baseline partition saves (no params)
    saved_bytes_after: int = 0       # same, after the rewrite

    def to_dict(self) -> dict[str, Any]:
        return {"graph_id": self.graph_id, "status": self.status, "message": self.message,
                "saved_bytes_before": self.saved_bytes_before, "saved_bytes_after": self.saved_bytes_after,
                "sites": [s.to_dict() for s in self.sites]}


@dataclass
class Report:
    """All graphs a backend compiled (or one ``transform``)."""

    graphs: list[GraphReport] = field(default_factory=list)

    @property
    def sites(self) -> list[SiteReport]:
        return [s for g in self.graphs for s in g.sites]

    @property
    def compressed(self) -> list[SiteReport]:
        return [s for s in self.sites if s.decision == "compressed"]

    @property
    def saved_bytes_before(self) -> int:
        return sum(g.saved_bytes_before for g in self.graphs)

    @property
    def saved_bytes_after(self) -> int:
        return sum(g.saved_bytes_after for g in self.graphs)

    def to_dict(self) -> dict[str, Any]:
        return {"saved_bytes_before": self.saved_bytes_before, "saved_bytes_after": self.saved_bytes_after,
                "graphs": [g.to_dict() for g in self.graphs]}

    def table(self) -> str:
        header = ("site", "op", "shape", "dtype", "base saves", "saved before", "saved after", "decision", "reason")
        rows = [header]
        for s in self.sites:
            partial = s.decision == "compressed" and len(s.approximated) < len(s.consumers)
            reason = f"{s.reason} (approximated: {', '.join(s.approximated)})" if partial else s.reason
            rows.append((s.name, s.op, "x".join(map(str, s.shape)), s.dtype, "yes" if s.saved_by_baseline else "no",
                         _size(s.bytes_before), _size(s.bytes_after), s.decision, reason))
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for g in self.graphs:
            if g.status not in ("rewritten", "unchanged") or g.message:
                lines.append(f"graph {g.graph_id}: {g.status}{': ' + g.message if g.message else ''}")
        lines.append(f"saved activations: {_size(self.saved_bytes_before)} -> {_size(self.saved_bytes_after)}"
                     f" ({len(self.compressed)} of {len(self.sites)} sites compressed)")
        return "\n".join(lines)

    __str__ = table
