"""The simulated fleet: a hand-computed two-client round (times, deadline, over-selection,
energy), arrival order, availability, determinism across runtimes, the records and report, the
`tinyfed fleet` command, and every bad fleet input as one line with exit 2."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from tests.conftest import clockless, small_config
from tests.conftest import run_small as run
from tests.conftest import same_tensors as same
from tinyfed.client import TrainSettings
from tinyfed.errors import ConfigError
from tinyfed.fleet.clock import Work, task_cost
from tinyfed.fleet.profiles import FLEETS, Profile, assign, build_fleet, parse_mix
from tinyfed.protocol import ClientResult, ClientTask
from tinyfed.rundir import RunDir
from tinyfed.runner import execute, summary
from tinyfed.runtimes.base import Delivery, Job
from tinyfed.runtimes.simulated import SimulatedTransport

# Two devices by hand. A: 1 GFLOP/s, 8 kbit/s (1,000 B/s) both ways, 0.5 s latency.
A = Profile("A", gflops=1.0, down_kbps=8.0, up_kbps=8.0, latency_s=0.5, tx_mj_per_kb=2.0,
            rx_mj_per_kb=1.0, mj_per_gflop=10.0, memory_mb=1.0)
# B: half the compute, and its uplink may transmit half the time (so an upload takes twice).
B = Profile("B", gflops=0.5, down_kbps=8.0, up_kbps=8.0, latency_s=0.5, tx_mj_per_kb=2.0,
            rx_mj_per_kb=1.0, mj_per_gflop=10.0, memory_mb=1.0, duty_cycle=50.0)
DOWN, UP, EXAMPLES = 2000, 1000, 100  # bytes each way and examples of every task here


class FakeInner:
    """An inner transport whose results come back in the reverse order of sending."""

    def __init__(self):
        self.sent: list[Job] = []

    def start(self, experiment):
        pass

    def send(self, job):
        self.sent.append(job)

    def receive(self, timeout):
        if not self.sent:
            return None
        job = self.sent.pop()
        return Delivery(job, ClientResult(job.task.client_id, job.task.round, True,
                                          num_examples=EXAMPLES, bytes_down=DOWN, bytes_up=UP))

    def waiting(self):
        return len(self.sent)

    def cancel(self, job):
        return None

    def close(self):
        pass


class FakeExperiment:
    client_ids = [0, 1, 2, 3]

    def shard_size(self, cid):
        return EXAMPLES


def simulator(profiles, **over) -> SimulatedTransport:
    cfg = small_config(fleet="raspberry-pi-wifi", clients=len(profiles), **over)
    sim = SimulatedTransport(FakeInner(), cfg)
    sim.fleet = list(profiles)
    sim.work = Work(gflop_per_example=0.01, ram_bytes=1000)  # a task: 100 × 0.01 = 1 GFLOP
    sim.experiment = FakeExperiment()
    return sim


def job(i: int, cid: int, rnd: int = 1) -> Job:
    task = ClientTask(cid, rnd, 1000 + 7 * i + cid, TrainSettings(1, 10, "sgd", 0.1, 0.0, 0.0))
    return Job(i, task, b"", None, float("inf"))


def drain(sim) -> list[Delivery]:
    out = []
    while (got := sim.receive(0.1)) is not None:
        out.append(got)
    return out


def test_a_two_client_round_by_hand():
    # A: down 0.5 + 2000/1000 = 2.5 s, train 1 GFLOP / 1 = 1 s, up 0.5 + 1000/1000 = 1.5 s
    # B: down 2.5 s, train 1 / 0.5 = 2 s, up 0.5 + 1.0 · 100/50 = 2.5 s
    assert task_cost(A, DOWN, UP, 1.0).seconds == pytest.approx(5.0)
    assert task_cost(B, DOWN, UP, 1.0).seconds == pytest.approx(7.0)
    # energy: radio (2000 B · 1 mJ/kB + 1000 B · 2 mJ/kB) = 4 mJ; compute 1 GFLOP · 10 mJ
    cost = task_cost(A, DOWN, UP, 1.0)
    assert (cost.radio_j, cost.compute_j) == pytest.approx((0.004, 0.010))

    sim = simulator([A, B])  # no deadline: the round lasts as long as B
    for i in (0, 1):
        sim.send(job(i, i))
    got = drain(sim)
    assert [d.result.client_id for d in got] == [0, 1] and all(d.result.ok for d in got)
    rec = sim.report()
    assert rec["sim_seconds"] == pytest.approx(7.0)
    assert rec["energy_j"] == pytest.approx(2 * 0.004 + 0.010 + 0.010)
    assert rec["radio_j"] == pytest.approx(0.008) and rec["compute_j"] == pytest.approx(0.020)

    sim = simulator([A, B], sim_deadline=6.0)  # B arrives at 7 s: missed, the round ends at 6
    for i in (0, 1):
        sim.send(job(i, i))
    got = drain(sim)
    assert got[0].result.ok and not got[1].result.ok
    assert "missed the simulated deadline: 7.0 s > sim_deadline=6 s (B)" in got[1].result.reason
    rec = sim.report()
    assert rec["sim_seconds"] == pytest.approx(6.0) and rec["missed_deadline"] == 1
    assert rec["energy_j"] == pytest.approx(0.028)  # B's work was spent all the same

    sim = simulator([A, B], fraction=0.5, over_select=2.0)  # ask 2, keep the first 1
    for i in (0, 1):
        sim.send(job(i, i))
    got = drain(sim)
    assert got[0].result.ok and "over-selected: round 1 had its 1 updates at simulated 5.0 s" \
        in got[1].result.reason
    rec = sim.report()
    assert rec["sim_seconds"] == pytest.approx(5.0) and rec["over_selected"] == 1
    # the next round starts when this one closed
    sim.send(job(2, 0, rnd=2))
    drain(sim)
    assert sim.report()["sim_seconds"] == pytest.approx(5.0) and sim.now == pytest.approx(10.0)


def test_results_leave_in_simulated_arrival_order_whatever_order_they_finish_in():
    # slow: down 1 + 2000·8/8000 = 3 s, train 1 GFLOP / 0.1 = 10 s, up 1 + 1 = 2 s → 15 s
    # fast: down 2000·8/800,000 = 0.02 s, train 0.1 s, up 0.01 s → 0.13 s
    fast = Profile("fast", 10.0, 800.0, 800.0, 0.0, 0, 0, 0, 1.0)
    slow = Profile("slow", 0.1, 8.0, 8.0, 1.0, 0, 0, 0, 1.0)
    sim = simulator([slow, fast, slow, fast], mode="async", concurrency=4)
    for i in range(4):
        sim.send(job(i, i))
    first = sim.receive(0.1)  # the inner hands back 3, 2, 1, 0; equal times go by client id
    assert first.result.client_id == 1 and sim.now == pytest.approx(0.13)
    sim.send(job(4, 1, rnd=2))  # async: the next task starts at that arrival, 0.13 s
    order = [d.result.client_id for d in drain(sim)]
    assert order == [3, 1, 0, 2]  # 0.13, 0.26, 15, 15
    assert sim.now == pytest.approx(15.0)


def test_daily_windows_and_drop_outs_are_honoured_and_seeded():
    night = Profile("night", 5.0, 8000.0, 8000.0, 0.0, 0, 0, 0, 100.0, window="22-7")
    assert night.available(23 * 3600) and night.available(3 * 3600)
    assert not night.available(7 * 3600) and not night.available(12 * 3600)
    assert night.available(86_400 + 22 * 3600)  # the next day too
    sim = simulator([night, night], sim_start_hour=12)
    sim.send(job(0, 0))
    got = drain(sim)
    assert not got[0].result.ok and "unavailable: night takes part 22-7 h only (simulated " \
        "day 1 12:00)" in got[0].result.reason
    assert sim.report()["unavailable"] == 1
    sim = simulator([night, night], sim_start_hour=23)
    sim.send(job(0, 0))
    assert drain(sim)[0].result.ok
    flaky = Profile("flaky", 5.0, 8000.0, 8000.0, 0.0, 0, 0, 0, 100.0, dropout=0.5)
    outcomes = []
    for _ in range(2):
        sim = simulator([flaky] * 4)
        for i in range(40):
            sim.send(job(i, i % 4, rnd=i))
        outcomes.append([d.result.ok for d in drain(sim)])
    assert outcomes[0] == outcomes[1] and 8 < outcomes[0].count(False) < 32


def test_a_drop_out_reports_its_bytes_as_a_transport_does():
    """The dispatcher takes the device-memory section off what a transport sent, once."""
    from dataclasses import replace

    from tinyfed.protocol import task_frame
    from tinyfed.runtimes.dispatch import radio

    gone = Profile("gone", 5.0, 8.0, 8.0, 0.0, 0, 1.0, 0, 100.0, dropout=0.999)
    sim = simulator([gone])
    j = job(0, 0)
    j = Job(0, replace(j.task, memory_bytes=400), b"x" * 1000, None, float("inf"))
    sim.send(j)
    got = drain(sim)[0]
    sent = len(task_frame(j.task, b"")) + 1000
    assert not got.result.ok and got.result.bytes_down == sent
    link = radio(sent, j)  # what the record will hold: 400 bytes fewer
    rec = sim.report()
    assert rec["dropped_out"] == 1 and rec["radio_j"] == pytest.approx(link / 1e6)
    assert sim.now == pytest.approx(link * 8 / 8000)  # the download at 8 kbit/s


def test_mixes_are_assigned_by_share_and_seed():
    pairs = parse_mix("phones-lte:0.7,lora-sensors:0.3")
    fleet = assign(pairs, 10, seed=1)
    assert sum(p.name == "phones-lte" for p in fleet) == 7
    assert fleet == assign(pairs, 10, seed=1) and fleet != assign(pairs, 10, seed=2)
    assert [p.name for p in build_fleet("ble-wearables", 3, 0)] == ["ble-wearables"] * 3


def records(result):
    return clockless(result.state.records)


FLEET = "phones-lte:0.5,raspberry-pi-wifi:0.25,nbiot-meters:0.25"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_simulated_runs_are_bit_identical_run_to_run_and_across_runtimes(tmp_path, mode):
    over = dict(fleet=FLEET, sim_start_hour=23, clients=8, rounds=3, deterministic=True,
                mode=mode, fraction=0.5)
    over.update(dict(sim_deadline=60.0, over_select=1.5) if mode == "sync" else
                dict(concurrency=3, async_rule="fedbuff", buffer_size=2))
    base = run(tmp_path, "a", **over)
    again = run(tmp_path, "b", **over)
    assert same(base.state.weights, again.state.weights) and records(base) == records(again)
    other = run(tmp_path, "procs", runtime="processes", workers=2, **over)
    assert same(base.state.weights, other.state.weights)
    assert records(base) == records(other)
    rec = records(base)[-1]
    assert rec["sim_hours"] > 0 and rec["cum_energy_j"] > 0
    text = summary(base)
    assert "simulated" in text and "kJ" in text


def test_a_run_records_simulated_time_and_energy_and_resumes_with_its_clock(tmp_path):
    import shutil

    over = dict(fleet=FLEET, sim_start_hour=23, clients=8, rounds=4, fraction=0.5,
                sim_deadline=60.0, over_select=1.5, keep_checkpoints=10)
    full = run(tmp_path, "full", **over)
    recs = records(full)
    assert all(r["clients_selected"] == 6 for r in recs)  # ⌈1.5 · 4⌉ asked
    assert all(r["clients_succeeded"] <= 4 for r in recs)
    assert sum(r["over_selected"] for r in recs) > 0
    hours = [r["sim_hours"] for r in recs]
    assert hours == sorted(hours) and hours[0] > 0
    copy = tmp_path / "copy"
    shutil.copytree(full.run_dir.path, copy)
    for n in (3, 4):
        (copy / "checkpoints" / f"round-00000{n}.safetensors").unlink()
    (copy / "model.safetensors").unlink()
    resumed = execute(RunDir(copy).saved_config(), RunDir(copy), resuming=True, live=False,
                      stream=io.StringIO())
    assert same(resumed.state.weights, full.state.weights)
    assert records(resumed) == recs


def cli(args, env):
    return subprocess.run([sys.executable, "-m", "tinyfed", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_fleet_command_describes_a_mix_by_hand(cli_env):
    out = cli(["fleet", "--fleet", "phones-lte:3,lora-sensors:1", "--clients", "8",
               "--model", "mlp", "--dataset", "fmnist", "--json"], cli_env)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    rows = {r["profile"]: r for r in got["profiles"]}
    assert rows["phones-lte"]["clients"] == 6 and rows["lora-sensors"]["clients"] == 2
    phone = FLEETS["phones-lte"]
    down = phone.latency_s + got["task_down_bytes"] * 8 / (phone.down_kbps * 1000)
    assert rows["phones-lte"]["download_s"] == pytest.approx(down)
    gflop = got["gflop_per_example"] * 600
    assert rows["phones-lte"]["compute_s"] == pytest.approx(gflop / phone.gflops)
    assert 0.0007 < got["gflop_per_example"] < 0.0013  # the 2NN: ~0.2 M MACs forward, ×3
    assert not rows["lora-sensors"]["fits_memory"] and rows["phones-lte"]["fits_memory"]
    text = cli(["fleet", "--fleet", "phones-lte", "--clients", "4"], cli_env)
    assert text.returncode == 0 and "phones-lte" in text.stdout


@pytest.mark.parametrize("content, suffix, needle", [
    ("client_id,gflops\n0,1\n", ".csv", "no row for client(s) [1, 2, 3]"),
    ("client_id,speed\n0,1\n", ".csv", "line 2: unknown column 'speed'"),
    ("client_id,gflops\n0,1\n1,fast\n2,1\n3,1\n", ".csv", "line 3: field 'gflops' = 'fast' is "
     "not a number"),
    ("client_id,up_kbps\n0,0\n1,1\n2,1\n3,1\n", ".csv", "line 2: field 'up_kbps' = 0.0; a "
     "finite number > 0"),
    ("client_id,latency_s\n0,-1\n1,1\n2,1\n3,1\n", ".csv", "field 'latency_s' = -1.0"),
    ('[{"client_id": 0}, {"client_id": 9}]', ".json", "entry 2: field 'client_id' = 9"),
    ('{"client_id": 0}', ".json", "a JSON list of objects"),
    ("client_id,window\n0,25-3\n1,\n2,\n3,\n", ".csv", "field 'window' = '25-3'"),
])
def test_a_bad_trace_is_one_line_naming_file_line_and_field(tmp_path, cli_env, content, suffix,
                                                            needle):
    trace = tmp_path / f"trace{suffix}"
    trace.write_text(content)
    out = cli(["run", "--dataset", "synthetic", "--model", "mlp128", "--clients", "4",
               "--rounds", "1", "--fleet", str(trace), "--out", str(tmp_path / "r")], cli_env)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr and str(trace) in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


@pytest.mark.parametrize("args, needle", [
    (["--fleet", "toasters"], "unknown profile 'toasters'; allowed: lora-sensors"),
    (["--fleet", "phones-lte:-1"], "share '-1' of 'phones-lte' must be a number > 0"),
    (["--fleet", "lora-sensors", "--sim-deadline", "1"], "no device can meet it"),
    (["--over-select", "1.5"], "name a fleet"),
    (["--fleet", "phones-lte", "--over-select", "0.5"], "'over_select' = 0.5"),
])
def test_bad_fleet_settings_are_one_line_exit_2(tmp_path, cli_env, args, needle):
    out = cli(["run", "--dataset", "synthetic", "--model", "mlp128", "--clients", "4",
               "--rounds", "1", *args, "--out", str(tmp_path / "r")], cli_env)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_a_trace_row_can_start_from_a_named_profile(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("client_id,profile,gflops,window\n0,phones-lte,2,\n1,lora-sensors,,\n")
    fleet = build_fleet(str(trace), 2, 0)
    assert fleet[0].gflops == 2.0 and fleet[0].up_kbps == FLEETS["phones-lte"].up_kbps
    assert fleet[0].window == "" and fleet[1].duty_cycle == 1.0
    with pytest.raises(ConfigError, match="line 2: field 'profile' = 'toaster'"):
        trace.write_text("client_id,profile\n0,toaster\n1,\n")
        build_fleet(str(trace), 2, 0)
