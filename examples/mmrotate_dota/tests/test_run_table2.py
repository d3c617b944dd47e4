"""The Table II driver: dry run, resumable grid, result tables (training faked)."""

from __future__ import annotations

import json
import os
import shlex

import pytest
import run_table2


def test_dry_run_prints_a_command_and_projection_per_run(capsys):
    assert run_table2.main(["--dry-run", "--detectors", "retinanet", "--backbones", "r50",
                            "--datasets", "dior-r"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    commands = [shlex.split(x) for x in lines if not x.startswith("#")]
    notes = [x for x in lines if x.startswith("# retinanet_r50_dior-r")]
    assert len(commands) == len(notes) == 6
    dbf5 = commands[3]
    i = dbf5.index("--epochs")
    assert dbf5[i : i + 6] == ["--epochs", "200", "--warmup", "50", "--rho", "5"]
    assert "150/200 frozen epochs" in notes[-1] and "paper -368,869" in notes[-1]
    projected = [
        float(n.split("projected ΔTFLOPs ")[1].split(" ")[0].replace(",", "")) for n in notes
    ]
    assert projected[0] == 0 and projected[1] < projected[5] < projected[4] < projected[3] < 0


def accounting(epochs: range, measured: float, seconds: float, *, frozen: bool) -> dict:
    """What dbf_accounting.py writes, for a run over ``epochs`` (1e15 FLOPs units)."""
    per_epoch = [
        {"epoch": e, "seconds": seconds, "samples": {"backbone" if frozen else "": 4},
         "flops_measured": measured * 1e15, "flops_2x": 0, "delta_flops_2x": 0}
        for e in epochs
    ]  # fmt: skip
    return {
        "run": {
            "totals": {
                "samples": 4 * len(epochs),
                "flops_measured": measured * 1e15 * len(epochs),
                "delta_flops_2x": -5e15 * len(epochs) if frozen else 0,
            },
            "phases": [{"peak_cuda_bytes": 2**31}],
        },
        "epochs": per_epoch,
        "first_epoch": epochs[0],
        "end_epoch": epochs[-1] + 1,
        "world_size": 2,
        "batch_per_gpu": 4,
        "map": {
            "last": {"epoch": epochs[-1] + 1, "value": 60.0 if frozen else 62.0},
            "best": {"epoch": epochs[0] + 1, "value": 61.5 if frozen else 62.5},
        },
        "never_trained": ["backbone.conv1", "backbone.bn1", "backbone.layer1"],
    }


def fake_trainer(calls: list, epochs: int):
    def train(command):
        calls.append(command)
        work_dir = command[command.index("--work-dir") + 1]
        os.makedirs(work_dir)
        first = 0
        if "--resume-from" in command:  # continued from the full run's epoch_<warmup>.pth
            ckpt = command[command.index("--resume-from") + 1]
            first = int(os.path.basename(ckpt).removeprefix("epoch_").removesuffix(".pth"))
        frozen = "full" not in work_dir
        record = accounting(range(first, epochs), 6 if frozen else 10, 30 if frozen else 60,
                            frozen=frozen)  # fmt: skip
        with open(os.path.join(work_dir, "freezesched_accounting.json"), "w") as f:
            json.dump(record, f)
        if not frozen:
            open(os.path.join(work_dir, "epoch_50.pth"), "w").close()
        return 0

    return train


def rows(table: str) -> list[dict[str, str]]:
    lines = [x for x in table.splitlines() if x.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in x.strip("|").split("|")), strict=True))
            for x in lines[2:]]  # fmt: skip


