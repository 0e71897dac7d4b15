# Sourced by the shell entry points: make (or reuse) .venv with torch and the package installed.
# CPU torch where there is no NVIDIA GPU: the pinned CPU build is small and installs fast.
pip_install() {
    # pip warns about every configured index folder that does not exist; keep the real messages
    python -m pip install -q "$@" 2>&1 | grep -v "^WARNING: Location" || true
    return "${PIPESTATUS[0]}"
}
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
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
needs="nanovlm, tiktoken, rustbpe, safetensors, PIL, pypdfium2, pytest"
[ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] && needs="$needs, triton"   # the dev extra's triton (kernel tests)
if ! python -c "import $needs" 2>/dev/null; then
    pip_install -e ".[dev]"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
