# Sourced by the shell entry points: make (or reuse) .venv with torch and the package installed.
# CPU torch where there is no NVIDIA GPU: the pinned CPU build is small and installs fast.
# An interrupted set-up is repaired by the next run: a package cut short fails its import check below and is
# installed again, and a .venv cut short is made again (see there).
pip_install() {
    # an upgrade of pip cut short leaves no working pip (pip removes its old copy first): put back the one Python
    # ships, which needs no network
    if ! python -m pip --version >/dev/null 2>&1; then
        echo "setup: .venv has no working pip (an interrupted set-up?); reinstalling it"
        python -m ensurepip >/dev/null
    fi
    # pip warns about every configured index folder that does not exist; keep the real messages (and pip's status)
    python -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
    return "${PIPESTATUS[0]}"
}
if [ ! -e .venv ]; then
    python3 -m venv .venv
elif [ ! -f .venv/bin/activate ] || ! .venv/bin/python -c "" 2>/dev/null; then
    # the venv module writes bin/activate last, after pip, so without it `python3 -m venv` was cut short (Ctrl-C
    # while it installs pip) and nothing of ours is in it yet; a bin/python that does not run is beyond repair too
    why="no bin/activate"
    [ -f .venv/bin/activate ] && why="its bin/python does not run"
    echo "setup: .venv is incomplete ($why: an interrupted set-up?); rebuilding it"
    python3 -m venv --clear .venv
fi
source .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    pip_install --upgrade pip
    if command -v nvidia-smi >/dev/null 2>&1; then
        pip_install torch
    else
        pip_install "torch==2.13.0"
    fi
fi
needs="nanovlm, tiktoken, rustbpe, safetensors, PIL, pypdfium2, matplotlib, scipy, pytest, wandb"
[ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] && needs="$needs, triton"   # the dev extra's triton (kernel tests)
if ! python -c "import $needs" 2>/dev/null; then
    pip_install -e ".[dev]"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
