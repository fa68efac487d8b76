"""The Python API and users' own data sets: the same run as the CLI's, from Python."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tinyfed
from tests import user_data
from tinyfed.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def test_run_from_python_with_objects(tmp_path):
    data = user_data.good()
    seen = []
    res = tinyfed.run(dataset=data, model=lambda shape, n: torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(36, n)), clients=4, rounds=3, lr=0.1, seed=1,
        partition="classes", classes_per_client=2, out=str(tmp_path / "r"),
        callbacks=[seen.append])
    assert [r["round"] for r in res.history] == [1, 2, 3] and len(seen) == 3
    assert res.history[-1]["test_accuracy"] > 0.5  # four classes: chance is 0.25
    assert set(res.weights) == {"1.weight", "1.bias"} and res.weights["1.weight"].shape == (4, 36)
    # the same partitioner as the built-in sets: two labels per client, every example once
    part = json.loads((res.run_dir.path / "partition.json").read_text())
    assert part["classes"] == ["a", "b", "c", "d"]
    assert all(sum(1 for v in c["labels"] if v) <= 2 for c in part["clients"])
    assert sum(c["size"] for c in part["clients"]) == 400
    # bytes counted as for any run: 4 tasks a round, each the whole model down and up
    w = len(tinyfed_wire_payload(res.weights))
    assert all(r["bytes_down"] >= 4 * w and r["bytes_up"] >= 4 * w for r in res.history)


def tinyfed_wire_payload(weights):
    from tinyfed import wire

    return wire.encode_tensors(weights)


def test_a_factory_by_import_path_runs_in_child_processes(tmp_path):
    kw = dict(dataset="tests.user_data:good", model="mlp128", clients=4, rounds=2, lr=0.2,
              deterministic=True)
    a = tinyfed.run(out=str(tmp_path / "a"), **kw)
    b = tinyfed.run(out=str(tmp_path / "b"), runtime="processes", workers=2, **kw)
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)


def test_pair_of_torch_datasets_and_a_config_dict(tmp_path):
    res = tinyfed.run({"clients": 2, "rounds": 1}, dataset=user_data.torch_datasets(),
                      model="mlp128", out=str(tmp_path / "r"))
    assert res.history[0]["num_examples"] == 400


def test_a_python_object_cannot_reach_other_processes(tmp_path):
    with pytest.raises(ConfigError, match="exists in this Python process only"):
        tinyfed.run(dataset=user_data.good(), runtime="processes", out=str(tmp_path / "r"))


@pytest.mark.parametrize("factory,message", [
    ("raises", "the factory raised RuntimeError: the data server is down"),
    ("bad_labels", "train label 9 at index 7 is outside [0, 4)"),
    ("nan_pixels", "test images hold NaN"),
    ("wrong_shapes", "train has 400 images but 395 labels"),
    ("integer_images", "float tensors"),
    ("missing", "has no callable 'missing'"),
])
def test_bad_user_datasets_are_one_line_errors(factory, message, tmp_path):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace(")", r"\)")):
        tinyfed.run(dataset=f"tests.user_data:{factory}", out=str(tmp_path / "r"))


def test_cli_refuses_a_bad_dataset_factory_with_exit_2(cli_env, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tinyfed", "run", "--dataset",
                           "tests.user_data:bad_labels", "--out", str(tmp_path / "r")],
                          cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "train label 9 at index 7" in proc.stderr


def test_the_own_data_example_runs(cli_env, tmp_path):
    proc = subprocess.run([sys.executable, "examples/own_data.py", str(tmp_path / "ex")],
                          cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    final = float(proc.stdout.split("final accuracy ")[1].split(";")[0])
    assert final > 0.6  # three classes: chance is 0.33
    assert (tmp_path / "ex" / "metrics.jsonl").is_file()


def test_a_device_install_imports_no_server_or_plots():
    """`tinyfed client` and the client side of the protocol load neither FastAPI, uvicorn nor
    matplotlib (checked in a fresh interpreter, as a device would start)."""
    code = ("import sys\n"
            "from tinyfed.cli import build_parser\n"
            "build_parser().parse_args(['client', '--server', 'http://x', '--tokens', 't'])\n"
            "import tinyfed.runtimes.http.remote, tinyfed.protocol, tinyfed.worker\n"
            "heavy = [m for m in ('fastapi', 'uvicorn', 'starlette', 'matplotlib')\n"
            "         if m in sys.modules]\n"
            "print(','.join(heavy) or 'none')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "none"
