"""Safe file I/O shared by every format: atomic writes, stdin/stdout (``-``), safetensors only.

Nothing here unpickles: files are read with ``safetensors`` after the header has been checked.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "check_output",
    "write_bytes",
    "read_bytes",
    "save_tensors",
    "load_tensors",
    "split_header",
    "join_header",
    "new_folder",
    "partial_folder",
    "array_from_bytes",
    "array_to_bytes",
    "Spill",
    "StreamedTensors",
    "read_tensors",
    "tensor_header",
    "tensor_bytes",
    "head_bytes",
]

MAX_HEADER = 100 * 1024 * 1024  # bytes of JSON header we are willing to parse


def check_output(path: str | Path | None) -> None:
    """Refuse an output path that cannot be written (a folder, or in a missing folder) before any work."""
    if path is None or str(path) == "-":
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"output {path} is a folder; give a file name")
    if not target.parent.is_dir():
        raise UsageError(f"output {path}: folder {target.parent} does not exist")


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` atomically (temp file in the same folder, fsync, rename); ``-`` is stdout."""
    if str(path) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    check_output(path)
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        _default_mode(tmp)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _default_mode(path: str) -> None:
    """The permissions a plain ``open`` would give (temp files are created private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


class StreamedTensors:
    """A safetensors file written piece by piece: the header first, then each tensor's rows at their offsets.

    ``specs`` gives every tensor as ``name: (torch dtype name, shape)``; the finished file has the bytes
    :func:`save_tensors` would write for the same tensors. It is written like :func:`write_bytes`: a temp
    file next to ``path``, fsync, rename when the ``with`` block succeeds, removed if it fails or is
    interrupted; ``-`` copies the finished file to stdout (from a temp file in the system temp folder).
    """

    def __init__(self, path: str | Path, specs: dict[str, tuple[str, list[int]]], metadata: dict[str, str]):
        check_output(path)
        self.path = str(path)
        self.header = tensor_header(specs, metadata)
        self._head = head_bytes(self.header)

    def __enter__(self) -> StreamedTensors:
        target = Path(self.path)
        folder, name = (None, "stdout") if self.path == "-" else (target.parent, target.name)
        self._fd, self._tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        try:
            body = max((e["data_offsets"][1] for k, e in self.header.items() if k != "__metadata__"), default=0)
            os.ftruncate(self._fd, len(self._head) + body)
            self._pwrite(self._head, 0)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def write(self, name: str, t: torch.Tensor, row: int = 0) -> None:
        """Write ``t`` as tensor ``name``'s rows from ``row`` on (the whole tensor by default)."""
        e = self.header[name]
        start, end = e["data_offsets"]
        raw = tensor_bytes(t)
        at = start + row * ((end - start) // max(e["shape"][0], 1) if e["shape"] else 0)
        if at + len(raw) > end:
            raise ValueError(f"{len(raw)} bytes at row {row} overflow tensor {name!r}")
        self._pwrite(raw, len(self._head) + at)

    def _pwrite(self, data: bytes, at: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, at)
            view, at = view[n:], at + n

    def __exit__(self, exc_type, *rest) -> None:
        try:
            if exc_type is not None:
                return
            if self.path == "-":
                os.lseek(self._fd, 0, os.SEEK_SET)
                while chunk := os.read(self._fd, 1 << 20):
                    sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
            else:
                os.fsync(self._fd)
                _default_mode(self._tmp)
                os.replace(self._tmp, self.path)
        finally:
            os.close(self._fd)
            Path(self._tmp).unlink(missing_ok=True)


def read_bytes(path: str | Path, what: str) -> bytes:
    if str(path) == "-":
        return sys.stdin.buffer.read()
    p = Path(path)
    if not p.exists() or p.is_dir():
        raise UsageError(f"{what} {path}: no such file")
    return p.read_bytes()


_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "uint8": "U8",
    "bool": "BOOL",
}


def save_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialise to safetensors bytes, deterministically: same inputs, same bytes.

    Tensors are laid out in name order and the JSON header has sorted keys (the safetensors library
    itself orders metadata by hash, which differs from run to run).
    """
    specs = {k: (str(t.dtype).removeprefix("torch."), list(t.shape)) for k, t in tensors.items()}
    return join_header(tensor_header(specs, metadata), b"".join(tensor_bytes(tensors[k]) for k in sorted(tensors)))


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor's raw little-endian bytes, as safetensors stores them."""
    import torch

    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensor_header(specs: dict[str, tuple[str, list[int]]], metadata: dict[str, str]) -> dict:
    """The safetensors header of tensors given as ``name: (torch dtype name, shape)``, laid out in name order."""
    header: dict[str, object] = {"__metadata__": {k: metadata[k] for k in sorted(metadata)}} if metadata else {}
    offset = 0
    for name in sorted(specs):
        dtype, shape = specs[name]
        size = _SIZES[_DTYPES[dtype]]
        for n in shape:
            size *= n
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    return header


