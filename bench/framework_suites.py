"""Run frameworks' own test suites bare and through ``hopscope run --``, and compare.

hopscope's middleware must not change what an app does.  The frameworks' own suites are
the widest check of that there is: their test clients call the app the way hopscope's
framework patches see it (``Flask.__call__``, Django's handlers, ``Starlette.__call__``,
which FastAPI's ends in, ``Quart.__call__``, ``Bottle.__call__``; Django's test
``Client`` and ``AsyncClient`` through their handlers, Werkzeug's test ``Client``
through ``run_wsgi_app``), uvicorn's run its real server (h11, httptools and zttp)
through hopscope's wrap point and protocol classes, Werkzeug's its development server
(``run_simple``, in subprocesses: see ``resets_pythonpath``), and they assert bytes,
headers, streaming, exceptions, logging and warnings-as-errors.  Each suite runs twice
in the same virtualenv, once bare and once under ``hopscope run --headless``, and every
test whose outcome differs is listed: each one is a hopscope bug, or a test that asserts
something no middleware can keep, listed with the reason in :data:`EXPECTED`.

Not part of the test run (it downloads sdists and builds virtualenvs; a few minutes)::

    python bench/framework_suites.py                      # all suites
    python bench/framework_suites.py flask django --work /tmp/suites
    python bench/framework_suites.py quart --source quart=DIR  # DIR: a clone of pallets/quart

Versions are those installed in the Python running this script (the ones hopscope is
developed against), else the pins below.  Each suite gets its own virtualenv under
``--work``, with hopscope installed editable from this checkout: the sdist's test
requirements never touch the development environment.  The exit status is 1 when a
test's outcome differs for a reason not in :data:`EXPECTED`, 2 when a suite could not be
set up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Suite:
    """One framework's test suite: what to download, install and run."""

    dist: str
    pin: str  # used when the running Python does not have ``dist`` installed
    requirements: tuple[str, ...]
    #: pytest arguments, or Django ``runtests.py`` labels when ``django`` is set.
    args: tuple[str, ...]
    django: bool = False
    extras: tuple[str, ...] = ()  # of ``dist``, e.g. starlette[full]
    #: Where the tests are when the sdist has none (``--source NAME=DIR`` takes a checkout).
    repository: str = ""
    #: The suite starts servers with a PYTHONPATH of its own, which drops hopscope's
    #: bootstrap: in the hopscope run, a ``.pth`` file of the venv puts it back (see
    #: :data:`BOOTSTRAP_PTH`).
    resets_pythonpath: bool = False

    def version(self) -> str:
        try:
            return metadata.version(self.dist)
        except metadata.PackageNotFoundError:
            return self.pin


DJANGO_LABELS = (
    "handlers",
    "asgi",
    "wsgi",
    "servers",
    "builtin_server",
    "middleware",
    "middleware_exceptions",
    "requests_tests",
    "staticfiles_tests",
    "test_client",
    "test_client_regress",
    # Request and response handling through Django's handlers and test client.
    "file_uploads",
    "view_tests",
    "conditional_processing",
    "csrf_tests",
    "sessions_tests",
    "generic_views",
    "responses",
    "httpwrappers",
    "signed_cookies_tests",
    "messages_tests",
    "decorators",
    "urlpatterns_reverse",
    # Views that raise, which Django logs at ERROR and answers with a 500 (hopscope then
    # records the logged exception as the request's error), async views, and the apps
    # whose tests make the most test-client requests (the admin's, auth's views).
    "logging_tests",
    "async",
    "test_utils",
    "auth_tests",
    "admin_views",
    "admin_docs",
    "i18n",
    "redirects_tests",
    "flatpages_tests",
    "shortcuts",
    "context_processors",
    "sitemaps_tests",
    "syndication_tests",
)

