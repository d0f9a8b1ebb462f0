"""The training loop for both stages (SFT and DPO-family), read top to bottom.

``train`` = ``setup`` (config -> ``TrainState``: data, models, reference, objective, optimizer,
schedule, counters) + ``fit`` (``train_step`` for each step, then the cadence: log, eval,
samples, checkpoint) + ``finish`` (last eval, export, report). ``train_step`` is the one place
an optimizer step happens; what a loss *is* lives in ``step`` and ``losses``, and which
reference the objective compares with in ``reference``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import math
import random
import shutil
import sys
import time
import types
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    disk_needed,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    remove_interrupted_writes,
    resume_point,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)
from .config import (
    ConfigError,
    DPOConfig,
    TrainConfig,
    config_to_dict,
    dump_config,
    read_yaml,
    show,
)
from .data import (
    SkipReport,
    collate_pairs,
    collate_sft,
    load_pairs,
    pad_id_for,
    tokenize_pair,
    tokenize_sft,
)
from .data.tokenize import chat_template_check
from .distributed import (
    World,
    barrier,
    close_world,
    full_state_dict,
    grad_norm_value,
    gradient_sync,
    init_world,
    shard,
    share,
    sum_across,
)
from .evaluate import evaluate, generate
from .fastpath import FastPaths, decide_fast_paths
from .io import atomic_write
from .lora import apply_lora, merged
from .memory import memory_releaser
from .models import (
    cache_dir,
    compile_blocks,
    disable_dropout,
    enable_activation_checkpointing,
    load_model,
    load_tokenizer,
    remove_interrupted_exports,
    save_pretrained,
)
from .precision import (
    autocast,
    check_learning_rate,
    fsdp_dtypes,
    mixed,
    parameters_in,
    weights_dtype,
)
from .reference import (
    AdapterOffReference,
    FrozenReference,
    NoReference,
    PrecomputedReference,
    Reference,
    attach,
    cached_reference_logps,
    weights_digest,
)
from .report import write_report
from .rundir import claim_output_dir
from .step import DPOObjective, SFTObjective, finalize
from .tracking import RunLog, duration, read_jsonl

Example = dict[str, list[int]]

# The held-out slice does not depend on `seed`, so runs with different seeds share one eval set.
HOLDOUT_SEED = 1234


@dataclass
class Data:
    train: list[Example]
    eval: list[Example]
    sample_prompts: list[Example]  # tokenized held-out pairs whose prompts are sampled from
    dropped: int  # training pairs left out of the last, incomplete batch of an epoch
    reports: dict[str, SkipReport] = field(default_factory=dict)  # file name -> skipped rows


Objective = DPOObjective | SFTObjective
Sampler = Callable[..., list[str]]  # (model, synced=None) -> completions of the sample prompts


@dataclass
class Counters:
    """Progress of a run; checkpointed, and restored on resume."""

    step: int = 0
    examples: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    nonfinite_run: int = 0  # non-finite steps in a row


@dataclass
class TrainState:
    """Everything a run holds between steps, built once by ``setup``."""

    cfg: TrainConfig
    world: World
    policy: torch.nn.Module
    reference: Reference
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    collate: Callable[[list[Example]], dict]  # examples -> a micro-batch, padded or laid out
    total_steps: int
    data: Data | None = None
    out: Path | None = None
    tokenizer: Any = None
    log: RunLog | None = None
    sampler: Sampler | None = None
    progress: bool = False
    counters: Counters = field(default_factory=Counters)
    release: Callable[[], object] = field(default=lambda: None)
    saved_step: int | None = None  # the step of the newest checkpoint this run saved or resumed
    judge: Callable[[torch.nn.Module], dict] | None = None  # eval_scorer's metrics of a policy
    # What every forward runs in: bf16 autocast with dtype=bfloat16 (preftune.precision).
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def precompute_reference(cfg: DPOConfig, model: torch.nn.Module, data: Data, pad: int,
                         world: World, objective: DPOObjective,
                         sampler: Sampler | None) -> Reference:
    """Attach ``model``'s log-probs to every train and eval pair (cached on disk under a
    fingerprint) and take its completions of the sample prompts: the reference is then
    numbers, and the model can be freed."""
    objective = with_fast_paths(objective, [model], cfg.max_length)  # for the model as it is
    collate = collate_for(objective, pad)

    def batches(examples):
        found = micro_batches(examples, cfg.micro_batch_size, collate, world.device)
        if not world.main:
            return found
        count = -(-len(examples) // cfg.micro_batch_size)  # this process's share of the pairs
        return timed_first(found, count, f"reference pass over {len(examples)} pairs")

    cache = cache_dir() / "reference-logps"
    was_training = model.training  # the policy itself may serve as the reference here
    model.eval()
    weights = weights_digest(model)  # once for both splits
    # As the sharded models compute in training: from bf16 copies of the weights under
    # torchrun (FSDP2's param_dtype), from the weights under autocast on one process.
    gathered = fsdp_dtypes(cfg)["param_dtype"] if world.distributed else None
    precision = "" if not mixed(cfg) else "bf16-params" if gathered else "bf16-autocast"
    with parameters_in(model, gathered), autocast(cfg, world.device):
        for name in ("train", "eval"):
            examples = getattr(data, name)
            if not examples:
                continue
            logps, hit = cached_reference_logps(model, examples, batches,
                                                average=objective.average, cache_dir=cache,
                                                logps=objective.sequence_logps, world=world,
                                                weights=weights, ld_alpha=objective.ld_alpha,
                                                precision=precision)
            setattr(data, name, attach(examples, logps))
            if world.main:
                print(f"reference log-probs of {len(examples)} {name} pairs: "
                      f"{'from cache' if hit else 'computed and cached'} ({cache})",
                      file=sys.stderr)
        # Only rank 0 samples, from its own unsharded copy: no other rank takes part.
        samples = sampler(model, synced=False) if sampler is not None and world.main else None
    model.train(was_training)
    return PrecomputedReference(samples)


def _stage(cfg: TrainConfig) -> str:
    return "dpo" if isinstance(cfg, DPOConfig) else "sft"


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill every 'same as' / 'auto' default with its value, for config.yaml and the run."""
    stage = _stage(cfg)
    if cfg.tokenizer is None and not isinstance(cfg.model, str):
        raise ConfigError("tokenizer: required with a loaded model (pass its tokenizer object "
                          "or folder)")
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


