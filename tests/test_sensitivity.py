"""onnxprune sensitivity: each candidate prunes exactly one group (prune's channels, nothing else),
its metric equals one computed independently from `onnxprune prune --config` and onnxruntime,
labels and batches line up, and the CLI writes the CSV / PNG or fails in one line with exit 2."""

import csv
import json
import sys

import numpy as np
import onnx
import pytest

from onnxprune import OnnxPruneError
from onnxprune.cli import main
from onnxprune.pruning import criteria
from onnxprune.sensitivity import (SensitivityRow, analyze, analyze_model, groups, plot, prune_group,
                                   sensitivity_table, write_csv)

from .onnx_builders import GraphBuilder, exact_counts, inits_of, layer_weights, node_by_name, ort_session

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cnn(seed=0, unnamed=False):
    """conv0 (first layer) → conv_a + conv_b (one coupled group) → conv_c → GAP → fc (classifier)."""
    b = GraphBuilder(3, 8, 8, seed=seed)
    b.conv(8, 3, pads=1, name="conv0")
    h = b.act()
    b.add(b.conv(8, 3, pads=1, x=h, name="conv_a"), b.conv(8, 1, x=h, name="conv_b"))
    b.act()
    b.conv(12, 3, pads=1, name="conv_c")
    b.act()
    b.global_avg_pool()
    b.flatten()
    b.gemm(5, name="fc")
    return b.model(dynamic_batch=True, unnamed=unnamed)


def split_model(seed=1):
    """conv1's output is split: its first half is added to conv2's output, its second half is not.
    Two groups share conv1: {conv1, conv2} (the first half) and {conv1} (the second)."""
    b = GraphBuilder(3, 8, 8, seed=seed)
    b.conv(8, 3, pads=1, name="conv0")
    h = b.act()
    s0, s1 = b.split([4, 4], x=b.conv(8, 3, pads=1, x=h, name="conv1"))
    b.concat([b.add(s0, b.conv(4, 1, x=h, name="conv2")), s1])
    b.act()
    b.conv(6, 1, name="conv3")
    b.act()
    b.global_avg_pool()
    b.flatten()
    b.gemm(5, name="fc")
    return b.model(dynamic_batch=True)


def calibration(batches=3, items=4, seed=0):
    return np.random.default_rng(seed).standard_normal((batches, items, 3, 8, 8)).astype(np.float32)


def feeds_of(x):
    return [{"x": batch} for batch in x]


def top1(model, x) -> np.ndarray:
    """Argmax of the first output over the last axis, every batch in order (numpy on onnxruntime)."""
    sess = ort_session(model)
    return np.concatenate([np.argmax(sess.run(None, {"x": batch})[0], axis=-1).reshape(-1) for batch in x])


def zero_rows(w) -> set[int]:
    return set(np.flatnonzero(~np.any(w.reshape(w.shape[0], -1) != 0, axis=1)).tolist())


def expected_count(group, s) -> int:
    """What `prune` zeroes in a group: the floor of s × its channels, at most its free ones."""
    return min(int(s * group.channels + 1e-9), group.free)


def by_label(model, **kw):
    return {g.label: g for g in groups(model, **kw)}


def prune_cli(model, tmp_path, layers, s, *extra) -> onnx.ModelProto:
    """The independent pruner: `onnxprune prune --config` naming the group's layers alone."""
    src, cfg, out = tmp_path / "dense.onnx", tmp_path / f"cfg{s}.json", tmp_path / f"pruned{s}.onnx"
    onnx.save(model, src)
    cfg.write_text(json.dumps([{"sparsity": s, "op_names": list(layers)}]))
    assert main([str(a) for a in ["prune", src, "-o", out, "--config", cfg, *extra]]) == 0
    return onnx.load(out)


# --- (a) a candidate zeroes exactly its group's channels ----------------------------------------

@pytest.mark.parametrize("s", [0.3, 0.5, 0.9])
def test_candidate_zeroes_the_lowest_l1_channels_of_its_group_and_nothing_else(s):
    model = cnn()
    dense = layer_weights(model)
    g = by_label(model)["conv_a+1"]
    cand = layer_weights(prune_group(model, g, s))
    # the coupled channels go in both producers: the same rows, the lowest summed L1 first
    score = criteria.l1(dense["conv_a"]) + criteria.l1(dense["conv_b"])
    want = set(np.argsort(score, kind="stable")[:expected_count(g, s)].tolist())
    assert want and zero_rows(cand["conv_a"]) == zero_rows(cand["conv_b"]) == want
    for name in ("conv_a", "conv_b"):  # the rows kept are the dense ones
        keep = sorted(set(range(8)) - want)
        np.testing.assert_array_equal(cand[name][keep], dense[name][keep])
    for name in ("conv0", "conv_c", "fc"):
        np.testing.assert_array_equal(cand[name], dense[name])
    # the biases stay (simplify folds the constant channels), nothing but those weights changed
    before, after = inits_of(model), inits_of(prune_group(model, g, s))
    assert {k for k in before if not np.array_equal(before[k], after[k])} == {
        node_by_name(model, n).input[1] for n in ("conv_a", "conv_b")}


