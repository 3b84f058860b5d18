"""A user's mistake ends in one clear line and a non-zero exit code, never a traceback, and never touches the user's
files; a diverging run is recorded and reported, not crashed on or hidden."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import HHH, TINY_DATA, need

from distdpo.cli import main

SYNTH = f"""seed = 0
{TINY_DATA}[algorithm]
rounds = 3
local_steps = 2
lr = 0.3
[engine]
progress = false
"""


def write(path, text):
    path.write_text(text)
    return path


def snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def refused(capsys, argv, *needles, code=2):
    """Run the CLI in-process: it must exit ``code`` with one clear message naming ``needles``, no traceback."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def text_config(tmp_path, source, **policy):
    pol = {
        "kind": "causal_lm",
        "model": "builtin:gpt2-tiny",
        "max_length": 48,
        "lora_r": 2,
        "tokenizer_vocab_size": 300,
        **policy,
    }
    lines = [
        f'[data]\nsource = "{source}"\nnum_clients = 2\nloss_pairs_per_client = 2\neval_fraction = 0.2',
        "[policy]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in pol.items()),
        "[algorithm]\nrounds = 1\nlocal_steps = 1\nbatch_size = 2\nlr = 0.5",
        "[engine]\nprogress = false",
    ]
    return write(tmp_path / "text.toml", "\n".join(lines))


def hhh_file(tmp_path, n=30):
    lines = need(HHH).read_text().splitlines()[:n]
    return write(tmp_path / "prefs.jsonl", "\n".join(lines) + "\n")


# ---- the user's files


def test_out_directory_with_the_users_files_is_refused_and_untouched(tmp_path, capsys):
    proj = tmp_path / "proj"
    proj.mkdir()
    cfg = write(proj / "config.toml", SYNTH)
    write(proj / "metrics.csv", "my,own\n1,2\n")
    before = snapshot(proj)
    refused(capsys, ["run", str(cfg), "--out", str(proj)], "files distdpo did not write", "config.toml")
    assert snapshot(proj) == before


def test_out_that_is_a_file_or_under_a_file(tmp_path, capsys):
    cfg = write(tmp_path / "cfg.toml", SYNTH)
    afile = write(tmp_path / "notes.txt", "mine")
    refused(capsys, ["run", str(cfg), "--out", str(afile)], "is a file, not a directory")
    refused(capsys, ["run", str(cfg), "--out", str(afile / "run")], str(afile))
    assert afile.read_text() == "mine"


