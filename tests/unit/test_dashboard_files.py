"""The dashboard's static files ship with the package and load nothing from the internet."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = resources.files("meshnode.dashboard")
SHIPPED = ["index.html", "static/dashboard.js", "static/dashboard.css",
           "static/vendor/echarts.min.js", "static/vendor/echarts.LICENSE.txt"]
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href", "action") and v is not None]


def index_refs() -> list[str]:
    parser = _Refs()
    parser.feed(ROOT.joinpath("index.html").read_text(encoding="utf-8"))
    return parser.urls


@pytest.mark.parametrize("name", SHIPPED)
def test_file_is_shipped(name: str) -> None:
    node = ROOT.joinpath(*name.split("/"))
    assert node.is_file(), f"meshnode.dashboard is missing {name}"
    assert node.read_bytes(), f"{name} is empty"


def test_package_data_declares_every_file() -> None:
    """An editable install reads the source tree, so check the wheel's rules too."""
    setuptools = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]
    assert "meshnode.dashboard" in setuptools["packages"]
    globs = setuptools["package-data"]["meshnode.dashboard"]
    for name in SHIPPED:
        assert any(fnmatch.fnmatch(name, g) and name.count("/") == g.count("/") for g in globs), \
            f"{name} matches no package-data glob of meshnode.dashboard ({globs})"


def test_index_references_only_local_files() -> None:
    refs = index_refs()
    assert "static/vendor/echarts.min.js" in refs and "static/dashboard.js" in refs
    for url in refs:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, f"index.html loads {url} from elsewhere"
        assert not url.startswith("/"), f"{url}: relative URLs keep the page movable"
        assert ROOT.joinpath(*parts.path.split("/")).is_file(), f"{url} is not shipped"


@pytest.mark.parametrize("name", ["index.html", "static/dashboard.js", "static/dashboard.css"])
def test_no_internet_urls(name: str) -> None:
    text = ROOT.joinpath(*name.split("/")).read_text(encoding="utf-8")
    assert not re.findall(r"https?://[^\s\"')]+", text)


def test_dashboard_polls_the_relative_api_and_uses_svg() -> None:
    js = ROOT.joinpath("static", "dashboard.js").read_text(encoding="utf-8")
    assert "`api/overview?window=${WINDOW_S}`" in js
    assert js.count("renderer: 'svg'") >= 2  # the graph and the trend charts


def test_dashboard_polls_the_relative_hosts_api() -> None:
    js = ROOT.joinpath("static", "dashboard.js").read_text(encoding="utf-8")
    assert "const HOSTS_API = 'api/hosts';" in js
    assert "fetchJson(HOSTS_API)" in js


class _Tables(HTMLParser):
    """Each table of index.html by id: its column headings."""

    def __init__(self) -> None:
        super().__init__()
        self.columns: dict[str, list[str]] = {}
        self._table: str | None = None
        self._th = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = dict(attrs).get("id") or "?"
            self.columns[self._table] = []
        self._th = tag == "th" and self._table is not None

    def handle_endtag(self, tag: str) -> None:
        self._th = False
        if tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._th and self._table is not None:
            self.columns[self._table].append(data.strip())


def test_index_has_the_hosts_and_endpoints_tables() -> None:
    tables = _Tables()
    tables.feed(ROOT.joinpath("index.html").read_text(encoding="utf-8"))
    assert tables.columns["cluster"] == ["Host", "Zone", "State", "Capture", "Applied revision",
                                         "Services", "Local endpoints", "Workers", "Version"]
    assert tables.columns["endpoints"] == ["Service", "Endpoint", "Host", "Zone", "Health"]


def test_vendored_echarts_is_licensed() -> None:
    bundle = ROOT.joinpath("static", "vendor", "echarts.min.js").read_text(encoding="utf-8")
    assert "Apache Software Foundation" in bundle[:2000]
    notice = ROOT.joinpath("static", "vendor", "echarts.LICENSE.txt").read_text(encoding="utf-8")
    assert "Apache License" in notice and "Version 2.0" in notice
    assert "ZRender" in notice  # the bundle embeds it, BSD-licensed
