# Exports a checkpoint of the patch-2 run (its EMA weights) as a pipeline, without disturbing a run in progress:
#   bash training/patch2/export.sh [dit-STEP] [OUT]   (defaults: the newest checkpoint, /tmp/patch2-export)
cd "$(dirname "$0")/../.."
ckpt=${1:-$(ls -d training/patch2/checkpoints/dit-* | sort -t- -k2 -n | tail -1 | xargs basename)}
out=${2:-/tmp/patch2-export}
rm -rf "$out" && mkdir -p "$out/checkpoints" && cp -r "training/patch2/checkpoints/$ckpt" "$out/checkpoints/" \
    && cp -r training/patch2/vae "$out/"
python -m streamdit.train --stage dit --output-dir "$out" --micro-steps 8 --chunk-size 2 --guidance-scale 3 \
    --switch-strength 0.625 --dit-init streamdit/models/shapes-world --new-latent-space --patch-size 2 \
    --window-size 8 8 8 --warmup-chunks 8 --export-only
echo "exported $ckpt to $out/pipeline"
