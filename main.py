"""DM-GAN (Zhu et al., CVPR 2019) conditioned on a DAMSM or CLIP text encoder
(T2I_CLIP-GAN / DM-GAN+CL), training and evaluation.

  python main.py --cfg cfg/clip_bird_DMGAN.yml --gpu 0        # train (TRAIN.FLAG: true)
  python main.py --cfg cfg/eval_clip_bird.yml --gpu 0         # generate + R-precision (TRAIN.FLAG: false)
  torchrun --nproc_per_node=N main.py --cfg ...              # data-parallel
"""

import contextlib
import copy
import functools
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
import utils

DEFAULTS = {
    'MODEL': 'DMGAN',
    'DATA_DIR': 'data/birds',
    'WORKERS': 4,
    'TREE': {'BRANCH_NUM': 3, 'BASE_SIZE': 64},
    'DATA': {
        'FLIP': True,
        'CROP': True,  # AttnGAN's training flips and 76/64 resize + crop
        'PRELOAD': False,
    },  # decode the training images once into memory (needs no FLIP/CROP)
    'TRAIN': {
        'FLAG': True,  # false: evaluate NET_G
        'NET_G': '',  # generator to evaluate, or to fine-tune from (with netD<i>.pth beside it)
        'NET_E': '',  # .../text_encoder<N>.pth from pretrain_DAMSM.py
        # resize of a damsm-family image encoder's input to 299 px (other families keep theirs):
        # DM-GAN code/model.py CNN_ENCODER's nn.Upsample, align_corners=True in PyTorch <= 0.3.1
        'NET_E_ALIGN_CORNERS': True,
        'BATCH_SIZE': 64,
        'MAX_EPOCH': 600,
        'SNAPSHOT_INTERVAL': 2000,  # epochs between checkpoints
        'DISCRIMINATOR_LR': 2e-4,
        'GENERATOR_LR': 2e-4,
        'EMA_DECAY': 0.999,
        # weight of the conditioning augmentation's KL term: DM-GAN code/trainer.py adds
        # KL_loss unweighted (StackGAN's cfg names it TRAIN.COEFF.KL)
        'KL_WEIGHT': 1.0,
        'AMP': False,  # bf16 autocast
        # adversarial terms (models.gan_d_term): bce (DM-GAN code/miscc/losses.py) | hinge
        'GAN_LOSS': 'bce',
        # weight of XMC-GAN's sentence contrastive loss scored by the projection D's conditional
        # logit, on reals in D's loss and on fakes in G's (models.sentence_contrastive_loss);
        # 0: DM-GAN's single mismatched pair only
        'SENTENCE_CONTRASTIVE': 0.0,
        # weight of XMC-GAN's word-region contrastive loss (Eq. 3-5, its gammas: coco_xmc.py) on
        # D's 4x4 code, on reals in D's loss and on fakes in G's
        # (models.word_region_contrastive_loss); 0: off
        'WORD_CONTRASTIVE': {'WEIGHT': 0.0, 'GAMMA1': 5.0, 'GAMMA2': 5.0, 'GAMMA3': 50.0},
        # layout of G, the Ds and the real images: channels_last | contiguous | auto (channels_last
        # on CUDA or under AMP: tensor cores, oneDNN's bf16 kernels; in fp32 on a CPU the step at
        # the bird cfg ran 1.47x slower in it, bench/dmgan.py --original)
        'MEMORY_FORMAT': 'auto',
        # encode every training caption once with the frozen text encoder (the original encodes
        # each batch); for small caption sets that fit in memory, where the encoder is a large
        # part of the step
        'CACHE_TEXT_FEATURES': False,
        'KEEP_CHECKPOINTS': 3,
        'LOG_EVERY': 50,
        'SMOOTH': {
            'GAMMA1': 5.0,
            'GAMMA2': 5.0,
            'GAMMA3': 10.0,
            'LAMBDA': 1.0,
            'WORD_LOSS': 'attngan',  # models.words_loss form: attngan | t2i_clip_gan
        },
        'CONTRASTIVE': {'ENABLE': False, 'TEMPERATURE': 0.5, 'WEIGHT': 0.2},
    },
    'GAN': {
        'DF_DIM': 64,
        'GF_DIM': 128,
        'Z_DIM': 100,
        'CONDITION_DIM': 100,
        'R_NUM': 2,
        # DM-GAN code/spectral.py iterates u/v on every forward, eval mode too; false: not in eval
        'SN_EVAL_POWER_ITERATION': True,
        # the Ds' conditional logit: concat (DM-GAN D_GET_LOGITS) | projection (Miyato & Koyama)
        'D_CONDITION': 'concat',
    },
    # The word limit is the text encoder's own (its tokenizer's context length); WORDS_NUM
    # sets it for AttnGAN's released encoders, which carry none.
    'TEXT': {
        'EMBEDDING_DIM': 256,
        'CAPTIONS_PER_IMAGE': 10,
        'WORDS_NUM': models.ATTNGAN_WORDS_NUM,
    },  # AttnGAN's released DAMSM encoders only (config.py default)
    'EVAL': {
        'NUM_IMAGES': 30000,  # DM-GAN: one image per caption, up to 30,000
        'MAX_PASSES': 11,  # passes over the test set
        'BATCH_SIZE': 10,
        'R_NEG': 99,  # R-precision: true caption + 99 of other classes
        'R_FOLDS': 10,
        'SEED': 100,
        'JUDGE': '',  # shapes judge checkpoint: attribute accuracy
        'BASELINE': False,  # also score an untrained generator on the same captions
        'CURVE': False,  # NET_G a run dir: also score each of its checkpoints (learning curve)
    },
}


