"""Stage 1b, Dynamic Weighted Pretraining (DWP), on tiny models on the CPU.

The tiny LLaVA is the project's (``build_tiny_models``, loaded through ``from_pretrained``; its LM head is
built sharp enough that captions depend on the visual tokens). Captions are generated from the images by
this LLaVA itself (greedy, as the annotate stage does; restricted to whole-word tokens so the caption text
tokenises back to the same tokens), so they are a function of the CLIP features.

DeepSpeed's first start on a machine compiles its CPU shared-memory communication op (about a minute,
cached in ~/.cache/torch_extensions afterwards); the rest of this file takes about a minute on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mllmfl_dist.core import dist
from mllmfl_dist.config import ConfigError, DeepSpeedConfig, PretrainConfig, load_config
from mllmfl_dist.data import DataError
from mllmfl_dist.mllm.llava import IGNORE_INDEX, llava_forward_with_visual_features
from mllmfl_dist.stages.pretrain.dwp import alpha_at, mix_visual_tokens
from launchers import free_port

REPO = Path(__file__).resolve().parents[1]
PROMPT = PretrainConfig().prompt
NUM_IMAGES = 48
NUM_PATTERNS = 6
HELDOUT = 12


def single_runtime() -> dist.Runtime:
    return dist.Runtime(0, 1, 0, "none", torch.device("cpu"), False)


def make_images(n: int, patterns: int, seed: int = 0) -> list[np.ndarray]:
    """32x32 RGB uint8 images: one of ``patterns`` random 4x4 colour blocks, plus a little noise."""
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, 256, size=(patterns, 3, 4, 4))
    images = []
    for i in range(n):
        base = np.kron(prototypes[i % patterns], np.ones((8, 8), dtype=np.int64))
        images.append(np.clip(base + rng.integers(-8, 9, size=base.shape), 0, 255).astype(np.uint8))
    return images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from PIL import Image

    from mllmfl_dist.data.shards import write_shards
    from mllmfl_dist.mllm.llava import load_llava
    from mllmfl_dist.standins.build import build_tiny_models

    root = tmp_path_factory.mktemp("dwp")
    built = build_tiny_models(root / "models")
    llava, processor = load_llava(str(built["llava"]), dtype="float32", device="cpu", device_map="")
    word = re.compile(r"^Ġ[A-Za-z]{2,}$")
    suppress = sorted(i for token, i in processor.tokenizer.get_vocab().items() if not word.match(token))
    images = make_images(NUM_IMAGES, NUM_PATTERNS)
    captions: list[str] = []
    with torch.no_grad():
        for start in range(0, NUM_IMAGES, 16):
            pil = [Image.fromarray(a.transpose(1, 2, 0)) for a in images[start : start + 16]]
            inputs = processor(images=pil, text=[PROMPT] * len(pil), return_tensors="pt", padding=True)
            out = llava.generate(
                **inputs,
                max_new_tokens=10,
                do_sample=False,
                suppress_tokens=suppress,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
            new = out[:, inputs["input_ids"].shape[1] :]
            captions += [c.strip() for c in processor.batch_decode(new, skip_special_tokens=True)]
    assert len(set(captions)) >= NUM_PATTERNS  # captions depend on the image
    samples = [
        {"key": f"img{i:04d}", "image": images[i], "txt": captions[i], "cls": i % NUM_PATTERNS}
        for i in range(NUM_IMAGES)
    ]
    write_shards(samples, str(root / "annotated" / "cap"), 16)
    # A shard without captions (and one sample with an empty caption): skipped, not trained on.
    write_shards(
        [{"key": "plain0", "image": images[0]}, {"key": "empty1", "image": images[1], "txt": "  "}],
        str(root / "annotated" / "zz-plain"),
        16,
    )
    return {"root": root, "llava": built["llava"], "shards": root / "annotated" / "*.tar.gz"}


def write_config(
    path: Path,
    tiny: dict[str, Path],
    name: str,
    *,
    steps: int = 60,
    lr: float = 3e-3,
    checkpoint_every: int = 20,
    extra: str = "",
    pretrain_extra: str = "",
) -> Path:
    text = (
        textwrap.dedent(f"""\
        [run]
        name = "{name}"
        root = "{path / "runs"}"
        seed = 0

        [data]
        source = "synthetic"
        channels = 3
        image_size = 16

        [model]
        arch = "resnet8"

        [log]
        progress = false
        tensorboard = false

        [pretrain]
        model = "{tiny["llava"]}"
        shards = "{tiny["shards"]}"
        steps = {steps}
        micro_batch_size = 8
        heldout = {HELDOUT}
        checkpoint_every = {checkpoint_every}
        max_caption_tokens = 16
        {pretrain_extra}

        [pretrain.deepspeed]
        optimizer = "AdamW"
        lr = {lr}
        warmup_steps = 0
        scheduler = "WarmupCosineLR"
        """)
        + extra
    )
    config = path / f"{name}.toml"
    config.write_text(text)
    return config


class EngineCapture:
    """Wraps ``deepspeed.initialize`` to keep the engines the stage creates."""

    def __init__(self, monkeypatch):
        import deepspeed

        self.engines = []
        real = deepspeed.initialize

        def initialize(*args, **kwargs):
            out = real(*args, **kwargs)
            self.engines.append(out[0])
            return out

        monkeypatch.setattr(deepspeed, "initialize", initialize)


# ------------------------------------------------------------------------------------------ pure parts


def test_alpha_schedule_linear_cosine_and_clamp():
    # linear from 0 over ramp_fraction 0.5 of 100 steps: 0.02 per step, 1 from step 50 on
    assert alpha_at(0, 100) == 0.0
    assert alpha_at(25, 100) == pytest.approx(0.5)
    assert alpha_at(49, 100) == pytest.approx(0.98)
    assert [alpha_at(s, 100) for s in (50, 51, 99, 100, 500)] == [1.0] * 5
    assert alpha_at(10, 100, alpha_start=0.2, ramp_fraction=0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    # cosine: half a cosine, flat at both ends
    assert alpha_at(0, 100, schedule="cosine") == 0.0
    assert alpha_at(25, 100, schedule="cosine") == pytest.approx(0.5)
    assert alpha_at(10, 100, schedule="cosine") == pytest.approx((1 - math.cos(math.pi * 0.2)) / 2)
    assert alpha_at(10, 100, schedule="cosine") < alpha_at(10, 100)
    assert alpha_at(60, 100, schedule="cosine") == 1.0
    # ramp over the whole run
    assert alpha_at(99, 100, ramp_fraction=1.0) == pytest.approx(0.99)
    values = [alpha_at(s, 40, 0.1, "cosine", 0.75) for s in range(40)]
    assert values == sorted(values) and values[0] == pytest.approx(0.1) and values[-1] == 1.0
    with pytest.raises(ValueError):
        alpha_at(0, 10, schedule="step")


def test_deepspeed_config_maps_the_toml_fields():
    from mllmfl_dist.stages.pretrain import deepspeed_config

    pcfg = PretrainConfig(
        steps=300,
        micro_batch_size=4,
        deepspeed=DeepSpeedConfig(
            zero_stage=2,
            precision="bf16",
            gradient_accumulation_steps=3,
            optimizer="AdamW",
            lr=2e-4,
            weight_decay=0.05,
            scheduler="WarmupCosineLR",
            warmup_steps=30,
            gradient_clipping=0.5,
        ),
    )
    config = deepspeed_config(pcfg, 4)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 4 * 3 * 4
    assert config["zero_optimization"] == {"stage": 2}
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert config["optimizer"] == {"type": "AdamW", "params": {"lr": 2e-4, "weight_decay": 0.05}}
    assert config["scheduler"]["type"] == "WarmupCosineLR"
    assert config["scheduler"]["params"]["total_num_steps"] == 300
    assert config["scheduler"]["params"]["warmup_num_steps"] == 30
    assert config["gradient_clipping"] == 0.5
    assert config["steps_per_print"] > 10**6
    # On the CPU: torch's Adam/AdamW through DeepSpeed (no compiled op); "Adam" is Adam, not AdamW.
    adam = PretrainConfig(
        deepspeed=DeepSpeedConfig(optimizer="Adam", precision="fp16", scheduler="WarmupLR", warmup_steps=0, lr=0.01)
    )
    config = deepspeed_config(adam, 1, torch_optimizer=True)
    assert config["optimizer"]["params"] == {"lr": 0.01, "weight_decay": 0.0, "adam_w_mode": False, "torch_adam": True}
    assert config["fp16"] == {"enabled": True} and config["bf16"] == {"enabled": False}
    assert config["scheduler"] == {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0.01, "warmup_max_lr": 0.01, "warmup_num_steps": 1, "warmup_type": "linear"},
    }
    sgd = PretrainConfig(deepspeed=DeepSpeedConfig(optimizer="SGD", scheduler="none"))
    config = deepspeed_config(sgd, 2, torch_optimizer=True)
    assert config["optimizer"] == {"type": "SGD", "params": {"lr": 1e-3, "weight_decay": 0.0}}
    assert "scheduler" not in config and config["train_batch_size"] == 16


def test_a_global_batch_size_sets_the_accumulation_per_world_size_and_refuses_one_it_cannot_split():
    from mllmfl_dist.stages.deepspeed_setup import accumulation_steps

    pcfg = PretrainConfig(micro_batch_size=8, global_batch_size=24)
    assert [accumulation_steps(pcfg, n) for n in (1, 3)] == [3, 1]
    assert deepspeed_config_of(pcfg, 1)["train_batch_size"] == deepspeed_config_of(pcfg, 3)["train_batch_size"] == 24
    with pytest.raises(ConfigError) as refused:
        accumulation_steps(pcfg, 2)
    assert str(refused.value).count("\n") == 0 and "run DWP on 1, 3 processes" in str(refused.value)
    # unset: the batch grows with the world, as DeepSpeed's own default
    assert accumulation_steps(PretrainConfig(micro_batch_size=8), 2) == 1


def deepspeed_config_of(pcfg: PretrainConfig, world: int) -> dict:
    from mllmfl_dist.stages.pretrain import deepspeed_config

    return deepspeed_config(pcfg, world)


def test_micro_batches_are_disjoint_over_ranks_and_a_function_of_seed_and_step():
    from mllmfl_dist.stages.pretrain import micro_batch_indices

    kw = {"micro_batch_size": 4, "grad_accum": 2, "dp_world": 3}
    n = 100
    for step in (0, 3, 7):  # 24 samples a step: step 4 straddles the first epoch's end
        seen = [i for r in range(3) for j in range(2) for i in micro_batch_indices(n, 5, step, j, dp_rank=r, **kw)]
        assert len(seen) == len(set(seen)) == 24
    epoch = [
        i
        for step in range(4)
        for r in range(3)
        for j in range(2)
        for i in micro_batch_indices(n, 5, step, j, dp_rank=r, **kw)
    ]
    assert len(set(epoch)) == 96  # no sample twice within an epoch
    assert micro_batch_indices(n, 5, 3, 1, dp_rank=2, **kw) == micro_batch_indices(n, 5, 3, 1, dp_rank=2, **kw)
    assert micro_batch_indices(n, 5, 0, 0, dp_rank=0, **kw) != micro_batch_indices(n, 6, 0, 0, dp_rank=0, **kw)


# ------------------------------------------------------------------------------- the model plumbing


def test_alpha0_path_is_the_models_own_forward(tiny):
    from mllmfl_dist.mllm.llava import clip_visual_features, load_llava
    from mllmfl_dist.stages.pretrain import BatchBuilder, FLInput, load_captioned

    llava, processor = load_llava(str(tiny["llava"]), dtype="float32", device="cpu", device_map="")
    samples, skipped = load_captioned(str(tiny["shards"]))
    assert len(samples) == NUM_IMAGES and {s["key"] for s in skipped} == {"plain0", "empty1"}
    assert [s.key for s in samples] == sorted(s.key for s in samples)
    builder = BatchBuilder(processor, PROMPT, 6, FLInput(3, 16, (0.5,) * 3, (0.25,) * 3))
    batch = builder(samples[:5])
    assert batch.x_fl.shape == (5, 3, 16, 16)

    # Labels: caption tokens (at most 6) and EOS; -100 on the prompt, the image tokens and the padding.
    eos, image_id = processor.tokenizer.eos_token_id, llava.config.image_token_id
    prompt_len = processor(images=[batch_image(samples[0])], text=[PROMPT], return_tensors="pt")["input_ids"].shape[1]
    for ids, mask, labels in zip(batch.input_ids, batch.attention_mask, batch.labels):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert (labels[:prompt_len] == IGNORE_INDEX).all() and (labels[n:] == IGNORE_INDEX).all()
        assert torch.equal(labels[prompt_len:n], ids[prompt_len:n]) and ids[n - 1] == eos
        assert 2 <= n - prompt_len <= 7
        assert int((ids == image_id).sum()) == 16 and (labels[ids == image_id] == IGNORE_INDEX).all()

    with torch.no_grad():
        own = llava(
            input_ids=batch.input_ids,
            pixel_values=batch.pixel_values,
            attention_mask=batch.attention_mask,
            labels=batch.labels,
        )
        clip = clip_visual_features(llava, batch.pixel_values)
        fl = torch.randn_like(clip) * 5
        mine = llava_forward_with_visual_features(
            llava, mix_visual_tokens(fl, clip, 0.0), batch.input_ids, batch.attention_mask, batch.labels
        )
        other = llava_forward_with_visual_features(
            llava, mix_visual_tokens(fl, clip, 0.5), batch.input_ids, batch.attention_mask, batch.labels
        )
    assert torch.equal(mine.logits, own.logits)
    assert mine.loss.item() == own.loss.item()
    assert abs(other.loss.item() - own.loss.item()) > 1e-3  # the visual tokens matter


def batch_image(sample):
    from mllmfl_dist.data.images import decode_image

    return decode_image(sample.image_bytes).convert("RGB")


# ------------------------------------------------------------------------------------ the stage runs


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """One 60-step DWP run (batch 8, AdamW lr 3e-3, cosine LR, alpha linear 0 -> 1 over 30 steps)."""
    path = tmp_path_factory.mktemp("trained")
    # A server holdout gives the stage a labelled set for its linear probe (it changes nothing DWP reads).
    cfg = load_config(write_config(path, tiny, "dwp"), ["data.server_holdout_per_class=10"])
    with pytest.MonkeyPatch.context() as mp:
        capture = EngineCapture(mp)
        from mllmfl_dist.stages.pretrain import run_pretrain

        metrics = run_pretrain(cfg, single_runtime(), progress=False)
    return cfg, metrics, capture.engines


def test_training_steps_go_through_the_deepspeed_engine(trained):
    from deepspeed.runtime.engine import DeepSpeedEngine

    cfg, metrics, engines = trained
    assert len(engines) == 1
    engine = engines[0]
    assert isinstance(engine, DeepSpeedEngine)
    assert engine.global_steps == cfg.pretrain.steps == metrics["steps"]
    # the engine's optimizer (torch AdamW, built by DeepSpeed from the config) took every step
    assert isinstance(engine.optimizer, torch.optim.AdamW)
    states = [engine.optimizer.state[p] for p in engine.module.parameters()]
    assert all(float(s["step"]) == cfg.pretrain.steps for s in states)
    assert engine.lr_scheduler is not None and engine.lr_scheduler.last_batch_iteration == cfg.pretrain.steps - 1
    assert metrics["deepspeed"]["engine"] == "DeepSpeedEngine" and metrics["deepspeed"]["optimizer"] == "AdamW"
    assert metrics["deepspeed"]["config"]["optimizer"]["params"]["torch_adam"] is True


def test_dwp_lowers_the_heldout_loss_of_the_fl_features(trained):
    cfg, metrics, _ = trained
    step0, final, clip = (
        metrics["heldout_loss_alpha1_step0"],
        metrics["heldout_loss_alpha1"],
        metrics["heldout_loss_alpha0"],
    )
    print(
        f"held-out LM loss: FL features {step0:.3f} -> {final:.3f}; CLIP features {clip:.3f}; "
        f"{metrics['samples_per_second']:.1f} samples/s"
    )
    assert final < 0.7 * step0
    assert final < clip + 0.5  # the LLM reads the FL features about as well as CLIP's
    losses = metrics["loss"]
    assert [r["step"] for r in losses] == list(range(1, 61))
    assert losses[0]["alpha"] == 0.0 and losses[15]["alpha"] == pytest.approx(0.5) and losses[-1]["alpha"] == 1.0
    assert metrics["heldout_samples"] == HELDOUT and metrics["captioned_samples"] == NUM_IMAGES
    assert metrics["skipped_samples"] == 2 and metrics["world_size"] == 1 and metrics["samples_per_second"] > 0
    # the synthetic source's own normalisation, which stage 2 uses too
    assert metrics["fl_input"] == {"channels": 3, "size": 16, "mean": [0.5] * 3, "std": [0.25] * 3}


def test_metrics_hold_the_linear_probe_of_the_backbone_and_of_its_random_init(trained, capsys):
    """The probe figures beside the held-out losses are those ``probe`` gives for backbone.pt and the seed's
    random init (the test set's 50 per class are under the stage's cap)."""
    from mllmfl_dist.__main__ import main

    cfg, metrics, _ = trained
    probe = metrics["probe"]
    assert probe["train_set"] == "server holdout (100 images)" and "C=1" in probe["recipe"]
    assert json.loads((cfg.run_dir / "pretrain" / "metrics.json").read_text())["probe"] == probe
    print(f"DWP probe: backbone {probe['dwp']['acc']:.3f}, random init {probe['random_init']['acc']:.3f}")
    out = cfg.run_dir / "probe.json"
    assert (
        main(
            [
                "probe",
                str(cfg.run_dir.parent.parent / "dwp.toml"),
                "--set",
                "data.server_holdout_per_class=10",
                "--backbone",
                str(cfg.run_dir / "pretrain" / "backbone.pt"),
                "--backbone",
                f"random:{cfg.run.seed}",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    for row, name in zip(rows, ("dwp", "random_init")):
        assert probe[name]["n_test"] == row["n_test"] == 500 and probe[name]["n_train"] == 100
        assert probe[name]["acc"] == row["acc"] and probe[name]["acc_top1"] == row["acc_top1"]
    assert "| backbone |" in capsys.readouterr().out


def test_without_a_labelled_set_the_probe_is_skipped_with_the_reason(tiny, tmp_path):
    from mllmfl_dist.stages.pretrain.probe import dwp_probe

    cfg = load_config(write_config(tmp_path, tiny, "nolabels"))
    assert dwp_probe(cfg, {}) == {
        "skipped": "no labelled set to probe on (the probe trains on the server holdout, "
        "which is empty: set data.server_holdout_per_class > 0 (an array data "
        "source))"
    }


def test_outputs_load_into_a_fresh_fl_model(trained):
    from mllmfl_dist.stages.inputs import build_data, build_fl_model

    cfg, metrics, _ = trained
    out = cfg.run_dir / "pretrain"
    assert json.loads((out / "metrics.json").read_text())["heldout_loss_alpha1"] == metrics["heldout_loss_alpha1"]
    state = torch.load(out / "backbone.pt", weights_only=True)
    adapter = torch.load(out / "adapter.pt", weights_only=True)
    assert not any(k.startswith("classifier.") for k in state) and "proj.0.weight" in adapter
    model = build_fl_model(cfg.model, build_data(cfg), cfg.run.seed)
    before = {k: v.clone() for k, v in model.backbone_state_dict().items()}
    model.load_backbone_state_dict(state)
    after = model.backbone_state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert max((after[k].float() - before[k].float()).abs().max().item() for k in before) > 1e-3  # trained


def test_resume_from_the_deepspeed_checkpoint_and_skip_a_finished_run(tiny, tmp_path, monkeypatch):
    from mllmfl_dist.stages.pretrain import run_pretrain

    runtime = single_runtime()
    straight_cfg = load_config(write_config(tmp_path, tiny, "straight", steps=12, checkpoint_every=5))
    run_pretrain(straight_cfg, runtime, progress=False)

    cfg = load_config(write_config(tmp_path, tiny, "resumed", steps=12, checkpoint_every=5))
    capture = EngineCapture(monkeypatch)
    stopped = run_pretrain(cfg, runtime, progress=False, stop_at=7)  # checkpoints at steps 5 and 7
    out = cfg.run_dir / "pretrain"
    assert stopped["stopped_at"] == 7 and not (out / "backbone.pt").exists()
    assert (out / "deepspeed" / "latest").read_text() == "global_step7"
    metrics = run_pretrain(cfg, runtime, progress=False)
    resumed_engine = capture.engines[-1]
    assert resumed_engine.global_steps == 12
    assert resumed_engine.optimizer.state[next(resumed_engine.module.parameters())]["step"] == 12
    assert [r["step"] for r in metrics["loss"]] == list(range(1, 13))  # steps 1-7 from the first run, once
    straight = torch.load(straight_cfg.run_dir / "pretrain" / "backbone.pt", weights_only=True)
    resumed = torch.load(out / "backbone.pt", weights_only=True)
    assert max((straight[k].float() - resumed[k].float()).abs().max().item() for k in straight) <= 1e-5
    assert sorted(p.name for p in (out / "deepspeed").glob("global_step*")) == ["global_step10", "global_step12"]

    # Finished: skipped without building an engine.
    import deepspeed

    monkeypatch.setattr(deepspeed, "initialize", lambda *a, **k: pytest.fail("a finished run trained again"))
    assert run_pretrain(cfg, runtime, progress=False) == metrics

    # A resume with a setting that changes what the finished steps computed is refused.
    (out / "metrics.json").unlink()
    changed = load_config(write_config(tmp_path, tiny, "resumed", steps=12, lr=0.1))
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="pretrain.deepspeed.lr"):
        run_pretrain(changed, runtime, progress=False)


def test_user_errors_are_one_line(tiny, tmp_path):
    from mllmfl_dist.mllm.llava import ModelLoadError
    from mllmfl_dist.stages.pretrain import run_pretrain

    runtime = single_runtime()
    # ranks = "rank0" inside a multi-process job: refused before anything is loaded
    cfg = load_config(write_config(tmp_path, tiny, "e1"), ["pretrain.ranks=rank0"])
    two = dist.Runtime(0, 2, 0, "gloo", torch.device("cpu"), False)
    with pytest.raises(ConfigError, match="pretrain.ranks = 'rank0' with 2 processes"):
        run_pretrain(cfg, two, progress=False)
    # default shards: this run's annotate/ output, absent here
    cfg = load_config(write_config(tmp_path, tiny, "e2"), ["pretrain.shards="])
    with pytest.raises(DataError, match="annotate"):
        run_pretrain(cfg, runtime, progress=False)
    # shards without captions
    cfg = load_config(
        write_config(tmp_path, tiny, "e3"), [f"pretrain.shards={tiny['root'] / 'annotated' / 'zz-plain-*.tar.gz'}"]
    )
    with pytest.raises(DataError, match="no captioned samples"):
        run_pretrain(cfg, runtime, progress=False)
    # no model
    cfg = load_config(write_config(tmp_path, tiny, "e4"), ["pretrain.model="])
    with pytest.raises(ConfigError, match="pretrain.model"):
        run_pretrain(cfg, runtime, progress=False)
    cfg = load_config(write_config(tmp_path, tiny, "e5"), [f"pretrain.model={tmp_path / 'missing'}"])
    with pytest.raises(ModelLoadError):
        run_pretrain(cfg, runtime, progress=False)
    # too many held out
    cfg = load_config(write_config(tmp_path, tiny, "e6"), ["pretrain.heldout=48"])
    with pytest.raises(DataError, match="pretrain.heldout"):
        run_pretrain(cfg, runtime, progress=False)


def test_default_shards_are_the_runs_annotate_output(tiny, tmp_path):
    import shutil

    from mllmfl_dist.stages.pretrain import load_captioned, shards_pattern

    cfg = load_config(write_config(tmp_path, tiny, "default"), ["pretrain.shards="])
    annotate = cfg.run_dir / "annotate"
    annotate.mkdir(parents=True)
    for shard in (tiny["root"] / "annotated").glob("*.tar.gz"):
        shutil.copy(shard, annotate / shard.name)
        (annotate / f"{shard.name}.done.json").write_text("{}")  # annotate's per-shard records
    (annotate / "manifest.json").write_text("{}")
    samples, skipped = load_captioned(shards_pattern(cfg))
    assert len(samples) == NUM_IMAGES and len(skipped) == 2  # the records are not read as shards


WORKER = """
import json, sys
import deepspeed
from mllmfl_dist.core import dist
from mllmfl_dist.config import load_config
from mllmfl_dist.stages.pretrain import run_pretrain

