"""The dashboard in a real headless Chromium: live rounds, exact numbers, reconnects.

Needs Debian's chromium and the playwright Python package (its driver only; never a browser
download). Screenshots go to test-artifacts/ at the repo root.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
TABLE_KEYS = ["round", "test_accuracy", "test_loss", "train_loss", "clients_selected",
              "clients_succeeded", "clients_failed", "bytes_down", "bytes_up", "cum_bytes_down",
              "cum_bytes_up", "wall_seconds"]
WAIT_MS = 120_000

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sync_playwright is None,
                       reason="playwright (Python package) not installed: pip install playwright"),
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason=f"chromium not found at {CHROMIUM} (apt-get install chromium)"),
]


@pytest.fixture
def browser():
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


class Proc:
    """A tinyfed subprocess whose stdout lines we read; always ended by its pid."""

    def __init__(self, args: list[str], env: dict, cwd: Path):
        self.p = subprocess.Popen([sys.executable, "-m", "tinyfed", *args], env=env, cwd=cwd,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []

    def read_until(self, pattern: str) -> re.Match:
        for line in self.p.stdout:
            self.lines.append(line)
            found = re.search(pattern, line)
            if found:
                return found
        raise AssertionError(f"process ended before {pattern!r}: {''.join(self.lines)}"
                             f"{self.p.stderr.read()}")

    def stop(self) -> str:
        """End the process (SIGINT, as Ctrl+C) and return its stderr; safe to call twice."""
        if self.p.stderr.closed:
            return ""
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGINT)
            try:
                self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.p.pid, signal.SIGKILL)
                self.p.wait()
        err = self.p.stderr.read()
        self.p.stdout.close()
        self.p.stderr.close()
        return err


def points(page) -> int:
    return int(page.get_attribute("#chart-accuracy", "data-points") or 0)


def page_rows(page) -> list[dict[str, str]]:
    return page.eval_on_selector_all(
        "table.records tbody tr",
        "rows => rows.map(r => Object.fromEntries([...r.cells].map(c => [c.dataset.key, "
        "c.textContent])))")


def assert_page_matches(page, records: list[dict]) -> None:
    """The table cells and the page's data are the records' own numbers, bit for bit."""
    rounds = [r for r in records if r.get("kind", "round") == "round"]
    rows = page_rows(page)
    assert len(rows) == len(rounds)
    for row, rec in zip(rows, rounds):
        for key in TABLE_KEYS:
            if rec.get(key) is None:
                assert row[key] == ""
            else:
                assert float(row[key]) == rec[key], (key, row[key], rec[key])
    data = page.evaluate("window.tinyfedData.runs[0].records")
    assert data == records


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_run_with_dashboard_plots_live_rounds_that_match_metrics(browser, tmp_path, cli_env):
    out = tmp_path / "run"
    # client 3 answers round 2 after 4 s: the page must show that round in progress meanwhile
    # (the fused trainer: clients one by one; stacked, a round's clients arrive together)
    env = {**cli_env, "TINYFED_TEST_FAULT": "sleep=4:3:2"}
    run = Proc(["run", "--dataset", "synthetic", "--set", "synthetic_size=600", "--model",
                "mlp128", "--clients", "4", "--rounds", "4", "--seed", "5", "--trainer", "fused",
                "--plain", "--out", str(out), "--dashboard", "--dashboard-port", "0"],
               env, tmp_path)
    try:
        url = run.read_until(r"dashboard: (http://127\.0\.0\.1:\d+/)").group(1)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_function("(window.tinyfedProgress || '').includes('round 2: 3/4 clients')",
                               timeout=WAIT_MS)
        assert page.is_visible("#progress")
        page.wait_for_function(
            "+document.querySelector('#chart-accuracy')?.dataset.points >= 2", timeout=WAIT_MS)
        seen_first = points(page)
        run.read_until(r"dashboard: run finished")
        page.wait_for_function(
            "+document.querySelector('#chart-accuracy').dataset.points === 4", timeout=WAIT_MS)
        page.wait_for_function("window.tinyfedProgress === ''", timeout=WAIT_MS)  # all in
        page.click("#card-records summary")
        records = read_metrics(out / "metrics.jsonl")
        assert [r["round"] for r in records] == [1, 2, 3, 4]
        assert_page_matches(page, records)
        assert not page.is_visible("#card-privacy")  # no DP, no privacy card
        # The estimate line is W·C·R with W = the encoded model and C = 4 clients per round.
        meta = page.evaluate("window.tinyfedData.runs[0]")
        assert meta["clients_per_round"] == 4
        assert meta["partition"] == json.loads((out / "partition.json").read_text())
        # Hover over round 2 shows that round's exact accuracy in the legend.
        legend = page.evaluate(
            "(() => { const u = tinyfedCharts.accuracy.plot;"
            " u.setCursor({left: u.valToPos(2, 'x'), top: 20});"
            " return [...document.querySelectorAll('#chart-accuracy .u-legend .u-value')]"
            ".map(e => e.textContent); })()")
        acc2 = records[1]["test_accuracy"]
        assert legend[1].startswith(f"{acc2!r} (") or legend[1].startswith(
            json.dumps(acc2) + " (")
        assert errors == []
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-run.png"), full_page=True)
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(300)  # let the resize handler redraw (not an assertion)
        page.screenshot(path=str(ARTIFACTS / "dashboard-run-narrow.png"), full_page=True)
        widths = page.evaluate("[...document.querySelectorAll('.card')]"
                               ".map(c => c.getBoundingClientRect().right)")
        assert max(widths) <= 390
        print(f"rounds plotted when first seen: {seen_first}")
    finally:
        run.stop()
    assert run.p.returncode is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real 3-round run on synthetic data, written by the runner in this process."""
    from tests.conftest import small_config
    from tinyfed.runner import execute, open_run

    out = tmp_path_factory.mktemp("finished") / "run"
    run_dir, config = open_run(small_config(rounds=3, out=str(out)), None, {})
    execute(config, run_dir, live=False, stream=open(os.devnull, "w"))  # noqa: SIM115
    return out