def preflight(cfg: TrainConfig, out: Path) -> None:
    """Fail before loading anything if the disk cannot hold what coexists at the peak: the
    kept checkpoints, the one being written and the export (``checkpoint.disk_needed``).
    A resumed run first removes the checkpoint and export folders a killed run left half
    written: they are never read, and the space they hold is needed."""
    if cfg.resume not in (None, False):
        remove_interrupted_writes(out)
        remove_interrupted_exports(out / "final")
    folder = Path(cfg.model) if isinstance(cfg.model, str) else None
    if folder is None or not folder.is_dir():
        return  # a hub id or alias: size unknown until downloaded or converted
    need = disk_needed(folder, out, keep=cfg.keep_checkpoints,
                       optimizer_states=1 if cfg.optimizer == "rmsprop" else 2,
                       lora_r=cfg.lora_r if cfg.lora else None,
                       merged_export=not cfg.lora or cfg.lora_export == "merged",
                       element_size=weights_dtype(cfg).itemsize)
    free = shutil.disk_usage(out).free
    if free < need:
        raise ConfigError(f"output_dir: {out} has {free / 1e9:.2f} GB free; {cfg.keep_checkpoints} "
                          "kept checkpoints, the one being saved and the export of this model "
                          f"need about {need / 1e9:.2f} GB more")


# Keys that may change when resuming: they do not alter the steps already taken.
RESUMABLE_CHANGES = {"resume", "max_steps", "epochs", "eval_every", "sample_every", "save_every",
                     "keep_checkpoints", "log_every", "n_samples", "max_new_tokens", "device",
                     "max_nonfinite_steps", "report_to", "release_memory", "eval_scorer",
                     "output_dir",  # a moved or copied run folder resumes where it now is
                     "reduce_every_micro_batch"}  # memory against communication, same sums


def find_resume_point(cfg: TrainConfig, out: Path) -> Path | None:
    """The checkpoint to resume from: ``resume=true`` takes the latest one in output_dir (none
    yet means a fresh start), ``resume=PATH`` that checkpoint."""
    if cfg.resume is None:
        return None
    if cfg.resume.lower() in ("true", "latest"):
        found = resume_point(out)  # the newest that verifies
    else:
        found = Path(cfg.resume)
        if not found.is_dir():
            raise ConfigError(f"resume: {found} is not a checkpoint folder")
        verify_checkpoint(found)  # before any model loads
    saved = out / "config.yaml"
    if found is not None and saved.is_file():
        before = read_yaml(saved)  # no aliases: a planted one cannot blow up in memory
        now = config_to_dict(cfg)
        for key, value in now.items():
            if key not in RESUMABLE_CHANGES and key in before and before[key] != value:
                raise ConfigError(f"resume: {key} is {show(value)} here but {show(before[key])} "
                                  f"in the run being resumed ({saved})")
    return found


