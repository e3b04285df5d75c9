"""`refsim report`: the page's content against `refsim compare`, and the page itself in a
real headless Chromium (Debian's `chromium`, which .ci/run installs): no console errors,
every image rendered with a non-zero size, a screenshot that is not blank."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import refsim
from refsim.cli import main as cli
from refsim.exporters import compare

pytest.importorskip("matplotlib")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
VIT = ROOT / "examples" / "vit_digits"
EVAL_SAMPLES = 48


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    model = str(VIT / "vit_digits.onnx")
    sensitivity = d / "sens.json"
    assert cli(["sensitivity", model, "--calib", str(VIT / "calib.npy"), "-o", str(sensitivity), "--method", "sqnr",
                "--bits", "2,4,8", "--per-channel", "--max-samples", "64", "--quiet"]) == 0
    intq = d / "vit_mixed.intq"
    assert cli(["export", model, "-o", str(intq), "--calib", str(VIT / "calib.npy"), "--per-channel", "--max-samples", "64",
                "--bits-from", str(sensitivity), "--bit-choices", "2,4,8", "--size", "0.09", "--quiet"]) == 0
    out = d / "report"
    assert cli(["report", model, str(intq), str(VIT / "test.npy"), "--labels", str(VIT / "test_labels.txt"), "-o", str(out),
                "--max-samples", str(EVAL_SAMPLES), "--quiet"]) == 0
    return {"html": (out / "index.html").read_text(encoding="utf-8"), "path": out / "index.html", "intq": intq,
            "model": model, "dir": d, "sensitivity": sensitivity}


def test_page_is_self_contained(page):
    html = page["html"]
    assert "<script" not in html.lower()
    assert not re.search(r"(src|href)\s*=\s*[\"'](?!data:)", html), "every image and link is inline"
    assert "http://" not in html and "https://" not in html


def test_page_shows_compares_numbers_the_sensitivity_and_every_quantized_tensor(page):
    report = compare(page["model"], page["intq"], VIT / "test.npy", labels=str(VIT / "test_labels.txt"),
                     max_samples=EVAL_SAMPLES)
    html = page["html"]
    for pair, metrics in report.outputs["logits"].items():
        assert f"<td class=\"name\">{pair}</td><td class=\"\">{metrics['mse']:.5g}</td>" in html
    for model, metrics in report.task.items():
        assert f"<td class=\"name\">{model}</td><td class=\"\">{metrics['accuracy']:.5g}</td>" in html
    for row in report.sqnr:
        assert f">{row['tensor']}<" in html
    m = refsim.load(page["intq"])
    chosen = m.metadata["bit_allocation"]["chosen"]
    for layer, bits in chosen.items():
        assert re.search(rf">{re.escape(layer)}</td><td class=\"\">\d+</td><td class=\"\">{bits}</td>", html)
    quantized = [n for n, f in m.metadata["float_tensors"].items()
                 if m.graph.tensors[n].dtype.bits <= 16 and np.ndim(m.graph.tensors[n].scale) == 0]
    assert html.count('alt="histograms of ') == len(quantized) > 10
    assert 'alt="sensitivity per layer"' in html and 'alt="per-tensor SQNR bar chart"' in html
    assert "calibration method" in html and "mse" in html and "calib.npy" in html


def test_report_refuses_to_overwrite_and_reads_a_sensitivity_file(page, capsys):
    args = ["report", page["model"], str(page["intq"]), str(VIT / "test.npy"), "-o", str(page["path"].parent),
            "--max-samples", "8", "--quiet"]
    assert cli(args) == 2 and "--force" in capsys.readouterr().err
    other = page["dir"] / "other"
    assert cli(args[:5] + [str(other), "--max-samples", "8", "--quiet", "--sensitivity", str(page["sensitivity"]),
                           "--tensors", "*layernorm*"]) == 0
    html = (other / "index.html").read_text()
    assert 0 < html.count('alt="histograms of ') < 10 and 'alt="sensitivity per layer"' in html


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--disable-extensions", "--hide-scrollbars", "--virtual-time-budget=10000"]

# Injected into a copy of the page, first thing in <head>: records script errors, console
# errors and failed loads, then every image's decoded and laid-out size, into the DOM that
# --dump-dom prints.
PROBE = """<script>
window.__problems = [];
window.addEventListener('error', function (e) { window.__problems.push('error: ' + (e.message || (e.target && e.target.outerHTML && e.target.outerHTML.slice(0, 80)))); }, true);
var __error = console.error; console.error = function () { window.__problems.push('console.error: ' + Array.prototype.join.call(arguments, ' ')); __error.apply(console, arguments); };
window.addEventListener('load', function () {
  var images = Array.prototype.map.call(document.images, function (img) {
    var r = img.getBoundingClientRect();
    return [img.alt, img.complete, img.naturalWidth, img.naturalHeight, r.width, r.height];
  });
  var pre = document.createElement('pre'); pre.id = 'probe';
  pre.textContent = JSON.stringify({problems: window.__problems, images: images});
  document.body.appendChild(pre);
});
</script>"""


def chromium(tmp_path, *args):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=300)


def test_page_in_headless_chromium(page, tmp_path):
    probed = tmp_path / "probed.html"
    probed.write_text(page["html"].replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    dom = chromium(tmp_path, "--dump-dom", probed.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, flags=re.DOTALL)
    assert found, dom.stderr[-2000:]
    probe = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    assert probe["problems"] == []
    assert len(probe["images"]) == page["html"].count("<img ")
    for alt, complete, natural_w, natural_h, width, height in probe["images"]:
        assert complete and natural_w > 0 and natural_h > 0 and width > 0 and height > 0, alt

    # the page as written (no probe): the browser logs no console message or page error
    logged = chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", page["path"].as_uri())
    assert "<h1>refsim report" in logged.stdout
    assert not [line for line in logged.stderr.splitlines() if ":CONSOLE(" in line or "Uncaught" in line]

    shot = tmp_path / "shot.png"
    chromium(tmp_path, "--window-size=1280,2400", f"--screenshot={shot}", page["path"].as_uri())
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), np.float64)
    assert pixels.shape[0] >= 2000 and pixels.shape[1] >= 1200
    ink = np.mean(np.any(pixels < 200, axis=2))
    colour = np.mean(np.ptp(pixels, axis=2) > 60)  # plotted bars and lines, not just black text
    assert ink > 0.02 and colour > 0.002, (ink, colour)