engines = []
_initialize = deepspeed.initialize
def initialize(*args, **kwargs):
    out = _initialize(*args, **kwargs)
    engines.append(out[0])
    return out
deepspeed.initialize = initialize

cfg = load_config(sys.argv[1], sys.argv[3:])
runtime = dist.init_runtime(cfg.dist)
try:
    metrics = run_pretrain(cfg, runtime, progress=False)
    engine = engines[0]
    record = {"rank": runtime.rank, "world_size": runtime.world_size, "global_steps": engine.global_steps,
              "dp_world_size": engine.dp_world_size, "optimizer_steps": [float(s["step"]) for s in
              engine.optimizer.state.values()], "metrics": metrics}
    with open(f"{sys.argv[2]}/rank{runtime.rank}.json", "w") as handle:
        json.dump(record, handle)
finally:
    dist.shutdown(runtime)
"""


def run_workers(config: Path, out: Path, world: int, *overrides: str) -> list[dict]:
    """DWP on ``world`` gloo processes of one thread each (WORKER); each rank's record."""
    out.mkdir()
    (out / "worker.py").write_text(WORKER)
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(out / "worker.py"), str(config), str(out), *overrides],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def backbone_of(config: Path, *overrides: str) -> dict[str, torch.Tensor]:
    return torch.load(load_config(config, list(overrides)).run_dir / "pretrain" / "backbone.pt", weights_only=True)


