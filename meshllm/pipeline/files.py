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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cbor2
import structlog
import trio

from meshllm import wire
from meshllm.errors import MeshError
from meshllm.mesh.framing import FrameReader, frame
from meshllm.mesh.transport import Endpoint, PeerUnreachable, Stream
from meshllm.model.manifest import Manifest
from meshllm.model.ranges import LayerRange
from meshllm.model.store import ModelStore

PROTOCOL = "files"
SEGMENT_FILES = ("segment.onnx", "segment.onnx.data")
# A probe is a segment's graph and description without its weights: peers time it with
# weights they generate (see meshllm.device), so they never hold layers they do not run.
PROBE_FILES = ("segment.onnx", "segment.json")
META_FILES = (
    "manifest.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "genai_config.json",
)
CHUNK = 1 << 20
# A transfer whose source sends nothing for this long has stalled (a peer that accepts the
# stream and never answers, a connection gone quiet): it fails, instead of holding up the
# work waiting on it (profiling is one request at a time) for ever.
STALL_S = 30.0
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
    """Where *home* caches files of model *model_sha*. The hash is checked here, where it
    becomes a path: it may have come from another peer (a plan, a request)."""
    return home / "cache" / wire.sha256_hex(model_sha, "model sha")


FILE_KINDS = {"meta": META_FILES, "segment": SEGMENT_FILES, "probe": PROBE_FILES}
MAX_FILE_BYTES = 1 << 46


@dataclass(frozen=True)
class FileRequest:
    """``{sha, what, file, start?, stop?, offset}``: one file of one model, from *offset*."""

    sha: str
    what: str
    file: str
    start: int = 0
    stop: int = 0
    offset: int = 0

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "sha": self.sha,
            "what": self.what,
            "file": self.file,
            "offset": self.offset,
        }
        if self.what != "meta":
            obj.update(start=self.start, stop=self.stop)
        return obj

    @classmethod
    def from_obj(cls, raw: Any) -> FileRequest:
        obj = wire.mapping(raw, "file request")
        what = wire.choice(obj.get("what"), "what", FILE_KINDS)
        name = obj.get("file")
        if not isinstance(name, str) or name not in FILE_KINDS[what]:
            raise wire.BadMessage(f"not a {what} file: {wire.show(name)}")
        start = stop = 0
        if what != "meta":
            start = wire.integer(obj.get("start"), "start", 0, 4096)
            stop = wire.integer(obj.get("stop"), "stop", start + 1, 4097)
        return cls(
            wire.sha256_hex(obj.get("sha"), "sha"),
            what,
            name,
            start,
            stop,
            wire.integer(obj.get("offset", 0), "offset"),
        )


@dataclass(frozen=True)
class FileHeader:
    """The server's answer before the bytes: ``{ok, size, sha256}`` or ``{ok: false, error}``."""

    size: int
    sha256: str

    @classmethod
    def from_obj(cls, raw: Any, source: str, name: str) -> FileHeader:
        obj = wire.mapping(raw, "file header")
        if obj.get("ok") is not True:
            error = obj.get("error")
            shown = error[:300] if isinstance(error, str) else "bad answer"
            raise TransferError(f"{source} refused {name}: {shown}")
        return cls(
            wire.integer(obj.get("size"), "size", 0, MAX_FILE_BYTES),
            wire.sha256_hex(obj.get("sha256"), "sha256"),
        )


class FileServer:
    """Serves files of the models in *store* to admitted peers."""

    def __init__(self, store: ModelStore):
        self.store = store

    def _locate(self, req: FileRequest) -> Path:
        model = self.store.by_sha(req.sha)
        if model is None:
            raise TransferError(f"no model with sha {req.sha} here")
        if req.what == "meta":
            path = model.path / req.file
            if not path.exists():
                raise TransferError(f"{req.file} missing from {model.name}")
            return path
        if req.stop > model.manifest.architecture.num_layers:
            raise TransferError(f"{model.name} has no layer {req.stop - 1}")
        ((seg_path, _info),) = model.segment_files([LayerRange(req.start, req.stop)])
        return seg_path.parent / req.file

    async def handle(self, stream: Stream) -> None:
        reader = FrameReader(stream.read, 4096)
        try:
            with trio.fail_after(30):
                req = FileRequest.from_obj(wire.loads(await reader.read_frame()))
            path = await trio.to_thread.run_sync(self._locate, req)
            size = path.stat().st_size
            sha = await trio.to_thread.run_sync(file_sha256, path)
            offset = req.offset
            if offset > size:
                offset = size + 1  # tell the fetcher to start over
            await stream.write(frame(cbor2.dumps({"ok": True, "size": size, "sha256": sha})))
            if offset > size:
                return
            with path.open("rb") as fh:
                fh.seek(offset)
                while block := await trio.to_thread.run_sync(fh.read, CHUNK):
                    await stream.write(block)
        except (MeshError, ValueError, EOFError, trio.TooSlowError) as exc:
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
        await fetch_file(endpoint, source, FileRequest(sha, "meta", name), meta / name)
    # The source chose these bytes: they count as model *sha*'s only if its manifest says so.
    try:
        claimed = Manifest.read(meta).model_sha256
        if claimed != sha:
            raise TransferError(
                f"{source} sent the manifest of model {claimed[:12]}, not {sha[:12]}"
            )
    except MeshError:
        for name in META_FILES:
            (meta / name).unlink(missing_ok=True)
        raise
    return meta


async def fetch_file(
    endpoint: Endpoint,
    source: str,
    request: FileRequest,
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
        read = _stalls_fail(stream.read, source)
        try:
            with trio.fail_after(STALL_S):
                await stream.write(frame(cbor2.dumps(replace(request, offset=offset).to_obj())))
            reader = FrameReader(read, 4096)
            header = FileHeader.from_obj(
                wire.loads(await reader.read_frame()), source, request.file
            )
            size, sha = header.size, header.sha256
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
                    block = await read(CHUNK)
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
        except (EOFError, ValueError, wire.BadMessage) as exc:
            raise TransferError(f"bad transfer of {request.file} from {source}: {exc}") from None
        except trio.TooSlowError:
            raise TransferError(f"{source} did not take the request for {request.file}") from None
        finally:
            await stream.close()
    raise TransferError(f"could not fetch {request.file} from {source}")


def _stalls_fail(
    read: Callable[[int], Awaitable[bytes]], source: str
) -> Callable[[int], Awaitable[bytes]]:
    """*read*, failing with TransferError when nothing comes for STALL_S seconds."""

    async def read_some(n: int) -> bytes:
        with trio.move_on_after(STALL_S):
            return await read(n)
        raise TransferError(f"{source} sent nothing for {STALL_S:g} s")

    return read_some


__all__ = ["FileServer", "PeerUnreachable", "TransferError", "cache_dir", "fetch_file"]
