# (a) Full training, rho = 1: the backbone trains every epoch. No hook needed; the epoch
# count is set per setting by train.py (--epochs) or --cfg-options train_cfg.max_epochs=N.
freeze_policy = dict(name="full", rho=1)
