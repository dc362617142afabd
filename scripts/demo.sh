#!/usr/bin/env bash
# Text-to-video on the embedded CogVideoX pipeline, dense and under the
# sliding-frames profile: writes out/demo.mp4 and out/demo.json and prints
# both wall times and the PSNR between the two videos.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
vdit-sparse generate --compare-dense --out out/demo.mp4 "$@"
