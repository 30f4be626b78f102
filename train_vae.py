"""Discrete VAE of DALL-E (Ramesh et al. 2021) as DALLE-pytorch trains it: images -> a grid of
codebook tokens -> images, the tokenizer of the DALLE pipeline.

  python train_vae.py --image_folder DIR --batch_size 64 --num_layers 4 --num_tokens 1024 \
      --emb_dim 256 --image_size 256                  # text2img's README command
  python train_vae.py --cfg cfg/dalle/shapes_vae.yml   # the embedded run
  torchrun --nproc_per_node=N train_vae.py ...          # data-parallel

Writes <run>/vae.pt ({'hparams', 'weights'}, readable by DALLE-pytorch unless MODEL.QUANTIZER is
vq) and training checkpoints in <run>/checkpoints (--resume auto).
"""

import math
import os
import time

import torch
import torch.nn.functional as F

import models
import utils

DEFAULTS = {
    'CONFIG_NAME': 'vae',  # run dir output/vae without --cfg/--out (train_dalle.py reads output/vae/vae.pt)
    'IMAGE_FOLDER': '',  # images at any depth below it
    'WORKERS': 4,
    'PRELOAD': False,  # decode every image once into memory (the transform is fixed); not in DALLE-pytorch
    'MODEL': {  # DALLE-pytorch train_vae.py defaults
        'IMAGE_SIZE': 128,
        'NUM_TOKENS': 8192,
        'NUM_LAYERS': 3,
        'NUM_RESNET_BLOCKS': 2,
        'EMB_DIM': 512,  # codebook_dim
        'HIDDEN_DIM': 256,
        'QUANTIZER': 'gumbel',  # DALLE-pytorch's Gumbel-softmax codes; 'vq': VQ-VAE's nearest code
        # (van den Oord et al. 2017), the quantizer of taming's VQGAN; its vae.pt is this project's
    },
    'TRAIN': {
        'EPOCHS': 20,
        'BATCH_SIZE': 8,
        'LEARNING_RATE': 1e-3,  # Adam
        'LR_DECAY_RATE': 0.98,  # ExponentialLR, stepped at the decay points
        'LR_DECAY_EVERY': 100,  # batches between decay points (DALLE-pytorch's log points)
        'LR_DECAY_PER_EPOCH': 0,  # > 0: every int(images / this / BATCH_SIZE) batches instead (text2img: 4)
        'LR_DECAY_COUNTER': 'epoch',  # epoch: batch index i of the epoch, i % EVERY == 0 (i = 0 too);
        # global: every EVERY-th step of the run
        'STARTING_TEMP': 1.0,
        'TEMP_MIN': 0.5,
        'ANNEAL_RATE': 1e-6,
        'TEMP_SCHEDULE': 'compound',  # DALLE-pytorch: temp = max(temp * exp(-ANNEAL_RATE * step), TEMP_MIN) at each
        # decay point; 'exponential': STARTING_TEMP * exp(-ANNEAL_RATE * step)
        'KL_LOSS_WEIGHT': 0.0,
        'KL_REDUCTION': 'sum',  # sum: over batch, positions and codes (DALLE-pytorch); batchmean: / batch
        'STRAIGHT_THROUGH': False,  # DiscreteVAE(straight_through=): hard one-hot forward, soft gradient
        'REINMAX': False,  # upstream DiscreteVAE(reinmax=) (not in 1.6.6): ReinMax gradient for STRAIGHT_THROUGH
        'LOGIT_INIT_SCALE': 1.0,  # scales the initial logits conv (1 = PyTorch's default init, as DALLE-pytorch)
        'RESTART_DEAD_CODES': False,  # at each LOG_EVERY, codes unused since the last one split busy
        # codes (VQ: restart at encoder outputs), drawn where reconstructions fail
        'SMOOTH_L1_LOSS': False,
        'AMP': False,  # bf16 autocast
        'LOG_EVERY': 100,  # scalars, codebook usage, reconstruction grids
        'NUM_IMAGES_SAVE': 4,
        'SAVE_EVERY_N_STEPS': 1000,
        'KEEP_CHECKPOINTS': 3,
    },
    'EVAL': {
        'HOLDOUT': '',  # csv/jsonl/folder of images kept out of training, for eval
        'MAX_IMAGES': 1000,
        'JUDGE': '',  # shapes judge checkpoint: attribute accuracy on reconstructions
    },
}

