"""Load profiles (conf/loadtest/*.toml) as request rates over time: pure, no Locust, no gevent.

The load is an open model: a profile says how many requests per second the read interfaces
are offered (all user classes together), whatever the server's answers take; Locust's users
only generate those arrivals. A profile is one of two kinds:

* ``kind = "day"``: a 24-hour day compressed into ``minutes`` minutes, in the four SEC time
  bands (00-07, 07-08, 08-20, 20-24 UK time). The rate during a band is the real one: with
  the server's forecasts (``forecast_rates``, from ``/ops/reports/demand``) the sum of every
  user's forecast for that band divided by the band's length; without forecasts the fixed
  fallback, ``peak_rate`` requests/s in the busiest band and the others in proportion to
  their ``share`` (% of the day's requests) per hour.
* ``kind = "stages"``: ``[[stage]]`` tables (``seconds``, ``rate``, optional ``label``) run
  one after the other (peak, spike and soak tests).

Both may carry ``[mix]`` (user class name -> share of the requests) and ``[lodging]``
(``per_minute``: lodgings a minute, apart from the read load: CPM 8 leaves lodging out).
Every rate is multiplied by the demand factor (``--demand-factor``: 1.0 = as forecast, 1.2 =
the SEC's demand threshold).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# The SEC time bands, hours of the (UK local) day.
SEC_BANDS: tuple[tuple[int, int], ...] = ((0, 7), (7, 8), (8, 20), (20, 24))
BAND_LABELS = tuple(f"{a:02d}-{b:02d}" for a, b in SEC_BANDS)
DEFAULT_SHARES: tuple[float, ...] = (10.0, 5.0, 70.0, 15.0)
DEFAULT_MIX = {"WebServiceUser": 60.0, "DownloadUser": 30.0, "LdapUser": 5.0, "PortalUser": 5.0}


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class Stage:
    seconds: float
    rate: float  # requests per second offered to the read interfaces
    label: str = ""


@dataclass(frozen=True)
class Profile:
    name: str
    kind: str
    stages: tuple[Stage, ...]
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    lodging_per_minute: float = 6.0
    minutes: float = 0.0  # day: the compressed day's length
    source: str = "fixed"  # day: "fixed" or "forecast"

    @property
    def duration(self) -> float:
        return sum(s.seconds for s in self.stages)

    def stage_at(self, t: float) -> Stage | None:
        end = 0.0
        for stage in self.stages:
            end += stage.seconds
            if max(t, 0.0) < end:
                return stage
        return None

    def rate_at(self, t: float) -> float | None:
        stage = self.stage_at(t)
        return None if stage is None else stage.rate

    def scaled(self, factor: float) -> Profile:
        """Every rate times `factor` (the demand factor); lodging keeps its own rate."""
        if factor <= 0:
            raise ProfileError(f"demand factor: expected a number above 0, got {factor:g}")
        return replace(self, stages=tuple(replace(s, rate=s.rate * factor) for s in self.stages))

    def class_rates(self, rate: float, enabled: list[str]) -> dict[str, float]:
        """Requests per second per enabled read user class: `rate` shared by the mix."""
        weights = {c: self.mix.get(c, 0.0) for c in enabled}
        total = sum(weights.values())
        return {c: rate * w / total if total else 0.0 for c, w in weights.items()}


def fixed_band_rates(peak_rate: float, shares: tuple[float, ...] = DEFAULT_SHARES
                     ) -> tuple[float, ...]:
    """Requests/s per band: the busiest band (by share per hour) at `peak_rate`."""
    if len(shares) != len(SEC_BANDS):
        raise ProfileError(f"day: need {len(SEC_BANDS)} band shares, got {len(shares)}")
    if any(s < 0 for s in shares) or sum(shares) <= 0:
        raise ProfileError("day: band shares must be >= 0 and not all 0")
    if peak_rate <= 0:
        raise ProfileError("day: peak_rate must be above 0")
    hourly = [s / (b - a) for s, (a, b) in zip(shares, SEC_BANDS, strict=True)]
    return tuple(peak_rate * h / max(hourly) for h in hourly)


def forecast_band_rates(demand: dict[str, Any]) -> tuple[float, ...] | None:
    """Requests/s per band from a `/ops/reports/demand` answer: the sum of every user's
    forecast for the band over the band's real length; None when no user has a forecast."""
    sums = [0.0] * len(SEC_BANDS)
    found = False
    for user in demand.get("users", []):
        if user.get("forecast") is None:
            continue
        for i, band in enumerate(user.get("bands", [])[:len(SEC_BANDS)]):
            if band.get("forecast") is not None:
                sums[i] += float(band["forecast"])
                found = True
    if not found or sum(sums) <= 0:
        return None
    return tuple(s / ((b - a) * 3600) for s, (a, b) in zip(sums, SEC_BANDS, strict=True))


