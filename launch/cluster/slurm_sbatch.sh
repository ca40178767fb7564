#!/bin/bash
# Multi-node RTPurbo training on Slurm through the DeepSpeed launcher (pdsh/ssh to the other nodes).
# Render:  python -m rtpurbo_train.cluster render slurm_sbatch --set partition=gpu --set recipe=rtpurbo_300step \
#              --set output_dir=runs/rtpurbo_300step -o job.sh
# Submit:  sbatch job.sh            (re-submitting the same file resumes from the latest checkpoint)
# Needs:   the repository and the Python environment at the same path on every node (shared file
#          system), pdsh on the first node and password-less ssh between the allocated nodes.
#
# @param partition     | word | required        | Slurm partition (--partition)
# @param recipe        | word | required        | recipe name in recipes/ or path to a recipe YAML
# @param output_dir    | word | required        | run directory (relative to repo_dir or absolute); keep it fixed so a requeued job resumes
# @param nodes         | int  | 2               | number of nodes (--nodes)
# @param gpus_per_node | int  | 8               | GPUs per node (--gpus-per-node, hostfile slots)
# @param cpus_per_node | int  | 64              | CPU cores per node (--cpus-per-task of the single task per node)
# @param time          | word | 24:00:00        | wall-clock limit (--time)
# @param job_name      | word | rtpurbo         | job name (--job-name; log files are JOB_NAME-JOBID.out)
# @param master_port   | int  | 29500           | TCP port of the rendezvous on the first node
# @param repo_dir      | text | $SLURM_SUBMIT_DIR | repository checkout to cd into (shell expression)
# @param env_setup     | text | ""              | one shell line that activates the environment, e.g. "source /shared/venv/bin/activate" or "module load cuda/12.4"
# @param extra_args    | args | ""              | more train.py arguments, e.g. "--set stages.0.steps=100" (word-split by the shell)
#
# Preemption: Slurm sends SIGUSR1 to this script 120 s before the time limit (--signal=B:USR1@120).
# The trap forwards it to every training process; the trainer saves a checkpoint at the next step and
# exits 0; then the script requeues the job (--requeue), which resumes from that checkpoint. SIGTERM
# (scancel, scheduler preemption) is forwarded the same way but not requeued here: preemption with
# PreemptMode=REQUEUE requeues by itself; give it a GraceTime >= one step + a checkpoint save.

#SBATCH --job-name={{job_name}}
#SBATCH --partition={{partition}}
##SBATCH --account=MY_ACCOUNT               # remove one '#' to charge an account
#SBATCH --nodes={{nodes}}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={{gpus_per_node}}
#SBATCH --cpus-per-task={{cpus_per_node}}
#SBATCH --time={{time}}
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# ---- settings ---------------------------------------------------------------------------------
RECIPE="{{recipe}}"
OUTPUT_DIR="{{output_dir}}"
GPUS_PER_NODE="{{gpus_per_node}}"
MASTER_PORT="{{master_port}}"
EXTRA_ARGS="{{extra_args}}"
cd "{{repo_dir}}" || exit 1
{{env_setup}}

# ---- NCCL (uncomment what your fabric needs; DeepSpeed exports NCCL_* to every node) ----------
# export NCCL_DEBUG=WARN                  # INFO to see the transport chosen per peer
# export NCCL_SOCKET_IFNAME=ib0           # interface for bootstrap/TCP traffic (not lo/docker0)
# export NCCL_IB_HCA=mlx5                 # InfiniBand adapters to use
# export NCCL_IB_DISABLE=1                # only on clusters without InfiniBand/RoCE
# export NCCL_NET_GDR_LEVEL=PHB           # GPUDirect RDMA distance
# export NCCL_ASYNC_ERROR_HANDLING=1      # fail fast instead of hanging when a rank dies
set -uo pipefail

# ---- hostfile from the allocation -------------------------------------------------------------
HOSTFILE="$OUTPUT_DIR/hostfile.$SLURM_JOB_ID"
mkdir -p "$OUTPUT_DIR"
scontrol show hostnames "$SLURM_JOB_NODELIST" \
    | python -m rtpurbo_train.cluster hostfile --slots "$GPUS_PER_NODE" > "$HOSTFILE" || exit 1
MASTER_ADDR=$(head -n 1 "$HOSTFILE" | cut -d ' ' -f 1)
echo "[$(date '+%F %T')] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $(wc -l < "$HOSTFILE") nodes x $GPUS_PER_NODE GPUs, master $MASTER_ADDR:$MASTER_PORT"

# ---- preemption: forward the stop signal to the trainers ---------------------------------------
STOP_SIGNAL=""
# Only the trainers match: DeepSpeed starts each as `PYTHON -u launch/train.py --local_rank=N ARGS`,
# and ARGS hold this run's output dir, which no other job shares. The pdsh, runner and per-node
# launcher processes carry the same arguments but start differently; they must not get SIGUSR1
# (its default action kills them).
OUTPUT_DIR_REGEX=$(printf '%s' "$OUTPUT_DIR" | sed 's/[][\.*^$+?(){}|]/\\&/g')
TRAINER_PATTERN="^[^ ]*python[^ ]* -u launch/train\.py --local_rank=[0-9]+ .*--output-dir $OUTPUT_DIR_REGEX( |\$)"
forward_stop() {
    STOP_SIGNAL=$1
    echo "[$(date '+%F %T')] SIG$1 received: asking the trainers to checkpoint and exit"
    srun --overlap --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
        pkill -USR1 -u "${USER:-$(id -un)}" -f "$TRAINER_PATTERN"
}
trap 'forward_stop USR1' USR1
trap 'forward_stop TERM' TERM

# ---- launch (this script runs on the first node; DeepSpeed reaches the others over ssh) ----------
# shellcheck disable=SC2086  # EXTRA_ARGS is meant to be word-split
deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    launch/train.py --recipe "$RECIPE" --output-dir "$OUTPUT_DIR" $EXTRA_ARGS &
LAUNCHER_PID=$!
# a trapped signal makes `wait` return early while the launcher still runs: wait again
while kill -0 "$LAUNCHER_PID" 2>/dev/null; do
    wait "$LAUNCHER_PID"
done
wait "$LAUNCHER_PID"  # bash remembers the exit status of a reaped background job
STATUS=$?
echo "[$(date '+%F %T')] launcher exited with status $STATUS"

# USR1 is the time-limit warning: requeue so the next allocation resumes. TERM comes from scancel or
# from preemption, which requeues by itself (PreemptMode=REQUEUE) and must not be undone here.
if [ "$STOP_SIGNAL" = USR1 ] && [ "$STATUS" = 0 ]; then
    echo "[$(date '+%F %T')] checkpoint saved after the time-limit warning: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$STATUS"
