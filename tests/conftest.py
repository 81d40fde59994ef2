"""Shared test fixtures: f32 matmuls, quiet torch threads, the DAVIS-2016 subset, the one tiny FlowFeat (config, CLI
flags, a compiled train step shared by the session), a TensorBoard event reader."""

import os
import pathlib
import shutil

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import flax.nnx as nnx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from flowfeat_jax.config import base_config  # noqa: E402
from flowfeat_jax.ports import build as build_lib  # noqa: E402
from flowfeat_jax.train import loop  # noqa: E402
from flowfeat_jax.train import step as step_lib  # noqa: E402

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


# The one tiny FlowFeat of every test that builds a whole model from a config: a 4-block width-32 DINOv2-S/14 shape
# and a width-16 decoder, seconds per train step on two cores.
TINY_MODEL = {
    "model.encoder_size.hidden_size": 32,
    "model.encoder_size.num_layers": 4,
    "model.encoder_size.num_heads": 2,
    "model.encoder_size.mlp_dim": 64,
    "model.features": 16,
}


def config_flags(overrides: dict) -> list[str]:
    """--config.<key>=<value> command-line flags of flattened config overrides (e.g. TINY_MODEL)."""
    return [f"--config.{key}={value}" for key, value in overrides.items()]


def tiny_config(num_steps=6):
    """The tiny model on synthetic motion at 56 px crops of 112 px frames, batch 2, a checkpoint every 3 steps."""
    config = base_config()
    config.update_from_flattened_dict(TINY_MODEL)
    config.data.source = "synthetic"
    config.data.frame_size = 112
    config.data.flow_size = 56
    config.train.input_size = 56
    config.train.batch_size = 2
    config.train.num_steps = num_steps
    config.train.log_every = 1
    config.train.checkpoint_every = 3
    return config


def tiny_train_state(config):
    """(model, step 0 train state, jitted train step without donation, encoder params) of a config."""
    model, _ = build_lib.build_flowfeat(config.model, config.seed)
    graphdef, model_state = nnx.split(model)
    pure = nnx.to_pure_dict(model_state)
    tx = loop.make_optimizer(config.train, config.model.random_decoder)
    state = loop.init_train_state(pure["decoder"], tx, config.seed, loop.initial_flow_head(config))
    train_step = jax.jit(step_lib.make_train_step(graphdef, tx, loop.step_config(config)))
    return model, state, train_step, pure["encoder"]


@pytest.fixture(scope="session")
def tiny_step():
    """tiny_train_state(tiny_config()), compiled once for every test that only reads it (the step donates nothing)."""
    return tiny_train_state(tiny_config())


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
