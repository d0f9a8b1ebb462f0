"""The training loop for both stages (SFT and DPO/IPO), read top to bottom in ``train``.

Components come from the config: data (read -> hold out -> tokenize), models, objective,
optimizer and schedule. The loop only accumulates micro-batch gradients, clips, steps,
logs, evaluates and samples; what a loss *is* lives in ``step`` and ``losses``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path

import torch
import yaml

from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import ConfigError, DPOConfig, TrainConfig, config_to_dict, dump_config
from .data import collate_pairs, collate_sft, load_pairs, pad_id_for, tokenize_pair, tokenize_sft
from .distributed import (
    World,
    barrier,
    close_world,
    full_state_dict,
    grad_norm_value,
    init_world,
    shard,
    share,
    sum_across,
)
from .evaluate import evaluate, generate
from .fastpath import FastPaths, decide_fast_paths
from .lora import apply_lora, merged, reference_view
from .memory import memory_releaser
from .models import (
    cache_dir,
    compile_blocks,
    disable_dropout,
    enable_activation_checkpointing,
    load_model,
    load_tokenizer,
    save_pretrained,
)
from .reference import attach, cached_reference_logps, weights_digest
from .report import write_report
from .step import DPOObjective, SFTObjective, finalize
from .tracking import RunLog, read_jsonl

Example = dict[str, list[int]]

# The held-out slice does not depend on `seed`, so runs with different seeds share one eval set.
HOLDOUT_SEED = 1234


@dataclass
class Data:
    train: list[Example]
    eval: list[Example]
    sample_prompts: list[Example]  # tokenized held-out pairs whose prompts are sampled from
    dropped: int  # training pairs left out of the last, incomplete batch of an epoch
    reference_samples: list[str] | None = None  # the frozen reference's completions, once


def precompute_reference(cfg: DPOConfig, reference: torch.nn.Module, data: Data, tokenizer,
                         pad_id: int, world: World, objective: DPOObjective) -> None:
    """Attach the reference's log-probs to every train and eval pair (cached on disk under a
    fingerprint), and keep its greedy completions of the sample prompts, which never change."""
    fast = decide_fast_paths(objective.fast, [reference], cfg.max_length)
    objective = dataclasses.replace(objective, fast=fast)  # for the reference as it is now
    collate = fast.collate if fast else partial(collate_pairs, pad_token_id=pad_id)

    def batches(examples):
        return micro_batches(examples, cfg.micro_batch_size, collate, world.device)

    cache = cache_dir() / "reference-logps"
    was_training = reference.training  # the policy itself may serve as the reference here
    reference.eval()
    weights = weights_digest(reference)  # once for both splits
    for name in ("train", "eval"):
        examples = getattr(data, name)
        if not examples:
            continue
        logps, hit = cached_reference_logps(reference, examples, batches,
                                            average=objective.average, cache_dir=cache,
                                            logps=objective.sequence_logps, world=world,
                                            weights=weights)
        setattr(data, name, attach(examples, logps))
        if world.main:
            print(f"reference log-probs of {len(examples)} {name} pairs: "
                  f"{'from cache' if hit else 'computed and cached'} ({cache})", file=sys.stderr)
    if cfg.n_samples and data.sample_prompts and world.main:
        print(f"sampling {len(data.sample_prompts)} held-out prompts from the reference "
              f"(greedy, {cfg.max_new_tokens} new tokens) ...", file=sys.stderr)
        batch = collate_pairs(data.sample_prompts, pad_id)
        data.reference_samples = generate(
            reference, tokenizer, batch["prompt_input_ids"].to(world.device),
            batch["prompt_attention_mask"].to(world.device),
            max_new_tokens=cfg.max_new_tokens, pad_token_id=pad_id)
    reference.train(was_training)


def _stage(cfg: TrainConfig) -> str:
    return "dpo" if isinstance(cfg, DPOConfig) else "sft"


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill every 'same as' / 'auto' default with its value, for config.yaml and the run."""
    stage = _stage(cfg)
    updates: dict = {"tokenizer": cfg.tokenizer or cfg.model}
    if cfg.output_dir is None:
        updates["output_dir"] = f"runs/{stage}-{datetime.now():%Y%m%d-%H%M%S}"
    if cfg.sample_every is None:
        updates["sample_every"] = cfg.eval_every
    if cfg.save_every is None:
        updates["save_every"] = cfg.eval_every
    if isinstance(cfg, DPOConfig) and cfg.reference is None:
        updates["reference"] = cfg.model
    return dataclasses.replace(cfg, **updates)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def prepare_output_dir(path: Path, *, resuming: bool) -> None:
    if (path / "metrics.jsonl").exists() and not resuming:
        raise ConfigError(f"output_dir: {path} already holds a run (metrics.jsonl); choose a new "
                          "output_dir, or resume=true to continue it")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output_dir: {path} is not writable ({e.strerror})") from None


