"""Encoders (models.py, encoders section) and pretrain_DAMSM.py: the losses against values
computed independently here, the uniform encoder API of every family, checkpoints, one
step of every cfg on fixture data, resume, and 2-process DDP against one process."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import models  # noqa: E402
import pretrain_DAMSM  # noqa: E402
import utils  # noqa: E402
from conftest import (  # noqa: E402
    check_protocol,
    run_in_process,
    save_encoder_pair,
    write_clip_bpe,
)


# ----------------------------------------------------------------------------------------------
# Losses against independent loop implementations (float64)
# ----------------------------------------------------------------------------------------------
def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _ce_both_ways(sim):
    """-log softmax of the diagonal along rows (loss0) and along columns (loss1), means."""

    def ce(m):
        out = []
        for i in range(len(m)):
            row = m[i][np.isfinite(m[i])]
            out.append(-(m[i, i] - np.log(np.exp(row).sum())))
        return float(np.mean(out))

    return ce(sim), ce(sim.T)


def _mask_same_class(sim, cls):
    sim = sim.copy()
    for i in range(len(cls)):
        for j in range(len(cls)):
            if i != j and cls[i] == cls[j]:
                sim[i, j] = -np.inf
    return sim


def ref_words_loss(regions, words, lengths, cls, g1, g2, g3):
    """AttnGAN's words_loss read literally: caption i cut to its length, against every image j."""
    B, D = words.shape[:2]
    ctx = regions.reshape(B, D, -1)
    sim = np.zeros((B, B))
    for i in range(B):
        e = words[i, :, : lengths[i]]  # D x n
        for j in range(B):
            v = ctx[j]  # D x R
            s = _softmax(v.T @ e, axis=1)  # over words, per region (Eq. 8)
            a = _softmax(g1 * s.T, axis=1)  # over regions, per word (Eq. 9)
            c = v @ a.T  # region context per word
            cos = [
                (c[:, k] @ e[:, k]) / (np.linalg.norm(c[:, k]) * np.linalg.norm(e[:, k]))
                for k in range(e.shape[1])
            ]
            sim[j, i] = np.log(np.sum(np.exp(g2 * np.array(cos))))  # Eq. 10
    return _ce_both_ways(_mask_same_class(sim * g3, cls))


# (grid, dims): 3x3 regions of 5 dimensions build the contexts; one region (a 32 px CLIP from
# scratch) and 2x2 regions of 8 dimensions take the norms from the regions' Gram matrix
PATHS = [((3, 5), False), ((1, 5), True), ((2, 8), True)]


@pytest.mark.parametrize('grid_dims, gram', PATHS)
def test_words_loss_matches_reference(grid_dims, gram):
    (grid, D), B, T = grid_dims, 4, 6
    assert models.gram_pays(grid * grid, D) == gram
    rng = np.random.RandomState(0)
    regions, words = rng.randn(B, D, grid, grid), rng.randn(B, D, T)
    lengths = np.array([6, 3, 1, 4])
    cls = np.array([0, 1, 0, 2])
    pad = torch.arange(T)[None] >= torch.as_tensor(lengths)[:, None]
    words_padded = words.copy()
    words_padded[pad.numpy().nonzero()[0], :, pad.numpy().nonzero()[1]] = 7.0  # must not matter
    w0, w1, maps = models.words_loss(
        torch.tensor(regions), torch.tensor(words_padded), pad, torch.tensor(cls), 4.0, 5.0, 10.0
    )
    r0, r1 = ref_words_loss(regions, words, lengths, cls, 4.0, 5.0, 10.0)
    assert w0.item() == pytest.approx(r0, rel=1e-9) and w1.item() == pytest.approx(r1, rel=1e-9)
    assert maps[0].shape == (T, grid, grid)
    assert torch.allclose(maps[1][:3].sum((1, 2)), torch.ones(3, dtype=torch.float64))
    # without class masking the numbers change (the masking is really applied)
    n0, _, _ = models.words_loss(
        torch.tensor(regions), torch.tensor(words), pad, None, 4.0, 5.0, 10.0
    )
    assert abs(n0.item() - r0) > 1e-6


def ref_words_loss_t2i_clip_gan(regions, words, lengths, cls, g1, g2, g3):
    """T2I_CLIP-GAN's similarity_text_image read literally (DMGAN+CLIP/code/miscc/losses.py):
    words and regions over x / (|x| + 1e-8), cosine scores, softmax over words per patch,
    gamma1 and softmax over patches, context from the unit regions, R = log((sum exp(g2 cos))^(1/g2))
    (over the caption's words; the original also summed its padding slots)."""

    def l2norm(x):
        return x / (np.linalg.norm(x, axis=0, keepdims=True) + 1e-8)

    B, D = words.shape[:2]
    ctx = regions.reshape(B, D, -1)
    sim = np.zeros((B, B))
    for i in range(B):
        q = l2norm(words[i, :, : lengths[i]])  # D x n
        for j in range(B):
            v = l2norm(ctx[j])  # D x 49
            a = _softmax(g1 * _softmax(v.T @ q, axis=1), axis=0)  # patches x n
            c = v @ a  # D x n
            cos = (c * q).sum(0) / (np.linalg.norm(c, axis=0) * np.linalg.norm(q, axis=0))
            sim[j, i] = np.log(np.sum(np.exp(g2 * cos)) ** (1 / g2))
    return _ce_both_ways(_mask_same_class(sim * g3, cls))


@pytest.mark.parametrize('grid_dims, gram', PATHS)
def test_words_loss_t2i_clip_gan_form_matches_the_original(grid_dims, gram):
    (grid, D), B, T = grid_dims, 4, 6
    assert models.gram_pays(grid * grid, D) == gram
    rng = np.random.RandomState(3)
    regions, words = rng.randn(B, D, grid, grid) * 3, rng.randn(B, D, T) * 2
    lengths, cls = np.array([6, 2, 4, 1]), np.array([0, 1, 0, 2])
    pad = torch.arange(T)[None] >= torch.as_tensor(lengths)[:, None]
    args = (torch.tensor(regions), torch.tensor(words), pad, torch.tensor(cls), 4.0, 5.0, 10.0)
    w0, w1, _ = models.words_loss(*args, form='t2i_clip_gan')
    r0, r1 = ref_words_loss_t2i_clip_gan(regions, words, lengths, cls, 4.0, 5.0, 10.0)
    assert w0.item() == pytest.approx(r0, rel=1e-9) and w1.item() == pytest.approx(r1, rel=1e-9)
    a0, _, _ = models.words_loss(*args)  # AttnGAN's form stays the default and differs
    assert a0.item() == pytest.approx(
        ref_words_loss(regions, words, lengths, cls, 4.0, 5.0, 10.0)[0]
    )
    assert abs(a0.item() - r0) > 1e-3


@pytest.mark.parametrize(
    'script, cfg, form',
    [
        ('pretrain_DAMSM', 'cfg/DAMSM/clip_bird.yml', 't2i_clip_gan'),
        ('pretrain_DAMSM', 'cfg/DAMSM/clip_coco.yml', 't2i_clip_gan'),
        ('main', 'cfg/clip_bird_DMGAN.yml', 't2i_clip_gan'),
        ('main', 'cfg/clip_coco_DMGAN.yml', 't2i_clip_gan'),
        ('pretrain_DAMSM', 'cfg/DAMSM/bird.yml', 'attngan'),
        ('pretrain_DAMSM', 'cfg/DAMSM/coco.yml', 'attngan'),
        ('main', 'cfg/bird_DMGAN.yml', 'attngan'),
        ('main', 'cfg/coco_DMGAN.yml', 'attngan'),
    ],
)
def test_word_loss_form_of_each_reproduction_cfg(script, cfg, form):
    """T2I_CLIP-GAN's cfgs use its word loss, AttnGAN's and DM-GAN's use AttnGAN's."""
    import importlib

    defaults = importlib.import_module(script).DEFAULTS
    args = utils.base_parser('t').parse_args(['--cfg', os.path.join(ROOT, cfg)])
    assert utils.build_cfg(defaults, args).TRAIN.SMOOTH.WORD_LOSS == form


