"""Static checks of the deployment files: hadolint, the compose-spec schema, docker-compose's own
parser (when installed), kubernetes-validate --strict, and every PS_* variable they set being a
real flag of the command it configures."""

import glob
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from ps.cli import server, worker
from ps.cli.common import env_name

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
COMPOSE = [os.path.join(ROOT, "deploy", f) for f in ("docker-compose.yml", "docker-compose.cpu.yml")]
K8S = sorted(glob.glob(os.path.join(ROOT, "deploy", "k8s", "*.yaml")))


def tool(name):
    path = os.path.join(BIN, name)
    return path if os.path.exists(path) else shutil.which(name)


def run(argv, **kw):
    out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120, **kw)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_the_dockerfile_passes_hadolint():
    run([tool("hadolint"), os.path.join(ROOT, "Dockerfile")])


def test_the_compose_files_match_the_compose_spec():
    run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *COMPOSE])


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_docker_compose_accepts_the_files_and_the_cpu_override(tmp_path):
    token = tmp_path / "auth_token"
    token.write_text("x\n")
    env = {**os.environ, "PS_AUTH_TOKEN_PATH": str(token)}
    run(["docker-compose", "-f", COMPOSE[0], "config", "-q"], env=env)
    services = run(["docker-compose", "-f", COMPOSE[0], "-f", COMPOSE[1], "config", "--services"], env=env).stdout
    assert set(services.split()) == {"server-0", "server-1", "worker-0", "worker-1", "cpu-worker-0", "cpu-worker-1"}


def test_the_kubernetes_manifests_validate_strictly():
    assert {os.path.basename(p) for p in K8S} == {"secret.yaml", "server.yaml", "worker.yaml"}
    run([tool("kubernetes-validate"), "--strict", *K8S])


def _flags(parser):
    return {env_name(a.option_strings[0]) for a in parser._actions if a.option_strings and a.option_strings[0] != "-h"}


SERVER_VARS = _flags(server.build_parser({}))
WORKER_VARS = _flags(worker.build_parser({}))
OTHER_VARS = {"OMP_NUM_THREADS"}


def _compose_env():
    for path in COMPOSE:
        with open(path) as f:
            doc = yaml.safe_load(f)
        for name, svc in doc["services"].items():
            if "environment" in svc:
                yield name, svc.get("command", ["ps-server"])[0], svc["environment"]


def _k8s_env():
    for path in K8S:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                spec = doc.get("spec", {}).get("template", {}).get("spec", {})
                for c in spec.get("containers", []):
                    yield doc["metadata"]["name"], c["command"][0], {e["name"]: e for e in c.get("env", [])}


def test_every_variable_the_deployments_set_is_a_flag_of_the_command():
    seen = 0
    for name, command, env in [*_compose_env(), *_k8s_env()]:
        known = {"ps-server": SERVER_VARS, "ps-worker": WORKER_VARS}[command] | OTHER_VARS
        assert set(env) <= known, f"{name}: {sorted(set(env) - known)} are not flags of {command}"
        seen += 1
    assert seen == 8  # 2 servers, 2 GPU and 2 CPU workers in compose; the server and worker in k8s
