"""Every aggregation rule against hand computation on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from tinyfed.algorithms import CLIENT_ALGORITHMS
from tinyfed.client import TrainSettings
from tinyfed.protocol import ClientResult, ClientTask
from tinyfed.strategies import (
    DPFedAvg,
    FedAvg,
    FedAvgM,
    FedNova,
    FedOpt,
    FedProx,
    Krum,
    Median,
    Scaffold,
    TrimmedMean,
)
from tinyfed.strategies.clipping import clip_update

X = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}


def res(cid: int, n: int, w: list[float], b: float, **extra) -> ClientResult:
    return ClientResult(cid, 1, True, {"w": torch.tensor(w), "b": torch.tensor([b])}, n,
                        extras=extra.get("extras", {}), metrics=extra.get("metrics", {}))


def run_round(strategy, weights, results, round_num=1):
    agg = strategy.begin_round(weights, round_num)
    for r in results:
        agg.add(r)
    return agg.result()


def close(t: torch.Tensor, values: list[float], tol: float = 1e-6) -> bool:
    return torch.allclose(t.double(), torch.tensor(values, dtype=torch.float64), atol=tol, rtol=0)


def test_fedavg_weighted_and_uniform():
    rs = [res(0, 100, [1.0, 2.0], 3.0), res(1, 300, [5.0, 6.0], 7.0)]
    out = run_round(FedAvg(), X, rs)
    assert close(out["w"], [4.0, 5.0]) and close(out["b"], [6.0])  # (100·1+300·5)/400 = 4
    out = run_round(FedAvg(weighted=False), X, rs)
    assert close(out["w"], [3.0, 4.0]) and close(out["b"], [5.0])


def test_fedavgm_momentum_over_two_rounds():
    s = FedAvgM(server_lr=0.5, momentum=0.9)
    w1 = run_round(s, X, [res(0, 1, [3.0, 2.0], 0.5)])  # Δ = [2, 0], v = Δ, w += 0.5·v
    assert close(w1["w"], [2.0, 2.0])
    w2 = run_round(s, w1, [res(0, 1, [3.0, 2.0], 0.5)])  # Δ = [1, 0], v = 0.9·[2,0]+[1,0]
    assert close(w2["w"], [2.0 + 0.5 * 2.8, 2.0])
    assert close(s.tensor_state()["v/w"], [2.8, 0.0])


def fedopt_by_hand(rule: str, deltas: list[float], lr=0.1, b1=0.9, b2=0.99, tau=1e-3):
    """The scalar recursion of Reddi et al.'s Algorithm 2 in plain Python floats."""
    x, m, v = 1.0, 0.0, tau ** 2
    trace = []
    for d in deltas:  # every round's client mean is x + d
        m = b1 * m + (1 - b1) * d
        if rule == "fedadagrad":
            v = v + d * d
        elif rule == "fedadam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d)
        x = x + lr * m / (math.sqrt(v) + tau)
        trace.append((x, m, v))
    return trace


@pytest.mark.parametrize("rule", ["fedadagrad", "fedadam", "fedyogi"])
def test_fedopt_moments_after_several_rounds(rule):
    s = FedOpt(rule, server_lr=0.1)
    w = {"w": torch.tensor([1.0], dtype=torch.float64)}
    deltas = [0.5, -0.2, 0.3, 0.05]
    for (x, m, v), d in zip(fedopt_by_hand(rule, deltas), deltas):
        w = run_round(s, w, [ClientResult(0, 1, True, {"w": w["w"] + d}, 1)])
        state = s.tensor_state()
        assert math.isclose(float(w["w"]), x, rel_tol=1e-12)
        assert math.isclose(float(state["m/w"]), m, rel_tol=1e-12)
        assert math.isclose(float(state["v/w"]), v, rel_tol=1e-12)


