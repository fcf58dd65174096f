"""``cme-rewards doctor``: what this machine has, and whether CME works on it, in one command.

Prints the versions found, whether ``import verl`` registers the reward manager ``cme`` (with the
real import error when not: veRL logs it at DEBUG only), whether the TRL and OpenRLHF adapters
import, the verifier's device and dtype, and whether it loads and scores a probe. Takes the
scorer's options (``--verifier``, ``--device``, ...); ``--json`` prints one JSON object.
Exit status: 0 when every check passes (a framework not installed is no failure), 1 when one
fails, 2 for a bad option.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import platform
import sys
import time
from typing import Any

from cme_rewards.options import OptionError, ScorerOptions, add_arguments, flag, from_namespace

LIBRARIES = ("cme-rewards", "torch", "transformers", "triton", "accelerate", "gguf")
FRAMEWORKS = ("verl", "trl", "openrlhf", "vllm")
PACKAGES = LIBRARIES + FRAMEWORKS
"""Distributions whose versions the doctor reports."""

PROBE = ("What is the capital of France?", "The capital of France is Paris.")
"""(prompt, response) the verifier scores."""


def versions() -> dict[str, str | None]:
    """Python and each of :data:`PACKAGES` (``None``: not installed), plus torch's CUDA."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    try:
        import torch

        found["torch.cuda"] = torch.version.cuda
    except ImportError:
        pass
    return found


def verl_check() -> dict[str, Any]:
    """Whether ``import verl`` registers ``cme`` (``installed`` False: veRL is absent, no failure)."""
    if importlib.util.find_spec("verl") is None:
        return {"installed": False, "ok": None, "detail": "not installed"}
    from cme_rewards.verl.status import plugin_status

    ok, detail = plugin_status()
    return {"installed": True, "ok": ok, "detail": detail}


def adapter_check(module: str, adapter: str) -> dict[str, Any]:
    """Whether ``adapter`` imports when ``module`` (the framework) is installed."""
    if importlib.util.find_spec(module) is None:
        return {"installed": False, "ok": None, "detail": "not installed"}
    try:
        importlib.import_module(adapter)
    except Exception as exc:  # noqa: BLE001 - reported
        detail = f"{adapter} does not import ({type(exc).__name__}: {exc})"
        return {"installed": True, "ok": False, "detail": detail}
    return {"installed": True, "ok": True, "detail": f"{adapter} imports"}


def verifier_check(options: ScorerOptions) -> dict[str, Any]:
    """The device and dtype the verifier would use; then load it and score :data:`PROBE`."""
    import torch

    from cme_rewards.models import resolve_device, resolve_dtype

    device = resolve_device(options.device)
    out: dict[str, Any] = {
        "verifier": options.verifier,
        "device": str(device),
        "dtype": str(resolve_dtype(options.dtype, device)).removeprefix("torch."),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    try:
        options.check_here(flag)
        from cme_rewards.scorer import CMEScorer

        started = time.perf_counter()
        scorer = CMEScorer(options=options)
        out["load_s"] = round(time.perf_counter() - started, 2)
        out["impl"] = scorer.impl
        out["dtype"] = str(next(scorer.model.parameters()).dtype).removeprefix("torch.")
        started = time.perf_counter()
        result = scorer.score([PROBE[0]], [PROBE[1]])[0]
        out["score_s"] = round(time.perf_counter() - started, 3)
    except Exception as exc:  # noqa: BLE001 - the doctor reports every failure
        out.update(ok=False, detail=f"{type(exc).__name__}: {exc}")
        return out
    out.update(cme=result.cme, n_tokens=result.n_tokens)
    if result.error is not None or not math.isfinite(result.cme):
        out.update(ok=False, detail=f"the probe got the floor reward: {result.error}")
    else:
        out.update(ok=True, detail=f"scores the probe: cme {result.cme:.4f} nats")
    return out


def diagnose(options: ScorerOptions) -> dict[str, Any]:
    """Every check, as one JSON-ready dict; ``ok`` is whether all of them passed."""
    report: dict[str, Any] = {
        "versions": versions(),
        "verl": verl_check(),
        "trl": adapter_check("trl", "cme_rewards.trl"),
        "openrlhf": adapter_check("openrlhf", "cme_rewards.openrlhf.runtime"),
        "verifier": verifier_check(options),
    }
    report["ok"] = all(
        report[part]["ok"] is not False for part in ("verl", "trl", "openrlhf", "verifier")
    )
    return report


def _mark(ok: bool | None) -> str:
    return {True: "ok", False: "FAIL", None: "--"}[ok]


def render(report: dict[str, Any]) -> str:
    """The report as text, one check per line (details indented below a failure)."""
    found = report["versions"]
    lines = ["versions:"]
    missing = {"torch.cuda": "none (a CPU build)"}
    lines += [
        f"  {name:<13} {version or missing.get(name, 'not installed')}"
        for name, version in found.items()
    ]
    for part, title in (("verl", "veRL plugin"), ("trl", "TRL"), ("openrlhf", "OpenRLHF")):
        check = report[part]
        first, *rest = str(check["detail"]).splitlines() or [""]
        lines.append(f"{_mark(check['ok']):<4} {title}: {first}")
        lines += [f"       {line}" for line in rest]
    v = report["verifier"]
    lines.append(
        f"{_mark(None):<4} verifier {v['verifier']!r} would run on {v['device']} in {v['dtype']}"
        + (f" (CUDA devices: {', '.join(v['cuda_devices'])})" if v["cuda_devices"] else "")
    )
    timing = f" (load {v['load_s']} s, impl {v['impl']})" if "load_s" in v else ""
    lines.append(f"{_mark(v['ok']):<4} verifier: {v['detail']}{timing}")
    lines.append("all checks passed" if report["ok"] else "some checks FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the checks; print text (or ``--json``). Returns 0 (all passed), 1 (one failed) or 2."""
    parser = argparse.ArgumentParser(
        prog="cme-rewards doctor",
        description="Versions, framework plugins, and a probe of the verifier on this machine.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_arguments(parser.add_argument_group("verifier (the scorer's options)"), ScorerOptions)
    args = parser.parse_args(argv)
    try:
        options = from_namespace(ScorerOptions, args)
    except OptionError as exc:
        print(f"cme-rewards doctor: error: {exc}", file=sys.stderr)
        return 2
    report = diagnose(options)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
