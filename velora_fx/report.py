"""What the pass did, per site, as the real partitioner decided: printable and ``to_dict()``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SiteReport", "GraphReport", "Report", "exception_line"]

_WIDTH = 120


_UNFITTED = {"skipped": "not fitted (cost before recompute at or above the winner's)",
             "given up": "given up (a budget that missed the target already cost more than the winner)"}


def exception_line(exc: BaseException) -> str:
    """An exception as a report or warning says it: its type and the first line of its message."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


_BREAKS = ".,/;:="  # a word too long for its line is broken after one of these


def _word_parts(word: str, width: int) -> list[str]:
    """``word`` in pieces of at most ``width`` characters, broken after punctuation (never inside a
    number such as ``0.469``); a piece with no such place is cut, the last resort."""
    parts, start = [], 0
    for i, ch in enumerate(word[:-1]):
        if ch in _BREAKS and not (i > 0 and word[i - 1].isdigit() and word[i + 1].isdigit()):
            parts.append(word[start:i + 1])
            start = i + 1
    parts.append(word[start:])
    return [p[j:j + width] for p in parts for j in range(0, len(p), width)]


def _wrap(text: str, width: int, first: int | None = None) -> list[str]:
    """Every character of ``text`` (whitespace collapsed) in lines of at most ``width`` (the first
    line: ``first``), broken at spaces where a word fits on a line and after punctuation where it
    does not."""
    width = max(width, 1)
    first = width if first is None else max(first, 1)
    pieces = [(" " if i == 0 else "", part) for word in text.split()
              for i, part in enumerate([word] if len(word) <= width else _word_parts(word, width))]
    lines, line = [], ""
    for glue, part in pieces:
        if line and len(line) + len(glue) + len(part) <= (width if lines else first):
            line += glue + part
        elif not line and not lines and len(part) > first:  # starts on the next line
            lines.append("")
            line = part
        else:
            if line:
                lines.append(line)
            line = part
    return lines + [line] if line else lines or [""]


def _block(prefix: str, text: str, hang: int) -> list[str]:
    """``prefix`` + ``text`` wrapped to the table width, continuation lines indented ``hang``."""
    lines = _wrap(text, _WIDTH - hang, _WIDTH - len(prefix))
    return [(prefix + lines[0]).rstrip()] + [" " * hang + line for line in lines[1:]]


