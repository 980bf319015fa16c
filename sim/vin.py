"""Vehicle identification numbers (ISO 3779 / North American check digit)."""

from __future__ import annotations

import random

# ISO 3779 excludes I, O and Q: they are too easy to confuse with 1 and 0.
VIN_ALPHABET = "0123456789ABCDEFGHJKLMNPRSTUVWXYZ"
_TRANSLITERATION: dict[str, int] = {
    **{str(digit): digit for digit in range(10)},
    **dict(zip("ABCDEFGH", range(1, 9), strict=True)),
    **dict(zip("JKLMN", range(1, 6), strict=True)),
    "P": 7,
    "R": 9,
    **dict(zip("STUVWXYZ", range(2, 10), strict=True)),
}
_WEIGHTS = (8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2)
# World manufacturer identifiers of European makers, for realistic-looking VINs.
_WMIS = ("WVW", "WBA", "WBY", "W1K", "WAU", "VF1", "VF3", "YV1", "ZFA", "TMB", "VSS", "SAL")
# Model year codes (position 10) for 2022..2026; U, Z and 0 are never used there.
_MODEL_YEARS = "NPRST"


def check_digit(vin: str) -> str:
    """The check digit (position 9) that makes `vin` valid, ignoring its current value."""
    if len(vin) != 17:
        raise ValueError(f"VIN must have 17 characters, got {len(vin)}")
    total = sum(_TRANSLITERATION[char] * weight for char, weight in zip(vin, _WEIGHTS, strict=True))
    remainder = total % 11
    return "X" if remainder == 10 else str(remainder)


def is_valid_vin(vin: str) -> bool:
    if len(vin) != 17 or any(char not in VIN_ALPHABET for char in vin):
        return False
    return vin[8] == check_digit(vin)


def make_vin(rng: random.Random, serial: int) -> str:
    """A valid VIN whose last six characters encode `serial`, so distinct serials never collide."""
    if not 0 <= serial < 1_000_000:
        raise ValueError("serial must fit in six digits")
    wmi = rng.choice(_WMIS)
    descriptor = "".join(rng.choice(VIN_ALPHABET) for _ in range(5))
    year = rng.choice(_MODEL_YEARS)
    plant = rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ")
    draft = f"{wmi}{descriptor}0{year}{plant}{serial:06d}"
    return draft[:8] + check_digit(draft) + draft[9:]


def make_fleet_vins(rng: random.Random, count: int, *, first_serial: int = 100_000) -> list[str]:
    return [make_vin(rng, first_serial + index) for index in range(count)]
