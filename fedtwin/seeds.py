"""One way to derive a seed from the names of what it is for."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """A 32-bit seed from ``parts`` (run seed, hospital name, round, ...): the same parts
    give the same seed on every machine and Python version, other parts an unrelated one.

    The one exception is ``fedtwin.data.hospital_seed``, which fixes the simulated
    hospitals' holdouts with NumPy's ``SeedSequence`` and stays so: changing it would move
    every holdout and every published figure with it."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")
