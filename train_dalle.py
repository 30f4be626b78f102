"""DALL-E (Ramesh et al. 2021) as DALLE-pytorch trains it: a causal transformer over text
tokens then image tokens of a frozen discrete VAE or taming VQGAN.

  python train_dalle.py --image_text_folder DALLE.train.jsonl --vae_path vae.pt --chinese --amp \
      --dalle_output_file_name vae_dalle                          # text2img's README command
  python train_dalle.py --image_text_folder DALLE.train.jsonl --taming --vqgan_model_path last.ckpt \
      --vqgan_config_path model.yaml --chinese --amp
  python train_dalle.py --cfg cfg/dalle/shapes_dalle.yml          # the embedded run
  python train_dalle.py --dalle_path <run>/checkpoints/dalle_00001000.pt   # resume (or --resume auto)
  python train_dalle.py --image_text_folder DATA --dalle_path dalle.pt   # resume a DALLE-pytorch dalle.pt
  torchrun --nproc_per_node=N train_dalle.py ...                   # data-parallel

Data: a DALLE jsonl ({"image_path", "sentences"} lines), a folder of images with same-stem
.txt captions, or an open_clip CSV. Checkpoints in <run>/checkpoints: dalle_<step>.pt and,
at the end, <DALLE_OUTPUT_FILE_NAME>.pt, both with the VAE inside (dalle_gen.py needs nothing else).
--dalle_path also takes DALLE-pytorch's own dalle.pt (its train_dalle.py save_model): weights,
DiscreteVAE or VQGAN (then --taming --vqgan_config_path), Adam and ReduceLROnPlateau state, and
the epoch to redo (as DALLE-pytorch resumes); the tokenizer flags must be the ones it was trained
with (default CLIP BPE, --chinese), as in DALLE-pytorch.
"""

import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import models
import utils

DEFAULTS = {
    'CONFIG_NAME': 'dalle',  # run dir output/dalle without --cfg/--out (dalle_gen.py reads it)
    'IMAGE_TEXT_FOLDER': '',  # jsonl, folder (image + .txt) or csv
    'VAE_PATH': '',  # DALLE-pytorch vae.pt; '' = output/vae/vae.pt, where train_vae.py leaves it
    'VQGAN_MODEL_PATH': '',  # taming last.ckpt (with VQGAN_CONFIG_PATH model.yaml)
    'VQGAN_CONFIG_PATH': '',
    'TAMING': False,  # DALLE-pytorch --taming: the VAE is the VQGAN of the two paths above
    'DALLE_OUTPUT_FILE_NAME': 'dalle',
    'WORKERS': 4,
    'TEXT': {
        'TOKENIZER': 'clip',  # clip (BPE) | chinese (--chinese, BERT WordPiece) | words (built from the captions)
        'TOKENIZER_PATH': '',  # hub name or local dir/file; '' = openai/clip-vit-base-patch32 / hfl/chinese-roberta-wwm-ext
        'TEXT_SEQ_LEN': 32,  # text2img train_dalle.py default (DALLE-pytorch: 256)
        'TRUNCATE_CAPTIONS': False,
    },
    'MODEL': {  # DALLE-pytorch train_dalle.py defaults
        'DIM': 512,
        'DEPTH': 2,
        'HEADS': 8,
        'DIM_HEAD': 64,
        'ATTN_DROPOUT': 0.0,
        'ATTN_DROPOUT_AT': 'output',  # output: the attention block's output (DALLE-pytorch); weights: probabilities
        'FF_DROPOUT': 0.0,
        'LOSS_IMG_WEIGHT': 7.0,
    },
    'TRAIN': {
        'EPOCHS': 20,
        'BATCH_SIZE': 32,  # T2I's default (upstream 4)
        'LEARNING_RATE': 3e-4,  # Adam
        'CLIP_GRAD_NORM': 0.5,
        'LR_DECAY': False,  # ReduceLROnPlateau(0.5, patience 10, cooldown 10, min 1e-6) per epoch
        'AMP': False,  # mixed precision: autocast in AMP_DTYPE
        'AMP_DTYPE': 'bfloat16',  # or float16 (CUDA only, with a GradScaler)
        'RANDOM_RESIZE_CROP_LOWER_RATIO': 0.75,
        'MAX_STEPS': 0,  # stop after this many steps in all (0: EPOCHS decide); not in DALLE-pytorch
        'CACHE_IMAGE_TOKENS': False,  # tokenise each image once up front (needs RANDOM_RESIZE_CROP_LOWER_RATIO 1,
        # a fixed transform, so the same tokens as every step); not in DALLE-pytorch
        'SAVE_EVERY_N_STEPS': 1000,
        'KEEP_N_CHECKPOINTS': 5,  # T2I's default (upstream keeps all); 0 keeps all
        'LOG_EVERY': 50,
        'SAMPLE_EVERY': 1000,  # steps between sample grids in TensorBoard; 0 = at epoch ends only
        'NUM_SAMPLES': 4,
    },
    'SAMPLE': {
        'TOP_K': 0.9,
        'TEMPERATURE': 1.0,  # for the TensorBoard samples and EVAL (DALLE-pytorch generate.py --top_k)
        'TOP_K_OVER': 'all',
    },  # TOP_K's share of the text + image vocabulary (DALLE-pytorch) or 'image'
    'EVAL': {  # after training; not in DALLE-pytorch
        'HOLDOUT': '',  # held-out (image, caption) pairs: jsonl, folder or csv
        'NUM_CAPTIONS': 64,  # captions spread over HOLDOUT, one sample each
        'JUDGE': '',  # shapes judge checkpoint: attribute accuracy of the samples
        'BASELINE': False,  # also an untrained DALLE on the same captions
        'ENCODER': '',  # pretrain_DAMSM.py text_encoder<N>.pth: R-precision of the samples
        'R_NEG': 99,  # R-precision negatives (DM-GAN's protocol), fewer if the captions lack them
        'CURVE': False,  # also score every dalle_<step>.pt of the run: curve.json, curve.png
        'RERANK': 0,  # > 1: also the top-1 of that many samples per caption by ENCODER's cosine
        # (text2img's dalle_gen.py then clip_sort.py): rerank_* scores, judge_rerank.jsonl
    },
}

