"""The shape-faithful miniatures (llava-1.5-7b-hf's and ViT-B-32's geometry) load through the real paths with
the real shapes; the generated CIFAR pickles read through the project's loader; a processor that disagrees with
its tower is refused at load in one line naming both shapes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from paper_data import write_cifar
from PIL import Image

from mllmfl_dist.data import DataError
from mllmfl_dist.standins.miniature import IMAGE_TOKEN_ID, PAD_TOKEN_ID
from mllmfl_dist.mllm.llava import ModelLoadError, load_llava, vision_grid


def test_the_llava_miniature_has_llava15_geometry_through_from_pretrained(miniatures):
    llava, processor = load_llava(str(miniatures["llava"]))
    assert vision_grid(llava) == (576, 24, 24, 32)
    config = llava.config
    assert (
        config.vision_config.image_size,
        config.vision_config.patch_size,
        config.vision_feature_layer,
        config.vision_feature_select_strategy,
        config.image_token_id,
    ) == (336, 14, -2, "default", 32000)
    saved = json.loads((miniatures["llava"] / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "LlamaTokenizer"
    assert processor.tokenizer("a cat").input_ids[0] == 1  # <s> prepended, as Llama's
    assert processor.tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [IMAGE_TOKEN_ID, PAD_TOKEN_ID]
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == "USER: <image>\nDescribe it. ASSISTANT:"
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((32, 32), (500, 375))]
    batch = processor(images=images, text=[prompt, prompt + " A"], padding=True, return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 3, 336, 336)  # shortest edge 336, centre crop 336
    assert (batch["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist() == [576, 576]
    assert (batch["input_ids"][:, -1] != PAD_TOKEN_ID).all()  # left padding, for batched generation
    with torch.no_grad():
        out = llava.generate(**batch, max_new_tokens=2)
        tower = llava.model.vision_tower(batch["pixel_values"])
    assert out.shape == (2, batch["input_ids"].shape[1] + 2)
    assert tower.last_hidden_state.shape[1] == 577  # CLS + 24 x 24
    projector = llava.model.multi_modal_projector
    assert projector.linear_2.out_features == llava.config.text_config.hidden_size


def test_the_open_clip_miniature_has_vit_b32_geometry(miniatures):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{miniatures['clip']}")
    image = preprocess(Image.new("RGB", (300, 200), (10, 200, 30))).unsqueeze(0)
    assert image.shape == (1, 3, 224, 224)
    assert model.visual.patch_size == (32, 32) or model.visual.patch_size == 32
    with torch.no_grad():
        assert model.encode_image(image).shape == (1, 512)
        assert model.encode_text(open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat."])).shape == (1, 512)


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_generated_cifar_pickles_read_through_the_loader_with_only_the_md5_table_patched(
    tmp_path, monkeypatch, name, classes
):
    import torchvision

    from mllmfl_dist.data.sources import load_cifar

    counts = [3] * classes
    table = write_cifar(tmp_path, name, counts, 1)[name]
    with pytest.raises(DataError, match="MD5"):  # the real release's digests: torchvision refuses them
        load_cifar(name, str(tmp_path), download=False)
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    for attribute in ("train_list", "test_list", "meta"):
        monkeypatch.setattr(cls, attribute, table[attribute])
    arrays = load_cifar(name, str(tmp_path), download=False)
    assert arrays.train_images.shape == (3 * classes, 3, 32, 32) and arrays.train_images.dtype == torch.uint8
    assert np.bincount(arrays.train_labels, minlength=classes).tolist() == counts
    assert arrays.test_images.shape == (classes, 3, 32, 32) and len(arrays.class_names) == classes


def _edited(miniatures, tmp_path, edit) -> str:
    folder = tmp_path / "llava"
    shutil.copytree(miniatures["llava"], folder)
    path = folder / "processor_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return str(folder)


def test_a_processor_cropping_other_than_the_tower_is_refused_naming_both_sizes(miniatures, tmp_path):
    def crop_224(config):
        config["image_processor"]["crop_size"] = {"height": 224, "width": 224}

    with pytest.raises(ModelLoadError) as err:
        load_llava(_edited(miniatures, tmp_path, crop_224))
    message = str(err.value)
    assert "224x224" in message and "336x336" in message and "\n" not in message


def test_a_processor_expanding_image_to_another_patch_count_is_refused_naming_both(miniatures, tmp_path):
    def patch_16(config):
        config["patch_size"] = 16

    with pytest.raises(ModelLoadError) as err:
        load_llava(_edited(miniatures, tmp_path, patch_16))
    message = str(err.value)
    assert "441 tokens" in message and "576 visual tokens" in message and "24x24" in message
    assert "\n" not in message