def test_pretraining_word_terms_follow_the_cfg_form():
    """pretrain_DAMSM.compute_losses reads TRAIN.SMOOTH.WORD_LOSS."""
    torch.manual_seed(0)
    regions, img = torch.randn(3, 6, 2, 2), torch.randn(3, 6)
    words, sent, pad = torch.randn(3, 6, 4), torch.randn(3, 6), torch.zeros(3, 4, dtype=torch.bool)
    cfg = utils.to_cfg(pretrain_DAMSM.DEFAULTS)
    got = {}
    for form in models.WORD_LOSS_FORMS:
        cfg.TRAIN.SMOOTH.WORD_LOSS = form
        _, values, _ = pretrain_DAMSM.compute_losses(
            (regions, img, [(words, sent, pad)]), torch.arange(3), cfg
        )
        w0, _, _ = models.words_loss(regions, words, pad, torch.arange(3), 4.0, 5.0, 10.0, form)
        assert values['w_loss0'] == pytest.approx(w0.item(), rel=1e-6)
        got[form] = values['w_loss0']
    assert got['attngan'] != pytest.approx(got['t2i_clip_gan'], rel=1e-3)


def test_sent_loss_matches_reference():
    rng = np.random.RandomState(1)
    img, sent = rng.randn(5, 8), rng.randn(5, 8)
    cls = np.array([3, 3, 1, 2, 1])
    sim = (
        np.array(
            [
                [
                    img[j] @ sent[i] / (np.linalg.norm(img[j]) * np.linalg.norm(sent[i]))
                    for i in range(5)
                ]
                for j in range(5)
            ]
        )
        * 10.0
    )
    r0, r1 = _ce_both_ways(_mask_same_class(sim, cls))
    s0, s1 = models.sent_loss(torch.tensor(img), torch.tensor(sent), torch.tensor(cls), 10.0)
    assert s0.item() == pytest.approx(r0, rel=1e-9) and s1.item() == pytest.approx(r1, rel=1e-9)


def test_clip_loss_matches_reference():
    rng = np.random.RandomState(2)
    img, txt = rng.randn(4, 6), rng.randn(4, 6)
    t = math.log(1 / 0.07)

    def n(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    logits = math.exp(t) * n(img) @ n(txt).T
    li = np.mean([-np.log(_softmax(logits, 1)[k, k]) for k in range(4)])
    lt = np.mean([-np.log(_softmax(logits.T, 1)[k, k]) for k in range(4)])
    got = models.clip_loss(
        torch.tensor(img), torch.tensor(txt), torch.tensor(t, dtype=torch.float64)
    )
    assert got.item() == pytest.approx((li + lt) / 2, rel=1e-9)


def test_nt_xent_matches_reference():
    """SimCLR's formulation: for view k, positive = the other view of its item, negatives =
    the 2N-2 views of other items; sum of -log(e^pos / (e^pos + Σ e^neg)) over 2N, / 2N."""
    rng = np.random.RandomState(3)
    z1, z2 = rng.randn(3, 4), rng.randn(3, 4)
    z = np.concatenate([z1, z2])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    N, tau, total = 3, 0.5, 0.0
    for k in range(2 * N):
        pos = (k + N) % (2 * N)
        negs = [m for m in range(2 * N) if m not in (k, pos)]
        num = np.exp(z[k] @ z[pos] / tau)
        total += -np.log(num / (num + sum(np.exp(z[k] @ z[m] / tau) for m in negs)))
    got = models.nt_xent_loss(torch.tensor(z1), torch.tensor(z2), 0.5)
    assert got.item() == pytest.approx(total / (2 * N), rel=1e-9)


def test_one_cycle_matches_torch():
    """The T2I_CLIP-GAN schedule: our closed form equals torch's OneCycleLR step by step."""
    for pct, div, final in ((0.02, 25.0, 1e4), (0.1, 1e3, 1e6)):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.Adam([p], lr=1.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=2.0,
            total_steps=200,
            pct_start=pct,
            div_factor=div,
            final_div_factor=final,
            anneal_strategy='cos',
            cycle_momentum=False,
        )
        for i in range(200):
            assert 2.0 * pretrain_DAMSM.one_cycle(i, 200, pct, div, final) == pytest.approx(
                opt.param_groups[0]['lr'], rel=1e-9
            )
            opt.step()
            sched.step()


# ----------------------------------------------------------------------------------------------
# The encoder API: every family, tokenizers, checkpoints
# ----------------------------------------------------------------------------------------------
WORDS = ['<end>', 'a', 'red', 'blue', 'circle', 'square', 'left', 'on', 'the', 'big']
TEXTS = ['a red circle on the left', 'big blue square', 'a circle']


def tiny_specs(family, tok):
    embed_dim = 16
    if family == 'damsm':
        return (
            {'family': 'damsm', 'dim': embed_dim, 'tokenizer': tok, 'word_dim': 12, 'dropout': 0.0},
            {
                'family': 'damsm',
                'dim': embed_dim,
                'image_size': 32,
                'backbone': 'small',
                'width': 4,
                'train_backbone': True,
            },
        )
    if family == 'clip':
        return (
            {
                'family': 'clip',
                'dim': embed_dim,
                'tokenizer': tok,
                'width': 16,
                'heads': 2,
                'layers': 2,
                'keep_special': False,
            },
            {
                'family': 'clip',
                'dim': embed_dim,
                'image_size': 32,
                'layers': [2],
                'width': 16,
                'head_width': 8,
                'patch_size': 8,
            },
        )
    if family == 'clip_rn':
        return (
            tiny_specs('clip', tok)[0],
            {
                'family': 'clip',
                'dim': embed_dim,
                'image_size': 64,
                'layers': [1, 1, 1, 1],
                'width': 8,
                'head_width': 32,
                'patch_size': 0,
            },
        )
    from transformers import CLIPConfig

    clip_config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok['vocab']),
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=embed_dim,
            max_position_embeddings=tok['context_length'],
            bos_token_id=len(WORDS),
            eos_token_id=len(WORDS) + 1,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=embed_dim,
        ),
        projection_dim=embed_dim,
    )
    return (
        {
            'family': 'clip_hf',
            'dim': embed_dim,
            'tokenizer': tok,
            'keep_special': False,
            'config': clip_config.text_config.to_dict(),
        },
        {'family': 'clip_hf', 'dim': embed_dim, 'config': clip_config.vision_config.to_dict()},
    )


@pytest.mark.parametrize('family', ['damsm', 'clip', 'clip_rn', 'clip_hf'])
def test_encoder_api_and_checkpoint_roundtrip(family, tmp_path):
    torch.manual_seed(0)
    tok = models.tokenizer_spec('attngan' if family == 'damsm' else 'words', 12, words=WORDS)
    tspec, ispec = tiny_specs(family, tok)
    te, ie = models.build_text_encoder(tspec).eval(), models.build_image_encoder(ispec).eval()
    words, sent, pad = te.encode(TEXTS)
    n_words = [6, 3, 2]  # the transformers' <sot>/<eot> are dropped
    assert words.shape[:2] == (3, 16) and sent.shape == (3, 16) and pad.dtype == torch.bool
    assert (~pad).sum(1).tolist() == n_words  # the RNN pads to 12 words, the others to the longest
    assert words.shape[2] == (12 if family == 'damsm' else max(n_words))
    images = torch.rand(2, 3, 50, 50) * 2 - 1  # any size: resized inside
    regions, glob = ie.encode(images)
    assert regions.shape[:2] == (2, 16) and glob.shape == (2, 16)
    # a caption's features do not depend on the batch it comes in (padding, trimming)
    w1, s1, _ = te.encode(TEXTS[2:])
    assert torch.allclose(s1[0], sent[2], atol=1e-5) and torch.allclose(
        w1[0, :, :2], words[2, :, :2], atol=1e-5
    )
    assert te.word_strings(TEXTS[0]) == ['a', 'red', 'circle', 'on', 'the', 'left']
    # saved as pretrain_DAMSM does, rebuilt by load_encoders from the spec alone
    save_encoder_pair(tmp_path, te, ie, epoch=7, step=70)
    for kind in ('text_encoder', 'image_encoder'):  # only plain types: weights_only loading
        assert (
            torch.load(tmp_path / 'checkpoints' / f'{kind}7.pth', weights_only=True)['kind'] == kind
        )
    te2, ie2 = models.load_encoders(str(tmp_path / 'checkpoints' / 'text_encoder7.pth'))
    assert not any(p.requires_grad for p in list(te2.parameters()) + list(ie2.parameters()))
    assert torch.allclose(te2.encode(TEXTS)[1], sent, atol=1e-6)
    assert torch.allclose(ie2.encode(images)[1], glob, atol=1e-6)
    with pytest.raises(utils.UserError, match='text_encoder'):
        models.load_encoders(str(tmp_path / 'checkpoints' / 'image_encoder7.pth'))


