"""What crosses the boundary between the trusted checker and the submission's worker: data, never code.

A value is encoded to JSON. Plain JSON carries None, bool, int, float (NaN and infinities included), str and
list; everything else is a one-key object naming its kind:

    {"$tuple": [...]}                                   a tuple
    {"$dict": [[key, value], ...]}                      a dict (any encodable keys, order kept)
    {"$tensor": {"dtype": "float32", "shape": [2, 3], "data": "<base64 of the raw bytes>"}}
    {"$handle": 7}                                      an object that stays in the worker (see `client`)

Decoding builds only exact built-in types and plain `torch.Tensor`s from raw bytes (`torch.frombuffer`), so
nothing a worker sends can run code on load or carry its own `__eq__`: unlike pickle, a hostile message can
at worst be malformed, and then `decode` raises `WireError`. Messages are framed with an 8-byte length and
refused above `MAX_MESSAGE_BYTES`.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
from collections.abc import Callable
from typing import Any

import torch

MAX_MESSAGE_BYTES = 64 * 2**20  # a few training runs' parameters fit easily; more is an attack or a bug
MAX_DEPTH = 64  # of nested containers: deeper is an attack on the decoder's recursion
_HEADER = struct.Struct("!Q")
DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
        torch.float16, torch.bfloat16, torch.float32, torch.float64,
    )
}  # fmt: skip


class WireError(ValueError):
    """A message that is not well-formed data: the wrong frame, JSON, tag, dtype or size."""


class NotData(TypeError):
    """A value that cannot cross the boundary (a function, a custom object, a tensor subclass, ...)."""


class Handle(int):
    """The id of an object kept in the worker; encodes as {"$handle": id}. Only the trusted side makes them."""


# ------------------------------------------------------------------------------------------------- encoding
def encode(value: Any, depth: int = 0) -> Any:
    """`value` as JSON-ready data; NotData (naming the type and where it sits) for anything else."""
    if depth > MAX_DEPTH:
        raise NotData(f"nested deeper than {MAX_DEPTH} levels")
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is Handle:
        return {"$handle": int(value)}
    if kind is list:
        return [encode(item, depth + 1) for item in value]
    if kind is tuple:
        return {"$tuple": [encode(item, depth + 1) for item in value]}
    if kind is dict:
        return {"$dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is torch.Tensor:
        return {"$tensor": _encode_tensor(value)}
    raise NotData(f"an object of type {kind.__module__}.{kind.__qualname__}")


def _encode_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise NotData(f"a tensor of dtype {tensor.dtype} (allowed: {', '.join(DTYPES)})")
    if tensor.layout != torch.strided:
        raise NotData(f"a tensor with layout {tensor.layout} (only dense tensors cross)")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return {"dtype": dtype, "shape": list(tensor.shape), "data": base64.b64encode(raw).decode()}


# ------------------------------------------------------------------------------------------------- decoding
def decode(data: Any, resolve: Callable[[int], Any] | None = None, depth: int = 0) -> Any:
    """Data from `encode` back to values; `resolve(id)` turns a {"$handle": id} into an object."""
    if depth > MAX_DEPTH:
        raise WireError(f"nested deeper than {MAX_DEPTH} levels")
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is list:
        return [decode(item, resolve, depth + 1) for item in data]
    if kind is not dict or len(data) != 1:
        raise WireError(f"expected a value or a one-key tagged object, got {_describe(data)}")
    ((tag, body),) = data.items()
    if tag == "$tuple" and type(body) is list:
        return tuple(decode(item, resolve, depth + 1) for item in body)
    if tag == "$dict" and type(body) is list:
        pairs = []
        for pair in body:
            if type(pair) is not list or len(pair) != 2:
                raise WireError("a $dict entry must be a [key, value] pair")
            pairs.append((decode(pair[0], resolve, depth + 1), decode(pair[1], resolve, depth + 1)))
        try:
            return dict(pairs)
        except TypeError as error:  # an unhashable key
            raise WireError(f"a $dict key is not hashable: {error}") from None
    if tag == "$tensor" and type(body) is dict:
        return _decode_tensor(body)
    if tag == "$handle" and type(body) is int and resolve is not None:
        return resolve(body)
    raise WireError(f"unknown tag {tag[:40]!r}")


def _decode_tensor(body: dict[str, Any]) -> torch.Tensor:
    dtype, shape, text = body.get("dtype"), body.get("shape"), body.get("data")
    if dtype not in DTYPES or type(shape) is not list or type(text) is not str:
        raise WireError("a $tensor needs a known dtype, a shape list and base64 data")
    if not all(type(size) is int and size >= 0 for size in shape):
        raise WireError(f"a $tensor shape must hold non-negative ints, got {shape[:8]}")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise WireError("a $tensor's data is not base64") from None
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    numel = 1
    for size in shape:
        numel *= size
    if len(raw) != numel * itemsize:
        raise WireError(f"a {dtype} tensor of shape {shape} needs {numel * itemsize} bytes, got {len(raw)}")
    if numel == 0:
        return torch.empty(shape, dtype=DTYPES[dtype])
    return torch.frombuffer(bytearray(raw), dtype=DTYPES[dtype]).reshape(shape)


def _describe(data: Any) -> str:
    return f"an object with keys {sorted(data)[:3]}" if isinstance(data, dict) else type(data).__name__


# -------------------------------------------------------------------------------------------------- framing
def send(sock: socket.socket, message: dict[str, Any]) -> None:
    """Write one message (a dict of JSON-ready data) as a length-prefixed frame."""
    payload = json.dumps(message, separators=(",", ":")).encode()
    if len(payload) > MAX_MESSAGE_BYTES:
        raise NotData(f"a message of {len(payload)} bytes (the limit is {MAX_MESSAGE_BYTES})")
    sock.sendall(_HEADER.pack(len(payload)) + payload)


def receive(sock: socket.socket) -> dict[str, Any]:
    """Read one frame (blocking; set a timeout on `sock` to bound the wait). EOFError when the peer is gone."""
    (size,) = _HEADER.unpack(_read_exactly(sock, _HEADER.size))
    if size > MAX_MESSAGE_BYTES:
        raise WireError(f"a frame of {size} bytes announced (the limit is {MAX_MESSAGE_BYTES})")
    try:
        message = json.loads(_read_exactly(sock, size))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise WireError("a frame that is not JSON") from None
    if type(message) is not dict:
        raise WireError(f"a frame must hold a JSON object, got {type(message).__name__}")
    return message


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 2**20))
        if not chunk:
            raise EOFError("the other side closed the channel")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
