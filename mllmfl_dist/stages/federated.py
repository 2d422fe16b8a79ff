"""Stage 2: federated finetuning, with evaluation, metrics, checkpoints and resume."""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mllmfl_dist.core import checkpoint, dist, preempt
from mllmfl_dist.config import Config, ConfigError, resume_differences
from mllmfl_dist.data import ClientData, DataError, build_client_data
from mllmfl_dist.evaluate import evaluate_model, imbalance_warning
from mllmfl_dist.fl.sampling import derive_seed
from mllmfl_dist.fl.strategies import STRATEGIES, RunContext, build_strategy
from mllmfl_dist.fl.trainer import FederatedTrainer
from mllmfl_dist.data.describe import describe_data, partition_record
from mllmfl_dist.core.locks import exclusive
from mllmfl_dist.core.jsonl import MetricsLog
from mllmfl_dist.models import FLModel, build_model
from mllmfl_dist.models.mllm import ModelLoadError
from mllmfl_dist.core.progress import evaluation_line, show_bars
from mllmfl_dist.tracking import Tracker, open_tracker

log = logging.getLogger(__name__)

TAG_MODEL_INIT = 3
# A strategy payload above this (per round, per rank, float64) is refused: CReFF's class gradients grow as
# classes^2 x feature width (ImageNet-LT with ResNet-50: 1000 x 1000 x 2049 entries, 16 GB).
MAX_PAYLOAD_BYTES = 2 * 2**30
CHECKPOINT_NAME = "checkpoint.pt"
ACCURACY_KEYS = ("acc", "acc_top1", "acc_many", "acc_medium", "acc_few")
FINAL_MODEL_NAME = "model_final.pt"
PARTITION_NAME = "partition.json"  # the per-client class histogram (rank 0)


def stage_dir(cfg: Config) -> Path:
    return cfg.run_dir / "federated"


def alignment_summary_path(cfg: Config) -> Path:
    return cfg.run_dir / "align" / "alignment_set.json"


def build_data(cfg: Config, runtime: dist.Runtime | None = None) -> ClientData:
    """The run's client data. With ``data.download`` on, rank 0 loads (downloads) first and the other ranks
    follow one at a time per data.root (a lock file in it): where data.root is local to each node, the
    first rank of another node downloads there while that node's other ranks wait, so several ranks never
    write the same download at once, whether or not the nodes share the folder."""
    def build() -> ClientData:
        return build_client_data(cfg.data, cfg.partition, cfg.federated.num_clients, cfg.run.seed)

    if runtime is None or not (runtime.distributed and cfg.data.download):
        return build()
    data, failure = None, None
    if runtime.is_server:
        try:
            data = build()
        except (ConfigError, DataError) as err:
            failure = str(err)
    # Rank 0's outcome reaches every rank, so a failed download ends them all with its message.
    failure = dist.broadcast_object(runtime, failure, "rank 0 to load the data first")
    if failure:
        raise DataError(failure)
    if data is not None:
        return data
    from mllmfl_dist.data.sources import CIFAR_DEFAULT_ROOT  # where load_cifar downloads with root empty

    root = Path(cfg.data.root or CIFAR_DEFAULT_ROOT).expanduser()
    with exclusive(root / ".mllmfl_download.lock"):
        return build()


def build_fl_model(cfg: Config, data: ClientData) -> FLModel:
    in_channels = cfg.model.in_channels or data.in_channels
    if in_channels != data.in_channels:
        raise ConfigError(
            f"model.in_channels = {cfg.model.in_channels} does not match the data's {data.in_channels} "
            f"channels ({cfg.data.source}); set it to {data.in_channels} or 0"
        )
    projection = STRATEGIES[cfg.federated.strategy].projection_dim(cfg)
    torch.manual_seed(derive_seed(cfg.run.seed, TAG_MODEL_INIT))
    model = build_model(cfg.model.arch, in_channels, data.num_classes, cfg.model.width_scale,
                        channels_last=cfg.model.channels_last)
    return model.add_projection(projection) if projection else model


def check_payload_size(cfg: Config, payload_numel: int) -> None:
    """Refuse a strategy whose per-round payload would not fit a round's all_reduce buffer."""
    size = payload_numel * 8
    if size > MAX_PAYLOAD_BYTES:
        raise ConfigError(
            f"federated.strategy = {cfg.federated.strategy!r} would add {size / 2**30:.1f} GiB per round to the "
            f"all_reduce (per-class classifier gradients: classes^2 x (feature width + 1) float64 entries); the "
            f"limit is {MAX_PAYLOAD_BYTES / 2**30:.0f} GiB. Use a task with fewer classes or a narrower feature "
            f"(model.width_scale, model.arch)")


