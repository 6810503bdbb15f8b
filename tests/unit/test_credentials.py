"""Exec credential plugins, token files and the credential cache.

The decisions are pure and tested as such; the plugin runs as a real subprocess (a tiny
Python script) to check what it is given and how its failures read."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from telepresence.k8s.credentials import (
    CredentialError,
    CredentialSettings,
    ExecConfig,
    ExecCredential,
    ExecPlugin,
    TokenFile,
    exec_info,
    needs_refresh,
    parse_exec_credential,
    run_exec_plugin,
    token_file_stale,
)

V1 = "client.authentication.k8s.io/v1"
V1BETA1 = "client.authentication.k8s.io/v1beta1"


def answer(token: str = "t", *, api_version: str = V1, **status: object) -> bytes:
    return json.dumps(
        {"apiVersion": api_version, "kind": "ExecCredential", "status": {"token": token, **status}}
    ).encode()


# --- what the plugin is told --------------------------------------------------------------


def test_exec_info_names_the_plugins_api_version_and_is_never_interactive() -> None:
    info = json.loads(exec_info(ExecConfig(command="p", api_version=V1BETA1)))
    assert info == {"apiVersion": V1BETA1, "kind": "ExecCredential", "spec": {"interactive": False}}


def test_exec_info_carries_the_cluster_only_when_configured() -> None:
    cluster = json.dumps({"server": "https://k:6443", "config": {"audience": "a"}})
    info = json.loads(exec_info(ExecConfig(command="p", api_version=V1, cluster=cluster)))
    assert info["spec"] == {
        "interactive": False,
        "cluster": {"server": "https://k:6443", "config": {"audience": "a"}},
    }


# --- what its answer means ----------------------------------------------------------------

CONFIG = ExecConfig(command="aws", api_version=V1)


def test_a_token_with_an_expiry() -> None:
    cred = parse_exec_credential(
        answer("abc", expirationTimestamp="2030-01-01T00:00:00Z"), config=CONFIG, now=5.0
    )
    assert cred.token == "abc"
    assert cred.expires_at == 1893456000.0
    assert cred.obtained_at == 5.0
    assert cred.cert is None and cred.key is None
    assert "abc" not in repr(cred)


def test_a_client_certificate_needs_its_key() -> None:
    status = {"clientCertificateData": "CERT", "clientKeyData": "KEY"}
    cred = parse_exec_credential(answer("", **status), config=CONFIG, now=0)
    assert (cred.token, cred.cert, cred.key, cred.expires_at) == (None, b"CERT", b"KEY", None)
    with pytest.raises(CredentialError, match="without its key"):
        parse_exec_credential(answer("", clientCertificateData="C"), config=CONFIG, now=0)


@pytest.mark.parametrize(
    ("stdout", "message"),
    [
        (b"", "printed no ExecCredential JSON (its output was empty)"),
        (b"Please log in\n{", "printed no ExecCredential JSON: 'Please log in'"),
        (b"[1]", "JSON that is not an object"),
        (answer(api_version=V1BETA1), "answered with apiVersion 'client.authentication.k8s.io/v1b"),
        (json.dumps({"apiVersion": V1, "kind": "ExecCredential"}).encode(), "without status"),
        (answer(""), "neither a token nor a client certificate"),
        (
            answer(expirationTimestamp="tomorrow"),
            "expirationTimestamp 'tomorrow', which is not an RFC 3339",
        ),
    ],
)
def test_bad_answers_say_what_is_wrong_in_one_line(stdout: bytes, message: str) -> None:
    with pytest.raises(CredentialError) as info:
        parse_exec_credential(stdout, config=CONFIG, now=0)
    assert message in str(info.value)
    assert str(info.value).startswith("credential plugin aws ")
    assert "\n" not in str(info.value)


# --- when to ask again --------------------------------------------------------------------


def cred(*, at: float = 0.0, until: float | None) -> ExecCredential:
    return ExecCredential(token="t", expires_at=until, obtained_at=at)


def test_a_credential_without_expiry_is_kept_until_rejected() -> None:
    assert not needs_refresh(1e12, cred(until=None))


def test_a_credential_is_replaced_a_margin_before_it_expires() -> None:
    c = cred(at=0, until=3600)
    assert not needs_refresh(3589.9, c, margin=10)
    assert needs_refresh(3590, c, margin=10)
    assert needs_refresh(4000, c, margin=10)


def test_a_short_lived_credential_is_used_for_half_its_life() -> None:
    c = cred(at=100, until=108)  # eight seconds: a 10 s margin would discard it at once
    assert not needs_refresh(100, c, margin=10)
    assert not needs_refresh(103.9, c, margin=10)
    assert needs_refresh(104, c, margin=10)
    assert needs_refresh(100, cred(at=100, until=90), margin=10)  # born expired


# --- the cache ----------------------------------------------------------------------------


class FakePlugin:
    """Counts runs; each credential lives ``lifetime`` seconds of the fake clock."""

    def __init__(self, *, lifetime: float | None = 60.0, delay: float = 0.0) -> None:
        self.now = 1000.0
        self.runs = 0
        self.lifetime = lifetime
        self.delay = delay
        self.started = asyncio.Event()

    async def run(self, config: ExecConfig) -> ExecCredential:
        self.runs += 1
        self.started.set()
        await asyncio.sleep(self.delay)  # a slow plugin, not a wait for anything
        until = None if self.lifetime is None else self.now + self.lifetime
        return ExecCredential(token=f"token-{self.runs}", expires_at=until, obtained_at=self.now)


def plugin_with(fake: FakePlugin) -> ExecPlugin:
    return ExecPlugin(
        CONFIG, settings=CredentialSettings(expiry_margin=10), clock=lambda: fake.now, run=fake.run
    )


async def test_the_credential_is_cached_until_shortly_before_it_expires() -> None:
    fake = FakePlugin(lifetime=60)
    plugin = plugin_with(fake)
    first = await plugin.get()
    fake.now += 49
    assert await plugin.get() is first
    fake.now += 1  # 10 s left: the margin
    second = await plugin.get()
    assert second.token == "token-2"
    assert fake.runs == plugin.runs == 2


async def test_a_rejected_credential_is_replaced_once_however_many_saw_the_401() -> None:
    fake = FakePlugin(lifetime=None, delay=0.01)
    plugin = plugin_with(fake)
    first = await plugin.get()
    fresh = await asyncio.gather(*(plugin.get(rejected=first) for _ in range(5)))
    assert fake.runs == 2
    assert {c.token for c in fresh} == {"token-2"}
    # A 401 for a credential already replaced does not run the plugin again.
    assert (await plugin.get(rejected=first)).token == "token-2"
    assert fake.runs == 2


async def test_concurrent_first_uses_run_the_plugin_once() -> None:
    fake = FakePlugin(delay=0.05)
    plugin = plugin_with(fake)
    got = await asyncio.gather(*(plugin.get() for _ in range(4)))
    assert fake.runs == 1
    assert all(c is got[0] for c in got)


async def test_a_cancelled_run_leaves_the_cache_usable() -> None:
    fake = FakePlugin(delay=10)
    plugin = plugin_with(fake)
    task = asyncio.create_task(plugin.get(), name="plugin-get")
    await asyncio.wait_for(fake.started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    fake.delay = 0
    assert (await plugin.get()).token == "token-2"


# --- token files --------------------------------------------------------------------------


def test_token_file_staleness() -> None:
    stamp = (1, 2, 3, 4)
    assert token_file_stale(now=0, read_at=None, max_age=60, seen=None, current=stamp)
    assert not token_file_stale(now=59, read_at=0, max_age=60, seen=stamp, current=stamp)
    assert token_file_stale(now=60, read_at=0, max_age=60, seen=stamp, current=stamp)
    assert token_file_stale(now=1, read_at=0, max_age=60, seen=stamp, current=(1, 9, 3, 4))
    assert token_file_stale(now=1, read_at=0, max_age=60, seen=stamp, current=None)


def test_a_token_file_is_read_again_when_it_changes_or_ages(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first\n")
    now = [0.0]
    tokens = TokenFile(path, max_age=60, clock=lambda: now[0])
    assert tokens.read() == "first"
    assert tokens.read() == "first"
    assert tokens.reads == 1
    # A rotation as the kubelet does it: a new file renamed over the old one.
    (tmp_path / "new").write_text("second")
    (tmp_path / "new").rename(path)
    assert tokens.read() == "second"
    # Unchanged, it is still read again once a minute (a change the stat may miss).
    now[0] = 60
    assert tokens.read() == "second"
    assert tokens.reads == 3
    tokens.expire()
    tokens.read()
    assert tokens.reads == 4


def test_a_token_file_that_vanishes_keeps_the_last_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first")
    tokens = TokenFile(path, clock=lambda: 0.0)
    assert tokens.read() == "first"
    path.unlink()
    assert tokens.read() == "first"
    with pytest.raises(CredentialError, match=r"cannot read tokenFile .*missing"):
        TokenFile(tmp_path / "missing").read()


# --- the plugin as a process --------------------------------------------------------------

PLUGIN = """\
import json, os, sys, time
state = os.environ["PLUGIN_STATE"]
runs = len(os.listdir(state)) + 1
with open(os.path.join(state, f"run-{runs}.json"), "w") as f:
    json.dump({"info": os.environ.get("KUBERNETES_EXEC_INFO"), "argv": sys.argv[1:],
               "env": os.environ.get("PLUGIN_ENV"), "pid": os.getpid(),
               "stdin": sys.stdin.read()}, f)
