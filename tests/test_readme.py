"""The README is a manual that cannot drift: every file, section and command it names exists,
its quick-start chain runs as written on a fresh clone, and its `flwr run` steps (with the stop
step) work and leave no process behind."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storefed.simulations.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent  # the venv the tests run in (.venv/bin)


def block(name: str) -> list[str]:
    """The commands of the fenced block between ``<!-- name -->`` and ``<!-- /name -->``."""
    m = re.search(rf"<!-- {name} -->\s*```bash\n(.*?)```\s*<!-- /{name} -->", README, re.S)
    assert m, f"README has no <!-- {name} --> block"
    return [ln for ln in m.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def slug(title: str) -> str:
    """GitHub's anchor for a heading."""
    s = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return s.replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_readme_at_most_300_lines():
    assert len(README.splitlines()) <= 300


def test_every_linked_file_and_section_exists():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            ROOT / "simulations/experiments/RESULTS.md"]
    checked = 0
    for doc in docs:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            assert dest.exists(), f"{doc.name}: link to missing {target}"
            if anchor and dest.suffix == ".md":
                assert anchor in anchors(dest.read_text()), \
                    f"{doc.name}: no section #{anchor} in {dest.name}"
            checked += 1
    assert checked > 20


def test_every_path_named_in_the_readme_exists():
    named = set(re.findall(r"`((?:docs|simulations|shared|server|client|tests)/[\w./-]+)`", README))
    named |= {"simulations/setup.sh", "ARCHITECTURE.md", "pyproject.toml"}
    assert len(named) >= 5
    for rel in named:
        if "<" in rel or rel.endswith("/"):
            continue
        assert (ROOT / rel).exists(), f"README names {rel}, which does not exist"


