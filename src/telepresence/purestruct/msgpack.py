"""MessagePack encoding and typed decoding, byte for byte as msgspec writes it."""

from __future__ import annotations

import enum
import struct
from typing import Any, Generic, TypeVar, cast

from ._core import MAX_DEPTH, DecodeError, Struct, compile_type, convert_top

T = TypeVar("T")
# Subclasses of these (other than enums) are encoded as these.
_BASES: tuple[type[Any], ...] = (int, str, float, bytes, tuple, list, dict)

_U8 = struct.Struct(">BB")
_U16 = struct.Struct(">BH")
_U32 = struct.Struct(">BI")
_U64 = struct.Struct(">BQ")
_I8 = struct.Struct(">Bb")
_I16 = struct.Struct(">Bh")
_I32 = struct.Struct(">Bi")
_I64 = struct.Struct(">Bq")
_F64 = struct.Struct(">Bd")


def _pack_int(n: int, out: bytearray) -> None:
    if 0 <= n < 0x80 or -32 <= n < 0:
        out.append(n & 0xFF)
    elif n >= 0:
        if n < 1 << 8:
            out += _U8.pack(0xCC, n)
        elif n < 1 << 16:
            out += _U16.pack(0xCD, n)
        elif n < 1 << 32:
            out += _U32.pack(0xCE, n)
        elif n < 1 << 64:
            out += _U64.pack(0xCF, n)
        else:
            raise OverflowError("can't serialize ints < -2**63 or > 2**64 - 1")
    elif n >= -(1 << 7):
        out += _I8.pack(0xD0, n)
    elif n >= -(1 << 15):
        out += _I16.pack(0xD1, n)
    elif n >= -(1 << 31):
        out += _I32.pack(0xD2, n)
    elif n >= -(1 << 63):
        out += _I64.pack(0xD3, n)
    else:
        raise OverflowError("can't serialize ints < -2**63 or > 2**64 - 1")


def _pack_len(n: int, fix: int, fix_limit: int, ops: tuple[int, int, int], out: bytearray) -> None:
    """A length: in the opcode itself below ``fix_limit``, else after the opcode for 8
    (when the type has one: str and bin), 16 or 32 bits."""
    if n < fix_limit:
        out.append(fix | n)
    elif ops[0] and n < 1 << 8:
        out += _U8.pack(ops[0], n)
    elif n < 1 << 16:
        out += _U16.pack(ops[1], n)
    elif n < 1 << 32:
        out += _U32.pack(ops[2], n)
    else:
        raise ValueError("can't serialize objects of 2**32 items or bytes or more")


_STR = (0xD9, 0xDA, 0xDB)
_BIN = (0xC4, 0xC5, 0xC6)
_ARRAY = (0, 0xDC, 0xDD)
_MAP = (0, 0xDE, 0xDF)


def _pack_str(s: str, out: bytearray) -> None:
    data = s.encode("utf-8")
    _pack_len(len(data), 0xA0, 32, _STR, out)
    out += data


def _pack(obj: Any, out: bytearray) -> None:
    t = type(obj)
    if t is str:
        _pack_str(obj, out)
    elif t is int:
        _pack_int(obj, out)
    elif obj is None:
        out.append(0xC0)
    elif t is bool:
        out.append(0xC3 if obj else 0xC2)
    elif t is float:
        out += _F64.pack(0xCB, obj)
    elif t is bytes or t is bytearray or t is memoryview:
        data = memoryview(obj).cast("B")
        _pack_len(data.nbytes, 0, 0, _BIN, out)
        out += data
    elif t is list or t is tuple:
        _pack_len(len(obj), 0x90, 16, _ARRAY, out)
        for item in obj:
            _pack(item, out)
    elif t is dict:
        _pack_len(len(obj), 0x80, 16, _MAP, out)
        for key, value in obj.items():
            _pack(key, out)
            _pack(value, out)
    elif isinstance(obj, Struct):
        names = obj.__struct_fields__
        tag = obj.__struct_tag__
        _pack_len(len(names) + (tag is not None), 0x80, 16, _MAP, out)
        if tag is not None:
            _pack_str(cast(str, obj.__struct_tag_field__), out)
            _pack_str(tag, out)
        for name in names:
            _pack_str(name, out)
            _pack(getattr(obj, name), out)
    elif isinstance(obj, enum.Enum):
        _pack(obj.value, out)
    else:
        for base in _BASES:
            if isinstance(obj, base):
                _pack(base(obj), out)
                return
        raise TypeError(f"Encoding objects of type {t.__name__} is unsupported")


class Encoder:
    def encode(self, obj: Any) -> bytes:
        out = bytearray()
        _pack(obj, out)
        return bytes(out)


def encode(obj: Any) -> bytes:
    return Encoder().encode(obj)


