"""Images that would poison a data path: a tiny very thin PNG, a large image, 16-bit greyscale, an EXIF-rotated
JPEG and a tar member outside any sample. Each path (annotation, DWP, alignment, labelled data) skips and
counts them, or refuses them with one line naming the shard and the member; none of them stops a stage."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mllmfl_dist.config import load_config
from mllmfl_dist.data import DataError
from mllmfl_dist.data.images import ImageBounds, ImageBoundsError, decode_image, image_to_array
from mllmfl_dist.data.shards import iter_samples, read_labeled_shards, write_shards

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def thin_png() -> bytes:
    """20000 x 1: a few hundred bytes that LLaVA-1.5's processor would scale to 336 x 6,720,000."""
    return png(Image.new("L", (20000, 1), 128))


def grey16() -> tuple[bytes, np.ndarray]:
    """A 16-bit greyscale PNG (mode I;16) with values 1000..60000, and the 8-bit values it must give."""
    values = np.linspace(1000, 60000, 16 * 16).reshape(16, 16).astype(np.uint16)
    return png(Image.fromarray(values)), ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def rotated_jpeg() -> bytes:
    """A 30 x 10 (w x h) JPEG, bright left edge, whose EXIF says "rotate 90 degrees clockwise to view"
    (orientation 6): upright it is 10 x 30 with the bright band on top."""
    array = np.zeros((10, 30, 3), np.uint8)
    array[:, :6] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def grey(seed: int, size: int = 24) -> bytes:
    return png(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)))


# ------------------------------------------------------------------------------------------- decoding


def test_bounds_are_checked_on_the_header_before_decoding():
    bounds = ImageBounds(1_000_000, 20.0, "annotate")
    with pytest.raises(
        ImageBoundsError,
        match=r"20000x1 has aspect ratio 2e\+04, over "
        r"annotate.max_image_aspect_ratio = 20",
    ):
        decode_image(thin_png(), bounds)
    large = png(Image.new("RGB", (1100, 1000)))
    with pytest.raises(ImageBoundsError, match=r"1100x1000 = 1100000 pixels is over annotate.max_image_pixels"):
        decode_image(large, bounds)
    assert decode_image(large, ImageBounds(2_000_000, 20.0)).size == (1100, 1000)


def test_decoding_for_a_model_side_bounds_the_pixels_it_holds():
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (1500, 2000, 3), dtype=np.uint8)).save(buf, format="JPEG")
    # JPEG: decoded at 1/4 DCT scale (both sides stay >= 336); PNG: box-reduced by the integer factor
    # that keeps the short side >= 336.
    assert decode_image(buf.getvalue(), side=336).size == (500, 375)
    assert decode_image(png(Image.new("RGB", (1500, 1400))), side=336).size == (375, 350)
    assert decode_image(png(Image.new("RGB", (600, 500))), side=336).size == (600, 500)  # under 2 x side: as is


@pytest.mark.parametrize("mode", ["P", "1"])
def test_palette_and_bilevel_images_are_reduced_too(mode):
    """Image.reduce refuses palette and 1-bit images (a raw ValueError stopped annotation on a large GIF)."""
    gif = io.BytesIO()
    Image.new(mode, (400, 300)).save(gif, format="GIF")
    for data in (gif.getvalue(), png(Image.new(mode, (400, 300)))):
        assert decode_image(data, side=64).size == (100, 75)


def test_sixteen_bit_greyscale_is_scaled_not_clamped():
    data, expected = grey16()
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    array = image_to_array(decode_image(data))
    assert array.shape == (1, 16, 16) and np.array_equal(array[0], expected)
    assert expected.min() < 10 and expected.max() > 230  # Pillow's own convert("L") gives 255 nearly everywhere
    wide = Image.fromarray(np.array([[70000, 5]], dtype=np.int32), mode="I")
    with pytest.raises(DataError, match=r"mode I\) with values in \[5, 70000\]"):
        decode_image(_tiff(wide))


def _tiff(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="TIFF")
    return buf.getvalue()


def test_exif_orientation_is_applied():
    image = decode_image(rotated_jpeg())
    assert image.size == (10, 30)
    array = np.asarray(image.convert("L"))
    assert array[:5].mean() > 200 and array[10:].mean() < 50  # the bright band is on top


