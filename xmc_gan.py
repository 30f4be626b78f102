"""XMC-GAN (Zhang et al., CVPR 2021): a one-stage text-to-image GAN trained with contrastive
losses between sentence and image, words and regions, real and fake images; reproduced from
the original Flax code (google-research/xmcgan_image_generation: xmcgan/xmc_gan.py, nets/xmc_net.py,
libml/attention_lib.py).
main.py hands over here when the cfg says MODEL: XMCGAN.

  python preprocess_data.py --cfg cfg/preprocess/coco_bert.yml --gpu 0      # caption embeddings first
  python main.py --cfg cfg/coco_xmc.yml --gpu 0 [--resume auto]             # train (TRAIN.FLAG: true)
  torchrun --nproc_per_node=7 main.py --cfg cfg/coco_xmc.yml --gpu 0        # the original's 7 GPUs
  python main.py --cfg cfg/eval_coco_xmc.yml --gpu 0 --set EVAL.WORKDIR=runs/exp [--watch]
"""

import copy
import functools
import json
import logging
import os
import signal
import time

import numpy as np
import torch
import torch.nn.functional as F

import models
import utils

DEFAULTS = {
    'MODEL': 'XMCGAN',
    'EMBEDDINGS': 'data/coco/xmc_bert',  # preprocess_data.py TASK embed: index.json + shards
    'IMAGE_SIZE': 128,
    'WORKERS': 4,
    'GAN': {
        'GF_DIM': 96,
        'DF_DIM': 96,
        'Z_DIM': 128,
        'GAMMA_FOR_G': 15.0,
        'COND_SIZE': 16,
        'D_INPUT_RANGE': [0.0, 1.0],  # the images D sees ([-1, 1] = the data's own range)
    },
    'TRAIN': {
        'FLAG': True,  # false: score the checkpoints of EVAL.WORKDIR
        'BATCH_SIZE': 56,  # global per step; a rank loads BATCH_SIZE/world x D_STEPS_PER_G_STEP
        'D_STEPS_PER_G_STEP': 2,
        'MAX_EPOCH': 500,
        'MAX_STEPS': 0,  # G steps; 0 = MAX_EPOCH epochs
        'GENERATOR_LR': 1e-4,
        'DISCRIMINATOR_LR': 4e-4,
        'EMA_DECAY': 0.999,
        'AMP': False,  # bf16 autocast
        'GATHER_NEGATIVES': False,  # contrastive negatives from this rank's batch; true = every rank's
        'FLIP': True,  # random horizontal flip of training images
        'PRELOAD': False,  # decode and resize every image once, up front (the original: per step)
        'RESNET': 'auto',  # ImageNet ResNet-50: the original's .npy or a torchvision .pth
        # ('auto' = data/resnet_pretrained.npy if there, else torchvision's cache)
        'CONTRASTIVE': {
            'TEMPERATURE': 0.1,
            'GAMMA1': 5.0,
            'GAMMA2': 5.0,
            'GAMMA3': 50.0,
            'WORD': True,
            'SENTENCE': True,
            'IMAGE': True,
            'PRETRAINED_IMAGE': True,
        },
        'CHECKPOINT_EVERY': 5000,  # G steps
        'KEEP_CHECKPOINTS': 5,
        'LOG_EVERY': 1000,
    },
    'EVAL': {
        'WORKDIR': '',  # the training run dir whose checkpoints are scored
        'NUM_IMAGES': 30000,  # per sampling; cycles through the test split
        'REPEATS': 3,  # samplings; scores are their mean and std
        'BATCH_SIZE': 50,
        'SEED': 42,
        'FID': True,
        'FID_FEATURES': 'inception',  # inception (pytorch-fid's weights) | judge (the shapes judge's)
        'FID_WEIGHTS': '',  # pt_inception-2015-12-05 .pth ('' = torch hub's cache)
        'FID_STATS': '',  # real test statistics .npz ('' = in the run dir); written when missing
        'IS': True,  # Inception Score on the FID Inception's logits (its weights)
        'IS_SPLITS': 1,
        'NET_E': '',  # project text_encoder<N>.pth: R-precision ('' = none)
        'R_NEG': 99,
        'R_FOLDS': 10,
        'JUDGE': '',  # shapes judge (run dir or checkpoint): attribute accuracy
        'BASELINE': False,  # also score an untrained generator on the same captions
        'DMGAN': '',  # a DM-GAN run dir: its samples of the same captions in the grids
        'SAVE_IMAGES': False,  # the first sampling's images -> <out>/images_<step>/ (+ keys.json)
        'POLL_SECONDS': 60,  # --watch: pause between looks for new checkpoints
    },
}


