"""The tuner's disk cache (ops/triton/tuning_cache.py) and what uses it:
keys and file contents, a round trip through a simulated new process, a
stored choice checked again before use, corrupt and foreign files, the
switch that turns it off, concurrent writers (threads and processes),
compiled graphs picking the stored choice, the warm-L2 timer, and
resnet_fused.tune on a small model.

No GPU here: tensors are CPU tensors under TRITON_INTERPRET=1, where nothing
is timed, so the tests that tune replace the timer (and `can_measure`) as
test_triton_tuning.py does; no test asserts a timing."""
import json
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch
import torch.nn as nn

import resnet_fused
from conftest import HAS_CUDA, NO_CUDA_REASON

triton_conv = pytest.importorskip("resnet_fused.ops.triton.conv")
from resnet_fused.ops.triton import device, tuning, tuning_cache  # noqa: E402

pytestmark = pytest.mark.skipif(
    resnet_fused.backends.reason_unavailable("triton") is not None,
    reason=f"triton backend unavailable: {resnet_fused.backends.reason_unavailable('triton')}",
)

DEVICE = device()
OP = torch.ops.resnet_fused.triton_conv_bn_act
CONV = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)


def inputs(n=2, c=8, hw=5, k=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, hw, hw, generator=g)
    w = torch.randn(k, c, 3, 3, generator=g) / (9 * c) ** 0.5
    scale, shift = torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g) * 0.3
    return [t.to(DEVICE) for t in (x, w, scale, shift)]


def conv_op(x, w, scale, shift):
    return OP(x, w, scale, shift, None, True, [1, 1], [1, 1], [1, 1], 1)


