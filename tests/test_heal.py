"""Healing (tnopt.heal): distillation lowers the loss and raises the verified metric; only factors and
refitted biases change; a fixed seed repeats exactly; a graph the torch interpreter cannot run heals
through the block-local path; the torch interpreter matches onnxruntime on the reference models."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import MODELS, ROOT
from helpers import init, make_model, run, tensor
from onnx import helper, numpy_helper

import tnopt
from tnopt.errors import TnoptError
from tnopt.heal import HealConfig, augment_images
from tnopt.torch_graph import NotConvertible, TorchGraph


def unlabelled(count=512, start=0):
    with np.load(MODELS / "calib.npz") as archive:
        return {"input": archive["input"][start : start + count]}


def evaluation(count=512):
    with np.load(MODELS / "eval.npz") as archive:
        return {"input": archive["input"][:count], "labels": archive["labels"][:count]}


def compress_fc2(heal):
    # fc2's first layer truncated to rank 8: a deliberately damaged model.
    return tnopt.compress(
        str(MODELS / "fc2.onnx"),
        ranks={"/1/Gemm": 8},
        data=unlabelled(),
        eval_data=evaluation(),
        provider="cpu",
        heal=heal,
    )


@pytest.fixture(scope="module")
def fc2_healed():
    # A rank-8 truncation is far from the original: larger steps than the default (tuned on plans
    # near a budget, where 0.02 overshot) heal it in 80 steps.
    return compress_fc2(None), compress_fc2(HealConfig(steps=80, eval_every=20, seed=3, lr=0.02))


def test_healing_lowers_the_loss_and_raises_the_verified_metric(fc2_healed):
    (_, plain), (_, healed) = fc2_healed
    plan = healed.heal["plans"][0]
    result = plan["heal"]
    assert result["path"] == "graph" and result["layers"] == ["/1/Gemm"]
    assert result["holdout_loss_after"] < 0.8 * result["holdout_loss_before"]
    assert plan["drop_after"] <= plan["drop_before"]
    # Verified in onnxruntime on the evaluation split that neither the plan nor healing saw.
    assert healed.metrics["agreement"] > plain.metrics["agreement"] + 0.01
    assert healed.metrics["rel-l2"] < plain.metrics["rel-l2"]
    assert result["sample_steps"] == result["steps"] * 64
    # 512 calibration samples: 128 held out for the gate, 1/8 of the other 384 pick the checkpoint.
    assert result["train_samples"] == 336 and result["select_samples"] == 48
    assert result["holdout_samples"] == 128
    # Label-free, so the budget charges agreement: the distance is the softmax KL, and the checkpoint
    # kept has no larger an agreement drop on the selection split than the truncated model.
    assert result["loss"] == "kl"
    assert result["select_drop_after"] <= result["select_drop_before"]


def _initializers(model):
    return {t.name: t.SerializeToString() for t in model.graph.initializer}


def _arrays(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _nodes(model):
    return [
        (n.op_type, n.name, list(n.input), list(n.output), n.SerializeToString()) for n in model.graph.node
    ]


def test_only_factors_and_refitted_biases_change():
    kwargs = dict(
        ranks={"/0/Conv": (3, 1), "/6/Conv": (8, 3), "/11/Gemm": 16},
        data=unlabelled(256),
        provider="cpu",
    )
    plain, _ = tnopt.compress(str(MODELS / "lenet5.onnx"), **kwargs)
    healed, report = tnopt.compress(
        str(MODELS / "lenet5.onnx"), heal=HealConfig(steps=20, eval_every=10), **kwargs
    )
    assert report.heal["plans"][0]["heal"]["steps"] == 20
    assert [n[:4] for n in _nodes(plain)] == [n[:4] for n in _nodes(healed)]
    before, after = _initializers(plain), _initializers(healed)
    assert before.keys() == after.keys()
    rewritten = ("/0/Conv/", "/6/Conv/", "/11/Gemm/")
    changed = {name for name in before if before[name] != after[name]}
    assert changed, "healing changed nothing"
    assert all(name.startswith(rewritten) for name in changed), changed
    # The refitted biases are among what trains (the correction made them factors of the plan).
    assert any(name.endswith("/bias") for name in changed)
    # Attributes and graph I/O untouched.
    assert plain.graph.input == healed.graph.input and plain.graph.output == healed.graph.output
    assert plain.opset_import == healed.opset_import and plain.ir_version == healed.ir_version


def test_fixed_seed_gives_identical_factors(monkeypatch):
    # Flips only: crops shift fc2's inputs so far that no crop-trained checkpoint beats the start,
    # and the selector (rightly) keeps the start for every seed.
    from tnopt import runner

    # Whether plans run on the switchboard or exported follows a timing: beside other jobs the two
    # runs went different ways and their factors rounded apart (0.09% off after 40 steps; 3 of 4
    # runs failed with only the threads pinned, none of 8 with the path pinned). torch's thread
    # count, which follows the machine's idle cores (tnopt/threads.py), rounds too: pinned as well.
    monkeypatch.setenv("TNOPT_MATH_THREADS", "1")
    monkeypatch.setattr(
        runner, "time_plan_runs", lambda *a: {"switchboard": 2.0, "exported": 1.0, "export_fixed": 0.5}
    )
    config = HealConfig(steps=40, eval_every=10, seed=7, augment=("flip",), lr=0.02)  # see fc2_healed
    first, report = compress_fc2(config)
    assert report.heal["plans"][0]["heal"]["best_step"] > 0  # a trained checkpoint, not the start
    second, _ = compress_fc2(config)
    # Same seed, same factors. Not bit for bit: which way the runner evaluates a plan (switchboard or
    # exported graph) is chosen by a timing, and the two paths round the teacher's floats differently
    # in the last bits, which training carries into the factors' last bits.
    a, b = _arrays(first), _arrays(second)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6, err_msg=name)
    other, _ = compress_fc2(HealConfig(steps=40, eval_every=10, seed=8, augment=("flip",), lr=0.02))
    assert _initializers(first) != _initializers(other)


def softplus_mlp():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Softplus", ["h"], ["a"], name="act"),
        helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2"),
    ]
    inits = [
        init("w1", rng.standard_normal((32, 48)) / 6),
        init("b1", rng.standard_normal(48) * 0.1),
        init("w2", rng.standard_normal((48, 16)) / 7),
        init("b2", rng.standard_normal(16) * 0.1),
    ]
    return make_model(nodes, [tensor("x", ["N", 32])], [tensor("y", ["N", 16])], inits)


def test_a_graph_that_does_not_convert_heals_block_locally():
    model = softplus_mlp()
    with pytest.raises(NotConvertible, match="Softplus"):
        TorchGraph(model)
    rng = np.random.default_rng(1)
    # Inputs with a low-dimensional structure, weight-only factors: a rank-4 fc1 truncates directions
    # the data never excites while losing ones it does, and healing has room to move them.
    mixing = rng.standard_normal((12, 32))
    data = {"x": (rng.standard_normal((400, 12)) @ mixing).astype(np.float32)}
    ranks = {"fc1": 4, "fc2": 6}
    options = dict(ranks=ranks, data=data, provider="cpu", correct=False, data_aware=False)
    plain, _ = tnopt.compress(model, **options)
    # Deliberately damaged: larger steps than the default (see fc2_healed).
    healed, report = tnopt.compress(model, heal=HealConfig(steps=150, eval_every=25, lr=0.02), **options)
    result = report.heal["plans"][0]["heal"]
    assert result["path"] == "block" and "Softplus" in result["reason"]
    assert result["layers"] == ["fc1", "fc2"]
    assert result["holdout_loss_after"] < 0.7 * result["holdout_loss_before"]
    test = {"x": (rng.standard_normal((200, 12)) @ mixing).astype(np.float32)}
    reference = run(model, test)[0]
    error = [np.linalg.norm(run(m, test)[0] - reference) for m in (plain, healed)]
    assert error[1] < error[0]
    with pytest.raises(TnoptError, match="whole-graph"):
        tnopt.compress(model, ranks=ranks, data=data, provider="cpu", heal=HealConfig(steps=2, path="graph"))


def activation_mlp(op):
    """softplus_mlp with another activation between the two layers."""
    model = softplus_mlp()
    model.graph.node[1].op_type = op
    return model


def test_a_graph_torch_runs_with_other_values_heals_block_locally(monkeypatch):
    """Same shapes, other values (an op the interpreter reads wrongly): distilling through the torch
    graph would train toward another function, so the whole-graph path is refused before training."""
    from tnopt import torch_ops

    model = activation_mlp("Relu")
    rng = np.random.default_rng(2)
    data = {"x": rng.standard_normal((256, 32)).astype(np.float32)}
    options = dict(ranks={"fc1": 6}, data=data, provider="cpu", heal=HealConfig(steps=4, eval_every=2))
    _, report = tnopt.compress(model, **options)
    assert report.heal["plans"][0]["heal"]["path"] == "graph"  # the faithful interpreter is trusted
    monkeypatch.setitem(torch_ops.OPS, "Relu", lambda x, attrs: torch.nn.functional.softplus(x))
    _, report = tnopt.compress(model, **options)
    result = report.heal["plans"][0]["heal"]
    assert result["path"] == "block"
    assert "'y' differently in torch" in result["reason"]


@pytest.mark.parametrize("name", ["fc2", "lenet5", "resnet"])
def test_torch_graph_matches_onnxruntime(name):
    model = onnx.load(MODELS / f"{name}.onnx")
    x = unlabelled(16)["input"]
    with torch.no_grad():
        got = TorchGraph(model).run({"input": torch.from_numpy(x)})["logits"].numpy()
    expected = run(model, {"input": x})[0]
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5


def test_augment_flips_and_crops_images_only():
    rng = np.random.default_rng(0)
    batch = {"img": rng.standard_normal((64, 1, 8, 8)).astype(np.float32), "ids": np.arange(64)[:, None]}
    out = augment_images(batch, ("flip",), np.random.default_rng(1))
    flipped = [np.array_equal(o, i[..., ::-1]) for o, i in zip(out["img"], batch["img"])]
    kept = [np.array_equal(o, i) for o, i in zip(out["img"], batch["img"])]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54
    assert out["ids"] is batch["ids"]
    cropped = augment_images(batch, ("crop",), np.random.default_rng(1))["img"]
    assert cropped.shape == batch["img"].shape and not np.array_equal(cropped, batch["img"])


def test_mixup_blends_each_image_with_another_of_the_batch_and_only_4d_float_inputs():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((32, 1, 6, 6)).astype(np.float32)
    features = rng.standard_normal((32, 5)).astype(np.float32)
    batch = {"img": images, "ids": np.arange(32)[:, None], "features": features}
    out = augment_images(batch, ("mixup",), np.random.default_rng(4))
    assert out["img"].shape == images.shape and out["img"].dtype == np.float32
    assert out["ids"] is batch["ids"] and out["features"] is batch["features"]
    flat, mixed = images.reshape(32, -1), out["img"].reshape(32, -1)
    weights = []
    for i in range(32):
        # Each output is λ·x_i + (1 − λ)·x_j for one j of the batch and λ in [0, 1]: the best fit of
        # λ over every partner j leaves (float32) rounding only.
        fits = []
        for j in range(32):
            direction = flat[i] - flat[j]
            norm = float(direction @ direction)
            lam = 1.0 if norm == 0 else float((mixed[i] - flat[j]) @ direction) / norm
            fits.append((float(np.abs(lam * flat[i] + (1 - lam) * flat[j] - mixed[i]).max()), lam))
        residual, lam = min(fits)
        assert residual < 1e-5 and -1e-6 <= lam <= 1 + 1e-6
        weights.append(lam)
    # Blended, not copied: λ ~ Beta(1, 1) spreads over (0, 1).
    assert 0.2 < np.mean(weights) < 0.8 and np.std(weights) > 0.15
    assert not np.array_equal(out["img"], images)
    np.testing.assert_array_equal(images, batch["img"])  # the caller's array is not modified
    # A fixed seed repeats; another seed mixes differently; a sharper Beta keeps images nearer pure.
    again = augment_images(batch, ("mixup",), np.random.default_rng(4))["img"]
    np.testing.assert_array_equal(again, out["img"])
    other = augment_images(batch, ("mixup",), np.random.default_rng(5))["img"]
    assert not np.array_equal(other, out["img"])
    near_pure = augment_images(batch, ("mixup",), np.random.default_rng(4), mixup_alpha=0.05)["img"]
    change = np.abs(near_pure - images).reshape(32, -1).max(1)
    assert np.median(change) < np.median(np.abs(out["img"] - images).reshape(32, -1).max(1))


@pytest.mark.parametrize("kinds", [("flip", "crop"), ("mixup",)])
def test_teacher_sees_the_same_augmented_view_as_the_student(monkeypatch, kinds):
    # Distillation on augmented images matches the original's function only if the teacher runs on
    # the very view the student trains on (Beyer et al. 2022, "consistent" teaching): a teacher fed
    # the unaugmented batch would ask the student to map a shifted image to the unshifted answer.
    from tnopt import heal_paths

    made, taught, seen = [], [], []
    augment = heal_paths.augment_images

    def recording_augment(batch, kinds, rng, *args):
        out = augment(batch, kinds, rng, *args)
        made.append(out)
        return out

    class RecordingStream(heal_paths._Stream):
        def __iter__(self):
            for batch in super().__iter__():
                taught.append(batch)
                yield batch

    graph_run = TorchGraph.run

    def recording_run(self, feeds, want=None):
        if all(f.requires_grad is False for f in feeds.values()) and torch.is_grad_enabled():
            seen.append({k: v.numpy() for k, v in feeds.items()})
        return graph_run(self, feeds, want)

    monkeypatch.setattr(heal_paths, "augment_images", recording_augment)
    monkeypatch.setattr(heal_paths, "_Stream", RecordingStream)
    monkeypatch.setattr(TorchGraph, "run", recording_run)
    compress_fc2(HealConfig(steps=3, eval_every=3, augment=kinds, lr=0.02))
    assert len(made) == 3 and len(taught) == 3 and len(seen) == 3
    raw = unlabelled()["input"]
    for view, teacher_batch, student_batch in zip(made, taught, seen):
        # The teacher's feed is the augmented view (the runner may hand it on in a dict of its own).
        np.testing.assert_array_equal(teacher_batch["input"], view["input"])
        np.testing.assert_array_equal(student_batch["input"], view["input"])
        # and it is augmented: mostly not rows of the calibration images as they are
        unchanged = sum(any(np.array_equal(image, r) for r in raw) for image in view["input"])
        assert unchanged < len(view["input"]) // 4


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tnopt", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


def test_cli_heal_validates_before_work(tmp_path):
    out = tmp_path / "o.onnx"
    bad = cli(
        MODELS / "fc2.onnx",
        "-o",
        out,
        "--rank-ratio",
        "0.5",
        "--heal",
        "5",
        "--augment",
        "rotate",
        "--data",
        MODELS / "calib.npz",
    )
    assert bad.returncode == 2 and "rotate" in bad.stderr and bad.stderr.count("\n") == 1
    no_data = cli(MODELS / "fc2.onnx", "-o", out, "--rank-ratio", "0.5", "--heal", "5")
    assert no_data.returncode == 2 and "--data" in no_data.stderr
    not_images = cli(MODELS / "fc2.onnx", "-o", out, "--heal", "5", "--augment", "flip")
    assert not_images.returncode == 2
    assert not out.exists()


def test_cli_mixup_on_a_model_without_image_inputs_is_refused_before_any_work(tmp_path):
    model, data, out = tmp_path / "mlp.onnx", tmp_path / "x.npz", tmp_path / "o.onnx"
    onnx.save(softplus_mlp(), model)
    np.savez(data, x=np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32))
    done = cli(model, "-o", out, "--rank-ratio", "0.5", "--data", data, "--heal", "5", "--augment", "mixup")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "mixup" in done.stderr and "4-D float" in done.stderr and "search" not in done.stdout
    assert not out.exists()


@pytest.mark.slow
def test_cli_heal_writes_a_healed_model_and_reports_it(tmp_path, small_splits):
    calib, evaluation_file = small_splits
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    done = cli(
        MODELS / "lenet5.onnx",
        "-o",
        out,
        "--rank-ratio",
        "0.25",
        "--data",
        calib,
        "--eval-data",
        evaluation_file,
        "--heal",
        "10",
        "--augment",
        "flip,crop",
        "--report",
        report,
        "--provider",
        "cpu",
    )
    assert done.returncode == 0, done.stderr
    assert "healing (" in done.stdout and "drop after" in done.stdout
    data = json.loads(report.read_text())
    assert data["heal"]["plans"][0]["heal"]["steps"] >= 1
    assert data["heal"]["config"]["augment"] == ["flip", "crop"]
    onnx.checker.check_model(onnx.load(out))


def _budget_loop(max_drop):
    """budgeted_heal on stand-ins: a plan searched under budget × f loses f/100 before healing and
    half of it after."""
    from tnopt.heal_budget import budgeted_heal
    from tnopt.plan import Plan

    plans, healed = {}, set()

    def search_at(factor):
        plans[factor] = Plan((f"choice at x{factor}",))  # a stand-in: only its length and identity matter
        return plans[factor]

    def heal_plan(plan):
        from tnopt.heal import HealResult

        healed.add(id(plan))
        return plan, HealResult("graph", steps=1)

    def gate(plan):
        factor = [f for f, p in plans.items() if p is plan][-1]
        return (factor / 200 if id(plan) in healed else factor / 100), 0.0

    def saving(plan):  # a looser search cuts deeper
        return [f for f, p in plans.items() if p is plan][-1]

    return budgeted_heal(search_at, heal_plan, gate, saving, max_drop)


def test_budgeted_heal_starts_loose_grows_while_healed_plans_pass_then_bisects():
    # Healing halves every drop (f/100 → f/200). 1% budget: f ≤ 2 passes healed.
    # 0.5%: 4 fails healed (0.02); the failure says ×1 is the reach (4 · 0.005/0.02): straight to the floor.
    best, trials = _budget_loop(0.005)
    assert [t.looseness for t in trials] == [4.0, 1.0]
    # 3%: 4 passes healed (0.02 ≤ 0.03), so it grows to the reach 4 · 0.03/0.02 = 6 (passes: 0.03),
    # and stops there (the next step would be < MIN_STEP).
    best, trials = _budget_loop(0.03)
    assert [t.looseness for t in trials] == [4.0, 6.0]
    assert [t.passed for t in trials] == [True, True]
    assert best.looseness == 6.0 and all(t.drop_after <= t.drop_before for t in trials)
    # 10%: grows ×4 at most (reach 20) and stops at the cap (16); nothing failed, nothing to bisect.
    best, trials = _budget_loop(0.10)
    assert [t.looseness for t in trials] == [4.0, 16.0] and best.looseness == 16.0


def test_budgeted_heal_bisects_down_then_falls_back_to_the_plain_budget():
    # 1%: 4 fails healed (0.02); reach 2 = the geometric midpoint √(1·4): passes healed (0.01).
    best, trials = _budget_loop(0.01)
    assert [t.looseness for t in trials] == [4.0, 2.0] and best.looseness == 2.0
    # 0.4%: 4 fails; its reach (0.8) is below the plain budget: the ×1 plan is tried next and last,
    # and fails too (0.005 after healing): the smallest-drop trial is returned, not passed.
    best, trials = _budget_loop(0.004)
    assert [t.looseness for t in trials] == [4.0, 1.0]
    assert not best.passed and best.looseness == 1.0
    # 0.75%: 4 fails healed (0.02); √(1·4) = 2 is out of reach, its reach 1.5 is tried and passes.
    best, trials = _budget_loop(0.0075)
    assert [t.looseness for t in trials] == [4.0, 1.5] and best.looseness == 1.5
    # 2%: 4 passes healed exactly at the budget: no looser plan is within reach, no trial is spent.
    _, trials = _budget_loop(0.02)
    assert [t.looseness for t in trials] == [4.0]
    # 4% ×4 passes unhealed: such a plan is not healed (healing would not change its saving); it
    # grows to 16, which fails healed (0.08), and the midpoint 8 is within reach (16 · 0.04/0.08).
    _, trials = _budget_loop(0.04)
    assert [t.looseness for t in trials] == [4.0, 16.0, 8.0] and trials[0].heal == {}


@pytest.mark.slow
def test_budget_is_judged_after_healing(small_splits):
    calib, evaluation_file = small_splits
    _, report = tnopt.compress(
        str(MODELS / "fc2.onnx"),
        budget="2%",
        data=calib,
        eval_data=evaluation_file,
        provider="cpu",
        methods="svd",
        heal=HealConfig(steps=30, eval_every=10),
    )
    plans = report.heal["plans"]
    assert plans[0]["looseness"] == 4.0
    assert all(p["heal"]["steps"] >= 1 for p in plans if p["heal"])
    assert report.budget["max_drop"] == 0.02
    assert report.budget["proxy_max_drop"] == 0.02 * report.heal["chosen_looseness"]
    chosen = [p for p in plans if p["looseness"] == report.heal["chosen_looseness"]][0]
    assert chosen["passed"] == report.budget_met or report.budget["drop_evaluation"] > 0.02
    # Every plan tried shows its evaluation drop; the chosen one's is the report's.
    assert all(p["drop_evaluation_before"] is not None for p in plans)
    assert all(("drop_evaluation_after" in p) == bool(p["heal"]) for p in plans)
    chosen_eval = chosen.get("drop_evaluation_after", chosen["drop_evaluation_before"])
    assert chosen_eval == pytest.approx(report.budget["drop_evaluation"], abs=1e-9)


def test_checkpoint_selection_follows_the_charged_metric_not_the_loss():
    from tnopt.heal import CheckpointSelector

    selector = CheckpointSelector(patience=2, tolerance=0.01)
    assert selector.update(0.05, 1.0, 0) == (True, False)
    assert selector.update(0.08, 0.5, 10) == (False, False)  # lower loss but a worse metric: not kept
    assert selector.update(0.055, 0.9, 20) == (True, False)  # a tie within one sample, lower loss: kept
    assert selector.update(0.03, 2.0, 30) == (True, False)  # clearly better metric, even at a higher loss
    assert selector.update(0.035, 1.5, 40) == (True, False)  # tie with the best, lower loss
    assert selector.update(0.045, 0.1, 50) == (False, False)  # beyond the tolerance of the best (0.03)
    assert selector.update(0.05, 0.1, 60) == (False, True)  # patience spent
    assert selector.best_step == 40 and selector.chosen_drop == 0.035


def test_distillation_distance_matches_the_charged_metric():
    from tnopt.heal import distillation_loss, loss_kind

    assert [loss_kind(m) for m in ("top1", "agreement", "cosine", "fidelity", None)] == [
        "kl",
        "kl",
        "cosine",
        "nmse",
        "nmse",
    ]
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    # The softmax ignores a per-sample shift of the logits; the squared error does not.
    shifted = teacher + torch.tensor([[5.0], [-2.0]])
    assert float(distillation_loss("kl", shifted, teacher)) < 1e-6
    assert float(distillation_loss("nmse", shifted, teacher)) > 0.5
    flipped = teacher[:, [1, 0, 2]]
    assert float(distillation_loss("kl", flipped, teacher)) > 0.5
    # Cosine ignores the scale of each sample's output.
    assert float(distillation_loss("cosine", 3 * teacher, teacher)) < 1e-6
    assert float(distillation_loss("cosine", -teacher, teacher)) == pytest.approx(2.0)


def test_budgeted_heal_steps_up_from_a_plain_budget_that_passed_only_after_healing():
    # Healing removes 13% of the ×4 plan's drop but half of the plain one's (VGG measured 44% and
    # 41%, with a wider margin at ×4): the ×4 failure points at the floor, the healed floor passes
    # with room, and one step toward the failure uses that room.
    from tnopt.heal import HealResult
    from tnopt.heal_budget import budgeted_heal
    from tnopt.plan import Plan

    plans, healed = {}, set()

    def search_at(factor):
        plans[factor] = Plan((f"choice at x{factor}",))
        return plans[factor]

    def factor_of(plan):
        return [f for f, p in plans.items() if p is plan][-1]

    def heal_plan(plan):
        healed.add(id(plan))
        return plan, HealResult("graph", steps=1)

    def gate(plan):
        factor = factor_of(plan)
        before = 0.011 * factor
        return (before * (0.87 if factor >= 4 else 0.5) if id(plan) in healed else before), 0.0

    best, trials = budgeted_heal(search_at, heal_plan, gate, factor_of, 0.01)
    assert [round(t.looseness, 3) for t in trials] == [4.0, 1.0, 1.818]
    assert [t.passed for t in trials] == [False, True, True] and best is trials[-1]


def test_budgeted_heal_tries_no_plan_past_its_time_budget():
    from tnopt.heal_budget import budgeted_heal
    from tnopt.plan import Plan

    now = [0.0]
    plans = {}

    def search_at(factor):
        now[0] += 100.0  # every trial takes 100 s of the fake clock
        plans[factor] = Plan((f"choice at x{factor}",))
        return plans[factor]

    def gate(plan):
        factor = [f for f, p in plans.items() if p is plan][-1]
        return factor / 1000, 0.0  # every plan up to x20 passes a 2% budget

    def loop(budget_s):
        _, trials = budgeted_heal(
            search_at,
            lambda p: (p, None),
            gate,
            lambda p: 1.0,
            0.02,
            time_budget_s=budget_s,
            clock=lambda: now[0],
        )
        return [t.looseness for t in trials]

    assert loop(None) == [4.0, 16.0]
    assert loop(250.0) == [4.0, 16.0]  # 100 s spent + 100 s for the next ≤ 250
    assert loop(150.0) == [4.0]  # the second trial would end at 200 s


def test_checkpoint_ties_span_the_drops_standard_error_on_the_selection_split():
    # 400 selection samples, 36 of them flipped: a checkpoint within about one standard error
    # (√36/400 = 1.5%) of the best drop is a tie for the loss to decide, not one sample (0.25%).
    from types import SimpleNamespace

    from tnopt.heal_paths import _selection_scorer
    from tnopt.metrics import METRICS

    rng = np.random.default_rng(0)
    reference = rng.standard_normal((400, 10)).astype(np.float32)
    runner = SimpleNamespace(run=lambda plan, inputs: [reference])
    select = SimpleNamespace(inputs={"x": reference}, labels=None)
    score, teacher = _selection_scorer(runner, METRICS["agreement"], select)
    assert teacher[0] is reference
    flipped = reference.copy()
    flipped[:36] = -flipped[:36]  # the argmax moves on every flipped row
    drop, error = score([flipped])
    assert drop == pytest.approx(36 / 400)
    assert error == pytest.approx(np.std(np.r_[np.ones(36), np.zeros(364)], ddof=1) / 20, rel=1e-6)
    assert 0.013 < error < 0.016
    assert score([reference]) == (0.0, 1 / 400)  # no flips: one sample's resolution
    assert _selection_scorer(runner, None, select)[0] is None


def test_heal_batch_is_independent_of_the_onnxruntime_batch(monkeypatch):
    # A 64-sample step whose teacher and student see parts of at most onnxruntime's batch (8 here)
    # trains the factors as one 64-sample batch does: the parts' gradients add up to the batch's.
    import tnopt.heal_paths as paths
    import tnopt.pipeline as pipeline

    seen = []
    original_augment = paths.augment_images

    def recording(batch, kinds, rng, *args):
        seen.append(len(next(iter(batch.values()))))
        return original_augment(batch, kinds, rng, *args)

    monkeypatch.setattr(paths, "augment_images", recording)
    config = HealConfig(steps=12, eval_every=6, seed=3, lr=0.02)
    results = {}
    for ort_batch in (8, 256):
        monkeypatch.setattr(pipeline, "batch_size_for", lambda sample_bytes, b=ort_batch: b)
        seen.clear()
        model, report = compress_fc2(config)
        result = report.heal["plans"][0]["heal"]
        assert result["sample_steps"] == result["steps"] * 64 and result["steps"] == 12
        assert max(seen) == min(ort_batch, 64) and sum(seen) == 12 * 64  # memory: one part at a time
        results[ort_batch] = _arrays(model)
    parts, whole = results[8], results[256]
    assert parts.keys() == whole.keys()
    changed = [n for n in parts if n.startswith("/1/Gemm/")]
    assert changed
    # Not bit for bit: the parts sum their gradients in another order, and Adam's normalisation
    # carries the last bits into the smallest entries. A step of 8 samples differs by far more.
    start = _arrays(compress_fc2(None)[0])
    for name in changed:
        moved = np.linalg.norm(whole[name] - start[name])
        assert moved > 0.05 * np.linalg.norm(start[name]), name
        assert np.linalg.norm(parts[name] - whole[name]) < 0.01 * moved, name
