#!/bin/sh
# MOOD entry point, pixel-level task on the brain dataset: run_pixel_brain.sh input_folder output_folder
# (in the image: /workspace/run_pixel_brain.sh /mnt/data /mnt/pred). POSIX sh on purpose: the challenge's
# test_docker.py calls it as `sh /workspace/run_pixel_brain.sh ...`. The logic lives in run_mood.sh.
exec bash "$(dirname "$0")/run_mood.sh" pixel brain "$@"
