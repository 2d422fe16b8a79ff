"""The tiny offline MLLMs, loaded back through the real loading path (`load_llava` -> `from_pretrained`,
`load_clip` -> `open_clip.create_model_and_transforms("local-dir:...")`). CPU only, no network."""

import copy
import hashlib
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from mllmfl_dist.mllm.clip_teacher import load_clip, zero_shot_classifier, zero_shot_logits
from mllmfl_dist.mllm.llava import (
    ModelLoadError,
    clip_visual_features,
    load_llava,
    project_visual_tokens,
    vision_grid,
)
from mllmfl_dist.standins.build import MANIFEST, build_tiny_models

PROMPT = "USER: <image>\nDescribe the image. ASSISTANT:"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="module")
def llava(tiny):
    return load_llava(str(tiny["llava"]))


@pytest.fixture(scope="module")
def clip(tiny):
    return load_clip(f"local-dir:{tiny['clip']}")


def four_images():
    """Four images of different content and sizes (the processor resizes and crops them)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 48, dtype=np.float32)
    return [
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)),
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)),
        Image.fromarray(np.stack([np.tile(ramp, (36, 1))] * 3, axis=-1).astype(np.uint8)),
        Image.fromarray(np.full((64, 64, 3), (200, 30, 90), np.uint8)),
    ]


def generated(model, inputs, max_new_tokens=12):
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


def test_llava_loads_through_from_pretrained(tiny, llava):
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

    model, processor = llava
    assert isinstance(model, LlavaForConditionalGeneration) and not model.training
    assert isinstance(processor, LlavaProcessor)
    assert processor.tokenizer.padding_side == "left"
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    assert model.config.text_config.vocab_size == len(tok)
    # The directory is an ordinary save_pretrained directory: the plain transformers calls load it too.
    again = LlavaForConditionalGeneration.from_pretrained(tiny["llava"])
    for (name, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), name
    assert isinstance(AutoProcessor.from_pretrained(tiny["llava"]), LlavaProcessor)
    content = [{"type": "image"}, {"type": "text", "text": "Describe the image."}]
    conversation = [{"role": "user", "content": content}]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == PROMPT  # llava-1.5 format


def test_tokenizer_round_trips_a_caption(llava):
    tok = llava[1].tokenizer
    caption = "A close-up photo of a small red car parked on the street, next to 3 trees."
    ids = tok(caption).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == caption
    assert tok("<image>", add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids("<image>")]
    assert len({tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 4
    # Known words get short codes: the BPE merges were learned on the caption vocabulary.
    assert len(tok("airplane dog truck", add_special_tokens=False).input_ids) <= 4


def test_image_tokens_match_the_models_visual_tokens(llava):
    model, processor = llava
    tokens, grid_h, grid_w, width = vision_grid(model)
    assert (tokens, grid_h, grid_w, width) == (16, 4, 4, 32)
    inputs = processor(images=four_images(), text=[PROMPT] * 4, return_tensors="pt", padding=True)
    per_row = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1)
    assert per_row.tolist() == [tokens] * 4
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert [f.shape for f in feats] == [torch.Size([tokens, model.config.text_config.hidden_size])] * 4
    # "full" keeps the CLS token: one more visual token.
    full = copy.deepcopy(model.config)
    full.vision_feature_select_strategy = "full"
    assert vision_grid(full) == (17, 4, 4, 32)


def capture_projector_input(model, **inputs):
    seen = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen["x"]


def test_clip_visual_features_are_what_the_projector_reads(llava):
    model, processor = llava
    inputs = processor(images=four_images(), text=[PROMPT] * 4, return_tensors="pt", padding=True)
    with torch.no_grad():
        feats = clip_visual_features(model, inputs["pixel_values"])
        projected = project_visual_tokens(model, feats)
        reference = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert feats.shape == (4, *vision_grid(model)[::3])
    assert torch.equal(feats, capture_projector_input(model, **inputs))
    assert torch.equal(projected, torch.stack(reference))


def test_clip_visual_features_with_the_full_strategy(llava):
    model, processor = llava
    config, saved = model.config, model.config.vision_feature_select_strategy
    try:
        config.vision_feature_select_strategy = processor.vision_feature_select_strategy = "full"
        inputs = processor(images=four_images()[:2], text=[PROMPT] * 2, return_tensors="pt", padding=True)
        assert ((inputs["input_ids"] == config.image_token_id).sum(dim=1) == 17).all()
        with torch.no_grad():
            feats = clip_visual_features(model, inputs["pixel_values"])
        assert feats.shape == (2, 17, 32) == (2, *vision_grid(model)[::3])
        assert torch.equal(feats, capture_projector_input(model, **inputs))
    finally:
        config.vision_feature_select_strategy = processor.vision_feature_select_strategy = saved


def test_batched_generation_equals_one_image_at_a_time(llava):
    model, processor = llava
    images = four_images()
    # Prompts of different lengths, so the batch is left-padded.
    prompts = [
        PROMPT,
        "USER: <image>\nWhat is in this picture? ASSISTANT:",
        "USER: <image>\nDescribe. ASSISTANT:",
        "USER: <image>\nDescribe the image in a few words, please. ASSISTANT:",
    ]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"][:, 0] == 0).any() and (inputs["attention_mask"][:, -1] == 1).all()
    batch = generated(model, inputs)
    assert batch.shape[0] == 4
    for i in range(4):
        single = generated(model, processor(images=images[i], text=prompts[i], return_tensors="pt"))
        n = single.shape[1]
        assert torch.equal(batch[i, :n], single[0]), i
        assert (batch[i, n:] == processor.tokenizer.pad_token_id).all()
    texts = processor.batch_decode(batch, skip_special_tokens=True)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)


def test_generation_depends_on_the_image(llava):
    model, processor = llava
    inputs = processor(images=four_images(), text=[PROMPT] * 4, return_tensors="pt", padding=True)
    out = generated(model, inputs)
    assert len({tuple(row.tolist()) for row in out}) > 1


def test_zero_shot_logits(clip):
    model, preprocess, tokenizer = clip
    images = torch.stack([preprocess(im) for im in four_images()])
    assert images.shape == (4, 3, 32, 32)
    classes = ["airplane", "cat", "dog", "ankle boot", "truck"]
    templates = ("a photo of a {}.", "a blurry photo of a {}.")
    logits = zero_shot_logits(model, tokenizer, images, classes, templates)
    assert logits.shape == (4, 5) and logits.dtype == torch.float32
    assert torch.allclose(logits.softmax(dim=1).sum(dim=1), torch.ones(4))
    assert logits.abs().max() <= 100.0 + 1e-3  # cosine similarities times the logit scale
    classifier = zero_shot_classifier(model, tokenizer, classes, templates)
    assert classifier.shape == (5, model.text_projection.shape[1])
    assert torch.allclose(torch.linalg.vector_norm(classifier, dim=1), torch.ones(5))
    again = zero_shot_logits(model, tokenizer, images, classes, classifier=classifier)
    assert torch.allclose(logits, again)


def file_states(root):
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def digests(paths):
    names = ["llava/model.safetensors", "llava/tokenizer.json", "clip/open_clip_model.safetensors"]
    root = paths["llava"].parent
    return {n: hashlib.sha256((root / n).read_bytes()).hexdigest() for n in names}


def test_build_is_idempotent_and_deterministic(tiny, tmp_path):
    root = tiny["llava"].parent
    before = file_states(root)
    assert MANIFEST in before and len(before) > 5
    assert build_tiny_models(root) == tiny
    assert file_states(root) == before
    # A second build elsewhere writes the same bytes; one without its manifest (interrupted) is rebuilt.
    other = build_tiny_models(tmp_path / "again")
    assert digests(other) == digests(tiny)
    (tmp_path / "again" / MANIFEST).unlink()
    stale = file_states(tmp_path / "again")
    build_tiny_models(tmp_path / "again")
    assert file_states(tmp_path / "again").keys() == stale.keys() | {MANIFEST}
    assert file_states(tmp_path / "again")["llava/model.safetensors"] != stale["llava/model.safetensors"]
    assert digests(other) == digests(tiny)


def test_a_cut_model_file_or_a_killed_build_is_rebuilt(tiny, tmp_path):
    """The manifest lists every file with its size and mtime: a file cut since (a power loss) is not taken
    as a complete build, and partial directories of a killed build are removed."""
    root = tmp_path / "models"
    build_tiny_models(root)
    weights = root / "llava" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    killed = root / ".clip.partial-99999"
    killed.mkdir()
    (killed / "open_clip_model.safetensors").write_bytes(b"half")
    build_tiny_models(root)
    assert digests(build_tiny_models(root)) == digests(tiny) and not killed.exists()
    load_llava(str(root / "llava"))  # loads again


def test_missing_models_raise_model_load_error(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelLoadError) as err:
        load_llava(str(missing))
    message = str(err.value)
    assert str(missing) in message and "\n" not in message
    assert "tiny-models" in message and "HF_HOME" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_llava(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError) as err:
        load_clip(f"local-dir:{missing}")
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="not an open_clip architecture"):
        load_clip("No-Such-CLIP")
    with pytest.raises(ValueError, match="dtype"):
        load_llava(str(missing), dtype="float8")


def test_concurrent_builds_of_one_directory(tiny, tmp_path):
    results, errors = [], []

    def build():
        try:
            results.append(build_tiny_models(tmp_path / "shared"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert digests(results[0]) == digests(tiny)
