"""Struct, the error classes, and the type-directed conversion shared by both formats.

Decoding is two steps: the format module parses bytes into plain Python values (dict,
list, str, bytes, int, float, bool, None), then a converter compiled from the target
type checks those values and builds Structs, tuples and enums out of them.
"""

from __future__ import annotations

import binascii
import copy
import dataclasses
import enum
import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Literal, Union

Converter = Callable[[Any], Any]

MAX_DEPTH = 256
"""Deepest nesting of arrays and maps a decoder accepts, so hostile input cannot exhaust
the interpreter's stack."""


class MsgspecError(Exception):
    """Base of every error raised on purpose by this package."""


class EncodeError(MsgspecError):
    pass


class DecodeError(MsgspecError):
    """Malformed input (ValidationError, a subclass, for well-formed but mistyped input)."""


class ValidationError(DecodeError):
    pass


class Mismatch(Exception):
    """A value does not fit its type; ``path`` is filled in while unwinding."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.path = [path] if path else []

    def to_error(self) -> ValidationError:
        if not self.path:
            return ValidationError(self.message)
        return ValidationError(f"{self.message} - at `${''.join(reversed(self.path))}`")


@typing.dataclass_transform()
class Struct:
    """Base of typed records; configure subclasses with class keywords, as in
    ``class Ping(Struct, frozen=True, tag="ping")``. Instances are dataclasses."""

    __struct_fields__: ClassVar[tuple[str, ...]] = ()
    __struct_tag_field__: ClassVar[str | None] = None
    __struct_tag__: ClassVar[str | None] = None
    _ps_frozen: ClassVar[bool] = False
    _ps_tag: ClassVar[bool | str | None] = None
    _ps_forbid_unknown: ClassVar[bool] = False

    def __init_subclass__(
        cls,
        *,
        frozen: bool | None = None,
        tag: bool | str | None = None,
        tag_field: str | None = None,
        kw_only: bool = False,
        forbid_unknown_fields: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        # Every setting but kw_only is inherited; tag=True names each subclass anew.
        if frozen is not None:
            cls._ps_frozen = frozen
        if tag_field is not None:
            cls.__struct_tag_field__ = tag_field
            if tag is None and cls._ps_tag is None:
                tag = True
        if tag is not None:
            cls._ps_tag = tag
        if forbid_unknown_fields is not None:
            cls._ps_forbid_unknown = forbid_unknown_fields
        spec = cls._ps_tag
        if spec is None or spec is False:
            cls.__struct_tag__ = None
        else:
            cls.__struct_tag__ = cls.__name__ if spec is True else str(spec)
            cls.__struct_tag_field__ = cls.__struct_tag_field__ or "type"
        # An empty list, dict or set default is copied for each instance.
        for name, annotation in inspect.get_annotations(cls).items():
            value = cls.__dict__.get(name)
            if "ClassVar" in str(annotation):
                continue
            if name in cls.__dict__ and type(value).__hash__ is None:
                factory = functools.partial(copy.copy, value)
                setattr(cls, name, dataclasses.field(default_factory=factory))
        dataclasses.dataclass(cls, repr=False, eq=True, frozen=cls._ps_frozen, kw_only=kw_only)
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        positional = [f.name for f in fields if not f.kw_only]
        cls.__struct_fields__ = tuple(positional + [f.name for f in fields if f.kw_only])

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__struct_fields__)
        return f"{type(self).__name__}({args})"


_KINDS: dict[type, str] = {
    type(None): "null",
    bool: "bool",
    int: "int",
    float: "float",
    str: "str",
    bytes: "bytes",
    list: "array",
    tuple: "array",
    dict: "object",
}


def kind(value: object) -> str:
    """How a decoded value is named in error messages."""
    return _KINDS.get(type(value), type(value).__name__)


def _expected(name: str, value: object) -> Mismatch:
    return Mismatch(f"Expected `{name}`, got `{kind(value)}`")


def _exact(tp: type, name: str) -> Converter:
    def convert(value: Any) -> Any:
        if type(value) is not tp:
            raise _expected(name, value)
        return value

    return convert


def _identity(value: Any) -> Any:
    return value


def _to_float(value: Any) -> Any:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise _expected("float", value)


def _base64(value: Any) -> Any:
    if type(value) is not str:
        raise _expected("str", value)
    try:
        return binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
    except (ValueError, binascii.Error):
        raise Mismatch("Invalid base64 encoded string") from None


def _enum(tp: type[enum.Enum]) -> Converter:
    members = tp._value2member_map_

    def convert(value: Any) -> Any:
        if type(value) not in (int, str):
            raise _expected("int" if issubclass(tp, int) else "str", value)
        member = members.get(value)
        if member is None or type(member.value) is not type(value):
            raise Mismatch(f"Invalid enum value {value!r}")
        return member

    return convert


def _literal(values: tuple[Any, ...]) -> Converter:
    def convert(value: Any) -> Any:
        for allowed in values:
            if type(allowed) is type(value) and allowed == value:
                return value
        raise Mismatch(f"Invalid enum value {value!r}")

    return convert


def _array(
    items: list[Converter], variadic: bool, make: type[list[Any]] | type[tuple[Any, ...]]
) -> Converter:
    """``variadic``: every item is converted by ``items[0]``; else one converter each."""

    def convert(value: Any) -> Any:
        if type(value) is not list:
            raise _expected("array", value)
        if not variadic and len(value) != len(items):
            raise Mismatch(f"Expected `array` of length {len(items)}, got {len(value)}")
        out = []
        for index, element in enumerate(value):
            try:
                out.append(items[0 if variadic else index](element))
            except Mismatch as exc:
                exc.path.append(f"[{index}]")
                raise
        return out if make is list else tuple(out)

    return convert


def _mapping(key: Converter, item: Converter) -> Converter:
    def convert(value: Any) -> Any:
        if type(value) is not dict:
            raise _expected("object", value)
        out = {}
        for k, v in value.items():
            try:
                out[key(k)] = item(v)
            except Mismatch as exc:
                exc.path.append("[...]")
                raise
        return out

    return convert


class _Plan:
    """What decoding one Struct class needs, built once per class and format."""

    def __init__(self, cls: type[Struct]) -> None:
        self.cls = cls
        self.converters: dict[str, Converter] = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        self.required = [
            name
            for name in cls.__struct_fields__
            if fields[name].default is dataclasses.MISSING
            and fields[name].default_factory is dataclasses.MISSING
        ]
        self.tag = cls.__struct_tag__
        self.tag_field = cls.__struct_tag_field__
        self.forbid = cls._ps_forbid_unknown


_PLANS: dict[tuple[type[Struct], bool], _Plan] = {}


def _plan(cls: type[Struct], json: bool) -> _Plan:
    plan = _PLANS.get((cls, json))
    if plan is None:
        # Cached before its fields are compiled, so a Struct may refer to itself.
        plan = _PLANS[cls, json] = _Plan(cls)
        try:
            hints = typing.get_type_hints(cls)
            for name in cls.__struct_fields__:
                plan.converters[name] = compile_type(hints[name], json)
        except BaseException:
            del _PLANS[cls, json]
            raise
    return plan


def _check_tag(plan: _Plan, value: Any) -> None:
    if type(value) is not str:
        raise Mismatch(f"Expected `str`, got `{kind(value)}`", f".{plan.tag_field}")
    if value != plan.tag:
        raise Mismatch(f"Invalid value {value!r}", f".{plan.tag_field}")


def _struct(cls: type[Struct], json: bool) -> Converter:
    plan = _plan(cls, json)

    def convert(value: Any) -> Any:
        if type(value) is not dict:
            raise _expected("object", value)
        converters = plan.converters
        kwargs = {}
        for key, item in value.items():
            if type(key) is not str:
                raise Mismatch(f"Expected `str`, got `{kind(key)}` for an object key")
            converter = converters.get(key)
            if converter is not None:
                try:
                    kwargs[key] = converter(item)
                except Mismatch as exc:
                    exc.path.append(f".{key}")
                    raise
            elif plan.tag is not None and key == plan.tag_field:
                _check_tag(plan, item)
            elif plan.forbid:
                raise Mismatch(f"Object contains unknown field `{key}`")
        for name in plan.required:
            if name not in kwargs:
                raise Mismatch(f"Object missing required field `{name}`")
        return plan.cls(**kwargs)

    return convert


def _union(members: tuple[Any, ...], json: bool) -> Converter:
    structs = [m for m in members if isinstance(m, type) and issubclass(m, Struct)]
    others = [m for m in members if m not in structs]
    # float also takes ints, so it is tried after int.
    others.sort(key=lambda m: m is float)
    converters = [compile_type(m, json) for m in others]
    names = " | ".join(dict.fromkeys(kind_name(m) for m in members))
    by_tag: dict[str, Converter] = {}
    tag_field = None
    untagged = None
    if len(structs) == 1 and structs[0].__struct_tag__ is None:
        untagged = compile_type(structs[0], json)
    elif structs:
        tag_fields = {s.__struct_tag_field__ for s in structs}
        if len(tag_fields) != 1 or any(s.__struct_tag__ is None for s in structs):
            raise TypeError(f"Structs in a union must be tagged alike: {members!r}")
        tag_field = tag_fields.pop()
        by_tag = {str(s.__struct_tag__): compile_type(s, json) for s in structs}

    def convert(value: Any) -> Any:
        if structs and type(value) is dict:
            if untagged is not None:
                return untagged(value)
            if tag_field not in value:
                raise Mismatch(f"Object missing required field `{tag_field}`")
            tag = value[tag_field]
            if type(tag) is not str:
                raise Mismatch(f"Expected `str`, got `{kind(tag)}`", f".{tag_field}")
            if tag not in by_tag:
                raise Mismatch(f"Invalid value {tag!r}", f".{tag_field}")
            return by_tag[tag](value)
        for converter in converters:
            try:
                return converter(value)
            except Mismatch:
                continue
        raise Mismatch(f"Expected `{names}`, got `{kind(value)}`")

    return convert


def kind_name(tp: Any) -> str:
    """How a type is named in error messages."""
    if isinstance(tp, type) and issubclass(tp, Struct):
        return "object"
    return _KINDS.get(type(None) if tp is None else tp, getattr(tp, "__name__", repr(tp)))


_SCALARS: dict[Any, Converter] = {
    Any: _identity,
    object: _identity,
    None: _exact(type(None), "null"),
    type(None): _exact(type(None), "null"),
    bool: _exact(bool, "bool"),
    int: _exact(int, "int"),
    float: _to_float,
    str: _exact(str, "str"),
}


def compile_type(tp: Any, json: bool) -> Converter:
    """The converter for ``tp``; ``json`` makes bytes travel as base64 strings.
    Raises TypeError for a type this package does not support."""
    if tp is bytes:
        return _base64 if json else _exact(bytes, "bytes")
    try:
        scalar = _SCALARS.get(tp)
    except TypeError:  # an unhashable annotation
        scalar = None
    if scalar is not None:
        return scalar
    if isinstance(tp, type) and issubclass(tp, Struct):
        return _struct(tp, json)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum(tp)
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        return _union(args, json)
    if origin is Literal:
        return _literal(args)
    if origin is list or origin is tuple:
        variadic = origin is list or not args or (len(args) == 2 and args[1] is Ellipsis)
        items = [compile_type(a, json) for a in (args[:1] if variadic else args) or [Any]]
        return _array(items, variadic, origin)
    if origin is dict:
        key, value = args if args else (Any, Any)
        return _mapping(compile_type(key, json), compile_type(value, json))
    raise TypeError(f"Type {tp!r} is not supported")


def convert_top(converter: Converter, value: Any) -> Any:
    try:
        return converter(value)
    except Mismatch as exc:
        raise exc.to_error() from None
