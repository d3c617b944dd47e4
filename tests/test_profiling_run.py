"""Run accounting: sampled equals exhaustive; report formats; projection agrees."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from helpers import batch, make_net
from torch import nn

from freezesched import FrozenStageGuard, Layerwise, Step, WarmupThenFreeze
from freezesched.profiling import (
    FlopAccountant,
    RunCost,
    count_flops,
    project_policies,
    render_runs,
    render_table,
)

BATCHES = [4, 4, 3]  # an uneven last batch: per-sample extrapolation must be exact


def _train(schedule, stages: bool, samples_per_state: int):
    model = make_net(seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    acct = FlopAccountant(model, samples_per_state=samples_per_state or 1)
    guard = FrozenStageGuard(schedule)
    targets = list(model.backbone) if stages else model.backbone
    exhaustive = 0
    for epoch in range(6):
        for i, n in enumerate(BATCHES):
            x, y = batch(10 * epoch + i, n=n)

            def step(x=x, y=y):
                nn.functional.cross_entropy(model(x), y).backward()

            with guard(targets, epoch) as region:
                if samples_per_state is None:
                    exhaustive += count_flops(step).total.total
                else:
                    with acct.step(region, batch_size=n):
                        step()
            opt.step()
            opt.zero_grad()
    return acct, exhaustive


@pytest.mark.parametrize(
    ("schedule", "stages"),
    [(WarmupThenFreeze(1, then=Step(3)), False), (Layerwise.progressive(3, 1, 5), True)],
)
def test_sampled_accounting_equals_exhaustive_counting(schedule, stages):
    sampled, _ = _train(schedule, stages, samples_per_state=1)
    every_step, _ = _train(schedule, stages, samples_per_state=10**9)
    _, exhaustive = _train(schedule, stages, samples_per_state=None)
    a, b = sampled.totals(), every_step.totals()
    assert [(p.frozen_modules, p.samples, p.cost) for p in a.phases] == [
        (p.frozen_modules, p.samples, p.cost) for p in b.phases
    ]
    assert a.flops_measured == b.flops_measured == exhaustive
    assert a.steps == 6 * len(BATCHES)


def test_totals_agree_with_the_projection():
    schedule = WarmupThenFreeze(1, then=Step(3))
    acct, _ = _train(schedule, False, samples_per_state=1)
    totals = acct.totals()
    projected = project_policies(make_net(seed=1), (4, 3, 16, 16), "backbone", {"p": schedule},
                                 epochs=6, samples_per_epoch=sum(BATCHES))[0]  # fmt: skip
    assert totals.flops_2x == projected.flops_2x
    assert totals.flops_measured == projected.flops_measured
    assert totals.delta_flops_2x == projected.delta_flops_2x
    assert totals.delta_flops_measured == projected.delta_flops_measured


def test_measured_baseline_is_unknown_without_an_all_trainable_step():
    model = make_net()
    acct = FlopAccountant(model)
    with FrozenStageGuard(Step(2))(model.backbone, 1) as region, acct.step(region, batch_size=4):
        model(batch(0)[0]).sum().backward()
    totals = acct.totals()
    assert totals.delta_flops_measured is None
    assert totals.delta_flops_2x < 0


def test_phases_report_time_and_memory_per_state():
    acct, _ = _train(Step(2), False, samples_per_state=1)
    phases = {p.frozen_modules: p for p in acct.totals().phases}
    assert set(phases) == {(), ("backbone",)}
    frozen, trainable = phases[("backbone",)], phases[()]
    assert frozen.saved_bytes < trainable.saved_bytes
    assert frozen.cost.flops.backward < trainable.cost.flops.backward
    assert trainable.seconds_per_step > 0 and trainable.peak_cuda_bytes is None
    assert trainable.steps == 9 and trainable.samples == 33


@pytest.mark.parametrize("fmt", ["text", "markdown", "csv", "json"])
def test_report_formats(fmt):
    acct, _ = _train(Step(2), False, samples_per_state=1)
    out = acct.report(fmt)
    if fmt == "json":
        assert [r["frozen"] for r in json.loads(out)] == ["-", "backbone"]
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert [r["frozen"] for r in rows] == ["-", "backbone"] and rows[0]["peak_cuda_mib"] == ""
    elif fmt == "markdown":
        assert out.splitlines()[1].startswith("|---|") and out.count("\n") == 3
    else:
        assert out.splitlines()[0].startswith("frozen modules")


def test_the_record_round_trips_through_json():
    acct, _ = _train(Step(2), False, samples_per_state=1)
    record = acct.totals("DBF", schedule="Step(2)").with_metrics(acc=0.5)
    again = RunCost.from_dict(json.loads(record.to_json()))
    assert again == record
    assert json.loads(record.to_json())["totals"]["flops_measured"] == record.flops_measured


def test_bad_input():
    with pytest.raises(ValueError, match=r"samples_per_state must be an int in \[1, .*got 0"):
        FlopAccountant(make_net(), samples_per_state=0)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        FlopAccountant("net")
    acct = FlopAccountant(make_net())
    with (
        pytest.raises(ValueError, match=r"batch_size must be an int in \[1, .*got 0"),
        acct.step(batch_size=0),
    ):
        pass
    other = nn.Linear(2, 2)
    region = FrozenStageGuard(Step(2))(other, 1)
    with (
        pytest.raises(ValueError, match=r"not a submodule of the accountant's model"),
        region,
        acct.step(region, batch_size=1),
    ):
        pass
    with pytest.raises(ValueError, match=r"fmt must be one of"):
        render_table([], [("a", "A")], "html")


def test_run_table_compares_policies_like_table_iii():
    full, _ = _train(Step(1), False, samples_per_state=1)
    frozen, _ = _train(Step(10**6), False, samples_per_state=1)  # frozen except tick 0
    never, _ = _train(WarmupThenFreeze(0), False, samples_per_state=1)  # frozen throughout
    runs = [full.totals("full"), frozen.totals("mostly frozen"), never.totals("frozen")]
    assert runs[2].delta_flops_measured is None  # unknown from this run alone
    table = json.loads(render_runs(runs, "json"))
    assert [r["policy"] for r in table] == ["full", "mostly frozen", "frozen"]
    assert table[0]["delta_seconds"] == 0 and table[0]["delta_tflops"] == 0
    assert table[1]["frozen"] == "15/18" and table[2]["frozen"] == "18/18"
    # Filled from the baseline run: the same samples, so the same as the difference.
    assert table[2]["delta_tflops"] == pytest.approx(
        (runs[2].flops_measured - runs[0].flops_measured) / 1e12
    )
    assert table[2]["delta_tflops"] < table[1]["delta_tflops"] < 0
    assert table[2]["delta_tflops_2x"] < table[1]["delta_tflops_2x"] < 0
    assert table[2]["saved_mib_frozen"] < table[0]["saved_mib_trainable"]
    assert all(r["seconds"] > 0 and r["peak_cuda_mib"] is None for r in table)
    assert render_runs(runs).splitlines()[0].startswith("policy")


def test_peak_cuda_memory_bookkeeping_with_a_fake_allocator(monkeypatch):
    # No GPU here: the four torch.cuda calls are replaced by a fake allocator, which tests
    # our bookkeeping (reset before a sampled step, read after, only for sampled steps).
    calls = []
    peaks = iter([3 * 2**20, 5 * 2**20])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: next(peaks))
    model = make_net()
    acct = FlopAccountant(model, samples_per_state=2)
    for step in range(3):
        with acct.step(batch_size=4):
            model(batch(step)[0]).sum().backward()
    (phase,) = acct.totals().phases
    assert phase.peak_cuda_bytes == 4 * 2**20  # the median of 3 and 5 MiB; step 3 uncounted
    assert calls == ["sync", "reset", "sync"] * 2
    assert json.loads(render_runs([acct.totals("x")], "json"))[0]["peak_cuda_mib"] == 4.0


@pytest.mark.parametrize("convention", ["measured", "2x"])
def test_cumulative_flops_ends_at_the_projected_total(convention):
    from freezesched import Cosine
    from freezesched.profiling import cumulative_flops, measure_policy_costs, project

    net = make_net()
    schedules = [WarmupThenFreeze(3, then=Step(4)), Cosine(0, 20), Step(1)]
    costs = measure_policy_costs(net, (2, 3, 16, 16), "backbone", schedules, epochs=20)
    for schedule in schedules:
        curve = cumulative_flops(costs, schedule, epochs=20, samples_per_epoch=50,
                                 num_modules=1, convention=convention)  # fmt: skip
        total = project(costs, schedule, epochs=20, samples_per_epoch=50, num_modules=1)
        assert curve[-1] == (total.flops_measured if convention == "measured" else total.flops_2x)
        steps = np.diff(curve, prepend=0)
        frozen = schedule.timeline(20)
        assert len(set(steps[frozen].tolist())) <= 1 and len(set(steps[~frozen].tolist())) == 1
        if frozen.any() and not frozen.all():
            assert steps[frozen][0] < steps[~frozen][0]


class _Proposals(nn.Module):
    """A head whose cost depends on the data: it runs on the first `k` rows only."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 4)
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return self.head(self.backbone(x)[:k])


def test_data_dependent_step_costs_are_refused_or_averaged_within_rtol():
    model = _Proposals()
    x = torch.randn(8, 4)
    strict = FlopAccountant(model)
    with strict.step(batch_size=8):
        model(x, 8).sum().backward()
    with (
        pytest.raises(RuntimeError, match=r"cost differently per sample.*rtol="),
        strict.step(batch_size=8),
    ):
        model(x, 6).sum().backward()

    loose = FlopAccountant(model, rtol=0.5)
    for k in (8, 6):
        with loose.step(batch_size=8):
            model(x, k).sum().backward()
    costs = []
    for k in (8, 6):
        prof = count_flops(lambda k=k: model(x, k).sum().backward(), model)
        costs.append(prof.total.total / 8)
    (phase,) = loose.totals().phases
    assert phase.cost.measured == pytest.approx(sum(costs) / 2, abs=1)
    with pytest.raises(ValueError, match="rtol"):
        FlopAccountant(model, rtol=1.5)
