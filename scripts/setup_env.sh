# Sourced by the shell entry points: make (or reuse) .venv with torch and the package installed.
# CPU torch where there is no NVIDIA GPU: the pinned CPU build is small and installs fast.
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
source .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q --upgrade pip
    python -m pip install -q "torch==2.13.0"
fi
if ! python -c "import nanovlm, tiktoken, rustbpe, safetensors, PIL, pytest" 2>/dev/null; then
    python -m pip install -q -e ".[dev]"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