def test_dashboard_tails_a_folder_reports_bad_lines_and_survives_a_restart(
        browser, tmp_path, cli_env, finished_run):
    live = tmp_path / "live"
    live.mkdir()
    for name in ("config.toml", "partition.json"):
        shutil.copy(finished_run / name, live / name)
    lines = (finished_run / "metrics.jsonl").read_text().splitlines(keepends=True)
    metrics = live / "metrics.jsonl"
    port = free_port()
    dash = Proc(["dashboard", str(live), str(tmp_path / "missing"), "--port", str(port)],
                cli_env, tmp_path)
    dash2 = None
    try:
        url = dash.read_until(r"(http://127\.0\.0\.1:\d+/)").group(1)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(url)
        page.wait_for_selector("text=has no metrics.jsonl yet", timeout=WAIT_MS)
        page.wait_for_selector("text=does not exist; waiting for it to appear")
        metrics.write_text(lines[0])
        page.wait_for_function(
            "+document.querySelector('#chart-accuracy').dataset.points === 1", timeout=WAIT_MS)
        with metrics.open("a") as fh:
            fh.write('{"kind": "round", "round": oops}\n' + lines[1])
        page.wait_for_function(
            "+document.querySelector('#chart-accuracy').dataset.points === 2", timeout=WAIT_MS)
        page.wait_for_selector("text=1 malformed line(s) in metrics.jsonl were skipped")
        assert page.get_by_text(f"{metrics}:2: not valid JSON").is_visible()
        # Restart the server on the same port; the open page reconnects and re-syncs.
        err = dash.stop()
        assert f"skipped {metrics}:2: not valid JSON" in err
        page.wait_for_selector("#status[data-state=reconnecting]", timeout=WAIT_MS)
        with metrics.open("a") as fh:
            fh.write(lines[2])
        dash2 = Proc(["dashboard", str(live), "--port", str(port)], cli_env, tmp_path)
        dash2.read_until(r"http://")
        page.wait_for_function(
            "+document.querySelector('#chart-accuracy').dataset.points === 3", timeout=WAIT_MS)
        page.wait_for_selector("#status[data-state=live]", timeout=WAIT_MS)
        page.click("#card-records summary")
        good = [json.loads(line) for line in lines]
        assert_page_matches(page, good)  # three rounds, none twice
        assert page.evaluate("window.tinyfedData.runs.length") == 1  # the old 'missing' is gone
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-folder.png"), full_page=True)
    finally:
        try:
            dash.stop()
        finally:
            if dash2 is not None:
                dash2.stop()