FLAGS = {
    'image_text_folder': 'IMAGE_TEXT_FOLDER',
    'vae_path': 'VAE_PATH',
    'vqgan_model_path': 'VQGAN_MODEL_PATH',
    'vqgan_config_path': 'VQGAN_CONFIG_PATH',
    'dalle_output_file_name': 'DALLE_OUTPUT_FILE_NAME',
    'bpe_path': 'TEXT.TOKENIZER_PATH',
    'text_seq_len': 'TEXT.TEXT_SEQ_LEN',
    'truncate_captions': 'TEXT.TRUNCATE_CAPTIONS',
    'dim': 'MODEL.DIM',
    'depth': 'MODEL.DEPTH',
    'heads': 'MODEL.HEADS',
    'dim_head': 'MODEL.DIM_HEAD',
    'attn_dropout': 'MODEL.ATTN_DROPOUT',
    'ff_dropout': 'MODEL.FF_DROPOUT',
    'loss_img_weight': 'MODEL.LOSS_IMG_WEIGHT',
    'epochs': 'TRAIN.EPOCHS',
    'batch_size': 'TRAIN.BATCH_SIZE',
    'learning_rate': 'TRAIN.LEARNING_RATE',
    'clip_grad_norm': 'TRAIN.CLIP_GRAD_NORM',
    'lr_decay': 'TRAIN.LR_DECAY',
    'amp': 'TRAIN.AMP',
    'random_resize_crop_lower_ratio': 'TRAIN.RANDOM_RESIZE_CROP_LOWER_RATIO',
    'save_every_n_steps': 'TRAIN.SAVE_EVERY_N_STEPS',
    'keep_n_checkpoints': 'TRAIN.KEEP_N_CHECKPOINTS',
}
BOOL_FLAGS = ('truncate_captions', 'lr_decay', 'amp')
STR_FLAGS = (
    'image_text_folder',
    'vae_path',
    'vqgan_model_path',
    'vqgan_config_path',
    'dalle_output_file_name',
    'bpe_path',
)
FLOAT_FLAGS = (
    'attn_dropout',
    'ff_dropout',
    'loss_img_weight',
    'learning_rate',
    'clip_grad_norm',
    'random_resize_crop_lower_ratio',
)


