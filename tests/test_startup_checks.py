"""Start-up checks (core/preflight.py): hostile settings of each kind (more ranks than GPUs, paths, numbers that
overflow, a config.toml that is not TOML) end in one line and exit 2 before anything is written, and Ctrl-C
ends a run with one line, exit 130 and its checkpoints intact. Each CLI case runs against a finished run and
checks that its files stay byte-identical."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from launchers import REPO, SMOKE, clean_env, sets
from mllmfl_dist.__main__ import main
from mllmfl_dist.config import ConfigError, DataConfig, config_from_dict, load_config
from mllmfl_dist.config.fields import PATH
from mllmfl_dist.config.loader import section_types
from mllmfl_dist.core import preflight

QUIET = ("log.progress=false", "log.tensorboard=false")


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-round smoke run under ``root``/smoke and its files, byte for byte."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["federate", str(SMOKE), *sets(f"run.root={root}", "federated.rounds=2", *QUIET)]) == 0
    return root, files_of(root)


def refused(capsys, argv: list[str], words: str, code: int = 2) -> str:
    """Run the CLI in this process; it must exit ``code`` with exactly one error line holding ``words``."""
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mllmfl_dist:")]
    assert len(lines) == 1 and "Traceback" not in err and words in lines[0], err[-2000:]
    return lines[0]


def refused_beside(
    capsys, finished, words: str, *overrides: str, command: str = "federate", config=SMOKE, extra: tuple[str, ...] = ()
) -> str:
    """A refused federate with the finished run's run.root; the finished run keeps every byte."""
    root, before = finished
    line = refused(capsys, [command, str(config), *extra, *sets(f"run.root={root}", *QUIET, *overrides)], words)
    assert files_of(root) == before
    return line


# ------------------------------------------------------------------------------------ 1. ranks and GPUs


def test_more_local_ranks_than_gpus_is_refused_under_nccl_only():
    with pytest.raises(
        ConfigError,
        match=r"4 ranks on this node but 2 visible GPU\(s\).*--nproc_per_node.*"
        r"CUDA_VISIBLE_DEVICES.*dist.backend = \"gloo\"",
    ):
        preflight.check_local_ranks(4, 2, "nccl")
    preflight.check_local_ranks(2, 2, "nccl")
    preflight.check_local_ranks(4, 2, "gloo")  # gloo ranks may share a GPU, or use none
    preflight.check_local_ranks(4, 0, "gloo")


def test_the_local_rank_count_comes_from_torchrun_or_slurm():
    assert preflight.local_world_size({}) == 1
    assert preflight.local_world_size({"LOCAL_WORLD_SIZE": "4", "SLURM_NTASKS_PER_NODE": "8"}) == 4
    step = {"SLURM_STEP_TASKS_PER_NODE": "2(x3),1"}
    assert preflight.local_world_size({**step, "SLURM_NODEID": "3"}) == 1
    assert preflight.local_world_size({**step, "SLURM_NODEID": "1"}) == 2
    assert preflight.local_world_size(step) == 2  # this node unknown: the largest count
    assert preflight.local_world_size({"SLURM_NTASKS_PER_NODE": "3"}) == 3


def test_four_ranks_on_a_two_gpu_node_stop_before_the_process_group(finished, monkeypatch, capsys):
    # The only fake here: the GPU count of this CPU machine (torch.cuda.device_count), as the issue allows.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
    }.items():  # port 1: nothing may connect
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    import torch.distributed as torch_dist

    # An in-process test before this one (DeepSpeed's single-process group) may have left a group behind:
    # what counts is that this command started none.
    initialized_before = torch_dist.is_initialized()
    refused_beside(capsys, finished, "4 ranks on this node but 2 visible GPU(s)", "dist.backend=nccl")
    assert torch_dist.is_initialized() == initialized_before


# ------------------------------------------------------------------------------------------------ 2. paths


def one_setting(key: str, value) -> dict:
    """The raw config with ``key`` (``section.name`` or ``section.table.name``) set to ``value``."""
    section, *table, name = key.split(".")
    raw: dict = {"run": {"name": "t"}}
    node = raw.setdefault(section, {})
    for part in table:
        node = node.setdefault(part, {})
    node[name] = value
    return raw


def path_settings() -> list[str]:
    return [
        f"{section}.{f.name}"
        for section, cls in section_types().items()
        for f in dataclasses.fields(cls)
        if f.metadata.get(PATH)
    ] + ["pretrain.deepspeed.config_file"]