def truncate_logs(out: Path, step: int) -> None:
    """Drop log records written after the checkpoint being resumed (step 0: all of them)."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = out / name
        kept = [r for r in read_jsonl(path) if step > 0 and r["step"] <= step]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
        atomic_write(path, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))


def held_out(pairs: list, n: int) -> tuple[list, list]:
    """(the ``n`` held-out pairs, the rest), both in file order: a permutation seeded by
    ``HOLDOUT_SEED`` picks them, so ``preftune eval`` finds a run's held-out prompts again."""
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    held = set(order[:n].tolist())
    return ([p for i, p in enumerate(pairs) if i in held],
            [p for i, p in enumerate(pairs) if i not in held])


def load_data(cfg: TrainConfig, tokenizer, out: Path | None, world_size: int = 1) -> Data:
    """Read pairs, hold out the eval slice, tokenize with the configured truncation.

    ``out`` receives the skipped-rows reports (None on ranks other than 0). Under N processes
    the eval set is cut to a multiple of N, so every rank runs the same number of forwards.
    """
    check = chat_template_check(tokenizer)  # a row the chat template rejects is a skipped row
    read = partial(load_pairs, format=cfg.dataset_format, strict=cfg.strict_data, quiet=True,
                   check=check, fields=cfg.field_map())
    pairs, report = read(cfg.dataset)
    reports = {"data_report.json": report}
    if cfg.eval_dataset is not None:
        eval_pairs, reports["eval_data_report.json"] = read(cfg.eval_dataset)
        eval_pairs = eval_pairs[: cfg.eval_examples]
        train_pairs = pairs
    else:
        eval_pairs, train_pairs = held_out(pairs, cfg.eval_examples)
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
    if out is not None:  # one short line per file; the rows are in the report files
        for name, skipped in reports.items():
            if skipped.skipped:
                print(skipped.short(f"{out / name}, preftune data inspect"), file=sys.stderr)
    return Data(train, eval_examples, samples, dropped=len(train) % cfg.batch_size,
                reports=reports)


def write_data_reports(data: Data, out: Path) -> None:
    """The skipped-rows reports, once the run is about to start (a failed start leaves none)."""
    for name, report in data.reports.items():
        report.write(out / name)


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


def timed_first(batches: Iterator[dict], count: int, what: str) -> Iterator[dict]:
    """``batches`` as they are; once the first has been used, print how long ``what`` (all
    ``count`` of them) will take at that pace."""
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        if i == 1:
            first = time.perf_counter() - start
            print(f"{what}: about {duration(first * count)} ({count} micro-batches; the first "
                  f"took {duration(first)})", file=sys.stderr)
        yield batch


def plan(cfg: TrainConfig, data: Data, total_steps: int) -> str:
    """What a run is about to do, in one line: data, steps, tokens, warmup."""
    unit = "pairs" if _stage(cfg) == "dpo" else "examples"

    def tokens(example: Example) -> int:  # each sequence the forward runs, prompt included
        return sum(len(v) for k, v in example.items()
                   if k.endswith("input_ids") and k != "prompt_input_ids")

    per_example = sum(map(tokens, data.train)) / max(len(data.train), 1)
    total = round(per_example * cfg.batch_size * total_steps)
    warmup = warmup_for(cfg, total_steps)
    return (f"plan: {len(data.train)} training {unit}, {len(data.eval)} held out; {total_steps} "
            f"steps of {cfg.batch_size} (micro-batches of {cfg.micro_batch_size}), warmup "
            f"{warmup} step{'s' * (warmup != 1)}; about {total:,} tokens")


def fast_paths(cfg: DPOConfig, pad_id: int) -> FastPaths | None:
    """The fast paths a config requests (``decide_fast_paths`` keeps those the models can
    run); None when every fast path is off."""
    if not (cfg.chunked_logps or cfg.share_prompt or cfg.pack):
        return None
    return FastPaths(pad_token_id=pad_id, chunked=cfg.chunked_logps, chunk_size=cfg.chunk_size,
                     share_prompt=cfg.share_prompt, pack=cfg.pack,
                     segments=cfg.segment_attention, attention_kernel=cfg.attention_kernel,
                     keep_activations=cfg.keep_activations)


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