def test_fednova_normalises_by_local_steps():
    # batch 10, one epoch: client 0 holds 10 examples (τ=1), client 1 holds 30 (τ=3)
    s = FedNova(epochs=1, batch_size=10)
    x = {"w": torch.tensor([0.0])}
    out = run_round(s, x, [ClientResult(0, 1, True, {"w": torch.tensor([-1.0])}, 10),
                           ClientResult(1, 1, True, {"w": torch.tensor([-6.0])}, 30)])
    # d = [1/1, 6/3] = [1, 2]; p = [1/4, 3/4]; τ_eff = 1/4·1 + 3/4·3 = 2.5
    # x − τ_eff·Σ p d = 0 − 2.5·(0.25 + 1.5) = −4.375 (FedAvg would give −4.75)
    assert close(out["w"], [-4.375])
    # momentum ρ=0.5 over τ=2: ‖a‖₁ = [2 − 0.5·(1 − 0.25)/0.5]/0.5 = (2 − 0.75)/0.5 = 2.5
    from tinyfed.strategies.fednova import solver_norm
    assert math.isclose(solver_norm(2, 0.5), 1 + 1.5)  # a = [1, 1 + ρ]


def test_median_odd_even_and_trimmed_mean_cut():
    rows = [[1.0, 10.0], [2.0, -4.0], [100.0, 3.0], [4.0, 5.0]]
    rs = [res(i, 1, r, float(i)) for i, r in enumerate(rows)]
    out = run_round(Median(), X, rs)  # even: mean of the two middle values
    assert close(out["w"], [3.0, 4.0]) and close(out["b"], [1.5])
    out = run_round(Median(), X, rs[:3])
    assert close(out["w"], [2.0, 3.0]) and close(out["b"], [1.0])
    tm = TrimmedMean(0.25)  # ⌊0.25·4⌋ = 1 cut from each end
    out = run_round(tm, X, rs)
    assert close(out["w"], [3.0, 4.0]) and tm.report() == {"trimmed_each_side": 1}
    tm = TrimmedMean(0.2)  # ⌊0.2·4⌋ = 0: the plain mean
    assert close(run_round(tm, X, rs)["w"], [26.75, 3.5])


def test_krum_picks_the_update_closest_to_its_neighbours_and_multi_krum_averages():
    rows = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [50.0, 50.0]]
    rs = [res(10 + i, 1, r, 0.0) for i, r in enumerate(rows)]
    k = Krum(f=1)  # n=5, each scored over its n−f−2 = 2 nearest
    scores = k.scores(torch.tensor(rows))
    # squared distances: (0,0)->1,1 ; (1,0)->1,1 ; (0,1)->1,1 ; (1,1)->1,1: ties, all 2
    assert scores[:4].tolist() == [2.0, 2.0, 2.0, 2.0] and scores[4] > 4000
    out = run_round(k, X, rs)
    assert close(out["w"], [0.0, 0.0]) and k.report() == {"krum_chosen": [10]}
    mk = Krum(f=1, keep=4)
    out = run_round(mk, X, rs)
    assert close(out["w"], [0.5, 0.5]) and mk.report()["krum_chosen"] == [10, 11, 12, 13]


def test_krum_short_round_is_reported():
    k = Krum(f=2)
    run_round(k, X, [res(i, 1, [float(i), 0.0], 0.0) for i in range(4)])
    assert k.report()["krum_short"] == "4 updates < 2f+3 = 7"


def test_fedprox_tells_every_client_mu_and_the_proximal_gradient_is_mu_times_distance():
    s = FedProx(0.3)
    assert s.configure(1, 7, X).algorithm == "fedprox" and s.configure(1, 7, X).params == {
        "mu": 0.3}
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    task = ClientTask(0, 1, 0, TrainSettings(), algorithm="fedprox", params={"mu": 0.3})
    correct = CLIENT_ALGORITHMS["fedprox"].prepare(model, {"weight": torch.tensor([[0.5]])}, {},
                                                   task)
    model.weight.grad = torch.tensor([[1.0]])
    correct()
    assert close(model.weight.grad.reshape(1), [1.0 + 0.3 * (2.0 - 0.5)])


