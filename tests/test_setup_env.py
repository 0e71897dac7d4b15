"""Set-up repairs itself: Ctrl-C while `python3 -m venv` installs pip leaves a .venv with bin/python but no
bin/activate, and the next run of scripts/setup_env.sh (which every shell entry point sources) makes it again."""

import os
import shutil
import signal
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPAIR = "setup: .venv is incomplete ({}: an interrupted set-up?); rebuilding it"


def setup_env(cwd, then="python -c 'import sys; print(sys.prefix)'"):
    """Source the set-up as the entry points do, in cwd, where it makes its .venv. python3 is this interpreter's
    base and the packages of this environment stay importable (PYTHONPATH, which the venv module itself ignores
    while it installs pip), so the import checks pass and nothing is downloaded: only the venv is made."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PATH=os.path.dirname(os.path.realpath(sys.executable)) + os.pathsep + os.environ["PATH"],
               PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(os.path.dirname(torch.__file__))]))
    env.pop("VIRTUAL_ENV", None)
    script = f"set -euo pipefail; source {ROOT}/scripts/setup_env.sh; {then}"
    # a session of its own: the whole group gets the SIGINT, as a terminal's Ctrl-C does
    return subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def installing_pip(session):
    """Whether a process of this session (the set-up's process group) is venv's ensurepip."""
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.getpgid(int(pid)) == session:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"ensurepip" in f.read():
                        return True
        except OSError:  # gone meanwhile
            continue
    return False


def run_setup(cwd, **kwargs):
    proc = setup_env(cwd, **kwargs)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    return out


def test_interrupted_setup_is_rebuilt(tmp_path):
    venv = tmp_path / ".venv"
    # interrupt the first set-up while `python3 -m venv` installs pip (its ensurepip child is running)
    proc = setup_env(tmp_path)
    deadline = time.time() + 60
    while not installing_pip(proc.pid) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, proc.communicate()[0]
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0, out
    assert os.path.lexists(venv / "bin" / "python") and not (venv / "bin" / "activate").exists(), out

    # the next run says so, makes the venv again and uses it
    out = run_setup(tmp_path)
    assert REPAIR.format("no bin/activate") in out, out
    assert out.strip().splitlines()[-1] == str(venv), out
    assert (venv / "bin" / "activate").exists()
    pip = subprocess.run([venv / "bin" / "python", "-m", "pip", "--version"], capture_output=True, text=True)
    assert pip.returncode == 0 and str(venv) in pip.stdout, pip.stdout + pip.stderr  # its own pip, not ours

    # a venv whose python is gone (a moved interpreter, a half-made link) is made again too
    (venv / "bin" / "python").unlink()
    (venv / "bin" / "python").symlink_to(tmp_path / "gone")
    out = run_setup(tmp_path)
    assert REPAIR.format("its bin/python does not run") in out, out
    assert out.strip().splitlines()[-1] == str(venv), out

    # a venv whose pip is gone (an upgrade of pip cut short) is reused, and gets pip back before it installs
    for path in (venv / "lib").glob("python*/site-packages/pip*"):  # as pip's uninstall leaves it
        shutil.rmtree(path)
    # (this environment's pip is on PYTHONPATH too: drop it, so that only the venv's own can answer)
    out = run_setup(tmp_path, then="unset PYTHONPATH; pip_install --help | grep setup:; python -m pip --version")
    assert out.strip().splitlines()[0] == "setup: .venv has no working pip (an interrupted set-up?); reinstalling it"
    assert "rebuilding" not in out and str(venv) in out.strip().splitlines()[-1], out