PAPER_WARMUP = 150  # the DPO reference implementation's warmup steps
WARMUP_FRACTION = 0.1  # of a run's steps: the most an unset warmup_steps takes


def warmup_for(cfg: TrainConfig, total_steps: int) -> int:
    """``warmup_steps`` as set, else the paper's 150 capped at a tenth of the run's steps, so
    that a short try is not all warmup (runs of 1,500 steps or more keep 150)."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return min(PAPER_WARMUP, int(total_steps * WARMUP_FRACTION))


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


# ----------------------------------------------------------------------------- setup


def load_policy(cfg: TrainConfig, device: torch.device, tokenizer) -> torch.nn.Module:
    """The trainable policy (dropout off, activation checkpointing as configured); a loaded
    model (Python API) is trained in place."""
    if isinstance(cfg.model, str):
        policy = load_model(cfg.model, dtype=weights_dtype(cfg),
                            trust_remote_code=cfg.trust_remote_code)
    else:
        policy = cfg.model.to(weights_dtype(cfg))
        disable_dropout(policy)
    vocab = policy.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ConfigError(f"tokenizer: {len(tokenizer)} tokens, more than the model's "
                          f"vocabulary size {vocab}")
    policy.to(device).train()
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(policy)
    return policy


def load_frozen(cfg: DPOConfig, device: torch.device, policy: torch.nn.Module) -> torch.nn.Module:
    """A separate frozen reference model, checked against the policy's vocabulary (a copy of a
    loaded one: the policy may be that very object)."""
    if isinstance(cfg.reference, str):
        model = load_model(cfg.reference, dtype=weights_dtype(cfg),
                           trust_remote_code=cfg.trust_remote_code)
    else:
        model = copy.deepcopy(cfg.reference).to(weights_dtype(cfg))
        disable_dropout(model)
    model.to(device).eval().requires_grad_(False)
    p_vocab = policy.get_output_embeddings().weight.shape[0]
    r_vocab = model.get_output_embeddings().weight.shape[0]
    if p_vocab != r_vocab:
        raise ConfigError(f"reference: vocabulary size {r_vocab} differs from model's {p_vocab}")
    return model


def build_models(cfg: TrainConfig, world: World, tokenizer, data: Data, objective: Objective,
                 sampler: Sampler | None) -> tuple[torch.nn.Module, Reference, Objective]:
    """The policy (LoRA-wrapped, sharded, compiled as configured), its ``Reference``, and the
    objective with the fast paths these final models run (decided once, here).

    The reference is the policy's own starting point when ``reference`` names the same model:
    then precomputing it (``precompute_reference``) or bypassing the LoRA adapters needs no
    second copy of the weights."""
    policy = load_policy(cfg, world.device, tokenizer)
    needs = objective.needs_reference
    same = needs and cfg.reference == cfg.model
    frozen = load_frozen(cfg, world.device, policy) if needs and not same else None
    reference: Reference = NoReference()
    precompute = needs and cfg.precompute_reference and not syncs_reference(cfg)
    if needs and precompute != cfg.precompute_reference and world.main:
        print(f"preftune: note: sync_reference={cfg.sync_reference} updates the reference "
              "during training: it is a live copy, precompute_reference is off",
              file=sys.stderr)
    if needs and precompute:
        reference = precompute_reference(cfg, frozen or policy, data, pad_id_for(tokenizer),
                                         world, objective, sampler)
        frozen = None  # the numbers travel with the pairs now: free the model
        gc.collect()
    if cfg.lora:
        policy = apply_lora(policy, cfg)
    elif same and not precompute:  # a live copy of the policy's start
        frozen = load_frozen(cfg, world.device, policy)
    if frozen is not None and syncs_reference(cfg):
        shapes = [[p.shape for p in m.parameters()] for m in (policy, frozen)]
        if shapes[0] != shapes[1]:
            raise ConfigError(f"reference: sync_reference copies the policy into the "
                              f"reference; {cfg.reference} has other parameters than "
                              f"{cfg.model}")
    check_learning_rate(cfg, policy, show=world.main)  # pure bf16: updates that round away
    policy = shard(policy, world, train=True, **fsdp_dtypes(cfg))
    if cfg.compile:
        compile_blocks(policy)
    # A live reference is stored and gathered like the policy: at step 0 both compute alike.
    frozen = shard(frozen, world, train=False, **fsdp_dtypes(cfg)) if frozen is not None else None
    objective = with_fast_paths(objective, [policy, frozen], cfg.max_length)
    if frozen is not None:
        reference = FrozenReference(frozen, objective.sequence_logps)
    elif cfg.lora and same and not precompute:
        reference = AdapterOffReference(policy, objective.sequence_logps)
    return policy, reference, objective


def syncs_reference(cfg: TrainConfig) -> bool:
    """Whether the reference is updated from the policy during training (TR-DPO)."""
    return getattr(cfg, "sync_reference", "none") != "none"


def sync_reference(state: TrainState) -> None:
    """TR-DPO's reference update, after every ``sync_every``-th optimizer step: the soft
    update mixes ``sync_alpha`` of the policy in, the hard one copies it."""
    cfg = state.cfg
    if not syncs_reference(cfg) or state.counters.step % cfg.sync_every:
        return
    alpha = 1.0 if cfg.sync_reference == "hard" else cfg.sync_alpha
    state.reference.update_from(state.policy, alpha)


def build_objective(cfg: TrainConfig, pad_id: int) -> Objective:
    """The stage's objective, with the fast paths the config requests (not yet decided)."""
    if isinstance(cfg, DPOConfig):
        return DPOObjective.from_config(cfg, fast_paths(cfg, pad_id))
    return SFTObjective()


