"""The training loop for Hugging Face causal LMs: setup -> fit -> save.

The same loop runs from the CLI, from tests and (later) inside the job worker; only the metric sinks
differ. Numbers leave the loop through ``sink.write(kind, step, payload)``, nothing else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lomo_core.config import FUSED_OPTIMIZERS, TrainConfig, load_config
from lomo_core.data import IGNORE_INDEX, BatchPlan, DataError, load_examples, pack_examples
from lomo_core.loss import chunked_causal_lm_loss, supports_chunked_loss
from lomo_core.memory import StepMemoryMeter
from lomo_core.metrics import JsonlSink, MetricSink, MultiSink
from lomo_core.optim import LOMO, AdaLomo
from lomo_core.zero3.runtime import CollectiveCounter, Ranks, ranks_from_env

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"


class Paused(Exception):
    """The run stopped at ``step`` after saving ``checkpoint``, as asked (``train(should_pause=...)``)."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"paused at step {step}")
        self.step, self.checkpoint = step, checkpoint


class TrainingError(RuntimeError):
    """The run cannot go on (NaN loss, unusable model); the message says what to change.

    ``code`` is a stable name for the kind of failure (``nan_loss``, ``invalid_model``,
    ``device_unavailable``), which the job service reports as the job's error code.
    """

    def __init__(self, message: str, code: str = "training_failed") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Position:
    """Where the run is: ``step`` updates done; the next batch is ``index`` of ``epoch``."""

    step: int = 0
    epoch: int = 0
    index: int = 0


@dataclass
class Run:
    config: TrainConfig
    model: Any
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    plan: BatchPlan
    validation: BatchPlan | None
    device: torch.device
    total_steps: int
    position: Position = field(default_factory=Position)
    loss_chunk_size: int | None = None
    data_summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # decisions taken at setup, reported as events
    ranks: Ranks = field(default_factory=Ranks)
    engine: Any = None  # the DeepSpeed engine when the model is ZeRO-3 partitioned
    collectives: CollectiveCounter | None = None
    last_loss: float | None = None  # the whole batch's loss of the last forward (set by _checked_loss)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of a global batch; with several ranks, of this rank's rows, weighted so that the
        mean of the ranks' gradients is the gradient of the whole batch's mean loss."""
        if self.ranks.distributed:
            from lomo_core.zero3.runtime import local_rows

            items = _target_tokens(batch) / self.ranks.world
            local = {k: v.to(self.device) for k, v in local_rows(batch, self.ranks).items()}
            if self.loss_chunk_size:
                return chunked_causal_lm_loss(self.model, local, self.loss_chunk_size, max(items, 1e-9))
            return self.model(**local, num_items_in_batch=max(items, 1e-9)).loss
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.loss_chunk_size:
            return chunked_causal_lm_loss(self.model, batch, self.loss_chunk_size)
        return self.model(**batch).loss

    def global_value(self, local: float) -> float:
        """The mean over ranks of a per-rank value (the loss of the whole batch, from weighted shares)."""
        if not self.ranks.distributed:
            return local
        from lomo_core.zero3.runtime import all_reduce_sum

        return all_reduce_sum([local], self.device)[0] / self.ranks.world

    @property
    def fused(self) -> bool:
        return self.config.optimizer in FUSED_OPTIMIZERS


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path | None
    steps: int
    losses: list[float]
    val_loss: float | None
    memory: dict[str, Any] | None
    trained_tokens: int
    seconds: float


# ------------------------------------------------------------------------------------------------ setup
def _pick_device(name: str, ranks: Ranks) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device=cuda but no CUDA device is available", code="device_unavailable")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name, ranks.local_rank) if name == "cuda" else torch.device(name)


def _load_model(folder: Path, config: TrainConfig, device: torch.device, ranks: Ranks) -> tuple[Any, Any, Any]:
    """The model, its tokenizer, and the DeepSpeed engine when it is ZeRO-3 partitioned over ranks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if ranks.distributed:
            from lomo_core.zero3.runtime import ds_config, load_zero3

            loaded = load_zero3(folder, config.torch_dtype, ds_config(config.batch_size, config.dtype))
            model, engine = loaded.model, loaded.engine
            model._lomo_hf_ds_config = loaded.hf_config  # lives as long as the model
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=config.torch_dtype)
    except (OSError, ValueError, KeyError) as e:
        raise TrainingError(f"cannot load a causal LM from {folder}: {e}", code="invalid_model") from None
    if engine is None:
        model.to(device)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        # Non-reentrant: each parameter's gradient completes once per backward, as the fused update needs.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model, tokenizer, engine


