"""Files as users have them: AttnGAN's CUB metadata in its exact bytes (protocol-0 pickles
with numpy int64 class ids, and their CRLF copies)."""
import os
import pickle
import shutil

import numpy as np
import pytest

import utils


def protocol0_names(names):
    """filenames.pickle as Python 2 writes it: (lp0, then V<name> p<n> a per name, '.'."""
    out = b'(lp0\n'
    for i, n in enumerate(names, 1):
        out += b'V' + n.encode() + b'\np' + str(i).encode() + b'\na'
    return out + b'.'


def protocol0_int64_list(values):
    """train/class_info.pickle: a list of numpy.core.multiarray.scalar(dtype('i8'), bytes),
    a value seen before repeated through its memo slot (g<n>), as pickle's memo does."""
    out = (b"(lp0\ncnumpy.core.multiarray\nscalar\np1\n(cnumpy\ndtype\np2\n(S'i8'\np3\nI0\nI1\ntp4\n"
           b"Rp5\n(I3\nS'<'\np6\nNNNI-1\nI-1\nI0\ntp7\nb")
    memo, slot, first = {}, 8, True
    for v in values:
        if v in memo:
            out += b'g' + str(memo[v]).encode() + b'\na'
            continue
        raw = ''.join(f'\\x{b:02x}' for b in int(v).to_bytes(8, 'little'))
        if not first:
            out += b'g1\n(g5\n'
        out += b"S'" + raw.encode() + b"'\np" + str(slot).encode() + b'\ntp' + str(slot + 1).encode() \
            + b'\nRp' + str(slot + 2).encode() + b'\na'
        memo[v], slot, first = slot + 2, slot + 3, False
    return out + b'.'


KEYS = ['002.Laysan_Albatross/Laysan_Albatross_0002_1027', '002.Laysan_Albatross/Laysan_Albatross_0003_1033',
        '003.Sooty_Albatross/Sooty_Albatross_0001_1071']
CLASSES = [2, 2, 3]


def test_fixture_bytes_are_the_real_layout():
    data = protocol0_int64_list(CLASSES)
    head = (b"(lp0\ncnumpy.core.multiarray\nscalar\np1\n(cnumpy\ndtype\np2\n(S'i8'\np3\nI0\nI1\ntp4\nRp5\n"
            b"(I3\nS'<'\np6\nNNNI-1\nI-1\nI0\ntp7\nbS'\\x02\\x00\\x00\\x00\\x00\\x00\\x00\\x00'\np8\ntp9\n"
            b"Rp10\nag10\n")
    assert data.startswith(head)
    # plain pickle reads what numpy wrote: numpy int64 scalars
    got = pickle.loads(data, encoding='latin1')
    assert got == CLASSES and all(type(v) is np.int64 for v in got)
    assert pickle.loads(protocol0_names(KEYS), encoding='latin1') == KEYS


@pytest.mark.parametrize('crlf', [False, True])
def test_attngan_cub_metadata_reads(tmp_path, crlf):
    conv = (lambda b: b.replace(b'\n', b'\r\n')) if crlf else (lambda b: b)
    (tmp_path / 'f.pickle').write_bytes(conv(protocol0_names(KEYS)))
    (tmp_path / 'c.pickle').write_bytes(conv(protocol0_int64_list(CLASSES)))
    assert utils.safe_pickle_load(str(tmp_path / 'f.pickle')) == KEYS
    got = utils.safe_pickle_load(str(tmp_path / 'c.pickle'))
    assert [int(v) for v in got] == CLASSES and all(isinstance(v, np.int64) for v in got)


def test_numpy_reconstruction_is_limited_to_numeric_scalars(tmp_path):
    marker = tmp_path / 'ran'
    cases = {
        # an object dtype would let the pickle hand back any object
        'object_dtype': b"cnumpy\ndtype\n(S'O'\nI0\nI1\ntR.",
        'object_scalar': b"cnumpy.core.multiarray\nscalar\n(cnumpy\ndtype\n(S'O8'\nI0\nI1\ntRS'x'\ntR.",
        # the numpy module's other globals are still refused
        'numpy_other': b"cnumpy\nload\n(S'x'\ntR.",
        'code': b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.",
        'wrong_length': b"cnumpy._core.multiarray\nscalar\n(cnumpy\ndtype\n(S'i8'\nI0\nI1\ntRS'\\x01'\ntR.",
    }
    for name, data in cases.items():
        p = tmp_path / f'{name}.pickle'
        p.write_bytes(data)
        with pytest.raises(utils.UserError, match='unsafe or corrupt pickle'):
            utils.safe_pickle_load(str(p))
    assert not marker.exists()
    ok = tmp_path / 'f8.pickle'       # numpy >= 2's module name, a float kind
    ok.write_bytes(b"cnumpy._core.multiarray\nscalar\n(cnumpy\ndtype\n(S'f8'\nI0\nI1\ntR"
                   b"S'\\x00\\x00\\x00\\x00\\x00\\x00\\xf8?'\ntR.")
    assert utils.safe_pickle_load(str(ok)) == 1.5


def test_cub_layout_from_real_metadata_trains_one_step(tmp_path, tiny_shapes):
    """The tiny shapes data rewritten with AttnGAN's metadata bytes (CRLF copy): keys and
    classes read, captions and images found."""
    root = tmp_path / 'birds'
    shutil.copytree(tiny_shapes, root)
    for split in ('train', 'test'):
        keys = utils.read_attngan_split(str(root), split)
        classes = [int(c) for c in utils.safe_pickle_load(str(root / split / 'class_info.pickle'))]
        (root / split / 'filenames.pickle').write_bytes(protocol0_names(keys).replace(b'\n', b'\r\n'))
        (root / split / 'class_info.pickle').write_bytes(protocol0_int64_list(classes).replace(b'\n', b'\r\n'))
    os.remove(root / 'captions.pickle') if (root / 'captions.pickle').exists() else None
    data = utils.AttnGANData(str(root), 10)
    ds = utils.TextImageDataset(data, 'train', base_size=32, branch_num=1, flip=False, crop=False)
    item = ds[0]
    assert item['imgs'][0].shape == (3, 32, 32) and isinstance(item['class_id'], int)
    assert item['text'] in data.raw_captions(data.keys['train'][0])
