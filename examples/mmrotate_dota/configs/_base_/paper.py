# The DBF paper's training details (Sec. III-A), referenced by every detector config as
# {{_base_.paper.*}}: SGD with momentum 0.9 and weight decay 1e-4, batch 8, initial
# learning rate 0.005, a 500-iteration linear warm-up from 1/3 of it, decay after the
# 12th epoch, gradient clipping at L2 norm 35, seed 0.
#
# Choices where the paper is ambiguous (see ../README.md, "Deviations"):
# - "decayed by 1/4 after the 12th epoch" is read as lr x 0.25 from epoch 12 on;
# - batch 8 is the total batch (set in the dataset files): 8 images on one GPU; with n
#   GPUs use train_dataloader.batch_size=8/n, or enable auto_scale_lr.
paper = dict(
    optim_wrapper=dict(
        type="OptimWrapper",
        optimizer=dict(type="SGD", lr=0.005, momentum=0.9, weight_decay=0.0001),
        clip_grad=dict(max_norm=35, norm_type=2),
    ),
    param_scheduler=[
        dict(type="LinearLR", start_factor=1.0 / 3, by_epoch=False, begin=0, end=500),
        dict(type="MultiStepLR", by_epoch=True, begin=0, end=100000, milestones=[12], gamma=0.25),
    ],
    auto_scale_lr=dict(enable=False, base_batch_size=8),
)
