"""XMC-GAN: losses against independent computations, network shapes and the original's
parameter counts, a training step at the original's test sizes, mid-epoch resume, checkpoint
evaluation (rows, re-run, SIGTERM under --watch), resumable caption embedding (project
encoder and a tiny BERT)."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import ROOT, run_in_process, run_python, save_encoder_pair

import main
import models
import preprocess_data
import utils
import xmc_gan


# ----------------------------------------------------------------------------
# Losses, each against a loop written from the original's description
# ----------------------------------------------------------------------------
def cross_entropy_rows(s, i):
    return -(s[i] - math.log(sum(math.exp(v) for v in s)))


def test_contrastive_loss_matches_loop():
    torch.manual_seed(0)
    a, b, tau = torch.randn(4, 3), torch.randn(4, 3), 0.1
    cos = [
        [F.cosine_similarity(a[i], b[j], dim=0).item() / tau for j in range(4)] for i in range(4)
    ]
    a2b = sum(cross_entropy_rows(cos[i], i) for i in range(4)) / 4
    b2a = sum(cross_entropy_rows([cos[j][i] for j in range(4)], i) for i in range(4)) / 4
    assert models.contrastive_loss(a, b, tau).item() == pytest.approx(a2b + b2a, rel=1e-5)


@pytest.mark.parametrize('R, gram', [(3, True), (8, False)])  # models.gram_pays with 6 dims
def test_word_loss_matches_original_algorithm(R, gram):
    """attention_lib.word_loss, one (caption, image) pair at a time."""
    torch.manual_seed(0)
    B, T, D, g1, g2, g3 = 3, 4, 6, 5.0, 5.0, 50.0
    assert models.gram_pays(R, D) == gram
    regions, words = torch.randn(B, R, D), torch.randn(B, T, D)
    lengths = torch.tensor([4, 2, 3])
    s = [[0.0] * B for _ in range(B)]  # s[caption][image]
    for i in range(B):
        for b in range(B):
            r = [regions[b, k] / regions[b, k].norm() for k in range(R)]
            terms = []
            for t in range(int(lengths[i])):
                w = words[i, t] / words[i, t].norm()
                e = [math.exp(g1 * float(r[k] @ w)) for k in range(R)]
                ctx = sum(e[k] / sum(e) * r[k] for k in range(R))
                terms.append(g2 * float(w @ ctx / ctx.norm()))
            s[i][b] = g3 * math.log(sum(math.exp(v) for v in terms)) / g2
    per_image = sum(cross_entropy_rows([s[i][b] for i in range(B)], b) for b in range(B)) / B
    per_caption = sum(cross_entropy_rows(s[i], i) for i in range(B)) / B
    pad = xmc_gan.pad_mask(lengths, T)
    got = models.word_contrastive_loss(regions, words, pad, g1, g2, g3)
    assert got.item() == pytest.approx(per_image + per_caption, rel=1e-4)
    words2 = words.clone()
    words2[1, 2:] = torch.randn(2, D)  # padding must not matter
    torch.testing.assert_close(models.word_contrastive_loss(regions, words2, pad, g1, g2, g3), got)


def test_hinge_loss():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    d = models.gan_d_term(real, True, 'hinge') + models.gan_d_term(fake, False, 'hinge')
    assert d.item() == pytest.approx((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert models.gan_g_term(fake, 'hinge').item() == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------
def conv(cin, cout, k):
    return k * k * cin * cout + cout


def original_counts(size, ch_dim, z, text):
    """Parameters of the original's Generator / Discriminator (nets/xmc_net.py, common.py,
    layers.py) from its description: Dense == 1x1 conv, CBN = two Dense/1x1 conv (gamma, beta)
    around a BatchNorm without scale/bias, spectral norm adds no parameter."""
    gm = {128: [16, 8, 4, 2, 1], 256: [16, 8, 8, 4, 2, 1]}[size]
    ch, gd, sd = [ch_dim * m for m in gm], 2 * z, text + 2 * z

    def gen_block(cin, cout, cd):
        return (
            2 * conv(cd, cin, 1)
            + conv(cin, cout, 3)
            + 2 * conv(cd, cout, 1)
            + conv(cout, cout, 3)
            + conv(cin, cout, 1)
        )

    g = (
        conv(text, z, 1)
        + conv(z, 16 * ch_dim * 16, 1)
        + gen_block(16 * ch_dim, ch[0], gd)
        + gen_block(ch[0], ch[1], gd)
    )
    g += conv(ch[1], text, 1) + sum(gen_block(ch[i - 1], ch[i], sd) for i in range(2, len(ch)))
    g += 2 * conv(sd, ch[-1], 1) + conv(ch[-1], 3, 3)
    mults, downs = {
        128: ([2, 4, 8, 16, 16], [1, 1, 1, 1, 0]),
        256: ([2, 4, 8, 8, 16, 16], [1, 1, 1, 1, 1, 0]),
    }[size]
    d, c, s = conv(3, ch_dim, 3) + conv(ch_dim, ch_dim, 3) + conv(3, ch_dim, 1), ch_dim, size // 2
    for m, down in zip(mults, downs):
        o = ch_dim * m
        d += conv(c, o, 3) + conv(o, o, 3) + (conv(c, o, 1) if down or c != o else 0)
        c, s = o, s // 2 if down else s
        cond = o if s == 16 else locals().get('cond')
    return g, d + conv(c, 1, 1) + conv(text, c, 1) + conv(cond, text, 1)


@pytest.mark.parametrize(
    'size, g_want, d_want', [(128, 78_507_779, 87_911_713), (256, 92_865_539, 99_415_585)]
)
def test_parameter_counts_equal_original_description(size, g_want, d_want):
    assert original_counts(size, 96, 128, 768) == (
        g_want,
        d_want,
    )  # coco_xmc.py: gf = df = 96, z 128, BERT 768
    with torch.device('meta'):
        netG, netD = (
            models.XMCGenerator(size, 96, 128, 768, 15.0),
            models.XMCDiscriminator(size, 96, 768, 16),
        )
    assert (
        sum(p.numel() for p in netG.parameters()),
        sum(p.numel() for p in netD.parameters()),
    ) == (
        g_want,
        d_want,
    )


@pytest.mark.parametrize('size', [64, 128, 256])
def test_generator_and_discriminator_shapes(size):
    torch.manual_seed(0)
    netG, netD = models.XMCGenerator(size, 2, 4, 8, 15.0), models.XMCDiscriminator(size, 2, 8, 16)
    pad = torch.tensor([[False] * 5, [False, False, True, True, True]])
    img = netG(torch.randn(2, 4), torch.randn(2, 8), torch.randn(2, 5, 8), pad)
    assert img.shape == (2, 3, size, size) and img.abs().max() <= 1
    logit, pooled, sent_c, regions = netD(img, torch.randn(2, 8))
    assert logit.shape == (2,) and pooled.shape == sent_c.shape == (
        2,
        2 * (8 if size == 64 else 16),
    )
    assert regions.shape == (2, 16 * 16, 8)


def test_32_px_conditions_its_word_regions_at_a_size_it_has():
    """At 32 px the region features for the word loss sit at 8x8 (or 16/4); a size the D never
    reaches is an error naming the sizes it has."""
    torch.manual_seed(0)
    netG, netD = models.XMCGenerator(32, 2, 4, 8, 15.0), models.XMCDiscriminator(32, 2, 8, 8)
    img = netG(torch.randn(2, 4), torch.randn(2, 8), torch.randn(2, 5, 8), None)
    assert img.shape == (2, 3, 32, 32)
    assert netD(img, torch.randn(2, 8))[3].shape == (2, 8 * 8, 8)
    with pytest.raises(
        utils.UserError, match=r'COND_SIZE=2 at 32 px: expected one of \[4, 8, 16\]'
    ):
        models.XMCDiscriminator(32, 2, 8, 2)


def test_discriminator_sees_0_1_images_as_the_original():
    """coco_dataset.py feeds D [0, 1] images and G's output is (tanh + 1) / 2: by default our D
    maps its [-1, 1] input to [0, 1] before the first block; [-1, 1] is the option."""
    cfg = utils.to_cfg({**xmc_gan.DEFAULTS, 'IMAGE_SIZE': 64})
    cfg.GAN.update(GF_DIM=2, DF_DIM=2, Z_DIM=4)
    _, netD = xmc_gan.build_networks(cfg, 8)
    assert netD.input_range == (0.0, 1.0)
    signed = models.XMCDiscriminator(64, 2, 8, 16, input_range=(-1.0, 1.0))
    signed.load_state_dict(netD.state_dict())
    netD.eval(), signed.eval()  # the same spectral-norm estimate in both
    x, sent = torch.rand(2, 3, 64, 64) * 2 - 1, torch.randn(2, 8)
    with torch.no_grad():
        got, want, other = netD(x, sent)[0], signed((x + 1) / 2, sent)[0], signed(x, sent)[0]
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, other)
    cfg.GAN.D_INPUT_RANGE = [1.0, 0.0]
    with pytest.raises(utils.UserError, match='D_INPUT_RANGE'):
        xmc_gan.build_networks(cfg, 8)


def test_contrastive_negatives_are_each_ranks_own_by_default():
    """attention_lib.contrastive_loss contrasts the device's local batch (no gather)."""
    assert xmc_gan.DEFAULTS['TRAIN']['GATHER_NEGATIVES'] is False
    for name in ('coco_xmc.yml', 'coco_xmc_256.yml'):
        args = utils.base_parser('t').parse_args(['--cfg', os.path.join(ROOT, 'cfg', name)])
        cfg = utils.build_cfg(xmc_gan.DEFAULTS, args)
        assert cfg.TRAIN.GATHER_NEGATIVES is False and cfg.GAN.D_INPUT_RANGE == [0.0, 1.0]
    x = torch.randn(3, 2)
    gather, scale = xmc_gan.negatives(False, world=7)
    assert gather(x) is x and scale == 1
    gather, scale = xmc_gan.negatives(True, world=7)
    assert gather is utils.all_gather_with_grad and scale == 7


