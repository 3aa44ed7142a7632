#!/usr/bin/env bash
# Every experiment of the paper as a command (one block per table row), plus the offline digits runs.
# Set the paths below (or export them); every line then runs as printed. Teachers are EDM runs of
# this codebase, or official checkpoints converted with `python -m consistency.convert` into
# RUNS/<name>/checkpoints. `./launch.sh --check NAME|all` validates the lines' configs (every key,
# the sampler and evaluation settings) without training or reading any file.
set -euo pipefail
DATA=${DATA:-$HOME/tensorflow_datasets}  # tfds data_dir (CIFAR-10, LSUN Bedroom)
CIFAR10=${CIFAR10:-}  # prepare --dataset=cifar10 output; empty: tfds cifar10 prepared in DATA
BEDROOM=${BEDROOM:-}  # prepare --dataset=lsun_bedroom output; empty: tfds lsun/bedroom in DATA
IMAGENET64=${IMAGENET64:-$DATA/imagenet64_adm}  # python -m consistency.io.prepare --dataset=imagenet64
CAT=${CAT:-$DATA/lsun_cat256}  # python -m consistency.io.prepare --dataset=lsun_cat
RUNS=${RUNS:-runs}  # output root
LPIPS_VGG=${LPIPS_VGG:-weights/vgg16-397923af.pth}  # torchvision VGG16 (training.distance=lpips)
LPIPS_LIN=${LPIPS_LIN:-weights/lpips_v0.1_vgg.pth}  # the lpips package's weights/v0.1/vgg.pth
INCEPTION=${INCEPTION:-weights/pt_inception-2015-12-05-6726825d.pth}  # pytorch-fid's FID net
CHECK=${CHECK:-0}
if [ "${1:-}" = "--check" ]; then CHECK=1; shift; fi
# LAUNCH_PRINT=1 prints each command's arguments instead (tests/test_launch.py checks them).
run() {
  if [ "${LAUNCH_PRINT:-0}" = 1 ]; then echo "main.py $*"
  elif [ "$CHECK" = 1 ]; then python main.py --check "$@"
  else python main.py "$@"; fi
}
LPIPS="--config.training.lpips_vgg=$LPIPS_VGG --config.training.lpips_lin=$LPIPS_LIN"
C10="--config.data.data_dir=$DATA --config.data.folder=$CIFAR10"
BED="--config.data.data_dir=$DATA --config.data.folder=$BEDROOM"
data_for() {  # the data flags of a line by its dataset
  case "$1" in *cifar10*) echo "$C10" ;; *imagenet64*) echo "--config.data.folder=$IMAGENET64" ;; esac
}

case "${1:-help}" in
# --- Offline, on the bundled 8x8 digits (2 CPU cores, minutes) ---
digits)
  run --config=configs/edm_digits.py --workdir=$RUNS/edm_digits
  run --config=configs/edm_digits.py --workdir=$RUNS/edm_digits --mode=eval
  run --config=configs/cd_digits.py --workdir=$RUNS/cd_digits \
    --config.training.teacher_checkpoint=$RUNS/edm_digits/checkpoints
  run --config=configs/ct_digits.py --workdir=$RUNS/ct_digits ;;
