# Rotated FCOS, Swin-S + FPN, le90, DOTA v1.0, 1024x1024 patches.
# The ResNet-50 config with Swin-S (ImageNet-1k) as the backbone.
_base_ = ["fcos_r50_dota.py", "_base_/swin_s.py"]
model = dict(
    backbone={{_base_.swin_s.backbone}},
    neck=dict(in_channels={{_base_.swin_s.neck_in_channels}}),
)
