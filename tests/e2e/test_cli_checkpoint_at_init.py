"""A server with a checkpoint directory writes a checkpoint as soon as its shard is initialised:
killed with SIGKILL before its first interval, it restarts with the initial weights, not empty."""

import io
import signal
import time

import torch

from ps.cli.launch import start_servers, stop_all
from ps.config import OptimizerConfig
from ps.server.checkpoint import candidates
from ps.sharding import ParamSpec
from ps.worker.client import PSClient


def _server(ckpt):
    extra = ["--checkpoint-dir", ckpt, "--checkpoint-every", "3600s", "--restore-if-present"]
    return start_servers(1, "async", 1, extra=extra, out=io.StringIO())[0]


def test_a_server_killed_right_after_init_restarts_initialised(tmp_path):
    ckpt, initial = str(tmp_path), torch.arange(10.0)
    server = _server(ckpt)
    try:
        with PSClient([server.address], "w", heartbeat=False) as c:
            c.setup({"w": initial}, OptimizerConfig("sgd", lr=0.1))
        deadline = time.monotonic() + 60  # the interval is an hour: only the checkpoint at init can appear
        while not candidates(ckpt, 0):
            assert time.monotonic() < deadline, "no checkpoint was written after init"
            time.sleep(0.05)
        server.popen.send_signal(signal.SIGKILL)
        server.popen.wait()
    finally:
        stop_all([server])
    server = _server(ckpt)
    try:
        with PSClient([server.address], "observer", heartbeat=False) as c:
            c.attach([ParamSpec("w", (10,))])
            assert c.stats()[0]["initialized"]
            assert torch.equal(c.pull(0, observer=True)["w"], initial)
    finally:
        stop_all([server])
