# Shared by build.sh and run.sh (sourced, not run): picks the container engine and its flags.
# shellcheck shell=bash

die() {
  printf '%s: error: %s\n' "${0##*/}" "$*" >&2
  exit 1
}

usage_error() {
  printf '%s: %s (see --help)\n' "${0##*/}" "$*" >&2
  exit 2
}

# pick_engine [podman|docker]: sets ENGINE and ENGINE_ARGS (the engine's global flags).
# Without a name: $PIPELINE_RUNNER_ENGINE, else podman if installed, else docker if its daemon answers.
pick_engine() {
  local wanted=${1:-${PIPELINE_RUNNER_ENGINE:-}}
  case $wanted in
    podman | docker)
      command -v "$wanted" >/dev/null 2>&1 || die "$wanted is not installed: install podman (apt-get install podman runc) or docker"
      ;;
    '')
      if command -v podman >/dev/null 2>&1; then
        wanted=podman
      elif command -v docker >/dev/null 2>&1; then
        wanted=docker
      else
        die "no container engine found: install podman (apt-get install podman runc) or docker"
      fi
      ;;
    *) usage_error "unknown engine '$wanted': podman or docker" ;;
  esac
  if [[ $wanted == docker ]] && ! docker info >/dev/null 2>&1; then
    die "docker is installed but its daemon does not answer ('docker info' failed): start it, or install podman (apt-get install podman runc)"
  fi
  ENGINE=$wanted
  ENGINE_ARGS=()
  if [[ $ENGINE == podman ]]; then
    # crun, podman's usual runtime, cannot start containers where the engine lacks
    # CAP_SYS_RESOURCE or runs on hybrid cgroups; runc can. Use runc whenever it is installed.
    local runtime=${PIPELINE_RUNNER_OCI_RUNTIME:-}
    if [[ -z $runtime ]] && { command -v runc >/dev/null 2>&1 || [[ -x /usr/sbin/runc || -x /usr/bin/runc ]]; }; then
      runtime=runc
    fi
    if [[ -n $runtime ]]; then
      ENGINE_ARGS+=(--runtime "$runtime")
    fi
  fi
}

