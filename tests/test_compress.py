"""Update codecs: round trips against hand computation, error feedback, composition, and every
malformed encoding rejected before it reaches the model."""

from __future__ import annotations

import math

import pytest
import torch
import zstandard

from tests.conftest import small_config
from tinyfed import wire
from tinyfed.compress import TopK, downlink, parse_pipeline, rebase
from tinyfed.errors import ConfigError, WireError
from tinyfed.protocol import ClientResult, ClientTask, Expectation, read_update
from tinyfed.wire import Kind


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def roundtrip(spec, tensors, reference=None, state=None):
    p = parse_pipeline(spec, WireError)
    reference = reference if reference is not None else {k: torch.zeros_like(v)
                                                         for k, v in tensors.items()}
    enc = p.encode(tensors, reference, state)
    # through real safetensors bytes, as on the wire
    enc = wire.decode_frame(wire.encode_frame(Kind.UPDATE, {}, wire.encode_tensors(enc))).tensors
    return enc, p.decode(enc, reference)


# -- fp16 ---------------------------------------------------------------------------------------

def test_fp16_exact_on_representable_values_and_bounded_elsewhere():
    exact = torch.tensor([0.5, -1.25, 3.0, 1024.0, 0.0, 2.0**-14])
    enc, dec = roundtrip("fp16", {"w": exact})
    assert enc["w"].dtype == torch.float16
    assert torch.equal(dec["w"], exact) and dec["w"].dtype == torch.float32
    x = rand(1000)
    _, dec = roundtrip("fp16", {"w": x})
    # round to nearest half: relative error at most 2^-11 for normal numbers
    assert bool(((dec["w"] - x).abs() <= x.abs() * 2.0**-11 + 2.0**-25).all())


def test_fp16_refuses_values_it_cannot_represent():
    with pytest.raises(WireError, match="65504"):
        parse_pipeline("fp16").encode({"w": torch.tensor([7e4])}, {})


# -- int8 ---------------------------------------------------------------------------------------

def test_int8_by_hand():
    x = torch.tensor([0.0, 1.0, 3.0, 1.6])
    enc, dec = roundtrip("int8", {"w": x})
    # lo = 0, hi = 3, scale = 3/255; q = round(x/scale) - 128: 0->-128, 1->85-128, 3->127,
    # 1.6/scale = 136 -> 8
    assert enc["w::q"].tolist() == [-128, -43, 127, 8]
    assert enc["w::scale"].tolist() == pytest.approx([3 / 255])
    assert enc["w::zero"].tolist() == [0.0]
    assert dec["w"].tolist() == pytest.approx([0.0, 1.0, 3.0, 136 * 3 / 255], abs=1e-6)


def test_int8_error_at_most_half_a_step_per_element():
    x = rand(50, 40) * 3
    enc, dec = roundtrip("int8", {"w": x})
    scale = float(enc["w::scale"][0])
    assert scale == pytest.approx((float(x.max()) - float(x.min())) / 255)
    assert float((dec["w"] - x).abs().max()) <= scale / 2 * (1 + 1e-4)


def test_int8_per_channel_one_scale_per_output_row():
    x = torch.stack([rand(30, seed=1) * 0.01, rand(30, seed=2) * 10.0])  # very different ranges
    enc, dec = roundtrip("int8:channel", {"w": x, "b": rand(2)})
    assert enc["w::scale"].shape == (2,) and enc["b::scale"].shape == (1,)  # 1-D stays per tensor
    for row in range(2):
        step = float(enc["w::scale"][row])
        assert step == pytest.approx(float(x[row].max() - x[row].min()) / 255)
        assert float((dec["w"][row] - x[row]).abs().max()) <= step / 2 * (1 + 1e-4)
    per_tensor = roundtrip("int8", {"w": x})[1]["w"]
    assert (dec["w"][0] - x[0]).abs().max() < (per_tensor[0] - x[0]).abs().max() / 100


def test_int8_constant_tensor_is_exact():
    _, dec = roundtrip("int8", {"w": torch.full((5,), 0.7)})
    assert torch.equal(dec["w"], torch.full((5,), 0.7))


# -- top-k and error feedback -----------------------------------------------------------------

