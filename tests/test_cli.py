"""``modelport classify`` as a user runs it: a real process, the real default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys


from modelport import samples


def run(*args, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelport", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, env=env)


def test_one_shot_prints_label_image_style(default_bundle, images):
    result = run("classify", str(images["cat"]))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 5
    label, _, score = lines[0].partition(" (score = ")
    assert label in ("tabby cat", "tiger cat", "Persian cat", "Siamese cat", "Egyptian Mau")
    assert 0 < float(score.rstrip(")")) <= 1


def test_one_shot_json_and_top_k(default_bundle, images):
    result = run("classify", "--json", "-k", "2", str(images["cat"]), str(images["espresso"]))
    assert result.returncode == 0, result.stderr
    cat, espresso = (json.loads(line) for line in result.stdout.splitlines())
    assert cat["predictions"][0]["index"] in samples.KNOWN["chelsea"] and len(cat["predictions"]) == 2
    assert espresso["predictions"][0] == {"label": "espresso", "index": 967,
                                          "score": espresso["predictions"][0]["score"]}


def test_one_shot_missing_file_fails_with_exit_1(default_bundle, images, tmp_path):
    result = run("classify", str(tmp_path / "nope.jpg"), str(images["espresso"]))
    assert result.returncode == 1
    assert "nope.jpg: error: No such file or directory" in result.stderr
    assert "espresso (score" in result.stdout


def test_stdin_keeps_order_and_reports_bad_lines(default_bundle, images, tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not a jpeg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(images["cat"].read_bytes()[:3000])
    paths = [images["cat"], tmp_path / "missing.jpg", images["espresso"], garbage, truncated] + [images["espresso"]] * 20
    result = run("classify", "--stdin", stdin="".join(f"{p}\n" for p in paths))
    assert result.returncode == 1
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["path"] for o in out] == [str(p) for p in paths]
    assert out[0]["predictions"][0]["index"] in samples.KNOWN["chelsea"]
    assert "No such file" in out[1]["error"]
    assert out[2]["predictions"][0]["index"] == 967
    assert "cannot decode image" in out[3]["error"] and "cannot decode image" in out[4]["error"]
    assert all(o["predictions"][0]["index"] == 967 for o in out[5:])


def test_stdin_all_good_exits_0(default_bundle, images):
    result = run("classify", "--stdin", stdin=f"{images['espresso']}\n\n{images['cat']}\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2  # the blank line is not an input


def test_stdin_streams_before_eof(default_bundle, images):
    """An answer comes back while standard input is still open."""
    proc = subprocess.Popen([sys.executable, "-m", "modelport", "classify", "--stdin"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        proc.stdin.write(f"{images['espresso']}\n")
        proc.stdin.flush()
        first = json.loads(proc.stdout.readline())
        assert first["predictions"][0]["label"] == "espresso"
        proc.stdin.write(f"{images['cat']}\n")
        proc.stdin.flush()
        second = json.loads(proc.stdout.readline())
        assert second["predictions"][0]["index"] in samples.KNOWN["chelsea"]
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def test_model_option_takes_a_bundle_directory(tmp_path, images):
    from conftest import make_tiny_bundle

    make_tiny_bundle(tmp_path / "tiny" / "1")
    make_tiny_bundle(tmp_path / "tiny" / "2", labels=["w", "x", "y", "z"])
    result = run("classify", "--model", str(tmp_path / "tiny"), "--json", str(images["cat"]))
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)["predictions"]
    assert len(predictions) == 3 and {p["label"] for p in predictions} <= {"w", "x", "y", "z"}  # version 2 won


def test_bad_bundle_is_one_clear_line_and_exit_2(tmp_path, images):
    (tmp_path / "broken" / "1").mkdir(parents=True)
    result = run("classify", "--model", str(tmp_path / "broken"), str(images["cat"]))
    assert result.returncode == 2
    assert result.stderr.startswith("modelport: ") and "modelport.toml" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_model_name(model_home, images):
    result = run("classify", "--model", "no-such-model", str(images["cat"]))
    assert result.returncode == 2 and "no model 'no-such-model'" in result.stderr


def test_usage_errors():
    assert run("classify").returncode == 2


def test_without_the_default_model_extra_says_how_to_install(tmp_path, images):
    """With torch unimportable and an empty cache, asking for the default model prints the fix."""
    env = dict(os.environ, MODELPORT_HOME=str(tmp_path / "empty"))
    code = ("import sys; sys.modules['torch'] = None\n"
            "from modelport.cli import main\n"
            f"main(['classify', {str(images['cat'])!r}])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert "pip install 'modelport[default-model]'" in result.stderr


def test_base_install_path_never_imports_torch(default_bundle, images):
    code = ("import sys\nfrom modelport.cli import main\n"
            "try:\n"
            f"    main(['classify', {str(images['cat'])!r}])\n"
            "except SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stderr.strip().endswith("False")


def test_samples_command_writes_the_two_photos(tmp_path):
    result = run("samples", str(tmp_path))
    assert result.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.jpg", "espresso.jpg"]
    assert (tmp_path / "cat.jpg").read_bytes()[:2] == b"\xff\xd8"
