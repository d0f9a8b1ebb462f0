"""``preftune eval``: did a run work? The policy's own samples against the reference's.

Over the prompts of a dataset (or the held-out slice a run trained beside), ``n`` completions
per prompt are sampled from the policy and from the reference (temperature, top-p, seeded; the
same seed for both, so identical models give identical samples), scored by a scorer
(``preftune.scorers``), and summarised (``preftune.winrate``): the policy's win rate over the
reference with ties apart, each one's mean score with a 95% interval, the sequence
KL(policy || reference) from the policy's samples, and completion lengths. The result is
``eval.json`` (with every sample); for a run folder it also becomes a section of the report.
The reference's samples are cached (``reference_samples``): a sweep samples it once.

The prompt reading and sampling here serve ``preftune pairs`` (``preftune.pairs``) too.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .config import ConfigError, coerce_fields, config_help, option, parse_config, read_yaml
from .data.formats import Prompt


@dataclass
class Settings:
    """Keys of a command that samples from a model (shared by ``eval`` and ``pairs``)."""

    tokenizer: str | None = option("model", None, "tokenizer; null = the model's")
    dataset: str | None = option(
        "data", None, "prompts: a preference dataset (its prompts) or JSON lines with a 'prompt' "
        "field (text or messages)")
    dataset_format: str | None = option(
        "data", None, "row format of a preference dataset; null = detect")
    prompts: int | None = option(
        "data", 64, "distinct prompts used, in file order; null = all", "> 0")
    max_prompt_length: int | None = option(
        "data", None, "max prompt tokens; null = the run's, or 256")
    truncation: Literal["auto", "keep_end", "keep_start"] | None = option(
        "data", None, "prompt truncation; null = the run's, or auto")
    n: int = option("eval", 4, "completions sampled per prompt", "> 0")
    scorer: str = option("eval", "vader", "vader, reward_model:PATH or python:MODULE:FUNCTION")
    temperature: float = option("eval", 1.0, "sampling temperature (KL is exact at 1)", "> 0")
    top_p: float = option("eval", 1.0, "nucleus sampling mass in (0, 1] (KL is exact at 1)", "> 0")
    max_new_tokens: int = option("eval", 64, "max tokens per completion", "> 0")
    batch_size: int = option("run", 16, "completions per forward", "> 0")
    seed: int = option("run", 0, "sampling seed", "in [0, 4294967295]")
    device: Literal["auto", "cpu", "cuda"] = option("run", "auto", "auto = cuda if available")
    trust_remote_code: bool = option("run", False, "allow model code from the hub")

    def __post_init__(self) -> None:
        coerce_fields(self)
        if self.top_p > 1:
            raise ConfigError(f"top_p: expected a float in (0, 1], got {self.top_p}")


@dataclass
class EvalConfig(Settings):
    """``preftune eval [RUN_DIR] [key=value ...]``."""

    run: str | None = option(
        "model", None, "a run folder: its final/ against its reference, on its held-out prompts "
        "(keys given here win)")
    model: str | None = option("model", None, "policy (null = RUN/final)")
    reference: str | None = option("model", None, "reference (null = the run's reference)")
    held_out: bool | None = option(
        "data", None, "only the slice of dataset a run holds out for eval (eval_examples pairs); "
        "null = true for a run's own data")
    eval_examples: int = option(
        "data", 256, "size of that held-out slice (a run's: its own)", "> 0")
    output: str | None = option("eval", None, "eval.json path; null = RUN/eval.json or ./eval.json")


def resolve(cfg: EvalConfig) -> EvalConfig:
    """Fill what a run folder implies: its final/, reference, tokenizer, held-out prompts."""
    if cfg.run is None:
        if cfg.model is None or cfg.reference is None or cfg.dataset is None:
            raise ConfigError("eval needs a run folder (preftune eval RUN_DIR) or model=, "
                              "reference= and dataset=")
        return dataclasses.replace(cfg, held_out=bool(cfg.held_out),
                                   max_prompt_length=cfg.max_prompt_length or 256,
                                   truncation=cfg.truncation or "auto",
                                   output=cfg.output or "eval.json")
    run = Path(cfg.run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"run: {run} has no config.yaml (not a preftune run folder)")
    saved = read_yaml(run / "config.yaml")
    if cfg.model is None and not (run / "final").is_dir():
        raise ConfigError(f"run: {run} has no final/ (the run has not finished); give model=")
    own_data = cfg.dataset is None
    dataset = saved.get("eval_dataset") or saved.get("dataset") if own_data else cfg.dataset
    return dataclasses.replace(
        cfg, model=cfg.model or str(run / "final"),
        reference=cfg.reference or saved.get("reference") or saved.get("model"),
        tokenizer=cfg.tokenizer or (str(run / "final") if cfg.model is None else None),
        dataset=dataset, dataset_format=cfg.dataset_format or saved.get("dataset_format"),
        held_out=cfg.held_out if cfg.held_out is not None else (
            own_data and not saved.get("eval_dataset")),
        eval_examples=int(saved.get("eval_examples", cfg.eval_examples)),
        max_prompt_length=cfg.max_prompt_length or int(saved.get("max_prompt_length", 256)),
        truncation=cfg.truncation or saved.get("truncation", "auto"),
        output=cfg.output or str(run / "eval.json"))


# ---------------------------------------------------------------------------- prompts


def read_prompts(source: str, fmt: str | None, tokenizer, *, held_out: int | None = None,
                 limit: int | None = None) -> list[Prompt]:
    """Distinct prompts of ``source`` in file order (at most ``limit``): the prompts of a
    preference dataset (only its held-out slice of ``held_out`` pairs, if given, as
    ``train.held_out`` picks it), or of JSON lines holding a ``prompt`` field only."""
    from .data import load_pairs
    from .data.formats import read_prompt_rows
    from .data.tokenize import chat_template_check
    from .train import held_out as held_out_slice

    prompts = read_prompt_rows(source)
    if prompts is None:
        pairs, _ = load_pairs(source, fmt, quiet=True, check=chat_template_check(tokenizer))
        if held_out is not None:
            pairs = held_out_slice(pairs, held_out)[0]
        prompts = [p.prompt for p in pairs]
    seen, out = set(), []
    for prompt in prompts:
        key = json.dumps(prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(prompt)
    return out[:limit]


# ---------------------------------------------------------------------------- sampling


@dataclass
class Samples:
    """``n`` completions per prompt: token ids, texts, token counts and summed log-probs under
    each of the models asked for (all indexed [prompt][sample])."""

    tokens: list[list[list[int]]]
    texts: list[list[str]]
    logps: dict[str, list[list[float]]]

    @property
    def lengths(self) -> list[list[int]]:
        return [[len(t) for t in row] for row in self.tokens]


def sample_prompts(model, tokenizer, ids: Sequence[list[int]], cfg: Settings, device,
                   logp_models: dict[str, Any] | None = None) -> Samples:
    """Sample ``cfg.n`` completions of every prompt from ``model`` (seeded by ``cfg.seed``,
    ``cfg.batch_size`` completions per call) and score their tokens under ``logp_models``."""
    import torch

    from .data import pad_id_for
    from .evaluate import completion_logps, eos_ids, sample
    from .tracking import duration

    pad, eos = pad_id_for(tokenizer), eos_ids(model, tokenizer)
    rows = [i for i in range(len(ids)) for _ in range(cfg.n)]
    own = any(m is model for m in (logp_models or {}).values())  # its log-probs come free
    tokens: list[list[int]] = []
    logps: dict[str, list[float]] = {name: [] for name in logp_models or {}}
    torch.manual_seed(cfg.seed)
    begun, tenth = time.monotonic(), max(1, len(rows) // 10)
    for start in range(0, len(rows), cfg.batch_size):
        batch = [ids[i] for i in rows[start : start + cfg.batch_size]]
        width = max(len(p) for p in batch)
        prompt = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch],
                            device=device)
        new, new_mask, own_logps = sample(
            model, prompt, mask, max_new_tokens=cfg.max_new_tokens, pad_token_id=pad, eos=eos,
            temperature=cfg.temperature, top_p=cfg.top_p, logps=own)
        for name, scorer_model in (logp_models or {}).items():
            values = own_logps if scorer_model is model else \
                completion_logps(scorer_model, prompt, mask, new, new_mask)
            logps[name] += values.tolist()  # type: ignore[union-attr]
        for row, row_mask in zip(new.tolist(), new_mask.tolist(), strict=True):
            tokens.append([t for t, m in zip(row, row_mask, strict=True) if m])
        done = len(tokens)
        if done // tenth > (done - len(batch)) // tenth and done < len(rows):  # ~10 lines
            spent = time.monotonic() - begun
            print(f"  {done}/{len(rows)} completions, {duration(spent)} elapsed, about "
                  f"{duration(spent * (len(rows) - done) / done)} left", file=sys.stderr)

    def per_prompt(values: list) -> list[list]:
        return [values[i : i + cfg.n] for i in range(0, len(values), cfg.n)]

    return decoded(tokenizer, per_prompt(tokens), {name: per_prompt(v) for name, v in
                                                   logps.items()})


def decoded(tokenizer, tokens: list[list[list[int]]],
            logps: dict[str, list[list[float]]] | None = None) -> Samples:
    """``Samples`` of completion token ids ([prompt][sample]), their texts decoded."""
    texts = [[tokenizer.decode(t, skip_special_tokens=True) for t in row] for row in tokens]
    return Samples(tokens, texts, logps or {})


# A reference is often evaluated against many times with the same prompts and settings (each run
# of a sweep, each eval of a run): its samples are stored once, as token ids, under a digest of
# everything that decides them.
SAMPLES_FORMAT = 2  # 2: a shared prompt prefill (other rounding than 1)


def samples_key(model, tokenizer, ids: Sequence[list[int]], cfg: Settings, device) -> str:
    """A hex digest of what decides ``sample_prompts``'s output without ``logp_models``: the
    model's weights, the prompt tokens, the sampling settings and seed, the batch size (it
    orders the random draws), the end and pad tokens, the device type and the library
    versions (their sampling code)."""
    import hashlib

    import torch
    import transformers

    from .data import pad_id_for
    from .evaluate import eos_ids
    from .reference import weights_digest

    settings = {"format": SAMPLES_FORMAT, "n": cfg.n, "temperature": cfg.temperature,
                "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
                "batch_size": cfg.batch_size, "eos": eos_ids(model, tokenizer),
                "pad": pad_id_for(tokenizer), "device": torch.device(device).type,
                "torch": torch.__version__, "transformers": transformers.__version__}
    h = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=20)
    h.update(weights_digest(model))
    h.update(json.dumps([list(p) for p in ids]).encode())
    return h.hexdigest()


def reference_samples(model, tokenizer, ids: Sequence[list[int]], cfg: Settings,
                      device) -> Samples:
    """``sample_prompts(model, ...)`` (no log-probs), read back from the cache when the same
    weights sampled the same prompt tokens with the same settings before, else sampled and
    stored (``$XDG_CACHE_HOME/preftune/reference-samples``). A damaged entry is resampled."""
    from .models import cache_dir
    from .tracking import warn

    key = samples_key(model, tokenizer, ids, cfg, device)
    path = cache_dir() / "reference-samples" / f"{key}.json"
    tokens, problem = _read_samples(path, len(ids), cfg.n) if path.is_file() else (None, "")
    if tokens is not None:
        print(f"reference samples: from cache ({path})", file=sys.stderr)
        return decoded(tokenizer, tokens)
    if problem:
        warn(f"{path}: damaged reference sample cache entry ({problem}); sampling again")
    samples = sample_prompts(model, tokenizer, ids, cfg, device)
    try:
        write_json(path, {"format": SAMPLES_FORMAT, "tokens": samples.tokens})
    except OSError as e:  # costs only the reuse
        warn(f"cannot write the reference sample cache in {path.parent} "
             f"({e.strerror or e}); going on without it")
    return samples


def _read_samples(path: Path, prompts: int, n: int) -> tuple[list | None, str]:
    """The token ids of a cache entry ([prompt][sample]), or None and what is wrong."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"unreadable: {' '.join(str(e).split())[:120]}"
    tokens = entry.get("tokens") if isinstance(entry, dict) else None
    if not (isinstance(tokens, list) and len(tokens) == prompts
            and all(isinstance(row, list) and len(row) == n for row in tokens)
            and all(isinstance(t, list) and all(type(i) is int for i in t)
                    for row in tokens for t in row)):
        return None, f"expected token ids of {n} samples of each of {prompts} prompts"
    return tokens, ""