def preflight(cfg: TrainConfig, out: Path) -> None:
    """Fail before loading anything if the disk cannot hold a checkpoint and the export."""
    folder = Path(cfg.model)
    if not folder.is_dir():
        return  # a hub id or alias: size unknown until downloaded or converted
    weights = sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin")
                  for f in folder.glob(pattern))
    optimizer_copies = 1 if cfg.optimizer == "rmsprop" else 2
    need = weights * (1 + optimizer_copies) + weights  # one checkpoint + the final export
    free = shutil.disk_usage(out).free
    if free < need:
        raise ConfigError(f"output_dir: {out} has {free / 1e9:.2f} GB free; a checkpoint and "
                          f"the export of this model need about {need / 1e9:.2f} GB")


# Keys that may change when resuming: they do not alter the steps already taken.
RESUMABLE_CHANGES = {"resume", "max_steps", "epochs", "eval_every", "sample_every", "save_every",
                     "keep_checkpoints", "log_every", "n_samples", "max_new_tokens", "device",
                     "max_nonfinite_steps", "report_to", "release_memory"}


def find_resume_point(cfg: TrainConfig, out: Path) -> Path | None:
    """The checkpoint to resume from: ``resume=true`` takes the latest one in output_dir (none
    yet means a fresh start), ``resume=PATH`` that checkpoint."""
    if cfg.resume is None:
        return None
    if cfg.resume.lower() in ("true", "latest"):
        found = latest_checkpoint(out)
    else:
        found = Path(cfg.resume)
        if not found.is_dir():
            raise ConfigError(f"resume: {found} is not a checkpoint folder")
    saved = out / "config.yaml"
    if found is not None and saved.is_file():
        before = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        now = config_to_dict(cfg)
        for key, value in now.items():
            if key not in RESUMABLE_CHANGES and key in before and before[key] != value:
                raise ConfigError(f"resume: {key} is {value!r} here but {before[key]!r} in the "
                                  f"run being resumed ({saved})")
    return found