def parse_args(argv=None):
    p = utils.base_parser(__doc__.splitlines()[0])
    for flag, key in FLAGS.items():
        if flag in BOOL_FLAGS:
            p.add_argument(f'--{flag}', action='store_true', default=None, help=f'cfg {key}')
        else:
            typ = str if flag in STR_FLAGS else float if flag in FLOAT_FLAGS else int
            p.add_argument(f'--{flag}', type=typ, default=None, help=f'cfg {key}')
    p.add_argument('--chinese', action='store_true', help='TEXT.TOKENIZER=chinese (BERT WordPiece)')
    p.add_argument(
        '--taming', action='store_true', help='TAMING=true: VQGAN of --vqgan_model/config_path'
    )
    p.add_argument(
        '--dalle_path',
        default=None,
        help='resume from this checkpoint (= --resume PATH); ours or DALLE-pytorch\'s dalle.pt',
    )
    args = p.parse_args(argv)
    if args.chinese:
        args.set = ['TEXT.TOKENIZER=chinese'] + args.set
    if args.taming:
        args.set = ['TAMING=true'] + args.set
    if args.dalle_path:
        if args.resume and args.resume != args.dalle_path:
            raise utils.UserError("--dalle_path and --resume name different checkpoints; give one")
        args.resume = args.dalle_path
    return utils.flags_to_set(args, FLAGS)


# ----------------------------------------------------------------------------
# Text: utils.DalleTokenizer (0 = padding), built from the cfg or the captions
# ----------------------------------------------------------------------------
def build_tokenizer(cfg, pairs=None):
    text_cfg = cfg.TEXT
    if text_cfg.TOKENIZER == 'words':
        return utils.DalleTokenizer.from_captions(
            c for _, caps in pairs for c in ([caps] if isinstance(caps, str) else caps)
        )
    return utils.DalleTokenizer({'kind': text_cfg.TOKENIZER, 'path': text_cfg.TOKENIZER_PATH})


# ----------------------------------------------------------------------------
# Data: (image in [-1, 1], caption ids); captions tokenised once up front
# ----------------------------------------------------------------------------
def build_dataset(cfg, tokenizer, pairs, image_size):
    from torchvision import transforms

    ids = {}
    for _, caps in pairs:
        for caption in [caps] if isinstance(caps, str) else caps:
            if caption not in ids:
                ids[caption] = tokenizer.tokenize(
                    caption, cfg.TEXT.TEXT_SEQ_LEN, cfg.TEXT.TRUNCATE_CAPTIONS
                )
    lo = cfg.TRAIN.RANDOM_RESIZE_CROP_LOWER_RATIO
    tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(lo, 1.0), ratio=(1.0, 1.0)),
            transforms.ToTensor(),
            transforms.Normalize((0.5,) * 3, (0.5,) * 3),
        ]
    )
    return utils.PairDataset(pairs, tf, tokenize=ids.__getitem__)


class CachedTokenPairs(torch.utils.data.Dataset):
    """(image tokens, caption ids) with each distinct image tokenised once by the frozen VAE:
    under a fixed transform these are the tokens a step would compute, without the image
    decoding and the VAE encoder in every step. Pairs whose image is unreadable are dropped."""

    def __init__(self, ds, vae, device, amp, batch_size=250):
        paths = sorted({p for p, _ in ds.pairs})
        images = utils.PairDataset([(p, '') for p in paths], ds.transform)
        tokens = []
        with amp, torch.no_grad():  # the autocast a step would tokenise under
            for batch, _ in torch.utils.data.DataLoader(images, batch_size=batch_size):
                tokens.append(vae.get_codebook_indices(batch.to(device)).cpu())
        tokens, bad = torch.cat(tokens), {paths[i] for i in images.bad}
        # a skipped unreadable image was replaced by the next one: its row is not its own
        row = {p: i for i, p in enumerate(paths)}
        self.tokens, self.tokenize = tokens, ds.tokenize
        self.pairs = [(row[p], caps) for p, caps in ds.pairs if p not in bad]
        if not self.pairs:
            raise utils.UserError(f"no readable image among the {len(paths)} of the training pairs")
        self.skipped = len(ds.pairs) - len(self.pairs)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        row, text = self.pairs[i]
        if isinstance(text, (list, tuple)):
            text = text[np.random.randint(len(text))]
        return self.tokens[row], self.tokenize(text)


DEFAULT_VAE_PATH = os.path.join('output', 'vae', 'vae.pt')  # train_vae.py without --cfg/--out


