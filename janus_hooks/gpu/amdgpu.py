"""AMD's reset bug: the GPUs that do not come back from a VM without the out-of-tree vendor-reset module.

Polaris, Vega and Navi 10/12/14 cards cannot be reset by FLR or a bus reset once a guest's driver ran on
them: the next VM start (or the host driver taking the card back) finds it hung until the host reboots.
vendor-reset hooks the kernel's device-specific reset for exactly these device ids; on kernels >= 5.15 it is
only used when the device's ``reset_method`` names ``device_specific``. The ids below are the ones
vendor-reset itself supports (its device database), grouped by the family it resets them as.
"""

from __future__ import annotations

AMD_VENDOR = "0x1002"
# The module as /sys/module names it (loaded as "vendor-reset").
VENDOR_RESET_MODULE = "vendor_reset"
DEVICE_SPECIFIC = "device_specific"

_FAMILIES: dict[str, tuple[int, ...]] = {
    "Polaris 10": (0x67C0, 0x67C1, 0x67C2, 0x67C4, 0x67C7, 0x67C8, 0x67C9, 0x67CA, 0x67CC, 0x67CF, 0x67D0,
                   0x67DF, 0x6FDF),
    "Polaris 11": (0x67E0, 0x67E1, 0x67E3, 0x67E7, 0x67E8, 0x67E9, 0x67EB, 0x67EF, 0x67FF),
    "Polaris 12": (0x6980, 0x6981, 0x6985, 0x6986, 0x6987, 0x6995, 0x6997, 0x699F),
    "Vega 10": (0x6860, 0x6861, 0x6862, 0x6863, 0x6864, 0x6867, 0x6868, 0x6869, 0x686A, 0x686B, 0x686C,
                0x686D, 0x686E, 0x686F, 0x687F),
    # The Instinct MI100 (0x738c, Arcturus) is reset the way Vega 20 is.
    "Vega 20": (0x66A0, 0x66A1, 0x66A2, 0x66A3, 0x66A4, 0x66A7, 0x66AF, 0x738C),
    "Navi 10": (0x7310, 0x7312, 0x7318, 0x7319, 0x731A, 0x731B, 0x731E, 0x731F),
    "Navi 12": (0x7360, 0x7362),
    "Navi 14": (0x7340, 0x7341, 0x7347, 0x734F),
}
NEEDS_VENDOR_RESET: dict[int, str] = {device: family for family, ids in _FAMILIES.items() for device in ids}


def _hex(text: str) -> int | None:
    try:
        return int(text, 16)
    except ValueError:
        return None


def vendor_reset_family(vendor: str, device: str) -> str | None:
    """The family (``"Polaris 10"``) of an AMD GPU known to need vendor-reset, from sysfs's ``vendor`` and
    ``device`` ("0x1002", "0x67df"); None for every other device."""
    if _hex(vendor) != int(AMD_VENDOR, 16):
        return None
    device_id = _hex(device)
    return NEEDS_VENDOR_RESET.get(device_id) if device_id is not None else None
