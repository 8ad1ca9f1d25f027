#!/usr/bin/env bash
# Set up and run jaxspeech on every worker of a Cloud TPU VM (one host or a multi-host slice).
#
#   scripts/tpu_launch.sh setup  TPU ZONE [GIT_URL]    # this checkout's HEAD (or GIT_URL) on
#                                # every worker, a venv with jax[tpu] and jaxspeech
#   scripts/tpu_launch.sh run    TPU ZONE -- COMMAND   # COMMAND on all workers, in the repo, venv on
#   scripts/tpu_launch.sh train  TPU ZONE CONFIG WORKDIR [--config.x=y ...]
#                                # train.py --distributed on all workers (resumes from WORKDIR)
#   scripts/tpu_launch.sh logs   TPU ZONE              # tail the training log of worker 0
#
# Environment: PROJECT (gcloud --project), REPO_DIR (default jaxspeech, under the workers' home),
# DRY_RUN=1 prints the gcloud commands instead of running them. The workdir should be a gs://
# path (or a disk every worker mounts) so that checkpoints survive the VM. See TPU_SETUP.md.
set -euo pipefail

usage() { sed -n '2,13p' "$0" >&2; exit 2; }
[ $# -ge 3 ] || usage
action=$1 tpu=$2 zone=$3
shift 3
repo_dir=${REPO_DIR:-jaxspeech}

quote() { printf '%q ' "$@"; }

on_all_workers() {  # on_all_workers 'remote shell command'
  local cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$1")
  [ -n "${PROJECT:-}" ] && cmd+=(--project "$PROJECT")
  if [ -n "${DRY_RUN:-}" ]; then
    quote "${cmd[@]}"
    echo
  else
    "${cmd[@]}"
  fi
}

in_repo="cd ~/$repo_dir && source .venv/bin/activate"

case "$action" in
  setup)
    if [ $# -ge 1 ]; then  # from a git remote
      fetch="if [ -d ~/$repo_dir/.git ]; then git -C ~/$repo_dir pull --ff-only;
        else git clone $(quote "$1") ~/$repo_dir; fi"
    else  # this checkout's HEAD, copied to every worker
      archive=$(mktemp -d)/jaxspeech.tar.gz
      git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
      scp=(gcloud compute tpus tpu-vm scp "$archive" "$tpu:" --zone "$zone" --worker=all)
      [ -n "${PROJECT:-}" ] && scp+=(--project "$PROJECT")
      if [ -n "${DRY_RUN:-}" ]; then quote "${scp[@]}"; echo; else "${scp[@]}"; fi
      fetch="mkdir -p ~/$repo_dir && tar -xzf ~/jaxspeech.tar.gz -C ~/$repo_dir"
    fi
    on_all_workers "set -e; $fetch; cd ~/$repo_dir;
      python3 -m venv .venv; source .venv/bin/activate; pip install -q -U pip;
      pip install -q 'jax[tpu]' -e . && python -c 'import jax; print(jax.device_count(), jax.devices()[0].device_kind)'"
    ;;
  run)
    [ "${1:-}" = "--" ] && shift
    [ $# -ge 1 ] || usage
    on_all_workers "$in_repo && $(quote "$@")"
    ;;
  train)
    [ $# -ge 2 ] || usage
    config=$1 workdir=$2
    shift 2
    train=(python scripts/train.py --distributed --config "$config" --workdir "$workdir" "$@")
    # In the background on every worker, so that the ssh session may end; rerunning the same
    # `train` (after a preemption, on a recreated VM) resumes from the workdir's latest checkpoint.
    on_all_workers "$in_repo && mkdir -p logs && nohup $(quote "${train[@]}") >>logs/train.log 2>&1 &"
    ;;
  logs)
    cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=0 --command "tail -f ~/$repo_dir/logs/train.log")
    [ -n "${PROJECT:-}" ] && cmd+=(--project "$PROJECT")
    if [ -n "${DRY_RUN:-}" ]; then quote "${cmd[@]}"; echo; else "${cmd[@]}"; fi
    ;;
  *) usage ;;
esac