def head_bytes(header: dict) -> bytes:
    """The bytes before the tensor data: the header's length and its JSON (sorted keys, padded to 8 bytes)."""
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head


def join_header(header: dict, body: bytes) -> bytes:
    """Safetensors bytes: the JSON header (sorted keys, padded to 8 bytes) and the tensor bytes it describes."""
    return head_bytes(header) + body


def split_header(data: bytes, what: str) -> tuple[dict, bytes]:
    """A safetensors file's JSON header (not yet checked) and the bytes after it; a clear error if it has none."""
    header, start = _header_of(data, what)
    return header, data[start:]


def _header_of(data: bytes, what: str) -> tuple[dict, int]:
    """A safetensors file's JSON header (not yet checked) and where its tensor bytes start."""
    if len(data) < 8:
        raise UsageError(f"{what}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise UsageError(f"{what}: not a safetensors file (header size {n} is out of bounds)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UsageError(f"{what}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise UsageError(f"{what}: not a safetensors file (header is not an object)")
    return header, 8 + n


_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


def _check_entries(header: dict, body: int, what: str) -> None:
    """Every tensor's dtype, shape and byte range checked against the file's size before any allocation."""
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise UsageError(f"{what}: tensor {name!r} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _SIZES:
            raise UsageError(f"{what}: tensor {name!r} has unsupported dtype {str(dtype)[:20]!r}")
        lists = isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
        if not lists or not all(type(x) is int and x >= 0 for x in (*shape, *offsets)):
            raise UsageError(f"{what}: tensor {name!r} has a malformed shape or data_offsets")
        size = _SIZES[dtype]
        for n in shape:
            size *= n
        if not offsets[0] <= offsets[1] <= body or offsets[1] - offsets[0] != size:
            raise UsageError(
                f"{what}: tensor {name!r} declares {size} bytes at {offsets}, beyond or unlike the {body} bytes stored"
            )


def load_tensors(data: bytes, what: str, numpy: bool = False) -> tuple[dict, dict[str, str]]:
    """Parse safetensors bytes after checking the header; a clear error for anything malformed.

    Declared sizes are compared with the bytes actually present before anything is allocated, so a file
    that claims huge tensors is refused without reading further. ``numpy``: read-only numpy arrays over
    ``data`` itself (no copy, no torch; bfloat16 comes as float32) instead of torch tensors.
    """
    header, start = _header_of(data, what)  # the tensor bytes are not copied
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UsageError(f"{what}: metadata must map strings to strings")
    _check_entries(header, len(data) - start, what)
    if numpy:
        view = memoryview(data)[start:]
        tensors = {
            k: array_from_bytes(view[e["data_offsets"][0] : e["data_offsets"][1]], e["dtype"], e["shape"])
            for k, e in header.items()
            if k != "__metadata__"
        }
        return tensors, meta
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise UsageError(f"{what}: corrupt safetensors file ({str(exc).splitlines()[0]})") from None
    return tensors, meta


def read_tensors(path: str | Path, names: set[str], what: str) -> tuple[dict, dict[str, str], dict]:
    """Only the tensors ``names`` of a safetensors file, its metadata and every tensor's header entry (checked
    as by :func:`load_tensors`), without reading the other tensors into memory: they are skipped, or from
    stdin (``-``) read through to its end and dropped."""
    if str(path) == "-":
        return _read_some(sys.stdin.buffer, None, names, what)
    p = Path(path)
    if not p.exists() or p.is_dir():
        raise UsageError(f"{what} {path}: no such file")
    with p.open("rb") as fh:
        return _read_some(fh, p.stat().st_size, names, what)


def _read_some(fh, size: int | None, names: set[str], what: str) -> tuple[dict, dict[str, str], dict]:
    first = _take(fh, 8)
    n = struct.unpack("<Q", first)[0] if len(first) == 8 else 0
    header, _ = split_header(first + _take(fh, n if n <= MAX_HEADER else 0), what)
    if size is not None:
        _check_entries(header, size - 8 - n, what)
    wanted = sorted((e["data_offsets"], k) for k, e in header.items() if k in names)
    sub: dict = {"__metadata__": header["__metadata__"]} if "__metadata__" in header else {}
    raws, at, out = [], 0, 0
    for (start, end), name in wanted:
        if start < at:
            raise UsageError(f"{what}: tensor {name!r} overlaps another")
        _skip(fh, start - at)
        raws.append(_take(fh, end - start))
        sub[name] = header[name] | {"data_offsets": [out, out + end - start]}
        at, out = end, out + end - start
    if size is None:  # a stream: read through to its end, and only then check the header against it
        _check_entries(header, at + _skip(fh, None), what)
    tensors, meta = load_tensors(join_header(sub, b"".join(raws)), what)
    return tensors, meta, {k: e for k, e in header.items() if k != "__metadata__"}


def _take(fh, n: int) -> bytes:
    """Up to ``n`` bytes, read in chunks (a huge declared size allocates nothing beyond what is there)."""
    parts = []
    while n > 0 and (chunk := fh.read(min(n, 1 << 20))):
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _skip(fh, n: int | None) -> int:
    """Pass over ``n`` bytes (all that is left: ``None``); how many there were."""
    if n is not None and fh.seekable():
        fh.seek(n, os.SEEK_CUR)
        return n
    done = 0
    while (n is None or done < n) and (chunk := fh.read(1 << 20 if n is None else min(n - done, 1 << 20))):
        done += len(chunk)
    return done


_NUMPY = {v: k.replace("bfloat16", "uint16") for k, v in _DTYPES.items()}  # safetensors -> numpy (bf16 as bits)


def array_from_bytes(raw, dtype: str, shape: list[int]) -> np.ndarray:
    """A safetensors tensor's bytes as a numpy array over them (bfloat16 widened, exactly, to float32)."""
    import numpy as np

    a = np.frombuffer(raw, _NUMPY[dtype]).reshape(shape)
    return (a.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else a


def array_to_bytes(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` cast to a safetensors dtype, as a contiguous array to write (bfloat16: round to nearest even,
    as torch does; NaN stays NaN)."""
    import numpy as np

    if dtype != "BF16":
        return np.ascontiguousarray(x, _NUMPY[dtype])
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    r = ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(u.view(np.float32)), np.uint16(0x7FC0), r)


@contextmanager
def new_folder(path: str | Path) -> Iterator[Path]:
    """Fill a temporary folder next to ``path``, renamed to ``path`` when the block succeeds (removed if not):
    no partial output. ``path`` must not exist yet (or be an empty folder)."""
    target = Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(f"output {path}: already exists; choose a new folder or remove it")
    if not target.resolve().parent.is_dir():
        raise UsageError(f"output {path}: folder {target.resolve().parent} does not exist")
    with partial_folder(target) as tmp:
        yield tmp
        if target.exists():
            target.rmdir()
        os.rename(tmp, target)


@contextmanager
def partial_folder(target: Path) -> Iterator[Path]:
    """A new temporary folder next to ``target`` (the umask's permissions), removed if the block fails. Ctrl-C
    and SIGTERM are held while it is made: one landing between its creation and the cleanup's reach would leave
    it behind."""
    import signal

    held = {signal.SIGINT, signal.SIGTERM}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held) if hasattr(signal, "pthread_sigmask") else None
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(dir=target.resolve().parent, prefix=f".{target.name}.", suffix=".partial"))
        if before is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
    except BaseException:
        if before is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process
        return True
    return True


class Spill:
    """Per-chunk tensors kept on disk between uses, in a temporary folder (``thoughtpatch-HOST-PID-*`` in the
    system temp dir) removed when the ``with`` block ends, also on errors and interrupts. Read back with plain
    reads, never mapped, so memory holds only what is in use, whatever the number of probes. A process killed
    outright (SIGKILL, out of memory) cannot clean up: the next spill on the same host removes the folders of
    processes no longer running."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> Spill:
        prefix = f"thoughtpatch-{platform.node()}-"
        for old in Path(tempfile.gettempdir()).glob(prefix + "*") if os.name == "posix" else []:
            pid = old.name[len(prefix) :].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        self._tmp = tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-")
        self.folder = Path(self._tmp.name)
        return self

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()

    def put(self, key: str, n: int, value: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        (self.folder / f"{key}-{n}").write_bytes(save({k: v.contiguous() for k, v in value.items()}))

    def get(self, key: str, n: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        return {k: v.to(self.device) for k, v in load((self.folder / f"{key}-{n}").read_bytes()).items()}