SUITES: dict[str, Suite] = {
    "flask": Suite(
        dist="flask",
        pin="3.1.3",
        # Flask 3.1's tests import pytest internals that pytest 9 removed.
        requirements=("werkzeug", "pytest==8.4.2", "pytest-timeout", "asgiref", "python-dotenv"),
        args=("tests",),
    ),
    "werkzeug": Suite(
        dist="werkzeug",
        pin="3.1.9",
        # Its dev_server tests run real servers (live_apps/run.py: run_simple) in
        # subprocesses, which the bootstrap reaches: the server wrap point runs there.
        requirements=(
            "pytest==8.4.2",
            "pytest-timeout",
            "watchdog",
            "ephemeral-port-reserve",
            "cryptography",
            "cffi",
        ),
        args=(
            "tests",
            "--timeout",
            "120",
            # The watchdog reloader watches sys.path recursively, the interpreter's
            # own library too: on a machine where other Pythons run it overflows
            # inotify's queue and reconciles forever (bare as well).
            "--deselect",
            "tests/test_serving.py::test_reloader_sys_path[watchdog]",
        ),
        # Its dev_server fixture sets PYTHONPATH to the test's folder.
        resets_pythonpath=True,
    ),
    "starlette": Suite(
        dist="starlette",
        pin="1.10.0",
        requirements=(
            "pytest",
            "pytest-timeout",
            "trio",
            "blockbuster",
            "opentelemetry-sdk",
            "importlib-metadata",
            "httpx2[zstd]",
        ),
        args=("tests",),
        extras=("full",),
    ),
    "fastapi": Suite(
        dist="fastapi",
        pin="0.165.0",
        requirements=(
            "pytest>=9.0,<9.2",
            "pytest-timeout",
            "dirty-equals",
            "inline-snapshot",
            "pwdlib[argon2]",
            "pyjwt",
            "pyyaml",
            "sqlmodel",
            "anyio[trio]",
            "flask",
            "httpx",
            "httpx2",
            "opentelemetry-sdk",
            "python-slugify",
            "typer",
            "strawberry-graphql",
            "a2wsgi",
            "coverage",
            "pytest-xdist",
            # Its telemetry tests: hopscope beside OpenTelemetry, Sentry and Logfire.
            "logfire",
            "sentry-sdk",
            "opentelemetry-instrumentation-fastapi",
        ),
        args=("tests", "-n", "2"),
        extras=("standard-no-fastapi-cloud-cli",),
    ),
    "uvicorn": Suite(
        dist="uvicorn",
        pin="0.54.0",
        requirements=(
            "pytest>=9.1.1",
            "pytest-mock",
            "pytest-xdist",
            "pytest-timeout",
            "trustme",
            "cryptography",
            "httpx",
            "httpx2",
            "a2wsgi",
            "wsproto",
            # Its third HTTP implementation (--http zttp): without it, 302 tests skip.
            "zttp",
            # Registers the ``benchmark`` marker its tests/benchmarks need to be collected.
            "pytest-codspeed",
        ),
        # Its addopts ask for 8 workers; the server wrap point (Config.load) is what runs.
        args=("tests", "-n", "2"),
        extras=("standard",),
    ),
    "bottle": Suite(
        dist="bottle",
        pin="0.13.4",
        # Its tests call the app as a server would: ``Bottle.__call__``, which hopscope
        # records (its sdist has no tests of its server adapters).
        requirements=("pytest", "pytest-timeout"),
        args=("test", "--timeout", "120"),
    ),
    "quart": Suite(
        dist="quart",
        pin="0.22.0",
        requirements=("pytest", "pytest-asyncio", "hypothesis", "python-dotenv"),
        # Its addopts need pytest-cov: only the rest of them.
        args=("tests", "-o", "addopts=--strict-markers"),
        repository="https://github.com/pallets/quart",
    ),
    "django": Suite(
        dist="django",
        pin="5.2.19",
        requirements=("asgiref",),
        args=DJANGO_LABELS,
        django=True,
    ),
}

