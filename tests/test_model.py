"""AlexNet's exact shape: parameter count, feature-map sizes, and other image sizes."""

import pytest
import torch

from dist_alexnet.model import AlexNet, count_parameters


def test_default_model_is_the_tutorials_alexnet():
    model = AlexNet()
    assert count_parameters(model) == 58_299_082
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [96, 256, 384, 384, 256]
    assert [c.kernel_size for c in convs] == [(11, 11), (5, 5), (3, 3), (3, 3), (3, 3)]
    assert convs[0].stride == (4, 4) and convs[0].padding == (2, 2) and convs[1].padding == (2, 2)
    linears = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(9216, 4096), (4096, 4096), (4096, 10)]
    assert [m.p for m in model.classifier if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]


def test_feature_map_sizes_at_224():
    model = AlexNet().eval()
    x = torch.zeros(1, 1, 224, 224)
    assert model.features[0](x).shape == (1, 96, 55, 55)
    assert model.features(x).shape == (1, 256, 6, 6)
    assert model(x).shape == (1, 10)


@pytest.mark.parametrize("size", [64, 100, 227])
def test_other_image_sizes_keep_the_parameter_count(size):
    model = AlexNet(width=0.125).eval()
    assert model(torch.zeros(2, 1, size, size)).shape == (2, 10)
    assert count_parameters(model) == count_parameters(AlexNet(width=0.125))


def test_width_scales_the_model():
    assert count_parameters(AlexNet(width=0.125)) < count_parameters(AlexNet()) / 50
