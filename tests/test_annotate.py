"""`prefpipe annotate` as people use it: a real server (`prefpipe annotate` in a subprocess) driven by a real
headless Chromium (playwright on Debian's chromium), killed and restarted; its output trained on by
`prefpipe train --source human`. A screenshot of the page is saved as test-artifacts/annotate.png."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw
from playwright.sync_api import expect

from prefpipe.cli import main
from prefpipe.core.errors import PrefpipeError
from prefpipe.core.prompts import prompt_id
from prefpipe.core.schema import CANDIDATES, PAIRS, conform
from prefpipe.core.tables import iter_batches
from prefpipe.stages.annotate.journal import Journal
from prefpipe.stages.annotate.session import user_id_of
from tests.conftest import ARTIFACTS, run_cli

# The first prompt is markup: the page must show it as text.
NASTY = 'a <b>bold</b> box <script>window.pwned = 1</script> & "quotes" <img src=x onerror="window.pwned=2">'
# (prompt, candidates, the box's colour): 1 + 3 + 1 + 1 = 6 pairs
PROMPTS = [(NASTY, 2, "purple"), ("a red box", 3, "red"), ("a green box", 2, "green"), ("a blue box", 2, "blue")]
COLOURS = ["red", "green", "blue", "orange", "purple"]


def _png(colour: str, background: str, size: int = 32) -> bytes:
    im = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(im).rectangle([4, 4, size // 2, size - 8], fill=colour)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def candidates(tmp_path_factory) -> Path:
    """A candidates dataset as `prefpipe generate` writes it (the CANDIDATES schema), of drawn images."""
    rows: dict[str, list] = {k: [] for k in ("prompt_id", "prompt", "candidate", "seed", "image", "width", "height",
                                             "model", "scheduler", "steps", "guidance")}
    for p, (text, n, colour) in enumerate(PROMPTS):
        for c in range(n):
            values = [prompt_id(text), text, c, 100 * p + c, _png(colour, ["white", "black", "gray"][c]), 32, 32,
                      "tiny", "ddim", 2, 1.0]
            for key, value in zip(rows, values):
                rows[key].append(value)
    folder = tmp_path_factory.mktemp("candidates") / "candidates"
    folder.mkdir()
    pq.write_table(conform(pa.table(rows), CANDIDATES), folder / "train-00000-of-00001.parquet")
    return folder


@pytest.fixture(scope="module")
def ai_pairs(tmp_path_factory) -> Path:
    """AI pairs as `prefpipe label` writes them (source ai, a scorer's scores of both images)."""
    n = 4
    scores = [(0.9, 0.1), (0.2, 0.7), (0.6, 0.3), (0.5, 0.5)]
    rows = {
        "caption": [f"a {COLOURS[i]} box" for i in range(n)],
        "jpg_0": [_png(COLOURS[i], "white") for i in range(n)],
        "jpg_1": [_png(COLOURS[i], "black") for i in range(n)],
        "label_0": [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in scores],
        "image_0_uid": [f"p{i}-0" for i in range(n)],
        "image_1_uid": [f"p{i}-1" for i in range(n)],
        "prompt_id": [f"p{i}" for i in range(n)],
        "source": ["ai"] * n,
        "scorer": ["compressibility"] * n,
        "score_0": [a for a, _ in scores],
        "score_1": [b for _, b in scores],
    }
    folder = tmp_path_factory.mktemp("ai") / "pairs" / "ai"
    folder.mkdir(parents=True)
    pq.write_table(conform(pa.table(rows), PAIRS), folder / "train-00000-of-00001.parquet")
    return folder


class Server:
    """`prefpipe annotate ARGS --port PORT` in a subprocess (0: any free port); its URL read from what it prints."""

    def __init__(self, log: Path, *args, port: int = 0):
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "prefpipe", "annotate", *map(str, args), "--port", str(port)],
                                         stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 90
        while True:
            found = re.search(r"serving (http://127\.0\.0\.1:\d+)/", log.read_text())
            if found:
                self.url = found.group(1)
                self.host, self.port = "127.0.0.1", int(self.url.rsplit(":", 1)[1])
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"prefpipe annotate did not start:\n{log.read_text()}")
            time.sleep(0.1)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        """Exactly this request line (no client-side normalisation of `..` or escapes)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers={"Content-Type": "application/json"} if body is not None else {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def stats(self) -> dict:
        status, body = self.request("GET", "/api/stats")
        assert status == 200, body
        return json.loads(body)

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no chance to write anything more
        self.proc.wait(30)

    def stop(self, how: signal.Signals = signal.SIGINT) -> str:
        """Ctrl-C (or SIGTERM, as a service manager stops it): the server stops and writes WORKDIR/pairs/human."""
        self.proc.send_signal(how)
        assert self.proc.wait(120) == 0, self.log.read_text()
        return self.log.read_text()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield b
        b.close()


def open_page(context, url: str, name: str | None):
    """The labelling page; with `name`, the annotator types it and starts (without, a saved name starts)."""
    page = context.new_page()
    page.dialogs = []
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.goto(url + "/")
    if name is not None:
        page.fill("#name", name)
        page.press("#name", "Enter")
    expect(page.locator("body")).to_have_attribute("data-state", re.compile("judging|done"))
    return page


def shown(page) -> tuple[str, int]:
    """(pair id, which image is on the left) of the pair the page shows."""
    pair = page.get_attribute("#pair", "data-pair-id")
    left = page.get_attribute("#left", "src")
    assert left.startswith(f"/image/{pair}/"), left
    return pair, int(left[-1])


def press(page, key: str, judged: int, skipped: int | None = None) -> None:
    """Press `key` and wait until the page shows the server's answer (progress `judged`, `skipped`).

    Waits use playwright's `expect` on attributes: the page's Content-Security-Policy forbids evaluating strings,
    which `wait_for_function` does when it has to poll."""
    page.keyboard.press(key)
    progress = page.locator("#progress")
    expect(progress).to_have_attribute("data-judged", str(judged))
    if skipped is not None:
        expect(progress).to_have_attribute("data-skipped", str(skipped))
    expect(page.locator("body")).not_to_have_attribute("data-busy", "1")


def label_for(key: str, left: int) -> float:
    return 0.5 if key == "ArrowDown" else float((key == "ArrowLeft") == (left == 0))


def cli(*args):
    """`prefpipe ARGS` in this process (the server tests run `prefpipe annotate` as a subprocess)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def journal_events(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "annotate" / "judgments.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_keyboard_judgments_survive_a_kill_and_train_with_prefpipe_train(browser, candidates, tiny_sd15, tmp_path):
    workdir = tmp_path / "work"
    expected: dict[str, float] = {}  # pair -> label_0 the keys meant
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    with Server(tmp_path / "first.log", "--candidates", candidates, "--out", workdir) as server:
        page = open_page(context, server.url, "ada")
        assert page.inner_text("#progress").startswith("ada: 0 of 6 judged")
        q0, left = shown(page)
        # the caption is text: no element made of it, no script run, no image fetched from it
        assert page.inner_text("#caption") == NASTY
        assert page.eval_on_selector("#caption", "e => e.children.length") == 0
        assert page.evaluate("window.pwned") is None and not page.dialogs

        for n, key in enumerate(["ArrowLeft", "ArrowRight", "ArrowDown"], 1):
            pair, left = shown(page)
            expected[pair] = label_for(key, left)
            press(page, key, judged=n)
            assert shown(page)[0] != pair
        q2 = pair
        press(page, "u", judged=2)  # undo the tie: that pair again
        assert shown(page)[0] == q2
        expected[q2] = label_for("ArrowLeft", shown(page)[1])
        press(page, "ArrowLeft", judged=3)
        q3 = shown(page)[0]
        press(page, "Space", judged=3, skipped=1)
        q4 = shown(page)[0]
        assert len({q0, *expected, q3, q4}) == 5

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=ARTIFACTS / "annotate.png")
        # every event is on disk before the next pair is shown: kill without warning
        events = journal_events(workdir)
        assert [e["event"] for e in events] == ["judge", "judge", "judge", "undo", "judge", "skip"]
        assert {e["pair"]: e["label_0"] for e in events if e["event"] == "judge"} == expected
        server.kill()
    assert not (workdir / "pairs" / "human").exists()
    judged_before = set(expected)

    # the same command again (the same port: the page's saved name belongs to its origin)
    with Server(tmp_path / "second.log", "--candidates", candidates, "--out", workdir, port=server.port) as server:
        assert "3 judgments by 1 annotators so far" in server.log.read_text()
        page.reload()  # the saved name starts the same queue
        expect(page.locator("body")).to_have_attribute("data-state", "judging")
        assert page.get_attribute("#progress", "data-judged") == "3"
        assert page.get_attribute("#progress", "data-skipped") == "1"
        seen = []
        for n, key in enumerate(["ArrowDown", "ArrowLeft", "ArrowRight"], 4):
            pair, left = shown(page)
            seen.append(pair)
            expected[pair] = label_for(key, left)
            press(page, key, judged=n)
        assert seen[0] == q4 and seen[-1] == q3  # resumed where it stopped; the skipped pair came back last
        assert not set(seen) & judged_before  # nothing judged before the kill was shown again
        assert page.get_attribute("body", "data-state") == "done"
        log = server.stop()
    context.close()
    assert "6 judgments (1 ties) by 1 annotators" in log

    rows = [r for b in iter_batches(workdir / "pairs" / "human") for r in b.to_pylist()]
    assert len(rows) == 6 and len(expected) == 6
    by_uid = {(r["image_0_uid"], r["image_1_uid"]): r for r in rows}
    assert {r["source"] for r in rows} == {"human"} and {r["user_id"] for r in rows} == {user_id_of("ada")}
    assert all(r["created_at"] is not None and r["label_1"] == 1 - r["label_0"] for r in rows)
    assert sorted(r["label_0"] for r in rows) == sorted(expected.values())
    images = {(r["prompt_id"], r["candidate"]): r["image"] for b in iter_batches(candidates) for r in b.to_pylist()}
    for (uid0, uid1), r in by_uid.items():
        pid, c0 = uid0.rsplit("-", 1)
        assert r["jpg_0"] == images[(pid, int(c0))] and r["jpg_1"] == images[(pid, int(uid1.rsplit("-", 1)[1]))]

    proc = run_cli("train", "--source", "human", "--workdir", workdir, "--model", tiny_sd15, "--out", tmp_path / "run",
                   "--resolution", "32", "--batch-size", "1", "--max-steps", "1", "--checkpoint-every", "0",
                   "--no-progress", env={"OMP_NUM_THREADS": "1"})
    assert re.search(r"on 5 pairs \(6 rows read; dropped: 1 ties", proc.stderr), proc.stderr[-3000:]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) >= 1


