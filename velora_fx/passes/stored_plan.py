"""Plan and rewrite the stored (``gated`` codec) sites of a joint graph.

The decisions are element-wise codec decisions like few-bit's (``codec_plan``): the same fields,
the same partition-aware verification (a site whose tensor is still saved, or whose codes the
partitioner computes in backward, is reverted), the same report row with ``codec="gated"``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .._compat import CheckpointPolicy
from ..codecs.gated import Int8StorageCodec
from ..config import VeloraConfig
from .codec_plan import CodecDecision, decided_before_planning, estimated_error
from .graph_utils import create_node, tensor_val
from .partition_probe import SavedSet
from .stored_sites import StoredSite

__all__ = ["StoredDecision", "plan_stored", "release_taken", "rewrite_stored", "STORED_PREFIX"]

aten, prims = torch.ops.aten, torch.ops.prims

STORED_PREFIX = "gated:"
TAKEN = "few-bit codes already replace it"


@dataclass
class StoredDecision(CodecDecision):
    codec_name: str = "gated"
    sticky_prefix: str = STORED_PREFIX

    def codec(self) -> Int8StorageCodec:
        return Int8StorageCodec()

    def rewrite(self, gm: fx.GraphModule, nodes: dict[str, fx.Node]) -> list[str]:
        return rewrite_stored(gm, self, nodes)

    def approximates(self) -> str:
        return "input gradients of its elementwise consumers"


def plan_stored(sites: list[StoredSite], baseline: SavedSet, config: VeloraConfig, values: dict,
                sticky: dict[str, int], taken: set[str] = frozenset()) -> list[StoredDecision]:
    """``taken``: node names another codec (few-bit) already encodes."""
    decisions = []
    for site in sites:
        d = StoredDecision(site)
        decisions.append(d)
        if decided_before_planning(d, config, sticky, STORED_PREFIX + site.name,
                                   lambda _: _compress(d, values, "kept from this model's first plan")):
            continue
        if set(site.forms) & taken:
            d.skip(TAKEN)
        elif not baseline.which(site.kept):
            d.skip("not saved by the baseline partition")
        else:
            _compress(d, values, "frees its saved matmul output (int8 codes + per-group scales)")
            if config.mode == "auto" and d.estimated_error > config.max_error:
                error = d.estimated_error
                d.skip(f"estimated error {error:.3f} is above max_error={config.max_error:g}")
                d.estimated_error = error
    return decisions


def release_taken(decisions: list, baseline: SavedSet, config: VeloraConfig, values: dict) -> bool:
    """Re-plan stored sites skipped for a few-bit site that verification has since reverted (a
    SiLU inside a gated MLP: its output is needed for the up gradient, so codes of its input
    free nothing, while int8 storage of the gate does).  True if any was re-planned."""
    taken = {f for d in decisions if d.compress and d.codec_name == "fewbit" for f in d.site.forms}
    released = False
    for i, d in enumerate(decisions):
        if d.codec_name == "gated" and not d.compress and d.reason == TAKEN and not set(d.site.forms) & taken:
            decisions[i] = plan_stored([d.site], baseline, config, values, {}, taken)[0]
            released = released or decisions[i].compress
    return released


def _compress(d: StoredDecision, values: dict, reason: str) -> None:
    d.compress, d.bits, d.reason = True, 8, reason
    d.estimated_error = estimated_error(d.codec(), values.get(d.site.encode_at), 2.0 ** -8)


def _tie_to_forward_output(graph: fx.Graph, codes: fx.Node, index: int) -> None:
    """``out[index] += 0 * codes[0]``: exact (the codes are finite), and it makes the encode
    forward work.  Min-cut places nodes that no forward output depends on in backward whatever
    their MUST_SAVE tag; without this data path it encoded in backward, from a kept g."""
    output = next(iter(graph.find_nodes(op="output")))
    outs = list(output.args[0])
    target = outs[index]
    with graph.inserting_before(output):
        first = create_node(graph, aten.select.int, (create_node(graph, aten.view.default, (codes, [-1])), 0, 0))
        zero = create_node(graph, aten.mul.Tensor, (create_node(
            graph, prims.convert_element_type.default, (first, tensor_val(target).dtype)), 0))
        outs[index] = create_node(graph, aten.add.Tensor, (target, zero), like=target)
    output.args = (outs, *output.args[1:])


def rewrite_stored(gm: fx.GraphModule, d: StoredDecision, nodes: dict[str, fx.Node]) -> list[str]:
    """Encode after the matmul (saved), decode before the first backward reader, and point every
    backward read of the tensor, its views and its derived values at the rebuilt ones (``nodes``:
    the graph's nodes before any rewrite, by name)."""
    graph, site, codec = gm.graph, d.site, d.codec()
    t = nodes[site.encode_at]
    with graph.inserting_before(t.next):
        saved = codec.encode(graph, t)
    for node in saved:
        node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
    _tie_to_forward_output(graph, saved[0], site.anchor)
    readers = {nodes[r] for names in site.readers.values() for r in names}
    first = min(readers, key=list(graph.nodes).index)
    known = set(graph.nodes)
    rebuilt: dict[fx.Node, fx.Node] = {}
    with graph.inserting_before(first):
        rebuilt[t] = codec.decode(graph, saved, t)
        order = {n: i for i, n in enumerate(graph.nodes)}
        for original in sorted((nodes[n] for n in [*site.forms[1:], *site.derived]), key=order.__getitem__):
            args, kwargs = fx.node.map_arg((original.args, original.kwargs), lambda n: rebuilt.get(n, n))
            rebuilt[original] = create_node(graph, original.target, args, kwargs, like=original)
    for node in graph.nodes:
        if node not in known:
            for key in ("seq_nr", "fwd_nn_module_stack"):
                if key in first.meta:
                    node.meta[key] = first.meta[key]
            node.meta["partitioner_tag"] = "must_be_in_backward"
    for name, reader_names in site.readers.items():
        for r in reader_names:
            nodes[r].replace_input_with(nodes[name], rebuilt[nodes[name]])
    return [n.name for n in saved]
