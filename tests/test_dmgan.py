"""DM-GAN: parameter-count parity with the original, memory attention, losses."""

import contextlib
import copy
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
import torch
from PIL import Image
from conftest import ROOT, run_in_process, run_python, save_encoder_pair

import main
import models
import utils


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('r_num, expected', [(2, 21_449_042), (3, 22_335_314)])  # DM-GAN's G_NET
def test_generator_parameter_count_equals_original(r_num, expected):
    netG = models.DMGANGenerator(
        gf_dim=64, z_dim=100, cond_dim=100, text_dim=256, branch_num=3, r_num=r_num
    )
    assert n_params(netG) == expected


@pytest.mark.parametrize('size, expected', [(64, 1_887_218), (128, 5_174_258), (256, 18_301_938)])
def test_discriminator_parameter_count_equals_original(size, expected):
    assert n_params(models.DMGANDiscriminator(size, df_dim=32, text_dim=256)) == expected


def test_memory_mask_is_per_sample():
    """Padding words of sample b must get zero attention in sample b only."""
    torch.manual_seed(0)
    mem = models.DynamicMemory(ngf=8, nef=6)
    h, words = torch.randn(3, 8, 4, 4), torch.randn(3, 6, 5)
    pad = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    out, att = mem(h, words, pad)
    assert att.shape == (3, 5, 4, 4)
    torch.testing.assert_close(att.sum(1), torch.ones(3, 4, 4))
    assert (att[pad] == 0).all() and (att[~pad] > 0).all()
    # Each sample alone gives the same result as in the batch (nothing leaks across samples).
    for b in range(3):
        o1, a1 = mem(h[b : b + 1], words[b : b + 1], pad[b : b + 1])
        torch.testing.assert_close(o1[0], out[b])
        torch.testing.assert_close(a1[0], att[b])


def test_generator_and_discriminator_shapes():
    netG = models.DMGANGenerator(gf_dim=4, z_dim=10, cond_dim=6, text_dim=12, branch_num=3, r_num=1)
    imgs, atts, mu, logvar = netG(
        torch.randn(2, 10),
        torch.randn(2, 12),
        torch.randn(2, 12, 7),
        torch.zeros(2, 7, dtype=torch.bool),
    )
    assert [tuple(i.shape) for i in imgs] == [(2, 3, 64, 64), (2, 3, 128, 128), (2, 3, 256, 256)]
    assert [tuple(a.shape) for a in atts] == [(2, 7, 64, 64), (2, 7, 128, 128)]
    assert mu.shape == logvar.shape == (2, 6) and imgs[0].abs().max() <= 1
    for s, im in zip((64, 128, 256), imgs):
        netD = models.DMGANDiscriminator(s, df_dim=4, text_dim=12)
        h = netD(im)
        assert h.shape == (2, 32, 4, 4)
        assert netD.uncond(h).shape == netD.cond(h, torch.randn(2, 12)).shape == (2,)


def test_spectral_norm_has_unit_top_singular_value():
    torch.manual_seed(0)
    sn = models.SpectralNorm(torch.nn.Conv2d(4, 6, 3))
    for _ in range(50):  # power iterations converge during training forwards
        sn(torch.randn(1, 4, 5, 5))
    w = sn.module.weight.detach().reshape(6, -1)
    assert torch.linalg.matrix_norm(w, ord=2).item() == pytest.approx(1.0, rel=1e-3)
    assert not sn.weight_u.requires_grad and sn.weight_bar.requires_grad


def test_spectral_norm_iterates_in_eval_mode_unless_told_not_to():
    """DM-GAN code/spectral.py runs its power iteration on every forward, eval mode too: the
    default (main.py GAN.SN_EVAL_POWER_ITERATION true); false freezes u/v in eval mode."""
    assert main.DEFAULTS['GAN']['SN_EVAL_POWER_ITERATION'] is True
    x = torch.randn(1, 4, 5, 5)
    for flag in (True, False):
        torch.manual_seed(0)
        sn = models.SpectralNorm(torch.nn.Conv2d(4, 6, 3), eval_power_iteration=flag).eval()
        u = sn.weight_u.detach().clone()
        w = sn.weight_bar.detach().reshape(6, -1)
        want_u = torch.nn.functional.normalize(
            w @ torch.nn.functional.normalize(w.t() @ u, dim=0), dim=0
        )
        sn(x)
        torch.testing.assert_close(sn.weight_u, want_u if flag else u, rtol=0, atol=1e-6)
        assert not torch.equal(sn.weight_u, u) if flag else torch.equal(sn.weight_u, u)
    netD = models.DMGANDiscriminator(64, df_dim=2, text_dim=4, sn_eval_power_iteration=False)
    assert all(
        not m.eval_power_iteration for m in netD.modules() if isinstance(m, models.SpectralNorm)
    )
    assert all(
        m.eval_power_iteration
        for m in models.DMGANDiscriminator(64, df_dim=2, text_dim=4).modules()
        if isinstance(m, models.SpectralNorm)
    )


