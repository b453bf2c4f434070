"""Clear, immediate errors: missing model, server that does not answer, bad config; config wiring."""

from __future__ import annotations

import socket
import threading

import pytest

from sphere.backends import BackendUnavailableError, SamplingParams, make_backend, sampling_params
from sphere.model_paths import resolve_model
from sphere.resources import ModelNotFoundError


def test_missing_model_path_fails_at_once(tmp_path, monkeypatch):
    # "at once" = before any hub traffic or weight loading: both are made to fail loudly if reached
    import huggingface_hub
    import transformers

    def _forbidden(*a, **k):
        raise AssertionError("a missing local model must fail before any hub call or model load")

    for mod, name in ((huggingface_hub, "snapshot_download"), (huggingface_hub, "hf_hub_download"),
                      (transformers.AutoModelForCausalLM, "from_pretrained"),
                      (transformers.AutoTokenizer, "from_pretrained")):
        monkeypatch.setattr(mod, name, _forbidden)
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        resolve_model(str(missing))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        make_backend({"backend": {"name": "transformers"}}, missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_hub_name_offline_not_cached_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="local HF cache"):
        resolve_model("sphere-test-org/definitely-not-cached-model")


def test_unknown_backend_name(tiny_model_dir):
    with pytest.raises(ValueError, match="backend.name"):
        make_backend({"backend": {"name": "nope"}}, tiny_model_dir)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)  # a hang fails the test (pytest-timeout), no wall-clock assertion
def test_server_refusing_connections_fails_fast_naming_url(tiny_model_dir):
    from sphere.backends.openai_backend import OpenAIBackend

    port = _closed_port()
    with pytest.raises(BackendUnavailableError, match=f"127.0.0.1:{port}/v1/models"):
        OpenAIBackend(tiny_model_dir, base_url=f"http://127.0.0.1:{port}", retries=2, backoff_s=0.05, timeout_s=1)


class FakeSilentServer:
    """Accepts TCP connections and never answers (a hung server)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self._stop = False
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                c, _ = self.sock.accept()
                self.conns.append(c)
            except OSError:
                continue

    def close(self):
        self._stop = True
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.mark.timeout(60)  # the client must give up by itself; a hang fails the test
def test_server_that_hangs_times_out_within_budget(tiny_model_dir):
    from sphere.backends.openai_backend import OpenAIBackend

    srv = FakeSilentServer()
    try:
        with pytest.raises(BackendUnavailableError, match="no answer after 2 attempt"):
            OpenAIBackend(tiny_model_dir, base_url=f"http://127.0.0.1:{srv.port}", retries=1, backoff_s=0.05,
                          timeout_s=0.5)
    finally:
        srv.close()


def test_composed_config_builds_backend_and_sampling(tiny_model_dir):
    from hydra import compose, initialize_config_dir

    from sphere.cli import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["backend=transformers"])
    # no dead sampling.n / sampling.max_step_tokens any more: the search samples search.expansions candidates
    # of search.max_step_tokens, passed as overrides
    sp = sampling_params(cfg, "step", n=3, max_tokens=96)
    assert sp.n == 3 and sp.stop == [cfg.prompt.step_delimiter] and sp.max_tokens == 96
    full = sampling_params(cfg, "solution")
    assert full.stop is None and full.max_tokens == cfg.sampling.max_solution_tokens
    b = make_backend(cfg, tiny_model_dir)
    try:
        assert b.name == "transformers"
        out = b.next_steps([b.tokenizer("Problem: Ann has 3 pens.\n\nSolution:\n")["input_ids"]],
                           SamplingParams(n=2, temperature=0.5, max_tokens=8, seed=0, stop=sp.stop))
        assert len(out) == 1 and len(out[0]) == 2
    finally:
        b.close()
    for name in ("vllm", "openai"):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            c = compose(config_name="config", overrides=[f"backend={name}"])
        assert c.backend.name == name  # every backend config composes (interpolations resolve)
        from omegaconf import OmegaConf

        OmegaConf.to_container(c.backend, resolve=True)
