"""A training run writes report.md (plots, last eval, prediction sheet) that survives --resume; --run logs to wandb,
here in offline mode (a real run directory, nothing sent)."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from test_training import ANSWERS, ROOT, run_in_process, workspace  # noqa: F401  (workspace: the shared fixture)

SHORT = ["--num_iterations=4", "--device_batch_size=2", "--total_batch_size=4", "--warmup_ratio=0.0",
         "--image_mode=resize:128", "--eval_samples=2", "--max_new_tokens=4", "--eval_records=4"]
PNG = b"\x89PNG\r\n\x1a\n"


def eval_lines(stdout):
    """The eval lines' numbers as the report's table prints them: step, val loss, gap, spread, exact, CER."""
    pattern = (r"Step (\d+) \| val loss ([\d.]+) \| image gap (-?[\d.]+) \| feature spread ([\d.]+) \| "
               r"exact (\d+/\d+) \| cer ([\d.]+)")
    return [[str(int(m.group(1)))] + list(m.groups()[1:]) for m in re.finditer(pattern, stdout)]


def report_table(report):
    section = report.split("## Last eval", 1)[1]
    row = re.search(r"^\| (\d+) \|.*\|$", section, flags=re.M).group(0)
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_a_run_writes_its_report_and_resume_appends_to_it(workspace, monkeypatch, capsys):
    base, data = workspace
    args = [f"--data={data}", "--model_tag=rep", "--save_every=2", "--eval_every=2", *SHORT]
    run_in_process(monkeypatch, base, *args)
    out = capsys.readouterr().out
    directory = base / "rep"
    report = (directory / "report.md").read_text()
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert set(images) == {"report_loss.png", "report_image_gap.png", "report_cer.png", "report_predictions.png"}
    for name in images:
        assert (directory / name).read_bytes().startswith(PNG), name
    assert report_table(report) == eval_lines(out)[-1]  # the table is the run's last eval, as it printed it
    assert "--model_tag=rep --save_every=2" in report  # the command line
    assert f"| train | `{data}` | {len(ANSWERS)} |" in report
    total, trainable = re.search(r"\| ([\d,]+) parameters, ([\d,]+) trainable", out).groups()
    assert re.search(rf"^\| all \| {total} \| {trainable} \|$", report, flags=re.M)
    assert "num_iterations = 4" in report
    full = json.loads((directory / "report_history.json").read_text())
    assert [s["step"] for s in full["steps"]] == [0, 1, 2, 3] and [e["step"] for e in full["evals"]] == [2, 4]

    for name in os.listdir(directory):  # killed after step 2's save: resume from there
        if "000004" in name:
            os.remove(directory / name)
    run_in_process(monkeypatch, base, *args, "--resume=True")
    out = capsys.readouterr().out
    resumed = json.loads((directory / "report_history.json").read_text())
    assert [s["step"] for s in resumed["steps"]] == [0, 1, 2, 3] and [e["step"] for e in resumed["evals"]] == [2, 4]
    assert [s["loss"] for s in resumed["steps"]] == [s["loss"] for s in full["steps"]]  # bit for bit on the CPU
    # the wall clock goes on from where the checkpoint left it (the eval at step k comes before step k trains)
    order = sorted([(e["step"], 0, e["time"]) for e in resumed["evals"]] + [(s["step"], 1, s["time"]) for s in resumed["steps"]])
    assert [t for _, _, t in order] == sorted(t for _, _, t in order)
    assert report_table((directory / "report.md").read_text()) == eval_lines(out)[-1]


def test_wandb_offline_writes_a_run_directory_with_the_loss(workspace, tmp_path):
    pytest.importorskip("wandb")
    base, data = workspace
    env = dict(os.environ, NANOVLM_BASE_DIR=str(base), OMP_NUM_THREADS="1", WANDB_MODE="offline",
               WANDB_DIR=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "config"),
               WANDB_CACHE_DIR=str(tmp_path / "cache"), WANDB_DATA_DIR=str(tmp_path / "data"))
    out = subprocess.run([sys.executable, "-m", "scripts.vis_tok_train", f"--data={data}", "--model_tag=wb",
                          "--run=offline_test", "--num_iterations=2", "--eval_every=-1", *SHORT[1:]],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1, os.listdir(tmp_path)
    # the run's transaction log, what `wandb sync` would send: protobuf records, whose keys are stored as plain bytes
    records = glob.glob(os.path.join(runs[0], "run-*.wandb"))
    assert len(records) == 1
    with open(records[0], "rb") as f:
        log = f.read()
    for key in (b"offline_test", b"train/loss", b"val/loss", b"val/cer", b"num_iterations"):
        assert key in log, key
    assert "step 00001/00002" in (open(os.path.join(runs[0], "files", "output.log")).read())  # the console too