def test_local_condbn_upsampling_after_the_conv_is_exact():
    """A 1x1 conv commutes with nearest upsampling: modulating from the coarse map is the original."""
    torch.manual_seed(0)
    cond_bn = models.CondBN(3, 5, local=True)
    x, c = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 2, 2)
    torch.testing.assert_close(
        cond_bn(x, c), cond_bn(x, F.interpolate(c, scale_factor=4, mode='nearest'))
    )


# ----------------------------------------------------------------------------
# Fixtures: a tiny project encoder, its caption embeddings, a 2-checkpoint run (the judge:
# conftest's tiny_judge)
# ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def encoder(tmp_path_factory, tiny_vocabulary):
    """A random-init CLIP-style text encoder and small CNN image encoder, saved the way
    pretrain_DAMSM.py saves them."""
    torch.manual_seed(0)
    tok = models.tokenizer_spec('words', 18, words=tiny_vocabulary)
    te = models.build_text_encoder(
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
    ie = models.build_image_encoder(
        {
            'family': 'damsm',
            'dim': 16,
            'image_size': 32,
            'backbone': 'small',
            'width': 4,
            'train_backbone': True,
        }
    )
    return save_encoder_pair(tmp_path_factory.mktemp('enc'), te, ie)


def embed_cfg(data, out, **kw):
    return utils.to_cfg(
        {
            **preprocess_data.DEFAULTS['EMBED'],
            'SOURCE': 'attngan',
            'DATA_DIR': data,
            'SPLITS': {'train': 'train', 'test': 'test'},
            'MAX_CAPTIONS': 3,
            'SHARD_SIZE': 32,
            'BATCH_SIZE': 16,
            'OUT_DIR': str(out),
            **kw,
        }
    )


@pytest.fixture(scope='module')
def embeddings(tmp_path_factory, tiny_shapes, encoder):
    out = tmp_path_factory.mktemp('emb')
    preprocess_data.embed_captions(
        embed_cfg(tiny_shapes, out, ENCODER=encoder),
        torch.device('cpu'),
        utils.get_logger(None, 'test'),
    )
    return str(out)


def write_cfg(cfg):
    """cfg (its OUT aside) as <OUT>.yml beside the run directory; returns the file's path."""
    path = str(cfg['OUT']) + '.yml'
    with open(path, 'w') as f:
        yaml.safe_dump({k: v for k, v in cfg.items() if k != 'OUT'}, f)
    return path


def run_main(cfg, *argv):
    """main.py --cfg <cfg> --out <OUT> argv, in this process."""
    run_in_process(main, ['--cfg', write_cfg(cfg), '--out', cfg['OUT'], *argv])


def tiny_train_cfg(embeddings, out, **train):
    return {
        'MODEL': 'XMCGAN',
        'EMBEDDINGS': embeddings,
        'IMAGE_SIZE': 64,
        'WORKERS': 0,
        'OUT': str(out),
        'GAN': {'GF_DIM': 8, 'DF_DIM': 8, 'Z_DIM': 8},
        'TRAIN': {
            'BATCH_SIZE': 2,
            'MAX_STEPS': 2,
            'CHECKPOINT_EVERY': 1,
            'LOG_EVERY': 1,
            'CONTRASTIVE': {'PRETRAINED_IMAGE': False},
            **train,
        },
    }


@pytest.fixture(scope='module')
def dmgan_run(tmp_path_factory, encoder):
    """A (random-init) DM-GAN run dir on the same encoder, for the side-by-side sample grid."""
    cfg = utils.to_cfg(main.DEFAULTS)
    cfg.TREE.update(BRANCH_NUM=1, BASE_SIZE=32)
    cfg.GAN.update(GF_DIM=4, Z_DIM=4, CONDITION_DIM=4, R_NUM=1)
    cfg.TEXT.EMBEDDING_DIM, cfg.TRAIN.NET_E = 16, encoder
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp('dmgan')
    utils.save_checkpoint(
        str(out), 'dmgan', 1, {'G_ema': models.build_dmgan_generator(cfg, 16)}, cfg=cfg
    )
    return str(out)


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory, embeddings):
    out = tmp_path_factory.mktemp('runs') / 'straight'
    run_main(tiny_train_cfg(embeddings, out))
    return str(out)


