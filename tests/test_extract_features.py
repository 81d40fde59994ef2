"""tools/extract_features.py end to end on a DAVIS frame with a tiny random HF model, against transformers."""

import importlib.util
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

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
                  tmp_path / "pca.png")
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
