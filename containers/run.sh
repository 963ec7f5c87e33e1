#!/usr/bin/env bash
# Run a command in the pipeline_runner image with this working tree mounted at /app.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
# shellcheck source=containers/common.sh
source "$here/common.sh"

usage() {
  cat <<'EOF'
Usage: containers/run.sh [OPTIONS] -- COMMAND [ARG...]

Runs COMMAND in the pipeline_runner image (build it with containers/build.sh), in /app, with this
working tree mounted over /app (the image's install is editable, so the code you edit is the code
that runs). Examples:
  containers/run.sh -- runner deploy deployments/hello_world.yaml
  containers/run.sh -- bash -c 'runner deploy deployments/hello_world.yaml & runner client --requests 100 --wait 300'
  containers/run.sh --name hello -- runner deploy deployments/hello_world.yaml
      then, in another terminal:  podman exec -it hello runner client --requests 100

The container:
  - shares the host's network (servers bind 127.0.0.1 unless the deployment file says otherwise),
    so a client on the host or in another container reaches its NATS server with
    runner client --nats nats://127.0.0.1:PORT --deployment NAME   (deploy prints the URL);
  - is removed when COMMAND ends; runs with tini as PID 1 (signals reach COMMAND, orphans are reaped);
  - gets -it only when stdin is a terminal, so it also runs from scripts and CI;
  - gets the GPUs when the host has an NVIDIA driver: podman through CDI (--device
    nvidia.com/gpu=all; needs `nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`), docker
    with --gpus all (needs the NVIDIA container toolkit);
  - gets the host's PIPELINE_RUNNER_NATS_* variables (credentials), by name, never on a command line.
State files and logs live in the container and go with it; keep logs with
`runner deploy FILE --log-dir runner_logs` (in the mounted tree, ignored by git).

Options:
  --image NAME       the image (default: $PIPELINE_RUNNER_IMAGE, else pipeline-runner:gpu when
                     GPUs are passed and that image exists, else pipeline-runner:cpu)
  --engine NAME      podman or docker (default: $PIPELINE_RUNNER_ENGINE, else podman if
                     installed, else docker)
  --gpu auto|on|off  pass the host's GPUs: auto (default) when an NVIDIA driver is found
  --name NAME        the container's name (for `podman exec NAME ...`)
  -e, --env VAR[=VALUE]
                     set a variable in the container (VAR alone: the host's value); repeatable
  -h, --help         this help

Podman runs containers with runc when it is installed (crun fails on some hosts; set
$PIPELINE_RUNNER_OCI_RUNTIME to choose), with the host's hard limits on open files and processes
as ulimits (podman's defaults can exceed what the engine may grant).
EOF
}

image=${PIPELINE_RUNNER_IMAGE:-}
engine_name=
gpu=auto
name=
envs=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --image) [[ $# -ge 2 ]] || usage_error "--image needs a name"; image=$2; shift 2 ;;
    --image=*) image=${1#*=}; shift ;;
    --engine) [[ $# -ge 2 ]] || usage_error "--engine needs a name"; engine_name=$2; shift 2 ;;
    --engine=*) engine_name=${1#*=}; shift ;;
    --gpu) [[ $# -ge 2 ]] || usage_error "--gpu needs auto, on or off"; gpu=$2; shift 2 ;;
    --gpu=*) gpu=${1#*=}; shift ;;
    --name) [[ $# -ge 2 ]] || usage_error "--name needs a name"; name=$2; shift 2 ;;
    --name=*) name=${1#*=}; shift ;;
    -e | --env) [[ $# -ge 2 ]] || usage_error "$1 needs VAR or VAR=VALUE"; envs+=(-e "$2"); shift 2 ;;
    --env=*) envs+=(-e "${1#*=}"); shift ;;
    --) shift; break ;;
    -*) usage_error "unknown option '$1'" ;;
    *) break ;; # the command starts here
  esac
done
(($#)) || usage_error "no command given: containers/run.sh [OPTIONS] -- COMMAND [ARG...]"
case $gpu in
  auto | on | off) ;;
  *) usage_error "--gpu must be auto, on or off, got '$gpu'" ;;
esac

pick_engine "$engine_name"

# --- GPUs ------------------------------------------------------------------------------------
has_nvidia_driver() {
  [[ -e /dev/nvidiactl ]] || nvidia-smi -L >/dev/null 2>&1
}
has_nvidia_cdi_spec() {
  local spec
  for spec in /etc/cdi/*.yaml /etc/cdi/*.json /var/run/cdi/*.yaml /var/run/cdi/*.json; do
    [[ -f $spec ]] && grep -q 'nvidia.com/gpu' "$spec" && return 0
  done
  return 1
}
gpu_args=()
if [[ $gpu == on ]] || { [[ $gpu == auto ]] && has_nvidia_driver; }; then
  if [[ $ENGINE == podman ]]; then
    if has_nvidia_cdi_spec; then
      gpu_args=(--device nvidia.com/gpu=all)
    elif [[ $gpu == on ]]; then
      die "podman needs a CDI spec for the GPUs: install the NVIDIA container toolkit and run 'nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml'"
    else
      echo "${0##*/}: an NVIDIA driver is present but podman has no CDI spec for it, so the container gets no GPU ('nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml' fixes that)" >&2
    fi
  else
    gpu_args=(--gpus all)
  fi
fi

if [[ -z $image ]]; then
  image=pipeline-runner:cpu
  if ((${#gpu_args[@]})) && "$ENGINE" image inspect pipeline-runner:gpu >/dev/null 2>&1; then
    image=pipeline-runner:gpu
  fi
fi
"$ENGINE" image inspect "$image" >/dev/null 2>&1 ||
  die "no image $image: build it with containers/build.sh --tag $image (or name another with --image)"

# --- the container ---------------------------------------------------------------------------
args=(run --rm --network host --shm-size 1g -w /app --entrypoint /usr/bin/tini)
mount="$repo:/app"
if command -v selinuxenabled >/dev/null 2>&1 && selinuxenabled; then
  mount+=":z" # let the container read the tree on SELinux hosts
fi
args+=(-v "$mount")
if [[ -t 0 ]]; then
  args+=(-it)
fi
[[ -z $name ]] || args+=(--name "$name")
if [[ $ENGINE == podman ]]; then
  # Ask for no more than the runtime may grant: without CAP_SYS_RESOURCE it cannot raise a hard
  # limit, and podman's defaults (1048576 each) are often above it. Open files: this shell's hard
  # limit. Processes: podman 4 starts conmon, the runtime's parent, with at most 32768.
  nofile=$(ulimit -Hn)
  nproc=$(ulimit -Hu)
  [[ $nofile != unlimited ]] || nofile=1048576
  [[ $nproc != unlimited && $nproc -le 32768 ]] || nproc=32768
  args+=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
elif [[ $(id -u) != 0 ]]; then
  # Rootful docker: run as the caller, so files written into the mounted tree are theirs.
  args+=(--user "$(id -u):$(id -g)" -e HOME=/tmp)
fi
for var in $(compgen -e); do
  [[ $var == PIPELINE_RUNNER_NATS_* ]] && args+=(-e "$var")
done
args+=(${gpu_args[@]+"${gpu_args[@]}"} ${envs[@]+"${envs[@]}"})

exec "$ENGINE" ${ENGINE_ARGS[@]+"${ENGINE_ARGS[@]}"} "${args[@]}" "$image" -- "$@"
