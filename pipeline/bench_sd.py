"""`make bench`, Stable Diffusion part: what harmonization and the learned plate fill cost.

    python -m pipeline.bench_sd --out bench/results

Writes OUT/sd.json (and prints it):
- cpu_tiny: seconds per frame of the harmonize stage with method classical and sd-inpaint,
  and of the inpaint stage with fill classical and sd, on a short generated video, with a
  tiny random SD inpainting pipeline (the real diffusers code path at toy size: it measures
  the stage's own overhead, not diffusion cost). The video: the harmonize and inpaint inputs
  of the first sample video a previous `python -m pipeline.bench` left in its scratch
  folder (work/bench/sample-work), else synthetic ones (a textured room, a walking avatar).
- full_size: only where CUDA is present, the SD 1.5 inpainting architecture (UNet 320/640/
  1280/1280 with 9 input channels, cross-attention 768; the SD KL autoencoder; CLIP ViT-L/14
  text encoder) built from config with random weights (diffusion cost does not depend on
  weight values), saved in diffusers layout and loaded by the stage's own loading code:
  seconds per image of the repaint call and frames per second of the whole harmonize stage,
  at 512x512, float16, batch sizes 1 and 4, 20 steps. Elsewhere it records
  {"full_size": "skipped: no CUDA"}.
Every record carries resolution, steps, dtype, batch and device.

The CLIP tokenizer vocabulary is written locally (byte-level BPE over the 256 byte symbols);
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.bench import REPO

# Where `python -m pipeline.bench` keeps its sample run (bench_dataset's layout).
BENCH_WORK = REPO / "work" / "bench" / "sample-work"
TINY_RESOLUTION = 64
FULL_RESOLUTION = 512
FULL_STEPS = 20
FULL_BATCHES = (1, 4)
FPS = Fraction(24, 1)
SYNTH_SIZE = (320, 240)  # the generated sample's size (stages.sample_data)
SYNTH_FRAMES = 24


# ---------------------------------------------------------------------------- models

def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes that CLIP's byte-level BPE uses (GPT-2's map)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_clip_tokenizer(folder: Path) -> Any:
    """vocab.json and merges.txt of a minimal CLIP BPE tokenizer, loaded as a tokenizer."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    merges = [("a", "n"), ("p", "e"), ("o", "n</w>")]
    vocab_list = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    vocab_list += ["".join(m) for m in merges]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    raw = folder / "raw"
    raw.mkdir(exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    # Loading from the two files works with both tokenizer back-ends of transformers.
    return CLIPTokenizer.from_pretrained(raw, model_max_length=77)


def tiny_components(seed: int = 0) -> dict[str, Any]:
    """SD 1.x inpainting at toy size (random weights fixed by `seed`)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cross = 32
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        sample_size=16, in_channels=9, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, sample_size=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=cross,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=600, max_position_embeddings=77, layer_norm_eps=1e-5,
    ))
    return {"unet": unet, "vae": vae, "scheduler": _scheduler(), "text_encoder": text_encoder}


def sd15_components(seed: int = 0) -> dict[str, Any]:
    """The SD 1.5 inpainting architecture (about 1.07 G parameters) with random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=9, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    # CLIP ViT-L/14's text tower; token ids of the local vocabulary fit in its embedding.
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=0, eos_token_id=1, pad_token_id=1, layer_norm_eps=1e-5,
    ))
    return {"unet": unet, "vae": vae, "scheduler": _scheduler(), "text_encoder": text_encoder}