def test_topk_keeps_exactly_the_largest_k_by_magnitude():
    x = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).float() - 500.0
    x[::2] *= -1
    ref = {"w": torch.zeros(1000)}
    enc, dec = roundtrip("delta+topk:0.05", {"w": x}, ref)
    k = 50
    assert enc["w::idx"].dtype == torch.int32 and enc["w::idx"].numel() == k
    want = set(torch.argsort(x.abs(), descending=True)[:k].tolist())
    assert set(enc["w::idx"].tolist()) == want
    kept = torch.zeros(1000)
    kept[list(want)] = x[list(want)]
    assert torch.equal(dec["w"], kept)


def test_topk_k_is_at_least_one_and_rounds_up():
    assert TopK(0.01).k_of(10) == 1 and TopK(0.01).k_of(156_800) == 1568
    assert TopK(0.01).k_of(150) == 2 and TopK(1.0).k_of(7) == 7


def test_error_feedback_residual_is_what_was_not_sent_and_nothing_is_lost():
    p = parse_pipeline("delta+topk:0.1")
    ref = {"w": torch.zeros(200)}
    state: dict = {}
    total_in, total_sent = torch.zeros(200), torch.zeros(200)
    prev_residual = torch.zeros(200)
    for rnd in range(6):
        x = rand(200, seed=rnd)
        enc = p.encode({"w": x}, ref, state)
        sent = p.decode(enc, ref)["w"]
        residual = state["topk_residual"]["w"]
        assert torch.allclose(sent + residual, x + prev_residual, atol=1e-6)
        assert int((sent != 0).sum()) == 20 and bool((residual[enc["w::idx"].long()] == 0).all())
        total_in += x
        total_sent += sent
        prev_residual = residual
    assert torch.allclose(total_sent + prev_residual, total_in, atol=1e-5)


@pytest.mark.parametrize("spec", ["delta+topk:0.01+int8", "delta+topk:0.05+int8:channel",
                                  "delta+topk:0.02+fp16"])
def test_error_feedback_is_exact_over_the_whole_pipeline(spec):
    """200 rounds of the same delta g: what the server decoded plus what the client still
    holds is t·g at every round (Stich et al. 2018), the quantization of the sent values
    included. Before, the int8 rounding was dropped and this drift reached 4.7e-2."""
    p = parse_pipeline(spec)
    g = rand(2000, seed=7) * 0.01
    ref = {"w": torch.zeros(2000)}
    state: dict = {}
    delivered = torch.zeros(2000, dtype=torch.float64)
    worst = 0.0
    for t in range(1, 201):
        enc = p.encode({"w": g}, ref, state)
        delivered += p.decode(enc, ref)["w"].double()
        residual = state["topk_residual"]["w"].double()
        worst = max(worst, float((t * g.double() - delivered - residual).norm()))
    assert worst < 1e-4, worst


# -- composition and specs ----------------------------------------------------------------------

def test_composition_delta_topk_int8():
    ref = {"w": rand(100, 50, seed=1), "b": rand(50, seed=2), "n": torch.tensor(3)}
    local = {k: (v + 0.01 * rand(*v.shape, seed=3) if v.is_floating_point() else v)
             for k, v in ref.items()}
    enc, dec = roundtrip("delta+topk:0.1+int8", local, ref)
    assert set(enc) == {"w::idx", "w::val::q", "w::val::scale", "w::val::zero", "b::idx",
                        "b::val::q", "b::val::scale", "b::val::zero", "n"}
    delta = local["w"] - ref["w"]
    k = 500
    top = torch.argsort(delta.flatten().abs(), descending=True)[:k]
    got = (dec["w"] - ref["w"]).flatten()
    step = float(enc["w::val::scale"][0])
    assert float((got[top] - delta.flatten()[top]).abs().max()) <= step / 2 + 1e-6
    mask = torch.ones(5000, dtype=torch.bool)
    mask[top] = False
    assert float(got[mask].abs().max()) < 1e-6
    assert torch.equal(dec["n"], ref["n"])


