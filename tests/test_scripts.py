"""The user-facing commands, end to end on a random tiny checkpoint: eval table + JSON, OCR streaming, errors."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import tiny_vlm, write_dataset
from nanovlm.checkpoint import save_checkpoint
from nanovlm.vlm import model_meta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    base = tmp_path_factory.mktemp("base")
    model = tiny_vlm(tokenizer)
    directory = base / "rand"
    tokenizer.save(str(directory / "tokenizer"))
    save_checkpoint(str(directory), 3, model.state_dict(),
                    dict(model_meta(model), image_mode="resize:128", tokenizer_dir="tokenizer"))
    answers = ["TOTAL 12.00", "<|ref|>word<|/ref|><|det|>[[10, 20, 300, 400]]<|/det|>"]
    data = write_dataset(str(base / "data"), answers)
    return base, data


LONG_ANSWER = "a much longer answer " * 6  # some 80 tokens: past the short checkpoint's training length


@pytest.fixture(scope="module")
def short_checkpoint(checkpoint, tokenizer):
    """A checkpoint trained on 40-token samples whose meta records its prompts, and a set with a record longer
    than that and one without a prompt."""
    base, _ = checkpoint
    model = tiny_vlm(tokenizer, sequence_len=40)
    tokenizer.save(str(base / "short" / "tokenizer"))
    save_checkpoint(str(base / "short"), 1, model.state_dict(),
                    dict(model_meta(model), image_mode="resize:128", tokenizer_dir="tokenizer",
                         prompts={"<image>\nFree OCR.": 3, "<image>\nOCR this image.": 1}))
    data = write_dataset(str(base / "short_data"), ["TOTAL 12.00", LONG_ANSWER, "no prompt"])
    with open(data) as f:
        records = json.load(f)
    del records[2]["prompt"]
    with open(data, "w") as f:
        json.dump(records, f)
    return base, data


def run(base, *args, **env):
    env = dict(os.environ, NANOVLM_BASE_DIR=str(base), OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_vision_sample_writes_every_field(checkpoint, tmp_path):
    base, data = checkpoint
    out_json = tmp_path / "eval.json"
    out = run(base, "scripts.vision_sample", f"--data={data}", "--model_tag=rand", "--max_new_tokens=6",
              f"--json={out_json}")
    assert out.returncode == 0, out.stderr
    assert "exact 0/2" in out.stdout and "r1" in out.stdout
    summary = json.loads(out_json.read_text())
    for key in ["n", "exact", "exact_rate", "cer", "ned", "word_precision", "loss", "det_rate", "samples"]:
        assert key in summary, key
    assert summary["n"] == 2 and summary["det_rate"] == 0.0  # the random model finds no box
    assert set(summary["samples"][1]) >= {"id", "prediction", "reference", "loss", "exact", "cer", "det_rate", "iou"}
    assert "det_rate" not in summary["samples"][0]  # a plain-text answer has no box measures


def test_ocr_streams_an_answer_and_draws_boxes(checkpoint, tmp_path):
    base, data = checkpoint
    image = os.path.join(os.path.dirname(data), "images", "0.png")
    boxes = tmp_path / "boxes.png"
    out = run(base, "scripts.ocr", f"--image={image}", "--model_tag=rand", "--max_new_tokens=5",
              f"--boxes_out={boxes}")
    assert out.returncode == 0, out.stderr
    assert boxes.exists()
    assert "prompt '<image>\\nOCR this image.': the default: the checkpoint records no training prompt" in out.stdout
    other = os.path.join(os.path.dirname(data), "images", "1.png")
    out = run(base, "scripts.ocr", f"--image={image},{other}", "--model_tag=rand", "--max_new_tokens=5",
              f"--boxes_out={tmp_path / 'boxes'}")
    assert out.returncode == 0, out.stderr
    assert f"== {image}" in out.stdout and f"== {other}" in out.stdout  # one batch, each answer under its file
    assert sorted(os.listdir(tmp_path / "boxes")) == ["0_boxes.png", "1_boxes.png"]
    out = run(base, "scripts.ocr", f"--image={image}", "--model_tag=rand", "--max_new_tokens=100000")
    assert out.returncode == 0, out.stderr
    assert "--max_new_tokens=100000 capped at" in out.stdout  # said, not silently cut


def test_ocr_asks_the_checkpoint_s_training_prompt_unless_given_one(short_checkpoint):
    base, data = short_checkpoint
    image = os.path.join(os.path.dirname(data), "images", "0.png")
    out = run(base, "scripts.ocr", f"--image={image}", "--model_tag=short", "--max_new_tokens=3")
    assert out.returncode == 0, out.stderr
    assert "prompt '<image>\\nFree OCR.': the checkpoint's training prompt (--prompt to ask another)" in out.stdout
    out = run(base, "scripts.ocr", f"--image={image}", "--model_tag=short", "--max_new_tokens=3", "--prompt=Read it.")
    assert out.returncode == 0, out.stderr
    assert "training prompt" not in out.stdout and "the default" not in out.stdout


def test_vision_sample_answers_every_record_and_asks_the_right_prompts(short_checkpoint, tokenizer, tmp_path):
    """Past the training length: answered and scored, no loss, one line; a record without a prompt is asked the
    checkpoint's; --prompt replaces every record's."""
    base, data = short_checkpoint
    out_json = tmp_path / "eval.json"
    out = run(base, "scripts.vision_sample", f"--data={data}", "--model_tag=short", f"--json={out_json}")
    assert out.returncode == 0, out.stderr
    budget = len(tokenizer.encode(LONG_ANSWER)) + 8  # the longest reference + ANSWER_ROOM, above the 40 trained
    assert f"answers of up to {budget} new tokens" in out.stdout
    assert out.stdout.count("no loss") == 1
    assert "record r1: no loss: " in out.stdout and "more than the 40 this model trained on" in out.stdout
    assert "without a prompt (1) are asked '<image>\\nFree OCR.': the checkpoint's training prompt" in out.stdout
    summary = json.loads(out_json.read_text())
    samples = {s["id"]: s for s in summary["samples"]}
    assert samples["r1"]["loss"] is None and samples["r1"]["prediction"] and "error" not in samples["r1"]
    assert samples["r1"]["cer"] > 0 and samples["r0"]["loss"] is not None
    assert summary["loss"] == pytest.approx((samples["r0"]["loss"] + samples["r2"]["loss"]) / 2)
    own, checkpoint_s = "<image>\nOCR this image.", "<image>\nFree OCR."
    assert [samples[r]["prompt"] for r in ("r0", "r1", "r2")] == [own, own, checkpoint_s]
    out = run(base, "scripts.vision_sample", f"--data={data}", "--model_tag=short", "--max_new_tokens=2",
              "--prompt=Read it.", f"--json={out_json}")
    assert out.returncode == 0, out.stderr
    assert "are asked" not in out.stdout
    assert [s["prompt"] for s in json.loads(out_json.read_text())["samples"]] == ["<image>\nRead it."] * 3


def test_a_record_longer_than_the_training_length_is_answered_and_scored(tokenizer, vlm, tmp_path, capsys,
                                                                         monkeypatch):
    from nanovlm.dataloader import load_records, render_record
    from nanovlm.engine import Engine
    from nanovlm.evaluate import ANSWER_ROOM, evaluate_records, summarize
    from nanovlm.metrics import cer
    records = load_records(write_dataset(str(tmp_path), ["ok", LONG_ANSWER]))
    vlm.config.sequence_len = len(render_record(records[0], tokenizer, "resize:128")[0]) - 1  # r0 fits, r1 not
    budgets, generate_many = [], Engine.generate_many
    monkeypatch.setattr(Engine, "generate_many", lambda self, prompts, **kw:
                        budgets.append(kw["max_tokens"]) or generate_many(self, prompts, **kw))
    samples = evaluate_records(vlm, tokenizer, records, "resize:128")
    assert budgets == [len(tokenizer.encode(LONG_ANSWER)) + ANSWER_ROOM]  # default: the longest reference + room
    long = samples[1]
    assert long["loss"] is None and long["swapped_loss"] is None and "error" not in long
    assert long["prediction"] and long["cer"] == cer(long["prediction"], LONG_ANSWER)
    out = capsys.readouterr().out
    assert out.count("no loss") == 1 and "record r1: no loss: " in out
    summary = summarize(samples)
    assert summary["n"] == 2 and samples[0]["loss"] is not None and summary["loss"] == samples[0]["loss"]


def test_the_answer_budget_follows_the_longest_reference(tokenizer, vlm):
    from nanovlm.evaluate import ANSWER_ROOM, answer_budget
    records = [{"answer": "short"}, {"answer": LONG_ANSWER}]
    vlm.config.sequence_len = 10
    assert answer_budget(vlm, tokenizer, records) == len(tokenizer.encode(LONG_ANSWER)) + ANSWER_ROOM
    vlm.config.sequence_len = 500
    assert answer_budget(vlm, tokenizer, records) == 500  # never less than the longest sample it trained on
    assert answer_budget(vlm, tokenizer, records, max_new_tokens=7) == 7  # a given budget is kept


@pytest.mark.parametrize("args, message", [
    (["--image=/nowhere/x.png"], "does not exist"),
    (["--image_mode=huge"], "unknown image mode"),
    (["--model_tag=empty"], "no checkpoint in"),
    ([], "give an image"),
    (["--prompt=" + "word " * 3000], "this model reads at most"),  # longer than the rotary table
])
def test_ocr_bad_input_is_one_clear_error(checkpoint, args, message):
    base, data = checkpoint
    os.makedirs(base / "empty", exist_ok=True)
    image = os.path.join(os.path.dirname(data), "images", "0.png")
    defaults = [f"--image={image}", "--model_tag=rand"] if args != [] else []
    given = {a.split("=")[0] for a in args}
    out = run(base, "scripts.ocr", *[a for a in defaults if a.split("=")[0] not in given], *args)
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr


def test_trainables_counts_areas_and_lists_matches(checkpoint):
    base, _ = checkpoint
    out = run(base, "scripts.trainables", "--model=d20", "--quant=nf4", "--lora_r=16", "--freeze_sam=True")
    assert out.returncode == 0, out.stderr
    assert "LoRA targets" in out.stdout and "120 modules (120 in the GPT, 0 in the vision towers)" in out.stdout
    assert "all               969,733,120      7,372,800    393,216,000" in out.stdout
    out = run(base, "scripts.trainables", "--model_tag=rand", "--freeze_sam=True")
    rows = {line.split()[0]: [int(v.replace(",", "")) for v in line.split()[1:]]
            for line in out.stdout.splitlines() if line.split() and line.split()[0] in ("SAM", "CLIP", "compressor")}
    assert rows["SAM"][0] > 0 and rows["SAM"][1] == 0  # frozen
    assert rows["compressor"][0] == rows["compressor"][1] > 0  # not frozen unless asked
    assert 0 < rows["CLIP"][1] < rows["CLIP"][0]  # all but the unused patch conv
    out = run(base, "scripts.trainables", "--lora_r=4", "--lora_targets=nothing_here")
    assert out.returncode != 0 and "match no Linear module" in out.stderr


def test_an_unreadable_image_scores_as_an_empty_answer(tokenizer, vlm, tmp_path, capsys):
    from nanovlm.dataloader import load_records
    from nanovlm.evaluate import evaluate_records, summarize
    path = write_dataset(str(tmp_path), ["fine", "gone"])
    os.remove(tmp_path / "images" / "1.png")
    summary = summarize(evaluate_records(vlm, tokenizer, load_records(path), "resize:128", max_new_tokens=3))
    assert summary["n"] == 2 and "does not exist" in summary["samples"][1]["error"]
    assert summary["samples"][1]["cer"] == 1.0 and summary["loss"] == summary["samples"][0]["loss"]
    assert "record r1" in capsys.readouterr().out


def test_tier1_sh_runs_on_another_set_and_writes_the_summary(tokenizer, tmp_path):
    """The main job on a user's own tier-1 set: tokenizer from the default corpus plus its texts, train, eval."""
    data = write_dataset(str(tmp_path / "my_set"), ["first answer 1.00", "second answer 2.00"])
    env = dict(os.environ, NANOVLM_BASE_DIR=str(tmp_path / "base"), OMP_NUM_THREADS="1")
    out = subprocess.run(["bash", "scripts/tier1.sh", f"--data={data}", "--num_iterations=3", "--eval_every=-1",
                          "--device_batch_size=2", "--total_batch_size=2", "--image_mode=resize:128"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = json.loads((tmp_path / "base" / "tier1" / "eval.json").read_text())
    assert summary["n"] == 2 and "image_gap" in summary
    assert "sequence length" in out.stdout and "tier-1 run finished" in out.stdout
    missing = subprocess.run(["bash", "scripts/tier1.sh", "--data=nowhere.json"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "nowhere.json: no such file" in missing.stdout


def test_sam_ctc_probe_trains_the_read_out(tmp_path):
    """The probe runs with and without the conv stem, lowers the CTC loss, and names where it stands at the end."""
    for stem in ("preset", "none"):
        out = run(tmp_path, "scripts.sam_ctc_probe", "--steps=4", "--batch_size=2", "--log_every=1",
                  f"--conv_stem={stem}", "--kind=line2")  # line2 needs no installed word list or fonts
        assert out.returncode == 0, out.stderr
        losses = [float(line.split("| ctc ")[1].split()[0]) for line in out.stdout.splitlines() if "| ctc " in line]
        assert len(losses) == 4 and losses[-1] < losses[0]
        assert ("conv stem none" in out.stdout) == (stem == "none")
        assert "after 4 steps: not below 3.0" in out.stdout


# -----------------------------------------------------------------------------
# the benchmarks, at their smallest: they run, compare like with like, and print what the README quotes

def test_bench_encoder_tables_on_the_tiny_encoder(tmp_path):
    out = run(tmp_path, "scripts.bench_encoder", "--config=tiny", "--modes=resize:128,gundam:128:256",
              "--rel_pos_modes=pad:256", "--switch_mode=pad:256")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    total = next(line for line in lines if line.startswith("total"))
    assert len(total.split()) == 3  # one column per mode
    for choice in ("rel-pos: auto vs folded", "rel-pos: auto vs dense"):
        row = next(line for line in lines if line.startswith(choice)).split()
        assert row[-2].endswith("x") and float(row[-1]) < 1e-4  # ratio, and the same output
    forms = [line.split()[3] for line in lines if line.startswith("  256")]
    assert forms == ["dense", "folded", "chunked", "dense", "folded"]


def test_bench_engine_checks_its_tokens_and_ends_with_the_batch_speedup(tmp_path):
    out = run(tmp_path, "scripts.bench_engine", "--new_tokens=12", "--repeats=1", "--batch_records=3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "same tokens: engine vs naive True, batched vs one by one True" in lines
    assert lines[-2].startswith("speedup ") and lines[-1].startswith("batch speedup ")


def read_rows(stdout, data):
    """The table rows of one set: reader -> [n, CER, exact, lines/s]."""
    rows = [line.split() for line in stdout.splitlines() if line.startswith(data + " ")]
    return {row[1]: row[2:] for row in rows if row[1] in ("ours", "tesseract")}


def test_bench_read_reports_ours_alone_without_tesseract(checkpoint, tmp_path):
    base, _ = checkpoint
    lines = write_dataset(str(tmp_path / "lines"), ["TOTAL 12.00", "hello world", "RX-4471"])
    broken = write_dataset(str(tmp_path / "broken"), ["gone", "kept"])
    os.remove(tmp_path / "broken" / "images" / "0.png")
    no_tesseract = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                                   if not os.path.exists(os.path.join(d, "tesseract")))
    out_json = tmp_path / "read.json"
    out = run(base, "scripts.bench_read", f"--data={lines},{broken}", "--model_tag=rand", "--max_new_tokens=4",
              "--batch_size=2", f"--json={out_json}", PATH=no_tesseract)
    assert out.returncode == 0, out.stderr
    assert "tesseract is not installed (Debian package tesseract-ocr)" in out.stdout
    ours = read_rows(out.stdout, lines)["ours"]
    assert ours[0] == "3" and float(ours[1]) >= 0 and ours[2].endswith("/3") and float(ours[3]) > 0
    assert set(read_rows(out.stdout, broken)) == {"ours"}
    assert out.stdout.count("does not exist") == 1 and "ours: record r0: " in out.stdout  # an empty answer
    assert out.stdout.strip().splitlines()[-1] == "lines/s ratio (ours / tesseract): - (no tesseract)"
    summary = json.loads(out_json.read_text())
    first, second = summary["sets"]
    assert first["data"] == lines and first["ours"]["n"] == 3 and first["ours"]["lines_per_s"] > 0
    assert first["tesseract"] is None and summary["ratio"] is None and second["ours"]["n"] == 2
    missing = run(base, "scripts.bench_read", f"--data={lines},{tmp_path / 'nowhere.json'}", "--model_tag=rand")
    assert missing.returncode != 0 and "dataset not found" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract is not installed")
def test_bench_read_compares_with_tesseract(checkpoint, tmp_path):
    base, _ = checkpoint
    lines = write_dataset(str(tmp_path / "lines"), ["TOTAL 12.00", "hello world", "RX-4471"])
    out_json = tmp_path / "read.json"
    out = run(base, "scripts.bench_read", f"--data={lines}", "--model_tag=rand", "--max_new_tokens=4",
              f"--json={out_json}")
    assert out.returncode == 0, out.stderr
    rows = read_rows(out.stdout, lines)
    assert set(rows) == {"ours", "tesseract"} and rows["tesseract"][0] == "3" and float(rows["tesseract"][3]) > 0
    assert re.fullmatch(r"lines/s ratio \(ours / tesseract\): \d+\.\d\dx \(geometric mean over 1 sets\)",
                        out.stdout.strip().splitlines()[-1])
    summary = json.loads(out_json.read_text())
    assert summary["sets"][0]["tesseract"]["n"] == 3 and summary["ratio"] == pytest.approx(summary["sets"][0]["ratio"])


def test_bench_deepseek_needs_the_reference_code(tmp_path):
    out = run(tmp_path, "scripts.bench_deepseek", f"--reference_dir={tmp_path}")
    assert out.returncode != 0 and "sam_vary_sdpa.py" in out.stderr
