"""Measured, never asserted: what removing dead attention heads and MLP neurons buys on onnxruntime.

Three transformer block types (models/transformers.py building blocks, seeded random weights, eval
mode, float activations [1, seq, hidden] in and out), each at every --seqs:

    vit    ViT-S-like: hidden 384, 6 heads of 64, fused qkv, GELU MLP 1536, pre-norm LayerNorm
    bert   BERT-base-like: hidden 768, 12 heads of 64, separate q / k / v, additive attention-mask
           bias (a second input [1, 1, 1, seq]), GELU MLP 3072, post-norm LayerNorm
    llama  LLaMA-like: hidden 512, 8 query heads of 64 sharing 4 k / v heads (GQA), rotary, causal,
           SwiGLU MLP 1408, RMSNorm

--blocks blocks deep. Half of every attention's heads are made dead (`zero_head_contributions`,
part="values": their v weight rows zeroed, biases kept; in GQA whole groups, a k / v head with its
query heads) and half of every MLP's neurons zeroed (`zero_mlp_neurons`): the *masked* model has
the dense model's shapes. `onnxprune.simplify(masked, align=1)` removes them: the *simplified*
model. Both are exported once per sequence length (fixed shapes) and:

- checked for parity on onnxruntime (optimizations off; max |simplified - masked| / max |masked|
  must be <= --tolerance, else the benchmark stops with an error);
- timed on onnxruntime (graph optimizations on, --threads intra-op threads, default 1; the runs
  of the two models interleaved, `onnxprune.timing.time_models`; medians; speedup = median
  masked ms / median simplified ms);
- counted: MACs of the layers with constant weights (`onnxprune.report.ModelStats.of`, so
  the activation x activation MatMuls q.kT and attn.v are not in it; the "attn MACs" column adds
  them, from shape inference), parameters, and the attention heads (axis 1 of every Softmax's
  input, as shape inference finds it).

A block whose heads were not removed lists `report.classes["pinned"]` under the table.

    python benchmarks/transformer_heads.py                     # all blocks, seq 128 and 512
    python benchmarks/transformer_heads.py --quick             # smoke run: seq 128, 1 block, few runs
    python benchmarks/transformer_heads.py --block-types llama --seqs 256 --runs 50 --threads 2

Markdown on stdout; JSON and PNG (speedup vs MAC ratio) in --out (default benchmarks/results/,
git-ignored). The PNG needs matplotlib and is skipped without it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from onnxprune import simplify  # noqa: E402
from onnxprune.graph import static_shapes  # noqa: E402
from onnxprune.models.transformers import (  # noqa: E402
    FusedQKVAttention, GeluMLP, GroupedQueryAttention, PostNormBlock, PreNormBlock, RMSNorm, SeparateQKVAttention,
    SwiGLU, zero_head_contributions, zero_mlp_neurons)
from onnxprune.parity import session  # noqa: E402
from onnxprune.report import ModelStats  # noqa: E402
from onnxprune.timing import time_models  # noqa: E402

HEAD_DIM = 64
SEQS = (128, 512)
SPARSITY = 0.5  # of the heads (k / v groups in GQA) and of the MLP neurons


# --- the blocks ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockType:
    name: str
    label: str
    hidden: int
    heads: int      # query heads, HEAD_DIM wide
    kv_heads: int   # k / v heads (== heads without GQA)
    mlp: int
    make: Callable[[int], nn.Module]   # make(seq) -> one block
    mask_bias: bool = False            # forward(x, mask_bias [1, 1, 1, seq])


def _vit(seq: int) -> nn.Module:
    return PreNormBlock(FusedQKVAttention(384, 6, d=HEAD_DIM), GeluMLP(384, 1536), lambda: nn.LayerNorm(384))


def _bert(seq: int) -> nn.Module:
    block = PostNormBlock(768, 12, 3072)
    block.attn = SeparateQKVAttention(768, 12, d=HEAD_DIM)  # (PostNormBlock's own has the test head size)
    return block


def _llama(seq: int) -> nn.Module:
    return PreNormBlock(GroupedQueryAttention(512, 8, 4, seq, d=HEAD_DIM), SwiGLU(512, 1408), lambda: RMSNorm(512))


BLOCKS = {b.name: b for b in (
    BlockType("vit", "ViT-S (pre-LN, fused qkv, GELU)", 384, 6, 6, 1536, _vit),
    BlockType("bert", "BERT-base (post-LN, q/k/v, mask bias, GELU)", 768, 12, 12, 3072, _bert, mask_bias=True),
    BlockType("llama", "LLaMA (RMSNorm, GQA 8/4, rotary, causal, SwiGLU)", 512, 8, 4, 1408, _llama),
)}


class Stack(nn.Module):
    """`depth` blocks; forward(x) or forward(x, mask_bias) (the bias goes to every block)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, *extra):
        for block in self.blocks:
            x = block(x, *extra)
        return x