def test_two_gloo_processes_train_data_parallel_and_one_process_at_the_same_global_batch_matches(tiny, tmp_path):
    config = write_config(tmp_path, tiny, "two", steps=20, checkpoint_every=10, pretrain_extra="global_batch_size = 16")
    records = run_workers(config, tmp_path / "two", 2)
    for rank, record in enumerate(records):
        assert record["rank"] == rank and record["world_size"] == 2 and record["dp_world_size"] == 2
        assert record["global_steps"] == 20 and set(record["optimizer_steps"]) == {20.0}
    metrics = records[0]["metrics"]
    assert records[1]["metrics"] == {}
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 16 and metrics["steps"] == 20
    assert metrics["train_samples"] == 20 * 16
    assert metrics["heldout_loss_alpha1"] < metrics["heldout_loss_alpha1_step0"]
    print(
        f"2 processes: {metrics['samples_per_second']:.1f} samples/s; held-out loss "
        f"{metrics['heldout_loss_alpha1_step0']:.3f} -> {metrics['heldout_loss_alpha1']:.3f}"
    )
    two = backbone_of(config)

    # One process at the same global batch accumulates the two ranks' micro-batches: the same samples in each
    # step, so the same weights (bit-identical on this VM; the tolerance allows another order of float sums).
    # BatchNorm's running estimates are not the same: rank 0's saw half the micro-batches.
    (one_record,) = run_workers(config, tmp_path / "one", 1, "run.name=one")
    assert one_record["metrics"]["global_batch_size"] == 16 and one_record["metrics"]["train_samples"] == 20 * 16
    one = backbone_of(config, "run.name=one")
    assert one.keys() == two.keys()
    weights = [name for name in two if "running_" not in name and "num_batches" not in name]
    for name in weights:
        torch.testing.assert_close(one[name], two[name], rtol=1e-5, atol=1e-6, msg=name)
    assert one["bn1.num_batches_tracked"].item() == 40 and two["bn1.num_batches_tracked"].item() == 20
    # without global_batch_size one process takes half the batch per step: other weights
    (half_record,) = run_workers(config, tmp_path / "half", 1, "run.name=half", "pretrain.global_batch_size=0")
    assert half_record["metrics"]["global_batch_size"] == 8
    half = backbone_of(config, "run.name=half")
    assert max((half[n].float() - two[n].float()).abs().max().item() for n in weights) > 1e-3