def test_clip_text_pools_at_end_token_not_largest_id():
    """BERT ids: the sentence is the state at [SEP] (last real token); the copied T2I code's
    argmax pooling would pick the character with the largest id."""
    vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', '红', '色', '的', '猫', '狗']
    torch.manual_seed(0)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, 'vocab.txt')
        with open(path, 'w', encoding='utf-8') as f:
            f.write('\n'.join(vocab) + '\n')
        tok = models.tokenizer_spec('bert', 8, path)
    te = models.build_text_encoder(tiny_specs('clip', tok)[0]).eval()
    ids, lengths = te.tokenizer(['红色的狗', '猫'])
    assert ids[0, :6].tolist() == [2, 5, 6, 7, 9, 3] and lengths.tolist() == [6, 3]
    with torch.no_grad():
        x = te.token_embedding(ids) + te.positional_embedding
        for blk in te.blocks:
            x = blk(x, causal=True)
        states = te.ln_final(x) @ te.text_projection
        sent = te(ids, lengths)[1]
    assert torch.allclose(sent[0], states[0, 5], atol=1e-5)  # [SEP]
    assert not torch.allclose(sent[0], states[0, ids[0].argmax()], atol=1e-3)
    assert te.word_strings('红色的狗') == ['红', '色', '的', '狗']


def test_clip_bpe_tokenizer_from_a_local_folder(tmp_path):
    """transformers' CLIPTokenizer from vocab.json + merges.txt in CLIP's format; the spec
    carries vocabulary and merges, so the checkpoint needs no file."""
    vocab = write_clip_bpe(tmp_path)
    spec = models.tokenizer_spec('clip', 6, str(tmp_path))
    tok = models.TextEncoderTokenizer(spec)
    ids, lengths = tok(['a red cat', 'red red red red red red'])
    sot, eot = vocab['<|startoftext|>'], vocab['<|endoftext|>']
    assert ids[0].tolist() == [sot, vocab['a</w>'], vocab['red</w>'], vocab['cat</w>'], eot, eot]
    assert lengths.tolist() == [5, 6] and ids[1, 5] == eot  # truncation keeps the end token
    with pytest.raises(utils.UserError, match='offline'):
        models.tokenizer_spec('clip', 6, str(tmp_path / 'missing'))


def test_inception_weights_load_into_the_cnn_encoder(tmp_path):
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(net.state_dict(), tmp_path / 'inception.pth')  # torchvision's file layout
    enc = models.build_image_encoder(
        {
            'family': 'damsm',
            'dim': 8,
            'image_size': 299,
            'backbone': 'inception_v3',
            'train_backbone': False,
        }
    )
    models.load_inception_weights(enc, str(tmp_path / 'inception.pth'))
    assert torch.equal(enc.to_regions[0].conv.weight, net.Conv2d_1a_3x3.conv.weight)
    assert torch.equal(
        enc.to_global[2].branch_pool.conv.weight, net.Mixed_7c.branch_pool.conv.weight
    )
    enc.train()
    assert (
        not enc.to_regions.training and enc.emb_features.training
    )  # a spec without bn_stats: frozen BN
    adapt = models.build_image_encoder(
        {
            'family': 'damsm',
            'dim': 8,
            'image_size': 299,
            'backbone': 'inception_v3',
            'train_backbone': False,
            'bn_stats': 'adapt',
        }
    )
    adapt.load_state_dict(enc.state_dict())
    adapt.train()  # AttnGAN's cnn_model.train(): weights frozen, BatchNorm statistics move
    assert adapt.to_regions.training and not any(
        p.requires_grad for p in adapt.to_regions.parameters()
    )
    before = adapt.to_regions[0].bn.running_mean.clone()
    adapt(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert not torch.equal(before, adapt.to_regions[0].bn.running_mean)
    regions, glob = enc(torch.zeros(1, 3, 64, 64))
    assert regions.shape == (1, 8, 17, 17) and glob.shape == (1, 8)
    with pytest.raises(utils.UserError, match='not found'):
        models.load_inception_weights(enc, str(tmp_path / 'nope.pth'))


# ----------------------------------------------------------------------------------------------
# The script: one step of every cfg on fixture data, resume, metrics
# ----------------------------------------------------------------------------------------------
def run_pretrain_damsm(cfg, out, data, *sets, resume=None):
    """pretrain_DAMSM.main() on the fixture data at a tiny size, in this process; returns
    the run's metrics.json."""
    argv = [
        '--cfg',
        cfg,
        '--out',
        str(out),
        '--set',
        f'DATA_DIR={data}',
        '--set',
        f'DATA.TRAIN_CSV={data}/train.csv',
        '--set',
        f'DATA.VAL_CSV={data}/test.csv',
        '--set',
        'WORKERS=0',
        '--set',
        'TRAIN.BATCH_SIZE=8',
        '--set',
        'TRAIN.MAX_EPOCH=1',
        '--set',
        'EVAL.R_NEG=2',
        '--set',
        'EVAL.NUM=6',
        '--set',
        'EVAL.ATTN_IMAGES=2',
    ]
    for s in sets:
        argv += ['--set', s]
    if resume:
        argv += ['--resume', resume]
    run_in_process(pretrain_DAMSM, argv)
    with open(os.path.join(out, 'metrics.json')) as f:
        return json.load(f)


PRETRAINED_HF = [
    'MODEL.PRETRAINED={clip}',
    'MODEL.TOKENIZER_PATH={clip}',
    'TEXT.EMBEDDING_DIM=16',
    'TREE.BASE_SIZE=32',
]  # a CLIPModel folder in the hub's format, as a real run reads it
SMALL_HF = [
    'MODEL.PRETRAINED=',
    'MODEL.TOKENIZER=words',
    'TEXT.EMBEDDING_DIM=16',
    'TREE.BASE_SIZE=32',
    'MODEL.CLIP.VISION_LAYERS=[1]',
    'MODEL.CLIP.PATCH_SIZE=8',
    'MODEL.CLIP.VISION_WIDTH=16',
    'MODEL.CLIP.HEAD_WIDTH=8',
    'MODEL.CLIP.TEXT_WIDTH=16',
    'MODEL.CLIP.TEXT_HEADS=2',
    'MODEL.CLIP.TEXT_LAYERS=1',
]
SMALL_RN50 = [
    'MODEL.TOKENIZER=words',
    'TEXT.EMBEDDING_DIM=16',
    'TREE.BASE_SIZE=64',
    'DATA.CLASS_FROM=folder',
    'MODEL.CLIP.VISION_LAYERS=[1,1,1,1]',
    'MODEL.CLIP.VISION_WIDTH=8',
    'MODEL.CLIP.HEAD_WIDTH=32',
    'MODEL.CLIP.TEXT_WIDTH=16',
    'MODEL.CLIP.TEXT_HEADS=2',
    'MODEL.CLIP.TEXT_LAYERS=1',
]
CFGS = {  # every shipped cfg, shrunk to fixture size; the real cfg's other keys stay
    'DAMSM/bird.yml': [
        'MODEL.PRETRAINED=',
        'TEXT.EMBEDDING_DIM=16',
        'TRAIN.BATCH_SIZE=2',
        'EVAL.NUM=3',
        'EVAL.R_NEG=1',
    ],
    'DAMSM/coco.yml': [
        'MODEL.PRETRAINED=',
        'TEXT.EMBEDDING_DIM=16',
        'MODEL.CNN.BACKBONE=small',
        'TEXT.CAPTIONS_PER_IMAGE=10',
    ],
    'DAMSM/shapes.yml': [],
    'DAMSM/clip_bird.yml': PRETRAINED_HF,
    'DAMSM/clip_coco.yml': SMALL_HF + ['TEXT.CAPTIONS_PER_IMAGE=10'],
    'DAMSM/clip_shapes.yml': [],
    'clip_wukong_rn50.yml': SMALL_RN50,
    'clip_shapes.yml': [],
}


@pytest.fixture(scope='module')
def tiny_clip_dir(tmp_path_factory):
    """A random-init CLIPModel saved with save_pretrained, beside its tokenizer files."""
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp('clip')
    vocab = write_clip_bpe(folder)
    torch.manual_seed(0)
    clip_config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            projection_dim=16,
            bos_token_id=len(vocab) - 2,
            eos_token_id=len(vocab) - 1,
            pad_token_id=len(vocab) - 1,
        ),
        vision_config=dict(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=16,
        ),
        projection_dim=16,
    )
    CLIPModel(clip_config).save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize('cfg', sorted(CFGS))
