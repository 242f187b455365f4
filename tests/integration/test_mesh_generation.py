"""Distributed generation with real daemons, real libp2p, the real SmolLM2.

The oracle: greedy `meshllm query` on the mesh gives the token ids of
`meshllm generate --monolithic` in one process.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import pytest

from tests.integration.mesh_helpers import cli, monolithic, query, status

pytestmark = pytest.mark.real_model

PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write one sentence about the sea.",
    "Why do cats purr?",
]


@pytest.fixture(scope="module")
def oracle(smollm_models):
    return {
        (prec, prompt): monolithic(model, prompt)
        for prec, model in smollm_models.items()
        for prompt in PROMPTS
    }


@pytest.fixture(
    scope="module",
    params=[(3, "int4"), (4, "int4"), (3, "fp32"), (4, "fp32")],
    ids=lambda p: f"{p[0]}peers-{p[1]}",
)
def served_mesh(request, smollm_models, mesh):
    n, precision = request.param
    model = smollm_models[precision]
    with mesh(n) as m:
        m.give_model(model, at=0)
        # Even split and no balancer: these tests are about generation and read the plan
        # they asked for; the planner and the balancer have their own tests (on a busy
        # machine the balancer would rightly re-plan a stage that runs slower).
        m.serve(model, "--partitioner", "even", "--balance", "none")
        yield {"n": n, "precision": precision, "model": model, "homes": m.homes, "root": m.root}


def test_query_at_every_peer_equals_monolithic(served_mesh, oracle):
    prompt = PROMPTS[0]
    expected = oracle[(served_mesh["precision"], prompt)]
    for home in served_mesh["homes"]:
        res = query(home, prompt)
        assert res["token_ids"] == expected, home.name
        for key in ("text", "ttft_s", "decode_tokens_per_s", "stages"):
            assert key in res
        stages = [s for s in res["stages"] if "layers" in s]
        assert len(stages) == served_mesh["n"] and all(s["compute_s"] > 0 for s in stages)
    # One request at a time: every stage was idle when a decode frame arrived, and ran it
    # on the thread that read it off the fast link.
    for home in served_mesh["homes"]:
        assert status(home)["serving"]["stage"]["on_reader"] > 0, home.name


def test_concurrent_queries_to_different_peers(served_mesh, oracle):
    homes = served_mesh["homes"]
    jobs = [(homes[i % len(homes)], PROMPTS[i]) for i in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda job: query(*job), jobs))
    for (_, prompt), res in zip(jobs, results, strict=True):
        assert res["token_ids"] == oracle[(served_mesh["precision"], prompt)], prompt


def test_each_peer_holds_only_its_own_layers(served_mesh):
    model = served_mesh["model"]
    sha = model.manifest.model_sha256
    plan = status(served_mesh["homes"][0])["serving"]["plan"]
    source = plan["source"]
    for home in served_mesh["homes"]:
        st = status(home)
        me = st["self"]["id"]
        weights = sorted(p for p in home.rglob("*.data"))
        if me == source:
            continue  # the peer the model was imported on holds all of it
        assert not (home / "models").exists() or not any((home / "models").iterdir())
        stage = next((s for s in plan["stages"] if s[0] == me), None)
        if stage is None:
            assert weights == []
            continue
        _, start, stop = stage
        seg_dir = home / "cache" / sha / "segments" / f"{start}-{stop}"
        assert weights == [seg_dir / "segment.onnx.data"]
        graph = onnx.load(str(seg_dir / "segment.onnx"), load_external_data=False).graph
        for t in graph.initializer:
            if ".layers." in t.name:
                layer = int(t.name.split(".layers.")[1].split(".")[0])
                # The builder names the final norm after a layer N; it belongs to the last stage.
                last = stop == plan["num_layers"]
                assert start <= layer < stop or (last and layer == stop), t.name
            elif "embed" in t.name or "lm_head" in t.name:
                assert start == 0 or stop == plan["num_layers"], t.name
            else:
                assert t.name in {"cos_cache", "sin_cache"}, t.name
        rss_kib = int(
            next(
                line.split()[1]
                for line in Path(f"/proc/{st['pid']}/status").read_text().splitlines()
                if line.startswith("VmRSS:")
            )
        )
        size = (seg_dir / "segment.onnx.data").stat().st_size
        print(
            f"\n{served_mesh['precision']} stage {start}-{stop}: segment {size / 2**20:.1f} MiB, "
            f"daemon RSS {rss_kib / 1024:.1f} MiB"
        )


def test_status_shows_the_plan_as_a_readable_table(served_mesh):
    homes = served_mesh["homes"]
    query(homes[0], PROMPTS[0])  # so every stage has recent figures to show
    plan = status(homes[0])["serving"]["plan"]
    text = cli(homes[1], "status").stdout
    assert f"plan {plan['epoch']} (even" in text and "ready" in text
    rows = [r for r in map(str.split, text.splitlines()) if r and r[0].isdigit()]
    assert [r[3] for r in rows] == [f"{a}-{b}" for _, a, b in plan["stages"]]
    for r in rows:
        assert r[4] == "ready" and float(r[5]) > 100  # resident MiB of a daemon with a segment
        assert float(r[7]) > 0  # recent per-step compute, ms