def test_preloaded_images_are_the_same_pixels_and_skip_the_same_bad_file(tmp_path, embeddings):
    """TRAIN.PRELOAD decodes once and changes nothing a step sees: the same image, flip and
    caption for every index, and an unreadable file skipped the same way."""
    bad = tmp_path / 'broken.png'
    bad.write_bytes(b'not a png')
    datasets = []
    for preload in (False, True):
        emb = xmc_gan.EmbeddedCaptions(embeddings, 'train')
        emb.images = [list(r) for r in emb.images]
        emb.images[1][1] = str(bad)
        datasets.append(xmc_gan.XMCDataset(emb, 32, flip=True, seed=3, preload=preload))
    assert datasets[1].bad == {1}
    for ds in datasets:
        ds.epoch = 2
    for i in range(len(datasets[0])):
        a, b = datasets[0][i], datasets[1][i]
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(torch.as_tensor(a[k]), torch.as_tensor(b[k]), rtol=0, atol=0)
    assert datasets[0].bad == {1}
    torch.testing.assert_close(datasets[0][1]['image'], datasets[0][2]['image'])


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_one_train_step_at_the_original_test_sizes(tmp_path, embeddings):
    """coco_xmc.py's test config: gf/df 16, z 8, batch 2, at 128 px, all four contrastive losses
    (a random-init ResNet-50 for the pretrained one); the EMA moved 0.1% of the way."""
    cfg = tiny_train_cfg(
        embeddings, tmp_path / 'run', MAX_STEPS=1, RESNET='', CONTRASTIVE={'PRETRAINED_IMAGE': True}
    )
    cfg.update(IMAGE_SIZE=128, GAN={'GF_DIM': 16, 'DF_DIM': 16, 'Z_DIM': 8})
    run_main(cfg)
    ckpt = utils.load_checkpoint(
        str(tmp_path / 'run' / 'checkpoints' / 'xmcgan_00000001.pt'), 'xmcgan'
    )
    metrics = json.load(open(tmp_path / 'run' / 'metrics.json'))
    assert all(
        math.isfinite(metrics[f'final_{k}']) for k in ('d_loss', 'g_loss', 'c_loss_g_pretrained')
    )
    assert metrics['final_c_loss_g_pretrained'] > 0 and metrics['final_real_word'] > 0
    torch.manual_seed(0)  # utils.setup's seed, then the networks are built first
    G0, D0 = xmc_gan.build_networks(utils.to_cfg(ckpt['cfg']), 16)
    m = ckpt['models']
    for k, p0 in G0.named_parameters():
        torch.testing.assert_close(m['G_ema'][k], 0.999 * p0.detach() + 0.001 * m['G'][k])
    assert not torch.equal(m['G']['to_rgb.weight'], G0.to_rgb.weight)
    assert not torch.equal(
        m['D']['out.parametrizations.weight.original'], D0.out.parametrizations.weight.original
    )


