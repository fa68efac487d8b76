"""Radio links of small devices, by name: nominal application rates and their sources.

Plain data (no torch), so the CLI can list them without importing the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    """A radio's nominal application rates; airtime = bits / rate, no packet overhead."""

    name: str
    up_kbps: float
    down_kbps: float
    assumption: str
    duty_cycle: float | None = None  # percent of time the device may transmit, by regulation


LINKS: dict[str, Link] = {
    "ble": Link("BLE", 1000, 1000, "Bluetooth LE 1M PHY raw rate; GATT throughput is often "
                "100-700 kbit/s"),
    "lora": Link("LoRa", 5.47, 5.47, "SF7, 125 kHz, CR 4/5 (EU868 DR5), max 222 B per packet; "
                 "EU868 sub-band duty cycle 1%", duty_cycle=1.0),
    "nbiot": Link("NB-IoT", 62.5, 26.2, "3GPP Rel-13 Cat-NB1 peak: 62.5 kbit/s up (multi-tone), "
                  "26.2 kbit/s down"),
    "ltem": Link("LTE-M", 1000, 1000, "3GPP Rel-13 Cat-M1 peak 1 Mbit/s; half-duplex devices "
                 "reach about 375 kbit/s up"),
    "wifi": Link("Wi-Fi", 54000, 54000, "802.11g 54 Mbit/s nominal; real throughput about half"),
}
