"""Graph analysis of a decoder-only ONNX model: which layer every node belongs to.

The only naming this relies on is the builder's convention that a decoder layer's nodes live
under ``/layers.{i}/`` and that layer ``i`` reads its KV cache from the graph input named by the
model's ``past_key_names`` pattern. Everything else is derived from the graph's structure:

* a node is *replicable* when all of its transitive inputs are initializers, constants or graph
  inputs that every segment receives (the attention mask, position ids). Such subgraphs (the
  attention-mask reformatting that feeds every attention node, reshapes of weights) are copied
  into each segment that needs them instead of being sent between devices;
* every other node gets a *home layer*: its ``/layers.{i}/`` label, or, for unlabeled nodes
  (embedding, final head), the first labeled layer downstream of it, else the last one upstream.
  Labels past the last decoder layer (the builder names the final norm ``layers.{N}``) are homed
  on the last layer.

A segment ``[a, b)`` then holds the non-replicable nodes homed in ``[a, b)`` plus the replicable
nodes they need; the tensors crossing its cuts are found by looking at producers and consumers.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from meshllm.errors import PartitionError
from meshllm.model.ranges import LayerRange

if TYPE_CHECKING:
    # onnx costs about 20 MiB to import; only the peer that cuts segments needs it.
    import onnx
    from onnx import TensorProto

_LAYER_RE = re.compile(r"/layers\.(\d+)/")


@dataclass(frozen=True)
class KVNames:
    """Name patterns of the KV-cache graph inputs and outputs (``%d`` = layer index)."""

    past_key: str = "past_key_values.%d.key"
    past_value: str = "past_key_values.%d.value"
    present_key: str = "present.%d.key"
    present_value: str = "present.%d.value"

    def past(self, layer: int) -> tuple[str, str]:
        return self.past_key % layer, self.past_value % layer

    def present(self, layer: int) -> tuple[str, str]:
        return self.present_key % layer, self.present_value % layer


def tensor_nbytes(t: TensorProto) -> int:
    """Bytes a stored initializer occupies (external length, raw bytes or typed fields)."""
    import onnx

    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        if "length" in info:
            return int(info["length"])
    if t.raw_data:
        return len(t.raw_data)
    count = int(np.prod(t.dims)) if t.dims else 1
    return count * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


class ModelGraph:
    """Producer/consumer index and layer homes of one decoder graph (weights not loaded)."""

    def __init__(self, model: onnx.ModelProto, kv: KVNames, token_input: str = "input_ids"):
        import onnx

        self.model = model
        self.graph = model.graph
        self.kv = kv
        self.token_input = token_input
        g = self.graph
        for node in g.node:
            if any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for a in node.attribute
            ):
                raise PartitionError(f"node {node.name} has a subgraph; not supported")
        self.initializers = {t.name: t for t in g.initializer}
        self.graph_inputs = [i.name for i in g.input if i.name not in self.initializers]
        self.graph_outputs = [o.name for o in g.output]
        self.value_info = {v.name: v for v in (*g.input, *g.output, *g.value_info)}

        past_key_re = re.compile("^" + re.escape(kv.past_key).replace("%d", r"(\d+)") + "$")
        layers = sorted(int(m.group(1)) for n in self.graph_inputs if (m := past_key_re.match(n)))
        if not layers or layers != list(range(len(layers))):
            raise PartitionError("graph has no contiguous per-layer KV-cache inputs")
        self.num_layers = len(layers)
        kv_inputs = {name for i in layers for name in kv.past(i)}
        # Inputs every segment receives; everything derived only from them is replicated.
        self.shared_inputs = [
            n for n in self.graph_inputs if n not in kv_inputs and n != token_input
        ]

        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for idx, node in enumerate(g.node):
            for out in node.output:
                if out:
                    self.producer[out] = idx
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(idx)
        self.replicable = self._find_replicable()
        self.home = self._assign_homes()

    # -- analysis -----------------------------------------------------------------------------
    def _find_replicable(self) -> set[int]:
        free = set(self.initializers) | set(self.shared_inputs)
        replicable: set[int] = set()
        for idx, node in enumerate(self.graph.node):  # graph order is topological
            if all(not i or i in free for i in node.input):
                replicable.add(idx)
                free.update(o for o in node.output if o)
        return replicable

    def _assign_homes(self) -> dict[int, int]:
        nodes = self.graph.node
        last = self.num_layers - 1
        label: dict[int, int] = {}
        for idx, node in enumerate(nodes):
            if idx in self.replicable:
                continue
            m = _LAYER_RE.search(node.name)
            if m:
                label[idx] = min(int(m.group(1)), last)
        # First labeled layer downstream (reverse topological sweep).
        down: dict[int, int] = {}
        for idx in range(len(nodes) - 1, -1, -1):
            if idx in self.replicable:
                continue
            best = label.get(idx)
            if best is None:
                for out in nodes[idx].output:
                    for c in self.consumers.get(out, ()):
                        if c in down:
                            best = down[c] if best is None else min(best, down[c])
            if best is not None:
                down[idx] = best
        # Last labeled layer upstream, for nodes with nothing labeled downstream (the head).
        up: dict[int, int] = {}
        home: dict[int, int] = {}
        for idx, node in enumerate(nodes):
            if idx in self.replicable:
                continue
            best = label.get(idx)
            if best is None:
                for inp in node.input:
                    p = self.producer.get(inp)
                    if p is not None and p in up:
                        best = up[p] if best is None else max(best, up[p])
            if best is not None:
                up[idx] = best
            if idx in label:
                home[idx] = label[idx]
            elif idx in down:
                home[idx] = down[idx]
            else:
                home[idx] = up.get(idx, 0)
        return home

    # -- segments -----------------------------------------------------------------------------
    def segment_nodes(self, r: LayerRange) -> list[int]:
        """Indices (graph order) of the nodes a segment runs, replicated ones included."""
        own = {i for i, h in self.home.items() if r.start <= h < r.stop}
        needed: set[int] = set()
        stack = [inp for i in own for inp in self.graph.node[i].input if inp]
        while stack:
            name = stack.pop()
            p = self.producer.get(name)
            if p is None or p not in self.replicable or p in needed:
                continue
            needed.add(p)
            stack.extend(i for i in self.graph.node[p].input if i)
        return sorted(own | needed)

    def segment_io(self, r: LayerRange, nodes: list[int]) -> tuple[list[str], list[str]]:
        """(inputs, outputs) of a segment: graph inputs it reads and tensors crossing its cuts."""
        produced = {o for i in nodes for o in self.graph.node[i].output if o}
        consumed: list[str] = []
        seen: set[str] = set()
        for i in nodes:
            for name in self.graph.node[i].input:
                if name and name not in seen:
                    seen.add(name)
                    consumed.append(name)
        inputs = [n for n in consumed if n not in produced and n not in self.initializers]
        for name in inputs:
            p = self.producer.get(name)
            if p is not None and self.home.get(p, -1) >= r.stop:
                raise PartitionError(f"segment {r} would need {name} from a later segment")
        graph_outs = set(self.graph_outputs)
        outputs: list[str] = []
        for i in nodes:
            if i in self.replicable:
                continue
            for out in self.graph.node[i].output:
                if not out:
                    continue
                later = any(
                    c not in self.replicable and self.home[c] >= r.stop
                    for c in self.consumers.get(out, ())
                )
                if out in graph_outs or later:
                    outputs.append(out)
        # Graph inputs first in graph order, then crossing tensors in order of use.
        order = {n: k for k, n in enumerate(self.graph_inputs)}
        inputs.sort(key=lambda n: (0, order[n]) if n in order else (1, 0))
        return inputs, outputs

    def segment_initializers(self, nodes: list[int]) -> list[str]:
        names: list[str] = []
        seen: set[str] = set()
        for i in nodes:
            for name in self.graph.node[i].input:
                if name in self.initializers and name not in seen:
                    seen.add(name)
                    names.append(name)
        return names

    def weight_bytes(self, r: LayerRange) -> int:
        nodes = self.segment_nodes(r)
        return sum(tensor_nbytes(self.initializers[n]) for n in self.segment_initializers(nodes))

    def per_layer_weight_bytes(self) -> list[int]:
        """Bytes of the initializers used only by each layer's own nodes."""
        users: dict[str, set[int]] = defaultdict(set)
        for i, node in enumerate(self.graph.node):
            homes = {self.home[i]} if i in self.home else set()
            for name in node.input:
                if name in self.initializers:
                    users[name] |= homes
        out = [0] * self.num_layers
        for name, homes in users.items():
            if len(homes) == 1:
                out[next(iter(homes))] += tensor_nbytes(self.initializers[name])
        return out

    def total_weight_bytes(self) -> int:
        return sum(tensor_nbytes(t) for t in self.initializers.values())


def load_graph(path: Path, kv: KVNames) -> ModelGraph:
    import onnx

    return ModelGraph(onnx.load(str(path), load_external_data=False), kv)