# DALLE-pytorch's flags, as cfg keys (utils.flags_to_set).
FLAGS = {
    'image_folder': 'IMAGE_FOLDER',
    'image_size': 'MODEL.IMAGE_SIZE',
    'num_tokens': 'MODEL.NUM_TOKENS',
    'num_layers': 'MODEL.NUM_LAYERS',
    'num_resnet_blocks': 'MODEL.NUM_RESNET_BLOCKS',
    'emb_dim': 'MODEL.EMB_DIM',
    'hidden_dim': 'MODEL.HIDDEN_DIM',
    'epochs': 'TRAIN.EPOCHS',
    'batch_size': 'TRAIN.BATCH_SIZE',
    'learning_rate': 'TRAIN.LEARNING_RATE',
    'lr_decay_rate': 'TRAIN.LR_DECAY_RATE',
    'starting_temp': 'TRAIN.STARTING_TEMP',
    'temp_min': 'TRAIN.TEMP_MIN',
    'anneal_rate': 'TRAIN.ANNEAL_RATE',
    'kl_loss_weight': 'TRAIN.KL_LOSS_WEIGHT',
    'smooth_l1_loss': 'TRAIN.SMOOTH_L1_LOSS',
    'num_images_save': 'TRAIN.NUM_IMAGES_SAVE',
}


def parse_args(argv=None):
    p = utils.base_parser(__doc__.splitlines()[0])
    for flag, key in FLAGS.items():
        if flag == 'smooth_l1_loss':
            p.add_argument('--smooth_l1_loss', action='store_true', default=None)
        elif flag == 'image_folder':
            p.add_argument('--image_folder', default=None, help='images at any depth below it')
        else:
            typ = float if any(s in flag for s in ('rate', 'temp', 'weight')) else int
            p.add_argument(f'--{flag}', type=typ, default=None, help=f'cfg {key}')
    return utils.flags_to_set(p.parse_args(argv), FLAGS)


# ----------------------------------------------------------------------------
# Data: every image below IMAGE_FOLDER (no class subfolders needed), in [-1, 1]
# ----------------------------------------------------------------------------
def image_transform(size):
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(size),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize((0.5,) * 3, (0.5,) * 3),
        ]
    )


def holdout_paths(spec):
    if not spec:
        return []
    if os.path.isdir(spec):
        return utils.list_images(spec)
    return sorted({os.path.abspath(p) for p, _ in utils.read_pairs(spec)})


def build_dataset(cfg):
    if not cfg.IMAGE_FOLDER:
        raise utils.UserError("IMAGE_FOLDER (--image_folder): empty; give a folder of images")
    held = set(holdout_paths(cfg.EVAL.HOLDOUT))
    paths = [p for p in utils.list_images(cfg.IMAGE_FOLDER) if os.path.abspath(p) not in held]
    if not paths:
        raise utils.UserError(
            f"{cfg.IMAGE_FOLDER}: no images found (extensions {utils.IMG_EXTENSIONS})"
        )
    return utils.PairDataset(
        [(p, '') for p in paths], image_transform(cfg.MODEL.IMAGE_SIZE), preload=cfg.PRELOAD
    )


# ----------------------------------------------------------------------------
# Losses (DALLE-pytorch DiscreteVAE.forward)
# ----------------------------------------------------------------------------
def kl_to_uniform(logits, reduction='sum'):
    """KL(q(z|x) || uniform), summed over positions and codes, and over the batch ('sum') or
    averaged over it ('batchmean'). DALLE-pytorch's DiscreteVAE.forward calls
    F.kl_div(log_uniform, log_qy, 'batchmean', log_target=True), and batchmean divides by the
    first dimension of log_uniform, a 1-element tensor: the sum."""
    log_q = F.log_softmax(logits.float().flatten(2).transpose(1, 2), dim=-1)  # (B, h*w, K)
    kl = (log_q.exp() * (log_q + math.log(logits.shape[1]))).sum()
    if reduction == 'batchmean':
        return kl / logits.shape[0]
    if reduction != 'sum':
        raise utils.UserError(f"TRAIN.KL_REDUCTION={reduction!r}: expected sum or batchmean")
    return kl


