#!/bin/sh
# MOOD entry point, sample-level task on the abdom dataset: run_sample_abdom.sh input_folder output_folder
# (in the image: /workspace/run_sample_abdom.sh /mnt/data /mnt/pred). POSIX sh on purpose: the challenge's
# test_docker.py calls it as `sh /workspace/run_sample_abdom.sh ...`. The logic lives in run_mood.sh.
exec bash "$(dirname "$0")/run_mood.sh" sample abdom "$@"
