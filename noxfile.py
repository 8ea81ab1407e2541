"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s docs`."""

from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests", "docs"]
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]


@nox.session
def tests(session: nox.Session) -> None:
    session.install(*TORCH)
    session.install("-e", ".[test]")
    session.run("pytest", "-q", *session.posargs, env={"OMP_NUM_THREADS": "2"})


#: the floors of pyproject.toml for the packages the trust boundary relies on (.ci/lowest.txt)
LOWEST = [line for line in Path(".ci/lowest.txt").read_text().splitlines() if line and not line.startswith("#")]


@nox.session
def lowest(session: nox.Session) -> None:
    """The security tests on the lowest versions pyproject.toml allows."""
    session.install(*TORCH)
    session.install("-e", ".[test]", *LOWEST)
    session.run("pytest", "-q", "-m", "trust_boundary", *session.posargs, env={"OMP_NUM_THREADS": "2"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    sources = ["lightning_defense", "tests", "tools", "benchmarks", "examples", "noxfile.py"]
    session.run("ruff", "check", *sources)
    session.run("ruff", "format", "--check", *sources)


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site, strictly (as CI builds it), and the results pages' freshness."""
    session.install(*TORCH)
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", "--site-dir", str(Path(session.create_tmp()) / "site"))
    session.run("python", "benchmarks/publish.py", "--check")