def test_grid_resumes_and_writes_tables(tmp_path, capsys):
    calls = []
    argv = ["--detectors", "fcos", "--backbones", "r50", "--datasets", "dota",
            "--policies", "full", "dbf_rho5",
            "--work-root", str(tmp_path / "w"), "--out", str(tmp_path / "o")]  # fmt: skip
    assert run_table2.main(argv, runner=fake_trainer(calls, 400)) == 0
    assert len(calls) == 2
    table = rows((tmp_path / "o" / "table2.md").read_text())
    dbf = table[1]
    assert dbf["policy"] == "dbf_rho5" and dbf["mAP last"] == "60.0"
    assert dbf["mAP best (epoch)"] == "61.50 (1)" and dbf["mAP (paper)"] == "68.8"
    assert dbf["epochs"] == "0-400" and dbf["ΔTFLOPs 2x conv."] == "-2000000"
    assert dbf["ΔTFLOPs measured"] == str(round(400 * (6 - 10) * 1e15 / 1e12))
    assert dbf["measured / 2x"] == "0.8" and dbf["batch"] == "2x4"
    text = (tmp_path / "o" / "table2.md").read_text()
    assert "frozen_stages=1" in text and "backbone.layer1" in text and "best epoch" in text
    timing = rows((tmp_path / "o" / "table3.md").read_text())
    assert timing[1]["time (min)"] == "200.0" and timing[1]["ΔT (min)"] == "-200.0"
    assert run_table2.main(argv, runner=fake_trainer(calls, 400)) == 0  # all done: no re-run
    assert len(calls) == 2
    assert "done, skipped" in capsys.readouterr().out


def test_a_continued_run_is_compared_over_the_same_epochs(tmp_path):
    # The full run trains 0-400; DBF continues from its epoch-50 checkpoint and trains
    # 50-400 itself. ΔF and ΔT are over the whole protocol, warm-up included once.
    calls = []
    argv = ["--detectors", "fcos", "--backbones", "r50", "--datasets", "dota",
            "--policies", "full", "dbf_rho5", "--continue-from-full",
            "--work-root", str(tmp_path / "w"), "--out", str(tmp_path / "o")]  # fmt: skip
    assert run_table2.main(argv, runner=fake_trainer(calls, 400)) == 0
    assert "--resume-from" in calls[1]
    dbf = rows((tmp_path / "o" / "table2.md").read_text())[1]
    assert dbf["epochs"] == "0-50 (full run) + 50-400"
    # 350 own epochs at 6 against the full run's same 350 at 10 (not all 400 of them).
    assert dbf["ΔTFLOPs measured"] == str(round(350 * (6 - 10) * 1e15 / 1e12))
    timing = rows((tmp_path / "o" / "table3.md").read_text())[1]
    # 50 warm-up epochs of the full run (60 s) + 350 own (30 s), against 400 x 60 s.
    assert timing["time (min)"] == str(round((50 * 60 + 350 * 30) / 60, 1))
    assert timing["ΔT (min)"] == str(round(350 * (30 - 60) / 60, 1))