def test_one_step_of_every_cfg(cfg, fixture_data, tiny_clip_dir, tmp_path):
    out = tmp_path / 'run'
    sets = [s.replace('{clip}', str(tiny_clip_dir)) for s in CFGS[cfg]]
    m = run_pretrain_damsm(os.path.join(ROOT, 'cfg', cfg), out, fixture_data, *sets)
    assert m['epoch'] == 1 and m['step'] >= 1 and math.isfinite(m['train_loss'])
    assert 0.0 <= m['R_precision'] <= 1.0 and 0.0 <= m['i2t_R@10'] <= 1.0
    if 'shapes' in cfg:  # EVAL.SWAP_WORDS: the minimal-pair accuracies
        assert m['swap_colour_pairs'] >= 1 and 0.0 <= m['swap_colour'] <= 1.0
    # R-precision's protocol names the files written after it, which hold the weights it scored
    ck = out / 'checkpoints'
    check_protocol(
        m['protocol'],
        {
            'text_encoder': ck / 'text_encoder1.pth',
            'image_encoder': ck / 'image_encoder1.pth',
            'checkpoint': ck / f"damsm_{m['step']:08d}.pt",
        },
        num_images=m['eval_images'],
        seed=pretrain_DAMSM.EVAL_SEED,
    )
    te, ie = models.load_encoders(str(out / 'checkpoints' / 'text_encoder1.pth'))
    words, sent, pad = te.encode(['a red circle in the middle'])
    regions, glob = ie.encode(torch.zeros(1, 3, 40, 40))
    assert words.shape[1] == sent.shape[1] == regions.shape[1] == glob.shape[1]
    if '{clip}' in ' '.join(CFGS[cfg]):  # the CLIP weights were loaded (and barely moved: lr 8e-7)
        from transformers import CLIPModel

        ref = CLIPModel.from_pretrained(tiny_clip_dir).text_model.embeddings.token_embedding.weight
        assert torch.allclose(te.model.text_model.embeddings.token_embedding.weight, ref, atol=1e-4)


def test_eval_protocol_names_the_test_images_as_evalset_prepares_them(tmp_path):
    weights = tmp_path / 'text_encoder1.pth'
    weights.write_bytes(b'stand-in weights')
    cfg = utils.to_cfg({**utils.COMMON_DEFAULTS, **pretrain_DAMSM.DEFAULTS})
    common = dict(num_images=6, seed=pretrain_DAMSM.EVAL_SEED, image_size=299)
    protocol = pretrain_DAMSM.eval_protocol(cfg, 6, {'text_encoder': str(weights)})
    check_protocol(
        protocol,
        {'text_encoder': weights},
        split='test',
        resize='resize to 355 px, centre crop',
        **common,
    )
    utils.apply_set(cfg, ['DATA.CROP=false'])
    check_protocol(
        pretrain_DAMSM.eval_protocol(cfg, 6, {}),
        {},
        split='test',
        resize='resize to 299 px',
        **common,
    )
    utils.apply_set(cfg, ['DATA.FORMAT=csv', 'DATA.VAL_CSV=val.csv'])
    check_protocol(
        pretrain_DAMSM.eval_protocol(cfg, 6, {}),
        {},
        split='val.csv',
        resize='bicubic resize to 299 px, centre crop',
        **common,
    )


@pytest.mark.slow
def test_resume_auto_continues_from_the_last_epoch(fixture_data, tmp_path):
    cfg = os.path.join(ROOT, 'cfg', 'DAMSM', 'shapes.yml')
    out = tmp_path / 'run'
    run_pretrain_damsm(cfg, out, fixture_data)
    ckpt = utils.load_checkpoint(str(out / 'checkpoints' / 'damsm_00000001.pt'), 'damsm')
    m = run_pretrain_damsm(cfg, out, fixture_data, 'TRAIN.MAX_EPOCH=2', resume='auto')
    assert m['epoch'] == 2 and m['step'] == 2
    assert 'resuming from' in (out / 'log.txt').read_text()
    later = utils.load_checkpoint(str(out / 'checkpoints' / 'damsm_00000002.pt'), 'damsm')
    assert later['epoch'] == 2 and ckpt['epoch'] == 1
    assert (out / 'checkpoints' / 'text_encoder2.pth').exists()


def test_bad_cfg_values_are_one_line_errors(fixture_data, tmp_path):
    cfg = os.path.join(ROOT, 'cfg', 'DAMSM', 'shapes.yml')
    with pytest.raises(utils.UserError, match='MODEL.FAMILY'):
        run_pretrain_damsm(cfg, tmp_path / 'a', fixture_data, 'MODEL.FAMILY=lstm')
    with pytest.raises(utils.UserError, match='FINETUNE'):
        run_pretrain_damsm(
            os.path.join(ROOT, 'cfg', 'DAMSM', 'clip_shapes.yml'),
            tmp_path / 'b',
            fixture_data,
            'MODEL.FINETUNE=[text_model.nothing]',
        )


# ----------------------------------------------------------------------------------------------
# open_clip's checkpoints both ways (clip family)
# ----------------------------------------------------------------------------------------------
def clip_dual(
    vision, patch, vocab, ctx, embed, width, image, text_width, heads, layers, head_width=64
):
    """pretrain_DAMSM.py's DualEncoder of the clip family at these open_clip sizes ('words'
    tokenizer: <eot> is the largest id, where open_clip's argmax pooling looks)."""
    tok = models.tokenizer_spec('words', ctx, words=['<end>'] + [f'w{i}' for i in range(vocab - 3)])
    text = {
        'family': 'clip',
        'dim': embed,
        'tokenizer': tok,
        'width': text_width,
        'heads': heads,
        'layers': layers,
        'keep_special': False,
    }
    image_spec = {
        'family': 'clip',
        'dim': embed,
        'image_size': image,
        'layers': vision,
        'width': width,
        'head_width': head_width,
        'patch_size': patch,
    }
    return pretrain_DAMSM.DualEncoder(
        models.build_text_encoder(text), models.build_image_encoder(image_spec), True
    )


