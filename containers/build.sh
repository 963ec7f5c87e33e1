#!/usr/bin/env bash
# Build the pipeline_runner image with podman or docker; prints the image name on stdout.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
# shellcheck source=containers/common.sh
source "$here/common.sh"

usage() {
  cat <<'EOF'
Usage: containers/build.sh [OPTIONS] [-- ENGINE-BUILD-ARGS...]

Builds the pipeline_runner image from containers/Dockerfile (context: the repository root) with
podman, or docker where podman is missing, and prints the image name on stdout (the engine's
output goes to stderr), so that  image=$(containers/build.sh)  works.

Options:
  --variant cpu|gpu   cpu (default), or gpu: adds CuPy (the `gpu` extra) and the CUDA runtime
                      libraries; run it on a host with an NVIDIA driver (containers/run.sh).
  --base IMAGE        the base image: a Debian bookworm image (default
                      docker.io/library/debian:bookworm). Where no registry is reachable, make
                      a local one with debootstrap (README.md, "Containers"), e.g.
                        debootstrap --variant=minbase --include=python3,python3-venv,libpython3.11,ca-certificates,tini bookworm /tmp/rootfs
                        tar -C /tmp/rootfs -c . | podman import - localhost/debian-base:bookworm
                        containers/build.sh --base localhost/debian-base:bookworm
  --tag NAME          the image name (default pipeline-runner:VARIANT)
  --engine NAME       podman or docker (default: $PIPELINE_RUNNER_ENGINE, else podman if
                      installed, else docker)
  --ca-bundle FILE    CA certificates (PEM) that pip trusts during the build, passed as a build
                      secret (not stored in the image). Default: $PIP_CERT, $REQUESTS_CA_BUNDLE
                      or $SSL_CERT_FILE if set, else the host's /etc/ssl/certs/ca-certificates.crt
                      if present, so a build behind a TLS-inspecting proxy trusts what the host
                      trusts. 'none' passes nothing.
  -h, --help          this help

Podman runs the build's steps with runc when it is installed (crun fails on some hosts; set
$PIPELINE_RUNNER_OCI_RUNTIME to choose). Docker needs BuildKit (the default since Docker 23).
EOF
}

variant=cpu
base=
tag=
engine_name=
ca_bundle=
extra=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --variant) [[ $# -ge 2 ]] || usage_error "--variant needs a value"; variant=$2; shift 2 ;;
    --variant=*) variant=${1#*=}; shift ;;
    --base) [[ $# -ge 2 ]] || usage_error "--base needs an image"; base=$2; shift 2 ;;
    --base=*) base=${1#*=}; shift ;;
    --tag) [[ $# -ge 2 ]] || usage_error "--tag needs a name"; tag=$2; shift 2 ;;
    --tag=*) tag=${1#*=}; shift ;;
    --engine) [[ $# -ge 2 ]] || usage_error "--engine needs a name"; engine_name=$2; shift 2 ;;
    --engine=*) engine_name=${1#*=}; shift ;;
    --ca-bundle) [[ $# -ge 2 ]] || usage_error "--ca-bundle needs a file"; ca_bundle=$2; shift 2 ;;
    --ca-bundle=*) ca_bundle=${1#*=}; shift ;;
    --) shift; extra=("$@"); break ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
done
case $variant in
  cpu | gpu) ;;
  *) usage_error "--variant must be cpu or gpu, got '$variant'" ;;
esac
tag=${tag:-pipeline-runner:$variant}

if [[ -z $ca_bundle ]]; then
  for candidate in "${PIP_CERT:-}" "${REQUESTS_CA_BUNDLE:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
    if [[ -n $candidate && -s $candidate ]]; then
      ca_bundle=$candidate
      break
    fi
  done
elif [[ $ca_bundle == none ]]; then
  ca_bundle=
elif [[ ! -s $ca_bundle ]]; then
  die "--ca-bundle $ca_bundle: no such file (or it is empty)"
fi

pick_engine "$engine_name"

args=(build -f "$here/Dockerfile" -t "$tag" --build-arg "VARIANT=$variant")
if [[ -n $base ]]; then
  args+=(--build-arg "BASE=$base")
fi
if [[ -n $ca_bundle ]]; then
  args+=(--secret "id=ca_bundle,src=$ca_bundle")
fi
if [[ $ENGINE == podman ]]; then
  if [[ $base == localhost/* ]] && ! podman image exists "$base"; then
    die "no local image $base (podman images lists them): make it with debootstrap and podman import (see --help)"
  fi
  # RUN steps on the host's network: no container network (netavark, iptables) needed to reach PyPI.
  args+=(--network host)
  [[ ${#ENGINE_ARGS[@]} -eq 0 ]] || args+=("${ENGINE_ARGS[@]}")
else
  export DOCKER_BUILDKIT=1
fi

printf '%s: building %s (%s variant) with %s%s\n' "${0##*/}" "$tag" "$variant" "$ENGINE" \
  "${base:+ from $base}" >&2
started=$SECONDS
"$ENGINE" "${args[@]}" ${extra[@]+"${extra[@]}"} "$repo" >&2 || die "$ENGINE build failed (see its output above)"
printf '%s: built %s in %d s\n' "${0##*/}" "$tag" $((SECONDS - started)) >&2
echo "$tag"
