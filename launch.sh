#!/usr/bin/env bash
# Every experiment of the paper as a command (one block per table row), plus the offline digits runs.
# Set DATA (tfds data_dir), RUNS (output root) and, for LSUN Cat, CAT (a folder of 256px PNGs).
# Teachers are EDM runs of this codebase, or official checkpoints converted with
# `python -m consistency.convert` into RUNS/<name>/checkpoints.
set -euo pipefail
DATA=${DATA:-$HOME/tensorflow_datasets}
RUNS=${RUNS:-runs}
CAT=${CAT:-/path/to/lsun_cat_png}
run() { python main.py "$@"; }

case "${1:-help}" in
# --- Offline, on the bundled 8x8 digits (2 CPU cores, minutes) ---
digits)
  run --config=configs/edm_digits.py --workdir=$RUNS/edm_digits
  run --config=configs/cd_digits.py --workdir=$RUNS/cd_digits \
    --config.training.teacher_checkpoint=$RUNS/edm_digits/checkpoints
  run --config=configs/ct_digits.py --workdir=$RUNS/ct_digits ;;
# --- CIFAR-10 (paper Table: CD/CT on CIFAR-10; jcm launch.sh) ---
edm_cifar10) run --config=configs/edm_cifar10.py --workdir=$RUNS/edm_cifar10 --config.data.data_dir=$DATA ;;
cd_cifar10_l1|cd_cifar10_l2|cd_cifar10_lpips)
  run --config=configs/cd_cifar10.py:${1##*_} --workdir=$RUNS/$1 --config.data.data_dir=$DATA \
    --config.training.teacher_checkpoint=$RUNS/edm_cifar10/checkpoints ;;
ct_cifar10) run --config=configs/ct_cifar10.py --workdir=$RUNS/ct_cifar10 --config.data.data_dir=$DATA ;;
# --- ImageNet 64 (cm launch.sh); teacher: edm_imagenet64_ema.pt converted ---
cd_imagenet64_l2|cd_imagenet64_lpips)
  run --config=configs/cd_imagenet64.py:${1##*_} --workdir=$RUNS/$1 --config.data.data_dir=$DATA \
    --config.training.teacher_checkpoint=$RUNS/edm_imagenet64/checkpoints ;;
ct_imagenet64) run --config=configs/ct_imagenet64.py --workdir=$RUNS/ct_imagenet64 --config.data.data_dir=$DATA ;;
# --- LSUN Bedroom 256; teacher: edm_bedroom256_ema.pt converted ---
cd_lsun_bedroom256_l2|cd_lsun_bedroom256_lpips)
  run --config=configs/cd_lsun_bedroom256.py:${1##*_} --workdir=$RUNS/$1 --config.data.data_dir=$DATA \
    --config.training.teacher_checkpoint=$RUNS/edm_bedroom256/checkpoints ;;
ct_lsun_bedroom256) run --config=configs/ct_lsun_bedroom256.py --workdir=$RUNS/ct_lsun_bedroom256 --config.data.data_dir=$DATA ;;
# --- LSUN Cat 256 (an image folder); teacher: edm_cat256_ema.pt converted ---
cd_lsun_cat256_l2|cd_lsun_cat256_lpips)
  run --config=configs/cd_lsun_cat256.py:${1##*_} --workdir=$RUNS/$1 --config.data.folder=$CAT \
    --config.training.teacher_checkpoint=$RUNS/edm_cat256/checkpoints ;;
ct_lsun_cat256) run --config=configs/ct_lsun_cat256.py --workdir=$RUNS/ct_lsun_cat256 --config.data.folder=$CAT ;;
# --- Sampling any of the above: one step, or the config's two-step setting ---
sample) shift; run --mode=sample "$@" ;;
*)
  echo "usage: $0 {digits|edm_cifar10|cd_cifar10_{l1,l2,lpips}|ct_cifar10|cd_imagenet64_{l2,lpips}|ct_imagenet64|"
  echo "          cd_lsun_bedroom256_{l2,lpips}|ct_lsun_bedroom256|cd_lsun_cat256_{l2,lpips}|ct_lsun_cat256|"
  echo "          sample --config=... --workdir=...}" ;;
esac