def test_open_clip_layout_is_open_clips_rn50():
    with torch.device('meta'):
        rn50 = clip_dual([3, 4, 6, 3], 0, 49408, 77, 1024, 64, 224, 512, 8, 12)
    oc = models.to_open_clip_state_dict(rn50.state_dict())
    with open(os.path.join(ROOT, 'tests', 'data', 'open_clip_rn50_keys.txt')) as f:
        expected = [line.strip() for line in f if line.strip() and not line.startswith('#')]
    assert [f'{k} {tuple(v.shape)}' for k, v in oc.items()] == expected
    no_decay, decay = models.open_clip_param_groups(oc)
    assert {
        'logit_scale',
        'visual.bn1.weight',
        'ln_final.bias',
        'visual.attnpool.c_proj.bias',
    } <= set(no_decay)
    assert {
        'text_projection',
        'positional_embedding',
        'visual.attnpool.positional_embedding',
    } <= set(decay)
    assert len(no_decay) + len(decay) == sum(1 for _ in rn50.parameters())


SMALL_CLIP = {  # vision layers, patch size, vocab, context, embed, width, image, text width, heads, layers, head width
    'resnet': ([1, 1, 1, 1], 0, 30, 12, 32, 8, 64, 32, 2, 2, 64),
    'vit': ([2], 16, 30, 12, 32, 64, 64, 32, 2, 2, 32),
}


def _small_clip(vision, seed):
    torch.manual_seed(seed)
    m = clip_dual(*SMALL_CLIP[vision])
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def _clip_cfg():
    d = pretrain_DAMSM.DEFAULTS
    return utils.to_cfg(
        {
            **d,
            'MODEL': {**d['MODEL'], 'FAMILY': 'clip'},
            'TRAIN': {
                **d['TRAIN'],
                'OPTIMIZER': 'adamw',
                'WEIGHT_DECAY': 0.1,
                'BETAS': [0.9, 0.999],
            },
        }
    )


def _clip_step(model, opt):
    x = torch.linspace(-1, 1, 2 * 3 * 64 * 64).reshape(2, 3, 64, 64)
    ids, lengths = model.text.tokenizer(['w1 w5 w7', 'w3 w2'])
    _, glob, _, sent, _ = model(x, ids, lengths, regions=False)
    loss = models.clip_loss(glob, sent, model.logit_scale.exp())
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize('vision', sorted(SMALL_CLIP))
@pytest.mark.parametrize('ddp', [False, True])
def test_open_clip_round_trip_gives_identical_outputs(vision, ddp, tmp_path):
    """ours -> open_clip's epoch_N.pt (torch.save, weights_only read) -> a fresh model: the same
    features, the same AdamW moments, so the same next step."""
    cfg = _clip_cfg()
    ours = _small_clip(vision, 0)
    opt = pretrain_DAMSM.build_optimizer(ours, cfg)
    _clip_step(ours, opt)
    torch.save(
        models.to_open_clip_checkpoint(ours, opt, 3, 'run', ddp=ddp), tmp_path / 'epoch_3.pt'
    )
    read = utils.load_weights(str(tmp_path / 'epoch_3.pt'))
    assert set(read) == {'epoch', 'name', 'state_dict', 'optimizer'} and read['epoch'] == 3
    assert models.is_open_clip_checkpoint(read)
    assert all(k.startswith('module.') == ddp for k in read['state_dict'])
    no_decay, decay = models.open_clip_param_groups(
        models.to_open_clip_state_dict(ours.state_dict())
    )
    groups = read['optimizer']['param_groups']
    assert [len(g['params']) for g in groups] == [len(no_decay), len(decay)]
    assert [g['weight_decay'] for g in groups] == [0.0, 0.1]
    back = _small_clip(vision, 1)
    assert not torch.equal(back.text.token_embedding.weight, ours.text.token_embedding.weight)
    back.load_state_dict(
        models.from_open_clip_state_dict(read['state_dict'], back.state_dict(), 'p')
    )
    back_opt = pretrain_DAMSM.build_optimizer(back, cfg)
    back_opt.load_state_dict(
        models.open_clip_optimizer_state(read['optimizer'], back, back_opt, 'p')
    )
    ours.eval(), back.eval()
    x = torch.rand(3, 3, 48, 48) * 2 - 1
    texts = ['w1 w2', 'w9 w3 w4 w5', 'w20']
    with torch.no_grad():
        for a, b in zip(
            ours.image.encode(x) + ours.text.encode(texts),
            back.image.encode(x) + back.text.encode(texts),
        ):
            assert torch.equal(a, b)
    assert torch.equal(ours.logit_scale, back.logit_scale)
    ours.train(), back.train()
    _clip_step(ours, opt)
    _clip_step(back, back_opt)
    assert all(
        torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values())
    )


def _open_clip_twin(vision):
    """open_clip's own CLIP (open_clip_torch, requirements-dev.txt) at SMALL_CLIP's sizes."""
    open_clip = pytest.importorskip('open_clip')
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    layers, patch, vocab, ctx, embed, width, image, tw, heads, tl, hw = SMALL_CLIP[vision]
    vcfg = CLIPVisionCfg(
        layers=layers if not patch else layers[0],
        width=width,
        image_size=image,
        patch_size=patch or 16,
        head_width=hw,
    )
    tcfg = CLIPTextCfg(context_length=ctx, vocab_size=vocab, width=tw, heads=heads, layers=tl)
    return open_clip, open_clip.CLIP(embed, vcfg, tcfg)


def _open_clip_adamw(model, lr=1e-3, wd=0.1):
    """open_clip_train main.py's AdamW: gains, biases, logit_scale without weight decay first."""
    named = list(model.named_parameters())
    excluded = [p for n, p in named if p.ndim < 2 or models.open_clip_is_excluded(n)]
    rest = [p for n, p in named if not (p.ndim < 2 or models.open_clip_is_excluded(n))]
    return torch.optim.AdamW(
        [{'params': excluded, 'weight_decay': 0.0}, {'params': rest, 'weight_decay': wd}],
        lr=lr,
        betas=(0.9, 0.999),
        eps=1e-8,
    )


@pytest.mark.parametrize('vision', sorted(SMALL_CLIP))
def test_open_clip_itself_reads_our_checkpoint_and_we_read_its(vision, tmp_path):
    """Against open_clip 3.3.0: its load_checkpoint and its AdamW take our epoch_N.pt (single
    process and DDP's 'module.'), and compute our features; its own checkpoint, saved as
    open_clip_train does after a step, gives its features and moments here."""
    open_clip, oc = _open_clip_twin(vision)
    ours = _small_clip(vision, 0)
    opt = pretrain_DAMSM.build_optimizer(ours, _clip_cfg())
    _clip_step(ours, opt)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    pixels = models._prepare(x, 64, models.CLIP_MEAN, models.CLIP_STD)
    ids, lengths = ours.text.tokenizer(['w1 w5 w7', 'w3'])
    for ddp in (False, True):
        torch.save(models.to_open_clip_checkpoint(ours, opt, 1, 'run', ddp=ddp), tmp_path / 'e.pt')
        open_clip.load_checkpoint(oc, str(tmp_path / 'e.pt'))  # strict
        oc_opt = _open_clip_adamw(oc)
        oc_opt.load_state_dict(torch.load(tmp_path / 'e.pt', weights_only=True)['optimizer'])
    ours.eval(), oc.eval()
    with torch.no_grad():
        assert torch.allclose(oc.encode_image(pixels), ours.image(x, regions=False)[1], atol=1e-5)
        assert torch.allclose(oc.encode_text(ids), ours.text(ids, lengths)[1], atol=1e-5)
    # the other way: open_clip trains a step and saves as its main.py does
    torch.manual_seed(3)
    _, oc = _open_clip_twin(vision)
    oc_opt = _open_clip_adamw(oc)
    img, txt, scale = oc(pixels, ids)
    models.clip_loss(img, txt, scale).backward()
    oc_opt.step()
    ckpt = {
        'epoch': 1,
        'name': 'oc',
        'state_dict': oc.state_dict(),
        'optimizer': oc_opt.state_dict(),
    }
    torch.save(ckpt, tmp_path / 'epoch_1.pt')
    read = utils.load_weights(str(tmp_path / 'epoch_1.pt'))
    back = _small_clip(vision, 1)
    back.load_state_dict(
        models.from_open_clip_state_dict(read['state_dict'], back.state_dict(), 'p')
    )
    back_opt = pretrain_DAMSM.build_optimizer(back, _clip_cfg())
    back_opt.load_state_dict(
        models.open_clip_optimizer_state(read['optimizer'], back, back_opt, 'p')
    )
    oc.eval(), back.eval()
    with torch.no_grad():
        assert torch.allclose(oc.encode_image(pixels), back.image(x, regions=False)[1], atol=1e-5)
        assert torch.allclose(oc.encode_text(ids), back.text(ids, lengths)[1], atol=1e-5)
    oc_params = dict(oc.named_parameters())
    for name, p in back.named_parameters():
        theirs = oc_params[models.open_clip_key(name)]
        assert torch.equal(back_opt.state[p]['exp_avg'], oc_opt.state[theirs]['exp_avg'])


