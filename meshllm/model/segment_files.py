"""Writing one segment of a model as its own ONNX file with its own external-data file.

Weights are copied byte-for-byte out of the monolithic model's data file, so a segment's data
file holds exactly the initializers its nodes read and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meshllm.errors import PartitionError
from meshllm.model.graph import ModelGraph, tensor_nbytes
from meshllm.model.ranges import LayerRange

if TYPE_CHECKING:
    import onnx
    from onnx import TensorProto

SEGMENT_MODEL = "segment.onnx"
SEGMENT_DATA = "segment.onnx.data"
SEGMENT_INFO = "segment.json"
_ALIGN = 64


@dataclass(frozen=True)
class SegmentInfo:
    """What a runtime needs to know about a segment file."""

    start: int
    stop: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weight_bytes: int
    source_model_sha256: str

    @property
    def range(self) -> LayerRange:
        return LayerRange(self.start, self.stop)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> SegmentInfo:
        raw = json.loads(text)
        raw["inputs"] = tuple(raw["inputs"])
        raw["outputs"] = tuple(raw["outputs"])
        return cls(**raw)


def write_segment(
    graph: ModelGraph, source_dir: Path, r: LayerRange, out_dir: Path, source_sha256: str
) -> SegmentInfo:
    """Cut layers *r* out of *graph* (whose weights live in *source_dir*) into *out_dir*."""
    import onnx
    from onnx import TensorProto

    nodes = graph.segment_nodes(r)
    inputs, outputs = graph.segment_io(r, nodes)
    init_names = graph.segment_initializers(nodes)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    handles: dict[str, object] = {}
    new_inits: list[TensorProto] = []
    offset = 0
    try:
        with (tmp / SEGMENT_DATA).open("wb") as data:
            for name in init_names:
                src = graph.initializers[name]
                t = TensorProto()
                t.CopyFrom(src)
                if src.data_location == TensorProto.EXTERNAL:
                    info = {e.key: e.value for e in src.external_data}
                    fh = handles.get(info["location"])
                    if fh is None:
                        fh = handles[info["location"]] = (source_dir / info["location"]).open("rb")
                    fh.seek(int(info.get("offset", 0)))  # type: ignore[attr-defined]
                    length = tensor_nbytes(src)
                    blob = fh.read(length)  # type: ignore[attr-defined]
                    if len(blob) != length:
                        raise PartitionError(f"weight file truncated at initializer {name}")
                    pad = (-offset) % _ALIGN
                    data.write(b"\0" * pad)
                    offset += pad
                    data.write(blob)
                    del t.external_data[:]
                    for key, value in (
                        ("location", SEGMENT_DATA),
                        ("offset", str(offset)),
                        ("length", str(length)),
                    ):
                        entry = t.external_data.add()
                        entry.key, entry.value = key, value
                    offset += length
                new_inits.append(t)
    finally:
        for fh in handles.values():
            fh.close()  # type: ignore[attr-defined]

    def value_info(name: str) -> onnx.ValueInfoProto:
        vi = graph.value_info.get(name)
        if vi is None or not vi.type.HasField("tensor_type"):
            raise PartitionError(f"no type information for crossing tensor {name}")
        return vi

    boundary = set(inputs) | set(outputs)
    produced = {o for i in nodes for o in graph.graph.node[i].output}
    inner_vi = [
        v for name, v in graph.value_info.items() if name in produced and name not in boundary
    ]
    seg_graph = onnx.helper.make_graph(
        nodes=[graph.graph.node[i] for i in nodes],
        name=f"{graph.graph.name or 'model'}_layers_{r.start}_{r.stop}",
        inputs=[value_info(n) for n in inputs],
        outputs=[value_info(n) for n in outputs],
        initializer=new_inits,
        value_info=inner_vi,
    )
    seg_model = onnx.helper.make_model(
        seg_graph,
        opset_imports=list(graph.model.opset_import),
        ir_version=graph.model.ir_version,
        producer_name="meshllm",
    )
    onnx.save_model(seg_model, str(tmp / SEGMENT_MODEL))
    info = SegmentInfo(
        start=r.start,
        stop=r.stop,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        weight_bytes=offset,
        source_model_sha256=source_sha256,
    )
    (tmp / SEGMENT_INFO).write_text(info.to_json())
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return info


def read_segment_info(seg_dir: Path) -> SegmentInfo | None:
    try:
        return SegmentInfo.from_json((seg_dir / SEGMENT_INFO).read_text())
    except (OSError, ValueError, TypeError, KeyError):
        return None
