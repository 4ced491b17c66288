"""`l3d report`: the dashboard (index.html and one page per subnetwork) opened in headless
Chromium loads without console errors, sorts, searches and follows anchors, shows whole text
windows shaded token by token, and shows `<script>` / `onerror` / `<svg onload>` payloads from
class names, labels and tokens as text without running them. Screenshots are written to each
test's tmp_path."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import select
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from l3d import io, plots, runs
from l3d.cli import main
from l3d.config import L3DConfig
from l3d.core.algorithm import SubnetworkPair
from l3d.report import data as report_data
from l3d.report import heatmaps, index, subnetwork, svg
from l3d.report.html import Assets

PAYLOADS = [
    "<script>window.__pwned = 1; document.title = 'PWNED'</script>",
    '"><img src=x onerror="window.__pwned = 2">',
    "</table><svg onload=\"window.__pwned = 3\"></svg> & 'quotes'",
]
CLASS_NAMES = [*PAYLOADS, "plain", "<b>bold</b>"]
N_V = 6
# The index of a 1,000-subnetwork run (one row each: numbers, sparkline, top labels) stays under
# this many bytes; 0.79 MB here, 0.84 MB in benchmarks/bench_report.py (docs/report.md).
INDEX_BYTES_1000 = 1_000_000


pytestmark = pytest.mark.usefixtures("one_thread")


def sparse_vectors(n: int, n_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TMS-like inputs (each feature active with probability 0.3, at least one per input) and
    their labels (the largest feature)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, n_features, generator=g) * (torch.rand(n, n_features, generator=g) < 0.3)
    x[x.sum(1) == 0, 0] = 0.5
    return x, x.argmax(1)


def tiny_spec(folder: Path) -> dict:
    """A TMS model on vectors from a data file whose class names carry HTML/JS payloads."""
    x, labels = sparse_vectors(120, 5, seed=1)
    save_file({"x": x, "labels": labels}, str(folder / "data.safetensors"))
    return {
        "model": {"python": "l3d.toys:TMS", "options": {"n_features": 5, "n_hidden": 2}},
        "data": {
            "file": str(folder / "data.safetensors"),
            "options": {"key": "x"},
            "labels": "labels",
            "class_names": CLASS_NAMES,
        },
        "l3d": {
            "params": ["W_in", "W_out", "b"],
            "n_subnetworks": N_V,
            "epochs": 3,
            "batch_size": 40,
        },
        "run": {"progress": False},
    }


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> Path:
    """A finished, analysed run (subnetworks 0 and 2 intervened on) whose class names, and so its
    sample labels and output names, are HTML/JS payloads; reported."""
    folder = tmp_path_factory.mktemp("report")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_spec(folder)))
    run_dir = folder / "run"
    assert main(["decompose", str(config), "--out", str(run_dir), "-q"]) == 0
    assert main(["analyze", str(run_dir), "--n-top", "3", "--n-references", "2", "-q"]) == 0
    assert main(["intervene", str(run_dir), "--subnetwork", "0", "2", "--delta", "1", "-q"]) == 0
    assert main(["report", str(run_dir), "-q"]) == 0
    return run_dir


def pages(run_dir: Path) -> list[Path]:
    return [run_dir / "report" / "index.html", *(run_dir / "report" / "subnetworks").glob("*.html")]


def test_every_page_escapes_the_payloads(hostile_run):
    found = pages(hostile_run)
    assert len(found) == 1 + N_V
    text = ""
    for path in found:
        page = path.read_text()
        assert page.count("<script") == (1 if path.name == "index.html" else 0)
        # Offline and locked down: no URL leaves the folder; scripts only by hash, or none.
        assert not re.search(r'(src|href)="(https?:)?//', page)
        csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page)
        assert csp and "default-src &#x27;none&#x27;" in csp[1]
        script_src = "sha256-" if path.name == "index.html" else "script-src &#x27;none&#x27;"
        assert script_src in csp[1]
        assert "<svg onload" not in page and "<img src=x" not in page and "<b>" not in page
        text += page
    for payload in CLASS_NAMES:
        assert html_escaped(payload) in text  # shown, as text


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_max_abs_pooling_keeps_each_blocks_largest_entry():
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(7, 10))
    pooled = heatmaps.pool_max_abs(matrix, max_side=3)
    assert pooled.shape == (3, 3)
    for i in range(3):
        for j in range(3):
            block = matrix[3 * i : 3 * i + 3, 4 * j : 4 * j + 4]
            assert pooled[i, j] == block.flat[np.abs(block).argmax()]
    assert heatmaps.pool_max_abs(matrix, max_side=10) is matrix


def test_report_of_an_unfinished_run_is_a_clear_error(tmp_path, capsys):
    spec = runs.RunSpec.create(tiny_spec(tmp_path))
    runs.create_run(spec, tmp_path / "run")
    assert main(["report", str(tmp_path / "run")]) == 2
    assert "has no finished decomposition" in capsys.readouterr().err


def test_report_runs_the_missing_analysis_and_prints_the_headline(hostile_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(hostile_run, run, ignore=shutil.ignore_patterns("analysis", "report"))
    assert main(["report", str(run), "--no-analyze"]) == 0
    err = capsys.readouterr().err
    assert f"no analysis: the report has no examples (run `l3d analyze {run}`)" in err
    assert "No analysis yet" in (run / "report" / "index.html").read_text()
    assert "Top examples" not in (run / "report" / "subnetworks" / "0.html").read_text()

    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"no analysis yet: running `l3d analyze {run}` first" in err
    assert re.search(rf"{N_V} subnetworks, \d+ dead, loss [\d.]+ \(eq. 8\)", err), err
    assert (run / "analysis" / "impact.safetensors").is_file()
    assert "Top examples" in (run / "report" / "subnetworks" / "0.html").read_text()


def test_a_folder_with_only_a_decomposition_is_reported_from_its_factors(hostile_run, tmp_path):
    """No config.yaml, metrics or analysis (a decomposition copied on its own): the report still
    lists every subnetwork with its heatmaps, and says how to get examples."""
    bare = tmp_path / "bare"
    shutil.copytree(hostile_run / "decomposition", bare / "decomposition")
    assert main(["report", str(bare), "-q"]) == 0
    index = (bare / "report" / "index.html").read_text()
    assert index.count('<tr class="subnetwork"') == N_V and "No analysis yet" in index
    page = (bare / "report" / "subnetworks" / "0.html").read_text()
    assert "V_out per tensor" in page and "Top examples" not in page


def test_a_contrastive_pair_run_shows_its_pairs_inputs(tmp_path):
    x, _ = sparse_vectors(48, 5, seed=2)
    counterparts, _ = sparse_vectors(48, 5, seed=3)
    save_file({"inputs": x, "counterparts": counterparts}, str(tmp_path / "pairs.safetensors"))
    spec = tiny_spec(tmp_path)
    spec["data"] = {
        "file": str(tmp_path / "pairs.safetensors"),
        "options": {"key": "inputs"},
        "pairs": {"counterparts": "counterparts"},
    }
    spec["l3d"] = {**spec["l3d"], "reference": "counterpart", "n_subnetworks": 2, "epochs": 2}
    (tmp_path / "pairs.yaml").write_text(yaml.safe_dump(spec))
    run = tmp_path / "run"
    assert main(["decompose", str(tmp_path / "pairs.yaml"), "--out", str(run), "-q"]) == 0
    assert main(["report", str(run), "-q"]) == 0  # analyses the pairs first
    index = (run / "report" / "index.html").read_text()
    assert "Contrastive-pair run: each example is the input of a pair." in index
    page = (run / "report" / "subnetworks" / "0.html").read_text()
    assert "Top examples" in page and '<svg class="bars"' in page  # the inputs, as vectors


def test_non_finite_impacts_are_reported_as_zero_with_a_note(hostile_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(hostile_run, run, ignore=shutil.ignore_patterns("report"))
    tensors = io.load_tensors(run / "analysis" / "impact.safetensors", "impact")
    tensors["impact"][0, 0] = float("nan")
    tensors["impact"][1, 1] = float("inf")
    io.save_tensors(run / "analysis" / "impact.safetensors", tensors)
    data = report_data.load(run)
    assert data.impact is not None and np.isfinite(data.impact).all()
    assert data.impact[0, 0] == 0 and data.impact[1, 1] == 0
    assert "2 impact values are not finite; they are shown as 0." in data.notes
    assert main(["report", str(run), "-q"]) == 0


@pytest.mark.parametrize("edit", ["list", "fewer", "other_count"])
def test_an_edited_or_stale_analysis_json_is_one_line_saying_to_analyse_again(
    hostile_run, tmp_path, capsys, edit
):
    """Found by a scripted pass: a list gave AttributeError; a subnetwork record removed gave a
    report silently missing that subnetwork's numbers."""
    run = tmp_path / "run"
    shutil.copytree(hostile_run, run, ignore=shutil.ignore_patterns("report"))
    path = run / "analysis" / "analysis.json"
    analysis = json.loads(path.read_text())
    if edit == "list":
        analysis = analysis["subnetworks"]
    elif edit == "fewer":
        analysis["subnetworks"] = analysis["subnetworks"][1:]
    else:
        analysis["summary"]["n_subnetworks"] += 1
    path.write_text(json.dumps(analysis))
    assert main(["report", str(run), "-q"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert str(path) in err and f"run `l3d analyze {run}` again" in err


@pytest.mark.parametrize(
    "file, content, said",
    [
        ("interventions/subnetwork_0.json", [], "expected a JSON object, got list"),
        ("interventions/subnetwork_0.json", {}, "'subnetwork': field required"),
        ("interventions/subnetwork_0.json", "subnetwork=a", "'subnetwork': input should be"),
        ("interventions/subnetwork_0.json", "subnetwork=99", "subnetwork 99 is not one of 0..5"),
        ("interventions/subnetwork_0.json", "change=short", "one row of changes per δ"),
        ("controls/controls.json", [], "expected a JSON object, got list"),
        ("controls/controls.json", {"seed": {"mmcs": 1}}, "'seed.second_seed': field required"),
    ],
)
def test_an_edited_intervention_or_controls_file_is_one_line_naming_it(
    hostile_run, tmp_path, capsys, file, content, said
):
    """Found by a scripted pass: these gave TypeError, KeyError, ValueError or AttributeError."""
    run = tmp_path / "run"
    shutil.copytree(hostile_run, run, ignore=shutil.ignore_patterns("report"))
    path = run / file
    path.parent.mkdir(exist_ok=True)
    if isinstance(content, str):  # one field of the file as l3d wrote it, edited
        content, (key, value) = json.loads(path.read_text()), content.split("=")
        content[key] = (
            content[key][:-1] if value == "short" else int(value) if value.isdigit() else value
        )
    path.write_text(json.dumps(content))
    assert main(["report", str(run), "-q"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert str(path) in err and said in err, err


def test_adapters_in_the_run_folder_are_shown_with_their_numbers(hostile_run, tmp_path):
    """`l3d finetune RUN --out RUN/...` adapters appear on the index: their subnetworks (linked),
    alpha, trained numbers and the objective and retain distance at the first and last step,
    read back from what the adapter saved; an unreadable one is a note, a hostile one escaped."""
    run = tmp_path / "run"
    shutil.copytree(hostile_run, run, ignore=shutil.ignore_patterns("report"))
    x, _ = sparse_vectors(40, 5, seed=3)
    save_file({"inputs": x, "labels": torch.zeros(40, 5)}, str(tmp_path / "edit.safetensors"))
    save_file({"inputs": sparse_vectors(40, 5, seed=4)[0]}, str(tmp_path / "keep.safetensors"))
    common = ["--data", str(tmp_path / "edit.safetensors"), "--steps", "7", "-q"]
    assert (
        main(
            [
                "finetune",
                str(run),
                "--subnetworks",
                "0",
                "2",
                *common,
                "--retain",
                str(tmp_path / "keep.safetensors"),
                "--out",
                str(run / "edit"),
            ]
        )
        == 0
    )
    assert main(["finetune", str(run), "--subnetworks", "1", *common, "--train", "cores",
                 "--out", str(run / "adapters" / "cores")]) == 0  # fmt: skip
    broken = run / "adapters" / "broken"
    shutil.copytree(run / "edit", broken)
    (broken / "adapter.json").write_text("{")
    hostile = run / "adapters" / "hostile"
    shutil.copytree(run / "edit", hostile)
    meta = json.loads((hostile / "adapter.json").read_text())
    hostile_recipe = {**meta["trained_with"], "objective": PAYLOADS[0]}
    (hostile / "adapter.json").write_text(json.dumps({**meta, "trained_with": hostile_recipe}))
    legacy = run / "adapters" / "legacy"  # saved before adapters recorded how they were trained
    shutil.copytree(run / "edit", legacy)
    (legacy / "adapter.json").write_text(
        json.dumps({k: v for k, v in meta.items() if k != "trained_with"})
    )

    assert main(["report", str(run), "-q"]) == 0
    page = (run / "report" / "index.html").read_text()
    section = page[page.index("<h2>Adapters</h2>") : page.index("<h2>Subnetworks</h2>")]
    saved = json.loads((run / "edit" / "adapter.json").read_text())
    history = saved["history"]
    alpha = io.load_tensors(run / "edit" / "adapter.safetensors", "adapter")["alpha"].tolist()
    row = section[section.index("<td>edit</td>") :].split("</tr>")[0]
    assert '<a href="subnetworks/0.html">#0</a> <a href="subnetworks/2.html">#2</a>' in row
    assert ", ".join(f"{a:.4g}" for a in alpha) in row
    assert "<td>labels, lr 0.01, retain weight 1</td>" in row  # how it was trained
    assert f'<td class="num">{saved["n_trainable"]}</td><td class="num">7</td>' in row
    for key in ("objective", "retain_distance"):
        assert f"{history[0][key]:.4g} → {history[-1][key]:.4g}" in row
    w0 = saved["w0_norms"]  # the zero-initialised bias has nothing to be relative to
    ratio = max(d / w0[n] for n, d in saved["delta_norms"].items() if w0[n] > 0)
    assert f"{ratio:.4g}" in row
    cores = section[section.index("<td>adapters/cores</td>") :].split("</tr>")[0]
    assert "<td>cores</td><td>" in cores and cores.count("<td>–</td>") == 2  # no alpha, retain
    assert "Adapter adapters/broken not shown: adapter description" in page
    assert "<td>adapters/legacy</td><td>scalars</td><td>–</td>" in section
    assert "is not valid JSON" in page
    odd = run / "adapters" / "odd"
    shutil.copytree(run / "edit", odd)
    (odd / "adapter.json").write_text(json.dumps({**meta, "subnetworks": ["<b>0</b>", 2]}))
    hostile_mode = run / "adapters" / "mode"  # a train mode l3d has not: a note, no payload
    shutil.copytree(run / "edit", hostile_mode)
    (hostile_mode / "adapter.json").write_text(json.dumps({**meta, "train": PAYLOADS[0]}))
    beyond = run / "adapters" / "beyond"  # subnetwork 9 of a run that has 0..4
    shutil.copytree(run / "edit", beyond)
    (beyond / "adapter.json").write_text(json.dumps({**meta, "subnetworks": [0, 9]}))
    negative = run / "adapters" / "negative"
    shutil.copytree(run / "edit", negative)
    (negative / "adapter.json").write_text(json.dumps({**meta, "n_trainable": -5}))
    letters = run / "adapters" / "letters"
    shutil.copytree(run / "edit", letters)
    steps = [{**meta["history"][0], "objective": "x"}, *meta["history"][1:]]
    (letters / "adapter.json").write_text(json.dumps({**meta, "history": steps}))
    assert main(["report", str(run), "-q"]) == 0
    page = (run / "report" / "index.html").read_text()
    assert "Adapter adapters/beyond not shown: " in page and "subnetwork 9" in page
    assert "Adapter adapters/negative not shown: " in page
    assert "&#x27;n_trainable&#x27;: input should be greater than or equal to 0" in page
    assert "Adapter adapters/letters not shown: " in page
    assert "input should be a valid number" in page
    assert "Adapter adapters/odd not shown: " in page
    assert "&#x27;subnetworks.0&#x27;: input should be a valid integer: restore it" in page
    assert "Adapter adapters/mode not shown: " in page
    assert "&#x27;train&#x27;: input should be" in page
    section = page[page.index("<h2>Adapters</h2>") : page.index("<h2>Subnetworks</h2>")]
    assert PAYLOADS[0] not in page and html_escaped(PAYLOADS[0]) in section
    assert 'src="img/adapters.png"' in section and (run / "report/img/adapters.png").is_file()


def test_figures_count_in_whole_numbers():
    """P_act and impact histogram counts, epochs and live subnetworks never get a "0.5" tick."""
    fig = plots.p_active_figure(np.array([0.1, 0.2, 0.25]), histogram=True)
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in fig.axes[0].get_yticks())
    records = [
        {"epoch": e, "loss_paper": 0.5, "loss_pooled_squared": 0.2, "live_subnetworks": 5}
        for e in range(2)
    ]
    histogram = svg.impact_histogram(np.random.default_rng(0).exponential(size=5000))
    assert re.findall(r'stroke="none">([\d,]+)</text>', histogram) == ["1", "10", "100"]
    fig = plots.loss_curves_figure(records)
    fig.canvas.draw()
    loss, live = fig.axes
    for ticks in (loss.get_xticks(), live.get_xticks(), live.get_yticks()):
        assert all(float(t).is_integer() for t in ticks), ticks


def test_control_characters_are_shown_escaped_never_blank():
    assert report_data.visible("\x0b") == "\\x0b"
    assert report_data.visible("a\x0cb\u2028") == "a\\x0cb\\u2028"
    assert report_data.visible(" \n") == "·↵" and report_data.visible("") == "∅"
    # Format characters: a right-to-left override reversed the text after it on the page, a
    # zero-width space made a blank token.
    assert report_data.visible("ab\u202ecd") == "ab\\u202ecd"
    assert report_data.visible("\u200b") == "\\u200b"


def test_matched_units_and_quantile_bands():
    x, _ = sparse_vectors(400, 4, seed=0)
    units = np.eye(4, dtype=bool)
    # Subnetwork k matters on feature (3 - k): the match is that feature, with most of the impact.
    impact = x.numpy()[:, ::-1].copy()
    matched = report_data.matched_units(impact, x, units)
    assert [u for u, _ in matched] == [3, 2, 1, 0]
    assert all(share > 0.5 for _, share in matched)

    column = np.arange(1000, dtype=float)  # rows 1..999 have impact > 0; 999 the largest
    bands = report_data.quantile_examples(column, 3, skip={999})
    assert [len(rows) for _, rows in bands] == [3, 3, 3, 3]
    assert bands[0][1][0] == 998 and bands[-1][1][-1] == 1  # top band starts below the skipped
    assert "top 0–1 %" in bands[0][0]
    for (_, higher), (_, lower) in itertools.pairwise(bands):
        assert min(column[higher]) > max(column[lower])


# Headless Chromium over the DevTools protocol on a pipe (no websocket library needed) --------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


class Chromium:
    """Headless Chromium driven over the DevTools protocol on fds 3/4 (--remote-debugging-pipe)."""

    def __init__(self, binary: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="l3d-chromium-")
        cmd_read, self._cmd_write = os.pipe()
        self._out_read, out_write = os.pipe()
        flags = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-pipe",
            f"--user-data-dir={self.profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--window-size=1280,900",
        ]
        command = " ".join(shlex.quote(a) for a in [binary, *flags])
        self.proc = subprocess.Popen(
            ["bash", "-c", f"exec {command} 3<&{cmd_read} 4>&{out_write}"],
            pass_fds=(cmd_read, out_write),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(cmd_read)
        os.close(out_write)
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []

    def _read(self, timeout: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._out_read], [], [], timeout)
            if not ready:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._out_read, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._cmd_write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read(60)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, session: str, timeout: float = 60) -> None:
        end = time.time() + timeout

        def seen() -> bool:
            return any(
                e.get("method") == method and e.get("sessionId") == session for e in self.events
            )

        while not seen():
            self.events.append(self._read(max(0.1, end - time.time())))

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._cmd_write)
        os.close(self._out_read)
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    def __init__(self, browser: Chromium, url: str) -> None:
        self.browser = browser
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Runtime", "Log", "Page"):
            browser.send(f"{domain}.enable", session=self.session)
        browser.send("Page.navigate", {"url": url}, session=self.session)
        browser.wait_for("Page.loadEventFired", self.session)

    def eval(self, expression: str):
        result = self.browser.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=self.session,
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def errors(self) -> list[dict]:
        """Uncaught exceptions, console.error calls and browser errors (failed loads, CSP)."""
        bad = []
        for e in self.browser.events:
            if e.get("sessionId") != self.session:
                continue
            method, params = e.get("method"), e.get("params", {})
            if (
                method == "Runtime.exceptionThrown"
                or (method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"))
                or (method == "Log.entryAdded" and params["entry"]["level"] == "error")
            ):
                bad.append(params)
        return bad

    def load_images(self) -> int:
        """Force lazy images to load (a broken one then shows up as an error); returns how many
        decoded with a width."""
        widths = self.eval(
            "Promise.all(Array.from(document.images).map(i => { i.loading = 'eager';"
            " return i.decode().then(() => i.naturalWidth, () => -1); }))"
        )
        assert min(widths, default=1) > 0, widths
        return len(widths)

    def screenshot(self, path: Path) -> None:
        """The whole page, every image loaded, as a PNG (a test artifact under tmp_path)."""
        self.load_images()
        shot = self.browser.send(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True},
            session=self.session,
        )
        path.write_bytes(base64.b64decode(shot["data"]))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


