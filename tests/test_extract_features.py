"""tools/extract_features.py end to end: a tiny random HF encoder against transformers (on a DAVIS frame), and a
tiny imported FlowFeat run directory (--checkpoint) against the torch FlowFeat."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import flowfeat_jax
from flowfeat_jax.apps.torch_files import import_flowfeat
from flowfeat_jax.torch_ref.flowfeat import TorchFlowFeat, TorchFlowFeatConfig
from flowfeat_jax.torch_ref.vit import HubViTConfig
from flowfeat_jax.viz import pca_image

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOL = REPO_ROOT / "tools" / "extract_features.py"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(scope="module")
def tiny_registers_model(tmp_path_factory):
    config = transformers.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    image_size=224, patch_size=14, mlp_ratio=2, num_register_tokens=2)
    torch.manual_seed(0)
    model = transformers.Dinov2WithRegistersModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    directory = tmp_path_factory.mktemp("dinov2_registers")
    model.save_pretrained(directory)
    return model, directory


def _run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=120)


def test_features_match_transformers_on_davis_frame(davis_root, tiny_registers_model, tmp_path):
    model, directory = tiny_registers_model
    frame = sorted((davis_root / "JPEGImages" / "480p").glob("*/00000.jpg"))[0]
    result = _run("--encoder", directory, "--image", frame, "--out", tmp_path / "feats.npz", "--pca",
                  tmp_path / "pca.png", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    features = np.load(tmp_path / "feats.npz")["encoder"]
    with Image.open(frame) as image:  # 854x480 -> nearest multiples of 14: 476 x 854
        height, width = (round(n / 14) * 14 for n in (image.height, image.width))
        pixels = (np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR), np.float32) / 255 - MEAN)
    pixels = torch.from_numpy(pixels / STD).permute(2, 0, 1)[None]
    with torch.inference_mode():
        tokens = model(pixels).last_hidden_state[0, 1 + 2:].numpy()
    assert features.dtype == np.float32 and features.shape == (height // 14, width // 14, 32)
    np.testing.assert_allclose(features, tokens.reshape(features.shape), atol=1e-4, rtol=0)
    with Image.open(tmp_path / "pca.png") as picture:
        assert picture.size == (width, height) and picture.mode == "RGB"


def _tool_main():
    """The tool's main(argv), imported from its file (the subprocess test above covers running it as a script)."""
    spec = importlib.util.spec_from_file_location("extract_features", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_bad_input_is_one_clear_line(tiny_registers_model, tmp_path, capsys):
    _, directory = tiny_registers_model
    main = _tool_main()
    missing = tmp_path / "no_such_frame.jpg"
    assert main(["--encoder", str(directory), "--image", str(missing), "--out", str(tmp_path / "feats.npz")]) != 0
    stderr = capsys.readouterr().err
    assert str(missing) in stderr and len(stderr.strip().splitlines()) == 1
    Image.new("RGB", (30, 20)).save(tmp_path / "small.png")
    argv = ["--encoder", str(directory), "--image", str(tmp_path / "small.png"), "--size", "20", "30", "--out",
            str(tmp_path / "feats.npz")]
    assert main(argv) != 0
    stderr = capsys.readouterr().err
    assert "14x28" in stderr and len(stderr.strip().splitlines()) == 1
    assert main(["--encoder", str(tmp_path), "--image", str(tmp_path / "small.png"), "--out", "x.npz"]) != 0
    assert "config.json" in capsys.readouterr().err
    assert not (tmp_path / "feats.npz").exists()


def test_pca_image_separates_regions():
    """Two feature clusters must get clearly different colours; output is uint8 (h, w, 3) and deterministic."""
    rng = np.random.default_rng(0)
    features = rng.normal(0, 0.01, (6, 8, 16))
    features[:, :4, 0] += 1.0
    picture = pca_image(features)
    assert picture.dtype == np.uint8 and picture.shape == (6, 8, 3)
    left, right = picture[:, :4].astype(int).mean((0, 1)), picture[:, 4:].astype(int).mean((0, 1))
    assert np.abs(left - right).max() > 200
    np.testing.assert_array_equal(picture, pca_image(features))


@pytest.fixture(scope="module")
def tiny_flowfeat_run(tmp_path_factory):
    """A released-layout torch FlowFeat (DINOv2 with 2 registers, width 64, d = 16) imported as a run directory."""
    encoder = HubViTConfig(patch_size=14, hidden_size=64, num_layers=4, num_heads=1, mlp_dim=128, num_registers=2,
                           layer_scale=True, mask_token=True, pos_grid=37, pos_antialias=True)
    torch.manual_seed(0)
    model = TorchFlowFeat(TorchFlowFeatConfig(encoder, (64,) * 4, 16, (0, 1, 2, 3))).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    directory = tmp_path_factory.mktemp("flowfeat")
    torch.save(model.state_dict(), directory / "released.pth")
    # Width 64 is no released width: its head count cannot be inferred from the shapes (an export would record it).
    return model, import_flowfeat(directory / "released.pth", directory / "run", num_heads=1)


def test_checkpoint_writes_encoder_and_flowfeat_features(tiny_flowfeat_run, tmp_path):
    model, run = tiny_flowfeat_run
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (100, 150, 3), np.uint8)).save(tmp_path / "frame.png")
    argv = ["--checkpoint", str(run), "--image", str(tmp_path / "frame.png"), "--out", str(tmp_path / "feats.npz"),
            "--pca", str(tmp_path / "pca.png"), "--stride", "1", "--dtype", "float32"]
    assert _tool_main()(argv) == 0
    saved = np.load(tmp_path / "feats.npz")
    height, width = 112, 140  # 100 x 150 rounded to multiples of 2 * 14 (the decoder needs an even token grid)
    with Image.open(tmp_path / "frame.png") as image:
        pixels = np.asarray(image.resize((width, height), Image.BILINEAR), np.float32) / 255
    pixels = torch.from_numpy((pixels - MEAN) / STD).permute(2, 0, 1)[None]
    with torch.inference_mode():
        encoder, flowfeat = (t[0].permute(1, 2, 0).numpy() for t in model(pixels))
    assert saved["encoder"].dtype == saved["flowfeat"].dtype == np.float32
    assert saved["encoder"].shape == (height // 14, width // 14, 64) and saved["flowfeat"].shape == (height, width, 16)
    np.testing.assert_allclose(saved["encoder"], encoder, atol=1e-4, rtol=0)
    np.testing.assert_allclose(saved["flowfeat"], flowfeat, atol=1e-4, rtol=0)
    for name, size in (("pca.png", (width, height)), ("pca_flowfeat.png", (width, height))):
        with Image.open(tmp_path / name) as picture:
            assert picture.size == size and picture.mode == "RGB"


def test_checkpoint_bad_input_is_one_clear_line(tiny_flowfeat_run, tmp_path, capsys):
    _, run = tiny_flowfeat_run
    main = _tool_main()
    Image.new("RGB", (30, 20)).save(tmp_path / "small.png")
    argv = ["--checkpoint", str(run), "--image", str(tmp_path / "small.png"), "--size", "42", "56", "--out",
            str(tmp_path / "feats.npz")]
    assert main(argv) != 0  # 42 is a multiple of the patch (14) but not of 2 * 14
    stderr = capsys.readouterr().err
    assert "42x56" in stderr and len(stderr.strip().splitlines()) == 1
    missing = tmp_path / "no_run"
    assert main(["--checkpoint", str(missing), "--image", str(tmp_path / "small.png"), "--out", "x.npz"]) != 0
    stderr = capsys.readouterr().err
    assert str(missing) in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "feats.npz").exists()