def key_of(x, w, residual=None, relu=True, offset=0):
    return tuning.key(x, w, residual, relu, CONV["stride"], CONV["padding"], CONV["dilation"], CONV["groups"],
                      offset, tuning.forced())


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh process state and an empty cache directory of our own."""
    monkeypatch.setenv("RESNET_FUSED_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RESNET_FUSED_TUNING_CACHE", raising=False)
    monkeypatch.setattr(tuning, "_choices", {})
    monkeypatch.setattr(tuning, "_persisted", {})
    monkeypatch.setattr(tuning, "_environments", {})
    monkeypatch.setattr(tuning_cache, "_warned", set())
    return tmp_path / "cache"


def never_timed(fn):
    raise AssertionError("a candidate was timed")


def file_of(x) -> str:
    return str(tuning_cache.path_for(tuning_cache.environment(x.device)))


def stored(x) -> dict:
    with open(file_of(x)) as f:
        return json.load(f)


class Runs:
    """Candidates that count their runs; `wrong` ones return a wrong output."""

    def __init__(self, names, wrong=()):
        self.runs = []
        self.candidates = {n: (lambda n=n: self.runs.append(n) or ("bad" if n in wrong else "ok")) for n in names}

    @staticmethod
    def check(out):
        return None if out == "ok" else "off by 50%"


# ---- keys and where the file is -----------------------------------------------


def test_key_and_problem_text():
    """The problem text names everything that changes the kernel (shape,
    dtype, layouts, epilogue, narrow residual) and not the device index:
    two GPUs of one model share their choices."""
    x, w, _, _ = inputs()
    base = key_of(x, w)
    assert len(base) == tuning._KEY_LEN and base[tuning._DEVICE] == str(x.device)
    on_cuda1 = base[:tuning._DEVICE] + ("cuda:1",) + base[tuning._DEVICE + 1:]
    on_cuda0 = base[:tuning._DEVICE] + ("cuda:0",) + base[tuning._DEVICE + 1:]
    assert tuning.problem(on_cuda0) == tuning.problem(on_cuda1)
    narrow_res = torch.randn(2, 8, 5, 5, device=DEVICE)
    variants = [
        base,
        key_of(x, w, relu=False),
        key_of(x, w, residual=torch.randn(2, 16, 5, 5, device=DEVICE)),
        key_of(x, w, residual=torch.randn(2, 16, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)),
        key_of(x, w, residual=narrow_res, offset=4),
        key_of(x, w, residual=narrow_res, offset=0),
        key_of(x.half(), w.half()),
        key_of(x.contiguous(memory_format=torch.channels_last), w),
        key_of(x, w.contiguous(memory_format=torch.channels_last)),
        key_of(x[:1], w),
    ]
    texts = [tuning.problem(k) for k in variants]
    assert len(set(texts)) == len(texts), texts
    assert "residual=nchw" in texts[2] and "residual=nhwc" in texts[3] and "residual-channels=4+8" in texts[4]
    assert "float16" in texts[6] and "nhwc/nchw" in texts[7] and "nchw/nhwc" in texts[8]
    assert str(x.device) not in tuning.problem(base)


def test_environment_names_versions_and_gpu(monkeypatch):
    import triton

    env = tuning_cache.environment(torch.device("cpu"))
    assert env["triton"] == triton.__version__ and env["torch"] == torch.__version__
    assert env["resnet_fused"] == resnet_fused.__version__ and env["format"] == tuning_cache.FORMAT
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)
    h100 = tuning_cache.environment(torch.device("cuda", 0))
    assert h100["gpu"] == "NVIDIA H100 80GB HBM3" and h100["capability"] == "9.0" and h100["cudnn"] == 91000
    paths = {tuning_cache.path_for(e) for e in (env, h100, dict(h100, capability="8.0"), dict(h100, triton="0"),
                                                  dict(h100, torch="0"), dict(h100, resnet_fused="0"))}
    assert len(paths) == 6  # any difference: another file


@pytest.mark.skipif(HAS_CUDA, reason="checks the answer where no CUDA device exists")
def test_no_environment_for_a_cuda_device_that_is_not_there():
    assert tuning_cache.environment(torch.device("cuda", 0)) is None


def test_directory_and_switches(tmp_path, monkeypatch):
    monkeypatch.delenv("RESNET_FUSED_CACHE_DIR", raising=False)
    monkeypatch.delenv("RESNET_FUSED_TUNING_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert tuning_cache.directory() == tmp_path / "home" / ".cache" / "resnet_fused"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning_cache.directory() == tmp_path / "xdg" / "resnet_fused"
    monkeypatch.setenv("RESNET_FUSED_CACHE_DIR", str(tmp_path / "mine"))
    assert tuning_cache.directory() == tmp_path / "mine"
    assert tuning_cache.enabled()
    monkeypatch.setenv("RESNET_FUSED_TUNING_CACHE", "0")
    assert not tuning_cache.enabled()
    monkeypatch.setenv("RESNET_FUSED_TUNING_CACHE", "1")
    monkeypatch.setattr(tuning_cache, "interpreting", lambda: True)
    monkeypatch.delenv("RESNET_FUSED_CACHE_DIR")
    assert not tuning_cache.enabled()  # the interpreter writes only where a test points it
    monkeypatch.setattr(tuning_cache, "interpreting", lambda: False)
    assert tuning_cache.enabled()

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(tuning_cache.Path, "home", staticmethod(no_home))
    monkeypatch.setattr(tuning_cache, "_warned", set())
    with pytest.warns(UserWarning, match="RESNET_FUSED_CACHE_DIR"):
        assert tuning_cache.directory() is None
    env = tuning_cache.environment(torch.device("cpu"))
    assert tuning_cache.load(env) == {}
    tuning_cache.store(env, {"p": tuning.CUDNN})  # nowhere to write: no error


# ---- round trip ------------------------------------------------------------------


def test_round_trip_through_a_new_process(cache_dir):
    """Measured once, stored; a new process (the in-process state cleared)
    checks the stored choice once and uses it without timing anything."""
    x, w, _, _ = inputs()
    k = key_of(x, w)
    cfg = triton_conv.INTERPRETER_CONFIG
    first = Runs([cfg, tuning.CUDNN])
    times = {cfg: 2.0, tuning.CUDNN: 1.0}
    assert tuning.choose(k, first.candidates, lambda fn: times[next(c for c, f in first.candidates.items()
                                                                    if f is fn)], first.check) == tuning.CUDNN
    data = stored(x)
    assert data["format"] == tuning_cache.FORMAT
    assert data["environment"] == tuning_cache.environment(x.device)
    assert data["choices"] == {tuning.problem(k): "cudnn"}

    tuning.clear()  # a new process
    again = Runs([cfg, tuning.CUDNN])
    assert tuning.choose(k, again.candidates, never_timed, again.check) == tuning.CUDNN
    assert again.runs == [tuning.CUDNN]  # the one checking run, nothing else
    assert tuning.cached(k) == tuning.CUDNN


def test_a_tiling_round_trips_by_value(cache_dir):
    x, w, _, _ = inputs()
    k = key_of(x, w)
    cfg = triton_conv.ConvConfig(64, 32, 32, group_m=4, num_warps=4, num_stages=2)
    runs = Runs([tuning.CUDNN, cfg])
    assert tuning.choose(k, runs.candidates, lambda fn: 1.0 if fn is runs.candidates[cfg] else 2.0, runs.check) == cfg
    assert stored(x)["choices"][tuning.problem(k)] == dict(block_m=64, block_n=32, block_k=32, group_m=4,
                                                            num_warps=4, num_stages=2)
    tuning.clear()
    assert tuning.persisted(k) == cfg


def test_stored_choice_that_fails_its_check_is_tuned_again(cache_dir):
    x, w, _, _ = inputs()
    k = key_of(x, w)
    cfg = triton_conv.INTERPRETER_CONFIG
    tuning_cache.store(tuning_cache.environment(x.device), {tuning.problem(k): tuning.CUDNN})
    runs = Runs([cfg, tuning.CUDNN], wrong=(tuning.CUDNN,))
    with pytest.warns(UserWarning, match="from the tuning cache rejected") as caught:
        assert tuning.choose(k, runs.candidates, lambda fn: 1.0, runs.check) == cfg
    assert len(caught) == 1 and runs.runs == [tuning.CUDNN, cfg]  # the stored one is not run a second time
    assert stored(x)["choices"][tuning.problem(k)] == dict(vars(cfg))  # replaced on disk


def test_stored_choice_no_longer_offered_is_ignored(cache_dir):
    """A tiling the code no longer offers (or cuDNN under
    RESNET_FUSED_TRITON_CONV=triton) is not used, not even while tracing."""
    x, w, _, _ = inputs()
    k = key_of(x, w)
    gone = triton_conv.ConvConfig(256, 256, 64)
    tuning_cache.store(tuning_cache.environment(x.device), {tuning.problem(k): gone})
    cfg = triton_conv.INTERPRETER_CONFIG
    assert tuning.persisted(k) == gone
    assert tuning.pick(k, {cfg: None}, lambda: "heuristic", measurable=False) == "heuristic"
    runs = Runs([cfg])
    assert tuning.choose(k, runs.candidates, lambda fn: 1.0, runs.check) == cfg
    assert runs.runs == [cfg]


# ---- bad files, the switch, failures to write -----------------------------------------


def _prepare(cache_dir, text):
    x, w, _, _ = inputs()
    path = tuning_cache.path_for(tuning_cache.environment(x.device))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return x, key_of(x, w), path


@pytest.mark.parametrize("what", ["garbage", "binary", "truncated", "list", "format_2", "foreign_environment"])
def test_bad_file_is_ignored_with_one_warning(cache_dir, what):
    x, _, _, _ = inputs()
    env = tuning_cache.environment(x.device)
    good = {"format": 1, "environment": env, "choices": {}}
    text = {
        "garbage": "\x00\xff not json",
        "binary": b"\xff\xfe\x00\x80",
        "truncated": json.dumps(good)[:-3],
        "list": "[1, 2]",
        "format_2": json.dumps(dict(good, format=2)),
        "foreign_environment": json.dumps(dict(good, environment=dict(env, torch="1.0.0"))),
    }[what]
    x, k, path = _prepare(cache_dir, text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tuning.persisted(k) is None
        tuning.clear()
        assert tuning.persisted(k) is None  # read again: no second warning
        runs = Runs([triton_conv.INTERPRETER_CONFIG])
        assert tuning.choose(k, runs.candidates, lambda fn: 1.0, runs.check) == triton_conv.INTERPRETER_CONFIG
    cache_warnings = [w for w in caught if "tuning cache" in str(w.message)]
    assert len(cache_warnings) == 1, [str(w.message) for w in caught]
    assert "ignored" in str(cache_warnings[0].message)
    assert stored(x)["choices"] == {tuning.problem(k): dict(vars(triton_conv.INTERPRETER_CONFIG))}  # rewritten


def test_unreadable_entries_are_skipped(cache_dir):
    x, w, _, _ = inputs()
    env = tuning_cache.environment(x.device)
    k = key_of(x, w)
    _prepare(cache_dir, json.dumps({"format": 1, "environment": env, "choices": {
        "some problem": {"block_m": 64, "unknown_field": 1}, "other": 7,
        "strings": dict(block_m="64", block_n=64, block_k=32), tuning.problem(k): "cudnn"}}))
    assert tuning.persisted(k) == tuning.CUDNN
    assert tuning_cache.load(env) == {tuning.problem(k): tuning.CUDNN}


def test_switched_off_nothing_is_read_or_written(cache_dir, monkeypatch):
    x, w, _, _ = inputs()
    k = key_of(x, w)
    tuning_cache.store(tuning_cache.environment(x.device), {tuning.problem(k): tuning.CUDNN})
    before = stored(x)
    monkeypatch.setenv("RESNET_FUSED_TUNING_CACHE", "0")
    tuning.clear()
    assert tuning.persisted(k) is None
    runs = Runs([triton_conv.INTERPRETER_CONFIG, tuning.CUDNN])
    assert tuning.choose(k, runs.candidates, lambda fn: 1.0, runs.check) == triton_conv.INTERPRETER_CONFIG
    assert tuning.choose(key_of(inputs(3)[0], w), runs.candidates, lambda fn: 1.0, runs.check)  # a new shape
    assert stored(x) == before  # neither written


def test_unwritable_directory_warns_once_and_tunes_on(tmp_path, cache_dir, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("RESNET_FUSED_CACHE_DIR", str(blocker / "cache"))  # under a file: cannot be created
    x, w, _, _ = inputs()
    runs = Runs([triton_conv.INTERPRETER_CONFIG])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in (2, 3):
            xn = inputs(n)[0]
            assert tuning.choose(key_of(xn, w), runs.candidates, lambda fn: 1.0, runs.check)
    messages = [str(w.message) for w in caught if "tuning cache" in str(w.message)]
    assert len(messages) == 1 and "cannot be written" in messages[0], messages


# ---- concurrent writers ---------------------------------------------------------------


def test_concurrent_threads_lose_no_entry(cache_dir):
    x, _, _, _ = inputs()
    env = tuning_cache.environment(x.device)

    def write(t):
        for i in range(25):
            tuning_cache.store(env, {f"thread {t} problem {i}": tuning.CUDNN})

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(tuning_cache.load(env)) == 100
    assert not [p for p in cache_dir.iterdir() if p.suffix == ".tmp"]


WRITER = """
import sys, torch, resnet_fused
from resnet_fused.ops.triton import tuning_cache, conv
env = tuning_cache.environment(torch.device("cpu"))
tag = sys.argv[1]
print("ready", flush=True)
sys.stdin.readline()  # start together
for i in range(40):
    tuning_cache.store(env, {f"{tag} {i}": conv.INTERPRETER_CONFIG if i % 2 else "cudnn"})
