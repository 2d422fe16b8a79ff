"""Stage 1a: captioning WebDataset shards with the tiny LLaVA (loaded from disk like a real checkpoint)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mllmfl_dist.core import dist
from mllmfl_dist.config import DistConfig, load_config
from mllmfl_dist.data.shards import iter_samples, write_shards
from mllmfl_dist.stages import annotate

REPO = Path(__file__).resolve().parents[1]


def make_shards(folder: Path, shards: int, per_shard: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    samples = [
        {"key": f"img{i:04d}", "image": rng.integers(0, 256, (3, 24, 24), dtype=np.uint8), "json": {"index": i}}
        for i in range(shards * per_shard)
    ]
    write_shards(samples, str(folder / "web"), max_count=per_shard)
    return str(folder / "web-*.tar.gz")


def write_config(tmp_path: Path, model: Path, shards: str, **annotate_keys) -> Path:
    keys = {
        "model": str(model),
        "shards": shards,
        "ranks": "all",
        "batch_size": 4,
        "max_new_tokens": 6,
        **annotate_keys,
    }
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items())
    path = tmp_path / "annotate.toml"
    path.write_text(
        f"[run]\nroot = {json.dumps(str(tmp_path / 'runs'))}\n\n[log]\nprogress = false\n\n[annotate]\n{body}\n"
    )
    return path


def captions(out: Path) -> dict[str, str]:
    shards = sorted(p for p in out.iterdir() if p.name.endswith((".tar", ".tar.gz")))
    return {s["key"]: s["txt"] for shard in shards for s in iter_samples(shard)}


def single_process():
    return dist.init_runtime(DistConfig(threads=1), env={})


def test_one_caption_per_image_counts_add_up_and_a_rerun_generates_nothing(tmp_path, tiny_models, monkeypatch):
    shards = make_shards(tmp_path, shards=3, per_shard=5)
    cfg = load_config(write_config(tmp_path, tiny_models["llava"], shards))
    manifest = annotate.run_annotate(cfg, single_process())
    out = cfg.run_dir / "annotate"
    got = captions(out)
    assert sorted(got) == [f"img{i:04d}" for i in range(15)]
    assert all(isinstance(t, str) for t in got.values())
    assert len(set(got.values())) > 1  # captions depend on the image
    assert manifest["images_in"] == 15 == manifest["captions_out"] + len(manifest["skipped"])
    assert manifest["skipped"] == [] and manifest["damaged_shards"] == []
    assert manifest["images_per_second"] > 0 and manifest["seconds"] > 0
    sample = next(iter_samples(sorted(out.glob("*.tar.gz"))[0]))
    assert sample["json"]["annotation"]["model"] == str(tiny_models["llava"])
    assert sample["json"]["annotation"]["max_new_tokens"] == 6 and sample["json"]["index"] == 0
    assert json.loads((out / "manifest.json").read_text()) == manifest

    def no_generation(*args, **kwargs):
        raise AssertionError("a rerun must not generate")

    monkeypatch.setattr(annotate, "caption_batch", no_generation)
    again = annotate.run_annotate(cfg, single_process())
    assert again == manifest and captions(out) == got


def test_corrupt_image_and_truncated_shard_are_skipped_counted_and_named(tmp_path, tiny_models):
    rng = np.random.default_rng(1)
    good = [{"key": f"a{i}", "image": rng.integers(0, 256, (3, 24, 24), dtype=np.uint8)} for i in range(4)]
    good.insert(2, {"key": "broken", "image_bytes": b"\x89PNG\r\n\x1a\nnot really a png", "image_ext": "png"})
    write_shards(good, str(tmp_path / "web-a"), max_count=10)
    cut = write_shards(
        [{"key": f"b{i}", "image": rng.integers(0, 256, (3, 24, 24), dtype=np.uint8)} for i in range(6)],
        str(tmp_path / "web-b"),
        max_count=10,
        compress=False,
    )[0]
    cut.write_bytes(cut.read_bytes()[: int(cut.stat().st_size * 0.6)])
    write_shards(
        [{"key": f"c{i}", "image": rng.integers(0, 256, (3, 24, 24), dtype=np.uint8)} for i in range(3)],
        str(tmp_path / "web-c"),
        max_count=10,
    )

    cfg = load_config(write_config(tmp_path, tiny_models["llava"], str(tmp_path / "web-*.tar*")))
    manifest = annotate.run_annotate(cfg, single_process())
    assert manifest["skipped"] == [
        {"shard": "web-a-000000.tar.gz", "key": "broken", "reason": manifest["skipped"][0]["reason"]}
    ]
    assert "decode" in manifest["skipped"][0]["reason"]
    assert [d["shard"] for d in manifest["damaged_shards"]] == ["web-b-000000.tar"]
    assert "web-b-000000.tar" in manifest["damaged_shards"][0]["reason"]
    assert manifest["images_in"] == manifest["captions_out"] + len(manifest["skipped"])
    got = captions(cfg.run_dir / "annotate")
    assert {f"a{i}" for i in range(4)} | {f"c{i}" for i in range(3)} <= set(got)
    assert "broken" not in got
    readable_b = {k for k in got if k.startswith("b")}
    assert 0 < len(readable_b) < 6  # what came before the damage is kept


def test_three_gloo_ranks_give_the_same_captions_as_one(tmp_path, tiny_models):
    shards = make_shards(tmp_path, shards=4, per_shard=3, seed=2)
    one = load_config(write_config(tmp_path, tiny_models["llava"], shards), ["run.name=one"])
    annotate.run_annotate(one, single_process())
    config = write_config(tmp_path, tiny_models["llava"], shards)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=3",
        "-m",
        "mllmfl_dist",
        "annotate",
        str(config),
        "--set",
        "run.name=three",
    ]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    three_out = tmp_path / "runs" / "three" / "annotate"
    assert captions(three_out) == captions(one.run_dir / "annotate")
    manifest = json.loads((three_out / "manifest.json").read_text())
    assert manifest["ranks"] == [0, 1, 2] and manifest["captions_out"] == 12
    ranks = {json.loads(p.read_text())["rank"] for p in three_out.glob("*.done.json")}
    assert ranks == {0, 1, 2}  # whole shards really were spread over the ranks


def test_a_rerun_with_other_settings_is_refused_not_mixed(tmp_path, tiny_models):
    shards = make_shards(tmp_path, shards=1, per_shard=2, seed=3)
    config = write_config(tmp_path, tiny_models["llava"], shards)
    annotate.run_annotate(load_config(config), single_process())
    other = load_config(config, ["annotate.prompt=USER: <image>\nWhat is it? ASSISTANT:"])
    with pytest.raises(Exception, match="other annotation settings"):
        annotate.run_annotate(other, single_process())


def test_a_damaged_shard_replaced_by_a_good_one_is_captioned_on_the_rerun(tmp_path, tiny_models, caplog):
    """The damaged shard's record describes the file it was made from, so the good replacement is not taken
    as done; the untouched shard is not annotated again."""
    rng = np.random.default_rng(4)
    images = [{"key": f"d{i}", "image": rng.integers(0, 256, (3, 24, 24), dtype=np.uint8)} for i in range(6)]
    good = write_shards(images, str(tmp_path / "web-d"), max_count=10, compress=False)[0]
    intact = good.read_bytes()
    good.write_bytes(intact[: int(len(intact) * 0.5)])  # a download cut short
    write_shards([{"key": "e0", "image": images[0]["image"]}], str(tmp_path / "web-e"), max_count=10)
    cfg = load_config(write_config(tmp_path, tiny_models["llava"], str(tmp_path / "web-*.tar*")))
    first = annotate.run_annotate(cfg, single_process())
    assert [d["shard"] for d in first["damaged_shards"]] == ["web-d-000000.tar"]
    kept = {k for k in captions(cfg.run_dir / "annotate") if k.startswith("d")}
    assert 0 < len(kept) < 6
    e_record = (cfg.run_dir / "annotate" / "web-e-000000.tar.gz.done.json").read_text()

    good.write_bytes(intact)  # the user replaces it, as the message advises
    second = annotate.run_annotate(cfg, single_process())
    assert second["damaged_shards"] == [] and second["captions_out"] == 7
    assert {k for k in captions(cfg.run_dir / "annotate") if k.startswith("d")} == {f"d{i}" for i in range(6)}
    assert (cfg.run_dir / "annotate" / "web-e-000000.tar.gz.done.json").read_text() == e_record  # not redone


def test_a_lost_output_or_torn_record_is_annotated_again_and_killed_writes_are_cleaned(tmp_path, tiny_models):
    shards = make_shards(tmp_path, shards=2, per_shard=2, seed=5)
    cfg = load_config(write_config(tmp_path, tiny_models["llava"], shards))
    annotate.run_annotate(cfg, single_process())
    out = cfg.run_dir / "annotate"
    expected = captions(out)
    first, second = sorted(out.glob("web-*.tar.gz"))
    first.write_bytes(first.read_bytes()[:100])  # the output cut after its record was written
    (out / (second.name + ".done.json")).write_text('{"shard": ')  # a torn record
    litter = [
        out / (second.name + ".partial"),
        out / f".{second.name}.done.json.ab12cd34.tmp",
        out / ".manifest.json.tmp",
    ]
    for path in litter:
        path.write_bytes(b"half")  # what a kill during the writes leaves
    annotate.run_annotate(cfg, single_process())
    assert captions(out) == expected
    assert not any(p.exists() for p in litter)


def test_member_names_with_dotdot_or_absolute_paths_are_never_copied_into_outputs(tmp_path, tiny_models):
    import io
    import tarfile

    from mllmfl_dist.data.images import encode_png

    png = encode_png(np.zeros((3, 24, 24), dtype=np.uint8))
    shard = tmp_path / "web-evil-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("ok.png", "../../escape.png", "/etc/cron.d/job.png", "a/../../b.png"):
            info = tarfile.TarInfo(name)
            info.size = len(png)
            tar.addfile(info, io.BytesIO(png))
    cfg = load_config(write_config(tmp_path, tiny_models["llava"], str(shard)))
    manifest = annotate.run_annotate(cfg, single_process())
    assert manifest["captions_out"] == 1
    assert sorted(s["key"] for s in manifest["skipped"]) == ["../../escape", "/etc/cron.d/job", "a/../../b"]
    assert all("'..'" in s["reason"] for s in manifest["skipped"])
    with tarfile.open(cfg.run_dir / "annotate" / shard.name) as tar:
        assert sorted(tar.getnames()) == ["ok.json", "ok.png", "ok.txt"]
