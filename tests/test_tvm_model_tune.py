"""model_tune end to end on a small conv net (tiny budgets), and its error handling."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest

tvm = pytest.importorskip("tvm")
torch = pytest.importorskip("torch")

from onnxprune.tvm_kernels import model_tune  # noqa: E402
from onnxprune.tvm_kernels.api import ParityError, check_parity  # noqa: E402
from onnxprune.tvm_kernels.api import fork_join_line as api_fork_join_line  # noqa: E402
from onnxprune.tvm_kernels.cli import main  # noqa: E402

pytestmark = pytest.mark.tvm
TARGET = '{"kind": "llvm", "num-cores": 2}'
MEAN_LINE = re.compile(r"^Mean inference time \(std dev\): \d+\.\d+ ms \(\d+\.\d+ ms\)$")


class SmallNet(torch.nn.Module):
    """First conv, pointwise + BN + ReLU, depthwise, plain 1x1, strided 3x3, residual, head."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU())
        self.project = nn.Conv2d(16, 16, 1)
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        # a second im2col conv of another shape (two different im2col kernels in one module)
        self.mix = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.odd = nn.Conv2d(32, 6, 1)  # C_out % 4 != 0: stays dense
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        y = self.pw(self.stem(x))
        y = y + self.project(self.dw(y))
        y = self.odd(self.mix(self.down(y)))
        return self.head(y.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    torch.manual_seed(0)
    net = SmallNet().eval()
    with torch.no_grad():
        net.pw[1].running_mean.uniform_(-0.2, 0.2)
        net.pw[1].running_var.uniform_(0.5, 2.0)
    path = str(tmp_path_factory.mktemp("model") / "small.onnx")
    torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), path, dynamo=False, opset_version=17)
    return path


def _ort(model_path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model_path)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_model_tune_prunes_converts_checks_times_and_exports(small_onnx, tmp_path):
    work = str(tmp_path / "tuned")
    result = model_tune(small_onnx, 4, 1, 0.7, prune=True, trials=0, target=TARGET,
                        work_dir=work, rounds=3, verbose=False)
    # pw, project, down, mix are eligible; odd (C_out=6) is not; the stem (3 input channels,
    # kept dense by the pruner) goes to the direct kernel, dw to the depthwise kernel, the head
    # to the GEMV kernel
    assert len(result.converted) == 4
    assert len(result.direct) == 1 and result.direct[0].startswith("direct_0: 3->8 3x3 stride 1 @16x16, direct")
    assert len(result.gemv) == 1 and "(1, 6) @ (6, 10)" in result.gemv[0]
    assert any("relu" in line for line in result.converted)
    assert len(result.depthwise) == 1 and "+relu" in result.depthwise[0]
    # every channel the projection (the dw's one reader) has no weight for goes unread (exact
    # simplify may add the channels it folds as constants)
    from onnx import numpy_helper

    project = next(numpy_helper.to_array(t) for t in onnx.load(os.path.join(work, "pruned.onnx")).graph.initializer
                   if t.dims == [16, 16, 1, 1])
    dead_columns = int(np.sum(~np.any(project[:, :, 0, 0] != 0, axis=0)))
    assert sum(result.planes.values()) == 16 and result.planes["unread"] >= dead_columns
    assert result.planes["computed"] == 16 - result.planes["unread"] - result.planes["constant"]
    assert len(result.skipped) == 1 and "(6, 32, 1, 1)" in result.skipped[0]
    assert result.parity_max_abs_err < 1e-3
    assert set(result.timings) == {"sparse TVM", "dense TVM", "onnxruntime"}
    assert all(t.median_ms > 0 for t in result.timings.values())
    assert MEAN_LINE.match(result.table.splitlines()[-1])
    if os.path.exists("/proc/stat"):  # the hypervisor's share of CPU time while timing, shown
        assert 0.0 <= result.stolen <= 1.0
        assert f"host: {100 * result.stolen:.1f} % of CPU time stolen" in result.table
    # TARGET names 2 cores: one fork-join reading per timing process, 3 engines x 3 rounds
    assert len(result.fork_join_us) == 9 and all(r > 0 for r in result.fork_join_us)
    assert api_fork_join_line(result.fork_join_us) in result.table.splitlines()
    # the exported library is deployable on its own and computes the pruned model
    from tvm import relax

    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    vm = relax.VirtualMachine(tvm.runtime.load_module(result.library_path), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = _ort(os.path.join(work, "pruned.onnx"), x)
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)