def test_gpus_keep_the_papers_total_batch(capsys):
    argv = ["--dry-run", "--detectors", "retinanet", "--backbones", "r50",
            "--datasets", "dior-r", "--policies", "full"]  # fmt: skip
    with pytest.raises(SystemExit):
        run_table2.main([*argv, "--gpus", "3"])
    assert "--gpus must divide the paper's total batch of 8, got 3" in capsys.readouterr().err
    assert run_table2.main([*argv, "--gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "4 GPU(s) x 2 images = 8 per step, lr 0.005" in out
    assert "torchrun --nproc_per_node=4" in out
    assert "5,862 training samples per epoch" in out and "11,725" in out and "23,463" in out


def test_data_check_counts_against_the_expected_numbers(tmp_path, capsys):
    import prepare_data

    for split, n in (("train", 3), ("val", 2)):
        folder = tmp_path / "dota" / split / "annfiles"
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"P{i}.txt").write_text("")
    (tmp_path / "DIOR" / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "DIOR" / "ImageSets" / "Main" / "train.txt").write_text("00001\n00002\n")
    found = prepare_data.count(str(tmp_path / "dota"), str(tmp_path / "DIOR"))
    assert found == {("dota", "train"): 3, ("dota", "val"): 2, ("dior", "train"): 2,
                     ("dior", "val"): 0}  # fmt: skip
    assert prepare_data.main(["check", "--dota", str(tmp_path / "dota")]) == 1
    assert "EXPECTED 15749" in capsys.readouterr().out


def test_dior_to_dota_writes_dota_text_lines(tmp_path):
    import prepare_data

    dior = tmp_path / "DIOR"
    xml_dir = dior / "Annotations" / "Oriented Bounding Boxes"
    xml_dir.mkdir(parents=True)
    (dior / "ImageSets" / "Main").mkdir(parents=True)
    (dior / "JPEGImages-trainval").mkdir()
    (dior / "ImageSets" / "Main" / "train.txt").write_text("00001\n")
    (dior / "ImageSets" / "Main" / "val.txt").write_text("")
    (dior / "JPEGImages-trainval" / "00001.jpg").write_bytes(b"jpeg")
    corners = {"x_left_top": 1, "y_left_top": 2, "x_right_top": 30, "y_right_top": 2,
               "x_right_bottom": 30, "y_right_bottom": 20,
               "x_left_bottom": 1, "y_left_bottom": 20}  # fmt: skip
    box = "".join(f"<{k}>{v}</{k}>" for k, v in corners.items())
    (xml_dir / "00001.xml").write_text(
        f"<annotation><object><name>Airplane</name><robndbox>{box}</robndbox></object>"
        f"<object><name>ship</name><difficult>1</difficult><robndbox>{box}</robndbox></object>"
        "</annotation>"
    )
    written = prepare_data.dior_to_dota(str(dior), str(tmp_path / "out"))
    assert written == {"train": 2, "val": 0}
    lines = (tmp_path / "out" / "train" / "annfiles" / "00001.txt").read_text().splitlines()
    assert lines == ["1.0 2.0 30.0 2.0 30.0 20.0 1.0 20.0 airplane 0",
                     "1.0 2.0 30.0 2.0 30.0 20.0 1.0 20.0 ship 1"]  # fmt: skip
    assert (tmp_path / "out" / "train" / "images" / "00001.jpg").read_bytes() == b"jpeg"


def _record(epochs, flops, seconds, samples=4, resumed_from=None):
    per = [{"epoch": e, "seconds": seconds, "samples": {"": samples},
            "flops_measured": flops * samples, "flops_2x": 0, "delta_flops_2x": 0}
           for e in epochs]  # fmt: skip
    totals = {"samples": samples * len(per), "flops_measured": flops * samples * len(per),
              "delta_flops_2x": 0}  # fmt: skip
    return {"run": {"totals": totals}, "epochs": per, "first_epoch": epochs[0],
            "end_epoch": epochs[-1] + 1, "resumed_from": resumed_from}  # fmt: skip


def test_unlike_runs_get_no_measured_delta_and_say_why():
    full_dir = "w/fcos_r50_dota/full"
    ok = run_table2.compare(
        _record(range(50, 400), 6, 30, resumed_from=f"{full_dir}/epoch_50.pth"),
        _record(range(400), 10, 60),
        full_dir,
    )
    assert ok["problem"] is None and ok["delta_measured"] == 350 * 4 * (6 - 10)
    cases = {
        # the full run was itself resumed: its record lacks the warm-up
        "warm-up": (_record(range(50, 400), 6, 30), _record(range(30, 400), 10, 60)),
        # another number of samples per epoch (another world size, data list)
        "other numbers of samples": (
            _record(range(400), 10, 60, 4),
            _record(range(400), 10, 60, 5),
        ),
        # the DBF run resumed from its own checkpoint after a crash
        "not from the full run's": (
            _record(range(100, 400), 6, 30, resumed_from="w/fcos_r50_dota/dbf_rho5/epoch_100.pth"),
            _record(range(400), 10, 60),
        ),
    }
    for reason, (run, full) in cases.items():
        out = run_table2.compare(run, full, full_dir)
        assert out["delta_measured"] is None and out["delta_seconds"] is None, reason
        assert reason in out["problem"]
