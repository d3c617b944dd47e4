# Rotated Faster R-CNN, ResNet-50 + FPN, le90, DIOR-R, 800x800; the DBF paper's
# training details. Pick a training policy with train.py --policy configs/policies/*.py.
_base_ = [
    "mmrotate::rotated_faster_rcnn/rotated-faster-rcnn-le90_r50_fpn_1x_dota.py",
    "_base_/paper.py",
    "_base_/dior_r.py",
]
optim_wrapper = {{_base_.paper.optim_wrapper}}
param_scheduler = {{_base_.paper.param_scheduler}}
auto_scale_lr = {{_base_.paper.auto_scale_lr}}
randomness = dict(seed=0)
train_dataloader = {{_base_.dior_r.train_dataloader}}
val_dataloader = {{_base_.dior_r.val_dataloader}}
test_dataloader = val_dataloader
val_evaluator = {{_base_.dior_r.val_evaluator}}
test_evaluator = val_evaluator
default_hooks = dict(checkpoint={{_base_.paper.checkpoint}})
model = dict(
    backbone={{_base_.paper.resnet}},
    roi_head=dict(bbox_head=dict(num_classes={{_base_.dior_r.num_classes}})),
)
