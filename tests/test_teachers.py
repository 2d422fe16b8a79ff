"""Teacher distributions for global alignment: shapes, normalisation, image dependence, the on-disk cache,
and the LLaVA score being the answer's log-likelihood."""

import numpy as np
import pytest
import torch
from PIL import Image

import mllmfl_dist.mllm.teachers as teachers
from mllmfl_dist.config import ConfigError
from mllmfl_dist.mllm.llava import load_llava
from mllmfl_dist.mllm.teachers import llava_answer_loglik, teacher_cache_key, teacher_distributions

# Class names of different token lengths, so the batched (left-padded) path is exercised.
CLASSES = ["cat", "ankle boot", "zebrafish tank", "dog"]
PROMPT = "USER: <image>\nWhat is the object in the image? ASSISTANT:"


def _images(n=6, seed=0, size=28):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _model(tiny_models, kind):
    return str(tiny_models["llava"]) if kind == "llava" else "local-dir:" + str(tiny_models["clip"])


def _boom(*args, **kwargs):
    raise AssertionError("a model was loaded")


@pytest.mark.parametrize("kind", ["llava", "clip"])
def test_distributions_and_cache(kind, tiny_models, tmp_path, monkeypatch):
    images = _images()
    # The random tiny models are very confident; a high temperature keeps q away from one-hot, so rows of
    # different images differ by more than rounding.
    kwargs = dict(model=_model(tiny_models, kind), prompt=PROMPT, cache_dir=tmp_path, batch_size=5)
    q = teacher_distributions(kind, images, CLASSES, temperature=20.0, **kwargs)
    assert q.shape == (6, 4) and q.dtype == torch.float32
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(-1), torch.ones(6), atol=1e-5, rtol=0)
    # The teacher sees the image: no two rows are the same distribution.
    for i in range(6):
        for j in range(i + 1, 6):
            assert not torch.allclose(q[i], q[j], atol=1e-6), (i, j)
    files = list(tmp_path.glob(f"teacher-{kind}-*.pt"))
    assert len(files) == 1 and len(files[0].stem.split("-")[-1]) == 16

    # A cache hit loads no model.
    monkeypatch.setattr(teachers, "load_llava", _boom)
    monkeypatch.setattr(teachers, "load_clip", _boom)
    again = teacher_distributions(kind, _images(), CLASSES, temperature=20.0, **kwargs)
    assert torch.equal(again, q)

    # Another temperature, or one changed image, is another key: a new computation (which would load).
    with pytest.raises(AssertionError, match="a model was loaded"):
        teacher_distributions(kind, images, CLASSES, temperature=2.0, **kwargs)
    changed = list(images)
    pixels = np.array(changed[3])
    pixels[0, 0, 0] ^= 1
    changed[3] = Image.fromarray(pixels)
    with pytest.raises(AssertionError, match="a model was loaded"):
        teacher_distributions(kind, changed, CLASSES, temperature=20.0, **kwargs)
    monkeypatch.undo()

    # Without a cache dir the same inputs are recomputed to the same result; a higher temperature is flatter.
    plain = dict(model=kwargs["model"], prompt=PROMPT)
    assert torch.allclose(teacher_distributions(kind, images, CLASSES, temperature=20.0, **plain), q, atol=1e-5)
    hot = teacher_distributions(kind, images, CLASSES, temperature=80.0, **plain)
    assert (hot.max(-1).values <= q.max(-1).values + 1e-6).all()


def test_cache_key_changes():
    images = _images(3)
    base = dict(model="m", prompt=PROMPT, temperature=1.0)
    key = teacher_cache_key("llava", images, CLASSES, **base)
    assert key == teacher_cache_key("llava", _images(3), CLASSES, **base)
    assert key != teacher_cache_key("llava", images, CLASSES, **{**base, "temperature": 2.0})
    assert key != teacher_cache_key("llava", images, CLASSES[::-1], **base)
    assert key != teacher_cache_key("llava", images, CLASSES, **{**base, "prompt": PROMPT + " "})
    assert key != teacher_cache_key("llava", images[:2] + _images(1, seed=9), CLASSES, **base)
    assert key != teacher_cache_key("clip", images, CLASSES, **base)
    assert key != teacher_cache_key("llava", images, CLASSES, **{**base, "model": "m2"})
    assert key != teacher_cache_key("llava", images, CLASSES, **{**base, "score": "mean"})
    # clip ignores the llava score
    assert teacher_cache_key("clip", images, CLASSES, **base) == teacher_cache_key(
        "clip", images, CLASSES, **{**base, "score": "mean"}
    )


