"""plan, check and profile for a GPU with AMD's reset bug (tests/core/test_amd_reset.py has the switch itself)."""

from __future__ import annotations

import json
import tomllib
from functools import partial

from tests.conftest import domain_xml
from tests.fake import hosts

REFUSAL = (f"GPU {hosts.POLARIS_GPU} (Polaris 10) only resets with vendor-reset, which is not loaded: the desktop "
           "may not come back after the VM; load vendor-reset or set reset_risk = \"accept\" in the VM's profile")


def _xml(tmp_path):
    path = tmp_path / "win11.xml"
    path.write_text(domain_xml(hostdevs=hosts.POLARIS_FUNCTIONS))
    return str(path)


def test_plan_shows_the_reset_method_step(make_cli, tmp_path):
    c = make_cli(hosts.single_polaris)
    result = c("plan", "win11", "--xml", _xml(tmp_path))
    assert result.exit_code == 0, result.output
    assert f"  8. set the reset method of {hosts.POLARIS_GPU} to device_specific" in result.output.splitlines()
    step = json.loads(c("plan", "win11", "--xml", _xml(tmp_path), "--json").output)["actions"][7]
    assert step == {"description": f"set the reset method of {hosts.POLARIS_GPU} to device_specific",
                    "kind": "reset-method", "address": hosts.POLARIS_GPU, "method": "device_specific"}


def test_plan_and_check_show_the_refusal_without_vendor_reset(make_cli, tmp_path):
    c = make_cli(partial(hosts.single_polaris, vendor_reset=None))
    result = c("plan", "win11", "--xml", _xml(tmp_path))
    assert result.exit_code == 1
    assert result.output.strip() == f"VM 'win11' (single-gpu): the start would be refused: {REFUSAL}"
    gpu = json.loads(c("check", "--json").output)["gpus"][0]
    assert gpu["refusals"]["single-gpu"] == REFUSAL and gpu["refusals"]["passthrough"] != REFUSAL


def test_profile_records_the_accepted_risk_in_the_toml_and_plan_follows_it(make_cli, tmp_path):
    c = make_cli(partial(hosts.single_polaris, vendor_reset=None))
    result = c("profile", "win11", "--mode", "single-gpu", "--toml", "--reset-risk", "accept", "--yes")
    assert result.exit_code == 0, result.output
    path = c.root / "etc/janus-hooks/vms/win11.toml"
    assert tomllib.loads(path.read_text()) == {"mode": "single-gpu", "reset_risk": "accept"}
    plan = c("plan", "win11", "--xml", _xml(tmp_path))
    assert plan.exit_code == 0, plan.output
    assert "note: 0000:03:00.0 (Polaris 10) may stay hung after the VM: vendor-reset is not loaded; the VM's " \
           "profile accepts the risk" in plan.output
    back = c("profile", "win11", "--mode", "single-gpu", "--toml", "--reset-risk", "refuse", "--yes")
    assert back.exit_code == 0 and c("plan", "win11", "--xml", _xml(tmp_path)).exit_code == 1


def test_profile_reset_risk_needs_the_toml_profile(make_cli):
    c = make_cli(hosts.single_polaris)
    result = c("profile", "win11", "--mode", "single-gpu", "--reset-risk", "accept", "--yes")
    assert result.exit_code == 1 and "--reset-risk is recorded in the VM's TOML profile: add --toml" in result.stderr