def test_spec_rules():
    spec = parse_pipeline(" delta + topk:0.010 + int8:channel ").spec
    assert spec == "delta+topk:0.01+int8:channel"
    for bad, msg in [("bogus", "unknown codec"), ("topk:0.1", "needs delta"),
                     ("int8+delta", "cannot follow"), ("delta+fp16+int8", "cannot follow"),
                     ("delta+delta", "cannot follow"), ("delta+topk:0", r"\(0, 1\]"),
                     ("delta+topk:x", r"\(0, 1\]"), ("int8:row", "channel"), ("fp16:3", "no arg"),
                     ("delta+qsgd:1", "2-8"), ("delta+qsgd:9", "2-8"), ("delta+qsgd:x", "2-8"),
                     ("delta+stc:2", r"\(0, 1\]"), ("delta+zstd+int8", "cannot follow"),
                     ("delta+qsgd:4+int8", "cannot follow"), ("stc:0.1", "needs delta"),
                     ("delta+topk:0.1+qsgd:4", "variance is 1.59")]:
        with pytest.raises(ConfigError, match=msg):
            parse_pipeline(bad)
    assert parse_pipeline("delta+stc:0.05+zstd").spec == "delta+topk:0.05+ternary+zstd"
    for bad in ("topk:0.1", "int8+ternary", "ternary"):  # a whole model cannot be sparsified
        with pytest.raises(ConfigError, match="start with delta"):
            parse_pipeline(bad, downlink=True)
    with pytest.raises(ConfigError, match="qsgd:5 or more"):
        parse_pipeline("delta+qsgd:4", downlink=True)  # steps feed their error back too
    for good in ("delta", "delta+topk:0.1+int8+zstd", "qsgd:4+zstd", "int8:channel+zstd",
                 "delta+qsgd:5"):
        assert parse_pipeline(good, downlink=True).spec == good


def test_config_rejects_bad_codecs_early():
    with pytest.raises(ConfigError, match="'codec' = 'bogus'"):
        small_config(codec="bogus")
    with pytest.raises(ConfigError, match="down_codec"):
        small_config(down_codec="ternary")
    assert small_config(codec="delta + int8", down_codec="fp16").codec == "delta+int8"


# -- malformed encodings ------------------------------------------------------------------------

REF = {"w": torch.zeros(4, 5), "b": torch.zeros(5)}


def good(spec):
    local = {"w": rand(4, 5), "b": rand(5, seed=1)}
    return parse_pipeline(spec).encode(local, REF, {})


def tamper(spec, **changes):
    enc = good(spec)
    for k, v in changes.items():
        key = k.replace("__", "::")
        if v is None:
            del enc[key]
        else:
            enc[key] = v
    return enc


BAD = [
    ("delta+topk:0.25", dict(w__idx=torch.tensor([0, 1, 2], dtype=torch.int32)), "expected 5"),
    ("delta+topk:0.25", dict(w__idx=torch.tensor([0, 1, 2, 3, 20], dtype=torch.int32)),
     "out of range"),
    ("delta+topk:0.25", dict(w__idx=torch.tensor([0, 1, 2, 3, -1], dtype=torch.int32)),
     "out of range"),
    ("delta+topk:0.25", dict(w__idx=torch.tensor([0, 1, 2, 3, 3], dtype=torch.int32)),
     "repeated"),
    ("delta+topk:0.25", dict(w__idx=torch.zeros(5)), "int32/int64"),
    ("delta+topk:0.25", dict(w__val=torch.zeros(4)), "expected 5"),
    ("delta+topk:0.25", dict(w__val=None), "missing"),
    ("delta+topk:0.25", dict(w=torch.zeros(4, 5)), "both encoded and plain"),
    ("delta+topk:0.25", dict(x__idx=torch.zeros(1, dtype=torch.int32), x__val=torch.zeros(1)),
     "unknown tensor"),
    ("int8", dict(w__scale=torch.tensor([float("nan")])), "non-finite"),
    ("int8", dict(w__scale=torch.tensor([float("inf")])), "non-finite"),
    ("int8", dict(w__zero=torch.tensor([float("-inf")])), "non-finite"),
    ("int8", dict(w__scale=torch.tensor([-1.0])), "negative"),
    ("int8", dict(w__scale=torch.tensor([1.0, 1.0, 1.0])), "3 scales"),
    ("int8", dict(w__zero=torch.tensor([0.0, 0.0])), "zero points"),
    ("int8", dict(w__q=torch.zeros(4, 5)), "expected int8"),
    ("int8", dict(w__q=None), "missing"),
    ("int8", dict(w__scale=torch.tensor([1.0], dtype=torch.float64)), "float32"),
    ("int8", dict(w__scale=torch.tensor([3e38]), w__zero=torch.tensor([3e38])), "non-finite"),
    ("int8", dict(extra=torch.zeros(3)), "not encoded"),
    ("fp16", dict(w=torch.zeros(4, 5)), "expected float16"),
    ("fp16", dict(w=torch.full((4, 5), float("inf"), dtype=torch.float16)), "non-finite"),
    ("delta+topk:0.25", dict(w__idx=torch.tensor([0, 2, 1, 3, 4], dtype=torch.int32)),
     "unsorted"),
    # QSGD: the shape, the norms and the packed levels must agree with each other and the model
    ("delta+qsgd:4", dict(w__shape=torch.tensor([4, 6])), "more elements"),
    ("delta+qsgd:4", dict(w__shape=torch.tensor([10**12])), "more elements"),
    ("delta+qsgd:4", dict(w__shape=torch.tensor([-4, -5])), "negative"),
    ("delta+qsgd:4", dict(w__shape=torch.tensor([4.0, 5.0])), "int64"),
    ("delta+qsgd:4", dict(w__bits=torch.zeros(9, dtype=torch.uint8)), "packed bytes"),
    ("delta+qsgd:4", dict(w__bits=torch.zeros(10, dtype=torch.int8)), "uint8"),
    ("delta+qsgd:4", dict(w__norm=torch.tensor([float("nan")])), "non-finite"),
    ("delta+qsgd:4", dict(w__norm=torch.tensor([-1.0])), "negative"),
    ("delta+qsgd:4", dict(w__norm=torch.tensor([1.0, 1.0])), "1 float32"),
    ("delta+qsgd:4", dict(w__bits=torch.full((10,), 255, dtype=torch.uint8)), "beyond ±7"),
    ("delta+qsgd:4", dict(w__norm=None), "missing"),
    ("delta+qsgd:4", dict(x__bits=torch.zeros(1, dtype=torch.uint8), x__norm=torch.zeros(1),
                          x__shape=torch.tensor([1])), "unknown tensor"),
    ("delta+stc:0.25", dict(w__val__mu=torch.tensor([float("inf")])), "finite"),
    ("delta+stc:0.25", dict(w__val__mu=torch.tensor([-0.5])), "≥ 0"),
    ("delta+stc:0.25", dict(w__val__sign=torch.zeros(3, dtype=torch.uint8)), "packed bytes"),
    ("delta+stc:0.25", dict(w__val__shape=torch.tensor([6])), "expected 5"),
    ("delta+int8+zstd", dict(w=torch.zeros(4, 5)), "expected one"),
    ("delta+int8+zstd", {"__zstd": torch.tensor([1, 2, 3], dtype=torch.uint8)}, "not a zstd"),
]


