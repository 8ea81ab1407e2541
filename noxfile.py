"""Developer sessions: `nox -s tests`, `nox -s lint`."""

import nox

nox.options.sessions = ["lint", "tests"]
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]


@nox.session
def tests(session: nox.Session) -> None:
    session.install(*TORCH)
    session.install("-e", ".[test]")
    session.run("pytest", "-q", *session.posargs, env={"OMP_NUM_THREADS": "2"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "lightning_defense", "tests", "tools", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "lightning_defense", "tests", "tools", "benchmarks", "noxfile.py")
