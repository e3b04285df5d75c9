"""The `refsim` command line: the one layer that may import every other.

Each subcommand lives in one module that defines `add_arguments(parser)` and
`main(args) -> int`; this file only lists them. A user mistake (a RefsimError or an
unreadable file) prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from refsim import __version__
from refsim.errors import RefsimError

# name -> (module, one-line help). Modules are imported only when their command runs,
# except for their argument definitions, which every module keeps import-light.
COMMANDS = {
    "run": ("refsim.cli.run", "run a .intq model on inputs and print its outputs"),
    "inspect": ("refsim.cli.inspect", "describe a .intq model: inputs, outputs, ops, sizes"),
    "golden": ("refsim.cli.golden", "write golden vectors (npy, memh, C, ITA) of every tensor a model computes"),
    "check": ("refsim.cli.check", "compare a hardware or simulator dump with a golden vector set"),
    "import": ("refsim.cli.import_", "import an already-quantized model (ONNX QDQ, QONNX, quantlib/Deeploy; TFLite int8/int16x8) as .intq"),
    "export": ("refsim.cli.export", "quantize a float ONNX model into a .intq integer model"),
    "compare": ("refsim.cli.compare", "compare float, fake-quant and integer models on data"),
    "sensitivity": ("refsim.cli.sensitivity", "measure each layer's sensitivity to its weight bit width (for export --bits-from)"),
    "report": ("refsim.cli.report", "write an HTML report: metrics, per-layer SQNR, sensitivities, histograms"),
    "warmup": ("refsim.cli.warmup", "compile the kernels of .intq models into the user cache now, not on their first run"),
    "convert": ("refsim.cli.convert", "write a .intq model as ONNX (refsim domain) to view in Netron; `refsim import` reads it back"),
}


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are reported like every other error: one line, exit status 2."""

    def error(self, message):
        self.exit(2, f"refsim: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="refsim",
        description="Bit-exact integer reference simulator for quantized transformers.",
    )
    parser.add_argument("--version", action="version", version=f"refsim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(_module=module)
    return parser


def error(message: str) -> int:
    if _interrupted:  # an error after a swallowed Ctrl-C (stdin closed, say) is the interrupt
        return _report_interrupt()
    print(f"refsim: error: {message}", file=sys.stderr)
    return 2


def _report_interrupt() -> int:
    print("refsim: interrupted", file=sys.stderr)
    if _exit_at_once:  # before the frames unwind: finalizing half-built LLVM objects can crash
        _flush_and_exit(130)
    return 130


def _flush_and_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv) == ["--version"]:  # before the command modules and NumPy load
        print(f"refsim {__version__}")
        return 0
    try:
        parser = build_parser()  # imports the command modules, and with them NumPy
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help(sys.stderr)
            return 2
        return int(args._module.main(args) or 0)
    except RefsimError as e:
        return error(str(e))
    except BrokenPipeError:  # pragma: no cover - e.g. `refsim run ... | head`
        return 0
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return error(f"{where}{e.strerror or e}")
    except KeyboardInterrupt:  # Ctrl-C, also while starting up (see refsim/__init__.py)
        return _report_interrupt()


# Ctrl-C in the `refsim` command. Python raises KeyboardInterrupt wherever the main thread
# is, and there a ctypes callback (llvmlite's, while Numba compiles), a finalizer or a
# library's bare `except:` can swallow it. So `console` remembers the SIGINT: a swallowed
# interrupt prints nothing, an error that follows it is reported as the interrupt, and a
# command that finished anyway exits 130. (Raising it again would be worse: a second
# interrupt inside LLVM's callbacks can crash the process.)
_interrupted = False
_exit_at_once = False  # set by console; main() called from Python returns 130 instead


def _on_sigint(signum, frame):
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def _unraisable(info) -> None:
    if not isinstance(info.exc_value, KeyboardInterrupt):  # that one console reports
        sys.__unraisablehook__(info)


def console() -> None:
    """The `refsim` command: main(), and after Ctrl-C an immediate exit. An interrupt can land
    while Numba's LLVM objects are half built; finalizing them prints tracebacks or crashes."""
    global _exit_at_once
    _exit_at_once = True
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _unraisable
    code = main()
    if _interrupted and code != 130:  # swallowed, and the command still finished
        code = _report_interrupt()
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    console()
