# GOL (Gumbel + DropLoss), Mask R-CNN R50-FPN, 2x schedule, LVIS v1: the recipe of the GOL paper's
# Table 3 R50 row, for mmdetection 3.x. Train with mmdet's own tools, e.g.
#   bash tools/dist_train.sh /path/to/this/file 8
# with gumbel-kernels installed; LVIS v1 under data/lvis_v1/ as mmdet's LVIS configs expect.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/lvis_v1_instance.py',  # RFS: ClassBalancedDataset, oversample 1e-3
    'mmdet::_base_/schedules/schedule_2x.py',  # 24 epochs, steps 16/22, SGD 0.02 for 16 images
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(
    imports=['gumbel_kernels.integrations.mmdet'], allow_failed_imports=False)

data_root = 'data/lvis_v1/'
model = dict(
    roi_head=dict(
        bbox_head=dict(
            num_classes=1203,
            # Gumbel activation + DropLoss over a 1203-way fc_cls (no background logit); the
            # rare classes (image frequency < 0.0011) come from the train json's image_count.
            loss_cls=dict(
                type='GOLLoss',
                num_classes=1203,
                ann_file=data_root + 'annotations/lvis_v1_train.json',
                lambda_=0.0011,
                loss_weight=1.0),
            # As the official config: this replaces the head's default init_cfg, so only fc_cls
            # gets a constant init (weight 0.001, bias -2, i.e. Gumbel scores ~ exp(-e^2) at
            # start); shared_fcs and fc_reg keep PyTorch's default Linear init.
            init_cfg=dict(
                type='Constant', val=0.001, bias=-2, override=dict(name='fc_cls'))),
        mask_head=dict(
            num_classes=1203,
            # Normalized (cosine) mask predictor, temperature 20 (mmdet spells the argument
            # `tempearture`).
            predictor_cfg=dict(type='NormedConv2d', tempearture=20))),
    test_cfg=dict(
        rcnn=dict(
            score_thr=0.0001,
            nms=dict(type='nms', iou_threshold=0.3),
            max_per_img=300)))  # LVIS evaluates up to 300 detections per image

train_dataloader = dict(
    dataset=dict(type='ClassBalancedDataset', oversample_thr=1e-3))

train_cfg = dict(val_interval=24)
