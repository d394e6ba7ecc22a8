"""Every CLI: complete --help, PS_<FLAG> environment defaults, clear errors for bad flags."""

import subprocess
import sys

import pytest

from ps.cli import launch, server, worker
from ps.config import ServerConfig


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
