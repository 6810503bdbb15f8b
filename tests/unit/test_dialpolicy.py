"""The manager's dial policy: defaults that keep it from being an open relay, and the
most-specific-prefix rule for the allow and deny lists."""

from __future__ import annotations

import pytest

from telepresence.manager.dialpolicy import DialPolicy, DialPolicyError, parse_networks

ALLOW = "TELEPRESENCE_DIAL_ALLOW"
DENY = "TELEPRESENCE_DIAL_DENY"


@pytest.mark.parametrize(
    ("allow", "deny", "address", "allowed"),
    [
        # Defaults: loopback, link-local and "this host" refused; the rest of the world not.
        ("", "", "127.0.0.1", False),
        ("", "", "127.255.0.9", False),
        ("", "", "::1", False),
        ("", "", "::", False),
        ("", "", "0.0.0.0", False),
        ("", "", "0.1.2.3", False),
        ("", "", "169.254.169.254", False),
        ("", "", "169.254.0.1", False),
        ("", "", "fe80::1", False),
        ("", "", "::ffff:127.0.0.1", False),  # IPv4-mapped: judged as the IPv4 address
        ("", "", "::ffff:169.254.169.254", False),
        ("", "", "10.96.0.1", True),
        ("", "", "192.168.1.1", True),
        ("", "", "8.8.8.8", True),
        ("", "", "fd00::1", True),
        ("", "", "::ffff:10.0.0.1", True),
        # An allow entry opens exactly what it names.
        ("169.254.169.254/32", "", "169.254.169.254", True),
        ("169.254.169.254", "", "169.254.169.254", True),  # a bare address is a host
        ("169.254.169.254/32", "", "169.254.169.253", False),
        ("169.254.169.254/32", "", "::ffff:169.254.169.254", True),
        # Same prefix as a default: the configured entry wins.
        ("169.254.0.0/16", "", "169.254.1.1", True),
        ("127.0.0.0/8", "", "127.0.0.1", True),
        # A broader allow does not open a more specific default.
        ("0.0.0.0/0", "", "127.0.0.1", False),
        ("0.0.0.0/0", "", "10.0.0.1", True),
        # A deny entry refuses more.
        ("", "10.0.5.0/24", "10.0.5.7", False),
        ("", "10.0.5.0/24", "10.0.6.7", True),
        ("", "fd00::/8", "fd00::1", False),
        # Most specific wins, whichever list it is in.
        ("10.0.5.7/32", "10.0.5.0/24", "10.0.5.7", True),
        ("10.0.5.7/32", "10.0.5.0/24", "10.0.5.8", False),
        ("10.0.0.0/8", "10.0.5.0/24", "10.0.5.7", False),
        ("10.0.0.0/8", "10.0.5.0/24", "10.1.0.1", True),
        ("169.254.169.254/32", "169.254.169.254/32", "169.254.169.254", False),  # tie: deny
        ("", "169.254.169.254/32", "169.254.169.254", False),
    ],
)
def test_verdicts(allow: str, deny: str, address: str, allowed: bool) -> None:
    policy = DialPolicy.from_env({ALLOW: allow, DENY: deny})
    verdict = policy.check(address)
    assert verdict.allowed is allowed
    assert bool(verdict.reason) is not allowed


@pytest.mark.parametrize(
    ("env", "address", "reason"),
    [
        (
            {},
            "169.254.169.254",
            "169.254.169.254 is link-local, where clouds serve instance metadata "
            "(allow it with TELEPRESENCE_DIAL_ALLOW)",
        ),
        (
            {},
            "127.0.0.1",
            "127.0.0.1 is the manager's own loopback (allow it with TELEPRESENCE_DIAL_ALLOW)",
        ),
        (
            {DENY: "10.0.5.0/24"},
            "10.0.5.7",
            "10.0.5.7 is in 10.0.5.0/24, listed in TELEPRESENCE_DIAL_DENY",
        ),
        ({}, "not-an-ip", "'not-an-ip' is not an IP address"),
    ],
)
def test_refusals_say_why_and_what_to_do(env: dict[str, str], address: str, reason: str) -> None:
    assert DialPolicy.from_env(env).check(address).reason == reason


def test_missing_variables_mean_the_defaults() -> None:
    policy = DialPolicy.from_env({})
    assert policy.allow == () and policy.deny == ()
    assert "169.254.0.0/16" in policy.describe()


def test_lists_parse_with_spaces_and_empty_items() -> None:
    nets = parse_networks(" 169.254.169.254/32, ,fd00::/8,10.0.0.1 ", variable=ALLOW)
    assert [str(n) for n in nets] == ["169.254.169.254/32", "fd00::/8", "10.0.0.1/32"]


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("10.0.0.5/8", "'10.0.0.5/8'"),  # host bits set: a typo would widen the rule
        ("169.254.169.254/33", "'169.254.169.254/33'"),
        ("metadata", "'metadata'"),
        ("10.0.0.0/8;10.1.0.0/16", "'10.0.0.0/8;10.1.0.0/16'"),
    ],
)
def test_a_bad_entry_is_one_line_naming_the_variable(value: str, quoted: str) -> None:
    with pytest.raises(DialPolicyError) as caught:
        DialPolicy.from_env({DENY: value})
    message = str(caught.value)
    assert message.startswith(f"TELEPRESENCE_DIAL_DENY: {quoted} is not a network")
    assert "comma-separated CIDRs" in message
    assert "\n" not in message
