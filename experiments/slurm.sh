#!/bin/bash
# Multi-node DDP with SLURM: one task per GPU, Lightning reads the SLURM environment.
#   sbatch experiments/slurm.sh --data-dir data/PetImages --split imbalanced-1 --loss focal
# Before the time limit SLURM sends SIGUSR1 (--signal); Lightning then saves a checkpoint in the run
# directory and requeues the job (auto-requeue). The requeued job keeps its job id, so it finds the same
# run directory and continues with --resume (same epoch, optimiser state and W&B run).
#SBATCH --job-name=imbalance
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=SIGUSR1@120
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail

GPUS_PER_NODE=${SLURM_NTASKS_PER_NODE:-4}   # must equal --ntasks-per-node above
RUN_DIR=runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}
RESUME=()
if [ -f "$RUN_DIR/checkpoints/last.ckpt" ]; then RESUME=(--resume); fi

srun python -m experiments.run --gpus "$GPUS_PER_NODE" --nodes "$SLURM_NNODES" --out "$RUN_DIR" "${RESUME[@]}" "$@"
