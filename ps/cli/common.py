"""What every CLI shares: flags with PS_<FLAG> environment defaults, logging, error exits."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable, Mapping

import torch

from ps import compress, data, models
from ps.config import DEFAULT_PARTITION_BYTES, OPTIMIZERS, OptimizerConfig
from ps.errors import InvalidArgument, PSError
from ps.worker.transport import TRANSPORTS

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_name(flag: str) -> str:
    return "PS_" + flag.lstrip("-").upper().replace("-", "_")


def cluster_env(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ`, plus PS_* defaults read from a TF_CONFIG-style cluster spec in TF_CONFIG:
    {"cluster": {"ps": [host:port, ...], "chief": [...], "worker": [...]},
     "task": {"type": "ps" | "chief" | "worker", "index": i}}.
    Each chief or worker entry is one data-parallel worker (a tensor-parallel group of --tp ranks
    is one entry, and one worker at the servers): PS_NUM_WORKERS counts entries, for servers as
    for workers.
    PS_* variables set explicitly win over the spec; flags win over both."""
    raw = environ.get("TF_CONFIG", "")
    if not raw.strip():
        return dict(environ)
    try:
        spec = json.loads(raw)
        cluster, task = spec.get("cluster", {}), spec.get("task", {})
        servers, chief, workers = (list(cluster.get(k, [])) for k in ("ps", "chief", "worker"))
        kind, index = task.get("type", ""), int(task.get("index", 0))
    except (ValueError, AttributeError, TypeError) as e:
        raise InvalidArgument(f"TF_CONFIG must be JSON {{'cluster': {{'ps': [...], 'worker': [...]}}, "
                              f"'task': {{'type': ..., 'index': ...}}}}: {e}") from None
    if not servers or not all(isinstance(s, str) and ":" in s for s in servers):
        raise InvalidArgument(f"TF_CONFIG cluster.ps ({servers!r}) must list the servers as host:port")
    members = {"ps": servers, "chief": chief, "worker": workers}
    if kind not in members or not 0 <= index < len(members[kind]):
        raise InvalidArgument(f"TF_CONFIG task ({task!r}) must be a type among ps, chief, worker with an index "
                              "into its cluster list")
    out = {"PS_SERVERS": ",".join(servers), "PS_NUM_SHARDS": str(len(servers)),
           "PS_NUM_WORKERS": str(max(1, len(chief) + len(workers)))}
    if kind == "ps":
        out.update(PS_SHARD_ID=str(index), PS_PORT=servers[index].rpartition(":")[2])
    else:
        out["PS_RANK"] = str(index + (len(chief) if kind == "worker" else 0))
    return {**out, **environ}


