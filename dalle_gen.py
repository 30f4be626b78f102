"""Sample images for a caption from a trained DALLE (text2img's dalle_gen.py).

  python dalle_gen.py "a large red circle in the center." 16 output/samples/red_circle \
      --dalle_path output/shapes_dalle/checkpoints/shapes_dalle.pt
  python dalle_gen.py TEXT IMG_NUM SAVE_PATH --cfg cfg/dalle/shapes_gen.yml [--top_k 0.9 --temperature 1 --batch_size 8]
  python dalle_gen.py TEXT IMG_NUM SAVE_PATH --dalle_path dalle.pt [--chinese] [--taming --vqgan_config_path model.yaml]

--dalle_path takes train_dalle.py's checkpoints (they carry the tokenizer and the VAE) and
DALLE-pytorch's dalle.pt, for which, as its generate.py, the tokenizer comes from --chinese /
--bpe_path (default CLIP BPE) and a VQGAN's architecture from --vqgan_config_path.

Writes SAVE_PATH/{i}.png, SAVE_PATH/grid.png and SAVE_PATH/caption.txt; TEXT may hold several
captions separated by '|' (as DALLE-pytorch's generate.py), each then in SAVE_PATH/<k>/, with the
model loaded once. Sampling uses a
key/value cache: the caption goes through the transformer once, then each image token is one
single-position step. --top_k < 1 is DALLE-pytorch's filter threshold (keep the best
(1 - top_k) share), counted over the text + image vocabulary as DALLE-pytorch does (TOP_K_OVER
image: over the image vocabulary only); --top_k >= 1 keeps that many tokens.
"""

import os
import time

import torch

import models
import utils

DEFAULTS = {
    'DALLE_PATH': 'output/dalle/checkpoints/dalle.pt',  # train_dalle.py's default; it carries the VAE and tokenizer
    'BATCH_SIZE': 4,  # DALLE-pytorch generate.py --batch_size 4
    'TOP_K': 0.9,  # filter_thres 0.9 in text2img's dalle_gen.py
    'TEMPERATURE': 1.0,
    'TOP_K_OVER': 'all',  # TOP_K's share of the text + image vocabulary, as DALLE-pytorch counts it; or 'image'
    'USE_CACHE': True,  # false: a full forward per token (DALLE-pytorch's default)
    # for DALLE-pytorch's dalle.pt only (ours carry both): its tokenizer and VQGAN config
    'TEXT': {'TOKENIZER': 'clip', 'TOKENIZER_PATH': ''},  # clip (BPE) | chinese (--chinese)
    'TAMING': False,  # generate.py --taming
    'VQGAN_CONFIG_PATH': '',
}
FLAGS = {
    'dalle_path': 'DALLE_PATH',
    'batch_size': 'BATCH_SIZE',
    'top_k': 'TOP_K',
    'temperature': 'TEMPERATURE',
    'bpe_path': 'TEXT.TOKENIZER_PATH',
    'vqgan_config_path': 'VQGAN_CONFIG_PATH',
}


def parse_args(argv=None):
    p = utils.base_parser(__doc__.splitlines()[0])
    p.add_argument('text')
    p.add_argument('img_num', type=int)
    p.add_argument('save_path')
    p.add_argument('--dalle_path', default=None)
    p.add_argument('--batch_size', type=int, default=None)
    p.add_argument('--top_k', type=float, default=None)
    p.add_argument('--temperature', type=float, default=None)
    p.add_argument('--chinese', action='store_true', help='TEXT.TOKENIZER=chinese')
    p.add_argument('--taming', action='store_true', help='TAMING=true')
    for flag in ('bpe_path', 'vqgan_config_path'):
        p.add_argument(f'--{flag}', default=None, help=f'cfg {FLAGS[flag]}')
    # accepted as generate.py takes it; the VQGAN's weights are inside the DALLE checkpoint
    p.add_argument(
        '--vqgan_model_path', default=None, help='ignored: the checkpoint holds the VQGAN'
    )
    args = p.parse_args(argv)
    args.set = ['TEXT.TOKENIZER=chinese'] * args.chinese + ['TAMING=true'] * args.taming + args.set
    if args.img_num < 1:
        raise utils.UserError(f"IMG_NUM={args.img_num}: expected at least 1")
    args.out = args.out or args.save_path
    return utils.flags_to_set(args, FLAGS)


