"""TF_CONFIG cluster specs and auth-token flags, as the CLIs read them."""

import json

import pytest

from ps.cli import server, worker
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