@pytest.mark.slow
def test_two_annotators_get_their_own_queues_and_their_agreement_is_computed(browser, ai_pairs, tmp_path):
    workdir = tmp_path / "work"
    bob = "bob <i>the builder</i>"  # names are text too
    wanted = {"ada": [1.0, 0.0, 1.0], bob: [1.0, 1.0, 1.0]}  # label_0 of the first three pairs: they agree on 2
    with Server(tmp_path / "server.log", "--pairs", ai_pairs, "--out", workdir) as server:
        contexts = {name: browser.new_context() for name in wanted}  # two browsers, as two people have
        first = None
        for name, context in contexts.items():
            page = open_page(context, server.url, name)  # bob starts after ada has judged three pairs
            first = first or shown(page)[0]
            assert shown(page)[0] == first  # everyone starts at the same pair, in a queue of their own
            for n, label in enumerate(wanted[name], 1):
                left = shown(page)[1]
                press(page, "ArrowDown" if label == 0.5 else "ArrowLeft" if (label == 1.0) == (left == 0) else "ArrowRight",
                      judged=n)
            assert page.inner_text("#progress").startswith(f"{name}: 3 of 4 judged")
        stats = server.stats()
        ia = stats["inter_annotator"]
        assert (ia["pairs_judged_by_several"], ia["comparisons"], ia["agree"]) == (3, 3, 2)
        assert ia["by_annotators"][0]["a"] == "ada" and ia["by_annotators"][0]["b"] == bob
        assert {a["name"]: (a["judged"], a["remaining"]) for a in stats["annotators"]} == {"ada": (3, 1), bob: (3, 1)}
        # the scorer preferred image 0, 1, 0 on those pairs: ada agrees 3 of 3, bob 2 of 3
        scorer = stats["scorer"]["compressibility"]
        assert scorer["by_annotator"]["ada"]["accuracy_non_tie"] == 1.0
        assert scorer["by_annotator"][bob]["accuracy_non_tie"] == pytest.approx(2 / 3)
        assert scorer["all"]["non_tie_pairs"] == 6

        stats_page = contexts["ada"].new_page()
        stats_page.goto(server.url + "/stats")
        assert bob in stats_page.inner_text("#annotators")
        assert stats_page.locator("#annotators i").count() == 0
        assert "agree on 2 of 3 comparisons: 66.7%" in stats_page.inner_text("#inter-annotator")
        assert "compressibility" in stats_page.inner_text("#scorer")
        server.stop(signal.SIGTERM)
    for context in contexts.values():
        context.close()
    rows = [r for b in iter_batches(workdir / "pairs" / "human") for r in b.to_pylist()]
    assert sorted((r["user_id"], r["label_0"]) for r in rows) == sorted(
        (user_id_of(name), v) for name, labels in wanted.items() for v in labels)
    saved = json.loads((workdir / "annotate" / "stats.json").read_text())
    assert saved["inter_annotator"]["agree"] == 2


