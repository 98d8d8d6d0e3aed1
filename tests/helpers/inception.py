"""Random Inception weights (no download) where ``InceptionFeatures`` can load them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


def random_inception_weights(path: Path, size: int = 32) -> None:
    """Save a random, BN-calibrated ``inception-v3-compat`` state dict where InceptionFeatures can load it."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    torch.save({}, path.with_name("empty.pth"))
    with pytest.MonkeyPatch.context() as patch:  # no weights to load: keep the random initialisation
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: pytest.fail("download attempted"))
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                       feature_extractor_weights_path=str(path.with_name("empty.pth")))
    for module in net.modules():  # running statistics := those of one batch of random images
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (4, 3, size, size), dtype=np.uint8))
    with torch.no_grad():
        net.train()(images)
    torch.save(net.state_dict(), path)