def load_vae(cfg, log):
    """A frozen image tokenizer: taming VQGAN (both VQGAN paths, with or without TAMING) or a
    DiscreteVAE (VAE_PATH)."""
    if cfg.TAMING and not (cfg.VQGAN_MODEL_PATH and cfg.VQGAN_CONFIG_PATH):
        # DALLE-pytorch downloads the ImageNet f16/1024 VQGAN here; nothing is downloaded here
        raise utils.UserError(
            "--taming: give the VQGAN as --vqgan_model_path last.ckpt --vqgan_config_path "
            "model.yaml (taming-transformers' files; none is downloaded)"
        )
    if cfg.VQGAN_MODEL_PATH or cfg.VQGAN_CONFIG_PATH:
        if not (cfg.VQGAN_MODEL_PATH and cfg.VQGAN_CONFIG_PATH):
            raise utils.UserError("--vqgan_model_path and --vqgan_config_path go together")
        if cfg.VAE_PATH:
            raise utils.UserError("give either --vae_path or the VQGAN paths, not both")
        return models.load_vqgan(cfg.VQGAN_MODEL_PATH, cfg.VQGAN_CONFIG_PATH)
    path = cfg.VAE_PATH or DEFAULT_VAE_PATH
    if not os.path.isfile(path):
        raise utils.UserError(
            f"{path}: no VAE there; train one first (python train_vae.py --image_folder DIR "
            f"writes {DEFAULT_VAE_PATH}), or give --vae_path, the VQGAN paths or --dalle_path"
        )
    log.info(f"VAE: {path}")
    return models.load_discrete_vae(path)


def resume_dalle_pytorch(obj, path, dalle, opt, sched, steps_per_epoch, log):
    """The training state of a DALLE-pytorch dalle.pt: Adam's moments, ReduceLROnPlateau's
    state (when --lr_decay is on, as DALLE-pytorch loads it), and its epoch: the one running
    when it saved (also at that epoch's end), which DALLE-pytorch redoes from its start on
    resume; it saves no step or RNG state, so the step count restarts at epoch x steps per
    epoch. Returns (step, epoch)."""
    opt_state = models.dalle_pytorch_optimizer_state(obj, dalle, opt, path)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    if sched is not None and obj.get('scheduler_state'):
        sched.load_state_dict(obj['scheduler_state'])
    epoch = int(obj.get('epoch', 0))
    log.info(
        f"DALLE-pytorch state: epoch {epoch} redone from its start, optimizer "
        f"{'restored' if opt_state else 'new (none saved)'}, scheduler "
        f"{'restored' if sched is not None and obj.get('scheduler_state') else 'not restored'}"
    )
    return epoch * steps_per_epoch, epoch


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------
def train_step(model, vae, opt, images, text, train_cfg, amp, scaler=None):
    """One step: tokenise the images with the frozen VAE (unless given as tokens already),
    (CE_text + w·CE_img)/(w+1), clip the gradient norm, Adam. Returns (loss, CE_text, CE_img)."""
    image_tokens = images
    if images.is_floating_point():
        with amp, torch.no_grad():
            image_tokens = vae.get_codebook_indices(images)
    with amp:
        loss, loss_text, loss_img = model(text, image_tokens)
    opt.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.CLIP_GRAD_NORM)
    scaler.step(opt) if scaler else opt.step()
    if scaler:
        scaler.update()
    return loss.detach(), loss_text.item(), loss_img.item()


def autocast(device, train_cfg):
    """TRAIN.AMP in TRAIN.AMP_DTYPE (utils.autocast): bf16 on CPU and CUDA; fp16 (with a
    GradScaler) on CUDA only."""
    if train_cfg.AMP_DTYPE not in ('bfloat16', 'float16'):
        raise utils.UserError(
            f"TRAIN.AMP_DTYPE={train_cfg.AMP_DTYPE!r}: expected bfloat16 or float16"
        )
    fp16 = train_cfg.AMP and train_cfg.AMP_DTYPE == 'float16'
    if fp16 and device.type != 'cuda':
        raise utils.UserError("TRAIN.AMP_DTYPE=float16 needs CUDA; use bfloat16 on the CPU")
    return utils.autocast(device, train_cfg.AMP, getattr(torch, train_cfg.AMP_DTYPE))