def test_crafted_requests_get_4xx_and_read_nothing(candidates, tmp_path):
    workdir = tmp_path / "work"
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    with Server(tmp_path / "server.log", "--candidates", candidates, "--out", workdir) as server:
        status, body = server.request("GET", "/api/next?user=eve")
        pair = json.loads(body)["pair"]["id"]
        reads = server.stats()["image_reads"]
        crafted = [
            ("GET", f"/image/{secret}/0"),
            ("GET", "/image/../../../../etc/passwd"),
            ("GET", "/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd/0"),
            ("GET", f"/image/..%2F..%2F{secret.name}/0"),
            ("GET", "/image/0123456789abcdef/0"),  # well formed, unknown
            ("GET", f"/image/{pair}/2"),
            ("GET", f"/image/{pair}/0/../../../{secret.name}"),
            ("GET", f"/image/{pair.upper()}/0"),
            ("GET", "/static/../__init__.py"),
            ("GET", "/static/..%2f__init__.py"),
            ("GET", "/static/%2e%2e/items.py"),
            ("GET", "/api/next?user=%00eve"),
        ]
        for method, path in crafted:
            status, body = server.request(method, path)
            assert 400 <= status < 500, (path, status, body[:200])
            assert b"TOP-SECRET" not in body and b"import" not in body, path
        before = len(journal_events(workdir)) if (workdir / "annotate" / "judgments.jsonl").exists() else 0
        for body in ({"user": "eve", "pair": "0123456789abcdef", "choice": "left"},
                     {"user": "eve", "pair": str(secret), "choice": "left"},
                     {"user": "eve", "pair": pair, "choice": "delete"},
                     {"user": "x" * 65, "pair": pair, "choice": "left"},
                     {"user": "e\x07ve", "pair": pair, "choice": "left"}):
            status, answer = server.request("POST", "/api/judge", body)
            assert 400 <= status < 500, (body, status, answer[:200])
        assert server.stats()["image_reads"] == reads  # no request above read an image
        after = len(journal_events(workdir)) if (workdir / "annotate" / "judgments.jsonl").exists() else 0
        assert after == before == 0  # nor wrote a judgment
        status, body = server.request("GET", f"/image/{pair}/0")
        assert status == 200 and body.startswith(b"\x89PNG")
        assert server.stats()["image_reads"] == reads + 1  # the counter does count reads

        # one server per work folder
        result = cli("annotate", "--candidates", candidates, "--out", workdir, "--finish")
        assert result.exit_code == 1 and "another `prefpipe annotate` is using this folder" in result.output
        # and its port is taken
        result = cli("annotate", "--candidates", candidates, "--out", tmp_path / "other", "--port", server.port)
        assert result.exit_code == 1 and f"--port {server.port}: cannot listen there" in result.output


