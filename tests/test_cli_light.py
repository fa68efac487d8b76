"""The command line answers --help and a mistyped flag without importing torch (the flags'
lists of allowed values are made only when help is printed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from tinyfed.cli import main
try:
    main({argv!r})
except SystemExit as exc:
    code = exc.code
print(code, 'torch' in sys.modules)
"""


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["run", "--help"], 0),
                                        (["run", "--rounds", "x"], 2),
                                        (["run", "--no-such-flag"], 2),
                                        (["bandwidth", "--link", "carrier-pigeon"], 2)])
def test_help_and_bad_flags_do_not_import_torch(cli_env, argv, code):
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], env=cli_env,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[-2:] == [str(code), "False"], out.stdout + out.stderr


def test_run_help_still_lists_every_registry(cli_env):
    out = subprocess.run([sys.executable, "-m", "tinyfed", "run", "--help"], env=cli_env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "dp-fedavg" in text and "sign-flip" in text and "package.module:Class" in text


def test_registry_names_read_without_importing_equal_the_imported_ones():
    """`run --help` reads each registry's names from its module's source; they must be the
    names the module really registers."""
    from tinyfed.config import REGISTRIES, declared_names, registry_names

    for field, target in REGISTRIES.items():
        module, _, attr = target.partition(":")
        assert declared_names(module, attr) == registry_names(field), field
