"""Engine behaviour: continuous batching, chunked prefill, preemption and prefix caching must not
change greedy output; aborts free blocks; bad input gives clear errors."""
import pytest

from eyas import SamplingParams
from eyas.errors import InvalidRequestError

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "Once upon a time",
    "1, 2, 3, 4, 5,",
    "In the beginning the universe was created. This has made a lot of people very angry and",
    "def fibonacci(n):",
]


def run_all(engine, prompts, params=GREEDY, stagger=0):
    """Add prompts (optionally one new prompt every `stagger` steps); return {id: token_ids}."""
    pending = list(enumerate(prompts))
    done = {}
    step = 0
    while pending or engine.has_unfinished():
        if pending and (stagger == 0 or step % stagger == 0):
            batch = pending if stagger == 0 else pending[:1]
            for i, p in batch:
                engine.add_request(str(i), p, params)
            pending = pending[len(batch):]
        for out in engine.step():
            if out.finished:
                done[out.id] = out.token_ids
        engine.allocator.check_invariants(engine.scheduler.running + list(engine.scheduler.waiting))
        step += 1
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
    return done


@pytest.fixture(scope="module")
def reference(tiny_engine_factory):
    """Each prompt alone, no chunking, no prefix cache."""
    engine = tiny_engine_factory(enable_prefix_caching=False)
    return {str(i): run_all(engine, [p])["0"] for i, p in enumerate(PROMPTS)}


def test_batched_staggered_equals_alone(tiny_engine_factory, reference):
    engine = tiny_engine_factory()
    assert run_all(engine, PROMPTS, stagger=2) == reference


def test_chunked_prefill_equals_one_shot(tiny_engine_factory, reference):
    engine = tiny_engine_factory(max_num_batched_tokens=5)
    assert run_all(engine, PROMPTS) == reference


def test_preemption_equals_no_preemption(tiny_engine_factory, reference):
    # Room for about one and a half requests: preemption by recompute must kick in.
    engine = tiny_engine_factory(num_kv_blocks=12, max_model_len=40)
    got = run_all(engine, PROMPTS)
    assert engine.scheduler.num_preemptions > 0
    assert got == reference


def test_prefix_cache_hits_equal_no_cache(tiny_engine_factory, reference):
    engine = tiny_engine_factory()
    first = run_all(engine, PROMPTS)
    hits_before = engine.allocator.prefix_hits
    second = run_all(engine, PROMPTS)
    assert engine.allocator.prefix_hits > hits_before
    assert first == second == reference


def test_abort_frees_blocks(tiny_engine_factory):
    engine = tiny_engine_factory()
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.allocator.num_free_blocks < engine.allocator.num_blocks
    for i in range(len(PROMPTS)):
        assert engine.abort(str(i))
    assert not engine.abort("nope")
    assert not engine.has_unfinished()
    engine.allocator.check_invariants([])
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks


def test_max_tokens_stop_ids_and_stop_strings(tiny_engine_factory, reference):
    engine = tiny_engine_factory()
    ref = reference["0"]
    engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=5, ignore_eos=True))
    engine.add_request("b", PROMPTS[0], SamplingParams(max_tokens=12, stop_token_ids=(ref[3],)))
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.id] = o
    assert outs["a"].token_ids == ref[:5] and outs["a"].finish_reason == "length"
    k = ref.index(ref[3])
    assert outs["b"].token_ids == ref[:k + 1] and outs["b"].finish_reason == "stop"
    # stop string: cut the text before it
    full_text = engine.tokenizer.decode(ref)
    stop = full_text[len(full_text) // 2:][:3]
    if stop.strip():
        engine.add_request("c", PROMPTS[0], SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,)))
        while engine.has_unfinished():
            for o in engine.step():
                if o.finished:
                    outs[o.id] = o
        assert outs["c"].finish_reason == "stop"
        assert stop not in outs["c"].text and full_text.startswith(outs["c"].text)


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt=""), "prompt"),
    (dict(prompt="x" * 10, prompt_token_ids=None, params=SamplingParams(max_tokens=1)), None),
    (dict(prompt_token_ids=[10**9]), "prompt_token_ids"),
    (dict(prompt="a " * 200), "prompt"),
])
def test_bad_requests(tiny_engine_factory, kwargs, field):
    engine = tiny_engine_factory(max_model_len=64)
    if field is None:
        engine.add_request("ok", **kwargs)  # a valid request is accepted
        return
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("bad", **kwargs)
    assert e.value.field == field


@pytest.mark.parametrize("bad, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_params(bad, field):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**bad)
    assert e.value.field == field


def test_logprobs_returned_and_consistent(tiny_engine_factory, reference):
    engine = tiny_engine_factory()
    engine.add_request("lp", PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True, logprobs=2))
    final = None
    while engine.has_unfinished():
        for o in engine.step():
            final = o
    assert final.token_ids == reference["0"][:4]
    assert len(final.logprobs) == 4
    for tok, lp in zip(final.token_ids, final.logprobs):
        assert lp["token_id"] == tok and lp["logprob"] <= 0.0
        assert len(lp["top"]) == 2
        assert lp["top"][0][0] == tok  # greedy: the sampled token is the most likely
        assert lp["top"][0][1] == pytest.approx(lp["logprob"])
