"""Rerank generated images by their similarity to the caption with a CLIP-like model
(text2img's clip_sort.py, which used BriVL).

  python clip_sort.py TEXT IMG_NUM SAVE_PATH --clip_path output/clip_shapes/text_encoder30.pth
  python clip_sort.py TEXT IMG_NUM SAVE_PATH --clip_model openai/clip-vit-base-patch32   # or a local dir
  python clip_sort.py TEXT IMG_NUM SAVE_PATH --clip_model OFA-Sys/chinese-clip-vit-base-patch16

Scores SAVE_PATH/{i}.png (or .jpg), i < IMG_NUM, by the cosine of the image and caption
embeddings; prints the ranking and writes SAVE_PATH/ranking.json and SAVE_PATH/top{K}.png
(the best K with their scores). TEXT may hold several captions separated by '|', as for
dalle_gen.py: caption k then ranks SAVE_PATH/<k>/, with the model loaded once.
"""

import json
import os

import torch
import torch.nn.functional as F

import models
import utils

DEFAULTS = {
    'CLIP_PATH': '',  # text_encoder<N>.pth of pretrain_DAMSM.py or its run dir; '' = output/DAMSM
    'CLIP_MODEL': '',  # transformers CLIP or Chinese-CLIP: hub name or local dir
    'TOP_K': 4,  # text2img's README shows BriVL's top 4
    'BATCH_SIZE': 32,
}
FLAGS = {'clip_path': 'CLIP_PATH', 'clip_model': 'CLIP_MODEL', 'top_k': 'TOP_K'}


def parse_args(argv=None):
    p = utils.base_parser(__doc__.splitlines()[0])
    p.add_argument('text')
    p.add_argument('img_num', type=int)
    p.add_argument('save_path')
    p.add_argument('--clip_path', default=None, help='text_encoder<N>.pth of pretrain_DAMSM.py')
    p.add_argument(
        '--clip_model', default=None, help='transformers CLIP / Chinese-CLIP, hub name or dir'
    )
    p.add_argument('--top_k', type=int, default=None)
    args = p.parse_args(argv)
    args.out = args.out or os.path.join(args.save_path, 'clip_sort')
    return utils.flags_to_set(args, FLAGS)


DEFAULT_CLIP_RUN = os.path.join('output', 'DAMSM')  # pretrain_DAMSM.py without --cfg/--out


def image_files(save_path, n):
    files = []
    for i in range(n):
        f = next(
            (
                os.path.join(save_path, f'{i}{e}')
                for e in ('.png', '.jpg')
                if os.path.isfile(os.path.join(save_path, f'{i}{e}'))
            ),
            None,
        )
        if f is None:
            raise utils.UserError(
                f"{save_path}: no {i}.png or {i}.jpg (IMG_NUM={n}; dalle_gen.py writes them)"
            )
        files.append(f)
    return files


def project_scorer(clip_path, device, batch_size):
    """Cosine of the sentence and global image embeddings of our encoders."""
    import torchvision.transforms.functional as TF

    text_enc, image_enc = models.load_encoders(clip_path, device)

    @torch.no_grad()
    def score(text, files):
        sent = text_enc.encode([text])[1].float()
        out = []
        for i in range(0, len(files), batch_size):
            x = torch.stack(
                [TF.to_tensor(utils.load_image(f)) * 2 - 1 for f in files[i : i + batch_size]]
            ).to(device)
            out.append(F.cosine_similarity(image_enc.encode(x)[1].float(), sent, dim=-1).cpu())
        return torch.cat(out)

    return score


def transformers_scorer(name, device, batch_size):
    """Cosine of text_embeds and image_embeds of a transformers CLIPModel / ChineseCLIPModel,
    with the processor saved beside the model."""
    from transformers import AutoConfig, AutoModel, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(name)
        if config.model_type not in ('clip', 'chinese_clip'):
            raise utils.UserError(
                f"{name}: model_type {config.model_type!r}; expected clip or chinese_clip"
            )
        model = AutoModel.from_pretrained(name).to(device).eval()
        processor = AutoProcessor.from_pretrained(name)
    except OSError as e:
        raise utils.UserError(
            f"{name}: cannot load a transformers CLIP model ({str(e).splitlines()[0][:160]}); "
            "give a local directory (no downloads here)"
        )

    @torch.no_grad()
    def score(text, files):
        out = []
        for i in range(0, len(files), batch_size):
            imgs = [utils.load_image(f) for f in files[i : i + batch_size]]
            inputs = processor(text=[text], images=imgs, return_tensors='pt', padding=True).to(
                device
            )
            o = model(**inputs)
            out.append(
                F.cosine_similarity(o.image_embeds.float(), o.text_embeds.float(), dim=-1).cpu()
            )
        return torch.cat(out)

    return score


