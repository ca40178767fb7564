#!/bin/bash
# Entry point of every training pod of k8s_pytorchjob.yaml and k8s_indexed_job.yaml (not a template:
# the manifests run it from the image's checkout and configure it through the environment).
#
# Environment:
#   NNODES, GPUS_PER_NODE        pods in the job, training processes (GPUs) per pod
#   MASTER_ADDR, MASTER_PORT     rendezvous on pod 0 (the PyTorchJob operator sets both)
#   node rank                    JOB_COMPLETION_INDEX (indexed Job), else PET_NODE_RANK or RANK (PyTorchJob)
#   RTPURBO_RECIPE, RTPURBO_OUTPUT_DIR, RTPURBO_EXTRA_ARGS (optional, word-split)
#   RTPURBO_DNS_WAIT_S           seconds to wait for MASTER_ADDR to resolve (default 600)
#   RTPURBO_DONE_FILE            optional: a file the trainer creates when the whole run is finished
#                                (relative to the output dir); a clean exit without it exits 143
#
# Stopping: Kubernetes sends SIGTERM to this script (PID 1) when a pod is evicted or the job deleted.
# The trap forwards SIGUSR1 to the torchrun workers; the trainer saves a checkpoint at the next step
# and exits 0. The script then exits 143 (= 128 + SIGTERM), which the manifests' restart policies
# treat as a failure to retry, never as a finished run; the restarted pod resumes from the checkpoint.
# Set terminationGracePeriodSeconds above one step plus one checkpoint save.
# When one pod is evicted, the trainers of the other pods stop at the same step and exit 0 too; only
# RTPURBO_DONE_FILE lets their entry points tell that apart from a finished run.
set -uo pipefail

: "${NNODES:?NNODES is not set}" "${GPUS_PER_NODE:?GPUS_PER_NODE is not set}"
: "${MASTER_ADDR:?MASTER_ADDR is not set}" "${MASTER_PORT:=29500}"
: "${RTPURBO_RECIPE:?RTPURBO_RECIPE is not set}" "${RTPURBO_OUTPUT_DIR:?RTPURBO_OUTPUT_DIR is not set}"
NODE_RANK="${JOB_COMPLETION_INDEX:-${PET_NODE_RANK:-${RANK:-}}}"
if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
    echo "k8s_entrypoint: no valid node rank (JOB_COMPLETION_INDEX/PET_NODE_RANK/RANK='$NODE_RANK', NNODES=$NNODES)" >&2
    exit 2
fi
# torchrun sets RANK/WORLD_SIZE per worker; the operator's per-pod values would only confuse readers
unset RANK WORLD_SIZE

# pod 0's DNS name appears only once that pod is scheduled: wait instead of failing the rendezvous
deadline=$((SECONDS + ${RTPURBO_DNS_WAIT_S:-600}))
until getent hosts "$MASTER_ADDR" > /dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "k8s_entrypoint: $MASTER_ADDR did not resolve" >&2
        exit 3
    fi
    sleep 2
done
mkdir -p "$RTPURBO_OUTPUT_DIR"
echo "[$(date '+%F %T')] node $NODE_RANK/$NNODES x $GPUS_PER_NODE GPUs, master $MASTER_ADDR:$MASTER_PORT"

STOP_SIGNAL=""
forward_stop() {
    STOP_SIGNAL=$1
    echo "[$(date '+%F %T')] SIG$1 received: asking the trainers to checkpoint and exit"
    # only torchrun's children (the trainers) get SIGUSR1; torchrun itself would die of it
    pkill -USR1 -P "$LAUNCHER_PID"
}
trap 'forward_stop TERM' TERM
trap 'forward_stop USR1' USR1

# shellcheck disable=SC2086  # RTPURBO_EXTRA_ARGS is meant to be word-split
torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$NODE_RANK" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    launch/train.py --recipe "$RTPURBO_RECIPE" --output-dir "$RTPURBO_OUTPUT_DIR" ${RTPURBO_EXTRA_ARGS:-} &
LAUNCHER_PID=$!
# a trapped signal makes `wait` return early while torchrun still runs: wait again
while kill -0 "$LAUNCHER_PID" 2>/dev/null; do
    wait "$LAUNCHER_PID"
done
wait "$LAUNCHER_PID"  # bash remembers the exit status of a reaped background job
STATUS=$?
echo "[$(date '+%F %T')] torchrun exited with status $STATUS"
if [ -n "$STOP_SIGNAL" ] && [ "$STATUS" = 0 ]; then
    echo "[$(date '+%F %T')] checkpoint saved after SIG$STOP_SIGNAL; exiting 143 so the pod is retried"
    exit 143
fi
if [ "$STATUS" = 0 ] && [ -n "${RTPURBO_DONE_FILE:-}" ] && [ ! -e "$RTPURBO_OUTPUT_DIR/$RTPURBO_DONE_FILE" ]; then
    echo "[$(date '+%F %T')] trainers stopped before the run finished (no $RTPURBO_DONE_FILE); exiting 143 so the pod is retried"
    exit 143
fi
exit "$STATUS"
