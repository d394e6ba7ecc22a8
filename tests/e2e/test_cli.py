"""Every CLI: complete --help, PS_<FLAG> environment defaults, clear errors for bad flags."""

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ps.cli import launch, server, worker
from ps.config import ServerConfig
from ps.data import BUILTIN as BUILTIN_DATA
from ps.models import BUILTIN as BUILTIN_MODELS


@pytest.mark.parametrize("module, flags", [
    ("ps.cli.server", ["--mode", "--staleness", "--num-workers", "--worker-timeout", "--host", "--port",
                       "--shard-id", "--num-shards", "--staleness-lr"]),
    ("ps.cli.worker", ["--servers", "--model", "--data", "--batch-size", "--steps", "--epochs", "--lr",
                       "--device", "--seed", "--log-dir", "--eval-every", "--optimizer", "--weight-decay"]),
    ("ps.cli.launch", ["--servers", "--workers", "--mode", "--staleness", "--model", "--data", "--epochs"]),
])
def test_help_lists_every_flag_with_its_environment_variable(module, flags):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True).stdout
    for flag in flags:
        assert flag in out
        assert "PS_" + flag.lstrip("-").upper().replace("-", "_") in out


def test_environment_variables_give_defaults_and_flags_override_them():
    env = {"PS_MODE": "ssp", "PS_STALENESS": "3", "PS_STALENESS_LR": "true"}
    args = server.build_parser(env).parse_args([])
    assert server.config_from_args(args) == ServerConfig(mode="ssp", staleness=3, staleness_lr=True)
    assert server.build_parser(env).parse_args(["--mode", "async"]).mode == "async"


@pytest.mark.parametrize("argv, message", [
    (["--staleness", "-1"], "staleness (-1) must be >= 0"),
    (["--shard-id", "2", "--num-shards", "2"], "shard_id (2) must be in [0, num_shards=2)"),
    (["--worker-timeout", "0"], "worker_timeout (0.0) must be > 0"),
])
def test_bad_server_flags_exit_2_naming_the_value_and_the_rule(argv, message, capsys):
    assert server.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    ([], "servers must name at least one host:port"),
    (["--servers", "localhost"], "server address ('localhost') must be host:port"),
    (["--servers", "h:1", "--lr", "nan", "--steps", "1"], "lr (nan) must be a finite number > 0"),
    (["--servers", "h:1", "--rank", "3", "--num-workers", "2", "--steps", "1"], "rank (3) must be in [0, 2)"),
    (["--servers", "h:1", "--epochs", "0"], "one of steps or epochs must be > 0"),
])
def test_bad_worker_flags_exit_2_naming_the_value_and_the_rule(argv, message, capsys):
    assert worker.main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_mode_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as info:
        launch.main(["--mode", "bsp"])
    assert info.value.code == 2
    assert "invalid choice: 'bsp'" in capsys.readouterr().err


@pytest.mark.parametrize("main", [launch.main, worker.main])
def test_a_bad_compression_is_refused_by_the_parser_with_the_rule(main, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--servers", "h:1", "--compress", "topk:2"] if main is worker.main else ["--compress", "topk:2"])
    assert info.value.code == 2
    assert "compress ('topk:2') must be none, fp16, bf16 or topk:R with 0 < R <= 1" in capsys.readouterr().err


def test_prefetch_in_sync_mode_is_refused_before_anything_starts(capsys):
    assert launch.main(["--mode", "sync", "--prefetch"]) == 2
    assert "--prefetch needs --mode async or ssp" in capsys.readouterr().err


def test_overlap_flags_reach_the_workers():
    args = launch.build_parser({}).parse_args(["--mode", "async", "--prefetch", "--push-early"])
    argv = launch.training_argv(args)
    assert "--prefetch" in argv and "--push-early" in argv and "--recompute" not in argv
    cfg = worker.config_from_args(worker.build_parser({}).parse_args(["--servers", "h:1", "--steps", "1", *argv]))
    assert cfg.prefetch and cfg.push_early


def test_a_bad_boolean_in_the_environment_is_refused():
    with pytest.raises(Exception, match="PS_STALENESS_LR"):
        server.build_parser({"PS_STALENESS_LR": "maybe"})


BIN = Path(sys.executable).parent  # the installed console scripts


def test_the_model_and_data_help_lists_every_built_in():
    for command in ("ps-worker", "ps-launch", "ps-compare"):
        out = " ".join(subprocess.run([BIN / command, "--help"], capture_output=True, text=True, check=True).stdout.split())
        assert all(name in out for name in [*BUILTIN_MODELS, *BUILTIN_DATA]), (command, out)


def test_a_second_server_on_a_port_in_use_is_refused_in_one_line_with_exit_2():
    first = launch.start_servers(1, "sync", 1, out=io.StringIO())
    try:
        port = first[0].address.rpartition(":")[2]
        second = subprocess.run([BIN / "ps-server", "--port", port], capture_output=True, text=True, timeout=120)
    finally:
        launch.stop_all(first)
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip() == f"ps-server: error: address in use: 127.0.0.1:{port} (another process listens there)"
    assert second.stdout == ""


def test_a_host_that_is_not_an_address_of_this_machine_is_refused_in_one_line_with_exit_2():
    run = subprocess.run([BIN / "ps-server", "--host", "10.254.254.254", "--port", "5999"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == ("ps-server: error: cannot bind 10.254.254.254:5999: 10.254.254.254 is not an "
                                  "address of this machine")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["ps-worker", "ps-launch"])
def test_device_cuda_without_cuda_is_refused_before_anything_connects_or_starts(command):
    argv = [BIN / command, "--device", "cuda", "--steps", "1"]
    if command == "ps-worker":  # a server that is not there: a worker that tried to connect would wait for it
        argv += ["--servers", "127.0.0.1:9", "--connect-timeout", "60"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"{command}: error: device ('cuda') was asked for but torch sees no CUDA device" in run.stderr
    assert "server-0" not in run.stdout


@pytest.mark.parametrize("flag, spec, message", [
    ("--model", "no_such_module:factory", "plugin ('no_such_module:factory'): cannot import 'no_such_module'"),
    ("--data", "tests.e2e.user_plugin:no_such_factory", "has no attribute 'no_such_factory'"),
    ("--model", "transformer", "model ('transformer') must be one of"),
])
def test_ps_launch_refuses_a_bad_model_or_data_before_starting_any_server(flag, spec, message):
    run = subprocess.run([BIN / "ps-launch", flag, spec, "--steps", "5"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert message in run.stderr
    assert "[server-0]" not in run.stdout and "listening" not in run.stdout  # no server was started