@pytest.fixture(scope="module")
def browser():
    binary = _chromium()
    if binary is None:
        pytest.skip(
            "headless Chromium not found: install Debian's chromium (apt-get install chromium; "
            "`make test` tries) to run the browser tests of the HTML report"
        )
    chromium = Chromium(binary)
    yield chromium
    chromium.close()


def test_index_sorts_searches_and_hides_dead_in_chromium(hostile_run, browser, tmp_path):
    page = Page(browser, (hostile_run / "report" / "index.html").resolve().as_uri())
    rows = "Array.from(document.querySelectorAll('#subnetworks tbody tr'))"
    visible = f"{rows}.filter(r => !r.hidden).map(r => +r.dataset.index)"
    assert page.eval(f"{rows}.length") == N_V
    p_active = page.eval(f"{rows}.map(r => +r.dataset.pActive)")
    assert p_active == sorted(p_active, reverse=True)  # P_act, high first, without any script
    assert page.load_images() > 2

    # The payloads are on the page as text, and none of them ran.
    assert page.eval("typeof window.__pwned") == "undefined"
    assert page.eval("document.title").startswith("L3D report")
    assert page.eval("document.scripts.length") == 1
    assert page.eval("document.querySelectorAll('img[src=\"x\"], b').length") == 0
    text = page.eval("document.body.innerText")
    assert any(payload in text for payload in PAYLOADS)  # a top label

    # Sorting: by index (ascending first, then descending), by mean impact.
    header = "document.querySelector('th[data-key=\"{}\"]').click()"
    page.eval(header.format("index"))
    assert page.eval(f"{rows}.map(r => +r.dataset.index)") == list(range(N_V))
    page.eval(header.format("index"))
    assert page.eval(f"{rows}.map(r => +r.dataset.index)") == list(range(N_V))[::-1]
    page.eval(header.format("impact"))
    impact = page.eval(f"{rows}.map(r => +r.dataset.impact)")
    assert impact == sorted(impact, reverse=True) and len(set(impact)) > 1
    page.eval(  # by keyboard: Enter on a focused header
        "document.querySelector('th[data-key=\"pActive\"]')"
        ".dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter'}))"
    )
    assert page.eval(f"{rows}.map(r => +r.dataset.pActive)") == p_active

    # Search by a top label (a payload, typed as text), by index; hide dead.
    search = (
        "{{ const s = document.getElementById('search'); s.value = {};"
        "s.dispatchEvent(new Event('input')); }}"
    )
    label = PAYLOADS[1].lower()
    expected = page.eval(
        f"{rows}.filter(r => r.dataset.search.includes({json.dumps(label)}))"
        ".map(r => +r.dataset.index)"
    )
    page.eval(search.format(json.dumps(PAYLOADS[1])))
    assert sorted(page.eval(visible)) == sorted(expected) and len(expected) > 0
    page.eval(search.format('"#2"'))
    assert page.eval(visible) == [2]
    assert page.eval("document.getElementById('count').textContent") == f"1 of {N_V} shown"
    page.eval(search.format('""'))
    page.eval("document.getElementById('hide-dead').click()")
    live = page.eval(f"{rows}.filter(r => r.dataset.dead === '0').length")
    assert len(page.eval(visible)) == live

    page.screenshot(tmp_path / "index.png")
    assert page.errors() == []


