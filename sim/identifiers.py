"""Realistic personal identifiers for simulated cars (all synthetic, from a seeded RNG)."""

from __future__ import annotations

import random


def luhn_digit(digits: str) -> str:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 0:  # doubled: the check digit will sit to the right of this one
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return str((10 - total % 10) % 10)


def make_imsi(rng: random.Random) -> str:
    """German mobile network (MCC 262) subscriber identity: 15 digits."""
    mnc = rng.choice(("01", "02", "03", "07"))
    return "262" + mnc + "".join(rng.choice("0123456789") for _ in range(10))


def make_iccid(rng: random.Random) -> str:
    """SIM serial: 89 (telecom) 49 (Germany), issuer, account, Luhn check digit; 20 digits."""
    body = (
        "8949"
        + rng.choice(("22", "11", "02"))
        + "".join(rng.choice("0123456789") for _ in range(13))
    )
    return body + luhn_digit(body)


def make_ipv4(rng: random.Random) -> str:
    first = rng.choice((37, 46, 77, 80, 89, 92, 109, 176, 188))
    return f"{first}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


def make_ipv6(rng: random.Random) -> str:
    """A mobile-carrier style global unicast address, fully written out (no ::)."""
    prefix = rng.choice(("2a01:598", "2a02:3030", "2a00:20", "2001:db8"))
    rest = [f"{rng.randint(1, 0xFFFF):x}" for _ in range(8 - len(prefix.split(":")))]
    return ":".join([*prefix.split(":"), *rest])


def make_bluetooth_mac(rng: random.Random) -> str:
    """A phone's Bluetooth address; some phones report it lower-case (the gateway upper-cases)."""
    oui = rng.choice(("A4:C3:F0", "F0:99:B6", "3C:28:6D", "DC:A6:32", "8C:85:90"))
    mac = oui + ":" + ":".join(f"{rng.randint(0, 255):02X}" for _ in range(3))
    return mac.lower() if rng.random() < 0.3 else mac


def make_evse_id(rng: random.Random, operator: str) -> str:
    """EVSE id in the eMI3 format, e.g. DE*ION*E123456*1."""
    return f"DE*{operator}*E{rng.randint(100000, 999999)}*{rng.randint(1, 4)}"


def make_token(rng: random.Random, length: int = 16) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(length))


def make_uuid(rng: random.Random) -> str:
    hexes = make_token(rng, 32)
    return f"{hexes[:8]}-{hexes[8:12]}-4{hexes[13:16]}-a{hexes[17:20]}-{hexes[20:]}"
