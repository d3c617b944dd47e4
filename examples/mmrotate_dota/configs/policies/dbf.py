# (c) DBF, (rho = 1 ->) rho = alpha: the backbone trains every epoch for `warmup` epochs,
# then only every alpha-th epoch (Step(alpha): trainable when (epoch - warmup) % alpha == 0).
# Table I: warmup 50 (ResNet-50) or 400 (Swin-S); alpha in {2, 5, 10, inf}. Override with
#   --cfg-options custom_hooks.0.schedule.warmup=400 custom_hooks.0.schedule.then.rho=10
# Continuing a finished full-training run (as the paper does): train.py --resume-from
# work_dirs/<full run>/epoch_50.pth, with max_epochs the total; the hook re-evaluates the
# saved epoch under this schedule.
freeze_policy = dict(name="dbf")
custom_imports = dict(imports=["freezesched.integrations.mmengine"], allow_failed_imports=False)
custom_hooks = [
    dict(
        type="FreezeScheduleHook",
        module="backbone",
        schedule=dict(type="WarmupThenFreeze", warmup=50, then=dict(type="Step", rho=5)),
        on_unfreeze="keep",  # as the official DBF code: momentum survives a frozen phase
    ),
]
