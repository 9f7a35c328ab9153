"""Load profiles (conf/loadtest/*.toml) as user counts over time: pure, no Locust, no gevent.

A profile is one of two kinds:

* ``kind = "day"``: a 24-hour day compressed into ``minutes`` minutes, following the four
  SEC time bands (00-07, 07-08, 08-20, 20-24 UK time). Each band carries its ``share`` (%)
  of the daily forecast; its hourly rate is share / band hours, and the number of users
  during a band is ``peak_users`` x (its hourly rate / the busiest band's hourly rate),
  at least 1 for a band with a share above 0.
* ``kind = "stages"``: a list of ``[[stage]]`` tables (``seconds``, ``users``, optional
  ``spawn_rate``) run one after the other (peak, spike and soak tests).

Both may carry ``[mix]`` (user class name -> weight) and ``[wait]`` (``min``, ``max``
seconds between a user's tasks). ``Profile.at(t)`` gives (users, spawn rate) at ``t``
seconds into the run, or None once the profile is over.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The SEC time bands, hours of the (UK local) day.
SEC_BANDS: tuple[tuple[int, int], ...] = ((0, 7), (7, 8), (8, 20), (20, 24))
DEFAULT_SHARES: tuple[float, ...] = (10.0, 5.0, 70.0, 15.0)


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class Stage:
    seconds: float
    users: int
    spawn_rate: float
    label: str = ""


@dataclass(frozen=True)
class Profile:
    name: str
    stages: tuple[Stage, ...]
    mix: dict[str, float] = field(default_factory=dict)
    wait: tuple[float, float] = (1.0, 2.0)

    @property
    def duration(self) -> float:
        return sum(s.seconds for s in self.stages)

    def stage_at(self, t: float) -> Stage | None:
        if t < 0:
            t = 0.0
        end = 0.0
        for stage in self.stages:
            end += stage.seconds
            if t < end:
                return stage
        return None

    def at(self, t: float) -> tuple[int, float] | None:
        stage = self.stage_at(t)
        return None if stage is None else (stage.users, stage.spawn_rate)


def day_stages(minutes: float, peak_users: int, spawn_rate: float,
               shares: tuple[float, ...] = DEFAULT_SHARES) -> tuple[Stage, ...]:
    """The four SEC bands of a day compressed into ``minutes``."""
    if len(shares) != len(SEC_BANDS):
        raise ProfileError(f"day: need {len(SEC_BANDS)} band shares, got {len(shares)}")
    if minutes <= 0 or peak_users < 1 or spawn_rate <= 0:
        raise ProfileError("day: minutes, peak_users and spawn_rate must be positive")
    if any(s < 0 for s in shares) or sum(shares) <= 0:
        raise ProfileError("day: band shares must be >= 0 and not all 0")
    rates = [share / (end - start) for share, (start, end) in zip(shares, SEC_BANDS, strict=True)]
    busiest = max(rates)
    seconds_per_hour = minutes * 60 / 24
    stages = []
    for rate, share, (start, end) in zip(rates, shares, SEC_BANDS, strict=True):
        users = max(1, round(peak_users * rate / busiest)) if share > 0 else 0
        stages.append(Stage((end - start) * seconds_per_hour, users, spawn_rate,
                            f"{start:02d}-{end:02d}"))
    return tuple(stages)


def _number(data: dict[str, Any], key: str, default: float | None = None) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProfileError(f"{key}: expected a number, got {value!r}")
    return float(value)


def parse(data: dict[str, Any], name: str = "profile") -> Profile:
    kind = data.get("kind", "stages")
    spawn_rate = _number(data, "spawn_rate", 10)
    if kind == "day":
        bands = data.get("band", [])
        if bands:
            shares = tuple(_number(b, "share") for b in bands)
            given = tuple((int(b["start"]), int(b["end"])) for b in bands)
            if given != SEC_BANDS:
                raise ProfileError(f"day: bands must be {SEC_BANDS}, got {given}")
        else:
            shares = DEFAULT_SHARES
        stages = day_stages(_number(data, "minutes"), int(_number(data, "peak_users")),
                            spawn_rate, shares)
    elif kind == "stages":
        raw = data.get("stage", [])
        if not raw:
            raise ProfileError("stages: at least one [[stage]] is needed")
        stages = tuple(Stage(_number(s, "seconds"), int(_number(s, "users")),
                             _number(s, "spawn_rate", spawn_rate), str(s.get("label", "")))
                       for s in raw)
        if any(s.seconds <= 0 or s.users < 0 or s.spawn_rate <= 0 for s in stages):
            raise ProfileError("stages: seconds and spawn_rate must be > 0, users >= 0")
    else:
        raise ProfileError(f"kind: 'day' or 'stages', got {kind!r}")
    mix = {str(k): _number(data["mix"], k) for k in data.get("mix", {})}
    if any(w < 0 for w in mix.values()):
        raise ProfileError("mix: weights must be >= 0")
    wait_data = data.get("wait", {})
    wait = (_number(wait_data, "min", 1.0), _number(wait_data, "max", 2.0))
    if not 0 <= wait[0] <= wait[1]:
        raise ProfileError("wait: need 0 <= min <= max")
    return Profile(str(data.get("name", name)), stages, mix, wait)


def load(path: str | Path) -> Profile:
    p = Path(path)
    with p.open("rb") as f:
        return parse(tomllib.load(f), p.stem)
