#!/bin/sh
# The example PNGs of the README's "Analyses and the iLLaMA ladder" section: a SHORT run on 1 CPU
# thread (about 2.5 minutes in all), not a benchmark. Numbers from it say nothing about the claims.
set -e
export OMP_NUM_THREADS=1
OUT=${1:-runs/examples}
DOCS=$(dirname "$0")
llamavit train --config configs/fmnist_illama.yaml --epochs 1 --train-subset 6000 --val-subset 2000 \
    --soft-mask-epochs 0.3 --output "$OUT/illama" --no-progress
llamavit analyze calibration --checkpoint "$OUT/illama" --subset 2000 --output "$OUT/calibration"
llamavit analyze quantize --checkpoint "$OUT/illama" --subset 2000 --output "$OUT/quantize"
llamavit analyze resolution --checkpoint "$OUT/illama" --subset 1000 --sizes 20 24 28 36 44 \
    --output "$OUT/resolution"
llamavit analyze attention --checkpoint "$OUT/illama" --num-images 1 --layers 0 2 5 --output "$OUT/attention"
llamavit ablate illama-ladder --epochs 2 --train-subset 1024 --val-subset 500 --batch-size 64 \
    --output "$OUT/ladder" --no-progress
cp "$OUT/calibration/reliability.png" "$OUT/quantize/quantization.png" "$OUT/resolution/resolution.png" \
   "$OUT/attention/image000_attention.png" "$OUT/attention/attention_spectrum.png" \
   "$OUT/ladder/ladder_curves.png" "$OUT/ladder/ladder_attention_spectrum.png" "$OUT/ladder/ladder.md" "$DOCS/"
