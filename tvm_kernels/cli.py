"""model_tune command line: see `model_tune --help`."""

from __future__ import annotations

import argparse
import os
import sys

from .api import InputError, ParityError, model_tune


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="model_tune",
        description="Run a 1xN-pruned ONNX model with TVM block-sparse (BSR) conv kernels, "
                    "tuned for CPU, checked against onnxruntime and timed.",
        epilog="Convs with enough block sparsity run on our BSR kernel, depthwise convs on our "
               "depthwise kernel (a 1x1 BSR conv feeding only a depthwise conv shares one "
               "kernel with it); bias, residual adds and ReLU/ReLU6/Clip are fused into them. "
               "meta_schedule tunes everything else; the output names each conv's kernel and "
               "the reason a conv stayed with TVM. Exit codes: 0 ok, 1 parity failure or "
               "internal error, 2 bad input.")
    p.add_argument("--onnx_path", "--onnx-path", dest="onnx_path", required=True)
    p.add_argument("--bsr", type=int, default=4, help="block rows: N consecutive output channels")
    p.add_argument("--bsc", type=int, default=1, help="block columns: input positions")
    p.add_argument("--sparsity", type=float, default=0.7,
                   help="convert convs with at least this block sparsity (and prune to it)")
    p.add_argument("--prune", action="store_true", help="apply 1xN block pruning first")
    p.add_argument("--trials", type=int, default=256, help="meta_schedule trial budget")
    p.add_argument("--target", default=None,
                   help='TVM target as JSON, e.g. \'{"kind":"llvm","mcpu":"znver4","num-cores":2}\''
                        " (default: this CPU)")
    p.add_argument("--work-dir", "--work_dir", dest="work_dir", default="tuned",
                   help="tuning database and outputs; reused by the next run")
    p.add_argument("--output", default=None, help="compiled library (default WORK_DIR/model_bsr.so)")
    p.add_argument("--rpc-tracker", default=None, help="HOST:PORT of a TVM RPC tracker")
    p.add_argument("--rpc-key", default=None, help="device key registered with the tracker")
    p.add_argument("--no-dense-baseline", action="store_true",
                   help="skip tuning/timing the dense TVM model")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = model_tune(
            args.onnx_path, args.bsr, args.bsc, args.sparsity, prune=args.prune,
            trials=args.trials, target=args.target, work_dir=args.work_dir, output=args.output,
            rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key,
            dense_baseline=not args.no_dense_baseline, rounds=args.rounds, verbose=not args.quiet)
    except InputError as e:
        print(f"model_tune: error: {e}", file=sys.stderr)
        return 2
    except ParityError as e:
        print(f"model_tune: PARITY FAILURE vs onnxruntime: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # one line, not a traceback; MODEL_TUNE_DEBUG=1 shows it
        if os.environ.get("MODEL_TUNE_DEBUG"):
            raise
        last = (str(e).strip().splitlines() or [""])[-1]
        print(f"model_tune: failed: {type(e).__name__}: {last}", file=sys.stderr)
        return 1
    for line in result.pruned:
        print(f"pruned  {line}")
    for line in result.converted:
        print(f"sparse  {line}")
    for line in result.depthwise:
        print(f"dw      {line}")
    for line in result.skipped:
        print(f"tvm     {line}")
    print(result.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