def test_a_group_sharing_its_layer_with_another_is_pruned_alone():
    model = split_model()
    gs = by_label(model)
    dense = layer_weights(model)
    both, alone = gs["conv1+1"], gs["conv1"]
    cand = layer_weights(prune_group(model, both, 0.5))
    # {conv1, conv2}: rows 0..3 of conv1 (added to conv2), the same rows of conv2; conv1's 4..7 stay
    zeroed = zero_rows(cand["conv1"])
    assert len(zeroed) == expected_count(both, 0.5) and zeroed <= {0, 1, 2, 3}
    assert zero_rows(cand["conv2"]) == zeroed
    np.testing.assert_array_equal(cand["conv1"][4:], dense["conv1"][4:])
    # {conv1}: only the second half, and exactly what `prune --config` naming conv1 alone zeroes
    cand = layer_weights(prune_group(model, alone, 0.5))
    assert len(zero_rows(cand["conv1"])) == expected_count(alone, 0.5) and zero_rows(cand["conv1"]) <= {4, 5, 6, 7}
    np.testing.assert_array_equal(cand["conv2"], dense["conv2"])


def test_candidate_matches_prune_config_for_each_criterion(tmp_path):
    model = cnn()
    x = calibration()
    g = by_label(model)["conv_c"]
    for criterion in ("l2", "fpgm", "apoz"):
        ours = layer_weights(prune_group(model, g, 0.5, calib=feeds_of(x), criterion=criterion))
        np.savez(tmp_path / "calib.npz", x=x)
        theirs = layer_weights(prune_cli(model, tmp_path, g.layers, 0.5, "--criterion", criterion,
                                         "--calib", tmp_path / "calib.npz"))
        assert zero_rows(ours["conv_c"]) and zero_rows(ours["conv_c"]) == zero_rows(theirs["conv_c"]), criterion


# --- (b), (d) the metric equals an independent computation --------------------------------------

def test_agreement_equals_independent_prune_and_argmax(tmp_path):
    model, x = cnn(seed=2), calibration(seed=2)  # seeds under which predictions vary and pruning moves them
    rows, baseline = analyze(model, feeds_of(x), sparsities=(0.5, 0.9))
    assert baseline == 1.0
    dense = top1(model, x)
    got = {(r.group, r.sparsity): r.metric for r in rows}
    checked = []
    for label, s in [("conv_a+1", 0.5), ("conv_c", 0.9), ("conv_a+1", 0.9)]:
        pruned = prune_cli(model, tmp_path, by_label(model)[label].layers, s)
        checked.append(float(np.mean(top1(pruned, x) == dense)))
        assert got[label, s] == checked[-1], (label, s)
    assert min(checked) < 1.0  # the points compared are ones where pruning changed predictions
    # an export without node names: the same candidates, under the names the cleanup gives
    unnamed, _ = analyze(cnn(seed=2, unnamed=True), feeds_of(x), sparsities=(0.5, 0.9))
    assert [r.metric for r in unnamed] == [r.metric for r in rows] and len({r.group for r in unnamed}) == 2


def test_accuracy_with_labels_over_several_batches(tmp_path):
    model, x = cnn(seed=2), calibration(batches=3, items=4, seed=5)
    labels = np.random.default_rng(9).integers(0, 5, size=(3, 4))  # one per item, batch-major
    result = analyze_model(model, feeds_of(x), labels=labels, sparsities=(0.7,))
    assert result.metric_name == "top-1 accuracy"
    assert result.baseline == float(np.mean(top1(model, x) == labels.reshape(-1)))
    for r in result.rows:
        pruned = prune_cli(model, tmp_path, r.layers, 0.7)
        assert r.metric == float(np.mean(top1(pruned, x) == labels.reshape(-1))), r.group


def test_macs_are_those_of_the_simplified_candidate(tmp_path):
    from onnxprune import simplify

    model, x = cnn(), calibration(batches=1)
    result = analyze_model(model, feeds_of(x), sparsities=(0.5,), macs=True)
    assert result.dense_macs == simplify(model, check=False, **exact_counts())[1].after.macs
    for r in result.rows:
        pruned = prune_cli(model, tmp_path, r.layers, 0.5)
        assert r.macs == simplify(pruned, check=False, **exact_counts())[1].after.macs < result.dense_macs


# --- (c) pinned groups, sparsity 0 ----------------------------------------------------------------

def test_pinned_and_kept_groups_give_no_rows_and_sparsity_zero_is_the_dense_model():
    model, x = cnn(), calibration(batches=1)
    result = analyze_model(model, feeds_of(x), sparsities=(0.0, 0.5), prune_first=True, prune_last=True)
    skipped = {g.label: g.skipped for g in result.groups if g.skipped}
    assert list(skipped) == ["fc"] and "pinned" in skipped["fc"]  # the graph output's classes
    assert {r.group for r in result.rows} == {"conv0", "conv_a+1", "conv_c"}
    assert all(r.metric == 1.0 for r in result.rows if r.sparsity == 0.0)
    default = analyze_model(model, feeds_of(x), sparsities=(0.5,))
    assert {g.label: g.skipped for g in default.groups if g.skipped} == {
        "conv0": "first layer kept (use --prune-first)", "fc": "classifier kept (use --prune-last)"}
    assert "not analysed: fc" in default.table()