# ----------------------------------------------------------------------------
# Data and initialisation (the encoders and generator load through models.py, DM-GAN section)
# ----------------------------------------------------------------------------
def build_dataset(cfg, split, train, two_captions=False):
    data = utils.AttnGANData(cfg.DATA_DIR, cfg.TEXT.CAPTIONS_PER_IMAGE)
    return utils.TextImageDataset(
        data,
        split,
        base_size=cfg.TREE.BASE_SIZE,
        branch_num=cfg.TREE.BRANCH_NUM,
        train=train,
        two_captions=two_captions,
        flip=cfg.DATA.FLIP,
        crop=cfg.DATA.CROP,
        preload=cfg.DATA.PRELOAD and train,
    )


# ----------------------------------------------------------------------------
# Losses (DM-GAN code/miscc/losses.py; T2I_CLIP-GAN trainer.py)
# ----------------------------------------------------------------------------
def word_term(netD, h, words, pad, word_cfg):
    """TRAIN.WORD_CONTRASTIVE's weighted word-region contrastive loss on D's code h."""
    return word_cfg.WEIGHT * models.word_region_contrastive_loss(
        netD, h, words, pad, word_cfg.GAMMA1, word_cfg.GAMMA2, word_cfg.GAMMA3
    )


def discriminator_loss(netD, real, fake, sent, form='bce', contrastive=0.0, words=None):
    """(uncond_real + cond_real)/2 + (uncond_fake + cond_fake + cond_wrong)/3, the wrong
    pair being real image i with caption i+1 (AttnGAN Eq. 4 with its mismatched term); with
    `contrastive`, plus that weight of the sentence contrastive loss on the real images; with
    `words` (words, pad mask, TRAIN.WORD_CONTRASTIVE), plus the word-region one on them."""
    real_h, fake_h = netD(real), netD(fake.detach())
    cond_real = models.gan_d_term(netD.cond(real_h, sent), True, form)
    cond_fake = models.gan_d_term(netD.cond(fake_h, sent), False, form)
    cond_wrong = models.gan_d_term(netD.cond(real_h[:-1], sent[1:]), False, form)
    uncond_real = models.gan_d_term(netD.uncond(real_h), True, form)
    uncond_fake = models.gan_d_term(netD.uncond(fake_h), False, form)
    loss = (uncond_real + cond_real) / 2 + (uncond_fake + cond_fake + cond_wrong) / 3
    if contrastive:
        loss = loss + contrastive * models.sentence_contrastive_loss(netD.cond, real_h, sent)
    if words and words[2].WEIGHT:
        loss = loss + word_term(netD, real_h, *words)
    return loss


