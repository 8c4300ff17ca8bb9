"""What every stage uses: errors and value checks, atomic I/O, CLI flags, images, config loading,
the study vocabulary, the diffusion and its samplers, guidance, datasets, latents and
torch.distributed. Nothing here imports a stage (train, sample, metrics, report).

    errors.py       DuodiffError and the check_* helpers (one message per bad value)
    io.py           atomic writes, json / csv, file_sha256, check_output_path
    flags.py        add_flag (the seeds' underscore aliases), OneLineErrorParser
    images.py       to_uint8, save_png, load_png, image_grid (the one grid maker)
    config.py       YAML loading and the value checks shared by the CLI and the workflow schema
    study.py        the study vocabulary: methods, samplers, set names and their labels
    diffusion.py    GaussianDiffusion: schedule, parametrizations, loss weights, the sampling loop
                    (DDPM, DDIM)
    dpm_solver.py   DPM-Solver++ through diffusers' scheduler, the loop's sampler dpm_solver
    guidance.py     classifier-free guidance: label checks, the null class, the guided policy
    data.py         datasets -> tensors in [-1, 1]
    latent.py       KL-f8 latents (LatentCodec) and `duodiff encode` (workflow/rules/encode.smk)
    distributed.py  torchrun set-up and reductions (training and the feature extraction)
"""