# --- decoding ------------------------------------------------------------------------

# Opcode -> layout of the fixed-width scalars.
_SCALARS: dict[int, struct.Struct] = {
    0xCA: struct.Struct(">f"),
    0xCB: struct.Struct(">d"),
    0xCC: struct.Struct(">B"),
    0xCD: struct.Struct(">H"),
    0xCE: struct.Struct(">I"),
    0xCF: struct.Struct(">Q"),
    0xD0: struct.Struct(">b"),
    0xD1: struct.Struct(">h"),
    0xD2: struct.Struct(">i"),
    0xD3: struct.Struct(">q"),
}
# Opcode -> (what follows, width of its length).
_SIZED: dict[int, tuple[str, struct.Struct]] = {
    0xC4: ("bin", _SCALARS[0xCC]),
    0xC5: ("bin", _SCALARS[0xCD]),
    0xC6: ("bin", _SCALARS[0xCE]),
    0xD9: ("str", _SCALARS[0xCC]),
    0xDA: ("str", _SCALARS[0xCD]),
    0xDB: ("str", _SCALARS[0xCE]),
    0xDC: ("array", _SCALARS[0xCD]),
    0xDD: ("array", _SCALARS[0xCE]),
    0xDE: ("map", _SCALARS[0xCD]),
    0xDF: ("map", _SCALARS[0xCE]),
}


def _truncated() -> DecodeError:
    return DecodeError("Input data was truncated")


def _unpack(data: bytes, pos: int, depth: int, key: bool) -> tuple[Any, int]:
    """The value at ``pos`` and the position after it. ``key``: the value is a map key,
    where arrays become tuples (as msgspec does) so they can be hashed."""
    if pos >= len(data):
        raise _truncated()
    op = data[pos]
    pos += 1
    if op < 0x80:
        return op, pos
    if op >= 0xE0:
        return op - 0x100, pos
    if op >= 0xA0 and op < 0xC0:
        what, n = "str", op & 0x1F
    elif op < 0x90:
        what, n = "map", op & 0x0F
    elif op < 0xA0:
        what, n = "array", op & 0x0F
    elif op == 0xC0:
        return None, pos
    elif op == 0xC2 or op == 0xC3:
        return op == 0xC3, pos
    elif op in _SCALARS:
        fmt = _SCALARS[op]
        if pos + fmt.size > len(data):
            raise _truncated()
        return fmt.unpack_from(data, pos)[0], pos + fmt.size
    elif op in _SIZED:
        what, fmt = _SIZED[op]
        if pos + fmt.size > len(data):
            raise _truncated()
        n = fmt.unpack_from(data, pos)[0]
        pos += fmt.size
    elif op == 0xC1:
        raise DecodeError(f"MessagePack data is malformed: invalid opcode {op:#x} (byte {pos})")
    else:
        raise DecodeError(f"MessagePack extension types are not supported (byte {pos - 1})")
    if what == "str" or what == "bin":
        end = pos + n
        if end > len(data):
            raise _truncated()
        if what == "bin":
            return data[pos:end], end
        try:
            return data[pos:end].decode("utf-8"), end
        except UnicodeDecodeError:
            raise DecodeError(
                f"MessagePack data is malformed: invalid utf-8 (byte {pos})"
            ) from None
    if depth >= MAX_DEPTH:
        raise DecodeError(f"MessagePack data is nested deeper than {MAX_DEPTH} levels")
    if what == "array":
        items = []
        for _ in range(n):  # each item takes a byte at least: the loop ends with the data
            item, pos = _unpack(data, pos, depth + 1, key)
            items.append(item)
        return (tuple(items) if key else items), pos
    if key:
        raise DecodeError("MessagePack map keys that are maps are not supported")
    mapping = {}
    for _ in range(n):
        k, pos = _unpack(data, pos, depth + 1, True)
        mapping[k], pos = _unpack(data, pos, depth + 1, False)
    return mapping, pos


def parse(buf: bytes | bytearray | memoryview) -> Any:
    """The untyped value in ``buf``, which must hold exactly one."""
    data = buf if type(buf) is bytes else bytes(buf)
    value, end = _unpack(data, 0, 0, False)
    if end != len(data):
        raise DecodeError(f"MessagePack data is malformed: trailing characters (byte {end})")
    return value


class Decoder(Generic[T]):
    def __init__(self, type: Any = Any) -> None:
        self.type = type
        self._convert = compile_type(type, json=False)

    def decode(self, buf: bytes | bytearray | memoryview) -> T:
        return cast(T, convert_top(self._convert, parse(buf)))


def decode(buf: bytes | bytearray | memoryview, *, type: Any = Any) -> Any:
    return Decoder[Any](type).decode(buf)
