"""`l3d report`: the page opened in headless Chromium loads without console errors, has one entry
per subnetwork, sorts by P_act, and shows a `<script>` from the data as text without running it."""

from __future__ import annotations

import base64
import contextlib
import json
import os
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

from l3d import runs
from l3d.cli import main
from l3d.report import heatmaps

TINY = {
    "model": {"python": "l3d.toys:TMS", "options": {"n_features": 5, "n_hidden": 2}},
    "data": {"toy": "tms", "options": {"n_samples": 120, "seed": 1}},
    "l3d": {
        "params": ["W_in", "W_out", "b"],
        "n_subnetworks": 6,
        "epochs": 3,
        "batch_size": 40,
    },
    "run": {"progress": False},
}
PAYLOADS = [
    "<script>window.__pwned = 1; document.title = 'PWNED'</script>",
    '"><img src=x onerror="window.__pwned = 2">',
    "</table><svg onload=\"window.__pwned = 3\"></svg> & 'quotes'",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy machine their spin-waits cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> Path:
    """A finished toy run, analysed by `l3d analyze` and intervened on, whose analysis then gets
    dataset text, tokens, labels and logit names carrying HTML/JS payloads, and an image sample."""
    folder = tmp_path_factory.mktemp("report")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run_dir = folder / "run"
    assert main(["decompose", str(config), "--out", str(run_dir), "-q"]) == 0
    assert main(["analyze", str(run_dir), "--n-top", "3", "--n-references", "2", "-q"]) == 0
    assert main(["intervene", str(run_dir), "--subnetwork", "0", "2", "--delta", "1", "-q"]) == 0
    path = run_dir / "analysis" / "analysis.json"
    analysis = json.loads(path.read_text())
    (run_dir / "analysis" / "images").mkdir()
    (run_dir / "analysis" / "images" / "digit.png").write_bytes(
        heatmaps.heatmap_png(np.eye(8), 1.0)
    )
    for i, entry in enumerate(analysis["subnetworks"]):
        payload = PAYLOADS[i % len(PAYLOADS)]
        for sample in entry["top_samples"]:
            sample.update(text=f"a line of the dataset {payload} ", token=payload, label=payload)
        for sign, value in (("positive", 1.0), ("negative", -1.0)):
            entry["top_logits"][sign].insert(0, {"label": payload, "index": 0, "value": value})
    grid = analysis["subnetworks"][0]
    grid["top_samples"][0]["image"] = "images/digit.png"
    grid["top_samples"][1]["image"] = "../../../../etc/passwd"  # must not be copied
    analysis["summary"][PAYLOADS[0]] = PAYLOADS[1]
    path.write_text(json.dumps(analysis))
    assert main(["report", str(run_dir), "-q"]) == 0
    return run_dir


def test_payloads_are_escaped_in_the_html(hostile_run):
    page = (hostile_run / "report" / "index.html").read_text()
    assert page.count("<script") == 1  # the page's own script only
    assert "onerror=" not in page.replace("onerror=&quot;", "")
    assert "<svg" not in page and "<img src=x" not in page
    assert html_escaped(PAYLOADS[0]) in page
    assert "etc/passwd" not in "".join(str(p) for p in (hostile_run / "report").rglob("*"))
    assert (hostile_run / "report" / "assets" / "images" / "digit.png").is_file()


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
    spec = runs.RunSpec.create(TINY)
    runs.create_run(spec, tmp_path / "run")
    assert main(["report", str(tmp_path / "run")]) == 2
    assert "has no finished decomposition" in capsys.readouterr().err


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

    def screenshot(self, path: Path) -> None:
        shot = self.browser.send(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True},
            session=self.session,
        )
        path.write_bytes(base64.b64decode(shot["data"]))


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


def test_report_in_headless_chromium(hostile_run, browser, tmp_path):
    page = Page(browser, (hostile_run / "report" / "index.html").resolve().as_uri())
    n_v = TINY["l3d"]["n_subnetworks"]
    assert page.eval("document.querySelectorAll('section.subnetwork').length") == n_v
    assert page.eval("document.querySelectorAll('#nav-list li').length") == n_v
    # Lazy images are forced to load so that a broken one would show up as an error.
    widths = page.eval(
        "Promise.all(Array.from(document.images).map(i => { i.loading = 'eager';"
        " return i.decode().then(() => i.naturalWidth, () => -1); }))"
    )
    assert len(widths) > 3 * n_v and min(widths) > 0, widths

    # The payloads are on the page as text, and none of them ran.
    assert page.eval("typeof window.__pwned") == "undefined"
    assert page.eval("document.title").startswith("L3D report")
    assert page.eval("document.scripts.length") == 1
    assert page.eval("document.querySelectorAll('svg, img[src=\"x\"]').length") == 0
    text = page.eval("document.body.innerText")
    for payload in PAYLOADS:
        assert payload in text

    # Sorted by P_act (high first) on load; the selector re-sorts both nav and sections.
    p_active = page.eval(
        "Array.from(document.querySelectorAll('section.subnetwork')).map(s => +s.dataset.pActive)"
    )
    assert p_active == sorted(p_active, reverse=True)
    order = page.eval(
        "const s = document.getElementById('sort'); s.value = 'index:asc';"
        "s.dispatchEvent(new Event('change'));"
        "Array.from(document.querySelectorAll('#nav-list li')).map(l => +l.dataset.index)"
    )
    assert order == list(range(n_v))

    shot = tmp_path / "report.png"
    page.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    assert page.errors() == []


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
    analysis = json.loads((run_dir / "analysis" / "analysis.json").read_text())
    shown = " ".join(
        s["text"] + s["token"] for e in analysis["subnetworks"] for s in e["top_samples"]
    )
    assert "<script>" in shown  # the hostile line is among the samples the page shows

    page = Page(browser, (run_dir / "report" / "index.html").resolve().as_uri())
    assert page.eval("document.querySelectorAll('section.subnetwork').length") == 4
    assert page.eval("typeof window.__pwned") == "undefined"
    assert page.eval("document.querySelectorAll('b').length") == 0
    assert page.eval("document.scripts.length") == 1
    assert "<script>window" in page.eval("document.body.innerText")
    assert page.errors() == []


def test_image_classifier_run_with_labels_shows_image_grids(tmp_path, browser):
    """Digits from a safetensors file with a labels tensor and class names: `l3d analyze` gets
    them, the report copies the sample images beside the page, and they load in the browser."""
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
    assert len(list((run_dir / "report" / "assets" / "images").glob("*.png"))) >= 4

    page = Page(browser, (run_dir / "report" / "index.html").resolve().as_uri())
    widths = page.eval(
        "Promise.all(Array.from(document.querySelectorAll('.grid img')).map(i => {"
        " i.loading = 'eager'; return i.decode().then(() => i.naturalWidth, () => -1); }))"
    )
    assert len(widths) == 3 * 4 and min(widths) > 0
    assert "digit <" in page.eval("document.querySelector('.grid').innerText")
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
