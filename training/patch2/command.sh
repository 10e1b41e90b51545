# resumable: run again to continue from the newest checkpoint
python -m streamdit.train --stage dit --output-dir training/patch2 --batch-size 24 --warmup-steps 200 \
    --pool-size 256 --pool-refresh 0.25 --micro-steps 8 --chunk-size 2 --guidance-scale 3 --switch-strength 0.625 \
    --object-weight 8 --dit-init streamdit/models/shapes-world --new-latent-space --patch-size 2 --window-size 8 8 8 \
    --steps 12000 --decay-steps 2000 --lr 8e-4 --checkpoint-every 100 --log-every 10
