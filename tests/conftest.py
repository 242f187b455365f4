"""Fixtures: models are converted once per run and cached under .cache/ by source hash."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshllm.model.importer import import_model
from meshllm.model.store import ImportedModel, ModelStore
from meshllm.model.tiny import make_tiny_llama

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MESHLLM_TEST_CACHE", REPO / ".cache" / "test"))


@pytest.fixture(scope="session")
def model_store() -> ModelStore:
    """A models directory shared by the whole run (and by later runs: imports are idempotent)."""
    return ModelStore(CACHE / "home" / "models")


@pytest.fixture(scope="session")
def tiny_source() -> Path:
    return make_tiny_llama(CACHE / "tiny-src")


def _import(store: ModelStore, source: Path | None, precision: str, name: str) -> ImportedModel:
    import_model(store.dir, source, precision=precision, name=name)
    return store.get(name)


@pytest.fixture(scope="session", params=["int4", "fp32"])
def tiny_model(request, model_store, tiny_source) -> ImportedModel:
    return _import(model_store, tiny_source, request.param, f"tiny-{request.param}")


@pytest.fixture(scope="session")
def tiny_fp32(model_store, tiny_source) -> ImportedModel:
    return _import(model_store, tiny_source, "fp32", "tiny-fp32")


@pytest.fixture(scope="session", params=["int4", "fp32"])
def smollm(request, model_store) -> ImportedModel:
    """The real SmolLM2-135M-Instruct from the bundled GGUF."""
    p = request.param
    return _import(model_store, None, p, f"smollm2-135m-instruct-{p}")


@pytest.fixture(scope="session")
def smollm_models(model_store) -> dict[str, ImportedModel]:
    """Both precisions of the real SmolLM2, for tests that need to pick one per case."""
    return {
        p: _import(model_store, None, p, f"smollm2-135m-instruct-{p}") for p in ("int4", "fp32")
    }


# Every shape `model synth` knows from a published checkpoint, shrunk to 3 layers of width 64
# and a 512-token vocabulary: the same family's graph, built in seconds.
SYNTH_TESTED = ("llama-3.2-1b", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen3-0.6b")


@pytest.fixture(
    scope="session",
    params=[(s, p) for s in SYNTH_TESTED for p in ("int4", "fp32")],
    ids=lambda sp: f"{sp[0]}-{sp[1]}",
)
def synth_small(request, model_store) -> ImportedModel:
    from meshllm.model.synth import synth_model

    shape, precision = request.param
    name = f"synth-{shape}-{precision}-small"
    synth_model(
        model_store.dir, shape, precision=precision, name=name, layers=3, hidden=64, vocab=512
    )
    return model_store.get(name)