@pytest.mark.parametrize("spec,changes,msg", BAD, ids=[f"{s}:{m}" for s, _, m in BAD])
def test_malformed_encoding_is_a_wire_error(spec, changes, msg):
    enc = tamper(spec, **changes)
    with pytest.raises(WireError, match=msg):
        parse_pipeline(spec, WireError).decode(enc, REF)


def update_frame(codec, tensors, **header):
    h = {"client_id": 1, "round": 1, "version": 0, "num_examples": 10, "codec": codec,
         "metrics": {}, **header}
    return wire.encode_frame(Kind.UPDATE, h, wire.encode_tensors(tensors))


@pytest.mark.parametrize("codec,tensors,msg", [
    ("zip", {"w": torch.zeros(4, 5), "b": torch.zeros(5)}, "unknown codec 'zip'"),
    ("topk:0.25", {"w": torch.zeros(4, 5), "b": torch.zeros(5)}, "needs delta"),
    ("delta+topk:0.25", tamper("delta+topk:0.25", w__idx=torch.tensor(
        [0, 1, 2, 3, 99], dtype=torch.int32)), "out of range"),
    ("int8", tamper("int8", b__scale=torch.tensor([float("nan")])), "non-finite"),
    ("int8", {**tamper("int8"), "w::bogus": torch.zeros(1, dtype=torch.int32)},
     "unknown tensors"),
    ("delta+qsgd:12", tamper("delta+qsgd:4"), "2-8"),  # a bit width outside what QSGD allows
    ("delta+qsgd:4", {**tamper("delta+qsgd:4"), "w::shape": torch.tensor([4, 5000])},
     "more elements"),  # a shape lie: never allocated
    ("delta+int8+zstd", {"::zstd": torch.frombuffer(bytearray(zstandard.ZstdCompressor()
                                                              .compress(bytes(2 << 20))),
                                                    dtype=torch.uint8)}, "does not decode"),
])
def test_malformed_update_is_rejected_by_the_server(codec, tensors, msg):
    task = ClientTask(1, 1, 0, small_settings(), codec)
    exp = Expectation(task, REF, wire.spec_of(REF), max_examples=100)
    result: ClientResult = read_update(update_frame(codec, tensors), exp)
    assert not result.ok and result.reason.startswith("rejected update") and msg in result.reason


