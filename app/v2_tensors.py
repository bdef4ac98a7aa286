"""Tensors of the Open Inference Protocol v2 (KServe / Triton HTTP), torch-free and pure:
JSON tensors, and Triton's binary-data extension (a JSON header of
`Inference-Header-Content-Length` bytes, then the raw tensors in order; tritonclient.http's
default). BYTES elements are 4-byte little-endian lengths, each followed by its bytes.

Hand-written: tritonclient is a client and has no server-side parser, and KServe's and
MLServer's pull in their whole servers."""

from __future__ import annotations

import json
import math
import struct
from typing import NamedTuple

import numpy as np

from app.errors import BadInput
from stages.tabular.serving import as_text

NUMERIC = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


# The request is not a valid v2 request: answered 422 (or 400 for broken framing). The app's
# one error type for bad input, under the name this module's readers know.
TensorError = BadInput


class Input(NamedTuple):
    """One input tensor as read: BYTES as a list of bytes, numbers as a 1-D numpy array."""

    datatype: str
    values: list | np.ndarray
    binary: bool = False  # sent in the binary tail (else as JSON `data`)


class NonFinite(str):
    """NaN, Infinity or -Infinity as read from JSON (not JSON, though Python writes them): kept
    as a marker, so that the error can name the input and row it was found in."""


def split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """(the JSON request, the binary tail)."""
    if header_length is None:
        head, tail = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise TensorError(
                f"Inference-Header-Content-Length {header_length!r} is not a length within the body",
                400,
            )
        head, tail = body[: int(header_length)], body[int(header_length) :]
    try:
        request = json.loads(head, parse_constant=NonFinite)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorError(f"the request is not JSON ({e})", 400) from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise TensorError("the request needs `inputs`: a list of tensors")
    return request, tail


def parameters_of(part: dict, where: str) -> dict:
    """A request's, an input's or an output's `parameters` (absent: {}); anything but an
    object is the client's mistake, named."""
    found = part.get("parameters")
    if found is None:
        return {}
    if not isinstance(found, dict):
        raise TensorError(f"{where}: `parameters` must be an object, not {type(found).__name__}")
    return found


def decode_bytes(raw: bytes, name: str) -> list[bytes]:
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise TensorError(f"input {name}: BYTES data ends inside an element's length")
        (n,) = struct.unpack_from("<I", raw, at)
        if at + 4 + n > len(raw):
            raise TensorError(f"input {name}: BYTES element longer than the data")
        out.append(raw[at + 4 : at + 4 + n])
        at += 4 + n
    return out


def encode_bytes(values) -> bytes:
    parts = []
    for v in values:
        b = v if isinstance(v, bytes) else str(v).encode()
        parts += [struct.pack("<I", len(b)), b]
    return b"".join(parts)


def _flat(data) -> list:
    if isinstance(data, list):
        return (
            [x for d in data for x in _flat(d)] if any(isinstance(d, list) for d in data) else data
        )
    return [data]


def read_inputs(request: dict, tail: bytes) -> dict[str, Input]:
    """{name: (datatype, values)}: BYTES as a list of bytes (JSON strings as UTF-8), numbers as
    a 1-D numpy array (JSON null → NaN, a missing value)."""
    out, at = {}, 0
    for t in request["inputs"]:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise TensorError("each input needs a `name`")
        name, dtype, shape = t["name"], t.get("datatype"), t.get("shape")
        if dtype != "BYTES" and dtype not in NUMERIC:
            raise TensorError(
                f"input {name}: datatype {dtype!r} is not one of BYTES, {', '.join(NUMERIC)}"
            )
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise TensorError(f"input {name}: `shape` must be a list of non-negative integers")
        size = parameters_of(t, f"input {name}").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or at + size > len(tail):
                raise TensorError(
                    f"input {name}: binary_data_size {size!r} runs past the body", 400
                )
            raw, at = tail[at : at + size], at + size
            if dtype == "BYTES":
                values = decode_bytes(raw, name)
            else:
                width = np.dtype(NUMERIC[dtype]).itemsize
                if len(raw) % width:
                    raise TensorError(
                        f"input {name}: {len(raw)} bytes are not whole {dtype} values"
                    )
                values = np.frombuffer(raw, dtype=np.dtype(NUMERIC[dtype]).newbyteorder("<"))
        elif "data" in t:
            values = _json_values(name, dtype, _flat(t["data"]))
        else:
            raise TensorError(f"input {name}: neither `data` nor parameters.binary_data_size")
        if len(values) != math.prod(shape):
            raise TensorError(
                f"input {name}: shape {shape} holds {math.prod(shape)} values, the data {len(values)}"
            )
        out[name] = Input(dtype, values, size is not None)
    return out


def _json_values(name: str, dtype: str, data: list):
    if dtype == "BYTES":
        # A JSON number in a BYTES tensor (a year-like or code-like column) is read as the CSV
        # reader would have read the cell: 1999 → "1999".
        data = [
            as_text(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
            for v in data
        ]
        if not all(isinstance(v, str) for v in data):
            raise TensorError(f"input {name}: BYTES data must be strings")
        return [v.encode() for v in data]
    for i, v in enumerate(data):
        if isinstance(v, NonFinite):
            raise TensorError(
                f"row {i + 1}, field {name}: {v} is not a number here; send null for a missing value"
            )
        if v is not None and (
            isinstance(v, bool) != (dtype == "BOOL") or not isinstance(v, int | float)
        ):
            raise TensorError(f"row {i + 1}, field {name}: {v!r} is not a {dtype} value")
    return np.array([math.nan if v is None else v for v in data], dtype=np.float64)


def output(
    name: str, datatype: str, values, shape: list[int], binary: bool, **parameters
) -> tuple[dict, bytes]:
    """(the output's JSON, its binary data or b"")."""
    tensor = {"name": name, "datatype": datatype, "shape": shape}
    if parameters:
        tensor["parameters"] = dict(parameters)
    if not binary:
        tensor["data"] = (
            [str(v) for v in values] if datatype == "BYTES" else np.asarray(values).ravel().tolist()
        )
        return tensor, b""
    raw = (
        encode_bytes(values)
        if datatype == "BYTES"
        else np.ascontiguousarray(
            values, dtype=np.dtype(NUMERIC[datatype]).newbyteorder("<")
        ).tobytes()
    )
    tensor["parameters"] = {**tensor.get("parameters", {}), "binary_data_size": len(raw)}
    return tensor, raw


def wanted_outputs(request: dict, names: list[str]) -> dict[str, bool]:
    """{output name: binary?} as the request asks (all outputs when it names none)."""
    default = bool(parameters_of(request, "the request").get("binary_data_output", False))
    asked = request.get("outputs")
    if not asked:
        return dict.fromkeys(names, default)
    if not isinstance(asked, list):
        raise TensorError("`outputs` must be a list of {name, parameters} objects")
    out = {}
    for o in asked:
        name = o.get("name") if isinstance(o, dict) else None
        if name not in names:
            raise TensorError(f"output {name!r} is not one of {', '.join(names)}")
        out[name] = bool(parameters_of(o, f"output {name}").get("binary_data", default))
    return out