def truncate_logs(out: Path, step: int) -> None:
    """Drop log records written after the checkpoint being resumed (step 0: all of them)."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = out / name
        kept = [r for r in read_jsonl(path) if step > 0 and r["step"] <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept),
                       encoding="utf-8")
        os.replace(tmp, path)


def load_data(cfg: TrainConfig, tokenizer, out: Path | None, world_size: int = 1) -> Data:
    """Read pairs, hold out the eval slice, tokenize with the configured truncation.

    ``out`` receives the skipped-rows reports (None on ranks other than 0). Under N processes
    the eval set is cut to a multiple of N, so every rank runs the same number of forwards.
    """
    quiet = out is None
    pairs, report = load_pairs(cfg.dataset, cfg.dataset_format, strict=cfg.strict_data,
                               quiet=quiet)
    if out is not None:
        report.write(out / "data_report.json")
    if cfg.eval_dataset is not None:
        eval_pairs, eval_report = load_pairs(cfg.eval_dataset, cfg.dataset_format,
                                             strict=cfg.strict_data, quiet=quiet)
        if out is not None:
            eval_report.write(out / "eval_data_report.json")
        eval_pairs = eval_pairs[: cfg.eval_examples]
        train_pairs = pairs
    else:
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(HOLDOUT_SEED))
        held = set(order[: cfg.eval_examples].tolist())
        eval_pairs = [p for i, p in enumerate(pairs) if i in held]
        train_pairs = [p for i, p in enumerate(pairs) if i not in held]
    if cfg.max_examples is not None:
        train_pairs = train_pairs[: cfg.max_examples]
    if len(train_pairs) < cfg.batch_size:
        raise ConfigError(f"batch_size: {cfg.batch_size} is more than the {len(train_pairs)} "
                          f"training pairs read from {cfg.dataset}")
    if cfg.batch_size % world_size or cfg.micro_batch_size * world_size > cfg.batch_size:
        raise ConfigError(f"batch_size: {cfg.batch_size} must be a multiple of the {world_size} "
                          "processes, with micro_batch_size <= batch_size / processes")
    eval_pairs = eval_pairs[: len(eval_pairs) - len(eval_pairs) % world_size]

    limits = {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length}
    tokenize = tokenize_pair if _stage(cfg) == "dpo" else tokenize_sft

    def encode(pair, fn=tokenize) -> Example:
        return fn(pair, tokenizer, truncation=cfg.truncation, **limits)

    eval_examples = [encode(p) for p in eval_pairs]
    # Sampling needs the prompt ids, which only the pair layout carries (SFT examples lack it).
    samples = (eval_examples[: cfg.n_samples] if tokenize is tokenize_pair
               else [encode(p, tokenize_pair) for p in eval_pairs[: cfg.n_samples]])
    train = [encode(p) for p in train_pairs]
    return Data(train, eval_examples, samples, dropped=len(train) % cfg.batch_size)


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A seeded permutation of the data for one epoch, cut into full batches."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return [perm[i : i + batch_size].tolist() for i in range(0, n - batch_size + 1, batch_size)]


def micro_batches(examples: list[Example], size: int, collate, device):
    """Collate consecutive groups of ``size`` examples (each padded only to its own length,
    or laid out), on ``device``."""
    for i in range(0, len(examples), size):
        batch = collate(examples[i : i + size])
        yield {k: v.to(device) for k, v in batch.items()}


def fast_paths(cfg: DPOConfig, pad_id: int) -> FastPaths | None:
    """The fast paths a config requests (``decide_fast_paths`` keeps those the models can
    run); None when every fast path is off."""
    if not (cfg.chunked_logps or cfg.share_prompt or cfg.pack):
        return None
    return FastPaths(pad_token_id=pad_id, chunked=cfg.chunked_logps, chunk_size=cfg.chunk_size,
                     share_prompt=cfg.share_prompt, pack=cfg.pack,
                     segments=cfg.segment_attention, keep_activations=cfg.keep_activations)


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Linear warmup over ``warmup`` steps (as the reference implementation), then the schedule."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(total - warmup, 1)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite steps); the message is one line."""


def _dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32