@pytest.mark.slow
@pytest.mark.parametrize('flag', [True, False])
def test_main_hands_sn_eval_power_iteration_to_every_discriminator(
    tiny_shapes, tiny_encoder, tmp_path, monkeypatch, flag
):
    """GAN.SN_EVAL_POWER_ITERATION reaches the spectral norms of every stage's D that main.py
    trains (one step of the embedded cfg)."""
    built = []

    class Spy(models.DMGANDiscriminator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(models, 'DMGANDiscriminator', Spy)
    argv = dmgan_args(
        'shapes_DMGAN.yml',
        tmp_path / 'run',
        tiny_shapes,
        tiny_encoder,
        'TRAIN.BATCH_SIZE=16',
        'TRAIN.MAX_EPOCH=1',
        f'GAN.SN_EVAL_POWER_ITERATION={str(flag).lower()}',
    )[1:]
    run_in_process(main, argv)
    assert json.load(open(tmp_path / 'run' / 'metrics.json'))['train_steps'] >= 1
    assert len(built) == 2  # BRANCH_NUM 2: the 16 and 32 px stages
    norms = [m for d in built for m in d.modules() if isinstance(m, models.SpectralNorm)]
    assert norms and all(m.eval_power_iteration is flag for m in norms)


def test_memory_format_follows_the_device_and_amp():
    """TRAIN.MEMORY_FORMAT auto: channels_last on CUDA or under AMP, contiguous in fp32 on a CPU."""
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    cfg = utils.to_cfg({'MEMORY_FORMAT': 'auto', 'AMP': False})
    assert utils.memory_format(cfg, cpu) == torch.contiguous_format
    assert utils.memory_format(cfg, cuda) == torch.channels_last
    cfg.AMP = True
    assert utils.memory_format(cfg, cpu) == torch.channels_last
    cfg.MEMORY_FORMAT = 'contiguous'
    assert utils.memory_format(cfg, cuda) == torch.contiguous_format
    cfg.MEMORY_FORMAT = 'nhwc'
    with pytest.raises(utils.UserError, match='TRAIN.MEMORY_FORMAT'):
        utils.memory_format(cfg, cpu)


def test_discriminator_loss_matches_hand_computation():
    torch.manual_seed(0)
    netD = models.DMGANDiscriminator(64, df_dim=2, text_dim=4, sn_eval_power_iteration=False)
    real, fake, sent = (
        torch.rand(3, 3, 64, 64) * 2 - 1,
        torch.rand(3, 3, 64, 64) * 2 - 1,
        torch.randn(3, 4),
    )
    for _ in range(30):  # converge the spectral-norm power iteration,
        netD(real)
    netD.eval()  # then freeze it for the comparison
    got = main.discriminator_loss(netD, real, fake, sent)
    sig = torch.sigmoid
    rh, fh = netD(real), netD(fake)

    def bce(p, y):
        return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()

    want = (bce(sig(netD.uncond(rh)), 1) + bce(sig(netD.cond(rh, sent)), 1)) / 2 + (
        bce(sig(netD.uncond(fh)), 0)
        + bce(sig(netD.cond(fh, sent)), 0)
        + bce(sig(netD.cond(rh[:2], sent[1:])), 0)
    ) / 3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_projection_logit_is_psi_plus_the_projected_sentence_inner_product():
    torch.manual_seed(0)
    netD = models.DMGANDiscriminator(
        32, df_dim=2, text_dim=4, sn_eval_power_iteration=False, condition='projection'
    ).eval()
    x, sent = torch.rand(3, 3, 32, 32) * 2 - 1, torch.randn(3, 4)
    h = netD(x)
    head = netD.cond
    w = head.embed.weight_bar / (head.embed.weight_u @ head.embed.weight_bar @ head.embed.weight_v)
    want = head.outlogits(h).view(-1) + ((sent @ w.t()) * h.flatten(1)).sum(1)
    torch.testing.assert_close(head(h, sent), want, rtol=1e-5, atol=1e-4)
    # swapping captions between samples changes only the projection term
    assert not torch.allclose(head(h, sent), head(h, sent.flip(0)))
    with pytest.raises(utils.UserError, match='GAN.D_CONDITION'):
        models.DMGANDiscriminator(32, 2, 4, condition='concatenate')


def test_sentence_contrastive_loss_scores_every_caption_of_the_batch():
    """Image i against caption j is D's conditional logit minus its unconditional part; the loss
    is the cross-entropy of each image over the batch's captions, its own the target, added to
    D's loss on reals and to G's on fakes with TRAIN.SENTENCE_CONTRASTIVE's weight."""
    torch.manual_seed(0)
    netD = models.DMGANDiscriminator(
        32, df_dim=2, text_dim=4, sn_eval_power_iteration=False, condition='projection'
    ).eval()
    real, fake, sent = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32), torch.randn(3, 4)
    h, head = netD(real), netD.cond
    scores = torch.stack(
        [
            torch.stack([head(h[i : i + 1], sent[j : j + 1])[0] for j in range(3)])
            - head.outlogits(h[i : i + 1]).view(())
            for i in range(3)
        ]
    )
    torch.testing.assert_close(head.pair_scores(h, sent), scores, rtol=1e-4, atol=1e-4)
    want = -sum(scores[i, i] - torch.logsumexp(scores[i], 0) for i in range(3)) / 3
    got = models.sentence_contrastive_loss(head, h, sent)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    base = main.discriminator_loss(netD, real, fake, sent, 'hinge')
    with_term = main.discriminator_loss(netD, real, fake, sent, 'hinge', contrastive=0.5)
    torch.testing.assert_close(with_term - base, 0.5 * got, rtol=1e-5, atol=1e-5)
    g_base = main.generator_adv_loss([netD], [fake], sent, 'hinge')
    g_with = main.generator_adv_loss([netD], [fake], sent, 'hinge', contrastive=2.0)
    fake_term = models.sentence_contrastive_loss(head, netD(fake), sent)
    torch.testing.assert_close(g_with - g_base, 2.0 * fake_term, rtol=1e-5, atol=1e-5)
    concat = models.DMGANDiscriminator(32, df_dim=2, text_dim=4)
    with pytest.raises(utils.UserError, match='D_CONDITION projection'):
        models.sentence_contrastive_loss(concat.cond, concat(real), sent)


