"""flowfeat_jax.apps.validation: the in-training DAVIS callback passes the eval section through and names its scores."""

from flowfeat_jax.apps import validation
from flowfeat_jax.config import base_config
from flowfeat_jax.eval import features


def test_davis_validation_passes_the_eval_section_and_prefixes_the_scores(tmp_path, monkeypatch):
    calls = []

    def evaluate_davis(model, root, out_dir, **kwargs):
        calls.append((model, root, out_dir, kwargs))
        scores = {"JF_mean": 0.5, "J_mean": 0.4, "F_mean": 0.6}
        return {"flowfeat": {"knn": scores, "linear": dict(scores, JF_mean=0.7)}, "encoder": {"knn": scores}}

    monkeypatch.setattr(features, "evaluate_davis", evaluate_davis)
    eval_cfg = base_config().eval
    eval_cfg.update(davis="/data/DAVIS", sequences="bike-packing,,kite-surf", protocols="knn,linear", short_side=224)
    scores = validation.davis_validation(eval_cfg)("model", tmp_path, ("flowfeat", "encoder"))
    assert calls == [("model", "/data/DAVIS", tmp_path, {
        "split": "val", "sequences": ["bike-packing", "kite-surf"], "protocols": ["knn", "linear"],
        "feature_kinds": ("flowfeat", "encoder"), "short_side": 224, "max_frames": None,  # 0 = every frame
    })]
    assert scores["eval/knn/JF_mean"] == 0.5 and scores["eval/linear/JF_mean"] == 0.7
    assert scores["eval/encoder/knn/F_mean"] == 0.6 and len(scores) == 9
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].startswith("| features | protocol |") and "| flowfeat | linear | 0.7000 |" in table[3]
