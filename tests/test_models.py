"""FL models: shapes of the three views and any channel count."""

import pytest
import torch

from mllmfl_dist.fl.models import build_model


@pytest.mark.parametrize("channels, scale, size, dim", [(1, 1, 28, 64), (3, 4, 32, 256), (5, 2, 16, 128)])
def test_resnet8_views(channels, scale, size, dim):
    model = build_model("resnet8", channels, 7, width_scale=scale)
    x = torch.randn(2, channels, size, size)
    fmap = model.feature_map(x)
    assert fmap.shape == (2, dim, size // 4, size // 4)
    assert model.pool(fmap).shape == (2, dim) and model.feature_dim == dim
    logits = model(x)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(logits, model.classifier(model.features(x)))


def test_resnet50_views_and_channels():
    model = build_model("resnet50", 1, 4)
    x = torch.randn(2, 1, 64, 64)
    assert model.feature_map(x).shape == (2, 2048, 2, 2)
    assert model(x).shape == (2, 4)


def test_reset_classifier_keeps_backbone():
    model = build_model("resnet8", 3, 10)
    conv = model.conv1.weight.clone()
    model.reset_classifier(3)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    assert torch.equal(conv, model.conv1.weight)


def test_unknown_arch():
    with pytest.raises(ValueError, match="resnet8"):
        build_model("vgg", 3, 10)


def test_channels_last_computes_the_same_function():
    torch.manual_seed(0)
    plain = build_model("resnet8", 3, 5, width_scale=2)
    fast = build_model("resnet8", 3, 5, width_scale=2, channels_last=True)
    fast.load_state_dict(plain.state_dict())
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16)
    assert fast.feature_map(x).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)