def generator_adv_loss(netsD, fakes, sent, form='bce', contrastive=0.0, words=None):
    """Sum over stages of the unconditional and conditional "fool D" terms (DM-GAN Eq. 11);
    with `contrastive` / `words`, plus the sentence / word-region contrastive losses on the fakes."""
    total = 0.0
    for netD, fake in zip(netsD, fakes):
        h = netD(fake)
        total = (
            total
            + models.gan_g_term(netD.uncond(h), form)
            + models.gan_g_term(netD.cond(h, sent), form)
        )
        if contrastive:
            total = total + contrastive * models.sentence_contrastive_loss(netD.cond, h, sent)
        if words and words[2].WEIGHT:
            total = total + word_term(netD, h, *words)
    return total


def damsm_loss(image_encoder, fake, words, sent, pad, class_ids, smooth_cfg):
    """DAMSM word + sentence losses, both directions, on the last stage's image
    (AttnGAN Eq. 10-14), with the frozen encoders; weighted by LAMBDA by the caller."""
    regions, global_feat = image_encoder.encode(fake)
    w0, w1, _ = models.words_loss(
        regions,
        words,
        pad,
        class_ids,
        smooth_cfg.GAMMA1,
        smooth_cfg.GAMMA2,
        smooth_cfg.GAMMA3,
        smooth_cfg.WORD_LOSS,
    )
    s0, s1 = models.sent_loss(global_feat, sent, class_ids, smooth_cfg.GAMMA3)
    return w0 + w1 + s0 + s1, global_feat


def kl_loss(mu, logvar):
    """KL(N(mu, sigma) || N(0, I)) of conditioning augmentation (StackGAN Eq. 3)."""
    return -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------