"""


def test_concurrent_processes_lose_no_entry(cache_dir):
    env = dict(os.environ, RESNET_FUSED_CACHE_DIR=str(cache_dir), TRITON_INTERPRET="1")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, tag], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for tag in ("a", "b")]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    choices = tuning_cache.load(tuning_cache.environment(torch.device("cpu")))
    assert set(choices) == {f"{t} {i}" for t in "ab" for i in range(40)}
    assert choices["a 1"] == triton_conv.INTERPRETER_CONFIG and choices["b 0"] == tuning.CUDNN


# ---- compiled graphs --------------------------------------------------------------------


def _spy_picks(monkeypatch):
    seen = []
    real = tuning.pick

    def pick(k, candidates, heuristic, measurable, check=None):
        choice = real(k, candidates, heuristic, measurable, check)
        seen.append((measurable, choice))
        return choice

    monkeypatch.setattr(tuning, "pick", pick)
    return seen


def test_traced_graph_uses_the_stored_choice(cache_dir, monkeypatch):
    """Fake-tensor tracing (what torch.compile does) times nothing and takes
    the choice stored by an earlier process; without one, the heuristic."""
    from torch.fx.experimental.proxy_tensor import make_fx

    args = inputs()
    seen = _spy_picks(monkeypatch)
    make_fx(conv_op, tracing_mode="fake")(*args)
    assert seen == [(False, triton_conv.INTERPRETER_CONFIG)]  # the heuristic: nothing stored yet

    k = key_of(*args[:2])
    tuning_cache.store(tuning_cache.environment(args[0].device), {tuning.problem(k): tuning.CUDNN})
    tuning.clear()  # a new process
    seen.clear()
    graph = make_fx(conv_op, tracing_mode="fake")(*args)
    assert seen == [(False, tuning.CUDNN)]
    assert any(n.target is OP.default for n in graph.graph.nodes)


def test_torch_compile_uses_the_stored_choice(cache_dir, monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    args = inputs(seed=3)
    k = key_of(*args[:2])
    tuning_cache.store(tuning_cache.environment(args[0].device), {tuning.problem(k): tuning.CUDNN})
    monkeypatch.setattr(tuning, "cuda_time", never_timed)
    seen = _spy_picks(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(conv_op, backend=CompileCounterWithBackend("aot_eager"), fullgraph=True)
    compiled(*args)
    assert seen and all(choice == tuning.CUDNN and not measurable for measurable, choice in seen)


TRACE_REGISTRATION = """
import torch, resnet_fused
from torch.fx.experimental.proxy_tensor import make_fx
from resnet_fused.ops.triton import tuning, tuning_cache
op = torch.ops.resnet_fused.triton_conv_bn_act
x, w, s, b = torch.randn(2, 8, 5, 5), torch.randn(16, 8, 3, 3), torch.rand(16), torch.rand(16)
k = tuning.key(x, w, None, True, (1, 1), (1, 1), (1, 1), 1, 0, "auto")
tuning_cache.store(tuning_cache.environment(x.device), {tuning.problem(k): "cudnn"})
seen, real = [], tuning.pick
tuning.pick = lambda *a, **kw: seen.append((a[3], real(*a, **kw))) or seen[-1][1]
make_fx(lambda *t: op(*t, None, True, [1, 1], [1, 1], [1, 1], 1), tracing_mode="fake")(x, w, s, b)
print(seen)
"""


def test_triton_op_registration_traces_with_the_stored_choice(tmp_path):
    """The registration a GPU machine runs (triton_op, no interpreter), traced
    with fake tensors as torch.compile does, here without a GPU: the choice
    comes from the disk cache, with nothing measured."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", RESNET_FUSED_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", TRACE_REGISTRATION], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[(False, 'cudnn')]"


