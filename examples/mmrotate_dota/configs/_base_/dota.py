# DOTA v1.0 cut into 1024x1024 patches (gap 200) with MMRotate's split tool (see
# ../README.md): train on the train split, evaluate on the val split (the paper reports
# the validation split). 15 classes. DOTAMetric: VOC07 11-point AP@50, as the official
# DBF code evaluates on the patches.
dota = dict(
    num_classes=15,
    train_dataloader=dict(
        batch_size=8,  # the paper's batch (one GPU); see _base_/paper.py
        dataset=dict(
            data_root="data/split_ss_dota/",
            ann_file="train/annfiles/",
            data_prefix=dict(img_path="train/images/"),
        ),
    ),
    val_dataloader=dict(
        dataset=dict(
            data_root="data/split_ss_dota/",
            ann_file="val/annfiles/",
            data_prefix=dict(img_path="val/images/"),
        )
    ),
    val_evaluator=dict(type="DOTAMetric", metric="mAP", iou_thrs=[0.5], eval_mode="11points"),
)