def test_a_second_writer_is_refused_while_the_first_holds_the_directory(tmp_path, capsys):
    cfg = write(tmp_path / "cfg.toml", SYNTH)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    holder = subprocess.Popen(  # another process, writing the same directory
        [
            sys.executable,
            "-c",
            "import sys, time; from distdpo import rundir; rundir.lock(__import__('pathlib').Path(sys.argv[1]));"
            "print('held', flush=True); time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        refused(capsys, ["run", str(cfg), "--out", str(out), "--resume"], "another distdpo process", str(holder.pid))
    finally:
        holder.kill()
        holder.wait()
    assert main(["run", str(cfg), "--out", str(out), "--resume"]) == 0  # the lock went with the process


# ---- values, data and models


@pytest.mark.parametrize(
    "key,value",
    [("algorithm.lr", "inf"), ("engine.timeout_s", "inf"), ("data.reward_scale", "inf"), ("algorithm.lr", "nan")],
)
def test_non_finite_values_are_refused(tmp_path, capsys, key, value):
    cfg = write(tmp_path / "cfg.toml", SYNTH)
    refused(capsys, ["run", str(cfg), "--out", str(tmp_path / "o"), "--set", f"{key}={value}"], key, "finite")


def test_non_utf8_data_names_file_and_line_and_skip_skips_it(tmp_path, capsys):
    data = hhh_file(tmp_path)
    raw = data.read_bytes().splitlines()
    raw[3] = raw[3].replace(b'"prompt": "', b'"prompt": "\xff', 1)
    data.write_bytes(b"\n".join(raw) + b"\n")
    cfg = text_config(tmp_path, data)
    refused(capsys, ["run", str(cfg), "--out", str(tmp_path / "o")], f"{data}:4", "not UTF-8")
    assert main(["run", str(cfg), "--out", str(tmp_path / "o2"), "--set", 'data.on_error="skip"']) == 0
    stats = json.loads((tmp_path / "o2" / "summary.json").read_text())["runs"]["run"]["data_stats"]
    assert stats["skipped_malformed"] == 1


def test_hub_ids_offline_fail_fast_with_the_way_out(tmp_path):
    """HF_HUB_OFFLINE set (as a user without a network sets it): one line naming the key and the way out, at once."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # and an empty cache
    data = hhh_file(tmp_path)
    for cfg, key in (
        (write(tmp_path / "d.toml", text_config(tmp_path, "someone/some-prefs").read_text()), "data.source"),
        (
            write(tmp_path / "m.toml", text_config(tmp_path, data, model="someone/some-model").read_text()),
            "policy.model",
        ),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "distdpo", "run", str(cfg), "--out", str(tmp_path / key)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert key in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr and "local path" in proc.stderr
        assert "Retrying" not in proc.stderr  # no minute of HTTP retries before the answer


@pytest.mark.parametrize(
    "policy,needle",
    [
        ({"model": "./no/such/model"}, "no such file or directory"),
        ({"model": "builtin:gpt9-huge"}, "no such built-in model"),
        ({"max_length": 4}, "policy.max_length = 4"),
    ],
)
def test_bad_models_and_lengths(tmp_path, capsys, policy, needle):
    cfg = text_config(tmp_path, hhh_file(tmp_path), **policy)
    refused(capsys, ["run", str(cfg), "--out", str(tmp_path / "o")], needle)


def test_data_source_that_is_a_directory(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()  # (a folder of data files is read by `datasets`; an empty one cannot be)
    refused(capsys, ["run", str(text_config(tmp_path, folder)), "--out", str(tmp_path / "o")], str(folder), "directory")


def test_edge_list_with_a_huge_label_is_refused_without_allocating(tmp_path, capsys):
    edges = write(tmp_path / "g.edges", "0 1\n1 2\n2 99999999999999\n")
    cfg = write(
        tmp_path / "cfg.toml",
        SYNTH.replace("[engine]", f'[topology]\ngraph = "{edges}"\n[engine]').replace(
            "lr = 0.3", 'lr = 0.3\nname = "dsgd"'
        ),
    )
    refused(capsys, ["run", str(cfg), "--out", str(tmp_path / "o")], str(edges), "are missing")


# ---- checkpoints, resume and long labels


def test_damaged_checkpoint_json_is_named(tmp_path, capsys):
    cfg = write(tmp_path / "cfg.toml", SYNTH)
    sets = ["--set", f'engine.checkpoint_dir="{tmp_path / "ck"}"', "--set", "engine.checkpoint_every=1"]
    assert main(["run", str(cfg), "--out", str(tmp_path / "a"), *sets]) == 0
    ck = tmp_path / "ck" / "run" / "checkpoint.json"
    ck.write_text(ck.read_text()[:40])
    refused(capsys, ["run", str(cfg), "--out", str(tmp_path / "b"), *sets], str(ck), "damaged")
    ck.write_text(json.dumps({"round": "three"}))
    refused(capsys, ["run", str(cfg), "--out", str(tmp_path / "c"), *sets], str(ck), "'round'")


@pytest.mark.parametrize(
    "name,damage,needle",
    [
        ("summary.json", "{not json", "summary.json is not valid JSON"),
        ("metrics.csv", None, "metrics.csv is missing"),
        ("config.toml", None, "config.toml is missing"),
        ("metrics.csv", "x,y\n1,2\n", "metrics.csv cannot be read"),
    ],
)
def test_resume_of_a_damaged_run_directory_names_the_file(tmp_path, capsys, name, damage, needle):
    cfg = write(tmp_path / "cfg.toml", SYNTH)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    if damage is None:
        (out / name).unlink()
    else:
        (out / name).write_text(damage)
    before = snapshot(out)
    refused(capsys, ["run", str(cfg), "--out", str(out), "--resume"], needle)
    assert snapshot(out) == before


def test_sweep_with_very_long_labels_checkpoints(tmp_path):
    cfg = write(tmp_path / "cfg.toml", SYNTH)
    sets = [
        "--set",
        f'engine.checkpoint_dir="{tmp_path / "ck"}"',
        "--set",
        "engine.checkpoint_every=1",
        "--set",
        f'sweep.data.label_column=["{"a" * 300}", "{"b" * 300}"]',
    ]  # (unused by synthetic data)
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), *sets]) == 0
    folders = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert len(folders) == 2 and all(len(name) <= 100 for name in folders)


# ---- divergence


def test_diverging_sweep_point_is_recorded_and_the_others_finish(tmp_path, capsys):
    cfg = write(tmp_path / "cfg.toml", SYNTH + '[sweep]\n"algorithm.lr" = [0.3, 1e6, 0.5]\n')
    out = tmp_path / "o"
    err = refused(capsys, ["run", str(cfg), "--out", str(out)], "lr=1000000.0: diverged", code=1)
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [r["status"] for r in runs.values()] == ["ok", "diverged", "ok"]
    bad = runs["lr=1000000.0"]
    assert bad["diverged_at_round"] >= 1 and bad["final"]["round"] == bad["last_finite_round"]
    assert all(v is None or abs(v) < 1e30 for v in bad["final"].values() if isinstance(v, float))
    assert "1 of 3" in err


def test_diverging_language_model_run_is_recorded(tmp_path, capsys):
    cfg = text_config(tmp_path, hhh_file(tmp_path))
    cfg.write_text(
        cfg.read_text().replace("rounds = 1", "rounds = 2") + '\n[sweep]\n"algorithm.lr" = [0.5, 1e6, 0.1]\n'
    )
    out = tmp_path / "o"
    refused(capsys, ["run", str(cfg), "--out", str(out)], "diverged", code=1)
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [r["status"] for r in runs.values()] == ["ok", "diverged", "ok"]


# ---- processes


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the ranks through /proc (Linux)")
def test_killing_launch_takes_its_ranks_down(tmp_path):
    cfg = write(tmp_path / "cfg.toml", SYNTH.replace("rounds = 3", "rounds = 100000"))
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distdpo",
            "launch",
            "--nproc",
            "2",
            str(cfg),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def ranks():  # the worker processes of this job, from /proc (Linux)
        found = []
        for proc in Path("/proc").iterdir():
            try:
                args = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"run" in args and str(cfg).encode() in args and b"launch" not in args:
                found.append(proc.name)
        return found

    try:
        deadline = time.time() + 90
        while len(ranks()) < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert len(ranks()) == 2, "the ranks did not start"
        time.sleep(2)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        time.sleep(10)
        left = ranks()
    finally:
        launcher.kill()
        for pid in ranks():
            os.kill(int(pid), signal.SIGKILL)
    assert left == []


def test_outputs_are_readable_by_the_users_group(tmp_path):
    cfg = write(tmp_path / "cfg.toml", SYNTH)
    old = os.umask(0o027)
    try:
        assert main(["run", str(cfg), "--out", str(tmp_path / "o")]) == 0
    finally:
        os.umask(old)
    for name in ("summary.json", "metrics.csv", "config.toml"):
        assert (tmp_path / "o" / name).stat().st_mode & 0o777 == 0o640  # 0666 less the umask, as open() gives


def test_what_a_run_silently_does_is_warned_once_and_recorded(tmp_path, capsys, caplog):
    cfg = write(
        tmp_path / "cfg.toml",
        SYNTH.replace("[engine]", '[topology]\ngraph = "torus"\n[engine]').replace(
            "lr = 0.3", "lr = 0.3\nbatch_size = 100"
        )
        + '[sweep]\n"algorithm.local_steps" = [1, 2]\n',
    )
    with caplog.at_level("WARNING", logger="distdpo"):
        assert main(["run", str(cfg), "--out", str(tmp_path / "o")]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    notes = summary["warnings"]
    assert any("topology.* keys are set" in n for n in notes)
    assert any("batch_size = 100 exceeds the training pairs of 6 client(s)" in n for n in notes)
    assert all(sorted(run["warnings"]) == notes for run in summary["runs"].values())
    logged = [r.getMessage() for r in caplog.records if r.name == "distdpo"]
    assert sorted(logged) == sorted(notes)  # once each, not once per run


def test_a_natural_split_with_a_client_without_held_out_pairs_is_warned(tmp_path):
    from distdpo import build
    from distdpo.config import from_dict

    rows = [{"prompt": f"p{i % 5}", "chosen": f"good {i}", "rejected": f"bad {i}", "user": "a"} for i in range(10)]
    rows.append({"prompt": "q", "chosen": "good", "rejected": "bad", "user": "b"})  # one pair: kept for training
    data = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict(
        {
            "data": {"source": str(data), "partition": "natural", "label_column": "user", "eval_fraction": 0.3},
            "policy": {"kind": "causal_lm", "max_length": 32, "lora_r": 2, "tokenizer_vocab_size": 300},
            "algorithm": {"batch_size": 2},
        }
    )
    notes = build.warnings_for(cfg, build.build_task(cfg))
    assert any("have no held-out pairs" in n for n in notes), notes
