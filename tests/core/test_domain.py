"""Domain XML parsing: hostdevs, units, nodesets, profiles."""

from __future__ import annotations

import pytest

from janus_hooks.domain import parse_domain, parse_nodeset, to_kib
from janus_hooks.errors import ConfigError
from tests.conftest import domain_xml


def test_hostdevs_and_profile():
    spec = parse_domain(domain_xml(hostdevs=("0000:01:00.0", "0000:01:00.1"), managed="no"))
    assert [d.address for d in spec.hostdevs] == ["0000:01:00.0", "0000:01:00.1"]
    assert not spec.hostdevs[0].managed
    assert spec.mode == "single-gpu"
    assert spec.hugepages is None


def test_units():
    assert to_kib("4", "GiB") == 4 * 1024 * 1024
    assert to_kib("2048", None) == 2048
    assert to_kib("1", "G") == 1024 * 1024
    with pytest.raises(ConfigError, match="unknown memory unit 'parsecs'"):
        to_kib("1", "parsecs")


def test_nodesets():
    assert parse_nodeset("0") == [0]
    assert parse_nodeset("0-3,^2") == [0, 1, 3]
    assert parse_nodeset("1,3-4") == [1, 3, 4]


def test_hugepages_global_and_per_node():
    spec = parse_domain(domain_xml(hugepages=True, memory_mib=1024))
    assert spec.hugepages.per_node_kb == {None: 1024 * 1024}
    spec = parse_domain(domain_xml(hugepages=True, memory_mib=1024, nodeset="0-1"))
    assert spec.hugepages.per_node_kb == {0: 512 * 1024, 1: 512 * 1024}
    spec = parse_domain(domain_xml(hugepages=True, memory_mib=3072, cells=((0, 1024, "1"), (1, 2048, "0"))))
    assert spec.hugepages.per_node_kb == {1: 1024 * 1024, 0: 2048 * 1024}


def test_bad_mode_and_garbage():
    with pytest.raises(ConfigError, match="mode 'triple' is not one of"):
        parse_domain(domain_xml(mode="triple"))
    with pytest.raises(ConfigError, match="cannot be parsed"):
        parse_domain("<domain><name>x</name>")
    with pytest.raises(ConfigError, match="no <name>"):
        parse_domain("<domain/>")


def test_mode_none_is_unmanaged():
    assert parse_domain(domain_xml(mode="none")).mode is None