def test_open_clip_bad_checkpoint_names_the_key(tmp_path):
    ours = _small_clip('resnet', 0)
    sd = models.to_open_clip_state_dict(ours.state_dict())
    target = ours.state_dict()
    bad = {
        "state_dict key 'visual.attnpool.extra.weight' maps to nothing": {
            **sd,
            'visual.attnpool.extra.weight': torch.zeros(1),
        },
        "state_dict key 'token_embedding.weight' has shape (31, 32)": {
            **sd,
            'token_embedding.weight': torch.zeros(31, 32),
        },
        "state_dict lacks 'ln_final.bias'": {k: v for k, v in sd.items() if k != 'ln_final.bias'},
    }
    for message, state in bad.items():
        with pytest.raises(utils.UserError, match=re.escape(f'p: {message}')):
            models.from_open_clip_state_dict(state, target, 'p')
    opt = pretrain_DAMSM.build_optimizer(ours, _clip_cfg())
    saved = models.to_open_clip_checkpoint(ours, opt, 1, 'run')['optimizer']
    one = {**saved, 'param_groups': [{**saved['param_groups'][1], 'params': list(range(40))}]}
    with pytest.raises(utils.UserError, match=r'optimizer groups of \[40\] parameters'):
        models.open_clip_optimizer_state(one, ours, opt, 'p')


@pytest.mark.slow
def test_pretrain_writes_and_resumes_open_clip_checkpoints(fixture_data, tmp_path):
    """TRAIN.OPEN_CLIP_CHECKPOINT writes epoch_1.pt beside text_encoder1.pth; --resume takes it
    (AdamW goes on from its steps); a broken one is one line naming the file and the key."""
    cfg = os.path.join(ROOT, 'cfg', 'clip_shapes.yml')
    m = run_pretrain_damsm(cfg, tmp_path / 'a', fixture_data, 'TRAIN.OPEN_CLIP_CHECKPOINT=true')
    path = tmp_path / 'a' / 'checkpoints' / 'epoch_1.pt'
    oc = utils.load_weights(str(path))
    assert oc['epoch'] == 1 and oc['name'] == 'clip_shapes'
    ours = utils.load_checkpoint(str(tmp_path / 'a' / 'checkpoints' / f"damsm_{m['step']:08d}.pt"))
    assert list(oc['state_dict']) == list(models.to_open_clip_state_dict(ours['models']['model']))
    theirs = models.to_open_clip_state_dict(ours['models']['model'])
    assert all(torch.equal(oc['state_dict'][k], v) for k, v in theirs.items())
    m2 = run_pretrain_damsm(
        cfg, tmp_path / 'b', fixture_data, 'TRAIN.MAX_EPOCH=2', resume=str(path)
    )
    assert m2['epoch'] == 2 and m2['step'] == 2 * m['step']
    assert 'resuming open_clip checkpoint' in (tmp_path / 'b' / 'log.txt').read_text()
    later = utils.load_checkpoint(
        str(tmp_path / 'b' / 'checkpoints' / f"damsm_{m2['step']:08d}.pt")
    )
    assert {float(s['step']) for s in later['optimizers']['opt']['state'].values()} == {
        2.0 * m['step']
    }
    oc['state_dict']['visual.layer1.0.extra.weight'] = torch.zeros(1)
    torch.save(oc, tmp_path / 'bad.pt')
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, 'pretrain_DAMSM.py'),
            '--cfg',
            cfg,
            '--out',
            str(tmp_path / 'c'),
            '--set',
            f'DATA.TRAIN_CSV={fixture_data}/train.csv',
            '--set',
            f'DATA.VAL_CSV={fixture_data}/test.csv',
            '--set',
            'EVAL.R_NEG=2',
            '--set',
            'TRAIN.BATCH_SIZE=8',
            '--set',
            'EVAL.NUM=6',
            '--set',
            'WORKERS=0',
            '--resume',
            str(tmp_path / 'bad.pt'),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and 'Traceback' not in r.stderr, r.stderr
    assert (
        last.startswith('error: ') and 'bad.pt' in last and "'visual.layer1.0.extra.weight'" in last
    ), last


# ----------------------------------------------------------------------------------------------
# DDP: 2 gloo processes on CPU == one process on the concatenated batch
# ----------------------------------------------------------------------------------------------
DDP_CASES = {
    'clip_hf': {
        'family': 'clip_hf',
        'loss': {'WORDS': 1.0, 'SENT': 1.0, 'NTXENT': 1.0, 'CLIP': 1.0},
        'word_loss': 't2i_clip_gan',
    },
    'clip': {
        'family': 'clip',
        'loss': {'WORDS': 1.0, 'SENT': 1.0, 'NTXENT': 0.0, 'CLIP': 1.0},
        'word_loss': 'attngan',
    },
}