# --- many frames, load(), the online default, 16-bit frames, outputs checked first ---------------------------------


def _frames(count=5, size=(100, 150)):
    """Smooth moving blobs (they survive H.264 well enough to be a video, and differ frame to frame)."""
    yy, xx = np.mgrid[: size[0], : size[1]]
    return [np.stack([(128 + 100 * np.sin((xx + 7 * t) / 9 + c) * np.cos(yy / 11)).astype(np.uint8)
                      for c in range(3)], axis=-1) for t in range(count)]


@pytest.mark.slow
def test_folder_glob_and_mp4_in_batches_equal_per_image(tiny_flowfeat_run, tmp_path):
    from test_videos import write_mp4

    from flowfeat_jax.data import videos

    _, run = tiny_flowfeat_run
    folder = tmp_path / "frames"
    folder.mkdir()
    frames = _frames()
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{t:05d}.png")
    decoded = write_mp4(tmp_path / "clip.mp4", 5, size=(150, 100))
    decoded = list(videos.iter_frames(videos.list_videos(tmp_path / "clip.mp4", min_frames=1).videos[0]))
    per_image = flowfeat_jax.load(run, stride=2)  # one frame per call
    main = _tool_main()
    options = ["--checkpoint", str(run), "--stride", "2", "--dtype", "float32", "--batch-size", "2"]  # 2 + 2 + 1
    for source, name, expected_frames in ((folder, "folder", frames), (f"{folder}/*.png", "glob", frames),
                                          (tmp_path / "clip.mp4", "mp4", decoded)):
        assert main([*options, "--input", str(source), "--out", str(tmp_path / name)]) == 0
        encoder = np.load(tmp_path / name / "encoder.npy", mmap_mode="r")
        flowfeat = np.load(tmp_path / name / "flowfeat.npy", mmap_mode="r")
        assert encoder.shape == (5, 8, 10, 64) and flowfeat.shape == (5, 56, 70, 16)  # 112 x 140 input, stride 2
        for t, frame in enumerate(expected_frames):
            expected_encoder, expected_flowfeat = per_image(frame)
            np.testing.assert_allclose(encoder[t], expected_encoder, atol=1e-5, rtol=0)
            np.testing.assert_allclose(flowfeat[t], expected_flowfeat, atol=1e-5, rtol=0)
        info = json.loads((tmp_path / name / "info.json").read_text())
        assert info["num_frames"] == 5 and info["input_size"] == [112, 140] and info["stride"] == 2
        assert len((tmp_path / name / "frames.txt").read_text().splitlines()) == 5
    assert not np.allclose(decoded[0], decoded[4])  # the frames differ, so a row mix-up would fail above