def vae_loss(images, recon, logits, train_cfg):
    """Reconstruction (MSE, or smooth-L1) in the normalised space, plus KL_LOSS_WEIGHT times
    the KL to uniform. At weight 0 the KL is left out of the graph (its forward and backward
    cost a quarter of a CPU step for a zero gradient) and returned as None."""
    rec = (F.smooth_l1_loss if train_cfg.SMOOTH_L1_LOSS else F.mse_loss)(recon.float(), images)
    if not train_cfg.KL_LOSS_WEIGHT:
        return rec, rec, None
    kl = kl_to_uniform(logits, train_cfg.KL_REDUCTION)
    return rec + train_cfg.KL_LOSS_WEIGHT * kl, rec, kl


def decay_interval(train_cfg, n_images):
    """Batches between decay points: LR_DECAY_EVERY, or text2img train_vae.py's
    int(len(ds) / LR_DECAY_PER_EPOCH / BATCH_SIZE) (its `i % int(len(ds)/4/BATCH_SIZE)`)."""
    if not train_cfg.LR_DECAY_PER_EPOCH:
        return train_cfg.LR_DECAY_EVERY
    every = int(n_images / train_cfg.LR_DECAY_PER_EPOCH / train_cfg.BATCH_SIZE)
    if every < 1:
        raise utils.UserError(
            f"TRAIN.LR_DECAY_PER_EPOCH={train_cfg.LR_DECAY_PER_EPOCH}: {n_images} images in batches "
            f"of {train_cfg.BATCH_SIZE} give an interval of 0 batches (text2img divides by it)"
        )
    return every


def is_decay_point(train_cfg, every, i, step):
    """After the step on batch i of the epoch (`step` steps done in all): DALLE-pytorch and
    text2img decay the LR and anneal the temperature when i % every == 0, the counter restarting
    every epoch (so at i = 0 too); 'global' counts the run's steps."""
    if train_cfg.LR_DECAY_COUNTER == 'epoch':
        return i % every == 0
    if train_cfg.LR_DECAY_COUNTER == 'global':
        return step % every == 0
    raise utils.UserError(
        f"TRAIN.LR_DECAY_COUNTER={train_cfg.LR_DECAY_COUNTER!r}: expected epoch or global"
    )