def _fit_columns(names: list[str], reasons: list[str], room: int, reason_at: int) -> tuple[int, int]:
    """Widths of the site and reason columns sharing ``room`` characters: the split that needs the
    fewest extra lines (a name wider than its column takes a line of its own, a reason wider than
    its column its lines from column ``reason_at`` below the row), wider site columns first among equals."""
    low_site, low_reason = len("site"), len("reason")
    candidates = sorted({low_site} | {len(n) for n in names if len(n) <= room - low_reason}, reverse=True)

    def extra(site: int) -> int:
        return (sum(len(n) > site for n in names)
                + sum(len(_wrap(r, _WIDTH - reason_at)) for r in reasons if len(r) > room - site))

    site = min(candidates, key=lambda w: (extra(w), -w))
    return site, max([low_reason] + [len(r) for r in reasons if len(r) <= room - site])


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
    estimated_error: float = 0.0     # the planner's bound (velora: see error_source; fewbit/gated: the codec's)
    state: str | None = None         # state_dict key of the v it uses
    codec: str = "velora"            # velora | fewbit | rmm | chunked_loss
    bits: int | None = None          # fewbit: bits per element
    pack_codes: bool | None = None   # fewbit: eight codes to ``bits`` bytes (False: one code per byte)
    predicted_bytes_after: int | None = None  # what the planner expected the codec to store (None:
                                              # skipped, or a codec without a prediction)
    error_source: str | None = None  # velora: gradient | activation | structural, the larger (passes/estimate.py)
    gradient_error: float | None = None  # velora: its weight gradients' measured relative squared error
    update_share: float | None = None  # velora: share of a sign step's first-order loss decrease it loses

    @property
    def setting(self) -> str:
        """The codec and its size, as the table shows it (``velora g=2``, ``fewbit 3b``)."""
        if self.decision != "compressed":
            return "-"
        if self.codec == "fewbit":
            return f"fewbit {self.bits}b" + ("/byte" if self.pack_codes is False else "")
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
    # memory_budget: each codec candidate the chooser priced (tensor, codec, bytes freed, price, chosen, why)
    budget_candidates: list[dict[str, Any]] = field(default_factory=list)
    # the step's activation peak predicted from the partitions (passes/step_peak.py):
    # {"before": {forward, backward, saved, peak} | None, "after": {...}}
    predicted_peak: dict[str, Any] | None = None
    # where the plan came from: "planned" (this process planned it), "cache" (an earlier process's
    # decisions from the plan cache, checked on this process's partition), "" (no pipeline ran)
    plan_source: str = ""
    # offload=True: the plan (bandwidth, timeline, each offloaded tensor with its module and planned
    # copy times, why others were not); saved_bytes_after then counts only what stays on the GPU
    offload: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"graph_id": self.graph_id, "model": self.model, "frame": self.frame, "status": self.status,
                "message": self.message, "saved_bytes_before": self.saved_bytes_before,
                "saved_bytes_after": self.saved_bytes_after, "budget_target": self.budget_target,
                "recompute_budget": self.recompute_budget, "budget_plans": list(self.budget_plans),
                "budget_candidates": list(self.budget_candidates),
                "predicted_peak": self.predicted_peak, "plan_source": self.plan_source, "offload": self.offload,
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

    def predicted_peak(self, when: str = "after") -> int | None:
        """The step's activation peak predicted from the partitions (``when``: "before" / "after"
        the rewrite): every counted graph's saved set, plus the largest transient one graph adds on
        top of its own (its predicted peak less its saved bytes).  None when a graph has none."""
        peaks = [(g.predicted_peak or {}).get(when) for g in self.current]
        if not peaks or any(p is None for p in peaks):
            return None
        return sum(p["saved"] for p in peaks) + max(p["peak"] - p["saved"] for p in peaks)

    def to_dict(self) -> dict[str, Any]:
        return {"saved_bytes_before": self.saved_bytes_before, "saved_bytes_after": self.saved_bytes_after,
                "predicted_peak_before": self.predicted_peak("before"),
                "predicted_peak_after": self.predicted_peak("after"),
                "totals_count": "the latest graph of each compiled frame",
                "graphs": [g.to_dict() for g in self.graphs]}

    def table(self) -> str:
        """At most 120 columns, nothing cut: a site name too long for its column gets a line of its
        own above the row's numbers, a reason too long for its column follows the row on lines of
        its own, and graph messages wrap.  Every detail (shapes, forms, consumers) is in
        ``to_dict()``."""
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
                             s.decision, " ".join(reason.split())])
        widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(len(header))]
        site_at = widths[0] + 2
        widths[1], widths[-1] = _fit_columns([r[1] for r in rows], [r[-1] for r in rows],
                                             _WIDTH - sum(widths[:-1]) + widths[1] - 2 * (len(header) - 1),
                                             site_at + len("reason: "))

        def line(cells):
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        lines = [line(header), "  ".join("-" * w for w in widths)]
        for r in rows:
            name, reason = r[1], r[-1]
            if len(name) > widths[1]:  # the full name on a line of its own, the numbers below it
                lines += _block(r[0].ljust(site_at), name, site_at + 2)
                r = ["", ""] + r[2:]
            if len(reason) <= widths[-1]:
                lines.append(line(r))
            else:  # the full reason on lines of its own below the row
                lines.append(line(r[:-1] + [""]))
                lines += _block(" " * site_at + "reason: ", reason, site_at + len("reason: "))
        for g in self.graphs:
            if g.status not in ("rewritten", "unchanged") or g.message:
                lines += _block(f"graph {g.graph_id}: ", f"{g.status}{': ' + g.message if g.message else ''}", 4)
            if g.plan_source == "cache":
                lines += _block(f"graph {g.graph_id}: ", "plan read from the plan cache (an earlier process's "
                                "decisions and estimates, checked on this partition; v from this process's first "
                                "batch)", 4)
            for p in g.budget_plans:  # memory_budget: every plan weighed, the chosen one marked
                fit = (f"saved {_size(p['saved_bytes'])} at recompute budget {p['recompute_budget']:.3g}"
                       if p["fitted"] else _UNFITTED.get(p.get("status", ""), _UNFITTED["skipped"]))
                lines += _block(f"  {'*' if p['chosen'] else ' '} ", f"plan {p['plan']}: {fit}; est. time "
                                f"{p['estimated_time_ratio']:.3f}x + error_cost x error {p['error']:.3f} = "
                                f"{p['score']:.3f}", 6)
            if g.budget_candidates:  # memory_budget: the chooser's candidates, in one line
                rows = g.budget_candidates
                price = rows[0]["recompute_price"]
                lines += _block("    ", f"{len(rows)} codec candidate{'s' if len(rows) != 1 else ''}, "
                                f"{sum(c['selected'] for c in rows)} priced below recompute "
                                f"({'cannot meet the target alone' if price is None else f'{price:.3g} per byte'})"
                                f" and needed, {sum(c['chosen'] for c in rows)} in the chosen plan", 6)
        current = self.current
        n_sites = sum(len(g.sites) for g in current)
        n_compressed = sum(1 for g in current for s in g.sites if s.decision == "compressed")
        scope = f"{len(current)} graph{'s' if len(current) != 1 else ''}"
        if len(current) != len(self.graphs):
            scope += f", latest of each frame of {len(self.graphs)} compiled"
        lines.append(f"activations saved for backward ({scope}): {_size(self.saved_bytes_before)} -> "
                     f"{_size(self.saved_bytes_after)}; {n_compressed} of {n_sites} sites compressed")
        before, after = self.predicted_peak("before"), self.predicted_peak("after")
        if after is not None:
            lines.append("predicted activation peak of a step (saved + transients): "
                         + (f"{_size(before)} -> " if before is not None else "") + _size(after))
        return "\n".join(lines)

    __str__ = table

    def __repr__(self) -> str:
        return self.table()