def train(run, args):
    cfg, dev, log, train_cfg = run.cfg, run.device, run.log, run.cfg.TRAIN
    if not cfg.IMAGE_TEXT_FOLDER:
        raise utils.UserError(
            "IMAGE_TEXT_FOLDER (--image_text_folder): empty; give a jsonl, folder or csv"
        )
    if cfg.EVAL.JUDGE and cfg.EVAL.RERANK > 1 and not cfg.EVAL.ENCODER:
        raise utils.UserError(
            f"EVAL.RERANK={cfg.EVAL.RERANK} needs EVAL.ENCODER: the CLIP that ranks the samples"
        )
    pairs = utils.read_pairs(cfg.IMAGE_TEXT_FOLDER)
    ckpt, foreign = utils.read_resume(args.resume, run, 'dalle', models.is_dalle_pytorch_checkpoint)
    if foreign is not None:  # DALLE-pytorch's dalle.pt
        dalle, vae, tokenizer = models.load_dalle_pytorch(
            foreign,
            args.resume,
            dev,
            cfg.TEXT.TOKENIZER,
            cfg.TEXT.TOKENIZER_PATH,
            cfg.VQGAN_CONFIG_PATH,
        )
        log.info(
            f"resuming DALLE-pytorch {foreign.get('version', '(no version)')} checkpoint "
            f"{args.resume}: hparams {dalle.hparams}, VAE {vae.class_name} (the cfg's MODEL keys "
            "are not used)"
        )
    elif ckpt:  # as DALLE-pytorch's --dalle_path: the model, VAE and tokenizer of the checkpoint
        dalle, vae, tokenizer = models.load_dalle(ckpt, dev)
        log.info(
            f"resumed model hparams {ckpt['extra']['hparams']} (the cfg's MODEL keys are not used)"
        )
    else:
        vae = load_vae(cfg, log).to(dev).eval().requires_grad_(False)
        tokenizer = build_tokenizer(cfg, pairs)
        model_cfg = cfg.MODEL
        dalle = models.DALLE(
            tokenizer.vocab_size,
            cfg.TEXT.TEXT_SEQ_LEN,
            vae.num_tokens,
            vae.fmap_size,
            model_cfg.DIM,
            model_cfg.DEPTH,
            model_cfg.HEADS,
            model_cfg.DIM_HEAD,
            model_cfg.ATTN_DROPOUT,
            model_cfg.FF_DROPOUT,
            model_cfg.LOSS_IMG_WEIGHT,
            model_cfg.ATTN_DROPOUT_AT,
        ).to(dev)
    if (ckpt or foreign is not None) and dalle.text_seq_len != cfg.TEXT.TEXT_SEQ_LEN:
        raise utils.UserError(
            f"TEXT.TEXT_SEQ_LEN={cfg.TEXT.TEXT_SEQ_LEN} but the checkpoint has {dalle.text_seq_len}"
        )
    ds = build_dataset(cfg, tokenizer, pairs, vae.image_size)
    amp, scaler = autocast(dev, train_cfg)
    if train_cfg.CACHE_IMAGE_TOKENS:
        if train_cfg.RANDOM_RESIZE_CROP_LOWER_RATIO != 1:
            raise utils.UserError(
                f"TRAIN.CACHE_IMAGE_TOKENS needs TRAIN.RANDOM_RESIZE_CROP_LOWER_RATIO=1 (a fixed "
                f"transform), not {train_cfg.RANDOM_RESIZE_CROP_LOWER_RATIO}"
            )
        t_cache = time.time()
        ds = CachedTokenPairs(ds, vae, dev, amp)
        log.info(
            f"image tokens cached: {len(ds.tokens)} images in {time.time() - t_cache:.1f} s"
            + (f"; {ds.skipped} pairs with unreadable images dropped" if ds.skipped else '')
        )
    loader = utils.make_loader(
        ds, train_cfg.BATCH_SIZE, shuffle=True, drop_last=True, workers=cfg.WORKERS, seed=cfg.SEED
    )
    if len(loader) == 0:
        raise utils.UserError(
            f"TRAIN.BATCH_SIZE={train_cfg.BATCH_SIZE} exceeds the {len(ds)} training pairs"
        )
    opt = utils.make_optimizer(dalle.parameters(), train_cfg.LEARNING_RATE)
    sched = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode='min', factor=0.5, patience=10, cooldown=10, min_lr=1e-6
        )
        if train_cfg.LR_DECAY
        else None
    )
    if train_cfg.AMP and train_cfg.AMP_DTYPE == 'bfloat16':
        utils.warn_slow_bf16(dev, log)
    scheds = {'sched': sched} if sched else {}
    step, epoch, skip = 0, 0, 0
    if ckpt:
        step, epoch = utils.restore_checkpoint(ckpt, {'dalle': dalle}, {'opt': opt}, scheds, scaler)
        skip = ckpt['extra'].get('batches_done', 0)
    elif foreign is not None:
        step, epoch = resume_dalle_pytorch(
            foreign, args.resume, dalle, opt, sched, len(loader), log
        )
    model = utils.wrap_ddp(dalle, dev)
    extra = {
        'hparams': dalle.hparams,
        'vae_class_name': vae.class_name,
        'vae_params': vae.hparams,
        'tokenizer': tokenizer.spec,
    }
    log.info(
        f"DALLE {sum(p.numel() for p in dalle.parameters()):,} params (VAE {vae.class_name} frozen), "
        f"text {dalle.text_seq_len} + image {dalle.image_seq_len} tokens, vocab {tokenizer.vocab_size} "
        f"({tokenizer.spec['kind']}), {len(ds)} pairs, {len(loader)} steps/epoch, amp={train_cfg.AMP}"
    )
    fixed = fixed_captions(pairs, tokenizer, cfg, train_cfg.NUM_SAMPLES)

    def save(epoch, batches_done, name=None):
        return utils.save_checkpoint(
            run.out,
            'dalle',
            step,
            {'dalle': dalle, 'vae': vae},
            {'opt': opt},
            scheds,
            scaler,
            epoch=epoch,
            cfg=cfg,
            extra={
                **extra,
                'batches_done': batches_done,
                'train_seconds': round(seconds_before + time.time() - t0, 1),
            },
            keep=train_cfg.KEEP_N_CHECKPOINTS,
            name=name,
        )

    t0, start_step, last = time.time(), step, {}
    seconds_before = ckpt['extra'].get('train_seconds', 0.0) if ckpt else 0.0
    where = (epoch, skip)  # (epoch, batches done in it) of the latest save
    for epoch in range(
        epoch,
        train_cfg.EPOCHS if not (train_cfg.MAX_STEPS and step >= train_cfg.MAX_STEPS) else epoch,
    ):
        utils.set_epoch(loader, epoch)
        bar = utils.progress(loader, desc=f'epoch {epoch}', every=train_cfg.LOG_EVERY, log=log)
        epoch_loss, n, stop = 0.0, 0, False
        for i, (images, text) in enumerate(bar):
            if i < skip:  # resumed mid-epoch: the same order, past the batches done; loading
                if i == skip - 1:  # them drew random numbers, so the saved RNG state goes back
                    utils.set_rng_state(ckpt['rng'])
                continue
            loss, lt, li = train_step(
                model,
                vae,
                opt,
                images.to(dev, non_blocking=True),
                text.to(dev),
                train_cfg,
                amp,
                scaler,
            )
            utils.check_finite(loss, 'dalle', step)
            step += 1
            epoch_loss, n = epoch_loss + loss.item(), n + 1
            last = {'loss': loss.item(), 'loss_text': lt, 'loss_img': li}
            bar.set_postfix(**last)
            if step % train_cfg.LOG_EVERY == 0:
                for k, v in {**last, 'lr': opt.param_groups[0]['lr']}.items():
                    run.writer.add_scalar(f'train/{k}', v, step)
            if train_cfg.SAMPLE_EVERY and step % train_cfg.SAMPLE_EVERY == 0:
                write_samples(run, dalle, vae, fixed, cfg.SAMPLE, step)
            stop = bool(train_cfg.MAX_STEPS) and step >= train_cfg.MAX_STEPS
            if stop and i + 1 < len(loader):
                break
            if (
                train_cfg.SAVE_EVERY_N_STEPS
                and step % train_cfg.SAVE_EVERY_N_STEPS == 0
                and i + 1 < len(loader)
            ):
                save(epoch, i + 1)
        skip = 0
        where = (epoch, i + 1) if stop and i + 1 < len(loader) else (epoch + 1, 0)
        if where[1] == 0 and sched and n:
            sched.step(utils.all_reduce_mean(epoch_loss / n))
        if not train_cfg.SAMPLE_EVERY or stop:
            write_samples(run, dalle, vae, fixed, cfg.SAMPLE, step)
        log.info(f"epoch {epoch}, step {step}: saved {save(*where)}")
        if stop:
            break
    final = save(*where, name=f'{cfg.DALLE_OUTPUT_FILE_NAME}.pt')
    metrics = {
        'train_steps': step,
        'train_seconds': round(seconds_before + time.time() - t0, 1),
        'steps_per_second': round((step - start_step) / max(time.time() - t0, 1e-9), 3),
        **{f'final_{k}': v for k, v in last.items()},
        'dalle_path': final,
    }
    if cfg.EVAL.JUDGE and run.main:
        metrics.update(evaluate(cfg, dalle, vae, tokenizer, dev, log, run.out, final))
    utils.write_metrics(run.out, metrics)


