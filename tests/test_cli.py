"""The `eyas` command: generate --json contract, prompt-file validation, clear errors."""
import json

import pytest

from eyas.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_single_prompt(capsys, tiny_llama_path):
    code, out, _ = run(capsys, "generate", "--model", str(tiny_llama_path), "--prompt", "Hello",
                       "--max-tokens", "5", "--ignore-eos", "--json", "--kv-cache-memory", "32MiB")
    assert code == 0
    rec = json.loads(out.strip().splitlines()[0])
    assert rec["id"] == "0" and rec["finish_reason"] == "length"
    assert rec["num_tokens"] == len(rec["token_ids"]) == 5
    assert rec["usage"]["completion_tokens"] == 5 and rec["usage"]["prompt_tokens"] > 0
    assert "spec" not in rec


def test_generate_prompt_file_with_draft(capsys, tmp_path, tiny_llama_path, tiny_drafter_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"id": 7, "prompt": "One two"}) + "\n"
                 + json.dumps({"id": "b", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}) + "\n")
    code, out, _ = run(capsys, "generate", "--model", str(tiny_llama_path), "--draft", str(tiny_drafter_path),
                       "--prompts", str(f), "--max-tokens", "6", "--ignore-eos", "--json",
                       "--kv-cache-memory", "32MiB", "--spec-steps", "2")
    assert code == 0
    recs = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["id"] for r in recs] == ["7", "b"]
    assert [r["num_tokens"] for r in recs] == [6, 3]
    for r in recs:
        assert set(r["spec"]) == {"drafted", "accepted", "target_steps", "accept_len"}
        assert r["spec"]["accept_len"] == pytest.approx(r["num_tokens"] / r["spec"]["target_steps"], abs=1e-3)


@pytest.mark.parametrize("lines, message", [
    ([{"id": 1, "prompt": "a", "messages": []}], "exactly one of"),
    ([{"id": 1}], "exactly one of"),
    ([{"prompt": "a"}], "id"),
    ([{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}], "duplicate id"),
    ([{"id": 1, "prompt": "a", "temperature": -1}], "temperature"),
    (["not json"], "not valid JSON"),
])
def test_bad_prompt_files(capsys, tmp_path, lines, message):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    code, _, err = run(capsys, "generate", "--model", "/nonexistent", "--prompts", str(f))
    assert code == 2
    assert message in err and "line" in err


def test_unknown_model_is_a_clear_error(capsys):
    code, _, err = run(capsys, "generate", "--model", "no-such-model", "--prompt", "x")
    assert code == 2 and "no-such-model" in err


def test_bad_sampling_flag(capsys, tiny_llama_path):
    code, _, err = run(capsys, "generate", "--model", str(tiny_llama_path), "--prompt", "x", "--top-p", "0")
    assert code == 2 and "top_p" in err


def test_kv_cache_too_small_is_a_clear_error(capsys, tiny_llama_path):
    code, _, err = run(capsys, "generate", "--model", str(tiny_llama_path), "--prompt", "x",
                       "--kv-cache-memory", "1KiB")
    assert code == 2 and "kv_cache_memory" in err and "max_model_len" in err
