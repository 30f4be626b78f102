"""Shared fixtures: a tiny synthetic dataset in the real AttnGAN/CUB layout."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import models  # noqa: E402
import preprocess_data  # noqa: E402
import utils  # noqa: E402


def make_tiny_shapes(out_dir, num_train=40, num_test=20, image_size=32, seed=0, p_two=0.3):
    c = utils.to_cfg({**preprocess_data.DEFAULTS['SHAPES'], 'OUT_DIR': str(out_dir),
                      'NUM_TRAIN': num_train, 'NUM_TEST': num_test, 'IMAGE_SIZE': image_size,
                      'SEED': seed, 'P_TWO_OBJECTS': p_two})
    preprocess_data.make_shapes(c, utils.get_logger(None, 'tiny'))
    return str(out_dir)


@pytest.fixture(scope='session')
def tiny_shapes(tmp_path_factory):
    """40 train / 20 test images of 32 px, 10 captions each (read-only: copy before writing)."""
    return make_tiny_shapes(tmp_path_factory.mktemp('data') / 'shapes')


@pytest.fixture(scope='session')
def tiny_judge(tmp_path_factory, tiny_shapes):
    """A random-init shapes judge saved as fid_score.py --train_judge saves it."""
    import fid_score
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp('judge')
    judge = models.ShapesJudge(width=4, cell_dim=4, image_size=32)
    utils.save_checkpoint(str(out), 'judge', 0, {'judge': judge}, name='judge_final.pt',
                          extra={'model': {'width': 4, 'cell_dim': 4, 'image_size': 32},
                                 'attributes': fid_score.caption_attributes(tiny_shapes)})
    return str(out)
