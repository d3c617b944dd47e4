# DIOR-R at 800x800: MMRotate's DIORDataset reads DIOR-R's oriented XML annotations
# (Annotations/Oriented Bounding Boxes/*.xml) and the split lists (ImageSets/Main/*.txt)
# directly, so no conversion is needed. Train on `train`, evaluate on `val` (the paper
# reports the validation split). 20 classes. The same metric as DOTA: VOC07 11-point AP@50.
dior_r = dict(
    num_classes=20,
    train_dataloader=dict(
        batch_size=8,  # the paper's batch (one GPU); see _base_/paper.py
        dataset=dict(
            _delete_=True,
            type="DIORDataset",
            data_root="data/DIOR/",
            ann_file="ImageSets/Main/train.txt",
            data_prefix=dict(img_path="JPEGImages-trainval"),
            filter_cfg=dict(filter_empty_gt=True),
            pipeline=[
                dict(type="mmdet.LoadImageFromFile"),
                dict(type="mmdet.LoadAnnotations", with_bbox=True, box_type="qbox"),
                dict(type="ConvertBoxType", box_type_mapping=dict(gt_bboxes="rbox")),
                dict(type="mmdet.Resize", scale=(800, 800), keep_ratio=True),
                dict(
                    type="mmdet.RandomFlip",
                    prob=0.75,
                    direction=["horizontal", "vertical", "diagonal"],
                ),
                dict(type="mmdet.PackDetInputs"),
            ],
        ),
    ),
    val_dataloader=dict(
        dataset=dict(
            _delete_=True,
            type="DIORDataset",
            data_root="data/DIOR/",
            ann_file="ImageSets/Main/val.txt",
            data_prefix=dict(img_path="JPEGImages-trainval"),
            test_mode=True,
            pipeline=[
                dict(type="mmdet.LoadImageFromFile"),
                dict(type="mmdet.Resize", scale=(800, 800), keep_ratio=True),
                dict(type="mmdet.LoadAnnotations", with_bbox=True, box_type="qbox"),
                dict(type="ConvertBoxType", box_type_mapping=dict(gt_bboxes="rbox")),
                dict(
                    type="mmdet.PackDetInputs",
                    meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"),
                ),
            ],
        )
    ),
    val_evaluator=dict(type="DOTAMetric", metric="mAP", iou_thrs=[0.5], eval_mode="11points"),
)
