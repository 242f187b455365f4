"""``meshllm model import``: source -> monolithic ONNX model + manifest under the peer's home.

The import is idempotent (same source bytes and precision: nothing to do) and atomic (work
happens in a temporary directory renamed into place at the end).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx

from meshllm import __version__
from meshllm.errors import ConversionFailed, UnsupportedSource
from meshllm.model import PRECISIONS
from meshllm.model.convert import run_builder, source_to_hf
from meshllm.model.graph import KVNames, load_graph
from meshllm.model.manifest import MANIFEST, Architecture, FileEntry, Manifest
from meshllm.model.source import ModelSource, resolve_source, sha256_file, source_fingerprint

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

Reporter = Callable[[str], None]


def default_name(src: ModelSource, precision: str) -> str:
    return f"{src.default_stem}-{precision}"


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise UnsupportedSource(
            f"bad model name {name!r}: use lower-case letters, digits, '.', '_' or '-'"
        )
    return name


def import_model(
    models_dir: Path,
    source: str | Path | None = None,
    *,
    precision: str = "int4",
    name: str | None = None,
    report: Reporter = lambda _msg: None,
) -> tuple[Manifest, bool]:
    """Import *source*; returns (manifest, True if it was converted now, False if cached)."""
    if precision not in PRECISIONS:
        choices = " or ".join(PRECISIONS)
        raise UnsupportedSource(f"unknown precision {precision!r}: choose {choices}")
    src = resolve_source(source)
    name = check_name(name or default_name(src, precision))
    target = models_dir / name
    t0 = time.monotonic()

    def step(i: int, msg: str) -> None:
        report(f"[{i}/4 {time.monotonic() - t0:5.1f}s] {msg}")

    step(1, f"hashing {src.path}")
    fingerprint = source_fingerprint(src)
    if (target / MANIFEST).is_file():
        try:
            existing = Manifest.read(target)
        except (OSError, ValueError, TypeError, KeyError):
            existing = None
        if (
            existing is not None
            and existing.source_sha256 == fingerprint
            and existing.precision == precision
            and files_intact(target, existing)
        ):
            return existing, False

    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".import-{name}-", dir=models_dir) as tmp_str:
        tmp = Path(tmp_str)
        out = tmp / "model"
        step(2, "loading weights" + (" (dequantising GGUF)" if src.kind == "gguf" else ""))
        hf_dir = source_to_hf(src, tmp)
        step(3, f"exporting ONNX ({precision}) with the onnxruntime-genai builder")
        run_builder(hf_dir, out, precision, tmp / "cache", tmp / "builder.log")
        step(4, "analysing graph and writing manifest")
        manifest = _make_manifest(out, src, fingerprint, precision, name)
        manifest.write(out)
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    report(f"imported {name} in {time.monotonic() - t0:.1f}s")
    return manifest, True


def files_intact(model_dir: Path, manifest: Manifest) -> bool:
    return all(
        (model_dir / f).is_file() and (model_dir / f).stat().st_size == e.bytes
        for f, e in manifest.files.items()
    )


def _make_manifest(
    out: Path, src: ModelSource, fingerprint: str, precision: str, name: str
) -> Manifest:
    genai = json.loads((out / "genai_config.json").read_text())
    model = genai["model"]
    decoder = model["decoder"]
    kv = KVNames(
        past_key=decoder["inputs"].get("past_key_names", KVNames.past_key),
        past_value=decoder["inputs"].get("past_value_names", KVNames.past_value),
        present_key=decoder["outputs"].get("present_key_names", KVNames.present_key),
        present_value=decoder["outputs"].get("present_value_names", KVNames.present_value),
    )
    graph = load_graph(out / decoder.get("filename", "model.onnx"), kv)
    if graph.num_layers != decoder["num_hidden_layers"]:
        raise ConversionFailed(
            f"graph has {graph.num_layers} KV inputs but config says "
            f"{decoder['num_hidden_layers']} layers"
        )
    past_vi = graph.value_info[kv.past(0)[0]].type.tensor_type
    eos = model.get("eos_token_id", [])
    arch = Architecture(
        model_type=src.model_type,
        num_layers=graph.num_layers,
        hidden_size=decoder["hidden_size"],
        num_attention_heads=decoder["num_attention_heads"],
        num_key_value_heads=decoder["num_key_value_heads"],
        head_size=decoder["head_size"],
        vocab_size=model["vocab_size"],
        context_length=model["context_length"],
        bos_token_id=model.get("bos_token_id"),
        eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]),
        kv_dtype=onnx.helper.tensor_dtype_to_np_dtype(past_vi.elem_type).name,
    )
    files = {
        p.name: FileEntry(bytes=p.stat().st_size, sha256=sha256_file(p))
        for p in sorted(out.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    return Manifest(
        name=name,
        precision=precision,
        source=str(src.path),
        source_kind=src.kind,
        source_sha256=fingerprint,
        architecture=arch,
        kv_names=kv,
        total_weight_bytes=graph.total_weight_bytes(),
        per_layer_weight_bytes=tuple(graph.per_layer_weight_bytes()),
        files=files,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        meshllm_version=__version__,
    )
