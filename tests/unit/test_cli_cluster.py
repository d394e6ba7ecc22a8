"""TF_CONFIG cluster specs and auth-token flags, as the CLIs read them."""

import json
import os

import pytest

from ps.cli import compare, launch, server, worker
from ps.cli.common import auth_token_from_args, cluster_env
from ps.errors import InvalidArgument

CLUSTER = {"ps": ["ps-0.ps:5000", "ps-1.ps:5001"], "chief": ["w-0:1"], "worker": ["w-1:1", "w-2:1"]}


def tf_config(kind, index):
    return {"TF_CONFIG": json.dumps({"cluster": CLUSTER, "task": {"type": kind, "index": index}})}


def test_a_server_takes_its_shard_and_port_from_tf_config():
    args = server.build_parser(tf_config("ps", 1)).parse_args([])
    cfg = server.config_from_args(args)
    assert (cfg.shard_id, cfg.num_shards, cfg.port, cfg.num_workers) == (1, 2, 5001, 3)


@pytest.mark.parametrize("kind, index, rank", [("chief", 0, 0), ("worker", 0, 1), ("worker", 1, 2)])
def test_a_worker_takes_servers_and_rank_from_tf_config(kind, index, rank):
    cfg = worker.config_from_args(worker.build_parser(tf_config(kind, index)).parse_args(["--steps", "1"]))
    assert cfg.servers == ("ps-0.ps:5000", "ps-1.ps:5001") and (cfg.rank, cfg.num_workers) == (rank, 3)


def test_explicit_variables_and_flags_win_over_tf_config():
    env = {**tf_config("worker", 1), "PS_RANK": "0"}
    assert worker.build_parser(env).parse_args([]).rank == 0
    assert worker.build_parser(env).parse_args(["--rank", "1"]).rank == 1


