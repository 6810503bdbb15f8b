"""devcluster's laptop DNS flavours: what each writes, and a clear refusal of a typo."""

from __future__ import annotations

import pytest

from devcluster import laptopdns


@pytest.mark.parametrize(
    ("flavour", "hosts"),
    [
        ("plain", "files dns"),
        ("resolved-stub", "files dns"),
        ("resolved-nss", "files resolve [!UNAVAIL=return] dns"),
    ],
)
def test_each_flavour_has_its_hosts_line(flavour: str, hosts: str) -> None:
    lines = laptopdns.nsswitch_text(flavour).splitlines()
    assert [line.split(None, 1)[1] for line in lines if line.startswith("hosts:")] == [hosts]
    # The users and groups still come from the files (tpuser, systemd-resolve).
    assert "passwd:         files" in lines


def test_an_unknown_flavour_names_the_choices() -> None:
    with pytest.raises(laptopdns.FlavourError, match="plain, resolved-stub, resolved-nss"):
        laptopdns.check_flavour("resolved")
    assert laptopdns.check_flavour("resolved-nss") == "resolved-nss"


def test_the_stub_resolv_conf_points_at_resolved_only() -> None:
    nameservers = [
        line.split()[1]
        for line in laptopdns.STUB_RESOLV_CONF.splitlines()
        if line.startswith("nameserver")
    ]
    assert nameservers == ["127.0.0.53"]
