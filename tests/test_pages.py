"""The page routes and what ships with them, without Ray or a browser (FastAPI's TestClient)."""

from __future__ import annotations

import fnmatch
import re
import tomllib

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from orchestration.web import STATIC, page_options, pages
from tests.conftest import ROOT, make_config


def _client(root_path: str = "") -> TestClient:
    app = FastAPI()
    app.include_router(pages)
    return TestClient(app, root_path=root_path)


@pytest.mark.parametrize(("path", "page"), [("/", "playground"), ("/ops", "operations")])
@pytest.mark.parametrize("prefix", ["", "/chaos"])
def test_pages_carry_the_route_prefix_in_their_base(path: str, page: str, prefix: str) -> None:
    response = _client(prefix).get(path)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert f'<base href="{prefix}/">' in response.text and f"Chorus · {page}" in response.text


@pytest.mark.parametrize("page", ["/", "/ops"])
def test_every_file_a_page_refers_to_is_served_with_its_type(page: str) -> None:
    client = _client()
    refs = re.findall(r'(?:src|href)="(static/[^"]+)"', client.get(page).text)
    assert any(r.endswith(".js") for r in refs) and any(r.endswith(".css") for r in refs)
    for ref in refs:
        response = client.get(f"/{ref}")
        assert response.status_code == 200, ref
        kind = "text/javascript" if ref.endswith(".js") else "text/css"
        assert response.headers["content-type"].startswith(kind)


def test_nothing_is_fetched_from_elsewhere() -> None:
    for path in STATIC.iterdir():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"https?://|//cdn|@import|fetch\(\s*['\"`]/", text), path.name


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/static/missing.js", 404),
    ("GET", "/static/..%2F__init__.py", 404),  # nothing outside static/
    ("GET", "/static/playground.html", 404),  # pages only under their routes
    ("POST", "/ops", 405),
])
def test_only_the_pages_and_their_files_are_served(method: str, path: str, status: int) -> None:
    # The error's body shape is the app's (serve_app's HTTPException handler): test_web.
    assert _client().request(method, path).status_code == status


def test_static_files_are_package_data() -> None:
    """Every file the pages need is matched by pyproject's package-data globs."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "orchestration.web" in setuptools["packages"]
    globs = setuptools["package-data"]["orchestration.web"]
    files = [p.relative_to(STATIC.parent).as_posix() for p in STATIC.iterdir()]
    assert len(files) >= 6
    for name in files:
        assert any(fnmatch.fnmatch(name, g) for g in globs), f"{name} would not be installed"


def test_page_options_describe_the_team_and_its_bounds() -> None:
    config = make_config(server={"max_tokens_limit": 999}, router={"primary": "code"})
    options = page_options(config, auth=True)
    assert [e["name"] for e in options["experts"]] == ["general", "code", "math", "critic"]
    assert options["experts"][1]["keywords"][:2] == ["code", "python"]
    assert options["primary"] == "code" and options["auth"] is True
    assert options["max_tokens"] == {"default": 256, "limit": 999}
    assert options["strategies"] == ["SERIAL", "PARALLEL_LIMITED", "PARALLEL_FULL"]
    assert options["priorities"] == ["high", "normal", "low"]
    assert isinstance(options["stream_experts"], bool)


def test_grafana_dashboard_queries_only_series_chorus_exports() -> None:
    """docs/grafana/chorus-dashboard.json: every query names a `ray_chorus_*` series of
    actors/metrics.py (histograms by their _bucket), through the dashboard's selectors."""
    import json

    source = (ROOT / "actors" / "metrics.py").read_text()
    histograms = set(re.findall(r'Histogram\(\s*"(chorus_\w+)"', source))
    exported = {f"ray_{name}" for name in re.findall(r'\(\s*"(chorus_\w+)"', source)}
    exported |= {f"ray_{name}_bucket" for name in histograms}
    assert len(exported) >= 9
    dashboard = json.loads((ROOT / "docs" / "grafana" / "chorus-dashboard.json").read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    used: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            series = set(re.findall(r"ray_chorus_\w+", target["expr"]))
            assert series and series <= exported, (panel["title"], series - exported)
            assert 'SessionName=~"$SessionName"' in target["expr"], panel["title"]
            assert set(re.findall(r"\$(\w+)", target["expr"])) <= variables | {"__rate_interval"}
            used |= series
    assert {s.removesuffix("_bucket") for s in used} == {s.removesuffix("_bucket")
                                                         for s in exported}
