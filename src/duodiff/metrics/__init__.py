"""Sample-quality and cost metrics, one sub-command each.

    fid.py    `duodiff reference` (real images + their Inception features, once per dataset) and
              `duodiff fid` (FID and KID through clean-fid, "clean" or "legacy_pytorch" mode)
    cmmd.py   `duodiff cmmd` (CMMD, Jayasumana et al. 2024: CLIP ViT-L/14@336 embeddings, RBF MMD)
    flops.py  `duodiff flops` (FLOPs by torch.utils.flop_counter, per exit, per sample set)
"""
