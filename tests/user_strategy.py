"""A user's own strategy, named on the command line as tests.user_strategy:Halfway."""

from __future__ import annotations

from tinyfed.strategies import Defaults, RunningMean


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
