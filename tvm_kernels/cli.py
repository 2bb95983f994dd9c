"""model_tune command line: see `model_tune --help`."""

from __future__ import annotations

import argparse
import os
import sys

from onnxprune import __version__, checks
from onnxprune.cli import EXIT_CODES, Parser, emit, flag
from onnxprune.errors import OnnxPruneError

from .api import InputError, ParityError, model_tune


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="model_tune",
        description="Run a 1xN-pruned ONNX model with TVM block-sparse (BSR) conv kernels, "
                    "tuned for CPU, checked against onnxruntime and timed.",
        epilog="Convs with enough block sparsity run on our BSR kernel, depthwise convs on our "
               "depthwise kernel (a 1x1 BSR conv feeding only a depthwise conv shares one "
               "kernel with it), a conv of at most 4 input channels (a stem) on our direct kernel, "
               "a classifier's matmul by a constant matrix on our GEMV kernel; bias, "
               "residual adds and ReLU/ReLU6/Clip are fused into them. "
               "meta_schedule tunes everything else; the output names each conv's kernel and "
               "the reason a conv stayed with TVM. " + EXIT_CODES.replace(
                   "the parity check failed (nothing written)", "the compiled model differs from onnxruntime"))
    p.add_argument("--version", action="version", version=f"model_tune (onnxprune) {__version__}")
    p.add_argument("--onnx_path", "--onnx-path", dest="onnx_path", required=True)
    p.add_argument("--bsr", type=flag(checks.positive_int, "--bsr"), default=4,
                   help="block rows: N consecutive output channels")
    p.add_argument("--bsc", type=flag(checks.positive_int, "--bsc"), default=1, help="block columns: input positions")
    p.add_argument("--sparsity", type=flag(checks.sparsity, "--sparsity"), default=0.7,
                   help="convert convs with at least this block sparsity (and prune to it)")
    p.add_argument("--prune", action="store_true", help="apply 1xN block pruning first")
    p.add_argument("--balanced", action="store_true",
                   help="with --prune: the same number of blocks in every block row (static loop bounds in the "
                        "BSR kernel, an even split across threads; ranks blocks within rows, not the layer)")
    p.add_argument("--trials", type=flag(checks.non_negative_int, "--trials"), default=256,
                   help="meta_schedule trial budget (0: reuse the database in --work-dir only)")
    p.add_argument("--target", default=None,
                   help='TVM target as JSON, e.g. \'{"kind":"llvm","mcpu":"znver4","num-cores":2}\''
                        " (default: this CPU)")
    p.add_argument("--work-dir", "--work_dir", dest="work_dir", default="tuned",
                   help="tuning database and outputs; reused by the next run")
    p.add_argument("--output", default=None, help="compiled library, .so or .tar (default WORK_DIR/model_bsr.so)")
    p.add_argument("--rpc-tracker", default=None, help="HOST:PORT of a TVM RPC tracker")
    p.add_argument("--rpc-key", default=None, help="device key registered with the tracker")
    p.add_argument("--no-dense-baseline", action="store_true",
                   help="skip tuning/timing the dense TVM model")
    p.add_argument("--rounds", type=flag(checks.positive_int, "--rounds"), default=15, help="interleaved timing rounds")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help, --version, or a one-line usage error (exit 2)
        return int(e.code or 0)
    try:
        result = model_tune(
            args.onnx_path, args.bsr, args.bsc, args.sparsity, prune=args.prune, balanced=args.balanced,
            trials=args.trials, target=args.target, work_dir=args.work_dir, output=args.output,
            rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key,
            dense_baseline=not args.no_dense_baseline, rounds=args.rounds, verbose=not args.quiet)
    except (InputError, OnnxPruneError) as e:
        return fail(f"error: {e}", 2)
    except ParityError as e:
        return fail(f"PARITY FAILURE vs onnxruntime: {e}", 1)
    except OSError as e:  # the file system said no (a full disk, a permission): not our bug
        where = f" {e.filename}" if e.filename else ""
        return fail(f"error: cannot read or write{where}: {e.strerror or e}", 2)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except Exception as e:  # one line, not a traceback; MODEL_TUNE_DEBUG=1 shows it
        if os.environ.get("MODEL_TUNE_DEBUG"):
            raise
        last = (str(e).strip().splitlines() or [""])[-1]
        return fail(f"internal error: {type(e).__name__}: {last} (MODEL_TUNE_DEBUG=1 shows the traceback; "
                    "please report it)", 3)
    lines = []
    for tag, items in (("pruned", result.pruned), ("direct", result.direct), ("sparse", result.converted),
                       ("dw", result.depthwise), ("gemv", result.gemv), ("tvm", result.skipped)):
        lines.extend(f"{tag:8}{line}" for line in items)
    emit("\n".join(lines + [result.table]))
    return 0


def fail(message: str, code: int) -> int:
    try:
        print(f"model_tune: {message}", file=sys.stderr, flush=True)
    except BrokenPipeError:
        pass
    return code


if __name__ == "__main__":
    sys.exit(main())
