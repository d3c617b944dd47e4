"""Plots: what is drawn matches the schedule and the accounting; files get written."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_net

from freezesched import Cosine, Layerwise, Step, WarmupThenFreeze
from freezesched.__main__ import main
from freezesched.plot import plot_cumulative_flops, plot_timeline, save
from freezesched.profiling import cumulative_flops, measure_policy_costs


@pytest.mark.parametrize(
    "schedule",
    [Step(3), WarmupThenFreeze(4, then=Step(2)), Layerwise.progressive(4, first=2, last=9)],
)
def test_timeline_image_is_the_schedule(schedule):
    ax = plot_timeline(schedule, 15, start=2)
    image = np.asarray(ax.get_images()[0].get_array())
    expected = schedule.timeline(15, start=2).reshape(13, -1).T
    assert np.array_equal(image.astype(bool), expected)
    assert ax.get_images()[0].get_extent() == [1.5, 14.5, len(expected) - 0.5, -0.5]


def test_timeline_accepts_a_plain_function_and_checks_labels():
    ax = plot_timeline(lambda t: t % 4 == 1, 8, stage_labels=["backbone"])
    assert np.asarray(ax.get_images()[0].get_array()).ravel().tolist() == [0, 1, 0, 0, 0, 1, 0, 0]
    with pytest.raises(ValueError, match="one label per stage"):
        plot_timeline(Layerwise.progressive(3, first=1, last=4), 6, stage_labels=["a"])
    with pytest.raises(ValueError, match="ticks must be greater than start"):
        plot_timeline(Step(2), 3, start=3)
    with pytest.raises(TypeError, match="schedule"):
        plot_timeline("Step(2)", 3)


def test_cumulative_flops_lines_are_the_accounting(tmp_path):
    policies = {"full": Step(1), "DBF": WarmupThenFreeze(2, then=Step(3)), "cosine": Cosine(0, 10)}
    costs = measure_policy_costs(make_net(), (2, 3, 16, 16), "backbone", policies.values(),
                                 epochs=10)  # fmt: skip
    curves = {k: cumulative_flops(costs, s, epochs=10, samples_per_epoch=100, num_modules=1)
              for k, s in policies.items()}  # fmt: skip
    ax = plot_cumulative_flops(curves, baseline="full")
    lines = {line.get_label().split(":")[0]: line for line in ax.get_lines()}
    scale = curves["full"][-1] / lines["full"].get_ydata()[-1]  # the auto-chosen unit
    for label, curve in curves.items():
        np.testing.assert_allclose(lines[label].get_ydata() * scale, curve)
    assert lines["full"].get_linestyle() == "--"
    assert "ΔF -" in lines["DBF"].get_label()
    save(ax, str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="same, non-zero length"):
        plot_cumulative_flops({"a": [1, 2], "b": [1]})
    with pytest.raises(ValueError, match="baseline must be one of"):
        plot_cumulative_flops({"a": [1, 2]}, baseline="full")


def test_cli_timeline_and_project_write_plots(tmp_path, capsys):
    png = tmp_path / "t.png"
    assert main(["timeline", '{"type": "Step", "rho": 3}', "--ticks", "9", "--plot", str(png)]) == 0
    assert png.stat().st_size > 1000
    png = tmp_path / "p.png"
    argv = ["project", "--model", "helpers:make_net", "--module", "backbone", "--input-shape",
            "2,3,16,16", "--epochs", "6", "--samples", "10", "--plot", str(png)]  # fmt: skip
    assert main(argv) == 0
    assert png.stat().st_size > 1000
    assert "DBF (ρ=2)" in capsys.readouterr().out
