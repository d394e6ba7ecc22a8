"""deploy/bringup.sh against stand-ins for docker and docker-compose that record how they were
called: it raises compose's HTTP timeout unless the user set one, hands compose the token file
through PS_AUTH_TOKEN_FILE, ends with a failed worker's own exit code, and always tears down."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Each call appends one line: the program, COMPOSE_HTTP_TIMEOUT, whether PS_AUTH_TOKEN_FILE names a
# readable file, and the arguments. Workers "exit" with FAKE_EXIT and report FAKE_ACCURACY.
FAKE_DOCKER = r"""#!/usr/bin/env bash
token=no; [[ -r "${PS_AUTH_TOKEN_FILE:-}" ]] && token=yes
echo "$(basename "$0") timeout=${COMPOSE_HTTP_TIMEOUT:-unset} token=$token $*" >> "$FAKE_LOG"
case "$(basename "$0") $*" in
  *" ps -q "*) echo "cid-${@: -1}" ;;
  *"inspect -f {{.State.Status}}"*) echo exited ;;
  *"inspect -f {{.State.ExitCode}}"*) echo "${FAKE_EXIT:-0}" ;;
  *" logs --no-color cpu-worker-0 cpu-worker-1")
    for w in 0 1; do echo "cpu-worker-${w}_1 | worker $w done: steps 100 test_accuracy ${FAKE_ACCURACY:-0.97}"; done ;;
esac
exit 0
"""


def bringup(tmp_path, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("docker", "docker-compose"):
        (bin_dir / name).write_text(FAKE_DOCKER)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    base = {k: v for k, v in os.environ.items() if k not in ("COMPOSE_HTTP_TIMEOUT", "PS_AUTH_TOKEN_FILE")}
    out = subprocess.run([os.path.join(ROOT, "deploy", "bringup.sh"), "--project", "psfake", "--timeout", "60"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**base, "PATH": f"{bin_dir}:{base['PATH']}", "FAKE_LOG": str(log),
                              "TMPDIR": str(tmp_path), **env})
    calls = log.read_text().splitlines() if log.exists() else []
    return out, calls


def _call(calls, words):
    found = [c for c in calls if words in c]
    assert found, f"no call with {words!r} among {calls}"
    return found[0]


pytestmark = pytest.mark.skipif(shutil.which("python3") is None, reason="bringup.sh runs python3")


def test_bringup_gives_compose_a_300_s_http_timeout_and_the_token_file(tmp_path):
    out, calls = bringup(tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bring-up: final test accuracy 0.9700 >= 0.93" in out.stdout
    up = _call(calls, " up -d")
    assert up.startswith("docker-compose timeout=300 token=yes "), up
    assert "-f deploy/docker-compose.cpu.yml" in up


def test_bringup_keeps_a_compose_http_timeout_the_user_set(tmp_path):
    out, calls = bringup(tmp_path, COMPOSE_HTTP_TIMEOUT="1200")
    assert out.returncode == 0, out.stdout + out.stderr
    assert _call(calls, " up -d").startswith("docker-compose timeout=1200 ")


def test_bringup_ends_with_a_failed_workers_exit_code_and_tears_the_cluster_down(tmp_path):
    out, calls = bringup(tmp_path, FAKE_EXIT="3")
    assert out.returncode == 3, out.stdout + out.stderr
    assert "bringup.sh: cpu-worker-0 exited with code 3" in out.stderr
    assert calls[-1].startswith("docker-compose ") and calls[-1].endswith(" down -v --remove-orphans"), calls[-1]


def test_bringup_fails_when_the_workers_end_below_the_target(tmp_path):
    out, calls = bringup(tmp_path, FAKE_ACCURACY="0.5")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "below the target 0.93" in out.stderr
    assert calls[-1].endswith(" down -v --remove-orphans")
