"""A region's node runs only app bundles (FABs) it trusts, with only the run-config overrides
its policy allows (simulations/fab.py, simulations/deploy_exec.py, shared/policy.py).

The attack the checks stop: a submitted FAB carries code, and Flower's loader runs it next to
the market's data. ``test_an_untrusted_fab_runs_its_own_code_without_the_check`` shows that on
the executor's own loading path; the others show the check refusing it (in process, and on real
SuperLink/SuperNode processes on 127.0.0.1, where the run goes on with the other markets).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storefed.shared.errors import ConfigError
from storefed.shared.policy import PrivacyPolicy, write_policy
from storefed.simulations.deploy_exec import UntrustedRunError, vet_run
from storefed.simulations.fab import app_sha256, fab_bytes, installed_app_sha256, write_app

EVIL = '''import os
from pathlib import Path
Path(os.environ["EVIL_MARKER"]).write_text(__file__)  # could read the market's data instead
from flwr.clientapp import ClientApp
app = ClientApp()
'''


def _evil_app(root: Path) -> Path:
    """storefed's own bundle plus one new module, made the ClientApp (what a submitter who is
    not the region could send)."""
    d = write_app(root / "evil-app")
    (d / "evil.py").write_text(EVIL)
    toml = d / "pyproject.toml"
    toml.write_text(toml.read_text().replace('clientapp = "storefed.client.client_app:app"',
                                             'clientapp = "evil:app"'))
    return d


def _policy_config(tmp_path: Path, **rules: str) -> dict[str, str]:
    path = write_policy(tmp_path / "policy", PrivacyPolicy(**rules))  # type: ignore[arg-type]
    return {"privacy-policy": str(path)}


# ------------------------------------------------------------------------- policy rules
def test_policy_names_a_bad_entry():
    with pytest.raises(ConfigError, match="trusted-apps"):
        PrivacyPolicy(trusted_apps="installed,not-a-hash")
    with pytest.raises(ConfigError, match="'learning-rate', which is not a run-config key"):
        PrivacyPolicy(allowed_run_config="num-rounds,learning-rate")


def test_default_policy_allows_every_run_key_but_the_state_directory():
    p = PrivacyPolicy()
    assert p.forbidden_overrides(["lr", "num-rounds", "data-dir", "state-dir"]) == ["state-dir"]
    narrow = PrivacyPolicy(allowed_run_config="num-rounds,markets")
    assert narrow.forbidden_overrides(["num-rounds", "lr", "dp-noise"]) == ["dp-noise", "lr"]
    assert PrivacyPolicy(allowed_run_config="any").forbidden_overrides(["state-dir"]) == []


def test_fab_builds_are_deterministic(tmp_path):
    """Pinning a hash works only because the same code always makes the same bundle."""
    a, b = write_app(tmp_path / "a"), write_app(tmp_path / "b")
    assert app_sha256(a) == app_sha256(b) == installed_app_sha256()
    (b / "client" / "client_app.py").write_text("# changed\n", encoding="utf-8")
    assert app_sha256(b) != app_sha256(a)


# ------------------------------------------------------------------------- the vetting step
def test_vet_run_accepts_the_installed_bundle_and_refuses_another(tmp_path):
    ours = fab_bytes(write_app(tmp_path / "ours"))
    evil = fab_bytes(_evil_app(tmp_path))
    assert vet_run(1, ours, ["num-rounds", "lr"], {}) == installed_app_sha256()
    with pytest.raises(UntrustedRunError, match=r"refused run 2: its app bundle \(FAB sha256 "
                                                r"[0-9a-f]{64}\) is not one this region trusts"):
        vet_run(2, evil, [], {})
    # a region that pins the evil hash on purpose, or turns the check off, runs it
    import hashlib

    pinned = _policy_config(tmp_path, trusted_apps=hashlib.sha256(evil).hexdigest())
    assert vet_run(3, evil, [], pinned)
    with pytest.raises(UntrustedRunError):  # ... and then only that one
        vet_run(3, ours, [], pinned)
    assert vet_run(4, evil, [], _policy_config(tmp_path, trusted_apps="any"))


def test_vet_run_refuses_an_override_the_policy_does_not_allow(tmp_path):
    ours = fab_bytes(write_app(tmp_path / "ours"))
    with pytest.raises(UntrustedRunError, match="overrides run-config keys this region does "
                                                "not allow: state-dir"):
        vet_run(5, ours, ["num-rounds", "state-dir"], {})
    narrow = _policy_config(tmp_path, allowed_run_config="num-rounds,markets,out-dir")
    with pytest.raises(UntrustedRunError, match="not allow: dp-noise, lr"):
        vet_run(6, ours, ["num-rounds", "lr", "dp-noise"], narrow)
    assert vet_run(7, ours, ["num-rounds", "markets"], narrow)


def test_the_policy_in_the_state_directory_counts(tmp_path):
    evil = fab_bytes(_evil_app(tmp_path))
    write_policy(tmp_path / "state" / "de", PrivacyPolicy(trusted_apps="any"))
    node = {"market": "de", "state-dir": str(tmp_path / "state")}
    assert vet_run(8, evil, [], node)
    with pytest.raises(UntrustedRunError):
        vet_run(8, evil, [], {**node, "market": "fr"})


# ------------------------------------------------------------------------- what a FAB runs
_LOAD = """
import sys
from storefed.simulations.deploy_exec import UntrustedRunError, WarmExecutor
fab = open(sys.argv[1], "rb").read()
import hashlib
sha = hashlib.sha256(fab).hexdigest()
ex = WarmExecutor("127.0.0.1:9")
if sys.argv[2] == "vet":
    try:
        ex._vet(1, sha, fab, [], {})
    except UntrustedRunError as exc:
        print("REFUSED", exc)
        sys.exit(0)
