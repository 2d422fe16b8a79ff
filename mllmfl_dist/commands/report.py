"""``python -m mllmfl_dist report RUN_DIR``: write ``<RUN_DIR>/report/`` for any run directory."""

from __future__ import annotations

from mllmfl_dist.core.errors import ConfigError
from mllmfl_dist.core.layout import RunLayout
from mllmfl_dist.core.run_lock import holding_report
from mllmfl_dist.stages.report import read_run_config, write_report


def run(run_dir: str) -> int:
    layout = RunLayout(run_dir)
    path = layout.root
    if not layout.holds_a_run():
        raise ConfigError(
            f"report: {path} holds no run (no federated/, annotate/ or pretrain/ folder); give "
            f"<run.root>/<run.name>, e.g. runs/fmnist_lt (a compare row: runs/X/compare/fedavg/seed0)"
        )
    read_run_config(path)  # a config.toml that cannot be read is refused before the lock makes report/
    with holding_report(layout.report, "report"):
        summary = write_report(path)
    print(f"report: {path / 'report' / 'report.md'} ({', '.join(summary['plots']) or 'no plots'})")
    return 0