def _anneal_exponent(train_cfg, step, every, steps_per_epoch):
    """Sum over the decay points before `step` of the global step the original multiplies by:
    its global_step, the index of the batch just done ('epoch' counter: the points are
    e * L + j * every for j < ceil(L / every) in each epoch e of L batches), or the steps done
    ('global': every, 2 every, ...)."""
    if train_cfg.LR_DECAY_COUNTER == 'global':
        k = step // every
        return every * k * (k + 1) / 2
    L = steps_per_epoch
    n, (epochs, rest) = -(-L // every), divmod(step, L)
    m = -(-rest // every)  # points of the current epoch already passed
    full = n * L * epochs * (epochs - 1) / 2 + epochs * every * n * (n - 1) / 2
    return full + m * epochs * L + every * m * (m - 1) / 2


def temperature(train_cfg, step, every, steps_per_epoch):
    """The Gumbel temperature for step index `step`. 'compound' is DALLE-pytorch train_vae.py's
    rule, temp <- max(temp * exp(-ANNEAL_RATE * global_step), TEMP_MIN) at each decay point, in
    closed form. 'exponential' anneals every step, STARTING_TEMP * exp(-ANNEAL_RATE * step)."""
    if train_cfg.TEMP_SCHEDULE == 'compound':
        exponent = train_cfg.ANNEAL_RATE * _anneal_exponent(
            train_cfg,
            step,
            every,
            steps_per_epoch,
        )
    elif train_cfg.TEMP_SCHEDULE == 'exponential':
        exponent = train_cfg.ANNEAL_RATE * step
    else:
        raise utils.UserError(
            f"TRAIN.TEMP_SCHEDULE={train_cfg.TEMP_SCHEDULE!r}: expected compound or exponential"
        )
    return max(train_cfg.STARTING_TEMP * math.exp(-exponent), train_cfg.TEMP_MIN)


def codebook_usage(counts):
    """Perplexity exp(H) of the hard-code histogram and the share of codes used."""
    p = counts / counts.sum().clamp_min(1)
    h = -(p[p > 0] * p[p > 0].log()).sum()
    return h.exp().item(), (counts > 0).float().mean().item()


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------
@torch.no_grad()
def restart_dead_codes(vae, images, dead, init_scale):
    """Each dead code k splits the code j that wins at a position of `images` (feature h0),
    drawn with probability proportional to the hard reconstruction's squared error over that
    token's pixels (edges and small objects, not the background most codes already cover):
    k copies j's logits row and codebook vector and adds s * (h . h0 - |h0|^2 / 2), so it
    takes the part of j's inputs nearer h0 and reconstructions do not jump; s = init_scale over
    the mean squared feature norm moves logits by about init_scale, well above the Gumbel
    noise. VQ: k becomes the encoder output h0 itself (the nearest code of h0 from then on).
    Rank 0 decides, every rank gets its result. Returns the number of codes restarted."""
    dead = dead.nonzero().flatten()
    conv, book = vae.encoder[-1], vae.codebook.weight
    if len(dead) and utils.is_main() and vae.quantizer == 'vq':
        z_e = vae.encoder(images)
        idx = vae.code_distances(z_e).argmin(-1)
        err = (vae.decode(idx.flatten(1)).float() - images).pow(2).mean(1, keepdim=True)
        err = F.adaptive_avg_pool2d(err, idx.shape[-2:]).flatten()
        pick = torch.multinomial(err + 1e-12, min(len(dead), len(err)))
        dead = dead[: len(pick)]
        book[dead] = z_e.permute(0, 2, 3, 1).flatten(0, 2)[pick].to(book.dtype)
    elif len(dead) and utils.is_main():
        feats = vae.encoder[:-1](images)
        idx = conv(feats).max(1).indices
        err = (vae.decode(idx.flatten(1)).float() - images).pow(2).mean(1, keepdim=True)
        err = F.adaptive_avg_pool2d(err, idx.shape[-2:]).flatten()
        feats = feats.permute(0, 2, 3, 1).flatten(0, 2).float()
        scale = init_scale / feats.pow(2).sum(1).mean()
        pick = torch.multinomial(err + 1e-12, min(len(dead), len(err)))
        h0, j = feats[pick], idx.flatten()[pick]
        dead = dead[: len(h0)]
        conv.weight[dead] = conv.weight[j] + scale * h0[..., None, None]
        conv.bias[dead] = conv.bias[j] - scale * h0.pow(2).sum(1) / 2
        book[dead] = book[j]
    if utils.get_world_size() > 1:
        for t in (conv.weight, conv.bias, book):
            torch.distributed.broadcast(t, 0)
    return len(dead)


def train_step(model, opt, images, temp, train_cfg, amp, step=0):
    """Gumbel-softmax reconstruction at temperature temp (or the VQ one), the VAE loss (plus
    the VQ loss), one Adam step."""
    with amp:
        recon, logits, vq = model(
            images, temperature=temp, hard=train_cfg.STRAIGHT_THROUGH, reinmax=train_cfg.REINMAX
        )
    loss, rec, kl = vae_loss(images, recon, logits, train_cfg)
    if vq is not None:
        loss = loss + vq
    utils.check_finite(loss, 'vae', step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {
        'loss': loss.detach(),
        'recon_loss': rec.detach(),
        'kl': None if kl is None else kl.detach(),
        'vq': None if vq is None else vq.detach(),
        'reconstruction': recon.detach(),
        'logits': logits.detach(),
    }


def save_vae_pt(vae, path):
    """DALLE-pytorch's vae.pt: {'hparams': vae_params, 'weights': state_dict} (with a VQ
    quantizer, hparams name it and the file is this project's)."""
    utils.atomic_torch_save({'hparams': dict(vae.hparams), 'weights': vae.state_dict()}, path)


def train(run, args):
    cfg, dev, log, train_cfg, model_cfg = run.cfg, run.device, run.log, run.cfg.TRAIN, run.cfg.MODEL
    if model_cfg.IMAGE_SIZE % 2**model_cfg.NUM_LAYERS:
        raise utils.UserError(
            f"MODEL.IMAGE_SIZE={model_cfg.IMAGE_SIZE} is not divisible by 2**NUM_LAYERS={2**model_cfg.NUM_LAYERS}"
        )
    if model_cfg.QUANTIZER not in models.VAE_QUANTIZERS:
        raise utils.UserError(
            f"MODEL.QUANTIZER={model_cfg.QUANTIZER!r}: expected one of "
            f"{', '.join(models.VAE_QUANTIZERS)}"
        )
    if model_cfg.QUANTIZER == 'vq':
        gumbel_only = {
            'TRAIN.STRAIGHT_THROUGH': (train_cfg.STRAIGHT_THROUGH, False),
            'TRAIN.REINMAX': (train_cfg.REINMAX, False),
            'TRAIN.KL_LOSS_WEIGHT': (train_cfg.KL_LOSS_WEIGHT, 0.0),
            'TRAIN.LOGIT_INIT_SCALE': (train_cfg.LOGIT_INIT_SCALE, 1.0),
        }
        for key, (value, neutral) in gumbel_only.items():
            if value != neutral:
                raise utils.UserError(
                    f"{key}={value}: a Gumbel-softmax setting; MODEL.QUANTIZER vq needs {neutral}"
                )
    if train_cfg.REINMAX and not train_cfg.STRAIGHT_THROUGH:
        raise utils.UserError(
            "TRAIN.REINMAX=true needs TRAIN.STRAIGHT_THROUGH=true (it is a straight-through gradient)"
        )
    ds = build_dataset(cfg)
    loader = utils.make_loader(
        ds, train_cfg.BATCH_SIZE, shuffle=True, drop_last=True, workers=cfg.WORKERS, seed=cfg.SEED
    )
    if len(loader) == 0:
        raise utils.UserError(
            f"TRAIN.BATCH_SIZE={train_cfg.BATCH_SIZE} exceeds the {len(ds)} training images"
        )
    every = decay_interval(train_cfg, len(ds))
    # an unknown schedule, counter or KL reduction stops here, before any step
    is_decay_point(train_cfg, every, 0, 0)
    temperature(train_cfg, 0, every, len(loader))
    kl_to_uniform(torch.zeros(1, 2, 1, 1), train_cfg.KL_REDUCTION)
    vae = models.DiscreteVAE(
        model_cfg.IMAGE_SIZE,
        model_cfg.NUM_TOKENS,
        model_cfg.EMB_DIM,
        model_cfg.NUM_LAYERS,
        model_cfg.NUM_RESNET_BLOCKS,
        model_cfg.HIDDEN_DIM,
        quantizer=model_cfg.QUANTIZER,
    ).to(dev)
    with (
        torch.no_grad()
    ):  # larger initial logits: Gumbel noise (scale 1) no longer decides every early code
        vae.encoder[-1].weight.mul_(train_cfg.LOGIT_INIT_SCALE)
        vae.encoder[-1].bias.mul_(train_cfg.LOGIT_INIT_SCALE)
    opt = utils.make_optimizer(vae.parameters(), train_cfg.LEARNING_RATE)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=train_cfg.LR_DECAY_RATE)
    step, epoch, skip, counts = 0, 0, 0, None
    ckpt = utils.resolve_resume(args.resume, run.out, 'vae', log, run.cfg)
    if ckpt:
        step, epoch = utils.restore_checkpoint(ckpt, {'vae': vae}, {'opt': opt}, {'sched': sched})
        skip = ckpt['extra'].get('batches_done', 0)
        counts = ckpt['extra'].get(
            'code_counts'
        )  # this window's code histogram, for RESTART_DEAD_CODES
    model = utils.wrap_ddp(vae, dev)
    amp, _ = utils.autocast(dev, train_cfg.AMP)
    if train_cfg.AMP:
        utils.warn_slow_bf16(dev, log)
    log.info(
        f"DiscreteVAE {sum(p.numel() for p in vae.parameters()):,} params, {len(ds)} images, "
        f"{vae.fmap_size}x{vae.fmap_size} tokens of {model_cfg.NUM_TOKENS}, {len(loader)} steps/epoch"
    )
    counts = torch.zeros(model_cfg.NUM_TOKENS, device=dev) if counts is None else counts.to(dev)
    t0, last, start_step = time.time(), {}, step

    def save(epoch, batches_done):
        utils.save_checkpoint(
            run.out,
            'vae',
            step,
            {'vae': vae},
            {'opt': opt},
            {'sched': sched},
            epoch=epoch,
            cfg=cfg,
            keep=train_cfg.KEEP_CHECKPOINTS,
            extra={
                'hparams': vae.hparams,
                'batches_done': batches_done,
                'code_counts': counts.cpu(),
            },
        )
        if run.main:
            save_vae_pt(vae, os.path.join(run.out, 'vae.pt'))

    for epoch in range(epoch, train_cfg.EPOCHS):
        utils.set_epoch(loader, epoch)
        bar = utils.progress(loader, desc=f'epoch {epoch}', every=train_cfg.LOG_EVERY, log=log)
        for i, (images, _) in enumerate(bar):
            if i < skip:  # resumed mid-epoch: the same order, past the batches done; loading
                if i == skip - 1:  # them drew random numbers, so the saved RNG state goes back
                    utils.set_rng_state(ckpt['rng'])
                continue
            images = images.to(dev, non_blocking=True)
            temp = temperature(train_cfg, step, every, len(loader))
            out = train_step(model, opt, images, temp, train_cfg, amp, step)
            kl, recon, logits = out['kl'], out['reconstruction'], out['logits']
            step += 1
            if is_decay_point(train_cfg, every, i, step):
                sched.step()
            counts += torch.bincount(
                logits.detach().max(1).indices.flatten(), minlength=model_cfg.NUM_TOKENS
            )
            last = {'loss': out['loss'].item(), 'recon': out['recon_loss'].item()}
            if vae.quantizer == 'gumbel':
                last['temp'] = temp
            bar.set_postfix(**last)
            if step % train_cfg.LOG_EVERY == 0:
                if vae.quantizer == 'vq':
                    last['vq'] = out['vq'].item()
                else:
                    last['kl'] = (
                        kl if kl is not None else kl_to_uniform(logits, train_cfg.KL_REDUCTION)
                    ).item()
                ppl, used = codebook_usage(counts)
                if train_cfg.RESTART_DEAD_CODES:
                    last['restarted'] = restart_dead_codes(
                        vae, images, counts == 0, train_cfg.LOGIT_INIT_SCALE
                    )
                counts.zero_()
                last.update(perplexity=ppl, codes_used=used)
                for k, v in {**last, 'lr': sched.get_last_lr()[0]}.items():
                    run.writer.add_scalar(f'train/{k}', v, step)
                log_reconstructions(run, vae, images, recon, train_cfg.NUM_IMAGES_SAVE, step)
            if (
                train_cfg.SAVE_EVERY_N_STEPS
                and step % train_cfg.SAVE_EVERY_N_STEPS == 0
                and i + 1 < len(loader)
            ):
                save(epoch, i + 1)
        skip = 0
        save(epoch + 1, 0)
    if run.main:
        save_vae_pt(vae, os.path.join(run.out, 'vae-final.pt'))
    metrics = {
        'train_steps': step,
        'train_seconds': round(time.time() - t0, 1),
        'steps_per_second': round((step - start_step) / max(time.time() - t0, 1e-9), 3),
        **{f'final_{k}': v for k, v in last.items()},
        'final_lr': sched.get_last_lr()[0],
        'vae_pt': os.path.join(run.out, 'vae.pt'),
    }
    if cfg.EVAL.HOLDOUT and run.main:
        metrics.update(evaluate(cfg, vae, dev, log, run))
    utils.write_metrics(run.out, metrics)
    log.info(f"vae.pt: {os.path.join(run.out, 'vae.pt')} (train_dalle.py --vae_path)")


@torch.no_grad()
def log_reconstructions(run, vae, images, recon, n, step):
    """Originals, the training pass's reconstructions (soft or sampled Gumbel codes; VQ: the
    nearest codes) and hard (argmax codes) ones, one row each."""
    if not run.main or n <= 0:
        return
    vae.eval()
    hard = vae.decode(vae.get_codebook_indices(images[:n]))
    vae.train()
    grid = torch.cat([images[:n], recon[:n].float().clamp(-1, 1), hard.float().clamp(-1, 1)])
    utils.log_images(run.writer, 'reconstructions/original_soft_hard', grid, step, nrow=n)


# ----------------------------------------------------------------------------
# Evaluation: hard-code reconstructions of held-out images
# ----------------------------------------------------------------------------
@torch.no_grad()
def evaluate(cfg, vae, dev, log, run=None):
    """MSE of hard reconstructions in [-1, 1] and codebook usage on the held-out images; with
    EVAL.JUDGE, the shapes judge's colour/shape accuracy on originals and reconstructions, and on
    the originals averaged over each token's pixels (what one colour per token keeps), scored by
    utils.evaluate_generator as every generator's images are; judge_protocol names the judge file."""
    paths = holdout_paths(cfg.EVAL.HOLDOUT)[: cfg.EVAL.MAX_IMAGES]
    if not paths:
        raise utils.UserError(f"EVAL.HOLDOUT={cfg.EVAL.HOLDOUT}: no images")
    ds = utils.PairDataset([(p, '') for p in paths], image_transform(cfg.MODEL.IMAGE_SIZE))
    vae.eval()
    originals, recons, counts, se = [], [], torch.zeros(vae.num_tokens), 0.0
    for i in range(0, len(ds), 64):
        x = torch.stack([ds[j][0] for j in range(i, min(i + 64, len(ds)))]).to(dev)
        idx = vae.get_codebook_indices(x)
        r = vae.decode(idx).clamp(-1, 1)
        se += F.mse_loss(r, x, reduction='sum').item()
        counts += torch.bincount(idx.flatten().cpu(), minlength=vae.num_tokens).float()
        originals.append(x.cpu())
        recons.append(r.cpu())
    originals, recons = torch.cat(originals), torch.cat(recons)
    ppl, used = codebook_usage(counts)
    out = {
        'holdout_images': len(ds),
        'holdout_mse': se / originals.numel(),
        'holdout_perplexity': ppl,
        'holdout_codes_used': used,
    }
    if run is not None:
        utils.save_image_grid(
            torch.cat([originals[:8], recons[:8]]), os.path.join(run.out, 'holdout_recon.png')
        )
    if cfg.EVAL.JUDGE:
        # a reference beside the reconstructions: the originals with one average colour per
        # token, bilinearly enlarged back (what a perfect one-colour-per-token code keeps)
        image_size, fmap_size = originals.shape[-1], vae.fmap_size
        grid = F.interpolate(
            F.interpolate(originals, size=fmap_size, mode='area'),
            size=image_size,
            mode='bilinear',
            align_corners=False,
        )
        judge = models.load_judge(cfg.EVAL.JUDGE, dev)
        records = [{'key': utils.shapes_key(p), 'index': i} for i, p in enumerate(paths)]

        def score(images):
            """The judge on images[i] for record i, as every generator's images are scored."""
            res = utils.evaluate_generator(
                lambda batch: images[[r['index'] for r in batch]],
                [dict(r) for r in records],  # JudgeAccuracy writes its verdicts into them
                [utils.JudgeAccuracy(judge, store='float')],
                64,
                cfg.EVAL.HOLDOUT,
                cfg.SEED,
                {'judge': judge.weights_path},
                image_size,
            )
            return res.pop('protocol'), {k[len('judge_') :]: v for k, v in res.items()}

        out['judge_protocol'], orig = score(originals)
        out.update({f'judge_original_{k}': v for k, v in orig.items()})
        for name, images in (('recon', recons), ('token_average', grid)):
            acc = score(images)[1]
            out.update({f'judge_{name}_{k}': v for k, v in acc.items()})
            # the share of the originals' accuracy that survives tokenisation
            out.update({f'judge_{name}_ratio_{k}': acc[k] / max(orig[k], 1e-8) for k in orig})
    log.info(
        ' | '.join(
            f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}'
            for k, v in out.items()
            if not isinstance(v, dict)
        )
    )
    return out


def main():
    args = parse_args()
    run = utils.setup(args, DEFAULTS)
    train(run, args)


if __name__ == '__main__':
    utils.run_main(main)
