"""examples/python/serve.py on the CPU: it runs, and the numbers it prints
add up against its own workload (every request served once, every token
generated once, every block returned, compression saving blocks and never
admitting worse)."""
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

SERVE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "python" / "serve.py"
ARGS = ["--backend", "cpu", "--requests", "16", "--blocks", "300", "--seed", "3"]


def load_serve():
    assert SERVE.is_file(), f"{SERVE} not found"
    spec = importlib.util.spec_from_file_location("serve_example", SERVE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(*extra):
    r = subprocess.run([sys.executable, str(SERVE), *ARGS, *extra], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def summaries(out):
    res = {}
    for line in out.splitlines():
        if line.startswith("summary "):
            fields = dict(kv.split("=") for kv in line.split()[1:])
            policy = fields.pop("policy")
            res[policy] = {k: int(v) for k, v in fields.items()}
    return res


def table_row(out, name):
    m = re.search(rf"^{re.escape(name)}\s+(.*)$", out, re.M)
    assert m, name
    return m.group(1).split()


def test_default_run_compares_vlcache_with_no_compression():
    serve = load_serve()
    args = serve.parse(ARGS)
    reqs = serve.workload(args.requests, args.seed, args.image_tokens, args.text_max,
                          args.new_max, args.rate)
    out = run()
    s = summaries(out)
    assert set(s) == {"none", "vlcache"}
    base_prompt = sum(r.n_prompt for r in reqs)
    for name, r in s.items():
        assert r["served"] + r["refused"] == len(reqs), name
        assert r["refused"] == 0, name  # every request fits the pool alone
        assert r["tokens"] == sum(q.max_new for q in reqs), name
        assert r["final_blocks"] == 0, name
        assert 0 < r["peak_blocks"] <= 300, name
        # recomputation after preemption prefills again; without it, each
        # prompt is prefilled exactly once
        assert r["prompt_tokens"] >= base_prompt, name
        if r["preemptions"] == 0:
            assert r["prompt_tokens"] == base_prompt, name
    assert s["none"]["saved_blocks"] == 0
    assert s["vlcache"]["saved_blocks"] > 0
    assert s["vlcache"]["peak_blocks"] < s["none"]["peak_blocks"]
    assert s["vlcache"]["preemptions"] <= s["none"]["preemptions"]
    assert s["vlcache"]["steps"] <= s["none"]["steps"]
    # the human-readable table says the same
    assert table_row(out, "requests served") == [str(s["none"]["served"]),
                                                 str(s["vlcache"]["served"])]
    assert table_row(out, "blocks saved by compression") == ["0", str(s["vlcache"]["saved_blocks"])]
    assert table_row(out, "preemptions") == [str(s["none"]["preemptions"]),
                                             str(s["vlcache"]["preemptions"])]
    assert "blocks in use over time" in out


def test_policy_choice_and_errors():
    s = summaries(run("--policy", "h2o", "--keep", "0.2", "--no-compare"))
    assert set(s) == {"h2o"} and s["h2o"]["saved_blocks"] > 0 and s["h2o"]["final_blocks"] == 0
    s = summaries(run("--policy", "none"))
    assert set(s) == {"none"}
    r = subprocess.run([sys.executable, str(SERVE), *ARGS, "--policy", "lru"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "lru" in r.stderr


def test_a_request_larger_than_the_pool_is_refused_not_retried():
    s = summaries(run("--blocks", "20", "--requests", "3", "--policy", "none"))
    assert s["none"]["refused"] == 3 and s["none"]["served"] == 0


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision(dtype):
    s = summaries(run("--dtype", dtype, "--requests", "4"))
    assert s["vlcache"]["served"] == 4
