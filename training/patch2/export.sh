# Exports a checkpoint of the patch-2 run (its EMA weights) as a pipeline, without disturbing a run in progress:
#   bash training/patch2/export.sh [dit-STEP] [OUT]   (defaults: the newest checkpoint, /tmp/patch2-export)
# It runs the run's own command (command.sh) with --export-only, on a copy of the checkpoint and the autoencoder.
cd "$(dirname "$0")/../.."
ckpt=${1:-$(ls -d training/patch2/checkpoints/dit-* | sort -t- -k2 -n | tail -1 | xargs basename)}
out=${2:-/tmp/patch2-export}
rm -rf "$out" && mkdir -p "$out/checkpoints" && cp -r "training/patch2/checkpoints/$ckpt" "$out/checkpoints/" \
    && cp -r training/patch2/vae "$out/" \
    && OUTPUT_DIR="$out" bash training/patch2/command.sh --export-only \
    && echo "exported $ckpt to $out/pipeline"
