"""The real bring-up: deploy/bringup.sh builds the image, runs the compose cluster (CPU override)
until the workers finish, checks their final test accuracy and tears it down. It runs when a
Docker engine answers and a base image is at hand locally (PS_BASE_IMAGE, or ps-base:local built by
deploy/base-image.sh, or the Dockerfile's default already pulled); otherwise it is skipped."""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8") as f:
    DEFAULT_BASE = re.search(r"^ARG BASE_IMAGE=(\S+)$", f.read(), re.M).group(1)


def _ok(argv):
    try:
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _base_image():
    if not (shutil.which("docker") and shutil.which("docker-compose") and _ok(["docker", "info"])):
        return None
    for image in (os.environ.get("PS_BASE_IMAGE", ""), "ps-base:local", DEFAULT_BASE):
        if image and _ok(["docker", "image", "inspect", image]):
            return image
    return None


BASE = _base_image()


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(BASE is None, reason="needs a Docker engine, docker-compose and a local base image "
                                         "(deploy/base-image.sh)")
def test_a_compose_cluster_trains_to_the_target_and_is_torn_down():
    project = f"pstest{os.getpid()}"
    out = subprocess.run([os.path.join(ROOT, "deploy", "bringup.sh"), "--base-image", BASE, "--target", "0.93",
                          "--project", project], capture_output=True, text=True, cwd=ROOT, timeout=3500)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert re.search(r"bring-up: final test accuracy 0\.9\d+ >= 0.93", out.stdout), out.stdout[-2000:]
    label = f"label=com.docker.compose.project={project}"
    for kind in ("container", "volume", "network"):
        left = subprocess.run(["docker", kind, "ls", "-q", *(["-a"] if kind == "container" else []), "--filter", label],
                              capture_output=True, text=True).stdout.split()
        assert left == [], f"{kind}s left behind: {left}"
