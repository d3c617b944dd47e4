# Swin-S (ImageNet-1k pretrained) in place of ResNet-50; the FPN takes its four stages.
swin_s = dict(
    backbone=dict(
        _delete_=True,
        type="mmdet.SwinTransformer",
        embed_dims=96,
        depths=[2, 2, 18, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        mlp_ratio=4,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.3,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        convert_weights=True,
        init_cfg=dict(
            type="Pretrained",
            checkpoint="https://github.com/SwinTransformer/storage/releases/download/"
            "v1.0.0/swin_small_patch4_window7_224.pth",
        ),
    ),
    neck_in_channels=[96, 192, 384, 768],
)
