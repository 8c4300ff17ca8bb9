"""`duodiff train` (workflow/rules/train.smk): the full, shallow and early-exit U-ViTs.

    loop.py         run_train and the loop in named steps (build_run, train_step, ...)
    checks.py       the one check pass of `duodiff train` (check_train_args -> TrainPlan)
    determinism.py  the per-(seed, step) draws, the step batch sampler, RNG states
    optim.py        warm-up + cosine learning rate, EMA update
    process.py      SIGTERM / SIGINT (TrainingStopped), the torchrun relaunch
"""
