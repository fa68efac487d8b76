"""Linear layers stepping inside their backward (`tinyfed.linear_step`): the same training as
autograd followed by the SGD step, to float tolerance; no weight gradient written; used only
under plain SGD with nothing correcting the gradients, on linear layers that all train."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.test_layout import shard, small_cnn
from tinyfed.client import TrainSettings, train
from tinyfed.linear_step import stepping
from tinyfed.models import state_of

PLAIN = TrainSettings(epochs=2, batch_size=6, lr=0.05)


def test_stepping_trains_what_autograd_and_sgd_train():
    a, b = small_cnn(), small_cnn()
    view = stepping(b, PLAIN, None)
    assert view is not b and all(x is y for x, y in zip(view.parameters(), b.parameters()))
    ma, mb = train(a, shard(), PLAIN, 3), train(view, shard(), PLAIN, 3)
    assert ma["steps"] == mb["steps"] == 14 and abs(ma["train_loss"] - mb["train_loss"]) < 1e-5
    sa, sb = state_of(a), state_of(b)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6, msg=k)
    moved = [k for k in sa if not torch.equal(sa[k], small_cnn().state_dict()[k])]
    assert len(moved) == len(sa)  # every layer trained, linear ones included


def test_no_weight_gradient_is_written_for_a_stepping_layer():
    m = small_cnn()
    view = stepping(m, PLAIN, None)
    x, y = shard(4).x, shard(4).y
    before = m[-1].weight.detach().clone()
    nn.functional.cross_entropy(view(x), y).backward()
    linears = [layer for layer in m if type(layer) is nn.Linear]
    assert all(layer.weight.grad is None and layer.bias.grad is None for layer in linears)
    assert m[0].weight.grad is not None  # the convolutions' gradients as usual
    assert not torch.equal(m[-1].weight, before)  # stepped already, in the backward


def test_stepping_is_bit_identical_run_to_run():
    runs = []
    for _ in range(2):
        m = small_cnn()
        train(stepping(m, PLAIN, None), shard(), PLAIN, 9)
        runs.append(state_of(m))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize("settings, correct", [
    (TrainSettings(epochs=1, batch_size=6, lr=0.05, momentum=0.9), None),
    (TrainSettings(epochs=1, batch_size=6, lr=0.05, weight_decay=1e-3), None),
    (TrainSettings(epochs=1, batch_size=6, lr=0.05, optimizer="adam"), None),
    (PLAIN, lambda: None),  # a client algorithm corrects the gradients: they must exist
])
def test_anything_but_plain_sgd_trains_the_model_itself(settings, correct):
    m = small_cnn()
    assert stepping(m, settings, correct) is m


def test_linear_layers_it_cannot_step_keep_autograd():
    m = small_cnn()
    m[-1].weight.requires_grad_(False)
    assert stepping(m, PLAIN, None) is m
    no_bias = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(200, 5, bias=False))
    assert stepping(no_bias, PLAIN, None) is no_bias
    hooked = small_cnn()
    hooked[-1].register_forward_hook(lambda *_: None)
    assert stepping(hooked, PLAIN, None) is hooked


def test_plain_sgd_is_torch_optims_step_bit_for_bit():
    from tinyfed.client import PlainSGD, make_optimizer

    x, y = shard(40).x, shard(40).y
    results = []
    for make in (lambda ps: PlainSGD(ps, 0.05), lambda ps: torch.optim.SGD(ps, lr=0.05)):
        m = small_cnn()
        m[0].weight.requires_grad_(False)  # frozen parameters are left alone by both
        opt = make(m.parameters())
        for lo in range(0, 40, 8):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x[lo:lo + 8]), y[lo:lo + 8]).backward()
            opt.step()
        results.append(state_of(m))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert isinstance(make_optimizer([], PLAIN), PlainSGD)
    momentum = TrainSettings(lr=0.05, momentum=0.5)
    assert isinstance(make_optimizer(small_cnn().parameters(), momentum), torch.optim.SGD)


def test_a_worker_training_a_cnn_with_plain_sgd_never_imports_torch_dynamo(cli_env):
    """torch.optim's first use imports torch._dynamo (~1 s a process); plain SGD needs none."""
    import subprocess
    import sys

    code = """
import sys
from tests.conftest import small_config
from tinyfed import wire
from tinyfed.client import TrainSettings
from tinyfed.protocol import ClientTask, task_frame
from tinyfed.worker import build_worker
cfg = small_config(model="cnn", threads=1)
worker = build_worker(cfg)
payload = wire.encode_tensors({k: v for k, v in worker.model.state_dict().items()})
reply = worker.handle(task_frame(ClientTask(0, 1, 5, TrainSettings(batch_size=20)), payload))
assert wire.decode_frame(reply).kind == wire.Kind.UPDATE
print("torch._dynamo" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=cli_env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"
