"""The README works from a user's clone: no ../shared paths, and every command it shows names tools, configs, files,
flags and config keys that exist. Also the tools' --help texts and score_davis --max_frames."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flowfeat_jax.config import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DEMO_CLIP = REPO / "flowfeat_jax" / "assets" / "demo_clip"
ARGPARSE_TOOLS = ("export_flow", "extract_features", "export_torch", "import_torch", "inspect_checkpoint", "benchmark")
ABSL_COMMANDS = {"flowfeat_jax.main": "flowfeat_jax/main.py", "flowfeat_jax.evaluate": "flowfeat_jax/evaluate.py",
                 "flowfeat_jax.probe": "flowfeat_jax/probe.py", "tools/score_davis.py": "tools/score_davis.py",
                 "tools/experiment_davis.py": "tools/experiment_davis.py"}


def readme_commands() -> list[list[str]]:
    """The `python ...` command lines of the README's bash blocks (continuations joined), as argv lists."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line.startswith("#"):  # a comment line
                continue
            for part in re.split(r"&&|;|\bdo\b|&", line):
                words = shlex.split(part.replace("[", "").replace("]", ""))
                words = words[1:] if words[:1] == ["srun"] else words
                words = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)]  # CUDA_VISIBLE_DEVICES=$i
                if words[:1] == ["python"]:
                    commands.append(words[1:])
    return commands


def test_readme_names_no_shared_folder():
    assert "../shared" not in README


def _config_file(argv: list[str]) -> str | None:
    for i, word in enumerate(argv):
        if word == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith("--config="):
            return word.split("=", 1)[1]
    return None


def _has_flag(source: str, name: str, absl: bool) -> bool:
    if absl:
        return re.search(rf'DEFINE_\w+\(\s*"{re.escape(name)}"', source) is not None
    return f'"--{name}"' in source


def test_readme_commands_name_existing_tools_configs_flags_and_keys():
    commands = readme_commands()
    assert len(commands) >= 15
    checked = set()
    for argv in commands:
        if argv[0] == "-m" and argv[1] in ("pip", "pytest"):
            continue
        target, args = (argv[1], argv[2:]) if argv[0] == "-m" else (argv[0], argv[1:])
        source_path = REPO / ABSL_COMMANDS.get(target, target)
        assert source_path.is_file(), f"README runs {target}, which does not exist"
        source, absl = source_path.read_text(), target in ABSL_COMMANDS
        config_file = _config_file(args)
        if config_file:
            assert (REPO / config_file).is_file() or (REPO / "configs" / f"{config_file}.py").is_file(), config_file
        for word in args:
            if word.startswith("--config."):  # an override: the key must exist in the command's config
                node = load_config(config_file or "demo") if config_file else None
                for key in word[len("--config."):].split("=")[0].split("."):
                    assert node is not None and key in node, f"README overrides {word}: no such config key"
                    node = node[key]
            elif word.startswith("--"):
                name = word[2:].split("=")[0]
                assert _has_flag(source, name, absl), f"README passes {word} to {target}, which has no such flag"
            elif word.startswith(("flowfeat_jax/", "configs/", "tools/")):
                assert (REPO / word).exists(), f"README names {word}, which does not exist in a clone"
        checked.add(target)
    assert {"flowfeat_jax.main", "flowfeat_jax.evaluate", "tools/extract_features.py", "tools/export_flow.py",
            "tools/score_davis.py", "tools/export_torch.py", "tools/import_torch.py"} <= checked


@pytest.mark.slow
def test_help_shows_defaults_and_accepted_inputs():
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    helps = {}
    for command in [[f"tools/{tool}.py"] for tool in ARGPARSE_TOOLS] + [["-m", "flowfeat_jax.main"],
                                                                          ["-m", "flowfeat_jax.evaluate"]]:
        result = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == (1 if command[0] == "-m" else 0), result.stderr[-2000:]  # absl's --help exits 1
        helps[command[-1]] = " ".join(result.stdout.split())
        assert "default: None" not in helps[command[-1]] and "default: 'None'" not in helps[command[-1]], command
    export_flow = helps["tools/export_flow.py"]
    assert all(ext in export_flow for ext in (".jpg", ".jpeg", ".png", ".mp4", ".webm", ".avi", ".mkv", ".mov"))
    assert "(default: searaft)" in export_flow and "(default: 448)" in export_flow
    extract = helps["tools/extract_features.py"]
    assert "(default: 4)" in extract and "(default: float16)" in extract and "(default: online)" in extract
    assert ".mp4" in extract and "glob" in extract
    assert "Required. Experiment config file" in helps["flowfeat_jax.main"]


@pytest.mark.slow
def test_score_davis_rescores_results_written_with_max_frames(tmp_path):
    """Results of `evaluate --max_frames=6` (frames 0..5): the full-length scoring misses frame 6, --max_frames=6
    scores them (ground truth as the prediction: J = F = 1)."""
    results = tmp_path / "results" / "blackswan"
    results.mkdir(parents=True)
    for path in sorted((DEMO_CLIP / "Annotations" / "480p" / "blackswan").glob("*.png"))[:6]:
        labels = (np.asarray(Image.open(path).convert("L")) > 127).astype(np.uint8)
        Image.fromarray(labels, "L").save(results / path.name)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    base = [sys.executable, "tools/score_davis.py", f"--davis={DEMO_CLIP}", f"--results={results.parent}",
            "--split=demo"]
    full = subprocess.run([*base, f"--out={tmp_path / 'full.json'}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert full.returncode == 1 and "00006.png" in full.stderr
    short = subprocess.run([*base, f"--out={tmp_path / 'short.json'}", "--max_frames=6"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert short.returncode == 0, short.stderr
    scores = json.loads((tmp_path / "short.json").read_text())
    assert scores["global"]["J_mean"] == pytest.approx(1.0) and scores["global"]["F_mean"] == pytest.approx(1.0)