def with_fast_paths(objective: Objective, models: list, max_length: int) -> Objective:
    """``objective`` with the requested fast paths that ``models`` can all run."""
    if not isinstance(objective, DPOObjective):
        return objective
    return dataclasses.replace(objective,
                               fast=decide_fast_paths(objective.fast, models, max_length))


def collate_for(objective: Objective, pad_id: int) -> Callable[[list[Example]], dict]:
    """How the objective's micro-batches are built: laid out by the fast paths, or padded."""
    if isinstance(objective, SFTObjective):
        return partial(collate_sft, pad_token_id=pad_id)
    if objective.fast is not None:
        return objective.fast.collate
    return partial(collate_pairs, pad_token_id=pad_id)


def make_sampler(cfg: TrainConfig, tokenizer, data: Data, pad_id: int,
                 world: World) -> Sampler | None:
    """A model's greedy completions of the held-out sample prompts (None: sampling is off)."""
    if not (cfg.n_samples and data.sample_prompts):
        return None
    batch = collate_pairs(data.sample_prompts, pad_id)
    ids = batch["prompt_input_ids"].to(world.device)
    mask = batch["prompt_attention_mask"].to(world.device)

    def sample(model: torch.nn.Module, synced: bool | None = None) -> list[str]:
        """``synced``: keep sharded models in step across processes (default: when
        distributed); an unsharded model sampled on one rank passes False."""
        with autocast(cfg, world.device):
            return generate(model, tokenizer, ids, mask, max_new_tokens=cfg.max_new_tokens,
                            pad_token_id=pad_id,
                            synced=world.distributed if synced is None else synced)

    return sample


def make_state(cfg: TrainConfig, world: World, policy: torch.nn.Module, reference: Reference,
               objective: Objective, pad_id: int, total_steps: int, **rest: Any) -> TrainState:
    """The state ``train_step`` needs around built models: optimizer, schedule, collate
    function (``rest``: the other ``TrainState`` fields, for a full run)."""
    optimizer = build_optimizer(cfg, policy)
    warmup = warmup_for(cfg, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total_steps, cfg.scheduler))
    return TrainState(cfg, world, policy, reference, objective, optimizer, scheduler,
                      collate_for(objective, pad_id), total_steps,
                      release=memory_releaser(cfg.release_memory, world.device),
                      autocast=partial(autocast, cfg, world.device), **rest)