def test_word_region_contrastive_loss_reads_the_4x4_cells_as_regions():
    """Each cell of D's 4x4 code, through D's spectrally normalised 1x1 map, is one region of
    XMC-GAN's word loss; the term enters D's loss on reals and G's on fakes with
    TRAIN.WORD_CONTRASTIVE.WEIGHT, and a D without the map is an error."""
    torch.manual_seed(0)
    netD = models.DMGANDiscriminator(
        32,
        df_dim=2,
        text_dim=4,
        sn_eval_power_iteration=False,
        condition='projection',
        word_regions=True,
    ).eval()
    real, fake = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32)
    sent, words = torch.randn(3, 4), torch.randn(3, 4, 5)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    h = netD(real)
    conv = netD.word_regions
    w = conv.weight_bar.flatten(1)
    w = w / (conv.weight_u @ w @ conv.weight_v)
    cells = [[h[b, :, y, x] for y in range(4) for x in range(4)] for b in range(3)]
    regions = torch.stack([torch.stack([w @ c + conv.module.bias for c in row]) for row in cells])
    want = models.word_contrastive_loss(regions, words.transpose(1, 2), pad, 5.0, 5.0, 50.0)
    got = models.word_region_contrastive_loss(netD, h, words, pad)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # padded words do not count
    words2 = words.clone()
    words2[1, :, 3:] = torch.randn(4, 2)
    torch.testing.assert_close(models.word_region_contrastive_loss(netD, h, words2, pad), got)
    word_cfg = utils.to_cfg({'WEIGHT': 0.5, 'GAMMA1': 5.0, 'GAMMA2': 5.0, 'GAMMA3': 50.0})
    base = main.discriminator_loss(netD, real, fake, sent, 'hinge')
    with_term = main.discriminator_loss(
        netD, real, fake, sent, 'hinge', words=(words, pad, word_cfg)
    )
    torch.testing.assert_close(with_term - base, 0.5 * got, rtol=1e-4, atol=1e-4)
    g_base = main.generator_adv_loss([netD], [fake], sent, 'hinge')
    g_with = main.generator_adv_loss([netD], [fake], sent, 'hinge', words=(words, pad, word_cfg))
    fake_term = models.word_region_contrastive_loss(netD, netD(fake), words, pad)
    torch.testing.assert_close(g_with - g_base, 0.5 * fake_term, rtol=1e-4, atol=1e-4)
    plain = models.DMGANDiscriminator(32, df_dim=2, text_dim=4, condition='projection')
    with pytest.raises(utils.UserError, match='word_regions'):
        models.word_region_contrastive_loss(plain, plain(real), words, pad)


def test_hinge_terms():
    logits = torch.tensor([-2.0, 0.5, 3.0])
    assert models.gan_d_term(logits, True, 'hinge').item() == pytest.approx((3.0 + 0.5 + 0.0) / 3)
    assert models.gan_d_term(logits, False, 'hinge').item() == pytest.approx((0.0 + 1.5 + 4.0) / 3)
    assert models.gan_g_term(logits, 'hinge').item() == pytest.approx(-0.5)
    assert models.gan_g_term(logits, 'bce').item() == pytest.approx(
        -torch.log(torch.sigmoid(logits)).mean().item()
    )


def test_discriminator_trains_with_two_forwards_per_backward():
    """D sees real and fake before one backward; spectral norm's power iteration runs in both."""
    torch.manual_seed(0)
    netD = models.DMGANDiscriminator(64, df_dim=2, text_dim=4)
    opt = torch.optim.Adam([p for p in netD.parameters() if p.requires_grad])
    real, fake, sent = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64), torch.randn(3, 4)
    for _ in range(2):
        opt.zero_grad()
        main.discriminator_loss(netD, real, fake, sent).backward()
        opt.step()
    assert netD.img_code[0].weight_bar.grad is not None and netD.img_code[0].weight_u.grad is None


def test_kl_loss_and_ema():
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(4.0)]])
    # KL per dim: 0.5 * (sigma^2 + mu^2 - 1 - log sigma^2), mean over dims
    want = (0.5 * (1 + 1 - 1 - 0) + 0.5 * (4 + 0 - 1 - math.log(4.0))) / 2
    assert main.kl_loss(mu, logvar).item() == pytest.approx(want)
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    models.ema_update(a, b, 0.9)
    torch.testing.assert_close(a.weight, 0.9 * before + 0.1 * b.weight)


def test_damsm_term_follows_the_cfg_word_loss_form():
    """main.damsm_loss reads TRAIN.SMOOTH.WORD_LOSS: w0 + w1 + s0 + s1 of that form."""
    torch.manual_seed(0)
    regions, glob = torch.randn(3, 6, 2, 2), torch.randn(3, 6)
    words, sent, pad = torch.randn(3, 6, 4), torch.randn(3, 6), torch.zeros(3, 4, dtype=torch.bool)

    class Encoder:
        @staticmethod
        def encode(fake):
            return regions, glob

    got = {}
    for form in models.WORD_LOSS_FORMS:
        smooth = utils.to_cfg({**main.DEFAULTS['TRAIN']['SMOOTH'], 'WORD_LOSS': form})
        got[form], _ = main.damsm_loss(Encoder, None, words, sent, pad, None, smooth)
        w0, w1, _ = models.words_loss(regions, words, pad, None, 5.0, 5.0, 10.0, form)
        s0, s1 = models.sent_loss(glob, sent, None, 10.0)
        assert got[form].item() == pytest.approx((w0 + w1 + s0 + s1).item(), rel=1e-6)
    assert main.DEFAULTS['TRAIN']['SMOOTH']['WORD_LOSS'] == 'attngan'
    assert got['attngan'].item() != pytest.approx(got['t2i_clip_gan'].item(), rel=1e-3)