@pytest.mark.parametrize('d_steps', [1, 2])
def test_d_steps_per_g_step_sets_the_updates_of_an_iteration(
    tmp_path, embeddings, monkeypatch, d_steps
):
    """One iteration is D_STEPS_PER_G_STEP D updates and one G update (xmc_gan.py train_g_d),
    each on its own BATCH_SIZE images: the embedded cfg's 1 reads one batch per G step."""
    calls = []
    real_step = torch.optim.Adam.step

    def counted(self, *a, **k):
        calls.append(len(self.param_groups[0]['params']))
        return real_step(self, *a, **k)

    seen = []
    real_losses = xmc_gan.discriminator_losses
    monkeypatch.setattr(torch.optim.Adam, 'step', counted)
    monkeypatch.setattr(
        xmc_gan,
        'discriminator_losses',
        lambda ddp_D, real, *a, **k: seen.append(len(real)) or real_losses(ddp_D, real, *a, **k),
    )
    run_main(tiny_train_cfg(embeddings, tmp_path / 'run', MAX_STEPS=1, D_STEPS_PER_G_STEP=d_steps))
    ckpt = utils.load_checkpoint(str(tmp_path / 'run' / 'checkpoints' / 'xmcgan_00000001.pt'))
    G, D = xmc_gan.build_networks(utils.to_cfg(ckpt['cfg']), 16)
    n_g, n_d = len(list(G.parameters())), len([p for p in D.parameters() if p.requires_grad])
    assert sorted(calls) == sorted([n_d] * d_steps + [n_g])
    assert seen == [2] * d_steps