def day_stages(minutes: float, band_rates: tuple[float, ...]) -> tuple[Stage, ...]:
    """The four SEC bands of a day compressed into `minutes`, each at its real rate."""
    if minutes <= 0:
        raise ProfileError("day: minutes must be above 0")
    seconds_per_hour = minutes * 60 / 24
    return tuple(Stage((b - a) * seconds_per_hour, rate, label)
                 for rate, (a, b), label in zip(band_rates, SEC_BANDS, BAND_LABELS, strict=True))


def with_forecasts(profile: Profile, demand: dict[str, Any] | None) -> Profile:
    """A day profile at the rates the server's forecasts give; unchanged (the fixed
    fallback) when there are none, and for stage profiles."""
    rates = forecast_band_rates(demand) if demand is not None and profile.kind == "day" else None
    if rates is None:
        return profile
    return replace(profile, stages=day_stages(profile.minutes, rates), source="forecast")


def _number(data: dict[str, Any], key: str, default: float | None = None) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProfileError(f"{key}: expected a number, got {value!r}")
    return float(value)


def parse(data: dict[str, Any], name: str = "profile") -> Profile:
    kind = data.get("kind", "stages")
    if kind == "day":
        bands = data.get("band", [])
        if bands:
            shares = tuple(_number(b, "share") for b in bands)
            given = tuple((int(b["start"]), int(b["end"])) for b in bands)
            if given != SEC_BANDS:
                raise ProfileError(f"day: bands must be {SEC_BANDS}, got {given}")
        else:
            shares = DEFAULT_SHARES
        minutes = _number(data, "minutes")
        stages = day_stages(minutes, fixed_band_rates(_number(data, "peak_rate"), shares))
    elif kind == "stages":
        minutes = 0.0
        raw = data.get("stage", [])
        if not raw:
            raise ProfileError("stages: at least one [[stage]] is needed")
        stages = tuple(Stage(_number(s, "seconds"), _number(s, "rate"), str(s.get("label", "")))
                       for s in raw)
        if any(s.seconds <= 0 or s.rate < 0 for s in stages):
            raise ProfileError("stages: seconds must be > 0 and rate >= 0")
    else:
        raise ProfileError(f"kind: 'day' or 'stages', got {kind!r}")
    mix = {str(k): _number(data["mix"], k) for k in data.get("mix", {})} or dict(DEFAULT_MIX)
    if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ProfileError("mix: weights must be >= 0 and not all 0")
    lodging = _number(data.get("lodging", {}), "per_minute", 6.0)
    if lodging < 0:
        raise ProfileError("lodging.per_minute: must be >= 0")
    return Profile(str(data.get("name", name)), kind, stages, mix, lodging, minutes)


def load(path: str | Path) -> Profile:
    p = Path(path)
    try:
        with p.open("rb") as f:
            return parse(tomllib.load(f), p.stem)
    except OSError as exc:
        raise ProfileError(f"{p}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{p}: not TOML: {exc}") from exc
    except (KeyError, ValueError, TypeError) as exc:
        if isinstance(exc, ProfileError):
            raise ProfileError(f"{p}: {exc}") from exc
        raise ProfileError(f"{p}: {exc!r}") from exc