# ---- the timer ---------------------------------------------------------------------------


class FakeClock:
    """Events that measure 0.5 ms per call of fn recorded between them."""

    def __init__(self, capturing=False):
        self.trace, self._capturing = [], capturing

    def call(self):
        self.trace.append("call")

    def event(self):
        clock = self

        class Event:
            def record(self):
                self.at = len(clock.trace)
                clock.trace.append("record")

            def elapsed_time(self, end):
                return 0.5 * clock.trace[self.at:end.at].count("call")

        return Event()

    def synchronize(self):
        self.trace.append("sync")

    def hold(self, launches):
        self.trace.append(f"hold {launches}")

    def capturing(self):
        return self._capturing


def test_timer_warms_up_then_times_back_to_back_calls():
    clock = FakeClock()
    assert tuning.cuda_time(clock.call, clock, rounds=3, target_ms=2.0) == pytest.approx(0.5)
    trace = clock.trace
    assert trace[:2] == ["call", "sync"]  # a warm-up call before any event: warm L2
    timed_rounds = [i for i, t in enumerate(trace) if t.startswith("hold")]
    assert len(timed_rounds) == 3
    for i in timed_rounds:  # the GPU is held while the host queues the round; no flush in between
        assert trace[i:i + 6] == ["hold 4", "record", "call", "call", "call", "call"]