def test_a_dot_named_member_is_yielded_with_an_error(tmp_path):
    shard = write_tar(
        tmp_path / "s-000000.tar",
        [("a.png", grey(0)), ("a.cls", b"1"), (".hidden", b"x"), ("b.png", grey(1)), ("b.cls", b"2")],
    )
    samples = list(iter_samples(shard))
    assert [(s["key"], s["error"] is None) for s in samples] == [(".hidden", False), ("a", True), ("b", True)]
    assert "'.hidden' is not part of a sample: its name starts with a dot" in samples[0]["error"]


# ------------------------------------------------------------------------------------- labelled data


@pytest.mark.parametrize(
    "member, data, words",
    [
        ("thin.png", thin_png(), "data.max_image_aspect_ratio = 20"),
        ("large.png", png(Image.new("L", (1100, 1000))), "data.max_image_pixels = 1000000"),
        (".hidden", b"x", "name starts with a dot"),
    ],
)
def test_labelled_shards_refuse_with_one_line_naming_shard_and_member(tmp_path, member, data, words):
    extra = [(member, data)] + ([(member.split(".")[0] + ".cls", b"0")] if member.endswith(".png") else [])
    shard = write_tar(tmp_path / "train-000000.tar", [("a.png", grey(0)), ("a.cls", b"0")] + extra)
    with pytest.raises(DataError) as err:
        read_labeled_shards([shard], ImageBounds(1_000_000, 20.0, "data"))
    message = str(err.value)
    key = member.split(".")[0] or member
    assert "\n" not in message and str(shard) in message and repr(key) in message and words in message


def test_labelled_sixteen_bit_and_rotated_images_arrive_upright_and_scaled(tmp_path):
    data, expected = grey16()
    shard = write_tar(tmp_path / "t-000000.tar", [("a.png", data), ("a.cls", b"3")])
    images, labels, _ = read_labeled_shards([shard], ImageBounds(1_000_000, 20.0))
    assert np.array_equal(images[0, 0].numpy(), expected) and labels.tolist() == [3]
    shard = write_tar(tmp_path / "r-000000.tar", [("r.jpg", rotated_jpeg()), ("r.cls", b"0")])
    images, _, _ = read_labeled_shards([shard])
    assert tuple(images.shape) == (1, 3, 30, 10)


def test_a_federated_run_on_a_thin_train_image_exits_2_with_one_line_and_keeps_earlier_outputs(tmp_path):
    train = write_tar(
        tmp_path / "train-000000.tar",
        [("a0.png", grey(0)), ("a0.cls", b"0"), ("thin.png", thin_png()), ("thin.cls", b"1")],
    )
    test = write_tar(tmp_path / "test-000000.tar", [("t0.png", grey(5)), ("t0.cls", b"0")])
    run_dir = tmp_path / "runs" / "hostile"
    run_dir.mkdir(parents=True)
    earlier = run_dir / "metrics.jsonl"
    earlier.write_text('{"round": 1}\n')
    command = [
        sys.executable,
        "-m",
        "mllmfl_dist",
        "federate",
        str(SMOKE),
        "--set",
        f"run.root={tmp_path / 'runs'}",
        "--set",
        "run.name=hostile",
        "--set",
        "data.source=shards",
        "--set",
        f"data.train_shards={train}",
        "--set",
        f"data.test_shards={test}",
        "--set",
        "data.imb_factor=1.0",
        "--set",
        "log.progress=false",
    ]
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "max_image_aspect_ratio" in line]
    assert len(lines) == 1 and str(train) in lines[0] and "'thin'" in lines[0], result.stderr[-2000:]
    assert earlier.read_text() == '{"round": 1}\n'


# ---------------------------------------------------------------------------------------- stages


def hostile_and_good_shards(folder: Path) -> str:
    """web-a: good images around every hostile kind; web-b: good images only (captioned after web-a)."""
    data16, _ = grey16()
    rng = np.random.default_rng(3)
    good = [(f"g{i}.png", grey(10 + i)) for i in range(3)]
    write_tar(
        folder / "web-a-000000.tar",
        [
            good[0],
            ("thin.png", thin_png()),
            (".hidden", b"not a sample"),
            ("large.png", png(Image.new("RGB", (1100, 1000)))),
            good[1],
            ("deep.png", data16),
            ("turned.jpg", rotated_jpeg()),
            good[2],
        ],
    )
    write_shards(
        [{"key": f"b{i}", "image": rng.integers(0, 256, (3, 24, 24), dtype=np.uint8)} for i in range(3)],
        str(folder / "web-b"),
        max_count=10,
    )
    return str(folder / "web-*.tar*")