def _ddp_setup(name):
    torch.manual_seed(0)
    case = DDP_CASES[name]
    tok = models.tokenizer_spec('words', 12, words=WORDS)
    tspec, ispec = tiny_specs(case['family'], tok)
    model = pretrain_DAMSM.DualEncoder(
        models.build_text_encoder(tspec), models.build_image_encoder(ispec), True
    ).double()  # float64: agreement to rounding
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    cfg = utils.to_cfg(
        {
            'LOSS': {**pretrain_DAMSM.DEFAULTS['LOSS'], **case['loss']},
            'TRAIN': {
                'SMOOTH': {
                    'GAMMA1': 4.0,
                    'GAMMA2': 5.0,
                    'GAMMA3': 10.0,
                    'WORD_LOSS': case['word_loss'],
                }
            },
            'TEXT': {'WORDS_NUM': 12},
        }
    )
    g = torch.Generator().manual_seed(1)
    images = torch.rand(8, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    texts = [
        'a red circle on the left',
        'big blue square',
        'a circle',
        'the big red square on the left',
        'blue',
        'a big circle',
        'red square on the left',
        'a blue circle',
    ]
    texts2 = texts[1:] + texts[:1]
    ids, lengths = model.text.tokenizer(texts)
    ids2, lengths2 = model.text.tokenizer(texts2)
    cls = torch.tensor([0, 1, 2, 0, 3, 4, 1, 5])
    return model, cfg, images, [(ids, lengths), (ids2, lengths2)], cls


def _loss_and_grads(model, cfg, images, caps, cls, world, gather, ddp=None):
    feats = pretrain_DAMSM.encode(ddp or model, images, caps, regions=True)
    loss, values, _ = pretrain_DAMSM.compute_losses(
        feats, cls, cfg, model.logit_scale, world, gather
    )
    (loss * world).backward()
    return values, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        for name in DDP_CASES:
            model, cfg, images, caps, cls = _ddp_setup(name)
            ddp = utils.wrap_ddp(model, torch.device('cpu'))
            s = slice(rank * 4, rank * 4 + 4)
            values, grads = _loss_and_grads(
                model,
                cfg,
                images[s],
                [(i[s], n[s]) for i, n in caps],
                cls[s],
                world,
                utils.all_gather_with_grad,
                ddp,
            )
            if rank == 0:
                torch.save({'values': values, 'grads': grads}, os.path.join(out_dir, f'{name}.pt'))
        dist.barrier()  # leave together: a rank tearing gloo down while rank 0 writes can abort
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    for name in DDP_CASES:
        model, cfg, images, caps, cls = _ddp_setup(name)
        values, grads = _loss_and_grads(model, cfg, images, caps, cls, 1, pretrain_DAMSM._identity)
        got = torch.load(tmp_path / f'{name}.pt', weights_only=True)
        assert set(values) == set(got['values']) and len(values) >= 5
        for k, v in values.items():
            assert got['values'][k] == pytest.approx(v, rel=1e-10, abs=1e-12), (name, k)
        assert set(grads) == set(got['grads']) and 'logit_scale' in grads
        # Bound each difference by the model's gradient scale: a parameter whose gradient is zero
        # in exact arithmetic (attention's key bias: softmax ignores a per-row shift) holds only
        # rounding noise, which differs between CPUs and must not set its own bound.
        scale = max(float(g.abs().max()) for g in grads.values())
        for k, g in grads.items():
            assert float((got['grads'][k] - g).abs().max()) <= 1e-9 * scale, (name, k)
            if not k.endswith('k_proj.bias'):
                assert g.abs().max() > 1e-6 * scale, (name, k)


def test_r_precision_feasibility_is_checked_before_training(fixture_data, tmp_path):
    """Too few captions of other classes for EVAL.R_NEG: one line before any step is spent."""
    with pytest.raises(
        utils.UserError, match=r'R-precision on the 6 test images \(EVAL.R_NEG\) needs 50'
    ):
        run_pretrain_damsm(
            os.path.join(ROOT, 'cfg', 'DAMSM', 'shapes.yml'),
            tmp_path / 'r',
            fixture_data,
            'EVAL.R_NEG=50',
        )
    assert not (tmp_path / 'r' / 'checkpoints').exists()


def test_open_clip_flags_as_text2img_writes_them(tmp_path, monkeypatch):
    """text2img's command line for CLIP from scratch, open_clip's flags as written."""
    import pretrain_DAMSM

    args = pretrain_DAMSM.parse_args(
        [
            '--train-data',
            '../train_clean.csv',
            '--val-data',
            '../val_clean.csv',
            '--batch-size',
            '64',
            '--lr',
            '1e-4',
            '--wd',
            '0.1',
            '--epochs',
            '30',
            '--model',
            'RN50',
            '--workers',
            '4',
            '--save-frequency',
            '10',
            '--report-to',
            'tensorboard',
            '--horovod',
        ]
    )
    cfg = utils.build_cfg(pretrain_DAMSM.DEFAULTS, args)
    assert (cfg.DATA.FORMAT, cfg.DATA.TRAIN_CSV, cfg.DATA.VAL_CSV) == (
        'csv',
        '../train_clean.csv',
        '../val_clean.csv',
    )
    assert (
        cfg.TRAIN.BATCH_SIZE,
        cfg.TRAIN.ENCODER_LR,
        cfg.TRAIN.WEIGHT_DECAY,
        cfg.TRAIN.MAX_EPOCH,
    ) == (64, 1e-4, 0.1, 30)
    assert (cfg.WORKERS, cfg.TRAIN.SNAPSHOT_INTERVAL, cfg.MODEL.FAMILY, cfg.TEXT.EMBEDDING_DIM) == (
        4,
        10,
        'clip',
        1024,
    )
    assert cfg.MODEL.CLIP.VISION_LAYERS == [3, 4, 6, 3] and cfg.TREE.BASE_SIZE == 224
    assert len(args.open_clip_notes) == 2 and 'torchrun' in args.open_clip_notes[1]
    # an explicit --set still wins over a flag; an unknown model is one line
    args = pretrain_DAMSM.parse_args(['--lr', '1e-4', '--set', 'TRAIN.ENCODER_LR=0.01'])
    assert utils.build_cfg(pretrain_DAMSM.DEFAULTS, args).TRAIN.ENCODER_LR == 0.01
    with pytest.raises(utils.UserError, match='--model ViT-H-14: expected one of'):
        pretrain_DAMSM.parse_args(['--model', 'ViT-H-14'])


def test_csv_image_paths_resolve_as_open_clip_then_beside_the_csv(tmp_path, monkeypatch):
    (tmp_path / 'data' / 'img').mkdir(parents=True)
    (tmp_path / 'work' / 'img').mkdir(parents=True)
    for folder in ('data', 'work'):
        (tmp_path / folder / 'img' / 'a.jpg').write_bytes(b'x')
    (tmp_path / 'data' / 'img' / 'b.jpg').write_bytes(b'x')
    (tmp_path / 'data' / 'train.csv').write_text(
        'filepath\ttitle\nimg/a.jpg\tone\nimg/b.jpg\ttwo\n'
    )
    monkeypatch.chdir(tmp_path / 'work')
    got = utils.read_csv_pairs(str(tmp_path / 'data' / 'train.csv'))
    assert got == [
        (str(tmp_path / 'work' / 'img' / 'a.jpg'), 'one'),  # from the working directory
        (str(tmp_path / 'data' / 'img' / 'b.jpg'), 'two'),
    ]  # else beside the CSV


def _small_damsm_image(**extra):
    torch.manual_seed(0)
    spec = {
        'family': 'damsm',
        'dim': 8,
        'image_size': 32,
        'backbone': 'small',
        'width': 4,
        'train_backbone': False,
        **extra,
    }
    return models.build_image_encoder(spec).eval()


def test_damsm_image_resize_follows_align_corners():
    """CNN_ENCODER's nn.Upsample to its input size: align_corners=True as DM-GAN's PyTorch 0.3.1
    ran it, False (and for checkpoints without the key) as AttnGAN's code runs today."""
    x = torch.rand(2, 3, 20, 20) * 2 - 1
    for align in (True, False):
        want = torch.nn.functional.interpolate(
            x, size=(32, 32), mode='bilinear', align_corners=align
        )
        torch.testing.assert_close(models._prepare(x, 32, align_corners=align), want)
    seen = []
    old, new = _small_damsm_image(), _small_damsm_image(align_corners=True)
    for enc in (old, new):
        h = enc.to_regions.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        with torch.no_grad():
            enc(x)
        h.remove()
    torch.testing.assert_close(seen[0], models._prepare(x, 32, align_corners=False))
    torch.testing.assert_close(seen[1], models._prepare(x, 32, align_corners=True))
    assert not torch.allclose(seen[0], seen[1])


def test_align_corners_defaults_and_loading(tmp_path, monkeypatch):
    """main.py (DM-GAN cfgs) resizes as DM-GAN's CNN_ENCODER (True), pretrain_DAMSM.py as
    AttnGAN's today (False, written into the spec); the embedded shapes DAMSM cfg keeps False;
    load_encoders / load_dmgan_encoders set it on damsm-family image encoders only."""
    import main

    assert main.DEFAULTS['TRAIN']['NET_E_ALIGN_CORNERS'] is True
    assert pretrain_DAMSM.DEFAULTS['MODEL']['CNN']['ALIGN_CORNERS'] is False
    for name in ('bird_DMGAN.yml', 'coco_DMGAN.yml', 'eval_bird.yml', 'eval_coco.yml'):
        assert (
            'NET_E_ALIGN_CORNERS' not in utils.load_yaml(os.path.join(ROOT, 'cfg', name))['TRAIN']
        )
    for name in ('bird.yml', 'coco.yml'):
        cnn = utils.load_yaml(os.path.join(ROOT, 'cfg', 'DAMSM', name))['MODEL'].get('CNN', {})
        assert 'ALIGN_CORNERS' not in cnn
    shapes = utils.load_yaml(os.path.join(ROOT, 'cfg', 'shapes_DMGAN_DAMSM.yml'))
    assert shapes['TRAIN']['NET_E_ALIGN_CORNERS'] is False
    text = models.build_text_encoder(
        {
            'family': 'damsm',
            'dim': 8,
            'tokenizer': models.tokenizer_spec('words', 6, words=['a', 'b']),
            'word_dim': 4,
            'dropout': 0.0,
        }
    )
    path = save_encoder_pair(tmp_path, text, _small_damsm_image())
    assert 'align_corners' not in models.load_encoders(path)[1].spec  # as saved: False
    for align in (True, False):
        image = models.load_encoders(path, align_corners=align)[1]
        assert image.spec['align_corners'] is align
        cfg = utils.to_cfg(
            {
                'DATA_DIR': '',
                'TEXT': {'EMBEDDING_DIM': 8, 'CAPTIONS_PER_IMAGE': 10},
                'TRAIN': {'NET_E': path, 'NET_E_ALIGN_CORNERS': align},
            }
        )
        assert models.load_dmgan_encoders(cfg, 'cpu')[1].spec['align_corners'] is align


# ----------------------------------------------------------------------------------------------
# Preloaded training images: decoded once, open_clip's random crop done on the batch
# ----------------------------------------------------------------------------------------------
def test_batch_random_resized_crop_draws_as_torchvision_and_resamples_exactly():
    import torchvision.transforms as T
    from PIL import Image

    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    whole = utils.random_resized_crop(x, 16, (1.0, 1.0), (1.0, 1.0))
    assert torch.equal(whole, x.float() / 127.5 - 1)  # the whole image at its size: its pixels
    g = torch.Generator().manual_seed(0)
    boxes = utils.random_resized_crop_boxes(4000, 64, 48, (0.5, 1.0), (3 / 4, 4 / 3), g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 48).all() and (boxes[:, 3] <= 64).all()
    assert (w * h >= 0.5 * 64 * 48 - 64 - 48).all()  # the area share, up to rounding the sides
    torch.manual_seed(0)
    img = Image.new('RGB', (48, 64))
    ref = [T.RandomResizedCrop.get_params(img, (0.5, 1.0), (3 / 4, 4 / 3)) for _ in range(4000)]
    ours = torch.stack([boxes[:, 1], boxes[:, 0], h, w], 1).mean(0)  # top, left, h, w
    theirs = torch.tensor(ref, dtype=torch.float).mean(0)
    assert (ours - theirs).abs().max() < 0.3, (ours, theirs)
    assert (boxes[:, 2] == 48).any() and (boxes[:, 0] == 0).any()  # both ends of the corner draw
    # nothing fits (a 2:1 box of the whole area in a square): torchvision's centre crop
    centre = utils.random_resized_crop_boxes(5, 20, 20, (1.0, 1.0), (2.0, 3.0))
    assert centre.tolist() == [[0.0, 5.0, 20.0, 15.0]] * 5
    # the whole image at half its side: the mean of each 2x2 block (aligned pixel boxes)
    half = utils.random_resized_crop(x, 8, (1.0, 1.0), (1.0, 1.0))
    torch.testing.assert_close(half, F.avg_pool2d(x.float(), 2) / 127.5 - 1)
    out = utils.random_resized_crop(
        torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), 32, (0.9, 1.0)
    )
    assert out.shape == (2, 3, 32, 32) and out.min() >= -1 and out.max() <= 1


