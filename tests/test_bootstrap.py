"""The paired bootstrap of retention on synthetic items whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.eval.bootstrap import paired_bootstrap, resampled_means, task_rng, to_json


def _teacher(n: int, accuracy: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    correct = np.zeros(n)
    correct[rng.choice(n, size=int(round(accuracy * n)), replace=False)] = 1
    return correct


def _wrong_on(teacher: np.ndarray, fraction: float, seed: int = 1) -> np.ndarray:
    """The teacher's answers, except wrong on a fixed ``fraction`` of the teacher's correct items."""
    student = teacher.copy()
    right = np.flatnonzero(teacher)
    student[np.random.default_rng(seed).choice(right, size=int(round(fraction * len(right))), replace=False)] = 0
    return student


def test_identical_models_retain_exactly_one_and_are_not_called():
    teacher = _teacher(500, 0.6)
    out = paired_bootstrap({"arc": {"teacher": teacher, "same": teacher.copy()}}, "teacher", iters=500)
    same = out["tasks"]["arc"]["models"]["same"]
    assert same["ratio"].estimate == pytest.approx(1.0)
    assert same["ratio"].low <= 1.0 <= same["ratio"].high
    assert same["ratio"].low == pytest.approx(1.0) and same["ratio"].high == pytest.approx(1.0)  # paired: every resample agrees
    assert same["difference"].as_list() == pytest.approx([0.0, 0.0, 0.0])
    assert not same["called"]
    assert "teacher" not in out["tasks"]["arc"]["models"]


def test_a_student_wrong_on_30_percent_of_the_teachers_items_retains_0_7():
    teacher = _teacher(2000, 0.6)
    student = _wrong_on(teacher, 0.3)
    out = paired_bootstrap({"piqa": {"teacher": teacher, "student": student}}, "teacher", iters=1000, seed=3)
    ratio = out["tasks"]["piqa"]["models"]["student"]["ratio"]
    assert ratio.estimate == pytest.approx(0.7, abs=1e-9)
    assert ratio.low < 0.7 < ratio.high and ratio.high - ratio.low < 0.06
    assert ratio.excludes(1.0) and out["tasks"]["piqa"]["models"]["student"]["called"]
    diff = out["tasks"]["piqa"]["models"]["student"]["difference"]
    assert diff.estimate == pytest.approx(-0.18, abs=1e-9) and diff.high < 0


def test_interval_width_shrinks_like_one_over_sqrt_n():
    widths = {}
    for n in (400, 1600, 6400):
        teacher = _teacher(n, 0.6, seed=n)
        student = _wrong_on(teacher, 0.2, seed=n + 1)
        ratio = paired_bootstrap({"t": {"teacher": teacher, "student": student}}, "teacher", iters=2000)["tasks"]["t"]["models"]["student"]["ratio"]
        widths[n] = ratio.high - ratio.low
    assert widths[400] / widths[1600] == pytest.approx(2.0, rel=0.2)
    assert widths[1600] / widths[6400] == pytest.approx(2.0, rel=0.2)


def test_the_models_are_resampled_jointly_on_the_same_items():
    scores = np.array([[1, 0, 1, 1, 0, 0, 1, 0], [1, 0, 1, 1, 0, 0, 1, 0], [0, 1, 0, 0, 1, 1, 0, 1]], dtype=float)
    boot = resampled_means(scores, 300, task_rng(0, "x"))
    assert boot.shape == (300, 3)
    np.testing.assert_allclose(boot[:, 0], boot[:, 1])  # the same draw for every model
    np.testing.assert_allclose(boot[:, 0] + boot[:, 2], 1.0)  # complementary answers stay complementary


def test_seeded_and_deterministic_and_independent_of_other_tasks():
    teacher, student = _teacher(300, 0.5), _wrong_on(_teacher(300, 0.5), 0.1)
    one = paired_bootstrap({"a": {"teacher": teacher, "s": student}}, "teacher", iters=400, seed=7)
    two = paired_bootstrap({"b": {"teacher": student, "s": teacher}, "a": {"teacher": teacher, "s": student}}, "teacher",
                           iters=400, seed=7)
    assert one["tasks"]["a"]["models"]["s"]["ratio"] == two["tasks"]["a"]["models"]["s"]["ratio"]
    other = paired_bootstrap({"a": {"teacher": teacher, "s": student}}, "teacher", iters=400, seed=8)
    assert other["tasks"]["a"]["models"]["s"]["ratio"] != one["tasks"]["a"]["models"]["s"]["ratio"]


def test_the_average_is_the_mean_of_task_scores_and_covers_models_scored_on_every_task():
    t1, t2 = _teacher(1000, 0.8, seed=1), _teacher(200, 0.4, seed=2)
    s1, s2 = _wrong_on(t1, 0.5), t2.copy()
    items = {"big": {"teacher": t1, "s": s1, "partial": t1}, "small": {"teacher": t2, "s": s2}}
    out = paired_bootstrap(items, "teacher", iters=1000)
    avg = out["average"]
    assert avg["tasks"] == ["big", "small"]
    assert avg["means"]["teacher"] == pytest.approx((0.8 + 0.4) / 2)
    assert avg["means"]["s"] == pytest.approx((0.4 + 0.4) / 2)
    assert avg["models"]["s"]["ratio"].estimate == pytest.approx(0.8 / 1.2)
    assert avg["models"]["s"]["called"]
    assert "partial" not in avg["models"] and "partial" in out["tasks"]["big"]["models"]
    only_big = paired_bootstrap(items, "teacher", iters=1000, average=["big"])["average"]
    assert only_big["models"]["s"]["ratio"].estimate == pytest.approx(0.5)


def test_coverage_of_the_difference_interval_is_near_nominal():
    """Across simulated benchmarks the 95% interval of the difference holds the true difference about 95% of the time."""
    rng = np.random.default_rng(11)
    hits, runs, n = 0, 200, 300
    for run in range(runs):
        teacher = (rng.random(n) < 0.6).astype(float)
        flip = rng.random(n) < 0.2  # the student disagrees on 20% of items at random: true difference 0.2 * (0.4 - 0.6)
        student = np.where(flip, 1 - teacher, teacher)
        diff = paired_bootstrap({"t": {"teacher": teacher, "s": student}}, "teacher", iters=400, seed=run)["tasks"]["t"]["models"]["s"]["difference"]
        hits += diff.low <= -0.04 <= diff.high
    assert 0.88 <= hits / runs <= 0.99


def test_models_on_different_items_and_a_zero_teacher():
    with pytest.raises(ValueError, match="different items"):
        paired_bootstrap({"t": {"teacher": [1, 0, 1], "s": [1, 0]}}, "teacher")
    out = paired_bootstrap({"t": {"teacher": [0, 0, 0, 0], "s": [1, 0, 1, 0]}}, "teacher", iters=100)
    s = out["tasks"]["t"]["models"]["s"]
    assert np.isnan(s["ratio"].estimate)
    assert to_json(out)["tasks"]["t"]["models"]["s"]["ratio"] == [None, None, None]
    assert to_json(out)["tasks"]["t"]["models"]["s"]["difference"][0] == 0.5
