"""Malicious and malformed inputs a user can hand the trainer: each ends in one clear line (or a warning
where the run can go on), never a traceback, never code from a file, never a silently wrong model."""

from __future__ import annotations

import gzip
import json
import pickle
import shutil
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from mllmfl_dist.__main__ import main
from mllmfl_dist.config import ConfigError, DataConfig, PartitionConfig, load_config
from mllmfl_dist.data import DataError, build_client_data
from mllmfl_dist.data.shards import write_classes, write_shards
from mllmfl_dist.data.sources import FASHION_MNIST_FILES, load_fashion_mnist
from mllmfl_dist.mllm.llava import ModelLoadError

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"


class Planted:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for any code an attacker wants run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mllmfl_dist: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


# ------------------------------------------------------------------------------- planted model files


def test_a_llava_directory_with_a_planted_pytorch_model_bin_is_refused_by_name(tiny_models, tmp_path, capsys):
    llava = tmp_path / "llava"
    shutil.copytree(tiny_models["llava"], llava)
    (llava / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    (llava / "pytorch_model.bin").write_bytes(pickle.dumps({"lm_head.weight": Planted(marker)}, protocol=2))
    from mllmfl_dist.mllm.llava import load_llava

    with pytest.raises(ModelLoadError, match="pytorch_model.bin holds objects other than tensors") as err:
        load_llava(str(llava))
    assert str(llava / "pytorch_model.bin") in str(err.value) and "\n" not in str(err.value)
    # the annotate stage, from the command line
    shards = tmp_path / "web"
    write_shards([{"key": "a", "image": np.zeros((3, 8, 8), np.uint8)}], str(shards), 10)
    config = tmp_path / "a.toml"
    config.write_text(f'[run]\nroot = "{tmp_path}"\n[annotate]\nmodel = "{llava}"\nshards = "{shards}-*.tar.gz"\n')
    assert main(["annotate", str(config)]) == 2
    assert "pytorch_model.bin" in one_error_line(capsys)
    assert not marker.exists(), "the planted pickle ran"


def test_a_cut_llava_safetensors_file_is_named(tiny_models, tmp_path):
    from mllmfl_dist.mllm.llava import load_llava

    llava = tmp_path / "llava"
    shutil.copytree(tiny_models["llava"], llava)
    weights = llava / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # a download cut short
    with pytest.raises(ModelLoadError, match="model.safetensors is not a complete safetensors file"):
        load_llava(str(llava))


def test_an_open_clip_local_dir_with_a_planted_weights_file_is_refused_by_name(tiny_models, tmp_path):
    from mllmfl_dist.mllm.clip_teacher import load_clip

    clip = tmp_path / "clip"
    shutil.copytree(tiny_models["clip"], clip)
    (clip / "open_clip_model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    torch.save({"visual.proj": Planted(marker)}, clip / "open_clip_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="open_clip_pytorch_model.bin holds objects other than tensors"):
        load_clip(f"local-dir:{clip}")
    assert not marker.exists()


# -------------------------------------------------------------------- planted or wrong checkpoint files


def test_planted_federated_checkpoint_and_backbone_are_refused_by_name(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    sets = ["--set", f"run.root={tmp_path}", "--set", "federated.rounds=1", "--set", "log.progress=false"]
    federated = tmp_path / "smoke" / "federated"
    federated.mkdir(parents=True)
    torch.save(
        {"config": {}, "round": 0, "model": Planted(marker), "strategy": {}, "rng": {}}, federated / "checkpoint.pt"
    )
    assert main(["federate", str(SMOKE), *sets]) == 2
    line = one_error_line(capsys)
    assert str(federated / "checkpoint.pt") in line and "so it was not loaded" in line
    shutil.rmtree(federated)
    backbone = tmp_path / "backbone.pt"
    backbone.write_bytes(pickle.dumps({"conv1.weight": Planted(marker)}, protocol=2))
    assert main(["federate", str(SMOKE), *sets, "--set", f"model.pretrained_backbone={backbone}"]) == 2
    assert str(backbone) in one_error_line(capsys)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"hello world\n", "is not a PyTorch checkpoint file"),
        (b"", "is empty"),
        (b"PK\x03\x04 cut", "is truncated or corrupt"),
    ],
    ids=["text", "empty", "cut-zip"],
)
def test_evaluate_with_a_file_that_is_no_checkpoint_says_so(tmp_path, capsys, content, reason):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    assert main(["evaluate", str(SMOKE), "--checkpoint", str(path), "--set", f"run.root={tmp_path}"]) == 2
    line = one_error_line(capsys)
    assert str(path) in line and reason in line and "KeyError" not in line


def test_a_planted_alignment_teacher_cache_is_recomputed_not_run(tiny_models, tmp_path, caplog):
    from PIL import Image

    from mllmfl_dist.mllm.teachers import teacher_cache_key, teacher_cache_path, teacher_distributions

    images = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (0, 128, 255)]
    classes = ["cat", "dog"]
    key = teacher_cache_key("clip", images, classes, model=f"local-dir:{tiny_models['clip']}")
    path = teacher_cache_path(tmp_path, "clip", key)
    marker = tmp_path / "MARKER"
    path.write_bytes(pickle.dumps({"q": Planted(marker), "key": key}, protocol=2))
    q = teacher_distributions("clip", images, classes, model=f"local-dir:{tiny_models['clip']}", cache_dir=tmp_path)
    assert q.shape == (3, 2) and "unreadable" in caplog.text and not marker.exists()
    assert torch.equal(torch.load(path, weights_only=True)["q"], q)  # overwritten with the real thing


# ----------------------------------------------------------------------------------------- data files