def add_auth_flags(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    add_flag(parser, "--auth-token", env=env, default="",
             help="shared secret every RPC must carry (health checks excepted); prefer the env variable or a file")
    add_flag(parser, "--auth-token-file", env=env, default="", help="read the auth token from this file (a secret)")


def add_tls_flags(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None, server: bool = True) -> None:
    who = "this server" if server else "this worker"
    add_flag(parser, "--tls-cert", env=env, default="", help=f"PEM certificate of {who} (with --tls-key: TLS)")
    add_flag(parser, "--tls-key", env=env, default="", help=f"PEM private key of {who}")
    add_flag(parser, "--tls-ca", env=env, default="",
             help="PEM CA that signed the clients' certificates (mutual TLS)" if server
             else "PEM CA that signed the servers' certificates (turns TLS on)")


def _from_env(args: argparse.Namespace, dest: str) -> bool:
    """Whether the value of `dest` is its PS_* variable's rather than a command-line flag's."""
    name, value = getattr(args, ENV_SOURCES, {}).get(dest, ("", None))
    return bool(name) and getattr(args, dest) == value


def auth_token_from_args(args: argparse.Namespace) -> str:
    """The token from --auth-token or --auth-token-file. A flag beats the other one's PS_*
    variable (flags win over the environment); both given the same way is refused, naming them
    as they were given."""
    token, token_file = args.auth_token, args.auth_token_file
    if token and token_file:
        env_token, env_file = _from_env(args, "auth_token"), _from_env(args, "auth_token_file")
        if env_token and env_file:
            raise InvalidArgument("PS_AUTH_TOKEN and PS_AUTH_TOKEN_FILE are both set; set one (an empty "
                                  "PS_AUTH_TOKEN_FILE= unsets the file)")
        if env_token == env_file:
            raise InvalidArgument("give the auth token once: --auth-token or --auth-token-file, not both")
        if env_file:
            token_file = ""
        else:
            token = ""
    if not token_file:
        return token
    try:
        with open(token_file, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise InvalidArgument(f"auth token file ({token_file!r}) cannot be read: {e.strerror}") from None
    if not token:
        raise InvalidArgument(f"auth token file ({token_file!r}) is empty")
    return token


# The namespace attribute that records which defaults came from PS_* variables: {dest: (name, value)}.
ENV_SOURCES = "env_sources"


class _Repeat(argparse.Action):
    """A repeatable flag whose command-line values replace its PS_* variable's (comma-separated)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*([] if given is self.default else given), values])


def add_flag(parser: argparse.ArgumentParser, flag: str, *, env: Mapping[str, str] | None = None,
             default: Any = None, help: str = "", **kwargs: Any) -> None:
    """Add `flag`, its default taken from PS_<FLAG> when set; the help names the variable.
    `action="append"` makes a repeatable flag, its variable a comma-separated list."""
    env = os.environ if env is None else env
    name = env_name(flag)
    repeat = kwargs.get("action") == "append"
    if repeat:
        kwargs["action"], default = _Repeat, list(default or [])
    if name in env:
        raw = env[name]
        if kwargs.get("action") == "store_true":
            if raw.lower() not in _TRUE | _FALSE:
                raise InvalidArgument(f"{name} ({raw!r}) must be one of 1/0, true/false, yes/no, on/off")
            default = raw.lower() in _TRUE
        elif repeat:
            default = [item.strip() for item in raw.split(",") if item.strip()]
        else:
            default = raw
    action = parser.add_argument(flag, default=default, help=f"{help} [env {name}{', comma-separated' if repeat else ''}; "
                                 "default: %(default)s]", **kwargs)
    if name in env:
        sources = parser.get_default(ENV_SOURCES) or {}
        parser.set_defaults(**{ENV_SOURCES: {**sources, action.dest: (name, action.default)}})


def add_optimizer_flags(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    d = OptimizerConfig()
    add_flag(parser, "--optimizer", env=env, default=d.name, choices=OPTIMIZERS, help="server-side optimizer")
    add_flag(parser, "--lr", env=env, default=d.lr, type=float, help="learning rate")
    add_flag(parser, "--momentum", env=env, default=d.momentum, type=float, help="momentum (optimizer momentum)")
    add_flag(parser, "--weight-decay", env=env, default=d.weight_decay, type=float, help="L2 weight decay")
    add_flag(parser, "--beta1", env=env, default=d.beta1, type=float, help="Adam beta1")
    add_flag(parser, "--beta2", env=env, default=d.beta2, type=float, help="Adam beta2")
    add_flag(parser, "--eps", env=env, default=d.eps, type=float, help="Adam epsilon")


def optimizer_from_args(args: argparse.Namespace) -> OptimizerConfig:
    return OptimizerConfig(args.optimizer, float(args.lr), float(args.momentum), float(args.weight_decay),
                           float(args.beta1), float(args.beta2), float(args.eps))


def compress_flag(spec: str) -> str:
    """argparse type of --compress: a usage error that names the rule."""
    try:
        return compress.check(spec)
    except InvalidArgument as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_compress_flag(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    add_flag(parser, "--compress", env=env, default="none", type=compress_flag,
             help="gradients on the wire: none, fp16, bf16 (servers apply in fp32), or topk:R (the R "
                  "fraction of largest entries per slice, the rest kept for later steps)")


def add_training_flags(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None,
                       worker_outputs: bool = True, ps_only: bool = True, epochs: float = 0.0) -> None:
    """Flags that ps-worker, ps-launch, ps-compare and the all-reduce baseline share (the
    comparison has its own outputs; `ps_only` adds wire compression and tensor parallelism)."""
    add_flag(parser, "--model", env=env, default="mlp", help=f"{', '.join(models.BUILTIN)}, or package.module:factory "
             "(found on the Python path or in the working directory)")
    add_flag(parser, "--data", env=env, default="digits", help=f"{', '.join(data.BUILTIN)}, or package.module:factory")
    add_flag(parser, "--batch-size", env=env, default=32, type=int, help="samples per step per worker")
    add_flag(parser, "--steps", env=env, default=0, type=int, help="steps per worker (overrides --epochs)")
    add_flag(parser, "--epochs", env=env, default=epochs, type=float, help="passes over each worker's data shard")
    add_optimizer_flags(parser, env)
    add_flag(parser, "--device", env=env, default="auto", choices=("auto", "cpu", "cuda"),
             help="where the worker computes (auto: CUDA when present)")
    add_flag(parser, "--seed", env=env, default=0, type=int, help="seed of model init and data order")
    if ps_only:
        add_compress_flag(parser, env)
        add_flag(parser, "--transport", env=env, default="auto", choices=TRANSPORTS,
                 help="how calls travel to the servers: auto (the fastest each server offers: shm when it "
                      "runs on this host, else tcp, else stream), tcp (every call multiplexed on one connection "
                      "to the server's data port, with the same token and TLS), stream (every call multiplexed "
                      "on one gRPC stream per server), unary (one gRPC call each), shm (large tensors through "
                      "shared memory; refused for a server on another host)")
        add_flag(parser, "--tp", env=env, default=1, type=int,
                 help="tensor-parallel ranks per worker (NCCL on CUDA, gloo on CPU; torchrun's env is joined)")
        add_flag(parser, "--micro-batches", env=env, default=1, type=int,
                 help="accumulate gradients over this many micro-batches per step")
        add_flag(parser, "--recompute", env=env, action="store_true", default=False,
                 help="recompute activations in backward instead of keeping them (gpt-tiny)")
        add_flag(parser, "--push-early", env=env, action="store_true", default=False,
                 help="push each layer's gradient as soon as backward produces it (overlaps the push with backward)")
        add_flag(parser, "--prefetch", env=env, action="store_true", default=False,
                 help="async/ssp: pull the next step's weights while this step computes (one step staler)")
        add_flag(parser, "--loader-workers", env=env, default=0, type=int,
                 help="DataLoader worker processes preparing batches (0: on the training thread; pays for "
                      "datasets whose samples cost time to read)")
    if worker_outputs:
        add_flag(parser, "--log-dir", env=env, default="", help="directory for JSONL metrics, one file per worker")
        add_flag(parser, "--eval-every", env=env, default=50, type=int, help="test accuracy every N steps (0: never)")
    add_flag(parser, "--partition-bytes", env=env, default=DEFAULT_PARTITION_BYTES, type=int,
             help="tensors larger than this are split into slices")


def check_device(device: str) -> None:
    """`--device cuda` where torch sees no CUDA device is refused at once, before connecting
    (the choice of GPU is the trainer's; this touches no device)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("device ('cuda') was asked for but torch sees no CUDA device: use --device cpu or auto")


def check_job(model: str, data_spec: str, device: str) -> None:
    """Check the device, load the data and build the model once, so that a launcher refuses a
    bad job before it starts any process (InvalidArgument names what is wrong)."""
    check_device(device)
    datasets = data.load_data(data_spec)
    models.build_model(model, datasets.input_shape, datasets.num_classes)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # unwinds through `finally`: child processes are stopped


def run_main(prog: str, body: Callable[[], int], stop_on_sigterm: bool = False) -> int:
    """Run a CLI body; a PSError becomes one clear line on stderr and exit code 2. With
    `stop_on_sigterm`, SIGTERM unwinds like Ctrl-C (for commands that own child processes)."""
    if stop_on_sigterm and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return body()
    except PSError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