def test_cache_key_changes_when_local_weights_are_replaced(tiny_models, tmp_path):
    """A teacher directory whose weights were replaced in place (same path) must not reuse the cached q."""
    import shutil

    clip = tmp_path / "clip"
    shutil.copytree(tiny_models["clip"], clip)
    images = _images(2)
    key = teacher_cache_key("clip", images, CLASSES, model=f"local-dir:{clip}")
    weights = clip / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    assert key != teacher_cache_key("clip", images, CLASSES, model=f"local-dir:{clip}")


def test_llava_score_is_answer_loglik(tiny_models):
    llava, processor = load_llava(str(tiny_models["llava"]))
    image = _images(1, seed=3)[0]
    batched = llava_answer_loglik(llava, processor, [image] + _images(2, seed=4), CLASSES, PROMPT, batch_size=3)
    prompt_ids = processor(images=[image], text=[PROMPT], return_tensors="pt")["input_ids"][0]
    manual, lengths = [], []
    for name in CLASSES:
        inputs = processor(images=[image], text=[PROMPT + " " + name], return_tensors="pt")
        ids = inputs["input_ids"][0]
        start = len(prompt_ids)
        assert torch.equal(ids[:start], prompt_ids) and len(ids) > start
        with torch.no_grad():
            logits = llava(**inputs).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        manual.append(logp[start - 1 : -1].gather(-1, ids[start:, None]).sum())
        lengths.append(len(ids) - start)
    manual = torch.stack(manual)
    assert manual.max() < 0
    torch.testing.assert_close(batched[0], manual, atol=1e-4, rtol=1e-5)
    q = teacher_distributions(
        "llava", [image], CLASSES, model=str(tiny_models["llava"]), prompt=PROMPT, temperature=2.0
    )
    torch.testing.assert_close(q[0], torch.softmax(manual / 2.0, dim=-1), atol=1e-5, rtol=1e-4)
    # The length-normalised score is the mean over the answer's tokens; the names differ in token count,
    # so it is not the sum scaled by one constant.
    lengths = torch.tensor(lengths, dtype=torch.float32)
    assert len(set(lengths.tolist())) > 1
    mean = llava_answer_loglik(llava, processor, [image], CLASSES, PROMPT, batch_size=3, score="mean")
    torch.testing.assert_close(mean[0], manual / lengths, atol=1e-4, rtol=1e-5)
    q_mean = teacher_distributions(
        "llava", [image], CLASSES, model=str(tiny_models["llava"]), prompt=PROMPT, temperature=2.0, score="mean"
    )
    torch.testing.assert_close(q_mean[0], torch.softmax(manual / lengths / 2.0, dim=-1), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="score"):
        llava_answer_loglik(llava, processor, [image], CLASSES, PROMPT, score="max")


def test_errors(tiny_models):
    images = _images(2)
    for kind in ("none", "gpt", ""):
        with pytest.raises(ValueError, match="teacher kind"):
            teacher_distributions(kind, images, CLASSES, model="x")
    with pytest.raises(ConfigError, match="align.teacher_model"):
        teacher_distributions("llava", images, CLASSES, model="")
    with pytest.raises(ConfigError, match="align.teacher_model"):
        teacher_distributions("clip", images, CLASSES)
    with pytest.raises(ValueError, match="temperature"):
        teacher_distributions("clip", images, CLASSES, model="x", temperature=0.0)
    with pytest.raises(ValueError, match="<image>"):
        teacher_distributions("llava", images, CLASSES, model="x", prompt="USER: hi ASSISTANT:")
    with pytest.raises(ValueError, match="score"):
        teacher_distributions("llava", images, CLASSES, model="x", score="median")
