#!/bin/sh
# MOOD entry point, sample-level task on the brain dataset: run_sample_brain.sh input_folder output_folder
# (in the image: /workspace/run_sample_brain.sh /mnt/data /mnt/pred). POSIX sh on purpose: the challenge's
# test_docker.py calls it as `sh /workspace/run_sample_brain.sh ...`. The logic lives in run_mood.sh.
exec bash "$(dirname "$0")/run_mood.sh" sample brain "$@"
