#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv, build the embedded spoken-commands corpus
# (espeak-ng, offline), train experiments/commands_tt.py, evaluate on the test split, print the WER.
#   bash scripts/quickstart.sh [WORKDIR] [extra --config.key=value overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
source scripts/setup_env.sh
echo "set-up done in $(( $(date +%s) - start )) s"
workdir="${1:-runs/commands_tt}"
shift || true
python scripts/train.py --config experiments/commands_tt.py --workdir "$workdir" "$@"
python - "$workdir" <<'PY'
import json, sys
r = json.load(open(f"{sys.argv[1]}/eval.json"))
print(f"test WER {100 * r['wer']:.2f}%  (S {r['substitutions']}, D {r['deletions']}, I {r['insertions']},"
      f" {r['num_words']} words, {r['num_utterances']} utterances), RTF {r['rtf']:.4f}")
PY
echo "main job done in $(( $(date +%s) - start )) s"