def write_fashion_mnist(folder: Path) -> None:
    import struct

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in zip(FASHION_MNIST_FILES, (40, 40, 20, 20)):
        array = rng.integers(0, 256, (count, 28, 28)) if "images" in name else np.arange(count) % 10
        header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
        with gzip.open(folder / f"{name}.gz", "wb") as handle:
            handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_with_a_corrupt_gzip_stream_is_one_line(tmp_path, capsys):
    write_fashion_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[20:60] = bytes(40)  # inside the deflate stream: zlib.error, not a gzip header error
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: cannot read \((zlib\.)?error"):
        load_fashion_mnist(str(tmp_path))
    assert (
        main(
            [
                "federate",
                str(SMOKE),
                "--set",
                "data.source=fashion_mnist",
                "--set",
                f"data.root={tmp_path}",
                "--set",
                "data.channels=1",
                "--set",
                f"run.root={tmp_path}",
            ]
        )
        == 2
    )
    assert "t10k-images-idx3-ubyte.gz" in one_error_line(capsys)
    with pytest.raises(zlib.error):  # what the reader used to let through
        gzip.decompress(bytes(raw))


def test_a_missing_fashion_mnist_file_is_the_one_named(tmp_path):
    write_fashion_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        load_fashion_mnist(str(tmp_path))
    message = str(err.value)
    assert "file t10k-images-idx3-ubyte(.gz) not found in" in message and "train-images" not in message
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\(\.gz\) and t10k-images-idx3-ubyte\(\.gz\) not"):
        load_fashion_mnist(str(tmp_path))


def labeled_config(train: Path, test: Path) -> DataConfig:
    return DataConfig(source="shards", train_shards=f"{train}-*", test_shards=f"{test}-*", imb_factor=1.0)


def test_a_stray_label_without_classes_json_is_refused_not_a_1000_class_model(tmp_path):
    rng = np.random.default_rng(0)

    def samples(labels):
        return [
            {"key": f"s{i}", "image": rng.integers(0, 256, (1, 8, 8), dtype=np.uint8), "cls": c}
            for i, c in enumerate(labels)
        ]

    write_shards(samples([0, 1, 2] * 3 + [999]), str(tmp_path / "train"), 100)
    write_shards(samples([0, 1, 2]), str(tmp_path / "test"), 100)
    config = labeled_config(tmp_path / "train", tmp_path / "test")
    with pytest.raises(
        DataError,
        match="labels go up to 999 but 996 of the classes 0..999 have no training "
        r"sample \(3, 4, 5, 6, 7, ...\) and there is no classes.json",
    ):
        build_client_data(config, PartitionConfig("iid", 0.5), 2, seed=0)
    # A test label no train sample has is refused the same way.
    write_shards(samples([0, 1, 2] * 3), str(tmp_path / "train"), 100, overwrite=True)
    write_shards(samples([0, 1, 7]), str(tmp_path / "test"), 100, overwrite=True)
    with pytest.raises(DataError, match="labels go up to 7"):
        build_client_data(config, PartitionConfig("iid", 0.5), 2, seed=0)
    # With classes.json naming 8 classes, the labels are what it says (the empty classes are refused later
    # only if the long tail leaves them empty; here the test label is simply in range).
    write_classes(tmp_path, [f"c{i}" for i in range(8)])
    with pytest.raises(DataError, match="leaves class"):
        build_client_data(config, PartitionConfig("iid", 0.5), 2, seed=0)


@pytest.mark.parametrize("key", ["annotate.prompt", "align.prompt", "pretrain.prompt"])
def test_a_prompt_without_the_image_placeholder_is_refused_before_anything_loads(tmp_path, capsys, key):
    with pytest.raises(
        ConfigError,
        match=rf"{key} = 'Describe it.' is not allowed; it must be a prompt holding "
        r"<image> exactly once",
    ):
        load_config(SMOKE, [f"{key}=Describe it."])
    with pytest.raises(ConfigError, match="exactly once"):
        load_config(SMOKE, [f"{key}=<image> and <image>"])
    config = tmp_path / "a.toml"
    section, name = key.split(".")
    bad = f'{name} = "USER: Describe the image. ASSISTANT:"'
    config.write_text(
        textwrap.dedent(f"""\
        [run]
        root = "{tmp_path}"
        [annotate]
        model = "{tmp_path / "no-model-needed"}"
        shards = "{tmp_path}/*.tar"
        """)
        + (f"{bad}\n" if section == "annotate" else f"[{section}]\n{bad}\n")
    )
    assert main(["annotate", str(config)]) == 2
    assert f"{key} = " in one_error_line(capsys)


def test_shard_writer_refuses_keys_that_climb_out(tmp_path):
    for key in ("../up", "a/../../b", "/abs/key"):
        with pytest.raises(ValueError, match="without '..'"):
            write_shards([{"key": key, "image": np.zeros((1, 4, 4), np.uint8)}], str(tmp_path / "x"), 10)
    assert not list(tmp_path.iterdir())


def test_done_records_describe_the_file_they_were_made_from(tmp_path):
    """What a done record stores (JSON) tells a replaced, cut or rewritten file from the one it describes."""
    from mllmfl_dist.core.checkpoint import file_identity, same_file

    path = tmp_path / "f"
    path.write_bytes(b"abc")
    identity = json.loads(json.dumps(file_identity(path)))
    digest = json.loads(json.dumps(file_identity(path, digest=True)))
    assert same_file(path, identity) and same_file(path, digest)
    path.write_bytes(b"abd")  # same size, new content
    assert not same_file(path, digest)
    path.write_bytes(b"abcd")
    assert not same_file(path, identity) and not same_file(tmp_path / "missing", identity)