def holdout_records(eval_cfg):
    """EVAL.NUM_CAPTIONS caption records spread over EVAL.HOLDOUT, the first caption of each
    pair, the class its key's folder."""
    if not eval_cfg.HOLDOUT:
        raise utils.UserError("EVAL.JUDGE needs EVAL.HOLDOUT: held-out (image, caption) pairs")
    pairs = utils.read_pairs(eval_cfg.HOLDOUT)
    pairs = pairs[:: max(1, len(pairs) // eval_cfg.NUM_CAPTIONS)][: eval_cfg.NUM_CAPTIONS]
    records = []
    for i, (path, caps) in enumerate(pairs):
        key = utils.shapes_key(path)
        records.append(
            {
                'key': key,
                'caption': caps if isinstance(caps, str) else caps[0],
                'class': key.split('/')[0],
                'file': f'{i:05d}.png',
            }
        )
    return records


def next_caption(n):
    """Image i against the caption of image i + 1 (a derangement too)."""
    return (np.arange(n) + 1) % n


def metric_plugins(judge, encoders=None, n_neg=99, out_dir=None):
    """The judge's accuracy (on the images as sampled) and the shuffled-caption baseline; with
    `encoders` (text, image), R-precision and CLIP score; with out_dir, the image dump."""
    accuracy = utils.JudgeAccuracy(judge, store='float')
    plugins = [accuracy, utils.ShuffledJudge(accuracy, next_caption)]
    if encoders is not None:
        plugins += utils.encoder_plugins(*encoders, n_neg)
    if out_dir:
        plugins.append(utils.ImageDump(out_dir))
    return plugins


def dalle_sampler(model, vae, tokenizer, cfg, dev, shown, rerank=None):
    """Caption records -> one sample each (SAMPLE's top-k and temperature, a seeded generator);
    the first 8 images are kept in `shown` for the sample grid. rerank=(n, (text encoder,
    image encoder)): n samples per caption, the one whose global image feature is nearest its
    caption's sentence feature (cosine) kept, as clip_sort.py ranks dalle_gen.py's."""
    model.eval()
    g = torch.Generator(device=dev).manual_seed(cfg.SEED)
    n = rerank[0] if rerank else 1

    def sample(batch):
        ids = torch.stack(
            [tokenizer.tokenize(r['caption'], cfg.TEXT.TEXT_SEQ_LEN, True) for r in batch]
        ).to(dev)
        tokens = model.generate_image_tokens(
            ids.repeat_interleave(n, 0),
            cfg.SAMPLE.TOP_K,
            cfg.SAMPLE.TEMPERATURE,
            generator=g,
            top_k_over=cfg.SAMPLE.TOP_K_OVER,
        )
        images = vae.decode(tokens).float().clamp(-1, 1).cpu()
        if rerank:
            text_enc, image_enc = rerank[1]
            captions = [r['caption'] for r in batch for _ in range(n)]
            img, txt = utils.encode_pairs(image_enc, text_enc, images, captions)
            best = F.cosine_similarity(img, txt, dim=-1).view(len(batch), n).argmax(1)
            images = images.view(len(batch), n, *images.shape[1:])[torch.arange(len(batch)), best]
        if sum(map(len, shown)) < 8:
            shown.append(images)
        return images

    return sample


SAMPLE_BATCH = 32  # captions per generate_image_tokens call


@torch.no_grad()
def evaluate(cfg, dalle, vae, tokenizer, dev, log, out, dalle_path):
    """One sample (SAMPLE's top-k and temperature) for each of EVAL.NUM_CAPTIONS held-out
    captions, scored by the shapes judge against the attributes of the caption's own image
    (the rule of `train_judge.py --score`), and against the next caption's (shuffled: the
    score the images get whatever the caption says); with BASELINE, an untrained DALLE on the
    same captions and noise. With EVAL.ENCODER, the R-precision of the samples (DM-GAN's
    protocol: true caption against R_NEG captions of images of other classes, by the encoder's
    cosine) and their CLIP score; with EVAL.RERANK, the same for the encoder's top-1 of RERANK
    samples per caption. Writes holdout_samples.png (rows: trained, reranked, untrained), the
    samples as PNGs with keys.json in holdout_images/ (holdout_images_rerank/) and judge.jsonl
    (judge_rerank.jsonl), one verdict per sample."""
    eval_cfg = cfg.EVAL
    held = holdout_records(eval_cfg)
    judge = models.load_judge(eval_cfg.JUDGE, dev)
    weights = {'dalle': dalle_path, 'judge': judge.weights_path}
    encoders, n_neg = None, 0
    if eval_cfg.ENCODER:
        encoders = models.load_encoders(eval_cfg.ENCODER, dev)
        weights.update(
            text_encoder=encoders[0].weights_path, image_encoder=encoders[1].weights_path
        )
        classes = [r['class'] for r in held]
        n_neg = int(
            min(eval_cfg.R_NEG, len(classes) - np.unique(classes, return_counts=True)[1].max())
        )

    def score(model, files, out_dir=None, rerank=None):
        """The scores of model's samples, their records (with the judge's verdicts), the first 8."""
        records, shown = [dict(r) for r in held], []
        res = utils.evaluate_generator(
            dalle_sampler(model, vae, tokenizer, cfg, dev, shown, rerank),
            records,
            metric_plugins(judge, encoders, n_neg, out_dir),
            SAMPLE_BATCH,
            eval_cfg.HOLDOUT,
            cfg.SEED,
            files,
            vae.image_size,
            log=log,
        )
        return res, records, torch.cat(shown)[:8]

    res, records, first = score(dalle, weights, os.path.join(out, 'holdout_images'))
    utils.write_verdicts(os.path.join(out, 'judge.jsonl'), records)
    if encoders is not None:
        res['r_precision_negatives'] = n_neg
    rows = [first]
    if eval_cfg.RERANK > 1:
        # R-precision of these is not an independent measure: the same encoder chose them
        top, top_records, shown = score(
            dalle,
            weights,
            os.path.join(out, 'holdout_images_rerank'),
            (eval_cfg.RERANK, encoders),
        )
        utils.write_verdicts(os.path.join(out, 'judge_rerank.jsonl'), top_records)
        res.update({f'rerank_{k}': v for k, v in top.items()})
        res['rerank_samples'] = eval_cfg.RERANK
        rows.append(shown)
    if eval_cfg.BASELINE:
        torch.manual_seed(cfg.SEED)  # same architecture, fresh initialisation
        untrained = models.DALLE(**dalle.hparams).to(dev)
        base, _, shown = score(untrained, {k: v for k, v in weights.items() if k != 'dalle'})
        res.update({f'untrained_{k}': v for k, v in base.items()})
        rows.append(shown)
    utils.save_image_grid(
        torch.cat(rows), os.path.join(out, 'holdout_samples.png'), nrow=len(rows[0])
    )
    res['eval_captions'] = len(records)
    log.info(' | '.join(f'{k} {v:.3f}' for k, v in res.items() if not isinstance(v, dict)))
    if eval_cfg.CURVE:
        curve, final_step = [], utils.load_checkpoint(dalle_path, 'dalle')['step']
        for path in utils.list_checkpoints(out, 'dalle'):
            ckpt = utils.load_checkpoint(path, 'dalle', map_location=dev)
            if ckpt['step'] == final_step:  # the weights just scored
                scores = res
            else:
                model = models.DALLE(**dalle.hparams).to(dev)
                model.load_state_dict(ckpt['models']['dalle'])
                scores = score(model.eval(), {**weights, 'dalle': path})[0]
            curve.append(
                {
                    'checkpoint': os.path.basename(path),
                    'step': ckpt['step'],
                    'train_seconds': ckpt['extra'].get('train_seconds'),
                    **{
                        k: v
                        for k, v in scores.items()
                        if not isinstance(v, dict) and not k.startswith('untrained_')
                    },
                }
            )
            log.info(f"curve: step {ckpt['step']}: judge all {scores['judge_all']:.3f}")
        if not curve:
            raise utils.UserError(f"EVAL.CURVE: no dalle_<step>.pt under {out}/checkpoints")
        utils.write_learning_curve(
            out, curve, f'DALLE learning curve ({cfg.CONFIG_NAME}, {len(records)} test captions)'
        )
    return res


def fixed_captions(pairs, tokenizer, cfg, n):
    """The first caption of n pairs spread over the data, for the sample grids."""
    if n <= 0:
        return [], None
    step = max(1, len(pairs) // n)
    texts = [(caps if isinstance(caps, str) else caps[0]) for _, caps in pairs[::step][:n]]
    ids = torch.stack([tokenizer.tokenize(t, cfg.TEXT.TEXT_SEQ_LEN, True) for t in texts])
    return texts, ids


@torch.no_grad()
def write_samples(run, dalle, vae, fixed, sample_cfg, step):
    texts, ids = fixed
    if not run.main or not texts:
        return
    dalle.eval()
    g = torch.Generator(device=run.device).manual_seed(0)
    tokens = dalle.generate_image_tokens(
        ids.to(run.device),
        sample_cfg.TOP_K,
        sample_cfg.TEMPERATURE,
        generator=g,
        top_k_over=sample_cfg.TOP_K_OVER,
    )
    utils.log_images(
        run.writer, 'samples/images', vae.decode(tokens).float().clamp(-1, 1), step, nrow=len(texts)
    )
    run.writer.add_text(
        'samples/captions', '\n\n'.join(f'{i}: {t}' for i, t in enumerate(texts)), step
    )
    dalle.train()


def main():
    args = parse_args()
    run = utils.setup(args, DEFAULTS)
    train(run, args)


if __name__ == '__main__':
    utils.run_main(main)
