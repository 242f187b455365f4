"""Model distribution: segment and tokenizer files served by the source peer over the mesh.

Protocol ``files``: the fetcher sends one CBOR request frame ``{sha, what, start, stop, file,
offset}``; the server answers a header frame ``{ok, size, sha256}`` (or ``{ok: false, error}``)
then the raw bytes from *offset* to the end, and closes. Downloads go to ``NAME.part`` and
resume from its length after an interruption; the finished file must match the server's
sha256 before it is renamed into place. Files are cached under ``cache/<model sha>/``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import structlog
import trio

from meshllm.errors import MeshError
from meshllm.mesh.framing import FrameReader, frame
from meshllm.mesh.transport import Endpoint, PeerUnreachable, Stream
from meshllm.model.ranges import LayerRange
from meshllm.model.store import ModelStore

PROTOCOL = "files"
SEGMENT_FILES = ("segment.onnx", "segment.onnx.data")
# A probe is a segment's graph and description without its weights: peers time it with
# weights they generate (see meshllm.plan.profile), so they never hold layers they do not run.
PROBE_FILES = ("segment.onnx", "segment.json")
META_FILES = ("manifest.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "genai_config.json")  # fmt: skip
CHUNK = 1 << 20
log = structlog.get_logger("meshllm.files")


class TransferError(MeshError):
    """A file could not be fetched or failed verification."""


_hash_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while block := fh.read(CHUNK):
                digest.update(block)
        _hash_cache[key] = digest.hexdigest()
    return _hash_cache[key]


def cache_dir(home: Path, model_sha: str) -> Path:
    return home / "cache" / model_sha


class FileServer:
    """Serves files of the models in *store* to admitted peers."""

    def __init__(self, store: ModelStore):
        self.store = store

    def _locate(self, req: dict[str, Any]) -> Path:
        sha, what, name = req.get("sha"), req.get("what"), req.get("file")
        model = self.store.by_sha(str(sha))
        if model is None:
            raise TransferError(f"no model with sha {sha!r} here")
        if what == "meta" and name in META_FILES:
            path = model.path / str(name)
            if not path.exists():
                raise TransferError(f"{name} missing from {model.name}")
            return path
        if (what == "segment" and name in SEGMENT_FILES) or (
            what == "probe" and name in PROBE_FILES
        ):
            r = LayerRange(int(req["start"]), int(req["stop"]))
            ((seg_path, _info),) = model.segment_files([r])
            return seg_path.parent / str(name)
        raise TransferError(f"not a servable file: {what!r} {name!r}")

    async def handle(self, stream: Stream) -> None:
        reader = FrameReader(stream.read, 4096)
        try:
            with trio.fail_after(30):
                req = cbor2.loads(await reader.read_frame())
            if not isinstance(req, dict):
                raise TransferError("bad request")
            path = await trio.to_thread.run_sync(self._locate, req)
            size = path.stat().st_size
            sha = await trio.to_thread.run_sync(file_sha256, path)
            offset = req.get("offset", 0)
            if not isinstance(offset, int) or not 0 <= offset <= size:
                offset = size + 1  # tell the fetcher to start over
            await stream.write(frame(cbor2.dumps({"ok": True, "size": size, "sha256": sha})))
            if offset > size:
                return
            with path.open("rb") as fh:
                fh.seek(offset)
                while block := await trio.to_thread.run_sync(fh.read, CHUNK):
                    await stream.write(block)
        except (MeshError, ValueError, KeyError, TypeError, EOFError, cbor2.CBORDecodeError,
                trio.TooSlowError) as exc:  # fmt: skip
            log.warning("file_request_refused", other=stream.peer_id, reason=str(exc))
            with trio.move_on_after(5):
                await stream.write(frame(cbor2.dumps({"ok": False, "error": str(exc)})))


async def meta_dir(
    endpoint: Endpoint, home: Path, store: ModelStore, sha: str, source: str
) -> Path:
    """The directory with model *sha*'s manifest and tokenizer: the imported model's own, or
    a cache filled from *source*."""
    local = store.by_sha(sha)
    if local is not None:
        return local.path
    meta = cache_dir(home, sha) / "meta"
    for name in META_FILES:
        req = {"sha": sha, "what": "meta", "file": name}
        await fetch_file(endpoint, source, req, meta / name)
    return meta


async def fetch_file(
    endpoint: Endpoint,
    source: str,
    request: dict[str, Any],
    dest: Path,
    on_bytes: Callable[[int, int], None] = lambda _d, _t: None,
) -> None:
    """Fetch one file into *dest*, resuming a previous partial download; verifies sha256."""
    sidecar = dest.with_name(dest.name + ".sha256")
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for _attempt in range(2):
        have = dest.exists() and sidecar.exists()
        offset = dest.stat().st_size if have else (part.stat().st_size if part.exists() else 0)
        stream = await endpoint.open_stream(source, PROTOCOL)
        try:
            await stream.write(frame(cbor2.dumps({**request, "offset": offset})))
            reader = FrameReader(stream.read, 4096)
            header = cbor2.loads(await reader.read_frame())
            if not isinstance(header, dict) or not header.get("ok"):
                err = header.get("error") if isinstance(header, dict) else "bad answer"
                raise TransferError(f"{source} refused {request.get('file')}: {err}")
            size, sha = int(header["size"]), str(header["sha256"])
            if have:
                if sidecar.read_text().strip() == sha and offset == size:
                    on_bytes(size, size)
                    return  # cached and current
                dest.unlink()
                sidecar.unlink()
                continue
            if offset > size:
                part.unlink(missing_ok=True)
                continue
            done = offset
            with part.open("ab") as fh:
                # Bytes already read into the frame reader's buffer belong to the file.
                leftover = reader.take_buffer()
                if leftover:
                    fh.write(leftover)
                    done += len(leftover)
                while done < size:
                    block = await stream.read(CHUNK)
                    if not block:
                        raise TransferError(f"{source} closed the transfer at {done}/{size} bytes")
                    fh.write(block)
                    done += len(block)
                    on_bytes(done, size)
            got = await trio.to_thread.run_sync(file_sha256, part)
            if got != sha:
                part.unlink()
                raise TransferError(f"{dest.name}: sha256 mismatch after transfer")
            os.replace(part, dest)
            sidecar.write_text(sha + "\n")
            return
        except (EOFError, KeyError, ValueError, cbor2.CBORDecodeError) as exc:
            raise TransferError(
                f"bad transfer of {request.get('file')} from {source}: {exc}"
            ) from None
        finally:
            await stream.close()
    raise TransferError(f"could not fetch {request.get('file')} from {source}")


__all__ = ["FileServer", "PeerUnreachable", "TransferError", "cache_dir", "fetch_file"]