def test_timer_refuses_during_capture():
    clock = FakeClock(capturing=True)
    with pytest.raises(RuntimeError, match="CUDA-graph capture"):
        tuning.cuda_time(clock.call, clock)
    assert clock.trace == []


# ---- resnet_fused.tune -----------------------------------------------------------------------


@pytest.fixture
def timed(monkeypatch):
    """Timing as on a GPU, with a fixed timer (no GPU here); counts calls."""
    calls = []
    monkeypatch.setattr(tuning, "can_measure", lambda x: True)
    monkeypatch.setattr(tuning, "cuda_time", lambda fn: calls.append(fn) or 1.0)
    return calls


def small_model():
    model = resnet_fused.cifar_resnet(8)  # stem (C = 3), 3×3 convs, option-A (narrow) residuals
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.to(DEVICE)


def test_tune_fills_the_cache_for_a_new_process(cache_dir, timed):
    model = small_model().train()
    running = [b.running_mean.clone() for b in model.modules() if isinstance(b, nn.BatchNorm2d)]
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    summary = resnet_fused.tune(model, x, batch_sizes=[2, 1])
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert len(summary) == 2 * convs  # every convolution at both batch sizes (no two alike in this model)
    assert {p.split()[0].removeprefix("x=").split("x")[0] for p in summary} == {"2", "1"}  # the batch
    assert set(summary.values()) <= {triton_conv.INTERPRETER_CONFIG.name, "cudnn"}
    assert timed, "nothing was timed"
    assert model.training and all(m.training for m in model.modules())  # modes restored
    assert all(torch.equal(a, b.running_mean) for a, b in
               zip(running, [b for b in model.modules() if isinstance(b, nn.BatchNorm2d)]))
    assert set(stored(x)["choices"]) == set(summary)

    tuning.clear()  # a new process: everything from disk, checked, nothing timed
    timed.clear()
    assert resnet_fused.tune(model, x, batch_sizes=[2, 1]) == summary
    assert timed == []


