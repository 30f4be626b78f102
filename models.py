"""The networks of t2i-repro, in one section per paper:

  Evaluation networks (FID Inception-v3, the shapes judge)
  DAMSM (AttnGAN/DM-GAN) and CLIP encoders
  DM-GAN
  XMC-GAN
  DALLE (DiscreteVAE, taming VQGAN, DALLE transformer)
"""
