"""The Table II driver: dry run, resumable grid, result tables (training faked)."""

from __future__ import annotations

import json
import os
import shlex

import run_table2


def test_dry_run_prints_a_command_and_projection_per_run(capsys):
    assert run_table2.main(["--dry-run", "--detectors", "retinanet", "--backbones", "r50",
                            "--datasets", "dior-r"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    commands = [shlex.split(x) for x in lines if not x.startswith("#")]
    notes = [x for x in lines if x.startswith("#")]
    assert len(commands) == len(notes) == 6
    dbf5 = commands[3]
    i = dbf5.index("--epochs")
    assert dbf5[i : i + 6] == ["--epochs", "200", "--warmup", "50", "--rho", "5"]
    assert "150/200 frozen epochs" in notes[-1] and "paper -368,869" in notes[-1]
    projected = [
        float(n.split("projected ΔTFLOPs ")[1].split(" ")[0].replace(",", "")) for n in notes
    ]
    assert projected[0] == 0 and projected[1] < projected[5] < projected[4] < projected[3] < 0


def test_grid_resumes_and_writes_tables(tmp_path, capsys):
    calls = []

    def fake_train(command):
        calls.append(command)
        work_dir = command[command.index("--work-dir") + 1]
        frozen = "full" not in work_dir
        os.makedirs(os.path.join(work_dir, "run", "vis_data"))
        with open(os.path.join(work_dir, "run", "vis_data", "scalars.json"), "w") as f:
            f.write(json.dumps({"dota/mAP": 0.6 if frozen else 0.62, "step": 1}) + "\n")
        with open(os.path.join(work_dir, "freezesched_accounting.json"), "w") as f:
            json.dump({"flops_paper": 1, "delta_flops_paper": -2e15 if frozen else 0,
                       "flops_measured": 5e15 if frozen else 8e15,
                       "states": [{"peak_cuda_bytes": [2**31]}]}, f)  # fmt: skip
        return 0

    argv = ["--detectors", "fcos", "--backbones", "r50", "--datasets", "dota",
            "--policies", "full", "dbf_rho5",
            "--work-root", str(tmp_path / "w"), "--out", str(tmp_path / "o")]  # fmt: skip
    assert run_table2.main(argv, runner=fake_train) == 0
    assert len(calls) == 2
    table = (tmp_path / "o" / "table2.md").read_text()
    assert "| dota | fcos | r50 | dbf_rho5 | 60.0 | 68.8 | -2000 | -3000 | -1872541 |" in table
    assert "peak GiB" in (tmp_path / "o" / "table3.md").read_text()
    assert run_table2.main(argv, runner=fake_train) == 0  # everything done: nothing re-run
    assert len(calls) == 2
    assert "done, skipped" in capsys.readouterr().out


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
