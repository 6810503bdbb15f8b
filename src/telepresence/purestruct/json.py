"""Compact JSON encoding and typed decoding, as msgspec writes and reads it.

Parsing is the standard library's; encoding is done here, as msgspec formats floats and
bytes its own way and encodes Structs and enums.
"""

from __future__ import annotations

import base64
import enum
import json
from json.encoder import encode_basestring
from typing import Any, Generic, TypeVar, cast

from ._core import DecodeError, Struct, compile_type, convert_top

T = TypeVar("T")
# Subclasses of these (other than enums) are encoded as these.
_BASES: tuple[type[Any], ...] = (int, str, float, bytes, tuple, list, dict)


def _float(f: float) -> str:
    """msgspec's spelling: no ``+`` or leading zeros in exponents, which it uses below 1e-5
    (not 1e-4) and from 1e16 on, and ``null`` for NaN and infinities."""
    if f != f or f in (float("inf"), float("-inf")):
        return "null"
    text = repr(f)
    mantissa, e, exponent = text.partition("e")
    if not e:
        return text
    power = int(exponent)
    if power == -5:
        sign, digits = ("-", mantissa[1:]) if mantissa[0] == "-" else ("", mantissa)
        return f"{sign}0.0000{digits.replace('.', '')}"
    return f"{mantissa}e{power}"


def _key(key: Any) -> str:
    if type(key) is str:
        return encode_basestring(key)
    if isinstance(key, enum.Enum):
        return _key(key.value)
    if isinstance(key, int) and not isinstance(key, bool):
        return f'"{int(key)}"'
    if isinstance(key, str):
        return encode_basestring(str(key))
    raise TypeError(f"Only dicts with str or int keys are supported, not {type(key).__name__}")


def _write(obj: Any, out: list[str]) -> None:
    t = type(obj)
    if t is str:
        out.append(encode_basestring(obj))
    elif t is int:
        out.append(int.__repr__(obj))
    elif obj is None:
        out.append("null")
    elif t is bool:
        out.append("true" if obj else "false")
    elif t is float:
        out.append(_float(obj))
    elif t is list or t is tuple:
        out.append("[")
        for index, item in enumerate(obj):
            if index:
                out.append(",")
            _write(item, out)
        out.append("]")
    elif t is dict:
        out.append("{")
        for index, (key, value) in enumerate(obj.items()):
            out.append(f",{_key(key)}:" if index else f"{_key(key)}:")
            _write(value, out)
        out.append("}")
    elif isinstance(obj, Struct):
        out.append("{")
        if obj.__struct_tag__ is not None:
            out.append(f"{_key(obj.__struct_tag_field__)}:{encode_basestring(obj.__struct_tag__)}")
        for index, name in enumerate(obj.__struct_fields__):
            comma = "," if index or obj.__struct_tag__ is not None else ""
            out.append(f"{comma}{_key(name)}:")
            _write(getattr(obj, name), out)
        out.append("}")
    elif t is bytes or t is bytearray or t is memoryview:
        out.append(f'"{base64.b64encode(obj).decode("ascii")}"')
    elif isinstance(obj, enum.Enum):
        _write(obj.value, out)
    else:
        for base in _BASES:
            if isinstance(obj, base):
                _write(base(obj), out)
                return
        raise TypeError(f"Encoding objects of type {t.__name__} is unsupported")


class Encoder:
    def encode(self, obj: Any) -> bytes:
        out: list[str] = []
        _write(obj, out)
        return "".join(out).encode("utf-8")


def encode(obj: Any) -> bytes:
    return Encoder().encode(obj)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


def parse(buf: bytes | bytearray | memoryview | str) -> Any:
    """The untyped value in ``buf`` (UTF-8 when binary), as lists, dicts and scalars."""
    try:
        text = buf if type(buf) is str else bytes(cast(bytes, buf)).decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite)
    except RecursionError:
        raise DecodeError("JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DecodeError(f"JSON is malformed: {exc}") from None


class Decoder(Generic[T]):
    def __init__(self, type: Any = Any) -> None:
        self.type = type
        self._convert = compile_type(type, json=True)

    def decode(self, buf: bytes | bytearray | memoryview | str) -> T:
        return cast(T, convert_top(self._convert, parse(buf)))


def decode(buf: bytes | bytearray | memoryview | str, *, type: Any = Any) -> Any:
    return Decoder[Any](type).decode(buf)