def _scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def save_inpaint_pipeline(folder: Path, parts: dict[str, Any], half: bool = False) -> Path:
    """An SD inpainting pipeline in diffusers layout (what users point a model path at)."""
    from diffusers import StableDiffusionInpaintPipeline

    tokenizer = write_clip_tokenizer(folder.parent / f"{folder.name}_tokenizer_src")
    pipe = StableDiffusionInpaintPipeline(
        **parts, tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    if half:  # halves the bytes written and read; the stage loads in float16 anyway
        import torch

        pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# ---------------------------------------------------------------------------- inputs

def _write(path: Path, frames: np.ndarray, kind: str) -> Path:
    from pipeline.video import VideoWriter

    with VideoWriter(path, FPS, frames.shape[2], frames.shape[1], kind) as w:
        w.write_chunk(frames)
    return path


def _room(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A textured background (walls with a pattern, noise), uint8 [H, W, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([110 + 50 * np.sin(xx / 13.0) * np.cos(yy / 9.0),
                     120 + 40 * np.sin((xx + yy) / 17.0),
                     100 + 45 * np.cos(xx / 7.0 - yy / 19.0)], axis=-1)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def _person_mask(width: int, height: int, cx: float) -> np.ndarray:
    """A standing person's silhouette (head, torso, legs), bool [H, W]."""
    mask = np.zeros((height, width), np.uint8)
    top, h = int(0.2 * height), int(0.7 * height)
    w = h // 4
    cv2.ellipse(mask, (int(cx), top + h // 10), (w // 4, h // 10), 0, 0, 360, 1, -1)
    cv2.rectangle(mask, (int(cx - w // 2), top + h // 5), (int(cx + w // 2), top + 3 * h // 5),
                  1, -1)
    cv2.rectangle(mask, (int(cx - w // 2), top + 3 * h // 5), (int(cx + w // 2), top + h), 1, -1)
    return mask > 0


def synthetic_harmonize_inputs(root: Path, frames: int = SYNTH_FRAMES,
                               size: tuple[int, int] = SYNTH_SIZE) -> dict[str, Any]:
    """render/ and inpaint/ artifacts for one video: a room and an avatar walking across."""
    width, height = size
    render, inpaint = root / "render", root / "inpaint"
    render.mkdir(parents=True)
    inpaint.mkdir(parents=True)
    plate = np.repeat(_room(width, height)[None], frames, axis=0)
    avatar = np.zeros((frames, height, width, 4), np.uint8)
    for t in range(frames):
        mask = _person_mask(width, height, width * (0.3 + 0.4 * t / max(1, frames - 1)))
        avatar[t][mask] = (200, 150, 90, 255)
    _write(inpaint / "plate.mkv", plate, "rgb")
    _write(inpaint / "filled.mkv", np.zeros(plate.shape[:3], np.uint8), "gray")
    _write(render / "avatar.mkv", avatar, "rgba")
    _write(render / "instances.mkv", (avatar[..., 3] > 127).astype(np.uint8), "gray")
    depth = np.where(avatar[..., 3] > 127, 3000, 0).astype(np.uint16)
    _write(render / "depth.mkv", depth, "gray16")
    (render / "identities.json").write_text(json.dumps({"tracks": [
        {"track_id": 0, "slot": 0, "age_years": 35.0, "phenotype": {"gender": 0.2},
         "top": {"name": "navy", "pattern": "plain"}, "bottom": {"name": "grey"}}]}))
    return {"video": "synthetic", "render": render, "inpaint": inpaint, "frames": frames,
            "width": width, "height": height}


def bench_work_inputs(workdir: Path) -> dict[str, Any] | None:
    """The harmonize inputs of the first video a previous pipeline bench left, or None."""
    from pipeline.video import count_frames, probe

    render_root = workdir / "render"
    if not render_root.is_dir():
        return None
    for render in sorted(render_root.iterdir()):
        inpaint = workdir / "inpaint" / render.name
        needed = [render / "avatar.mkv", render / "instances.mkv", inpaint / "plate.mkv",
                  inpaint / "filled.mkv"]
        if all(p.is_file() for p in needed):
            info = probe(inpaint / "plate.mkv")
            return {"video": render.name, "render": render, "inpaint": inpaint,
                    "frames": count_frames(inpaint / "plate.mkv"), "width": info.width,
                    "height": info.height}
    return None


def _job(inputs: dict[str, Any], out: Path, source: Path | None = None) -> Any:
    from pipeline.config import RunSection
    from pipeline.dataset import VideoItem
    from pipeline.stage import VideoJob

    out.mkdir(parents=True)
    info = {"width": inputs["width"], "height": inputs["height"], "fps_num": FPS.numerator,
            "fps_den": FPS.denominator, "frame_count": inputs["frames"]}
    path = source or inputs["inpaint"] / "plate.mkv"
    return VideoJob(
        video=VideoItem(id=inputs["video"], path=path, rel_path=path.name),
        inputs={k: inputs[k] for k in ("detect", "fit", "render", "inpaint") if k in inputs},
        out_dir=out, run=RunSection(chunk_frames=16, progress=False),
        upstream={"inpaint": {"video": info}, "detect": {"video": info}},
    )


# ---------------------------------------------------------------------------- timing

def _timed(stage: Any, job: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """Run one stage on one job; model loading (setup) is timed apart. `keys`: summary
    entries copied into the record where present."""
    started = time.perf_counter()
    stage.setup()
    load = time.perf_counter() - started
    started = time.perf_counter()
    summary = stage.process(job)
    seconds = time.perf_counter() - started
    stage.teardown()
    frames = int(summary["frames"])
    return {"frames": frames, "seconds": round(seconds, 3), "load_seconds": round(load, 3),
            "s_per_frame": round(seconds / frames, 4),
            "frames_per_s": round(frames / seconds, 3),
            **{k: summary[k] for k in keys if k in summary}}


def time_harmonize(inputs: dict[str, Any], out: Path, **config: Any) -> dict[str, Any]:
    """Run the harmonize stage once; model loading (setup) is timed apart."""
    from stages.harmonize import HarmonizeConfig, HarmonizeStage

    job = _job(inputs, out)
    return _timed(HarmonizeStage(HarmonizeConfig(**config), job.run), job,
                  ("repainted_crops",))


def synthetic_inpaint_inputs(root: Path, frames: int = SYNTH_FRAMES,
                             size: tuple[int, int] = SYNTH_SIZE) -> dict[str, Any]:
    """A source video and detect artifacts: one person walking across (the background
    behind them is seen before or after) and one standing still (a hole to fill)."""
    width, height = size
    detect = root / "detect"
    detect.mkdir(parents=True)
    room = _room(width, height, seed=1)
    video = np.repeat(room[None], frames, axis=0)
    masks = np.zeros((frames, height, width), np.uint8)
    boxes = np.full((frames, 2, 4), np.nan, np.float32)
    still = _person_mask(width, height, 0.8 * width)
    for t in range(frames):
        walker = _person_mask(width, height, width * (0.15 + 0.4 * t / max(1, frames - 1)))
        for p, mask in enumerate((walker, still)):
            video[t][mask] = (230, 40, 200)
            masks[t][mask] = 255
            ys, xs = np.nonzero(mask)
            boxes[t, p] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    source = _write(root / "source.mkv", video, "rgb")
    _write(detect / "mask.mkv", masks, "gray")
    present = np.isfinite(boxes).all(axis=2)
    np.savez(detect / "people.npz", keypoints=np.zeros((frames, 2, 33, 3), np.float32),
             world=np.zeros((frames, 2, 33, 3), np.float32), boxes=boxes,
             scores=present.astype(np.float32), present=present,
             track_ids=np.arange(2, dtype=np.int32))
    return {"video": "synthetic", "detect": detect, "source": source, "frames": frames,
            "width": width, "height": height}


def time_inpaint(inputs: dict[str, Any], out: Path, **config: Any) -> dict[str, Any]:
    from stages.inpaint import InpaintConfig, InpaintStage

    job = _job(inputs, out, source=inputs["source"])
    return _timed(InpaintStage(InpaintConfig(**config), job.run), job,
                  ("hole_fraction", "sd_filled_fraction", "sd_fill_crops",
                   "sd_fill_carried_frames", "sd_fill_seconds"))


def bench_cpu_tiny(scratch: Path, steps: int) -> dict[str, Any]:
    """Harmonize (classical vs sd-inpaint) and inpaint (fill classical vs sd), tiny model."""
    import torch

    # Tiny models gain nothing from threads; on a busy small machine they lose a lot.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = save_inpaint_pipeline(scratch / "tiny", tiny_components())
        inputs = bench_work_inputs(BENCH_WORK) or synthetic_harmonize_inputs(scratch / "h-in")
        common = {"resolution": TINY_RESOLUTION, "steps": steps, "dtype": "float32",
                  "batch": 4, "device": "cpu", "torch_threads": 1}
        sd = {"method": "sd-inpaint", "model": str(model), "resolution": TINY_RESOLUTION,
              "steps": steps, "device": "cpu", "batch_size": 4}
        # Classical work is per pixel of the whole frame, one frame at a time, in numpy/cv2.
        plain = {"resolution": f"{inputs['width']}x{inputs['height']} (frame)", "steps": 0,
                 "dtype": "uint8/float32 (cv2)", "batch": 1, "device": "cpu"}
        harmonize = {
            "video": f"{inputs['video']} ({inputs['width']}x{inputs['height']}, "
                     f"{inputs['frames']} frames)",
            "classical": {**plain, **time_harmonize(inputs, scratch / "h-classical")},
            "sd-inpaint": {**common, "strength": 0.4, "steps_run": int(steps * 0.4),
                           **time_harmonize(inputs, scratch / "h-sd", **sd)},
        }
        fill_in = synthetic_inpaint_inputs(scratch / "i-in")
        fill = {"video": f"synthetic ({fill_in['width']}x{fill_in['height']}, "
                         f"{fill_in['frames']} frames, one person never moves)",
                "classical": {**plain, "resolution": f"{fill_in['width']}x"
                              f"{fill_in['height']} (frame)",
                              **time_inpaint(fill_in, scratch / "i-classical")}}
        sd_fill = {"fill": "sd", "fill_model": str(model), "fill_resolution": TINY_RESOLUTION,
                   "fill_steps": steps, "fill_device": "cpu"}
        for every in (1, 8):
            # One hole crop per frame here: the fill's model calls are per frame, batch 1.
            fill[f"sd (fill_every {every})"] = {
                **common, "batch": 1, "strength": 1.0, "steps_run": steps,
                **time_inpaint(fill_in, scratch / f"i-sd-{every}", **sd_fill,
                               fill_every=every)}
    finally:
        torch.set_num_threads(threads)
    return {"harmonize": harmonize, "inpaint_fill": fill}


def time_repaint(model: Path, batch: int, steps: int, device: str,
                 repeats: int = 3) -> dict[str, Any]:
    """Seconds per image of one batched repaint call at full strength (all steps run)."""
    import torch

    from stages.sd_inpaint import Repainter, SDOptions, load_pipeline

    opts = SDOptions(model=str(model), device=device, dtype="float16",
                     resolution=FULL_RESOLUTION, steps=steps, strength=1.0, guidance=5.0,
                     batch_size=batch, negative_prompt="blurry")
    pipe = load_pipeline(opts)
    repaint = Repainter(pipe, opts)
    rng = np.random.default_rng(0)
    size = FULL_RESOLUTION
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    masks = np.zeros((batch, size, size), bool)
    masks[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = True
    prompts, tracks = ["a person"] * batch, list(range(batch))

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    repaint(images, masks, prompts, tracks)  # warm-up (kernels, allocator)
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        repaint(images, masks, prompts, tracks)
        sync()
        times.append(time.perf_counter() - started)
    dtype = str(next(pipe.unet.parameters()).dtype).removeprefix("torch.")
    del pipe, repaint
    if device == "cuda":
        torch.cuda.empty_cache()
    seconds = float(np.median(times))
    return {"resolution": size, "steps": steps, "dtype": dtype, "batch": batch,
            "device": device, "s_per_call": round(seconds, 4),
            "s_per_image": round(seconds / batch, 4), "images_per_s": round(batch / seconds, 3)}


def bench_full_size(scratch: Path, device: str, steps: int, batches: tuple[int, ...],
                    frames: int) -> list[dict[str, Any]]:
    """SD 1.5 inpainting with random weights: the repaint call and the whole stage."""
    started = time.perf_counter()
    model = save_inpaint_pipeline(scratch / "sd15", sd15_components(), half=True)
    build = round(time.perf_counter() - started, 1)
    inputs = bench_work_inputs(BENCH_WORK) or synthetic_harmonize_inputs(
        scratch / "full-in", frames=frames)
    records = []
    for batch in batches:
        call = time_repaint(model, batch, steps, device)
        stage = time_harmonize(
            inputs, scratch / f"full-stage-{batch}", method="sd-inpaint", model=str(model),
            resolution=FULL_RESOLUTION, steps=steps, strength=1.0, batch_size=batch,
            device=device, dtype="float16")
        records.append({**call, "build_seconds": build, "strength": 1.0,
                        "stage": {"video": f"{inputs['video']} ({inputs['width']}x"
                                  f"{inputs['height']})", **stage}})
    return records


# ---------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "bench/results")
    p.add_argument("--tiny-steps", type=int, default=20)
    p.add_argument("--no-tiny", action="store_true", help="skip the tiny CPU timings")
    p.add_argument("--full-size", choices=("auto", "force", "skip"), default="auto",
                   help="auto: only with CUDA; force: also on CPU (float32, slow: for checks)")
    p.add_argument("--full-steps", type=int, default=FULL_STEPS)
    p.add_argument("--full-batches", type=int, nargs="+", default=list(FULL_BATCHES))
    p.add_argument("--full-frames", type=int, default=SYNTH_FRAMES,
                   help="frames of the synthetic video for the full-size stage timing")
    args = p.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    cuda = torch.cuda.is_available()
    env = {"machine": platform.machine(), "cpus": os.cpu_count(),
           "device": torch.cuda.get_device_name(0) if cuda else "cpu",
           "torch": torch.__version__}
    results: dict[str, Any] = {"env": env}
    with tempfile.TemporaryDirectory(prefix="bench_sd_") as tmp:
        scratch = Path(tmp)
        if not args.no_tiny:
            results["cpu_tiny"] = bench_cpu_tiny(scratch / "tiny", args.tiny_steps)
            shutil.rmtree(scratch / "tiny", ignore_errors=True)
        if args.full_size == "force" or (args.full_size == "auto" and cuda):
            results["full_size"] = bench_full_size(
                scratch / "full", "cuda" if cuda else "cpu", args.full_steps,
                tuple(args.full_batches), args.full_frames)
        else:
            results["full_size"] = "skipped: no CUDA" if not cuda else "skipped"
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2)
    (args.out / "sd.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
