"""Model distribution over the in-memory transport: verified, resumable, cached."""

from __future__ import annotations

import cbor2
import pytest
import trio

from meshllm.mesh.framing import FrameReader, frame
from meshllm.model.ranges import LayerRange
from meshllm.pipeline import files
from tests.support import memory_pair


@pytest.fixture
def served_tiny(tiny_fp32):
    return tiny_fp32


async def _pair(nursery, store):
    return await memory_pair(nursery, files.PROTOCOL, files.FileServer(store).handle)


async def test_fetch_resume_and_verify(served_tiny, model_store, tmp_path):
    sha = served_tiny.manifest.model_sha256
    async with trio.open_nursery() as nursery:
        a, b = await _pair(nursery, model_store)
        req = files.FileRequest(sha, "segment", "segment.onnx.data", 2, 4)
        dest = tmp_path / "seg" / "segment.onnx.data"
        progress: list[tuple[int, int]] = []
        await files.fetch_file(b, a.peer_id, req, dest, lambda d, t: progress.append((d, t)))
        whole = dest.read_bytes()
        ((seg, _),) = served_tiny.segment_files([LayerRange(2, 4)])
        assert whole == (seg.parent / "segment.onnx.data").read_bytes()
        assert progress[-1] == (len(whole), len(whole))

        # An interrupted download resumes from the partial file instead of starting over.
        dest2 = tmp_path / "again" / "segment.onnx.data"
        dest2.parent.mkdir()
        half = len(whole) // 2
        dest2.with_name(dest2.name + ".part").write_bytes(whole[:half])
        resumed: list[tuple[int, int]] = []
        await files.fetch_file(b, a.peer_id, req, dest2, lambda d, t: resumed.append((d, t)))
        assert dest2.read_bytes() == whole and resumed[0][0] > half

        # A corrupted partial file fails verification, is removed, and a retry succeeds.
        dest3 = tmp_path / "bad" / "segment.onnx.data"
        dest3.parent.mkdir()
        dest3.with_name(dest3.name + ".part").write_bytes(b"\xff" * half)
        with pytest.raises(files.TransferError, match="sha256 mismatch"):
            await files.fetch_file(b, a.peer_id, req, dest3)
        assert not dest3.with_name(dest3.name + ".part").exists()
        await files.fetch_file(b, a.peer_id, req, dest3)
        assert dest3.read_bytes() == whole

        # Cached: a second fetch transfers nothing.
        again: list[tuple[int, int]] = []
        await files.fetch_file(b, a.peer_id, req, dest, lambda d, t: again.append((d, t)))
        assert again == [(len(whole), len(whole))]
        nursery.cancel_scope.cancel()


async def _ask(b, server: str, request: dict) -> dict:
    """Send one raw request (not built by FileRequest: the server must check it) and return
    the header it answers."""
    stream = await b.open_stream(server, files.PROTOCOL)
    try:
        await stream.write(frame(cbor2.dumps(request)))
        with trio.fail_after(10):
            return cbor2.loads(await FrameReader(stream.read, 4096).read_frame())
    finally:
        await stream.close()


async def test_refuses_unknown_models_and_files(served_tiny, model_store, tmp_path):
    async with trio.open_nursery() as nursery:
        a, b = await _pair(nursery, model_store)
        sha = served_tiny.manifest.model_sha256
        for req, message in (
            ({"sha": "0" * 64, "what": "meta", "file": "tokenizer.json"}, "no model"),
            ({"sha": sha, "what": "meta", "file": "../../secret"}, "not a meta file"),
            ({"sha": "../" + sha[3:], "what": "meta", "file": "manifest.json"}, "sha must be"),
            (
                {"sha": sha, "what": "segment", "start": 0, "stop": 99, "file": "segment.onnx"},
                "has no layer",
            ),
            (
                {
                    "sha": sha,
                    "what": "segment",
                    "start": 0,
                    "stop": 2,
                    "file": "segment.onnx",
                    "offset": float("inf"),
                },
                "offset must be an integer",
            ),
        ):
            header = await _ask(b, a.peer_id, req)
            assert header["ok"] is False and message in header["error"], header
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("sends", [b"", b"\x00\x00\x00\x40{"], ids=["nothing", "half a header"])
async def test_a_source_that_goes_quiet_fails_the_fetch(autojump_clock, tmp_path, sends):
    """A source that takes the request and then sends nothing more must not hold the
    fetch (and whatever waits on it: profiling runs one request at a time) for ever."""

    async def silent(stream) -> None:
        await stream.read(4096)
        await stream.write(sends)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        a, b = await memory_pair(nursery, files.PROTOCOL, silent)
        req = files.FileRequest("ab" * 32, "meta", "manifest.json")
        t0 = trio.current_time()
        with pytest.raises(files.TransferError, match="sent nothing"):
            await files.fetch_file(b, a.peer_id, req, tmp_path / "m" / "manifest.json")
        assert trio.current_time() - t0 == pytest.approx(files.STALL_S, abs=1)
        nursery.cancel_scope.cancel()
