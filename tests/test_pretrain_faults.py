"""DWP (stage 1b) against planted, damaged and half-written files in its run directory, on real DeepSpeed
checkpoints from short real runs on the tiny models.

A planted pickle whose ``__reduce__`` would create a marker file is refused by name and never unpickled;
a checkpoint left empty or truncated by a power loss is set aside for the previous one, and the resumed
run equals a straight one bit for bit; a torn output is rewritten; a full disk is one line.
"""

from __future__ import annotations

import logging
import pickle
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mllmfl_dist.core import checkpoint, dist
from mllmfl_dist.__main__ import main
from mllmfl_dist.config import ConfigError, DistConfig, load_config

STEPS = 6


class Planted:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for any code an attacker wants run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(path: Path, marker: Path, zip_format: bool = False) -> None:
    """A malicious file in the legacy pickle format, or (``zip_format``) in torch.save's zip format."""
    path.unlink(missing_ok=True)
    payload = {"module": Planted(marker), "global_steps": 4}
    if zip_format:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))


def runtime() -> dist.Runtime:
    """One process, as the CLI starts it (which also fixes torch's thread count: CPU results depend on it, and
    runs compared bit for bit must use the same)."""
    return dist.init_runtime(DistConfig(threads=1), env={})


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory) -> dict:
    from mllmfl_dist.data.shards import write_shards

    root = tmp_path_factory.mktemp("dwp_faults")
    rng = np.random.default_rng(0)
    words = ["red", "blue", "cat", "dog", "small", "big"]
    samples = [
        {
            "key": f"k{i:03d}",
            "image": rng.integers(0, 256, (3, 32, 32), dtype=np.uint8),
            "txt": f"a {words[i % 6]} {words[(i + 2) % 6]}",
        }
        for i in range(28)
    ]
    write_shards(samples, str(root / "shards" / "cap"), 14)
    return {"root": root, "llava": tiny_models["llava"], "shards": root / "shards" / "*.tar.gz"}


def write_config(setup: dict, folder: Path, name: str = "dwp", extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(
        textwrap.dedent(f"""\
        [run]
        name = "{name}"
        root = "{folder / "runs"}"

        [data]
        source = "synthetic"
        channels = 3
        image_size = 16

        [log]
        progress = false
        tensorboard = false

        [pretrain]
        model = "{setup["llava"]}"
        shards = "{setup["shards"]}"
        steps = {STEPS}
        micro_batch_size = 4
        heldout = 4
        checkpoint_every = 2
        max_caption_tokens = 8
        """)
        + extra
    )
    return path


def pretrain(config: Path, overrides=(), stop_at=None):
    from mllmfl_dist.stages.pretrain import run_pretrain

    return run_pretrain(load_config(config, list(overrides)), runtime(), progress=False, stop_at=stop_at)


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory) -> dict:
    """A straight 6-step run, and a run stopped at step 4 (checkpoints global_step2 and global_step4)."""
    base = tmp_path_factory.mktemp("runs")
    straight = write_config(setup, base / "straight")
    pretrain(straight)
    stopped = write_config(setup, base / "stopped")
    pretrain(stopped, stop_at=4)
    return {"straight": load_config(straight).run_dir / "pretrain", "stopped": stopped}


def copy_of_stopped(runs: dict, tmp_path: Path) -> tuple[Path, Path]:
    """A fresh copy of the stopped run (config, deepspeed/ directory): ``(config, pretrain dir)``."""
    src = load_config(runs["stopped"]).run_dir
    config = tmp_path / runs["stopped"].name
    config.write_text(runs["stopped"].read_text().replace(str(runs["stopped"].parent), str(tmp_path)))
    dst = load_config(config).run_dir
    shutil.copytree(src, dst)
    return config, dst / "pretrain"


# ------------------------------------------------------------------------------------------ safe loading


def test_the_deepspeed_state_we_write_loads_with_weights_only(runs):
    from mllmfl_dist.stages.pretrain.resume import deepspeed_safe_globals

    folder = load_config(runs["stopped"]).run_dir / "pretrain" / "deepspeed"
    files = sorted(folder.glob("global_step*/*.pt"))
    assert [p.parent.name for p in files] == ["global_step2", "global_step4"]
    for path in files:
        state = checkpoint.load(path, deepspeed_safe_globals())
        assert state["global_steps"] == int(path.parent.name.removeprefix("global_step"))
        assert state["config"]["pretrain"]["steps"] == STEPS and "module" in state