#: Runs Django's ``runtests.py`` in this process and writes each test's outcome to JSON:
#: its ``-v 2`` output interleaves docstrings, and does not name every outcome.
UNITTEST_OUTCOMES = """
import json, os, runpy, sys, unittest

outcomes = {}
base = unittest.TestResult


def recorder(method, outcome):
    original = getattr(base, method)

    def record(self, test, *args):
        name = test.id()
        if outcome != "passed" or name not in outcomes:
            outcomes[name] = outcome
        return original(self, test, *args)

    setattr(base, method, record)


for method, outcome in [
    ("addSuccess", "passed"), ("addFailure", "failed"), ("addError", "error"),
    ("addSkip", "skipped"), ("addExpectedFailure", "xfailed"),
    ("addUnexpectedSuccess", "xpassed"),
]:
    recorder(method, outcome)

add_sub_test = base.addSubTest


def sub_test(self, test, subtest, err):
    if err is not None:
        outcomes[test.id()] = "failed"
    return add_sub_test(self, test, subtest, err)


base.addSubTest = sub_test
sys.argv = ["runtests.py", *sys.argv[1:]]
sys.path[0] = os.getcwd()  # as when runtests.py is the script: its folder, not ours
try:
    runpy.run_path("runtests.py", run_name="__main__")
finally:
    with open(os.environ["SUITE_OUTCOMES"], "w") as out:
        json.dump(outcomes, out)
"""


#: Differences that are the suite's own assumption, not a change in what the app does:
#: suite -> test id -> why.  They are listed, and do not fail the run.
EXPECTED: dict[str, dict[str, str]] = {
    "uvicorn": {
        "tests.test_config::test_wsgi_app": (
            "asserts Config.loaded_app is uvicorn's WSGI adapter; hopscope's span goes "
            "around the adapters (inject._UVICORN_ADAPTERS)"
        ),
        "tests.test_config::test_app_factory": (
            "asserts Config.loaded_app is the factory's object; hopscope wraps it there"
        ),
        "tests.test_server::test_reset_contextvars_asyncio[h11]": (
            "the app JSON-encodes every context variable it sees; hopscope's request "
            "context (tracing.context.current) is one, and not JSON"
        ),
        "tests.test_server::test_reset_contextvars_asyncio[httptools]": (
            "the app JSON-encodes every context variable it sees; hopscope's request "
            "context (tracing.context.current) is one, and not JSON"
        ),
        "tests.test_server::test_reset_contextvars_asyncio[zttp]": (
            "the app JSON-encodes every context variable it sees; hopscope's request "
            "context (tracing.context.current) is one, and not JSON"
        ),
    },
}


#: Run by ``site`` in every Python of a suite's venv (before ``sitecustomize`` is
#: imported): in the hopscope run only, the bootstrap's folder goes first on ``sys.path``
#: again when a suite's subprocess lost it from PYTHONPATH, as ``hopscope run`` had it.
BOOTSTRAP_PTH = (
    "import os, sys; "
    "folder = os.environ.get('HOPSCOPE_SUITE_BOOTSTRAP'); "
    "folder and folder not in sys.path and sys.path.insert(0, folder)\n"
)


class SetupError(Exception):
    pass


def run(
    command: list[str],
    *,
    cwd: Path | None = None,
    log: Path,
    timeout: float,
    env: dict[str, str] | None = None,
) -> tuple[int, float]:
    """Run ``command`` in its own process group, output to ``log``; (status, seconds)."""
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = -9
    return status, time.monotonic() - started