@pytest.mark.slow
def test_resume_mid_epoch_equals_uninterrupted(tmp_path, embeddings, trained_run):
    cfg = tiny_train_cfg(embeddings, tmp_path / 'resumed', MAX_STEPS=1)
    run_main(cfg)
    cfg['TRAIN']['MAX_STEPS'] = 2
    run_main(cfg, '--resume', 'auto')
    a = utils.load_checkpoint(os.path.join(trained_run, 'checkpoints', 'xmcgan_00000002.pt'))
    b = utils.load_checkpoint(str(tmp_path / 'resumed' / 'checkpoints' / 'xmcgan_00000002.pt'))
    assert a['extra']['batch'] == b['extra']['batch'] == 2 and a['epoch'] == b['epoch'] == 0
    for net in ('G', 'G_ema', 'D'):
        for k in a['models'][net]:
            torch.testing.assert_close(a['models'][net][k], b['models'][net][k])


# ----------------------------------------------------------------------------
# Evaluation of every checkpoint
# ----------------------------------------------------------------------------
def eval_cfg(embeddings, encoder, judge, workdir, out):
    return {
        'MODEL': 'XMCGAN',
        'EMBEDDINGS': embeddings,
        'OUT': str(out),
        'WORKERS': 0,
        'TRAIN': {'FLAG': False},
        'EVAL': {
            'WORKDIR': workdir,
            'NET_E': encoder,
            'NUM_IMAGES': 12,
            'REPEATS': 2,
            'BATCH_SIZE': 8,
            'R_NEG': 5,
            'R_FOLDS': 2,
            'BASELINE': True,
            'POLL_SECONDS': 1,
            'JUDGE': judge,
            'FID_FEATURES': 'judge',
            'IS': False,
        },
    }  # IS needs the FID Inception's weights


