"""TLS and mutual TLS with certificates made here (trustme): the right certificates train, the
wrong or missing ones never reach the servicer."""

import pytest
import torch
import trustme

from ps.cli.probe import check
from ps.config import OptimizerConfig, ServerConfig
from ps.errors import InvalidArgument, PSError
from ps.server.app import create_server
from ps.worker.client import PSClient

SGD = OptimizerConfig("sgd", lr=1.0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("worker-0@ps")
    files = {"ca": d / "ca.pem", "other_ca": d / "other.pem", "server_cert": d / "server.pem",
             "server_key": d / "server.key", "client_cert": d / "client.pem", "client_key": d / "client.key"}
    ca.cert_pem.write_to_path(files["ca"])
    other_ca.cert_pem.write_to_path(files["other_ca"])
    server.cert_chain_pems[0].write_to_path(files["server_cert"])
    server.private_key_pem.write_to_path(files["server_key"])
    client.cert_chain_pems[0].write_to_path(files["client_cert"])
    client.private_key_pem.write_to_path(files["client_key"])
    return {k: str(v) for k, v in files.items()}


def _server(pki, mutual):
    return create_server(ServerConfig(mode="async", tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                                      tls_ca=pki["ca"] if mutual else ""))


def _train_one_step(address, transport="unary", **tls):
    with PSClient([address], "w", connect_timeout=2, retry_timeout=1, transport=transport, **tls) as c:
        c.setup({"w": torch.zeros(3)}, SGD)
        c.push({"w": torch.ones(3)}, 0)
        return c.pull(1)["w"]


def test_tls_serves_a_client_that_trusts_the_ca_and_nobody_in_plaintext_or_with_another_ca(pki, transport_for):
    srv = _server(pki, mutual=False)
    try:
        assert torch.equal(_train_one_step(srv.address, tls_ca=pki["ca"]), -torch.ones(3))
        for path in ("stream", "tcp", "shm"):  # the other paths too (shm: its offer goes on the TLS stream)
            with PSClient([srv.address], path, transport=transport_for(path), tls_ca=pki["ca"]) as c:
                clock = c.setup({"w": torch.zeros(3)}, SGD)
                assert c._t.path(0) == path
                assert c.push({"w": torch.ones(3)}, clock)[0]["outcome"] == "APPLIED"
        for bad in ({}, {"tls_ca": pki["other_ca"]}):
            with pytest.raises(PSError):
                _train_one_step(srv.address, **bad)
        assert check(srv.address, ca=pki["ca"]) == "SERVING"
        assert srv.shard.stats()["pushes"] == 4  # one per path that trusts the CA
    finally:
        srv.stop(grace=0)


def test_mutual_tls_needs_a_client_certificate_the_ca_signed(pki):
    srv = _server(pki, mutual=True)
    try:
        with pytest.raises(PSError):
            _train_one_step(srv.address, tls_ca=pki["ca"])  # no client certificate
        got = _train_one_step(srv.address, tls_ca=pki["ca"], tls_cert=pki["client_cert"], tls_key=pki["client_key"])
        assert torch.equal(got, -torch.ones(3))
        with PSClient([srv.address], "t", transport="tcp", tls_ca=pki["ca"], tls_cert=pki["client_cert"],
                      tls_key=pki["client_key"]) as c:  # the data port asks for the certificate too
            clock = c.setup({"w": torch.zeros(3)}, SGD)
            assert c.push({"w": torch.ones(3)}, clock)[0]["outcome"] == "APPLIED" and c.paths() == ["tcp"]
        assert check(srv.address, ca=pki["ca"], cert=pki["client_cert"], key=pki["client_key"]) == "SERVING"
    finally:
        srv.stop(grace=0)


@pytest.mark.parametrize("kw, rule", [
    ({"tls_cert": "c.pem"}, "must be given together"),
    ({"tls_ca": "ca.pem"}, "needs tls_cert and tls_key"),
])
def test_bad_server_tls_settings_are_refused(kw, rule):
    with pytest.raises(InvalidArgument, match=rule):
        ServerConfig(**kw)


def test_an_unreadable_or_non_pem_file_is_named(tmp_path):
    (tmp_path / "x.pem").write_text("not a certificate")
    with pytest.raises(InvalidArgument, match=r"tls_key \('/no/such.pem'\) cannot be read"):
        create_server(ServerConfig(tls_cert=str(tmp_path / "x.pem"), tls_key="/no/such.pem"))
    with pytest.raises(InvalidArgument, match="is not a PEM file"):
        PSClient(["127.0.0.1:1"], tls_ca=str(tmp_path / "x.pem"), connect_timeout=0.1)