def build_models(cfg: TrainConfig, device: torch.device, tokenizer, needs_reference: bool):
    """The trainable policy and, when the objective needs one, the frozen reference.

    When the reference is the policy's own starting point and is needed only before the first
    update (precomputed log-probs) or through bypassed adapters (LoRA), the policy itself is
    returned as the reference: no second copy of the weights is loaded."""
    dtype = _dtype(cfg)
    policy = load_model(cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    vocab = policy.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ConfigError(f"tokenizer: {len(tokenizer)} tokens, more than the model's "
                          f"vocabulary size {vocab}")
    policy.to(device).train()
    disable_dropout(policy)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(policy)
    # Reference-free runs load no reference: their rewards are measured against 0.
    if not needs_reference:
        return policy, None
    if cfg.reference == cfg.model and (cfg.precompute_reference or cfg.lora):
        return policy, policy
    reference = load_model(cfg.reference, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    reference.to(device).eval().requires_grad_(False)
    disable_dropout(reference)
    p_vocab = policy.get_output_embeddings().weight.shape[0]
    r_vocab = reference.get_output_embeddings().weight.shape[0]
    if p_vocab != r_vocab:
        raise ConfigError(f"reference: vocabulary size {r_vocab} differs from model's {p_vocab}")
    return policy, reference


def train(cfg: TrainConfig, *, progress: bool = True) -> Path:
    """Run one stage end to end, in this process or as one rank under torchrun."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no CUDA device is available")
    world = init_world(cfg.device)
    try:
        return _train(resolve(cfg), world, progress=progress and world.main)
    finally:
        close_world(world)


def _train(cfg: TrainConfig, world: World, *, progress: bool) -> Path:
    stage = _stage(cfg)
    out = Path(cfg.output_dir)
    resume_from = find_resume_point(cfg, out)
    if world.main:
        prepare_output_dir(out, resuming=cfg.resume is not None)
        preflight(cfg, out)
    barrier(world)
    seed_everything(cfg.seed)
    device = world.device

    tokenizer = load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    pad_id = pad_id_for(tokenizer)
    data = load_data(cfg, tokenizer, out if world.main else None, world.size)
    if stage == "dpo":
        objective = DPOObjective(beta=cfg.beta, kind=cfg.loss, label_smoothing=cfg.label_smoothing,
                                 reference_free=cfg.reference_free, logps=cfg.logps,
                                 fast=fast_paths(cfg, pad_id),
                                 simpo_gamma=cfg.simpo_gamma, rpo_alpha=cfg.rpo_alpha)
    else:
        objective, collate = SFTObjective(), partial(collate_sft, pad_token_id=pad_id)
    policy, reference = build_models(cfg, device, tokenizer, objective.needs_reference)
    if reference is not None and cfg.precompute_reference:
        precompute_reference(cfg, reference, data, tokenizer, pad_id, world, objective)
        del reference  # frozen numbers now travel with the pairs: free the model
        reference = None
        gc.collect()
    # LoRA: the policy's base with adapters bypassed is the reference (B = 0 at the start).
    live_view = reference is policy
    if cfg.lora:
        policy = apply_lora(policy, cfg)
    if live_view:
        reference = None
    policy = shard(policy, world, train=True)
    if cfg.compile:
        compile_blocks(policy)
    reference = shard(reference, world, train=False) if reference is not None else None
    if stage == "dpo":  # the models are final: decide the fast paths for them, once
        fast = decide_fast_paths(objective.fast, [policy, reference], cfg.max_length)
        objective = dataclasses.replace(objective, fast=fast)
        collate = fast.collate if fast else partial(collate_pairs, pad_token_id=pad_id)

    optimizer = build_optimizer(cfg, policy)
    steps_per_epoch = len(data.train) // cfg.batch_size
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.scheduler))

    counters = {"step": 0, "examples": 0, "tokens": 0, "skipped_steps": 0, "nonfinite_run": 0}
    if resume_from is not None:
        state = load_checkpoint(resume_from, policy, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        objective.load_state_dict(state.get("objective", {}))
        set_rng_state(state["rng"])
        counters.update(state["counters"])
    if world.main:
        if cfg.resume is not None:
            truncate_logs(out, counters["step"])
        if resume_from is not None:  # finish a prune the crash interrupted
            prune_checkpoints(out, cfg.keep_checkpoints)
        dump_config(cfg, out / "config.yaml")
    log = RunLog(out, total_steps, stage, counters["step"], progress, enabled=world.main,
                 report_to=cfg.report_sinks(), config=config_to_dict(cfg))

    def with_reference(batches):
        """Attach live reference log-probs computed by the policy with its adapters off."""
        for batch in batches:
            if live_view:
                with torch.no_grad(), reference_view(policy):
                    ref = objective.sequence_logps(policy, batch)
                batch = {**batch, "reference_chosen_logps": ref.chosen,
                         "reference_rejected_logps": ref.rejected}
            yield batch

    def run_eval() -> None:
        examples = share(data.eval, world)
        batches = with_reference(
            micro_batches(examples, cfg.micro_batch_size, collate, device))
        stats = sum_across(evaluate(policy, reference, objective, batches, progress), world)
        log.eval({"split": "eval", "step": counters["step"], "examples": counters["examples"],
                  **finalize(stats)})

    def run_samples() -> None:
        if not data.sample_prompts:
            return
        batch = collate_pairs(data.sample_prompts, pad_id)
        ids = batch["prompt_input_ids"].to(device)
        mask = batch["prompt_attention_mask"].to(device)
        kw = {"max_new_tokens": cfg.max_new_tokens, "pad_token_id": pad_id,
              "synced": world.distributed}
        log.note(f"sampling {len(data.sample_prompts)} held-out prompts (greedy) ...")
        completions = {"policy": generate(policy, tokenizer, ids, mask, **kw)}
        if data.reference_samples is None and (reference is not None or live_view):
            # The reference never changes: sample it at the first round only.
            with reference_view(policy) if live_view else contextlib.nullcontext():
                data.reference_samples = generate(reference if reference is not None else policy,
                                                  tokenizer, ids, mask, **kw)
        if data.reference_samples:
            completions["reference"] = data.reference_samples
        prompts = tokenizer.batch_decode(
            [ex["prompt_input_ids"] for ex in data.sample_prompts], skip_special_tokens=False)
        for i, prompt in enumerate(prompts):
            log.sample({"step": counters["step"], "prompt": prompt,
                        **{name: texts[i] for name, texts in completions.items()}})

    def due(every: int | None) -> bool:
        return bool(every) and counters["step"] % every == 0 and counters["step"] < total_steps

    release = memory_releaser(cfg.release_memory, device)
    if counters["step"] == 0:
        run_eval()  # the baseline: a DPO loss of ln 2 when policy and reference are equal
    while counters["step"] < total_steps:
        # The batch of a step is a pure function of (seed, step): resuming needs no data state.
        epoch, index = divmod(counters["step"], steps_per_epoch)
        indices = batch_order(len(data.train), cfg.batch_size, cfg.seed, epoch)[index]
        start = time.perf_counter()
        examples = [data.train[i] for i in indices]
        denominator = objective.denominator(examples)  # of the global batch, on every rank
        stats: Counter = Counter()
        for batch in with_reference(micro_batches(share(examples, world), cfg.micro_batch_size,
                                                  collate, device)):
            loss, micro_stats = objective(policy, reference, batch, denominator)
            release()  # what forward freed, before backward allocates gradients
            # FSDP averages gradients over ranks; scaling by the world size makes it a sum.
            (loss * world.size).backward()
            stats.update(micro_stats)
        stats = sum_across(stats, world)
        objective.after_step(stats)  # running statistics some losses keep (BCO's reward mean)
        grad_norm = grad_norm_value(
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm))
        lr = scheduler.get_last_lr()[0]
        finite = math.isfinite(stats["loss"]) and math.isfinite(grad_norm)
        if finite:
            release()  # what backward freed, before the optimizer's temporaries
            optimizer.step()
            counters["nonfinite_run"] = 0
        else:  # skip the update; the schedule still advances with the step count
            counters["skipped_steps"] += 1
            counters["nonfinite_run"] += 1
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        counters["step"] += 1
        counters["examples"] += len(indices)
        counters["tokens"] += int(stats["tokens"])

        record = {"split": "train", "step": counters["step"], "examples": counters["examples"],
                  **finalize(stats), "grad_norm": grad_norm, "lr": lr,
                  "tokens": counters["tokens"], "skipped_steps": counters["skipped_steps"],
                  "examples_per_second": len(indices) / (time.perf_counter() - start)}
        logged = counters["step"] % cfg.log_every == 0 or counters["step"] == total_steps
        log.train(record, write=logged or not finite)
        if not finite:
            log.note(f"step {counters['step']}: non-finite loss or gradient, update skipped")
            if counters["nonfinite_run"] >= cfg.max_nonfinite_steps:
                raise TrainingError(
                    f"stopping: {counters['nonfinite_run']} non-finite steps in a row (last at "
                    f"step {counters['step']}); last good checkpoint: "
                    f"{latest_checkpoint(out) or 'none'}")
        if due(cfg.eval_every):
            run_eval()
        if cfg.n_samples and due(cfg.sample_every):
            run_samples()
        if due(cfg.save_every) and counters["nonfinite_run"] == 0:
            save_checkpoint(out, counters["step"], policy, optimizer, {
                "counters": dict(counters), "scheduler": scheduler.state_dict(),
                "objective": objective.state_dict(),
                "rng": rng_state()}, cfg.keep_checkpoints, world)

    run_eval()
    if cfg.n_samples:
        run_samples()
    log.close()
    weights = full_state_dict(policy, world) if world.distributed else None
    if world.main:
        export = policy
        if cfg.lora and world.distributed:  # an unsharded copy holding the gathered weights
            export = apply_lora(load_model(cfg.model, dtype=_dtype(cfg)), cfg)
            export.load_state_dict(weights)
            weights = None
        if cfg.lora and cfg.lora_export == "merged":
            export = merged(export)  # after the last eval and samples: folds adapters in place
        final = save_pretrained(export, tokenizer, out / "final", state_dict=weights)
        report = write_report(out)
        print_summary(final, log.evals, data)
        print(f"report: {report}")
    barrier(world)
    return out


def print_summary(final: Path, evals: list[dict], data: Data) -> None:
    keys = ["loss", "rewards/accuracies", "rewards/margins"]
    first, last = evals[0], evals[-1]
    print(f"model saved to {final}")
    print(f"trained on {len(data.train) - data.dropped} pairs"
          + (f" ({data.dropped} left out of the last incomplete batch)" if data.dropped else "")
          + f", evaluated on {len(data.eval)}")
    for key in keys:
        if key in last:
            label = "first eval" if len(evals) > 1 else "eval"
            line = f"  {key:<20} {label} {first[key]:.4f}"
            if len(evals) > 1:
                line += f" -> last {last[key]:.4f}"
            print(line)

