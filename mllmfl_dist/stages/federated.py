"""Stage 2: federated finetuning, with evaluation, metrics, checkpoints and resume.

The round itself is :class:`mllmfl_dist.fl.trainer.FederatedTrainer`; this module drives it: what the run
starts from (a checkpoint, a pretrained backbone or a fresh model, decided by rank 0 and heard by every rank),
the rounds with their records, evaluations and checkpoints, a stop request, and the final model and summary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import time
from typing import Any

from tqdm import tqdm

from mllmfl_dist.config import Config, ConfigError
from mllmfl_dist.config.resume import refuse_changed_config, resume_differences
from mllmfl_dist.core import checkpoint, dist, preempt
from mllmfl_dist.core.errors import DataError, ModelLoadError
from mllmfl_dist.core.jsonl import MetricsLog
from mllmfl_dist.core.progress import evaluation_line, show_bars
from mllmfl_dist.data.describe import describe_data, partition_record
from mllmfl_dist.fl.client import LocalTraining
from mllmfl_dist.fl.client_state import ClientStateStore
from mllmfl_dist.fl.dp import CentralDP, PrivacyLedger, noise_multiplier_of
from mllmfl_dist.fl.evaluate import evaluate_on_splits, imbalance_warning
from mllmfl_dist.fl.strategies import StrategyContext, build_strategy, strategy_class
from mllmfl_dist.fl.round_stats import RoundStats
from mllmfl_dist.fl.trainer import FederatedTrainer
from mllmfl_dist.stages.align_hook import AlignmentHook, alignment_hints
from mllmfl_dist.stages.inputs import build_data, build_fl_model, load_pretrained_backbone
from mllmfl_dist.tracking import Tracker, open_tracker

log = logging.getLogger(__name__)

# What a federated checkpoint holds; "strategy" was "server_optimizer" before (load_state_dict reads both).
CHECKPOINT_KEYS = ("config", "round", "model", "rng")


def run_federated(cfg: Config, runtime: dist.Runtime) -> dict[str, Any]:
    """Run (or resume, or skip if complete) federated finetuning; returns the last evaluation on rank 0."""
    return FederatedStage(cfg, runtime).run()


class FederatedStage:
    def __init__(self, cfg: Config, runtime: dist.Runtime):
        self.cfg, self.runtime, self.paths = cfg, runtime, cfg.paths
        fed = cfg.federated
        # Central DP's noise multiplier, calibrated on every rank (deterministic) before any collective of the
        # stage, so a target it cannot reach stops every rank with the same line instead of rank 0 alone.
        noise_multiplier = (
            noise_multiplier_of(cfg.dp, fed.num_clients, fed.clients_per_round, fed.rounds) if cfg.dp.enabled else 0.0
        )
        self.data = build_data(cfg, runtime)
        self.strategy = build_strategy(cfg)
        model = build_fl_model(cfg.model, self.data, cfg.run.seed, self.strategy.projection_dim)
        local = LocalTraining.of(cfg.federated, cfg.data, self.data.mean, self.data.std)
        # Rank 0 keeps every client's state (strategies with per-client state only; fl/client_state.py).
        store = (
            ClientStateStore(self.paths.client_state, int(cfg.federated.client_state_mb * 2**20))
            if runtime.is_server
            else None
        )
        # Central DP: rank 0 adds the noise and accounts the rounds; every host clips its clients' updates.
        self.privacy = (
            PrivacyLedger(cfg.dp, fed.num_clients, fed.clients_per_round, fed.rounds)
            if cfg.dp.enabled and runtime.is_server
            else None
        )
        if self.privacy is not None:
            log.info(
                "central DP: clip norm %g, noise multiplier %.4g, %s accountant at delta %g",
                cfg.dp.clip_norm,
                self.privacy.noise_multiplier,
                cfg.dp.accountant,
                cfg.dp.delta,
            )
        dp = CentralDP.of_module(model, cfg.dp.clip_norm, noise_multiplier, cfg.run.seed) if cfg.dp.enabled else None
        self.trainer = FederatedTrainer(
            fed, cfg.run.seed, local, runtime, self.data, model, self.strategy, client_states=store, dp=dp
        )
        # Rank 0 runs the alignment; every rank names its settings when it makes the model non-finite.
        self.trainer.server_hook_hints = alignment_hints(cfg.align) if cfg.align.every else []
        self.alignment: AlignmentHook | None = None
        self.metrics = MetricsLog(self.paths.metrics) if runtime.is_server else None
        self._stop_requests = 0  # how many ranks asked for the stop that ended the rounds, once one has
        self.rounds_log = MetricsLog(self.paths.rounds) if runtime.is_server else None  # timing and traffic
        self.tracker = Tracker()
        self.last_eval: dict[str, Any] | None = None
        self.set_up = False  # whether the strategy's setup ran in this process (not for a complete run)

    def run(self) -> dict[str, Any]:
        runtime, fed = self.runtime, self.cfg.federated
        start_round = dist.server_decides(
            runtime,
            self._start,
            "rank 0's resume verdict (checkpoint, alignment set, teacher)",
            catch=(ConfigError, DataError, ModelLoadError, ValueError, OSError),
        )
        self.trainer.rounds_done = start_round
        self.trainer.broadcast_global()
        if start_round < fed.rounds:
            self.strategy.setup(StrategyContext(runtime, self.data, self.paths.cache))
            self.set_up = True
        if runtime.is_server:
            self._open_records(start_round)
            if start_round < fed.rounds:
                self._log_teachers(start_round)
        stopped_at = self._rounds(start_round)
        if stopped_at:
            self.tracker.close()
            self._stop_after_round(stopped_at)
        self.tracker.close()
        self._finish()
        dist.stage_barrier(runtime, "the end of the federated stage", clients_idle=True)
        return self.last_eval or {}

    # -- where the run starts ---------------------------------------------------------------------------------
    def _start(self) -> int:
        """Rank 0: the round to start after (0: a new run), the model, strategy and RNG state restored from the
        checkpoint, or the pretrained backbone loaded; the alignment hook built when rounds remain."""
        cfg, paths = self.cfg, self.paths
        # Temporary files of saves a killed job cut short (nothing of this job writes there yet).
        checkpoint.remove_stale_temps(paths.federated, paths.root, paths.align, paths.cache)
        state = self._resume_state()
        done = state["round"] if state is not None else 0
        # Before the RNG state is restored: loading a teacher may draw from the global generator.
        if cfg.align.every and done < cfg.federated.rounds:
            self.alignment = self.trainer.server_hook = AlignmentHook(cfg, self.data, self.runtime.device)
        if state is None:
            self.trainer.forget_client_states()
        if state is not None:
            self.trainer.load_state_dict(state)
            checkpoint.set_rng_state(state["rng"])
        elif cfg.model.pretrained_backbone:
            load_pretrained_backbone(cfg, self.trainer.model)
        return self.trainer.rounds_done

    def _resume_state(self) -> dict[str, Any] | None:
        path = self.paths.checkpoint
        if not path.exists():
            return None
        state = checkpoint.load_or_explain(path, "checkpoint")
        if not set(CHECKPOINT_KEYS) <= set(state) or not {"strategy", "server_optimizer"} & set(state):
            raise ConfigError(f"{path} is not a federated checkpoint of this trainer; move it away to start over")
        refuse_changed_config(
            path,
            resume_differences(state["config"], self.cfg.to_dict()),
            f"choose another run.name / delete {self.paths.federated}",
        )
        if state["round"] > self.cfg.federated.rounds:
            raise ConfigError(
                f"{path} is at round {state['round']}, past federated.rounds = "
                f"{self.cfg.federated.rounds}; raise federated.rounds or choose another run.name"
            )
        return state

    def _open_records(self, start_round: int) -> None:
        """Rank 0: the data line, the records truncated to the rounds kept, the resolved config, the partition."""
        cfg, fed, data = self.cfg, self.cfg.federated, self.data
        log.info("%s", describe_data(cfg, data))
        imbalance = imbalance_warning(data.test_set()[1], data.class_names)
        if imbalance:
            log.warning("%s", imbalance)
        self.metrics.truncate_after(start_round)
        self.rounds_log.truncate_after(start_round)
        checkpoint.write_text_atomic(self.paths.config, cfg.to_toml())
        checkpoint.write_text_atomic(self.paths.partition, json.dumps(partition_record(cfg, data)))
        if start_round < fed.rounds:
            self.tracker = open_tracker(cfg, self.paths.federated, purge_step=start_round + 1)
            log.info(
                "federated: rounds %d-%d, %s, %d of %d clients per round on %d client host(s); %s",
                start_round + 1,
                fed.rounds,
                fed.strategy,
                fed.clients_per_round,
                fed.num_clients,
                len(self.runtime.client_hosts),
                f"trackers: {', '.join(self.tracker.names)}" if self.tracker.names else "no tracker",
            )
        elif start_round == fed.rounds:
            log.info(
                "%s is complete (round %d); nothing to train. Delete it or raise federated.rounds to train more.",
                self.paths.federated,
                start_round,
            )
        if 0 < start_round < fed.rounds:
            log.info("resuming %s from round %d", self.paths.federated, start_round)
        records = self.metrics.records()
        self.last_eval = records[-1] if records else None

    def _log_teachers(self, start_round: int) -> None:
        """Rank 0, once per run (and again on a resume): the teachers' accuracy and confidence to the tracker
        (CLIP2FL's on the clients' samples; the alignment teacher's on its set, also in alignment_set.json)."""
        record = dict(self.strategy.setup_summary())
        if self.alignment is not None and self.alignment.set.teacher is not None:
            record["align_teacher"] = {
                k.removeprefix("teacher_"): v for k, v in self.alignment.described.items() if k.startswith("teacher_")
            }
        if record:
            self.tracker.log(record, prefix="teacher/", step=start_round)

    # -- the rounds ------------------------------------------------------------------------------------------
    def _rounds(self, start_round: int) -> int:
        """Run the remaining rounds; returns the round after which a stop request (preempt.py) ended them (0:
        none did)."""
        fed, server = self.cfg.federated, self.runtime.is_server
        bars = server and show_bars(self.cfg.log)
        started, self._since_eval = time.perf_counter(), []
        # The bar closes (ends its line) however the loop ends, so an error line is not printed onto it.
        with tqdm(
            total=fed.rounds, initial=start_round, desc="federated", unit="round", disable=not bars, dynamic_ncols=True
        ) as bar:
            if self.last_eval:
                bar.set_postfix(balanced_acc=f"{self.last_eval['acc']:.4f}")
            for round_index in range(start_round + 1, fed.rounds + 1):
                stats = self.trainer.run_round(round_index)
                # The round's all_reduce told every rank whether any was asked to stop, so all stop after the
                # same round (before rank 0's evaluation, which the hosts would otherwise overlap with the next).
                stop = round_index < fed.rounds and stats.stop_requests > 0
                if server:
                    self._record_round(stats, stop, bar, bars)
                if stop:
                    self._stop_requests = stats.stop_requests
                    return round_index
        if server and start_round < fed.rounds:
            seconds = time.perf_counter() - started
            log.info(
                "federated: rounds %d-%d done in %.1f s (%.2f s/round)",
                start_round + 1,
                fed.rounds,
                seconds,
                seconds / (fed.rounds - start_round),
            )
        return 0

    def _record_round(self, stats: RoundStats, stop: bool, bar: tqdm, bars: bool) -> None:
        """Rank 0 after a round: its record, an evaluation when due, a checkpoint when due (always on a stop)."""
        cfg, round_index = self.cfg, stats.round
        last_round = round_index == cfg.federated.rounds
        aligned = self.alignment.pop_round(round_index) if self.alignment is not None else {}
        round_record = {
            "round": round_index,
            "seconds": stats.seconds,
            "end_time": time.time(),
            "bytes_all_reduced": stats.bytes_all_reduced,
            "bytes_broadcast": stats.bytes_broadcast,
            "train_loss": stats.train_loss,
            **stats.server,
            **({"dp_epsilon": self.privacy.epsilon(round_index)} if self.privacy else {}),
            **({"align_loss": aligned["align_loss"]} if "align_loss" in aligned else {}),
        }
        self.rounds_log.append(round_record)
        self.tracker.log(round_record, prefix="round/", step=round_index, skip=("round", "end_time"))
        self._since_eval.append(stats.seconds)
        if round_index % cfg.eval.every == 0 or last_round:
            model = self.strategy.evaluation_model(self.trainer.model)
            report = evaluate_on_splits(self.data, model, cfg.eval.batch_size, self.runtime.device)
            self.last_eval = {
                "round": round_index,
                **report,
                "round_seconds": stats.seconds,
                "bytes_all_reduced": stats.bytes_all_reduced,
                **aligned,
                **({"dp_epsilon": round_record["dp_epsilon"]} if self.privacy else {}),
            }
            self.metrics.append(self.last_eval)
            self.tracker.log(
                self.last_eval,
                prefix="eval/",
                step=round_index,
                class_names=self.data.class_names,
                skip=("round", "round_seconds", "bytes_all_reduced", "align_loss", "dp_epsilon"),
            )
            bar.set_postfix(
                balanced_acc=f"{report['acc']:.4f}",
                **({"val_acc": f"{report['val_acc']:.4f}"} if "val_acc" in report else {}),
            )
            if not bars:
                log.info(
                    "%s",
                    evaluation_line(
                        self.last_eval, cfg.federated.rounds, sum(self._since_eval) / len(self._since_eval)
                    ),
                )
            self._since_eval = []
        # A stop forces a checkpoint of its round whatever checkpoint.every says, so the resumed run
        # repeats no round (and so equals an uninterrupted one).
        if round_index % cfg.checkpoint.every == 0 or last_round or stop:
            checkpoint.save_atomic(
                {**self.trainer.state_dict(), "rng": checkpoint.rng_state(), "config": cfg.to_dict()},
                self.paths.checkpoint,
            )
            self.trainer.checkpoint_saved()
        bar.update(1)

    def _stop_after_round(self, round_index: int) -> None:
        """End a run stopped by a request (preempt.py) at ``round_index``: rank 0's checkpoint of that round is
        written; every rank waits for it before any exits (a launcher such as torchrun tears down the others
        as soon as one rank ends), then raises Preempted (rank 0's CLI prints it as the one line that says so)."""
        runtime = self.runtime
        # The same words on every rank: whichever rank prints the line (the first per node to get here),
        # it names the signal and how many ranks received it, not which rank this one is.
        size = runtime.world_size
        reason = f"{preempt.STOP_SIGNAL.name} (received by {self._stop_requests} of {size} rank{'s' * (size > 1)})"
        stopped = preempt.Preempted(round_index, self.cfg.federated.rounds, self.paths.checkpoint, reason)
        dist.stage_barrier(runtime, "the checkpoint of the round the run stops after")
        preempt.exiting()
        raise stopped

    # -- the end ------------------------------------------------------------------------------------------------
    def _finish(self) -> None:
        """The final model and the summary (rank 0), and every rank's peak memory."""
        cfg, runtime, data = self.cfg, self.runtime, self.data
        if runtime.is_server:
            # The evaluated model (CReFF / CLIP2FL: with the re-trained classifier), so `evaluate` reproduces
            # it. Written before any wait on the client hosts, so a rank lost now cannot cost the result.
            final = self.strategy.evaluation_model(self.trainer.model)
            checkpoint.save_atomic(
                {k: v.detach().cpu().clone() for k, v in final.state_dict().items()}, self.paths.final_model
            )
        peak_rss_mb = dist.max_over_ranks(runtime, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if not runtime.is_server:
            return
        models = strategy_class(cfg.federated.strategy).models(cfg.strategy_sections)
        summary = {
            "rounds": cfg.federated.rounds,
            "final": self.last_eval,
            "world_size": runtime.world_size,
            "backend": runtime.backend,
            "peak_rss_mb_max_rank": peak_rss_mb,
            "class_names": list(data.class_names),
            "train_class_counts": data.train_class_counts(),
            "strategy_models": [dataclasses.asdict(m) for m in models],
            **self.strategy.setup_summary(),
        }
        if self.privacy is not None:
            summary["dp"] = {
                "epsilon": self.privacy.epsilon(cfg.federated.rounds),
                "delta": cfg.dp.delta,
                "noise_multiplier": self.privacy.noise_multiplier,
                "clip_norm": cfg.dp.clip_norm,
                "accountant": cfg.dp.accountant,
            }
        if cfg.align.every and self.paths.alignment_set.is_file():
            try:
                summary["alignment"] = json.loads(self.paths.alignment_set.read_text())
            except (OSError, ValueError) as err:  # a torn file: the summary goes without it
                log.warning("cannot read %s (%s); the summary omits the alignment set", self.paths.alignment_set, err)
        if not self.set_up and self.paths.summary.is_file():
            # A complete run ran no setup now: what its setup reported (CLIP2FL's teacher) stays in the summary.
            try:
                for key, value in json.loads(self.paths.summary.read_text()).items():
                    summary.setdefault(key, value)
            except (OSError, ValueError, AttributeError) as err:
                log.warning("cannot read the previous %s (%s); it is rewritten without it", self.paths.summary, err)
        checkpoint.write_text_atomic(self.paths.summary, json.dumps(summary, indent=2))