def prepare(
    name: str, suite: Suite, work: Path, timeout: float, checkout: Path | None = None
) -> tuple[Path, Path]:
    """Download and unpack the sdist (or take ``checkout``, a clone of the suite's
    repository: the framework is then installed from it), make the virtualenv: (source
    folder, python)."""
    version = suite.version()
    source = work / f"{name}-{version}"
    downloads = work / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    if checkout is not None:
        source = checkout.resolve()
        if not (source / "pyproject.toml").is_file() and not (source / "setup.py").is_file():
            raise SetupError(f"{source} is not a checkout of {suite.repository or name}")
    elif suite.repository:
        raise SetupError(
            f"its sdist has no tests: pass --source {name}=DIR, DIR a checkout of "
            f"{suite.repository}"
        )
    elif not source.is_dir():
        sdists = sorted(downloads.glob(f"{name}-{version}.tar.gz"))
        if not sdists:
            status, _ = run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-binary",
                    ":all:",
                    "--no-deps",
                    "-d",
                    str(downloads),
                    f"{suite.dist}=={version}",
                ],
                log=work / f"{name}-download.log",
                timeout=timeout,
            )
            sdists = sorted(downloads.glob(f"{name}-{version}.tar.gz"))
            if status or not sdists:
                raise SetupError(
                    f"cannot download {suite.dist}=={version}: see {name}-download.log"
                )
        with tarfile.open(sdists[0]) as archive:
            archive.extractall(work, filter="data")
    venv = work / f"venv-{name}"
    python = venv / "bin" / "python"
    stamp = venv / "hopscope-suite.json"
    extras = f"[{','.join(suite.extras)}]" if suite.extras else ""
    framework = f"{suite.dist}{extras}=={version}" if checkout is None else str(source)
    wanted = [framework, *suite.requirements]
    if not stamp.is_file() or json.loads(stamp.read_text()) != wanted:
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        status, _ = run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "-e",
                str(REPO),
                "--config-settings",
                "editable_mode=strict",
                *wanted,
            ],
            log=work / f"{name}-install.log",
            timeout=timeout,
        )
        if status:
            raise SetupError(f"cannot install {name}'s test requirements: see {name}-install.log")
        stamp.write_text(json.dumps(wanted))
    return source, python


def installed_version(python: Path, dist: str) -> str:
    """The version the suite ran against (a checkout's may not be the pin)."""
    done = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() or "?"


def junit_outcomes(path: Path) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    if not path.is_file():
        return outcomes
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag == "failure":
                outcome = "failed"
            elif child.tag == "error":
                outcome = "error"
            elif child.tag == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
        if outcomes.get(name, "passed") == "passed":  # an error at teardown follows a pass
            outcomes[name] = outcome
    return outcomes


@dataclass
class Result:
    outcomes: dict[str, str]
    status: int
    seconds: float
    traced: int | None = None


