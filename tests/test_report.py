"""Figures, the self-contained HTML report, and the run folder (run.json, result tables)."""

from __future__ import annotations

import base64
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from layerscope.errors import LayerscopeError
from layerscope.report import bar_chart, heatmap, line_chart, write_report
from layerscope.runner import RunFolder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


# -- figures ---------------------------------------------------------------------------------------


def test_bar_chart_writes_png(tmp_path):
    out = bar_chart(
        [0, 1, 2, 3, 4, 5],
        [2.1, 2.3, 5.0, 2.2, 4.0, 2.0],
        tmp_path / "sub" / "loss.png",
        title="loss per window",
        xlabel="layer",
        ylabel="loss",
        baseline=2.0,
        highlight_top=2,
    )
    assert out == tmp_path / "sub" / "loss.png"
    w, h = _png_size(out)
    assert w > 300 and h > 200
    assert out.stat().st_size > 5000


def test_bar_chart_highlight_changes_picture(tmp_path):
    x, y = list(range(8)), [1, 3, 2, 8, 1, 1, 7, 2]
    plain = bar_chart(x, y, tmp_path / "plain.png")
    marked = bar_chart(x, y, tmp_path / "marked.png", highlight_top=2)
    assert plain.read_bytes() != marked.read_bytes()
    # more highlighted than there are bars (a 2-layer model with the top 3 asked for) marks them all
    _png_size(bar_chart([0, 1], [1.0, 2.0], tmp_path / "few.png", highlight_top=3))


def test_line_chart_and_heatmap_write_pngs(tmp_path):
    ranks = [1, 2, 4, 8, 16]
    line = line_chart(
        ranks,
        {"q": [3.0, 2.5, 2.2, 2.1, 2.05], "mlp": ([1, 2, 4], [4.0, 3.0, 2.5])},
        tmp_path / "curves.png",
        title="loss vs rank",
        xlabel="rank",
        ylabel="loss",
        baseline=2.0,
        logx=True,
    )
    rng = np.random.default_rng(0)
    m = rng.random((12, 12))
    heat = heatmap((m + m.T) / 2, tmp_path / "cka.png", title="CKA", xlabel="layer", ylabel="layer", vmin=0, vmax=1)
    big = heatmap(rng.random((40, 40)), tmp_path / "big.png")
    for p in (line, heat, big):
        w, h = _png_size(p)
        assert w > 300 and h > 200 and p.stat().st_size > 5000


def test_figures_refuse_bad_input(tmp_path):
    with pytest.raises(LayerscopeError, match="one label per bar"):
        bar_chart([0, 1, 2], [1.0, 2.0], tmp_path / "a.png")
    with pytest.raises(LayerscopeError, match="highlight_top"):
        bar_chart([0, 1], [1.0, 2.0], tmp_path / "a.png", highlight_top=-1)
    with pytest.raises(LayerscopeError, match="2-D"):
        heatmap([1.0, 2.0], tmp_path / "h.png")
    with pytest.raises(LayerscopeError, match="series 'a'"):
        line_chart([0, 1, 2], {"a": [1.0, 2.0]}, tmp_path / "l.png")
    with pytest.raises(LayerscopeError, match=".png"):
        bar_chart([0], [1.0], tmp_path / "a.jpg")
    assert not list(tmp_path.iterdir())


def test_figures_need_no_display(tmp_path):
    code = (
        "import os, sys; os.environ.pop('DISPLAY', None); os.environ.pop('MPLBACKEND', None)\n"
        "from layerscope.report import bar_chart\n"
        f"bar_chart([0, 1], [1.0, 2.0], {str(tmp_path / 'x.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    _png_size(tmp_path / "x.png")


# -- HTML report ------------------------------------------------------------------------------------


@pytest.fixture
def figures(tmp_path):
    return [
        bar_chart([0, 1, 2], [1.0, 2.0, 1.5], tmp_path / "loss_by_layer.png", title="loss"),
        heatmap(np.eye(3), tmp_path / "cka.png", title="cka"),
    ]


def test_report_is_self_contained(tmp_path, figures):
    table = pd.DataFrame({"layer": [0, 1, 2], "loss": [1.25, 2.5, 1.875], "method": ["ablate", "ablate", "noise"]})
    out = write_report(
        tmp_path / "report" / "report.html",
        title="Critical layers of tiny-gpt",
        summary={"model": "tiny-gpt", "baseline loss": 1.0, "top layers": [1, 2]},
        table=table,
        figures=figures,
        notes=["windows are [start, end)"],
    )
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "<title>Critical layers of tiny-gpt</title>" in text
    assert "<h1>Critical layers of tiny-gpt</h1>" in text
    for value in ("1.25", "2.5", "1.875", "ablate", "noise", "tiny-gpt", "baseline loss", "windows are [start, end)"):
        assert value in text
    assert text.count("data:image/png;base64,") == len(figures)
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"""(src|href)=["'](?!data:)""", text), "only data URIs may be referenced"
    # the embedded images are the figure files, byte for byte
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert [base64.b64decode(e) for e in embedded] == [p.read_bytes() for p in figures]


