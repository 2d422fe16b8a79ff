"""The teachers as released: CLIP's own logit scale, CLIP2FL's projection width and text projection, the
teachers' accuracy / entropy diagnostics, and the uniform control teacher of alignment."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from launchers import SMOKE

from mllmfl_dist.config import ConfigError, load_config
from mllmfl_dist.fl.strategies import build_strategy
from mllmfl_dist.mllm.teacher_diagnostics import teacher_diagnostics

CLASSES = ["cat", "dog", "car"]


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]


def test_the_clip_teachers_logit_scale_is_the_loaded_models_own_unless_a_number_is_set(tiny_models, tmp_path):
    from mllmfl_dist.mllm.clip_teacher import load_clip, resolve_logit_scale, zero_shot_classifier, zero_shot_logits
    from mllmfl_dist.mllm.teachers import teacher_cache_key, teacher_distributions

    spec = f"local-dir:{tiny_models['clip']}"
    clip, preprocess, tokenizer = load_clip(spec)
    own = float(clip.logit_scale.detach().exp())
    assert own != 100 and resolve_logit_scale(clip) == pytest.approx(own)
    assert resolve_logit_scale(clip, 7.5) == 7.5

    images = _images(4)
    x = torch.stack([preprocess(im) for im in images])
    cosine = zero_shot_logits(
        clip, tokenizer, x, CLASSES, logit_scale=1.0, classifier=zero_shot_classifier(clip, tokenizer, CLASSES)
    )
    details = {}
    q = teacher_distributions("clip", images, CLASSES, model=spec, temperature=2.0, cache_dir=tmp_path, details=details)
    assert details["logit_scale"] == pytest.approx(own)
    torch.testing.assert_close(q, torch.softmax(own * cosine / 2.0, dim=1), rtol=1e-5, atol=1e-6)
    set_q = teacher_distributions(
        "clip", images, CLASSES, model=spec, temperature=2.0, logit_scale=7.5, cache_dir=tmp_path
    )
    torch.testing.assert_close(set_q, torch.softmax(7.5 * cosine / 2.0, dim=1), rtol=1e-5, atol=1e-6)
    # The cache keys on the scale: two files, and a hit reports the scale it was computed at.
    assert teacher_cache_key("clip", images, CLASSES, model=spec) != teacher_cache_key(
        "clip", images, CLASSES, model=spec, logit_scale=7.5
    )
    assert len(list(tmp_path.glob("teacher-clip-*.pt"))) == 2
    again = {}
    teacher_distributions("clip", images, CLASSES, model=spec, temperature=2.0, cache_dir=tmp_path, details=again)
    assert again == details


def test_clip2fl_defaults_to_the_models_own_scale_and_its_cache_keys_on_the_setting(tiny_models):
    from mllmfl_dist.fl.strategies.clip2fl_teacher import cache_key, client_samples
    from mllmfl_dist.stages.inputs import build_data

    sets = ["federated.strategy=clip2fl", f"clip2fl.model=local-dir:{tiny_models['clip']}"]
    cfg = load_config(SMOKE, sets)
    assert cfg.section("clip2fl").logit_scale == 0
    data = build_data(cfg)
    indices = client_samples(data)
    scaled = load_config(SMOKE, [*sets, "clip2fl.logit_scale=100"])
    assert cache_key(cfg.section("clip2fl"), data, indices) != cache_key(scaled.section("clip2fl"), data, indices)
    with pytest.raises(ConfigError, match="clip2fl.logit_scale"):
        load_config(SMOKE, [*sets, "clip2fl.logit_scale=-1"])


def test_clip2fl_projects_to_twice_the_feature_width_unless_set(tiny_models):
    from mllmfl_dist.stages.inputs import build_data, build_fl_model

    sets = ["federated.strategy=clip2fl", f"clip2fl.model=local-dir:{tiny_models['clip']}"]
    cfg = load_config(SMOKE, sets)
    model = build_fl_model(cfg.model, build_data(cfg), cfg.run.seed, build_strategy(cfg).projection_dim)
    assert model.projection.weight.shape == (128, 64) and model.classifier.weight.shape == (10, 128)
    assert build_strategy(load_config(SMOKE, [*sets, "clip2fl.projection_dim=48"])).projection_dim(64) == 48
    # FedAvg's family adds none, so its models stay as they were.
    fedavg = load_config(SMOKE)
    assert build_fl_model(fedavg.model, build_data(fedavg), 0, build_strategy(fedavg).projection_dim).projection is None


@pytest.mark.parametrize("text_dim, feature_dim", [(32, 128), (64, 16)])
def test_the_text_projection_is_seeded_orthonormal_and_feeds_the_contrast(text_dim, feature_dim):
    from mllmfl_dist.fl import federated_features as ff
    from mllmfl_dist.fl.strategies.clip2fl import text_projection

    p = text_projection(text_dim, feature_dim, seed=3)
    assert p.shape == (text_dim, feature_dim)
    assert torch.equal(p, text_projection(text_dim, feature_dim, seed=3))
    assert not torch.allclose(p, text_projection(text_dim, feature_dim, seed=4))
    small = min(text_dim, feature_dim)
    gram = p @ p.T if text_dim <= feature_dim else p.T @ p
    torch.testing.assert_close(gram, torch.eye(small), atol=1e-5, rtol=0)

    # The strategy's contrast, with the text embeddings of another width than the features.
    cfg = load_config(SMOKE, ["federated.strategy=clip2fl", "clip2fl.model=local-dir:unused"])
    strategy = build_strategy(cfg)
    from mllmfl_dist.fl.strategies.clip2fl_teacher import TeacherLogits

    text = nn.functional.normalize(torch.randn(10, text_dim, generator=torch.Generator().manual_seed(0)), dim=1)
    strategy.teacher = TeacherLogits(np.arange(5), torch.zeros(5, 10), text, 1.0)
    features = torch.randn(10, 3, feature_dim, requires_grad=True)
    loss = strategy.feature_extra_loss()(features)
    mapped = nn.functional.normalize(text @ text_projection(text_dim, feature_dim, cfg.run.seed), dim=1)
    expected = cfg.section("clip2fl").contrast_alpha * ff.text_contrast_loss(features, mapped, 0.1)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert features.grad.abs().sum() > 0


def test_teacher_diagnostics_match_a_hand_computation():
    q = torch.tensor([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.6, 0.3]])
    labels = torch.tensor([0, 1, 2, 1])
    stats = teacher_diagnostics(q, labels)
    entropy = [
        -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)),
        0.0,
        math.log(3),
        -(0.1 * math.log(0.1) + 0.6 * math.log(0.6) + 0.3 * math.log(0.3)),
    ]
    # argmax: 0 (right), 0 (wrong), 0 (first of a tie; wrong), 1 (right)
    assert stats["accuracy"] == pytest.approx(0.5)
    assert stats["mean_entropy_nats"] == pytest.approx(sum(entropy) / 4)
    assert stats["max_entropy_nats"] == pytest.approx(math.log(3))
    assert stats["mean_top_probability"] == pytest.approx((0.7 + 1.0 + 1 / 3 + 0.6) / 4)
    assert stats["samples"] == 4 and teacher_diagnostics(q)["accuracy"] is None
    with pytest.raises(ValueError, match="labels"):
        teacher_diagnostics(q, labels[:3])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_uniform_teachers_alignment_loss_is_label_smoothing_at_beta(temperature):
    from mllmfl_dist.stages.align import alignment_loss, uniform_teacher

    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.1, 0.2, 0.3, 0.4]])
    labels = torch.tensor([0, 3])
    q = uniform_teacher(2, 4)
    assert torch.equal(q, torch.full((2, 4), 0.25))
    beta, c = 0.5, 4
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        ce = -row[label] + math.log(sum(math.exp(v) for v in row))
        log_z = math.log(sum(math.exp(v / temperature) for v in row))
        kl = sum((1 / c) * (math.log(1 / c) - (v / temperature - log_z)) for v in row)
        total += ce + beta * temperature**2 * kl
    loss = alignment_loss(logits, labels, q, beta, temperature)
    assert float(loss) == pytest.approx(total / 2, rel=1e-6)


def test_compare_takes_the_uniform_teacher_without_a_model():
    from mllmfl_dist.commands.compare import method_config
    from mllmfl_dist.commands.compare_methods import Method, parse_method

    cfg = load_config(SMOKE)
    method = parse_method("fedavg+align[uniform]", cfg)
    assert method == Method("fedavg", teacher="uniform") and method.name == "fedavg+align[uniform]"
    row = method_config(cfg, method)
    assert (row.align.every, row.align.teacher, row.align.teacher_model) == (1, "uniform", "")
    with pytest.raises(ConfigError, match="align.teacher"):
        load_config(SMOKE, ["align.teacher=smooth"])


def test_the_uniform_teacher_cannot_pseudo_label_web_images(tmp_path):
    from mllmfl_dist.stages.align import build_alignment_set
    from mllmfl_dist.stages.inputs import build_data

    cfg = load_config(SMOKE, ["align.every=1", "align.source=web", "align.teacher=uniform"])
    with pytest.raises(ConfigError, match="'uniform' cannot"):
        build_alignment_set(cfg, build_data(cfg), cache_dir=tmp_path)


def test_the_report_shows_the_teachers_accuracy_and_entropy():
    from mllmfl_dist.stages.report import report_markdown

    fed = {
        "round": 3,
        "acc": 0.5,
        "clip2fl_teacher": {
            "samples": 90,
            "logit_scale": 14.2857,
            "temperature": 3.0,
            "accuracy": 0.25,
            "mean_entropy_nats": 0.01,
            "max_entropy_nats": 2.302585,
            "mean_top_probability": 0.99,
        },
        "alignment": {
            "images": 200,
            "source": "holdout",
            "server_labeled_images": 200,
            "teacher": "uniform",
            "teacher_accuracy": 0.1,
            "teacher_mean_entropy_nats": 2.302585,
            "teacher_max_entropy_nats": 2.302585,
            "teacher_mean_top_probability": 0.1,
        },
    }
    text = report_markdown({"run_dir": "r", "federated": fed})
    assert "| CLIP2FL, clients' 90 samples, scale 14.286, T 3.0 | 0.250 | 0.010 | 2.303 | 0.990 |" in text
    assert "| alignment (uniform), its 200 images | 0.100 | 2.303 | 2.303 | 0.100 |" in text
    assert "| teacher |" not in report_markdown({"run_dir": "r", "federated": {"round": 3, "acc": 0.5}})