def tiny_step(amp_dtype, contrastive):
    """main.train_step on tiny random networks (2 stages, 32 -> 64 px) and a small image encoder."""
    torch.manual_seed(0)
    train_cfg = utils.to_cfg(main.DEFAULTS['TRAIN'])
    netG = models.DMGANGenerator(
        gf_dim=4, z_dim=8, cond_dim=6, text_dim=12, branch_num=2, r_num=1, base_size=32
    )
    Ds = [models.DMGANDiscriminator(s, df_dim=4, text_dim=12) for s in (32, 64)]
    netG.apply(models.init_weights)
    for d in Ds:
        d.apply(models.init_weights)
    enc = (
        models.build_image_encoder(
            {
                'family': 'damsm',
                'dim': 12,
                'image_size': 64,
                'backbone': 'small',
                'width': 4,
                'train_backbone': False,
            }
        )
        .eval()
        .requires_grad_(False)
    )
    optG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optsD = [torch.optim.Adam([p for p in d.parameters() if p.requires_grad], lr=2e-4) for d in Ds]
    B = 6
    reals = [torch.rand(B, 3, s, s) * 2 - 1 for s in (32, 64)]
    feats = [
        (torch.randn(B, 12, 5), torch.randn(B, 12), torch.zeros(B, 5, dtype=torch.bool))
        for _ in range(2 if contrastive else 1)
    ]
    amp = torch.autocast('cpu', dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    return main.train_step(
        netG,
        Ds,
        optG,
        optsD,
        enc,
        reals,
        torch.arange(B),
        feats,
        torch.randn(B, 8),
        train_cfg,
        amp,
        0,
    )


def test_generator_step_leaves_the_discriminators_gradients_alone():
    """G's step reads the Ds with their weights frozen: the gradients the D step left are
    untouched (DM-GAN computes D gradients there and discards them), and every D weight is
    trainable again afterwards."""
    torch.manual_seed(0)
    netG = models.DMGANGenerator(
        gf_dim=4, z_dim=8, cond_dim=6, text_dim=12, branch_num=2, r_num=1, base_size=16
    )
    Ds = [models.DMGANDiscriminator(s, df_dim=4, text_dim=12) for s in (16, 32)]
    optG = torch.optim.Adam(netG.parameters())
    left_by_d_step = []

    class Record(torch.optim.SGD):
        def step(self, closure=None):
            left_by_d_step.append([p.grad.clone() for p in self.param_groups[0]['params']])

    optsD = [Record([p for p in d.parameters() if p.requires_grad], lr=0.0) for d in Ds]
    train_cfg = utils.to_cfg({**main.DEFAULTS['TRAIN'], 'SMOOTH': {'LAMBDA': 0.0}})
    B = 4
    main.train_step(
        netG,
        Ds,
        optG,
        optsD,
        None,
        [torch.rand(B, 3, s, s) * 2 - 1 for s in (16, 32)],
        torch.arange(B),
        [(torch.randn(B, 12, 5), torch.randn(B, 12), torch.zeros(B, 5, dtype=torch.bool))],
        torch.randn(B, 8),
        train_cfg,
        torch.autocast('cpu', enabled=False),
        0,
    )
    for opt, grads in zip(optsD, left_by_d_step):
        for p, g in zip(opt.param_groups[0]['params'], grads):
            assert p.requires_grad and torch.equal(p.grad, g)
    assert all(p.grad is not None for p in netG.parameters())


@pytest.mark.slow
@pytest.mark.parametrize('contrastive', [False, True])
def test_bf16_autocast_step_matches_fp32(contrastive):
    """TRAIN.AMP (bf16 autocast) computes the same losses as fp32 up to bf16 rounding."""
    full, half = tiny_step(None, contrastive), tiny_step(torch.bfloat16, contrastive)
    assert half['loss_G'] != full['loss_G']  # bf16 arithmetic did run
    for k in ('loss_D', 'loss_G', 'damsm'):
        assert math.isfinite(half[k]) and half[k] == pytest.approx(full[k], rel=0.03), k


# ---------------------------------------------------------------- the script, end to end
@pytest.fixture(scope='module')
def tiny_rnn_encoder(tmp_path_factory, tiny_vocabulary):
    """A random-init DAMSM pair (bi-LSTM + small CNN) over AttnGAN's vocabulary of the tiny data."""
    torch.manual_seed(0)
    tok = models.tokenizer_spec('attngan', 18, words=tiny_vocabulary)
    text = models.build_text_encoder(
        {'family': 'damsm', 'dim': 16, 'tokenizer': tok, 'word_dim': 8, 'dropout': 0.5}
    )
    image = models.build_image_encoder(
        {
            'family': 'damsm',
            'dim': 16,
            'image_size': 32,
            'backbone': 'small',
            'width': 4,
            'train_backbone': True,
        }
    )
    return save_encoder_pair(tmp_path_factory.mktemp('rnn_enc'), text, image)


@pytest.mark.parametrize('which', ['tiny_encoder', 'tiny_rnn_encoder'])
def test_cached_text_features_are_what_the_encoder_gives(which, request):
    """TRAIN.CACHE_TEXT_FEATURES: the words of each caption up to the batch's longest, its
    sentence and its padding are encode_text's, so a memory stage reads the same."""
    text_enc, _ = models.load_encoders(request.getfixturevalue(which))
    texts = ['a red circle.', 'a small blue square at the top left.', 'a red circle.', 'green']
    cache = models.TextFeatureCache(
        text_enc, texts + ['a large red star in the middle of it.'], 'cpu'
    )
    assert len(cache.index) == 4
    words, sent, pad = cache(texts)
    ref_words, ref_sent, ref_pad = models.encode_text(text_enc, texts, 'cpu')
    width = pad.shape[1]
    assert width == int((~ref_pad).sum(1).max()) and not ref_pad[:, :width].logical_xor(pad).any()
    assert not ref_pad[:, width:].logical_not().any()  # what was cut is padding
    torch.testing.assert_close(sent, ref_sent)
    keep = (~pad)[:, None].expand_as(words)
    torch.testing.assert_close(words[keep], ref_words[:, :, :width][keep])
    torch.manual_seed(0)
    memory = models.DynamicMemory(8, words.shape[1]).eval()
    h = torch.randn(len(texts), 8, 4, 4)
    torch.testing.assert_close(memory(h, words, pad)[0], memory(h, ref_words, ref_pad)[0])


@pytest.mark.slow
def test_train_then_evaluate_on_the_damsm_rnn_encoder(tiny_shapes, tiny_rnn_encoder, tmp_path):
    """The original DM-GAN's conditioning: the DAMSM bi-LSTM words/sentence, the CNN's regions.
    The evaluation builds the generator the checkpoint trained (here two residual blocks where
    its cfg says one) and logs the difference."""
    run_ok(
        dmgan_args(
            'shapes_DMGAN.yml',
            tmp_path / 'train',
            tiny_shapes,
            tiny_rnn_encoder,
            'TRAIN.BATCH_SIZE=4',
            'TRAIN.MAX_EPOCH=1',
            'TRAIN.CONTRASTIVE.ENABLE=false',
            'GAN.R_NUM=2',
        )
    )
    assert json.load(open(tmp_path / 'train' / 'metrics.json'))['train_steps'] == 10
    run_ok(
        dmgan_args(
            'shapes_DMGAN.yml',
            tmp_path / 'eval',
            tiny_shapes,
            tiny_rnn_encoder,
            'TRAIN.FLAG=false',
            f'TRAIN.NET_G={tmp_path / "train"}',
            'EVAL.NUM_IMAGES=12',
            'EVAL.BATCH_SIZE=5',
            'EVAL.R_NEG=5',
            'EVAL.R_FOLDS=2',
        )
    )
    m = json.load(open(tmp_path / 'eval' / 'metrics.json'))
    assert m['num_images'] == 12 and 0 <= m['r_precision'] <= 1
    assert (
        len([f for f in os.listdir(tmp_path / 'eval' / 'valid' / 'single') if f.endswith('.png')])
        == 12
    )
    assert 'GAN.R_NUM: 2 as' in open(tmp_path / 'eval' / 'log.txt').read()
    assert yaml.safe_load(open(tmp_path / 'eval' / 'cfg.yml'))['GAN']['R_NUM'] == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    'cfg, encoder',
    [
        ('bird_DMGAN.yml', 'tiny_rnn_encoder'),
        ('coco_DMGAN.yml', 'tiny_rnn_encoder'),
        ('clip_bird_DMGAN.yml', 'tiny_encoder'),
        ('clip_coco_DMGAN.yml', 'tiny_encoder'),
    ],
)
def test_real_cfgs_train_on_attngans_own_metadata(cfg, encoder, fixture_data, tmp_path, request):
    """Each bird/coco cfg (its three stages to 256 px, flips, crops, DataLoader workers) trains on
    a layout whose filenames.pickle / class_info.pickle have the bytes of AttnGAN's files, as a
    CRLF checkout of them; only the widths shrink."""
    argv = dmgan_args(
        cfg,
        tmp_path / 'run',
        fixture_data,
        request.getfixturevalue(encoder),
        'TEXT.CAPTIONS_PER_IMAGE=10',
        'TRAIN.BATCH_SIZE=8',
        'TRAIN.MAX_EPOCH=1',
        'WORKERS=1',
    )
    run_in_process(main, argv[1:] + ['--gpu', '-1'])
    m = json.load(open(tmp_path / 'run' / 'metrics.json'))
    assert m['train_steps'] == 1 and math.isfinite(m['final_loss_G'])
    ckpt = utils.load_checkpoint(m['checkpoint'], 'dmgan')
    assert sorted(k for k in ckpt['models'] if k.startswith('D')) == ['D0', 'D1', 'D2']


