"""Shared test fixtures: f32 matmuls, quiet torch threads, the DAVIS-2016 subset, a TensorBoard event reader."""

import os
import pathlib
import shutil

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Parity tests compare against torch in f32; XLA's default CPU matmul precision is already f32, but make it explicit.
jax.config.update("jax_default_matmul_precision", "float32")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DAVIS_ROOT = REPO_ROOT.parent / "shared" / "data" / "davis2016"


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:
        yield
        return
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def davis_root() -> pathlib.Path:
    """The shared DAVIS-2016 subset; skipped where absent (a user's clone), an error under CI."""
    if not (DAVIS_ROOT / "JPEGImages" / "480p").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the DAVIS-2016 subset is missing at {DAVIS_ROOT}")
        pytest.skip(f"DAVIS-2016 subset not found at {DAVIS_ROOT}")
    return DAVIS_ROOT


CLIP_SEQUENCES = ("blackswan", "dog-agility")
CLIP_FRAMES = 12


@pytest.fixture(scope="session")
def davis_clips(davis_root, tmp_path_factory) -> pathlib.Path:
    """A text list of two DAVIS sequences cut to their first 12 frames (copied), to keep exports fast."""
    root = tmp_path_factory.mktemp("clips")
    for name in CLIP_SEQUENCES:
        (root / name).mkdir()
        for frame in sorted((davis_root / "JPEGImages" / "480p" / name).glob("*.jpg"))[:CLIP_FRAMES]:
            shutil.copy(frame, root / name / frame.name)
    (root / "list.txt").write_text("\n".join(CLIP_SEQUENCES) + "\n")
    return root / "list.txt"


def save_hf_models(build, kinds, tmp_path_factory) -> dict:
    """kind -> (torch model, directory written by save_pretrained) for tiny `transformers` models built by `build`."""
    models = {}
    for kind in kinds:
        model = build(kind)
        directory = tmp_path_factory.mktemp(kind)
        model.save_pretrained(directory)
        models[kind] = (model, directory)
    return models


def random_images(height, width, batch=2, seed=0):
    """Deterministic NHWC float32 test images."""
    import numpy as np

    return np.random.default_rng(seed).standard_normal((batch, height, width, 3)).astype(np.float32)


def read_tensorboard_events(directory) -> list[tuple[int, str, object]]:
    """(step, tag, value) of every summary in the event files of `directory`: the float of a scalar, the decoded
    uint8 array of an image. A plain TFRecord reader (u64 length, u32 crc, data, u32 crc) over tensorboardX's
    protobuf classes, so reading needs neither TensorFlow nor tensorboard."""
    import io
    import struct

    from PIL import Image
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(pathlib.Path(directory).glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("image"):
                    picture = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
                    out.append((event.step, value.tag, picture))
                else:
                    out.append((event.step, value.tag, value.simple_value))
    return out
