"""The pure-Python msgspec stand-in (telepresence.purestruct) against the real msgspec.

The traffic manager image ships the stand-in as ``msgspec``, so what it writes must be
byte for byte what msgspec writes, and what it reads must be read the same way. The
tunnel's code is exercised with the stand-in in a subprocess, where it is importable
under that name; its API is also tested here directly, next to msgspec's.

No ``from __future__ import annotations`` here: the models below are local classes whose
fields refer to each other, which only evaluated annotations allow.
"""

import ast
import contextlib
import enum
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest

from telepresence import purestruct
from telepresence.tunnel import messages

ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / "src" / "telepresence" / "purestruct"


@pytest.fixture(scope="module")
def shim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the stand-in as a top-level ``msgspec`` package, as the image
    bundler lays it out."""
    base = tmp_path_factory.mktemp("shim")
    shutil.copytree(SHIM, base / "msgspec", ignore=shutil.ignore_patterns("__pycache__"))
    return base


def shim_env(shim_dir: Path) -> dict[str, str]:
    paths = [shim_dir, ROOT / "src", ROOT / "devcluster" / "src"]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, paths))}


# --- the tunnel's control messages, in a process where msgspec is the stand-in --------

BIG = 70_000  # past every 16-bit length
CONTROL_VALUES: list[tuple[str, dict[str, Any]]] = [
    ("Arrive", {"name": "laptop", "install_id": "6c1f", "version": "0.1.0"}),
    ("Arrive", {"name": "", "install_id": "i" * 31, "version": "v" * 32, "protocol_max": 2}),
    ("Arrive", {"name": "é" * 200, "install_id": "x" * BIG, "version": "", "protocol_min": 0}),
    ("Arrive", {"name": "a", "install_id": "b", "version": "c", "protocol_max": 2**64 - 1}),
    ("Arrive", {"name": "a", "install_id": "b", "version": "c", "protocol_min": -(2**63)}),
    ("ArriveOk", {"session_id": "s", "manager_version": "0.1.0"}),
    ("ArriveOk", {"session_id": "s" * 255, "manager_version": "m" * 256, "protocol": 65536}),
    ("Remain", {"session_id": ""}),
    ("Remain", {"session_id": "\x00\u2028\U0001f600"}),
    ("Depart", {"session_id": "d" * BIG}),
    (
        "ClusterInfo",
        {"service_subnets": (), "pod_subnets": (), "cluster_domain": "", "dns_server_ip": ""},
    ),
    (
        "ClusterInfo",
        {
            "service_subnets": ("10.96.0.0/12", "fd00:10:96::/112"),
            "pod_subnets": tuple(f"10.{i}.0.0/16" for i in range(16)),
            "cluster_domain": "cluster.local",
            "dns_server_ip": "10.96.0.10",
        },
    ),
    (
        "ClusterInfo",
        {
            "service_subnets": ("s",) * BIG,
            "pod_subnets": ("p",) * 15,
            "cluster_domain": "c",
            "dns_server_ip": "d",
        },
    ),
    ("DnsLookup", {"request_id": 0, "qname": "kubernetes.default.", "qtype": 1}),
    ("DnsLookup", {"request_id": 2**32, "qname": "q" * 253, "qtype": 65535}),
    ("DnsLookup", {"request_id": -33, "qname": "", "qtype": 128}),
    ("DnsLookup", {"request_id": -(2**31) - 1, "qname": "x", "qtype": -32}),
    ("DnsAnswer", {"request_id": 7, "rcode": 2}),
    ("DnsAnswer", {"request_id": 2**16 - 1, "rcode": 0, "message": bytes(range(256))}),
    ("DnsAnswer", {"request_id": 1, "rcode": 0, "message": b"\xff" * 255}),
    ("DnsAnswer", {"request_id": 1, "rcode": 3, "message": b"\x00" * BIG}),
]

_enc = msgspec.msgpack.encode
_REMAIN = _enc({"type": "remain", "session_id": "s"})
_REMAIN_HEAD = b"\x83\xa4type\xa6remain\xaasession_id\xa1s"  # a third entry must follow
_SESSION = b"\x82\xa4type\xa6remain\xaasession_id"  # its value must follow
_LOOKUP = {"type": "dns-lookup", "request_id": 1, "qname": "q", "qtype": 1}
_INFO = {"type": "cluster-info", "pod_subnets": [], "cluster_domain": "", "dns_server_ip": ""}

# Inputs both implementations must treat alike: the same value, or the same error class.
EDGE_INPUTS: dict[str, bytes] = {
    "empty": b"",
    "trailing byte": _REMAIN + b"\xc0",
    "trailing value": _REMAIN + _REMAIN,
    "nil": _enc(None),
    "int": _enc(1),
    "string": _enc("remain"),
    "array": _enc([]),
    "no tag": _enc({"session_id": "s"}),
    "tag not a string": _enc({"type": 1, "session_id": "s"}),
    "unknown tag": _enc({"type": "nope", "session_id": "s"}),
    "missing field": _enc({"type": "remain"}),
    "missing fields": _enc({"type": "dns-answer"}),
    "unknown field": _enc({"type": "remain", "session_id": "s", "later": [1, {"a": b""}]}),
    "str for int": _enc({**_LOOKUP, "request_id": "1"}),
    "bool for int": _enc({**_LOOKUP, "qtype": True}),
    "float for int": _enc({**_LOOKUP, "qtype": 1.0}),
    "nil for str": _enc({**_LOOKUP, "qname": None}),
    "bytes for str": _enc({**_LOOKUP, "qname": b"q"}),
    "str for bytes": _enc({"type": "dns-answer", "request_id": 1, "rcode": 0, "message": "m"}),
    "str for tuple": _enc({**_INFO, "service_subnets": "10.0.0.0/8"}),
    "int in tuple": _enc({**_INFO, "service_subnets": ["10.0.0.0/8", 10]}),
    "map for tuple": _enc({**_INFO, "service_subnets": {}}),
    "invalid opcode": _SESSION + b"\xc1",
    "str longer than data": _SESSION + b"\xdb\xff\xff\xff\xff",
    "bin longer than data": _SESSION + b"\xc6\x00\x01\x00\x00",
    "nested 200 deep in an unknown field": _REMAIN_HEAD + b"\xa1x" + b"\x91" * 200 + b"\x01",
    # msgspec raises RecursionError and UnicodeDecodeError for these, which decode_control
    # reports as DecodeError, as the stand-in does (found by fuzz/targets/tunnel.py).
    "deeply nested arrays in an unknown field": _REMAIN_HEAD + b"\xa1x" + b"\x91" * 100_000,
    "invalid utf-8 in a value": _SESSION + b"\xa1\xff",
    "int key": b"\x83\x01\x02" + _REMAIN[1:],
    "array key": b"\x83\x91\x01\x02" + _REMAIN[1:],
}
for _name, _kwargs in CONTROL_VALUES[:2] + CONTROL_VALUES[10:12] + CONTROL_VALUES[18:20]:
    _raw = _enc(getattr(messages, _name)(**_kwargs))
    for _n in range(len(_raw)):
        EDGE_INPUTS[f"{_name} truncated to {_n}"] = _raw[:_n]

# Inputs both reject, though not with the same class: msgspec checks the type first and
# the stand-in parses first. An extension type is not supported at all by the stand-in.
BOTH_REJECT: dict[str, bytes] = {
    "deeply nested arrays": b"\x91" * 100_000 + b"\x01",
    "array claiming 2**32-1 items": b"\xdd\xff\xff\xff\xff",
    "ext for str": _SESSION + b"\xd4\x01\x00",
    "map key": b"\x83\x81\x01\x01\x02" + _REMAIN[1:],
}

# Inputs msgspec accepts, as it skips what it does not read; the stand-in must still
# raise a DecodeError.
STAND_IN_REJECTS: dict[str, bytes] = {
    "invalid utf-8 in an unknown key": b"\x83\xa1\xff\x01" + _REMAIN[1:],
}

CHILD = r"""
import ast, json, sys
import msgspec
from telepresence.k8s import api
from telepresence.manager import server  # the manager imports cleanly on the stand-in
from telepresence.tunnel import frames, messages, protocol