@contextlib.contextmanager
def frozen(modules):
    """The modules' trainable parameters need no gradient for a while: G's step through the Ds
    (DM-GAN computes those gradients and the next D step discards them)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def train_step(
    ddp_G, ddp_Ds, optG, optsD, image_enc, reals, class_ids, feats, noise, train_cfg, amp, step
):
    """One D step per stage, then one G step, on a batch: reals per stage, text features of
    each caption view (two with the contrastive term), the same z for every view."""
    with amp:
        outs = [ddp_G(noise, s, w, p) for w, s, p in feats]
    # --- D: every stage, summed over caption views
    errD_total = 0.0
    for i, (ddp_D, optD) in enumerate(zip(ddp_Ds, optsD)):
        optD.zero_grad(set_to_none=True)
        with amp:
            errD = sum(
                discriminator_loss(
                    ddp_D,
                    reals[i],
                    out[0][i],
                    f[1],
                    train_cfg.GAN_LOSS,
                    train_cfg.SENTENCE_CONTRASTIVE,
                    (f[0], f[2], train_cfg.WORD_CONTRASTIVE),
                )
                for out, f in zip(outs, feats)
            )
        utils.check_finite(errD, f'D{i}', step)
        errD.backward()
        optD.step()
        errD_total += errD.item()
    # --- G: adversarial + LAMBDA * DAMSM + KL (+ contrastive between the two fakes)
    optG.zero_grad(set_to_none=True)
    netsD = [utils.unwrap(d) for d in ddp_Ds]  # no D gradient, so no DDP sync, here
    with frozen(netsD):
        with amp:
            errG, img_codes, damsm_total = 0.0, [], 0.0
            # without the DAMSM term or the contrastive term the image encoder adds nothing
            use_encoder = train_cfg.SMOOTH.LAMBDA > 0 or len(feats) == 2
            for (fakes, _, mu, logvar), (words, sent, pad) in zip(outs, feats):
                errG = (
                    errG
                    + generator_adv_loss(
                        netsD,
                        fakes,
                        sent,
                        train_cfg.GAN_LOSS,
                        train_cfg.SENTENCE_CONTRASTIVE,
                        (words, pad, train_cfg.WORD_CONTRASTIVE),
                    )
                    + train_cfg.KL_WEIGHT * kl_loss(mu, logvar)
                )
                if use_encoder:
                    damsm, code = damsm_loss(
                        image_enc, fakes[-1], words, sent, pad, class_ids, train_cfg.SMOOTH
                    )
                    errG = errG + train_cfg.SMOOTH.LAMBDA * damsm
                    img_codes.append(code)
                    damsm_total += damsm.item()
            if len(feats) == 2:
                # T2I_CLIP-GAN / DM-GAN+CL: NT-Xent between the two fakes' image embeddings
                a, b = (
                    utils.all_gather_with_grad(F.normalize(c.float(), dim=-1)) for c in img_codes
                )
                cl = models.nt_xent_loss(a, b, train_cfg.CONTRASTIVE.TEMPERATURE)
                errG = errG + train_cfg.CONTRASTIVE.WEIGHT * cl
        utils.check_finite(errG, 'G', step)
        errG.backward()
    optG.step()
    return {'loss_D': errD_total, 'loss_G': errG.item(), 'damsm': damsm_total}


def train(run, args):
    cfg, dev, log = run.cfg, run.device, run.log
    train_cfg, contrastive = cfg.TRAIN, cfg.TRAIN.CONTRASTIVE.ENABLE
    if train_cfg.SMOOTH.WORD_LOSS not in models.WORD_LOSS_FORMS:
        raise utils.UserError(
            f"TRAIN.SMOOTH.WORD_LOSS={train_cfg.SMOOTH.WORD_LOSS!r}: expected one of "
            f"{', '.join(models.WORD_LOSS_FORMS)}"
        )
    if train_cfg.GAN_LOSS not in models.GAN_LOSSES:
        raise utils.UserError(
            f"TRAIN.GAN_LOSS={train_cfg.GAN_LOSS!r}: expected one of {', '.join(models.GAN_LOSSES)}"
        )
    if train_cfg.SENTENCE_CONTRASTIVE and cfg.GAN.D_CONDITION != 'projection':
        raise utils.UserError(
            f"TRAIN.SENTENCE_CONTRASTIVE={train_cfg.SENTENCE_CONTRASTIVE}: needs "
            f"GAN.D_CONDITION projection (has {cfg.GAN.D_CONDITION!r})"
        )
    text_enc, image_enc = models.load_dmgan_encoders(cfg, dev)
    ds = build_dataset(cfg, 'train', train=True, two_captions=contrastive)
    loader = utils.make_loader(
        ds, train_cfg.BATCH_SIZE, shuffle=True, drop_last=True, workers=cfg.WORKERS, seed=cfg.SEED
    )
    if len(loader) == 0:
        raise utils.UserError(
            f"TRAIN.BATCH_SIZE={train_cfg.BATCH_SIZE} exceeds the {len(ds)} training images"
        )
    netG = models.build_dmgan_generator(cfg, text_enc.spec['dim']).to(dev)
    netsD = nn.ModuleList(models.build_dmgan_discriminators(cfg, text_enc.spec['dim'])).to(dev)
    netG.apply(models.init_weights)
    netsD.apply(models.init_weights)
    layout = utils.memory_format(train_cfg, dev)
    for net in (netG, netsD):
        net.to(memory_format=layout)
    netG_ema = copy.deepcopy(netG).eval().requires_grad_(False)
    optG = torch.optim.Adam(netG.parameters(), lr=train_cfg.GENERATOR_LR, betas=(0.5, 0.999))
    optsD = [
        torch.optim.Adam(
            [p for p in d.parameters() if p.requires_grad],
            lr=train_cfg.DISCRIMINATOR_LR,
            betas=(0.5, 0.999),
        )
        for d in netsD
    ]
    step, start_epoch, seconds_before = 0, 0, 0.0
    ckpt = utils.resolve_resume(args.resume, run.out, 'dmgan', log, run.cfg)
    nets = {'G': netG, 'G_ema': netG_ema, **{f'D{i}': d for i, d in enumerate(netsD)}}
    opts = {'G': optG, **{f'D{i}': o for i, o in enumerate(optsD)}}
    if ckpt:
        step, start_epoch = utils.restore_checkpoint(ckpt, nets, opts)
        seconds_before = ckpt['extra'].get('train_seconds', 0.0)
    elif train_cfg.NET_G:
        init_from_released(train_cfg.NET_G, netG, netG_ema, netsD, dev, log)
    ddp_G, ddp_Ds = utils.wrap_ddp(netG, dev), [utils.wrap_ddp(d, dev) for d in netsD]
    for ddp_D, netD in zip(
        ddp_Ds, netsD
    ):  # the logit heads are reached through the wrapper's module
        ddp_D.cond, ddp_D.uncond = netD.cond, netD.uncond
        ddp_D.word_regions = netD.word_regions
    amp, _ = utils.autocast(dev, train_cfg.AMP)
    t0 = time.time()  # training time includes the one encoding pass of the cache
    if train_cfg.CACHE_TEXT_FEATURES:
        texts = [t for k in ds.keys for t in ds.d.raw_captions(k)]
        encode = models.TextFeatureCache(text_enc, texts, dev)
        log.info(f"text features of {len(encode.index):,} captions cached")
    else:
        encode = functools.partial(models.encode_text, text_enc, device=dev)
    fixed = fixed_test_batch(cfg, text_enc, dev)
    log.info(
        f"G {count(netG):,} params, D {[count(d) for d in netsD]}, {len(ds)} images, "
        f"{len(loader)} steps/epoch, contrastive={contrastive}"
    )
    last = {}
    for epoch in range(start_epoch, train_cfg.MAX_EPOCH):
        utils.set_epoch(loader, epoch)
        bar = utils.progress(loader, desc=f'epoch {epoch}', every=train_cfg.LOG_EVERY, log=log)
        for batch in bar:
            reals = [im.to(dev, non_blocking=True, memory_format=layout) for im in batch['imgs']]
            views = [batch['text']] + ([batch['text2']] if contrastive else [])
            noise = torch.randn(
                reals[0].shape[0], cfg.GAN.Z_DIM, device=dev
            )  # same z for both views
            feats = [encode(v) for v in views]
            last = train_step(
                ddp_G,
                ddp_Ds,
                optG,
                optsD,
                image_enc,
                reals,
                batch['class_id'].to(dev),
                feats,
                noise,
                train_cfg,
                amp,
                step,
            )
            models.ema_update(netG_ema, netG, train_cfg.EMA_DECAY)
            step += 1
            bar.set_postfix(**last)
            if step % train_cfg.LOG_EVERY == 0:
                for k, v in last.items():
                    run.writer.add_scalar(f'train/{k}', v, step)
        write_samples(run, netG_ema, fixed, epoch + 1)
        if (epoch + 1) % train_cfg.SNAPSHOT_INTERVAL == 0 or epoch + 1 == train_cfg.MAX_EPOCH:
            seconds = round(
                seconds_before + time.time() - t0, 1
            )  # training time, for learning curves
            path = utils.save_checkpoint(
                run.out,
                'dmgan',
                step,
                nets,
                opts,
                epoch=epoch + 1,
                cfg=cfg,
                extra={'text_dim': text_enc.spec['dim'], 'train_seconds': seconds},
                keep=train_cfg.KEEP_CHECKPOINTS,
            )
            log.info(f"epoch {epoch + 1}: saved {path}")
    utils.write_metrics(
        run.out,
        {
            'train_steps': step,
            'train_seconds': round(seconds_before + time.time() - t0, 1),
            **{f'final_{k}': v for k, v in last.items()},
            'checkpoint': (utils.list_checkpoints(run.out, 'dmgan') or [''])[-1],
        },
    )


def init_from_released(path, netG, netG_ema, netsD, dev, log):
    """Fine-tuning start as DM-GAN's load_network: G from TRAIN.NET_G, each D_i from the
    netD<i>.pth beside it (state dicts with the original's names or ours), the optimizers new."""
    netG.load_state_dict(models.dmgan_generator_state(path, dev))
    netG_ema.load_state_dict(netG.state_dict())
    for i, netD in enumerate(netsD):
        d_path = os.path.join(os.path.dirname(path), f'netD{i}.pth')
        raw = utils.load_weights(d_path, dev)
        if not utils.is_state_dict(raw):
            raise utils.UserError(
                f"{d_path}: expected a D_NET state dict (torch.save(netD.state_dict()))"
            )
        try:  # the original D has no word-region head: a TRAIN.WORD_CONTRASTIVE one starts new
            missing, unexpected = netD.load_state_dict(
                models.convert_dmgan_state_dict(raw), strict=False
            )
            missing = [k for k in missing if not k.startswith('word_regions.')]
            if missing or unexpected:
                raise RuntimeError(f"missing {missing[:4]}, unexpected {unexpected[:4]}")
        except RuntimeError as e:
            raise utils.UserError(
                f"{d_path}: does not match D{i} of the cfg's GAN/TREE keys ({str(e)[:200]})"
            )
    log.info(f"fine-tuning from {path} and netD0..{len(netsD) - 1}.pth beside it")


def count(module):
    return sum(p.numel() for p in module.parameters())


def fixed_test_batch(cfg, text_enc, dev, n=8):
    """The same test captions and noise for every sample grid."""
    ds = build_dataset(cfg, 'test', train=False)
    idx = np.linspace(0, len(ds) - 1, min(n, len(ds))).astype(int)
    texts = [ds.d.raw_captions(ds.keys[i])[0] for i in idx]
    g = torch.Generator().manual_seed(cfg.EVAL.SEED)
    return (
        texts,
        models.encode_text(text_enc, texts, dev),
        torch.randn(len(texts), cfg.GAN.Z_DIM, generator=g).to(dev),
    )


@torch.no_grad()
def write_samples(run, netG, fixed, epoch):
    """TensorBoard: per-stage grids and the memory stage's word attention of the fixed captions."""
    if not run.main:
        return
    texts, (words, sent, pad), z = fixed
    imgs, atts, _, _ = netG(z, sent, words, pad)
    for i, im in enumerate(imgs):
        utils.log_images(run.writer, f'samples/stage{i}_{im.shape[-1]}px', im, epoch)
    if atts:
        a = atts[0][:, :6]  # first 6 words
        a = a / a.flatten(2).amax(2)[:, :, None, None].clamp_min(1e-8)
        utils.log_images(
            run.writer,
            'samples/word_attention',
            a.flatten(0, 1)[:, None].expand(-1, 3, -1, -1) * 2 - 1,
            epoch,
            nrow=6,
        )
    run.writer.add_text('samples/captions', '\n\n'.join(texts), epoch)


# ----------------------------------------------------------------------------
# Evaluation (DM-GAN trainer.sampling): one image per caption, R-precision; scored by
# utils.evaluate_generator
# ----------------------------------------------------------------------------
def eval_records(cfg, ds):
    """Passes over the test set up to EVAL.NUM_IMAGES records, a seeded random caption of each
    image per pass, with the PNG name of its image."""
    eval_cfg, rng, records = cfg.EVAL, np.random.RandomState(cfg.EVAL.SEED), []
    n_target = min(eval_cfg.NUM_IMAGES, eval_cfg.MAX_PASSES * len(ds))
    for p in range(eval_cfg.MAX_PASSES):
        for k, c in zip(ds.keys, ds.class_ids):
            if len(records) == n_target:
                return records
            records.append(
                {
                    'key': k,
                    'caption': ds.d.raw_captions(k)[rng.randint(cfg.TEXT.CAPTIONS_PER_IMAGE)],
                    'class': c,
                    'pass': p,
                    'file': f"{k.replace('/', '__')}_{p}.png",
                }
            )
    return records


def dmgan_sampler(cfg, netG, text_enc, dev):
    """Caption records -> the last stage's images, the noise from one seeded generator."""
    g = torch.Generator().manual_seed(cfg.EVAL.SEED)

    def sample(batch):
        words, sent, pad = models.encode_text(text_enc, [r['caption'] for r in batch], dev)
        z = torch.randn(len(batch), cfg.GAN.Z_DIM, generator=g).to(dev)
        return netG(z, sent, words, pad)[0][-1]

    return sample


def metric_plugins(eval_cfg, text_enc, image_enc, judge=None, out_dir=None, real=None):
    """R-precision and CLIP score on the conditioning encoders; with a judge, its accuracy on the
    images as their PNG files hold them and the shuffled-caption baseline; with out_dir, the
    image dump (and its grid beside the real images, given `real`: key -> image)."""
    plugins = utils.encoder_plugins(
        text_enc, image_enc, eval_cfg.R_NEG, eval_cfg.R_FOLDS, eval_cfg.SEED
    )
    if judge is not None:
        accuracy = utils.JudgeAccuracy(judge)
        plugins += [
            accuracy,
            utils.ShuffledJudge(accuracy, lambda n: utils.derangement(n, eval_cfg.SEED)),
        ]
    if out_dir:
        plugins.append(utils.ImageDump(out_dir, real))
    return plugins


def image_size(cfg):
    """The side of the last stage's images."""
    return cfg.TREE.BASE_SIZE * 2 ** (cfg.TREE.BRANCH_NUM - 1)


def weights_files(generator, text_enc, image_enc, judge):
    """The files a score of the generator's images depends on (None: an untrained one, no judge)."""
    return {
        'generator': generator,
        'text_encoder': text_enc.weights_path,
        'image_encoder': image_enc.weights_path,
        'judge': judge.weights_path if judge is not None else None,
    }


def generate_and_score(
    cfg, netG, text_enc, image_enc, dev, generator_path, out_dir=None, log=None, judge=None
):
    """Scores (and the protocol) of netG's images of eval_records; the records, each with its
    judge verdict when a judge is given. Saves each image in out_dir when given."""
    eval_cfg = cfg.EVAL
    test = build_dataset(cfg, 'test', train=False)
    records = eval_records(cfg, test)
    torch.manual_seed(eval_cfg.SEED)  # conditioning augmentation samples from the global generator
    scores = utils.evaluate_generator(
        dmgan_sampler(cfg, netG, text_enc, dev),
        records,
        metric_plugins(eval_cfg, text_enc, image_enc, judge, out_dir, lambda k: test.images(k)[-1]),
        eval_cfg.BATCH_SIZE,
        'test',
        eval_cfg.SEED,
        weights_files(generator_path, text_enc, image_enc, judge),
        image_size(cfg),
        per_pass=True,
        log=log,
    )
    return {**scores, 'num_images': len(records)}, records


def real_image_baselines(cfg, judge, log):
    """The judge on real test images with their own captions (the ceiling) and with the
    caption of another random test image (what ignoring the text would score)."""
    ds = build_dataset(cfg, 'test', train=False)
    reals = [utils.to_uint8(ds.images(k)[-1][None]) for k in ds.keys]
    perm = utils.derangement(len(ds), cfg.EVAL.SEED)  # never its own image
    records = [
        {'key': k, 'class': c, 'index': i} for i, (k, c) in enumerate(zip(ds.keys, ds.class_ids))
    ]
    size = image_size(cfg)
    resize = (
        f"resize to {int(size * 76 / 64)} px, centre crop"
        if cfg.DATA.CROP
        else f"resize to {size} px"
    )

    def score(order):
        """The judge on reals[order[i]] for record i."""
        return utils.evaluate_generator(
            lambda batch: torch.cat([reals[order[r['index']]] for r in batch]).float() / 127.5 - 1,
            records,
            [utils.JudgeAccuracy(judge)],
            cfg.EVAL.BATCH_SIZE,
            'test',
            cfg.EVAL.SEED,
            {'judge': judge.weights_path},
            size,
            resize,
            log=log,
        )

    own, wrong = score(range(len(ds))), score(perm)
    return {
        **{f'real_{k}': v for k, v in own.items()},
        **{f'wrong_caption_{k}': v for k, v in wrong.items()},
    }


def learning_curve(run, text_enc, image_enc, judge):
    """Every checkpoint of the NET_G run dir scored as the final one is (without the image dump):
    curve.json and curve.png (R-precision and the judge's accuracies against training time)."""
    cfg, dev, log = run.cfg, run.device, run.log
    rows = []
    for path in utils.list_checkpoints(cfg.TRAIN.NET_G, 'dmgan'):
        ckpt = utils.load_checkpoint(path, 'dmgan', map_location=dev)
        netG = models.build_dmgan_generator(cfg, text_enc.spec['dim']).to(dev)
        netG.load_state_dict(ckpt['models']['G_ema'])
        scores, _ = generate_and_score(
            cfg, netG.eval(), text_enc, image_enc, dev, path, judge=judge
        )
        rows.append(
            {
                'checkpoint': os.path.basename(path),
                'step': ckpt['step'],
                'train_seconds': ckpt['extra'].get('train_seconds'),
                **scores,
            }
        )
        log.info(
            f"curve: step {ckpt['step']}: R-precision {scores['r_precision']:.3f}"
            + (f", judge all {scores['judge_all']:.3f}" if judge is not None else '')
        )
    if not rows:
        raise utils.UserError(f"EVAL.CURVE: no dmgan_<step>.pt under {cfg.TRAIN.NET_G}/checkpoints")
    utils.write_learning_curve(
        run.out,
        rows,
        f'DM-GAN learning curve ({cfg.CONFIG_NAME}, {rows[-1]["num_images"]} test images)',
    )
    return rows


def evaluate(run):
    cfg, dev, log = run.cfg, run.device, run.log
    if models.adopt_generator_cfg(cfg, log) and run.main:
        utils.save_cfg(cfg, run.out)  # cfg.yml records the generator evaluated
    text_enc, image_enc = models.load_dmgan_encoders(cfg, dev)
    netG = models.load_dmgan_generator(cfg, text_enc.spec['dim'], dev)
    out_dir = os.path.join(run.out, 'valid', 'single')
    os.makedirs(out_dir, exist_ok=True)
    judge = None
    if cfg.EVAL.JUDGE:
        judge = models.load_judge(cfg.EVAL.JUDGE, dev)
    if cfg.EVAL.CURVE:
        if not os.path.isdir(cfg.TRAIN.NET_G):
            raise utils.UserError(
                f"EVAL.CURVE needs TRAIN.NET_G to be a run dir, not {cfg.TRAIN.NET_G}"
            )
        learning_curve(run, text_enc, image_enc, judge)
    scores, records = generate_and_score(
        cfg, netG, text_enc, image_enc, dev, netG.weights_path, out_dir, log, judge
    )
    utils.atomic_write_text(
        os.path.join(out_dir, 'captions.json'),
        json.dumps(
            [
                {
                    k: r[k]
                    for k in ('file', 'key', 'caption', 'category', 'correct', 'reason')
                    if k in r
                }
                for r in records
            ],
            indent=0,
        ),
    )
    if judge is not None:
        utils.write_verdicts(os.path.join(run.out, 'judge.jsonl'), records)
    log.info(
        f"R-precision {scores['r_precision']:.4f} ± {scores['r_precision_std']:.4f} "
        f"over {scores['num_images']} images in {out_dir}"
    )
    if cfg.EVAL.BASELINE:
        torch.manual_seed(cfg.EVAL.SEED)
        untrained = models.build_dmgan_generator(cfg, text_enc.spec['dim']).to(dev)
        untrained.apply(models.init_weights)
        base, _ = generate_and_score(
            cfg, untrained.eval(), text_enc, image_enc, dev, None, None, log, judge
        )
        scores.update({f'untrained_{k}': v for k, v in base.items()})
        log.info(f"untrained generator: R-precision {base['r_precision']:.4f}")
        if judge is not None:
            scores.update(real_image_baselines(cfg, judge, log))
    if judge is not None:
        log.info(
            'judge: ' + ', '.join(f'{k}={v:.3f}' for k, v in scores.items() if 'judge_all' in k)
        )
    utils.write_metrics(run.out, {**scores, 'images_dir': out_dir, 'net_g': cfg.TRAIN.NET_G})


def chosen_model(args):
    """MODEL as the merged cfg will have it: the default, the cfg file's, then any --set MODEL=...,
    merged by utils as the whole cfg is (values read as YAML), before the trainer is known."""
    cfg = utils.to_cfg({'MODEL': DEFAULTS['MODEL']})
    if args.cfg:
        file_cfg = utils.load_yaml(args.cfg)
        utils.merge_cfg(cfg, {k: v for k, v in file_cfg.items() if k == 'MODEL'}, args.cfg)
    return utils.apply_set(
        cfg, [s for s in args.set if s.split('=', 1)[0].strip() == 'MODEL']
    ).MODEL


def main():
    parser = utils.base_parser(__doc__.splitlines()[0])
    # --help is left to the chosen trainer's parser, so it lists that trainer's own flags
    argv = [a for a in sys.argv[1:] if a not in ('-h', '--help')]
    args = parser.parse_known_args(argv)[0]
    model = chosen_model(args)
    if model == 'XMCGAN':  # its own defaults and flags (xmc_gan.py)
        import xmc_gan

        return xmc_gan.main()
    if model != 'DMGAN':
        raise utils.UserError(f"{args.cfg}: MODEL={model!r}: expected DMGAN or XMCGAN")
    args = parser.parse_args()
    run = utils.setup(args, DEFAULTS)
    if run.cfg.TRAIN.FLAG:
        train(run, args)
    else:
        evaluate(run)


if __name__ == '__main__':
    utils.run_main(main)