def test_report_escapes_text(tmp_path, figures):
    evil = "<script>alert('x')</script>"
    table = pd.DataFrame({"prompt": [evil], f"col{evil}": [1.0]})
    out = write_report(
        tmp_path / "r.html",
        title=f"title {evil}",
        summary={f"key {evil}": f"value {evil}", "nested": {"p": evil}},
        table=table,
        figures=[(figures[0], f"caption {evil}")],
        notes=[f"note {evil}"],
    )
    text = out.read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    assert "&lt;script&gt;" in text
    assert text.count("&lt;script&gt;") >= 7


def test_report_refuses_missing_figure(tmp_path):
    with pytest.raises(LayerscopeError, match="does not exist"):
        write_report(tmp_path / "r.html", title="t", summary={}, table=pd.DataFrame({"a": [1]}), figures=[tmp_path / "nope.png"])
    assert not (tmp_path / "r.html").exists()


def test_report_truncates_long_tables(tmp_path):
    table = pd.DataFrame({"i": range(50), "v": [f"value{i}" for i in range(50)]})
    text = write_report(tmp_path / "r.html", title="t", summary={}, table=table, figures=[], max_rows=10).read_text()
    assert "value9<" in text and "value10<" not in text and "first 10 of 50 rows" in text


# -- run folder -------------------------------------------------------------------------------------


def test_run_folder_default_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = RunFolder(None, "laser")
    b = RunFolder(None, "laser")
    assert a.out.parent == Path("runs") and a.out.is_dir() and b.out.is_dir() and a.out != b.out
    assert re.fullmatch(r"laser-\d{8}-\d{6}(-\d+)?", a.out.name)
    assert a.store_path == a.out / "results.sqlite"
    assert a.path("figures/loss.png") == a.out / "figures" / "loss.png" and (a.out / "figures").is_dir()
    with pytest.raises(LayerscopeError):
        RunFolder(None, "a/b")


def test_run_json(tmp_path):
    folder = RunFolder(tmp_path / "run", "critical-layers")
    config = {"model": "tiny", "windows": [[0, 2], [2, 4]], "out": tmp_path / "run"}
    path = folder.write_run_json(config, seed=1234, fingerprint={"weights": "abc123", "data": "wiki:64"})
    assert path == tmp_path / "run" / "run.json"
    record = json.loads(path.read_text())
    assert record["config"] == {"model": "tiny", "windows": [[0, 2], [2, 4]], "out": str(tmp_path / "run")}
    assert record["seed"] == 1234
    assert record["fingerprint"] == {"weights": "abc123", "data": "wiki:64"}
    assert record["analysis"] == "critical-layers"
    import numpy as _np
    import pandas as _pd

    assert record["versions"]["numpy"] == _np.__version__
    assert record["versions"]["pandas"] == _pd.__version__
    assert "layerscope" in record["versions"]
    assert record["environment"]["python"] == sys.version.split()[0]
    assert record["environment"]["hostname"]
    assert record["created"] and record["written"]
    with pytest.raises(LayerscopeError, match="seed"):
        folder.write_run_json({}, seed="1", fingerprint="x")


def test_write_table_round_trips(tmp_path):
    folder = RunFolder(tmp_path / "run", "ablation")
    df = pd.DataFrame(
        {
            "layer": [0, 1, 2, 3],
            "module": ["q", "k", "down", "up"],
            "loss": [2.5, 3.125, float("nan"), 1e-9],
            "ablated": [True, False, True, False],
        }
    )
    csv_path, parquet_path = folder.write_table(df)
    assert csv_path == tmp_path / "run" / "results.csv" and parquet_path == tmp_path / "run" / "results.parquet"
    pd.testing.assert_frame_equal(pd.read_parquet(parquet_path), df)
    pd.testing.assert_frame_equal(pd.read_csv(csv_path), df)

    named = df.set_index("layer")
    csv2, pq2 = folder.write_table(named, name="by_layer")
    assert csv2.name == "by_layer.csv"
    pd.testing.assert_frame_equal(pd.read_parquet(pq2), df)
    pd.testing.assert_frame_equal(pd.read_csv(csv2), df)
