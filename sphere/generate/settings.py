"""`sphere generate`'s settings: the config hash its records carry (``config_hash``) and the checks that run
before any model loads or output file is created (``validate_generate_config``)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import OmegaConf

from sphere.generate.constructions import Construction
from sphere.generate.pairs import PairFilter
from sphere.rewards.mini_world import MiniWorldStepScorer
from sphere.search.config import validate_search_config


def config_hash(cfg: Any) -> str:
    """Signature of everything that changes the generated data (not paths, logging or workers)."""
    # resolve each node against the whole config (data.data_dir points at paths.data_dir)
    keep = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in ("model", "search", "stages", "scorer", "data", "prompt", "seed") if k in cfg}
    blob = json.dumps(keep, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def validate_generate_config(cfg: Any) -> None:
    st = cfg.stages
    if str(st.inverted) not in ("swap", "drop"):
        raise ValueError(f"config stages.inverted={st.inverted!r}: allowed swap | drop")
    if str(st.stage2_rejected) not in ("sol_max", "sol_min"):
        raise ValueError(f"config stages.stage2_rejected={st.stage2_rejected!r}: allowed sol_max | sol_min")
    if int(st.small_expansions_factor) < 1:
        raise ValueError(f"config stages.small_expansions_factor={st.small_expansions_factor}: allowed >= 1")
    if cfg.data.limit is not None and int(cfg.data.limit) < 0:
        raise ValueError(f"config data.limit={cfg.data.limit}: allowed null or an integer >= 0")
    if "scorer" in cfg and str(cfg.scorer.get("name", "")) == "mini_world":  # no model: its knobs check here
        MiniWorldStepScorer(cfg.scorer)
    # the search and filter settings too, before any model loads or output file is created (issue #11)
    validate_search_config(cfg.search)
    PairFilter.from_cfg(cfg.filters)
    con = Construction.from_cfg(cfg.get("construction"))
    runner = cfg.get("runner")
    if con.name != "sphere" and runner is not None and str(runner.get("name", "local")) != "local":
        raise ValueError(f"config construction={con.name}: runs with runner=local only (runner=ray writes the "
                         "paper's pairs: construction=sphere)")
    if str(cfg.get("engine_backend", "cpp")) not in ("cpp", "py"):
        raise ValueError(f"config engine_backend={cfg.engine_backend!r}: allowed cpp | py")