@pytest.mark.parametrize("sent", ["", "delta", "delta+topk:0.5", "fp16"])
def test_update_in_another_codec_than_its_task_is_refused(sent):
    """A client may not bypass the run's byte budget by sending dense fp32 (or anything but
    the codec its task named)."""
    task = ClientTask(1, 1, 0, small_settings(), "delta+topk:0.25+int8")
    exp = Expectation(task, REF, wire.spec_of(REF), max_examples=100)
    tensors = parse_pipeline(sent).encode({k: v + 1 for k, v in REF.items()}, REF, {})
    result = read_update(update_frame(sent, tensors), exp)
    assert not result.ok
    assert f"update codec {sent!r} differs from its task's 'delta+topk:0.25+int8'" in result.reason


def small_settings():
    from tinyfed.client import TrainSettings

    return TrainSettings(1, 10, "sgd", 0.1, 0.0, 0.0)


# -- downlink -----------------------------------------------------------------------------------

def test_downlink_reference_is_what_the_client_decodes():
    from tinyfed.experiment import Experiment
    from tinyfed.protocol import ClientWorker, check_update, task_frame

    cfg = small_config(codec="delta", down_codec="int8")
    exp = Experiment.build(cfg)
    weights = {k: v + 0.37 for k, v in exp.initial.items()}
    payload, seen = downlink(weights, "int8")
    assert len(payload) < len(wire.encode_tensors(weights)) / 3.5
    worker = ClientWorker(cfg.model, exp.dataset.input_shape, 10, exp.shard)
    task = ClientTask(0, 1, 5, small_settings(), cfg.codec, down_codec="int8")
    reply = worker.handle(task_frame(task, payload))
    local = {k: v.detach().clone() for k, v in worker.model.state_dict().items()}
    got = check_update(reply, Expectation(task, seen, exp.spec, 10_000)).weights
    delta_err = max(float((got[k] - local[k]).abs().max()) for k in local)
    assert delta_err < 1e-5  # only float rounding of (seen + delta)
    wrong = check_update(reply, Expectation(task, weights, exp.spec, 10_000)).weights
    assert max(float((wrong[k] - local[k]).abs().max()) for k in local) > 10 * delta_err
    # rebase: the exact model plus the client's change
    moved = rebase(got, seen, weights)
    assert all(torch.allclose(moved[k], weights[k] + (got[k] - seen[k])) for k in got)


def test_worker_rejects_downlink_steps_without_a_base_version():
    from tinyfed.experiment import Experiment
    from tinyfed.protocol import ClientWorker, task_frame

    cfg = small_config()
    exp = Experiment.build(cfg)
    worker = ClientWorker(cfg.model, exp.dataset.input_shape, 10, exp.shard)
    task = ClientTask(0, 1, 5, small_settings(), "", down_codec="delta")
    reply = wire.decode_frame(worker.handle(task_frame(task, wire.encode_tensors(exp.initial))))
    assert reply.kind == Kind.FAILURE and "no base_version" in reply.header["reason"]


# -- whole runs ---------------------------------------------------------------------------------

def run_weights(tmp_path, name, **over):
    from tinyfed.rundir import RunDir
    from tinyfed.runner import execute

    cfg = small_config(model="mlp", rounds=2, out=str(tmp_path / name), **over)
    res = execute(cfg, RunDir.create(cfg), live=False, stream=open("/dev/null", "w"))  # noqa: SIM115
    return res.state


def test_fedavg_over_decoded_deltas_equals_fedavg_over_weights(tmp_path):
    plain = run_weights(tmp_path, "plain")
    delta = run_weights(tmp_path, "delta", codec="delta")
    for k in plain.weights:
        assert torch.allclose(plain.weights[k], delta.weights[k], atol=1e-6, rtol=0), k
    assert plain.weights["1.weight"].abs().sum() > 0


def test_compressed_run_moves_fewer_bytes_and_still_learns(tmp_path):
    plain = run_weights(tmp_path, "plain")
    comp = run_weights(tmp_path, "comp", codec="delta+topk:0.05+int8", down_codec="int8:channel")
    assert comp.cum_bytes_up * 10 < plain.cum_bytes_up
    assert comp.cum_bytes_down * 3.5 < plain.cum_bytes_down
    assert all(r["clients_failed"] == 0 for r in comp.records)
    assert all(math.isfinite(float(v.abs().sum())) for v in comp.weights.values())
