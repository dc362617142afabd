#!/usr/bin/env bash
# Text-to-video on the embedded reference CogVideoX (trained, assets/), dense
# and under the cogvideox-5b profile (Sparse VideoGen): writes out/demo.mp4
# and out/demo.json and prints both wall times and the PSNR between the two
# videos. One to two minutes on a laptop CPU (after the first install).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
vdit-sparse generate --model embedded:reference --profile cogvideox-5b --compare-dense --out out/demo.mp4 "$@"