def test_row_balanced_pruning_gives_every_block_row_the_same_count(small_onnx, tmp_path):
    """--prune --balanced: in every pruned conv each block row keeps the same number of 1x4
    blocks (ceil-pruned per row), and the compiled model still matches onnxruntime."""
    from onnx import numpy_helper

    work = str(tmp_path / "tuned")
    result = model_tune(small_onnx, 4, 1, 0.7, prune=True, balanced=True, trials=0, target=TARGET,
                        work_dir=work, rounds=1, dense_baseline=False, verbose=False)
    assert len(result.converted) == 4 and result.parity_max_abs_err < 1e-3
    pruned = onnx.load(os.path.join(work, "pruned.onnx"))
    weights = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    checked = 0
    for node in pruned.graph.node:
        w = weights.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if w is None or w.shape[1] == 1 or w.shape[0] % 4 or not (w == 0).any():
            continue
        kept = (w.reshape(w.shape[0] // 4, 4, w.shape[1], -1) != 0).any(axis=(1, 3)).sum(axis=1)
        assert kept.tolist() == [w.shape[1] - int(np.ceil(0.7 * w.shape[1] - 1e-9))] * len(kept)
        checked += 1
    assert checked == 4


@pytest.mark.slow
def test_cli_tiny_budget_tunes_into_work_dir_and_reuses_it(small_onnx, tmp_path, capsys):
    work = str(tmp_path / "tuned")
    argv = ["--onnx_path", small_onnx, "--bsr", "4", "--bsc", "1", "--sparsity", "0.5",
            "--prune", "--trials", "3", "--target", TARGET, "--work-dir", work,
            "--no-dense-baseline", "--rounds", "2", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert MEAN_LINE.match(out[-1])
    records = os.path.join(work, "database_tuning_record.json")
    with open(records) as f:
        assert len(f.readlines()) > 0
    tiles = os.path.join(work, "bsr_tiles.json")
    mtime = os.path.getmtime(tiles)
    # second run, no budget: reuses the database and the tile cache (not re-measured)
    assert main(argv[:argv.index("--trials")] + ["--trials", "0"] + argv[argv.index("--trials") + 2:]) == 0
    assert os.path.getmtime(tiles) == mtime


BAD_INPUTS = {
    "missing": lambda m, tmp: ["--onnx_path", str(tmp / "nope.onnx")],
    "not_onnx": lambda m, tmp: ["--onnx_path", str(tmp / "junk.onnx")],
    "bad_target": lambda m, tmp: ["--onnx_path", m, "--target", "{kind: llvm"],
    "unknown_target": lambda m, tmp: ["--onnx_path", m, "--target", '{"kind": "nokind"}'],
    "sparsity_1": lambda m, tmp: ["--onnx_path", m, "--sparsity", "1.0"],
    "bad_rpc": lambda m, tmp: ["--onnx_path", m, "--rpc-tracker", "nohost", "--rpc-key", "k"],
    "balanced_without_prune": lambda m, tmp: ["--onnx_path", m, "--balanced"],
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case, small_onnx, tmp_path, capsys):
    (tmp_path / "junk.onnx").write_text("not a model")
    argv = BAD_INPUTS[case](small_onnx, tmp_path) + ["--work-dir", str(tmp_path / "w")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("model_tune: error:")


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "onnxprune.tvm_kernels.cli", "--onnx_path",
                           str(tmp_path / "nope.onnx"), "--sparsity", "0.5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"model_tune: error: no such file: {tmp_path / 'nope.onnx'}"]
    # argparse errors (a sparsity that is not a number) also exit 2 without a traceback
    proc = subprocess.run([sys.executable, "-m", "onnxprune.tvm_kernels.cli", "--onnx_path", "m.onnx",
                           "--sparsity", "high"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_sparsity_is_a_float():
    from onnxprune.tvm_kernels.cli import build_parser

    args = build_parser().parse_args(["--onnx_path", "m.onnx", "--sparsity", "0.75"])
    assert args.sparsity == 0.75


def test_parity_check_fails_loudly():
    ref = [np.linspace(-1, 1, 50, dtype=np.float32).reshape(5, 10)]
    assert check_parity([ref[0] + 1e-6], ref) <= 2e-6
    bad = ref[0].copy()
    bad[2, 3] += 0.1
    with pytest.raises(ParityError, match="1 of 50"):
        check_parity([bad], ref)
    with pytest.raises(ParityError, match="shape"):
        check_parity([ref[0].T], ref)


def test_tuned_records_are_applied_to_functions_with_constants(tmp_path):
    """Regression: meta_schedule's compile_relax re-fused the prepared module, so a conv fused
    with its constant bias/clip and a classifier with its bias lost their tuning records and
    ran TVM's unscheduled code (MobileNetV2: stem 2.5x, classifier 6x slower)."""
    import tvm
    from onnx import TensorProto, helper, numpy_helper

    from onnxprune.tvm_kernels import convert, tune

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in {
        "w": rng.standard_normal((8, 3, 3, 3)), "b": rng.standard_normal(8),
        "lo": np.array(0.0), "hi": np.array(6.0),
        "fc": rng.standard_normal((8, 5)), "fb": rng.standard_normal(5)}.items()]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fb"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    target = tvm.target.Target(json.loads(TARGET))
    prepared = tune.prepare(convert.import_onnx(model), target)
    tasks = tune.tunable_tasks(prepared, target)
    work = str(tmp_path / "work")
    tune.tune_remainder(prepared, target, work, trials=4 * len(tasks))  # 4 per round and task
    _, untuned = tune.apply_tuning(prepared, target, work)
    assert not {t.task_name for t in tasks} & set(untuned)
    assert any("conv2d" in t.task_name for t in tasks)
    assert any("matmul" in t.task_name for t in tasks)


ZOO_IN_CI = ("mobilenet_v2",)  # about a minute each: the rest with ONNXPRUNE_SLOW=1
ZOO = ("resnet18", "resnet50", "vgg11_bn", "alexnet", "squeezenet", "mobilenet_v1",
       "mobilenet_v2", "mobilenet_v3", "mnasnet", "efficientnet_b0", "googlenet", "inception",
       "densenet", "shufflenet_v2", "resnext", "wide_resnet", "regnet")


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=() if name in ZOO_IN_CI else pytest.mark.slow) for name in ZOO])
def test_model_tune_on_zoo_models_exported_with_batchnorm(name, tmp_path):
    """Every zoo architecture (BN nodes kept by the exporter): prune, convert, build, and match
    onnxruntime (model_tune raises ParityError otherwise).  MobileNetV2 (BN folded by simplify first)
    gets its expand and depthwise convs fused; MobileNetV3 carries relax.clip bounds;
    ShuffleNetV2 splits, concatenates and shuffles between depthwise convs."""
    import warnings

    import torch

    import onnxprune.models as models

    assert set(ZOO) == set(models.ZOO)
    path = str(tmp_path / f"{name}.onnx")
    net = models.build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (models.example_input(name),), path,
                          dynamo=False, opset_version=17, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.EVAL)
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # not AlexNet...
    assert has_bn == any(n.op_type == "BatchNormalization" for n in onnx.load(path).graph.node)
    result = model_tune(path, 4, 1, 0.5, prune=True, trials=0, target=TARGET,
                        work_dir=str(tmp_path / "work"), rounds=1, dense_baseline=False,
                        verbose=False)
    assert result.converted and result.parity_max_abs_err < 1e-3
    if name == "mobilenet_v2":
        assert any("fused with depthwise" in line for line in result.converted)


def test_a_target_without_a_cpu_gets_the_hosts_and_says_so():
    """Generic x86-64 code ran at 0.49x / 0.76x of onnxruntime: a local target naming no CPU
    compiles for the detected one; a remote one is only warned about (the host is not the device)."""
    from onnxprune.tvm_kernels.api import fill_host_cpu, parse_target

    host = tvm.target.codegen.llvm_get_system_cpu()
    filled, note = fill_host_cpu(parse_target(TARGET), remote=False)
    assert filled["mcpu"] == host and filled["num-cores"] == 2 and host in note
    given = parse_target('{"kind": "llvm", "mcpu": "x86-64", "num-cores": 1}')
    assert fill_host_cpu(given, remote=False) == (given, None)
    remote, warning = fill_host_cpu(parse_target(TARGET), remote=True)
    assert "mcpu" not in remote and warning.startswith("warning") and "mcpu" in warning


def test_a_remote_target_without_num_cores_is_warned_about():
    """The fused and packed kernels split their work in num-cores parts (the host's core count
    when the target names none): only a remote target without it gets the warning."""
    from onnxprune.tvm_kernels.api import _physical_cores, num_cores_warning

    for bare in ('{"kind": "llvm", "mcpu": "cortex-a72"}', {"kind": "llvm"}, None):
        warning = num_cores_warning(bare, remote=True)
        assert warning.startswith("warning") and '"num-cores"' in warning
        assert f"this host's {_physical_cores()} cores" in warning
        assert num_cores_warning(bare, remote=False) is None
    assert num_cores_warning(TARGET, remote=True) is None
    assert num_cores_warning(json.loads(TARGET), remote=True) is None


def test_more_than_one_thread_times_each_engine_alone_in_its_own_process(monkeypatch):
    """At 2+ threads a runtime's idle workers keep spinning into the next engine's calls: each
    child process gets one engine and one round, the engines take turns round by round, and
    every engine's per-round times come back in order."""
    from onnxprune.tvm_kernels import timing

    calls = []

    def fake_child(spec, _path, _timeout=None):
        engines = list(spec["libraries"]) + (["onnxruntime"] if spec["onnx_path"] else [])
        calls.append((engines, spec["rounds"]))
        return {engines[0]: [float(len(calls))], timing.FORK_JOIN: [0.1 * len(calls)]}

    monkeypatch.setattr(timing, "time_in_subprocess", fake_child)
    spec = {"libraries": {"sparse": "s.so", "dense": "d.so"}, "onnx_path": "m.onnx", "threads": 2,
            "inputs_npz": "x.npz", "rounds": 2, "rpc": None}
    per_round = timing.time_isolated(spec, "spec.json")
    assert calls == [(["sparse"], 1), (["dense"], 1), (["onnxruntime"], 1)] * 2
    fork_join = per_round.pop(timing.FORK_JOIN)  # each child's probe reading, in order
    assert fork_join == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert per_round == {"sparse": [1.0, 4.0], "dense": [2.0, 5.0], "onnxruntime": [3.0, 6.0]}


def test_fork_join_probe_runs_its_regions_in_order_on_two_threads():
    """The probe's kernel: region r's halves each read what the other half wrote in region r-1,
    so after R regions both hold R exactly when every region ran after the one before."""
    from onnxprune.tvm_kernels import timing

    regions = 300
    lib = timing.fork_join_library(regions)
    a = tvm.runtime.tensor(np.zeros((regions + 1, 2, 16), np.float32))
    lib["main"](a)
    out = a.numpy()
    np.testing.assert_array_equal(out[:, 0, 0], np.arange(regions + 1))
    np.testing.assert_array_equal(out[:, 1, 0], np.arange(regions + 1))
    assert 0.0 < timing.fork_join_us(regions=regions, number=1) < 1e4


def test_fork_join_line_counts_the_readings_with_the_cores_apart():
    """Readings at APART times the fastest or more are counted as 'apart', and the table's
    line says how many; no readings (1 thread, RPC), no line."""
    from onnxprune.tvm_kernels import api, timing

    readings = [0.8, 0.9, 1.2, 1.3, 2.0, 2.1]  # 1.6 x 0.8 = 1.28: 1.3, 2.0, 2.1 apart
    assert timing.apart_readings(readings) == 3
    assert timing.apart_readings([]) == 0
    line = api.fork_join_line(readings)
    assert line.startswith("host: 2-thread fork-join 1.25 us median (0.80-2.10 over 6 timing processes); "
                           "3 of them at 1.6x the fastest or more: the two cores did not share a cache")
    quiet = api.fork_join_line([0.8, 0.9])
    assert quiet == "host: 2-thread fork-join 0.85 us median (0.80-0.90 over 2 timing processes)"
    assert api.fork_join_line([]) == ""
    result = api.ModelTuneResult("lib.so", "{}", [], [], [], [], 0.0, fork_join_us=readings,
                                 timings={"sparse TVM": api.Timing("sparse TVM", 1.0, 1.0, 0.1),
                                          "onnxruntime": api.Timing("onnxruntime", 2.0, 2.0, 0.1)})
    assert line in api.format_table(result, "local").splitlines()


def test_stolen_cpu_time_is_read_from_proc_stat(tmp_path):
    """cpu_ticks reads (steal, total) from /proc/stat's first line; stolen_fraction is the steal
    share of the ticks between two readings, None when either is unknown or no time passed."""
    from onnxprune.tvm_kernels import api, timing

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 20 800 10 0 5 60 0 0\ncpu0 50 2 10 400 5 0 2 30 0 0\n")
    assert timing.cpu_ticks(str(stat)) == (60, 1000)
    assert timing.stolen_fraction((60, 1000), (90, 1200)) == pytest.approx(0.15)
    assert timing.stolen_fraction((60, 1000), (60, 1000)) is None
    assert timing.stolen_fraction(None, (60, 1000)) is None
    assert timing.cpu_ticks(str(tmp_path / "missing")) is None
    stat.write_text("intr 1 2 3\n")
    assert timing.cpu_ticks(str(stat)) is None
    # the table says so; a busy host gets the warning, a quiet one not, unknown no line
    result = api.ModelTuneResult("lib.so", "{}", [], [], [], [], 0.0,
                                 timings={"sparse TVM": api.Timing("sparse TVM", 1.0, 1.0, 0.1),
                                          "onnxruntime": api.Timing("onnxruntime", 2.0, 2.0, 0.1)})
    for stolen, line in ((0.097, "host: 9.7 % of CPU time stolen by the hypervisor while timing (a busy"),
                         (0.004, "host: 0.4 % of CPU time stolen by the hypervisor while timing\n")):
        result.stolen = stolen
        assert line in api.format_table(result, "local")
    result.stolen = None
    assert "stolen" not in api.format_table(result, "local")
