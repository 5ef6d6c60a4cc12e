"""The stages of avatarize, one module and one class each, and the artifacts they trade.

Every artifact lives in WORKDIR/<stage>/<video id>/ (see pipeline/store.py). Frame
sequences are lossless FFV1 Matroska files written with pipeline.video.VideoWriter; arrays
are NPZ. T is the number of frames decoded from the source, P the number of person tracks
(P may be 0: a video with no person goes through every stage unchanged).
Cameras use the OpenCV convention: x right, y down, z forward, pixels from the top-left.

detect/<id>/
    people.npz   keypoints  float32 [T, P, 33, 3]  BlazePose landmarks: x px, y px, visibility
                 world      float32 [T, P, 33, 3]  BlazePose world landmarks (m, hip-centred)
                 boxes      float32 [T, P, 4]      x0, y0, x1, y1 px (NaN when absent)
                 scores     float32 [T, P]         detection confidence (0 when absent)
                 present    bool    [T, P]
                 track_ids  int32   [P]
    mask.mkv     gray8, the union of every person's segmentation (probability x 255)
    summary      {"video": {width, height, fps_num, fps_den, frame_count}, "tracks": P,
                  "frames_with_person": n}

fit/<id>/
    bodies.npz   track_ids  int32   [P]
                 present    bool    [T, P]
                 pose       float32 [T, P, J, 3]   body-model local joint rotations (axis-angle);
                                                  J: Anny's bones, 24 SMPL, 52 SMPL-H, 55 SMPL-X
                 root_orient float32 [T, P, 3]     global orientation (axis-angle, camera frame)
                 transl     float32 [T, P, 3]      root translation in camera coordinates (m)
                 phenotype  float32 [P, K]         the estimated shape (Anny phenotype or SMPL
                                                  betas; names in phenotype_labels)
                 joints3d   float32 [T, P, 23, 3]  the body model's COCO-23 keypoints, camera
                                                  coords (m)
                 fit_error  float32 [T, P]         mean reprojection error, px (NaN if absent)
                 camera     float32 [4]            fx, fy, cx, cy
    summary      {"body_model", "tracks", "mean_fit_error_px", "phenotype_labels"}

motion/<id>/
    bodies.npz   fit's bodies.npz, same keys and shapes. motion.enabled false: a byte-for-byte
                 copy. Enabled: pose, root_orient and joints3d of each track replaced by the
                 anonymized motion (privacy.motion_anonymizer, brought back to poses by IK);
                 joints3d = the body model's keypoints of the new pose with the fitted shape
    summary      {"enabled", "tracks_anonymized", "mean_joint_shift_m",
                  "mean_ik_direction_error_deg"}

render/<id>/
    avatar.mkv   rgba, the avatars over transparency (straight alpha)
    depth.mkv    gray16, avatar depth in millimetres at pixel centres (0 where no avatar)
    instances.mkv  gray8: 1 + the track slot (index into fit's track_ids) of the avatar seen
                 at each pixel centre, 255 for slot 254 and beyond, 0 = none; not
                 antialiased, agrees with depth.mkv pixel for pixel
    identities.json  body_model, phenotype_labels (the body model's shape labels: Anny
                 phenotype or beta0..), per track: slot, track_id, estimated_phenotype,
                 the sampled appearance (phenotype or betas, skin tone, hair, head cover,
                 clothes: top pattern, bottom style incl. skirt/dress and its pattern, seed)
    avatar_joints.npz  joints3d (T, P, 23, float32, NaN where absent): the avatars' COCO-23
                 keypoints as drawn (camera metres, new shape, after the shift); present,
                 track_ids, camera as in bodies.npz

inpaint/<id>/
    plate.mkv    rgb, the clean plate: the real people removed
    removed.mkv  gray8, 255 where the real person was removed (dilated mask)
    filled.mkv   gray8, 255 where the plate was image-inpainted (never seen uncovered)
    summary      {"removed_fraction", "temporal_fraction", "inpainted_fraction",
                  "view_fill_fraction", "hole_fraction", "fill" (classical | sd), with
                  fill=sd "sd_filled_fraction", "sd_fill_frames", "sd_fill_carried_frames",
                  "sd_fill_crops", "sd_fill_seconds"; camera alignment counts, ...}

harmonize/<id>/
    composite.mkv    rgb, the anonymized frames
    sensitivity.mkv  gray8, 255 = real background (still sensitive), 0 = synthesized
                     (avatar pixels and image-inpainted pixels)
    summary      {"method", "mean_avatar_coverage", "mean_sensitive_fraction"; sd-inpaint:
                  "mean_repainted_fraction", "repainted_crops", "keyframe_every",
                  "flicker_band" {sd, classical}}. Reads motion/bodies.npz only with
                  control=keypoints (the ControlNet's skeleton)

export: OUTPUT/<id>.mp4, OUTPUT/<id>.mask.mp4, OUTPUT/<id>.json, OUTPUT/dataset.json

train: nothing per video; with train.enabled, WORKDIR/training/<mode>/ (checkpoint.pt,
metrics.json) after the whole dataset is exported (training/run.py)
"""

from __future__ import annotations

from importlib import import_module

from pipeline.config import Section
from pipeline.stage import Stage

# Graph order: each stage comes after the stages it reads.
STAGE_MODULES = (
    ("detect", "stages.detect", "DetectStage"),
    ("fit", "stages.fit", "FitStage"),
    ("motion", "stages.motion", "MotionStage"),
    ("render", "stages.render", "RenderStage"),
    ("inpaint", "stages.inpaint", "InpaintStage"),
    ("harmonize", "stages.harmonize", "HarmonizeStage"),
    ("export", "stages.export", "ExportStage"),
    ("train", "stages.train", "TrainStage"),
)


# Config sections read by several stages (Stage.shared_sections), not owned by one.
SHARED_SECTIONS = (
    ("body", "stages.body_config", "BodySection"),
)


def stage_classes() -> list[type[Stage]]:
    return [getattr(import_module(mod), cls) for _, mod, cls in STAGE_MODULES]


def section_models() -> dict[str, type[Section]]:
    """Every config section but `run`: the shared ones, then one per stage."""
    out: dict[str, type[Section]] = {
        name: getattr(import_module(mod), cls) for name, mod, cls in SHARED_SECTIONS}
    out.update({cls.name: cls.config_model for cls in stage_classes()})
    return out