@pytest.mark.parametrize("raw, rule", [
    ("{not json", "must be JSON"),
    (json.dumps({"cluster": {"ps": []}, "task": {"type": "ps", "index": 0}}), "must list the servers"),
    (json.dumps({"cluster": {"ps": ["a:1"]}, "task": {"type": "evaluator", "index": 0}}), "must be a type among"),
    (json.dumps({"cluster": {"ps": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker", "index": 3}}),
     "index into its cluster list"),
])
def test_a_bad_tf_config_is_refused_with_the_rule(raw, rule):
    with pytest.raises(InvalidArgument, match=rule):
        cluster_env({"TF_CONFIG": raw})


def test_no_tf_config_changes_nothing():
    assert cluster_env({"PS_RANK": "2"}) == {"PS_RANK": "2"}


def test_the_auth_token_comes_from_a_flag_or_a_file(tmp_path):
    args = server.build_parser({}).parse_args(["--auth-token", "abc"])
    assert auth_token_from_args(args) == "abc" and "abc" not in repr(server.config_from_args(args))
    (tmp_path / "t").write_text("from-file\n")
    assert auth_token_from_args(server.build_parser({}).parse_args(["--auth-token-file", str(tmp_path / "t")])) == "from-file"


@pytest.mark.parametrize("argv, rule", [
    (["--auth-token", "a", "--auth-token-file", "f"], "not both"),
    (["--auth-token-file", "/no/such/file"], "cannot be read"),
])
def test_bad_auth_token_flags_are_refused(argv, rule):
    with pytest.raises(InvalidArgument, match=rule):
        auth_token_from_args(server.build_parser({}).parse_args(argv))


def test_a_tf_config_server_counts_each_worker_entry_once_as_ps_launch_counts_a_tp_group():
    # A tensor-parallel group pushes as one worker (one clock): the servers count entries, not ranks.
    cfg = server.config_from_args(server.build_parser({**tf_config("ps", 0), "PS_TP": "2"}).parse_args([]))
    assert cfg.num_workers == 3
    with pytest.raises(SystemExit):  # the server has no --tp: it needs none
        server.build_parser({}).parse_args(["--tp", "2"])
    wcfg = worker.config_from_args(worker.build_parser({**tf_config("worker", 0), "PS_TP": "2"}).parse_args(["--steps", "1"]))
    assert (wcfg.num_workers, wcfg.tp) == (3, 2)


def test_ps_launch_tells_its_servers_the_count_a_tf_config_server_derives(monkeypatch):
    seen = {}

    def fake_start_servers(num, mode, num_workers, **kwargs):
        seen["num_workers"] = num_workers
        raise InvalidArgument("stop here")

    monkeypatch.setattr(launch, "start_servers", fake_start_servers)
    with pytest.raises(InvalidArgument, match="stop here"):
        launch.run(launch.build_parser({}).parse_args(["--workers", "3", "--tp", "2", "--steps", "1"]))
    tf_server = server.config_from_args(server.build_parser(tf_config("ps", 0)).parse_args([]))
    assert seen["num_workers"] == tf_server.num_workers == 3


def test_both_token_variables_set_is_refused_naming_the_variables(tmp_path):
    (tmp_path / "t").write_text("from-file\n")
    env = {"PS_AUTH_TOKEN": "abc", "PS_AUTH_TOKEN_FILE": str(tmp_path / "t")}
    with pytest.raises(InvalidArgument) as info:
        auth_token_from_args(server.build_parser(env).parse_args([]))
    assert str(info.value).startswith("PS_AUTH_TOKEN and PS_AUTH_TOKEN_FILE are both set; set one")
    assert auth_token_from_args(server.build_parser({**env, "PS_AUTH_TOKEN_FILE": ""}).parse_args([])) == "abc"


def test_a_token_flag_wins_over_the_other_ones_variable(tmp_path):
    (tmp_path / "t").write_text("from-file\n")
    given_file = server.build_parser({"PS_AUTH_TOKEN": "abc"}).parse_args(["--auth-token-file", str(tmp_path / "t")])
    assert auth_token_from_args(given_file) == "from-file"
    given_token = worker.build_parser({"PS_AUTH_TOKEN_FILE": str(tmp_path / "t")}).parse_args(["--auth-token", "xyz"])
    assert auth_token_from_args(given_token) == "xyz"


def test_compare_faults_have_environment_variables_that_flags_replace(monkeypatch):
    env = {"PS_STRAGGLER": "3:4, 1:2", "PS_KILL": "0:10"}
    args = compare.build_parser(env).parse_args([])
    assert (args.straggler, args.kill) == (["3:4", "1:2"], ["0:10"])
    args = compare.build_parser(env).parse_args(["--straggler", "2:3", "--straggler", "0:2"])
    assert (args.straggler, args.kill) == (["2:3", "0:2"], ["0:10"])
    assert compare.build_parser({}).parse_args([]).straggler == []
    help_text = " ".join(compare.build_parser({}).format_help().split())
    assert "[env PS_STRAGGLER, comma-separated" in help_text and "[env PS_KILL, comma-separated" in help_text


def test_compare_keeps_its_fault_lists_from_its_workers_environment(monkeypatch):
    monkeypatch.setenv("PS_STRAGGLER", "1:3")
    seen = {}

    def fake_run(cfg):
        seen["stragglers"], seen["env"] = cfg.stragglers, os.environ.get("PS_STRAGGLER")
        return 0

    monkeypatch.setattr(compare, "run", fake_run)
    monkeypatch.setattr("signal.signal", lambda *args: None)  # main's SIGTERM handler stays out of pytest
    assert compare.main(["--workers", "2"]) == 0
    assert seen == {"stragglers": {1: 3.0}, "env": None}  # a worker would read "1:3" as its --straggler factor


def test_ps_launch_gives_each_worker_its_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "7")
    assert launch.child_env(3)["LOCAL_RANK"] == "3"
    assert launch.child_env()["LOCAL_RANK"] == "7"  # a server's environment is left as it is
