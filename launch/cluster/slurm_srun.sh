#!/bin/bash
# Multi-node RTPurbo training on Slurm with srun: one task per GPU, no ssh, no DeepSpeed launcher.
# Each task runs `python launch/train.py` with the torch-distributed variables RANK, LOCAL_RANK,
# WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT taken from its Slurm task ids.
# Render:  python -m rtpurbo_train.cluster render slurm_srun --set partition=gpu --set recipe=rtpurbo_300step \
#              --set output_dir=runs/rtpurbo_300step -o job.sh
# Submit:  sbatch job.sh            (re-submitting the same file resumes from the latest checkpoint)
#
# @param partition     | word | required        | Slurm partition (--partition)
# @param recipe        | word | required        | recipe name in recipes/ or path to a recipe YAML
# @param output_dir    | word | required        | run directory (relative to repo_dir or absolute); keep it fixed so a requeued job resumes
# @param nodes         | int  | 2               | number of nodes (--nodes)
# @param gpus_per_node | int  | 8               | GPUs per node = training tasks per node (--ntasks-per-node, --gpus-per-node)
# @param cpus_per_gpu  | int  | 8               | CPU cores per task (--cpus-per-task)
# @param time          | word | 24:00:00        | wall-clock limit (--time)
# @param job_name      | word | rtpurbo         | job name (--job-name; log files are JOB_NAME-JOBID.out)
# @param master_port   | int  | 29500           | TCP port of the rendezvous on the first node
# @param repo_dir      | text | $SLURM_SUBMIT_DIR | repository checkout to cd into (shell expression)
# @param env_setup     | text | ""              | one shell line that activates the environment, e.g. "source /shared/venv/bin/activate"
# @param extra_args    | args | ""              | more train.py arguments, e.g. "--set stages.0.steps=100" (word-split by the shell)
#
# Preemption: Slurm sends SIGUSR1 to this script 120 s before the time limit (--signal=B:USR1@120).
# The trap passes it to srun, which forwards it to every task; the trainer saves a checkpoint at the
# next step and exits 0; then the script requeues the job (--requeue), which resumes from that
# checkpoint. SIGTERM (scancel, scheduler preemption) is forwarded the same way but not requeued here:
# preemption with PreemptMode=REQUEUE requeues by itself.

#SBATCH --job-name={{job_name}}
#SBATCH --partition={{partition}}
##SBATCH --account=MY_ACCOUNT               # remove one '#' to charge an account
#SBATCH --nodes={{nodes}}
#SBATCH --ntasks-per-node={{gpus_per_node}}
#SBATCH --gpus-per-node={{gpus_per_node}}
#SBATCH --cpus-per-task={{cpus_per_gpu}}
#SBATCH --time={{time}}
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# ---- settings ---------------------------------------------------------------------------------
export RTPURBO_RECIPE="{{recipe}}"
export RTPURBO_OUTPUT_DIR="{{output_dir}}"
export RTPURBO_EXTRA_ARGS="{{extra_args}}"
export LOCAL_WORLD_SIZE="{{gpus_per_node}}"
export MASTER_PORT="{{master_port}}"
export SRUN_CPUS_PER_TASK="{{cpus_per_gpu}}"  # srun (Slurm >= 22.05) no longer inherits --cpus-per-task
cd "{{repo_dir}}" || exit 1
{{env_setup}}

# ---- NCCL (uncomment what your fabric needs; srun passes the environment to every task) --------
# export NCCL_DEBUG=WARN                  # INFO to see the transport chosen per peer
# export NCCL_SOCKET_IFNAME=ib0           # interface for bootstrap/TCP traffic (not lo/docker0)
# export NCCL_IB_HCA=mlx5                 # InfiniBand adapters to use
# export NCCL_IB_DISABLE=1                # only on clusters without InfiniBand/RoCE
# export NCCL_NET_GDR_LEVEL=PHB           # GPUDirect RDMA distance
# export NCCL_ASYNC_ERROR_HANDLING=1      # fail fast instead of hanging when a rank dies
set -uo pipefail

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
mkdir -p "$RTPURBO_OUTPUT_DIR"
echo "[$(date '+%F %T')] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_JOB_NUM_NODES nodes x $LOCAL_WORLD_SIZE tasks, master $MASTER_ADDR:$MASTER_PORT"

# ---- preemption: srun forwards the signals it receives to its tasks ------------------------------
STOP_SIGNAL=""
forward_stop() {
    STOP_SIGNAL=$1
    echo "[$(date '+%F %T')] SIG$1 received: asking the trainers to checkpoint and exit"
    kill -USR1 "$SRUN_PID" 2>/dev/null
}
trap 'forward_stop USR1' USR1
trap 'forward_stop TERM' TERM

# ---- launch: one task per GPU; the single quotes defer expansion to each task ---------------------
# Every task sees all GPUs of its node and picks cuda:LOCAL_RANK; do not add --gpus-per-task here.
srun --kill-on-bad-exit=1 --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node="$LOCAL_WORLD_SIZE" bash -c '
    export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
    exec python launch/train.py --recipe "$RTPURBO_RECIPE" --output-dir "$RTPURBO_OUTPUT_DIR" $RTPURBO_EXTRA_ARGS
' &
SRUN_PID=$!
# a trapped signal makes `wait` return early while srun still runs: wait again
while kill -0 "$SRUN_PID" 2>/dev/null; do
    wait "$SRUN_PID"
done
wait "$SRUN_PID"  # bash remembers the exit status of a reaped background job
STATUS=$?
echo "[$(date '+%F %T')] srun exited with status $STATUS"

# USR1 is the time-limit warning: requeue so the next allocation resumes. TERM comes from scancel or
# from preemption, which requeues by itself (PreemptMode=REQUEUE) and must not be undone here.
if [ "$STOP_SIGNAL" = USR1 ] && [ "$STATUS" = 0 ]; then
    echo "[$(date '+%F %T')] checkpoint saved after the time-limit warning: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$STATUS"