def test_a_private_run_shows_epsilon_per_round(browser, tmp_path, cli_env):
    """dp-fedavg records ε each round: the page shows the privacy card with those values
    (hidden for runs without DP) and an ε column."""
    from tests.conftest import small_config
    from tinyfed.runner import execute, open_run

    out = tmp_path / "dp"
    run_dir, config = open_run(small_config(rounds=3, out=str(out), strategy="dp-fedavg",
                                            clients=8, fraction=0.5), None, {})
    execute(config, run_dir, live=False, stream=open(os.devnull, "w"))  # noqa: SIM115
    eps = [r["epsilon"] for r in read_metrics(out / "metrics.jsonl")]
    port = free_port()
    dash = Proc(["dashboard", str(out), "--port", str(port)], cli_env, tmp_path)
    try:
        url = dash.read_until(r"(http://127\.0\.0\.1:\d+/)").group(1)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(url)
        page.wait_for_function(
            "+document.querySelector('#chart-privacy')?.dataset.points === 3", timeout=WAIT_MS)
        assert page.is_visible("#card-privacy")
        assert page.evaluate("window.tinyfedData.runs[0].records.map(r => r.epsilon)") == eps
        page.click("#card-records summary")
        headers = page.evaluate("[...document.querySelectorAll('#tables th')]"
                                ".map(th => th.textContent)")
        assert "epsilon" in headers
        assert eps == sorted(eps) and eps[0] > 0
    finally:
        dash.stop()


def test_a_simulated_fleet_run_plots_accuracy_against_device_time_and_energy(browser, tmp_path,
                                                                            cli_env):
    """A run on a simulated fleet records hours and energy: two cards (hidden for other runs)
    plot its accuracy against them, point for point."""
    from tests.conftest import small_config
    from tinyfed.runner import execute, open_run

    out = tmp_path / "fleet"
    run_dir, config = open_run(small_config(rounds=3, out=str(out), clients=6, fraction=0.5,
                                            fleet="phones-lte:1,nbiot-meters:1",
                                            sim_start_hour=23), None, {})
    execute(config, run_dir, live=False, stream=open(os.devnull, "w"))  # noqa: SIM115
    recs = read_metrics(out / "metrics.jsonl")
    port = free_port()
    dash = Proc(["dashboard", str(out), "--port", str(port)], cli_env, tmp_path)
    try:
        url = dash.read_until(r"(http://127\.0\.0\.1:\d+/)").group(1)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(url)
        for card in ("simtime", "energy"):
            page.wait_for_function(
                f"+document.querySelector('#chart-{card}')?.dataset.points === 3",
                timeout=WAIT_MS)
            assert page.is_visible(f"#card-{card}")
        assert not page.is_visible("#card-privacy")
        hours = page.evaluate("window.tinyfedData.runs[0].records.map(r => r.sim_hours)")
        assert hours == [r["sim_hours"] for r in recs] and hours == sorted(hours)
    finally:
        dash.stop()
