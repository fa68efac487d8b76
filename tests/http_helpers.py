"""Helpers shared by the HTTP tests: a served experiment, task frames, certificates, processes."""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tinyfed.client import TrainSettings, task_seed
from tinyfed.experiment import Experiment
from tinyfed.protocol import ClientTask, Expectation

TOKENS = {0: "tok-zero-aaaaaaaaaaaaaaaa", 1: "tok-one-bbbbbbbbbbbbbbbbb",
          2: "tok-two-ccccccccccccccccc", 3: "tok-three-ddddddddddddddd"}


def auth(cid: int) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[cid]}"}


def make_task(exp: Experiment, cid: int, rnd: int) -> tuple[ClientTask, Expectation]:
    cfg = exp.config
    task = ClientTask(cid, rnd, task_seed(cfg.seed, rnd, cid),
                      TrainSettings(cfg.epochs, cfg.batch_size, lr=cfg.lr), version=rnd - 1)
    expect = Expectation(task, exp.initial, exp.spec, exp.shard_size(cid), cfg.max_frame)
    return task, expect


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 / localhost and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def env() -> dict[str, str]:
    e = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    e["PYTHONPATH"] = src + os.pathsep + e.get("PYTHONPATH", "")
    return e


class Procs:
    """Processes a test starts; every one is ended by pid at teardown."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, log: Path) -> subprocess.Popen:
        fh = log.open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "tinyfed", *args], env=env(),
                                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT)
        fh.close()
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(predicate, limit: float = 120.0, what: str = "condition"):
    """Poll until `predicate()` is truthy (a safety limit, not a timed assertion)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")
