"""report.html and the pairs gallery open from disk in headless Chromium, offline: every image loads,
and the sort buttons reorder the gallery. Screenshots are saved under test-artifacts/."""

import re
import subprocess
import tempfile
from pathlib import Path

import pytest

import prefpipe.stages.eval as ev
from prefpipe.stages.eval.show import write_gallery
from tests.conftest import ARTIFACTS  # and the `chromium` fixture
from tests.test_eval import PROMPTS, make_lora_run, write_pairs
from tests.test_show import pair_rows

# No network here: nothing Chromium would fetch on its own (updates, sync, QUIC probes).
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--virtual-time-budget=10000",
]

# Injected into a copy of the page: after window.onload, record what the browser did.
PROBE = """
<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const out = document.createElement('div');
  out.id = 'probe';
  let order = '';
  const button = document.querySelector('button.sort');
  if (button) {
    button.click();  // first click: that gain, largest first
    order = [...document.querySelectorAll('#gallery > .card')].map(c => c.dataset.g0).join(',');
  }
  out.textContent = `loaded=${ok} total=${imgs.length} order=${order}`;
  document.body.appendChild(out);
});
</script>
"""


def run_chromium(exe: str, page: Path, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        proc = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
                              capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise AssertionError(f"chromium failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def probe(exe: str, page: Path) -> dict:
    """Open a copy of `page` (same folder, so relative paths resolve) with the probe script; its findings."""
    copy = page.with_name(page.stem + ".probe.html")
    copy.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = run_chromium(exe, copy, "--dump-dom").stdout
    m = re.search(r'<div id="probe">loaded=(\d+) total=(\d+) order=([^<]*)</div>', dom)
    assert m, f"the probe did not run; page tail:\n{dom[-1500:]}"
    order = [float(x) for x in m.group(3).split(",") if x] if m.group(3) else []
    return {"loaded": int(m.group(1)), "total": int(m.group(2)), "order": order}


def screenshot(exe: str, page: Path, name: str, height: int = 2400) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / name
    shot.unlink(missing_ok=True)
    run_chromium(exe, page, f"--screenshot={shot}", f"--window-size=1280,{height}")
    assert shot.is_file() and shot.stat().st_size > 10_000, f"no screenshot at {shot}"
    return shot


@pytest.fixture(scope="module")
def report_page(tiny_sd15, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    run = make_lora_run(tiny_sd15, root / "lora-run")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    opts = ev.EvalOptions(base=str(tiny_sd15), tuned=[str(run)], prompts=str(prompts),
                          scorers=["compressibility", "incompressibility"], per_prompt=2, steps=2)
    ev.run_eval(opts, root / "eval", batch_size=2, progress=False)
    return root / "eval" / "report.html"


@pytest.mark.slow
def test_report_opens_from_disk_with_every_image_loaded_and_sorts_by_gain(chromium, report_page):
    found = probe(chromium, report_page)
    plots = 3  # two score distributions and the win rate (the run has metrics.jsonl: plus curves)
    assert found["total"] == 2 * len(PROMPTS) * 2 + plots + 1
    assert found["loaded"] == found["total"]
    assert len(found["order"]) == len(PROMPTS)
    assert found["order"] == sorted(found["order"], reverse=True)
    screenshot(chromium, report_page, "report.png", height=3200)


@pytest.mark.slow
def test_pairs_gallery_opens_from_disk_with_every_image_loaded(chromium, tmp_path):
    rows, ai = pair_rows()
    folder = write_pairs(tmp_path / "pairs", rows, extra={"ai_label_0": ai})
    page = tmp_path / "gallery.html"
    counters = write_gallery(folder, page, sample=8, seed=2)
    found = probe(chromium, page)
    assert found["total"] == 2 * counters["sampled"] - counters["bad_rows"]
    assert found["loaded"] == found["total"] > 0
    screenshot(chromium, page, "pairs-gallery.png")