def test_export_d3po_writes_the_labels_the_d3po_trainer_reads(candidates, tmp_path):
    from prefpipe.stages.annotate import AnnotateOptions, load_input, open_session
    from prefpipe.stages.annotate.session import left_image
    from trainer.data.preferences import preferences_from_labels, read_d3po_labels
    from trainer.data.trajectories import candidate_prompts

    workdir = tmp_path / "work"
    opts = AnnotateOptions("candidates", str(candidates))
    session = open_session(opts, load_input(opts), workdir)
    # ada: on the 3-candidate prompt, 0 > 1, 0 > 2, 1 > 2 (consistent); a tie on one 2-candidate prompt
    red = prompt_id("a red box")
    verdicts = {}
    for item in session.items:
        cands = [int(u.rsplit("-", 1)[1]) for u in (item.image_0_uid, item.image_1_uid)]
        if item.prompt_id == red:
            verdicts[item.pair_id] = 1.0 if cands[0] < cands[1] else 0.0
        elif item.caption == "a green box":
            verdicts[item.pair_id] = 0.5
    for pair, label in verdicts.items():
        left = left_image("ada", pair)
        choice = "tie" if label == 0.5 else "left" if (label == 1.0) == (left == 0) else "right"
        session.judge("ada", pair, choice)
    session.journal.close()

    result = cli("annotate", "--candidates", candidates, "--out", workdir, "--export", "d3po")
    assert result.exit_code == 0 and "D3PO labels of 1 annotators" in result.output, result.output
    files = sorted((workdir / "d3po-labels").glob("*.json"))
    assert [f.name for f in files] == [f"annotator-{user_id_of('ada')}.json"]
    scores, _ = read_d3po_labels([workdir / "d3po-labels"])
    prompts = candidate_prompts(candidates)
    assert len(scores) == len(PROMPTS)
    counts: dict[str, int] = {}
    prefs = preferences_from_labels(scores, prompts, counts)
    assert sorted((p.prompt_id, p.winner, p.loser) for p in prefs) == [(red, 0, 1), (red, 0, 2), (red, 1, 2)]
    assert counts["ties_dropped"] == 3  # the green tie, and the two prompts nobody judged
    assert (workdir / "pairs" / "human").is_dir()  # --export writes the pairs too