def rows(path):
    return [line for line in open(path) if not line.startswith('#')]


@pytest.mark.slow
def test_evaluation_scores_each_checkpoint_once(
    tmp_path, embeddings, encoder, tiny_judge, trained_run, dmgan_run, tiny_shapes
):
    """FID on the judge's features against saved real statistics, judge accuracy, R-precision;
    sample grids of real images, XMC-GAN and DM-GAN on the same captions."""
    cfg = eval_cfg(embeddings, encoder, tiny_judge, trained_run, tmp_path / 'eval')
    cfg['EVAL'].update(DMGAN=dmgan_run, SAVE_IMAGES=True)
    run_main(cfg)
    table = tmp_path / 'eval' / 'eval.txt'
    assert [r.split('\t')[:2] for r in rows(table)] == [
        ['xmcgan_00000001.pt', '1'],
        ['xmcgan_00000002.pt', '2'],
    ]
    metrics = json.load(open(tmp_path / 'eval' / 'metrics.json'))
    scores = metrics['eval/xmcgan_00000002.pt']
    assert (
        0 <= scores['r_precision'] <= 1 and 0 <= scores['judge_colour'] <= 1 and scores['fid'] > 0
    )
    assert set(metrics['untrained']) == set(scores) - {'step'}
    generator = os.path.join(trained_run, 'checkpoints', 'xmcgan_00000002.pt')
    with open(generator, 'rb') as f:
        assert scores['protocol']['weights']['generator'] == {
            'path': generator,
            'sha256': hashlib.sha256(f.read()).hexdigest(),
        }
    assert scores['protocol']['seed'] == [42, 43] and {
        'judge',
        'fid_features',
        'fid_statistics',
        'text_encoder',
        'image_encoder',
    } <= set(scores['protocol']['weights'])
    assert len(list((tmp_path / 'eval').glob('real_test_64px_shapes-judge-36.npz'))) == 1
    from PIL import Image

    grid = Image.open(tmp_path / 'eval' / 'samples_00000002.png')
    assert grid.size == (2 + 8 * 66, 2 + 3 * 66) and os.listdir(
        tmp_path / 'eval' / 'tb'
    )  # 3 rows of 8
    assert len((tmp_path / 'eval' / 'samples_00000002.txt').read_text().splitlines()) == 8
    assert [
        r['caption'] for r in json.loads((tmp_path / 'eval' / 'samples_00000002.json').read_text())
    ] == (tmp_path / 'eval' / 'samples_00000002.txt').read_text().splitlines()
    curve = Image.open(tmp_path / 'eval' / 'curve.png')  # both checkpoints' scores by step
    assert curve.size == (640, 400) and len(curve.getcolors(1 << 20)) > 2
    dump = tmp_path / 'eval' / 'images_00000002'  # the first of 2 samplings: 12 images
    keys = json.loads((dump / 'keys.json').read_text())
    assert sorted(keys) == sorted(p.name for p in dump.glob('*.png')) and len(keys) == 12
    assert set(keys.values()) <= set(json.load(open(os.path.join(tiny_shapes, 'attributes.json'))))
    verdicts = [  # the same images' judge verdicts, one line each
        json.loads(ln)
        for ln in (tmp_path / 'eval' / 'judge_00000002.jsonl').read_text().splitlines()
    ]
    assert {v['file']: v['key'] for v in verdicts} == keys
    assert all(set(v) == set(utils.VERDICT_FIELDS) for v in verdicts)
    assert all(v['category'] in ('one object', 'two objects') for v in verdicts)
    assert all(v['correct'] == (v['reason'] == '') for v in verdicts)
    run_main(cfg)
    assert len(rows(table)) == 2


