"""Where a run keeps what it writes: every path under ``<run.root>/<run.name>/``, named once.

``RunLayout(run_dir)`` works from the directory alone, so the stages (from a config's ``run_dir``), the
report and ``compare`` (from a directory on disk) agree on the names::

    config.toml                      the resolved config
    trackers.json                    the W&B and MLflow run ids
    annotate/  manifest.json, <shard>, <shard>.done.json
    pretrain/  backbone.pt, adapter.pt, metrics.json, deepspeed/
    federated/ checkpoint.pt, model_final.pt, summary.json, metrics.jsonl, rounds.jsonl, partition.json,
               client_state/ (per-client state of SCAFFOLD, FedDyn, ...)
    align/     alignment_set.json, teacher-<kind>-<key>.pt
    cache/     clip2fl-teacher-<key>.pt
    report/    summary.json, report.md, *.png
    baseline/  a run directory of its own (``run``'s FedAvg from scratch)
    compare/   <method>/seed<k>/ and stage1/seed<k>/ run directories, results.*, accuracy.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path  # the run directory

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # -- the run directory itself -----------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def trackers(self) -> Path:
        return self.root / "trackers.json"

    # -- stage 1 -------------------------------------------------------------------------------------------
    @property
    def annotate(self) -> Path:
        return self.root / "annotate"

    @property
    def manifest(self) -> Path:
        return self.annotate / "manifest.json"

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain"

    @property
    def backbone(self) -> Path:
        return self.pretrain / "backbone.pt"

    @property
    def adapter(self) -> Path:
        return self.pretrain / "adapter.pt"

    @property
    def pretrain_metrics(self) -> Path:
        return self.pretrain / "metrics.json"

    @property
    def deepspeed(self) -> Path:
        return self.pretrain / "deepspeed"

    # -- stage 2 and 3 ----------------------------------------------------------------------------------------
    @property
    def federated(self) -> Path:
        return self.root / "federated"

    @property
    def checkpoint(self) -> Path:
        return self.federated / "checkpoint.pt"

    @property
    def final_model(self) -> Path:
        return self.federated / "model_final.pt"

    @property
    def summary(self) -> Path:
        return self.federated / "summary.json"

    @property
    def metrics(self) -> Path:
        """One JSON record per evaluation."""
        return self.federated / "metrics.jsonl"

    @property
    def rounds(self) -> Path:
        """One JSON record per round."""
        return self.federated / "rounds.jsonl"

    @property
    def partition(self) -> Path:
        return self.federated / "partition.json"

    @property
    def client_state(self) -> Path:
        """The per-client state store's files (mllmfl_dist/fl/client_state.py), versioned by round."""
        return self.federated / "client_state"

    @property
    def align(self) -> Path:
        """The alignment set's description and its teacher cache."""
        return self.root / "align"

    @property
    def alignment_set(self) -> Path:
        return self.align / "alignment_set.json"

    @property
    def cache(self) -> Path:
        """Strategies' caches (CLIP2FL's teacher logits)."""
        return self.root / "cache"

    # -- after the stages -----------------------------------------------------------------------------------
    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def baseline(self) -> RunLayout:
        return RunLayout(self.root / "baseline")

    @property
    def compare(self) -> Path:
        return self.root / "compare"

    def holds_a_run(self) -> bool:
        """Whether any stage wrote here."""
        return any(p.is_dir() for p in (self.federated, self.annotate, self.pretrain))
