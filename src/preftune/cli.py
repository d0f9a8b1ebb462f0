"""The ``preftune`` command: ``preftune sft|dpo [CONFIG.yaml] [key=value ...]``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: preftune {sft,dpo} [CONFIG.yaml] [key=value ...] [--debug]
       preftune {sft,dpo} --help
       preftune --version
       preftune demo [key=value ...]
       preftune report OUTPUT_DIR
       preftune data {inspect,convert} DATASET ... (see preftune data --help)
       preftune eval [RUN_DIR] [key=value ...]    preftune pairs key=value ...

  sft   supervised fine-tuning on prompt + chosen response (makes the reference)
  dpo   preference optimisation: DPO or a related loss (loss=, listed by preftune dpo --help)
  demo  the built-in demo: DPO on SmolLM2-135M-Instruct with generated sentiment pairs
  report  plots and an HTML page from a run folder (training writes one at the end)
  data  inspect a preference dataset (pairs, skipped rows, lengths, truncation) or
        convert it to explicit prompt/chosen/rejected JSON lines
  eval  sample policy and reference, score: win rate, mean scores, KL, lengths (eval.json)
  pairs preference pairs from a model's own samples ranked by a scorer (JSON lines)

Keys come from the YAML file and/or key=value overrides (overrides win).
--debug shows the full traceback of an error."""

DEMO_USAGE = """usage: preftune demo [key=value ...] [--debug]

DPO of SmolLM2-135M-Instruct on generated controlled-sentiment pairs, offline, from the recipe
src/preftune/recipes/demo.yaml, into runs/demo-<time>/; then held-out reward accuracy and
margin and a word lexicon's score of policy and reference completions. key=value overrides
are those of preftune dpo (see preftune dpo --help), e.g. max_steps=12."""


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # the reader went away (`preftune dpo --help | head`): not an error
        _silence_stdout()
        return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's flush at exit does not fail again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (a test's capture)
        pass
    finally:
        os.close(devnull)


def _main(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from . import __version__

        print(f"preftune {__version__}")
        return 0
    command, rest = args[0], args[1:]
    debug = "--debug" in rest
    rest = [a for a in rest if a != "--debug"]
    if command == "report":
        from .report import main as report_main

        return report_main(rest)
    if command == "data":
        from .data.cli import main as data_main

        return data_main([*rest, "--debug"] if debug else rest)
    if command in ("eval", "pairs"):  # sampled completions, scored (preftune.evalgen, .pairs)
        from .evalgen import main as evalgen_main

        return evalgen_main(command, rest, debug)
    demo = command == "demo"
    if demo and any(a in ("-h", "--help") for a in rest):
        print(DEMO_USAGE)
        return 0
    typed, user_args = command, rest
    if demo:
        from .demo import demo_args

        command, rest = "dpo", demo_args(rest)
    if command not in ("sft", "dpo"):
        print(f"preftune: error: unknown command {command!r} (choose sft, dpo, demo, report, "
              "data, eval or pairs)", file=sys.stderr)
        return 2

    # Imported here so that `--help` and config errors answer without loading torch.
    from .config import ConfigError, config_help, parse_config, stage_config

    cls = stage_config(command)
    if any(a in ("-h", "--help") for a in rest):
        print(f"usage: preftune {command} [CONFIG.yaml] [key=value ...] [--debug]\n")
        print(config_help(cls))
        return 0
    try:
        cfg = parse_config(cls, rest)
    except ConfigError as e:
        return _fail(e, debug)

    from .tracking import quiet_third_party

    quiet_third_party()
    from .checkpoint import CheckpointError
    from .data import DataError
    from .models import ModelError
    from .train import TrainingError, resolve, train

    cfg = resolve(cfg)  # output_dir fixed here, so an interrupt can name it
    try:
        out = train(cfg)
    except (ConfigError, DataError, ModelError, CheckpointError) as e:
        return _fail(e, debug)
    except TrainingError as e:  # the run itself failed, not its input: status 1
        return _fail(e, debug, status=1)
    except KeyboardInterrupt:
        from .tracking import end_progress_bars

        end_progress_bars()
        print(interrupted_message(typed, user_args, cfg.output_dir), file=sys.stderr)
        return 130
    if demo:
        from .demo import print_summary, summarize

        print_summary(summarize(out))
    return 0


def interrupted_message(command: str, args: list[str], output_dir: str) -> str:
    """What an interrupted run says: the checkpoint it can continue from, and the command
    that does (the same arguments, with this run's output_dir and resume=true)."""
    import shlex
    from pathlib import Path

    from .checkpoint import latest_checkpoint

    out = Path(output_dir)
    found = latest_checkpoint(out) if out.is_dir() else None
    if found is None:
        return "preftune: interrupted before the first checkpoint; nothing to resume from yet"
    kept = [a for a in args if not a.startswith(("resume=", "output_dir="))]
    again = shlex.join(["preftune", command, *kept, f"output_dir={output_dir}", "resume=true"])
    return (f"preftune: interrupted; the latest checkpoint is {found}. Continue with:\n"
            f"  {again}")


def _fail(error: Exception, debug: bool, status: int = 2) -> int:
    """Print ``error`` as exactly one line (control characters escaped) after ending any
    progress bar still on the line."""
    from .config import one_line
    from .tracking import end_progress_bars

    end_progress_bars()
    if debug:
        raise error
    print(f"preftune: error: {one_line(str(error))}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
