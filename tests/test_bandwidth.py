"""Traffic: bytes counted at the transport equal the records; the estimate matches them; the
`tinyfed bandwidth` numbers equal hand computation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import small_config
from tinyfed import wire
from tinyfed.bandwidth import airtime, raw_bytes, report
from tinyfed.cli import main
from tinyfed.compress import parse_pipeline
from tinyfed.config import build_config
from tinyfed.links import LINKS
from tinyfed.metrics import read_records
from tinyfed.models import build_model, state_of
from tinyfed.protocol import ClientWorker

MLP_W = 796_840  # 4 × (784·200 + 200 + 200·200 + 200 + 200·10 + 10) = 4 × 199,210
CNN_W = 6_653_480  # 4 × 1,663,370


def execute_quiet(cfg):
    from tinyfed.rundir import RunDir
    from tinyfed.runner import execute

    with open("/dev/null", "w") as devnull:
        return execute(cfg, RunDir.create(cfg), live=False, stream=devnull)


@pytest.fixture
def counted(monkeypatch):
    """Every frame the in-process runtime hands a client and every reply, by round: the bytes a
    link would carry (the device-memory section, a simulated device's own state, is not)."""
    seen: dict[int, list[int]] = {}
    original = ClientWorker.handle_many

    def handle_many(self, frames: list[bytes]) -> list[bytes]:
        replies = original(self, frames)
        for frame, reply in zip(frames, replies):
            task, update = wire.decode_frame(frame), wire.decode_frame(reply)
            down, up = seen.setdefault(task.header["round"], [0, 0])
            seen[task.header["round"]] = [down + task.radio_bytes, up + update.radio_bytes]
        return replies

    monkeypatch.setattr(ClientWorker, "handle_many", handle_many)
    return seen


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bw") / "run"
    cfg = small_config(model="mlp", clients=4, fraction=0.5, rounds=3, out=str(out))
    return cfg, execute_quiet(cfg)


def test_bytes_at_the_transport_equal_the_records(tmp_path, counted):
    cfg = small_config(model="mlp128", rounds=2, fraction=0.5, codec="delta+topk:0.1+int8",
                       down_codec="fp16", out=str(tmp_path / "run"))
    res = execute_quiet(cfg)
    records, _ = read_records(res.run_dir.metrics)
    assert [r["round"] for r in records] == [1, 2]
    cum_down = cum_up = 0
    for r in records:
        cum_down += counted[r["round"]][0]
        cum_up += counted[r["round"]][1]
        assert [r["bytes_down"], r["bytes_up"]] == counted[r["round"]]
        assert (r["cum_bytes_down"], r["cum_bytes_up"]) == (cum_down, cum_up)
    assert res.state.cum_bytes_down == cum_down and res.state.cum_bytes_up == cum_up


def test_estimate_matches_measurement_within_one_percent_for_the_2nn(mlp_run):
    cfg, res = mlp_run
    t = report(cfg, [], None, 10)["traffic"]
    assert t["W_raw_bytes"] == MLP_W
    down, up = res.state.cum_bytes_down, res.state.cum_bytes_up
    wcr = MLP_W * cfg.clients_per_round * 3  # the paper-style estimate, raw tensor bytes
    assert abs(down - wcr) / wcr < 0.01 and abs(up - wcr) / wcr < 0.01
    assert down > wcr and up > wcr  # framing is overhead, never negative
    # the frame-level estimate is within a few header bytes per frame
    assert abs(down - t["client_down_bytes"] * 2 * 3) <= 6 * 40
    assert abs(up - t["client_up_bytes"] * 2 * 3) <= 6 * 40


def test_cnn_and_mlp_w_by_hand():
    for name, w in (("mlp", MLP_W), ("cnn", CNN_W)):
        out = report(build_config({"model": name}), [], None, 10)
        assert sum(r["bytes"] for r in out["tensors"]) == w == out["traffic"]["W_raw_bytes"]
        assert out["footprint"]["storage_fp32_bytes"] == w
        assert out["footprint"]["storage_fp16_bytes"] == w // 2
    rows = report(build_config({"model": "mlp"}), [], None, 10)["tensors"]
    assert rows[0] == {"name": "1.weight", "shape": [200, 784], "params": 156_800,
                       "dtype": "float32", "bytes": 627_200}


def test_codec_sizes_by_hand():
    w = state_of(build_model("mlp", (1, 28, 28), 10, 0))
    local = {k: v + 0.01 for k, v in w.items()}
    # int8: one byte per element + scale and zero (4 B each) for each of the 6 tensors
    assert raw_bytes(parse_pipeline("int8").encode(local, w)) == 199_210 + 6 * 8
    # top-k 1%: k = ceil(0.01·n) per tensor = 1568 + 2 + 400 + 2 + 20 + 1 = 1993 entries,
    # int32 index + float32 value each
    assert raw_bytes(parse_pipeline("delta+topk:0.01").encode(local, w, {})) == 1993 * 8
    assert raw_bytes(parse_pipeline("delta+topk:0.01+int8").encode(local, w, {})) == (
        1993 * 5 + 6 * 8)
    assert raw_bytes(parse_pipeline("fp16").encode(local, w)) == MLP_W // 2


def test_traffic_and_airtime_arithmetic():
    cfg = build_config({"model": "mlp", "clients": 100, "fraction": 0.1, "rounds": 50,
                        "codec": "delta+topk:0.01+int8", "down_codec": "int8"})
    out = report(cfg, list(LINKS.values()), None, 10)
    t = out["traffic"]
    assert t["clients_per_round"] == 10
    assert t["round_up_bytes"] == 10 * t["client_up_bytes"]
    assert t["run_down_bytes"] == 500 * t["client_down_bytes"]
    assert 1993 * 5 < t["client_up_payload_bytes"] < 1993 * 5 + 2000
    assert 199_258 < t["client_down_payload_bytes"] < 199_258 + 2000
    assert t["up_reduction"] > 50 and 3.9 < t["down_reduction"] < 4
    lora = next(a for a in out["airtime"] if a["name"] == "LoRa")
    assert lora["up_seconds"] == pytest.approx(t["client_up_bytes"] * 8 / 5470)
    assert lora["duty_cycle"] == 1.0
    assert lora["min_round_period_seconds"] == pytest.approx(lora["up_seconds"] * 100)
    assert lora["fits_hour"] is (lora["up_seconds"] <= 36)


def test_duty_cycle_by_hand():
    link = LINKS["lora"]
    a = airtime(link, 0, 5470)  # 43,760 bits at 5,470 bit/s = 8 s of uplink
    assert a["up_seconds"] == pytest.approx(8.0)
    assert a["rounds_per_hour"] == 4 and a["fits_hour"]  # 1% of an hour = 36 s of airtime
    assert a["min_round_period_seconds"] == pytest.approx(800.0)
    assert airtime(link, 0, 5 * 5470)["fits_hour"] is False  # 40 s > 36 s
    assert airtime(LINKS["wifi"], 0, 100, duty_cycle=10)["min_round_period_seconds"] == (
        pytest.approx(800 / 54e6 * 10))


def test_footprint_by_hand():
    f = report(build_config({"model": "mlp"}), [], None, 10)["footprint"]
    # activations of a batch of 10: input 10·784·4 + Linear/ReLU outputs 4 × 10·200·4 + 10·10·4
    assert f["train_activations_bytes"] == 31_360 + 32_000 + 400
    assert f["train_ram_bytes"] == 2 * MLP_W + 63_760
    adam = report(build_config({"model": "mlp", "optimizer": "adam"}), [], None, 10)["footprint"]
    assert adam["train_optimizer_bytes"] == 2 * MLP_W
    assert f["storage_int8_bytes"] == 199_210 + 6 * 8


def test_json_output_and_from_run(mlp_run, capsys):
    cfg, res = mlp_run
    assert main(["bandwidth", "--from-run", str(res.run_dir.path), "--link", "lora",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    run = out["from_run"]
    assert run["rounds"] == 3 and run["tasks"] == 6
    assert run["measured_down_bytes"] == res.state.cum_bytes_down
    assert run["measured_up_bytes"] == res.state.cum_bytes_up
    assert abs(run["diff_down_pct"]) < 0.01 and abs(run["diff_up_pct"]) < 0.01
    assert [a["name"] for a in out["airtime"]] == ["LoRa"]
    assert out["traffic"]["W_raw_bytes"] == MLP_W


def test_human_output_has_every_section(capsys):
    assert main(["bandwidth", "--model", "mlp", "--clients", "100", "--fraction", "0.1",
                 "--rounds", "20", "--codec", "delta+topk:0.01", "--link-kbps", "250",
                 "--duty-cycle", "10"]) == 0
    text = capsys.readouterr().out
    for part in ("796,840", "per client per round", "custom", "10%", "training RAM",
                 "W·C·R"):
        assert part in text, part


@pytest.mark.parametrize("argv,msg", [
    (["--codec", "bogus"], "unknown codec 'bogus'"),
    (["--down-codec", "topk:0.1"], "start with delta"),
    (["--fraction", "2"], "fraction"),
    (["--dataset", "imagenet"], "dataset"),
    (["--link-kbps", "-1"], "link-kbps"),
    (["--duty-cycle", "0"], "duty-cycle"),
    (["--from-run", "/nonexistent/run"], "not a tinyfed run folder"),
])
def test_bad_flags_are_one_line_errors(argv, msg, capsys):
    assert main(["bandwidth", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err and err.startswith("tinyfed: error:")


def test_bad_link_exits_2_with_one_line(cli_env):
    proc = subprocess.run([sys.executable, "-m", "tinyfed", "bandwidth", "--link", "zigbee"],
                          env=cli_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "zigbee" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_summary_prints_mean_per_client_and_estimate(mlp_run):
    from tinyfed.runner import summary

    cfg, res = mlp_run
    text = summary(res)
    per_client_down = res.state.cum_bytes_down / 6
    from tinyfed.metrics import human_bytes

    assert f"down {human_bytes(per_client_down)}" in text
    w = human_bytes(len(wire.encode_tensors(res.experiment.initial)))
    assert f"W·C·R = {w} × 2 × 3" in text
    assert torch.is_tensor(res.state.weights["1.weight"])