def test_scaffold_client_variates_and_server_update_by_hand():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    x = {"weight": torch.tensor([[1.0]])}
    extras = {"c/weight": torch.tensor([[0.2]]), "ci/weight": torch.tensor([[0.5]])}
    task = ClientTask(3, 1, 0, TrainSettings(lr=0.1), algorithm="scaffold")
    algo = CLIENT_ALGORITHMS["scaffold"]
    correct = algo.prepare(model, x, extras, task)
    model.weight.grad = torch.tensor([[1.0]])
    correct()
    assert close(model.weight.grad.reshape(1), [1.0 + 0.2 - 0.5])  # g + c − c_i
    y = {"weight": torch.tensor([[0.6]])}
    _, out = algo.finish(y, x, extras, task, {"steps": 4})
    # Δc_i = −c + (x − y)/(K·η) = −0.2 + 0.4/(4·0.1) = 0.8
    assert close(out["dc/weight"].reshape(1), [0.8])

    s = Scaffold({"w": torch.tensor([0.0])}, num_clients=4)
    told = s.configure(1, 3, {"w": torch.tensor([0.0])})
    assert told.algorithm == "scaffold" and set(told.tensors) == {"c/w", "ci/w"}
    assert set(told.returns) == {"dc/w"}
    out = run_round(s, {"w": torch.tensor([0.0])}, [
        ClientResult(3, 1, True, {"w": torch.tensor([1.0])}, 10,
                     extras={"dc/w": torch.tensor([0.8])}),
        ClientResult(5, 1, True, {"w": torch.tensor([3.0])}, 30,
                     extras={"dc/w": torch.tensor([-0.4])})])
    assert close(out["w"], [2.0])  # unweighted mean of y_i (η_g = 1)
    assert close(s.c["w"], [(0.8 - 0.4) / 4])  # c += ΣΔc_i / N
    assert close(s.ci[3]["w"], [0.8]) and close(s.ci[5]["w"], [-0.4])
    again = s.configure(2, 3, out)
    assert close(again.tensors["c/w"], [0.1]) and close(again.tensors["ci/w"], [0.8])


def dp(**over) -> DPFedAvg:
    args = dict(clip=1.0, noise=0.0, delta=1e-5, planned=4, num_clients=40, seed=7)
    args.update(over)
    return DPFedAvg(**args)


def test_dp_clips_each_update_and_divides_by_the_planned_count():
    big = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.5])}  # ‖Δ‖ = ‖[2, 2]‖ ≈ 2.83
    clipped, norm = clip_update(big, X, 1.0)
    assert math.isclose(norm, math.sqrt(8)) and close(clipped["w"], [1 + 2 / 8 ** .5,
                                                                     2 + 2 / 8 ** .5])
    out = run_round(dp(), X, [res(0, 50, [3.0, 4.0], 0.5), res(1, 5, [1.5, 2.0], 0.5)])
    # (clip(Δ0) + Δ1)/m with m = 4 planned clients, whatever their example counts
    assert close(out["w"], [1 + (2 / 8 ** .5 + 0.5) / 4, 2 + (2 / 8 ** .5) / 4])


def test_dp_noise_has_the_configured_standard_deviation():
    s = dp(noise=1.3, clip=0.7, planned=5)
    zeros = {"w": torch.zeros(200_000)}
    out = run_round(s, zeros, [ClientResult(0, 1, True, {"w": torch.zeros(200_000)}, 1)])
    want = 1.3 * 0.7 / 5  # z·S/m
    got = float(out["w"].double().std())
    # the sample std of 200k normals is within 0.5 % of σ with overwhelming probability
    assert abs(got / want - 1) < 0.005, (got, want)
    assert abs(float(out["w"].double().mean())) < 5 * want / math.sqrt(200_000)
    again = run_round(dp(noise=1.3, clip=0.7, planned=5), zeros,
                      [ClientResult(0, 1, True, {"w": torch.zeros(200_000)}, 1)])
    assert torch.equal(out["w"], again["w"])  # seeded by (run seed, round): resumable