def _make_optimizer(config: TrainConfig, model: Any, engine: Any = None) -> torch.optim.Optimizer:
    clip = dict(clip_grad_norm=config.clip_grad_norm, clip_grad_value=config.clip_grad_value, engine=engine)
    if config.optimizer == "lomo":
        return LOMO(model, lr=config.lr, weight_decay=config.weight_decay, **clip)
    if config.optimizer == "adalomo":
        return AdaLomo(model, lr=config.lr, weight_decay=config.weight_decay, **clip)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _split(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(len(rows) * fraction)))
    if n_val >= len(rows):
        raise DataError(f"validation_split={fraction} leaves no training rows out of {len(rows)}")
    held = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def setup(config: TrainConfig) -> Run:
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    ranks = ranks_from_env()
    if ranks.world != config.nproc:
        raise TrainingError(f"nproc={config.nproc} but {ranks.world} rank(s) were started: launch with "
                            "`lomo train --nproc N` (torch.distributed.run)", code="launch_mismatch")
    if config.resume_from is not None:
        saved = torch.load(config.resume_from / STATE_FILE, map_location="cpu", weights_only=True)
        saved_world = saved.get("world", 1)
        if saved_world != ranks.world:
            raise TrainingError(f"{config.resume_from} was written by {saved_world} rank(s); resume it with "
                                f"nproc={saved_world}", code="invalid_checkpoint")
    device = _pick_device(config.device, ranks)
    if ranks.distributed:
        from lomo_core.zero3.runtime import init_distributed

        init_distributed(ranks, device)
    # A partitioned checkpoint holds partitions, not a model folder: the model comes from config.model.
    folder = config.resume_from if config.resume_from is not None and not ranks.distributed else config.model
    model, tokenizer, engine = _load_model(folder, config, device, ranks)

    loaded = load_examples(config.data, tokenizer, config.max_seq_len, config.data_format)
    rows = loaded.examples
    val_rows = None
    if config.validation_data is not None:
        val_rows = load_examples(config.validation_data, tokenizer, config.max_seq_len, config.data_format).examples
    elif config.validation_split > 0:
        rows, val_rows = _split(rows, config.validation_split, config.seed)
    if config.packing:
        rows = pack_examples(rows, config.max_seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    plan = BatchPlan(rows, config.batch_size, config.seed, config.shuffle, pad_id)
    validation = BatchPlan(val_rows, config.batch_size, config.seed, False, pad_id) if val_rows else None
    total = config.max_steps if config.max_steps is not None else config.epochs * plan.batches_per_epoch

    run = Run(config, model, tokenizer, _make_optimizer(config, model, engine), plan, validation, device, total,
              ranks=ranks, engine=engine, collectives=CollectiveCounter() if ranks.distributed else None)
    run.data_summary = {
        "format": loaded.format, "examples": len(loaded.examples), "truncated": loaded.truncated,
        "dropped": loaded.dropped, "rows": len(rows), "validation_rows": len(val_rows or []),
    }
    if config.loss_chunk_size:
        _, first = next(plan.iterate(0))
        if ranks.distributed:
            from lomo_core.zero3.runtime import all_reduce_sum, local_rows

            first = local_rows(first, ranks)
        first = {k: v.to(device) for k, v in first.items()}
        model.eval()
        supported = supports_chunked_loss(model, first, config.loss_chunk_size)
        if ranks.distributed:  # every rank takes the same decision, or their collectives would part ways
            supported = all_reduce_sum([float(supported)], device)[0] == ranks.world
        if supported:
            run.loss_chunk_size = config.loss_chunk_size
        else:
            run.notes.append("loss_chunk_size ignored: this model's logits are not a plain linear projection "
                             "of its last hidden state, so the chunked loss would differ; using its own loss")
        model.train()
    if config.resume_from is not None:
        _restore(run, config.resume_from, saved)
    return run


# ------------------------------------------------------------------------------------------------ one step
def lr_at(config: TrainConfig, step: int, total: int) -> float:
    """The learning rate for update number ``step`` (0-based): linear warmup, then the schedule."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    decay_steps = max(total - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / decay_steps, 1.0)
    floor = config.min_lr_ratio
    if config.lr_schedule == "linear":
        factor = 1.0 - (1.0 - floor) * progress
    else:
        factor = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * factor


def _checked_loss(run: Run, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
    loss = run.loss(batch)
    # with several ranks, the whole batch's loss (one all-reduce): every rank decides alike
    value = run.global_value(loss.item()) if run.ranks.distributed else loss.item()
    run.last_loss = value
    if not math.isfinite(float(value)):
        raise TrainingError(
            f"the loss became {float(value)} at step {step + 1}: lower lr, enable clip_grad_norm, "
            "or use bf16/fp32 instead of fp16",
            code="nan_loss",
        )
    return loss


def train_step(run: Run, batch: dict[str, torch.Tensor], lr: float) -> tuple[float, float | None, bool]:
    """One update; returns (loss, gradient norm if it was computed, whether the update was applied)."""
    model, optimizer, config = run.model, run.optimizer, run.config
    for group in optimizer.param_groups:
        group["lr"] = lr
    step = run.position.step
    if run.fused:
        skipped_before = optimizer.skipped_steps
        loss = optimizer.step(lambda: _checked_loss(run, batch, step))
        grad_norm = optimizer.last_grad_norm if optimizer.needs_norm_pass else None
        return run.last_loss, grad_norm, optimizer.skipped_steps == skipped_before
    optimizer.zero_grad(set_to_none=True)
    loss = _checked_loss(run, batch, step)
    loss.backward()
    grad_norm = None
    if config.clip_grad_value is not None:
        torch.nn.utils.clip_grad_value_(model.parameters(), config.clip_grad_value)
    if config.clip_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm))
    optimizer.step()
    return loss.item(), grad_norm, True


def _target_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def validation_loss(run: Run) -> float:
    """Token-weighted mean loss over the whole validation set."""
    assert run.validation is not None
    was_training = run.model.training
    run.model.eval()
    total, tokens = 0.0, 0
    for _, batch in run.validation.iterate(0):
        n = _target_tokens(batch)
        if run.ranks.distributed:  # loss(batch) weights this rank's share: the mean over ranks is the batch's
            total += run.global_value(run.loss(batch).item()) * n
        else:
            total += run.loss(batch).item() * n
        tokens += n
    run.model.train(was_training)
    return total / max(tokens, 1)


# ------------------------------------------------------------------------------------------------ checkpoints
def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(run: Run) -> Path:
    """A Hugging Face folder (safetensors + tokenizer) plus optimizer state, position and RNG; with
    several ranks, each rank's partitions and optimizer state (resumable on as many ranks)."""
    if run.ranks.distributed:
        return _save_partitioned(run)
    root = run.config.output_dir / "checkpoints"
    final = root / f"step-{run.position.step:06d}"
    partial = root / f".partial-step-{run.position.step:06d}"
    shutil.rmtree(partial, ignore_errors=True)
    run.model.save_pretrained(partial, safe_serialization=True)
    run.tokenizer.save_pretrained(partial)
    torch.save(
        {
            "position": vars(run.position).copy(),
            "optimizer": run.optimizer.state_dict(),
            "rng": _rng_state(),
            "config": json.loads(run.config.model_dump_json()),
        },
        partial / STATE_FILE,
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)  # a checkpoint folder is either complete or absent
    kept = sorted(p for p in root.iterdir() if p.name.startswith("step-"))
    for old in kept[: -run.config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _rank_file(folder: Path, rank: int) -> Path:
    return folder / f"zero3-rank-{rank:05d}.pt"


def _save_partitioned(run: Run) -> Path:
    import torch.distributed as dist

    from lomo_core.zero3.runtime import partition_state

    root = run.config.output_dir / "checkpoints"
    final = root / f"step-{run.position.step:06d}"
    partial = root / f".partial-step-{run.position.step:06d}"
    if run.ranks.main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    torch.save({"partitions": partition_state(run.model), "optimizer": run.optimizer.state_dict(),
                "rng": _rng_state()}, _rank_file(partial, run.ranks.rank))
    dist.barrier()
    if run.ranks.main:
        run.tokenizer.save_pretrained(partial)
        torch.save({"position": vars(run.position).copy(), "world": run.ranks.world,
                    "config": json.loads(run.config.model_dump_json())}, partial / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        kept = sorted(p for p in root.iterdir() if p.name.startswith("step-"))
        for old in kept[: -run.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _restore(run: Run, folder: Path, state: dict[str, Any]) -> None:
    """Continue from ``folder``, whose trainer state setup has already read (``state``)."""
    if run.ranks.distributed:
        from lomo_core.zero3.runtime import load_partition_state

        mine = torch.load(_rank_file(folder, run.ranks.rank), map_location="cpu", weights_only=True)
        load_partition_state(run.model, mine["partitions"])
        state = {**state, "optimizer": mine["optimizer"], "rng": mine["rng"]}
    run.optimizer.load_state_dict(state["optimizer"])
    run.position = Position(**state["position"])
    _set_rng_state(state["rng"])


def _set_rng_state(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = Path(output_dir) / "checkpoints"
    found = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return found[-1] if found else None


# ------------------------------------------------------------------------------------------------ the loop
#: called after each checkpoint is saved with (model, tokenizer, step): e.g. the job's evaluations on
#: the in-memory model (no second copy of the weights)
CheckpointCallback = Callable[[Any, Any, int], None]


def _at_checkpoint(run: Run, callback: CheckpointCallback | None, sink: MetricSink) -> None:
    """``callback`` on the model as saved, under no_grad, leaving the RNG and the training mode as they
    were, so that a run with it trains exactly like one without it."""
    if callback is None:
        return
    if run.ranks.distributed:  # the parameters are partitioned: nothing whole to score in this process
        if run.ranks.main and run.position.step == run.config.save_every:
            sink.write("event", run.position.step, {"message": "checkpoint evaluations skipped: the model is "
                                                               "partitioned over ranks", "level": "warning"})
        return
    rng = _rng_state()
    try:
        with torch.no_grad():
            callback(run.model, run.tokenizer, run.position.step)
    finally:
        run.model.train()
        _set_rng_state(rng)


def _due(run: Run, last_save: float, should_pause: Callable[[], bool] | None) -> tuple[bool, bool]:
    """After a step: (a ``save_every_minutes`` checkpoint is due, a pause was asked). On several ranks
    each is true when it is on any rank, so that all save and stop together; one all-reduce carries
    both, and none is made when neither can be asked for."""
    minutes = run.config.save_every_minutes if not run.config.save_every else None
    timed = bool(minutes) and time.perf_counter() - last_save >= minutes * 60
    pause = should_pause is not None and run.position.step < run.total_steps and bool(should_pause())
    if run.ranks.distributed and (minutes or should_pause is not None):
        from lomo_core.zero3.runtime import all_reduce_sum

        timed, pause = (flag > 0 for flag in all_reduce_sum([float(timed), float(pause)], run.device))
    return timed, pause


def fit(run: Run, sink: MetricSink, on_checkpoint: CheckpointCallback | None = None,
        should_pause: Callable[[], bool] | None = None) -> TrainResult:
    config, pos = run.config, run.position
    meter = StepMemoryMeter(run.model, run.optimizer, run.device)
    track_every_step = run.device.type == "cuda"
    losses: list[float] = []
    val_loss, last_memory, trained_tokens = None, None, 0
    started = last_save = time.perf_counter()
    run.model.train()
    sink.write("start", pos.step, {"total_steps": run.total_steps, "step": pos.step, **run.data_summary})
    for note in run.notes:
        sink.write("event", pos.step, {"message": note})
    if run.validation is not None and pos.step == 0:  # the base model's loss: what fine-tuning improves on
        base = validation_loss(run)
        sink.write("val", 0, {"loss": base, "perplexity": math.exp(min(base, 50))})

    while pos.step < run.total_steps:
        for index, batch in run.plan.iterate(pos.epoch, pos.index):
            if pos.step >= run.total_steps:
                break
            batch = {k: v.to(run.device) for k, v in batch.items()}
            lr = lr_at(config, pos.step, run.total_steps)
            track = track_every_step or pos.step == 0 or (pos.step + 1) % config.memory_interval == 0
            tic = time.perf_counter()
            sent_before = run.collectives.bytes_sent if run.collectives else 0
            counting = run.collectives.counting() if run.collectives else contextlib.nullcontext()
            with counting, meter.measure() if track else contextlib.nullcontext() as measured:
                loss, grad_norm, applied = train_step(run, batch, lr)
            seconds = time.perf_counter() - tic
            bytes_sent = run.collectives.bytes_sent - sent_before if run.collectives else 0
            pos.step, pos.index = pos.step + 1, index + 1
            tokens = int(batch["attention_mask"].sum())
            trained_tokens += tokens
            losses.append(loss)
            sink.write("train", pos.step, {
                "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                "tokens_per_s": tokens / seconds, "step_seconds": seconds, "epoch": pos.epoch,
                "loss_scale": getattr(run.optimizer, "loss_scale", None), "skipped": not applied,
                "bytes_sent": bytes_sent,
            })
            if track and measured is not None and measured.report is not None:
                last_memory = {**measured.report.as_dict(), "rank": run.ranks.rank, "bytes_sent_per_step": bytes_sent}
                for report in _per_rank(run, last_memory):
                    sink.write("memory", pos.step, report)
            if run.validation is not None and config.eval_every and pos.step % config.eval_every == 0:
                val_loss = validation_loss(run)
                sink.write("val", pos.step, {"loss": val_loss, "perplexity": math.exp(min(val_loss, 50))})
            saved = None
            timed, pause = _due(run, last_save, should_pause)
            if (config.save_every and pos.step % config.save_every == 0) or timed:
                saved = save_checkpoint(run)
                sink.write("checkpoint", pos.step, {"path": str(saved)})
                _at_checkpoint(run, on_checkpoint, sink)
                last_save = time.perf_counter()
            if pause:
                if saved is None:
                    saved = save_checkpoint(run)
                    sink.write("checkpoint", pos.step, {"path": str(saved), "pause": True})
                raise Paused(pos.step, saved)
        else:
            pos.epoch, pos.index = pos.epoch + 1, 0
            if config.save_every_epoch and not config.save_every and pos.step < run.total_steps:
                sink.write("checkpoint", pos.step, {"path": str(save_checkpoint(run)), "epoch_end": True})
                _at_checkpoint(run, on_checkpoint, sink)
                last_save = time.perf_counter()

    if run.validation is not None and not (config.eval_every and pos.step % config.eval_every == 0):
        val_loss = validation_loss(run)
        sink.write("val", pos.step, {"loss": val_loss, "perplexity": math.exp(min(val_loss, 50))})
    model_dir = None
    if config.save_final_model:
        model_dir = config.output_dir / "model"
        if run.ranks.distributed:
            from lomo_core.zero3.runtime import save_gathered

            save_gathered(run.model, run.tokenizer, model_dir, run.ranks)
        else:
            run.model.save_pretrained(model_dir, safe_serialization=True)
            run.tokenizer.save_pretrained(model_dir)
    result = TrainResult(config.output_dir, model_dir, pos.step, losses, val_loss, last_memory,
                         trained_tokens, time.perf_counter() - started)
    if run.ranks.main:
        summary = {k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items()}
        (config.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if last_memory is not None:
            (config.output_dir / "memory.json").write_text(json.dumps(last_memory, indent=2))
    sink.write("end", pos.step, {"steps": pos.step, "val_loss": val_loss})
    return result


def _per_rank(run: Run, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's memory report, in rank order (one collective; every rank measures the same steps)."""
    if not run.ranks.distributed:
        return [report]
    import torch.distributed as dist

    reports: list[Any] = [None] * run.ranks.world
    dist.all_gather_object(reports, report)
    return reports


def train(config: TrainConfig | dict[str, Any], sinks: Sequence[MetricSink] = (),
          on_checkpoint: CheckpointCallback | None = None,
          should_pause: Callable[[], bool] | None = None) -> TrainResult:
    """Run a whole training job. ``config`` may be a TrainConfig or a plain dict of its fields;
    ``on_checkpoint(model, tokenizer, step)`` runs after each checkpoint (one process only). When
    ``should_pause()`` turns true (checked after each step; on several ranks, when it does on any), the run
    saves a checkpoint (unless it just did) and raises Paused: resumed from it, it goes on exactly as if never
    stopped."""
    if not isinstance(config, TrainConfig):
        config = load_config(config)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the sinks report progress; no tqdm bars from save_pretrained
    config.output_dir.mkdir(parents=True, exist_ok=True)
    # With several ranks, rank 0 reports for all (memory of every rank included); the others say nothing.
    main = ranks_from_env().main
    sink = MultiSink([JsonlSink(config.output_dir / "metrics.jsonl"), *sinks] if main else [])
    try:
        return fit(setup(config), sink, on_checkpoint, should_pause)
    finally:
        sink.close()