def device_for(setting: str):
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no CUDA device is available")
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(auto if setting == "auto" else setting)


def load_policy_model(name: str, cfg: Settings, device):
    from .models import load_model

    return load_model(name, trust_remote_code=cfg.trust_remote_code).to(device).eval()


# ---------------------------------------------------------------------------- eval


def evaluate_generations(cfg: EvalConfig) -> dict[str, Any]:
    """Run the eval of a resolved config and return what eval.json holds."""
    from .models import load_tokenizer
    from .scorers import load_scorer
    from .winrate import kl_estimate, mean_interval, win_rate

    device = device_for(cfg.device)
    scorer = load_scorer(cfg.scorer, device=str(device), batch_size=cfg.batch_size)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model,
                               trust_remote_code=cfg.trust_remote_code)
    prompts = read_prompts(cfg.dataset, cfg.dataset_format, tokenizer, limit=cfg.prompts,
                           held_out=cfg.eval_examples if cfg.held_out else None)
    from .data.tokenize import tokenize_prompt

    ids = [tokenize_prompt(p, tokenizer, cfg.max_prompt_length, cfg.truncation) for p in prompts]
    policy = load_policy_model(cfg.model, cfg, device)
    reference = load_policy_model(cfg.reference, cfg, device)
    print(f"sampling {cfg.n} completions of {len(ids)} prompts from policy and reference ...",
          file=sys.stderr)
    ours = sample_prompts(policy, tokenizer, ids, cfg, device,
                          {"policy": policy, "reference": reference})
    theirs = reference_samples(reference, tokenizer, ids, cfg, device)
    scores = {name: [scorer(texts) for texts in s.texts]
              for name, s in (("policy", ours), ("reference", theirs))}

    def flat(values: list[list]) -> list:
        return [v for row in values for v in row]

    exact = cfg.temperature == 1 and cfg.top_p == 1
    result = {
        "policy": cfg.model, "reference": cfg.reference, "scorer": cfg.scorer,
        "dataset": cfg.dataset, "held_out": cfg.held_out, "prompts": len(ids), "n": cfg.n,
        "temperature": cfg.temperature, "top_p": cfg.top_p,
        "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
        "win_rate": win_rate(scores["policy"], scores["reference"]),
        "score": {name: mean_interval(flat(s)) for name, s in scores.items()},
        "kl": {**kl_estimate(flat(ours.logps["policy"]), flat(ours.logps["reference"])),
               "exact_sampling": exact},
        "length": {name: mean_interval(flat(s.lengths))
                   for name, s in (("policy", ours), ("reference", theirs))},
        "samples": [{"prompt": prompt,
                     "policy": [{"text": t, "score": v} for t, v in
                                zip(ours.texts[i], scores["policy"][i], strict=True)],
                     "reference": [{"text": t, "score": v} for t, v in
                                   zip(theirs.texts[i], scores["reference"][i], strict=True)]}
                    for i, prompt in enumerate(prompts)],
    }
    return result