def test_a_subnetwork_page_in_chromium(hostile_run, browser, tmp_path):
    page = Page(browser, (hostile_run / "report" / "subnetworks" / "0.html").resolve().as_uri())
    assert page.load_images() >= 4  # three V_out heatmaps and the intervention plot
    assert page.eval("typeof window.__pwned") == "undefined"
    assert page.eval("document.scripts.length") == 0
    text = page.eval("document.body.innerText")
    for heading in (
        "Subnetwork 0",
        "Top examples",
        "Outputs it moves",
        "Intervention",
        "most similar",
        "most co-active",
        "V_out per tensor",
        "% of ‖v‖²",
    ):
        assert heading in text, heading
    assert "noise floor" in text or "below noise" in text
    assert "d output/dδ" in text and "logit" not in text
    # Vector inputs as bar plots with their active features labelled.
    assert page.eval("document.querySelectorAll('ol.examples svg.bars').length") >= 3
    assert page.eval("document.querySelector('ol.examples svg.bars text') !== null")
    assert page.eval("document.querySelectorAll('svg.hist rect').length") > 0
    # Related subnetworks link to pages that exist, never to this one.
    links = page.eval("Array.from(document.querySelectorAll('a.rel')).map(a => a.href)")
    assert links and all(Path(link.removeprefix("file://")).is_file() for link in links)
    assert not any(link.endswith("/0.html") for link in links)
    page.screenshot(tmp_path / "subnetwork.png")
    assert page.errors() == []


