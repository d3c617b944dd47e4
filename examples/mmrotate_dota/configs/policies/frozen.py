# (b) Frozen backbone, rho = inf: the backbone never trains (its BatchNorm stays in eval).
freeze_policy = dict(name="frozen", rho="inf")
custom_imports = dict(imports=["freezesched.integrations.mmengine"], allow_failed_imports=False)
custom_hooks = [
    dict(type="FreezeScheduleHook", module="backbone", schedule=dict(type="Constant", frozen=True)),
]
