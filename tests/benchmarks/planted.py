"""Run a benchmark script with planted, known costs, so its smoke test can check the numbers it
reports instead of only their existence.

    python tests/benchmarks/planted.py PLAN_JSON SCRIPT [ARGS...]

The script (a file in ``benchmarks/``) is imported as a module and its ``main()`` run with
``ARGS`` as the command line; nothing in the script changes. ``PLAN_JSON`` says what to plant:

``clock``
    ``time.perf_counter`` becomes a clock that only moves when a planted cost says so, so every
    duration the script measures is exactly the sum of the planted costs inside it.
``step`` / ``monitor``: ``{model_key: [seconds, ...]}``
    costs added to each call of a training step made by ``_common.make_train_step`` / of
    ``hyperbit.analysis.pathway_summary``, per model (``prenorm``, ``postnorm``, ``shcN``,
    ``dhcN``); the n-th call costs the n-th entry (the last one repeats).
``command``: ``{substring: seconds}``
    cost added to each ``subprocess.run`` whose command line contains the substring.
``analysis``: seconds added to each ``hyperbit.analysis.inspect.analyse`` call.
``bare_forward_sleep``: real seconds slept before each forward of a model the script builds
    with its own ``build_model`` name (the bare side of ``train_throughput``).
``record``: a path; the calls seen (forwards counted per model key, ``train`` /
    ``run_grid`` calls with their steps) are written there as JSON when ``main()`` returns.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def config_key(cfg) -> str:
    """``prenorm``, ``postnorm``, ``shcN`` or ``dhcN`` for a ModelConfig."""
    return cfg.pathway if cfg.pathway != "hc" else f"{'dhc' if cfg.hc_dynamic else 'shc'}{cfg.expansion_rate}"


def model_key(model) -> str:
    return config_key(getattr(model, "_orig_mod", model).cfg)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def main() -> int:
    plan, script, args = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3:]
    sys.path.insert(0, str(BENCH))
    import _common as C

    clock = Clock()
    if plan.get("clock"):
        time.perf_counter = clock
    calls: dict[str, list] = defaultdict(list)

    def costed(table: dict[str, list[float]], key: str) -> None:
        n = len(calls[key])
        costs = table[key]
        calls[key].append(n)
        clock.advance(costs[min(n, len(costs) - 1)])

    if "step" in plan:
        make_step = C.make_train_step

        def make_train_step(model, *a, **kw):
            real, key = make_step(model, *a, **kw), model_key(model)

            def step():
                real()
                costed(plan["step"], f"{key}/step")
            return step

        C.make_train_step = make_train_step
        plan["step"] = {f"{k}/step": v for k, v in plan["step"].items()}
    if "monitor" in plan:
        import hyperbit.analysis as analysis

        summary = analysis.pathway_summary

        def pathway_summary(model, *a, **kw):
            out = summary(model, *a, **kw)
            costed(plan["monitor"], f"{model_key(model)}/monitor")
            return out

        analysis.pathway_summary = pathway_summary
        plan["monitor"] = {f"{k}/monitor": v for k, v in plan["monitor"].items()}
    if "command" in plan:
        run = subprocess.run

        def planted_run(cmd, *a, **kw):
            out = run(cmd, *a, **kw)
            line = " ".join(map(str, cmd)) if isinstance(cmd, (list, tuple)) else str(cmd)
            for needle, cost in plan["command"].items():
                if needle in line:
                    clock.advance(cost)
            return out

        subprocess.run = planted_run
    if "analysis" in plan:
        import hyperbit.analysis.inspect as inspect_mod

        analyse = inspect_mod.analyse

        def planted_analyse(*a, **kw):
            out = analyse(*a, **kw)
            clock.advance(plan["analysis"])
            return out

        inspect_mod.analyse = planted_analyse

    spec = importlib.util.spec_from_file_location(Path(script).stem, BENCH / script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)

    if "bare_forward_sleep" in plan:
        build = mod.build_model

        def build_model(cfg, *a, **kw):
            model = build(cfg, *a, **kw)
            key = model_key(model)

            def slow(module, inputs):
                calls[f"{key}/bare_forward"].append(1)
                time.sleep(plan["bare_forward_sleep"])

            model.register_forward_pre_hook(slow)
            return model

        mod.build_model = build_model
    for name in ("train", "run_grid"):
        if plan.get("record") and hasattr(mod, name):
            real_fn = getattr(mod, name)

            def recorded(*a, _real=real_fn, _name=name, **kw):
                cfgs = [a[0]] if _name == "train" else [s.config for s in a[0]]
                for cfg in cfgs:
                    calls[_name].append([config_key(cfg.model), cfg.train.steps, cfg.train.log_every])
                return _real(*a, **kw)

            setattr(mod, name, recorded)

    sys.argv = [str(BENCH / script), *args]
    rc = mod.main()
    if plan.get("record"):
        Path(plan["record"]).write_text(json.dumps({k: (len(v) if k.endswith(("/step", "/monitor", "/bare_forward"))
                                                        else v) for k, v in calls.items()}))
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