def test_zero2_bf16_state_loads_with_weights_only_and_resumes_through_the_safe_engine(setup, tmp_path):
    """ZeRO's optimizer files hold DeepSpeed's loss scaler, stage enum and fragment addresses: the resume
    reads them through weights_only loading (DeepSpeed's own loader would unpickle them fully)."""
    from mllmfl_dist.stages.pretrain.resume import deepspeed_safe_globals

    config = write_config(setup, tmp_path, extra='[pretrain.deepspeed]\nzero_stage = 2\nprecision = "bf16"\n')
    overrides = ["pretrain.steps=4"]
    assert pretrain(config, overrides, stop_at=2)["stopped_at"] == 2
    folder = load_config(config).run_dir / "pretrain" / "deepspeed" / "global_step2"
    optim = [p for p in folder.glob("*.pt") if "optim_states" in p.name]
    assert optim, sorted(p.name for p in folder.iterdir())
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(optim[0], weights_only=True)  # the DeepSpeed classes really are in there
    state = checkpoint.load(optim[0], deepspeed_safe_globals())
    assert type(state["optimizer_state_dict"]["loss_scaler"]).__name__ == "LossScaler"
    metrics = pretrain(config, overrides)
    assert metrics["steps"] == 4 and [r["step"] for r in metrics["loss"]] == [1, 2, 3, 4]


