"""What a resumed stage may find changed in the config: one comparison, one policy per stage.

A stage saves the config it ran with beside its checkpoint. A rerun compares it with the current one and
refuses to continue when a setting differs that would change what the finished work computed (the list of
differences is the message); settings that cannot change it (where the run lives, how often it evaluates,
timeouts, ...) may differ. :func:`differences` is the comparison; a :class:`ResumePolicy` says which keys a
stage's results depend on and which of those may change anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mllmfl_dist.config import plugins
from mllmfl_dist.config.loader import flat_items
from mllmfl_dist.core import preflight
from mllmfl_dist.core.errors import ConfigError


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``name`` is one of ``patterns`` or under one ending in ``.`` (a section or table)."""
    return any(name == p or (p.endswith(".") and name.startswith(p)) for p in patterns)


@dataclass(frozen=True)
class ResumePolicy:
    """``reads``: the keys (or sections, ending in ``.``) the stage's results depend on, None for all of them;
    ``may_change``: those among them a resume may change."""

    reads: tuple[str, ...] | None
    may_change: tuple[str, ...]

    def compares(self, name: str) -> bool:
        return (self.reads is None or _matches(name, self.reads)) and not _matches(name, self.may_change)


# Federated finetuning: everything but where the run lives (a moved or renamed run directory resumes), how
# long it runs, how it reports, timeouts and stage 1 (the checkpoint already holds what stage 1 produced), and
# how a host trains its clients (federated.vectorize: the same model to float tolerance, as another world size).
FEDERATED = ResumePolicy(
    None,
    (
        "run.root",
        "run.name",
        "run.baseline",
        "federated.rounds",
        "data.root",
        "data.download",
        "dist.backend",
        "dist.timeout_minutes",
        "dist.control_timeout_minutes",
        "dist.init_timeout_minutes",
        "dist.wait_report_seconds",
        "eval.",
        "checkpoint.",
        "log.",
        "federated.client_state_mb",
        "federated.vectorize",
        "clip2fl.teacher_batch_size",
        "annotate.",
        "pretrain.",
    ),
)

# DWP: its own section and the settings outside it that shape the FL backbone, its input or the data order.
# (Not pretrain.steps: the alpha ramp and the cosine LR schedule are laid out over it.)
PRETRAIN = ResumePolicy(
    (
        "pretrain.",
        "run.seed",
        "model.arch",
        "model.width_scale",
        "model.in_channels",
        "data.source",
        "data.channels",
        "data.image_size",
    ),
    ("pretrain.checkpoint_every", "pretrain.model", "pretrain.shards", "pretrain.ranks", "pretrain.deepspeed.cpu_comm"),
)


# Keys added after configs were first saved, with the behaviour a config saved before them had: a resume of
# such a run compares against these, so a new key's non-default value is not taken silently.
# clip2fl.projection_dim was, before the key, the CLIP's embedding width, which no number here names: -1
# makes any value a difference.
IMPLIED_BEFORE_ADDED = {
    "data.val_per_class": 0,
    "data.train_fraction": 1.0,
    "align.clip_logit_scale": 100.0,
    "clip2fl.projection_dim": -1,
    "dp.enabled": False,
    "pretrain.global_batch_size": 0,
}
# Sections added whole after configs were first saved (a saved config lacks the table, not just the key).
SECTIONS_ADDED = ("dp",)


def differences(
    saved: dict[str, Any], current: dict[str, Any], policy: ResumePolicy, unread: tuple[str, ...] = ()
) -> list[str]:
    """``key: old -> new`` for every key both configs hold that differs where ``policy`` compares it (keys
    under ``unread`` are skipped: sections this run does not read); a key the saved config predates is
    compared with the behaviour it had then (:data:`IMPLIED_BEFORE_ADDED`)."""
    old_items = flat_items(saved)
    for name, implied in IMPLIED_BEFORE_ADDED.items():
        section = name.split(".", 1)[0]
        if name not in old_items and (isinstance(saved.get(section), dict) or section in SECTIONS_ADDED):
            old_items[name] = implied
    out = []
    for name, new in flat_items(current).items():
        old = old_items.get(name)
        if isinstance(old, str):  # a config saved before paths were expanded at load holds "~/..." for the same path
            old = preflight.expand_user(old)
        if name in old_items and old != new and policy.compares(name) and not _matches(name, unread):
            out.append(f"{name}: {old_items[name]!r} -> {new!r}")
    return out


def unread_sections(saved: dict[str, Any], current: dict[str, Any]) -> tuple[str, ...]:
    """The sections a federated run does not read, so their values cannot change its results: the strategy
    sections its strategy does not declare (so ``compare`` may add clip2fl.model after the baselines
    finished), and ``[align]`` while alignment is off before and after."""
    strategy = current.get("federated", {}).get("strategy")
    read = set(getattr(plugins.strategy_class(strategy), "sections", {}) or {}) if strategy else set()
    unread = tuple(f"{name}." for name in plugins.strategy_sections() if name not in read)
    if current.get("align", {}).get("every") == 0 and saved.get("align", {}).get("every", 0) == 0:
        unread += ("align.",)
    if not current.get("dp", {}).get("enabled") and not saved.get("dp", {}).get("enabled"):
        unread += ("dp.",)  # central DP off before and after: its settings change nothing
    return unread


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The differences that refuse a federated resume (:data:`FEDERATED`, minus the sections it does not read)."""
    return differences(saved, current, FEDERATED, unread_sections(saved, current))


def refuse_changed_config(where: Any, diffs: list[str], start_over: str) -> None:
    """The one refusal every stage gives: ConfigError naming ``where`` and the differences."""
    if diffs:
        raise ConfigError(
            f"{where} was written with a different config ({'; '.join(diffs)}); resume with the same "
            f"settings, or {start_over} to start over"
        )
