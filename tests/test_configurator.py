import pytest

from configurator import configure


def scope():
    return {"lr": 3e-4, "steps": 100, "run": "dummy", "compile": True, "init_from": None, "MAX": 5, "_private": 1,
            "torch": pytest}


def test_overrides_and_resolved_config():
    s = scope()
    config = configure(s, ["--lr=1e-3", "--steps=7", "--run=ocr_a", "--compile=False", "--init_from=ckpt/d20"])
    assert s["lr"] == 1e-3 and s["steps"] == 7 and s["run"] == "ocr_a" and s["compile"] is False
    assert config == {"lr": 1e-3, "steps": 7, "run": "ocr_a", "compile": False, "init_from": "ckpt/d20"}


def test_int_widens_to_float_and_values_may_hold_equals():
    s = scope()
    configure(s, ["--lr=1", "--run=a=b"])
    assert s["lr"] == 1.0 and type(s["lr"]) is float and s["run"] == "a=b"
    configure(s, ["--run=" + "word " * 3000])  # long free text: Python's parser gives up, the string stays
    assert s["run"] == "word " * 3000
    configure(s, ["--run=640"])  # a number typed for a text setting is that text
    assert s["run"] == "640"
    configure(s, ["--run=1e-3"])
    assert s["run"] == "1e-3"


def test_unknown_key_names_it_and_lists_valid_ones():
    with pytest.raises(SystemExit, match="unknown key 'lrr'.*compile, init_from, lr, run, steps"):
        configure(scope(), ["--lrr=1"])
    with pytest.raises(SystemExit, match="unknown key 'MAX'"):
        configure(scope(), ["--MAX=1"])  # constants are not settings


@pytest.mark.parametrize("arg", ["--steps=1.5", "--compile=1", "--steps=True", "--lr=fast"])
def test_type_mismatch_names_the_key(arg):
    key = arg[2:].split("=")[0]
    with pytest.raises(SystemExit, match=f"--{key}="):
        configure(scope(), [arg])


def test_config_file(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("import math\nlr = 2e-4\nsteps = 3 * 10\n")
    s = scope()
    configure(s, [str(path), "--steps=5"])  # later arguments win
    assert s["lr"] == 2e-4 and s["steps"] == 5
    path.write_text("learning_rate = 1.0\n")
    with pytest.raises(SystemExit, match="unknown key 'learning_rate'"):
        configure(scope(), [str(path)])
    with pytest.raises(SystemExit, match="cannot read config file"):
        configure(scope(), [str(tmp_path / "missing.py")])
    with pytest.raises(SystemExit, match="not of the form"):
        configure(scope(), ["--steps"])