# --- CIFAR-10 (paper Table: CD/CT on CIFAR-10; jcm launch.sh) ---
edm_cifar10) run --config=configs/edm_cifar10.py --workdir=$RUNS/edm_cifar10 $C10 ;;
cd_cifar10_l1|cd_cifar10_l2|cd_cifar10_lpips)
  run --config=configs/cd_cifar10.py:${1##*_} --workdir=$RUNS/$1 $C10 \
    --config.training.teacher_checkpoint=$RUNS/edm_cifar10/checkpoints $LPIPS ;;
ct_cifar10) run --config=configs/ct_cifar10.py --workdir=$RUNS/ct_cifar10 $C10 $LPIPS ;;
# --- ImageNet 64 (cm launch.sh); teacher: edm_imagenet64_ema.pt converted ---
cd_imagenet64_l2|cd_imagenet64_lpips)
  run --config=configs/cd_imagenet64.py:${1##*_} --workdir=$RUNS/$1 --config.data.folder=$IMAGENET64 \
    --config.training.teacher_checkpoint=$RUNS/edm_imagenet64/checkpoints $LPIPS ;;
ct_imagenet64) run --config=configs/ct_imagenet64.py --workdir=$RUNS/ct_imagenet64 --config.data.folder=$IMAGENET64 $LPIPS ;;
# --- LSUN Bedroom 256; teacher: edm_bedroom256_ema.pt converted ---
cd_lsun_bedroom256_l2|cd_lsun_bedroom256_lpips)
  run --config=configs/cd_lsun_bedroom256.py:${1##*_} --workdir=$RUNS/$1 $BED \
    --config.training.teacher_checkpoint=$RUNS/edm_bedroom256/checkpoints $LPIPS ;;
ct_lsun_bedroom256) run --config=configs/ct_lsun_bedroom256.py --workdir=$RUNS/ct_lsun_bedroom256 $BED $LPIPS ;;
# --- LSUN Cat 256 (an image folder); teacher: edm_cat256_ema.pt converted ---
cd_lsun_cat256_l2|cd_lsun_cat256_lpips)
  run --config=configs/cd_lsun_cat256.py:${1##*_} --workdir=$RUNS/$1 --config.data.folder=$CAT \
    --config.training.teacher_checkpoint=$RUNS/edm_cat256/checkpoints $LPIPS ;;
ct_lsun_cat256) run --config=configs/ct_lsun_cat256.py --workdir=$RUNS/ct_lsun_cat256 --config.data.folder=$CAT $LPIPS ;;
# --- Successors (configs/_successors.py): iCT, ECT, sCM, the CM paper's continuous-time CD/CT ---
successors_digits)
  E=$RUNS/edm_digits/checkpoints; T=$RUNS/trigflow_digits/checkpoints
  [ -d "$E" ] || run --config=configs/edm_digits.py --workdir=$RUNS/edm_digits
  [ -d "$T" ] || run --config=configs/scm_digits.py:teacher --workdir=$RUNS/trigflow_digits
  run --config=configs/ict_digits.py --workdir=$RUNS/ict_digits
  run --config=configs/ect_digits.py --workdir=$RUNS/ect_digits --config.training.teacher_checkpoint=$E
  run --config=configs/pd_digits.py --workdir=$RUNS/pd_digits --config.training.teacher_checkpoint=$E
  for v in cd-l2 ct-l2; do
    run --config=configs/continuous_digits.py:$v --workdir=$RUNS/continuous_digits_$v \
      --config.training.teacher_checkpoint=$E
  done
  for v in sct scd; do
    run --config=configs/scm_digits.py:$v --workdir=$RUNS/${v}_digits --config.training.teacher_checkpoint=$T
  done ;;
ict_cifar10) run --config=configs/$1.py --workdir=$RUNS/$1 $C10 ;;
ict_imagenet64) run --config=configs/$1.py --workdir=$RUNS/$1 --config.data.folder=$IMAGENET64 ;;
ect_cifar10|ect_imagenet64)
  run --config=configs/$1.py --workdir=$RUNS/$1 $(data_for "$1") \
    --config.training.teacher_checkpoint=$RUNS/edm_${1#ect_}/checkpoints ;;
scm_cifar10_teacher) run --config=configs/scm_cifar10.py:teacher --workdir=$RUNS/$1 $C10 ;;
scm_cifar10_sct|scm_cifar10_scd|scm_imagenet64_sct|scm_imagenet64_scd)
  # ImageNet: the teacher is a TrigFlow EDM run of the same ADM (model.parameterization=trigflow).
  run --config=configs/${1%_*}.py:${1##*_} --workdir=$RUNS/$1 $(data_for "$1") \
    --config.training.teacher_checkpoint=$RUNS/${1%_*}_teacher/checkpoints ;;
continuous_cifar10_cd-l2|continuous_cifar10_cd-l2-stopgrad|continuous_cifar10_ct-l2)
  run --config=configs/continuous_cifar10.py:${1#continuous_cifar10_} --workdir=$RUNS/$1 \
    $C10 --config.training.teacher_checkpoint=$RUNS/edm_cifar10/checkpoints ;;
# --- Guided CD (LCM's recipe in pixel space): a teacher with label dropout, then its student ---
lcd_digits)
  run --config=configs/lcd_digits.py:teacher --workdir=$RUNS/lcd_digits_teacher
  run --config=configs/lcd_digits.py --workdir=$RUNS/lcd_digits \
    --config.training.teacher_checkpoint=$RUNS/lcd_digits_teacher/checkpoints ;;
