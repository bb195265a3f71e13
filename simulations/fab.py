"""The Flower app bundle (FAB) storefed submits, and what a node trusts to run.

Decision record
---------------
* **What a FAB can make a node execute.** Established on Flower 1.42's loader
  (``flwr.supercore.object_ref.load_app``, used by ``flwr-clientapp`` and by storefed's warm
  executor alike) and tested in ``tests/test_app_trust.py``:

  - the module its ``[tool.flwr.app.components] clientapp`` names, and every module that one
    imports, from the bundle's own files: a new module (``evil.py``) runs with the node's
    rights, next to the market's data and its private state;
  - the bundle's directory is put first on ``sys.path`` and stays there: a module of the same
    name as one the process has *not imported yet* (a lazily imported part of storefed, say) is
    later taken from the bundle, even by the next, trusted run;
  - its ``[tool.flwr.app.config]`` defaults, and on top of them the submitter's run-config
    overrides (``flwr run --run-config``), become ``context.run_config``.

  So a node that installs whatever bundle it is handed runs whatever code the submitter wrote.
* **What a region trusts.** A bundle is named by the SHA-256 of its bytes. ``flwr build`` is
  deterministic (fixed timestamps, sorted files): the bundle ``write_app`` lays out for a given
  storefed version and default config always hashes the same, so a region can pin it, and by
  default does (``trusted-apps = "installed"`` in the market's policy: the bundle its *own*
  installed storefed builds, ``installed_app_sha256``). The check runs before the bundle is
  installed or loaded; a refused run's messages get an error reply, and the round treats the
  node as dropped. Run-config overrides are checked against the policy's
  ``allowed-run-config`` at the same point.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from storefed.shared.config import RunConfig

APP_PACKAGES = ("shared", "server", "client")


def write_app(directory: str | Path, defaults: RunConfig | None = None) -> Path:
    """A Flower app directory for ``flwr run``: a pyproject.toml with storefed's components and
    run config, plus the shared/server/client packages (the FAB carries the code)."""
    import storefed.shared as shared  # noqa: PLC0415

    d = Path(directory)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    src_root = Path(shared.__file__).resolve().parent.parent
    for pkg in APP_PACKAGES:
        for f in sorted((src_root / pkg).glob("*.py")):
            (d / pkg).mkdir(exist_ok=True)
            shutil.copy2(f, d / pkg / f.name)
    cfg = (defaults or RunConfig()).to_mapping()
    lines = ['[build-system]', 'requires = ["setuptools>=68"]',
             'build-backend = "setuptools.build_meta"', '', '[project]', 'name = "storefed"',
             'version = "0.1.0"', 'dependencies = []', '', '[tool.flwr.app]',
             'publisher = "storefed"', '', '[tool.flwr.app.components]',
             'serverapp = "storefed.server.server_app:app"',
             'clientapp = "storefed.client.client_app:app"', '',
             '[tool.flwr.app.config]']
    for k, v in cfg.items():
        lines.append(f"{k} = {json.dumps(v)}")
    (d / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return d


def fab_bytes(directory: str | Path) -> bytes:
    """The FAB ``flwr build`` / ``flwr run`` makes of an app directory (deterministic)."""
    from flwr.cli.build import build_fab_from_disk  # noqa: PLC0415 - flwr's CLI is heavy

    return build_fab_from_disk(Path(directory))


def app_sha256(directory: str | Path) -> str:
    """SHA-256 (hex) of the FAB built from an app directory: the hash a node sees."""
    return hashlib.sha256(fab_bytes(directory)).hexdigest()


@functools.cache
def installed_app_sha256() -> str:
    """SHA-256 of the FAB the storefed installed here builds with the default run config:
    what ``storefed deploy run`` of this same version submits."""
    with tempfile.TemporaryDirectory(prefix="storefed-app-") as tmp:
        return app_sha256(write_app(Path(tmp) / "app"))
