"""Pure numerics on arrays: motion, QC, connectivity, registration, target.

Nothing here imports DICOM, ZeroMQ or web code: every function takes arrays
(with their affines) and returns arrays or plain dataclasses.
"""

from __future__ import annotations

from boldstream.analysis.connectivity import (
    ConnectivityFrame,
    OnlineRegression,
    SearchMaps,
    SeedConnectivity,
    bandpass,
    nuisance_regressors,
    partial_correlation,
)
from boldstream.analysis.guidance import (
    GUIDANCE_STATES,
    Guidance,
    GuidanceFit,
    GuidanceModel,
    GuidancePoint,
    fit_split_half,
)
from boldstream.analysis.motion import (
    PARAM_NAMES,
    MotionCorrector,
    MotionEstimate,
    displacement_mm,
    foreground_mask,
    matrix_to_params,
    params_to_matrix,
    rms_displacement_mm,
    volume_centre,
)
from boldstream.analysis.qc import QCAccumulator, QCFrame, std_dvars_scale
from boldstream.analysis.registration import (
    NativeRois,
    Registration,
    epi_like_template,
    map_to_native,
    native_rois,
    register_to_template,
)
from boldstream.analysis.rois import (
    SEARCH_CENTRES_MNI,
    SEED_MNI,
    TemplateRois,
    sphere_mask,
    template_rois,
)
from boldstream.analysis.target import (
    TargetEstimate,
    TargetPoint,
    TargetRules,
    TargetTracker,
    choose_target,
    smooth_in_region,
    target_coordinates,
)
from boldstream.analysis.template import Template, load_template
from boldstream.analysis.usable import UsableAtThreshold, UsableData, UsableSummary, minutes_to_goal

__all__ = [
    "GUIDANCE_STATES",
    "PARAM_NAMES",
    "SEARCH_CENTRES_MNI",
    "SEED_MNI",
    "ConnectivityFrame",
    "Guidance",
    "GuidanceFit",
    "GuidanceModel",
    "GuidancePoint",
    "MotionCorrector",
    "MotionEstimate",
    "NativeRois",
    "OnlineRegression",
    "QCAccumulator",
    "QCFrame",
    "Registration",
    "SearchMaps",
    "SeedConnectivity",
    "TargetEstimate",
    "TargetPoint",
    "TargetRules",
    "TargetTracker",
    "Template",
    "TemplateRois",
    "UsableAtThreshold",
    "UsableData",
    "UsableSummary",
    "bandpass",
    "choose_target",
    "displacement_mm",
    "epi_like_template",
    "fit_split_half",
    "foreground_mask",
    "load_template",
    "map_to_native",
    "matrix_to_params",
    "minutes_to_goal",
    "native_rois",
    "nuisance_regressors",
    "params_to_matrix",
    "partial_correlation",
    "register_to_template",
    "rms_displacement_mm",
    "smooth_in_region",
    "sphere_mask",
    "std_dvars_scale",
    "target_coordinates",
    "template_rois",
    "volume_centre",
]