def setup(cfg: TrainConfig, world: World, *, progress: bool) -> TrainState:
    """Everything a run needs, from its resolved config: output folder, data, models and
    reference, objective, optimizer and schedule, and the state of a resumed run."""
    out = Path(cfg.output_dir)
    resume_from = find_resume_point(cfg, out)
    if world.main:
        preflight(cfg, out)
    barrier(world)
    seed_everything(cfg.seed)
    tokenizer = (load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
                 if isinstance(cfg.tokenizer, str) else cfg.tokenizer)
    pad_id = pad_id_for(tokenizer)
    data = load_data(cfg, tokenizer, out if world.main else None, world.size)
    total_steps = cfg.max_steps or len(data.train) // cfg.batch_size * cfg.epochs
    if world.main:
        print(plan(cfg, data, total_steps), file=sys.stderr)
    sampler = make_sampler(cfg, tokenizer, data, pad_id, world)
    stored = (stored_reference_samples(out, tokenizer, data)
              if resume_from is not None and sampler is not None else None)
    policy, reference, objective = build_models(
        cfg, world, tokenizer, data, build_objective(cfg, pad_id),
        sampler if stored is None else lambda model, synced=None: stored)
    if stored is not None and hasattr(reference, "_samples"):  # a live reference: sampled once
        reference._samples = stored
    state = make_state(cfg, world, policy, reference, objective, pad_id, total_steps,
                       data=data, out=out, tokenizer=tokenizer, sampler=sampler,
                       progress=progress)
    if cfg.eval_scorer is not None:  # sampled completions judged at each eval (evalgen)
        if world.distributed:
            raise ConfigError("eval_scorer: not supported under torchrun; run preftune eval "
                              "on the run folder instead")
        from .evalgen import training_judge

        state.judge = training_judge(cfg, tokenizer, [ex["prompt_input_ids"] for ex in
                                                      data.sample_prompts], world.device)
    if resume_from is not None:
        restore(state, resume_from)
        state.saved_step = state.counters.step
    if world.main:
        if cfg.resume is not None:
            truncate_logs(out, state.counters.step)
        if resume_from is not None:  # finish a prune the crash interrupted
            prune_checkpoints(out, cfg.keep_checkpoints)
            shown = resume_from.relative_to(out) if resume_from.is_relative_to(out) else resume_from
            print(f"resumed from {shown} (step {state.counters.step} of {total_steps})",
                  file=sys.stderr)
        dump_config(cfg, out / "config.yaml")  # without resume: it loads as a fresh run
        write_data_reports(data, out)
    state.log = RunLog(out, total_steps, _stage(cfg), state.counters.step, progress,
                       enabled=world.main, report_to=cfg.report_sinks(),
                       config=config_to_dict(cfg))
    return state


def stored_reference_samples(out: Path, tokenizer, data: Data) -> list[str] | None:
    """The reference's completions of the sample prompts as the run being resumed logged them
    (samples.jsonl), so that a resumed run does not generate them again; None if they are not
    there for exactly these prompts."""
    rows = [r for r in read_jsonl(out / "samples.jsonl") if isinstance(r.get("reference"), str)]
    if not rows:
        return None
    rows = [r for r in rows if r["step"] == rows[0]["step"]]
    prompts = tokenizer.batch_decode([ex["prompt_input_ids"] for ex in data.sample_prompts],
                                     skip_special_tokens=False)
    if [r.get("prompt") for r in rows] != prompts:
        return None
    return [r["reference"] for r in rows]


def restore(state: TrainState, checkpoint: Path) -> None:
    """Weights, optimizer, schedule, loss state, RNG and counters of a checkpoint."""
    saved = load_checkpoint(checkpoint, state.policy, state.optimizer)
    state.scheduler.load_state_dict(saved["scheduler"])
    state.objective.load_state_dict(saved.get("objective", {}))
    if syncs_reference(state.cfg):  # TR-DPO: the reference has moved since the start
        state.reference.load_weights(saved["reference"], state.world)
    set_rng_state(saved["rng"])
    state.counters = Counters(**saved["counters"])


# ----------------------------------------------------------------------------- the step


def micro_batches_of(state: TrainState, examples: list[Example]) -> Iterator[dict]:
    """This rank's share of ``examples`` as collated micro-batches on the device."""
    return micro_batches(share(examples, state.world), state.cfg.micro_batch_size,
                         state.collate, state.world.device)