# --- the framework-free reports --------------------------------------------------------------------

ROWS = [SensitivityRow(g, [g, "other"], s, m, macs) for g, base in (("a", 0.9), ("b", 0.8))
        for s, m, macs in ((0.25, base, 2_500_000), (0.75, base / 2, 500))]


def test_table_csv_and_plot_from_plain_rows(tmp_path):
    text = sensitivity_table(ROWS, 0.95, "accuracy").splitlines()
    assert "0.9500" in text[0] and "2 group(s) x 2 sparsities" in text[0]
    assert text[1].split()[1:] == ["0.25", "0.75"]
    assert text[2].split() == ["a", "0.9000", "0.4500"] and text[3].split() == ["b", "0.8000", "0.4000"]
    assert "MACs" in text[4] and text[6].split() == ["a", "2.5M", "500"]
    write_csv(ROWS, tmp_path / "s.csv")
    with open(tmp_path / "s.csv") as f:
        back = list(csv.DictReader(f))
    assert [(r["group"], r["layers"].split(";"), float(r["sparsity"]), float(r["metric"]), int(r["macs"]))
            for r in back] == [(r.group, r.layers, r.sparsity, r.metric, r.macs) for r in ROWS]
    plot(ROWS, tmp_path / "s.png", "accuracy", 0.95)
    data = (tmp_path / "s.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.png"]  # no temporary files left


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(OnnxPruneError, match="pip install matplotlib"):
        plot(ROWS, tmp_path / "s.png", "accuracy")
    assert not list(tmp_path.iterdir())


# --- (e) the command line ---------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    model, x = tmp_path / "m.onnx", calibration(batches=2, items=3)
    onnx.save(cnn(), model)
    np.savez(tmp_path / "calib.npz", x=x)
    np.save(tmp_path / "labels.npy", np.arange(6) % 5)
    np.save(tmp_path / "short.npy", np.arange(5) % 5)
    return tmp_path, model


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_csv_and_png(files, capsys):
    d, model = files
    before = model.read_bytes()
    code, out, err = run(["sensitivity", model, "--calib", d / "calib.npz", "--labels", d / "labels.npy",
                          "--sparsities", "0.5,0.25,0.75", "--csv", d / "out/s.csv", "--plot", d / "s.png"], capsys)
    assert code == 0, err
    analysed = [g for g in groups(model) if not g.skipped]
    with open(d / "out/s.csv") as f:
        back = list(csv.DictReader(f))
    assert len(back) == len(analysed) * 3
    assert {(r["group"], float(r["sparsity"])) for r in back} == {(g.label, s) for g in analysed
                                                                    for s in (0.25, 0.5, 0.75)}
    data = (d / "s.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert model.read_bytes() == before
    assert "top-1 accuracy" in out and all(g.label in out for g in analysed)
    code, out, _ = run(["sensitivity", model, "--calib", d / "calib.npz", "--sparsities", "0.5", "--json"], capsys)
    rep = json.loads(out)
    assert code == 0 and rep["metric"] == "top-1 agreement with the dense model" and rep["baseline"] == 1.0
    assert [(r["group"], r["sparsity"]) for r in rep["rows"]] == [(g.label, 0.5) for g in analysed]


@pytest.mark.parametrize("case", ["no calib", "short labels", "csv is the model", "plot is the calib",
                                  "float labels", "bad sparsities", "no group", "missing calib file"])
def test_cli_errors_are_one_line_exit_2_and_write_nothing(files, capsys, case):
    d, model = files
    base = ["sensitivity", model, "--calib", d / "calib.npz"]
    if case == "no group":  # a first layer and a classifier only
        b = GraphBuilder(3, 8, 8)
        b.conv(4, 3, name="conv0")
        b.global_avg_pool()
        b.flatten()
        b.gemm(5, name="fc")
        onnx.save(b.model(dynamic_batch=True), d / "tiny.onnx")
        base[1] = d / "tiny.onnx"
    if case == "float labels":
        np.save(d / "float.npy", np.zeros(6))
    argv = {
        "no calib": ["sensitivity", model],
        "short labels": base + ["--labels", d / "short.npy", "--csv", d / "s.csv"],
        "csv is the model": base + ["--csv", model],
        "plot is the calib": base + ["--plot", d / "calib.npz"],
        "float labels": base + ["--labels", d / "float.npy"],
        "bad sparsities": base + ["--sparsities", "0.5,1.2"],
        "no group": base + ["--csv", d / "s.csv"],
        "missing calib file": ["sensitivity", model, "--calib", d / "nope.npz"],
    }[case]
    listing = sorted(p.name for p in d.iterdir())
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "error" in err, err
    assert sorted(p.name for p in d.iterdir()) == listing  # nothing written, no temporary left
    if case == "short labels":
        assert "5 label(s)" in err and "6 prediction(s)" in err
    if case == "no group":
        assert "no prunable channel group" in err