def test_every_path_setting_expands_the_home_folder():
    settings = path_settings()
    assert {
        "run.root",
        "data.root",
        "data.lists_dir",
        "data.train_shards",
        "model.pretrained_backbone",
        "log.mlflow_uri",
        "align.teacher_model",
        "clip2fl.model",
        "pretrain.deepspeed.config_file",
    } <= set(settings)
    home = os.path.expanduser("~")
    for key in settings:
        section, *table, name = key.split(".")
        value = config_from_dict(one_setting(key, "~/x")).to_dict()[section]
        value = value[table[0]][name] if table else value[name]
        assert value == f"{home}/x", key
    cfg = config_from_dict(
        {"run": {"name": "t"}, "align": {"teacher_model": "local-dir:~/clip"}, "log": {"mlflow_uri": "file:~/ml"}}
    )
    assert (cfg.align.teacher_model, cfg.log.mlflow_uri) == (f"local-dir:{home}/clip", f"file:{home}/ml")


def test_a_run_root_under_the_home_folder_makes_no_folder_named_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(SMOKE, ["run.root=~/runs"])
    assert cfg.run_dir == tmp_path / "home" / "runs" / "smoke"
    assert not (tmp_path / "~").exists()


def test_an_empty_run_root_is_refused_and_nothing_lands_in_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    refused(capsys, ["federate", str(SMOKE), *sets("run.root=", *QUIET)], "run.root = '' is not allowed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "where, words", [("file", "is a file, not a folder"), ("file/below", "on the way to it, is a file")]
)
def test_a_run_root_that_is_or_goes_through_a_file_is_refused(finished, where, words, capsys):
    root, before = finished
    blocker = root / "file"
    blocker.write_text("not a folder\n")
    try:
        refused(capsys, ["federate", str(SMOKE), *sets(f"run.root={root / where}", *QUIET)], words)
        assert files_of(root) == {**before, "file": b"not a folder\n"}
    finally:
        blocker.unlink()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_a_run_root_in_a_read_only_folder_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    refused(capsys, ["federate", str(SMOKE), *sets(f"run.root={locked / 'runs'}", *QUIET)], "is not writable")
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize(
    "name, words",
    [
        ("n" * 300, "at most 255 bytes"),
        ("a\nb", "control characters"),
        ("a\x1b[2Jb", "control characters"),
        ("ü" * 130, "at most 255 bytes"),
    ],
)
def test_a_run_name_too_long_or_with_control_characters_is_refused(finished, name, words, capsys):
    refused_beside(capsys, finished, words, f"run.name={name}")


def test_a_run_dir_over_path_max_is_refused(finished, capsys):
    deep = "/".join(["d" * 200] * 20)  # 4020 bytes: every name fits NAME_MAX, the whole does not fit PATH_MAX
    refused_beside(capsys, finished, "PATH_MAX", "run.name=smoke", f"run.root={finished[0]}/{deep}")


def test_a_seed_suffix_that_takes_the_name_over_name_max_is_refused(finished, capsys):
    refused_beside(capsys, finished, "the file system", f"run.name={'n' * 252}", extra=("--seeds", "0,1"))


def test_an_input_path_with_a_newline_is_refused(finished, capsys):
    refused_beside(
        capsys, finished, "data.root = 'a\\nb' is not allowed; it holds control characters", "data.root=a\nb"
    )


# ---------------------------------------------------------------------------------------------- 3. numbers


def float_settings() -> list[tuple[str, str]]:
    return [
        (section, f.name)
        for section, cls in section_types().items()
        for f in dataclasses.fields(cls)
        if f.type in ("float", float)
    ]


@pytest.mark.parametrize(
    "value, words",
    [(1e39, "overflows float32"), (-1e39, "overflows float32"), (1e-39, "below float32's smallest normal")],
)
def test_every_float_setting_must_fit_float32(value, words):
    settings = float_settings()
    assert ("federated", "lr") in settings and ("creff", "lr_crt") in settings and len(settings) > 20
    for section, name in settings:
        with pytest.raises(ConfigError, match=rf"^{section}\.{name} = .* is not allowed; .*{words}"):
            config_from_dict(one_setting(f"{section}.{name}", value))


