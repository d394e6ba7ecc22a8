"""--auth-token: every RPC but the health check must carry the token; a refused call changes nothing."""

import logging
import threading

import grpc
import pytest
import torch

from ps.cli import server as server_cli
from ps.cli.probe import check
from ps.config import OptimizerConfig, ServerConfig
from ps.errors import Unauthenticated
from ps.server.app import create_server
from ps.worker.client import PSClient

TOKEN = "s3cret-token"
SGD1 = OptimizerConfig("sgd", lr=1.0)


@pytest.fixture
def server():
    srv = create_server(ServerConfig(mode="async", auth_token=TOKEN))
    good = PSClient([srv.address], "good", auth_token=TOKEN)
    good.setup({"w": torch.zeros(4)}, SGD1)
    yield srv, good
    good.close()
    srv.stop(grace=0)


@pytest.mark.parametrize("token", ["", "wrong", TOKEN + "x"], ids=["missing", "wrong", "longer"])
def test_a_client_without_the_right_token_is_refused_and_changes_nothing(server, token):
    srv, good = server
    before = good.pull(0, observer=True)["w"].clone()
    bad = PSClient([srv.address], "bad", auth_token=token, retry_timeout=1)
    try:
        with pytest.raises(Unauthenticated, match="auth token"):
            bad.setup({"w": torch.zeros(4)}, SGD1)
        bad.attach(good.plan.params)
        with pytest.raises(Unauthenticated):
            bad.push({"w": torch.ones(4)}, 0)
        with pytest.raises(Unauthenticated):
            bad.pull(0, observer=True)
    finally:
        bad.close()
    assert torch.equal(good.pull(0, observer=True)["w"], before)
    assert good.stats()[0]["pushes"] == 0


def test_raw_bytes_without_a_token_are_refused_before_they_are_parsed(server):
    srv, _ = server
    with grpc.insecure_channel(srv.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/ps.ParameterServer/Push")(b"\xff" * 16, timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_right_token_trains_and_health_checks_need_none(server):
    srv, good = server
    assert good.push({"w": torch.ones(4)}, 0)[0]["outcome"] == "APPLIED"
    assert torch.equal(good.pull(1)["w"], -torch.ones(4))
    assert check(srv.address) == "SERVING"  # no token: probes must reach it


def _run_server(argv, caplog):
    stop = threading.Event()
    cfg = server_cli.config_from_args(server_cli.build_parser({}).parse_args(argv))
    stop.set()  # serve, warn, stop at once
    with caplog.at_level(logging.WARNING, logger="ps.server"):
        server_cli.run(cfg, stop)
    return caplog.text


def test_binding_beyond_loopback_without_a_token_warns_loudly(caplog):
    assert "WITHOUT AN AUTH TOKEN" in _run_server(["--host", "0.0.0.0"], caplog)


def test_binding_beyond_loopback_with_a_token_does_not_warn(caplog, tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert "WITHOUT AN AUTH TOKEN" not in _run_server(
        ["--host", "0.0.0.0", "--auth-token-file", str(tmp_path / "token")], caplog)