def test_every_storefed_command_named_exists():
    """Every `storefed WORD` in the README and docs is a registered command, and each
    `storefed CMD SUB` under deploy is a deploy sub-command (checked through --help)."""
    texts = README + "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    code = r"(?:`|^\s*)(?:\.venv/bin/)?storefed "  # in code spans and command lines
    names = set(re.findall(code + r"([a-z][a-z-]+)", texts, re.M)) - {"is", "checks"}
    top = {k for k in COMMANDS if " " not in k}
    assert names - {"deploy"} <= top, sorted(names - top)
    deploy_subs = set(re.findall(code + r"deploy ([a-z][a-z-]+)", texts, re.M))
    out = subprocess.run([str(BIN / "storefed"), "deploy", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for sub in deploy_subs:
        assert re.search(rf"\b{sub}\b", out), f"storefed deploy {sub} is not a command"


def test_readme_flags_exist():
    """Each `--flag` in the README's command lines is in that command's --help."""
    lines = [ln for ln in README.splitlines() if ln.startswith(".venv/bin/storefed ")]
    assert len(lines) >= 6
    for ln in lines:
        argv = shlex.split(ln.split("&")[0].split("#")[0])
        cmd = argv[1:3] if argv[1] == "deploy" else argv[1:2]
        out = subprocess.run([str(BIN / "storefed"), *cmd, "--help"], capture_output=True,
                             text=True, check=True).stdout
        for flag in (a.split("=")[0] for a in argv if a.startswith("--")):
            assert flag in out, f"{' '.join(cmd)} has no {flag} (README: {ln})"


def _clone(tmp_path: Path) -> Path:
    """A fresh clone of the working tree's HEAD plus its uncommitted README/code (the test
    checks what is about to be committed), without the ignored files (runs/, .venv)."""
    dest = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    changed = subprocess.run(["git", "ls-files", "-m", "-o", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    for rel in changed:
        src = ROOT / rel
        if src.is_file() and not rel.startswith("shared/data/"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(src.read_bytes())
    (dest / ".venv").symlink_to(BIN.parent)  # reuse this venv, as setup.sh would have made
    return dest


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.slow
def test_quickstart_runs_as_written_on_a_fresh_clone(tmp_path):
    clone = _clone(tmp_path)
    outputs = []
    for line in block("quickstart"):
        res = subprocess.run(line, shell=True, cwd=clone, capture_output=True, text=True,
                             timeout=600, env=_env())
        assert res.returncode == 0, f"{line}\n{res.stdout}\n{res.stderr}"
        outputs.append(res)
    sim, join, users, rec = outputs
    assert "rounds:" in sim.stderr and "ETA" in sim.stderr  # progress bar over the rounds
    assert "best round" in sim.stdout and "popularity" in sim.stdout
    assert (clone / "runs/quick/learning_curve.png").stat().st_size > 1000
    assert "m3: fine-tuning" in join.stderr and "ETA" in join.stderr
    assert (clone / "runs/join-m3/state/m3/private.pt").is_file()
    assert "m3_u0001" in users.stdout.split()
    ranked = [ln.split() for ln in rec.stdout.splitlines() if ln.strip()]
    assert [r[0] for r in ranked] == ["1", "2", "3", "4", "5"]
    assert all(r[1].startswith("i") for r in ranked)


def _superlinks(flwr_home: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"flower-superlink.*{flwr_home}/local-superlink"],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _descendants(pid: int) -> set[int]:
    kids, todo = set(), [pid]
    while todo:
        out = subprocess.run(["pgrep", "-P", str(todo.pop())], capture_output=True,
                             text=True).stdout
        new = {int(p) for p in out.split()} - kids
        kids |= new
        todo += list(new)
    return kids


@pytest.mark.slow
def test_flwr_run_as_documented_then_stop_leaves_no_process(tmp_path):
    clone = _clone(tmp_path)
    home = tmp_path / "flwr-home"  # the test's own local SuperLink, not the user's
    env = {**_env(), "FLWR_HOME": str(home)}
    script = "set -e\n" + "\n".join(block("flwr-run")) + "\n"
    res = subprocess.run(["bash", "-c", script], cwd=clone, capture_output=True, text=True,
                         timeout=600, env=env)
    links = _superlinks(home)
    try:
        out = res.stdout + res.stderr
        assert res.returncode == 0, out
        assert "run config OK" in out
        assert re.search(r"storefed: round 1/2: 4 markets, avg ndcg@10 \d\.\d{4}", out), out
        assert "storefed: round 2/2" in out
        assert re.search(r"^average\s+\d\.\d{4}\s+\d\.\d{4}$", out, re.M), out
        assert (clone / "runs/flwr/metrics.json").is_file()
        assert links, "flwr run left no local SuperLink to stop (the README's step is moot)"
        tree = {p for pid in links for p in _descendants(pid)} | set(links)
        stop = subprocess.run(["bash", "-c", "\n".join(block("flwr-stop"))], cwd=clone,
                              env=env, timeout=60)
        assert stop.returncode == 0
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(p) for p in tree):
            time.sleep(0.5)
        assert not [p for p in tree if _alive(p)], "processes left after the README's stop step"
    finally:
        for pid in _superlinks(home):  # whatever happened, stop our own SuperLink by PID
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_bad_run_config_key_is_named():
    res = subprocess.run([str(BIN / "storefed"), "check-config", "nmu-rounds=3"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "unknown key 'nmu-rounds'" in res.stderr
    res = subprocess.run([str(BIN / "storefed"), "check-config", "num-rounds=-1"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "'num-rounds' must be >= 1" in res.stderr


def test_benchmark_shows_progress_with_eta(tmp_path):
    res = subprocess.run([str(BIN / "storefed"), "benchmark", "--methods", "popularity",
                          "--seeds", "2", "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr
    assert re.search(r"benchmark: 100%.*2/2 runs \[.*ETA", res.stderr), res.stderr


def test_help_is_fast_to_import_and_shows_defaults():
    """`storefed --help` imports no command module (so no torch); a command's --help shows
    its defaults; --version answers."""
    code = ("import sys; from storefed.simulations.cli import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules and 'flwr' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=ROOT)
    out = subprocess.run([str(BIN / "storefed"), "join", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "(default: 300)" in out  # --encoder-steps
    ver = subprocess.run([str(BIN / "storefed"), "--version"], capture_output=True, text=True)
    assert ver.stdout.startswith("storefed ")
    sec = subprocess.run([str(BIN / "storefed"), "benchmark-secagg", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "``" not in sec and "**" not in sec
