"""A user's own strategy, named on the command line as tests.user_strategy:Halfway."""

from __future__ import annotations

from tinyfed.algorithms import Plain
from tinyfed.strategies import Defaults, FedAvg, Instructions, RunningMean


class Halfway(Defaults):
    """Moves the global model half way to the clients' mean each round."""

    name = "halfway"

    def __init__(self, config, initial):
        self.rounds = 0

    def begin_round(self, global_weights, round_num):
        outer = self

        class Half(RunningMean):
            def result(self):
                mean = super().result()
                outer.rounds += 1
                return {k: (v + global_weights[k]) / 2 for k, v in mean.items()}

        return Half(global_weights)

    def report(self):
        return {"halfway_rounds": self.rounds}


class SignSGD(Plain):
    """A user's client algorithm by module path: every gradient replaced by its sign."""

    def prepare(self, model, global_weights, extras, task):
        def correct():
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.sign_()

        return correct


class WithSignSGD(FedAvg):
    """FedAvg whose clients run SignSGD (named by module path, imported by each client)."""

    def __init__(self, config, initial):
        super().__init__()
        self.told = Instructions("tests.user_strategy:SignSGD")

    def configure(self, round_num, client_id, global_weights):
        return self.told