def dmgan_args(cfg, out, data, enc, *sets):
    """main.py and its flags for a tiny DM-GAN run."""
    argv = [
        os.path.join(ROOT, 'main.py'),
        '--cfg',
        os.path.join(ROOT, 'cfg', cfg),
        '--out',
        str(out),
        '--deterministic',
        '--set',
        f'DATA_DIR={data}',
        '--set',
        f'TRAIN.NET_E={enc}',
        '--set',
        'WORKERS=0',
        '--set',
        'GAN.GF_DIM=2',
        '--set',
        'GAN.DF_DIM=2',
        '--set',
        'GAN.Z_DIM=8',
        '--set',
        'GAN.CONDITION_DIM=8',
        '--set',
        'TEXT.EMBEDDING_DIM=16',
    ]
    for s in sets:
        argv += ['--set', s]
    return argv


def run_ok(argv):
    r = run_python(*argv)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow
@pytest.mark.parametrize('contrastive', [True, False])
def test_train_then_evaluate(tiny_shapes, tiny_encoder, tiny_judge, tmp_path, contrastive):
    train_sets = [
        'TRAIN.BATCH_SIZE=4',
        'TRAIN.MAX_EPOCH=1',
        f'TRAIN.CONTRASTIVE.ENABLE={str(contrastive).lower()}',
    ]
    run_ok(
        dmgan_args('shapes_DMGAN.yml', tmp_path / 'train', tiny_shapes, tiny_encoder, *train_sets)
    )
    m = json.load(open(tmp_path / 'train' / 'metrics.json'))
    assert m['train_steps'] == 10 and m['checkpoint'].endswith('dmgan_00000010.pt')
    assert os.listdir(tmp_path / 'train' / 'tb')  # TensorBoard events written
    run_ok(
        dmgan_args(
            'shapes_DMGAN.yml',
            tmp_path / 'eval',
            tiny_shapes,
            tiny_encoder,
            'TRAIN.FLAG=false',
            f'TRAIN.NET_G={tmp_path / "train"}',
            'EVAL.NUM_IMAGES=30',
            'EVAL.BATCH_SIZE=7',
            'EVAL.R_NEG=5',
            'EVAL.R_FOLDS=3',
            'EVAL.BASELINE=true',
            f'EVAL.JUDGE={tiny_judge}',
        )
    )
    m = json.load(open(tmp_path / 'eval' / 'metrics.json'))
    out = tmp_path / 'eval' / 'valid' / 'single'
    pngs = sorted(f for f in os.listdir(out) if f.endswith('.png'))
    records = json.load(open(out / 'captions.json'))
    assert m['num_images'] == len(pngs) == len(records) == 30  # 20 test images, then 10 of pass 2
    assert sorted(r['file'] for r in records) == pngs
    grid = Image.open(out.parent / 'grid.png')  # 10 real test images above their generated ones
    assert grid.size == (10 * 34 + 2, 2 * 34 + 2)
    assert (out.parent / 'grid.txt').read_text().splitlines()[0] == f"1. {records[0]['caption']}"
    assert 0 <= m['r_precision'] <= 1 and 0 <= m['untrained_r_precision'] <= 1
    for prefix in ('judge_', 'untrained_judge_', 'real_judge_', 'wrong_caption_judge_'):
        for attr in ('shape', 'colour', 'size', 'position', 'all'):
            assert 0 <= m[prefix + attr] <= 1, prefix + attr

    assert Image.open(out / pngs[0]).size == (32, 32)
    # one judge line per image; the breakdown and the shuffled-caption baseline beside the scores
    lines = [json.loads(x) for x in open(tmp_path / 'eval' / 'judge.jsonl')]
    assert [x['file'] for x in lines] == [r['file'] for r in records]
    assert all(set(x) == {'file', 'caption', 'key', 'category', 'correct', 'reason'} for x in lines)
    assert m['judge_all'] == pytest.approx(sum(x['correct'] for x in lines) / 30)
    assert 'judge_breakdown_counting' in m and 0 <= m['shuffled_judge_colour'] <= 1
    # every scored result carries its protocol: the weights files used, with their sha256
    gen = m['protocol']['weights']['generator']
    assert gen['path'].endswith('dmgan_00000010.pt') and gen['sha256'] == sha256_of(gen['path'])
    assert m['protocol']['num_images'] == 30 and m['protocol']['split'] == 'test'
    assert (
        'generator' not in m['untrained_protocol']['weights']
        and m['real_protocol']['num_images'] == 20
    )
    judge_file = os.path.join(tiny_judge, 'checkpoints', 'judge_final.pt')
    assert m['wrong_caption_protocol']['weights']['judge'] == {
        'path': judge_file,
        'sha256': sha256_of(judge_file),
    }
    # keys.json lets train_judge.py score the dumped files: the same verdicts up to PNG rounding
    r = run_python('train_judge.py', '--score', out, '--judge', tiny_judge)
    assert r.returncode == 0, r.stderr[-2000:]
    acc = dict(zip(*[iter(r.stdout.split('attribute accuracy:')[1].split())] * 2))
    assert abs(float(acc['colour']) - m['judge_colour']) < 0.05


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tiny_shapes, tiny_encoder, tmp_path):
    sets = [
        'TRAIN.BATCH_SIZE=8',
        'TRAIN.MAX_EPOCH=3',
        'TRAIN.SNAPSHOT_INTERVAL=1',
        'TRAIN.CONTRASTIVE.ENABLE=false',
    ]
    run_ok(dmgan_args('shapes_DMGAN.yml', tmp_path / 'straight', tiny_shapes, tiny_encoder, *sets))
    straight = json.load(open(tmp_path / 'straight' / 'metrics.json'))
    argv = dmgan_args('shapes_DMGAN.yml', tmp_path / 'killed', tiny_shapes, tiny_encoder, *sets)
    p = subprocess.Popen(
        [sys.executable, *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ck = tmp_path / 'killed' / 'checkpoints'
    while p.poll() is None and not (
        ck.is_dir() and any(f.startswith('dmgan_') and f.endswith('.pt') for f in os.listdir(ck))
    ):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)  # killed after the first checkpoint, before the last
    p.wait()
    assert not (tmp_path / 'killed' / 'metrics.json').exists()
    run_ok(argv + ['--resume', 'auto'])
    resumed = json.load(open(tmp_path / 'killed' / 'metrics.json'))
    for k in ('train_steps', 'final_loss_D', 'final_loss_G', 'final_damsm'):
        assert resumed[k] == straight[k], k


@pytest.mark.slow
def test_learning_curve_over_the_checkpoints(tiny_shapes, tiny_encoder, tiny_judge, tmp_path):
    run_ok(
        dmgan_args(
            'shapes_DMGAN.yml',
            tmp_path / 'train',
            tiny_shapes,
            tiny_encoder,
            'TRAIN.BATCH_SIZE=8',
            'TRAIN.MAX_EPOCH=2',
            'TRAIN.SNAPSHOT_INTERVAL=1',
            'TRAIN.KEEP_CHECKPOINTS=0',
        )
    )
    run_ok(
        dmgan_args(
            'shapes_DMGAN.yml',
            tmp_path / 'eval',
            tiny_shapes,
            tiny_encoder,
            'TRAIN.FLAG=false',
            f'TRAIN.NET_G={tmp_path / "train"}',
            'EVAL.NUM_IMAGES=10',
            'EVAL.R_NEG=5',
            'EVAL.R_FOLDS=2',
            f'EVAL.JUDGE={tiny_judge}',
            'EVAL.CURVE=true',
        )
    )
    curve = json.load(open(tmp_path / 'eval' / 'curve.json'))
    assert [c['step'] for c in curve] == [5, 10] and curve[0]['train_seconds'] < curve[1][
        'train_seconds'
    ]
    final = json.load(open(tmp_path / 'eval' / 'metrics.json'))
    assert (
        curve[-1]['judge_all'] == final['judge_all']
        and curve[-1]['r_precision'] == final['r_precision']
    )

    assert Image.open(tmp_path / 'eval' / 'curve.png').size == (640, 400)


@pytest.mark.slow
def test_eval_refuses_wrong_checkpoint_kind(tiny_shapes, tiny_encoder, tmp_path):
    r = run_python(
        *dmgan_args(
            'shapes_DMGAN.yml',
            tmp_path / 'e',
            tiny_shapes,
            tiny_encoder,
            'TRAIN.FLAG=false',
            f'TRAIN.NET_G={tiny_encoder}',
        )
    )
    assert r.returncode == 2 and "kind 'text_encoder', expected 'dmgan'" in r.stderr


def sha256_of(path):
    import hashlib

    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_dmgan_and_dalle_score_through_the_one_path_as_directly(
    tiny_shapes, tiny_encoder, tiny_judge, tmp_path
):
    """The same fake images through DM-GAN's and DALLE's metric plug-ins (utils.evaluate_generator)
    get the numbers of utils.judge_accuracy and utils.r_precision called directly on them, and a
    protocol naming the weights files with their sha256."""
    import train_dalle

    text_enc, image_enc = models.load_encoders(tiny_encoder)
    judge = models.load_judge(tiny_judge)
    g = torch.Generator().manual_seed(0)
    # values a PNG holds exactly, so DM-GAN's uint8 storage gives the judge the very same images
    fakes = torch.randint(0, 256, (30, 3, 32, 32), generator=g).float() / 127.5 - 1
    assert torch.equal(utils.to_uint8(fakes).float() / 127.5 - 1, fakes)

    def through(records, plugins, batch_size, weights, **kw):
        drawn = []

        def sampler(batch):
            drawn.append(len(batch))
            return fakes[sum(drawn) - len(batch) : sum(drawn)]

        return utils.evaluate_generator(
            sampler, records, plugins, batch_size, 'test', 7, weights, 32, **kw
        )

    def direct(records, wrong, n_neg, folds, seed):
        keys, n = [r['key'] for r in records], len(records)
        img, txt = utils.encode_pairs(
            image_enc, text_enc, fakes[:n], [r['caption'] for r in records]
        )
        mean, std = utils.r_precision(
            img, txt, [r['class'] for r in records], n_neg=n_neg, folds=folds, seed=seed
        )
        return {
            **{f'judge_{k}': v for k, v in utils.judge_accuracy(judge, fakes[:n], keys).items()},
            **{
                f'shuffled_judge_{k}': v
                for k, v in utils.judge_accuracy(judge, fakes[:n], wrong(keys)).items()
            },
            'r_precision': mean,
            'r_precision_std': std,
        }, utils.clip_score(img, txt)

    # DM-GAN: two passes over the 20 test images, batches restarting at each pass; the image dump
    cfg = utils.to_cfg(main.DEFAULTS)
    cfg.DATA_DIR, cfg.EVAL.NUM_IMAGES, cfg.EVAL.R_NEG, cfg.EVAL.R_FOLDS = tiny_shapes, 30, 5, 3
    cfg.TREE.update(BASE_SIZE=32, BRANCH_NUM=1)
    records = main.eval_records(cfg, main.build_dataset(cfg, 'test', train=False))
    weights = main.weights_files(None, text_enc, image_enc, judge)
    got = through(
        records,
        main.metric_plugins(cfg.EVAL, text_enc, image_enc, judge, str(tmp_path / 'dump')),
        7,
        weights,
        per_pass=True,
    )
    want, clip = direct(
        records,
        lambda keys: [keys[j] for j in utils.derangement(len(keys), cfg.EVAL.SEED)],
        5,
        3,
        cfg.EVAL.SEED,
    )
    assert {k: got[k] for k in want} == want and got['clip_score'] == pytest.approx(clip)
    assert 'judge_breakdown_counting' in got and all(
        'correct' in r and 'reason' in r for r in records
    )
    dumped = json.load(open(tmp_path / 'dump' / 'keys.json'))
    assert (
        dumped == {r['file']: r['key'] for r in records}
        and len(list((tmp_path / 'dump').glob('*.png'))) == 30
    )
    # DALLE: the held-out captions, image i against caption i + 1 for the shuffled baseline
    eval_cfg = utils.to_cfg(
        {
            **train_dalle.DEFAULTS['EVAL'],
            'HOLDOUT': os.path.join(tiny_shapes, 'test.jsonl'),
            'NUM_CAPTIONS': 30,
        }
    )
    records = train_dalle.holdout_records(eval_cfg)
    got = through(
        records,
        train_dalle.metric_plugins(judge, (text_enc, image_enc), 5),
        train_dalle.SAMPLE_BATCH,
        {'judge': judge.weights_path},
    )
    want, clip = direct(records, lambda keys: keys[1:] + keys[:1], 5, 10, 0)
    assert {k: got[k] for k in want} == want and got['clip_score'] == pytest.approx(clip)
    # the protocol: what was scored, and the sha256 of each weights file
    p = through(records, [utils.JudgeAccuracy(judge)], 8, weights)['protocol']
    assert {k: p[k] for k in ('split', 'num_images', 'seed', 'image_size')} == {
        'split': 'test',
        'num_images': len(records),
        'seed': 7,
        'image_size': 32,
    }
    assert p['weights'] == {
        name: {'path': path, 'sha256': sha256_of(path)}
        for name, path in (
            ('judge', judge.weights_path),
            ('text_encoder', tiny_encoder),
            ('image_encoder', tiny_encoder.replace('text_encoder', 'image_encoder')),
        )
    }


def test_fine_tuning_from_released_ds_leaves_the_word_head_new(tmp_path, monkeypatch):
    """The original D_NET state dicts have no word-region head: with TRAIN.WORD_CONTRASTIVE the
    rest loads strictly and the head keeps its initialisation; any other gap is an error."""
    torch.manual_seed(0)
    released = models.DMGANDiscriminator(32, df_dim=2, text_dim=4)
    torch.save(released.state_dict(), tmp_path / 'netD0.pth')
    netG = torch.nn.Linear(2, 2)
    monkeypatch.setattr(models, 'dmgan_generator_state', lambda path, dev: netG.state_dict())
    netD = models.DMGANDiscriminator(32, df_dim=2, text_dim=4, word_regions=True)
    head = copy.deepcopy(netD.word_regions.state_dict())
    log = logging.getLogger('test')
    main.init_from_released(
        str(tmp_path / 'netG.pth'), netG, copy.deepcopy(netG), [netD], 'cpu', log
    )
    got = netD.state_dict()
    assert all(torch.equal(got[k], v) for k, v in released.state_dict().items())
    assert all(torch.equal(netD.word_regions.state_dict()[k], v) for k, v in head.items())
    state = released.state_dict()
    state['stray.weight'] = torch.zeros(1)
    torch.save(state, tmp_path / 'netD0.pth')
    with pytest.raises(utils.UserError, match='netD0.pth: does not match D0'):
        main.init_from_released(
            str(tmp_path / 'netG.pth'), netG, copy.deepcopy(netG), [netD], 'cpu', log
        )


@pytest.mark.slow
def test_torchrun_two_processes_trains_with_the_contrastive_terms(
    tiny_shapes, tiny_encoder, tmp_path
):
    """torchrun, 2 CPU processes (gloo): the discriminators' heads, the word-region one
    included, are reached through the DDP wrapper; rank 0 writes the checkpoint."""
    argv = dmgan_args(
        'shapes_DMGAN.yml',
        tmp_path / 'run',
        tiny_shapes,
        tiny_encoder,
        'TRAIN.BATCH_SIZE=4',
        'TRAIN.MAX_EPOCH=1',
        'TRAIN.SNAPSHOT_INTERVAL=1',
        'TRAIN.SENTENCE_CONTRASTIVE=1.0',
        'TRAIN.WORD_CONTRASTIVE.WEIGHT=1.0',
    )
    r = run_python(
        '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *argv, timeout=600
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (ckpt,) = utils.list_checkpoints(str(tmp_path / 'run'), 'dmgan')
    state = utils.load_checkpoint(ckpt, 'dmgan')['models']['D1']
    assert 'word_regions.weight_bar' in state


def test_speed_bench_builds_the_cfgs_discriminators(monkeypatch):
    """bench/dmgan.py times the step of the cfg it is given: for the embedded cfg, projection Ds
    with word regions, which its word-region term trains."""
    import importlib.util

    monkeypatch.syspath_prepend(os.path.join(ROOT, 'bench'))
    spec = importlib.util.spec_from_file_location(
        'bench_dmgan', os.path.join(ROOT, 'bench', 'dmgan.py')
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = bench.load_cfg(os.path.join(ROOT, 'cfg', 'shapes_DMGAN.yml'))
    cfg.TRAIN.BATCH_SIZE = 4
    built, real_build = [], models.build_dmgan_discriminators
    monkeypatch.setattr(
        models, 'build_dmgan_discriminators', lambda *a: built.extend(real_build(*a)) or built
    )
    x = bench.adversarial_inputs(cfg, torch.device('cpu'))
    step = bench.build(cfg, torch.device('cpu'), torch.contiguous_format, x, damsm=False)
    before = [d.word_regions.weight_bar.detach().clone() for d in built]
    step(contextlib.nullcontext(), 0)
    for d, old in zip(built, before):
        assert isinstance(d.cond, models.ProjectionLogits)
        assert not torch.equal(d.word_regions.weight_bar, old)
