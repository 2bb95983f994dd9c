"""Digits at 32x32, augmentation, and the claim behind benchmarks/train_prune.py: on digits, L1 filter
pruning + fine-tuning at 50% beats one-shot L1 at 50% by a wide margin (seeds fixed, margins
chosen from measurements: see the comments)."""

import copy
import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from torch import nn  # noqa: E402

import onnxprune.pytorch as op  # noqa: E402
from onnxprune.models.digits import augment, load_digits_32  # noqa: E402
from onnxprune.models.resnet import resnet20  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "train_prune.py"


def _bench():
    """benchmarks/train_prune.py as a module: the test trains with the benchmark's own recipe code."""
    name = "_train_prune_bench"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def digits():
    return load_digits_32(seed=0)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- (a) data and augmentation ------------------------------------------------------------------

def test_load_digits_32_shapes_dtypes_split_and_scaling(digits):
    assert digits.x_train.shape == (1437, 3, 32, 32) and digits.x_test.shape == (360, 3, 32, 32)
    assert digits.x_train.dtype == digits.x_test.dtype == torch.float32
    assert digits.y_train.dtype == digits.y_test.dtype == torch.int64
    assert torch.equal(digits.x_train[:, 0], digits.x_train[:, 2])           # 3 channels: one image repeated
    assert abs(float(digits.x_train.mean())) < 1e-4 and abs(float(digits.x_train.std()) - 1) < 1e-3
    counts = torch.bincount(digits.y_test, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37                # stratified: ~20% of each class
    other = load_digits_32(seed=1, test_fraction=0.25)
    assert other.x_test.shape[0] == 450 and not torch.equal(other.y_test, digits.y_test[:450])
    again = load_digits_32(seed=0)
    assert torch.equal(again.x_test, digits.x_test) and torch.equal(again.y_train, digits.y_train)


def test_augment_is_seeded_deterministic_and_keeps_shape(digits):
    x = digits.x_train[:16]
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    c = augment(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, x)
    assert torch.allclose(augment(x, torch.Generator(), max_shift=0, max_rotation=0, scale=(1, 1)), x, atol=1e-5)


def test_augment_shifts_are_whole_pixels_within_three(digits):
    x = digits.x_train[:8]
    y = augment(x, torch.Generator().manual_seed(0), max_rotation=0, scale=(1, 1))
    for i in range(len(x)):
        # the image moved by (dy, dx) in [-3, 3]^2: the interior matches one such shift exactly
        hits = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                if torch.allclose(y[i, :, 4:28, 4:28], x[i, :, 4 - dy:28 - dy, 4 - dx:28 - dx], atol=1e-4)]
        assert hits, f"image {i} is not a whole-pixel shift of at most 3"


def test_resnet20_is_the_cifar_topology():
    model = resnet20()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 18 + 2                                 # stem, 9 blocks x 2, two projections
    assert sorted({c.out_channels for c in convs}) == [16, 32, 64]
    assert sum(1 for c in convs if c.kernel_size == (1, 1)) == 2
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert resnet20(width=0.5, num_classes=7)(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
    assert max(m.out_channels for m in resnet20(width=0.5).modules() if isinstance(m, nn.Conv2d)) == 32


# --- (b) fine-tuning recovers what one-shot pruning loses ------------------------------------------

class TinyCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU layers (three with stride 2), global pool, a classifier."""

    def __init__(self, c: int = 16):
        super().__init__()

        def block(i, o, stride):
            return [nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.features = nn.Sequential(*block(3, c, 2), *block(c, 2 * c, 2), *block(2 * c, 2 * c, 1),
                                      *block(2 * c, 2 * c, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x):
        return self.fc(self.features(x))


def one_shot_vs_finetuned(model, data, recipe, seed: int, sparsity: float = 0.5):
    """(dense, one-shot L1, L1 + fine-tuning) top-1 on the held-out split, with the benchmark's code."""
    tp = _bench()
    torch.use_deterministic_algorithms(True)
    trainer = tp.Trainer(data, recipe, seed)
    tp.train_dense(model, trainer, progress=False)
    dense = tp.top1(model, data.x_test, data.y_test)
    pruned = copy.deepcopy(model)
    op.L1FilterPruner(pruned, [{"sparsity": sparsity, "op_types": ["Conv2d"]}], dummy_input=data.x_test[:1]).compress()
    one_shot = tp.top1(pruned, data.x_test, data.y_test)
    trainer.reseed(seed + 1)
    trainer.run(pruned, recipe.finetune_epochs * trainer.steps_per_epoch, recipe.finetune_lr, progress=False)
    return dense, one_shot, tp.top1(pruned, data.x_test, data.y_test)


def test_l1_with_finetuning_beats_one_shot_l1_at_half_sparsity(digits, one_thread):
    # Measured (seed 0, one thread, ~12 s): dense 98.9 %, one-shot L1 @0.5 13.1 %, fine-tuned (3 epochs)
    # 97.8 %; seed 1: 99.4 / 13.6 / 97.2; seed 2: 98.9 / 10.0 / 96.4. Asserted: a margin of 40 points and
    # fine-tuning to >= 90 %.
    torch.manual_seed(0)
    recipe = _bench().Recipe(epochs=6, finetune_epochs=3, warmup_epochs=1)
    dense, one_shot, tuned = one_shot_vs_finetuned(TinyCNN(), digits, recipe, seed=0)
    assert dense >= 0.95, dense
    assert tuned - one_shot >= 0.40, (dense, one_shot, tuned)
    assert tuned >= 0.90, (dense, one_shot, tuned)


@pytest.mark.slow
def test_l1_with_finetuning_beats_one_shot_l1_on_resnet20(digits):
    # The benchmark's own recipe on ResNet-20 at width 1.0 (a few minutes on 2 cores): see
    # benchmarks/train_prune.py's table for the measured numbers.
    torch.manual_seed(0)
    recipe = _bench().Recipe()
    dense, one_shot, tuned = one_shot_vs_finetuned(resnet20(), digits, recipe, seed=0)
    assert dense >= 0.97, dense
    assert tuned - one_shot >= 0.10, (dense, one_shot, tuned)
    assert tuned >= dense - 0.02, (dense, one_shot, tuned)


# --- (c) the benchmark runs end to end -------------------------------------------------------------

def test_benchmark_quick_runs_end_to_end(tmp_path):
    # no wall-clock assertion: speed is the benchmark's to report (it prints its wall time), and
    # a shared CI machine made a < 90 s bound fail; the timeout only guards against a hang
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(tmp_path), "--no-progress"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for model in ("resnet20", "mobilenet_v2"):
        assert f"### {model}" in proc.stdout
    assert "| L1FilterPruner |" in proc.stdout and "command: `python benchmarks/train_prune.py --quick" in proc.stdout
    with open(tmp_path / "train_prune.csv") as f:
        rows = list(csv.DictReader(f))
    keys = {(r["model"], r["key"]) for r in rows}
    assert {("resnet20", "dense"), ("resnet20", "l1"), ("mobilenet_v2", "l1-oneshot"), ("mobilenet_v2", "level")} <= keys
    l1 = next(r for r in rows if r["model"] == "resnet20" and r["key"] == "l1")
    assert float(l1["macs_ratio"]) < 0.9 and not l1["error"]
    if importlib.util.find_spec("matplotlib") is not None:      # the plot needs matplotlib (the bench extra)
        assert (tmp_path / "train_prune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
