"""The models a peer holds: listing, lookup by name, and the segment cache."""

from __future__ import annotations

import fcntl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshllm.errors import BadRanges, ModelNotFound
from meshllm.model.graph import ModelGraph, load_graph
from meshllm.model.manifest import MANIFEST, BadManifest, Manifest
from meshllm.model.ranges import LayerRange, validate_ranges
from meshllm.model.segment_files import (
    SEGMENT_MODEL,
    SegmentInfo,
    read_segment_info,
    write_segment,
)

DEFAULT_MODEL = "smollm2-135m-instruct-int4"


@dataclass(frozen=True)
class ImportedModel:
    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"

    def segment_dir(self, r: LayerRange) -> Path:
        return self.path / "segments" / str(r)

    def segments(
        self, ranges: Sequence[LayerRange], report: Callable[[str], None] = lambda _m: None
    ) -> list[tuple[Path, SegmentInfo]]:
        """Segment files for *ranges* (which must tile the model), cut where not cached."""
        ranges = validate_ranges(ranges, self.manifest.architecture.num_layers)
        return self.segment_files(ranges, report)

    def segment_files(
        self, ranges: Sequence[LayerRange], report: Callable[[str], None] = lambda _m: None
    ) -> list[tuple[Path, SegmentInfo]]:
        """Segment files for any ranges inside the model, cut where not already cached."""
        n = self.manifest.architecture.num_layers
        for r in ranges:
            if r.stop > n:
                raise BadRanges(f"layer range {r} is out of bounds: the model has {n} layers")
        sha = self.manifest.model_sha256
        out: list[tuple[Path, SegmentInfo] | None] = []
        missing = []
        for r in ranges:
            d = self.segment_dir(r)
            info = read_segment_info(d)
            ok = (
                info is not None
                and info.source_model_sha256 == sha
                and (d / SEGMENT_MODEL).exists()
            )
            out.append((d / SEGMENT_MODEL, info) if ok and info else None)
            if not ok:
                missing.append(r)
        if missing:
            lock_path = self.path / "segments.lock"
            with lock_path.open("w") as lock:
                # Several processes (tests, peers on one machine) may cut the same model at once.
                fcntl.flock(lock, fcntl.LOCK_EX)
                graph: ModelGraph | None = None
                for k, r in enumerate(ranges):
                    if out[k] is not None:
                        continue
                    d = self.segment_dir(r)
                    info = read_segment_info(d)
                    if info is None or info.source_model_sha256 != sha:
                        if graph is None:
                            graph = load_graph(self.onnx_path, self.manifest.kv_names)
                        report(f"cutting segment {r}")
                        info = write_segment(graph, self.path, r, d, sha)
                    out[k] = (d / SEGMENT_MODEL, info)
        return [o for o in out if o is not None]


class ModelStore:
    """The ``models/`` directory of a peer home."""

    def __init__(self, models_dir: Path):
        self.dir = models_dir

    def list(self) -> list[ImportedModel]:
        if not self.dir.is_dir():
            return []
        found = []
        for d in sorted(self.dir.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and (d / MANIFEST).is_file():
                try:
                    found.append(ImportedModel(d, Manifest.read(d)))
                except (OSError, ValueError, TypeError, KeyError, BadManifest):
                    continue  # a damaged manifest is reported by `get`, not by listing
        return found

    def by_sha(self, model_sha: str) -> ImportedModel | None:
        """The model whose ``model.onnx`` has this sha256, if it was imported here."""
        return next((m for m in self.list() if m.manifest.model_sha256 == model_sha), None)

    def get(self, name: str | None = None) -> ImportedModel:
        """The model called *name*; with none, the only model, else the bundled default."""
        models = self.list()
        if name is None:
            if len(models) == 1:
                return models[0]
            name = DEFAULT_MODEL
        for m in models:
            if m.name == name:
                return m
        have = ", ".join(m.name for m in models) or "none"
        raise ModelNotFound(
            f"no imported model named {name!r} (imported: {have}); run `meshllm model import` first"
        )
