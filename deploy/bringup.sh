#!/usr/bin/env bash
# A real bring-up of the compose cluster: build the image, start 2 servers and 2 workers (CPU
# override unless --gpu), wait for the workers to finish, check the final test accuracy they
# report, and tear everything down (containers, network, volume) whatever happened. It ends when
# the workers end: with status 0 when both finished and reached the target, with a worker's own
# exit code when one failed, 1 otherwise.
#   deploy/bringup.sh [--base-image IMG] [--gpu] [--target 0.93] [--epochs 20] [--timeout 900]
#                     [--project NAME] [--image TAG]
# --base-image: the Dockerfile's BASE_IMAGE (default: the Dockerfile's own default); where no
#   image can be pulled, build one first with deploy/base-image.sh and pass ps-base:local.
# COMPOSE_HTTP_TIMEOUT (seconds compose waits for the engine) is raised to 300 unless set: on a
# slow storage driver (vfs) creating a container can take longer than compose's default 60 s.
set -euo pipefail
cd "$(dirname "$0")/.."

base_image=""
gpu=0
target=0.93
epochs=20
timeout=900
image=ps:bringup
project=psbringup$$
while [[ $# -gt 0 ]]; do
  case "$1" in
    --base-image) base_image=$2; shift 2 ;;
    --gpu) gpu=1; shift ;;
    --target) target=$2; shift 2 ;;
    --epochs) epochs=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --image) image=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    *) echo "bringup.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

export COMPOSE_HTTP_TIMEOUT=${COMPOSE_HTTP_TIMEOUT:-300}
start=$(date +%s)
build_args=()
[[ -n "$base_image" ]] && build_args=(--build-arg "BASE_IMAGE=$base_image")
docker build --network host "${build_args[@]}" -t "$image" .
built=$(date +%s)

secrets=$(mktemp -d)
python3 -c 'import secrets; print(secrets.token_hex(32))' > "$secrets/auth_token"
# Compose (without swarm) bind-mounts file secrets as they are: the container user (uid 10001)
# must be able to read it.
chmod 755 "$secrets"
chmod 644 "$secrets/auth_token"
export PS_IMAGE=$image PS_AUTH_TOKEN_FILE=$secrets/auth_token PS_EPOCHS=$epochs
files=(-f deploy/docker-compose.yml)
workers=(worker-0 worker-1)
if [[ $gpu == 0 ]]; then
  files+=(-f deploy/docker-compose.cpu.yml)
  workers=(cpu-worker-0 cpu-worker-1)
fi
compose=(docker-compose -p "$project" "${files[@]}")
log=${TMPDIR:-/tmp}/$project.log
cleanup() {
  "${compose[@]}" logs --no-color > "$log" 2>&1 || true
  "${compose[@]}" down -v --remove-orphans > /dev/null 2>&1 || true
  rm -rf "$secrets"
  echo "bring-up: the cluster's logs are in $log"
}
trap cleanup EXIT

"${compose[@]}" up -d
deadline=$(( $(date +%s) + timeout ))
for w in "${workers[@]}"; do
  cid=$("${compose[@]}" ps -q "$w")
  if [[ -z "$cid" ]]; then
    echo "bringup.sh: no container for $w" >&2
    exit 1
  fi
  while [[ "$(docker inspect -f '{{.State.Status}}' "$cid")" != exited ]]; do
    if (( $(date +%s) > deadline )); then
      echo "bringup.sh: $w still running after ${timeout}s" >&2
      "${compose[@]}" logs --no-color --tail 30 >&2
      exit 1
    fi
    sleep 2
  done
  code=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
  if [[ $code != 0 ]]; then
    echo "bringup.sh: $w exited with code $code" >&2
    "${compose[@]}" logs --no-color --tail 50 >&2
    exit "$code"
  fi
done

"${compose[@]}" logs --no-color "${workers[@]}" > "$secrets/workers.log"
grep ' done: ' "$secrets/workers.log" || true
python3 - "$target" "$secrets/workers.log" <<'PY'
import re, sys
target, logs = float(sys.argv[1]), open(sys.argv[2], encoding="utf-8").read()
accuracies = [float(a) for a in re.findall(r" done: .*test_accuracy ([0-9.]+)", logs)]
if len(accuracies) < 2:
    sys.exit(f"bringup.sh: expected a final accuracy from each worker, found {accuracies}")
if min(accuracies) < target:
    sys.exit(f"bringup.sh: final test accuracy {min(accuracies):.4f} is below the target {target}")
print(f"bring-up: final test accuracy {min(accuracies):.4f} >= {target}")
PY
end=$(date +%s)
echo "bring-up: image built in $((built - start))s, cluster trained and checked in $((end - built))s, total $((end - start))s"
