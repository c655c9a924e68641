"""safetensors files read and written one tensor (or one row of a stacked tensor) at a time.

Reads are plain file reads into a fresh buffer (no mmap, so nothing lingers in the resident set);
`TensorFileWriter` lays the header out up front from the expected shapes and then fills each slot in any
order, so a converter never holds more than the tensor it is writing. Used by the Flux converter (flux.py),
its model check (flux_verify.py) and its export (flux.export_transformer).
"""
import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from tools.convert_weights import common

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def read_header(path: str) -> tuple[dict, int]:
    """{key: {'dtype', 'shape', 'data_offsets'}} and the byte offset where tensor data starts."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: safetensors file not found") from None
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a safetensors file ({err})") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (key, array) in file order, reading each tensor with one plain read."""
    header, start = read_header(path)
    with open(path, "rb") as f:
        for key, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in DTYPES:
                raise ValueError(f"{path}: {key} has dtype {entry['dtype']}; expected one of {sorted(DTYPES)}")
            f.seek(start + begin)
            buffer = bytearray(end - begin)
            f.readinto(buffer)
            yield key, np.frombuffer(buffer, DTYPES[entry["dtype"]]).reshape(entry["shape"])


def iter_files(files: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """`iter_tensors` over several files (the shards of one model), one after the other."""
    for path in files:
        yield from iter_tensors(path)


def read_rows(path: str):
    """key, index -> that row (or the whole tensor when index is None) of a safetensors file, read on demand."""
    header, start = read_header(path)

    def read(key: str, index: int | None):
        entry = header[key]
        dtype, shape = np.dtype(DTYPES[entry["dtype"]]), tuple(entry["shape"])
        offset = start + entry["data_offsets"][0]
        if index is not None:
            offset += index * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            shape = shape[1:]
        with open(path, "rb") as f:
            f.seek(offset)
            buffer = bytearray(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
            f.readinto(buffer)
        return np.frombuffer(buffer, dtype).reshape(shape)

    return read, header


class TensorFileWriter:
    """A safetensors file written slot by slot: the header (from expected shapes) first, then any order.

    `write(key, array, index)` fills row `index` of a stacked tensor (or the whole
    tensor when index is None); `close()` checks every row of every tensor arrived.
    """

    def __init__(self, path: str, shapes: Mapping[str, tuple[int, ...]], dtype, metadata=None):
        self.path, self.dtype = path, np.dtype(dtype)
        self.shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        header, offset, self.offsets = {}, 0, {}
        for key in sorted(self.shapes):
            size = int(np.prod(self.shapes[key], dtype=np.int64)) * self.dtype.itemsize
            header[key] = {"dtype": CODES[self.dtype], "shape": list(self.shapes[key]),
                           "data_offsets": [offset, offset + size]}
            self.offsets[key] = offset
            offset += size
        if metadata:
            header["__metadata__"] = dict(metadata)
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.data_start = 8 + len(blob)
        self.pending = {k: set(range(s[0])) if s else {None} for k, s in self.shapes.items()}
        self.stacked: set[str] = set()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)
        self.file.truncate(self.data_start + offset)

    def write(self, key: str, array: np.ndarray, index: int | None = None) -> None:
        shape = self.shapes[key]
        if index is None:
            if tuple(array.shape) != shape:
                raise ValueError(f"{self.path}: {key} got shape {array.shape}, expected {shape}")
            self.file.seek(self.data_start + self.offsets[key])
            self.pending[key] = set()
        else:
            if tuple(array.shape) != shape[1:] or not 0 <= index < shape[0]:
                raise ValueError(f"{self.path}: {key}[{index}] got shape {array.shape}, expected {shape[1:]} "
                                 f"with index < {shape[0]}")
            row = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
            self.file.seek(self.data_start + self.offsets[key] + index * row)
            self.pending[key].discard(index)
        self.file.write(np.ascontiguousarray(array, dtype=self.dtype).tobytes())

    def close(self) -> None:
        self.file.close()
        unwritten = sorted(f"{k}[{sorted(v)}]" for k, v in self.pending.items() if v)
        if unwritten:
            raise common.ConversionError(f"{self.path}: tensors never written: {unwritten}")

    def abort(self) -> None:
        self.file.close()
        os.remove(self.path)