@torch.no_grad()
def build(kind: BlockType, seq: int, depth: int, seed: int) -> nn.Module:
    """Seeded: default Linear init, norm weights U[0.5, 1.5] and LayerNorm biases N(0, 0.2) (no
    identity affine), then the masks. The same weights at every seq (only the rotary and causal
    tables depend on it)."""
    torch.manual_seed(seed)
    model = Stack([kind.make(seq) for _ in range(depth)]).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, RMSNorm)):
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
    zero_head_contributions(model, SPARSITY, seed=seed, part="values")
    zero_mlp_neurons(model, SPARSITY, seed=seed)
    return model


def example_inputs(kind: BlockType, seq: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, seq, kind.hidden), generator=gen)
    if not kind.mask_bias:
        return (x,)
    bias = torch.zeros(1, 1, 1, seq)
    bias[..., -seq // 8:] = -1e4  # the last eighth of the tokens is padding
    return x, bias


# --- export and measures ------------------------------------------------------------------------

def export(model: nn.Module, inputs: tuple, exporter: str) -> tuple[onnx.ModelProto, str]:
    """(model, the exporter that made it): dynamo, or TorchScript at opset 17 where dynamo fails
    (or was asked for). The exporters' chatter is swallowed."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            try:
                return torch.onnx.export(model, inputs, dynamo=True, verbose=False).model_proto, "dynamo"
            except Exception as e:  # noqa: BLE001 -- fall back, and say so in the table
                print(f"dynamo export failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); torchscript",
                      file=sys.__stderr__)
        names = [f"input{i}" for i in range(len(inputs))]
        buf = io.BytesIO()
        torch.onnx.export(model, inputs, buf, dynamo=False, opset_version=17, input_names=names)
        return onnx.load_from_string(buf.getvalue()), "torchscript"


def feeds(model: onnx.ModelProto, inputs: tuple) -> dict[str, np.ndarray]:
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    assert len(names) == len(inputs), (names, len(inputs))
    return {n: t.numpy() for n, t in zip(names, inputs)}


def parity(masked: onnx.ModelProto, small: onnx.ModelProto, feed: dict) -> float:
    """max |small - masked| / max |masked| over every output, onnxruntime with optimizations off."""
    ref = session(masked, threads=0).run(None, feed)
    out = session(small, threads=0).run(None, feed)
    worst = 0.0
    for r, o in zip(ref, out):
        r, o = np.asarray(r, np.float64), np.asarray(o, np.float64)
        if r.shape != o.shape:
            return float("inf")
        worst = max(worst, float(np.abs(o - r).max() / max(np.abs(r).max(), np.finfo(np.float64).tiny)))
    return worst


def heads(model: onnx.ModelProto) -> list[int]:
    """The head count of every attention: axis 1 of each Softmax's input [B, h, N, N]."""
    shapes = static_shapes(model)
    return [shapes.get(n.input[0], (None, None))[1] for n in model.graph.node if n.op_type == "Softmax"]


def activation_matmul_macs(model: onnx.ModelProto) -> int:
    """MACs of the MatMuls whose both operands are computed (q.kT and attn.v): output size x the
    contracted dim, from shape inference (an unknown batch dim counts as 1: the inputs have batch 1)."""
    shapes, inits = static_shapes(model), {t.name for t in model.graph.initializer}
    const = set(inits) | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    total = 0
    for n in model.graph.node:
        if n.op_type != "MatMul" or n.input[0] in const or n.input[1] in const:
            continue
        a, y = shapes.get(n.input[0]), shapes.get(n.output[0])
        if a and y:
            y = (1 if y[0] is None else y[0], *y[1:])  # batch 1 (TorchScript's reshapes may leave it unknown)
            if all(isinstance(d, int) for d in (a[-1], *y)):
                total += int(np.prod(y)) * a[-1]
    return total


def measure(kind: BlockType, seq: int, args, bar) -> dict:
    def stage(what):
        bar.set_postfix_str(f"{kind.name} seq {seq}: {what}")

    stage("export")
    model = build(kind, seq, args.blocks, args.seed)
    inputs = example_inputs(kind, seq, args.seed)
    masked, exporter = export(model, inputs, args.exporter)
    feed = feeds(masked, inputs)
    stage("simplify")
    t = time.perf_counter()
    small, report = simplify(masked, align=1, inputs=[feed])
    simplify_s = time.perf_counter() - t
    err = parity(masked, small, feed)
    if not err <= args.tolerance:
        raise SystemExit(f"PARITY FAILED: {kind.name} seq {seq}: max |simplified - masked| / max |masked| = {err:.3g} "
                         f"> {args.tolerance:g}")
    before, after = ModelStats.of(masked), ModelStats.of(small)
    attn_before, attn_after = activation_matmul_macs(masked), activation_matmul_macs(small)
    stage(f"timing {args.runs} runs")
    times = time_models({"masked": masked, "simplified": small}, threads=args.threads, runs=args.runs, samples=True)
    ms = {k: float(np.median(v)) for k, v in times.items()}
    per_run = float(np.median(np.array(times["masked"]) / np.array(times["simplified"])))
    return {
        "block": kind.name, "seq": seq, "depth": args.blocks, "exporter": exporter, "threads": args.threads,
        "runs": args.runs, "masked_ms": ms["masked"], "simplified_ms": ms["simplified"],
        "speedup": ms["masked"] / ms["simplified"], "speedup_per_run_median": per_run,
        "macs_masked": before.macs, "macs_simplified": after.macs, "mac_ratio": before.macs / max(after.macs, 1),
        "attn_macs_masked": attn_before, "attn_macs_simplified": attn_after,
        "total_mac_ratio": (before.macs + attn_before) / max(after.macs + attn_after, 1),
        "params_masked": before.params, "params_simplified": after.params,
        "heads_masked": heads(masked), "heads_simplified": heads(small), "heads_expected": kind.heads,
        "parity_rel_err": err, "simplify_s": simplify_s, "pinned": report.classes.get("pinned", {}),
        "blocked": report.classes.get("blocked", {}),
    }


# --- output -------------------------------------------------------------------------------------

def _heads_cell(h: list) -> str:
    return str(h[0]) if h and len(set(h)) == 1 else "/".join(map(str, h)) or "-"


def markdown(rows: list[dict]) -> str:
    lines = ["| block | seq | masked ms | simplified ms | speedup | MAC ratio | MAC ratio incl. attn | "
             "params masked -> simplified | heads | parity (rel) | simplify s |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['block']} | {r['seq']} | {r['masked_ms']:.2f} | {r['simplified_ms']:.2f} | {r['speedup']:.2f}x | "
            f"{r['mac_ratio']:.2f}x | {r['total_mac_ratio']:.2f}x | {r['params_masked']:,} -> {r['params_simplified']:,} "
            f"({r['params_masked'] / max(r['params_simplified'], 1):.2f}x) | "
            f"{_heads_cell(r['heads_masked'])} -> {_heads_cell(r['heads_simplified'])} | {r['parity_rel_err']:.1e} | "
            f"{r['simplify_s']:.1f} |")
    return "\n".join(lines)


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['block']}\nseq {r['seq']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows)), 3.8))
    ax.bar(x - 0.2, [r["speedup"] for r in rows], 0.4, label=f"measured speedup (ORT, {rows[0]['threads']} thread)")
    ax.bar(x + 0.2, [r["total_mac_ratio"] for r in rows], 0.4, label="MAC ratio (incl. attention MatMuls)")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("masked / simplified")
    ax.set_title(f"{SPARSITY:.0%} heads + {SPARSITY:.0%} MLP neurons removed, {rows[0]['depth']} block(s)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block-types", nargs="+", choices=list(BLOCKS), default=list(BLOCKS), dest="block_types",
                    help="which blocks (default: all)")
    ap.add_argument("--seqs", type=int, nargs="+", help=f"sequence lengths (default {' '.join(map(str, SEQS))}; "
                    "--quick: 128)")
    ap.add_argument("--blocks", type=int, help="blocks per model (default 2; --quick: 1)")
    ap.add_argument("--runs", type=int, help="interleaved timing runs per model (default 100; --quick: 20)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads when timing (default 1)")
    ap.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                    help="torch.onnx exporter (dynamo falls back to torchscript, opset 17, if it fails)")
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="parity: the largest |simplified - masked| / max |masked| allowed (default 1e-4)")
    ap.add_argument("--seed", type=int, default=0, help="weights, masks and inputs")
    ap.add_argument("--quick", action="store_true", help="smoke run, under a minute: seq 128, 1 block, 20 runs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                    help="folder for transformer_heads.json and .png (default benchmarks/results/)")
    ap.add_argument("--no-save", action="store_true", help="write no JSON / PNG")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = ap.parse_args(argv)
    args.seqs = args.seqs or ([128] if args.quick else list(SEQS))
    args.blocks = args.blocks or (1 if args.quick else 2)
    args.runs = args.runs or (20 if args.quick else 100)
    return args


def main(argv=None) -> int:
    start = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/transformer_heads.py", *argv])
    jobs = [(BLOCKS[b], s) for b in args.block_types for s in args.seqs]
    rows = []
    with tqdm(jobs, desc="transformer_heads", disable=args.no_progress, file=sys.stderr) as bar:
        for kind, seq in bar:
            rows.append(measure(kind, seq, args, bar))
    exporters = sorted({r["exporter"] for r in rows})
    print(f"# attention heads and MLP neurons removed: {SPARSITY:.0%} of each zeroed (heads: v rows, biases kept), "
          f"`simplify(align=1)`; {args.blocks} block(s), batch 1; onnxruntime {args.threads} thread(s), "
          f"{args.runs} interleaved runs, medians; exporter: {', '.join(exporters)}\n")
    print(f"command: `{command}`\n")
    for kind in dict.fromkeys(k for k, _ in jobs):
        print(f"- {kind.name}: {kind.label}; hidden {kind.hidden}, {kind.heads} heads of {HEAD_DIM}"
              + (f" ({kind.kv_heads} k/v heads)" if kind.kv_heads != kind.heads else "") + f", MLP {kind.mlp}")
    print("\nMAC ratio: layers with constant weights (ModelStats.macs); incl. attn: plus q.kT and attn.v. "
          "heads: axis 1 of the Softmax inputs. parity: max |simplified - masked| / max |masked|.\n")
    print(markdown(rows))
    for r in rows:
        if any(h != r["heads_expected"] * (1 - SPARSITY) for h in r["heads_simplified"]):
            print(f"\n{r['block']} seq {r['seq']}: heads NOT all removed ({_heads_cell(r['heads_masked'])} -> "
                  f"{_heads_cell(r['heads_simplified'])}); pinned: {r['pinned']}; kept: {r['blocked']}")
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "transformer_heads.json"
        path.write_text(json.dumps({"command": command, "rows": rows}, indent=1))
        print(f"\nJSON: {path}")
        try:
            plot(args.out / "transformer_heads.png", rows)
            print(f"PNG: {args.out / 'transformer_heads.png'}")
        except ImportError:
            print("PNG: skipped (matplotlib is not installed: pip install matplotlib)")
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
