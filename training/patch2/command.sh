# resumable: run again to continue from the newest checkpoint in training/patch2/checkpoints. Those checkpoints
# (optimiser and all, 83 MB each) stay on the training machine; where they are gone, the run goes on from the EMA
# weights committed in training/patch2/ema (a fresh optimiser and step count; the loss log so far is kept aside).
cd "$(dirname "$0")/../.."
if ls training/patch2/checkpoints/dit-* > /dev/null 2>&1 || [ ! -d training/patch2/ema ]; then
    init="--dit-init streamdit/models/shapes-world --new-latent-space --patch-size 2"
else
    init="--dit-init training/patch2/ema"
    leg=$(ls training/patch2/dit-loss-leg*.csv 2> /dev/null | wc -l)
    cp training/patch2/dit-loss.csv "training/patch2/dit-loss-leg$((leg + 1)).csv"
fi
python -m streamdit.train --stage dit --output-dir training/patch2 --batch-size 24 --warmup-steps 200 \
    --pool-size 256 --pool-refresh 0.25 --micro-steps 8 --chunk-size 2 --guidance-scale 3 --switch-strength 0.625 \
    --object-weight 8 $init --window-size 8 8 8 \
    --steps 12000 --decay-steps 2000 --lr 8e-4 --checkpoint-every 100 --log-every 10