def write_json(path: Path, value: Any) -> None:
    from .io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(value, indent=1, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The headline numbers of an eval, as text lines."""
    w, s, kl, n = result["win_rate"], result["score"], result["kl"], result["length"]

    def interval(d: dict) -> str:
        spread = f" [{d['low']:+.3f}, {d['high']:+.3f}]" if d["low"] is not None else ""
        return f"{d['mean']:+.3f}{spread}"

    note = "" if kl["exact_sampling"] else " (sampled at temperature/top-p != 1: not exact)"
    return [f"prompts {result['prompts']} x {result['n']} samples, scorer {result['scorer']}",
            f"win rate {w['win_rate']:.3f} (ties {w['tie_rate']:.3f}, losses {w['loss_rate']:.3f})"
            f" over {w['comparisons']} comparisons",
            f"mean score: policy {interval(s['policy'])} vs reference {interval(s['reference'])}",
            f"KL(policy || reference) {kl['mean']:.3f} +- {kl['stderr'] or 0:.3f} nats{note}",
            f"length (tokens): policy {n['policy']['mean']:.1f} vs reference "
            f"{n['reference']['mean']:.1f}"]


def run_eval_command(cfg: EvalConfig) -> int:
    cfg = resolve(cfg)
    result = evaluate_generations(cfg)
    out = Path(cfg.output)
    write_json(out, result)
    print("\n".join(summary_lines(result)))
    print(f"written: {out}")
    if cfg.run is not None and out.resolve().parent == Path(cfg.run).resolve() \
            and (Path(cfg.run) / "metrics.jsonl").is_file():
        from .report import write_report

        print(f"report: {write_report(cfg.run)}")
    return 0


# ---------------------------------------------------------------------------- the command


def main(command: str, argv: list[str], debug: bool) -> int:
    """``preftune eval`` / ``preftune pairs``: parse, run, one-line errors."""
    from .cli import _fail
    from .pairs import PairsConfig, run_pairs_command

    cls: type[Settings] = EvalConfig if command == "eval" else PairsConfig
    if any(a in ("-h", "--help") for a in argv):
        first = "[RUN_DIR] " if command == "eval" else ""
        print(f"usage: preftune {command} {first}[key=value ...] [--debug]\n")
        print(config_help(cls).removesuffix("\n\nloss:"))  # type: ignore[arg-type]
        return 0
    args = list(argv)
    if command == "eval" and args and "=" not in args[0]:
        args[0] = f"run={args[0]}"
    from .checkpoint import CheckpointError
    from .data import DataError
    from .models import ModelError
    from .tracking import quiet_third_party

    quiet_third_party()  # no loading bars or FutureWarnings, as for sft/dpo
    try:
        cfg = parse_config(cls, args)  # type: ignore[type-var]
        return (run_eval_command(cfg) if command == "eval"  # type: ignore[arg-type]
                else run_pairs_command(cfg))  # type: ignore[arg-type]
    except (ConfigError, DataError, ModelError, CheckpointError) as e:
        return _fail(e, debug)


# ---------------------------------------------------------------------------- during training

JUDGE_SAMPLES = 4  # completions per prompt at each eval of a run with eval_scorer


def training_judge(cfg, tokenizer, prompts: list[list[int]], device):
    """The generation eval at a run's eval steps (``eval_scorer``): ``JUDGE_SAMPLES``
    completions of each held-out sample prompt from the policy, against the reference's
    (sampled and scored once), as ``generate/*`` metrics. The reference is a separate frozen
    copy of ``reference`` (the policy's starting point for SFT), held for the whole run. The
    sampling runs on a forked RNG: training's random state is left as it was."""
    import torch

    from .scorers import load_scorer
    from .winrate import kl_estimate, mean_interval, win_rate

    if not prompts:
        raise ConfigError("eval_scorer: needs held-out prompts to sample (n_samples > 0)")
    scorer = load_scorer(cfg.eval_scorer, device=str(device))
    settings = Settings(n=JUDGE_SAMPLES, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                        trust_remote_code=cfg.trust_remote_code)
    reference = load_policy_model(getattr(cfg, "reference", None) or cfg.model, settings,
                                  device).requires_grad_(False)
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        theirs = reference_samples(reference, tokenizer, prompts, settings, device)
    their_scores = [scorer(texts) for texts in theirs.texts]

    def judge(policy) -> dict[str, float]:
        with torch.random.fork_rng(devices=forked):
            ours = sample_prompts(policy, tokenizer, prompts, settings, device,
                                  {"policy": policy, "reference": reference})
        scores = [scorer(texts) for texts in ours.texts]
        flat = [v for row in scores for v in row]
        kl = kl_estimate([v for row in ours.logps["policy"] for v in row],
                         [v for row in ours.logps["reference"] for v in row])
        w = win_rate(scores, their_scores)
        return {"generate/win_rate": w["win_rate"], "generate/tie_rate": w["tie_rate"],
                "generate/score": mean_interval(flat)["mean"],
                "generate/reference_score": mean_interval(
                    [v for row in their_scores for v in row])["mean"],
                "generate/kl": kl["mean"], "generate/kl_stderr": kl["stderr"] or 0.0,
                "generate/length": mean_interval(
                    [v for row in ours.lengths for v in row])["mean"]}

    return judge