def test_annotation_completes_past_hostile_images_and_a_rerun_captures_nothing_more(tmp_path, tiny_models, monkeypatch):
    from mllmfl_dist.core import dist
    from mllmfl_dist.config import DistConfig
    from mllmfl_dist.stages import annotate

    shards = hostile_and_good_shards(tmp_path)
    config = tmp_path / "annotate.toml"
    config.write_text(
        f'[run]\nroot = {json.dumps(str(tmp_path / "runs"))}\nname = "hostile"\n\n'
        f"[log]\nprogress = false\n\n[annotate]\nmodel = {json.dumps(str(tiny_models['llava']))}\n"
        f"shards = {json.dumps(shards)}\nbatch_size = 4\nmax_new_tokens = 4\n"
        "max_image_pixels = 1000000\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mllmfl_dist", "annotate", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "runs" / "hostile" / "annotate"
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"thin", ".hidden", "large"}
    assert "annotate.max_image_aspect_ratio" in skipped["thin"] and "annotate.max_image_pixels" in skipped["large"]
    assert "starts with a dot" in skipped[".hidden"]
    assert manifest["images_in"] == 11 and manifest["captions_out"] == 8 == 11 - len(skipped)
    assert [s["shard"] for s in manifest["shards"]] == ["web-a-000000.tar", "web-b-000000.tar.gz"]
    outputs = sorted(p for p in out.iterdir() if p.name.endswith((".tar", ".tar.gz")))
    captioned = {s["key"] for shard in outputs for s in iter_samples(shard)}
    assert captioned == {"g0", "g1", "g2", "deep", "turned", "b0", "b1", "b2"}
    files = {p.name: p.read_bytes() for p in out.iterdir()}

    def no_generation(*args, **kwargs):
        raise AssertionError("a rerun must not generate")

    cfg = load_config(config)
    monkeypatch.setattr(annotate, "caption_batch", no_generation)
    again = annotate.run_annotate(cfg, dist.init_runtime(DistConfig(threads=1), env={}))
    assert again == manifest
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # earlier outputs intact


def test_dwp_skips_and_counts_captioned_images_over_the_bounds(tmp_path):
    from mllmfl_dist.stages.pretrain import load_captioned

    shard = write_tar(
        tmp_path / "cap-000000.tar",
        [
            ("a.png", grey(0)),
            ("a.txt", b"a grey square"),
            ("thin.png", thin_png()),
            ("thin.txt", b"a line"),
            (".hidden", b"x"),
            ("b.png", grey(1)),
            ("b.txt", b"another square"),
        ],
    )
    samples, skipped = load_captioned(str(shard), ImageBounds(1_000_000, 20.0, "pretrain"))
    assert [s.key for s in samples] == ["a", "b"]
    reasons = {s["key"]: s["reason"] for s in skipped}
    assert set(reasons) == {"thin", ".hidden"} and "pretrain.max_image_aspect_ratio" in reasons["thin"]


def test_alignment_web_images_skip_and_count_pool_refuses(tmp_path, tiny_models):
    from mllmfl_dist.stages.align import build_alignment_set
    from mllmfl_dist.stages.inputs import build_data

    rng = np.random.default_rng(4)
    good = [(f"w{i}.png", png(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))) for i in range(6)]
    web = write_tar(tmp_path / "web-000000.tar", good[:3] + [("thin.png", thin_png()), (".hidden", b"x")] + good[3:])
    cfg = load_config(
        SMOKE,
        [
            "align.every=1",
            "align.source=web",
            "align.teacher=clip",
            "align.per_class=2",
            f"align.teacher_model=local-dir:{tiny_models['clip']}",
            f"align.web_shards={web}",
        ],
    )
    data = build_data(cfg)
    aligned = build_alignment_set(cfg, data, cache_dir=tmp_path)
    assert aligned.skipped == 2 and aligned.describe(cfg.align)["skipped_images"] == 2
    assert 0 < len(aligned.labels) <= 6

    pool = write_tar(
        tmp_path / "pool-000000.tar",
        [("p0.png", grey(0, 16)), ("p0.cls", b"0"), ("thin.png", thin_png()), ("thin.cls", b"1")],
    )
    cfg = load_config(SMOKE, ["align.every=1", "align.source=pool", f"align.pool_shards={pool}"])
    with pytest.raises(DataError) as err:
        build_alignment_set(cfg, data, cache_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message and "'thin'" in message and "align.max_image_aspect_ratio" in message