def test_epsilon_matches_the_library_accountant():
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    s = dp(noise=1.1, planned=10, num_clients=1000)
    for _ in range(3):
        run_round(s, X, [res(0, 1, [1.0, 2.0], 0.5)])
    acc = RdpAccountant()  # the library's own default orders
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)),
                3)
    want = acc.get_epsilon(1e-5)
    got = s.report()["epsilon"]
    assert abs(got - want) / want < 0.02, (got, want)  # our order grid is integer only
    assert s.report()["delta"] == 1e-5 and s.report()["clip"] == 1.0


def test_adaptive_clipping_moves_the_bound_toward_the_quantile():
    s = dp(adaptive=True, quantile=0.5, clip_lr=0.2, planned=4)  # z = 0: no count noise
    rs = [res(i, 1, [1.0, 2.0], 0.5, metrics={"within_clip": w})
          for i, w in enumerate([1.0, 1.0, 1.0, 0.0])]
    run_round(s, X, rs)
    assert math.isclose(s.clip, 1.0 * math.exp(-0.2 * (0.75 - 0.5)))  # S·exp(−η(b̄ − γ))
    assert s.report()["clip"] == 1.0  # the bound this round used


def test_target_epsilon_stops_before_the_budget_and_a_spent_budget_is_refused():
    s = dp(noise=1.0, planned=10, num_clients=100, target_epsilon=4.0)
    rounds = 0
    while not s.stop_before(rounds + 1):
        run_round(s, X, [res(0, 1, [1.0, 2.0], 0.5)])
        rounds += 1
    assert rounds > 5 and s.epsilon_after(rounds) <= 4.0 < s.epsilon_after(rounds + 1)
    assert "privacy budget" in s.stop_before(rounds + 1)
    from tinyfed.errors import ConfigError

    tighter = dp(noise=1.0, planned=10, num_clients=100, target_epsilon=3.0)
    with pytest.raises(ConfigError, match="target_epsilon = 3: the .* rounds already run"):
        tighter.load_state_dict(s.state_dict())


def test_attacks_forge_what_they_say():
    from tinyfed.attacks import ATTACKS, attackers
    from tinyfed.client import Shard

    g = {"w": torch.tensor([1.0, 1.0])}
    honest = {"w": torch.tensor([2.0, 0.0])}  # Δ = [1, −1]
    assert close(ATTACKS["sign-flip"].forge(honest, g, 0, 3.0)["w"], [-2.0, 4.0])
    assert close(ATTACKS["scale"].forge(honest, g, 0, 3.0)["w"], [4.0, -2.0])
    big = {"w": torch.zeros(100_000)}
    noisy = ATTACKS["gaussian"].forge({"w": torch.ones(100_000)}, big, 5, 2.0)["w"]
    assert abs(float(noisy.std()) / 2.0 - 1) < 0.02  # scale × RMS(Δ) = 2 × 1
    assert torch.equal(noisy, ATTACKS["gaussian"].forge({"w": torch.ones(100_000)}, big, 5,
                                                        2.0)["w"])  # seeded by the task
    shard = Shard(torch.zeros(3, 1, 1, 1), torch.tensor([0, 3, 9]))
    assert ATTACKS["label-flip"].poison(shard, 10).y.tolist() == [9, 6, 0]
    assert attackers(list(range(10)), 2, 7) == attackers(list(range(10)), 2, 7)
    assert len(set(attackers(list(range(10)), 3, 7))) == 3


def test_a_task_header_bounds_its_algorithm_name_and_params():
    from tinyfed.errors import WireError

    task = ClientTask(1, 2, 3, TrainSettings(), algorithm="pkg.sub.module:" + "A" * 100,
                      params={"mu": 0.5})
    assert ClientTask.from_header(task.header()) == task  # a long module path survives
    h = task.header()
    for bad in ({"algorithm": "x" * 201}, {"algorithm": 7}, {"params": {"mu": "0.5"}},
                {"params": {f"k{i}": 1.0 for i in range(17)}}, {"attack": ["sign-flip"]}):
        with pytest.raises(WireError):
            ClientTask.from_header({**h, **bad})
