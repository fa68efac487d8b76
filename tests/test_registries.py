"""One place for each name: a registry entry is all the config and the CLI need to accept a
value, list it in the help and run it."""

from __future__ import annotations

import importlib

import pytest

from tests.conftest import small_config
from tinyfed.commands.experiment_flags import flag_help
from tinyfed.config import IMPORTABLE, REGISTRIES, build_config, registry_names
from tinyfed.errors import ConfigError


def registry(field: str) -> dict:
    module, _, attr = REGISTRIES[field].partition(":")
    return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize("field", sorted(REGISTRIES))
def test_every_registry_drives_the_config_and_the_flag_help(field, monkeypatch):
    names = registry_names(field)
    assert names and all(name in flag_help(field) for name in names)
    with pytest.raises(ConfigError) as err:
        small_config(**{field: "no-such-entry"})
    line = str(err.value)
    assert "\n" not in line and field in line and "no-such-entry" in line
    assert all(name in line for name in names)
    monkeypatch.setitem(registry(field), "added-entry", registry(field)[names[0]])
    assert small_config(**{field: "added-entry"}).model_dump()[field] == "added-entry"
    assert "added-entry" in flag_help(field)


@pytest.mark.parametrize("field", sorted(IMPORTABLE))
def test_importable_fields_take_a_module_path_and_say_so(field):
    form = f"package.module:{IMPORTABLE[field]}"
    assert form in flag_help(field)
    assert build_config({field: "mypkg.mod:make"}).model_dump()[field] == "mypkg.mod:make"
    with pytest.raises(ConfigError, match=form):
        build_config({field: "mypkg.mod:"})


def test_a_new_data_set_and_a_new_mode_run_end_to_end(monkeypatch, tmp_path):
    """Entries added at run time (what a plugin would do) are loaded and run by name."""
    from tinyfed.api import run
    from tinyfed.data.sources import SOURCES, Source
    from tinyfed.data.synthetic import make_synthetic
    from tinyfed.policies import MODES, synchronous

    calls = []

    def tiny(name, data_dir, download, size):
        calls.append(name)
        return make_synthetic(300)

    def logged_sync(*args, **kwargs):
        calls.append("mode")
        return synchronous(*args, **kwargs)

    monkeypatch.setitem(SOURCES, "tiny", Source(tiny, (0.25,), (0.2,), tuple("abcdefghij"),
                                                (1, 28, 28)))
    monkeypatch.setitem(MODES, "logged-sync", logged_sync)
    result = run(dataset="tiny", mode="logged-sync", model="mlp128", clients=3, rounds=1,
                 out=str(tmp_path / "run"), progress=False)
    assert calls == ["tiny", "mode"]
    assert [r["round"] for r in result.history] == [1]
