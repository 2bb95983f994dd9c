"""model_tune through TVM's RPC tracker/server on loopback (both started here, bounded)."""

import os
import re

import pytest

tvm = pytest.importorskip("tvm")
pytest.importorskip("tornado")

from onnxprune.tvm_kernels.cli import main  # noqa: E402

from tests.test_tvm_model_tune import MEAN_LINE, small_onnx  # noqa: E402,F401

pytestmark = pytest.mark.tvm
TARGET = '{"kind": "llvm", "num-cores": 2}'


@pytest.fixture()
def rpc_board():
    """A tracker and one server registered as key 'board', on 127.0.0.1, free ports."""
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    tracker = Tracker(host="127.0.0.1", port=9190, port_end=9290, silent=True, timeout=60)
    server = Server(host="127.0.0.1", port=9300, port_end=9400, key="board", silent=True,
                    tracker_addr=("127.0.0.1", tracker.port), timeout=60)
    try:
        yield f"127.0.0.1:{tracker.port}"
    finally:
        server.terminate()
        tracker.terminate()


def _argv(model, work, tracker, trials):
    return ["--onnx_path", model, "--sparsity", "0.5", "--prune", "--trials", str(trials),
            "--target", TARGET, "--work-dir", work, "--rpc-tracker", tracker, "--rpc-key",
            "board", "--no-dense-baseline", "--rounds", "2"]


def test_tiles_parity_and_timing_run_on_the_rpc_device(small_onnx, tmp_path, rpc_board, capsys):
    assert main(_argv(small_onnx, str(tmp_path / "w"), rpc_board, 0)) == 0
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert MEAN_LINE.match(out[-1])
    assert any("board via RPC" in line for line in out)
    assert re.search(r"tuning BSR tiles of 4 kernels on board@127\.0\.0\.1", captured.err)
    assert "checking parity against onnxruntime on board" in captured.err


@pytest.mark.slow
def test_meta_schedule_measures_through_the_tracker(small_onnx, tmp_path, rpc_board, capsys):
    work = str(tmp_path / "w")
    assert main(_argv(small_onnx, work, rpc_board, 3)) == 0
    with open(os.path.join(work, "database_tuning_record.json")) as f:
        records = f.readlines()
    # a record with finite run seconds exists only if the RPC runner measured it on 'board'
    assert any('"run_secs"' in r or "[[" in r for r in records) and records