def test_the_dwp_loss_curve_and_held_out_losses_reach_tensorboard(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mllmfl_dist.stages.pretrain import run_pretrain

    cfg = load_config(write_config(tmp_path, tiny, "tracked", steps=4, checkpoint_every=2), ["log.tensorboard=true"])
    metrics = run_pretrain(cfg, single_runtime(), progress=False)
    events = EventAccumulator(str(cfg.run_dir / "pretrain"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert [s for s, _ in scalars["pretrain/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["pretrain/loss"]] == pytest.approx([r["loss"] for r in metrics["loss"]], rel=1e-6)
    assert [s for s, _ in scalars["pretrain/alpha"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["pretrain/heldout_loss_alpha1"]] == pytest.approx(
        [metrics["heldout_loss_alpha1_step0"], metrics["heldout_loss_alpha1"]], rel=1e-6
    )
    assert [s for s, _ in scalars["pretrain/heldout_loss_alpha1"]] == [0, 4]
    assert scalars["pretrain/heldout_loss_alpha0"] == [(4, pytest.approx(metrics["heldout_loss_alpha0"], rel=1e-6))]


def test_a_resume_against_another_llava_geometry_is_refused_naming_both_shapes(tiny, tmp_path, capsys):
    """The DeepSpeed checkpoint's adapter sits on the tiny LLaVA's 4x4 grid; the same model path now holding
    llava-1.5's geometry (24x24) is refused in one line before DeepSpeed loads (whose size mismatch is a traceback)."""
    from mllmfl_dist.__main__ import main
    from mllmfl_dist.standins.miniature import build_llava15_miniature

    model = tmp_path / "llava"
    shutil.copytree(tiny["llava"], model)
    config = write_config(tmp_path, {**tiny, "llava": model}, "geometry", steps=4, checkpoint_every=1)
    from mllmfl_dist.stages.pretrain import run_pretrain

    assert run_pretrain(load_config(config), single_runtime(), progress=False, stop_at=1)["stopped_at"] == 1
    shutil.rmtree(model)
    build_llava15_miniature(model)
    capsys.readouterr()
    assert main(["pretrain", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = [e for e in err if "DWP's adapter" in e]
    assert line and "16 visual tokens" in line[0] and "576 visual tokens" in line[0], err[-3:]
    assert "Traceback" not in "\n".join(err)