def test_fp16s_dynamic_loss_scaler_loads_with_weights_only_too(tmp_path):
    """fp16 (GPU only, so no real run here) stores DeepSpeed's DynamicLossScaler in the optimizer states."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from mllmfl_dist.stages.pretrain.resume import deepspeed_safe_globals

    scaler = DynamicLossScaler(
        init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=2, consecutive_hysteresis=False
    )
    torch.save({"optimizer_state_dict": {"loss_scaler": scaler}}, tmp_path / "optim_states.pt")
    loaded = checkpoint.load(tmp_path / "optim_states.pt", deepspeed_safe_globals())["optimizer_state_dict"]
    assert isinstance(loaded["loss_scaler"], DynamicLossScaler) and vars(loaded["loss_scaler"]) == vars(scaler)


@pytest.mark.parametrize("zip_format", [False, True], ids=["pickle", "torch-zip"])
def test_a_planted_model_states_pickle_is_refused_by_name_and_never_run(runs, tmp_path, capsys, zip_format):
    config, out = copy_of_stopped(runs, tmp_path)
    planted = out / "deepspeed" / "global_step4" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "MARKER"
    plant_pickle(planted, marker, zip_format)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["pretrain", str(config)]) == 2
    err = capsys.readouterr().err
    assert not marker.exists(), "the planted pickle ran"
    lines = [line for line in err.splitlines() if line.startswith("mllmfl_dist: error:")]
    assert len(lines) == 1 and str(planted) in lines[0] and "not written by this trainer" in lines[0]
    assert "Traceback" not in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # refused, nothing moved or deleted


def test_a_planted_optimizer_file_is_refused_too(runs, tmp_path):
    """Another file DeepSpeed would load (a ZeRO optimizer partition, as another rank could have written)."""
    config, out = copy_of_stopped(runs, tmp_path)
    planted = out / "deepspeed" / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "MARKER"
    plant_pickle(planted, marker)
    with pytest.raises(ConfigError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt holds objects other than"):
        pretrain(config)
    assert not marker.exists()


def test_latest_must_name_a_tag_inside_the_checkpoint_directory(runs, tmp_path):
    config, out = copy_of_stopped(runs, tmp_path)
    ds_dir = out / "deepspeed"
    outside = tmp_path / "elsewhere"
    shutil.copytree(ds_dir / "global_step4", outside / "global_step4")
    marker = tmp_path / "MARKER"
    plant_pickle(outside / "global_step4" / "mp_rank_00_model_states.pt", marker)
    for text in ("../../../elsewhere/global_step4", str(outside / "global_step4"), "global_step4/../../x"):
        (ds_dir / "latest").write_text(text)
        with pytest.raises(ConfigError, match="not a checkpoint tag this trainer writes"):
            pretrain(config)
    (ds_dir / "latest").write_text("global_step9")
    (ds_dir / "global_step9").symlink_to(outside / "global_step4")
    with pytest.raises(ConfigError, match="global_step9 is not a plain directory"):
        pretrain(config)
    assert not marker.exists()


# ---------------------------------------------------------------------------------- damage and litter


def test_an_empty_newest_checkpoint_falls_back_to_the_previous_one_and_equals_a_straight_run(runs, tmp_path, caplog):
    config, out = copy_of_stopped(runs, tmp_path)
    ds_dir = out / "deepspeed"
    (ds_dir / "global_step4" / "mp_rank_00_model_states.pt").write_bytes(b"")  # a power loss
    litter = [out / ".backbone.pt.k3j2h1g0.tmp", ds_dir / "global_step2" / ".mp_rank_00_model_states.pt.a1b2c3d4.tmp"]
    for path in litter:
        path.write_bytes(b"x" * 1000)  # what a kill during a save leaves
    with caplog.at_level(logging.WARNING):
        metrics = pretrain(config)
    assert "global_step4 cannot be resumed" in caplog.text and "is empty" in caplog.text
    assert [r["step"] for r in metrics["loss"]] == list(range(1, STEPS + 1))
    straight = torch.load(runs["straight"] / "backbone.pt", weights_only=True)
    resumed = torch.load(out / "backbone.pt", weights_only=True)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert sorted(p.name for p in ds_dir.iterdir()) == [
        "global_step4",
        "global_step4.damaged",
        "global_step6",
        "latest",
    ]
    assert not any(p.exists() for p in litter)


def test_latest_missing_or_torn_resumes_from_the_newest_intact_checkpoint_and_deletes_nothing(runs, tmp_path, caplog):
    from mllmfl_dist.stages.pretrain.resume import find_resume_point

    _, out = copy_of_stopped(runs, tmp_path)
    ds_dir = out / "deepspeed"
    (ds_dir / "latest").unlink()
    with caplog.at_level(logging.WARNING):
        point = find_resume_point(ds_dir)
    assert point.tag == "global_step4" and point.step == 4 and "latest is missing" in caplog.text
    (ds_dir / "latest").write_bytes(b"")
    assert find_resume_point(ds_dir).tag == "global_step4"
    # A save cut short after its directory appeared but before `latest` moved on is set aside.
    (ds_dir / "latest").write_text("global_step2")
    assert find_resume_point(ds_dir).tag == "global_step2"
    assert sorted(p.name for p in ds_dir.iterdir()) == ["global_step2", "global_step4.damaged", "latest"]


def test_with_no_intact_checkpoint_the_stage_refuses_instead_of_starting_over(runs, tmp_path):
    config, out = copy_of_stopped(runs, tmp_path)
    ds_dir = out / "deepspeed"
    (ds_dir / "global_step4" / "mp_rank_00_model_states.pt").write_bytes(b"")
    states = ds_dir / "global_step2" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])  # truncated mid-file
    (ds_dir / "latest").unlink()
    before = {p: p.stat().st_size for p in ds_dir.rglob("*")}
    with pytest.raises(ConfigError, match=rf"no intact DeepSpeed checkpoint in {ds_dir} .*is truncated or corrupt"):
        pretrain(config)
    assert {p: p.stat().st_size for p in ds_dir.rglob("*")} == before  # nothing deleted, nothing restarted


def test_a_torn_backbone_is_rewritten_from_the_last_checkpoint(runs, tmp_path, caplog):
    src = runs["straight"].parent
    run_dir = tmp_path / "runs" / src.name
    shutil.copytree(src, run_dir)
    config = tmp_path / "dwp.toml"
    config.write_text((src.parent.parent / "dwp.toml").read_text().replace(str(src.parent.parent), str(tmp_path)))
    backbone = run_dir / "pretrain" / "backbone.pt"
    original = backbone.read_bytes()
    backbone.write_bytes(original[:100])
    with caplog.at_level(logging.WARNING):
        pretrain(config)
    assert "backbone.pt or adapter.pt is not the file metrics.json recorded" in caplog.text
    rewritten = torch.load(backbone, weights_only=True)
    expected = torch.load(runs["straight"] / "backbone.pt", weights_only=True)
    assert all(torch.equal(rewritten[k], expected[k]) for k in expected)


def test_a_full_disk_during_a_deepspeed_save_is_one_line(setup, tmp_path, capsys, small_disk):
    disk = small_disk("600k")  # room for the run's first files, not for DeepSpeed's first checkpoint
    config = write_config(setup, tmp_path)
    assert main(["pretrain", str(config), "--set", f"run.root={disk}"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mllmfl_dist: error:")]
    assert len(lines) == 1 and "no space left on the device" in lines[0] and "global_step2" in lines[0]
    assert "Traceback" not in err and "unexpected pos" not in err
    leftovers = [p.name for p in disk.rglob("*") if p.is_file() and checkpoint.stale_temp_target(p.name)]
    assert leftovers == []


def test_a_dwp_loss_that_goes_non_finite_stops_before_its_step_and_keeps_the_checkpoints(setup, tmp_path):
    from mllmfl_dist.fl.trainer import TrainingDivergedError

    config = write_config(
        setup, tmp_path, extra='\n[pretrain.deepspeed]\nlr = 1e30\ngradient_clipping = 0.0\nscheduler = "none"\n'
    )
    with pytest.raises(
        TrainingDivergedError,
        match=r"DWP step \d+: the language-model loss went non-finite.*"
        r"pretrain.deepspeed.lr = 1e\+30",
    ):
        pretrain(config)
    out = load_config(config).run_dir / "pretrain"
    assert not (out / "backbone.pt").exists()
    for state in out.glob("deepspeed/global_step*/mp_rank_00_model_states.pt"):  # what was saved is finite
        module = torch.load(state, weights_only=False)["module"]
        assert all(torch.isfinite(v).all() for v in module.values() if v.is_floating_point())