# ----------------------------------------------------------------------------
# Data: images and one of their captions' precomputed embeddings
# ----------------------------------------------------------------------------
class EmbeddedCaptions:
    """One split of preprocess_data.py's caption embeddings, memory-mapped: the image table
    [key, path, class id, first row, n] and, per caption row, words (T, D), length, sentence, text."""

    def __init__(self, root, split):
        path = os.path.join(root, 'index.json')
        if not os.path.isfile(path):
            raise utils.UserError(
                f"{path}: no caption embeddings; run preprocess_data.py with TASK: embed "
                "(cfg/preprocess/coco_bert.yml or shapes_text.yml) first"
            )
        with open(path) as f:
            index = json.load(f)
        if not index['complete']:
            raise utils.UserError(
                f"{path}: unfinished; re-run preprocess_data.py with the same cfg to resume"
            )
        if split not in index['splits']:
            raise utils.UserError(f"{path}: no '{split}' split (has {sorted(index['splits'])})")
        enc = index['encoder']  # a project encoder retrained since: these are the old one's
        if enc.get('sha256') and os.path.isfile(enc['name']):
            if utils.sha256(enc['name']) != enc['sha256']:
                raise utils.UserError(
                    f"{path}: written by {enc['name']} as it was before (sha256 "
                    f"{enc['sha256'][:12]}...); that file has changed since: re-run "
                    "preprocess_data.py into an empty EMBED.OUT_DIR"
                )
        sp = index['splits'][split]
        self.dim, self.encoder = index['dim'], index['encoder']
        self.images, self.shard_size = sp['images'], sp['shard_size']
        self.shards = [
            torch.load(os.path.join(root, f), map_location='cpu', mmap=True, weights_only=True)
            for f in sp['shards']
        ]

    def text(self, row):
        """The caption of a row, as written."""
        return self.shards[row // self.shard_size]['texts'][row % self.shard_size]

    def caption(self, row):
        s, i = self.shards[row // self.shard_size], row % self.shard_size
        return s['words'][i].float(), int(s['lengths'][i]), s['sent'][i].float(), s['texts'][i]

    def batch(self, rows, dev):
        """G's text inputs for caption rows: sentences (B, D), words (B, T, D), padding mask; texts."""
        caps = [self.caption(r) for r in rows]
        words, lengths = (
            torch.stack([c[0] for c in caps]).to(dev),
            torch.tensor([c[1] for c in caps], device=dev),
        )
        return (
            torch.stack([c[2] for c in caps]).to(dev),
            words,
            pad_mask(lengths, words.shape[1]),
            [c[3] for c in caps],
        )


def pad_mask(lengths, T):
    return torch.arange(T, device=lengths.device)[None] >= lengths[:, None]


class XMCDataset(torch.utils.data.Dataset):
    """An image, bilinearly resized to size x size without crop (tf.image.resize, no antialias)
    and, with `flip`, flipped at random, in [-1, 1] (the original: [0, 1]); and one random
    caption of it (coco_dataset.py). The randomness is a function of (seed, epoch, index), so
    neither resuming nor the worker count changes what a step sees. With `preload` every image
    is decoded and resized once, up front (3 x size^2 floats each): the same pixels, no
    decoding per step."""

    def __init__(self, emb, size, flip, seed=0, preload=False):
        self.emb, self.size, self.flip, self.seed, self.epoch = emb, size, flip, seed, 0
        self.bad = set()  # indices of unreadable files (utils.skip_unreadable)
        self.cache = None
        if preload:
            self.cache = []
            for i in range(len(self)):
                try:
                    self.cache.append(self._resized(i))
                except utils.BadImage as e:
                    logging.getLogger('t2i').warning(f"skipping {e}")
                    self.cache.append(None)
                    self.bad.add(i)

    def _resized(self, index):
        img = np.asarray(utils.load_image(self.emb.images[index][1]), dtype=np.float32) / 255
        return F.interpolate(
            torch.from_numpy(img).permute(2, 0, 1)[None],
            size=(self.size, self.size),
            mode='bilinear',
            align_corners=False,
        )[0]

    def __len__(self):
        return len(self.emb.images)

    def __getitem__(self, index):
        read = self._resized if self.cache is None else self.cache.__getitem__
        index, img = utils.skip_unreadable(self, index, read)
        _, _, _, first, n = self.emb.images[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        row = first + int(rng.integers(n))
        if self.flip and rng.random() < 0.5:
            img = img.flip(-1)
        words, length, sent, _ = self.emb.caption(row)
        return {'image': img.clamp(0, 1) * 2 - 1, 'words': words, 'length': length, 'sent': sent}


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of a permutation seeded by (seed, epoch), from batch `start` on: a
    run resumed mid-epoch sees the batches an uninterrupted one would."""

    def __init__(self, n, batch_size, seed):
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, 0, 0
        self.rank, self.world = utils.get_rank(), utils.get_world_size()
        self.batches = n // self.world // batch_size

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return (self.batches - self.start) * self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.n, generator=g)[self.rank :: self.world][
            : self.batches * self.batch_size
        ]
        return iter(order[self.start * self.batch_size :].tolist())


def build_networks(cfg, text_dim):
    lo_hi = cfg.GAN.D_INPUT_RANGE
    if len(lo_hi) != 2 or not lo_hi[0] < lo_hi[1]:
        raise utils.UserError(f"GAN.D_INPUT_RANGE={lo_hi}: expected [low, high] with low < high")
    if cfg.IMAGE_SIZE not in models.XMC_G_CHANNELS:
        raise utils.UserError(
            f"IMAGE_SIZE={cfg.IMAGE_SIZE}: XMC-GAN's channel tables have "
            f"{sorted(models.XMC_G_CHANNELS)}"
        )
    return (
        models.XMCGenerator(
            cfg.IMAGE_SIZE, cfg.GAN.GF_DIM, cfg.GAN.Z_DIM, text_dim, cfg.GAN.GAMMA_FOR_G
        ),
        models.XMCDiscriminator(
            cfg.IMAGE_SIZE, cfg.GAN.DF_DIM, text_dim, cfg.GAN.COND_SIZE, cfg.GAN.D_INPUT_RANGE
        ),
    )


# ----------------------------------------------------------------------------
# Losses (XMC-GAN Sec. 3-4; libml/losses.py, libml/attention_lib.py)
# ----------------------------------------------------------------------------
def discriminator_losses(ddp_D, real, fake, p, contrastive_cfg, gather, scale, fake_terms):
    """One D forward on [real; fake] (the sentence projection serves both the projection logit
    and L_sent, as the original) -> hinge (D, G) and the contrastive terms on D's features.
    `gather` collects the global batch; `scale` (world size) turns DDP's gradient average into
    the gradient of the global-batch loss."""
    B = len(real)
    logit, pooled, sent_c, regions = ddp_D(torch.cat([real, fake]), torch.cat([p['sent']] * 2))
    (real_logit, fake_logit), (real_pool, fake_pool) = (
        logit.float().split(B),
        pooled.float().split(B),
    )
    (real_reg, fake_reg), sent_c = regions.float().split(B), gather(sent_c[:B].float())
    words, tau = gather(p['words']), contrastive_cfg.TEMPERATURE
    pad = pad_mask(gather(p['length']), words.shape[1])
    terms = {}

    def word(reg):
        return scale * models.word_contrastive_loss(
            gather(reg),
            words,
            pad,
            contrastive_cfg.GAMMA1,
            contrastive_cfg.GAMMA2,
            contrastive_cfg.GAMMA3,
        )

    if contrastive_cfg.SENTENCE:
        terms['real_sentence'] = scale * models.contrastive_loss(gather(real_pool), sent_c, tau)
    if contrastive_cfg.WORD:
        terms['real_word'] = word(real_reg)
    if fake_terms and contrastive_cfg.SENTENCE:
        terms['fake_sentence'] = scale * models.contrastive_loss(gather(fake_pool), sent_c, tau)
    if fake_terms and contrastive_cfg.WORD:
        terms['fake_word'] = word(fake_reg)
    if fake_terms and contrastive_cfg.IMAGE:
        terms['image'] = scale * models.contrastive_loss(gather(fake_pool), gather(real_pool), tau)
    # the hinge (Sec. 3.2): L_D = E[relu(1 - D(x))] + E[relu(1 + D(G(z)))], L_G = -E[D(G(z))]
    real_term = models.gan_d_term(real_logit, True, 'hinge')
    fake_term = models.gan_d_term(fake_logit, False, 'hinge')
    return real_term + fake_term, models.gan_g_term(fake_logit, 'hinge'), terms


# ----------------------------------------------------------------------------
# Training (xmc_gan.py train_d / train_g_d, train_utils.train_step)
# ----------------------------------------------------------------------------
def negatives(gather_negatives, world):
    """(gather, scale) for the contrastive losses. The original contrasts each device's own
    batch (attention_lib.contrastive_loss over the local batch; sync_match is not implemented):
    identity, scale 1. Gathering makes the global batch the negatives; the world-size scale turns
    DDP's gradient average into that global loss's gradient."""
    if gather_negatives and world > 1:
        return utils.all_gather_with_grad, world
    return (lambda x: x), 1


def train_step(nets, opts, resnet, batch, cfg, amp, gather, scale, step):
    """The batch's first D_STEPS_PER_G_STEP - 1 parts each drive a D-only step; on the last,
    ONE forward of G and D gives d_loss and g_loss, and D and G update together from the same
    weights (the original's jax.vjp pulled back with (1, 0) and (0, 1)). Returns scalars to log."""
    (ddp_G, ddp_D, netG, netD), (optG, optD), contrastive_cfg = nets, opts, cfg.TRAIN.CONTRASTIVE
    n = len(batch['image']) // cfg.TRAIN.D_STEPS_PER_G_STEP
    parts = [
        {k: v[i * n : (i + 1) * n] for k, v in batch.items()}
        for i in range(cfg.TRAIN.D_STEPS_PER_G_STEP)
    ]
    for p in parts:
        p['pad'] = pad_mask(p['length'], p['words'].shape[1])
        p['z'] = torch.randn(n, cfg.GAN.Z_DIM, device=p['sent'].device)
    for p in parts[:-1]:
        with torch.no_grad(), amp:
            fake = netG(p['z'], p['sent'], p['words'], p['pad'])
        with amp:
            hinge_d, _, terms = discriminator_losses(
                ddp_D, p['image'], fake, p, contrastive_cfg, gather, scale, fake_terms=False
            )
        d_loss = hinge_d + terms.get('real_word', 0) + terms.get('real_sentence', 0)
        utils.check_finite(d_loss, 'd_loss', step)
        optD.zero_grad(set_to_none=True)
        d_loss.backward()
        optD.step()
    p = parts[-1]
    with amp:
        fake = ddp_G(p['z'], p['sent'], p['words'], p['pad'])
        hinge_d, hinge_g, terms = discriminator_losses(
            ddp_D, p['image'], fake, p, contrastive_cfg, gather, scale, fake_terms=True
        )
        c_loss_d = terms.get('real_word', 0) + terms.get('real_sentence', 0)
        c_loss_g = terms.get('fake_word', 0) + terms.get('fake_sentence', 0) + terms.get('image', 0)
        c_loss_g_pretrained = 0
        if resnet is not None:  # ImageNet ResNet-50 outputs of real vs fake (Sec. 4.1, L_img)
            with torch.no_grad():
                real_out = resnet(p['image'])
            c_loss_g_pretrained = scale * models.contrastive_loss(
                gather(real_out.float()), gather(resnet(fake).float()), contrastive_cfg.TEMPERATURE
            )
    d_loss, g_loss = hinge_d + c_loss_d, hinge_g + c_loss_g + c_loss_g_pretrained
    utils.check_finite(d_loss, 'd_loss', step)
    utils.check_finite(g_loss, 'g_loss', step)
    optD.zero_grad(set_to_none=True)
    optG.zero_grad(set_to_none=True)
    d_loss.backward(inputs=list(netD.parameters()), retain_graph=True)
    g_loss.backward(inputs=list(netG.parameters()))
    optD.step()
    optG.step()
    global_values = {
        k: (v.item() if torch.is_tensor(v) else v) / scale
        for k, v in dict(  # the global-batch values
            c_loss_d=c_loss_d, c_loss_g=c_loss_g, c_loss_g_pretrained=c_loss_g_pretrained, **terms
        ).items()
    }
    return {
        'd_loss': hinge_d.item() + global_values['c_loss_d'],
        'g_loss': hinge_g.item() + global_values['c_loss_g'] + global_values['c_loss_g_pretrained'],
        **global_values,
    }


def train(run, args):
    cfg, dev, log, train_cfg = run.cfg, run.device, run.log, run.cfg.TRAIN
    emb = EmbeddedCaptions(cfg.EMBEDDINGS, 'train')
    ds = XMCDataset(
        emb, cfg.IMAGE_SIZE, flip=train_cfg.FLIP, seed=cfg.SEED, preload=train_cfg.PRELOAD
    )
    if train_cfg.BATCH_SIZE % run.world:
        raise utils.UserError(
            f"TRAIN.BATCH_SIZE={train_cfg.BATCH_SIZE}: not divisible by the {run.world} ranks"
        )
    sampler = EpochSampler(
        len(ds), train_cfg.BATCH_SIZE // run.world * train_cfg.D_STEPS_PER_G_STEP, cfg.SEED
    )
    if sampler.batches == 0:
        raise utils.UserError(
            f"TRAIN.BATCH_SIZE={train_cfg.BATCH_SIZE} x D_STEPS_PER_G_STEP exceeds the {len(ds)} images"
        )
    # The loader's own generator (reseeded per epoch by set_epoch): starting an iterator must not
    # draw from the global RNG that z comes from, or a resumed run would diverge.
    loader = torch.utils.data.DataLoader(
        ds,
        sampler.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.WORKERS,
        pin_memory=dev.type == 'cuda',
        generator=torch.Generator(),
    )
    loader.base_seed = cfg.SEED
    netG, netD = (m.to(dev) for m in build_networks(cfg, emb.dim))
    netG_ema = copy.deepcopy(netG).eval().requires_grad_(False)
    optG = torch.optim.Adam(
        netG.parameters(), lr=train_cfg.GENERATOR_LR, betas=(0.5, 0.999)
    )  # coco_xmc.py beta1/2
    optD = torch.optim.Adam(netD.parameters(), lr=train_cfg.DISCRIMINATOR_LR, betas=(0.5, 0.999))
    resnet = (
        models.PretrainedResNet50(train_cfg.RESNET, log).to(dev)
        if train_cfg.CONTRASTIVE.PRETRAINED_IMAGE
        else None
    )
    nets, opts = {'G': netG, 'G_ema': netG_ema, 'D': netD}, {'G': optG, 'D': optD}
    step, epoch, done_in_epoch = 0, 0, 0
    ckpt = utils.resolve_resume(args.resume, run.out, 'xmcgan', log, run.cfg)
    if ckpt:
        step, epoch = utils.restore_checkpoint(ckpt, nets, opts)
        done_in_epoch = ckpt['extra']['batch']
    ddp_G = utils.wrap_ddp(netG, dev)
    ddp_D = utils.wrap_ddp(
        netD, dev, find_unused_parameters=not train_cfg.CONTRASTIVE.WORD
    )  # D's region conv
    gather, scale = negatives(train_cfg.GATHER_NEGATIVES, run.world)
    amp, _ = utils.autocast(dev, train_cfg.AMP)
    max_steps = train_cfg.MAX_STEPS or train_cfg.MAX_EPOCH * sampler.batches
    test = EmbeddedCaptions(cfg.EMBEDDINGS, 'test')
    log.info(
        f"G {count(netG):,} params, D {count(netD):,}; {len(ds)} images, {sampler.batches} steps/epoch "
        f"of {sampler.batch_size} images per rank, {max_steps} steps; text {emb.encoder['name']} ({emb.dim}-d)"
    )
    t0, sums, n_sums, last = time.time(), {}, 0, {}
    while step < max_steps:
        if done_in_epoch >= sampler.batches:
            epoch, done_in_epoch = epoch + 1, 0
        ds.epoch, sampler.start = epoch, done_in_epoch
        utils.set_epoch(loader, epoch)
        bar = utils.progress(loader, desc=f'epoch {epoch}', every=train_cfg.LOG_EVERY, log=log)
        for batch in bar:
            batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
            losses = train_step(
                (ddp_G, ddp_D, netG, netD),
                (optG, optD),
                resnet,
                batch,
                cfg,
                amp,
                gather,
                scale,
                step,
            )
            sums = {k: sums.get(k, 0.0) + v for k, v in losses.items()}
            models.ema_update(netG_ema, netG, train_cfg.EMA_DECAY)
            step, done_in_epoch, n_sums = step + 1, done_in_epoch + 1, n_sums + 1
            if (
                step % train_cfg.LOG_EVERY == 0 or step == max_steps
            ):  # interval means, as clu's Average
                last = {k: v / n_sums for k, v in sums.items()}
                bar.set_postfix(d_loss=last['d_loss'], g_loss=last['g_loss'])
                for k, v in last.items():
                    run.writer.add_scalar(f'train/{k}', v, step)
                sums, n_sums = {}, 0
            if step % train_cfg.CHECKPOINT_EVERY == 0 or step == max_steps:
                path = utils.save_checkpoint(
                    run.out,
                    'xmcgan',
                    step,
                    nets,
                    opts,
                    epoch=epoch,
                    cfg=cfg,
                    extra={'batch': done_in_epoch, 'text_dim': emb.dim},
                    keep=train_cfg.KEEP_CHECKPOINTS,
                )
                write_samples(run, netG_ema, test, cfg.GAN.Z_DIM, cfg.EVAL.SEED, step)
                log.info(
                    f"step {step}: saved {path} "
                    + ' '.join(f'{k}={v:.4g}' for k, v in last.items())
                )
            if step >= max_steps:
                break
    utils.write_metrics(
        run.out,
        {
            'train_steps': step,
            'train_seconds': round(time.time() - t0, 1),
            **{f'final_{k}': v for k, v in last.items()},
            'checkpoint': (utils.list_checkpoints(run.out, 'xmcgan') or [''])[-1],
        },
    )


def count(module):
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def write_samples(run, netG, emb, z_dim, seed, step, path=None, dmgan_run='', n=8):
    """The first caption of n test images spread over the split, with fixed noise: the same grid
    at every checkpoint in TensorBoard; at `path`, a row of the real images above it, and with
    `dmgan_run` (EVAL.DMGAN) a third row: that DM-GAN run's EMA generator on the same captions
    (its own encoder and noise). The captions go to <path>.txt, with their image keys to <path>.json."""
    if not run.main:
        return
    idx = np.linspace(0, len(emb.images) - 1, min(n, len(emb.images))).astype(int)
    dev = next(netG.parameters()).device
    sent, words, pad, texts = emb.batch([emb.images[i][3] for i in idx], dev)
    imgs = netG(
        torch.randn(len(idx), z_dim, generator=torch.Generator().manual_seed(seed)).to(dev),
        sent,
        words,
        pad,
    )
    utils.log_images(run.writer, 'samples/ema', imgs, step)
    run.writer.add_text('samples/captions', '\n\n'.join(texts), step)
    if not path:
        return
    reals = XMCDataset(emb, imgs.shape[-1], flip=False)
    rows = [torch.stack([reals[i]['image'] for i in idx]).to(dev), imgs]
    if dmgan_run:
        ckpt = utils.load_checkpoint(
            utils.list_checkpoints(dmgan_run, 'dmgan')[-1]
            if os.path.isdir(dmgan_run)
            else dmgan_run,
            'dmgan',
            map_location=dev,
        )
        dcfg = utils.to_cfg({**ckpt['cfg'], 'TRAIN': {**ckpt['cfg']['TRAIN'], 'NET_G': dmgan_run}})
        text_enc = models.load_dmgan_encoders(dcfg, dev)[0]
        d_words, d_sent, d_pad = models.encode_text(text_enc, texts, dev)
        z = torch.randn(len(idx), dcfg.GAN.Z_DIM, generator=torch.Generator().manual_seed(seed)).to(
            dev
        )
        other = models.load_dmgan_generator(dcfg, text_enc.spec['dim'], dev)(
            z, d_sent, d_words, d_pad
        )[0][-1]
        rows.append(
            F.interpolate(other, size=imgs.shape[-2:], mode='bilinear', align_corners=False)
        )
    utils.save_image_grid(torch.cat(rows), path, nrow=len(idx))
    utils.atomic_write_text(os.path.splitext(path)[0] + '.txt', '\n'.join(texts) + '\n')
    utils.atomic_write_text(
        os.path.splitext(path)[0] + '.json',
        json.dumps([{'key': emb.images[i][0], 'caption': t} for i, t in zip(idx, texts)], indent=1),
    )


# ----------------------------------------------------------------------------
# Evaluation (the original's test.sh: train_utils.test scores every checkpoint of a run)
# ----------------------------------------------------------------------------
STOP = {'requested': False}  # set by SIGTERM/SIGINT


def eval_records(emb, n_images, seed):
    """n_images records cycling through the test images in order, a seeded random caption of
    each per pass (its embedding row), with the image's PNG name for the dump."""
    n, records = len(emb.images), []
    for j in range(n_images):
        key, _, cls, first, k = emb.images[j % n]
        row = first + int(np.random.default_rng([seed, j // n, first]).integers(k))
        records.append(
            {'key': key, 'caption': emb.text(row), 'class': cls, 'row': row, 'file': f'{j:05d}.png'}
        )
    return records


def xmc_sampler(netG, emb, z_dim, seed, dev):
    """Caption records -> G's images of their precomputed embeddings, fresh seeded noise."""
    g = torch.Generator().manual_seed(seed)

    def sample(batch):
        sent, words, pad, _ = emb.batch([r['row'] for r in batch], dev)
        return netG(torch.randn(len(batch), z_dim, generator=g).to(dev), sent, words, pad).float()

    return sample


def real_statistics_path(cfg, net, size):
    """EVAL.FID_STATS, or the file of the real test images' statistics beside the scores."""
    return cfg.EVAL.FID_STATS or os.path.join(cfg.OUT_DIR, f'real_test_{size}px_{net.name}.npz')


def real_statistics(cfg, emb, net, dev):
    """size -> FID's (mu, sigma) of the real test images at that size (resized as in training):
    EVAL.FID_STATS, or computed from the test split and saved when missing."""

    @functools.lru_cache(maxsize=None)
    def at(size):
        path = real_statistics_path(cfg, net, size)
        if not os.path.isfile(path):
            loader = torch.utils.data.DataLoader(
                XMCDataset(emb, size, flip=False), cfg.EVAL.BATCH_SIZE, num_workers=cfg.WORKERS
            )
            act = np.concatenate([net((b['image'].to(dev) + 1) / 2) for b in loader])
            utils.save_statistics(path, *utils.statistics(act, 'real test images'), net.name)
        return utils.path_statistics(path, net)

    return at


def metric_plugins(cfg, emb, dev):
    """The plug-ins EVAL asks for (the judge's accuracy, R-precision and CLIP score with EVAL.NET_E,
    FID on the FID Inception's pool3 or the judge's features, IS on the FID Inception's logits in
    EVAL.IS_SPLITS splits: the original's eval_metrics.py uses 1), their networks loaded once;
    the weights files they use; and FID's feature network (None without FID)."""
    eval_cfg, plugins, weights, fid_net, last = cfg.EVAL, [], {}, None, []
    judge = models.load_judge(eval_cfg.JUDGE, dev) if eval_cfg.JUDGE else None
    if judge is not None:
        # 30,000 images wait for the judge in half precision, judged a sampled batch at a time
        plugins.append(utils.JudgeAccuracy(judge, store='half', chunk=eval_cfg.BATCH_SIZE))
        weights['judge'] = judge.weights_path
    if eval_cfg.NET_E:
        text_enc, image_enc = models.load_encoders(eval_cfg.NET_E, dev)
        features = utils.PairFeatures(text_enc, image_enc)
        plugins += [
            features,
            utils.RPrecision(features, eval_cfg.R_NEG, eval_cfg.R_FOLDS, eval_cfg.SEED),
        ]
        last = [
            utils.CLIPScore(features)
        ]  # after FID and IS: eval.txt's other columns keep their places
        weights.update(text_encoder=text_enc.weights_path, image_encoder=image_enc.weights_path)

    def inception():  # the file models.fid_inception reads
        return utils.weights_path(
            eval_cfg.FID_WEIGHTS or None, utils.FID_WEIGHTS, utils.FID_WEIGHTS_URL
        )

    if eval_cfg.FID:
        if eval_cfg.FID_FEATURES not in ('inception', 'judge') or (
            eval_cfg.FID_FEATURES == 'judge' and judge is None
        ):
            raise utils.UserError(
                f"EVAL.FID_FEATURES={eval_cfg.FID_FEATURES!r}: expected inception, or judge with EVAL.JUDGE"
            )
        on_judge = eval_cfg.FID_FEATURES == 'judge'
        fid_net = models.feature_net(
            2048, eval_cfg.FID_WEIGHTS or None, judge if on_judge else None, dev
        )
        plugins.append(utils.FID(fid_net, real_statistics(cfg, emb, fid_net, dev)))
        weights['fid_features'] = judge.weights_path if on_judge else inception()
    if eval_cfg.IS:
        plugins.append(
            utils.InceptionScore(
                models.inception_classifier('tf', eval_cfg.FID_WEIGHTS or None, dev),
                eval_cfg.IS_SPLITS,
            )
        )
        weights['is_inception'] = inception()
    if not plugins:
        raise utils.UserError(
            "EVAL: nothing to compute; set EVAL.FID, EVAL.IS, EVAL.NET_E or EVAL.JUDGE"
        )
    return plugins + last, weights, fid_net


def score(netG, ccfg, emb, plugins, eval_cfg, dev, weights, dump=None, log=None):
    """Mean, and std across samplings, of REPEATS samplings (the original's eval_avg_num); `dump`
    (an ImageDump) sees the first. Returns them, the protocol, with the seeds of every sampling,
    and the first sampling's records (with the judge's verdicts when it scored them)."""
    runs, first = [], None
    for r in range(eval_cfg.REPEATS):
        seed = eval_cfg.SEED + r
        records = eval_records(emb, eval_cfg.NUM_IMAGES, seed)
        if r == 0:
            first = records
        runs.append(
            utils.evaluate_generator(
                xmc_sampler(netG, emb, ccfg.GAN.Z_DIM, seed, dev),
                records,
                plugins + ([dump] if dump is not None and r == 0 else []),
                eval_cfg.BATCH_SIZE,
                'test',
                seed,
                weights,
                ccfg.IMAGE_SIZE,
                f'real test images: bilinear to {ccfg.IMAGE_SIZE} px, no crop'
                if eval_cfg.FID
                else None,
                stop=lambda: STOP['requested'],
                log=log,
            )
        )
    protocol = {**runs[0]['protocol'], 'seed': [eval_cfg.SEED + r for r in range(eval_cfg.REPEATS)]}
    runs = [{k: v for k, v in run.items() if k != 'protocol'} for run in runs]
    return (
        {
            f'{k}{sfx}': float(fn([r[k] for r in runs]))
            for k in runs[0]
            if not k.endswith('_std')
            for sfx, fn in (('', np.mean), ('_std', np.std))
        },
        protocol,
        first,
    )


def evaluate(run, watch):
    """Score each xmcgan checkpoint of EVAL.WORKDIR not yet in <run dir>/eval.txt (EMA G); with
    --watch, keep looking for new ones until SIGTERM. Rows go to eval.txt, TensorBoard
    (eval/<metric> at the checkpoint's step) and metrics.json."""
    cfg, dev, log, eval_cfg = run.cfg, run.device, run.log, run.cfg.EVAL
    if not os.path.isdir(os.path.join(eval_cfg.WORKDIR, 'checkpoints')):
        raise utils.UserError(
            f"EVAL.WORKDIR={eval_cfg.WORKDIR!r}: no checkpoints/ folder (expected a training run dir)"
        )
    if eval_cfg.DMGAN and not os.path.exists(eval_cfg.DMGAN):
        raise utils.UserError(f"EVAL.DMGAN={eval_cfg.DMGAN}: no such DM-GAN run dir or checkpoint")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: STOP.update(requested=True))
    emb = EmbeddedCaptions(cfg.EMBEDDINGS, 'test')
    plugins, net_weights, fid_net = metric_plugins(cfg, emb, dev)
    table, mpath = os.path.join(run.out, 'eval.txt'), os.path.join(run.out, 'metrics.json')

    def scored():
        return (
            {ln.split('\t')[0] for ln in open(table) if not ln.startswith('#')}
            if os.path.isfile(table)
            else set()
        )

    def fmt(s):
        return ' '.join(f'{k}={v:.4f}' for k, v in s.items() if not k.endswith('_std'))

    try:
        while not STOP['requested']:
            for path in [
                p
                for p in utils.list_checkpoints(eval_cfg.WORKDIR, 'xmcgan')
                if os.path.basename(p) not in scored()
            ]:
                try:
                    ckpt = utils.load_checkpoint(path, 'xmcgan', map_location=dev)
                except utils.UserError as e:  # rotated away by KEEP_CHECKPOINTS meanwhile
                    log.warning(f"skipping {e}")
                    continue
                ccfg, name, step, t0 = (
                    utils.to_cfg(ckpt['cfg']),
                    os.path.basename(path),
                    ckpt['step'],
                    time.time(),
                )
                if ckpt['extra']['text_dim'] != emb.dim:
                    raise utils.UserError(
                        f"{path}: trained on {ckpt['extra']['text_dim']}-d captions, but "
                        f"EMBEDDINGS={cfg.EMBEDDINGS} holds {emb.dim}-d ones"
                    )
                weights = {
                    **net_weights,
                    **(
                        {'fid_statistics': real_statistics_path(cfg, fid_net, ccfg.IMAGE_SIZE)}
                        if fid_net is not None
                        else {}
                    ),
                }
                if eval_cfg.BASELINE and 'untrained' not in (
                    json.load(open(mpath)) if os.path.isfile(mpath) else {}
                ):
                    torch.manual_seed(
                        eval_cfg.SEED
                    )  # an untrained G: same architecture, same captions
                    base, protocol, _ = score(
                        build_networks(ccfg, emb.dim)[0].to(dev).eval(),
                        ccfg,
                        emb,
                        plugins,
                        eval_cfg,
                        dev,
                        weights,
                        log=log,
                    )
                    utils.write_metrics(run.out, {'untrained': {**base, 'protocol': protocol}})
                    log.info(f"untrained generator: {fmt(base)}")
                netG = build_networks(ccfg, emb.dim)[0].to(dev)
                netG.load_state_dict(
                    ckpt['models']['G_ema']
                )  # the EMA weights, as the original reports
                dump = (
                    utils.ImageDump(os.path.join(run.out, f'images_{step:08d}'))
                    if eval_cfg.SAVE_IMAGES
                    else None
                )
                scores, protocol, records = score(
                    netG.eval(),
                    ccfg,
                    emb,
                    plugins,
                    eval_cfg,
                    dev,
                    {**weights, 'generator': path},
                    dump,
                    log,
                )
                if 'judge_all' in scores:  # the first sampling's verdicts, one line per image
                    utils.write_verdicts(os.path.join(run.out, f'judge_{step:08d}.jsonl'), records)
                header = (
                    ''
                    if os.path.isfile(table)
                    else '# checkpoint\tstep\tEMA G, mean and std of EVAL.REPEATS\n'
                )
                with open(table, 'a') as f:
                    f.write(
                        header
                        + f"{name}\t{step}\t"
                        + '\t'.join(f'{k}={v:.6g}' for k, v in scores.items())
                        + '\n'
                    )
                for k, v in scores.items():
                    run.writer.add_scalar(f'eval/{k}', v, step)
                write_samples(
                    run,
                    netG,
                    emb,
                    ccfg.GAN.Z_DIM,
                    eval_cfg.SEED,
                    step,
                    os.path.join(run.out, f'samples_{step:08d}.png'),
                    eval_cfg.DMGAN,
                )
                utils.write_metrics(
                    run.out,
                    {
                        f'eval/{name}': {'step': step, **scores, 'protocol': protocol},
                        'latest': name,
                    },
                )
                log.info(f"{name} (step {step}, {time.time() - t0:.0f}s): {fmt(scores)}")
                write_curve(run.out, mpath, ccfg.CONFIG_NAME)
            if not watch:
                break
            for _ in range(max(1, int(eval_cfg.POLL_SECONDS))):
                if not STOP['requested']:
                    time.sleep(1)
    except utils.Interrupted:
        log.info("stop requested: the checkpoint in progress was not scored")
    log.info(f"{len(scored())} checkpoint(s) scored in {table}")


def write_curve(out, metrics_path, run_name):
    """curve.json and curve.png: the scores of every checkpoint scored so far against its step."""
    with open(metrics_path) as f:
        rows = sorted(
            (v for k, v in json.load(f).items() if k.startswith('eval/')), key=lambda r: r['step']
        )
    if rows:
        utils.write_learning_curve(out, rows, f'XMC-GAN learning curve ({run_name}, EMA generator)')


def main():
    parser = utils.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        '--watch',
        action='store_true',
        help='evaluation: keep scoring new checkpoints until SIGTERM',
    )
    args = parser.parse_args()
    cfg = utils.build_cfg(DEFAULTS, args)
    if not cfg.TRAIN.FLAG and args.out is None and cfg.EVAL.WORKDIR:
        args.out = os.path.join(cfg.EVAL.WORKDIR, 'eval')  # the scores live beside the checkpoints
    run = utils.setup(args, DEFAULTS)
    if run.cfg.TRAIN.FLAG:
        train(run, args)
    else:
        evaluate(run, args.watch)