def test_an_anchor_lands_on_its_row(hostile_run, browser):
    """index.html#subnetwork-K shows the page scrolled to K's row, not a blank page."""
    url = (hostile_run / "report" / "index.html").resolve().as_uri()
    for k in range(N_V):
        page = Page(browser, f"{url}#subnetwork-{k}")
        assert page.eval("document.querySelector(':target').id") == f"subnetwork-{k}"
        top = page.eval("document.querySelector(':target').getBoundingClientRect().top")
        assert 0 <= top < page.eval("window.innerHeight")
        assert len(page.eval("document.body.innerText")) > 200
        assert page.errors() == []


def test_text_windows_are_shaded_token_by_token(hostile_run, browser, tmp_path):
    """Whole windows with every token shaded by its own impact, the sample token framed;
    whitespace and out-of-vocabulary ids visible; payload tokens shown as text."""

    vocab = ["the", " cat", " ", "\n", "", *PAYLOADS]

    class Tokenizer:
        def __len__(self) -> int:
            return len(vocab)

        def decode(self, ids: list[int]) -> str:
            return "".join(vocab[i] for i in ids)

    data = report_data.load(hostile_run)
    ids = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [99, 0, 1, 0]])  # 99: not in the vocabulary
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
    positions = np.argwhere(mask == 1)
    impact = np.zeros((len(positions), N_V), dtype=np.float32)
    impact[:, 0] = np.arange(len(positions)) + 1.0
    data.impact = impact
    data.samples = report_data.Samples("text", ids, positions, ids, mask, Tokenizer())
    out = tmp_path / "report"
    (out / "subnetworks").mkdir(parents=True)
    cosine = report_data.vout_cosine(data.v_out)
    html = subnetwork.write_page(data, 0, cosine, None, None, Assets(out))
    (out / "subnetworks" / "0.html").write_text(html)
    page = Page(browser, (out / "subnetworks" / "0.html").resolve().as_uri())
    assert page.eval("typeof window.__pwned") == "undefined"
    assert page.eval("document.scripts.length") == 0
    windows = page.eval("Array.from(document.querySelectorAll('.ctx')).map(c => c.innerText)")
    assert "the cat·↵" in windows  # whitespace tokens visible, not blank
    assert "⟨99⟩the cat" in windows  # an id beyond the vocabulary; the padded position is left out
    assert "∅" + "".join(PAYLOADS) in windows  # an empty decoding; payloads as text
    # The top example is the last valid sample (largest impact), framed, darkest, with its value.
    here = page.eval(
        "const h = document.querySelector('ol.examples .ctx .here');"
        "[h.innerText, h.title, h.style.background]"
    )
    assert here[0] == " cat" and "impact 11" in here[1] and "255, 120, 0" in here[2]
    page.screenshot(tmp_path / "text.png")
    assert page.errors() == []


