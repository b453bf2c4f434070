"""`sphere viz tree`: snapshot files, the HTML page (escaping, data), and the page in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sphere.engine import PRUNED_EXPAND, EngineConfig, make_forest
from sphere.viz import main as viz_main
from sphere.viz.snapshot import load_tree_snapshot, save_tree_snapshot, trajectory_nodes
from sphere.viz.tree import embed_json, render_tree_html, tree_payload

HOSTILE = [
    "</script><script>document.body.setAttribute('data-pwned','1')</script>",
    "<img src=x onerror=\"document.body.setAttribute('data-pwned','2')\">",
    "a & b < c > d \u2028 line sep \u2029 para sep </SCRIPT >",
    "<!-- comment --> ]]> {{x}} ${y} __DATA__ __TITLE__",
]


def build_snapshot(path: Path, *, expansions: int = 5, rounds: int = 14, seed: int = 0,
                   hostile: bool = True) -> tuple[dict, dict]:
    """A real engine tree (paper-style minmax pruning), saved like `sphere generate` saves its trees."""
    rng = np.random.default_rng(seed)
    f = make_forest(EngineConfig(pruning="minmax", max_depth=5), backend="py")
    roots = f.add_roots(np.array([0]))
    steps = [""]
    for _ in range(rounds):
        _, leaves, _ = f.select(roots, k=1)
        if len(leaves) == 0:
            break
        c = len(leaves) * expansions
        for _ in range(c):
            j = len(steps)
            if hostile and j % 7 == 3:
                steps.append(HOSTILE[(j // 7) % len(HOSTILE)])
            else:
                steps.append(f"Step {j}: we have {j} * 2 = {2 * j}, so x = {j % 5}.")
        rewards = rng.random(c).astype(np.float32)
        f.expand(leaves, np.full(len(leaves), expansions, np.int32), np.full(c, 1 / expansions, np.float32),
                 np.arange(len(steps) - c, len(steps)), rewards, np.full(c, np.nan, np.float32),
                 rng.random(c) < 0.15)
        f.backup(leaves, rng.random(len(leaves)).astype(np.float32))
    root = int(roots[0])
    snap = f.tree_snapshot(root)
    texts = [steps[int(p)] for p in snap["payload"]]
    best = f.best_path(root, by="value")
    worst = f.worst_path(root)
    remap = {int(n): i for i, n in enumerate(snap["node_id"].tolist())}

    def traj(path, correct):
        return {"steps": [steps[int(p)] for p in f.payload(path[1:])], "correct": correct,
                "value": float(f.value(path[-1:])[0]), "rewards": [], "scores": [], "finish": "answer"}

    meta = {"problem": "Compute 2 + 2. </script><b>bold?</b>", "answer": "4", "text": texts,
            "sol_max": traj(best, True), "sol_min": traj(worst, False)}
    arrays = {k: np.asarray(v) for k, v in snap.items()}
    save_tree_snapshot(path, arrays, meta)
    expect = {"n": len(texts), "sol_max": [remap[int(x)] for x in best],
              "sol_min": [remap[int(x)] for x in worst]}
    return expect, meta


@pytest.fixture
def snapshot(tmp_path: Path) -> tuple[Path, dict]:
    p = tmp_path / "trees" / "stage1-p0.npz"
    expect, _ = build_snapshot(p)
    return p, expect


def test_snapshot_roundtrip(snapshot):
    path, expect = snapshot
    arrays, meta = load_tree_snapshot(path)
    assert len(arrays["parent"]) == expect["n"] == len(meta["text"])
    assert arrays["flags"].dtype == np.uint8 and arrays["value"].dtype == np.float32
    assert any(t == HOSTILE[0] for t in meta["text"])
    assert expect["n"] > 30 and np.count_nonzero(arrays["flags"] & PRUNED_EXPAND) > 0


def test_snapshot_rejects_bad_files(tmp_path: Path, snapshot):
    path, _ = snapshot
    arrays, meta = load_tree_snapshot(path)

    def bad(name, arrs, mt, match):
        p = tmp_path / f"{name}.npz"
        save_tree_snapshot(p, arrs, mt)
        with pytest.raises(ValueError, match=match) as ei:
            load_tree_snapshot(p)
        assert str(p) in str(ei.value)

    a = dict(arrays)
    del a["visits"]
    bad("novisits", a, meta, "missing array 'visits'")
    a = dict(arrays, parent=arrays["parent"][::-1].copy())
    bad("order", a, meta, "parents before children")
    bad("text", arrays, dict(meta, text=meta["text"][:-1]), "meta 'text' must be a list")
    a = dict(arrays, reward=arrays["reward"][:-1])
    bad("len", a, meta, "array 'reward' has")
    # object arrays would need pickle: refused
    p = tmp_path / "pickle.npz"
    np.savez(p, meta_json=np.frombuffer(b"{}", np.uint8), parent=np.array([None, 1], dtype=object))
    with pytest.raises(ValueError, match="not a valid tree snapshot"):
        load_tree_snapshot(p)
    with pytest.raises(ValueError, match="reserved"):
        save_tree_snapshot(tmp_path / "x.npz", {"text": np.zeros(2)}, {})


def test_trajectory_nodes_follow_step_texts(snapshot):
    path, expect = snapshot
    arrays, meta = load_tree_snapshot(path)
    for key in ("sol_max", "sol_min"):
        got = trajectory_nodes(arrays["parent"], meta["text"], arrays["flags"], meta[key]["steps"], 12)
        assert got == expect[key]
    # a step that is not in the tree ends the path there
    steps = list(meta["sol_max"]["steps"])
    steps[1] = "no such step"
    got = trajectory_nodes(arrays["parent"], meta["text"], arrays["flags"], steps, 12)
    assert got == expect["sol_max"][:2]


def test_page_embeds_untrusted_text_safely(snapshot):
    path, expect = snapshot
    arrays, meta = load_tree_snapshot(path)
    page = render_tree_html(arrays, meta, title="t </title><script>x()</script>")
    # only the template's own script tags close: 3 <script> blocks in tree.html
    assert len(re.findall(r"</script", page, re.I)) == 3
    assert "<img" not in page and "data-pwned" in page  # the attribute name only appears escaped in JSON
    m = re.search(r'<script type="application/json" id="sphere-tree-data">(.*?)</script>', page, re.S)
    data = json.loads(m.group(1))
    assert data["text"] == meta["text"]  # escaping is lossless
    assert data["sol_max"]["nodes"] == expect["sol_max"] and data["sol_max"]["correct"] is True
    assert data["sol_min"]["nodes"] == expect["sol_min"]
    assert len(data["parent"]) == expect["n"]
    assert "<title>t &lt;/title&gt;" in page
    assert "http://" not in page and "https://" not in page  # nothing to fetch at view time
    for bad in ("\u2028", "\u2029", "<", ">", "&"):
        assert bad not in embed_json({"s": f"x{bad}y"})


def test_payload_handles_nan_and_explicit_paths(snapshot):
    path, _ = snapshot
    arrays, meta = load_tree_snapshot(path)
    arrays = dict(arrays, value=np.full_like(arrays["value"], np.nan))
    meta = dict(meta, sol_max_nodes=[0, 1], sol_min=None)
    d = tree_payload(arrays, meta, "t")
    assert d["value"][0] is None and d["sol_max"]["nodes"] == [0, 1] and d["sol_min"] is None
    json.dumps(d, allow_nan=False)


def test_cli(snapshot, tmp_path, capsys):
    path, _ = snapshot
    out = tmp_path / "page.html"
    assert viz_main([str(path), f"out={out}"]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert viz_main([str(path)]) == 0 and path.with_suffix(".html").is_file()
    assert viz_main([str(path), "colour=red"]) == 2
    assert "unknown option 'colour'" in capsys.readouterr().err
    assert viz_main([str(tmp_path / "missing.npz")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_dispatch(snapshot, tmp_path):
    from sphere import cli
    from sphere.cli import PLAIN_COMMANDS

    assert PLAIN_COMMANDS[("viz", "tree")] == "sphere.viz:main"
    path, _ = snapshot
    out = tmp_path / "via_cli.html"
    with pytest.raises(SystemExit) as ei:
        cli.main(["viz", "tree", str(path), f"out={out}"])
    assert ei.value.code == 0 and out.is_file()


# ------------------------------------------------------------------------------------- headless Chromium
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def _run_chromium(exe: str, page: Path, *args: str, fragment: str = "") -> subprocess.CompletedProcess:
    prof = page.parent / "chromium-profile"
    url = page.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    cmd = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--disable-extensions", f"--user-data-dir={prof}",
           "--virtual-time-budget=10000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "HOME": str(page.parent)})


@pytest.mark.chromium
def test_page_in_headless_chromium(tmp_path: Path):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not installed (scripts/test.sh installs Debian's chromium as root)")
    snap = tmp_path / "tree.npz"
    expect, _ = build_snapshot(snap, rounds=20)
    page = tmp_path / "tree.html"
    assert viz_main([str(snap), f"out={page}"]) == 0

    r = _run_chromium(exe, page, "--dump-dom")
    dom = r.stdout
    assert r.returncode == 0 and "<body" in dom, r.stderr[-2000:]
    assert 'id="sphere-js-error"' not in dom, re.search(r'id="sphere-js-error".*?</div>', dom, re.S).group(0)
    m = re.search(r'data-rendered-nodes="(\d+)"', dom)
    assert m, "the page script did not finish rendering"
    assert int(m.group(1)) == expect["n"]
    assert len(re.findall(r'<div class="node[ "]', dom)) == expect["n"]
    assert "data-pwned" not in re.search(r"<body[^>]*>", dom).group(0)  # no injected script ran
    assert "&lt;/script&gt;&lt;script&gt;" in dom  # the hostile text is shown, as text
    assert len(re.findall(r'class="node[^"]*\bsolmax\b', dom)) == len(expect["sol_max"])
    assert len(re.findall(r'class="node[^"]*\bsolmin\b', dom)) == len(expect["sol_min"])
    assert len(re.findall(r'class="node[^"]*\bpruned\b', dom)) > 0

    shot = tmp_path / "tree_viewer.png"
    r = _run_chromium(exe, page, f"--screenshot={shot}", "--window-size=1400,900", "--hide-scrollbars")
    assert shot.is_file(), r.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000

    # a #node=K link opens the tree at node K with its path in the side panel
    k = expect["sol_min"][-1]
    r = _run_chromium(exe, page.with_name("tree.html"), "--dump-dom", fragment=f"node={k}")
    assert 'id="sphere-js-error"' not in r.stdout
    sel = re.findall(r'<div class="node[^"]*\bsel\b[^"]*" data-id="(\d+)"', r.stdout)
    assert sel == [str(k)]
    assert re.search(rf'<div id="detail-body"><div>node {k} ', r.stdout)


def test_reads_what_generate_writes(tmp_path):
    """`sphere generate` saves trees with Generator._save_snapshot; the viewer must read those files."""
    from sphere.generate.generator import Generator
    from sphere.search.types import SearchJob, SearchResult, Trajectory

    src = tmp_path / "src.npz"
    build_snapshot(src, rounds=6)
    arrays, meta = load_tree_snapshot(src)
    snap = {**arrays, "text": meta["text"]}
    t = meta["sol_max"]
    traj = Trajectory(t["steps"], True, t["value"], [], [], "answer")
    job = SearchJob("1:p0", {"id": "p0", "problem": "Compute 2 + 2.", "answer": "4"}, lambda s: [])
    res = SearchResult(job, traj, None, [traj], len(meta["text"]), 6, snapshot=snap)
    gen = Generator.__new__(Generator)  # only the snapshot writer is exercised: no config needed
    gen.hash = "test"
    gen._save_snapshot(tmp_path / "trees", "stage1-p0", res)
    arrays2, meta2 = load_tree_snapshot(tmp_path / "trees" / "stage1-p0.npz")
    assert meta2["text"] == meta["text"] and meta2["sol_min"] is None
    for k, v in arrays.items():
        np.testing.assert_array_equal(arrays2[k], v)
    page = render_tree_html(arrays2, meta2)
    data = json.loads(re.search(r'id="sphere-tree-data">(.*?)</script>', page, re.S).group(1))
    assert len(data["parent"]) == len(meta["text"]) and data["sol_max"]["correct"] is True


def test_trees_from_a_generate_run_render_with_full_sol_paths(tmp_path):
    """End to end without a model: the three-stage generator (test double backend) saves trees/*.npz;
    every file loads, and Sol_max / Sol_min are found in the tree step by step (root + one node per step)."""
    from test_generate import FakeStepBackend, _cfg, _problems

    from sphere.generate.generator import Generator
    from sphere.rewards.symbolic import SymbolicStepScorer
    from sphere.verify import check_answers

    cfg = _cfg(**{"output.snapshot_every": 1, "data.data_dir": str(tmp_path)})
    Generator(cfg, tmp_path).run(_problems(6), FakeStepBackend(0.6), SymbolicStepScorer(), check_answers,
                                 small_backend_factory=lambda: FakeStepBackend(0.3))
    files = sorted((tmp_path / "trees").glob("*.npz"))
    assert len(files) >= 6
    for f in files:
        arrays, meta = load_tree_snapshot(f)
        d = tree_payload(arrays, meta, f.stem)
        assert len(d["text"]) == len(arrays["parent"]) > 1
        for key in ("sol_max", "sol_min"):
            if d[key] is not None:
                assert len(d[key]["nodes"]) == d[key]["steps"] + 1, (f.name, key)
        assert viz_main([str(f)]) == 0