mode = os.environ.get("PLUGIN_MODE", "ok")
if mode == "fail":
    sys.stderr.write("starting\\nexpired refresh token: run `cloud login`\\n")
    sys.exit(3)
if mode == "hang":
    sys.stderr.write("waiting for the browser\\n")
    sys.stderr.flush()
    time.sleep(60)
if mode == "junk":
    print("Please open https://login.example.com in your browser")
    sys.exit(0)
ttl = int(os.environ.get("PLUGIN_TTL", "3600"))
expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + ttl))
print(json.dumps({"apiVersion": os.environ.get("PLUGIN_API", "client.authentication.k8s.io/v1"),
                  "kind": "ExecCredential",
                  "status": {"token": f"token-{runs}", "expirationTimestamp": expiry}}))
"""


def write_plugin(folder: Path, name: str = "plugin") -> Path:
    """An executable credential plugin in ``folder``, keeping its runs in folder/state."""
    (folder / "state").mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!{sys.executable}\n" + PLUGIN)
    path.chmod(0o755)
    return path


def plugin_config(folder: Path, *, mode: str = "ok", **kw: object) -> ExecConfig:
    env = (("PLUGIN_STATE", str(folder / "state")), ("PLUGIN_MODE", mode), ("PLUGIN_ENV", "x"))
    fields: dict[str, object] = {
        "command": str(write_plugin(folder)),
        "api_version": V1,
        "env": env,
    }
    fields.update(kw)
    return ExecConfig(**fields)  # type: ignore[arg-type]


def runs(folder: Path) -> list[dict[str, object]]:
    state = folder / "state"
    return [
        json.loads((state / f"run-{i}.json").read_text())
        for i in range(1, 99)
        if (state / f"run-{i}.json").exists()
    ]


async def test_the_plugin_gets_exec_info_its_env_and_args_and_no_stdin(tmp_path: Path) -> None:
    config = plugin_config(tmp_path, args=("--region", "eu"))
    got = await run_exec_plugin(config, timeout=30)
    assert got.token == "token-1"
    assert got.expires_at is not None
    (run,) = runs(tmp_path)
    assert run["argv"] == ["--region", "eu"]
    assert run["env"] == "x"
    assert run["stdin"] == ""
    assert json.loads(str(run["info"])) == json.loads(exec_info(config))


async def test_a_failing_plugin_is_one_line_with_its_last_words(tmp_path: Path) -> None:
    config = plugin_config(tmp_path, mode="fail")
    with pytest.raises(CredentialError) as info:
        await run_exec_plugin(config, timeout=30)
    assert str(info.value) == (
        f"credential plugin {config.command} failed (exit status 3): expired refresh token: "
        "run `cloud login`"
    )


async def test_a_plugin_that_prints_no_credential_says_what_it_printed(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="printed no ExecCredential JSON: 'Please open"):
        await run_exec_plugin(plugin_config(tmp_path, mode="junk"), timeout=30)


async def test_a_missing_plugin_shows_the_install_hint_on_one_line() -> None:
    config = ExecConfig(
        command="tp-no-such-credential-plugin",
        api_version=V1,
        install_hint="tp-no-such-credential-plugin is needed.\n  Install it with:\n  brew x",
    )
    with pytest.raises(CredentialError) as info:
        await run_exec_plugin(config, timeout=30)
    assert str(info.value) == (
        "credential plugin tp-no-such-credential-plugin is not installed (not found on PATH): "
        "tp-no-such-credential-plugin is needed. Install it with: brew x"
    )
    config = ExecConfig(command="/nonexistent/bin/plugin", api_version=V1)
    with pytest.raises(CredentialError, match=r"\(not found\): install it, or fix users"):
        await run_exec_plugin(config, timeout=30)


async def test_a_silent_plugin_times_out_and_is_killed(tmp_path: Path) -> None:
    config = plugin_config(tmp_path, mode="hang")
    with pytest.raises(CredentialError) as info:
        await run_exec_plugin(config, timeout=2)
    assert str(info.value) == (
        f"credential plugin {config.command} gave no answer in 2 s (its last words: waiting "
        "for the browser): run it by hand (it may be waiting for a login) and connect again"
    )
    (run,) = runs(tmp_path)
    with pytest.raises(ProcessLookupError):
        os.kill(int(str(run["pid"])), 0)


async def test_the_real_plugin_is_cached_by_the_shell(tmp_path: Path) -> None:
    plugin = ExecPlugin(plugin_config(tmp_path))
    first = await plugin.get()
    assert await plugin.get() is first
    assert (await plugin.get(rejected=first)).token == "token-2"
    assert len(runs(tmp_path)) == 2
