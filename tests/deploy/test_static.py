"""Static checks of the deployment files: hadolint, the compose-spec schema, docker-compose's own
parser (when installed), kubernetes-validate --strict, every PS_* variable they set being a real
flag of the command it configures, one torch pin, one way to give the token, a GPU per worker, and
the README's deploy section naming what a user needs where no image can be pulled."""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from packaging.requirements import Requirement

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
    env = {**os.environ, "PS_AUTH_TOKEN_FILE": str(token)}
    run(["docker-compose", "-f", COMPOSE[0], "config", "-q"], env=env)
    services = run(["docker-compose", "-f", COMPOSE[0], "-f", COMPOSE[1], "config", "--services"], env=env).stdout
    assert set(services.split()) == {"server-0", "server-1", "worker-0", "worker-1", "cpu-worker-0", "cpu-worker-1"}
    resolved = yaml.safe_load(run(["docker-compose", "-f", COMPOSE[0], "-f", COMPOSE[1], "config"], env=env).stdout)
    assert resolved["secrets"]["ps_auth_token"]["file"] == str(token)


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


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def _one(pattern, text, what):
    found = re.findall(pattern, text, re.M)
    assert len(found) == 1, f"expected one {what}, found {found}"
    return found[0]


def test_the_image_and_the_local_base_pin_the_same_tested_torch():
    dockerfile = _read("Dockerfile")
    pinned = _one(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, "ARG TORCH_VERSION in the Dockerfile")
    assert pinned == "2.13.0"
    assert 'pip install --no-cache-dir "torch==${TORCH_VERSION}"' in dockerfile
    base = _one(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, "ARG BASE_IMAGE in the Dockerfile")
    assert "pytorch" not in base, f"the default base {base} brings a torch of its own"
    assert _one(r"^torch_version=(\S+)", _read("deploy", "base-image.sh"), "torch_version in base-image.sh") == pinned
    torch_req = next(r for r in map(Requirement, _pyproject_dependencies()) if r.name == "torch")
    assert torch_req.specifier.contains(pinned), f"pyproject's {torch_req} excludes the pinned torch {pinned}"


def _pyproject_dependencies():
    text = _read("pyproject.toml")
    block = text[text.index("dependencies = ["):]
    return re.findall(r'^\s+"([^"]+)",$', block[:block.index("]")], re.M)


def test_bringup_raises_the_compose_http_timeout_unless_the_user_set_it():
    script = _read("deploy", "bringup.sh")
    line = _one(r"^export COMPOSE_HTTP_TIMEOUT=\$\{COMPOSE_HTTP_TIMEOUT:-(\d+)\}$", script, "COMPOSE_HTTP_TIMEOUT export")
    assert int(line) >= 300
    assert script.index("export COMPOSE_HTTP_TIMEOUT") < script.index('"${compose[@]}" up')


def _compose_docs():
    docs = {}
    for path in COMPOSE:
        with open(path) as f:
            docs[os.path.basename(path)] = yaml.safe_load(f)
    return docs


def test_the_token_is_one_mounted_file_whose_host_path_the_user_names_with_ps_auth_token_file():
    docs = _compose_docs()
    assert docs["docker-compose.yml"]["secrets"] == {"ps_auth_token": {"file": "${PS_AUTH_TOKEN_FILE:-./secrets/auth_token}"}}
    for name, _, env in _compose_env():
        assert env.get("PS_AUTH_TOKEN_FILE") == "/run/secrets/ps_auth_token", name
        assert "PS_AUTH_TOKEN" not in env, name
    for name, svc in {**docs["docker-compose.yml"]["services"], **docs["docker-compose.cpu.yml"]["services"]}.items():
        if "environment" in svc:
            assert svc["secrets"] == ["ps_auth_token"], name
    for name, _, env in _k8s_env():
        assert env["PS_AUTH_TOKEN_FILE"]["value"] == "/var/run/ps/token", name
        assert "PS_AUTH_TOKEN" not in env, name


def test_each_gpu_worker_reserves_a_gpu_of_its_own():
    services = _compose_docs()["docker-compose.yml"]["services"]
    ids = []
    for name in ("worker-0", "worker-1"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in device, f"{name}: count hands every worker GPU 0"
        assert device["capabilities"] == ["gpu"]
        ids += device["device_ids"]
    assert ids == ["0", "1"]
    (worker,) = (c for path in K8S for doc in yaml.safe_load_all(open(path)) if doc["kind"] == "Job"
                 for c in doc["spec"]["template"]["spec"]["containers"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1


def _readme_deploy_section():
    text = _read("README.md")
    start = text.index("## Deploy: Docker, docker-compose, Kubernetes")
    return text[start:text.index("\n## ", start + 1)]


def test_the_readme_deploy_section_says_how_to_build_without_a_registry_and_run_the_job_to_its_end():
    section = _readme_deploy_section()
    for needed in ("deploy/base-image.sh --wheels DIR",
                   "docker build --network host --build-arg BASE_IMAGE=ps-base:local -t ps:local .",
                   "export COMPOSE_HTTP_TIMEOUT=", "up -d", "docker wait", "start server-0", "--retry-timeout",
                   "PS_AUTH_TOKEN_FILE=/path/to/token docker-compose", "TORCH_VERSION"):
        assert needed in section, f"the README's deploy section lacks {needed!r}"
    assert "2.5.1" not in section


def test_the_readme_calls_the_deploy_scripts_only_with_options_they_take():
    options = {}
    for script in ("base-image.sh", "bringup.sh"):
        options[script] = set(re.findall(r"^\s+(--[a-z-]+)\)", _read("deploy", script), re.M))
        assert options[script], script
    checked = set()
    for script, args in re.findall(r"deploy/(base-image\.sh|bringup\.sh)((?: --?[a-z-]+(?: [^ `\n#-][^ `\n]*)?)*)",
                                   _readme_deploy_section()):
        used = set(re.findall(r"(--[a-z-]+)", args))
        assert used <= options[script], f"README passes {sorted(used - options[script])} to {script}"
        checked |= used
    assert "--wheels" in checked
