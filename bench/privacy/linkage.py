"""Linkage attacks: which VIN is behind an app pseudonym (contract rule 15).

The adversary records `tsp/#`: VIN-keyed topics (`tsp/{vin}/...`) and app
topics under a pseudonym (`tsp/{ref}/avn/app/{app_id}`). It links a pseudonym
to a VIN

- by shared values: any header value of the app messages that also appears
  in one car's VIN-keyed egress, weighted by how rare it is across the fleet
  (a value every car has says nothing), and counters continued across the
  two: a car's AVN `header.seq` counter runs over its nav and app messages
  alike, so an app's seq values fill exactly the gaps of that car's nav
  seq values (what linked 53/53 cars against contract v1);
- by timing: app messages arriving within a second of one car's VIN-keyed
  messages, counted over the week (the gateway forwards at once; this is
  the documented limit, reported, not a target).

Both attacks see every car at once, so the run keeps a compact summary per
car (`CarLinkage`) instead of the recording. Truth (which ref is whose) is
taken from which car's feed produced it, for scoring only.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import defaultdict
from dataclasses import dataclass, field

from bench.privacy.driver import WireMessage
from telematics.v1 import common_pb2

# Header fields that are time, judged by the timing attack (coarsened on
# pseudonymized streams by rule 15 and shared by every car at that moment).
TIME_FIELDS = {"timestamp_ms"}
TIMING_WINDOW_S = 1.0


@dataclass
class CarLinkage:
    """What the attacks need of one car's recording."""

    vin: str
    refs: set[str] = field(default_factory=set)
    vin_values: set[tuple[str, int | str]] = field(default_factory=set)
    avn_seqs: list[int] = field(default_factory=list)  # VIN-keyed AVN streams
    vin_times: list[float] = field(default_factory=list)
    app_values: dict[str, set[tuple[str, int | str]]] = field(default_factory=dict)
    app_seqs: dict[str, list[int]] = field(default_factory=dict)
    app_times: dict[str, list[float]] = field(default_factory=dict)


def _header_values(payload: bytes) -> tuple[list[tuple[str, int | str]], int | None]:
    """(non-time header values, seq) of a message whose field 1 is its Header."""
    if payload[:1] != b"\x0a":
        return [], None
    length, start = 0, 1
    shift = 0
    while True:
        byte = payload[start]
        start += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
    header = common_pb2.Header.FromString(payload[start : start + length])
    values: list[tuple[str, int | str]] = []
    for descriptor, value in header.ListFields():
        if descriptor.name in TIME_FIELDS or descriptor.name == "vin":
            continue
        if isinstance(value, int | str) and value:
            values.append((descriptor.name, value))
    return values, (header.seq or None)


def summarize_car(vin: str, wire: list[WireMessage]) -> CarLinkage:
    car = CarLinkage(vin)
    for w in wire:
        parts = w.topic.split("/")
        if len(parts) < 3:
            continue
        owner, relative = parts[1], "/".join(parts[2:])
        values, seq = _header_values(w.payload)
        if owner == vin:
            car.vin_values.update(values)
            car.vin_times.append(w.t)
            if relative.startswith("avn/") and seq is not None:
                car.avn_seqs.append(seq)
        elif relative.startswith("avn/app/") and not relative.endswith("/erasure"):
            car.refs.add(owner)
            car.app_values.setdefault(owner, set()).update(values)
            car.app_times.setdefault(owner, []).append(w.t)
            if seq is not None:
                car.app_seqs.setdefault(owner, []).append(seq)
    car.vin_times.sort()
    car.avn_seqs.sort()
    return car


def _gaps(seqs: list[int]) -> set[int]:
    """Numbers missing from a car's own counter between its first and last
    value (bounded: a counter that jumps is not worth enumerating)."""
    if not seqs or seqs[-1] - seqs[0] > 1_000_000:
        return set()
    return set(range(seqs[0], seqs[-1] + 1)) - set(seqs)


def _claim(scores: dict[str, float], truth: str) -> tuple[bool, bool]:
    """(linked, correct): a link is claimed when one VIN scores highest, above 0."""
    ranked = heapq.nlargest(2, scores.items(), key=lambda kv: kv[1])
    if not ranked or ranked[0][1] <= 0 or (len(ranked) > 1 and ranked[1][1] == ranked[0][1]):
        return False, False
    return True, ranked[0][0] == truth


def link_by_values(cars: list[CarLinkage]) -> dict[str, float]:
    """Shared header values (rare ones count more) and counter continuation."""
    holders: dict[tuple[str, int | str], set[str]] = defaultdict(set)
    gap_holders: dict[int, set[str]] = defaultdict(set)
    for car in cars:
        for value in car.vin_values:
            holders[value].add(car.vin)
        for gap in _gaps(car.avn_seqs):
            gap_holders[gap].add(car.vin)
    fleet = max(1, len(cars))
    linked = correct = refs = 0
    for car in cars:
        for ref in car.refs:
            refs += 1
            scores: dict[str, float] = defaultdict(float)
            for value in car.app_values.get(ref, set()):
                owners = holders.get(value, set())
                if owners and len(owners) < fleet:
                    weight = math.log(fleet / len(owners))
                    for vin in owners:
                        scores[vin] += weight
            for seq in car.app_seqs.get(ref, []):
                for vin in gap_holders.get(seq, set()):
                    scores[vin] += 1.0
            claimed, right = _claim(scores, car.vin)
            linked += int(claimed)
            correct += int(right)
    return _rates(refs, linked, correct, fleet)


def link_by_timing(cars: list[CarLinkage], window_s: float = TIMING_WINDOW_S) -> dict[str, float]:
    """App messages arriving within `window_s` of a car's VIN-keyed messages."""
    buckets: dict[int, set[str]] = defaultdict(set)
    for car in cars:
        for t in car.vin_times:
            buckets[int(t // window_s)].add(car.vin)
    by_vin = {car.vin: car.vin_times for car in cars}
    linked = correct = refs = 0
    for car in cars:
        for ref in car.refs:
            refs += 1
            scores: dict[str, float] = defaultdict(float)
            for t in car.app_times.get(ref, []):
                bucket = int(t // window_s)
                candidates = buckets.get(bucket - 1, set()) | buckets.get(bucket, set())
                candidates |= buckets.get(bucket + 1, set())
                for vin in candidates:
                    times = by_vin[vin]
                    i = bisect.bisect_left(times, t - window_s)
                    if i < len(times) and times[i] <= t + window_s:
                        scores[vin] += 1
            claimed, right = _claim(scores, car.vin)
            linked += int(claimed)
            correct += int(right)
    return _rates(refs, linked, correct, max(1, len(cars)))


def _rates(refs: int, linked: int, correct: int, fleet: int) -> dict[str, float]:
    return {
        "pseudonyms": refs,
        "claimed": linked,
        "correct": correct,
        "rate": correct / refs if refs else float("nan"),
        "chance": 1 / fleet,
    }