def train_step(state: TrainState, examples: list[Example]) -> dict[str, Any]:
    """One optimizer step on the global batch ``examples``: accumulate every micro-batch's
    gradient (exactly the full batch's), clip, step (skipped when the loss or gradient is not
    finite), advance the schedule and counters. Returns the step's logged record."""
    start = time.perf_counter()
    policy, objective, counters, world = state.policy, state.objective, state.counters, state.world
    denominator = objective.denominator(examples)  # of the global batch, on every rank
    stats: Counter = Counter()
    # Under FSDP2, gradients are reduced once per step, by the last micro-batch's backward
    # (or by every one's with reduce_every_micro_batch, keeping no unsharded gradients).
    last = -(-len(share(examples, world)) // state.cfg.micro_batch_size) - 1
    for i, batch in enumerate(micro_batches_of(state, examples)):
        gradient_sync(policy, world, i == last or state.cfg.reduce_every_micro_batch)
        with state.autocast():  # backward runs each op in its forward's dtype
            loss, micro_stats = objective(policy, state.reference, batch, denominator)
        state.release()  # what forward freed, before backward allocates gradients
        # FSDP averages gradients over ranks; scaling by the world size makes it a sum.
        (loss * world.size).backward()
        stats.update(micro_stats)
    stats = sum_across(stats, world)
    objective.after_step(stats)  # running statistics some losses keep (BCO's reward mean)
    grad_norm = grad_norm_value(
        torch.nn.utils.clip_grad_norm_(policy.parameters(), state.cfg.max_grad_norm))
    lr = state.scheduler.get_last_lr()[0]
    finite = math.isfinite(stats["loss"]) and math.isfinite(grad_norm)
    if finite:
        state.release()  # what backward freed, before the optimizer's temporaries
        state.optimizer.step()
    # A skipped update still advances the schedule with the step count.
    counters.skipped_steps += not finite
    counters.nonfinite_run = 0 if finite else counters.nonfinite_run + 1
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    counters.step += 1
    sync_reference(state)
    counters.examples += len(examples)
    counters.tokens += int(stats["tokens"])
    return {"split": "train", "step": counters.step, "examples": counters.examples,
            **finalize(stats), "grad_norm": grad_norm, "lr": lr, "tokens": counters.tokens,
            "skipped_steps": counters.skipped_steps,
            "examples_per_second": len(examples) / (time.perf_counter() - start)}


def next_examples(state: TrainState) -> list[Example]:
    """The global batch of the next step: a pure function of (seed, step), so resuming needs
    no data-loader state."""
    steps_per_epoch = len(state.data.train) // state.cfg.batch_size
    epoch, index = divmod(state.counters.step, steps_per_epoch)
    indices = batch_order(len(state.data.train), state.cfg.batch_size, state.cfg.seed, epoch)
    return [state.data.train[i] for i in indices[index]]


# ----------------------------------------------------------------------------- the cadence


def fit(state: TrainState) -> None:
    """Train to ``total_steps``: each step, then what is due after it."""
    if state.counters.step == 0:
        run_eval(state)  # the baseline: a DPO loss of ln 2 when policy and reference are equal
    first = True
    while state.counters.step < state.total_steps:
        examples = next_examples(state)
        record = train_step(state, examples)
        if first:  # the pace, measured on this run's first step
            first, seconds = False, len(examples) / record["examples_per_second"]
            left = state.total_steps - state.counters.step
            state.log.note(f"step {state.counters.step} took {duration(seconds)}: about "
                           f"{duration(seconds * left)} for the {left} steps left (evals and "
                           "sampling extra)")
        log_step(state, record)
        cfg = state.cfg
        if due(state, cfg.eval_every):
            run_eval(state)
        if cfg.n_samples and due(state, cfg.sample_every):
            run_samples(state)
        if due(state, cfg.save_every) and state.counters.nonfinite_run == 0:
            save(state)


def due(state: TrainState, every: int | None) -> bool:
    step = state.counters.step
    return bool(every) and step % every == 0 and step < state.total_steps


def log_step(state: TrainState, record: dict[str, Any]) -> None:
    """Log a step's record (every ``log_every`` steps, the last, and any non-finite one) and
    stop after ``max_nonfinite_steps`` non-finite steps in a row."""
    counters, cfg = state.counters, state.cfg
    finite = counters.nonfinite_run == 0
    logged = counters.step % cfg.log_every == 0 or counters.step == state.total_steps
    state.log.train(record, write=logged or not finite)
    if finite:
        return
    state.log.note(f"step {counters.step}: non-finite loss or gradient, update skipped")
    if counters.nonfinite_run >= cfg.max_nonfinite_steps:
        raise TrainingError(f"stopping: {counters.nonfinite_run} non-finite steps in a row (last "
                            f"at step {counters.step}); last good checkpoint: "
                            f"{latest_checkpoint(state.out) or 'none'}")


def run_eval(state: TrainState) -> None:
    """The objective's metrics on the held-out pairs, summed over every process."""
    mine = len(share(state.data.eval, state.world))
    batches = micro_batches_of(state, state.data.eval)
    with state.autocast():
        stats = evaluate(state.policy, state.reference, state.objective, batches,
                         state.progress, total=-(-mine // state.cfg.micro_batch_size))
        judged = state.judge(state.policy) if state.judge is not None else {}
    stats = sum_across(stats, state.world)
    state.log.eval({"split": "eval", "step": state.counters.step,
                    "examples": state.counters.examples, **finalize(stats), **judged})


def run_samples(state: TrainState) -> None:
    """Greedy completions of the held-out prompts, the policy's beside the reference's."""
    if state.sampler is None:
        return
    state.log.note(f"sampling {len(state.data.sample_prompts)} held-out prompts (greedy) ...")
    completions = {"policy": state.sampler(state.policy)}
    reference = state.reference.sample(state.sampler)
    if reference:
        completions["reference"] = reference
    prompts = state.tokenizer.batch_decode(
        [ex["prompt_input_ids"] for ex in state.data.sample_prompts], skip_special_tokens=False)
    for i, prompt in enumerate(prompts):
        state.log.sample({"step": state.counters.step, "prompt": prompt,
                          **{name: texts[i] for name, texts in completions.items()}})


def save(state: TrainState) -> None:
    """A checkpoint of everything ``restore`` reads back."""
    extra = ({"reference": state.reference.weights(state.world)}
             if syncs_reference(state.cfg) else {})
    save_checkpoint(state.out, state.counters.step, state.policy, state.optimizer, {
        "counters": dataclasses.asdict(state.counters),
        "scheduler": state.scheduler.state_dict(), "objective": state.objective.state_dict(),
        "rng": rng_state(), **extra}, state.cfg.keep_checkpoints, state.world)
    state.saved_step = state.counters.step


def finish(state: TrainState) -> Path:
    """The last eval and samples, then the export to ``final/``, the report and a summary."""
    cfg, world, out = state.cfg, state.world, state.out
    if state.counters.nonfinite_run == 0 and state.saved_step != state.counters.step:
        save(state)  # the final state, so that a larger max_steps can continue from it
    run_eval(state)
    if cfg.n_samples:
        run_samples(state)
    state.log.close()
    weights = full_state_dict(state.policy, world) if world.distributed else None
    if world.main:
        export = state.policy
        if cfg.lora and world.distributed:  # an unsharded copy holding the gathered weights
            export = apply_lora(load_model(cfg.model, dtype=weights_dtype(cfg)), cfg)
            export.load_state_dict(weights)
            weights = None
        if cfg.lora and cfg.lora_export == "merged":
            export = merged(export)  # after the last eval and samples: folds adapters in place
        final = save_pretrained(export, state.tokenizer, out / "final", state_dict=weights)
        report = write_report(out)
        print_summary(final, state.log.evals, state.data)
        print(f"report: {report}")
    barrier(world)
    return out


def train(cfg: TrainConfig, *, progress: bool = True) -> Path:
    """Run one stage end to end, in this process or as one rank under torchrun."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no CUDA device is available")
    world = init_world(cfg.device)
    try:
        cfg = resolve(cfg)  # the lock on output_dir is held by rank 0 until the run ends
        out = Path(cfg.output_dir)
        with claim_output_dir(out, resuming=cfg.resume is not None, hold=world.main):
            state = None
            try:
                state = setup(cfg, world, progress=progress and world.main)
                fit(state)
            except BaseException:
                if world.main and cfg.resume is None and (state is None
                                                          or state.counters.step == 0):
                    discard_start(out, state)
                raise
            return finish(state)
    finally:
        close_world(world)


# What a run writes before its first step; a fresh run that fails by then removes them.
START_FILES = ("config.yaml", "data_report.json", "eval_data_report.json", "metrics.jsonl",
               "samples.jsonl")


def discard_start(out: Path, state: TrainState | None) -> None:
    """Remove what a fresh run wrote before it failed (or was stopped) ahead of its first
    step, so that the folder holds no run that never began (``claim_output_dir`` then removes
    the folder it made)."""
    try:
        if state is not None and state.log is not None:
            state.log.close()
        for name in START_FILES:
            (out / name).unlink(missing_ok=True)
    except Exception:  # the failure being raised matters more than this cleanup
        pass


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


class _CallableModule(types.ModuleType):
    """``preftune.train`` is this module once anything imports it, and the Python API's
    ``train`` function otherwise: calling the module runs :func:`train`, so
    ``from preftune import train; train(config)`` works either way."""

    def __call__(self, cfg: TrainConfig, *, progress: bool = True) -> Path:
        return train(cfg, progress=progress)


sys.modules[__name__].__class__ = _CallableModule