def evaluate_global(cfg: Config, data: ClientData, model: FLModel, device: torch.device) -> dict[str, Any]:
    images, labels = data.test_set()
    return evaluate_model(model, images, labels, num_classes=data.num_classes,
                          train_class_counts=data.train_class_counts(), mean=data.mean, std=data.std,
                          batch_size=cfg.eval.batch_size, device=device)


def run_federated(cfg: Config, runtime: dist.Runtime) -> dict[str, Any]:
    """Run (or resume, or skip if complete) federated finetuning; returns the last evaluation on rank 0."""
    out = stage_dir(cfg)
    data = build_data(cfg, runtime)
    strategy = build_strategy(cfg)
    trainer = FederatedTrainer(cfg, runtime, data, build_fl_model(cfg, data), strategy)
    check_payload_size(cfg, trainer.payload_numel)
    alignment: _Alignment | None = None

    # Only rank 0 reads the checkpoint; its verdict (start round, or why it cannot resume) goes to every
    # rank, so a refused resume ends all ranks with the same message instead of leaving them waiting.
    refusal = None
    if runtime.is_server:
        # Temporary files of saves a killed job cut short (nothing of this job writes there yet).
        checkpoint.remove_stale_temps(out, cfg.run_dir, cfg.run_dir / "align", cfg.run_dir / "cache")
        try:
            resume_state = _load_resume_state(cfg, out)
            done = resume_state["round"] if resume_state is not None else 0
            # Before the RNG state is restored: loading a teacher may draw from the global generator.
            if cfg.align.every and done < cfg.federated.rounds:
                alignment = _Alignment(cfg, data, runtime.device)
                trainer.server_hook = alignment
            if resume_state is not None:
                trainer.load_state_dict(resume_state)
                checkpoint.set_rng_state(resume_state["rng"])
            elif cfg.model.pretrained_backbone:
                _load_pretrained_backbone(cfg, trainer.model)
        except (ConfigError, DataError, ModelLoadError, ValueError, OSError) as err:
            refusal = f"{err}" if isinstance(err, (ConfigError, DataError)) else f"{type(err).__name__}: {err}"
    start_round, refusal = dist.broadcast_object(runtime, (trainer.rounds_done, refusal),
                                                 "rank 0's resume verdict (checkpoint, alignment set, teacher)")
    if refusal:
        raise ConfigError(refusal)
    trainer.rounds_done = start_round
    trainer.broadcast_global()
    if start_round < cfg.federated.rounds:
        strategy.prepare(RunContext(cfg, runtime, data, cache_dir=cfg.run_dir / "cache"))

    metrics = MetricsLog(out) if runtime.is_server else None
    tracker = Tracker()
    if metrics is not None:
        log.info("%s", describe_data(cfg, data))
        imbalance = imbalance_warning(data.test_set()[1], data.class_names)
        if imbalance:
            log.warning("%s", imbalance)
        metrics.truncate_after(start_round)
        checkpoint.write_text_atomic(cfg.run_dir / "config.toml", cfg.to_toml())
        checkpoint.write_text_atomic(out / PARTITION_NAME, json.dumps(partition_record(cfg, data)))
        if start_round < cfg.federated.rounds:
            tracker = open_tracker(cfg, out, purge_step=start_round + 1)
        if start_round == cfg.federated.rounds:
            log.info("%s is complete (round %d); nothing to train. Delete it or raise federated.rounds to "
                     "train more.", out, start_round)
        elif start_round:
            log.info("resuming %s from round %d", out, start_round)
    last_eval = _last_record(metrics)
    # One line per round (timing and traffic), beside the per-evaluation metrics.
    rounds_log = MetricsLog(out, "rounds.jsonl") if runtime.is_server else None
    if rounds_log is not None:
        rounds_log.truncate_after(start_round)

    fed = cfg.federated
    bars = runtime.is_server and show_bars(cfg.log)
    if runtime.is_server and start_round < fed.rounds:
        log.info("federated: rounds %d-%d, %s, %d of %d clients per round on %d client host(s); %s",
                 start_round + 1, fed.rounds, fed.strategy, fed.clients_per_round, fed.num_clients,
                 len(runtime.client_hosts), f"trackers: {', '.join(tracker.names)}" if tracker.names else "no tracker")
    stage_started, since_eval = time.perf_counter(), []
    stopped_at = 0  # the round after which a stop request (preempt.py) ended the loop early
    # The bar closes (ends its line) however the loop ends, so an error line is not printed onto it.
    with tqdm(total=fed.rounds, initial=start_round, desc="federated", unit="round", disable=not bars,
              dynamic_ncols=True) as bar:
        if last_eval:
            bar.set_postfix(balanced_acc=f"{last_eval['acc']:.4f}")
        for round_index in range(start_round + 1, fed.rounds + 1):
            stats = trainer.run_round(round_index)
            # The round's all_reduce told every rank whether any was asked to stop, so all stop after the same
            # round (before rank 0's evaluation, which the hosts would otherwise overlap with the next round).
            stop = round_index < fed.rounds and stats.stop_requested
            stopped_at = round_index if stop else 0
            if not runtime.is_server:
                if stop:
                    break
                continue
            last_round = round_index == fed.rounds
            aligned = alignment.pop_round(round_index) if alignment is not None else {}
            round_record = {"round": round_index, "seconds": stats.seconds, "end_time": time.time(),
                            "bytes_all_reduced": stats.bytes_all_reduced, "bytes_broadcast": stats.bytes_broadcast,
                            "train_loss": stats.train_loss, **stats.server,
                            **({"align_loss": aligned["align_loss"]} if "align_loss" in aligned else {})}
            rounds_log.append(round_record)
            tracker.log(round_record, prefix="round/", step=round_index, skip=("round", "end_time"))
            since_eval.append(stats.seconds)
            if round_index % cfg.eval.every == 0 or last_round:
                report = evaluate_global(cfg, data, strategy.evaluation_model(trainer.model), runtime.device)
                last_eval = {"round": round_index, **report, "round_seconds": stats.seconds,
                             "bytes_all_reduced": stats.bytes_all_reduced, **aligned}
                metrics.append(last_eval)
                tracker.log(last_eval, prefix="eval/", step=round_index, class_names=data.class_names,
                            skip=("round", "round_seconds", "bytes_all_reduced", "align_loss"))
                bar.set_postfix(balanced_acc=f"{report['acc']:.4f}")
                if not bars:
                    log.info("%s", evaluation_line(last_eval, fed.rounds, sum(since_eval) / len(since_eval)))
                since_eval = []
            # A stop forces a checkpoint of its round whatever checkpoint.every says, so the resumed run
            # repeats no round (and so equals an uninterrupted one).
            if round_index % cfg.checkpoint.every == 0 or last_round or stop:
                checkpoint.save_atomic({**trainer.state_dict(), "rng": checkpoint.rng_state(),
                                        "config": cfg.to_dict()}, out / CHECKPOINT_NAME)
            bar.update(1)
            if stop:
                break
    if stopped_at:
        tracker.close()
        _stop_after_round(cfg, runtime, stopped_at)
    if runtime.is_server and start_round < fed.rounds:
        seconds = time.perf_counter() - stage_started
        log.info("federated: rounds %d-%d done in %.1f s (%.2f s/round)", start_round + 1, fed.rounds, seconds,
                 seconds / (fed.rounds - start_round))
    tracker.close()

    if runtime.is_server:
        # The evaluated model (CReFF / CLIP2FL: with the re-trained classifier), so `evaluate` reproduces it.
        # Written before any wait on the client hosts, so a rank lost now cannot cost the result.
        final = strategy.evaluation_model(trainer.model)
        checkpoint.save_atomic({k: v.detach().cpu().clone() for k, v in final.state_dict().items()},
                               out / FINAL_MODEL_NAME)
    peak_rss_mb = dist.max_over_ranks(runtime, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if runtime.is_server:
        summary = {"rounds": fed.rounds, "final": last_eval, "world_size": runtime.world_size,
                   "backend": runtime.backend, "peak_rss_mb_max_rank": peak_rss_mb,
                   "class_names": list(data.class_names), "train_class_counts": data.train_class_counts()}
        if cfg.align.every and alignment_summary_path(cfg).is_file():
            try:
                summary["alignment"] = json.loads(alignment_summary_path(cfg).read_text())
            except (OSError, ValueError) as err:  # a torn file: the summary goes without it
                log.warning("cannot read %s (%s); the summary omits the alignment set", alignment_summary_path(cfg),
                            err)
        checkpoint.write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    dist.stage_barrier(runtime, "the end of the federated stage", clients_idle=True)
    return last_eval or {}


def _stop_after_round(cfg: Config, runtime: dist.Runtime, round_index: int) -> None:
    """End a run stopped by a request (preempt.py) at ``round_index``: rank 0's checkpoint of that round is
    written; every rank waits for it before any exits (a launcher such as torchrun tears down the others as
    soon as one rank ends), then raises Preempted (rank 0's CLI prints it as the one line that says so)."""
    reason = (runtime.stop.reason if runtime.stop is not None else None) or \
        f"{preempt.STOP_SIGNAL.name} (received by another rank)"
    stopped = preempt.Preempted(round_index, cfg.federated.rounds, stage_dir(cfg) / CHECKPOINT_NAME, reason)
    dist.stage_barrier(runtime, "the checkpoint of the round the run stops after")
    preempt.exiting()
    raise stopped


def _load_resume_state(cfg: Config, out: Path) -> dict[str, Any] | None:
    path = out / CHECKPOINT_NAME
    if not path.exists():
        return None
    state = checkpoint.load_or_explain(path, "checkpoint")
    if not {"config", "round", "model", "server_optimizer", "rng"} <= set(state):
        raise ConfigError(f"{path} is not a federated checkpoint of this trainer; move it away to start over")
    differences = resume_differences(state["config"], cfg.to_dict())
    if differences:
        raise ConfigError(
            f"{path} was written with a different config ({'; '.join(differences)}); resume with the same "
            f"settings, or choose another run.name / delete {out} to start over"
        )
    if state["round"] > cfg.federated.rounds:
        raise ConfigError(
            f"{path} is at round {state['round']}, past federated.rounds = {cfg.federated.rounds}; "
            f"raise federated.rounds or choose another run.name"
        )
    return state


class _Alignment:
    """Rank 0's server hook: align every ``align.every`` rounds; in evaluated rounds, evaluate first too,
    so the metrics hold accuracy before and after alignment."""

    def __init__(self, cfg: Config, data: ClientData, device: torch.device):
        from mllmfl_dist.stages.align import build_alignment_set

        self.cfg, self.data, self.device = cfg, data, device
        self.set = build_alignment_set(cfg, data, cache_dir=cfg.run_dir / "align", device=device)
        self._records: dict[int, dict[str, Any]] = {}
        described = self.set.describe(cfg.align)
        # Kept beside the teacher cache, so a finished run's summary (and `compare`) can say what it used.
        checkpoint.write_text_atomic(alignment_summary_path(cfg), json.dumps(described, indent=2))
        accuracy = described["teacher_accuracy"]
        log.info("alignment set: %d images, %d with server-held labels (%s teacher%s)", described["images"],
                 described["server_labeled_images"], cfg.align.teacher,
                 "" if accuracy is None else f", accuracy {accuracy:.3f} on the set's labels")

    def __call__(self, model: FLModel, round_index: int) -> None:
        from mllmfl_dist.stages.align import align_model

        if round_index % self.cfg.align.every:
            return
        record: dict[str, Any] = {}
        if round_index % self.cfg.eval.every == 0 or round_index == self.cfg.federated.rounds:
            before = evaluate_global(self.cfg, self.data, model, self.device)
            record["before_align"] = {k: before[k] for k in (*ACCURACY_KEYS, "per_class")}
        record.update(align_model(model, self.set, self.cfg.align, self.data.mean, self.data.std,
                                  seed=self.cfg.run.seed, round_index=round_index, device=self.device))
        self._records[round_index] = record

    def pop_round(self, round_index: int) -> dict[str, Any]:
        return self._records.pop(round_index, {})


def pretrained_backbone_path(cfg: Config) -> Path:
    if cfg.model.pretrained_backbone == "pretrain":
        return cfg.run_dir / "pretrain" / "backbone.pt"
    return Path(cfg.model.pretrained_backbone)


def _load_pretrained_backbone(cfg: Config, model: FLModel) -> None:
    """Rank 0 loads the backbone (the classifier stays new); the first broadcast hands it to all."""
    path = pretrained_backbone_path(cfg)
    if not path.is_file():
        raise ConfigError(f"model.pretrained_backbone: {path} does not exist; run the pretrain stage first "
                          f"or point the key at a backbone state dict")
    try:
        model.load_backbone_state_dict(checkpoint.load_or_explain(path, "model.pretrained_backbone"))
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"model.pretrained_backbone: {path} does not fit {cfg.model.arch}: {err}") from None
    log.info("federated finetuning starts from the pretrained backbone %s", path)


def _last_record(metrics: MetricsLog | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    records = metrics.records()
    return records[-1] if records else None