def synthetic_run(folder: Path, n_v: int, n_samples: int, n_features: int = 20) -> Path:
    """A finished, analysed run folder without training: a TMS-shaped decomposition with random
    factors, sparse vector data with labels, and an analysis (analysis.json, impact.safetensors)
    with random sparse impacts. For the index's size at 1,000 subnetworks and the benchmark."""
    folder.mkdir(parents=True, exist_ok=True)
    x, labels = sparse_vectors(n_samples, n_features, seed=0)
    save_file({"x": x, "labels": labels}, str(folder / "data.safetensors"))
    shapes = {"W_in": (5, n_features), "W_out": (n_features, 5), "b": (n_features,)}
    spec = {
        "model": {"python": "l3d.toys:TMS", "options": {"n_features": n_features, "n_hidden": 5}},
        "data": {
            "file": str(folder / "data.safetensors"),
            "options": {"key": "x"},
            "labels": "labels",
            "class_names": [f"class {i}" for i in range(n_features)],
        },
        "l3d": {"params": list(shapes), "n_subnetworks": n_v},
    }
    run = runs.create_run(runs.RunSpec.create(spec), folder / "run")
    config = L3DConfig.create(params=list(shapes), n_subnetworks=n_v)
    g = torch.Generator().manual_seed(0)
    pair = SubnetworkPair.initialize(shapes, n_v, {n: 1 for n in shapes}, "cp", g)
    p_active = torch.rand(n_v, generator=g) * 0.2
    p_active[: n_v // 10] = 0
    history = [
        {
            "epoch": e,
            "loss_paper": 0.5 / (1 + e),
            "loss_pooled_squared": 0.2 / (1 + e),
            "lr": 1e-3,
            "live_subnetworks": n_v - n_v // 10,
        }
        for e in range(20)
    ]
    evaluation = {"loss_paper": 0.03, "loss_pooled_squared": 0.01, "n_samples": n_samples}
    io.save_decomposition(run.decomposition, config, pair, p_active, evaluation, history)
    impact = torch.rand(n_samples, n_v, generator=g) ** 4
    impact *= torch.rand(n_samples, n_v, generator=g) < 0.05
    impact[:, : n_v // 10] = 0
    run.analysis.mkdir()
    positions = torch.stack([torch.arange(n_samples), torch.zeros(n_samples, dtype=torch.long)], 1)
    io.save_tensors(
        run.analysis / "impact.safetensors", {"impact": impact, "sample_positions": positions}
    )
    records = [
        {
            "index": k,
            "p_active": float(p_active[k]),
            "dead": bool(p_active[k] == 0),
            "top_logits": {
                "positive": [{"label": f"class {i}", "index": i, "value": 0.1} for i in range(5)],
                "negative": [],
            },
            "intervention": {
                "delta": 0.02,
                "top_samples": {"minus": 1e-3, "plus": 1e-3},
                "random_samples": {"minus": 1e-4, "plus": 1e-4},
                "noise_floor": 1e-9,
                "below_noise": k % 7 == 0,
                "selectivity": None if k % 7 == 0 else 10.0,
            },
        }
        for k in range(n_v)
    ]
    summary = {
        "n_samples": n_samples,
        "n_subnetworks": n_v,
        "n_dead": sum(r["dead"] for r in records),
        "n_top": 10,
        "n_references": 10,
        "median_intervention_selectivity": 10.0,
        "derivative_label": "d output/dδ",
        "change_label": "mean squared output change",
    }
    io.write_json(run.analysis / "analysis.json", {"summary": summary, "subnetworks": records})
    return run.path


def test_the_index_of_1000_subnetworks_is_small_and_browsable(tmp_path, browser):
    run = synthetic_run(tmp_path / "big", n_v=1000, n_samples=2000)
    data = report_data.load(run)
    coactive = report_data.coactivation(data.impact)
    out = tmp_path / "report"
    html = index.write_index(data, coactive, None, Assets(out))
    (out / "index.html").write_text(html)
    size = len(html.encode())
    assert size < INDEX_BYTES_1000, size
    page = Page(browser, (out / "index.html").resolve().as_uri())
    assert page.eval("document.querySelectorAll('#subnetworks tbody tr').length") == 1000
    page.eval(
        "const s = document.getElementById('search'); s.value = '#999';"
        "s.dispatchEvent(new Event('input'));"
    )
    assert page.eval("document.getElementById('count').textContent") == "1 of 1000 shown"
    assert page.errors() == []


def test_the_browser_harness_sees_errors_and_script_runs(tmp_path, browser):
    """The checks above can fail: a page with a thrown error, a console.error and a missing image
    is reported, and an unescaped script does run."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><head><link rel='icon' href='data:,'></head><body>"
        "<img src='missing.png'><script>window.__pwned = 1; console.error('boom');"
        " throw new Error('bad');</script></body></html>"
    )
    page = Page(browser, bad.resolve().as_uri())
    assert page.eval("window.__pwned") == 1
    errors = json.dumps(page.errors())
    assert "boom" in errors and "bad" in errors and "missing.png" in errors, errors


def test_heatmap_colours_positive_red_negative_blue_zero_white():
    import io

    from PIL import Image

    png = heatmaps.heatmap_png(np.array([[2.0, -2.0, 0.0, 9.0]]), scale=2.0)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size == (4, 1)
    (r1, g1, b1), (r2, _, b2), white, clipped = (image.getpixel((i, 0)) for i in range(4))
    assert r1 > 90 and b1 < 40 and g1 < 10  # +scale: dark red
    assert b2 > 90 and r2 < 10  # -scale: dark blue
    assert min(white) > 240
    assert clipped == (r1, g1, b1)  # beyond the scale: clipped to the end of the colour map


def test_report_of_a_folder_that_is_not_a_run_says_what_to_pass(hostile_run, tmp_path, capsys):
    saved = hostile_run / "decomposition"
    assert main(["report", str(saved)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"'{saved}' is a saved decomposition, not a run folder: pass its run folder" in err
    assert not (saved / "report").exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    assert main(["report", str(plain)]) == 2
    assert f"'{plain}' is not a run folder: it has no config.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_language_model_run_end_to_end_in_the_browser(tmp_path, browser):
    """A tiny causal LM and a byte-level BPE tokenizer, trained offline on a text file one of
    whose lines is a `<script>`: decompose, analyze, intervene, report; the page shows the line as
    text."""
    pytest.importorskip("transformers")
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from l3d import hf

    lines = [
        "once upon a time there was a small cat",
        "<script>window.__pwned = 1; document.title = 'PWNED'</script> the big dog ran",
        "the cat sat and the dog ran to the tree",
        "there was a big tree & a <b>bold</b> bird",
    ] * 4
    text = tmp_path / "stories.txt"
    text.write_text("\n".join(lines))
    model_dir = tmp_path / "tiny-lm"
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(text)], vocab_size=300, min_frequency=1, special_tokens=["<eos>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>")
    tokenizer.save_pretrained(str(model_dir))
    config = hf.tinystories_8m_config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        attention_types=[[["global", "local"], 1]],
        window_size=4,
        max_position_embeddings=32,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    hf.random_causal_lm(config, model_dir, seed=0)
    spec = {
        "model": {"hf": str(model_dir)},
        "data": {"text": str(text), "options": {"seq_len": 12}},
        "l3d": {
            "params": ["transformer.h.1.attn.attention.*_proj.weight"],
            "n_subnetworks": 4,
            "divergence": "kl",
            "per_token": True,
            "epochs": 2,
            "batch_size": 4,
        },
        "run": {"progress": False},
    }
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "run"
    assert main(["decompose", str(tmp_path / "lm.yaml"), "--out", str(run_dir), "-q"]) == 0
    assert main(["analyze", str(run_dir), "--n-top", "40", "--n-references", "2", "-q"]) == 0
    assert main(["intervene", str(run_dir), "--subnetwork", "0", "--delta", "1", "-q"]) == 0
    assert main(["report", str(run_dir), "-q"]) == 0
    page = Page(browser, (run_dir / "report" / "index.html").resolve().as_uri())
    assert page.eval("document.querySelectorAll('#subnetworks tbody tr').length") == 4
    assert page.eval("document.querySelector('th:nth-child(6)').innerText") == "top tokens"
    assert page.errors() == []
    windows = ""
    for k in range(4):
        page = Page(browser, (run_dir / "report" / "subnetworks" / f"{k}.html").as_uri())
        assert page.eval("typeof window.__pwned") == "undefined"
        assert page.eval("document.querySelectorAll('b, script').length") == 0
        # Every example is a whole window with its sample token framed.
        n_windows = page.eval("document.querySelectorAll('.ctx').length")
        assert n_windows > 0 and page.eval("document.querySelectorAll('.ctx .here').length") == (
            n_windows
        )
        windows += page.eval("document.body.innerText")
        assert page.errors() == []
    assert "<script>window" in windows and "a·<b" in windows  # the hostile lines, as text
    # Greedy continuations at -δ, W0, +δ for every live subnetwork (the analysis wrote them).
    analysis = json.loads((run_dir / "analysis" / "analysis.json").read_text())
    live = [r for r in analysis["subnetworks"] if not r["dead"]]
    assert live and all(r["generations"] for r in live)
    assert windows.count("Greedy continuations") == len(live)
    page.screenshot(tmp_path / "text.png")


def test_image_classifier_run_with_labels_shows_its_images(tmp_path, browser):
    """Digits from a safetensors file with a labels tensor and class names: `l3d analyze` gets
    them, the report draws the examples' images beside the pages, and they load in the
    browser with their labels."""
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images[:60], dtype=torch.float32)[:, None] / 16
    save_file(
        {"images": images, "labels": torch.tensor(digits.target[:60])},
        str(tmp_path / "digits.safetensors"),
    )
    (tmp_path / "cnn.py").write_text(
        "import torch\n"
        "def cnn():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(),\n"
        "                               torch.nn.Flatten(), torch.nn.Linear(108, 10))\n"
    )
    spec = {
        "model": {"python": "cnn.py:cnn"},
        "data": {
            "file": "digits.safetensors",
            "options": {"key": "images"},
            "labels": "labels",
            "class_names": [f"digit <{i}>" for i in range(10)],
        },
        "l3d": {
            "params": ["0.weight", "3.weight"],
            "n_subnetworks": 3,
            "divergence": "kl",
            "epochs": 2,
            "batch_size": 20,
        },
        "run": {"progress": False},
    }
    (tmp_path / "digits.yaml").write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "run"
    assert main(["decompose", str(tmp_path / "digits.yaml"), "--out", str(run_dir), "-q"]) == 0
    assert main(["analyze", str(run_dir), "--n-top", "4", "--n-references", "2", "-q"]) == 0
    analysis = json.loads((run_dir / "analysis" / "analysis.json").read_text())
    assert "purity" in analysis["summary"]
    first = analysis["subnetworks"][0]["top_samples"][0]
    assert first["label"] == f"digit <{digits.target[first['sample']]}>"
    assert main(["report", str(run_dir), "-q"]) == 0
    assert len(list((run_dir / "report" / "img").glob("input_*.png"))) >= 4

    page = Page(browser, (run_dir / "report" / "subnetworks" / "0.html").as_uri())
    page.load_images()
    assert page.eval("document.querySelectorAll('ol.examples img.sample').length") >= 4
    assert "digit <" in page.eval("document.querySelector('ol.examples').innerText")
    assert page.errors() == []