def test_preloaded_images_are_decoded_once_shrunk_and_a_bad_file_is_named(tmp_path):
    from PIL import Image

    paths = []
    for i, colour in enumerate(['red', 'blue']):
        p = tmp_path / f'{i}.png'
        Image.new('RGB', (40, 40), colour).save(p)
        paths.append(str(p))
    images, rows = utils.preload_images([paths[0], paths[1], paths[0]], 20)
    assert images.shape == (2, 3, 20, 20) and images.dtype == torch.uint8 and rows == [0, 1, 0]
    assert images[0, 0].float().mean() > 250 and images[1, 2].float().mean() > 250
    assert utils.preload_images(paths, 64)[0].shape == (2, 3, 40, 40)  # never enlarged
    Image.new('RGB', (30, 40)).save(tmp_path / 'odd.png')
    with pytest.raises(utils.UserError, match=r'odd.png is 30x40 px.*square images of one size'):
        utils.preload_images(paths + [str(tmp_path / 'odd.png')], 20)
    (tmp_path / 'bad.png').write_bytes(b'not an image')
    with pytest.raises(utils.UserError, match=r'DATA.PRELOAD: .*bad.png: unreadable'):
        utils.preload_images([str(tmp_path / 'bad.png')], 20)


def test_csv_preload_gives_the_per_image_path_pixels(fixture_data):
    """The same rows through DATA.PRELOAD (decoded at 2x, cropped on the batch) and through
    open_clip's per-image transform, with the crop forced to the whole image: the same picture
    up to the resampling filter."""
    pairs = utils.read_csv_pairs(f'{fixture_data}/train.csv')[:8]
    classes = list(range(len(pairs)))
    plain = pretrain_DAMSM.CSVTrainSet(pairs, classes, 16)
    pre = pretrain_DAMSM.CSVTrainSet(pairs, classes, 16, preload=True)
    item = pre[3]
    assert item['imgs'][0].dtype == torch.uint8 and item['imgs'][0].shape[-1] == 32
    assert item['text'] == plain[3]['text'] == pairs[3][1]
    batch = torch.stack([pre[i]['imgs'][0] for i in range(8)])
    cropped = utils.random_resized_crop(batch, 16, (1.0, 1.0), (1.0, 1.0))
    from torchvision import transforms

    whole = transforms.Compose(
        [
            transforms.Resize((16, 16), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize((0.5,) * 3, (0.5,) * 3),
        ]
    )
    ref = torch.stack([whole(utils.load_image(p)) for p, _ in pairs])
    assert cropped.shape == ref.shape and (cropped - ref).abs().mean() < 0.05


def test_damsm_preload_needs_its_crop_off(fixture_data, tmp_path):
    cfg = os.path.join(ROOT, 'cfg', 'DAMSM', 'shapes.yml')
    for key in ('DATA.CROP', 'DATA.FLIP'):
        with pytest.raises(utils.UserError, match='DATA.PRELOAD needs DATA.CROP and DATA.FLIP'):
            run_pretrain_damsm(cfg, tmp_path / key, fixture_data, f'{key}=true')


@pytest.mark.parametrize('grid', [3, 2])
def test_words_loss_gradients(grid):
    """Both ways to the contexts' norms (built for 9 regions of 8 dimensions, from the Gram
    matrix for 4) differentiate correctly."""
    assert models.gram_pays(grid * grid, 8) == (grid == 2)
    g = torch.Generator().manual_seed(1)
    regions = torch.randn(3, 8, grid, grid, dtype=torch.float64, generator=g, requires_grad=True)
    words = torch.randn(3, 8, 4, dtype=torch.float64, generator=g, requires_grad=True)
    pad = torch.tensor([[False] * 4, [False, False, True, True], [False, False, False, True]])

    def loss(r, w):
        w0, w1, _ = models.words_loss(r, w, pad, None, 4.0, 5.0, 10.0)
        return w0 + w1

    assert torch.autograd.gradcheck(loss, (regions, words))


def test_word_losses_in_float32_under_autocast():
    """bf16 autocast leaves the word losses' own arithmetic in float32."""
    g = torch.Generator().manual_seed(2)
    regions, words = torch.randn(6, 64, 1, 1, generator=g), torch.randn(6, 64, 9, generator=g)
    pad = torch.arange(9)[None] >= torch.tensor([9, 3, 5, 9, 1, 7])[:, None]
    want = models.words_loss(regions, words, pad)[0]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = models.words_loss(regions, words, pad)[0]
        scores = models.word_region_scores(
            regions.view(6, 64, 1).transpose(1, 2), words.transpose(1, 2), pad, 5.0, 5.0
        )
    assert got.dtype == torch.float32 and scores.dtype == torch.float32
    torch.testing.assert_close(got, want)
