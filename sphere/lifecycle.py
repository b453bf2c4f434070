"""One owner for the models of a generation / evaluation phase: the policy, the small model, the step scorer.

``sphere generate``, ``sphere run`` and the transfer runs open, close and reopen models only through
``Models``, so the memory rules hold everywhere (docs/scaling.md, the memory plan of ``sphere.memplan``):

- the policy backend opens on first use and serves evaluation and stages 1-2;
- the small model (stage 3) opens after the policy's stages; with ``stages.close_policy_before_small`` the
  policy is closed first (two vLLM engines of 7B and 3B do not share one 80 GB GPU at the default fractions);
  a small model equal to the policy reuses the policy backend;
- the step scorer (PRM) opens on first use and is closed with the rest;
- ``close_all()`` runs before training: nothing of generation stays resident through DPO.

    with Models(cfg, policy=path) as m:
        evaluate(m.policy())
        gen.run(problems, m.policy(), m.scorer(), check_answers, small_backend_factory=m.small)
    train_dpo(...)                      # every engine is closed here
"""

from __future__ import annotations

import logging
from typing import Any

from sphere import backends  # called as backends.make_backend: tests replace it there
from sphere.model_paths import resolve_model
from sphere.rewards import make_scorer

log = logging.getLogger(__name__)


class Models:
    """Lazily opened policy / small / scorer for one phase; ``close_all`` (or leaving the ``with``) frees them.

    Args:
        cfg: the composed config (``model``, ``backend``, ``scorer``, ``stages``).
        policy: the policy model directory (default: ``resolve_model(cfg.model.policy)``).
        small: the small model directory (default: ``resolve_model(cfg.model.small)`` when stage 3 is on).
    """

    def __init__(self, cfg: Any, policy: str | None = None, small: str | None = None):
        self.cfg = cfg
        self._policy_path = policy
        self._small_path = small
        self._policy: Any = None
        self._small: Any = None
        self._scorer: Any = None
        self.opened: list[str] = []  # what was opened, in order (tests and logs)

    # ------------------------------------------------------------------------------------ paths
    def policy_path(self) -> str:
        if self._policy_path is None:
            self._policy_path = str(resolve_model(str(self.cfg.model.policy), self.cfg))
        return self._policy_path

    def small_path(self) -> str:
        if self._small_path is None:
            self._small_path = str(resolve_model(str(self.cfg.model.small), self.cfg))
        return self._small_path

    # ------------------------------------------------------------------------------------ models
    def policy(self) -> Any:
        """The policy backend (opened, or reopened after ``close_policy``)."""
        if self._policy is None:
            self._policy = backends.make_backend(self.cfg, self.policy_path())
            self.opened.append("policy")
        return self._policy

    def scorer(self) -> Any:
        """The step scorer of ``cfg.scorer`` (a rollout scorer samples with the policy backend)."""
        if self._scorer is None:
            name = str(self.cfg.scorer.name)
            self._scorer = make_scorer(self.cfg, backend=self.policy() if name == "rollout" else None)
            self.opened.append(f"scorer:{name}")
        return self._scorer

    def small(self) -> Any:
        """The small model's backend for stage 3 (the factory ``Generator.run`` calls after stages 1-2)."""
        if self._small is not None:
            return self._small
        if self.small_path() == self.policy_path():
            return self.policy()
        if bool(self.cfg.stages.get("close_policy_before_small", False)):
            if str(self.cfg.scorer.name) == "rollout":
                raise ValueError("stages.close_policy_before_small=true with scorer=rollout: the rollout scorer "
                                 "samples with the policy; use scorer=prm or keep the policy open")
            self.close_policy()
        self._small = backends.make_backend(self.cfg, self.small_path())
        self.opened.append("small")
        return self._small

    # ------------------------------------------------------------------------------------ closing
    def close_policy(self) -> None:
        if self._policy is not None:
            self._policy.close()
            self._policy = None
            self.opened.append("-policy")

    def close_small(self) -> None:
        if self._small is not None:
            self._small.close()
            self._small = None
            self.opened.append("-small")

    def close_scorer(self) -> None:
        if self._scorer is not None:
            close = getattr(self._scorer, "close", None)
            if close is not None:
                close()
            self._scorer = None
            self.opened.append("-scorer")

    def close_all(self) -> None:
        """Small model, scorer, policy: everything of this phase, before training starts."""
        self.close_small()
        self.close_scorer()
        self.close_policy()

    def __enter__(self) -> Models:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close_all()
