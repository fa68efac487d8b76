"""W in the W·C·R traffic estimate: the bytes of one full model payload on the wire.

Computed from the config alone (the model's shapes, not the data), so a finished run's folder
is enough and no data set is loaded to draw the estimate line.
"""

from __future__ import annotations

from tinyfed.config import Config


def payload_bytes(config: Config) -> int | None:
    """len(wire.encode_tensors(initial weights)), or None if the model cannot be built here
    (a user model whose module is not importable by the dashboard)."""
    from tinyfed import wire
    from tinyfed.data.sources import SOURCES
    from tinyfed.models import build_model, state_of

    try:
        source = SOURCES[config.dataset]  # a user's data set: not known without loading it
        model = build_model(config.model, source.shape, len(source.classes), config.seed)
        return len(wire.encode_tensors(state_of(model)))
    except Exception:  # noqa: BLE001 - the page just omits the estimate line
        return None
