"""The settings table: the only reader of COMMLAYER_* variables, and the source of the README/docs tables."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

from commlayer import settings

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = [ROOT / "commlayer", ROOT / "codecs", ROOT / "topologies"]


def _library_files() -> list[Path]:
    return sorted(f for d in LIBRARY for f in d.rglob("*.py") if f != ROOT / "commlayer" / "settings.py")


def _is_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (isinstance(node, ast.Name) and node.id == "environ")


def _env_reads(tree: ast.AST) -> list[tuple[int, ast.AST]]:
    """(line, key expression) of every read of one variable: environ[k], environ.get(k), getenv(k).

    Writes (``environ[k] = v``, ``setdefault``, ``pop``, ``update``) and passing the whole
    environment to a child are not reads of a setting.
    """
    out: list[tuple[int, ast.AST]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _is_environ(node.value) and isinstance(node.ctx, ast.Load):
            out.append((node.lineno, node.slice))
        elif isinstance(node, ast.Call) and node.args:
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "get" and _is_environ(f.value)) or (
                    isinstance(f, (ast.Attribute, ast.Name)) and getattr(f, "attr", getattr(f, "id", "")) == "getenv"):
                out.append((node.lineno, node.args[0]))
    return out


def test_library_reads_commlayer_variables_only_through_settings() -> None:
    bad = []
    for f in _library_files():
        for line, key in _env_reads(ast.parse(f.read_text(), str(f))):
            where = f"{f.relative_to(ROOT)}:{line}"
            if not isinstance(key, ast.Constant) or not isinstance(key.value, str):
                bad.append(f"{where}: reads a variable whose name is computed ({ast.unparse(key)}); use settings.get")
            elif key.value.startswith("COMMLAYER_"):
                bad.append(f"{where}: reads {key.value} from the environment; use settings.get({key.value!r})")
            elif key.value not in settings.EXTERNAL:
                bad.append(f"{where}: reads {key.value}, which is not listed in settings.EXTERNAL")
    assert not bad, "\n".join(bad)


def test_the_scan_finds_reads() -> None:
    """The check above would see each way of reading (it is not vacuous)."""
    code = ("import os\nfrom os import environ\na = os.environ['COMMLAYER_X']\nb = os.environ.get('COMMLAYER_Y', '')\n"
            "c = os.getenv('HOME')\nd = environ.get(name)\n")
    keys = [ast.unparse(k) for _, k in _env_reads(ast.parse(code))]
    assert keys == ["'COMMLAYER_X'", "'COMMLAYER_Y'", "'HOME'", "name"]


def test_every_name_given_to_settings_is_in_the_table() -> None:
    pattern = re.compile(r"settings\.(?:get|is_set)\(\s*\"(COMMLAYER_[A-Z0-9_]+)\"")
    files = _library_files() + sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    files.remove(Path(__file__).resolve())  # asks for an unknown name on purpose
    used = {m for f in files for m in pattern.findall(f.read_text())}
    assert used, "no settings.get call found: the pattern is stale"
    assert used <= set(settings.SETTINGS), sorted(used - set(settings.SETTINGS))


def test_every_documented_variable_exists() -> None:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {(d.name, v) for d in docs for v in re.findall(r"COMMLAYER_[A-Z0-9_]*[A-Z0-9]", d.read_text())}
    unknown = sorted(f"{d}: {v}" for d, v in named if v not in settings.SETTINGS)
    assert not unknown, unknown


def test_readme_and_docs_tables_are_the_generated_ones(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("gen_settings", ROOT / "scripts" / "gen_settings.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.main(["--check"]) == 0, capsys.readouterr().out
    assert settings.markdown(readme=True) in (ROOT / "README.md").read_text()
    assert (ROOT / "docs" / "settings.md").read_text() == settings.document()


def test_get_parses_defaults_and_refuses_bad_values() -> None:
    env = {"COMMLAYER_IPC": "off", "COMMLAYER_SHM": "YES", "COMMLAYER_PORT": "6000", "COMMLAYER_HEARTBEAT": "0.5",
           "COMMLAYER_CODEC": ""}
    assert settings.get("COMMLAYER_IPC", env) is False and settings.get("COMMLAYER_SHM", env) is True
    assert settings.get("COMMLAYER_PORT", env) == 6000 and settings.get("COMMLAYER_HEARTBEAT", env) == 0.5
    assert settings.get("COMMLAYER_CODEC", env) == "" and not settings.is_set("COMMLAYER_CODEC", env)
    assert settings.get("COMMLAYER_LINGER", env) == 2.0  # unset: the table's default
    with pytest.raises(ValueError, match=r"COMMLAYER_PORT: expected an integer, got 'sixty'"):
        settings.get("COMMLAYER_PORT", {"COMMLAYER_PORT": "sixty"})
    with pytest.raises(ValueError, match=r"COMMLAYER_IPC: expected a boolean, got 'maybe'"):
        settings.get("COMMLAYER_IPC", {"COMMLAYER_IPC": "maybe"})
    with pytest.raises(KeyError, match="unknown setting 'COMMLAYER_NOPE'"):
        settings.get("COMMLAYER_NOPE")


def test_transport_and_group_configs_read_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from commlayer.backend.options import ZmqOptions
    from commlayer.transport.config import TransportConfig

    for k in list(settings.SETTINGS):
        monkeypatch.delenv(k, raising=False)
    assert TransportConfig.from_env() == TransportConfig()  # the table's defaults are the dataclass's
    assert ZmqOptions.from_env() == ZmqOptions()
    monkeypatch.setenv("COMMLAYER_SHM", "0")
    monkeypatch.setenv("COMMLAYER_IPC", "false")
    monkeypatch.setenv("COMMLAYER_MAILBOX_BYTES", "4096")
    cfg = TransportConfig.from_env(timeout=7.0)
    assert (cfg.shm_bytes, cfg.ipc, cfg.mailbox_bytes, cfg.timeout) == (0, False, 4096, 7.0)
    monkeypatch.setenv("COMMLAYER_RING_ORDER", "2,0,1")
    monkeypatch.setenv("COMMLAYER_ALGO", "tree")
    opts = ZmqOptions.resolve({"codec": "int8"})
    assert (opts.ring_order, opts.algo, opts.codec) == ((2, 0, 1), "tree", "int8")
    monkeypatch.setenv("COMMLAYER_CHUNK_BYTES", "1M")
    with pytest.raises(ValueError, match="COMMLAYER_CHUNK_BYTES: expected an integer, got '1M'"):
        ZmqOptions.from_env()
