"""The ``preftune`` command: ``preftune sft|dpo [CONFIG.yaml] [key=value ...]``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: preftune {sft,dpo} [CONFIG.yaml] [key=value ...] [--debug]
       preftune {sft,dpo} --help
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


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
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

    from .checkpoint import CheckpointError
    from .data import DataError
    from .models import ModelError
    from .train import TrainingError, train

    try:
        out = train(cfg)
    except (ConfigError, DataError, ModelError, CheckpointError) as e:
        return _fail(e, debug)
    except TrainingError as e:  # the run itself failed, not its input: status 1
        return _fail(e, debug, status=1)
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130
    if demo:
        from .demo import print_summary, summarize

        print_summary(summarize(out))
    return 0


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