def test_lr_finite_in_the_toml_but_infinite_in_float32_is_refused(finished, tmp_path, capsys):
    config = tmp_path / "lr.toml"
    config.write_text(SMOKE.read_text().replace("lr = 0.05", "lr = 1e39"))
    refused_beside(
        capsys, finished, "federated.lr = 1e+39 is not allowed; it overflows float32", "run.name=smoke", config=config
    )
    refused_beside(capsys, finished, "overflows float32", "federated.lr=1e39")


@pytest.mark.parametrize(
    "override, words",
    [
        ("federated.rounds=123456789012345678901234567890", "must fit a 64-bit integer"),
        ("dist.timeout_minutes=1e20", "a number of minutes in (0, 1e+08]"),
        ("data.samples_per_class=10000000000", "the data needs about"),
        ("data.num_classes=1000000000", "the data needs about"),
    ],
)
def test_numbers_too_large_for_the_machine_are_refused(finished, override, words, capsys):
    refused_beside(capsys, finished, words, override)


def test_the_memory_estimate_bounds_what_the_synthetic_source_allocates():
    data = DataConfig(num_classes=10, samples_per_class=500, image_size=32)
    tracemalloc.start()
    try:
        from mllmfl_dist.data.synthetic import synthetic_arrays

        synthetic_arrays(data, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    estimate = preflight.data_memory_bytes(data, 20)
    assert peak <= estimate <= 2 * peak, (peak, estimate)  # measured: 92.9 MB peak, 122.9 MB estimated
    with pytest.raises(ConfigError, match=r"x 4 ranks on this node"):
        preflight.check_data_memory(data, 20, 3 * estimate, local_ranks=4)


def test_the_imagenet_lt_list_names_match_the_loader():
    from mllmfl_dist.data.imagenet_lt import LIST_FILES

    assert preflight.IMAGENET_LT_LISTS == tuple(LIST_FILES.values())


def test_a_config_with_a_utf8_byte_order_mark_loads(tmp_path):
    config = tmp_path / "bom.toml"
    config.write_bytes(b"\xef\xbb\xbf" + SMOKE.read_bytes())
    assert load_config(config).federated.lr == 0.05


def test_a_config_that_is_not_utf8_is_one_line(finished, tmp_path, capsys):
    config = tmp_path / "latin1.toml"
    config.write_bytes(SMOKE.read_bytes() + b'\n[log]\nproject = "caf\xe9"\n')
    refused_beside(capsys, finished, "not UTF-8 text", config=config)


# ----------------------------------------------------------------------------------------------- 4. Ctrl-C


def test_ctrl_c_ends_a_run_with_one_line_exit_130_and_its_checkpoint_resumes(tmp_path):
    out = tmp_path / "smoke" / "federated"
    argv = [sys.executable, "-m", "mllmfl_dist", "federate", str(SMOKE), *sets(f"run.root={tmp_path}", *QUIET)]
    # SIGINT back to its default in the child: a suite started in the background by a non-interactive shell
    # (`launch/test.sh &`) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    proc = subprocess.Popen(
        [*argv, "--set", "federated.rounds=500"],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "rounds.jsonl").exists() or len((out / "rounds.jsonl").read_text().splitlines()) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("mllmfl_dist:")]
    assert lines == [
        f"mllmfl_dist: interrupted (SIGINT) during federate {SMOKE}; checkpoints already written are "
        f"kept: rerun the same command to resume from the last one"
    ]
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["round"]
    assert saved >= 1  # rounds.jsonl had 2 rounds; the second one's checkpoint may not have been written yet
    # The same command (one round more than the checkpoint, to stay short) resumes from it.
    done = subprocess.run(
        [*argv, "--set", f"federated.rounds={saved + 1}"],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"rounds {saved + 1}-{saved + 1} done" in done.stderr, done.stderr[-3000:]  # resumed, not restarted
    assert torch.load(out / "checkpoint.pt", weights_only=True)["round"] == saved + 1


# ----------------------------------------------------------------------------------------- 5. report RUN_DIR


def test_report_names_a_config_toml_that_is_not_toml(finished, tmp_path, capsys):
    run = tmp_path / "smoke"
    shutil.copytree(finished[0] / "smoke", run)
    (run / "config.toml").write_text("[run\nname = 'x'\n")
    before = files_of(run)
    line = refused(capsys, ["report", str(run)], f"{run / 'config.toml'}: not valid TOML: ")
    assert "line 1" in line and files_of(run) == before and not (run / "report").exists()