def top_grid(files, ranking, scores, k, path):
    """The best k images side by side, each with its rank and score written on it."""
    from PIL import ImageDraw
    import torchvision.transforms.functional as TF

    tiles = []
    for r, i in enumerate(ranking[:k]):
        im = utils.load_image(files[i])
        ImageDraw.Draw(im).text(
            (2, 2),
            f'#{r + 1} {scores[i]:.3f}',
            fill=(255, 255, 255),
            stroke_width=1,
            stroke_fill=(0, 0, 0),
        )
        tiles.append(TF.to_tensor(im) * 2 - 1)
    utils.save_image_grid(torch.stack(tiles), path, nrow=len(tiles))


def main():
    args = parse_args()
    run = utils.setup(args, DEFAULTS, tensorboard=False)
    cfg, log = run.cfg, run.log
    if cfg.CLIP_PATH and cfg.CLIP_MODEL:
        raise utils.UserError(
            "give one of --clip_path (our encoders) and --clip_model (transformers), not both"
        )
    if not cfg.CLIP_MODEL:
        cfg.CLIP_PATH = cfg.CLIP_PATH or DEFAULT_CLIP_RUN
        if not os.path.exists(cfg.CLIP_PATH):
            raise utils.UserError(
                f"{cfg.CLIP_PATH}: no CLIP encoder there; train one first (pretrain_DAMSM.py "
                f"without --cfg/--out writes {DEFAULT_CLIP_RUN}), or give --clip_path or --clip_model"
            )
        log.info(f"CLIP: {cfg.CLIP_PATH} (a run dir: its newest text_encoder<N>.pth)")
    texts = utils.split_captions(args.text)
    paths = utils.caption_dirs(args.save_path, len(texts))
    files = [image_files(p, args.img_num) for p in paths]  # all present before the model loads
    score = (
        project_scorer(cfg.CLIP_PATH, run.device, cfg.BATCH_SIZE)
        if cfg.CLIP_PATH
        else transformers_scorer(cfg.CLIP_MODEL, run.device, cfg.BATCH_SIZE)
    )
    for text, path, f in zip(texts, paths, files):
        rows = rank(cfg, text, f, score(text, f), path, log)
    utils.write_metrics(
        run.out, {'texts': texts, 'best': rows[0]['file'], 'best_score': rows[0]['score']}
    )


def rank(cfg, text, files, scores, path, log):
    """Print the ranking of files by scores, write ranking.json and the top-k grid in path."""
    ranking = torch.argsort(scores, descending=True).tolist()
    rows = [
        {
            'rank': r + 1,
            'index': i,
            'file': os.path.basename(files[i]),
            'score': round(float(scores[i]), 6),
        }
        for r, i in enumerate(ranking)
    ]
    print(f"ranking for {text!r} ({cfg.CLIP_PATH or cfg.CLIP_MODEL}):")
    for row in rows:
        print(f"  #{row['rank']:<3d} {row['file']:<10s} {row['score']:.4f}")
    utils.atomic_write_text(
        os.path.join(path, 'ranking.json'),
        json.dumps(
            {'text': text, 'model': cfg.CLIP_PATH or cfg.CLIP_MODEL, 'ranking': rows},
            indent=1,
            ensure_ascii=False,
        ),
    )
    k = min(cfg.TOP_K, len(files))
    top_grid(files, ranking, scores.tolist(), k, os.path.join(path, f'top{k}.png'))
    log.info(f"ranking.json and top{k}.png in {path}")
    return rows


if __name__ == '__main__':
    utils.run_main(main)