lcd_latent_digits)  # LCM on the digits' latents: autoencoder, latent cache, teacher, LCD, LCF
  V=$RUNS/vae_digits; R=$RUNS/lcd_latent_digits
  L="--config.latent.vae=$V --config.latent.cache=$RUNS/latent_digits/latents"
  [ -d "$V/vae" ] || run --config=configs/vae_digits.py --workdir=$V
  run --mode=encode --config=configs/latent_digits.py --workdir=$RUNS/latent_digits $L
  run --config=configs/lcd_latent_digits.py:teacher --workdir=${R}_teacher $L
  run --config=configs/lcd_latent_digits.py:student --workdir=$R $L \
    --config.training.teacher_checkpoint=${R}_teacher/checkpoints
  run --config=configs/lcd_latent_digits.py:lcf --workdir=${R}_lcf $L \
    --config.training.init_checkpoint=$R/checkpoints ;;
lcd_imagenet64_teacher)  # the official teachers have no null class: this one is trained
  run --config=configs/lcd_imagenet64.py:teacher --workdir=$RUNS/$1 --config.data.folder=$IMAGENET64 ;;
lcd_imagenet64)
  run --config=configs/lcd_imagenet64.py --workdir=$RUNS/$1 --config.data.folder=$IMAGENET64 \
    --config.training.teacher_checkpoint=$RUNS/lcd_imagenet64_teacher/checkpoints $LPIPS ;;
# --- Sampling and evaluating any of the above (the config's settings; FID with pytorch-fid's net) ---
sample) shift; run --mode=sample "$@" ;;
eval) shift; run --mode=eval --config.eval.inception_path=$INCEPTION "$@" ;;
all)  # every line above (with --check: validates every paper and digits experiment)
  for name in digits successors_digits edm_cifar10 cd_cifar10_l1 cd_cifar10_l2 cd_cifar10_lpips \
      ct_cifar10 cd_imagenet64_l2 cd_imagenet64_lpips ct_imagenet64 cd_lsun_bedroom256_l2 \
      cd_lsun_bedroom256_lpips ct_lsun_bedroom256 cd_lsun_cat256_l2 cd_lsun_cat256_lpips \
      ct_lsun_cat256 ict_cifar10 ict_imagenet64 ect_cifar10 ect_imagenet64 scm_cifar10_teacher \
      scm_cifar10_sct scm_cifar10_scd scm_imagenet64_sct scm_imagenet64_scd \
      continuous_cifar10_cd-l2 continuous_cifar10_cd-l2-stopgrad continuous_cifar10_ct-l2 \
      lcd_digits lcd_latent_digits lcd_imagenet64_teacher lcd_imagenet64; do
    CHECK=$CHECK bash "$0" "$name"
  done ;;
*)
  echo "usage: $0 {digits|edm_cifar10|cd_cifar10_{l1,l2,lpips}|ct_cifar10|cd_imagenet64_{l2,lpips}|ct_imagenet64|"
  echo "          cd_lsun_bedroom256_{l2,lpips}|ct_lsun_bedroom256|cd_lsun_cat256_{l2,lpips}|ct_lsun_cat256|"
  echo "          successors_digits|ict_{cifar10,imagenet64}|ect_{cifar10,imagenet64}|scm_cifar10_teacher|"
  echo "          scm_{cifar10,imagenet64}_{sct,scd}|continuous_cifar10_{cd-l2,cd-l2-stopgrad,ct-l2}|"
  echo "          lcd_digits|lcd_latent_digits|lcd_imagenet64_teacher|lcd_imagenet64|"
  echo "          sample|eval --config=... --workdir=...|all}   (--check NAME|all: validate only)" ;;
esac
