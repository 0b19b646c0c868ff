"""Safe file I/O shared by every format: atomic writes, stdin/stdout (``-``), safetensors only.

Nothing here unpickles: files are read with ``safetensors`` after the header has been checked.
"""

from __future__ import annotations

import json
import os
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
    "array_from_bytes",
    "array_to_bytes",
    "Spill",
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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    import torch

    header: dict[str, object] = {"__metadata__": {k: metadata[k] for k in sorted(metadata)}} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": _DTYPES[str(t.dtype).removeprefix("torch.")],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    return join_header(header, b"".join(blobs))


def join_header(header: dict, body: bytes) -> bytes:
    """Safetensors bytes: the JSON header (sorted keys, padded to 8 bytes) and the tensor bytes it describes."""
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + body


def split_header(data: bytes, what: str) -> tuple[dict, bytes]:
    """A safetensors file's JSON header (not yet checked) and the bytes after it; a clear error if it has none."""
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
    return header, data[8 + n :]


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
    header, body = split_header(data, what)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UsageError(f"{what}: metadata must map strings to strings")
    _check_entries(header, len(body), what)
    if numpy:
        view = memoryview(data)[len(data) - len(body) :]
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
    tmp = Path(tempfile.mkdtemp(dir=target.resolve().parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        if target.exists():
            target.rmdir()
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Spill:
    """Per-chunk tensors kept on disk between uses, in a temporary folder (``thoughtpatch-*`` in the system
    temp dir) removed when the ``with`` block ends, also on errors and interrupts. Read back with plain reads,
    never mapped, so memory holds only what is in use, whatever the number of probes."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> Spill:
        self._tmp = tempfile.TemporaryDirectory(prefix="thoughtpatch-")
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
