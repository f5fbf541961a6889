"""The man pages: warning-free groff, complete, and a real Spanish translation.

Completeness is checked against the program itself: every option in
``balance --help`` and every control shell command must be described in
both pages, so a new option or command without documentation fails here.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT

PAGES = {"en": ROOT / "man" / "balance.1", "es": ROOT / "man" / "balance.es.1"}
SECTIONS = {
    "en": ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "CONTROL SHELL", "MONITORING", "STATE DIRECTORY",
           "ENVIRONMENT", "CONFIGURATION FILE", "EXIT STATUS", "EXAMPLES", "FILES", "SEE ALSO"],
    "es": ["NOMBRE", "SINOPSIS", "DESCRIPCIÓN", "OPCIONES", "CONSOLA DE CONTROL", "MONITORIZACIÓN",
           "DIRECTORIO DE ESTADO", "ENTORNO", "ARCHIVO DE CONFIGURACIÓN", "ESTADO DE SALIDA", "EJEMPLOS",
           "ARCHIVOS", "VÉASE TAMBIÉN"],
}


def render(lang: str) -> str:
    """The page as man would show it, as plain UTF-8 text."""
    done = subprocess.run(["groff", "-man", "-Tutf8", "-P", "-cbou", str(PAGES[lang])],
                          capture_output=True, text=True, timeout=60, env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def help_text() -> str:
    return subprocess.run([sys.executable, "-m", "gbalance", "--help"], capture_output=True, text=True,
                          timeout=30, cwd=ROOT).stdout


@pytest.mark.parametrize("lang", ["en", "es"])
def test_groff_prints_no_warning(lang):
    done = subprocess.run(["groff", "-man", "-ww", "-z", str(PAGES[lang])], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""


@pytest.mark.parametrize("lang", ["en", "es"])
def test_sources_are_ascii_with_groff_escapes(lang):
    """Plain ``groff`` (no preconv) must read the page: accents as escapes."""
    PAGES[lang].read_bytes().decode("ascii")


@pytest.mark.parametrize("lang", ["en", "es"])
def test_page_has_every_section(lang):
    text = render(lang)
    headings = [line for line in text.splitlines() if line and not line[0].isspace()]
    for section in SECTIONS[lang]:
        assert section in headings, section


@pytest.mark.parametrize("lang", ["en", "es"])
def test_every_option_is_documented(lang):
    options = sorted(set(re.findall(r"^\s+(-\w|--\w+)", help_text(), re.M)))
    options.append("--help")
    assert len(options) >= 19, options
    text = render(lang)
    for opt in options:
        assert re.search(rf"(^\s+|, ){re.escape(opt)}\b", text, re.M), opt


@pytest.mark.parametrize("lang", ["en", "es"])
def test_every_shell_command_and_monitor_key_is_documented(lang):
    from gbalance.shell.shell import COMMANDS

    text = render(lang)
    for command in COMMANDS:
        assert re.search(rf"^\s+{re.escape(command.name)}\b", text, re.M) or f", {command.name}" in text, command.name
    for key in ("connect", "command=", "timeout=", "pass=", "interval=", "noenable", "nodisable", "rise=",
                "fall=", "stagger="):
        assert key in text, key
    for word in ("BALANCE_STATE_DIR", "/var/run/balance", "/etc/balance.conf", "/etc/init.d/balance",
                 "balance@", "%H", "%P"):
        assert word in text, word
    for code in ("64", "65", "69", "70", "71", "77"):
        assert re.search(rf"^\s+{code}\s*$|^\s+{code}\s{{2,}}", text, re.M), code


def test_spanish_page_is_a_full_translation():
    """Same structure and examples as the English page, in Spanish words."""
    en, es = render("en"), render("es")
    en_src, es_src = PAGES["en"].read_text(), PAGES["es"].read_text()
    # Same number of described items and examples: nothing left out.
    assert es_src.count("\n.TP\n") == en_src.count("\n.TP\n")
    assert re.findall(r"^\.B balance .*$", es_src, re.M) == re.findall(r"^\.B balance .*$", en_src, re.M)
    # The prose is Spanish, not English left in place.
    assert len(es.split()) >= 0.9 * len(en.split())
    words = set(re.findall(r"[a-záéíóúñ]+", es.lower()))
    for english in ("connection", "channel", "the", "which", "when", "servers"):
        assert english not in words, english
    for spanish in ("conexión", "canal", "servidor", "grupo", "monitorización", "también"):
        assert spanish in es.lower(), spanish