def run_suite(
    name: str,
    suite: Suite,
    source: Path,
    python: Path,
    work: Path,
    hopscope: bool,
    timeout: float,
) -> Result:
    mode = "hopscope" if hopscope else "bare"
    report = work / f"{name}-{mode}.{'json' if suite.django else 'xml'}"
    report.unlink(missing_ok=True)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("HOPSCOPE_SINK", None)
    if suite.django:
        runner = work / "unittest_outcomes.py"
        runner.write_text(UNITTEST_OUTCOMES)
        cwd = source / "tests"
        env["SUITE_OUTCOMES"] = str(report)
        command = [str(python), str(runner), *suite.args, "--parallel", "1", "-v", "1"]
    else:
        cwd = source
        command = [
            str(python),
            "-m",
            "pytest",
            *suite.args,
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
        ]
    trace = work / f"{name}-trace.jsonl"
    if suite.resets_pythonpath:
        site_packages = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        (Path(site_packages) / "hopscope-suite-bootstrap.pth").write_text(BOOTSTRAP_PTH)
    if hopscope:
        trace.unlink(missing_ok=True)
        if suite.resets_pythonpath:  # the folder ``hopscope run`` puts on PYTHONPATH
            env["HOPSCOPE_SUITE_BOOTSTRAP"] = subprocess.run(
                [str(python), "-c", "from hopscope.app.run import BOOTSTRAP_DIR as d; print(d)"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        command = [
            str(python),
            "-m",
            "hopscope.app",
            "run",
            "--headless",
            "-o",
            str(trace),
            "--",
            *command,
        ]
    status, seconds = run(
        command, cwd=cwd, log=work / f"{name}-{mode}.log", timeout=timeout, env=env
    )
    if suite.django:
        outcomes = json.loads(report.read_text()) if report.is_file() else {}
    else:
        outcomes = junit_outcomes(report)
    traced = None
    if hopscope:
        traced = 0
        if trace.is_file():
            with trace.open() as lines:
                traced = sum(
                    1 for line in lines if '"kind":"span_start"' in line and '"hop":"app"' in line
                )
    return Result(outcomes, status, seconds, traced)


def counts(outcomes: dict[str, str]) -> str:
    passed = sum(1 for o in outcomes.values() if o in ("passed", "xfailed", "skipped"))
    failed = len(outcomes) - passed
    skipped = sum(1 for o in outcomes.values() if o in ("skipped", "xfailed"))
    return f"{passed - skipped}/{failed}/{skipped}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help=f"among {', '.join(SUITES)} (default: all)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/hopscope-suites"),
        help="downloads, virtualenvs and logs (kept between runs)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds for each install and each run"
    )
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a checkout of a suite's repository, used instead of its sdist (quart's "
        "sdist has no tests)",
    )
    options = parser.parse_args()
    checkouts: dict[str, Path] = {}
    for given in options.source:
        name, equals, folder = given.partition("=")
        if not equals or name not in SUITES:
            parser.error(f"--source takes NAME=DIR with NAME among {', '.join(SUITES)}")
        checkouts[name] = Path(folder)
    unknown = [name for name in options.suites if name not in SUITES]
    if unknown:
        parser.error(f"unknown suite {unknown[0]!r}: choose among {', '.join(SUITES)}")
    work = options.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, ...]] = []
    differences: list[str] = []
    broken = False
    chosen = options.suites or [
        name for name, suite in SUITES.items() if not suite.repository or name in checkouts
    ]
    for name in [name for name in SUITES if name not in chosen and not options.suites]:
        print(f"{name}: skipped (its sdist has no tests: --source {name}=DIR to run it)")
    for name in chosen:
        suite = SUITES[name]
        try:
            source, python = prepare(name, suite, work, options.timeout, checkouts.get(name))
        except (SetupError, subprocess.CalledProcessError) as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            broken = True
            continue
        bare = run_suite(name, suite, source, python, work, False, options.timeout)
        hop = run_suite(name, suite, source, python, work, True, options.timeout)
        if not bare.outcomes or not hop.outcomes:
            print(f"{name}: no test outcomes (see {work}/{name}-*.log)", file=sys.stderr)
            broken = True
        changed = sorted(
            test
            for test in bare.outcomes.keys() | hop.outcomes.keys()
            if bare.outcomes.get(test) != hop.outcomes.get(test)
        )
        expected = EXPECTED.get(name, {})
        unexplained = [test for test in changed if test not in expected]
        for test in changed:
            why = expected.get(test)
            differences.append(
                f"{name}: {test}: {bare.outcomes.get(test, 'absent')} -> "
                f"{hop.outcomes.get(test, 'absent')}"
                + (f" (expected: {why})" if why else " (UNEXPLAINED)")
            )
        rows.append(
            (
                f"{name} {installed_version(python, suite.dist)}",
                str(len(bare.outcomes | hop.outcomes)),
                counts(bare.outcomes),
                counts(hop.outcomes),
                f"{len(unexplained)} ({len(changed) - len(unexplained)} explained)",
                str(hop.traced),
                f"{bare.seconds:.0f}/{hop.seconds:.0f}",
            )
        )
    header = (
        "suite",
        "tests",
        "bare pass/fail/skip",
        "hopscope pass/fail/skip",
        "differences",
        "app spans traced",
        "seconds bare/hopscope",
    )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    for line in differences:
        print(line)
    if broken:
        return 2
    return 1 if any(line.endswith("(UNEXPLAINED)") for line in differences) else 0


if __name__ == "__main__":
    sys.exit(main())