def test_tune_compiled_model_tunes_its_original(cache_dir, timed):
    model = small_model()
    compiled = torch.compile(model, backend="aot_eager")
    summary = resnet_fused.tune(compiled, torch.randn(1, 3, 8, 8, device=DEVICE))
    assert len(summary) == sum(isinstance(m, nn.Conv2d) for m in model.modules()) and timed


def test_tune_argument_errors():
    model, x = small_model(), torch.randn(1, 3, 8, 8, device=DEVICE)
    with pytest.raises(TypeError, match="`model`"):
        resnet_fused.tune(lambda t: t, x)
    with pytest.raises(TypeError, match="`example_input`"):
        resnet_fused.tune(model, [x])
    with pytest.raises(ValueError, match="`example_input`"):
        resnet_fused.tune(model, x[:0])
    with pytest.raises(TypeError, match="`batch_sizes`"):
        resnet_fused.tune(model, x, batch_sizes=8)
    for bad in ([], [0], [2, -1], [1.5], [True]):
        with pytest.raises(ValueError, match="`batch_sizes`"):
            resnet_fused.tune(model, x, batch_sizes=bad)


def test_tune_says_when_there_is_nothing_to_tune(cache_dir, monkeypatch):
    """CPU tensors without the interpreter (a CPU-only machine): a warning
    and an empty summary, no forward."""
    from resnet_fused.ops import triton as triton_pkg

    monkeypatch.setattr(triton_pkg, "interpreting", lambda: False)
    model = small_model()
    ran = []
    model.register_forward_pre_hook(lambda m, a: ran.append(1))
    with pytest.warns(UserWarning, match="nothing to tune"):
        assert resnet_fused.tune(model, torch.randn(1, 3, 8, 8)) == {}
    assert ran == []


def test_tune_unfused_model_warns(cache_dir, timed):
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).to(DEVICE)
    with pytest.warns(UserWarning, match="no fused convolution"):
        assert resnet_fused.tune(plain, torch.randn(1, 3, 8, 8, device=DEVICE)) == {}


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.gpu
def test_tune_on_gpu_persists_measured_choices(cache_dir, monkeypatch):
    """On a GPU: measured, stored, and in a new process taken from disk
    (checked, not timed)."""
    model = small_model().cuda().half().to(memory_format=torch.channels_last)  # 7 convs: ~100 candidates
    x = torch.randn(2, 3, 32, 32, device="cuda", dtype=torch.half).contiguous(memory_format=torch.channels_last)
    summary = resnet_fused.tune(model, x)
    assert summary and set(stored(x)["choices"]) == set(summary)
    tuning.clear()
    monkeypatch.setattr(tuning, "cuda_time", never_timed)
    assert resnet_fused.tune(model, x) == summary


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.gpu
def test_cuda_timer_runs_on_a_gpu():
    """The real clock (events, the GPU hold) works; no timing is asserted."""
    a = torch.randn(512, 512, device="cuda")
    ms = tuning.cuda_time(lambda: a @ a)
    assert ms > 0 and ms == ms