def test_a_crash_mid_write_loses_only_that_line_and_damage_elsewhere_stops(tmp_path):
    path = tmp_path / "judgments.jsonl"
    journal = Journal(path)
    journal.append("ada", "judge", "0123456789abcdef", label_0=1.0, left=0)
    journal.close()
    with open(path, "ab") as f:
        f.write(b'{"seq": 1, "at": "2025-01-01T00:00:00+00:00", "user": "ada", "ev')  # cut by a crash
    again = Journal(path)
    assert [e["seq"] for e in again.read()] == [0]
    again.append("ada", "skip", "fedcba9876543210")
    assert [json.loads(line)["seq"] for line in path.read_text().splitlines()] == [0, 1]
    again.close()

    path.write_text(path.read_text().replace('"event": "judge"', '"event": "delete"'))
    with pytest.raises(PrefpipeError, match="line 1 is not an event"):
        Journal(path).read()


def test_bad_options_stop_with_a_message_naming_them(candidates, ai_pairs, tmp_path):
    ingested = tmp_path / "ingested" / "pairs" / "human"  # Pick-a-Pic's pairs: not annotate's to replace
    ingested.mkdir(parents=True)
    (ingested / "_prefpipe.json").write_text(json.dumps({"stage": "ingest pickapic"}))
    cases = [
        (["--candidates", candidates, "--out", tmp_path / "ingested"], "holds another dataset (from ingest pickapic)"),
        (["--out", tmp_path / "w"], "give either --candidates DIR"),
        (["--candidates", tmp_path / "nowhere", "--out", tmp_path / "w"], "--candidates"),
        (["--pairs", ai_pairs, "--out", tmp_path / "w", "--export", "d3po"], "--export d3po"),
        (["--pairs", ai_pairs, "--out", tmp_path / "w2", "--strategy", "random-k"], "--strategy and --k"),
        (["--candidates", candidates, "--out", tmp_path / "w3", "--finish"], "no judgments"),
        (["--candidates", candidates, "--out", tmp_path / "w3", "--strategy", "random-k", "--finish"],
         "strategy: folder has 'all', this run asks 'random-k'"),
        (["--candidates", candidates, "--out", tmp_path / "w4", "--host", "no-such-host.invalid"], "--host"),
    ]
    for args, message in cases:
        result = cli("annotate", *args)
        assert result.exit_code == 1 and message in result.output, (args, result.output[-1500:])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