@torch.no_grad()
def generate(
    dalle,
    vae,
    text_ids,
    n,
    batch_size,
    top_k,
    temperature,
    seed,
    use_cache=True,
    log=None,
    top_k_over='all',
):
    """n images for one caption, in batches; returns (images in [-1, 1], seconds spent sampling tokens)."""
    g = torch.Generator(device=text_ids.device).manual_seed(seed)
    images, t_tokens = [], 0.0
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        t0 = time.time()
        tokens = dalle.generate_image_tokens(
            text_ids.expand(b, -1), top_k, temperature, g, use_cache, top_k_over
        )
        t_tokens += time.time() - t0
        images.append(vae.decode(tokens).float().clamp(-1, 1).cpu())
        if log:
            log.info(f"{start + b}/{n} images")
    return torch.cat(images), t_tokens


def load(cfg, device, log):
    """DALLE, VAE and tokenizer of DALLE_PATH: ours, or DALLE-pytorch's dalle.pt."""
    obj = utils.load_weights(cfg.DALLE_PATH)
    if models.is_dalle_pytorch_checkpoint(obj):
        if cfg.TAMING and not cfg.VQGAN_CONFIG_PATH:
            raise utils.UserError("--taming: give the VQGAN's model.yaml as --vqgan_config_path")
        log.info(
            f"a DALLE-pytorch {obj.get('version', '')} checkpoint: tokenizer "
            f"{cfg.TEXT.TOKENIZER} {cfg.TEXT.TOKENIZER_PATH}".rstrip()
        )
        return models.load_dalle_pytorch(
            obj,
            cfg.DALLE_PATH,
            device,
            cfg.TEXT.TOKENIZER,
            cfg.TEXT.TOKENIZER_PATH,
            cfg.VQGAN_CONFIG_PATH,
        )
    return models.load_dalle(utils.checkpoint_of_kind(obj, cfg.DALLE_PATH, 'dalle'), device)


def main():
    args = parse_args()
    run = utils.setup(args, DEFAULTS, tensorboard=False)
    cfg, log = run.cfg, run.log
    if not os.path.isfile(cfg.DALLE_PATH):
        raise utils.UserError(
            f"{cfg.DALLE_PATH}: no DALLE checkpoint there; train one first (python train_dalle.py "
            "--image_text_folder DATA writes output/dalle/checkpoints/dalle.pt), or give --dalle_path"
        )
    log.info(f"DALLE: {cfg.DALLE_PATH}")
    if args.vqgan_model_path:
        log.info(
            f"--vqgan_model_path {args.vqgan_model_path}: not read; the VQGAN is the checkpoint's"
        )
    dalle, vae, tokenizer = load(cfg, run.device, log)
    dalle.eval()
    texts = utils.split_captions(args.text)
    tps = []
    for text, path in zip(texts, utils.caption_dirs(args.save_path, len(texts))):
        unknown = tokenizer.unknown_words(text)
        if unknown:
            log.warning(f"words not in the training vocabulary (read as <unk>): {unknown}")
        ids = tokenizer.encode(text)
        if len(ids) > dalle.text_seq_len:
            log.warning(f"caption has {len(ids)} tokens; keeping the first {dalle.text_seq_len}")
        text_ids = tokenizer.tokenize(text, dalle.text_seq_len, truncate=True)[None].to(run.device)
        images, secs = generate(
            dalle,
            vae,
            text_ids,
            args.img_num,
            cfg.BATCH_SIZE,
            cfg.TOP_K,
            cfg.TEMPERATURE,
            cfg.SEED,
            cfg.USE_CACHE,
            log,
            cfg.TOP_K_OVER,
        )
        os.makedirs(path, exist_ok=True)
        for i, im in enumerate(images):
            utils.save_image_grid(im[None], os.path.join(path, f'{i}.png'), nrow=1)
        utils.save_image_grid(images, os.path.join(path, 'grid.png'), nrow=min(8, len(images)))
        utils.atomic_write_text(os.path.join(path, 'caption.txt'), text + '\n')
        tps.append(args.img_num * dalle.image_seq_len / max(secs, 1e-9))
        log.info(
            f"{args.img_num} images in {path} ({tps[-1]:.1f} image tokens/s, cache={cfg.USE_CACHE})"
        )
    utils.write_metrics(
        run.out,
        {
            'texts': texts,
            'img_num': args.img_num,
            'tokens_per_second': sum(tps) / len(tps),
            'dalle_path': cfg.DALLE_PATH,
        },
    )


if __name__ == '__main__':
    utils.run_main(main)
