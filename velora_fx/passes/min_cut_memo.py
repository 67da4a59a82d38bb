"""Share the partitioner's budget-independent min-cuts between partitions of one graph.

Under a knapsack budget below 1 (``activation_memory_budget``), inductor's partitioner solves up to
four min-cuts: the default one, a more aggressive and an aggressive one (recompute levels), and the
final one, with the nodes the knapsack allows to recompute.  Only the last depends on the budget.
``memory_budget``'s search partitions one graph under several budgets, so inside
``shared_min_cuts(memo)`` a min-cut of a graph already solved under the same options (and the same
allowed nodes) is answered from the first solution, by node name.  The answer is the same: the
solver reads only the graph, the node classification derived from it, the options and the allowed
nodes.  Where torch's partitioner has no ``solve_min_cut`` of the expected signature, nothing is
shared.

The memo also notes each level's size as the partitioner measures it: a budget above a level's
share of the default level's bytes returns that level whole, so saved bytes against the budget are
flat above these *switch budgets* and jump at them (``MinCutMemo.switches``; the search uses them
to choose where to partition next, never as an answer).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
from typing import Any, Callable, Iterator

import torch.fx as fx
from torch.utils._ordered_set import OrderedSet

__all__ = ["MinCutMemo", "shared_min_cuts", "graph_digest", "node_key"]

_EXPECTED = ["joint_graph", "node_info", "min_cut_options", "dont_ban"]


def node_key(node: fx.Node, target: Callable[[Any], str] = str) -> tuple:
    """What a partitioner reads from one node: its name, op, target (as ``target`` names it),
    arguments (other nodes by name) and save policy."""
    args = fx.node.map_arg((node.args, node.kwargs), lambda n: n.name)
    return (node.name, node.op, target(node.target), args, node.meta.get("recompute"),
            node.meta.get("partitioner_tag"))


def graph_digest(graph: fx.Graph) -> str:
    """``node_key`` of every node (the values' shapes follow from the names within one compile)."""
    digest = hashlib.sha1()
    for node in graph.nodes:
        digest.update(repr(node_key(node)).encode())
    return digest.hexdigest()


class MinCutMemo:
    """Min-cut solutions by (graph, options, allowed nodes), and the recompute levels' sizes seen
    in the partition running now (``begin()`` starts one)."""

    def __init__(self) -> None:
        self.solutions: dict[tuple, tuple[list[str], list[str]]] = {}
        self._inputs = 0
        self._levels: list[int] = []  # bytes of each budget-free min-cut, in the order solved

    def begin(self) -> None:
        self._inputs, self._levels = 0, []

    def note(self, node_info: Any, saved: list[fx.Node]) -> None:
        size = getattr(_partitioners(), "_size_of", None)
        if size is None:
            return
        try:
            self._inputs = sum(map(size, node_info.inputs))
            self._levels.append(sum(map(size, saved)))
        except Exception:  # noqa: BLE001 - sizes only guide the search
            self._levels.clear()

    def switches(self) -> tuple[float, ...]:
        """The knapsack budgets above which the partition running now returns a recompute level
        whole (the partitioner's own ratio: the level's bytes above the inputs' over the default's)."""
        if len(self._levels) < 2:
            return ()
        default = self._levels[0] - self._inputs
        if default <= 0:
            return ()
        return tuple(sorted({(level - self._inputs) / default for level in self._levels[1:]
                             if 0 <= level - self._inputs < default}))


def _partitioners():
    try:
        from torch._functorch import partitioners
    except ImportError:  # pragma: no cover
        return None
    solve = getattr(partitioners, "solve_min_cut", None)
    if solve is None or list(inspect.signature(solve).parameters) != _EXPECTED:
        return None
    return partitioners


@contextlib.contextmanager
def shared_min_cuts(memo: MinCutMemo | None = None) -> Iterator[MinCutMemo]:
    """Within: min-cuts are solved once per (graph, options, allowed nodes); ``memo`` (kept by the
    caller) carries the solutions across contexts.  Yields the memo."""
    memo = MinCutMemo() if memo is None else memo
    partitioners = _partitioners()
    if partitioners is None or getattr(partitioners.solve_min_cut, "_velora_shared", False):
        yield memo
        return
    original = partitioners.solve_min_cut
    digests: dict[int, tuple[fx.Graph, str]] = {}  # one digest per graph the partitioner hands in

    def digest_of(graph: fx.Graph) -> str:
        held = digests.get(id(graph))
        if held is None or held[0] is not graph:
            held = digests[id(graph)] = (graph, graph_digest(graph))
        return held[1]

    def solve_min_cut(joint_graph: fx.Graph, node_info: Any, min_cut_options: Any, dont_ban: Any = None):
        key = (digest_of(joint_graph), repr(min_cut_options), tuple(sorted(n.name for n in dont_ban or ())))
        found = memo.solutions.get(key)
        if found is None:
            saved, banned = original(joint_graph, node_info, min_cut_options, dont_ban)
            memo.solutions[key] = ([n.name for n in saved], [n.name for n in banned])
        else:
            by_name = {n.name: n for n in joint_graph.nodes}
            saved, banned = [by_name[n] for n in found[0]], OrderedSet(by_name[n] for n in found[1])
        if not dont_ban:
            memo.note(node_info, saved)
        return saved, banned

    solve_min_cut._velora_shared = True  # type: ignore[attr-defined]
    partitioners.solve_min_cut = solve_min_cut
    try:
        yield memo
    finally:
        partitioners.solve_min_cut = original
        digests.clear()
