"""The knowledge-bearing MLLM stand-ins (`tiny-models DIR --train shards/fmnist_web`): a short training on a
slice of the shipped corpus, once per session, must beat chance by far; the trained models load through the
real paths; the model card is what the saved weights measure; annotation names the garment; the LLaVA's
tower computes what the CLIP's image tower computes; builds are cached like the random ones. CPU only."""

import json
import shutil

import pytest
import torch

from mllmfl_dist.data.labeled_shards import resolve_pattern
from mllmfl_dist.data.images import to_pil
from mllmfl_dist.data.shards import read_labeled_shards
from mllmfl_dist.standins.web_captions import named_category
from mllmfl_dist.standins.standin_settings import StandinSettings
from mllmfl_dist.standins.build import MANIFEST, MODEL_CARD, build_tiny_models

CORPUS = "shards/fmnist_web"
TEST_SHARDS = "shards/fmnist_lt/test-*.tar.gz"
# Chance is 0.1; the short training (1,500 pairs, under a minute) must clear this by far on every number
# (it measured 0.52 CLIP zero-shot, 0.64 captions naming the class, 0.75 LLaVA teacher).
SHORT_TRAINING_FLOOR = 0.35


@pytest.fixture(scope="session")
def standins(tmp_path_factory):
    directory = tmp_path_factory.mktemp("standins")
    paths = build_tiny_models(directory, train=CORPUS, settings=StandinSettings.quick(), progress=False)
    card = json.loads((directory / MODEL_CARD).read_text())
    return paths, card


def file_states(root):
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_short_training_beats_chance_by_far(standins):
    _, card = standins
    measured = card["measured"]
    assert card["trained"] is True and measured["n_images"] == 200
    for key in ("clip_zero_shot_acc", "llava_caption_acc", "llava_teacher_acc"):
        assert measured[key] >= SHORT_TRAINING_FLOOR, (key, measured[key])
    assert card["corpus"]["samples_used"] == 1500 and card["clip"]["steps"] > 0
    assert set(measured["llava_teacher_acc_by_score"]) == {"sum", "mean"}


def test_trained_models_load_through_the_real_paths(standins):
    import open_clip
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

    paths, card = standins
    root = paths["llava"].parent
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["trained"] is True and manifest["model_card"] == MODEL_CARD
    assert manifest["settings"] == card["settings"]
    model = LlavaForConditionalGeneration.from_pretrained(paths["llava"])
    processor = AutoProcessor.from_pretrained(paths["llava"])
    assert isinstance(processor, LlavaProcessor)
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{paths['clip']}")
    assert isinstance(clip, open_clip.CLIP) and clip.visual.conv1.weight.shape == (64, 3, 8, 8)
    assert preprocess(to_pil(torch.zeros(1, 28, 28, dtype=torch.uint8)).convert("RGB")).shape == (3, 32, 32)
    # The LLaVA's tokenizer learned its merges on the corpus: caption words are one token each.
    assert len(processor.tokenizer(" sneakers trainers", add_special_tokens=False)["input_ids"]) == 2


def test_model_card_is_recomputed_from_the_saved_weights(standins):
    from mllmfl_dist.standins.model_card import measure_standins

    paths, card = standins
    measured = card["measured"]
    again = measure_standins(
        paths["clip"],
        paths["llava"],
        TEST_SHARDS,
        measured["class_names"],
        per_class=card["settings"]["card_per_class"],
    )
    for key in ("clip_zero_shot_acc", "llava_caption_acc", "llava_teacher_acc", "n_images"):
        assert again[key] == measured[key], key
    assert again["llava_teacher_acc_by_score"] == measured["llava_teacher_acc_by_score"]


def test_annotation_names_the_garment(standins):
    from mllmfl_dist.config import AnnotateConfig
    from mllmfl_dist.mllm.llava import load_llava
    from mllmfl_dist.stages.annotate import Generation, caption_batch

    paths, _ = standins
    images, labels, _ = read_labeled_shards(resolve_pattern(TEST_SHARDS, "test"))
    # Three images of each class, past the first 20 per class the card measured.
    picks = [int(torch.nonzero(labels == c).flatten()[k]) for c in range(10) for k in (20, 21, 22)]
    model, processor = load_llava(str(paths["llava"]))
    captions = caption_batch(
        model, processor, [to_pil(images[i]).convert("RGB") for i in picks], Generation.from_config(AnnotateConfig())
    )
    right = sum(named_category(text) == int(labels[i]) for text, i in zip(captions, picks))
    assert right > len(picks) // 2, list(zip(captions, labels[picks].tolist()))  # most of them


def test_llava_tower_is_the_clip_image_tower(standins):
    from mllmfl_dist.mllm.clip_teacher import load_clip
    from mllmfl_dist.mllm.llava import llava_inner, load_llava

    paths, _ = standins
    clip, _, _ = load_clip(f"local-dir:{paths['clip']}")
    llava, _ = load_llava(str(paths["llava"]))
    tower = llava_inner(llava).vision_tower
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled = tower(pixel_values=x).pooler_output  # post-LN CLS, open_clip's ln_post output
        torch.testing.assert_close(pooled @ clip.visual.proj, clip.encode_image(x), atol=1e-5, rtol=1e-4)


