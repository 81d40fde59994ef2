"""Every value issue 16 names in the paper configs (configs/*.py): the released recipe as default, recipe.md 9-13."""

import pytest

from flowfeat_jax.config import DAVIS2017_VAL3, load_config, steps_for

YTVOS = ("ytvos_dinov2_s14", "ytvos_dinov2_b14", "ytvos_dinov2_l14", "ytvos_dino_s16", "ytvos_dino_b16")
YTVOS_DINOV3 = ("ytvos_dinov3_s16", "ytvos_dinov3_b16")
KINETICS = ("kinetics_dinov2_b14", "kinetics_dino_b16", "kinetics_mae_b16")


@pytest.mark.parametrize("name", YTVOS + YTVOS_DINOV3)
def test_ytvos_configs_name_the_released_teacher_and_validation(name):
    config = load_config(name)
    assert (config.data.method, config.data.iters) == ("raft", 20)  # released ytvos.yaml RaftFlow, not SEA-RAFT
    assert config.data.timeflip is True and config.loss.ridge_alpha == 0.1
    assert config.train.num_steps == steps_for(3471, 500, 128) == 500 * 27
    # Model selection: every 10 epochs (of 27 steps; recipe.md step 10) on the 8 val3 videos, best kept.
    assert config.eval.every == steps_for(3471, 10, 128) == 270
    assert config.eval.sequences.split(",") == list(DAVIS2017_VAL3) and config.eval.split == "val"
    assert config.eval.keep_best is True and config.eval.davis == ""  # validation only where a DAVIS root is given


@pytest.mark.parametrize("name", KINETICS)
def test_kinetics_configs_hold_the_released_kinetics_yaml(name):
    config = load_config(name)
    assert config.loss.ridge_alpha == 1.0 and config.data.timeflip is False
    assert (config.data.method, config.data.iters) == ("searaft", 0)  # SEA-RAFT M at its default iterations
    assert config.train.num_steps == steps_for(240_000, 100, 128) == 100 * 1875
    assert config.eval.every == steps_for(240_000, 1, 128) and config.eval.keep_best is True


@pytest.mark.parametrize("name", YTVOS + YTVOS_DINOV3 + KINETICS)
def test_dino_and_dinov2_configs_interpolate_position_embeddings_as_torch_hub(name):
    config = load_config(name)
    hub = config.model.encoder_arch.startswith(("dino_", "dinov2_"))
    assert config.model.pos_interp == ("hub" if hub else "")
    assert hub == (config.model.encoder.startswith(("facebook/dino-", "facebook/dinov2-")))


def test_val3_subset_is_the_reference_list():
    assert DAVIS2017_VAL3 == (
        "bike-packing", "breakdance", "car-shadow", "dance-twirl", "shooting", "motocross-jump", "lab-coat", "kite-surf"
    )


def test_base_defaults_keep_older_runs_unchanged():
    """New fields default to what the code did before them: both time directions, no best checkpoint."""
    config = load_config("demo")
    assert config.data.timeflip is True and config.data.iters == 0 and config.eval.keep_best is False


def test_cocostuff_probe_holds_the_paper_settings():
    config = load_config("probe_cocostuff")
    assert (config.data.eval_crop, config.data.input_size) == (256, 0)  # 256 crops; network side from the patch
    assert (config.train.lr, config.train.weight_decay) == (1e-4, 1e-3)
    assert (config.train.batch_size, config.train.num_steps) == (32, 100_000)
    assert config.pamr.enabled and (config.pamr.kernel, config.pamr.size) == ("dense", 11)
    assert (config.pamr.scale, config.pamr.num_iter) == (0.1, 10)
    assert config.probe.downscale == 4 and config.features.decoder == "online"


def test_nyu_probe_holds_the_paper_settings():
    config = load_config("probe_nyu")
    assert (config.data.eval_crop, config.data.input_size) == (480, 0)
    assert (config.train.lr, config.train.weight_decay) == (1e-4, 1e-5)
    assert (config.train.batch_size, config.train.num_steps) == (16, 100_000)
    assert config.probe.num_bins == 256 and config.features.decoder == "online"


def test_probe_configs_use_the_train_config_names():
    """train.num_steps as in the train configs; the old train.steps is an error, in a config file or an override."""
    probe, train = load_config("probe_nyu"), load_config("demo")
    shared = {"num_steps", "batch_size", "lr", "weight_decay", "log_every", "checkpoint_every", "keep_checkpoints"}
    assert shared <= set(probe.train) and shared <= set(train.train)
    with pytest.raises(AttributeError, match="steps"):
        probe.train.steps = 10
    with pytest.raises(KeyError):
        probe.update_from_flattened_dict({"train.steps": 10})


def test_main_exports_with_the_configs_teacher_and_iterations(tmp_path, monkeypatch):
    """With data.videos and no export yet, the train loop exports with the config's teacher (method, iterations)."""
    from flowfeat_jax.data import export
    from flowfeat_jax.train import loop

    seen = []
    monkeypatch.setattr(export, "export_flows", lambda videos, out, cfg: seen.append((videos, out, cfg)))
    for name, teacher in (("ytvos_dinov2_s14", ("raft", 20)), ("kinetics_dino_b16", ("searaft", None))):
        config = load_config(name)
        config.data.videos = "/data/videos"
        config.data.checkpoint = "/weights.pth"
        assert loop.ensure_records(config.data, tmp_path / name) == tmp_path / name / "flow"
        videos, out, cfg = seen[-1]
        assert (videos, out, cfg.method, cfg.iters, cfg.checkpoint) == ("/data/videos", tmp_path / name / "flow",
                                                                         *teacher, "/weights.pth")
