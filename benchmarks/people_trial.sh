#!/usr/bin/env bash
# The eight-photo trial of issue 20, as a new user: eight photos of their own (here: 1600x1200 JPEGs made
# from synthetic scenes, upscaled and noised; no ground truth anywhere), `stages.simulate: false`.
# Usage: benchmarks/people_trial.sh [DIR] (default /tmp/trial; ports 8731/8732). docs/experiments/people-trial.md
# holds a run's output.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
TRIAL=${1:-/tmp/trial}
mkdir -p "$TRIAL" && cd "$TRIAL"
SA=$REPO/.venv/bin/sa-engine
PY=$REPO/.venv/bin/python
rm -rf photos work store engine.yaml
$PY - <<'PYEOF'
import numpy as np
from PIL import Image
from engine.integrations.synth import make_scene, scene_rng
from pathlib import Path
Path("photos").mkdir()
for i in range(8):
    img = make_scene(scene_rng(77, i), 300)[0]
    big = np.asarray(Image.fromarray(img).resize((1600, 1200), Image.BICUBIC)).astype(np.int16)
    big = np.clip(big + np.random.default_rng(i).integers(-12, 13, big.shape), 0, 255).astype(np.uint8)
    Image.fromarray(big).save(f"photos/IMG_{4100 + i}.JPG", quality=90)
PYEOF
cat > engine.yaml <<YEOF
workdir: $TRIAL/work
images:
  source: $TRIAL/photos
  ground_truth: null
  holdout_source: null
  holdout_ground_truth: null
storage:
  root: $TRIAL/store
stages:
  simulate: false
labelstudio:
  port: 8731
  ml_backend_port: 8732
YEOF
step() { echo; echo "### \$ $*"; }
step sa-engine config --config engine.yaml --check; $SA config --config engine.yaml --check; echo "exit $?"
step sa-engine run --config engine.yaml; timeout 120 $SA run --config engine.yaml; echo "exit $?"
step sa-engine stage manual --config engine.yaml --simulate; timeout 120 $SA stage manual --config engine.yaml --simulate; echo "exit $?"
step sa-engine stage auto --config engine.yaml; timeout 300 $SA stage auto --config engine.yaml; echo "exit $?"
step sa-engine report --config engine.yaml; timeout 120 $SA report --config engine.yaml; echo "exit $?"
step "sa-engine stage manual --config engine.yaml --people   (Ctrl-C after 75 s)"
timeout --preserve-status -s INT 75 $SA stage manual --config engine.yaml --people; echo "exit $?"
step sa-engine labelstudio status --config engine.yaml; COLUMNS=200 $SA labelstudio status --config engine.yaml 2>&1 | sed -E -e 's/"password": "[^"]+"/"password": "<hidden>"/' -e 's#(log in as [^ ]+ / ).*#\1<hidden>#'; echo "exit ${PIPESTATUS[0]}"
step "the ML backend after the stage: GET /health"
curl -s -u "sa-engine:$(cat work/labelstudio/ml_backend_token)" http://127.0.0.1:8732/health; echo
step sa-engine labelstudio down --config engine.yaml; $SA labelstudio down --config engine.yaml; echo "exit $?"