def test_reuse_rebuild_and_the_random_build_manifest(standins, tmp_path):
    paths, _ = standins
    root = paths["llava"].parent
    before = file_states(root)
    assert build_tiny_models(root, train=CORPUS, settings=StandinSettings.quick(), progress=False) == paths
    assert file_states(root) == before  # the finished trained build is reused
    # The same directory asked for the random build is rebuilt as one, without a model card.
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    build_tiny_models(copy)
    assert json.loads((copy / MANIFEST).read_text())["trained"] is False
    assert not (copy / MODEL_CARD).exists()


def test_clip_training_is_deterministic():
    from mllmfl_dist.standins.clip_train import train_clip
    from mllmfl_dist.standins.standin_data import read_caption_corpus
    from mllmfl_dist.standins.tiny import CLIP_CONFIG, CLIP_PREPROCESS

    images, captions = read_caption_corpus(CORPUS, limit=96)
    runs = [
        train_clip(
            images,
            captions,
            CLIP_CONFIG,
            CLIP_PREPROCESS,
            epochs=1,
            batch_size=32,
            lr=1e-3,
            weight_decay=0.1,
            seed=5,
            progress=False,
        )[0].state_dict()
        for _ in range(2)
    ]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_answer_tokens_are_the_processors(standins):
    from mllmfl_dist.standins.llava_train import encode_answer
    from mllmfl_dist.mllm.llava import load_llava

    paths, _ = standins
    _, processor = load_llava(str(paths["llava"]))
    image = to_pil(torch.zeros(1, 28, 28, dtype=torch.uint8)).convert("RGB")
    prompt = "USER: <image>\nWhat is the object in the image? ASSISTANT:"
    prompt_ids = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
    for answer in ("T-shirt/top", "Ankle boot", "black trainers for sale"):
        ids, start = encode_answer(processor, prompt_ids, answer)
        full = processor(images=[image], text=[prompt + " " + answer], return_tensors="pt")["input_ids"][0]
        assert ids[:-1] == full.tolist() and ids[-1] == processor.tokenizer.eos_token_id
        assert start == len(prompt_ids)


def test_missing_corpus_is_a_clear_cli_error(tmp_path, capsys):
    from mllmfl_dist.__main__ import main

    assert main(["tiny-models", str(tmp_path / "m"), "--train", str(tmp_path / "no_corpus")]) == 2
    assert "no_corpus" in capsys.readouterr().err


def test_answer_loss_is_the_models_own_loss(tiny_models):
    from mllmfl_dist.standins.llava_train import answer_loss, collate_answers, encode_answer
    from mllmfl_dist.mllm.llava import clip_visual_features, load_llava

    model, processor = load_llava(str(tiny_models["llava"]))
    gen = torch.Generator().manual_seed(1)
    images = [to_pil(torch.randint(0, 256, (3, 28, 28), generator=gen, dtype=torch.uint8)) for _ in range(3)]
    prompts = ["USER: <image>\nDescribe the image. ASSISTANT:", "USER: <image>\nWhat is it? ASSISTANT:"] * 2
    answers = ["black trainers for sale", "Ankle boot", "T-shirt/top"]
    rows = [
        encode_answer(
            processor,
            processor(images=[images[i]], text=[prompts[i]], return_tensors="pt")["input_ids"][0].tolist(),
            answers[i],
        )
        for i in range(3)
    ]
    input_ids, attention, labels = collate_answers(rows, processor.tokenizer.pad_token_id)
    assert (attention == 0).any()  # rows of different lengths: right padding is exercised
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = answer_loss(model, input_ids, attention, labels, clip_visual_features(model, pixels))
        theirs = model(input_ids=input_ids, attention_mask=attention, pixel_values=pixels, labels=labels).loss
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        text = [(processor.tokenizer(a)["input_ids"] + [processor.tokenizer.eos_token_id], 1) for a in answers]
        input_ids, attention, labels = collate_answers(text, processor.tokenizer.pad_token_id)
        torch.testing.assert_close(
            answer_loss(model, input_ids, attention, labels),
            model(input_ids=input_ids, attention_mask=attention, labels=labels).loss,
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_tower_converts_to_the_same_function(quick_gelu):
    import open_clip

    from mllmfl_dist.standins.clip_to_hf import convert_visual
    from mllmfl_dist.standins.tiny import CLIP_CONFIG

    torch.manual_seed(3)
    visual = open_clip.CLIP(**CLIP_CONFIG, quick_gelu=quick_gelu).visual.eval()
    with torch.no_grad():  # move every weight off its init so a swapped or missed tensor shows
        for p in visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tower = convert_visual(visual, image_size=32, patch_size=8)
    assert tower.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # open_clip's residual stream: patch + CLS embeddings, positions, ln_pre, then each block.
        h = visual.conv1(x).flatten(2).transpose(1, 2)
        h = torch.cat([visual.class_embedding.expand(2, 1, -1), h], dim=1) + visual.positional_embedding
        stream = [visual.ln_pre(h)]
        for block in visual.transformer.resblocks:
            stream.append(block(stream[-1]))
        out = tower(pixel_values=x, output_hidden_states=True)
        assert len(out.hidden_states) == len(stream)
        for ours, theirs in zip(out.hidden_states, stream):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.pooler_output @ visual.proj, visual(x), atol=1e-5, rtol=1e-5)
