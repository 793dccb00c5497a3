"""The automatic generator's parameters and their defaults: the one source of them.

Kept apart from model/amg.py (torch, OpenCV) so the configuration can take its defaults from here cheaply:
`stages.auto` in engine/integrations/config.py defaults every key to the value below, and
engine/integrations/runtime.py `amg_params` builds an AmgParams from the config field by field.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AmgParams:
    """Parameters of automatic mask generation (SAM's defaults; names as SAM's generator).

    max_mask_fraction: masks covering at least this share of the image are dropped (SA-1B).
    stability_prefilter_margin: the low-resolution stability pre-filter keeps candidates scoring
    at least stability_score_thresh - margin; the exact (full-resolution) score then decides.
    (Measured: full-res minus low-res score up to 0.12 for soft masks of a briefly trained model.)
    edge_tolerance_px: a mask box side within this many pixels of an inner crop edge touches it.
    multimask_output, use_m2m: Meta's SAM2AutomaticMaskGenerator's options of the same names.
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 100
    max_mask_fraction: float = 0.95
    stability_prefilter_margin: float = 0.15
    mask_threshold: float = 0.0
    edge_tolerance_px: float = 20.0
    multimask_output: bool = True  # 3 masks per point (False: one, SAM 2's generator option)
    use_m2m: bool = False  # SAM 2's generator option: refine every candidate once with its own logits as a mask prompt