ex._app("storefed/storefed", "0.1.0", sha, fab)
print("LOADED")
"""


def _load_in_executor(tmp_path: Path, fab: bytes, mode: str) -> str:
    """The executor's own steps (``_vet`` when asked, then ``_app``: install + Flower's loader)
    in a fresh process with its own FLWR_HOME, so this test's ``sys.path`` stays clean."""
    (tmp_path / "app.fab").write_bytes(fab)
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"),
           "EVIL_MARKER": str(tmp_path / "ran-evil")}
    res = subprocess.run([sys.executable, "-c", _LOAD, str(tmp_path / "app.fab"), mode],
                         capture_output=True, text=True, env=env, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_an_untrusted_fab_runs_its_own_code_without_the_check(tmp_path):
    out = _load_in_executor(tmp_path, fab_bytes(_evil_app(tmp_path)), "load")
    assert "LOADED" in out
    marker = tmp_path / "ran-evil"
    assert marker.is_file(), "the bundle's module did not run: the attack this stops is gone?"
    assert str(tmp_path / "home") in marker.read_text()  # run from where Flower installed it


def test_the_executor_refuses_it_before_installing_anything(tmp_path):
    out = _load_in_executor(tmp_path, fab_bytes(_evil_app(tmp_path)), "vet")
    assert "REFUSED" in out and "not one this region trusts" in out
    assert not (tmp_path / "ran-evil").exists()
    assert not list((tmp_path / "home").rglob("evil.py")), "installed before the check"


# ------------------------------------------------------------------------- real processes
@pytest.mark.slow
def test_untrusted_runs_are_refused_by_real_supernodes_and_the_round_goes_on(tmp_path):
    """SuperLink (TLS + node auth) and four `storefed deploy supernode` regions, SecAgg+ on.
    m2 trusts only another bundle; m3 allows no `lr` override. Both refuse the run with a log
    line naming the rule; the round goes on with m0 and m1 (their lab policy: 2 markets)."""
    from storefed.simulations.cluster import LocalCluster
    from storefed.simulations.simulate import lab_policy

    markets = ["m0", "m1", "m2", "m3"]
    lab = lab_policy(True, 2)
    base = write_policy(tmp_path / "policies" / "base", lab)
    other = write_policy(tmp_path / "policies" / "m2", PrivacyPolicy(
        **{**lab.__dict__, "trusted_apps": "0" * 64}))
    narrow = write_policy(tmp_path / "policies" / "m3", PrivacyPolicy(
        **{**lab.__dict__, "allowed_run_config": "dataset,markets,embedding-dim,local-epochs,"
                                                 "torch-threads,secagg,num-rounds,out-dir"}))
    c = LocalCluster(tmp_path / "cluster", policy=base)
    try:
        c.make_certs()
        c.start_superlink()
        for m, pol in zip(markets, (base, base, other, narrow), strict=True):
            key, _ = c.node_keys(m)
            c.start_node(m, key, tmp_path / "state", dataset="synthetic", policy=pol)
        out = tmp_path / "out"
        _, final = c.run({"dataset": "synthetic", "markets": ",".join(markets),
                          "embedding-dim": 16, "local-epochs": 1, "torch-threads": 1,
                          "secagg": True, "num-rounds": 1, "lr": 0.002,
                          "out-dir": str(out)}, 400)
        logs = {m: c.log_tail(f"node-{m}", 10**7) for m in markets}
        assert final == "finished:completed", logs
        assert "not one this region trusts" in logs["m2"], logs["m2"][-3000:]
        assert "does not allow: lr" in logs["m3"], logs["m3"][-3000:]
        for m in ("m0", "m1"):
            assert "refused run" not in logs[m]
        rounds = json.loads((out / "metrics.json").read_text())["rounds"]
        seen = rounds[-1]["markets"]
        assert sorted(m for m, v in seen.items() if v.get("trained")) == ["m0", "m1"]
        assert not any(seen.get(m, {}).get("trained") for m in ("m2", "m3"))
        # nothing of the refused run was installed on the refusing nodes
        assert not list((tmp_path / "cluster" / "home-m2").rglob("pyproject.toml"))
    finally:
        c.close()
        time.sleep(0.1)
        for name, proc in c.procs.items():
            assert proc.poll() is not None, f"{name} (pid {proc.pid}) still running"
