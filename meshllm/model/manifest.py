"""The manifest written next to an imported model: facts later stages (planner, peers) need."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from meshllm.errors import MeshError
from meshllm.model.graph import KVNames
from meshllm.wire import is_sha256_hex

MANIFEST = "manifest.json"


class BadManifest(MeshError):
    """A manifest that cannot be read or does not describe a model."""


MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Architecture:
    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_size: int
    vocab_size: int
    context_length: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    kv_dtype: str  # numpy dtype name of the KV cache


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    precision: str
    source: str
    source_kind: str
    source_sha256: str
    architecture: Architecture
    kv_names: KVNames
    total_weight_bytes: int
    per_layer_weight_bytes: tuple[int, ...]
    files: dict[str, FileEntry] = field(default_factory=dict)
    created_at: str = ""
    meshllm_version: str = ""
    version: int = MANIFEST_VERSION
    # How a synthetic model was made (shape, checkpoint, seed and any shrinking), or None for
    # a model converted from real weights (see model.synth).
    synthetic: dict[str, Any] | None = None

    @property
    def model_sha256(self) -> str:
        return self.files["model.onnx"].sha256

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """The manifest *text* holds; raises :class:`BadManifest` (a manifest may have come
        from another peer, so nothing in it is taken on trust)."""
        try:
            manifest = cls._from_json(text)
            arch = manifest.architecture
            checks = (
                isinstance(arch.num_layers, int) and 0 < arch.num_layers <= 4096,
                len(manifest.per_layer_weight_bytes) == arch.num_layers,
                all(isinstance(b, int) and b >= 0 for b in manifest.per_layer_weight_bytes),
                is_sha256_hex(manifest.model_sha256),
                isinstance(arch.context_length, int) and 0 < arch.context_length <= 1 << 24,
                all(isinstance(t, int) for t in arch.eos_token_ids),
                manifest.synthetic is None or isinstance(manifest.synthetic, dict),
            )
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
            raise BadManifest(f"malformed manifest: {type(exc).__name__}: {exc}"[:300]) from None
        if not all(checks):
            raise BadManifest("malformed manifest: its figures are out of range")
        return manifest

    @classmethod
    def _from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        arch = dict(raw.pop("architecture"))
        arch["eos_token_ids"] = tuple(arch["eos_token_ids"])
        raw["architecture"] = Architecture(**arch)
        raw["kv_names"] = KVNames(**raw["kv_names"])
        raw["per_layer_weight_bytes"] = tuple(raw["per_layer_weight_bytes"])
        raw["files"] = {k: FileEntry(**v) for k, v in raw["files"].items()}
        return cls(**raw)

    def write(self, model_dir: Path) -> None:
        (model_dir / MANIFEST).write_text(self.to_json())

    @classmethod
    def read(cls, model_dir: Path) -> Manifest:
        try:
            text = (model_dir / MANIFEST).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise BadManifest(f"cannot read {MANIFEST}: {exc}") from None
        return cls.from_json(text)