@pytest.mark.slow
def test_watch_stops_cleanly_on_sigterm(tmp_path, embeddings, encoder, trained_run):
    cfg = eval_cfg(embeddings, encoder, '', trained_run, tmp_path / 'eval')
    cfg['EVAL'].update(BASELINE=False, FID=False)
    proc = subprocess.Popen(
        [sys.executable, 'main.py', '--cfg', write_cfg(cfg), '--out', cfg['OUT'], '--watch'],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    table = tmp_path / 'eval' / 'eval.txt'
    for _ in range(1200):  # hang guard only: wait for both rows, then signal
        if table.is_file() and len(rows(table)) == 2 or proc.poll() is not None:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()  # still watching
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate()[0]
    assert proc.returncode == 0, out
    assert len(rows(table)) == 2 and '2 checkpoint(s) scored' in out


# ----------------------------------------------------------------------------
# Caption embeddings (preprocess_data.py TASK embed)
# ----------------------------------------------------------------------------
def test_embedding_resumes_without_recomputing_finished_shards(
    tmp_path, tiny_shapes, encoder, embeddings
):
    emb_cfg = embed_cfg(tiny_shapes, tmp_path / 'emb', ENCODER=encoder)
    encode, info = preprocess_data.caption_encoder(emb_cfg, torch.device('cpu'))
    seen = []

    def interrupted(texts):  # dies in the train split's third batch (second shard)
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append(len(texts))
        return encode(texts)

    with pytest.raises(KeyboardInterrupt):
        preprocess_data.embed_captions(
            emb_cfg, torch.device('cpu'), utils.get_logger(None, 'test'), (interrupted, info)
        )
    first = tmp_path / 'emb' / 'train_00000.pt'
    assert sorted(os.listdir(tmp_path / 'emb')) == ['index.json', 'train_00000.pt']
    stamp = first.stat().st_mtime_ns
    seen.clear()

    def counting(texts):
        seen.append(len(texts))
        return encode(texts)

    index = preprocess_data.embed_captions(
        emb_cfg, torch.device('cpu'), utils.get_logger(None, 'test'), (counting, info)
    )
    total = sum(sp['num_captions'] for sp in index['splits'].values())
    assert index['complete'] and sum(seen) == total - 32 and first.stat().st_mtime_ns == stamp
    for name in os.listdir(embeddings):  # the same bytes' worth as an uninterrupted run
        if name.endswith('.pt'):
            a, b = (
                torch.load(os.path.join(d, name), weights_only=True)
                for d in (embeddings, tmp_path / 'emb')
            )
            assert a['keys'] == b['keys'] and a['texts'] == b['texts']
            torch.testing.assert_close(a['words'], b['words'])
    with pytest.raises(utils.UserError, match='other settings'):
        preprocess_data.embed_captions(
            embed_cfg(tiny_shapes, tmp_path / 'emb', ENCODER=encoder, MAX_LEN=9),
            torch.device('cpu'),
            utils.get_logger(None, 'test'),
        )


def test_a_retrained_encoder_at_the_same_path_does_not_reuse_old_shards(
    tmp_path, tiny_shapes, encoder
):
    """The settings name the encoder's bytes: shards of an older encoder saved at the same path
    are refused, not skipped as finished."""
    import shutil

    enc_dir = tmp_path / 'enc'
    shutil.copytree(os.path.dirname(encoder), enc_dir)
    path = str(enc_dir / os.path.basename(encoder))
    emb_cfg = embed_cfg(tiny_shapes, tmp_path / 'emb', ENCODER=path)
    log = utils.get_logger(None, 'test')
    index = preprocess_data.embed_captions(emb_cfg, torch.device('cpu'), log)
    assert index['settings']['ENCODER_SHA256'] == utils.sha256(path)
    xmc_gan.EmbeddedCaptions(str(tmp_path / 'emb'), 'train')
    with open(path, 'ab') as f:  # other bytes at the same path
        f.write(b'\0')
    with pytest.raises(utils.UserError, match='other settings.*ENCODER_SHA256'):
        preprocess_data.embed_captions(emb_cfg, torch.device('cpu'), log)
    with pytest.raises(utils.UserError, match='that file has changed since'):
        xmc_gan.EmbeddedCaptions(str(tmp_path / 'emb'), 'train')


def test_embedding_with_a_tiny_bert(tmp_path, tiny_shapes):
    """The transformers path with a random BertConfig saved like a hub model: [CLS] ... [SEP]
    within 17 tokens, sentence = sum of the 17 outputs / true length (the original's formula)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    d = utils.AttnGANData(tiny_shapes, 10)
    vocab = tmp_path / 'vocab.txt'
    vocab.write_text(
        '\n'.join(
            ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
            + [d.ixtoword[i] for i in range(1, len(d.ixtoword))]
            + ['.', ',', ';']
        )
        + '\n'
    )
    bert_dir = tmp_path / 'bert'
    BertTokenizer(str(vocab)).save_pretrained(bert_dir)
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(vocab.read_text().split()),
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=32,
        )
    ).save_pretrained(bert_dir)
    index = preprocess_data.embed_captions(
        embed_cfg(tiny_shapes, tmp_path / 'emb', ENCODER=str(bert_dir), MAX_CAPTIONS=1),
        torch.device('cpu'),
        utils.get_logger(None, 'test'),
    )
    assert index['dim'] == 8 and index['encoder']['kind'] == 'transformers'
    shard = torch.load(tmp_path / 'emb' / 'test_00000.pt', weights_only=True)
    assert shard['words'].shape == (20, 17, 8) and shard['words'].dtype == torch.float16
    tok = BertTokenizer(str(vocab))
    assert shard['lengths'].tolist() == [min(17, len(tok.tokenize(t)) + 2) for t in shard['texts']]
    want = shard['words'].float().sum(1) / shard['lengths'][:, None]
    torch.testing.assert_close(shard['sent'].float(), want, atol=2e-3, rtol=2e-3)


def test_model_is_read_from_the_merged_cfg(tmp_path):
    """MODEL chooses the trainer as the merged cfg has it: the file's, overridden by --set."""
    import main

    parse = utils.base_parser('x').parse_args
    cfg = tmp_path / 'x.yml'
    cfg.write_text('MODEL: XMCGAN\n')
    assert main.chosen_model(parse([])) == 'DMGAN'
    assert main.chosen_model(parse(['--set', 'MODEL=XMCGAN'])) == 'XMCGAN'
    assert main.chosen_model(parse(['--cfg', str(cfg)])) == 'XMCGAN'
    assert main.chosen_model(parse(['--cfg', str(cfg), '--set', 'MODEL=DMGAN'])) == 'DMGAN'
    assert main.chosen_model(parse(['--set', "MODEL='XMCGAN'"])) == 'XMCGAN'  # a YAML string


def test_help_lists_the_chosen_trainers_flags():
    """main.py --help answers with the parser of the trainer the cfg's MODEL chooses."""
    xmc = run_python('main.py', '--cfg', os.path.join('cfg', 'eval_coco_xmc.yml'), '--help')
    dmgan = run_python('main.py', '--help')
    assert xmc.returncode == dmgan.returncode == 0, xmc.stderr + dmgan.stderr
    assert '--watch' in xmc.stdout and '--watch' not in dmgan.stdout