data = json.load(sys.stdin)
out = {"msgspec": msgspec.__file__, "encoded": [], "decoded": [], "outcomes": {}}
for name, kwargs, expected in data["values"]:
    value = getattr(messages, name)(**ast.literal_eval(kwargs))
    out["encoded"].append(messages.encode_control(value).hex())
    decoded = messages.decode_control(bytes.fromhex(expected))
    out["decoded"].append([decoded == value, repr(decoded)])
for label, raw in data["inputs"].items():
    try:
        outcome = repr(messages.decode_control(bytes.fromhex(raw)))
    except msgspec.ValidationError:
        outcome = "ValidationError"
    except msgspec.DecodeError:
        outcome = "DecodeError"
    except Exception as exc:
        outcome = f"unexpected {type(exc).__name__}: {exc}"
    out["outcomes"][label] = outcome

dial = frames.Dial(frames.IPProtocol.TCP, "10.0.0.1", 80)
event = protocol.StreamOpened(3, dial)
match event:
    case protocol.StreamOpened(stream_id, frames.Dial(protocol=proto)):
        matched = [stream_id, int(proto)]
try:
    event.stream_id = 4
    frozen = False
except AttributeError:
    frozen = True
out["events"] = [
    event == protocol.StreamOpened(3, dial),
    hash(event) == hash(protocol.StreamOpened(3, dial)),
    frozen,
    matched,
    repr(protocol.WindowUpdated(1, 2)),
]
out["api"] = [
    api._decode(b'{"kind": "Pod", "items": [1, 2.5, null]}'),
    api._decode(b"<html>no</html>"),
    api._decode(b"[1]"),
    api._encoder.encode({"a": [1, True, None, "\u00e9"]}).decode(),
]
json.dump(out, sys.stdout)
"""


def outcome(raw: bytes) -> str:
    try:
        return repr(messages.decode_control(raw))
    except msgspec.ValidationError:
        return "ValidationError"
    except msgspec.DecodeError:
        return "DecodeError"
    except Exception as exc:
        return f"unexpected {type(exc).__name__}"


def test_control_messages_match_msgspec(shim_dir: Path) -> None:
    values = [getattr(messages, name)(**kwargs) for name, kwargs in CONTROL_VALUES]
    expected = [messages.encode_control(value).hex() for value in values]
    inputs = {**EDGE_INPUTS, **BOTH_REJECT, **STAND_IN_REJECTS}
    request = {
        "values": [
            [name, repr(kwargs), hex_]
            for (name, kwargs), hex_ in zip(CONTROL_VALUES, expected, strict=True)
        ],
        "inputs": {label: raw.hex() for label, raw in inputs.items()},
    }
    child = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=json.dumps(request),
        env=shim_env(shim_dir),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout)
    assert out["msgspec"].startswith(str(shim_dir))

    for (name, _), want, got in zip(CONTROL_VALUES, expected, out["encoded"], strict=True):
        assert got == want, f"{name}: {got[:80]} != {want[:80]}"
    for value, (equal, text) in zip(values, out["decoded"], strict=True):
        assert equal
        assert text == repr(value)

    for label, raw in EDGE_INPUTS.items():
        assert out["outcomes"][label] == outcome(raw), label
    rejected = {"ValidationError", "DecodeError"}
    for label, raw in BOTH_REJECT.items():
        assert outcome(raw) in rejected, label
        assert out["outcomes"][label] in rejected, label
    for label in STAND_IN_REJECTS:
        assert out["outcomes"][label] == "DecodeError", label

    assert out["events"] == [True, True, True, [3, 6], "WindowUpdated(stream_id=1, window=2)"]
    assert out["api"] == [
        {"kind": "Pod", "items": [1, 2.5, None]},
        {"message": "<html>no</html>"},
        {"message": "[1]"},
        '{"a":[1,true,null,"\u00e9"]}',
    ]


SHIM_TESTS = [
    "tests/unit/test_tunnel_protocol.py",
    "tests/unit/test_tunnel_properties.py",
    "tests/unit/test_versions.py",
    "tests/unit/test_netfilter_protocol.py",
    "tests/unit/test_netfilter_journal.py",
]

RUN_TESTS = """
import sys
import msgspec
assert msgspec.__file__.startswith(sys.argv[1]), msgspec.__file__
import pytest
code = pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[2:]])
assert sys.modules["msgspec"] is msgspec
sys.exit(code)
"""


def test_tunnel_tests_pass_on_the_stand_in(shim_dir: Path) -> None:
    env = shim_env(shim_dir)
    probe = "import msgspec, sys; assert msgspec.__file__.startswith(sys.argv[1])"
    check = subprocess.run([sys.executable, "-c", probe, str(shim_dir)], env=env, cwd=ROOT)
    assert check.returncode == 0
    run = subprocess.run(
        [sys.executable, "-c", RUN_TESTS, str(shim_dir), *SHIM_TESTS],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) > 0, run.stdout[-2000:]
    assert "failed" not in run.stdout.splitlines()[-1]


# --- the API, next to msgspec's ----------------------------------------------------


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Code(enum.IntEnum):
    OK = 0
    BIG = 70_000


def models(lib: Any) -> Any:
    """The same models, built on either implementation."""

    class Point(lib.Struct, frozen=True):
        x: int
        y: int = 0

    # Empty mutable defaults are allowed, and copied for each instance.
    class Mutable(lib.Struct):
        items: list[str] = []  # noqa: RUF012
        counts: dict[str, int] = {}  # noqa: RUF012

    class Request(lib.Struct, frozen=True, kw_only=True, tag=True, forbid_unknown_fields=True):
        pass

    class Move(Request, frozen=True, kw_only=True):
        to: Point
        speed: float = 1.0
        path: tuple[Point, ...] = ()

    class Paint(Request, frozen=True, kw_only=True):
        color: Color
        code: Code = Code.OK
        shade: Literal["light", "dark"] | None = None
        raw: bytes = b""
        pair: tuple[int, str] = (0, "")
        meta: dict[str, Any] = {}  # noqa: RUF012

    class Named(lib.Struct, tag="named-thing", tag_field="kind"):
        name: str

    class Mixed(lib.Struct, kw_only=True):
        a: int

    class MixedChild(Mixed):
        b: int
        c: str = "c"

    return type(
        "Models",
        (),
        {c.__name__: c for c in (Point, Mutable, Request, Move, Paint, Named, Mixed, MixedChild)},
    )


REAL = models(msgspec)
OURS = models(purestruct)


def samples(m: Any) -> list[Any]:
    return [
        m.Point(1),
        m.Point(-(2**63), 2**64 - 1),
        m.Mutable(),
        m.Mutable(["a", "b" * 40], {"k": 300}),
        m.Move(to=m.Point(1, 2)),
        m.Move(to=m.Point(0), speed=2.5e-5, path=(m.Point(1), m.Point(2, 3))),
        m.Paint(color=Color.BLUE),
        m.Paint(
            color=Color.RED,
            code=Code.BIG,
            shade="dark",
            raw=bytes(range(256)),
            pair=(-1, "é"),
            meta={"a": [1, 2.0, None, True, {"b": "c"}]},
        ),
        m.Named("n"),
        m.MixedChild(2, a=1),
        [m.Point(1), {"p": m.Named("x")}, (Code.OK, Color.RED)],
    ]


def test_structs_encode_like_msgspec() -> None:
    for real, ours in zip(samples(REAL), samples(OURS), strict=True):
        assert purestruct.msgpack.encode(ours) == msgspec.msgpack.encode(real), real
        assert purestruct.json.encode(ours) == msgspec.json.encode(real), real
        assert repr(ours) == repr(real)


def test_structs_decode_what_msgspec_encodes() -> None:
    union = OURS.Move | OURS.Paint
    for value in samples(OURS)[4:8]:
        real = msgspec.json.decode(purestruct.json.encode(value), type=REAL.Move | REAL.Paint)
        assert msgspec.json.encode(real) == purestruct.json.encode(value)
        assert purestruct.msgpack.decode(msgspec.msgpack.encode(real), type=union) == value
        assert purestruct.json.decode(msgspec.json.encode(real), type=union) == value
        assert purestruct.json.decode(msgspec.json.encode(real).decode(), type=union) == value


def test_struct_fields_and_match_args_follow_msgspec() -> None:
    for name in ("Point", "Move", "Paint", "MixedChild"):
        real, ours = getattr(REAL, name), getattr(OURS, name)
        assert ours.__struct_fields__ == real.__struct_fields__
        assert ours.__match_args__ == real.__match_args__


SCALARS: list[Any] = [
    None,
    True,
    False,
    *(0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1),
    *(-1, -32, -33, -128, -129, -(2**15), -(2**15) - 1, -(2**31), -(2**31) - 1, -(2**63)),
    *(0.0, -0.0, 1.5, 1e16, 1e-5, 1.5e-5, 1e-7, 1e300, float("inf"), float("nan")),
    *("", "a" * 31, "a" * 32, "a" * 255, "a" * 256, "é" * 40_000, '\x00\x1f\x7f"\\/\u2028'),
    *(b"", b"x" * 255, b"x" * 256, b"x" * 70_000, bytearray(b"ab")),
    *([], [1] * 15, [1] * 16, [1] * 70_000, (1, "a"), {}, {str(i): i for i in range(16)}),
    {"k": {"nested": [None, [b"\x00"]]}},
    {1: "int key", Code.OK: "enum key"},
    Code.BIG,
    Color.RED,
]


@pytest.mark.parametrize("value", SCALARS, ids=lambda v: repr(v)[:30])
def test_values_encode_like_msgspec(value: Any) -> None:
    encoded = msgspec.msgpack.encode(value)
    assert purestruct.msgpack.encode(value) == encoded
    assert purestruct.json.encode(value) == msgspec.json.encode(value)
    assert repr(purestruct.msgpack.decode(encoded)) == repr(msgspec.msgpack.decode(encoded))


def test_floats_are_spelled_like_msgspec() -> None:
    rng = random.Random(7)
    for _ in range(20_000):
        f = rng.choice(
            [
                rng.random() * 10 ** rng.randint(-320, 308),
                -rng.random() * 10 ** rng.randint(-8, 20),
                float(rng.randint(-(10**20), 10**20)),
            ]
        )
        assert purestruct.json.encode(f) == msgspec.json.encode(f), repr(f)
        assert purestruct.msgpack.encode(f) == msgspec.msgpack.encode(f)


def test_frozen_structs_are_immutable_and_hashable() -> None:
    p = OURS.Point(1, 2)
    with pytest.raises(AttributeError):
        p.x = 3
    assert p == OURS.Point(1, 2) and p != OURS.Point(1) and p != REAL.Point(1, 2)
    assert hash(p) == hash(OURS.Point(1, 2))
    assert len({p, OURS.Point(1, 2), OURS.Point(2)}) == 2
    m = OURS.Mutable()
    m.items.append("a")
    assert OURS.Mutable().items == []  # empty defaults are per instance
    with pytest.raises(TypeError):
        hash(m)


def test_kw_only_and_tags() -> None:
    with pytest.raises(TypeError):
        OURS.Move(OURS.Point(1))
    assert OURS.Move.__struct_tag__ == "Move" and OURS.Paint.__struct_tag__ == "Paint"
    assert purestruct.json.encode(OURS.Named("n")) == b'{"kind":"named-thing","name":"n"}'
    match OURS.Point(5, 6):
        case OURS.Point(x, y):
            assert (x, y) == (5, 6)


def test_unknown_fields() -> None:
    raw = b'{"type":"Paint","color":"red","extra":1}'
    with pytest.raises(purestruct.ValidationError, match="unknown field `extra`"):
        purestruct.json.decode(raw, type=OURS.Paint)
    lenient = purestruct.json.decode(b'{"name":"n","extra":[1]}', type=OURS.Named)
    assert lenient == OURS.Named("n")


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b'{"type":"Move"}', "missing required field `to`"),
        (b'{"type":"Move","to":{"x":"1"}}', r"Expected `int`, got `str` - at `\$.to.x`"),
        (b'{"type":"Paint","color":"green"}', "Invalid enum value 'green'"),
        (b'{"type":"Paint","color":"red","code":1}', "Invalid enum value 1"),
        (b'{"type":"Paint","color":"red","shade":"grey"}', "shade"),
        (b'{"type":"Paint","color":"red","raw":"!!"}', "Invalid base64"),
        (b'{"type":"Paint","color":"red","pair":[1]}', "length 2"),
        (b'{"type":"Paint","color":"red","pair":[1,2]}', r"at `\$.pair\[1\]`"),
        (b'{"type":"Jump"}', "Invalid value 'Jump'"),
        (b"[]", "Expected `object`, got `array`"),
    ],
)
def test_validation_errors(raw: bytes, error: str) -> None:
    union = OURS.Move | OURS.Paint
    with pytest.raises(purestruct.ValidationError, match=error):
        purestruct.json.decode(raw, type=union)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(raw, type=REAL.Move | REAL.Paint)
    as_msgpack = purestruct.msgpack.encode(purestruct.json.decode(raw))
    with pytest.raises(purestruct.ValidationError):
        purestruct.msgpack.decode(as_msgpack, type=union)


def test_json_like_the_api_client() -> None:
    decoder = purestruct.json.Decoder(dict[str, Any])
    body = b'{"kind":"Status","code":404,"details":{"causes":[{"f":1.5e3}]},"ok":false}'
    assert decoder.decode(body) == msgspec.json.decode(body)
    assert decoder.decode(body.decode()) == msgspec.json.decode(body)
    with pytest.raises(purestruct.ValidationError):
        decoder.decode(b"[1, 2]")
    for garbage in [b"", b"<html>", b'{"a":1} x', b"NaN", b'{"a":Infinity}', b"\xff", b"[" * 10**5]:
        with pytest.raises(purestruct.DecodeError):
            decoder.decode(garbage)
        with pytest.raises(msgspec.DecodeError):
            msgspec.json.Decoder(dict[str, Any]).decode(garbage)
    encoder = purestruct.json.Encoder()
    patch = {"metadata": {"labels": {"a": "b"}}, "spec": [1, None, 2.5]}
    assert encoder.encode(patch) == msgspec.json.Encoder().encode(patch)


def test_unsupported_values_and_types() -> None:
    with pytest.raises(TypeError):
        purestruct.msgpack.encode(object())
    with pytest.raises(TypeError):
        purestruct.json.encode({1.5: "float key"})
    with pytest.raises(OverflowError):
        purestruct.msgpack.encode(2**64)
    with pytest.raises(TypeError):
        purestruct.msgpack.Decoder(set[int])


def test_hostile_msgpack_raises_decode_errors_only() -> None:
    """Random and mutated input: a value or a DecodeError, never anything else."""
    rng = random.Random(11)
    decoder = purestruct.msgpack.Decoder(OURS.Move | OURS.Paint)
    seeds = [purestruct.msgpack.encode(value) for value in samples(OURS)[4:8]]
    for _ in range(5_000):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        garbage = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
        for data in (bytes(raw), garbage, memoryview(raw)):
            for decode in (decoder.decode, purestruct.msgpack.decode):
                with contextlib.suppress(purestruct.DecodeError):
                    decode(data)


def test_the_package_imports_only_itself_and_the_standard_library() -> None:
    """It is copied into the image as ``msgspec``: no absolute import of itself, nothing
    outside the standard library."""
    for path in SHIM.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module and node.module.split(".")[0] in sys.stdlib_module_names
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] in sys.stdlib_module_names, path
