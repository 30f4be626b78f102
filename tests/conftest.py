"""Shared fixtures and helpers: a tiny synthetic dataset in the real AttnGAN/CUB layout, a judge
and encoders over it, and the two ways a test runs a script (in this process, in a child)."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import models  # noqa: E402
import pretrain_DAMSM  # noqa: E402
import preprocess_data  # noqa: E402
import utils  # noqa: E402


def run_python(*args, cwd=ROOT, env=None, timeout=600):
    """A child python with args (a script and its flags, or -c/-m ...), output captured; env adds
    to this process's environment. The timeout only guards against a hang."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def run_in_process(module, argv):
    """module.main() as `python module.py argv` would run it, in this process (faster than a
    child, and its exceptions reach the test)."""
    old = sys.argv
    sys.argv = [module.__name__ + '.py'] + [str(a) for a in argv]
    try:
        module.main()
    finally:
        sys.argv = old
        utils.cleanup_distributed()


PROTOCOL_KEYS = {'split', 'num_images', 'seed', 'image_size', 'resize', 'weights'}


def check_protocol(protocol, weights, **fields):
    """A score's protocol (utils.protocol): every key, the values of `fields`, and exactly the
    weights files `weights` ({name: path}), each with its sha256 computed here."""
    assert set(protocol) == PROTOCOL_KEYS
    for k, v in fields.items():
        assert protocol[k] == v, k
    expected = {}
    for name, path in weights.items():
        with open(path, 'rb') as f:
            expected[name] = {'path': str(path), 'sha256': hashlib.sha256(f.read()).hexdigest()}
    assert protocol['weights'] == expected


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
def fixture_data(tmp_path_factory):
    """8 train / 8 test tiny shapes images whose metadata has the bytes of AttnGAN's birds.zip,
    as a CRLF copy (read-only: copy before writing)."""
    root = make_tiny_shapes(
        tmp_path_factory.mktemp('enc') / 'shapes', num_train=8, num_test=8, image_size=32, seed=1
    )
    write_attngan_metadata(root, crlf=True)
    return root


@pytest.fixture(scope='session')
def tiny_judge(tmp_path_factory, tiny_shapes):
    """A random-init shapes judge saved as train_judge.py saves it."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp('judge')
    save_tiny_judge(out, models.ShapesJudge(**TINY_JUDGE), tiny_shapes)
    return str(out)


TINY_JUDGE = {'width': 4, 'cell_dim': 4, 'image_size': 32}


def save_tiny_judge(folder, judge, data_dir):
    """A ShapesJudge of TINY_JUDGE's sizes saved as train_judge.py saves it."""
    utils.save_checkpoint(
        str(folder),
        'judge',
        0,
        {'judge': judge},
        name='judge_final.pt',
        extra={'model': TINY_JUDGE, 'attributes': utils.caption_attributes(data_dir)},
    )


def save_encoder_pair(out, text, image, epoch=1, step=1):
    """text_encoder<epoch>.pth and image_encoder<epoch>.pth in out/checkpoints, written by
    pretrain_DAMSM.save_encoders itself; returns the text encoder's path."""
    run = type('R', (), {'out': str(out), 'cfg': utils.to_cfg({'X': 1})})()
    pretrain_DAMSM.save_encoders(run, type('M', (), {'text': text, 'image': image})(), epoch, step)
    return os.path.join(str(out), 'checkpoints', f'text_encoder{epoch}.pth')


@pytest.fixture(scope='session')
def tiny_vocabulary(tiny_shapes):
    """AttnGAN's ixtoword of the tiny dataset as a list ('<end>' first)."""
    data = utils.AttnGANData(tiny_shapes, 10)
    return [data.ixtoword[i] for i in range(len(data.ixtoword))]


@pytest.fixture(scope='session')
def tiny_encoder(tmp_path_factory, tiny_vocabulary):
    """A random-init CLIP-family encoder pair over the tiny dataset's vocabulary, saved as
    pretrain_DAMSM.py saves them (read-only: copy before writing)."""
    torch.manual_seed(0)
    tok = models.tokenizer_spec('words', 30, words=tiny_vocabulary[1:])
    text = models.build_text_encoder(
        {
            'family': 'clip',
            'dim': 16,
            'tokenizer': tok,
            'width': 16,
            'heads': 2,
            'layers': 1,
            'keep_special': False,
        }
    )
    image = models.build_image_encoder(
        {
            'family': 'clip',
            'dim': 16,
            'image_size': 32,
            'layers': [1],
            'width': 16,
            'head_width': 8,
            'patch_size': 8,
        }
    )
    return save_encoder_pair(tmp_path_factory.mktemp('enc'), text, image)


TINY_BPE_MERGES = ('r e', 're d</w>', 'c a', 'ca t</w>', 'c i', 'ci r')


def write_clip_bpe(folder, merges=TINY_BPE_MERGES):
    """A tiny CLIP BPE vocabulary (a small alphabet, a few merges) as vocab.json + merges.txt in
    CLIP's format, what transformers' CLIPTokenizer reads; returns the vocab dict."""
    alphabet = [chr(c) for c in range(ord('a'), ord('z') + 1)] + ['.', ',', ';']
    vocab = {ch: i for i, ch in enumerate(alphabet + [ch + '</w>' for ch in alphabet])}
    for m in merges:
        vocab[m.replace(' ', '')] = len(vocab)
    vocab['<|startoftext|>'], vocab['<|endoftext|>'] = len(vocab), len(vocab) + 1
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'vocab.json'), 'w') as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, 'merges.txt'), 'w') as f:
        f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
    return vocab
