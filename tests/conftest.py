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


def protocol0_names(names):
    """filenames.pickle as Python 2 writes it: (lp0, then V<name> p<n> a per name, '.'."""
    out = b'(lp0\n'
    for i, n in enumerate(names, 1):
        out += b'V' + n.encode() + b'\np' + str(i).encode() + b'\na'
    return out + b'.'


def protocol0_int64_list(values):
    """train/class_info.pickle: a list of numpy.core.multiarray.scalar(dtype('i8'), bytes),
    a value seen before repeated through its memo slot (g<n>), as pickle's memo does."""
    out = (
        b"(lp0\ncnumpy.core.multiarray\nscalar\np1\n(cnumpy\ndtype\np2\n(S'i8'\np3\nI0\nI1\ntp4\n"
        b"Rp5\n(I3\nS'<'\np6\nNNNI-1\nI-1\nI0\ntp7\nb"
    )
    memo, slot, first = {}, 8, True
    for v in values:
        if v in memo:
            out += b'g' + str(memo[v]).encode() + b'\na'
            continue
        raw = ''.join(f'\\x{b:02x}' for b in int(v).to_bytes(8, 'little'))
        if not first:
            out += b'g1\n(g5\n'
        out += (
            b"S'"
            + raw.encode()
            + b"'\np"
            + str(slot).encode()
            + b'\ntp'
            + str(slot + 1).encode()
            + b'\nRp'
            + str(slot + 2).encode()
            + b'\na'
        )
        memo[v], slot, first = slot + 2, slot + 3, False
    return out + b'.'


def write_attngan_metadata(root, crlf=False):
    """Rewrite a CUB-layout dataset's filenames.pickle and class_info.pickle in the bytes of
    AttnGAN's birds.zip (protocol 0; train class ids as numpy int64 scalars, test as ints),
    optionally as a CRLF checkout of them."""
    for split in ('train', 'test'):
        keys = utils.read_attngan_split(root, split)
        classes = [
            int(c) for c in utils.safe_pickle_load(os.path.join(root, split, 'class_info.pickle'))
        ]
        cls = (
            protocol0_int64_list(classes)
            if split == 'train'
            else b'(lp0\n' + b''.join(b'I' + str(c).encode() + b'\na' for c in classes) + b'.'
        )
        for name, data in (('filenames.pickle', protocol0_names(keys)), ('class_info.pickle', cls)):
            with open(os.path.join(root, split, name), 'wb') as f:
                f.write(data.replace(b'\n', b'\r\n') if crlf else data)


def make_tiny_shapes(out_dir, num_train=40, num_test=20, image_size=32, seed=0, p_two=0.3):
    shapes_cfg = utils.to_cfg(
        {
            **preprocess_data.DEFAULTS['SHAPES'],
            'OUT_DIR': str(out_dir),
            'NUM_TRAIN': num_train,
            'NUM_TEST': num_test,
            'IMAGE_SIZE': image_size,
            'SEED': seed,
            'P_TWO_OBJECTS': p_two,
        }
    )
    preprocess_data.make_shapes(shapes_cfg, utils.get_logger(None, 'tiny'))
    return str(out_dir)


@pytest.fixture(scope='session')
def tiny_shapes(tmp_path_factory):
    """40 train / 20 test images of 32 px, 10 captions each (read-only: copy before writing)."""
    return make_tiny_shapes(tmp_path_factory.mktemp('data') / 'shapes')


@pytest.fixture(scope='session')
def tiny_judge(tmp_path_factory, tiny_shapes):
    """A random-init shapes judge saved as fid_score.py --train_judge saves it."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp('judge')
    judge = models.ShapesJudge(width=4, cell_dim=4, image_size=32)
    utils.save_checkpoint(
        str(out),
        'judge',
        0,
        {'judge': judge},
        name='judge_final.pt',
        extra={
            'model': {'width': 4, 'cell_dim': 4, 'image_size': 32},
            'attributes': utils.caption_attributes(tiny_shapes),
        },
    )
    return str(out)
