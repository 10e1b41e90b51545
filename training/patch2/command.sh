# The patch-2 DiT, from the shipped model: resumable (run it again to go on from the newest checkpoint in
# training/patch2/checkpoints, which stay on the training machine, 83 MB each). Needs the shipped autoencoder:
#   cp -r streamdit/models/shapes-world/vae training/patch2/
# The learning rate is constant (8e-4, after 200 warm-up steps) until STEPS - DECAY, then falls linearly to 0 at STEPS
# (warmup-stable-decay). The EMA weights of the finished run (STEPS=3600) are committed in training/patch2/ema; to
# train on from them, set init="--dit-init training/patch2/ema" (a fresh optimiser and step count). OUTPUT_DIR and any
# further arguments are for export.sh, which runs this same command with --export-only on a copy of a checkpoint.
cd "$(dirname "$0")/../.."
init="--dit-init streamdit/models/shapes-world --new-latent-space --patch-size 2"
python -m streamdit.train --stage dit --output-dir "${OUTPUT_DIR:-training/patch2}" --batch-size 24 --warmup-steps 200 \
    --pool-size 256 --pool-refresh 0.25 --micro-steps 8 --chunk-size 2 --guidance-scale 3 --switch-strength 0.625 \
    --object-weight 8 $init --window-size 8 8 8 --warmup-chunks 8 \
    --steps "${STEPS:-3600}" --decay-steps "${DECAY:-900}" --lr 8e-4 --checkpoint-every 100 --log-every 10 "$@"