@pytest.mark.slow
def test_load_run_dir_and_exported_pth_equal_extract_features(tiny_flowfeat_run, tmp_path):
    _, run = tiny_flowfeat_run
    frame = _frames(1)[0]
    Image.fromarray(frame).save(tmp_path / "frame.png")
    argv = ["--checkpoint", str(run), "--image", str(tmp_path / "frame.png"), "--out", str(tmp_path / "feats.npz"),
            "--dtype", "float32", "--stride", "1"]
    assert _tool_main()(argv) == 0
    saved = np.load(tmp_path / "feats.npz")
    spec = importlib.util.spec_from_file_location("export_torch", REPO_ROOT / "tools" / "export_torch.py")
    export_torch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_torch)
    assert export_torch.main(["--checkpoint", str(run), "--out", str(tmp_path / "exported.pth")]) == 0
    for source in (run, tmp_path / "exported.pth"):
        encoder, flowfeat = flowfeat_jax.load(source)(jnp.asarray(frame))  # a JAX array, 100 x 150 -> 112 x 140
        np.testing.assert_allclose(encoder, saved["encoder"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(flowfeat, saved["flowfeat"], atol=1e-5, rtol=0)
    batch_encoder, batch_flowfeat = flowfeat_jax.load(run, size=(56, 84))(np.stack([frame, frame[::-1]]))
    assert batch_encoder.shape == (2, 4, 6, 64) and batch_flowfeat.shape == (2, 56, 84, 16)


@pytest.mark.slow
def test_online_decoder_is_the_default(tmp_path):
    """A file with a distinct EMA decoder: load() and the tool use the online one unless asked for the EMA."""
    encoder = HubViTConfig(patch_size=14, hidden_size=64, num_layers=4, num_heads=1, mlp_dim=128, pos_grid=4)
    torch.manual_seed(1)
    model = TorchFlowFeat(TorchFlowFeatConfig(encoder, (64,) * 4, 16, (0, 1, 2, 3))).eval()
    state = model.state_dict()
    state.update({"decoder_ema.ema_model." + k[len("decoder."):]: v + 0.05 * torch.randn_like(v)
                  for k, v in state.items() if k.startswith("decoder.")})
    torch.save(state, tmp_path / "snapshot.pth")
    run = import_flowfeat(tmp_path / "snapshot.pth", tmp_path / "run", num_heads=1)
    frame = _frames(1, (56, 56))[0]
    pixels = torch.from_numpy((frame.astype(np.float32) / 255 - MEAN) / STD).permute(2, 0, 1)[None]
    with torch.inference_mode():
        online = model(pixels)[1][0].permute(1, 2, 0).numpy()
    _, default = flowfeat_jax.load(run)(frame)
    _, ema = flowfeat_jax.load(run, decoder="ema")(frame)
    np.testing.assert_allclose(default, online, atol=1e-4, rtol=0)
    assert np.abs(ema - online).max() > 1e-2
    Image.fromarray(frame).save(tmp_path / "frame.png")
    argv = ["--checkpoint", str(run), "--image", str(tmp_path / "frame.png"), "--out", str(tmp_path / "f.npz"),
            "--dtype", "float32", "--stride", "1"]
    assert _tool_main()(argv) == 0
    np.testing.assert_allclose(np.load(tmp_path / "f.npz")["flowfeat"], online, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_16_bit_png_is_scaled_by_its_bit_depth(tiny_flowfeat_run, tmp_path):
    _, run = tiny_flowfeat_run
    grey16 = (np.linspace(0, 65535, 56 * 84).reshape(56, 84)).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode == "I;16"
    grey8 = np.round(grey16 / 257.0).astype(np.uint8)
    main = _tool_main()
    argv = ["--checkpoint", str(run), "--image", str(tmp_path / "deep.png"), "--out", str(tmp_path / "deep.npz")]
    assert main([*argv, "--dtype", "float32"]) == 0
    _, expected = flowfeat_jax.load(run, stride=4)(np.repeat(grey8[..., None], 3, axis=-1))
    np.testing.assert_allclose(np.load(tmp_path / "deep.npz")["flowfeat"], expected, atol=1e-5, rtol=0)


def test_outputs_are_checked_before_anything_is_written(tiny_flowfeat_run, tmp_path, capsys):
    _, run = tiny_flowfeat_run
    Image.fromarray(_frames(1)[0]).save(tmp_path / "frame.png")
    main = _tool_main()

    def error_names(*named):
        lines = capsys.readouterr().err.strip().splitlines()
        return len(lines) == 1 and lines[0].startswith("extract_features: error: ") and all(n in lines[0] for n in named)

    base = ["--checkpoint", str(run), "--image", str(tmp_path / "frame.png")]
    assert main([*base, "--out", str(tmp_path / "feats")]) == 1  # np.savez would have written feats.npz
    assert error_names("--out", "feats", ".npz")
    for bad_pca in (tmp_path / "pca.jpgx", tmp_path / "no_dir" / "pca.png", tmp_path):
        assert main([*base, "--out", str(tmp_path / "feats.npz"), "--pca", str(bad_pca)]) == 1
        assert error_names(str(bad_pca))
    assert main(["--checkpoint", str(run), "--input", str(tmp_path / "*.none"), "--out", str(tmp_path / "x")]) == 1
    assert error_names("--input", "*.none")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frame.png"]
