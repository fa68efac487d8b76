"""Device profiles, named fleets, mixes and per-client traces (plain data: no torch).

A profile says how fast a device trains (FLOP/s, so a bigger model takes longer), its links
(kbit/s each way, a latency, a regulatory duty cycle on its uplink), what a byte on the radio
and a GFLOP of training cost in energy, its memory, and when it can take part. The built-in
figures are nominal rates from the sources in `docs/fleet.md` (as recalled there); a user's own
devices come in as a CSV or JSON trace, one row per client.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from tinyfed.errors import ConfigError

DAY = 86_400.0


@dataclass(frozen=True)
class Profile:
    name: str
    gflops: float  # sustained training speed, GFLOP/s
    down_kbps: float
    up_kbps: float
    latency_s: float  # one round trip before each transfer
    tx_mj_per_kb: float  # radio energy to send a kilobyte (1,000 bytes), millijoules
    rx_mj_per_kb: float  # radio energy to receive one
    mj_per_gflop: float  # compute energy, millijoules per GFLOP
    memory_mb: float  # RAM a task may use
    duty_cycle: float = 100.0  # percent of time the uplink may transmit (EU868 LoRa: 1)
    window: str = ""  # daily availability "HH-HH" (e.g. "22-7": plugged in at night); "" always
    dropout: float = 0.0  # probability a task is abandoned (seeded per task)

    def available(self, seconds: float) -> bool:
        """Whether the device can start a task at this simulated time of day."""
        if not self.window:
            return True
        start, end = (float(x) for x in self.window.split("-"))
        hour = (seconds % DAY) / 3600.0
        return start <= hour < end if start < end else hour >= start or hour < end


NUMBERS = ("gflops", "down_kbps", "up_kbps", "latency_s", "tx_mj_per_kb", "rx_mj_per_kb",
           "mj_per_gflop", "memory_mb", "duty_cycle", "dropout")
POSITIVE = ("gflops", "down_kbps", "up_kbps", "memory_mb")  # a zero here would never finish

# Sources (see docs/fleet.md): LoRaWAN Regional Parameters EU868 DR5 and the 1 % sub-band duty
# cycle, Semtech SX1276 currents; 3GPP Rel-13 NB-IoT (Cat-NB1) peak rates, module currents of
# typical NB-IoT modems; Nordic nRF52832 radio currents, practical BLE GATT throughput; LTE
# user rates and radio power of phones; Bonawitz et al. 2019 (phones take part when idle,
# charging and on an unmetered network, in practice at night); Raspberry Pi 4 power.
FLEETS: dict[str, Profile] = {
    "lora-sensors": Profile("lora-sensors", gflops=0.05, down_kbps=5.47, up_kbps=5.47,
                            latency_s=2.0, tx_mj_per_kb=190.0, rx_mj_per_kb=53.0,
                            mj_per_gflop=600.0, memory_mb=0.25, duty_cycle=1.0),
    "nbiot-meters": Profile("nbiot-meters", gflops=0.1, down_kbps=26.2, up_kbps=62.5,
                            latency_s=1.5, tx_mj_per_kb=100.0, rx_mj_per_kb=60.0,
                            mj_per_gflop=400.0, memory_mb=2.5, dropout=0.05),
    "ble-wearables": Profile("ble-wearables", gflops=0.1, down_kbps=250.0, up_kbps=250.0,
                             latency_s=0.1, tx_mj_per_kb=0.5, rx_mj_per_kb=0.5,
                             mj_per_gflop=300.0, memory_mb=1.0, dropout=0.1),
    "phones-lte": Profile("phones-lte", gflops=5.0, down_kbps=20_000.0, up_kbps=5_000.0,
                          latency_s=0.05, tx_mj_per_kb=2.4, rx_mj_per_kb=0.6,
                          mj_per_gflop=0.4, memory_mb=512.0, window="22-7"),
    "raspberry-pi-wifi": Profile("raspberry-pi-wifi", gflops=5.0, down_kbps=20_000.0,
                                 up_kbps=20_000.0, latency_s=0.01, tx_mj_per_kb=0.2,
                                 rx_mj_per_kb=0.2, mj_per_gflop=0.8, memory_mb=1024.0),
}


def check(profile: Profile, where: str) -> Profile:
    """Every number finite and in range, the window well-formed, or ConfigError naming it."""
    for name in NUMBERS:
        value = getattr(profile, name)
        if not math.isfinite(value) or value < 0 or (name in POSITIVE and value == 0):
            bound = "> 0" if name in POSITIVE else "≥ 0"
            raise ConfigError(f"{where}: field {name!r} = {value!r}; a finite number {bound} is "
                              f"required")
    if not 0 < profile.duty_cycle <= 100:
        raise ConfigError(f"{where}: field 'duty_cycle' = {profile.duty_cycle!r}; a percentage "
                          f"in (0, 100] is required")
    if not profile.dropout < 1:
        raise ConfigError(f"{where}: field 'dropout' = {profile.dropout!r}; a probability in "
                          f"[0, 1) is required")
    if profile.window:
        parts = profile.window.split("-")
        ok = len(parts) == 2 and all(p.replace(".", "", 1).isdigit() and float(p) < 24
                                     for p in parts) and parts[0] != parts[1]
        if not ok:
            raise ConfigError(f"{where}: field 'window' = {profile.window!r}; 'HH-HH' hours in "
                              f"[0, 24), different (e.g. 22-7), or empty for always")
    return profile


def parse_mix(spec: str) -> list[tuple[Profile, float]]:
    """'phones-lte:0.7,lora-sensors:0.3' (or one name) as (profile, share) pairs."""
    pairs = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, share = part.partition(":")
        profile = FLEETS.get(name.strip())
        if profile is None:
            raise ConfigError(f"fleet {spec!r}: unknown profile {name.strip()!r}; allowed: "
                              f"{', '.join(FLEETS)}, mixes such as phones-lte:0.7,lora-sensors:0.3,"
                              f" or a .csv/.json trace")
        try:
            value = float(share) if share else 1.0
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"fleet {spec!r}: share {share!r} of {name.strip()!r} must be a "
                              f"number > 0")
        pairs.append((profile, value))
    if not pairs:
        raise ConfigError("fleet is empty; name a profile, a mix or a trace file")
    return pairs


def assign(pairs: list[tuple[Profile, float]], clients: int, seed: int) -> list[Profile]:
    """Profiles for clients 0…K-1: counts by largest remainder of K·share, placed by a seeded
    shuffle (so a mix does not put every sensor at the end of the id range)."""
    total = sum(share for _, share in pairs)
    exact = [clients * share / total for _, share in pairs]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(pairs)), key=lambda i: counts[i] - exact[i])[: clients -
                                                                          sum(counts)]:
        counts[i] += 1
    out = [p for (p, _), n in zip(pairs, counts) for _ in range(n)]
    random.Random(seed).shuffle(out)
    return out


def read_trace(path: Path, clients: int) -> list[Profile]:
    """One profile per client from a CSV (header row) or JSON (list of objects) file. Each row
    names its `client_id` and may start from a built-in `profile`, overriding any field."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"fleet trace {path}: cannot read it ({exc.strerror})") from None
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"fleet trace {path}: not valid JSON ({exc})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ConfigError(f"fleet trace {path}: a JSON list of objects is required")
        numbered = [(i + 1, r) for i, r in enumerate(rows)]
        unit = "entry"
    elif path.suffix == ".csv":
        numbered = [(i + 2, r) for i, r in enumerate(csv.DictReader(text.splitlines()))]
        unit = "line"
    else:
        raise ConfigError(f"fleet trace {path}: a .csv or .json file is required")
    allowed = {"client_id", "profile", "window", *NUMBERS}
    profiles: dict[int, Profile] = {}
    for num, row in numbered:
        where = f"fleet trace {path}, {unit} {num}"
        unknown = sorted(k for k in row if k not in allowed)
        if unknown or None in row:
            raise ConfigError(f"{where}: unknown column {(unknown or ['(extra cell)'])[0]!r}; "
                              f"allowed: {', '.join(sorted(allowed))}")
        cid = _number(row.get("client_id"), where, "client_id")
        if cid != int(cid) or not 0 <= cid < clients:
            raise ConfigError(f"{where}: field 'client_id' = {row.get('client_id')!r}; an "
                              f"integer in [0, {clients}) is required")
        base = FLEETS.get(str(row.get("profile") or "raspberry-pi-wifi"))
        if base is None:
            raise ConfigError(f"{where}: field 'profile' = {row.get('profile')!r}; allowed: "
                              f"{', '.join(FLEETS)}")
        values = {k: _number(v, where, k) for k, v in row.items() if k in NUMBERS and v != ""}
        name = f"{row.get('profile') or 'trace'}#{int(cid)}"
        window = str(row["window"]) if row.get("window") not in (None,) else base.window
        profiles[int(cid)] = check(dataclasses.replace(base, name=name, window=window,
                                                       **values), where)
    missing = [c for c in range(clients) if c not in profiles]
    if missing:
        raise ConfigError(f"fleet trace {path}: no row for client(s) {missing[:8]}"
                          f"{'…' if len(missing) > 8 else ''}; every client 0-{clients - 1} "
                          f"needs one")
    return [profiles[c] for c in range(clients)]


def _number(value, where: str, field: str) -> float:
    if isinstance(value, bool):
        value = None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: field {field!r} = {value!r} is not a number") from None
    return number


def build_fleet(spec: str, clients: int, seed: int) -> list[Profile]:
    """The profile of every client from a fleet name, a mix, or a trace file path."""
    if spec.endswith((".csv", ".json")):
        return read_trace(Path(spec), clients)
    return [check(p, f"fleet profile {p.name!r}") for p in assign(parse_mix(spec), clients,
                                                                   seed)]
