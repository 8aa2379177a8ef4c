"""The board-vs-export timing (tnopt/runner.py `time_plan_runs`) opens the board on one batch, then
times a plan on every timed sample: the warm-up is not a second run over all of them."""

from __future__ import annotations

from test_runner import RUNTIME, mlp, svd_choice

from tnopt.runner import PlanRunner, time_plan_runs
from tnopt.switchboard import Switchboard


def test_the_board_is_warmed_on_one_batch_and_timed_on_all(monkeypatch):
    model, layers, feeds = mlp()  # 40 samples; RUNTIME runs batches of 16
    runner = PlanRunner(model, RUNTIME)
    board = Switchboard(model, [svd_choice(layers[0], 8)], RUNTIME)
    runs = []
    plain_run = Switchboard.run

    def counted(self, choices, inputs):
        runs.append((len(choices), len(inputs["x"])))
        return plain_run(self, choices, inputs)

    monkeypatch.setattr(Switchboard, "run", counted)
    timings = time_plan_runs(board, runner, svd_choice(layers[0], 8), feeds)
    assert runs == [(0, 16), (1, 40)]
    assert timings["switchboard"] > 0 and timings["exported"] >= timings["export_fixed"] > 0
